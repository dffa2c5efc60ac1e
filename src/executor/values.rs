//! What a step is, for one tensor, once its statistics are known: either a fixed weighted sum of the
//! input models ([`Val::Lin`], evaluated by [`kernels::combine`] as before any other method existed), or
//! an element-wise node over other values (masks, sign election, per-row coefficients), evaluated chunk
//! by chunk in f64.

use std::sync::Arc;

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
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keep {
    All,
    Nothing,
    /// Ranked by (key, index) with `magnitude_key(desc)`: kept if between `lo` and `hi` inclusive.
    Ranked {
        desc: bool,
        lo: Option<(u64, u64)>,
        hi: (u64, u64),
    },
    Random {
        stream: u64,
        threshold: u64,
    },
}

impl Keep {
    #[inline]
    pub fn keeps(&self, delta: f64, index: u64) -> bool {
        match *self {
            Keep::All => true,
            Keep::Nothing => false,
            Keep::Ranked { desc, lo, hi } => {
                let k = (magnitude_key(delta, desc), index);
                k <= hi && lo.is_none_or(|lo| k >= lo)
            }
            Keep::Random { stream, threshold } => bernoulli_keep(stream, index, threshold),
        }
    }
}

#[derive(Debug)]
pub(crate) struct TaskVectorNode {
    pub base: Val,
    /// δ_i = θ_i − θ_b.
    pub deltas: Vec<Val>,
    pub keep: Vec<Keep>,
    /// w_i times the rescale factor of model i.
    pub scaled_weights: Vec<f64>,
    pub weights: Vec<f64>,
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
                    let mut tmp = vec![0f64; out.len()];
                    for (v, w) in terms {
                        v.eval(x, &mut tmp);
                        out.iter_mut().zip(&tmp).for_each(|(o, t)| *o += w * t);
                    }
                }
                Node::Grouped { terms, group } => {
                    out.fill(0.0);
                    let mut tmp = vec![0f64; out.len()];
                    for (v, coefs) in terms {
                        v.eval(x, &mut tmp);
                        for (j, (o, t)) in out.iter_mut().zip(&tmp).enumerate() {
                            *o += coefs[group.of(x.first + j)] * t;
                        }
                    }
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
        let n = out.len();
        let m = self.deltas.len();
        let mut deltas = vec![vec![0f64; n]; m];
        for (d, v) in deltas.iter_mut().zip(&self.deltas) {
            v.eval(x, d);
        }
        // Sparsify, rescale and weight each task vector in place.
        for (i, d) in deltas.iter_mut().enumerate() {
            mask_and_weight(self.keep[i], self.scaled_weights[i], x.first as u64, d);
        }
        self.base.eval(x, out);
        let mut mixed = vec![0f64; n];
        let mut divisor = vec![0f64; n];
        if self.consensus {
            // The elected sign: that of Σ_i w_i·δ_i (zero counts as positive).
            let mut total = vec![0f64; n];
            for d in &deltas {
                total.iter_mut().zip(d).for_each(|(t, &v)| *t += v);
            }
            // Branch-free: an element that does not agree adds +0.0, which changes neither sum (both
            // start at +0.0 and so never hold −0.0).
            for (d, &w) in deltas.iter().zip(&self.weights) {
                for (((mx, dv), &t), &v) in mixed.iter_mut().zip(&mut divisor).zip(&total).zip(d) {
                    let positive = t >= 0.0;
                    let agrees = (v > 0.0) & positive | (v < 0.0) & !positive;
                    let bits = 0u64.wrapping_sub(agrees as u64);
                    *mx += f64::from_bits(v.to_bits() & bits);
                    *dv += f64::from_bits(w.to_bits() & bits);
                }
            }
            divisor
                .iter_mut()
                .filter(|dv| **dv == 0.0)
                .for_each(|dv| *dv = 1.0);
        } else {
            for d in &deltas {
                mixed.iter_mut().zip(d).for_each(|(mx, &v)| *mx += v);
            }
            let mut all = 0.0;
            for &w in &self.weights {
                all += w;
            }
            divisor.fill(if all.abs() < 1e-8 { 1.0 } else { all });
        }
        for ((o, &mx), &dv) in out.iter_mut().zip(&mixed).zip(&divisor) {
            let mx = if self.normalize { mx / dv } else { mx };
            *o += self.lambda * mx;
        }
    }
}

/// δ ← w·δ where `keep` keeps it, else 0; `first` is the flat index of `d[0]`.
fn mask_and_weight(keep: Keep, w: f64, first: u64, d: &mut [f64]) {
    match keep {
        Keep::All => d.iter_mut().for_each(|v| *v *= w),
        Keep::Nothing => d.fill(0.0),
        // The ranked masks, element by element as [`Keep::keeps`] decides, without its dispatch.
        Keep::Ranked { desc, lo: None, hi } => {
            for (j, v) in d.iter_mut().enumerate() {
                let k = magnitude_key(*v, desc);
                let kept = (k < hi.0) | (k == hi.0) & (first + j as u64 <= hi.1);
                // Branch-free select of w·δ or +0.0.
                *v = f64::from_bits((*v * w).to_bits() & 0u64.wrapping_sub(kept as u64));
            }
        }
        _ => {
            for (j, v) in d.iter_mut().enumerate() {
                *v = if keep.keeps(*v, first + j as u64) {
                    *v * w
                } else {
                    0.0
                };
            }
        }
    }
}
