//! The VMamba modules: cross-scan/merge, SS2D and whole models against fixtures made by
//! upstream's own PyTorch code (`scripts/make_model_fixtures.py`), presets, configs and
//! checkpoint import, on NdArray and Wgpu.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::wgpu::WgpuRuntime;
use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_fusion::Fusion;
use burn_vmamba::SelectiveScanBackend;
use burn_vmamba::model::{
    ConfigError, DtRank, ForwardType, Layout, Ss2dConfig, StateDict, StateTensor, VssmConfig,
    cross_merge, cross_scan, drop_path, load_state_dict, parameter_keys, state_dict,
};
use rstest::rstest;

/// `burn::backend::Wgpu` as users get it without and with burn's `fusion` feature (Burn 0.21's
/// definitions), both tested in one build.
type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type WgpuFusion = Fusion<Wgpu>;
// The alias is one of the two, by the feature (a type error here if Burn changes it).
#[cfg(feature = "fusion")]
const _: fn(burn::backend::Wgpu) -> WgpuFusion = |x| x;
#[cfg(not(feature = "fusion"))]
const _: fn(burn::backend::Wgpu) -> Wgpu = |x| x;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model")
}

/// max |a − e| / max |e|; NaN is never a pass.
fn rel_err(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, x| m.max(f64::from(x.abs())));
    let err = actual.iter().zip(expected).fold(0.0f64, |m, (a, e)| {
        let d = f64::from(a - e).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    err / scale.max(f64::MIN_POSITIVE)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

fn tensor<B: Backend, const D: usize>(t: &StateTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.values.clone(), t.shape.clone()), device)
}

fn seeded<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let mut state = seed;
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

// ---------------------------------------------------------------- cross-scan / cross-merge

#[test]
fn cross_scan_matches_the_worked_example_of_spec_2_6() {
    let device = Default::default();
    let x = Tensor::<NdArray, 4>::from_data(
        TensorData::new((0..6).map(|v| v as f32).collect(), [1, 1, 2, 3]),
        &device,
    );
    let xs = values(cross_scan(x.clone()));
    let expected = [
        [0., 1., 2., 3., 4., 5.],
        [0., 3., 1., 4., 2., 5.],
        [5., 4., 3., 2., 1., 0.],
        [5., 2., 4., 1., 3., 0.],
    ];
    assert_eq!(xs, expected.concat());
    let merged = values(cross_merge(cross_scan(x.clone()), 2, 3));
    assert_eq!(merged, values(x.mul_scalar(4.0)));
}

#[rstest]
#[case(1, 1)]
#[case(2, 3)]
#[case(5, 3)]
#[case(4, 7)]
#[case(7, 1)]
fn cross_merge_is_the_adjoint_of_cross_scan_on_non_square_maps(
    #[case] height: usize,
    #[case] width: usize,
) {
    let device = Default::default();
    let (batch, channels) = (2, 3);
    let x = seeded::<NdArray, 4>([batch, channels, height, width], 1, &device);
    let y = seeded::<NdArray, 4>([batch, 4, channels, height * width], 2, &device);
    let lhs: f32 = values((cross_scan(x.clone()) * y.clone()).sum())[0];
    let rhs: f32 = values((x * cross_merge(y, height, width)).sum())[0];
    assert!(
        (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
        "<scan x, y> = {lhs}, <x, merge y> = {rhs}"
    );
}

#[test]
fn gradients_flow_through_cross_scan_and_cross_merge() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    let (height, width) = (3, 5);
    let x = seeded::<B, 4>([1, 2, height, width], 3, &device).require_grad();
    let y = seeded::<B, 4>([1, 4, 2, height * width], 4, &device);
    let grads = (cross_scan(x.clone()) * y.clone()).sum().backward();
    let dx = values(x.grad(&grads).expect("x is tracked"));
    assert_eq!(dx, values(cross_merge(y.clone().inner(), height, width)));

    let y = y.require_grad();
    let x = x.inner();
    let x = Tensor::<B, 4>::from_inner(x);
    let grads = (cross_merge(y.clone(), height, width) * x.clone())
        .sum()
        .backward();
    let dy = values(y.grad(&grads).expect("y is tracked"));
    assert_eq!(dy, values(cross_scan(x.inner())));
}

// ---------------------------------------------------------------- configs and presets

/// Hand count of every tensor; equal to `sum(p.numel())` of upstream's factories.
#[rstest]
#[case("vanilla-tiny", 22_893_448)]
#[case("vanilla-small", 44_417_416)]
#[case("vanilla-base", 76_254_056)]
#[case("tiny-s2", 30_705_832)]
#[case("small-s2", 50_147_752)]
#[case("base-s2", 88_557_800)]
#[case("tiny-s1", 30_249_064)]
#[case("small-s1", 49_012_840)]
#[case("base-s1", 86_614_504)]
fn preset_parameter_counts_equal_spec(#[case] name: &str, #[case] params: usize) {
    let config = VssmConfig::preset(name).expect("known preset");
    let model = config.init::<NdArray>(&Default::default());
    // Counted from the upstream keys' shapes, which are read without drawing any weight
    // (`Module::num_params` reads every parameter, drawing the whole preset).
    let count: usize = parameter_keys(&model)
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    assert_eq!(count, params, "{name}");
    let mut drawn = DrawnParams(0);
    model.visit(&mut drawn);
    assert_eq!(
        drawn.0, 0,
        "{name}: listing the keys drew {} parameters",
        drawn.0
    );
}

/// How many float parameters of a module have been initialised (drawn or loaded).
struct DrawnParams(usize);

impl<B: Backend> ModuleVisitor<B> for DrawnParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 += usize::from(param.is_initialized());
    }
}

#[test]
fn preset_names_of_upstream_are_accepted_and_unknown_ones_listed() {
    let by_factory = VssmConfig::preset("vmamba_tiny_s1l8").unwrap();
    let by_ckpt = VssmConfig::preset("vssm1_tiny_0230s").unwrap();
    assert_eq!(by_factory.depths, by_ckpt.depths);
    let err = VssmConfig::preset("tiny").unwrap_err();
    match &err {
        ConfigError::UnknownPreset { name, known } => {
            assert_eq!(name, "tiny");
            assert!(known.contains(&"tiny-s1") && known.contains(&"vanilla-base"));
        }
        other => panic!("expected UnknownPreset, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("\"tiny\"") && message.contains("tiny-s1"),
        "{message}"
    );
}

#[test]
fn upstream_keywords_give_the_released_t_s1l8_config() {
    let kwargs = serde_json::json!({
        "depths": [2, 2, 8, 2], "dims": 96, "drop_path_rate": 0.2, "patch_size": 4, "in_chans": 3,
        "num_classes": 1000, "ssm_d_state": 1, "ssm_ratio": 1.0, "ssm_dt_rank": "auto",
        "ssm_act_layer": "silu", "ssm_conv": 3, "ssm_conv_bias": false, "ssm_drop_rate": 0.0,
        "ssm_init": "v0", "forward_type": "v05_noz", "mlp_ratio": 4.0, "mlp_act_layer": "gelu",
        "mlp_drop_rate": 0.0, "gmlp": false, "patch_norm": true, "norm_layer": "ln2d",
        "downsample_version": "v3", "patchembed_version": "v2", "use_checkpoint": false,
        "posembed": false, "imgsize": 224
    });
    let config = VssmConfig::from_upstream(&kwargs).unwrap();
    let preset = VssmConfig::preset("tiny-s1").unwrap();
    assert_eq!(config.to_string(), preset.to_string());
}

#[test]
fn upstream_keywords_with_unsupported_values_name_key_value_and_choices() {
    let kwargs = serde_json::json!({
        "forward_type": "v052d", "norm_layer": "bn", "downsample_version": "v9", "typo_key": 1,
        "dims": [8, 16], "depths": [1, 1, 1]
    });
    let err = VssmConfig::from_upstream(&kwargs).unwrap_err();
    let fields: Vec<String> = err
        .clone()
        .problems()
        .into_iter()
        .map(|p| p.field)
        .collect();
    for field in [
        "typo_key",
        "dims",
        "norm_layer",
        "downsample_version",
        "forward_type",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "no problem names {field}: {fields:?}"
        );
    }
    let err = err.to_string();
    for needle in [
        "forward_type: \"v052d\"",
        "v05",
        "_noz",
        "norm_layer",
        "\"bn\"",
        "ln2d",
        "downsample_version",
        "\"v9\"",
        "typo_key",
        "dims: expected 3 entries",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn forward_type_suffixes_are_parsed_in_upstream_order() {
    use burn_vmamba::model::{Gate, OutNorm};
    let ft = ForwardType::parse("v05_noz").unwrap();
    assert_eq!(
        (ft.gate, ft.out_norm, ft.out_act),
        (Gate::None, OutNorm::LayerNorm, false)
    );
    let ft = ForwardType::parse("v3_nozact").unwrap();
    assert_eq!(ft.gate, Gate::Linear);
    let ft = ForwardType::parse("v2_onnone_oact").unwrap();
    assert_eq!(
        (ft.gate, ft.out_norm, ft.out_act),
        (Gate::Silu, OutNorm::None, true)
    );
    assert!(
        ForwardType::parse("v05_noz_onnone").is_err(),
        "upstream leaves v05_noz unparsed here"
    );
    assert!(ForwardType::parse("xv1a").is_err());
}

#[test]
fn configs_round_trip_through_json() {
    use burn::config::Config;
    let config = VssmConfig::preset("vanilla-tiny")
        .unwrap()
        .with_ssm_dt_rank(DtRank::Fixed(5));
    let path = std::env::temp_dir().join(format!("vmamba-config-{}.json", std::process::id()));
    config.save(&path).unwrap();
    let back = VssmConfig::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(back.to_string(), config.to_string());
}

// ---------------------------------------------------------------- SS2D vs upstream

fn read_fixture(name: &str) -> (StateDict, HashMap<String, String>) {
    let path = fixtures().join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    (StateDict::from_file(&path).unwrap(), meta)
}

fn ss2d_config(kwargs: &serde_json::Value) -> Ss2dConfig {
    let ft = ForwardType::parse(kwargs["forward_type"].as_str().unwrap()).unwrap();
    let get = |k: &str| kwargs.get(k).cloned();
    let mut config = Ss2dConfig::new(kwargs["d_model"].as_u64().unwrap() as usize)
        .with_d_state(kwargs["d_state"].as_u64().unwrap() as usize)
        .with_ssm_ratio(kwargs["ssm_ratio"].as_f64().unwrap())
        .with_gate(ft.gate)
        .with_out_norm(ft.out_norm)
        .with_out_act(ft.out_act)
        .with_conv_bias(ft.vanilla || get("conv_bias").and_then(|v| v.as_bool()).unwrap_or(true));
    if let Some(rank) = get("dt_rank").and_then(|v| v.as_u64()) {
        config = config.with_dt_rank(DtRank::Fixed(rank as usize));
    }
    if get("channel_first").and_then(|v| v.as_bool()) == Some(true) {
        config = config.with_layout(Layout::ChannelFirst);
    }
    config
}

/// Replaces every parameter by its gradient, so `state_dict` names the gradients.
struct ToGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleMapper<B> for ToGrads<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| Tensor::from_inner(t.grad(self.grads).expect("every parameter is tracked")))
    }
}

fn check_ss2d<B: AutodiffBackend + SelectiveScanBackend>(name: &str, device: &B::Device) {
    let (mut fixture, meta) = read_fixture(name);
    let kwargs: serde_json::Value = serde_json::from_str(&meta["kwargs"]).unwrap();
    let take = |d: &mut StateDict, k: &str| d.tensors.remove(k).unwrap_or_else(|| panic!("{k}"));
    let x = take(&mut fixture, "x");
    let dout = take(&mut fixture, "dout");
    let y_ref = take(&mut fixture, "y");
    let grads_ref: StateDict = StateDict {
        tensors: fixture
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|k| (k.to_string(), v.clone())))
            .collect(),
    };
    fixture.tensors.retain(|k, _| !k.starts_with("grad."));
    let module = ss2d_config(&kwargs).init::<B>(device);
    let module = load_state_dict(module, fixture).unwrap_or_else(|e| panic!("{name}: {e}"));

    let x = tensor::<B, 4>(&x, device).require_grad();
    let y = module.forward(x.clone());
    let loss = (y.clone() * tensor::<B, 4>(&dout, device)).sum();
    let grads = loss.backward();
    let mut checks = vec![("y".to_string(), values(y), y_ref.values.clone())];
    checks.push((
        "x".into(),
        values(x.grad(&grads).unwrap()),
        grads_ref.tensors["x"].values.clone(),
    ));
    let param_grads = state_dict(&module.map(&mut ToGrads::<B> { grads: &grads }));
    assert_eq!(
        param_grads.tensors.len() + 1,
        grads_ref.tensors.len(),
        "{name}: parameter sets differ"
    );
    for (key, got) in param_grads.tensors {
        let want = &grads_ref.tensors[&key];
        assert_eq!(got.shape, want.shape, "{name}: grad {key}");
        checks.push((key, got.values, want.values.clone()));
    }
    for (what, got, want) in checks {
        let err = rel_err(&got, &want);
        println!("{name}: {what} {err:.2e}");
        // f32 on both sides, different summation orders (grouped matmuls, the scan).
        assert!(
            err <= 1e-4,
            "{name}: {what} differs from upstream by {err:.3e}"
        );
    }
}

#[rstest]
fn ss2d_output_and_every_gradient_equal_upstream(
    #[values(
        "ss2d_v05_noz_channel_first",
        "ss2d_v0_gate",
        "ss2d_v3_gate_channel_last"
    )]
    name: &str,
    #[values("ndarray", "wgpu", "wgpu-fusion")] backend: &str,
) {
    match backend {
        "ndarray" => check_ss2d::<Autodiff<NdArray>>(name, &Default::default()),
        "wgpu" => check_ss2d::<Autodiff<Wgpu>>(name, &Default::default()),
        _ => check_ss2d::<Autodiff<WgpuFusion>>(name, &Default::default()),
    }
}

#[test]
fn ss2d_layouts_compute_the_same_function() {
    type B = NdArray;
    let device = Default::default();
    let config = Ss2dConfig::new(8).with_d_state(3);
    let last = config.init::<B>(&device);
    // Not `last.clone()`: Burn parameters are lazy, and a clone taken before the first read
    // draws its own random values.
    let first = config.with_layout(Layout::ChannelFirst).init::<B>(&device);
    let first = load_state_dict(first, state_dict(&last)).unwrap();
    let x = seeded::<B, 4>([2, 5, 3, 8], 9, &device); // [batch, height, width, channels]
    let y_last = last.forward(x.clone());
    let y_first = first.forward(x.permute([0, 3, 1, 2])).permute([0, 2, 3, 1]);
    let err = rel_err(&values(y_first), &values(y_last));
    assert!(err < 1e-6, "channel-first vs channel-last: {err:.2e}");
}

// ---------------------------------------------------------------- whole models vs upstream

fn upstream_model<B: SelectiveScanBackend>(
    case: &str,
    weights: &str,
    device: &B::Device,
) -> burn_vmamba::model::Vssm<B> {
    let json = std::fs::read_to_string(fixtures().join(format!("{case}.json"))).unwrap();
    let config = VssmConfig::from_upstream(&serde_json::from_str(&json).unwrap()).unwrap();
    config
        .init::<B>(device)
        .load_checkpoint(fixtures().join(weights))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn check_logits<B: SelectiveScanBackend>(case: &str, weights: &str, device: &B::Device) {
    let model = upstream_model::<B>(case, weights, device);
    let input = StateDict::from_file(fixtures().join(format!("{case}.input.safetensors"))).unwrap();
    let expected =
        StateDict::from_file(fixtures().join(format!("{case}.logits.safetensors"))).unwrap();
    let logits = model.forward(tensor::<B, 4>(&input.tensors["x"], device));
    let err = rel_err(&values(logits), &expected.tensors["logits"].values);
    println!("{case} ({weights}): logits {err:.2e}");
    assert!(
        err <= 1e-4,
        "{case}: logits differ from upstream by {err:.3e}"
    );
}

/// Every fixture model on NdArray and Wgpu; on Wgpu with Burn's fusion the s1-like one (the
/// released T/S/B family). The other three under fusion would test Burn's fusion of Burn's own
/// ops (the scan's `Fusion<B>` op is the same in each, and its gradients are checked on all
/// three SS2D fixtures above), at 45-50 s of shader compilation each on llvmpipe.
#[rstest]
#[case::s1_ndarray("vssm_s1_like", "ndarray")]
#[case::s2_ndarray("vssm_s2_like", "ndarray")]
#[case::vanilla_ndarray("vssm_vanilla_like", "ndarray")]
#[case::v2_gate_ndarray("vssm_v2_gate", "ndarray")]
#[case::s1_wgpu("vssm_s1_like", "wgpu")]
#[case::s2_wgpu("vssm_s2_like", "wgpu")]
#[case::vanilla_wgpu("vssm_vanilla_like", "wgpu")]
#[case::v2_gate_wgpu("vssm_v2_gate", "wgpu")]
#[case::s1_wgpu_fusion("vssm_s1_like", "wgpu-fusion")]
fn model_logits_equal_upstream(#[case] case: &str, #[case] backend: &str) {
    let weights = format!("{case}.pth");
    match backend {
        "ndarray" => check_logits::<NdArray>(case, &weights, &Default::default()),
        "wgpu" => check_logits::<Wgpu>(case, &weights, &Default::default()),
        _ => check_logits::<WgpuFusion>(case, &weights, &Default::default()),
    }
}

#[test]
fn safetensors_checkpoint_loads_like_the_pth() {
    check_logits::<NdArray>(
        "vssm_s1_like",
        "vssm_s1_like.safetensors",
        &Default::default(),
    );
}

// ---------------------------------------------------------------- checkpoint import rules

fn small_model() -> burn_vmamba::model::Vssm<NdArray> {
    VssmConfig::new()
        .with_depths(vec![1, 1])
        .with_dims(vec![8, 16])
        .with_num_classes(5)
        .init::<NdArray>(&Default::default())
}

#[test]
fn a_bad_checkpoint_is_refused_with_every_bad_key_listed() {
    let model = small_model();
    let mut dict = model.state_dict();
    dict.tensors.remove("layers.0.blocks.0.op.A_logs");
    let ds = dict.tensors.get_mut("layers.1.blocks.0.op.Ds").unwrap();
    ds.shape = vec![ds.values.len() / 2, 2];
    dict.tensors.insert(
        "layers.0.blocks.0.op.x_proj_bias".into(),
        StateTensor {
            shape: vec![3],
            values: vec![0.0; 3],
        },
    );
    let err = small_model().load_state_dict(dict).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert_eq!(
        err.missing,
        vec![("layers.0.blocks.0.op.A_logs".to_string(), vec![4 * 16, 16])]
    );
    assert_eq!(
        err.unexpected,
        vec![("layers.0.blocks.0.op.x_proj_bias".to_string(), vec![3])]
    );
    assert_eq!(
        err.mismatched,
        vec![(
            "layers.1.blocks.0.op.Ds".to_string(),
            vec![128],
            vec![64, 2]
        )]
    );
    for needle in [
        "wrong shape: layers.1.blocks.0.op.Ds: expected [128], found [64, 2]",
        "missing: layers.0.blocks.0.op.A_logs",
        "unexpected: layers.0.blocks.0.op.x_proj_bias",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn other_spellings_of_upstream_keys_load_to_the_same_weights() {
    // Vanilla names, one-file vmamba.py names, grouped projections and 1×1-conv linear weights.
    let model = small_patch_merging_model();
    let canonical = model.state_dict();
    let mut renamed = StateDict::default();
    for (key, mut t) in canonical.tensors.clone() {
        let key = key
            .replace("patch_embed.0.", "patch_embed.proj.")
            .replace("blocks.0.norm.", "blocks.0.ln_1.")
            .replace(".op.", ".self_attention.")
            .replace("classifier.", "")
            .replace("downsample.norm.", "downsample.1.")
            .replace("downsample.reduction.", "downsample.2.");
        let key = if let Some(prefix) = key.strip_suffix("x_proj_weight") {
            t.shape = vec![t.shape[0] * t.shape[1], t.shape[2]];
            format!("{prefix}x_proj.weight")
        } else if let Some(prefix) = key.strip_suffix("dt_projs_bias") {
            t.shape = vec![t.values.len()];
            format!("{prefix}dt_projs.bias")
        } else if key.ends_with("mlp.fc1.weight") {
            t.shape.extend([1, 1]);
            key
        } else {
            key
        };
        renamed.tensors.insert(key, t);
    }
    let loaded = small_patch_merging_model()
        .load_state_dict(renamed)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.state_dict(), canonical);
}

/// A small model with an MLP and patch merging (downsample v1), fresh random weights.
fn small_patch_merging_model() -> burn_vmamba::model::Vssm<NdArray> {
    VssmConfig::new()
        .with_depths(vec![1, 1])
        .with_dims(vec![8, 16])
        .with_mlp_ratio(2.0)
        .with_downsample_version(burn_vmamba::model::DownsampleVersion::V1)
        .with_num_classes(5)
        .init::<NdArray>(&Default::default())
}

/// A module whose parameter panics if it is ever drawn.
#[derive(Module, Debug)]
struct NeverDrawn<B: Backend> {
    weight: Param<Tensor<B, 2>>,
}

#[test]
fn loading_replaces_parameters_without_drawing_them() {
    let device = Default::default();
    let probe = NeverDrawn::<Autodiff<NdArray>> {
        weight: Param::uninitialized(
            ParamId::new(),
            |_, _| panic!("the loader drew the parameter it replaces"),
            device,
            true,
            [2, 3].into(),
        ),
    };
    let keys = parameter_keys(&probe);
    assert_eq!(
        (keys[0].key.as_str(), &keys[0].shape[..]),
        ("weight", &[2, 3][..])
    );
    let want: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let mut dict = StateDict::default();
    dict.tensors.insert(
        "weight".into(),
        StateTensor {
            shape: vec![2, 3],
            values: want.clone(),
        },
    );
    let loaded = load_state_dict(probe, dict).unwrap();
    assert!(
        loaded.weight.val().is_require_grad(),
        "a trainable parameter stays trainable"
    );
    assert_eq!(values(loaded.weight.val()), want);
}

#[test]
fn two_spellings_of_one_parameter_are_refused() {
    let model = small_model();
    let mut dict = model.state_dict();
    let t = dict.tensors["layers.0.blocks.0.op.x_proj_weight"].clone();
    dict.tensors
        .insert("layers.0.blocks.0.op.x_proj.weight".into(), t);
    let err = small_model().load_state_dict(dict).unwrap_err();
    assert_eq!(err.duplicated.len(), 1, "{err}");
}

#[test]
fn safetensors_export_and_burn_records_round_trip() {
    let model = small_model();
    let dir = std::env::temp_dir().join(format!("vmamba-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    model
        .state_dict()
        .save_safetensors(dir.join("m.safetensors"))
        .unwrap();
    let from_st = small_model()
        .load_checkpoint(dir.join("m.safetensors"))
        .unwrap();
    assert_eq!(from_st.state_dict(), model.state_dict());
    burn_vmamba::model::save_record(model.clone(), dir.join("m")).unwrap();
    let from_record =
        burn_vmamba::model::load_record(small_model(), dir.join("m"), &Default::default()).unwrap();
    assert_eq!(from_record.state_dict(), model.state_dict());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_a_read_error() {
    let path = std::env::temp_dir().join(format!("vmamba-bad-{}.pth", std::process::id()));
    std::fs::write(&path, b"not a zip").unwrap();
    let err = small_model().load_checkpoint(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(
        err.read.is_some() && err.to_string().contains("could not be read"),
        "{err}"
    );
}

// ---------------------------------------------------------------- drop path

#[test]
fn drop_path_keeps_or_drops_whole_samples_in_training_only() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    B::seed(&device, 7);
    let x = Tensor::<B, 4>::ones([64, 2, 3, 4], &device);
    let y = values(drop_path(x.clone(), 0.5));
    let mut kept = 0;
    for sample in y.chunks(24) {
        assert!(
            sample.iter().all(|v| *v == sample[0]),
            "a sample is dropped or kept whole"
        );
        assert!(
            sample[0] == 0.0 || sample[0] == 2.0,
            "kept samples are scaled by 1/keep"
        );
        kept += usize::from(sample[0] == 2.0);
    }
    assert!((10..=54).contains(&kept), "kept {kept} of 64 at rate 0.5");
    let inference = values(drop_path(
        Tensor::<NdArray, 4>::ones([4, 1, 1, 1], &device),
        0.5,
    ));
    assert_eq!(inference, vec![1.0; 4]);
}

// ---------------------------------------------------------------- initialisation

#[test]
fn ss2d_initialisation_follows_upstream() {
    type B = NdArray;
    let device = Default::default();
    let config = Ss2dConfig::new(96).with_d_state(4).with_ssm_ratio(2.0);
    let (d_inner, rank) = (config.d_inner(), config.dt_rank());
    assert_eq!((d_inner, rank), (192, 6));
    let m = config.init::<B>(&device);
    let a_logs = values(m.a_logs.val());
    for row in a_logs.chunks(4) {
        let want: Vec<f32> = (1..=4).map(|n| (n as f32).ln()).collect();
        assert_eq!(row, &want[..], "A = -[1..N] in every row (S4D-real)");
    }
    assert!(values(m.ds.val()).iter().all(|d| *d == 1.0));
    // softplus(bias) = dt ∈ [1e-3, 1e-1] (up to f32 rounding).
    for b in values(m.dt_projs_bias.val()) {
        let dt = f64::from(b).exp().ln_1p();
        assert!((0.999e-3..=1.001e-1).contains(&dt), "dt {dt}");
    }
    let bound = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let x_proj = values(m.x_proj_weight.val());
    assert!(bound(&x_proj) <= 1.0 / (d_inner as f32).sqrt());
    assert!(
        bound(&x_proj) > 0.9 / (d_inner as f32).sqrt(),
        "uniform over the whole range"
    );
    assert!(bound(&values(m.dt_projs_weight.val())) <= (rank as f32).powf(-0.5));
    let conv = values(m.conv2d.as_ref().unwrap().weight.val());
    assert!(
        bound(&conv) <= 1.0 / 3.0,
        "kaiming-uniform(a=√5) on fan_in 9"
    );
    let w = values(m.in_proj.weight.val());
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        (0.019..0.021).contains(&std),
        "in_proj ~ N(0, 0.02²), measured std {std}"
    );
    let norm = m.out_norm.as_ref().unwrap();
    assert!(values(norm.gamma.val()).iter().all(|g| *g == 1.0));
}

// ---------------------------------------------------------------- inputs the model refuses

/// Every class of bad input gets an [`InputError`] from `try_forward` (and the same message
/// from `forward`'s panic), decided from the shape before any work: an empty dimension, the
/// wrong channel count, an image smaller than the stem's kernel or than a downsample's. The
/// smallest images that fit run and give finite logits.
#[test]
fn images_the_model_cannot_take_are_refused_by_shape() {
    use burn_vmamba::model::{DownsampleVersion, InputError};
    type B = NdArray;
    let device = Default::default();
    let model = |down: DownsampleVersion| {
        VssmConfig::new()
            .with_depths(vec![1, 1])
            .with_dims(vec![8, 16])
            .with_num_classes(5)
            .with_downsample_version(down)
            .init::<B>(&device)
    };
    let conv_down = model(DownsampleVersion::V2); // stem k = s = 4, then conv k = s = 2
    let check = |shape: [usize; 4]| conv_down.check_input(shape);
    assert_eq!(
        check([0, 3, 16, 16]),
        Err(InputError::Empty {
            dim: "batch",
            shape: [0, 3, 16, 16]
        })
    );
    assert_eq!(
        check([1, 3, 16, 0]),
        Err(InputError::Empty {
            dim: "width",
            shape: [1, 3, 16, 0]
        })
    );
    assert_eq!(
        check([1, 4, 16, 16]),
        Err(InputError::Channels {
            expected: 3,
            actual: 4,
            shape: [1, 4, 16, 16]
        })
    );
    assert_eq!(
        check([1, 3, 3, 16]),
        Err(InputError::TooSmall {
            layer: "patch_embed.0".into(),
            input: [3, 16],
            shape: [1, 3, 3, 16]
        })
    );
    let err = check([1, 3, 4, 16]).unwrap_err();
    assert_eq!(
        err,
        InputError::TooSmall {
            layer: "layers.0.downsample.1".into(),
            input: [1, 4],
            shape: [1, 3, 4, 16]
        }
    );
    assert!(
        err.to_string()
            .contains("images of 4×16 are too small for this model"),
        "{err}"
    );
    let images = |shape: [usize; 4]| Tensor::<B, 4>::zeros(shape, &device);
    assert_eq!(
        conv_down.try_forward(images([0, 3, 8, 8])).unwrap_err(),
        check([0, 3, 8, 8]).unwrap_err()
    );
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conv_down.forward(images([2, 3, 4, 4]))
    }))
    .expect_err("forward should panic");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("`layers.0.downsample.1` receives 1×1"),
        "{message}"
    );
    // The smallest that fit: 8×8 (stem 2×2, downsample 1×1); with patch merging (v1), which
    // pads to even, 4×4 (stem 1×1).
    let fits = [
        (&conv_down, [2, 3, 8, 8]),
        (&model(DownsampleVersion::V1), [2, 3, 4, 4]),
    ];
    for (m, shape) in fits {
        let logits = values(m.try_forward(images(shape)).unwrap());
        assert_eq!(logits.len(), 2 * 5);
        assert!(
            logits.iter().all(|x| x.is_finite()),
            "{shape:?}: {logits:?}"
        );
    }
}
