//! Each step of a plan, for the tensors of one unit: its statistics passes (Gram matrices, rank
//! selections, norms) and its [`Val`]. Every pass reads the tensor in fixed chunks and adds the chunks'
//! partial results in chunk order, so results do not depend on the thread count.

use std::sync::Arc;

use rayon::prelude::*;

use super::values::{ChunkInputs, GroupCursor, GroupOf, Keep, Node, TaskVectorNode, Val};
use super::{MergeError, OutTensor, Prepared, Treatment, BLOCK, CHUNK, SUB};
use crate::format::FloatType;
use crate::kernels;
use crate::progress::Progress;
use crate::recipe::{Angle, Grouping, Operand, Sparsify, StepKind, TaskVectorStep};
use crate::selection::{
    magnitude_keys, probability_threshold, stream_key, torch_sort_select, window_from_sample, Pass,
    RankSelect, WindowPart, WINDOW_CAP,
};

/// Data passes a step makes over each tensor before the writing pass (for `--dry-run` and progress; rank
/// selections usually take two, all models together: a pass over a window of keys guessed from a
/// sample, then a look into the one chunk that holds the answer, counted as a whole pass. When the
/// histogram passes run instead, progress counts them within those two).
pub(super) fn passes(kind: &StepKind) -> usize {
    match kind {
        StepKind::Slerp { .. }
        | StepKind::ModelStock { .. }
        | StepKind::WeightSlerp { .. }
        | StepKind::NuSlerp { .. } => 1,
        StepKind::TaskVectors(tv) => match tv.sparsify {
            Sparsify::None => 0,
            Sparsify::Random => tv.rescale as usize,
            Sparsify::Magnitude | Sparsify::MagnitudeOutliers => {
                SELECTION_PASSES + tv.rescale as usize
            }
        },
        _ => 0,
    }
}

/// Passes counted for a rank selection ([`passes`]).
const SELECTION_PASSES: usize = 2;

/// Forwards at most `left` units of progress; [`Budget::finish`] adds what is left unspent, so that a
/// stage counts what [`passes`] promised whatever number of passes it took.
struct Budget<'a> {
    inner: &'a dyn Progress,
    left: std::sync::atomic::AtomicU64,
}

impl<'a> Budget<'a> {
    fn new(inner: &'a dyn Progress, units: u64) -> Self {
        Self {
            inner,
            left: units.into(),
        }
    }

    fn finish(self) {
        self.inner.advance(self.left.into_inner());
    }
}

impl Progress for Budget<'_> {
    fn start(&self, phase: &str, total: u64, unit: crate::progress::Unit) {
        self.inner.start(phase, total, unit);
    }

    fn advance(&self, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut left = self.left.load(Relaxed);
        loop {
            let take = n.min(left);
            match self
                .left
                .compare_exchange(left, left - take, Relaxed, Relaxed)
            {
                Ok(_) => return self.inner.advance(take),
                Err(now) => left = now,
            }
        }
    }
}

impl Prepared<'_> {
    fn leaves(&self) -> usize {
        self.models.len()
    }

    /// Every step's value for every tensor of a unit (`[tensor][step]`), running the passes they need.
    pub(super) fn unit_values(
        &self,
        unit: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<Vec<Val>>, MergeError> {
        let all = &self.units[unit];
        let mut per_tensor: Vec<Vec<Val>> =
            vec![Vec::with_capacity(self.plan.steps.len()); all.len()];
        for step in &self.plan.steps {
            if let StepKind::Slerp {
                base,
                models,
                lambdas,
                angle,
            } = &step.kind
            {
                self.slerp_unit(
                    all,
                    &mut per_tensor,
                    *base,
                    models,
                    lambdas,
                    *angle,
                    progress,
                )?;
                continue;
            }
            for (pos, &ti) in all.iter().enumerate() {
                let t = &self.tensors[ti];
                let v = if matches!(t.treatment, Treatment::Merge { .. }) {
                    self.step_value(t, &step.kind, &per_tensor[pos], progress)?
                } else {
                    Val::leaf(self.plan.base, self.leaves())
                };
                per_tensor[pos].push(v);
            }
        }
        Ok(per_tensor)
    }

    /// WARP's SLERP: one angle per group (a layer, or each tensor), from the Gram matrix of the task vectors.
    fn slerp_unit(
        &self,
        all: &[usize],
        per_tensor: &mut [Vec<Val>],
        base: Operand,
        models: &[Operand],
        lambdas: &[f64],
        angle: Angle,
        progress: &dyn Progress,
    ) -> Result<(), MergeError> {
        let deltas: Vec<Vec<Val>> = per_tensor
            .iter()
            .map(|sv| {
                let b = self.value(base, sv);
                models
                    .iter()
                    .map(|&m| Val::axpby(1.0, &self.value(m, sv), -1.0, &b))
                    .collect()
            })
            .collect();
        let m = models.len();
        let mut grams: Vec<Vec<Vec<f64>>> = Vec::with_capacity(all.len());
        for (pos, &ti) in all.iter().enumerate() {
            let t = &self.tensors[ti];
            if matches!(t.treatment, Treatment::Merge { .. }) {
                grams.push(
                    self.gram(t, &deltas[pos], GroupOf::Whole, progress)?
                        .remove(0),
                );
            } else {
                grams.push(vec![vec![0.0; m]; m]);
            }
        }
        let layer_gram = (angle == Angle::Layer).then(|| {
            let mut g = vec![vec![0.0; m]; m];
            for t in &grams {
                add_matrix(&mut g, t);
            }
            g
        });
        for (pos, sv) in per_tensor.iter_mut().enumerate() {
            let g = layer_gram.as_ref().unwrap_or(&grams[pos]);
            let r = kernels::slerp_chain(g, lambdas);
            let mut terms = vec![(self.value(base, sv), 1.0)];
            terms.extend(deltas[pos].iter().cloned().zip(r));
            sv.push(Val::sum(terms, self.leaves()));
        }
        Ok(())
    }

    /// The value of one step for one merged tensor, given the earlier steps' values.
    fn step_value(
        &self,
        t: &OutTensor,
        kind: &StepKind,
        sv: &[Val],
        progress: &dyn Progress,
    ) -> Result<Val, MergeError> {
        // In a layer layout (whose plan has one step), each tensor is computed by its slice's own kind
        // where the slice has one, limited to the slice's sources.
        let restricted;
        let kind = match &self.plan.layout {
            Some(slices) => {
                debug_assert_eq!(self.plan.steps.len(), 1);
                let own = t.slice.and_then(|s| slices[s].kind.as_ref());
                restricted = restrict(t, own.unwrap_or(kind))?;
                &restricted
            }
            None => kind,
        };
        let name = t.base.name.as_str();
        let at = |p: &crate::methods::Param, default: f64| p.or_default(name, t.t, default);
        let at_model =
            |op, p: &crate::methods::Param, default: f64| p.or_default(t.name_in(op), t.t, default);
        let n = self.leaves();
        Ok(match kind {
            StepKind::Weighted { terms } => Val::sum(
                terms
                    .iter()
                    .map(|(op, w)| (self.value(*op, sv), *w))
                    .collect(),
                n,
            ),
            StepKind::Liti { base, model, etas } => {
                let e = etas[0];
                Val::axpby(1.0 - e, &self.value(*base, sv), e, &self.value(*model, sv))
            }
            StepKind::Linear {
                models,
                weights,
                normalize,
            } => {
                let mut w: Vec<f64> = weights
                    .iter()
                    .zip(models)
                    .map(|(p, &op)| at_model(op, p, 0.0))
                    .collect();
                if *normalize {
                    let total: f64 = w.iter().sum();
                    if total == 0.0 {
                        return Err(MergeError::Method {
                            tensor: name.into(),
                            message: "the weights sum to 0: cannot normalize".into(),
                        });
                    }
                    w.iter_mut().for_each(|x| *x /= total);
                }
                Val::sum(
                    models.iter().map(|op| self.value(*op, sv)).zip(w).collect(),
                    n,
                )
            }
            StepKind::Passthrough { models, scale } => {
                if models.len() != 1 {
                    return Err(MergeError::Method {
                        tensor: name.into(),
                        message: format!(
                            "passthrough copies one model, got {} (several only with `slices`)",
                            models.len()
                        ),
                    });
                }
                Val::sum(
                    vec![(
                        self.value(models[0], sv),
                        at_model(models[0], &scale[0], 1.0),
                    )],
                    n,
                )
            }
            StepKind::TaskVectors(tv) => self.task_vectors(t, tv, sv, progress)?,
            StepKind::ModelStock {
                base,
                models,
                filter_wise,
            } => {
                let b = self.value(*base, sv);
                let ms: Vec<Val> = models.iter().map(|&m| self.value(m, sv)).collect();
                let deltas: Vec<Val> = ms.iter().map(|x| Val::axpby(1.0, x, -1.0, &b)).collect();
                let group = if *filter_wise {
                    GroupOf::Rows(*t.base.shape.last().unwrap_or(&1).max(&1))
                } else {
                    GroupOf::Whole
                };
                let grams = self.gram(t, &deltas, group, progress)?;
                let k = ms.len() as f64;
                let ts: Vec<f64> = grams.iter().map(|g| kernels::model_stock_t(g)).collect();
                let mut terms = vec![(b, ts.iter().map(|t| 1.0 - t).collect::<Vec<f64>>())];
                for x in ms {
                    terms.push((x, ts.iter().map(|t| t / k).collect()));
                }
                grouped(terms, group, n)
            }
            StepKind::WeightSlerp { base, other, t: tp } => {
                let vals = vec![self.value(*base, sv), self.value(*other, sv)];
                let g = self.gram(t, &vals, GroupOf::Whole, progress)?.remove(0);
                let (ca, cb) = kernels::weight_slerp(g[0][1], g[0][0], g[1][1], at(tp, 0.5));
                Val::sum(vals.into_iter().zip([ca, cb]).collect(), n)
            }
            StepKind::NuSlerp {
                base,
                models,
                weights,
                grouping,
            } => {
                let (w0, w1) = (
                    at_model(models[0], &weights[0], 0.0),
                    at_model(models[1], &weights[1], 0.0),
                );
                let lambda = if (w0 + w1).abs() < 1e-6 {
                    0.5
                } else {
                    w1 / (w0 + w1)
                };
                let ms: Vec<Val> = models.iter().map(|&m| self.value(m, sv)).collect();
                let b = base.map(|b| self.value(b, sv));
                let vecs: Vec<Val> = match &b {
                    Some(b) => ms.iter().map(|x| Val::axpby(1.0, x, -1.0, b)).collect(),
                    None => ms,
                };
                let shape = &t.base.shape;
                let group = match grouping {
                    Grouping::Tensor => GroupOf::Whole,
                    Grouping::Rows => GroupOf::Rows(*shape.last().unwrap_or(&1).max(&1)),
                    Grouping::Columns => GroupOf::Columns(
                        (t.base.numel() / shape.first().copied().unwrap_or(1).max(1)).max(1),
                    ),
                };
                let grams = self.gram(t, &vecs, group, progress)?;
                let pairs: Vec<(f64, f64)> = grams
                    .iter()
                    .map(|g| kernels::nuslerp_pair(g[0][1], g[0][0], g[1][1], lambda))
                    .collect();
                let mut terms: Vec<(Val, Vec<f64>)> = Vec::new();
                if let Some(b) = b {
                    terms.push((b, vec![1.0; pairs.len()]));
                }
                terms.push((vecs[0].clone(), pairs.iter().map(|p| p.0).collect()));
                terms.push((vecs[1].clone(), pairs.iter().map(|p| p.1).collect()));
                grouped(terms, group, n)
            }
            StepKind::Slerp { .. } => unreachable!("SLERP runs per unit"),
        })
    }

    /// The task-vector family: sparsify each δ_i (rank selections, random masks), rescale, weight, elect
    /// signs, sum.
    fn task_vectors(
        &self,
        t: &OutTensor,
        tv: &TaskVectorStep,
        sv: &[Val],
        progress: &dyn Progress,
    ) -> Result<Val, MergeError> {
        let name = t.base.name.as_str();
        let at = |p: &crate::methods::Param, default: f64| p.or_default(name, t.t, default);
        // Model i's parameters match their filters against its own tensor name.
        let at_model = |i: usize, p: &crate::methods::Param, default: f64| {
            p.or_default(t.name_in(tv.models[i]), t.t, default)
        };
        let n = self.leaves();
        let numel = t.base.numel() as u64;
        let base = self.value(tv.base, sv);
        let deltas: Vec<Val> = tv
            .models
            .iter()
            .map(|&m| Val::axpby(1.0, &self.value(m, sv), -1.0, &base))
            .collect();
        let weights: Vec<f64> = (0..tv.weights.len())
            .map(|i| at_model(i, &tv.weights[i], 1.0))
            .collect();
        let lambda = at(&tv.lambda, 1.0);
        // A plain weighted sum, exact; mergekit's 16-bit arithmetic needs the node (below).
        if tv.sparsify == Sparsify::None && !tv.consensus && t.compute == FloatType::F32 {
            let divisor: f64 = weights.iter().sum();
            let divisor = if !tv.normalize || divisor.abs() < 1e-8 {
                1.0
            } else {
                divisor
            };
            let mut terms = vec![(base, 1.0)];
            terms.extend(
                deltas
                    .into_iter()
                    .zip(weights.iter().map(|w| lambda * w / divisor)),
            );
            return Ok(Val::sum(terms, n));
        }
        // Which ranks each task vector's mask needs: (model, rank, descending); found together, in shared
        // passes. A tensor small enough is sorted in memory instead, in torch's own order (`sorted`: model,
        // descending, kept positions of the order), so that equal magnitudes at the threshold are kept
        // exactly as mergekit keeps them.
        let in_memory = numel <= self.plan.torch_order_cap;
        let mut targets: Vec<(usize, u64, bool)> = Vec::new();
        let mut sorted: Vec<(usize, bool, std::ops::Range<u64>)> = Vec::new();
        let mut plans = Vec::with_capacity(deltas.len());
        let compute = t.compute;
        for i in 0..deltas.len() {
            let density = at_model(i, &tv.density[i], 1.0);
            // A tensor without elements keeps them all: there is nothing to rank.
            let plan = if density >= 1.0 || tv.sparsify == Sparsify::None || numel == 0 {
                Keep::All
            } else if density <= 0.0 {
                Keep::Nothing
            } else {
                match tv.sparsify {
                    Sparsify::None => Keep::All,
                    Sparsify::Magnitude => {
                        let kept = ((density * numel as f64).floor() as u64).clamp(1, numel);
                        if in_memory {
                            sorted.push((i, true, 0..kept));
                            Keep::Nothing // replaced by the sorted mask below
                        } else {
                            targets.push((i, kept - 1, true));
                            Keep::Ranked {
                                desc: true,
                                compute,
                                lo: None,
                                hi: (0, 0),
                            }
                        }
                    }
                    Sparsify::MagnitudeOutliers => {
                        let target = (density * numel as f64).floor() as u64;
                        let top = (at_model(i, &tv.gamma[i], 0.01) * numel as f64).floor() as u64;
                        let bottom = numel.saturating_sub(target + top);
                        if target == 0 {
                            Keep::Nothing
                        } else if in_memory {
                            sorted.push((i, false, bottom..(bottom + target).min(numel)));
                            Keep::Nothing // replaced by the sorted mask below
                        } else {
                            targets.push((i, bottom, false));
                            targets.push((i, (bottom + target - 1).min(numel - 1), false));
                            Keep::Ranked {
                                desc: false,
                                compute,
                                lo: Some((0, 0)),
                                hi: (0, 0),
                            }
                        }
                    }
                    Sparsify::Random => Keep::Random {
                        stream: stream_key(tv.seed, name, i),
                        threshold: probability_threshold(density),
                    },
                }
            };
            plans.push(plan);
        }
        let budget = Budget::new(
            progress,
            if tv.sparsify.ranks() {
                SELECTION_PASSES as u64 * t.bytes_of(t.base.numel())
            } else {
                0
            },
        );
        let found = self.select_many(t, &deltas, &targets, &budget)?;
        let mut found = targets.iter().zip(found);
        let mut keep: Vec<Keep> = plans
            .into_iter()
            .map(|k| match k {
                Keep::Ranked {
                    desc, compute, lo, ..
                } => {
                    let lo = lo.map(|_| found.next().expect("a lower rank").1);
                    let hi = found.next().expect("an upper rank").1;
                    Keep::Ranked {
                        desc,
                        compute,
                        lo,
                        hi,
                    }
                }
                other => other,
            })
            .collect();
        for ((i, _, _), mask) in sorted.iter().zip(self.sorted_masks(t, &deltas, &sorted)?) {
            keep[*i] = Keep::Mask(mask);
        }
        budget.finish();
        let rescaled: Vec<usize> = (0..deltas.len())
            .filter(|&i| tv.rescale && !matches!(keep[i], Keep::All | Keep::Nothing))
            .collect();
        let norms = self.l1_norms(t, &deltas, &keep, &rescaled, progress)?;
        let mut rescale = vec![1.0; deltas.len()];
        for (&i, (all, kept)) in rescaled.iter().zip(norms) {
            if compute == FloatType::F32 {
                if all >= 1e-7 && kept >= 1e-7 {
                    rescale[i] = all / kept;
                }
            } else {
                // mergekit's norms and their quotient are 16-bit numbers too.
                let (all, kept) = (compute.round_f64(all), compute.round_f64(kept));
                if all >= 1e-7 && kept >= 1e-7 {
                    rescale[i] = compute.round_f32(all / kept) as f64;
                }
            }
        }
        Ok(Val::Node(Arc::new(Node::TaskVectors(TaskVectorNode {
            base,
            deltas,
            keep,
            rescale,
            weights,
            compute,
            consensus: tv.consensus,
            normalize: tv.normalize,
            lambda,
        }))))
    }

    /// One pass over a tensor: per chunk `c` (in parallel, blocks of [`BLOCK`] chunks) for which
    /// `wanted(c)`, the inputs `vals` need are decoded sub-block by sub-block and folded: `start(lo)`
    /// makes the chunk's state, `step(state, inputs)` takes each sub-block, and `finish` turns the state
    /// into what `sink(c, _)` receives in chunk order (`None` for chunks not wanted).
    #[allow(clippy::too_many_arguments)]
    fn chunk_fold<S, A: Send>(
        &self,
        t: &OutTensor,
        progress: &dyn Progress,
        vals: &[Val],
        wanted: impl Fn(usize) -> bool + Sync,
        start: impl Fn(usize) -> S + Sync,
        step: impl Fn(&mut S, &ChunkInputs) + Sync,
        finish: impl Fn(S) -> A + Sync,
        mut sink: impl FnMut(usize, Option<A>),
    ) -> Result<(), MergeError> {
        let needed = self.needed_leaves(t, vals);
        let numel = t.base.numel();
        let chunks = numel.div_ceil(CHUNK);
        for block_start in (0..chunks).step_by(BLOCK) {
            let block_end = (block_start + BLOCK).min(chunks);
            let parts: Vec<Option<A>> = (block_start..block_end)
                .into_par_iter()
                .map(|c| {
                    if !wanted(c) {
                        return Ok(None);
                    }
                    let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(numel));
                    let mut state = start(lo);
                    self.with_sub_blocks(t, &needed, lo, hi, |x| {
                        step(&mut state, x);
                        Ok(())
                    })?;
                    Ok(Some(finish(state)))
                })
                .collect::<Result<_, MergeError>>()?;
            for (k, p) in parts.into_iter().enumerate() {
                sink(block_start + k, p);
            }
            let (lo, hi) = (block_start * CHUNK, (block_end * CHUNK).min(numel));
            progress.advance(t.bytes_of(hi - lo));
        }
        Ok(())
    }

    /// [`Self::chunk_fold`] with each chunk's `vals` evaluated whole: `f(lo, values)` per wanted chunk.
    fn chunk_pass<A: Send>(
        &self,
        t: &OutTensor,
        progress: &dyn Progress,
        vals: &[Val],
        wanted: impl Fn(usize) -> bool + Sync,
        f: impl Fn(usize, &[Vec<f64>]) -> A + Sync,
        sink: impl FnMut(usize, Option<A>),
    ) -> Result<(), MergeError> {
        let numel = t.base.numel();
        self.chunk_fold(
            t,
            progress,
            vals,
            wanted,
            |lo| {
                let n = (numel - lo).min(CHUNK);
                let values: Vec<Vec<f64>> = vals.iter().map(|_| super::scratch::f64s(n)).collect();
                (lo, values)
            },
            |(lo, values), x| {
                let at = x.first - *lo;
                let n = x.views[x.reference].len();
                for (v, out) in vals.iter().zip(values.iter_mut()) {
                    v.eval(x, &mut out[at..at + n]);
                }
            },
            |(lo, values)| {
                let result = f(lo, &values);
                values.into_iter().for_each(super::scratch::give_f64);
                result
            },
            sink,
        )
    }

    /// The f64 Gram matrix of `vals` per group (`[group][i][j]`).
    fn gram(
        &self,
        t: &OutTensor,
        vals: &[Val],
        group: GroupOf,
        progress: &dyn Progress,
    ) -> Result<Vec<Vec<Vec<f64>>>, MergeError> {
        let m = vals.len();
        let numel = t.base.numel();
        let mut grams = vec![vec![vec![0.0; m]; m]; group.count(numel)];
        if let GroupOf::Whole = group {
            // Partial sums carried from sub-block to sub-block, added up per chunk.
            self.chunk_fold(
                t,
                progress,
                vals,
                |_| true,
                |lo| {
                    let n = SUB.min(numel - lo);
                    let values: Vec<Vec<f64>> =
                        vals.iter().map(|_| super::scratch::f64s(n)).collect();
                    (vec![[0.0; crate::sum::LANES]; m * m], values)
                },
                |(lanes, values), x| {
                    let n = x.views[x.reference].len();
                    for (v, out) in vals.iter().zip(values.iter_mut()) {
                        v.eval(x, &mut out[..n]);
                    }
                    let views: Vec<&[f64]> = values.iter().map(|v| &v[..n]).collect();
                    crate::sum::gram_lanes(&views, lanes);
                },
                |(lanes, values)| {
                    values.into_iter().for_each(super::scratch::give_f64);
                    lanes
                },
                |_, lanes| {
                    if let Some(lanes) = lanes {
                        crate::sum::gram_fold(&lanes, &mut grams[0]);
                    }
                },
            )?;
            return Ok(grams);
        }
        self.chunk_pass(
            t,
            progress,
            vals,
            |_| true,
            |lo, values| {
                let refs: Vec<&[f64]> = values.iter().map(|v| v.as_slice()).collect();
                let n = refs[0].len();
                if n == 0 {
                    return Vec::new();
                }
                // The groups the chunk touches, each in a slot counted from the chunk's first: a run
                // of rows, or the columns from the first one's on (all of them once the chunk is as
                // long as a row). Each group's sums take its elements in order, as before.
                let g0 = group.of(lo);
                let slots = match group {
                    GroupOf::Whole => 1,
                    GroupOf::Rows(len) => (lo + n - 1) / len - g0 + 1,
                    GroupOf::Columns(count) => count.min(n),
                };
                let slot_of = |gi: usize| match group {
                    GroupOf::Columns(count) if gi < g0 => gi + count - g0,
                    _ => gi - g0,
                };
                // Pairs a ≤ b only: x_b·x_a is x_a·x_b (a product commutes exactly), so the sums
                // below the diagonal are those above it, copied at the end.
                let pairs: Vec<(usize, usize)> =
                    (0..m).flat_map(|a| (a..m).map(move |b| (a, b))).collect();
                let p = pairs.len();
                let mut acc = vec![0.0; slots * p];
                let mut cursor = GroupCursor::new(group, lo);
                let mut j = 0;
                while j < n {
                    // A run of elements of one group: the whole rest of a row, or one column element
                    // (whose group the cursor gives without a division).
                    let (gi, run) = match group {
                        GroupOf::Rows(len) => ((lo + j) / len, (len - (lo + j) % len).min(n - j)),
                        _ => (cursor.next(), 1),
                    };
                    let g = &mut acc[slot_of(gi) * p..][..p];
                    match m {
                        2 => pair_sums::<2, 3>(&refs, j..j + run, g),
                        3 => pair_sums::<3, 6>(&refs, j..j + run, g),
                        4 => pair_sums::<4, 10>(&refs, j..j + run, g),
                        _ => {
                            for jj in j..j + run {
                                for (g, &(a, b)) in g.iter_mut().zip(&pairs) {
                                    *g += refs[a][jj] * refs[b][jj];
                                }
                            }
                        }
                    }
                    j += run;
                }
                (0..slots)
                    .map(|s| {
                        let gi = match group {
                            GroupOf::Columns(count) => (g0 + s) % count,
                            _ => g0 + s,
                        };
                        let mut g = vec![vec![0.0; m]; m];
                        for (&v, &(a, b)) in acc[s * p..][..p].iter().zip(&pairs) {
                            g[a][b] = v;
                            g[b][a] = v;
                        }
                        (gi, g)
                    })
                    .collect::<Vec<_>>()
            },
            |_, part| {
                for (gi, g) in part.into_iter().flatten() {
                    add_matrix(&mut grams[gi], &g);
                }
            },
        )?;
        Ok(grams)
    }

    /// For each target (model i, rank r, descending?): (key, index) of the element of ascending rank r
    /// of |δ_i| in (magnitude key, flat index) order. All targets advance in the same passes, each chunk
    /// streamed sub-block by sub-block; a selection whose window ([`Self::start_selections`]) holds its
    /// rank is done in the first pass, but for a look into one chunk.
    fn select_many(
        &self,
        t: &OutTensor,
        deltas: &[Val],
        targets: &[(usize, u64, bool)],
        progress: &dyn Progress,
    ) -> Result<Vec<(u64, u64)>, MergeError> {
        /// What a chunk gathers for one target in a pass.
        enum Gather {
            Window(WindowPart),
            /// The chunk's keys, for a histogram (or later) pass.
            Keys(Vec<u64>),
            Skip,
        }
        let mut sels = self.start_selections(t, deltas, targets)?;
        let mut done = vec![false; targets.len()];
        while done.iter().any(|d| !d) {
            // The task vectors the unfinished targets read, evaluated once per sub-block.
            let models: Vec<usize> = {
                let mut m: Vec<usize> = (0..targets.len())
                    .filter(|&k| !done[k])
                    .map(|k| targets[k].0)
                    .collect();
                m.sort_unstable();
                m.dedup();
                m
            };
            let vals: Vec<Val> = models.iter().map(|&i| deltas[i].clone()).collect();
            let mut passes: Vec<Pass> = targets.iter().map(|_| Pass::default()).collect();
            let (sref, dref) = (&sels, &done);
            self.chunk_fold(
                t,
                progress,
                &vals,
                |c| (0..targets.len()).any(|k| !dref[k] && sref[k].wants_chunk(c)),
                |lo| {
                    let gather: Vec<Gather> = (0..targets.len())
                        .map(|k| {
                            if dref[k] || !sref[k].wants_chunk(lo / CHUNK) {
                                Gather::Skip
                            } else if let Some((a, b)) = sref[k].window() {
                                Gather::Window(WindowPart::new(a, b))
                            } else {
                                let mut keys = super::scratch::u64s(CHUNK);
                                keys.clear();
                                Gather::Keys(keys)
                            }
                        })
                        .collect();
                    let wanted: Vec<bool> =
                        gather.iter().map(|g| !matches!(g, Gather::Skip)).collect();
                    (lo, gather, wanted)
                },
                |(_, gather, wanted), x| {
                    target_keys(x, t.compute, &vals, &models, targets, wanted, |k, keys| {
                        match &mut gather[k] {
                            Gather::Window(part) => part.add(keys),
                            Gather::Keys(all) => all.extend_from_slice(keys),
                            Gather::Skip => {}
                        }
                    });
                },
                |(lo, gather, _)| {
                    gather
                        .into_iter()
                        .enumerate()
                        .map(|(k, g)| match g {
                            Gather::Window(part) => Some(part.finish()),
                            Gather::Keys(keys) => {
                                let part = sref[k].visit(lo as u64, &keys);
                                super::scratch::give_u64(keys);
                                Some(part)
                            }
                            Gather::Skip => None,
                        })
                        .collect::<Vec<_>>()
                },
                |c, parts| {
                    for (k, p) in parts.into_iter().flatten().enumerate() {
                        if let Some(p) = p {
                            sref[k].absorb(&mut passes[k], c, p);
                        }
                    }
                },
            )?;
            for (k, pass) in passes.into_iter().enumerate() {
                if !done[k] {
                    done[k] = sels[k].advance(pass);
                }
            }
        }
        let histogram = sels.iter().filter(|s| s.uses_histograms()).count() as u64;
        let mut stats = self.selections.lock().expect("selection counts");
        stats.histogram += histogram;
        stats.found_in_window += sels.len() as u64 - histogram;
        drop(stats);
        Ok(sels.iter().map(|s| s.result().expect("found")).collect())
    }

    /// Each target's selection, started with a window of keys around its rank where a sample of its
    /// keys finds one ([`window_from_sample`]). The sample: sub-blocks of [`SUB`] elements spread evenly
    /// over the tensor, about 1.5% of it (16 to 256 sub-blocks), taken only when that is at most a
    /// quarter of the tensor.
    fn start_selections(
        &self,
        t: &OutTensor,
        deltas: &[Val],
        targets: &[(usize, u64, bool)],
    ) -> Result<Vec<RankSelect>, MergeError> {
        let numel = t.base.numel();
        let blocks = (numel / (64 * SUB)).clamp(16, 256);
        if blocks * SUB * 4 > numel || !self.plan.selection_windows || targets.is_empty() {
            return Ok(targets
                .iter()
                .map(|&(_, r, _)| RankSelect::new(r))
                .collect());
        }
        let mut models: Vec<usize> = targets.iter().map(|&(i, _, _)| i).collect();
        models.sort_unstable();
        models.dedup();
        let vals: Vec<Val> = models.iter().map(|&i| deltas[i].clone()).collect();
        let needed = self.needed_leaves(t, &vals);
        let stride = (numel - SUB) / (blocks - 1);
        let all = vec![true; targets.len()];
        let mut parts: Vec<Vec<Vec<u64>>> = (0..blocks)
            .into_par_iter()
            .map(|j| {
                let lo = j * stride;
                let mut sample = vec![Vec::new(); targets.len()];
                self.with_sub_blocks(t, &needed, lo, lo + SUB, |x| {
                    target_keys(x, t.compute, &vals, &models, targets, &all, |k, keys| {
                        sample[k].extend_from_slice(keys)
                    });
                    Ok(())
                })?;
                Ok(sample)
            })
            .collect::<Result<_, MergeError>>()?;
        let chunks = numel.div_ceil(CHUNK) as u64;
        let cap = WINDOW_CAP / targets.len();
        let sels: Vec<RankSelect> = targets
            .iter()
            .enumerate()
            .map(|(k, &(_, rank, _))| {
                // Each target's sample gathered once (a few MiB), its parts freed as they go.
                let mut sample: Vec<u64> = Vec::new();
                for p in parts.iter_mut() {
                    sample.append(&mut p[k]);
                }
                match window_from_sample(&sample, SUB, rank, numel as u64, chunks, cap) {
                    Some((lo, hi)) => RankSelect::windowed(rank, lo, hi, cap),
                    None => RankSelect::new(rank),
                }
            })
            .collect();
        self.selections.lock().expect("selection counts").windowed +=
            sels.iter().filter(|s| s.window().is_some()).count() as u64;
        Ok(sels)
    }

    /// For each (model i, descending, positions): the elements at those positions of torch's sort of
    /// |δ_i| (as mergekit computes δ_i, in the tensor's compute dtype), as a bit mask over the tensor.
    /// One model at a time: a pass gathers its magnitudes, then the sort is followed in memory (8 bytes an
    /// element) only as far as it decides which elements land in those positions.
    fn sorted_masks(
        &self,
        t: &OutTensor,
        deltas: &[Val],
        sorted: &[(usize, bool, std::ops::Range<u64>)],
    ) -> Result<Vec<Arc<Vec<u64>>>, MergeError> {
        let numel = t.base.numel();
        let mut masks = Vec::with_capacity(sorted.len());
        for (i, desc, range) in sorted {
            let mut pairs: Vec<(f32, u32)> = Vec::with_capacity(numel);
            // Counted by the caller, as the streaming selection's passes.
            self.chunk_pass(
                t,
                &crate::progress::Silent,
                std::slice::from_ref(&deltas[*i]),
                |_| true,
                |_, values| {
                    values[0]
                        .iter()
                        .map(|&x| t.compute.round_f64(x).abs())
                        .collect::<Vec<f32>>()
                },
                |_, part| {
                    for k in part.into_iter().flatten() {
                        pairs.push((k, pairs.len() as u32));
                    }
                },
            )?;
            torch_sort_select(&mut pairs, *desc, range.start as usize..range.end as usize);
            let mut bits = vec![0u64; numel.div_ceil(64)];
            for &(_, j) in &pairs[range.start as usize..range.end as usize] {
                bits[j as usize / 64] |= 1 << (j % 64);
            }
            masks.push(Arc::new(bits));
        }
        Ok(masks)
    }

    /// (‖δ_i‖₁, ‖kept part of δ_i‖₁) for each model i in `which`, summed in chunk order.
    fn l1_norms(
        &self,
        t: &OutTensor,
        deltas: &[Val],
        keep: &[Keep],
        which: &[usize],
        progress: &dyn Progress,
    ) -> Result<Vec<(f64, f64)>, MergeError> {
        let mut total = vec![(0.0, 0.0); which.len()];
        if which.is_empty() {
            return Ok(total);
        }
        let vals: Vec<Val> = which.iter().map(|&i| deltas[i].clone()).collect();
        self.chunk_pass(
            t,
            progress,
            &vals,
            |_| true,
            |lo, values| {
                let level = crate::simd::level();
                which
                    .iter()
                    .zip(values)
                    .map(|(&i, v)| {
                        // The kept elements through the mask's own (vectorised) sparsify: a dropped
                        // element is +0, whose |δ| adds +0 to the kept sum, as skipping it does.
                        let mut kept = super::scratch::f64s(v.len());
                        kept.copy_from_slice(v);
                        keep[i].sparsify(level, &mut kept, lo as u64);
                        let sums = l1_sums(t.compute, v, &kept);
                        super::scratch::give_f64(kept);
                        sums
                    })
                    .collect::<Vec<_>>()
            },
            |_, p| {
                for (acc, (a, k)) in total.iter_mut().zip(p.into_iter().flatten()) {
                    acc.0 += a;
                    acc.1 += k;
                }
            },
        )?;
        Ok(total)
    }
}

/// `g[k] += x_a·x_b` over the elements `range` of `refs`, in order, for the `P` pairs a ≤ b of `M`
/// vectors (k counting them row by row), with the sums in registers across the run.
#[inline(always)]
fn pair_sums<const M: usize, const P: usize>(
    refs: &[&[f64]],
    range: std::ops::Range<usize>,
    g: &mut [f64],
) {
    let x: [&[f64]; M] = std::array::from_fn(|a| &refs[a][range.clone()]);
    let mut acc: [f64; P] = std::array::from_fn(|k| g[k]);
    for jj in 0..range.len() {
        let mut k = 0;
        for a in 0..M {
            for b in a..M {
                acc[k] += x[a][jj] * x[b][jj];
                k += 1;
            }
        }
    }
    g[..P].copy_from_slice(&acc);
}

/// (Σ |δ|, Σ |kept δ|) in element order, |δ| as mergekit computes δ: rounded to the compute dtype.
fn l1_sums(compute: FloatType, all: &[f64], kept: &[f64]) -> (f64, f64) {
    #[inline(always)]
    fn sums(all: &[f64], kept: &[f64], round: impl Fn(f64) -> f32) -> (f64, f64) {
        let (mut a, mut k) = (0.0, 0.0);
        for (&x, &y) in all.iter().zip(kept) {
            a += round(x).abs() as f64;
            k += round(y).abs() as f64;
        }
        (a, k)
    }
    // The rounding chosen once, not per element (float32's is the plain conversion).
    if compute == FloatType::F32 {
        sums(all, kept, |x| x as f32)
    } else {
        sums(all, kept, |x| compute.round_f64(x))
    }
}

/// Σ_k c_k[group]·v_k, a plain weighted sum when there is one group.
fn grouped(terms: Vec<(Val, Vec<f64>)>, group: GroupOf, n: usize) -> Val {
    if let GroupOf::Whole = group {
        return Val::sum(terms.into_iter().map(|(v, c)| (v, c[0])).collect(), n);
    }
    Val::Node(Arc::new(Node::Grouped { terms, group }))
}

/// A step limited to the models that are sources of this tensor's slice (layer layouts only).
fn restrict(t: &OutTensor, kind: &StepKind) -> Result<StepKind, MergeError> {
    let Treatment::Merge { inputs } = &t.treatment else {
        return Ok(kind.clone());
    };
    let active = |op: &Operand| match op {
        Operand::Leaf(l) => inputs[*l].is_some(),
        Operand::Step(_) => true,
    };
    let keep = |models: &[Operand]| -> Vec<usize> {
        (0..models.len()).filter(|&i| active(&models[i])).collect()
    };
    fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
        idx.iter().map(|&i| v[i].clone()).collect()
    }
    let out = match kind {
        StepKind::Linear {
            models,
            weights,
            normalize,
        } => {
            let i = keep(models);
            StepKind::Linear {
                models: pick(models, &i),
                weights: pick(weights, &i),
                normalize: *normalize,
            }
        }
        StepKind::Passthrough { models, scale } => {
            let i = keep(models);
            StepKind::Passthrough {
                models: pick(models, &i),
                scale: pick(scale, &i),
            }
        }
        StepKind::TaskVectors(tv) => {
            let i = keep(&tv.models);
            let mut tv = tv.clone();
            tv.weights = pick(&tv.weights, &i);
            tv.density = pick(&tv.density, &i);
            tv.gamma = pick(&tv.gamma, &i);
            tv.models = pick(&tv.models, &i);
            StepKind::TaskVectors(tv)
        }
        StepKind::ModelStock {
            base,
            models,
            filter_wise,
        } => {
            let i = keep(models);
            StepKind::ModelStock {
                base: *base,
                models: pick(models, &i),
                filter_wise: *filter_wise,
            }
        }
        other => other.clone(),
    };
    if let Some(Operand::Leaf(l)) = crate::recipe::operands(&out)
        .into_iter()
        .find(|op| !active(op))
    {
        return Err(MergeError::Method {
            tensor: t.base.name.clone(),
            message: format!("input model {l} is not a source of this tensor's slice"),
        });
    }
    Ok(out)
}

/// For one sub-block `x`: each task vector of `models` (their values `vals`) evaluated once, and the
/// magnitude keys of every target `k` on it (`targets[k]`: model, rank, descending) that is `wanted[k]`,
/// handed to `each(k, keys)`.
fn target_keys(
    x: &ChunkInputs,
    compute: FloatType,
    vals: &[Val],
    models: &[usize],
    targets: &[(usize, u64, bool)],
    wanted: &[bool],
    mut each: impl FnMut(usize, &[u64]),
) {
    let n = x.views[x.reference].len();
    let mut v = super::scratch::f64s(n);
    let mut keys = super::scratch::u64s(n);
    let level = crate::simd::level();
    for (val, &m) in vals.iter().zip(models) {
        let mut evaluated = false;
        for (k, &(i, _, desc)) in targets.iter().enumerate() {
            if i != m || !wanted[k] {
                continue;
            }
            if compute == FloatType::F32 && val.f32_keys_fused(level, x, desc, &mut keys) {
                each(k, &keys);
                continue;
            }
            if !evaluated {
                val.eval(x, &mut v);
                evaluated = true;
            }
            magnitude_keys(&v, compute, desc, &mut keys);
            each(k, &keys);
        }
    }
    super::scratch::give_f64(v);
    super::scratch::give_u64(keys);
}

/// `into += m`, element by element.
fn add_matrix(into: &mut [Vec<f64>], m: &[Vec<f64>]) {
    for (row, mrow) in into.iter_mut().zip(m) {
        row.iter_mut().zip(mrow).for_each(|(a, b)| *a += b);
    }
}
