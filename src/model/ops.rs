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
/// Weight rows per parallel work item on the streaming path.
const STREAM_ROWS: usize = 16;
/// Weight rows per parallel work item on the tiled (prefill) path: a multiple of the 3-row tile.
#[cfg(target_arch = "x86_64")]
const TILE_BLOCK_ROWS: usize = 48;
/// Weight rows decoded into f32 per sgemm call on the portable prefill path.
const SGEMM_BLOCK_ROWS: usize = 128;

thread_local! {
    /// Per-thread f32 copy of the weight block being multiplied.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x · wᵀ` for activations `x` [n, k] and a weight `w` [m, k] in its stored type: [n, m], blocks of
/// rows of `w` in parallel. The weight is never converted as a whole:
/// - n ≤ 8 (decoding): each weight row is streamed once and decoded in registers against all n rows;
/// - n > 8 (prefill): a block of 48 weight rows is decoded into f32 in one sequential pass (cost: 1/n of
///   the product) and multiplied in register tiles of 4 activation rows × 3 weight rows (AVX2 + FMA);
///   without those instructions, blocks of 128 rows go through matrixmultiply's sgemm.
pub(crate) fn matmul(x: ArrayView2<f32>, w: &Weight) -> Array2<f32> {
    let (n, k) = x.dim();
    assert_eq!(
        w.shape().get(1),
        Some(&k),
        "matmul: inner dimensions differ"
    );
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    if n <= STREAM_MAX_ROWS {
        return matmul_streaming(xs, n, w);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return matmul_tiled(xs, n, w);
    }
    matmul_sgemm(x.view(), w)
}

/// [`matmul`] for a few rows: one pass over the weight.
fn matmul_streaming(xs: &[f32], n: usize, w: &Weight) -> Array2<f32> {
    let (m, k) = (w.shape()[0], w.shape()[1]);
    let dtype = w.dtype();
    let (bytes, row_bytes) = (w.bytes(), k * dtype.size());
    // Computed as [m, n] so that each work item writes one contiguous block, then transposed.
    let mut yt = vec![0f32; m * n];
    if n > 0 {
        yt.par_chunks_mut(n * STREAM_ROWS)
            .enumerate()
            .for_each(|(c, out)| {
                for (r, o) in out.chunks_mut(n).enumerate() {
                    let row = c * STREAM_ROWS + r;
                    dot_rows(
                        &bytes[row * row_bytes..(row + 1) * row_bytes],
                        dtype,
                        xs,
                        k,
                        o,
                    );
                }
            });
    }
    let yt = Array2::from_shape_vec((m, n), yt).expect("m·n elements");
    if n == 1 {
        yt.into_shape_with_order((1, m)).expect("one row")
    } else {
        yt.t().as_standard_layout().into_owned()
    }
}

/// [`matmul`] for many rows with the AVX2 + FMA register tiles.
#[cfg(target_arch = "x86_64")]
fn matmul_tiled(xs: &[f32], n: usize, w: &Weight) -> Array2<f32> {
    let (m, k) = (w.shape()[0], w.shape()[1]);
    let dtype = w.dtype();
    let (bytes, row_bytes) = (w.bytes(), k * dtype.size());
    let mut y = Array2::<f32>::zeros((n, m));
    y.axis_chunks_iter_mut(Axis(1), TILE_BLOCK_ROWS)
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut yb)| {
            let first = b * TILE_BLOCK_ROWS;
            let w = &bytes[first * row_bytes..(first + yb.ncols()) * row_bytes];
            SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                // SAFETY: `matmul` checked that the CPU has AVX2, FMA and F16C; `w` holds `yb.ncols()` rows
                // of `k` elements of `dtype` and `xs` holds `n` rows of `k` f32.
                unsafe {
                    match dtype {
                        FloatType::BF16 => x86::gemm_block::<x86::Bf16>(w, xs, k, &mut yb, scratch),
                        FloatType::F16 => x86::gemm_block::<x86::F16>(w, xs, k, &mut yb, scratch),
                        FloatType::F32 => x86::gemm_block::<x86::F32>(w, xs, k, &mut yb, scratch),
                    }
                }
            });
        });
    y
}

/// [`matmul`] for many rows without x86 SIMD: blocks decoded into f32, then matrixmultiply's sgemm.
fn matmul_sgemm(x: ArrayView2<f32>, w: &Weight) -> Array2<f32> {
    let (n, k) = x.dim();
    let m = w.shape()[0];
    let dtype = w.dtype();
    let (bytes, row_bytes) = (w.bytes(), k * dtype.size());
    let mut y = Array2::<f32>::zeros((n, m));
    y.axis_chunks_iter_mut(Axis(1), SGEMM_BLOCK_ROWS)
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut yb)| {
            let rows = yb.ncols();
            let first = b * SGEMM_BLOCK_ROWS;
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                if scratch.len() < rows * k {
                    scratch.resize(rows * k, 0.0);
                }
                let block = &mut scratch[..rows * k];
                dtype.decode(&bytes[first * row_bytes..(first + rows) * row_bytes], block);
                let wb = ArrayView2::from_shape((rows, k), block).expect("rows·k elements");
                general_mat_mul(1.0, &x, &wb.t(), 0.0, &mut yb);
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
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
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
    unsafe fn block<E: Elem, const T: usize, const U: usize>(
        w: *const u8,
        x: *const f32,
        k: usize,
        out: &mut [f32],
    ) {
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

    /// Columns of the decoded block multiplied per pass: a 48-row slice (48 × 512 × 4 bytes = 96 KiB)
    /// stays in L2 while every activation tile goes over it.
    const KC: usize = 512;

    /// `yb[t, r] = Σᵢ x[t·k + i] · w[r, i]` for the `yb.ncols()` weight rows in `w` (stored as `E`,
    /// row-major) and the `yb.nrows()` activation rows in `x`. The block (contiguous in the file) is
    /// decoded into `scratch` in one sequential pass, then multiplied `KC` columns at a time in tiles of
    /// 4 activation rows × 3 weight rows that accumulate in 12 registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` holds `yb.ncols()·k` elements of `E`; `x` holds `yb.nrows()·k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_block<E: Elem>(
        w: &[u8],
        x: &[f32],
        k: usize,
        yb: &mut ndarray::ArrayViewMut2<f32>,
        scratch: &mut Vec<f32>,
    ) {
        let (n, rows) = yb.dim();
        debug_assert_eq!(w.len(), rows * k * E::SIZE);
        debug_assert!(x.len() >= n * k);
        // Rows padded to a multiple of 3 with zeros, so every tile has 3 weight rows.
        let padded = rows.div_ceil(3) * 3;
        scratch.clear();
        scratch.resize(padded * k, 0.0);
        decode::<E>(w.as_ptr(), scratch.as_mut_ptr(), rows * k);
        let (x, s) = (x.as_ptr(), scratch.as_ptr());
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let mut t0 = 0;
            while t0 < n {
                let xp = x.add(t0 * k + k0);
                let mut r0 = 0;
                while r0 < rows {
                    let wp = s.add(r0 * k + k0);
                    let rr = (rows - r0).min(3);
                    match n - t0 {
                        1 => add_tile(yb, t0, r0, rr, tile::<1>(xp, wp, k, kc)),
                        2 => add_tile(yb, t0, r0, rr, tile::<2>(xp, wp, k, kc)),
                        3 => add_tile(yb, t0, r0, rr, tile::<3>(xp, wp, k, kc)),
                        _ => add_tile(yb, t0, r0, rr, tile::<4>(xp, wp, k, kc)),
                    }
                    r0 += 3;
                }
                t0 += 4;
            }
            k0 += kc;
        }
    }

    #[inline(always)]
    fn add_tile<const T: usize>(
        yb: &mut ndarray::ArrayViewMut2<f32>,
        t0: usize,
        r0: usize,
        rows: usize,
        acc: [[f32; 3]; T],
    ) {
        for (t, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().take(rows).enumerate() {
                yb[[t0 + t, r0 + r]] += v;
            }
        }
    }

    /// Dot products of `T` activation rows with 3 f32 weight rows over `kc` columns; both kinds of rows
    /// are `stride` apart.
    #[inline(always)]
    unsafe fn tile<const T: usize>(
        x: *const f32,
        w: *const f32,
        stride: usize,
        kc: usize,
    ) -> [[f32; 3]; T] {
        let mut acc = [[_mm256_setzero_ps(); 3]; T];
        let mut i = 0;
        while i + 8 <= kc {
            let wv = [
                _mm256_loadu_ps(w.add(i)),
                _mm256_loadu_ps(w.add(stride + i)),
                _mm256_loadu_ps(w.add(2 * stride + i)),
            ];
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(t * stride + i));
                for r in 0..3 {
                    a[r] = _mm256_fmadd_ps(xv, wv[r], a[r]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; 3]; T];
        for t in 0..T {
            for r in 0..3 {
                let mut v = hsum(acc[t][r]);
                for j in i..kc {
                    v += *x.add(t * stride + j) * *w.add(r * stride + j);
                }
                out[t][r] = v;
            }
        }
        out
    }

    /// `n` elements of `E` at `src` to f32 at `dst`.
    #[inline(always)]
    unsafe fn decode<E: Elem>(src: *const u8, dst: *mut f32, n: usize) {
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.add(i), E::load8(src.add(i * E::SIZE)));
            i += 8;
        }
        while i < n {
            *dst.add(i) = E::load1(src.add(i * E::SIZE));
            i += 1;
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

    #[test]
    fn gelu_tanh_matches_the_formula() {
        for x in [-5.0f64, -1.0, -0.1, 0.0, 0.5, 1.0, 3.0] {
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            let got = gelu_tanh(x as f32) as f64;
            assert!((got - want).abs() < 1e-6, "gelu({x}) = {got}, want {want}");
        }
        // Not the erf GELU: at x = 1 they differ by ~1.6e-4.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }

    fn matmul_reference(x: &Array2<f32>, w: &[f32], m: usize) -> Array2<f32> {
        let k = x.ncols();
        Array2::from_shape_fn((x.nrows(), m), |(t, r)| {
            (0..k)
                .map(|i| x[[t, i]] as f64 * w[r * k + i] as f64)
                .sum::<f64>() as f32
        })
    }

    #[test]
    fn matmul_paths_agree_with_a_plain_product_for_every_dtype() {
        // k = 37 exercises the SIMD tails; n = 1..=9 and 20 cover the streaming blocks and the sgemm path.
        let (m, k) = (150, 37);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 211) as f32 / 64.0 - 1.5)
            .collect();
        for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let weight = Weight::from_values(dtype, vec![m, k], &w).unwrap();
            let exact = weight.to_f32();
            for n in [1, 2, 3, 4, 5, 7, 9, 20] {
                let x = Array2::from_shape_fn((n, k), |(t, i)| {
                    ((t * 31 + i * 17) % 13) as f32 / 8.0 - 0.7
                });
                let want = matmul_reference(&x, &exact, m);
                // The dispatching product, and the portable sgemm path that this CPU may not take.
                for got in [matmul(x.view(), &weight), matmul_sgemm(x.view(), &weight)] {
                    let err = (&got - &want).iter().fold(0f32, |e, d| e.max(d.abs()));
                    assert!(err < 1e-4, "{dtype} n={n}: max error {err}");
                }
            }
        }
    }

    #[test]
    fn tiled_path_sums_over_several_k_slices() {
        // k = 1100 spans three 512-wide slices (the last one with an 8-lane tail); 13 rows, 50 outputs.
        let (m, k, n) = (50, 1100, 13);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let weight = Weight::from_values(FloatType::BF16, vec![m, k], &w).unwrap();
        let x = Array2::from_shape_fn((n, k), |(t, i)| ((t * 7 + i * 3) % 29) as f32 / 29.0 - 0.5);
        let want = matmul_reference(&x, &weight.to_f32(), m);
        let err = (&matmul(x.view(), &weight) - &want)
            .iter()
            .fold(0f32, |e, d| e.max(d.abs()));
        assert!(err < 1e-3, "max error {err}");
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
