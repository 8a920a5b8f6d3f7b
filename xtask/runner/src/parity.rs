//! `cargo xtask parity`: every compiled-in backend against the f64 reference (built-in seeded
//! cases) or against fixtures produced elsewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use selective_scan::{RandomSpec, ScanGrads, ScanProblem, ScanShape, SplitMix64, reference};

use crate::backends::Path as Backend;
use crate::fixtures;

const DEFAULT_TOLERANCE: f64 = 2e-4;

/// A case to check: the problem, the upstream gradient and the expected tensors by name.
struct Case {
    name: String,
    problem: ScanProblem,
    dy: Vec<f32>,
    expected: Vec<(String, Vec<f64>)>,
}

/// The built-in seeded cases: VMamba's settings plus the edges that break scans.
fn builtin_cases() -> Vec<Case> {
    let vmamba = RandomSpec::default();
    let raw = RandomSpec {
        with_d: false,
        with_delta_bias: false,
        delta_softplus: false,
        delta_range: (0.01, 1.0),
        ..RandomSpec::default()
    };
    let threshold = RandomSpec {
        delta_range: (19.5, 20.5),
        ..RandomSpec::default()
    };
    let forgetful = RandomSpec {
        a_log_range: (20.0, 20.0),
        ..RandomSpec::default()
    };
    let a_log_minus_30 = RandomSpec {
        a_log_range: (-30.0, -30.0),
        ..RandomSpec::default()
    };
    let long_memory = RandomSpec::long_memory(true);
    let long_memory_raw = RandomSpec::long_memory(false);
    let list = [
        (
            "vmamba_t_stage1_n1_g4",
            ScanShape::new(1, 32, 3136, 1, 4),
            &vmamba,
        ),
        ("n16_g4", ScanShape::new(2, 16, 1000, 16, 4), &vmamba),
        ("odd_sizes", ScanShape::new(3, 6, 777, 3, 3), &vmamba),
        ("single_step", ScanShape::new(2, 4, 1, 2, 2), &vmamba),
        ("chunk_edge_513", ScanShape::new(2, 4, 513, 4, 1), &vmamba),
        ("long_4101", ScanShape::new(1, 4, 4101, 4, 2), &vmamba),
        ("raw_delta_no_skip", ScanShape::new(2, 4, 600, 2, 2), &raw),
        (
            "delta_at_softplus_threshold",
            ScanShape::new(1, 4, 600, 2, 2),
            &threshold,
        ),
        ("a_log_20", ScanShape::new(1, 4, 600, 2, 2), &forgetful),
        (
            "a_log_minus_30",
            ScanShape::new(1, 4, 600, 2, 2),
            &a_log_minus_30,
        ),
        (
            "long_memory_3136",
            ScanShape::new(1, 4, 3136, 4, 2),
            &long_memory,
        ),
        (
            "long_memory_raw_delta_3136",
            ScanShape::new(1, 4, 3136, 4, 2),
            &long_memory_raw,
        ),
    ];
    list.into_iter()
        .enumerate()
        .map(|(i, (name, s, spec))| {
            let problem = ScanProblem::random(s, spec, 1000 + i as u64);
            let dy = SplitMix64::new(2000 + i as u64).vec(s.bdl_len(), -1.0, 1.0);
            let (y, grads) = reference::backward(&problem, &dy);
            let mut expected = vec![("y".to_string(), y)];
            expected.extend(
                grads
                    .named()
                    .into_iter()
                    .map(|(n, v)| (n.to_string(), v.to_vec())),
            );
            Case {
                name: name.to_string(),
                problem,
                dy,
                expected,
            }
        })
        .collect()
}

fn fixture_cases(dir: &Path) -> Result<Vec<Case>, String> {
    let mut cases = vec![];
    let mut errors = vec![];
    for path in fixtures::list(dir)? {
        match fixtures::read(&path) {
            Ok(f) => cases.push(Case {
                name: f.name,
                problem: f.problem,
                dy: f.dy,
                expected: f
                    .expected
                    .into_iter()
                    .map(|(n, v)| (n, v.into_iter().map(f64::from).collect()))
                    .collect(),
            }),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors.join("\n"))
    }
}

/// The larger of `max |x − ref| / max |ref|` and the elementwise bound with its 10 % floor
/// (`reference::deviation`); NaN or a length mismatch counts as infinite error.
fn rel_err(actual: &[f64], expected: &[f64]) -> f64 {
    reference::deviation(actual, expected).worst()
}

fn outputs<T: Copy>(y: &[T], grads: &ScanGrads<T>) -> Vec<(&'static str, Vec<T>)> {
    let mut out = vec![("y", y.to_vec())];
    out.extend(grads.named().into_iter().map(|(n, v)| (n, v.to_vec())));
    out
}

fn shape_of(name: &str, s: &ScanShape) -> Vec<usize> {
    match name {
        "y" | "du" | "ddelta" => s.bdl().to_vec(),
        "dA" => s.dn().to_vec(),
        "dB" | "dC" => s.bgnl().to_vec(),
        _ => vec![s.channels],
    }
}

/// Computed tensors by name, widened to f64.
type Outputs = Vec<(&'static str, Vec<f64>)>;

const COLUMNS: [&str; 8] = ["y", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"];

/// `parity` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// One backend or path (`wgpu`, `cubecl-wgpu`, `cuda`, `cubecl-cuda`, …); default: every one
    /// compiled in.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Read the cases from DIR/*.safetensors (format: src/fixtures.rs) and compare with the
    /// expected tensors stored there, instead of the built-in cases against the f64 reference.
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Write each case's outputs to DIR/<case>.<backend>.safetensors.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Largest accepted error (default 2e-4).
    #[arg(long, value_name = "X")]
    pub tolerance: Option<f64>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let backends = Backend::select(args.backend.as_deref())?;
    if backends.iter().any(|b| b.uses_wgpu()) {
        crate::vulkan::require_driver()?;
    }
    let mut runtimes: Vec<_> = backends.iter().filter_map(|b| b.runtime()).collect();
    runtimes.dedup();
    for runtime in runtimes {
        runtime.probe()?;
    }
    let tolerance = args.tolerance.unwrap_or(DEFAULT_TOLERANCE);
    let out_dir = args.out.clone();
    if let Some(dir) = &out_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let from_fixtures = args.fixtures.clone();
    let cases = match &from_fixtures {
        Some(dir) => fixture_cases(dir)?,
        None => builtin_cases(),
    };
    let oracle = if from_fixtures.is_some() {
        "the fixtures' expected tensors"
    } else {
        "the f64 reference"
    };
    println!(
        "parity: {} case(s) × backends [{}] against {oracle}; error = max(max |x − ref| / max |ref|, max |x − ref| / (|ref| + 10 % of max |ref|)), tolerance {tolerance:.1e}\n",
        cases.len(),
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| case | backend | {} | max | verdict |",
        COLUMNS.join(" | ")
    );
    println!("|{}", "---|".repeat(COLUMNS.len() + 4));
    let mut worst = 0.0f64;
    let mut failures = vec![];
    let mut worst_per_tensor: HashMap<&str, f64> = HashMap::new();
    for case in &cases {
        let mut rows: Vec<(String, Result<Outputs, String>)> = vec![];
        if from_fixtures.is_some() {
            // The oracle itself against the fixture: a sanity row for whoever made the files.
            let (y, g) = reference::backward(&case.problem, &case.dy);
            rows.push(("reference".into(), Ok(outputs(&y, &g))));
        }
        for backend in &backends {
            let result = backend
                .forward_backward(&case.problem, &case.dy)
                .map_err(|e| e.to_string())
                .and_then(|(y, g)| {
                    if let Some(dir) = &out_dir {
                        let computed = outputs(&y, &g);
                        let tensors: Vec<(&str, Vec<usize>, &[f32])> = computed
                            .iter()
                            .map(|(n, v)| (*n, shape_of(n, &case.problem.shape), &v[..]))
                            .collect();
                        let path =
                            dir.join(format!("{}.{}.safetensors", case.name, backend.name()));
                        let meta = HashMap::from([(
                            "delta_softplus".to_string(),
                            case.problem.delta_softplus.to_string(),
                        )]);
                        fixtures::write(&path, &tensors, meta)?;
                    }
                    Ok(outputs(&y, &g)
                        .into_iter()
                        .map(|(n, v)| (n, v.into_iter().map(f64::from).collect()))
                        .collect())
                });
            rows.push((backend.name(), result));
        }
        for (label, result) in rows {
            match result {
                Err(e) => {
                    println!("| {} | {label} | error: {e} |", case.name);
                    failures.push(format!("{} on {label}: {e}", case.name));
                }
                Ok(computed) => {
                    let mut cells = vec![];
                    let mut row_max = 0.0f64;
                    for column in COLUMNS {
                        let got = computed.iter().find(|(n, _)| *n == column);
                        let want = case.expected.iter().find(|(n, _)| n == column);
                        match (got, want) {
                            (Some((_, g)), Some((_, w))) => {
                                let e = rel_err(g, w);
                                row_max = row_max.max(e);
                                if label != "reference" {
                                    let slot = worst_per_tensor.entry(column).or_insert(0.0);
                                    *slot = slot.max(e);
                                }
                                cells.push(format!("{e:.2e}"));
                            }
                            (None, None) => cells.push("—".into()),
                            (Some(_), None) | (None, Some(_)) => {
                                row_max = f64::INFINITY;
                                cells.push("missing".into());
                            }
                        }
                    }
                    let verdict = if row_max <= tolerance { "ok" } else { "FAIL" };
                    if row_max > tolerance {
                        failures.push(format!("{} on {label}: max error {row_max:.3e}", case.name));
                    }
                    worst = worst.max(row_max);
                    println!(
                        "| {} | {label} | {} | {row_max:.2e} | {verdict} |",
                        case.name,
                        cells.join(" | ")
                    );
                }
            }
        }
    }
    let summary: Vec<String> = COLUMNS
        .iter()
        .filter_map(|c| worst_per_tensor.get(c).map(|e| format!("{c} {e:.2e}")))
        .collect();
    println!(
        "\nworst per tensor over all backends: {}",
        summary.join(", ")
    );
    if let Some(dir) = &out_dir {
        println!("wrote <case>.<backend>.safetensors to {}", dir.display());
    }
    if failures.is_empty() {
        println!("parity: all within {tolerance:.1e} (worst {worst:.2e})");
        Ok(())
    } else {
        Err(format!("parity failed:\n  - {}", failures.join("\n  - ")))
    }
}
