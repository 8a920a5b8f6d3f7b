//! Parity fixtures: one `.safetensors` per case, all f32 (the format below; the README's
//! xtask section and `scripts/make_scan_fixtures.py` write the same).
//!
//! Inputs `u, delta, A, B, C, dout` and optionally `D, delta_bias`; expected `y, du, ddelta, dA,
//! dB, dC` and `dD, ddelta_bias` when those inputs are present; metadata key `delta_softplus` =
//! `"true"`/`"false"`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use selective_scan::{ArgShapes, ScanProblem, ScanShape};

/// One fixture: the problem, the upstream gradient and the expected tensors by name.
pub struct Fixture {
    pub name: String,
    pub problem: ScanProblem,
    pub dy: Vec<f32>,
    pub expected: Vec<(String, Vec<f32>)>,
}

/// Every `*.safetensors` in `dir`, sorted by name.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        // Outputs of an earlier `--out` into the same folder are not cases.
        .filter(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            !stem.contains('.')
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .safetensors fixtures in {}", dir.display()));
    }
    Ok(files)
}

/// Reads one fixture; every problem with it is reported at once.
pub fn read(path: &Path) -> Result<Fixture, String> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: file name is not UTF-8", path.display()))?
        .to_string();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
    let (_, metadata) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut problems = vec![];
    let delta_softplus = match metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("delta_softplus"))
        .map(String::as_str)
    {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            problems.push(format!(
                "metadata delta_softplus must be \"true\" or \"false\", got {other:?}"
            ));
            false
        }
        None => {
            problems.push("metadata key delta_softplus is missing".to_string());
            false
        }
    };
    let mut get = |key: &str, required: bool| -> Option<(Vec<usize>, Vec<f32>)> {
        match tensors.tensor(key) {
            Ok(view) if view.dtype() == Dtype::F32 => Some((
                view.shape().to_vec(),
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )),
            Ok(view) => {
                problems.push(format!(
                    "tensor `{key}` must be F32, got {:?}",
                    view.dtype()
                ));
                None
            }
            Err(_) => {
                if required {
                    problems.push(format!("tensor `{key}` is missing"));
                }
                None
            }
        }
    };
    let u = get("u", true);
    let delta = get("delta", true);
    let a = get("A", true);
    let b = get("B", true);
    let c = get("C", true);
    let dout = get("dout", true);
    let d = get("D", false);
    let delta_bias = get("delta_bias", false);
    let mut expected = vec![];
    let mut wanted = vec!["y", "du", "ddelta", "dA", "dB", "dC"];
    if d.is_some() {
        wanted.push("dD");
    }
    if delta_bias.is_some() {
        wanted.push("ddelta_bias");
    }
    for key in wanted {
        if let Some((_, data)) = get(key, true) {
            expected.push((key.to_string(), data));
        }
    }
    let fail = |problems: &[String]| {
        format!(
            "{}: invalid fixture:\n  - {}",
            path.display(),
            problems.join("\n  - ")
        )
    };
    let (Some(u), Some(delta), Some(a), Some(b), Some(c), Some(dout)) = (u, delta, a, b, c, dout)
    else {
        return Err(fail(&problems));
    };
    if !problems.is_empty() {
        return Err(fail(&problems));
    }
    let shape = ScanShape::from_args(&ArgShapes {
        u: &u.0,
        delta: &delta.0,
        a: &a.0,
        b: &b.0,
        c: &c.0,
        d: d.as_ref().map(|t| &t.0[..]),
        delta_bias: delta_bias.as_ref().map(|t| &t.0[..]),
    })
    .map_err(|e| fail(&[e.to_string()]))?;
    if dout.0 != shape.bdl() {
        return Err(fail(&[format!(
            "tensor `dout` must have shape {:?}, got {:?}",
            shape.bdl(),
            dout.0
        )]));
    }
    let problem = ScanProblem {
        shape,
        u: u.1,
        delta: delta.1,
        a: a.1,
        b: b.1,
        c: c.1,
        d: d.map(|t| t.1),
        delta_bias: delta_bias.map(|t| t.1),
        delta_softplus,
    };
    problem.validate().map_err(|e| fail(&[e.to_string()]))?;
    Ok(Fixture {
        name,
        problem,
        dy: dout.1,
        expected,
    })
}

/// Writes tensors (all f32) to `path`.
pub fn write(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<(), String> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.to_string(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let out = safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
    std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-fixtures-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_bad_fixture_lists_every_problem_at_once() {
        let dir = temp_dir("bad");
        let path = dir.join("broken.safetensors");
        let u = vec![0.0f32; 2 * 4 * 3];
        let a = vec![-1.0f32; 4];
        let b = vec![0.5f32; 2 * 2 * 3];
        write(
            &path,
            &[
                ("u", vec![2, 4, 3], &u),
                ("delta", vec![2, 4, 3], &u),
                ("A", vec![4, 1], &a),
                ("B", vec![2, 2, 1, 3], &b),
            ],
            HashMap::from([("delta_softplus".to_string(), "yes".to_string())]),
        )
        .unwrap();
        let err = read(&path).err().expect("the fixture is incomplete");
        for needle in [
            "delta_softplus",
            "`C` is missing",
            "`dout` is missing",
            "`y` is missing",
            "`dB` is missing",
        ] {
            assert!(err.contains(needle), "{needle} not reported in:\n{err}");
        }
    }

    #[test]
    fn a_fixture_with_a_wrong_shape_names_the_argument() {
        let dir = temp_dir("shape");
        let path = dir.join("shape.safetensors");
        let bdl = vec![0.0f32; 2 * 4 * 3];
        let a = vec![-1.0f32; 3];
        let b = vec![0.5f32; 2 * 2 * 3];
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("u", vec![2, 4, 3], &bdl),
            ("delta", vec![2, 4, 3], &bdl),
            ("A", vec![3, 1], &a),
            ("B", vec![2, 2, 1, 3], &b),
            ("C", vec![2, 2, 1, 3], &b),
            ("dout", vec![2, 4, 3], &bdl),
        ];
        for name in ["y", "du", "ddelta"] {
            tensors.push((name, vec![2, 4, 3], &bdl));
        }
        tensors.push(("dA", vec![3, 1], &a));
        tensors.push(("dB", vec![2, 2, 1, 3], &b));
        tensors.push(("dC", vec![2, 2, 1, 3], &b));
        write(
            &path,
            &tensors,
            HashMap::from([("delta_softplus".to_string(), "true".to_string())]),
        )
        .unwrap();
        let err = read(&path)
            .err()
            .expect("A has the wrong number of channels");
        assert!(err.contains("`A` must have shape [4, 1]"), "{err}");
    }
}
