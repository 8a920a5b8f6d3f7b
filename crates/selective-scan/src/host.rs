//! Host convenience: upload a [`ScanProblem`], run the kernels, read the results back.
//!
//! Used by the tests and `cargo xtask parity` (`forward_backward_host` only with the `testing`
//! feature), and by [`probe`]; a framework integration passes device handles to
//! [`crate::forward`] / [`crate::backward`] directly.

use cubecl::prelude::*;
use cubecl::server::Handle;

#[cfg(any(test, feature = "testing"))]
use crate::{BackwardOutput, ScanGrads};
use crate::{
    DeviceTensor, ScanArgs, ScanConfig, ScanDtype, ScanError, ScanProblem, TensorRef,
    contiguous_strides,
};

fn upload<R: Runtime>(client: &ComputeClient<R>, data: &[f32], dtype: ScanDtype) -> Handle {
    match dtype {
        ScanDtype::F32 => client.create_from_slice(bytemuck::cast_slice(data)),
        ScanDtype::F16 => {
            let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            client.create_from_slice(bytemuck::cast_slice(&v))
        }
        ScanDtype::BF16 => {
            let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
            client.create_from_slice(bytemuck::cast_slice(&v))
        }
    }
}

/// Reads a contiguous f32 device tensor back to the host.
pub fn read<R: Runtime>(
    client: &ComputeClient<R>,
    tensor: &DeviceTensor,
) -> Result<Vec<f32>, ScanError> {
    let bytes = client
        .read_one(tensor.handle.clone())
        .map_err(|e| ScanError::Runtime {
            detail: format!("{e:?}"),
        })?;
    let expected: usize = tensor.shape.iter().product();
    let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[..expected * 4]);
    Ok(values)
}

struct Uploaded {
    handles: Vec<Handle>,
    shapes: Vec<Vec<usize>>,
    strides: Vec<Vec<usize>>,
    dtypes: Vec<ScanDtype>,
    has_d: bool,
    has_bias: bool,
}

impl Uploaded {
    fn new<R: Runtime>(
        client: &ComputeClient<R>,
        p: &ScanProblem,
        dtype: ScanDtype,
    ) -> Result<Self, ScanError> {
        p.validate()?;
        let mut up = Uploaded {
            handles: vec![],
            shapes: vec![],
            strides: vec![],
            dtypes: vec![],
            has_d: p.d.is_some(),
            has_bias: p.delta_bias.is_some(),
        };
        for (name, shape, data) in p.named() {
            // A, D and delta_bias stay f32 whatever the input dtype (as in mamba's kernels).
            let dt = if matches!(name, "A" | "D" | "delta_bias") {
                ScanDtype::F32
            } else {
                dtype
            };
            up.handles.push(upload(client, data, dt));
            up.strides.push(contiguous_strides(&shape));
            up.shapes.push(shape);
            up.dtypes.push(dt);
        }
        Ok(up)
    }

    fn tensor(&self, i: usize) -> TensorRef<'_> {
        TensorRef {
            handle: &self.handles[i],
            shape: &self.shapes[i],
            strides: &self.strides[i],
            dtype: self.dtypes[i],
        }
    }

    fn args(&self, delta_softplus: bool) -> ScanArgs<'_> {
        let mut next = 5;
        let mut optional = |present: bool| {
            present.then(|| {
                next += 1;
                self.tensor(next - 1)
            })
        };
        let d = optional(self.has_d);
        let delta_bias = optional(self.has_bias);
        ScanArgs {
            u: self.tensor(0),
            delta: self.tensor(1),
            a: self.tensor(2),
            b: self.tensor(3),
            c: self.tensor(4),
            d,
            delta_bias,
            delta_softplus,
        }
    }
}

/// Runs the forward kernel on `problem`, with `u, delta, B, C` stored as `dtype`, and returns
/// `y` on the host.
pub fn forward_host<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &ScanProblem,
    dtype: ScanDtype,
    config: ScanConfig,
) -> Result<Vec<f32>, ScanError> {
    let up = Uploaded::new(client, problem, dtype)?;
    let out = crate::forward(client, &up.args(problem.delta_softplus), config)?;
    read(client, &out.y)
}

#[cfg(any(test, feature = "testing"))]
/// Runs the forward and backward kernels on `problem` for the upstream gradient `dy`, and
/// returns `y` and every gradient on the host.
pub fn forward_backward_host<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &ScanProblem,
    dy: &[f32],
    dtype: ScanDtype,
    config: ScanConfig,
) -> Result<(Vec<f32>, ScanGrads<f32>), ScanError> {
    let up = Uploaded::new(client, problem, dtype)?;
    let args = up.args(problem.delta_softplus);
    let saved = crate::forward(client, &args, config)?;
    if dy.len() != problem.shape.bdl_len() {
        return Err(ScanError::Length {
            arg: "dy",
            expected: problem.shape.bdl_len(),
            actual: dy.len(),
        });
    }
    let dy_shape = problem.shape.bdl();
    let dy_strides = contiguous_strides(&dy_shape);
    let dy_handle = upload(client, dy, ScanDtype::F32);
    let dy_ref = TensorRef {
        handle: &dy_handle,
        shape: &dy_shape,
        strides: &dy_strides,
        dtype: ScanDtype::F32,
    };
    let grads: BackwardOutput =
        crate::backward(client, &args, &saved.carries, saved.config, dy_ref)?;
    let y = read(client, &saved.y)?;
    let opt = |t: &Option<DeviceTensor>| t.as_ref().map(|t| read(client, t)).transpose();
    Ok((
        y,
        ScanGrads {
            du: read(client, &grads.du)?,
            ddelta: read(client, &grads.ddelta)?,
            da: read(client, &grads.da)?,
            db: read(client, &grads.db)?,
            dc: read(client, &grads.dc)?,
            dd: opt(&grads.dd)?,
            ddelta_bias: opt(&grads.ddelta_bias)?,
        },
    ))
}

/// Starts `R` on `device` and runs one tiny scan through it (client creation, kernel
/// compilation, launch, read-back), turning a panic of the runtime's loader into an error.
///
/// CubeCL's runtimes panic when their driver or compiler library is missing (CUDA without
/// `libcuda.so`/`libnvrtc.so`, ROCm without the HIP libraries, WGPU without any adapter). A
/// command-line tool calls this first and reports [`ScanError::Unsupported`] with the runtime's
/// own message and what to install, instead of a backtrace. The default panic hook is silenced while it runs (it is
/// process-wide: call this at start-up, not while other threads may panic).
pub fn probe<R: Runtime>(device: &R::Device) -> Result<ComputeClient<R>, ScanError> {
    // Runtimes may fail on a thread of their own (CUDA's device thread), leaving the caller
    // only a channel error: keep every panic message raised while probing, first one first.
    let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let hook = std::panic::take_hook();
    let sink = messages.clone();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into());
        if let Ok(mut list) = sink.lock() {
            list.push(message);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let client = R::client(device);
        let problem = ScanProblem {
            shape: crate::ScanShape::new(1, 1, 1, 1, 1),
            u: vec![1.0],
            delta: vec![0.5],
            a: vec![-1.0],
            b: vec![1.0],
            c: vec![1.0],
            d: None,
            delta_bias: None,
            delta_softplus: false,
        };
        let y = forward_host(&client, &problem, ScanDtype::F32, ScanConfig::default())?;
        // h = Δ·B·u = 0.5, y = C·h.
        if y == [0.5] {
            Ok(client)
        } else {
            Err(ScanError::Runtime {
                detail: format!("a one-step test scan gave {y:?} instead of [0.5]"),
            })
        }
    }));
    std::panic::set_hook(hook);
    match result {
        Ok(outcome) => outcome,
        Err(_) => {
            let messages = messages.lock().map(|m| m.clone()).unwrap_or_default();
            let runtime = std::any::type_name::<R>()
                .rsplit("::")
                .next()
                .unwrap_or("CubeCL");
            let hint = match runtime {
                "WgpuRuntime" => {
                    "WGPU needs a Vulkan (Linux), DX12 (Windows) or Metal (macOS) driver; without \
                     a GPU on Debian/Ubuntu: `apt-get install -y mesa-vulkan-drivers libvulkan1`"
                }
                "CudaRuntime" => {
                    "CUDA needs the NVIDIA driver (`libcuda.so.1`) and NVRTC (`libnvrtc.so*`, \
                     also in pip's `nvidia-cuda-nvrtc` packages) where the loader finds them \
                     (for example on LD_LIBRARY_PATH)"
                }
                "HipRuntime" => {
                    "ROCm needs the HIP runtime and compiler (`libamdhip64.so`, `libhiprtc.so`) \
                     where the loader finds them (for example /opt/rocm/lib on LD_LIBRARY_PATH)"
                }
                _ => "check that the runtime's driver and libraries are installed",
            };
            Err(ScanError::Unsupported {
                detail: format!(
                    "the {runtime} did not start: {}\n{hint}",
                    messages.join("; then: ")
                ),
            })
        }
    }
}
