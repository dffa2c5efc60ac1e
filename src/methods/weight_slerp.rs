//! `weight_slerp` (mergekit's `slerp`): spherical interpolation of two models' weights themselves, from
//! the base (t = 0) to the other (t = 1); linear where the normalised weights are nearly parallel.

use super::{check_range, MethodDef, StepArgs};
use crate::recipe::{RecipeError, StepKind};

pub static WEIGHT_SLERP: MethodDef = MethodDef {
    name: "weight_slerp",
    mergekit_name: Some("slerp"),
    native: true,
    fields: &["models", "base", "t"],
    model_params: &[],
    shared_params: &["t"],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let models = a.models(1)?;
    let base = a.base(true)?.expect("required base");
    if models.len() != 1 {
        return Err(a.error(
            None,
            format!(
                "weight SLERP takes exactly two models (the base and one other), got {}",
                models.len() + 1
            ),
        ));
    }
    let t = a
        .shared("t")?
        .ok_or_else(|| a.error(None, "needs `t`".into()))?;
    check_range(a, "t", &t, |_| true, "a finite number")?;
    Ok(StepKind::WeightSlerp {
        base,
        other: models[0],
        t,
    })
}
