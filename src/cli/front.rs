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
    /// Draw the front: FILE.svg (vector) or FILE.png (760×520, drawn with the system's fonts).
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    pub plot: Option<PathArg>,
    /// With --plot: perplexity on a log scale.
    #[arg(long, requires = "plot")]
    pub log_y: bool,
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

/// The plot's format, from its extension.
#[derive(Clone, Copy)]
enum PlotFormat {
    Svg,
    Png,
}

/// Checks `--plot` before any work: a known extension, and a folder that exists.
fn plot_format(path: &std::path::Path) -> anyhow::Result<PlotFormat> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let format = match ext.as_deref() {
        Some("svg") => PlotFormat::Svg,
        Some("png") => PlotFormat::Png,
        _ => {
            return Err(UsageError(format!(
                "--plot {}: the file must end in .svg or .png",
                path.display()
            ))
            .into())
        }
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        return Err(UsageError(format!(
            "--plot {}: the folder {} does not exist",
            path.display(),
            folder.display()
        ))
        .into());
    }
    Ok(format)
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
    // After the aliasing checks (an input named as --plot is reported as such), before any work.
    let plot_format = a.plot.as_deref().map(plot_format).transpose()?;
    let folder = base_folder(&plan);
    let config = gemma_merge::model::Config::from_folder(&folder)?;
    let tokens =
        super::eval::input_tokens(&a.input, &[&folder], config.bos_token_id, a.max_tokens)?;
    let name = a
        .recipe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bars = super::progress::Bars::new(g);
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
            progress: &bars,
        },
        &|msg| {
            if g.verbose {
                bars.note(msg);
            }
        },
    )
    .map_err(|e| match e {
        FrontError::Usage(m) => anyhow::Error::new(UsageError(m)),
        FrontError::Merge(e) => anyhow::Error::new(e),
        other => anyhow::Error::new(other),
    })?;

    bars.finish();
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&json_rows(&front))?)?;
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
            title: format!(
                "LITI front of {name} on {}",
                input_name(
                    &a.input,
                    front.points.first().map(|p| p.tokens + 1).unwrap_or(0)
                )
            ),
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
            log_y: a.log_y,
        };
        let (bytes, kind) = match plot_format.expect("checked with --plot") {
            PlotFormat::Svg => (plot.to_svg().into_bytes(), Kind::Svg),
            PlotFormat::Png => (
                plot.to_png()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                Kind::Png,
            ),
        };
        let (staged, mut file) = Staged::file(path, kind, a.force)?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| anyhow::anyhow!("{}: {e}", staged.path().display()))?;
        drop(file);
        staged.commit()?;
        if !g.quiet && !a.json {
            writeln!(out, "wrote {}", super::shown(path))?;
        }
    }
    Ok(())
}

/// What was scored, for the plot's title: the text file's name, or the number of token ids.
fn input_name(input: &TokenInput, tokens: usize) -> String {
    match &input.text {
        Some(path) => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| super::shown(path)),
        None => format!("{tokens} token ids"),
    }
}

/// The rows of the table as JSON (keys in docs/cli.md): the η rows, in η order, then the reference and the
/// policies.
fn json_rows(front: &gemma_merge::front::Front) -> Vec<serde_json::Value> {
    let tokens = front.points.first().map(|p| p.tokens).unwrap_or(0);
    let reference_perplexity = front.reference.perplexity;
    let mut rows: Vec<serde_json::Value> = front
        .points
        .iter()
        .map(|p| {
            serde_json::json!({
                "kind": "eta",
                "eta": p.eta,
                "kl": p.kl,
                "kl_max": p.kl_max,
                "top1_agreement": p.top1_agreement,
                "perplexity": p.perplexity,
                "reference_perplexity": p.reference_perplexity,
                "tokens": p.tokens,
                "label": format!("η={:?}", p.eta),
            })
        })
        .collect();
    let marker = |kind: &str, m: &gemma_merge::front::Marker| {
        serde_json::json!({
            "kind": kind,
            "eta": null,
            "kl": m.kl,
            "kl_max": null,
            "top1_agreement": m.top1_agreement,
            "perplexity": m.perplexity,
            "reference_perplexity": reference_perplexity,
            "tokens": tokens,
            "label": m.label,
        })
    };
    rows.push(marker("reference", &front.reference));
    rows.extend(front.policies.iter().map(|m| marker("policy", m)));
    rows
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
        let kind = match plot_format(p)? {
            PlotFormat::Svg => Kind::Svg,
            PlotFormat::Png => Kind::Png,
        };
        check_target(p, kind, a.force)?;
    }
    Ok(extra)
}
