//! `bench train`: the default `train` task (the synthetic corner-matching task on NdArray)
//! trained twice for the same budget, once with the exact selective scan and once with the
//! scan replaced by the zero-state / last-position-C shortcut (`burn_vmamba::ops::shortcut`, a
//! negative control that users cannot switch on). Prints both validation accuracies and writes
//! `<bench dir>/train.json` (`crate::bench_dir`).

use std::time::Duration;

use burn_vmamba::ops::shortcut;
use serde::Serialize;
use vmamba::train::{Args, Progress, run_with};

use crate::parse_flags;

#[derive(Serialize)]
struct Record {
    scan: &'static str,
    minutes: f64,
    epochs_done: usize,
    seconds: f64,
    val_accuracy: f64,
    val_images: usize,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let flags = parse_flags(args, &["--minutes", "--epochs", "--image-size", "--only"])?;
    let flag = |name: &str| crate::flag_value(&flags, name);
    let minutes: f64 = match flag("--minutes") {
        Some(m) => m
            .parse()
            .map_err(|_| format!("--minutes: expected a number, found {m:?}"))?,
        None => 10.0,
    };
    let variants: Vec<&'static str> = match flag("--only").as_deref() {
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
        for name in ["--epochs", "--image-size"] {
            if let Some(value) = flag(name) {
                argv.extend([name.to_string(), value]);
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
