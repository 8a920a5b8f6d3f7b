//! The native CPU scan (`selective_scan::cpu`) against the f64 reference.

mod common;

use common::{assert_golden, golden_problem};
use rstest::rstest;
use selective_scan::{RandomSpec, ScanProblem, reference};

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
fn native_cpu_scan_matches_reference(
    #[case] shape: selective_scan::ScanShape,
    #[case] spec: RandomSpec,
) {
    let p = ScanProblem::random(shape, &spec, 314);
    let dy = common::upstream(&shape, 9);
    let y = selective_scan::cpu::forward(&p.slices()).unwrap();
    let grads = selective_scan::cpu::backward(&p.slices(), &dy).unwrap();
    let (y_ref, grads_ref) = reference::backward(&p, &dy);
    let errors = common::errors(&y, &grads, &y_ref, &grads_ref);
    println!("{shape:?}: {errors:?}");
    for (name, err) in errors {
        assert!(err <= common::TOLERANCE, "{name} off by {err:.3e}");
    }
    // Deterministic: a second run gives the same bits.
    let again = selective_scan::cpu::backward(&p.slices(), &dy).unwrap();
    assert_eq!(grads, again);
}

#[test]
fn native_cpu_scan_reproduces_the_golden_numbers() {
    let p = golden_problem();
    let y = selective_scan::cpu::forward(&p.slices()).unwrap();
    let g = selective_scan::cpu::backward(&p.slices(), &[1.0; 3]).unwrap();
    assert_golden(&y, &g, 2e-6);
}

/// The backward's tasks run in waves sized by the thread count; the result must not depend on
/// it. 40 tasks (5 batches × 4 groups × 2 blocks of channels) make two waves at 1 and 3
/// threads (30 tasks each: a quarter of `du` over the 200 floats of a task's partials) and at 8
/// threads (32).
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
    let y = selective_scan::cpu::forward(&p.slices()).unwrap();
    let err = common::elem_err(&y, &expected);
    assert!(err < 1e-6, "long-memory impulse response off by {err:.2e}");
}
