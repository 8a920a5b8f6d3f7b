//! `model::conv`: the convolutions as tensor ops against Burn's own `Conv2d::forward`, outputs
//! and all gradients (input, weight, bias), for the stems, downsamples and SS2D's depthwise conv
//! and for odd sizes, strides that do not divide the input, and asymmetric padding.

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use burn_vmamba::model::conv::conv2d_by_tensor_ops;
use rstest::rstest;
use selective_scan::SplitMix64;

type B = Autodiff<NdArray>;

fn values<const D: usize, E: Backend>(t: Tensor<E, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// A tensor of uniform values in [-1, 1) from a local generator: Burn's own random tensors and
/// lazy parameter initialisation draw from one process-wide generator that the other tests,
/// running on other threads, draw from too, so they are not reproducible inside a test.
fn uniform<const D: usize>(rng: &mut SplitMix64, shape: [usize; D]) -> Tensor<B, D> {
    let values = rng.vec(shape.iter().product(), -1.0, 1.0);
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    // f32 sums of ≤ 100 products in another order.
    assert!(err <= 2e-6, "{what}: max rel err {err:e}");
}

#[rstest]
#[case::ss2d_depthwise_3x3(6, 6, [3, 3], [1, 1], [1, 1, 1, 1], true, [2, 5, 7])]
#[case::depthwise_4x4_odd(5, 5, [4, 4], [1, 1], [1, 1, 1, 1], false, [1, 7, 6])]
#[case::stem_v1_patch4(3, 8, [4, 4], [4, 4], [0, 0, 0, 0], true, [2, 16, 12])]
#[case::stem_v1_not_divisible(3, 8, [4, 4], [4, 4], [0, 0, 0, 0], true, [1, 18, 13])]
#[case::stem_v2_3x3_s2(3, 4, [3, 3], [2, 2], [1, 1, 1, 1], true, [2, 9, 10])]
#[case::downsample_v2_2x2_s2(4, 8, [2, 2], [2, 2], [0, 0, 0, 0], true, [2, 7, 6])]
#[case::downsample_v3_3x3_s2(4, 8, [3, 3], [2, 2], [1, 1, 1, 1], true, [1, 5, 7])]
#[case::asymmetric_padding(3, 5, [3, 2], [1, 2], [2, 0, 1, 1], true, [2, 6, 5])]
fn conv_by_tensor_ops_matches_conv2d(
    #[case] c_in: usize,
    #[case] c_out: usize,
    #[case] kernel: [usize; 2],
    #[case] stride: [usize; 2],
    #[case] padding: [usize; 4],
    #[case] bias: bool,
    #[case] input: [usize; 3],
) {
    let [batch, height, width] = input;
    let device = Default::default();
    let depthwise = c_in == c_out && stride == [1, 1];
    let [top, left, bottom, right] = padding;
    let groups = if depthwise { c_in } else { 1 };
    let conv: Conv2d<B> = Conv2dConfig::new([c_in, c_out], kernel)
        .with_stride(stride)
        .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
        .with_groups(groups)
        .with_bias(bias)
        .init(&device);
    let mut rng = SplitMix64::new(5);
    let weight = uniform(&mut rng, [c_out, c_in / groups, kernel[0], kernel[1]]);
    let bias = bias.then(|| uniform(&mut rng, [c_out]));
    let x = uniform(&mut rng, [batch, c_in, height, width]);
    let run = |by_ops: bool| {
        let conv = Conv2d {
            weight: Param::from_tensor(weight.clone().require_grad()),
            bias: bias.clone().map(|b| Param::from_tensor(b.require_grad())),
            ..conv.clone()
        };
        let x = x.clone().require_grad();
        let y = if by_ops {
            conv2d_by_tensor_ops(&conv, x.clone())
        } else {
            conv.forward(x.clone())
        };
        let dims = y.dims();
        let dy = uniform(&mut SplitMix64::new(9), dims);
        let grads = (y.clone() * dy).sum().backward();
        let dx = x.grad(&grads).map(values);
        let dw = conv.weight.val().grad(&grads).map(values);
        let db = conv
            .bias
            .as_ref()
            .and_then(|b| b.val().grad(&grads))
            .map(values);
        (dims, values(y), dx, dw, db)
    };
    let want = run(false);
    let got = run(true);
    assert_eq!(got.0, want.0, "output shape");
    assert_close("y", got.1, want.1);
    assert_close("dx", got.2.unwrap(), want.2.unwrap());
    assert_close("dweight", got.3.unwrap(), want.3.unwrap());
    if bias.is_some() {
        assert_close("dbias", got.4.unwrap(), want.4.unwrap());
    }
}
