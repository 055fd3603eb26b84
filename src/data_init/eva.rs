//! EVA's calibration: one incremental PCA per input group of the targeted linear layers, the
//! convergence loop, the rank redistribution, and the LoRA adapter initialised from the PCA.
//! The method and its steps are described in [`crate::adapters::eva`].

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor};

use super::batch::CalibrationBatch;
use super::calibrator::{Calibrator, InputGroup, RowStatistic};
use super::pass::{CalibrationOptions, progress_bar, target_layers, with_base_model};
use crate::adapters::lora::{InitLoraWeights, LoraConfig};
use crate::config::{EvaConfig, ModuleSelector};
use crate::error::{PeftError, Result};
use crate::layer::LayerHandle;
use crate::linalg::{IncrementalPca, PcaSvd};
use crate::model::PeftModel;

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
    /// A PCA of `n_components` over rows of `n_features`, a component converged at cosine `tau`.
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

    /// The PCA fitted so far.
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

    /// Batches fitted (those with at least as many usable rows as components).
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

/// The components EVA computes for a layer of rank `r` over `in_features` inputs, before its
/// input group raises them to the group's largest: PEFT's `round(r·ρ)`. PEFT does not cap this
/// by `min(in, out)`: a layer's rank can end above its `out` (`A: [r, in]`, `B: [out, r]`), as
/// a `v_proj` sharing `q_proj`'s input under grouped-query attention does. The one cap is
/// `in_features`, the most components a PCA over `in` features has (PEFT's PCA refuses more).
pub fn layer_components(eva: &EvaConfig, r: usize, in_features: usize) -> usize {
    eva.max_components(r).min(in_features)
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
    let (linear, other) = target_layers(model, &config.targeting)?;
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
        base_ranks.push(r);
        max_components.push(layer_components(&eva, r, layer.geometry().in_features()));
    }
    let budget: usize = base_ranks.iter().sum();
    let n_batches = batches.len();
    let cap = options.max_iterations.unwrap_or(10 * n_batches);

    with_base_model(model, |model| {
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
        let bar = progress_bar(None, options.calibration.quiet, "EVA");
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
    let in_features = s.pca().n_features();
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
    out.rank_pattern = rank_pattern.into_iter().collect();
    out.alpha_pattern = alpha_pattern.into_iter().collect();
    out.init_lora_weights = InitLoraWeights::Named("eva".into());
    out.eva_config = Some(eva);
    Ok(out)
}

/// What [`add_eva_adapter`] did.
#[derive(Clone, Debug)]
pub struct EvaReport {
    /// What the calibration computed.
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
    model.add_initialised_adapter(name, lora.clone().into())?;
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
