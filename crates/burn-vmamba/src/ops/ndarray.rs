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
        let dy = values(&dy);
        let g = cpu::backward(&host.slices(shape, options), &dy).unwrap_or_else(|e| panic!("{e}"));
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
