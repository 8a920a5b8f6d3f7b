//! The `train` example's logic: VMamba trained with burn-train's supervised `Learner`, upstream's
//! recipe, on an ImageFolder tree or on a synthetic task that needs long-range token mixing.
//!
//! ```text
//! cargo run --release --example train -- [--backend ndarray|wgpu|cuda|rocm] [--devices N|LIST]
//!     [--data DIR] [--preset NAME | --config FILE.json] [--weights FILE] [--out DIR]
//!     [--epochs N] [--minutes M] [--batch-size N] [--lr BASE_LR] [--image-size N]
//!     [--seed N] [--workers N] [--resume]
//! ```
//!
//! | piece | where |
//! |---|---|
//! | the recipe as a Burn `Config`, saved as `OUT/config.json` | [`TrainConfig`] |
//! | AdamW with upstream's decay groups, global-norm clipping, warm-up + cosine | [`optim`] |
//! | the synthetic task, ImageFolder, transforms, batcher | [`data`] |
//! | the model as a burn-train `TrainStep` / `InferenceStep` | [`VssmClassifier`] |
//! | progress lines when stdout is not a terminal (burn-train's TUI otherwise) | [`PlainRenderer`] |
//!
//! A run writes into `OUT` (default `target/train`): burn-train's checkpoints
//! (`checkpoint/{model,optim,scheduler}-EPOCH.mpk`, the last two epochs and the best by
//! validation loss), its metric logs (`train/`, `valid/`, `experiment.log`), `config.json`,
//! and at the end `model.safetensors` (upstream key names, what `classify --weights` reads),
//! `model.json` (the `VssmConfig`, what `classify --config` reads) and `val-sample.safetensors`
//! (the first validation images `x` with their `labels` and this run's `predictions`).

pub mod data;
pub mod optim;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::config::Config;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::metric::store::EventStoreClient;
use burn::train::metric::{
    AccuracyMetric, IterationSpeedMetric, LearningRateMetric, LossMetric, MetricDefinition,
};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{
    ClassificationOutput, EarlyStoppingStrategy, ExecutionStrategy, InferenceStep, Learner,
    MultiDeviceOptim, SupervisedTraining, TrainOutput, TrainStep, TrainingStrategy,
};
use burn_vmamba::SelectiveScanBackend;
use burn_vmamba::model::{PatchEmbedVersion, SsmInit, StateDict, StateTensor, Vssm, VssmConfig};
use serde::{Deserialize, Serialize};

use crate::classify::{BackendName, read_config, read_f32};
use data::{ImageBatch, ImageBatcher, LabeledImage, SyntheticCorners, Transform};
use optim::{RecipeOptimizerConfig, WarmupCosine, decay_groups};

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// [`SyntheticCorners`]: `train` and `val` images of side `size`.
    Synthetic {
        /// Training images.
        train: usize,
        /// Validation images.
        val: usize,
        /// Image side.
        size: usize,
    },
    /// An ImageFolder tree (`root/train/<class>/…`, `root/val/<class>/…`).
    ImageFolder {
        /// The root folder.
        root: PathBuf,
        /// Class names (sorted folder names).
        classes: Vec<String>,
        /// Model input side.
        size: usize,
    },
}

impl Task {
    /// Side of the model's input images.
    pub fn image_size(&self) -> usize {
        match self {
            Task::Synthetic { size, .. } | Task::ImageFolder { size, .. } => *size,
        }
    }

    /// Class names, by index.
    pub fn classes(&self) -> Vec<String> {
        match self {
            Task::Synthetic { .. } => SyntheticCorners::CLASSES.map(String::from).to_vec(),
            Task::ImageFolder { classes, .. } => classes.clone(),
        }
    }
}

/// The training recipe: upstream VMamba's (`classification/config.py`, `main.py`,
/// `utils/optimizer.py`) with its defaults, plus the task and the model. Saved as
/// `OUT/config.json`; `--resume` reads it back.
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// The model.
    pub model: VssmConfig,
    /// The data.
    pub task: Task,
    /// Images per device and step.
    #[config(default = 128)]
    pub batch_size: usize,
    /// Epochs of the schedule.
    #[config(default = 300)]
    pub epochs: usize,
    /// Epochs of linear warm-up.
    #[config(default = 20)]
    pub warmup_epochs: usize,
    /// Peak learning rate for a total batch of 512 (`BASE_LR`); scaled linearly.
    #[config(default = 5e-4)]
    pub base_lr: f64,
    /// First warm-up learning rate for a total batch of 512 (`WARMUP_LR`); scaled linearly.
    #[config(default = 5e-7)]
    pub warmup_lr: f64,
    /// Final learning rate for a total batch of 512 (`MIN_LR`); scaled linearly.
    #[config(default = 5e-6)]
    pub min_lr: f64,
    /// AdamW weight decay of the decay group.
    #[config(default = 0.05)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[config(default = 0.9)]
    pub beta_1: f64,
    /// AdamW β2.
    #[config(default = 0.999)]
    pub beta_2: f64,
    /// AdamW ε.
    #[config(default = 1e-8)]
    pub epsilon: f64,
    /// Gradient clipping by the global L2 norm (`None`: off).
    #[config(default = "Some(5.0)")]
    pub clip_grad: Option<f64>,
    /// Label smoothing of the training loss.
    #[config(default = 0.1)]
    pub label_smoothing: f64,
    /// Seed of the model initialisation, the shuffling and the augmentation.
    #[config(default = 0)]
    pub seed: u64,
    /// Data-loader worker threads.
    #[config(default = 1)]
    pub workers: usize,
    /// Data-parallel devices (the learning rates scale with `batch_size · devices`).
    #[config(default = 1)]
    pub devices: usize,
}

impl TrainConfig {
    /// The default task: [`SyntheticCorners`] (24×24 images, 4096 training and 1024
    /// validation images per epoch) with a one-block VMamba of the s1 family (`v05_noz`,
    /// `ssm_ratio` 1, MLP 4, ln2d) on a 4×4 stem (patch embed v1): 6×6 tokens, width 48,
    /// `d_state` 4 and upstream's `ssm_init="v1"` (A = −exp(N(0, 1)) per channel and state,
    /// Δ ≈ softplus(0.1·N(0, 1)) ≈ 0.7): its random A give some states a memory of tens of
    /// tokens with a large Δ, where the default init (A = −1…−N, Δ ∈ [0.001, 0.1]) gives every
    /// token a weight of at most ~1 % in a state that far away, and stays on the chance plateau
    /// far longer (measured: at chance after 5 epochs at 32×32). Without the scan this model sees
    /// ±1 token (the non-overlapping stem and one 3×3 depthwise conv; the MLP is per token) and
    /// the nearest tokens of the two marks are 3 apart: only the scan can bring them together.
    /// (At 16×16 the conv alone solves the task, and so does the wrong shortcut: measured,
    /// 100 % for both.)
    ///
    /// The schedule is upstream's scaled down to a few CPU minutes: 8 epochs, 1 of warm-up,
    /// batch 64, `base_lr` 1.6e-2 (2e-3 at batch 64), no drop path.
    pub fn synthetic() -> Self {
        let model = VssmConfig::preset("tiny-s1")
            .expect("tiny-s1 is a preset")
            .with_depths(vec![1])
            .with_dims(vec![48])
            .with_ssm_d_state(4)
            .with_ssm_init(SsmInit::V1)
            .with_patchembed_version(PatchEmbedVersion::V1)
            .with_drop_path_rate(0.0)
            .with_num_classes(SyntheticCorners::CLASSES.len());
        TrainConfig::new(
            model,
            Task::Synthetic {
                train: 4096,
                val: 1024,
                size: 24,
            },
        )
        .with_batch_size(64)
        .with_epochs(8)
        .with_warmup_epochs(1)
        .with_base_lr(1.6e-2)
        .with_warmup_lr(1.6e-5)
        .with_min_lr(1.6e-4)
    }

    /// Learning rates scale with the total batch: `lr · batch_size · devices / 512`.
    pub fn lr_scale(&self) -> f64 {
        (self.batch_size * self.devices) as f64 / 512.0
    }

    /// Optimiser steps per epoch (each device takes one batch per step).
    pub fn iterations_per_epoch(&self, train_len: usize) -> usize {
        train_len
            .div_ceil(self.devices)
            .div_ceil(self.batch_size)
            .max(1)
    }

    /// The schedule for `train_len` training images.
    pub fn schedule(&self, train_len: usize) -> WarmupCosine {
        let per_epoch = self.iterations_per_epoch(train_len);
        let scale = self.lr_scale();
        WarmupCosine {
            base_lr: self.base_lr * scale,
            warmup_lr: self.warmup_lr * scale,
            min_lr: self.min_lr * scale,
            warmup_iters: self.warmup_epochs * per_epoch,
            total_iters: self.epochs * per_epoch,
            iteration: 0,
        }
    }

    /// The optimiser settings.
    pub fn optimizer(&self) -> RecipeOptimizerConfig {
        RecipeOptimizerConfig {
            weight_decay: self.weight_decay,
            betas: (self.beta_1, self.beta_2),
            epsilon: self.epsilon,
            clip_norm: self.clip_grad,
            grad_scale: 1.0 / self.devices as f64,
        }
    }

    /// Checks the recipe, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Err(e) = self.model.validate() {
            errors.push(format!("model: {e}"));
        }
        let positive = [
            ("batch_size", self.batch_size),
            ("epochs", self.epochs),
            ("devices", self.devices),
            ("workers", self.workers),
            ("image size", self.task.image_size()),
        ];
        for (name, value) in positive {
            if value == 0 {
                errors.push(format!("{name}: expected ≥ 1, found 0"));
            }
        }
        if self.warmup_epochs > self.epochs {
            errors.push(format!(
                "warmup_epochs: expected ≤ epochs ({}), found {}",
                self.epochs, self.warmup_epochs
            ));
        }
        if !(self.base_lr > 0.0 && self.base_lr.is_finite()) {
            errors.push(format!("base_lr: expected > 0, found {}", self.base_lr));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            errors.push(format!(
                "label_smoothing: expected in [0, 1), found {}",
                self.label_smoothing
            ));
        }
        let classes = self.task.classes().len();
        if self.model.num_classes != classes {
            errors.push(format!(
                "model.num_classes: expected {classes} (the task's classes), found {}",
                self.model.num_classes
            ));
        }
        if let Task::Synthetic { train, val, size } = &self.task {
            if *train == 0 || *val == 0 {
                errors.push(format!(
                    "task: expected ≥ 1 training and validation image, found {train} and {val}"
                ));
            }
            if *size < 16 {
                errors.push(format!(
                    "image size: the synthetic task needs ≥ 16, found {size}"
                ));
            }
        }
        if self.task.image_size() < self.model.patch_size {
            errors.push(format!(
                "image size: expected ≥ the patch size {}, found {}",
                self.model.patch_size,
                self.task.image_size()
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

/// The model as burn-train sees it: a [`Vssm`] and the training loss's label smoothing.
#[derive(Module, Debug)]
pub struct VssmClassifier<B: Backend> {
    /// The network.
    pub vssm: Vssm<B>,
    /// Label smoothing of the training loss (validation uses plain cross-entropy).
    #[module(skip)]
    pub label_smoothing: f64,
}

impl<B: SelectiveScanBackend> VssmClassifier<B> {
    /// Logits, the cross-entropy loss (with `smoothing`) and the targets.
    pub fn forward_classification(
        &self,
        batch: ImageBatch<B>,
        smoothing: f64,
    ) -> ClassificationOutput<B> {
        let logits = self.vssm.forward(batch.images);
        let loss = CrossEntropyLossConfig::new()
            .with_smoothing((smoothing > 0.0).then_some(smoothing as f32))
            .init(&logits.device())
            .forward(logits.clone(), batch.targets.clone());
        ClassificationOutput::new(loss, logits, batch.targets)
    }
}

impl<B: AutodiffBackend + SelectiveScanBackend> TrainStep for VssmClassifier<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let item = self.forward_classification(batch, self.label_smoothing);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl<B: SelectiveScanBackend> InferenceStep for VssmClassifier<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> ClassificationOutput<B> {
        self.forward_classification(batch, 0.0)
    }
}

/// Command-line arguments of `train` (clap; `--help` prints these descriptions).
#[derive(Debug, Clone, PartialEq, clap::Parser)]
#[command(
    name = "train",
    about = "Train VMamba with burn-train's Learner and upstream's recipe.",
    long_about = "Train VMamba with burn-train's Learner and upstream's recipe. With no \
                  arguments: the synthetic corner-matching task with a small VMamba on NdArray, \
                  into target/train."
)]
pub struct Args {
    /// Backend (cuda and rocm need the crate's `cuda` / `rocm` features).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: BackendName,
    /// Devices: a count (`2` = indices 0 and 1) or a list of indices (`0,2`).
    // `std::vec::Vec`: one value parsed into the list (clap would take `Vec<_>` as repeats).
    #[arg(long, value_name = "N|LIST", default_value = "1", value_parser = parse_devices)]
    pub devices: std::vec::Vec<usize>,
    /// ImageFolder root (`train/` and `val/` of class folders); the synthetic task without it.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A preset name (`VssmConfig::preset`).
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    pub preset: Option<String>,
    /// A model config file (upstream's VSSM keywords or a Burn `VssmConfig`, JSON).
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// A checkpoint to fine-tune from (`.pth` or `.safetensors`).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Output folder (checkpoints, recipe, logs, weights).
    #[arg(long, value_name = "DIR", default_value = "target/train")]
    pub out: PathBuf,
    /// Epochs of the schedule.
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Stop at the end of the first epoch that ends after this many minutes.
    #[arg(long, value_name = "M", value_parser = parse_minutes)]
    pub minutes: Option<f64>,
    /// Images per device and step.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Base learning rate (for a total batch of 512).
    #[arg(long, value_name = "BASE_LR")]
    pub lr: Option<f64>,
    /// Input side (ImageFolder) or image side (synthetic).
    #[arg(long, value_name = "N")]
    pub image_size: Option<usize>,
    /// Seed.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Data-loader workers.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Continue the run in `--out` from its last checkpoint (with the recipe saved there).
    #[arg(long)]
    pub resume: bool,
}

impl Args {
    /// Parses the arguments after the program name; an error (or `--help`) comes back as the
    /// text clap would print.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let args: Self = crate::classify::parse_args("train", args)?;
        args.check()?;
        Ok(args)
    }

    /// The process's arguments; prints help or the error and exits as clap does (0 for
    /// `--help`, 2 for a bad argument).
    pub fn from_env() -> Self {
        let args = <Self as clap::Parser>::parse();
        if let Err(message) = args.check() {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
        args
    }

    /// What clap cannot say: `--resume` takes the recipe from the run it continues.
    fn check(&self) -> Result<(), String> {
        if self.resume {
            let fixed = [
                ("--data", self.data.is_some()),
                ("--preset", self.preset.is_some()),
                ("--config", self.config.is_some()),
                ("--weights", self.weights.is_some()),
                ("--epochs", self.epochs.is_some()),
                ("--batch-size", self.batch_size.is_some()),
                ("--lr", self.lr.is_some()),
                ("--image-size", self.image_size.is_some()),
                ("--seed", self.seed.is_some()),
            ];
            let given: Vec<&str> = fixed
                .iter()
                .filter(|(_, on)| *on)
                .map(|(f, _)| *f)
                .collect();
            if !given.is_empty() {
                return Err(format!(
                    "--resume continues with the recipe saved in {}/config.json; drop {}",
                    self.out.display(),
                    given.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The recipe these arguments ask for (without `--resume`).
    pub fn train_config(&self) -> Result<TrainConfig, String> {
        let mut config = TrainConfig::synthetic();
        if let Some(root) = &self.data {
            let size = self.image_size.unwrap_or(224);
            let (classes, _, _) = data::image_folders(root)?;
            let model = VssmConfig::preset("tiny-s1")
                .map_err(|e| e.to_string())?
                .with_num_classes(classes.len());
            config = TrainConfig::new(
                model,
                Task::ImageFolder {
                    root: root.clone(),
                    classes,
                    size,
                },
            );
        } else if let (Some(size), Task::Synthetic { train, val, .. }) =
            (self.image_size, &config.task)
        {
            config.task = Task::Synthetic {
                train: *train,
                val: *val,
                size,
            };
        }
        let classes = config.task.classes().len();
        match (&self.preset, &self.config) {
            (Some(name), _) => {
                let model = VssmConfig::preset(name).map_err(|e| format!("--preset: {e}"))?;
                config.model = model.with_num_classes(classes);
            }
            (None, Some(path)) => config.model = read_config(path)?.with_num_classes(classes),
            (None, None) => {}
        }
        if let Some(epochs) = self.epochs {
            config.epochs = epochs;
            config.warmup_epochs = config.warmup_epochs.min(epochs);
        }
        if let Some(batch) = self.batch_size {
            config.batch_size = batch;
        }
        if let Some(lr) = self.lr {
            // warm-up and final rates keep their ratio to the base rate
            let ratio = lr / config.base_lr;
            config.base_lr = lr;
            config.warmup_lr *= ratio;
            config.min_lr *= ratio;
        }
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        config.devices = self.devices.len();
        Ok(config)
    }
}

/// `--minutes`: a positive number.
fn parse_minutes(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(minutes) if minutes > 0.0 => Ok(minutes),
        _ => Err(format!("--minutes: expected a number > 0, found {value:?}")),
    }
}

fn parse_devices(value: &str) -> Result<Vec<usize>, String> {
    let expected =
        || format!("--devices: expected a count (2) or a list of indices (0,2), found {value:?}");
    let devices: Vec<usize> = if value.contains(',') {
        value
            .split(',')
            .map(|v| v.trim().parse().map_err(|_| expected()))
            .collect::<Result<_, _>>()?
    } else {
        let n: usize = value.parse().map_err(|_| expected())?;
        (0..n).collect()
    };
    if devices.is_empty() {
        return Err(expected());
    }
    Ok(devices)
}

/// Where progress goes: burn-train's TUI (when stdout is a terminal) or lines written to a
/// stream by [`PlainRenderer`].
pub enum Progress {
    /// burn-train's default renderer (its TUI in a terminal).
    Default,
    /// Plain lines, one per epoch and split, and one every `every` seconds.
    Plain(Box<dyn Write + Send + Sync>, Duration),
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The output folder.
    pub out: PathBuf,
    /// The recipe used.
    pub config_text: String,
    /// Backend and devices, in words.
    pub setup: String,
    /// What `--weights` did (`None` without it).
    pub weights: Option<String>,
    /// Epochs finished (including those of a resumed run).
    pub epochs_done: usize,
    /// Final validation accuracy of the trained model, in [0, 1].
    pub val_accuracy: f64,
    /// Validation images.
    pub val_count: usize,
    /// Wall time of this process's training, seconds.
    pub seconds: f64,
    /// Parameters of the model.
    pub parameters: usize,
}

/// Runs `train`: [`Args::recipe`], then [`run_with`].
pub fn run(args: &Args, progress: Progress) -> Result<Summary, String> {
    run_with(&args.recipe()?, args, progress)
}

impl Args {
    /// The recipe of this run: the one saved in `--out` with `--resume`, else
    /// [`Args::train_config`].
    pub fn recipe(&self) -> Result<TrainConfig, String> {
        if !self.resume {
            return self.train_config();
        }
        let path = self.out.join("config.json");
        let mut config = TrainConfig::load(&path)
            .map_err(|e| format!("--resume: cannot read {}: {e}", path.display()))?;
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        if config.devices != self.devices.len() {
            return Err(format!(
                "--resume: the run used {} device(s) (its learning rates and steps depend on it), \
                 found --devices {:?}",
                config.devices, self.devices
            ));
        }
        Ok(config)
    }
}

/// Trains with `config` on the backend and devices of `args`, into `args.out`.
pub fn run_with(config: &TrainConfig, args: &Args, progress: Progress) -> Result<Summary, String> {
    let config = config.clone();
    config.validate().map_err(|e| format!("recipe:\n{e}"))?;
    for &device in &args.devices {
        args.backend.probe(device)?;
    }
    match args.backend {
        BackendName::NdArray => {
            let devices = vec![burn::backend::ndarray::NdArrayDevice::Cpu; args.devices.len()];
            fit::<burn::backend::Autodiff<burn::backend::NdArray>>(
                &config,
                args,
                progress,
                devices,
                "NdArray (CPU)",
            )
        }
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            let devices = match args.devices.as_slice() {
                [0] => vec![WgpuDevice::DefaultDevice],
                list => list.iter().map(|&i| WgpuDevice::DiscreteGpu(i)).collect(),
            };
            fit::<burn::backend::Autodiff<burn::backend::Wgpu>>(
                &config, args, progress, devices, "Wgpu",
            )
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            let devices = args
                .devices
                .iter()
                .map(|&i| burn::backend::cuda::CudaDevice::new(i))
                .collect();
            fit::<burn::backend::Autodiff<burn::backend::Cuda>>(
                &config, args, progress, devices, "Cuda",
            )
        }
        #[cfg(feature = "rocm")]
        BackendName::Rocm => {
            let devices = args
                .devices
                .iter()
                .map(|&i| burn::backend::rocm::RocmDevice::new(i))
                .collect();
            fit::<burn::backend::Autodiff<burn::backend::Rocm>>(
                &config, args, progress, devices, "Rocm",
            )
        }
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "--backend {other:?} is not compiled in: rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        )),
    }
}

/// A dataset of labelled images.
pub type ImageSet = Arc<dyn Dataset<LabeledImage>>;

/// The training and validation datasets of a task.
pub fn datasets(task: &Task, seed: u64) -> Result<(ImageSet, ImageSet), String> {
    Ok(match task {
        Task::Synthetic { train, val, size } => (
            Arc::new(SyntheticCorners {
                len: *train,
                size: *size,
                seed,
            }),
            Arc::new(SyntheticCorners {
                len: *val,
                size: *size,
                seed: seed ^ 0x5E_ED0F_7A1D,
            }),
        ),
        Task::ImageFolder { root, classes, .. } => {
            let (found, train, val) = data::image_folders(root)?;
            if &found != classes {
                return Err(format!(
                    "{}: the class folders changed since the run started: {classes:?} → {found:?}",
                    root.display()
                ));
            }
            (Arc::new(train), Arc::new(val))
        }
    })
}

/// The training and validation batchers of a task.
pub fn batchers(task: &Task, seed: u64) -> (ImageBatcher, ImageBatcher) {
    let size = task.image_size();
    match task {
        Task::Synthetic { .. } => (
            ImageBatcher::new(Transform::Identity, size, seed),
            ImageBatcher::new(Transform::Identity, size, seed),
        ),
        Task::ImageFolder { .. } => (
            ImageBatcher::new(Transform::RandomResizedCropFlip, size, seed),
            ImageBatcher::new(Transform::ResizeCenterCrop, size, seed),
        ),
    }
}

/// Loads a checkpoint into `model`; when its classifier has another number of classes, keeps
/// `model`'s freshly initialised classifier and says so.
pub fn load_weights<B: Backend>(model: Vssm<B>, path: &Path) -> Result<(Vssm<B>, String), String> {
    let mut dict = StateDict::from_file(path).map_err(|e| e.to_string())?;
    let own = model.state_dict();
    let mut message = format!("loaded {}", path.display());
    for (ours, theirs) in [
        (
            "classifier.head.weight",
            ["classifier.head.weight", "head.weight"],
        ),
        (
            "classifier.head.bias",
            ["classifier.head.bias", "head.bias"],
        ),
    ] {
        let own_tensor = &own.tensors[ours];
        for key in theirs {
            let differs = dict
                .tensors
                .get(key)
                .is_some_and(|t| t.shape != own_tensor.shape);
            if differs {
                let old = dict
                    .tensors
                    .remove(key)
                    .map(|t| t.shape)
                    .unwrap_or_default();
                if ours.ends_with("weight") {
                    message = format!(
                        "{message}; classifier re-initialised: the checkpoint has {} classes, \
                         the task {}",
                        old[0], own_tensor.shape[0]
                    );
                }
                dict.tensors.insert(ours.to_string(), own_tensor.clone());
            }
        }
    }
    let model = model.load_state_dict(dict).map_err(|e| e.to_string())?;
    Ok((model, message))
}

/// Stops after the first epoch that ends past the time budget.
#[derive(Clone)]
struct TimeBudget {
    start: Instant,
    limit: Duration,
}

impl EarlyStoppingStrategy for TimeBudget {
    fn should_stop(&mut self, _epoch: usize, _store: &EventStoreClient) -> bool {
        self.start.elapsed() >= self.limit
    }
}

/// The last epoch with a model checkpoint in `out/checkpoint`.
pub fn last_checkpoint(out: &Path) -> Option<usize> {
    std::fs::read_dir(out.join("checkpoint"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("model-")?
                .strip_suffix(".mpk")?
                .parse::<usize>()
                .ok()
        })
        .max()
}

fn fit<B>(
    config: &TrainConfig,
    args: &Args,
    progress: Progress,
    devices: Vec<B::Device>,
    backend: &str,
) -> Result<Summary, String>
where
    B: AutodiffBackend + SelectiveScanBackend,
    B::InnerBackend: SelectiveScanBackend,
{
    let out = &args.out;
    let resume_from = if args.resume {
        Some(last_checkpoint(out).ok_or_else(|| {
            format!(
                "--resume: no checkpoint in {}",
                out.join("checkpoint").display()
            )
        })?)
    } else {
        None
    };
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    config
        .save(out.join("config.json"))
        .map_err(|e| format!("--out {}: {e}", out.display()))?;
    B::seed(&devices[0], config.seed);

    let (train_set, val_set) = datasets(&config.task, config.seed)?;
    let train_len = train_set.len();
    let val_len = val_set.len();
    let (train_batcher, val_batcher) = batchers(&config.task, config.seed);
    let train_loader: Arc<dyn DataLoader<B, ImageBatch<B>>> = DataLoaderBuilder::new(train_batcher)
        .batch_size(config.batch_size)
        .shuffle(config.seed)
        .num_workers(config.workers)
        .set_device(devices[0].clone())
        .build(train_set);
    let val_loader: Arc<dyn DataLoader<B::InnerBackend, ImageBatch<B::InnerBackend>>> =
        DataLoaderBuilder::new(val_batcher.clone())
            .batch_size(config.batch_size)
            .num_workers(config.workers)
            .set_device(devices[0].clone())
            .build(val_set.clone());

    let vssm: Vssm<B> = config.model.init(&devices[0]);
    let (vssm, weights) = match &args.weights {
        Some(path) if resume_from.is_none() => {
            let (vssm, message) = load_weights(vssm, path)?;
            (vssm, Some(message))
        }
        _ => (vssm, None),
    };
    let parameters = vssm.num_params();
    let model = VssmClassifier {
        vssm,
        label_smoothing: config.label_smoothing,
    };
    let (decayed, _) = decay_groups(&model.vssm);
    let optimizer = config
        .optimizer()
        .init::<B, VssmClassifier<B>>(decayed.into_iter().map(|p| p.id));
    let learner = Learner::new(model, optimizer, config.schedule(train_len));

    let mut training = SupervisedTraining::new(out, train_loader, val_loader)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(IterationSpeedMetric::new())
        .with_file_checkpointer(NamedMpkFileRecorder::<FullPrecisionSettings>::new())
        .num_epochs(config.epochs)
        .summary();
    if let Progress::Plain(stream, every) = progress {
        training = training.renderer(PlainRenderer::new(stream, every));
    }
    if let Some(epoch) = resume_from {
        training = training.checkpoint(epoch);
    }
    let start = Instant::now();
    if let Some(minutes) = args.minutes {
        training = training.early_stopping(TimeBudget {
            start,
            limit: Duration::from_secs_f64(minutes * 60.0),
        });
    }
    if devices.len() > 1 {
        training = training.with_training_strategy(TrainingStrategy::Default(
            ExecutionStrategy::MultiDevice(devices.clone(), MultiDeviceOptim::OptimMainDevice),
        ));
    }
    let result = training.launch(learner);
    let seconds = start.elapsed().as_secs_f64();
    let model = result.model.vssm;

    // Final validation, and the files `classify` reads.
    let mut correct = 0usize;
    let mut sample = (Vec::new(), Vec::new(), Vec::new());
    let eval_device = model.devices()[0].clone();
    let sample_len = val_len.min(64);
    for start in (0..val_len).step_by(config.batch_size) {
        let items: Vec<LabeledImage> = (start..(start + config.batch_size).min(val_len))
            .filter_map(|i| val_set.get(i))
            .collect();
        let batch: ImageBatch<B::InnerBackend> =
            burn::data::dataloader::batcher::Batcher::batch(&val_batcher, items, &eval_device);
        let labels = read_f32(batch.targets.clone().float())?;
        let predicted = read_f32(model.forward(batch.images.clone()).argmax(1).float())?;
        correct += labels
            .iter()
            .zip(&predicted)
            .filter(|(a, b)| a == b)
            .count();
        if sample.1.len() < sample_len {
            let take = (sample_len - sample.1.len()).min(labels.len());
            let x = read_f32(batch.images.narrow(0, 0, take))?;
            sample.0.extend(x);
            sample.1.extend(&labels[..take]);
            sample.2.extend(&predicted[..take]);
        }
    }
    let size = config.task.image_size();
    let (x, labels, predictions) = sample;
    let files = || -> std::io::Result<()> {
        model
            .state_dict()
            .save_safetensors(out.join("model.safetensors"))?;
        config.model.save(out.join("model.json"))?;
        let n = labels.len();
        let tensor = |values: Vec<f32>, shape: Vec<usize>| StateTensor { shape, values };
        StateDict {
            tensors: [
                ("x".to_string(), tensor(x, vec![n, 3, size, size])),
                ("labels".to_string(), tensor(labels, vec![n])),
                ("predictions".to_string(), tensor(predictions, vec![n])),
            ]
            .into(),
        }
        .save_safetensors(out.join("val-sample.safetensors"))
    };
    files().map_err(|e| format!("--out {}: {e}", out.display()))?;

    Ok(Summary {
        out: out.clone(),
        config_text: config.to_string(),
        setup: format!("backend {backend}, {} device(s)", devices.len()),
        weights,
        epochs_done: last_checkpoint(out).unwrap_or(0),
        val_accuracy: correct as f64 / val_len.max(1) as f64,
        val_count: val_len,
        seconds,
        parameters,
    })
}

/// Renders burn-train's progress as plain lines: one per split at the end of every epoch, and
/// one every `every` while training.
pub struct PlainRenderer {
    out: Mutex<Box<dyn Write + Send + Sync>>,
    every: Duration,
    last: Instant,
    names: HashMap<String, String>,
    train: Vec<(String, String)>,
    valid: Vec<(String, String)>,
}

impl PlainRenderer {
    /// Lines go to `out`.
    pub fn new(out: Box<dyn Write + Send + Sync>, every: Duration) -> Self {
        Self {
            out: Mutex::new(out),
            every,
            last: Instant::now(),
            names: HashMap::new(),
            train: Vec::new(),
            valid: Vec::new(),
        }
    }

    fn line(&self, split: &str, item: &TrainingProgress, metrics: &[(String, String)]) {
        let mut line = format!(
            "[{split}] epoch {}/{}",
            item.global_progress.items_processed, item.global_progress.items_total
        );
        if let Some(p) = &item.progress {
            line += &format!(" items {}/{}", p.items_processed, p.items_total);
        }
        if let Some(iteration) = item.iteration {
            line += &format!(" iteration {iteration}");
        }
        for (name, value) in metrics {
            line += &format!(" | {name} {value}");
        }
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn record(
        names: &HashMap<String, String>,
        into: &mut Vec<(String, String)>,
        state: MetricState,
    ) {
        let entry = match state {
            MetricState::Generic(entry) | MetricState::Numeric(entry, _) => entry,
        };
        let id = format!("{:?}", entry.metric_id);
        let name = names.get(&id).cloned().unwrap_or(id);
        let value = entry.serialized_entry.formatted;
        match into.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => into.push((name, value)),
        }
    }
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, state: MetricState) {
        Self::record(&self.names, &mut self.train, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        Self::record(&self.names, &mut self.valid, state);
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let epoch_done = item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total);
        if epoch_done || self.last.elapsed() >= self.every {
            self.last = Instant::now();
            self.line("train", &item, &self.train);
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let epoch_done = item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total);
        if epoch_done {
            self.line("valid", &item, &self.valid);
        }
    }
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        Self::record(&self.names, &mut self.valid, state);
    }

    fn render_test(&mut self, item: EvaluationProgress, _: Vec<ProgressType>) {
        self.line("test", &(&item).into(), &self.valid);
    }
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(format!("{:?}", definition.metric_id), definition.name);
    }
}
