//! Resolution of a parsed recipe into a [`Plan`]: references bound to models or earlier steps, every
//! number range-checked, closed-form weights computed, outputs laid out. Nothing here reads tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use super::raw::{RawParam, RawRecipe, RawSlice, RawStep, S};
use super::{hub, RecipeError};
use crate::format::FloatType;
use crate::methods::{self, MethodDef, NativeArgs, Param};
pub use crate::methods::{Sparsify, TaskVectorStep};

/// Default maximum shard size, as Hugging Face's `save_pretrained` (5 GB).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// What a step takes as input: an input model or an earlier step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    Leaf(usize),
    Step(usize),
}

/// Over which tensors SLERP measures one angle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Angle {
    /// All tensors of `model.layers.N.` share one angle per N (WARP); others are their own group.
    Layer,
    /// Each tensor on its own (mergekit `nuslerp` with flatten).
    Tensor,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    /// Σ w_i·θ_i with fixed weights: `ema` (closed-form weights) and `linear`.
    Weighted { terms: Vec<(Operand, f64)> },
    /// SLERP of task vectors θ_m − θ_base; `lambdas[k]` is λ of the pair that adds model k + 2.
    Slerp {
        base: Operand,
        models: Vec<Operand>,
        lambdas: Vec<f64>,
        angle: Angle,
    },
    /// (1 − η)·θ_base + η·θ_model for each η (several only on the output step).
    Liti {
        base: Operand,
        model: Operand,
        etas: Vec<f64>,
    },
    /// Σ w_i·θ_i (/ Σ w_i) with weights that depend on the tensor (gradients, filters).
    Linear {
        models: Vec<Operand>,
        weights: Vec<Param>,
        normalize: bool,
    },
    /// The task-vector family: task arithmetic, TIES, DARE, breadcrumbs.
    TaskVectors(TaskVectorStep),
    /// Model Stock: t·mean(θ_i) + (1 − t)·θ_b, t from the mean pairwise cosine of the task vectors.
    ModelStock {
        base: Operand,
        models: Vec<Operand>,
        filter_wise: bool,
    },
    /// mergekit's two-model SLERP of the weights themselves (t = 0 gives `base`).
    WeightSlerp {
        base: Operand,
        other: Operand,
        t: Param,
    },
    /// SLERP of two task vectors (or two models without a base), weights w_1 : w_2.
    NuSlerp {
        base: Option<Operand>,
        models: Vec<Operand>,
        weights: Vec<Param>,
        grouping: Grouping,
    },
    /// scale·θ of the one model present for a tensor (several models only with `slices`).
    Passthrough {
        models: Vec<Operand>,
        scale: Vec<Param>,
    },
}

/// Over which elements a per-group statistic (an angle, a cosine) is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// The whole tensor.
    Tensor,
    /// Each row along the last dimension.
    Rows,
    /// Each vector along the first dimension (mergekit's `nuslerp_row_wise`).
    Columns,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub method: &'static str,
    /// What the step computes. A step with `slices` computes each slice with that slice's own kind
    /// ([`LayoutSlice::kind`]); this is then the first slice's (see [`step_operands`] for all its inputs).
    pub kind: StepKind,
    /// Line of the step in the recipe.
    pub line: u64,
}

/// An input model as the recipe names it.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The path, resolved against the recipe's folder.
    pub path: PathBuf,
    /// How the recipe wrote it (alias or path).
    pub shown: String,
    /// The Hugging Face id (`org/name`) when the model was found in the hub cache by that id.
    pub hub_id: Option<String>,
}

/// One slice of a layer layout (mergekit `slices`): `len` layers taken from each source, from its layer
/// `start` on; sources are merged layer by layer.
#[derive(Debug, Clone)]
pub struct LayoutSlice {
    /// (leaf, first layer) of each source.
    pub sources: Vec<(usize, usize)>,
    pub len: usize,
    /// (line, column) of each source's `layer_range` in the recipe, for errors found once the models'
    /// headers are read (a range past a model's last layer); (0, 0) where unknown.
    pub ranges_at: Vec<(u64, u64)>,
    /// The step resolved for this slice alone, its sources' own `parameters` included, as mergekit
    /// resolves parameters per slice (gemma-merge recipes). `None`: the plan's one step, limited to the
    /// slice's sources (mergekit configs).
    pub kind: Option<StepKind>,
}

/// One model to write: a step, and which η of a LITI list.
#[derive(Debug, Clone)]
pub struct OutputModel {
    /// Sub-folder inside the target (`eta-0.3`), or `None` for the target itself.
    pub subdir: Option<String>,
    pub step: usize,
    pub eta: Option<usize>,
}

/// A folder that appears whole or not at all.
#[derive(Debug, Clone)]
pub struct OutputTarget {
    pub path: PathBuf,
    pub models: Vec<OutputModel>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub recipe_path: PathBuf,
    pub recipe_text: String,
    pub leaves: Vec<Leaf>,
    pub steps: Vec<Step>,
    /// The model that defines tensor names, order and shapes, and whose config/tokenizer are copied.
    pub base: usize,
    pub targets: Vec<OutputTarget>,
    /// Output dtype; `None` keeps each base tensor's own (see `promote_dtypes`).
    pub dtype: Option<FloatType>,
    /// mergekit's dtype rules (configs only): each tensor is computed in `input_dtype`, else in the
    /// promotion of the dtypes of the inputs it is merged from (`FloatType::promote`); where `dtype` is
    /// `None`, that is also its output dtype. (gemma-merge recipes: float32, and the base tensor's own.)
    /// The computation stays exact; the compute dtype decides what mergekit's arithmetic decides (which
    /// equal magnitudes a sort keeps, a sign election's sum that cancels).
    pub mergekit_dtypes: bool,
    /// mergekit's `dtype`: every input is loaded in it (rounded to it, where it differs) before merging.
    pub input_dtype: Option<FloatType>,
    /// Magnitude sparsification sorts tensors of at most this many elements in memory, in torch's order
    /// (`selection::TORCH_ORDER_CAP`); larger ones stream, equal magnitudes ordered by flat index.
    pub torch_order_cap: u64,
    /// Streaming selections first guess a window of keys from a sample and try it in one pass
    /// (`selection::window_from_sample`); off, they run the histogram passes only. Same bytes either way.
    pub selection_windows: bool,
    pub shard_size: u64,
    pub ignore_extra_tensors: bool,
    pub allow_nonfinite: bool,
    /// Things worth saying that do not stop the run (η outside [0, 1], ...).
    pub warnings: Vec<String>,
    /// Output layers stacked from layer ranges (mergekit `slices`); `None`: the base's layers. A plan with a
    /// layout has one step, the output (a layer layout is the whole output's).
    pub layout: Option<Vec<LayoutSlice>>,
    /// The model whose tokenizer files are copied (default: the base).
    pub tokenizer_source: Option<usize>,
    /// A chat template to set in the output's tokenizer_config.json.
    pub chat_template: Option<String>,
    /// Files written into every output folder besides the usual ones (name, contents).
    pub extra_files: Vec<(String, String)>,
}

impl Plan {
    /// Reads and validates a recipe file. `out` overrides the recipe's `output`.
    pub fn from_file(path: &Path, out: Option<&Path>) -> Result<Plan, RecipeError> {
        Self::load(path, out, None)
    }

    /// Reads and validates a gemma-merge recipe or, when it has a top-level `merge_method`, a mergekit
    /// config (whose model paths are relative to the current directory, and which needs `out`). `seed`
    /// is mergekit's `--seed` (a gemma-merge recipe sets `seed:` itself).
    pub fn load(path: &Path, out: Option<&Path>, seed: Option<u64>) -> Result<Plan, RecipeError> {
        let text =
            crate::format::files::read_text_limited(path, crate::format::files::SIDE_FILE_LIMIT)
                .map_err(|source| RecipeError::Io {
                    path: path.into(),
                    source,
                })?;
        if super::mergekit::is_mergekit(&text) {
            return super::mergekit::plan(&text, path, out, seed.unwrap_or(0));
        }
        Self::from_text(&text, path, out)
    }

    /// Validates recipe `text` as if read from `path` (relative references resolve against its folder).
    pub fn from_text(text: &str, path: &Path, out: Option<&Path>) -> Result<Plan, RecipeError> {
        let raw: RawRecipe = parse_yaml(text, path)?;
        Resolver::new(path, text).resolve(raw, out)
    }

    /// Every step that the outputs depend on, and the outputs' steps, in recipe order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }
}

/// Parses YAML into `T`, turning a syntax or schema error into one with the file's line and column.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, RecipeError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = super::error::yaml_message(&e);
        RecipeError::Invalid {
            path: path.into(),
            line,
            column,
            message,
        }
    })
}

/// Shortest decimal that reads back as the same f64, with at least one digit after the point
/// (−0.0 is written `eta-0.0`).
pub fn eta_label(eta: f64) -> String {
    format!("eta-{:?}", eta + 0.0)
}

/// Most η values in one list: each is a model folder (and, in `front`, a forward pass).
pub const MAX_ETAS: usize = 1000;

/// A value that appears twice in an η list (−0.0 and 0.0 are the same η), if any.
pub fn duplicate_eta(etas: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = etas.iter().map(|&e| e + 0.0).collect();
    sorted.sort_by(f64::total_cmp);
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

struct Resolver<'a> {
    path: &'a Path,
    text: &'a str,
    dir: PathBuf,
    aliases: BTreeMap<String, S<String>>,
    leaves: Vec<Leaf>,
    leaf_by_path: HashMap<PathBuf, usize>,
    /// name → (index, line) of every step, to tell a forward reference from an unknown name.
    all_steps: HashMap<String, (usize, u64)>,
    /// Steps with several η, which no other step may use.
    list_steps: Vec<usize>,
    warnings: Vec<String>,
    /// The recipe's `seed:` (default 0), for random methods.
    seed: u64,
    /// The step with `slices` (no other step may read it) and its layer layout.
    sliced: Option<(usize, Vec<LayoutSlice>)>,
}

impl<'a> Resolver<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        Self {
            path,
            text,
            dir,
            aliases: BTreeMap::new(),
            leaves: Vec::new(),
            leaf_by_path: HashMap::new(),
            all_steps: HashMap::new(),
            list_steps: Vec::new(),
            warnings: Vec::new(),
            seed: 0,
            sliced: None,
        }
    }

    fn err(&self, loc: &Location, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid {
            path: self.path.into(),
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        }
    }

    fn warn(&mut self, loc: &Location, message: String) {
        self.warnings.push(format!(
            "{}:{}:{}: {message}",
            self.path.display(),
            loc.line(),
            loc.column()
        ));
    }

    /// Binds a model reference made in step number `current` (steps above it are visible).
    fn reference(&mut self, r: &S<String>, current: usize) -> Result<Operand, RecipeError> {
        let name = r.value.as_str();
        if let Some(&(i, line)) = self.all_steps.get(name) {
            if i < current && self.sliced.as_ref().is_some_and(|(k, _)| *k == i) {
                return Err(self.err(
                    &r.referenced,
                    format!("step `{name}` has `slices`: its layer layout is the output's, no step can read it"),
                ));
            }
            if i < current && self.list_steps.contains(&i) {
                return Err(self.err(
                    &r.referenced,
                    format!("step `{name}` has a list of η: it can only be the output"),
                ));
            }
            if i < current {
                return Ok(Operand::Step(i));
            }
            if i == current {
                return Err(self.err(&r.referenced, format!("step `{name}` refers to itself")));
            }
            return Err(self.err(
                &r.referenced,
                format!("step `{name}` is defined below (line {line}): a step may only use steps above it"),
            ));
        }
        let (target, loc) = match self.aliases.get(name) {
            Some(alias) => (alias.value.clone(), alias.referenced),
            None => (name.to_string(), r.referenced),
        };
        self.leaf(&target, name, &loc).map(Operand::Leaf)
    }

    fn leaf(&mut self, target: &str, shown: &str, loc: &Location) -> Result<usize, RecipeError> {
        if target.is_empty() {
            return Err(self.err(loc, "empty model reference"));
        }
        let mut path = self.dir.join(target);
        let mut hub_id = None;
        if !path.exists() {
            if !hub::is_hub_id(target) {
                let names: Vec<&str> = (self.all_steps.keys())
                    .chain(self.aliases.keys())
                    .map(String::as_str)
                    .collect();
                let hint = super::error::closest(shown, &names)
                    .map(|n| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default();
                return Err(self.err(
                    loc,
                    format!(
                        "`{shown}` is not a step, an alias, or an existing path ({} not found){hint}",
                        path.display()
                    ),
                ));
            }
            path = hub::resolve(target).map_err(|m| self.err(loc, m))?;
            hub_id = Some(target.split('@').next().unwrap_or(target).to_string());
        }
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(&i) = self.leaf_by_path.get(&key) {
            return Ok(i);
        }
        self.leaves.push(Leaf {
            path,
            shown: shown.to_string(),
            hub_id,
        });
        self.leaf_by_path.insert(key, self.leaves.len() - 1);
        Ok(self.leaves.len() - 1)
    }

    fn resolve(mut self, raw: RawRecipe, out: Option<&Path>) -> Result<Plan, RecipeError> {
        if let Some(models) = &raw.models {
            self.aliases = models.value.clone();
        }
        self.seed = raw.seed.as_ref().map(|s| s.value).unwrap_or(0);
        let steps_raw = &raw.steps.value;
        if steps_raw.is_empty() {
            return Err(self.err(
                &raw.steps.referenced,
                "`steps` is empty: a recipe needs at least one step",
            ));
        }
        for (i, s) in steps_raw.iter().enumerate() {
            let name = &s.value.name;
            if name.value.is_empty() {
                return Err(self.err(&name.referenced, "a step name cannot be empty"));
            }
            if let Some(&(_, line)) = self.all_steps.get(&name.value) {
                return Err(self.err(
                    &name.referenced,
                    format!(
                        "duplicate step name `{}` (first defined on line {line})",
                        name.value
                    ),
                ));
            }
            self.all_steps
                .insert(name.value.clone(), (i, name.referenced.line()));
        }

        // The recipe's base is a model (no step exists above the list).
        let base = match &raw.base {
            Some(b) => {
                if self.all_steps.contains_key(&b.value) {
                    return Err(self.err(
                        &b.referenced,
                        format!(
                            "the recipe's `base` must be a model, not the step `{}`",
                            b.value
                        ),
                    ));
                }
                Some(self.reference(b, 0)?)
            }
            None => None,
        };

        let dtype = match &raw.dtype {
            Some(d) => Some(FloatType::from_torch_name(&d.value).ok_or_else(|| {
                self.err(
                    &d.referenced,
                    format!(
                        "unknown dtype `{}` (use bfloat16, float16 or float32)",
                        d.value
                    ),
                )
            })?),
            None => None,
        };
        let shard_size = raw
            .shard_size
            .as_ref()
            .map(|s| s.value.0)
            .unwrap_or(DEFAULT_SHARD_SIZE);
        let ignore_extra_tensors = match &raw.extra_tensors {
            None => false,
            Some(v) if v.value == "error" => false,
            Some(v) if v.value == "ignore" => true,
            Some(v) => {
                return Err(self.err(
                    &v.referenced,
                    format!(
                        "`extra_tensors` must be `error` or `ignore`, not `{}`",
                        v.value
                    ),
                ))
            }
        };

        let output_index = match &raw.output_step {
            Some(name) => match self.all_steps.get(&name.value) {
                Some(&(i, _)) => i,
                None => {
                    return Err(self.err(
                        &name.referenced,
                        format!("`output_step` names no step: `{}`", name.value),
                    ))
                }
            },
            None => steps_raw.len() - 1,
        };

        // A layer layout is the whole output's: only the output step may stack layers, and then the run
        // writes nothing else.
        for (i, s) in steps_raw.iter().enumerate() {
            if let Some(slices) = &s.value.slices {
                if i != output_index {
                    return Err(self.err(
                        &slices.referenced,
                        format!(
                            "`slices` only on the output step: a layer layout is the whole output's (this recipe writes step `{}`)",
                            steps_raw[output_index].value.name.value
                        ),
                    ));
                }
                if let Some((j, save)) = steps_raw
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != output_index)
                    .find_map(|(j, t)| Some((j, t.value.save.as_ref()?)))
                {
                    return Err(self.err(
                        &save.referenced,
                        format!(
                            "`save` in a recipe whose step `{}` has `slices`: the layer layout applies to all the run writes, so it writes that step only (step `{}` cannot be saved)",
                            s.value.name.value, steps_raw[j].value.name.value
                        ),
                    ));
                }
            }
        }

        let mut steps = Vec::with_capacity(steps_raw.len());
        for (i, s) in steps_raw.iter().enumerate() {
            steps.push(self.step(i, &s.value, &s.referenced, base, i == output_index)?);
        }

        // Outputs: the output step, then every saved step.
        let mut targets = Vec::new();
        let out_path = match (out, &raw.output) {
            (Some(o), _) => o.to_path_buf(),
            (None, Some(o)) => self.dir.join(&o.value),
            (None, None) => {
                return Err(self.err(
                    &Location::UNKNOWN,
                    "no output folder: set `output:` in the recipe or pass --out",
                ));
            }
        };
        targets.push(self.target(out_path, output_index, &steps[output_index]));
        for (i, s) in steps_raw.iter().enumerate() {
            if let Some(save) = &s.value.save {
                if i == output_index {
                    return Err(self.err(
                        &save.referenced,
                        "`save` on the output step: it is written already",
                    ));
                }
                targets.push(self.target(self.dir.join(&save.value), i, &steps[i]));
            }
        }

        // Every step must reach an output.
        let mut used = vec![false; steps.len()];
        let mut stack: Vec<usize> = targets.iter().map(|t| t.models[0].step).collect();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut used[i], true) {
                continue;
            }
            for op in operands(&steps[i].kind) {
                if let Operand::Step(j) = op {
                    stack.push(j);
                }
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let name = &steps_raw[i].value.name;
            return Err(self.err(
                &name.referenced,
                format!(
                    "step `{}` is not used by the output and not saved (add `save:` or remove it)",
                    name.value
                ),
            ));
        }

        let base = match base {
            Some(Operand::Leaf(b)) => b,
            _ => first_leaf(&steps, output_index).expect("every step has an input"),
        };
        let layout = self.sliced.take().map(|(_, layout)| layout);
        Ok(Plan {
            recipe_path: self.path.to_path_buf(),
            recipe_text: self.text.to_string(),
            leaves: self.leaves,
            steps,
            base,
            targets,
            dtype,
            mergekit_dtypes: false,
            input_dtype: None,
            torch_order_cap: crate::selection::TORCH_ORDER_CAP,
            selection_windows: true,
            shard_size,
            ignore_extra_tensors,
            allow_nonfinite: raw.allow_nonfinite.map(|v| v.value).unwrap_or(false),
            warnings: self.warnings,
            layout,
            tokenizer_source: None,
            chat_template: None,
            extra_files: Vec::new(),
        })
    }

    fn target(&self, path: PathBuf, step: usize, s: &Step) -> OutputTarget {
        let models = match &s.kind {
            StepKind::Liti { etas, .. } if self.list_steps.contains(&step) => etas
                .iter()
                .enumerate()
                .map(|(k, &e)| OutputModel {
                    subdir: Some(eta_label(e)),
                    step,
                    eta: Some(k),
                })
                .collect(),
            StepKind::Liti { .. } => vec![OutputModel {
                subdir: None,
                step,
                eta: Some(0),
            }],
            _ => vec![OutputModel {
                subdir: None,
                step,
                eta: None,
            }],
        };
        OutputTarget { path, models }
    }

    fn step(
        &mut self,
        index: usize,
        s: &RawStep,
        at: &Location,
        recipe_base: Option<Operand>,
        is_output: bool,
    ) -> Result<Step, RecipeError> {
        let Some(def) = methods::native(&s.method.value) else {
            return Err(self.err(
                &s.method.referenced,
                format!(
                    "unknown method `{}` (use {})",
                    s.method.value,
                    methods::names(false)
                ),
            ));
        };
        for (field, loc) in s.present_fields() {
            if !def.fields.contains(&field) {
                return Err(self.err(
                    loc,
                    format!(
                        "`{field}` is not a field of method `{}` (it takes: {})",
                        def.name,
                        def.fields.join(", ")
                    ),
                ));
            }
        }
        let kind = match &s.slices {
            Some(slices) => self.sliced_step(index, s, slices, def, recipe_base)?,
            None => {
                let mut args = NativeStep {
                    r: self,
                    s,
                    at: *at,
                    index,
                    recipe_base,
                    is_output,
                };
                (def.resolve)(&mut args)?
            }
        };
        // A list, even of one η, writes `OUTPUT/eta-<η>` folders.
        if matches!(
            s.eta.as_ref().map(|e| &e.value),
            Some(crate::recipe::raw::Eta::List(_))
        ) {
            self.list_steps.push(index);
        }
        Ok(Step {
            name: s.name.value.clone(),
            method: def.name,
            kind,
            line: at.line(),
        })
    }
}

/// A source of a slice, bound.
struct Source<'s> {
    leaf: usize,
    params: Option<&'s S<BTreeMap<String, S<RawParam>>>>,
}

impl Resolver<'_> {
    /// A step with `slices` (mergekit's layer stacking): checks the slices, resolves the method once per
    /// slice (its sources are that slice's models, each with its own `parameters`, the step's values as
    /// the shared default, as mergekit does), and records the layout. Returns the first slice's kind.
    fn sliced_step(
        &mut self,
        index: usize,
        s: &RawStep,
        slices: &S<Vec<S<RawSlice>>>,
        def: &'static MethodDef,
        recipe_base: Option<Operand>,
    ) -> Result<StepKind, RecipeError> {
        if def.mergekit_name.is_none() {
            let takes: Vec<&str> = methods::REGISTRY
                .iter()
                .filter(|m| m.native && m.mergekit_name.is_some())
                .map(|m| m.name)
                .collect();
            return Err(self.err(
                &slices.referenced,
                format!(
                    "method `{}` does not take `slices` (mergekit's methods do: {})",
                    def.name,
                    takes.join(", ")
                ),
            ));
        }
        if s.models.is_some() {
            return Err(self.err(
                &slices.referenced,
                "give either `models` or `slices`, not both",
            ));
        }
        if slices.value.is_empty() {
            return Err(self.err(
                &slices.referenced,
                "`slices` is empty: give at least one slice",
            ));
        }
        // The base of a method that has one: the step's, else the recipe's; a source of every slice.
        let base = match (def.fields.contains(&"base"), &s.base) {
            (false, _) => None,
            (true, Some(b)) => match self.reference(b, index)? {
                Operand::Leaf(l) => Some(l),
                Operand::Step(_) => {
                    return Err(self.err(
                        &b.referenced,
                        format!(
                            "a step with `slices` reads input models only: its base `{}` is a step",
                            b.value
                        ),
                    ))
                }
            },
            (true, None) => match recipe_base {
                Some(Operand::Leaf(l)) => Some(l),
                _ => None,
            },
        };
        let mut layout = Vec::with_capacity(slices.value.len());
        let mut first_kind = None;
        for (k, sl) in slices.value.iter().enumerate() {
            let list = &sl.value.sources;
            if list.value.is_empty() {
                return Err(self.err(&list.referenced, "a slice needs at least one source"));
            }
            let mut sources = Vec::with_capacity(list.value.len());
            let mut ranges_at = Vec::with_capacity(list.value.len());
            let mut bound: Vec<Source> = Vec::with_capacity(list.value.len());
            let mut len = None;
            for src in &list.value {
                let src = &src.value;
                let leaf = match self.reference(&src.model, index)? {
                    Operand::Leaf(l) => l,
                    Operand::Step(_) => {
                        return Err(self.err(
                            &src.model.referenced,
                            format!(
                                "slice sources are input models, not steps: `{}` is a step",
                                src.model.value
                            ),
                        ))
                    }
                };
                if bound.iter().any(|b| b.leaf == leaf) {
                    return Err(self.err(
                        &src.model.referenced,
                        format!(
                            "`{}` is a source of this slice twice (a model can be a source only once per slice)",
                            src.model.value
                        ),
                    ));
                }
                let r = &src.layer_range;
                let [a, b] = r.value.as_slice() else {
                    return Err(self.err(
                        &r.referenced,
                        format!(
                            "`layer_range` is two numbers [first, end), got {}",
                            r.value.len()
                        ),
                    ));
                };
                let (a, b) = (a.value, b.value);
                if b <= a {
                    return Err(self.err(
                        &r.referenced,
                        format!(
                            "`layer_range` [{a}, {b}] holds no layer: it is [first, end), the end above the first"
                        ),
                    ));
                }
                let n = b - a;
                match len {
                    None => len = Some(n),
                    Some(first) if first != n => {
                        return Err(self.err(
                            &r.referenced,
                            format!(
                                "every source of a slice gives the same number of layers: this one gives {n}, the first {first}"
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                if let Some(p) = &src.parameters {
                    if base == Some(leaf) {
                        return Err(self.err(
                            &p.referenced,
                            format!(
                                "`{}` is the base of this `{}` step: it takes no per-model parameters",
                                src.model.value, def.name
                            ),
                        ));
                    }
                    for (key, v) in &p.value {
                        if !def.model_params.contains(&key.as_str()) {
                            let takes = match def.model_params {
                                [] => "it takes none".to_string(),
                                list => format!("it takes: {}", list.join(", ")),
                            };
                            return Err(self.err(
                                &v.referenced,
                                format!(
                                    "unknown parameter `{key}` of a source for method `{}` ({takes})",
                                    def.name
                                ),
                            ));
                        }
                    }
                }
                sources.push((leaf, a));
                ranges_at.push((r.referenced.line(), r.referenced.column()));
                bound.push(Source {
                    leaf,
                    params: src.parameters.as_ref(),
                });
            }
            if let Some(b) = base {
                if !sources.iter().any(|&(l, _)| l == b) {
                    return Err(self.err(
                        &list.referenced,
                        format!(
                            "the base `{}` must be a source of every slice: each slice's layers are merged against the base's",
                            self.leaves[b].shown
                        ),
                    ));
                }
            }
            bound.retain(|b| Some(b.leaf) != base);
            let mut args = SliceStep {
                r: self,
                s,
                at: list.referenced,
                index,
                slice: k,
                base,
                sources: bound,
            };
            let kind = (def.resolve)(&mut args)?;
            first_kind.get_or_insert_with(|| kind.clone());
            layout.push(LayoutSlice {
                sources,
                len: len.expect("a slice has sources"),
                ranges_at,
                kind: Some(kind),
            });
        }
        self.sliced = Some((index, layout));
        Ok(first_kind.expect("slices are not empty"))
    }
}

/// One slice of a step with `slices`, as the methods see it: the slice's sources (less the base) are the
/// models, each with its own `parameters`; the step's fields are the shared values.
struct SliceStep<'r, 'a, 's> {
    r: &'r mut Resolver<'a>,
    s: &'s RawStep,
    /// The slice's `sources`.
    at: Location,
    index: usize,
    slice: usize,
    base: Option<usize>,
    sources: Vec<Source<'s>>,
}

impl SliceStep<'_, '_, '_> {
    fn own<'k>(&'k self, key: &'k str) -> impl Iterator<Item = Option<&'k S<RawParam>>> + 'k {
        self.sources
            .iter()
            .map(move |src| src.params.and_then(|p| p.value.get(key)))
    }

    fn at_slice(&self, message: String) -> RecipeError {
        self.r.err(
            &self.at,
            format!(
                "step `{}` ({}), slice {}: {message}",
                self.s.name.value,
                self.s.method.value,
                self.slice + 1
            ),
        )
    }
}

impl methods::StepArgs for SliceStep<'_, '_, '_> {
    fn models(&mut self, min: usize) -> Result<Vec<Operand>, RecipeError> {
        if self.sources.len() < min {
            let besides = if self.base.is_some() {
                " besides the base"
            } else {
                ""
            };
            return Err(self.at_slice(format!(
                "`{}` needs at least {min} source{}{besides}, got {}",
                self.s.method.value,
                if min == 1 { "" } else { "s" },
                self.sources.len()
            )));
        }
        Ok(self.sources.iter().map(|s| Operand::Leaf(s.leaf)).collect())
    }

    fn model(&mut self) -> Result<Operand, RecipeError> {
        self.models(1).map(|m| m[0])
    }

    fn base(&mut self, required: bool) -> Result<Option<Operand>, RecipeError> {
        match self.base {
            Some(b) => Ok(Some(Operand::Leaf(b))),
            None if !required => Ok(None),
            None => Err(self.r.err(
                &self.at,
                format!(
                    "step `{}` ({}) needs a base: set `base:` on the step or in the recipe, and make it a source of every slice",
                    self.s.name.value, self.s.method.value
                ),
            )),
        }
    }

    fn per_model(&self, key: &str, n: usize) -> Result<Option<Vec<Param>>, RecipeError> {
        debug_assert_eq!(n, self.sources.len());
        let to_param = |x: &S<RawParam>| param(x).map_err(|(loc, m)| self.r.err(&loc, m));
        let shared = step_field(self.s, key).map(to_param).transpose()?;
        let own: Vec<Option<Param>> = self
            .own(key)
            .map(|p| p.map(to_param).transpose())
            .collect::<Result<_, _>>()?;
        if shared.is_none() && own.iter().all(Option::is_none) {
            return Ok(None);
        }
        own.into_iter()
            .map(|o| match (o, &shared) {
                (Some(o), Some(s)) => Ok(Param::Or(Box::new(o), Box::new(s.clone()))),
                (Some(o), None) => Ok(o),
                (None, Some(s)) => Ok(s.clone()),
                (None, None) => Err(self.at_slice(format!(
                    "a source has no `{key}` (set it in the `parameters` of every source, or `{}` on the step)",
                    field_name(key)
                ))),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn shared(&self, key: &str) -> Result<Option<Param>, RecipeError> {
        match step_field(self.s, key) {
            Some(p) => param(p).map(Some).map_err(|(loc, m)| self.r.err(&loc, m)),
            None => Ok(None),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, RecipeError> {
        Ok(step_flag(self.s, key).map(|v| v.value))
    }

    fn seed(&self) -> u64 {
        self.s.seed.as_ref().map(|v| v.value).unwrap_or(self.r.seed)
    }

    fn error(&self, key: Option<&str>, message: String) -> RecipeError {
        let own = key.and_then(|k| self.own(k).flatten().next().map(|p| p.referenced));
        match own.or_else(|| key.and_then(|k| step_location(self.s, k))) {
            Some(loc) => self.r.err(&loc, message),
            None => self.at_slice(message),
        }
    }

    fn native(&mut self) -> Option<&mut dyn methods::NativeArgs> {
        Some(self)
    }
}

impl methods::NativeArgs for SliceStep<'_, '_, '_> {
    fn step(&self) -> &RawStep {
        self.s
    }

    fn reference(&mut self, r: &S<String>) -> Result<Operand, RecipeError> {
        self.r.reference(r, self.index)
    }

    fn is_output(&self) -> bool {
        true
    }

    fn warn(&mut self, loc: &Location, message: String) {
        self.r.warn(loc, message)
    }

    fn err_at(&self, loc: &Location, message: String) -> RecipeError {
        self.r.err(loc, message)
    }

    fn missing(&self, field: &str) -> RecipeError {
        self.at_slice(format!("needs `{field}`"))
    }
}

/// The recipe field holding parameter `key` (`weight` is written `weights` in a recipe).
fn step_field<'s>(s: &'s RawStep, key: &str) -> Option<&'s S<RawParam>> {
    match key {
        "weight" => s.weights.as_ref(),
        "density" => s.density.as_ref(),
        "gamma" => s.gamma.as_ref(),
        "epsilon" => s.epsilon.as_ref(),
        "lambda" => s.lambda.as_ref(),
        "scale" => s.scale.as_ref(),
        "t" => s.t.as_ref(),
        _ => None,
    }
}

/// The recipe field holding flag `key`.
fn step_flag<'s>(s: &'s RawStep, key: &str) -> Option<&'s S<bool>> {
    match key {
        "normalize" => s.normalize.as_ref(),
        "rescale" => s.rescale.as_ref(),
        "filter_wise" => s.filter_wise.as_ref(),
        "nuslerp_flatten" => s.nuslerp_flatten.as_ref(),
        "nuslerp_row_wise" => s.nuslerp_row_wise.as_ref(),
        _ => None,
    }
}

/// Where parameter or flag `key` (or `models`) is written on the step.
fn step_location(s: &RawStep, key: &str) -> Option<Location> {
    if key == "models" {
        return s.models.as_ref().map(|m| m.referenced);
    }
    step_field(s, key)
        .map(|p| p.referenced)
        .or_else(|| step_flag(s, key).map(|f| f.referenced))
}

/// How a recipe writes parameter `key`.
fn field_name(key: &str) -> &str {
    if key == "weight" {
        "weights"
    } else {
        key
    }
}

/// A step of a gemma-merge recipe, as the methods see it.
struct NativeStep<'r, 'a> {
    r: &'r mut Resolver<'a>,
    s: &'r RawStep,
    at: Location,
    index: usize,
    recipe_base: Option<Operand>,
    is_output: bool,
}

impl NativeStep<'_, '_> {
    fn field(&self, key: &str) -> Option<&S<RawParam>> {
        step_field(self.s, key)
    }

    fn location(&self, key: &str) -> Option<Location> {
        step_location(self.s, key)
    }
}

impl methods::StepArgs for NativeStep<'_, '_> {
    fn models(&mut self, min: usize) -> Result<Vec<Operand>, RecipeError> {
        let Some(list) = &self.s.models else {
            return Err(self.missing("models"));
        };
        if list.value.len() < min {
            return Err(self.r.err(
                &list.referenced,
                format!(
                    "`{}` needs at least {min} model{}, got {}",
                    self.s.method.value,
                    if min == 1 { "" } else { "s" },
                    list.value.len()
                ),
            ));
        }
        list.value
            .iter()
            .map(|m| self.r.reference(m, self.index))
            .collect()
    }

    fn model(&mut self) -> Result<Operand, RecipeError> {
        let Some(model) = &self.s.model else {
            return Err(self.missing("model"));
        };
        self.r.reference(model, self.index)
    }

    fn base(&mut self, required: bool) -> Result<Option<Operand>, RecipeError> {
        match &self.s.base {
            Some(b) => self.r.reference(b, self.index).map(Some),
            None if self.recipe_base.is_some() || !required => Ok(self.recipe_base),
            None => Err(self.r.err(
                &self.at,
                format!(
                    "step `{}` ({}) needs a base: set `base:` on the step or in the recipe",
                    self.s.name.value, self.s.method.value
                ),
            )),
        }
    }

    fn per_model(&self, key: &str, n: usize) -> Result<Option<Vec<Param>>, RecipeError> {
        let Some(p) = self.field(key) else {
            return Ok(None);
        };
        let to_param = |x: &S<RawParam>| param(x).map_err(|(loc, m)| self.r.err(&loc, m));
        match &p.value {
            // A list of filter entries is one value for every model.
            RawParam::List(items)
                if !items.is_empty()
                    && items
                        .iter()
                        .all(|i| matches!(i.value, RawParam::Filter { .. })) =>
            {
                Ok(Some(vec![to_param(p)?; n]))
            }
            RawParam::List(items) => {
                if items.len() != n {
                    return Err(self.r.err(
                        &p.referenced,
                        format!(
                            "`{}` has {} entries for {n} models",
                            field_name(key),
                            items.len()
                        ),
                    ));
                }
                items
                    .iter()
                    .map(to_param)
                    .collect::<Result<_, _>>()
                    .map(Some)
            }
            _ => Ok(Some(vec![to_param(p)?; n])),
        }
    }

    fn shared(&self, key: &str) -> Result<Option<Param>, RecipeError> {
        match self.field(key) {
            Some(p) => param(p).map(Some).map_err(|(loc, m)| self.r.err(&loc, m)),
            None => Ok(None),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, RecipeError> {
        Ok(step_flag(self.s, key).map(|v| v.value))
    }

    fn seed(&self) -> u64 {
        self.s.seed.as_ref().map(|v| v.value).unwrap_or(self.r.seed)
    }

    fn error(&self, key: Option<&str>, message: String) -> RecipeError {
        match key.and_then(|k| self.location(k)) {
            Some(loc) => self.r.err(&loc, message),
            None => self.r.err(
                &self.at,
                format!(
                    "step `{}` ({}): {message}",
                    self.s.name.value, self.s.method.value
                ),
            ),
        }
    }

    fn native(&mut self) -> Option<&mut dyn methods::NativeArgs> {
        Some(self)
    }
}

impl methods::NativeArgs for NativeStep<'_, '_> {
    fn step(&self) -> &RawStep {
        self.s
    }

    fn reference(&mut self, r: &S<String>) -> Result<Operand, RecipeError> {
        self.r.reference(r, self.index)
    }

    fn is_output(&self) -> bool {
        self.is_output
    }

    fn warn(&mut self, loc: &Location, message: String) {
        self.r.warn(loc, message)
    }

    fn err_at(&self, loc: &Location, message: String) -> RecipeError {
        self.r.err(loc, message)
    }

    fn missing(&self, field: &str) -> RecipeError {
        self.r.err(
            &self.at,
            format!(
                "step `{}` ({}) needs `{field}`",
                self.s.name.value, self.s.method.value
            ),
        )
    }
}

/// A written parameter as a [`Param`]: a number, a gradient (list of numbers), or a filter list.
pub(crate) fn param(p: &S<RawParam>) -> Result<Param, (Location, String)> {
    match &p.value {
        RawParam::Number(v) => Ok(Param::Const(*v)),
        RawParam::List(items) if items.iter().all(|i| matches!(i.value, RawParam::Number(_))) => {
            if items.is_empty() {
                return Err((p.referenced, "an empty list is not a value".into()));
            }
            Ok(Param::Gradient(
                items
                    .iter()
                    .map(|i| match i.value {
                        RawParam::Number(v) => v,
                        _ => unreachable!(),
                    })
                    .collect(),
            ))
        }
        RawParam::List(items) => {
            let mut entries = Vec::with_capacity(items.len());
            for i in items {
                let RawParam::Filter { filter, value } = &i.value else {
                    return Err((
                        i.referenced,
                        "expected a number, a list of numbers, or {filter, value} entries".into(),
                    ));
                };
                entries.push((filter.clone(), param(value)?));
            }
            Ok(Param::Filters(entries))
        }
        RawParam::Filter { filter, value } => {
            Ok(Param::Filters(vec![(filter.clone(), param(value)?)]))
        }
        RawParam::Bool(_) | RawParam::Text(_) => Err((p.referenced, "expected a number".into())),
    }
}

/// The operands of a step, in order.
pub fn operands(kind: &StepKind) -> Vec<Operand> {
    match kind {
        StepKind::Weighted { terms } => terms.iter().map(|t| t.0).collect(),
        StepKind::Slerp { base, models, .. } => std::iter::once(*base)
            .chain(models.iter().copied())
            .collect(),
        StepKind::Liti { base, model, .. } => vec![*base, *model],
        StepKind::Linear { models, .. } | StepKind::Passthrough { models, .. } => models.clone(),
        StepKind::TaskVectors(tv) => std::iter::once(tv.base)
            .chain(tv.models.iter().copied())
            .collect(),
        StepKind::ModelStock { base, models, .. } => std::iter::once(*base)
            .chain(models.iter().copied())
            .collect(),
        StepKind::WeightSlerp { base, other, .. } => vec![*base, *other],
        StepKind::NuSlerp { base, models, .. } => {
            base.iter().copied().chain(models.iter().copied()).collect()
        }
    }
}

/// Every input of step `step` of a plan: its operands and, for the step of a layer layout, every slice's.
pub fn step_operands(plan: &Plan, step: usize) -> Vec<Operand> {
    let mut ops = operands(&plan.steps[step].kind);
    for slice in plan.layout.iter().flatten() {
        for op in slice.kind.iter().flat_map(operands) {
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
    }
    ops
}

fn first_leaf(steps: &[Step], from: usize) -> Option<usize> {
    for op in operands(&steps[from].kind) {
        match op {
            Operand::Leaf(l) => return Some(l),
            Operand::Step(s) => {
                if let Some(l) = first_leaf(steps, s) {
                    return Some(l);
                }
            }
        }
    }
    None
}
