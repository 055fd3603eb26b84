//! Which adapter should I use? The nine methods side by side on three tasks, every run driven
//! through the `candle-peft` binary with the same flags a user would type.
//!
//! - **classify**: all-MiniLM-L6-v2 on SST-2. `data/sst2/train.tsv` is split into a training
//!   part and a dev part (its last `DEV_ROWS` rows); each method picks its learning rate from a
//!   grid of three on the dev part (seed 1), then trains with that rate for seeds 2 and 3 (seed
//!   1's dev run at that rate is the same training, so its saved adapter is reused); all three
//!   are scored on `data/sst2/valid.tsv`. Same steps, batch, sequence length and schedule for all.
//! - **lm**: a causal LM (Gemma 3 270M by default) on `data/shakespeare/train.txt`, one seed at
//!   the lowest rate of each method's grid (with two rates, the lower one won for every method,
//!   so the second is not run); held-out perplexity on the start of
//!   `data/shakespeare/valid.txt`, and forgetting: perplexity before and after on SST-2
//!   movie-review sentences (outside the fine-tuning domain), the knowledge CorDA's KPM mode
//!   claims to keep.
//! - **conv**: `examples/conv_adapters.rs` (FLoRA against LoRA-conv on digits) for three seeds.
//!
//! Every finished run is a JSON file in `OUT/runs/`; a rerun skips it, so an interrupted study
//! resumes. `OUT/summary.md` gets the tables (mean ± std over seeds), `OUT/*.png` the plots.
//! Runs go `--jobs` at a time (2 by default on two or more cores), one thread each.
//!
//! Run: `bash scripts/fetch-models.sh && cargo build --release --bin candle-peft --example
//! conv_adapters && cargo run --release --example method_study [-- --quick] [--out DIR]
//! [--parts classify,lm,conv] [--lm-model PATH] [--jobs N]`. `--quick` is a smoke run: two
//! methods, a few steps, one seed, small evaluation sets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

#[path = "support/plot.rs"]
mod chart;

/// Rows of `data/sst2/train.tsv` held out as the dev part that picks learning rates.
const DEV_ROWS: usize = 500;
const SEEDS: [u64; 3] = [1, 2, 3];
/// Tokens per sentence in the classification part, for training and scoring alike.
const CLASSIFY_SEQ: &str = "64";

/// The cache key of a classification run: `tag` is `dev` or `test`.
fn classify_key(tag: &str, method: &str, lr: f64, seed: u64) -> String {
    format!("classify-{tag}-{method}-lr{lr:e}-s{seed}")
}

/// One method as the study runs it: the CLI flags that set its budget, and its rate grid.
struct MethodSpec {
    /// The name in tables (`corda-kpm` is CorDA with `--corda-mode kpm`).
    name: &'static str,
    method: &'static str,
    flags: &'static [&'static str],
    /// Learning rates tried on the dev part (classification); the LM run uses the lowest.
    lrs: [f64; 3],
    /// Needs `--calib-data` (EVA, CorDA).
    calibrated: bool,
}

const LORA_GRID: [f64; 3] = [1e-3, 2e-3, 5e-3];
/// Methods that train a few values per layer take larger steps.
const SMALL_GRID: [f64; 3] = [2e-2, 5e-2, 1e-1];
/// FLoRA's core is a product of three factors; it takes larger steps than LoRA.
const FLORA_GRID: [f64; 3] = [2e-3, 5e-3, 1e-2];
/// LoRA-Pro's adjusted gradients approximate full fine-tuning's, which wants smaller steps.
const LORA_PRO_GRID: [f64; 3] = [1e-4, 3e-4, 1e-3];
/// RandLoRA's best rate was the bottom of LoRA's grid.
const RANDLORA_GRID: [f64; 3] = [5e-4, 1e-3, 2e-3];

/// The nine methods (CorDA in both modes), at rank 8 or the nearest budget their knobs allow.
const METHODS: &[MethodSpec] = &[
    MethodSpec {
        name: "lora",
        method: "lora",
        flags: &["--rank", "8"],
        lrs: LORA_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "lora-pro",
        method: "lora-pro",
        flags: &["--rank", "8"],
        lrs: LORA_PRO_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "eva",
        method: "eva",
        flags: &["--rank", "8"],
        lrs: LORA_GRID,
        calibrated: true,
    },
    MethodSpec {
        name: "corda-ipm",
        method: "corda",
        flags: &["--rank", "8", "--corda-mode", "ipm"],
        lrs: LORA_GRID,
        calibrated: true,
    },
    MethodSpec {
        name: "corda-kpm",
        method: "corda",
        flags: &["--rank", "8", "--corda-mode", "kpm"],
        lrs: LORA_GRID,
        calibrated: true,
    },
    MethodSpec {
        name: "svfit",
        method: "svfit",
        flags: &[],
        lrs: SMALL_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "loldu",
        method: "loldu",
        flags: &["--rank", "64"],
        lrs: SMALL_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "randlora",
        method: "randlora",
        flags: &["--rank", "32"],
        lrs: RANDLORA_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "flora",
        method: "flora",
        flags: &["--rank", "8"],
        lrs: FLORA_GRID,
        calibrated: false,
    },
    MethodSpec {
        name: "salt",
        method: "salt",
        flags: &["--rank", "8"],
        lrs: LORA_GRID,
        calibrated: false,
    },
];

/// The sizes of one study.
struct Sizes {
    classify_steps: usize,
    lm_steps: usize,
    lm_seq: usize,
    /// Learning rates per method in the LM part: the lowest ones of its grid.
    lm_rates: usize,
    /// Held-out rows/characters kept for evaluation (`None`: all).
    eval_rows: Option<usize>,
    lm_eval_chars: usize,
    ood_sentences: usize,
    methods: Vec<&'static MethodSpec>,
    grid: usize,
    seeds: Vec<u64>,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let pick = |names: &[&str]| METHODS.iter().filter(|m| names.contains(&m.name)).collect();
        if quick {
            Self {
                classify_steps: 3,
                lm_steps: 2,
                lm_seq: 32,
                lm_rates: 1,
                eval_rows: Some(32),
                lm_eval_chars: 600,
                ood_sentences: 8,
                methods: pick(&["lora", "svfit"]),
                grid: 1,
                seeds: vec![SEEDS[0]],
            }
        } else {
            Self {
                classify_steps: 100,
                lm_steps: 30,
                lm_seq: 64,
                lm_rates: 1,
                eval_rows: None,
                lm_eval_chars: 6000,
                ood_sentences: 150,
                methods: METHODS.iter().collect(),
                grid: 3,
                seeds: SEEDS.to_vec(),
            }
        }
    }
}

/// Paths the study reads and writes.
struct Study {
    root: PathBuf,
    out: PathBuf,
    bin: PathBuf,
    sizes: Sizes,
    /// Runs at once; each child gets one thread when there are several.
    jobs: usize,
}

impl Study {
    fn runs(&self) -> PathBuf {
        self.out.join("runs")
    }

    /// Runs `args` through the binary unless `OUT/runs/<key>.json` exists; the record is the
    /// command's last JSON line plus its wall time and the child's own peak RSS.
    fn cached(&self, key: &str, program: &Path, args: &[String]) -> Result<Value> {
        let file = self.runs().join(format!("{key}.json"));
        if let Ok(text) = std::fs::read_to_string(&file) {
            return serde_json::from_str(&text).with_context(|| format!("{}", file.display()));
        }
        eprintln!("method_study: {key}");
        let started = Instant::now();
        let threads = (self.jobs > 1).then_some(1);
        let (stdout, peak_rss_mb) = run_child(program, args, &self.root, threads)
            .with_context(|| format!("run {key}: {} {}", program.display(), args.join(" ")))?;
        let mut record: Value = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .map(serde_json::from_str)
            .transpose()?
            .with_context(|| format!("run {key} printed no JSON line"))?;
        record["wall_seconds"] = json!(started.elapsed().as_secs_f64());
        record["peak_rss_mb"] = json!(peak_rss_mb);
        std::fs::create_dir_all(self.runs())?;
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&record)?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(record)
    }

    fn train(&self, key: &str, args: Vec<String>) -> Result<Value> {
        let out = self.out.join("work").join(key);
        let mut full: Vec<String> = vec!["train".into()];
        full.extend(args);
        full.extend(
            [
                "--out",
                &out.display().to_string(),
                "--overwrite",
                "--json",
                "--quiet",
            ]
            .map(String::from),
        );
        let record = self.cached(key, &self.bin.clone(), &full)?;
        Ok(record)
    }
}

/// Runs a child process to its end; its stdout and its own peak resident memory (`wait4`'s
/// rusage: `getrusage(RUSAGE_CHILDREN)` only keeps the largest child so far).
fn run_child(
    program: &Path,
    args: &[String],
    cwd: &Path,
    threads: Option<usize>,
) -> Result<(String, f64)> {
    use std::io::Read;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(n) = threads {
        command.env("RAYON_NUM_THREADS", n.to_string());
    }
    let mut child = command.spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .context("no stdout")?
        .read_to_string(&mut stdout)?;
    let mut status = 0;
    // SAFETY: an all-zero `rusage` is a valid value; `wait4` writes it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: `pid` is our child, not yet reaped (std's `wait` is never called on it).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("exited with status {status}");
    }
    Ok((stdout, usage.ru_maxrss as f64 / 1024.0))
}

fn f64_at(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Writes the first `rows` data rows of a TSV (header kept) to `to`.
/// `f` over `items` on `jobs` threads, each taking the next item when it is free; the results
/// come back in `items`' order. The first error stops the handing out of further items.
fn in_parallel<T: Sync, R: Send>(
    jobs: usize,
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<R>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let result = f(item);
                    failed.fetch_or(result.is_err(), Ordering::Relaxed);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for (i, slot) in slots.into_iter().enumerate() {
        match slot.into_inner() {
            Ok(Some(r)) => out.push(r?),
            Ok(None) => bail!("run {i} was not started: an earlier run failed"),
            Err(_) => bail!("run {i} panicked"),
        }
    }
    Ok(out)
}

fn head_tsv(from: &Path, to: &Path, skip: usize, rows: Option<usize>) -> Result<()> {
    let text = std::fs::read_to_string(from).with_context(|| format!("{}", from.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let body: Vec<&str> = lines.skip(skip).take(rows.unwrap_or(usize::MAX)).collect();
    std::fs::write(to, format!("{header}\n{}\n", body.join("\n")))?;
    Ok(())
}

/// One method's classification outcome: the chosen rate and a record per seed.
struct ClassifyResult {
    name: &'static str,
    lr: f64,
    dev: Vec<(f64, f64)>,
    seeds: Vec<Value>,
}

fn classify(study: &Study) -> Result<Vec<ClassifyResult>> {
    let s = &study.sizes;
    let data = study.out.join("data");
    std::fs::create_dir_all(&data)?;
    let sst2 = study.root.join("data/sst2");
    let total = std::fs::read_to_string(sst2.join("train.tsv"))?
        .lines()
        .count()
        - 1;
    head_tsv(
        &sst2.join("train.tsv"),
        &data.join("train.tsv"),
        0,
        Some(total - DEV_ROWS),
    )?;
    let dev_rows = s.eval_rows.map_or(DEV_ROWS, |r| r.min(DEV_ROWS));
    head_tsv(
        &sst2.join("train.tsv"),
        &data.join("dev.tsv"),
        total - DEV_ROWS,
        Some(dev_rows),
    )?;
    head_tsv(
        &sst2.join("valid.tsv"),
        &data.join("test.tsv"),
        0,
        s.eval_rows,
    )?;
    let model = study
        .root
        .join("models/all-MiniLM-L6-v2")
        .display()
        .to_string();
    let train = data.join("train.tsv").display().to_string();
    let run = |m: &MethodSpec, lr: f64, seed: u64, eval: &str, tag: &str| -> Result<Value> {
        let mut args: Vec<String> = [
            "--model",
            &model,
            "--task",
            "classify",
            "--data",
            &train,
            "--method",
            m.method,
            "--steps",
            &s.classify_steps.to_string(),
            "--batch",
            "16",
            "--seq",
            CLASSIFY_SEQ,
            "--lr",
            &lr.to_string(),
            "--seed",
            &seed.to_string(),
            "--eval-data",
            eval,
        ]
        .map(String::from)
        .to_vec();
        args.extend(m.flags.iter().map(|f| f.to_string()));
        if m.calibrated {
            args.extend(["--calib-data".to_string(), train.clone()]);
        }
        study.train(&classify_key(tag, m.name, lr, seed), args)
    };
    let dev = data.join("dev.tsv").display().to_string();
    let test = data.join("test.tsv").display().to_string();
    // The queue runs the methods in reverse so the slowest (SALT) starts first and no worker
    // is left alone with it at the end.
    let grid_runs: Vec<(usize, f64)> = (0..s.methods.len())
        .rev()
        .flat_map(|i| s.methods[i].lrs.iter().take(s.grid).map(move |&lr| (i, lr)))
        .collect();
    let grid_acc = in_parallel(study.jobs, &grid_runs, |&(i, lr)| {
        let r = run(s.methods[i], lr, SEEDS[0], &dev, "dev")?;
        Ok(f64_at(&r, &["eval", "accuracy"]))
    })?;
    let grids: Vec<Vec<(f64, f64)>> = (0..s.methods.len())
        .map(|i| {
            let mut grid: Vec<(f64, f64)> = grid_runs
                .iter()
                .zip(&grid_acc)
                .filter(|((m, _), _)| *m == i)
                .map(|(&(_, lr), &acc)| (lr, acc))
                .collect();
            grid.sort_by(|a, b| a.0.total_cmp(&b.0));
            grid
        })
        .collect();
    let chosen: Vec<f64> = s
        .methods
        .iter()
        .zip(&grids)
        .map(|(m, grid)| {
            grid.iter()
                .copied()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(m.lrs[0], |(lr, _)| lr)
        })
        .collect();
    let seed_runs: Vec<(usize, u64)> = (0..s.methods.len())
        .rev()
        .flat_map(|i| s.seeds.iter().map(move |&seed| (i, seed)))
        .collect();
    let seed_records = in_parallel(study.jobs, &seed_runs, |&(i, seed)| {
        let (m, lr) = (s.methods[i], chosen[i]);
        if seed != SEEDS[0] {
            return run(m, lr, seed, &test, "test");
        }
        // The first seed's dev run at the chosen rate is the same training: score its saved
        // adapter on the test split instead of training it again.
        let mut record = run(m, lr, seed, &dev, "dev")?;
        let key = classify_key("dev", m.name, lr, seed);
        let adapter = study.out.join("work").join(&key).join("adapter");
        let args: Vec<String> = [
            "eval",
            "--model",
            &model,
            "--task",
            "classify",
            "--data",
            &test,
            "--seq",
            CLASSIFY_SEQ,
            "--adapter",
            &adapter.display().to_string(),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let scored = study.cached(
            &format!("{}-eval", classify_key("test", m.name, lr, seed)),
            &study.bin,
            &args,
        )?;
        record["eval"] = scored;
        Ok(record)
    })?;
    let mut by_method: Vec<Vec<(u64, Value)>> = vec![Vec::new(); s.methods.len()];
    for (&(i, seed), record) in seed_runs.iter().zip(seed_records) {
        by_method[i].push((seed, record));
    }
    Ok(s.methods
        .iter()
        .zip(grids)
        .zip(chosen)
        .zip(by_method)
        .map(|(((m, dev), lr), mut seeds)| {
            seeds.sort_by_key(|(seed, _)| *seed);
            ClassifyResult {
                name: m.name,
                lr,
                dev,
                seeds: seeds.into_iter().map(|(_, r)| r).collect(),
            }
        })
        .collect())
}

/// One method's LM outcome: the training record and the out-of-domain perplexity after.
struct LmResult {
    name: &'static str,
    lr: f64,
    record: Value,
    ood_after: f64,
}

fn language_model(study: &Study, lm_model: &str) -> Result<(f64, f64, Vec<LmResult>)> {
    let s = &study.sizes;
    let data = study.out.join("data");
    std::fs::create_dir_all(&data)?;
    let valid: String = std::fs::read_to_string(study.root.join("data/shakespeare/valid.txt"))?
        .chars()
        .take(s.lm_eval_chars)
        .collect();
    std::fs::write(data.join("lm_valid.txt"), valid)?;
    let ood: Vec<String> = std::fs::read_to_string(study.root.join("data/sst2/valid.tsv"))?
        .lines()
        .skip(1)
        .take(s.ood_sentences)
        .filter_map(|l| l.split_once('\t').map(|(_, t)| t.to_string()))
        .collect();
    std::fs::write(data.join("lm_ood.txt"), ood.join("\n"))?;
    let path = |f: &str| data.join(f).display().to_string();
    let eval = |key: &str, adapter: Option<&str>, file: &str| -> Result<f64> {
        let mut args: Vec<String> = [
            "eval",
            "--model",
            lm_model,
            "--task",
            "causal-lm",
            "--data",
            &path(file),
            "--seq",
            &s.lm_seq.to_string(),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        if let Some(a) = adapter {
            args.extend(["--adapter".to_string(), a.to_string()]);
        }
        Ok(f64_at(
            &study.cached(key, &study.bin, &args)?,
            &["perplexity"],
        ))
    };
    let base = in_parallel(
        study.jobs,
        &[
            ("lm-base-valid", "lm_valid.txt"),
            ("lm-base-ood", "lm_ood.txt"),
        ],
        |&(key, file)| eval(key, None, file),
    )?;
    let (base_valid, base_ood) = (base[0], base[1]);
    let train = study
        .root
        .join("data/shakespeare/train.txt")
        .display()
        .to_string();
    let lm_runs: Vec<(usize, f64)> = (0..s.methods.len())
        .rev()
        .flat_map(|i| {
            s.methods[i]
                .lrs
                .iter()
                .take(s.lm_rates)
                .map(move |&lr| (i, lr))
        })
        .collect();
    let mut results = in_parallel(study.jobs, &lm_runs, |&(i, lr)| {
        let m = s.methods[i];
        let key = format!("lm-{}-lr{lr:e}", m.name);
        let mut args: Vec<String> = [
            "--model",
            lm_model,
            "--task",
            "causal-lm",
            "--data",
            &train,
            "--method",
            m.method,
            "--steps",
            &s.lm_steps.to_string(),
            "--batch",
            "4",
            "--seq",
            &s.lm_seq.to_string(),
            "--lr",
            &lr.to_string(),
            "--seed",
            "1",
            "--eval-data",
            &path("lm_valid.txt"),
        ]
        .map(String::from)
        .to_vec();
        args.extend(m.flags.iter().map(|f| f.to_string()));
        if m.calibrated {
            args.extend(["--calib-data".to_string(), train.clone()]);
        }
        let record = study.train(&key, args)?;
        let adapter = study.out.join("work").join(&key).join("adapter");
        let ood_after = eval(
            &format!("{key}-ood"),
            Some(&adapter.display().to_string()),
            "lm_ood.txt",
        )?;
        Ok((
            i,
            LmResult {
                name: m.name,
                lr,
                record,
                ood_after,
            },
        ))
    })?;
    // Tables list the methods in their usual order, not the queue's.
    results.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.lr.total_cmp(&b.1.lr)));
    let results = results.into_iter().map(|(_, r)| r).collect();
    Ok((base_valid, base_ood, results))
}

fn conv(study: &Study) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let exe = study.bin.with_file_name("examples").join("conv_adapters");
    if !exe.exists() {
        bail!(
            "{} is missing: `cargo build --release --example conv_adapters`",
            exe.display()
        );
    }
    let mut by_method: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let records = in_parallel(study.jobs, &study.sizes.seeds, |&seed| {
        let args = vec!["--seed".to_string(), seed.to_string(), "--json".to_string()];
        study.cached(&format!("conv-s{seed}"), &exe, &args)
    })?;
    for r in &records {
        for run in r["runs"].as_array().into_iter().flatten() {
            let name = run["name"].as_str().unwrap_or("?").to_string();
            let params = f64_at(run, &["adapter_params"]);
            by_method
                .entry(name)
                .or_default()
                .push((params, f64_at(run, &["accuracy"])));
        }
    }
    Ok(by_method)
}

/// Milliseconds per step of a train record.
fn ms_per_step(r: &Value) -> f64 {
    1e3 * f64_at(r, &["seconds"]) / f64_at(r, &["steps"]).max(1.0)
}

fn losses(r: &Value) -> Vec<f64> {
    r["losses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn report(
    study: &Study,
    cls: &[ClassifyResult],
    lm: Option<&(f64, f64, Vec<LmResult>)>,
    conv: Option<&BTreeMap<String, Vec<(f64, f64)>>>,
) -> Result<String> {
    let mut md = String::new();
    if !cls.is_empty() {
        writeln!(
            md,
            "## Classification: MiniLM on SST-2 ({} steps, batch 16, seq {CLASSIFY_SEQ})\n",
            study.sizes.classify_steps
        )?;
        writeln!(
            md,
            "| method | lr (dev acc per rate) | test accuracy | trainable | init s | ms/step | peak RSS MB |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for c in cls {
            let acc: Vec<f64> = c
                .seeds
                .iter()
                .map(|r| f64_at(r, &["eval", "accuracy"]))
                .collect();
            let (m, sd) = mean_std(&acc);
            // Timings come from the seeds trained in the test phase: the first seed's training
            // is its dev run, which a resumed study may have cached long before.
            let timed = if c.seeds.len() > 1 {
                &c.seeds[1..]
            } else {
                &c.seeds[..]
            };
            let mean_of =
                |f: &dyn Fn(&Value) -> f64| mean_std(&timed.iter().map(f).collect::<Vec<_>>()).0;
            let grid: Vec<String> = c
                .dev
                .iter()
                .map(|(lr, a)| format!("{lr:e}: {a:.3}"))
                .collect();
            writeln!(
                md,
                "| {} | {:e} ({}) | {:.3} ± {:.3} | {} | {:.1} | {:.0} | {:.0} |",
                c.name,
                c.lr,
                grid.join(", "),
                m,
                sd,
                c.seeds[0]["trainable_parameters"],
                mean_of(&|r| f64_at(r, &["init_seconds"])),
                mean_of(&ms_per_step),
                mean_of(&|r| f64_at(r, &["peak_rss_mb"]))
            )?;
        }
    }
    if let Some((base_valid, base_ood, results)) = lm {
        writeln!(
            md,
            "\n## Language modelling ({} steps, batch 4, seq {})\n",
            study.sizes.lm_steps, study.sizes.lm_seq
        )?;
        writeln!(
            md,
            "Base: held-out perplexity {base_valid:.2}; out-of-domain (SST-2 sentences) {base_ood:.2}.\n"
        )?;
        writeln!(
            md,
            "| method | lr | held-out ppl | OOD ppl after (forgetting) | trainable | init s | ms/step | peak RSS MB |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for r in results {
            writeln!(
                md,
                "| {} | {:e} | {:.2} | {:.2} ({:+.1}%) | {} | {:.1} | {:.0} | {:.0} |",
                r.name,
                r.lr,
                f64_at(&r.record, &["eval", "perplexity"]),
                r.ood_after,
                100.0 * (r.ood_after / base_ood - 1.0),
                r.record["trainable_parameters"],
                f64_at(&r.record, &["init_seconds"]),
                ms_per_step(&r.record),
                f64_at(&r.record, &["peak_rss_mb"])
            )?;
        }
    }
    if let Some(conv) = conv {
        writeln!(
            md,
            "\n## Conv: digits 5–9 from 20 images per digit ({} seeds)\n",
            study.sizes.seeds.len()
        )?;
        writeln!(md, "| method | conv adapter parameters | test accuracy |")?;
        writeln!(md, "|---|---|---|")?;
        for (name, runs) in conv {
            let acc: Vec<f64> = runs.iter().map(|r| r.1).collect();
            let (m, sd) = mean_std(&acc);
            writeln!(md, "| {name} | {} | {m:.3} ± {sd:.3} |", runs[0].0)?;
        }
    }
    std::fs::write(study.out.join("summary.md"), &md)?;
    plots(study, cls, lm)?;
    Ok(md)
}

/// `accuracy_vs_params.png` and `loss_curves.png` (the first steps of each method's training
/// loss: classification at its chosen rate and seed 1, and the LM run).
fn plots(
    study: &Study,
    cls: &[ClassifyResult],
    lm: Option<&(f64, f64, Vec<LmResult>)>,
) -> Result<()> {
    use chart::{Panel, Series, panel, write_png};
    if !cls.is_empty() {
        let series: Vec<Series> = cls
            .iter()
            .map(|c| {
                let acc: Vec<f64> = c
                    .seeds
                    .iter()
                    .map(|r| f64_at(r, &["eval", "accuracy"]))
                    .collect();
                let params = f64_at(&c.seeds[0], &["trainable_parameters"]).max(1.0);
                Series {
                    name: c.name.to_string(),
                    points: vec![(params, mean_std(&acc).0)],
                }
            })
            .collect();
        let xs: Vec<f64> = series.iter().map(|s| s.points[0].0).collect();
        let lo = xs.iter().copied().fold(f64::MAX, f64::min) / 2.0;
        let hi = xs.iter().copied().fold(f64::MIN, f64::max) * 2.0;
        let spec = Panel {
            title: "SST-2 test accuracy against trainable parameters",
            x_label: "trainable parameters",
            x_range: (lo, hi),
            log_x: true,
            markers_only: true,
            legend_top: false,
        };
        write_png(
            &study.out.join("accuracy_vs_params.png"),
            (900, 520),
            |root| panel(root, &spec, &series),
        )?;
    }
    let curve = |name: &str, r: &Value| Series {
        name: name.to_string(),
        points: losses(r)
            .into_iter()
            .enumerate()
            .map(|(i, l)| ((i + 1) as f64, l))
            .collect(),
    };
    let cls_curves: Vec<Series> = cls.iter().map(|c| curve(c.name, &c.seeds[0])).collect();
    // One LM curve per method: the run at its rate with the lower held-out perplexity.
    let held_out = |r: &LmResult| f64_at(&r.record, &["eval", "perplexity"]);
    let mut best_lm: Vec<&LmResult> = Vec::new();
    for r in lm.map(|(_, _, rs)| rs.as_slice()).unwrap_or_default() {
        match best_lm.iter_mut().find(|b| b.name == r.name) {
            Some(b) if held_out(r) < held_out(b) => *b = r,
            Some(_) => {}
            None => best_lm.push(r),
        }
    }
    let lm_curves: Vec<Series> = best_lm
        .iter()
        .map(|r| curve(&format!("{} {:e}", r.name, r.lr), &r.record))
        .collect();
    let panels: Vec<(&str, &Vec<Series>, usize)> = [
        (
            "classification: training loss",
            &cls_curves,
            study.sizes.classify_steps,
        ),
        (
            "language modelling: training loss",
            &lm_curves,
            study.sizes.lm_steps,
        ),
    ]
    .into_iter()
    .filter(|(_, s, _)| !s.is_empty())
    .collect();
    if panels.is_empty() {
        return Ok(());
    }
    write_png(
        &study.out.join("loss_curves.png"),
        (1000, 460 * panels.len() as u32),
        |root| {
            let rows = root.split_evenly((panels.len(), 1));
            for (area, (title, series, steps)) in rows.iter().zip(&panels) {
                let spec = Panel {
                    title,
                    x_label: "step",
                    x_range: (0.0, *steps as f64),
                    log_x: false,
                    markers_only: false,
                    legend_top: true,
                };
                panel(area, &spec, series)?;
            }
            Ok(())
        },
    )
}

/// What one study runs, and where.
pub struct Options {
    /// The smoke size (see the module docs).
    pub quick: bool,
    /// Where runs, tables and plots go.
    pub out: PathBuf,
    /// Comma-separated parts: `classify`, `lm`, `conv`.
    pub parts: String,
    /// The causal LM of the `lm` part.
    pub lm_model: String,
    /// The `candle-peft` binary the runs go through.
    pub bin: PathBuf,
    /// The repository root (models/ and data/).
    pub root: PathBuf,
    /// Runs at once. With more than one, each run gets one thread: on two cores, two
    /// one-thread runs side by side finish the study about a third sooner than one two-thread
    /// run at a time, since these small matmuls gain little from a second thread.
    pub jobs: usize,
}

/// Runs (or resumes) the study and writes its report; returns the summary's markdown.
pub fn run(o: Options) -> Result<String> {
    if !o.bin.exists() {
        bail!(
            "{} is missing: `cargo build --release --bin candle-peft`",
            o.bin.display()
        );
    }
    let study = Study {
        root: o.root,
        out: o.out,
        bin: o.bin,
        sizes: Sizes::new(o.quick),
        jobs: o.jobs.max(1),
    };
    let want = |p: &str| o.parts.split(',').any(|x| x == p);
    let cls = if want("classify") {
        classify(&study)?
    } else {
        Vec::new()
    };
    let lm = if want("lm") {
        Some(language_model(&study, &o.lm_model)?)
    } else {
        None
    };
    let conv = if want("conv") {
        Some(conv(&study)?)
    } else {
        None
    };
    report(&study, &cls, lm.as_ref(), conv.as_ref())
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut quick = false;
    let mut out = None;
    let mut parts = "classify,lm,conv".to_string();
    let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let mut lm_model = root
        .join("models/gemma-3-270m-q4_k_m.gguf")
        .display()
        .to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(PathBuf::from(args.next().context("--out needs a folder")?)),
            "--parts" => parts = args.next().context("--parts needs a list")?,
            "--lm-model" => lm_model = args.next().context("--lm-model needs a path")?,
            "--jobs" => {
                jobs = args
                    .next()
                    .context("--jobs needs a number")?
                    .parse()
                    .context("--jobs needs a number")?
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    let out = out.unwrap_or_else(|| {
        root.join(if quick {
            "out/method_study_quick"
        } else {
            "out/method_study"
        })
    });
    // The example runs from target/<profile>/examples/; the binary sits one folder up.
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("candle-peft"))
        .context("locating the candle-peft binary")?;
    let started = Instant::now();
    let runs = out.join("runs");
    let summary = run(Options {
        quick,
        out,
        parts,
        lm_model,
        bin,
        root,
        jobs,
    })?;
    print!("{summary}");
    println!(
        "\nstudy done in {:.0}s; runs cached in {}",
        started.elapsed().as_secs_f64(),
        runs.display()
    );
    Ok(())
}
