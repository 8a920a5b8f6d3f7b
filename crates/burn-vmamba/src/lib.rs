//! # burn-vmamba
//!
//! VMamba for [Burn](burn): the exact selective scan as a differentiable op on every backend
//! ([`ops`]), and the model built on it ([`model`]: cross-scan, SS2D, VSS block, VSSM, configs,
//! presets, upstream's initialisation and checkpoint import).
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Distribution, Tensor};
//! use burn_vmamba::selective_scan;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let (batch, channels, seq_len, d_state, groups) = (1, 4, 10, 2, 2);
//! let u = Tensor::<B, 3>::random([batch, channels, seq_len], Distribution::Default, &device).require_grad();
//! let delta = Tensor::<B, 3>::random([batch, channels, seq_len], Distribution::Default, &device);
//! let a = -Tensor::<B, 2>::ones([channels, d_state], &device);
//! let b = Tensor::<B, 4>::random([batch, groups, d_state, seq_len], Distribution::Default, &device);
//! let c = Tensor::<B, 4>::random([batch, groups, d_state, seq_len], Distribution::Default, &device);
//! let y = selective_scan(u.clone(), delta, a, b, c, None, None, true);
//! let grads = y.sum().backward();
//! assert_eq!(u.grad(&grads).unwrap().dims(), [batch, channels, seq_len]);
//! ```
//!
//! See [`ops`] for which implementation runs on which backend.
#![warn(missing_docs)]

pub mod model;
pub mod ops;

pub use ops::{ScanOptions, SelectiveScanBackend, selective_scan, try_selective_scan};
