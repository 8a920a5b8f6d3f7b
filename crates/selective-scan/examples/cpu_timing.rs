use selective_scan::{RandomSpec, ScanProblem, ScanShape, SplitMix64, cpu};
use std::time::Instant;

fn median(mut f: impl FnMut(), n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[0]
}

fn main() {
    if std::env::var("MALLOPT").is_ok() {
        unsafe {
            println!(
                "mallopt {}",
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20)
            );
            println!("mallopt {}", libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30));
        }
    }
    let which = std::env::args().nth(1).unwrap_or("C1,C2".into());
    for (name, b) in [("C1", 1), ("C2", 8)]
        .into_iter()
        .filter(|(n, _)| which.contains(n))
    {
        let s = ScanShape::new(b, 384, 3136, 1, 4);
        let p = ScanProblem::random(s, &RandomSpec::default(), 7);
        let dy = SplitMix64::new(1).vec(s.bdl_len(), -1.0, 1.0);
        let sl = p.slices();
        let f = median(
            || {
                std::hint::black_box(cpu::forward(&sl).unwrap());
            },
            21,
        );
        let bw = median(
            || {
                std::hint::black_box(cpu::backward(&sl, &dy).unwrap());
            },
            21,
        );

        let flt = || {
            let mut r: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
            r.ru_minflt
        };
        let f0 = flt();
        std::hint::black_box(cpu::forward(&sl).unwrap());
        let f1 = flt();
        std::hint::black_box(cpu::backward(&sl, &dy).unwrap());
        let f2 = flt();
        println!("faults: forward {}, backward {}", f1 - f0, f2 - f1);
        println!(
            "{name}: forward {f:.2} ms, backward {bw:.2} ms, sum {:.2}",
            f + bw
        );
    }
}
