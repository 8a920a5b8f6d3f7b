//! `cargo xtask gpu-check OUT_DIR`: everything a machine with an NVIDIA GPU and no network
//! needs to check this project, in one folder of at most 60 MB.
//!
//! Here (no GPU, no CUDA toolkit: CubeCL loads the driver and NVRTC at run time) it builds
//! `xtask-runner` and the `classify` example in release with `--features cuda` (which
//! turns Burn's fusion on), strips
//! them and compresses them with `xz`, and copies the committed fixtures, `run.sh` and
//! `summary.py` beside them. `bash OUT_DIR/run.sh [RESULTS_DIR]` on the GPU machine does the
//! rest (its header says what it runs and what it writes).

use std::path::{Path, PathBuf};
use std::process::Command;

const RUN_SH: &str = include_str!("../gpu-check/run.sh");
const SUMMARY_PY: &str = include_str!("../gpu-check/summary.py");
/// The packed folder must fit the 64 MiB a device session carries, with room to spare.
const MAX_BYTES: u64 = 60 * 1000 * 1000;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn copy_dir(from: &Path, to: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().expect("a file has a name"));
            bytes += std::fs::copy(&path, &dest).map_err(|e| {
                format!("cannot copy {} to {}: {e}", path.display(), dest.display())
            })?;
        }
    }
    Ok(bytes)
}

/// Strips `binary` into `stripped` (a plain copy, with a warning, where `strip` is missing).
fn strip(binary: &Path, stripped: &Path) -> Result<(), String> {
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(stripped)
        .arg(binary)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("strip {} failed ({s})", binary.display())),
        Err(_) => {
            eprintln!(
                "warning: no `strip` (binutils); packing {} unstripped",
                binary.display()
            );
            std::fs::copy(binary, stripped)
                .map(|_| ())
                .map_err(|e| format!("cannot copy {}: {e}", binary.display()))
        }
    }
}

/// `xz -6 -T0` of `from` into `to`.
fn compress(from: &Path, to: &Path) -> Result<u64, String> {
    let out =
        std::fs::File::create(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let status = Command::new("xz")
        .args(["-6", "-T0", "-c"])
        .arg(from)
        .stdout(out)
        .status()
        .map_err(|e| {
            format!("cannot run xz ({e}): install it (Debian: apt-get install xz-utils)")
        })?;
    if !status.success() {
        return Err(format!("xz {} failed ({status})", from.display()));
    }
    std::fs::metadata(to)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}

pub fn run(args: &[String]) -> Result<(), String> {
    let [out] = args else {
        return Err(format!(
            "gpu-check takes one argument, the output folder (e.g. target/gpu-check), got {args:?}"
        ));
    };
    let out = PathBuf::from(out);
    let mut build = crate::cargo();
    build.current_dir(workspace()).args([
        "build",
        "--release",
        "--package",
        "xtask-runner",
        "--package",
        "vmamba",
        "--bin",
        "xtask-runner",
        "--example",
        "classify",
        "--features",
        "xtask-runner/cuda,vmamba/cuda",
    ]);
    crate::run(build)?;

    if out.exists() {
        std::fs::remove_dir_all(&out)
            .map_err(|e| format!("cannot clear {}: {e}", out.display()))?;
    }
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    let release = target_dir().join("release");
    let mut total = 0u64;
    for (name, built) in [
        ("xtask-runner", release.join("xtask-runner")),
        ("classify", release.join("examples").join("classify")),
    ] {
        let stripped = bin.join(name);
        strip(&built, &stripped)?;
        let packed = bin.join(format!("{name}.xz"));
        let bytes = compress(&stripped, &packed)?;
        std::fs::remove_file(&stripped).map_err(|e| e.to_string())?;
        println!("packed {name}: {:.1} MB", bytes as f64 / 1e6);
        total += bytes;
    }
    for set in ["scan", "model"] {
        total += copy_dir(
            &workspace().join("tests/fixtures").join(set),
            &out.join("fixtures").join(set),
        )?;
    }
    for (name, text) in [("run.sh", RUN_SH), ("summary.py", SUMMARY_PY)] {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        total += text.len() as u64;
    }
    let revision = Command::new("git")
        .current_dir(workspace())
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    std::fs::write(
        out.join("BUILD.txt"),
        format!("revision {revision}\nfeatures: cuda (fusion on), release\n"),
    )
    .map_err(|e| e.to_string())?;
    if total > MAX_BYTES {
        return Err(format!(
            "{} holds {:.1} MB, more than the {:.0} MB a device session can carry",
            out.display(),
            total as f64 / 1e6,
            MAX_BYTES as f64 / 1e6
        ));
    }
    println!(
        "gpu-check: {} ({:.1} MB). On a machine with an NVIDIA GPU: bash {}/run.sh [RESULTS_DIR]",
        out.display(),
        total as f64 / 1e6,
        out.display()
    );
    Ok(())
}
