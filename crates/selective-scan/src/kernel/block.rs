//! Cube-level building blocks shared by the forward and backward kernels: the associative
//! scan of per-unit aggregates, deterministic sums, and the scan's scalar math (decay, softplus).
//! The scan and the sums have two paths chosen at compile time of the kernel: plane (warp)
//! shuffles with one barrier, where the device has plane operations, and shared memory with a
//! fixed tree otherwise (WGPU on CPU adapters).

use cubecl::prelude::*;

/// Exclusive scan across the cube of `states` affine maps per unit (one per state of the pass).
///
/// Unit `j` holds the aggregates `(agg_a[s], agg_b[s])` of its segment for state `s`; this
/// writes into `h_in[s]` the `b` of the composition of the aggregates of every unit before it in
/// scan order (units `0..j` forward, `j+1..units` with `reverse`), i.e. the state entering its
/// segment when the chunk's incoming state is folded into the first unit's aggregate. The first
/// unit in scan order gets 0. `h_in` holds `2 · states` values (the upper half is scratch).
/// Every unit of the cube must call this with the same `buffer`. `scan_a` and `scan_b` hold
/// `units · states` values each (two buffers of one slot per plane and state fit in that for
/// planes of two units or more).
///
/// With `planes`, each plane scans its units with shuffles (no barrier), the planes' totals go
/// through shared memory (one barrier), and `buffer` (0 or 1, alternating between consecutive
/// calls) selects which half of `scan_a`/`scan_b` holds them, so that no second barrier is
/// needed before the next call. Without planes (devices without plane operations, such as
/// WGPU on CPU adapters), a Hillis–Steele scan through shared memory (`2·log2(units) + 2`
/// barriers). Either way the order of every operation is fixed by the unit index: the same
/// inputs give the same bits.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn cube_exclusive_scan_states(
    agg_a: &Array<f32>,
    agg_b: &Array<f32>,
    h_in: &mut Array<f32>,
    scan_a: &mut SharedMemory<f32>,
    scan_b: &mut SharedMemory<f32>,
    buffer: usize,
    #[comptime] units: usize,
    #[comptime] states: usize,
    #[comptime] reverse: bool,
    #[comptime] planes: bool,
) {
    let unit = UNIT_POS as usize;
    if planes {
        let plane_dim = PLANE_DIM as usize;
        let lane = UNIT_POS_PLANE as usize;
        let plane = unit / plane_dim;
        let n_planes = units / plane_dim;
        let base = buffer * n_planes * states;
        #[unroll]
        for s in 0..states {
            let mut a = agg_a[s];
            let mut b = agg_b[s];
            let mut offset = 1usize;
            while offset < plane_dim {
                // The unit `offset` places earlier in scan order, composed on the left.
                let earlier_a = if reverse {
                    plane_shuffle_down(a, offset as u32)
                } else {
                    plane_shuffle_up(a, offset as u32)
                };
                let earlier_b = if reverse {
                    plane_shuffle_down(b, offset as u32)
                } else {
                    plane_shuffle_up(b, offset as u32)
                };
                let has_earlier = if reverse {
                    lane + offset < plane_dim
                } else {
                    lane >= offset
                };
                if has_earlier {
                    b += a * earlier_b;
                    a *= earlier_a;
                }
                offset *= 2;
            }
            // Inclusive within the plane; the exclusive value is the neighbour's inclusive one.
            let mut excl_a = if reverse {
                plane_shuffle_down(a, 1u32)
            } else {
                plane_shuffle_up(a, 1u32)
            };
            let mut excl_b = if reverse {
                plane_shuffle_down(b, 1u32)
            } else {
                plane_shuffle_up(b, 1u32)
            };
            let (first_lane, last_lane) = if reverse {
                (lane == plane_dim - 1, lane == 0)
            } else {
                (lane == 0, lane == plane_dim - 1)
            };
            if first_lane {
                excl_a = 1.0;
                excl_b = 0.0;
            }
            if last_lane {
                scan_a[base + plane * states + s] = a;
                scan_b[base + plane * states + s] = b;
            }
            h_in[s] = excl_b;
            h_in[states + s] = excl_a;
        }
        sync_cube();
        #[unroll]
        for s in 0..states {
            // The planes before this one in scan order, composed in that order, applied to 0.
            let mut prefix = 0.0f32;
            if reverse {
                let mut q = n_planes;
                while q > plane + 1 {
                    q -= 1;
                    prefix = scan_a[base + q * states + s] * prefix + scan_b[base + q * states + s];
                }
            } else {
                for q in 0..plane {
                    prefix = scan_a[base + q * states + s] * prefix + scan_b[base + q * states + s];
                }
            }
            // (planes before) ∘ (units before in this plane), applied to 0.
            h_in[s] = h_in[states + s] * prefix + h_in[s];
        }
    } else {
        #[unroll]
        for s in 0..states {
            scan_a[unit * states + s] = agg_a[s];
            scan_b[unit * states + s] = agg_b[s];
        }
        sync_cube();
        let mut offset = 1usize;
        while offset < units {
            let mut has_earlier = false;
            let mut partner = 0usize;
            if reverse {
                if unit + offset < units {
                    has_earlier = true;
                    partner = unit + offset;
                }
            } else if unit >= offset {
                has_earlier = true;
                partner = unit - offset;
            }
            #[unroll]
            for s in 0..states {
                h_in[s] = 1.0;
                h_in[states + s] = 0.0;
                if has_earlier {
                    h_in[s] = scan_a[partner * states + s];
                    h_in[states + s] = scan_b[partner * states + s];
                }
            }
            sync_cube();
            if has_earlier {
                #[unroll]
                for s in 0..states {
                    let a = scan_a[unit * states + s];
                    scan_b[unit * states + s] += a * h_in[states + s];
                    scan_a[unit * states + s] = a * h_in[s];
                }
            }
            sync_cube();
            offset *= 2;
        }
        let mut has_before = false;
        let mut before = 0usize;
        if reverse {
            if unit + 1 < units {
                has_before = true;
                before = unit + 1;
            }
        } else if unit > 0 {
            has_before = true;
            before = unit - 1;
        }
        #[unroll]
        for s in 0..states {
            h_in[s] = 0.0;
            if has_before {
                h_in[s] = scan_b[before * states + s];
            }
        }
        sync_cube();
    }
}

/// Sum over the cube of `states` values per unit: every unit gets the totals in `totals`.
///
/// With `planes`, each plane reduces with `plane_sum`, the planes' sums go through shared
/// memory (one barrier; `buffer` alternates as for
/// [`cube_exclusive_scan_states`](fn@cube_exclusive_scan_states), which may share `scratch`)
/// and are added in plane order. Without planes, a fixed binary tree in shared memory. The
/// order of the additions is fixed either way: the same inputs give the same bits (no atomics).
/// `units` must be a power of two; `scratch` holds `units · states` values.
#[cube]
pub fn cube_sum_states(
    values: &Array<f32>,
    totals: &mut Array<f32>,
    scratch: &mut SharedMemory<f32>,
    buffer: usize,
    #[comptime] units: usize,
    #[comptime] states: usize,
    #[comptime] planes: bool,
) {
    let unit = UNIT_POS as usize;
    if planes {
        let plane_dim = PLANE_DIM as usize;
        let plane = unit / plane_dim;
        let n_planes = units / plane_dim;
        let base = buffer * n_planes * states;
        #[unroll]
        for s in 0..states {
            let total = plane_sum(values[s]);
            if UNIT_POS_PLANE == 0 {
                scratch[base + plane * states + s] = total;
            }
        }
        sync_cube();
        #[unroll]
        for s in 0..states {
            let mut total = 0.0f32;
            for q in 0..n_planes {
                total += scratch[base + q * states + s];
            }
            totals[s] = total;
        }
    } else {
        #[unroll]
        for s in 0..states {
            scratch[unit * states + s] = values[s];
        }
        sync_cube();
        // Round k adds pairs 2^k apart: unit i (a multiple of 2^(k+1)) takes unit i + 2^k.
        let mut stride = 1usize;
        while stride < units {
            if unit & (2 * stride - 1) == 0 {
                #[unroll]
                for s in 0..states {
                    scratch[unit * states + s] += scratch[(unit + stride) * states + s];
                }
            }
            sync_cube();
            stride *= 2;
        }
        #[unroll]
        for s in 0..states {
            totals[s] = scratch[s];
        }
        sync_cube();
    }
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

/// Loads `B[batch, group, n, t]` and `C[batch, group, n, t]` for the states
/// `n_first .. n_first + states` and this unit's positions `first .. first + items` into
/// registers (`r_b[s · items + k]`, `r_c[..]`), as f32; zero past the sequence or past
/// `d_state` (an identity step). No barrier: each unit reads only what it keeps.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_projections<F: Float>(
    b: &Tensor<F>,
    c: &Tensor<F>,
    r_b: &mut Array<f32>,
    r_c: &mut Array<f32>,
    b_row: usize,
    c_row: usize,
    n_first: usize,
    first: usize,
    seq_len: usize,
    d_state: usize,
    #[comptime] items: usize,
    #[comptime] states: usize,
) {
    #[unroll]
    for s in 0..states {
        let n = n_first + s;
        let mut b_stride = 0usize;
        let mut c_stride = 0usize;
        if n < d_state {
            b_stride = n * b.stride(2);
            c_stride = n * c.stride(2);
        }
        #[unroll]
        for k in 0..items {
            let t = first + k;
            let mut b_t = 0.0f32;
            let mut c_t = 0.0f32;
            if t < seq_len && n < d_state {
                b_t = f32::cast_from(b[b_row + b_stride + t * b.stride(3)]);
                c_t = f32::cast_from(c[c_row + c_stride + t * c.stride(3)]);
            }
            r_b[s * items + k] = b_t;
            r_c[s * items + k] = c_t;
        }
    }
}
