//! The tensor-op fallback: a chunked scan in plain Burn tensor ops, for any backend.
//!
//! Within a chunk of `CHUNK` positions, with `S_t = Σ_{r ≤ t} Δ_r A` (a cumulative sum of
//! non-positive numbers), `h_t = e^{S_t} h_0 + Σ_{s ≤ t} e^{S_t − S_s} Δ_s B_s u_s`. Every
//! exponent is `≤ 0`, so nothing overflows (the closed form that divides by `e^{S_s}` does); the
//! weights `e^{S_t − S_s}` form a masked `CHUNK × CHUNK` matrix per `(batch, channel, state)`.
//! Chunks are carried sequentially. Memory per chunk is `O(B·D·N·CHUNK²)`; nothing of size
//! `B·D·L·N` exists. The backward is written out in tensor ops too (not by nesting Burn's
//! autodiff, whose graph lock is held while a `Backward` step runs).
//!
//! Correct on every backend, and slow (hundreds of tensor ops per sequence): the fused paths
//! exist so that this is never what a user of NdArray or a GPU backend runs.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Tensor, TensorMetadata, TensorPrimitive};

use super::{ScanGradients, ScanOptions, ScanTensors};

/// Positions per chunk of the fallback.
pub const CHUNK: usize = 16;

/// Sizes and the chunk-independent tensors of one scan.
struct Prepared<B: Backend> {
    batch: usize,
    channels: usize,
    groups: usize,
    d_state: usize,
    seq_len: usize,
    /// `delta + delta_bias`, `[batch, channels, seq_len]`.
    pre: Tensor<B, 3>,
    /// `Δ`, `[batch, channels, seq_len]`.
    dt: Tensor<B, 3>,
    u: Tensor<B, 3>,
    /// `A` as `[1, channels, d_state, 1]`.
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
}

/// One chunk `[start, end)`: its slices and states, `[batch, channels, d_state, len]` unless noted.
struct Chunk<B: Backend> {
    /// `Δ`, `u`: `[batch, channels, len]`.
    dt: Tensor<B, 3>,
    u: Tensor<B, 3>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    /// `S_t = Σ_{r ≤ t} Δ_r A` from the chunk start.
    s: Tensor<B, 4>,
    /// `e^{S_t − S_s}` for `s ≤ t`, 0 above the diagonal: `[.., len (t), len (s)]`.
    weights: Tensor<B, 5>,
    /// States `h_t`.
    h: Tensor<B, 4>,
}

impl<B: Backend> Prepared<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        u: Tensor<B, 3>,
        delta: Tensor<B, 3>,
        a: Tensor<B, 2>,
        b: Tensor<B, 4>,
        c: Tensor<B, 4>,
        delta_bias: Option<Tensor<B, 1>>,
        delta_softplus: bool,
    ) -> Self {
        let [batch, channels, seq_len] = u.dims();
        let [_, d_state] = a.dims();
        let groups = b.dims()[1];
        let (pre, dt) = step_sizes(delta, delta_bias, delta_softplus);
        Self {
            batch,
            channels,
            groups,
            d_state,
            seq_len,
            pre,
            dt,
            u,
            a: a.reshape([1, channels, d_state, 1]),
            b,
            c,
        }
    }

    /// `[batch, groups, d_state, len]` → `[batch, channels, d_state, len]`.
    fn per_channel(&self, t: Tensor<B, 4>, len: usize) -> Tensor<B, 4> {
        let per_group = self.channels / self.groups;
        t.unsqueeze_dim::<5>(2)
            .expand([self.batch, self.groups, per_group, self.d_state, len])
            .reshape([self.batch, self.channels, self.d_state, len])
    }

    /// `[batch, channels, d_state, len]` summed over the channels of each group →
    /// `[batch, groups, d_state, len]`.
    fn per_group(&self, t: Tensor<B, 4>, len: usize) -> Tensor<B, 4> {
        let per_group = self.channels / self.groups;
        t.reshape([self.batch, self.groups, per_group, self.d_state, len])
            .sum_dim(2)
            .squeeze_dim::<4>(2)
    }

    /// The chunk `[start, end)` from the incoming state `h0 [batch, channels, d_state]`.
    fn chunk(&self, start: usize, end: usize, h0: &Tensor<B, 3>) -> Chunk<B> {
        let (bt, ch, n, len) = (self.batch, self.channels, self.d_state, end - start);
        let device = self.u.device();
        let dt = self.dt.clone().slice([0..bt, 0..ch, start..end]);
        let u = self.u.clone().slice([0..bt, 0..ch, start..end]);
        let b = self.per_channel(
            self.b
                .clone()
                .slice([0..bt, 0..self.groups, 0..n, start..end]),
            len,
        );
        let c = self.per_channel(
            self.c
                .clone()
                .slice([0..bt, 0..self.groups, 0..n, start..end]),
            len,
        );
        let s = (dt.clone().unsqueeze_dim::<4>(2) * self.a.clone()).cumsum(3);
        // Burn's `tril_mask` is true outside the lower triangle: exactly s > t.
        let upper = Tensor::<B, 2, Bool>::tril_mask([len, len], 0, &device)
            .reshape([1, 1, 1, len, len])
            .expand([bt, ch, n, len, len]);
        let weights = (s.clone().unsqueeze_dim::<5>(4) - s.clone().unsqueeze_dim::<5>(3))
            .mask_fill(upper, f32::NEG_INFINITY)
            .exp();
        // Δ_s B_s u_s
        let inject = (dt.clone() * u.clone()).unsqueeze_dim::<4>(2) * b.clone();
        let h = weights
            .clone()
            .matmul(inject.unsqueeze_dim::<5>(4))
            .squeeze_dim::<4>(4)
            + s.clone().exp() * h0.clone().unsqueeze_dim::<4>(3);
        Chunk {
            dt,
            u,
            b,
            c,
            s,
            weights,
            h,
        }
    }

    fn chunks(&self) -> Vec<(usize, usize)> {
        (0..self.seq_len)
            .step_by(CHUNK)
            .map(|start| (start, (start + CHUNK).min(self.seq_len)))
            .collect()
    }

    fn last_state(&self, h: &Tensor<B, 4>, len: usize) -> Tensor<B, 3> {
        h.clone()
            .slice([
                0..self.batch,
                0..self.channels,
                0..self.d_state,
                len - 1..len,
            ])
            .squeeze_dim::<3>(3)
    }
}

/// `(delta + delta_bias, Δ)`, both `[batch, channels, seq_len]`: `Δ = softplus(delta +
/// delta_bias)` with mamba's threshold-20 rule when `softplus`, else the sum itself.
pub(crate) fn step_sizes<B: Backend>(
    delta: Tensor<B, 3>,
    delta_bias: Option<Tensor<B, 1>>,
    softplus: bool,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [_, channels, _] = delta.dims();
    let pre = match delta_bias {
        Some(bias) => delta + bias.reshape([1, channels, 1]),
        None => delta,
    };
    // The clamp keeps exp finite (and its gradient zero rather than NaN) where the other
    // branch is taken.
    let dt = if softplus {
        let soft = pre.clone().clamp_max(20.0).exp().log1p();
        soft.mask_where(pre.clone().greater_elem(20.0), pre.clone())
    } else {
        pre.clone()
    };
    (pre, dt)
}

/// The fallback forward on tensors of any backend.
///
/// # Shapes
/// As in [`super::selective_scan`].
#[allow(clippy::too_many_arguments)]
pub fn scan_tensors<B: Backend>(
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    d: Option<Tensor<B, 1>>,
    delta_bias: Option<Tensor<B, 1>>,
    delta_softplus: bool,
) -> Tensor<B, 3> {
    let p = Prepared::new(u, delta, a, b, c, delta_bias, delta_softplus);
    let mut h0 = Tensor::<B, 3>::zeros([p.batch, p.channels, p.d_state], &p.u.device());
    let mut outputs = vec![];
    for (start, end) in p.chunks() {
        let chunk = p.chunk(start, end, &h0);
        // y_t = Σ_n C_t h_t
        outputs.push((chunk.h.clone() * chunk.c).sum_dim(2).squeeze_dim::<3>(2));
        h0 = p.last_state(&chunk.h, end - start);
    }
    let mut y = Tensor::cat(outputs, 2);
    if let Some(skip) = d {
        y = y + p.u * skip.reshape([1, p.channels, 1]);
    }
    y
}

fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        B::float_cast(t, DType::F32.into())
    };
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prepared<B: Backend>(inputs: &ScanTensors<B>, options: ScanOptions) -> Prepared<B> {
    Prepared::new(
        tensor(inputs.u.clone()),
        tensor(inputs.delta.clone()),
        tensor(inputs.a.clone()),
        tensor(inputs.b.clone()),
        tensor(inputs.c.clone()),
        inputs.delta_bias.clone().map(tensor),
        options.delta_softplus,
    )
}

/// Fallback forward on primitives.
pub fn forward<B: Backend>(inputs: ScanTensors<B>, options: ScanOptions) -> FloatTensor<B> {
    scan_tensors::<B>(
        tensor(inputs.u),
        tensor(inputs.delta),
        tensor(inputs.a),
        tensor(inputs.b),
        tensor(inputs.c),
        inputs.d.map(tensor),
        inputs.delta_bias.map(tensor),
        options.delta_softplus,
    )
    .into_primitive()
    .tensor()
}

/// Fallback backward in tensor ops (the formulas of `selective_scan::reference`), chunk by chunk from the last.
///
/// Inside a chunk the adjoint `ĥ_t = a_{t+1} ĥ_{t+1} + dy_t C_t` is
/// `ĥ_t = Σ_{s ≥ t} e^{S_s − S_t} dy_s C_s + e^{S_last − S_t} κ`, the transposed forward weights,
/// where `κ = a_{s'} ĥ_{s'}` comes from the chunk after. The states are recomputed from the
/// incoming state of each chunk, kept from a first forward pass (`O(B·D·N·L/CHUNK)`).
pub fn backward<B: Backend>(
    inputs: ScanTensors<B>,
    dy: FloatTensor<B>,
    options: ScanOptions,
) -> ScanGradients<B> {
    let p = prepared(&inputs, options);
    let (bt, ch, n) = (p.batch, p.channels, p.d_state);
    let device = p.u.device();
    let dy = tensor::<B, 3>(dy);
    let chunks = p.chunks();
    let mut incoming = vec![Tensor::<B, 3>::zeros([bt, ch, n], &device)];
    for &(start, end) in &chunks[..chunks.len() - 1] {
        let h0 = incoming.last().expect("at least the zero state").clone();
        let chunk = p.chunk(start, end, &h0);
        incoming.push(p.last_state(&chunk.h, end - start));
    }
    let mut carry = Tensor::<B, 3>::zeros([bt, ch, n], &device);
    let (mut du, mut ddt, mut db, mut dc) = (vec![], vec![], vec![], vec![]);
    let mut da = Tensor::<B, 4>::zeros([1, ch, n, 1], &device);
    for (&(start, end), h0) in chunks.iter().zip(incoming).rev() {
        let len = end - start;
        let chunk = p.chunk(start, end, &h0);
        let gy = dy.clone().slice([0..bt, 0..ch, start..end]);
        let gy_c = gy.clone().unsqueeze_dim::<4>(2) * chunk.c.clone();
        let s_last = chunk.s.clone().slice([0..bt, 0..ch, 0..n, len - 1..len]);
        // ĥ, [batch, channels, d_state, len]
        let adj = chunk
            .weights
            .swap_dims(3, 4)
            .matmul(gy_c.unsqueeze_dim::<5>(4))
            .squeeze_dim::<4>(4)
            + (s_last - chunk.s.clone()).exp() * carry.unsqueeze_dim::<4>(3);
        let a_t = (chunk.dt.clone().unsqueeze_dim::<4>(2) * p.a.clone()).exp();
        let h_prev = Tensor::cat(
            vec![
                h0.unsqueeze_dim::<4>(3),
                chunk.h.clone().slice([0..bt, 0..ch, 0..n, 0..len - 1]),
            ],
            3,
        );
        let dt4 = chunk.dt.clone().unsqueeze_dim::<4>(2);
        let u4 = chunk.u.clone().unsqueeze_dim::<4>(2);
        // du_t = Σ_n ĥ_t Δ_t B_t (the skip term is added below)
        du.push(
            (adj.clone() * chunk.b.clone())
                .sum_dim(2)
                .squeeze_dim::<3>(2)
                * chunk.dt.clone(),
        );
        // dΔ_t = Σ_n ĥ_t (B_t u_t + A a_t h_{t-1})
        let decay = p.a.clone() * a_t.clone() * h_prev.clone();
        ddt.push(
            (adj.clone() * (chunk.b.clone() * u4.clone() + decay))
                .sum_dim(2)
                .squeeze_dim::<3>(2),
        );
        // dA = Σ_{b,t} ĥ_t Δ_t a_t h_{t-1}
        da = da
            + (adj.clone() * dt4.clone() * a_t.clone() * h_prev)
                .sum_dim(0)
                .sum_dim(3);
        // dB = Σ_{d∈g} ĥ_t Δ_t u_t;  dC = Σ_{d∈g} dy_t h_t
        db.push(p.per_group(adj.clone() * dt4 * u4, len));
        dc.push(p.per_group(gy.unsqueeze_dim::<4>(2) * chunk.h, len));
        // κ for the chunk before: a at this chunk's first position times ĥ there.
        carry = (a_t * adj)
            .slice([0..bt, 0..ch, 0..n, 0..1])
            .squeeze_dim::<3>(3);
    }
    du.reverse();
    ddt.reverse();
    db.reverse();
    dc.reverse();
    let mut du = Tensor::cat(du, 2);
    let ddt = Tensor::cat(ddt, 2);
    let chain = if options.delta_softplus {
        let sigmoid = burn::tensor::activation::sigmoid(p.pre.clone());
        sigmoid.mask_fill(p.pre.clone().greater_elem(20.0), 1.0)
    } else {
        Tensor::ones_like(&p.pre)
    };
    let ddelta = ddt * chain;
    let sum_bt = |t: Tensor<B, 3>| t.sum_dim(0).sum_dim(2).reshape([ch]);
    let dd = inputs.d.clone().map(|skip| {
        let skip = tensor::<B, 1>(skip);
        du = du.clone() + dy.clone() * skip.reshape([1, ch, 1]);
        sum_bt(dy.clone() * p.u.clone())
    });
    let ddelta_bias = inputs.delta_bias.as_ref().map(|_| sum_bt(ddelta.clone()));
    let prim = |t: Tensor<B, 3>| t.into_primitive().tensor();
    ScanGradients {
        du: prim(du),
        ddelta: prim(ddelta),
        da: da.reshape([ch, n]).into_primitive().tensor(),
        db: Tensor::cat(db, 3).into_primitive().tensor(),
        dc: Tensor::cat(dc, 3).into_primitive().tensor(),
        dd: dd.map(|t| t.into_primitive().tensor()),
        ddelta_bias: ddelta_bias.map(|t| t.into_primitive().tensor()),
    }
}
