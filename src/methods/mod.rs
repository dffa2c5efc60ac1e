//! The merge methods, one file each: the fields a step takes, their defaults and checks, and the
//! [`StepKind`] the executor runs. Both recipe kinds (gemma-merge recipes and mergekit configs) reach a
//! method only through [`lookup`], so adding a method means adding a file and one line to [`REGISTRY`].

mod ema;
mod linear;
mod liti;
mod model_stock;
mod nuslerp;
mod param;
mod passthrough;
mod slerp;
mod task_arithmetic;
mod weight_slerp;

pub use param::Param;
pub use task_arithmetic::{Sparsify, TaskVectorStep};

use crate::recipe::raw::{RawStep, S};
use crate::recipe::{Operand, RecipeError, StepKind};

/// What a method needs from the recipe that names it, whichever kind of recipe that is.
pub trait StepArgs {
    /// The models the step merges (for mergekit configs: every model but the base), at least `min`.
    fn models(&mut self, min: usize) -> Result<Vec<Operand>, RecipeError>;
    /// The single `model` of a step that takes one (native recipes).
    fn model(&mut self) -> Result<Operand, RecipeError>;
    /// The step's base (its own, else the recipe's); `required` makes a missing base an error.
    fn base(&mut self, required: bool) -> Result<Option<Operand>, RecipeError>;
    /// A per-model parameter (`weight`, `density`, `gamma`, `epsilon`): one value per model, each falling
    /// back to the shared value of the same name; `None` when no model and no shared value sets it.
    fn per_model(&self, key: &str, n: usize) -> Result<Option<Vec<Param>>, RecipeError>;
    /// A shared numeric parameter (`lambda`, `t`, `scale`).
    fn shared(&self, key: &str) -> Result<Option<Param>, RecipeError>;
    /// A shared flag (`normalize`, `rescale`, `filter_wise`, ...).
    fn flag(&self, key: &str) -> Result<Option<bool>, RecipeError>;
    /// The seed of random methods (recipe `seed:`, mergekit `--seed`; default 0).
    fn seed(&self) -> u64;
    /// An error about `key` (at its position when it is set), or about the step.
    fn error(&self, key: Option<&str>, message: String) -> RecipeError;
    /// Native recipes only: the raw step, for the WARP methods' own fields.
    fn native(&mut self) -> Option<&mut dyn NativeArgs>;
}

/// The fields only gemma-merge's own recipes have (EMA steps, η lists, SLERP angles).
pub trait NativeArgs {
    fn step(&self) -> &RawStep;
    fn reference(&mut self, r: &S<String>) -> Result<Operand, RecipeError>;
    fn is_output(&self) -> bool;
    fn warn(&mut self, loc: &serde_saphyr::Location, message: String);
    fn err_at(&self, loc: &serde_saphyr::Location, message: String) -> RecipeError;
    /// "step `name` (method) needs `field`", at the step.
    fn missing(&self, field: &str) -> RecipeError;
}

/// One merge method.
pub struct MethodDef {
    pub name: &'static str,
    /// Usable as `merge_method:` in a mergekit config (under this name).
    pub mergekit_name: Option<&'static str>,
    /// Usable as `method:` in a gemma-merge recipe.
    pub native: bool,
    /// The step fields a gemma-merge recipe may set for it (besides `name`, `method`, `save`).
    pub fields: &'static [&'static str],
    /// The per-model parameters a mergekit config may set for it.
    pub model_params: &'static [&'static str],
    /// The shared parameters a mergekit config may set for it.
    pub shared_params: &'static [&'static str],
    pub resolve: fn(&mut dyn StepArgs) -> Result<StepKind, RecipeError>,
}

/// Every method, in the order `--help` texts and error messages list them.
pub static REGISTRY: &[&MethodDef] = &[
    &ema::EMA,
    &slerp::SLERP,
    &liti::LITI,
    &linear::LINEAR,
    &task_arithmetic::TASK_ARITHMETIC,
    &task_arithmetic::TIES,
    &task_arithmetic::DARE_LINEAR,
    &task_arithmetic::DARE_TIES,
    &task_arithmetic::BREADCRUMBS,
    &task_arithmetic::BREADCRUMBS_TIES,
    &model_stock::MODEL_STOCK,
    &weight_slerp::WEIGHT_SLERP,
    &nuslerp::NUSLERP,
    &passthrough::PASSTHROUGH,
];

/// The method a gemma-merge recipe's `method:` names.
pub fn native(name: &str) -> Option<&'static MethodDef> {
    REGISTRY
        .iter()
        .copied()
        .find(|m| m.native && m.name == name)
}

/// The method a mergekit config's `merge_method:` names.
pub fn mergekit(name: &str) -> Option<&'static MethodDef> {
    REGISTRY
        .iter()
        .copied()
        .find(|m| m.mergekit_name == Some(name))
}

/// "a, b or c" of the method names of one recipe kind.
pub fn names(mergekit: bool) -> String {
    let v: Vec<&str> = REGISTRY
        .iter()
        .filter_map(|m| {
            if mergekit {
                m.mergekit_name
            } else {
                m.native.then_some(m.name)
            }
        })
        .collect();
    match v.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => v.join(""),
    }
}

/// Checks that every constant a parameter can take lies in `range`, naming `key`.
pub(crate) fn check_range(
    a: &dyn StepArgs,
    key: &str,
    p: &Param,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<(), RecipeError> {
    for v in p.constants() {
        if !v.is_finite() || !ok(v) {
            return Err(a.error(Some(key), format!("`{key}` must be {what}, got {v}")));
        }
    }
    Ok(())
}

/// A per-model list where every model needs a value: missing ones are an error naming the key.
pub(crate) fn required_per_model(
    a: &dyn StepArgs,
    key: &str,
    n: usize,
) -> Result<Vec<Param>, RecipeError> {
    a.per_model(key, n)?
        .ok_or_else(|| a.error(None, format!("needs `{key}` for every model")))
}
