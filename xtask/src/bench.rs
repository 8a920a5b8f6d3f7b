//! `cargo xtask bench scan`: times the scan implementations on the DESIGN.md §7 shapes.
//!
//! Every time is the median of `--repeats` runs after one warm-up run. Alongside, the same run
//! measures a bandwidth figure per kind of device: a STREAM-style triad on the CPU (for the
//! CPU implementations) and a device-to-device copy kernel (for each CubeCL backend). `floor_ms`
//! is the minimal traffic of the pass (each input read once, each output written once) at that
//! bandwidth; `gbps` is the same traffic over the measured time.

use std::time::Instant;

use cubecl::prelude::*;
use selective_scan::{
    RandomSpec, ScanArgs, ScanConfig, ScanDtype, ScanProblem, ScanShape, SplitMix64, TensorRef,
    contiguous_strides, reference,
};

use crate::backends::{self, Backend};
use crate::parse_flags;

struct Bench {
    name: &'static str,
    shape: ScanShape,
    gpu_only: bool,
}

fn shapes() -> Vec<Bench> {
    let s = ScanShape::new;
    vec![
        Bench {
            name: "C1",
            shape: s(1, 384, 3136, 1, 4),
            gpu_only: false,
        },
        Bench {
            name: "C2",
            shape: s(8, 384, 3136, 1, 4),
            gpu_only: false,
        },
        Bench {
            name: "C3",
            shape: s(2, 768, 3136, 16, 4),
            gpu_only: false,
        },
        Bench {
            name: "C4",
            shape: s(1, 1536, 2048, 16, 1),
            gpu_only: false,
        },
        Bench {
            name: "G2",
            shape: s(128, 384, 3136, 1, 4),
            gpu_only: true,
        },
        Bench {
            name: "G4",
            shape: s(32, 768, 3136, 16, 4),
            gpu_only: true,
        },
    ]
}

/// Minimal bytes of one pass in f32: forward reads u, delta, B, C and writes y; the backward
/// also reads u, delta, B, C, dy and writes du, ddelta, dB, dC.
fn traffic_bytes(s: &ScanShape, pass: &str) -> f64 {
    let (bdl, bgnl) = (s.bdl_len() as f64, s.bgnl_len() as f64);
    let forward = 4.0 * (3.0 * bdl + 2.0 * bgnl);
    let backward = 4.0 * (5.0 * bdl + 4.0 * bgnl);
    if pass == "forward" {
        forward
    } else {
        forward + backward
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..repeats)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// STREAM triad `a = b + s·c` over 3 × 64 MiB of f32: bytes moved / time, in GB/s (single
/// thread, as the reference implementation is).
fn cpu_triad_gbps() -> f64 {
    let n = 16 << 20;
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let ms = time_ms(5, || {
        for i in 0..n {
            a[i] = b[i] + 3.0 * c[i];
        }
        std::hint::black_box(&mut a);
    });
    (3 * 4 * n) as f64 / (ms * 1e-3) / 1e9
}

#[cube(launch)]
fn copy_kernel(input: &Array<f32>, output: &mut Array<f32>) {
    let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize)
        * CUBE_DIM_X as usize
        + UNIT_POS_X as usize;
    if i < output.len() {
        output[i] = input[i];
    }
}

fn sync<R: Runtime>(client: &ComputeClient<R>) {
    if let Err(e) = cubecl::future::block_on(client.sync()) {
        panic!("device sync failed: {e:?}");
    }
}

/// Device copy of `n` f32: (read + write) bytes / time, in GB/s.
fn device_copy_gbps<R: Runtime>(client: &ComputeClient<R>, n: usize) -> f64 {
    let input = client.create_from_slice(bytemuck::cast_slice(&vec![1.0f32; n]));
    let output = client.empty(n * 4);
    let units = 256usize;
    let cubes = n.div_ceil(units);
    let (x, y) = (cubes.min(65535), cubes.div_ceil(cubes.min(65535)));
    let ms = time_ms(5, || {
        copy_kernel::launch::<R>(
            client,
            CubeCount::Static(x as u32, y as u32, 1),
            CubeDim::new_1d(units as u32),
            // SAFETY: both buffers hold exactly n f32 and the kernel guards i < n.
            unsafe { ArrayArg::from_raw_parts(input.clone(), n) },
            unsafe { ArrayArg::from_raw_parts(output.clone(), n) },
        );
        sync(client);
    });
    (2 * 4 * n) as f64 / (ms * 1e-3) / 1e9
}

struct Record {
    shape: &'static str,
    implementation: String,
    pass: &'static str,
    median_ms: f64,
    gbps: f64,
    floor_ms: f64,
}

/// Times forward and forward+backward of the CubeCL kernels with inputs already on the device.
fn bench_cube<R: Runtime>(
    client: &ComputeClient<R>,
    p: &ScanProblem,
    repeats: usize,
) -> Result<(f64, f64), String> {
    let s = p.shape;
    let upload = |v: &[f32]| client.create_from_slice(bytemuck::cast_slice(v));
    let named = p.named();
    let handles: Vec<_> = named.iter().map(|(_, _, data)| upload(data)).collect();
    let strides: Vec<Vec<usize>> = named
        .iter()
        .map(|(_, shape, _)| contiguous_strides(shape))
        .collect();
    let t = |i: usize| TensorRef {
        handle: &handles[i],
        shape: &named[i].1,
        strides: &strides[i],
        dtype: ScanDtype::F32,
    };
    let args = ScanArgs {
        u: t(0),
        delta: t(1),
        a: t(2),
        b: t(3),
        c: t(4),
        d: p.d.as_ref().map(|_| t(5)),
        delta_bias: p.delta_bias.as_ref().map(|_| t(6)),
        delta_softplus: p.delta_softplus,
    };
    let dy = upload(&SplitMix64::new(1).vec(s.bdl_len(), -1.0, 1.0));
    let bdl = s.bdl();
    let bdl_strides = contiguous_strides(&bdl);
    let dy_ref = TensorRef {
        handle: &dy,
        shape: &bdl,
        strides: &bdl_strides,
        dtype: ScanDtype::F32,
    };
    let config = ScanConfig::default();
    let mut error = None;
    let forward = time_ms(repeats, || {
        if let Err(e) = selective_scan::forward(client, &args, config) {
            error = Some(e.to_string());
        }
        sync(client);
    });
    let both = time_ms(repeats, || {
        match selective_scan::forward(client, &args, config).and_then(|saved| {
            selective_scan::backward(client, &args, &saved.carries, config, dy_ref)
        }) {
            Ok(_) => {}
            Err(e) => error = Some(e.to_string()),
        }
        sync(client);
    });
    match error {
        Some(e) => Err(e),
        None => Ok((forward, both)),
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let (what, rest) = args
        .split_first()
        .ok_or("bench needs a target: `bench scan`")?;
    if what != "scan" {
        return Err(format!("unknown bench `{what}` (available: scan)"));
    }
    let flags = parse_flags(rest, &["--backend", "--repeats", "--shapes"])?;
    let flag = |name: &str| {
        flags
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.clone())
    };
    let repeats = match flag("--repeats") {
        Some(r) => r
            .parse::<usize>()
            .map_err(|_| format!("--repeats must be a count, got `{r}`"))?,
        None => 3,
    };
    let only: Option<Vec<String>> =
        flag("--shapes").map(|s| s.split(',').map(str::to_string).collect());
    let backends = Backend::select(flag("--backend").as_deref())?;
    let has_real_gpu = backends.iter().any(|b| *b != Backend::Wgpu);

    let triad = cpu_triad_gbps();
    println!("bandwidth: CPU triad (1 thread) {triad:.1} GB/s");
    let mut device_bw = vec![];
    for backend in &backends {
        let gbps = match backend {
            Backend::Wgpu => device_copy_gbps(&backends::wgpu_client(), 32 << 20),
            #[cfg(feature = "cuda")]
            Backend::Cuda => device_copy_gbps(&backends::cuda_client(), 256 << 20),
            #[cfg(feature = "rocm")]
            Backend::Rocm => device_copy_gbps(&backends::rocm_client(), 256 << 20),
        };
        println!("bandwidth: {} device copy {gbps:.1} GB/s", backend.name());
        device_bw.push((*backend, gbps));
    }

    let mut records = vec![];
    for bench in shapes() {
        if bench.gpu_only && !has_real_gpu {
            continue;
        }
        if only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|s| s == bench.name))
        {
            continue;
        }
        let s = bench.shape;
        let p = ScanProblem::random(s, &RandomSpec::default(), 7);
        let mut push = |implementation: String, forward: f64, both: f64, bw: f64| {
            for (pass, ms) in [("forward", forward), ("forward_backward", both)] {
                let bytes = traffic_bytes(&s, pass);
                records.push(Record {
                    shape: bench.name,
                    implementation: implementation.clone(),
                    pass,
                    median_ms: ms,
                    gbps: bytes / (ms * 1e-3) / 1e9,
                    floor_ms: bytes / (bw * 1e9) * 1e3,
                });
            }
        };
        for (backend, bw) in &device_bw {
            let result = match backend {
                Backend::Wgpu => bench_cube(&backends::wgpu_client(), &p, repeats),
                #[cfg(feature = "cuda")]
                Backend::Cuda => bench_cube(&backends::cuda_client(), &p, repeats),
                #[cfg(feature = "rocm")]
                Backend::Rocm => bench_cube(&backends::rocm_client(), &p, repeats),
            };
            let (forward, both) =
                result.map_err(|e| format!("{} on {}: {e}", bench.name, backend.name()))?;
            println!(
                "{} {}-cubecl: forward {forward:.2} ms, forward+backward {both:.2} ms",
                bench.name,
                backend.name()
            );
            push(format!("{}-cubecl", backend.name()), forward, both, *bw);
        }
        if !bench.gpu_only {
            let dy = SplitMix64::new(1).vec(s.bdl_len(), -1.0, 1.0);
            let forward = time_ms(1, || {
                std::hint::black_box(reference::forward(&p));
            });
            let both = time_ms(1, || {
                std::hint::black_box(reference::backward(&p, &dy));
            });
            println!(
                "{} reference: forward {forward:.2} ms, forward+backward {both:.2} ms",
                bench.name
            );
            push("reference".to_string(), forward, both, triad);
        }
    }

    println!("\n| shape | implementation | pass | median ms | GB/s | floor ms | × floor |");
    println!("|---|---|---|---|---|---|---|");
    for r in &records {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1} |",
            r.shape,
            r.implementation,
            r.pass,
            r.median_ms,
            r.gbps,
            r.floor_ms,
            r.median_ms / r.floor_ms
        );
    }
    let json: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "  {{\"shape\": \"{}\", \"implementation\": \"{}\", \"pass\": \"{}\", \"median_ms\": {:.6}, \"gbps\": {:.6}, \"floor_ms\": {:.6}}}",
                r.shape, r.implementation, r.pass, r.median_ms, r.gbps, r.floor_ms
            )
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("scan.json");
    std::fs::write(&path, format!("[\n{}\n]\n", json.join(",\n")))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
