//! The task-vector family (mergekit's `generalized_task_arithmetic`): `task_arithmetic`, `ties`,
//! `dare_linear`, `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`. They differ only in how each task vector
//! is sparsified, whether signs are elected, and their defaults, so each is one row here.

use super::{check_range, required_per_model, MethodDef, Param, StepArgs};
use crate::recipe::{RecipeError, StepKind};

/// How each task vector is thinned before the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the ⌊d·n⌋ largest |δ| (ties by flat index, lower first).
    Magnitude,
    /// Keep each element with probability d (counter-based, reproducible).
    Random,
    /// Drop the ⌊γ·n⌋ largest |δ|, then the smallest, so that ⌊d·n⌋ remain.
    MagnitudeOutliers,
}

impl Sparsify {
    /// Whether the kept elements are chosen by rank of |δ| (a selection per task vector and tensor).
    pub fn ranks(self) -> bool {
        matches!(self, Self::Magnitude | Self::MagnitudeOutliers)
    }
}

/// A task-vector merge: θ_b + λ · mix(sparsified w_i·δ_i).
#[derive(Debug, Clone)]
pub struct TaskVectorStep {
    pub base: crate::recipe::Operand,
    pub models: Vec<crate::recipe::Operand>,
    pub weights: Vec<Param>,
    pub density: Vec<Param>,
    pub gamma: Vec<Param>,
    pub sparsify: Sparsify,
    /// TIES sign election ("sum").
    pub consensus: bool,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: Param,
    pub seed: u64,
}

struct Row {
    sparsify: Sparsify,
    consensus: bool,
    normalize: bool,
    rescale: bool,
}

const FIELDS: &[&str] = &[
    "models",
    "base",
    "weights",
    "density",
    "gamma",
    "lambda",
    "normalize",
    "rescale",
    "seed",
];
const MODEL: &[&str] = &["weight", "density", "gamma"];
const SHARED: &[&str] = &[
    "weight",
    "density",
    "gamma",
    "lambda",
    "normalize",
    "rescale",
    "int8_mask",
];

macro_rules! family {
    ($id:ident, $name:literal, $resolve:ident, $sp:expr, $cons:expr, $norm:expr, $resc:expr) => {
        pub static $id: MethodDef = MethodDef {
            name: $name,
            mergekit_name: Some($name),
            native: true,
            fields: FIELDS,
            model_params: MODEL,
            shared_params: SHARED,
            resolve: $resolve,
        };
        fn $resolve(a: &mut dyn StepArgs) -> Result<StepKind, RecipeError> {
            resolve(
                a,
                Row {
                    sparsify: $sp,
                    consensus: $cons,
                    normalize: $norm,
                    rescale: $resc,
                },
            )
        }
    };
}

family!(
    TASK_ARITHMETIC,
    "task_arithmetic",
    r_ta,
    Sparsify::None,
    false,
    false,
    false
);
family!(TIES, "ties", r_ties, Sparsify::Magnitude, true, true, false);
family!(
    DARE_LINEAR,
    "dare_linear",
    r_dl,
    Sparsify::Random,
    false,
    false,
    true
);
family!(
    DARE_TIES,
    "dare_ties",
    r_dt,
    Sparsify::Random,
    true,
    false,
    true
);
family!(
    BREADCRUMBS,
    "breadcrumbs",
    r_bc,
    Sparsify::MagnitudeOutliers,
    false,
    false,
    false
);
family!(
    BREADCRUMBS_TIES,
    "breadcrumbs_ties",
    r_bct,
    Sparsify::MagnitudeOutliers,
    true,
    false,
    false
);

fn resolve(a: &mut dyn StepArgs, row: Row) -> Result<StepKind, RecipeError> {
    let models = a.models(1)?;
    let base = a.base(true)?.expect("required base");
    let n = models.len();
    let weights = required_per_model(a, "weight", n)?;
    for w in &weights {
        check_range(a, "weight", w, |_| true, "a finite number")?;
    }
    let density = a
        .per_model("density", n)?
        .unwrap_or_else(|| vec![Param::Const(1.0); n]);
    for d in &density {
        check_range(a, "density", d, |_| true, "a finite number")?;
    }
    let gamma = a
        .per_model("gamma", n)?
        .unwrap_or_else(|| vec![Param::Const(0.01); n]);
    if row.sparsify == Sparsify::MagnitudeOutliers {
        for g in &gamma {
            check_range(a, "gamma", g, |g| (0.0..=1.0).contains(&g), "in [0, 1]")?;
        }
    } else if a.per_model("gamma", n)?.is_some() {
        return Err(a.error(
            Some("gamma"),
            "`gamma` is only for breadcrumbs methods".into(),
        ));
    }
    let lambda = a.shared("lambda")?.unwrap_or(Param::Const(1.0));
    check_range(a, "lambda", &lambda, |_| true, "a finite number")?;
    Ok(StepKind::TaskVectors(TaskVectorStep {
        base,
        models,
        weights,
        density,
        gamma,
        sparsify: row.sparsify,
        consensus: row.consensus,
        normalize: a.flag("normalize")?.unwrap_or(row.normalize),
        rescale: a.flag("rescale")?.unwrap_or(row.rescale),
        lambda,
        seed: a.seed(),
    }))
}
