//! `model-parity`: the model fixtures (`tests/fixtures/model`: an upstream config, its
//! checkpoint, an input and the logits upstream's PyTorch code computed) through `classify` on
//! NdArray and on each chosen backend. Logits are compared with upstream's and with NdArray's
//! (max |x − y| / max |y|); the first forward's time (kernel compilation included on GPU
//! backends) is reported next to them. JSON at `<bench dir>/model_parity.json`.
//!
//! The default tolerance against NdArray, 1e-5, is the "exact f32" promise for GPU backends
//! (the test models' logits on Wgpu are within 5e-7 of NdArray's); against upstream it is the
//! test suite's 1e-3 (upstream ran in PyTorch, with its own summation orders).

use std::path::{Path, PathBuf};

use burn_vmamba::model::StateDict;
use vmamba::classify::BackendName;

#[derive(Debug, serde::Serialize)]
struct Record {
    model: String,
    backend: String,
    first_forward_ms: f64,
    ms_per_image: f64,
    error_vs_upstream: f64,
    error_vs_ndarray: f64,
}

/// max |x − y| / max |y|.
fn relative(x: &[f32], y: &[f32]) -> f64 {
    if x.len() != y.len() {
        return f64::INFINITY;
    }
    let scale = y.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let diff = x
        .iter()
        .zip(y)
        .fold(0.0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    diff / scale.max(f64::MIN_POSITIVE)
}

fn default_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model")
}

/// The models in `dir`: every `NAME.json` with `NAME.pth`, `NAME.input.safetensors` and
/// `NAME.logits.safetensors` beside it.
fn models(dir: &Path) -> Result<Vec<String>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("--fixtures {}: {e}", dir.display()))?;
    let mut names = vec![];
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        for suffix in [".pth", ".input.safetensors", ".logits.safetensors"] {
            let needed = dir.join(format!("{name}{suffix}"));
            if !needed.exists() {
                return Err(format!(
                    "--fixtures {}: {name}.json has no {}",
                    dir.display(),
                    needed.display()
                ));
            }
        }
        names.push(name.to_string());
    }
    names.sort();
    if names.is_empty() {
        return Err(format!(
            "--fixtures {}: no model fixture (NAME.json)",
            dir.display()
        ));
    }
    Ok(names)
}

fn classify(dir: &Path, model: &str, backend: &str) -> Result<vmamba::classify::Report, String> {
    let file = |suffix: &str| dir.join(format!("{model}{suffix}")).display().to_string();
    let argv = [
        "--backend".to_string(),
        backend.to_string(),
        "--config".to_string(),
        file(".json"),
        "--weights".to_string(),
        file(".pth"),
        "--input".to_string(),
        file(".input.safetensors"),
    ];
    let args = vmamba::classify::Args::parse(argv)?;
    vmamba::classify::run(&args).map_err(|e| format!("{model} on {backend}: {e}"))
}

/// `model-parity` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Comma-separated backends to compare with NdArray (default: every GPU backend compiled in).
    #[arg(long, value_name = "LIST")]
    pub backend: Option<String>,
    /// The model fixtures (default tests/fixtures/model).
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Largest accepted relative difference from NdArray's logits (default 1e-5).
    #[arg(long, value_name = "X")]
    pub tolerance: Option<f64>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let backends: Vec<String> = match &args.backend {
        Some(list) => list.split(',').map(str::to_string).collect(),
        None => {
            let mut all = vec!["wgpu".to_string()];
            if cfg!(feature = "cuda") {
                all.push("cuda".into());
            }
            if cfg!(feature = "rocm") {
                all.push("rocm".into());
            }
            all
        }
    };
    for b in &backends {
        BackendName::parse(b)?;
    }
    let tolerance = args.tolerance.unwrap_or(1e-5);
    let dir = args.fixtures.clone().unwrap_or_else(default_fixtures);
    let mut records = vec![];
    let mut failures = vec![];
    for model in models(&dir)? {
        let expected = StateDict::from_file(dir.join(format!("{model}.logits.safetensors")))
            .map_err(|e| e.to_string())?;
        let upstream = &expected
            .tensors
            .get("logits")
            .ok_or_else(|| format!("{model}.logits.safetensors has no `logits`"))?
            .values;
        let reference = classify(&dir, &model, "ndarray")?;
        for backend in std::iter::once("ndarray").chain(backends.iter().map(String::as_str)) {
            let report = if backend == "ndarray" {
                reference.clone()
            } else {
                classify(&dir, &model, backend)?
            };
            let record = Record {
                model: model.clone(),
                backend: backend.to_string(),
                first_forward_ms: report.first_ms,
                ms_per_image: report.ms_per_image,
                error_vs_upstream: relative(&report.logits, upstream),
                error_vs_ndarray: relative(&report.logits, &reference.logits),
            };
            println!(
                "{model} on {backend}: vs upstream {:.2e}, vs NdArray {:.2e}; first forward \
                 {:.0} ms, then {:.1} ms per image",
                record.error_vs_upstream,
                record.error_vs_ndarray,
                record.first_forward_ms,
                record.ms_per_image
            );
            if record.error_vs_upstream > 1e-3 {
                failures.push(format!(
                    "{model} on {backend}: {:.3e} from upstream's logits (tolerance 1e-3)",
                    record.error_vs_upstream
                ));
            }
            if record.error_vs_ndarray > tolerance {
                failures.push(format!(
                    "{model} on {backend}: {:.3e} from NdArray's logits (tolerance {tolerance:e})",
                    record.error_vs_ndarray
                ));
            }
            records.push(record);
        }
    }
    crate::write_bench_json("model_parity.json", &records)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("model parity failed:\n{}", failures.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    /// The fixtures are found and read; a directory without any is refused by name.
    #[test]
    fn fixtures_are_listed_and_checked() {
        let names = super::models(&super::default_fixtures()).unwrap();
        assert!(names.contains(&"vssm_s1_like".to_string()), "{names:?}");
        let empty = std::env::temp_dir().join(format!("vmamba-no-models-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let err = super::models(&empty).unwrap_err();
        assert!(err.contains("no model fixture"), "{err}");
        std::fs::remove_dir_all(&empty).ok();
    }

    #[test]
    fn relative_error_is_max_abs_over_max_ref() {
        assert_eq!(super::relative(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(super::relative(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }
}
