//! The model's 2-D convolutions as plain tensor ops, for backends whose own `conv2d` is slow
//! ([`SelectiveScanBackend::CONV2D_BY_TENSOR_OPS`]; NdArray's conv and its backward are scalar
//! loops that took seconds per training step of a small model).
//!
//! - depthwise (SS2D's `conv2d`, groups = channels): `k²` shifted multiply-adds of the padded
//!   input, `y[c, i, j] = bias[c] + Σ_{p,q} w[c, 0, p, q] · x_pad[c, i + p, j + q]`;
//! - dense (groups = 1: the stems and the conv downsamples): unfold the `k²` shifted, strided
//!   views of the padded input into `[batch, C_in·k², L]` and multiply by the weight
//!   `[C_out, C_in·k²]` (im2col), strides taken by reshape + narrow.
//!
//! For inference, a backend may run the dense case natively
//! ([`SelectiveScanBackend::conv2d_dense`]: NdArray does, im2col straight from the input and
//! one threaded matrix product per image).
//!
//! Both compute the function of `Conv2d::forward` (same padding, stride, bias) with another
//! summation order; their backward is slices, pads and matmuls. Anything else (dilation,
//! other group counts, padding modes other than explicit / valid) goes to `Conv2d::forward`.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::{FloatTensor, PadMode};
use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};

use crate::ops::SelectiveScanBackend;

/// `conv.forward(x)`, as tensor ops on the backends that ask for it.
///
/// # Shapes
/// - `x`: `[batch, C_in, height, width]` → `[batch, C_out, height', width']`
pub fn conv2d<B: SelectiveScanBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    if !B::CONV2D_BY_TENSOR_OPS {
        return conv.forward(x);
    }
    if let (1, [1, 1], Some(padding)) = (conv.groups, conv.dilation, explicit_padding(conv)) {
        let (weight, bias) = native_params(conv);
        let native = B::conv2d_dense(
            x.clone().into_primitive().tensor(),
            weight,
            bias,
            conv.stride,
            padding,
        );
        if let Some(y) = native {
            return Tensor::from_primitive(TensorPrimitive::Float(y));
        }
    }
    conv2d_by_tensor_ops(conv, x)
}

/// A conv's weight and bias as backend tensors, for the backends' native ops
/// ([`SelectiveScanBackend::conv2d_dense`], [`SelectiveScanBackend::depthwise_conv_silu`]).
pub(crate) fn native_params<B: Backend>(
    conv: &Conv2d<B>,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    (
        conv.weight.val().into_primitive().tensor(),
        conv.bias
            .as_ref()
            .map(|b| b.val().into_primitive().tensor()),
    )
}

/// `[top, left, bottom, right]` of an explicit or valid padding.
fn explicit_padding<B: Backend>(conv: &Conv2d<B>) -> Option<[usize; 4]> {
    match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([*top, *left, *bottom, *right]),
        PaddingConfig2d::Valid => Some([0; 4]),
        _ => None,
    }
}

/// `conv.forward(x)` as tensor ops on every backend (see the module doc); falls back to
/// `conv.forward` for the cases it does not cover.
pub fn conv2d_by_tensor_ops<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, channels, height, width] = x.dims();
    let [kh, kw] = conv.kernel_size;
    let [sh, sw] = conv.stride;
    let Some([top, left, bottom, right]) = explicit_padding(conv) else {
        return conv.forward(x);
    };
    let (rows, cols) = (height + top + bottom, width + left + right);
    let usable = conv.dilation == [1, 1]
        && sh > 0
        && sw > 0
        && rows >= kh
        && cols >= kw
        && (conv.groups == 1 || (conv.groups == channels && conv.weight.dims()[1] == 1));
    if !usable {
        return conv.forward(x);
    }
    let (out_h, out_w) = ((rows - kh) / sh + 1, (cols - kw) / sw + 1);
    // Extra zeros at the bottom/right so that every strided view has `s · out` rows/columns.
    let (extra_h, extra_w) = (
        (kh - 1 + sh * out_h).saturating_sub(rows),
        (kw - 1 + sw * out_w).saturating_sub(cols),
    );
    let x = x.pad(
        (left, right + extra_w, top, bottom + extra_h),
        PadMode::Constant(0.0),
    );
    let view = |p: usize, q: usize| strided_view(x.clone(), p, q, [sh, sw], [out_h, out_w]);
    let weight = conv.weight.val(); // [C_out, C_in / groups, kh, kw]
    let y = if conv.groups == 1 {
        dense(view, weight, [kh, kw], [out_h, out_w])
    } else {
        depthwise(view, weight, [kh, kw])
    };
    match &conv.bias {
        Some(bias) => {
            let c_out = bias.dims()[0];
            y + bias.val().reshape([1, c_out, 1, 1])
        }
        None => y,
    }
}

/// `x[:, :, p + s_h·i, q + s_w·j]` for `i < out_h, j < out_w`.
///
/// # Shapes
/// - `x`: `[batch, C, ≥ p + s_h·out_h, ≥ q + s_w·out_w]` → `[batch, C, out_h, out_w]`
fn strided_view<B: Backend>(
    x: Tensor<B, 4>,
    p: usize,
    q: usize,
    [sh, sw]: [usize; 2],
    [out_h, out_w]: [usize; 2],
) -> Tensor<B, 4> {
    let [batch, channels, _, _] = x.dims();
    let x = x.narrow(2, p, sh * out_h).narrow(3, q, sw * out_w);
    if sh == 1 && sw == 1 {
        return x;
    }
    x.reshape([batch, channels * out_h, sh, out_w * sw])
        .narrow(2, 0, 1)
        .reshape([batch, channels * out_h, out_w, sw])
        .narrow(3, 0, 1)
        .reshape([batch, channels, out_h, out_w])
}

fn depthwise<B: Backend>(
    view: impl Fn(usize, usize) -> Tensor<B, 4>,
    weight: Tensor<B, 4>,
    [kh, kw]: [usize; 2],
) -> Tensor<B, 4> {
    let channels = weight.dims()[0];
    let mut y: Option<Tensor<B, 4>> = None;
    for p in 0..kh {
        for q in 0..kw {
            let w = weight
                .clone()
                .slice([0..channels, 0..1, p..p + 1, q..q + 1])
                .reshape([1, channels, 1, 1]);
            let term = view(p, q) * w;
            y = Some(match y {
                Some(acc) => acc + term,
                None => term,
            });
        }
    }
    y.expect("a kernel has at least one tap")
}

fn dense<B: Backend>(
    view: impl Fn(usize, usize) -> Tensor<B, 4>,
    weight: Tensor<B, 4>,
    [kh, kw]: [usize; 2],
    [out_h, out_w]: [usize; 2],
) -> Tensor<B, 4> {
    let [c_out, c_in, _, _] = weight.dims();
    let taps: Vec<Tensor<B, 4>> = (0..kh)
        .flat_map(|p| (0..kw).map(move |q| (p, q)))
        .map(|(p, q)| view(p, q))
        .collect();
    let batch = taps[0].dims()[0];
    let len = out_h * out_w;
    // [batch, C_in, k², L]: the weight's [C_in, kh, kw] order.
    let columns = Tensor::stack::<5>(taps, 2).reshape([batch, c_in * kh * kw, len]);
    let weight = weight
        .reshape([1, c_out, c_in * kh * kw])
        .expand([batch, c_out, c_in * kh * kw]);
    weight.matmul(columns).reshape([batch, c_out, out_h, out_w])
}
