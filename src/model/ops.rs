//! Numerical building blocks of the forward pass: matrix products from stored-type weights, RMSNorm,
//! RoPE, soft-capping, tanh-GELU. Each follows the f32 arithmetic of the transformers reference.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

pub(crate) use super::gemm::Precision;
pub(crate) use super::vmath::{exp_in_place, gelu_mul, softcap};
use super::weights::Weight;

/// `x · wᵀ` for activations `x` [n, k] and a weight `w` [m, k] in its stored type: [n, m], at the
/// process's SIMD level (see [`super::gemm`]). The weight is never converted as a whole.
pub(crate) fn matmul_p(x: ArrayView2<f32>, w: &Weight, precision: Precision) -> Array2<f32> {
    let n = x.nrows();
    let m = w.shape()[0];
    // A zeroed allocation that the product then writes once, reading nothing first. Since the forward
    // commands keep freed buffers in the heap (`mallopt`), `calloc` clears a reused block here: 1–2% of a
    // prefill's profile. Writing into uninitialised buffers instead (tried in session 18) removed about
    // half of that, a change too small to measure in tokens/s, so the safe form stays.
    let mut y = vec![0f32; n * m];
    matmul_into(x, w, precision, &mut y);
    Array2::from_shape_vec((n, m), y).expect("n·m elements")
}

/// `x · wsᵢᵀ` for several weights sharing k, in one parallel region (q/k/v; gate/up).
pub(crate) fn matmul_many<const N: usize>(
    x: ArrayView2<f32>,
    ws: [&Weight; N],
    precision: Precision,
) -> [Array2<f32>; N] {
    let (n, k) = x.dim();
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.shape()[0]]).collect();
    let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
    for w in ws {
        assert_eq!(
            w.shape().get(1),
            Some(&k),
            "matmul: inner dimensions differ"
        );
    }
    super::gemm::matmul_many(crate::simd::level(), precision, xs, n, &ws, &mut outs);
    let mut it = ys.into_iter().zip(ws);
    std::array::from_fn(|_| {
        let (y, w) = it.next().expect("N outputs");
        Array2::from_shape_vec((n, w.shape()[0]), y).expect("n·m elements")
    })
}

/// `y = x · wᵀ` into a caller's buffer of n·m elements (every element written).
pub(crate) fn matmul_into(x: ArrayView2<f32>, w: &Weight, precision: Precision, y: &mut [f32]) {
    let (n, k) = x.dim();
    assert_eq!(
        w.shape().get(1),
        Some(&k),
        "matmul: inner dimensions differ"
    );
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    super::gemm::matmul_into(crate::simd::level(), precision, xs, n, w, y);
}

/// Query rows of one head that attention takes together: each key and value row is then read once
/// for all of them (from L2/L3 into L1) instead of once per query.
pub(crate) const QUERY_BLOCK: usize = 16;

/// Attention of `b = ranges.len()` query rows of one head (`qs`: [b][hd]): for each row t,
/// `out[t] += Σ_j softmax_j(softcap(q_t·k_j · scaling)) · v_j` over its key positions `ranges[t]`, with
/// `key(j)` / `value(j)` the rows of position j. Each row's result is bit for bit that of the row taken
/// alone (every q·k and every `+=` the same operations in the same order); the block only changes how
/// often the key and value rows are read. Compiled for the process's SIMD level (the products and
/// `axpy` vectorise to its width); the soft-cap and exp are [`super::vmath`]'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend<'a>(
    qs: &[f32],
    hd: usize,
    ranges: &[std::ops::RangeInclusive<usize>],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    out: &mut [f32],
) {
    assert_eq!(
        qs.len(),
        ranges.len() * hd,
        "attend: queries are not [b, hd]"
    );
    assert_eq!(out.len(), qs.len(), "attend: output is not [b, hd]");
    match crate::simd::level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: simd::level() never exceeds the CPU's features.
        crate::simd::Level::Avx512 => unsafe {
            attend_avx512(qs, hd, ranges, key, value, scaling, cap, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::simd::Level::Avx2 => unsafe {
            attend_avx2(qs, hd, ranges, key, value, scaling, cap, out)
        },
        _ => attend_impl::<Scalar16>(qs, hd, ranges, key, value, scaling, cap, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx512<'a>(
    qs: &[f32],
    hd: usize,
    ranges: &[std::ops::RangeInclusive<usize>],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    out: &mut [f32],
) {
    attend_impl::<lanes16::Avx512>(qs, hd, ranges, key, value, scaling, cap, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2<'a>(
    qs: &[f32],
    hd: usize,
    ranges: &[std::ops::RangeInclusive<usize>],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    out: &mut [f32],
) {
    attend_impl::<lanes16::Avx2>(qs, hd, ranges, key, value, scaling, cap, out)
}

// Plain loops, not iterator adaptors: a closure handed to `map`/`fold` is compiled inside the standard
// library's iterator code, without the caller's target features (the q·k products had run as scalar SSE
// code there).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_impl<'a, D: Dot16>(
    qs: &[f32],
    hd: usize,
    ranges: &[std::ops::RangeInclusive<usize>],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    out: &mut [f32],
) {
    let b = ranges.len();
    let (Some(lo), Some(hi)) = (
        ranges.iter().map(|r| *r.start()).min(),
        ranges.iter().map(|r| *r.end()).max(),
    ) else {
        return;
    };
    if hi < lo {
        return;
    }
    let nk = hi + 1 - lo;
    let q = |t: usize| &qs[t * hd..(t + 1) * hd];
    // Row t of `scores` holds keys lo..=hi; only its own range is used.
    let mut scores = vec![0f32; b * nk];
    for j in lo..=hi {
        let kj = key(j);
        let mut t = 0;
        while t < b {
            if t + 4 <= b && (t..t + 4).all(|u| ranges[u].contains(&j)) {
                let d = D::dot([q(t), q(t + 1), q(t + 2), q(t + 3)], kj);
                for (u, d) in d.iter().enumerate() {
                    scores[(t + u) * nk + j - lo] = d * scaling;
                }
                t += 4;
            } else {
                if ranges[t].contains(&j) {
                    scores[t * nk + j - lo] = D::dot([q(t)], kj)[0] * scaling;
                }
                t += 1;
            }
        }
    }
    // Each row's softmax over its own keys, turned into the weights of the values.
    for (t, range) in ranges.iter().enumerate() {
        if range.is_empty() {
            continue;
        }
        let row = &mut scores[t * nk + range.start() - lo..=t * nk + range.end() - lo];
        if let Some(cap) = cap {
            softcap(row, cap);
        }
        let mut max = f32::NEG_INFINITY;
        for s in row.iter() {
            max = max.max(*s);
        }
        for s in row.iter_mut() {
            *s -= max;
        }
        exp_in_place(row);
        let mut sum = 0f32;
        for s in row.iter() {
            sum += s;
        }
        for s in row.iter_mut() {
            *s /= sum;
        }
    }
    for j in lo..=hi {
        let vj = value(j);
        for (t, range) in ranges.iter().enumerate() {
            if range.contains(&j) {
                axpy(scores[t * nk + j - lo], vj, &mut out[t * hd..(t + 1) * hd]);
            }
        }
    }
}

/// Dot products in sixteen lanes: lane i sums `a[c]·b[c]` for c ≡ i (mod 16) in order (a product, then
/// a sum: no fused multiply-add), the lanes are added in halves (8, 4, 2, 1), then the elements past the
/// last whole 16 one by one. Every implementation gives these bits; they differ in instructions only.
trait Dot16 {
    /// `out[u] = a[u] · b`, `b` read once for all of them.
    fn dot<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N];
}

/// [`Dot16`] in plain Rust.
struct Scalar16;

impl Dot16 for Scalar16 {
    #[inline(always)]
    fn dot<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N] {
        let full = b.len() / 16 * 16;
        let mut acc = [[0f32; 16]; N];
        for c in (0..full).step_by(16) {
            for (acc, a) in acc.iter_mut().zip(a) {
                for i in 0..16 {
                    acc[i] += a[c + i] * b[c + i];
                }
            }
        }
        let mut out = [0f32; N];
        for (u, acc) in acc.iter_mut().enumerate() {
            for half in [8, 4, 2, 1] {
                for i in 0..half {
                    acc[i] += acc[i + half];
                }
            }
            out[u] = tail(0f32 + acc[0], &a[u][full..], &b[full..]);
        }
        out
    }
}

/// The elements past the last whole 16, added one by one.
#[inline(always)]
fn tail(mut s: f32, a: &[f32], b: &[f32]) -> f32 {
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod lanes16 {
    //! [`super::Dot16`] with intrinsics (only called from functions compiled for the level).
    use std::arch::x86_64::*;

    use super::{tail, Dot16};

    /// Lanes 0..4 of a 128-bit sum of 8 lanes' halves, added as (0,2)(1,3), then 0 + 1.
    #[inline(always)]
    unsafe fn last_halves(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    #[inline(always)]
    unsafe fn halves256(v: __m256) -> f32 {
        last_halves(_mm_add_ps(
            _mm256_castps256_ps128(v),
            _mm256_extractf128_ps::<1>(v),
        ))
    }

    /// The elements of `b` in whole sixteens, once every row of `a` is checked to be as long as `b` (the
    /// loads below rely on it).
    #[inline(always)]
    fn whole<const N: usize>(a: &[&[f32]; N], b: &[f32]) -> usize {
        for a in a.iter() {
            assert_eq!(a.len(), b.len());
        }
        b.len() / 16 * 16
    }

    /// AVX-512: the sixteen lanes in one register.
    pub struct Avx512;

    impl Dot16 for Avx512 {
        #[inline(always)]
        fn dot<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N] {
            let full = whole(&a, b);
            // SAFETY: only called from functions compiled for AVX-512 F (attend_avx512), which run only
            // where the CPU has it; every load reads 16 elements below `full` <= len.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); N];
                for c in (0..full).step_by(16) {
                    let y = _mm512_loadu_ps(b.as_ptr().add(c));
                    for (acc, a) in acc.iter_mut().zip(a.iter()) {
                        *acc = _mm512_add_ps(
                            *acc,
                            _mm512_mul_ps(_mm512_loadu_ps(a.as_ptr().add(c)), y),
                        );
                    }
                }
                let mut out = [0f32; N];
                for (u, v) in acc.iter().enumerate() {
                    let lo = _mm512_castps512_ps256(*v);
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v)));
                    let s = halves256(_mm256_add_ps(lo, hi));
                    out[u] = tail(0f32 + s, &a[u][full..], &b[full..]);
                }
                out
            }
        }
    }

    /// AVX2: lanes 0..8 and 8..16 in two registers.
    pub struct Avx2;

    impl Dot16 for Avx2 {
        #[inline(always)]
        fn dot<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N] {
            let full = whole(&a, b);
            // SAFETY: only called from functions compiled for AVX2 (attend_avx2, attend_avx512), which
            // run only where the CPU has it; every load reads 8 elements below `full` <= len.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; N];
                for c in (0..full).step_by(16) {
                    let y0 = _mm256_loadu_ps(b.as_ptr().add(c));
                    let y1 = _mm256_loadu_ps(b.as_ptr().add(c + 8));
                    for (acc, a) in acc.iter_mut().zip(a.iter()) {
                        let p = a.as_ptr().add(c);
                        acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(_mm256_loadu_ps(p), y0));
                        acc[1] =
                            _mm256_add_ps(acc[1], _mm256_mul_ps(_mm256_loadu_ps(p.add(8)), y1));
                    }
                }
                let mut out = [0f32; N];
                for (u, acc) in acc.iter().enumerate() {
                    let v = _mm256_add_ps(acc[0], acc[1]);
                    out[u] = tail(0f32 + halves256(v), &a[u][full..], &b[full..]);
                }
                out
            }
        }
    }
}

/// Dot product of two f32 slices of equal length (eight independent lanes, so it vectorizes).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a · x`.
#[inline(always)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Gemma's RMSNorm of each row: `x / sqrt(mean(x²) + eps) · (1 + w)`, with `scale` holding `1 + w`
/// (norm weights are stored zero-centred). The mean of squares is accumulated in f64.
pub(crate) fn rms_norm(x: &mut Array2<f32>, scale: &[f32], eps: f64) {
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut row| {
            let row = row.as_slice_mut().expect("rows are contiguous");
            rms_norm_row(row, scale, eps);
        });
}

pub(crate) fn rms_norm_row(row: &mut [f32], scale: &[f32], eps: f64) {
    let mean_sq = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
    let inv = (1.0 / (mean_sq + eps).sqrt()) as f32;
    for (v, s) in row.iter_mut().zip(scale) {
        *v = (*v * inv) * s;
    }
}

/// Rotary position embedding, non-interleaved ("rotate half": element i pairs with i + head_dim/2).
///
/// Angles follow transformers exactly: `inv_freq` is computed in f32 as `1 / θ^(2i/d)`, the angle is the f32
/// product `inv_freq · position`, and its cosine and sine are rounded to f32.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, theta: f64) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// The table of `rope_type: linear` with `factor` (1: plain RoPE): transformers divides the f32
    /// `inv_freq` by the factor, which divides positions by it.
    pub(crate) fn linear(head_dim: usize, theta: f64, factor: f64) -> Self {
        let mut rope = Self::new(head_dim, theta);
        if factor != 1.0 {
            let factor = factor as f32;
            rope.inv_freq.iter_mut().for_each(|f| *f /= factor);
        }
        rope
    }

    /// Rotates every head of every row of `x` ([n, heads · head_dim]); row t sits at position `first + t`.
    pub(crate) fn apply(&self, x: &mut ArrayViewMut2<f32>, head_dim: usize, first: usize) {
        let half = head_dim / 2;
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(t, mut row)| {
                let row = row.as_slice_mut().expect("rows are contiguous");
                let pos = (first + t) as f32;
                let (cos, sin): (Vec<f32>, Vec<f32>) = self
                    .inv_freq
                    .iter()
                    .map(|&f| {
                        let angle = (f * pos) as f64;
                        (angle.cos() as f32, angle.sin() as f32)
                    })
                    .unzip();
                for head in row.chunks_exact_mut(head_dim) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * cos[i] - b * sin[i];
                        x2[i] = b * cos[i] + a * sin[i];
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_values as values;
    use ndarray::array;
    use std::ops::RangeInclusive;

    /// Every `Dot16` gives the scalar definition's bits, for one row and four, with and without tails;
    /// and the sums are those of an f64 dot within f32 rounding.
    #[test]
    fn dot16_implementations_agree_bit_for_bit() {
        fn check<const N: usize>(len: usize) {
            let rows: Vec<Vec<f32>> = (0..N).map(|u| values(len, 3 + u)).collect();
            let a: [&[f32]; N] = std::array::from_fn(|u| &rows[u][..]);
            let b = values(len, 1);
            let want = Scalar16::dot(a, &b);
            for (u, w) in want.iter().enumerate() {
                let exact: f64 = (0..len).map(|i| a[u][i] as f64 * b[i] as f64).sum();
                let abs: f64 = (0..len).map(|i| (a[u][i] as f64 * b[i] as f64).abs()).sum();
                assert!(
                    (*w as f64 - exact).abs() <= abs * 2f64.powi(-20),
                    "len {len}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            for level in crate::simd::available() {
                let got = match level {
                    crate::simd::Level::Avx512 => lanes16::Avx512::dot(a, &b),
                    crate::simd::Level::Avx2 => lanes16::Avx2::dot(a, &b),
                    _ => continue,
                };
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.to_bits(), w.to_bits(), "{level} N={N} len={len}");
                }
            }
        }
        for len in [0, 5, 16, 33, 250, 256] {
            check::<1>(len);
            check::<4>(len);
        }
    }

    /// Attention over a block of queries gives each query's result alone, bit for bit, at every level,
    /// with causal and sliding-window key ranges, blocks that are not multiples of four, and head
    /// sizes with tails; and it is softmax attention (an f64 evaluation agrees).
    #[test]
    fn blocked_attention_is_each_query_alone() {
        type Run = fn(&[f32], usize, &[RangeInclusive<usize>], &[f32], &[f32], &mut [f32]);
        fn run<D: Dot16>(
            q: &[f32],
            hd: usize,
            ranges: &[RangeInclusive<usize>],
            k: &[f32],
            v: &[f32],
            out: &mut [f32],
        ) {
            let (key, value) = (|j: usize| &k[j * hd..][..hd], |j: usize| &v[j * hd..][..hd]);
            attend_impl::<D>(q, hd, ranges, key, value, 0.3, Some(2.0), out);
        }
        let mut runs: Vec<(&str, Run)> = vec![("portable", run::<Scalar16>)];
        #[cfg(target_arch = "x86_64")]
        for level in crate::simd::available() {
            match level {
                crate::simd::Level::Avx512 => runs.push(("avx512", run::<lanes16::Avx512>)),
                crate::simd::Level::Avx2 => runs.push(("avx2", run::<lanes16::Avx2>)),
                _ => {}
            }
        }
        for hd in [4, 20, 256] {
            for (b, first, window) in [(16, 0, None), (7, 5, None), (13, 40, Some(9)), (1, 3, None)]
            {
                let positions = first + b;
                let (q, k, v) = (
                    values(b * hd, 1),
                    values(positions * hd, 2),
                    values(positions * hd, 3),
                );
                let ranges: Vec<RangeInclusive<usize>> = (0..b)
                    .map(|t| {
                        window.map_or(0, |w: usize| (first + t + 1).saturating_sub(w))..=first + t
                    })
                    .collect();
                for (name, f) in &runs {
                    let mut block = vec![0f32; b * hd];
                    f(&q, hd, &ranges, &k, &v, &mut block);
                    for t in 0..b {
                        // The query alone, written out as the single-query attention it replaces.
                        let qt = &q[t * hd..][..hd];
                        let mut scores: Vec<f32> = ranges[t]
                            .clone()
                            .map(|j| Scalar16::dot([qt], &k[j * hd..][..hd])[0] * 0.3)
                            .collect();
                        softcap(&mut scores, 2.0);
                        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                        scores.iter_mut().for_each(|s| *s -= max);
                        exp_in_place(&mut scores);
                        let sum: f32 = scores.iter().sum();
                        let mut alone = vec![0f32; hd];
                        for (p, j) in scores.iter().zip(ranges[t].clone()) {
                            axpy(p / sum, &v[j * hd..][..hd], &mut alone);
                        }
                        for (x, y) in block[t * hd..][..hd].iter().zip(&alone) {
                            assert_eq!(x.to_bits(), y.to_bits(), "{name} hd={hd} b={b} t={t}");
                        }
                        // f64 softmax attention with the soft-cap.
                        let r = ranges[t].clone();
                        let scores: Vec<f64> = r
                            .clone()
                            .map(|j| {
                                let d: f64 = (0..hd)
                                    .map(|i| q[t * hd + i] as f64 * k[j * hd + i] as f64)
                                    .sum();
                                2.0 * (d * 0.3 / 2.0).tanh()
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for i in 0..hd {
                            let want: f64 = r
                                .clone()
                                .zip(&e)
                                .map(|(j, p)| p / sum * v[j * hd + i] as f64)
                                .sum();
                            let got = block[t * hd + i] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "{name} hd={hd} t={t} i={i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rms_norm_scales_by_one_plus_weight() {
        // Row [3, 4]: mean of squares 12.5, so x / √12.5; weights are stored zero-centred, scale = 1 + w.
        let mut x = array![[3.0f32, 4.0]];
        let w = [0.5f32, -1.0];
        let scale: Vec<f32> = w.iter().map(|w| 1.0 + w).collect();
        rms_norm(&mut x, &scale, 0.0);
        let r = 12.5f64.sqrt();
        assert!((x[[0, 0]] as f64 - 3.0 / r * 1.5).abs() < 1e-6);
        assert_eq!(x[[0, 1]], 0.0);
        // eps enters under the root.
        let mut x = array![[1.0f32, 1.0]];
        rms_norm(&mut x, &[1.0, 1.0], 3.0);
        assert!((x[[0, 0]] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn rope_rotates_halves_not_neighbours() {
        // head_dim 4: pairs (0, 2) and (1, 3). inv_freq = [1, θ^-1/2] = [1, 0.01] with θ = 10⁴.
        let rope = Rope::new(4, 10_000.0);
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let mut x = array![[1.0f32, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]];
        rope.apply(&mut x.view_mut(), 4, 0);
        // Position 0 is the identity.
        assert_eq!(x.row(0).to_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        // Position 1: pair (x0, x2) rotated by 1 rad, pair (x1, x3) by 0.01 rad.
        let (c0, s0) = (1f64.cos(), 1f64.sin());
        let (c1, s1) = (0.01f64.cos(), 0.01f64.sin());
        let expect = [
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ];
        for (got, want) in x.row(1).iter().zip(expect) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Two heads in a row rotate independently, the same way.
        let mut two = array![[1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]];
        rope.apply(&mut two.view_mut(), 4, 1);
        assert_eq!(two.row(0).to_vec()[..4], x.row(1).to_vec()[..]);
        assert_eq!(two.row(0).to_vec()[4..], x.row(1).to_vec()[..]);
    }

    #[test]
    fn softcap_bounds_and_is_near_identity_for_small_values() {
        let mut v = [0.0f32, 1e-3, 100.0, -100.0, 30.0];
        softcap(&mut v, 30.0);
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 1e-3).abs() < 1e-9);
        assert!(v[2] < 30.0 && v[2] > 29.9);
        assert_eq!(v[3], -v[2]);
        assert!((v[4] as f64 - 30.0 * 1f64.tanh()).abs() < 1e-5);
    }
}
