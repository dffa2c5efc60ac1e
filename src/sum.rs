//! The weighted sum of the merge element path, vectorised: `out = Σ_{i≠ref} c_i·(x_i − x_ref) + s·x_ref`
//! in f64 (see [`crate::kernels::combine`]), compiled for each SIMD level of [`crate::simd`].
//!
//! Up to 8 terms, each element's sum stays in a register while every input is added; with more, elements
//! are taken in blocks that stay in L1 while every input is added. Either way the inputs are added in
//! their order, with separate multiplies and adds (never fused): each element sees exactly the operations
//! of the scalar loop in the same order, so every level and both forms give the same bits.

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
        // The usual counts of terms keep the accumulator in a register across terms.
        match terms.len() {
            0 => fused::<0>(&terms, sum, x_ref, out),
            1 => fused::<1>(&terms, sum, x_ref, out),
            2 => fused::<2>(&terms, sum, x_ref, out),
            3 => fused::<3>(&terms, sum, x_ref, out),
            4 => fused::<4>(&terms, sum, x_ref, out),
            5 => fused::<5>(&terms, sum, x_ref, out),
            6 => fused::<6>(&terms, sum, x_ref, out),
            7 => fused::<7>(&terms, sum, x_ref, out),
            8 => fused::<8>(&terms, sum, x_ref, out),
            _ => blocked(&terms, sum, x_ref, out),
        }
    }
}

/// `N` terms, element by element: `o = 0; o += c_k·(x_k − r)` in term order; `o += s·r`.
#[inline(always)]
fn fused<const N: usize>(terms: &[(f64, &[f32])], sum: f64, r: &[f32], out: &mut [f64]) {
    let n = out.len();
    let c: [f64; N] = std::array::from_fn(|k| terms[k].0);
    let x: [&[f32]; N] = std::array::from_fn(|k| &terms[k].1[..n]);
    let r = &r[..n];
    for j in 0..n {
        let rj = r[j] as f64;
        let mut o = 0.0;
        for k in 0..N {
            o += c[k] * (x[k][j] as f64 - rj);
        }
        out[j] = o + sum * rj;
    }
}

/// Any number of terms: blocks of elements that stay in L1 while every term is added.
#[inline(always)]
fn blocked(terms: &[(f64, &[f32])], sum: f64, x_ref: &[f32], out: &mut [f64]) {
    let n = out.len();
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let o = &mut out[start..end];
        let r = &x_ref[start..end];
        o.fill(0.0);
        for &(c, x) in terms {
            for ((o, &xi), &r) in o.iter_mut().zip(&x[start..end]).zip(r) {
                *o += c * (xi as f64 - r as f64);
            }
        }
        for (o, &r) in o.iter_mut().zip(r) {
            *o += sum * r as f64;
        }
    }
}

/// Lanes of each dot product of [`gram_lanes`]: element i goes to partial sum i mod `LANES`. A fixed
/// order, so a Gram does not depend on threads or SIMD level, and eight independent additions per step
/// instead of one chain (the single chain was 19% of a WARP merge).
pub(crate) const LANES: usize = 8;

/// Adds each dot product's lanes, in lane order, to `gram` (symmetric).
pub(crate) fn gram_fold(lanes: &[[f64; LANES]], gram: &mut [Vec<f64>]) {
    let m = gram.len();
    for a in 0..m {
        for b in a..m {
            let s = lanes[a * m + b].iter().fold(0.0, |s, v| s + v);
            gram[a][b] += s;
            if a != b {
                gram[b][a] += s;
            }
        }
    }
}

leveled! {
    /// Accumulates every dot product of m `vectors` into `lanes`: pair (a, b) at `a·m + b` (a ≤ b),
    /// element i (counted from where the accumulation started) in lane i mod [`LANES`]. Up to 4 vectors in
    /// one pass over them, more one pair at a time. Runs over consecutive stretches of the vectors (each
    /// a multiple of [`LANES`] long but the last) give the sums of one run over the whole, and every
    /// level and form the same bits.
    pub(crate) fn gram_lanes(vectors: &[&[f64]], lanes: &mut [[f64; LANES]]) {
        let m = vectors.len();
        let n = vectors.first().map_or(0, |v| v.len());
        for v in vectors {
            assert_eq!(v.len(), n, "Gram of vectors of different lengths");
        }
        assert_eq!(lanes.len(), m * m);
        match m {
            0 => {}
            1 => lanes_fused::<1>(vectors, lanes),
            2 => lanes_fused::<2>(vectors, lanes),
            3 => lanes_fused::<3>(vectors, lanes),
            4 => lanes_fused::<4>(vectors, lanes),
            _ => {
                for a in 0..m {
                    for b in a..m {
                        lanes_pair(vectors[a], vectors[b], &mut lanes[a * m + b]);
                    }
                }
            }
        }
    }
}

/// One dot product's `LANES` partial sums (the lanes of [`lanes_fused`], for a single pair).
#[inline(always)]
fn lanes_pair(x: &[f64], y: &[f64], acc: &mut [f64; LANES]) {
    let (xc, xr) = x.as_chunks::<LANES>();
    let (yc, yr) = y[..x.len()].as_chunks::<LANES>();
    for (p, q) in xc.iter().zip(yc) {
        for l in 0..LANES {
            acc[l] += p[l] * q[l];
        }
    }
    for (l, (p, q)) in xr.iter().zip(yr).enumerate() {
        acc[l] += p * q;
    }
}

/// The dot products of `M` vectors in one pass: per pair (a ≤ b) `LANES` partial sums in registers.
#[inline(always)]
fn lanes_fused<const M: usize>(vectors: &[&[f64]], lanes: &mut [[f64; LANES]]) {
    let n = vectors[0].len();
    let v: [&[f64]; M] = std::array::from_fn(|a| &vectors[a][..n]);
    let mut acc = [[[0f64; LANES]; M]; M];
    for a in 0..M {
        for b in a..M {
            acc[a][b] = lanes[a * M + b];
        }
    }
    let whole = n / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        let p: [[f64; LANES]; M] =
            std::array::from_fn(|a| v[a][i..i + LANES].try_into().expect("a lane block"));
        for a in 0..M {
            for b in a..M {
                for l in 0..LANES {
                    acc[a][b][l] += p[a][l] * p[b][l];
                }
            }
        }
    }
    for a in 0..M {
        for b in a..M {
            for (l, i) in (whole..n).enumerate() {
                acc[a][b][l] += v[a][i] * v[b][i];
            }
            lanes[a * M + b] = acc[a][b];
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
        let inputs: Vec<Vec<f32>> = (0..11)
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
            (vec![0.5, -0.25], 1),
            // More terms than the register form takes (the blocked loop).
            ((0..11).map(|i| 1.0 / (i as f64 + 1.5)).collect(), 4),
            ((0..9).map(|i| i as f64 - 2.0).collect(), 8),
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

    /// The Gram accumulation before it was vectorised: one pair at a time, 8 lane sums.
    fn reference_gram(vectors: &[&[f64]], gram: &mut [Vec<f64>]) {
        let m = vectors.len();
        for a in 0..m {
            for b in a..m {
                let (x, y) = (vectors[a], vectors[b]);
                let mut acc = [0f64; LANES];
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    acc[i % LANES] += p * q;
                }
                let s = acc.iter().fold(0.0, |s, v| s + v);
                gram[a][b] += s;
                if a != b {
                    gram[b][a] += s;
                }
            }
        }
    }

    #[test]
    fn every_level_and_count_accumulates_the_gram_bit_for_bit_like_the_pairwise_loop() {
        let mut s = 987654321u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        for m in 1..=6 {
            for n in [0, 5, 8, 13, 1000] {
                // Values of mixed magnitude, so that the order of additions shows in the bits.
                let v: Vec<Vec<f64>> = (0..m)
                    .map(|_| {
                        (0..n)
                            .map(|_| next() * 10f64.powi((next() * 8.0) as i32))
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f64]> = v.iter().map(|x| x.as_slice()).collect();
                let start: Vec<Vec<f64>> = (0..m)
                    .map(|a| (0..m).map(|b| (a * m + b) as f64 * 0.1).collect())
                    .collect();
                let mut want = start.clone();
                reference_gram(&refs, &mut want);
                for level in crate::simd::available() {
                    let mut got = start.clone();
                    {
                        let mut lanes = vec![[0.0; LANES]; m * m];
                        gram_lanes::at(level, &refs, &mut lanes);
                        gram_fold(&lanes, &mut got);
                    }
                    // Accumulated over two stretches (the first a multiple of LANES long), as the
                    // executor does sub-block by sub-block.
                    let cut = n / 2 / LANES * LANES;
                    let mut split = start.clone();
                    let mut lanes = vec![[0.0; LANES]; m * m];
                    let head: Vec<&[f64]> = refs.iter().map(|v| &v[..cut]).collect();
                    let tail: Vec<&[f64]> = refs.iter().map(|v| &v[cut..]).collect();
                    gram_lanes::at(level, &head, &mut lanes);
                    gram_lanes::at(level, &tail, &mut lanes);
                    gram_fold(&lanes, &mut split);
                    for a in 0..m {
                        for b in 0..m {
                            assert_eq!(
                                split[a][b].to_bits(),
                                want[a][b].to_bits(),
                                "split {level} m={m} n={n}"
                            );
                            assert_eq!(
                                got[a][b].to_bits(),
                                want[a][b].to_bits(),
                                "{level} m={m} n={n} ({a},{b})"
                            );
                        }
                    }
                }
            }
        }
    }
}
