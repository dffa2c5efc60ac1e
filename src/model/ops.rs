//! Numerical building blocks of the forward pass: matrix products from stored-type weights, RMSNorm,
//! RoPE, soft-capping, tanh-GELU. Each follows the f32 arithmetic of the transformers reference.

use std::cell::RefCell;

use ndarray::{linalg::general_mat_mul, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::format::FloatType;

use super::weights::Weight;

/// Up to this many activation rows, a product streams each weight row once and decodes its elements in
/// registers against all rows at a time: decoding is then bound by memory bandwidth, not arithmetic.
const STREAM_MAX_ROWS: usize = 8;
/// Weight rows decoded into f32 per sgemm call on the prefill path (cost of decoding: 1/n of the product).
const BLOCK_ROWS: usize = 128;
/// Weight rows per parallel work item on the streaming path.
const STREAM_ROWS: usize = 16;

thread_local! {
    /// Per-thread f32 copy of the weight block being multiplied.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x · wᵀ` for activations `x` [n, k] and a weight `w` [m, k] in its stored type: [n, m], rows of
/// `w` in parallel. The weight is never converted as a whole.
pub(crate) fn matmul(x: ArrayView2<f32>, w: &Weight) -> Array2<f32> {
    let (n, k) = x.dim();
    let m = w.shape()[0];
    assert_eq!(w.shape().get(1), Some(&k), "matmul: inner dimensions differ");
    let x = x.as_standard_layout();
    let dtype = w.dtype();
    let bytes = w.bytes();
    let row_bytes = k * dtype.size();
    if n == 0 {
        return Array2::zeros((0, m));
    }
    if n <= STREAM_MAX_ROWS {
        let xs = x.as_slice().expect("standard layout");
        // Computed as [m, n] so that each work item writes one contiguous block, then transposed.
        let mut yt = vec![0f32; m * n];
        yt.par_chunks_mut(n * STREAM_ROWS).enumerate().for_each(|(c, out)| {
            for (r, o) in out.chunks_mut(n).enumerate() {
                let row = c * STREAM_ROWS + r;
                dot_rows(&bytes[row * row_bytes..(row + 1) * row_bytes], dtype, xs, k, o);
            }
        });
        let yt = Array2::from_shape_vec((m, n), yt).expect("m·n elements");
        return if n == 1 { yt.into_shape_with_order((1, m)).expect("one row") } else { yt.t().as_standard_layout().into_owned() };
    }
    let mut y = Array2::<f32>::zeros((n, m));
    y.axis_chunks_iter_mut(Axis(1), BLOCK_ROWS).into_par_iter().enumerate().for_each(|(b, mut yb)| {
        let rows = yb.ncols();
        let first = b * BLOCK_ROWS;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < rows * k {
                scratch.resize(rows * k, 0.0);
            }
            let block = &mut scratch[..rows * k];
            dtype.decode(&bytes[first * row_bytes..(first + rows) * row_bytes], block);
            let wb = ArrayView2::from_shape((rows, k), block).expect("rows·k elements");
            general_mat_mul(1.0, &x.view(), &wb.t(), 0.0, &mut yb);
        });
    });
    y
}

/// `out[t] = Σᵢ w[i]·x[t·k + i]` for each of the `out.len()` activation rows of `x`: one weight row in its
/// stored type (`k` elements of `dtype`, little-endian) against several activation rows, decoded once.
fn dot_rows(w: &[u8], dtype: FloatType, x: &[f32], k: usize, out: &mut [f32]) {
    debug_assert_eq!(w.len(), k * dtype.size());
    debug_assert!(x.len() >= out.len() * k);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time just above); `w` holds `k` elements of
        // `dtype` and `x` holds `out.len()` rows of `k` f32 (asserted by the callers, debug-checked here).
        unsafe {
            match dtype {
                FloatType::BF16 => x86::dot_rows::<x86::Bf16>(w, x, k, out),
                FloatType::F16 => x86::dot_rows::<x86::F16>(w, x, k, out),
                FloatType::F32 => x86::dot_rows::<x86::F32>(w, x, k, out),
            }
        }
        return;
    }
    dot_rows_portable(w, dtype, x, k, out)
}

/// [`dot_rows`] without SIMD intrinsics: decodes 64 elements at a time into a buffer.
fn dot_rows_portable(w: &[u8], dtype: FloatType, x: &[f32], k: usize, out: &mut [f32]) {
    const CHUNK: usize = 64;
    let size = dtype.size();
    let mut buf = [0f32; CHUNK];
    out.fill(0.0);
    let mut start = 0;
    while start < k {
        let len = (k - start).min(CHUNK);
        dtype.decode(&w[start * size..(start + len) * size], &mut buf[..len]);
        for (t, o) in out.iter_mut().enumerate() {
            *o += dot(&buf[..len], &x[t * k + start..t * k + start + len]);
        }
        start += len;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 + FMA (+ F16C for f16 weights) kernels, chosen at run time.
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// A stored element type: how to widen 8 elements to f32 lanes.
    pub trait Elem {
        const SIZE: usize;
        /// # Safety
        /// `p` points at 8 readable elements; the CPU has AVX2 and F16C.
        unsafe fn load8(p: *const u8) -> __m256;
        /// # Safety
        /// `p` points at one readable element.
        unsafe fn load1(p: *const u8) -> f32;
    }

    pub struct Bf16;
    pub struct F16;
    pub struct F32;

    impl Elem for Bf16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            f32::from_bits((u16::from_le_bytes([*p, *p.add(1)]) as u32) << 16)
        }
    }

    impl Elem for F16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
        }
    }

    impl Elem for F32 {
        const SIZE: usize = 4;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_loadu_ps(p as *const f32)
        }
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            (p as *const f32).read_unaligned()
        }
    }

    /// See [`super::dot_rows`]; activation rows are taken four at a time, so each weight load feeds
    /// four FMAs.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` holds `k` elements of `E`; `x` holds `out.len()` rows of `k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<E: Elem>(w: &[u8], x: &[f32], k: usize, out: &mut [f32]) {
        let (w, x) = (w.as_ptr(), x.as_ptr());
        let mut t = 0;
        while out.len() - t >= 4 {
            block::<E, 4, 2>(w, x.add(t * k), k, &mut out[t..t + 4]);
            t += 4;
        }
        match out.len() - t {
            3 => block::<E, 3, 2>(w, x.add(t * k), k, &mut out[t..]),
            2 => block::<E, 2, 4>(w, x.add(t * k), k, &mut out[t..]),
            1 => block::<E, 1, 4>(w, x.add(t * k), k, &mut out[t..]),
            _ => {}
        }
    }

    /// `T` activation rows against one weight row, with `U` independent accumulators per row.
    #[inline(always)]
    unsafe fn block<E: Elem, const T: usize, const U: usize>(w: *const u8, x: *const f32, k: usize, out: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); U]; T];
        let mut i = 0;
        while i + 8 * U <= k {
            for u in 0..U {
                let wv = E::load8(w.add((i + 8 * u) * E::SIZE));
                for (t, a) in acc.iter_mut().enumerate() {
                    a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(t * k + i + 8 * u)), a[u]);
                }
            }
            i += 8 * U;
        }
        while i + 8 <= k {
            let wv = E::load8(w.add(i * E::SIZE));
            for (t, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(t * k + i)), a[0]);
            }
            i += 8;
        }
        for (t, a) in acc.iter().enumerate() {
            let mut v = a[0];
            for lane in &a[1..] {
                v = _mm256_add_ps(v, *lane);
            }
            let mut s = hsum(v);
            for j in i..k {
                s += E::load1(w.add(j * E::SIZE)) * *x.add(t * k + j);
            }
            out[t] = s;
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
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
#[inline]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Gemma's RMSNorm of each row: `x / sqrt(mean(x²) + eps) · (1 + w)`, with `scale` holding `1 + w`
/// (norm weights are stored zero-centred). The mean of squares is accumulated in f64.
pub(crate) fn rms_norm(x: &mut Array2<f32>, scale: &[f32], eps: f64) {
    x.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut row| {
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

/// `cap · tanh(v / cap)` in place (Gemma 2's attention and final logit soft-caps).
#[inline]
pub(crate) fn softcap(values: &mut [f32], cap: f32) {
    for v in values {
        *v = (*v / cap).tanh() * cap;
    }
}

/// The tanh approximation of GELU (`gelu_pytorch_tanh`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6; // √(2/π), as PyTorch's kBeta rounded to f32
    const KAPPA: f32 = 0.044715;
    let inner = SQRT_2_OVER_PI * (x + KAPPA * (x * x * x));
    0.5 * x * (1.0 + inner.tanh())
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
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        Self { inv_freq }
    }

    /// Rotates every head of every row of `x` ([n, heads · head_dim]); row t sits at position `first + t`.
    pub(crate) fn apply(&self, x: &mut ArrayViewMut2<f32>, head_dim: usize, first: usize) {
        let half = head_dim / 2;
        x.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(t, mut row)| {
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
        let expect = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
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

    #[test]
    fn gelu_tanh_matches_the_formula() {
        for x in [-5.0f64, -1.0, -0.1, 0.0, 0.5, 1.0, 3.0] {
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            let got = gelu_tanh(x as f32) as f64;
            assert!((got - want).abs() < 1e-6, "gelu({x}) = {got}, want {want}");
        }
        // Not the erf GELU: at x = 1 they differ by ~1.6e-4.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }

    fn matmul_reference(x: &Array2<f32>, w: &[f32], m: usize) -> Array2<f32> {
        let k = x.ncols();
        Array2::from_shape_fn((x.nrows(), m), |(t, r)| {
            (0..k).map(|i| x[[t, i]] as f64 * w[r * k + i] as f64).sum::<f64>() as f32
        })
    }

    #[test]
    fn matmul_paths_agree_with_a_plain_product_for_every_dtype() {
        // k = 37 exercises the SIMD tails; n = 1..=9 and 20 cover the streaming blocks and the sgemm path.
        let (m, k) = (150, 37);
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 211) as f32 / 64.0 - 1.5).collect();
        for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let weight = Weight::from_values(dtype, vec![m, k], &w).unwrap();
            let exact = weight.to_f32();
            for n in [1, 2, 3, 4, 5, 7, 9, 20] {
                let x = Array2::from_shape_fn((n, k), |(t, i)| ((t * 31 + i * 17) % 13) as f32 / 8.0 - 0.7);
                let got = matmul(x.view(), &weight);
                let want = matmul_reference(&x, &exact, m);
                let err = (&got - &want).iter().fold(0f32, |e, d| e.max(d.abs()));
                assert!(err < 1e-4, "{dtype} n={n}: max error {err}");
            }
        }
    }

    #[test]
    fn portable_kernel_agrees_with_the_dispatching_one() {
        let k = 70;
        let w: Vec<f32> = (0..k).map(|i| i as f32 / 16.0 - 2.0).collect();
        let x: Vec<f32> = (0..3 * k).map(|i| (i % 11) as f32 / 4.0 - 1.0).collect();
        for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let mut bytes = Vec::new();
            dtype.encode(&w, &mut bytes);
            let (mut a, mut b) = ([0f32; 3], [0f32; 3]);
            dot_rows(&bytes, dtype, &x, k, &mut a);
            dot_rows_portable(&bytes, dtype, &x, k, &mut b);
            for (a, b) in a.iter().zip(b) {
                assert!((a - b).abs() < 1e-4, "{dtype}: {a} vs {b}");
            }
        }
    }
}
