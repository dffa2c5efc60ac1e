//! `liti`: linear interpolation towards initialization, (1 − η)·θ_base + η·θ_model; a list of η writes
//! one model per value (only on the output step).

use super::{MethodDef, StepArgs};
use crate::recipe::raw::Eta;
use crate::recipe::{duplicate_eta, RecipeError, StepKind, MAX_ETAS};

pub static LITI: MethodDef = MethodDef {
    name: "liti",
    mergekit_name: None,
    native: true,
    fields: &["model", "base", "eta"],
    model_params: &[],
    shared_params: &[],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let model = a.model()?;
    let base = a.base(true)?.expect("required base");
    let n = a.native().expect("liti is native only");
    let Some(eta) = n.step().eta.clone() else {
        return Err(n.missing("eta"));
    };
    let etas = match &eta.value {
        Eta::One(e) => vec![*e],
        Eta::List(list) => {
            if !n.is_output() {
                return Err(n.err_at(
                    &eta.referenced,
                    "a list of η is allowed only on the output step".into(),
                ));
            }
            if list.is_empty() {
                return Err(n.err_at(&eta.referenced, "`eta` is an empty list".into()));
            }
            if list.len() > MAX_ETAS {
                return Err(n.err_at(
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
                return Err(n.err_at(
                    &eta.referenced,
                    format!("`eta` lists {e:?} twice (each η is one output folder)"),
                ));
            }
            list
        }
    };
    for &e in &etas {
        if !e.is_finite() {
            return Err(n.err_at(&eta.referenced, "η must be a finite number".into()));
        }
        if !(0.0..=1.0).contains(&e) {
            n.warn(
                &eta.referenced,
                format!("η = {e} is outside [0, 1]: extrapolating"),
            );
        }
    }
    Ok(StepKind::Liti { base, model, etas })
}
