//! The selective scan as a Burn op: a backend-extension trait with fused forward and backward,
//! its implementations, and the public [`selective_scan`](fn@selective_scan) function.
//!
//! | backend | implementation |
//! |---|---|
//! | `CubeBackend<R, F, I, BT>` (WGPU, CUDA, ROCm) | the CubeCL kernels of `selective-scan` (`cube`) |
//! | `Fusion<B>` (burn's default `Wgpu` with `fusion`) | a fusion custom op calling `B` (`fusion`) |
//! | `NdArray` | the native fused CPU scan `selective_scan::cpu` ([`ndarray`]) |
//! | `Flex` (feature `flex`), or any backend that implements the trait with no body | the tensor-op fallback ([`fallback`]) |
//! | `Autodiff<B, C>` | a custom `Backward` that calls `B`'s fused backward ([`autodiff`]) |
//!
//! The CubeCL impls (`cube`, `fusion`) are behind the `cubecl` feature, which every GPU
//! runtime feature (`wgpu`, the default; `cuda`; `rocm`) turns on; NdArray, the fallback and
//! autodiff are always there; the `Flex` impl with the `flex` feature (Burn's `flex` backend is a
//! large crate to compile).
//!
//! The same trait carries the model's other native ops (hooks returning `None` by default):
//! inference-only ones (LayerNorm, cross-scan/merge, fused depthwise conv + SiLU, reshapes) and
//! differentiable ones with a `*_backward` hook (linear, exact GELU, depthwise and dense convs,
//! SS2D's per-direction products), which `Autodiff<B>` wraps in a backward step of its own so
//! that training runs them natively too. NdArray implements all of them.

pub mod autodiff;
#[cfg(feature = "cubecl")]
pub mod cube;
pub mod fallback;
#[cfg(feature = "cubecl")]
pub mod fusion;
pub mod ndarray;
#[cfg(any(test, feature = "testing"))]
pub mod problem;
mod sgemm;
#[cfg(feature = "shortcut-control")]
pub mod shortcut;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive, backend::Backend};
use selective_scan::{ArgShapes, ScanError, ScanShape};

/// The inputs of one scan as backend primitives.
///
/// # Shapes
/// - `u, delta`: `[batch, channels, seq_len]`
/// - `a`: `[channels, d_state]`
/// - `b, c`: `[batch, groups, d_state, seq_len]`
/// - `d, delta_bias`: `[channels]`
#[derive(Debug)]
pub struct ScanTensors<B: Backend> {
    /// Input sequence.
    pub u: FloatTensor<B>,
    /// Raw step sizes.
    pub delta: FloatTensor<B>,
    /// State matrix (real, normally negative).
    pub a: FloatTensor<B>,
    /// Input projection per group.
    pub b: FloatTensor<B>,
    /// Output projection per group.
    pub c: FloatTensor<B>,
    /// Skip connection.
    pub d: Option<FloatTensor<B>>,
    /// Bias added to `delta`.
    pub delta_bias: Option<FloatTensor<B>>,
}

impl<B: Backend> Clone for ScanTensors<B> {
    fn clone(&self) -> Self {
        Self {
            u: self.u.clone(),
            delta: self.delta.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            c: self.c.clone(),
            d: self.d.clone(),
            delta_bias: self.delta_bias.clone(),
        }
    }
}

impl<B: Backend> ScanTensors<B> {
    /// The tensors that are present, in the order u, delta, A, B, C, D, delta_bias: the order
    /// of the op's parents in autodiff and of its inputs in a fusion custom op.
    pub fn present(&self) -> Vec<&FloatTensor<B>> {
        let optional = [self.d.as_ref(), self.delta_bias.as_ref()];
        [&self.u, &self.delta, &self.a, &self.b, &self.c]
            .into_iter()
            .chain(optional.into_iter().flatten())
            .collect()
    }

    /// The problem sizes, validated (panics with the argument, expected and actual shapes).
    pub fn shape(&self) -> ScanShape {
        self.try_shape().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The problem sizes, validated: the error names the argument and the expected and actual
    /// shapes.
    pub fn try_shape(&self) -> Result<ScanShape, ScanError> {
        let dims = |t: &FloatTensor<B>| t.shape().to_vec();
        let (u, delta, a, b, c) = (
            dims(&self.u),
            dims(&self.delta),
            dims(&self.a),
            dims(&self.b),
            dims(&self.c),
        );
        let d = self.d.as_ref().map(dims);
        let bias = self.delta_bias.as_ref().map(dims);
        ScanShape::from_args(&ArgShapes {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d: d.as_deref(),
            delta_bias: bias.as_deref(),
        })
    }

    /// Refuses an expanding recurrence ([`ScanError::Expanding`]): `A ≤ 0` everywhere and,
    /// without softplus, `delta + delta_bias ≥ 0`. One read-back of two scalars (`max A`,
    /// `min Δ`); on a GPU it waits for the work queued before it. Only when it fails are the
    /// offending tensors read whole, to name the first bad entry.
    pub fn check_non_expanding(
        &self,
        shape: &ScanShape,
        delta_softplus: bool,
    ) -> Result<(), ScanError> {
        let a = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(self.a.clone())).detach();
        let a_max = a.clone().max().cast(DType::F32);
        // `delta + delta_bias`, as the fallback forms it.
        let delta = || {
            let float = |t: &FloatTensor<B>| TensorPrimitive::Float(t.clone());
            let delta = Tensor::<B, 3>::from_primitive(float(&self.delta)).detach();
            let bias = self
                .delta_bias
                .as_ref()
                .map(|b| Tensor::<B, 1>::from_primitive(float(b)).detach());
            fallback::step_sizes(delta, bias, false).0
        };
        let extremes = if delta_softplus {
            a_max
        } else {
            Tensor::cat(vec![a_max, delta().min().cast(DType::F32)], 0)
        };
        let read = |t: Tensor<B, 1>| {
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| ScanError::Runtime {
                    detail: format!("reading A and delta back for the range check: {e:?}"),
                })
        };
        let extremes = read(extremes)?;
        let expanding = extremes[0] > 0.0 || extremes.get(1).is_some_and(|&m| m < 0.0);
        if !expanding {
            return Ok(());
        }
        let a = read(a.flatten::<1>(0, 1))?;
        let delta = read(delta().flatten::<1>(0, 2))?;
        // `delta` already holds `delta + delta_bias`.
        selective_scan::check_non_expanding(shape, &a, &delta, None, delta_softplus)
    }
}

/// Gradients of a scalar loss with respect to every input, as backend primitives (f32).
///
/// Shapes as in [`ScanTensors`]; `dd` and `ddelta_bias` are present exactly when `d` and
/// `delta_bias` were given.
#[derive(Debug)]
#[allow(missing_docs)]
pub struct ScanGradients<B: Backend> {
    pub du: FloatTensor<B>,
    pub ddelta: FloatTensor<B>,
    pub da: FloatTensor<B>,
    pub db: FloatTensor<B>,
    pub dc: FloatTensor<B>,
    pub dd: Option<FloatTensor<B>>,
    pub ddelta_bias: Option<FloatTensor<B>>,
}

impl<B: Backend> ScanGradients<B> {
    /// The gradients that are present, in the order of [`ScanTensors::present`].
    pub fn into_present(self) -> Vec<FloatTensor<B>> {
        [
            Some(self.du),
            Some(self.ddelta),
            Some(self.da),
            Some(self.db),
            Some(self.dc),
            self.dd,
            self.ddelta_bias,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Options of the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScanOptions {
    /// `Δ = softplus(delta + delta_bias)` (threshold 20) when true, `delta + delta_bias` when false.
    pub delta_softplus: bool,
}

/// Gradients of a layer with an input, a weight and an optional bias
/// ([`SelectiveScanBackend::native_linear_backward`],
/// [`SelectiveScanBackend::depthwise_conv_backward`],
/// [`SelectiveScanBackend::conv2d_dense_backward`],
/// [`SelectiveScanBackend::native_direction_matmul_backward`]): each `None` where it was not asked for.
pub struct LayerGradients<B: Backend> {
    /// The input's gradient, its shape.
    pub dx: Option<FloatTensor<B>>,
    /// The weight's gradient, its shape.
    pub dweight: Option<FloatTensor<B>>,
    /// The bias' gradient, its shape.
    pub dbias: Option<FloatTensor<B>>,
}

/// A backend that can run the selective scan, forward and backward.
///
/// The default bodies are the tensor-op fallback ([`fallback`]), so any backend gets a correct
/// (slow) scan with `impl SelectiveScanBackend for MyBackend {}`. CubeCL backends, `Fusion`,
/// `NdArray` and `Autodiff` override them with fused implementations. A backend that
/// implements one of the differentiable native ops (`native_linear`, `gelu_exact`,
/// `depthwise_conv`, `conv2d_dense`, `native_direction_matmul`) implements its `*_backward`
/// hook too: the autodiff backend relies on it (and panics naming the op where it is missing;
/// the GELU falls back to Burn's `gelu_backward`).
pub trait SelectiveScanBackend: Backend {
    /// Whether the model runs its convolutions as tensor ops ([`crate::model::conv`]: shifted
    /// multiply-adds for depthwise, unfold + matmul otherwise) instead of the backend's
    /// `conv2d`: on for NdArray, whose conv and conv backward are scalar loops (seconds per
    /// training step of a small model). NdArray runs the model's convolutions natively anyway
    /// (`conv2d_dense`, `depthwise_conv`), in inference and training; the tensor ops remain for
    /// the shapes those hooks decline.
    const CONV2D_BY_TENSOR_OPS: bool = false;

    /// SS2D's depthwise convolution and SiLU in one pass, for inference: `x` channel-last
    /// `[batch, height, width, channels]`, `weight [channels, 1, k, k]` (k odd, padding
    /// `(k − 1)/2`, stride 1), optional `bias [channels]` → `SiLU(conv(x))` channel-first
    /// `[batch, channels, height, width]`, the layout the cross-scan reads. `None` (the
    /// default, and always under autodiff) leaves it to the generic path; NdArray implements
    /// it natively.
    fn depthwise_conv_silu(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// SS2D's depthwise convolution (differentiable, for training; inference takes
    /// [`depthwise_conv_silu`](Self::depthwise_conv_silu)): `x` channel-last `[batch, height,
    /// width, channels]`, `weight [channels, 1, k, k]` (k odd, zero padding `(k − 1)/2`, stride
    /// 1), optional `bias [channels]` → `conv(x)` channel-first `[batch, channels, height,
    /// width]`. The autodiff backend wraps the inner backend's with
    /// [`depthwise_conv_backward`](Self::depthwise_conv_backward). `None` (the default) leaves
    /// it to the generic path (permute and [`crate::model::conv::conv2d`]).
    fn depthwise_conv(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The backward of [`depthwise_conv`](Self::depthwise_conv) for the upstream gradient
    /// `dy [batch, channels, height, width]`: the input's (channel-last, `x`'s shape), the
    /// weight's and the bias' gradients, each only where `needed` (`[x, weight, bias]`). A
    /// backend that implements `depthwise_conv` implements this too. NdArray: one pass over
    /// output rows for `dx` (the convolution with the flipped kernel), one for the weight and
    /// bias (partial sums per row, added in row order: the same bits for any number of
    /// threads).
    fn depthwise_conv_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        None
    }

    /// The exact GELU, `x · (1 + erf(x / √2)) / 2`, in one pass (differentiable: the autodiff
    /// backend wraps the inner backend's with [`gelu_exact_backward`](Self::gelu_exact_backward)).
    /// `None` (the default) leaves it to `activation::gelu`; NdArray implements
    /// it natively in one vectorised pass on every core (`selective_scan::cpu::gelu_into`: a
    /// rational `erf`, absolute error ≤ 4e-7 · max(1, |x|) against the f64 GELU) instead of
    /// five tensor ops with an f64 `erf` per element.
    fn gelu_exact(_x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    /// `LayerNorm` over the last dimension for inference, as Burn's `layer_norm` computes it
    /// (`(x − mean) / sqrt(var + epsilon) · gamma + beta`, biased variance), in one pass per
    /// row. `None` (the default, always under autodiff, and where NdArray's input is not a
    /// standard-layout buffer) leaves it to `LayerNorm::forward` (five tensor ops).
    fn native_layer_norm(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: Option<FloatTensor<Self>>,
        _epsilon: f64,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// SS2D's per-direction projections: `weight [K, M, D]` (one matrix per direction, the
    /// same for every image) times `x [batch, K, D, L]` → `[batch, K, M, L]`, as
    /// `weight.unsqueeze(0).expand([batch, K, M, D]).matmul(x)` computes it (differentiable:
    /// the autodiff backend wraps the inner backend's with
    /// [`native_direction_matmul_backward`](Self::native_direction_matmul_backward)). `None`
    /// (the default) leaves it to that; NdArray runs one sgemm per
    /// (image, direction) on the buffers (Burn's path materialises the expanded weight and
    /// copies both operands through reshapes around small products).
    fn native_direction_matmul(
        _weight: FloatTensor<Self>,
        _x: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The backward of [`native_direction_matmul`](Self::native_direction_matmul) for the
    /// upstream gradient `dy [batch, K, M, L]`: `dx [batch, K, D, L]` (`weight_kᵀ · dy`) and
    /// `dweight [K, M, D]` (`Σ_batch dy · xᵀ`, images in order), each only where `needed`
    /// (`[x, weight, _]`; there is no bias). A backend that implements
    /// `native_direction_matmul` implements this too. NdArray: one sgemm per (image, direction).
    fn native_direction_matmul_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        None
    }

    /// [`cross_scan`](crate::model::cross_scan::cross_scan) for inference in one pass:
    /// `x [batch, channels, height, width]` → `[batch, 4, channels, height·width]` (row-major,
    /// column-major, and both reversed). `None` (the default, and always under autodiff) leaves
    /// it to the tensor-op version; NdArray writes the four directions straight from the
    /// input (the tensor ops copy through a reshape, a transpose, two concatenations and a flip).
    fn native_cross_scan(_x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    /// [`cross_merge`](crate::model::cross_scan::cross_merge) for inference in one pass, with
    /// the tensor-op version's additions in its order (`(y0 + flip y2) + transpose(y1 + flip
    /// y3)`, so the same bits): `ys [batch, 4, channels, height·width]` → `[batch, channels,
    /// height, width]`. `None` (the default, and always under autodiff) leaves it to the
    /// tensor-op version.
    fn native_cross_merge(
        _ys: FloatTensor<Self>,
        _height: usize,
        _width: usize,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// `x` reshaped to `shape` (same number of values) without copying, for inference where
    /// the backend can: NdArray's own `reshape` copies even a contiguous tensor (it builds a
    /// copy-on-write view and then owns it), which the model did several times per block.
    /// `None` (the default, and always under autodiff) leaves it to `Tensor::reshape`; NdArray
    /// reshapes a standard-layout buffer it owns in place.
    fn reshape_no_copy(_x: FloatTensor<Self>, _shape: &[usize]) -> Option<FloatTensor<Self>> {
        None
    }

    /// A linear layer: `x [.., K] · weight [K, N] (+ bias [N])` → `[.., N]` (any number of
    /// leading dimensions, taken as the rows of one product), as `Linear::forward` computes it
    /// on a 2-D input (differentiable: the autodiff backend wraps the inner backend's with
    /// [`native_linear_backward`](Self::native_linear_backward)). `None` (the default) leaves it
    /// to `Linear::forward`; NdArray implements it natively (one threaded
    /// sgemm on the buffers into an uninitialised output, then the bias in one pass, and no
    /// reshape: Burn's NdArray `reshape` copies even a contiguous tensor, and its linear path
    /// spent about 2.5× the sgemm's time around the product on the model's shapes).
    fn native_linear(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The backward of [`gelu_exact`](Self::gelu_exact) for the upstream gradient `dy` (the
    /// shape of `x`): `dy · GELU'(x)`, `GELU'(x) = Φ(x) + x·φ(x)`. The autodiff backend runs a
    /// GELU natively when the inner backend's `gelu_exact` does, and then differentiates it with
    /// this (Burn's `gelu_backward` where this is `None`, the default). NdArray: one vectorised
    /// pass on every core (`selective_scan::cpu::gelu_backward_into`, absolute error ≤ 1e-6 on
    /// `GELU'`).
    fn gelu_exact_backward(
        _x: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The backward of [`native_linear`](Self::native_linear) for the upstream gradient
    /// `dy [.., N]`: `dx = dy · weightᵀ` (the shape of `x`), `dweight = xᵀ · dy` over every
    /// leading dimension, `dbias = Σ_rows dy`, each only where `needed` (`[x, weight, bias]`).
    /// A backend that implements `native_linear` implements this too: the autodiff backend runs
    /// a linear natively when the inner backend's `native_linear` does, and differentiates it
    /// with this. NdArray: two threaded sgemms on the buffers (no reshape, no transposed copy)
    /// and a column sum in fixed row blocks (the same bits for any number of threads).
    fn native_linear_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        None
    }

    /// A dense 2-D convolution (groups 1, dilation 1; differentiable: the autodiff backend wraps
    /// the inner backend's with [`conv2d_dense_backward`](Self::conv2d_dense_backward)):
    /// `x [batch, C_in, H, W]`,
    /// `weight [C_out, C_in, kh, kw]`, optional `bias [C_out]`, `stride [sh, sw]`, zero
    /// `padding [top, left, bottom, right]` → `[batch, C_out, H', W']`, as `Conv2d::forward`
    /// computes it (the stems and the conv downsamples). `None` (the default) leaves it to
    /// the generic path; NdArray implements it natively (im2col
    /// straight from the input, one threaded matrix product per image).
    fn conv2d_dense(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
        _stride: [usize; 2],
        _padding: [usize; 4],
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The backward of [`conv2d_dense`](Self::conv2d_dense) for the upstream gradient
    /// `dy [batch, C_out, H', W']`: the input's (`x`'s shape), the weight's and the bias'
    /// gradients, each only where `needed` (`[x, weight, bias]`). A backend that implements
    /// `conv2d_dense` implements this too: the autodiff backend runs a dense convolution
    /// natively when the inner backend's `conv2d_dense` does. NdArray: per image, the patch
    /// matrix again, `dweight += dyᵀ · patches` and `dpatches = dy · weight` (threaded sgemms),
    /// the patches' gradients added back onto the input rows they came from (one task per input
    /// row, in a fixed order); the same bits for any number of threads.
    fn conv2d_dense_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _stride: [usize; 2],
        _padding: [usize; 4],
        _dy: FloatTensor<Self>,
        _needed: [bool; 3],
    ) -> Option<LayerGradients<Self>> {
        None
    }

    /// Forward: `y [batch, channels, seq_len]` (f32) and what the backward needs besides the
    /// inputs (for the CubeCL kernels: the state at every chunk end).
    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        (fallback::forward::<Self>(inputs, options), None)
    }

    /// Backward for the upstream gradient `dy [batch, channels, seq_len]`, given the inputs and
    /// the `saved` state of the matching forward call (recomputed when `None`).
    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        saved: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        let _ = saved;
        fallback::backward::<Self>(inputs, dy, options)
    }
}

/// Burn's portable CPU backend runs the tensor-op fallback (feature `flex`).
#[cfg(feature = "flex")]
impl SelectiveScanBackend for burn::backend::Flex {}

fn float<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The exact selective scan (S6) of Mamba / VMamba, differentiable on every backend.
///
/// `h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t`, `y_t = C_t · h_t + D u_t`, with
/// `Δ_t = softplus(delta_t + delta_bias)` (threshold 20) when `delta_softplus`. Channel `d` uses
/// group `d / (channels / groups)` of `B` and `C`. The state is f32; `y` is f32 (f64 when `u` is
/// f64). `A`, `D` and `delta_bias` are used in f32; `u, delta, B, C` keep f16/bf16 where the
/// backend's kernel takes them and are cast to f32 otherwise.
///
/// # Shapes
/// - `u`, `delta`: `[batch, channels, seq_len]`
/// - `a`: `[channels, d_state]` (`d_state <= 256`)
/// - `b`, `c`: `[batch, groups, d_state, seq_len]`, `groups` dividing `channels`
/// - `d`, `delta_bias`: `[channels]`
/// - returns `[batch, channels, seq_len]`
///
/// # Panics
/// Before any work, with the message of the [`ScanError`] that [`try_selective_scan`] returns:
/// a wrong shape (naming the argument, the expected and the actual shape), an empty dimension,
/// or an expanding recurrence (`A > 0`, or `delta + delta_bias < 0` without softplus).
#[allow(clippy::too_many_arguments)]
pub fn selective_scan<B: SelectiveScanBackend>(
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    d: Option<Tensor<B, 1>>,
    delta_bias: Option<Tensor<B, 1>>,
    delta_softplus: bool,
) -> Tensor<B, 3> {
    try_selective_scan(u, delta, a, b, c, d, delta_bias, delta_softplus)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`selective_scan`](fn@selective_scan), returning its refusals as a [`ScanError`] instead of panicking.
///
/// Checked before any work: the shapes (ranks, agreement, `G | D`, `N ≤ 256`), every dimension
/// at least 1 (an empty batch or sequence is refused: [`ScanError::Empty`]), and a
/// non-expanding recurrence, `Δ·A ≤ 0` ([`ScanError::Expanding`]; see
/// [`ScanTensors::check_non_expanding`] for its cost). Where the kernels run, their index range
/// and the device's limits are checked too; those errors are panics naming the limit.
#[allow(clippy::too_many_arguments)]
pub fn try_selective_scan<B: SelectiveScanBackend>(
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    d: Option<Tensor<B, 1>>,
    delta_bias: Option<Tensor<B, 1>>,
    delta_softplus: bool,
) -> Result<Tensor<B, 3>, ScanError> {
    let wants_f64 = u.dtype() == DType::F64;
    let inputs = ScanTensors::<B> {
        u: float(u),
        delta: float(delta),
        a: float(a),
        b: float(b),
        c: float(c),
        d: d.map(float),
        delta_bias: delta_bias.map(float),
    };
    let shape = inputs.try_shape()?;
    inputs.check_non_expanding(&shape, delta_softplus)?;
    #[cfg(feature = "shortcut-control")]
    if shortcut::enabled() {
        return Ok(shortcut::forward(inputs, delta_softplus));
    }
    let inputs = normalize_dtypes(inputs);
    let (y, _) = B::selective_scan_forward(inputs, ScanOptions { delta_softplus });
    let y = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(y));
    Ok(if wants_f64 { y.cast(DType::F64) } else { y })
}

/// `A`, `D`, `delta_bias` to f32; `u, delta, B, C` to one dtype among f32/f16/bf16 (f32 unless
/// all four already share f16 or bf16).
fn normalize_dtypes<B: Backend>(t: ScanTensors<B>) -> ScanTensors<B> {
    let to = |x: FloatTensor<B>, dtype: DType| {
        if x.dtype() == dtype {
            x
        } else {
            B::float_cast(x, dtype.into())
        }
    };
    let dtypes = [t.u.dtype(), t.delta.dtype(), t.b.dtype(), t.c.dtype()];
    let common = if dtypes.iter().all(|d| *d == dtypes[0])
        && matches!(dtypes[0], DType::F16 | DType::BF16 | DType::F32)
    {
        dtypes[0]
    } else {
        DType::F32
    };
    ScanTensors {
        u: to(t.u, common),
        delta: to(t.delta, common),
        a: to(t.a, DType::F32),
        b: to(t.b, common),
        c: to(t.c, common),
        d: t.d.map(|x| to(x, DType::F32)),
        delta_bias: t.delta_bias.map(|x| to(x, DType::F32)),
    }
}
