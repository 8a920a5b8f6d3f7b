//! The native CPU scan (`selective_scan::cpu`) against the f64 reference.

mod common;

use common::{assert_golden, golden_problem};
use rstest::rstest;
use selective_scan::cpu::Isa;
use selective_scan::{RandomSpec, ScanProblem, reference};

/// Every instruction set this CPU can run: the portable path always, AVX2 + FMA and AVX-512
/// (16 lanes) on x86-64 machines that have them, NEON on aarch64.
fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| isa.is_available())
        .collect()
}

/// The native CPU path against the reference, across edges, groups and options.
#[rstest]
#[case::vmamba(
    selective_scan::ScanShape::new(2, 8, 3136, 1, 4),
    RandomSpec::default()
)]
#[case::single_step(selective_scan::ScanShape::new(2, 4, 1, 2, 2), RandomSpec::default())]
#[case::odd_groups_more_channels_than_a_task(
    selective_scan::ScanShape::new(3, 54, 97, 3, 3),
    RandomSpec::default()
)]
#[case::n16(
    selective_scan::ScanShape::new(1, 32, 700, 16, 1),
    RandomSpec::default()
)]
#[case::raw_delta(selective_scan::ScanShape::new(2, 4, 530, 2, 2), RandomSpec { with_d: false, with_delta_bias: false, delta_softplus: false, delta_range: (0.01, 1.0), ..RandomSpec::default() })]
#[case::a_log_20(selective_scan::ScanShape::new(1, 4, 600, 2, 2), RandomSpec { a_log_range: (20.0, 20.0), ..RandomSpec::default() })]
#[case::a_log_minus_30(selective_scan::ScanShape::new(1, 4, 600, 2, 2), RandomSpec { a_log_range: (-30.0, -30.0), ..RandomSpec::default() })]
#[case::long_memory(
    selective_scan::ScanShape::new(1, 4, 3136, 4, 2),
    RandomSpec::long_memory(true)
)]
#[case::long_memory_raw_delta(
    selective_scan::ScanShape::new(1, 4, 3136, 4, 2),
    RandomSpec::long_memory(false)
)]
#[case::delta_far_above_threshold(selective_scan::ScanShape::new(1, 4, 300, 2, 2), RandomSpec { delta_range: (60.0, 200.0), ..RandomSpec::default() })]
// Lane tails: 13 channels per group (one full block of 8 lanes and one of 5; one partial block
// of 16), odd L, one state chunk of 4 and a single state after it (N = 5), and L = 1 with 3
// channels per group; 21 channels (one full block of 16 and one of 5; two full of 8 and one of
// 5).
#[case::lane_tails(selective_scan::ScanShape::new(2, 26, 37, 5, 2), RandomSpec::default())]
#[case::lane_tails_16(selective_scan::ScanShape::new(2, 42, 45, 2, 2), RandomSpec::default())]
#[case::lane_tails_single_step(
    selective_scan::ScanShape::new(3, 9, 1, 5, 3),
    RandomSpec::default()
)]
#[case::one_channel_per_group(
    selective_scan::ScanShape::new(1, 4, 129, 3, 4),
    RandomSpec::default()
)]
#[case::tiny_delta_huge_a(selective_scan::ScanShape::new(1, 12, 200, 4, 1), RandomSpec { a_log_range: (8.0, 12.0), delta_range: (1e-6, 1e-4), delta_softplus: false, with_delta_bias: false, ..RandomSpec::default() })]
fn native_cpu_scan_matches_reference(
    #[case] shape: selective_scan::ScanShape,
    #[case] spec: RandomSpec,
) {
    let p = ScanProblem::random(shape, &spec, 314);
    let dy = common::upstream(&shape, 9);
    let (y_ref, grads_ref) = reference::backward(&p, &dy);
    for isa in isas() {
        let y = selective_scan::cpu::forward_on(isa, &p.slices()).unwrap();
        let grads = selective_scan::cpu::backward_on(isa, &p.slices(), &dy).unwrap();
        let errors = common::errors(&y, &grads, &y_ref, &grads_ref);
        println!("{shape:?} {isa:?}: {errors:?}");
        for (name, err) in errors {
            assert!(err <= common::TOLERANCE, "{isa:?}: {name} off by {err:.3e}");
        }
        // Deterministic: a second run gives the same bits, and so does the backward that
        // writes `du` over its own `dy`.
        let again = selective_scan::cpu::backward_on(isa, &p.slices(), &dy).unwrap();
        assert_eq!(grads, again, "{isa:?}");
        let reusing = selective_scan::cpu::backward_reusing_on(isa, &p.slices(), dy.clone());
        assert_eq!(grads, reusing.unwrap(), "{isa:?}, du written over dy");
    }
}

/// An instruction set the CPU lacks is refused with an error naming it, not run.
#[test]
fn native_cpu_scan_refuses_an_instruction_set_the_cpu_lacks() {
    let p = ScanProblem::random(
        selective_scan::ScanShape::new(1, 2, 3, 1, 1),
        &RandomSpec::default(),
        1,
    );
    let missing = [Isa::Avx2Fma, Isa::Avx512, Isa::Neon]
        .into_iter()
        .find(|isa| !isa.is_available())
        .expect("no CPU has both AVX2 and NEON");
    let err = selective_scan::cpu::forward_on(missing, &p.slices()).unwrap_err();
    assert!(
        err.to_string().contains(missing.name()),
        "unexpected error: {err}"
    );
    assert!(selective_scan::cpu::backward_on(missing, &p.slices(), &[0.0; 3]).is_err());
}

/// An owned `dy` of the wrong length is refused like a borrowed one, naming `dy`.
#[test]
fn native_cpu_backward_refuses_an_upstream_gradient_of_the_wrong_length() {
    let p = ScanProblem::random(
        selective_scan::ScanShape::new(1, 2, 3, 1, 1),
        &RandomSpec::default(),
        1,
    );
    for err in [
        selective_scan::cpu::backward(&p.slices(), &[0.0; 5]).unwrap_err(),
        selective_scan::cpu::backward_reusing(&p.slices(), vec![0.0; 5]).unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(
            text.contains("dy") && text.contains('6') && text.contains('5'),
            "{text}"
        );
    }
}

#[test]
fn native_cpu_scan_reproduces_the_golden_numbers() {
    let p = golden_problem();
    for isa in isas() {
        let y = selective_scan::cpu::forward_on(isa, &p.slices()).unwrap();
        let g = selective_scan::cpu::backward_on(isa, &p.slices(), &[1.0; 3]).unwrap();
        assert_golden(&y, &g, 2e-6);
    }
}

/// The backward's tasks run in waves sized by the thread count; the result must not depend on
/// it. 60 tasks with 8 lanes (5 batches × 4 groups × 3 blocks of 8 channels; 40 with AVX-512's
/// 16 lanes) make two waves at 1 and 3 threads (30 tasks each: a quarter of `du` over the 200
/// floats of a task's partials) and at 8 threads (32).
#[test]
fn native_cpu_backward_is_identical_for_any_thread_count() {
    let shape = selective_scan::ScanShape::new(5, 96, 50, 2, 4);
    let p = ScanProblem::random(shape, &RandomSpec::default(), 11);
    let dy = common::upstream(&shape, 3);
    let with_threads = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| selective_scan::cpu::backward(&p.slices(), &dy).unwrap())
    };
    let one = with_threads(1);
    let y = selective_scan::cpu::forward(&p.slices()).unwrap();
    let (y_ref, grads_ref) = reference::backward(&p, &dy);
    for (name, err) in common::errors(&y, &one, &y_ref, &grads_ref) {
        assert!(err <= common::TOLERANCE, "{name} off by {err:.3e}");
    }
    for threads in [3, 8] {
        assert_eq!(one, with_threads(threads), "{threads} threads vs 1");
    }
}

/// Long memory, exactly (`common::long_memory_impulse`): `y_t = Δ` at every one of 3136 steps.
#[test]
fn native_cpu_impulse_response_of_long_memory_channels_stays_exact() {
    let (p, expected) = common::long_memory_impulse();
    for isa in isas() {
        let y = selective_scan::cpu::forward_on(isa, &p.slices()).unwrap();
        let err = common::elem_err(&y, &expected);
        assert!(
            err < 1e-6,
            "{isa:?}: long-memory impulse response off by {err:.2e}"
        );
    }
}

/// `gelu_into` on every instruction set: the scalar `gelu_with` bits (fused multiply-adds
/// where the set has them), over a slice whose length is no multiple of any lane count.
#[test]
fn gelu_into_gives_the_scalar_bits_on_every_instruction_set() {
    use selective_scan::fastmath::gelu_with;
    let xs: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.0173).collect();
    for isa in isas() {
        let mut out = vec![f32::NAN; xs.len()];
        selective_scan::cpu::gelu_into(isa, &xs, &mut out);
        for (x, y) in xs.iter().zip(&out) {
            let expected = if isa == Isa::Portable {
                gelu_with::<false>(*x)
            } else {
                gelu_with::<true>(*x)
            };
            assert_eq!(y.to_bits(), expected.to_bits(), "{isa:?} at x = {x}");
        }
    }
}

/// `gelu_backward_into` on every instruction set: `dy ·` the scalar `gelu_derivative_with` bits
/// (fused multiply-adds where the set has them), over a length no multiple of any lane count.
#[test]
fn gelu_backward_into_gives_the_scalar_bits_on_every_instruction_set() {
    use selective_scan::fastmath::gelu_derivative_with;
    let xs: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.0173).collect();
    let dys: Vec<f32> = (0..1003)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
        .collect();
    for isa in isas() {
        let mut out = vec![f32::NAN; xs.len()];
        selective_scan::cpu::gelu_backward_into(isa, &xs, &dys, &mut out);
        for ((x, dy), g) in xs.iter().zip(&dys).zip(&out) {
            let derivative = if isa == Isa::Portable {
                gelu_derivative_with::<false>(*x)
            } else {
                gelu_derivative_with::<true>(*x)
            };
            assert_eq!(
                g.to_bits(),
                (dy * derivative).to_bits(),
                "{isa:?} at x = {x}"
            );
        }
    }
}
