//! `selective_scan` through `Autodiff<B>` on every backend we can run, against the f64
//! reference: the output and every gradient, untracked inputs, a shape error, and training.

use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_fusion::Fusion;
use burn_vmamba::ops::problem::{host as values, tensor};
use burn_vmamba::{SelectiveScanBackend, selective_scan};
use rstest::rstest;
use selective_scan::{RandomSpec, ScanError, ScanProblem, ScanShape, SplitMix64, reference};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// Both measures of the deviation from the reference (max-relative and elementwise), the larger.
fn rel_err(actual: &[f32], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).worst()
}

/// Output and all seven gradients of `Σ dy ⊙ y` through `Autodiff<B>` vs the f64 reference.
fn check_backend<B>(label: &str, device: &B::Device, shape: ScanShape, spec: &RandomSpec)
where
    B: AutodiffBackend + SelectiveScanBackend,
{
    let p = ScanProblem::random(shape, spec, 77);
    let dy = SplitMix64::new(5).vec(shape.bdl_len(), -1.0, 1.0);
    let (y, grads) = burn_vmamba::ops::problem::forward_backward::<B>(&p, &dy, device);
    let (y_ref, g_ref) = reference::backward(&p, &dy);
    let mut checks = vec![("y", &y[..], &y_ref[..])];
    for ((name, got), (_, want)) in grads.named().into_iter().zip(g_ref.named()) {
        checks.push((name, got, want));
    }
    assert_eq!(
        checks.len(),
        6 + usize::from(p.d.is_some()) + usize::from(p.delta_bias.is_some())
    );
    for (name, got, want) in checks {
        let err = rel_err(got, want);
        println!("{label}: {name} {err:.2e}");
        assert!(
            err <= 2e-4,
            "{label}: {name} differs from the reference by {err:.3e}"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Path {
    NdArray,
    Wgpu,
    Cube,
    FusionCube,
    Fallback,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "rocm")]
    Rocm,
}

fn run(path: Path, shape: ScanShape, spec: &RandomSpec) {
    match path {
        Path::NdArray => {
            check_backend::<Autodiff<NdArray>>("ndarray", &Default::default(), shape, spec)
        }
        Path::Wgpu => check_backend::<Autodiff<burn::backend::Wgpu>>(
            "wgpu",
            &WgpuDevice::default(),
            shape,
            spec,
        ),
        Path::Cube => check_backend::<Autodiff<Cube>>("cube", &WgpuDevice::default(), shape, spec),
        Path::FusionCube => {
            check_backend::<Autodiff<Fusion<Cube>>>("fusion", &WgpuDevice::default(), shape, spec)
        }
        Path::Fallback => {
            check_backend::<Autodiff<Flex>>("fallback", &Default::default(), shape, spec)
        }
        #[cfg(feature = "cuda")]
        Path::Cuda => {
            check_backend::<Autodiff<burn::backend::Cuda>>("cuda", &Default::default(), shape, spec)
        }
        #[cfg(feature = "rocm")]
        Path::Rocm => {
            check_backend::<Autodiff<burn::backend::Rocm>>("rocm", &Default::default(), shape, spec)
        }
    }
}

#[rstest]
fn scan_op_matches_reference_with_all_inputs(
    #[values(
        Path::NdArray,
        Path::Wgpu,
        Path::Cube,
        Path::FusionCube,
        Path::Fallback
    )]
    path: Path,
    #[values(
        ScanShape::new(2, 8, 530, 2, 4),
        ScanShape::new(1, 4, 1, 3, 2),
        ScanShape::new(3, 6, 37, 1, 3)
    )]
    shape: ScanShape,
) {
    run(path, shape, &RandomSpec::default());
}

/// The op on CUDA / ROCm through `Autodiff` (built with the `cuda` / `rocm` features; these
/// fail, never skip, without the GPU): the shapes above plus extreme Δ and A.
#[cfg(any(feature = "cuda", feature = "rocm"))]
#[rstest]
#[cfg_attr(feature = "cuda", case::cuda(Path::Cuda))]
#[cfg_attr(feature = "rocm", case::rocm(Path::Rocm))]
fn scan_op_matches_reference_on_gpu_runtimes(
    #[case] path: Path,
    #[values(
        ScanShape::new(2, 8, 530, 2, 4),
        ScanShape::new(1, 4, 1, 3, 2),
        ScanShape::new(3, 6, 2100, 16, 3)
    )]
    shape: ScanShape,
    #[values((0.001, 0.1, -1.0, 1.5), (60.0, 200.0, -1.0, 1.5), (-3.0, 1.0, -30.0, 20.0))] ranges: (
        f32,
        f32,
        f32,
        f32,
    ),
) {
    let spec = RandomSpec {
        delta_range: (ranges.0, ranges.1),
        a_log_range: (ranges.2, ranges.3),
        ..RandomSpec::default()
    };
    run(path, shape, &spec);
}

#[rstest]
fn scan_op_matches_reference_without_optional_inputs(
    #[values(Path::NdArray, Path::Wgpu, Path::FusionCube, Path::Fallback)] path: Path,
) {
    let spec = RandomSpec {
        with_d: false,
        with_delta_bias: false,
        delta_softplus: false,
        delta_range: (0.01, 1.0),
        ..RandomSpec::default()
    };
    run(path, ScanShape::new(2, 4, 70, 2, 2), &spec);
}

#[rstest]
fn scan_op_matches_reference_at_extreme_values(
    #[values(Path::NdArray, Path::Wgpu, Path::Fallback)] path: Path,
    #[values((19.5, 20.5, -1.0, 1.5), (60.0, 200.0, -1.0, 1.5), (-3.0, 1.0, 20.0, 20.0), (-3.0, 1.0, -30.0, -30.0))]
    ranges: (f32, f32, f32, f32),
) {
    let spec = RandomSpec {
        delta_range: (ranges.0, ranges.1),
        a_log_range: (ranges.2, ranges.3),
        ..RandomSpec::default()
    };
    run(path, ScanShape::new(1, 4, 90, 2, 2), &spec);
}

/// Long-memory channels (`A` from −e^−30 to −e^−10, Δ down to 1e−5) over 3136 steps, with
/// and without softplus: the decay `exp(Δ·A)` is within 1e−5 of 1 and any bias of an `exp`
/// compounds over the sequence.
#[rstest]
fn scan_op_matches_reference_on_long_memory_channels(
    #[values(Path::NdArray, Path::Wgpu, Path::Fallback)] path: Path,
    #[values(true, false)] softplus: bool,
) {
    run(
        path,
        ScanShape::new(1, 4, 3136, 4, 2),
        &RandomSpec::long_memory(softplus),
    );
}

/// Half-precision `u, delta, B, C` (f16 or bf16) through the Burn op on `B`: the kernels read
/// them in that dtype, `y` is f32, every gradient comes back in its input's dtype, and all of
/// them match the f64 reference of the rounded problem (gradients of half inputs within the
/// dtype's own rounding, 2^−11 or 2^−8 relative, on top of the tolerance).
fn half_inputs_match_the_reference<B: AutodiffBackend + SelectiveScanBackend>(
    device: &B::Device,
    dtype: burn::tensor::DType,
) {
    use burn::tensor::DType;
    let (round, unit): (fn(f32) -> f32, f64) = match dtype {
        DType::F16 => (|x| half::f16::from_f32(x).to_f32(), 2f64.powi(-11)),
        DType::BF16 => (|x| half::bf16::from_f32(x).to_f32(), 2f64.powi(-8)),
        other => panic!("not a half dtype: {other:?}"),
    };
    let device = device.clone();
    let s = ScanShape::new(2, 4, 300, 4, 2);
    let mut p = ScanProblem::random(s, &RandomSpec::default(), 41);
    for v in [&mut p.u, &mut p.delta, &mut p.b, &mut p.c] {
        v.iter_mut().for_each(|x| *x = round(*x));
    }
    let dy = SplitMix64::new(6).vec(s.bdl_len(), -1.0, 1.0);
    // Leaves in f16 (flat), reshaped when used.
    let as_f16 = |data: &[f32]| {
        tensor::<B, 1>(data, vec![data.len()], &device)
            .cast(dtype)
            .require_grad()
    };
    let u = as_f16(&p.u);
    let delta = as_f16(&p.delta);
    let b = as_f16(&p.b);
    let c = as_f16(&p.c);
    let a = tensor::<B, 2>(&p.a, s.dn().to_vec(), &device).require_grad();
    let d = tensor::<B, 1>(p.d.as_ref().unwrap(), vec![4], &device).require_grad();
    let bias = tensor::<B, 1>(p.delta_bias.as_ref().unwrap(), vec![4], &device).require_grad();
    let y = selective_scan(
        u.clone().reshape(s.bdl()),
        delta.clone().reshape(s.bdl()),
        a.clone(),
        b.clone().reshape(s.bgnl()),
        c.clone().reshape(s.bgnl()),
        Some(d.clone()),
        Some(bias.clone()),
        true,
    );
    assert_eq!(y.dtype(), DType::F32);
    let upstream = tensor::<B, 3>(&dy, s.bdl().to_vec(), &device);
    let grads = (y.clone() * upstream).sum().backward();
    let (y_ref, g_ref) = reference::backward(&p, &dy);
    let err = rel_err(&values(y), &y_ref);
    assert!(err <= 2e-4, "y {err:.2e}");
    let f16_inputs = [("du", &u), ("ddelta", &delta), ("dB", &b), ("dC", &c)];
    for (name, input) in f16_inputs {
        let grad = input.grad(&grads).unwrap();
        assert_eq!(grad.dtype(), dtype, "{name}");
        let want = g_ref
            .named()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let err = rel_err(&values(grad), want);
        println!("{dtype:?} op: {name} {err:.2e}");
        assert!(err <= 2e-4 + unit, "{name} {err:.2e}");
    }
    let mut f32_grads = vec![("dA", values(a.grad(&grads).unwrap()))];
    f32_grads.push(("dD", values(d.grad(&grads).unwrap())));
    f32_grads.push(("ddelta_bias", values(bias.grad(&grads).unwrap())));
    for (name, got) in f32_grads {
        let want = g_ref
            .named()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let err = rel_err(&got, want);
        println!("{dtype:?} op: {name} {err:.2e}");
        assert!(err <= 2e-4, "{name} {err:.2e}");
    }
}

/// f16 on WGPU (llvmpipe has f16 buffers; it has no bf16).
#[test]
fn f16_inputs_through_the_op_match_the_reference() {
    half_inputs_match_the_reference::<Autodiff<burn::backend::Wgpu>>(
        &WgpuDevice::default(),
        burn::tensor::DType::F16,
    );
}

/// bf16 and f16 on CUDA / ROCm (built with the `cuda` / `rocm` features; these fail, never
/// skip, without the GPU).
#[cfg(any(feature = "cuda", feature = "rocm"))]
#[rstest]
fn half_inputs_through_the_op_match_the_reference_on_gpu_runtimes(
    #[values(burn::tensor::DType::F16, burn::tensor::DType::BF16)] dtype: burn::tensor::DType,
) {
    #[cfg(feature = "cuda")]
    half_inputs_match_the_reference::<Autodiff<burn::backend::Cuda>>(&Default::default(), dtype);
    #[cfg(feature = "rocm")]
    half_inputs_match_the_reference::<Autodiff<burn::backend::Rocm>>(&Default::default(), dtype);
}

/// Only `u` and `A` are tracked: they get gradients, the others none.
#[test]
fn untracked_inputs_get_no_gradient() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    let s = ScanShape::new(1, 4, 20, 2, 2);
    let p = ScanProblem::random(s, &RandomSpec::default(), 3);
    let u = tensor::<B, 3>(&p.u, s.bdl().to_vec(), &device).require_grad();
    let delta = tensor::<B, 3>(&p.delta, s.bdl().to_vec(), &device);
    let a = tensor::<B, 2>(&p.a, s.dn().to_vec(), &device).require_grad();
    let b = tensor::<B, 4>(&p.b, s.bgnl().to_vec(), &device);
    let c = tensor::<B, 4>(&p.c, s.bgnl().to_vec(), &device);
    let d = tensor::<B, 1>(p.d.as_ref().unwrap(), vec![4], &device);
    let bias = tensor::<B, 1>(p.delta_bias.as_ref().unwrap(), vec![4], &device);
    let y = selective_scan(
        u.clone(),
        delta.clone(),
        a.clone(),
        b.clone(),
        c.clone(),
        Some(d.clone()),
        Some(bias.clone()),
        true,
    );
    let grads = y.sum().backward();
    assert!(u.grad(&grads).is_some() && a.grad(&grads).is_some());
    assert!(delta.grad(&grads).is_none());
    assert!(b.grad(&grads).is_none() && c.grad(&grads).is_none());
    assert!(d.grad(&grads).is_none() && bias.grad(&grads).is_none());
}

#[test]
#[should_panic(expected = "`delta` must have shape [1, 4, 20]")]
fn a_wrong_shape_panics_naming_the_argument_and_both_shapes() {
    type B = NdArray;
    let device = Default::default();
    let u = Tensor::<B, 3>::zeros([1, 4, 20], &device);
    let delta = Tensor::<B, 3>::zeros([1, 4, 19], &device);
    let a = Tensor::<B, 2>::zeros([4, 2], &device);
    let b = Tensor::<B, 4>::zeros([1, 2, 2, 20], &device);
    let c = Tensor::<B, 4>::zeros([1, 2, 2, 20], &device);
    let _ = selective_scan(u, delta, a, b, c, None, None, true);
}

/// Every refusal of the op as an error (`try_selective_scan`) on each kind of backend: an
/// expanding recurrence (`A > 0`; raw `delta + delta_bias < 0` without softplus) naming the
/// first bad entry, and an empty batch; the same inputs with softplus, or `A = 0`, run.
fn refusals<B: SelectiveScanBackend>(device: &B::Device) {
    let s = ScanShape::new(2, 4, 6, 2, 2);
    let p = ScanProblem::random(s, &RandomSpec::default(), 3);
    let scan = |p: &ScanProblem, a: Vec<f32>, softplus: bool, bias: f32| {
        let bias = Tensor::<B, 1>::from_data(TensorData::new(vec![bias; 4], [4]), device);
        burn_vmamba::try_selective_scan(
            tensor::<B, 3>(&p.u, s.bdl().to_vec(), device),
            tensor::<B, 3>(&p.delta, s.bdl().to_vec(), device),
            tensor::<B, 2>(&a, s.dn().to_vec(), device),
            tensor::<B, 4>(&p.b, s.bgnl().to_vec(), device),
            tensor::<B, 4>(&p.c, s.bgnl().to_vec(), device),
            None,
            Some(bias),
            softplus,
        )
    };
    let mut a = p.a.clone();
    a[5] = 0.5; // channel 2, state 1
    let err = scan(&p, a, true, 0.0).unwrap_err();
    assert_eq!(
        err,
        ScanError::Expanding {
            arg: "A",
            at: Some(vec![2, 1]),
            value: 0.5
        }
    );
    // Raw delta in [−3, 1] plus a bias of 2.5: the first value below −2.5 is refused.
    let mut raw = p.clone();
    raw.delta.iter_mut().for_each(|x| *x = x.abs());
    raw.delta[6 * 5 + 4] = -2.75; // batch 1, channel 1, t = 4
    let err = scan(&raw, p.a.clone(), false, 2.5).unwrap_err();
    assert_eq!(
        err,
        ScanError::Expanding {
            arg: "delta",
            at: Some(vec![1, 1, 4]),
            value: -0.25
        }
    );
    assert!(scan(&raw, p.a.clone(), true, 2.5).is_ok(), "softplus");
    assert!(scan(&raw, vec![0.0; 8], true, 2.5).is_ok(), "A = 0");
    let empty = Tensor::<B, 3>::zeros([0, 4, 6], device);
    let err = burn_vmamba::try_selective_scan(
        empty.clone(),
        empty,
        tensor::<B, 2>(&p.a, s.dn().to_vec(), device),
        Tensor::<B, 4>::zeros([0, 2, 2, 6], device),
        Tensor::<B, 4>::zeros([0, 2, 2, 6], device),
        None,
        None,
        true,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ScanError::Empty {
                arg: "u",
                dim: "batch",
                ..
            }
        ),
        "{err:?}"
    );
}

#[rstest]
fn refusals_are_errors_on_every_backend(
    #[values(Path::NdArray, Path::Wgpu, Path::Fallback)] path: Path,
) {
    match path {
        Path::NdArray => refusals::<Autodiff<NdArray>>(&Default::default()),
        Path::Wgpu => refusals::<burn::backend::Wgpu>(&WgpuDevice::default()),
        Path::Fallback => refusals::<Flex>(&Default::default()),
        _ => unreachable!(),
    }
}

#[test]
#[should_panic(expected = "`A` has 5e-1 at [2, 1], above 0")]
fn selective_scan_panics_with_the_refusal() {
    type B = NdArray;
    let device = Default::default();
    let s = ScanShape::new(1, 4, 5, 2, 2);
    let mut a = vec![-1.0; 8];
    a[5] = 0.5;
    let _ = selective_scan(
        Tensor::<B, 3>::zeros(s.bdl(), &device),
        Tensor::<B, 3>::zeros(s.bdl(), &device),
        tensor::<B, 2>(&a, s.dn().to_vec(), &device),
        Tensor::<B, 4>::zeros(s.bgnl(), &device),
        Tensor::<B, 4>::zeros(s.bgnl(), &device),
        None,
        None,
        true,
    );
}

#[derive(Module, Debug)]
struct ScanParams<B: Backend> {
    a_log: Param<Tensor<B, 2>>,
    dt_bias: Param<Tensor<B, 1>>,
    skip: Param<Tensor<B, 1>>,
}

impl<B: SelectiveScanBackend> ScanParams<B> {
    fn forward(
        &self,
        u: Tensor<B, 3>,
        delta: Tensor<B, 3>,
        b: Tensor<B, 4>,
        c: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let a = -self.a_log.val().exp();
        selective_scan(
            u,
            delta,
            a,
            b,
            c,
            Some(self.skip.val()),
            Some(self.dt_bias.val()),
            true,
        )
    }
}

/// A few AdamW steps through the op fit the parameters of a teacher scan: the loss falls.
#[rstest]
fn adamw_steps_through_the_op_lower_the_loss(
    #[values(Path::NdArray, Path::Cube, Path::FusionCube)] path: Path,
) {
    fn train<B: AutodiffBackend + SelectiveScanBackend>(device: &B::Device) -> (f32, f32) {
        let s = ScanShape::new(2, 4, 64, 2, 2);
        let teacher = ScanProblem::random(s, &RandomSpec::default(), 1);
        let y_target = reference::forward(&teacher);
        let y_target: Vec<f32> = y_target.iter().map(|&x| x as f32).collect();
        let target = tensor::<B, 3>(&y_target, s.bdl().to_vec(), device);
        let mut model = ScanParams::<B> {
            a_log: Param::from_tensor(Tensor::zeros([4, 2], device)),
            dt_bias: Param::from_tensor(Tensor::zeros([4], device)),
            skip: Param::from_tensor(Tensor::zeros([4], device)),
        };
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let input = |v: &[f32], shape: Vec<usize>| tensor::<B, 3>(v, shape, device);
        let u = input(&teacher.u, s.bdl().to_vec());
        let delta = input(&teacher.delta, s.bdl().to_vec());
        let b = tensor::<B, 4>(&teacher.b, s.bgnl().to_vec(), device);
        let c = tensor::<B, 4>(&teacher.c, s.bgnl().to_vec(), device);
        let mut losses = vec![];
        for _ in 0..15 {
            let y = model.forward(u.clone(), delta.clone(), b.clone(), c.clone());
            let loss = (y - target.clone()).powf_scalar(2.0).mean();
            losses.push(values(loss.clone())[0]);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.05, model, grads);
        }
        (losses[0], *losses.last().unwrap())
    }
    let (first, last) = match path {
        Path::NdArray => train::<Autodiff<NdArray>>(&Default::default()),
        Path::Cube => train::<Autodiff<Cube>>(&WgpuDevice::default()),
        Path::FusionCube => train::<Autodiff<Fusion<Cube>>>(&WgpuDevice::default()),
        _ => unreachable!(),
    };
    assert!(last < 0.5 * first, "loss did not fall: {first} -> {last}");
}

/// The tensor-op fallback itself on two different backends (NdArray and Flex), forward and
/// backward, without autodiff in between.
#[rstest]
fn fallback_matches_reference_on_ndarray_and_flex(#[values(false, true)] flex: bool) {
    fn go<B: Backend>(device: &B::Device) {
        use burn_vmamba::ops::{ScanOptions, ScanTensors, fallback};
        let s = ScanShape::new(2, 6, 37, 3, 3);
        let p = ScanProblem::random(s, &RandomSpec::default(), 11);
        let dy = SplitMix64::new(2).vec(s.bdl_len(), -1.0, 1.0);
        let prim = |v: &[f32], shape: Vec<usize>| {
            B::float_from_data(TensorData::new(v.to_vec(), shape), device)
        };
        let inputs = ScanTensors::<B> {
            u: prim(&p.u, s.bdl().to_vec()),
            delta: prim(&p.delta, s.bdl().to_vec()),
            a: prim(&p.a, s.dn().to_vec()),
            b: prim(&p.b, s.bgnl().to_vec()),
            c: prim(&p.c, s.bgnl().to_vec()),
            d: p.d.as_ref().map(|v| prim(v, vec![s.channels])),
            delta_bias: p.delta_bias.as_ref().map(|v| prim(v, vec![s.channels])),
        };
        let options = ScanOptions {
            delta_softplus: true,
        };
        let y = fallback::forward::<B>(inputs.clone(), options);
        let g = fallback::backward::<B>(inputs, prim(&dy, s.bdl().to_vec()), options);
        let (y_ref, g_ref) = reference::backward(&p, &dy);
        let read = |t: burn::tensor::ops::FloatTensor<B>| -> Vec<f32> {
            let data = burn::tensor::try_read_sync(B::float_into_data(t))
                .unwrap()
                .unwrap();
            data.convert::<f32>().into_vec::<f32>().unwrap()
        };
        for (name, got, want) in [
            ("y", read(y), y_ref),
            ("du", read(g.du), g_ref.du),
            ("ddelta", read(g.ddelta), g_ref.ddelta),
            ("dA", read(g.da), g_ref.da),
            ("dB", read(g.db), g_ref.db),
            ("dC", read(g.dc), g_ref.dc),
            ("dD", read(g.dd.unwrap()), g_ref.dd.unwrap()),
            (
                "ddelta_bias",
                read(g.ddelta_bias.unwrap()),
                g_ref.ddelta_bias.unwrap(),
            ),
        ] {
            let err = rel_err(&got, &want);
            println!("{name} {err:.2e}");
            assert!(
                err <= 2e-4,
                "{name} differs from the reference by {err:.3e}"
            );
        }
    }
    if flex {
        go::<Flex>(&Default::default())
    } else {
        go::<NdArray>(&Default::default())
    }
}
