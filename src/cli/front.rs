//! `front`: the LITI front of a recipe, scored and drawn.

use std::io::Write;

use clap::Args;
use gemma_merge::front::{base_folder, evaluate_front, FrontError, FrontRequest};
use gemma_merge::plot::{FrontPlot, Point};
use gemma_merge::recipe::Plan;
use gemma_merge::safe_out::{check_conflicts, check_target, model_inputs, Kind, Role, Staged};

use super::eval::TokenInput;
use super::{Global, PathArg, UsageError};

#[derive(Debug, Args)]
pub struct FrontArgs {
    /// A recipe whose output step is a `liti` step.
    pub recipe: PathArg,
    #[command(flatten)]
    pub input: TokenInput,
    /// Reference model for KL (default: the liti step's base).
    #[arg(long, value_name = "MODEL")]
    pub reference: Option<PathArg>,
    /// η values, comma separated (default: the step's list, else 0, 0.1, ..., 1).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub eta: Option<Vec<f64>>,
    /// Draw the front as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathArg>,
    /// Also write each η model as an ordinary output folder under DIR (DIR/eta-0.3, ...).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathArg>,
    /// Replace an existing --keep folder or --plot file, only if gemma-merge wrote it.
    #[arg(long)]
    pub force: bool,
    /// Truncate the input to N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Window length, as for eval.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Do not score the SLERP step's input policies.
    #[arg(long)]
    pub no_policies: bool,
    /// Fast mode: bf16 × bf16 matrix products with f32 sums (AVX512-BF16 `vdpbf16ps`, as llama.cpp and
    /// PyTorch's bf16 path), activations rounded to bf16; exact mode where the CPU lacks AVX512-BF16.
    /// Less exact than the default (see docs/performance.md for the measured deviation).
    #[arg(long)]
    pub fast: bool,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn front(a: &FrontArgs, g: &Global) -> anyhow::Result<()> {
    super::eval::set_fast(a.fast);
    let placeholder = a.recipe.with_extension("front-not-written");
    let plan = Plan::from_file(&a.recipe, Some(a.keep.as_deref().unwrap_or(&placeholder)))?;
    if !g.quiet {
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
    }
    gemma_merge::front::liti_step(&plan).map_err(|e| UsageError(e.to_string()))?;
    let inputs = check_outputs(a, &plan)?;
    let folder = base_folder(&plan);
    let config = gemma_merge::model::Config::from_folder(&folder)?;
    let tokens =
        super::eval::input_tokens(&a.input, &[&folder], config.bos_token_id, a.max_tokens)?;
    let name = a
        .recipe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let quiet = g.quiet || a.json;
    let front = evaluate_front(
        FrontRequest {
            plan,
            etas: a.eta.clone(),
            reference: a.reference.clone(),
            keep: a.keep.clone(),
            force: a.force,
            inputs,
            tokens: &tokens,
            context: a.context,
            policies: !a.no_policies,
        },
        &|msg| {
            if !quiet && g.verbose {
                eprintln!("{msg}");
            }
        },
    )
    .map_err(|e| match e {
        FrontError::Usage(m) => anyhow::Error::new(UsageError(m)),
        FrontError::Merge(e) => anyhow::Error::new(e),
        other => anyhow::Error::new(other),
    })?;

    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&front.points)?)?;
    } else {
        writeln!(
            out,
            "LITI front of `{}` ({name}), {} tokens, reference {}",
            front.step,
            front.points.first().map(|p| p.tokens).unwrap_or(0),
            front.reference.label
        )?;
        writeln!(
            out,
            "{:>6}  {:>10}  {:>10}  {:>11}  {:>9}",
            "eta", "KL", "KL max", "perplexity", "top-1"
        )?;
        for p in &front.points {
            writeln!(
                out,
                "{:>6}  {:>10.6}  {:>10.6}  {:>11.4}  {:>9.4}",
                format!("{:?}", p.eta),
                p.kl,
                p.kl_max,
                p.perplexity,
                p.top1_agreement
            )?;
        }
        writeln!(
            out,
            "{:>6}  {:>10.6}  {:>10}  {:>11.4}  {:>9.4}  {}",
            "ref", 0.0, "", front.reference.perplexity, 1.0, front.reference.label
        )?;
        for m in &front.policies {
            writeln!(
                out,
                "{:>6}  {:>10.6}  {:>10}  {:>11.4}  {:>9.4}  {} (policy)",
                "", m.kl, "", m.perplexity, m.top1_agreement, m.label
            )?;
        }
    }
    if let Some(path) = &a.plot {
        let reference_name = front
            .reference
            .label
            .trim_end_matches(" (reference)")
            .to_string();
        let plot = FrontPlot {
            title: format!("LITI front — {name}"),
            x_label: format!("KL(model ‖ {reference_name}) [nats/token]"),
            y_label: "perplexity".into(),
            front: front
                .points
                .iter()
                .map(|p| Point {
                    label: format!("η={:?}", p.eta),
                    x: p.kl,
                    y: p.perplexity,
                })
                .collect(),
            reference: Some(Point {
                label: front.reference.label.clone(),
                x: 0.0,
                y: front.reference.perplexity,
            }),
            policies: front
                .policies
                .iter()
                .map(|m| Point {
                    label: m.label.clone(),
                    x: m.kl,
                    y: m.perplexity,
                })
                .collect(),
        };
        let (staged, mut file) = Staged::file(path, Kind::Svg, a.force)?;
        file.write_all(plot.to_svg().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| anyhow::anyhow!("{}: {e}", staged.path().display()))?;
        drop(file);
        staged.commit()?;
        if !g.quiet && !a.json {
            writeln!(out, "wrote {}", path.display())?;
        }
    }
    Ok(())
}

/// Checks `--keep` and `--plot` before any work: neither may touch an input (models, reference, recipe,
/// text file) or the other, and an existing one is replaced only with --force and only if ours. Returns
/// the inputs besides the recipe's models, for the run that writes `--keep`.
fn check_outputs(a: &FrontArgs, plan: &Plan) -> anyhow::Result<Vec<Role>> {
    let mut extra = Vec::new();
    if let Some(r) = &a.reference {
        extra.extend(model_inputs("the reference", r));
    }
    if let Some(t) = &a.input.text {
        extra.push(Role::new("the --text file", t));
    }
    let mut inputs = extra.clone();
    for leaf in &plan.leaves {
        inputs.extend(model_inputs(
            &format!("the input model `{}`", leaf.shown),
            &leaf.path,
        ));
    }
    inputs.push(Role::new("the recipe", &plan.recipe_path));
    let mut outputs = Vec::new();
    if let Some(k) = &a.keep {
        outputs.push(Role::new("the --keep folder", k));
    }
    if let Some(p) = &a.plot {
        outputs.push(Role::new("the --plot file", p));
    }
    check_conflicts(&outputs, &inputs)?;
    if let Some(k) = &a.keep {
        check_target(k, Kind::ModelFolder, a.force)?;
    }
    if let Some(p) = &a.plot {
        check_target(p, Kind::Svg, a.force)?;
    }
    Ok(extra)
}
