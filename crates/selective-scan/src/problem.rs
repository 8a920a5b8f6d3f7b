//! Host-side scan problems: inputs as plain `f32` slices, gradients, and seeded random cases.

use crate::{ArgShapes, ScanError, ScanShape};

/// One selective-scan problem held on the host, all tensors contiguous row-major `f32`.
///
/// # Shapes
/// - `u, delta`: `[batch, channels, seq_len]`
/// - `a`: `[channels, d_state]`
/// - `b, c`: `[batch, groups, d_state, seq_len]`
/// - `d, delta_bias`: `[channels]`
#[derive(Debug, Clone, PartialEq)]
pub struct ScanProblem {
    /// The sizes.
    pub shape: ScanShape,
    /// Input sequence `u`.
    pub u: Vec<f32>,
    /// Raw step sizes (before bias and softplus).
    pub delta: Vec<f32>,
    /// State matrix `A` (real, normally negative).
    pub a: Vec<f32>,
    /// Input projection `B`.
    pub b: Vec<f32>,
    /// Output projection `C`.
    pub c: Vec<f32>,
    /// Skip connection `D`.
    pub d: Option<Vec<f32>>,
    /// Bias added to `delta` before softplus.
    pub delta_bias: Option<Vec<f32>>,
    /// Whether `Δ = softplus(delta + delta_bias)` (threshold-20 rule) or `delta + delta_bias`.
    pub delta_softplus: bool,
}

/// Gradients of a scalar loss with respect to every input of the scan.
///
/// Shapes as in [`ScanProblem`]; `dd` and `ddelta_bias` are present exactly when the inputs
/// `d` and `delta_bias` are.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanGrads<T> {
    /// `dL/du`, `[batch, channels, seq_len]`.
    pub du: Vec<T>,
    /// `dL/ddelta` for the raw delta, `[batch, channels, seq_len]`.
    pub ddelta: Vec<T>,
    /// `dL/dA`, `[channels, d_state]`.
    pub da: Vec<T>,
    /// `dL/dB`, `[batch, groups, d_state, seq_len]`.
    pub db: Vec<T>,
    /// `dL/dC`, `[batch, groups, d_state, seq_len]`.
    pub dc: Vec<T>,
    /// `dL/dD`, `[channels]`.
    pub dd: Option<Vec<T>>,
    /// `dL/ddelta_bias`, `[channels]`.
    pub ddelta_bias: Option<Vec<T>>,
}

impl<T> ScanGrads<T> {
    /// The gradients by their fixture names (`du`, `ddelta`, `dA`, `dB`, `dC`, `dD`,
    /// `ddelta_bias`), skipping absent ones.
    pub fn named(&self) -> Vec<(&'static str, &[T])> {
        let mut out: Vec<(&'static str, &[T])> = vec![
            ("du", &self.du),
            ("ddelta", &self.ddelta),
            ("dA", &self.da),
            ("dB", &self.db),
            ("dC", &self.dc),
        ];
        if let Some(dd) = &self.dd {
            out.push(("dD", dd));
        }
        if let Some(db) = &self.ddelta_bias {
            out.push(("ddelta_bias", db));
        }
        out
    }
}

fn check_len(arg: &'static str, data: &[f32], expected: usize) -> Result<(), ScanError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(ScanError::Length {
            arg,
            expected,
            actual: data.len(),
        })
    }
}

impl ScanProblem {
    /// Checks that every slice holds exactly the elements its shape needs, and that the
    /// recurrence does not expand ([`crate::check_non_expanding`]).
    pub fn validate(&self) -> Result<(), ScanError> {
        let s = &self.shape;
        // Re-run the shape contract so hand-built shapes are checked too.
        let bdl = s.bdl();
        let dn = s.dn();
        let bgnl = s.bgnl();
        let ch = [s.channels];
        ScanShape::from_args(&ArgShapes {
            u: &bdl,
            delta: &bdl,
            a: &dn,
            b: &bgnl,
            c: &bgnl,
            d: self.d.as_ref().map(|_| &ch[..]),
            delta_bias: self.delta_bias.as_ref().map(|_| &ch[..]),
        })?;
        check_len("u", &self.u, s.bdl_len())?;
        check_len("delta", &self.delta, s.bdl_len())?;
        check_len("A", &self.a, s.channels * s.d_state)?;
        check_len("B", &self.b, s.bgnl_len())?;
        check_len("C", &self.c, s.bgnl_len())?;
        if let Some(d) = &self.d {
            check_len("D", d, s.channels)?;
        }
        if let Some(bias) = &self.delta_bias {
            check_len("delta_bias", bias, s.channels)?;
        }
        crate::check_non_expanding(
            s,
            &self.a,
            &self.delta,
            self.delta_bias.as_deref(),
            self.delta_softplus,
        )
    }

    /// The inputs by their fixture names (`u`, `delta`, `A`, `B`, `C`, `D`, `delta_bias`),
    /// each with its shape, skipping absent ones.
    pub fn named(&self) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let s = &self.shape;
        let mut out = vec![
            ("u", s.bdl().to_vec(), &self.u[..]),
            ("delta", s.bdl().to_vec(), &self.delta[..]),
            ("A", s.dn().to_vec(), &self.a[..]),
            ("B", s.bgnl().to_vec(), &self.b[..]),
            ("C", s.bgnl().to_vec(), &self.c[..]),
        ];
        if let Some(d) = &self.d {
            out.push(("D", vec![s.channels], &d[..]));
        }
        if let Some(bias) = &self.delta_bias {
            out.push(("delta_bias", vec![s.channels], &bias[..]));
        }
        out
    }
}

/// A small, seeded, portable pseudo-random generator (SplitMix64), so that test and parity
/// cases are the same on every machine.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// How to draw a random problem: value ranges in the regime VMamba uses.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, PartialEq)]
pub struct RandomSpec {
    /// Include the skip `D`.
    pub with_d: bool,
    /// Include `delta_bias`.
    pub with_delta_bias: bool,
    /// Apply softplus to `delta + delta_bias`.
    pub delta_softplus: bool,
    /// Range of raw `delta`.
    pub delta_range: (f32, f32),
    /// Range of `A_log`; `A = -exp(A_log)`.
    pub a_log_range: (f32, f32),
}

#[cfg(any(test, feature = "testing"))]
impl Default for RandomSpec {
    /// VMamba's setting: D, bias and softplus on, raw delta in `[-3, 1]` (softplus gives
    /// `Δ ≈ 0.05–1.3`), `A_log` in `[-1, 1.5]`.
    fn default() -> Self {
        Self {
            with_d: true,
            with_delta_bias: true,
            delta_softplus: true,
            delta_range: (-3.0, 1.0),
            a_log_range: (-1.0, 1.5),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl RandomSpec {
    /// Long-memory channels: `A = −exp(A_log)` with `A_log` in `[−30, −10]` (A from −9e−14 to
    /// −4.5e−5) and steps down to `Δ ≈ 1e-5`, so `|Δ·A|` spans 1e−19 to 1e−5 and the state is
    /// close to a running sum over the whole sequence. With `softplus`, raw delta in
    /// `[−11.5, −2]` and a bias in `[−1, 0]` (Δ ≈ 4e−6 to 0.13); without, raw Δ in `[1e−5, 0.1]`.
    pub fn long_memory(softplus: bool) -> Self {
        Self {
            with_d: true,
            with_delta_bias: softplus,
            delta_softplus: softplus,
            delta_range: if softplus { (-11.5, -2.0) } else { (1e-5, 0.1) },
            a_log_range: (-30.0, -10.0),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl ScanProblem {
    /// A seeded random problem: `u, B, C` uniform in `[-1, 1]`, `D` in `[0.5, 1.5]`, bias in
    /// `[-1, 0]`, delta and `A = -exp(A_log)` from `spec`.
    pub fn random(shape: ScanShape, spec: &RandomSpec, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let u = rng.vec(shape.bdl_len(), -1.0, 1.0);
        let delta = rng.vec(shape.bdl_len(), spec.delta_range.0, spec.delta_range.1);
        let a = rng
            .vec(
                shape.channels * shape.d_state,
                spec.a_log_range.0,
                spec.a_log_range.1,
            )
            .into_iter()
            .map(|a_log| -a_log.exp())
            .collect();
        let b = rng.vec(shape.bgnl_len(), -1.0, 1.0);
        let c = rng.vec(shape.bgnl_len(), -1.0, 1.0);
        let d = spec.with_d.then(|| rng.vec(shape.channels, 0.5, 1.5));
        let delta_bias = spec
            .with_delta_bias
            .then(|| rng.vec(shape.channels, -1.0, 0.0));
        Self {
            shape,
            u,
            delta,
            a,
            b,
            c,
            d,
            delta_bias,
            delta_softplus: spec.delta_softplus,
        }
    }
}
