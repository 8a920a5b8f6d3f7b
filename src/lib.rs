//! # vmamba
//!
//! VMamba in Rust: the exact selective scan (S6) as a portable CubeCL kernel, a differentiable
//! Burn op on every backend, and (in progress) the VMamba modules. This facade re-exports the
//! workspace crates:
//!
//! - [`selective_scan`]: the scan kernels (forward and backward) for CUDA, ROCm/HIP and WGPU,
//!   the native CPU scan, the f64 sequential reference, validation and host helpers.
//! - [`burn_vmamba`]: the Burn layer: `selective_scan` on any backend with autodiff.
//!
//! See the repository README for the backend matrix and the `cargo xtask` commands.
#![warn(missing_docs)]

pub use burn_vmamba;
pub use selective_scan;
