//! Resolution of a parsed recipe into a [`Plan`]: references bound to models or earlier steps, every
//! number range-checked, closed-form weights computed, outputs laid out. Nothing here reads tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use super::raw::{Eta, RawRecipe, RawStep, S};
use super::RecipeError;
use crate::format::FloatType;
use crate::kernels;

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
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub method: &'static str,
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
    /// Output dtype; `None` keeps each base tensor's own.
    pub dtype: Option<FloatType>,
    pub shard_size: u64,
    pub ignore_extra_tensors: bool,
    pub allow_nonfinite: bool,
    /// Things worth saying that do not stop the run (η outside [0, 1], ...).
    pub warnings: Vec<String>,
}

impl Plan {
    /// Reads and validates a recipe file. `out` overrides the recipe's `output`.
    pub fn from_file(path: &Path, out: Option<&Path>) -> Result<Plan, RecipeError> {
        let text =
            crate::format::files::read_text_limited(path, crate::format::files::SIDE_FILE_LIMIT)
                .map_err(|source| RecipeError::Io {
                    path: path.into(),
                    source,
                })?;
        Self::from_text(&text, path, out)
    }

    /// Validates recipe `text` as if read from `path` (relative references resolve against its folder).
    pub fn from_text(text: &str, path: &Path, out: Option<&Path>) -> Result<Plan, RecipeError> {
        let raw: RawRecipe = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            let full = e.to_string();
            let first = full.lines().next().unwrap_or("").to_string();
            let message = match first.find(": ") {
                Some(i) if first.starts_with("error: line ") => first[i + 2..].to_string(),
                _ => first.trim_start_matches("error: ").to_string(),
            };
            RecipeError::Invalid {
                path: path.into(),
                line,
                column,
                message,
            }
        })?;
        Resolver::new(path, text).resolve(raw, out)
    }

    /// Every step that the outputs depend on, and the outputs' steps, in recipe order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }
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
        let path = self.dir.join(target);
        if !path.exists() {
            return Err(self.err(
                loc,
                format!(
                    "`{shown}` is not a step, an alias, or an existing path ({} not found)",
                    path.display()
                ),
            ));
        }
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(&i) = self.leaf_by_path.get(&key) {
            return Ok(i);
        }
        self.leaves.push(Leaf {
            path,
            shown: shown.to_string(),
        });
        self.leaf_by_path.insert(key, self.leaves.len() - 1);
        Ok(self.leaves.len() - 1)
    }

    fn resolve(mut self, raw: RawRecipe, out: Option<&Path>) -> Result<Plan, RecipeError> {
        if let Some(models) = &raw.models {
            self.aliases = models.value.clone();
        }
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
        Ok(Plan {
            recipe_path: self.path.to_path_buf(),
            recipe_text: self.text.to_string(),
            leaves: self.leaves,
            steps,
            base,
            targets,
            dtype,
            shard_size,
            ignore_extra_tensors,
            allow_nonfinite: raw.allow_nonfinite.map(|v| v.value).unwrap_or(false),
            warnings: self.warnings,
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
        let method: &'static str = match s.method.value.as_str() {
            "ema" => "ema",
            "slerp" => "slerp",
            "liti" => "liti",
            "linear" => "linear",
            other => {
                return Err(self.err(
                    &s.method.referenced,
                    format!("unknown method `{other}` (use ema, slerp, liti or linear)"),
                ))
            }
        };
        let allowed: &[&str] = match method {
            "ema" => &["models", "decay", "steps", "start"],
            "slerp" => &["models", "base", "t", "weights", "angle"],
            "liti" => &["model", "base", "eta"],
            _ => &["models", "weights", "normalize"],
        };
        for (field, loc) in s.present_fields() {
            if !allowed.contains(&field) {
                return Err(self.err(
                    loc,
                    format!(
                        "`{field}` is not a field of method `{method}` (it takes: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        let name = s.name.value.clone();
        let missing =
            |r: &Self, field: &str| r.err(at, format!("step `{name}` ({method}) needs `{field}`"));

        let models = |r: &mut Self, min: usize| -> Result<Vec<Operand>, RecipeError> {
            let Some(list) = &s.models else {
                return Err(missing(r, "models"));
            };
            if list.value.len() < min {
                return Err(r.err(
                    &list.referenced,
                    format!(
                        "`{method}` needs at least {min} model{}, got {}",
                        if min == 1 { "" } else { "s" },
                        list.value.len()
                    ),
                ));
            }
            list.value.iter().map(|m| r.reference(m, index)).collect()
        };
        let step_base = |r: &mut Self| -> Result<Operand, RecipeError> {
            match &s.base {
                Some(b) => r.reference(b, index),
                None => recipe_base.ok_or_else(|| r.err(at, format!("step `{name}` ({method}) needs a base: set `base:` on the step or in the recipe"))),
            }
        };

        let kind = match method {
            "ema" => {
                let ops = models(self, 1)?;
                let Some(decay) = &s.decay else {
                    return Err(missing(self, "decay"));
                };
                let mu = decay.value;
                if !(mu > 0.0 && mu <= 1.0) {
                    return Err(self.err(
                        &decay.referenced,
                        format!("`decay` must be in (0, 1], got {mu}"),
                    ));
                }
                let steps = match &s.steps {
                    Some(st) => {
                        if st.value.len() != ops.len() {
                            return Err(self.err(
                                &st.referenced,
                                format!(
                                    "`steps` has {} entries for {} models",
                                    st.value.len(),
                                    ops.len()
                                ),
                            ));
                        }
                        let mut prev = 0u64;
                        for (k, v) in st.value.iter().enumerate() {
                            if v.value == 0 || (k > 0 && v.value <= prev) {
                                return Err(self.err(
                                    &v.referenced,
                                    "`steps` must be positive and strictly increasing",
                                ));
                            }
                            prev = v.value;
                        }
                        Some(st.value.iter().map(|v| v.value).collect::<Vec<u64>>())
                    }
                    None => None,
                };
                let start = match &s.start {
                    Some(st) => Some(self.reference(st, index)?),
                    None => None,
                };
                let (ws, w) =
                    kernels::ema_weights(mu, ops.len(), steps.as_deref(), start.is_some());
                let mut terms: Vec<(Operand, f64)> = Vec::new();
                if let Some(st) = start {
                    terms.push((st, ws));
                }
                terms.extend(ops.into_iter().zip(w));
                StepKind::Weighted { terms }
            }
            "linear" => {
                let ops = models(self, 1)?;
                let Some(weights) = &s.weights else {
                    return Err(missing(self, "weights"));
                };
                if weights.value.len() != ops.len() {
                    return Err(self.err(
                        &weights.referenced,
                        format!(
                            "`weights` has {} entries for {} models",
                            weights.value.len(),
                            ops.len()
                        ),
                    ));
                }
                for w in &weights.value {
                    if !w.value.is_finite() {
                        return Err(self.err(&w.referenced, "weights must be finite numbers"));
                    }
                }
                let mut w: Vec<f64> = weights.value.iter().map(|w| w.value).collect();
                if s.normalize.as_ref().map(|n| n.value).unwrap_or(true) {
                    w = kernels::normalize_weights(&w).ok_or_else(|| {
                        self.err(
                            &weights.referenced,
                            "`weights` sum to 0 (or cancel to almost nothing): cannot normalize (set `normalize: false`)",
                        )
                    })?;
                }
                StepKind::Weighted {
                    terms: ops.into_iter().zip(w).collect(),
                }
            }
            "slerp" => {
                let ops = models(self, 2)?;
                let base = step_base(self)?;
                let weights: Vec<f64> = match (&s.t, &s.weights) {
                    (Some(t), Some(_)) => {
                        return Err(
                            self.err(&t.referenced, "give either `t` or `weights`, not both")
                        )
                    }
                    (Some(t), None) => {
                        if ops.len() != 2 {
                            return Err(self.err(
                                &t.referenced,
                                format!("`t` is for two models; use `weights` for {}", ops.len()),
                            ));
                        }
                        if !(0.0..=1.0).contains(&t.value) {
                            return Err(self.err(
                                &t.referenced,
                                format!("`t` must be in [0, 1], got {}", t.value),
                            ));
                        }
                        vec![1.0 - t.value, t.value]
                    }
                    (None, Some(w)) => {
                        if w.value.len() != ops.len() {
                            return Err(self.err(
                                &w.referenced,
                                format!(
                                    "`weights` has {} entries for {} models",
                                    w.value.len(),
                                    ops.len()
                                ),
                            ));
                        }
                        for x in &w.value {
                            if !(x.value > 0.0 && x.value.is_finite()) {
                                return Err(self.err(
                                    &x.referenced,
                                    format!("slerp weights must be positive, got {}", x.value),
                                ));
                            }
                        }
                        w.value.iter().map(|x| x.value).collect()
                    }
                    (None, None) => vec![1.0; ops.len()],
                };
                let lambdas = match &s.t {
                    Some(t) => vec![t.value],
                    None => kernels::chain_lambdas(&weights),
                };
                let angle = match &s.angle {
                    None => Angle::Layer,
                    Some(a) if a.value == "layer" => Angle::Layer,
                    Some(a) if a.value == "tensor" => Angle::Tensor,
                    Some(a) => {
                        return Err(self.err(
                            &a.referenced,
                            format!("`angle` must be `layer` or `tensor`, not `{}`", a.value),
                        ))
                    }
                };
                StepKind::Slerp {
                    base,
                    models: ops,
                    lambdas,
                    angle,
                }
            }
            _ => {
                let Some(model) = &s.model else {
                    return Err(missing(self, "model"));
                };
                let model = self.reference(model, index)?;
                let base = step_base(self)?;
                let Some(eta) = &s.eta else {
                    return Err(missing(self, "eta"));
                };
                let etas = match &eta.value {
                    Eta::One(e) => vec![*e],
                    Eta::List(list) => {
                        if !is_output {
                            return Err(self.err(
                                &eta.referenced,
                                "a list of η is allowed only on the output step",
                            ));
                        }
                        if list.is_empty() {
                            return Err(self.err(&eta.referenced, "`eta` is an empty list"));
                        }
                        if list.len() > MAX_ETAS {
                            return Err(self.err(
                                &eta.referenced,
                                format!(
                                    "`eta` lists {} values: at most {MAX_ETAS} (one output folder each)",
                                    list.len()
                                ),
                            ));
                        }
                        // −0.0 is 0.0: one folder, `eta-0.0`.
                        let list: Vec<f64> = list.iter().map(|&e| e + 0.0).collect();
                        if let Some(e) = duplicate_eta(&list) {
                            return Err(self.err(
                                &eta.referenced,
                                format!("`eta` lists {e:?} twice (each η is one output folder)"),
                            ));
                        }
                        list
                    }
                };
                for &e in &etas {
                    if !e.is_finite() {
                        return Err(self.err(&eta.referenced, "η must be a finite number"));
                    }
                    if !(0.0..=1.0).contains(&e) {
                        self.warn(
                            &eta.referenced,
                            format!("η = {e} is outside [0, 1]: extrapolating"),
                        );
                    }
                }
                StepKind::Liti { base, model, etas }
            }
        };
        // A list, even of one η, writes `OUTPUT/eta-<η>` folders.
        if matches!(s.eta.as_ref().map(|e| &e.value), Some(Eta::List(_))) {
            self.list_steps.push(index);
        }
        Ok(Step {
            name,
            method,
            kind,
            line: at.line(),
        })
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
    }
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
