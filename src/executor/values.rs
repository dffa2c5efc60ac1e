//! What a step is, for one tensor, once its statistics are known: either a fixed weighted sum of the
//! input models ([`Val::Lin`], evaluated by [`kernels::combine`] as before any other method existed), or
//! an element-wise node over other values (masks, sign election, per-row coefficients), evaluated chunk
//! by chunk in f64.

use std::sync::Arc;

use crate::format::FloatType;
use crate::kernels;
use crate::selection::{bernoulli_keep, magnitude_key};

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
                        for (j, (o, t)) in out.iter_mut().zip(&tmp).enumerate() {
                            *o += coefs[group.of(x.first + j)] * t;
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
    /// operations in the same order as the row-wise definition: the masks, then Σ_i in model order of
    /// the kept (and, with consensus, sign-agreeing) w_i·δ_i and of their weights.
    fn eval(&self, x: &ChunkInputs, out: &mut [f64]) {
        if self.compute != FloatType::F32 {
            return self.eval_rounded(x, out);
        }
        let n = out.len();
        let m = self.deltas.len();
        let mut deltas: Vec<Vec<f64>> = (0..m).map(|_| super::scratch::f64s(n)).collect();
        for (d, v) in deltas.iter_mut().zip(&self.deltas) {
            v.eval(x, d);
        }
        // Sparsify each task vector in place.
        for (i, d) in deltas.iter_mut().enumerate() {
            let keep = &self.keep[i];
            for (j, v) in d.iter_mut().enumerate() {
                if !keep.keeps(*v, (x.first + j) as u64) {
                    *v = 0.0;
                }
            }
        }
        // The election's operands as mergekit has them: each rounded to the compute dtype, as are the
        // rescale factors and weights, and each product.
        let c = self.compute;
        let factor: Vec<Option<f32>> = self
            .rescale
            .iter()
            .map(|&s| (s != 1.0).then(|| c.round_f64(s)))
            .collect();
        let w32: Vec<f32> = self.weights.iter().map(|&w| c.round_f64(w)).collect();
        let mut elected = vec![0f32; m];
        self.base.eval(x, out);
        for j in 0..n {
            let (mut mixed, mut divisor) = (0.0, 0.0);
            if self.consensus {
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
                        mixed += d[j] * self.rescale[i] * self.weights[i];
                        divisor += self.weights[i];
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                for (i, d) in deltas.iter().enumerate() {
                    mixed += d[j] * self.rescale[i] * self.weights[i];
                    divisor += self.weights[i];
                }
                if divisor.abs() < 1e-8 {
                    divisor = 1.0;
                }
            }
            if self.normalize {
                mixed /= divisor;
            }
            out[j] += self.lambda * mixed;
        }
        deltas.into_iter().for_each(super::scratch::give_f64);
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
