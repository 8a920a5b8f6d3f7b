//! Branch-free f32 `exp`, `ln(1 + e^x)` (softplus) and the logistic sigmoid for the native CPU
//! scan, written so that loops over slices vectorise (no calls into libm, no branches: the
//! compiler turns the selects into blends).
//!
//! `exp` is Cephes' `expf` (range reduction by `ln 2` split in two, degree-6 polynomial on
//! `[−ln2/2, ln2/2]`, scaling by building the exponent bits); softplus' `ln(1 + z)` is Cephes'
//! `logf` polynomial (degree 9 on `[√½ − 1, √2 − 1)`), with the reduction done on `z` itself
//! (no division, no exponent bits: see `ln_1p_unit`). Measured against f64 over the ranges
//! used (see the tests): relative error ≤ 2e-7 for `exp` on [−87, 88], for `softplus` and for
//! `sigmoid`, with or without fused multiply-adds (worst seen: 8.2e-8, 1.3e-7, 1.9e-7).
//! Like libm, `exp` rounds to subnormals down to −104 and is 0 below, +∞ above 88.72.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds to the nearest integer, held in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;

/// `a · b + c`: fused (one rounding) when `FMA`, which only code compiled for a target with FMA
/// should ask for (`f32::mul_add` is a libm call elsewhere: correct, slow); two roundings
/// otherwise.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x`, f32, branch-free.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// [`exp`] with the polynomial's multiply-adds fused when `FMA` (for code compiled with FMA
/// enabled, see [`crate::cpu::Isa`]; the same error bound, tested both ways).
#[inline(always)]
pub fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let input = x;
    // n ∈ [−150, 128] after the clamp.
    let ([e_r], [k]) = exp_reduced::<FMA, 1>([x.clamp(-104.0, 88.72)]);
    // 2^n as two normal factors: n = 128 does not overflow, n < −126 rounds to a subnormal.
    let half = k >> 1;
    let two_a = f32::from_bits(((half + 127) << 23) as u32);
    let two_b = f32::from_bits(((k - half + 127) << 23) as u32);
    let y = e_r * two_a * two_b;
    // As libm: 0 below the subnormal range, +∞ above f32's range.
    let y = if input < -104.0 { 0.0 } else { y };
    if input > 88.72 { f32::INFINITY } else { y }
}

/// `f(i)` for every lane `i` of an `N`-lane array: one loop per step of an algorithm, which LLVM
/// turns into `N / W` vector instructions for `W`-lane registers.
#[inline(always)]
fn map<T: Copy + Default, const N: usize>(f: impl Fn(usize) -> T) -> [T; N] {
    let mut o = [T::default(); N];
    for (i, o) in o.iter_mut().enumerate() {
        *o = f(i);
    }
    o
}

/// Lanes the `_lanes` functions are best called with (one chunk of [`softplus_lanes`]): 4
/// AVX-512 registers, 8 AVX2 ones. Each function runs its algorithm one step at a time over all
/// `N` lanes, so a core has `N / W` independent dependency chains in flight instead of one; the
/// scalar functions are their `N = 1` case (same operations, same bits). Called over a slice
/// lane by lane, a degree-9 polynomial after an exponential is one long chain per vector, and
/// the out-of-order window does not reach far enough to overlap several: softplus over `[L·16]`
/// floats took 8.0 ns per 16 lanes that way and 5.7 ns in chunks of 64 (AVX-512, 2026-12).
pub const CHUNK: usize = 64;

/// `(e^r, n)` with `e^x = e^r · 2^n`, `n = round(x · log2 e)`, `|r| ≤ ln2/2`, per lane: Cephes'
/// range reduction (`ln 2` in two parts) and degree-6 polynomial, the part [`exp_with`] and
/// [`exp_decay_lanes`] share (each scales by `2^n` as its range allows).
#[inline(always)]
fn exp_reduced<const FMA: bool, const N: usize>(x: [f32; N]) -> ([f32; N], [i32; N]) {
    let madd = madd::<FMA>;
    let shifted: [f32; N] = map(|i| madd(x[i], LOG2E, ROUNDER));
    let n: [f32; N] = map(|i| shifted[i] - ROUNDER); // round(x · log2 e)
    let r0: [f32; N] = map(|i| madd(n[i], -LN2_HI, x[i]));
    let r: [f32; N] = map(|i| madd(n[i], -LN2_LO, r0[i]));
    let mut p = [1.987_569_1e-4f32; N];
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = map(|i| madd(p[i], r[i], c));
    }
    let e_r = map(|i| madd(r[i] * r[i], p[i], r[i]) + 1.0);
    // n from the rounded integer in `shifted`'s low bits.
    let k = map(|i| (shifted[i].to_bits() as i32).wrapping_sub(0x4B40_0000));
    (e_r, k)
}

/// Below this, [`exp_decay_with`] returns 0 (`e^{−87.33}` ≈ 1.19e-38, the bottom of f32's
/// normal range).
const DECAY_MIN: f32 = -87.33;

/// `e^x` for `x ≤ 0` only: the scan's decays `e^{Δ·A}` (`Δ ≥ 0`, `A ≤ 0`, which every entry
/// point checks). [`exp_with`] without what only positive or subnormal results need (the upper
/// clamp and the two-factor scaling): 2^n is one normal factor since `n ∈ [−126, 0]`, and
/// results below `e^{−87.33}` are 0 instead of a subnormal (a decay that small leaves nothing
/// measurable of the state it multiplies). Same polynomial, same ≤ 2e-7 relative error on
/// `[−87.33, 0]`; NaN in, NaN out. Positive `x` gives wrong results (never used so).
#[inline(always)]
pub fn exp_decay_with<const FMA: bool>(x: f32) -> f32 {
    exp_decay_lanes::<FMA, 1>([x])[0]
}

/// [`exp_decay_with`] on `N` lanes, one step at a time over all of them (see [`CHUNK`]).
#[inline(always)]
pub fn exp_decay_lanes<const FMA: bool, const N: usize>(x: [f32; N]) -> [f32; N] {
    let tiny: [bool; N] = map(|i| x[i] < DECAY_MIN);
    // n ∈ [−126, 0]: 2^n is one normal factor.
    let (e_r, k) = exp_reduced::<FMA, N>(map(|i| if tiny[i] { DECAY_MIN } else { x[i] }));
    map(|i| {
        let y = e_r[i] * f32::from_bits((k[i].wrapping_add(127) << 23) as u32);
        if tiny[i] { 0.0 } else { y }
    })
}

/// `√2 − 1`: where `ln(1 + z)` switches from `t = z` to `t = (z − 1)/2` (Cephes' `logf` range).
const SQRT2_M1: f32 = std::f32::consts::SQRT_2 - 1.0;

/// `ln(1 + z)` for `z ∈ [0, 1]` (softplus' `z = e^{−|x|}`) per lane, branch-free and without a
/// division: Cephes' `logf` polynomial on `t`, where `1 + z = 2^e (1 + t)` with
/// `t ∈ [√½ − 1, √2 − 1)`. Below `√2 − 1`, `e = 0` and `t = z` exactly (so tiny `z` keeps its
/// precision); above, `e = 1` and `t = (z − 1)/2`, exact for `z ≥ ½` (Sterbenz) and within
/// `2^−26` below. NaN in, NaN out.
#[inline(always)]
fn ln_1p_unit<const FMA: bool, const N: usize>(z: [f32; N]) -> [f32; N] {
    let madd = madd::<FMA>;
    let big: [bool; N] = map(|i| z[i] >= SQRT2_M1);
    let t: [f32; N] = map(|i| if big[i] { (z[i] - 1.0) * 0.5 } else { z[i] });
    let e: [f32; N] = map(|i| if big[i] { 1.0 } else { 0.0 });
    let mut p = [7.037_683_6e-2f32; N];
    for c in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        0.333_333_3,
    ] {
        p = map(|i| madd(p[i], t[i], c));
    }
    map(|i| {
        let t2 = t[i] * t[i];
        let mut y = t2 * t[i] * p[i];
        y = madd(e[i], LN2_LO, y);
        y = madd(t2, -0.5, y);
        madd(e[i], LN2_HI, t[i] + y)
    })
}

/// `softplus(x) = ln(1 + e^x)`, computed as `max(x, 0) + ln(1 + e^{−|x|})` with `e^{−|x|}` from
/// [`exp_decay_with`] (the argument is never positive; 11 of the full exponential's 27
/// instructions fewer). Above 20 this is `x` to f32 precision, i.e. the threshold-20 rule of
/// mamba; below −87.33 it is 0 where the exact value `≈ e^x` is subnormal (below 1.2e-38, as
/// under CUDA's flush-to-zero).
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    softplus_with::<false>(x)
}

/// [`softplus`], fused multiply-adds when `FMA` (see [`exp_with`]).
#[inline(always)]
pub fn softplus_with<const FMA: bool>(x: f32) -> f32 {
    softplus_lanes::<FMA, 1>([x])[0]
}

/// [`softplus_with`] on `N` lanes, one step at a time over all of them (see [`CHUNK`]).
#[inline(always)]
pub fn softplus_lanes<const FMA: bool, const N: usize>(x: [f32; N]) -> [f32; N] {
    softplus_given::<FMA, N>(x, exp_minus_abs::<FMA, N>(x))
}

/// `z = e^{−|x|}` per lane, with the decay exponential (its argument is never positive).
#[inline(always)]
fn exp_minus_abs<const FMA: bool, const N: usize>(x: [f32; N]) -> [f32; N] {
    exp_decay_lanes::<FMA, N>(map(|i| -x[i].abs()))
}

/// `max(x, 0) + ln(1 + z)` per lane, given `z = e^{−|x|}` ([`exp_minus_abs`]).
#[inline(always)]
fn softplus_given<const FMA: bool, const N: usize>(x: [f32; N], z: [f32; N]) -> [f32; N] {
    let ln = ln_1p_unit::<FMA, N>(z);
    map(|i| x[i].max(0.0) + ln[i])
}

/// The logistic sigmoid `1 / (1 + e^{−x})` (the derivative of softplus).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `(softplus(x), sigmoid(x))` from one exponential, `z = e^{−|x|}`: softplus as above, and
/// sigmoid `= 1/(1+z)` for `x ≥ 0`, `z/(1+z)` below (sigmoid is softplus' derivative, so the
/// backward of a softplus gets both for the price of one).
#[inline(always)]
pub fn softplus_sigmoid(x: f32) -> (f32, f32) {
    softplus_sigmoid_with::<false>(x)
}

/// [`softplus_sigmoid`], fused multiply-adds when `FMA` (see [`exp_with`]).
#[inline(always)]
pub fn softplus_sigmoid_with<const FMA: bool>(x: f32) -> (f32, f32) {
    let ([softplus], [sigmoid]) = softplus_sigmoid_lanes::<FMA, 1>([x]);
    (softplus, sigmoid)
}

/// [`softplus_sigmoid_with`] on `N` lanes, one step at a time over all of them (see
/// [`CHUNK`]).
#[inline(always)]
pub fn softplus_sigmoid_lanes<const FMA: bool, const N: usize>(
    x: [f32; N],
) -> ([f32; N], [f32; N]) {
    let z = exp_minus_abs::<FMA, N>(x);
    let r: [f32; N] = map(|i| 1.0 / (1.0 + z[i]));
    let sig = map(|i| if x[i] >= 0.0 { r[i] } else { z[i] * r[i] });
    (softplus_given::<FMA, N>(x, z), sig)
}

/// `erf(x)`, f32, branch-free: the rational approximation Eigen and TensorFlow vectorise
/// (odd degree-13 numerator over even degree-8 denominator on `x` clamped to [−4, 4], where
/// f32's `erf` is ±1 to rounding). Absolute error ≤ 5e-7 against f64 (4.5e-7 seen; tested
/// with and without fused multiply-adds).
#[inline(always)]
pub fn erf_with<const FMA: bool>(x: f32) -> f32 {
    let madd = madd::<FMA>;
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = madd(x2, -2.726_142_3e-10, 2.770_681_4e-8);
    p = madd(x2, p, -2.101_024e-6);
    p = madd(x2, p, -5.692_506_4e-5);
    p = madd(x2, p, -7.349_906_3e-4);
    p = madd(x2, p, -2.954_6e-3);
    p = madd(x2, p, -1.609_603_3e-2);
    let mut q = madd(x2, -1.456_607_2e-5, -2.133_740_6e-4);
    q = madd(x2, q, -1.682_827e-3);
    q = madd(x2, q, -7.373_329e-3);
    q = madd(x2, q, -1.426_474e-2);
    x * p / q
}

/// The exact GELU, `x · (1 + erf(x / √2)) / 2`, with [`erf_with`]: absolute error ≤ 4e-7 ·
/// max(1, |x|) against f64 (tested), branch-free so that loops over slices vectorise.
#[inline(always)]
pub fn gelu_with<const FMA: bool>(x: f32) -> f32 {
    x * normal_cdf_with::<FMA>(x)
}

/// `Φ(x) = (1 + erf(x / √2)) / 2`, the standard normal CDF, with [`erf_with`]: the factor of
/// the exact GELU and the first term of its derivative.
#[inline(always)]
fn normal_cdf_with<const FMA: bool>(x: f32) -> f32 {
    (erf_with::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5
}

/// `GELU'(x) = Φ(x) + x·φ(x)`, the derivative of the exact GELU (`Φ` the standard normal CDF
/// `(1 + erf(x/√2))/2` with [`erf_with`], `φ(x) = e^{−x²/2}/√(2π)` with [`exp_decay_with`]),
/// branch-free. `x·φ(x)` is taken at `x` clamped to ±10, where it is below 2e-21 (and no
/// infinity times zero makes a NaN). Absolute error ≤ 1e-6 against f64 (2.8e-7 seen, tested).
#[inline(always)]
pub fn gelu_derivative_with<const FMA: bool>(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = normal_cdf_with::<FMA>(x);
    let xc = x.clamp(-10.0, 10.0);
    let pdf = exp_decay_with::<FMA>(-0.5 * xc * xc) * FRAC_1_SQRT_2PI;
    madd::<FMA>(xc, pdf, cdf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| (lo + (hi - lo) * i as f64 / n as f64) as f32)
    }

    fn rel(a: f32, e: f64) -> f64 {
        (f64::from(a) - e).abs() / e.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn exp_is_within_2e_7_relative_of_f64_on_the_normal_range() {
        let worst = sweep(-87.0, 88.0, 2_000_003)
            .map(|x| rel(exp(x), f64::from(x).exp()))
            .fold(0.0, f64::max);
        println!("exp: worst relative error {worst:.2e}");
        assert!(worst <= 2e-7, "exp worst relative error {worst:.3e}");
        // The fused variant (`f32::mul_add` is correctly rounded everywhere: these are the
        // bits the AVX2 + FMA and NEON scans compute), and the range the scan's decay uses.
        let fused = sweep(-87.0, 88.0, 2_000_003)
            .map(|x| rel(exp_with::<true>(x), f64::from(x).exp()))
            .fold(0.0, f64::max);
        println!("exp (fused): worst relative error {fused:.2e}");
        assert!(fused <= 2e-7, "fused exp worst relative error {fused:.3e}");
        for exp in [exp_with::<false>, exp_with::<true>] {
            let decay = sweep(-87.0, 0.0, 1_000_003)
                .map(|x| rel(exp(x), f64::from(x).exp()))
                .fold(0.0, f64::max);
            assert!(
                decay <= 2e-7,
                "exp on [-87, 0]: worst relative error {decay:.3e}"
            );
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(88.72).is_finite());
        // Subnormal results: within a few units of the smallest subnormal.
        for x in sweep(-103.9, -87.4, 10_001) {
            let err = (f64::from(exp(x)) - f64::from(x).exp()).abs();
            assert!(err <= 4.0 * 1.4e-45, "exp({x}) = {:e}", exp(x));
        }
    }

    #[test]
    fn decay_exp_is_within_2e_7_relative_of_f64_on_its_range_and_0_below() {
        for exp in [exp_decay_with::<false>, exp_decay_with::<true>] {
            let worst = sweep(-87.33, 0.0, 2_000_003)
                .map(|x| rel(exp(x), f64::from(x).exp()))
                .fold(0.0, f64::max);
            println!("decay exp: worst relative error {worst:.2e}");
            assert!(worst <= 2e-7, "decay exp worst relative error {worst:.3e}");
            assert_eq!(exp(0.0), 1.0);
            assert_eq!(exp(-0.0), 1.0);
            for x in [-87.34, -100.0, -1e30, f32::NEG_INFINITY] {
                assert_eq!(exp(x), 0.0, "decay exp({x})");
            }
            assert!(exp(f32::NAN).is_nan());
        }
    }

    #[test]
    fn softplus_is_within_2e_7_relative_of_f64_with_the_threshold_rule() {
        let reference = |x: f32| {
            let x = f64::from(x);
            if x > 20.0 { x } else { x.exp().ln_1p() }
        };
        for softplus in [softplus_with::<false>, softplus_with::<true>] {
            let worst = sweep(-80.0, 60.0, 2_000_003)
                .map(|x| rel(softplus(x), reference(x)))
                .fold(0.0, f64::max);
            println!("softplus: worst relative error {worst:.2e}");
            assert!(worst <= 2e-7, "softplus worst relative error {worst:.3e}");
        }
        assert_eq!(softplus(25.0), 25.0);
    }

    #[test]
    fn lanes_equal_the_scalar_functions_bit_for_bit() {
        // Every lane position of a CHUNK, across the ranges, the polynomial switch, the
        // underflow edges and the special values.
        let mut xs: Vec<f32> = sweep(-120.0, 60.0, 64 * 2000 - 1).collect();
        xs.extend([
            0.0,
            -0.0,
            SQRT2_M1,
            -SQRT2_M1,
            -DECAY_MIN,
            DECAY_MIN,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
        ]);
        xs.resize(xs.len().next_multiple_of(CHUNK), 1.5);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for chunk in xs.chunks_exact(CHUNK) {
            let x: [f32; CHUNK] = chunk.try_into().unwrap();
            let decay_x = x.map(|v| -v.abs());
            for (fused, sp, (sp2, sig), dec) in [
                (
                    false,
                    softplus_lanes::<false, CHUNK>(x),
                    softplus_sigmoid_lanes::<false, CHUNK>(x),
                    exp_decay_lanes::<false, CHUNK>(decay_x),
                ),
                (
                    true,
                    softplus_lanes::<true, CHUNK>(x),
                    softplus_sigmoid_lanes::<true, CHUNK>(x),
                    exp_decay_lanes::<true, CHUNK>(decay_x),
                ),
            ] {
                for i in 0..CHUNK {
                    let (s1, (s2, g)) = if fused {
                        (
                            softplus_with::<true>(x[i]),
                            softplus_sigmoid_with::<true>(x[i]),
                        )
                    } else {
                        (softplus(x[i]), softplus_sigmoid(x[i]))
                    };
                    let e = if fused {
                        exp_decay_with::<true>(decay_x[i])
                    } else {
                        exp_decay_with::<false>(decay_x[i])
                    };
                    assert!(same(sp[i], s1), "softplus lane {i} at {}", x[i]);
                    assert!(
                        same(sp2[i], s2) && same(sig[i], g),
                        "softplus_sigmoid at {}",
                        x[i]
                    );
                    assert!(same(dec[i], e), "exp_decay lane {i} at {}", decay_x[i]);
                }
            }
        }
        // Below the normal range of e^x, 0 (never negative, never NaN); just above, the exact
        // value to 2e-7.
        for x in [-87.4f32, -90.0, -200.0, f32::MIN] {
            assert_eq!(softplus(x), 0.0, "softplus({x})");
            assert_eq!(softplus_sigmoid(x).1, 0.0, "sigmoid({x})");
        }
        let x = -87.0f32;
        assert!(rel(softplus(x), f64::from(x).exp().ln_1p()) <= 2e-7);
    }

    #[test]
    fn sigmoid_is_within_2e_7_relative_of_f64() {
        let worst = sweep(-80.0, 60.0, 1_000_003)
            .map(|x| rel(sigmoid(x), 1.0 / (1.0 + (-f64::from(x)).exp())))
            .fold(0.0, f64::max);
        println!("sigmoid: worst relative error {worst:.2e}");
        assert!(worst <= 2e-7, "sigmoid worst relative error {worst:.3e}");
    }

    #[test]
    fn softplus_sigmoid_equals_both_functions_and_f64() {
        let mut worst = 0.0f64;
        for x in sweep(-80.0, 60.0, 1_000_003) {
            let (sp, sig) = softplus_sigmoid(x);
            assert_eq!(sp, softplus(x), "softplus at {x}");
            worst = worst.max(rel(sig, 1.0 / (1.0 + (-f64::from(x)).exp())));
            let (sp, sig) = softplus_sigmoid_with::<true>(x);
            assert_eq!(sp, softplus_with::<true>(x), "fused softplus at {x}");
            worst = worst.max(rel(sig, 1.0 / (1.0 + (-f64::from(x)).exp())));
        }
        println!("softplus_sigmoid: sigmoid worst relative error {worst:.2e}");
        assert!(worst <= 2e-7, "sigmoid worst relative error {worst:.3e}");
        assert!(softplus_sigmoid(f32::NAN).1.is_nan());
        assert_eq!(softplus_sigmoid(f32::INFINITY).1, 1.0);
        assert_eq!(softplus_sigmoid(f32::NEG_INFINITY).1, 0.0);
    }

    #[test]
    fn erf_and_gelu_are_within_their_bounds_of_f64() {
        fn erf64(x: f64) -> f64 {
            // libm's f64 erf is correctly rounded to within an ulp of f64: the reference.
            libm_erf(x)
        }
        for fused in [false, true] {
            let (mut worst_erf, mut worst_gelu) = (0.0f64, 0.0f64);
            for x in sweep(-12.0, 12.0, 2_400_001) {
                let e = if fused {
                    erf_with::<true>(x)
                } else {
                    erf_with::<false>(x)
                };
                worst_erf = worst_erf.max((f64::from(e) - erf64(f64::from(x))).abs());
                let g = if fused {
                    gelu_with::<true>(x)
                } else {
                    gelu_with::<false>(x)
                };
                let x64 = f64::from(x);
                let exact = x64 * (1.0 + erf64(x64 / std::f64::consts::SQRT_2)) / 2.0;
                worst_gelu = worst_gelu.max((f64::from(g) - exact).abs() / x64.abs().max(1.0));
            }
            println!("fused {fused}: erf worst abs error {worst_erf:.2e}, gelu {worst_gelu:.2e}");
            assert!(worst_erf <= 5e-7, "erf (fused {fused}): {worst_erf:.3e}");
            assert!(worst_gelu <= 4e-7, "gelu (fused {fused}): {worst_gelu:.3e}");
        }
        assert_eq!(gelu_with::<false>(0.0), 0.0);
        assert!(gelu_with::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_derivative_is_within_1e_6_of_f64() {
        let exact = |x: f64| {
            let cdf = (1.0 + libm_erf(x / std::f64::consts::SQRT_2)) / 2.0;
            let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        };
        for fused in [false, true] {
            let mut worst = 0.0f64;
            for x in sweep(-40.0, 40.0, 4_000_001) {
                let d = if fused {
                    gelu_derivative_with::<true>(x)
                } else {
                    gelu_derivative_with::<false>(x)
                };
                worst = worst.max((f64::from(d) - exact(f64::from(x))).abs());
            }
            println!("fused {fused}: GELU' worst abs error {worst:.2e}");
            assert!(worst <= 1e-6, "GELU' (fused {fused}): {worst:.3e}");
        }
        // The tails: 0 and 1 within the same bound at ±∞, never NaN.
        assert!(gelu_derivative_with::<false>(f32::NEG_INFINITY).abs() <= 1e-6);
        assert!((gelu_derivative_with::<false>(f32::INFINITY) - 1.0).abs() <= 1e-6);
        assert_eq!(gelu_derivative_with::<false>(0.0), 0.5);
    }

    /// f64 `erf` by its Taylor series below 3 and the continued fraction of `erfc` above
    /// (converged to f64 rounding on the tested range): an independent reference, so the test
    /// needs no libm dependency.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            // erf(a) = 2/√π Σ (−1)^n a^(2n+1) / (n! (2n+1))
            let (mut term, mut sum, mut n) = (a, a, 0.0f64);
            loop {
                n += 1.0;
                term *= -a * a / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 * sum.abs() {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^{−a²}/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + 2/(a + …)))))
            let mut f = a;
            for k in (1..200).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
        };
        r.copysign(x)
    }
}
