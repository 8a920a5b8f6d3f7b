//! The reference itself: the hand-computed golden numbers
//! (`common::GOLDEN`) and central finite differences.

mod common;

use common::{assert_golden, golden_problem};
use rstest::rstest;
use selective_scan::reference::{Problem64, backward64, forward64};
use selective_scan::{RandomSpec, ScanProblem, ScanShape, SplitMix64, reference};

#[test]
fn reference_reproduces_the_golden_numbers_of_the_spec() {
    let (y, g) = reference::backward(&golden_problem(), &[1.0; 3]);
    assert_golden(&y, &g, 1e-9);
}

/// Every field of the problem that has a gradient, by name.
fn field<'a>(p: &'a mut Problem64, name: &str) -> &'a mut Vec<f64> {
    match name {
        "u" => &mut p.u,
        "delta" => &mut p.delta,
        "A" => &mut p.a,
        "B" => &mut p.b,
        "C" => &mut p.c,
        "D" => p.d.as_mut().unwrap(),
        "delta_bias" => p.delta_bias.as_mut().unwrap(),
        _ => unreachable!(),
    }
}

/// Central differences of `L = Σ dy ⊙ y` in f64, step 1e-6, against the analytic backward.
#[rstest]
#[case::softplus_with_bias(true, 1)]
#[case::softplus_grouped(true, 2)]
#[case::raw_delta(false, 1)]
fn reference_backward_matches_central_finite_differences(
    #[case] softplus: bool,
    #[case] groups: usize,
) {
    let shape = ScanShape {
        batch: 2,
        channels: 4,
        seq_len: 6,
        d_state: 3,
        groups,
    };
    let spec = RandomSpec {
        delta_softplus: softplus,
        delta_range: if softplus { (-3.0, 1.0) } else { (0.05, 1.0) },
        with_delta_bias: softplus,
        ..RandomSpec::default()
    };
    let p32 = ScanProblem::random(shape, &spec, 77);
    let p = Problem64::from(&p32);
    let dy: Vec<f64> = SplitMix64::new(5)
        .vec(shape.bdl_len(), -1.0, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let (_, grads) = backward64(&p, &dy);
    let loss = |q: &Problem64| -> f64 { forward64(q).iter().zip(&dy).map(|(y, g)| y * g).sum() };
    let names = ["u", "delta", "A", "B", "C", "D", "delta_bias"];
    let analytic = [
        Some(&grads.du),
        Some(&grads.ddelta),
        Some(&grads.da),
        Some(&grads.db),
        Some(&grads.dc),
        grads.dd.as_ref(),
        grads.ddelta_bias.as_ref(),
    ];
    let eps = 1e-6;
    for (name, analytic) in names.iter().zip(analytic) {
        let Some(analytic) = analytic else { continue };
        for (i, &expected) in analytic.iter().enumerate() {
            let mut plus = p.clone();
            field(&mut plus, name)[i] += eps;
            let mut minus = p.clone();
            field(&mut minus, name)[i] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps);
            let diff = (numeric - expected).abs();
            assert!(
                diff <= 1e-6 * (1.0 + expected.abs()),
                "{name}[{i}]: analytic {expected} vs finite difference {numeric}"
            );
        }
    }
}

#[test]
fn softplus_uses_the_threshold_twenty_rule() {
    assert_eq!(reference::softplus(20.5), 20.5);
    assert!((reference::softplus(0.0) - std::f64::consts::LN_2).abs() < 1e-15);
    assert_eq!(reference::softplus_grad(25.0), 1.0);
    assert!((reference::softplus_grad(0.0) - 0.5).abs() < 1e-15);
}
