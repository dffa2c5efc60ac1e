//! `slerp`: WARP's spherical interpolation of task vectors θ_m − θ_base, chained over M models, with one
//! angle per layer (default) or per tensor.

use super::{MethodDef, StepArgs};
use crate::kernels;
use crate::recipe::raw::RawParam;
use crate::recipe::{Angle, RecipeError, StepKind};

pub static SLERP: MethodDef = MethodDef {
    name: "slerp",
    mergekit_name: None,
    native: true,
    fields: &["models", "base", "t", "weights", "angle"],
    model_params: &[],
    shared_params: &[],
    resolve,
};

fn resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
    let ops = a.models(2)?;
    let base = a.base(true)?.expect("required base");
    let n = a.native().expect("slerp is native only");
    let s = n.step();
    let number = |p: &crate::recipe::raw::S<RawParam>| -> Result<f64, RecipeError> {
        match &p.value {
            RawParam::Number(v) => Ok(*v),
            _ => Err(n.err_at(&p.referenced, "expected a number".into())),
        }
    };
    let weights: Vec<f64> = match (&s.t, &s.weights) {
        (Some(t), Some(_)) => {
            return Err(n.err_at(
                &t.referenced,
                "give either `t` or `weights`, not both".into(),
            ))
        }
        (Some(t), None) => {
            let tv = number(t)?;
            if ops.len() != 2 {
                return Err(n.err_at(
                    &t.referenced,
                    format!("`t` is for two models; use `weights` for {}", ops.len()),
                ));
            }
            if !(0.0..=1.0).contains(&tv) {
                return Err(n.err_at(&t.referenced, format!("`t` must be in [0, 1], got {tv}")));
            }
            vec![1.0 - tv, tv]
        }
        (None, Some(w)) => {
            let RawParam::List(list) = &w.value else {
                return Err(n.err_at(&w.referenced, "`weights` must be a list of numbers".into()));
            };
            if list.len() != ops.len() {
                return Err(n.err_at(
                    &w.referenced,
                    format!(
                        "`weights` has {} entries for {} models",
                        list.len(),
                        ops.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(list.len());
            for x in list {
                let v = number(x)?;
                if !(v > 0.0 && v.is_finite()) {
                    return Err(n.err_at(
                        &x.referenced,
                        format!("slerp weights must be positive, got {v}"),
                    ));
                }
                out.push(v);
            }
            out
        }
        (None, None) => vec![1.0; ops.len()],
    };
    let lambdas = match &s.t {
        Some(t) => vec![number(t)?],
        None => kernels::chain_lambdas(&weights),
    };
    let angle = match &s.angle {
        None => Angle::Layer,
        Some(x) if x.value == "layer" => Angle::Layer,
        Some(x) if x.value == "tensor" => Angle::Tensor,
        Some(x) => {
            return Err(n.err_at(
                &x.referenced,
                format!("`angle` must be `layer` or `tensor`, not `{}`", x.value),
            ))
        }
    };
    Ok(StepKind::Slerp {
        base,
        models: ops,
        lambdas,
        angle,
    })
}
