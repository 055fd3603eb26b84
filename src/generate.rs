//! Text generation with a Llama-family model: greedy decoding or sampling (temperature, top-p,
//! seeded), KV-cached.
//!
//! Each step takes the last position's logits `z` (f32) and picks the next token:
//! - `temperature = 0`: `argmax z` (the lowest id on ties);
//! - otherwise `p = softmax(z / temperature)` (in f64), keep the most probable tokens whose
//!   cumulative probability first reaches `top_p` (at least one), renormalise, and draw from a
//!   ChaCha RNG seeded with `seed`, so the same seed gives the same text.
//!
//! Generation stops after `max_new_tokens`, after a stop token (not included in the output), or
//! when the sequence fills the model's context (`max_position_embeddings`). The model computes
//! with whatever training flag its `PeftModel` has: call `PeftModel::eval()` first so that
//! adapter dropout is off.

use candle_core::{D, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{PeftError, Result};
use crate::models::llama::LlamaForCausalLM;

/// How to pick tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate after the prompt.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Seed of the sampling RNG (unused when greedy).
    pub seed: u64,
    /// Tokens that end generation (typically the EOS ids of the config).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl GenerationConfig {
    /// Checks that `temperature` is finite and ≥ 0 and `top_p` is in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(PeftError::config(
                "temperature",
                format!(
                    "must be finite and ≥ 0 (0 = greedy), got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(PeftError::config(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

/// The next-token picker: greedy, or seeded top-p sampling.
struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: ChaCha8Rng,
}

impl Sampler {
    fn new(cfg: &GenerationConfig) -> Self {
        Self {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        }
    }

    fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(PeftError::Unsupported(
                "the model returned no logits".into(),
            ));
        }
        if logits.iter().any(|v| v.is_nan()) {
            return Err(PeftError::Unsupported(
                "the model returned NaN logits; generation stopped".into(),
            ));
        }
        if self.temperature == 0.0 {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, (f64::from(v - max) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= self.top_p {
                break;
            }
        }
        let nucleus = &probs[..kept];
        let nucleus_total: f64 = nucleus.iter().map(|(_, p)| p).sum();
        let mut u = self.rng.random::<f64>() * nucleus_total;
        for &(id, p) in nucleus {
            if u < p {
                return Ok(id);
            }
            u -= p;
        }
        Ok(nucleus[kept - 1].0)
    }
}

fn check_prompt(model: &LlamaForCausalLM, prompt_ids: &[u32]) -> Result<()> {
    if prompt_ids.is_empty() {
        return Err(PeftError::config(
            "prompt",
            "is empty: give at least one token",
        ));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt_ids.len() > ctx {
        return Err(PeftError::config(
            "prompt",
            format!(
                "{} tokens is longer than the model's context of {ctx} tokens \
                 (max_position_embeddings)",
                prompt_ids.len()
            ),
        ));
    }
    Ok(())
}

/// The last position's logits of `[1, T, vocab]` as a vector.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// Runs the generation loop: `step(next_token_or_none)` returns the logits for the next pick.
fn run(
    model: &LlamaForCausalLM,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<u32>> {
    cfg.validate()?;
    check_prompt(model, prompt_ids)?;
    let ctx = model.config().max_position_embeddings;
    let mut sampler = Sampler::new(cfg);
    let mut sequence = prompt_ids.to_vec();
    let mut generated = Vec::new();
    let mut logits = step(&sequence)?;
    while generated.len() < cfg.max_new_tokens {
        let next = sampler.pick(&logits)?;
        if cfg.stop_tokens.contains(&next) {
            break;
        }
        generated.push(next);
        sequence.push(next);
        if generated.len() == cfg.max_new_tokens || sequence.len() >= ctx {
            break;
        }
        logits = step(&sequence)?;
    }
    Ok(generated)
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt_ids` with a KV cache: the prompt
/// runs once, then one position per step. Returns the new tokens only. A prompt longer than the
/// context is an error naming both lengths.
pub fn generate(
    model: &LlamaForCausalLM,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let device = model.device().clone();
    run(model, prompt_ids, cfg, |sequence| {
        let new = &sequence[cache.len()..];
        let ids = Tensor::new(new, &device)?.unsqueeze(0)?;
        last_logits(&model.forward_cached(&ids, &mut cache)?)
    })
}

/// The same as [`generate`] without a cache: every step runs the whole sequence through
/// [`LlamaForCausalLM::forward`]. For checking the cached path.
pub fn generate_uncached(
    model: &LlamaForCausalLM,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
) -> Result<Vec<u32>> {
    let device = model.device().clone();
    run(model, prompt_ids, cfg, |sequence| {
        let ids = Tensor::new(sequence, &device)?.unsqueeze(0)?;
        last_logits(&model.forward(&ids, None)?.detach())
    })
}

/// The argmax over the last dim, for callers that batch their own greedy steps.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler::new(&GenerationConfig {
            temperature,
            top_p,
            seed,
            ..Default::default()
        })
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(0.0, 1.0, 0);
        assert_eq!(s.pick(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
        assert!(s.pick(&[f32::NAN, 1.0]).is_err());
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // softmax([ln 6, ln 3, ln 1]) = [0.6, 0.3, 0.1]: top_p 0.5 keeps token 0 only, 0.85 keeps
        // {0, 1}, and sampling frequencies follow the renormalised probabilities.
        let logits = [6f32.ln(), 3f32.ln(), 1f32.ln()];
        let mut s = sampler(1.0, 0.5, 7);
        assert!((0..200).all(|_| s.pick(&logits).unwrap() == 0));
        let mut s = sampler(1.0, 0.85, 7);
        let mut counts = [0usize; 3];
        for _ in 0..6000 {
            counts[s.pick(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[0] as f64 / 6000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.03, "{counts:?}");
        // The same seed gives the same draws.
        let draw = |seed| {
            let mut s = sampler(0.8, 1.0, seed);
            (0..20)
                .map(|_| s.pick(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn bad_settings() {
        let bad = GenerationConfig {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = GenerationConfig {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
