//! `NdArray`: the native fused CPU scan of `selective_scan::cpu` (rayon over rows and channel
//! blocks, f32 state, no `[B, D, L, N]` tensor). The kernels read the tensors' own contiguous
//! f32 buffers in place and write new tensors; the backward recomputes the states (nothing is
//! saved).

use std::borrow::Cow;

use burn::backend::NdArray;
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::TensorMetadata;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use selective_scan::ScanShape;
use selective_scan::cpu::{self, ScanSlices};

use super::{LayerGradients, ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

/// The f32 values of an NdArray tensor in row-major order: borrowed when the buffer already is
/// contiguous f32 (the common case: no copy), gathered otherwise. (Burn's generic `into_data`
/// walks shared arrays element by element, ≈ 30 ms per million values here, which would cost
/// more than the scan.)
fn values(t: &NdArrayTensor) -> Cow<'_, [f32]> {
    match t {
        NdArrayTensor::F32(storage) => {
            let view = storage.view();
            if view.is_standard_layout() {
                Cow::Borrowed(view.to_slice().expect("standard layout is contiguous"))
            } else {
                Cow::Owned(view.iter().copied().collect())
            }
        }
        NdArrayTensor::F64(storage) => {
            Cow::Owned(storage.view().iter().map(|&x| x as f32).collect())
        }
        other => panic!(
            "selective_scan: expected a float tensor, got {:?}",
            other.dtype()
        ),
    }
}

/// The buffer of an f32 tensor that nothing else holds, contiguous from its start (then the
/// scan may write over it: no copy, no new allocation); the tensor back otherwise.
fn owned_values(t: NdArrayTensor) -> Result<Vec<f32>, NdArrayTensor> {
    match t {
        NdArrayTensor::F32(storage)
            if storage.is_unique() && storage.view().is_standard_layout() =>
        {
            let shape = storage.shape().to_vec();
            let len = storage.len();
            // Unique: the Arc is unwrapped, nothing is copied.
            let (values, offset) = storage.into_owned().into_owned().into_raw_vec_and_offset();
            let start = offset.unwrap_or(0);
            if start == 0 && values.len() == len {
                Ok(values)
            } else {
                // A view into a larger buffer: the same values as a tensor of their own.
                Err(tensor(values[start..start + len].to_vec(), &shape))
            }
        }
        other => Err(other),
    }
}

/// The inputs' values, in place where possible.
struct HostInputs<'a> {
    u: Cow<'a, [f32]>,
    delta: Cow<'a, [f32]>,
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    c: Cow<'a, [f32]>,
    d: Option<Cow<'a, [f32]>>,
    delta_bias: Option<Cow<'a, [f32]>>,
}

impl<'a> HostInputs<'a> {
    fn new<B: Backend<FloatTensorPrimitive = NdArrayTensor>>(t: &'a ScanTensors<B>) -> Self {
        Self {
            u: values(&t.u),
            delta: values(&t.delta),
            a: values(&t.a),
            b: values(&t.b),
            c: values(&t.c),
            d: t.d.as_ref().map(values),
            delta_bias: t.delta_bias.as_ref().map(values),
        }
    }

    fn slices(&self, shape: ScanShape, options: ScanOptions) -> ScanSlices<'_> {
        ScanSlices {
            shape,
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            delta_bias: self.delta_bias.as_deref(),
            delta_softplus: options.delta_softplus,
        }
    }
}

/// `depthwise_conv(x)`, then SiLU if `silu`: `x [batch, height, width, channels]` (channel-last,
/// contiguous), `weight [channels, k, k]`, zero padding `(k − 1)/2`, stride 1 → `[batch,
/// channels, height, width]`. One rayon task per output row `(batch, i)`: the row is
/// accumulated channel-last (the inner loop runs over contiguous channels and vectorises), tap
/// by tap in the order `(p, q)` row-major after the bias, then SiLU'd and written out channel
/// by channel.
fn depthwise_conv(
    x: &[f32],
    [batch, height, width, channels]: [usize; 4],
    weight: &[f32],
    k: usize,
    bias: Option<&[f32]>,
    silu: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let pad = k / 2;
    let taps = taps_channel_last(weight, channels, k);
    let plane = height * width;
    let mut y = vec![0.0f32; batch * channels * plane];
    // Rows of the output are strided in [batch, channels, height, width]: each task returns
    // its row channel-last and the rows are written out afterwards, batch by batch.
    for (b, y_b) in y.chunks_mut(channels * plane).enumerate() {
        let rows: Vec<Vec<f32>> = (0..height)
            .into_par_iter()
            .map(|i| {
                let mut acc = vec![0.0f32; width * channels];
                for (j, a) in acc.chunks_exact_mut(channels).enumerate() {
                    match bias {
                        Some(bias) => a.copy_from_slice(bias),
                        None => a.fill(0.0),
                    }
                    for p in 0..k {
                        let Some(r) = (i + p).checked_sub(pad).filter(|r| *r < height) else {
                            continue;
                        };
                        for q in 0..k {
                            let Some(s) = (j + q).checked_sub(pad).filter(|s| *s < width) else {
                                continue;
                            };
                            let at = ((b * height + r) * width + s) * channels;
                            let xs = &x[at..at + channels];
                            let w = &taps[(p * k + q) * channels..(p * k + q + 1) * channels];
                            for ((a, x), w) in a.iter_mut().zip(xs).zip(w) {
                                *a += w * x;
                            }
                        }
                    }
                    if silu {
                        for a in a.iter_mut() {
                            *a *= selective_scan::fastmath::sigmoid(*a);
                        }
                    }
                }
                acc
            })
            .collect();
        for (i, row) in rows.iter().enumerate() {
            for c in 0..channels {
                let out = &mut y_b[c * plane + i * width..c * plane + (i + 1) * width];
                for (j, o) in out.iter_mut().enumerate() {
                    *o = row[j * channels + c];
                }
            }
        }
    }
    y
}

/// A depthwise kernel `[channels, k, k]` as `[p, q, channel]`, so that loops over channels read
/// the taps contiguously.
fn taps_channel_last(weight: &[f32], channels: usize, k: usize) -> Vec<f32> {
    let mut taps = vec![0.0f32; k * k * channels];
    for c in 0..channels {
        for pq in 0..k * k {
            taps[pq * channels + c] = weight[c * k * k + pq];
        }
    }
    taps
}

/// The gradients of [`depthwise_conv`] (without SiLU) for `dy` given channel-last (`[batch,
/// height, width, channels]`, [`channel_last_values`], so that every loop runs over contiguous
/// channels), with `x [batch, height, width, channels]` and `weight [channels, k, k]`:
/// `dx [batch, height, width, channels]`, `dweight [channels, k, k]` and `dbias [channels]`,
/// each where `needed`.
/// `dx[b, r, s] = Σ_{p,q} w[p, q] · dy[b, r + pad − p,
/// s + pad − q]` (the convolution with the flipped kernel, taps in `(p, q)` order) per input
/// row; `dweight[p, q] = Σ_{b,i,j} dy[b, i, j] · x[b, i + p − pad, j + q − pad]` and
/// `dbias = Σ dy` as partial sums per output row `(b, i)` (over `j` in order), added in row
/// order afterwards: the bits do not depend on the number of threads.
fn depthwise_conv_backward(
    x: &[f32],
    [batch, height, width, channels]: [usize; 4],
    weight: &[f32],
    k: usize,
    dy_cl: &[f32],
    [need_x, need_weight, need_bias]: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    use rayon::prelude::*;
    let pad = k / 2;
    let plane = height * width;
    let row = width * channels;
    // The window of output row `i`'s tap row `p`: input row `i + p − pad`, if inside.
    let tap_row = |i: usize, p: usize| (i + p).checked_sub(pad).filter(|r| *r < height);
    let tap_col = |j: usize, q: usize| (j + q).checked_sub(pad).filter(|s| *s < width);
    let dx = need_x.then(|| {
        let taps = taps_channel_last(weight, channels, k);
        let mut dx = vec![0.0f32; batch * plane * channels];
        dx.par_chunks_mut(row).enumerate().for_each(|(br, out)| {
            let (b, r) = (br / height, br % height);
            for (s, acc) in out.chunks_exact_mut(channels).enumerate() {
                for p in 0..k {
                    // Output row i with i + p − pad = r.
                    let Some(i) = (r + pad).checked_sub(p).filter(|i| *i < height) else {
                        continue;
                    };
                    for q in 0..k {
                        let Some(j) = (s + pad).checked_sub(q).filter(|j| *j < width) else {
                            continue;
                        };
                        let at = ((b * height + i) * width + j) * channels;
                        let g = &dy_cl[at..at + channels];
                        let w = &taps[(p * k + q) * channels..(p * k + q + 1) * channels];
                        for ((a, g), w) in acc.iter_mut().zip(g).zip(w) {
                            *a += w * g;
                        }
                    }
                }
            }
        });
        dx
    });
    let (dweight, dbias) = if need_weight || need_bias {
        // Per output row: [k·k + 1][channels] (the taps' sums, then the bias').
        let partials: Vec<Vec<f32>> = (0..batch * height)
            .into_par_iter()
            .map(|bi| {
                let (b, i) = (bi / height, bi % height);
                let mut sums = vec![0.0f32; (k * k + 1) * channels];
                for j in 0..width {
                    let at = ((b * height + i) * width + j) * channels;
                    let g = &dy_cl[at..at + channels];
                    let (taps, bias) = sums.split_at_mut(k * k * channels);
                    for (s, g) in bias.iter_mut().zip(g) {
                        *s += g;
                    }
                    for p in 0..k {
                        let Some(r) = tap_row(i, p) else { continue };
                        for q in 0..k {
                            let Some(c) = tap_col(j, q) else { continue };
                            let at = ((b * height + r) * width + c) * channels;
                            let xs = &x[at..at + channels];
                            let s = &mut taps[(p * k + q) * channels..(p * k + q + 1) * channels];
                            for ((s, g), x) in s.iter_mut().zip(g).zip(xs) {
                                *s += g * x;
                            }
                        }
                    }
                }
                sums
            })
            .collect();
        let total = sum_in_order(&partials, (k * k + 1) * channels);
        let dweight = need_weight.then(|| {
            let mut w = vec![0.0f32; channels * k * k];
            for c in 0..channels {
                for pq in 0..k * k {
                    w[c * k * k + pq] = total[pq * channels + c];
                }
            }
            w
        });
        let dbias = need_bias.then(|| total[k * k * channels..].to_vec());
        (dweight, dbias)
    } else {
        (None, None)
    };
    [dx, dweight, dbias]
}

/// `x [m, k] · weight [k, n] (+ bias)` (see [`SelectiveScanBackend::native_linear`]): one matrix
/// product ([`gemm`], threaded) written straight into a new, uninitialised
/// buffer, then the bias added row by row, the order of Burn's `matmul` then `add`.
fn linear(x: &[f32], weight: &[f32], bias: Option<&[f32]>, [m, k, n]: [usize; 3]) -> Vec<f32> {
    assert!(
        x.len() == m * k && weight.len() == k * n,
        "linear: x is [m, k], weight [k, n]"
    );
    let mut y = gemm((x, [k, 1]), (weight, [n, 1]), [m, k, n]);
    if let Some(bias) = bias {
        add_bias_rows(&mut y, bias);
    }
    y
}

/// `a [m, k] · b [k, n]` into a new row-major `[m, n]` buffer, each operand given as its values
/// and `[row stride, column stride]` (a transposed operand is read through its strides, not
/// copied), written straight into uninitialised memory ([`sgemm_to`]).
fn gemm(a: (&[f32], [usize; 2]), b: (&[f32], [usize; 2]), [m, k, n]: [usize; 3]) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `y` has capacity for the m × n output; with β = 0 `sgemm_to` writes every element
    // of it without reading it, so all m·n values are initialised when the length is set.
    unsafe {
        sgemm_to(a, b, [m, k, n], 0.0, y.as_mut_ptr());
        y.set_len(m * n);
    }
    y
}

/// `out = a · b + beta · out` for `a [m, k]`, `b [k, n]` given as values and `[row stride,
/// column stride]`, `out [m, n]` row-major and initialised ([`sgemm_to`]).
///
/// Panics if `out` is shorter than `m · n`.
fn gemm_into(
    a: (&[f32], [usize; 2]),
    b: (&[f32], [usize; 2]),
    [m, k, n]: [usize; 3],
    out: &mut [f32],
    beta: f32,
) {
    assert!(out.len() >= m * n, "gemm_into: out is shorter than m · n");
    // SAFETY: `out` holds m·n initialised values (asserted).
    unsafe { sgemm_to(a, b, [m, k, n], beta, out.as_mut_ptr()) }
}

/// `out = a · b + beta · out` for `a [m, k]`, `b [k, n]` given as values and `[row stride,
/// column stride]`, into the row-major `[m, n]` block at `out`, threaded over output blocks
/// (the inner dimension is never split, so the bits do not depend on the number of threads):
/// the AVX-512 kernel of [`super::sgemm`] where the CPU has AVX-512F (unless
/// `VMAMBA_NATIVE_SGEMM=0`), matrixmultiply's sgemm (AVX2 + FMA or portable kernels)
/// elsewhere. With β = 0 the output is written without being read (also for k = 0, where it
/// is zeros).
///
/// Panics if an operand's values do not cover its strided extent.
///
/// # Safety
/// `out` is valid for writes of `m · n` f32 (and holds initialised values if `beta ≠ 0`), and
/// does not overlap the operands.
unsafe fn sgemm_to(
    (a, [rsa, csa]): (&[f32], [usize; 2]),
    (b, [rsb, csb]): (&[f32], [usize; 2]),
    [m, k, n]: [usize; 3],
    beta: f32,
    out: *mut f32,
) {
    assert!(
        a.len() >= extent([m, k], [rsa, csa]) && b.len() >= extent([k, n], [rsb, csb]),
        "sgemm: an operand is shorter than its shape and strides"
    );
    if super::sgemm::enabled() {
        use super::sgemm::{Operand, sgemm};
        // SAFETY: `enabled()` implies `available()`; every element the strided operands
        // address lies inside their slices (asserted); the output block is the caller's
        // contract.
        unsafe {
            sgemm(
                [m, k, n],
                Operand::new(a, [rsa, csa]),
                Operand::new(b, [rsb, csb]),
                beta,
                out,
                n,
            );
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("strides fit isize");
    // SAFETY: every element the strided operands address lies inside their slices (asserted);
    // the output block is the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            stride(rsa),
            stride(csa),
            b.as_ptr(),
            stride(rsb),
            stride(csb),
            beta,
            out,
            stride(n),
            1,
        );
    }
}

/// Values a `[rows, cols]` operand with strides `[row, column]` spans.
fn extent([rows, cols]: [usize; 2], [rs, cs]: [usize; 2]) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Rows per block of [`column_sums`]: fixed, so that the sums' order (and bits) never depends
/// on the number of threads.
const SUM_ROWS: usize = 256;

/// `Σ_rows y` of a row-major `[rows, n]` buffer: blocks of [`SUM_ROWS`] rows summed in parallel
/// (rows in order within a block), then the blocks' sums added in block order.
fn column_sums(y: &[f32], n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let partials: Vec<Vec<f32>> = y
        .par_chunks(n.max(1) * SUM_ROWS)
        .map(|rows| {
            let mut sums = vec![0.0f32; n];
            for row in rows.chunks_exact(n.max(1)) {
                for (s, v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    sum_in_order(&partials, n)
}

/// `Σ partials` elementwise, adding the partials in their order (so the bits depend only on
/// how the partials were cut, never on the threads that made them).
fn sum_in_order(partials: &[Vec<f32>], n: usize) -> Vec<f32> {
    let mut total = vec![0.0f32; n];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}

/// The gradients of `y = x · weight (+ bias)` for `dy` (see
/// [`SelectiveScanBackend::native_linear_backward`]) on row-major buffers `x [m, k]`,
/// `weight [k, n]`, `dy [m, n]`: `dx = dy · weightᵀ`, `dweight = xᵀ · dy`, `dbias = Σ_rows dy`,
/// each where `needed`.
fn linear_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    [m, k, n]: [usize; 3],
    [need_x, need_weight, need_bias]: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    [
        need_x.then(|| gemm((dy, [n, 1]), (weight, [1, n]), [m, n, k])),
        need_weight.then(|| gemm((x, [1, k]), (dy, [n, 1]), [k, m, n])),
        need_bias.then(|| column_sums(dy, n)),
    ]
}

/// `row += bias` for every row of a row-major `[rows, bias.len()]` buffer (rayon over blocks
/// of rows): the bias pass after a product, as Burn adds it.
fn add_bias_rows(y: &mut [f32], bias: &[f32]) {
    use rayon::prelude::*;
    let n = bias.len().max(1);
    y.par_chunks_mut(n * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// [`SelectiveScanBackend::native_layer_norm`] on a row-major `[rows, C]` buffer: per row the
/// mean, the mean of squared deviations (f32, as Burn's ops), then `(x − mean) / sqrt(var +
/// epsilon) · gamma + beta`; rayon over blocks of rows.
fn layer_norm(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, epsilon: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let c = gamma.len().max(1);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let mean = x.iter().sum::<f32>() / c as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let denom = (var + epsilon).sqrt();
                for (i, (out, v)) in y.iter_mut().zip(x).enumerate() {
                    let scaled = (v - mean) / denom * gamma[i];
                    *out = match beta {
                        Some(beta) => scaled + beta[i],
                        None => scaled,
                    };
                }
            }
        });
    y
}

/// [`SelectiveScanBackend::native_direction_matmul`] on row-major buffers: `weight [K, M, D]`,
/// `x [batch, K, D, L]` → `[batch, K, M, L]`, one sgemm (threaded) per (image, direction) into
/// an uninitialised output.
fn direction_matmul(
    weight: &[f32],
    x: &[f32],
    [batch, directions, m, d, l]: [usize; 5],
) -> Vec<f32> {
    assert!(
        weight.len() == directions * m * d && x.len() == batch * directions * d * l,
        "direction_matmul: weight is [K, M, D], x [batch, K, D, L]"
    );
    let mut y: Vec<f32> = Vec::with_capacity(batch * directions * m * l);
    for bk in 0..batch * directions {
        let k = bk % directions;
        let w_k = (&weight[k * m * d..(k + 1) * m * d], [d, 1]);
        let x_bk = (&x[bk * d * l..(bk + 1) * d * l], [l, 1]);
        // SAFETY: the output block [M, L] at bk·M·L lies inside the capacity and is written
        // whole (β = 0), so after the loop all batch·K·M·L values are initialised.
        unsafe { sgemm_to(w_k, x_bk, [m, d, l], 0.0, y.as_mut_ptr().add(bk * m * l)) };
    }
    // SAFETY: see above: every element was written.
    unsafe { y.set_len(batch * directions * m * l) };
    y
}

/// The gradients of [`direction_matmul`] for `dy [batch, K, M, L]` (row-major buffers, as
/// there): `dx [batch, K, D, L]` with `dx[b, k] = weight[k]ᵀ · dy[b, k]`, and `dweight [K, M, D]`
/// with `dweight[k] = Σ_b dy[b, k] · x[b, k]ᵀ` (images in order), each where `needed`.
fn direction_matmul_backward(
    weight: &[f32],
    x: &[f32],
    dy: &[f32],
    [batch, directions, m, d, l]: [usize; 5],
    [need_x, need_weight]: [bool; 2],
) -> [Option<Vec<f32>>; 2] {
    let dx = need_x.then(|| {
        let mut dx = vec![0.0f32; batch * directions * d * l];
        for (bk, dx_bk) in dx.chunks_exact_mut(d * l).enumerate() {
            let k = bk % directions;
            let w_t = (&weight[k * m * d..(k + 1) * m * d], [1, d]);
            let dy_bk = (&dy[bk * m * l..(bk + 1) * m * l], [l, 1]);
            gemm_into(w_t, dy_bk, [d, m, l], dx_bk, 0.0);
        }
        dx
    });
    let dweight = need_weight.then(|| {
        let mut dw = vec![0.0f32; directions * m * d];
        for b in 0..batch {
            for (k, dw_k) in dw.chunks_exact_mut(m * d).enumerate() {
                let bk = b * directions + k;
                let dy_bk = (&dy[bk * m * l..(bk + 1) * m * l], [l, 1]);
                let x_t = (&x[bk * d * l..(bk + 1) * d * l], [1, l]);
                gemm_into(dy_bk, x_t, [m, l, d], dw_k, 1.0);
            }
        }
        dw
    });
    [dx, dweight]
}

/// [`SelectiveScanBackend::native_cross_scan`] on a row-major `[batch, channels, height, width]`
/// buffer: per (batch, channel) row, direction 0 is the map row-major, 1 column-major, 2 and 3
/// the same reversed.
fn cross_scan(x: &[f32], [batch, channels, height, width]: [usize; 4]) -> Vec<f32> {
    use rayon::prelude::*;
    let len = height * width;
    let mut out = vec![0.0f32; batch * 4 * channels * len];
    out.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
        // row = (b·4 + k)·channels + c
        let (b, k, c) = (row / (4 * channels), (row / channels) % 4, row % channels);
        let map = &x[(b * channels + c) * len..][..len];
        match k {
            0 => dst.copy_from_slice(map),
            2 => dst
                .iter_mut()
                .zip(map.iter().rev())
                .for_each(|(d, v)| *d = *v),
            _ => {
                // Column-major: position j = w·height + h holds map[h, w].
                for (w, col) in dst.chunks_exact_mut(height).enumerate() {
                    for (h, d) in col.iter_mut().enumerate() {
                        *d = map[h * width + w];
                    }
                }
                if k == 3 {
                    dst.reverse();
                }
            }
        }
    });
    out
}

/// [`SelectiveScanBackend::native_cross_merge`] on a row-major `[batch, 4, channels, len]`
/// buffer: `out[h, w] = (y0[i] + y2[L−1−i]) + (y1[j] + y3[L−1−j])` with `i = h·width + w`,
/// `j = w·height + h`, the tensor-op version's order.
fn cross_merge(ys: &[f32], [batch, channels]: [usize; 2], height: usize, width: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let len = height * width;
    let mut out = vec![0.0f32; batch * channels * len];
    out.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
        let (b, c) = (row / channels, row % channels);
        let y = |k: usize| &ys[((b * 4 + k) * channels + c) * len..][..len];
        let (y0, y1, y2, y3) = (y(0), y(1), y(2), y(3));
        for h in 0..height {
            for w in 0..width {
                let (i, j) = (h * width + w, w * height + h);
                let rows = y0[i] + y2[len - 1 - i];
                let cols = y1[j] + y3[len - 1 - j];
                dst[i] = rows + cols;
            }
        }
    });
    out
}

/// The buffer of a `[batch, channels, height, width]` f32 tensor whose memory is channel-last
/// (`[batch, height, width, channels]` row-major: a permuted view, as the model's channel-last
/// activations are when a conv takes them), in memory order; `None` for any other layout.
fn channel_last_memory(t: &NdArrayTensor) -> Option<&[f32]> {
    let NdArrayTensor::F32(storage) = t else {
        return None;
    };
    let view = storage.view();
    let &[batch, channels, height, width] = view.shape() else {
        return None;
    };
    let expected = [height * width * channels, 1, width * channels, channels];
    let strides_match = view
        .strides()
        .iter()
        .zip(expected)
        .zip(view.shape())
        .all(|((&s, e), &n)| n == 1 || s == e as isize);
    if !strides_match || batch * channels * height * width == 0 {
        return None;
    }
    // The strides say the elements fill one block in channel-last order.
    view.to_slice_memory_order()
}

/// A dense convolution on channel-last memory (see [`SelectiveScanBackend::conv2d_dense`]):
/// `x [batch, height, width, C_in]` row-major gives `y [batch, H', W', C_out]` row-major. Per
/// image, the `[H'·W', C_in·kh·kw]` patch matrix is gathered from the input (rayon over output
/// rows; taps in the weight's `(channel, p, q)` order, zero where a tap falls in the padding),
/// then `y = patches · weightᵀ` is one matrix product ([`gemm_into`]; the weight read
/// transposed through its strides, not copied), plus the bias. Reading and writing
/// channel-last keeps the model's activations in their layout: no permuted copies around the
/// conv downsamples and the stem's second conv.
#[allow(clippy::too_many_arguments)]
fn conv2d_dense_channel_last(
    x: &[f32],
    [batch, c_in, height, width]: [usize; 4],
    weight: &[f32],
    [c_out, kh, kw]: [usize; 3],
    bias: Option<&[f32]>,
    [sh, sw]: [usize; 2],
    [top, left]: [usize; 2],
    [out_h, out_w]: [usize; 2],
) -> Vec<f32> {
    let (taps, len) = (c_in * kh * kw, out_h * out_w);
    assert_eq!(weight.len(), c_out * taps, "weight is [C_out, taps]");
    let mut patches = vec![0.0f32; len * taps];
    let mut y = vec![0.0f32; batch * len * c_out];
    let geometry = ConvGeometry {
        input: [height, width, c_in],
        kernel: [kh, kw],
        stride: [sh, sw],
        padding: [top, left],
        output: [out_h, out_w],
    };
    for (b, y_b) in y.chunks_mut(len * c_out).enumerate() {
        let image = &x[b * height * width * c_in..(b + 1) * height * width * c_in];
        geometry.patches(image, &mut patches);
        // patches [len, taps] · weightᵀ [taps, C_out] (the weight read through its strides).
        gemm_into(
            (&patches, [taps, 1]),
            (weight, [1, taps]),
            [len, taps, c_out],
            y_b,
            0.0,
        );
        if let Some(bias) = bias {
            add_bias_rows(y_b, bias);
        }
    }
    y
}

/// Where a dense convolution's taps fall, for one channel-last image `[height, width, C_in]`.
struct ConvGeometry {
    /// `[height, width, C_in]`.
    input: [usize; 3],
    kernel: [usize; 2],
    stride: [usize; 2],
    /// `[top, left]` zero padding.
    padding: [usize; 2],
    /// `[H', W']`.
    output: [usize; 2],
}

impl ConvGeometry {
    /// The input row and column of output `(i, j)`'s tap `(p, q)`, if not in the padding.
    fn tap(&self, [i, j]: [usize; 2], [p, q]: [usize; 2]) -> Option<[usize; 2]> {
        let ([height, width, _], [sh, sw], [top, left]) = (self.input, self.stride, self.padding);
        let r = (i * sh + p).checked_sub(top).filter(|r| *r < height)?;
        let s = (j * sw + q).checked_sub(left).filter(|s| *s < width)?;
        Some([r, s])
    }

    /// The patch matrix `[H'·W', C_in·kh·kw]` of `image` (taps in the weight's `(channel, p,
    /// q)` order, zero in the padding), rayon over output rows.
    fn patches(&self, image: &[f32], patches: &mut [f32]) {
        use rayon::prelude::*;
        let ([height, width, c_in], [kh, kw], [_, out_w]) = (self.input, self.kernel, self.output);
        let taps = c_in * kh * kw;
        debug_assert_eq!(image.len(), height * width * c_in);
        patches
            .par_chunks_mut(out_w * taps)
            .enumerate()
            .for_each(|(i, rows)| {
                for (j, row) in rows.chunks_exact_mut(taps).enumerate() {
                    for p in 0..kh {
                        for q in 0..kw {
                            // Taps (c, p, q) of this (p, q): stride kh·kw in the row.
                            let dst = row[p * kw + q..].iter_mut().step_by(kh * kw);
                            match self.tap([i, j], [p, q]) {
                                Some([r, s]) => {
                                    let src = &image[(r * width + s) * c_in..][..c_in];
                                    for (d, v) in dst.zip(src) {
                                        *d = *v;
                                    }
                                }
                                None => dst.for_each(|d| *d = 0.0),
                            }
                        }
                    }
                }
            });
    }

    /// The inverse of [`patches`](Self::patches) for gradients: each patch entry added back
    /// onto the input value it was read from, into `dx [height, width, C_in]` (overwritten).
    /// One task per input row; within it the contributions come in `(p, j, q)` order, so the
    /// bits do not depend on the number of threads.
    fn add_back(&self, dpatches: &[f32], dx: &mut [f32]) {
        use rayon::prelude::*;
        let ([height, width, c_in], [kh, kw]) = (self.input, self.kernel);
        let ([sh, _], [top, _], [out_h, out_w]) = (self.stride, self.padding, self.output);
        let taps = c_in * kh * kw;
        debug_assert_eq!(dx.len(), height * width * c_in);
        dx.par_chunks_mut(width * c_in)
            .enumerate()
            .for_each(|(r, dx_row)| {
                dx_row.fill(0.0);
                for p in 0..kh {
                    // Output rows i with i·sh + p − top = r.
                    let Some(t) = (r + top).checked_sub(p).filter(|t| t % sh == 0) else {
                        continue;
                    };
                    let i = t / sh;
                    if i >= out_h {
                        continue;
                    }
                    for j in 0..out_w {
                        let row = &dpatches[(i * out_w + j) * taps..][..taps];
                        for q in 0..kw {
                            let Some([_, s]) = self.tap([i, j], [p, q]) else {
                                continue;
                            };
                            let src = row[p * kw + q..].iter().step_by(kh * kw);
                            for (d, v) in dx_row[s * c_in..(s + 1) * c_in].iter_mut().zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            });
    }
}

/// The gradients of a dense convolution on channel-last buffers (see
/// [`SelectiveScanBackend::conv2d_dense_backward`]): `x [batch, H, W, C_in]`, `weight [C_out,
/// C_in·kh·kw]`, `dy [batch, H', W', C_out]` → `dx [batch, H, W, C_in]`, `dweight [C_out,
/// C_in·kh·kw]`, `dbias [C_out]`, each where `needed`. Per image: the patch matrix `P [H'·W',
/// taps]` again, `dweight += dyᵀ · P` (images in order), `dP = dy · weight`, added back onto
/// the input ([`ConvGeometry::add_back`]).
fn conv2d_dense_backward(
    x: &[f32],
    geometry: &ConvGeometry,
    weight: &[f32],
    c_out: usize,
    dy: &[f32],
    [need_x, need_weight, need_bias]: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    let ([height, width, c_in], [kh, kw], [out_h, out_w]) =
        (geometry.input, geometry.kernel, geometry.output);
    let (taps, len, image_len) = (c_in * kh * kw, out_h * out_w, height * width * c_in);
    let batch = x.len() / image_len.max(1);
    let mut dx = need_x.then(|| vec![0.0f32; batch * image_len]);
    let mut dweight = need_weight.then(|| vec![0.0f32; c_out * taps]);
    let mut patches = vec![0.0f32; if need_weight { len * taps } else { 0 }];
    for b in 0..batch {
        let dy_b = &dy[b * len * c_out..(b + 1) * len * c_out];
        if let Some(dweight) = dweight.as_mut() {
            geometry.patches(&x[b * image_len..(b + 1) * image_len], &mut patches);
            // dyᵀ read through the strides of the [len, C_out] buffer; images add in order.
            let (dy_t, patches) = ((dy_b, [1, c_out]), (&patches[..], [taps, 1]));
            gemm_into(dy_t, patches, [c_out, len, taps], dweight, 1.0);
        }
        if let Some(dx) = dx.as_mut() {
            let dpatches = gemm((dy_b, [c_out, 1]), (weight, [taps, 1]), [len, c_out, taps]);
            geometry.add_back(&dpatches, &mut dx[b * image_len..(b + 1) * image_len]);
        }
    }
    let dbias = need_bias.then(|| column_sums(dy, c_out));
    [dx, dweight, dbias]
}

/// The values of a `[batch, channels, height, width]` f32 tensor in channel-last order
/// (`[batch, height, width, channels]` row-major): its memory where it already is so, else
/// transposed image by image.
fn channel_last_values(t: &NdArrayTensor) -> Cow<'_, [f32]> {
    if let Some(memory) = channel_last_memory(t) {
        return Cow::Borrowed(memory);
    }
    use rayon::prelude::*;
    let [_, channels, height, width] = t.shape().dims::<4>();
    let plane = height * width;
    let first = values(t);
    let mut out = vec![0.0f32; first.len()];
    // One task per output row (b, i): [width, channels] from the image's channel rows.
    out.par_chunks_mut((width * channels).max(1))
        .enumerate()
        .for_each(|(bi, dst)| {
            let (b, i) = (bi / height, bi % height);
            for (j, o) in dst.chunks_exact_mut(channels).enumerate() {
                for (c, v) in o.iter_mut().enumerate() {
                    *v = first[(b * channels + c) * plane + i * width + j];
                }
            }
        });
    Cow::Owned(out)
}

/// A channel-last buffer `[batch, height, width, channels]` as a `[batch, channels, height,
/// width]` tensor (a permuted view: no copy).
fn channel_last_tensor(
    values: Vec<f32>,
    [batch, channels, height, width]: [usize; 4],
) -> NdArrayTensor {
    let array = ndarray::ArcArray::from_shape_vec(
        ndarray::IxDyn(&[batch, height, width, channels]),
        values,
    )
    .expect("batch·height·width·channels values")
    .permuted_axes(ndarray::IxDyn(&[0, 3, 1, 2]));
    NdArrayTensor::from(array)
}

/// A dense convolution (see [`SelectiveScanBackend::conv2d_dense`]): per image, the
/// `[C_in·kh·kw, H'·W']` column matrix is gathered straight from the input (rayon over its
/// rows; zero where a tap falls in the padding), then `y = weight · columns` is one matrix
/// product ([`gemm_into`]), plus the bias.
#[allow(clippy::too_many_arguments)]
fn conv2d_dense(
    x: &[f32],
    [batch, c_in, height, width]: [usize; 4],
    weight: &[f32],
    [c_out, kh, kw]: [usize; 3],
    bias: Option<&[f32]>,
    [sh, sw]: [usize; 2],
    [top, left]: [usize; 2],
    [out_h, out_w]: [usize; 2],
) -> Vec<f32> {
    use rayon::prelude::*;
    let (taps, len) = (c_in * kh * kw, out_h * out_w);
    assert_eq!(weight.len(), c_out * taps, "weight is [C_out, taps]");
    let mut columns = vec![0.0f32; taps * len];
    let mut y = vec![0.0f32; batch * c_out * len];
    for (b, y_b) in y.chunks_mut(c_out * len).enumerate() {
        columns
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(row, out)| {
                // Rows in the weight's (channel, p, q) order.
                let (c, p, q) = (row / (kh * kw), (row / kw) % kh, row % kw);
                let plane =
                    &x[(b * c_in + c) * height * width..(b * c_in + c + 1) * height * width];
                // Output columns whose tap `j·sw + q − left` lands inside the row: `lo..hi`.
                let lo = left.saturating_sub(q).div_ceil(sw).min(out_w);
                let hi = (width + left)
                    .saturating_sub(q)
                    .div_ceil(sw)
                    .clamp(lo, out_w);
                for (i, dst) in out.chunks_exact_mut(out_w).enumerate() {
                    let Some(r) = (i * sh + p).checked_sub(top).filter(|r| *r < height) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &plane[r * width..(r + 1) * width];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if hi > lo {
                        // lo·sw + q ≥ left by the choice of lo.
                        let first = lo * sw + q - left;
                        if sw == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (d, v) in
                                dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(sw))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            });
        // weight [C_out, taps] · columns [taps, len].
        gemm_into(
            (weight, [taps, 1]),
            (&columns, [len, 1]),
            [c_out, taps, len],
            y_b,
            0.0,
        );
        if let Some(bias) = bias {
            for (row, b) in y_b.chunks_exact_mut(len).zip(bias) {
                row.iter_mut().for_each(|v| *v += b);
            }
        }
    }
    y
}

/// The kernel size `k` of a depthwise weight `[channels, 1, k, k]` (k odd), `None` otherwise.
fn depthwise_kernel(weight: &NdArrayTensor, channels: usize) -> Option<usize> {
    let [c, one, k, k2] = weight.shape().dims::<4>();
    (c == channels && one == 1 && k == k2 && k % 2 == 1).then_some(k)
}

/// [`depthwise_conv`] on NdArray tensors (`x` channel-last `[batch, height, width, channels]`,
/// any layout), SiLU'd if `silu`; `None` for weights it does not cover.
fn depthwise_conv_native(
    x: NdArrayTensor,
    weight: NdArrayTensor,
    bias: Option<NdArrayTensor>,
    silu: bool,
) -> Option<NdArrayTensor> {
    let dims = x.shape().dims::<4>();
    let [batch, height, width, channels] = dims;
    let k = depthwise_kernel(&weight, channels)?;
    if bias
        .as_ref()
        .is_some_and(|b| b.shape().dims::<1>() != [channels])
    {
        return None;
    }
    let (x, weight) = (values(&x), values(&weight));
    let bias = bias.as_ref().map(values);
    let y = depthwise_conv(&x, dims, &weight, k, bias.as_deref(), silu);
    Some(tensor(y, &[batch, channels, height, width]))
}

/// `f(x, g, out)` over chunks of `x` and of `g` (the same shape; `x` again where `None`) on
/// every core, as a new tensor of `x`'s shape. Channel-last memory seen channel-first (the
/// stem's activations, and their gradients) is mapped in memory order when every operand has
/// it, and the result keeps that layout (no gathering copy); anything else is mapped in
/// row-major order.
fn elementwise(
    x: &NdArrayTensor,
    g: Option<&NdArrayTensor>,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> NdArrayTensor {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let run = |xs: &[f32], gs: &[f32]| {
        let mut out = vec![0.0f32; xs.len()];
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
            .for_each(|(out, (xs, gs))| f(xs, gs, out));
        out
    };
    let shape = x.shape().to_vec();
    let x_memory = channel_last_memory(x);
    let g_memory = g.map_or(x_memory, channel_last_memory);
    if let (Some(xm), Some(gm)) = (x_memory, g_memory) {
        let [batch, channels, height, width] = shape[..] else {
            unreachable!("channel_last_memory only accepts 4-D tensors")
        };
        return channel_last_tensor(run(xm, gm), [batch, channels, height, width]);
    }
    let xs = values(x);
    let gs = g.map(values);
    tensor(run(&xs, gs.as_deref().unwrap_or(&xs)), &shape)
}

/// A new f32 NdArray tensor that takes ownership of `values` (no copy).
fn tensor(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    let array = ndarray::ArcArray::from_shape_vec(ndarray::IxDyn(shape), values)
        .expect("the scan returns exactly product(shape) values");
    NdArrayTensor::from(array)
}

impl<E, I, Q> SelectiveScanBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    const CONV2D_BY_TENSOR_OPS: bool = true;

    fn depthwise_conv_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        depthwise_conv_native(x, weight, bias, true)
    }

    fn depthwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        depthwise_conv_native(x, weight, bias, false)
    }

    fn depthwise_conv_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        let dims = x.shape().dims::<4>();
        let [batch, height, width, channels] = dims;
        let k = depthwise_kernel(&weight, channels)?;
        if dy.shape().dims::<4>() != [batch, channels, height, width] {
            return None;
        }
        let (x, weight) = (values(&x), values(&weight));
        let dy = channel_last_values(&dy);
        let [dx, dweight, dbias] = depthwise_conv_backward(&x, dims, &weight, k, &dy, needed);
        Some(LayerGradients {
            dx: dx.map(|v| tensor(v, &dims)),
            dweight: dweight.map(|v| tensor(v, &[channels, 1, k, k])),
            dbias: dbias.map(|v| tensor(v, &[channels])),
        })
    }

    fn gelu_exact(x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let isa = cpu::Isa::detect();
        Some(elementwise(&x, None, |x, _, y| cpu::gelu_into(isa, x, y)))
    }

    fn native_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        epsilon: f64,
    ) -> Option<FloatTensor<Self>> {
        let shape = x.shape().to_vec();
        let c = *shape.last()?;
        let standard = matches!(&x, NdArrayTensor::F32(s) if s.view().is_standard_layout());
        if !standard || gamma.shape().dims::<1>() != [c] {
            return None;
        }
        if beta.as_ref().is_some_and(|b| b.shape().dims::<1>() != [c]) {
            return None;
        }
        let (gamma, beta) = (values(&gamma), beta.as_ref().map(values));
        let y = layer_norm(&values(&x), &gamma, beta.as_deref(), epsilon as f32);
        Some(tensor(y, &shape))
    }

    fn native_direction_matmul(
        weight: FloatTensor<Self>,
        x: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        let [directions, m, d] = weight.shape().dims::<3>();
        let [batch, k, d_x, l] = x.shape().dims::<4>();
        if k != directions || d_x != d {
            return None;
        }
        let y = direction_matmul(&values(&weight), &values(&x), [batch, k, m, d, l]);
        Some(tensor(y, &[batch, k, m, l]))
    }

    fn native_direction_matmul_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        [need_x, need_weight, _]: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        let [directions, m, d] = weight.shape().dims::<3>();
        let [batch, k, d_x, l] = x.shape().dims::<4>();
        if k != directions || d_x != d || dy.shape().dims::<4>() != [batch, k, m, l] {
            return None;
        }
        let (weight, x, dy) = (values(&weight), values(&x), values(&dy));
        let [dx, dweight] =
            direction_matmul_backward(&weight, &x, &dy, [batch, k, m, d, l], [need_x, need_weight]);
        Some(LayerGradients {
            dx: dx.map(|v| tensor(v, &[batch, k, d, l])),
            dweight: dweight.map(|v| tensor(v, &[k, m, d])),
            dbias: None,
        })
    }

    fn native_cross_scan(x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let dims = x.shape().dims::<4>();
        let [batch, channels, height, width] = dims;
        let y = cross_scan(&values(&x), dims);
        Some(tensor(y, &[batch, 4, channels, height * width]))
    }

    fn native_cross_merge(
        ys: FloatTensor<Self>,
        height: usize,
        width: usize,
    ) -> Option<FloatTensor<Self>> {
        let [batch, directions, channels, len] = ys.shape().dims::<4>();
        if directions != 4 || len != height * width {
            return None;
        }
        let y = cross_merge(&values(&ys), [batch, channels], height, width);
        Some(tensor(y, &[batch, channels, height, width]))
    }

    fn reshape_no_copy(x: FloatTensor<Self>, shape: &[usize]) -> Option<FloatTensor<Self>> {
        match x {
            // Owned storage: `into_owned` hands its (copy-on-write, shared) array back as is.
            NdArrayTensor::F32(storage)
                if storage.is_owned() && storage.view().is_standard_layout() =>
            {
                storage
                    .into_owned()
                    .into_shape_with_order(ndarray::IxDyn(shape))
                    .ok()
                    .map(NdArrayTensor::from)
            }
            _ => None,
        }
    }

    fn native_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        // x [.., k]: the leading dimensions are the rows (a standard-layout buffer is already
        // the [m, k] matrix, so no reshape copy).
        let mut dims = x.shape().to_vec();
        let (&k, leading) = dims.split_last()?;
        let m = leading.iter().product::<usize>();
        let [k_w, n] = weight.shape().dims::<2>();
        if k != k_w || bias.as_ref().is_some_and(|b| b.shape().dims::<1>() != [n]) {
            return None;
        }
        let (x, weight) = (values(&x), values(&weight));
        let bias = bias.as_ref().map(values);
        let y = linear(&x, &weight, bias.as_deref(), [m, k, n]);
        *dims.last_mut().expect("x has a last dimension") = n;
        Some(tensor(y, &dims))
    }

    fn native_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        let x_dims = x.shape().to_vec();
        let (&k, leading) = x_dims.split_last()?;
        let m = leading.iter().product::<usize>();
        let [k_w, n] = weight.shape().dims::<2>();
        let dy_dims = dy.shape().to_vec();
        if k != k_w || dy_dims.split_last() != Some((&n, leading)) {
            return None;
        }
        let (x, weight, dy) = (values(&x), values(&weight), values(&dy));
        let [dx, dweight, dbias] = linear_backward(&x, &weight, &dy, [m, k, n], needed);
        Some(LayerGradients {
            dx: dx.map(|v| tensor(v, &x_dims)),
            dweight: dweight.map(|v| tensor(v, &[k, n])),
            dbias: dbias.map(|v| tensor(v, &[n])),
        })
    }

    fn gelu_exact_backward(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        if dy.shape().to_vec() != x.shape().to_vec() {
            return None;
        }
        let isa = cpu::Isa::detect();
        Some(elementwise(&x, Some(&dy), |x, dy, dx| {
            cpu::gelu_backward_into(isa, x, dy, dx)
        }))
    }

    fn conv2d_dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        stride: [usize; 2],
        [top, left, bottom, right]: [usize; 4],
    ) -> Option<FloatTensor<Self>> {
        let dims = x.shape().dims::<4>();
        let [c_out, c_in, kh, kw] = weight.shape().dims::<4>();
        let (rows, cols) = (dims[2] + top + bottom, dims[3] + left + right);
        if c_in != dims[1] || stride.contains(&0) || rows < kh || cols < kw {
            return None;
        }
        let out = [(rows - kh) / stride[0] + 1, (cols - kw) / stride[1] + 1];
        let weight = values(&weight);
        let bias = bias.as_ref().map(values);
        if let Some(memory) = channel_last_memory(&x) {
            let y = conv2d_dense_channel_last(
                memory,
                dims,
                &weight,
                [c_out, kh, kw],
                bias.as_deref(),
                stride,
                [top, left],
                out,
            );
            return Some(channel_last_tensor(y, [dims[0], c_out, out[0], out[1]]));
        }
        let x = values(&x);
        let y = conv2d_dense(
            &x,
            dims,
            &weight,
            [c_out, kh, kw],
            bias.as_deref(),
            stride,
            [top, left],
            out,
        );
        Some(tensor(y, &[dims[0], c_out, out[0], out[1]]))
    }

    fn conv2d_dense_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        [top, left, bottom, right]: [usize; 4],
        dy: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        let dims = x.shape().dims::<4>();
        let [batch, c_in, height, width] = dims;
        let [c_out, c_in_w, kh, kw] = weight.shape().dims::<4>();
        let (rows, cols) = (height + top + bottom, width + left + right);
        if c_in != c_in_w || stride.contains(&0) || rows < kh || cols < kw {
            return None;
        }
        let out = [(rows - kh) / stride[0] + 1, (cols - kw) / stride[1] + 1];
        if dy.shape().dims::<4>() != [batch, c_out, out[0], out[1]] {
            return None;
        }
        let geometry = ConvGeometry {
            input: [height, width, c_in],
            kernel: [kh, kw],
            stride,
            padding: [top, left],
            output: out,
        };
        let (x, weight) = (channel_last_values(&x), values(&weight));
        let dy = channel_last_values(&dy);
        let [dx, dweight, dbias] =
            conv2d_dense_backward(&x, &geometry, &weight, c_out, &dy, needed);
        Some(LayerGradients {
            dx: dx.map(|v| channel_last_tensor(v, dims)),
            dweight: dweight.map(|v| tensor(v, &[c_out, c_in, kh, kw])),
            dbias: dbias.map(|v| tensor(v, &[c_out])),
        })
    }

    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let shape = inputs.shape();
        let host = HostInputs::new(&inputs);
        let y = cpu::forward(&host.slices(shape, options)).unwrap_or_else(|e| panic!("{e}"));
        (tensor(y, &shape.bdl()), None)
    }

    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        _saved: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        let shape = inputs.shape();
        let host = HostInputs::new(&inputs);
        let slices = host.slices(shape, options);
        // `du` goes into `dy`'s buffer when nothing else holds it (one `[B, D, L]` allocation
        // fewer; on Autodiff, the upstream gradient usually is consumed here).
        let g = match owned_values(dy) {
            Ok(dy) => cpu::backward_reusing(&slices, dy),
            Err(dy) => cpu::backward(&slices, &values(&dy)),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let put = |v: Vec<f32>, s: &[usize]| tensor(v, s);
        ScanGradients {
            du: put(g.du, &shape.bdl()),
            ddelta: put(g.ddelta, &shape.bdl()),
            da: put(g.da, &shape.dn()),
            db: put(g.db, &shape.bgnl()),
            dc: put(g.dc, &shape.bgnl()),
            dd: g.dd.map(|v| put(v, &[shape.channels])),
            ddelta_bias: g.ddelta_bias.map(|v| put(v, &[shape.channels])),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive, activation};
    use selective_scan::SplitMix64;

    use super::channel_last_memory;
    use crate::SelectiveScanBackend;
    use crate::model::conv::native_params;

    type B = NdArray;

    /// Random weights (and bias, if the conv has one) in `[-1, 1]`.
    fn randomise<T: burn::tensor::backend::Backend>(
        conv: &mut burn::nn::conv::Conv2d<T>,
        rng: &mut SplitMix64,
    ) {
        let device = Default::default();
        let shape = conv.weight.dims();
        let w = rng.vec(shape.iter().product(), -1.0, 1.0);
        conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, shape), &device));
        if let Some(bias) = &conv.bias {
            let shape = bias.dims();
            let b = rng.vec(shape[0], -1.0, 1.0);
            conv.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b, shape),
                &device,
            )));
        }
    }

    /// `(batch, height, width, channels, k, bias)` of the depthwise conv tests: odd sizes, a
    /// 1 × 1 map (every tap but the centre in the padding), k = 3 and 5, with and without bias.
    const DEPTHWISE_CASES: [(usize, usize, usize, usize, usize, bool); 4] = [
        (2, 5, 7, 13, 3, true),
        (1, 9, 4, 8, 5, false),
        (3, 1, 1, 3, 3, true),
        (1, 2, 11, 17, 3, false),
    ];

    /// `(batch, C_in, C_out, height, width, kernel, stride, padding, bias)` of the dense conv
    /// tests: strides 1, 2, (2, 1) and 3, padding on every side, on some sides or none, odd
    /// sizes, a kernel as large as the padded input; the last, stride 3 with a left padding of
    /// 2: the first in-row tap of a column starts after the padding, and the right edge pads
    /// for some taps only.
    #[allow(clippy::type_complexity)]
    const DENSE_CASES: [(
        usize,
        usize,
        usize,
        usize,
        usize,
        [usize; 2],
        [usize; 2],
        [usize; 4],
        bool,
    ); 6] = [
        (2, 3, 5, 9, 7, [3, 3], [2, 2], [1, 1, 1, 1], true),
        (1, 4, 6, 8, 8, [2, 2], [2, 2], [0, 0, 0, 0], false),
        (3, 2, 3, 5, 6, [3, 1], [2, 1], [1, 0, 1, 0], true),
        (1, 5, 2, 3, 3, [3, 3], [1, 1], [0, 0, 0, 0], false),
        (2, 3, 4, 11, 6, [4, 4], [4, 4], [0, 0, 0, 0], true),
        (1, 2, 3, 10, 11, [3, 3], [3, 3], [2, 2, 0, 1], true),
    ];

    /// SS2D's depthwise conv (`k × k`, padding `k / 2`) with random weights.
    fn depthwise_conv<T: burn::tensor::backend::Backend>(
        channels: usize,
        k: usize,
        bias: bool,
        rng: &mut SplitMix64,
    ) -> burn::nn::conv::Conv2d<T> {
        let mut conv = Conv2dConfig::new([channels, channels], [k, k])
            .with_groups(channels)
            .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
            .with_bias(bias)
            .init::<T>(&Default::default());
        randomise(&mut conv, rng);
        conv
    }

    /// `max |native − expected| / max |expected|`, after checking the native result's shape.
    fn worst_error(
        native: burn::tensor::ops::FloatTensor<B>,
        dims: [usize; 4],
        expected: &[f32],
    ) -> f32 {
        let native = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(native));
        assert_eq!(native.dims(), dims);
        let native = native.into_data().to_vec::<f32>().unwrap();
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        native
            .iter()
            .zip(expected)
            .map(|(a, e)| (a - e).abs() / scale)
            .fold(0.0f32, f32::max)
    }

    /// A tensor nothing else holds hands over its buffer (the scan writes `du` over `dy`); a
    /// shared one, or a view into a larger buffer, is handed back with the same values.
    #[test]
    fn only_an_unshared_contiguous_tensor_gives_up_its_buffer() {
        let device = Default::default();
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let fresh =
            || Tensor::<B, 3>::from_data(TensorData::new(values.clone(), [2, 3, 4]), &device);
        let owned = super::owned_values(fresh().into_primitive().tensor());
        assert_eq!(owned.expect("a fresh tensor is unique"), values);

        let kept = fresh();
        let shared = super::owned_values(kept.clone().into_primitive().tensor());
        let back = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(
            shared.expect_err("a cloned tensor is shared"),
        ));
        assert_eq!(back.into_data(), kept.into_data());

        let narrowed = fresh().narrow(2, 1, 2);
        let expected = narrowed.to_data();
        match super::owned_values(narrowed.into_primitive().tensor()) {
            Ok(v) => assert_eq!(v, expected.to_vec::<f32>().unwrap()),
            Err(t) => assert_eq!(
                Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(t)).into_data(),
                expected
            ),
        }
    }

    /// The native NdArray linear against Burn's `Linear::forward` on 2-D inputs: odd sizes,
    /// `K` above the products' 256-deep blocks, with and without bias, one row.
    #[test]
    fn native_linear_matches_burns_linear() {
        use burn::nn::LinearConfig;
        let device = Default::default();
        for (m, k, n, bias) in [
            (37, 13, 29, true),
            (5, 300, 7, false),
            (1, 96, 384, true),
            (130, 520, 3, true),
        ] {
            let mut rng = SplitMix64::new((m * 7 + k) as u64);
            let mut linear = LinearConfig::new(k, n).with_bias(bias).init::<B>(&device);
            let w = rng.vec(k * n, -1.0, 1.0);
            linear.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(w, [k, n]), &device));
            if bias {
                let b = rng.vec(n, -1.0, 1.0);
                linear.bias = Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(b, [n]),
                    &device,
                )));
            }
            let x = Tensor::<B, 2>::from_data(
                TensorData::new(rng.vec(m * k, -2.0, 2.0), [m, k]),
                &device,
            );
            let expected = linear
                .forward(x.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let native = B::native_linear(
                x.into_primitive().tensor(),
                linear.weight.val().into_primitive().tensor(),
                linear
                    .bias
                    .as_ref()
                    .map(|b| b.val().into_primitive().tensor()),
            )
            .expect("NdArray has a native linear");
            let native = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(native));
            assert_eq!(native.dims(), [m, n]);
            let native = native.into_data().to_vec::<f32>().unwrap();
            let scale = expected.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let worst = native
                .iter()
                .zip(&expected)
                .map(|(a, e)| (a - e).abs() / scale)
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "linear {m}x{k}x{n}: off by {worst:.2e}");
            // 4-D inputs through the model's `linear_4d` (the native op on the 4-D tensor):
            // a standard-layout one and a permuted view, against Burn's `Linear` on each.
            let x4 = Tensor::<B, 4>::from_data(
                TensorData::new(rng.vec(2 * 3 * 5 * k, -2.0, 2.0), [2, 5, 3, k]),
                &device,
            );
            for x4 in [x4.clone(), x4.permute([0, 2, 1, 3])] {
                let expected = linear.forward(x4.clone());
                let dims = expected.dims();
                let expected = expected.into_data().to_vec::<f32>().unwrap();
                let native = crate::model::block::linear_4d(&linear, x4);
                assert_eq!(native.dims(), dims);
                let native = native.into_data().to_vec::<f32>().unwrap();
                let scale = expected.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let worst = native
                    .iter()
                    .zip(&expected)
                    .map(|(a, e)| (a - e).abs() / scale)
                    .fold(0.0f32, f32::max);
                assert!(worst <= 1e-6, "linear_4d {dims:?}x{n}: off by {worst:.2e}");
            }
        }
        // Mismatched shapes are left to Burn.
        let x = Tensor::<B, 2>::zeros([2, 3], &device)
            .into_primitive()
            .tensor();
        let w = Tensor::<B, 2>::zeros([4, 5], &device)
            .into_primitive()
            .tensor();
        assert!(B::native_linear(x, w, None).is_none());
    }

    /// The one-pass cross-scan and cross-merge give the tensor-op versions' bits, on a
    /// non-square map (and a channel-last input, as SS2D may hand it over).
    #[test]
    fn native_cross_scan_and_merge_equal_the_tensor_ops() {
        use crate::model::cross_scan::{cross_merge, cross_scan};
        let device = Default::default();
        let mut rng = SplitMix64::new(5);
        let (batch, channels, height, width) = (2, 3, 4, 7);
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(
                rng.vec(batch * channels * height * width, -2.0, 2.0),
                [batch, channels, height, width],
            ),
            &device,
        );
        let channel_last =
            Tensor::<B, 4>::from_data(x.clone().permute([0, 2, 3, 1]).into_data(), &device)
                .permute([0, 3, 1, 2]);
        for input in [x.clone(), channel_last] {
            let expected = cross_scan(input.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let native = B::native_cross_scan(input.into_primitive().tensor()).unwrap();
            let native = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(native));
            assert_eq!(native.dims(), [batch, 4, channels, height * width]);
            assert_eq!(native.into_data().to_vec::<f32>().unwrap(), expected);
        }
        let ys = Tensor::<B, 4>::from_data(
            TensorData::new(
                rng.vec(batch * 4 * channels * height * width, -2.0, 2.0),
                [batch, 4, channels, height * width],
            ),
            &device,
        );
        let expected = cross_merge(ys.clone(), height, width)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let native =
            B::native_cross_merge(ys.clone().into_primitive().tensor(), height, width).unwrap();
        let native = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(native));
        assert_eq!(native.dims(), [batch, channels, height, width]);
        assert_eq!(native.into_data().to_vec::<f32>().unwrap(), expected);
        // Not four directions, or a length that is not height·width: left to the tensor ops.
        assert!(B::native_cross_merge(ys.into_primitive().tensor(), width + 1, height).is_none());
    }

    /// The per-direction projection against Burn's broadcast matmul (odd sizes; a standard
    /// input and a narrowed view of a larger one, as SS2D's `dts` is), within 1e-6 relative.
    #[test]
    fn native_direction_matmul_matches_the_broadcast_matmul() {
        let device = Default::default();
        let mut rng = SplitMix64::new(9);
        let (batch, k, m, d, l) = (2, 4, 5, 7, 33);
        let weight = Tensor::<B, 3>::from_data(
            TensorData::new(rng.vec(k * m * d, -1.0, 1.0), [k, m, d]),
            &device,
        );
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(
                rng.vec(batch * k * (d + 3) * l, -2.0, 2.0),
                [batch, k, d + 3, l],
            ),
            &device,
        );
        for x in [x.clone().narrow(2, 0, d) * 1.0, x.narrow(2, 2, d)] {
            let expected = weight
                .clone()
                .unsqueeze_dim::<4>(0)
                .expand([batch, k, m, d])
                .matmul(x.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let native = B::native_direction_matmul(
                weight.clone().into_primitive().tensor(),
                x.into_primitive().tensor(),
            )
            .expect("NdArray has a native direction matmul");
            let native = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(native));
            assert_eq!(native.dims(), [batch, k, m, l]);
            let native = native.into_data().to_vec::<f32>().unwrap();
            let scale = expected.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let worst = native
                .iter()
                .zip(&expected)
                .map(|(a, e)| (a - e).abs() / scale)
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "off by {worst:e}");
        }
        // Mismatched directions or inner sizes: left to Burn.
        let x = Tensor::<B, 4>::zeros([1, k + 1, d, l], &device);
        assert!(
            B::native_direction_matmul(
                weight.into_primitive().tensor(),
                x.into_primitive().tensor()
            )
            .is_none()
        );
    }

    /// The one-pass LayerNorm against Burn's `LayerNorm::forward` (random gamma and beta, odd
    /// width, rows with a large mean), through the model's `layer_norm`; a permuted input is
    /// left to Burn.
    #[test]
    fn native_layer_norm_matches_burns_layer_norm() {
        use crate::model::block::{layer_norm, layer_norm_config};
        let device = Default::default();
        let mut rng = SplitMix64::new(21);
        let c = 37;
        let mut norm = layer_norm_config(c).init::<B>(&device);
        norm.gamma = Param::from_tensor(Tensor::from_data(
            TensorData::new(rng.vec(c, 0.5, 1.5), [c]),
            &device,
        ));
        norm.beta = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(rng.vec(c, -0.5, 0.5), [c]),
            &device,
        )));
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(rng.vec(2 * 3 * 5 * c, 2.0, 6.0), [2, 3, 5, c]),
            &device,
        );
        let expected = norm.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        let native = layer_norm(&norm, x.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let worst = native
            .iter()
            .zip(&expected)
            .map(|(a, e)| (a - e).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 2e-6, "LayerNorm off by {worst:e}");
        let permuted = x.permute([0, 2, 1, 3]).into_primitive().tensor();
        assert!(
            B::native_layer_norm(
                permuted,
                norm.gamma.val().into_primitive().tensor(),
                None,
                1e-5
            )
            .is_none()
        );
    }

    /// `reshape_no_copy` keeps the buffer of a standard-layout tensor (same address, same
    /// values) and declines a permuted view or a wrong number of values.
    #[test]
    fn reshape_no_copy_keeps_the_buffer() {
        let device = Default::default();
        let x = Tensor::<B, 3>::from_data(
            TensorData::new((0..24).map(|v| v as f32).collect(), [2, 3, 4]),
            &device,
        );
        let before = x.clone().into_primitive().tensor();
        let after = B::reshape_no_copy(before.clone(), &[6, 4]).expect("standard layout");
        assert_eq!(after.shape().dims::<2>(), [6, 4]);
        assert_eq!(
            super::values(&before).as_ptr(),
            super::values(&after).as_ptr()
        );
        let y = crate::model::block::reshape(x.clone(), [4, 6]);
        assert_eq!(
            y.into_data().to_vec::<f32>().unwrap(),
            x.clone().into_data().to_vec::<f32>().unwrap()
        );
        let permuted = x.clone().permute([0, 2, 1]).into_primitive().tensor();
        assert!(B::reshape_no_copy(permuted, &[2, 12]).is_none());
        assert!(B::reshape_no_copy(x.into_primitive().tensor(), &[5, 5]).is_none());
    }

    /// The fused NdArray depthwise conv + SiLU against Burn's own `Conv2d` (groups = channels)
    /// and `silu`, on odd sizes, a 1 × 1 map, with and without bias, k = 3 and 5.
    #[test]
    fn depthwise_conv_silu_matches_burns_conv2d_and_silu() {
        let device = Default::default();
        for (batch, height, width, channels, k, bias) in DEPTHWISE_CASES {
            let mut rng = SplitMix64::new((height * 31 + width) as u64);
            let conv = depthwise_conv::<B>(channels, k, bias, &mut rng);
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(
                    rng.vec(batch * height * width * channels, -3.0, 3.0),
                    [batch, height, width, channels],
                ),
                &device,
            );
            let expected = activation::silu(conv.forward(x.clone().permute([0, 3, 1, 2])))
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let (weight, bias) = native_params(&conv);
            let fused = B::depthwise_conv_silu(x.into_primitive().tensor(), weight, bias)
                .expect("NdArray fuses odd square depthwise kernels");
            let worst = worst_error(fused, [batch, channels, height, width], &expected);
            assert!(
                worst <= 1e-6,
                "{:?}: off by {worst:e}",
                (batch, height, width, channels, k)
            );
        }
    }

    /// The native dense conv against Burn's own `Conv2d`, on channel-first and channel-last
    /// memory: strides 1, 2, (2, 1) and 3, padding on every side, on some sides or none, odd
    /// sizes, a kernel as large as the padded input, with and without bias.
    #[test]
    fn conv2d_dense_matches_burns_conv2d() {
        let device = Default::default();
        for (batch, c_in, c_out, height, width, k, stride, padding, bias) in DENSE_CASES {
            let mut rng = SplitMix64::new((height * 17 + width * 3 + c_in) as u64);
            let [top, left, bottom, right] = padding;
            let mut conv = Conv2dConfig::new([c_in, c_out], k)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .with_bias(bias)
                .init::<B>(&device);
            randomise(&mut conv, &mut rng);
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(
                    rng.vec(batch * c_in * height * width, -3.0, 3.0),
                    [batch, c_in, height, width],
                ),
                &device,
            );
            let expected = conv.forward(x.clone());
            let dims = expected.dims();
            let expected = expected.into_data().to_vec::<f32>().unwrap();
            // The input as given (channel-first memory), and the same values in channel-last
            // memory (a permuted view, as the model's activations reach the conv), which takes
            // the channel-last path and returns channel-last memory.
            let channel_last = x.clone().permute([0, 2, 3, 1]) * 1.0;
            let channel_last =
                Tensor::<B, 4>::from_data(channel_last.into_data(), &device).permute([0, 3, 1, 2]);
            assert!(channel_last_memory(&channel_last.clone().into_primitive().tensor()).is_some());
            assert!(
                channel_last_memory(&x.clone().into_primitive().tensor()).is_none() || c_in == 1
            );
            for (layout, input) in [("channel-first", x.clone()), ("channel-last", channel_last)] {
                let (weight, bias) = native_params(&conv);
                let native = B::conv2d_dense(
                    input.into_primitive().tensor(),
                    weight,
                    bias,
                    stride,
                    padding,
                )
                .expect("NdArray runs dense convolutions natively");
                let worst = worst_error(native, dims, &expected);
                assert!(
                    worst <= 1e-6,
                    "{layout} {:?}: off by {worst:e}",
                    (batch, c_in, c_out, height, width, k, stride, padding)
                );
            }
        }
    }

    /// The native GELU against Burn's exact one (erf in f64): within 4e-7 · max(1, |x|)
    /// absolute (odd length, values across erf's range), on a standard and on a channel-last
    /// input (which keeps its layout).
    #[test]
    fn gelu_matches_burns_exact_gelu() {
        let device = Default::default();
        let mut rng = SplitMix64::new(11);
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(rng.vec(3 * 7 * 1001, -9.0, 9.0), [3, 7, 1, 1001]),
            &device,
        );
        let channel_last =
            Tensor::<B, 4>::from_data(x.clone().permute([0, 2, 3, 1]).into_data(), &device)
                .permute([0, 3, 1, 2]);
        for input in [x.clone(), channel_last] {
            let inputs = input.clone().into_data().to_vec::<f32>().unwrap();
            let expected = activation::gelu(input.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let native =
                B::gelu_exact(input.into_primitive().tensor()).expect("NdArray has a native GELU");
            let native = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(native));
            assert_eq!(native.dims(), [3, 7, 1, 1001]);
            let native = native.into_data().to_vec::<f32>().unwrap();
            let worst = native
                .iter()
                .zip(&expected)
                .zip(&inputs)
                .map(|((a, e), x)| (a - e).abs() / x.abs().max(1.0))
                .fold(0.0f32, f32::max);
            assert!(worst <= 4e-7, "GELU off by {worst:e}");
        }
    }

    /// `max |a − e| / max |e|` over two gradients of the same shape.
    fn relative_gap<const D: usize>(a: Tensor<Ad, D>, e: Tensor<Ad, D>) -> f32 {
        assert_eq!(a.dims(), e.dims());
        let (a, e) = (
            a.into_data().to_vec::<f32>().unwrap(),
            e.into_data().to_vec::<f32>().unwrap(),
        );
        let scale = e
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        a.iter()
            .zip(&e)
            .map(|(a, e)| (a - e).abs() / scale)
            .fold(0.0f32, f32::max)
    }

    type Ad = burn::backend::Autodiff<B>;

    /// Asserts that `native`'s gradient in `native_grads` is within 1e-6 (of the largest) of
    /// `burn`'s in `burn_grads`; `what` names it in the message.
    fn assert_same_gradient<const D: usize>(
        native: &Tensor<Ad, D>,
        native_grads: &burn::backend::autodiff::grads::Gradients,
        burn: &Tensor<Ad, D>,
        burn_grads: &burn::backend::autodiff::grads::Gradients,
        what: &str,
    ) {
        let gap = relative_gap(
            Tensor::<Ad, D>::from_inner(native.grad(native_grads).unwrap()),
            Tensor::<Ad, D>::from_inner(burn.grad(burn_grads).unwrap()),
        );
        assert!(gap <= 1e-6, "{what} off by {gap:e}");
    }

    /// [`assert_same_gradient`] for a layer's weight and, if it has one, its bias.
    fn assert_same_parameter_gradients<const D: usize>(
        weight: &Param<Tensor<Ad, D>>,
        bias: Option<&Param<Tensor<Ad, 1>>>,
        native_grads: &burn::backend::autodiff::grads::Gradients,
        burn_grads: &burn::backend::autodiff::grads::Gradients,
        case: &str,
    ) {
        let w = weight.val();
        let what = format!("{case}: weight gradient");
        assert_same_gradient(&w, native_grads, &w, burn_grads, &what);
        if let Some(b) = bias {
            let b = b.val();
            let what = format!("{case}: bias gradient");
            assert_same_gradient(&b, native_grads, &b, burn_grads, &what);
        }
    }

    /// The native GELU in training: its input gradient (`gelu_exact_backward`) against the
    /// exact derivative `dy · (Φ(x) + x·φ(x))` in f64 (`erf` by Abramowitz and Stegun's 7.1.26,
    /// absolute error ≤ 1.5e-7), for a standard and a channel-last input, the loss weighted so
    /// that every element's upstream gradient differs. Burn's own `gelu_backward` is the
    /// derivative of the tanh approximation (7.5e-4 of the largest gradient off here), so it
    /// is not the reference.
    #[test]
    fn gelu_gradient_is_the_exact_derivative() {
        fn erf(x: f64) -> f64 {
            let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
            let poly = t
                * (0.254_829_592
                    + t * (-0.284_496_736
                        + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
            (1.0 - poly * (-x * x).exp()).copysign(x)
        }
        let device = Default::default();
        let mut rng = SplitMix64::new(12);
        let dims = [2, 5, 3, 67];
        let n: usize = dims.iter().product();
        let values = rng.vec(n, -7.0, 7.0);
        let weights = rng.vec(n, -1.0, 1.0);
        let expected: Vec<f64> = values
            .iter()
            .zip(&weights)
            .map(|(&x, &dy)| {
                let (x, dy) = (f64::from(x), f64::from(dy));
                let cdf = (1.0 + erf(x / std::f64::consts::SQRT_2)) / 2.0;
                let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                dy * (cdf + x * pdf)
            })
            .collect();
        let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let weights = Tensor::<Ad, 4>::from_data(TensorData::new(weights, dims), &device);
        for channel_last in [false, true] {
            let x = Tensor::<Ad, 4>::from_data(TensorData::new(values.clone(), dims), &device);
            let (leaf, input) = if channel_last {
                let leaf = Tensor::<Ad, 4>::from_data(x.permute([0, 2, 3, 1]).into_data(), &device)
                    .require_grad();
                (leaf.clone(), leaf.permute([0, 3, 1, 2]))
            } else {
                let leaf = x.require_grad();
                (leaf.clone(), leaf)
            };
            let grads = (crate::model::block::gelu(input) * weights.clone())
                .sum()
                .backward();
            let grad = Tensor::<Ad, 4>::from_inner(leaf.grad(&grads).unwrap());
            let grad = if channel_last {
                grad.permute([0, 3, 1, 2])
            } else {
                grad
            };
            assert_eq!(grad.dims(), dims);
            let grad = grad.into_data().to_vec::<f32>().unwrap();
            let gap = grad
                .iter()
                .zip(&expected)
                .map(|(a, e)| (f64::from(*a) - e).abs() / scale)
                .fold(0.0f64, f64::max);
            assert!(
                gap <= 1e-6,
                "channel_last {channel_last}: GELU gradient off by {gap:e}"
            );
        }
    }

    /// The native linear in training: gradients of `x`, the weight and the bias
    /// (`native_linear_backward`) against Burn's `Linear` on `Autodiff<NdArray>`, for 2-D and
    /// 4-D inputs (standard and permuted), with and without bias, `K` above the products'
    /// 256-deep blocks, and with `x` untracked (its gradient not computed, the others right).
    #[test]
    fn linear_gradients_match_burns_linear() {
        use burn::nn::LinearConfig;
        let device = Default::default();
        for (rows, k, n, bias, track_x) in [
            ([2, 3, 5, 1], 7, 6, true, true),
            ([1, 1, 1, 33], 300, 5, false, true),
            ([3, 1, 2, 2], 9, 11, true, false),
        ] {
            let mut rng = SplitMix64::new((k * 31 + n) as u64);
            let mut linear = LinearConfig::new(k, n).with_bias(bias).init::<Ad>(&device);
            linear.weight = Param::from_tensor(Tensor::from_data(
                TensorData::new(rng.vec(k * n, -1.0, 1.0), [k, n]),
                &device,
            ));
            if bias {
                linear.bias = Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(rng.vec(n, -1.0, 1.0), [n]),
                    &device,
                )));
            }
            let m: usize = rows.iter().product();
            let x_values = rng.vec(m * k, -2.0, 2.0);
            let dy_dims = [rows[0], rows[1], rows[2] * rows[3], n];
            let dy = Tensor::<Ad, 4>::from_data(
                TensorData::new(rng.vec(m * n, -1.0, 1.0), dy_dims),
                &device,
            );
            for permuted in [false, true] {
                let leaf = || {
                    let x = Tensor::<Ad, 4>::from_data(
                        TensorData::new(x_values.clone(), [rows[0], rows[1], rows[2] * rows[3], k]),
                        &device,
                    );
                    if track_x { x.require_grad() } else { x }
                };
                let view = |x: Tensor<Ad, 4>| {
                    if permuted { x.permute([1, 0, 2, 3]) } else { x }
                };
                let dy = if permuted {
                    dy.clone().permute([1, 0, 2, 3])
                } else {
                    dy.clone()
                };
                // Native: the model's linear_4d; Burn: Linear::forward on the same view.
                let x = leaf();
                let y = crate::model::block::linear_4d(&linear, view(x.clone()));
                let native_grads = (y * dy.clone()).sum().backward();
                let x_burn = leaf();
                let y = linear.forward(view(x_burn.clone()));
                let burn_grads = (y * dy.clone()).sum().backward();
                let case = format!("rows {rows:?}, k {k}, n {n}, bias {bias}, permuted {permuted}");
                assert_same_parameter_gradients(
                    &linear.weight,
                    linear.bias.as_ref(),
                    &native_grads,
                    &burn_grads,
                    &case,
                );
                match (x.grad(&native_grads), x_burn.grad(&burn_grads)) {
                    (Some(a), Some(e)) => {
                        let gap = relative_gap(
                            Tensor::<Ad, 4>::from_inner(a),
                            Tensor::<Ad, 4>::from_inner(e),
                        );
                        assert!(gap <= 1e-6, "{case}: input gradient off by {gap:e}");
                    }
                    (None, None) => assert!(!track_x),
                    (a, e) => panic!(
                        "{case}: input gradient present {} vs {}",
                        a.is_some(),
                        e.is_some()
                    ),
                }
            }
        }
    }

    /// The native depthwise conv in training (`depthwise_conv` and its backward, through SS2D's
    /// call path on `Autodiff<NdArray>`) against Burn's own `Conv2d` and its backward: output,
    /// input, weight and bias gradients; odd sizes, k = 3 and 5, a 1 × 1 image (every tap but
    /// the centre in the padding), with and without bias, and a permuted (not standard-layout)
    /// input.
    #[test]
    fn depthwise_conv_gradients_match_burns_conv2d() {
        let device = Default::default();
        for (batch, height, width, channels, k, bias) in DEPTHWISE_CASES {
            let mut rng = SplitMix64::new((height * 37 + width) as u64);
            let conv = depthwise_conv::<Ad>(channels, k, bias, &mut rng);
            let n = batch * height * width * channels;
            let x_values = rng.vec(n, -3.0, 3.0);
            let dy = Tensor::<Ad, 4>::from_data(
                TensorData::new(rng.vec(n, -1.0, 1.0), [batch, channels, height, width]),
                &device,
            );
            for permuted in [false, true] {
                let case = format!("{:?}", (batch, height, width, channels, k, bias, permuted));
                // x channel-last [batch, height, width, channels]; permuted: stored as
                // [batch, width, height, channels] and seen through a permute.
                let leaf = || {
                    if permuted {
                        let x = Tensor::<Ad, 4>::from_data(
                            TensorData::new(x_values.clone(), [batch, height, width, channels]),
                            &device,
                        );
                        let stored = Tensor::<Ad, 4>::from_data(
                            x.permute([0, 2, 1, 3]).into_data(),
                            &device,
                        )
                        .require_grad();
                        (stored.clone(), stored.permute([0, 2, 1, 3]))
                    } else {
                        let x = Tensor::<Ad, 4>::from_data(
                            TensorData::new(x_values.clone(), [batch, height, width, channels]),
                            &device,
                        )
                        .require_grad();
                        (x.clone(), x)
                    }
                };
                let (native_leaf, x) = leaf();
                let (weight, bias_p) = native_params(&conv);
                let y = Ad::depthwise_conv(x.into_primitive().tensor(), weight, bias_p)
                    .expect("NdArray runs odd square depthwise kernels natively");
                let y = Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(y));
                let (burn_leaf, x) = leaf();
                let expected = conv.forward(x.permute([0, 3, 1, 2]));
                let gap = relative_gap(y.clone(), expected.clone());
                assert!(gap <= 1e-6, "{case}: output off by {gap:e}");
                let native_grads = (y * dy.clone()).sum().backward();
                let burn_grads = (expected * dy.clone()).sum().backward();
                assert_same_gradient(
                    &native_leaf,
                    &native_grads,
                    &burn_leaf,
                    &burn_grads,
                    &format!("{case}: input gradient"),
                );
                assert_same_parameter_gradients(
                    &conv.weight,
                    conv.bias.as_ref(),
                    &native_grads,
                    &burn_grads,
                    &case,
                );
            }
        }
    }

    /// The native dense conv in training (`conv2d_dense` and its backward on
    /// `Autodiff<NdArray>`, through the model's `conv2d`) against Burn's own `Conv2d` and its
    /// backward: input, weight and bias gradients on channel-first and channel-last memory,
    /// the forward test's strides and paddings (taps in the padding, strides that skip input
    /// rows, a kernel as large as the padded input).
    #[test]
    fn conv2d_dense_gradients_match_burns_conv2d() {
        let device = Default::default();
        for (batch, c_in, c_out, height, width, k, stride, padding, bias) in DENSE_CASES {
            let case = format!(
                "{:?}",
                (batch, c_in, c_out, height, width, k, stride, padding)
            );
            let mut rng = SplitMix64::new((height * 19 + width * 5 + c_in) as u64);
            let [top, left, bottom, right] = padding;
            let mut conv = Conv2dConfig::new([c_in, c_out], k)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .with_bias(bias)
                .init::<Ad>(&device);
            randomise(&mut conv, &mut rng);
            let x_values = rng.vec(batch * c_in * height * width, -3.0, 3.0);
            let out_dims = conv
                .forward(Tensor::<Ad, 4>::zeros(
                    [batch, c_in, height, width],
                    &device,
                ))
                .dims();
            let dy = Tensor::<Ad, 4>::from_data(
                TensorData::new(rng.vec(out_dims.iter().product(), -1.0, 1.0), out_dims),
                &device,
            );
            for channel_last in [false, true] {
                // The leaf and the [batch, C_in, H, W] view the conv reads.
                let leaf = || {
                    let x = Tensor::<Ad, 4>::from_data(
                        TensorData::new(x_values.clone(), [batch, c_in, height, width]),
                        &device,
                    );
                    if channel_last {
                        let stored = Tensor::<Ad, 4>::from_data(
                            x.permute([0, 2, 3, 1]).into_data(),
                            &device,
                        )
                        .require_grad();
                        (stored.clone(), stored.permute([0, 3, 1, 2]))
                    } else {
                        let x = x.require_grad();
                        (x.clone(), x)
                    }
                };
                let (native_leaf, x) = leaf();
                let y = crate::model::conv::conv2d(&conv, x);
                let (burn_leaf, x) = leaf();
                let expected = conv.forward(x);
                let gap = relative_gap(y.clone(), expected.clone());
                assert!(
                    gap <= 1e-6,
                    "{case} channel_last {channel_last}: output off by {gap:e}"
                );
                let native_grads = (y * dy.clone()).sum().backward();
                let burn_grads = (expected * dy.clone()).sum().backward();
                assert_same_gradient(
                    &native_leaf,
                    &native_grads,
                    &burn_leaf,
                    &burn_grads,
                    &format!("{case} channel_last {channel_last}: input gradient"),
                );
                assert_same_parameter_gradients(
                    &conv.weight,
                    conv.bias.as_ref(),
                    &native_grads,
                    &burn_grads,
                    &format!("{case} channel_last {channel_last}"),
                );
            }
        }
    }

    /// SS2D's per-direction products in training (`native_direction_matmul` and its backward
    /// on `Autodiff<NdArray>`) against Burn's broadcast matmul and its backward: the output,
    /// `x`'s and the weight's gradients, odd sizes, `x` a narrowed (not standard-layout) view.
    #[test]
    fn direction_matmul_gradients_match_the_broadcast_matmul() {
        let device = Default::default();
        let mut rng = SplitMix64::new(21);
        let (batch, k, m, d, l) = (3, 4, 5, 7, 29);
        let w_values = rng.vec(k * m * d, -1.0, 1.0);
        let x_values = rng.vec(batch * k * (d + 2) * l, -2.0, 2.0);
        let dy = Tensor::<Ad, 4>::from_data(
            TensorData::new(rng.vec(batch * k * m * l, -1.0, 1.0), [batch, k, m, l]),
            &device,
        );
        let leaves = || {
            let w =
                Tensor::<Ad, 3>::from_data(TensorData::new(w_values.clone(), [k, m, d]), &device)
                    .require_grad();
            let x = Tensor::<Ad, 4>::from_data(
                TensorData::new(x_values.clone(), [batch, k, d + 2, l]),
                &device,
            )
            .require_grad();
            (w, x)
        };
        let (w, x) = leaves();
        let native = Ad::native_direction_matmul(
            w.clone().into_primitive().tensor(),
            x.clone().narrow(2, 1, d).into_primitive().tensor(),
        )
        .expect("NdArray runs the per-direction products natively");
        let native = Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(native));
        let (w_burn, x_burn) = leaves();
        let expected = w_burn
            .clone()
            .unsqueeze_dim::<4>(0)
            .expand([batch, k, m, d])
            .matmul(x_burn.clone().narrow(2, 1, d));
        let gap = relative_gap(native.clone(), expected.clone());
        assert!(gap <= 1e-6, "output off by {gap:e}");
        let native_grads = (native * dy.clone()).sum().backward();
        let burn_grads = (expected * dy).sum().backward();
        assert_same_gradient(&x, &native_grads, &x_burn, &burn_grads, "x gradient");
        assert_same_gradient(&w, &native_grads, &w_burn, &burn_grads, "weight gradient");
    }
}
