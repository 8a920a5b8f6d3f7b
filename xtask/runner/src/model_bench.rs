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

struct Plan {
    preset: String,
    image_size: usize,
    batches: Vec<usize>,
    train_batch: Option<usize>,
    repeats: usize,
}

fn images<B: BurnBackend>(batch: usize, size: usize, device: &B::Device) -> Tensor<B, 4> {
    let values = SplitMix64::new(batch as u64).vec(batch * 3 * size * size, -2.0, 2.0);
    Tensor::from_data(TensorData::new(values, [batch, 3, size, size]), device)
}

fn sync<B: BurnBackend>(device: &B::Device) {
    B::sync(device).unwrap_or_else(|e| panic!("device sync failed: {e:?}"));
}

fn bench_backend<B>(name: &str, device: &B::Device, plan: &Plan) -> Result<Record, String>
where
    B: AutodiffBackend + SelectiveScanBackend,
    B::InnerBackend: SelectiveScanBackend,
{
    let config = VssmConfig::preset(&plan.preset).map_err(|e| format!("--preset: {e}"))?;
    let classes = config.num_classes;
    let size = plan.image_size;
    let model = config.init::<B>(device);
    let inner = model.valid();
    let mut inference = vec![];
    for &batch in &plan.batches {
        let x = images::<B::InnerBackend>(batch, size, device);
        let ms = crate::median_ms(plan.repeats, || {
            std::hint::black_box(inner.forward(x.clone()));
            sync::<B::InnerBackend>(device);
        });
        println!(
            "{name} {}: inference batch {batch}: {ms:.1} ms ({:.2} images/s)",
            plan.preset,
            batch as f64 / ms * 1e3
        );
        inference.push((batch, ms, batch as f64 / ms * 1e3));
    }
    let train_step = plan.train_batch.map(|batch| {
        let x = images::<B>(batch, size, device);
        let labels: Vec<i64> = (0..batch).map(|i| (i * 7 % classes) as i64).collect();
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), device);
        let loss_fn = CrossEntropyLossConfig::new().init(device);
        let mut optim = AdamWConfig::new().with_weight_decay(0.05).init();
        let mut model = Some(model.clone());
        let ms = crate::median_ms(plan.repeats.div_ceil(2), || {
            let m = model.take().expect("the model is put back after each step");
            let loss = loss_fn.forward(m.forward(x.clone()), labels.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            model = Some(optim.step(1e-4, m, grads));
            sync::<B>(device);
        });
        println!(
            "{name} {}: training step batch {batch}: {ms:.0} ms ({:.2} images/s)",
            plan.preset,
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
        plan.preset,
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
        preset: plan.preset.clone(),
        image_size: size,
        inference,
        train_step,
        ops,
    })
}

/// `bench model` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Comma-separated backends: ndarray, wgpu, cuda, rocm (default ndarray).
    #[arg(long, value_name = "LIST")]
    pub backend: Option<String>,
    /// The preset (default tiny-s1 = T s1l8).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Image side (default 224).
    #[arg(long, value_name = "N")]
    pub image_size: Option<String>,
    /// Comma-separated inference batch sizes (default 1,8).
    #[arg(long, value_name = "LIST")]
    pub batches: Option<String>,
    /// Batch of the training step (default 8; 0 skips it).
    #[arg(long, value_name = "N")]
    pub train_batch: Option<String>,
    /// Timed repeats (default 3).
    #[arg(long, value_name = "N")]
    pub repeats: Option<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let count = |name: &str, value: &str| {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name}: expected a positive count, found {value:?}"))
    };
    let plan = Plan {
        preset: args.preset.clone().unwrap_or_else(|| "tiny-s1".to_string()),
        image_size: count("--image-size", args.image_size.as_deref().unwrap_or("224"))?,
        batches: args
            .batches
            .as_deref()
            .unwrap_or("1,8")
            .split(',')
            .map(|b| count("--batches", b))
            .collect::<Result<_, _>>()?,
        train_batch: match args.train_batch.as_deref() {
            Some("0") => None,
            Some(b) => Some(count("--train-batch", b)?),
            None => Some(8),
        },
        repeats: count("--repeats", args.repeats.as_deref().unwrap_or("3"))?,
    };
    let wanted = args
        .backend
        .clone()
        .unwrap_or_else(|| "ndarray".to_string());
    let mut records = vec![];
    for backend in wanted.split(',') {
        let record = match backend {
            "ndarray" => bench_backend::<Autodiff<NdArray>>("ndarray", &Default::default(), &plan)?,
            "wgpu" => {
                crate::backends::Backend::Wgpu.probe()?;
                bench_backend::<Autodiff<burn::backend::Wgpu>>("wgpu", &Default::default(), &plan)?
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                crate::backends::Backend::Cuda.probe()?;
                bench_backend::<Autodiff<burn::backend::Cuda>>("cuda", &Default::default(), &plan)?
            }
            #[cfg(feature = "rocm")]
            "rocm" => {
                crate::backends::Backend::Rocm.probe()?;
                bench_backend::<Autodiff<burn::backend::Rocm>>("rocm", &Default::default(), &plan)?
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
