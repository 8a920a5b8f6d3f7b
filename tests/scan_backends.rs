//! Cross-crate check through the facade: the scan on every runtime compiled in, one case per
//! backend, against the f64 reference (output and all gradients).

use rstest::rstest;
use vmamba::selective_scan::cubecl::Runtime;
use vmamba::selective_scan::cubecl::prelude::ComputeClient;
use vmamba::selective_scan::{
    RandomSpec, ScanConfig, ScanDtype, ScanProblem, ScanShape, SplitMix64, host, reference,
};

/// Both measures of the deviation from the reference (max-relative and elementwise), the larger.
fn max_rel_err(actual: &[f32], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).worst()
}

fn check<R: Runtime>(client: ComputeClient<R>, backend: &str) {
    let shape = ScanShape {
        batch: 2,
        channels: 8,
        seq_len: 1030,
        d_state: 4,
        groups: 4,
    };
    let p = ScanProblem::random(shape, &RandomSpec::default(), 2024);
    let dy = SplitMix64::new(7).vec(shape.bdl_len(), -1.0, 1.0);
    let (y, grads) =
        host::forward_backward_host(&client, &p, &dy, ScanDtype::F32, ScanConfig::default())
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
    let (y_ref, grads_ref) = reference::backward(&p, &dy);
    let mut all = vec![("y", max_rel_err(&y, &y_ref))];
    for ((name, got), (_, want)) in grads.named().into_iter().zip(grads_ref.named()) {
        all.push((name, max_rel_err(got, want)));
    }
    for (name, err) in all {
        assert!(err <= 2e-4, "{backend}: {name} off by {err:.3e}");
    }
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Wgpu,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "rocm")]
    Rocm,
}

#[rstest]
#[case::wgpu(Backend::Wgpu)]
#[cfg_attr(feature = "cuda", case::cuda(Backend::Cuda))]
#[cfg_attr(feature = "rocm", case::rocm(Backend::Rocm))]
fn scan_matches_reference_on_backend(#[case] backend: Backend) {
    match backend {
        Backend::Wgpu => {
            use vmamba::selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
            check(WgpuRuntime::client(&WgpuDevice::default()), "wgpu")
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use vmamba::selective_scan::cubecl::cuda::{CudaDevice, CudaRuntime};
            check(CudaRuntime::client(&CudaDevice::default()), "cuda")
        }
        #[cfg(feature = "rocm")]
        Backend::Rocm => {
            use vmamba::selective_scan::cubecl::hip::{AmdDevice, HipRuntime};
            check(HipRuntime::client(&AmdDevice::default()), "rocm")
        }
    }
}
