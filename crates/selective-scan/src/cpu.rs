//! The native CPU scan: fused like the kernels (no `[B, D, L, N]` tensor), f32 state, parallel
//! with rayon, deterministic.
//!
//! - Forward: one task per `(batch, channel)` row; softplus for the row, then for each state `n`
//!   a vectorised pass computing `exp(Δ_t A_n)` and `Δ_t B_t u_t`, and one sequential pass
//!   `h = exp(Δ_t A_n) h + Δ_t B_t u_t`, `y_t += C_t h`. The transcendentals are
//!   [`crate::fastmath`]'s branch-free `exp`/`softplus`/`sigmoid` (≤ 3e-7 relative), which
//!   vectorise; libm's are scalar calls and were the bottleneck.
//! - Backward: one task per `(batch, group, block of 16 channels)`. For each channel: Δ and
//!   softplus' derivative (sigmoid) from one exponential; then for each state a vectorised pass
//!   for `exp(Δ_t A_n)` and `Δ_t B_t u_t`, a sequential pass replaying the states into an
//!   `L`-long buffer, a sequential backward pass for the adjoint `ĥ_t = a_{t+1} ĥ_{t+1} +
//!   dy_t C_t`, and a vectorised pass accumulating every backward formula of [`crate::reference`] (the
//!   reductions over `t` in 8 fixed lanes). Only the two recurrences are sequential.
//!   `dB`/`dC` are summed over the block's channels by the task itself and over blocks
//!   afterwards, `dA`/`dD`/`ddelta_bias` over the batch afterwards, always in the same order.
//!   The block size is fixed, not derived from the thread count, so the bits do not depend on
//!   the machine.

use rayon::prelude::*;

use crate::fastmath::{exp, softplus, softplus_sigmoid};
use crate::{ScanError, ScanGrads, ScanProblem, ScanShape};

/// Channels per backward task; fixed so results do not depend on the number of threads.
pub const CHANNELS_PER_TASK: usize = 16;

/// Borrowed, contiguous row-major f32 inputs of one scan (shapes as in [`ScanProblem`]).
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct ScanSlices<'a> {
    pub shape: ScanShape,
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: Option<&'a [f32]>,
    pub delta_bias: Option<&'a [f32]>,
    pub delta_softplus: bool,
}

impl ScanProblem {
    /// A borrowed view for [`forward`] / [`backward`].
    pub fn slices(&self) -> ScanSlices<'_> {
        ScanSlices {
            shape: self.shape,
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            delta_bias: self.delta_bias.as_deref(),
            delta_softplus: self.delta_softplus,
        }
    }
}

impl ScanSlices<'_> {
    fn validate(&self) -> Result<(), ScanError> {
        let s = &self.shape;
        let problem_like = [
            ("u", self.u.len(), s.bdl_len()),
            ("delta", self.delta.len(), s.bdl_len()),
            ("A", self.a.len(), s.channels * s.d_state),
            ("B", self.b.len(), s.bgnl_len()),
            ("C", self.c.len(), s.bgnl_len()),
            ("D", self.d.map_or(s.channels, <[f32]>::len), s.channels),
            (
                "delta_bias",
                self.delta_bias.map_or(s.channels, <[f32]>::len),
                s.channels,
            ),
        ];
        let bdl = s.bdl();
        let dn = s.dn();
        let bgnl = s.bgnl();
        let ch = [s.channels];
        ScanShape::from_args(&crate::ArgShapes {
            u: &bdl,
            delta: &bdl,
            a: &dn,
            b: &bgnl,
            c: &bgnl,
            d: self.d.map(|_| &ch[..]),
            delta_bias: self.delta_bias.map(|_| &ch[..]),
        })?;
        for (arg, actual, expected) in problem_like {
            if actual != expected {
                return Err(ScanError::Length {
                    arg,
                    expected,
                    actual,
                });
            }
        }
        crate::check_non_expanding(s, self.a, self.delta, self.delta_bias, self.delta_softplus)
    }

    /// Fills `dt` with `Δ` and `slope` with `dΔ/d(delta)` = sigmoid(delta + bias) for row
    /// `(batch, channel)` when Δ is a softplus (`slope` is left alone otherwise: it is 1). One
    /// exponential per position gives both.
    fn steps_with_slope(&self, row: usize, channel: usize, dt: &mut [f32], slope: &mut [f32]) {
        if !self.delta_softplus {
            return self.steps(row, channel, dt);
        }
        let l = self.shape.seq_len;
        let bias = self.delta_bias.map_or(0.0, |v| v[channel]);
        let delta = &self.delta[row * l..(row + 1) * l];
        for ((d, g), x) in dt.iter_mut().zip(slope.iter_mut()).zip(delta) {
            (*d, *g) = softplus_sigmoid(x + bias);
        }
    }

    /// Fills `dt` with `Δ` for row `(batch, channel)`.
    fn steps(&self, row: usize, channel: usize, dt: &mut [f32]) {
        let l = self.shape.seq_len;
        let bias = self.delta_bias.map_or(0.0, |v| v[channel]);
        let delta = &self.delta[row * l..(row + 1) * l];
        if self.delta_softplus {
            for (d, x) in dt.iter_mut().zip(delta) {
                *d = softplus(x + bias);
            }
        } else {
            for (d, x) in dt.iter_mut().zip(delta) {
                *d = x + bias;
            }
        }
    }
}

/// A zeroed buffer of `n` values for an output of the scan. A large one is fresh memory from
/// the OS (calloc maps it untouched); on Linux it is marked for transparent huge pages before
/// the first write, so filling it takes one fault per 2 MiB instead of one per 4 KiB page (on
/// C2, `[8, 384, 3136]`, the 4 KiB faults of the forward and backward outputs cost more than a
/// quarter of the whole forward+backward). Only a hint: memory and results are unchanged.
fn output_buffer(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    #[cfg(target_os = "linux")]
    advise_huge_pages(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(v: &[f32]) {
    const MIN_BYTES: usize = 8 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < MIN_BYTES {
        return;
    }
    // SAFETY: sysconf has no preconditions; madvise(MADV_HUGEPAGE) on whole pages inside this
    // live allocation only changes how the kernel backs them (contents are kept), and its
    // result is ignored because it is a hint (EINVAL where THP is compiled out).
    unsafe {
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap_or(4096);
        let start = (v.as_ptr() as usize).next_multiple_of(page);
        let end = (v.as_ptr() as usize + bytes) / page * page;
        if end > start {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// The sum of `v` in 8 interleaved lanes (vectorises; the order is fixed by the length alone,
/// so the result does not depend on the machine).
fn sum_lanes(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Forward scan: `y [batch, channels, seq_len]`.
pub fn forward(p: &ScanSlices<'_>) -> Result<Vec<f32>, ScanError> {
    p.validate()?;
    let s = p.shape;
    let (l, n_state, cpg) = (s.seq_len, s.d_state, s.channels_per_group());
    let mut y = output_buffer(s.bdl_len());
    let scratch = || [vec![0.0f32; l], vec![0.0f32; l], vec![0.0f32; l]];
    y.par_chunks_mut(l)
        .enumerate()
        .for_each_init(scratch, |[dt, a_t, bu], (row, y_row)| {
            let (batch, channel) = (row / s.channels, row % s.channels);
            let group = channel / cpg;
            p.steps(row, channel, dt);
            let u = &p.u[row * l..(row + 1) * l];
            let skip = p.d.map_or(0.0, |v| v[channel]);
            for (y, u) in y_row.iter_mut().zip(u) {
                *y = skip * u;
            }
            for n in 0..n_state {
                let a_n = p.a[channel * n_state + n];
                let base = ((batch * s.groups + group) * n_state + n) * l;
                let (b_row, c_row) = (&p.b[base..base + l], &p.c[base..base + l]);
                // Independent per t (vectorised): exp(Δ_t A), Δ_t B_t u_t.
                for ((((a, bu), d), b), u) in a_t
                    .iter_mut()
                    .zip(bu.iter_mut())
                    .zip(dt.iter())
                    .zip(b_row)
                    .zip(u)
                {
                    *a = exp(d * a_n);
                    *bu = d * b * u;
                }
                // h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;  y_t += C_t h_t
                let mut h = 0.0f32;
                for (((y, a), bu), c) in y_row.iter_mut().zip(a_t.iter()).zip(bu.iter()).zip(c_row)
                {
                    h = a * h + bu;
                    *y += c * h;
                }
            }
        });
    Ok(y)
}

/// Per-task outputs of the backward pass.
struct TaskOut {
    /// `dB`, `dC` partials of this block: `[d_state, seq_len]` each.
    db: Vec<f32>,
    dc: Vec<f32>,
    /// `dA` rows of the block's channels: `[channels_in_block, d_state]`.
    da: Vec<f32>,
    dd: Vec<f32>,
    dbias: Vec<f32>,
}

/// Backward scan for the upstream gradient `dy [batch, channels, seq_len]`.
pub fn backward(p: &ScanSlices<'_>, dy: &[f32]) -> Result<ScanGrads<f32>, ScanError> {
    p.validate()?;
    let s = p.shape;
    if dy.len() != s.bdl_len() {
        return Err(ScanError::Length {
            arg: "dy",
            expected: s.bdl_len(),
            actual: dy.len(),
        });
    }
    let (l, n_state, cpg) = (s.seq_len, s.d_state, s.channels_per_group());
    let blocks = cpg.div_ceil(CHANNELS_PER_TASK);
    let mut du = output_buffer(s.bdl_len());
    let mut ddelta = output_buffer(s.bdl_len());
    // Rows of one task are contiguous in du/ddelta: a block is ≤ 16 consecutive channels.
    let mut tasks: Vec<(usize, &mut [f32], &mut [f32])> = vec![];
    {
        let mut du_rest = &mut du[..];
        let mut dd_rest = &mut ddelta[..];
        for task in 0..s.batch * s.groups * blocks {
            let block = task % blocks;
            let width = CHANNELS_PER_TASK.min(cpg - block * CHANNELS_PER_TASK) * l;
            let (du_task, du_next) = du_rest.split_at_mut(width);
            let (dd_task, dd_next) = dd_rest.split_at_mut(width);
            tasks.push((task, du_task, dd_task));
            du_rest = du_next;
            dd_rest = dd_next;
        }
    }
    let run_task = |(task, du_task, dd_task): &mut (usize, &mut [f32], &mut [f32])| {
        let task = *task;
        let block = task % blocks;
        let bg = task / blocks;
        let (batch, group) = (bg / s.groups, bg % s.groups);
        let first = group * cpg + block * CHANNELS_PER_TASK;
        let count = CHANNELS_PER_TASK.min(cpg - block * CHANNELS_PER_TASK);
        let mut out = TaskOut {
            db: vec![0.0; n_state * l],
            dc: vec![0.0; n_state * l],
            da: vec![0.0; count * n_state],
            dd: vec![0.0; count],
            dbias: vec![0.0; count],
        };
        // Per-row scratch, reused for every channel and state of the task. `h` holds
        // h_0 = 0 and the L states after it, so `h[t]` is h_{t-1} and `h[t + 1]` is h_t.
        let mut dt = vec![0.0f32; l];
        let mut sig = vec![0.0f32; l];
        let mut a_t = vec![0.0f32; l];
        let mut h = vec![0.0f32; l + 1];
        let mut adj = vec![0.0f32; l];
        let mut ddt = vec![0.0f32; l];
        let mut term = vec![0.0f32; l];
        for k in 0..count {
            let channel = first + k;
            let row = batch * s.channels + channel;
            p.steps_with_slope(row, channel, &mut dt, &mut sig);
            let u = &p.u[row * l..(row + 1) * l];
            let gy = &dy[row * l..(row + 1) * l];
            let skip = p.d.map_or(0.0, |v| v[channel]);
            let du_row = &mut du_task[k * l..(k + 1) * l];
            // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t
            for (d, g) in du_row.iter_mut().zip(gy) {
                *d = skip * g;
            }
            ddt.iter_mut().for_each(|x| *x = 0.0);
            for n in 0..n_state {
                let a_n = p.a[channel * n_state + n];
                let base = ((batch * s.groups + group) * n_state + n) * l;
                let (b_row, c_row) = (&p.b[base..base + l], &p.c[base..base + l]);
                // Vectorised: a_t = exp(Δ_t A), and Δ_t B_t u_t (in `adj` for now).
                for (((a, bu), d), (b, u)) in a_t
                    .iter_mut()
                    .zip(adj.iter_mut())
                    .zip(dt.iter())
                    .zip(b_row.iter().zip(u))
                {
                    *a = exp(d * a_n);
                    *bu = d * b * u;
                }
                // Sequential: h_t = a_t h_{t-1} + Δ_t B_t u_t.
                let mut state = 0.0f32;
                for ((h, a), bu) in h[1..].iter_mut().zip(a_t.iter()).zip(adj.iter()) {
                    state = a * state + bu;
                    *h = state;
                }
                // Sequential, backwards: ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t.
                let mut state = 0.0f32;
                let mut next_a = 0.0f32;
                for (((adj, a), g), c) in adj.iter_mut().zip(a_t.iter()).zip(gy).zip(c_row).rev() {
                    state = next_a * state + g * c;
                    next_a = *a;
                    *adj = state;
                }
                // Vectorised: every gradient term of `reference`'s formulas at once.
                let (db, dc) = (
                    &mut out.db[n * l..(n + 1) * l],
                    &mut out.dc[n * l..(n + 1) * l],
                );
                // Every slice re-cut to exactly `l` so that the bounds checks fold away.
                let (h_prev, h_cur, adj, dt, a_t) =
                    (&h[..l], &h[1..=l], &adj[..l], &dt[..l], &a_t[..l]);
                let (b_row, u, gy) = (&b_row[..l], &u[..l], &gy[..l]);
                let (du_row, ddt, term) = (&mut du_row[..l], &mut ddt[..l], &mut term[..l]);
                let (db, dc) = (&mut db[..l], &mut dc[..l]);
                for t in 0..l {
                    let adj_dt = adj[t] * dt[t];
                    let a_h = a_t[t] * h_prev[t];
                    du_row[t] += adj_dt * b_row[t];
                    ddt[t] += adj[t] * (b_row[t] * u[t] + a_n * a_h);
                    term[t] = adj_dt * a_h;
                    db[t] += adj_dt * u[t];
                    dc[t] += gy[t] * h_cur[t];
                }
                out.da[k * n_state + n] = sum_lanes(term);
            }
            let ddelta_row = &mut dd_task[k * l..(k + 1) * l];
            if p.delta_softplus {
                for ((g, d), s) in ddelta_row.iter_mut().zip(ddt.iter()).zip(sig.iter()) {
                    *g = d * s;
                }
            } else {
                ddelta_row.copy_from_slice(&ddt);
            }
            for ((t, g), u) in term.iter_mut().zip(gy).zip(u) {
                *t = g * u;
            }
            out.dd[k] = sum_lanes(&term);
            out.dbias[k] = sum_lanes(ddelta_row);
        }
        out
    };

    // Fixed-order reductions over blocks (dB, dC) and over the batch (dA, dD, ddelta_bias), in
    // task order. The tasks run in waves and each wave's partials are folded before the next
    // starts: one partial per task would be B·D·N·L/8 floats (twice `du` at N = 16); a wave's
    // stay under a quarter of `du` (one wave, no barrier, when N is small). The order of the
    // additions, hence every bit, does not depend on the wave size.
    let mut db = vec![0.0f32; s.bgnl_len()];
    let mut dc = vec![0.0f32; s.bgnl_len()];
    let mut da = vec![0.0f32; s.channels * n_state];
    let mut dd = vec![0.0f32; s.channels];
    let mut dbias = vec![0.0f32; s.channels];
    let partial_len = 2 * n_state * l;
    let wave = (s.bdl_len() / 4 / partial_len).max(4 * rayon::current_num_threads());
    for chunk in tasks.chunks_mut(wave) {
        let outs: Vec<TaskOut> = chunk.par_iter_mut().map(run_task).collect();
        for (out, (task, _, _)) in outs.iter().zip(chunk.iter()) {
            let task = *task;
            let block = task % blocks;
            let bg = task / blocks;
            let group = bg % s.groups;
            let span = bg * n_state * l..(bg + 1) * n_state * l;
            for (acc, x) in db[span.clone()].iter_mut().zip(&out.db) {
                *acc += x;
            }
            for (acc, x) in dc[span].iter_mut().zip(&out.dc) {
                *acc += x;
            }
            let first = group * cpg + block * CHANNELS_PER_TASK;
            for (k, (skip, bias)) in out.dd.iter().zip(&out.dbias).enumerate() {
                dd[first + k] += skip;
                dbias[first + k] += bias;
                for n in 0..n_state {
                    da[(first + k) * n_state + n] += out.da[k * n_state + n];
                }
            }
        }
    }
    Ok(ScanGrads {
        du,
        ddelta,
        da,
        db,
        dc,
        dd: p.d.map(|_| dd),
        ddelta_bias: p.delta_bias.map(|_| dbias),
    })
}
