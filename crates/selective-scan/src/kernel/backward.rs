//! Backward selective scan: recomputes states chunk by chunk from the saved carries and runs the
//! adjoint recurrence `ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t` as a reverse associative scan.
//!
//! One cube per `(batch, group, channel block)`: the cube walks the channels of its block one
//! after another, so that the group sums of `dB`/`dC` are accumulated in a fixed order by the
//! unit that owns each position, without atomics. Blocks hold `min(N, D/G)` channels, so the
//! per-block partials `[batch, groups, blocks, d_state, seq_len]` are `O(B·D·L)`; a second
//! kernel ([`super::reduce`]) sums them over blocks, and the per-batch partials of `dA`, `dD`
//! and `ddelta_bias` over the batch, in a fixed order.
//!
//! Per chunk (last to first) and state `n`: (1) replay the forward scan from the carry of the
//! previous chunk to get `h_t` and `a_t`; (2) scan the reverse elements `(a_{t+1}, dy_t C_t)`,
//! seeded with `a_{s'}·ĥ_{s'}` from the chunk after; (3) accumulate (the formulas of [`crate::reference`])
//! `du += ĥ Δ B`, `dΔ += ĥ (B u + A a_t h_{t-1})`, `dA += ĥ Δ a_t h_{t-1}`, `dB += ĥ Δ u`,
//! `dC += dy h`.

use cubecl::prelude::*;

use super::block::{
    chunk_prefix_state, cube_inclusive_scan, cube_sum, discretize_step, discretize_step_grad,
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

    let mut s_dt = SharedMemory::<f32>::new(chunk_len);
    let mut s_u = SharedMemory::<f32>::new(chunk_len);
    let mut s_b = SharedMemory::<f32>::new(chunk_len);
    let mut s_c = SharedMemory::<f32>::new(chunk_len);
    let mut s_gy = SharedMemory::<f32>::new(chunk_len);
    let mut s_a = SharedMemory::<f32>::new(chunk_len);
    let mut s_h = SharedMemory::<f32>::new(chunk_len);
    let mut s_du = SharedMemory::<f32>::new(chunk_len);
    let mut s_ddt = SharedMemory::<f32>::new(chunk_len);
    let mut scan_a = SharedMemory::<f32>::new(units);
    let mut scan_b = SharedMemory::<f32>::new(units);
    let mut scratch = SharedMemory::<f32>::new(units);
    // a_{s'}·ĥ_{s'} at the start s' of the chunk after the current one, per n.
    let mut s_carry_rev = SharedMemory::<f32>::new(256usize);
    let mut s_da = SharedMemory::<f32>::new(256usize);

    let segment = unit * items;
    let b_row = batch * b.stride(0) + group * b.stride(1);
    let c_row = batch * c.stride(0) + group * c.stride(1);
    let part_row = (batch * groups + group) * blocks_per_group + block;
    let first_channel = group * channels_per_group + block * channels_per_block;
    let mut end_channel = first_channel + channels_per_block;
    let group_end = (group + 1) * channels_per_group;
    if end_channel > group_end {
        end_channel = group_end;
    }

    for channel in first_channel..end_channel {
        let first_in_block = channel == first_channel;
        let mut n0 = unit;
        while n0 < d_state {
            s_carry_rev[n0] = 0.0;
            s_da[n0] = 0.0;
            n0 += units;
        }
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
            let chunk_start = chunk * chunk_len;
            for j in 0..items {
                let idx = unit + j * units;
                let t = chunk_start + idx;
                let mut dt = 0.0f32;
                let mut u_t = 0.0f32;
                let mut gy = 0.0f32;
                if t < seq_len {
                    let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                    dt = discretize_step(x, softplus);
                    u_t = f32::cast_from(u[u_row + t * u.stride(2)]);
                    gy = dy[dy_row + t * dy.stride(2)];
                }
                s_dt[idx] = dt;
                s_u[idx] = u_t;
                s_gy[idx] = gy;
                // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t
                s_du[idx] = skip_d * gy;
                s_ddt[idx] = 0.0;
            }
            for n in 0..d_state {
                let a_n = a[channel * a.stride(0) + n * a.stride(1)];
                load_projections(
                    b,
                    c,
                    &mut s_b,
                    &mut s_c,
                    b_row,
                    c_row,
                    n,
                    chunk_start,
                    seq_len,
                    units,
                    items,
                );

                // (1) Replay the forward scan of this chunk from the saved carry.
                let mut h0 = 0.0f32;
                if chunk > 0 {
                    h0 = carries[(carry_row + chunk - 1) * d_state + n];
                }
                let mut h = chunk_prefix_state(
                    &s_dt,
                    &s_u,
                    &s_b,
                    &mut s_a,
                    &mut scan_a,
                    &mut scan_b,
                    a_n,
                    h0,
                    units,
                    items,
                );
                for k in 0..items {
                    let i = segment + k;
                    h = s_a[i] * h + s_dt[i] * s_b[i] * s_u[i];
                    s_h[i] = h;
                }
                // s_a and s_h of every segment are visible; scan_a/b are free again.
                sync_cube();

                // (2) Reverse scan of ĥ_t = α_t ĥ_{t+1} + dy_t C_t with α_t = a_{t+1} inside the
                // chunk; the last position takes α = 1 and the seed a_{s'}·ĥ_{s'}.
                let carry_rev = s_carry_rev[n];
                let mut rev_a = 1.0f32;
                let mut rev_b = 0.0f32;
                for kk in 0..items {
                    let i = segment + items - 1 - kk;
                    let mut alpha = 1.0f32;
                    if i + 1 < chunk_len {
                        alpha = s_a[i + 1];
                    }
                    rev_b = alpha * rev_b + s_gy[i] * s_c[i];
                    rev_a *= alpha;
                }
                if unit == units - 1 {
                    rev_b += rev_a * carry_rev;
                }
                cube_inclusive_scan(rev_a, rev_b, &mut scan_a, &mut scan_b, units, true);
                let mut adj = carry_rev;
                if unit < units - 1 {
                    adj = scan_b[unit + 1];
                }
                // Every unit has read s_carry_rev[n] before unit 0 replaces it below.
                sync_cube();

                // (3) Accumulate the gradients at this unit's positions, last to first.
                let mut da_acc = 0.0f32;
                for kk in 0..items {
                    let i = segment + items - 1 - kk;
                    let mut alpha = 1.0f32;
                    if i + 1 < chunk_len {
                        alpha = s_a[i + 1];
                    }
                    adj = alpha * adj + s_gy[i] * s_c[i];
                    let mut h_prev = h0;
                    if i > 0 {
                        h_prev = s_h[i - 1];
                    }
                    let dt = s_dt[i];
                    let a_t = s_a[i];
                    s_du[i] += adj * dt * s_b[i];
                    // a_t·h_{t-1} is read from the replayed states, never from h_t − b_t.
                    s_ddt[i] += adj * (s_b[i] * s_u[i] + a_n * a_t * h_prev);
                    da_acc += adj * dt * a_t * h_prev;
                    let t = chunk_start + i;
                    if t < seq_len {
                        let part = (part_row * d_state + n) * seq_len + t;
                        let db_t = adj * dt * s_u[i];
                        let dc_t = s_gy[i] * s_h[i];
                        if first_in_block {
                            db_part[part] = db_t;
                            dc_part[part] = dc_t;
                        } else {
                            db_part[part] += db_t;
                            dc_part[part] += dc_t;
                        }
                    }
                }
                if unit == 0 {
                    s_carry_rev[n] = s_a[0] * adj;
                }
                let da_total = cube_sum(da_acc, &mut scratch, units);
                if unit == 0 {
                    s_da[n] += da_total;
                }
            }
            sync_cube();
            for j in 0..items {
                let idx = unit + j * units;
                let t = chunk_start + idx;
                if t < seq_len {
                    let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                    let g = s_ddt[idx] * discretize_step_grad(x, softplus);
                    du[out_row + t] = s_du[idx];
                    ddelta[out_row + t] = g;
                    bias_acc += g;
                    skip_acc += s_gy[idx] * s_u[idx];
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
