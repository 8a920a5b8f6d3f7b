//! The WGPU backend needs a Vulkan driver on Linux; without a GPU that is Mesa's llvmpipe.

use std::path::Path;

const INSTALL_HINT: &str = "no Vulkan driver found, and the WGPU tests need one (they never skip).\n\
     On Debian/Ubuntu without a GPU, install Mesa's software driver:\n\
     \n    sudo apt-get install -y mesa-vulkan-drivers libvulkan1\n\
     \nWith a GPU, install its vendor's Vulkan driver and the Vulkan loader (libvulkan1).";

/// On Linux: the Vulkan loader and at least one installable client driver (ICD) manifest, or
/// an error that says exactly what to install.
pub fn require_driver() -> Result<(), String> {
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
