//! The "Windows" shortcut some VMamba ports use instead of the scan, kept **only** as a negative
//! control for experiments (feature `shortcut-control`; never enabled by default, never a
//! user option of the examples).
//!
//! It drops the recurrence (the state is zero before every step) and reads `C` at the last
//! position: `y_t = Σ_n Δ_t u_t B_t[n] C_{L-1}[n] + D u_t`. Each output then depends on its own
//! token and on the last token only: no token mixing. `Δ` comes from the fallback's own
//! preprocessing (`softplus(delta + delta_bias)`, mamba's threshold rule), so that a control
//! run differs from the real one in the recurrence alone.
//!
//! While [`enable`] is on, [`crate::selective_scan`] computes this instead of the scan, on
//! every backend, with autodiff through ordinary tensor ops.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};

use super::ScanTensors;
use super::fallback::step_sizes;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the shortcut on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether [`crate::selective_scan`] currently computes the shortcut.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The shortcut on the inputs of [`crate::selective_scan`] (shapes already checked there; `A`
/// is not used).
pub fn forward<B: Backend>(inputs: ScanTensors<B>, delta_softplus: bool) -> Tensor<B, 3> {
    let t = |x| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(x));
    let t4 = |x| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let t1 = |x| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(x));
    let u = t(inputs.u);
    let (b, c) = (t4(inputs.b), t4(inputs.c));
    let [batch, channels, len] = u.dims();
    let [_, groups, _, _] = b.dims();
    let (_, delta) = step_sizes(t(inputs.delta), inputs.delta_bias.map(t1), delta_softplus);
    let c_last = c.narrow(3, len - 1, 1); // [batch, groups, N, 1]
    let bc = (b * c_last).sum_dim(2); // [batch, groups, 1, len]
    let bc = bc
        .expand([batch, groups, channels / groups, len])
        .reshape([batch, channels, len]);
    let y = delta * u.clone() * bc;
    match inputs.d.map(t1) {
        Some(d) => y + u * d.reshape([1, channels, 1]),
        None => y,
    }
}
