//! EVA: explained variance adaptation (Paischer et al., 2024, "Parameter Efficient Fine-tuning
//! via Explained Variance Adaptation", arXiv:2410.07170), with Hugging Face PEFT's semantics
//! (`init_lora_weights="eva"`, `peft/tuners/lora/eva.py`).
//!
//! EVA is an initialisation of LoRA; the adapter it makes is a plain [`LoraAdapter`] and the file
//! a plain PEFT LoRA. For every targeted linear layer `l` (`W_l: [out, in]`, configured rank
//! `r_l`, `α_l`):
//!
//! 1. **Incremental PCA** of the layer's inputs on the calibration batches (rows of non-padding
//!    tokens only, see `crate::calibrate`), with `k_l = round(ρ·r_l)` components (at most
//!    `min(in, out)`). Per batch `X: [N, in]` (skipped while `N < k_l`), sklearn's update as PEFT
//!    runs it: running mean `μ` and variance `σ²` (Chan's update, f64), then the SVD of
//!    `X − μ` (first batch) or of `[diag(S)·Vᵀ; X − mean(X); √(n·N/(n+N))·(μ_old − mean(X))]`;
//!    `components = Vᵀ[:k]` with each row's largest-magnitude entry positive (sklearn's
//!    `svd_flip`), `explained_variance_ratio = S² / Σ_j σ²_j·n`. The SVD is PEFT's randomised
//!    `svd_lowrank` (q = 2k, 4 subspace iterations, a seeded test matrix; exact when q reaches
//!    the matrix's smaller side).
//! 2. **Convergence.** After every fit (but the first) component `i` has converged when
//!    `cos(components_t[i], components_{t−1}[i]) ≥ τ`. A layer is done when its first `r_l`
//!    components (for its current `r_l`, step 3) have converged; it then stops fitting, and
//!    resumes if a later redistribution raises `r_l` past what converged. The batches cycle until
//!    every layer is done, at most [`EvaOptions::max_iterations`] batches: past that the error
//!    names the layers that have not converged.
//! 3. **Rank redistribution.** Once every layer has components: pool the values
//!    `explained_variance_ratio[:k_l]` of all layers, keep the `Σ_l r_l` largest, and set `r_l` to
//!    the number of layer `l`'s values kept (0 ≤ `r_l` ≤ `k_l`, and `Σ r_l` is unchanged; with
//!    `ρ = 1` every layer keeps its rank).
//! 4. **Init.** `A_l = components[:r_l]` (`[r_l, in]`, orthonormal rows; divided row-wise by
//!    `√S_i` with `whiten`), `B_l = 0`, so the adapted model is the base model exactly. A layer
//!    with `r_l = 0` gets no adapter. With `adjust_scaling_factors` (default),
//!    `α_l ← α_l · r_l_new / r_l`, keeping `s = α/r` per layer.
//!
//! Layers fed the same tensor (q/k/v of one block) share one PCA (`crate::calibrate`); each of
//! them still gets its own rank, and the one whose PCA is tracked holds the group's largest.
//! Targeted layers other than linear ones (conv2d) get the standard LoRA init, as PEFT does.
//!
//! The config written is PEFT's: `init_lora_weights: "eva"`, `eva_config`, `target_modules` =
//! the adapted modules (full names; rank-0 layers removed), `rank_pattern` / `alpha_pattern` =
//! full module name → `r_l` / `α_l` where they differ from `r` / `lora_alpha`. Python PEFT loads
//! it as it is, with no data.
//!
//! Differences from PEFT: the PCA runs in f64 (PEFT: f32); ties in the pooled ratios are broken
//! by layer order (PEFT's argsort leaves them unspecified); the randomised SVD draws its test
//! matrix from a seeded ChaCha RNG, not torch's; PEFT loops until convergence with no cap.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::{CliSpec, Method, MethodSpec, OptionKind, OptionSpec};
use crate::adapters::lora::{InitLoraWeights, LORA_TENSORS, LoraConfig, USE_RSLORA};
use crate::calibrate::{
    self, CalibrationBatch, CalibrationOptions, Calibrator, InputGroup, RowStatistic,
};
pub use crate::config::EvaConfig;
use crate::config::ModuleSelector;
use crate::error::{PeftError, Result};
use crate::layer::LayerHandle;
use crate::linalg::{self, Precision};
use crate::model::PeftModel;

/// EVA's registry entry: a LoRA file (`init_lora_weights: "eva"`, `eva_config`) whose `A` comes
/// from a calibration pass. CLI: r 8, α 16, dropout 0 unless given.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "eva",
    aliases: &[],
    peft_type: "LORA",
    summary: "LoRA initialised from a PCA of the layers' inputs on calibration data",
    tensors: LORA_TENSORS,
    cli: CliSpec {
        defaults: r#"{"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
            "init_lora_weights": "eva", "eva_config": {}}"#,
        rank: Some("r"),
        alpha: Some("lora_alpha"),
        alpha_per_rank: None,
        dropout: Some("lora_dropout"),
        options: &[
            eva_option("rho", "eva_config.rho", OptionKind::Float, "components per layer as a multiple of its rank (≥ 1)"),
            eva_option("tau", "eva_config.tau", OptionKind::Float, "cosine similarity at which a component has converged"),
            eva_option("whiten", "eva_config.whiten", OptionKind::Bool, "divide each row of A by √(its singular value)"),
            eva_option(
                "adjust_scaling_factors",
                "eva_config.adjust_scaling_factors",
                OptionKind::Bool,
                "scale α with the redistributed rank so that α/r stays",
            ),
            eva_option("use_label_mask", "eva_config.use_label_mask", OptionKind::Bool, "skip tokens labelled label_mask_value"),
            eva_option("label_mask_value", "eva_config.label_mask_value", OptionKind::Int, "the label of tokens that do not count"),
            USE_RSLORA,
        ],
    },
    needs_calibration: true,
    lora_pro_optimizer: false,
});

const fn eva_option(
    key: &'static str,
    path: &'static str,
    kind: OptionKind,
    help: &'static str,
) -> OptionSpec {
    OptionSpec {
        key,
        path,
        kind,
        help,
        excludes: None,
    }
}

/// How [`IncrementalPca`] computes each SVD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PcaSvd {
    /// The exact thin SVD.
    Exact,
    /// PEFT's `svd_lowrank`: `oversample` extra random directions (PEFT: q = 2k, i.e. k),
    /// `power_iters` subspace iterations (PEFT: 4), seeded; the exact SVD when `k + oversample`
    /// reaches the smaller side of the matrix.
    LowRank {
        oversample: usize,
        power_iters: usize,
        seed: u64,
    },
}

impl PcaSvd {
    /// PEFT's settings for `k` components.
    pub fn peft(k: usize) -> Self {
        PcaSvd::LowRank {
            oversample: k,
            power_iters: 4,
            seed: 42,
        }
    }
}

/// Incremental PCA (sklearn's `IncrementalPCA.partial_fit`, as PEFT ports it), in f64 on the CPU.
#[derive(Clone, Debug)]
pub struct IncrementalPca {
    n_components: usize,
    n_features: usize,
    svd: PcaSvd,
    n_seen: usize,
    mean: Option<Tensor>,
    var: Option<Tensor>,
    components: Option<Tensor>,
    singular_values: Option<Tensor>,
    explained_variance_ratio: Option<Tensor>,
}

impl IncrementalPca {
    /// `n_components ≤ n_features`.
    pub fn new(n_components: usize, n_features: usize, svd: PcaSvd) -> Result<Self> {
        if n_components == 0 || n_components > n_features {
            return Err(PeftError::config(
                "n_components",
                format!("must be in 1..={n_features} (the input features), got {n_components}"),
            ));
        }
        Ok(Self {
            n_components,
            n_features,
            svd,
            n_seen: 0,
            mean: None,
            var: None,
            components: None,
            singular_values: None,
            explained_variance_ratio: None,
        })
    }

    pub fn n_components(&self) -> usize {
        self.n_components
    }

    pub fn n_samples_seen(&self) -> usize {
        self.n_seen
    }

    /// `[k, in]` f64: the principal directions, one per row, strongest first.
    pub fn components(&self) -> Option<&Tensor> {
        self.components.as_ref()
    }

    /// `[k]` f64.
    pub fn singular_values(&self) -> Option<&Tensor> {
        self.singular_values.as_ref()
    }

    /// `[k]` f64: each component's share of the total variance.
    pub fn explained_variance_ratio(&self) -> Option<&Tensor> {
        self.explained_variance_ratio.as_ref()
    }

    /// `[in]` f64: the mean of every row seen.
    pub fn mean(&self) -> Option<&Tensor> {
        self.mean.as_ref()
    }

    /// Updates the fit with the rows of `x: [N, in]` (any float dtype and device), `N ≥ k`.
    pub fn partial_fit(&mut self, x: &Tensor) -> Result<()> {
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let (n, d) = x.dims2()?;
        if d != self.n_features {
            return Err(PeftError::ShapeMismatch {
                key: "incremental PCA batch".into(),
                expected: vec![n, self.n_features],
                got: vec![n, d],
            });
        }
        if n < self.n_components {
            return Err(PeftError::config(
                "incremental PCA batch",
                format!(
                    "{n} rows is fewer than the {} components",
                    self.n_components
                ),
            ));
        }
        let seen = self.n_seen as f64;
        let total = seen + n as f64;
        let nf = n as f64;
        // Chan et al.'s parallel update of the mean and the (biased) variance.
        let new_sum = x.sum(0)?;
        let last_sum = match &self.mean {
            Some(m) => (m * seen)?,
            None => Tensor::zeros(d, DType::F64, &Device::Cpu)?,
        };
        let mean = ((&last_sum + &new_sum)? / total)?;
        let batch_mean = (&new_sum / nf)?;
        let centred = x.broadcast_sub(&batch_mean)?;
        let new_unnormalized = centred.sqr()?.sum(0)?;
        let var = match &self.var {
            None => (new_unnormalized / total)?,
            Some(v) => {
                let last_over_new = seen / nf;
                let cross = ((&last_sum / last_over_new)? - &new_sum)?.sqr()?;
                let updated = ((v * seen)? + new_unnormalized)?;
                ((updated + (cross * (last_over_new / total))?)? / total)?
            }
        };
        let stacked = match (&self.components, &self.singular_values, &self.mean) {
            (Some(c), Some(s), Some(old_mean)) => {
                let scaled = c.broadcast_mul(&s.unsqueeze(1)?)?;
                let correction = ((old_mean - &batch_mean)? * (seen * nf / total).sqrt())?;
                Tensor::cat(&[scaled, centred, correction.unsqueeze(0)?], 0)?
            }
            _ => x.broadcast_sub(&mean)?,
        };
        let k = self.n_components;
        let (s, v) = match self.svd {
            PcaSvd::Exact => {
                let svd = linalg::thin_svd(&stacked, Precision::F64)?;
                (svd.s, svd.v)
            }
            PcaSvd::LowRank {
                oversample,
                power_iters,
                seed,
            } => svd_lowrank(&stacked, k + oversample, power_iters, seed)?,
        };
        // sklearn's svd_flip on V: the largest-magnitude entry of each component is positive,
        // which keeps a component's sign stable from batch to batch (U's rows are the batch's).
        let (v, _) = linalg::canonicalize_svd_signs(&v, &v)?;
        let components = v.narrow(1, 0, k)?.t()?.contiguous()?;
        let s = s.narrow(0, 0, k)?;
        let total_var = (&var * total)?.sum_all()?.to_scalar::<f64>()?;
        let ratio = if total_var > 0.0 {
            (s.sqr()? / total_var)?
        } else {
            s.zeros_like()?
        };
        self.n_seen += n;
        self.mean = Some(mean);
        self.var = Some(var);
        self.components = Some(components);
        self.singular_values = Some(s);
        self.explained_variance_ratio = Some(ratio);
        Ok(())
    }
}

/// torch's `svd_lowrank(a, q, niter)` as PEFT's IPCA calls it: a Gaussian test matrix (seeded,
/// so every call draws the same one, as PEFT's `fork_rng` + `manual_seed` does), `niter` subspace
/// iterations re-orthonormalised after every product, then the SVD of the small `Qᵀ a`. A fixed
/// amount of work, approximate for the trailing triplets; `linalg::truncated_svd` instead
/// iterates to convergence or falls back to the exact SVD, which on the flat spectra of layer
/// inputs costs more than the exact SVD alone. Returns `(S [q], V [n, q])`; the exact thin SVD
/// when `q` reaches `min(m, n)`.
fn svd_lowrank(a: &Tensor, q: usize, niter: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let (m, n) = a.dims2()?;
    if q >= m.min(n) {
        let svd = linalg::thin_svd(a, Precision::F64)?;
        return Ok((svd.s, svd.v));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let omega: Vec<f64> = crate::init::normal(&mut rng, n * q, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let omega = Tensor::from_vec(omega, (n, q), a.device())?;
    let orthonormal = |x: Tensor| -> Result<Tensor> { Ok(linalg::qr(&x, Precision::F64)?.q) };
    let mut basis = orthonormal(a.matmul(&omega)?)?;
    for _ in 0..niter {
        let z = orthonormal(a.t()?.matmul(&basis)?)?;
        basis = orthonormal(a.matmul(&z)?)?;
    }
    let small = basis.t()?.matmul(a)?;
    let svd = linalg::thin_svd(&small, Precision::F64)?;
    Ok((svd.s, svd.v))
}

/// Row-wise cosine similarity of two `[k, d]` matrices (torch's, with its 1e-8 floor).
fn row_cosines(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(1e-8, f64::MAX)?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(1e-8, f64::MAX)?;
    Ok((dot / (na * nb)?)?.to_vec1::<f64>()?)
}

/// One input group's PCA and convergence flags (PEFT's `SVDHook`).
#[derive(Debug)]
pub struct EvaStatistic {
    pca: IncrementalPca,
    tau: f64,
    converged: Vec<bool>,
    fits: usize,
    skipped: usize,
    most_rows: usize,
}

impl EvaStatistic {
    pub fn new(n_components: usize, n_features: usize, tau: f64, svd: PcaSvd) -> Result<Self> {
        Ok(Self {
            pca: IncrementalPca::new(n_components, n_features, svd)?,
            tau,
            converged: vec![false; n_components],
            fits: 0,
            skipped: 0,
            most_rows: 0,
        })
    }

    pub fn pca(&self) -> &IncrementalPca {
        &self.pca
    }

    /// Whether the first `r` components have converged (true for `r = 0`).
    pub fn converged_prefix(&self, r: usize) -> bool {
        self.converged.iter().take(r).all(|&c| c)
    }

    /// Number of components converged, counted from the first.
    pub fn converged_count(&self) -> usize {
        self.converged.iter().take_while(|&&c| c).count()
    }

    pub fn fits(&self) -> usize {
        self.fits
    }

    /// Batches skipped for having fewer usable rows than components.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

impl RowStatistic for EvaStatistic {
    fn update(&mut self, rows: &Tensor) -> Result<()> {
        let n = rows.dim(0)?;
        self.most_rows = self.most_rows.max(n);
        if n < self.pca.n_components() {
            // As PEFT: a batch with fewer usable tokens than components is skipped.
            self.skipped += 1;
            return Ok(());
        }
        let previous = self.pca.components().cloned();
        self.pca.partial_fit(rows)?;
        self.fits += 1;
        if let (Some(prev), Some(now)) = (previous, self.pca.components()) {
            let cos = row_cosines(now, &prev)?;
            self.converged = cos.iter().map(|&c| c >= self.tau).collect();
        }
        Ok(())
    }
}

/// PEFT's `_get_rank_distribution`: `ratios[l]` holds layer `l`'s explained-variance ratios
/// (its first `k_l`), `budget` the total rank. Returns each layer's rank: its count among the
/// `budget` largest pooled values (ties broken by layer order, then component order). Group
/// members then swap with their leader when they got more, so the leader holds the group's
/// largest rank. `leader_of[l]` is the layer whose PCA layer `l` shares (itself for leaders).
pub fn rank_distribution(ratios: &[Vec<f64>], budget: usize, leader_of: &[usize]) -> Vec<usize> {
    let mut pooled: Vec<(f64, usize)> = ratios
        .iter()
        .enumerate()
        .flat_map(|(l, values)| values.iter().map(move |&v| (v, l)))
        .collect();
    // Stable: equal values keep their pooled order.
    pooled.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut ranks = vec![0usize; ratios.len()];
    for &(_, l) in pooled.iter().take(budget) {
        ranks[l] += 1;
    }
    for (member, &leader) in leader_of.iter().enumerate() {
        if leader != member && ranks[member] > ranks[leader] {
            ranks.swap(member, leader);
        }
    }
    ranks
}

/// Settings of an EVA calibration run.
#[derive(Clone, Debug, Default)]
pub struct EvaOptions {
    /// Most batches run (the calibration batches cycle): past this, the layers that have not
    /// converged are an error. Default: 10 passes over the calibration batches.
    pub max_iterations: Option<usize>,
    /// How the PCA computes its SVDs. Default: PEFT's randomised SVD ([`PcaSvd::peft`]).
    pub svd: Option<PcaSvd>,
    /// Progress bar.
    pub calibration: CalibrationOptions,
}

/// What EVA computed: per targeted linear layer, its new rank and `A` (`[r_l, in]`, f32).
#[derive(Clone, Debug)]
pub struct EvaState {
    /// Layer name → (rank, A); rank-0 layers have an empty A (`[0, in]`).
    pub layers: Vec<(String, usize, Tensor)>,
    /// Targeted layers EVA cannot initialise (conv2d): standard LoRA init.
    pub fallback: Vec<String>,
    /// Names of the layers of each input group with more than one member.
    pub shared_inputs: Vec<Vec<String>>,
    /// Batches run (after the grouping forward).
    pub iterations: usize,
}

impl EvaState {
    /// Layer name → rank.
    pub fn ranks(&self) -> BTreeMap<String, usize> {
        self.layers
            .iter()
            .map(|(n, r, _)| (n.clone(), *r))
            .collect()
    }
}

/// Runs EVA's calibration (steps 1–3 of the module docs) on `model`'s base model: the layers
/// `config` targets, `batches` cycled, `forward(model, batch)` running one forward. The model
/// must not hold an adapter with the same targets active; adapters are switched off meanwhile.
pub fn eva_state<M>(
    model: &mut PeftModel<M>,
    config: &LoraConfig,
    batches: &[CalibrationBatch],
    mut forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    options: &EvaOptions,
) -> Result<EvaState> {
    config.validate()?;
    let eva = config.eva_config.clone().unwrap_or_default();
    eva.validate()?;
    if batches.is_empty() {
        return Err(PeftError::config("calibration data", "no batches"));
    }
    let (linear, other) = calibrate::target_layers(model, &config.targeting)?;
    let fallback: Vec<String> = other.iter().map(LayerHandle::name).collect();
    if linear.is_empty() {
        return Ok(EvaState {
            layers: Vec::new(),
            fallback,
            shared_inputs: Vec::new(),
            iterations: 0,
        });
    }
    let names: Vec<String> = linear.iter().map(LayerHandle::name).collect();
    let mut base_ranks = Vec::with_capacity(linear.len());
    let mut max_components = Vec::with_capacity(linear.len());
    for layer in &linear {
        let (r, _, _) = config.resolve(&layer.name())?;
        let g = layer.geometry();
        base_ranks.push(r);
        max_components.push(
            eva.max_components(r)
                .min(g.in_features().min(g.out_features())),
        );
    }
    let budget: usize = base_ranks.iter().sum();
    let n_batches = batches.len();
    let cap = options.max_iterations.unwrap_or(10 * n_batches);

    calibrate::with_base_model(model, |model| {
        let inner = model.model();
        let mut run = |b: &CalibrationBatch| forward(inner, b);
        let mut ks = max_components.clone();
        let calibrator = Calibrator::new(linear.clone(), &batches[0], &mut run, |g, layers| {
            let k = g
                .members
                .iter()
                .map(|&m| max_components[m])
                .max()
                .unwrap_or(1);
            let svd = options.svd.unwrap_or_else(|| PcaSvd::peft(k));
            EvaStatistic::new(
                k.max(1),
                layers[g.leader].geometry().in_features(),
                eva.tau,
                svd,
            )
        })?;
        let groups = calibrator.groups().to_vec();
        let mut leader_of = vec![0usize; names.len()];
        for g in &groups {
            let k = g
                .members
                .iter()
                .map(|&m| max_components[m])
                .max()
                .unwrap_or(1);
            for &m in &g.members {
                leader_of[m] = g.leader;
                ks[m] = k;
            }
        }
        let mut rank_dist = ks.clone();
        let mut done = vec![false; groups.len()];
        let bar = calibrate::progress_bar(None, options.calibration.quiet, "EVA");
        let mut iterations = 0usize;
        loop {
            for (gi, g) in groups.iter().enumerate() {
                let converged = calibrator
                    .with_stat(g.leader, |s| s.converged_prefix(rank_dist[g.leader]))
                    .unwrap_or(false);
                if !done[gi] && converged {
                    calibrator.set_active(g.leader, false);
                    done[gi] = true;
                } else if done[gi] && !converged {
                    calibrator.set_active(g.leader, true);
                    done[gi] = false;
                }
            }
            let n_done = done.iter().filter(|&&d| d).count();
            bar.set_message(format!("{n_done}/{} inputs converged", groups.len()));
            if n_done == groups.len() {
                break;
            }
            if iterations == cap {
                return Err(not_converged(&calibrator, &groups, &rank_dist, cap));
            }
            calibrator.run_batch(&batches[iterations % n_batches], &mut run)?;
            iterations += 1;
            bar.inc(1);
            if iterations == n_batches {
                calibrator.check_rows_seen(n_batches)?;
                check_fitted(&calibrator, &groups, &names, n_batches)?;
            }
            let fitted = groups.iter().all(|g| {
                calibrator
                    .with_stat(g.leader, |s| s.fits() > 0)
                    .unwrap_or(false)
            });
            if !fitted {
                continue;
            }
            let ratios: Vec<Vec<f64>> = (0..names.len())
                .map(|l| {
                    calibrator
                        .with_stat(leader_of[l], |s| ratio_prefix(s, ks[l]))
                        .unwrap_or(Ok(Vec::new()))
                })
                .collect::<Result<_>>()?;
            rank_dist = rank_distribution(&ratios, budget, &leader_of);
        }
        bar.finish_and_clear();

        let mut layers = Vec::with_capacity(names.len());
        for (l, name) in names.iter().enumerate() {
            let r = rank_dist[l];
            let a = calibrator
                .with_stat(leader_of[l], |s| eva_matrix(s, r, eva.whiten, name))
                .unwrap_or_else(|| Err(PeftError::layer(name, "EVA: no statistic")))?;
            layers.push((name.clone(), r, a));
        }
        let shared_inputs = groups
            .iter()
            .filter(|g| g.members.len() > 1)
            .map(|g| g.members.iter().map(|&m| names[m].clone()).collect())
            .collect();
        Ok(EvaState {
            layers,
            fallback,
            shared_inputs,
            iterations,
        })
    })
}

/// The first `k` explained-variance ratios of a fitted statistic.
fn ratio_prefix(s: &EvaStatistic, k: usize) -> Result<Vec<f64>> {
    match s.pca().explained_variance_ratio() {
        Some(r) => {
            let v = r.to_vec1::<f64>()?;
            Ok(v.into_iter().take(k).collect())
        }
        None => Ok(Vec::new()),
    }
}

/// `A = components[:r]` (whitened when asked), `[r, in]` f32.
fn eva_matrix(s: &EvaStatistic, r: usize, whiten: bool, layer: &str) -> Result<Tensor> {
    let in_features = s.pca().n_features;
    if r == 0 {
        return Ok(Tensor::zeros((0, in_features), DType::F32, &Device::Cpu)?);
    }
    if !s.converged_prefix(r) {
        return Err(PeftError::layer(
            layer,
            format!("EVA: assigned rank {r} but its components have not converged"),
        ));
    }
    let (Some(c), Some(sv)) = (s.pca().components(), s.pca().singular_values()) else {
        return Err(PeftError::layer(layer, "EVA: the PCA was never fitted"));
    };
    let mut a = c.narrow(0, 0, r)?;
    if whiten {
        let root = sv.narrow(0, 0, r)?.sqrt()?;
        if root.to_vec1::<f64>()?.iter().any(|&v| v <= 0.0) {
            return Err(PeftError::layer(
                layer,
                "EVA whiten: a component has singular value 0 (the inputs have too little variance)",
            ));
        }
        a = a.broadcast_div(&root.unsqueeze(1)?)?;
    }
    Ok(a.to_dtype(DType::F32)?)
}

/// After the first pass over the data: the groups no batch could fit (every batch has fewer
/// usable rows than the layer's components) are an error naming them.
fn check_fitted(
    calibrator: &Calibrator<EvaStatistic>,
    groups: &[InputGroup],
    names: &[String],
    batches: usize,
) -> Result<()> {
    for g in groups {
        let Some((fits, most, k)) = calibrator.with_stat(g.leader, |s| {
            (s.fits(), s.most_rows, s.pca().n_components())
        }) else {
            continue;
        };
        if fits == 0 {
            let members: Vec<&str> = g.members.iter().map(|&m| names[m].as_str()).collect();
            return Err(PeftError::layer(
                members.join(", "),
                format!(
                    "EVA needs at least {k} usable rows (tokens) in one calibration batch to fit \
                     its {k} components (rank × rho), but the {batches} batch(es) give at most \
                     {most}; use larger or more calibration batches, or a smaller rank"
                ),
            ));
        }
    }
    Ok(())
}

fn not_converged(
    calibrator: &Calibrator<EvaStatistic>,
    groups: &[InputGroup],
    rank_dist: &[usize],
    cap: usize,
) -> PeftError {
    let names: Vec<String> = calibrator.layers().iter().map(LayerHandle::name).collect();
    let mut layers = Vec::new();
    let mut progress = Vec::new();
    for g in groups {
        let r = rank_dist[g.leader];
        let Some((ok, count)) =
            calibrator.with_stat(g.leader, |s| (s.converged_prefix(r), s.converged_count()))
        else {
            continue;
        };
        if !ok {
            let members: Vec<&str> = g.members.iter().map(|&m| names[m].as_str()).collect();
            layers.push(members.join(", "));
            progress.push(format!("{}/{r}", count.min(r)));
        }
    }
    PeftError::layer(
        layers.join("; "),
        format!(
            "EVA did not converge within {cap} calibration batches (components converged: {}; \
             tau is the cosine threshold); raise the iteration cap, lower tau, or use more \
             calibration data",
            progress.join(", ")
        ),
    )
}

/// The LoRA config that reproduces `state` (PEFT's `_load_eva_state_dict`): `target_modules` =
/// the layers with rank > 0 plus the fallback layers, `rank_pattern` / `alpha_pattern` by full
/// module name where rank or α differ from `r` / `lora_alpha`.
pub fn eva_lora_config(config: &LoraConfig, state: &EvaState) -> Result<LoraConfig> {
    let eva = config.eva_config.clone().unwrap_or_default();
    let mut out = config.clone();
    let mut targets = Vec::new();
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    for (name, new_rank, _) in &state.layers {
        let (r, alpha, _) = config.resolve(name)?;
        if *new_rank == 0 {
            continue;
        }
        let alpha = if *new_rank != r && eva.adjust_scaling_factors {
            alpha * *new_rank as f64 / r as f64
        } else {
            alpha
        };
        if *new_rank != config.r {
            rank_pattern.insert(name.clone(), *new_rank);
        }
        if alpha != config.lora_alpha {
            alpha_pattern.insert(name.clone(), alpha);
        }
        targets.push(name.clone());
    }
    for name in &state.fallback {
        let (r, alpha, _) = config.resolve(name)?;
        if r != config.r {
            rank_pattern.insert(name.clone(), r);
        }
        if alpha != config.lora_alpha {
            alpha_pattern.insert(name.clone(), alpha);
        }
        targets.push(name.clone());
    }
    if targets.is_empty() {
        return Err(PeftError::config(
            "target_modules",
            "EVA assigned rank 0 to every targeted layer",
        ));
    }
    out.targeting.target_modules = Some(ModuleSelector::List(targets));
    out.rank_pattern = rank_pattern;
    out.alpha_pattern = alpha_pattern;
    out.init_lora_weights = InitLoraWeights::Named("eva".into());
    out.eva_config = Some(eva);
    Ok(out)
}

/// What [`add_eva_adapter`] did.
#[derive(Clone, Debug)]
pub struct EvaReport {
    pub state: EvaState,
    /// The config the adapter was added with (and is saved with).
    pub config: LoraConfig,
}

/// Calibrates, then adds adapter `name` with EVA's init: the LoRA config of
/// [`eva_lora_config`], `A` from the PCA, `B = 0`. The model's output is unchanged.
pub fn add_eva_adapter<M>(
    model: &mut PeftModel<M>,
    name: &str,
    config: LoraConfig,
    batches: &[CalibrationBatch],
    forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    options: &EvaOptions,
) -> Result<EvaReport> {
    if model.adapter_names().iter().any(|n| n == name) {
        return Err(PeftError::DuplicateAdapter(name.to_string()));
    }
    let state = eva_state(model, &config, batches, forward, options)?;
    let lora = eva_lora_config(&config, &state)?;
    model.add_adapter(name, lora.clone())?;
    for (module, r, a) in &state.layers {
        if *r == 0 {
            continue;
        }
        let layer = model.layer(module)?;
        let var = layer
            .trainable_vars(name)
            .into_iter()
            .find(|(n, _)| n == "lora_A.weight")
            .map(|(_, v)| v)
            .ok_or_else(|| PeftError::layer(module, "EVA: the new adapter has no lora_A"))?;
        let a = a.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&a)?;
    }
    Ok(EvaReport {
        state,
        config: lora,
    })
}
