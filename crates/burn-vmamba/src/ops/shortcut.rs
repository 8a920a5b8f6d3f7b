//! The "Windows" shortcut some VMamba ports use instead of the scan, kept **only** as a negative
//! control for experiments (feature `shortcut-control`; never enabled by default, never a
//! user option of the examples).
//!
//! It drops the recurrence (the state is zero before every step) and reads `C` at the last
//! position: `y_t = Σ_n Δ_t u_t B_t[n] C_{L-1}[n] + D u_t`. Each output then depends on its own
//! token and on the last token only: no token mixing. `Δ` is preprocessed exactly as the real
//! scan does it (`softplus(delta + delta_bias)`), so that a control run differs from the real
//! one in the recurrence alone.
//!
//! While [`enable`] is on, [`crate::selective_scan`] computes this instead of the scan, on
//! every backend, with autodiff through ordinary tensor ops.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Tensor, activation, backend::Backend};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the shortcut on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether [`crate::selective_scan`] currently computes the shortcut.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The shortcut, with the shapes of [`crate::selective_scan`].
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    d: Option<Tensor<B, 1>>,
    delta_bias: Option<Tensor<B, 1>>,
    delta_softplus: bool,
) -> Tensor<B, 3> {
    let [batch, channels, len] = u.dims();
    let [_, groups, _, _] = b.dims();
    let delta = match delta_bias {
        Some(bias) => delta + bias.reshape([1, channels, 1]),
        None => delta,
    };
    let delta = if delta_softplus {
        activation::softplus(delta, 1.0)
    } else {
        delta
    };
    let c_last = c.narrow(3, len - 1, 1); // [batch, groups, N, 1]
    let bc = (b * c_last).sum_dim(2); // [batch, groups, 1, len]
    let bc = bc
        .expand([batch, groups, channels / groups, len])
        .reshape([batch, channels, len]);
    let y = delta * u.clone() * bc;
    match d {
        Some(d) => y + u * d.reshape([1, channels, 1]),
        None => y,
    }
}
