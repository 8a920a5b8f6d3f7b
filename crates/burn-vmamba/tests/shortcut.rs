//! The negative control (`ops::shortcut`, feature `shortcut-control`) against its formula
//! written out on the host in f64, with groups, a bias, raw delta past softplus's threshold of
//! 20, and the skip; and the switch: off again, `selective_scan` is the exact scan. Its own test
//! binary, because the switch is process-wide and would change the other scan tests' results.
#![cfg(feature = "shortcut-control")]

use burn::backend::NdArray;
use burn_vmamba::ops::problem::{host, tensor};
use burn_vmamba::ops::shortcut;
use burn_vmamba::selective_scan;
use selective_scan::{RandomSpec, ScanProblem, ScanShape, reference};

fn softplus(x: f64) -> f64 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

#[test]
fn shortcut_is_the_zero_state_last_c_formula_and_switches_off() {
    type B = NdArray;
    let device = Default::default();
    let spec = RandomSpec {
        delta_range: (-3.0, 30.0),
        ..RandomSpec::default()
    };
    // batch 2, channels 6 in 3 groups, L 5, N 3.
    let s = ScanShape::new(2, 6, 5, 3, 3);
    let p = ScanProblem::random(s, &spec, 4);
    assert!(
        p.delta.iter().any(|&x| x > 21.0),
        "a raw delta past the threshold"
    );
    let run = || {
        let [bt, d, l] = s.bdl();
        selective_scan::<B>(
            tensor(&p.u, vec![bt, d, l], &device),
            tensor(&p.delta, vec![bt, d, l], &device),
            tensor(&p.a, s.dn().to_vec(), &device),
            tensor(&p.b, s.bgnl().to_vec(), &device),
            tensor(&p.c, s.bgnl().to_vec(), &device),
            p.d.as_ref().map(|v| tensor(v, vec![d], &device)),
            p.delta_bias.as_ref().map(|v| tensor(v, vec![d], &device)),
            true,
        )
    };

    shortcut::enable(true);
    assert!(shortcut::enabled());
    let got = host(run());
    shortcut::enable(false);

    let (bt, d, l, g, n) = (s.batch, s.channels, s.seq_len, s.groups, s.d_state);
    let (dd, bias) = (p.d.as_ref().unwrap(), p.delta_bias.as_ref().unwrap());
    let mut worst = 0.0f64;
    for b in 0..bt {
        for ch in 0..d {
            let grp = ch / (d / g);
            for t in 0..l {
                let i = (b * d + ch) * l + t;
                let u = f64::from(p.u[i]);
                let dt = softplus(f64::from(p.delta[i]) + f64::from(bias[ch]));
                let bc: f64 = (0..n)
                    .map(|k| {
                        let at =
                            |v: &[f32], t: usize| f64::from(v[((b * g + grp) * n + k) * l + t]);
                        at(&p.b, t) * at(&p.c, l - 1)
                    })
                    .sum();
                let want = dt * u * bc + f64::from(dd[ch]) * u;
                worst = worst.max((f64::from(got[i]) - want).abs() / want.abs().max(1.0));
            }
        }
    }
    assert!(worst < 1e-5, "shortcut vs its formula: {worst:.2e}");

    let y_ref = reference::forward(&p);
    let exact = host(run());
    let scale = y_ref.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = exact
        .iter()
        .zip(&y_ref)
        .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()))
        / scale;
    assert!(err < 2e-5, "switched off, the exact scan: {err:.2e}");
}
