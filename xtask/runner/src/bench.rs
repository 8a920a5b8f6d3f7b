//! `cargo xtask bench scan`: times the scan implementations on the shapes of `shapes()`
//! (C1–C4 CPU-sized, G2 and G4 GPU-only).
//!
//! Every time is the median of `--repeats` runs after one warm-up run. Alongside, the same run
//! measures the floor of each kind of device: on the CPU a STREAM-style triad and the fastest
//! vectorised exp it has (for the CPU implementations); on each CubeCL backend the fastest of
//! several device-to-device copy kernels and the device's exp rate (`device_floor.rs`).
//! `floor_ms` is the larger of the pass's minimal traffic (each input read once, each output
//! written once) at that bandwidth and its exponentials at that rate; `gbps` is the same
//! traffic over the measured time. For the native CPU scan (`ndarray-fused`), `forward_backward`
//! runs through `Autodiff<NdArray>` with `dy` handed to the op's output by a downstream node, as
//! a model's loss hands it over (and as PyTorch's `y.backward(dy)` in the peers' script); two
//! more passes show where the rest of the time goes: `forward_backward_seeded` through Burn's own
//! `y.backward()`, which first fills `dy = 1` of `[B, D, L]` on one thread (a cost a model, whose
//! root is a scalar loss, never pays), and `forward_backward_op`, the op's own forward and
//! backward on `NdArray` without the autodiff graph (`bench_op`).

use cubecl::prelude::*;
use selective_scan::{
    RandomSpec, ScanArgs, ScanConfig, ScanDtype, ScanProblem, ScanShape, SplitMix64, TensorRef,
    contiguous_strides, reference,
};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend as BurnBackend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Slice, Tensor, TensorData, TensorPrimitive};
use burn_vmamba::SelectiveScanBackend;
use rayon::prelude::*;

use crate::backends::{self, Backend};
use crate::device_floor::{self, DeviceFloor, sync};

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

/// STREAM triad `a = b + s·c` over 3 × 64 MiB of f32: bytes moved / time, in GB/s; on one
/// thread (for the single-threaded reference) or on every core with rayon (for the fused CPU
/// path, which is rayon-parallel).
fn cpu_triad_gbps(parallel: bool) -> f64 {
    let n = 16 << 20;
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let block = 1 << 16;
    let ms = crate::median_ms(5, || {
        let triad = |(a, (b, c)): (&mut [f32], (&[f32], &[f32]))| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        };
        if parallel {
            a.par_chunks_mut(block)
                .zip(b.par_chunks(block).zip(c.par_chunks(block)))
                .for_each(triad);
        } else {
            a.chunks_mut(block)
                .zip(b.chunks(block).zip(c.chunks(block)))
                .for_each(triad);
        }
        std::hint::black_box(&mut a);
    });
    (3 * 4 * n) as f64 / (ms * 1e-3) / 1e9
}

/// The exponentials the bench times, to take the floor from the fastest.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ExpKind {
    /// libm's `f32::exp`, elementwise (as far as the compiler vectorises calls: not at all).
    Libm,
    /// The scan's own (`selective_scan::cpu::exp_into` with the detected instruction set).
    Scan,
    /// An independent AVX2 + FMA exp written with `std::arch` intrinsics (x86-64 with both).
    Intrinsics,
    /// The same exp on 16 lanes with AVX-512F intrinsics (x86-64 with AVX-512F).
    Avx512Intrinsics,
}

impl ExpKind {
    fn available() -> Vec<Self> {
        let mut kinds = vec![Self::Libm, Self::Scan];
        if intrinsics_exp::available() {
            kinds.push(Self::Intrinsics);
        }
        if intrinsics_exp::available_512() {
            kinds.push(Self::Avx512Intrinsics);
        }
        kinds
    }

    fn name(self) -> &'static str {
        match self {
            Self::Libm => "libm f32::exp",
            Self::Scan => "scan's exp",
            Self::Intrinsics => "AVX2 intrinsics exp",
            Self::Avx512Intrinsics => "AVX-512 intrinsics exp",
        }
    }

    fn apply(self, xs: &[f32], out: &mut [f32]) {
        match self {
            Self::Libm => out.iter_mut().zip(xs).for_each(|(o, x)| *o = x.exp()),
            Self::Scan => {
                selective_scan::cpu::exp_into(selective_scan::cpu::Isa::detect(), xs, out)
            }
            Self::Intrinsics => intrinsics_exp::apply(xs, out),
            Self::Avx512Intrinsics => intrinsics_exp::apply_512(xs, out),
        }
    }

    /// Largest relative error against f64 over `[−87, 0]` (the range of `Δ·A` and of
    /// softplus' `e^{−|x|}`), sampled densely.
    fn max_rel_error(self) -> f64 {
        let xs: Vec<f32> = (0..=1_000_000).map(|i| -87.0 * i as f32 / 1e6).collect();
        let mut out = vec![0.0f32; xs.len()];
        self.apply(&xs, &mut out);
        xs.iter()
            .zip(&out)
            .map(|(x, y)| {
                let e = f64::from(*x).exp();
                (f64::from(*y) - e).abs() / e
            })
            .fold(0.0, f64::max)
    }

    /// Exponentials per second on one thread or on every core (rayon): each thread applies it
    /// to the same 8192 values (32 KiB in, 32 KiB out: in cache) 2048 times, so the rate is
    /// the exp's own throughput, not memory's (the scan computes its exponentials in registers;
    /// a stream over main memory ran at the triad's bandwidth instead).
    fn rate(self, parallel: bool) -> f64 {
        let (block, rounds) = (8192, 2048);
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let x: Vec<f32> = (0..block).map(|i| -((i % 1000) as f32) * 1e-3).collect();
        let run = |_| {
            let mut out = vec![0.0f32; block];
            for _ in 0..rounds {
                self.apply(std::hint::black_box(&x), &mut out);
                std::hint::black_box(&mut out);
            }
        };
        let ms = crate::median_ms(3, || {
            if parallel {
                (0..threads).into_par_iter().for_each(run);
            } else {
                run(0);
            }
        });
        (threads * block * rounds) as f64 / (ms * 1e-3)
    }
}

/// Cephes' `expf` (the algorithm of avx_mathfun's `exp256_ps`: range reduction by `ln 2` in
/// two parts, degree-7 polynomial, exponent bits), written directly with AVX2 + FMA
/// intrinsics, independently of the scan's code: a reference for how fast an 8-lane exp of
/// this accuracy runs on this machine; and the same on 16 lanes with AVX-512F (scaling by
/// `vscalefps`), where the CPU has it.
mod intrinsics_exp {
    /// The clamp of the input, `ln 2` in two parts and the polynomial (highest degree first)
    /// that both widths use.
    #[cfg(target_arch = "x86_64")]
    const CLAMP: (f32, f32) = (-87.3, 88.3);
    #[cfg(target_arch = "x86_64")]
    const LN2_HI: f32 = 0.693_359_4;
    #[cfg(target_arch = "x86_64")]
    const LN2_LO: f32 = -2.121_944_4e-4;
    #[cfg(target_arch = "x86_64")]
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    /// libm's exp for the values after the last full vector of `lanes`.
    #[cfg(target_arch = "x86_64")]
    fn tail(xs: &[f32], out: &mut [f32], lanes: usize) {
        let done = xs.len() / lanes * lanes;
        for (o, x) in out[done..].iter_mut().zip(&xs[done..]) {
            *o = x.exp();
        }
    }

    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn apply(xs: &[f32], out: &mut [f32]) {
        assert!(available(), "AVX2 and FMA are needed");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present (asserted above).
        unsafe {
            apply_avx2(xs, out)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn apply_avx2(xs: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let c = _mm256_set1_ps;
        for (o, x) in out.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
            // SAFETY: both chunks hold exactly 8 f32 (unaligned loads/stores).
            let x = unsafe { _mm256_loadu_ps(x.as_ptr()) };
            let x = _mm256_min_ps(_mm256_max_ps(x, c(CLAMP.0)), c(CLAMP.1));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, c(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, c(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, c(LN2_LO), r);
            let mut p = c(POLY[0]);
            for k in &POLY[1..] {
                p = _mm256_fmadd_ps(p, r, c(*k));
            }
            let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, c(1.0)));
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), y) };
        }
        tail(xs, out, 8);
    }

    pub fn available_512() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn apply_512(xs: &[f32], out: &mut [f32]) {
        assert!(available_512(), "AVX-512F is needed");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (asserted above).
        unsafe {
            apply_avx512(xs, out)
        }
    }

    /// [`apply_avx2`] on 16 lanes; `2^n` by `vscalefps` instead of exponent bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn apply_avx512(xs: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let c = _mm512_set1_ps;
        for (o, x) in out.chunks_exact_mut(16).zip(xs.chunks_exact(16)) {
            // SAFETY: both chunks hold exactly 16 f32 (unaligned loads/stores).
            let x = unsafe { _mm512_loadu_ps(x.as_ptr()) };
            let x = _mm512_min_ps(_mm512_max_ps(x, c(CLAMP.0)), c(CLAMP.1));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, c(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, c(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, c(LN2_LO), r);
            let mut p = c(POLY[0]);
            for k in &POLY[1..] {
                p = _mm512_fmadd_ps(p, r, c(*k));
            }
            let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, c(1.0)));
            let y = _mm512_scalef_ps(y, n);
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), y) };
        }
        tail(xs, out, 16);
    }
}

/// Transcendentals of one pass: `exp(Δ A)` per state, and softplus (exp + log1p) per position;
/// the backward recomputes the forward's and adds the sigmoid of softplus' derivative.
fn exp_count(s: &ScanShape, pass: &str) -> f64 {
    let bdl = s.bdl_len() as f64;
    let n = s.d_state as f64;
    let forward = bdl * (n + 2.0);
    let backward = bdl * (n + 3.0);
    if pass == "forward" {
        forward
    } else {
        forward + backward
    }
}

/// What bounds an implementation from below: memory traffic at a bandwidth, and (on the CPU)
/// exp calls at a rate.
#[derive(Clone, Copy)]
struct Floor {
    gbps: f64,
    exps_per_s: Option<f64>,
}

impl Floor {
    fn ms(&self, s: &ScanShape, pass: &str) -> f64 {
        let memory = traffic_bytes(s, pass) / (self.gbps * 1e9) * 1e3;
        let exp = self
            .exps_per_s
            .map_or(0.0, |r| exp_count(s, pass) / r * 1e3);
        memory.max(exp)
    }
}

/// The seven inputs in their own shapes, as a model would hand them over. (Reshaping flat
/// leaves inside the timed region measured Burn's copy of shared NdArray buffers on
/// reshape, ≈ 18 ms per C2 tensor, not the scan.)
struct Leaves<B: BurnBackend> {
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    b: Tensor<B, 4>,
    c: Tensor<B, 4>,
    d: Tensor<B, 1>,
    bias: Tensor<B, 1>,
}

impl<B: SelectiveScanBackend> Leaves<B> {
    /// The op's inputs, sharing the leaves' buffers.
    fn inputs(&self) -> burn_vmamba::ops::ScanTensors<B> {
        burn_vmamba::ops::ScanTensors {
            u: self.u.clone().into_primitive().tensor(),
            delta: self.delta.clone().into_primitive().tensor(),
            a: self.a.clone().into_primitive().tensor(),
            b: self.b.clone().into_primitive().tensor(),
            c: self.c.clone().into_primitive().tensor(),
            d: Some(self.d.clone().into_primitive().tensor()),
            delta_bias: Some(self.bias.clone().into_primitive().tensor()),
        }
    }
}

/// `p`'s inputs as [`Leaves`] on `device`.
fn leaves<B: BurnBackend>(p: &ScanProblem, device: &B::Device) -> Leaves<B> {
    let s = p.shape;
    fn t<B: BurnBackend, const D: usize>(
        v: &[f32],
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
    }
    let d = p.d.as_ref().expect("bench problems have D");
    let bias = p.delta_bias.as_ref().expect("bench problems have a bias");
    Leaves {
        u: t(&p.u, s.bdl(), device),
        delta: t(&p.delta, s.bdl(), device),
        a: t(&p.a, s.dn(), device),
        b: t(&p.b, s.bgnl(), device),
        c: t(&p.c, s.bgnl(), device),
        d: t(d, [s.channels], device),
        bias: t(bias, [s.channels], device),
    }
}

/// The root of a measured graph: a one-element slice of `y` (no work) whose backward hands
/// `dy` to `y`, as the rest of a model's graph would, or as PyTorch's `y.backward(dy)` does.
/// Burn's `backward()` takes no gradient, and seeds its root with `float_ones` of the root's
/// shape: on a `[B, D, L]` root that is a single-threaded fill (`TensorData::full`, a push
/// loop) that a model, whose root is a scalar loss, never pays.
#[derive(Debug)]
struct Downstream;

impl<B: BurnBackend> Backward<B, 1> for Downstream {
    /// `dy`.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<B>(node.id, ops.state);
        }
    }
}

/// `y[0, 0, 0]` on `Autodiff<B>` whose backward gives `y` the gradient `dy` ([`Downstream`]).
fn downstream<B: BurnBackend>(
    y: Tensor<Autodiff<B>, 3>,
    dy: FloatTensor<B>,
) -> Tensor<Autodiff<B>, 3> {
    let y = y.into_primitive().tensor();
    let first = B::float_slice(y.primitive.clone(), &[Slice::from(0..1); 3]);
    let root = match Downstream
        .prepare::<NoCheckpointing>([y.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(dy, first),
        OpsKind::UnTracked(prep) => prep.finish(first),
    };
    Tensor::from_primitive(TensorPrimitive::Float(root))
}

/// What [`bench_burn`] measures, in ms.
struct BurnTimes {
    /// The forward on the inner backend.
    forward: f64,
    /// Forward + backward on `Autodiff<B>`, every input tracked, `dy` handed to the op's output
    /// by a downstream node ([`Downstream`]). A fresh `dy = 1` is made before each timed run
    /// (in a model the op after the scan makes it, in its own time) and is the scan's alone, so
    /// `du` may be written over it, as in a model's backward.
    both: f64,
    /// The same with Burn's own `y.backward()`, which seeds `dy = 1` itself (where asked).
    seeded: Option<f64>,
}

/// Times the Burn op on an eager CPU backend: forward on `B`, forward+backward (every input
/// tracked) on `Autodiff<B>`, and with `seeded` also through Burn's own `y.backward()`.
fn bench_burn<B: SelectiveScanBackend>(
    p: &ScanProblem,
    device: &B::Device,
    repeats: usize,
    seeded: bool,
) -> BurnTimes {
    fn run<B: SelectiveScanBackend>(x: &Leaves<B>) -> Tensor<B, 3> {
        burn_vmamba::selective_scan(
            x.u.clone(),
            x.delta.clone(),
            x.a.clone(),
            x.b.clone(),
            x.c.clone(),
            Some(x.d.clone()),
            Some(x.bias.clone()),
            true,
        )
    }
    // Inputs are created outside the timed region; CPU backends compute eagerly, so no
    // read-back is needed (it would dominate the time).
    let inner = leaves::<B>(p, device);
    let forward = crate::median_ms(repeats, || {
        std::hint::black_box(run::<B>(&inner));
    });
    let x = leaves::<Autodiff<B>>(p, device);
    let tracked = Leaves {
        u: x.u.require_grad(),
        delta: x.delta.require_grad(),
        a: x.a.require_grad(),
        b: x.b.require_grad(),
        c: x.c.require_grad(),
        d: x.d.require_grad(),
        bias: x.bias.require_grad(),
    };
    let read = |grads: &<Autodiff<B> as AutodiffBackend>::Gradients| {
        let t = &tracked;
        std::hint::black_box((t.u.grad(grads), t.delta.grad(grads), t.a.grad(grads)));
        std::hint::black_box((t.b.grad(grads), t.c.grad(grads), t.d.grad(grads)));
        std::hint::black_box(t.bias.grad(grads));
    };
    let shape = p.shape.bdl();
    let both = crate::median_ms_after(
        repeats,
        || {
            B::float_from_data(
                TensorData::new(vec![1.0f32; p.shape.bdl_len()], shape),
                device,
            )
        },
        |dy| read(&downstream(run::<Autodiff<B>>(&tracked), dy).backward()),
    );
    let seeded = seeded.then(|| {
        crate::median_ms(repeats, || {
            read(&run::<Autodiff<B>>(&tracked).backward());
        })
    });
    BurnTimes {
        forward,
        both,
        seeded,
    }
}

/// Times the op's own forward and backward on an eager CPU backend `B` (no autodiff graph):
/// `selective_scan_forward`, then `selective_scan_backward` with `dy = 1` made before the timed
/// region. Through `Autodiff<B>` ([`bench_burn`]) the same work comes with the graph's
/// bookkeeping and the making of `dy`; this time is the scan's alone. `dy` is shared with the
/// caller here, so `du` gets a buffer of its own (through Autodiff it is written over `dy`).
fn bench_op<B: SelectiveScanBackend>(p: &ScanProblem, device: &B::Device, repeats: usize) -> f64 {
    let x = leaves::<B>(p, device);
    let dy = Tensor::<B, 3>::ones(p.shape.bdl(), device)
        .into_primitive()
        .tensor();
    let options = burn_vmamba::ScanOptions {
        delta_softplus: p.delta_softplus,
    };
    crate::median_ms(repeats, || {
        let (y, saved) = B::selective_scan_forward(x.inputs(), options);
        std::hint::black_box(y);
        std::hint::black_box(B::selective_scan_backward(
            x.inputs(),
            saved,
            dy.clone(),
            options,
        ));
    })
}

/// Peak heap bytes above the starting point while `f` runs.
fn peak_heap_bytes(f: impl FnOnce()) -> usize {
    let start = crate::alloc::reset_peak();
    f();
    crate::alloc::peak().saturating_sub(start)
}

#[derive(serde::Serialize)]
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
    config: ScanConfig,
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
    let mut error = None;
    let forward = crate::median_ms(repeats, || {
        if let Err(e) = selective_scan::forward(client, &args, config) {
            error = Some(e.to_string());
        }
        sync(client);
    });
    let both = crate::median_ms(repeats, || {
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

/// `bench scan` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// One GPU backend for the `cubecl` rows (default: every one compiled in).
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Timed repeats after a warm-up (default 3).
    #[arg(long, value_name = "N")]
    pub repeats: Option<usize>,
    /// Comma-separated shapes: C1, C2, C3, C4, G2, G4 (default: all for the devices present).
    #[arg(long, value_name = "LIST")]
    pub shapes: Option<String>,
    /// Comma-separated subset of cubecl, ndarray-fused, fallback, reference (default: all).
    #[arg(long, value_name = "LIST")]
    pub implementations: Option<String>,
    /// Comma-separated kernel splits for the `cubecl` rows, each `UNITSxITEMSxSTATESxCHANNELS`
    /// with an optional `:planes` or `:shared` (default: the default split, 128x4x2x2); rows
    /// other than the default are named `<backend>-cubecl[<split>]`.
    #[arg(long, value_name = "LIST")]
    pub configs: Option<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let repeats = args.repeats.unwrap_or(3);
    let only: Option<Vec<String>> = args
        .shapes
        .as_ref()
        .map(|s| s.split(',').map(str::to_string).collect());
    let known = ["cubecl", "ndarray-fused", "fallback", "reference"];
    let implementations: Vec<String> = match &args.implementations {
        Some(list) => list.split(',').map(str::to_string).collect(),
        None => known.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = implementations
        .iter()
        .find(|i| !known.contains(&i.as_str()))
    {
        return Err(format!(
            "--implementations: unknown `{bad}` (expected a comma-separated subset of {})",
            known.join(",")
        ));
    }
    let wanted = |name: &str| implementations.iter().any(|i| i == name);
    let backends = if wanted("cubecl") {
        Backend::select(args.backend.as_deref())?
    } else {
        vec![]
    };
    for backend in &backends {
        backend.probe()?;
    }
    let has_real_gpu = backends.iter().any(|b| *b != Backend::Wgpu);
    let configs: Vec<ScanConfig> = match &args.configs {
        Some(list) => list
            .split(',')
            .map(|c| c.parse().map_err(|e| format!("--configs: {e}")))
            .collect::<Result<_, String>>()?,
        None => vec![ScanConfig::default()],
    };

    let triad_1 = cpu_triad_gbps(false);
    let triad_all = cpu_triad_gbps(true);
    // The floor takes the fastest exp measured now.
    let mut exp_1 = 0.0f64;
    let mut exp_all = 0.0f64;
    let mut exp_report = vec![];
    for kind in ExpKind::available() {
        let (one, all) = (kind.rate(false), kind.rate(true));
        exp_1 = exp_1.max(one);
        exp_all = exp_all.max(all);
        exp_report.push(format!(
            "{} {:.0} M/s (1 thread), {:.0} M/s (all), max rel. error {:.1e}",
            kind.name(),
            one / 1e6,
            all / 1e6,
            kind.max_rel_error()
        ));
    }
    println!(
        "bandwidth: CPU triad {triad_1:.1} GB/s (1 thread), {triad_all:.1} GB/s ({} threads)",
        rayon::current_num_threads()
    );
    println!(
        "exp rates (the floor uses the fastest; the scan runs {}): {}",
        selective_scan::cpu::Isa::detect().name(),
        exp_report.join("; ")
    );
    let single_core = Floor {
        gbps: triad_1,
        exps_per_s: Some(exp_1),
    };
    let all_cores = Floor {
        gbps: triad_all,
        exps_per_s: Some(exp_all),
    };
    let mut device_floors: Vec<(Backend, DeviceFloor)> = vec![];
    for backend in &backends {
        let floor = match backend {
            Backend::Wgpu => device_floor::measure(&backends::wgpu_client(), 32 << 20, 1 << 16),
            #[cfg(feature = "cuda")]
            Backend::Cuda => device_floor::measure(&backends::cuda_client(), 256 << 20, 1 << 22),
            #[cfg(feature = "rocm")]
            Backend::Rocm => device_floor::measure(&backends::rocm_client(), 256 << 20, 1 << 22),
        };
        let tried: Vec<String> = floor
            .copies
            .iter()
            .map(|(name, gbps)| format!("{name}: {gbps:.1}"))
            .collect();
        println!(
            "bandwidth: {} device copy {:.1} GB/s (fastest of: {}); exp {:.0} G/s",
            backend.name(),
            floor.copy_gbps,
            tried.join("; "),
            floor.exps_per_s / 1e9
        );
        device_floors.push((*backend, floor));
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
        // `seeded` and `op`: the other two forward + backward passes, where measured
        // ([`bench_burn`], [`bench_op`]).
        let mut push = |implementation: String,
                        forward: f64,
                        both: f64,
                        seeded_and_op: Option<(f64, f64)>,
                        floor: Floor| {
            println!(
                "{} {implementation}: forward {forward:.2} ms, forward+backward {both:.2} ms",
                bench.name
            );
            if let Some((seeded, op)) = seeded_and_op {
                println!(
                    "{} {implementation}, forward+backward with Burn's own seed (`y.backward()`, \
                     `dy = 1` by `float_ones` of `[B, D, L]`) {seeded:.2} ms; the op alone (no \
                     autodiff graph, dy made beforehand) {op:.2} ms",
                    bench.name
                );
            }
            let passes = [
                ("forward", Some(forward)),
                ("forward_backward", Some(both)),
                ("forward_backward_seeded", seeded_and_op.map(|(s, _)| s)),
                ("forward_backward_op", seeded_and_op.map(|(_, o)| o)),
            ];
            for (pass, ms) in passes {
                let Some(ms) = ms else { continue };
                let bytes = traffic_bytes(&s, pass);
                records.push(Record {
                    shape: bench.name,
                    implementation: implementation.clone(),
                    pass,
                    median_ms: ms,
                    gbps: bytes / (ms * 1e-3) / 1e9,
                    floor_ms: floor.ms(&s, pass),
                });
            }
        };
        for (backend, floor) in &device_floors {
            for &config in &configs {
                let result = match backend {
                    Backend::Wgpu => bench_cube(&backends::wgpu_client(), &p, config, repeats),
                    #[cfg(feature = "cuda")]
                    Backend::Cuda => bench_cube(&backends::cuda_client(), &p, config, repeats),
                    #[cfg(feature = "rocm")]
                    Backend::Rocm => bench_cube(&backends::rocm_client(), &p, config, repeats),
                };
                let (forward, both) = result
                    .map_err(|e| format!("{} on {} ({config}): {e}", bench.name, backend.name()))?;
                let floor = Floor {
                    gbps: floor.copy_gbps,
                    exps_per_s: Some(floor.exps_per_s),
                };
                let name = if config == ScanConfig::default() {
                    format!("{}-cubecl", backend.name())
                } else {
                    format!("{}-cubecl[{config}]", backend.name())
                };
                push(name, forward, both, None, floor);
            }
        }
        if !bench.gpu_only && wanted("ndarray-fused") {
            let t = bench_burn::<NdArray>(&p, &Default::default(), repeats, true);
            let op = bench_op::<NdArray>(&p, &Default::default(), repeats);
            let seeded_and_op = t.seeded.map(|seeded| (seeded, op));
            push(
                "ndarray-fused".to_string(),
                t.forward,
                t.both,
                seeded_and_op,
                all_cores,
            );
            if bench.name == "C2" {
                let bytes = peak_heap_bytes(|| {
                    bench_burn::<NdArray>(&p, &Default::default(), 1, false);
                });
                let unit = (s.bdl_len() * 4) as f64;
                println!(
                    "peak heap, C2 forward+backward through Autodiff<NdArray>: {:.1} MiB = {:.2} × B·D·L·4 bytes \
                     (B·D·L·N·4 would be {:.1} MiB more per [B, D, L, N] tensor)",
                    bytes as f64 / (1 << 20) as f64,
                    bytes as f64 / unit,
                    (s.bdl_len() * s.d_state * 4) as f64 / (1 << 20) as f64
                );
            }
        }
        if !bench.gpu_only && wanted("fallback") {
            // The tensor-op fallback takes minutes on the N = 16 shapes; C1 and C2 give the ratio.
            if s.d_state == 1 {
                let t = bench_burn::<Flex>(&p, &Default::default(), 1, false);
                push("fallback".to_string(), t.forward, t.both, None, all_cores);
            }
        }
        if !bench.gpu_only && wanted("reference") {
            let dy = SplitMix64::new(1).vec(s.bdl_len(), -1.0, 1.0);
            let forward = crate::median_ms(1, || {
                std::hint::black_box(reference::forward(&p));
            });
            let both = crate::median_ms(1, || {
                std::hint::black_box(reference::backward(&p, &dy));
            });
            push("reference".to_string(), forward, both, None, single_core);
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
    let floors: std::collections::BTreeMap<_, _> = device_floors
        .iter()
        .map(|(backend, floor)| (backend.name(), floor))
        .collect();
    let json = serde_json::json!({
        "cpu": {
            "triad_gbps_1_thread": triad_1,
            "triad_gbps_all": triad_all,
            "exps_per_s_1_thread": exp_1,
            "exps_per_s_all": exp_all,
        },
        "devices": floors,
        "records": records,
    });
    crate::write_bench_json("scan.json", &json)
}
