//! The VMamba model: cross-scan/merge, SS2D, the VSS block and the VSSM backbone, their
//! configs and presets, upstream's initialisation, and checkpoint import.
//!
//! | file | contents |
//! |---|---|
//! | [`config`] | the variant enums and the presets of the released models |
//! | [`upstream`] | upstream's `VSSM(...)` keywords and `forward_type` strings → configs |
//! | [`conv`] | the convolutions as tensor ops, for backends whose `conv2d` is slow (NdArray) |
//! | [`cross_scan`](mod@cross_scan) | the four scan directions and their adjoint |
//! | [`ss2d`] | `Ss2dConfig` and SS2D: one `selective_scan` call with G = 4 groups |
//! | [`block`] | `VssBlockConfig`, `VssBlock`, `Mlp`, `drop_path` |
//! | [`vssm`] | `VssmConfig` (with `validate`), stem, downsamples, stages, classifier, `Vssm` |
//! | [`init`] | upstream's initialisers |
//! | [`checkpoint`] | upstream key names ↔ Burn parameters: strict loading (every problem listed), export |
//! | [`state_dict`](mod@state_dict) | the file formats: `StateDict` from `.safetensors` / `.pth`, to `.safetensors`; one float decoder |
//! | `pth` (private) | a lenient reader of `torch.save` zip files (tensors only; no code runs) |
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_vmamba::model::VssmConfig;
//!
//! let device = Default::default();
//! let config = VssmConfig::new().with_depths(vec![1, 1]).with_dims(vec![16, 32]).with_num_classes(10);
//! let model = config.init::<NdArray>(&device);
//! let images = Tensor::<NdArray, 4>::random([2, 3, 32, 48], Distribution::Default, &device);
//! assert_eq!(model.forward(images).dims(), [2, 10]);
//! ```

pub mod block;
pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod cross_scan;
pub mod init;
pub mod profile;
mod pth;
pub mod ss2d;
pub mod state_dict;
pub mod upstream;
pub mod vssm;

pub use block::VssBlockConfig;
pub use block::{Mlp, VssBlock, drop_path};
pub use checkpoint::{
    LoadError, ParameterKey, expected_keys, load_record, load_state_dict, parameter_keys,
    save_record, state_dict,
};
pub use config::{
    ConfigError, ConfigProblem, DownsampleVersion, DtRank, Gate, Layout, OutNorm,
    PatchEmbedVersion, SsmInit,
};
pub use cross_scan::{cross_merge, cross_scan};
pub use ss2d::Ss2d;
pub use ss2d::Ss2dConfig;
pub use state_dict::{FloatDtype, StateDict, StateTensor};
pub use upstream::ForwardType;
pub use vssm::VssmConfig;
pub use vssm::{
    Classifier, ConvDownsample, Downsample, InputError, PatchEmbed, PatchMerging, Stage, Vssm,
};
