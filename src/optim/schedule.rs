//! Learning-rate schedules with linear warmup, as Hugging Face transformers defines them
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup` with half a cycle).
//!
//! The learning rate of optimiser step `s` (0-based: the number of steps already taken) is
//! `lr · f(s)`, with `W` warmup steps and `T` total steps:
//!
//! ```text
//! s < W:      f(s) = s / max(1, W)
//! constant:   f(s) = 1
//! linear:     f(s) = max(0, (T − s) / max(1, T − W))
//! cosine:     f(s) = max(0, ½·(1 + cos(π·p))),  p = (s − W) / max(1, T − W)
//! ```
//!
//! As in transformers, the first step of a warmup runs at learning rate 0. A warmup given as a
//! ratio `r` of the total steps is `W = ⌈r·T⌉` (transformers' `warmup_ratio`).

use std::fmt;
use std::str::FromStr;

use crate::error::{PeftError, Result};

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The base learning rate for every step after warmup.
    Constant,
    /// Linear decay from the base learning rate to 0 at `total_steps`; transformers' default.
    #[default]
    Linear,
    /// Half a cosine cycle from the base learning rate down to 0 at `total_steps`.
    Cosine,
}

impl FromStr for Schedule {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(PeftError::config(
                "schedule",
                format!("`{s}` is not one of constant, linear, cosine"),
            )),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        })
    }
}

/// Warmup length: a number of steps, or a fraction of the total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// An absolute number of warmup steps (transformers' `warmup_steps`).
    Steps(usize),
    /// A fraction of the total steps, in `[0, 1]`; `⌈ratio · total⌉` steps (transformers'
    /// `warmup_ratio`).
    Ratio(f64),
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

impl Warmup {
    /// The number of warmup steps for a run of `total_steps`.
    pub fn steps(&self, total_steps: usize) -> Result<usize> {
        match *self {
            Warmup::Steps(n) => Ok(n),
            Warmup::Ratio(r) => {
                if !(0.0..=1.0).contains(&r) {
                    return Err(PeftError::config(
                        "warmup",
                        format!("a ratio must be in [0, 1], got {r}"),
                    ));
                }
                Ok((r * total_steps as f64).ceil() as usize)
            }
        }
    }
}

impl FromStr for Warmup {
    type Err = PeftError;

    /// An integer (`"100"`) is a number of steps; a number with a fraction (`"0.1"`, `"1.0"`)
    /// is a ratio of the total steps and must lie in `[0, 1]`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Ok(n) = s.parse::<usize>() {
            return Ok(Warmup::Steps(n));
        }
        match s.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(Warmup::Ratio(r)),
            _ => Err(PeftError::config(
                "warmup",
                format!("`{s}` is neither a step count nor a ratio in [0, 1]"),
            )),
        }
    }
}

/// A schedule resolved for one run: base learning rate, warmup and total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The decay shape after warmup.
    pub schedule: Schedule,
    /// The peak learning rate, reached at the end of warmup.
    pub base_lr: f64,
    /// Number of linear-warmup steps, already resolved from a [`Warmup`].
    pub warmup_steps: usize,
    /// Total optimiser steps in the run; linear and cosine decay reach 0 here.
    pub total_steps: usize,
}

impl LrSchedule {
    /// Resolves `warmup` against `total_steps`; errors if `base_lr` is negative or not finite.
    pub fn new(
        schedule: Schedule,
        base_lr: f64,
        warmup: Warmup,
        total_steps: usize,
    ) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(PeftError::config(
                "lr",
                format!("must be finite and ≥ 0, got {base_lr}"),
            ));
        }
        Ok(Self {
            schedule,
            base_lr,
            warmup_steps: warmup.steps(total_steps)?,
            total_steps,
        })
    }

    /// `f(step)`: the multiplier of the base learning rate at 0-based optimiser step `step`.
    pub fn multiplier(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let rest = (t - w).max(1.0);
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / rest).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / rest;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at 0-based optimiser step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.multiplier(step)
    }
}
