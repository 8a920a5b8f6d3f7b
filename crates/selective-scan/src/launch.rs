//! Launch wrappers: validate every argument, then dispatch the kernels on the input dtype.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::kernel::backward::scan_backward_kernel;
use crate::kernel::forward::scan_forward_kernel;
use crate::kernel::reduce::sum_middle_axis_kernel;
use crate::{ArgShapes, MAX_D_STATE, ScanDtype, ScanError, ScanShape, contiguous_strides};

/// Whether the cube-wide scans use plane (warp) operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Planes {
    /// Use them when the device reports plane operations and `units` is a multiple of its
    /// largest plane size (CUDA, ROCm, WGPU on GPUs); shared memory otherwise (WGPU on CPU
    /// adapters such as llvmpipe).
    #[default]
    Auto,
    /// Always the shared-memory scan.
    Off,
    /// Always the plane scan, even where the runtime does not advertise plane operations (tests
    /// use it to run the plane path on llvmpipe, whose Vulkan driver has subgroups that WGPU
    /// leaves unadvertised on CPU adapters). `units` must still be a multiple of the plane size.
    On,
}

/// How the work is split inside a cube: `units` units each own `items` consecutive positions
/// of a chunk of `units · items` positions, for `channels` channels of one group at once (they
/// share each load of `B` and `C`, and the backward sums their `dB`/`dC` in registers), and the
/// states are scanned `states` at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScanConfig {
    /// Units per cube (a power of two).
    pub units: usize,
    /// Positions per unit and chunk, held in registers.
    pub items: usize,
    /// States scanned together in one cube-wide scan (capped at `d_state`).
    pub states: usize,
    /// Channels of one group handled together by a cube.
    pub channels: usize,
    /// Plane (warp) scans or shared-memory scans.
    pub planes: Planes,
}

impl Default for ScanConfig {
    /// 128 units × 4 items (chunks of 512 positions), 2 states × 2 channels per scan, planes
    /// where the device has them.
    fn default() -> Self {
        Self {
            units: 128,
            items: 4,
            states: 2,
            channels: 2,
            planes: Planes::Auto,
        }
    }
}

impl std::fmt::Display for ScanConfig {
    /// `UNITSxITEMSxSTATESxCHANNELS`, then `:planes` or `:shared` unless the choice is
    /// automatic: the form [`ScanConfig::from_str`](std::str::FromStr) reads (e.g. `128x4x2x2`,
    /// `64x8x4x1:shared`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{}x{}",
            self.units, self.items, self.states, self.channels
        )?;
        match self.planes {
            Planes::Auto => Ok(()),
            Planes::On => write!(f, ":planes"),
            Planes::Off => write!(f, ":shared"),
        }
    }
}

impl std::str::FromStr for ScanConfig {
    type Err = String;

    /// Reads the form written by `Display`; the values are checked against a device at launch.
    fn from_str(text: &str) -> Result<Self, String> {
        let (sizes, planes) = match text.split_once(':') {
            None => (text, Planes::Auto),
            Some((sizes, "planes")) => (sizes, Planes::On),
            Some((sizes, "shared")) => (sizes, Planes::Off),
            Some((sizes, "auto")) => (sizes, Planes::Auto),
            Some((_, other)) => {
                return Err(format!(
                    "scan config `{text}`: unknown plane choice `{other}` (expected planes, shared or auto)"
                ));
            }
        };
        let numbers: Vec<usize> = sizes
            .split('x')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!("scan config `{text}`: {e} (expected UNITSxITEMSxSTATESxCHANNELS)")
            })?;
        match numbers[..] {
            [units, items, states, channels] => Ok(Self {
                units,
                items,
                states,
                channels,
                planes,
            }),
            _ => Err(format!(
                "scan config `{text}`: expected four sizes UNITSxITEMSxSTATESxCHANNELS, got {}",
                numbers.len()
            )),
        }
    }
}

/// The largest `states · channels` a config may ask for: the backward keeps
/// `2 · states · channels · items` values per unit in registers besides the per-channel ones.
pub const MAX_LANES_PER_SCAN: usize = 16;

impl ScanConfig {
    /// Positions per chunk, `units · items`.
    pub fn chunk_len(&self) -> usize {
        self.units * self.items
    }

    /// Number of chunks for a sequence of `seq_len`.
    pub fn n_chunks(&self, seq_len: usize) -> usize {
        seq_len.div_ceil(self.chunk_len())
    }

    /// States per cube-wide scan for a problem with `d_state` states.
    pub fn states_for(&self, d_state: usize) -> usize {
        self.states.min(d_state).max(1)
    }

    /// Shared memory of the larger of the two kernels (the backward), in bytes, for `d_state`
    /// states: two scan arrays of `units · channels · max(states, 2)` values and two per-state
    /// arrays of `channels · 256`.
    pub fn shared_memory_bytes(&self, d_state: usize) -> usize {
        let states = self.states_for(d_state);
        4 * (2 * self.units * self.channels * states.max(2) + 2 * self.channels * MAX_D_STATE)
    }

    /// Whether the kernels will use plane scans on this device.
    pub fn uses_planes<R: Runtime>(&self, client: &ComputeClient<R>) -> bool {
        let properties = client.properties();
        let fits = self
            .units
            .is_multiple_of(properties.hardware.plane_size_max.max(1) as usize);
        match self.planes {
            Planes::Off => false,
            Planes::On => true,
            Planes::Auto => {
                fits && properties
                    .features
                    .plane
                    .contains(cubecl::ir::features::Plane::Ops)
            }
        }
    }

    fn validate<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        d_state: usize,
    ) -> Result<(), ScanError> {
        let hardware = &client.properties().hardware;
        if !self.units.is_power_of_two() || self.items == 0 {
            return Err(ScanError::Config {
                detail: format!(
                    "units must be a power of two and items at least 1, got units = {}, items = {}",
                    self.units, self.items
                ),
            });
        }
        if self.states == 0
            || self.channels == 0
            || self.states * self.channels > MAX_LANES_PER_SCAN
        {
            return Err(ScanError::Config {
                detail: format!(
                    "states and channels must be at least 1 with states · channels ≤ {MAX_LANES_PER_SCAN}, \
                     got states = {}, channels = {}",
                    self.states, self.channels
                ),
            });
        }
        if self.units > hardware.max_units_per_cube as usize {
            return Err(ScanError::Config {
                detail: format!(
                    "units = {} exceeds the device's {} units per cube",
                    self.units, hardware.max_units_per_cube
                ),
            });
        }
        if self.planes == Planes::On
            && !self
                .units
                .is_multiple_of(hardware.plane_size_max.max(1) as usize)
        {
            return Err(ScanError::Config {
                detail: format!(
                    "plane scans need units = {} to be a multiple of the device's plane size {}",
                    self.units, hardware.plane_size_max
                ),
            });
        }
        let bytes = self.shared_memory_bytes(d_state);
        if bytes > hardware.max_shared_memory_size {
            return Err(ScanError::Config {
                detail: format!(
                    "units = {}, states = {} need {bytes} bytes of shared memory, the device has {}",
                    self.units,
                    self.states_for(d_state),
                    hardware.max_shared_memory_size
                ),
            });
        }
        Ok(())
    }
}

/// A tensor on the device: a handle with its shape, strides (in elements) and dtype.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// The buffer.
    pub handle: &'a Handle,
    /// Sizes per dimension.
    pub shape: &'a [usize],
    /// Strides per dimension, in elements.
    pub strides: &'a [usize],
    /// Element type.
    pub dtype: ScanDtype,
}

impl<'a> TensorRef<'a> {
    fn arg<R: Runtime>(&self) -> TensorArg<R> {
        // SAFETY: `check_layout` verified that every index reachable through these shape and
        // strides lies inside the handle.
        unsafe {
            TensorArg::from_raw_parts(
                self.handle.clone(),
                self.strides.iter().copied().into(),
                self.shape.iter().copied().into(),
            )
        }
    }

    /// The last reachable element + 1, without overflow.
    fn extent(&self) -> u128 {
        self.shape
            .iter()
            .zip(self.strides)
            .map(|(&size, &stride)| (size as u128).saturating_sub(1) * stride as u128)
            .sum::<u128>()
            + 1
    }

    fn check_layout(&self, arg: &'static str, expected: ScanDtype) -> Result<(), ScanError> {
        if self.dtype != expected {
            return Err(ScanError::Dtype {
                arg,
                expected,
                actual: self.dtype,
            });
        }
        if self.strides.len() != self.shape.len() {
            return Err(ScanError::Layout {
                arg,
                detail: format!(
                    "{} strides for {} dimensions (shape {:?}, strides {:?})",
                    self.strides.len(),
                    self.shape.len(),
                    self.shape,
                    self.strides
                ),
            });
        }
        let extent = self.extent();
        check_extent(arg, extent)?;
        let last = extent - 1;
        let capacity = u128::from(self.handle.size()) / self.dtype.size() as u128;
        if last >= capacity {
            return Err(ScanError::Layout {
                arg,
                detail: format!(
                    "shape {:?} with strides {:?} reaches element {last}, the buffer holds {capacity}",
                    self.shape, self.strides
                ),
            });
        }
        Ok(())
    }
}

/// Arguments of one scan on the device.
///
/// # Shapes
/// - `u, delta`: `[batch, channels, seq_len]`, dtype f32, f16 or bf16 (both the same)
/// - `a`: `[channels, d_state]`, f32
/// - `b, c`: `[batch, groups, d_state, seq_len]`, dtype of `u`
/// - `d`, `delta_bias`: `[channels]`, f32
#[derive(Debug, Clone, Copy)]
pub struct ScanArgs<'a> {
    /// Input sequence.
    pub u: TensorRef<'a>,
    /// Raw step sizes.
    pub delta: TensorRef<'a>,
    /// State matrix (real).
    pub a: TensorRef<'a>,
    /// Input projection, per group.
    pub b: TensorRef<'a>,
    /// Output projection, per group.
    pub c: TensorRef<'a>,
    /// Skip connection.
    pub d: Option<TensorRef<'a>>,
    /// Bias added to `delta`.
    pub delta_bias: Option<TensorRef<'a>>,
    /// Apply softplus (threshold 20) to `delta + delta_bias`.
    pub delta_softplus: bool,
}

impl ScanArgs<'_> {
    /// Validates shapes, dtypes and layouts, and returns the problem sizes.
    pub fn validate(&self) -> Result<ScanShape, ScanError> {
        let shape = ScanShape::from_args(&ArgShapes {
            u: self.u.shape,
            delta: self.delta.shape,
            a: self.a.shape,
            b: self.b.shape,
            c: self.c.shape,
            d: self.d.map(|t| t.shape),
            delta_bias: self.delta_bias.map(|t| t.shape),
        })?;
        let input = self.u.dtype;
        self.u.check_layout("u", input)?;
        self.delta.check_layout("delta", input)?;
        self.a.check_layout("A", ScanDtype::F32)?;
        self.b.check_layout("B", input)?;
        self.c.check_layout("C", input)?;
        if let Some(d) = &self.d {
            d.check_layout("D", ScanDtype::F32)?;
        }
        if let Some(bias) = &self.delta_bias {
            bias.check_layout("delta_bias", ScanDtype::F32)?;
        }
        Ok(shape)
    }
}

/// The largest extent, in elements, of any tensor the kernels index: they use CubeCL's default
/// 32-bit addresses, so every index and every loop bound must fit in a `u32`.
pub const MAX_INDEX_EXTENT: u128 = u32::MAX as u128;

fn check_extent(arg: &'static str, elements: u128) -> Result<(), ScanError> {
    if elements <= MAX_INDEX_EXTENT {
        Ok(())
    } else {
        Err(ScanError::TooLarge {
            arg,
            elements,
            max: MAX_INDEX_EXTENT,
        })
    }
}

/// Refuses a problem whose outputs or intermediate buffers the kernels could not index with 32
/// bits: `y`, `du`, `ddelta` (`Bt·D·L`), the chunk-end states (`Bt·D·n_chunks·N`), the
/// per-block `dB`/`dC` partials (`Bt·G·blocks·N·L`), `dB`/`dC` themselves, and the sequence
/// padded to whole chunks. Pure arithmetic on the sizes, so it can be checked (and tested) for
/// shapes far too large to allocate. The inputs' own extents are checked with their layouts
/// ([`ScanArgs::validate`]), before the buffer's size is consulted.
pub fn check_index_range(shape: &ScanShape, config: ScanConfig) -> Result<(), ScanError> {
    let w = |x: usize| x as u128;
    let (bt, d, l, n, g) = (
        w(shape.batch),
        w(shape.channels),
        w(shape.seq_len),
        w(shape.d_state),
        w(shape.groups),
    );
    let chunk = w(config.chunk_len());
    let n_chunks = l.div_ceil(chunk.max(1));
    let per_block = w(channels_per_block(shape, config)).max(1);
    let blocks = (d / g.max(1)).div_ceil(per_block);
    for (arg, elements) in [
        ("y", bt * d * l),
        ("padded seq_len", n_chunks * chunk),
        ("carries", bt * d * n_chunks * n),
        ("dB", bt * g * n * l),
        ("dB partials", bt * g * blocks * n * l),
    ] {
        check_extent(arg, elements)?;
    }
    Ok(())
}

/// A contiguous f32 tensor produced by the scan.
#[derive(Debug, Clone)]
pub struct DeviceTensor {
    /// The buffer.
    pub handle: Handle,
    /// Sizes per dimension (row-major, contiguous).
    pub shape: Vec<usize>,
}

impl DeviceTensor {
    fn empty<R: Runtime>(client: &ComputeClient<R>, shape: Vec<usize>) -> Self {
        let len: usize = shape.iter().product();
        Self {
            handle: client.empty(len * 4),
            shape,
        }
    }

    /// Contiguous row-major strides.
    pub fn strides(&self) -> Vec<usize> {
        contiguous_strides(&self.shape)
    }

    fn arg<R: Runtime>(&self) -> TensorArg<R> {
        let strides = self.strides();
        // SAFETY: allocated above with exactly `product(shape)` f32 elements, contiguous.
        unsafe {
            TensorArg::from_raw_parts(
                self.handle.clone(),
                strides.into(),
                self.shape.clone().into(),
            )
        }
    }
}

/// What the forward pass returns: the output and the state saved for the backward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `y`: `[batch, channels, seq_len]`, f32.
    pub y: DeviceTensor,
    /// The state `h` at the end of every chunk: `[batch, channels, n_chunks, d_state]`, f32.
    pub carries: DeviceTensor,
    /// The problem sizes.
    pub shape: ScanShape,
    /// The split used; the backward pass must use the same.
    pub config: ScanConfig,
}

/// Gradients from the backward pass, all contiguous f32, shapes as in [`crate::ScanGrads`].
#[derive(Debug, Clone)]
pub struct BackwardOutput {
    /// `dL/du`.
    pub du: DeviceTensor,
    /// `dL/ddelta` (raw delta).
    pub ddelta: DeviceTensor,
    /// `dL/dA`.
    pub da: DeviceTensor,
    /// `dL/dB`.
    pub db: DeviceTensor,
    /// `dL/dC`.
    pub dc: DeviceTensor,
    /// `dL/dD`, when `D` was given.
    pub dd: Option<DeviceTensor>,
    /// `dL/ddelta_bias`, when `delta_bias` was given.
    pub ddelta_bias: Option<DeviceTensor>,
}

/// Whether the device can hold and convert `dtype` buffers (f32 always; f16/bf16 depend on the
/// device: llvmpipe has f16 but not bf16).
pub fn supports_dtype<R: Runtime>(client: &ComputeClient<R>, dtype: ScanDtype) -> bool {
    let usage = match dtype {
        ScanDtype::F32 => return true,
        ScanDtype::F16 => half::f16::supported_uses(client),
        ScanDtype::BF16 => half::bf16::supported_uses(client),
    };
    usage.contains(cubecl::ir::features::TypeUsage::Buffer)
        && usage.contains(cubecl::ir::features::TypeUsage::Conversion)
}

fn check_dtype_support<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: ScanDtype,
) -> Result<(), ScanError> {
    if supports_dtype(client, dtype) {
        Ok(())
    } else {
        Err(ScanError::Unsupported {
            detail: format!(
                "{dtype:?} buffers are not supported by this device ({:?}); convert the inputs to f32 first",
                R::name(client)
            ),
        })
    }
}

fn check_grid(shape: &ScanShape) -> Result<(), ScanError> {
    const MAX: usize = 65535;
    if shape.channels > MAX || shape.batch > MAX {
        return Err(ScanError::Config {
            detail: format!(
                "batch = {} and channels = {} must each be at most {MAX} (one cube per (batch, channel))",
                shape.batch, shape.channels
            ),
        });
    }
    Ok(())
}

/// A placeholder for an absent optional `[channels]` input; the kernels never read it.
fn absent<R: Runtime>(client: &ComputeClient<R>) -> DeviceTensor {
    DeviceTensor {
        handle: client.create_from_slice(bytemuck::cast_slice(&[0.0f32])),
        shape: vec![1],
    }
}

fn optional_arg<R: Runtime>(
    tensor: Option<TensorRef<'_>>,
    placeholder: &DeviceTensor,
) -> TensorArg<R> {
    match tensor {
        Some(t) => t.arg(),
        None => placeholder.arg(),
    }
}

/// Runs the forward scan: `y = selective_scan(u, delta, A, B, C, D, delta_bias)`.
///
/// Validates every argument's shape, dtype, layout and index range before launching anything.
/// The values stay on the device and are not read: the caller guarantees a non-expanding
/// recurrence, `A ≤ 0` and, with `delta_softplus` off, `delta + delta_bias ≥ 0` (see
/// [`ScanError::Expanding`]; [`crate::check_non_expanding`] checks host data, and the Burn op
/// of `burn-vmamba` checks device tensors with one small read-back).
pub fn forward<R: Runtime>(
    client: &ComputeClient<R>,
    args: &ScanArgs<'_>,
    config: ScanConfig,
) -> Result<ForwardOutput, ScanError> {
    let shape = args.validate()?;
    config.validate(client, shape.d_state)?;
    check_index_range(&shape, config)?;
    check_grid(&shape)?;
    check_dtype_support(client, args.u.dtype)?;
    let states = config.states_for(shape.d_state);
    let planes = config.uses_planes(client);
    let n_chunks = config.n_chunks(shape.seq_len);
    let y = DeviceTensor::empty(client, shape.bdl().to_vec());
    let carries = DeviceTensor::empty(
        client,
        vec![shape.batch, shape.channels, n_chunks, shape.d_state],
    );
    let placeholder = absent(client);
    let blocks_per_group = shape.channels_per_group().div_ceil(config.channels);
    let count = CubeCount::Static(
        (shape.groups * blocks_per_group) as u32,
        shape.batch as u32,
        1,
    );
    let dim = CubeDim::new_1d(config.units as u32);
    // SAFETY (both kernels below): every global index the kernels form is in bounds for the
    // shapes and strides validated above (`args.validate`, `check_layout` of each input,
    // `check_index_range`): sequence positions are read and written only below `seq_len`,
    // channels, states and groups come from the launch grid and loops bounded by the
    // validated sizes, the optional inputs are read only when present (the placeholder holds
    // one value otherwise), and the per-state shared arrays hold `MAX_D_STATE` (256) ≥
    // `d_state`, refused above otherwise. So they launch unchecked: no bounds check on every
    // access.
    macro_rules! launch {
        ($F:ty) => {
            scan_forward_kernel::launch_unchecked::<$F, R>(
                client,
                count,
                dim,
                args.u.arg(),
                args.delta.arg(),
                args.a.arg(),
                args.b.arg(),
                args.c.arg(),
                optional_arg(args.d, &placeholder),
                optional_arg(args.delta_bias, &placeholder),
                y.arg(),
                carries.arg(),
                shape.seq_len as u32,
                shape.d_state as u32,
                shape.channels_per_group() as u32,
                n_chunks as u32,
                config.units,
                config.items,
                states,
                config.channels,
                planes,
                args.d.is_some(),
                args.delta_bias.is_some(),
                args.delta_softplus,
            )
        };
    }
    unsafe {
        match args.u.dtype {
            ScanDtype::F32 => launch!(f32),
            ScanDtype::F16 => launch!(half::f16),
            ScanDtype::BF16 => launch!(half::bf16),
        }
    }
    Ok(ForwardOutput {
        y,
        carries,
        shape,
        config,
    })
}

/// Channels per backward block: `max(min(N, D/G), channels)`, at most `D/G`, so the `dB`/`dC`
/// partials (`N · L` per block) stay `O(B·D·L)`; the cube walks its block `config.channels`
/// channels at a time.
pub fn channels_per_block(shape: &ScanShape, config: ScanConfig) -> usize {
    shape
        .d_state
        .min(shape.channels_per_group())
        .max(config.channels)
        .min(shape.channels_per_group())
}

fn sum_middle_axis<R: Runtime>(
    client: &ComputeClient<R>,
    input: &DeviceTensor,
    outer: usize,
    parts: usize,
    inner: usize,
    out_shape: Vec<usize>,
) -> DeviceTensor {
    let output = DeviceTensor::empty(client, out_shape);
    let total = outer * inner;
    let units = 256usize;
    let cubes = total.div_ceil(units);
    let x = cubes.min(65535);
    let y = cubes.div_ceil(x);
    debug_assert_eq!(input.shape.iter().product::<usize>(), outer * parts * inner);
    // SAFETY: `input` holds `outer · parts · inner` values and `output` `outer · inner`; the
    // kernel reads and writes only below `output.len()` and the matching input rows.
    unsafe {
        sum_middle_axis_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(x as u32, y as u32, 1),
            CubeDim::new_1d(units as u32),
            input.arg(),
            output.arg(),
            parts as u32,
            inner as u32,
        )
    };
    output
}

/// Runs the backward scan for the upstream gradient `dy [batch, channels, seq_len]` (f32),
/// recomputing states from `carries` (`[batch, channels, n_chunks, d_state]`, from
/// [`ForwardOutput::carries`]).
///
/// `args` and `config` must be those of the forward call that produced `carries`.
pub fn backward<R: Runtime>(
    client: &ComputeClient<R>,
    args: &ScanArgs<'_>,
    carries: &DeviceTensor,
    config: ScanConfig,
    dy: TensorRef<'_>,
) -> Result<BackwardOutput, ScanError> {
    let shape = args.validate()?;
    let n_chunks = config.n_chunks(shape.seq_len);
    let carries_shape = [shape.batch, shape.channels, n_chunks, shape.d_state];
    if carries.shape != carries_shape {
        return Err(ScanError::Shape {
            arg: "carries",
            expected: carries_shape.to_vec(),
            actual: carries.shape.clone(),
            source: "batch, channels, n_chunks, d_state of the forward call",
        });
    }
    if dy.shape != shape.bdl() {
        return Err(ScanError::Shape {
            arg: "dy",
            expected: shape.bdl().to_vec(),
            actual: dy.shape.to_vec(),
            source: "same as u",
        });
    }
    dy.check_layout("dy", ScanDtype::F32)?;
    config.validate(client, shape.d_state)?;
    check_index_range(&shape, config)?;
    check_grid(&shape)?;
    check_dtype_support(client, args.u.dtype)?;

    let per_block = channels_per_block(&shape, config);
    let blocks = shape.channels_per_group().div_ceil(per_block);
    let (bt, dch, g, n, l) = (
        shape.batch,
        shape.channels,
        shape.groups,
        shape.d_state,
        shape.seq_len,
    );
    let du = DeviceTensor::empty(client, shape.bdl().to_vec());
    let ddelta = DeviceTensor::empty(client, shape.bdl().to_vec());
    let db_part = DeviceTensor::empty(client, vec![bt, g, blocks, n, l]);
    let dc_part = DeviceTensor::empty(client, vec![bt, g, blocks, n, l]);
    let da_part = DeviceTensor::empty(client, vec![bt, dch, n]);
    let dskip_part = DeviceTensor::empty(client, vec![bt, dch]);
    let dbias_part = DeviceTensor::empty(client, vec![bt, dch]);
    let placeholder = absent(client);
    let states = config.states_for(n);
    let planes = config.uses_planes(client);
    let count = CubeCount::Static(blocks as u32, g as u32, bt as u32);
    let dim = CubeDim::new_1d(config.units as u32);
    // SAFETY: as for the forward kernel (see `forward`); `dy` was validated like the inputs,
    // and the partial buffers are allocated here with the shapes the kernel indexes.
    macro_rules! launch {
        ($F:ty) => {
            scan_backward_kernel::launch_unchecked::<$F, R>(
                client,
                count,
                dim,
                args.u.arg(),
                args.delta.arg(),
                args.a.arg(),
                args.b.arg(),
                args.c.arg(),
                optional_arg(args.d, &placeholder),
                optional_arg(args.delta_bias, &placeholder),
                dy.arg(),
                carries.arg(),
                du.arg(),
                ddelta.arg(),
                db_part.arg(),
                dc_part.arg(),
                da_part.arg(),
                dskip_part.arg(),
                dbias_part.arg(),
                l as u32,
                n as u32,
                shape.channels_per_group() as u32,
                n_chunks as u32,
                per_block as u32,
                config.units,
                config.items,
                states,
                config.channels,
                planes,
                args.d.is_some(),
                args.delta_bias.is_some(),
                args.delta_softplus,
            )
        };
    }
    unsafe {
        match args.u.dtype {
            ScanDtype::F32 => launch!(f32),
            ScanDtype::F16 => launch!(half::f16),
            ScanDtype::BF16 => launch!(half::bf16),
        }
    }
    let db = sum_middle_axis(
        client,
        &db_part,
        bt * g,
        blocks,
        n * l,
        shape.bgnl().to_vec(),
    );
    let dc = sum_middle_axis(
        client,
        &dc_part,
        bt * g,
        blocks,
        n * l,
        shape.bgnl().to_vec(),
    );
    let da = sum_middle_axis(client, &da_part, 1, bt, dch * n, shape.dn().to_vec());
    let dd = args
        .d
        .map(|_| sum_middle_axis(client, &dskip_part, 1, bt, dch, vec![dch]));
    let ddelta_bias = args
        .delta_bias
        .map(|_| sum_middle_axis(client, &dbias_part, 1, bt, dch, vec![dch]));
    Ok(BackwardOutput {
        du,
        ddelta,
        da,
        db,
        dc,
        dd,
        ddelta_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_config_reads_what_it_writes() {
        for config in [
            ScanConfig::default(),
            ScanConfig {
                units: 64,
                items: 8,
                states: 2,
                channels: 3,
                planes: Planes::Off,
            },
            ScanConfig {
                units: 256,
                items: 1,
                states: 16,
                channels: 1,
                planes: Planes::On,
            },
        ] {
            let text = config.to_string();
            assert_eq!(text.parse::<ScanConfig>(), Ok(config), "{text}");
        }
        assert_eq!(ScanConfig::default().to_string(), "128x4x2x2");
        assert_eq!(
            "128x4x2x2:auto".parse::<ScanConfig>(),
            Ok(ScanConfig::default())
        );
        for bad in [
            "128x4x2",
            "128x4x2x2x1",
            "128xfourx2x2",
            "128x4x2x2:warp",
            "",
        ] {
            let err = bad.parse::<ScanConfig>().unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }
}
