//! The VSSM classification backbone: stem → 4 stages of (VSS blocks, downsample) →
//! classifier. Runs channel-last internally; both upstream layouts compute this function.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, Linear, PaddingConfig2d};
use burn::tensor::{Tensor, backend::Backend};

use super::block::{VssBlock, VssBlockConfig, linear_4d};
use super::config::{DownsampleVersion, DtRank, Gate, Layout, OutNorm, PatchEmbedVersion, SsmInit};
use super::conv::conv2d;
use super::init;
use super::profile;
use super::ss2d::Ss2dConfig;
use super::{ConfigError, ConfigProblem};
use crate::ops::SelectiveScanBackend;

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
}

/// The stem. v1: `conv1` (k = s = patch) → `norm1`. v2: `conv1` (→ C/2, k = patch/2 + 1,
/// s = patch/2, pad 1) → `norm1` → GELU → `conv2` (→ C, same) → `norm2`. Upstream keys
/// `patch_embed.{0, 2, 5, 7}`.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// First conv (`patch_embed.0`).
    pub conv1: Conv2d<B>,
    /// First LayerNorm (`patch_embed.2`).
    pub norm1: LayerNorm<B>,
    /// Second conv, v2 only (`patch_embed.5`).
    pub conv2: Option<Conv2d<B>>,
    /// Second LayerNorm, v2 only (`patch_embed.7`).
    pub norm2: Option<LayerNorm<B>>,
}

impl<B: SelectiveScanBackend> PatchEmbed<B> {
    /// # Shapes
    /// - `x`: `[batch, in_chans, height, width]` → `[batch, height / p, width / p, dim]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = super::block::layer_norm(&self.norm1, conv2d(&self.conv1, x).permute([0, 2, 3, 1]));
        match (&self.conv2, &self.norm2) {
            (Some(conv2), Some(norm2)) => {
                let x = super::block::gelu(x.permute([0, 3, 1, 2]));
                super::block::layer_norm(norm2, conv2d(conv2, x).permute([0, 2, 3, 1]))
            }
            _ => x,
        }
    }
}

/// Swin patch merging (downsample v1): pad H and W to even, concatenate the 2×2 neighbours
/// `x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]` → LN(4C) → Linear(4C → C').
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    /// LayerNorm over `4C`.
    pub norm: LayerNorm<B>,
    /// `[4C] → [C']`, no bias.
    pub reduction: Linear<B>,
}

impl<B: SelectiveScanBackend> PatchMerging<B> {
    /// # Shapes
    /// - `x`: `[batch, height, width, C]` → `[batch, ⌈height/2⌉, ⌈width/2⌉, C']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = pad_to_even(pad_to_even(x, 1), 2);
        let [batch, height, width, channels] = x.dims();
        let (h2, w2) = (height / 2, width / 2);
        // x[b, 2i + r, 2j + s, c] → [b, i, j, s·2 + r, c]: row offset varies first.
        let x = x
            .reshape([batch, h2, 2, w2, 2, channels])
            .permute([0, 1, 3, 4, 2, 5])
            .reshape([batch, h2, w2, 4 * channels]);
        linear_4d(&self.reduction, super::block::layer_norm(&self.norm, x))
    }
}

fn pad_to_even<B: Backend>(x: Tensor<B, 4>, axis: usize) -> Tensor<B, 4> {
    let mut dims = x.dims();
    if dims[axis].is_multiple_of(2) {
        return x;
    }
    dims[axis] = 1;
    let zeros = Tensor::zeros(dims, &x.device());
    Tensor::cat(vec![x, zeros], axis)
}

/// Conv downsample: v2 `Conv(C → C', k=2, s=2)` or v3 `Conv(C → C', k=3, s=2, pad 1)`, then
/// LN(C'). Upstream keys `downsample.1` (conv) and `downsample.3` (norm).
#[derive(Module, Debug)]
pub struct ConvDownsample<B: Backend> {
    /// The strided conv.
    pub conv: Conv2d<B>,
    /// LayerNorm over `C'`.
    pub norm: LayerNorm<B>,
}

impl<B: SelectiveScanBackend> ConvDownsample<B> {
    /// # Shapes
    /// - `x`: `[batch, height, width, C]` → `[batch, height', width', C']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = conv2d(&self.conv, x.permute([0, 3, 1, 2]));
        super::block::layer_norm(&self.norm, x.permute([0, 2, 3, 1]))
    }
}

/// One stage: its blocks, then (except the last) a downsample (upstream `layers.i`).
#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    /// The VSS blocks (`layers.i.blocks.j`).
    pub blocks: Vec<VssBlock<B>>,
    /// The downsample after the stage, if any (`layers.i.downsample`).
    pub downsample: Option<Downsample<B>>,
}

/// The downsample between two stages, by upstream's `downsample_version`.
#[derive(Module, Debug)]
pub enum Downsample<B: Backend> {
    /// v1: Swin patch merging (`downsample.{norm, reduction}`).
    Merge(PatchMerging<B>),
    /// v2/v3: strided conv → LN (`downsample.{1, 3}`).
    Conv(ConvDownsample<B>),
}

impl<B: SelectiveScanBackend> Downsample<B> {
    /// # Shapes
    /// - `x`: channel-last `[batch, height, width, channels]` → `[batch, ⌈height/2⌉,
    ///   ⌈width/2⌉, next channels]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Merge(merge) => merge.forward(x),
            Self::Conv(conv) => conv.forward(x),
        }
    }
}

/// `LN → mean over space → Linear` (upstream `classifier.{norm, head}`).
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    /// LayerNorm over the last stage's channels.
    pub norm: LayerNorm<B>,
    /// `[dims[-1]] → [num_classes]`.
    pub head: Linear<B>,
}

/// The VSSM backbone with its classifier.
#[derive(Module, Debug)]
pub struct Vssm<B: Backend> {
    /// Stem.
    pub patch_embed: PatchEmbed<B>,
    /// The stages (`layers.i`).
    pub layers: Vec<Stage<B>>,
    /// Classifier head.
    pub classifier: Classifier<B>,
}

impl VssmConfig {
    /// Checks the config's internal consistency (lengths, sizes), naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.depths.is_empty() {
            errors.push(ConfigProblem::new(
                "depths",
                "expected at least one stage, found []".to_string(),
            ));
        }
        if self.dims.len() != self.depths.len() {
            errors.push(ConfigProblem::new(
                "dims",
                format!(
                    "expected {} entries (one per stage of depths), found {}",
                    self.depths.len(),
                    self.dims.len()
                ),
            ));
        }
        if self.dims.contains(&0) {
            errors.push(ConfigProblem::new(
                "dims",
                format!("expected positive sizes, found {:?}", self.dims),
            ));
        }
        if self.patch_size == 0
            || (self.patchembed_version == PatchEmbedVersion::V2 && self.patch_size < 2)
        {
            errors.push(ConfigProblem::new(
                "patch_size",
                format!(
                    "expected ≥ 1 (≥ 2 for patch embed v2), found {}",
                    self.patch_size
                ),
            ));
        }
        if self.patchembed_version == PatchEmbedVersion::V2
            && self.dims.first().is_some_and(|d| d % 2 != 0)
        {
            errors.push(ConfigProblem::new(
                "dims[0]",
                format!("patch embed v2 needs an even width, found {}", self.dims[0]),
            ));
        }
        if self.downsample_version == DownsampleVersion::None
            && self.dims.windows(2).any(|w| w[0] != w[1])
        {
            errors.push(ConfigProblem::new(
                "dims",
                format!(
                    "without downsampling every stage must have the same width, found {:?}",
                    self.dims
                ),
            ));
        }
        if self.ssm_ratio > 0.0 && self.ssm_d_state == 0 {
            errors.push(ConfigProblem::new(
                "ssm_d_state",
                "expected ≥ 1, found 0".to_string(),
            ));
        }
        if self.ssm_ratio > 0.0 && self.ssm_d_state > selective_scan::MAX_D_STATE {
            errors.push(ConfigProblem::new(
                "ssm_d_state",
                format!(
                    "expected ≤ {}, found {}",
                    selective_scan::MAX_D_STATE,
                    self.ssm_d_state
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            errors.push(ConfigProblem::new(
                "drop_path_rate",
                format!("expected in [0, 1), found {}", self.drop_path_rate),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// Builds the model with upstream's initialisation.
    ///
    /// # Panics
    /// If [`Self::validate`] fails (the message lists every problem).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vssm<B> {
        if let Err(e) = self.validate() {
            panic!("invalid VssmConfig:\n{e}");
        }
        let ln = |d: usize| super::block::layer_norm_config(d).init(device);
        let (c, p) = (self.dims[0], self.patch_size);
        let patch_embed = match self.patchembed_version {
            PatchEmbedVersion::V1 => PatchEmbed {
                conv1: Conv2dConfig::new([self.in_chans, c], [p, p])
                    .with_stride([p, p])
                    .init(device),
                norm1: ln(c),
                conv2: None,
                norm2: None,
            },
            PatchEmbedVersion::V2 => {
                let (stride, kernel) = (p / 2, p / 2 + 1);
                let conv = |from: usize, to: usize| {
                    Conv2dConfig::new([from, to], [kernel, kernel])
                        .with_stride([stride, stride])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device)
                };
                PatchEmbed {
                    conv1: conv(self.in_chans, c / 2),
                    norm1: ln(c / 2),
                    conv2: Some(conv(c / 2, c)),
                    norm2: Some(ln(c)),
                }
            }
        };
        let stages = self.depths.len();
        let layers = (0..stages)
            .map(|i| {
                let blocks = self.blocks(i).iter().map(|b| b.init(device)).collect();
                let (dim, next) = (self.dims[i], self.dims.get(i + 1).copied());
                let conv = |kernel: usize, pad: usize, next: usize| ConvDownsample {
                    conv: Conv2dConfig::new([dim, next], [kernel, kernel])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                        .init(device),
                    norm: ln(next),
                };
                let downsample = match (self.downsample_version, next) {
                    (_, None) | (DownsampleVersion::None, _) => None,
                    (DownsampleVersion::V1, Some(next)) => Some(Downsample::Merge(PatchMerging {
                        norm: ln(4 * dim),
                        reduction: init::linear(4 * dim, next, false, device),
                    })),
                    (DownsampleVersion::V2, Some(next)) => Some(Downsample::Conv(conv(2, 0, next))),
                    (DownsampleVersion::V3, Some(next)) => Some(Downsample::Conv(conv(3, 1, next))),
                };
                Stage { blocks, downsample }
            })
            .collect();
        let features = self.dims[stages - 1];
        Vssm {
            patch_embed,
            layers,
            classifier: Classifier {
                norm: ln(features),
                head: init::linear(features, self.num_classes, true, device),
            },
        }
    }
}

/// Why a batch of images cannot go through [`Vssm::forward`]; checked from the shape alone,
/// before any work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// A dimension of `images` is zero (an empty batch is refused, not answered with `[0,
    /// classes]`: the scan's contract has every dimension at least 1).
    Empty {
        /// `"batch"`, `"height"` or `"width"`.
        dim: &'static str,
        /// The shape of `images`.
        shape: [usize; 4],
    },
    /// `images` has the wrong number of channels.
    Channels {
        /// The model's `in_chans`.
        expected: usize,
        /// Dim 1 of `images`.
        actual: usize,
        /// The shape of `images`.
        shape: [usize; 4],
    },
    /// A convolution of the stem or a downsample would leave nothing (the image is smaller
    /// than its kernel): the layer by its upstream key, its input and the image size.
    TooSmall {
        /// Upstream key of the layer (`patch_embed.0`, `layers.1.downsample.1`).
        layer: String,
        /// Height and width entering that layer.
        input: [usize; 2],
        /// The shape of `images`.
        shape: [usize; 4],
    },
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InputError::Empty { dim, shape } => write!(
                f,
                "images: {dim} is 0 (shape {shape:?}); every dimension of [batch, channels, height, width] must be at least 1"
            ),
            InputError::Channels {
                expected,
                actual,
                shape,
            } => write!(
                f,
                "images: expected {expected} channels (in_chans), found {actual} (shape {shape:?})"
            ),
            InputError::TooSmall {
                layer,
                input,
                shape,
            } => write!(
                f,
                "images of {}×{} are too small for this model: `{layer}` receives {}×{} and would output nothing (shape {shape:?})",
                shape[2], shape[3], input[0], input[1]
            ),
        }
    }
}

impl std::error::Error for InputError {}

/// Output size of `conv` for an input of `height × width`, or `None` when it would be empty.
fn conv_output<B: Backend>(conv: &Conv2d<B>, height: usize, width: usize) -> Option<[usize; 2]> {
    let (top, left, bottom, right) = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => (t, l, b, r),
        PaddingConfig2d::Valid => (0, 0, 0, 0),
        PaddingConfig2d::Same => return Some([height, width]),
    };
    let out = |len: usize, pad: usize, axis: usize| {
        let span = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1;
        (len + pad)
            .checked_sub(span)
            .map(|rest| rest / conv.stride[axis] + 1)
    };
    match (out(height, top + bottom, 0), out(width, left + right, 1)) {
        (Some(h), Some(w)) if h > 0 && w > 0 => Some([h, w]),
        _ => None,
    }
}

impl<B: Backend> Vssm<B> {
    /// Checks that [`Vssm::forward`] can run on images of `shape` `[batch, channels, height,
    /// width]`: every dimension at least 1, `in_chans` channels, and an image large enough that
    /// no convolution of the stem or of a downsample is left with nothing (with the v1 stem,
    /// height and width at least the patch size). Shape arithmetic only.
    pub fn check_input(&self, shape: [usize; 4]) -> Result<(), InputError> {
        for (dim, size) in [
            ("batch", shape[0]),
            ("height", shape[2]),
            ("width", shape[3]),
        ] {
            if size == 0 {
                return Err(InputError::Empty { dim, shape });
            }
        }
        let expected = self.patch_embed.conv1.weight.dims()[1];
        if shape[1] != expected {
            return Err(InputError::Channels {
                expected,
                actual: shape[1],
                shape,
            });
        }
        let through = |conv: &Conv2d<B>, layer: String, input: [usize; 2]| {
            conv_output(conv, input[0], input[1]).ok_or(InputError::TooSmall {
                layer,
                input,
                shape,
            })
        };
        let mut size = through(
            &self.patch_embed.conv1,
            "patch_embed.0".into(),
            [shape[2], shape[3]],
        )?;
        if let Some(conv2) = &self.patch_embed.conv2 {
            size = through(conv2, "patch_embed.5".into(), size)?;
        }
        for (i, stage) in self.layers.iter().enumerate() {
            match &stage.downsample {
                Some(Downsample::Merge(_)) => size = [size[0].div_ceil(2), size[1].div_ceil(2)],
                Some(Downsample::Conv(down)) => {
                    size = through(&down.conv, format!("layers.{i}.downsample.1"), size)?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

impl<B: SelectiveScanBackend> Vssm<B> {
    /// Logits.
    ///
    /// # Shapes
    /// - `images`: `[batch, in_chans, height, width]`
    /// - returns: `[batch, num_classes]`
    ///
    /// # Panics
    /// Before any work, with the message of [`Vssm::check_input`]'s error, when the images
    /// cannot go through the model (see [`Vssm::try_forward`]).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.try_forward(images).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Vssm::forward`], returning an [`InputError`] instead of panicking when the images
    /// cannot go through the model: an empty dimension, the wrong channel count, or an image
    /// smaller than a convolution of the stem or a downsample.
    pub fn try_forward(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 2>, InputError> {
        let device = images.device();
        let features = self.try_forward_features(images)?;
        Ok(profile::scope::<B, _>("classifier", &device, || {
            let x = super::block::layer_norm(&self.classifier.norm, features);
            let [batch, _, _, channels] = x.dims();
            let pooled = x.mean_dim(1).mean_dim(2).reshape([batch, channels]);
            self.classifier.head.forward(pooled)
        }))
    }

    /// The last stage's output, before the classifier.
    ///
    /// # Shapes
    /// - `images`: `[batch, in_chans, height, width]`
    /// - returns: `[batch, height', width', dims[-1]]` (channel-last)
    ///
    /// # Panics
    /// As [`Vssm::forward`].
    pub fn forward_features(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        self.try_forward_features(images)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Vssm::forward_features`], returning an [`InputError`] instead of panicking.
    pub fn try_forward_features(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 4>, InputError> {
        self.check_input(images.dims())?;
        let device = images.device();
        let mut x =
            profile::scope::<B, _>("patch_embed", &device, || self.patch_embed.forward(images));
        for stage in &self.layers {
            for block in &stage.blocks {
                x = block.forward(x);
            }
            if let Some(down) = &stage.downsample {
                x = profile::scope::<B, _>("downsample", &device, || down.forward(x));
            }
        }
        Ok(x)
    }
}
