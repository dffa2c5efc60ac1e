//! `nuslerp`: SLERP of two task vectors (with a base) or of two models, weights w_1 : w_2; one angle per
//! tensor (`nuslerp_flatten`, default), per row, or per column (`nuslerp_row_wise`).

use super::{check_range, required_per_model, MethodDef, StepArgs};
use crate::recipe::{Grouping, RecipeError, StepKind};

pub static NUSLERP: MethodDef = MethodDef {
    name: "nuslerp",
    mergekit_name: Some("nuslerp"),
    native: true,
    fields: &[
        "models",
        "base",
        "weights",
        "nuslerp_flatten",
        "nuslerp_row_wise",
    ],
    model_params: &["weight"],
    shared_params: &["weight", "nuslerp_flatten", "nuslerp_row_wise"],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let models = a.models(2)?;
    if models.len() != 2 {
        return Err(a.error(
            None,
            format!(
                "nuslerp takes exactly two models besides the base, got {}",
                models.len()
            ),
        ));
    }
    let base = a.base(false)?;
    let weights = required_per_model(a, "weight", 2)?;
    for w in &weights {
        check_range(a, "weight", w, |_| true, "a finite number")?;
    }
    let flatten = a.flag("nuslerp_flatten")?.unwrap_or(true);
    let row_wise = a.flag("nuslerp_row_wise")?.unwrap_or(false);
    let grouping = match (flatten, row_wise) {
        (true, _) => Grouping::Tensor,
        (false, false) => Grouping::Rows,
        (false, true) => Grouping::Columns,
    };
    Ok(StepKind::NuSlerp {
        base,
        models,
        weights,
        grouping,
    })
}
