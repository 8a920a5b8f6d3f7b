//! Forward selective scan: one cube per `(batch, block of channels of one group)`, parallel
//! along the sequence.
//!
//! The sequence is cut into chunks of `units · items` positions; unit `j` owns the `items`
//! consecutive positions `j·items ..` of every chunk and keeps their values in registers, for
//! the `channels` channels of its cube at once (they share the group's `B` and `C`, which are
//! loaded once for all of them). Per chunk, the states are taken `states` at a time (a *pass*):
//! for each channel and state of the pass every unit composes its positions into one affine
//! aggregate, one cube-wide exclusive scan handles all `channels · states` aggregates together
//! ([`cube_exclusive_scan_states`](fn@super::block::cube_exclusive_scan_states)), and every
//! unit replays its positions from its incoming state to accumulate `y_t`. The state at the end
//! of the chunk is the carry into the next chunk, and is saved for the backward pass
//! (`carries [batch, channels, n_chunks, d_state]`): nothing of size `L·N` is stored.

use cubecl::prelude::*;

use super::block::{cube_exclusive_scan_states, decay_exp, discretize_step, load_projections};

/// Forward kernel. Launch with `CubeCount(groups · blocks_per_group, batch, 1)` and
/// `CubeDim(units)`, `blocks_per_group = ⌈(D/G) / channels⌉`.
///
/// # Shapes
/// - `u, delta`: `[batch, channels, seq_len]` (any strides)
/// - `a`: `[channels, d_state]`; `b, c`: `[batch, groups, d_state, seq_len]`
/// - `skip, delta_bias`: `[channels]` (read only when `has_skip` / `has_bias`)
/// - `y`: `[batch, channels, seq_len]`; `carries`: `[batch, channels, n_chunks, d_state]`
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn scan_forward_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    a: &Tensor<f32>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    y: &mut Tensor<f32>,
    carries: &mut Tensor<f32>,
    seq_len: u32,
    d_state: u32,
    channels_per_group: u32,
    n_chunks: u32,
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
    let channels_per_group = channels_per_group as usize;
    // Written out: `div_ceil` is not among the operations the `#[cube]` macro expands.
    #[allow(clippy::manual_div_ceil)]
    let blocks_per_group = (channels_per_group + channels - 1) / channels;
    let group = CUBE_POS_X as usize / blocks_per_group;
    let first_channel =
        group * channels_per_group + (CUBE_POS_X as usize % blocks_per_group) * channels;
    let group_end = (group + 1) * channels_per_group;
    let batch = CUBE_POS_Y as usize;
    let unit = UNIT_POS as usize;
    let seq_len = seq_len as usize;
    let d_state = d_state as usize;
    let n_chunks = n_chunks as usize;
    let total_channels = u.shape(1);

    // See `cube_exclusive_scan_states` for the size.
    let mut scan_a = SharedMemory::<f32>::new(comptime!(units * channels * states));
    let mut scan_b = SharedMemory::<f32>::new(comptime!(units * channels * states));
    // The state h at the end of the previous chunk, per channel and n (read by the first unit).
    let mut s_carry = SharedMemory::<f32>::new(comptime!(channels * 256));

    // This unit's positions of the current chunk, per channel.
    let mut r_dt = Array::<f32>::new(comptime!(channels * items));
    let mut r_u = Array::<f32>::new(comptime!(channels * items));
    let mut r_y = Array::<f32>::new(comptime!(channels * items));
    // Per state of the pass: B_t, C_t; per channel and state: the decay a_t.
    let mut r_b = Array::<f32>::new(comptime!(states * items));
    let mut r_c = Array::<f32>::new(comptime!(states * items));
    let mut r_a = Array::<f32>::new(comptime!(channels * states * items));
    let mut agg_a = Array::<f32>::new(lanes);
    let mut agg_b = Array::<f32>::new(lanes);
    let mut h_in = Array::<f32>::new(comptime!(2 * lanes));
    // The first unit's copy of the incoming carries of the pass.
    let mut h0 = Array::<f32>::new(lanes);

    let mut n0 = unit;
    while n0 < comptime!(channels * 256) {
        s_carry[n0] = 0.0;
        n0 += units;
    }
    sync_cube();

    let b_row = batch * b.stride(0) + group * b.stride(1);
    let c_row = batch * c.stride(0) + group * c.stride(1);
    let mut pass = 0usize;

    for chunk in 0..n_chunks {
        let first = chunk * chunk_len + unit * items;
        // Padding past the end, and channels past the group's end, are the identity step
        // (Δ = 0 gives a = 1, b = 0) and write nothing.
        #[unroll]
        for j in 0..channels {
            let channel = first_channel + j;
            let mut bias = 0.0f32;
            let mut skip_d = 0.0f32;
            let mut valid = false;
            let mut u_row = 0usize;
            let mut delta_row = 0usize;
            if channel < group_end {
                valid = true;
                u_row = batch * u.stride(0) + channel * u.stride(1);
                delta_row = batch * delta.stride(0) + channel * delta.stride(1);
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
                if t < seq_len && valid {
                    let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
                    dt = discretize_step(x, softplus);
                    u_t = f32::cast_from(u[u_row + t * u.stride(2)]);
                }
                r_dt[j * items + k] = dt;
                r_u[j * items + k] = u_t;
                r_y[j * items + k] = skip_d * u_t;
            }
        }
        let mut n_first = 0usize;
        while n_first < d_state {
            // B and C of the pass's states, once for all channels of the cube.
            load_projections(
                b, c, &mut r_b, &mut r_c, b_row, c_row, n_first, first, seq_len, d_state, items,
                states,
            );
            #[unroll]
            for j in 0..channels {
                let channel = first_channel + j;
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    let lane = j * states + s;
                    // States past d_state (the last pass) are the identity and write nothing.
                    let mut an = 0.0f32;
                    if n < d_state && channel < group_end {
                        an = a[channel * a.stride(0) + n * a.stride(1)];
                    }
                    let mut sa = 1.0f32;
                    let mut sb = 0.0f32;
                    #[unroll]
                    for k in 0..items {
                        let decay = decay_exp(r_dt[j * items + k] * an);
                        r_a[lane * items + k] = decay;
                        // h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
                        sb = decay * sb
                            + r_dt[j * items + k] * r_b[s * items + k] * r_u[j * items + k];
                        sa *= decay;
                    }
                    h0[lane] = 0.0;
                    if unit == 0 && n < d_state {
                        h0[lane] = s_carry[j * 256 + n];
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
                pass % 2,
                units,
                lanes,
                false,
                planes,
            );
            pass += 1;
            #[unroll]
            for j in 0..channels {
                let channel = first_channel + j;
                #[unroll]
                for s in 0..states {
                    let n = n_first + s;
                    let lane = j * states + s;
                    let mut h = h_in[lane];
                    if unit == 0 {
                        h = h0[lane];
                    }
                    #[unroll]
                    for k in 0..items {
                        h = r_a[lane * items + k] * h
                            + r_dt[j * items + k] * r_b[s * items + k] * r_u[j * items + k];
                        // y_t = C_t·h_t + D u_t
                        r_y[j * items + k] += r_c[s * items + k] * h;
                    }
                    if unit == units - 1 && n < d_state && channel < group_end {
                        // The first unit read s_carry before the scan's barrier; it reads the
                        // new value after the barrier that ends the chunk.
                        s_carry[j * 256 + n] = h;
                        carries[((batch * total_channels + channel) * n_chunks + chunk)
                            * d_state
                            + n] = h;
                    }
                }
            }
            n_first += states;
        }
        #[unroll]
        for j in 0..channels {
            let channel = first_channel + j;
            if channel < group_end {
                let y_row = (batch * total_channels + channel) * seq_len;
                #[unroll]
                for k in 0..items {
                    let t = first + k;
                    if t < seq_len {
                        y[y_row + t] = r_y[j * items + k];
                    }
                }
            }
        }
        sync_cube();
    }
}
