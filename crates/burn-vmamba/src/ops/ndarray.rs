//! `NdArray`: the native fused CPU scan of `selective_scan::cpu` (rayon over rows and channel
//! blocks, f32 state, no `[B, D, L, N]` tensor). Tensors are read as contiguous f32 and the
//! results written back as new tensors; the backward recomputes the states (nothing is saved).

use burn::backend::NdArray;
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorData, TensorMetadata};
use selective_scan::cpu::{self, ScanSlices};

use super::{ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

/// Reads a float primitive as contiguous row-major f32.
pub(crate) fn read_f32<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let data = burn::tensor::try_read_sync(B::float_into_data(t))
        .expect("a CPU tensor can be read synchronously")
        .unwrap_or_else(|e| panic!("selective_scan: reading a tensor failed: {e:?}"));
    data.convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("selective_scan: tensor data is not f32: {e:?}"))
}

/// A new f32 float primitive on `device`.
pub(crate) fn write_f32<B: Backend>(
    values: Vec<f32>,
    shape: Vec<usize>,
    device: &B::Device,
) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, Shape::from(shape)), device)
}

/// The inputs as host vectors, in the order u, delta, A, B, C, D, delta_bias.
struct HostInputs {
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Option<Vec<f32>>,
    delta_bias: Option<Vec<f32>>,
}

impl HostInputs {
    fn read<B: Backend>(t: ScanTensors<B>) -> Self {
        Self {
            u: read_f32::<B>(t.u),
            delta: read_f32::<B>(t.delta),
            a: read_f32::<B>(t.a),
            b: read_f32::<B>(t.b),
            c: read_f32::<B>(t.c),
            d: t.d.map(read_f32::<B>),
            delta_bias: t.delta_bias.map(read_f32::<B>),
        }
    }

    fn slices(&self, shape: selective_scan::ScanShape, options: ScanOptions) -> ScanSlices<'_> {
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

/// Forward on any backend whose tensors can be read on the host.
pub(crate) fn host_forward<B: Backend>(
    inputs: ScanTensors<B>,
    options: ScanOptions,
) -> FloatTensor<B> {
    let shape = inputs.shape();
    let device = B::float_device(&inputs.u);
    let host = HostInputs::read(inputs);
    let y = cpu::forward(&host.slices(shape, options)).unwrap_or_else(|e| panic!("{e}"));
    write_f32::<B>(y, shape.bdl().to_vec(), &device)
}

/// Backward on any backend whose tensors can be read on the host.
pub(crate) fn host_backward<B: Backend>(
    inputs: ScanTensors<B>,
    dy: FloatTensor<B>,
    options: ScanOptions,
) -> ScanGradients<B> {
    let shape = inputs.shape();
    let device = B::float_device(&inputs.u);
    debug_assert_eq!(dy.shape().to_vec(), shape.bdl().to_vec());
    let host = HostInputs::read(inputs);
    let dy = read_f32::<B>(dy);
    let g = cpu::backward(&host.slices(shape, options), &dy).unwrap_or_else(|e| panic!("{e}"));
    let put = |v: Vec<f32>, s: &[usize]| write_f32::<B>(v, s.to_vec(), &device);
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

impl<E, I, Q> SelectiveScanBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        (host_forward::<Self>(inputs, options), None)
    }

    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        _saved: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        host_backward::<Self>(inputs, dy, options)
    }
}
