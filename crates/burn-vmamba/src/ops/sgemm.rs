//! The f32 matrix product of the NdArray fast paths on x86-64 CPUs with AVX-512F: a 12 × 32
//! register-blocked micro-kernel (24 sixteen-lane accumulators) reading its operands in place
//! where their layout allows, threaded over blocks of the output.
//!
//! Every matrix product of the native NdArray ops (linear layers forward and backward, the
//! per-direction projections, the dense convolutions) goes through `ndarray::sgemm_to`, which
//! calls [`sgemm`] where [`enabled`] and matrixmultiply's sgemm elsewhere. matrixmultiply has
//! AVX2 + FMA kernels only (8 × 8 blocks of 256-bit registers, one broadcast per two multiply-adds);
//! on a core that runs 512-bit multiply-adds at full rate, twice the lanes per instruction and
//! 24 accumulators (12 broadcasts per 24 multiply-adds) are most of the difference.
//!
//! # Algorithm
//! - The output is cut into jobs of at most [`MC`] rows × a run of [`NR`]-column panels (enough
//!   jobs for every thread), and each job into `MR × NR` tiles; the inner dimension goes in
//!   blocks of [`KC`].
//! - The micro-kernel keeps its tile in 24 registers for a whole `KC` block: per step of `k`,
//!   two 16-lane loads of `B`'s row and 12 broadcasts of `A`'s column, 24 fused multiply-adds.
//!   It then writes the tile: the first block as `acc` (β = 0) or `acc + β·C`, each later block
//!   as `C + acc`. Tiles at the edges load and store through lane masks, so nothing outside
//!   `m × n` (or the operands) is read or written.
//! - Operands are read in place where they allow it: `A` through its strides (a tile's rows are
//!   12 cache-line streams, or one when `A` is transposed), `B` when its rows are contiguous.
//!   A `B` with strided columns (the transposed weights of a linear layer's input gradient) is
//!   first packed into `[KC][NR]` panels, in parallel. Packing every operand (the textbook
//!   loop nest) made the packing cost as much as half the kernel's time on the model's
//!   shapes, whose inner dimensions are short (96–768).
//! # Determinism
//! Every output element is the same sequence of operations whatever the number of threads:
//! one fused multiply-add chain over `k` inside each `KC` block (in order), blocks added in
//! order. Jobs only split the output, never the inner dimension.

use rayon::prelude::*;

/// Rows of the micro-kernel's tile.
const MR: usize = 12;
/// Columns of the micro-kernel's tile (two 16-lane registers).
const NR: usize = 32;
/// Inner-dimension block: a tile's rows of `A` (`KC × MR`, 12 KiB) and its panel of `B`
/// (`KC × NR`, 32 KiB) stay in the first two cache levels while it is computed.
const KC: usize = 256;
/// Rows of the output per job (8 micro-kernel rows, which reuse each `B` panel from cache).
const MC: usize = 8 * MR;

/// Whether [`sgemm`] can run on this CPU (x86-64 with AVX-512F, detected at run time).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the native ops use [`sgemm`]: where [`available`], unless the environment variable
/// `VMAMBA_NATIVE_SGEMM` is `0` when first asked (then matrixmultiply's, for comparisons).
pub(crate) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        available() && std::env::var("VMAMBA_NATIVE_SGEMM").map_or(true, |v| v != "0")
    })
}

/// A strided operand: its first element and `[row stride, column stride]` in elements.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    ptr: *const f32,
    strides: [usize; 2],
}

impl Operand {
    /// `values` read with `strides` from its first element.
    pub(crate) fn new(values: &[f32], strides: [usize; 2]) -> Self {
        Self {
            ptr: values.as_ptr(),
            strides,
        }
    }

    /// Element `(i, j)`.
    ///
    /// # Safety
    /// It is readable.
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        let [rs, cs] = self.strides;
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(i * rs + j * cs) }
    }
}

/// The output: its first element and its row stride (columns are contiguous).
#[derive(Clone, Copy)]
struct Output {
    ptr: *mut f32,
    row_stride: usize,
}

// SAFETY: the pointers are only dereferenced inside `sgemm`'s contract: operands are read-only,
// and every job writes a disjoint block of the output.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// How a micro-kernel writes its tile.
#[derive(Clone, Copy)]
enum Store {
    /// `C = acc` (first block of `k`, β = 0: `C` is never read).
    Overwrite,
    /// `C = acc + β·C` (first block, β ≠ 0).
    Scale(f32),
    /// `C = C + acc` (every later block).
    Accumulate,
}

/// `C = A·B + β·C` for `A [m, k]`, `B [k, n]` (strided) and the row-major block `C [m, n]`
/// with row stride `rsc`; with β = 0, `C` is written without being read (zeros when `k = 0`).
///
/// # Safety
/// [`available`] is true; every element the operands address (`i·rs + j·cs` for `i < rows`,
/// `j < cols`) is readable; `C`'s `m` rows of `n` values at stride `rsc` are writable (and
/// initialised if β ≠ 0) and overlap neither operand.
pub(crate) unsafe fn sgemm(
    [m, k, n]: [usize; 3],
    a: Operand,
    b: Operand,
    beta: f32,
    c: *mut f32,
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let out = Output {
        ptr: c,
        row_stride: rsc,
    };
    if k == 0 {
        for i in 0..m {
            // SAFETY: row `i` of the output holds `n` writable (and, with β ≠ 0, initialised)
            // values (the caller's contract).
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * rsc), n) };
            for v in row {
                *v = if beta == 0.0 { 0.0 } else { beta * *v };
            }
        }
        return;
    }
    let panels = n.div_ceil(NR);
    let b_panels = BPanels {
        b,
        // A `B` with contiguous rows is read in place (each panel's rows are 32 consecutive
        // values, loaded under a mask at the right edge); any other is packed first.
        // SAFETY: `b`'s elements are readable (the caller's contract).
        packed: (b.strides[1] != 1).then(|| unsafe { pack_b(b, k, n) }),
        panels,
    };
    let m_blocks = m.div_ceil(MC);
    let threads = rayon::current_num_threads().max(1);
    // Enough jobs for every thread (twice, for balance), never a panel split.
    let n_chunks = (2 * threads).div_ceil(m_blocks).clamp(1, panels);
    let per_chunk = panels.div_ceil(n_chunks);
    let jobs: Vec<(usize, usize)> = (0..m_blocks)
        .flat_map(|mb| (0..panels).step_by(per_chunk).map(move |p0| (mb, p0)))
        .collect();
    let run = |&(mb, p0): &(usize, usize)| {
        let rows = mb * MC..(mb * MC + MC).min(m);
        let panel_range = p0..(p0 + per_chunk).min(panels);
        // SAFETY: as `sgemm`'s contract; the job's output block is its own.
        unsafe { job(rows, panel_range, [k, n], a, &b_panels, beta, out) };
    };
    if jobs.len() == 1 || m * n * k < 1 << 15 {
        jobs.iter().for_each(run);
    } else {
        jobs.par_iter().for_each(run);
    }
}

/// Where the micro-kernel finds panel `j` of `B` for the block of `k` from `k0`: in `B` itself
/// (contiguous rows) or in its packed copy.
struct BPanels {
    b: Operand,
    /// `B` packed by [`pack_b`], where its columns are strided.
    packed: Option<Vec<f32>>,
    panels: usize,
}

impl BPanels {
    /// The first element of panel `j`, block `k0..k0 + kc`, and the stride between its rows.
    fn panel(&self, k0: usize, kc: usize, j: usize) -> (*const f32, usize) {
        match &self.packed {
            // Block `k0 / KC` starts at `k0·panels·NR`, its panel `j` at `j·kc·NR` after that.
            Some(p) => (p[k0 * self.panels * NR + j * kc * NR..].as_ptr(), NR),
            None => (
                self.b
                    .ptr
                    .wrapping_add(k0 * self.b.strides[0] + j * NR * self.b.strides[1]),
                self.b.strides[0],
            ),
        }
    }
}

/// `B [k, n]` packed block by block of [`KC`] rows, each block as panels of `[kc][NR]`
/// (zero-padded past `n`): block `kb` starts at `kb·KC·panels·NR`, its panel `j` at
/// `j·kc·NR` after that.
///
/// # Safety
/// Every element of `b` (`[k, n]` with its strides) is readable.
unsafe fn pack_b(b: Operand, k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut packed = vec![0.0f32; k * panels * NR];
    for (kb, block) in packed.chunks_mut(KC * panels * NR).enumerate() {
        let k0 = kb * KC;
        let kc = (k - k0).min(KC);
        block
            .par_chunks_mut(kc * NR)
            .enumerate()
            .for_each(|(j, panel)| {
                let cols = (n - j * NR).min(NR);
                // Column by column: each reads `kc` values at `B`'s row stride (contiguous for
                // the transposed operands this path gets).
                for col in 0..cols {
                    for p in 0..kc {
                        // SAFETY: `p < kc`, `col < cols`: inside `b`'s `[k, n]` (the caller's
                        // contract).
                        panel[p * NR + col] = unsafe { b.at(k0 + p, j * NR + col) };
                    }
                }
            });
    }
    packed
}

/// One job: output rows `rows` × panels `panel_range`, every block of `k`. `A` is read in place
/// (the micro-kernel broadcasts its elements through the strides).
///
/// # Safety
/// As [`sgemm`]; no other job writes this block.
unsafe fn job(
    rows: std::ops::Range<usize>,
    panel_range: std::ops::Range<usize>,
    [k, n]: [usize; 2],
    a: Operand,
    b: &BPanels,
    beta: f32,
    out: Output,
) {
    let [rsa, csa] = a.strides;
    for (kb, k0) in (0..k).step_by(KC).enumerate() {
        let kc = (k - k0).min(KC);
        let store = match (kb, beta == 0.0) {
            (0, true) => Store::Overwrite,
            (0, false) => Store::Scale(beta),
            _ => Store::Accumulate,
        };
        for j in panel_range.clone() {
            let (b_panel, rsb) = b.panel(k0, kc, j);
            let cols = (n - j * NR).min(NR);
            for row0 in rows.clone().step_by(MR) {
                let tile_rows = (rows.end - row0).min(MR);
                // SAFETY: the tile `[row0, row0 + tile_rows) × [j·NR, j·NR + cols)` is inside
                // this job's block of the output; `A`'s rows `row0..row0 + tile_rows`, columns
                // `k0..k0 + kc`, and the panel's `kc` rows of `cols` values are readable.
                unsafe {
                    let tile = out.ptr.add(row0 * out.row_stride + j * NR);
                    let a_tile = Operand {
                        ptr: a.ptr.add(row0 * rsa + k0 * csa),
                        strides: [rsa, csa],
                    };
                    let b_tile = Operand {
                        ptr: b_panel,
                        strides: [rsb, 1],
                    };
                    kernel(
                        kc,
                        a_tile,
                        b_tile,
                        tile,
                        out.row_stride,
                        [tile_rows, cols],
                        store,
                    );
                }
            }
        }
    }
}

/// The `MR × NR` tile `C[..rows, ..cols]` (row stride `rsc`) from `kc` steps: `A`'s `rows`
/// rows (broadcast element by element through its strides; rows past `rows` repeat the last,
/// whose results are never stored) times `B`'s `kc` rows of `cols` values (two 16-lane loads
/// per row, masked past `cols`), written as `store` says.
///
/// # Safety
/// AVX-512F is available; `a` addresses `rows × kc` and `b` `kc × cols` readable values; the
/// tile's `rows` rows of `cols` values are writable (and initialised unless `store` is
/// `Overwrite`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(
    kc: usize,
    a: Operand,
    b: Operand,
    c: *mut f32,
    rsc: usize,
    [rows, cols]: [usize; 2],
    store: Store,
) {
    use std::arch::x86_64::*;
    let [rsa, csa] = a.strides;
    let rsb = b.strides[0];
    let mut row_ptrs = [a.ptr; MR];
    for (r, p) in row_ptrs.iter_mut().enumerate() {
        *p = a.ptr.wrapping_add(r.min(rows - 1) * rsa);
    }
    let lane_mask = |half: usize| -> __mmask16 {
        let lanes = cols.saturating_sub(16 * half).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    };
    let masks = [lane_mask(0), lane_mask(1)];
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // SAFETY: row `p` of the panel holds `cols` readable values; masked-off lanes are not
        // read. Rows `r < rows` of `A` hold column `p` (rows past `rows` point at the last).
        unsafe {
            let b_row = b.ptr.add(p * rsb);
            let b0 = _mm512_maskz_loadu_ps(masks[0], b_row);
            let b1 = _mm512_maskz_loadu_ps(masks[1], b_row.add(16));
            for (acc, row) in acc.iter_mut().zip(&row_ptrs) {
                let a = _mm512_set1_ps(*row.add(p * csa));
                acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (half, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
            if mask == 0 {
                continue;
            }
            // SAFETY: the lanes under `mask` are the tile's columns of row `r` (the caller's
            // contract); masked-off lanes are neither read nor written.
            unsafe {
                let p = c.add(r * rsc + 16 * half);
                let v = match store {
                    Store::Overwrite => acc,
                    Store::Scale(beta) => {
                        _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, p), acc)
                    }
                    Store::Accumulate => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc),
                };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: Operand, _: Operand, _: *mut f32, _: usize, _: [usize; 2], _: Store) {
    unreachable!("sgemm::kernel runs only where `available()` (x86-64 with AVX-512F)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use selective_scan::SplitMix64;

    /// `A·B + β·C` in f64 and the error bound of an f32 sum of `k` products: `(k + 2)·ε` times
    /// `Σ|a b| + |β c|` per element.
    fn reference(
        [m, k, n]: [usize; 3],
        (a, [rsa, csa]): (&[f32], [usize; 2]),
        (b, [rsb, csb]): (&[f32], [usize; 2]),
        beta: f32,
        c: &[f32],
    ) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut mag) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let prod = f64::from(a[i * rsa + p * csa]) * f64::from(b[p * rsb + j * csb]);
                    sum += prod;
                    mag += prod.abs();
                }
                let scaled = if beta == 0.0 {
                    0.0
                } else {
                    f64::from(beta) * f64::from(c[i * n + j])
                };
                let eps = f64::from(f32::EPSILON);
                out.push((sum + scaled, (k as f64 + 2.0) * eps * (mag + scaled.abs())));
            }
        }
        out
    }

    /// Runs [`sgemm`] into a `[m, n]` block of a wider buffer (row stride `n + 3`, NaN around
    /// it) and returns the block, after checking that nothing around it was touched.
    fn run(
        shape @ [m, _, n]: [usize; 3],
        (a, sa): (&[f32], [usize; 2]),
        (b, sb): (&[f32], [usize; 2]),
        beta: f32,
        c: &[f32],
    ) -> Vec<f32> {
        let rsc = n + 3;
        let mut buf = vec![f32::NAN; m * rsc + 5];
        for i in 0..m {
            buf[i * rsc..i * rsc + n].copy_from_slice(&c[i * n..(i + 1) * n]);
        }
        // SAFETY: the test runs only where `available()`; the operands cover their shapes and
        // strides; the block is inside `buf`.
        unsafe {
            sgemm(
                shape,
                Operand::new(a, sa),
                Operand::new(b, sb),
                beta,
                buf.as_mut_ptr(),
                rsc,
            )
        };
        let mut block = Vec::with_capacity(m * n);
        for (i, row) in buf.chunks(rsc).enumerate() {
            let (inside, outside) = row.split_at(n.min(row.len()));
            if i < m {
                block.extend_from_slice(inside);
            }
            let untouched = if i < m { outside } else { row };
            assert!(
                untouched.iter().all(|v| v.is_nan()),
                "wrote outside the block"
            );
        }
        block
    }

    #[test]
    fn matches_f64_for_every_edge_layout_and_beta() {
        if !available() {
            eprintln!(
                "sgemm: no AVX-512F on this CPU; matrixmultiply is used instead (untested here)"
            );
            return;
        }
        let mut rng = SplitMix64::new(11);
        let mut worst = 0.0f64;
        // Tile edges (MR = 12, NR = 32), KC = 256 block edges, MC = 96 job edges, k = 0, 1.
        let shapes = [
            [1, 1, 1],
            [5, 3, 7],
            [12, 256, 32],
            [13, 257, 33],
            [97, 300, 65],
            [200, 520, 70],
            [3, 0, 5],
            [40, 1, 100],
            [1, 700, 1],
        ];
        for shape @ [m, k, n] in shapes {
            for (a_t, b_t, beta) in [
                (false, false, 0.0),
                (true, false, 0.0),
                (false, true, 1.0),
                (true, true, 0.5),
            ] {
                let a = rng.vec(m * k, -1.0, 1.0);
                let b = rng.vec(k * n, -1.0, 1.0);
                let c = rng.vec(m * n, -1.0, 1.0);
                // Transposed operands are read through their strides (as `linear_backward`).
                let sa = if a_t { [1, m] } else { [k, 1] };
                let sb = if b_t { [1, k] } else { [n, 1] };
                let got = run(shape, (&a, sa), (&b, sb), beta, &c);
                let want = reference(shape, (&a, sa), (&b, sb), beta, &c);
                for (g, (w, bound)) in got.iter().zip(want) {
                    let err = (f64::from(*g) - w).abs();
                    assert!(
                        err <= bound,
                        "{shape:?} a_t={a_t} b_t={b_t} β={beta}: {g} vs {w} (bound {bound:.2e})"
                    );
                    worst = worst.max(err / bound.max(f64::MIN_POSITIVE));
                }
            }
        }
        println!("sgemm: worst error {worst:.3} of its bound");
    }

    #[test]
    fn same_bits_on_one_thread_and_many() {
        if !available() {
            eprintln!("sgemm: no AVX-512F on this CPU; nothing to check");
            return;
        }
        let mut rng = SplitMix64::new(12);
        let shape @ [m, k, n] = [300, 600, 200];
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let c = vec![0.0; m * n];
        let in_pool = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(shape, (&a, [k, 1]), (&b, [n, 1]), 0.0, &c))
        };
        let one = in_pool(1);
        for threads in [2, 3, 7] {
            let many = in_pool(threads);
            assert!(
                one.iter()
                    .zip(&many)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads changed the bits"
            );
        }
    }
}
