//! `xtask-runner`: the heavy half of `cargo xtask` (the thin driver in `xtask/` runs it in
//! release), one file per command.
//!
//! - `parity`: the scan on every compiled-in backend against the f64 reference or fixtures;
//!   its built-in cases and the committed fixtures also run as tests here (`cargo test`).
//! - `bench`: `bench scan` times the scan implementations (`<bench dir>/scan.json`, see [`bench_dir`]);
//!   `bench model` times a VMamba preset (inference, training step, per-op breakdown;
//!   `<bench dir>/model.json`); `bench train` trains the default task with the exact scan and with the wrong shortcut as a
//!   control, for the same budget (`<bench dir>/train.json`).

mod alloc;
mod backends;
mod bench;
mod device_floor;
mod fixtures;
mod model_bench;
mod model_parity;
mod parity;
mod train_bench;
/// The driver's Vulkan check, the same file (parity on WGPU needs the driver too).
#[path = "../../src/vulkan.rs"]
mod vulkan;

use std::process::ExitCode;

/// `cargo xtask <command>` (or `cargo run --release -p xtask-runner [--features cuda|rocm] --
/// <command>`): parity and benchmarks of the scan and the model.
#[derive(clap::Parser, Debug)]
#[command(
    name = "cargo xtask",
    after_help = "The bench dir is $VMAMBA_BENCH_DIR, else the workspace's target/bench."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Runs the selective scan (forward + backward) on every backend compiled in (wgpu always;
    /// cuda and rocm with `--features cuda` / `--features rocm`) and prints the max relative
    /// error (max |x - ref| / max |ref|) per tensor, against the f64 reference on built-in
    /// seeded cases or against the fixtures' expected tensors; exits non-zero when any error
    /// exceeds the tolerance.
    Parity(parity::Args),
    /// The model fixtures (upstream config, checkpoint, input and upstream's logits) through
    /// `classify` on NdArray and on each backend; logits against upstream's (<= 1e-3) and
    /// against NdArray's (<= the tolerance, the exact-f32 promise), with the first forward's
    /// time; JSON at <bench dir>/model_parity.json.
    ModelParity(model_parity::Args),
    /// Benchmarks: `bench scan`, `bench model`, `bench train`.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// Times forward and forward+backward on shapes C1-C4, G2, G4 (src/bench.rs): markdown on
    /// stdout, JSON (records and each device's floor: fastest copy, exp rate) at
    /// <bench dir>/scan.json.
    Scan(bench::Args),
    /// Images/s of a VMamba preset per backend: inference at each batch, one training step
    /// (forward, cross-entropy, backward, AdamW), and the top-10 ops of a profiled inference
    /// pass at batch 1 (src/model_bench.rs); JSON at <bench dir>/model.json.
    Model(model_bench::Args),
    /// Trains the `train` example's default task (synthetic corner matching, NdArray) with the
    /// exact scan, then with the scan replaced by the zero-state / last-position-C shortcut (a
    /// negative control); prints both validation accuracies, JSON at <bench dir>/train.json.
    Train(train_bench::BenchTrainArgs),
}

fn main() -> ExitCode {
    // As `classify` and `train` run: freed memory reused, not returned to the OS, and CubeCL's
    // persistent kernel cache in the per-user directory (or `$VMAMBA_CACHE_DIR`).
    vmamba::runtime::keep_freed_memory();
    vmamba::runtime::configure_caches();
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("$ cargo xtask {}", args.join(" "));
    let cli = <Cli as clap::Parser>::parse();
    let result = match &cli.command {
        Command::Parity(args) => parity::run(args),
        Command::ModelParity(args) => model_parity::run(args),
        Command::Bench(BenchCommand::Scan(args)) => bench::run(args),
        Command::Bench(BenchCommand::Model(args)) => model_bench::run(args),
        Command::Bench(BenchCommand::Train(args)) => train_bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Median milliseconds of `repeats` runs of `f` after one warm-up run (`f` synchronises the
/// device itself where there is one).
pub fn median_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    median_ms_after(repeats, || (), |()| f())
}

/// [`median_ms`] of `run(setup())`, timing `run` alone: `setup` makes what each run consumes.
pub fn median_ms_after<S>(
    repeats: usize,
    mut setup: impl FnMut() -> S,
    mut run: impl FnMut(S),
) -> f64 {
    run(setup());
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let input = setup();
            let start = std::time::Instant::now();
            run(input);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where the benches write their JSON: `$VMAMBA_BENCH_DIR`, else the workspace's
/// `target/bench` (the path this binary was built from; `gpu-check` sets the variable, since
/// it runs the binary on another machine).
pub fn bench_dir() -> std::path::PathBuf {
    match std::env::var_os("VMAMBA_BENCH_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench"),
    }
}

/// Writes `value` as pretty JSON to [`bench_dir`]`/name` and says where.
pub fn write_bench_json(name: &str, value: &impl serde::Serialize) -> Result<(), String> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(name);
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(&path, json + "\n")
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Parity as part of `cargo test --workspace` (the README's test command): the built-in seeded
/// cases against the f64 reference and the committed fixtures, on every path compiled in.
#[cfg(test)]
mod parity_tests {
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn parity_on_the_built_in_cases() {
        crate::parity::run(&Default::default()).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn parity_on_the_committed_fixtures() {
        let args = crate::parity::Args {
            fixtures: Some(root().join("tests/fixtures/scan")),
            out: Some(root().join("target/parity")),
            ..Default::default()
        };
        crate::parity::run(&args).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// `bench train` from the test build, for machines where a release build of the runner is too
/// slow to wait for: `cargo test -p xtask-runner -- --ignored bench_train`.
#[cfg(test)]
mod train_bench_tests {
    #[test]
    #[ignore = "trains for minutes; `cargo xtask bench train` runs the same in release"]
    fn bench_train() {
        let argv: Vec<String> = std::env::var("BENCH_TRAIN_ARGS")
            .map(|a| a.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let cli = <super::Cli as clap::Parser>::try_parse_from(
            ["xtask-runner", "bench", "train"]
                .into_iter()
                .map(String::from)
                .chain(argv),
        )
        .unwrap_or_else(|e| panic!("BENCH_TRAIN_ARGS: {e}"));
        match &cli.command {
            super::Command::Bench(super::BenchCommand::Train(args)) => {
                crate::train_bench::run(args).unwrap_or_else(|e| panic!("{e}"))
            }
            other => unreachable!("parsed `bench train`, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use super::{BenchCommand, Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("xtask-runner").chain(argv.iter().copied()))
            .map_err(|e| e.render().to_string())
    }

    #[test]
    fn commands_and_their_options_parse_into_typed_args() {
        let cli = parse(&["bench", "scan", "--shapes", "C1,C2", "--repeats", "7"]).unwrap();
        match cli.command {
            Command::Bench(BenchCommand::Scan(args)) => {
                assert_eq!(args.shapes.as_deref(), Some("C1,C2"));
                assert_eq!(args.repeats, Some(7));
            }
            other => panic!("expected bench scan, got {other:?}"),
        }
        let cli = parse(&["bench", "model"]).unwrap();
        match cli.command {
            Command::Bench(BenchCommand::Model(args)) => {
                assert_eq!(
                    (
                        args.image_size,
                        args.batches,
                        args.train_batch,
                        args.repeats
                    ),
                    (224, vec![1, 8], 8, 3)
                );
            }
            other => panic!("expected bench model, got {other:?}"),
        }
        let cli = parse(&["parity", "--tolerance", "1e-3"]).unwrap();
        match cli.command {
            Command::Parity(args) => assert_eq!(args.tolerance, Some(1e-3)),
            other => panic!("expected parity, got {other:?}"),
        }
    }

    #[test]
    fn bad_options_are_refused_naming_them() {
        let err = parse(&["bench", "scan", "--frobnicate", "1"]).unwrap_err();
        assert!(err.contains("--frobnicate"), "{err}");
        let err = parse(&["bench", "scan", "--repeats", "many"]).unwrap_err();
        assert!(err.contains("--repeats") && err.contains("many"), "{err}");
        let err = parse(&["bench", "model", "--batches", "1,0"]).unwrap_err();
        assert!(
            err.contains("--batches") && err.contains("positive"),
            "{err}"
        );
        let err = parse(&["benchmark"]).unwrap_err();
        assert!(err.contains("benchmark"), "{err}");
    }
}
