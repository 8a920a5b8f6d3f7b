//! `cargo xtask test`: the README's test command. Checks that a Vulkan driver is present (the
//! WGPU tests run the real kernels on it; on a machine without a GPU that is Mesa's llvmpipe),
//! runs the whole workspace's tests, then parity on the built-in cases and on the committed
//! fixtures made by `scripts/make_scan_fixtures.py`.

use std::path::Path;
use std::process::Command;

const INSTALL_HINT: &str = "no Vulkan driver found, and the WGPU tests need one (they never skip).\n\
     On Debian/Ubuntu without a GPU, install Mesa's software driver:\n\
     \n    sudo apt-get install -y mesa-vulkan-drivers libvulkan1\n\
     \nWith a GPU, install its vendor's Vulkan driver and the Vulkan loader (libvulkan1).";

/// On Linux: the Vulkan loader and at least one installable client driver (ICD) manifest.
fn vulkan_present() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        // Windows and macOS ship their drivers (DX12/Vulkan, Metal) with the OS.
        return Ok(());
    }
    let loader = [
        "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
        "/usr/lib/aarch64-linux-gnu/libvulkan.so.1",
        "/usr/lib64/libvulkan.so.1",
        "/usr/lib/libvulkan.so.1",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    let icd_dirs = [
        "/usr/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
    ];
    let icd = icd_dirs.iter().any(|d| {
        std::fs::read_dir(d)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .unwrap_or(false)
    }) || std::env::var_os("VK_ICD_FILENAMES").is_some()
        || std::env::var_os("VK_DRIVER_FILES").is_some();
    if loader && icd {
        Ok(())
    } else {
        Err(INSTALL_HINT.to_string())
    }
}

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
    vulkan_present()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    run_command(&cargo, &["test", "--workspace"])?;
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
