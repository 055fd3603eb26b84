//! `svd-init-smollm2`: the SVFit initialisation (thin SVD, rank by the default energy rule 0.99)
//! of all 210 projection matrices of SmolLM2-135M (30 layers × q, k, v, o, gate, up, down).
//!
//! The matrices are read from the GGUF file and dequantised to f32 before the clock starts
//! (loading is not part of the workload); the time is the wall time of
//! `SvfitConfig::init_adapter` over all of them, in layer order, on the CPU. llama.cpp stores q
//! and k with their rows permuted for its RoPE layout; a row permutation changes neither the
//! singular values nor the cost, so the matrices are used as stored.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::svfit::SvfitConfig;
use candle_peft::{Adapter, LayerGeometry};

use super::measure::BenchResult;

/// Where `scripts/fetch-models.sh` leaves SmolLM2.
const SMOLLM2_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// GGUF tensor names of the seven projections, with their HF module names.
const PROJECTIONS: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The projection matrices of a Llama-family GGUF file as f32 `[out, in]`, with their HF
/// module paths, in layer order.
pub fn projection_matrices(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("{}: not a GGUF file", path.display()))?;
    let layers = (0..)
        .take_while(|i| {
            content
                .tensor_infos
                .contains_key(&format!("blk.{i}.attn_q.weight"))
        })
        .count();
    if layers == 0 {
        bail!(
            "{}: no blk.N.attn_q.weight tensors (not a Llama-family model)",
            path.display()
        );
    }
    let device = Device::Cpu;
    let mut out = Vec::with_capacity(layers * PROJECTIONS.len());
    for i in 0..layers {
        for (gguf, hf) in PROJECTIONS {
            let name = format!("blk.{i}.{gguf}.weight");
            let w = content
                .tensor(&mut file, &name, &device)
                .with_context(|| format!("{}: reading {name}", path.display()))?
                .dequantize(&device)?
                .to_dtype(DType::F32)?;
            out.push((format!("model.layers.{i}.{hf}"), w));
        }
    }
    Ok(out)
}

pub fn svd_init_smollm2(model: Option<&str>) -> Result<BenchResult> {
    let path = model.map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(SMOLLM2_GGUF),
        |m| Path::new(m).to_path_buf(),
    );
    let matrices = projection_matrices(&path)?;
    let config = SvfitConfig::new(&["q_proj"]);
    let device = Device::Cpu;

    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let mut ranks = Vec::with_capacity(matrices.len());
    let mut trainable = 0usize;
    for (module, w) in &matrices {
        let (out_features, in_features) = w.dims2()?;
        let geometry = LayerGeometry::Linear {
            in_features,
            out_features,
        };
        let adapter = config.init_adapter(module, geometry, w, &device)?;
        trainable += adapter.num_trainable();
        ranks.push((adapter.rank(), out_features.min(in_features)));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let kept: usize = ranks.iter().map(|(r, _)| r).sum();
    let possible: usize = ranks.iter().map(|(_, k)| k).sum();
    let mut details = serde_json::Map::new();
    details.insert("matrices".into(), matrices.len().into());
    details.insert("energy".into(), config.energy.into());
    details.insert("svd_dtype".into(), config.svd_dtype.name().into());
    details.insert("trainable_params".into(), trainable.into());
    details.insert("rank_share".into(), (kept as f64 / possible as f64).into());
    if let Some(c) = cpu_seconds {
        details.insert("cpu_seconds".into(), c.into());
    }
    Ok(BenchResult {
        metric: "seconds",
        value: seconds,
        unit: "s",
        how: format!(
            "SVFit init of {} matrices, energy {}, SVD in {}; {trainable} trainable values, \
             mean rank {:.0}% of min(out, in){}",
            matrices.len(),
            config.energy,
            config.svd_dtype.name(),
            100.0 * kept as f64 / possible as f64,
            cpu_seconds.map_or_else(String::new, |c| format!("; {c:.1} s of CPU time"))
        ),
        details,
    })
}

/// User + system CPU time of this process (Linux `/proc/self/stat`), to read a wall time taken
/// on a busy machine against.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (`state`).
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux configuration in use.
    Some(ticks / 100.0)
}
