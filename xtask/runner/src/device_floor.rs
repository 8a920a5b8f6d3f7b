//! The floor of a CubeCL device for `bench scan`: the fastest device-to-device copy this
//! runtime can run, and its `exp` throughput.
//!
//! A copy kernel's figure depends on how it is written: one `f32` per unit with a bounds check
//! reached about half of what `cudaMemcpy` moves on an H200. So the bench runs several copies
//! (one `f32` per unit, checked, as before; vectors of 4 `f32` — 16-byte loads and stores —
//! with 1, 4 and 8 vectors per unit, launched unchecked) and keeps the fastest: the floor
//! comes from the best copy measured, never from the code under test. The exp rate comes from
//! a kernel that keeps 4 independent chains `x ← exp(−x)` per unit in registers (no memory
//! traffic), so that an exp-bound pass (the N = 16 shapes compute `B·D·L·N` exponentials per
//! direction) gets its floor from the exp unit when that is higher than the traffic's.

use cubecl::prelude::*;

/// Copies `output[i] = input[i]`, one `f32` per unit, bounds-checked.
#[cube(launch)]
fn copy_scalar(input: &Array<f32>, output: &mut Array<f32>) {
    let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize)
        * CUBE_DIM_X as usize
        + UNIT_POS_X as usize;
    if i < output.len() {
        output[i] = input[i];
    }
}

/// Copies vectors of `N` floats, `per_unit` of them per unit: in step `k`, the cube's units
/// read consecutive vectors (coalesced), `CUBE_DIM_X` vectors after step `k - 1`.
#[cube(launch_unchecked)]
fn copy_vectors<N: Size>(
    input: &Array<Vector<f32, N>>,
    output: &mut Array<Vector<f32, N>>,
    #[comptime] per_unit: usize,
) {
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let base = cube * CUBE_DIM_X as usize * per_unit + UNIT_POS_X as usize;
    #[unroll]
    for k in 0..per_unit {
        let i = base + k * CUBE_DIM_X as usize;
        if i < output.len() {
            output[i] = input[i];
        }
    }
}

/// `rounds` steps of 4 independent chains `x ← exp(−x)` per unit; writes their sum (so that
/// nothing is optimised away). 4 exps per unit per round.
#[cube(launch_unchecked)]
fn exp_chains(output: &mut Array<f32>, #[comptime] rounds: usize) {
    let i = ABSOLUTE_POS;
    let seed = (i % 1024) as f32 * 0.0009765625;
    let mut x0 = seed;
    let mut x1 = seed + 0.25;
    let mut x2 = seed + 0.5;
    let mut x3 = seed + 0.75;
    for _ in 0..rounds {
        x0 = (-x0).exp();
        x1 = (-x1).exp();
        x2 = (-x2).exp();
        x3 = (-x3).exp();
    }
    if i < output.len() {
        output[i] = x0 + x1 + x2 + x3;
    }
}

/// Waits for everything queued on `client`'s device (the benches time whole passes).
pub fn sync<R: Runtime>(client: &ComputeClient<R>) {
    if let Err(e) = cubecl::future::block_on(client.sync()) {
        panic!("device sync failed: {e:?}");
    }
}

/// A cube count of at least `cubes` cubes laid out within the 65535 limit of a dimension.
fn grid(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65535);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

/// What [`measure`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceFloor {
    /// The fastest copy: (read + write) bytes / time, GB/s.
    pub copy_gbps: f64,
    /// Which copy that was.
    pub copy_kernel: String,
    /// Every copy tried, GB/s.
    pub copies: Vec<(String, f64)>,
    /// Exponentials per second.
    pub exps_per_s: f64,
}

/// The copy kernels of the module docs, each copying `n` floats (`n` a multiple of 32).
pub fn copies<'a, R: Runtime>(
    client: &'a ComputeClient<R>,
    input: &'a cubecl::server::Handle,
    output: &'a cubecl::server::Handle,
    n: usize,
) -> Vec<(String, Box<dyn Fn() + 'a>)> {
    let units = 256usize;
    let mut v: Vec<(String, Box<dyn Fn() + 'a>)> = vec![(
        "f32 per unit, checked".to_string(),
        Box::new(move || {
            copy_scalar::launch::<R>(
                client,
                grid(n.div_ceil(units)),
                CubeDim::new_1d(units as u32),
                // SAFETY: both buffers hold exactly n f32 and the kernel guards i < n.
                unsafe { ArrayArg::from_raw_parts(input.clone(), n) },
                unsafe { ArrayArg::from_raw_parts(output.clone(), n) },
            )
        }),
    )];
    for per_unit in [1usize, 4, 8] {
        let vectors = n / 4;
        v.push((
            format!("4 x f32 vectors, {per_unit} per unit, unchecked"),
            Box::new(move || {
                // SAFETY: both buffers hold n f32 = n / 4 vectors of 4 (an array's length is
                // given in scalars; the kernel's `len()` counts vectors); the kernel guards
                // i < n / 4 for every index it touches.
                unsafe {
                    copy_vectors::launch_unchecked::<R>(
                        client,
                        grid(vectors.div_ceil(units * per_unit)),
                        CubeDim::new_1d(units as u32),
                        4,
                        ArrayArg::from_raw_parts(input.clone(), n),
                        ArrayArg::from_raw_parts(output.clone(), n),
                        per_unit,
                    )
                }
            }),
        ));
    }
    v
}

/// Measures the device floor with copies of `n` floats (`n` a multiple of 32) and `units`
/// exp chains.
pub fn measure<R: Runtime>(client: &ComputeClient<R>, n: usize, exp_units: usize) -> DeviceFloor {
    let input = client.create_from_slice(bytemuck::cast_slice(&vec![1.0f32; n]));
    let output = client.empty(n * 4);
    let mut copies_gbps = vec![];
    for (name, copy) in copies(client, &input, &output, n) {
        let ms = crate::median_ms(5, || {
            copy();
            sync(client);
        });
        copies_gbps.push((name, (2 * 4 * n) as f64 / (ms * 1e-3) / 1e9));
    }
    let (copy_kernel, copy_gbps) = copies_gbps
        .iter()
        .cloned()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("at least one copy");

    const ROUNDS: usize = 256;
    let sums = client.empty(exp_units * 4);
    let ms = crate::median_ms(5, || {
        // SAFETY: `sums` holds exp_units f32 and the kernel guards i < exp_units.
        unsafe {
            exp_chains::launch_unchecked::<R>(
                client,
                grid(exp_units.div_ceil(256)),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(sums.clone(), exp_units),
                ROUNDS,
            )
        }
        sync(client);
    });
    DeviceFloor {
        copy_gbps,
        copy_kernel,
        copies: copies_gbps,
        exps_per_s: (exp_units * ROUNDS * 4) as f64 / (ms * 1e-3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every copy kernel copies every element (odd tails included), on WGPU.
    #[test]
    fn every_copy_copies_everything() {
        let client = crate::backends::wgpu_client();
        let n = 32 * 1000 + 96;
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let input = client.create_from_slice(bytemuck::cast_slice(&values));
        let kinds = copies(&client, &input, &input, n).len();
        for k in 0..kinds {
            let output = client.create_from_slice(bytemuck::cast_slice(&vec![0.0f32; n]));
            let (name, copy) = copies(&client, &input, &output, n).swap_remove(k);
            copy();
            drop(copy);
            let got = client.read_one(output).unwrap();
            assert_eq!(bytemuck::cast_slice::<u8, f32>(&got), &values[..], "{name}");
        }
    }

    /// The exp-chain kernel computes what its documentation says (checked against f64).
    #[test]
    fn exp_chains_compute_the_chains() {
        let client = crate::backends::wgpu_client();
        let units = 1000;
        let sums = client.empty(units * 4);
        unsafe {
            exp_chains::launch_unchecked::<selective_scan::cubecl::wgpu::WgpuRuntime>(
                &client,
                grid(units.div_ceil(256)),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(sums.clone(), units),
                7,
            )
        }
        let got = client.read_one(sums).unwrap();
        let got = bytemuck::cast_slice::<u8, f32>(&got);
        for (i, g) in got.iter().enumerate() {
            let seed = (i % 1024) as f64 / 1024.0;
            let want: f64 = [0.0, 0.25, 0.5, 0.75]
                .iter()
                .map(|o| (0..7).fold(seed + o, |x, _| (-x).exp()))
                .sum();
            assert!(
                (f64::from(*g) - want).abs() < 1e-5,
                "unit {i}: {g} vs {want}"
            );
        }
    }
}
