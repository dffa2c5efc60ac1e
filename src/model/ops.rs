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
    // Zeroed allocation: large ones are fresh zero pages that the product then writes once (no
    // zero-filling pass, no read before the first write).
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

/// One query head's attention: `o += Σ_j softmax_j(softcap(q·k_j · scaling)) · v_j` over the key
/// positions `keys`, with `key(j)` / `value(j)` the rows of position j. Compiled for the process's SIMD
/// level (the dot products and `axpy` vectorise to its width); the soft-cap and exp are [`super::vmath`]'s.
pub(crate) fn attend<'a>(
    qh: &[f32],
    keys: std::ops::RangeInclusive<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    o: &mut [f32],
) {
    match crate::simd::level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: simd::level() never exceeds the CPU's features.
        crate::simd::Level::Avx512 => unsafe {
            attend_avx512(qh, keys, key, value, scaling, cap, o)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::simd::Level::Avx2 => unsafe { attend_avx2(qh, keys, key, value, scaling, cap, o) },
        _ => attend_impl(qh, keys, key, value, scaling, cap, o),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn attend_avx512<'a>(
    qh: &[f32],
    keys: std::ops::RangeInclusive<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    o: &mut [f32],
) {
    attend_impl(qh, keys, key, value, scaling, cap, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<'a>(
    qh: &[f32],
    keys: std::ops::RangeInclusive<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    o: &mut [f32],
) {
    attend_impl(qh, keys, key, value, scaling, cap, o)
}

#[inline(always)]
fn attend_impl<'a>(
    qh: &[f32],
    keys: std::ops::RangeInclusive<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scaling: f32,
    cap: Option<f32>,
    o: &mut [f32],
) {
    let mut scores: Vec<f32> = keys
        .clone()
        .map(|j| dot_wide(qh, key(j)) * scaling)
        .collect();
    if let Some(cap) = cap {
        softcap(&mut scores, cap);
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    scores.iter_mut().for_each(|s| *s -= max);
    exp_in_place(&mut scores);
    let sum: f32 = scores.iter().sum();
    for (p, j) in scores.iter().zip(keys) {
        axpy(p / sum, value(j), o);
    }
}

/// [`dot`] with sixteen independent lanes (one AVX-512 register, two AVX2 ones).
#[inline(always)]
fn dot_wide(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            acc[i] += acc[i + half];
        }
    }
    s += acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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
    use ndarray::array;

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
