//! # vmamba
//!
//! VMamba in Rust: the exact selective scan (S6) as a portable CubeCL kernel, a differentiable
//! Burn op on every backend, and the VMamba model. This facade re-exports the
//! workspace crates:
//!
//! - [`selective_scan`]: the scan kernels (forward and backward) for CUDA, ROCm/HIP and WGPU,
//!   the native CPU scan, the f64 sequential reference, validation and host helpers.
//! - [`burn_vmamba`]: the Burn layer: `selective_scan` on any backend with autodiff, and the
//!   VMamba model (`burn_vmamba::model`: SS2D, VSS block, VSSM, configs, presets, checkpoints).
//! - [`classify`] (feature `classify`, on by default): the logic of the `classify` example (the
//!   README's main job).
//! - [`alloc`]: [`alloc::ReuseLarge`], a global allocator that keeps freed large blocks for
//!   reuse (CPU tensors above the C library's `mmap` threshold otherwise cost page faults and
//!   zeroing at every op); the command-line tools install it.
//! - [`runtime`]: CubeCL's persistent kernel cache in a per-user directory, set up by the
//!   command-line tools before a GPU runtime starts.
//! - [`train`] (feature `train`, on by default): the logic of the `train` example: burn-train's `Learner` with upstream's
//!   recipe, ImageFolder data or a synthetic long-range task, one or several devices.
//!
//! See the repository README for the backend matrix and the `cargo xtask` commands.
#![warn(missing_docs)]

pub mod alloc;
#[cfg(feature = "classify")]
pub mod classify;
pub mod runtime;
#[cfg(feature = "train")]
pub mod train;

pub use burn_vmamba;
pub use selective_scan;
