//! `cargo xtask test`: the README's test command. Checks that a Vulkan driver is present (the
//! WGPU tests run the real kernels on it; on a machine without a GPU that is Mesa's llvmpipe),
//! runs the whole workspace's tests (the Wgpu ones on both forms of `burn::backend::Wgpu`, with
//! and without burn's `fusion`), then parity on the built-in cases and on the committed
//! fixtures made by `scripts/make_scan_fixtures.py`, for every path.

use std::path::Path;
use std::process::Command;

fn run_command(program: &str, args: &[&str]) -> Result<(), String> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!("`test` takes no options, got {args:?}"));
    }
    crate::vulkan::require_driver()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    run_command(&cargo, &["test", "--workspace"])?;
    // Burn's `fusion` feature only changes what the alias `burn::backend::Wgpu` names:
    // `CubeBackend<WgpuRuntime, ..>` or `Fusion<CubeBackend<..>>`. The tests run both types
    // explicitly in this one build (a second build with the feature cost CI 6.5 minutes).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixtures = root.join("tests/fixtures/scan");
    let out = root.join("target/parity");
    crate::parity::run(&[])?;
    crate::parity::run(&[
        "--fixtures".into(),
        fixtures.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ])?;
    println!("xtask test: workspace tests, built-in parity and fixture parity all passed");
    Ok(())
}
