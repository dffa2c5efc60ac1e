//! `run`, `verify`, `inspect`: the merge engine on the command line.

use std::collections::BTreeMap;

use clap::Args;
use gemma_merge::executor::{verify_folder, PlanSummary, Prepared, RunOptions, RunReport};
use gemma_merge::format::Model;
use gemma_merge::recipe::Plan;

use super::{Global, PathArg};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The recipe (YAML).
    pub recipe: PathArg,
    /// Output folder (overrides the recipe's `output`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathArg>,
    /// Replace an existing output folder written by gemma-merge (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Validate everything that can be checked without reading tensor data, print the plan, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Record the SHA-256 of every input file in the manifest.
    #[arg(long)]
    pub hash_inputs: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
    /// Seed of random methods (DARE) for a mergekit config; a recipe sets `seed:` itself.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Write only part I of N of the output shards (from 1), for `join` to assemble; `auto` reads a SLURM
    /// array task or a Kubernetes Indexed Job (see docs/distributed.md).
    #[arg(long, value_name = "I/N|auto", conflicts_with = "join")]
    pub part: Option<String>,
    /// Assemble the parts written by `--part` runs into the output (the same as `gemma-merge join`).
    #[arg(long, conflicts_with = "dry_run")]
    pub join: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An output folder holding merge-manifest.json.
    pub dir: PathArg,
    /// Print a JSON object ({"dir", "ok", "checked", "mismatches"}) instead of text; exit 1 still on a mismatch.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model folder or a .safetensors file.
    pub path: PathArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &RunArgs, g: &Global) -> anyhow::Result<()> {
    let part = a
        .part
        .as_deref()
        .map(|spec| super::parts::resolve_part(spec, &|name| std::env::var(name).ok()))
        .transpose()?;
    let plan = Plan::load(&a.recipe, a.out.as_deref(), a.seed)?;
    if !g.quiet {
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
    }
    let prepared = Prepared::new(&plan)?;
    let opts = RunOptions {
        force: a.force,
        hash_inputs: a.hash_inputs,
        extra_inputs: Vec::new(),
    };
    if let Some(part) = part {
        return super::parts::run_part(&prepared, part, &opts, a.dry_run, a.json, g);
    }
    if a.join {
        return super::parts::join_prepared(&prepared, &opts, a.json, g);
    }
    if a.dry_run || g.verbose {
        if a.dry_run {
            prepared.check_outputs(&opts)?;
        }
        let s = prepared.summary();
        if !a.dry_run {
            // -v: the plan, on stderr (stdout keeps the result).
            eprint!("{}", summary_text(&s));
        } else if a.json {
            outln!("{}", serde_json::to_string_pretty(&summary_json(&s))?)?;
            return Ok(());
        } else {
            outln!("{}", summary_text(&s).trim_end())?;
            return Ok(());
        }
    }
    let bars = super::progress::Bars::new(g);
    let report = prepared.run(&opts, &bars)?;
    bars.finish();
    let sel = prepared.selection_stats();
    if g.verbose && sel.found_in_window + sel.histogram > 0 {
        // -v: how the streaming top-k selections went (a window that misses costs extra passes).
        eprintln!(
            "rank selections streamed: {} ({} from a sampled window, {} of them found in one pass; {} by histogram passes)",
            sel.found_in_window + sel.histogram,
            sel.windowed,
            sel.found_in_window,
            sel.histogram
        );
    }
    print_run_report(&report, a.json, g)
}

/// What `run` and `join` print when done.
pub fn print_run_report(report: &RunReport, json: bool, g: &Global) -> anyhow::Result<()> {
    if json {
        let out = serde_json::json!({
            "output": super::shown(&report.output),
            "outputs": report.outputs.iter().map(|o| super::shown(o)).collect::<Vec<_>>(),
            "tensors": report.tensors,
            "bytes_written": report.bytes_written,
            "seconds": report.seconds,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
    } else if !g.quiet {
        for o in &report.outputs {
            outln!("wrote {}", super::shown(o))?;
        }
        outln!(
            "{} tensors, {} in {:.2} s",
            report.tensors,
            human_bytes(report.bytes_written),
            report.seconds
        )?;
    }
    Ok(())
}

/// The dry-run plan as JSON: lists of objects with named keys (documented in docs/cli.md).
fn summary_json(s: &PlanSummary) -> serde_json::Value {
    serde_json::json!({
        "steps": s.steps.iter().map(|(name, method)| serde_json::json!({"name": name, "method": method})).collect::<Vec<_>>(),
        "outputs": s.outputs.iter().map(|o| super::shown(o)).collect::<Vec<_>>(),
        "inputs": s.inputs.iter().map(|(name, path, bytes)| serde_json::json!({
            "name": name, "path": super::shown(path), "bytes": bytes,
        })).collect::<Vec<_>>(),
        "tensors": s.tensors,
        "merged_tensors": s.merged_tensors,
        "copied_tensors": s.copied_tensors,
        "passes": s.passes,
        "bytes_to_read": s.bytes_to_read,
        "bytes_to_write": s.bytes_to_write,
        "peak_memory_estimate": s.peak_memory_estimate,
        "peak_memory_bound": s.peak_memory_bound,
        "warnings": s.warnings,
    })
}

/// The plan as text (dry run on stdout, `-v` on stderr).
fn summary_text(s: &PlanSummary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "plan (dry run: nothing is written)");
    let _ = writeln!(o, "inputs:");
    for (shown, path, bytes) in &s.inputs {
        let _ = writeln!(
            o,
            "  {shown:<24} {} ({})",
            super::shown(path),
            human_bytes(*bytes)
        );
    }
    let _ = writeln!(o, "steps:");
    for (name, method) in &s.steps {
        let _ = writeln!(o, "  {name:<24} {method}");
    }
    let _ = writeln!(o, "outputs:");
    for out in &s.outputs {
        let _ = writeln!(o, "  {}", super::shown(out));
    }
    let _ = writeln!(
        o,
        "tensors: {} ({} merged, {} copied)",
        s.tensors, s.merged_tensors, s.copied_tensors
    );
    let _ = writeln!(o, "passes over the inputs: {}", s.passes);
    let _ = writeln!(
        o,
        "bytes to read: {} (at most)",
        human_bytes(s.bytes_to_read)
    );
    let _ = writeln!(o, "bytes to write: {}", human_bytes(s.bytes_to_write));
    let bound = if s.peak_memory_bound > s.peak_memory_estimate {
        format!(
            "; at most {} if the rank selections' windows fill their budget",
            human_bytes(s.peak_memory_bound)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "peak memory estimate: {} (plus the page cache{bound})",
        human_bytes(s.peak_memory_estimate)
    );
    for w in &s.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    o
}

/// "1.23 GB" style sizes (powers of 1000, as the shard sizes).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

pub fn verify(a: &VerifyArgs, g: &Global) -> anyhow::Result<()> {
    let bars = super::progress::Bars::new(g);
    let report = verify_folder(&a.dir, &bars)?;
    bars.finish();
    let dir = super::shown(&a.dir);
    let total = report.mismatches.len() + report.checked.len();
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dir": dir,
                "ok": report.mismatches.is_empty(),
                "checked": report.checked,
                "mismatches": report.mismatches,
            }))?
        )?;
    } else {
        for m in &report.mismatches {
            eprintln!("mismatch: {m}");
        }
        if g.verbose {
            for c in &report.checked {
                outln!("ok {c}")?;
            }
        }
    }
    if !report.mismatches.is_empty() {
        anyhow::bail!(
            "{dir}: {} of {total} files differ from merge-manifest.json",
            report.mismatches.len(),
        );
    }
    if !g.quiet && !a.json {
        outln!(
            "{dir}: {} files match merge-manifest.json",
            report.checked.len()
        )?;
    }
    Ok(())
}

pub fn inspect(a: &InspectArgs, g: &Global) -> anyhow::Result<()> {
    let model = Model::open(&a.path)?;
    let config = model.config()?;
    let params: u64 = model.tensors().iter().map(|t| t.numel() as u64).sum();
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    for t in model.tensors() {
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += t.numel() as u64;
    }
    let config_keys = [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "sliding_window",
        "torch_dtype",
    ];
    let mut cfg = serde_json::Map::new();
    if let Some(c) = &config {
        for k in config_keys {
            if let Some(v) = c.get(k) {
                cfg.insert(k.into(), v.clone());
            }
        }
    }
    if a.json {
        let tensors: Vec<serde_json::Value> = model
            .tensors()
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dtype": format!("{:?}", t.dtype), "shape": t.shape}))
            .collect();
        let files: Vec<serde_json::Value> = model
            .files()
            .iter()
            .map(|f| serde_json::json!({"path": super::shown(f.path()), "size": f.len()}))
            .collect();
        let out = serde_json::json!({
            "path": super::shown(&a.path),
            "tensors": tensors,
            "parameters": params,
            "bytes": model.data_bytes(),
            "dtypes": dtypes,
            "files": files,
            "config": cfg,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    outln!("{}", super::shown(&a.path))?;
    outln!("files: {}", model.files().len())?;
    if g.verbose {
        for f in model.files() {
            outln!(
                "  {} ({})",
                super::shown(f.path()),
                human_bytes(f.len() as u64)
            )?;
        }
    }
    outln!("tensors: {}", model.tensors().len())?;
    outln!("parameters: {params}")?;
    outln!(
        "bytes: {} ({})",
        model.data_bytes(),
        human_bytes(model.data_bytes())
    )?;
    for (d, n) in &dtypes {
        outln!("dtype {d}: {n} parameters")?;
    }
    for (k, v) in &cfg {
        outln!("config {k}: {v}")?;
    }
    for t in model.tensors() {
        outln!(
            "  {:<56} {:<5} {:?}",
            t.name,
            format!("{:?}", t.dtype),
            t.shape
        )?;
    }
    Ok(())
}
