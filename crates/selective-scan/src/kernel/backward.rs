//! Backward selective scan: recomputes states chunk by chunk from the saved carries and runs the
//! adjoint recurrence backwards in time as a reverse associative scan.
//!
//! One cube per `(batch, group, channel block)`: the cube walks the channels of its block one
//! after another, so that the group sums of `dB`/`dC` are accumulated in a fixed order by the
//! unit that owns each position, without atomics. Blocks hold `min(N, D/G)` channels, so the
//! per-block partials `[batch, groups, blocks, d_state, seq_len]` are `O(B·D·L)`; a second
//! kernel ([`super::reduce`]) sums them over blocks, and the per-batch partials of `dA`, `dD`
//! and `ddelta_bias` over the batch, in a fixed order.
//!
//! As in the forward kernel, unit `j` owns positions `j·items ..` of every chunk in registers
//! and the states are taken `states` at a time. Per chunk (last to first) and pass: (1) replay
//! the forward scan from the carry of the previous chunk to get `h_t` and `a_t`; (2) scan the
//! adjoint backwards. With `ĥ_t = ∂L/∂h_t` (the formulas of [`crate::reference`]),
//! `ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t`; the kernel scans `z_t = a_t ĥ_t`, whose recurrence
//! `z_t = a_t z_{t+1} + a_t dy_t C_t` only needs the decay at its own position, so no unit
//! reads a neighbour's registers; `ĥ_t = z_{t+1} + dy_t C_t`, and the chunk's seed is `z` at
//! the first position of the chunk after. (3) accumulate `du += ĥ Δ B`,
//! `dΔ += ĥ (B u + A a_t h_{t-1})`, `dA += ĥ Δ a_t h_{t-1}`, `dB += ĥ Δ u`, `dC += dy h`.

use cubecl::prelude::*;

use super::block::{
    cube_exclusive_scan_states, cube_sum, cube_sum_states, decay_exp, discretize_step,
    discretize_step_grad,
};

/// Backward kernel. Launch with `CubeCount(blocks_per_group, groups, batch)`, `CubeDim(units)`.
///
/// # Shapes
/// - inputs as in the forward kernel; `dy`: `[batch, channels, seq_len]` (any strides)
/// - `carries`: `[batch, channels, n_chunks, d_state]` from the forward kernel
/// - `du, ddelta`: `[batch, channels, seq_len]`
/// - `db_part, dc_part`: `[batch, groups, blocks_per_group, d_state, seq_len]`
/// - `da_part`: `[batch, channels, d_state]`; `dskip_part, dbias_part`: `[batch, channels]`
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn scan_backward_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    a: &Tensor<f32>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    dy: &Tensor<f32>,
    carries: &Tensor<f32>,
    du: &mut Tensor<f32>,
    ddelta: &mut Tensor<f32>,
    db_part: &mut Tensor<f32>,
    dc_part: &mut Tensor<f32>,
    da_part: &mut Tensor<f32>,
    dskip_part: &mut Tensor<f32>,
    dbias_part: &mut Tensor<f32>,
    seq_len: u32,
    d_state: u32,
    channels_per_group: u32,
    n_chunks: u32,
    channels_per_block: u32,
    #[comptime] units: usize,
    #[comptime] items: usize,
    #[comptime] states: usize,
    #[comptime] planes: bool,
    #[comptime] has_skip: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
) {
    let chunk_len = units * items;
    let block = CUBE_POS_X as usize;
    let group = CUBE_POS_Y as usize;
    let batch = CUBE_POS_Z as usize;
    let blocks_per_group = CUBE_COUNT_X as usize;
    let groups = CUBE_COUNT_Y as usize;
    let unit = UNIT_POS as usize;
    let seq_len = seq_len as usize;
    let d_state = d_state as usize;
    let n_chunks = n_chunks as usize;
    let channels_per_group = channels_per_group as usize;
    let channels_per_block = channels_per_block as usize;
    let channels = u.shape(1);

    // See `cube_exclusive_scan_states` for the size; the sums share `scan_a` as scratch.
    let mut scan_a = SharedMemory::<f32>::new(comptime!(units * states));
    let mut scan_b = SharedMemory::<f32>::new(comptime!(units * states));
    let mut scratch = SharedMemory::<f32>::new(units);
    // z = a_{s'}·ĥ_{s'} at the start s' of the chunk after the current one, per n.
    let mut s_carry_rev = SharedMemory::<f32>::new(256usize);
    let mut s_da = SharedMemory::<f32>::new(256usize);

    // This unit's positions of the current chunk.
    let mut r_dt = Array::<f32>::new(items);
    let mut r_u = Array::<f32>::new(items);
    let mut r_gy = Array::<f32>::new(items);
    let mut r_du = Array::<f32>::new(items);
    let mut r_ddt = Array::<f32>::new(items);
    // Per state of the pass and position: decay a_t, B_t, C_t, replayed h_t.
    let mut r_a = Array::<f32>::new(states * items);
    let mut r_b = Array::<f32>::new(states * items);
    let mut r_c = Array::<f32>::new(states * items);
    let mut r_h = Array::<f32>::new(states * items);
    let mut agg_a = Array::<f32>::new(states);
    let mut agg_b = Array::<f32>::new(states);
    let mut h_in = Array::<f32>::new(2 * states);
    let mut z_in = Array::<f32>::new(2 * states);
    // The chunk's incoming state (first unit) and adjoint seed (last unit) of the pass.
    let mut h0 = Array::<f32>::new(states);
    let mut seed = Array::<f32>::new(states);
    let mut da_acc = Array::<f32>::new(states);
    let mut da_total = Array::<f32>::new(states);

    let b_row = batch * b.stride(0) + group * b.stride(1);
    let c_row = batch * c.stride(0) + group * c.stride(1);
    let part_row = (batch * groups + group) * blocks_per_group + block;
    let first_channel = group * channels_per_group + block * channels_per_block;
    let mut end_channel = first_channel + channels_per_block;
    let group_end = (group + 1) * channels_per_group;
    if end_channel > group_end {
        end_channel = group_end;
    }
    // Alternates the shared buffers of consecutive scans and sums (plane path).
    let mut call = 0usize;

    for channel in first_channel..end_channel {
        let first_in_block = channel == first_channel;
        let mut n0 = unit;
        while n0 < d_state {
            s_carry_rev[n0] = 0.0;
            s_da[n0] = 0.0;
            n0 += units;
        }
        sync_cube();
        let mut bias = 0.0f32;
        if has_bias {
            bias = delta_bias[channel * delta_bias.stride(0)];
        }
        let mut skip_d = 0.0f32;
        if has_skip {
            skip_d = skip[channel * skip.stride(0)];
        }
        let u_row = batch * u.stride(0) + channel * u.stride(1);
        let delta_row = batch * delta.stride(0) + channel * delta.stride(1);
        let dy_row = batch * dy.stride(0) + channel * dy.stride(1);
        let out_row = (batch * channels + channel) * seq_len;
        let carry_row = (batch * channels + channel) * n_chunks;
        let mut bias_acc = 0.0f32;
        let mut skip_acc = 0.0f32;

        for chunk_rev in 0..n_chunks {
            let chunk = n_chunks - 1 - chunk_rev;
            let first = chunk * chunk_len + unit * items;
            #[unroll]
            for k in 0..items {
                let t = first + k;
                let mut dt = 0.0f32;
                let mut u_t = 0.0f32;
                let mut gy = 0.0f32;
                if t < seq_len {
                    let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                    dt = discretize_step(x, softplus);
                    u_t = f32::cast_from(u[u_row + t * u.stride(2)]);
                    gy = dy[dy_row + t * dy.stride(2)];
                }
                r_dt[k] = dt;
                r_u[k] = u_t;
                r_gy[k] = gy;
                // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t
                r_du[k] = skip_d * gy;
                r_ddt[k] = 0.0;
            }
            let mut n_first = 0usize;
            while n_first < d_state {
                // (1) Replay the forward scan of this chunk from the saved carry.
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    // States past d_state (the last pass) are the identity and write nothing.
                    let mut a_n = 0.0f32;
                    let mut b_stride = 0usize;
                    let mut c_stride = 0usize;
                    if n < d_state {
                        a_n = a[channel * a.stride(0) + n * a.stride(1)];
                        b_stride = n * b.stride(2);
                        c_stride = n * c.stride(2);
                    }
                    let mut sa = 1.0f32;
                    let mut sb = 0.0f32;
                    #[unroll]
                    for k in 0..items {
                        let t = first + k;
                        let mut b_t = 0.0f32;
                        let mut c_t = 0.0f32;
                        if t < seq_len && n < d_state {
                            b_t = f32::cast_from(b[b_row + b_stride + t * b.stride(3)]);
                            c_t = f32::cast_from(c[c_row + c_stride + t * c.stride(3)]);
                        }
                        let decay = decay_exp(r_dt[k] * a_n);
                        r_a[s * items + k] = decay;
                        r_b[s * items + k] = b_t;
                        r_c[s * items + k] = c_t;
                        sb = decay * sb + r_dt[k] * b_t * r_u[k];
                        sa *= decay;
                    }
                    h0[s] = 0.0;
                    if unit == 0 && chunk > 0 && n < d_state {
                        h0[s] = carries[(carry_row + chunk - 1) * d_state + n];
                        sb += sa * h0[s];
                    }
                    agg_a[s] = sa;
                    agg_b[s] = sb;
                }
                cube_exclusive_scan_states(
                    &agg_a,
                    &agg_b,
                    &mut h_in,
                    &mut scan_a,
                    &mut scan_b,
                    call % 2,
                    units,
                    states,
                    false,
                    planes,
                );
                call += 1;

                // (2) The adjoint's reverse aggregate per state, from the last position.
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    let mut h = h_in[s];
                    if unit == 0 {
                        h = h0[s];
                    }
                    // Keep the state entering the segment: h_{t-1} of the first position.
                    h_in[s] = h;
                    #[unroll]
                    for k in 0..items {
                        h = r_a[s * items + k] * h + r_dt[k] * r_b[s * items + k] * r_u[k];
                        r_h[s * items + k] = h;
                    }
                    let mut ra = 1.0f32;
                    let mut rb = 0.0f32;
                    #[unroll]
                    for kk in 0..items {
                        let k = items - 1 - kk;
                        // z_t = a_t z_{t+1} + a_t dy_t C_t
                        let decay = r_a[s * items + k];
                        rb = decay * rb + decay * r_gy[k] * r_c[s * items + k];
                        ra *= decay;
                    }
                    seed[s] = 0.0;
                    if unit == units - 1 && n < d_state {
                        seed[s] = s_carry_rev[n];
                        rb += ra * seed[s];
                    }
                    agg_a[s] = ra;
                    agg_b[s] = rb;
                }
                cube_exclusive_scan_states(
                    &agg_a,
                    &agg_b,
                    &mut z_in,
                    &mut scan_a,
                    &mut scan_b,
                    call % 2,
                    units,
                    states,
                    true,
                    planes,
                );
                call += 1;

                // (3) Accumulate the gradients at this unit's positions, last to first.
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    let mut a_n = 0.0f32;
                    if n < d_state {
                        a_n = a[channel * a.stride(0) + n * a.stride(1)];
                    }
                    let mut z = z_in[s];
                    if unit == units - 1 {
                        z = seed[s];
                    }
                    let mut da = 0.0f32;
                    #[unroll]
                    for kk in 0..items {
                        let k = items - 1 - kk;
                        let i = s * items + k;
                        // ĥ_t = z_{t+1} + dy_t C_t
                        let adj = z + r_gy[k] * r_c[i];
                        // a_t·h_{t-1} is read from the replayed states, never from h_t − b_t.
                        let mut h_prev = h_in[s];
                        if k > 0 {
                            h_prev = r_h[i - 1];
                        }
                        let dt = r_dt[k];
                        let a_t = r_a[i];
                        r_du[k] += adj * dt * r_b[i];
                        r_ddt[k] += adj * (r_b[i] * r_u[k] + a_n * a_t * h_prev);
                        da += adj * dt * a_t * h_prev;
                        let t = first + k;
                        if t < seq_len && n < d_state {
                            let part = (part_row * d_state + n) * seq_len + t;
                            let db_t = adj * dt * r_u[k];
                            let dc_t = r_gy[k] * r_h[i];
                            if first_in_block {
                                db_part[part] = db_t;
                                dc_part[part] = dc_t;
                            } else {
                                db_part[part] += db_t;
                                dc_part[part] += dc_t;
                            }
                        }
                        z = a_t * adj;
                    }
                    // The last unit read s_carry_rev[n] before the scan's barrier; it reads the
                    // new value after the barrier that ends the chunk.
                    if unit == 0 && n < d_state {
                        s_carry_rev[n] = z;
                    }
                    da_acc[s] = da;
                }
                cube_sum_states(
                    &da_acc,
                    &mut da_total,
                    &mut scan_a,
                    call % 2,
                    units,
                    states,
                    planes,
                );
                call += 1;
                if unit == 0 {
                    #[unroll]
                    for s in 0..states {
                        let n = n_first + s;
                        if n < d_state {
                            s_da[n] += da_total[s];
                        }
                    }
                }
                n_first += states;
            }
            #[unroll]
            for k in 0..items {
                let t = first + k;
                if t < seq_len {
                    let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                    let g = r_ddt[k] * discretize_step_grad(x, softplus);
                    du[out_row + t] = r_du[k];
                    ddelta[out_row + t] = g;
                    bias_acc += g;
                    skip_acc += r_gy[k] * r_u[k];
                }
            }
            sync_cube();
        }
        let mut n1 = unit;
        while n1 < d_state {
            da_part[(batch * channels + channel) * d_state + n1] = s_da[n1];
            n1 += units;
        }
        if has_bias {
            let total = cube_sum(bias_acc, &mut scratch, units);
            if unit == 0 {
                dbias_part[batch * channels + channel] = total;
            }
        }
        if has_skip {
            let total = cube_sum(skip_acc, &mut scratch, units);
            if unit == 0 {
                dskip_part[batch * channels + channel] = total;
            }
        }
        sync_cube();
    }
}
