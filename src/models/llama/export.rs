//! Export of a Llama-family model as a Hugging Face folder.

use std::fs;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value, json};

use super::config::{LlamaArch, LlamaConfig};
use super::model::LlamaForCausalLM;
use crate::error::{PeftError, Result};
use crate::io::gguf::GgufModel;
use crate::io::hf_folder::{
    TOKENIZER_FILES, copy_present_files, same_dir, stage_tensors, torch_dtype_name, write_json,
};
use crate::io::peft_format::write_atomic;
use crate::io::source::{CONFIG_FILE, ModelSource, SourceKind, TOKENIZER_FILE};
use crate::model::PeftModel;

impl LlamaForCausalLM {
    /// Merges the active adapters into the weights, removes every adapter and writes the merged
    /// model as a Hugging Face folder (see [`save_pretrained`](Self::save_pretrained)).
    pub fn export_merged(
        model: PeftModel<Self>,
        src: &ModelSource,
        out_dir: &Path,
        dtype: DType,
    ) -> Result<()> {
        let merged = model.merge_and_unload()?;
        merged.save_pretrained(src, out_dir, dtype)
    }

    /// Writes this model's current weights as a Hugging Face folder loadable by transformers and
    /// candle-transformers' `llama::Llama`: `config.json` (with `torch_dtype`),
    /// `model.safetensors` (every tensor under its Hugging Face name, in `dtype`, written one
    /// tensor at a time), the tokenizer files and `generation_config.json`. For a folder or hub
    /// source they are copied; for a GGUF source `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` are built from its metadata. A layer that still carries an
    /// unmerged adapter is an error (use [`export_merged`](Self::export_merged)).
    pub fn save_pretrained(&self, src: &ModelSource, out_dir: &Path, dtype: DType) -> Result<()> {
        let dtype_name = match dtype {
            DType::F32 | DType::F16 | DType::BF16 => torch_dtype_name(dtype),
            _ => None,
        };
        let Some(dtype_name) = dtype_name else {
            return Err(PeftError::config(
                "dtype",
                format!("{dtype:?} is not an export dtype (expected f32, f16 or bf16)"),
            ));
        };
        self.check_no_pending_adapters()?;
        if src.kind != SourceKind::Gguf && same_dir(&src.dir, out_dir) {
            return Err(PeftError::Unsupported(format!(
                "refusing to export into the base model folder {}",
                src.dir.display()
            )));
        }
        fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;

        // The weights are renamed into place last, once every other file is written.
        let weights = stage_tensors(out_dir, &self.hf_tensors()?, Some(dtype))?;

        let mut cfg = self.config.clone();
        cfg.torch_dtype = Some(dtype_name.to_string());
        write_json(&out_dir.join(CONFIG_FILE), &cfg.to_hf_json())?;

        match src.kind {
            SourceKind::Gguf => {
                let gguf = GgufModel::open(&src.config)?;
                let tokenizer = gguf.tokenizer()?;
                let text = tokenizer
                    .to_string(true)
                    .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
                write_atomic(&out_dir.join(TOKENIZER_FILE), text.as_bytes())?;
                write_json(
                    &out_dir.join("tokenizer_config.json"),
                    &gguf.tokenizer_config_json()?,
                )?;
                write_json(
                    &out_dir.join("generation_config.json"),
                    &generation_config(&self.config),
                )?;
            }
            _ => {
                let extra = ["generation_config.json", "chat_template.jinja"];
                let names = TOKENIZER_FILES.iter().chain(extra.iter()).copied();
                copy_present_files(&src.dir, out_dir, names)?;
            }
        }
        weights.commit()?;
        Ok(())
    }

    /// Every weight under its Hugging Face name, in checkpoint order.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let attn = &l.self_attn;
            let mlp = &l.mlp;
            for lin in [
                &attn.q_proj,
                &attn.k_proj,
                &attn.v_proj,
                &attn.o_proj,
                &mlp.gate_proj,
                &mlp.up_proj,
                &mlp.down_proj,
            ] {
                let h = lin.handle();
                out.push((format!("{}.weight", h.name()), h.weight()?));
                if let Some(b) = h.bias() {
                    out.push((format!("{}.bias", h.name()), b));
                }
            }
            let prefix = format!("model.layers.{i}");
            let mut norms = vec![
                ("input_layernorm", &l.input_layernorm),
                ("post_attention_layernorm", &l.post_attention_layernorm),
            ];
            if let Some(ffn) = &l.gemma_ffn {
                norms.push(("pre_feedforward_layernorm", &ffn.pre));
                norms.push(("post_feedforward_layernorm", &ffn.post));
            }
            if let Some((q, k, _)) = &attn.qk_norms {
                norms.push(("self_attn.q_norm", q));
                norms.push(("self_attn.k_norm", k));
            }
            for (name, w) in norms {
                out.push((format!("{prefix}.{name}.weight"), self.hf_norm(w)?));
            }
        }
        out.push(("model.norm.weight".to_string(), self.hf_norm(&self.norm)?));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.handle().weight()?));
        }
        Ok(out)
    }

    /// A norm weight as Hugging Face stores it (Gemma keeps `1 + w`; see `gemma`).
    fn hf_norm(&self, kept: &Tensor) -> Result<Tensor> {
        match self.config.architecture {
            LlamaArch::Gemma3 => super::gemma::export_norm(kept),
            _ => Ok(kept.clone()),
        }
    }

    fn check_no_pending_adapters(&self) -> Result<()> {
        for l in self.linears() {
            let h = l.handle();
            let merged = h.merged_adapters();
            if let Some(n) = h.adapter_names().iter().find(|n| !merged.contains(n)) {
                return Err(PeftError::Unsupported(format!(
                    "`{}` carries adapter `{n}` that is not merged into its weight; export with \
                     LlamaForCausalLM::export_merged (merge_and_unload)",
                    h.name()
                )));
            }
        }
        Ok(())
    }
}

/// `generation_config.json` from the config's special token ids.
fn generation_config(cfg: &LlamaConfig) -> Value {
    let mut obj = Map::new();
    if let Some(id) = cfg.bos_token_id {
        obj.insert("bos_token_id".into(), json!(id));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            obj.insert("eos_token_id".into(), json!(one));
        }
        many => {
            obj.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(id) = cfg.pad_token_id {
        obj.insert("pad_token_id".into(), json!(id));
    }
    Value::Object(obj)
}
