use selective_scan::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use selective_scan::cubecl::Runtime;
use selective_scan::*;

#[test]
fn smoke() {
    let client = WgpuRuntime::client(&WgpuDevice::default());
    for (l, n, g) in [(1usize, 1usize, 1usize), (5, 2, 1), (513, 4, 2), (1100, 3, 2)] {
        let shape = ScanShape { batch: 2, channels: 4, seq_len: l, d_state: n, groups: g };
        let p = ScanProblem::random(shape, &RandomSpec::default(), 1);
        let dy = SplitMix64::new(9).vec(shape.bdl_len(), -1.0, 1.0);
        let (y, grads) = host::forward_backward_host(&client, &p, &dy, ScanDtype::F32, ScanConfig::default()).unwrap();
        let (yr, gr) = reference::backward(&p, &dy);
        let err = |a: &[f32], b: &[f64]| {
            let m = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            a.iter().zip(b).fold(0.0f64, |e, (x, r)| e.max((*x as f64 - r).abs())) / m.max(1e-30)
        };
        println!("L={l} N={n} G={g} y {:e}", err(&y, &yr));
        for ((name, a), (_, b)) in grads.named().into_iter().zip(gr.named()) {
            println!("  {name} {:e}", err(a, b));
        }
    }
}
