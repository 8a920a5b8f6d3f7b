//! Helpers shared by the kernel tests: the WGPU client, the error metric, the comparison.
#![allow(dead_code)]

use selective_scan::cubecl::Runtime;
use selective_scan::cubecl::prelude::ComputeClient;
use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use selective_scan::{
    RandomSpec, ScanConfig, ScanDtype, ScanGrads, ScanProblem, ScanShape, SplitMix64, host,
    reference,
};

/// Tolerance in f32 against the f64 reference, of both measures of `reference::Deviation`.
pub const TOLERANCE: f64 = 2e-4;

/// The WGPU client. On CI this is Mesa's llvmpipe; a machine without any Vulkan driver fails
/// here with the install hint instead of skipping.
pub fn client() -> ComputeClient<WgpuRuntime> {
    let result = std::panic::catch_unwind(|| WgpuRuntime::client(&WgpuDevice::default()));
    match result {
        Ok(client) => client,
        Err(_) => panic!(
            "no WGPU adapter found: install a Vulkan driver \
             (Debian/Ubuntu: `apt-get install -y mesa-vulkan-drivers libvulkan1`)"
        ),
    }
}

/// max |x − ref| / max |ref| (absolute error when the reference is all zeros).
pub fn rel_err(actual: &[f32], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).max_rel
}

/// The elementwise bound with its floor (`reference::Deviation::elementwise`).
pub fn elem_err(actual: &[f32], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).elementwise
}

/// The larger of both measures: what every comparison asserts.
pub fn err(actual: &[f32], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).worst()
}

/// A seeded upstream gradient.
pub fn upstream(shape: &ScanShape, seed: u64) -> Vec<f32> {
    SplitMix64::new(seed ^ 0xD1CE).vec(shape.bdl_len(), -1.0, 1.0)
}

/// Runs forward+backward on WGPU and asserts the output and all gradients match the f64
/// reference within `tol`; returns the errors by name.
pub fn assert_matches_reference(
    label: &str,
    problem: &ScanProblem,
    dtype: ScanDtype,
    config: ScanConfig,
    tol: f64,
) -> Vec<(&'static str, f64)> {
    let client = client();
    let dy = upstream(&problem.shape, 17);
    let (y, grads) = host::forward_backward_host(&client, problem, &dy, dtype, config)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (y_ref, grads_ref) = reference::backward(problem, &dy);
    let errors = errors(&y, &grads, &y_ref, &grads_ref);
    let report: Vec<String> = errors.iter().map(|(n, e)| format!("{n} {e:.2e}")).collect();
    println!("{label}: {}", report.join(", "));
    for (name, err) in &errors {
        assert!(
            *err <= tol,
            "{label}: {name} differs from the f64 reference by {err:.3e} (tolerance {tol:.1e})"
        );
    }
    errors
}

/// Errors of every tensor by name, `y` first.
pub fn errors(
    y: &[f32],
    grads: &ScanGrads<f32>,
    y_ref: &[f64],
    grads_ref: &ScanGrads<f64>,
) -> Vec<(&'static str, f64)> {
    let mut out = vec![("y", err(y, y_ref))];
    let got = grads.named();
    let want = grads_ref.named();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        want.iter().map(|g| g.0).collect::<Vec<_>>(),
        "the kernel and the reference return different sets of gradients"
    );
    for ((name, a), (_, e)) in got.into_iter().zip(want) {
        out.push((name, err(a, e)));
    }
    out
}

/// The golden case (values worked out by hand from the recurrence, outside this code): Bt = D = N = 1, L = 3, u = [1, 2, 3], Δ = 0.5 (no bias, no
/// softplus), A = −1, B = C = 1, D = 0, upstream gradient 1.
pub fn golden_problem() -> ScanProblem {
    ScanProblem {
        shape: ScanShape::new(1, 1, 3, 1, 1),
        u: vec![1.0, 2.0, 3.0],
        delta: vec![0.5; 3],
        a: vec![-1.0],
        b: vec![1.0; 3],
        c: vec![1.0; 3],
        d: Some(vec![0.0]),
        delta_bias: None,
        delta_softplus: false,
    }
}

/// The golden values of [`golden_problem`], by name; `reference_checks.rs` also checks them
/// against central finite differences of the reference.
pub const GOLDEN: [(&str, &[f64]); 7] = [
    ("y", &[0.5, 1.3032653299, 2.2904703803]),
    ("du", &[0.9872050504, 0.8032653299, 0.5]),
    ("ddelta", &[1.9744101009, 2.7258562690, 2.2095296197]),
    ("dA", &[0.6388377154]),
    ("dB", &[0.9872050504, 1.6065306597, 1.5]),
    ("dC", &[0.5, 1.3032653299, 2.2904703803]),
    ("dD", &[6.0]),
];

/// Asserts `y` and the gradients equal [`GOLDEN`] within `tol` (absolute).
pub fn assert_golden<T: Copy + Into<f64>>(y: &[T], grads: &ScanGrads<T>, tol: f64) {
    let mut got = vec![("y", y)];
    got.extend(grads.named());
    for (name, want) in GOLDEN {
        let (_, values) = got
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        for (a, b) in values.iter().zip(want) {
            let a: f64 = (*a).into();
            assert!((a - b).abs() < tol, "{name}: got {a}, golden {b}");
        }
    }
}

/// Long memory, exactly: channels with `A = −e^−30, −e^−20, −e^−15` and `Δ = 1e−4` over 3136
/// steps, so `|Δ·A| ≤ 3e−11` and `exp(Δ·A)` rounds to exactly 1 in f32; an impulse into every
/// channel. Returns the problem and the f64 closed form `y_t = Δ·e^{Δ·A·t}` (within 3e−10 of
/// `Δ`): an `exp` one ulp low for tiny arguments (llvmpipe's) gives `0.99981·Δ` at the end.
pub fn long_memory_impulse() -> (ScanProblem, Vec<f64>) {
    let (l, channels) = (3136, 3);
    let s = ScanShape::new(1, channels, l, 1, 1);
    let mut p = ScanProblem::random(s, &RandomSpec::default(), 4);
    p.u = (0..channels * l)
        .map(|i| if i % l == 0 { 1.0 } else { 0.0 })
        .collect();
    p.d = None;
    p.delta_bias = None;
    p.delta_softplus = false;
    p.delta = vec![1e-4; channels * l];
    p.a = [-30.0f64, -20.0, -15.0]
        .iter()
        .map(|a_log| -(a_log.exp() as f32))
        .collect();
    p.b = vec![1.0; l];
    p.c = vec![1.0; l];
    let dt = f64::from(1e-4f32);
    let expected = (0..channels * l)
        .map(|i| dt * (dt * f64::from(p.a[i / l]) * (i % l) as f64).exp())
        .collect();
    (p, expected)
}
