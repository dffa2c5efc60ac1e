//! The executor: evaluates a [`Plan`] tensor by tensor, in fixed-size chunks, straight from the
//! memory-mapped inputs into the output shards. No intermediate model is ever materialised.
//!
//! Every step is linear in its inputs once SLERP's coefficients are known, so each step is kept as a
//! coefficient vector over the input models (per tensor). A SLERP step needs the Gram matrix of its task
//! vectors over its group (a layer or a tensor): one reduction pass over the group's data computes it in
//! f64; then the writing pass evaluates each output as one weighted sum in f32 and rounds once.
//!
//! Chunk boundaries are fixed (independent of the thread count) and partial sums are added in chunk
//! order, so the output is byte-identical for any `--threads`.

mod error;
mod output;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;

pub use error::MergeError;
pub use output::{verify_folder, Manifest, VerifyReport, SIDE_FILES};

use crate::format::{FloatType, Model, ModelWriter, TensorInfo, TensorSpec};
use crate::kernels;
use crate::recipe::{Angle, Operand, Plan, StepKind};

/// Elements per chunk: the unit of parallel work and of f64 partial sums.
pub const CHUNK: usize = 1 << 16;
/// Chunks evaluated together before their results are written in order.
pub const BLOCK: usize = 64;

/// Where evaluated tensor bytes go, in tensor order: a shard writer, or memory.
pub trait TensorSink: Send {
    fn write(&mut self, bytes: &[u8]) -> Result<(), MergeError>;
}

impl TensorSink for ModelWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), MergeError> {
        ModelWriter::write(self, bytes).map_err(MergeError::from)
    }
}

/// A merged model held in memory: every tensor's bytes in the output dtype, exactly as `run` writes them.
#[derive(Debug, Clone, Default)]
pub struct MemoryModel {
    pub tensors: Vec<(TensorSpec, Vec<u8>)>,
    current: usize,
}

impl MemoryModel {
    fn new(specs: &[TensorSpec]) -> Self {
        Self {
            tensors: specs
                .iter()
                .map(|s| (s.clone(), Vec::with_capacity(s.byte_len() as usize)))
                .collect(),
            current: 0,
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&(TensorSpec, Vec<u8>)> {
        self.tensors.iter().find(|(s, _)| s.name == name)
    }
}

impl TensorSink for MemoryModel {
    fn write(&mut self, bytes: &[u8]) -> Result<(), MergeError> {
        let mut bytes = bytes;
        while !bytes.is_empty() {
            let (spec, buf) = &mut self.tensors[self.current];
            let room = spec.byte_len() as usize - buf.len();
            let n = room.min(bytes.len());
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if buf.len() == spec.byte_len() as usize {
                self.current += 1;
            }
        }
        while self.current < self.tensors.len() && self.tensors[self.current].0.byte_len() == 0 {
            self.current += 1;
        }
        Ok(())
    }
}

/// How a base tensor reaches the output.
#[derive(Debug, Clone)]
enum Treatment {
    /// Merged: the input dtype of each leaf (all leaves hold it, same shape).
    Merge {
        inputs: Vec<(FloatType, TensorInfo)>,
    },
    /// Integer or bool tensors are copied from the base unchanged.
    Copy,
}

#[derive(Debug, Clone)]
struct OutTensor {
    base: TensorInfo,
    treatment: Treatment,
    out_dtype: Dtype,
    unit: usize,
}

/// A recipe bound to its opened inputs and fully validated; ready to run or to describe.
pub struct Prepared<'p> {
    plan: &'p Plan,
    models: Vec<Model>,
    tensors: Vec<OutTensor>,
    /// Tensor indices of each unit (a `model.layers.N.` layer, or a lone tensor).
    units: Vec<Vec<usize>>,
}

/// What `--dry-run` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanSummary {
    pub steps: Vec<(String, String)>,
    pub outputs: Vec<PathBuf>,
    pub inputs: Vec<(String, PathBuf, u64)>,
    pub tensors: usize,
    pub merged_tensors: usize,
    pub copied_tensors: usize,
    /// Data passes over the inputs: one per SLERP step, plus the writing pass.
    pub passes: usize,
    pub bytes_to_read: u64,
    pub bytes_to_write: u64,
    pub peak_memory_estimate: u64,
    pub warnings: Vec<String>,
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub force: bool,
    pub hash_inputs: bool,
}

/// What a run wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub output: PathBuf,
    pub outputs: Vec<PathBuf>,
    pub tensors: usize,
    pub bytes_written: u64,
    pub seconds: f64,
}

fn unit_key(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some(dot) = rest.find('.') {
            if rest[..dot].bytes().all(|b| b.is_ascii_digit()) && dot > 0 {
                return &name[..("model.layers.".len() + dot + 1)];
            }
        }
    }
    name
}

impl<'p> Prepared<'p> {
    /// Opens every input (headers only) and checks names, shapes and dtypes against the base.
    pub fn new(plan: &'p Plan) -> Result<Self, MergeError> {
        let models: Vec<Model> = plan
            .leaves
            .iter()
            .map(|l| Model::open(&l.path))
            .collect::<Result<_, _>>()?;
        let base = &models[plan.base];
        let mut tensors = Vec::with_capacity(base.tensors().len());
        let mut unit_of: HashMap<String, usize> = HashMap::new();
        let mut units: Vec<Vec<usize>> = Vec::new();
        for t in base.tensors() {
            let base_file = base.file_of(t).path().to_path_buf();
            let treatment = match FloatType::from_dtype(t.dtype) {
                Some(_) => {
                    let mut inputs = Vec::with_capacity(models.len());
                    for m in &models {
                        let Some(x) = m.get(&t.name) else {
                            return Err(MergeError::MissingTensor {
                                tensor: t.name.clone(),
                                model: m.root().into(),
                            });
                        };
                        if x.shape != t.shape {
                            return Err(MergeError::ShapeMismatch {
                                tensor: t.name.clone(),
                                model: m.root().into(),
                                expected: t.shape.clone(),
                                found: x.shape.clone(),
                            });
                        }
                        let Some(ft) = FloatType::from_dtype(x.dtype) else {
                            return Err(MergeError::UnsupportedDtype {
                                tensor: t.name.clone(),
                                file: m.file_of(x).path().into(),
                                dtype: format!("{:?}", x.dtype),
                            });
                        };
                        inputs.push((ft, x.clone()));
                    }
                    Treatment::Merge { inputs }
                }
                None if is_integral(t.dtype) => Treatment::Copy,
                None => {
                    return Err(MergeError::UnsupportedDtype {
                        tensor: t.name.clone(),
                        file: base_file,
                        dtype: format!("{:?}", t.dtype),
                    })
                }
            };
            let out_dtype = match (&treatment, plan.dtype) {
                (Treatment::Merge { .. }, Some(d)) => d.dtype(),
                _ => t.dtype,
            };
            let key = unit_key(&t.name).to_string();
            let unit = *unit_of.entry(key).or_insert_with(|| {
                units.push(Vec::new());
                units.len() - 1
            });
            units[unit].push(tensors.len());
            tensors.push(OutTensor {
                base: t.clone(),
                treatment,
                out_dtype,
                unit,
            });
        }
        if !plan.ignore_extra_tensors {
            for m in &models {
                if let Some(x) = m.tensors().iter().find(|x| base.get(&x.name).is_none()) {
                    return Err(MergeError::ExtraTensor {
                        tensor: x.name.clone(),
                        model: m.root().into(),
                    });
                }
            }
        }
        Ok(Self {
            plan,
            models,
            tensors,
            units,
        })
    }

    fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.base.name.clone(),
                dtype: t.out_dtype,
                shape: t.base.shape.clone(),
            })
            .collect()
    }

    fn output_models(&self) -> Vec<(PathBuf, usize, Option<usize>)> {
        let mut v = Vec::new();
        for target in &self.plan.targets {
            for m in &target.models {
                let path = match &m.subdir {
                    Some(s) => target.path.join(s),
                    None => target.path.clone(),
                };
                v.push((path, m.step, m.eta));
            }
        }
        v
    }

    /// Describes the run without reading tensor data.
    pub fn summary(&self) -> PlanSummary {
        let plan = self.plan;
        let n_slerp = plan
            .steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Slerp { .. }))
            .count();
        let read_once: u64 = self
            .tensors
            .iter()
            .map(|t| match &t.treatment {
                Treatment::Merge { inputs } => inputs.iter().map(|(_, i)| i.len as u64).sum(),
                Treatment::Copy => t.base.len as u64,
            })
            .sum();
        let outputs = self.output_models();
        let specs = self.specs();
        let per_model: u64 = specs.iter().map(|s| s.byte_len()).sum::<u64>() + 8 * 1024;
        let k = outputs.len() as u64;
        let l = self.models.len() as u64;
        // Chunks in flight (one per thread): decoded inputs (f32) and an f64 result. Two blocks: the encoded
        // results of every output (one being written while the next is computed), and the input pages mapped (released after the block). Per output: an
        // 8 MiB write buffer. Plus headers, plan and bookkeeping.
        let threads = rayon::current_num_threads() as u64;
        let block = (BLOCK * CHUNK) as u64;
        let peak = threads * CHUNK as u64 * (4 * l + 8)
            + block * 4 * k
            + block * 4 * l
            + k * (8 << 20)
            + (16 << 20);
        PlanSummary {
            steps: plan
                .steps
                .iter()
                .map(|s| (s.name.clone(), s.method.to_string()))
                .collect(),
            outputs: outputs.into_iter().map(|o| o.0).collect(),
            inputs: plan
                .leaves
                .iter()
                .zip(&self.models)
                .map(|(l, m)| (l.shown.clone(), l.path.clone(), m.data_bytes()))
                .collect(),
            tensors: self.tensors.len(),
            merged_tensors: self
                .tensors
                .iter()
                .filter(|t| matches!(t.treatment, Treatment::Merge { .. }))
                .count(),
            copied_tensors: self
                .tensors
                .iter()
                .filter(|t| matches!(t.treatment, Treatment::Copy))
                .count(),
            passes: n_slerp + 1,
            bytes_to_read: read_once * (n_slerp as u64 + 1),
            bytes_to_write: per_model * k,
            peak_memory_estimate: peak,
            warnings: plan.warnings.clone(),
        }
    }

    /// Runs the merge and writes every output folder (each appears whole or not at all).
    pub fn run(
        &self,
        opts: &RunOptions,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<RunReport, MergeError> {
        let started = Instant::now();
        let plan = self.plan;
        let staging = output::Staging::begin(plan, &self.models, opts.force)?;
        let outputs = self.output_models();
        let specs = self.specs();
        let mut writers: Vec<ModelWriter> = outputs
            .iter()
            .map(|(path, _, _)| {
                ModelWriter::create(&staging.staged(path), specs.clone(), plan.shard_size)
            })
            .collect::<Result<_, _>>()?;
        self.evaluate(&outputs, &mut writers, progress)?;
        let mut records = Vec::with_capacity(writers.len());
        for w in writers {
            records.push(w.finish()?);
        }
        let seconds = started.elapsed().as_secs_f64();
        let input_files = output::input_records(&self.models, opts.hash_inputs)?;
        let mut bytes_written = 0u64;
        for (((path, step, _), eta), recs) in outputs.iter().zip(self.output_etas()).zip(records) {
            bytes_written += staging.finish_model(
                path,
                &self.models[plan.base],
                plan,
                *step,
                eta,
                recs,
                &input_files,
                seconds,
            )?;
        }
        let written = staging.commit()?;
        Ok(RunReport {
            output: plan.targets[0].path.clone(),
            outputs: written,
            tensors: self.tensors.len(),
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Evaluates every output model into memory (for scoring without writing; see `front`). Each model's
    /// bytes are exactly those `run` would write.
    pub fn run_in_memory(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Vec<MemoryModel>, MergeError> {
        let outputs = self.output_models();
        let specs = self.specs();
        let mut sinks: Vec<MemoryModel> =
            outputs.iter().map(|_| MemoryModel::new(&specs)).collect();
        self.evaluate(&outputs, &mut sinks, progress)?;
        Ok(sinks)
    }

    /// The η of each output model (`None` for a step other than LITI), in output order.
    pub fn output_etas(&self) -> Vec<Option<f64>> {
        self.output_models()
            .iter()
            .map(|&(_, step, eta)| match (&self.plan.steps[step].kind, eta) {
                (StepKind::Liti { etas, .. }, Some(k)) => Some(etas[k]),
                _ => None,
            })
            .collect()
    }

    /// Streams every tensor of every output model, in order, into `sinks` (one per output model).
    fn evaluate<W: TensorSink>(
        &self,
        outputs: &[(PathBuf, usize, Option<usize>)],
        sinks: &mut [W],
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), MergeError> {
        let total: u64 = self.tensors.iter().map(|t| t.base.numel() as u64).sum();
        let mut done = 0u64;
        let mut coefs: HashMap<usize, Vec<Vec<Vec<f64>>>> = HashMap::new();
        let mut remaining: Vec<usize> = self.units.iter().map(|u| u.len()).collect();
        for (ti, t) in self.tensors.iter().enumerate() {
            match &t.treatment {
                Treatment::Copy => self.copy_tensor(t, sinks)?,
                Treatment::Merge { .. } => {
                    let unit_coefs = match coefs.entry(t.unit) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.unit_coefficients(t.unit)?)
                        }
                    };
                    let pos = self.units[t.unit]
                        .iter()
                        .position(|&i| i == ti)
                        .expect("tensor in its unit");
                    let vectors: Vec<Vec<f64>> = outputs
                        .iter()
                        .map(|&(_, step, eta)| self.output_vector(&unit_coefs[pos], step, eta))
                        .collect();
                    self.write_tensor(t, &vectors, sinks)?;
                }
            }
            remaining[t.unit] -= 1;
            if remaining[t.unit] == 0 {
                coefs.remove(&t.unit);
            }
            done += t.base.numel() as u64;
            progress(done, total);
        }
        Ok(())
    }

    /// Coefficient vector (over leaves) of output model `(step, eta)` for one tensor.
    fn output_vector(&self, step_vecs: &[Vec<f64>], step: usize, eta: Option<usize>) -> Vec<f64> {
        match (&self.plan.steps[step].kind, eta) {
            (StepKind::Liti { base, model, etas }, Some(k)) => {
                let e = etas[k];
                axpby(
                    1.0 - e,
                    &self.vector(*base, step_vecs),
                    e,
                    &self.vector(*model, step_vecs),
                )
            }
            _ => step_vecs[step].clone(),
        }
    }

    fn vector(&self, op: Operand, step_vecs: &[Vec<f64>]) -> Vec<f64> {
        match op {
            Operand::Leaf(l) => {
                let mut v = vec![0.0; self.models.len()];
                v[l] = 1.0;
                v
            }
            Operand::Step(s) => step_vecs[s].clone(),
        }
    }

    /// Every step's coefficient vector for every tensor of a unit (`[tensor][step][leaf]`), running the
    /// reduction passes that SLERP steps need.
    fn unit_coefficients(&self, unit: usize) -> Result<Vec<Vec<Vec<f64>>>, MergeError> {
        let members: Vec<usize> = self.units[unit]
            .iter()
            .copied()
            .filter(|&i| matches!(self.tensors[i].treatment, Treatment::Merge { .. }))
            .collect();
        let all = &self.units[unit];
        let mut per_tensor: Vec<Vec<Vec<f64>>> =
            vec![Vec::with_capacity(self.plan.steps.len()); all.len()];
        for step in &self.plan.steps {
            match &step.kind {
                StepKind::Weighted { terms } => {
                    for sv in per_tensor.iter_mut() {
                        let mut v = vec![0.0; self.models.len()];
                        for (op, w) in terms {
                            let x = self.vector(*op, sv);
                            v.iter_mut().zip(&x).for_each(|(a, b)| *a += w * b);
                        }
                        sv.push(v);
                    }
                }
                StepKind::Liti { base, model, etas } => {
                    for sv in per_tensor.iter_mut() {
                        let e = etas[0];
                        let v = axpby(
                            1.0 - e,
                            &self.vector(*base, sv),
                            e,
                            &self.vector(*model, sv),
                        );
                        sv.push(v);
                    }
                }
                StepKind::Slerp {
                    base,
                    models,
                    lambdas,
                    angle,
                } => {
                    // Task vectors δ_m = θ_m − θ_base as coefficient vectors, per tensor.
                    let deltas: Vec<Vec<Vec<f64>>> = per_tensor
                        .iter()
                        .map(|sv| {
                            let b = self.vector(*base, sv);
                            models
                                .iter()
                                .map(|&m| axpby(1.0, &self.vector(m, sv), -1.0, &b))
                                .collect()
                        })
                        .collect();
                    let mut grams: Vec<Vec<Vec<f64>>> = Vec::with_capacity(all.len());
                    for (pos, &ti) in all.iter().enumerate() {
                        if members.contains(&ti) {
                            grams.push(self.gram_pass(&self.tensors[ti], &deltas[pos])?);
                        } else {
                            grams.push(vec![vec![0.0; models.len()]; models.len()]);
                        }
                    }
                    let layer_gram = (*angle == Angle::Layer).then(|| {
                        let mut g = vec![vec![0.0; models.len()]; models.len()];
                        for t in &grams {
                            for (row, trow) in g.iter_mut().zip(t) {
                                row.iter_mut().zip(trow).for_each(|(a, b)| *a += b);
                            }
                        }
                        g
                    });
                    for (pos, sv) in per_tensor.iter_mut().enumerate() {
                        let g = layer_gram.as_ref().unwrap_or(&grams[pos]);
                        let r = kernels::slerp_chain(g, lambdas);
                        let mut v = self.vector(*base, sv);
                        for (rm, d) in r.iter().zip(&deltas[pos]) {
                            v.iter_mut().zip(d).for_each(|(a, b)| *a += rm * b);
                        }
                        sv.push(v);
                    }
                }
            }
        }
        Ok(per_tensor)
    }

    /// One reduction pass over a tensor: the f64 Gram matrix of the given task vectors.
    fn gram_pass(&self, t: &OutTensor, deltas: &[Vec<f64>]) -> Result<Vec<Vec<f64>>, MergeError> {
        let m = deltas.len();
        let needed = self.needed_leaves(deltas);
        let coefs: Vec<(&[f64], f64)> = deltas
            .iter()
            .map(|d| (d.as_slice(), d.iter().sum::<f64>()))
            .collect();
        let n = t.base.numel();
        let chunks = n.div_ceil(CHUNK);
        let mut gram = vec![vec![0.0; m]; m];
        for block_start in (0..chunks).step_by(BLOCK) {
            let block_end = (block_start + BLOCK).min(chunks);
            let partials: Vec<Vec<Vec<f64>>> = (block_start..block_end)
                .into_par_iter()
                .map(|c| {
                    let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                    let inputs = self.decode_chunk(t, &needed, lo, hi)?;
                    let views: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
                    let vectors: Vec<Vec<f64>> = coefs
                        .iter()
                        .map(|(c, s)| {
                            let mut out = vec![0f64; hi - lo];
                            kernels::combine(c, *s, &views, self.plan.base, &mut out);
                            out
                        })
                        .collect();
                    let vrefs: Vec<&[f64]> = vectors.iter().map(|v| v.as_slice()).collect();
                    let mut g = vec![vec![0.0; m]; m];
                    kernels::gram_accumulate(&vrefs, &mut g);
                    Ok(g)
                })
                .collect::<Result<_, MergeError>>()?;
            for p in partials {
                for (row, prow) in gram.iter_mut().zip(&p) {
                    row.iter_mut().zip(prow).for_each(|(a, b)| *a += b);
                }
            }
            self.release(t, &needed, block_start * CHUNK, (block_end * CHUNK).min(n));
        }
        Ok(gram)
    }

    /// The writing pass of one merged tensor: every output's weighted sum, rounded once, in order.
    fn write_tensor(
        &self,
        t: &OutTensor,
        vectors: &[Vec<f64>],
        writers: &mut [impl TensorSink],
    ) -> Result<(), MergeError> {
        let needed = self.needed_leaves(vectors);
        let coefs: Vec<(&[f64], f64)> = vectors
            .iter()
            .map(|v| (v.as_slice(), v.iter().sum::<f64>()))
            .collect();
        let out_type =
            FloatType::from_dtype(t.out_dtype).expect("merged tensors have a float output type");
        let n = t.base.numel();
        let chunks = n.div_ceil(CHUNK);
        // Evaluates chunks [block_start, block_start + BLOCK) in parallel: per chunk, per output, bytes.
        let compute = |block_start: usize| -> Result<Vec<Vec<Vec<u8>>>, MergeError> {
            let block_end = (block_start + BLOCK).min(chunks);
            (block_start..block_end)
                .into_par_iter()
                .map(|c| {
                    let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                    let inputs = self.decode_chunk(t, &needed, lo, hi)?;
                    let views: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
                    let mut out = vec![0f64; hi - lo];
                    Ok(coefs
                        .iter()
                        .map(|(c, s)| {
                            kernels::combine(c, *s, &views, self.plan.base, &mut out);
                            let mut bytes = Vec::new();
                            out_type.encode_f64(&out, &mut bytes);
                            bytes
                        })
                        .collect())
                })
                .collect()
        };
        let blocks: Vec<usize> = (0..chunks).step_by(BLOCK).collect();
        let Some(&first) = blocks.first() else {
            return Ok(());
        };
        let mut pending = Some(compute(first)?);
        // Block k is hashed and written while block k + 1 is computed.
        for (k, &block_start) in blocks.iter().enumerate() {
            let current = pending.take().expect("a computed block");
            let next_start = blocks.get(k + 1).copied();
            let (written, next) = rayon::join(
                || -> Result<(), MergeError> {
                    for chunk in current {
                        for (w, bytes) in writers.iter_mut().zip(chunk) {
                            w.write(&bytes)?;
                        }
                    }
                    Ok(())
                },
                || next_start.map(compute),
            );
            written?;
            if let Some(next) = next {
                pending = Some(next?);
            }
            self.release(
                t,
                &needed,
                block_start * CHUNK,
                ((block_start + BLOCK) * CHUNK).min(n),
            );
        }
        Ok(())
    }

    /// Integer/bool tensors go to every output unchanged.
    fn copy_tensor(
        &self,
        t: &OutTensor,
        writers: &mut [impl TensorSink],
    ) -> Result<(), MergeError> {
        let base = &self.models[self.plan.base];
        let data = base.data(&t.base);
        for piece in data.chunks(BLOCK * CHUNK) {
            for w in writers.iter_mut() {
                w.write(piece)?;
            }
        }
        base.file_of(&t.base).release(t.base.start, t.base.len);
        Ok(())
    }

    /// Leaves with a non-zero coefficient in any vector, and always the base (the reference of
    /// [`kernels::combine`]).
    fn needed_leaves(&self, vectors: &[Vec<f64>]) -> Vec<bool> {
        (0..self.models.len())
            .map(|l| l == self.plan.base || vectors.iter().any(|v| v[l] != 0.0))
            .collect()
    }

    /// Decodes elements `lo..hi` of a tensor from every needed leaf (empty vectors for the others),
    /// checking for NaN/Inf unless the recipe allows them.
    fn decode_chunk(
        &self,
        t: &OutTensor,
        needed: &[bool],
        lo: usize,
        hi: usize,
    ) -> Result<Vec<Vec<f32>>, MergeError> {
        let Treatment::Merge { inputs } = &t.treatment else {
            unreachable!("decode of a copied tensor")
        };
        let mut out = Vec::with_capacity(inputs.len());
        for (l, (ft, info)) in inputs.iter().enumerate() {
            if !needed[l] {
                out.push(Vec::new());
                continue;
            }
            let size = ft.size();
            let model = &self.models[l];
            let bytes = &model.data(info)[lo * size..hi * size];
            let mut v = vec![0f32; hi - lo];
            ft.decode(bytes, &mut v);
            if !self.plan.allow_nonfinite {
                if let Some(i) = crate::format::dtype::first_non_finite(&v) {
                    return Err(MergeError::NonFinite {
                        tensor: info.name.clone(),
                        file: model.file_of(info).path().into(),
                        index: lo + i,
                    });
                }
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Drops the input pages of elements `lo..hi` from this process's resident set.
    fn release(&self, t: &OutTensor, needed: &[bool], lo: usize, hi: usize) {
        let Treatment::Merge { inputs } = &t.treatment else {
            return;
        };
        for (l, (ft, info)) in inputs.iter().enumerate() {
            if needed[l] {
                let size = ft.size();
                self.models[l]
                    .file_of(info)
                    .release(info.start + lo * size, (hi - lo) * size);
            }
        }
    }
}

fn is_integral(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::I16
            | Dtype::U16
            | Dtype::I32
            | Dtype::U32
            | Dtype::I64
            | Dtype::U64
    )
}

fn axpby(a: f64, x: &[f64], b: f64, y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(x, y)| a * x + b * y).collect()
}

/// Checks that `target` neither is, contains, nor sits inside any input.
pub(crate) fn check_not_input(target: &Path, models: &[Model]) -> Result<(), MergeError> {
    let t = absolute(target);
    for m in models {
        let root = absolute(m.root());
        let input_dir = if root.is_dir() {
            root.clone()
        } else {
            root.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let clash = root.starts_with(&t) || (root.is_dir() && t.starts_with(&input_dir));
        if clash {
            return Err(MergeError::OutputIsInput {
                output: target.into(),
                input: m.root().into(),
            });
        }
    }
    Ok(())
}

/// An absolute, symlink-resolved path, also for paths that do not exist yet (resolved via the nearest
/// existing ancestor).
pub(crate) fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            absolute(parent).join(name)
        }
        _ => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}
