//! Checkpoint import and export with upstream's key names.
//!
//! - [`StateDict::from_file`] reads upstream's `.pth` release files (a `torch.save` dict whose
//!   `model` entry is the state dict; the other entries — optimizer, config, … — are ignored),
//!   plain state-dict `.pth` files, and `.safetensors`. Every float dtype is read as f32.
//! - [`Vssm::load_state_dict`] is strict: it checks every key before touching the model and
//!   returns one [`LoadError`] listing every missing, unexpected and mis-shaped key with the
//!   expected and found shapes. Accepted spellings besides the canonical
//!   `classification/models/vmamba.py` names: the vanilla (v0) names (`patch_embed.proj`,
//!   `ln_1`, `self_attention`, top-level `norm`/`head`), the one-file `vmamba.py` names
//!   (`downsample.1`/`.2` for patch merging, grouped `x_proj.weight` `[K·(R+2N), d_inner]`,
//!   `dt_projs.weight` `[K·d_inner, R]`, `dt_projs.bias` `[K·d_inner]`), and 1×1-conv-shaped
//!   linear weights `[out, in, 1, 1]`.
//! - [`Vssm::state_dict`] exports the parameters under upstream's names and layouts (PyTorch
//!   `[out, in]` linear weights), and [`StateDict::save_safetensors`] writes them.
//! - Burn's own record format works as for any module (`Module::save_file` / `load_file`);
//!   [`save_record`] / [`load_record`] use the named MessagePack recorder at full precision.
//!
//! Burn module paths map to upstream keys by a fixed table ([`upstream_name`]); linear weights
//! are transposed (Burn stores `[in, out]`).

// A load error lists every bad key and is returned once per file: its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, RecorderError};
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::state_dict::{StateDict, StateTensor};
use super::vssm::Vssm;

/// A checkpoint that could not be read or does not fit the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadError {
    /// The file, when one was read.
    pub path: Option<PathBuf>,
    /// Reading or decoding failed.
    pub read: Option<String>,
    /// Keys the model needs that the file lacks: `(key, expected shape)`.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Keys in the file the model does not have: `(key, shape)`.
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// `(key, expected shape, found shape)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Two spellings of one parameter: `(canonical key, the file's keys)`.
    pub duplicated: Vec<(String, Vec<String>)>,
}

impl LoadError {
    pub(super) fn read(path: &Path, message: impl fmt::Display) -> Self {
        Self {
            path: Some(path.to_path_buf()),
            read: Some(message.to_string()),
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.read.is_none()
            && self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.duplicated.is_empty()
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "checkpoint {} ", p.display())?,
            None => write!(f, "state dict ")?,
        }
        if let Some(read) = &self.read {
            return write!(f, "could not be read: {read}");
        }
        writeln!(f, "does not fit the model (nothing was loaded):")?;
        for (key, expected, found) in &self.mismatched {
            writeln!(
                f,
                "  wrong shape: {key}: expected {expected:?}, found {found:?}"
            )?;
        }
        for (key, expected) in &self.missing {
            writeln!(f, "  missing: {key} (expected shape {expected:?})")?;
        }
        for (key, found) in &self.unexpected {
            writeln!(f, "  unexpected: {key} (shape {found:?})")?;
        }
        for (key, spellings) in &self.duplicated {
            writeln!(f, "  given twice: {key} as {spellings:?}")?;
        }
        write!(
            f,
            "  ({} wrong shape, {} missing, {} unexpected, {} duplicated)",
            self.mismatched.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.duplicated.len()
        )
    }
}

impl std::error::Error for LoadError {}

/// The upstream name of a Burn field, given the struct that owns it.
pub fn upstream_name<'a>(container: &str, field: &'a str) -> &'a str {
    match (container, field) {
        ("Struct:LayerNorm", "gamma") => "weight",
        ("Struct:LayerNorm", "beta") => "bias",
        ("Struct:Ss2d", "a_logs") => "A_logs",
        ("Struct:Ss2d", "ds") => "Ds",
        ("Struct:PatchEmbed", "conv1") => "0",
        ("Struct:PatchEmbed", "norm1") => "2",
        ("Struct:PatchEmbed", "conv2") => "5",
        ("Struct:PatchEmbed", "norm2") => "7",
        ("Struct:ConvDownsample", "conv") => "1",
        ("Struct:ConvDownsample", "norm") => "3",
        // An enum module's variant is a level of Burn's path, not of upstream's key.
        (container, _) if container.starts_with("Enum:") => "",
        _ => field,
    }
}

/// The upstream key of the parameter being visited, and whether it is a linear weight (stored
/// transposed by Burn).
#[derive(Default)]
struct PathTracker {
    names: Vec<String>,
    containers: Vec<String>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.names.push(upstream_name(container, name).to_string());
        self.containers.push(container.to_string());
    }

    fn exit(&mut self) {
        self.names.pop();
        self.containers.pop();
    }

    fn key(&self) -> String {
        let names: Vec<&str> = self
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.is_empty())
            .collect();
        names.join(".")
    }

    fn is_linear_weight(&self) -> bool {
        self.containers.last().map(String::as_str) == Some("Struct:Linear")
            && self.names.last().map(String::as_str) == Some("weight")
    }
}

/// Every parameter's upstream key and upstream shape.
struct Expected {
    path: PathTracker,
    params: Vec<(String, Vec<usize>, bool)>,
    ids: Vec<ParamId>,
}

impl<B: Backend> ModuleVisitor<B> for Expected {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        // The lazy shape: listing keys draws no parameter that is not drawn yet.
        let mut shape = param.lazy_shape().dims::<D>().to_vec();
        let linear = self.path.is_linear_weight();
        if linear {
            shape.reverse();
        }
        self.params.push((self.path.key(), shape, linear));
        self.ids.push(param.id);
    }
}

/// Collects the parameters' values in upstream layout.
struct Exporter {
    path: PathTracker,
    dict: StateDict,
}

impl<B: Backend> ModuleVisitor<B> for Exporter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let (shape, data) = if self.path.is_linear_weight() {
            let t = tensor.transpose();
            (t.dims().to_vec(), t.into_data())
        } else {
            (tensor.dims().to_vec(), tensor.into_data())
        };
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("the data was converted to f32 on the line above");
        self.dict
            .tensors
            .insert(self.path.key(), StateTensor { shape, values });
    }
}

/// Replaces every parameter by the checked tensor of the same key.
struct Loader {
    path: PathTracker,
    values: HashMap<String, StateTensor>,
}

impl<B: Backend> ModuleMapper<B> for Loader {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let linear = self.path.is_linear_weight();
        let key = self.path.key();
        let Some(entry) = self.values.remove(&key) else {
            unreachable!("{key}: every parameter's key is matched before the loader runs");
        };
        // The entry is in upstream layout; Burn's linear weight is its transpose.
        let data = TensorData::new(entry.values, entry.shape);
        let t = Tensor::<B, D>::from_data(data, &param.lazy_device());
        let t = if linear { t.transpose() } else { t };
        // A parameter not drawn yet is replaced without drawing it: it would have been made in
        // the device's default float dtype, which `from_data` gives too. One already read
        // keeps its dtype (a module cast to f16, say). Device, require-grad and the load
        // mapper come from the parameter (`transform_for_load`, as Burn's own record loading).
        let t = if param.is_initialized() {
            t.cast(param.val().dtype())
        } else {
            t
        };
        let id = param.id;
        param.transform_for_load(t, id)
    }
}

/// Spellings a file key may have, besides the canonical one, and whether a reshape (same
/// element count) is accepted for it.
fn canonical_candidates(key: &str) -> Vec<(String, bool)> {
    let mut k = key.to_string();
    // Vanilla (v0) names, always unambiguous.
    for (from, to) in [
        ("patch_embed.proj.", "patch_embed.0."),
        ("patch_embed.norm.", "patch_embed.2."),
    ] {
        if let Some(rest) = k.strip_prefix(from) {
            k = format!("{to}{rest}");
        }
    }
    k = k
        .replace(".ln_1.", ".norm.")
        .replace(".self_attention.", ".op.");
    for (from, to) in [("norm.", "classifier.norm."), ("head.", "classifier.head.")] {
        if let Some(rest) = k.strip_prefix(from) {
            k = format!("{to}{rest}");
        }
    }
    let mut out = vec![(k.clone(), false)];
    // One-file vmamba.py: patch merging as Sequential(PatchMerge, LayerNorm, Linear).
    for (from, to) in [
        (".downsample.1.", ".downsample.norm."),
        (".downsample.2.", ".downsample.reduction."),
    ] {
        if k.contains(from) {
            out.push((k.replace(from, to), false));
        }
    }
    // Grouped-linear spellings of the per-direction projections.
    for (from, to) in [
        (".op.x_proj.weight", ".op.x_proj_weight"),
        (".op.dt_projs.weight", ".op.dt_projs_weight"),
        (".op.dt_projs.bias", ".op.dt_projs_bias"),
    ] {
        if let Some(prefix) = k.strip_suffix(from) {
            out.push((format!("{prefix}{to}"), true));
        }
    }
    out
}

/// Every parameter's upstream key and shape (PyTorch layout), in module order.
pub fn expected_keys<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut visitor = Expected {
        path: PathTracker::default(),
        params: Vec::new(),
        ids: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.params.into_iter().map(|(k, s, _)| (k, s)).collect()
}

/// One parameter of a module: its Burn id, upstream key and upstream shape (PyTorch layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterKey {
    /// The id Burn's optimisers and gradients use.
    pub id: ParamId,
    /// The upstream key (`layers.0.blocks.0.op.A_logs`).
    pub key: String,
    /// The upstream shape (linear weights `[out, in]`).
    pub shape: Vec<usize>,
}

/// Every parameter's id, upstream key and upstream shape, in module order: what an optimiser
/// needs to apply upstream's per-name rules (weight-decay groups, for example).
pub fn parameter_keys<B: Backend, M: Module<B>>(module: &M) -> Vec<ParameterKey> {
    let mut visitor = Expected {
        path: PathTracker::default(),
        params: Vec::new(),
        ids: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor
        .params
        .into_iter()
        .zip(visitor.ids)
        .map(|((key, shape, _), id)| ParameterKey { id, key, shape })
        .collect()
}

/// A module's parameters under upstream's names and layouts.
pub fn state_dict<B: Backend, M: Module<B>>(module: &M) -> StateDict {
    let mut exporter = Exporter {
        path: PathTracker::default(),
        dict: StateDict::default(),
    };
    module.visit(&mut exporter);
    exporter.dict
}

/// Loads upstream-named weights into any module of this crate (strict: the module is
/// returned only if every key fits; nothing is changed otherwise).
pub fn load_state_dict<B: Backend, M: Module<B>>(
    module: M,
    dict: StateDict,
) -> Result<M, LoadError> {
    let mut visitor = Expected {
        path: PathTracker::default(),
        params: Vec::new(),
        ids: Vec::new(),
    };
    module.visit(&mut visitor);
    let expected: HashMap<String, (Vec<usize>, bool)> = visitor
        .params
        .iter()
        .map(|(k, s, l)| (k.clone(), (s.clone(), *l)))
        .collect();

    let mut error = LoadError::default();
    let mut found: HashMap<String, Vec<(String, StateTensor)>> = HashMap::new();
    let mut mis_shaped = Vec::new();
    for (key, tensor) in dict.tensors {
        let candidates = canonical_candidates(&key);
        let Some((canonical, reshape_ok)) =
            candidates.iter().find(|(c, _)| expected.contains_key(c))
        else {
            error.unexpected.push((key, tensor.shape));
            continue;
        };
        let (want, linear) = &expected[canonical];
        let numel: usize = want.iter().product();
        let one_by_one = *linear
            && tensor.shape.len() == 4
            && tensor.shape[2..] == [1, 1]
            && tensor.shape[..2] == want[..];
        if tensor.shape == *want || ((*reshape_ok || one_by_one) && tensor.values.len() == numel) {
            let fitted = StateTensor {
                shape: want.clone(),
                values: tensor.values,
            };
            found
                .entry(canonical.clone())
                .or_default()
                .push((key, fitted));
        } else {
            mis_shaped.push(canonical.clone());
            error.mismatched.push((key, want.clone(), tensor.shape));
        }
    }
    let mut values = HashMap::new();
    for (key, shape, _) in &visitor.params {
        match found.remove(key) {
            None if mis_shaped.contains(key) => {}
            None => error.missing.push((key.clone(), shape.clone())),
            Some(mut spellings) if spellings.len() == 1 => {
                values.insert(key.clone(), spellings.remove(0).1);
            }
            Some(spellings) => error
                .duplicated
                .push((key.clone(), spellings.into_iter().map(|(k, _)| k).collect())),
        }
    }
    if !error.is_empty() {
        return Err(error);
    }
    let mut loader = Loader {
        path: PathTracker::default(),
        values,
    };
    Ok(module.map(&mut loader))
}

impl<B: Backend> Vssm<B> {
    /// Every parameter's upstream key and shape (PyTorch layout), in module order.
    pub fn expected_keys(&self) -> Vec<(String, Vec<usize>)> {
        expected_keys(self)
    }

    /// The parameters under upstream's names and layouts.
    pub fn state_dict(&self) -> StateDict {
        state_dict(self)
    }

    /// Loads upstream-named weights (strict: the model is returned only if every key fits).
    pub fn load_state_dict(self, dict: StateDict) -> Result<Self, LoadError> {
        load_state_dict(self, dict)
    }

    /// Reads a checkpoint file ([`StateDict::from_file`]) and loads it strictly.
    pub fn load_checkpoint(self, path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let dict = StateDict::from_file(path)?;
        self.load_state_dict(dict).map_err(|e| LoadError {
            path: Some(path.to_path_buf()),
            ..e
        })
    }
}

/// Saves any module in Burn's named MessagePack record format, full precision
/// (`path` gets the `.mpk` extension).
pub fn save_record<B: Backend, M: Module<B>>(
    module: M,
    path: impl Into<PathBuf>,
) -> Result<(), RecorderError> {
    module.save_file(
        path.into(),
        &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
    )
}

/// Loads a record written by [`save_record`] into a module of the same structure.
pub fn load_record<B: Backend, M: Module<B>>(
    module: M,
    path: impl Into<PathBuf>,
    device: &B::Device,
) -> Result<M, RecorderError> {
    module.load_file(
        path.into(),
        &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
        device,
    )
}
