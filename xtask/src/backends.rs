//! The CubeCL runtimes compiled into this binary, behind one enum.

use selective_scan::cubecl::Runtime;
use selective_scan::cubecl::prelude::ComputeClient;
use selective_scan::{ScanConfig, ScanDtype, ScanError, ScanGrads, ScanProblem, host};

/// A backend the scan can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Wgpu,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "rocm")]
    Rocm,
}

impl Backend {
    /// Every backend compiled in.
    pub fn all() -> Vec<Backend> {
        #[allow(unused_mut)]
        let mut v = vec![Backend::Wgpu];
        #[cfg(feature = "cuda")]
        v.push(Backend::Cuda);
        #[cfg(feature = "rocm")]
        v.push(Backend::Rocm);
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Wgpu => "wgpu",
            #[cfg(feature = "cuda")]
            Backend::Cuda => "cuda",
            #[cfg(feature = "rocm")]
            Backend::Rocm => "rocm",
        }
    }

    /// Selects backends by `--backend NAME` (or all of them).
    pub fn select(name: Option<&str>) -> Result<Vec<Backend>, String> {
        let all = Backend::all();
        match name {
            None => Ok(all),
            Some(name) => all
                .iter()
                .copied()
                .find(|b| b.name() == name)
                .map(|b| vec![b])
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|b| b.name()).collect();
                    format!(
                        "backend `{name}` is not compiled in (available: {}; cuda and rocm need \
                         `cargo xtask --features cuda|rocm`)",
                        known.join(", ")
                    )
                }),
        }
    }

    /// Forward + backward on this backend, results on the host.
    pub fn forward_backward(
        self,
        problem: &ScanProblem,
        dy: &[f32],
    ) -> Result<(Vec<f32>, ScanGrads<f32>), ScanError> {
        fn go<R: Runtime>(
            client: ComputeClient<R>,
            problem: &ScanProblem,
            dy: &[f32],
        ) -> Result<(Vec<f32>, ScanGrads<f32>), ScanError> {
            host::forward_backward_host(&client, problem, dy, ScanDtype::F32, ScanConfig::default())
        }
        match self {
            Backend::Wgpu => go(wgpu_client(), problem, dy),
            #[cfg(feature = "cuda")]
            Backend::Cuda => go(cuda_client(), problem, dy),
            #[cfg(feature = "rocm")]
            Backend::Rocm => go(rocm_client(), problem, dy),
        }
    }
}

pub fn wgpu_client() -> ComputeClient<selective_scan::cubecl::wgpu::WgpuRuntime> {
    use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    WgpuRuntime::client(&WgpuDevice::default())
}

#[cfg(feature = "cuda")]
pub fn cuda_client() -> ComputeClient<selective_scan::cubecl::cuda::CudaRuntime> {
    use selective_scan::cubecl::cuda::{CudaDevice, CudaRuntime};
    CudaRuntime::client(&CudaDevice::default())
}

#[cfg(feature = "rocm")]
pub fn rocm_client() -> ComputeClient<selective_scan::cubecl::hip::HipRuntime> {
    use selective_scan::cubecl::hip::{AmdDevice, HipRuntime};
    HipRuntime::client(&AmdDevice::default())
}
