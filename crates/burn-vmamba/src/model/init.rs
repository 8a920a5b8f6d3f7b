//! Upstream's initialisation, as Burn initialisers and tensors.
//!
//! - Every `nn.Linear` (including `Linear2d`): timm's `trunc_normal_(std=0.02)` with the default
//!   cut at ±2 (absolute, i.e. 100 σ: a plain normal to any precision), bias 0 (VSSM
//!   `_init_weights`).
//! - Conv2d: PyTorch's default, `kaiming_uniform(a=√5)` = U(±1/√fan_in) for weight and bias,
//!   which is Burn's `Conv2dConfig` default.
//! - LayerNorm: weight 1, bias 0.
//! - SS2D scan parameters: [`ScanParams`].

use burn::module::{Param, ParamId};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Distribution, Tensor, TensorData, backend::Backend};

use super::config::SsmInit;
use super::ss2d::Ss2dConfig;

/// Directions of the cross-scan, K.
pub const K: usize = 4;

/// A `nn.Linear` as VSSM initialises it: weight ~ N(0, 0.02²), bias 0.
pub fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    let mut linear = LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        })
        .init(device);
    // A new lazy parameter, not `Param::map`, which would draw the default bias first.
    linear.bias = bias.then(|| Initializer::Zeros.init([d_out], device));
    linear
}

/// SS2D's scan parameters, in upstream's shapes and row order (`k·d_inner + d`). Each is a
/// lazy [`Param`], as Burn's own layers make theirs (through [`Initializer`] where it has the
/// distribution): drawn the first time it is read, so neither counting parameters by their
/// lazy shapes nor loading a checkpoint over them draws anything.
pub struct ScanParams<B: Backend> {
    /// `[K, R + 2N, d_inner]`.
    pub x_proj_weight: Param<Tensor<B, 3>>,
    /// `[K, d_inner, R]`.
    pub dt_projs_weight: Param<Tensor<B, 3>>,
    /// `[K, d_inner]`.
    pub dt_projs_bias: Param<Tensor<B, 2>>,
    /// `[K·d_inner, N]`.
    pub a_logs: Param<Tensor<B, 2>>,
    /// `[K·d_inner]`.
    pub ds: Param<Tensor<B, 1>>,
}

/// A parameter of `shape` that `draw` makes on its device when it is first read, for the two
/// initialisations [`Initializer`] has no kind for (V0's `dt_projs_bias` and `A_logs`). Built
/// as `Initializer::init` builds its parameters: allocated as persistent memory.
fn lazy<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
    draw: impl Fn([usize; D], &B::Device) -> Tensor<B, D> + Send + Sync + 'static,
) -> Param<Tensor<B, D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| {
            B::memory_persistent_allocations(device, (), |_| {
                let tensor = draw(shape, device);
                if require_grad {
                    tensor.require_grad()
                } else {
                    tensor
                }
            })
        },
        device.clone(),
        true,
        shape.into(),
    )
}

/// Upstream's `dt_projs_bias` for `SsmInit::V0` ("random" dt init): `dt = exp(U(ln 1e-3,
/// ln 1e-1))` floored at 1e-4, and `bias = softplus⁻¹(dt) = dt + ln(−expm1(−dt))`.
fn dt_bias_v0<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    let (ln_min, ln_max) = (1e-3f64.ln(), 1e-1f64.ln());
    let uniform: Tensor<B, 2> = Tensor::random(shape, Distribution::Uniform(0.0, 1.0), device);
    let bias: Vec<f32> = uniform
        .into_data()
        .iter::<f64>()
        .map(|r| {
            let dt = (r * (ln_max - ln_min) + ln_min).exp().max(1e-4);
            (dt + (-(-dt).exp_m1()).ln()) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(bias, shape), device)
}

/// SS2D's scan parameters as upstream's `ssm_init` initialises them (dt_min 1e-3, dt_max 0.1,
/// dt_init_floor 1e-4, dt_scale 1, dt_init "random"), each drawn when first read.
pub fn scan_params<B: Backend>(config: &Ss2dConfig, device: &B::Device) -> ScanParams<B> {
    let (d_inner, rank, n) = (config.d_inner(), config.dt_rank(), config.d_state);
    let channels = K * d_inner;
    // K stacked default nn.Linear(d_inner, R + 2N): U(±1/√d_inner); never re-initialised.
    let bound = 1.0 / (d_inner as f64).sqrt();
    let x_proj_weight = Initializer::Uniform {
        min: -bound,
        max: bound,
    }
    .init([K, config.x_proj_rows(), d_inner], device);
    let ds = Initializer::Ones.init([channels], device);
    let (w, b, a) = ([K, d_inner, rank], [K, d_inner], [channels, n]);
    let (dt_projs_weight, dt_projs_bias, a_logs) = match config.init {
        SsmInit::V0 => {
            let std = (rank as f64).powf(-0.5);
            (
                Initializer::Uniform {
                    min: -std,
                    max: std,
                }
                .init(w, device),
                lazy(b, device, dt_bias_v0),
                // S4D-real: A = −[1, 2, …, N] in every row.
                lazy(a, device, move |[rows, n], device: &B::Device| {
                    let row: Vec<f32> = (1..=n).map(|i| (i as f32).ln()).collect();
                    Tensor::<B, 1>::from_data(TensorData::new(row, [n]), device)
                        .reshape([1, n])
                        .repeat_dim(0, rows)
                }),
            )
        }
        SsmInit::V1 => {
            let normal = |std| Initializer::Normal { mean: 0.0, std };
            (
                normal(0.1).init(w, device),
                normal(0.1).init(b, device),
                normal(1.0).init(a, device),
            )
        }
        SsmInit::V2 => {
            let uniform = Initializer::Uniform { min: 0.0, max: 0.1 };
            (
                uniform.init(w, device),
                uniform.init(b, device),
                Initializer::Zeros.init(a, device),
            )
        }
    };
    ScanParams {
        x_proj_weight,
        dt_projs_weight,
        dt_projs_bias,
        a_logs,
        ds,
    }
}
