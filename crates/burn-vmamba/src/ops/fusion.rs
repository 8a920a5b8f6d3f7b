//! `Fusion<B>` (burn's `Wgpu`, `Cuda`, `Rocm` when the `fusion` feature is on): the scan as a
//! fusion custom op that runs `B`'s fused implementation when the stream is executed.
//!
//! The forward registers one op (inputs → `y`). The backward registers one op (inputs, `dy` →
//! gradients) that recomputes `B`'s forward to get its saved state: the fused graph cannot
//! return a backend-specific saved tensor whose shape it does not know.

use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Reads the inner inputs back from the op's IR: u, delta, A, B, C, then D and delta_bias when
/// present.
fn inner_inputs<B: FusionBackend>(
    inputs: &[TensorIr],
    has_d: bool,
    has_bias: bool,
    handles: &mut Handles<B>,
) -> ScanTensors<B> {
    let mut it = inputs.iter();
    let mut next = || handles.get_float_tensor::<B>(it.next().expect("scan op input"));
    let (u, delta, a, b, c) = (next(), next(), next(), next(), next());
    let d = has_d.then(&mut next);
    let delta_bias = has_bias.then(&mut next);
    ScanTensors {
        u,
        delta,
        a,
        b,
        c,
        d,
        delta_bias,
    }
}

#[derive(Clone, Debug)]
struct ForwardOp<B> {
    desc: CustomOpIr,
    options: ScanOptions,
    has_d: bool,
    has_bias: bool,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + SelectiveScanBackend> Operation<B::FusionRuntime> for ForwardOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let inputs = inner_inputs::<B>(&self.desc.inputs, self.has_d, self.has_bias, handles);
        let (y, _) = B::selective_scan_forward(inputs, self.options);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
    }
}

#[derive(Clone, Debug)]
struct BackwardOp<B> {
    desc: CustomOpIr,
    options: ScanOptions,
    has_d: bool,
    has_bias: bool,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + SelectiveScanBackend> Operation<B::FusionRuntime> for BackwardOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let n = self.desc.inputs.len();
        let inputs = inner_inputs::<B>(
            &self.desc.inputs[..n - 1],
            self.has_d,
            self.has_bias,
            handles,
        );
        let dy = handles.get_float_tensor::<B>(&self.desc.inputs[n - 1]);
        let (_, saved) = B::selective_scan_forward(inputs.clone(), self.options);
        let g = B::selective_scan_backward(inputs, saved, dy, self.options);
        for (out, grad) in self.desc.outputs.iter().zip(g.into_present()) {
            handles.register_float_tensor::<B>(&out.id, grad);
        }
    }
}

impl<B: FusionBackend + SelectiveScanBackend> SelectiveScanBackend for Fusion<B> {
    const CONV2D_BY_TENSOR_OPS: bool = B::CONV2D_BY_TENSOR_OPS;

    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (
        FusionTensor<B::FusionRuntime>,
        Option<FusionTensor<B::FusionRuntime>>,
    ) {
        let shape = inputs.shape();
        let tensors = inputs.present();
        let client = inputs.u.client.clone();
        let streams = OperationStreams::with_inputs(tensors.iter().copied());
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::from(shape.bdl().to_vec()),
            DType::F32,
        );
        let irs: Vec<TensorIr> = tensors.into_iter().map(|t| t.clone().into_ir()).collect();
        let desc = CustomOpIr::new("selective_scan_forward", &irs, &[out]);
        let op = ForwardOp::<B> {
            desc: desc.clone(),
            options,
            has_d: inputs.d.is_some(),
            has_bias: inputs.delta_bias.is_some(),
            _backend: core::marker::PhantomData,
        };
        let mut outputs = client.register(streams, OperationIr::Custom(desc), op);
        (outputs.remove(0), None)
    }

    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        _saved: Option<FusionTensor<B::FusionRuntime>>,
        dy: FusionTensor<B::FusionRuntime>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        let shape = inputs.shape();
        let mut tensors = inputs.present();
        tensors.push(&dy);
        let client = inputs.u.client.clone();
        let streams = OperationStreams::with_inputs(tensors.iter().copied());
        let (has_d, has_bias) = (inputs.d.is_some(), inputs.delta_bias.is_some());
        let mut shapes = vec![
            shape.bdl().to_vec(),
            shape.bdl().to_vec(),
            shape.dn().to_vec(),
            shape.bgnl().to_vec(),
            shape.bgnl().to_vec(),
        ];
        if has_d {
            shapes.push(vec![shape.channels]);
        }
        if has_bias {
            shapes.push(vec![shape.channels]);
        }
        let outs: Vec<TensorIr> = shapes
            .into_iter()
            .map(|s| TensorIr::uninit(client.create_empty_handle(), Shape::from(s), DType::F32))
            .collect();
        let irs: Vec<TensorIr> = tensors.into_iter().map(|t| t.clone().into_ir()).collect();
        let desc = CustomOpIr::new("selective_scan_backward", &irs, &outs);
        let op = BackwardOp::<B> {
            desc: desc.clone(),
            options,
            has_d,
            has_bias,
            _backend: core::marker::PhantomData,
        };
        let mut grads = client
            .register(streams, OperationIr::Custom(desc), op)
            .into_iter();
        let mut next = || grads.next().expect("one output per gradient");
        let (du, ddelta, da, db, dc) = (next(), next(), next(), next(), next());
        let dd = has_d.then(&mut next);
        let ddelta_bias = has_bias.then(&mut next);
        ScanGradients {
            du,
            ddelta,
            da,
            db,
            dc,
            dd,
            ddelta_bias,
        }
    }
}
