//! Helpers shared by the kernel tests: the WGPU client, the error metric, the comparison.
#![allow(dead_code)]

use selective_scan::cubecl::Runtime;
use selective_scan::cubecl::prelude::ComputeClient;
use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use selective_scan::{
    ScanConfig, ScanDtype, ScanGrads, ScanProblem, ScanShape, SplitMix64, host, reference,
};

/// Tolerance of the issue: max |x − ref| / max |ref| in f32 against the f64 reference.
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
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = actual.iter().zip(expected).fold(0.0f64, |m, (a, e)| {
        let d = (f64::from(*a) - e).abs();
        // NaN anywhere is an error, never a pass.
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    if scale > 0.0 { err / scale } else { err }
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
    let mut out = vec![("y", rel_err(y, y_ref))];
    let got = grads.named();
    let want = grads_ref.named();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        want.iter().map(|g| g.0).collect::<Vec<_>>(),
        "the kernel and the reference return different sets of gradients"
    );
    for ((name, a), (_, e)) in got.into_iter().zip(want) {
        out.push((name, rel_err(a, e)));
    }
    out
}
