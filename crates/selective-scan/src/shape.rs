//! Sizes of one selective-scan problem and their validation.

use crate::ScanError;

/// The largest `d_state` accepted, as in mamba_ssm (`MAX_DSTATE`).
pub const MAX_D_STATE: usize = 256;

/// Element type of a tensor handed to the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScanDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl ScanDtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            ScanDtype::F32 => 4,
            ScanDtype::F16 | ScanDtype::BF16 => 2,
        }
    }
}

/// The sizes of one scan: `u, delta [batch, channels, seq_len]`, `A [channels, d_state]`,
/// `B, C [batch, groups, d_state, seq_len]`, `D, delta_bias [channels]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScanShape {
    /// `Bt`, the batch size.
    pub batch: usize,
    /// `D`, the number of scanned channels.
    pub channels: usize,
    /// `L`, the sequence length.
    pub seq_len: usize,
    /// `N`, the state size per channel.
    pub d_state: usize,
    /// `G`, the number of B/C groups; channel `d` uses group `d / (channels / groups)`.
    pub groups: usize,
}

/// Shapes of the arguments of one call, as given by the caller.
#[derive(Debug, Clone, Copy)]
pub struct ArgShapes<'a> {
    /// `u`: `[batch, channels, seq_len]`.
    pub u: &'a [usize],
    /// `delta`: `[batch, channels, seq_len]`.
    pub delta: &'a [usize],
    /// `A`: `[channels, d_state]`.
    pub a: &'a [usize],
    /// `B`: `[batch, groups, d_state, seq_len]`.
    pub b: &'a [usize],
    /// `C`: `[batch, groups, d_state, seq_len]`.
    pub c: &'a [usize],
    /// `D` (skip): `[channels]`.
    pub d: Option<&'a [usize]>,
    /// `delta_bias`: `[channels]`.
    pub delta_bias: Option<&'a [usize]>,
}

fn rank(
    arg: &'static str,
    layout: &'static str,
    shape: &[usize],
    n: usize,
) -> Result<(), ScanError> {
    if shape.len() == n {
        Ok(())
    } else {
        Err(ScanError::Rank {
            arg,
            layout,
            actual: shape.to_vec(),
        })
    }
}

fn same(
    arg: &'static str,
    shape: &[usize],
    expected: &[usize],
    source: &'static str,
) -> Result<(), ScanError> {
    if shape == expected {
        Ok(())
    } else {
        Err(ScanError::Shape {
            arg,
            expected: expected.to_vec(),
            actual: shape.to_vec(),
            source,
        })
    }
}

/// Row-major contiguous strides (in elements) for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl ScanShape {
    /// The sizes `(batch, channels, seq_len, d_state, groups)`; not validated until used.
    pub fn new(
        batch: usize,
        channels: usize,
        seq_len: usize,
        d_state: usize,
        groups: usize,
    ) -> Self {
        Self {
            batch,
            channels,
            seq_len,
            d_state,
            groups,
        }
    }

    /// Infers the sizes from the argument shapes and checks every contract of the op:
    /// ranks, agreement between arguments, non-empty dimensions, `G | D` and `N <= 256`.
    pub fn from_args(args: &ArgShapes<'_>) -> Result<Self, ScanError> {
        const BDL: &str = "[batch, channels, seq_len]";
        const BGNL: &str = "[batch, groups, d_state, seq_len]";
        rank("u", BDL, args.u, 3)?;
        let (batch, channels, seq_len) = (args.u[0], args.u[1], args.u[2]);
        for (dim, size) in [
            ("batch", batch),
            ("channels", channels),
            ("seq_len", seq_len),
        ] {
            if size == 0 {
                return Err(ScanError::Empty {
                    arg: "u",
                    dim,
                    actual: args.u.to_vec(),
                });
            }
        }
        rank("delta", BDL, args.delta, 3)?;
        same("delta", args.delta, args.u, "same as u")?;
        rank("A", "[channels, d_state]", args.a, 2)?;
        if args.a[0] != channels {
            return Err(ScanError::Shape {
                arg: "A",
                expected: vec![channels, args.a[1]],
                actual: args.a.to_vec(),
                source: "channels from u",
            });
        }
        let d_state = args.a[1];
        if d_state == 0 {
            return Err(ScanError::Empty {
                arg: "A",
                dim: "d_state",
                actual: args.a.to_vec(),
            });
        }
        if d_state > MAX_D_STATE {
            return Err(ScanError::StateSize {
                d_state,
                max: MAX_D_STATE,
            });
        }
        rank("B", BGNL, args.b, 4)?;
        let groups = args.b[1];
        same(
            "B",
            args.b,
            &[batch, groups, d_state, seq_len],
            "batch and seq_len from u, d_state from A",
        )?;
        if groups == 0 {
            return Err(ScanError::Empty {
                arg: "B",
                dim: "groups",
                actual: args.b.to_vec(),
            });
        }
        if channels % groups != 0 {
            return Err(ScanError::Groups { channels, groups });
        }
        rank("C", BGNL, args.c, 4)?;
        same("C", args.c, args.b, "same as B")?;
        if let Some(d) = args.d {
            same("D", d, &[channels], "channels from u")?;
        }
        if let Some(bias) = args.delta_bias {
            same("delta_bias", bias, &[channels], "channels from u")?;
        }
        Ok(Self {
            batch,
            channels,
            seq_len,
            d_state,
            groups,
        })
    }

    /// Channels per group, `D / G`.
    pub fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Shape of `u`, `delta`, `y`, `du`, `ddelta`.
    pub fn bdl(&self) -> [usize; 3] {
        [self.batch, self.channels, self.seq_len]
    }

    /// Shape of `A` and `dA`.
    pub fn dn(&self) -> [usize; 2] {
        [self.channels, self.d_state]
    }

    /// Shape of `B`, `C`, `dB`, `dC`.
    pub fn bgnl(&self) -> [usize; 4] {
        [self.batch, self.groups, self.d_state, self.seq_len]
    }

    /// Elements in `[batch, channels, seq_len]`.
    pub fn bdl_len(&self) -> usize {
        self.batch * self.channels * self.seq_len
    }

    /// Elements in `[batch, groups, d_state, seq_len]`.
    pub fn bgnl_len(&self) -> usize {
        self.batch * self.groups * self.d_state * self.seq_len
    }

    /// The `9·Bt·L·D·N` FLOP count of one forward scan (VMamba's convention, from
    /// state-spaces/mamba#110), plus `Bt·D·L` for the skip.
    pub fn forward_flops(&self) -> f64 {
        9.0 * (self.bdl_len() * self.d_state) as f64 + self.bdl_len() as f64
    }
}

/// Refuses an expanding recurrence (`Δ·A > 0`, see [`ScanError::Expanding`]) in host data:
/// every `A ≤ 0` and, with `delta_softplus` off, every `delta + delta_bias ≥ 0` (softplus is
/// never negative). NaN passes (it propagates like in any op). Slices are contiguous row-major
/// with the shapes of `shape`, as in [`crate::ScanProblem`].
pub fn check_non_expanding(
    shape: &ScanShape,
    a: &[f32],
    delta: &[f32],
    delta_bias: Option<&[f32]>,
    delta_softplus: bool,
) -> Result<(), ScanError> {
    if let Some(i) = a.iter().position(|&x| x > 0.0) {
        return Err(ScanError::Expanding {
            arg: "A",
            at: Some(vec![i / shape.d_state, i % shape.d_state]),
            value: f64::from(a[i]),
        });
    }
    if delta_softplus {
        return Ok(());
    }
    let l = shape.seq_len;
    for (row, values) in delta.chunks(l.max(1)).enumerate() {
        let channel = row % shape.channels.max(1);
        let bias = delta_bias.map_or(0.0, |b| b[channel]);
        if let Some(t) = values.iter().position(|&x| x + bias < 0.0) {
            return Err(ScanError::Expanding {
                arg: "delta",
                at: Some(vec![row / shape.channels, channel, t]),
                value: f64::from(values[t] + bias),
            });
        }
    }
    Ok(())
}
