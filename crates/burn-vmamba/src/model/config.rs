//! The model's variants as enums (shared by the configs of SS2D, the VSS block and the VSSM
//! backbone, which live beside their modules: [`Ss2dConfig`](super::Ss2dConfig) in `ss2d.rs`,
//! [`VssBlockConfig`](super::VssBlockConfig) in `block.rs`, [`VssmConfig`] in `vssm.rs`) and
//! the presets of the released models.
//!
//! Upstream's string options (`forward_type = "v05_noz"`, `norm_layer = "ln2d"`, …) are parsed
//! once, at the edge, by [`crate::model::upstream`].

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::vssm::VssmConfig;

/// Why a config could not be made, or why it cannot build a model. `Display` gives the message:
/// one line per problem, each naming the field (or upstream keyword), what was expected and
/// what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// [`VssmConfig::preset`]: no preset has this name.
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The canonical names of the presets.
        known: Vec<&'static str>,
    },
    /// [`VssmConfig::validate`], [`VssmConfig::from_upstream`] and
    /// [`ForwardType::parse`](super::ForwardType::parse): every problem found, at once.
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`] (empty for an unknown preset).
    pub fn problems(self) -> Vec<ConfigProblem> {
        match self {
            Self::Invalid(problems) => problems,
            Self::UnknownPreset { .. } => Vec::new(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownPreset { name, known } => write!(
                f,
                "unknown preset {name:?}; expected one of {}",
                known.join(", ")
            ),
            Self::Invalid(problems) => {
                for (i, problem) in problems.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{problem}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigProblem> for ConfigError {
    /// A single problem.
    fn from(problem: ConfigProblem) -> Self {
        Self::Invalid(vec![problem])
    }
}

/// One problem of a config: the field (or upstream keyword) and what is wrong with it
/// (`"expected …, found …"`). Displayed as `field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The field of the config or the upstream keyword, e.g. `dims`, `forward_type`.
    pub field: String,
    /// What was expected and what was found.
    pub message: String,
}

impl ConfigProblem {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

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

impl VssmConfig {
    /// A released model by name: `vanilla-{tiny,small,base}`, `{tiny,small,base}-s2`
    /// (T s2l5, S/B s2l15), `{tiny,small,base}-s1` (T s1l8, S/B s1l20). Upstream's factory
    /// names (`vmamba_tiny_s1l8`, …) and checkpoint stems (`vssm1_tiny_0230s`, …) are
    /// accepted too. The error lists the known names.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let preset = PRESETS
            .iter()
            .find(|p| p.names.contains(&name))
            .ok_or_else(|| ConfigError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS.iter().map(|p| p.names[0]).collect(),
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
