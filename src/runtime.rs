//! Start-up of the GPU runtimes for the command-line tools: CubeCL's persistent caches in a
//! per-user directory, so that a second run does not compile its kernels again.
//!
//! CubeCL reads its configuration once per process (from `cubecl.toml` or `burn.toml` in the
//! working directory or a parent, then `CUBECL_*` environment variables). It keeps compiled
//! kernels on disk only when `compilation.cache` is set, which it is not by default; autotune
//! results go to the workspace's `target/` (or the user's cache directory outside a
//! workspace). [`configure_caches`] keeps whatever the user configured and fills in the kernel
//! cache: `<cache>/vmamba/cubecl`, where `<cache>` is `$VMAMBA_CACHE_DIR`, else the platform's
//! cache directory (`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS,
//! `%LOCALAPPDATA%` on Windows).
//!
//! Which runtimes use it: CUDA keeps its PTX, WGPU its SPIR-V when built with Burn's `vulkan`
//! compiler; with the default WGSL path the Vulkan driver's own shader cache applies (Mesa's
//! `~/.cache/mesa_shader_cache`, also on llvmpipe).

use std::path::PathBuf;

/// Keeps freed heap memory in the process for reuse (glibc on Linux; a no-op elsewhere),
/// returning whether it changed anything.
///
/// A CPU model allocates and frees buffers of a few MB at every op. glibc serves those with
/// fresh `mmap`s and gives them back on free (and trims its heap), so every op pays the kernel
/// for page faults and for zeroing the pages again: on the scan bench's C1 shape, a quarter of
/// forward + backward through `Autodiff<NdArray>` (19.9 → 13.7 ms). This raises the `mmap`
/// threshold to glibc's maximum (32 MiB) and the trim threshold to 2 GiB, as PyTorch's caching
/// allocators do for their own memory: the process keeps its peak heap. `classify`, `train`
/// and the benches call it first; a library user may do the same in their binary.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocator parameters, under its own lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// The environment variable the project's patched `cubecl-cuda` reads when a CUDA client is
/// created: `1` lets matmuls on tensor cores round f32 inputs to TF32 (faster, about 1e-3
/// relative error per product); anything else keeps f32 matmuls exact f32 (the default). See
/// the repository's `vendor/README.md`.
pub const CUDA_TF32_VAR: &str = "VMAMBA_CUDA_TF32";

/// Lets (or stops) CUDA matmuls use TF32, by setting [`CUDA_TF32_VAR`] for this process. It
/// takes effect for CUDA devices first used after the call; call it at the start of `main`,
/// before other threads exist (it writes the process environment).
pub fn allow_tf32(allow: bool) {
    // SAFETY: `std::env::set_var` is unsound only while another thread reads or writes the
    // environment; the documented contract is to call this first thing in `main`, and the
    // command-line tools do so before starting any runtime or thread pool.
    unsafe {
        if allow {
            std::env::set_var(CUDA_TF32_VAR, "1");
        } else {
            std::env::remove_var(CUDA_TF32_VAR);
        }
    }
}

use selective_scan::cubecl::config::cache::CacheConfig;
use selective_scan::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// The per-user cache directory of this project (see the module docs), if one can be named.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("VMAMBA_CACHE_DIR") {
        return Some(dir);
    }
    let base = if cfg!(windows) {
        env("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|h| h.join("Library").join("Caches"))
    } else {
        env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))
    };
    base.map(|b| b.join("vmamba"))
}

/// What [`configure_caches`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSetup {
    /// The kernel cache now lives in this directory.
    Kernels(PathBuf),
    /// The user's own CubeCL configuration sets the kernel cache; it was kept.
    UserConfigured,
    /// CubeCL's configuration was already read in this process (a runtime had started), so it
    /// could not be changed.
    TooLate,
    /// No cache directory could be named (no `HOME`, no `VMAMBA_CACHE_DIR`).
    NoDirectory,
}

/// Points CubeCL's persistent kernel cache at [`cache_dir`]`/cubecl`, unless the user's
/// configuration sets one. Must run before any runtime starts (CubeCL reads its configuration
/// once); later calls change nothing and say so.
pub fn configure_caches() -> CacheSetup {
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return CacheSetup::TooLate;
    }
    let config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_some() {
        return CacheSetup::UserConfigured;
    }
    let Some(dir) = cache_dir().map(|d| d.join("cubecl")) else {
        return CacheSetup::NoDirectory;
    };
    let mut config = config;
    config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        return CacheSetup::TooLate;
    }
    *slot = Some(std::sync::Arc::new(config));
    CacheSetup::Kernels(dir)
}
