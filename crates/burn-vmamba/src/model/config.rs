//! Typed configuration of SS2D, the VSS block and the VSSM backbone (Burn `Config` types, JSON
//! serialisable), the variants as enums, and the presets of the released models.
//!
//! Upstream's string options (`forward_type = "v05_noz"`, `norm_layer = "ln2d"`, …) are parsed
//! once, at the edge, by [`crate::model::upstream`].

use burn::config::Config;
use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

/// `dt_rank`: upstream's `"auto"` is `ceil(d_model / 16)` (from `d_model`, not `d_inner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DtRank {
    /// `ceil(d_model / 16)`.
    Auto,
    /// A fixed rank.
    Fixed(usize),
}

impl DtRank {
    /// The rank for a block of width `d_model`.
    pub fn resolve(self, d_model: usize) -> usize {
        match self {
            DtRank::Auto => d_model.div_ceil(16),
            DtRank::Fixed(rank) => rank,
        }
    }
}

/// The tensor layout a module's `forward` takes and returns (upstream `norm_layer`).
///
/// Both compute the same function and share checkpoints; `ChannelFirst` is upstream's `ln2d`
/// (`LayerNorm2d`, `Linear2d` = 1×1 conv), `ChannelLast` its `ln`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// `[batch, height, width, channels]` (`norm_layer = "ln"`).
    ChannelLast,
    /// `[batch, channels, height, width]` (`norm_layer = "ln2d"`).
    ChannelFirst,
}

impl Layout {
    /// A 4-D activation in this layout → channel-last `[batch, height, width, channels]`.
    pub fn to_channel_last<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Layout::ChannelLast => x,
            Layout::ChannelFirst => x.permute([0, 2, 3, 1]),
        }
    }

    /// A channel-last activation → this layout.
    pub fn from_channel_last<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Layout::ChannelLast => x,
            Layout::ChannelFirst => x.permute([0, 3, 1, 2]),
        }
    }
}

/// The gate branch of SS2D (from the `forward_type` suffixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gate {
    /// `in_proj` yields `2·d_inner` channels `x, z`; `y = y · SiLU(z)` (v0, v2, v05…).
    Silu,
    /// As `Silu` but without the activation on `z` (`_nozact`).
    Linear,
    /// No gate: `in_proj` yields `d_inner` channels (`_noz`, every released v2 model).
    None,
}

/// The norm applied to the merged scan output before the gate (`out_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutNorm {
    /// `LayerNorm(d_inner)`, eps 1e-5 (the default).
    LayerNorm,
    /// Identity (`_onnone`).
    None,
}

/// How SS2D's scan parameters are initialised (upstream `ssm_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SsmInit {
    /// Mamba's: S4D-real `A_logs = log(1..=N)`, `Ds = 1`, dt bias = inverse softplus of
    /// `dt ~ exp(U(log 1e-3, log 1e-1))`, dt weights `U(±R^-0.5)` (all released models).
    V0,
    /// `Ds = 1`, `A_logs ~ N(0, 1)`, dt weight and bias `0.1·N(0, 1)`.
    V1,
    /// `Ds = 1`, `A_logs = 0`, dt weight and bias `0.1·U(0, 1)`.
    V2,
}

/// The stem (upstream `patchembed_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchEmbedVersion {
    /// Conv(3→C, k=p, s=p) → LN.
    V1,
    /// Conv(3→C/2, k=p/2+1, s=p/2, pad 1) → LN → GELU → Conv(C/2→C, same) → LN.
    V2,
}

/// The downsampling between stages (upstream `downsample_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownsampleVersion {
    /// Swin patch merging: pad to even, 2×2 neighbours concatenated → LN(4C) → Linear(4C→2C).
    V1,
    /// Conv(C→2C, k=2, s=2) → LN.
    V2,
    /// Conv(C→2C, k=3, s=2, pad 1) → LN (the released v2 models).
    V3,
    /// No downsampling (then consecutive `dims` must be equal).
    None,
}

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

/// The VSSM classification backbone. Field names and defaults are upstream's `VSSM(...)`
/// keywords; the string options are typed.
#[derive(Config, Debug)]
pub struct VssmConfig {
    /// Blocks per stage.
    #[config(default = "vec![2, 2, 9, 2]")]
    pub depths: Vec<usize>,
    /// Channels per stage.
    #[config(default = "vec![96, 192, 384, 768]")]
    pub dims: Vec<usize>,
    /// Patch size of the stem (total stride).
    #[config(default = 4)]
    pub patch_size: usize,
    /// Input channels.
    #[config(default = 3)]
    pub in_chans: usize,
    /// Classifier outputs.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// SS2D state size N.
    #[config(default = 16)]
    pub ssm_d_state: usize,
    /// SS2D expansion; `<= 0` removes the SS2D branch.
    #[config(default = 2.0)]
    pub ssm_ratio: f64,
    /// Rank of the Δ projection.
    #[config(default = "DtRank::Auto")]
    pub ssm_dt_rank: DtRank,
    /// Depthwise conv kernel size.
    #[config(default = 3)]
    pub ssm_conv: usize,
    /// Whether the depthwise conv has a bias.
    #[config(default = true)]
    pub ssm_conv_bias: bool,
    /// Scan parameter initialisation.
    #[config(default = "SsmInit::V0")]
    pub ssm_init: SsmInit,
    /// SS2D gate (from `forward_type`).
    #[config(default = "Gate::Silu")]
    pub gate: Gate,
    /// SS2D out norm (from `forward_type`).
    #[config(default = "OutNorm::LayerNorm")]
    pub out_norm: OutNorm,
    /// GELU after the out norm (`_oact`).
    #[config(default = false)]
    pub out_act: bool,
    /// MLP expansion; `<= 0` removes the MLP branch.
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Largest stochastic depth rate (rates rise linearly from 0 over all blocks).
    #[config(default = 0.1)]
    pub drop_path_rate: f64,
    /// Layout of the blocks' tensors (`norm_layer`: `ln` or `ln2d`); both compute the same
    /// function, [`crate::model::Vssm`] itself runs channel-last.
    #[config(default = "Layout::ChannelLast")]
    pub norm_layer: Layout,
    /// Downsampling between stages.
    #[config(default = "DownsampleVersion::V2")]
    pub downsample_version: DownsampleVersion,
    /// Stem.
    #[config(default = "PatchEmbedVersion::V1")]
    pub patchembed_version: PatchEmbedVersion,
}

impl VssmConfig {
    /// The SS2D config of a stage, or `None` when the SS2D branch is off.
    pub fn ss2d(&self, stage: usize) -> Option<Ss2dConfig> {
        (self.ssm_ratio > 0.0).then(|| {
            Ss2dConfig::new(self.dims[stage])
                .with_d_state(self.ssm_d_state)
                .with_ssm_ratio(self.ssm_ratio)
                .with_dt_rank(self.ssm_dt_rank)
                .with_d_conv(self.ssm_conv)
                .with_conv_bias(self.ssm_conv_bias)
                .with_gate(self.gate)
                .with_out_norm(self.out_norm)
                .with_out_act(self.out_act)
                .with_init(self.ssm_init)
                .with_layout(Layout::ChannelLast)
        })
    }

    /// Stochastic depth rate of every block, `linspace(0, drop_path_rate, sum(depths))`.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let total: usize = self.depths.iter().sum();
        (0..total)
            .map(|i| match total {
                1 => 0.0,
                _ => self.drop_path_rate * i as f64 / (total - 1) as f64,
            })
            .collect()
    }

    /// The block configs of a stage, in order.
    pub fn blocks(&self, stage: usize) -> Vec<VssBlockConfig> {
        let rates = self.drop_path_rates();
        let first: usize = self.depths[..stage].iter().sum();
        (0..self.depths[stage])
            .map(|j| {
                VssBlockConfig::new(self.dims[stage])
                    .with_ss2d(self.ss2d(stage))
                    .with_mlp_ratio(self.mlp_ratio)
                    .with_drop_path(rates[first + j])
                    .with_layout(Layout::ChannelLast)
            })
            .collect()
    }

    /// A released model by name: `vanilla-{tiny,small,base}`, `{tiny,small,base}-s2`
    /// (T s2l5, S/B s2l15), `{tiny,small,base}-s1` (T s1l8, S/B s1l20). Upstream's factory
    /// names (`vmamba_tiny_s1l8`, …) and checkpoint stems (`vssm1_tiny_0230s`, …) are
    /// accepted too. The error lists the known names.
    pub fn preset(name: &str) -> Result<Self, String> {
        let preset = PRESETS
            .iter()
            .find(|p| p.names.contains(&name))
            .ok_or_else(|| {
                let known: Vec<_> = PRESETS.iter().map(|p| p.names[0]).collect();
                format!(
                    "unknown preset {name:?}; expected one of {}",
                    known.join(", ")
                )
            })?;
        Ok(preset.config())
    }

    /// Every preset: its canonical name and its config.
    pub fn presets() -> Vec<(&'static str, Self)> {
        PRESETS.iter().map(|p| (p.names[0], p.config())).collect()
    }
}

struct Preset {
    names: &'static [&'static str],
    dim: usize,
    depths: [usize; 4],
    vanilla: bool,
    ssm_ratio: f64,
    drop_path_rate: f64,
}

impl Preset {
    fn config(&self) -> VssmConfig {
        let dims = (0..4).map(|i| self.dim << i).collect();
        let config = VssmConfig::new()
            .with_depths(self.depths.to_vec())
            .with_dims(dims)
            .with_drop_path_rate(self.drop_path_rate)
            .with_ssm_ratio(self.ssm_ratio);
        if self.vanilla {
            // vanilla_vmamba_*: forward_type "v0", d_state 16, no MLP, conv bias, ln, v1/v1.
            config
                .with_ssm_d_state(16)
                .with_mlp_ratio(0.0)
                .with_ssm_conv_bias(true)
                .with_gate(Gate::Silu)
                .with_norm_layer(Layout::ChannelLast)
                .with_downsample_version(DownsampleVersion::V1)
                .with_patchembed_version(PatchEmbedVersion::V1)
        } else {
            // vmamba_*_s{1,2}l*: forward_type "v05_noz", d_state 1, MLP 4, ln2d, v3/v2.
            config
                .with_ssm_d_state(1)
                .with_mlp_ratio(4.0)
                .with_ssm_conv_bias(false)
                .with_gate(Gate::None)
                .with_norm_layer(Layout::ChannelFirst)
                .with_downsample_version(DownsampleVersion::V3)
                .with_patchembed_version(PatchEmbedVersion::V2)
        }
    }
}

/// A row of [`PRESETS`].
const fn preset(
    names: &'static [&'static str],
    dim: usize,
    depths: [usize; 4],
    vanilla: bool,
    ssm_ratio: f64,
    drop_path_rate: f64,
) -> Preset {
    Preset {
        names,
        dim,
        depths,
        vanilla,
        ssm_ratio,
        drop_path_rate,
    }
}

/// Upstream's factory functions in `classification/models/vmamba.py`:
/// names, dims[0], depths, vanilla (v0) or v2 family, ssm_ratio, drop_path_rate.
#[rustfmt::skip]
const PRESETS: &[Preset] = &[
    preset(&["vanilla-tiny", "vanilla_vmamba_tiny", "vssmtiny_dp01"], 96, [2, 2, 9, 2], true, 2.0, 0.2),
    preset(&["vanilla-small", "vanilla_vmamba_small", "vssmsmall_dp03"], 96, [2, 2, 27, 2], true, 2.0, 0.3),
    preset(&["vanilla-base", "vanilla_vmamba_base", "vssmbase_dp06"], 128, [2, 2, 27, 2], true, 2.0, 0.6),
    preset(&["tiny-s2", "vmamba_tiny_s2l5", "vssm_tiny_0230"], 96, [2, 2, 5, 2], false, 2.0, 0.2),
    preset(&["small-s2", "vmamba_small_s2l15", "vssm_small_0229"], 96, [2, 2, 15, 2], false, 2.0, 0.3),
    preset(&["base-s2", "vmamba_base_s2l15", "vssm_base_0229"], 128, [2, 2, 15, 2], false, 2.0, 0.6),
    preset(&["tiny-s1", "vmamba_tiny_s1l8", "vssm1_tiny_0230s"], 96, [2, 2, 8, 2], false, 1.0, 0.2),
    preset(&["small-s1", "vmamba_small_s1l20", "vssm1_small_0229s"], 96, [2, 2, 20, 2], false, 1.0, 0.3),
    preset(&["base-s1", "vmamba_base_s1l20", "vssm1_base_0229s"], 128, [2, 2, 20, 2], false, 1.0, 0.5),
];
