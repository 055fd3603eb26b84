//! The main job, end to end on all-MiniLM-L6-v2 and SST-2:
//!
//! 1. load the model by hub id (from the HF cache that `scripts/fetch-models.sh` fills; no network),
//! 2. measure zero-shot sentiment accuracy on held-out sentences (is the sentence embedding closer
//!    to "a great movie" or to "a terrible movie"?),
//! 3. attach LoRA (r = 8, α = 16) to every query and value projection and fine-tune it with AdamW
//!    on that same two-anchor objective,
//! 4. measure accuracy again, save the adapter (PEFT format), export merged weights with
//!    `candle-peft merge`'s streaming merge, reload the merged folder as a plain model, and check it
//!    reproduces the adapted model.
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example quickstart [-- OUT_DIR]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_peft::io::export::{MergeOptions, merge_adapter_into_base};
use candle_peft::io::source;
use candle_peft::models::bert::{BertModel, mean_pool};
use candle_peft::{LoraConfig, PeftModel};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
const ANCHORS: [&str; 2] = ["a terrible movie", "a great movie"];
const STEPS: usize = 80;
const BATCH: usize = 16;
const EVAL_ROWS: usize = 400;
/// Cosine similarities are in [-1, 1]; a temperature turns them into usable logits.
const LOGIT_SCALE: f64 = 20.0;

struct Example {
    label: u32,
    text: String,
}

fn read_tsv(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let (label, sentence) = line.split_once('\t').with_context(|| {
            format!("{}:{}: expected label<TAB>sentence", path.display(), i + 1)
        })?;
        rows.push(Example {
            label: label
                .trim()
                .parse()
                .with_context(|| format!("{}:{}: bad label", path.display(), i + 1))?,
            text: sentence.to_string(),
        });
    }
    Ok(rows)
}

/// Token ids and attention mask, padded to the longest sentence of the batch.
fn encode(tokenizer: &Tokenizer, texts: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(anyhow::Error::msg)?;
    let len = encodings.first().map_or(0, |e| e.get_ids().len());
    let ids: Vec<u32> = encodings
        .iter()
        .flat_map(|e| e.get_ids().to_vec())
        .collect();
    let mask: Vec<u32> = encodings
        .iter()
        .flat_map(|e| e.get_attention_mask().to_vec())
        .collect();
    Ok((
        Tensor::from_vec(ids, (texts.len(), len), device)?,
        Tensor::from_vec(mask, (texts.len(), len), device)?,
    ))
}

/// L2-normalised mean-pooled sentence embeddings, `[N, H]`.
fn embed(
    model: &PeftModel<BertModel>,
    tokenizer: &Tokenizer,
    texts: &[&str],
    device: &Device,
) -> Result<Tensor> {
    let (ids, mask) = encode(tokenizer, texts, device)?;
    let hidden = model.model().forward(&ids, None, Some(&mask))?;
    let pooled = mean_pool(&hidden, Some(&mask))?;
    let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(pooled.broadcast_div(&norm)?)
}

/// Logits `[N, 2]`: scaled cosine similarity of each sentence to the two anchors.
fn logits(
    model: &PeftModel<BertModel>,
    tokenizer: &Tokenizer,
    batch: &[&Example],
    device: &Device,
) -> Result<Tensor> {
    let mut texts: Vec<&str> = batch.iter().map(|e| e.text.as_str()).collect();
    texts.extend(ANCHORS);
    let emb = embed(model, tokenizer, &texts, device)?;
    let n = batch.len();
    let sentences = emb.narrow(0, 0, n)?;
    let anchors = emb.narrow(0, n, ANCHORS.len())?;
    Ok((sentences.matmul(&anchors.t()?)? * LOGIT_SCALE)?)
}

fn accuracy(
    model: &PeftModel<BertModel>,
    tokenizer: &Tokenizer,
    rows: &[Example],
    device: &Device,
) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in rows.chunks(64) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let predicted = logits(model, tokenizer, &batch, device)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        correct += predicted
            .iter()
            .zip(chunk)
            .filter(|(p, e)| **p == e.label)
            .count();
    }
    Ok(correct as f64 / rows.len() as f64)
}

fn main() -> Result<()> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/quickstart".into())
        .into();
    let device = Device::Cpu;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let train = read_tsv(&data.join("train.tsv"))?;
    let valid = read_tsv(&data.join("valid.tsv"))?;
    let valid = &valid[..EVAL_ROWS.min(valid.len())];

    let model_source = source::resolve(MODEL)?;
    println!("model: {MODEL} at {}", model_source.dir.display());
    let tokenizer_path = model_source
        .tokenizer
        .clone()
        .context("the model has no tokenizer.json")?;
    let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(anyhow::Error::msg)?;
    // The shipped tokenizer pads every sentence to 128; pad per batch instead.
    tokenizer.with_padding(Some(PaddingParams::default()));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: 64,
            ..Default::default()
        }))
        .map_err(anyhow::Error::msg)?;

    let (mut model, _) = BertModel::from_source(&model_source, DType::F32, &device)?;
    let before = accuracy(&model, &tokenizer, valid, &device)?;
    println!(
        "zero-shot accuracy on {} held-out sentences: {:.1}%",
        valid.len(),
        100.0 * before
    );

    model.set_seed(42);
    model.add_adapter("default", LoraConfig::new(&["query", "value"], 8, 16.0))?;
    println!(
        "LoRA r=8 on query,value: {} trainable of {} parameters ({:.3}%)",
        model.num_trainable_parameters(),
        model.num_total_parameters(),
        100.0 * model.num_trainable_parameters() as f64 / model.num_total_parameters() as f64
    );
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    model.train();
    let started = Instant::now();
    for step in 0..STEPS {
        let batch: Vec<&Example> = (0..BATCH)
            .map(|i| &train[(step * BATCH + i) % train.len()])
            .collect();
        let labels = Tensor::from_vec(
            batch.iter().map(|e| e.label).collect::<Vec<u32>>(),
            BATCH,
            &device,
        )?;
        let loss =
            candle_nn::loss::cross_entropy(&logits(&model, &tokenizer, &batch, &device)?, &labels)?;
        opt.backward_step(&loss)?;
        if step % 20 == 0 || step + 1 == STEPS {
            println!("step {:>3}  loss {:.4}", step + 1, loss.to_scalar::<f32>()?);
        }
    }
    model.eval();
    println!(
        "trained {STEPS} steps of {BATCH} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let after = accuracy(&model, &tokenizer, valid, &device)?;
    println!(
        "fine-tuned accuracy: {:.1}% (was {:.1}%)",
        100.0 * after,
        100.0 * before
    );

    let adapter_dir = out.join("adapter");
    model.save_adapter("default", &adapter_dir)?;
    println!("adapter saved to {}", adapter_dir.display());

    let merged_dir = out.join("merged");
    let report = merge_adapter_into_base(
        &model_source.dir,
        &adapter_dir,
        &merged_dir,
        MergeOptions::default(),
    )?;
    println!(
        "merged {} modules into {}",
        report.merged_modules.len(),
        merged_dir.display()
    );

    // The merged folder is a plain model: no adapter, same outputs.
    let (merged, _) = BertModel::from_dir(&merged_dir, &device)?;
    let probe: Vec<&str> = valid.iter().take(8).map(|e| e.text.as_str()).collect();
    let adapted_emb = embed(&model, &tokenizer, &probe, &device)?;
    let merged_emb = embed(&merged, &tokenizer, &probe, &device)?;
    let diff = (adapted_emb - merged_emb)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let merged_acc = accuracy(&merged, &tokenizer, valid, &device)?;
    println!(
        "merged model: accuracy {:.1}%, max |embedding difference| vs adapted {diff:.2e}",
        100.0 * merged_acc
    );
    if diff > 1e-4 {
        bail!("the merged export does not reproduce the adapted model (max diff {diff:e})");
    }
    Ok(())
}
