//! Cross-scan and cross-merge: the four directional flattenings of a feature map,
//! and their exact adjoint.
//!
//! For `x[h, w]` with `L = H·W`:
//! - k=0 row-major: `seq0[h·W + w] = x[h, w]`
//! - k=1 column-major: `seq1[w·H + h] = x[h, w]`
//! - k=2 reversed k=0: `seq2[L−1−(h·W+w)] = x[h, w]`
//! - k=3 reversed k=1: `seq3[L−1−(w·H+h)] = x[h, w]`
//!
//! Cross-merge sums the four sequences back onto the map, so it is the transpose of
//! cross-scan: `<cross_scan(x), y> = <x, cross_merge(y)>`. Both are plain tensor ops, so
//! gradients flow through them on every backend.

use burn::tensor::{Tensor, backend::Backend};

/// The four directional sequences of a channel-first map.
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]`
/// - returns: `[batch, 4, channels, height·width]`
pub fn cross_scan<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, channels, height, width] = x.dims();
    let len = height * width;
    let rows = x.clone().reshape([batch, 1, channels, len]);
    let cols = x.swap_dims(2, 3).reshape([batch, 1, channels, len]);
    let forward = Tensor::cat(vec![rows, cols], 1); // [batch, 2, channels, len]
    let backward = forward.clone().flip([3]);
    Tensor::cat(vec![forward, backward], 1)
}

/// Sums four directional sequences back onto the map: the adjoint of [`cross_scan`].
///
/// # Shapes
/// - `ys`: `[batch, 4, channels, height·width]`
/// - returns: `[batch, channels, height, width]`
///
/// # Panics
/// If `ys` does not have 4 directions or its last axis is not `height·width`.
pub fn cross_merge<B: Backend>(ys: Tensor<B, 4>, height: usize, width: usize) -> Tensor<B, 4> {
    let [batch, directions, channels, len] = ys.dims();
    assert!(
        directions == 4 && len == height * width,
        "cross_merge: ys must be [batch, 4, channels, height·width] = [{batch}, 4, {channels}, {}], \
         found {:?}",
        height * width,
        ys.dims()
    );
    let forward = ys.clone().narrow(1, 0, 2);
    let backward = ys.narrow(1, 2, 2).flip([3]);
    let both = forward + backward; // [batch, 2, channels, len]: k0+k2 row-major, k1+k3 column-major
    let rows = both
        .clone()
        .narrow(1, 0, 1)
        .reshape([batch, channels, height, width]);
    let cols = both
        .narrow(1, 1, 1)
        .reshape([batch, channels, width, height])
        .swap_dims(2, 3);
    rows + cols
}
