//! Cube-level building blocks shared by the forward and backward kernels: the associative
//! scan of per-unit aggregates and a deterministic sum, both through shared memory so that they
//! run on every runtime (no plane operations needed).

use cubecl::prelude::*;

/// Inclusive scan of the affine maps `h ↦ a·h + b` held one per unit, in shared memory.
///
/// Hillis–Steele: in round `k` every unit composes with the unit `2^k` places earlier, so after
/// `log2(units)` rounds `scan_a[i], scan_b[i]` hold the composition of units `0..=i`
/// (`reverse = false`) or `i..units` (`reverse = true`, where "earlier" is the higher unit).
/// The operator is `(a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)`, earlier element on the left; it
/// is not commutative, and the reverse scan keeps the same order with respect to its own
/// direction. Every unit of the cube must call this; it ends with a barrier.
#[cube]
pub fn cube_inclusive_scan(
    agg_a: f32,
    agg_b: f32,
    scan_a: &mut SharedMemory<f32>,
    scan_b: &mut SharedMemory<f32>,
    #[comptime] units: usize,
    #[comptime] reverse: bool,
) {
    let unit = UNIT_POS as usize;
    let mut a = agg_a;
    let mut b = agg_b;
    scan_a[unit] = a;
    scan_b[unit] = b;
    sync_cube();
    let mut offset = 1usize;
    while offset < units {
        // The identity (1, 0) for units with no partner in this round.
        let mut earlier_a = 1.0f32;
        let mut earlier_b = 0.0f32;
        if reverse {
            if unit + offset < units {
                earlier_a = scan_a[unit + offset];
                earlier_b = scan_b[unit + offset];
            }
        } else if unit >= offset {
            earlier_a = scan_a[unit - offset];
            earlier_b = scan_b[unit - offset];
        }
        sync_cube();
        // (earlier_a, earlier_b) ∘ (a, b) = (earlier_a·a, a·earlier_b + b)
        b += a * earlier_b;
        a *= earlier_a;
        scan_a[unit] = a;
        scan_b[unit] = b;
        sync_cube();
        offset *= 2;
    }
}

/// Sum of one value per unit, by a fixed binary tree in shared memory: the same inputs give the
/// same bits on every run (no atomics). `units` must be a power of two. Every unit of the cube
/// must call this; every unit gets the total.
#[cube]
pub fn cube_sum(value: f32, scratch: &mut SharedMemory<f32>, #[comptime] units: usize) -> f32 {
    let unit = UNIT_POS as usize;
    scratch[unit] = value;
    sync_cube();
    // Round k adds pairs 2^k apart: unit i (a multiple of 2^(k+1)) takes unit i + 2^k.
    let mut stride = 1usize;
    while stride < units {
        if unit & (2 * stride - 1) == 0 {
            scratch[unit] += scratch[unit + stride];
        }
        sync_cube();
        stride *= 2;
    }
    let total = scratch[0];
    sync_cube();
    total
}

/// Below this `|x|`, [`decay_exp`](fn@decay_exp) uses its own polynomial instead of the device's `exp`.
pub const DECAY_EXP_TAYLOR_BELOW: f32 = 0.0625;

/// `e^x` for the decay `x = Δ·A`, exact to f32 rounding for tiny `|x|` on every runtime.
///
/// A device's `exp` is accurate to a few units in the last place of its result, which is
/// harmless for one step but not for a long-memory channel (`A → 0`, the decay just below 1):
/// Mesa's llvmpipe returns `1 − 2^−24` for `|x| ≈ 1e-17`, where the true value rounds to 1, and
/// that bias compounds over thousands of steps (0.99981 instead of 1 after 3135 steps; 1–2.5 %
/// errors in `dA`, `dB`, `dC`). Fast-math `exp` on other drivers can do the same. So for
/// `|x| < 1/16` this takes the Taylor polynomial to degree 5 in Horner form (truncation
/// `x^6/720 < 1e-10` relative, and the last step `1 + x·q` rounds like a correctly rounded
/// `exp`); above, the decay shrinks the state by at least `e^(−1/16)` per step, so a one-ulp
/// bias fades within a few dozen steps and the device's `exp` is used.
#[cube]
pub fn decay_exp(x: f32) -> f32 {
    let mut e = x.exp();
    if x.abs() < DECAY_EXP_TAYLOR_BELOW {
        let mut q = x * (1.0 / 120.0) + 1.0 / 24.0;
        q = q * x + 1.0 / 6.0;
        q = q * x + 0.5;
        q = q * x + 1.0;
        e = q * x + 1.0;
    }
    e
}

/// `ln(1 + z)` for `z ≥ 0`, to a few ulp relative for any `z` given a device `ln` accurate to a
/// few ulp (Goldberg's `ln(w)·z/(w − 1)` with `w = 1 + z` rounded): `log1p` lowers to
/// `ln(1 + z)` on some runtimes (WGSL has no `log1p`), which loses every digit of a small `z`
/// (a step Δ ≈ 1e-5 would be off by 0.6 %).
#[cube]
pub fn ln_1p(z: f32) -> f32 {
    let w = 1.0 + z;
    let mut r = z;
    if w != 1.0 {
        r = w.ln() * (z / (w - 1.0));
    }
    r
}

/// `Δ = softplus(x)` with mamba's threshold-20 rule, or `x` itself when `softplus` is off.
// `softplus` is comptime and `x` is not: the two conditions cannot share one `if`.
#[allow(clippy::collapsible_if)]
#[cube]
pub fn discretize_step(x: f32, #[comptime] softplus: bool) -> f32 {
    let mut dt = x;
    if softplus {
        if x <= 20.0 {
            dt = ln_1p(x.exp());
        }
    }
    dt
}

/// `dΔ/dx` for [`discretize_step`](fn@discretize_step): the logistic sigmoid below the threshold, else 1.
#[allow(clippy::collapsible_if)]
#[cube]
pub fn discretize_step_grad(x: f32, #[comptime] softplus: bool) -> f32 {
    let mut grad = 1.0f32;
    if softplus {
        if x <= 20.0 {
            grad = 1.0 / (1.0 + (-x).exp());
        }
    }
    grad
}

/// Loads `B[batch, group, n, chunk]` and `C[batch, group, n, chunk]` into shared memory
/// (coalesced: unit `i` takes positions `i, i + units, ...`), zero past the end of the sequence,
/// then waits for the whole cube.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_projections<F: Float>(
    b: &Tensor<F>,
    c: &Tensor<F>,
    s_b: &mut SharedMemory<f32>,
    s_c: &mut SharedMemory<f32>,
    b_row: usize,
    c_row: usize,
    n: usize,
    chunk_start: usize,
    seq_len: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
) {
    let unit = UNIT_POS as usize;
    for j in 0..items {
        let idx = unit + j * units;
        let t = chunk_start + idx;
        let mut b_t = 0.0f32;
        let mut c_t = 0.0f32;
        if t < seq_len {
            b_t = f32::cast_from(b[b_row + n * b.stride(2) + t * b.stride(3)]);
            c_t = f32::cast_from(c[c_row + n * c.stride(2) + t * c.stride(3)]);
        }
        s_b[idx] = b_t;
        s_c[idx] = c_t;
    }
    sync_cube();
}

/// The forward scan of one chunk for one state, up to each unit's starting state.
///
/// Writes `a_t = exp(Δ_t A_n)` of this unit's segment into `s_a`, composes the segment into one
/// affine aggregate, scans the aggregates across the cube with the chunk's incoming state `h0`
/// folded into unit 0, and returns the state entering this unit's segment (`h0` for unit 0).
/// The caller replays its segment from there with `h = s_a[i]·h + Δ_i B_i u_i`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn chunk_prefix_state(
    s_dt: &SharedMemory<f32>,
    s_u: &SharedMemory<f32>,
    s_b: &SharedMemory<f32>,
    s_a: &mut SharedMemory<f32>,
    scan_a: &mut SharedMemory<f32>,
    scan_b: &mut SharedMemory<f32>,
    a_n: f32,
    h0: f32,
    #[comptime] units: usize,
    #[comptime] items: usize,
) -> f32 {
    let unit = UNIT_POS as usize;
    let segment = unit * items;
    // Aggregate of this unit's segment: h ↦ agg_a·h + agg_b.
    let mut agg_a = 1.0f32;
    let mut agg_b = 0.0f32;
    for k in 0..items {
        let i = segment + k;
        let a_t = decay_exp(s_dt[i] * a_n);
        s_a[i] = a_t;
        // h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
        agg_b = a_t * agg_b + s_dt[i] * s_b[i] * s_u[i];
        agg_a *= a_t;
    }
    if unit == 0 {
        agg_b += agg_a * h0;
    }
    cube_inclusive_scan(agg_a, agg_b, scan_a, scan_b, units, false);
    let mut h = h0;
    if unit > 0 {
        h = scan_b[unit - 1];
    }
    h
}
