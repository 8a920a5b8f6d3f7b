//! The CubeCL kernels on WGPU (llvmpipe in CI) against the f64 sequential reference: output and
//! all seven gradients, across lengths at every unit/chunk edge, state sizes, groups, optional
//! inputs, extreme values, dtypes, strides, and determinism.

mod common;

use common::{
    TOLERANCE, assert_golden, assert_matches_reference, client, golden_problem, rel_err, upstream,
};
use rstest::rstest;
use selective_scan::{
    RandomSpec, ScanConfig, ScanDtype, ScanError, ScanProblem, ScanShape, host, reference,
};

/// Default split: segments of 4 positions, chunks of 512. The lengths sit on every unit,
/// chunk and multi-chunk edge, plus VMamba's 56×56 = 3136 and one past 4096.
#[rstest]
fn kernel_matches_reference_at_every_segment_and_chunk_edge(
    #[values(1, 2, 3, 4, 5, 511, 512, 513, 1023, 1025, 3136, 4101)] seq_len: usize,
) {
    let p = ScanProblem::random(
        ScanShape::new(2, 4, seq_len, 4, 2),
        &RandomSpec::default(),
        seq_len as u64,
    );
    assert_matches_reference(
        &format!("L={seq_len}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

#[rstest]
fn kernel_matches_reference_for_every_state_size_and_group_count(
    #[values(1, 4, 16)] d_state: usize,
    #[values(1, 2, 4)] groups: usize,
) {
    let p = ScanProblem::random(
        ScanShape::new(2, 8, 700, d_state, groups),
        &RandomSpec::default(),
        (d_state * 10 + groups) as u64,
    );
    assert_matches_reference(
        &format!("N={d_state} G={groups}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

#[rstest]
fn kernel_matches_reference_with_and_without_optional_inputs(
    #[values(false, true)] with_d: bool,
    #[values(false, true)] with_delta_bias: bool,
    #[values(false, true)] delta_softplus: bool,
) {
    // Without softplus Δ is the raw delta (+ bias), so keep it positive like a real step.
    let delta_range = if delta_softplus {
        (-3.0, 1.0)
    } else {
        (0.01, 1.0)
    };
    let spec = RandomSpec {
        with_d,
        with_delta_bias: with_delta_bias && delta_softplus,
        delta_softplus,
        delta_range,
        ..RandomSpec::default()
    };
    let mut p = ScanProblem::random(ScanShape::new(1, 6, 530, 2, 3), &spec, 5);
    if with_delta_bias && !delta_softplus {
        // A small positive bias keeps Δ > 0 without softplus.
        p.delta_bias = Some(vec![0.05; 6]);
    }
    assert_matches_reference(
        &format!("D={with_d} bias={with_delta_bias} softplus={delta_softplus}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

/// Raw delta at the softplus threshold (≈ 20) and far above it (≫ 20), and A at both ends of
/// its range: `A_log = 20` (A ≈ −4.9e8, every step forgets) and `A_log = −30` (A ≈ −9e−14, the
/// state is a running sum over the whole sequence).
#[rstest]
#[case::delta_at_softplus_threshold((19.5, 20.5), (-1.0, 1.5), true)]
#[case::delta_far_above_threshold((60.0, 200.0), (-1.0, 1.5), true)]
#[case::delta_far_above_without_softplus((60.0, 200.0), (-1.0, 1.5), false)]
#[case::a_log_20((-3.0, 1.0), (20.0, 20.0), true)]
#[case::a_log_minus_30((-3.0, 1.0), (-30.0, -30.0), true)]
fn kernel_matches_reference_at_extreme_delta_and_a(
    #[case] delta_range: (f32, f32),
    #[case] a_log_range: (f32, f32),
    #[case] delta_softplus: bool,
) {
    let spec = RandomSpec {
        delta_range,
        a_log_range,
        delta_softplus,
        with_delta_bias: delta_softplus,
        ..RandomSpec::default()
    };
    let p = ScanProblem::random(ScanShape::new(2, 4, 1030, 2, 2), &spec, 11);
    assert_matches_reference(
        &format!("delta {delta_range:?} A_log {a_log_range:?}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

/// Long-memory channels (`A` from −e^−30 to −e^−10, Δ down to 1e−5) over VMamba's stage-one
/// length: the decay `exp(Δ·A)` is within 1e−5 of 1, and a one-ulp bias of the device's `exp`
/// compounds over the 3136 steps (llvmpipe's did: 1–2.5 % in `dA`, `dB`, `dC`).
#[rstest]
fn kernel_matches_reference_on_long_memory_channels(#[values(true, false)] softplus: bool) {
    let p = ScanProblem::random(
        ScanShape::new(1, 4, 3136, 4, 2),
        &RandomSpec::long_memory(softplus),
        21,
    );
    assert_matches_reference(
        &format!("long memory, softplus {softplus}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

/// Sizes at the ends of the contract: `N = 64` and `N = 256` (the maximum), a sequence of
/// 16384 (32 chunks), and a partial last backward block (`D/G = 10` channels in blocks of
/// `min(N, D/G) = 4`: 4, 4, 2).
#[rstest]
#[case::n64(ScanShape::new(1, 4, 300, 64, 2))]
#[case::n256(ScanShape::new(1, 2, 130, 256, 1))]
#[case::l16384(ScanShape::new(1, 2, 16384, 2, 1))]
#[case::partial_backward_block(ScanShape::new(2, 10, 300, 4, 1))]
fn kernel_matches_reference_at_the_ends_of_the_contract(#[case] shape: ScanShape) {
    if shape.channels == 10 {
        // The case is what it says: blocks of 4 channels, the last one holding 2.
        let per_block = selective_scan::launch::channels_per_block(&shape, ScanConfig::default());
        assert_eq!((per_block, shape.channels_per_group() % per_block), (4, 2));
    }
    let p = ScanProblem::random(shape, &RandomSpec::default(), shape.d_state as u64 + 3);
    assert_matches_reference(
        &format!("{shape:?}"),
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

/// A different split (32 units × 3 items = chunks of 96, odd segment length) moves every edge.
#[rstest]
fn kernel_matches_reference_with_a_small_odd_split(
    #[values(1, 2, 3, 4, 95, 96, 97, 192, 289)] seq_len: usize,
) {
    let config = ScanConfig {
        units: 32,
        items: 3,
        ..ScanConfig::default()
    };
    let p = ScanProblem::random(
        ScanShape::new(3, 6, seq_len, 3, 3),
        &RandomSpec::default(),
        3,
    );
    assert_matches_reference(
        &format!("units=32 items=3 L={seq_len}"),
        &p,
        ScanDtype::F32,
        config,
        TOLERANCE,
    );
}

#[test]
fn kernel_matches_reference_on_vmamba_stage_one_length_with_sixteen_states() {
    let p = ScanProblem::random(
        ScanShape::new(1, 16, 3136, 16, 4),
        &RandomSpec::default(),
        99,
    );
    assert_matches_reference(
        "L=3136 N=16 G=4",
        &p,
        ScanDtype::F32,
        ScanConfig::default(),
        TOLERANCE,
    );
}

/// An impulse `u = δ_{t,0}` must decay as `y_t = C_t · exp(A Σ_{r=1..t} Δ_r) · Δ_0 B_0`, a closed
/// form computed here independently of the reference loop. The no-recurrence shortcut
/// (`burn_vmamba::ops::shortcut`) gives `y_t = 0` for every `t > 0` and fails this at once.
#[test]
fn impulse_response_follows_the_decay_across_chunks() {
    let l = 1500;
    let s = ScanShape::new(1, 1, l, 1, 1);
    let mut p = ScanProblem::random(s, &RandomSpec::default(), 4);
    p.u = vec![0.0; l];
    p.u[0] = 1.0;
    p.d = None;
    p.delta_bias = None;
    p.delta_softplus = false;
    p.delta = vec![0.002; l];
    p.a = vec![-1.0];
    p.b = vec![1.0; l];
    p.c = vec![1.0; l];
    let y = host::forward_host(&client(), &p, ScanDtype::F32, ScanConfig::default()).unwrap();
    let expected: Vec<f64> = (0..l)
        .map(|t| {
            let dt = f64::from(0.002f32);
            (-(t as f64) * dt).exp() * dt
        })
        .collect();
    let err = rel_err(&y, &expected);
    assert!(err < 1e-5, "impulse response off by {err:.2e}");
    // Far past the first chunk the response is still e^{-2.998}·Δ ≈ 0.05·Δ, not zero.
    assert!(
        y[l - 1] > 0.04 * 0.002,
        "the response died: y[L-1] = {}",
        y[l - 1]
    );
}

/// Long memory, exactly (`common::long_memory_impulse`): `y_t = Δ` at every one of 3136 steps.
#[test]
fn impulse_response_of_long_memory_channels_stays_exact() {
    let (p, expected) = common::long_memory_impulse();
    let y = host::forward_host(&client(), &p, ScanDtype::F32, ScanConfig::default()).unwrap();
    let err = common::elem_err(&y, &expected);
    assert!(err < 1e-6, "long-memory impulse response off by {err:.2e}");
}

/// The golden numbers (`common::GOLDEN`), through the kernels.
#[test]
fn kernel_reproduces_the_golden_numbers_of_the_spec() {
    let (y, g) = host::forward_backward_host(
        &client(),
        &golden_problem(),
        &[1.0; 3],
        ScanDtype::F32,
        ScanConfig::default(),
    )
    .unwrap();
    assert_golden(&y, &g, 2e-6);
}

/// f16 inputs, f32 state: the kernel must equal the reference run on the same f16-rounded values.
#[test]
fn kernel_accepts_f16_inputs_and_keeps_an_f32_state() {
    let client = client();
    let mut p = ScanProblem::random(ScanShape::new(2, 4, 777, 4, 2), &RandomSpec::default(), 21);
    let round = |v: &mut Vec<f32>| {
        v.iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32())
    };
    round(&mut p.u);
    round(&mut p.delta);
    round(&mut p.b);
    round(&mut p.c);
    let supported = host::forward_host(&client, &p, ScanDtype::F16, ScanConfig::default());
    match supported {
        Err(ScanError::Unsupported { detail }) => {
            panic!(
                "this adapter lacks f16 buffers ({detail}); llvmpipe has them, so CI must not get here"
            )
        }
        other => {
            other.unwrap();
        }
    }
    assert_matches_reference("f16", &p, ScanDtype::F16, ScanConfig::default(), TOLERANCE);
}

/// bf16 runs where the adapter has bf16 buffers; elsewhere (llvmpipe) the call must refuse with
/// the capability error, never compute something else.
#[test]
fn kernel_runs_bf16_where_supported_and_refuses_cleanly_elsewhere() {
    let client = client();
    let mut p = ScanProblem::random(ScanShape::new(1, 4, 300, 2, 2), &RandomSpec::default(), 8);
    let round = |v: &mut Vec<f32>| {
        v.iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32())
    };
    round(&mut p.u);
    round(&mut p.delta);
    round(&mut p.b);
    round(&mut p.c);
    match host::forward_host(&client, &p, ScanDtype::BF16, ScanConfig::default()) {
        Err(ScanError::Unsupported { detail }) => {
            assert!(detail.contains("BF16"), "unexpected message: {detail}");
            println!("bf16 not supported by this adapter, refused with: {detail}");
        }
        Err(other) => panic!("bf16 failed with an unexpected error: {other}"),
        Ok(_) => {
            assert_matches_reference(
                "bf16",
                &p,
                ScanDtype::BF16,
                ScanConfig::default(),
                TOLERANCE,
            );
        }
    }
}

#[test]
fn identical_inputs_give_identical_bits() {
    let client = client();
    let p = ScanProblem::random(ScanShape::new(2, 8, 1100, 4, 2), &RandomSpec::default(), 31);
    let dy = upstream(&p.shape, 3);
    let run = || {
        host::forward_backward_host(&client, &p, &dy, ScanDtype::F32, ScanConfig::default())
            .unwrap()
    };
    let (y1, g1) = run();
    let (y2, g2) = run();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y1), bits(&y2), "y differs between runs");
    for ((name, a), (_, b)) in g1.named().into_iter().zip(g2.named()) {
        assert_eq!(bits(a), bits(b), "{name} differs between runs");
    }
}

/// The forward output alone (no backward) matches too, so the saved carries are not what makes
/// the backward right.
#[test]
fn forward_alone_matches_reference() {
    let p = ScanProblem::random(ScanShape::new(2, 4, 1537, 3, 1), &RandomSpec::default(), 41);
    let y = host::forward_host(&client(), &p, ScanDtype::F32, ScanConfig::default()).unwrap();
    let err = rel_err(&y, &reference::forward(&p));
    assert!(err <= TOLERANCE, "y off by {err:.2e}");
}

/// The plane (warp) scans, forced on: llvmpipe's Vulkan driver runs subgroup operations
/// (WGPU leaves them unadvertised on CPU adapters, so `Planes::Auto` takes the shared-memory
/// path there). (states, channels) per scan: (1, 1); (3, 2), a partial last pass for N = 4 and
/// N = 16; (4, 4), sixteen lanes per scan, four channels of the group's two per cube (half the
/// lanes idle).
/// Both scan directions, chunk and segment edges, groups, optional inputs.
#[rstest]
fn kernel_matches_reference_with_plane_scans(
    #[values((1, 1), (3, 2), (4, 4))] states_and_channels: (usize, usize),
    #[values((1, 1), (513, 4), (1030, 16))] len_and_states: (usize, usize),
) {
    let (states, channels) = states_and_channels;
    let (seq_len, d_state) = len_and_states;
    let config = ScanConfig {
        states,
        channels,
        planes: selective_scan::Planes::On,
        ..ScanConfig::default()
    };
    let spec = RandomSpec {
        with_d: true,
        with_delta_bias: true,
        ..RandomSpec::default()
    };
    let p = ScanProblem::random(ScanShape::new(2, 6, seq_len, d_state, 3), &spec, 7);
    assert_matches_reference(
        &format!("planes, {config} L={seq_len} N={d_state}"),
        &p,
        ScanDtype::F32,
        config,
        TOLERANCE,
    );
}

/// Several channels per cube on the shared-memory path, with `D/G = 15` channels per group:
/// N = 16 gives backward blocks of 15 channels walked 1, 3 or 4 at a time (last step partial);
/// N = 1 gives blocks of `channels` (the last block partial); forward cubes of `channels`
/// channels with a partial last one per group.
#[rstest]
fn kernel_matches_reference_with_several_channels_per_cube(
    #[values(1, 3, 4)] channels: usize,
    #[values(1, 16)] d_state: usize,
) {
    let config = ScanConfig {
        states: 4.min(16 / channels),
        channels,
        ..ScanConfig::default()
    };
    let shape = ScanShape::new(2, 30, 300, d_state, 2);
    let spec = RandomSpec {
        with_d: true,
        with_delta_bias: true,
        ..RandomSpec::default()
    };
    let p = ScanProblem::random(shape, &spec, 13);
    assert_matches_reference(
        &format!("{config} N={d_state}"),
        &p,
        ScanDtype::F32,
        config,
        TOLERANCE,
    );
}
