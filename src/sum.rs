//! The weighted sum of the merge element path, vectorised: `out = Σ_{i≠ref} c_i·(x_i − x_ref) + s·x_ref`
//! in f64 (see [`crate::kernels::combine`]), compiled for each SIMD level of [`crate::simd`].
//!
//! Elements are taken in blocks that stay in L1 while every input is added, in the input order, with
//! separate multiplies and adds (never fused): each element sees exactly the operations of the scalar
//! loop in the same order, so every level gives the same bits.

use crate::simd::leveled;

/// Elements per block (4 KiB of f64 accumulators).
const BLOCK: usize = 512;

leveled! {
    /// [`crate::kernels::combine`], vectorised (see the module documentation); `combine_at::at(level, ..)`
    /// runs it at an explicit level.
    pub(crate) fn combine_at(
        coefs: &[f64],
        sum: f64,
        inputs: &[&[f32]],
        reference: usize,
        out: &mut [f64]
    ) {
        let n = out.len();
        let x_ref = &inputs[reference][..n];
        let terms: Vec<(f64, &[f32])> = coefs
            .iter()
            .enumerate()
            .filter(|&(i, &c)| i != reference && c != 0.0)
            .map(|(i, &c)| (c, &inputs[i][..n]))
            .collect();
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let o = &mut out[start..end];
            let r = &x_ref[start..end];
            o.fill(0.0);
            for &(c, x) in &terms {
                for ((o, &xi), &r) in o.iter_mut().zip(&x[start..end]).zip(r) {
                    *o += c * (xi as f64 - r as f64);
                }
            }
            for (o, &r) in o.iter_mut().zip(r) {
                *o += sum * r as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop `kernels::combine` had before it was vectorised: one pass per input.
    fn reference_combine(
        coefs: &[f64],
        sum: f64,
        inputs: &[&[f32]],
        reference: usize,
        out: &mut [f64],
    ) {
        let x_ref = &inputs[reference][..out.len()];
        out.fill(0.0);
        for (i, &c) in coefs.iter().enumerate() {
            if i == reference || c == 0.0 {
                continue;
            }
            let x = &inputs[i][..out.len()];
            for ((o, &xi), &r) in out.iter_mut().zip(x).zip(x_ref) {
                *o += c * (xi as f64 - r as f64);
            }
        }
        for (o, &r) in out.iter_mut().zip(x_ref) {
            *o += sum * r as f64;
        }
    }

    #[test]
    fn every_level_sums_bit_for_bit_like_the_scalar_loop() {
        // Edge inputs: ±0, subnormals, huge values whose differences round, and NaN/∞ (allow_nonfinite).
        let specials = [
            0.0f32,
            -0.0,
            1e-45,
            -1e-45,
            1.1754942e-38,
            3.4e38,
            -3.4e38,
            1.0,
            1.0 + f32::EPSILON,
            f32::INFINITY,
            f32::NAN,
        ];
        let n = 1500 + 3;
        let mut s = 12345u32;
        let inputs: Vec<Vec<f32>> = (0..5)
            .map(|k| {
                (0..n)
                    .map(|i| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        if i % 97 == k {
                            specials[(i + k) % specials.len()]
                        } else {
                            f32::from_bits(s & 0xbfff_ffff) // finite, any magnitude below 2
                        }
                    })
                    .collect()
            })
            .collect();
        let views: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        for (coefs, reference) in [
            (vec![0.2, 0.3, 0.5, 0.0, 1e-300], 0),
            (vec![-1.0, 1.0, 0.1 + 0.2, 1.0 / 3.0, 7.0], 2),
            (vec![1.0, 0.0, 0.0, 0.0, 0.0], 0),
        ] {
            let sum: f64 = coefs.iter().sum();
            let mut want = vec![0f64; n];
            reference_combine(&coefs, sum, &views, reference, &mut want);
            for level in crate::simd::available() {
                let mut got = vec![f64::NAN; n];
                combine_at::at(level, &coefs, sum, &views, reference, &mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{level}: {coefs:?}");
            }
        }
    }
}
