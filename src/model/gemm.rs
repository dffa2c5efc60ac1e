//! `y = x · wᵀ` for f32 activations `x` [n, k] and a weight `w` [m, k] in its stored type (bf16, f16 or
//! f32), at the SIMD level chosen by [`crate::simd`]: AVX-512, AVX2 + FMA, or portable Rust.
//!
//! - n ≤ 8 (decoding): each weight row is streamed once from memory and widened in registers against all
//!   n activation rows ([`dot_rows`]). Each parallel work item is a contiguous run of rows of about
//!   [`STREAM_ITEM_BYTES`], so the hardware prefetchers see long sequential streams; software prefetch was
//!   measured slower (see docs/performance.md).
//! - n > 8 (prefill): the activations are packed once per product into tiles of `2·L` rows (L = lanes:
//!   16, 8, 8) laid out k-major, so that one vector load gives the same column of 2·L/2 rows. Each
//!   parallel work item widens a panel of `MR` weight rows (14 on AVX-512, 6 on AVX2 and portable)
//!   exactly once into f32, in groups of L columns ([k/L][MR][L]), then multiplies it with every
//!   activation tile in an `MR × 2L` register tile (28 of the 32 zmm registers on AVX-512), broadcasting
//!   one weight element per FMA. The whole k is reduced in registers, so each output element is written
//!   exactly once (no `+=` into fresh pages, no horizontal sums).
//!
//! Exact mode ([`Precision::Exact`]): f32 products of exactly widened weights, f32 sums (FMA where the CPU
//! has it). Fast mode ([`Precision::Bf16`], AVX512-BF16 only): weights and activations as bf16 pairs,
//! `vdpbf16ps` products with f32 accumulation, as llama.cpp and PyTorch's bf16 CPU path do; activations
//! are rounded to bf16 (round-to-nearest-even; below f32's smallest normal, to zero). Where the CPU lacks
//! AVX512-BF16, fast mode is exact mode.

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::format::FloatType;
use crate::simd::Level;

use super::weights::Weight;

/// How products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 products of exactly widened weights (the default; matches transformers' f32 to ~1e-6).
    #[default]
    Exact,
    /// bf16 × bf16 products with f32 sums (`vdpbf16ps`) where the CPU has AVX512-BF16, else exact.
    Bf16,
}

/// The precision new models start with (see [`set_default_precision`]).
static DEFAULT_FAST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the precision of every model built from now on in this process (the CLI's `--fast`); a model's
/// own can still be changed with `Gemma2::set_precision`.
pub fn set_default_precision(p: Precision) {
    DEFAULT_FAST.store(p == Precision::Bf16, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_default_precision`]; [`Precision::Exact`] unless it was called.
pub fn default_precision() -> Precision {
    if DEFAULT_FAST.load(std::sync::atomic::Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::Exact
    }
}

/// Up to this many activation rows, a product streams each weight row once ([`dot_rows`]).
pub(crate) const STREAM_MAX_ROWS: usize = 8;
/// Bytes of weight rows per parallel work item on the streaming path: runs this long keep both cores
/// near the machine's read bandwidth (measured: 16-row items of a 2304-wide bf16 matrix, 74 KB, read at
/// 27–33 GB/s on 2 cores; 128 rows and up at 48–50 GB/s).
pub(crate) const STREAM_ITEM_BYTES: usize = 1 << 20;

/// A raw output pointer shared by work items that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: every work item writes a disjoint set of elements (its own weight rows' columns), and the
// buffer outlives the parallel region.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `y = x · wᵀ` with `x` [n, k] (row-major slice), `w` [m, k], `y` [n, m] (row-major, every element
/// written: its previous contents do not matter).
pub fn matmul_into(
    level: Level,
    precision: Precision,
    x: &[f32],
    n: usize,
    w: &Weight,
    y: &mut [f32],
) {
    matmul_many(level, precision, x, n, &[w], &mut [y]);
}

/// `ys[i] = x · ws[i]ᵀ` for weights sharing k, in one parallel region (one packing of `x`): q/k/v, or
/// gate/up, as one product.
pub fn matmul_many(
    level: Level,
    precision: Precision,
    x: &[f32],
    n: usize,
    ws: &[&Weight],
    ys: &mut [&mut [f32]],
) {
    assert_eq!(ws.len(), ys.len());
    assert!(
        level <= crate::simd::detected(),
        "SIMD level above the CPU's"
    );
    let Some(k) = ws.first().map(|w| w.shape()[1]) else {
        return;
    };
    assert_eq!(x.len(), n * k, "matmul: activations are not [n, k]");
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(w.shape()[1], k, "matmul: inner dimensions differ");
        assert_eq!(y.len(), n * w.shape()[0], "matmul: output is not [n, m]");
    }
    if n == 0 {
        return;
    }
    if k == 0 {
        ys.iter_mut().for_each(|y| y.fill(0.0));
        return;
    }
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    if n <= STREAM_MAX_ROWS {
        streaming(level, x, n, ws, &outs);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if precision == Precision::Bf16 && level == Level::Avx512 && crate::simd::cpu_has_bf16_dot() {
        // SAFETY: the CPU has AVX-512 F/BW/VL and AVX512-BF16 (checked just above).
        unsafe { x86::avx512::gemm_bf16(x, n, ws, &outs) };
        return;
    }
    let _ = precision;
    match level {
        // The level is at most the CPU's (asserted above): the kernels' instructions are there.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => gemm::<x86::avx512::V>(x, n, ws, &outs),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => gemm::<x86::avx2::V>(x, n, ws, &outs),
        _ => gemm::<portable::V>(x, n, ws, &outs),
    }
}

/// Work items of a product over several weights: (weight index, first row), `rows` rows each.
fn work_items(ws: &[&Weight], rows: usize) -> Vec<(usize, usize)> {
    ws.iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.shape()[0]).step_by(rows).map(move |r| (i, r)))
        .collect()
}

/// One SIMD level's vector of f32 lanes and the panel kernels built on it.
pub(crate) trait Simd {
    /// f32 lanes per vector.
    const L: usize;
    /// Weight rows per panel (rows of the register tile).
    const MR: usize;
    /// Widens the panel rows `w` (`rows` rows of `k` elements of `dtype`, row-major) into
    /// `panel` = [k.div_ceil(L)][MR][L], zero-padded; then for every activation tile of `xp` (each
    /// [k.div_ceil(L)·L][2L], `tiles` of them) writes `y[t, col0 + r]` (row stride `m`) for the `n` real
    /// activation rows and `rows` real weight rows. `next` holds the rows the same thread most likely
    /// widens next (the following panel): the kernel brings them into L2 while it computes, so that
    /// widening does not wait on memory.
    ///
    /// # Safety
    /// The CPU supports the level; `y` points at an [n, m] buffer whose columns `col0..col0 + rows` only
    /// this call writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel(
        w: &[u8],
        dtype: FloatType,
        rows: usize,
        k: usize,
        xp: &[f32],
        n: usize,
        y: *mut f32,
        m: usize,
        col0: usize,
        panel: &mut Vec<f32>,
        next: &[u8],
    );
}

thread_local! {
    /// Per-thread widened weight panel.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The packed-panel product at level `S` (see the module documentation).
fn gemm<S: Simd>(x: &[f32], n: usize, ws: &[&Weight], outs: &[OutPtr]) {
    let k = ws[0].shape()[1];
    let xp = pack_x(x, n, k, S::L);
    work_items(ws, S::MR).into_par_iter().for_each(|(i, col0)| {
        let (w, out) = (ws[i], outs[i]);
        let (m, dtype) = (w.shape()[0], w.dtype());
        let row_bytes = k * dtype.size();
        let rows = S::MR.min(m - col0);
        let next = following_rows(w.bytes(), row_bytes, m, col0 + rows, S::MR);
        PANEL.with(|panel| {
            // SAFETY: the caller checked the level; this work item alone writes columns col0..col0+rows.
            unsafe {
                S::panel(
                    &w.bytes()[col0 * row_bytes..(col0 + rows) * row_bytes],
                    dtype,
                    rows,
                    k,
                    &xp,
                    n,
                    out.0,
                    m,
                    col0,
                    &mut panel.borrow_mut(),
                    next,
                )
            }
        });
    });
}

/// Rows `first..first + rows` (clipped to `m`) of a row-major weight: the next panel of a work item.
fn following_rows(bytes: &[u8], row_bytes: usize, m: usize, first: usize, rows: usize) -> &[u8] {
    let end = (first + rows).min(m);
    if first >= end {
        return &[];
    }
    &bytes[first * row_bytes..end * row_bytes]
}

/// Activations [n, k] packed into tiles of `2l` rows: tile `i` is [kp][2l] with kp = k rounded up to a
/// multiple of `l`, element (c, t) = x[i·2l + t, c], zero where t or c is past the end.
pub(crate) fn pack_x(x: &[f32], n: usize, k: usize, l: usize) -> Vec<f32> {
    let w = 2 * l;
    let kp = k.div_ceil(l) * l;
    let tiles = n.div_ceil(w);
    let mut xp = vec![0f32; tiles * kp * w];
    xp.par_chunks_mut(kp * w).enumerate().for_each(|(i, tile)| {
        let t0 = i * w;
        let tn = w.min(n - t0);
        // Blocks of 64 columns keep the source rows' lines in L1 while the tile is written.
        for c0 in (0..k).step_by(64) {
            let c1 = (c0 + 64).min(k);
            for t in 0..tn {
                let row = &x[(t0 + t) * k..(t0 + t + 1) * k];
                for c in c0..c1 {
                    tile[c * w + t] = row[c];
                }
            }
        }
    });
    xp
}

/// Rows of `y` per output `[MR][2L]` tile written from the register accumulators.
#[inline(always)]
fn store_tile(
    tile: &[f32],
    l2: usize,
    y: *mut f32,
    m: usize,
    t0: usize,
    tn: usize,
    col0: usize,
    rows: usize,
) {
    for t in 0..tn {
        for r in 0..rows {
            // SAFETY (caller): y is [n, m] and t0 + t < n, col0 + r < m.
            unsafe { *y.add((t0 + t) * m + col0 + r) = tile[r * l2 + t] };
        }
    }
}

/// The streaming path: `y[t, r] = w[r] · x[t]`, one weight row at a time.
fn streaming(level: Level, x: &[f32], n: usize, ws: &[&Weight], outs: &[OutPtr]) {
    let k = ws[0].shape()[1];
    let row_bytes = k * ws[0].dtype().size();
    let total_rows: usize = ws.iter().map(|w| w.shape()[0]).sum();
    // About STREAM_ITEM_BYTES per item, but enough items to share between the threads.
    let rows = (STREAM_ITEM_BYTES / row_bytes.max(1))
        .min(total_rows.div_ceil(4 * rayon::current_num_threads()))
        .max(1);
    work_items(ws, rows).into_par_iter().for_each(|(i, first)| {
        let (w, out) = (ws[i], outs[i]);
        let (m, dtype) = (w.shape()[0], w.dtype());
        let (bytes, row_bytes) = (w.bytes(), k * dtype.size());
        let last = (first + rows).min(m);
        // One activation row (decoding): the item's rows in side-by-side lanes, several streams.
        let first = if n == 1 {
            let row = |r: usize| &bytes[r * row_bytes..(r + 1) * row_bytes];
            // SAFETY: y is [1, m]; this work item alone writes columns first..last.
            let put = |r: usize, v: f32| unsafe { *out.0.add(r) = v };
            match level {
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => lanes::<4>(level, first, last, dtype, x, k, row, put),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => lanes::<2>(level, first, last, dtype, x, k, row, put),
                _ => first,
            }
        } else {
            first
        };
        let mut o = [0f32; STREAM_MAX_ROWS];
        for row in first..last {
            let wr = &bytes[row * row_bytes..(row + 1) * row_bytes];
            dot_rows(level, wr, dtype, x, k, &mut o[..n]);
            for (t, v) in o[..n].iter().enumerate() {
                // SAFETY: y is [n, m]; this work item alone writes column `row`.
                unsafe { *out.0.add(t * m + row) = *v };
            }
        }
    });
}

/// Rows `first..last` of a one-row product in `S` lanes of `(last - first) / S` consecutive rows each,
/// the lanes' rows read side by side (`dot_lanes`): one stream from memory per lane instead of one per
/// thread keeps more reads in flight (measured on the 2b weights, 2 threads: 4 lanes read at the
/// bandwidth of a plain sum over the same bytes, one lane at 85–87% of it). `put(r, v)` stores row r's
/// result; returns the first row left over (fewer than `S`), for the one-row path.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
fn lanes<'a, const S: usize>(
    level: Level,
    first: usize,
    last: usize,
    dtype: FloatType,
    x: &[f32],
    k: usize,
    row: impl Fn(usize) -> &'a [u8],
    put: impl Fn(usize, f32),
) -> usize {
    let h = (last - first) / S;
    let mut o = [0f32; S];
    for r in first..first + h {
        let ws: [&[u8]; S] = std::array::from_fn(|s| row(r + s * h));
        dot_lanes(level, ws, dtype, x, k, &mut o);
        for (s, v) in o.iter().enumerate() {
            put(r + s * h, *v);
        }
    }
    first + S * h
}

/// `out[s] = ws[s] · x` for `S` weight rows of `k` elements of `dtype` and one activation row, the rows
/// read side by side; each result is bit for bit [`dot_rows`] of that row alone.
#[cfg(target_arch = "x86_64")]
pub fn dot_lanes<const S: usize>(
    level: Level,
    ws: [&[u8]; S],
    dtype: FloatType,
    x: &[f32],
    k: usize,
    out: &mut [f32; S],
) {
    assert!(ws.iter().all(|w| w.len() == k * dtype.size()));
    assert!(x.len() >= k);
    let p = ws.map(|w| w.as_ptr());
    match level {
        Level::Avx512 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX-512 F/BW/VL (asserted); sizes asserted above.
            unsafe {
                match dtype {
                    FloatType::BF16 => {
                        x86::avx512::dot_lanes::<x86::Bf16, S>(p, x.as_ptr(), k, out)
                    }
                    FloatType::F16 => x86::avx512::dot_lanes::<x86::F16, S>(p, x.as_ptr(), k, out),
                    FloatType::F32 => x86::avx512::dot_lanes::<x86::F32, S>(p, x.as_ptr(), k, out),
                }
            }
        }
        Level::Avx2 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX2, FMA and F16C (asserted); sizes asserted above.
            unsafe {
                match dtype {
                    FloatType::BF16 => x86::avx2::dot_lanes::<x86::Bf16, S>(p, x.as_ptr(), k, out),
                    FloatType::F16 => x86::avx2::dot_lanes::<x86::F16, S>(p, x.as_ptr(), k, out),
                    FloatType::F32 => x86::avx2::dot_lanes::<x86::F32, S>(p, x.as_ptr(), k, out),
                }
            }
        }
        _ => {
            for (w, o) in ws.iter().zip(out.iter_mut()) {
                portable::dot_rows(w, dtype, x, k, std::slice::from_mut(o));
            }
        }
    }
}

/// `out[t] = Σᵢ w[i]·x[t·k + i]` for each of the `out.len()` activation rows of `x`: one weight row in its
/// stored type (`k` elements of `dtype`, little-endian) against several activation rows, widened once.
pub fn dot_rows(level: Level, w: &[u8], dtype: FloatType, x: &[f32], k: usize, out: &mut [f32]) {
    assert_eq!(w.len(), k * dtype.size());
    assert!(x.len() >= out.len() * k);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX-512 F/BW/VL (asserted); sizes asserted above.
            unsafe {
                match dtype {
                    FloatType::BF16 => x86::avx512::dot_rows::<x86::Bf16>(w, x, k, out),
                    FloatType::F16 => x86::avx512::dot_rows::<x86::F16>(w, x, k, out),
                    FloatType::F32 => x86::avx512::dot_rows::<x86::F32>(w, x, k, out),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            assert!(level <= crate::simd::detected());
            // SAFETY: the CPU has AVX2, FMA and F16C (asserted); sizes asserted above.
            unsafe {
                match dtype {
                    FloatType::BF16 => x86::avx2::dot_rows::<x86::Bf16>(w, x, k, out),
                    FloatType::F16 => x86::avx2::dot_rows::<x86::F16>(w, x, k, out),
                    FloatType::F32 => x86::avx2::dot_rows::<x86::F32>(w, x, k, out),
                }
            }
        }
        _ => portable::dot_rows(w, dtype, x, k, out),
    }
}

/// Plain Rust: 8 lanes in arrays (the compiler vectorizes them for the baseline target).
mod portable {
    use super::*;

    pub struct V;

    const L: usize = 8;
    const MR: usize = 6;

    impl Simd for V {
        const L: usize = L;
        const MR: usize = MR;

        unsafe fn panel(
            w: &[u8],
            dtype: FloatType,
            rows: usize,
            k: usize,
            xp: &[f32],
            n: usize,
            y: *mut f32,
            m: usize,
            col0: usize,
            panel: &mut Vec<f32>,
            _next: &[u8],
        ) {
            let groups = k.div_ceil(L);
            let kp = groups * L;
            panel.clear();
            panel.resize(groups * MR * L, 0.0);
            let size = dtype.size();
            let mut row = vec![0f32; k];
            for r in 0..rows {
                dtype.decode(&w[r * k * size..(r + 1) * k * size], &mut row);
                for (c, v) in row.iter().enumerate() {
                    panel[(c / L) * MR * L + r * L + c % L] = *v;
                }
            }
            let l2 = 2 * L;
            let mut tile = [0f32; MR * 2 * L];
            for (i, xt) in xp.chunks_exact(kp * l2).enumerate() {
                let t0 = i * l2;
                let mut acc = [[0f32; 2 * L]; MR];
                for g in 0..groups {
                    let wg = &panel[g * MR * L..(g + 1) * MR * L];
                    for j in 0..L {
                        let xv: &[f32; 2 * L] = xt[(g * L + j) * l2..][..l2].try_into().unwrap();
                        for r in 0..MR {
                            let b = wg[r * L + j];
                            for t in 0..2 * L {
                                acc[r][t] += b * xv[t];
                            }
                        }
                    }
                }
                for r in 0..MR {
                    tile[r * l2..(r + 1) * l2].copy_from_slice(&acc[r]);
                }
                store_tile(&tile, l2, y, m, t0, l2.min(n - t0), col0, rows);
            }
        }
    }

    /// [`super::dot_rows`] without intrinsics: widens 64 elements at a time into a buffer.
    pub fn dot_rows(w: &[u8], dtype: FloatType, x: &[f32], k: usize, out: &mut [f32]) {
        const CHUNK: usize = 64;
        let size = dtype.size();
        let mut buf = [0f32; CHUNK];
        out.fill(0.0);
        let mut start = 0;
        while start < k {
            let len = (k - start).min(CHUNK);
            dtype.decode(&w[start * size..(start + len) * size], &mut buf[..len]);
            for (t, o) in out.iter_mut().enumerate() {
                *o += super::super::ops::dot(&buf[..len], &x[t * k + start..t * k + start + len]);
            }
            start += len;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX-512 and AVX2 kernels. Each public function is compiled for its instruction set
    //! (`#[target_feature]`) and must only be called when the CPU has it.
    use std::arch::x86_64::*;

    use super::{store_tile, Simd};
    use crate::format::FloatType;

    /// Cache lines to prefetch into L2 while a kernel runs: a share of them at each group of columns, so
    /// the requests are spread over the computation instead of queueing at once.
    #[derive(Clone, Copy)]
    pub struct Ahead {
        p: *const u8,
        lines: usize,
        per_group: usize,
    }

    impl Ahead {
        pub fn over(bytes: &[u8], groups: usize) -> Self {
            let lines = bytes.len().div_ceil(64);
            Ahead {
                p: bytes.as_ptr(),
                lines,
                per_group: lines.div_ceil(groups.max(1)),
            }
        }

        /// Prefetches group `g`'s share.
        #[inline(always)]
        pub fn step(self, g: usize) {
            let first = g * self.per_group;
            for l in first..(first + self.per_group).min(self.lines) {
                // SAFETY: line l starts inside the slice `over` was given (l < lines); prefetching
                // never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.p.add(l * 64) as *const i8) };
            }
        }
    }

    /// A stored element type: how to read one element as f32.
    pub trait Elem {
        const SIZE: usize;
        /// # Safety
        /// `p` points at one readable element.
        unsafe fn load1(p: *const u8) -> f32;
        /// 8 elements widened to f32.
        /// # Safety
        /// `p` points at 8 readable elements; the CPU has AVX2 and F16C.
        unsafe fn load8(p: *const u8) -> __m256;
        /// 16 elements widened to f32.
        /// # Safety
        /// `p` points at 16 readable elements; the CPU has AVX-512 F.
        unsafe fn load16(p: *const u8) -> __m512;
    }

    pub struct Bf16;
    pub struct F16;
    pub struct F32;

    impl Elem for Bf16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            f32::from_bits((u16::from_le_bytes([*p, *p.add(1)]) as u32) << 16)
        }
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    impl Elem for F16 {
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
        }
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }

    impl Elem for F32 {
        const SIZE: usize = 4;
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            (p as *const f32).read_unaligned()
        }
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_loadu_ps(p as *const f32)
        }
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    macro_rules! simd_level {
        ($name:ident, $feat:literal, $L:literal, $MR:literal, $vec:ty, $zero:ident, $load:ident,
         $set1:ident, $fma:ident, $store:ident, $add:ident, $widen:ident, $hsum:path) => {
            pub mod $name {
                use super::*;

                pub struct V;

                const L: usize = $L;
                const MR: usize = $MR;

                impl Simd for V {
                    const L: usize = L;
                    const MR: usize = MR;

                    unsafe fn panel(
                        w: &[u8],
                        dtype: FloatType,
                        rows: usize,
                        k: usize,
                        xp: &[f32],
                        n: usize,
                        y: *mut f32,
                        m: usize,
                        col0: usize,
                        panel: &mut Vec<f32>,
                        next: &[u8],
                    ) {
                        match dtype {
                            FloatType::BF16 => {
                                panel_impl::<Bf16>(w, rows, k, xp, n, y, m, col0, panel, next)
                            }
                            FloatType::F16 => {
                                panel_impl::<F16>(w, rows, k, xp, n, y, m, col0, panel, next)
                            }
                            FloatType::F32 => {
                                panel_impl::<F32>(w, rows, k, xp, n, y, m, col0, panel, next)
                            }
                        }
                    }
                }

                /// See [`Simd::panel`].
                #[target_feature(enable = $feat)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn panel_impl<E: Elem>(
                    w: &[u8],
                    rows: usize,
                    k: usize,
                    xp: &[f32],
                    n: usize,
                    y: *mut f32,
                    m: usize,
                    col0: usize,
                    panel: &mut Vec<f32>,
                    next: &[u8],
                ) {
                    let groups = k.div_ceil(L);
                    let kp = groups * L;
                    panel.clear();
                    panel.resize(groups * MR * L, 0.0);
                    let (wp, pp) = (w.as_ptr(), panel.as_mut_ptr());
                    // Widen: row r's columns g·L.. go to panel[g][r][..].
                    for r in 0..rows {
                        let src = wp.add(r * k * E::SIZE);
                        let full = k / L;
                        for g in 0..full {
                            $store(
                                pp.add((g * MR + r) * L),
                                E::$widen(src.add(g * L * E::SIZE)),
                            );
                        }
                        for c in full * L..k {
                            *pp.add((full * MR + r) * L + c % L) = E::load1(src.add(c * E::SIZE));
                        }
                    }
                    let l2 = 2 * L;
                    let mut tile = [0f32; MR * 2 * L];
                    let pp = panel.as_ptr();
                    let tiles = n.div_ceil(l2);
                    for i in 0..tiles {
                        let t0 = i * l2;
                        let tn = l2.min(n - t0);
                        let xt = xp.as_ptr().add(i * kp * l2);
                        // The first tile's pass brings the next panel's rows into L2.
                        let ahead = Ahead::over(if i == 0 { next } else { &[] }, groups);
                        if tn > L {
                            kernel::<2>(pp, xt, groups, tile.as_mut_ptr(), ahead);
                        } else {
                            kernel::<1>(pp, xt, groups, tile.as_mut_ptr(), ahead);
                        }
                        store_tile(&tile, l2, y, m, t0, tn, col0, rows);
                    }
                }

                /// The MR × (NC·L) register tile over all `groups` of L columns.
                #[inline(always)]
                unsafe fn kernel<const NC: usize>(
                    pp: *const f32,
                    xt: *const f32,
                    groups: usize,
                    tile: *mut f32,
                    ahead: Ahead,
                ) {
                    let l2 = 2 * L;
                    let mut acc = [[$zero(); NC]; MR];
                    for g in 0..groups {
                        ahead.step(g);
                        let wg = pp.add(g * MR * L);
                        let xg = xt.add(g * L * l2);
                        for j in 0..L {
                            let mut xv = [$zero(); NC];
                            for c in 0..NC {
                                xv[c] = $load(xg.add(j * l2 + c * L));
                            }
                            for r in 0..MR {
                                let b = $set1(*wg.add(r * L + j));
                                for c in 0..NC {
                                    acc[r][c] = $fma(b, xv[c], acc[r][c]);
                                }
                            }
                        }
                    }
                    for r in 0..MR {
                        for c in 0..NC {
                            $store(tile.add(r * l2 + c * L), acc[r][c]);
                        }
                    }
                }

                /// See [`super::super::dot_rows`]; activation rows are taken four at a time, so each
                /// weight load feeds four FMAs.
                ///
                /// # Safety
                /// The CPU has the level's features; `w` holds `k` elements of `E`; `x` holds
                /// `out.len()` rows of `k`.
                #[target_feature(enable = $feat)]
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
                        1 => {
                            let o: &mut [f32; 1] = (&mut out[t..]).try_into().expect("one row");
                            dot_lanes::<E, 1>([w], x.add(t * k), k, o)
                        }
                        _ => {}
                    }
                }

                /// `T` activation rows against one weight row, `U` independent accumulators per row.
                #[inline(always)]
                unsafe fn block<E: Elem, const T: usize, const U: usize>(
                    w: *const u8,
                    x: *const f32,
                    k: usize,
                    out: &mut [f32],
                ) {
                    let mut acc = [[$zero(); U]; T];
                    let mut i = 0;
                    while i + L * U <= k {
                        for u in 0..U {
                            let wv = E::$widen(w.add((i + L * u) * E::SIZE));
                            for (t, a) in acc.iter_mut().enumerate() {
                                a[u] = $fma(wv, $load(x.add(t * k + i + L * u)), a[u]);
                            }
                        }
                        i += L * U;
                    }
                    while i + L <= k {
                        let wv = E::$widen(w.add(i * E::SIZE));
                        for (t, a) in acc.iter_mut().enumerate() {
                            a[0] = $fma(wv, $load(x.add(t * k + i)), a[0]);
                        }
                        i += L;
                    }
                    for (t, a) in acc.iter().enumerate() {
                        out[t] = row_sum::<E>(a, w, x.add(t * k), i, k);
                    }
                }

                /// One row's dot product from its accumulators: added in order, the lanes summed,
                /// then the elements `i..k` past the last whole vector one by one.
                #[inline(always)]
                unsafe fn row_sum<E: Elem>(
                    acc: &[$vec],
                    w: *const u8,
                    x: *const f32,
                    i: usize,
                    k: usize,
                ) -> f32 {
                    let mut v = acc[0];
                    for lane in &acc[1..] {
                        v = $add(v, *lane);
                    }
                    let mut s = $hsum(v);
                    for j in i..k {
                        s += E::load1(w.add(j * E::SIZE)) * *x.add(j);
                    }
                    s
                }

                /// `S` weight rows against one activation row, read side by side, four accumulators
                /// per row: `out[s]` is bit for bit that of row `s` alone (`S` = 1, which `dot_rows`
                /// uses for one activation row), but `S` streams from memory are in flight at once.
                ///
                /// # Safety
                /// The CPU has the level's features; each `w[s]` holds `k` elements of `E`; `x`
                /// holds `k`.
                #[target_feature(enable = $feat)]
                pub unsafe fn dot_lanes<E: Elem, const S: usize>(
                    w: [*const u8; S],
                    x: *const f32,
                    k: usize,
                    out: &mut [f32; S],
                ) {
                    const U: usize = 4;
                    let mut acc = [[$zero(); U]; S];
                    let mut i = 0;
                    while i + L * U <= k {
                        for u in 0..U {
                            let xv = $load(x.add(i + L * u));
                            for (s, a) in acc.iter_mut().enumerate() {
                                a[u] = $fma(E::$widen(w[s].add((i + L * u) * E::SIZE)), xv, a[u]);
                            }
                        }
                        i += L * U;
                    }
                    while i + L <= k {
                        let xv = $load(x.add(i));
                        for (s, a) in acc.iter_mut().enumerate() {
                            a[0] = $fma(E::$widen(w[s].add(i * E::SIZE)), xv, a[0]);
                        }
                        i += L;
                    }
                    for (s, a) in acc.iter().enumerate() {
                        out[s] = row_sum::<E>(a, w[s], x, i, k);
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn hsum512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum256(_mm256_add_ps(lo, hi))
    }

    #[inline(always)]
    unsafe fn storeu256(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }

    #[inline(always)]
    unsafe fn storeu512(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }

    simd_level!(
        avx2,
        "avx2,fma,f16c",
        8,
        6,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        storeu256,
        _mm256_add_ps,
        load8,
        hsum256
    );

    simd_level!(
        avx512_base,
        "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c",
        16,
        14,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        storeu512,
        _mm512_add_ps,
        load16,
        hsum512
    );

    pub mod avx512 {
        //! The AVX-512 level: the f32 kernels of `avx512_base`, plus the bf16 product (AVX512-BF16).
        pub use super::avx512_base::{dot_lanes, dot_rows, V};
        use super::*;
        use crate::model::weights::Weight;
        use rayon::prelude::*;

        const L: usize = 16;
        const MR: usize = 14;

        thread_local! {
            static PANEL16: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
        }

        /// Activations as bf16 pairs (round-to-nearest-even, with `vcvtne2ps2bf16`, which flushes
        /// values below f32's smallest normal to zero), packed like [`super::super::pack_x`] but with
        /// one u32 = (x[t, 2c], x[t, 2c + 1]) per element: tile i is [kp/2][32].
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VL and AVX512-BF16.
        unsafe fn pack_x_bf16(x: &[f32], n: usize, k: usize) -> Vec<u32> {
            let w = 2 * L;
            let kp = k.div_ceil(2 * L) * 2 * L;
            let tiles = n.div_ceil(w);
            let mut xp = vec![0u32; tiles * kp / 2 * w];
            xp.par_chunks_mut(kp / 2 * w)
                .enumerate()
                .for_each(|(i, tile)| {
                    let t0 = i * w;
                    // SAFETY: the caller checked the CPU.
                    unsafe { pack_tile_bf16(x, k, t0, w.min(n - t0), tile) };
                });
            xp
        }

        /// Rows `t0..t0 + tn` of `x` into one tile of [`pack_x_bf16`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn pack_tile_bf16(x: &[f32], k: usize, t0: usize, tn: usize, tile: &mut [u32]) {
            let w = 2 * L;
            let full = k / (2 * L);
            let b = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
            let mut pairs = [0u32; L];
            for t in 0..tn {
                let row = &x[(t0 + t) * k..(t0 + t + 1) * k];
                for g in 0..full {
                    let lo = _mm512_loadu_ps(row.as_ptr().add(g * 2 * L));
                    let hi = _mm512_loadu_ps(row.as_ptr().add(g * 2 * L + L));
                    // Pair j = (element 2j, element 2j + 1): cvtne2ps puts `b` in the low half.
                    let v = _mm512_cvtne2ps_pbh(hi, lo);
                    _mm512_storeu_si512(
                        pairs.as_mut_ptr() as *mut _,
                        std::mem::transmute::<__m512bh, __m512i>(v),
                    );
                    for (j, p) in pairs.iter().enumerate() {
                        tile[(g * L + j) * w + t] = *p;
                    }
                }
                for c in full * L..k / 2 {
                    tile[c * w + t] = b(row[2 * c]) | (b(row[2 * c + 1]) << 16);
                }
                if k % 2 == 1 {
                    tile[(k / 2) * w + t] = b(row[k - 1]);
                }
            }
        }

        /// [`super::super::matmul_into`] in fast mode: bf16 products with f32 sums (`vdpbf16ps`).
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VL and AVX512-BF16.
        pub unsafe fn gemm_bf16(
            x: &[f32],
            n: usize,
            ws: &[&Weight],
            outs: &[super::super::OutPtr],
        ) {
            let k = ws[0].shape()[1];
            // SAFETY: the caller checked the CPU.
            let xp = unsafe { pack_x_bf16(x, n, k) };
            super::super::work_items(ws, MR)
                .into_par_iter()
                .for_each(|(i, col0)| {
                    let (w, out) = (ws[i], outs[i]);
                    let (m, dtype) = (w.shape()[0], w.dtype());
                    let row_bytes = k * dtype.size();
                    let rows = MR.min(m - col0);
                    let next =
                        super::super::following_rows(w.bytes(), row_bytes, m, col0 + rows, MR);
                    let w = &w.bytes()[col0 * row_bytes..(col0 + rows) * row_bytes];
                    PANEL16.with(|panel| {
                        // SAFETY: the caller checked the CPU; this work item alone writes these columns.
                        unsafe {
                            panel_bf16(
                                w,
                                dtype,
                                rows,
                                k,
                                &xp,
                                n,
                                out.0,
                                m,
                                col0,
                                &mut panel.borrow_mut(),
                                next,
                            )
                        }
                    });
                });
        }

        /// Weight rows as bf16 pairs in [kp/32][MR][16] (u32 each: two consecutive columns); f16 and
        /// f32 weights are rounded to bf16 (nearest-even).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn panel_bf16(
            w: &[u8],
            dtype: FloatType,
            rows: usize,
            k: usize,
            xp: &[u32],
            n: usize,
            y: *mut f32,
            m: usize,
            col0: usize,
            panel: &mut Vec<u32>,
            next: &[u8],
        ) {
            let groups = k.div_ceil(2 * L);
            let kp = groups * 2 * L;
            panel.clear();
            panel.resize(groups * MR * L, 0);
            let size = dtype.size();
            let pp = panel.as_mut_ptr();
            for r in 0..rows {
                let src = &w[r * k * size..(r + 1) * k * size];
                let full = k / (2 * L);
                match dtype {
                    FloatType::BF16 => {
                        for g in 0..full {
                            let v = _mm512_loadu_si512(src.as_ptr().add(g * 64) as *const _);
                            _mm512_storeu_si512(pp.add((g * MR + r) * L) as *mut _, v);
                        }
                    }
                    _ => {
                        for g in 0..full {
                            let mut f = [0f32; 32];
                            dtype.decode(&src[g * 32 * size..(g + 1) * 32 * size], &mut f);
                            let lo = _mm512_loadu_ps(f.as_ptr());
                            let hi = _mm512_loadu_ps(f.as_ptr().add(16));
                            // Element 2j from lo/hi order: cvtne2ps puts `b` in the low half.
                            let v = _mm512_cvtne2ps_pbh(hi, lo);
                            _mm512_storeu_si512(
                                pp.add((g * MR + r) * L) as *mut _,
                                std::mem::transmute::<__m512bh, __m512i>(v),
                            );
                        }
                    }
                }
                let mut f = [0f32; 1];
                for c in full * 2 * L..k {
                    dtype.decode(&src[c * size..(c + 1) * size], &mut f);
                    let b = half::bf16::from_f32(f[0]).to_bits() as u32;
                    let slot = pp.add((full * MR + r) * L + (c % (2 * L)) / 2);
                    *slot |= b << (16 * (c % 2));
                }
            }
            let l2 = 2 * L;
            let mut tile = [0f32; MR * 2 * L];
            let pp = panel.as_ptr();
            for i in 0..n.div_ceil(l2) {
                let t0 = i * l2;
                let tn = l2.min(n - t0);
                let xt = xp.as_ptr().add(i * kp / 2 * l2);
                let ahead = Ahead::over(if i == 0 { next } else { &[] }, groups);
                if tn > L {
                    kernel_bf16::<2>(pp, xt, groups, tile.as_mut_ptr(), ahead);
                } else {
                    kernel_bf16::<1>(pp, xt, groups, tile.as_mut_ptr(), ahead);
                }
                store_tile(&tile, l2, y, m, t0, tn, col0, rows);
            }
        }

        #[inline(always)]
        unsafe fn kernel_bf16<const NC: usize>(
            pp: *const u32,
            xt: *const u32,
            groups: usize,
            tile: *mut f32,
            ahead: Ahead,
        ) {
            let l2 = 2 * L;
            let mut acc = [[_mm512_setzero_ps(); NC]; MR];
            for g in 0..groups {
                ahead.step(g);
                let wg = pp.add(g * MR * L);
                let xg = xt.add(g * L * l2);
                for j in 0..L {
                    let mut xv = [_mm512_setzero_si512(); NC];
                    for c in 0..NC {
                        xv[c] = _mm512_loadu_si512(xg.add(j * l2 + c * L) as *const _);
                    }
                    for r in 0..MR {
                        let b = _mm512_set1_epi32(*wg.add(r * L + j) as i32);
                        for c in 0..NC {
                            acc[r][c] = _mm512_dpbf16_ps(
                                acc[r][c],
                                std::mem::transmute::<__m512i, __m512bh>(b),
                                std::mem::transmute::<__m512i, __m512bh>(xv[c]),
                            );
                        }
                    }
                }
            }
            for r in 0..MR {
                for c in 0..NC {
                    _mm512_storeu_ps(tile.add(r * l2 + c * L), acc[r][c]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_values as values;

    /// x · wᵀ in f64 from the exactly widened weights.
    fn reference(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * m];
        for t in 0..n {
            for r in 0..m {
                y[t * m + r] = (0..k)
                    .map(|i| x[t * k + i] as f64 * w[r * k + i] as f64)
                    .sum();
            }
        }
        y
    }

    /// Every level, every dtype, shapes that exercise the tails (k not a multiple of 16 or 32, rows not
    /// a multiple of 14 or 6, tokens not a multiple of 32 or 16, one-vector tiles): the error against
    /// the f64 product of the same widened weights is bounded by k·2⁻²³·Σ|x·w| (f32 sums).
    #[test]
    fn every_level_and_dtype_matches_an_f64_product() {
        for &(n, m, k) in &[
            (9, 15, 37),
            (17, 29, 64),
            (33, 14, 130),
            (50, 31, 517),
            (5, 20, 33),
        ] {
            let x = values(n * k, 1);
            let wv = values(m * k, 2);
            for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
                let w = Weight::from_values(dtype, vec![m, k], &wv).unwrap();
                let exact = w.to_f32();
                let want = reference(&x, n, &exact, m, k);
                let abs: Vec<f64> = {
                    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                    let wa: Vec<f32> = exact.iter().map(|v| v.abs()).collect();
                    reference(&xa, n, &wa, m, k)
                };
                for level in crate::simd::available() {
                    let mut y = vec![f32::NAN; n * m];
                    matmul_into(level, Precision::Exact, &x, n, &w, &mut y);
                    for i in 0..n * m {
                        let bound = abs[i] * k as f64 * 2f64.powi(-23) + 1e-30;
                        let err = (y[i] as f64 - want[i]).abs();
                        assert!(
                            err <= bound,
                            "{level} {dtype} n={n} m={m} k={k} at {i}: {} vs {} (bound {bound})",
                            y[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dot_rows_at_every_level_matches_an_f64_dot() {
        let k = 1000 + 7;
        let wv = values(k, 3);
        let x = values(5 * k, 4);
        for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let mut bytes = Vec::new();
            dtype.encode(&wv, &mut bytes);
            let mut exact = vec![0f32; k];
            dtype.decode(&bytes, &mut exact);
            for level in crate::simd::available() {
                for rows in 1..=5 {
                    let mut out = vec![f32::NAN; rows];
                    dot_rows(level, &bytes, dtype, &x, k, &mut out);
                    for (t, o) in out.iter().enumerate() {
                        let want: f64 = (0..k).map(|i| exact[i] as f64 * x[t * k + i] as f64).sum();
                        let abs: f64 = (0..k)
                            .map(|i| (exact[i] as f64 * x[t * k + i] as f64).abs())
                            .sum();
                        assert!(
                            (*o as f64 - want).abs() <= abs * k as f64 * 2f64.powi(-24),
                            "{level} {dtype} rows={rows} t={t}: {o} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Rows read side by side give each row's `dot_rows` bit for bit, for every level and dtype and for
    /// lengths that end in each kind of tail (a whole 4-vector step, single vectors, scalars).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dot_lanes_is_dot_rows_bit_for_bit() {
        fn check<const S: usize>(level: Level, dtype: FloatType, k: usize) {
            let rows: Vec<Vec<u8>> = (0..S)
                .map(|s| {
                    let mut b = Vec::new();
                    dtype.encode(&values(k, 10 + s), &mut b);
                    b
                })
                .collect();
            let x = values(k, 7);
            let mut out = [f32::NAN; S];
            dot_lanes(
                level,
                std::array::from_fn(|s| &rows[s][..]),
                dtype,
                &x,
                k,
                &mut out,
            );
            for (s, o) in out.iter().enumerate() {
                let mut want = [f32::NAN];
                dot_rows(level, &rows[s], dtype, &x, k, &mut want);
                assert_eq!(
                    o.to_bits(),
                    want[0].to_bits(),
                    "{level} {dtype} k={k} lane {s}"
                );
            }
        }
        for level in crate::simd::available() {
            for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
                for k in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 2304 + 21] {
                    check::<1>(level, dtype, k);
                    check::<2>(level, dtype, k);
                    check::<4>(level, dtype, k);
                }
            }
        }
    }

    /// A one-row product (decoding: lanes of rows read side by side) equals the rows' `dot_rows`, with
    /// row counts that leave every number of rows over from the lanes and items.
    #[test]
    fn one_row_products_equal_dot_rows() {
        let k = 200;
        let x = values(k, 9);
        for m in [1, 3, 4, 5, 37, 1000 + 3] {
            let wv = values(m * k, 11);
            let w = Weight::from_values(FloatType::BF16, vec![m, k], &wv).unwrap();
            for level in crate::simd::available() {
                let mut y = vec![f32::NAN; m];
                matmul_into(level, Precision::Exact, &x, 1, &w, &mut y);
                for (r, v) in y.iter().enumerate() {
                    let mut want = [f32::NAN];
                    dot_rows(
                        level,
                        &w.bytes()[r * 2 * k..(r + 1) * 2 * k],
                        FloatType::BF16,
                        &x,
                        k,
                        &mut want,
                    );
                    assert_eq!(v.to_bits(), want[0].to_bits(), "{level} m={m} row {r}");
                }
            }
        }
    }

    /// Fast mode: the product of the bf16-rounded activations and weights, summed in f32.
    #[test]
    fn fast_mode_is_the_product_of_bf16_rounded_operands() {
        let (n, m, k) = (40, 30, 97);
        let x = values(n * k, 5);
        let wv = values(m * k, 6);
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        for dtype in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let w = Weight::from_values(dtype, vec![m, k], &wv).unwrap();
            let want = reference(&round(&x), n, &round(&w.to_f32()), m, k);
            let mut y = vec![f32::NAN; n * m];
            matmul_into(crate::simd::level(), Precision::Bf16, &x, n, &w, &mut y);
            if crate::simd::has_bf16_dot() {
                for i in 0..n * m {
                    assert!(
                        (y[i] as f64 - want[i]).abs() < 1e-4,
                        "{dtype} at {i}: {} vs {}",
                        y[i],
                        want[i]
                    );
                }
            } else {
                // Without AVX512-BF16, fast mode is exact mode.
                let mut e = vec![0f32; n * m];
                matmul_into(crate::simd::level(), Precision::Exact, &x, n, &w, &mut e);
                assert_eq!(y, e);
            }
        }
    }
}
