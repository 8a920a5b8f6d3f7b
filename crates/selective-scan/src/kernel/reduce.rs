//! Deterministic reduction of partial gradients over a middle axis, in a fixed order.

use cubecl::prelude::*;

/// `output[o, i] = Σ_p input[o, p, i]`, summed with `p` ascending.
///
/// # Shapes
/// - `input`: `[outer, parts, inner]` contiguous
/// - `output`: `[outer, inner]` contiguous
#[cube(launch_unchecked)]
pub fn sum_middle_axis_kernel(
    input: &Tensor<f32>,
    output: &mut Tensor<f32>,
    parts: u32,
    inner: u32,
) {
    let position = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize)
        * CUBE_DIM_X as usize
        + UNIT_POS_X as usize;
    let inner = inner as usize;
    let parts = parts as usize;
    if position < output.len() {
        let outer = position / inner;
        let i = position % inner;
        let mut total = 0.0f32;
        for p in 0..parts {
            total += input[(outer * parts + p) * inner + i];
        }
        output[position] = total;
    }
}
