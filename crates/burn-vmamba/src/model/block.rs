//! The VSS block: `x + drop_path(SS2D(norm(x)))`, then
//! `x + drop_path(MLP(norm2(x)))`; either branch can be off.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Distribution, Tensor, TensorPrimitive, activation, backend::Backend};

use super::config::Layout;
use super::init;
use super::profile;
use super::ss2d::{Ss2d, Ss2dConfig};
use crate::ops::SelectiveScanBackend;

/// One VSS block: `x + drop_path(SS2D(norm(x)))`, then `x + drop_path(MLP(norm2(x)))`.
#[derive(Config, Debug)]
pub struct VssBlockConfig {
    /// Channels.
    pub hidden_dim: usize,
    /// The SS2D branch; `None` when upstream's `ssm_ratio <= 0`.
    pub ss2d: Option<Ss2dConfig>,
    /// MLP hidden width is `int(hidden_dim · mlp_ratio)`; `<= 0` removes the branch.
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Stochastic depth rate of both branches (per-sample, training only).
    #[config(default = 0.0)]
    pub drop_path: f64,
    /// Layout of `forward`'s input and output.
    #[config(default = "Layout::ChannelLast")]
    pub layout: Layout,
}

impl VssBlockConfig {
    /// MLP hidden width, or `None` when the branch is off.
    pub fn mlp_hidden(&self) -> Option<usize> {
        (self.mlp_ratio > 0.0).then_some((self.hidden_dim as f64 * self.mlp_ratio) as usize)
    }
}

/// `fc1 → GELU (exact, erf) → fc2`, with biases (upstream `Mlp`; dropout 0).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden_dim] → [mlp_hidden]`.
    pub fc1: Linear<B>,
    /// `[mlp_hidden] → [hidden_dim]`.
    pub fc2: Linear<B>,
}

impl<B: SelectiveScanBackend> Mlp<B> {
    /// # Shapes
    /// - `x`: channel-last `[batch, height, width, hidden_dim]` → the same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = x.device();
        let h = profile::scope::<B, _>("mlp.fc1", &device, || linear_4d(&self.fc1, x));
        let h = profile::scope::<B, _>("mlp.gelu", &device, || gelu(h));
        profile::scope::<B, _>("mlp.fc2", &device, || linear_4d(&self.fc2, h))
    }
}

/// The exact GELU: the backend's native one where it has one (in training too, with its native
/// backward: [`SelectiveScanBackend::gelu_exact`]), else `activation::gelu`.
pub fn gelu<B: SelectiveScanBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    native(|| B::gelu_exact(x.clone().into_primitive().tensor()))
        .unwrap_or_else(|| activation::gelu(x))
}

/// A native op of the backend that is differentiable (the autodiff backend wraps the inner
/// backend's op with its native backward: [`SelectiveScanBackend::gelu_exact`] and
/// [`SelectiveScanBackend::native_linear`]) as a tensor; `None` where the backend has no such
/// op.
fn native<B: SelectiveScanBackend, const D: usize>(
    op: impl FnOnce() -> Option<FloatTensor<B>>,
) -> Option<Tensor<B, D>> {
    op().map(|y| Tensor::from_primitive(TensorPrimitive::Float(y)))
}

/// A native inference op of the backend (one of [`SelectiveScanBackend`]'s hooks, run by
/// `op`) as a tensor: `None` under autodiff, where `op` is not called, or where the backend
/// has no such op.
pub(crate) fn native_inference<B: SelectiveScanBackend, const D: usize>(
    device: &B::Device,
    op: impl FnOnce() -> Option<FloatTensor<B>>,
) -> Option<Tensor<B, D>> {
    if B::ad_enabled(device) {
        return None;
    }
    op().map(|y| Tensor::from_primitive(TensorPrimitive::Float(y)))
}

/// `linear.forward(x)` for a channel-last `[batch, height, width, channels]` tensor, as one
/// 2-D product `[batch·height·width, channels] × weight`: the backend's native linear on the
/// 4-D tensor where it has one (no reshape; in training too), else [`linear_2d`] on the reshaped
/// input. Burn's `Linear` on a 4-D input is a batched matmul over `batch·height` small products
/// (on NdArray, each packed separately).
pub fn linear_4d<B: SelectiveScanBackend>(linear: &Linear<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    if let Some(y) = native_linear(linear, &x) {
        return y;
    }
    let [batch, height, width, channels] = x.dims();
    let y = linear_2d(linear, x.reshape([batch * height * width, channels]));
    let out = y.dims()[1];
    y.reshape([batch, height, width, out])
}

/// `linear.forward(x)` for `x [M, K]`: the backend's native linear (in training too) where it has
/// one ([`SelectiveScanBackend::native_linear`]), else `Linear::forward`.
pub fn linear_2d<B: SelectiveScanBackend>(linear: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    native_linear(linear, &x).unwrap_or_else(|| linear.forward(x))
}

/// The epsilon of every LayerNorm of the model (upstream's `nn.LayerNorm` default). Burn's
/// `LayerNorm` keeps its epsilon private, so the model builds every one through
/// [`layer_norm_config`] and [`layer_norm`] passes this value to the native op.
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// A `LayerNormConfig` over `d` features with [`LAYER_NORM_EPSILON`].
pub fn layer_norm_config(d: usize) -> LayerNormConfig {
    LayerNormConfig::new(d).with_epsilon(LAYER_NORM_EPSILON)
}

/// `norm.forward(x)` (a LayerNorm made by [`layer_norm_config`]): the backend's one-pass
/// LayerNorm for inference where it has one ([`SelectiveScanBackend::native_layer_norm`]).
pub fn layer_norm<B: SelectiveScanBackend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    native_inference(&x.device(), || {
        B::native_layer_norm(
            x.clone().into_primitive().tensor(),
            norm.gamma.val().into_primitive().tensor(),
            norm.beta
                .as_ref()
                .map(|b| b.val().into_primitive().tensor()),
            LAYER_NORM_EPSILON,
        )
    })
    .unwrap_or_else(|| norm.forward(x))
}

/// `x.reshape(shape)`, without the copy Burn's NdArray `reshape` makes of a contiguous tensor
/// where the backend can avoid it for inference ([`SelectiveScanBackend::reshape_no_copy`]).
pub fn reshape<B: SelectiveScanBackend, const D1: usize, const D2: usize>(
    x: Tensor<B, D1>,
    shape: [usize; D2],
) -> Tensor<B, D2> {
    native_inference(&x.device(), || {
        B::reshape_no_copy(x.clone().into_primitive().tensor(), &shape)
    })
    .unwrap_or_else(|| x.reshape(shape))
}

/// [`SelectiveScanBackend::native_linear`] on `x [.., K]` (in training too, with its native
/// backward); `None` where the backend has none.
fn native_linear<B: SelectiveScanBackend, const D: usize>(
    linear: &Linear<B>,
    x: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    native(|| {
        B::native_linear(
            x.clone().into_primitive().tensor(),
            linear.weight.val().into_primitive().tensor(),
            linear
                .bias
                .as_ref()
                .map(|b| b.val().into_primitive().tensor()),
        )
    })
}

/// timm's `DropPath`: in training (an autodiff backend), zeroes whole samples with probability
/// `rate` and scales the kept ones by `1 / (1 − rate)`; the identity otherwise.
pub fn drop_path<B: Backend, const D: usize>(x: Tensor<B, D>, rate: f64) -> Tensor<B, D> {
    if rate <= 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let keep = 1.0 - rate;
    let mut mask_shape = [1; D];
    mask_shape[0] = x.dims()[0];
    let mask = Tensor::<B, D>::random(mask_shape, Distribution::Bernoulli(keep), &x.device());
    x * mask.div_scalar(keep)
}

/// One VSS block.
#[derive(Module, Debug)]
pub struct VssBlock<B: Backend> {
    /// LayerNorm before SS2D (present with the SS2D branch).
    pub norm: Option<LayerNorm<B>>,
    /// The SS2D token mixer (upstream key `op`).
    pub op: Option<Ss2d<B>>,
    /// LayerNorm before the MLP (present with the MLP branch).
    pub norm2: Option<LayerNorm<B>>,
    /// The channel MLP.
    pub mlp: Option<Mlp<B>>,
    /// Stochastic depth rate of both branches.
    #[module(skip)]
    pub drop_path: f64,
    /// Layout of `forward`'s input and output.
    #[module(skip)]
    pub layout: Layout,
}

impl VssBlockConfig {
    /// Builds the block with upstream's initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> VssBlock<B> {
        let norm = || layer_norm_config(self.hidden_dim).init(device);
        let ss2d = self
            .ss2d
            .as_ref()
            .map(|c| c.clone().with_layout(Layout::ChannelLast));
        VssBlock {
            norm: ss2d.as_ref().map(|_| norm()),
            op: ss2d.map(|c| c.init(device)),
            norm2: self.mlp_hidden().map(|_| norm()),
            mlp: self.mlp_hidden().map(|hidden| Mlp {
                fc1: init::linear(self.hidden_dim, hidden, true, device),
                fc2: init::linear(hidden, self.hidden_dim, true, device),
            }),
            drop_path: self.drop_path,
            layout: self.layout,
        }
    }
}

impl<B: SelectiveScanBackend> VssBlock<B> {
    /// # Shapes
    /// - `x`: `[batch, height, width, hidden_dim]` (channel-last) or
    ///   `[batch, hidden_dim, height, width]` (channel-first), as configured
    /// - returns: the same shape
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = x.device();
        let mut x = self.layout.to_channel_last(x);
        if let (Some(norm), Some(op)) = (&self.norm, &self.op) {
            let h = profile::scope::<B, _>("block.norm", &device, || layer_norm(norm, x.clone()));
            let h = op.forward(h);
            x = profile::scope::<B, _>("block.residual", &device, || {
                x + drop_path(h, self.drop_path)
            });
        }
        if let (Some(norm2), Some(mlp)) = (&self.norm2, &self.mlp) {
            let h = profile::scope::<B, _>("block.norm", &device, || layer_norm(norm2, x.clone()));
            let h = mlp.forward(h);
            x = profile::scope::<B, _>("block.residual", &device, || {
                x + drop_path(h, self.drop_path)
            });
        }
        self.layout.from_channel_last(x)
    }
}
