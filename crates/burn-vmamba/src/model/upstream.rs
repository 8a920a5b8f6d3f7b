//! Upstream's `VSSM(...)` keyword arguments → [`VssmConfig`], parsed once with clear errors.
//!
//! ```
//! use burn_vmamba::model::{Gate, Layout, VssmConfig};
//! let kwargs = serde_json::json!({
//!     "depths": [2, 2, 8, 2], "dims": 96, "ssm_d_state": 1, "ssm_ratio": 1.0,
//!     "ssm_conv_bias": false, "forward_type": "v05_noz", "norm_layer": "ln2d",
//!     "downsample_version": "v3", "patchembed_version": "v2",
//! });
//! let config = VssmConfig::from_upstream(&kwargs).unwrap();
//! assert_eq!(config.dims, vec![96, 192, 384, 768]);
//! assert_eq!((config.gate, config.norm_layer), (Gate::None, Layout::ChannelFirst));
//! ```

use serde_json::{Map, Value};

use super::config::{DownsampleVersion, DtRank, Gate, Layout, OutNorm, PatchEmbedVersion, SsmInit};
use super::vssm::VssmConfig;
use super::{ConfigError, ConfigProblem};

/// The base forward types that compute SS2D's cross-2D scan; they differ only in
/// upstream's implementation (einsum vs grouped conv, which CUDA extension).
pub const FORWARD_TYPE_BASES: &[&str] = &["v0", "v01", "v02", "v03", "v04", "v05", "v2", "v3"];

/// The `forward_type` suffixes understood, in the order upstream strips them.
pub const FORWARD_TYPE_SUFFIXES: &[&str] = &["_no32", "_oact", "_noz", "_nozact", "_onnone"];

/// SS2D's variant as parsed from an upstream `forward_type` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardType {
    /// Gate branch.
    pub gate: Gate,
    /// Out norm.
    pub out_norm: OutNorm,
    /// GELU after the out norm.
    pub out_act: bool,
    /// `v0`: upstream forces a conv bias and `d_conv = 3` whatever the keywords say.
    pub vanilla: bool,
}

impl ForwardType {
    /// Parses upstream's `forward_type`, e.g. `"v05_noz"`, `"v0"`, `"v2"`, `"v3_noz"`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let mut rest = value;
        let mut strip = |suffix: &str| match rest.strip_suffix(suffix) {
            Some(r) => {
                rest = r;
                true
            }
            None => false,
        };
        // Upstream's order: _no32, _oact, _noz, _nozact, then the out-norm suffixes.
        let _no32 = strip("_no32");
        let out_act = strip("_oact");
        let noz = strip("_noz");
        let nozact = strip("_nozact");
        let onnone = strip("_onnone");
        if !FORWARD_TYPE_BASES.contains(&rest) {
            return Err(ConfigProblem::new(
                "forward_type",
                format!(
                    "{value:?} is not supported: expected one of {} with optional suffixes {} \
                     (the other variants — unidi/bidi/cascade scans, xv*, m0, \
                     _ondwconv3/_oncnorm/_onsoftmax/_onsigmoid — are not implemented)",
                    FORWARD_TYPE_BASES.join(", "),
                    FORWARD_TYPE_SUFFIXES.join(", ")
                ),
            )
            .into());
        }
        let vanilla = rest == "v0";
        if vanilla && (value != "v0") {
            return Err(ConfigProblem::new(
                "forward_type",
                format!("{value:?}: upstream's v0 takes no suffix (expected \"v0\")"),
            )
            .into());
        }
        let gate = match (noz, nozact) {
            (true, _) => Gate::None,
            (false, true) => Gate::Linear,
            (false, false) => Gate::Silu,
        };
        let out_norm = if onnone {
            OutNorm::None
        } else {
            OutNorm::LayerNorm
        };
        Ok(Self {
            gate,
            out_norm,
            out_act,
            vanilla,
        })
    }
}

/// Keywords of upstream's `VSSM.__init__` that are accepted.
pub const UPSTREAM_KEYS: &[&str] = &[
    "depths",
    "dims",
    "patch_size",
    "in_chans",
    "num_classes",
    "ssm_d_state",
    "ssm_ratio",
    "ssm_dt_rank",
    "ssm_act_layer",
    "ssm_conv",
    "ssm_conv_bias",
    "ssm_drop_rate",
    "ssm_init",
    "forward_type",
    "mlp_ratio",
    "mlp_act_layer",
    "mlp_drop_rate",
    "gmlp",
    "drop_path_rate",
    "patch_norm",
    "norm_layer",
    "downsample_version",
    "patchembed_version",
    "use_checkpoint",
    "posembed",
    "imgsize",
    // Passed by upstream's build_vssm_model and swallowed by VSSM's **kwargs.
    "ssm_rank_ratio",
];

impl VssmConfig {
    /// Builds a config from upstream's `VSSM(...)` keyword arguments as a JSON object (missing
    /// keys take upstream's defaults). Every problem is reported at once, naming the key, the
    /// value and what is supported.
    pub fn from_upstream(kwargs: &Value) -> Result<Self, ConfigError> {
        let map = kwargs.as_object().ok_or_else(|| {
            ConfigProblem::new(
                "kwargs",
                format!("expected a JSON object of VSSM keywords, found {kwargs}"),
            )
        })?;
        let mut p = Parser {
            map,
            errors: Vec::new(),
        };
        let unknown: Vec<_> = map
            .keys()
            .filter(|k| !UPSTREAM_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            for key in unknown {
                p.errors.push(ConfigProblem::new(
                    key,
                    format!(
                        "unknown keyword; VSSM keywords are {}",
                        UPSTREAM_KEYS.join(", ")
                    ),
                ));
            }
        }
        let mut config = VssmConfig::new();
        if let Some(depths) = p.usize_list("depths") {
            config.depths = depths;
        }
        let stages = config.depths.len();
        match map.get("dims") {
            None => {}
            Some(Value::Number(n)) => match n.as_u64() {
                Some(c) => config.dims = (0..stages).map(|i| (c as usize) << i).collect(),
                None => p.errors.push(ConfigProblem::new(
                    "dims",
                    format!("expected an integer or a list, found {n}"),
                )),
            },
            Some(_) => {
                if let Some(dims) = p.usize_list("dims") {
                    config.dims = dims;
                }
            }
        }
        if config.dims.len() != stages {
            p.errors.push(ConfigProblem::new(
                "dims",
                format!(
                    "expected {stages} entries (one per entry of depths), found {}",
                    config.dims.len()
                ),
            ));
        }
        p.usize("patch_size", &mut config.patch_size);
        p.usize("in_chans", &mut config.in_chans);
        p.usize("num_classes", &mut config.num_classes);
        p.usize("ssm_d_state", &mut config.ssm_d_state);
        p.float("ssm_ratio", &mut config.ssm_ratio);
        match map.get("ssm_dt_rank") {
            None => {}
            Some(Value::String(s)) if s == "auto" => config.ssm_dt_rank = DtRank::Auto,
            Some(v) => match v.as_u64() {
                Some(r) if r > 0 => config.ssm_dt_rank = DtRank::Fixed(r as usize),
                _ => p.errors.push(ConfigProblem::new(
                    "ssm_dt_rank",
                    format!("expected \"auto\" or a positive integer, found {v}"),
                )),
            },
        }
        p.usize("ssm_conv", &mut config.ssm_conv);
        p.bool("ssm_conv_bias", &mut config.ssm_conv_bias);
        p.float("mlp_ratio", &mut config.mlp_ratio);
        p.float("drop_path_rate", &mut config.drop_path_rate);
        p.choice("ssm_act_layer", &["silu"]);
        p.choice("mlp_act_layer", &["gelu"]);
        p.zero("ssm_drop_rate");
        p.zero("mlp_drop_rate");
        p.literal(
            "gmlp",
            Value::Bool(false),
            "false (gMLP is not implemented)",
        );
        p.literal("patch_norm", Value::Bool(true), "true");
        p.literal(
            "posembed",
            Value::Bool(false),
            "false (no release uses a position embedding)",
        );
        if let Some(v) = p.choice("ssm_init", &["v0", "v1", "v2"]) {
            config.ssm_init = match v.as_str() {
                "v1" => SsmInit::V1,
                "v2" => SsmInit::V2,
                _ => SsmInit::V0,
            };
        }
        if let Some(v) = p.choice_ci("norm_layer", &["ln", "ln2d"]) {
            config.norm_layer = if v == "ln2d" {
                Layout::ChannelFirst
            } else {
                Layout::ChannelLast
            };
        }
        if let Some(v) = p.choice("downsample_version", &["v1", "v2", "v3", "none"]) {
            config.downsample_version = match v.as_str() {
                "v1" => DownsampleVersion::V1,
                "v3" => DownsampleVersion::V3,
                "none" => DownsampleVersion::None,
                _ => DownsampleVersion::V2,
            };
        }
        if let Some(v) = p.choice("patchembed_version", &["v1", "v2"]) {
            config.patchembed_version = if v == "v2" {
                PatchEmbedVersion::V2
            } else {
                PatchEmbedVersion::V1
            };
        }
        let forward_type = match map.get("forward_type") {
            None => Some("v2".to_string()),
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                p.errors.push(ConfigProblem::new(
                    "forward_type",
                    format!("expected a string, found {v}"),
                ));
                None
            }
        };
        if let Some(forward_type) = forward_type {
            match ForwardType::parse(&forward_type) {
                Ok(ft) => {
                    config.gate = ft.gate;
                    config.out_norm = ft.out_norm;
                    config.out_act = ft.out_act;
                    if ft.vanilla {
                        config.ssm_conv_bias = true;
                        config.ssm_conv = 3;
                        config.ssm_init = SsmInit::V0;
                        if config.norm_layer == Layout::ChannelFirst {
                            p.errors.push(ConfigProblem::new(
                                "norm_layer",
                                "forward_type \"v0\" works channel-last only: expected \"ln\", \
                                 found \"ln2d\"",
                            ));
                        }
                    }
                }
                Err(e) => p.errors.extend(e.problems()),
            }
        }
        if p.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(p.errors))
        }
    }
}

struct Parser<'a> {
    map: &'a Map<String, Value>,
    errors: Vec<ConfigProblem>,
}

impl Parser<'_> {
    fn usize(&mut self, key: &str, out: &mut usize) {
        if let Some(v) = self.map.get(key) {
            match v.as_u64() {
                Some(n) => *out = n as usize,
                None => self.errors.push(ConfigProblem::new(
                    key,
                    format!("expected an integer, found {v}"),
                )),
            }
        }
    }

    fn usize_list(&mut self, key: &str) -> Option<Vec<usize>> {
        let v = self.map.get(key)?;
        let list = v.as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        });
        if list.is_none() {
            self.errors.push(ConfigProblem::new(
                key,
                format!("expected a list of integers, found {v}"),
            ));
        }
        list
    }

    fn float(&mut self, key: &str, out: &mut f64) {
        if let Some(v) = self.map.get(key) {
            match v.as_f64() {
                Some(x) => *out = x,
                None => self.errors.push(ConfigProblem::new(
                    key,
                    format!("expected a number, found {v}"),
                )),
            }
        }
    }

    fn bool(&mut self, key: &str, out: &mut bool) {
        if let Some(v) = self.map.get(key) {
            match v.as_bool() {
                Some(b) => *out = b,
                None => self.errors.push(ConfigProblem::new(
                    key,
                    format!("expected true or false, found {v}"),
                )),
            }
        }
    }

    fn zero(&mut self, key: &str) {
        if let Some(v) = self.map.get(key)
            && v.as_f64() != Some(0.0)
        {
            self.errors.push(ConfigProblem::new(
                key,
                format!("only 0.0 is supported (no release uses dropout), found {v}"),
            ));
        }
    }

    fn literal(&mut self, key: &str, expected: Value, what: &str) {
        if let Some(v) = self.map.get(key)
            && *v != expected
        {
            self.errors.push(ConfigProblem::new(
                key,
                format!("only {what} is supported, found {v}"),
            ));
        }
    }

    fn choice_impl(&mut self, key: &str, supported: &[&str], fold_case: bool) -> Option<String> {
        let v = self.map.get(key)?;
        let s = v.as_str().map(|s| {
            if fold_case {
                s.to_lowercase()
            } else {
                s.to_string()
            }
        });
        match s {
            Some(s) if supported.contains(&s.as_str()) => Some(s),
            _ => {
                self.errors.push(ConfigProblem::new(
                    key,
                    format!("unsupported value {v}; supported: {}", supported.join(", ")),
                ));
                None
            }
        }
    }

    fn choice(&mut self, key: &str, supported: &[&str]) -> Option<String> {
        self.choice_impl(key, supported, false)
    }

    /// As [`Self::choice`], case-insensitive (upstream lower-cases `norm_layer`).
    fn choice_ci(&mut self, key: &str, supported: &[&str]) -> Option<String> {
        self.choice_impl(key, supported, true)
    }
}
