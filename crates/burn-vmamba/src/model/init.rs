//! Upstream's initialisation, as Burn initialisers and tensors.
//!
//! - Every `nn.Linear` (including `Linear2d`): timm's `trunc_normal_(std=0.02)` with the default
//!   cut at ±2 (absolute, i.e. 100 σ: a plain normal to any precision), bias 0 (VSSM
//!   `_init_weights`).
//! - Conv2d: PyTorch's default, `kaiming_uniform(a=√5)` = U(±1/√fan_in) for weight and bias,
//!   which is Burn's `Conv2dConfig` default.
//! - LayerNorm: weight 1, bias 0.
//! - SS2D scan parameters: [`ScanParams`].

use burn::module::Param;
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
    linear.bias = linear.bias.map(|b| b.map(|t| t.zeros_like()));
    linear
}

/// SS2D's scan parameters, in upstream's shapes and row order (`k·d_inner + d`).
pub struct ScanParams<B: Backend> {
    /// `[K, R + 2N, d_inner]`.
    pub x_proj_weight: Tensor<B, 3>,
    /// `[K, d_inner, R]`.
    pub dt_projs_weight: Tensor<B, 3>,
    /// `[K, d_inner]`.
    pub dt_projs_bias: Tensor<B, 2>,
    /// `[K·d_inner, N]`.
    pub a_logs: Tensor<B, 2>,
    /// `[K·d_inner]`.
    pub ds: Tensor<B, 1>,
}

/// Draws SS2D's scan parameters as upstream's `ssm_init` does (dt_min 1e-3, dt_max 0.1,
/// dt_init_floor 1e-4, dt_scale 1, dt_init "random").
pub fn scan_params<B: Backend>(config: &Ss2dConfig, device: &B::Device) -> ScanParams<B> {
    let (d_inner, rank, n) = (config.d_inner(), config.dt_rank(), config.d_state);
    let channels = K * d_inner;
    // K stacked default nn.Linear(d_inner, R + 2N): U(±1/√d_inner); never re-initialised.
    let bound = 1.0 / (d_inner as f64).sqrt();
    let x_proj_weight = Tensor::random(
        [K, config.x_proj_rows(), d_inner],
        Distribution::Uniform(-bound, bound),
        device,
    );
    let ds = Tensor::ones([channels], device);
    match config.init {
        SsmInit::V0 => {
            let std = (rank as f64).powf(-0.5);
            let dt_projs_weight =
                Tensor::random([K, d_inner, rank], Distribution::Uniform(-std, std), device);
            // dt = exp(U(ln 1e-3, ln 1e-1)) ≥ 1e-4; bias = softplus⁻¹(dt) = dt + ln(−expm1(−dt)).
            let (ln_min, ln_max) = (1e-3f64.ln(), 1e-1f64.ln());
            let uniform: Tensor<B, 2> =
                Tensor::random([K, d_inner], Distribution::Uniform(0.0, 1.0), device);
            let bias: Vec<f32> = uniform
                .into_data()
                .iter::<f64>()
                .map(|r| {
                    let dt = (r * (ln_max - ln_min) + ln_min).exp().max(1e-4);
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect();
            let dt_projs_bias = Tensor::from_data(TensorData::new(bias, [K, d_inner]), device);
            // S4D-real: A = −[1, 2, …, N] in every row.
            let row: Vec<f32> = (1..=n).map(|i| (i as f32).ln()).collect();
            let a_logs = Tensor::<B, 1>::from_data(TensorData::new(row, [n]), device)
                .reshape([1, n])
                .repeat_dim(0, channels);
            ScanParams {
                x_proj_weight,
                dt_projs_weight,
                dt_projs_bias,
                a_logs,
                ds,
            }
        }
        SsmInit::V1 => ScanParams {
            x_proj_weight,
            dt_projs_weight: Tensor::random(
                [K, d_inner, rank],
                Distribution::Normal(0.0, 0.1),
                device,
            ),
            dt_projs_bias: Tensor::random([K, d_inner], Distribution::Normal(0.0, 0.1), device),
            a_logs: Tensor::random([channels, n], Distribution::Normal(0.0, 1.0), device),
            ds,
        },
        SsmInit::V2 => ScanParams {
            x_proj_weight,
            dt_projs_weight: Tensor::random(
                [K, d_inner, rank],
                Distribution::Uniform(0.0, 0.1),
                device,
            ),
            dt_projs_bias: Tensor::random([K, d_inner], Distribution::Uniform(0.0, 0.1), device),
            a_logs: Tensor::zeros([channels, n], device),
            ds,
        },
    }
}

/// A trainable parameter from a tensor.
pub fn param<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(tensor)
}
