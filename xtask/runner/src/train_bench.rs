//! `bench train`: the default `train` task (the synthetic corner-matching task on NdArray)
//! trained twice for the same budget, once with the exact selective scan and once with the
//! scan replaced by the zero-state / last-position-C shortcut (`burn_vmamba::ops::shortcut`, a
//! negative control that users cannot switch on). Prints both validation accuracies and writes
//! `<bench dir>/train.json` (`crate::bench_dir`).

use std::time::Duration;

use burn_vmamba::ops::shortcut;
use serde::Serialize;
use vmamba::train::{Args, Progress, run_with};

#[derive(Serialize)]
struct Record {
    scan: &'static str,
    minutes: f64,
    epochs_done: usize,
    seconds: f64,
    val_accuracy: f64,
    val_images: usize,
}

/// `bench train` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchTrainArgs {
    /// Minutes of training per variant (default 10).
    #[arg(long, value_name = "M")]
    pub minutes: Option<f64>,
    /// Epochs of the schedule (the `train` example's default otherwise).
    #[arg(long, value_name = "N")]
    pub epochs: Option<String>,
    /// Image side of the synthetic task.
    #[arg(long, value_name = "N")]
    pub image_size: Option<String>,
    /// Only one variant: exact or shortcut (default both).
    #[arg(long, value_name = "exact|shortcut")]
    pub only: Option<String>,
}

pub fn run(args: &BenchTrainArgs) -> Result<(), String> {
    let minutes: f64 = args.minutes.unwrap_or(10.0);
    let variants: Vec<&'static str> = match args.only.as_deref() {
        None => vec!["exact", "shortcut"],
        Some("exact") => vec!["exact"],
        Some("shortcut") => vec!["shortcut"],
        Some(other) => {
            return Err(format!(
                "--only: expected exact or shortcut, found {other:?}"
            ));
        }
    };
    let root = crate::bench_dir();
    let mut records = Vec::new();
    for scan in variants {
        let mut argv = vec![
            "--out".to_string(),
            root.join(format!("train-{scan}")).display().to_string(),
            "--minutes".to_string(),
            minutes.to_string(),
        ];
        for (name, value) in [
            ("--epochs", &args.epochs),
            ("--image-size", &args.image_size),
        ] {
            if let Some(value) = value {
                argv.extend([name.to_string(), value.clone()]);
            }
        }
        let args = Args::parse(argv)?;
        let config = args.recipe()?;
        std::fs::remove_dir_all(&args.out).ok();
        println!("== {scan} scan: the default task, NdArray, budget {minutes} min");
        shortcut::enable(scan == "shortcut");
        let progress = Progress::Plain(Box::new(std::io::stdout()), Duration::from_secs(30));
        let summary = run_with(&config, &args, progress);
        shortcut::enable(false);
        let summary = summary?;
        println!(
            "== {scan} scan: {:.2} % validation accuracy after {} epoch(s), {:.0} s",
            100.0 * summary.val_accuracy,
            summary.epochs_done,
            summary.seconds
        );
        records.push(Record {
            scan,
            minutes,
            epochs_done: summary.epochs_done,
            seconds: summary.seconds,
            val_accuracy: summary.val_accuracy,
            val_images: summary.val_count,
        });
    }
    println!("\n| scan | epochs | seconds | validation accuracy |\n|---|---|---|---|");
    for r in &records {
        println!(
            "| {} | {} | {:.0} | {:.2} % |",
            r.scan,
            r.epochs_done,
            r.seconds,
            100.0 * r.val_accuracy
        );
    }
    crate::write_bench_json("train.json", &records)
}
