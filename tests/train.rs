//! `vmamba::train`: the recipe's pieces against independent facts (upstream's decay rule applied
//! by hand, timm's schedule formula, PyTorch's global-norm clipping), one optimiser step on
//! NdArray and Wgpu, the synthetic task, and short end-to-end runs of burn-train's Learner
//! (single device, two device handles, resume, then `classify` on the result).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams, Optimizer};
use burn::prelude::DeviceOps;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn_vmamba::SelectiveScanBackend;
use burn_vmamba::model::{StateDict, VssmConfig};
use rstest::rstest;
use std::time::Duration;
use vmamba::train::data::{ImageBatch, ImageBatcher, SyntheticCorners, Transform};
use vmamba::train::optim::{RecipeOptimizerConfig, WarmupCosine, decay_groups};

use vmamba::train::{Args, Progress, TrainConfig, VssmClassifier, last_checkpoint, run, run_with};

type Cpu = Autodiff<NdArray>;

/// A one-stage s1-family model small enough for a test: 16×16 images, 4×4 tokens.
fn tiny_model() -> VssmConfig {
    TrainConfig::synthetic()
        .model
        .with_dims(vec![8])
        .with_depths(vec![1])
}

fn classifier<B: SelectiveScanBackend>(device: &B::Device) -> VssmClassifier<B> {
    B::seed(device, 7);
    VssmClassifier {
        vssm: tiny_model().init(device),
        label_smoothing: 0.1,
    }
}

fn batch<B: Backend>(len: usize, device: &B::Device) -> ImageBatch<B> {
    let data = SyntheticCorners {
        len,
        size: 16,
        seed: 3,
    };
    let items = (0..len).filter_map(|i| data.get(i)).collect();
    ImageBatcher::new(Transform::Identity, 16, 0).batch(items, device)
}

fn recipe(grad_scale: f64) -> RecipeOptimizerConfig {
    let mut config = TrainConfig::synthetic().optimizer();
    config.grad_scale = grad_scale;
    config
}

fn loss_value<B: AutodiffBackend + SelectiveScanBackend>(
    model: &VssmClassifier<B>,
    batch: &ImageBatch<B>,
) -> f64 {
    let loss = model.forward_classification(batch.clone(), 0.1).loss;
    loss.into_scalar().to_f64_lossy()
}

trait ToF64 {
    fn to_f64_lossy(self) -> f64;
}
impl<E: burn::tensor::ElementConversion> ToF64 for E {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
}

fn one_step_lowers_loss<B: AutodiffBackend + SelectiveScanBackend>(device: &B::Device) {
    let model = classifier::<B>(device);
    let batch = batch::<B>(8, device);
    let before = loss_value(&model, &batch);
    let (decayed, _) = decay_groups(&model.vssm);
    let mut optimizer = recipe(1.0).init::<B, VssmClassifier<B>>(decayed.into_iter().map(|p| p.id));
    let output = model.forward_classification(batch.clone(), 0.1);
    let grads = GradientsParams::from_grads(output.loss.backward(), &model);
    let model = optimizer.step(1e-3, model, grads);
    let after = loss_value(&model, &batch);
    println!("loss {before:.5} -> {after:.5}");
    assert!(
        after < before - 1e-4,
        "one AdamW step at lr 1e-3 should lower the loss of its own batch: {before} -> {after}"
    );
}

#[test]
fn one_optimiser_step_lowers_the_loss_on_ndarray() {
    one_step_lowers_loss::<Cpu>(&Default::default());
}

#[test]
fn one_optimiser_step_lowers_the_loss_on_wgpu() {
    one_step_lowers_loss::<Autodiff<burn::backend::Wgpu>>(&Default::default());
}

/// Upstream's `set_weight_decay` on this model's upstream keys, written out by hand: 1-D
/// tensors and `.bias` names are exempt; `A_logs` and `dt_projs_bias` (2-D) decay.
#[test]
fn weight_decay_groups_are_upstreams() {
    let model = tiny_model()
        .with_patchembed_version(burn_vmamba::model::PatchEmbedVersion::V2)
        .init::<NdArray>(&Default::default());
    let (decay, no_decay) = decay_groups(&model);
    let names = |v: &[burn_vmamba::model::ParameterKey]| -> BTreeSet<String> {
        v.iter().map(|p| p.key.clone()).collect()
    };
    let block = "layers.0.blocks.0";
    let expected_decay: BTreeSet<String> = [
        "patch_embed.0.weight".to_string(),
        "patch_embed.5.weight".to_string(),
        format!("{block}.op.in_proj.weight"),
        format!("{block}.op.conv2d.weight"),
        format!("{block}.op.x_proj_weight"),
        format!("{block}.op.dt_projs_weight"),
        format!("{block}.op.dt_projs_bias"),
        format!("{block}.op.A_logs"),
        format!("{block}.op.out_proj.weight"),
        format!("{block}.mlp.fc1.weight"),
        format!("{block}.mlp.fc2.weight"),
        "classifier.head.weight".to_string(),
    ]
    .into();
    let expected_no_decay: BTreeSet<String> = [
        "patch_embed.0.bias".to_string(),
        "patch_embed.2.weight".to_string(),
        "patch_embed.2.bias".to_string(),
        "patch_embed.5.bias".to_string(),
        "patch_embed.7.weight".to_string(),
        "patch_embed.7.bias".to_string(),
        format!("{block}.norm.weight"),
        format!("{block}.norm.bias"),
        format!("{block}.op.Ds"),
        format!("{block}.op.out_norm.weight"),
        format!("{block}.op.out_norm.bias"),
        format!("{block}.norm2.weight"),
        format!("{block}.norm2.bias"),
        format!("{block}.mlp.fc1.bias"),
        format!("{block}.mlp.fc2.bias"),
        "classifier.norm.weight".to_string(),
        "classifier.norm.bias".to_string(),
        "classifier.head.bias".to_string(),
    ]
    .into();
    assert_eq!(names(&decay), expected_decay);
    assert_eq!(names(&no_decay), expected_no_decay);
}

/// Every parameter's values, by id.
struct Values(Vec<(ParamId, Vec<f32>)>);

impl<B: Backend> ModuleVisitor<B> for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param.val().into_data().convert::<f32>().into_vec().unwrap();
        self.0.push((param.id, values));
    }
}

fn values<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamId, Vec<f32>)> {
    let mut visitor = Values(Vec::new());
    module.visit(&mut visitor);
    visitor.0
}

/// With zero gradients Adam's update is 0, so a step only applies the decoupled decay:
/// `θ ← θ (1 − lr·wd)` on the decay group, nothing elsewhere.
#[test]
fn adamw_decays_exactly_the_decay_group() {
    let device = Default::default();
    let model = classifier::<Cpu>(&device);
    let (decayed, _) = decay_groups(&model.vssm);
    let decayed: BTreeSet<ParamId> = decayed.into_iter().map(|p| p.id).collect();
    let before = values(&model);
    let output = model.forward_classification(batch::<Cpu>(4, &device), 0.0);
    let grads = GradientsParams::from_grads((output.loss * 0.0).backward(), &model);
    let mut optimizer = recipe(1.0).init::<Cpu, VssmClassifier<Cpu>>(decayed.iter().copied());
    let lr = 0.1;
    let model = optimizer.step(lr, model, grads);
    let factor = 1.0 - lr as f32 * 0.05;
    for ((id, old), (_, new)) in before.iter().zip(values(&model)) {
        let want: Vec<f32> = if decayed.contains(id) {
            old.iter().map(|v| v * factor).collect()
        } else {
            old.clone()
        };
        for (n, w) in new.iter().zip(&want) {
            assert!((n - w).abs() <= 1e-6 * w.abs().max(1.0), "{id}: {n} vs {w}");
        }
    }
}

fn host_norm<M: Module<Cpu>>(model: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a>(&'a GradientsParams, f64);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
                let v: Vec<f32> = g.into_data().convert::<f32>().into_vec().unwrap();
                self.1 += v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
            }
        }
    }
    let mut norm = Norm(grads, 0.0);
    model.visit(&mut norm);
    norm.1.sqrt()
}

/// PyTorch's `clip_grad_norm_(parameters, 5.0)`: one norm over all gradients, every gradient
/// scaled by `5 / (norm + 1e-6)` when the norm is larger.
#[test]
fn gradients_are_clipped_to_a_global_norm_of_five() {
    let device = Default::default();
    let model = classifier::<Cpu>(&device);
    let output = model.forward_classification(batch::<Cpu>(4, &device), 0.0);
    let mut grads = GradientsParams::from_grads((output.loss * 1000.0).backward(), &model);
    let norm = host_norm(&model, &grads);
    assert!(norm > 5.0, "the test needs a large gradient, found {norm}");
    let optimizer = recipe(1.0).init::<Cpu, VssmClassifier<Cpu>>([]);
    let reported = optimizer.prepare(&model, &mut grads);
    assert!(
        (reported - norm).abs() <= 1e-4 * norm,
        "{reported} vs {norm}"
    );
    let clipped = host_norm(&model, &grads);
    assert!((clipped - 5.0).abs() < 1e-4, "after clipping: {clipped}");
}

/// burn-train's multi-device strategy sums the devices' gradients; with `grad_scale = 1/2`,
/// two devices that saw the same gradient update the model as one device does.
#[test]
fn two_device_gradients_are_averaged() {
    let device = Default::default();
    let model = classifier::<Cpu>(&device);
    let output = model.forward_classification(batch::<Cpu>(4, &device), 0.1);
    let backward = output.loss.backward();
    let single = GradientsParams::from_grads(backward, &model);
    let output = model.forward_classification(batch::<Cpu>(4, &device), 0.1);
    let first = GradientsParams::from_grads(output.loss.backward(), &model);
    let output = model.forward_classification(batch::<Cpu>(4, &device), 0.1);
    let second = GradientsParams::from_grads(output.loss.backward(), &model);
    let id = device.to_id();
    let multi = MultiGradientsParams {
        grads: vec![(first, id), (second, id)],
    };
    let (decayed, _) = decay_groups(&model.vssm);
    let ids: Vec<ParamId> = decayed.into_iter().map(|p| p.id).collect();
    let mut one = recipe(1.0).init::<Cpu, VssmClassifier<Cpu>>(ids.clone());
    let mut two = recipe(0.5).init::<Cpu, VssmClassifier<Cpu>>(ids);
    let a = values(&one.step(1e-3, model.clone(), single));
    let b = values(&two.step_multi(1e-3, model, multi));
    for ((id, x), (_, y)) in a.iter().zip(&b) {
        for (x, y) in x.iter().zip(y) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{id}: {x} vs {y}");
        }
    }
}

/// timm's `CosineLRScheduler` (warm-up prefix, per iteration), its formula evaluated here.
#[test]
fn schedule_warms_up_linearly_then_follows_the_cosine() {
    let mut schedule = WarmupCosine {
        base_lr: 1e-3,
        warmup_lr: 1e-6,
        min_lr: 1e-5,
        warmup_iters: 10,
        total_iters: 110,
        iteration: 0,
    };
    let lrs: Vec<f64> = (0..120)
        .map(|_| burn::optim::lr_scheduler::LrScheduler::step(&mut schedule))
        .collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
    assert!(close(lrs[0], 1e-6));
    assert!(close(lrs[5], 1e-6 + (1e-3 - 1e-6) * 0.5));
    assert!(close(lrs[10], 1e-3));
    assert!(close(lrs[60], 1e-5 + 0.5 * (1e-3 - 1e-5)));
    assert!(close(
        lrs[35],
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI / 4.0).cos())
    ));
    assert!(lrs[110..].iter().all(|&lr| close(lr, 1e-5)));
    assert!(lrs[10..110].windows(2).all(|w| w[1] <= w[0]));
}

#[test]
fn synthetic_task_is_deterministic_balanced_and_drawn_as_labelled() {
    let data = SyntheticCorners {
        len: 400,
        size: 32,
        seed: 11,
    };
    let again = data.clone();
    let other = SyntheticCorners {
        seed: 12,
        ..data.clone()
    };
    let mut labels = [0usize; 2];
    let mut first_colours = [0usize; SyntheticCorners::COLOURS.len()];
    let mut same_as_other = 0;
    for i in 0..data.len {
        let item = data.get(i).unwrap();
        assert_eq!(item.image, again.get(i).unwrap().image, "item {i} changed");
        if item.image == other.get(i).unwrap().image {
            same_as_other += 1;
        }
        let (label, first, second) = data.marks(i);
        assert_eq!(item.label, label);
        assert_eq!(label == 1, first == second, "item {i}");
        labels[label] += 1;
        first_colours[first] += 1;
        // Side-4 marks jittered by up to 2 px inside a 1-px border always cover (28, 3) and
        // (3, 28) of a 32×32 image.
        let colour = |x: u32, y: u32| item.image.get_pixel(x, y).0;
        assert_eq!(
            colour(28, 3),
            SyntheticCorners::COLOURS[first],
            "item {i} top-right"
        );
        assert_eq!(
            colour(3, 28),
            SyntheticCorners::COLOURS[second],
            "item {i} bottom-left"
        );
        assert!(
            !SyntheticCorners::COLOURS.contains(&colour(1, 1)),
            "item {i}: top-left is background"
        );
        assert!(
            !SyntheticCorners::COLOURS.contains(&colour(30, 30)),
            "item {i}: bottom-right is background"
        );
    }
    assert_eq!(labels, [200, 200]);
    let fair = 400 / first_colours.len();
    assert!(
        first_colours.iter().all(|&n| n.abs_diff(fair) <= fair / 5),
        "{first_colours:?}"
    );
    assert_eq!(same_as_other, 0, "another seed must give other images");
}

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("train-{name}"));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

/// A tiny run: 16×16 synthetic images, the test model, NdArray.
fn tiny_run(out: &Path, extra: &[&str]) -> vmamba::train::Summary {
    let model = out.with_extension("model.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    burn::config::Config::save(&tiny_model(), &model).unwrap();
    let mut argv: Vec<String> = [
        "--out",
        &out.display().to_string(),
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--resume") {
        argv.extend(["--config".to_string(), model.display().to_string()]);
    } else {
        argv.retain(|a| a == "--out" || a == &out.display().to_string());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::parse(argv).unwrap();
    let mut config = args.recipe().unwrap();
    if !args.resume {
        config.task = vmamba::train::Task::Synthetic {
            train: 64,
            val: 32,
            size: 16,
        };
    }
    let quiet = Progress::Plain(Box::new(std::io::sink()), Duration::from_secs(3600));
    run_with(&config, &args, quiet).unwrap()
}

fn lr_log(out: &Path, epoch: usize) -> String {
    let dir = out.join("train").join(format!("epoch-{epoch}"));
    let file = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("Learning"))
        .unwrap_or_else(|| panic!("no learning-rate log in {}", dir.display()));
    std::fs::read_to_string(file.path()).unwrap()
}

#[test]
fn resumed_run_continues_at_the_same_step_and_learning_rate() {
    let straight = out_dir("straight");
    tiny_run(&straight, &[]);
    let split = out_dir("split");
    // A budget of ~0 minutes stops after the first epoch.
    let first = tiny_run(&split, &["--minutes", "0.00001"]);
    assert_eq!(first.epochs_done, 1);
    assert_eq!(last_checkpoint(&split), Some(1));
    assert_eq!(lr_log(&split, 1), lr_log(&straight, 1));
    let resumed = tiny_run(&split, &["--resume"]);
    assert_eq!(resumed.epochs_done, 2);
    // burn-train 0.21's metric logger numbers a resumed run's epochs from 1 again, so the
    // resumed epoch's log is the newest one in the folder.
    let newest = std::fs::read_dir(split.join("train"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
        .unwrap()
        .file_name()
        .to_string_lossy()
        .trim_start_matches("epoch-")
        .parse::<usize>()
        .unwrap();
    assert_eq!(
        lr_log(&split, newest),
        lr_log(&straight, 2),
        "the epoch after --resume has the learning rates of the straight run's epoch 2"
    );
}

#[cfg(feature = "classify")]
#[rstest]
#[case::one_device("1")]
#[case::two_device_handles("2")]
fn trained_checkpoint_loads_in_classify_with_the_same_predictions(#[case] devices: &str) {
    let out = out_dir(&format!("classify-{devices}"));
    let summary = tiny_run(&out, &["--devices", devices]);
    assert_eq!(summary.epochs_done, 2);
    assert!((0.0..=1.0).contains(&summary.val_accuracy));
    let sample = StateDict::from_file(out.join("val-sample.safetensors")).unwrap();
    let predictions = &sample.tensors["predictions"].values;
    let argv = [
        "--config",
        &out.join("model.json").display().to_string(),
        "--weights",
        &out.join("model.safetensors").display().to_string(),
        "--input",
        &out.join("val-sample.safetensors").display().to_string(),
    ]
    .map(String::from);
    let report = vmamba::classify::run(&vmamba::classify::Args::parse(argv).unwrap()).unwrap();
    let classes = report.shape[1];
    let argmax: Vec<f32> = report
        .logits
        .chunks(classes)
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as f32
        })
        .collect();
    assert_eq!(&argmax, predictions);
}

#[test]
fn bad_arguments_are_refused_naming_the_flag() {
    let parse = |argv: &[&str]| Args::parse(argv.iter().map(|s| s.to_string())).unwrap_err();
    assert!(parse(&["--devices", "x"]).contains("--devices"));
    assert!(parse(&["--minutes", "0"]).contains("--minutes"));
    assert!(parse(&["--backend", "tpu"]).contains("--backend"));
    assert!(parse(&["--resume", "--lr", "1"]).contains("drop --lr"));
    let args = Args::parse(["--batch-size", "0"].map(String::from)).unwrap();
    let quiet = Progress::Plain(Box::new(std::io::sink()), Duration::from_secs(1));
    let err = run(&args, quiet).unwrap_err();
    assert!(err.contains("batch_size: expected ≥ 1, found 0"), "{err}");
}
