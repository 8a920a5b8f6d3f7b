//! `CubeBackend<R, F, I, BT>` (WGPU, CUDA, ROCm): the CubeCL kernels of `selective-scan`, on the
//! tensors' own buffers and strides (no copies for non-contiguous inputs).

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use selective_scan::{
    DeviceTensor, ScanArgs, ScanConfig, ScanDtype, ScanError, TensorRef, supports_dtype,
};

use super::{ScanGradients, ScanOptions, ScanTensors, SelectiveScanBackend};

fn scan_dtype(dtype: DType) -> ScanDtype {
    match dtype {
        DType::F16 => ScanDtype::F16,
        DType::BF16 => ScanDtype::BF16,
        DType::F32 | DType::Flex32 => ScanDtype::F32,
        other => panic!("selective_scan: unsupported dtype {other:?} (expected f32, f16 or bf16)"),
    }
}

fn view<R: CubeRuntime>(t: &CubeTensor<R>) -> TensorRef<'_> {
    TensorRef {
        handle: &t.handle,
        shape: t.meta.shape(),
        strides: t.meta.strides(),
        dtype: scan_dtype(t.dtype),
    }
}

fn args<'a, R: CubeRuntime>(
    t: &'a ScanTensors<CubeBackend<R, impl FloatElement, impl IntElement, impl BoolElement>>,
    options: ScanOptions,
) -> ScanArgs<'a> {
    ScanArgs {
        u: view(&t.u),
        delta: view(&t.delta),
        a: view(&t.a),
        b: view(&t.b),
        c: view(&t.c),
        d: t.d.as_ref().map(view),
        delta_bias: t.delta_bias.as_ref().map(view),
        delta_softplus: options.delta_softplus,
    }
}

fn wrap<R: CubeRuntime>(like: &CubeTensor<R>, t: DeviceTensor) -> CubeTensor<R> {
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(t.shape),
        t.handle,
        DType::F32,
    )
}

fn expect<T>(result: Result<T, ScanError>) -> T {
    // Shapes were validated by the public function; what remains is a device refusal.
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Casts f16/bf16 inputs to f32 when the device lacks the type (a slower path, never an error).
fn supported<R, F, I, BT>(
    t: ScanTensors<CubeBackend<R, F, I, BT>>,
) -> ScanTensors<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if supports_dtype(&t.u.client, scan_dtype(t.u.dtype)) {
        return t;
    }
    let cast = |x| CubeBackend::<R, F, I, BT>::float_cast(x, FloatDType::F32);
    ScanTensors {
        u: cast(t.u),
        delta: cast(t.delta),
        a: t.a,
        b: cast(t.b),
        c: cast(t.c),
        d: t.d,
        delta_bias: t.delta_bias,
    }
}

impl<R, F, I, BT> SelectiveScanBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn selective_scan_forward(
        inputs: ScanTensors<Self>,
        options: ScanOptions,
    ) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
        let inputs = supported(inputs);
        let client = inputs.u.client.clone();
        let out = expect(selective_scan::forward(
            &client,
            &args(&inputs, options),
            ScanConfig::default(),
        ));
        (wrap(&inputs.u, out.y), Some(wrap(&inputs.u, out.carries)))
    }

    fn selective_scan_backward(
        inputs: ScanTensors<Self>,
        saved: Option<CubeTensor<R>>,
        dy: CubeTensor<R>,
        options: ScanOptions,
    ) -> ScanGradients<Self> {
        let inputs = supported(inputs);
        let client = inputs.u.client.clone();
        let args = args(&inputs, options);
        let carries = match saved {
            Some(carries) => DeviceTensor {
                handle: carries.handle.clone(),
                shape: carries.meta.shape().to_vec(),
            },
            None => {
                expect(selective_scan::forward(
                    &client,
                    &args,
                    ScanConfig::default(),
                ))
                .carries
            }
        };
        let dy = if dy.dtype == DType::F32 {
            dy
        } else {
            Self::float_cast(dy, FloatDType::F32)
        };
        let grads = expect(selective_scan::backward(
            &client,
            &args,
            &carries,
            ScanConfig::default(),
            view(&dy),
        ));
        let like = &inputs.u;
        ScanGradients {
            du: wrap(like, grads.du),
            ddelta: wrap(like, grads.ddelta),
            da: wrap(like, grads.da),
            db: wrap(like, grads.db),
            dc: wrap(like, grads.dc),
            dd: grads.dd.map(|t| wrap(like, t)),
            ddelta_bias: grads.ddelta_bias.map(|t| wrap(like, t)),
        }
    }
}
