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

const USAGE: &str = "\
usage: cargo xtask <command> [options]
   or: cargo run --release -p xtask-runner [--features cuda|rocm] -- <command> [options]

commands:
  parity [--backend NAME] [--fixtures DIR] [--out DIR] [--tolerance X]
      Runs the selective scan (forward + backward) on every backend compiled in
      (wgpu always; cuda and rocm with `--features cuda` / `--features rocm`)
      and prints the max relative error (max |x - ref| / max |ref|) per tensor.
      Without --fixtures it uses built-in seeded cases and the f64 reference;
      with --fixtures it reads DIR/*.safetensors (format: src/fixtures.rs) and compares with
      the expected tensors stored there. --out DIR writes <case>.<backend>.safetensors.
      Exits non-zero when any error exceeds the tolerance (default 2e-4).
  model-parity [--backend LIST] [--fixtures DIR] [--tolerance X]
      The model fixtures (default tests/fixtures/model: upstream config, checkpoint,
      input and upstream's logits) through `classify` on NdArray and on each backend
      of LIST (default: every GPU backend compiled in); logits against upstream's
      (<= 1e-3) and against NdArray's (<= X, default 1e-5, the exact-f32 promise),
      with the first forward's time; JSON at <bench dir>/model_parity.json.
  bench scan [--backend NAME] [--repeats N] [--shapes C1,C2,..] [--implementations LIST]
      Times forward and forward+backward on shapes C1-C4, G2, G4 (src/bench.rs); markdown on
      stdout, JSON (records and each device's floor: fastest copy, exp rate) at
      <bench dir>/scan.json. LIST is a comma-separated subset
      of cubecl,ndarray-fused,fallback,reference (default: all).
  bench model [--backend ndarray,wgpu,cuda,rocm] [--preset NAME] [--image-size N]
              [--batches 1,8] [--train-batch N|0] [--repeats N]
      Images/s of a VMamba preset (default tiny-s1 = T s1l8, 224x224) per backend
      (default ndarray): inference at each batch, one training step (forward,
      cross-entropy, backward, AdamW) at --train-batch (default 8; 0 skips it), and the
      top-10 ops of a profiled inference pass at batch 1 (src/model_bench.rs); JSON at
      <bench dir>/model.json.
  bench train [--minutes M] [--epochs N] [--image-size N] [--only exact|shortcut]
      Trains the `train` example's default task (synthetic corner matching, NdArray)
      for M minutes (default 10) with the exact scan, then with the scan replaced by
      the zero-state / last-position-C shortcut (a negative control); prints both
      validation accuracies, JSON at <bench dir>/train.json.

The bench dir is $VMAMBA_BENCH_DIR, else the workspace's target/bench.
";

fn main() -> ExitCode {
    // As `classify` and `train` run: freed memory reused, not returned to the OS, and CubeCL's
    // persistent kernel cache in the per-user directory (or `$VMAMBA_CACHE_DIR`).
    vmamba::runtime::keep_freed_memory();
    vmamba::runtime::configure_caches();
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("$ cargo xtask {}", args.join(" "));
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = match args.first().map(String::as_str) {
        Some("parity") => parity::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("model-parity") => model_parity::run(&args[1..]),
        Some("help") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
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
    f();
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
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

/// The value given for `name` in `parse_flags`' result (the first one, if repeated).
pub fn flag_value(flags: &[(String, String)], name: &str) -> Option<String> {
    flags
        .iter()
        .find(|(f, _)| f == name)
        .map(|(_, v)| v.clone())
}

/// Parses `--flag value` pairs; `flags` lists the accepted names.
pub fn parse_flags(args: &[String], flags: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out = vec![];
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if !flags.contains(&flag.as_str()) {
            return Err(format!(
                "unknown option `{flag}` (expected one of {})",
                flags.join(", ")
            ));
        }
        let value = it
            .next()
            .ok_or_else(|| format!("option `{flag}` needs a value"))?;
        out.push((flag.clone(), value.clone()));
    }
    Ok(out)
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
        crate::parity::run(&[]).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn parity_on_the_committed_fixtures() {
        let args = [
            "--fixtures".to_string(),
            root().join("tests/fixtures/scan").display().to_string(),
            "--out".to_string(),
            root().join("target/parity").display().to_string(),
        ];
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
        let args: Vec<String> = std::env::var("BENCH_TRAIN_ARGS")
            .map(|a| a.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        crate::train_bench::run(&args).unwrap_or_else(|e| panic!("{e}"));
    }
}
