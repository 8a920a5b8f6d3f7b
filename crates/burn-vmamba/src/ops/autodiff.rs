//! `Autodiff<B, C>`: a custom `Backward` that calls the inner backend's fused backward, and
//! registers gradients for exactly the tracked inputs among u, delta, A, B, C, D, delta_bias.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};

use super::{ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

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

impl<B: SelectiveScanBackend, C: CheckpointStrategy> SelectiveScanBackend for Autodiff<B, C> {
    const CONV2D_BY_TENSOR_OPS: bool = B::CONV2D_BY_TENSOR_OPS;

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
