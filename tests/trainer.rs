//! The trainer on a synthetic regression task over the tiny LoRA model: decreasing and
//! deterministic loss, exact resume from checkpoints, NaN handling, evaluation and bad configs.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use candle_peft::train::{
    ADAPTER_DIR, LOCK_FILE, OPTIMIZER_FILE, OutputLock, STATE_FILE, TRAINABLE_FILE, TrainerState,
    adapter_rng_states, latest_checkpoint, prepare_output_dir, restore_adapter_rng_states,
};
use candle_peft::{
    DEFAULT_ADAPTER, EvalReport, PeftError, PeftModel, Schedule, TrainConfig, TrainReport,
    TrainTask, Trainer, Warmup,
};
use common::tiny::{
    Example, TEACHER_TOKENS, Tiny, flat, lora_random_b, student_mse, teacher_examples, tiny_model,
};

/// Examples whose targets come from a teacher: the same tiny model with another adapter.
fn examples(n: usize, seed: u64) -> Vec<Example> {
    teacher_examples(n, seed, &["q", "v", "head"])
}

fn model(adapter_seed: u64) -> PeftModel<Tiny> {
    let mut pm = tiny_model(1, adapter_seed);
    pm.add_adapter(DEFAULT_ADAPTER, lora_random_b(&["q", "v", "head"], 2, 4.0))
        .unwrap();
    pm
}

/// Mean squared error of the student; `poison_call` makes that loss call (0-based) return a NaN
/// loss, `fail_call` makes it return an error (a crash mid-run).
struct Regression {
    pm: PeftModel<Tiny>,
    calls: Cell<usize>,
    poison_call: Option<usize>,
    fail_call: Option<usize>,
}

impl Regression {
    fn new() -> Self {
        Self {
            pm: model(5),
            calls: Cell::new(0),
            poison_call: None,
            fail_call: None,
        }
    }

    fn mse(&self, batch: &[&Example]) -> candle_peft::Result<Tensor> {
        student_mse(self.pm.model(), batch)
    }
}

impl TrainTask for Regression {
    type Example = Example;

    fn loss(&self, batch: &[&Example]) -> candle_peft::Result<(Tensor, usize)> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        if self.fail_call == Some(call) {
            return Err(PeftError::Unsupported("simulated crash".into()));
        }
        let mut loss = self.mse(batch)?;
        if self.poison_call == Some(call) {
            loss = (loss * f64::NAN)?;
        }
        Ok((loss, batch.len() * TEACHER_TOKENS))
    }

    fn evaluate(&self, examples: &[Example]) -> candle_peft::Result<EvalReport> {
        let batch: Vec<&Example> = examples.iter().collect();
        let loss = self.mse(&batch)?.to_scalar::<f32>()? as f64;
        Ok(EvalReport {
            loss,
            metrics: BTreeMap::from([("rmse".to_string(), loss.sqrt())]),
        })
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.pm.trainable_vars()
    }

    fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
        self.pm.save_adapter(dir, DEFAULT_ADAPTER)
    }

    fn set_training(&self, training: bool) {
        if training {
            self.pm.train()
        } else {
            self.pm.eval()
        }
    }

    fn rng_states(&self) -> BTreeMap<String, String> {
        adapter_rng_states(&self.pm)
    }

    fn restore_rng_states(&self, states: &BTreeMap<String, String>) -> candle_peft::Result<()> {
        restore_adapter_rng_states(&self.pm, states)
    }
}

/// 32 examples, 4 per micro-batch, 2 micro-batches per step: an epoch is 4 steps.
fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        grad_accum: 2,
        lr: 2e-2,
        weight_decay: 0.01,
        schedule: Schedule::Cosine,
        warmup: Warmup::Ratio(0.1),
        max_grad_norm: Some(1.0),
        seed: 1234,
        log_every: 1,
        quiet: true,
        ..TrainConfig::default()
    }
}

fn run(task: &Regression, cfg: TrainConfig, data: &[Example]) -> candle_peft::Result<TrainReport> {
    Trainer::new(cfg)?.run(task, data, None)
}

fn var_values(task: &Regression) -> Vec<(String, Vec<f32>)> {
    task.trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "loss sequences differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn loss_decreases_and_two_runs_are_identical() {
    let data = examples(32, 3);
    let a = Regression::new();
    let before = var_values(&a);
    let ra = run(&a, config(24), &data).unwrap();
    let b = Regression::new();
    let rb = run(&b, config(24), &data).unwrap();

    assert_eq!(ra.losses.len(), 24);
    let bits = |r: &TrainReport| r.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&ra), bits(&rb), "two runs with one seed differ");
    assert_eq!(var_values(&a), var_values(&b));

    let first: f64 = ra.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = ra.losses[20..].iter().sum::<f64>() / 4.0;
    println!("losses: {:?}", ra.losses);
    println!("first epoch mean {first:.5}, last epoch mean {last:.5}");
    assert!(
        last < 0.7 * first,
        "loss did not decrease: {first} → {last}"
    );
    assert!(ra.losses.iter().all(|l| l.is_finite()));

    // The schedule ran: warmup ⌈0.1·24⌉ = 3 steps from 0, then cosine down.
    assert_eq!(ra.lrs[0], 0.0);
    assert!((ra.lrs[3] - 2e-2).abs() < 1e-15);
    assert!(ra.lrs[23] < 1e-3);
    assert!(ra.vars_without_grad.is_empty());
    assert_eq!(ra.tokens, 24 * 2 * 4 * TEACHER_TOKENS);
    assert_ne!(before, var_values(&a), "training changed nothing");

    // Another seed gives another data order, hence another curve.
    let c = Regression::new();
    let rc = run(
        &c,
        TrainConfig {
            seed: 99,
            ..config(24)
        },
        &data,
    )
    .unwrap();
    assert_ne!(bits(&ra), bits(&rc));
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let data = examples(32, 3);
    let steps = 12;
    let full_dir = tempfile::tempdir().unwrap();
    let full_task = Regression::new();
    let full = run(
        &full_task,
        TrainConfig {
            checkpoint_every: Some(2),
            out_dir: Some(full_dir.path().to_path_buf()),
            ..config(steps)
        },
        &data,
    )
    .unwrap();
    let names: Vec<String> = full
        .checkpoints
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [2, 4, 6, 8, 10, 12].map(|s| format!("checkpoint-{s}"))
    );

    // A run that crashes during step 7 (its 13th loss call) after checkpoint-6.
    let crash_dir = tempfile::tempdir().unwrap();
    let crashing = Regression {
        fail_call: Some(12),
        ..Regression::new()
    };
    let crash_cfg = TrainConfig {
        checkpoint_every: Some(2),
        out_dir: Some(crash_dir.path().to_path_buf()),
        ..config(steps)
    };
    let err = run(&crashing, crash_cfg.clone(), &data).unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    let latest = latest_checkpoint(crash_dir.path()).unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-6"), "{}", latest.display());

    // Resume a fresh model (different adapter init: every value must come from the checkpoint)
    // from the output folder, i.e. its latest checkpoint.
    let resumed_task = Regression {
        pm: model(6),
        ..Regression::new()
    };
    let resumed = run(
        &resumed_task,
        TrainConfig {
            resume_from: Some(crash_dir.path().to_path_buf()),
            ..crash_cfg
        },
        &data,
    )
    .unwrap();
    assert_eq!(resumed.start_step, 6);
    assert_eq!(resumed.global_step, steps);
    let d = max_diff(&full.losses, &resumed.losses);
    println!(
        "resume at 6: max |Δloss| = {d:e} over {} steps",
        full.losses.len()
    );
    assert!(d <= 1e-5, "resumed loss curve differs by {d}");
    // Steps 7..12 are computed afresh after the resume; steps 1..6 come from trainer_state.json.
    let fresh = max_diff(&full.losses[6..], &resumed.losses[6..]);
    println!("resume at 6: max |Δloss| over the resumed steps 7..12 = {fresh:e}");
    assert!(max_diff(&full.lrs, &resumed.lrs) <= 1e-15);
    for ((n, a), (_, b)) in var_values(&full_task).iter().zip(var_values(&resumed_task)) {
        let dv = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(dv <= 1e-5, "{n}: final weights differ by {dv}");
    }

    // Resuming exactly at an epoch boundary (step 4 = 32 examples) from a named checkpoint.
    let at4 = Regression {
        pm: model(8),
        ..Regression::new()
    };
    let r4 = run(
        &at4,
        TrainConfig {
            resume_from: Some(full_dir.path().join("checkpoint-4")),
            ..config(steps)
        },
        &data,
    )
    .unwrap();
    assert_eq!(r4.start_step, 4);
    let d4 = max_diff(&full.losses, &r4.losses);
    println!("resume at 4: max |Δloss| = {d4:e}");
    assert!(d4 <= 1e-5, "resume at the epoch boundary differs by {d4}");

    // The checkpoint's adapter folder is a PEFT adapter holding the trained weights.
    let ck = full_dir.path().join("checkpoint-12");
    for f in [OPTIMIZER_FILE, TRAINABLE_FILE, STATE_FILE] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    let mut reloaded = tiny_model(1, 0);
    reloaded
        .load_adapter(ck.join(ADAPTER_DIR), DEFAULT_ADAPTER)
        .unwrap();
    let trained: BTreeMap<String, Vec<f32>> = var_values(&full_task).into_iter().collect();
    for (n, v) in reloaded.trainable_vars() {
        assert_eq!(flat(v.as_tensor()), trained[&n], "{n}");
    }
    let state = TrainerState::read(&ck.join(STATE_FILE)).unwrap();
    assert_eq!(
        (state.global_step, state.epoch, state.position),
        (12, 2, 32)
    );
    // No temporaries are left behind.
    for entry in std::fs::read_dir(full_dir.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("checkpoint-"), "stray entry {name}");
    }
}

#[test]
fn nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let data = examples(32, 3);
    let out = tempfile::tempdir().unwrap();
    // Loss call 6 is the first micro-batch of step 4.
    let task = Regression {
        poison_call: Some(6),
        ..Regression::new()
    };
    let cfg = TrainConfig {
        checkpoint_every: Some(2),
        out_dir: Some(out.path().to_path_buf()),
        ..config(10)
    };
    let err = run(&task, cfg.clone(), &data).unwrap_err();
    match &err {
        PeftError::NonFiniteLoss { step, loss } => {
            assert_eq!(*step, 4);
            assert!(loss.is_nan());
        }
        other => panic!("expected NonFiniteLoss, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("step 4") && msg.contains("NaN"), "{msg}");
    println!("{msg}");

    // checkpoint-2 is the last one, whole, and resuming from it continues the healthy curve.
    let latest = latest_checkpoint(out.path()).unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-2"), "{}", latest.display());
    let dirs: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, ["checkpoint-2"]);
    let state = TrainerState::read(&latest.join(STATE_FILE)).unwrap();
    assert_eq!(state.global_step, 2);
    assert_eq!(state.losses.len(), 2);

    let healthy = Regression::new();
    let reference = run(&healthy, config(10), &data).unwrap();
    let resumed_task = Regression::new();
    let resumed = run(
        &resumed_task,
        TrainConfig {
            resume_from: Some(latest),
            ..cfg
        },
        &data,
    )
    .unwrap();
    let d = max_diff(&reference.losses, &resumed.losses);
    assert!(d <= 1e-5, "resume after NaN differs by {d}");

    // An infinite loss is caught the same way.
    let inf_task = Regression::new();
    struct Inf<'a>(&'a Regression);
    impl TrainTask for Inf<'_> {
        type Example = Example;
        fn loss(&self, batch: &[&Example]) -> candle_peft::Result<(Tensor, usize)> {
            let (l, n) = self.0.loss(batch)?;
            Ok(((l + f64::INFINITY)?, n))
        }
        fn evaluate(&self, e: &[Example]) -> candle_peft::Result<EvalReport> {
            self.0.evaluate(e)
        }
        fn trainable_vars(&self) -> Vec<(String, Var)> {
            self.0.trainable_vars()
        }
        fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
            self.0.save_adapter(dir)
        }
    }
    let err = Trainer::new(config(3))
        .unwrap()
        .run(&Inf(&inf_task), &data, None)
        .unwrap_err();
    assert!(
        matches!(err, PeftError::NonFiniteLoss { step: 1, loss } if loss == f64::INFINITY),
        "{err:?}"
    );
}

#[test]
fn evaluates_every_n_steps_and_after_the_last() {
    let data = examples(32, 3);
    let eval = examples(8, 4);
    let task = Regression::new();
    let report = Trainer::new(TrainConfig {
        eval_every: Some(4),
        quiet: false,
        log_every: 5,
        ..config(10)
    })
    .unwrap()
    .run(&task, &data, Some(&eval))
    .unwrap();
    let steps: Vec<usize> = report.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, [4, 8, 10]);
    for e in &report.evals {
        assert!((e.report.metrics["rmse"] - e.report.loss.sqrt()).abs() < 1e-12);
    }
    assert!(report.evals[2].report.loss < report.evals[0].report.loss);
    assert!(
        !task.pm.is_training(),
        "the trainer leaves the task in eval mode"
    );
}

#[test]
fn bad_configs_and_mismatched_resumes_are_typed_errors() {
    let field_of = |cfg: TrainConfig| match Trainer::new(cfg) {
        Err(PeftError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        field_of(TrainConfig {
            batch_size: 0,
            ..config(4)
        }),
        "batch_size"
    );
    assert_eq!(
        field_of(TrainConfig {
            checkpoint_every: Some(2),
            ..config(4)
        }),
        "checkpoint_every"
    );
    assert_eq!(
        field_of(TrainConfig {
            warmup: Warmup::Ratio(2.0),
            ..config(4)
        }),
        "warmup"
    );
    assert_eq!(
        field_of(TrainConfig {
            max_grad_norm: Some(-1.0),
            ..config(4)
        }),
        "max_grad_norm"
    );

    let data = examples(32, 3);
    let out = tempfile::tempdir().unwrap();
    run(
        &Regression::new(),
        TrainConfig {
            checkpoint_every: Some(2),
            out_dir: Some(out.path().to_path_buf()),
            ..config(2)
        },
        &data,
    )
    .unwrap();
    let resume = |cfg: TrainConfig, data: &[Example]| match run(
        &Regression::new(),
        TrainConfig {
            resume_from: Some(out.path().join("checkpoint-2")),
            ..cfg
        },
        data,
    ) {
        Err(PeftError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        resume(
            TrainConfig {
                seed: 1,
                ..config(4)
            },
            &data
        ),
        "seed"
    );
    assert_eq!(
        resume(
            TrainConfig {
                batch_size: 8,
                ..config(4)
            },
            &data
        ),
        "batch_size"
    );
    assert_eq!(resume(config(4), &data[..30]), "train examples");
    assert!(matches!(
        run(
            &Regression::new(),
            TrainConfig {
                resume_from: Some(out.path().join("nothing-here")),
                ..config(4)
            },
            &data
        ),
        Err(PeftError::Io { .. })
    ));
    assert!(matches!(
        run(&Regression::new(), config(4), &[]),
        Err(PeftError::InvalidConfig { .. })
    ));
}

/// The tiny model with a LoRA adapter whose dropout is on (p = 0.3).
fn model_with_dropout(adapter_seed: u64) -> PeftModel<Tiny> {
    let mut pm = tiny_model(1, adapter_seed);
    let mut cfg = lora_random_b(&["q", "v", "head"], 2, 4.0);
    cfg.lora_dropout = 0.3;
    pm.add_adapter(DEFAULT_ADAPTER, cfg).unwrap();
    pm
}

fn var_bits(task: &Regression) -> Vec<(String, Vec<u32>)> {
    task.trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, common::tiny::bits(v.as_tensor())))
        .collect()
}

/// With dropout on, N steps and N/2 steps + resume + N/2 steps give bit-identical adapters: the
/// dropout RNGs are part of the checkpoint (restored whole, so even a model built with another
/// seed continues the same masks). Without them in `trainer_state.json`, the resumed run
/// differs, so the masks matter here.
#[test]
fn resume_with_dropout_is_bit_exact() {
    let data = examples(32, 3);
    let full_dir = tempfile::tempdir().unwrap();
    let full_task = Regression {
        pm: model_with_dropout(5),
        ..Regression::new()
    };
    let cfg = TrainConfig {
        checkpoint_every: Some(4),
        out_dir: Some(full_dir.path().to_path_buf()),
        ..config(8)
    };
    let full = run(&full_task, cfg.clone(), &data).unwrap();
    let no_dropout = Regression::new();
    run(&no_dropout, config(8), &data).unwrap();
    assert_ne!(
        var_bits(&no_dropout),
        var_bits(&full_task),
        "dropout did nothing"
    );

    let resume = |adapter_seed: u64| {
        let task = Regression {
            pm: model_with_dropout(adapter_seed),
            ..Regression::new()
        };
        let out = tempfile::tempdir().unwrap();
        let report = run(
            &task,
            TrainConfig {
                out_dir: Some(out.path().to_path_buf()),
                resume_from: Some(full_dir.path().join("checkpoint-4")),
                ..cfg.clone()
            },
            &data,
        )
        .unwrap();
        (task, report)
    };
    for seed in [5, 6] {
        let (task, report) = resume(seed);
        assert_eq!(report.start_step, 4);
        let bits = |r: &TrainReport| r.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&report),
            bits(&full),
            "adapter seed {seed}: losses differ"
        );
        assert_eq!(var_bits(&task), var_bits(&full_task), "adapter seed {seed}");
    }
    let state_file = full_dir.path().join("checkpoint-4").join(STATE_FILE);
    let state = TrainerState::read(&state_file).unwrap();
    // q of blocks 0 and 1 and of extra.0, v of blocks 0 and 1, and head.
    assert_eq!(state.rng_states.len(), 6, "{:?}", state.rng_states.keys());

    // The same resume without the saved RNG states draws other masks.
    let mut stripped = state.clone();
    stripped.rng_states.clear();
    std::fs::write(&state_file, serde_json::to_string(&stripped).unwrap()).unwrap();
    let (task, _) = resume(5);
    assert_ne!(var_bits(&task), var_bits(&full_task));
}

/// A micro-batch larger than the data takes the whole data set once (as a batch of exactly
/// the data would), instead of cycling the data to fill the batch.
#[test]
fn batch_larger_than_the_data_is_capped() {
    let data = examples(12, 3);
    let capped = Regression::new();
    let a = run(
        &capped,
        TrainConfig {
            batch_size: 1_000_000,
            grad_accum: 1,
            ..config(3)
        },
        &data,
    )
    .unwrap();
    let exact = Regression::new();
    let b = run(
        &exact,
        TrainConfig {
            batch_size: 12,
            grad_accum: 1,
            ..config(3)
        },
        &data,
    )
    .unwrap();
    assert_eq!(a.losses, b.losses);
    assert_eq!(a.tokens, 3 * 12 * TEACHER_TOKENS);
    assert_eq!(var_values(&capped), var_values(&exact));
}

/// A resume must continue the same run from a state that fits it: another run's identity, a
/// step beyond `steps`, an impossible `position` and a checkpoint without `trainer_state.json`
/// are refused naming the field (and the file).
#[test]
fn resume_refuses_checkpoints_that_do_not_fit_the_run() {
    let data = examples(32, 3);
    let out = tempfile::tempdir().unwrap();
    let identity = |data: &str| {
        BTreeMap::from([
            ("method".to_string(), "lora".to_string()),
            ("data".to_string(), data.to_string()),
        ])
    };
    let cfg = TrainConfig {
        checkpoint_every: Some(2),
        out_dir: Some(out.path().to_path_buf()),
        run_identity: identity("a.tsv"),
        ..config(4)
    };
    run(&Regression::new(), cfg.clone(), &data).unwrap();
    let ck = out.path().join("checkpoint-4");
    let state = TrainerState::read(&ck.join(STATE_FILE)).unwrap();
    assert_eq!(state.run_identity, identity("a.tsv"));
    let resume_err = |cfg: TrainConfig| {
        run(
            &Regression::new(),
            TrainConfig {
                resume_from: Some(ck.clone()),
                ..cfg
            },
            &data,
        )
        .unwrap_err()
    };
    let field = |e: &PeftError| match e {
        PeftError::InvalidConfig { field, .. } => field.clone(),
        other => panic!("expected InvalidConfig, got {other:?}"),
    };

    let e = resume_err(TrainConfig {
        run_identity: identity("b.tsv"),
        ..cfg.clone()
    });
    assert_eq!(field(&e), "data");
    assert!(e.to_string().contains("belongs to another run"), "{e}");
    assert!(
        e.to_string().contains("a.tsv") && e.to_string().contains("b.tsv"),
        "{e}"
    );

    let e = resume_err(TrainConfig {
        steps: 3,
        ..cfg.clone()
    });
    assert_eq!(field(&e), "steps");
    assert!(e.to_string().contains("step 4"), "{e}");
    // Resuming a finished run at its own step count is allowed (nothing left to train).
    let done = run(
        &Regression::new(),
        TrainConfig {
            resume_from: Some(ck.clone()),
            ..cfg.clone()
        },
        &data,
    )
    .unwrap();
    assert_eq!((done.start_step, done.global_step), (4, 4));

    let mut bad = state.clone();
    bad.position = 33;
    std::fs::write(ck.join(STATE_FILE), serde_json::to_string(&bad).unwrap()).unwrap();
    let e = resume_err(cfg.clone());
    assert_eq!(field(&e), "position");
    assert!(
        e.to_string()
            .contains(&ck.join(STATE_FILE).display().to_string()),
        "{e}"
    );

    std::fs::remove_file(ck.join(STATE_FILE)).unwrap();
    for from in [ck.clone(), out.path().to_path_buf()] {
        let e = run(
            &Regression::new(),
            TrainConfig {
                resume_from: Some(from),
                ..cfg.clone()
            },
            &data,
        )
        .unwrap_err();
        match &e {
            PeftError::Io { path, .. } => assert_eq!(path, &ck.join(STATE_FILE)),
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(e.to_string().contains("incomplete"), "{e}");
    }
}

/// `prepare_output_dir`: an unwritable folder is refused before any work; a second lock on a
/// folder fails naming the folder and the holder, a lock whose process is gone is reclaimed,
/// and dropping the lock releases the folder; another run's checkpoints are refused unless
/// overwriting, and a resume from the folder continues it.
#[test]
fn output_folder_is_checked_locked_and_kept_from_other_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = prepare_output_dir(&file.join("out"), None, false).unwrap_err();
    assert!(e.to_string().contains("is a file, not a folder"), "{e}");
    assert!(!file.join("out").exists());

    let out = tmp.path().join("out");
    let lock = prepare_output_dir(&out, None, false).unwrap();
    let text = std::fs::read_to_string(out.join(LOCK_FILE)).unwrap();
    assert!(
        text.contains(&format!("pid={}", std::process::id())),
        "{text}"
    );
    let e = OutputLock::acquire(&out).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&out.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("process {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("in use by another run"), "{msg}");
    drop(lock);
    assert!(!out.join(LOCK_FILE).exists());
    assert!(
        !out.exists(),
        "the lock removes the empty folder it created"
    );

    // A lock left by a process that is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    std::fs::write(
        out.join(LOCK_FILE),
        format!("pid={dead}\nstart=1\nhost={}\n", host.trim()),
    )
    .unwrap();
    let lock = OutputLock::acquire(&out).unwrap();
    drop(lock);

    // Another run's checkpoints.
    let data = examples(32, 3);
    let cfg = TrainConfig {
        checkpoint_every: Some(2),
        out_dir: Some(out.clone()),
        ..config(2)
    };
    run(&Regression::new(), cfg, &data).unwrap();
    let e = prepare_output_dir(&out, None, false).unwrap_err();
    assert!(
        e.to_string()
            .contains("checkpoints of another run (checkpoint-2)"),
        "{e}"
    );
    assert!(!out.join(LOCK_FILE).exists(), "a refused run keeps no lock");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let e = prepare_output_dir(&out, Some(&elsewhere), false).unwrap_err();
    assert!(e.to_string().contains("--overwrite"), "{e}");
    drop(prepare_output_dir(&out, Some(&out), false).unwrap());
    drop(prepare_output_dir(&out, Some(&out.join("checkpoint-2")), false).unwrap());
    assert!(prepare_output_dir(&out, Some(&out), true).is_err());
    drop(prepare_output_dir(&out, None, true).unwrap());
    assert!(
        !out.join("checkpoint-2").exists(),
        "--overwrite removes the old checkpoints"
    );
}
