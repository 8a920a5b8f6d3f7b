//! Non-contiguous inputs through the device API, and every refusal of the validation layer.

mod common;

use common::{TOLERANCE, client, rel_err, upstream};
use selective_scan::cubecl::prelude::ComputeClient;
use selective_scan::cubecl::server::Handle;
use selective_scan::cubecl::wgpu::WgpuRuntime;
use selective_scan::{
    RandomSpec, ScanArgs, ScanConfig, ScanDtype, ScanError, ScanProblem, ScanShape, TensorRef,
    contiguous_strides, host, reference,
};

fn upload(client: &ComputeClient<WgpuRuntime>, data: &[f32]) -> Handle {
    client.create_from_slice(bytemuck::cast_slice(data))
}

/// Stores `[b, x, y]`-indexed data of a logical `[d0, d1, d2]` tensor transposed as `[d0, d2, d1]`.
fn transpose_last_two(data: &[f32], d0: usize, d1: usize, d2: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for i in 0..d0 {
        for j in 0..d1 {
            for k in 0..d2 {
                out[(i * d2 + k) * d1 + j] = data[(i * d1 + j) * d2 + k];
            }
        }
    }
    out
}

/// `u` and `delta` stored channel-last (`[batch, seq_len, channels]`, VMamba's `ln` layout) and
/// `B`, `C` stored `[batch, groups, seq_len, d_state]`, passed with their strides, give the same
/// result as the contiguous call.
#[test]
fn strided_inputs_match_the_reference() {
    let client = client();
    let s = ScanShape {
        batch: 2,
        channels: 6,
        seq_len: 600,
        d_state: 3,
        groups: 2,
    };
    let p = ScanProblem::random(s, &RandomSpec::default(), 12);
    let (bt, d, l, n, g) = (s.batch, s.channels, s.seq_len, s.d_state, s.groups);
    let u = upload(&client, &transpose_last_two(&p.u, bt, d, l));
    let delta = upload(&client, &transpose_last_two(&p.delta, bt, d, l));
    let b = upload(&client, &transpose_last_two(&p.b, bt * g, n, l));
    let c = upload(&client, &transpose_last_two(&p.c, bt * g, n, l));
    let a = upload(&client, &p.a);
    let skip = upload(&client, p.d.as_ref().unwrap());
    let bias = upload(&client, p.delta_bias.as_ref().unwrap());
    let bdl = s.bdl();
    let bdl_strides = [l * d, 1, d];
    let bgnl = s.bgnl();
    let bgnl_strides = [g * l * n, l * n, 1, n];
    let dn = s.dn();
    let dn_strides = [n, 1];
    let ch = [d];
    let ch_strides = [1];
    let t = |handle, shape, strides| TensorRef {
        handle,
        shape,
        strides,
        dtype: ScanDtype::F32,
    };
    let args = ScanArgs {
        u: t(&u, &bdl, &bdl_strides),
        delta: t(&delta, &bdl, &bdl_strides),
        a: t(&a, &dn, &dn_strides),
        b: t(&b, &bgnl, &bgnl_strides),
        c: t(&c, &bgnl, &bgnl_strides),
        d: Some(t(&skip, &ch, &ch_strides)),
        delta_bias: Some(t(&bias, &ch, &ch_strides)),
        delta_softplus: true,
    };
    let dy_data = upstream(&s, 5);
    // dy strided too.
    let dy = upload(&client, &transpose_last_two(&dy_data, bt, d, l));
    let saved = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap();
    let grads = selective_scan::backward(
        &client,
        &args,
        &saved.carries,
        saved.config,
        t(&dy, &bdl, &bdl_strides),
    )
    .unwrap();
    let (y_ref, g_ref) = reference::backward(&p, &dy_data);
    let checks = [
        ("y", host::read(&client, &saved.y).unwrap(), &y_ref),
        ("du", host::read(&client, &grads.du).unwrap(), &g_ref.du),
        (
            "ddelta",
            host::read(&client, &grads.ddelta).unwrap(),
            &g_ref.ddelta,
        ),
        ("dA", host::read(&client, &grads.da).unwrap(), &g_ref.da),
        ("dB", host::read(&client, &grads.db).unwrap(), &g_ref.db),
        ("dC", host::read(&client, &grads.dc).unwrap(), &g_ref.dc),
        (
            "dD",
            host::read(&client, grads.dd.as_ref().unwrap()).unwrap(),
            g_ref.dd.as_ref().unwrap(),
        ),
        (
            "ddelta_bias",
            host::read(&client, grads.ddelta_bias.as_ref().unwrap()).unwrap(),
            g_ref.ddelta_bias.as_ref().unwrap(),
        ),
    ];
    for (name, got, want) in checks {
        let err = rel_err(&got, want);
        assert!(err <= TOLERANCE, "strided {name} off by {err:.2e}");
    }
}

fn problem(s: ScanShape) -> ScanProblem {
    ScanProblem::random(s, &RandomSpec::default(), 1)
}

fn base() -> ScanShape {
    ScanShape {
        batch: 2,
        channels: 4,
        seq_len: 8,
        d_state: 2,
        groups: 2,
    }
}

fn refuse(p: &ScanProblem) -> ScanError {
    host::forward_host(&client(), p, ScanDtype::F32, ScanConfig::default())
        .expect_err("the call should have been refused")
}

#[test]
fn groups_that_do_not_divide_channels_are_refused() {
    let mut s = base();
    s.groups = 3;
    s.channels = 4;
    let err = refuse(&problem(s));
    assert_eq!(
        err,
        ScanError::Groups {
            channels: 4,
            groups: 3
        }
    );
    assert!(err.to_string().contains("G = 3"), "{err}");
}

#[test]
fn state_size_above_256_is_refused() {
    let mut s = base();
    s.d_state = 257;
    let err = refuse(&problem(s));
    assert_eq!(
        err,
        ScanError::StateSize {
            d_state: 257,
            max: 256
        }
    );
}

#[test]
fn empty_sequence_is_refused_with_the_dimension_named() {
    let mut s = base();
    s.seq_len = 0;
    let err = refuse(&problem(s));
    assert!(
        matches!(
            err,
            ScanError::Empty {
                arg: "u",
                dim: "seq_len",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("seq_len = 0"), "{err}");
}

#[test]
fn empty_batch_is_refused() {
    let mut s = base();
    s.batch = 0;
    let err = refuse(&problem(s));
    assert!(
        matches!(
            err,
            ScanError::Empty {
                arg: "u",
                dim: "batch",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_slice_length_names_the_argument_and_both_counts() {
    let mut p = problem(base());
    p.c.pop();
    let err = refuse(&p);
    assert_eq!(
        err,
        ScanError::Length {
            arg: "C",
            expected: 2 * 2 * 2 * 8,
            actual: 63
        }
    );
}

/// Device-level refusals: mismatched shapes, dtypes and out-of-buffer strides, before any launch.
#[test]
fn device_arguments_are_checked_before_launch() {
    let client = client();
    let buf = upload(&client, &vec![0.0; 4096]);
    let bdl = [2usize, 4, 8];
    let bdl_s = contiguous_strides(&bdl);
    let bad_delta = [2usize, 4, 7];
    let bad_delta_s = contiguous_strides(&bad_delta);
    let dn = [4usize, 2];
    let dn_s = contiguous_strides(&dn);
    let bgnl = [2usize, 2, 2, 8];
    let bgnl_s = contiguous_strides(&bgnl);
    let t = |shape: &'static [usize], strides: &'static [usize], dtype| TensorRef {
        handle: &buf,
        shape,
        strides,
        dtype,
    };
    let leak = |v: Vec<usize>| -> &'static [usize] { Box::leak(v.into_boxed_slice()) };
    let bdl: &'static [usize] = leak(bdl.to_vec());
    let bdl_s = leak(bdl_s);
    let dn: &'static [usize] = leak(dn.to_vec());
    let dn_s = leak(dn_s);
    let bgnl: &'static [usize] = leak(bgnl.to_vec());
    let bgnl_s = leak(bgnl_s);
    let good = ScanArgs {
        u: t(bdl, bdl_s, ScanDtype::F32),
        delta: t(bdl, bdl_s, ScanDtype::F32),
        a: t(dn, dn_s, ScanDtype::F32),
        b: t(bgnl, bgnl_s, ScanDtype::F32),
        c: t(bgnl, bgnl_s, ScanDtype::F32),
        d: None,
        delta_bias: None,
        delta_softplus: true,
    };
    assert!(good.validate().is_ok());

    let mut args = good;
    args.delta = t(leak(bad_delta.to_vec()), leak(bad_delta_s), ScanDtype::F32);
    let err = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap_err();
    assert_eq!(
        err,
        ScanError::Shape {
            arg: "delta",
            expected: vec![2, 4, 8],
            actual: vec![2, 4, 7],
            source: "same as u"
        }
    );
    assert!(err.to_string().contains("[2, 4, 8]") && err.to_string().contains("[2, 4, 7]"));

    let mut args = good;
    args.b = t(bgnl, bgnl_s, ScanDtype::F16);
    let err = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap_err();
    assert_eq!(
        err,
        ScanError::Dtype {
            arg: "B",
            expected: ScanDtype::F32,
            actual: ScanDtype::F16
        }
    );

    let mut args = good;
    args.a = t(dn, dn_s, ScanDtype::F16);
    args.u = t(bdl, bdl_s, ScanDtype::F32);
    let err = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap_err();
    assert!(matches!(err, ScanError::Dtype { arg: "A", .. }), "{err:?}");

    let mut args = good;
    args.u = t(bdl, leak(vec![4096, 8, 1]), ScanDtype::F32);
    let err = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap_err();
    assert!(matches!(err, ScanError::Layout { arg: "u", .. }), "{err:?}");

    let mut args = good;
    args.a = t(leak(vec![4]), leak(vec![1]), ScanDtype::F32);
    let err = selective_scan::forward(&client, &args, ScanConfig::default()).unwrap_err();
    assert!(matches!(err, ScanError::Rank { arg: "A", .. }), "{err:?}");
    assert!(err.to_string().contains("[channels, d_state]"), "{err}");

    let bad_config = ScanConfig {
        units: 100,
        items: 4,
        ..ScanConfig::default()
    };
    let err = selective_scan::forward(&client, &good, bad_config).unwrap_err();
    assert!(matches!(err, ScanError::Config { .. }), "{err:?}");
    let too_big = ScanConfig {
        units: 1024,
        items: 8,
        ..ScanConfig::default()
    };
    let err = selective_scan::forward(&client, &good, too_big).unwrap_err();
    assert!(err.to_string().contains("shared memory"), "{err}");
    let too_many_lanes = ScanConfig {
        states: 16,
        channels: 2,
        ..ScanConfig::default()
    };
    let err = selective_scan::forward(&client, &good, too_many_lanes).unwrap_err();
    assert!(
        err.to_string().contains("states = 16, channels = 2"),
        "{err}"
    );
}

/// A positive `A` makes the recurrence expand (`exp(Δ·A) > 1`): refused by every host entry
/// point, naming `A` and the first offending entry.
#[test]
fn positive_a_is_refused_naming_the_entry() {
    let mut p = problem(base());
    p.a[3] = 0.25; // channel 1, state 1
    let expected = ScanError::Expanding {
        arg: "A",
        at: Some(vec![1, 1]),
        value: 0.25,
    };
    assert_eq!(refuse(&p), expected);
    assert_eq!(
        selective_scan::cpu::forward(&p.slices()).unwrap_err(),
        expected
    );
    let dy = upstream(&p.shape, 1);
    assert_eq!(
        selective_scan::cpu::backward(&p.slices(), &dy).unwrap_err(),
        expected
    );
    let message = expected.to_string();
    assert!(
        message.contains("`A` has 2.5e-1 at [1, 1], above 0"),
        "{message}"
    );
}

/// Without softplus, `Δ = delta + delta_bias` is used as is: a negative step with a negative
/// `A` expands. Refused naming `delta` and `[batch, channel, t]`; with softplus the same raw
/// delta is fine (softplus is never negative), and `A = 0` is fine (a pure running sum).
#[test]
fn negative_step_without_softplus_is_refused_and_accepted_with_softplus() {
    let mut p = problem(base());
    p.delta_softplus = false;
    p.delta_bias = Some(vec![0.5; 4]);
    p.delta = vec![0.1; p.shape.bdl_len()];
    // batch 1, channel 2, t = 5: 8·(1·4 + 2) + 5
    p.delta[8 * 6 + 5] = -0.75;
    let err = refuse(&p);
    assert_eq!(
        err,
        ScanError::Expanding {
            arg: "delta",
            at: Some(vec![1, 2, 5]),
            value: -0.25,
        }
    );
    assert!(
        err.to_string().contains("below 0 with delta_softplus off"),
        "{err}"
    );
    assert_eq!(selective_scan::cpu::forward(&p.slices()).unwrap_err(), err);
    p.delta_softplus = true;
    let y = selective_scan::cpu::forward(&p.slices()).unwrap();
    assert!(
        rel_err(&y, &reference::forward(&p)) <= TOLERANCE,
        "softplus path"
    );
    p.a.iter_mut().for_each(|a| *a = 0.0);
    let y = host::forward_host(&client(), &p, ScanDtype::F32, ScanConfig::default()).unwrap();
    assert!(rel_err(&y, &reference::forward(&p)) <= TOLERANCE, "A = 0");
}

/// The kernels index with 32 bits. Shapes whose outputs or intermediate buffers pass `u32::MAX`
/// elements are refused by size arithmetic alone (nothing is allocated here), naming the
/// buffer; the largest sequence that fits is accepted.
#[test]
fn shapes_past_the_32_bit_index_range_are_refused_by_arithmetic() {
    let config = ScanConfig::default();
    let check = |s: ScanShape| selective_scan::check_index_range(&s, config);
    let max = u128::from(u32::MAX);
    // Bt·D·L = 65535 · 65537 = 2^32 − 1 fits exactly; one more position does not.
    assert_eq!(check(ScanShape::new(1, 65535, 65537, 1, 1)), Ok(()));
    assert_eq!(
        check(ScanShape::new(1, 65535, 65538, 1, 1)),
        Err(ScanError::TooLarge {
            arg: "y",
            elements: 65535 * 65538,
            max,
        })
    );
    // 2^32 − 512 positions is 8_388_607 whole chunks of 512: fits. One more pads past it.
    let fits = 4_294_966_784usize;
    assert_eq!(fits % 512, 0);
    assert_eq!(check(ScanShape::new(1, 1, fits, 1, 1)), Ok(()));
    assert_eq!(
        check(ScanShape::new(1, 1, fits + 1, 1, 1)),
        Err(ScanError::TooLarge {
            arg: "padded seq_len",
            elements: fits as u128 + 512,
            max,
        })
    );
    // One channel per group and 256 states: y is small (64·300000), dB is 256× larger.
    let err = check(ScanShape::new(1, 64, 300_000, 256, 64)).unwrap_err();
    assert_eq!(
        err,
        ScanError::TooLarge {
            arg: "dB",
            elements: 64 * 256 * 300_000,
            max,
        }
    );
    assert!(err.to_string().contains("32-bit index range"), "{err}");
}

/// A strided input whose reach passes the index range is refused before its buffer is
/// consulted: a stride of 2^32 on a small handle (nothing of that size is allocated).
#[test]
fn strided_input_past_the_index_range_is_refused() {
    let client = client();
    let shape = base();
    let handle = upload(&client, &[0.0; 64]);
    let (bdl, dn, bgnl) = (shape.bdl(), shape.dn(), shape.bgnl());
    let (bdl_strides, dn_strides, bgnl_strides) = (
        contiguous_strides(&bdl),
        contiguous_strides(&dn),
        contiguous_strides(&bgnl),
    );
    let huge = [1usize << 32, 8, 1];
    let tensor = |shape: &'static [usize], strides: &'static [usize]| TensorRef {
        handle: &handle,
        shape,
        strides,
        dtype: ScanDtype::F32,
    };
    let leak = |v: Vec<usize>| -> &'static [usize] { Box::leak(v.into_boxed_slice()) };
    let args = ScanArgs {
        u: tensor(leak(bdl.to_vec()), leak(huge.to_vec())),
        delta: tensor(leak(bdl.to_vec()), leak(bdl_strides)),
        a: tensor(leak(dn.to_vec()), leak(dn_strides)),
        b: tensor(leak(bgnl.to_vec()), leak(bgnl_strides.clone())),
        c: tensor(leak(bgnl.to_vec()), leak(bgnl_strides)),
        d: None,
        delta_bias: None,
        delta_softplus: true,
    };
    assert_eq!(
        args.validate().unwrap_err(),
        ScanError::TooLarge {
            arg: "u",
            elements: (1u128 << 32) + 3 * 8 + 7 + 1,
            max: u128::from(u32::MAX),
        }
    );
}

/// The runtime probe: llvmpipe starts and runs the one-step scan; a device that does not
/// exist makes the WGPU runtime panic while starting, which comes back as
/// `ScanError::Unsupported` carrying the runtime's own message (not a panic).
#[test]
fn the_runtime_probe_starts_a_runtime_or_says_why_not() {
    use selective_scan::cubecl::wgpu::WgpuDevice;
    if let Err(e) = host::probe::<WgpuRuntime>(&WgpuDevice::default()) {
        panic!("llvmpipe should start: {e}");
    }
    match host::probe::<WgpuRuntime>(&WgpuDevice::DiscreteGpu(97)).map(|_| ()) {
        Err(ScanError::Unsupported { detail }) => {
            assert!(
                detail.starts_with("the WgpuRuntime did not start: "),
                "{detail}"
            );
            assert!(
                detail.len() > "the WgpuRuntime did not start: ".len() + 5,
                "{detail}"
            );
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
