//! What `parity` and `bench` can run: the CubeCL runtimes compiled in (kernel level) and the
//! Burn-level paths through `Autodiff`.

use burn::backend::{Autodiff, Flex, NdArray};
use selective_scan::cubecl::Runtime;
use selective_scan::cubecl::prelude::ComputeClient;
use selective_scan::{ScanConfig, ScanDtype, ScanError, ScanGrads, ScanProblem, host};

/// A CubeCL runtime compiled into this binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Wgpu,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "rocm")]
    Rocm,
}

impl Backend {
    /// Every runtime compiled in.
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

    /// Selects runtimes by `--backend NAME` (or all of them).
    pub fn select(name: Option<&str>) -> Result<Vec<Backend>, String> {
        select(Backend::all(), |b| b.name().to_string(), name)
    }
}

fn select<T: Copy>(
    all: Vec<T>,
    name_of: fn(T) -> String,
    name: Option<&str>,
) -> Result<Vec<T>, String> {
    match name {
        None => Ok(all),
        Some(name) => all
            .iter()
            .copied()
            .find(|b| name_of(*b) == name)
            .map(|b| vec![b])
            .ok_or_else(|| {
                let known: Vec<_> = all.iter().map(|b| name_of(*b)).collect();
                format!(
                    "`{name}` is not compiled in (available: {}; cuda and rocm need \
                     `cargo run --release -p xtask-runner --features cuda|rocm -- ...`)",
                    known.join(", ")
                )
            }),
    }
}

/// One way to run the scan: the kernels on a runtime, or the Burn op through `Autodiff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// `selective_scan::forward/backward` on the runtime's device buffers.
    Kernel(Backend),
    /// `burn_vmamba::selective_scan` on `Autodiff<NdArray>` (the native fused CPU scan).
    NdArray,
    /// `burn_vmamba::selective_scan` on `Autodiff<burn::backend::Wgpu>`.
    Wgpu,
    /// `burn_vmamba::selective_scan` on `Autodiff<Flex>` (the tensor-op fallback).
    Fallback,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "rocm")]
    Rocm,
}

impl Path {
    pub fn all() -> Vec<Path> {
        let mut v: Vec<Path> = Backend::all().into_iter().map(Path::Kernel).collect();
        v.extend([Path::NdArray, Path::Wgpu, Path::Fallback]);
        #[cfg(feature = "cuda")]
        v.push(Path::Cuda);
        #[cfg(feature = "rocm")]
        v.push(Path::Rocm);
        v
    }

    pub fn name(self) -> String {
        match self {
            Path::Kernel(b) => format!("cubecl-{}", b.name()),
            Path::NdArray => "ndarray".into(),
            Path::Wgpu => "wgpu".into(),
            Path::Fallback => "fallback".into(),
            #[cfg(feature = "cuda")]
            Path::Cuda => "cuda".into(),
            #[cfg(feature = "rocm")]
            Path::Rocm => "rocm".into(),
        }
    }

    /// Selects paths by `--backend NAME` (or all of them).
    pub fn select(name: Option<&str>) -> Result<Vec<Path>, String> {
        select(Path::all(), Path::name, name)
    }

    /// Whether the path needs a Vulkan driver on Linux.
    pub fn uses_wgpu(self) -> bool {
        matches!(self, Path::Kernel(Backend::Wgpu) | Path::Wgpu)
    }

    /// Forward + backward on this path, results on the host.
    pub fn forward_backward(
        self,
        problem: &ScanProblem,
        dy: &[f32],
    ) -> Result<(Vec<f32>, ScanGrads<f32>), ScanError> {
        use burn_vmamba::ops::problem::forward_backward as burn_path;
        fn kernel<R: Runtime>(
            client: ComputeClient<R>,
            problem: &ScanProblem,
            dy: &[f32],
        ) -> Result<(Vec<f32>, ScanGrads<f32>), ScanError> {
            host::forward_backward_host(&client, problem, dy, ScanDtype::F32, ScanConfig::default())
        }
        match self {
            Path::Kernel(Backend::Wgpu) => kernel(wgpu_client(), problem, dy),
            #[cfg(feature = "cuda")]
            Path::Kernel(Backend::Cuda) => kernel(cuda_client(), problem, dy),
            #[cfg(feature = "rocm")]
            Path::Kernel(Backend::Rocm) => kernel(rocm_client(), problem, dy),
            Path::NdArray => Ok(burn_path::<Autodiff<NdArray>>(
                problem,
                dy,
                &Default::default(),
            )),
            Path::Wgpu => Ok(burn_path::<Autodiff<burn::backend::Wgpu>>(
                problem,
                dy,
                &Default::default(),
            )),
            Path::Fallback => Ok(burn_path::<Autodiff<Flex>>(
                problem,
                dy,
                &Default::default(),
            )),
            #[cfg(feature = "cuda")]
            Path::Cuda => Ok(burn_path::<Autodiff<burn::backend::Cuda>>(
                problem,
                dy,
                &Default::default(),
            )),
            #[cfg(feature = "rocm")]
            Path::Rocm => Ok(burn_path::<Autodiff<burn::backend::Rocm>>(
                problem,
                dy,
                &Default::default(),
            )),
        }
    }
}

impl Backend {
    /// Starts the runtime and runs a one-step scan (`selective_scan::host::probe`): a missing
    /// driver or compiler library is an error naming what to install (the probe's hint), not a
    /// loader panic.
    pub fn probe(self) -> Result<(), String> {
        let result = match self {
            Backend::Wgpu => {
                use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
                host::probe::<WgpuRuntime>(&WgpuDevice::default()).map(|_| ())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                use selective_scan::cubecl::cuda::{CudaDevice, CudaRuntime};
                host::probe::<CudaRuntime>(&CudaDevice::default()).map(|_| ())
            }
            #[cfg(feature = "rocm")]
            Backend::Rocm => {
                use selective_scan::cubecl::hip::{AmdDevice, HipRuntime};
                host::probe::<HipRuntime>(&AmdDevice::default()).map(|_| ())
            }
        };
        result.map_err(|e| format!("{}: {e}", self.name()))
    }
}

impl Path {
    /// The runtime this path needs started, if any (NdArray and the fallback need none).
    pub fn runtime(self) -> Option<Backend> {
        match self {
            Path::Kernel(b) => Some(b),
            Path::Wgpu => Some(Backend::Wgpu),
            #[cfg(feature = "cuda")]
            Path::Cuda => Some(Backend::Cuda),
            #[cfg(feature = "rocm")]
            Path::Rocm => Some(Backend::Rocm),
            Path::NdArray | Path::Fallback => None,
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
