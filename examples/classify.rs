//! Classify images with VMamba on any backend. The README's main job:
//!
//! ```text
//! cargo run --release --example classify -- [--backend ndarray|wgpu|cuda|rocm]
//!     [--preset NAME | --config FILE.json] [--weights FILE] [--image FILE |
//!     --input FILE.safetensors] [--output FILE.safetensors]
//! ```
//!
//! With no arguments: VMamba-T (`tiny-s1`), random weights, a generated image, on NdArray.

use vmamba::classify::{Args, class_name, run};

/// Freed large blocks are kept for reuse (`vmamba::alloc`): CPU tensors above the C library's
/// `mmap` threshold would otherwise cost page faults and zeroing at every op.
#[global_allocator]
static ALLOCATOR: vmamba::alloc::ReuseLarge = vmamba::alloc::ReuseLarge::system();

fn main() {
    vmamba::runtime::keep_freed_memory();
    let args = Args::from_env();
    // Before any runtime or thread pool starts (it writes the process environment).
    vmamba::runtime::allow_tf32(args.tf32);
    match run(&args) {
        Ok(report) => {
            println!("{}", report.setup);
            let classes = report.shape[1];
            for (i, top5) in report.top5.iter().enumerate() {
                println!("image {i}: top-5");
                for (class, p) in top5 {
                    println!("  {p:>8.4}  {}", class_name(*class, classes));
                }
            }
            println!(
                "time: {:.1} ms per image ({} image(s); first call incl. setup {:.1} ms)",
                report.ms_per_image, report.shape[0], report.first_ms
            );
            if let Some(path) = &args.output {
                println!("logits {:?} written to {}", report.shape, path.display());
            }
        }
        Err(message) => {
            eprintln!("classify: {message}");
            std::process::exit(1);
        }
    }
}
