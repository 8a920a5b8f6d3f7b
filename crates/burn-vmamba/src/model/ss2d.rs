//! SS2D: VMamba's 2-D selective-scan token mixer.
//!
//! `in_proj → (split gate z) → depthwise conv → SiLU → cross-scan → per-direction projections →
//! selective_scan (G = 4 groups, one call) → cross-merge → out_norm → (GELU) → (· gate) →
//! out_proj`. Parameter names and shapes are upstream's (`op.*` keys of a VSS block).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, Linear, PaddingConfig2d};
use burn::tensor::{Tensor, TensorPrimitive, activation, backend::Backend};

use super::block::{layer_norm, layer_norm_config, native_inference, reshape};
use super::config::{DtRank, Gate, Layout, OutNorm, SsmInit};
use super::conv::{conv2d, native_params};
use super::cross_scan::{cross_merge, cross_scan};
use super::init::{self, K};
use super::profile;
use crate::ops::{SelectiveScanBackend, selective_scan};

/// SS2D: the 2-D selective-scan token mixer.
#[derive(Config, Debug)]
pub struct Ss2dConfig {
    /// Channels in and out (`d_model`).
    pub d_model: usize,
    /// State size N per channel.
    #[config(default = 16)]
    pub d_state: usize,
    /// `d_inner = int(ssm_ratio · d_model)`.
    #[config(default = 2.0)]
    pub ssm_ratio: f64,
    /// Rank of the Δ projection.
    #[config(default = "DtRank::Auto")]
    pub dt_rank: DtRank,
    /// Depthwise conv kernel size; below 2 means no conv (SiLU still applies).
    #[config(default = 3)]
    pub d_conv: usize,
    /// Whether the depthwise conv has a bias.
    #[config(default = true)]
    pub conv_bias: bool,
    /// Gate branch.
    #[config(default = "Gate::Silu")]
    pub gate: Gate,
    /// Norm on the merged output.
    #[config(default = "OutNorm::LayerNorm")]
    pub out_norm: OutNorm,
    /// Exact GELU after the out norm (`_oact`).
    #[config(default = false)]
    pub out_act: bool,
    /// Layout of `forward`'s input and output.
    #[config(default = "Layout::ChannelLast")]
    pub layout: Layout,
    /// Initialisation of the scan parameters.
    #[config(default = "SsmInit::V0")]
    pub init: SsmInit,
}

impl Ss2dConfig {
    /// Inner width `int(ssm_ratio · d_model)` (Python's truncation).
    pub fn d_inner(&self) -> usize {
        (self.ssm_ratio * self.d_model as f64) as usize
    }

    /// Rank R of the Δ projection.
    pub fn dt_rank(&self) -> usize {
        self.dt_rank.resolve(self.d_model)
    }

    /// Rows of one direction's `x_proj`: `R + 2N`.
    pub fn x_proj_rows(&self) -> usize {
        self.dt_rank() + 2 * self.d_state
    }
}

/// SS2D with upstream's parameters.
#[derive(Module, Debug)]
pub struct Ss2d<B: Backend> {
    /// `[d_model] → [d_inner]` (`[2·d_inner]` with a gate), no bias.
    pub in_proj: Linear<B>,
    /// Depthwise `d_conv × d_conv` conv, `[d_inner, 1, k, k]`; absent when `d_conv < 2`.
    pub conv2d: Option<Conv2d<B>>,
    /// Per-direction projection to `Δ` (R), `B` (N) and `C` (N): `[K, R + 2N, d_inner]`.
    pub x_proj_weight: Param<Tensor<B, 3>>,
    /// Per-direction `Δ` up-projection: `[K, d_inner, R]`.
    pub dt_projs_weight: Param<Tensor<B, 3>>,
    /// `Δ` bias, passed to the scan as `delta_bias`: `[K, d_inner]`.
    pub dt_projs_bias: Param<Tensor<B, 2>>,
    /// `A = −exp(a_logs)`: `[K·d_inner, N]` (upstream `A_logs`).
    pub a_logs: Param<Tensor<B, 2>>,
    /// Skip weights: `[K·d_inner]` (upstream `Ds`).
    pub ds: Param<Tensor<B, 1>>,
    /// LayerNorm over `d_inner`, unless the out norm is off.
    pub out_norm: Option<LayerNorm<B>>,
    /// `[d_inner] → [d_model]`, no bias.
    pub out_proj: Linear<B>,
    /// Gate branch.
    #[module(skip)]
    pub gate: Gate,
    /// GELU after the out norm.
    #[module(skip)]
    pub out_act: bool,
    /// Layout of `forward`'s input and output.
    #[module(skip)]
    pub layout: Layout,
}

impl Ss2dConfig {
    /// Builds SS2D with upstream's initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Ss2d<B> {
        let d_inner = self.d_inner();
        let d_proj = if self.gate == Gate::None {
            d_inner
        } else {
            2 * d_inner
        };
        let conv2d = (self.d_conv > 1).then(|| {
            let pad = (self.d_conv - 1) / 2;
            Conv2dConfig::new([d_inner, d_inner], [self.d_conv, self.d_conv])
                .with_groups(d_inner)
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(self.conv_bias)
                .init(device)
        });
        let params = init::scan_params::<B>(self, device);
        Ss2d {
            in_proj: init::linear(self.d_model, d_proj, false, device),
            conv2d,
            x_proj_weight: params.x_proj_weight,
            dt_projs_weight: params.dt_projs_weight,
            dt_projs_bias: params.dt_projs_bias,
            a_logs: params.a_logs,
            ds: params.ds,
            out_norm: (self.out_norm == OutNorm::LayerNorm)
                .then(|| layer_norm_config(d_inner).init(device)),
            out_proj: init::linear(d_inner, self.d_model, false, device),
            gate: self.gate,
            out_act: self.out_act,
            layout: self.layout,
        }
    }
}

impl<B: SelectiveScanBackend> Ss2d<B> {
    /// # Shapes
    /// - `x`: `[batch, height, width, d_model]` (channel-last) or `[batch, d_model, height,
    ///   width]` (channel-first), as configured
    /// - returns: the same shape as `x`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.forward_channel_last(self.layout.to_channel_last(x));
        self.layout.from_channel_last(y)
    }

    /// Inner width `d_inner`.
    pub fn d_inner(&self) -> usize {
        self.dt_projs_weight.dims()[1]
    }

    fn forward_channel_last(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, height, width, _] = x.dims();
        let d_inner = self.d_inner();
        let device = x.device();
        let xz = profile::scope::<B, _>("ss2d.in_proj", &device, || {
            super::block::linear_4d(&self.in_proj, x)
        });
        let (x, z) = match self.gate {
            Gate::None => (xz, None),
            Gate::Silu | Gate::Linear => {
                let x = xz.clone().narrow(3, 0, d_inner);
                let z = xz.narrow(3, d_inner, d_inner);
                let z = if self.gate == Gate::Silu {
                    activation::silu(z)
                } else {
                    z
                };
                (x, Some(z))
            }
        };
        // [batch, d_inner, height, width]: conv and SiLU fused natively where the backend offers
        // it (NdArray inference), else the conv (native where the backend has it) and SiLU.
        let fused = self
            .conv2d
            .as_ref()
            .filter(|_| !B::ad_enabled(&device))
            .and_then(|conv| {
                profile::scope::<B, _>("ss2d.conv2d+silu", &device, || {
                    let (weight, bias) = native_params(conv);
                    B::depthwise_conv_silu(x.clone().into_primitive().tensor(), weight, bias)
                })
            });
        let x = match fused {
            Some(y) => Tensor::from_primitive(TensorPrimitive::Float(y)),
            None => {
                let x = match &self.conv2d {
                    Some(conv) => profile::scope::<B, _>("ss2d.conv2d", &device, || {
                        // Native where the backend has it (NdArray, in training too: its own
                        // backward), else permute and the generic conv.
                        let (weight, bias) = native_params(conv);
                        match B::depthwise_conv(x.clone().into_primitive().tensor(), weight, bias) {
                            Some(y) => Tensor::from_primitive(TensorPrimitive::Float(y)),
                            None => conv2d::<B>(conv, x.permute([0, 3, 1, 2])),
                        }
                    }),
                    None => x.permute([0, 3, 1, 2]),
                };
                profile::scope::<B, _>("ss2d.silu", &device, || activation::silu(x))
            }
        };
        let y = self.scan_2d(x, height, width); // [batch, d_inner, height, width]
        let y = y.permute([0, 2, 3, 1]);
        let y = match &self.out_norm {
            Some(norm) => profile::scope::<B, _>("ss2d.out_norm", &device, || layer_norm(norm, y)),
            None => y,
        };
        let y = if self.out_act {
            profile::scope::<B, _>("ss2d.out_act", &device, || super::block::gelu(y))
        } else {
            y
        };
        let y = match z {
            Some(z) => profile::scope::<B, _>("ss2d.gate", &device, || y * z),
            None => y,
        };
        profile::scope::<B, _>("ss2d.out_proj", &device, || {
            super::block::linear_4d(&self.out_proj, y)
        })
    }

    /// Cross-scan → projections → `selective_scan` → cross-merge, on a channel-first map.
    fn scan_2d(&self, x: Tensor<B, 4>, height: usize, width: usize) -> Tensor<B, 4> {
        let [batch, d_inner, _, _] = x.dims();
        let len = height * width;
        let [_, _, rank] = self.dt_projs_weight.dims();
        let d_state = self.a_logs.dims()[1];
        let device = x.device();
        // [batch, K, d_inner, len]
        let xs = profile::scope::<B, _>("ss2d.cross_scan", &device, || {
            native_inference(&device, || {
                B::native_cross_scan(x.clone().into_primitive().tensor())
            })
            .unwrap_or_else(|| cross_scan(x))
        });
        // einsum("b k d l, k c d -> b k c l")
        let x_dbl = profile::scope::<B, _>("ss2d.x_proj", &device, || {
            direction_matmul(self.x_proj_weight.val(), xs.clone())
        }); // [batch, K, R + 2N, len]
        let dts = x_dbl.clone().narrow(2, 0, rank);
        let bs = x_dbl.clone().narrow(2, rank, d_state); // [batch, K, N, len]
        let cs = x_dbl.narrow(2, rank + d_state, d_state);
        // einsum("b k r l, k d r -> b k d l"); no bias here: it enters the scan as delta_bias.
        let dts = reshape(
            profile::scope::<B, _>("ss2d.dt_proj", &device, || {
                direction_matmul(self.dt_projs_weight.val(), dts)
            }),
            [batch, K * d_inner, len],
        );
        let us = reshape(xs, [batch, K * d_inner, len]);
        let a = -self.a_logs.val().exp(); // [K·d_inner, N]
        let ys = profile::scope::<B, _>("ss2d.selective_scan", &device, || {
            selective_scan(
                us,
                dts,
                a,
                bs,
                cs,
                Some(self.ds.val()),
                Some(self.dt_projs_bias.val().reshape([K * d_inner])),
                true,
            )
        }); // [batch, K·d_inner, len]
        profile::scope::<B, _>("ss2d.cross_merge", &device, || {
            let ys = reshape(ys, [batch, K, d_inner, len]);
            native_inference(&device, || {
                B::native_cross_merge(ys.clone().into_primitive().tensor(), height, width)
            })
            .unwrap_or_else(|| cross_merge(ys, height, width))
        })
    }
}

/// `weight [K, M, D]` applied per direction to `x [batch, K, D, L]` → `[batch, K, M, L]`: the
/// backend's native product where it has one (in training too, with its native backward:
/// [`SelectiveScanBackend::native_direction_matmul`]), else the broadcast matmul.
fn direction_matmul<B: SelectiveScanBackend>(
    weight: Tensor<B, 3>,
    x: Tensor<B, 4>,
) -> Tensor<B, 4> {
    if let Some(y) = B::native_direction_matmul(
        weight.clone().into_primitive().tensor(),
        x.clone().into_primitive().tensor(),
    ) {
        return Tensor::from_primitive(TensorPrimitive::Float(y));
    }
    let [batch, directions, _, _] = x.dims();
    let [_, m, d] = weight.dims();
    weight
        .unsqueeze_dim::<4>(0)
        .expand([batch, directions, m, d])
        .matmul(x)
}
