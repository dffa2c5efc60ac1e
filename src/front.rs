//! The LITI front: for each η, the model (1 − η)·θ_base + η·θ_model of a recipe's output `liti` step,
//! scored on a text against a reference — without writing checkpoints. Inputs are read once for all η
//! (and for the merged policies, drawn beside the front).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::evaluate::{compare, compare_to, CompareResult, ReferenceLogits};
use crate::executor::{MemoryModel, Prepared, RunOptions};
use crate::format::FloatType;
use crate::model::{weights::Weight, Config, Gemma2, ModelError};
use crate::progress::{Progress, Unit};
use crate::recipe::{duplicate_eta, eta_label, Operand, OutputModel, OutputTarget, Plan, StepKind};

/// Why a front cannot be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The recipe's output step is not `liti`, or `--eta` is unusable (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Merge(#[from] crate::executor::MergeError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// One η of the front.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FrontPoint {
    pub eta: f64,
    pub kl: f64,
    pub kl_max: f64,
    pub top1_agreement: f64,
    pub perplexity: f64,
    pub reference_perplexity: f64,
    pub tokens: usize,
}

/// A model drawn beside the front (the reference, or a merged policy).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Marker {
    pub label: String,
    pub kl: f64,
    pub perplexity: f64,
    pub top1_agreement: f64,
}

#[derive(Debug, Clone)]
pub struct Front {
    pub points: Vec<FrontPoint>,
    pub reference: Marker,
    pub policies: Vec<Marker>,
    /// The liti step's name.
    pub step: String,
}

/// What to compute.
pub struct FrontRequest<'a> {
    pub plan: Plan,
    /// Replaces the step's η list.
    pub etas: Option<Vec<f64>>,
    /// Reference model folder; default: the liti step's base.
    pub reference: Option<PathBuf>,
    /// Also write the η models as ordinary output folders here.
    pub keep: Option<PathBuf>,
    pub force: bool,
    /// Paths read besides the recipe's models (reference, text file): `keep` must not touch them.
    pub inputs: Vec<crate::safe_out::Role>,
    pub tokens: &'a [u32],
    pub context: Option<usize>,
    /// Also score the SLERP step's input policies.
    pub policies: bool,
    /// Told a "merging" phase (bytes) and a "scoring" phase (model positions, every model's).
    pub progress: &'a dyn Progress,
}

/// The liti step that a front is drawn for, with its base and model.
pub fn liti_step(plan: &Plan) -> Result<(usize, Operand, Operand), FrontError> {
    let out = plan.targets[0].models[0].step;
    match &plan.steps[out].kind {
        StepKind::Liti { base, model, .. } => Ok((out, *base, *model)),
        _ => Err(FrontError::Usage(format!(
            "{}: the output step `{}` is a `{}` step; `front` needs a `liti` step (its η list is the front)",
            plan.recipe_path.display(),
            plan.steps[out].name,
            plan.steps[out].method
        ))),
    }
}

/// The folder whose config.json and tokenizer describe the merged models: the recipe's base.
pub fn base_folder(plan: &Plan) -> PathBuf {
    let p = &plan.leaves[plan.base].path;
    if p.is_dir() {
        p.clone()
    } else {
        p.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// Sets the output step's η list and lays the outputs out as `run` would (`eta-<η>` folders).
fn set_etas(plan: &mut Plan, out: usize, etas: Vec<f64>) -> Result<(), FrontError> {
    if etas.is_empty() {
        return Err(FrontError::Usage("--eta: no values".into()));
    }
    if etas.len() > crate::recipe::MAX_ETAS {
        return Err(FrontError::Usage(format!(
            "--eta: {} values, at most {}",
            etas.len(),
            crate::recipe::MAX_ETAS
        )));
    }
    if let Some(e) = etas.iter().find(|e| !e.is_finite()) {
        return Err(FrontError::Usage(format!(
            "--eta: {e} is not a finite number"
        )));
    }
    let etas: Vec<f64> = etas.iter().map(|&e| e + 0.0).collect();
    if let Some(e) = duplicate_eta(&etas) {
        return Err(FrontError::Usage(format!(
            "--eta: values must be distinct, {e:?} is given twice"
        )));
    }
    if let StepKind::Liti { etas: e, .. } = &mut plan.steps[out].kind {
        *e = etas.clone();
    }
    plan.targets.truncate(1);
    plan.targets[0].models = etas
        .iter()
        .enumerate()
        .map(|(k, &e)| OutputModel {
            subdir: Some(eta_label(e)),
            step: out,
            eta: Some(k),
        })
        .collect();
    Ok(())
}

/// Turns an in-memory model into a forward-pass model, tensor by tensor (the bytes of each tensor are
/// freed as soon as they are moved, so the peak is one model plus one tensor).
fn to_gemma(config: &Config, m: MemoryModel) -> Result<Gemma2, ModelError> {
    let mut weights = HashMap::with_capacity(m.tensors.len());
    for (spec, bytes) in m.tensors {
        if let Some(ft) = FloatType::from_dtype(spec.dtype) {
            weights.insert(spec.name, Weight::from_bytes(ft, spec.shape, bytes)?);
        }
    }
    Gemma2::from_weights(config.clone(), &weights)
}

/// Builds and scores every η (and the markers). `progress` is told each finished model.
pub fn evaluate_front(req: FrontRequest<'_>, progress: &dyn Fn(&str)) -> Result<Front, FrontError> {
    let FrontRequest {
        mut plan,
        etas,
        reference,
        keep,
        force,
        inputs,
        tokens,
        context,
        policies,
        progress: bar,
    } = req;
    let (out, base_op, model_op) = liti_step(&plan)?;
    let etas = match etas {
        Some(e) => e.into_iter().map(|e| e + 0.0).collect(),
        None => match &plan.steps[out].kind {
            StepKind::Liti { etas, .. } if plan.targets[0].models[0].subdir.is_some() => {
                etas.clone()
            }
            _ => (0..=10).map(|k| k as f64 / 10.0).collect(),
        },
    };
    set_etas(&mut plan, out, etas.clone())?;
    let config = Config::from_folder(&base_folder(&plan))?;

    // Extra models evaluated in the same pass: a step used as reference, and the merged policies.
    let mut extra_steps: Vec<(String, usize)> = Vec::new();
    let mut disk: Vec<(String, PathBuf)> = Vec::new();
    let reference_label;
    let reference_source = match &reference {
        Some(p) => {
            reference_label = format!("{} (reference)", p.display());
            Some(p.clone())
        }
        None => match base_op {
            Operand::Leaf(l) => {
                reference_label = format!("{} (reference)", plan.leaves[l].shown);
                Some(plan.leaves[l].path.clone())
            }
            Operand::Step(s) => {
                reference_label = format!("{} (reference)", plan.steps[s].name);
                extra_steps.push((reference_label.clone(), s));
                None
            }
        },
    };
    if policies {
        if let Operand::Step(s) = model_op {
            if let StepKind::Slerp { models, .. } = &plan.steps[s].kind {
                for op in models {
                    match *op {
                        Operand::Leaf(l) => {
                            disk.push((plan.leaves[l].shown.clone(), plan.leaves[l].path.clone()))
                        }
                        Operand::Step(p) => extra_steps.push((plan.steps[p].name.clone(), p)),
                    }
                }
            }
        }
    }

    // Memory stays bounded by one merged model (plus the reference when its logits do not fit): the
    // models are evaluated one at a time, each from the mapped inputs, and dropped once scored.
    let n_eta = etas.len();
    let extra_models = || {
        extra_steps
            .iter()
            .map(|&(_, s)| OutputModel {
                subdir: None,
                step: s,
                eta: None,
            })
            .collect::<Vec<_>>()
    };
    let memory_plan = if let Some(dir) = &keep {
        plan.targets[0].path = dir.clone();
        Prepared::new(&plan)?.run(
            &RunOptions {
                force,
                hash_inputs: false,
                extra_inputs: inputs,
            },
            bar,
        )?;
        let mut p2 = plan.clone();
        p2.targets = vec![OutputTarget {
            path: dir.clone(),
            models: extra_models(),
        }];
        p2
    } else {
        let mut p2 = plan.clone();
        p2.targets[0].models.extend(extra_models());
        p2
    };
    let prepared = if keep.is_none() || !extra_steps.is_empty() {
        Some(Prepared::new(&memory_plan)?)
    } else {
        None
    };
    // Output `i` of `prepared`, evaluated alone.
    let in_memory = |i: usize| -> Result<Gemma2, FrontError> {
        let p = prepared.as_ref().expect("a plan of in-memory outputs");
        Ok(to_gemma(&config, p.run_in_memory_one(i, bar)?)?)
    };
    let extra_offset = if keep.is_some() { 0 } else { n_eta };
    let load_eta = |k: usize| -> Result<Gemma2, FrontError> {
        match &keep {
            Some(dir) => Ok(Gemma2::load(&dir.join(eta_label(etas[k])))?),
            None => in_memory(k),
        }
    };
    let reference_model = match &reference_source {
        Some(p) => Gemma2::load(p)?,
        None => in_memory(extra_offset)?,
    };
    let context =
        context.unwrap_or_else(|| crate::evaluate::default_context(&reference_model, tokens.len()));

    // The reference's logits are computed once and kept when they fit (positions × vocab f32 ≤ 1 GiB),
    // and the reference model is then dropped; otherwise the reference is rerun beside each model.
    // Both give the same numbers.
    let fits = tokens
        .len()
        .saturating_sub(1)
        .saturating_mul(reference_model.config().vocab_size)
        .saturating_mul(4)
        <= 1 << 30;
    // Model runs: each η and each policy, plus the reference once (cached) or beside each model.
    let scored =
        (n_eta + extra_steps.len() - usize::from(reference_source.is_none()) + disk.len()) as u64;
    let runs = if fits { scored + 1 } else { 2 * scored };
    bar.start(
        "scoring",
        runs * crate::evaluate::positions_to_run(tokens.len(), context)?,
        Unit::Positions,
    );
    let (cached, reference_model) = if fits {
        let logits = ReferenceLogits::new(&reference_model, tokens, context, bar)?;
        drop(reference_model);
        (Some(logits), None)
    } else {
        (None, Some(reference_model))
    };
    let score = |model: &Gemma2| -> Result<CompareResult, ModelError> {
        match (&cached, &reference_model) {
            (Some(r), _) => compare_to(model, r, bar),
            (None, Some(reference)) => compare(model, reference, tokens, context, bar),
            (None, None) => unreachable!("a reference, as logits or as a model"),
        }
    };
    let mut points = Vec::with_capacity(n_eta);
    let mut reference_perplexity = f64::NAN;
    for (k, &eta) in etas.iter().enumerate() {
        let model = load_eta(k)?;
        let c = score(&model)?;
        drop(model);
        reference_perplexity = c.reference_perplexity;
        progress(&format!(
            "η = {eta:?}: KL {:.6}, perplexity {:.4}",
            c.kl, c.perplexity
        ));
        points.push(FrontPoint {
            eta,
            kl: c.kl,
            kl_max: c.kl_max,
            top1_agreement: c.top1_agreement,
            perplexity: c.perplexity,
            reference_perplexity: c.reference_perplexity,
            tokens: c.tokens,
        });
    }
    let marker = |label: &str, model: Gemma2| -> Result<Marker, ModelError> {
        let c = score(&model)?;
        Ok(Marker {
            label: label.to_string(),
            kl: c.kl,
            perplexity: c.perplexity,
            top1_agreement: c.top1_agreement,
        })
    };
    let mut markers = Vec::new();
    let first_policy = usize::from(reference_source.is_none());
    for (i, (label, _)) in extra_steps.iter().enumerate().skip(first_policy) {
        markers.push(marker(label, in_memory(extra_offset + i)?)?);
    }
    for (label, path) in &disk {
        markers.push(marker(label, Gemma2::load(path)?)?);
    }
    Ok(Front {
        points,
        reference: Marker {
            label: reference_label,
            kl: 0.0,
            perplexity: reference_perplexity,
            top1_agreement: 1.0,
        },
        policies: markers,
        step: plan.steps[out].name.clone(),
    })
}
