//! # vmamba
//!
//! VMamba in Rust: the exact selective scan (S6) as a portable CubeCL kernel, and (in
//! progress) the VMamba modules for Burn. This facade re-exports the workspace crates:
//!
//! - [`selective_scan`]: the scan kernels (forward and backward) for CUDA, ROCm/HIP and WGPU,
//!   the f64 sequential reference, validation and host helpers.
//!
//! See the repository README for the backend matrix and the `cargo xtask` commands.
#![warn(missing_docs)]

pub use selective_scan;
