//! The element conversions of the merge path, vectorised: stored bf16/f16/f32 → f32 (exact), and f64 →
//! bf16/f16/f32 rounded once (round-to-odd to f32, then round-to-nearest-even), at the SIMD level of
//! [`crate::simd`]. Every level gives the same bits as the scalar code (the `half` crate's conversions
//! and [`super::dtype::f64_to_f32_round_odd`]), NaN payloads included; the tests check this bit for bit.

use half::{bf16, f16};

use super::dtype::{f64_to_f32_round_odd, FloatType};
use crate::simd::{leveled, Level};

/// Decodes little-endian elements of `t` into `out` at `level`. `bytes.len()` must be `out.len() · size`.
/// Returns whether any decoded value is NaN or infinite (tested on the fly, in registers).
pub(crate) fn decode_at(level: Level, t: FloatType, bytes: &[u8], out: &mut [f32]) -> bool {
    debug_assert_eq!(bytes.len(), out.len() * t.size());
    let n = out.len().min(bytes.len() / t.size());
    let (bytes, out) = (&bytes[..n * t.size()], &mut out[..n]);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX-512 F/BW/VL/DQ (asserted); lengths matched above.
            unsafe { x86::decode_avx512(t, bytes, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX2 and F16C (asserted); lengths matched above.
            unsafe { x86::decode_avx2(t, bytes, out) }
        }
        _ => {
            decode_scalar(t, bytes, out);
            first_non_finite::at(level, out).is_some()
        }
    }
}

/// Rounds `values` once to `t` into `dst` (`values.len() · size` bytes, little-endian) at `level`.
pub(crate) fn encode_f64_at(level: Level, t: FloatType, values: &[f64], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), values.len() * t.size());
    let n = values.len().min(dst.len() / t.size());
    let (values, dst) = (&values[..n], &mut dst[..n * t.size()]);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX-512 F/BW/VL/DQ (asserted); lengths matched above.
            unsafe { x86::encode_f64_avx512(t, values, dst) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX2 and F16C (asserted); lengths matched above.
            unsafe { x86::encode_f64_avx2(t, values, dst) }
        }
        _ => encode_f64_scalar(t, values, dst),
    }
}

leveled! {
    /// Index of the first NaN or infinity in `v`: blocks of 64 are tested without early exit (so the test
    /// vectorises at the process's SIMD level), then the block that has one is searched.
    pub fn first_non_finite(v: &[f32]) -> Option<usize> {
        for (b, block) in v.chunks(64).enumerate() {
            // Exponent bits all ones: NaN or ±∞.
            let bad = block
                .iter()
                .fold(0u32, |acc, x| acc | ((x.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32);
            if bad != 0 {
                return block.iter().position(|x| !x.is_finite()).map(|i| b * 64 + i);
            }
        }
        None
    }
}

pub(crate) fn decode_scalar(t: FloatType, bytes: &[u8], out: &mut [f32]) {
    match t {
        FloatType::BF16 => {
            let (pairs, _) = bytes.as_chunks::<2>();
            for (o, b) in out.iter_mut().zip(pairs) {
                *o = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16);
            }
        }
        FloatType::F16 => {
            let (pairs, _) = bytes.as_chunks::<2>();
            for (o, b) in out.iter_mut().zip(pairs) {
                *o = f16::from_bits(u16::from_le_bytes(*b)).to_f32();
            }
        }
        FloatType::F32 => {
            let (quads, _) = bytes.as_chunks::<4>();
            for (o, b) in out.iter_mut().zip(quads) {
                *o = f32::from_le_bytes(*b);
            }
        }
    }
}

pub(crate) fn encode_f64_scalar(t: FloatType, values: &[f64], dst: &mut [u8]) {
    match t {
        FloatType::F32 => {
            let (quads, _) = dst.as_chunks_mut::<4>();
            for (d, &v) in quads.iter_mut().zip(values) {
                *d = (v as f32).to_le_bytes();
            }
        }
        FloatType::BF16 => {
            let (pairs, _) = dst.as_chunks_mut::<2>();
            for (d, &v) in pairs.iter_mut().zip(values) {
                *d = bf16::from_f32(f64_to_f32_round_odd(v))
                    .to_bits()
                    .to_le_bytes();
            }
        }
        FloatType::F16 => {
            let (pairs, _) = dst.as_chunks_mut::<2>();
            for (d, &v) in pairs.iter_mut().zip(values) {
                *d = f16::from_f32(f64_to_f32_round_odd(v))
                    .to_bits()
                    .to_le_bytes();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{decode_scalar, encode_f64_scalar, first_non_finite, FloatType};
    use crate::simd::Level;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
    pub unsafe fn decode_avx512(t: FloatType, bytes: &[u8], out: &mut [f32]) -> bool {
        let n = out.len();
        let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr());
        let full = n / 16 * 16;
        let mut i = 0;
        // Lanes whose exponent bits are all ones (NaN or ±∞), accumulated.
        let exp = _mm512_set1_epi32(0x7f80_0000);
        let mut bad: u16 = 0;
        match t {
            FloatType::BF16 => {
                while i < full {
                    let h = _mm256_loadu_si256(src.add(2 * i) as *const __m256i);
                    let v = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, exp), exp);
                    _mm512_storeu_si512(dst.add(i) as *mut _, v);
                    i += 16;
                }
            }
            FloatType::F16 => {
                while i < full {
                    let h = _mm256_loadu_si256(src.add(2 * i) as *const __m256i);
                    let v = _mm512_cvtph_ps(h);
                    let bits = _mm512_castps_si512(v);
                    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp), exp);
                    _mm512_storeu_ps(dst.add(i), v);
                    i += 16;
                }
            }
            FloatType::F32 => {
                std::ptr::copy_nonoverlapping(src, dst as *mut u8, 4 * n);
                return first_non_finite::at(Level::Avx512, out).is_some();
            }
        }
        let size = t.size();
        decode_scalar(t, &bytes[i * size..], &mut out[i..]);
        bad != 0 || first_non_finite::at(Level::Avx512, &out[i..]).is_some()
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode_avx2(t: FloatType, bytes: &[u8], out: &mut [f32]) -> bool {
        let n = out.len();
        let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr());
        let full = n / 8 * 8;
        let mut i = 0;
        // Lanes whose exponent bits are all ones (NaN or ±∞), accumulated.
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let mut bad = _mm256_setzero_si256();
        match t {
            FloatType::BF16 => {
                while i < full {
                    let h = _mm_loadu_si128(src.add(2 * i) as *const __m128i);
                    let v = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(v, exp), exp));
                    _mm256_storeu_si256(dst.add(i) as *mut __m256i, v);
                    i += 8;
                }
            }
            FloatType::F16 => {
                while i < full {
                    let h = _mm_loadu_si128(src.add(2 * i) as *const __m128i);
                    let v = _mm256_cvtph_ps(h);
                    let bits = _mm256_castps_si256(v);
                    bad =
                        _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(bits, exp), exp));
                    _mm256_storeu_ps(dst.add(i), v);
                    i += 8;
                }
            }
            FloatType::F32 => {
                std::ptr::copy_nonoverlapping(src, dst as *mut u8, 4 * n);
                return first_non_finite::at(Level::Avx2, out).is_some();
            }
        }
        let size = t.size();
        decode_scalar(t, &bytes[i * size..], &mut out[i..]);
        _mm256_movemask_epi8(bad) != 0 || first_non_finite::at(Level::Avx2, &out[i..]).is_some()
    }

    /// 8 f64 → 8 f32 bits rounded to odd (see `f64_to_f32_round_odd`): the nearest f32, then, when
    /// inexact and finite, truncated towards zero with the last mantissa bit set.
    #[inline(always)]
    unsafe fn round_odd8_avx512(x: __m512d) -> __m256i {
        let f = _mm512_cvtpd_ps(x);
        let back = _mm512_cvtps_pd(f);
        let bits = _mm256_castps_si256(f);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let finite = _mm256_cmpneq_epi32_mask(_mm256_and_si256(bits, exp), exp);
        let inexact = _mm512_cmp_pd_mask::<_CMP_NEQ_OQ>(back, x) & finite;
        let sign = _mm512_set1_pd(-0.0);
        let over = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(
            _mm512_andnot_pd(sign, back),
            _mm512_andnot_pd(sign, x),
        ) & inexact;
        let bits = _mm256_mask_sub_epi32(bits, over, bits, _mm256_set1_epi32(1));
        _mm256_mask_or_epi32(bits, inexact, bits, _mm256_set1_epi32(1))
    }

    /// 16 f32 bits → bf16 bits, as `half::bf16::from_f32` (NaN: top half with the quiet bit set; else
    /// round to nearest even).
    #[inline(always)]
    unsafe fn bf16_16_avx512(x: __m512i) -> __m256i {
        let hi = _mm512_srli_epi32::<16>(x);
        let round = _mm512_test_epi32_mask(x, _mm512_set1_epi32(0x8000))
            & _mm512_test_epi32_mask(x, _mm512_set1_epi32(0x17fff));
        let r = _mm512_mask_add_epi32(hi, round, hi, _mm512_set1_epi32(1));
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff)),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
        _mm512_cvtepi32_epi16(r)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
    pub unsafe fn encode_f64_avx512(t: FloatType, values: &[f64], dst: &mut [u8]) {
        let n = values.len();
        let (src, out) = (values.as_ptr(), dst.as_mut_ptr());
        let full = n / 16 * 16;
        let mut i = 0;
        while i < full {
            let (a, b) = (_mm512_loadu_pd(src.add(i)), _mm512_loadu_pd(src.add(i + 8)));
            match t {
                FloatType::F32 => {
                    _mm256_storeu_ps(out.add(4 * i) as *mut f32, _mm512_cvtpd_ps(a));
                    _mm256_storeu_ps(out.add(4 * i + 32) as *mut f32, _mm512_cvtpd_ps(b));
                }
                FloatType::BF16 | FloatType::F16 => {
                    let lo = round_odd8_avx512(a);
                    let hi = round_odd8_avx512(b);
                    let f = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    let h = if t == FloatType::BF16 {
                        bf16_16_avx512(f)
                    } else {
                        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_castsi512_ps(f))
                    };
                    _mm256_storeu_si256(out.add(2 * i) as *mut __m256i, h);
                }
            }
            i += 16;
        }
        encode_f64_scalar(t, &values[i..], &mut dst[i * t.size()..]);
    }

    /// 4 f64 → 4 f32 bits rounded to odd.
    #[inline(always)]
    unsafe fn round_odd4_avx2(x: __m256d) -> __m128i {
        let f = _mm256_cvtpd_ps(x);
        let back = _mm256_cvtps_pd(f);
        let bits = _mm_castps_si128(f);
        let exp = _mm_set1_epi32(0x7f80_0000);
        let finite = _mm_xor_si128(
            _mm_cmpeq_epi32(_mm_and_si128(bits, exp), exp),
            _mm_set1_epi32(-1),
        );
        // Per f64 lane masks, narrowed to the f32 lanes (the low 32 bits of each 64-bit mask).
        let narrow = |m: __m256d| -> __m128i {
            let m = _mm256_castpd_si256(m);
            let m = _mm256_permutevar8x32_epi32(m, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
            _mm256_castsi256_si128(m)
        };
        let inexact = _mm_and_si128(narrow(_mm256_cmp_pd::<_CMP_NEQ_OQ>(back, x)), finite);
        let sign = _mm256_set1_pd(-0.0);
        let over = _mm_and_si128(
            narrow(_mm256_cmp_pd::<_CMP_GT_OQ>(
                _mm256_andnot_pd(sign, back),
                _mm256_andnot_pd(sign, x),
            )),
            inexact,
        );
        // over is −1 where the magnitude is to be decreased: bits + (−1).
        let bits = _mm_add_epi32(bits, over);
        _mm_or_si128(bits, _mm_and_si128(inexact, _mm_set1_epi32(1)))
    }

    /// 8 f32 bits → bf16 bits, as `half::bf16::from_f32`.
    #[inline(always)]
    unsafe fn bf16_8_avx2(x: __m256i) -> __m128i {
        let zero = _mm256_setzero_si256();
        let hi = _mm256_srli_epi32::<16>(x);
        let has = |m: i32| {
            let z = _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(m)), zero);
            _mm256_xor_si256(z, _mm256_set1_epi32(-1))
        };
        let round = _mm256_and_si256(has(0x8000), has(0x17fff));
        let r = _mm256_sub_epi32(hi, round);
        let nan = _mm256_cmpgt_epi32(
            _mm256_and_si256(x, _mm256_set1_epi32(0x7fff_ffff)),
            _mm256_set1_epi32(0x7f80_0000),
        );
        let r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn encode_f64_avx2(t: FloatType, values: &[f64], dst: &mut [u8]) {
        let n = values.len();
        let (src, out) = (values.as_ptr(), dst.as_mut_ptr());
        let full = n / 8 * 8;
        let mut i = 0;
        while i < full {
            let (a, b) = (_mm256_loadu_pd(src.add(i)), _mm256_loadu_pd(src.add(i + 4)));
            match t {
                FloatType::F32 => {
                    _mm_storeu_ps(out.add(4 * i) as *mut f32, _mm256_cvtpd_ps(a));
                    _mm_storeu_ps(out.add(4 * i + 16) as *mut f32, _mm256_cvtpd_ps(b));
                }
                FloatType::BF16 | FloatType::F16 => {
                    let f = _mm256_set_m128i(round_odd4_avx2(b), round_odd4_avx2(a));
                    let h = if t == FloatType::BF16 {
                        bf16_8_avx2(f)
                    } else {
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_castsi256_ps(f))
                    };
                    _mm_storeu_si128(out.add(2 * i) as *mut __m128i, h);
                }
            }
            i += 8;
        }
        encode_f64_scalar(t, &values[i..], &mut dst[i * t.size()..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edge cases for every conversion: zeros of both signs, subnormals of each type, the extremes, ties
    /// of each rounding, values just around them, infinities and NaNs with payloads.
    fn f64_cases() -> Vec<f64> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::from_bits(0xfff8_dead_beef_0001),
            f64::MIN_POSITIVE,
            5e-324,
            f32::MAX as f64,
            f32::MAX as f64 * (1.0 + 2f64.powi(-25)),
            f32::MAX as f64 * (1.0 + 2f64.powi(-24)),
            1e39,
            -1e39,
            f32::MIN_POSITIVE as f64,
            1.4e-45,
            0.7e-45,
            0.70000001e-45,
            2.1e-45,
            65504.0,
            65520.0,
            65519.99,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            3.4e38,
        ];
        // bf16, f16 and f32 ties and their neighbours at several scales.
        for e in [-140, -126, -24, -14, -1, 0, 7, 15, 100, 127] {
            for mant in [8, 11, 24] {
                let tie = (1.0 + 2f64.powi(-mant)) * 2f64.powi(e);
                for x in [
                    tie,
                    tie * (1.0 + 2f64.powi(-40)),
                    tie * (1.0 - 2f64.powi(-40)),
                    (1.0 + 3.0 * 2f64.powi(-mant)) * 2f64.powi(e),
                ] {
                    v.push(x);
                    v.push(-x);
                }
            }
        }
        // A pseudo-random spread over the whole range.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let exp = (s >> 52) % 320; // 2^-160 .. 2^160
            v.push(f64::from_bits(
                (s & 0x800f_ffff_ffff_ffff) | ((exp + 863) << 52),
            ));
        }
        v
    }

    #[test]
    fn encode_f64_is_bit_identical_at_every_level() {
        let values = f64_cases();
        for t in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let mut want = vec![0u8; values.len() * t.size()];
            encode_f64_scalar(t, &values, &mut want);
            for level in crate::simd::available() {
                // Every offset, so each value goes through the vector body and the scalar tail.
                for skip in 0..17 {
                    let mut got = vec![0u8; (values.len() - skip) * t.size()];
                    encode_f64_at(level, t, &values[skip..], &mut got);
                    assert_eq!(got, want[skip * t.size()..], "{level} {t} skip {skip}");
                }
            }
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_nan_or_infinity() {
        let mut v = vec![1.0f32; 1000];
        assert_eq!(first_non_finite(&v), None);
        v[999] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&v), Some(999));
        v[130] = f32::NAN;
        v[131] = f32::INFINITY;
        assert_eq!(first_non_finite(&v), Some(130));
        v[0] = f32::from_bits(0xff80_0001); // a NaN with a payload
        assert_eq!(first_non_finite(&v), Some(0));
        assert_eq!(first_non_finite(&[f32::MAX, -f32::MAX, 1e-45, -0.0]), None);
        assert_eq!(first_non_finite(&[]), None);
    }

    #[test]
    fn decode_is_bit_identical_at_every_level() {
        // Every 16-bit pattern (subnormals, NaNs with payloads, ±0, ±∞) and f32 edge patterns.
        let halves: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let words: Vec<u8> = [
            0u32,
            0x8000_0000,
            1,
            0x8000_0001,
            0x007f_ffff,
            0x7f80_0000,
            0x7f80_0001,
            0xffc0_1234,
            0x3f80_0000,
            0x7f7f_ffff,
        ]
        .iter()
        .cycle()
        .take(103)
        .flat_map(|b| b.to_le_bytes())
        .collect();
        for (t, bytes) in [
            (FloatType::BF16, &halves),
            (FloatType::F16, &halves),
            (FloatType::F32, &words),
        ] {
            let n = bytes.len() / t.size();
            let mut want = vec![0f32; n];
            decode_scalar(t, bytes, &mut want);
            for level in crate::simd::available() {
                for skip in 0..17 {
                    let mut got = vec![0f32; n - skip];
                    let flagged = decode_at(level, t, &bytes[skip * t.size()..], &mut got);
                    assert_eq!(flagged, want[skip..].iter().any(|x| !x.is_finite()));
                    let same = got
                        .iter()
                        .zip(&want[skip..])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{level} {t} skip {skip}");
                }
            }
        }
    }

    #[test]
    fn decode_flags_a_single_non_finite_anywhere_at_every_level() {
        for t in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let n = 1000;
            let finite: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 64.0).collect();
            for bad in [
                None,
                Some(0usize),
                Some(5),
                Some(16),
                Some(500),
                Some(991),
                Some(999),
            ] {
                for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut v = finite.clone();
                    if let Some(p) = bad {
                        v[p] = special;
                    }
                    let mut bytes = Vec::new();
                    t.encode(&v, &mut bytes);
                    for level in crate::simd::available() {
                        let mut got = vec![0f32; n];
                        let flagged = decode_at(level, t, &bytes, &mut got);
                        assert_eq!(flagged, bad.is_some(), "{level} {t} {bad:?} {special}");
                    }
                }
            }
        }
    }
}
