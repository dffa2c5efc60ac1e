//! Vectorised `exp` and `tanh` over f32 slices, and the activations built on them (soft-capping,
//! tanh-GELU), at the SIMD level of [`crate::simd`].
//!
//! Each value is evaluated in f64 lanes (8 per AVX-512 register, 4 per AVX2 register) with a
//! polynomial accurate to ~1e-13 relative, then rounded once to f32: the f32 result is within 1 ulp of
//! the exact value (the unit tests sweep the whole useful range against f64 `std` functions), as
//! PyTorch's vectorised CPU kernels (Sleef, 1 ulp) are.

use crate::simd::leveled;

/// Lanes processed per step (one AVX-512 register of f64, two of AVX2).
const W: usize = 8;

/// e^x in f64 for x in [-708, 709] (callers clamp): x = k·ln2 + r, |r| ≤ ln2/2, e^r by its Taylor
/// series to degree 11 (truncation < 2e-14 relative), scaled by 2^k through the exponent bits.
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const LN2_HI: f64 = 0.693_147_180_369_123_816_49;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Horner form of Σ r^i / i!, i ≤ 11.
    let mut p = 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^k for k in [-1022, 1023] (the clamps keep it there).
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    p * scale
}

#[inline(always)]
fn exp_one(x: f32) -> f32 {
    let x = (x as f64).clamp(-708.0, 709.0);
    // Past f32's range the f64 value rounds to 0 or ∞ as expf's would; clamp keeps NaN, and
    // exp_f64(NaN) is NaN.
    exp_f64(x) as f32
}

#[inline(always)]
fn tanh_one(x: f32) -> f32 {
    let a = (x as f64).abs();
    // tanh(a) = 1 − 2/(e^{2a} + 1), exact to ~1e-16 absolute; beyond 20, e^{2a} is huge and the result 1.
    let e = exp_f64((2.0 * a).min(40.0));
    let t = 1.0 - 2.0 / (e + 1.0);
    // Below 2^-12, tanh(a) = a(1 − a²/3 + …) rounds to a in f32 (a²/3 < 2^-25); the formula above
    // would lose relative accuracy there.
    let t = if a < 1.0 / 4096.0 { a } else { t };
    let t = t.copysign(x as f64) as f32;
    if x.is_nan() {
        x
    } else {
        t
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` with the inner product in f32 as PyTorch computes it.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const KAPPA: f32 = 0.044715;
    let inner = SQRT_2_OVER_PI * (x + KAPPA * (x * x * x));
    0.5 * x * (1.0 + tanh_one(inner))
}

/// Applies `f` to every element, `W` at a time so that the compiler keeps the lanes in registers.
#[inline(always)]
fn map(v: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    let mut chunks = v.chunks_exact_mut(W);
    for c in &mut chunks {
        for x in c.iter_mut() {
            *x = f(*x);
        }
    }
    for x in chunks.into_remainder() {
        *x = f(*x);
    }
}

leveled! {
    /// `v ← e^v` elementwise (within 1 ulp; NaN stays NaN).
    pub(crate) fn exp_in_place(v: &mut [f32]) { map(v, exp_one) }
}

leveled! {
    /// `v ← tanh(v)` elementwise (within 1 ulp).
    pub(crate) fn tanh_in_place(v: &mut [f32]) { map(v, tanh_one) }
}

leveled! {
    /// `v ← cap · tanh(v / cap)` (Gemma 2's attention and final logit soft-caps).
    pub(crate) fn softcap(v: &mut [f32], cap: f32) { map(v, |x| tanh_one(x / cap) * cap) }
}

leveled! {
    /// `gate ← gelu_tanh(gate) · up` elementwise (the gated MLP's activation).
    pub(crate) fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        let mut g = gate.chunks_exact_mut(W);
        let mut u = up.chunks_exact(W);
        for (g, u) in (&mut g).zip(&mut u) {
            for (g, u) in g.iter_mut().zip(u) {
                *g = gelu_one(*g) * u;
            }
        }
        for (g, u) in g.into_remainder().iter_mut().zip(u.remainder()) {
            *g = gelu_one(*g) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in ulps of f32 between `got` and the exact value `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got as f64 == want {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// Every 257th f32 bit pattern in [-lim, lim] and the specials.
    fn sweep(lim: f32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..lim.to_bits())
            .step_by(257)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        v.extend([0.0, -0.0, lim, -lim, f32::MIN_POSITIVE, 1e-40, -1e-40]);
        v
    }

    #[test]
    fn tanh_is_within_one_ulp_at_every_level() {
        let xs = sweep(12.0);
        for level in crate::simd::available() {
            let mut v = xs.clone();
            tanh_in_place::at(level, &mut v);
            let worst = xs
                .iter()
                .zip(&v)
                .map(|(&x, &y)| (ulps(y, (x as f64).tanh()), x))
                .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
            assert!(
                worst.0 <= 1.0,
                "{level}: {} ulp at x = {}",
                worst.0,
                worst.1
            );
        }
        // Saturation, signs, NaN.
        let mut s = [
            100.0f32,
            -100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::NAN,
        ];
        tanh_in_place(&mut s);
        assert_eq!(&s[..4], &[1.0, -1.0, 1.0, -1.0]);
        assert!(s[4] == 0.0 && s[4].is_sign_negative());
        assert!(s[5].is_nan());
    }

    #[test]
    fn exp_is_within_one_ulp_at_every_level() {
        // Softmax arguments are ≤ 0; cover the positive side too, up to overflow.
        let mut xs = sweep(88.0);
        xs.extend([-103.0, -200.0, 89.0, f32::NEG_INFINITY]);
        for level in crate::simd::available() {
            let mut v = xs.clone();
            exp_in_place::at(level, &mut v);
            for (&x, &y) in xs.iter().zip(&v) {
                let want = (x as f64).exp();
                if want < f32::MIN_POSITIVE as f64 {
                    // Subnormal or zero results: within one subnormal step.
                    assert!(
                        (y as f64 - want).abs() <= 1.5e-45,
                        "{level}: exp({x}) = {y}"
                    );
                } else if want > f32::MAX as f64 {
                    assert_eq!(y, f32::INFINITY);
                } else {
                    assert!(ulps(y, want) <= 1.0, "{level}: exp({x}) = {y}, want {want}");
                }
            }
        }
    }

    #[test]
    fn softcap_and_gelu_follow_their_formulas_at_every_level() {
        let xs = sweep(60.0);
        let ups: Vec<f32> = xs.iter().map(|x| 1.0 - x / 128.0).collect();
        for level in crate::simd::available() {
            let mut v = xs.clone();
            softcap::at(level, &mut v, 30.0);
            for (&x, &y) in xs.iter().zip(&v) {
                let want = ((x / 30.0) as f64).tanh() * 30.0;
                assert!(
                    (y as f64 - want).abs() <= 4e-7 * want.abs().max(1e-30),
                    "{x}: {y}"
                );
            }
            let mut g = xs.clone();
            gelu_mul::at(level, &mut g, &ups);
            for ((&x, &u), &y) in xs.iter().zip(&ups).zip(&g) {
                let x64 = x as f64;
                let inner =
                    (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64 * x64 * x64);
                let want = 0.5 * x64 * (1.0 + inner.tanh()) * u as f64;
                assert!(
                    (y as f64 - want).abs() <= 1e-6 * (x64.abs() * (u as f64).abs()).max(1e-30),
                    "{level}: gelu({x})·{u} = {y}, want {want}"
                );
            }
        }
    }
}
