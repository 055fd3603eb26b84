//! Data-parallel training on CPU, ranks as threads ([`ThreadGroup`]): W ranks with batch b train
//! exactly as one rank with batch W·b (the closed form of the gradient all-reduce), the ranks'
//! adapters stay bit-identical, rank 0 alone checkpoints, and adapters that start apart are
//! made equal before the first step.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_peft::train::{Collective, ThreadGroup, ThreadRank, checkpoint_dirs};
use candle_peft::{
    DEFAULT_ADAPTER, EvalReport, PeftModel, Schedule, TrainConfig, TrainReport, TrainTask, Trainer,
    Warmup,
};
use common::tiny::{
    Example, TEACHER_TOKENS, Tiny, flat, lora_random_b, student_mse, teacher_examples, tiny_model,
};

/// Inputs and the targets a teacher (the tiny model with another adapter) gives them.
fn examples(n: usize) -> Vec<Example> {
    teacher_examples(n, 3, &["q", "v", "head"])
}

/// Mean squared error of a student: every micro-batch's loss is a mean over equally many
/// terms, so the mean of W micro-batch gradients is the gradient of their union.
struct Regression {
    pm: PeftModel<Tiny>,
    calls: Cell<usize>,
    /// The loss call (0-based) that returns an error, as a rank that crashes mid-run.
    fail_call: Option<usize>,
}

impl Regression {
    fn new(adapter_seed: u64) -> Self {
        let mut pm = tiny_model(1, adapter_seed);
        pm.add_adapter(DEFAULT_ADAPTER, lora_random_b(&["q", "v", "head"], 2, 4.0))
            .unwrap();
        Self {
            pm,
            calls: Cell::new(0),
            fail_call: None,
        }
    }

    fn vars(&self) -> Vec<(String, Vec<f32>)> {
        self.trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect()
    }
}

impl TrainTask for Regression {
    type Example = Example;

    fn loss(&self, batch: &[&Example]) -> candle_peft::Result<(Tensor, usize)> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        if self.fail_call == Some(call) {
            return Err(candle_peft::PeftError::Unsupported(
                "simulated crash".into(),
            ));
        }
        Ok((
            student_mse(self.pm.model(), batch)?,
            batch.len() * TEACHER_TOKENS,
        ))
    }

    fn evaluate(&self, examples: &[Example]) -> candle_peft::Result<EvalReport> {
        let batch: Vec<&Example> = examples.iter().collect();
        Ok(EvalReport {
            loss: self.loss(&batch)?.0.to_scalar::<f32>()? as f64,
            metrics: BTreeMap::new(),
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
}

fn config(batch_size: usize, grad_accum: usize) -> TrainConfig {
    TrainConfig {
        steps: 12,
        batch_size,
        grad_accum,
        lr: 2e-2,
        schedule: Schedule::Cosine,
        warmup: Warmup::Ratio(0.1),
        max_grad_norm: Some(0.5),
        seed: 1234,
        quiet: true,
        ..TrainConfig::default()
    }
}

/// What one rank ends with: its report, its trained vars and how many losses it computed.
struct RankOutcome {
    report: TrainReport,
    vars: Vec<(String, Vec<f32>)>,
    loss_calls: usize,
}

/// Trains `world` ranks as threads, rank `r`'s adapter seeded with `adapter_seed(r)`.
fn train_ranks(
    world: usize,
    cfg: &TrainConfig,
    eval: bool,
    adapter_seed: impl Fn(usize) -> u64 + Sync,
) -> Vec<RankOutcome> {
    on_each_rank(&ThreadGroup::ranks(world).unwrap(), |rank| {
        let data = examples(48);
        let task = Regression::new(adapter_seed(rank.rank()));
        let held_out = examples(8);
        let report = Trainer::new(cfg.clone())
            .unwrap()
            .run_data_parallel(&task, &data, eval.then_some(&held_out[..]), rank)
            .unwrap();
        RankOutcome {
            report,
            vars: task.vars(),
            loss_calls: task.calls.get(),
        }
    })
}

/// Runs `f` for every rank, each on its own thread, and returns the results in rank order.
fn on_each_rank<T: Send>(ranks: &[ThreadRank], f: impl Fn(&ThreadRank) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ranks.iter().map(|rank| s.spawn(move || f(rank))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, xa), (nb, xb))| {
            assert_eq!(na, nb);
            xa.iter().zip(xb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

fn single(cfg: TrainConfig) -> (TrainReport, Vec<(String, Vec<f32>)>) {
    let task = Regression::new(5);
    let report = Trainer::new(cfg)
        .unwrap()
        .run(&task, &examples(48), None)
        .unwrap();
    (report, task.vars())
}

#[test]
fn two_ranks_with_batch_b_train_as_one_rank_with_batch_2b() {
    for grad_accum in [1, 2] {
        let (one, one_vars) = single(config(6, grad_accum));
        let two = train_ranks(2, &config(3, grad_accum), false, |_| 5);
        assert_eq!(two.len(), 2);
        for (r, rank) in two.iter().enumerate() {
            // Each rank computed only its own share of the micro-batches.
            assert_eq!(rank.loss_calls, 12 * grad_accum, "rank {r}");
            assert_eq!(rank.report.losses.len(), one.losses.len());
            for (step, (a, b)) in rank.report.losses.iter().zip(&one.losses).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "grad_accum {grad_accum}, rank {r}, step {}: loss {a} vs {b}",
                    step + 1
                );
            }
            assert_eq!(rank.report.tokens, one.tokens, "rank {r}");
            let diff = max_abs_diff(&rank.vars, &one_vars);
            assert!(
                diff < 1e-5,
                "grad_accum {grad_accum}, rank {r}: vars differ by {diff}"
            );
        }
        // The ranks apply the same update to the same values: identical bits.
        assert_eq!(two[0].vars, two[1].vars, "grad_accum {grad_accum}");
        // Training moved the adapter (the comparison above is not between two untouched ones).
        let untouched = Regression::new(5).vars();
        assert!(max_abs_diff(&one_vars, &untouched) > 1e-3);
    }
}

#[test]
fn one_rank_through_the_collective_is_the_plain_run_bit_for_bit() {
    let (plain, plain_vars) = single(config(4, 2));
    let one = train_ranks(1, &config(4, 2), false, |_| 5);
    assert_eq!(one[0].report.losses, plain.losses);
    assert_eq!(one[0].vars, plain_vars);
}

#[test]
fn ranks_that_start_apart_are_given_rank_0s_adapter_first() {
    // Rank 1's adapter is initialised from another seed; after the run both ranks hold the
    // same adapter as a two-rank run whose ranks both started from rank 0's.
    let apart = train_ranks(2, &config(3, 1), false, |r| if r == 0 { 5 } else { 9 });
    let together = train_ranks(2, &config(3, 1), false, |_| 5);
    assert_eq!(apart[0].vars, apart[1].vars);
    assert_eq!(apart[0].vars, together[0].vars);
    assert_eq!(apart[0].report.losses, together[0].report.losses);
}

#[test]
fn only_rank_0_evaluates_and_checkpoints() {
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        eval_every: Some(4),
        checkpoint_every: Some(6),
        out_dir: Some(out.path().to_path_buf()),
        ..config(3, 1)
    };
    let ranks = train_ranks(2, &cfg, true, |_| 5);
    let steps: Vec<usize> = ranks[0].report.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, [4, 8, 12]);
    assert!(ranks[1].report.evals.is_empty());
    assert_eq!(ranks[0].report.checkpoints.len(), 2);
    assert!(ranks[1].report.checkpoints.is_empty());
    assert_eq!(checkpoint_dirs(out.path()).unwrap().len(), 2);
    // Evaluation on rank 0 leaves the ranks in step: same adapter at the end.
    assert_eq!(ranks[0].vars, ranks[1].vars);
}

#[test]
fn thread_group_sums_in_rank_order_and_names_a_mismatch() {
    let ranks = ThreadGroup::ranks(3).unwrap();
    let sums = on_each_rank(&ranks, |rank| {
        let r = rank.rank() as f32;
        rank.all_reduce_sum(&Tensor::new(&[r, 10.0 * r, 0.5], &Device::Cpu)?)
    });
    for s in sums {
        assert_eq!(s.unwrap().to_vec1::<f32>().unwrap(), [3.0, 30.0, 1.5]);
    }
    assert_eq!(ranks[2].world_size(), 3);

    let ranks = ThreadGroup::ranks(2).unwrap();
    let results = on_each_rank(&ranks, |rank| {
        let n = 2 + rank.rank();
        rank.all_reduce_sum(&Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu)?)
    });
    for r in results {
        let err = r.unwrap_err().to_string();
        assert!(err.contains("all-reduce"), "{err}");
    }
    assert!(
        ThreadGroup::ranks(0)
            .unwrap_err()
            .to_string()
            .contains("world_size")
    );
}

#[test]
fn every_rank_resumes_from_rank_0s_checkpoint_exactly() {
    let first = tempfile::tempdir().unwrap();
    let full = TrainConfig {
        checkpoint_every: Some(6),
        out_dir: Some(first.path().to_path_buf()),
        ..config(3, 2)
    };
    let uninterrupted = train_ranks(2, &full, false, |_| 5);
    let second = tempfile::tempdir().unwrap();
    let resumed_cfg = TrainConfig {
        resume_from: Some(first.path().join("checkpoint-6")),
        out_dir: Some(second.path().to_path_buf()),
        ..full.clone()
    };
    // The resumed ranks start from fresh adapters of another seed: the checkpoint must replace
    // them on every rank, not only on rank 0.
    let resumed = train_ranks(2, &resumed_cfg, false, |_| 11);
    for (r, rank) in resumed.iter().enumerate() {
        assert_eq!(rank.report.start_step, 6, "rank {r}");
        assert_eq!(rank.loss_calls, 6 * 2, "rank {r}: only steps 7..12 ran");
        assert_eq!(rank.vars, uninterrupted[r].vars, "rank {r}");
        assert_eq!(
            rank.report.losses, uninterrupted[r].report.losses,
            "rank {r}"
        );
    }
}

/// A rank that fails mid-run stops the others at their next all-reduce with an error naming it,
/// instead of leaving them waiting for it forever.
#[test]
fn a_failed_rank_stops_the_others_with_an_error() {
    let ranks = ThreadGroup::ranks(3).unwrap();
    let cfg = config(3, 2);
    let results = on_each_rank(&ranks, |rank| {
        let mut task = Regression::new(5);
        if rank.rank() == 1 {
            task.fail_call = Some(7);
        }
        let data = examples(48);
        let result = Trainer::new(cfg.clone())
            .unwrap()
            .run_data_parallel(&task, &data, None, rank);
        (result.map(|r| r.global_step), task.calls.get())
    });
    let (failed, calls) = &results[1];
    assert!(
        failed
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("simulated crash")
    );
    assert_eq!(*calls, 8);
    for (r, (result, _)) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
        let err = result.as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 1 stopped"), "rank {r}: {err}");
    }
}
