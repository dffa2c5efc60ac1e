//! What a step is, for one tensor, once its statistics are known: either a fixed weighted sum of the
//! input models ([`Val::Lin`], evaluated by [`kernels::combine`] as before any other method existed), or
//! an element-wise node over other values (masks, sign election, per-row coefficients), evaluated chunk
//! by chunk in f64.

use std::sync::Arc;

use crate::format::FloatType;
use crate::kernels;
use crate::selection::{bernoulli_keep, f32_magnitude_key, magnitude_key};

/// The value of a step for one tensor.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    /// Σ c_l·θ_l over the input models.
    Lin(Vec<f64>),
    Node(Arc<Node>),
}

#[derive(Debug)]
pub(crate) enum Node {
    /// Σ c·v.
    Mix(Vec<(Val, f64)>),
    /// A task-vector merge with sparsification and/or sign election.
    TaskVectors(TaskVectorNode),
    /// Σ_k c_k[group(i)]·v_k[i]: coefficients per row or per column.
    Grouped {
        terms: Vec<(Val, Vec<f64>)>,
        group: GroupOf,
    },
}

/// Which group (row, column) element i belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GroupOf {
    Whole,
    /// i / len: rows along the last dimension.
    Rows(usize),
    /// i % count: vectors along the first dimension.
    Columns(usize),
}

impl GroupOf {
    pub fn of(self, i: usize) -> usize {
        match self {
            GroupOf::Whole => 0,
            GroupOf::Rows(len) => i / len,
            GroupOf::Columns(count) => i % count,
        }
    }

    pub fn count(self, numel: usize) -> usize {
        match self {
            GroupOf::Whole => 1,
            GroupOf::Rows(len) => numel.div_ceil(len.max(1)),
            GroupOf::Columns(count) => count,
        }
    }
}

/// The groups ([`GroupOf::of`]) of consecutive elements from flat index `first` on, one per
/// [`Self::next`], without a division per element.
pub(crate) struct GroupCursor {
    group: GroupOf,
    g: usize,
    rem: usize,
}

impl GroupCursor {
    pub fn new(group: GroupOf, first: usize) -> Self {
        let (g, rem) = match group {
            GroupOf::Whole => (0, 0),
            GroupOf::Rows(len) => (first / len, first % len),
            GroupOf::Columns(count) => (first % count, 0),
        };
        Self { group, g, rem }
    }

    /// The current element's group; then moves to the next element.
    #[inline]
    pub fn next(&mut self) -> usize {
        let g = self.g;
        match self.group {
            GroupOf::Whole => {}
            GroupOf::Rows(len) => {
                self.rem += 1;
                if self.rem == len {
                    self.rem = 0;
                    self.g += 1;
                }
            }
            GroupOf::Columns(count) => {
                self.g += 1;
                if self.g == count {
                    self.g = 0;
                }
            }
        }
        g
    }
}

/// Which elements of one task vector survive sparsification.
#[derive(Debug, Clone)]
pub(crate) enum Keep {
    All,
    Nothing,
    /// Ranked by (key, index) with `magnitude_key(desc)` of |δ| rounded to `compute`: kept if between
    /// `lo` and `hi` inclusive.
    Ranked {
        desc: bool,
        compute: FloatType,
        lo: Option<(u64, u64)>,
        hi: (u64, u64),
    },
    Random {
        stream: u64,
        threshold: u64,
    },
    /// Element j is kept where bit j is set.
    Mask(Arc<Vec<u64>>),
}

impl Keep {
    #[inline]
    pub fn keeps(&self, delta: f64, index: u64) -> bool {
        match *self {
            Keep::All => true,
            Keep::Nothing => false,
            Keep::Ranked {
                desc,
                compute,
                lo,
                hi,
            } => {
                let k = (magnitude_key(compute.round_f64(delta) as f64, desc), index);
                k <= hi && lo.is_none_or(|lo| k >= lo)
            }
            Keep::Random { stream, threshold } => bernoulli_keep(stream, index, threshold),
            Keep::Mask(ref bits) => bits[(index / 64) as usize] >> (index % 64) & 1 == 1,
        }
    }

    /// Zeroes the elements of `d` (flat indices from `first`) this mask drops: [`Self::keeps`] per
    /// element, with the kind of mask decided once per slice so that the loops vectorise.
    pub fn sparsify(&self, level: crate::simd::Level, d: &mut [f64], first: u64) {
        match *self {
            Keep::All => {}
            Keep::Nothing => d.fill(0.0),
            Keep::Ranked {
                desc,
                compute: FloatType::F32,
                lo,
                hi,
            } => {
                // No bound below: (0, 0), which every element is at or above.
                let (lo_key, lo_index) = lo.unwrap_or((0, 0));
                sparsify_ranked_f32::at(level, d, first, desc, lo_key, lo_index, hi.0, hi.1)
            }
            Keep::Random { stream, threshold } => {
                sparsify_random::at(level, d, first, stream, threshold)
            }
            _ => {
                for (j, v) in d.iter_mut().enumerate() {
                    if !self.keeps(*v, first + j as u64) {
                        *v = 0.0;
                    }
                }
            }
        }
    }
}

crate::simd::leveled! {
    /// `out += λ·mixed`, or `out += λ·(mixed ÷ divisor)` when normalizing (a divisor of 0 taken as 1).
    fn elect_finish(mixed: &[f64], divisor: &[f64], normalize: bool, lambda: f64, out: &mut [f64]) {
        let n = out.len();
        let (mixed, divisor) = (&mixed[..n], &divisor[..n]);
        if normalize {
            for j in 0..n {
                let dv = if divisor[j] == 0.0 { 1.0 } else { divisor[j] };
                out[j] += lambda * (mixed[j] / dv);
            }
        } else {
            for j in 0..n {
                out[j] += lambda * mixed[j];
            }
        }
    }
}

crate::simd::leveled! {
    /// `total += (f32(δ)·factor)·w` per element, in float32 (the election's sum, one model at a time).
    fn elect_total(d: &[f64], factor: f32, w: f32, total: &mut [f32]) {
        for (t, &d) in total.iter_mut().zip(d) {
            *t += (d as f32 * factor) * w;
        }
    }
}

crate::simd::leveled! {
    /// Where model i's elected value `(f32(δ)·factor)·w32` has the sign of `total` (0 counting as +):
    /// `mixed += δ·r·w`, `divisor += w`. Elsewhere +0 is added, which changes no sum here: both start at
    /// +0 and so are never −0.
    fn elect_add(
        d: &[f64],
        factor: f32,
        w32: f32,
        r: f64,
        w: f64,
        total: &[f32],
        mixed: &mut [f64],
        divisor: &mut [f64]
    ) {
        let n = d.len();
        let (total, mixed, divisor) = (&total[..n], &mut mixed[..n], &mut divisor[..n]);
        for j in 0..n {
            let v = (d[j] as f32 * factor) * w32;
            let positive = total[j] >= 0.0;
            let agree = (v > 0.0) & positive | (v < 0.0) & !positive;
            // +0 where not agreeing, by a bit mask: as a select the compiler split each update into two
            // masked read-modify-writes, and the second load waited on the first's masked store.
            let keep = 0u64.wrapping_sub(agree as u64);
            mixed[j] += f64::from_bits((d[j] * r * w).to_bits() & keep);
            divisor[j] += f64::from_bits(w.to_bits() & keep);
        }
    }
}

crate::simd::leveled! {
    /// [`Keep::sparsify`] of a ranked mask in float32: element j (flat index `first + j`) is kept when
    /// `(lo_key, lo_index) ≤ (key of |f32(δ)|, index) ≤ (hi_key, hi_index)`, otherwise set to +0.
    fn sparsify_ranked_f32(
        d: &mut [f64],
        first: u64,
        desc: bool,
        lo_key: u64,
        lo_index: u64,
        hi_key: u64,
        hi_index: u64
    ) {
        let flip = if desc { u64::MAX } else { 0 };
        for (j, v) in d.iter_mut().enumerate() {
            let k = f32_magnitude_key(*v, flip);
            let i = first + j as u64;
            let below_hi = (k < hi_key) | (k == hi_key) & (i <= hi_index);
            let above_lo = (k > lo_key) | (k == lo_key) & (i >= lo_index);
            let keep = 0u64.wrapping_sub((below_hi & above_lo) as u64);
            *v = f64::from_bits(v.to_bits() & keep);
        }
    }
}

crate::simd::leveled! {
    /// [`Keep::sparsify`] of a random mask: element j (flat index `first + j`) is kept when
    /// [`bernoulli_keep`]`(stream, first + j, threshold)`, otherwise set to +0. A plain loop of 64-bit
    /// integer arithmetic, so that it vectorises (AVX-512 has 64-bit lane multiplies); the draw per
    /// element called through `keeps` was most of a DARE merge.
    fn sparsify_random(d: &mut [f64], first: u64, stream: u64, threshold: u64) {
        for (j, v) in d.iter_mut().enumerate() {
            let keep = bernoulli_keep(stream, first + j as u64, threshold);
            *v = f64::from_bits(v.to_bits() & 0u64.wrapping_sub(keep as u64));
        }
    }
}

#[derive(Debug)]
pub(crate) struct TaskVectorNode {
    pub base: Val,
    /// δ_i = θ_i − θ_b.
    pub deltas: Vec<Val>,
    pub keep: Vec<Keep>,
    /// The rescale factor of each model (1 without rescaling).
    pub rescale: Vec<f64>,
    pub weights: Vec<f64>,
    /// The dtype mergekit computes this tensor in: the sign election is decided in it (below).
    pub compute: FloatType,
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: f64,
}

/// The inputs of one chunk: decoded input models, and which model is the reference of `combine`.
pub(crate) struct ChunkInputs<'a> {
    pub views: Vec<&'a [f32]>,
    pub reference: usize,
    /// Flat index of the chunk's first element.
    pub first: usize,
    /// Whether every value of `views[l]` is finite, as decoding it found (false where not known).
    pub finite: Vec<bool>,
}

impl<'a> ChunkInputs<'a> {
    /// Inputs whose finiteness is found by scanning them (the executor has it from decoding).
    #[cfg(test)]
    pub fn new(views: Vec<&'a [f32]>, reference: usize, first: usize) -> Self {
        let finite = views
            .iter()
            .map(|v| v.iter().all(|x| x.is_finite()))
            .collect();
        Self {
            views,
            reference,
            first,
            finite,
        }
    }
}

impl Val {
    /// A leaf model's value.
    pub fn leaf(l: usize, n: usize) -> Val {
        let mut v = vec![0.0; n];
        v[l] = 1.0;
        Val::Lin(v)
    }

    /// a·x + b·y, kept a fixed weighted sum when both are.
    pub fn axpby(a: f64, x: &Val, b: f64, y: &Val) -> Val {
        match (x, y) {
            (Val::Lin(x), Val::Lin(y)) => {
                Val::Lin(x.iter().zip(y).map(|(x, y)| a * x + b * y).collect())
            }
            _ => Val::Node(Arc::new(Node::Mix(vec![(x.clone(), a), (y.clone(), b)]))),
        }
    }

    /// Σ c·v, kept a fixed weighted sum when every v is; `zero` is the empty sum's length.
    pub fn sum(terms: Vec<(Val, f64)>, n_leaves: usize) -> Val {
        if terms.iter().all(|(v, _)| matches!(v, Val::Lin(_))) {
            let mut out = vec![0.0; n_leaves];
            for (v, w) in &terms {
                if let Val::Lin(x) = v {
                    out.iter_mut().zip(x).for_each(|(a, b)| *a += w * b);
                }
            }
            return Val::Lin(out);
        }
        Val::Node(Arc::new(Node::Mix(terms)))
    }

    /// Marks the input models this value reads.
    pub fn mark_needed(&self, needed: &mut [bool]) {
        match self {
            Val::Lin(c) => c
                .iter()
                .zip(needed.iter_mut())
                .for_each(|(c, n)| *n |= *c != 0.0),
            Val::Node(n) => match &**n {
                Node::Mix(t) => t.iter().for_each(|(v, _)| v.mark_needed(needed)),
                Node::TaskVectors(tv) => {
                    tv.base.mark_needed(needed);
                    tv.deltas.iter().for_each(|d| d.mark_needed(needed));
                }
                Node::Grouped { terms, .. } => {
                    terms.iter().for_each(|(v, _)| v.mark_needed(needed))
                }
            },
        }
    }

    /// (c, i, s) where this value is c·(θ_i − θ_ref) + s·θ_ref as `combine` computes a fixed weighted
    /// sum with one term besides the reference `reference` (a task vector θ_i − θ_base: c = 1, s = 0).
    fn single_difference(&self, reference: usize) -> Option<(f64, usize, f64)> {
        let Val::Lin(c) = self else { return None };
        let mut terms = c
            .iter()
            .enumerate()
            .filter(|&(i, &c)| i != reference && c != 0.0);
        match (terms.next(), terms.next()) {
            (Some((i, &coef)), None) => Some((coef, i, c.iter().sum())),
            _ => None,
        }
    }

    /// [`crate::selection::magnitude_keys`] in float32 of this value over a chunk, into `keys`, computed
    /// straight from the inputs in one AVX-512 sweep where the value is a
    /// [single difference](Self::single_difference) and `level` is AVX-512 (the same bits as evaluating
    /// it first). Returns false, having done nothing, otherwise.
    pub fn f32_keys_fused(
        &self,
        level: crate::simd::Level,
        x: &ChunkInputs,
        desc: bool,
        keys: &mut Vec<u64>,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if level == crate::simd::Level::Avx512 {
            if let Some((coef, i, sum)) = self.single_difference(x.reference) {
                let r = x.views[x.reference];
                keys.resize(r.len(), 0);
                let d = avx512::Delta {
                    coef,
                    x: &x.views[i][..r.len()],
                    sum,
                };
                assert!(level <= crate::simd::detected());
                // SAFETY: the CPU has AVX-512 (asserted); the lengths are checked inside.
                unsafe {
                    avx512::difference_keys(
                        r,
                        x.finite[x.reference],
                        &d,
                        if desc { u64::MAX } else { 0 },
                        keys,
                    )
                };
                return true;
            }
        }
        let _ = (level, x, desc, keys);
        false
    }

    /// The value over one chunk, in f64.
    pub fn eval(&self, x: &ChunkInputs, out: &mut [f64]) {
        match self {
            Val::Lin(c) => {
                let s: f64 = c.iter().sum();
                kernels::combine(c, s, &x.views, x.reference, out);
            }
            Val::Node(n) => match &**n {
                Node::Mix(terms) => {
                    out.fill(0.0);
                    let mut tmp = super::scratch::f64s(out.len());
                    for (v, w) in terms {
                        v.eval(x, &mut tmp);
                        out.iter_mut().zip(&tmp).for_each(|(o, t)| *o += w * t);
                    }
                    super::scratch::give_f64(tmp);
                }
                Node::Grouped { terms, group } => {
                    out.fill(0.0);
                    let mut tmp = super::scratch::f64s(out.len());
                    for (v, coefs) in terms {
                        v.eval(x, &mut tmp);
                        let mut g = GroupCursor::new(*group, x.first);
                        for (o, t) in out.iter_mut().zip(&tmp) {
                            *o += coefs[g.next()] * t;
                        }
                    }
                    super::scratch::give_f64(tmp);
                }
                Node::TaskVectors(tv) => tv.eval(x, out),
            },
        }
    }
}

impl TaskVectorNode {
    /// Column by column (one loop per task vector, so the loops vectorise), with per element the same
    /// operations in the same order as the row-wise definition (`tests::row_wise`): the masks, then
    /// Σ_i in model order of the kept (and, with consensus, sign-agreeing) w_i·δ_i and of their weights.
    fn eval(&self, x: &ChunkInputs, out: &mut [f64]) {
        self.eval_at(crate::simd::level(), x, out)
    }

    /// [`Self::eval`] with its kernels at an explicit SIMD level (every level gives the same bits).
    fn eval_at(&self, level: crate::simd::Level, x: &ChunkInputs, out: &mut [f64]) {
        if self.compute != FloatType::F32 {
            return self.eval_rounded(x, out);
        }
        #[cfg(target_arch = "x86_64")]
        if level == crate::simd::Level::Avx512 && self.fused_avx512(x, out) {
            return;
        }
        use super::scratch;
        let n = out.len();
        let m = self.deltas.len();
        let mut deltas: Vec<Vec<f64>> = (0..m).map(|_| scratch::f64s(n)).collect();
        for (d, v) in deltas.iter_mut().zip(&self.deltas) {
            v.eval(x, d);
        }
        for (d, keep) in deltas.iter_mut().zip(&self.keep) {
            keep.sparsify(level, d, x.first as u64);
        }
        let (factor, w32) = self.election_operands();
        self.base.eval(x, out);
        match () {
            #[cfg(target_arch = "x86_64")]
            () if self.consensus && level == crate::simd::Level::Avx512 => {
                assert!(level <= crate::simd::detected());
                let d: Vec<&[f64]> = deltas.iter().map(|d| &d[..n]).collect();
                // SAFETY: the CPU has AVX-512 (asserted); every δ has out.len() elements.
                unsafe {
                    avx512::elect(
                        &d,
                        &factor,
                        &w32,
                        &self.rescale,
                        &self.weights,
                        self.normalize,
                        self.lambda,
                        out,
                    )
                }
            }
            () => self.elect_by_columns(level, &deltas, &factor, &w32, out),
        }
        deltas.into_iter().for_each(scratch::give_f64);
    }

    /// The election's float32 operands as mergekit has them: each rescale factor and weight rounded
    /// (δ_i rounded, times its factor, times its weight, each product rounded; a factor of 1 multiplies
    /// exactly).
    fn election_operands(&self) -> (Vec<f32>, Vec<f32>) {
        let factor = self
            .rescale
            .iter()
            .map(|&s| if s != 1.0 { s as f32 } else { 1.0 })
            .collect();
        (factor, self.weights.iter().map(|&w| w as f32).collect())
    }

    /// Without consensus every term is added, and divided by Σ w (1 where it vanishes).
    fn divisor_without_consensus(&self) -> f64 {
        let mut total = 0.0;
        for &w in &self.weights {
            total += w;
        }
        if total.abs() < 1e-8 {
            1.0
        } else {
            total
        }
    }

    /// The whole of [`Self::eval_at`] in one AVX-512 sweep, 8 elements at a time with every value in
    /// registers ([`avx512::fused`]), where the node has its usual form: the base a multiple of the
    /// reference input, every task vector a multiple of one input's difference to it (c·(x − r), as
    /// θ_i − θ_base), each mask ranked in float32 (or keeping all or nothing), at most
    /// [`avx512::FUSED_MAX`] task vectors. Returns false, having done nothing, otherwise.
    #[cfg(target_arch = "x86_64")]
    fn fused_avx512(&self, x: &ChunkInputs, out: &mut [f64]) -> bool {
        let m = self.deltas.len();
        if !(1..=avx512::FUSED_MAX).contains(&m) {
            return false;
        }
        let n = out.len();
        // The base is the reference times Σ c, each task vector a single difference, as `combine`
        // takes a fixed weighted sum: its terms other than the reference, and Σ c.
        let base_sum = match &self.base {
            Val::Lin(c)
                if c.iter()
                    .enumerate()
                    .all(|(i, &c)| i == x.reference || c == 0.0) =>
            {
                c.iter().sum()
            }
            _ => return false,
        };
        let deltas = self.deltas.iter().map(|v| {
            let (coef, i, sum) = v.single_difference(x.reference)?;
            Some(avx512::Delta {
                coef,
                x: &x.views[i][..n],
                sum,
            })
        });
        let Some(deltas) = deltas.collect::<Option<Vec<_>>>() else {
            return false;
        };
        // Keeping all is the widest range, keeping nothing an empty one: the same bits as no mask and
        // all zeros.
        let bounds = self.keep.iter().map(|k| match *k {
            Keep::All => Some(avx512::Bounds {
                flip: 0,
                lo: (0, 0),
                hi: (u64::MAX, u64::MAX),
            }),
            Keep::Nothing => Some(avx512::Bounds {
                flip: 0,
                lo: (u64::MAX, u64::MAX),
                hi: (0, 0),
            }),
            Keep::Ranked {
                desc,
                compute: FloatType::F32,
                lo,
                hi,
            } => Some(avx512::Bounds {
                flip: if desc { u64::MAX } else { 0 },
                lo: lo.unwrap_or((0, 0)),
                hi,
            }),
            _ => None,
        });
        let Some(bounds) = bounds.collect::<Option<Vec<_>>>() else {
            return false;
        };
        let (factor, w32) = self.election_operands();
        let divisor = (!self.consensus).then(|| self.divisor_without_consensus());
        let models = avx512::Models {
            deltas: &deltas,
            bounds: &bounds,
            factor: &factor,
            w32: &w32,
            rescale: &self.rescale,
            weights: &self.weights,
        };
        assert!(crate::simd::Level::Avx512 <= crate::simd::detected());
        // SAFETY: the CPU has AVX-512 (asserted); every view and `r` have out.len() elements.
        unsafe {
            avx512::fused(
                &x.views[x.reference][..n],
                x.finite[x.reference],
                base_sum,
                &models,
                divisor,
                self.normalize,
                self.lambda,
                x.first as u64,
                out,
            )
        };
        true
    }

    /// The election one kernel per task vector (`elect_total`, `elect_add`, then `elect_finish`), adding
    /// to the base already in `out`.
    fn elect_by_columns(
        &self,
        level: crate::simd::Level,
        deltas: &[Vec<f64>],
        factor: &[f32],
        w32: &[f32],
        out: &mut [f64],
    ) {
        use super::scratch;
        let n = out.len();
        let mut mixed = scratch::f64s(n);
        let mut divisor = scratch::f64s(n);
        mixed.fill(0.0);
        divisor.fill(0.0);
        if self.consensus {
            // sign(Σ_i w_i·δ_i), with 0 counting as +, taken from the sum mergekit computes (in float32,
            // in model order): where the exact sum cancels to within its rounding, the sign is mergekit's.
            let mut total = scratch::f32s(n);
            total.fill(0.0);
            for (i, d) in deltas.iter().enumerate() {
                elect_total::at(level, d, factor[i], w32[i], &mut total);
            }
            for (i, d) in deltas.iter().enumerate() {
                let (r, w) = (self.rescale[i], self.weights[i]);
                elect_add::at(
                    level,
                    d,
                    factor[i],
                    w32[i],
                    r,
                    w,
                    &total,
                    &mut mixed,
                    &mut divisor,
                );
            }
            scratch::give_f32(total);
        } else {
            for (i, d) in deltas.iter().enumerate() {
                let (r, w) = (self.rescale[i], self.weights[i]);
                for (mx, &d) in mixed.iter_mut().zip(d) {
                    *mx += d * r * w;
                }
            }
            divisor.fill(self.divisor_without_consensus());
        }
        elect_finish::at(level, &mixed, &divisor, self.normalize, self.lambda, out);
        scratch::give_f64(mixed);
        scratch::give_f64(divisor);
    }

    /// mergekit's arithmetic in a 16-bit compute dtype, operation by operation: every intermediate
    /// (task vector, rescaled and weighted task vector, sums, quotient, λ·, the final addition) is
    /// rounded to the compute dtype, sums accumulating in float32 in model order, as torch does on the
    /// CPU. Rounding this coarse at each step is mergekit's result (several ulps from the exact one);
    /// reproducing it is what matching a `dtype: bfloat16` config takes.
    fn eval_rounded(&self, x: &ChunkInputs, out: &mut [f64]) {
        let n = out.len();
        let m = self.deltas.len();
        let c = self.compute;
        let mut deltas = vec![vec![0f64; n]; m];
        for (d, v) in deltas.iter_mut().zip(&self.deltas) {
            v.eval(x, d);
        }
        // torch makes 16-bit constants from Python floats through float32.
        let w: Vec<f32> = self
            .weights
            .iter()
            .map(|&w| c.round_f32(w as f32))
            .collect();
        // Already a 16-bit number (see `task_vectors`).
        let factor: Vec<Option<f32>> = self
            .rescale
            .iter()
            .map(|&s| (s != 1.0).then_some(s as f32))
            .collect();
        let lambda = self.lambda as f32;
        let mut p = vec![0f32; m];
        self.base.eval(x, out);
        for j in 0..n {
            for i in 0..m {
                let mut d = if self.keep[i].keeps(deltas[i][j], (x.first + j) as u64) {
                    c.round_f64(deltas[i][j])
                } else {
                    0.0
                };
                if let Some(s) = factor[i] {
                    d = c.round_f32(d * s);
                }
                p[i] = c.round_f32(d * w[i]);
            }
            let (mut mixed, mut divisor) = (0f32, 0f32);
            if self.consensus {
                let positive = p.iter().sum::<f32>() >= 0.0;
                for i in 0..m {
                    if (p[i] > 0.0 && positive) || (p[i] < 0.0 && !positive) {
                        mixed += p[i];
                        divisor += w[i];
                    }
                }
                mixed = c.round_f32(mixed);
                divisor = c.round_f32(divisor);
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                mixed = c.round_f32(p.iter().sum::<f32>());
                divisor = c.round_f32(w.iter().sum::<f32>());
                if divisor.abs() < 1e-8 {
                    divisor = 1.0;
                }
            }
            if self.normalize {
                mixed = c.round_f32(mixed / divisor);
            }
            if self.lambda != 1.0 {
                mixed = c.round_f32(mixed * lambda);
            }
            out[j] = c.round_f32(c.round_f64(out[j]) + mixed) as f64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The sign election of a float32 [`super::TaskVectorNode`] with consensus, 8 elements at a time with
    /// every sum in registers: per element the operations of `elect_total`, `elect_add` and
    /// `elect_finish` run one after the other, in the same order, so the bits are theirs. (Where a term
    /// does not agree, its masked add leaves the sum as adding +0 does: the sums start at +0 and never
    /// become −0.)
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; every `d[i]` has `out.len()` elements.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn elect(
        d: &[&[f64]],
        factor: &[f32],
        w32: &[f32],
        r: &[f64],
        w: &[f64],
        normalize: bool,
        lambda: f64,
        out: &mut [f64],
    ) {
        let n = out.len();
        let zero = _mm256_setzero_ps();
        let elected = |di: __m512d, i: usize| elected(_mm512_cvtpd_ps(di), factor[i], w32[i]);
        let mut j = 0;
        while j < n {
            let len = (n - j).min(8);
            let lanes = (0xffu32 >> (8 - len)) as __mmask8;
            let mut total = _mm256_setzero_ps();
            for (i, di) in d.iter().enumerate() {
                let v = elected(_mm512_maskz_loadu_pd(lanes, di.as_ptr().add(j)), i);
                total = _mm256_add_ps(total, v);
            }
            let positive = _mm256_cmp_ps_mask::<_CMP_GE_OQ>(total, zero);
            let mut mixed = _mm512_setzero_pd();
            let mut divisor = _mm512_setzero_pd();
            for (i, di) in d.iter().enumerate() {
                let dv = _mm512_maskz_loadu_pd(lanes, di.as_ptr().add(j));
                let agree = agrees(elected(dv, i), positive);
                mixed = _mm512_mask_add_pd(mixed, agree, mixed, term(dv, r[i], w[i]));
                divisor = _mm512_mask_add_pd(divisor, agree, divisor, _mm512_set1_pd(w[i]));
            }
            let add = finish(mixed, divisor, normalize, lambda);
            let o = out.as_mut_ptr().add(j);
            _mm512_mask_storeu_pd(
                o,
                lanes,
                _mm512_add_pd(_mm512_maskz_loadu_pd(lanes, o), add),
            );
            j += 8;
        }
    }

    /// (f32(δ)·factor)·w32: the elected value of δ (given as f32(δ)).
    #[inline(always)]
    unsafe fn elected(f: __m256, factor: f32, w32: f32) -> __m256 {
        _mm256_mul_ps(
            _mm256_mul_ps(f, _mm256_set1_ps(factor)),
            _mm256_set1_ps(w32),
        )
    }

    /// The lanes where the elected value `v` has the sign of the total (`positive`: total ≥ 0); a zero
    /// agrees with neither.
    #[inline(always)]
    unsafe fn agrees(v: __m256, positive: __mmask8) -> __mmask8 {
        let zero = _mm256_setzero_ps();
        _mm256_mask_cmp_ps_mask::<_CMP_GT_OQ>(positive, v, zero)
            | _mm256_mask_cmp_ps_mask::<_CMP_LT_OQ>(!positive, v, zero)
    }

    /// A term of the sum: (δ·r)·w.
    #[inline(always)]
    unsafe fn term(d: __m512d, r: f64, w: f64) -> __m512d {
        _mm512_mul_pd(_mm512_mul_pd(d, _mm512_set1_pd(r)), _mm512_set1_pd(w))
    }

    /// What `elect_finish` adds to the base: λ·(mixed ÷ divisor), a divisor of 0 taken as 1, or λ·mixed.
    #[inline(always)]
    unsafe fn finish(mixed: __m512d, divisor: __m512d, normalize: bool, lambda: f64) -> __m512d {
        if normalize {
            let none = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(divisor, _mm512_setzero_pd());
            let dv = _mm512_mask_blend_pd(none, divisor, _mm512_set1_pd(1.0));
            _mm512_mul_pd(_mm512_set1_pd(lambda), _mm512_div_pd(mixed, dv))
        } else {
            _mm512_mul_pd(_mm512_set1_pd(lambda), mixed)
        }
    }

    /// Most task vectors [`fused`] holds in registers.
    pub const FUSED_MAX: usize = 8;

    /// A task vector as [`crate::sum::combine_at`] evaluates a fixed weighted sum with one term:
    /// `(0 + coef·(x − r)) + sum·r`.
    pub struct Delta<'a> {
        pub coef: f64,
        pub x: &'a [f32],
        pub sum: f64,
    }

    /// Elements `p..p+8` widened to f64, `lanes` of them (the rest +0); all 8 with a plain load. The
    /// loops use masks only for their tail: with masked loads and stores in every step, TIES took 6%
    /// longer on this Zen 4.
    #[inline(always)]
    unsafe fn load8(p: *const f32, lanes: __mmask8) -> __m512d {
        _mm512_cvtps_pd(load8_ps(p, lanes))
    }

    /// [`load8`] as float32.
    #[inline(always)]
    unsafe fn load8_ps(p: *const f32, lanes: __mmask8) -> __m256 {
        if lanes == 0xff {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskz_loadu_ps(lanes, p)
        }
    }

    /// Stores `lanes` of `v` at `p..p+8` (all 8 with a plain store, see [`load8`]).
    #[inline(always)]
    unsafe fn store8(p: *mut f64, lanes: __mmask8, v: __m512d) {
        if lanes == 0xff {
            _mm512_storeu_pd(p, v)
        } else {
            _mm512_mask_storeu_pd(p, lanes, v)
        }
    }

    /// Runs `step(j, lanes)` over `0..n` in steps of 8: whole steps with the constant mask 0xff (so that
    /// [`load8`] and [`store8`] inline to plain loads and stores), then the tail.
    #[inline(always)]
    unsafe fn by_eights(n: usize, mut step: impl FnMut(usize, __mmask8)) {
        let mut j = 0;
        while j + 8 <= n {
            step(j, 0xff);
            j += 8;
        }
        if j < n {
            step(j, (0xffu32 >> (8 - (n - j))) as __mmask8);
        }
    }

    /// A [`Delta`]'s `(0 + coef·(x − r)) + sum·r` over elements `j..j+8` (`lanes` of them), as
    /// `combine_at` computes it.
    #[inline(always)]
    unsafe fn difference(
        coef: f64,
        sum: f64,
        x: *const f32,
        rv: __m512d,
        j: usize,
        lanes: __mmask8,
    ) -> __m512d {
        let xv = load8(x.add(j), lanes);
        _mm512_add_pd(
            _mm512_add_pd(
                _mm512_setzero_pd(),
                _mm512_mul_pd(_mm512_set1_pd(coef), _mm512_sub_pd(xv, rv)),
            ),
            _mm512_mul_pd(_mm512_set1_pd(sum), rv),
        )
    }

    /// The float32 magnitude key of each element of `d` ([`crate::selection::f32_magnitude_key`] with
    /// `flip`), into `keys`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn difference_keys(
        r: &[f32],
        r_finite: bool,
        d: &Delta,
        flip: u64,
        keys: &mut [u64],
    ) {
        let n = r.len();
        assert!(d.x.len() == n && keys.len() == n);
        let fv = _mm512_set1_epi64(flip as i64);
        let mut j = 0;
        if d.coef == 1.0 && d.sum == 0.0 && r_finite {
            // θ − θ_ref: rounding the exact f64 difference of two float32 numbers to float32 is their
            // float32 difference (exact in f64 unless one is under 2⁻²⁹ of the other, when both round
            // to the larger), and adding 0 and 0·r changes no magnitude while r is finite. So 16 keys
            // per step from one float32 subtraction.
            let abs = _mm512_set1_epi32(i32::MAX);
            while j + 16 <= n {
                let dx = _mm512_sub_ps(
                    _mm512_loadu_ps(d.x.as_ptr().add(j)),
                    _mm512_loadu_ps(r.as_ptr().add(j)),
                );
                let m = _mm512_and_si512(_mm512_castps_si512(dx), abs);
                for (h, half) in [_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64::<1>(m)]
                    .into_iter()
                    .enumerate()
                {
                    let key = _mm512_castpd_si512(_mm512_cvtps_pd(_mm256_castsi256_ps(half)));
                    _mm512_storeu_si512(
                        keys.as_mut_ptr().add(j + 8 * h).cast(),
                        _mm512_xor_si512(key, fv),
                    );
                }
                j += 16;
            }
        }
        let (r, x, keys) = (&r[j..], &d.x[j..], &mut keys[j..]);
        by_eights(n - j, |j, lanes| {
            let rv = load8(r.as_ptr().add(j), lanes);
            let dv = difference(d.coef, d.sum, x.as_ptr(), rv, j, lanes);
            let key = _mm512_xor_si512(
                _mm512_castpd_si512(_mm512_abs_pd(_mm512_cvtps_pd(_mm512_cvtpd_ps(dv)))),
                fv,
            );
            store8(
                keys.as_mut_ptr().add(j).cast(),
                lanes,
                _mm512_castsi512_pd(key),
            );
        });
    }

    /// A ranked mask: kept where `lo ≤ (key, index) ≤ hi`, the key of |f32(δ)| as
    /// [`crate::selection::f32_magnitude_key`] with `flip`.
    pub struct Bounds {
        pub flip: u64,
        pub lo: (u64, u64),
        pub hi: (u64, u64),
    }

    /// The task vectors of [`fused`], with what `elect` takes per model.
    pub struct Models<'a, 'b> {
        pub deltas: &'b [Delta<'a>],
        pub bounds: &'b [Bounds],
        pub factor: &'b [f32],
        pub w32: &'b [f32],
        pub rescale: &'b [f64],
        pub weights: &'b [f64],
    }

    /// [`super::TaskVectorNode::eval_at`] of its usual form in one sweep, 8 elements at a time: the
    /// base (`base_sum`·r) and each task vector as `combine_at` computes them, each mask as
    /// `sparsify_ranked_f32`, then the election as [`elect`] (with `divisor: None`, consensus) or
    /// without consensus every term added and `divisor` as `elect_by_columns` has it. Per element the
    /// same operations in the same order as those kernels one after the other, so the bits are theirs;
    /// nothing is stored between them.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; `r`, every term's input and `out` have the same length;
    /// `r_finite` only if every value of `r` is finite.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn fused(
        r: &[f32],
        r_finite: bool,
        base_sum: f64,
        models: &Models,
        divisor: Option<f64>,
        normalize: bool,
        lambda: f64,
        first: u64,
        out: &mut [f64],
    ) {
        let args = (
            r, r_finite, base_sum, models, divisor, normalize, lambda, first, out,
        );
        match models.deltas.len() {
            1 => fused_lo::<1>(args),
            2 => fused_lo::<2>(args),
            3 => fused_lo::<3>(args),
            4 => fused_lo::<4>(args),
            5 => fused_lo::<5>(args),
            6 => fused_lo::<6>(args),
            7 => fused_lo::<7>(args),
            8 => fused_lo::<8>(args),
            m => unreachable!("{m} task vectors in the fused election"),
        }
    }

    /// [`fused_m`] with the lower bounds' test where a mask has one (`LO`), and in its `PLAIN` form
    /// where it applies.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn fused_lo<const M: usize>(args: FusedArgs) {
        let (r_finite, models) = (args.1, args.3);
        let lo = models.bounds.iter().any(|b| b.lo != (0, 0));
        // Every task vector θ − θ_ref, every reference value finite: see `fused_m`'s `PLAIN`.
        let plain = models.deltas.iter().all(|d| d.coef == 1.0 && d.sum == 0.0) && r_finite;
        // (0, 0) is at or below every (key, index): without a bound below, no test is needed.
        match (lo, plain) {
            (true, true) => fused_m::<M, true, true>(args),
            (true, false) => fused_m::<M, true, false>(args),
            (false, true) => fused_m::<M, false, true>(args),
            (false, false) => fused_m::<M, false, false>(args),
        }
    }

    /// [`fused`]'s arguments, passed on in one.
    type FusedArgs<'a, 'b, 'c, 'd> = (
        &'a [f32],
        bool,
        f64,
        &'b Models<'c, 'd>,
        Option<f64>,
        bool,
        f64,
        u64,
        &'a mut [f64],
    );

    /// [`fused`] for `M` task vectors. `PLAIN`: every task vector is θ − θ_ref (coefficient 1, Σ c = 0)
    /// and every reference value finite; then δ = x − r and f32(δ) = x − r in float32 (rounding the
    /// exact difference of two float32 numbers is their float32 difference), which gives the key and
    /// the elected value without narrowing δ. Both up to the sign of a zero, which nothing sees:
    /// `combine_at`'s `0 +` turns a −0 into +0, but a zero's key is |0|, a zero elected value is neither
    /// > 0 nor < 0, and a zero term added to sums that start at +0 leaves them as +0 does (multiplying
    /// by 1 and adding 0·r, r finite, change nothing else).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn fused_m<const M: usize, const LO: bool, const PLAIN: bool>(
        (r, _, base_sum, models, divisor, normalize, lambda, first, out): FusedArgs,
    ) {
        let n = out.len();
        assert!(r.len() == n && models.deltas.len() == M && models.bounds.len() == M);
        let zero = _mm256_setzero_ps();
        // Each model's constants, in arrays that the loop reads as broadcast operands.
        let deltas = &models.deltas[..M];
        let x: [*const f32; M] = std::array::from_fn(|i| {
            assert_eq!(deltas[i].x.len(), n);
            deltas[i].x.as_ptr()
        });
        let coef: [f64; M] = std::array::from_fn(|i| deltas[i].coef);
        let sum: [f64; M] = std::array::from_fn(|i| deltas[i].sum);
        let bounds = &models.bounds[..M];
        let flip: [u64; M] = std::array::from_fn(|i| bounds[i].flip);
        let hi: [(u64, u64); M] = std::array::from_fn(|i| bounds[i].hi);
        let lo: [(u64, u64); M] = std::array::from_fn(|i| bounds[i].lo);
        let factor: [f32; M] = std::array::from_fn(|i| models.factor[i]);
        let w32: [f32; M] = std::array::from_fn(|i| models.w32[i]);
        let rescale: [f64; M] = std::array::from_fn(|i| models.rescale[i]);
        let weights: [f64; M] = std::array::from_fn(|i| models.weights[i]);
        // The lanes l of elements `at..at+8` whose index at + l is ≤ `bound` (resp. ≥): the index's part
        // of comparing (key, index) pairs, needed only where the keys are equal.
        let upto = |bound: u64, at: u64| -> __mmask8 {
            match bound.checked_sub(at) {
                None => 0,
                Some(k) if k >= 7 => 0xff,
                Some(k) => (0xffu32 >> (7 - k)) as __mmask8,
            }
        };
        let from = |bound: u64, at: u64| -> __mmask8 {
            match bound.checked_sub(at) {
                None => 0xff,
                Some(k) if k > 7 => 0,
                Some(k) => (0xffu32 << k) as __mmask8,
            }
        };
        by_eights(n, |j, lanes| {
            let at = first + j as u64;
            let rf = load8_ps(r.as_ptr().add(j), lanes);
            let rv = _mm512_cvtps_pd(rf);
            let mut d = [_mm512_setzero_pd(); M];
            let mut v = [zero; M];
            let mut total = zero;
            for i in 0..M {
                // δ, and f32(δ).
                let (di, fi) = if PLAIN {
                    let xf = load8_ps(x[i].add(j), lanes);
                    (
                        _mm512_sub_pd(_mm512_cvtps_pd(xf), rv),
                        _mm256_sub_ps(xf, rf),
                    )
                } else {
                    let di = difference(coef[i], sum[i], x[i], rv, j, lanes);
                    (di, _mm512_cvtpd_ps(di))
                };
                // The mask: lo ≤ (key, index) ≤ hi, dropped elements +0.
                let key = _mm512_xor_si512(
                    _mm512_castpd_si512(_mm512_abs_pd(_mm512_cvtps_pd(fi))),
                    _mm512_set1_epi64(flip[i] as i64),
                );
                let hk = _mm512_set1_epi64(hi[i].0 as i64);
                let mut keep = _mm512_cmplt_epu64_mask(key, hk)
                    | _mm512_mask_cmpeq_epu64_mask(upto(hi[i].1, at), key, hk);
                if LO {
                    let lk = _mm512_set1_epi64(lo[i].0 as i64);
                    keep &= _mm512_cmpgt_epu64_mask(key, lk)
                        | _mm512_mask_cmpeq_epu64_mask(from(lo[i].1, at), key, lk);
                }
                d[i] = _mm512_maskz_mov_pd(keep, di);
                // f32 of a dropped δ, +0, is +0.
                v[i] = elected(_mm256_maskz_mov_ps(keep, fi), factor[i], w32[i]);
                total = _mm256_add_ps(total, v[i]);
            }
            let positive = _mm256_cmp_ps_mask::<_CMP_GE_OQ>(total, zero);
            let mut mixed = _mm512_setzero_pd();
            let mut div = _mm512_setzero_pd();
            for i in 0..M {
                let term = term(d[i], rescale[i], weights[i]);
                if divisor.is_some() {
                    mixed = _mm512_add_pd(mixed, term);
                } else {
                    let agree = agrees(v[i], positive);
                    mixed = _mm512_mask_add_pd(mixed, agree, mixed, term);
                    div = _mm512_mask_add_pd(div, agree, div, _mm512_set1_pd(weights[i]));
                }
            }
            if let Some(t) = divisor {
                div = _mm512_set1_pd(t);
            }
            let add = finish(mixed, div, normalize, lambda);
            // The base: 0 + base_sum·r, as `combine_at` with no term.
            let o = _mm512_add_pd(
                _mm512_setzero_pd(),
                _mm512_mul_pd(_mm512_set1_pd(base_sum), rv),
            );
            store8(out.as_mut_ptr().add(j), lanes, _mm512_add_pd(o, add));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The election as first written, element by element (the definition the column-wise
    /// [`TaskVectorNode::eval`] must reproduce bit for bit).
    pub fn row_wise(node: &TaskVectorNode, x: &ChunkInputs, out: &mut [f64]) {
        let n = out.len();
        let m = node.deltas.len();
        let mut deltas: Vec<Vec<f64>> = (0..m).map(|_| crate::executor::scratch::f64s(n)).collect();
        for (d, v) in deltas.iter_mut().zip(&node.deltas) {
            v.eval(x, d);
        }
        // Sparsify each task vector in place.
        for (i, d) in deltas.iter_mut().enumerate() {
            let keep = &node.keep[i];
            for (j, v) in d.iter_mut().enumerate() {
                if !keep.keeps(*v, (x.first + j) as u64) {
                    *v = 0.0;
                }
            }
        }
        // The election's operands as mergekit has them: each rounded to the compute dtype, as are the
        // rescale factors and weights, and each product.
        let c = node.compute;
        let factor: Vec<Option<f32>> = node
            .rescale
            .iter()
            .map(|&s| (s != 1.0).then(|| c.round_f64(s)))
            .collect();
        let w32: Vec<f32> = node.weights.iter().map(|&w| c.round_f64(w)).collect();
        let mut elected = vec![0f32; m];
        node.base.eval(x, out);
        for j in 0..n {
            let (mut mixed, mut divisor) = (0.0, 0.0);
            if node.consensus {
                // sign(Σ_i w_i·δ_i), with 0 counting as +, taken from the sum mergekit computes (in
                // float32, in model order): where the exact sum cancels to within its rounding, the
                // sign is mergekit's.
                let mut total = 0f32;
                for i in 0..m {
                    let mut d = c.round_f64(deltas[i][j]);
                    if let Some(s) = factor[i] {
                        d = c.round_f32(d * s);
                    }
                    elected[i] = c.round_f32(d * w32[i]);
                    total += elected[i];
                }
                let positive = total >= 0.0;
                for (i, d) in deltas.iter().enumerate() {
                    let v = elected[i];
                    if (v > 0.0 && positive) || (v < 0.0 && !positive) {
                        mixed += d[j] * node.rescale[i] * node.weights[i];
                        divisor += node.weights[i];
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                for (i, d) in deltas.iter().enumerate() {
                    mixed += d[j] * node.rescale[i] * node.weights[i];
                    divisor += node.weights[i];
                }
                if divisor.abs() < 1e-8 {
                    divisor = 1.0;
                }
            }
            if node.normalize {
                mixed /= divisor;
            }
            out[j] += node.lambda * mixed;
        }
        deltas
            .into_iter()
            .for_each(crate::executor::scratch::give_f64);
    }

    #[test]
    fn group_cursors_walk_the_groups_of_consecutive_elements() {
        for group in [
            GroupOf::Whole,
            GroupOf::Rows(1),
            GroupOf::Rows(7),
            GroupOf::Rows(64),
            GroupOf::Columns(1),
            GroupOf::Columns(5),
            GroupOf::Columns(300),
        ] {
            for first in [0, 1, 6, 7, 299, 300, 1001] {
                let mut c = GroupCursor::new(group, first);
                for i in first..first + 700 {
                    assert_eq!(c.next(), group.of(i), "{group:?} from {first}, element {i}");
                }
            }
        }
    }

    #[test]
    fn fused_keys_are_the_keys_of_the_evaluated_difference() {
        // Not a multiple of 8: the masked tail runs too.
        let n = 1003;
        let mut s = 0x2545f4914f6cdd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut base: Vec<f32> = (0..n).map(|_| next()).collect();
        let mut a: Vec<f32> = base.iter().map(|&b| b + next() * 1e-2).collect();
        let b: Vec<f32> = (0..n).map(|_| next()).collect();
        // Equal to the base (δ = +0 or −0), and non-finite inputs on either side.
        a[3] = base[3];
        (a[4], base[4]) = (-0.0, 0.0);
        a[7] = f32::NEG_INFINITY;
        a[8] = f32::NAN;
        // Magnitudes far apart (the exact difference not an f64), and a float32 subnormal.
        (a[9], base[9]) = (1.5e30, -3.0e-20);
        (a[10], base[10]) = (1e-40, 2e-45);
        let finite = base.clone();
        base[5] = f32::INFINITY;
        base[6] = f32::NAN;
        // With every reference value finite (16 keys per step for θ − θ_ref), and with some not.
        for base in [&finite, &base] {
            let x = ChunkInputs::new(vec![base, &a, &b], 0, 0);
            let single = [
                vec![-1.0, 1.0, 0.0],
                // |δ| rounds in float32 (the key is of the rounded value).
                vec![-(1.0 + 2f64.powi(-40)), 1.0 + 2f64.powi(-40), 0.0],
                // Σ c ≠ 0: the reference's own term.
                vec![0.25, 0.0, -3.0],
            ];
            for c in &single {
                let v = Val::Lin(c.clone());
                let mut d = vec![0.0; n];
                v.eval(&x, &mut d);
                for desc in [false, true] {
                    let mut want = Vec::new();
                    crate::selection::magnitude_keys(&d, FloatType::F32, desc, &mut want);
                    for level in crate::simd::available() {
                        let mut got = vec![7; 3];
                        if v.f32_keys_fused(level, &x, desc, &mut got) {
                            assert_eq!(got, want, "{level} {c:?} desc {desc}");
                        } else {
                            assert_ne!(level, crate::simd::Level::Avx512, "{c:?}");
                        }
                    }
                }
            }
        }
        // Not a single difference: never fused.
        let x = ChunkInputs::new(vec![&finite, &a, &b], 0, 0);
        for v in [
            Val::Lin(vec![-1.0, 0.5, 0.5]),
            Val::Lin(vec![1.0, 0.0, 0.0]),
            Val::axpby(
                1.0,
                &Val::leaf(1, 3),
                1.0,
                &Val::Node(Arc::new(Node::Mix(vec![]))),
            ),
        ] {
            for level in crate::simd::available() {
                assert!(!v.f32_keys_fused(level, &x, false, &mut Vec::new()));
            }
        }
    }

    #[test]
    fn column_wise_election_gives_the_bits_of_the_row_wise_definition() {
        // Not a multiple of 8 or 16: every vector kernel's tail runs too.
        let n = 3003;
        let first = 70_000u64;
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        // A base and four fine-tunes; some elements equal to the base, some of opposite signs.
        let base: Vec<f32> = (0..n)
            .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let models: Vec<Vec<f32>> = (0..10)
            .map(|_| {
                base.iter()
                    .map(|&b| match next() % 5 {
                        0 => b,
                        _ => b + ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2,
                    })
                    .collect()
            })
            .collect();
        // Planted exact cancellations: δ_0 = +h, δ_1 = −h, δ_2 = δ_3 = 0, so that with equal weights on
        // models 0 and 1 the elected sum is exactly 0 (which counts as positive).
        let (mut base, mut models) = (base, models);
        // Runs of 4 from every 37th element: equal keys side by side, so that a bound's index inside
        // a run decides between neighbours.
        for j in (0..n).filter(|j| j % 37 < 4) {
            base[j] = (j % 64) as f32 / 1024.0 - 0.03125;
            models[0][j] = base[j] + 1.0 / 256.0;
            models[1][j] = base[j] - 1.0 / 256.0;
            for k in 2..10 {
                models[k][j] = base[j];
            }
        }
        for j in (0..n).step_by(41).filter(|j| j % 37 >= 4) {
            base[j] = (j % 64) as f32 / 1024.0 - 0.03125;
            models[2][j] = base[j] + 1.0 / 256.0;
        }
        // Non-finite inputs (a merge that allows them): NaN and ±∞ go through every operation too.
        // The fused sweep has a plainer form for finite reference values: both are run.
        models[3][7] = f32::NEG_INFINITY;
        models[0][8] = f32::NAN;
        // −0 − +0 = −0, which `combine` turns into +0.
        (models[1][10], base[10]) = (-0.0, 0.0);
        let finite = base.clone();
        base[5] = f32::INFINITY;
        base[6] = f32::NAN;
        for base in [&finite, &base] {
            let mut leaves = vec![base.as_slice()];
            leaves.extend(models.iter().map(|v| v.as_slice()));
            let x = ChunkInputs::new(leaves, 0, first as usize);
            // Every third task vector is (1 + 2⁻⁴⁰)·(θ − θ_base): where its model is 1/256 from the
            // base (planted for task vector 2 at every 41st element below), |δ| rounds to 1/256 in
            // float32 only, so a mask ranking the unrounded |δ| would differ from mergekit's at a bound
            // on 1/256. The tenth is a weighted sum of two models' differences.
            let delta = |i: usize| {
                let mut c = vec![0.0; 11];
                if i == 9 {
                    c[0] = -1.0;
                    c[10] = 0.75;
                    c[3] = 0.25;
                } else {
                    let k = if i % 3 == 2 {
                        1.0 + 2f64.powi(-40)
                    } else {
                        1.0
                    };
                    c[0] = -k;
                    c[i + 1] = k;
                }
                Val::Lin(c)
            };
            // The ranked masks' bounds sit on |δ| = 1/256, which the planted δ_0 and δ_1 hit exactly (in
            // runs of 4 from every 37th element), so that ties at a bound are decided by index on both
            // sides of it.
            let mid = magnitude_key(1.0 / 256.0, false);
            let mask: Vec<u64> = (0..(first as usize + n).div_ceil(64))
                .map(|_| next())
                .collect();
            let keeps = [
                Keep::Ranked {
                    desc: false,
                    compute: FloatType::F32,
                    // Bounds at planted elements (in runs from multiples of 37): the bound element itself
                    // is kept, the one before it not.
                    lo: Some((mid, first + 37 * 3 + 2)),
                    hi: (u64::MAX, u64::MAX),
                },
                Keep::Ranked {
                    desc: true,
                    compute: FloatType::F32,
                    lo: None,
                    hi: (!mid, first + 37 * 6),
                },
                Keep::Random {
                    stream: 7,
                    threshold: u64::MAX / 3,
                },
                Keep::Mask(Arc::new(mask)),
                Keep::All,
                Keep::Nothing,
                Keep::Ranked {
                    desc: false,
                    compute: FloatType::BF16,
                    lo: None,
                    hi: (mid, first + 2000),
                },
            ];
            for (case, (consensus, normalize, rescale, weights)) in [
                (
                    true,
                    true,
                    [1.0, 2.5, 1.0, 0.75],
                    [0.3, -0.2, 0.45, 0.1 + 0.2],
                ),
                (true, false, [1.0; 4], [0.3, -0.2, 0.45, 0.1 + 0.2]),
                (true, true, [1.0; 4], [0.25, 0.25, 0.5, 0.125]),
                (
                    false,
                    true,
                    [2.0, 1.0, 1.0, 1.0],
                    [0.3, -0.2, 0.45, 0.1 + 0.2],
                ),
                (false, false, [1.0; 4], [0.3, -0.2, 0.45, 0.1 + 0.2]),
            ]
            .into_iter()
            .enumerate()
            {
                // Every kind of mask, then only those of the fused AVX-512 sweep (ranked in float32, all,
                // nothing), with 1 to 8 task vectors in it and more beyond it.
                let fusable = [0, 1, 4, 5].map(|i| keeps[i].clone());
                let (all, fusable) = (&keeps[..], &fusable[..]);
                let cases = [4, 10]
                    .into_iter()
                    .flat_map(|m| (0..all.len()).map(move |k| (all, m, k)))
                    .chain(
                        [1, 4, 8, 10]
                            .into_iter()
                            .flat_map(|m| (0..fusable.len()).map(move |k| (fusable, m, k))),
                    );
                for (masks, m, k) in cases {
                    let mut base_coefs = vec![0.0; 11];
                    base_coefs[0] = 1.0;
                    let node = TaskVectorNode {
                        base: Val::Lin(base_coefs),
                        deltas: (0..m).map(delta).collect(),
                        keep: (0..m)
                            .map(|i| masks[(k + i) % masks.len()].clone())
                            .collect(),
                        rescale: (0..m).map(|i| rescale[i % 4]).collect(),
                        weights: (0..m).map(|i| weights[i % 4]).collect(),
                        compute: FloatType::F32,
                        consensus,
                        normalize,
                        lambda: 0.9,
                    };
                    let mut want = vec![0.0; n];
                    row_wise(&node, &x, &mut want);
                    for level in crate::simd::available() {
                        let mut got = vec![f64::NAN; n];
                        node.eval_at(level, &x, &mut got);
                        for j in 0..n {
                            assert_eq!(
                                got[j].to_bits(),
                                want[j].to_bits(),
                                "{level}: case {case}, {m} models, masks from {k}, element {j}"
                            );
                        }
                    }
                    // The fused sweep takes exactly the usual forms, where the CPU has it.
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::detected() == crate::simd::Level::Avx512 {
                        let mut got = vec![f64::NAN; n];
                        let fused = node.fused_avx512(&x, &mut got);
                        // (10 task vectors: too many, and one of two terms.)
                        assert_eq!(fused, masks.len() == fusable.len() && m <= 8, "{m} models");
                        if fused {
                            for j in 0..n {
                                assert_eq!(
                                    got[j].to_bits(),
                                    want[j].to_bits(),
                                    "fused: element {j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
