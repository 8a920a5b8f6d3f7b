//! `Autodiff<B, C>`: a custom `Backward` that calls the inner backend's fused backward, and
//! registers gradients for exactly the tracked inputs among u, delta, A, B, C, D, delta_bias.
//! The same for the model's native ops that have a native backward (`NativeBackward`): the
//! exact GELU, the linear layers and the convolutions run as the inner backend's ops in training
//! too.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};

use burn::tensor::backend::Backend;

use super::{LayerGradients, ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

/// The backward step of one scan; `N` is the number of inputs (5 to 7, with D and delta_bias).
#[derive(Debug)]
struct ScanBackward {
    options: ScanOptions,
}

/// What the backward needs: the inner inputs, the inner saved state, and the input dtypes (the
/// gradients are cast back to them).
type State<B> = (ScanTensors<B>, Option<FloatTensor<B>>, Vec<DType>);

impl<B: SelectiveScanBackend, const N: usize> Backward<B, N> for ScanBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dy = grads.consume::<B>(&ops.node);
        let (inputs, saved, dtypes) = ops.state;
        let grads_in_order =
            B::selective_scan_backward(inputs, saved, dy, self.options).into_present();
        for ((parent, grad), dtype) in ops.parents.into_iter().zip(grads_in_order).zip(dtypes) {
            if let Some(node) = parent {
                let grad = if grad.dtype() == dtype {
                    grad
                } else {
                    B::float_cast(grad, dtype.into())
                };
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The inner backend's tensors, without their autodiff nodes.
fn untracked<B: SelectiveScanBackend, C: CheckpointStrategy>(
    inputs: ScanTensors<Autodiff<B, C>>,
) -> ScanTensors<B> {
    ScanTensors::<B> {
        u: inputs.u.primitive,
        delta: inputs.delta.primitive,
        a: inputs.a.primitive,
        b: inputs.b.primitive,
        c: inputs.c.primitive,
        d: inputs.d.map(|t| t.primitive),
        delta_bias: inputs.delta_bias.map(|t| t.primitive),
    }
}

fn forward_with<B: SelectiveScanBackend, C: CheckpointStrategy, const N: usize>(
    inputs: ScanTensors<Autodiff<B, C>>,
    options: ScanOptions,
) -> FloatTensor<Autodiff<B, C>> {
    let tensors = inputs.present();
    let nodes: Vec<_> = tensors.iter().map(|t| t.node.clone()).collect();
    let dtypes: Vec<DType> = tensors.iter().map(|t| t.primitive.dtype()).collect();
    let nodes: [_; N] = nodes
        .try_into()
        .unwrap_or_else(|_| unreachable!("N is the number of present inputs"));
    let inner = untracked(inputs);
    let step = ScanBackward { options };
    match step.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, saved) = B::selective_scan_forward(inner.clone(), options);
            prep.finish((inner, saved, dtypes), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::selective_scan_forward(inner, options).0),
    }
}

/// The backward step of a native op of the inner backend with `N` differentiable inputs:
/// `grads(state, dy, needed)` gives each input's gradient (in the nodes' order) where `needed`.
#[derive(Debug)]
struct NativeBackward<B: Backend, S, const N: usize> {
    grads: GradsFn<B, S, N>,
}

/// `(state, dy, needed) → the inputs' gradients` of a [`NativeBackward`].
type GradsFn<B, S, const N: usize> =
    fn(S, FloatTensor<B>, [bool; N]) -> [Option<FloatTensor<B>>; N];

impl<B, S, const N: usize> Backward<B, N> for NativeBackward<B, S, N>
where
    B: Backend,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    type State = S;

    fn backward(self, ops: Ops<S, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let needed = ops.parents.each_ref().map(Option::is_some);
        let computed = (self.grads)(ops.state, dy, needed);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// `y`, the inner backend's output of a native op on `inputs`, as an autodiff tensor whose
/// backward is `step` with `state` (kept only if some input is tracked).
fn native_op<B, C, S, const N: usize>(
    inputs: [&FloatTensor<Autodiff<B, C>>; N],
    y: FloatTensor<B>,
    state: S,
    step: NativeBackward<B, S, N>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    let nodes = inputs.map(|t| t.node.clone());
    match step.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

fn gelu_grads<B: SelectiveScanBackend>(
    x: FloatTensor<B>,
    dy: FloatTensor<B>,
    _needed: [bool; 1],
) -> [Option<FloatTensor<B>>; 1] {
    let grad = match B::gelu_exact_backward(x.clone(), dy.clone()) {
        Some(grad) => grad,
        None => B::gelu_backward(x, dy),
    };
    [Some(grad)]
}

/// A layer with an input, a weight and an optional bias whose inner backend runs it natively
/// with a native backward: the linear, the convolutions, the per-direction products.
trait WeightedLayer<B: SelectiveScanBackend> {
    /// Its name in the contract's panic message.
    const NAME: &'static str;

    /// What the layer needs besides the input, the weight and the bias (a convolution's stride
    /// and padding).
    type Params: Clone + Copy + Send + std::fmt::Debug + 'static;

    /// The inner backend's forward (`None` where it has no such op).
    fn forward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        params: Self::Params,
    ) -> Option<FloatTensor<B>>;

    /// The inner backend's backward (`None` breaks the contract: see [`layer_grads`]).
    fn backward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        params: Self::Params,
        dy: FloatTensor<B>,
        needed: [bool; 3],
    ) -> Option<LayerGradients<B>>;
}

/// A [`WeightedLayer`] without parameters whose forward is `$forward` (a closure of the inner
/// backend's `x`, `weight` and `bias`) and whose backward is the inner backend's hook `$hook`.
macro_rules! plain_layer {
    ($layer:ident, $name:literal, $forward:expr, $hook:ident) => {
        struct $layer;
        impl<B: SelectiveScanBackend> WeightedLayer<B> for $layer {
            const NAME: &'static str = $name;
            type Params = ();
            fn forward(
                x: FloatTensor<B>,
                weight: FloatTensor<B>,
                bias: Option<FloatTensor<B>>,
                _: (),
            ) -> Option<FloatTensor<B>> {
                let forward: fn(_, _, _) -> _ = $forward;
                forward(x, weight, bias)
            }
            fn backward(
                x: FloatTensor<B>,
                weight: FloatTensor<B>,
                _: (),
                dy: FloatTensor<B>,
                needed: [bool; 3],
            ) -> Option<LayerGradients<B>> {
                B::$hook(x, weight, dy, needed)
            }
        }
    };
}

plain_layer!(
    LinearLayer,
    "native_linear",
    |x, weight, bias| B::native_linear(x, weight, bias),
    native_linear_backward
);
plain_layer!(
    DepthwiseConvLayer,
    "depthwise_conv",
    |x, weight, bias| B::depthwise_conv(x, weight, bias),
    depthwise_conv_backward
);
// No bias: the model's per-direction products have none (the hook takes none).
plain_layer!(
    DirectionMatmulLayer,
    "native_direction_matmul",
    |x, weight, _| B::native_direction_matmul(weight, x),
    native_direction_matmul_backward
);

struct DenseConvLayer;
impl<B: SelectiveScanBackend> WeightedLayer<B> for DenseConvLayer {
    const NAME: &'static str = "conv2d_dense";
    /// Stride and padding.
    type Params = ([usize; 2], [usize; 4]);
    fn forward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        (stride, padding): Self::Params,
    ) -> Option<FloatTensor<B>> {
        B::conv2d_dense(x, weight, bias, stride, padding)
    }
    fn backward(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        (stride, padding): Self::Params,
        dy: FloatTensor<B>,
        needed: [bool; 3],
    ) -> Option<LayerGradients<B>> {
        B::conv2d_dense_backward(x, weight, stride, padding, dy, needed)
    }
}

/// A layer's saved inputs: `x`, `weight` and its parameters.
type LayerState<B, P> = (FloatTensor<B>, FloatTensor<B>, P);

fn layer_grads<B: SelectiveScanBackend, L: WeightedLayer<B>>(
    (x, weight, params): LayerState<B, L::Params>,
    dy: FloatTensor<B>,
    needed: [bool; 3],
) -> LayerGradients<B> {
    L::backward(x, weight, params, dy, needed).unwrap_or_else(|| {
        panic!(
            "a backend whose {name} runs implements {name}_backward too (SelectiveScanBackend's \
             contract)",
            name = L::NAME
        )
    })
}

fn layer_grads_with_bias<B: SelectiveScanBackend, L: WeightedLayer<B>>(
    state: LayerState<B, L::Params>,
    dy: FloatTensor<B>,
    needed: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let g = layer_grads::<B, L>(state, dy, needed);
    [g.dx, g.dweight, g.dbias]
}

fn layer_grads_without_bias<B: SelectiveScanBackend, L: WeightedLayer<B>>(
    state: LayerState<B, L::Params>,
    dy: FloatTensor<B>,
    [x, weight]: [bool; 2],
) -> [Option<FloatTensor<B>>; 2] {
    let g = layer_grads::<B, L>(state, dy, [x, weight, false]);
    [g.dx, g.dweight]
}

/// Layer `L` on `x`, `weight` and `bias` by the inner backend, as an autodiff tensor
/// differentiated by `L`'s native backward; `None` where the inner backend has no such op.
fn weighted_layer<B, C, L>(
    x: &FloatTensor<Autodiff<B, C>>,
    weight: &FloatTensor<Autodiff<B, C>>,
    bias: Option<&FloatTensor<Autodiff<B, C>>>,
    params: L::Params,
) -> Option<FloatTensor<Autodiff<B, C>>>
where
    B: SelectiveScanBackend,
    C: CheckpointStrategy,
    L: WeightedLayer<B>,
{
    let y = L::forward(
        x.primitive.clone(),
        weight.primitive.clone(),
        bias.map(|b| b.primitive.clone()),
        params,
    )?;
    let state = (x.primitive.clone(), weight.primitive.clone(), params);
    match bias {
        Some(bias) => {
            let step = NativeBackward {
                grads: layer_grads_with_bias::<B, L>,
            };
            Some(native_op::<B, C, _, 3>([x, weight, bias], y, state, step))
        }
        None => {
            let step = NativeBackward {
                grads: layer_grads_without_bias::<B, L>,
            };
            Some(native_op::<B, C, _, 2>([x, weight], y, state, step))
        }
    }
}

impl<B: SelectiveScanBackend, C: CheckpointStrategy> SelectiveScanBackend for Autodiff<B, C> {
    const CONV2D_BY_TENSOR_OPS: bool = B::CONV2D_BY_TENSOR_OPS;

    /// The inner backend's GELU, differentiated by its `gelu_exact_backward`.
    fn gelu_exact(x: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let y = B::gelu_exact(x.primitive.clone())?;
        let step = NativeBackward {
            grads: gelu_grads::<B>,
        };
        Some(native_op::<B, C, _, 1>([&x], y, x.primitive.clone(), step))
    }

    /// The inner backend's linear, differentiated by its `native_linear_backward`.
    fn native_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        weighted_layer::<B, C, LinearLayer>(&x, &weight, bias.as_ref(), ())
    }

    /// The inner backend's depthwise convolution, differentiated by its
    /// `depthwise_conv_backward`.
    fn depthwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        weighted_layer::<B, C, DepthwiseConvLayer>(&x, &weight, bias.as_ref(), ())
    }

    /// The inner backend's per-direction product, differentiated by its
    /// `native_direction_matmul_backward`.
    fn native_direction_matmul(
        weight: FloatTensor<Self>,
        x: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        weighted_layer::<B, C, DirectionMatmulLayer>(&x, &weight, None, ())
    }

    /// The inner backend's dense convolution, differentiated by its `conv2d_dense_backward`.
    fn conv2d_dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        stride: [usize; 2],
        padding: [usize; 4],
    ) -> Option<FloatTensor<Self>> {
        weighted_layer::<B, C, DenseConvLayer>(&x, &weight, bias.as_ref(), (stride, padding))
    }

    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let y = match (inputs.d.is_some(), inputs.delta_bias.is_some()) {
            (false, false) => forward_with::<B, C, 5>(inputs, options),
            (true, false) | (false, true) => forward_with::<B, C, 6>(inputs, options),
            (true, true) => forward_with::<B, C, 7>(inputs, options),
        };
        (y, None)
    }

    /// Gradients as constants of `Autodiff<B>` (first order: no graph through the backward).
    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        _saved: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        let inner = untracked(inputs);
        let g = B::selective_scan_backward(inner, None, dy.primitive, options);
        let lift = FloatTensor::<Self>::new;
        ScanGradients {
            du: lift(g.du),
            ddelta: lift(g.ddelta),
            da: lift(g.da),
            db: lift(g.db),
            dc: lift(g.dc),
            dd: g.dd.map(lift),
            ddelta_bias: g.ddelta_bias.map(lift),
        }
    }
}
