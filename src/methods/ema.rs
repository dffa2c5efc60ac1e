//! `ema`: exponential moving average over checkpoints, as one weighted sum with closed-form weights.

use super::{MethodDef, StepArgs};
use crate::kernels;
use crate::recipe::{Operand, RecipeError, StepKind};

pub static EMA: MethodDef = MethodDef {
    name: "ema",
    mergekit_name: None,
    native: true,
    fields: &["models", "decay", "steps", "start"],
    model_params: &[],
    shared_params: &[],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let ops = a.models(1)?;
    let n = a.native().expect("ema is native only");
    let s = n.step();
    let Some(decay) = &s.decay else {
        return Err(n.missing("decay"));
    };
    let mu = decay.value;
    if !(mu > 0.0 && mu <= 1.0) {
        return Err(n.err_at(
            &decay.referenced,
            format!("`decay` must be in (0, 1], got {mu}"),
        ));
    }
    let steps = match &s.steps {
        Some(st) => {
            if st.value.len() != ops.len() {
                return Err(n.err_at(
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
                    return Err(n.err_at(
                        &v.referenced,
                        "`steps` must be positive and strictly increasing".into(),
                    ));
                }
                prev = v.value;
            }
            Some(st.value.iter().map(|v| v.value).collect::<Vec<u64>>())
        }
        None => None,
    };
    let start = match s.start.clone() {
        Some(st) => Some(n.reference(&st)?),
        None => None,
    };
    let (ws, w) = kernels::ema_weights(mu, ops.len(), steps.as_deref(), start.is_some());
    let mut terms: Vec<(Operand, f64)> = Vec::new();
    if let Some(st) = start {
        terms.push((st, ws));
    }
    terms.extend(ops.into_iter().zip(w));
    Ok(StepKind::Weighted { terms })
}
