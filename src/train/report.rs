//! What a run reports.

use std::path::PathBuf;

use super::task::EvalRecord;

/// What a run did. Histories cover every step from step 1, including steps done before a
/// resume (read back from the checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Mean loss of each step (the task's loss plus its regularisation term, see
    /// [`TrainTask::regularization_loss`](super::TrainTask::regularization_loss)); `losses[i]` is
    /// step `i + 1`.
    pub losses: Vec<f64>,
    /// Learning rate of each step.
    pub lrs: Vec<f64>,
    /// Global gradient norm of each step, before clipping.
    pub grad_norms: Vec<f64>,
    /// Evaluations, including those before a resume.
    pub evals: Vec<EvalRecord>,
    /// Steps already done when this run began (0 unless resumed).
    pub start_step: usize,
    /// Steps done at the end.
    pub global_step: usize,
    /// Checkpoint folders this run wrote.
    pub checkpoints: Vec<PathBuf>,
    /// Trainable vars that got no gradient at this run's first step (left unchanged).
    pub vars_without_grad: Vec<String>,
    /// Tokens this run trained on.
    pub tokens: usize,
    /// Wall time of this run's steps (evaluation and checkpoints included).
    pub seconds: f64,
}
