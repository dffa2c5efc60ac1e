//! `model_stock` (arXiv 2403.19522): θ = t·mean(θ_i) + (1 − t)·θ_b with t = N·c / (1 + (N − 1)·c), c the
//! mean pairwise cosine of the task vectors over the tensor (per row with `filter_wise`).

use super::{MethodDef, StepArgs};
use crate::recipe::{RecipeError, StepKind};

pub static MODEL_STOCK: MethodDef = MethodDef {
    name: "model_stock",
    mergekit_name: Some("model_stock"),
    native: true,
    fields: &["models", "base", "filter_wise"],
    model_params: &[],
    shared_params: &["filter_wise"],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let models = a.models(2)?;
    let base = a.base(true)?.expect("required base");
    Ok(StepKind::ModelStock {
        base,
        models,
        filter_wise: a.flag("filter_wise")?.unwrap_or(false),
    })
}
