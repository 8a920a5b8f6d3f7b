//! Backward selective scan: recomputes states chunk by chunk from the saved carries and runs the
//! adjoint recurrence backwards in time as a reverse associative scan.
//!
//! One cube per `(batch, group, channel block)`: the cube walks the channels of its block
//! `channels` at a time (a *step*; they share each load of `B` and `C`), so that the group sums
//! of `dB`/`dC` are accumulated in a fixed order by the unit that owns each position, without
//! atomics: within a step in registers (channel order), across steps in the block's partial
//! rows. Blocks hold at least `min(N, D/G)` channels, so the per-block partials
//! `[batch, groups, blocks, d_state, seq_len]` are `O(B·D·L)`; a second kernel
//! ([`super::reduce`]) sums them over blocks, and the per-batch partials of `dA`, `dD` and
//! `ddelta_bias` over the batch, in a fixed order.
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
    cube_exclusive_scan_states, cube_sum_states, decay_exp, discretize_step, discretize_step_grad,
    load_projections,
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
    #[comptime] channels: usize,
    #[comptime] planes: bool,
    #[comptime] has_skip: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
) {
    let chunk_len = units * items;
    let lanes = comptime!(channels * states);
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
    let total_channels = u.shape(1);

    // See `cube_exclusive_scan_states` for the size; the sums (of up to `2 · channels` values
    // per unit) share `scan_a` as scratch.
    let mut scan_a = SharedMemory::<f32>::new(comptime!(units * channels * states.max(2)));
    let mut scan_b = SharedMemory::<f32>::new(comptime!(units * channels * states.max(2)));
    // z = a_{s'}·ĥ_{s'} at the start s' of the chunk after the current one, and dA, per
    // channel of the step and n.
    let mut s_carry_rev = SharedMemory::<f32>::new(comptime!(channels * 256));
    let mut s_da = SharedMemory::<f32>::new(comptime!(channels * 256));

    // This unit's positions of the current chunk, per channel.
    let mut r_dt = Array::<f32>::new(comptime!(channels * items));
    let mut r_u = Array::<f32>::new(comptime!(channels * items));
    let mut r_gy = Array::<f32>::new(comptime!(channels * items));
    let mut r_du = Array::<f32>::new(comptime!(channels * items));
    let mut r_ddt = Array::<f32>::new(comptime!(channels * items));
    // Per state of the pass: B_t, C_t; per channel and state: decay a_t, replayed h_t.
    let mut r_b = Array::<f32>::new(comptime!(states * items));
    let mut r_c = Array::<f32>::new(comptime!(states * items));
    let mut r_a = Array::<f32>::new(comptime!(channels * states * items));
    let mut r_h = Array::<f32>::new(comptime!(channels * states * items));
    let mut agg_a = Array::<f32>::new(lanes);
    let mut agg_b = Array::<f32>::new(lanes);
    let mut h_in = Array::<f32>::new(comptime!(2 * lanes));
    let mut z_in = Array::<f32>::new(comptime!(2 * lanes));
    // The chunk's incoming state (first unit) and adjoint seed (last unit) of the pass.
    let mut h0 = Array::<f32>::new(lanes);
    let mut seed = Array::<f32>::new(lanes);
    let mut a_n = Array::<f32>::new(lanes);
    let mut da_acc = Array::<f32>::new(lanes);
    let mut da_total = Array::<f32>::new(lanes);
    // Per channel: Σ dΔ (raw) and Σ dy·u over this unit's positions, then over the cube.
    let mut sums = Array::<f32>::new(comptime!(2 * channels));
    let mut sum_totals = Array::<f32>::new(comptime!(2 * channels));

    let b_row = batch * b.stride(0) + group * b.stride(1);
    let c_row = batch * c.stride(0) + group * c.stride(1);
    let part_row = (batch * groups + group) * blocks_per_group + block;
    let block_start = group * channels_per_group + block * channels_per_block;
    let mut block_end = block_start + channels_per_block;
    let group_end = (group + 1) * channels_per_group;
    if block_end > group_end {
        block_end = group_end;
    }
    // Alternates the shared buffers of consecutive scans and sums (plane path).
    let mut call = 0usize;

    let mut step_start = block_start;
    while step_start < block_end {
        let first_step = step_start == block_start;
        let mut n0 = unit;
        while n0 < comptime!(channels * 256) {
            s_carry_rev[n0] = 0.0;
            s_da[n0] = 0.0;
            n0 += units;
        }
        #[unroll]
        for q in 0..comptime!(2 * channels) {
            sums[q] = 0.0;
        }
        sync_cube();

        for chunk_rev in 0..n_chunks {
            let chunk = n_chunks - 1 - chunk_rev;
            let first = chunk * chunk_len + unit * items;
            // Padding past the end, and channels past the block's end, are the identity step
            // with dy = 0: they contribute nothing and write nothing.
            #[unroll]
            for j in 0..channels {
                let channel = step_start + j;
                let mut bias = 0.0f32;
                let mut skip_d = 0.0f32;
                let mut valid = false;
                let mut u_row = 0usize;
                let mut delta_row = 0usize;
                let mut dy_row = 0usize;
                if channel < block_end {
                    valid = true;
                    u_row = batch * u.stride(0) + channel * u.stride(1);
                    delta_row = batch * delta.stride(0) + channel * delta.stride(1);
                    dy_row = batch * dy.stride(0) + channel * dy.stride(1);
                    if has_bias {
                        bias = delta_bias[channel * delta_bias.stride(0)];
                    }
                    if has_skip {
                        skip_d = skip[channel * skip.stride(0)];
                    }
                }
                #[unroll]
                for k in 0..items {
                    let t = first + k;
                    let mut dt = 0.0f32;
                    let mut u_t = 0.0f32;
                    let mut gy = 0.0f32;
                    if t < seq_len && valid {
                        let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                        dt = discretize_step(x, softplus);
                        u_t = f32::cast_from(u[u_row + t * u.stride(2)]);
                        gy = dy[dy_row + t * dy.stride(2)];
                    }
                    r_dt[j * items + k] = dt;
                    r_u[j * items + k] = u_t;
                    r_gy[j * items + k] = gy;
                    // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t
                    r_du[j * items + k] = skip_d * gy;
                    r_ddt[j * items + k] = 0.0;
                }
            }
            let mut n_first = 0usize;
            while n_first < d_state {
                // B and C of the pass's states, once for all channels of the step.
                load_projections(
                    b, c, &mut r_b, &mut r_c, b_row, c_row, n_first, first, seq_len, d_state,
                    items, states,
                );
                // (1) Replay the forward scan of this chunk from the saved carry.
                #[unroll]
                for j in 0..channels {
                    let channel = step_start + j;
                    #[unroll]
                    for s in 0..states {
                        let n = n_first + s;
                        let lane = j * states + s;
                        // States past d_state (the last pass) are the identity.
                        let mut an = 0.0f32;
                        if n < d_state && channel < block_end {
                            an = a[channel * a.stride(0) + n * a.stride(1)];
                        }
                        a_n[lane] = an;
                        let mut sa = 1.0f32;
                        let mut sb = 0.0f32;
                        #[unroll]
                        for k in 0..items {
                            let decay = decay_exp(r_dt[j * items + k] * an);
                            r_a[lane * items + k] = decay;
                            sb = decay * sb
                                + r_dt[j * items + k] * r_b[s * items + k] * r_u[j * items + k];
                            sa *= decay;
                        }
                        h0[lane] = 0.0;
                        if unit == 0 && chunk > 0 && n < d_state && channel < block_end {
                            h0[lane] = carries[((batch * total_channels + channel) * n_chunks
                                + chunk
                                - 1)
                                * d_state
                                + n];
                            sb += sa * h0[lane];
                        }
                        agg_a[lane] = sa;
                        agg_b[lane] = sb;
                    }
                }
                cube_exclusive_scan_states(
                    &agg_a,
                    &agg_b,
                    &mut h_in,
                    &mut scan_a,
                    &mut scan_b,
                    call % 2,
                    units,
                    lanes,
                    false,
                    planes,
                );
                call += 1;

                // (2) Replay h_t, then the adjoint's reverse aggregate from the last position.
                #[unroll]
                for j in 0..channels {
                    let channel = step_start + j;
                    #[unroll]
                    for s in 0..states {
                        let n = n_first + s;
                        let lane = j * states + s;
                        let mut h = h_in[lane];
                        if unit == 0 {
                            h = h0[lane];
                        }
                        // Keep the state entering the segment: h_{t-1} of the first position.
                        h_in[lane] = h;
                        #[unroll]
                        for k in 0..items {
                            h = r_a[lane * items + k] * h
                                + r_dt[j * items + k] * r_b[s * items + k] * r_u[j * items + k];
                            r_h[lane * items + k] = h;
                        }
                        let mut ra = 1.0f32;
                        let mut rb = 0.0f32;
                        #[unroll]
                        for kk in 0..items {
                            let k = items - 1 - kk;
                            // z_t = a_t z_{t+1} + a_t dy_t C_t
                            let decay = r_a[lane * items + k];
                            rb = decay * rb + decay * r_gy[j * items + k] * r_c[s * items + k];
                            ra *= decay;
                        }
                        seed[lane] = 0.0;
                        if unit == units - 1 && n < d_state && channel < block_end {
                            seed[lane] = s_carry_rev[j * 256 + n];
                            rb += ra * seed[lane];
                        }
                        agg_a[lane] = ra;
                        agg_b[lane] = rb;
                    }
                }
                cube_exclusive_scan_states(
                    &agg_a,
                    &agg_b,
                    &mut z_in,
                    &mut scan_a,
                    &mut scan_b,
                    call % 2,
                    units,
                    lanes,
                    true,
                    planes,
                );
                call += 1;

                // (3) Accumulate the gradients at this unit's positions, last to first.
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    #[unroll]
                    for kk in 0..items {
                        let k = items - 1 - kk;
                        // dB, dC summed over the step's channels in channel order.
                        let mut db_t = 0.0f32;
                        let mut dc_t = 0.0f32;
                        #[unroll]
                        for j in 0..channels {
                            let lane = j * states + s;
                            let i = lane * items + k;
                            let mut z = z_in[lane];
                            if unit == units - 1 {
                                z = seed[lane];
                            }
                            if kk > 0 {
                                // z_{t+1} of position k, left by position k + 1 below.
                                z = z_in[lanes + lane];
                            }
                            // ĥ_t = z_{t+1} + dy_t C_t
                            let adj = z + r_gy[j * items + k] * r_c[s * items + k];
                            // a_t·h_{t-1} is read from the replayed states, never from h_t − b_t.
                            let mut h_prev = h_in[lane];
                            if k > 0 {
                                h_prev = r_h[i - 1];
                            }
                            let dt = r_dt[j * items + k];
                            let a_t = r_a[i];
                            r_du[j * items + k] += adj * dt * r_b[s * items + k];
                            r_ddt[j * items + k] += adj
                                * (r_b[s * items + k] * r_u[j * items + k]
                                    + a_n[lane] * a_t * h_prev);
                            if kk == 0 {
                                da_acc[lane] = 0.0;
                            }
                            da_acc[lane] += adj * dt * a_t * h_prev;
                            db_t += adj * dt * r_u[j * items + k];
                            dc_t += r_gy[j * items + k] * r_h[i];
                            z_in[lanes + lane] = a_t * adj;
                        }
                        let t = first + k;
                        if t < seq_len && n < d_state {
                            let part = (part_row * d_state + n) * seq_len + t;
                            if first_step {
                                db_part[part] = db_t;
                                dc_part[part] = dc_t;
                            } else {
                                db_part[part] += db_t;
                                dc_part[part] += dc_t;
                            }
                        }
                    }
                    // The last unit read s_carry_rev before the scan's barrier; it reads the new
                    // value after the barrier that ends the chunk.
                    if unit == 0 && n < d_state {
                        #[unroll]
                        for j in 0..channels {
                            s_carry_rev[j * 256 + n] = z_in[lanes + j * states + s];
                        }
                    }
                }
                cube_sum_states(
                    &da_acc,
                    &mut da_total,
                    &mut scan_a,
                    call % 2,
                    units,
                    lanes,
                    planes,
                );
                call += 1;
                if unit == 0 {
                    #[unroll]
                    for j in 0..channels {
                        #[unroll]
                        for s in 0..states {
                            let n = n_first + s;
                            if n < d_state {
                                s_da[j * 256 + n] += da_total[j * states + s];
                            }
                        }
                    }
                }
                n_first += states;
            }
            #[unroll]
            for j in 0..channels {
                let channel = step_start + j;
                if channel < block_end {
                    let mut bias = 0.0f32;
                    if has_bias {
                        bias = delta_bias[channel * delta_bias.stride(0)];
                    }
                    let delta_row = batch * delta.stride(0) + channel * delta.stride(1);
                    let out_row = (batch * total_channels + channel) * seq_len;
                    #[unroll]
                    for k in 0..items {
                        let t = first + k;
                        if t < seq_len {
                            let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                            let g = r_ddt[j * items + k] * discretize_step_grad(x, softplus);
                            du[out_row + t] = r_du[j * items + k];
                            ddelta[out_row + t] = g;
                            sums[j] += g;
                            sums[channels + j] += r_gy[j * items + k] * r_u[j * items + k];
                        }
                    }
                }
            }
            sync_cube();
        }
        // Per channel of the step: dA rows, then Σ dΔ (for ddelta_bias) and Σ dy·u (for D).
        let mut n1 = unit;
        while n1 < d_state {
            #[unroll]
            for j in 0..channels {
                let channel = step_start + j;
                if channel < block_end {
                    da_part[(batch * total_channels + channel) * d_state + n1] = s_da[j * 256 + n1];
                }
            }
            n1 += units;
        }
        if has_bias || has_skip {
            cube_sum_states(
                &sums,
                &mut sum_totals,
                &mut scan_a,
                call % 2,
                units,
                comptime!(2 * channels),
                planes,
            );
            call += 1;
            if unit == 0 {
                #[unroll]
                for j in 0..channels {
                    let channel = step_start + j;
                    if channel < block_end {
                        if has_bias {
                            dbias_part[batch * total_channels + channel] = sum_totals[j];
                        }
                        if has_skip {
                            dskip_part[batch * total_channels + channel] = sum_totals[channels + j];
                        }
                    }
                }
            }
        }
        sync_cube();
        step_start += channels;
    }
}
