//! Element types the merge engine computes with, and the exact conversions between them.
//!
//! Inputs are upcast exactly to f32 (bf16 and f16 embed in f32 without loss); results are rounded
//! once to the output type with round-to-nearest-even, which is what `half` implements.

use half::{bf16, f16};

pub use super::convert::first_non_finite;
use safetensors::Dtype;

/// A floating-point storage type that can be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    BF16,
    F16,
    F32,
}

impl FloatType {
    /// The merge-able type of a safetensors dtype, or `None` for integers, bools, f64 and 8-bit floats.
    pub fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::BF16 => Some(Self::BF16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F32 => Some(Self::F32),
            _ => None,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// The recipe / config.json spelling (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }

    /// Parses the recipe spelling; `None` for anything else.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "bfloat16" => Some(Self::BF16),
            "float16" => Some(Self::F16),
            "float32" => Some(Self::F32),
            _ => None,
        }
    }

    /// The type torch computes in when it combines tensors of these two types (`torch.promote_types`):
    /// the same type, else float32 (bfloat16 with float16 included).
    pub fn promote(self, other: Self) -> Self {
        if self == other {
            self
        } else {
            Self::F32
        }
    }

    /// Rounds each value to this type in place (round-to-nearest-even; a value beyond float16's range
    /// becomes ±Inf, as a cast does).
    pub fn round_in_place(self, values: &mut [f32]) {
        if self != Self::F32 {
            values.iter_mut().for_each(|v| *v = self.round_f32(*v));
        }
    }

    /// `x` as torch has it in this type when it computed `x` in float32: rounded to float32, then to
    /// this type (round-to-nearest-even both times), as an f32.
    #[inline]
    pub fn round_f64(self, x: f64) -> f32 {
        self.round_f32(x as f32)
    }

    /// `x` rounded to this type (round-to-nearest-even).
    #[inline]
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            Self::BF16 => bf16::from_f32(x).to_f32(),
            Self::F16 => f16::from_f32(x).to_f32(),
            Self::F32 => x,
        }
    }

    /// Decodes little-endian elements into `out` (exact). `bytes.len()` must be `out.len() * size`.
    /// Vectorised at the process's SIMD level (`crate::simd`); every level gives the same bits.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        super::convert::decode_at(crate::simd::level(), self, bytes, out);
    }

    /// [`Self::decode`], returning whether every decoded value is finite (tested while decoding).
    pub fn decode_finite(self, bytes: &[u8], out: &mut [f32]) -> bool {
        !super::convert::decode_at(crate::simd::level(), self, bytes, out)
    }

    /// Rounds each value once to this type (round-to-nearest-even) and appends little-endian bytes.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            Self::BF16 => {
                for &v in values {
                    out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            Self::F16 => {
                for &v in values {
                    out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            Self::F32 => {
                for &v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

impl FloatType {
    /// Index of the first NaN or ±Inf among little-endian elements of this type (checked on the bit
    /// patterns: an exponent field of all ones), `None` when every element is finite.
    pub fn first_nonfinite(self, bytes: &[u8]) -> Option<usize> {
        /// First element whose `mask` bits are all set. Blocks of 64 are tested with a branch-free OR
        /// (which the compiler vectorises) and only a block with a hit is searched.
        fn first_all_ones<const N: usize>(
            bytes: &[u8],
            mask: u32,
            bits: impl Fn(&[u8; N]) -> u32,
        ) -> Option<usize> {
            const BLOCK: usize = 64;
            let hit = |e: &[u8; N]| bits(e) & mask == mask;
            let elems = bytes.as_chunks::<N>().0;
            elems.chunks(BLOCK).enumerate().find_map(|(b, block)| {
                if block.iter().fold(false, |any, e| any | hit(e)) {
                    block.iter().position(hit).map(|i| b * BLOCK + i)
                } else {
                    None
                }
            })
        }
        match self {
            Self::BF16 => first_all_ones::<2>(bytes, 0x7f80, |b| u16::from_le_bytes(*b) as u32),
            Self::F16 => first_all_ones::<2>(bytes, 0x7c00, |b| u16::from_le_bytes(*b) as u32),
            Self::F32 => first_all_ones::<4>(bytes, 0x7f80_0000, |b| u32::from_le_bytes(*b)),
        }
    }

    /// Rounds each f64 value once to this type (round-to-nearest-even) and appends little-endian bytes.
    ///
    /// For bf16/f16 the value first goes to f32 with round-to-odd, which keeps the second rounding
    /// correct (f32 has more than twice the precision of either, plus two bits): the result is the f64
    /// value rounded once.
    ///
    /// Vectorised at the process's SIMD level (`crate::simd`); every level gives the same bytes.
    pub fn encode_f64(self, values: &[f64], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + values.len() * self.size(), 0);
        super::convert::encode_f64_at(crate::simd::level(), self, values, &mut out[start..]);
    }
}

/// f64 → f32 rounding to odd: truncate towards zero, and set the last mantissa bit when inexact.
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let f = x as f32;
    if !f.is_finite() || f as f64 == x {
        return f;
    }
    // Truncate towards zero.
    let mut t = if (f as f64).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    if t.to_bits() & 1 == 0 {
        t = f32::from_bits(t.to_bits() | 1);
    }
    t
}

impl std::fmt::Display for FloatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// The safetensors spelling of a dtype (`BF16`, `I64`, ...).
pub fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(t: FloatType, v: f32) -> f32 {
        let mut bytes = Vec::new();
        t.encode(&[v], &mut bytes);
        let mut out = [0f32];
        t.decode(&bytes, &mut out);
        out[0]
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_trip(FloatType::BF16, 1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even): goes up to the even one.
        assert_eq!(
            round_trip(FloatType::BF16, 1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        // Just above the tie rounds up.
        assert_eq!(
            round_trip(FloatType::BF16, 1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        // Negative values mirror.
        assert_eq!(round_trip(FloatType::BF16, -(1.0 + 2f32.powi(-8))), -1.0);
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // f16 has 10 mantissa bits: 1 + 2^-11 is a tie between 1 and 1 + 2^-10.
        assert_eq!(round_trip(FloatType::F16, 1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            round_trip(FloatType::F16, 1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2f32.powi(-9)
        );
        // Overflow saturates to infinity as IEEE rounding does.
        assert_eq!(round_trip(FloatType::F16, 70000.0), f32::INFINITY);
    }

    #[test]
    fn f64_values_round_once() {
        let enc = |t: FloatType, v: f64| {
            let mut b = Vec::new();
            t.encode_f64(&[v], &mut b);
            let mut o = [0f32];
            t.decode(&b, &mut o);
            o[0]
        };
        // Just above a bf16 tie by less than an f32 ulp: a double rounding via f32 would land on the tie
        // and go to even (down); rounding once goes up.
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(enc(FloatType::BF16, v), 1.0 + 2f32.powi(-7));
        assert_eq!(enc(FloatType::BF16, -v), -(1.0 + 2f32.powi(-7)));
        assert_eq!(enc(FloatType::BF16, 1.0 + 2f64.powi(-8)), 1.0); // exact tie: to even
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(enc(FloatType::F16, v), 1.0 + 2f32.powi(-10));
        assert_eq!(enc(FloatType::F32, 1.0 + 2f64.powi(-24)), 1.0); // f32 tie to even
        assert_eq!(
            enc(FloatType::F32, 1.0 + 2f64.powi(-24) + 2f64.powi(-50)),
            1.0 + 2f32.powi(-23)
        );
    }

    #[test]
    fn decoding_is_exact() {
        for bits in [0x3f80u16, 0xbf80, 0x0001, 0x7f7f, 0x4049] {
            let mut out = [0f32];
            FloatType::BF16.decode(&bits.to_le_bytes(), &mut out);
            assert_eq!(out[0].to_bits(), (bits as u32) << 16);
        }
        let mut out = [0f32];
        FloatType::F16.decode(&0x3c00u16.to_le_bytes(), &mut out);
        assert_eq!(out[0], 1.0);
        FloatType::F32.decode(&1.5f32.to_le_bytes(), &mut out);
        assert_eq!(out[0], 1.5);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Rounds x to `mant` mantissa bits by brute force: the two neighbours on the grid, nearest wins,
    /// ties to the even one. Independent of the bit tricks above (normal range only).
    fn reference_round(x: f64, mant: i32) -> f64 {
        if x == 0.0 {
            return 0.0;
        }
        let e = x.abs().log2().floor() as i32;
        let ulp = 2f64.powi(e - mant);
        let lo = (x / ulp).floor() * ulp;
        let hi = lo + ulp;
        let (dl, dh) = (x - lo, hi - x);
        if dl < dh {
            lo
        } else if dh < dl {
            hi
        } else if ((lo / ulp) as i64) % 2 == 0 {
            lo
        } else {
            hi
        }
    }

    fn round_via(t: FloatType, x: f64) -> f64 {
        let mut b = Vec::new();
        t.encode_f64(&[x], &mut b);
        let mut o = [0f32];
        t.decode(&b, &mut o);
        o[0] as f64
    }

    proptest! {
        #[test]
        fn encode_f64_rounds_to_nearest_even(m in 1.0f64..2.0, e in -20i32..20, neg: bool, tie in 0u8..4) {
            let mut x = m * 2f64.powi(e);
            if tie == 0 {
                // Force an exact bf16 tie: 8 significant bits plus a trailing half.
                x = ((x * 2f64.powi(8 - e)).floor() + 0.5) * 2f64.powi(e - 8);
            }
            let x = if neg { -x } else { x };
            prop_assert_eq!(round_via(FloatType::BF16, x), reference_round(x, 7));
            if x.abs() >= 2f64.powi(-14) && x.abs() < 65504.0 {
                // f16's normal range (below it f16 is subnormal, with fewer mantissa bits).
                prop_assert_eq!(round_via(FloatType::F16, x), reference_round(x, 10));
            }
            prop_assert_eq!(round_via(FloatType::F32, x), reference_round(x, 23));
        }
    }

    #[test]
    fn nonfinite_elements_are_found_in_every_type() {
        for ft in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let mut b = Vec::new();
            ft.encode_f64(&[1.0, -2.5, 0.0, -0.0, 1e-40], &mut b);
            assert_eq!(ft.first_nonfinite(&b), None, "{ft:?}");
            for (bad, at) in [
                (f64::NAN, 1),
                (f64::INFINITY, 3),
                (f64::NEG_INFINITY, 0),
                (1e300, 2),
            ] {
                let mut v = vec![1.0, 2.0, 3.0, 4.0];
                v[at] = bad;
                let mut b = Vec::new();
                ft.encode_f64(&v, &mut b);
                assert_eq!(ft.first_nonfinite(&b), Some(at), "{ft:?} {bad}");
            }
        }
        // Beyond the largest f16 (65504, halfway to the next binade rounds up to Inf).
        let mut b = Vec::new();
        FloatType::F16.encode_f64(&[65504.0, 65519.0, 65520.0], &mut b);
        assert_eq!(FloatType::F16.first_nonfinite(&b), Some(2));
        // Long inputs are tested in blocks: the first bad element wins wherever it falls, and a second
        // one later never hides it.
        for ft in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            for at in [0, 63, 64, 65, 127, 128, 1000, 1023] {
                let mut v = vec![0.5; 1024];
                v[at] = f64::NAN;
                v[1023.min(at + 70)] = f64::INFINITY;
                let mut b = Vec::new();
                ft.encode_f64(&v, &mut b);
                assert_eq!(ft.first_nonfinite(&b), Some(at), "{ft:?} at {at}");
            }
        }
    }

    #[test]
    fn promotion_and_rounding_follow_torch() {
        use FloatType::*;
        assert_eq!(BF16.promote(BF16), BF16);
        assert_eq!(BF16.promote(F16), F32);
        assert_eq!(F16.promote(F32), F32);
        // 1 + 2^-8 lies halfway between two bf16 numbers: to even, 1. Just above it, float32 first
        // (torch computes in it) rounds back to the halfway point.
        let x = 1.0 + 2f64.powi(-8);
        assert_eq!(BF16.round_f64(x), 1.0);
        assert_eq!(BF16.round_f64(x + 2f64.powi(-30)), 1.0);
        assert_eq!(BF16.round_f64(x + 2f64.powi(-20)), 1.0 + 2f32.powi(-7));
        assert_eq!(F16.round_f64(70000.0), f32::INFINITY);
        assert_eq!(F32.round_f64(0.1), 0.1f32);
        let mut v = [0.1f32, 1.0 + 2f32.powi(-9)];
        BF16.round_in_place(&mut v);
        assert_eq!(v, [bf16::from_f32(0.1).to_f32(), 1.0]);
        assert_eq!(F16.round_f32(1.0 + 2f32.powi(-11)), 1.0);
    }
}
