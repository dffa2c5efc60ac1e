//! `passthrough`: copies one model's tensors (times `scale`); with `slices`, stacks layer ranges.

use super::{check_range, MethodDef, Param, StepArgs};
use crate::recipe::{RecipeError, StepKind};

pub static PASSTHROUGH: MethodDef = MethodDef {
    name: "passthrough",
    mergekit_name: Some("passthrough"),
    native: true,
    fields: &["models", "scale"],
    model_params: &["scale"],
    shared_params: &["scale"],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let models = a.models(1)?;
    // A step, a mergekit config, or one slice of either (each slice is resolved on its own) names the
    // models of each tensor: one to copy, as mergekit requires.
    if models.len() > 1 {
        return Err(a.error(
            Some("models"),
            format!(
                "passthrough copies one model, got {} (to stack layers of several, give each its own slice)",
                models.len()
            ),
        ));
    }
    let scale = match a.per_model("scale", models.len())? {
        Some(v) => v,
        None => vec![Param::Const(1.0); models.len()],
    };
    for s in &scale {
        check_range(a, "scale", s, |_| true, "a finite number")?;
    }
    Ok(StepKind::Passthrough { models, scale })
}
