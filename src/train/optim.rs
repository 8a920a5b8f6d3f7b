//! Upstream VMamba's optimisation recipe in Burn: AdamW with upstream's weight-decay groups,
//! gradient clipping by the global norm, gradients averaged over data-parallel devices, and
//! the per-iteration warm-up + cosine learning-rate schedule.

use std::collections::HashSet;
use std::sync::Arc;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::{
    AdamW, AdamWConfig, GradientsParams, LearningRate, MultiGradientsParams, Optimizer,
};
use burn::prelude::ToElement;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn_vmamba::model::{ParameterKey, parameter_keys};

/// Upstream's rule (`set_weight_decay` in `classification/utils/optimizer.py`): a parameter
/// is exempt from weight decay when it is 1-D, when its name ends in `.bias`, or when it is in
/// `model.no_weight_decay()` (`pos_embed`). Everything else decays, `A_logs` and
/// `dt_projs_bias` included (upstream's `_no_weight_decay` attribute on them is not read by
/// that code).
pub fn upstream_decays(key: &str, shape: &[usize]) -> bool {
    !(shape.len() == 1 || key.ends_with(".bias") || key == "pos_embed")
}

/// The parameters of `module` that decay under [`upstream_decays`], by upstream key.
pub fn decay_groups<B: Backend, M: Module<B>>(
    module: &M,
) -> (Vec<ParameterKey>, Vec<ParameterKey>) {
    parameter_keys(module)
        .into_iter()
        .partition(|p| upstream_decays(&p.key, &p.shape))
}

/// PyTorch's `clip_grad_norm_` constant: `coef = max_norm / (total_norm + 1e-6)`.
const CLIP_EPS: f64 = 1e-6;

/// AdamW over two parameter groups (decay / no decay) with one learning rate, after the
/// gradients are scaled by `grad_scale` (`1 / devices`: burn-train's multi-device strategy sums
/// the devices' gradients; this makes them a mean, as one device with the whole batch would
/// see) and clipped to a global L2 norm (upstream: `clip_grad_norm_(parameters, 5.0)`, one
/// norm over all gradients, not per tensor).
#[derive(Clone)]
pub struct RecipeOptimizer<M: AutodiffModule<B>, B: AutodiffBackend> {
    decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay: OptimizerAdaptor<AdamW, M, B>,
    decayed: Arc<HashSet<ParamId>>,
    clip_norm: Option<f64>,
    grad_scale: f64,
}

/// Settings of [`RecipeOptimizer`].
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeOptimizerConfig {
    /// AdamW's decoupled weight decay of the decay group.
    pub weight_decay: f64,
    /// Adam's β1, β2.
    pub betas: (f64, f64),
    /// Adam's ε.
    pub epsilon: f64,
    /// Global-norm clipping threshold (`None`: no clipping).
    pub clip_norm: Option<f64>,
    /// Factor applied to the gradients first (`1 / devices`).
    pub grad_scale: f64,
}

impl RecipeOptimizerConfig {
    /// The optimiser for `module`, whose decay group is `decayed`.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        decayed: impl IntoIterator<Item = ParamId>,
    ) -> RecipeOptimizer<M, B> {
        let adamw = |decay: f64| {
            AdamWConfig::new()
                .with_beta_1(self.betas.0 as f32)
                .with_beta_2(self.betas.1 as f32)
                .with_epsilon(self.epsilon as f32)
                .with_weight_decay(decay as f32)
                .init::<B, M>()
        };
        RecipeOptimizer {
            decay: adamw(self.weight_decay),
            no_decay: adamw(0.0),
            decayed: Arc::new(decayed.into_iter().collect()),
            clip_norm: self.clip_norm,
            grad_scale: self.grad_scale,
        }
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> RecipeOptimizer<M, B> {
    /// The ids of the decay group.
    pub fn decayed(&self) -> &HashSet<ParamId> {
        &self.decayed
    }
}

/// Visits every parameter's gradient with its rank known.
trait GradVisit<B: Backend> {
    fn grad<const D: usize>(&mut self, id: ParamId, grads: &mut GradientsParams);
}

struct Visit<'a, V> {
    grads: &'a mut GradientsParams,
    visit: V,
}

impl<B: AutodiffBackend, V: GradVisit<B::InnerBackend>> ModuleVisitor<B> for Visit<'_, V> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.visit.grad::<D>(param.id, self.grads);
    }
}

/// Σ‖g‖² over all gradients, on the first gradient's device.
struct SquaredNorm<B: Backend>(Option<Tensor<B, 1>>);

impl<B: Backend> GradVisit<B> for SquaredNorm<B> {
    fn grad<const D: usize>(&mut self, id: ParamId, grads: &mut GradientsParams) {
        if let Some(g) = grads.get::<B, D>(id) {
            let sq = g.square().sum();
            self.0 = Some(match self.0.take() {
                Some(total) => {
                    let device = total.device();
                    total + sq.to_device(&device)
                }
                None => sq,
            });
        }
    }
}

struct Scale(f64);

impl<B: Backend> GradVisit<B> for Scale {
    fn grad<const D: usize>(&mut self, id: ParamId, grads: &mut GradientsParams) {
        if let Some(g) = grads.remove::<B, D>(id) {
            grads.register(id, g.mul_scalar(self.0));
        }
    }
}

/// Moves the gradients of `ids` into `into`.
struct Take<'a> {
    ids: &'a HashSet<ParamId>,
    into: GradientsParams,
}

impl<B: Backend> GradVisit<B> for Take<'_> {
    fn grad<const D: usize>(&mut self, id: ParamId, grads: &mut GradientsParams) {
        if self.ids.contains(&id)
            && let Some(g) = grads.remove::<B, D>(id)
        {
            self.into.register(id, g);
        }
    }
}

/// Sums each parameter's gradients over the devices (on the device burn picks for it).
struct Gather<'a> {
    multi: &'a mut MultiGradientsParams,
}

impl<B: Backend> GradVisit<B> for Gather<'_> {
    fn grad<const D: usize>(&mut self, id: ParamId, grads: &mut GradientsParams) {
        if let Some((g, _device)) = self.multi.remove::<B, D>(id) {
            grads.register(id, g);
        }
    }
}

fn visit<B: AutodiffBackend, M: AutodiffModule<B>, V: GradVisit<B::InnerBackend>>(
    module: &M,
    grads: &mut GradientsParams,
    visit: V,
) -> V {
    let mut visitor = Visit { grads, visit };
    module.visit(&mut visitor);
    visitor.visit
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> RecipeOptimizer<M, B> {
    /// Scales by `grad_scale`, then clips to the global norm; returns the norm before clipping.
    pub fn prepare(&self, module: &M, grads: &mut GradientsParams) -> f64 {
        if self.grad_scale != 1.0 {
            visit::<B, M, _>(module, grads, Scale(self.grad_scale));
        }
        let Some(max_norm) = self.clip_norm else {
            return f64::NAN;
        };
        let norm = visit::<B, M, _>(module, grads, SquaredNorm(None))
            .0
            .map(|sq| sq.into_scalar().to_f64().sqrt())
            .unwrap_or(0.0);
        let coef = max_norm / (norm + CLIP_EPS);
        if coef < 1.0 {
            visit::<B, M, _>(module, grads, Scale(coef));
        }
        norm
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizer<M, B> for RecipeOptimizer<M, B> {
    /// The AdamW states of the decay group and of the rest.
    type Record = (AdamRecord<M, B>, AdamRecord<M, B>);

    fn step(&mut self, lr: LearningRate, module: M, mut grads: GradientsParams) -> M {
        self.prepare(&module, &mut grads);
        let take = Take {
            ids: &self.decayed,
            into: GradientsParams::new(),
        };
        let decayed = visit::<B, M, _>(&module, &mut grads, take).into;
        let module = self.decay.step(lr, module, decayed);
        self.no_decay.step(lr, module, grads)
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, mut grads: MultiGradientsParams) -> M {
        let mut merged = GradientsParams::new();
        let gather = Gather { multi: &mut grads };
        visit::<B, M, _>(&module, &mut merged, gather);
        self.step(lr, module, merged)
    }

    fn to_record(&self) -> Self::Record {
        (self.decay.to_record(), self.no_decay.to_record())
    }

    fn load_record(mut self, (decay, no_decay): Self::Record) -> Self {
        self.decay = self.decay.load_record(decay);
        self.no_decay = self.no_decay.load_record(no_decay);
        self
    }
}

/// The record of one AdamW group.
pub type AdamRecord<M, B> = <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record;

/// Upstream's schedule (timm `CosineLRScheduler` with `warmup_prefix`, stepped per
/// iteration): linear from `warmup_lr` to `base_lr` over `warmup_iters`, then cosine from
/// `base_lr` to `min_lr` over the remaining `total_iters - warmup_iters`, then `min_lr`.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Learning rate of the first iteration.
    pub warmup_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Iterations of linear warm-up.
    pub warmup_iters: usize,
    /// Iterations of the whole schedule.
    pub total_iters: usize,
    /// Iterations done.
    pub iteration: usize,
}

impl WarmupCosine {
    /// The learning rate of iteration `t` (0-based).
    pub fn lr_at(&self, t: usize) -> f64 {
        if t < self.warmup_iters {
            return self.warmup_lr
                + (self.base_lr - self.warmup_lr) * t as f64 / self.warmup_iters as f64;
        }
        let span = self.total_iters.saturating_sub(self.warmup_iters);
        let t = t - self.warmup_iters;
        if t >= span {
            return self.min_lr;
        }
        let progress = t as f64 / span as f64;
        self.min_lr
            + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        let lr = self.lr_at(self.iteration);
        self.iteration += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> Self::Record<B> {
        self.iteration
    }

    fn load_record<B: Backend>(mut self, record: Self::Record<B>) -> Self {
        self.iteration = record;
        self
    }
}
