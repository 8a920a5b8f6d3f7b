//! `cargo xtask <command>`: a thin driver with no dependencies, so that it builds in seconds.
//!
//! - `test`: the README's test command: checks for a Vulkan driver ([`vulkan`]), then runs
//!   `cargo test --workspace`, which includes parity on the built-in cases and the committed
//!   fixtures for every path (tests of `xtask-runner`).
//! - `gpu-check OUT_DIR`: builds release binaries with `--features cuda` (fusion on) and packs
//!   them, the fixtures and `gpu-check/run.sh` into `OUT_DIR` (≤ 60 MB) for a machine with an
//!   NVIDIA GPU and no network ([`gpu_check`]).
//! - `parity`, `bench`, `model-parity`: run `xtask-runner` (`xtask/runner/`, which holds the scan, Burn and
//!   every backend) built in release: `cargo run --release -p xtask-runner -- <command> ...`.
//!   With CUDA or ROCm, call that directly with `--features cuda` / `--features rocm`.

mod gpu_check;
mod vulkan;

use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test
      The README's test command: checks for a Vulkan driver (prints what to install
      if there is none), then runs `cargo test --workspace`: every unit and
      integration test, and parity on the built-in cases and on tests/fixtures/scan
      for every path (the WGPU ones on the real kernels).
  gpu-check OUT_DIR
      Builds xtask-runner and the classify example in release with
      `--features cuda` (Burn fusion on; no CUDA toolkit needed here) and packs them
      (stripped, xz), the fixtures and run.sh into OUT_DIR (at most 60 MB).
      On a machine with an NVIDIA GPU: `bash OUT_DIR/run.sh [RESULTS_DIR]` runs
      parity, the scan and model benches and classify cold/warm in under 8
      minutes and writes RESULTS_DIR/summary.md and summary.json.
  parity [--backend NAME] [--fixtures DIR] [--out DIR] [--tolerance X]
  model-parity [--backend LIST] [--fixtures DIR] [--tolerance X]
  bench scan [--backend NAME] [--repeats N] [--shapes C1,C2,..] [--implementations LIST] [--configs UxIxSxC,..]
  bench train [--minutes M] [--epochs N] [--image-size N] [--only exact|shortcut]
      Run by xtask-runner built in release; `cargo xtask parity --help` prints
      their options. For CUDA / ROCm:
      cargo run --release -p xtask-runner --features cuda -- parity
";

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

/// Runs `command`, echoing it; an error names it and its exit status.
fn run(mut command: Command) -> Result<(), String> {
    let shown = format!("{command:?}").replace('"', "");
    println!("$ {shown}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

fn test(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!("`test` takes no options, got {args:?}"));
    }
    vulkan::require_driver()?;
    let mut command = cargo();
    command.args(["test", "--workspace"]);
    run(command)?;
    println!("xtask test: every workspace test passed, parity included");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("gpu-check") => gpu_check::run(&args[1..]),
        Some("parity" | "bench" | "model-parity") => {
            let mut command = cargo();
            command
                .args(["run", "--release", "--package", "xtask-runner", "--"])
                .args(&args);
            run(command)
        }
        Some("-h" | "--help" | "help") | None => {
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
