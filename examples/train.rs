//! Train VMamba with burn-train's `Learner` and upstream's recipe:
//!
//! ```text
//! cargo run --release --example train -- [--backend ndarray|wgpu|cuda|rocm] [--devices N|LIST]
//!     [--data DIR] [--preset NAME | --config FILE.json] [--weights FILE] [--out DIR]
//!     [--epochs N] [--minutes M] [--batch-size N] [--lr BASE_LR] [--image-size N]
//!     [--seed N] [--workers N] [--resume]
//! ```
//!
//! With no arguments: the synthetic corner-matching task (a label that only token mixing
//! across the whole image can predict) with a small VMamba on NdArray, into `target/train`.

use std::io::IsTerminal;
use std::time::Duration;

use vmamba::train::{Args, Progress, run};

/// Freed large blocks are kept for reuse (`vmamba::alloc`): CPU tensors above the C library's
/// `mmap` threshold would otherwise cost page faults and zeroing at every op.
#[global_allocator]
static ALLOCATOR: vmamba::alloc::ReuseLarge = vmamba::alloc::ReuseLarge::system();

fn main() {
    vmamba::runtime::keep_freed_memory();
    let args = Args::from_env();
    let progress = if std::io::stdout().is_terminal() {
        Progress::Default
    } else {
        Progress::Plain(Box::new(std::io::stdout()), Duration::from_secs(15))
    };
    match run(&args, progress) {
        Ok(summary) => {
            println!("{}", summary.setup);
            if let Some(weights) = &summary.weights {
                println!("weights: {weights}");
            }
            println!(
                "trained {} epoch(s) in {:.1} s ({} parameters)",
                summary.epochs_done, summary.seconds, summary.parameters
            );
            println!(
                "validation accuracy: {:.2} % of {} images",
                100.0 * summary.val_accuracy,
                summary.val_count
            );
            let out = summary.out.display();
            println!(
                "written to {out}: model.safetensors, model.json, val-sample.safetensors, config.json, checkpoint/"
            );
            println!(
                "check: cargo run --release --example classify -- --config {out}/model.json \
                 --weights {out}/model.safetensors --input {out}/val-sample.safetensors"
            );
        }
        Err(message) => {
            eprintln!("train: {message}");
            std::process::exit(1);
        }
    }
}
