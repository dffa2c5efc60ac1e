//! Exact rank selection over a stream of keys that is too large to hold: the element of a given rank in
//! the order (key, flat index), found by a few passes of radix histograms over the data, then a sort of
//! the few candidates left (or, when one key repeats many times, a count of its occurrences per chunk).
//! Pure bookkeeping, no I/O: the caller runs the passes and feeds each chunk's keys to [`RankSelect`].
//!
//! Digits are 16 bits wide, so two histograms resolve the sign, the exponent and 20 bits of mantissa of
//! an f64 magnitude: all of it for a difference of two nearby bf16, f16 or f32 weights. Each chunk's
//! histogram is sparse (the buckets it touched), and a pass keeps them (up to [`RETAIN_CAP`] entries),
//! so when a pass narrows the search to a single key it already knows how many occurrences each chunk
//! holds: the answer is then located in one chunk, without another pass over the data.
//!
//! A selection may start instead with a window of keys guessed from a sample
//! ([`window_from_sample`]): its first pass only counts the keys below the window and, per chunk, how
//! often each key inside it occurs. When the rank falls inside (nearly always), that one pass finds the
//! key and the chunk holding the wanted occurrence; otherwise the histogram passes follow.

use std::cell::RefCell;

/// Bits resolved per histogram pass.
const DIGIT: u32 = 16;
const BUCKETS: usize = 1 << DIGIT;
/// Candidates sorted in memory at most (16 bytes each).
pub const COLLECT_CAP: u64 = 1 << 20;
/// Per-chunk histogram entries a pass keeps at most (12 bytes each).
pub const RETAIN_CAP: usize = 1 << 20;
/// Window entries (a key's count in one chunk, 16 bytes each) the window passes of one tensor keep at
/// most, all its selections together (128 MiB): each selection gets its share.
pub const WINDOW_CAP: usize = 1 << 23;

/// The key of |x| for an ascending (`desc = false`) or descending order of magnitude: equal magnitudes
/// get equal keys, and the order of keys is the order wanted.
pub fn magnitude_key(x: f64, desc: bool) -> u64 {
    let k = x.abs().to_bits();
    if desc {
        !k
    } else {
        k
    }
}

/// [`magnitude_key`] of `x` rounded to float32, `flip` all ones for a descending order (else 0): the form
/// the vectorised kernels compute.
#[inline(always)]
pub fn f32_magnitude_key(x: f64, flip: u64) -> u64 {
    (x as f32 as f64).abs().to_bits() ^ flip
}

crate::simd::leveled! {
    /// [`magnitude_key`] of each value rounded to `compute` (as torch has a float32 result in that
    /// type), into `keys` (resized to `values.len()`).
    pub fn magnitude_keys(
        values: &[f64],
        compute: crate::format::FloatType,
        desc: bool,
        keys: &mut Vec<u64>
    ) {
        keys.resize(values.len(), 0);
        let flip = if desc { u64::MAX } else { 0 };
        if compute == crate::format::FloatType::F32 {
            for (k, &x) in keys.iter_mut().zip(values) {
                *k = f32_magnitude_key(x, flip);
            }
        } else {
            for (k, &x) in keys.iter_mut().zip(values) {
                *k = magnitude_key(compute.round_f64(x) as f64, desc);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Phase {
    /// Count the keys below `lo`, and each key in `lo..=hi` per chunk.
    Window {
        lo: u64,
        hi: u64,
    },
    Histogram,
    Collect,
    /// The key is known; find in which chunk its `rank`-th occurrence lies.
    CountChunks,
    /// ... and where inside that chunk.
    Locate {
        chunk: usize,
    },
    Done((u64, u64)),
}

/// One touched bucket of a chunk's histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bin {
    bucket: u32,
    count: u32,
    min: u64,
    max: u64,
}

/// What one chunk contributes to a pass.
#[derive(Debug, Clone)]
pub enum Partial {
    /// The buckets the chunk touched, in bucket order.
    Histogram(Vec<Bin>),
    Collect(Vec<(u64, u64)>),
    /// The keys below the window, and each key inside it with its count, in key order.
    Window {
        below: u64,
        runs: Vec<(u64, u32)>,
    },
    Count(u64),
    Found(Option<u64>),
    Nothing,
}

thread_local! {
    /// A dense histogram per thread, all (0, MAX, 0) between calls: only the touched buckets are reset.
    static SCRATCH: RefCell<Vec<(u32, u64, u64)>> = const { RefCell::new(Vec::new()) };
    /// Four partial counts per bucket for the first digit, all zero between calls.
    static COUNTS: RefCell<Vec<[u32; 4]>> = const { RefCell::new(Vec::new()) };
}

/// Finds the element of ascending rank `rank` (0-based) in the order (key, index).
#[derive(Debug, Clone)]
pub struct RankSelect {
    rank: u64,
    prefix: u64,
    bits: u32,
    phase: Phase,
    /// The rank asked for (the histogram passes restart from it when a window misses).
    asked: u64,
    /// Whether histogram passes ran (or will: no window, or one that missed).
    histogram: bool,
    /// Window entries the window pass keeps at most.
    window_cap: usize,
}

impl RankSelect {
    pub fn new(rank: u64) -> Self {
        Self {
            rank,
            prefix: 0,
            bits: 0,
            phase: Phase::Histogram,
            asked: rank,
            histogram: true,
            window_cap: 0,
        }
    }

    /// Starts with a window pass over the keys `lo..=hi` that keeps at most `cap` entries (see the
    /// module's documentation); with `lo > hi`, the histogram passes at once.
    pub fn windowed(rank: u64, lo: u64, hi: u64, cap: usize) -> Self {
        if lo > hi {
            return Self::new(rank);
        }
        Self {
            phase: Phase::Window { lo, hi },
            histogram: false,
            window_cap: cap,
            ..Self::new(rank)
        }
    }

    /// Whether the selection runs (or ran) histogram passes: it had no window, or its window missed.
    pub fn uses_histograms(&self) -> bool {
        self.histogram
    }

    /// The window `(lo, hi)` while the next pass is a window pass: chunks then feed a [`WindowPart`].
    pub fn window(&self) -> Option<(u64, u64)> {
        match self.phase {
            Phase::Window { lo, hi } => Some((lo, hi)),
            _ => None,
        }
    }

    /// `(key, index)` of the element once found.
    pub fn result(&self) -> Option<(u64, u64)> {
        match self.phase {
            Phase::Done(r) => Some(r),
            _ => None,
        }
    }

    /// Whether chunk number `chunk` takes part in the next pass.
    pub fn wants_chunk(&self, chunk: usize) -> bool {
        match self.phase {
            Phase::Locate { chunk: c } => c == chunk,
            Phase::Done(_) => false,
            _ => true,
        }
    }

    fn matches(&self, key: u64) -> bool {
        self.bits == 0
            || (self.bits < 64 && key >> (64 - self.bits) == self.prefix)
            || (self.bits == 64 && key == self.prefix)
    }

    /// One chunk's contribution: `keys[j]` is the key of element `first + j`.
    pub fn visit(&self, first: u64, keys: &[u64]) -> Partial {
        match self.phase {
            Phase::Window { lo, hi } => {
                let mut part = WindowPart::new(lo, hi);
                part.add(keys);
                part.finish()
            }
            Phase::Histogram => {
                let width = DIGIT.min(64 - self.bits);
                let shift = 64 - self.bits - width;
                let mask = (1u64 << width) - 1;
                SCRATCH.with(|s| {
                    let mut dense = s.borrow_mut();
                    if dense.is_empty() {
                        dense.resize(BUCKETS, (0, u64::MAX, 0));
                    }
                    let bucket = |k: u64| ((k >> shift) & mask) as usize;
                    let mut touched: Vec<u32> = Vec::new();
                    if self.bits == 0 {
                        // Every key, counted only: the first digit's bucket nearly never holds a single
                        // key, so its range is not tracked (reported as 0..=MAX, which only means "more
                        // than one key": the next pass then resolves it).
                        // Four counts per bucket, key j in count j mod 4: runs of keys in one bucket
                        // (most of them) then update different words instead of waiting on each other.
                        COUNTS.with(|c| {
                            let mut ways = c.borrow_mut();
                            if ways.is_empty() {
                                ways.resize(BUCKETS, [0; 4]);
                            }
                            let (quads, rest) = keys.as_chunks::<4>();
                            for q in quads {
                                for (way, &k) in q.iter().enumerate() {
                                    ways[bucket(k)][way] += 1;
                                }
                            }
                            for (way, &k) in rest.iter().enumerate() {
                                ways[bucket(k)][way] += 1;
                            }
                            // The touched buckets, found from the keys again (cheap: no stores).
                            for &k in keys {
                                let b = bucket(k);
                                let w = &mut ways[b];
                                if w != &[0; 4] {
                                    dense[b] = (w.iter().sum(), 0, u64::MAX);
                                    *w = [0; 4];
                                    touched.push(b as u32);
                                }
                            }
                        });
                    } else {
                        // The keys under the prefix, gathered without a branch per key (which of them
                        // match is as good as random), then counted with their range.
                        let mut under = vec![0u64; keys.len()];
                        let mut n = 0;
                        for &k in keys {
                            under[n] = k;
                            n += self.matches(k) as usize;
                        }
                        for &k in &under[..n] {
                            let b = bucket(k);
                            let e = &mut dense[b];
                            if e.0 == 0 {
                                touched.push(b as u32);
                            }
                            e.0 += 1;
                            e.1 = e.1.min(k);
                            e.2 = e.2.max(k);
                        }
                    }
                    touched.sort_unstable();
                    Partial::Histogram(
                        touched
                            .into_iter()
                            .map(|b| {
                                let (count, min, max) =
                                    std::mem::replace(&mut dense[b as usize], (0, u64::MAX, 0));
                                Bin {
                                    bucket: b,
                                    count,
                                    min,
                                    max,
                                }
                            })
                            .collect(),
                    )
                })
            }
            Phase::Collect => Partial::Collect(
                keys.iter()
                    .enumerate()
                    .filter(|(_, &k)| self.matches(k))
                    .map(|(j, &k)| (k, first + j as u64))
                    .collect(),
            ),
            Phase::CountChunks => {
                Partial::Count(keys.iter().filter(|&&k| k == self.prefix).count() as u64)
            }
            Phase::Locate { .. } => {
                let mut seen = 0;
                for (j, &k) in keys.iter().enumerate() {
                    if k == self.prefix {
                        if seen == self.rank {
                            return Partial::Found(Some(first + j as u64));
                        }
                        seen += 1;
                    }
                }
                Partial::Found(None)
            }
            Phase::Done(_) => Partial::Nothing,
        }
    }

    /// Adds chunk `chunk`'s partial to a pass's running total (chunks in order).
    pub fn absorb(&self, acc: &mut Pass, chunk: usize, p: Partial) {
        match p {
            Partial::Histogram(bins) => {
                let (c0, lo0, hi0) = acc.histogram.get_or_insert_with(|| {
                    (vec![0; BUCKETS], vec![u64::MAX; BUCKETS], vec![0; BUCKETS])
                });
                for bin in &bins {
                    let b = bin.bucket as usize;
                    c0[b] += bin.count as u64;
                    lo0[b] = lo0[b].min(bin.min);
                    hi0[b] = hi0[b].max(bin.max);
                }
                if let Some(kept) = &mut acc.retained {
                    if kept.len() + bins.len() > RETAIN_CAP {
                        acc.retained = None;
                    } else {
                        kept.extend(bins.iter().map(|b| (chunk as u32, b.bucket, b.count)));
                    }
                }
            }
            Partial::Collect(v) => acc.collected.extend(v),
            Partial::Window { below, runs } => {
                acc.below += below;
                if let Some(kept) = &mut acc.window {
                    if kept.len() + runs.len() > self.window_cap {
                        acc.window = None;
                    } else {
                        kept.extend(runs.into_iter().map(|(k, n)| (chunk as u32, k, n)));
                    }
                }
            }
            Partial::Count(n) => acc.counts.push((chunk, n)),
            Partial::Found(f) => acc.found = acc.found.or(f),
            Partial::Nothing => {}
        }
    }

    /// Ends a pass, given its total. Returns true once the element is found.
    pub fn advance(&mut self, acc: Pass) -> bool {
        match self.phase.clone() {
            Phase::Window { .. } => {
                self.phase = match acc.window {
                    Some(kept) if self.rank >= acc.below => self
                        .key_in_window(kept, self.rank - acc.below)
                        .unwrap_or_else(|| self.restart()),
                    // Over the cap, or the rank lies below the window.
                    _ => self.restart(),
                };
            }
            Phase::Histogram => {
                let (counts, min, max) = acc.histogram.expect("a histogram pass saw chunks");
                let width = DIGIT.min(64 - self.bits);
                let mut below = 0u64;
                let mut chosen = BUCKETS - 1;
                for (b, &c) in counts.iter().enumerate() {
                    if below + c > self.rank {
                        chosen = b;
                        break;
                    }
                    below += c;
                }
                self.rank -= below;
                self.prefix = if self.bits == 0 {
                    chosen as u64
                } else {
                    (self.prefix << width) | chosen as u64
                };
                self.bits += width;
                if min[chosen] == max[chosen] {
                    // One key left: it is the answer's key; its rank among equals is by index.
                    self.prefix = min[chosen];
                    self.bits = 64;
                }
                self.phase = if self.bits == 64 {
                    match acc.retained {
                        // The pass kept every chunk's count of that key (the bucket holds only it).
                        Some(kept) => self.chunk_of_rank(
                            kept.into_iter()
                                .filter(|&(_, b, _)| b as usize == chosen)
                                .map(|(c, _, n)| (c as usize, n as u64)),
                        ),
                        None => Phase::CountChunks,
                    }
                } else if counts[chosen] <= COLLECT_CAP {
                    Phase::Collect
                } else {
                    Phase::Histogram
                };
            }
            Phase::Collect => {
                let mut all = acc.collected;
                all.sort_unstable();
                self.phase = Phase::Done(all[self.rank as usize]);
            }
            Phase::CountChunks => self.phase = self.chunk_of_rank(acc.counts.into_iter()),
            Phase::Locate { .. } => {
                let idx = acc.found.expect("the located chunk holds the element");
                self.phase = Phase::Done((self.prefix, idx));
            }
            Phase::Done(_) => {}
        }
        matches!(self.phase, Phase::Done(_))
    }

    /// After a window pass: the key holding ascending rank `want` among the window's keys (`kept`: chunk,
    /// key, count, in chunk order), and the chunk holding that occurrence; `None` past the window.
    fn key_in_window(&mut self, mut kept: Vec<(u32, u64, u32)>, want: u64) -> Option<Phase> {
        // Stable: each key's entries stay in chunk order.
        kept.sort_by_key(|&(_, k, _)| k);
        let mut before = 0u64;
        for group in kept.chunk_by(|a, b| a.1 == b.1) {
            let total: u64 = group.iter().map(|&(_, _, n)| n as u64).sum();
            if before + total > want {
                self.prefix = group[0].1;
                self.bits = 64;
                self.rank = want - before;
                return Some(
                    self.chunk_of_rank(group.iter().map(|&(c, _, n)| (c as usize, n as u64))),
                );
            }
            before += total;
        }
        None
    }

    /// The histogram passes from the start, for the rank asked.
    fn restart(&mut self) -> Phase {
        self.rank = self.asked;
        self.prefix = 0;
        self.bits = 0;
        self.histogram = true;
        Phase::Histogram
    }

    /// The chunk holding occurrence `rank` of the key, given each chunk's count in chunk order; `rank`
    /// becomes the occurrence's rank within that chunk.
    fn chunk_of_rank(&mut self, counts: impl Iterator<Item = (usize, u64)>) -> Phase {
        let mut before = 0u64;
        for (c, n) in counts {
            if before + n > self.rank {
                self.rank -= before;
                return Phase::Locate { chunk: c };
            }
            before += n;
        }
        unreachable!("the rank lies within the data");
    }
}

/// The running total of one pass: bounded by the histogram size, the per-chunk entries kept (at most
/// [`RETAIN_CAP`]), the collected candidates (at most [`COLLECT_CAP`]) and one count per chunk.
#[derive(Debug)]
pub struct Pass {
    histogram: Option<(Vec<u64>, Vec<u64>, Vec<u64>)>,
    /// Window passes: the keys below the window, and (chunk, key, count) of the keys inside, in chunk
    /// order; `None` once over the selection's share of [`WINDOW_CAP`].
    below: u64,
    window: Option<Vec<(u32, u64, u32)>>,
    /// (chunk, bucket, count) of every chunk's histogram, in chunk order; `None` once over the cap.
    retained: Option<Vec<(u32, u32, u32)>>,
    collected: Vec<(u64, u64)>,
    counts: Vec<(usize, u64)>,
    found: Option<u64>,
}

/// One chunk's keys in a window pass, fed sub-block by sub-block.
#[derive(Debug)]
pub struct WindowPart {
    lo: u64,
    hi: u64,
    below: u64,
    /// The keys inside, in order (a window of one key only counts them, in `single`).
    inside: Vec<u64>,
    single: u64,
}

impl WindowPart {
    pub fn new(lo: u64, hi: u64) -> Self {
        Self {
            lo,
            hi,
            below: 0,
            inside: Vec::new(),
            single: 0,
        }
    }

    /// Counts the keys below the window, and those inside it (kept, unless the window is one key).
    pub fn add(&mut self, keys: &[u64]) {
        if self.lo == self.hi {
            let (below, equal) = count_around(keys, self.lo);
            self.below += below;
            self.single += equal;
        } else {
            self.below += window_scan(keys, self.lo, self.hi, &mut self.inside);
        }
    }

    /// The chunk's [`Partial::Window`].
    pub fn finish(mut self) -> Partial {
        let runs = if self.lo == self.hi {
            (self.single > 0)
                .then_some((self.lo, self.single as u32))
                .into_iter()
                .collect()
        } else {
            self.inside.sort_unstable();
            self.inside
                .chunk_by(|a, b| a == b)
                .map(|run| (run[0], run.len() as u32))
                .collect()
        };
        Partial::Window {
            below: self.below,
            runs,
        }
    }
}

/// How many of `keys` are below `key`, and how many equal it.
pub fn count_around(keys: &[u64], key: u64) -> (u64, u64) {
    count_around_at(crate::simd::level(), keys, key)
}

/// [`count_around`] at an explicit SIMD level (at most [`crate::simd::detected`]): on AVX-512 with
/// intrinsics, elsewhere the loop compiled for the level. Every level gives the same counts.
pub(crate) fn count_around_at(level: crate::simd::Level, keys: &[u64], key: u64) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if level == crate::simd::Level::Avx512 {
        assert!(level <= crate::simd::detected());
        // SAFETY: the CPU has AVX-512 (asserted).
        return unsafe { x86::count_around(keys, key) };
    }
    count_around_loop::at(level, keys, key)
}

crate::simd::leveled! {
    /// [`count_around`], key by key.
    fn count_around_loop(keys: &[u64], key: u64) -> (u64, u64) {
        let mut below = 0u64;
        let mut equal = 0u64;
        for &k in keys {
            below += (k < key) as u64;
            equal += (k == key) as u64;
        }
        (below, equal)
    }
}

/// How many of `keys` are below `lo`; appends those in `lo..=hi` to `inside`, in order.
pub fn window_scan(keys: &[u64], lo: u64, hi: u64, inside: &mut Vec<u64>) -> u64 {
    window_scan_at(crate::simd::level(), keys, lo, hi, inside)
}

/// [`window_scan`] at an explicit SIMD level (at most [`crate::simd::detected`]): on AVX-512 with
/// intrinsics (the compiled loop reduced its count per block of 16 and gathered the keys inside one at a
/// time: 11% of a TIES merge), elsewhere the loop compiled for the level. Every level gives the same
/// count and keys.
pub(crate) fn window_scan_at(
    level: crate::simd::Level,
    keys: &[u64],
    lo: u64,
    hi: u64,
    inside: &mut Vec<u64>,
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if level == crate::simd::Level::Avx512 {
        assert!(level <= crate::simd::detected());
        // SAFETY: the CPU has AVX-512 (asserted).
        return unsafe { x86::window_scan(keys, lo, hi, inside) };
    }
    window_scan_blocks::at(level, keys, lo, hi, inside)
}

crate::simd::leveled! {
    /// [`window_scan`] in blocks of 16 keys.
    fn window_scan_blocks(keys: &[u64], lo: u64, hi: u64, inside: &mut Vec<u64>) -> u64 {
        let width = hi.wrapping_sub(lo);
        let is_inside = |k: u64| k.wrapping_sub(lo) <= width;
        let mut below = 0u64;
        for block in keys.chunks(16) {
            let mut any = false;
            for &k in block {
                below += (k < lo) as u64;
                any |= is_inside(k);
            }
            // Most blocks hold no key inside; the others are gathered without a branch per key.
            if any {
                let start = inside.len();
                inside.resize(start + block.len(), 0);
                let mut n = start;
                for &k in block {
                    inside[n] = k;
                    n += is_inside(k) as usize;
                }
                inside.truncate(n);
            }
        }
        below
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::count_around`], 8 keys at a time, each lane counting its own.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn count_around(keys: &[u64], key: u64) -> (u64, u64) {
        let (body, tail) = keys.as_chunks::<8>();
        let (kv, one) = (_mm512_set1_epi64(key as i64), _mm512_set1_epi64(1));
        let (mut below, mut equal) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        for block in body {
            let k = _mm512_loadu_si512(block.as_ptr().cast());
            below = _mm512_mask_add_epi64(below, _mm512_cmplt_epu64_mask(k, kv), below, one);
            equal = _mm512_mask_add_epi64(equal, _mm512_cmpeq_epu64_mask(k, kv), equal, one);
        }
        let mut below = _mm512_reduce_add_epi64(below) as u64;
        let mut equal = _mm512_reduce_add_epi64(equal) as u64;
        for &k in tail {
            below += (k < key) as u64;
            equal += (k == key) as u64;
        }
        (below, equal)
    }

    /// [`super::window_scan`], 8 keys at a time: each lane counts its keys below `lo`; each step stores
    /// its keys inside, compressed in order, at the free end of `inside` (8 slots, of which as many as
    /// there are keys inside are kept).
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn window_scan(keys: &[u64], lo: u64, hi: u64, inside: &mut Vec<u64>) -> u64 {
        let width = hi.wrapping_sub(lo);
        let (body, tail) = keys.as_chunks::<8>();
        let (vlo, vw) = (
            _mm512_set1_epi64(lo as i64),
            _mm512_set1_epi64(width as i64),
        );
        let one = _mm512_set1_epi64(1);
        let mut below = _mm512_setzero_si512();
        // Room for every key and 8 more: each step stores 8 slots, whether keys are inside or not (a
        // window of bf16 magnitudes can hold runs of equal keys, and a branch on them mispredicted).
        inside.reserve(keys.len() + 8);
        let mut len = inside.len();
        let at = inside.as_mut_ptr();
        for block in body {
            let k = _mm512_loadu_si512(block.as_ptr().cast());
            below = _mm512_mask_add_epi64(below, _mm512_cmplt_epu64_mask(k, vlo), below, one);
            let m = _mm512_cmple_epu64_mask(_mm512_sub_epi64(k, vlo), vw);
            // The first popcount(m) of the 8 slots are the keys inside, in order.
            _mm512_storeu_si512(at.add(len).cast(), _mm512_maskz_compress_epi64(m, k));
            len += m.count_ones() as usize;
        }
        inside.set_len(len);
        let mut below = _mm512_reduce_add_epi64(below) as u64;
        for &k in tail {
            below += (k < lo) as u64;
            if k.wrapping_sub(lo) <= width {
                inside.push(k);
            }
        }
        below
    }
}

/// The window of keys that a sample of them suggests for ascending rank `rank` among `n` keys read in
/// `chunks` chunks: the sample's keys at its quantiles `rank / n ± δ`, δ four standard errors of the
/// sample quantile and at least 0.1% (a window reaching the sample's end is open on that side). The
/// sample is `sample.len() / block` blocks of `block` neighbouring keys; the standard error is the larger
/// of the independent keys' and the blocks' (the spread of each block's share of keys below the
/// quantile): neighbouring weights are alike (a row that training left unchanged), so a sample of blocks
/// knows less than as many independent keys would. `None` when the sample is under 1 024 keys, or when
/// the window pass would likely keep more than half of its `cap` entries (many distinct keys: the
/// histogram passes are then cheaper).
pub fn window_from_sample(
    sample: &[u64],
    block: usize,
    rank: u64,
    n: u64,
    chunks: u64,
    cap: usize,
) -> Option<(u64, u64)> {
    let s = sample.len();
    if s < 1024 || n == 0 {
        return None;
    }
    let q = (rank as f64 + 0.5) / n as f64;
    let mut sorted = sample.to_vec();
    sorted.sort_unstable();
    let at_q = sorted[((q * s as f64) as usize).min(s - 1)];
    // The blocks keep the sample's order.
    let shares: Vec<f64> = sample
        .chunks(block.max(1))
        .map(|b| b.iter().filter(|&&k| k < at_q).count() as f64 / b.len() as f64)
        .collect();
    let blocks = shares.len() as f64;
    let mean = shares.iter().sum::<f64>() / blocks;
    let spread =
        shares.iter().map(|f| (f - mean) * (f - mean)).sum::<f64>() / (blocks - 1.0).max(1.0);
    let se = (q * (1.0 - q) / s as f64).max(spread / blocks).sqrt();
    let delta = (4.0 * se).max(1e-3);
    let i_lo = ((q - delta) * s as f64).floor();
    let i_hi = ((q + delta) * s as f64).ceil();
    let (lo, a) = if i_lo <= 0.0 {
        (0, 0)
    } else {
        (sorted[i_lo as usize], i_lo as usize)
    };
    let (hi, b) = if i_hi >= (s - 1) as f64 {
        (u64::MAX, s - 1)
    } else {
        (sorted[i_hi as usize], i_hi as usize)
    };
    // Entries kept: one per distinct key inside and chunk. A chunk holds about `m` keys inside; drawn
    // from the sample's keys inside, they would hold Σ_k 1 − (1 − p_k)^m distinct keys (p_k: key k's
    // share), a quarter more for keys the sample missed.
    let inside = &sorted[a..=b];
    let mass = inside.len() as f64 / s as f64 * n as f64;
    let m = mass / chunks.max(1) as f64;
    let per_chunk: f64 = inside
        .chunk_by(|x, y| x == y)
        .map(|run| 1.0 - (1.0 - run.len() as f64 / inside.len() as f64).powf(m))
        .sum();
    let entries = (1.25 * per_chunk * chunks as f64).min(mass);
    (entries < (cap / 2) as f64).then_some((lo, hi))
}

/// Tensors of at most this many elements are sparsified by magnitude with an in-memory sort that
/// reproduces torch's ([`torch_sort_order`]; 8 bytes per element while it runs, one task vector at a
/// time), so that the elements kept among equal magnitudes at the threshold are mergekit's; larger ones
/// (a big model's embeddings) by the streaming [`RankSelect`], which breaks such ties by flat index.
/// 2^20 elements (8 MiB while sorted): every tensor of small models (the reference cases) follows torch,
/// while a full-size model's matrices stream, so a merge's peak memory stays what the streaming executor
/// needs (2^25 measured 304 MiB and 20% more time on a 2b-shaped TIES merge; 2^28 would hold 2 GiB).
pub const TORCH_ORDER_CAP: u64 = 1 << 20;

/// The order torch's CPU `sort` (and `argsort`) gives `keys` with `stable=False`: libstdc++'s
/// `std::sort` (introsort: median-of-three quicksort, heapsort past 2·⌊log₂ n⌋ levels, insertion sort of
/// runs of 16) over (key, index) pairs, compared by key only as torch's `KeyValueCompDesc`/`Asc` do.
/// Equal keys thus come out in the order this algorithm leaves them, which is what mergekit keeps at a
/// top-k threshold. Returns the indices in sorted order.
///
/// Checked against torch 2.15 on random inputs with many ties (tools/make_methods_refs.py's fixtures
/// exercise it end to end).
pub fn torch_sort_order(keys: &[f32], descending: bool) -> Vec<u32> {
    assert!(
        keys.len() <= u32::MAX as usize,
        "torch_sort_order: too many keys"
    );
    let mut a: Vec<(f32, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    torch_sort_pairs(&mut a, descending);
    a.into_iter().map(|(_, i)| i).collect()
}

/// [`torch_sort_order`] in place, on (key, index) pairs whose indices are 0, 1, 2, … in order.
pub fn torch_sort_pairs(a: &mut [(f32, u32)], descending: bool) {
    if descending {
        introsort(a, &torch_desc);
    } else {
        introsort(a, &torch_asc);
    }
}

/// torch's `KeyValueCompDesc`: by key only, NaN first.
fn torch_desc(x: &(f32, u32), y: &(f32, u32)) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

/// torch's `KeyValueCompAsc`: by key only, NaN last.
fn torch_asc(x: &(f32, u32), y: &(f32, u32)) -> bool {
    (!x.0.is_nan() && y.0.is_nan()) || x.0 < y.0
}

/// Which elements [`torch_sort_pairs`] would leave at positions `range`, without sorting the rest:
/// afterwards `a[range]` holds exactly those elements (in some order). Introsort never moves an element
/// across a partition's cut, and its final insertion sort is stable within the runs the partitions leave,
/// so only the partitions that split `range`'s ends need to be made; this is quickselect's cost (linear),
/// not a sort's.
pub fn torch_sort_select(a: &mut [(f32, u32)], descending: bool, range: std::ops::Range<usize>) {
    let n = a.len();
    if n < 2 || range.is_empty() {
        return;
    }
    let depth = 2 * n.ilog2() as usize;
    if descending {
        select_loop(a, 0, n, depth, &range, &torch_desc);
    } else {
        select_loop(a, 0, n, depth, &range, &torch_asc);
    }
}

/// [`introsort_loop`], descending only into the parts that one of `range`'s ends falls strictly inside.
fn select_loop<T: Copy>(
    a: &mut [T],
    first: usize,
    mut last: usize,
    mut depth: usize,
    range: &std::ops::Range<usize>,
    less: &impl Fn(&T, &T) -> bool,
) {
    let splits = |f: usize, l: usize| {
        (f < range.start && range.start < l) || (f < range.end && range.end < l)
    };
    while splits(first, last) {
        if last - first <= 16 {
            // The final insertion sort, within this run.
            insertion_sort(a, first, last, less);
            return;
        }
        if depth == 0 {
            heap_sort(&mut a[first..last], less);
            return;
        }
        depth -= 1;
        let cut = partition_at_median(a, first, last, less);
        select_loop(a, cut, last, depth, range, less);
        last = cut;
    }
}

/// libstdc++'s `std::sort`, step for step (`__introsort_loop` then `__final_insertion_sort`).
fn introsort<T: Copy>(a: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    const THRESHOLD: usize = 16;
    let n = a.len();
    if n < 2 {
        return;
    }
    introsort_loop(a, 0, n, 2 * n.ilog2() as usize, less);
    if n > THRESHOLD {
        insertion_sort(a, 0, THRESHOLD, less);
        for i in THRESHOLD..n {
            unguarded_linear_insert(a, i, less);
        }
    } else {
        insertion_sort(a, 0, n, less);
    }
}

fn introsort_loop<T: Copy>(
    a: &mut [T],
    first: usize,
    mut last: usize,
    mut depth: usize,
    less: &impl Fn(&T, &T) -> bool,
) {
    while last - first > 16 {
        if depth == 0 {
            heap_sort(&mut a[first..last], less);
            return;
        }
        depth -= 1;
        let cut = partition_at_median(a, first, last, less);
        introsort_loop(a, cut, last, depth, less);
        last = cut;
    }
}

/// One step of `__introsort_loop`: the median of three moved to `first`, then the unguarded partition
/// of `first + 1..last` around it; returns the cut.
fn partition_at_median<T: Copy>(
    a: &mut [T],
    first: usize,
    last: usize,
    less: &impl Fn(&T, &T) -> bool,
) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(a, first, first + 1, mid, last - 1, less);
    unguarded_partition(a, first + 1, last, first, less)
}

fn move_median_to_first<T: Copy>(
    a: &mut [T],
    result: usize,
    x: usize,
    y: usize,
    z: usize,
    less: &impl Fn(&T, &T) -> bool,
) {
    let m = if less(&a[x], &a[y]) {
        if less(&a[y], &a[z]) {
            y
        } else if less(&a[x], &a[z]) {
            z
        } else {
            x
        }
    } else if less(&a[x], &a[z]) {
        x
    } else if less(&a[y], &a[z]) {
        z
    } else {
        y
    };
    a.swap(result, m);
}

fn unguarded_partition<T: Copy>(
    a: &mut [T],
    mut first: usize,
    mut last: usize,
    pivot: usize,
    less: &impl Fn(&T, &T) -> bool,
) -> usize {
    loop {
        while less(&a[first], &a[pivot]) {
            first += 1;
        }
        last -= 1;
        while less(&a[pivot], &a[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        a.swap(first, last);
        first += 1;
    }
}

fn insertion_sort<T: Copy>(a: &mut [T], first: usize, last: usize, less: &impl Fn(&T, &T) -> bool) {
    for i in first + 1..last {
        if less(&a[i], &a[first]) {
            let v = a[i];
            a.copy_within(first..i, first + 1);
            a[first] = v;
        } else {
            unguarded_linear_insert(a, i, less);
        }
    }
}

impl Default for Pass {
    fn default() -> Self {
        Self {
            histogram: None,
            below: 0,
            window: Some(Vec::new()),
            retained: Some(Vec::new()),
            collected: Vec::new(),
            counts: Vec::new(),
            found: None,
        }
    }
}

fn unguarded_linear_insert<T: Copy>(a: &mut [T], mut last: usize, less: &impl Fn(&T, &T) -> bool) {
    let v = a[last];
    while less(&v, &a[last - 1]) {
        a[last] = a[last - 1];
        last -= 1;
    }
    a[last] = v;
}

/// `std::__make_heap` then `std::__sort_heap` (the introsort's fallback).
fn heap_sort<T: Copy>(a: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    let len = a.len();
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            let v = a[parent];
            adjust_heap(a, parent, len, v, less);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    let mut last = len;
    while last > 1 {
        last -= 1;
        let v = a[last];
        a[last] = a[0];
        adjust_heap(a, 0, last, v, less);
    }
}

fn adjust_heap<T: Copy>(
    a: &mut [T],
    mut hole: usize,
    len: usize,
    v: T,
    less: &impl Fn(&T, &T) -> bool,
) {
    let top = hole;
    let mut second = hole;
    while second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if less(&a[second], &a[second - 1]) {
            second -= 1;
        }
        a[hole] = a[second];
        hole = second;
    }
    if len & 1 == 0 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        a[hole] = a[second - 1];
        hole = second - 1;
    }
    // std::__push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&a[parent], &v) {
            break;
        }
        a[hole] = a[parent];
        hole = parent;
    }
    a[hole] = v;
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of one (seed, tensor, model): a counter-based generator, so element j's draw is
/// `mix64(stream ^ mix64(j))` whatever the order of evaluation.
pub fn stream_key(seed: u64, tensor: &str, model: usize) -> u64 {
    // FNV-1a of the name, then mixed with the seed and the model index.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(mix64(seed) ^ mix64(h) ^ mix64(0xD1B5_4A32_D192_ED03 ^ model as u64))
}

/// Whether element `index` of a stream is kept with probability `threshold / 2^64`.
#[inline(always)]
pub fn bernoulli_keep(stream: u64, index: u64, threshold: u64) -> bool {
    mix64(stream ^ mix64(index)) < threshold
}

/// The threshold of probability `p` ∈ (0, 1).
pub fn probability_threshold(p: f64) -> u64 {
    (p * 18446744073709551616.0).min(u64::MAX as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` keys drawn from `distinct` values (spaced 2^20 apart), from the generator state `x`.
    fn random_keys(x: &mut u64, n: usize, distinct: u64) -> Vec<u64> {
        (0..n)
            .map(|_| {
                *x = mix64(*x);
                (*x % distinct) << 20
            })
            .collect()
    }

    /// Every (key, index) pair, in the order a selection ranks them.
    fn sorted_pairs(keys: &[u64]) -> Vec<(u64, u64)> {
        let mut sorted: Vec<(u64, u64)> = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| (k, i as u64))
            .collect();
        sorted.sort();
        sorted
    }

    #[test]
    fn magnitude_keys_are_the_key_of_each_rounded_value_at_every_level() {
        use crate::format::FloatType;
        let values: Vec<f64> = (0..1000)
            .map(|i| ((i as f64 * 0.7548776662).fract() - 0.5) * 10f64.powi(i % 9 - 6))
            .chain([0.0, -0.0, 1e-300, -1e-40, 65519.0, 1.0 + 1e-12])
            .collect();
        for compute in [FloatType::F32, FloatType::BF16, FloatType::F16] {
            for desc in [false, true] {
                let want: Vec<u64> = values
                    .iter()
                    .map(|&x| magnitude_key(compute.round_f64(x) as f64, desc))
                    .collect();
                for level in crate::simd::available() {
                    let mut got = vec![7; 3];
                    magnitude_keys::at(level, &values, compute, desc, &mut got);
                    assert_eq!(got, want, "{level} {compute:?} desc={desc}");
                }
            }
        }
    }

    fn run(keys: &[u64], rank: u64, chunk: usize) -> (u64, u64) {
        run_from(RankSelect::new(rank), keys, chunk)
    }

    fn run_from(mut s: RankSelect, keys: &[u64], chunk: usize) -> (u64, u64) {
        loop {
            let mut pass = Pass::default();
            for (c, k) in keys.chunks(chunk).enumerate() {
                if s.wants_chunk(c) {
                    s.absorb(&mut pass, c, s.visit((c * chunk) as u64, k));
                }
            }
            if s.advance(pass) {
                return s.result().unwrap();
            }
        }
    }

    #[test]
    fn selection_equals_a_full_sort_with_ties_by_index() {
        let mut x = 12345u64;
        for &(n, distinct) in &[(1000usize, 7u64), (5000, 1 << 40), (300, 1), (4097, 3000)] {
            let keys = random_keys(&mut x, n, distinct);
            let sorted = sorted_pairs(&keys);
            for rank in [0, n as u64 / 3, n as u64 / 2, n as u64 - 1] {
                assert_eq!(
                    run(&keys, rank, 97),
                    sorted[rank as usize],
                    "n={n} rank={rank}"
                );
            }
        }
    }

    /// A window pass finds the element when the rank falls inside the window (then without histogram
    /// passes), and otherwise the histogram passes do: the same element as a full sort either way, for
    /// windows of one key, of a few, open-ended, empty, below and above the rank.
    #[test]
    fn windowed_selection_equals_a_full_sort_inside_and_outside_the_window() {
        let mut x = 777u64;
        for &(n, distinct) in &[(5000usize, 9u64), (6000, 1 << 40), (4097, 300)] {
            let keys = random_keys(&mut x, n, distinct);
            let sorted = sorted_pairs(&keys);
            for rank in [0, n as u64 / 3, n as u64 / 2, n as u64 - 1] {
                let want = sorted[rank as usize];
                let at = |r: usize| sorted[r.min(n - 1)].0;
                let windows = [
                    (want.0, want.0, true),
                    (
                        at((rank as usize).saturating_sub(40)),
                        at(rank as usize + 40),
                        true,
                    ),
                    (0, u64::MAX, true),
                    (0, want.0, true),
                    (want.0, u64::MAX, true),
                    (want.0 + 1, u64::MAX, false),
                    (0, want.0.wrapping_sub(1), want.0 == 0),
                    (want.0 + 1, want.0, false),
                ];
                for (lo, hi, inside) in windows {
                    let inside = inside && lo <= hi;
                    let mut s = RankSelect::windowed(rank, lo, hi, 1 << 20);
                    assert_eq!(
                        run_from(s.clone(), &keys, 97),
                        want,
                        "n={n} rank={rank} window {lo}..={hi}"
                    );
                    // Whether the window pass alone found it.
                    let mut pass = Pass::default();
                    for (c, k) in keys.chunks(97).enumerate() {
                        s.absorb(&mut pass, c, s.visit((c * 97) as u64, k));
                    }
                    s.advance(pass);
                    assert_eq!(
                        !s.uses_histograms(),
                        inside,
                        "n={n} rank={rank} {lo}..={hi}"
                    );
                }
            }
        }
    }

    #[test]
    fn window_scans_count_below_and_gather_inside_at_every_level() {
        let mut x = 5u64;
        let keys: Vec<u64> = (0..1003)
            .map(|i| {
                x = mix64(x);
                // Runs of one repeated key, as a bf16 task vector's magnitudes have.
                if i % 7 < 3 {
                    500
                } else {
                    x % 1000
                }
            })
            .collect();
        for (lo, hi) in [
            (500, 500),
            (400, 600),
            (0, 10),
            (990, u64::MAX),
            (0, u64::MAX),
        ] {
            let below = keys.iter().filter(|&&k| k < lo).count() as u64;
            let inside: Vec<u64> = keys
                .iter()
                .copied()
                .filter(|k| (lo..=hi).contains(k))
                .collect();
            for level in crate::simd::available() {
                let mut got = vec![42];
                assert_eq!(window_scan_at(level, &keys, lo, hi, &mut got), below);
                assert_eq!(got[0], 42, "appends");
                assert_eq!(got[1..], inside[..], "{level} {lo}..={hi}");
                let equal = keys.iter().filter(|&&k| k == lo).count() as u64;
                assert_eq!(count_around_at(level, &keys, lo), (below, equal), "{level}");
            }
        }
    }

    /// A sample's window holds the rank's key (for a sample drawn like the data), and none is proposed
    /// from a small sample, nor when the window pass would keep too many entries.
    #[test]
    fn sampled_windows_hold_the_rank_and_respect_the_cap() {
        let mut x = 99u64;
        let mut draw = |distinct: u64| {
            x = mix64(x);
            x % distinct
        };
        for distinct in [5u64, 200, 1 << 50] {
            let n = 200_000u64;
            let keys: Vec<u64> = (0..n).map(|_| draw(distinct)).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            for rank in [n / 10, n / 2, n - n / 7] {
                let sample: Vec<u64> = (0..20_000).map(|_| draw(distinct)).collect();
                let (lo, hi) =
                    window_from_sample(&sample, 1, rank, n, n.div_ceil(1 << 16), 1 << 20)
                        .expect("a window");
                let key = sorted[rank as usize];
                assert!(lo <= key && key <= hi, "{distinct}: {key} in {lo}..={hi}");
            }
            let small: Vec<u64> = (0..1000).map(|_| draw(distinct)).collect();
            assert_eq!(window_from_sample(&small, 1, n / 2, n, 4, 1 << 20), None);
        }
        // All distinct keys in a huge tensor: a window of ±0.1% would keep millions of entries.
        let sample: Vec<u64> = (0..20_000).map(|_| draw(1 << 50)).collect();
        assert_eq!(
            window_from_sample(&sample, 1, 1 << 31, 1 << 32, 1 << 16, 1 << 20),
            None
        );
        // Few distinct keys: one entry per key and chunk, however large the tensor.
        let sample: Vec<u64> = (0..20_000).map(|_| draw(3)).collect();
        assert!(window_from_sample(&sample, 1, 1 << 31, 1 << 32, 1 << 16, 1 << 20).is_some());
    }

    /// Blocks of alike keys (rows a fine-tune left unchanged, |δ| = 0, beside changed ones): a sample of
    /// 64 blocks knows the share of unchanged rows to ±6%, not to the ±0.2% its 131 072 keys would as
    /// independent draws. The window then allows for the blocks' spread, and holds the rank's key.
    #[test]
    fn sampled_windows_allow_for_blocks_of_alike_keys() {
        const BLOCK: usize = 2048;
        fn blocks(x: &mut u64, count: usize, distinct: u64) -> Vec<u64> {
            let mut keys = Vec::with_capacity(count * BLOCK);
            for _ in 0..count {
                *x = mix64(*x);
                let unchanged = *x % 2 == 0;
                for _ in 0..BLOCK {
                    *x = mix64(*x);
                    keys.push(if unchanged { 0 } else { 1 + *x % distinct });
                }
            }
            keys
        }
        let mut x = 4242u64;
        for distinct in [50u64, 1 << 50] {
            for round in 0..12 {
                let data = blocks(&mut x, 512, distinct);
                let sample = blocks(&mut x, 64, distinct);
                let n = data.len() as u64;
                let rank = n * 3 / 4;
                let mut sorted = data;
                let key = *sorted.select_nth_unstable(rank as usize).1;
                let (lo, hi) =
                    window_from_sample(&sample, BLOCK, rank, n, n.div_ceil(1 << 16), 1 << 22)
                        .expect("a window within the cap");
                assert!(
                    lo <= key && key <= hi,
                    "{distinct} distinct, round {round}: {key} in {lo}..={hi}"
                );
            }
        }
    }

    /// Expected orders printed by torch 2.15 (`torch.sort(x, descending=d).indices`, CPU).
    #[test]
    fn torch_sort_order_reproduces_torchs_unstable_sort() {
        let x: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32).collect();
        let desc = [
            74, 85, 52, 41, 30, 8, 96, 63, 19, 49, 38, 82, 27, 60, 93, 16, 5, 71, 68, 46, 2, 13,
            24, 79, 90, 35, 57, 65, 43, 98, 54, 87, 32, 10, 76, 21, 84, 7, 29, 18, 62, 40, 73, 95,
            51, 37, 70, 59, 81, 4, 15, 48, 92, 26, 23, 1, 12, 67, 78, 89, 34, 56, 45, 31, 20, 64,
            86, 53, 42, 9, 97, 75, 94, 50, 83, 72, 6, 61, 17, 28, 39, 69, 3, 14, 25, 91, 36, 47,
            58, 80, 44, 88, 33, 0, 55, 22, 11, 66, 77, 99,
        ];
        let asc = [
            99, 33, 22, 88, 44, 77, 0, 55, 11, 66, 25, 36, 47, 58, 14, 69, 80, 91, 3, 61, 72, 83,
            39, 94, 28, 50, 6, 17, 53, 64, 42, 97, 20, 9, 75, 31, 86, 23, 89, 34, 78, 67, 1, 12,
            45, 56, 26, 92, 15, 59, 4, 81, 70, 48, 37, 84, 51, 29, 7, 18, 62, 40, 95, 73, 98, 10,
            21, 76, 87, 32, 43, 65, 54, 68, 35, 90, 13, 46, 79, 57, 2, 24, 93, 5, 27, 82, 71, 60,
            16, 49, 38, 85, 8, 74, 63, 52, 19, 96, 41, 30,
        ];
        assert_eq!(torch_sort_order(&x, true), desc);
        assert_eq!(torch_sort_order(&x, false), asc);
        // 5000 keys with 50 values: a hash of the whole order, and its start.
        let big: Vec<f32> = (0..5000u64)
            .map(|i| ((((i * 2654435761) % (1 << 32)) >> 20) % 50) as f32)
            .collect();
        let hash = |o: &[u32]| {
            o.iter().fold(0u128, |h, &i| {
                (h * 1000003 + i as u128) % ((1u128 << 61) - 1)
            })
        };
        let d = torch_sort_order(&big, true);
        assert_eq!(d[..8], [1158, 1183, 3001, 4844, 470, 2089, 1983, 87]);
        assert_eq!(hash(&d), 24044210003995662);
        let a = torch_sort_order(&big, false);
        assert_eq!(a[..8], [4458, 3250, 2008, 2014, 171, 4433, 3798, 2945]);
        assert_eq!(hash(&a), 1182465880561993742);
        // The heapsort fallback gives a sorted order too.
        let mut v: Vec<(f32, u32)> = big
            .iter()
            .enumerate()
            .map(|(i, &k)| (k, i as u32))
            .collect();
        heap_sort(&mut v, &|x: &(f32, u32), y: &(f32, u32)| x.0 < y.0);
        assert!(v.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn selecting_a_range_keeps_what_the_full_sort_puts_there() {
        let mut x = 99u64;
        for &(n, levels) in &[(17usize, 3u64), (1000, 7), (5000, 50), (20000, 400), (3, 2)] {
            let keys: Vec<f32> = (0..n)
                .map(|_| {
                    x = mix64(x);
                    (x % levels) as f32
                })
                .collect();
            for desc in [true, false] {
                let full = torch_sort_order(&keys, desc);
                for range in [0..n / 2, n / 3..n - n / 5, 0..1, n - 1..n, 0..n] {
                    let mut pairs: Vec<(f32, u32)> = keys
                        .iter()
                        .enumerate()
                        .map(|(i, &k)| (k, i as u32))
                        .collect();
                    torch_sort_select(&mut pairs, desc, range.clone());
                    let mut got: Vec<u32> = pairs[range.clone()].iter().map(|p| p.1).collect();
                    let mut want = full[range.clone()].to_vec();
                    got.sort_unstable();
                    want.sort_unstable();
                    assert_eq!(got, want, "n {n} desc {desc} {range:?}");
                }
            }
        }
    }

    /// Keys repeated so often that a histogram pass ends on one key: the chunk of the answer comes from
    /// the pass's kept per-chunk counts, or, past [`RETAIN_CAP`], from a counting pass; both agree with
    /// a full sort.
    #[test]
    fn repeated_keys_are_located_with_and_without_kept_counts() {
        let mut x = 7u64;
        // Three magnitudes that share their first 16 key bits, more of them than a sort may hold.
        let n = COLLECT_CAP as usize + 200_000;
        let keys: Vec<u64> = (0..n)
            .map(|_| {
                x = mix64(x);
                magnitude_key((1.0 + (x % 3) as f64 / 1024.0) / 128.0, true)
            })
            .collect();
        let sorted = sorted_pairs(&keys);
        for rank in [0, n as u64 / 3, n as u64 / 2, n as u64 - 1] {
            for retain in [true, false] {
                let mut s = RankSelect::new(rank);
                let mut passes = 0;
                loop {
                    passes += 1;
                    let mut pass = Pass::default();
                    if !retain {
                        pass.retained = None;
                    }
                    for (c, k) in keys.chunks(4096).enumerate() {
                        if s.wants_chunk(c) {
                            s.absorb(&mut pass, c, s.visit((c * 4096) as u64, k));
                        }
                    }
                    if s.advance(pass) {
                        break;
                    }
                }
                assert_eq!(s.result().unwrap(), sorted[rank as usize], "rank={rank}");
                // Two histograms resolve these keys; then a look into one chunk, after a counting pass
                // only without the kept counts.
                assert_eq!(
                    passes,
                    if retain { 3 } else { 4 },
                    "rank={rank} retain={retain}"
                );
            }
        }
    }

    #[test]
    fn bernoulli_keeps_about_p_and_is_a_pure_function_of_its_key() {
        let s = stream_key(0, "model.layers.0.mlp.up_proj.weight", 1);
        let t = probability_threshold(0.3);
        let kept = (0..100_000u64).filter(|&i| bernoulli_keep(s, i, t)).count();
        assert!((kept as f64 / 1e5 - 0.3).abs() < 0.01, "{kept}");
        assert_eq!(bernoulli_keep(s, 77, t), bernoulli_keep(s, 77, t));
        assert_ne!(s, stream_key(0, "model.layers.0.mlp.up_proj.weight", 2));
        assert_ne!(s, stream_key(1, "model.layers.0.mlp.up_proj.weight", 1));
    }
}
