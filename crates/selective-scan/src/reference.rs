//! The f64 sequential reference: the specification every fast path is tested against.
//!
//! A direct transcription of the math below, one `(batch, channel, state)` at a time, in `f64`.
//!
//! Forward, with `Δ_t = softplus(delta_t + delta_bias)` (threshold 20) or `delta_t +
//! delta_bias`, and `a_t = exp(Δ_t A)`:
//! `h_t = a_t h_{t-1} + Δ_t B_t u_t` (`h_0 = 0`), `y_t = C_t · h_t + D u_t`.
//!
//! Backward for an upstream gradient `dy`, with the adjoint state
//! `ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t` (`ĥ_L = dy_L C_L`), per state `n`:
//! - `dC_t = dy_t h_t`, `dB_t = ĥ_t Δ_t u_t`, `dA = Σ_t ĥ_t Δ_t a_t h_{t-1}`;
//! - `du_t = D dy_t + Σ_n ĥ_t Δ_t B_t`, `dD = Σ_t dy_t u_t`;
//! - `dΔ_t = Σ_n ĥ_t (A a_t h_{t-1} + B_t u_t)`, then `ddelta_t = dΔ_t · softplus'(·)` (1 without
//!   softplus) and `ddelta_bias = Σ_{batch, t} ddelta_t`;
//! - groups: `dB`, `dC` sum over the channels of their group.
//!
//! It stores the states of one channel (`O(L·N)`), which
//! is fine for an oracle and is exactly what the kernels avoid.

use crate::{ScanGrads, ScanProblem, ScanShape};

/// A scan problem in `f64`, for the reference and for finite differences; shapes as in
/// [`ScanProblem`].
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct Problem64 {
    pub shape: ScanShape,
    pub u: Vec<f64>,
    pub delta: Vec<f64>,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub c: Vec<f64>,
    pub d: Option<Vec<f64>>,
    pub delta_bias: Option<Vec<f64>>,
    pub delta_softplus: bool,
}

impl From<&ScanProblem> for Problem64 {
    fn from(p: &ScanProblem) -> Self {
        let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        Self {
            shape: p.shape,
            u: widen(&p.u),
            delta: widen(&p.delta),
            a: widen(&p.a),
            b: widen(&p.b),
            c: widen(&p.c),
            d: p.d.as_deref().map(widen),
            delta_bias: p.delta_bias.as_deref().map(widen),
            delta_softplus: p.delta_softplus,
        }
    }
}

/// `softplus` with mamba's threshold-20 rule: `x` itself above 20, `ln(1 + e^x)` otherwise.
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// Derivative of [`softplus`]: the logistic sigmoid below the threshold, 1 above it.
pub fn softplus_grad(x: f64) -> f64 {
    if x > 20.0 {
        1.0
    } else {
        1.0 / (1.0 + (-x).exp())
    }
}

struct Indexer {
    channels: usize,
    seq_len: usize,
    groups: usize,
    d_state: usize,
    channels_per_group: usize,
}

impl Indexer {
    fn bdl(&self, b: usize, d: usize, t: usize) -> usize {
        (b * self.channels + d) * self.seq_len + t
    }
    fn bgnl(&self, b: usize, d: usize, n: usize, t: usize) -> usize {
        let g = d / self.channels_per_group;
        ((b * self.groups + g) * self.d_state + n) * self.seq_len + t
    }
}

fn indexer(p: &Problem64) -> Indexer {
    let s = p.shape;
    Indexer {
        channels: s.channels,
        seq_len: s.seq_len,
        groups: s.groups,
        d_state: s.d_state,
        channels_per_group: s.channels_per_group(),
    }
}

/// Pre-activation `delta + delta_bias` and `Δ` for one position.
fn step(p: &Problem64, ix: usize, d: usize) -> (f64, f64) {
    let bias = p.delta_bias.as_ref().map_or(0.0, |v| v[d]);
    let x = p.delta[ix] + bias;
    let dt = if p.delta_softplus { softplus(x) } else { x };
    (x, dt)
}

/// Forward: `y [batch, channels, seq_len]`, with `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t` and
/// `y_t = C_t·h_t + D u_t`, `h_{-1} = 0`.
pub fn forward(p: &ScanProblem) -> Vec<f64> {
    forward64(&p.into())
}

/// [`forward`] on an `f64` problem.
pub fn forward64(p: &Problem64) -> Vec<f64> {
    let s = p.shape;
    let ix = indexer(p);
    let mut y = vec![0.0; s.bdl_len()];
    for b in 0..s.batch {
        for d in 0..s.channels {
            let skip = p.d.as_ref().map_or(0.0, |v| v[d]);
            for t in 0..s.seq_len {
                y[ix.bdl(b, d, t)] = skip * p.u[ix.bdl(b, d, t)];
            }
            for n in 0..s.d_state {
                let a = p.a[d * s.d_state + n];
                let mut h = 0.0;
                for t in 0..s.seq_len {
                    let i = ix.bdl(b, d, t);
                    let (_, dt) = step(p, i, d);
                    let j = ix.bgnl(b, d, n, t);
                    h = (dt * a).exp() * h + dt * p.b[j] * p.u[i];
                    y[i] += p.c[j] * h;
                }
            }
        }
    }
    y
}

/// Backward: the output `y` and the gradients of `Σ dy ⊙ y` with respect to every input.
///
/// `dy` has shape `[batch, channels, seq_len]`. Uses the adjoint recurrence
/// `ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t` and the formulas of the module doc.
pub fn backward(p: &ScanProblem, dy: &[f32]) -> (Vec<f64>, ScanGrads<f64>) {
    let dy: Vec<f64> = dy.iter().map(|&x| f64::from(x)).collect();
    backward64(&p.into(), &dy)
}

/// [`backward`] on an `f64` problem and upstream gradient.
pub fn backward64(p: &Problem64, dy: &[f64]) -> (Vec<f64>, ScanGrads<f64>) {
    let y = forward64(p);
    let s = p.shape;
    let ix = indexer(p);
    let mut g = ScanGrads {
        du: vec![0.0; s.bdl_len()],
        ddelta: vec![0.0; s.bdl_len()],
        da: vec![0.0; s.channels * s.d_state],
        db: vec![0.0; s.bgnl_len()],
        dc: vec![0.0; s.bgnl_len()],
        dd: p.d.as_ref().map(|_| vec![0.0; s.channels]),
        ddelta_bias: p.delta_bias.as_ref().map(|_| vec![0.0; s.channels]),
    };
    let l = s.seq_len;
    let mut h = vec![0.0; l];
    let mut dt = vec![0.0; l];
    let mut pre = vec![0.0; l];
    let mut a_t = vec![0.0; l];
    for b in 0..s.batch {
        for d in 0..s.channels {
            let skip = p.d.as_ref().map_or(0.0, |v| v[d]);
            // dΔ (post-softplus), summed over n.
            let mut d_dt = vec![0.0; l];
            for t in 0..l {
                let i = ix.bdl(b, d, t);
                (pre[t], dt[t]) = step(p, i, d);
                g.du[i] = skip * dy[i];
                if let Some(dd) = &mut g.dd {
                    dd[d] += dy[i] * p.u[i];
                }
            }
            for n in 0..s.d_state {
                let a = p.a[d * s.d_state + n];
                let mut state = 0.0;
                for t in 0..l {
                    let i = ix.bdl(b, d, t);
                    let j = ix.bgnl(b, d, n, t);
                    a_t[t] = (dt[t] * a).exp();
                    state = a_t[t] * state + dt[t] * p.b[j] * p.u[i];
                    h[t] = state;
                }
                let mut adj = 0.0;
                for t in (0..l).rev() {
                    let i = ix.bdl(b, d, t);
                    let j = ix.bgnl(b, d, n, t);
                    let next_a = if t + 1 < l { a_t[t + 1] } else { 0.0 };
                    adj = next_a * adj + dy[i] * p.c[j];
                    let h_prev = if t > 0 { h[t - 1] } else { 0.0 };
                    let (u, bj) = (p.u[i], p.b[j]);
                    g.du[i] += adj * dt[t] * bj;
                    d_dt[t] += adj * (bj * u + a * a_t[t] * h_prev);
                    g.da[d * s.d_state + n] += adj * dt[t] * a_t[t] * h_prev;
                    g.db[j] += adj * dt[t] * u;
                    g.dc[j] += dy[i] * h[t];
                }
            }
            for t in 0..l {
                let i = ix.bdl(b, d, t);
                let chain = if p.delta_softplus {
                    softplus_grad(pre[t])
                } else {
                    1.0
                };
                g.ddelta[i] = d_dt[t] * chain;
                if let Some(db) = &mut g.ddelta_bias {
                    db[d] += g.ddelta[i];
                }
            }
        }
    }
    (y, g)
}

/// Floor of [`Deviation::elementwise`], as a fraction of `max |ref|`.
pub const ELEMENT_FLOOR: f64 = 0.1;

/// How far a result is from the reference, by two measures; every comparison in the tests and
/// in `xtask parity` asserts the larger ([`Deviation::worst`]) against its tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deviation {
    /// `max |x − ref| / max |ref|` (the absolute error when the reference is all zeros).
    pub max_rel: f64,
    /// `max_i |x_i − ref_i| / (|ref_i| + ELEMENT_FLOOR · max |ref|)`: every element relative to
    /// itself, down to a floor of 10 % of the largest (below it, an absolute bound). It sees a
    /// small row that is wrong (one channel's `dA`, a long-memory channel's `dB`), which
    /// `max_rel` lets through. The floor is what f32 arithmetic can meet: a running sum over
    /// thousands of steps has an absolute error proportional to the sum of magnitudes, so its
    /// elements near zero crossings are not accurate relative to themselves.
    pub elementwise: f64,
}

impl Deviation {
    /// The larger of the two measures.
    pub fn worst(&self) -> f64 {
        self.max_rel.max(self.elementwise)
    }
}

/// The [`Deviation`] of `actual` from `expected`. NaN anywhere, or a length mismatch, is an
/// infinite deviation, never a pass.
pub fn deviation<T: Copy + Into<f64>>(actual: &[T], expected: &[f64]) -> Deviation {
    if actual.len() != expected.len() {
        return Deviation {
            max_rel: f64::INFINITY,
            elementwise: f64::INFINITY,
        };
    }
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let floor = ELEMENT_FLOOR * scale;
    let worse = |m: f64, r: f64| if r.is_nan() { f64::INFINITY } else { m.max(r) };
    let (mut abs, mut elementwise) = (0.0f64, 0.0f64);
    for (a, e) in actual.iter().zip(expected) {
        let d = ((*a).into() - e).abs();
        abs = worse(abs, d);
        let bound = e.abs() + floor;
        elementwise = worse(elementwise, if bound > 0.0 { d / bound } else { d });
    }
    Deviation {
        max_rel: if scale > 0.0 { abs / scale } else { abs },
        elementwise,
    }
}
