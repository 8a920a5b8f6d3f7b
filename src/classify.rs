//! The `classify` example's logic, as a library so that tests run exactly what users run:
//! build or load a VSSM, read an image or a tensor, print the top-5 classes and the time per
//! image, optionally write the logits.
//!
//! ```text
//! cargo run --release --example classify -- [--backend ndarray|wgpu|cuda|rocm]
//!     [--preset NAME | --config FILE.json] [--weights FILE.pth|FILE.safetensors]
//!     [--image FILE | --input FILE.safetensors] [--output FILE.safetensors]
//! ```
//!
//! `--config` takes upstream's `VSSM(...)` keyword arguments as JSON (what
//! `scripts/make_model_fixtures.py` writes), or a [`VssmConfig`] saved by Burn. With no
//! `--preset`/`--config`, the released VMamba-T (`tiny-s1`) is built; with no `--weights` its
//! weights are upstream's random initialisation (the classes are then meaningless); with no
//! `--image`/`--input`, a generated 224×224 test pattern is classified.

use std::path::PathBuf;
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, TensorData, activation};
use burn_vmamba::SelectiveScanBackend;
use burn_vmamba::model::{StateDict, StateTensor, Vssm, VssmConfig};

/// The ImageNet-1k class names, in index order.
pub const IMAGENET_CLASSES: &str = include_str!("../examples/imagenet_classes.txt");

/// ImageNet mean and std (timm's `IMAGENET_DEFAULT_MEAN` / `_STD`), per RGB channel.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Which Burn backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendName {
    /// `burn::backend::NdArray` (CPU; the native fused scan).
    #[value(name = "ndarray")]
    NdArray,
    /// `burn::backend::Wgpu` (Vulkan / Metal / DX12; the CubeCL kernels).
    Wgpu,
    /// `burn::backend::Cuda` (feature `cuda`).
    Cuda,
    /// `burn::backend::Rocm` (feature `rocm`).
    Rocm,
}

impl BackendName {
    /// Parses `ndarray`, `wgpu`, `cuda` or `rocm` (the names `--backend` takes).
    pub fn parse(name: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(name, false).map_err(|_| {
            format!("--backend: unknown backend {name:?}; expected ndarray, wgpu, cuda or rocm")
        })
    }
}

impl BackendName {
    /// Starts the backend's runtime on `device_index` and runs a one-step scan through it
    /// (`selective_scan::host::probe`), so that a missing driver or compiler library is an
    /// error saying what to install (the probe's own hint) rather than a panic from the
    /// runtime's loader. NdArray
    /// needs nothing; a backend that is not compiled in is left to the caller's own error.
    ///
    /// Before that it points CubeCL's persistent kernel cache at the per-user directory
    /// ([`crate::runtime::configure_caches`]); the returned text says where (or why not).
    pub fn probe(self, device_index: usize) -> Result<String, String> {
        if self == BackendName::NdArray {
            return Ok("kernel cache: not needed (CPU)".into());
        }
        let _ = device_index;
        let cache = match crate::runtime::configure_caches() {
            crate::runtime::CacheSetup::Kernels(dir) => format!("kernel cache: {}", dir.display()),
            crate::runtime::CacheSetup::UserConfigured => {
                "kernel cache: as set in the CubeCL configuration".into()
            }
            crate::runtime::CacheSetup::TooLate => {
                "kernel cache: unchanged (CubeCL was already configured in this process)".into()
            }
            crate::runtime::CacheSetup::NoDirectory => {
                "kernel cache: off (no HOME or VMAMBA_CACHE_DIR to put it in)".into()
            }
        };
        let result: Result<(), selective_scan::ScanError> = match self {
            #[cfg(feature = "wgpu")]
            BackendName::Wgpu => {
                use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
                let device = match device_index {
                    0 => WgpuDevice::DefaultDevice,
                    i => WgpuDevice::DiscreteGpu(i),
                };
                selective_scan::host::probe::<WgpuRuntime>(&device).map(|_| ())
            }
            #[cfg(feature = "cuda")]
            BackendName::Cuda => {
                use selective_scan::cubecl::cuda::{CudaDevice, CudaRuntime};
                selective_scan::host::probe::<CudaRuntime>(&CudaDevice::new(device_index))
                    .map(|_| ())
            }
            #[cfg(feature = "rocm")]
            BackendName::Rocm => {
                use selective_scan::cubecl::hip::{AmdDevice, HipRuntime};
                selective_scan::host::probe::<HipRuntime>(&AmdDevice::new(device_index)).map(|_| ())
            }
            _ => Ok(()),
        };
        result
            .map(|()| cache)
            .map_err(|e| format!("--backend {self:?}: {e}"))
    }
}

/// A tensor's values, row-major, as f32 (read back from the device).
pub(crate) fn read_f32<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Vec<f32>, String> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("reading a {D}-D tensor back: {e:?}"))
}

/// `args` (after the program name) as `program`'s command line; an error or `--help` comes
/// back as the text clap would print (`classify` and `train` share it).
pub(crate) fn parse_args<T: clap::Parser>(
    program: &str,
    args: impl IntoIterator<Item = String>,
) -> Result<T, String> {
    T::try_parse_from(std::iter::once(program.to_string()).chain(args))
        .map_err(|e| e.render().to_string())
}

/// Command-line arguments of `classify` (clap; `--help` prints these descriptions).
#[derive(Debug, Clone, PartialEq, clap::Parser)]
#[command(
    name = "classify",
    about = "Classify images with VMamba on any backend.",
    long_about = "Classify images with VMamba on any backend. With no arguments: VMamba-T \
                  (tiny-s1), random weights, a generated image, on NdArray."
)]
pub struct Args {
    /// Backend (cuda and rocm need the crate's `cuda` / `rocm` features).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: BackendName,
    /// A preset name (`VssmConfig::preset`: tiny-s1, small-s2, vanilla-base, upstream's factory
    /// names, …); default tiny-s1.
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    pub preset: Option<String>,
    /// A config file: upstream's VSSM keywords or a Burn `VssmConfig`, as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// A checkpoint (`.pth` release file or `.safetensors`); random weights without it.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// An image to classify (resized to 256, centre-cropped to 224, ImageNet-normalised).
    #[arg(long, value_name = "FILE", conflicts_with = "input")]
    pub image: Option<PathBuf>,
    /// A safetensors file holding `x` `[batch, 3, height, width]`, used as is.
    #[arg(long, value_name = "FILE.safetensors")]
    pub input: Option<PathBuf>,
    /// Where to write the logits (tensor `logits`, safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    pub output: Option<PathBuf>,
    /// CUDA: let matmuls round f32 inputs to TF32 on tensor cores (faster, about 1e-3 relative
    /// error per product). Without it f32 matmuls are exact f32. Other backends: no effect.
    #[arg(long)]
    pub tf32: bool,
}

impl Args {
    /// Parses the arguments after the program name; an error (or `--help`) comes back as the
    /// text clap would print.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        parse_args("classify", args)
    }

    /// The process's arguments; prints help or the error and exits as clap does (0 for
    /// `--help`, 2 for a bad argument).
    pub fn from_env() -> Self {
        <Self as clap::Parser>::parse()
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// Backend and model, in words.
    pub setup: String,
    /// Logits `[batch, num_classes]`, row-major.
    pub logits: Vec<f32>,
    /// `[batch, num_classes]`.
    pub shape: [usize; 2],
    /// Per image: the 5 most probable `(class, probability)`.
    pub top5: Vec<Vec<(usize, f32)>>,
    /// Milliseconds of the first forward (includes kernel compilation on GPU backends).
    pub first_ms: f64,
    /// Milliseconds per image of a second, timed forward.
    pub ms_per_image: f64,
}

/// The class name of an index, when the model has the 1000 ImageNet classes.
pub fn class_name(index: usize, num_classes: usize) -> String {
    match (num_classes, IMAGENET_CLASSES.lines().nth(index)) {
        (1000, Some(name)) => name.to_string(),
        _ => format!("class {index}"),
    }
}

/// Reads `--config`: upstream keywords first, then a Burn-saved [`VssmConfig`].
pub fn read_config(path: &std::path::Path) -> Result<VssmConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("--config {}: not JSON: {e}", path.display()))?;
    match VssmConfig::from_upstream(&json) {
        Ok(config) => Ok(config),
        Err(upstream) => burn_config(&text, &json).map_err(|burn| {
            format!(
                "--config {}: neither upstream VSSM keywords:\n{upstream}\nnor a burn-vmamba \
                 VssmConfig ({burn})",
                path.display()
            )
        }),
    }
}

/// A Burn-saved [`VssmConfig`], refusing fields it does not have (serde would ignore them and
/// fall back to defaults, silently).
fn burn_config(text: &str, json: &serde_json::Value) -> Result<VssmConfig, String> {
    let config = VssmConfig::load_binary(text.as_bytes()).map_err(|e| e.to_string())?;
    let fields = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    let unknown: Vec<&String> = match (json.as_object(), fields.as_object()) {
        (Some(given), Some(fields)) => given.keys().filter(|k| !fields.contains_key(*k)).collect(),
        _ => return Err("expected a JSON object".into()),
    };
    if unknown.is_empty() {
        Ok(config)
    } else {
        Err(format!("unknown fields {unknown:?}"))
    }
}

/// An image file → `[1, 3, 224, 224]`, upstream's evaluation transform: resize the shorter
/// side to 256 (bicubic), centre crop 224, scale to [0, 1], normalise by [`MEAN`]/[`STD`].
pub fn preprocess(path: &std::path::Path) -> Result<StateTensor, String> {
    let image = image::open(path)
        .map_err(|e| format!("--image {}: {e}", path.display()))?
        .to_rgb8();
    Ok(StateTensor {
        shape: vec![1, 3, 224, 224],
        values: normalise(&resize_center_crop(&image, 224)),
    })
}

/// Upstream's evaluation resize and crop for inputs of side `size`: the shorter side to
/// `size / 0.875` (256 for 224; bicubic), then the centred `size × size` square.
pub fn resize_center_crop(image: &image::RgbImage, size: u32) -> image::RgbImage {
    let (w, h) = image.dimensions();
    let short = (f64::from(size) / 0.875).round();
    let scale = short / f64::from(w.min(h));
    let (rw, rh) = (
        ((f64::from(w) * scale).round() as u32).max(size),
        ((f64::from(h) * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(image, rw, rh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, (rw - size) / 2, (rh - size) / 2, size, size).to_image()
}

/// An 8-bit RGB image → `[3, height, width]` values scaled to [0, 1] and normalised by
/// [`MEAN`]/[`STD`].
pub fn normalise(image: &image::RgbImage) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut values = vec![0.0f32; 3 * w * h];
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            values[(c * h + y as usize) * w + x as usize] =
                (f32::from(pixel[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    values
}

/// A generated, already normalised 224×224 test pattern (smooth colour gradients and rings).
pub fn test_pattern() -> StateTensor {
    let mut values = vec![0.0f32; 3 * 224 * 224];
    for y in 0..224 {
        for x in 0..224 {
            let (u, v) = (x as f32 / 223.0, y as f32 / 223.0);
            let r = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
            let rgb = [u, v, 0.5 + 0.5 * (r * 40.0).sin()];
            for c in 0..3 {
                values[(c * 224 + y) * 224 + x] = (rgb[c] - MEAN[c]) / STD[c];
            }
        }
    }
    StateTensor {
        shape: vec![1, 3, 224, 224],
        values,
    }
}

/// Runs `classify` with parsed arguments.
///
/// `args.tf32` is applied by the `classify` example's `main` ([`crate::runtime::allow_tf32`],
/// which must run before other threads exist); here it only has to agree with the process
/// environment, or this refuses rather than silently running the other precision.
pub fn run(args: &Args) -> Result<Report, String> {
    let tf32 = std::env::var(crate::runtime::CUDA_TF32_VAR).is_ok_and(|v| v == "1");
    if args.backend == BackendName::Cuda && args.tf32 != tf32 {
        return Err(format!(
            "--tf32 is {} but {}={:?} in this process: call vmamba::runtime::allow_tf32({}) \
             first thing in main (the classify example does)",
            args.tf32,
            crate::runtime::CUDA_TF32_VAR,
            std::env::var(crate::runtime::CUDA_TF32_VAR).unwrap_or_default(),
            args.tf32
        ));
    }
    let cache = args.backend.probe(0)?;
    let mut report = run_backend(args)?;
    report.setup = format!("{}\n{cache}", report.setup);
    if args.backend == BackendName::Cuda {
        let precision = if tf32 {
            "TF32 allowed (--tf32)"
        } else {
            "exact f32"
        };
        report.setup = format!("{}\nmatmuls: {precision}", report.setup);
    }
    Ok(report)
}

fn run_backend(args: &Args) -> Result<Report, String> {
    match args.backend {
        BackendName::NdArray => {
            run_on::<burn::backend::NdArray>(args, &Default::default(), "NdArray (CPU)")
        }
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => run_on::<burn::backend::Wgpu>(args, &Default::default(), "Wgpu"),
        #[cfg(feature = "cuda")]
        BackendName::Cuda => run_on::<burn::backend::Cuda>(args, &Default::default(), "Cuda"),
        #[cfg(feature = "rocm")]
        BackendName::Rocm => run_on::<burn::backend::Rocm>(args, &Default::default(), "Rocm"),
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "--backend {other:?} is not compiled in: rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        )),
    }
}

fn run_on<B: SelectiveScanBackend>(
    args: &Args,
    device: &B::Device,
    backend: &str,
) -> Result<Report, String> {
    let (config, name) = match (&args.preset, &args.config) {
        (_, Some(path)) => (read_config(path)?, path.display().to_string()),
        (Some(preset), None) => (
            VssmConfig::preset(preset).map_err(|e| format!("--preset: {e}"))?,
            preset.clone(),
        ),
        (None, None) => (
            VssmConfig::preset("tiny-s1").map_err(|e| e.to_string())?,
            "tiny-s1".to_string(),
        ),
    };
    config
        .validate()
        .map_err(|e| format!("config {name}:\n{e}"))?;
    let model: Vssm<B> = config.init(device);
    let (model, weights) = match &args.weights {
        Some(path) => (
            model.load_checkpoint(path).map_err(|e| e.to_string())?,
            path.display().to_string(),
        ),
        None => (model, "random initialisation (no --weights)".to_string()),
    };
    let x = match (&args.image, &args.input) {
        (Some(path), _) => preprocess(path)?,
        (None, Some(path)) => {
            let mut dict = StateDict::from_file(path).map_err(|e| e.to_string())?;
            let x = dict.tensors.remove("x").ok_or_else(|| {
                format!(
                    "--input {}: no tensor `x` (found {:?})",
                    path.display(),
                    dict.tensors.keys().collect::<Vec<_>>()
                )
            })?;
            if x.shape.len() != 4 || x.shape[1] != config.in_chans {
                return Err(format!(
                    "--input {}: `x` must be [batch, {}, height, width], found {:?}",
                    path.display(),
                    config.in_chans,
                    x.shape
                ));
            }
            x
        }
        (None, None) => test_pattern(),
    };
    let batch = x.shape[0];
    let images =
        || Tensor::<B, 4>::from_data(TensorData::new(x.values.clone(), x.shape.clone()), device);

    let shape: [usize; 4] = x.shape[..].try_into().map_err(|_| {
        format!(
            "`x` must have 4 dimensions [batch, channels, height, width], found {:?}",
            x.shape
        )
    })?;
    model.check_input(shape).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let logits = model.forward(images());
    let logits_values = read_f32(logits)?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let probabilities = activation::softmax(model.forward(images()), 1);
    let probabilities = read_f32(probabilities)?;
    let ms_per_image = start.elapsed().as_secs_f64() * 1e3 / batch as f64;

    let classes = config.num_classes;
    let top5 = probabilities
        .chunks(classes)
        .map(|row| {
            let mut ranked: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked.truncate(5);
            ranked
        })
        .collect();
    if let Some(path) = &args.output {
        let dict = StateDict {
            tensors: [(
                "logits".to_string(),
                StateTensor {
                    shape: vec![batch, classes],
                    values: logits_values.clone(),
                },
            )]
            .into(),
        };
        dict.save_safetensors(path)
            .map_err(|e| format!("--output {}: {e}", path.display()))?;
    }
    let model_text = config.to_string().replace(['\n', ' '], "");
    Ok(Report {
        setup: format!(
            "backend {backend}; model {name} ({} parameters); weights: {weights}\nconfig: {model_text}",
            model.num_params()
        ),
        logits: logits_values,
        shape: [batch, classes],
        top5,
        first_ms,
        ms_per_image,
    })
}
