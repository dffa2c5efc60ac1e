//! `linear`: Σ w_i·θ_i, divided by Σ w_i when `normalize` (default true). No base needed.

use super::{check_range, required_per_model, MethodDef, StepArgs};
use crate::recipe::{RecipeError, StepKind};

pub static LINEAR: MethodDef = MethodDef {
    name: "linear",
    mergekit_name: Some("linear"),
    native: true,
    fields: &["models", "weights", "normalize"],
    model_params: &["weight"],
    shared_params: &["normalize"],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let models = a.models(1)?;
    let weights = required_per_model(a, "weight", models.len())?;
    for w in &weights {
        check_range(a, "weight", w, |_| true, "a finite number")?;
    }
    let normalize = a.flag("normalize")?.unwrap_or(true);
    // Constant weights are normalized here, once, so the executor sees one fixed weighted sum.
    let constants: Option<Vec<f64>> = weights.iter().map(|w| w.as_const()).collect();
    if let Some(mut w) = constants {
        if normalize {
            w = crate::kernels::normalize_weights(&w).ok_or_else(|| {
                a.error(
                    Some("weight"),
                    "`weights` sum to 0 (or cancel to almost nothing): cannot normalize (set `normalize: false`)".into(),
                )
            })?;
        }
        return Ok(StepKind::Weighted {
            terms: models.into_iter().zip(w).collect(),
        });
    }
    Ok(StepKind::Linear {
        models,
        weights,
        normalize,
    })
}
