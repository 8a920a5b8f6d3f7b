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

use super::{ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

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

/// `SiLU(depthwise_conv(x))`: `x [batch, height, width, channels]` (channel-last, contiguous),
/// `weight [channels, k, k]`, zero padding `(k − 1)/2`, stride 1 → `[batch, channels, height,
/// width]`. One rayon task per output row `(batch, i)`: the row is accumulated channel-last
/// (the inner loop runs over contiguous channels and vectorises), tap by tap in the order
/// `(p, q)` row-major after the bias, then SiLU'd and written out channel by channel.
fn depthwise_conv_silu(
    x: &[f32],
    [batch, height, width, channels]: [usize; 4],
    weight: &[f32],
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let pad = k / 2;
    // Taps as [p, q, channel] so that the inner loop reads them contiguously.
    let mut taps = vec![0.0f32; k * k * channels];
    for c in 0..channels {
        for pq in 0..k * k {
            taps[pq * channels + c] = weight[c * k * k + pq];
        }
    }
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
                    for a in a.iter_mut() {
                        *a *= selective_scan::fastmath::sigmoid(*a);
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

/// `x [m, k] · weight [k, n] (+ bias)` (see [`SelectiveScanBackend::native_linear`]): one matrix
/// product (matrixmultiply's sgemm, threaded) written straight into a new, uninitialised
/// buffer, then the bias added row by row, the order of Burn's `matmul` then `add`.
fn linear(x: &[f32], weight: &[f32], bias: Option<&[f32]>, [m, k, n]: [usize; 3]) -> Vec<f32> {
    assert!(
        x.len() == m * k && weight.len() == k * n,
        "linear: x is [m, k], weight [k, n]"
    );
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `x` holds m·k and `weight` k·n values (asserted), row-major with the strides
    // given; `y` has capacity m·n. With β = 0 matrixmultiply writes every element of the m × n
    // output without reading it (also for k = 0, where it writes zeros), so all m·n values are
    // initialised when the length is set.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            weight.as_ptr(),
            n as isize,
            1,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        );
        y.set_len(m * n);
    }
    if let Some(bias) = bias {
        add_bias_rows(&mut y, bias);
    }
    y
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
        // SAFETY: the operands hold [M, D] and [D, L] row-major at these offsets (asserted
        // lengths); the output block [M, L] at bk·M·L lies inside the capacity. With β = 0
        // matrixmultiply writes every output element without reading it, so after the loop
        // all batch·K·M·L values are initialised.
        unsafe {
            matrixmultiply::sgemm(
                m,
                d,
                l,
                1.0,
                weight.as_ptr().add(k * m * d),
                d as isize,
                1,
                x.as_ptr().add(bk * d * l),
                l as isize,
                1,
                0.0,
                y.as_mut_ptr().add(bk * m * l),
                l as isize,
                1,
            );
        }
    }
    // SAFETY: see above: every element was written.
    unsafe { y.set_len(batch * directions * m * l) };
    y
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
/// then `y = patches · weightᵀ` is one matrix product (matrixmultiply, threaded; the weight
/// read transposed through its strides, not copied), plus the bias. Reading and writing
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
    use ndarray::{ArrayView2, ArrayViewMut2};
    use rayon::prelude::*;
    let (taps, len) = (c_in * kh * kw, out_h * out_w);
    let mut patches = vec![0.0f32; len * taps];
    let mut y = vec![0.0f32; batch * len * c_out];
    let weight_t = ArrayView2::from_shape((c_out, taps), weight)
        .expect("weight is [C_out, taps]")
        .reversed_axes();
    for (b, y_b) in y.chunks_mut(len * c_out).enumerate() {
        let image = &x[b * height * width * c_in..(b + 1) * height * width * c_in];
        patches
            .par_chunks_mut(out_w * taps)
            .enumerate()
            .for_each(|(i, rows)| {
                for (j, row) in rows.chunks_exact_mut(taps).enumerate() {
                    for p in 0..kh {
                        let r = (i * sh + p).checked_sub(top).filter(|r| *r < height);
                        for q in 0..kw {
                            let s = (j * sw + q).checked_sub(left).filter(|s| *s < width);
                            // Taps (c, p, q) of this (p, q): stride kh·kw in the row.
                            let dst = row[p * kw + q..].iter_mut().step_by(kh * kw);
                            match (r, s) {
                                (Some(r), Some(s)) => {
                                    let src = &image[(r * width + s) * c_in..][..c_in];
                                    for (d, v) in dst.zip(src) {
                                        *d = *v;
                                    }
                                }
                                _ => dst.for_each(|d| *d = 0.0),
                            }
                        }
                    }
                }
            });
        let patches =
            ArrayView2::from_shape((len, taps), &patches).expect("patches are [len, taps]");
        let mut out =
            ArrayViewMut2::from_shape((len, c_out), &mut *y_b).expect("the output is [len, C_out]");
        ndarray::linalg::general_mat_mul(1.0, &patches, &weight_t, 0.0, &mut out);
        if let Some(bias) = bias {
            add_bias_rows(y_b, bias);
        }
    }
    y
}

/// A dense convolution (see [`SelectiveScanBackend::conv2d_dense`]): per image, the
/// `[C_in·kh·kw, H'·W']` column matrix is gathered straight from the input (rayon over its
/// rows; zero where a tap falls in the padding), then `y = weight · columns` is one matrix
/// product (matrixmultiply, threaded), plus the bias.
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
    use ndarray::{ArrayView2, ArrayViewMut2};
    use rayon::prelude::*;
    let (taps, len) = (c_in * kh * kw, out_h * out_w);
    let mut columns = vec![0.0f32; taps * len];
    let mut y = vec![0.0f32; batch * c_out * len];
    let weight = ArrayView2::from_shape((c_out, taps), weight).expect("weight is [C_out, taps]");
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
        let cols = ArrayView2::from_shape((taps, len), &columns).expect("columns are [taps, len]");
        let mut out =
            ArrayViewMut2::from_shape((c_out, len), y_b).expect("the output is [C_out, len]");
        ndarray::linalg::general_mat_mul(1.0, &weight, &cols, 0.0, &mut out);
        if let Some(bias) = bias {
            for (row, b) in y_b.chunks_exact_mut(len).zip(bias) {
                row.iter_mut().for_each(|v| *v += b);
            }
        }
    }
    y
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
        let dims = x.shape().dims::<4>();
        let [channels, one, k, k2] = weight.shape().dims::<4>();
        if one != 1 || k != k2 || k % 2 == 0 || dims[3] != channels {
            return None;
        }
        let (x, weight) = (values(&x), values(&weight));
        let bias = bias.as_ref().map(values);
        let y = depthwise_conv_silu(&x, dims, &weight, k, bias.as_deref());
        let [batch, height, width, _] = dims;
        Some(tensor(y, &[batch, channels, height, width]))
    }

    fn gelu_exact(x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        use rayon::prelude::*;
        let isa = cpu::Isa::detect();
        let run = |input: &[f32]| {
            let mut y = vec![0.0f32; input.len()];
            y.par_chunks_mut(1 << 14)
                .zip(input.par_chunks(1 << 14))
                .for_each(|(y, x)| cpu::gelu_into(isa, x, y));
            y
        };
        let shape = x.shape().to_vec();
        // Elementwise: channel-last memory (the stem hands it over so) is mapped in memory
        // order and keeps its layout, with no gathering copy.
        if let Some(memory) = channel_last_memory(&x) {
            let [batch, channels, height, width] = shape[..] else {
                unreachable!("channel_last_memory only accepts 4-D tensors")
            };
            let array = ndarray::ArcArray::from_shape_vec(
                ndarray::IxDyn(&[batch, height, width, channels]),
                run(memory),
            )
            .expect("same number of values")
            .permuted_axes(ndarray::IxDyn(&[0, 3, 1, 2]));
            return Some(NdArrayTensor::from(array));
        }
        Some(tensor(run(&values(&x)), &shape))
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
            let array = ndarray::ArcArray::from_shape_vec(
                ndarray::IxDyn(&[dims[0], out[0], out[1], c_out]),
                y,
            )
            .expect("the conv returns exactly batch·H'·W'·C_out values")
            .permuted_axes(ndarray::IxDyn(&[0, 3, 1, 2]));
            return Some(NdArrayTensor::from(array));
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
    fn randomise(conv: &mut burn::nn::conv::Conv2d<B>, rng: &mut SplitMix64) {
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
    /// `K` above matrixmultiply's 256-deep blocks, with and without bias, one row.
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
        for (batch, height, width, channels, k, bias) in [
            (2, 5, 7, 13, 3, true),
            (1, 9, 4, 8, 5, false),
            (3, 1, 1, 3, 3, true),
            (1, 2, 11, 17, 3, false),
        ] {
            let mut rng = SplitMix64::new((height * 31 + width) as u64);
            let mut conv = Conv2dConfig::new([channels, channels], [k, k])
                .with_groups(channels)
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_bias(bias)
                .init::<B>(&device);
            randomise(&mut conv, &mut rng);
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
        for (batch, c_in, c_out, height, width, k, stride, padding, bias) in [
            (2, 3, 5, 9, 7, [3, 3], [2, 2], [1, 1, 1, 1], true),
            (1, 4, 6, 8, 8, [2, 2], [2, 2], [0, 0, 0, 0], false),
            (3, 2, 3, 5, 6, [3, 1], [2, 1], [1, 0, 1, 0], true),
            (1, 5, 2, 3, 3, [3, 3], [1, 1], [0, 0, 0, 0], false),
            (2, 3, 4, 11, 6, [4, 4], [4, 4], [0, 0, 0, 0], true),
            // Stride 3 with a left padding of 2: the first in-row tap of a column starts after
            // the padding, and the right edge pads for some taps only.
            (1, 2, 3, 10, 11, [3, 3], [3, 3], [2, 2, 0, 1], true),
        ] {
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
}
