//! `bench model`: images per second of a VMamba preset (default T s1l8, `tiny-s1`) at 224² on
//! each chosen backend: inference (`forward`, no autodiff) at batch 1 and 8, and one training
//! step (forward, cross-entropy, backward, AdamW step on every parameter) at batch 8, each the
//! median of `--repeats` after a warm-up. Then a per-op breakdown of one inference pass at
//! batch 1 (`burn_vmamba::model::profile`: each op timed between device synchronisations) with
//! the top ten ops by total time. JSON at `<bench dir>/model.json` (`crate::bench_dir`).

use std::collections::BTreeMap;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend as BurnBackend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_vmamba::SelectiveScanBackend;
use burn_vmamba::model::{VssmConfig, profile};
use selective_scan::SplitMix64;
use serde::Serialize;

#[derive(Serialize)]
struct Op {
    op: &'static str,
    calls: usize,
    ms: f64,
    share: f64,
}

#[derive(Serialize)]
struct Record {
    backend: String,
    preset: String,
    image_size: usize,
    /// `(batch, median ms, images/s)` of inference.
    inference: Vec<(usize, f64, f64)>,
    /// `(batch, median ms, images/s)` of one training step.
    train_step: Option<(usize, f64, f64)>,
    /// Inference at batch 1, profiled: every op's total, largest first.
    ops: Vec<Op>,
}

fn images<B: BurnBackend>(batch: usize, size: usize, device: &B::Device) -> Tensor<B, 4> {
    let values = SplitMix64::new(batch as u64).vec(batch * 3 * size * size, -2.0, 2.0);
    Tensor::from_data(TensorData::new(values, [batch, 3, size, size]), device)
}

fn sync<B: BurnBackend>(device: &B::Device) {
    B::sync(device).unwrap_or_else(|e| panic!("device sync failed: {e:?}"));
}

fn bench_backend<B>(name: &str, device: &B::Device, args: &Args) -> Result<Record, String>
where
    B: AutodiffBackend + SelectiveScanBackend,
    B::InnerBackend: SelectiveScanBackend,
{
    let config = VssmConfig::preset(&args.preset).map_err(|e| format!("--preset: {e}"))?;
    let classes = config.num_classes;
    let size = args.image_size;
    let model = config.init::<B>(device);
    let inner = model.valid();
    let mut inference = vec![];
    for &batch in &args.batches {
        let x = images::<B::InnerBackend>(batch, size, device);
        let ms = crate::median_ms(args.repeats, || {
            std::hint::black_box(inner.forward(x.clone()));
            sync::<B::InnerBackend>(device);
        });
        println!(
            "{name} {}: inference batch {batch}: {ms:.1} ms ({:.2} images/s)",
            args.preset,
            batch as f64 / ms * 1e3
        );
        inference.push((batch, ms, batch as f64 / ms * 1e3));
    }
    let train_step = (args.train_batch > 0)
        .then_some(args.train_batch)
        .map(|batch| {
            let x = images::<B>(batch, size, device);
            let labels: Vec<i64> = (0..batch).map(|i| (i * 7 % classes) as i64).collect();
            let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), device);
            let loss_fn = CrossEntropyLossConfig::new().init(device);
            let mut optim = AdamWConfig::new().with_weight_decay(0.05).init();
            let mut model = Some(model.clone());
            let ms = crate::median_ms(args.repeats.div_ceil(2), || {
                let m = model.take().expect("the model is put back after each step");
                let loss = loss_fn.forward(m.forward(x.clone()), labels.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                model = Some(optim.step(1e-4, m, grads));
                sync::<B>(device);
            });
            println!(
                "{name} {}: training step batch {batch}: {ms:.0} ms ({:.2} images/s)",
                args.preset,
                batch as f64 / ms * 1e3
            );
            (batch, ms, batch as f64 / ms * 1e3)
        });
    // Per-op breakdown of one inference pass at batch 1 (after the warm-ups above).
    let x = images::<B::InnerBackend>(1, size, device);
    profile::start();
    std::hint::black_box(inner.forward(x));
    let records = profile::finish();
    let total: f64 = records.iter().map(|(_, s)| s).sum();
    let mut by_op: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    for (op, seconds) in records {
        let entry = by_op.entry(op).or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }
    let mut ops: Vec<Op> = by_op
        .into_iter()
        .map(|(op, (calls, seconds))| Op {
            op,
            calls,
            ms: seconds * 1e3,
            share: seconds / total,
        })
        .collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    println!(
        "{name} {}: profiled inference, batch 1: {:.1} ms in {} op kinds; top 10:",
        args.preset,
        total * 1e3,
        ops.len()
    );
    println!("| op | calls | ms | share |\n|---|---|---|---|");
    for op in ops.iter().take(10) {
        println!(
            "| {} | {} | {:.2} | {:.1} % |",
            op.op,
            op.calls,
            op.ms,
            op.share * 100.0
        );
    }
    Ok(Record {
        backend: name.to_string(),
        preset: args.preset.clone(),
        image_size: size,
        inference,
        train_step,
        ops,
    })
}

/// `bench model` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Comma-separated backends: ndarray, wgpu, cuda, rocm.
    #[arg(long, value_name = "LIST", default_value = "ndarray")]
    pub backend: String,
    /// The preset (tiny-s1 = T s1l8).
    #[arg(long, value_name = "NAME", default_value = "tiny-s1")]
    pub preset: String,
    /// Image side.
    #[arg(long, value_name = "N", default_value = "224", value_parser = positive)]
    pub image_size: usize,
    /// Comma-separated inference batch sizes.
    // `std::vec::Vec`: one value parsed into the list (clap would take `Vec<_>` as repeats).
    #[arg(long, value_name = "LIST", default_value = "1,8", value_parser = positive_list)]
    pub batches: std::vec::Vec<usize>,
    /// Batch of the training step (0 skips it).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub train_batch: usize,
    /// Timed repeats.
    #[arg(long, value_name = "N", default_value = "3", value_parser = positive)]
    pub repeats: usize,
}

/// A count ≥ 1.
fn positive(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("expected a positive count, found {value:?}"))
}

/// Comma-separated counts ≥ 1.
fn positive_list(value: &str) -> Result<Vec<usize>, String> {
    value.split(',').map(positive).collect()
}

pub fn run(args: &Args) -> Result<(), String> {
    let mut records = vec![];
    for backend in args.backend.split(',') {
        let record = match backend {
            "ndarray" => bench_backend::<Autodiff<NdArray>>("ndarray", &Default::default(), args)?,
            "wgpu" => {
                crate::backends::Backend::Wgpu.probe()?;
                bench_backend::<Autodiff<burn::backend::Wgpu>>("wgpu", &Default::default(), args)?
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                crate::backends::Backend::Cuda.probe()?;
                bench_backend::<Autodiff<burn::backend::Cuda>>("cuda", &Default::default(), args)?
            }
            #[cfg(feature = "rocm")]
            "rocm" => {
                crate::backends::Backend::Rocm.probe()?;
                bench_backend::<Autodiff<burn::backend::Rocm>>("rocm", &Default::default(), args)?
            }
            other => {
                return Err(format!(
                    "--backend: unknown or not compiled in: {other:?} (ndarray, wgpu; cuda and \
                     rocm with their features)"
                ));
            }
        };
        records.push(record);
    }
    crate::write_bench_json("model.json", &records)
}
