//! # selective-scan
//!
//! The exact selective scan (S6) of Mamba and VMamba, forward and backward, as a parallel
//! associative scan written once in [CubeCL](cubecl) and run on any `cubecl::Runtime`: WGPU
//! (Vulkan, Metal, DX12), CUDA and ROCm/HIP. No Burn dependency; the Burn layer builds on it.
//!
//! ## The recurrence
//!
//! For every batch `b`, channel `d` and state `n`, in f32 whatever the input dtype:
//!
//! ```text
//! Δ_t = softplus(delta_t + delta_bias_d)      (threshold 20: x itself above 20; optional)
//! a_t = exp(Δ_t · A[d, n])
//! b_t = Δ_t · B[b, g, n, t] · u_t              (g = d / (D / G))
//! h_t = a_t · h_{t-1} + b_t,   h_{-1} = 0
//! y_t = Σ_n C[b, g, n, t] · h_t + D_d · u_t
//! ```
//!
//! Notation: `Bt` batch, `D` channels, `L` sequence length, `N` state size, `G` groups of
//! `B`/`C`; `Δ` (`delta`) the step, `a`/`b` the affine step `h ↦ a·h + b`, `ĥ` the adjoint state.
//!
//! ## Parallel form
//!
//! Affine maps compose associatively: `(a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)`, earlier
//! element on the left. The kernels cut `L` into chunks of `units · items` positions (default
//! 128 × 4 = 512). Unit `j` owns positions `j·items ..` of a chunk in registers and scans them
//! sequentially, for `channels` channels of one group at once (default 2, sharing each load of
//! `B`/`C`); the states are taken `states` at a time (default 2), and one cube-wide scan
//! combines the unit aggregates of all channels and states of such a pass ([`kernel::block`]);
//! each unit then replays its segment from its prefix. Chunks are carried sequentially; the state at each chunk
//! end is saved (`[Bt, D, n_chunks, N]`) and the backward recomputes within chunks, as mamba
//! does. Memory is `O(Bt·D·L)`: nothing of shape `[Bt, D, L, N]` exists.
//!
//! The backward runs the adjoint backwards as a reverse scan with the same operator (on
//! `z_t = a_t ĥ_t`, whose step needs only position `t`'s decay), and sums group gradients (`dB`,
//! `dC`) and batch gradients (`dA`, `dD`, `ddelta_bias`) in a fixed order: no float atomics,
//! identical inputs give identical bits. The cube-wide scans and sums use plane (warp) shuffles
//! where the device has plane operations (one barrier per scan; any plane width that divides
//! `units`: 32 on NVIDIA, 64 on AMD CDNA) and shared memory where it has none (WGPU on CPU
//! adapters); [`Planes`] overrides the choice.
//!
//! ## Contract
//!
//! The recurrence must not expand (`Δ·A ≤ 0`: `A ≤ 0`, and `delta + delta_bias ≥ 0` without
//! softplus), or the chunk products overflow: refused as [`ScanError::Expanding`] wherever the
//! values are on the host ([`check_non_expanding`]). The kernels index with 32 bits: larger
//! problems are refused as [`ScanError::TooLarge`] ([`check_index_range`]). `exp(Δ·A)` is
//! computed so that a decay within 1e-5 of 1 stays exact to f32 rounding on every runtime
//! ([`kernel::block::decay_exp`](fn@kernel::block::decay_exp)). The repository's `docs/scan.md` derives all of this.
//!
//! ## Where things are
//! - [`reference`](mod@reference): the f64 sequential oracle (forward and backward).
//! - [`cpu`]: the native CPU scan (fused, rayon-parallel, f32 state).
//! - [`kernel`]: the `#[cube]` kernels; [`launch`] validates and dispatches them.
//! - [`host`]: upload/run/read for host data ([`ScanProblem`]).
//! - [`ScanError`]: every refusal names the argument and the expected vs actual value.
//! - Feature `testing`: the test scaffolding (seeded random problems `RandomSpec` /
//!   `ScanProblem::random`, `host::forward_backward_host`), as this example uses it.
//!
//! ```
//! use selective_scan::{reference, ScanProblem, ScanShape, RandomSpec};
//! let shape = ScanShape::new(1, 2, 5, 1, 1);
//! let p = ScanProblem::random(shape, &RandomSpec::default(), 7);
//! let y = reference::forward(&p);
//! assert_eq!(y.len(), 10);
//! ```
#![warn(missing_docs)]

pub mod cpu;
mod error;
pub mod fastmath;
pub mod host;
pub mod kernel;
pub mod launch;
mod problem;
pub mod reference;
mod shape;

pub use error::ScanError;
pub use launch::{
    BackwardOutput, DeviceTensor, ForwardOutput, MAX_INDEX_EXTENT, MAX_LANES_PER_SCAN, Planes,
    ScanArgs, ScanConfig, TensorRef, backward, check_index_range, forward, supports_dtype,
};
#[cfg(any(test, feature = "testing"))]
pub use problem::RandomSpec;
pub use problem::{ScanGrads, ScanProblem, SplitMix64};
pub use shape::{
    ArgShapes, MAX_D_STATE, ScanDtype, ScanShape, check_non_expanding, contiguous_strides,
};

/// Re-export of `cubecl`, so callers name the same runtime types.
pub use cubecl;
