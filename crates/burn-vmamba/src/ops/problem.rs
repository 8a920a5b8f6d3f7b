//! Running a host-side [`ScanProblem`] through [`super::selective_scan`] on an autodiff
//! backend: the Burn-level path that the tests and `cargo xtask parity` compare with the f64
//! reference.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use selective_scan::{ScanGrads, ScanProblem};

use super::{SelectiveScanBackend, selective_scan};

/// A tensor from row-major f32 values.
pub fn tensor<B: Backend, const D: usize>(
    data: &[f32],
    shape: Vec<usize>,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), device)
}

/// The values of a tensor, row-major, as f32.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("reading a tensor back failed: {e:?}"))
}

/// `y` and the gradients of `Σ dy ⊙ y` with respect to every input, every input tracked,
/// through `selective_scan` on the autodiff backend `B`.
pub fn forward_backward<B>(
    problem: &ScanProblem,
    dy: &[f32],
    device: &B::Device,
) -> (Vec<f32>, ScanGrads<f32>)
where
    B: AutodiffBackend + SelectiveScanBackend,
{
    let s = problem.shape;
    let tracked3 = |v: &[f32]| tensor::<B, 3>(v, s.bdl().to_vec(), device).require_grad();
    let tracked4 = |v: &[f32]| tensor::<B, 4>(v, s.bgnl().to_vec(), device).require_grad();
    let tracked1 = |v: &Vec<f32>| tensor::<B, 1>(v, vec![s.channels], device).require_grad();
    let u = tracked3(&problem.u);
    let delta = tracked3(&problem.delta);
    let a = tensor::<B, 2>(&problem.a, s.dn().to_vec(), device).require_grad();
    let b = tracked4(&problem.b);
    let c = tracked4(&problem.c);
    let d = problem.d.as_ref().map(tracked1);
    let bias = problem.delta_bias.as_ref().map(tracked1);
    let y = selective_scan(
        u.clone(),
        delta.clone(),
        a.clone(),
        b.clone(),
        c.clone(),
        d.clone(),
        bias.clone(),
        problem.delta_softplus,
    );
    let upstream = tensor::<B, 3>(dy, s.bdl().to_vec(), device);
    let grads = (y.clone() * upstream).sum().backward();
    let grad =
        |name: &str, g: Option<Vec<f32>>| g.unwrap_or_else(|| panic!("no gradient for {name}"));
    let dd = d.map(|t| grad("D", t.grad(&grads).map(host)));
    let ddelta_bias = bias.map(|t| grad("delta_bias", t.grad(&grads).map(host)));
    (
        host(y),
        ScanGrads {
            du: grad("u", u.grad(&grads).map(host)),
            ddelta: grad("delta", delta.grad(&grads).map(host)),
            da: grad("A", a.grad(&grads).map(host)),
            db: grad("B", b.grad(&grads).map(host)),
            dc: grad("C", c.grad(&grads).map(host)),
            dd,
            ddelta_bias,
        },
    )
}
