//! Errors returned before any kernel is launched.

use core::fmt;

use crate::ScanDtype;

/// Why a selective-scan call was refused.
///
/// Contract violations (shape, dtype, groups, state size, empty tensors) name the argument and
/// the expected vs actual value. [`ScanError::Unsupported`] is a capability gap of the device,
/// distinct from a caller mistake.
#[derive(Debug, Clone, PartialEq)]
pub enum ScanError {
    /// A tensor has the wrong number of dimensions.
    Rank {
        /// Argument name (`"u"`, `"delta"`, `"A"`, ...).
        arg: &'static str,
        /// Expected layout, in words, e.g. `"[batch, channels, seq_len]"`.
        layout: &'static str,
        /// The shape that was given.
        actual: Vec<usize>,
    },
    /// A tensor's shape disagrees with the sizes inferred from the other arguments.
    Shape {
        /// Argument name.
        arg: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// The shape that was given.
        actual: Vec<usize>,
        /// Where the expected sizes come from, e.g. `"batch, channels, seq_len from u"`.
        source: &'static str,
    },
    /// A dimension that must be non-zero is zero (`L = 0`, no channels, no batch, no state).
    Empty {
        /// Argument name.
        arg: &'static str,
        /// Name of the zero dimension.
        dim: &'static str,
        /// The shape that was given.
        actual: Vec<usize>,
    },
    /// The number of B/C groups does not divide the number of channels.
    Groups {
        /// Channels `D` (from `u`).
        channels: usize,
        /// Groups `G` (from `B`).
        groups: usize,
    },
    /// `d_state` exceeds the supported maximum.
    StateSize {
        /// `N` (from `A`).
        d_state: usize,
        /// The supported maximum.
        max: usize,
    },
    /// A tensor has the wrong element type.
    Dtype {
        /// Argument name.
        arg: &'static str,
        /// The element type it must have.
        expected: ScanDtype,
        /// The element type it has.
        actual: ScanDtype,
    },
    /// Strides and shape disagree, or the strided extent exceeds the buffer.
    Layout {
        /// Argument name.
        arg: &'static str,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// A host slice has the wrong length for its shape.
    Length {
        /// Argument name.
        arg: &'static str,
        /// Expected number of elements.
        expected: usize,
        /// Number of elements given.
        actual: usize,
    },
    /// The recurrence would expand somewhere (`Δ·A > 0`): `A` has a positive entry, or
    /// `Δ = delta + delta_bias` is negative with `delta_softplus` off. The chunked scans multiply
    /// decays across a chunk, which overflows to ∞ (then NaN from ∞·0) long before the
    /// sequential recurrence does, so such inputs are refused rather than computed wrong.
    Expanding {
        /// `"A"` or `"delta"` (meaning `delta + delta_bias`).
        arg: &'static str,
        /// Index of the first offending entry, when known (`[channel, state]` for `A`,
        /// `[batch, channel, t]` for `delta`).
        at: Option<Vec<usize>>,
        /// The offending value (the largest `A`, or the smallest `delta + delta_bias`, when
        /// `at` is unknown).
        value: f64,
    },
    /// A tensor exceeds the kernels' 32-bit index range.
    TooLarge {
        /// The tensor (an argument or an intermediate buffer).
        arg: &'static str,
        /// Its extent in elements (the last reachable index + 1).
        elements: u128,
        /// The largest extent the kernels index.
        max: u128,
    },
    /// The launch configuration is invalid for this device.
    Config {
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// The device cannot run this request (capability gap, not a caller error).
    Unsupported {
        /// What is missing.
        detail: String,
    },
    /// The runtime reported an error while running or reading back.
    Runtime {
        /// The runtime's message.
        detail: String,
    },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Rank {
                arg,
                layout,
                actual,
            } => write!(
                f,
                "selective_scan: `{arg}` must have {} dimensions {layout}, got shape {actual:?}",
                layout.matches(',').count() + 1
            ),
            ScanError::Shape {
                arg,
                expected,
                actual,
                source,
            } => write!(
                f,
                "selective_scan: `{arg}` must have shape {expected:?} ({source}), got {actual:?}"
            ),
            ScanError::Empty { arg, dim, actual } => write!(
                f,
                "selective_scan: `{arg}` has {dim} = 0 (shape {actual:?}); every dimension must be at least 1"
            ),
            ScanError::Groups { channels, groups } => write!(
                f,
                "selective_scan: groups G = {groups} (dim 1 of `B`/`C`) must divide channels D = {channels} (dim 1 of `u`)"
            ),
            ScanError::StateSize { d_state, max } => write!(
                f,
                "selective_scan: d_state N = {d_state} (dim 1 of `A`) exceeds the maximum {max}"
            ),
            ScanError::Dtype {
                arg,
                expected,
                actual,
            } => write!(
                f,
                "selective_scan: `{arg}` must have dtype {expected:?}, got {actual:?}"
            ),
            ScanError::Layout { arg, detail } => {
                write!(f, "selective_scan: `{arg}` has an invalid layout: {detail}")
            }
            ScanError::Length {
                arg,
                expected,
                actual,
            } => write!(
                f,
                "selective_scan: `{arg}` must hold {expected} elements for its shape, got {actual}"
            ),
            ScanError::Expanding { arg, at, value } => {
                let at = at.as_ref().map_or(String::new(), |i| format!(" at {i:?}"));
                let what = if *arg == "A" {
                    format!("`A` has {value:e}{at}, above 0")
                } else {
                    format!(
                        "`delta` + `delta_bias` is {value:e}{at}, below 0 with delta_softplus off"
                    )
                };
                write!(
                    f,
                    "selective_scan: {what}; the scan needs Δ·A ≤ 0 (A ≤ 0, and Δ ≥ 0, which softplus guarantees) so that the decay exp(Δ·A) is at most 1"
                )
            }
            ScanError::TooLarge { arg, elements, max } => write!(
                f,
                "selective_scan: `{arg}` spans {elements} elements, past the kernels' 32-bit index range of {max}; split the batch or the sequence"
            ),
            ScanError::Config { detail } => write!(f, "selective_scan: invalid config: {detail}"),
            ScanError::Unsupported { detail } => {
                write!(f, "selective_scan: not supported on this device: {detail}")
            }
            ScanError::Runtime { detail } => write!(f, "selective_scan: runtime error: {detail}"),
        }
    }
}

impl std::error::Error for ScanError {}
