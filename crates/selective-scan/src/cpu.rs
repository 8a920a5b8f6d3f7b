//! The native CPU scan: fused like the kernels (no `[B, D, L, N]` tensor), f32 state, SIMD across
//! channels, parallel with rayon, deterministic.
//!
//! # Layout: one SIMD lane per channel
//! The recurrence `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` is sequential in `t` but independent
//! across channels, so a task takes [`LANES`] = 8 consecutive channels of one `(batch, group)`
//! and runs the time loop with one channel per lane: every step is a handful of 8-wide
//! multiply-adds and one 8-wide `exp`, with no dependency between lanes. `B_t` and `C_t` are
//! shared by the group's channels and are broadcast. The task gathers its rows of `u`, `delta`
//! (and `dy`) into lane-major scratch `[L][8]` once, runs every state over it, and scatters its
//! outputs back into the `[B, D, L]` rows (8 × 8 blocks transposed with AVX shuffles where the
//! CPU has them, see `transpose`); a block with fewer than 8 channels (the group's last) fills
//! the spare lanes with zeros (`u = dy = A = 0`), which contribute exact zeros to every sum.
//! - Forward: `Δ` (softplus) per lane, then states in chunks of 4 (four independent recurrences
//!   per step for instruction-level parallelism), `y_t = D u_t + Σ_n C_{n,t} h_{n,t}` accumulated
//!   in state order.
//! - Backward, per state: replay `h` forward into an `[L + 1][8]` buffer (keeping `exp(Δ_t A)`),
//!   then one backward pass for the adjoint `ĥ_t = exp(Δ_{t+1} A) ĥ_{t+1} + dy_t C_t` that also
//!   accumulates every formula of [`crate::reference`]: `du`, `dΔ` per lane; `dB_t`, `dC_t` as
//!   the sum over the 8 lanes (a fixed pairwise tree); `dA`, `dD`, `dΔ_bias` as sums over `t` in
//!   blocks of [`SUM_BLOCK`]. `dB`/`dC` are summed over the task's lanes by the task and over
//!   tasks afterwards, `dA`/`dD`/`ddelta_bias` over the batch afterwards, always in the same
//!   order: the bits do not depend on the number of threads.
//!
//! # Instruction sets
//! The same generic code is compiled twice: for the target's baseline (SSE2 on x86-64, NEON on
//! aarch64) and, on x86-64, with AVX2 + FMA enabled (`#[target_feature]`), chosen at run time by
//! [`Isa::detect`] (`is_x86_feature_detected!`). The lane arithmetic is written on `[f32; 8]`
//! arrays, which LLVM turns into one AVX2 register (two SSE/NEON registers); no SIMD crate is
//! needed, and the portable path is the same source (except the gathers' and scatters' 8 × 8
//! transposes, which LLVM did not vectorise: written with AVX intrinsics, module `transpose`,
//! used on the AVX2 path only). With FMA (AVX2 path; NEON, where FMA is
//! baseline) the multiply-adds are fused, so the bits differ from the portable path's, each
//! within the same error bounds; a given machine always takes the same path. AVX-512 is not
//! used: on the machines measured, 8 lanes already made the transcendentals the bound.
//! The transcendentals are [`crate::fastmath`]'s branch-free `exp`/`softplus`/`sigmoid`
//! (≤ 2.5e-7 relative, with or without FMA).

use rayon::prelude::*;

use crate::fastmath::{exp_with, softplus_sigmoid_with, softplus_with};
use crate::{ScanError, ScanGrads, ScanProblem, ScanShape};

/// SIMD lanes of the CPU scan: channels per task.
pub const LANES: usize = 8;

/// Channels per task (= [`LANES`]); fixed so results do not depend on the number of threads.
pub const CHANNELS_PER_TASK: usize = LANES;

/// Sums over `t` (`dA`, `dD`, `dΔ_bias`) add blocks of this many terms, then the blocks: the
/// rounding error grows with `SUM_BLOCK + L / SUM_BLOCK` terms instead of `L`.
pub const SUM_BLOCK: usize = 64;

/// One value per lane (channel).
type V = [f32; LANES];
const ZERO: V = [0.0; LANES];

/// The instruction set a CPU scan runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64), unfused multiply-adds. Runs everywhere.
    Portable,
    /// x86-64 with AVX2 and FMA (detected at run time).
    Avx2Fma,
    /// aarch64's NEON with fused multiply-adds (baseline there).
    Neon,
}

impl Isa {
    /// The fastest set this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx2Fma, Self::Neon]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Self::Portable)
    }

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Self::Neon => cfg!(target_arch = "aarch64"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// A short name for reports: `portable`, `avx2+fma`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2Fma => "avx2+fma",
            Self::Neon => "neon",
        }
    }

    fn check(self) -> Result<(), ScanError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(ScanError::Unsupported {
                detail: format!("this CPU cannot run the `{}` scan", self.name()),
            })
        }
    }
}

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
}

/// A zeroed buffer of `n` values for an output of the scan. A large one is fresh memory from
/// the OS (calloc maps it untouched); on Linux it is marked for transparent huge pages before
/// the first write, so filling it takes one fault per 2 MiB instead of one per 4 KiB page (on
/// C2, `[8, 384, 3136]`, the 4 KiB faults of the forward and backward outputs cost more than a
/// quarter of the whole forward+backward; on C1's 4.8 MB outputs, a single-threaded backward
/// went from 14 to 10 ms with the hint from 2 MiB up). Only a hint: memory and results are
/// unchanged; whole 2 MiB pages inside the buffer are all it can cover.
fn output_buffer(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    #[cfg(target_os = "linux")]
    advise_huge_pages(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(v: &[f32]) {
    const MIN_BYTES: usize = 2 << 20;
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

/// `out[i] = e^{xs[i]}` with the scan's own exponential ([`crate::fastmath::exp_with`]) compiled
/// for `isa`, exactly as the scan runs it (for benchmarks: the exp rate of the scan). Panics if
/// the lengths differ or this CPU lacks `isa`.
pub fn exp_into(isa: Isa, xs: &[f32], out: &mut [f32]) {
    assert_eq!(xs.len(), out.len(), "exp_into: xs and out differ in length");
    isa.check().unwrap_or_else(|e| panic!("{e}"));
    #[inline(always)]
    fn run<const F: bool>(xs: &[f32], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = exp_with::<F>(*x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(xs: &[f32], out: &mut [f32]) {
        run::<true>(xs, out);
    }
    match isa {
        // SAFETY: `isa.check()` found AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { run_avx2(xs, out) },
        Isa::Neon => run::<true>(xs, out),
        _ => run::<false>(xs, out),
    }
}

// ---- Lane arithmetic: `[f32; 8]`, written so that LLVM emits one vector op per line. ----

#[inline(always)]
fn splat(x: f32) -> V {
    [x; LANES]
}

#[inline(always)]
fn mul(a: V, b: V) -> V {
    let mut o = ZERO;
    for i in 0..LANES {
        o[i] = a[i] * b[i];
    }
    o
}

/// `a · b + c` per lane, fused when `F` (see [`crate::fastmath::exp_with`]).
#[inline(always)]
fn fma<const F: bool>(a: V, b: V, c: V) -> V {
    let mut o = ZERO;
    for i in 0..LANES {
        o[i] = if F {
            a[i].mul_add(b[i], c[i])
        } else {
            a[i] * b[i] + c[i]
        };
    }
    o
}

#[inline(always)]
fn add(a: V, b: V) -> V {
    let mut o = ZERO;
    for i in 0..LANES {
        o[i] = a[i] + b[i];
    }
    o
}

#[inline(always)]
fn exp_v<const F: bool>(x: V) -> V {
    let mut o = ZERO;
    for i in 0..LANES {
        o[i] = exp_with::<F>(x[i]);
    }
    o
}

/// The sum of the 8 lanes, as a fixed pairwise tree.
#[inline(always)]
fn hsum(v: V) -> f32 {
    let q = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// A per-lane sum over `t` in blocks of [`SUM_BLOCK`] terms.
struct BlockedSum {
    block: V,
    total: V,
    terms: usize,
}

impl BlockedSum {
    fn new() -> Self {
        Self {
            block: ZERO,
            total: ZERO,
            terms: 0,
        }
    }

    #[inline(always)]
    fn add(&mut self, x: V) {
        self.block = add(self.block, x);
        self.terms += 1;
        if self.terms == SUM_BLOCK {
            self.total = add(self.total, self.block);
            self.block = ZERO;
            self.terms = 0;
        }
    }

    fn sum(self) -> V {
        add(self.total, self.block)
    }
}

// ---- Tasks: 8 consecutive channels of one (batch, group). ----

/// Where a task's channels are.
#[derive(Clone, Copy)]
struct Task {
    batch: usize,
    group: usize,
    /// First channel (in `0..channels`).
    first: usize,
    /// Channels in this task (`LANES`, fewer for a group's last block).
    count: usize,
}

impl Task {
    fn blocks(s: &ScanShape) -> usize {
        s.channels_per_group().div_ceil(LANES)
    }

    /// Task `index` in (batch, group, block) order: their rows are consecutive in `[B, D, L]`.
    fn new(s: &ScanShape, index: usize) -> Self {
        let (cpg, blocks) = (s.channels_per_group(), Self::blocks(s));
        let (bg, block) = (index / blocks, index % blocks);
        let group = bg % s.groups;
        Self {
            batch: bg / s.groups,
            group,
            first: group * cpg + block * LANES,
            count: LANES.min(cpg - block * LANES),
        }
    }

    fn count_all(s: &ScanShape) -> usize {
        s.batch * s.groups * Self::blocks(s)
    }

    /// First row of `[B·D, L]`.
    fn row(&self, s: &ScanShape) -> usize {
        self.batch * s.channels + self.first
    }

    /// A per-channel value in each lane (`pad` in spare lanes).
    fn lanes(&self, pad: f32, value: impl Fn(usize) -> f32) -> V {
        let mut v = splat(pad);
        for (k, x) in v.iter_mut().enumerate().take(self.count) {
            *x = value(self.first + k);
        }
        v
    }

    /// `B` or `C` row of state `n` for this task's `(batch, group)`.
    fn state_row<'a>(&self, s: &ScanShape, bc: &'a [f32], n: usize) -> &'a [f32] {
        let l = s.seq_len;
        let base = ((self.batch * s.groups + self.group) * s.d_state + n) * l;
        &bc[base..base + l]
    }
}

/// Lane `k` of `out[t]` = `src[(row + k)·L + t]` for the task's channels, 0 in spare lanes.
#[inline(always)]
fn gather(isa: Isa, src: &[f32], task: &Task, s: &ScanShape, out: &mut [V]) {
    let l = s.seq_len;
    let out = &mut out[..l];
    let rows: [&[f32]; LANES] = std::array::from_fn(|k| {
        let row = task.row(s) + k.min(task.count - 1);
        &src[row * l..(row + 1) * l]
    });
    // Full tasks: 8 × 8 blocks, transposed in registers.
    let blocked = if task.count == LANES {
        l / LANES * LANES
    } else {
        0
    };
    if !transpose::gather(isa, &rows, &mut out[..blocked]) {
        for t0 in (0..blocked).step_by(LANES) {
            let block: [V; LANES] = std::array::from_fn(|k| {
                rows[k][t0..t0 + LANES]
                    .try_into()
                    .expect("a block is LANES long")
            });
            for (j, v) in out[t0..t0 + LANES].iter_mut().enumerate() {
                *v = std::array::from_fn(|k| block[k][j]);
            }
        }
    }
    for (t, v) in out.iter_mut().enumerate().skip(blocked) {
        *v = std::array::from_fn(|k| if k < task.count { rows[k][t] } else { 0.0 });
    }
}

/// The inverse of [`gather`] into the task's rows `dst [count, L]`.
#[inline(always)]
fn scatter(isa: Isa, src: &[V], count: usize, l: usize, dst: &mut [f32]) {
    let (src, dst) = (&src[..l], &mut dst[..count * l]);
    let blocked = if count == LANES { l / LANES * LANES } else { 0 };
    if !transpose::scatter(isa, &src[..blocked], l, dst) {
        for t0 in (0..blocked).step_by(LANES) {
            // 8 × 8 block transposed, then 8 contiguous row stores.
            let block: [V; LANES] =
                std::array::from_fn(|k| std::array::from_fn(|j| src[t0 + j][k]));
            for (k, row) in block.iter().enumerate() {
                dst[k * l + t0..k * l + t0 + LANES].copy_from_slice(row);
            }
        }
    }
    for k in 0..count {
        for t in blocked..l {
            dst[k * l + t] = src[t][k];
        }
    }
}

/// The 8 × 8 block transposes of [`gather`] and [`scatter`] with AVX shuffles (24 per block
/// instead of 64 scalar moves through the stack, which LLVM made of the portable loops and
/// which took 40 % of the scan's time). Each returns `false` where the ISA has no such path
/// (the caller then runs the portable loop); results are the same bits either way (a transpose
/// only moves values).
mod transpose {
    use super::{Isa, LANES, V};

    /// `out[t][k] = rows[k][t]` for `t < out.len()` (a multiple of [`LANES`]).
    #[inline(always)]
    pub(super) fn gather(isa: Isa, rows: &[&[f32]; LANES], out: &mut [V]) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2Fma` is only run after `Isa::check` found AVX2 (hence AVX).
            Isa::Avx2Fma => unsafe { avx::gather(rows, out) },
            _ => return false,
        }
        true
    }

    /// `dst[k·l + t] = src[t][k]` for `t < src.len()` (a multiple of [`LANES`]), `k < LANES`.
    #[inline(always)]
    pub(super) fn scatter(isa: Isa, src: &[V], l: usize, dst: &mut [f32]) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `gather`.
            Isa::Avx2Fma => unsafe { avx::scatter(src, l, dst) },
            _ => return false,
        }
        true
    }

    #[cfg(target_arch = "x86_64")]
    mod avx {
        use super::{LANES, V};
        use std::arch::x86_64::*;

        /// Rows `r[k]` to columns: `out[j][k] = r[k][j]` (unpack, shuffle, swap 128-bit halves).
        #[target_feature(enable = "avx")]
        fn transpose(r: [__m256; LANES]) -> [__m256; LANES] {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ]
        }

        #[target_feature(enable = "avx")]
        pub(super) fn gather(rows: &[&[f32]; LANES], out: &mut [V]) {
            for (b, block) in out.chunks_exact_mut(LANES).enumerate() {
                let t0 = b * LANES;
                let r: [__m256; LANES] = std::array::from_fn(|k| {
                    let row: &[f32; LANES] = rows[k][t0..t0 + LANES]
                        .try_into()
                        .expect("a block is LANES long");
                    // SAFETY: `row` holds LANES floats (unaligned load).
                    unsafe { _mm256_loadu_ps(row.as_ptr()) }
                });
                for (v, c) in block.iter_mut().zip(transpose(r)) {
                    // SAFETY: `v` holds LANES floats (unaligned store).
                    unsafe { _mm256_storeu_ps(v.as_mut_ptr(), c) };
                }
            }
        }

        #[target_feature(enable = "avx")]
        pub(super) fn scatter(src: &[V], l: usize, dst: &mut [f32]) {
            for (b, block) in src.chunks_exact(LANES).enumerate() {
                let t0 = b * LANES;
                // SAFETY: each `V` holds LANES floats (unaligned load).
                let r: [__m256; LANES] =
                    std::array::from_fn(|j| unsafe { _mm256_loadu_ps(block[j].as_ptr()) });
                for (k, c) in transpose(r).into_iter().enumerate() {
                    let row: &mut [f32; LANES] = (&mut dst[k * l + t0..k * l + t0 + LANES])
                        .try_into()
                        .expect("a block is LANES long");
                    // SAFETY: `row` holds LANES floats (unaligned store).
                    unsafe { _mm256_storeu_ps(row.as_mut_ptr(), c) };
                }
            }
        }
    }
}

impl ScanSlices<'_> {
    /// `Δ` per lane into `dt`, and softplus' slope `sigmoid(delta + bias)` into `slope` when
    /// given and Δ is a softplus (1 otherwise). Spare lanes hold softplus(0) or 0: finite, and
    /// multiplied by `u = 0` everywhere.
    #[inline(always)]
    fn steps<const F: bool>(&self, isa: Isa, task: &Task, dt: &mut [V], slope: Option<&mut [V]>) {
        let s = &self.shape;
        gather(isa, self.delta, task, s, dt);
        let bias = task.lanes(0.0, |ch| self.delta_bias.map_or(0.0, |v| v[ch]));
        for d in dt.iter_mut() {
            *d = add(*d, bias);
        }
        if !self.delta_softplus {
            if let Some(slope) = slope {
                slope.fill(splat(1.0));
            }
            return;
        }
        // On the flattened `[L·8]` values: long loops vectorise, 8-lane ones did not here.
        let dt = dt.as_flattened_mut();
        match slope {
            Some(slope) => {
                for (d, g) in dt.iter_mut().zip(slope.as_flattened_mut()) {
                    (*d, *g) = softplus_sigmoid_with::<F>(*d);
                }
            }
            None => {
                for d in dt.iter_mut() {
                    *d = softplus_with::<F>(*d);
                }
            }
        }
    }
}

// ---- Forward ----

/// Per-thread scratch of the forward: `Δ·u`, `Δ`, `y`, each `[L][8]`.
#[derive(Default)]
struct ForwardScratch {
    dtu: Vec<V>,
    dt: Vec<V>,
    y: Vec<V>,
}

/// Grows `v` to at least `l` lanes-vectors (never shrinks: the scratch is reused by every scan
/// the thread runs, e.g. the four stages of a model).
fn at_least(v: &mut Vec<V>, l: usize) {
    if v.len() < l {
        *v = vec![ZERO; l];
    }
}

impl ForwardScratch {
    fn fit(&mut self, l: usize) {
        for v in [&mut self.dtu, &mut self.dt, &mut self.y] {
            at_least(v, l);
        }
    }
}

thread_local! {
    /// Scratch reused across tasks and calls: fresh buffers per task cost a page fault per
    /// 4 KiB, which showed as a quarter of a C2 backward.
    static FORWARD_SCRATCH: std::cell::RefCell<ForwardScratch> = Default::default();
    static BACKWARD_SCRATCH: std::cell::RefCell<BackwardScratch> = Default::default();
}

#[inline(always)]
fn forward_task<const F: bool>(
    isa: Isa,
    p: &ScanSlices<'_>,
    task: &Task,
    y_rows: &mut [f32],
    scratch: &mut ForwardScratch,
) {
    let s = &p.shape;
    let l = s.seq_len;
    let ForwardScratch { dtu, dt, y } = scratch;
    let (dtu, dt, y) = (&mut dtu[..l], &mut dt[..l], &mut y[..l]);
    gather(isa, p.u, task, s, dtu);
    p.steps::<F>(isa, task, dt, None);
    let skip = task.lanes(0.0, |ch| p.d.map_or(0.0, |v| v[ch]));
    for ((y, u), d) in y.iter_mut().zip(dtu.iter_mut()).zip(dt.iter()) {
        *y = mul(skip, *u);
        *u = mul(*u, *d);
    }
    let mut n = 0;
    while n + 4 <= s.d_state {
        forward_states::<F, 4>(p, task, n, dt, dtu, y);
        n += 4;
    }
    while n < s.d_state {
        forward_states::<F, 1>(p, task, n, dt, dtu, y);
        n += 1;
    }
    scatter(isa, y, task.count, s.seq_len, y_rows);
}

/// States `n0..n0 + NS` of the forward: `NS` independent recurrences per step, added to `y` in
/// state order.
#[inline(always)]
fn forward_states<const F: bool, const NS: usize>(
    p: &ScanSlices<'_>,
    task: &Task,
    n0: usize,
    dt: &[V],
    dtu: &[V],
    y: &mut [V],
) {
    let s = &p.shape;
    let l = s.seq_len;
    let a: [V; NS] = std::array::from_fn(|j| task.lanes(0.0, |ch| p.a[ch * s.d_state + n0 + j]));
    let b: [&[f32]; NS] = std::array::from_fn(|j| task.state_row(s, p.b, n0 + j));
    let c: [&[f32]; NS] = std::array::from_fn(|j| task.state_row(s, p.c, n0 + j));
    let (dt, dtu, y) = (&dt[..l], &dtu[..l], &mut y[..l]);
    let mut h = [ZERO; NS];
    for t in 0..l {
        let mut acc = y[t];
        for j in 0..NS {
            let decay = exp_v::<F>(mul(dt[t], a[j]));
            h[j] = fma::<F>(decay, h[j], mul(dtu[t], splat(b[j][t])));
            acc = fma::<F>(splat(c[j][t]), h[j], acc);
        }
        y[t] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_task_avx2(
    p: &ScanSlices<'_>,
    task: &Task,
    y_rows: &mut [f32],
    scratch: &mut ForwardScratch,
) {
    forward_task::<true>(Isa::Avx2Fma, p, task, y_rows, scratch);
}

/// Forward scan: `y [batch, channels, seq_len]`, with the fastest [`Isa`] of this CPU.
pub fn forward(p: &ScanSlices<'_>) -> Result<Vec<f32>, ScanError> {
    forward_on(Isa::detect(), p)
}

/// [`forward`] with the given instruction set (an error if this CPU lacks it).
pub fn forward_on(isa: Isa, p: &ScanSlices<'_>) -> Result<Vec<f32>, ScanError> {
    p.validate()?;
    isa.check()?;
    let s = p.shape;
    let l = s.seq_len;
    let mut y = output_buffer(s.bdl_len());
    let mut tasks = Vec::with_capacity(Task::count_all(&s));
    let mut rest = &mut y[..];
    for index in 0..Task::count_all(&s) {
        let task = Task::new(&s, index);
        let (rows, next) = rest.split_at_mut(task.count * l);
        tasks.push((task, rows));
        rest = next;
    }
    tasks.into_par_iter().for_each(|(task, rows)| {
        FORWARD_SCRATCH.with_borrow_mut(|scratch| {
            scratch.fit(l);
            match isa {
                // SAFETY: `isa.check()` found AVX2 and FMA on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { forward_task_avx2(p, &task, rows, scratch) },
                Isa::Neon => forward_task::<true>(isa, p, &task, rows, scratch),
                _ => forward_task::<false>(isa, p, &task, rows, scratch),
            }
        })
    });
    Ok(y)
}

// ---- Backward ----

/// Per-task outputs of the backward pass.
struct TaskOut {
    /// `dB`, `dC` partials of this task (summed over its lanes): `[d_state, seq_len]` each.
    db: Vec<f32>,
    dc: Vec<f32>,
    /// `dA` of the task's lanes: `[d_state]` lane vectors.
    da: Vec<V>,
    dd: V,
    dbias: V,
}

/// Per-thread scratch of the backward, `[L][8]` each (`h` is `[L + 1][8]`: `h[t]` is
/// `h_{t−1}`, `h[0] = 0`).
#[derive(Default)]
struct BackwardScratch {
    u: Vec<V>,
    dy: Vec<V>,
    dt: Vec<V>,
    slope: Vec<V>,
    decay: Vec<V>,
    h: Vec<V>,
    du: Vec<V>,
    ddt: Vec<V>,
}

impl BackwardScratch {
    fn fit(&mut self, l: usize) {
        for v in [
            &mut self.u,
            &mut self.dy,
            &mut self.dt,
            &mut self.slope,
            &mut self.decay,
            &mut self.du,
            &mut self.ddt,
        ] {
            at_least(v, l);
        }
        at_least(&mut self.h, l + 1);
    }
}

/// The task's lane arrays the backward reads, and the skip `D` per lane.
struct BackwardInputs<'a> {
    u: &'a [V],
    dy: &'a [V],
    dt: &'a [V],
    /// softplus' slope `sigmoid(delta + bias)` (1 without softplus).
    slope: &'a [V],
    skip: V,
}

/// State `n` of the backward: the replay `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` into
/// `(decay, h, du, dΔ)`'s first two, then the adjoint `ĥ_t = exp(Δ_{t+1} A) ĥ_{t+1} + dy_t C_t`
/// from `t = L − 1` down with every gradient term; returns this state's `dA` lanes. `FIRST`:
/// `du` starts at `D·dy` and `dΔ` at 0 here (no pass of their own) and `dD` is summed during the
/// replay; `LAST`: `dΔ` leaves through softplus' slope and is summed into `dΔ_bias`. The bits
/// are those of separate passes, but for `dΔ_bias`, summed from `t = L − 1` down.
#[inline(always)]
fn backward_state<const F: bool, const FIRST: bool, const LAST: bool>(
    x: &BackwardInputs<'_>,
    a_n: V,
    (b_row, c_row): (&[f32], &[f32]),
    (decay, h, du, ddt): (&mut [V], &mut [V], &mut [V], &mut [V]),
    (db, dc): (&mut [f32], &mut [f32]),
    (dd, dbias): (&mut BlockedSum, &mut BlockedSum),
) -> V {
    let l = x.u.len();
    let (u, dy, dt, slope) = (x.u, x.dy, &x.dt[..l], &x.slope[..l]);
    let (decay, h, du, ddt) = (&mut decay[..l], &mut h[..=l], &mut du[..l], &mut ddt[..l]);
    let (b_row, c_row, db, dc) = (&b_row[..l], &c_row[..l], &mut db[..l], &mut dc[..l]);
    let mut state = ZERO;
    h[0] = ZERO;
    for t in 0..l {
        decay[t] = exp_v::<F>(mul(dt[t], a_n));
        state = fma::<F>(decay[t], state, mul(mul(dt[t], u[t]), splat(b_row[t])));
        h[t + 1] = state;
        if FIRST {
            dd.add(mul(dy[t], u[t]));
        }
    }
    let mut adj = ZERO;
    let mut next_decay = ZERO;
    let mut da = BlockedSum::new();
    for t in (0..l).rev() {
        adj = fma::<F>(next_decay, adj, mul(dy[t], splat(c_row[t])));
        next_decay = decay[t];
        let b_t = splat(b_row[t]);
        let adj_dt = mul(adj, dt[t]);
        let a_h = mul(decay[t], h[t]);
        let (du_in, ddt_in) = if FIRST {
            (mul(x.skip, dy[t]), ZERO)
        } else {
            (du[t], ddt[t])
        };
        du[t] = fma::<F>(adj_dt, b_t, du_in);
        let g = fma::<F>(adj, fma::<F>(a_n, a_h, mul(b_t, u[t])), ddt_in);
        ddt[t] = if LAST {
            let g = mul(g, slope[t]);
            dbias.add(g);
            g
        } else {
            g
        };
        da.add(mul(adj_dt, a_h));
        db[t] = hsum(mul(adj_dt, u[t]));
        dc[t] = hsum(mul(dy[t], h[t + 1]));
    }
    da.sum()
}

#[inline(always)]
fn backward_task<const F: bool>(
    isa: Isa,
    p: &ScanSlices<'_>,
    dy_all: &[f32],
    task: &Task,
    du_rows: &mut [f32],
    dd_rows: &mut [f32],
    scratch: &mut BackwardScratch,
) -> TaskOut {
    let s = &p.shape;
    let (l, n_state) = (s.seq_len, s.d_state);
    let BackwardScratch {
        u,
        dy,
        dt,
        slope,
        decay,
        h,
        du,
        ddt,
    } = scratch;
    let (u, dy, dt, slope) = (&mut u[..l], &mut dy[..l], &mut dt[..l], &mut slope[..l]);
    gather(isa, p.u, task, s, u);
    gather(isa, dy_all, task, s, dy);
    p.steps::<F>(isa, task, dt, Some(slope));
    let (u, dy, dt, slope, decay, du, ddt) = (
        &u[..],
        &dy[..],
        &dt[..],
        &slope[..],
        &mut decay[..l],
        &mut du[..l],
        &mut ddt[..l],
    );
    let h = &mut h[..=l];
    let inputs = BackwardInputs {
        u,
        dy,
        dt,
        slope,
        skip: task.lanes(0.0, |ch| p.d.map_or(0.0, |v| v[ch])),
    };
    let mut out = TaskOut {
        db: vec![0.0; n_state * l],
        dc: vec![0.0; n_state * l],
        da: vec![ZERO; n_state],
        dd: ZERO,
        dbias: ZERO,
    };
    // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t and dD = Σ_t dy_t u_t start with the first state; dΔ
    // leaves through softplus' slope (1 without softplus) with the last, dΔ_bias = Σ_t dΔ_t.
    let (mut dd, mut dbias) = (BlockedSum::new(), BlockedSum::new());
    for n in 0..n_state {
        let a_n = task.lanes(0.0, |ch| p.a[ch * n_state + n]);
        let rows = (task.state_row(s, p.b, n), task.state_row(s, p.c, n));
        let work = (&mut decay[..], &mut h[..], &mut du[..], &mut ddt[..]);
        let grads = (
            &mut out.db[n * l..(n + 1) * l],
            &mut out.dc[n * l..(n + 1) * l],
        );
        let sums = (&mut dd, &mut dbias);
        out.da[n] = match (n == 0, n + 1 == n_state) {
            (true, true) => backward_state::<F, true, true>(&inputs, a_n, rows, work, grads, sums),
            (true, false) => {
                backward_state::<F, true, false>(&inputs, a_n, rows, work, grads, sums)
            }
            (false, true) => {
                backward_state::<F, false, true>(&inputs, a_n, rows, work, grads, sums)
            }
            (false, false) => {
                backward_state::<F, false, false>(&inputs, a_n, rows, work, grads, sums)
            }
        };
    }
    out.dd = dd.sum();
    out.dbias = dbias.sum();
    scatter(isa, du, task.count, l, du_rows);
    scatter(isa, ddt, task.count, l, dd_rows);
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_task_avx2(
    p: &ScanSlices<'_>,
    dy_all: &[f32],
    task: &Task,
    du_rows: &mut [f32],
    dd_rows: &mut [f32],
    scratch: &mut BackwardScratch,
) -> TaskOut {
    backward_task::<true>(Isa::Avx2Fma, p, dy_all, task, du_rows, dd_rows, scratch)
}

/// Backward scan for the upstream gradient `dy [batch, channels, seq_len]`, with the fastest
/// [`Isa`] of this CPU.
pub fn backward(p: &ScanSlices<'_>, dy: &[f32]) -> Result<ScanGrads<f32>, ScanError> {
    backward_on(Isa::detect(), p, dy)
}

/// [`backward`] with the given instruction set (an error if this CPU lacks it).
pub fn backward_on(isa: Isa, p: &ScanSlices<'_>, dy: &[f32]) -> Result<ScanGrads<f32>, ScanError> {
    p.validate()?;
    isa.check()?;
    let s = p.shape;
    if dy.len() != s.bdl_len() {
        return Err(ScanError::Length {
            arg: "dy",
            expected: s.bdl_len(),
            actual: dy.len(),
        });
    }
    let (l, n_state) = (s.seq_len, s.d_state);
    let mut du = output_buffer(s.bdl_len());
    let mut ddelta = output_buffer(s.bdl_len());
    // A task's rows are consecutive in du/ddelta.
    let mut tasks: Vec<(Task, &mut [f32], &mut [f32])> = vec![];
    {
        let (mut du_rest, mut dd_rest) = (&mut du[..], &mut ddelta[..]);
        for index in 0..Task::count_all(&s) {
            let task = Task::new(&s, index);
            let (du_task, du_next) = du_rest.split_at_mut(task.count * l);
            let (dd_task, dd_next) = dd_rest.split_at_mut(task.count * l);
            tasks.push((task, du_task, dd_task));
            (du_rest, dd_rest) = (du_next, dd_next);
        }
    }
    let run = |(task, du, dd): &mut (Task, &mut [f32], &mut [f32])| {
        BACKWARD_SCRATCH.with_borrow_mut(|scratch| {
            scratch.fit(l);
            match isa {
                // SAFETY: `isa.check()` found AVX2 and FMA on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { backward_task_avx2(p, dy, task, du, dd, scratch) },
                Isa::Neon => backward_task::<true>(isa, p, dy, task, du, dd, scratch),
                _ => backward_task::<false>(isa, p, dy, task, du, dd, scratch),
            }
        })
    };

    // Fixed-order reductions over tasks (dB, dC) and over the batch (dA, dD, ddelta_bias), in
    // task order. The tasks run in waves and each wave's partials are folded before the next
    // starts: one partial per task would be B·D·N·L/4 floats (4× `du` at N = 16); a wave's
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
        let outs: Vec<TaskOut> = chunk.par_iter_mut().map(run).collect();
        for (out, (task, _, _)) in outs.iter().zip(chunk.iter()) {
            let bg = task.batch * s.groups + task.group;
            let span = bg * n_state * l..(bg + 1) * n_state * l;
            for (acc, x) in db[span.clone()].iter_mut().zip(&out.db) {
                *acc += x;
            }
            for (acc, x) in dc[span].iter_mut().zip(&out.dc) {
                *acc += x;
            }
            for k in 0..task.count {
                let ch = task.first + k;
                dd[ch] += out.dd[k];
                dbias[ch] += out.dbias[k];
                for n in 0..n_state {
                    da[ch * n_state + n] += out.da[n][k];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX 8 × 8 transposes move exactly the values the portable loops move, for full and
    /// partial tasks and lengths that are not a multiple of the lane count.
    #[test]
    fn avx_transposes_match_the_portable_loops() {
        if !Isa::Avx2Fma.is_available() {
            println!("no AVX2 on this CPU: only the portable transposes run");
            return;
        }
        for (channels, l) in [(16, 37), (16, 8), (12, 21), (8, 1), (5, 16)] {
            let s = ScanShape::new(2, channels, l, 1, 1);
            let src: Vec<f32> = (0..s.bdl_len()).map(|i| i as f32 + 0.5).collect();
            for index in 0..Task::count_all(&s) {
                let task = Task::new(&s, index);
                let mut portable = vec![ZERO; l];
                let mut avx = vec![ZERO; l];
                gather(Isa::Portable, &src, &task, &s, &mut portable);
                gather(Isa::Avx2Fma, &src, &task, &s, &mut avx);
                assert_eq!(portable, avx, "gather, {channels} channels, L = {l}");
                for (t, v) in portable.iter().enumerate() {
                    for k in 0..task.count {
                        assert_eq!(v[k], src[(task.row(&s) + k) * l + t]);
                    }
                }
                let mut rows_portable = vec![-1.0; task.count * l];
                let mut rows_avx = vec![-1.0; task.count * l];
                scatter(Isa::Portable, &portable, task.count, l, &mut rows_portable);
                scatter(Isa::Avx2Fma, &portable, task.count, l, &mut rows_avx);
                assert_eq!(
                    rows_portable, rows_avx,
                    "scatter, {channels} channels, L = {l}"
                );
                let start = task.row(&s) * l;
                assert_eq!(rows_avx, src[start..start + task.count * l]);
            }
        }
    }
}
