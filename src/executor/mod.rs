//! The executor: evaluates a [`Plan`] tensor by tensor, in fixed-size chunks read from the inputs
//! (`pread`) straight into the output shards. No intermediate model is ever materialised.
//!
//! Every step is linear in its inputs once SLERP's coefficients are known, so each step is kept as a
//! coefficient vector over the input models (per tensor). A SLERP step needs the Gram matrix of its task
//! vectors over its group (a layer or a tensor): one reduction pass over the group's data computes it in
//! f64; then the writing pass evaluates each output as one weighted sum in f32 and rounds once.
//!
//! Chunk boundaries are fixed (independent of the thread count) and partial sums are added in chunk
//! order, so the output is byte-identical for any `--threads`.

mod card;
mod error;
mod layout;
mod output;
mod parts;
mod scratch;
mod steps;
mod values;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;

pub use error::MergeError;
pub use output::{InputRecord, Manifest, SIDE_FILES};
pub use parts::{
    part_manifest_name, parts_dir, split_by_bytes, Part, PartFile, PartLayout, PartManifest,
    PartReport,
};
pub use verify::{verify_folder, VerifyReport};

use crate::format::{FloatType, Model, ModelWriter, TensorInfo, TensorSpec};
use crate::progress::{Progress, Unit};
use crate::recipe::{Operand, Plan, StepKind};
use values::{ChunkInputs, Val};

/// Elements per chunk: the unit of parallel work and of f64 partial sums.
pub const CHUNK: usize = 1 << 16;

/// Elements evaluated at a time within a chunk: every input decoded, the values computed and encoded,
/// while all of it stays in the core's cache (a multiple of 8 and of [`crate::sum`]'s block).
pub(crate) const SUB: usize = 2048;
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
    /// Merged: the input dtype and tensor of each leaf that takes part (all of them, except in a layer
    /// layout where each output layer has its own sources).
    Merge {
        inputs: Vec<Option<(FloatType, TensorInfo)>>,
    },
    /// Integer or bool tensors are copied from the base unchanged.
    Copy,
}

#[derive(Debug, Clone)]
struct OutTensor {
    base: TensorInfo,
    treatment: Treatment,
    out_dtype: Dtype,
    /// The dtype mergekit computes this tensor in (see `Plan::mergekit_dtypes`).
    compute: FloatType,
    unit: usize,
    /// Position of the tensor's layer among the layers, in [0, 1] (0 outside the layers): where
    /// parameter gradients are evaluated.
    t: f64,
    /// The leaf whose tensor is the reference of [`kernels::combine`] and the source of copies.
    reference: usize,
    /// That leaf's tensor (its own name; `base` carries the output name).
    source: TensorInfo,
    /// The slice of the plan's layer layout it comes from.
    slice: Option<usize>,
}

impl OutTensor {
    /// The name model `op` gives this tensor: an input model's own tensor name (in a layer layout, its
    /// source layer's), else the output name. As in mergekit, a per-model parameter (weight, density,
    /// gamma, scale) matches its filters against this name, a shared one against the output name.
    fn name_in(&self, op: Operand) -> &str {
        match (op, &self.treatment) {
            (Operand::Leaf(l), Treatment::Merge { inputs }) => inputs
                .get(l)
                .and_then(|i| i.as_ref())
                .map_or(self.base.name.as_str(), |(_, info)| info.name.as_str()),
            _ => &self.base.name,
        }
    }

    /// Bytes of `elements` elements of the base tensor (what progress counts).
    fn bytes_of(&self, elements: usize) -> u64 {
        (elements as u64 * self.base.len as u64) / (self.base.numel() as u64).max(1)
    }
}

/// A recipe bound to its opened inputs and fully validated; ready to run or to describe.
pub struct Prepared<'p> {
    plan: &'p Plan,
    models: Vec<Model>,
    tensors: Vec<OutTensor>,
    /// Tensor indices of each unit (a `model.layers.N.` layer, or a lone tensor).
    units: Vec<Vec<usize>>,
    /// Each unit's coefficient vectors once computed (a few numbers per tensor), so that evaluating
    /// the outputs one at a time ([`Prepared::run_in_memory_one`]) runs SLERP's reduction passes once.
    coefficients: std::sync::Mutex<HashMap<usize, UnitValues>>,
    /// How the streaming rank selections went.
    selections: std::sync::Mutex<SelectionStats>,
}

/// How many streaming rank selections (one per sparsified task vector and rank, for tensors past
/// `plan.torch_order_cap`) started from a sampled window, how many of those the window pass found, and
/// how many ran the histogram passes (no window, or a window that missed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SelectionStats {
    pub windowed: u64,
    pub found_in_window: u64,
    pub histogram: u64,
}

/// `[tensor of the unit][step]`.
type UnitValues = Vec<Vec<Val>>;

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
    /// Memory beside the page cache, not counting what rank selections' windows hold.
    pub peak_memory_estimate: u64,
    /// [`Self::peak_memory_estimate`] with every window at its budget.
    pub peak_memory_bound: u64,
    pub warnings: Vec<String>,
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub force: bool,
    pub hash_inputs: bool,
    /// Paths read besides the recipe and its models (a reference, a text file): no output may touch them.
    pub extra_inputs: Vec<crate::safe_out::Role>,
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

/// The stack a layer tensor belongs to and its index in it: (`model.`, N) for `model.layers.N.…`,
/// (`vision_tower.vision_model.encoder.`, N) for a vision tower's layer; `None` outside any layer.
fn stack_layer(name: &str) -> Option<(&str, usize)> {
    let group = crate::model::family::layer_group(name);
    let inner = group.strip_suffix('.')?;
    let at = inner.rfind("layers.")?;
    let index = inner[at + "layers.".len()..].parse().ok()?;
    Some((&group[..at], index))
}

/// Where parameter gradients are evaluated: layer i of a stack of n layers at t = i / (n − 1) (t = 1
/// when n = 1), tensors outside the layers at t = 0. Every stack counts its own layers (the language
/// model's, a vision tower's), as mergekit counts each module's layers.
pub(super) struct LayerPositions {
    counts: HashMap<String, usize>,
}

impl LayerPositions {
    /// The stacks of a model, from its tensor names.
    pub(super) fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (stack, i) in names.into_iter().filter_map(stack_layer) {
            let n = counts.entry(stack.to_string()).or_default();
            *n = (*n).max(i + 1);
        }
        Self { counts }
    }

    pub(super) fn at(&self, name: &str) -> f64 {
        match stack_layer(name) {
            Some((stack, i)) => match self.counts.get(stack).copied().unwrap_or(i + 1) {
                0 | 1 => 1.0,
                n => i as f64 / (n - 1) as f64,
            },
            None => 0.0,
        }
    }
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
        let wanted = match &plan.layout {
            None => layout::from_base(base, plan.base, models.len()),
            Some(slices) => layout::from_slices(plan, slices, &models).map_err(|e| match e {
                MergeError::MissingTensor { tensor, model, .. } => {
                    let l = (models.iter().position(|m| m.root() == model)).unwrap_or(plan.base);
                    MergeError::MissingTensor {
                        step: step_reading(plan, l),
                        tensor,
                        model,
                    }
                }
                e => e,
            })?,
        };
        let mut tensors = Vec::with_capacity(wanted.len());
        let mut unit_of: HashMap<String, usize> = HashMap::new();
        let mut units: Vec<Vec<usize>> = Vec::new();
        for w in wanted {
            let t = &w.template;
            let reference = &models[w.reference];
            let treatment = match FloatType::from_dtype(t.dtype) {
                Some(_) => {
                    let mut inputs = Vec::with_capacity(models.len());
                    for (l, (m, source)) in models.iter().zip(&w.sources).enumerate() {
                        let Some(source) = source else {
                            inputs.push(None);
                            continue;
                        };
                        let Some(x) = m.get(source) else {
                            return Err(MergeError::MissingTensor {
                                step: step_reading(plan, l),
                                tensor: source.clone(),
                                model: m.root().into(),
                            });
                        };
                        if x.shape != t.shape {
                            return Err(MergeError::ShapeMismatch {
                                step: step_reading(plan, l),
                                tensor: source.clone(),
                                model: m.root().into(),
                                expected: t.shape.clone(),
                                found: x.shape.clone(),
                            });
                        }
                        let Some(ft) = FloatType::from_dtype(x.dtype) else {
                            return Err(MergeError::UnsupportedDtype {
                                tensor: source.clone(),
                                file: m.file_of(x).path().into(),
                                dtype: format!("{:?}", x.dtype),
                            });
                        };
                        inputs.push(Some((ft, x.clone())));
                    }
                    Treatment::Merge { inputs }
                }
                None if is_integral(t.dtype) => Treatment::Copy,
                None => {
                    return Err(MergeError::UnsupportedDtype {
                        tensor: t.name.clone(),
                        file: reference.file_of(t).path().to_path_buf(),
                        dtype: format!("{:?}", t.dtype),
                    })
                }
            };
            // What mergekit computes this tensor in (float32 for gemma-merge recipes).
            let compute = match (&treatment, plan.input_dtype) {
                (_, Some(d)) if plan.mergekit_dtypes => d,
                (Treatment::Merge { inputs }, None) if plan.mergekit_dtypes => inputs
                    .iter()
                    .flatten()
                    .map(|(ft, _)| *ft)
                    .reduce(FloatType::promote)
                    .unwrap_or(FloatType::F32),
                _ => FloatType::F32,
            };
            let out_dtype = match (&treatment, plan.dtype) {
                (Treatment::Merge { .. }, Some(d)) => d.dtype(),
                (Treatment::Merge { .. }, None) if plan.mergekit_dtypes => compute.dtype(),
                _ => t.dtype,
            };
            let key = crate::model::family::layer_group(&w.name).to_string();
            let unit = *unit_of.entry(key).or_insert_with(|| {
                units.push(Vec::new());
                units.len() - 1
            });
            units[unit].push(tensors.len());
            let mut info = t.clone();
            info.name = w.name;
            tensors.push(OutTensor {
                base: info,
                source: t.clone(),
                treatment,
                out_dtype,
                compute,
                unit,
                t: w.t,
                reference: w.reference,
                slice: w.slice,
            });
        }
        if !plan.ignore_extra_tensors && plan.layout.is_none() {
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
            coefficients: Default::default(),
            selections: Default::default(),
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

    /// How the streaming rank selections of the runs so far went (see [`SelectionStats`]).
    pub fn selection_stats(&self) -> SelectionStats {
        *self.selections.lock().expect("selection counts")
    }

    /// Describes the run without reading tensor data.
    pub fn summary(&self) -> PlanSummary {
        let plan = self.plan;
        let n_slerp: usize = plan.steps.iter().map(|s| steps::passes(&s.kind)).sum();
        let read_once: u64 = self
            .tensors
            .iter()
            .map(|t| match &t.treatment {
                Treatment::Merge { inputs } => {
                    inputs.iter().flatten().map(|(_, i)| i.len as u64).sum()
                }
                Treatment::Copy => t.base.len as u64,
            })
            .sum();
        let outputs = self.output_models();
        let specs = self.specs();
        let per_model: u64 = specs.iter().map(|s| s.byte_len()).sum::<u64>() + 8 * 1024;
        let k = outputs.len() as u64;
        let l = self.models.len() as u64;
        // Chunks in flight (one per thread): each input's bytes (at most 4 per element), the values a
        // reduction pass keeps for a whole chunk (f64, at most one per input) and a result or key per
        // element (8 bytes); the sub-block buffers are small beside them. Two blocks of the encoded results
        // of every output (one being written while the next is computed). Per output: a 64 KiB write
        // buffer. Plus headers, plan and bookkeeping. Nothing of the inputs is mapped while merging.
        let threads = rayon::current_num_threads() as u64;
        let block = (BLOCK * CHUNK) as u64;
        // A magnitude sparsification sorts one task vector of a tensor at a time in memory: 8 bytes
        // per element, for the largest such tensor (up to `plan.torch_order_cap` elements).
        let sorts = plan
            .steps
            .iter()
            .any(|s| matches!(&s.kind, StepKind::TaskVectors(tv) if tv.sparsify.ranks()));
        // Past that cap, the streaming selections' window entries: at most WINDOW_CAP (16 bytes each)
        // per tensor, and a stable sort's buffer for one selection's share.
        let merged = || {
            self.tensors
                .iter()
                .filter(|t| matches!(t.treatment, Treatment::Merge { .. }))
                .map(|t| t.base.numel() as u64)
        };
        let (sorted, windows) = if sorts {
            let sorted = merged()
                .filter(|&n| n <= plan.torch_order_cap)
                .max()
                .unwrap_or(0)
                * 8;
            let windows = if merged().any(|n| n > plan.torch_order_cap) {
                crate::selection::WINDOW_CAP as u64 * 16 * 3 / 2
            } else {
                0
            };
            (sorted, windows)
        } else {
            (0, 0)
        };
        let rest =
            threads * CHUNK as u64 * (12 * l + 8) + block * 4 * k + k * (64 << 10) + (16 << 20);
        // The windows are sized from a sample of the keys and mostly hold runs of a few distinct keys:
        // a few MiB in practice (a 2b TIES peaks at ~40 MiB in all), their budget only where every
        // selection's window fills it. The estimate leaves them out; the bound counts the budget.
        let peak = rest + sorted;
        let bound = rest + sorted.max(windows);
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
            peak_memory_bound: bound,
            warnings: plan.warnings.clone(),
        }
    }

    /// Every check [`Prepared::run`] makes before writing (outputs against inputs, existing outputs, the
    /// base's config), without writing: what `--dry-run` must reject too.
    pub fn check_outputs(&self, opts: &RunOptions) -> Result<(), MergeError> {
        output::check_outputs(self.plan, &self.models, opts.force, &opts.extra_inputs)
    }

    /// Runs the merge and writes every output folder (each appears whole or not at all).
    pub fn run(&self, opts: &RunOptions, progress: &dyn Progress) -> Result<RunReport, MergeError> {
        let started = Instant::now();
        let plan = self.plan;
        let staging = output::Staging::begin(plan, &self.models, opts.force, &opts.extra_inputs)?;
        let outputs = self.output_models();
        let specs = self.specs();
        let mut writers: Vec<ModelWriter> = outputs
            .iter()
            .map(|(path, _, _)| {
                ModelWriter::create(&staging.staged(path), specs.clone(), plan.shard_size)
            })
            .collect::<Result<_, _>>()?;
        self.evaluate(&outputs, &mut writers, None, progress)?;
        let mut records = Vec::with_capacity(writers.len());
        for w in writers {
            records.push(w.finish()?);
        }
        let seconds = started.elapsed().as_secs_f64();
        let input_files = output::input_records(&self.models, opts.hash_inputs)?;
        let bytes_written = self.finish_outputs(&staging, records, &input_files, seconds)?;
        let written = staging.commit()?;
        Ok(RunReport {
            output: plan.targets[0].path.clone(),
            outputs: written,
            tensors: self.tensors.len(),
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Completes every staged output model (config, side files, model card, manifest) given the records
    /// of its weight files, in output order; returns the bytes written. `run` and `join` both end here.
    fn finish_outputs(
        &self,
        staging: &output::Staging,
        records: Vec<Vec<crate::format::FileRecord>>,
        inputs: &[output::InputRecord],
        seconds: f64,
    ) -> Result<u64, MergeError> {
        let plan = self.plan;
        let side = output::SideSources {
            config_patch: match &plan.layout {
                Some(slices) => {
                    layout::config_patch(slices, &self.models, &self.models[plan.base])?
                }
                None => Default::default(),
            },
            tokenizer: self.models[plan.tokenizer_source.unwrap_or(plan.base)]
                .folder()
                .to_path_buf(),
        };
        let mut bytes_written = 0u64;
        for (((path, step, _), eta), recs) in self
            .output_models()
            .iter()
            .zip(self.output_etas())
            .zip(records)
        {
            bytes_written += staging.finish_model(
                path,
                &self.models[plan.base],
                plan,
                *step,
                eta,
                recs,
                inputs,
                seconds,
                &side,
            )?;
        }
        Ok(bytes_written)
    }

    /// Evaluates every output model into memory (for scoring without writing; see `front`). Each model's
    /// bytes are exactly those `run` would write.
    pub fn run_in_memory(&self, progress: &dyn Progress) -> Result<Vec<MemoryModel>, MergeError> {
        let outputs = self.output_models();
        let specs = self.specs();
        let mut sinks: Vec<MemoryModel> =
            outputs.iter().map(|_| MemoryModel::new(&specs)).collect();
        self.evaluate(&outputs, &mut sinks, None, progress)?;
        Ok(sinks)
    }

    /// Evaluates output model `index` alone into memory: bounded by one model, whatever the number of
    /// outputs. Its bytes are exactly those `run` would write; SLERP's reduction passes are shared by
    /// successive calls.
    pub fn run_in_memory_one(
        &self,
        index: usize,
        progress: &dyn Progress,
    ) -> Result<MemoryModel, MergeError> {
        let outputs = [self.output_models()[index].clone()];
        let mut sinks = [MemoryModel::new(&self.specs())];
        self.evaluate(&outputs, &mut sinks, None, progress)?;
        let [model] = sinks;
        Ok(model)
    }

    /// Number of output models, in the order of [`Prepared::output_etas`].
    pub fn output_count(&self) -> usize {
        self.output_models().len()
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

    /// What [`Self::evaluate`] counts: each tensor's base bytes once for the writing pass, and once more
    /// per data pass its steps make over it (SLERP's reduction pass, ...; see [`steps::passes`]).
    fn progress_total(&self, subset: Option<&[bool]>) -> u64 {
        let passes: u64 = self
            .plan
            .steps
            .iter()
            .map(|s| steps::passes(&s.kind) as u64)
            .sum();
        self.tensors
            .iter()
            .enumerate()
            .filter(|&(ti, _)| subset.is_none_or(|s| s[ti]))
            .map(|(_, t)| match t.treatment {
                Treatment::Merge { .. } => t.base.len as u64 * (1 + passes),
                Treatment::Copy => t.base.len as u64,
            })
            .sum()
    }

    /// Streams every tensor of every output model, in order, into `sinks` (one per output model). With
    /// `subset` (a flag per tensor), only the flagged tensors are evaluated and streamed (one part's shards);
    /// the statistics of their units (SLERP's layer Gram) still cover every tensor of the unit.
    fn evaluate<W: TensorSink>(
        &self,
        outputs: &[(PathBuf, usize, Option<usize>)],
        sinks: &mut [W],
        subset: Option<&[bool]>,
        progress: &dyn Progress,
    ) -> Result<(), MergeError> {
        let wanted = |ti: usize| subset.is_none_or(|s| s[ti]);
        progress.start("merging", self.progress_total(subset), Unit::Bytes);
        let mut coefs: HashMap<usize, Vec<Vec<Val>>> = HashMap::new();
        let mut remaining: Vec<usize> = self
            .units
            .iter()
            .map(|u| u.iter().filter(|&&ti| wanted(ti)).count())
            .collect();
        // The step (and η) of each output, to name it in a non-finite error.
        let labels: Vec<String> = outputs
            .iter()
            .map(|&(_, step, eta)| {
                let name = &self.plan.steps[step].name;
                match (&self.plan.steps[step].kind, eta) {
                    (StepKind::Liti { etas, .. }, Some(k)) => {
                        format!("`{name}` (η = {:?})", etas[k])
                    }
                    _ => format!("`{name}`"),
                }
            })
            .collect();
        for (ti, t) in self.tensors.iter().enumerate() {
            if !wanted(ti) {
                continue;
            }
            match &t.treatment {
                Treatment::Copy => self.copy_tensor(t, sinks, progress)?,
                Treatment::Merge { .. } => {
                    let unit_vals = match coefs.entry(t.unit) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.memo_values(t.unit, progress)?)
                        }
                    };
                    let pos = self.units[t.unit]
                        .iter()
                        .position(|&i| i == ti)
                        .expect("tensor in its unit");
                    let values: Vec<Val> = outputs
                        .iter()
                        .map(|&(_, step, eta)| self.output_value(&unit_vals[pos], step, eta))
                        .collect();
                    self.write_tensor(t, &values, &labels, sinks, progress)?;
                }
            }
            remaining[t.unit] -= 1;
            if remaining[t.unit] == 0 {
                coefs.remove(&t.unit);
            }
        }
        Ok(())
    }

    /// The value of output model `(step, eta)` for one tensor.
    fn output_value(&self, step_vals: &[Val], step: usize, eta: Option<usize>) -> Val {
        match (&self.plan.steps[step].kind, eta) {
            (StepKind::Liti { base, model, etas }, Some(k)) => {
                let e = etas[k];
                Val::axpby(
                    1.0 - e,
                    &self.value(*base, step_vals),
                    e,
                    &self.value(*model, step_vals),
                )
            }
            _ => step_vals[step].clone(),
        }
    }

    fn value(&self, op: Operand, step_vals: &[Val]) -> Val {
        match op {
            Operand::Leaf(l) => Val::leaf(l, self.models.len()),
            Operand::Step(s) => step_vals[s].clone(),
        }
    }

    /// [`Self::unit_values`], computed once per unit and then remembered (a few numbers per tensor),
    /// so that evaluating outputs one at a time runs the reduction passes once.
    fn memo_values(&self, unit: usize, progress: &dyn Progress) -> Result<UnitValues, MergeError> {
        let known = self
            .coefficients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&unit)
            .cloned();
        if let Some(v) = known {
            return Ok(v);
        }
        let v = self.unit_values(unit, progress)?;
        self.coefficients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(unit, v.clone());
        Ok(v)
    }

    /// The writing pass of one merged tensor: every output's weighted sum, rounded once, in order.
    fn write_tensor(
        &self,
        t: &OutTensor,
        values: &[Val],
        labels: &[String],
        writers: &mut [impl TensorSink],
        progress: &dyn Progress,
    ) -> Result<(), MergeError> {
        let needed = self.needed_leaves(t, values);
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
                    let mut encoded: Vec<Vec<u8>> = values
                        .iter()
                        .map(|_| Vec::with_capacity((hi - lo) * out_type.size()))
                        .collect();
                    let mut out = scratch::f64s(SUB.min(hi - lo));
                    let done = self.with_sub_blocks(t, &needed, lo, hi, |x| {
                        let out = &mut out[..x.views[x.reference].len()];
                        for ((v, label), bytes) in values.iter().zip(labels).zip(&mut encoded) {
                            v.eval(x, out);
                            let at = bytes.len();
                            out_type.encode_f64(out, bytes);
                            // Checked once rounded: float16 overflows beyond ±65504 even when the
                            // f64 sum is finite.
                            if !self.plan.allow_nonfinite {
                                if let Some(i) = out_type.first_nonfinite(&bytes[at..]) {
                                    return Err(MergeError::NonFiniteOutput {
                                        step: label.clone(),
                                        tensor: t.base.name.clone(),
                                        index: x.first + i,
                                        dtype: out_type.torch_name().to_string(),
                                    });
                                }
                            }
                        }
                        Ok(())
                    });
                    scratch::give_f64(out);
                    done.map(|()| encoded)
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
            let (lo, hi) = (block_start * CHUNK, ((block_start + BLOCK) * CHUNK).min(n));
            progress.advance(t.bytes_of(hi - lo));
        }
        Ok(())
    }

    /// Integer/bool tensors go to every output unchanged.
    fn copy_tensor(
        &self,
        t: &OutTensor,
        writers: &mut [impl TensorSink],
        progress: &dyn Progress,
    ) -> Result<(), MergeError> {
        let base = &self.models[t.reference];
        let data = base.data(&t.source);
        for piece in data.chunks(BLOCK * CHUNK) {
            for w in writers.iter_mut() {
                w.write(piece)?;
            }
            progress.advance(piece.len() as u64);
        }
        base.file_of(&t.source)
            .release(t.source.start, t.source.len);
        Ok(())
    }

    /// Leaves with a non-zero coefficient in any vector, and always the base (the reference of
    /// [`kernels::combine`]).
    fn needed_leaves(&self, t: &OutTensor, values: &[Val]) -> Vec<bool> {
        let mut needed = vec![false; self.models.len()];
        needed[t.reference] = true;
        for v in values {
            v.mark_needed(&mut needed);
        }
        needed
    }

    /// Runs `f` on elements `lo..hi` of a tensor in sub-blocks of [`SUB`] elements. The range's bytes
    /// are read from every needed leaf into this thread's scratch buffers (`pread`, see
    /// [`crate::format::SafetensorsFile::read_at`]); each sub-block is decoded from them, so that the
    /// decoded inputs and `f`'s working values stay in the core's cache. Stops at the first error.
    /// The sub-blocks start at multiples of [`SUB`] from `lo`.
    fn with_sub_blocks(
        &self,
        t: &OutTensor,
        needed: &[bool],
        lo: usize,
        hi: usize,
        mut f: impl FnMut(&ChunkInputs) -> Result<(), MergeError>,
    ) -> Result<(), MergeError> {
        let Treatment::Merge { inputs } = &t.treatment else {
            unreachable!("decode of a copied tensor")
        };
        let read: Vec<Option<(FloatType, &TensorInfo)>> = inputs
            .iter()
            .enumerate()
            .map(|(l, input)| {
                input
                    .as_ref()
                    .filter(|_| needed[l])
                    .map(|(ft, info)| (*ft, info))
            })
            .collect();
        let mut raw: Vec<Vec<u8>> = Vec::with_capacity(read.len());
        let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(read.len());
        for (l, r) in read.iter().enumerate() {
            let Some((ft, info)) = r else {
                raw.push(Vec::new());
                bufs.push(Vec::new());
                continue;
            };
            let mut b = scratch::bytes((hi - lo) * ft.size());
            let got = self.models[l].read_data(info, lo * ft.size(), &mut b);
            raw.push(b);
            bufs.push(scratch::f32s(SUB.min(hi - lo)));
            if let Err(e) = got {
                Self::give_back(raw, bufs);
                return Err(e.into());
            }
        }
        let mut result = Ok(());
        let mut finite = vec![false; read.len()];
        for s in (lo..hi).step_by(SUB) {
            let e = (s + SUB).min(hi);
            result = self.decode_sub_block(&read, &raw, &mut bufs, &mut finite, s - lo, e - lo, lo);
            if result.is_ok() {
                result = f(&ChunkInputs {
                    views: bufs.iter().map(|v| v.as_slice()).collect(),
                    reference: t.reference,
                    first: s,
                    finite: finite.clone(),
                });
            }
            if result.is_err() {
                break;
            }
        }
        Self::give_back(raw, bufs);
        result
    }

    fn give_back(raw: Vec<Vec<u8>>, bufs: Vec<Vec<f32>>) {
        raw.into_iter().for_each(scratch::give_bytes);
        bufs.into_iter().for_each(scratch::give_f32);
    }

    /// Decodes elements `a..b` (counted from the chunk's first element `lo`) of every read leaf from its
    /// raw bytes into `bufs`, checking for NaN/Inf unless the recipe allows them; `finite[l]` tells
    /// whether every value of leaf l is finite (what the decoding found, kept for the kernels).
    #[allow(clippy::too_many_arguments)]
    fn decode_sub_block(
        &self,
        read: &[Option<(FloatType, &TensorInfo)>],
        raw: &[Vec<u8>],
        bufs: &mut [Vec<f32>],
        finite: &mut [bool],
        a: usize,
        b: usize,
        lo: usize,
    ) -> Result<(), MergeError> {
        for (l, r) in read.iter().enumerate() {
            let Some((ft, info)) = r else {
                continue;
            };
            let size = ft.size();
            let v = &mut bufs[l];
            v.resize(b - a, 0.0);
            finite[l] = ft.decode_finite(&raw[l][a * size..b * size], v);
            if !finite[l] && !self.plan.allow_nonfinite {
                if let Some(i) = crate::format::dtype::first_non_finite(v) {
                    let model = &self.models[l];
                    return Err(MergeError::NonFinite {
                        tensor: info.name.clone(),
                        file: model.file_of(info).path().into(),
                        index: lo + a + i,
                    });
                }
            }
            // mergekit's `dtype`: the input as mergekit loads it.
            if let Some(d) = self.plan.input_dtype.filter(|&d| d != *ft) {
                d.round_in_place(v);
                // Rounding can overflow a finite value.
                finite[l] = finite[l] && crate::format::dtype::first_non_finite(v).is_none();
            }
        }
        Ok(())
    }
}

/// The first step that reads input `leaf`, as "step `s` (recipe.yaml:7)", for messages.
fn step_reading(plan: &Plan, leaf: usize) -> String {
    let at = |line: u64| format!("{}:{line}", plan.recipe_path.display());
    match (0..plan.steps.len())
        .find(|&s| crate::recipe::step_operands(plan, s).contains(&Operand::Leaf(leaf)))
        .map(|s| &plan.steps[s])
    {
        Some(s) => format!("step `{}` ({})", s.name, at(s.line)),
        None => format!("input `{}`", plan.leaves[leaf].shown),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_stack_spreads_its_own_gradient() {
        let names = [
            "language_model.model.embed_tokens.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.3.mlp.up_proj.weight",
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            "multi_modal_projector.mm_input_projection_weight",
        ];
        let p = LayerPositions::of(names);
        let t: Vec<f64> = names.iter().map(|n| p.at(n)).collect();
        assert_eq!(t, [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(
            p.at("language_model.model.layers.1.self_attn.q_proj.weight"),
            1.0 / 3.0
        );
        // A stack of one layer sits at t = 1, as in mergekit.
        let one = LayerPositions::of(["model.layers.0.mlp.up_proj.weight"]);
        assert_eq!(one.at("model.layers.0.mlp.up_proj.weight"), 1.0);
    }
}
