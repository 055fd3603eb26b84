//! LoRA versus LoRA-Pro (full and efficient modes) versus full fine-tuning of the targeted
//! matrices, at the same steps, data order and seeds, on two workloads:
//!
//! - `minilm`: all-MiniLM-L6-v2 on SST-2 (`data/sst2`), sequence classification; LoRA r = 8,
//!   α = 16 on `query`, `value`; the classifier is trained whole in every variant; validation
//!   accuracy on `data/sst2/valid.tsv`.
//! - `smollm2`: SmolLM2-135M-Instruct (GGUF, f32) on Tiny Shakespeare (`data/shakespeare`),
//!   causal LM; LoRA r = 8, α = 16 on `q_proj`, `v_proj`; held-out perplexity.
//!
//! "Full fine-tuning of the targeted matrices" trains the base weights of exactly the layers
//! LoRA targets (biases frozen), with AdamW, through the `modules_to_save` machinery
//! (`LayerHandle::add_trainable_copy`). Every variant runs a small learning-rate grid (LoRA-Pro
//! full mode and full fine-tuning take full-FT-sized rates, LoRA and LoRA-Pro efficient take
//! LoRA-sized ones); the plot shows each variant at its best rate.
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example lora_pro_compare --
//! [minilm|smollm2|plot|all] [--steps N] [--quick] [--out DIR]` (default: `all`, output
//! `out/lora_pro_compare`). Each workload writes `DIR/<workload>.json`; `plot` (and `all`) draws
//! every JSON found into `docs/lora_pro_comparison.png`. `--quick` runs one rate per variant.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var};
use candle_peft::data::{read_tsv, read_tsv_with_labels};
use candle_peft::io::source;
use candle_peft::optim::{LoraPair, LoraProMode};
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::causal_lm::CausalLmTask;
use candle_peft::tasks::classify::ClassifyTask;
use candle_peft::train::OptimizerKind;
use candle_peft::{
    DEFAULT_ADAPTER, EvalReport, LoraConfig, PeftModel, Schedule, TrainConfig, TrainTask, Trainer,
    Warmup,
};
use serde::{Deserialize, Serialize};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SEED: u64 = 42;

/// The four ways of training the targeted matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Lora,
    LoraProFull,
    LoraProEfficient,
    FullFt,
}

const VARIANTS: [Variant; 4] = [
    Variant::Lora,
    Variant::LoraProFull,
    Variant::LoraProEfficient,
    Variant::FullFt,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Lora => "LoRA",
            Variant::LoraProFull => "LoRA-Pro full",
            Variant::LoraProEfficient => "LoRA-Pro efficient",
            Variant::FullFt => "full FT",
        }
    }

    fn optimizer(self) -> OptimizerKind {
        match self {
            Variant::LoraProFull => OptimizerKind::LoraPro(LoraProMode::Full),
            Variant::LoraProEfficient => OptimizerKind::LoraPro(LoraProMode::Efficient),
            Variant::Lora | Variant::FullFt => OptimizerKind::AdamW,
        }
    }

    /// Learning rates tried: full-FT-sized for the variants whose step is the Adam direction
    /// of the full weight, LoRA-sized for the others. The first is the `--quick` choice.
    fn rates(self, quick: bool) -> &'static [f64] {
        let all: &'static [f64] = match self {
            Variant::Lora | Variant::LoraProEfficient => &[1e-3, 3e-4, 3e-3],
            Variant::LoraProFull | Variant::FullFt => &[1e-4, 3e-5, 3e-4],
        };
        if quick { &all[..1] } else { all }
    }
}

/// One training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    variant: String,
    lr: f64,
    /// Training loss of every step.
    losses: Vec<f64>,
    /// `(step, validation metric)`, the last one after the final step.
    evals: Vec<(usize, f64)>,
    final_metric: f64,
    trainable: usize,
    /// Optimiser-state values beyond AdamW's on the trainables (LoRA-Pro full: 2·Σ out·in).
    extra_state: usize,
    seconds: f64,
}

/// A workload's runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Workload {
    title: String,
    /// A short name for the plot's panel titles.
    #[serde(default)]
    short: String,
    /// `accuracy` (higher is better) or `perplexity` (lower is better).
    metric: String,
    steps: usize,
    runs: Vec<Run>,
}

impl Workload {
    fn higher_is_better(&self) -> bool {
        self.metric == "accuracy"
    }

    /// Each variant's run at its best learning rate, in [`VARIANTS`] order.
    fn best(&self) -> Vec<&Run> {
        VARIANTS
            .iter()
            .filter_map(|v| {
                self.runs
                    .iter()
                    .filter(|r| r.variant == v.name())
                    .filter(|r| r.final_metric.is_finite())
                    .max_by(|a, b| {
                        let o = a.final_metric.total_cmp(&b.final_metric);
                        if self.higher_is_better() {
                            o
                        } else {
                            o.reverse()
                        }
                    })
            })
            .collect()
    }
}

/// A task restricted to some of its trainable vars (full FT: the targeted weights, not their
/// biases, plus the head).
struct Restricted<'a, T: TrainTask> {
    inner: &'a T,
    frozen: HashSet<String>,
}

impl<T: TrainTask> TrainTask for Restricted<'_, T> {
    type Example = T::Example;

    fn loss(&self, batch: &[&Self::Example]) -> candle_peft::Result<(Tensor, usize)> {
        self.inner.loss(batch)
    }

    fn evaluate(&self, examples: &[Self::Example]) -> candle_peft::Result<EvalReport> {
        self.inner.evaluate(examples)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.inner
            .trainable_vars()
            .into_iter()
            .filter(|(n, _)| !self.frozen.contains(n))
            .collect()
    }

    fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
        self.inner.save_adapter(dir)
    }

    fn set_training(&self, training: bool) {
        self.inner.set_training(training)
    }

    fn lora_pairs(&self) -> candle_peft::Result<Vec<LoraPair>> {
        self.inner.lora_pairs()
    }

    fn no_weight_decay_vars(&self) -> Vec<String> {
        self.inner.no_weight_decay_vars()
    }

    fn regularization_loss(&self) -> candle_peft::Result<Option<Tensor>> {
        self.inner.regularization_loss()
    }
}

/// Replaces the LoRA adapter on every targeted layer by a trainable copy of the layer's weight
/// (and bias); returns the names of the bias vars, which full FT of the matrices leaves frozen.
fn make_targets_trainable<M>(model: &PeftModel<M>) -> Result<HashSet<String>> {
    let mut biases = HashSet::new();
    for layer in model.layers() {
        if !layer.adapter_names().iter().any(|n| n == DEFAULT_ADAPTER) {
            continue;
        }
        layer.delete(DEFAULT_ADAPTER)?;
        layer.add_trainable_copy(DEFAULT_ADAPTER, None)?;
        layer.set_active(&[DEFAULT_ADAPTER.to_string()]);
        if layer.bias().is_some() {
            biases.insert(format!(
                "base_model.model.{}.modules_to_save.{DEFAULT_ADAPTER}.bias",
                layer.name()
            ));
        }
    }
    Ok(biases)
}

/// `2·Σ out·in` over the LoRA pairs: LoRA-Pro full mode's moments.
fn full_mode_state(pairs: &[LoraPair]) -> usize {
    pairs
        .iter()
        .map(|p| 2 * p.b.dims()[0] * p.a.elem_count() / p.a.dims()[0])
        .sum()
}

fn train_config(
    steps: usize,
    batch: usize,
    lr: f64,
    variant: Variant,
    eval_every: usize,
) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: batch,
        lr,
        weight_decay: 0.0,
        schedule: Schedule::Linear,
        warmup: Warmup::Ratio(0.1),
        max_grad_norm: Some(1.0),
        optimizer: variant.optimizer(),
        seed: SEED,
        eval_every: Some(eval_every),
        log_every: 50,
        quiet: true,
        ..TrainConfig::default()
    }
}

/// Trains `task` (restricted to `trainable` when given) and records the run.
fn record<T: TrainTask>(
    task: &T,
    frozen: HashSet<String>,
    config: TrainConfig,
    variant: Variant,
    metric: &str,
    train: &[T::Example],
    valid: &[T::Example],
) -> Result<Run> {
    let task = Restricted {
        inner: task,
        frozen,
    };
    let trainable: usize = task
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let extra_state = match variant {
        Variant::LoraProFull => full_mode_state(&task.lora_pairs()?),
        _ => 0,
    };
    let lr = config.lr;
    let report = Trainer::new(config)?.run(&task, train, Some(valid))?;
    let evals: Vec<(usize, f64)> = report
        .evals
        .iter()
        .map(|e| {
            (
                e.step,
                e.report.metrics.get(metric).copied().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let final_metric = evals.last().map_or(f64::NAN, |e| e.1);
    let losses = report.losses;
    println!(
        "  {:<19} lr {lr:.0e}: loss {:.4} → {:.4} (mean of last 20 {:.4}), {metric} {final_metric:.4}, \
         {:.0}s",
        variant.name(),
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN),
        tail_mean(&losses, 20),
        report.seconds
    );
    Ok(Run {
        variant: variant.name().to_string(),
        lr,
        losses,
        evals,
        final_metric,
        trainable,
        extra_state,
        seconds: report.seconds,
    })
}

fn tail_mean(v: &[f64], n: usize) -> f64 {
    let tail = &v[v.len().saturating_sub(n)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

fn lora(targets: &[&str]) -> LoraConfig {
    LoraConfig::new(targets, 8, 16.0)
}

fn minilm(root: &Path, steps: usize, quick: bool) -> Result<Workload> {
    let dir = root.join("models/all-MiniLM-L6-v2");
    let model_source = source::resolve(&dir.display().to_string()).with_context(|| {
        format!(
            "{} (run `bash scripts/fetch-models.sh` first)",
            dir.display()
        )
    })?;
    let train = read_tsv(root.join("data/sst2/train.tsv"))?;
    let valid = read_tsv_with_labels(root.join("data/sst2/valid.tsv"), &train.labels)?;
    println!(
        "MiniLM / SST-2: {} training, {} validation sentences; {steps} steps of 16",
        train.examples.len(),
        valid.examples.len()
    );
    let mut runs = Vec::new();
    for variant in VARIANTS {
        for &lr in variant.rates(quick) {
            let opts = TaskOptions {
                seq_len: 64,
                seed: SEED,
                ..TaskOptions::default()
            };
            let mut task = ClassifyTask::from_source(model_source.clone(), &train.labels, opts)?;
            task.add_adapter(DEFAULT_ADAPTER, lora(&["query", "value"]))?;
            let frozen = match variant {
                Variant::FullFt => make_targets_trainable(task.model())?,
                _ => HashSet::new(),
            };
            let config = train_config(steps, 16, lr, variant, (steps / 2).max(1));
            runs.push(record(
                &task,
                frozen,
                config,
                variant,
                "accuracy",
                &train.examples,
                &valid.examples,
            )?);
        }
    }
    Ok(Workload {
        title: "MiniLM-L6 / SST-2".into(),
        short: "MiniLM/SST-2".into(),
        metric: "accuracy".into(),
        steps,
        runs,
    })
}

fn smollm2(root: &Path, steps: usize, quick: bool) -> Result<Workload> {
    let gguf = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model_source = source::resolve(&gguf.display().to_string()).with_context(|| {
        format!(
            "{} (run `bash scripts/fetch-models.sh` first)",
            gguf.display()
        )
    })?;
    let mut runs = Vec::new();
    let mut announced = false;
    for variant in VARIANTS {
        for &lr in variant.rates(quick) {
            let opts = TaskOptions {
                seq_len: 128,
                seed: SEED,
                ..TaskOptions::default()
            };
            let mut task = CausalLmTask::from_source(model_source.clone(), opts)?;
            let train = task.read_examples(&root.join("data/shakespeare/train.txt"), false)?;
            let valid = task.read_examples(&root.join("data/shakespeare/valid.txt"), true)?;
            if !announced {
                println!(
                    "SmolLM2-135M / Tiny Shakespeare: {} training, {} held-out sequences of ≤ 128 \
                     tokens; {steps} steps of 4",
                    train.len(),
                    valid.len()
                );
                announced = true;
            }
            task.add_adapter(DEFAULT_ADAPTER, lora(&["q_proj", "v_proj"]))?;
            let frozen = match variant {
                Variant::FullFt => make_targets_trainable(task.model())?,
                _ => HashSet::new(),
            };
            let config = train_config(steps, 4, lr, variant, (steps / 2).max(1));
            runs.push(record(
                &task,
                frozen,
                config,
                variant,
                "perplexity",
                &train,
                &valid,
            )?);
        }
    }
    Ok(Workload {
        title: "SmolLM2-135M / Tiny Shakespeare".into(),
        short: "SmolLM2/Shakespeare".into(),
        metric: "perplexity".into(),
        steps,
        runs,
    })
}

fn summary(w: &Workload) {
    println!("\n{} ({} steps), best rate per variant:", w.title, w.steps);
    println!(
        "| variant | lr | final train loss (mean of last 20 steps) | validation {} | trainable | extra optimiser state |",
        w.metric
    );
    println!("|---|---|---|---|---|---|");
    for r in w.best() {
        println!(
            "| {} | {:.0e} | {:.4} | {:.4} | {} | {} |",
            r.variant,
            r.lr,
            tail_mean(&r.losses, 20),
            r.final_metric,
            r.trainable,
            r.extra_state
        );
    }
    println!("\nevery run:");
    for r in &w.runs {
        println!(
            "  {:<19} lr {:.0e}: {} {:.4}, last-20 loss {:.4}",
            r.variant,
            r.lr,
            w.metric,
            r.final_metric,
            tail_mean(&r.losses, 20)
        );
    }
}

fn main() -> Result<()> {
    // Allocator and thread-pool settings for training (see candle_peft::runtime).
    // SAFETY: first statement of `main`; no other thread has been started.
    unsafe { candle_peft::runtime::tune_cpu_runtime() };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut what = "all".to_string();
    let mut steps: Option<usize> = None;
    let mut quick = false;
    let mut out = root.join("out/lora_pro_compare");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => steps = Some(args.next().context("--steps N")?.parse()?),
            "--quick" => quick = true,
            "--out" => out = args.next().context("--out DIR")?.into(),
            "minilm" | "smollm2" | "plot" | "all" => what = a,
            other => bail!(
                "unknown argument `{other}` (minilm|smollm2|plot|all, --steps N, --quick, --out DIR)"
            ),
        }
    }
    std::fs::create_dir_all(&out)?;
    let started = Instant::now();
    let mut jobs: Vec<(&str, usize)> = Vec::new();
    if what == "minilm" || what == "all" {
        jobs.push(("minilm", steps.unwrap_or(200)));
    }
    if what == "smollm2" || what == "all" {
        jobs.push(("smollm2", steps.unwrap_or(40)));
    }
    for (name, n) in jobs {
        let w = match name {
            "minilm" => minilm(&root, n, quick)?,
            _ => smollm2(&root, n, quick)?,
        };
        summary(&w);
        let path = out.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&w)?)?;
        println!("wrote {}", path.display());
    }
    if what == "plot" || what == "all" {
        let mut workloads = Vec::new();
        for name in ["minilm", "smollm2"] {
            let path = out.join(format!("{name}.json"));
            if path.is_file() {
                let w: Workload = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                workloads.push(w);
            }
        }
        if workloads.is_empty() {
            bail!("no results in {} to plot", out.display());
        }
        let png = root.join("docs/lora_pro_comparison.png");
        plot::draw(&workloads, &png)?;
        println!("wrote {}", png.display());
    }
    println!("done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

#[path = "support/plot.rs"]
mod chart;

/// The PNG: per workload, the smoothed training loss and the validation metric against the
/// step, one colour per variant (each at its best rate).
mod plot {
    use std::path::Path;

    use anyhow::Result;

    use super::{Workload, tail_mean};

    use super::chart::{Panel, Series, panel, write_png};

    const W: u32 = 1400;
    const PANEL_H: u32 = 460;

    /// Moving average over `window` steps (shorter at the start).
    fn smooth(v: &[f64], window: usize) -> Vec<f64> {
        (0..v.len()).map(|i| tail_mean(&v[..=i], window)).collect()
    }

    fn short(w: &Workload) -> &str {
        if w.short.is_empty() {
            &w.title
        } else {
            &w.short
        }
    }

    pub fn draw(workloads: &[Workload], path: &Path) -> Result<()> {
        let h = PANEL_H * workloads.len() as u32;
        write_png(path, (W, h), |root| {
            let rows = root.split_evenly((workloads.len(), 2));
            for (i, w) in workloads.iter().enumerate() {
                let best = w.best();
                // Training loss as a 10-step moving mean.
                let loss: Vec<Series> = best
                    .iter()
                    .map(|r| Series {
                        name: format!("{} (lr {:.0e})", r.variant, r.lr),
                        points: smooth(&r.losses, 10)
                            .into_iter()
                            .enumerate()
                            .map(|(s, l)| ((s + 1) as f64, l))
                            .collect(),
                    })
                    .collect();
                let metric: Vec<Series> = best
                    .iter()
                    .map(|r| Series {
                        name: format!("{} {:.3}", r.variant, r.final_metric),
                        points: r.evals.iter().map(|&(s, m)| (s as f64, m)).collect(),
                    })
                    .collect();
                let x_range = (0.0, w.steps as f64);
                let loss_title = format!("{}: train loss", short(w));
                let loss_panel = Panel {
                    title: &loss_title,
                    x_label: "step",
                    x_range,
                    log_x: false,
                    markers_only: false,
                    legend_top: true,
                };
                panel(&rows[2 * i], &loss_panel, &loss)?;
                let metric_title = format!("{}: valid {}", short(w), w.metric);
                let metric_panel = Panel {
                    title: &metric_title,
                    legend_top: !w.higher_is_better(),
                    ..loss_panel
                };
                panel(&rows[2 * i + 1], &metric_panel, &metric)?;
            }
            Ok(())
        })
    }
}
