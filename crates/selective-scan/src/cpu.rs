//! The native CPU scan: fused like the kernels (no `[B, D, L, N]` tensor), f32 state, SIMD across
//! channels, parallel with rayon, deterministic.
//!
//! # Layout: one SIMD lane per channel
//! The recurrence `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` is sequential in `t` but independent
//! across channels, so a task takes `W` consecutive channels of one `(batch, group)` (`W` =
//! [`Isa::lanes`]: 16 with AVX-512, 8 otherwise) and runs the time loop with one channel per
//! lane: every step is a handful of `W`-wide multiply-adds and one `W`-wide `exp`, with no
//! dependency between lanes. `B_t` and `C_t` are shared by the group's channels and are
//! broadcast. The task gathers its rows of `u`, `delta` (and `dy`) into lane-major scratch
//! `[L][W]` once, runs every state over it, and scatters its outputs back into the `[B, D, L]`
//! rows (16 × 16 tiles transposed in AVX-512 registers, 8 × 8 tiles with AVX shuffles on AVX2,
//! see `transpose`); a block with fewer than `W` channels (the group's last) fills the spare
//! lanes with zeros (`u = dy = A = 0`), which contribute exact zeros to every sum.
//! - Forward: `Δ` (softplus) per lane, then states in chunks of 4 (four independent recurrences
//!   per step for instruction-level parallelism), `y_t = D u_t + Σ_n C_{n,t} h_{n,t}` accumulated
//!   in state order.
//! - Memory and arithmetic overlap: while a task computes (the forward's first states, the
//!   backward's first adjoint), it prefetches the next task's rows of its inputs, one cache line
//!   per step (`Ahead`); the gathers then find them in the cache instead of waiting for memory
//!   between two stretches of arithmetic (C2 forward 15 % and forward + backward 20 % faster).
//! - Backward, per state: replay `h` forward into an `[L + 1][W]` buffer (keeping `exp(Δ_t A)`),
//!   then one backward pass for the adjoint `ĥ_t = exp(Δ_{t+1} A) ĥ_{t+1} + dy_t C_t` that also
//!   accumulates every formula of [`crate::reference`]: `du`, `dΔ` per lane; `dB_t`, `dC_t` as
//!   the sum over the `W` lanes (a fixed pairwise tree); `dA`, `dD`, `dΔ_bias` as sums over `t`
//!   in blocks of [`SUM_BLOCK`]. `dB`/`dC` are summed over the task's lanes by the task and over
//!   tasks afterwards, `dA`/`dD`/`ddelta_bias` over the batch afterwards, always in the same
//!   order: the bits do not depend on the number of threads.
//!
//! # Instruction sets
//! The same generic code (over the lane count `W`) is compiled for the target's baseline (SSE2
//! on x86-64, NEON on aarch64) and, on x86-64, with AVX2 + FMA and with AVX-512F enabled
//! (`#[target_feature]`), chosen at run time by [`Isa::detect`] (`is_x86_feature_detected!`).
//! The lane arithmetic is written on `[f32; W]` arrays, which LLVM turns into one AVX2 or
//! AVX-512 register (two SSE/NEON registers); no SIMD crate is needed, and the portable path is
//! the same source (except the gathers' and scatters' transposes, which LLVM did not
//! vectorise: written with intrinsics, module `transpose`: 8 × 8 tiles with AVX on the AVX2
//! path, 16 × 16 tiles with AVX-512 on the AVX-512 path, which take 6 instructions per step
//! and transpose where four 8 × 8 tiles took 14; C1's forward 2.0–2.5 → 1.3–1.8 ms). With FMA
//! (AVX2 and AVX-512 paths; NEON, where FMA is baseline) the multiply-adds are fused, so the
//! bits differ from the portable path's, each within the same error bounds. A given machine
//! always takes the same path, and every path is tested against the f64 reference where the
//! CPU has it. AVX-512 doubles the lanes of every instruction: on the
//! 2-core development machine (Xeon with AVX-512) a 16-lane exp runs about 1.8× as many
//! exponentials per second as an 8-lane one; called directly, the 16-lane scan takes 0.75× the
//! time of the 8-lane one forward and 0.9× backward on C2 (15–17 vs 20 ms, 30 vs 33 ms). Two
//! shapes of code are avoided because LLVM compiled them badly at 16 lanes: loops whose body is
//! only lane arithmetic, with no recurrence (LLVM vectorised them across `t` instead, with
//! AVX-512 gathers and scatters; such work is fused into the gathers or the first recurrence),
//! and branches inside the time loops (the blocked sums over `t` are inner loops of their own:
//! with a branch per step, LLVM's SLP vectoriser split the backward's 16 lanes into 128-bit and
//! scalar pieces). The transcendentals are [`crate::fastmath`]'s
//! branch-free `exp`/`softplus`/`sigmoid` (≤ 2.5e-7 relative, with or without FMA); the decays
//! `exp(Δ·A)` (`Δ·A ≤ 0`, checked on entry) use its cheaper `exp_decay_with`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::fastmath::{
    CHUNK, exp_decay_with, exp_with, softplus_lanes, softplus_sigmoid_lanes, softplus_sigmoid_with,
    softplus_with,
};
use crate::{ScanError, ScanGrads, ScanProblem, ScanShape};

/// Sums over `t` (`dA`, `dD`, `dΔ_bias`) add blocks of this many terms, then the blocks: the
/// rounding error grows with `SUM_BLOCK + L / SUM_BLOCK` terms instead of `L`.
pub const SUM_BLOCK: usize = 64;

/// The instruction set a CPU scan runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64), unfused multiply-adds. Runs everywhere.
    Portable,
    /// x86-64 with AVX2 and FMA (detected at run time).
    Avx2Fma,
    /// x86-64 with AVX-512F (and AVX2, FMA): 16 lanes (detected at run time).
    Avx512,
    /// aarch64's NEON with fused multiply-adds (baseline there).
    Neon,
}

impl Isa {
    /// Every instruction set, portable first.
    pub const ALL: [Self; 4] = [Self::Portable, Self::Avx2Fma, Self::Avx512, Self::Neon];

    /// The fastest set this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512, Self::Avx2Fma, Self::Neon]
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
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2Fma.is_available() && std::arch::is_x86_feature_detected!("avx512f")
            }
            Self::Neon => cfg!(target_arch = "aarch64"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// A short name for reports: `portable`, `avx2+fma`, `avx512`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2Fma => "avx2+fma",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
        }
    }

    /// SIMD lanes (channels per task) of the scan on this set: 16 with AVX-512, 8 otherwise.
    pub fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            _ => 8,
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

/// An output of the scan: `n` values, not initialised (every one is written by exactly one
/// task's [`scatter_block`]s before [`assume_written`] hands the buffer out: the tasks' rows partition
/// `[B, D, L]`). Not zeroing saves a pass over the buffer where the allocator recycles memory
/// (calloc's memset; C1's outputs are 4.8 MB each). A large one is fresh memory from the OS; on
/// Linux it is marked for transparent huge pages before the first write, so filling it takes
/// one fault per 2 MiB instead of one per 4 KiB page (on C2, `[8, 384, 3136]`, the 4 KiB faults
/// of the forward and backward outputs cost more than a quarter of the whole forward+backward;
/// on C1's 4.8 MB outputs, a single-threaded backward went from 14 to 10 ms with the hint from
/// 2 MiB up). Only a hint: memory and results are unchanged; whole 2 MiB pages inside the
/// buffer are all it can cover.
fn output_buffer(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation, and the capacity is `n`.
    unsafe { v.set_len(n) };
    #[cfg(target_os = "linux")]
    advise_huge_pages(&v);
    v
}

/// An initialised buffer (the upstream gradient the backward writes `du` over) as an output
/// buffer: same allocation, same values.
fn reuse_as_output(v: Vec<f32>) -> Vec<MaybeUninit<f32>> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<f32>` has `f32`'s size and alignment; pointer, length and capacity
    // come from a live `Vec<f32>` whose ownership moves here (it is not dropped).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// The output buffer once every task has written its rows.
///
/// # Safety
/// Every element of `v` has been written.
unsafe fn assume_written(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: as in `reuse_as_output`; the elements are initialised (the caller's contract).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// Rows of an output that hold initialised values (the upstream gradient `du` is written
/// over), to read them before they are overwritten.
///
/// # Safety
/// Every element of `rows` is initialised.
unsafe fn written(rows: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: same layout; initialised (the caller's contract).
    unsafe { &*(std::ptr::from_ref(rows) as *const [f32]) }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &[T]) {
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
    map_into::<ExpMap>(isa, xs, xs, out, "exp_into");
}

/// `out[i] = GELU(xs[i])`, the exact GELU with [`crate::fastmath::gelu_with`] (absolute error
/// ≤ 4e-7 · max(1, |x|)), compiled for `isa` (16 lanes with AVX-512). Panics if the lengths
/// differ or this CPU lacks `isa`.
pub fn gelu_into(isa: Isa, xs: &[f32], out: &mut [f32]) {
    map_into::<GeluMap>(isa, xs, xs, out, "gelu_into");
}

/// `out[i] = dys[i] · GELU'(xs[i])`, the backward of [`gelu_into`] with
/// [`crate::fastmath::gelu_derivative_with`], compiled for `isa`. Panics if the lengths differ
/// or this CPU lacks `isa`.
pub fn gelu_backward_into(isa: Isa, xs: &[f32], dys: &[f32], out: &mut [f32]) {
    map_into::<GeluBackwardMap>(isa, xs, dys, out, "gelu_backward_into");
}

/// An elementwise f32 function of `x` (and of a second operand `g` for the backward maps) with
/// fused (`F`) and unfused forms, for [`map_into`].
trait LaneMap {
    fn apply<const F: bool>(x: f32, g: f32) -> f32;
}

struct ExpMap;
impl LaneMap for ExpMap {
    #[inline(always)]
    fn apply<const F: bool>(x: f32, _: f32) -> f32 {
        exp_with::<F>(x)
    }
}

struct GeluMap;
impl LaneMap for GeluMap {
    #[inline(always)]
    fn apply<const F: bool>(x: f32, _: f32) -> f32 {
        crate::fastmath::gelu_with::<F>(x)
    }
}

struct GeluBackwardMap;
impl LaneMap for GeluBackwardMap {
    #[inline(always)]
    fn apply<const F: bool>(x: f32, dy: f32) -> f32 {
        dy * crate::fastmath::gelu_derivative_with::<F>(x)
    }
}

/// `out[i] = M(xs[i], gs[i])`, the loop compiled for `isa` (fused multiply-adds where it has
/// them); unary maps ignore `gs` (their callers pass `xs` again).
fn map_into<M: LaneMap>(isa: Isa, xs: &[f32], gs: &[f32], out: &mut [f32], name: &str) {
    assert_eq!(xs.len(), out.len(), "{name}: xs and out differ in length");
    assert_eq!(gs.len(), out.len(), "{name}: the operands differ in length");
    isa.check().unwrap_or_else(|e| panic!("{e}"));
    #[inline(always)]
    fn run<M: LaneMap, const F: bool>(xs: &[f32], gs: &[f32], out: &mut [f32]) {
        for ((o, x), g) in out.iter_mut().zip(xs).zip(gs) {
            *o = M::apply::<F>(*x, *g);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2<M: LaneMap>(xs: &[f32], gs: &[f32], out: &mut [f32]) {
        run::<M, true>(xs, gs, out);
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn run_avx512<M: LaneMap>(xs: &[f32], gs: &[f32], out: &mut [f32]) {
        run::<M, true>(xs, gs, out);
    }
    match isa {
        // SAFETY: `isa.check()` found AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { run_avx2::<M>(xs, gs, out) },
        // SAFETY: `isa.check()` found AVX-512F, AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512::<M>(xs, gs, out) },
        Isa::Neon => run::<M, true>(xs, gs, out),
        _ => run::<M, false>(xs, gs, out),
    }
}

// ---- Lane arithmetic: `[f32; W]`, written so that LLVM emits one vector op per line. ----

#[inline(always)]
fn splat<const W: usize>(x: f32) -> [f32; W] {
    [x; W]
}

#[inline(always)]
fn mul<const W: usize>(a: [f32; W], b: [f32; W]) -> [f32; W] {
    let mut o = [0.0; W];
    for i in 0..W {
        o[i] = a[i] * b[i];
    }
    o
}

/// `a · b + c` per lane, fused when `F` (see [`crate::fastmath::exp_with`]).
#[inline(always)]
fn fma<const F: bool, const W: usize>(a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
    let mut o = [0.0; W];
    for i in 0..W {
        o[i] = if F {
            a[i].mul_add(b[i], c[i])
        } else {
            a[i] * b[i] + c[i]
        };
    }
    o
}

#[inline(always)]
fn add<const W: usize>(a: [f32; W], b: [f32; W]) -> [f32; W] {
    let mut o = [0.0; W];
    for i in 0..W {
        o[i] = a[i] + b[i];
    }
    o
}

/// `e^x` per lane for `x ≤ 0` (the decays, see [`exp_decay_with`]).
#[inline(always)]
fn exp_decay_v<const F: bool, const W: usize>(x: [f32; W]) -> [f32; W] {
    let mut o = [0.0; W];
    for i in 0..W {
        o[i] = exp_decay_with::<F>(x[i]);
    }
    o
}

/// The sum of the lanes as a fixed pairwise tree (lane `i` + lane `i + W/2`, halving).
#[inline(always)]
fn hsum<const W: usize>(v: [f32; W]) -> f32 {
    let mut v = v;
    let mut n = W;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// One 64-byte line of scratch (an AVX-512 register, a cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Per-thread scratch of lane vectors, 64-byte aligned so that no vector load straddles two
/// cache lines (unaligned 16-lane loads would straddle every time).
#[derive(Default)]
struct LaneBuf(Vec<Line>);

impl LaneBuf {
    /// The first `n` lane vectors of `W` lanes; grows the buffer (zeroed) if needed and never
    /// shrinks it: the scratch is reused by every scan the thread runs, e.g. a model's stages.
    fn get<const W: usize>(&mut self, n: usize) -> &mut [[f32; W]] {
        let lines = (n * W).div_ceil(16);
        if self.0.len() < lines {
            self.0 = vec![Line([0.0; 16]); lines];
        }
        // SAFETY: the buffer holds `lines · 16 ≥ n · W` initialised f32, and `[f32; W]` has the
        // alignment of f32 (the buffer's is 64) and no padding; the slice borrows `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<[f32; W]>(), n) }
    }
}

// ---- Tasks: `W` consecutive channels of one (batch, group). ----

/// Where a task's channels are.
#[derive(Clone, Copy)]
struct Task {
    batch: usize,
    group: usize,
    /// First channel (in `0..channels`).
    first: usize,
    /// Channels in this task (the lane count `W`, fewer for a group's last block).
    count: usize,
}

impl Task {
    fn blocks(s: &ScanShape, w: usize) -> usize {
        s.channels_per_group().div_ceil(w)
    }

    /// Task `index` in (batch, group, block) order for `w` lanes: their rows are consecutive
    /// in `[B, D, L]`.
    fn new(s: &ScanShape, w: usize, index: usize) -> Self {
        let (cpg, blocks) = (s.channels_per_group(), Self::blocks(s, w));
        let (bg, block) = (index / blocks, index % blocks);
        let group = bg % s.groups;
        Self {
            batch: bg / s.groups,
            group,
            first: group * cpg + block * w,
            count: w.min(cpg - block * w),
        }
    }

    /// Every task of a scan with `w` lanes, each with its rows of `out` (`[B, D, L]`).
    fn split<'a, T>(s: &ScanShape, w: usize, out: &'a mut [T]) -> Vec<(Task, &'a mut [T])> {
        let count = s.batch * s.groups * Self::blocks(s, w);
        let mut tasks = Vec::with_capacity(count);
        let mut rest = out;
        for index in 0..count {
            let task = Self::new(s, w, index);
            let (rows, next) = rest.split_at_mut(task.count * s.seq_len);
            tasks.push((task, rows));
            rest = next;
        }
        tasks
    }

    /// First row of `[B·D, L]`.
    fn row(&self, s: &ScanShape) -> usize {
        self.batch * s.channels + self.first
    }

    /// The task's `count` rows of a `[B, D, L]` tensor.
    fn rows<'a>(&self, s: &ScanShape, all: &'a [f32]) -> &'a [f32] {
        let l = s.seq_len;
        &all[self.row(s) * l..(self.row(s) + self.count) * l]
    }

    /// A per-channel value in each lane (`pad` in spare lanes).
    fn lanes<const W: usize>(&self, pad: f32, value: impl Fn(usize) -> f32) -> [f32; W] {
        let mut v = [pad; W];
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

/// Side of the square tiles the gathers and scatters transpose.
const TILE: usize = 8;

/// How many steps ahead of its writes a loop prefetches an output's lines
/// ([`prefetch_for_write`]), one line (16 floats, [`LINE`]) per row every 16 steps.
const AHEAD_STEPS: usize = 64;

/// Steps of `delta` that [`ScanSlices::steps`] gathers before taking their softplus.
const STEPS_BLOCK: usize = 64;

/// Floats in a 64-byte cache line.
const LINE: usize = 16;

/// Steps of an output that the loops producing its final values hand to [`scatter_block`] at
/// once: one AVX-512 16 × 16 tile, two columns of 8 × 8 tiles otherwise; a cache line of each
/// row.
const BLOCK: usize = 16;

/// Lane `k` of `out[j]` = `rows[k·L + t0 + j]` for steps `t0..t0 + n` of the task's `count`
/// rows `[count, L]`, 0 in spare lanes; plus `bias[k]` where given (`delta`'s bias: added here
/// rather than in a loop of its own, which LLVM vectorised across `t` with AVX-512 gathers and
/// scatters, slower than the gather itself).
#[inline(always)]
fn gather<const W: usize>(
    isa: Isa,
    (rows, count, l): (&[f32], usize, usize),
    (t0, n): (usize, usize),
    out: &mut [[f32; W]],
    bias: Option<[f32; W]>,
) {
    let (rows, out) = (&rows[..count * l], &mut out[..n]);
    // Full tasks of 16 lanes with AVX-512: 16 × 16 tiles first (16 steps at a time).
    let wide = if count == W {
        transpose::gather_wide(isa, (rows, l, t0), out.as_flattened_mut(), bias.as_ref())
    } else {
        0
    };
    let (t0, n, out) = (t0 + wide, n - wide, &mut out[wide..]);
    // Full tasks: 8 × 8 tiles (8 channels × 8 steps), transposed in registers.
    let tiled = if count == W { n / TILE * TILE } else { 0 };
    if tiled > 0 {
        for lane0 in (0..W).step_by(TILE) {
            let tile_rows: [&[f32]; TILE] = std::array::from_fn(|k| {
                let row = (lane0 + k) * l + t0;
                &rows[row..row + tiled]
            });
            let tile_bias: Option<[f32; TILE]> =
                bias.map(|b| std::array::from_fn(|k| b[lane0 + k]));
            if transpose::gather(isa, &tile_rows, lane0, &mut out[..tiled], tile_bias) {
                continue;
            }
            let tile_bias = tile_bias.unwrap_or([0.0; TILE]);
            for j0 in (0..tiled).step_by(TILE) {
                let block: [[f32; TILE]; TILE] = std::array::from_fn(|k| {
                    tile_rows[k][j0..j0 + TILE]
                        .try_into()
                        .expect("a tile is TILE long")
                });
                for (j, v) in out[j0..j0 + TILE].iter_mut().enumerate() {
                    for (k, b) in block.iter().enumerate() {
                        v[lane0 + k] = if bias.is_some() {
                            b[j] + tile_bias[k]
                        } else {
                            b[j]
                        };
                    }
                }
            }
        }
    }
    for (j, v) in out.iter_mut().enumerate().skip(tiled) {
        let t = t0 + j;
        *v = std::array::from_fn(|k| match (k < count, bias) {
            (false, _) => 0.0,
            (true, Some(b)) => rows[k * l + t] + b[k],
            (true, None) => rows[k * l + t],
        });
    }
}

/// Hint that the task's rows `dst [count, L]` are about to be written at step `t`: the line of
/// step `t` of each row is brought into the cache ([`AHEAD_STEPS`] before the loop that writes
/// it gets there), so the blocks' stores find their lines present instead of each waiting for a
/// read for ownership from memory. Measured on a Xeon together with the move of the outputs'
/// writes into the loops: C1's backward 3.1–3.6 ms, as with a separate scatter pass, within
/// that machine's noise. `prefetcht0`: `prefetchw` would say "for writing", but its target
/// feature is unstable in Rust.
#[inline(always)]
fn prefetch_for_write(dst: &[MaybeUninit<f32>], count: usize, l: usize, t: usize) {
    if t >= l {
        return;
    }
    for k in 0..count {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch only hints the cache; the address is inside `dst`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                dst.as_ptr().add(k * l + t).cast(),
            )
        };
    }
}

/// The inverse of [`gather`] for one block of steps: steps `t0..t0 + n` (`n ≤ BLOCK`, `t0` a
/// multiple of `BLOCK`) of the task's rows `dst [count, L]` from `block[j][k]` (step `t0 + j`,
/// lane `k`). The loops that produce an output's final values (the last states of the forward
/// and the backward) write each block as soon as it is done, rather than keeping the output in
/// `[L][W]` scratch for a transpose pass of its own: the stores overlap the recurrence's
/// arithmetic, and one scratch buffer fewer passes through the cache.
#[inline(always)]
fn scatter_block<const W: usize>(
    isa: Isa,
    block: &[[f32; W]; BLOCK],
    (t0, n): (usize, usize),
    count: usize,
    l: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    if n == BLOCK && count == W {
        if transpose::scatter_wide(isa, block, t0, l, dst) {
            return;
        }
        for lane0 in (0..W).step_by(TILE) {
            for j0 in (0..BLOCK).step_by(TILE) {
                let start = lane0 * l + t0 + j0;
                let tile_dst = &mut dst[start..start + (TILE - 1) * l + TILE];
                let src = &block[j0..j0 + TILE];
                if transpose::scatter(isa, src, lane0, l, tile_dst) {
                    continue;
                }
                for k in 0..TILE {
                    for (j, v) in src.iter().enumerate() {
                        tile_dst[k * l + j].write(v[lane0 + k]);
                    }
                }
            }
        }
    } else {
        for k in 0..count {
            for (j, v) in block[..n].iter().enumerate() {
                dst[k * l + t0 + j].write(v[k]);
            }
        }
    }
}

/// The 8 × 8 tile transposes of [`gather`] and [`scatter_block`] with AVX shuffles (24 per tile
/// instead of 64 scalar moves through the stack, which LLVM made of the portable loops and
/// which took 40 % of the scan's time). Each returns `false` where the ISA has no such path
/// (the caller then runs the portable loop); results are the same bits either way (a transpose
/// only moves values).
mod transpose {
    use super::{Isa, MaybeUninit, TILE};

    /// `out[t][lane0 + k] = rows[k][t] (+ bias[k])` for `t < out.len()` (a multiple of
    /// [`TILE`]), `k < 8`.
    #[inline(always)]
    pub(super) fn gather<const W: usize>(
        isa: Isa,
        rows: &[&[f32]; TILE],
        lane0: usize,
        out: &mut [[f32; W]],
        bias: Option<[f32; TILE]>,
    ) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the x86 ISAs but the portable one are only run after `Isa::check`
            // found AVX2 (hence AVX).
            Isa::Avx2Fma | Isa::Avx512 => unsafe { avx::gather(rows, lane0, out, bias) },
            _ => return false,
        }
        true
    }

    /// With AVX-512 and 16 lanes (`out` is `[n][16]` flattened, `rows` the task's 16 rows
    /// `[16, l]`): `out[j][k] = rows[k·l + t0 + j] (+ bias[k])` for the first `n / 16 · 16`
    /// steps, 16 × 16 tiles transposed in 512-bit registers (64 shuffles, 16 loads and 16
    /// stores per 16 steps, against 96, 64 and 64 for four 8 × 8 tiles); returns how many steps
    /// it did (0 for other ISAs and widths: the caller does them all).
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(super) fn gather_wide<const W: usize>(
        isa: Isa,
        rows: (&[f32], usize, usize),
        out: &mut [f32],
        bias: Option<&[f32; W]>,
    ) -> usize {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` only runs after `Isa::check` found AVX-512F.
            Isa::Avx512 if W == 16 => unsafe { avx512::gather(rows, out, bias.map(|b| &b[..])) },
            _ => 0,
        }
    }

    /// With AVX-512 and 16 lanes: the inverse of [`gather_wide`] for one block of 16 steps,
    /// `dst[k·l + t0 + j] = block[j][k]`, one 16 × 16 tile; `false` for other ISAs and widths.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(super) fn scatter_wide<const W: usize>(
        isa: Isa,
        block: &[[f32; W]; super::BLOCK],
        t0: usize,
        l: usize,
        dst: &mut [MaybeUninit<f32>],
    ) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `gather_wide`.
            Isa::Avx512 if W == 16 => unsafe {
                avx512::scatter(block.as_flattened(), t0, l, dst);
                true
            },
            _ => false,
        }
    }

    /// `dst[k·l + t] = src[t][lane0 + k]` for `t < src.len()` (a multiple of [`TILE`]), `k < 8`.
    #[inline(always)]
    pub(super) fn scatter<const W: usize>(
        isa: Isa,
        src: &[[f32; W]],
        lane0: usize,
        l: usize,
        dst: &mut [MaybeUninit<f32>],
    ) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `gather`.
            Isa::Avx2Fma | Isa::Avx512 => unsafe { avx::scatter(src, lane0, l, dst) },
            _ => return false,
        }
        true
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;
        use std::mem::MaybeUninit;

        /// Steps at a time, and lanes: a 16 × 16 tile.
        const WIDE: usize = 16;

        /// Rows `r[k]` to columns: `out[j][k] = r[k][j]`. Within each 128-bit quarter the
        /// unpacks and shuffles transpose 4 × 4 blocks (as the AVX 8 × 8 transpose does); the
        /// two `shuffle_f32x4` rounds then transpose the 4 × 4 grid of quarters.
        #[target_feature(enable = "avx512f")]
        fn transpose(r: [__m512; WIDE]) -> [__m512; WIDE] {
            let t: [__m512; WIDE] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            });
            // s[4i + j], quarter q: rows 4i..4i + 4 of column 4q + j.
            let s: [__m512; WIDE] = std::array::from_fn(|m| {
                let (i, j) = (m / 4, m % 4);
                let (a, b) = (t[4 * i + j / 2], t[4 * i + 2 + j / 2]);
                if j % 2 == 0 {
                    _mm512_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm512_shuffle_ps::<0xEE>(a, b)
                }
            });
            // Column 4q + j: quarter q of s[j], s[4 + j], s[8 + j], s[12 + j].
            let u: [__m512; WIDE] = std::array::from_fn(|m| {
                let (j, half, pair) = (m % 4, (m / 4) % 2, m / 8);
                let (a, b) = (s[8 * pair + j], s[8 * pair + 4 + j]);
                if half == 0 {
                    _mm512_shuffle_f32x4::<0x44>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xEE>(a, b)
                }
            });
            std::array::from_fn(|c| {
                let (q, j) = (c / 4, c % 4);
                // Quarters 0, 1 are in u[j] (pair 0) and u[8 + j] (pair 1); 2, 3 in u[4 + j]
                // and u[12 + j].
                let (a, b) = (u[4 * (q / 2) + j], u[8 + 4 * (q / 2) + j]);
                if q % 2 == 0 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                }
            })
        }

        #[target_feature(enable = "avx512f")]
        pub(super) fn gather(
            (rows, l, t0): (&[f32], usize, usize),
            out: &mut [f32],
            bias: Option<&[f32]>,
        ) -> usize {
            let wide = out.len() / WIDE / WIDE * WIDE;
            // SAFETY: the bias holds 16 floats (unaligned load).
            let add = bias.map(|b| unsafe { _mm512_loadu_ps(b[..WIDE].as_ptr()) });
            for (b, block) in out[..wide * WIDE].chunks_exact_mut(WIDE * WIDE).enumerate() {
                let t = t0 + b * WIDE;
                let r: [__m512; WIDE] = std::array::from_fn(|k| {
                    let row = &rows[k * l + t..k * l + t + WIDE];
                    // SAFETY: `row` holds 16 floats (unaligned load).
                    unsafe { _mm512_loadu_ps(row.as_ptr()) }
                });
                for (v, c) in block.chunks_exact_mut(WIDE).zip(transpose(r)) {
                    let c = add.map_or(c, |a| _mm512_add_ps(c, a));
                    // SAFETY: `v` holds 16 floats (unaligned store).
                    unsafe { _mm512_storeu_ps(v.as_mut_ptr(), c) };
                }
            }
            wide
        }

        /// `dst[k·l + t0 + j] = block[j·16 + k]` for `j, k < 16`.
        #[target_feature(enable = "avx512f")]
        pub(super) fn scatter(block: &[f32], t0: usize, l: usize, dst: &mut [MaybeUninit<f32>]) {
            let r: [__m512; WIDE] = std::array::from_fn(|j| {
                let lanes = &block[j * WIDE..j * WIDE + WIDE];
                // SAFETY: `lanes` holds 16 floats (unaligned load).
                unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
            });
            for (k, c) in transpose(r).into_iter().enumerate() {
                let row = &mut dst[k * l + t0..k * l + t0 + WIDE];
                // SAFETY: `row` holds 16 floats (unaligned store; writing initialises them).
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().cast(), c) };
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx {
        use super::TILE;
        use std::arch::x86_64::*;
        use std::mem::MaybeUninit;

        /// Rows `r[k]` to columns: `out[j][k] = r[k][j]` (unpack, shuffle, swap 128-bit halves).
        #[target_feature(enable = "avx")]
        fn transpose(r: [__m256; TILE]) -> [__m256; TILE] {
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
        pub(super) fn gather<const W: usize>(
            rows: &[&[f32]; TILE],
            lane0: usize,
            out: &mut [[f32; W]],
            bias: Option<[f32; TILE]>,
        ) {
            // SAFETY: the array holds 8 floats (unaligned load).
            let add = bias.map(|b| unsafe { _mm256_loadu_ps(b.as_ptr()) });
            for (b, block) in out.chunks_exact_mut(TILE).enumerate() {
                let t0 = b * TILE;
                let r: [__m256; TILE] = std::array::from_fn(|k| {
                    let row: &[f32; TILE] = rows[k][t0..t0 + TILE]
                        .try_into()
                        .expect("a tile is TILE long");
                    // SAFETY: `row` holds 8 floats (unaligned load).
                    unsafe { _mm256_loadu_ps(row.as_ptr()) }
                });
                for (v, c) in block.iter_mut().zip(transpose(r)) {
                    let c = add.map_or(c, |a| _mm256_add_ps(c, a));
                    let lanes: &mut [f32; TILE] = (&mut v[lane0..lane0 + TILE])
                        .try_into()
                        .expect("a tile is TILE long");
                    // SAFETY: `lanes` holds 8 floats (unaligned store).
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), c) };
                }
            }
        }

        #[target_feature(enable = "avx")]
        pub(super) fn scatter<const W: usize>(
            src: &[[f32; W]],
            lane0: usize,
            l: usize,
            dst: &mut [MaybeUninit<f32>],
        ) {
            for (b, block) in src.chunks_exact(TILE).enumerate() {
                let t0 = b * TILE;
                let r: [__m256; TILE] = std::array::from_fn(|j| {
                    let lanes: &[f32; TILE] = block[j][lane0..lane0 + TILE]
                        .try_into()
                        .expect("a tile is TILE long");
                    // SAFETY: `lanes` holds 8 floats (unaligned load).
                    unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
                });
                for (k, c) in transpose(r).into_iter().enumerate() {
                    let row: &mut [MaybeUninit<f32>; TILE] = (&mut dst
                        [k * l + t0..k * l + t0 + TILE])
                        .try_into()
                        .expect("a tile is TILE long");
                    // SAFETY: `row` holds 8 floats (unaligned store; writing initialises them).
                    unsafe { _mm256_storeu_ps(row.as_mut_ptr().cast(), c) };
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
    fn steps<const F: bool, const W: usize>(
        &self,
        isa: Isa,
        task: &Task,
        dt: &mut [[f32; W]],
        mut slope: Option<&mut [[f32; W]]>,
    ) {
        let s = &self.shape;
        let l = s.seq_len;
        let bias = self.delta_bias.map(|v| task.lanes(0.0, |ch| v[ch]));
        let rows = (task.rows(s, self.delta), task.count, l);
        if !self.delta_softplus {
            gather(isa, rows, (0, l), dt, bias);
            if let Some(slope) = slope {
                slope[..l].as_flattened_mut().fill(1.0);
            }
            return;
        }
        // [`STEPS_BLOCK`] steps at a time: gathered, then through softplus while they are in
        // L1 (the loads of one block overlap the arithmetic of the previous one).
        for t0 in (0..l).step_by(STEPS_BLOCK) {
            let n = STEPS_BLOCK.min(l - t0);
            let dt = &mut dt[t0..t0 + n];
            gather(isa, rows, (t0, n), dt, bias);
            // On the flattened `[n·W]` values, `CHUNK` lanes at a time (independent dependency
            // chains for the out-of-order core, see `fastmath::CHUNK`), the tail one by one
            // (the same operations: the same bits).
            let dt = dt.as_flattened_mut();
            let mut dts = dt.chunks_exact_mut(CHUNK);
            match slope.as_deref_mut() {
                Some(slope) => {
                    let slope = slope[t0..t0 + n].as_flattened_mut();
                    let mut slopes = slope.chunks_exact_mut(CHUNK);
                    for (d, g) in (&mut dts).zip(&mut slopes) {
                        let x: [f32; CHUNK] = (&*d).try_into().expect("chunks of CHUNK");
                        let (softplus, sigmoid) = softplus_sigmoid_lanes::<F, CHUNK>(x);
                        d.copy_from_slice(&softplus);
                        g.copy_from_slice(&sigmoid);
                    }
                    let tail = dts.into_remainder().iter_mut();
                    for (d, g) in tail.zip(slopes.into_remainder()) {
                        (*d, *g) = softplus_sigmoid_with::<F>(*d);
                    }
                }
                None => {
                    for d in &mut dts {
                        let x: [f32; CHUNK] = (&*d).try_into().expect("chunks of CHUNK");
                        d.copy_from_slice(&softplus_lanes::<F, CHUNK>(x));
                    }
                    for d in dts.into_remainder() {
                        *d = softplus_with::<F>(*d);
                    }
                }
            }
        }
    }
}

/// The next task's rows of up to three inputs (`[B, D, L]`), brought into the cache while this
/// task computes: one 64-byte line of each per step of a time loop ([`Ahead::step`]), so the
/// memory works during the arithmetic (a task's `W` rows of `L` floats are `L` lines). Tasks
/// run in index order on each thread, so the next rows in memory are usually the next task's;
/// where another thread takes it, the hint costs a little bandwidth and nothing else. Results
/// never depend on it.
#[derive(Clone, Copy)]
struct Ahead<const K: usize> {
    /// Address and length (floats) of each input's rows from the next task's first row on.
    rows: [(usize, usize); K],
}

/// Address and length of a whole `[B, D, L]` input (floats, initialised or not), for [`Ahead`].
fn whole<T>(x: &[T]) -> (usize, usize) {
    const { assert!(size_of::<T>() == size_of::<f32>()) };
    (x.as_ptr() as usize, x.len())
}

impl<const K: usize> Ahead<K> {
    /// The rows that follow `task`'s in each of the `inputs` (each [`whole`]).
    fn after(s: &ScanShape, task: &Task, inputs: [(usize, usize); K]) -> Self {
        let next = (task.row(s) + task.count) * s.seq_len;
        Self {
            rows: inputs.map(|(addr, len)| {
                let start = next.min(len);
                (addr + start * size_of::<f32>(), len - start)
            }),
        }
    }

    /// Prefetches the line of step `t` (lanes `W`) of each input, where it exists, into every
    /// cache level (`prefetcht0`). The non-temporal hint (`prefetchnta`) was as fast on an AMD
    /// EPYC but 20–25 % slower on a Xeon (Sapphire Rapids; C1's backward 4.0–4.8 → 3.3–3.6 ms,
    /// its forward 2.1–2.4 → 2.0 ms): there it fills L1 only, and the lines are evicted before
    /// the next task gathers them.
    #[inline(always)]
    fn step<const W: usize>(&self, t: usize) {
        for (addr, len) in self.rows {
            if t * W < len {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a prefetch only hints the cache (no access is made; the address is
                // inside the input anyway); SSE is baseline on x86-64.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        (addr + t * W * size_of::<f32>()) as *const i8,
                    )
                };
            }
        }
    }
}

// ---- Forward ----

/// Per-thread scratch of the forward: `Δ·u`, `Δ`, `y`, each `[L][W]`.
#[derive(Default)]
struct ForwardScratch {
    dtu: LaneBuf,
    dt: LaneBuf,
    y: LaneBuf,
}

thread_local! {
    /// Scratch reused across tasks and calls: fresh buffers per task cost a page fault per
    /// 4 KiB, which showed as a quarter of a C2 backward.
    static FORWARD_SCRATCH: std::cell::RefCell<ForwardScratch> = Default::default();
    static BACKWARD_SCRATCH: std::cell::RefCell<BackwardScratch> = Default::default();
}

#[inline(always)]
fn forward_task<const F: bool, const W: usize>(
    isa: Isa,
    p: &ScanSlices<'_>,
    task: &Task,
    y_rows: &mut [MaybeUninit<f32>],
    scratch: &mut ForwardScratch,
) {
    let s = &p.shape;
    let l = s.seq_len;
    let ForwardScratch { dtu, dt, y } = scratch;
    let (dtu, dt, y) = (dtu.get::<W>(l), dt.get::<W>(l), y.get::<W>(l));
    gather(isa, (task.rows(s, p.u), task.count, l), (0, l), dtu, None);
    p.steps::<F, W>(isa, task, dt, None);
    let skip = task.lanes(0.0, |ch| p.d.map_or(0.0, |v| v[ch]));
    let ahead = Ahead::after(s, task, [whole(p.u), whole(p.delta)]);
    let x = ForwardInputs {
        isa,
        task,
        dt,
        skip,
        ahead,
    };
    // The first chunk of states starts `y` at `D·u` and turns `u` into `Δ·u` in place (inside
    // its recurrence: a loop of its own was vectorised across `t` with AVX-512 gathers); the
    // last writes `y` into the task's rows.
    let mut n = 0;
    while n < s.d_state {
        let ns = if n + 4 <= s.d_state { 4 } else { 1 };
        let (first, last) = (n == 0, n + ns == s.d_state);
        let (dtu, y, out) = (&mut dtu[..], &mut y[..], &mut y_rows[..]);
        match (ns, first, last) {
            (4, true, true) => forward_states::<F, W, 4, true, true>(p, &x, n, dtu, y, out),
            (4, true, false) => forward_states::<F, W, 4, true, false>(p, &x, n, dtu, y, out),
            (4, false, true) => forward_states::<F, W, 4, false, true>(p, &x, n, dtu, y, out),
            (4, false, false) => forward_states::<F, W, 4, false, false>(p, &x, n, dtu, y, out),
            (_, true, true) => forward_states::<F, W, 1, true, true>(p, &x, n, dtu, y, out),
            (_, true, false) => forward_states::<F, W, 1, true, false>(p, &x, n, dtu, y, out),
            (_, false, true) => forward_states::<F, W, 1, false, true>(p, &x, n, dtu, y, out),
            (_, false, false) => forward_states::<F, W, 1, false, false>(p, &x, n, dtu, y, out),
        }
        n += ns;
    }
}

/// What every state chunk of a forward task reads: `Δ` per lane, the skip `D` per lane, and
/// the next task's rows to prefetch.
struct ForwardInputs<'a, const W: usize> {
    isa: Isa,
    task: &'a Task,
    dt: &'a [[f32; W]],
    skip: [f32; W],
    ahead: Ahead<2>,
}

/// States `n0..n0 + NS` of the forward: `NS` independent recurrences per step, added to `y` in
/// state order. `FIRST`: `y` starts at `skip·u` and `dtu` holds `u`, replaced by `Δ·u`, and
/// the next task's rows are prefetched (`ahead`). `LAST`: `y` is final and goes to the task's
/// rows `out` one [`BLOCK`] of steps at a time ([`scatter_block`]) rather than to scratch.
#[inline(always)]
fn forward_states<
    const F: bool,
    const W: usize,
    const NS: usize,
    const FIRST: bool,
    const LAST: bool,
>(
    p: &ScanSlices<'_>,
    x: &ForwardInputs<'_, W>,
    n0: usize,
    dtu: &mut [[f32; W]],
    y: &mut [[f32; W]],
    out: &mut [MaybeUninit<f32>],
) {
    let s = &p.shape;
    let (l, task) = (s.seq_len, x.task);
    let a: [[f32; W]; NS] =
        std::array::from_fn(|j| task.lanes(0.0, |ch| p.a[ch * s.d_state + n0 + j]));
    let b: [&[f32]; NS] = std::array::from_fn(|j| task.state_row(s, p.b, n0 + j));
    let c: [&[f32]; NS] = std::array::from_fn(|j| task.state_row(s, p.c, n0 + j));
    let (dt, dtu, y) = (&x.dt[..l], &mut dtu[..l], &mut y[..l]);
    let mut h = [[0.0; W]; NS];
    let mut block = [[0.0; W]; BLOCK];
    for t0 in (0..l).step_by(BLOCK) {
        let n = BLOCK.min(l - t0);
        for t in t0..t0 + n {
            if FIRST {
                x.ahead.step::<W>(t);
            }
            let (mut acc, dtu_t) = if FIRST {
                let u = dtu[t];
                dtu[t] = mul(u, dt[t]);
                (mul(x.skip, u), dtu[t])
            } else {
                (y[t], dtu[t])
            };
            for j in 0..NS {
                let decay = exp_decay_v::<F, W>(mul(dt[t], a[j]));
                h[j] = fma::<F, W>(decay, h[j], mul(dtu_t, splat(b[j][t])));
                acc = fma::<F, W>(splat(c[j][t]), h[j], acc);
            }
            if LAST {
                block[t - t0] = acc;
            } else {
                y[t] = acc;
            }
        }
        if LAST {
            if t0.is_multiple_of(LINE) {
                prefetch_for_write(out, task.count, l, t0 + AHEAD_STEPS);
            }
            scatter_block(x.isa, &block, (t0, n), task.count, l, out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_task_avx2<const W: usize>(
    p: &ScanSlices<'_>,
    task: &Task,
    y_rows: &mut [MaybeUninit<f32>],
    scratch: &mut ForwardScratch,
) {
    forward_task::<true, W>(Isa::Avx2Fma, p, task, y_rows, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn forward_task_avx512<const W: usize>(
    p: &ScanSlices<'_>,
    task: &Task,
    y_rows: &mut [MaybeUninit<f32>],
    scratch: &mut ForwardScratch,
) {
    forward_task::<true, W>(Isa::Avx512, p, task, y_rows, scratch);
}

/// Forward scan: `y [batch, channels, seq_len]`, with the fastest [`Isa`] of this CPU.
pub fn forward(p: &ScanSlices<'_>) -> Result<Vec<f32>, ScanError> {
    forward_on(Isa::detect(), p)
}

/// [`forward`] with the given instruction set (an error if this CPU lacks it).
pub fn forward_on(isa: Isa, p: &ScanSlices<'_>) -> Result<Vec<f32>, ScanError> {
    p.validate()?;
    isa.check()?;
    Ok(match isa.lanes() {
        16 => forward_lanes::<16>(isa, p),
        _ => forward_lanes::<8>(isa, p),
    })
}

fn forward_lanes<const W: usize>(isa: Isa, p: &ScanSlices<'_>) -> Vec<f32> {
    let s = p.shape;
    let mut y = output_buffer(s.bdl_len());
    Task::split(&s, W, &mut y)
        .into_par_iter()
        .for_each(|(task, rows)| {
            FORWARD_SCRATCH.with_borrow_mut(|scratch| match isa {
                // SAFETY: `forward_on` ran `isa.check()`, which found AVX2 and FMA on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { forward_task_avx2::<W>(p, &task, rows, scratch) },
                // SAFETY: as above, with AVX-512F too.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { forward_task_avx512::<W>(p, &task, rows, scratch) },
                Isa::Neon => forward_task::<true, W>(isa, p, &task, rows, scratch),
                _ => forward_task::<false, W>(isa, p, &task, rows, scratch),
            })
        });
    // SAFETY: the tasks' rows partition `y`, and each task scattered all of its rows.
    unsafe { assume_written(y) }
}

// ---- Backward ----

/// Per-task outputs of the backward pass.
struct TaskOut {
    /// `dB`, `dC` partials of this task (summed over its lanes): `[d_state, seq_len]` each.
    db: Vec<f32>,
    dc: Vec<f32>,
    /// `dA` of the task's channels, `[d_state][count]`.
    da: Vec<f32>,
    /// `dD` and `dΔ_bias` of the task's channels, `[count]` each.
    dd: Vec<f32>,
    dbias: Vec<f32>,
}

/// Per-thread scratch of the backward, `[L][W]` each (`h` is `[L + 1][W]`: `h[t]` is
/// `h_{t−1}`, `h[0] = 0`).
#[derive(Default)]
struct BackwardScratch {
    u: LaneBuf,
    dy: LaneBuf,
    dt: LaneBuf,
    slope: LaneBuf,
    decay: LaneBuf,
    h: LaneBuf,
    du: LaneBuf,
    ddt: LaneBuf,
}

/// The task's lane arrays the backward reads, and the skip `D` per lane.
struct BackwardInputs<'a, const W: usize> {
    isa: Isa,
    /// The task's channels (lanes in use).
    count: usize,
    u: &'a [[f32; W]],
    dy: &'a [[f32; W]],
    dt: &'a [[f32; W]],
    /// softplus' slope `sigmoid(delta + bias)` (1 without softplus).
    slope: &'a [[f32; W]],
    skip: [f32; W],
    /// The next task's `u`, `delta` and `dy`, prefetched during the first state's adjoint.
    ahead: Ahead<3>,
}

/// The lane buffers one state of the backward writes: `exp(Δ_t A)`, `h`, `du`, `dΔ`.
type StateWork<'a, const W: usize> = (
    &'a mut [[f32; W]],
    &'a mut [[f32; W]],
    &'a mut [[f32; W]],
    &'a mut [[f32; W]],
);

/// Per-lane sums of one state of the backward over `t`: `dA` always, `dD` in the first state,
/// `dΔ_bias` in the last (zero otherwise).
struct StateSums<const W: usize> {
    da: [f32; W],
    dd: [f32; W],
    dbias: [f32; W],
}

/// State `n` of the backward: the replay `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` into
/// `(decay, h, du, dΔ)`'s first two, then the adjoint `ĥ_t = exp(Δ_{t+1} A) ĥ_{t+1} + dy_t C_t`
/// from `t = L − 1` down with every gradient term. `FIRST`: `du` starts at `D·dy` and `dΔ` at 0
/// here (no pass of their own) and `dD` is summed during the replay; `LAST`: `dΔ` leaves
/// through softplus' slope and is summed into `dΔ_bias`. Sums over `t` add blocks of
/// [`SUM_BLOCK`] terms in the order the loop visits them (the replay from `t = 0` up, the
/// adjoint from `t = L − 1` down), then the blocks; each block is an inner loop of its own, so
/// the loop bodies have no branch (LLVM's SLP vectoriser then keeps 16 lanes in one register).
#[inline(always)]
fn backward_state<const F: bool, const W: usize, const FIRST: bool, const LAST: bool>(
    x: &BackwardInputs<'_, W>,
    a_n: [f32; W],
    (b_row, c_row): (&[f32], &[f32]),
    (decay, h, du, ddt): StateWork<'_, W>,
    (db, dc): (&mut [f32], &mut [f32]),
    (du_rows, dd_rows): (&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
) -> StateSums<W> {
    let l = x.u.len();
    let (u, dy, dt, slope) = (x.u, x.dy, &x.dt[..l], &x.slope[..l]);
    let (decay, h, du, ddt) = (&mut decay[..l], &mut h[..=l], &mut du[..l], &mut ddt[..l]);
    let (b_row, c_row, db, dc) = (&b_row[..l], &c_row[..l], &mut db[..l], &mut dc[..l]);
    let zero = [0.0; W];
    let mut sums = StateSums {
        da: zero,
        dd: zero,
        dbias: zero,
    };
    let mut state = zero;
    h[0] = zero;
    for start in (0..l).step_by(SUM_BLOCK) {
        let mut dd = zero;
        for t in start..l.min(start + SUM_BLOCK) {
            decay[t] = exp_decay_v::<F, W>(mul(dt[t], a_n));
            state = fma::<F, W>(decay[t], state, mul(mul(dt[t], u[t]), splat(b_row[t])));
            h[t + 1] = state;
            if FIRST {
                dd = add(dd, mul(dy[t], u[t]));
            }
        }
        if FIRST {
            sums.dd = add(sums.dd, dd);
        }
    }
    let mut adj = zero;
    let mut next_decay = zero;
    // `LAST`: the final `du`, `dΔ` of each `BLOCK` of steps, written to the task's rows once the
    // block is done (the loop runs down, so at its lowest step).
    let (mut du_block, mut dd_block) = ([zero; BLOCK], [zero; BLOCK]);
    let mut end = l;
    while end > 0 {
        let start = end.saturating_sub(SUM_BLOCK);
        let (mut da, mut dbias) = (zero, zero);
        let mut hi = end;
        while hi > start {
            let lo = ((hi - 1) / BLOCK * BLOCK).max(start);
            for t in (lo..hi).rev() {
                if FIRST {
                    x.ahead.step::<W>(l - 1 - t);
                }
                adj = fma::<F, W>(next_decay, adj, mul(dy[t], splat(c_row[t])));
                next_decay = decay[t];
                let b_t = splat(b_row[t]);
                let adj_dt = mul(adj, dt[t]);
                let a_h = mul(decay[t], h[t]);
                let (du_in, ddt_in) = if FIRST {
                    (mul(x.skip, dy[t]), zero)
                } else {
                    (du[t], ddt[t])
                };
                let du_t = fma::<F, W>(adj_dt, b_t, du_in);
                let g = fma::<F, W>(adj, fma::<F, W>(a_n, a_h, mul(b_t, u[t])), ddt_in);
                if LAST {
                    let g = mul(g, slope[t]);
                    dbias = add(dbias, g);
                    du_block[t % BLOCK] = du_t;
                    dd_block[t % BLOCK] = g;
                } else {
                    du[t] = du_t;
                    ddt[t] = g;
                }
                da = add(da, mul(adj_dt, a_h));
                db[t] = hsum(mul(adj_dt, u[t]));
                dc[t] = hsum(mul(dy[t], h[t + 1]));
            }
            if LAST && lo.is_multiple_of(BLOCK) {
                if lo.is_multiple_of(LINE) && lo >= AHEAD_STEPS {
                    prefetch_for_write(du_rows, x.count, l, lo - AHEAD_STEPS);
                    prefetch_for_write(dd_rows, x.count, l, lo - AHEAD_STEPS);
                }
                let steps = (lo, BLOCK.min(l - lo));
                scatter_block(x.isa, &du_block, steps, x.count, l, du_rows);
                scatter_block(x.isa, &dd_block, steps, x.count, l, dd_rows);
            }
            hi = lo;
        }
        sums.da = add(sums.da, da);
        if LAST {
            sums.dbias = add(sums.dbias, dbias);
        }
        end = start;
    }
    sums
}

/// One task of the backward: reads its rows of `dy` (from `dy_rows`, or from `du_rows` when the
/// scan writes `du` over `dy`), writes its rows of `du` and `dΔ`, returns its partial sums.
#[inline(always)]
fn backward_task<const F: bool, const W: usize>(
    isa: Isa,
    p: &ScanSlices<'_>,
    (dy_rows, dy_whole): (Option<&[f32]>, (usize, usize)),
    task: &Task,
    du_rows: &mut [MaybeUninit<f32>],
    dd_rows: &mut [MaybeUninit<f32>],
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
    let (u, dy, dt, slope) = (
        u.get::<W>(l),
        dy.get::<W>(l),
        dt.get::<W>(l),
        slope.get::<W>(l),
    );
    let (decay, du, ddt, h) = (
        decay.get::<W>(l),
        du.get::<W>(l),
        ddt.get::<W>(l),
        h.get::<W>(l + 1),
    );
    gather(isa, (task.rows(s, p.u), task.count, l), (0, l), u, None);
    // SAFETY: without `dy_rows`, `du_rows` holds this task's rows of `dy` (`du` is written over
    // it by the last state, after this gather): initialised.
    let dy_rows = dy_rows.unwrap_or_else(|| unsafe { written(du_rows) });
    gather(isa, (dy_rows, task.count, l), (0, l), dy, None);
    p.steps::<F, W>(isa, task, dt, Some(slope));
    let inputs = BackwardInputs {
        isa,
        count: task.count,
        u,
        dy,
        dt,
        slope,
        skip: task.lanes(0.0, |ch| p.d.map_or(0.0, |v| v[ch])),
        ahead: Ahead::after(s, task, [whole(p.u), whole(p.delta), dy_whole]),
    };
    let mut db = vec![0.0; n_state * l];
    let mut dc = vec![0.0; n_state * l];
    let mut da = Vec::with_capacity(n_state * task.count);
    // du_t = D·dy_t + Σ_n ĥ_t Δ_t B_t and dD = Σ_t dy_t u_t start with the first state; dΔ
    // leaves through softplus' slope (1 without softplus) with the last, dΔ_bias = Σ_t dΔ_t.
    let (mut dd, mut dbias) = ([0.0; W], [0.0; W]);
    for n in 0..n_state {
        let a_n = task.lanes(0.0, |ch| p.a[ch * n_state + n]);
        let rows = (task.state_row(s, p.b, n), task.state_row(s, p.c, n));
        let work = (&mut decay[..], &mut h[..], &mut du[..], &mut ddt[..]);
        let grads = (&mut db[n * l..(n + 1) * l], &mut dc[n * l..(n + 1) * l]);
        let out = (&mut du_rows[..], &mut dd_rows[..]);
        let x = &inputs;
        let sums = match (n == 0, n + 1 == n_state) {
            (true, true) => backward_state::<F, W, true, true>(x, a_n, rows, work, grads, out),
            (true, false) => backward_state::<F, W, true, false>(x, a_n, rows, work, grads, out),
            (false, true) => backward_state::<F, W, false, true>(x, a_n, rows, work, grads, out),
            (false, false) => backward_state::<F, W, false, false>(x, a_n, rows, work, grads, out),
        };
        da.extend_from_slice(&sums.da[..task.count]);
        if n == 0 {
            dd = sums.dd;
        }
        if n + 1 == n_state {
            dbias = sums.dbias;
        }
    }
    TaskOut {
        db,
        dc,
        da,
        dd: dd[..task.count].to_vec(),
        dbias: dbias[..task.count].to_vec(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_task_avx2<const W: usize>(
    p: &ScanSlices<'_>,
    dy: (Option<&[f32]>, (usize, usize)),
    task: &Task,
    du_rows: &mut [MaybeUninit<f32>],
    dd_rows: &mut [MaybeUninit<f32>],
    scratch: &mut BackwardScratch,
) -> TaskOut {
    backward_task::<true, W>(Isa::Avx2Fma, p, dy, task, du_rows, dd_rows, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn backward_task_avx512<const W: usize>(
    p: &ScanSlices<'_>,
    dy: (Option<&[f32]>, (usize, usize)),
    task: &Task,
    du_rows: &mut [MaybeUninit<f32>],
    dd_rows: &mut [MaybeUninit<f32>],
    scratch: &mut BackwardScratch,
) -> TaskOut {
    backward_task::<true, W>(Isa::Avx512, p, dy, task, du_rows, dd_rows, scratch)
}

/// Backward scan for the upstream gradient `dy [batch, channels, seq_len]`, with the fastest
/// [`Isa`] of this CPU.
pub fn backward(p: &ScanSlices<'_>, dy: &[f32]) -> Result<ScanGrads<f32>, ScanError> {
    backward_on(Isa::detect(), p, dy)
}

/// [`backward`] with the given instruction set (an error if this CPU lacks it).
pub fn backward_on(isa: Isa, p: &ScanSlices<'_>, dy: &[f32]) -> Result<ScanGrads<f32>, ScanError> {
    backward_upstream(isa, p, Upstream::Borrowed(dy))
}

/// [`backward`] for a caller that owns `dy`: `du` is written into `dy`'s buffer (each task reads
/// its rows of `dy` before it writes the same rows of `du`, and tasks own disjoint rows), one
/// `[B, D, L]` allocation fewer (on Burn's NdArray backend, a fresh buffer costs a page fault
/// per page and the kernel's zeroing). Same bits as [`backward`].
pub fn backward_reusing(p: &ScanSlices<'_>, dy: Vec<f32>) -> Result<ScanGrads<f32>, ScanError> {
    backward_reusing_on(Isa::detect(), p, dy)
}

/// [`backward_reusing`] with the given instruction set (an error if this CPU lacks it).
pub fn backward_reusing_on(
    isa: Isa,
    p: &ScanSlices<'_>,
    dy: Vec<f32>,
) -> Result<ScanGrads<f32>, ScanError> {
    backward_upstream(isa, p, Upstream::Owned(dy))
}

/// The upstream gradient `dy`: borrowed (`du` gets a new buffer) or owned (`du` reuses it).
enum Upstream<'a> {
    Borrowed(&'a [f32]),
    Owned(Vec<f32>),
}

fn backward_upstream(
    isa: Isa,
    p: &ScanSlices<'_>,
    dy: Upstream<'_>,
) -> Result<ScanGrads<f32>, ScanError> {
    p.validate()?;
    isa.check()?;
    let s = p.shape;
    let actual = match &dy {
        Upstream::Borrowed(dy) => dy.len(),
        Upstream::Owned(dy) => dy.len(),
    };
    if actual != s.bdl_len() {
        return Err(ScanError::Length {
            arg: "dy",
            expected: s.bdl_len(),
            actual,
        });
    }
    Ok(match isa.lanes() {
        16 => backward_lanes::<16>(isa, p, dy),
        _ => backward_lanes::<8>(isa, p, dy),
    })
}

fn backward_lanes<const W: usize>(
    isa: Isa,
    p: &ScanSlices<'_>,
    dy: Upstream<'_>,
) -> ScanGrads<f32> {
    let s = p.shape;
    let (l, n_state) = (s.seq_len, s.d_state);
    let (mut du, dy) = match dy {
        Upstream::Borrowed(dy) => (output_buffer(s.bdl_len()), Some(dy)),
        Upstream::Owned(dy) => (reuse_as_output(dy), None),
    };
    // Where all of `dy` is (for the prefetches): its own buffer, or `du`'s.
    let dy_whole = dy.map_or(whole(&du), whole);
    let mut ddelta = output_buffer(s.bdl_len());
    // A task's rows are consecutive in du/ddelta.
    type Rows<'a> = &'a mut [MaybeUninit<f32>];
    let mut tasks: Vec<(Task, Rows, Rows)> = Task::split(&s, W, &mut du)
        .into_iter()
        .zip(Task::split(&s, W, &mut ddelta))
        .map(|((task, du), (_, dd))| (task, du, dd))
        .collect();
    let run = |(task, du, dd): &mut (Task, Rows, Rows)| {
        let dy = (dy.map(|dy| task.rows(&s, dy)), dy_whole);
        BACKWARD_SCRATCH.with_borrow_mut(|scratch| match isa {
            // SAFETY: `backward_on` ran `isa.check()`, which found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { backward_task_avx2::<W>(p, dy, task, du, dd, scratch) },
            // SAFETY: as above, with AVX-512F too.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { backward_task_avx512::<W>(p, dy, task, du, dd, scratch) },
            Isa::Neon => backward_task::<true, W>(isa, p, dy, task, du, dd, scratch),
            _ => backward_task::<false, W>(isa, p, dy, task, du, dd, scratch),
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
                    da[ch * n_state + n] += out.da[n * task.count + k];
                }
            }
        }
    }
    drop(tasks);
    // SAFETY: the tasks' rows partition `du` and `ddelta`, and each task scattered all of its
    // rows of both.
    let (du, ddelta) = unsafe { (assume_written(du), assume_written(ddelta)) };
    ScanGrads {
        du,
        ddelta,
        da,
        db,
        dc,
        dd: p.d.map(|_| dd),
        ddelta_bias: p.delta_bias.map(|_| dbias),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX 8 × 8 transposes (and AVX-512's 16 × 16 ones, where the CPU has AVX-512) move
    /// exactly the values the portable loops move, gathers and scatters, for full and partial
    /// tasks of 8 and 16 lanes and lengths that are not a multiple of either tile.
    #[test]
    fn avx_transposes_match_the_portable_loops() {
        if !Isa::Avx2Fma.is_available() {
            println!("no AVX2 on this CPU: only the portable transposes run");
            return;
        }
        check::<8>();
        check::<16>();
        fn check<const W: usize>() {
            let wide = [Isa::Avx2Fma, Isa::Avx512];
            let avx_isas: Vec<Isa> = wide.into_iter().filter(|i| i.is_available()).collect();
            for (channels, l) in [(32, 37), (32, 8), (24, 21), (16, 1), (10, 16), (16, 61)] {
                let s = ScanShape::new(2, channels, l, 1, 1);
                let src: Vec<f32> = (0..s.bdl_len()).map(|i| i as f32 + 0.5).collect();
                let count = s.batch * s.groups * Task::blocks(&s, W);
                for index in 0..count {
                    let task = Task::new(&s, W, index);
                    let rows = task.rows(&s, &src);
                    let mut portable = vec![[0.0f32; W]; l];
                    let mut avx = vec![[0.0f32; W]; l];
                    let src = (rows, task.count, l);
                    gather(Isa::Portable, src, (0, l), &mut portable, None);
                    for &isa in &avx_isas {
                        gather(isa, src, (0, l), &mut avx, None);
                        assert_eq!(
                            portable, avx,
                            "gather, {isa:?}, W = {W}, {channels} channels, L = {l}"
                        );
                    }
                    for (t, v) in portable.iter().enumerate() {
                        for (k, x) in v.iter().enumerate() {
                            let expected = if k < task.count { rows[k * l + t] } else { 0.0 };
                            assert_eq!(*x, expected);
                        }
                    }
                    // `scatter_block` over every block, as the scan's last states call it, into
                    // initialised buffers (a value the scatter does not write stays -1).
                    let scatter_all = |isa: Isa| {
                        let mut out = reuse_as_output(vec![-1.0; task.count * l]);
                        for t0 in (0..l).step_by(BLOCK) {
                            let n = BLOCK.min(l - t0);
                            let mut block = [[0.0f32; W]; BLOCK];
                            block[..n].copy_from_slice(&portable[t0..t0 + n]);
                            scatter_block(isa, &block, (t0, n), task.count, l, &mut out);
                        }
                        // SAFETY: initialised when created (and overwritten with values).
                        unsafe { assume_written(out) }
                    };
                    let rows_portable = scatter_all(Isa::Portable);
                    assert_eq!(rows_portable, rows);
                    for &isa in &avx_isas {
                        let rows_avx = scatter_all(isa);
                        assert_eq!(
                            rows_portable, rows_avx,
                            "scatter, {isa:?}, W = {W}, {channels} channels, L = {l}"
                        );
                    }
                    let bias: [f32; W] = std::array::from_fn(|k| 0.25 - k as f32);
                    gather(Isa::Portable, src, (0, l), &mut portable, Some(bias));
                    for &isa in &avx_isas {
                        gather(isa, src, (0, l), &mut avx, Some(bias));
                        assert_eq!(portable, avx, "gather + bias, {isa:?}, W = {W}, L = {l}");
                    }
                    for (t, v) in portable.iter().enumerate() {
                        for (k, x) in v.iter().enumerate().take(task.count) {
                            assert_eq!(*x, rows[k * l + t] + bias[k]);
                        }
                    }
                    // Steps `t0..t0 + n` alone (as `steps` gathers blocks): the same lanes.
                    for (t0, n) in [
                        (0, l / 2),
                        (l / 3, l - l / 3),
                        (l - 1, 1),
                        (l / 2, 9.min(l - l / 2)),
                        (l / 4, (l - l / 4).min(40)),
                    ] {
                        for isa in std::iter::once(Isa::Portable).chain(avx_isas.clone()) {
                            let mut part = vec![[0.0f32; W]; n];
                            gather(isa, src, (t0, n), &mut part, Some(bias));
                            assert_eq!(
                                part[..],
                                portable[t0..t0 + n],
                                "{isa:?}, steps {t0}..+{n}, W = {W}, L = {l}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The lane sum is the pairwise tree the docs state (lane `i` + lane `i + W/2`, halving).
    #[test]
    fn hsum_is_the_documented_pairwise_tree() {
        let v: [f32; 16] = std::array::from_fn(|i| (i as f32 + 1.0) * 0.1);
        let q8: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
        let q4: [f32; 4] = std::array::from_fn(|i| q8[i] + q8[i + 4]);
        let q2 = [q4[0] + q4[2], q4[1] + q4[3]];
        assert_eq!(hsum(v), q2[0] + q2[1]);
        let w: [f32; 8] = std::array::from_fn(|i| v[i]);
        let p4: [f32; 4] = std::array::from_fn(|i| w[i] + w[i + 4]);
        assert_eq!(hsum(w), (p4[0] + p4[2]) + (p4[1] + p4[3]));
    }
}
