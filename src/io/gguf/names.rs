//! GGUF tensor names as Hugging Face names, per architecture, and llama.cpp's q/k row
//! permutation.

use candle_core::Tensor;

/// The Hugging Face name of a GGUF tensor of the Llama family (`llama`, `qwen2`), or `None`.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    hf_tensor_name_for("llama", gguf)
}

/// The Hugging Face name of a GGUF tensor of architecture `arch` (`llama`, `qwen2`, `gemma3`),
/// or `None`. Gemma 3 names its four layer norms after what they wrap: `attn_norm` →
/// `input_layernorm`, `post_attention_norm` → `post_attention_layernorm` (after the attention),
/// `ffn_norm` → `pre_feedforward_layernorm`, `post_ffw_norm` → `post_feedforward_layernorm`,
/// plus `attn_{q,k}_norm` → `self_attn.{q,k}_norm`.
pub fn hf_tensor_name_for(arch: &str, gguf: &str) -> Option<String> {
    let (stem, kind) = gguf.rsplit_once('.')?;
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{kind}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" if arch == "gemma3" => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if arch == "gemma3" => "post_attention_layernorm",
        "post_ffw_norm" if arch == "gemma3" => "post_feedforward_layernorm",
        "attn_q_norm" if arch == "gemma3" => "self_attn.q_norm",
        "attn_k_norm" if arch == "gemma3" => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Rows of `w` (`[n_head·d, ..]`, a weight or a bias) grouped per head and reordered within
/// each head by swapping the axes of `w.reshape(n_head, a, b, rest)`.
fn swap_within_heads(w: &Tensor, n_head: usize, a: usize, b: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, a, b, rest))?
        .transpose(1, 2)?
        .reshape(dims)
}

fn head_halves(w: &Tensor, n_head: usize) -> candle_core::Result<usize> {
    let out = w.dims().first().copied().unwrap_or(0);
    if n_head == 0 || out % (2 * n_head) != 0 {
        candle_core::bail!("{out} rows do not split into {n_head} heads of even size");
    }
    Ok(out / n_head / 2)
}

/// Undoes llama.cpp's q/k permutation: interleaved RoPE pairs → Hugging Face's half-split rows.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let half = head_halves(w, n_head)?;
    swap_within_heads(w, n_head, half, 2)
}

/// llama.cpp's q/k permutation (Hugging Face rows → interleaved pairs); the inverse of
/// [`unpermute_qk`].
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let half = head_halves(w, n_head)?;
    swap_within_heads(w, n_head, 2, half)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names() {
        assert_eq!(
            hf_tensor_name("blk.3.attn_output.weight").as_deref(),
            Some("model.layers.3.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_tensor_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_tensor_name("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        for (gguf, hf) in [
            ("blk.2.ffn_norm.weight", "pre_feedforward_layernorm"),
            (
                "blk.2.post_attention_norm.weight",
                "post_attention_layernorm",
            ),
            ("blk.2.post_ffw_norm.weight", "post_feedforward_layernorm"),
            ("blk.2.attn_q_norm.weight", "self_attn.q_norm"),
            ("blk.2.attn_k_norm.weight", "self_attn.k_norm"),
            ("blk.2.attn_norm.weight", "input_layernorm"),
        ] {
            assert_eq!(
                hf_tensor_name_for("gemma3", gguf),
                Some(format!("model.layers.2.{hf}.weight"))
            );
        }
        assert_eq!(hf_tensor_name("blk.2.post_ffw_norm.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn permute_round_trip() {
        // 2 heads of size 4, 3 inputs: rows r = h·4 + i.
        let w = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        // llama.cpp: within a head, rows [0, 1, 2, 3] → [0, 2, 1, 3] (pairs (i, i + d/2)).
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, vec![0., 6., 3., 9., 12., 18., 15., 21.]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(unpermute_qk(&w, 3).is_err());
    }
}
