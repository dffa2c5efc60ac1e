//! `run`, `verify`, `inspect`: the merge engine on the command line.

use std::collections::BTreeMap;

use clap::Args;
use gemma_merge::executor::{verify_folder, PlanSummary, Prepared, RunOptions};
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
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An output folder holding merge-manifest.json.
    pub dir: PathArg,
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
    if a.dry_run {
        prepared.check_outputs(&opts)?;
        let s = prepared.summary();
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&s)?)?;
        } else {
            print_summary(&s)?;
        }
        return Ok(());
    }
    let bar = super::progress_bar(
        g,
        "{spinner} merging [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}",
    );
    let report = prepared.run(&opts, &|done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else if !g.quiet {
        for o in &report.outputs {
            outln!("wrote {}", o.display())?;
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

fn print_summary(s: &PlanSummary) -> std::io::Result<()> {
    outln!("plan (dry run: nothing is written)")?;
    outln!("inputs:")?;
    for (shown, path, bytes) in &s.inputs {
        outln!("  {shown:<24} {} ({})", path.display(), human_bytes(*bytes))?;
    }
    outln!("steps:")?;
    for (name, method) in &s.steps {
        outln!("  {name:<24} {method}")?;
    }
    outln!("outputs:")?;
    for o in &s.outputs {
        outln!("  {}", o.display())?;
    }
    outln!(
        "tensors: {} ({} merged, {} copied)",
        s.tensors,
        s.merged_tensors,
        s.copied_tensors
    )?;
    outln!("passes over the inputs: {}", s.passes)?;
    outln!("bytes to read: {} (at most)", human_bytes(s.bytes_to_read))?;
    outln!("bytes to write: {}", human_bytes(s.bytes_to_write))?;
    outln!(
        "peak memory estimate: {} (plus the page cache)",
        human_bytes(s.peak_memory_estimate)
    )?;
    for w in &s.warnings {
        outln!("warning: {w}")?;
    }
    Ok(())
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
    let report = verify_folder(&a.dir)?;
    if !report.mismatches.is_empty() {
        for m in &report.mismatches {
            eprintln!("mismatch: {m}");
        }
        anyhow::bail!(
            "{}: {} of {} files differ from merge-manifest.json",
            a.dir.display(),
            report.mismatches.len(),
            report.mismatches.len() + report.checked.len()
        );
    }
    if !g.quiet {
        if g.verbose {
            for c in &report.checked {
                outln!("ok {c}")?;
            }
        }
        outln!(
            "{}: {} files match merge-manifest.json",
            a.dir.display(),
            report.checked.len()
        )?;
    }
    Ok(())
}

pub fn inspect(a: &InspectArgs, _g: &Global) -> anyhow::Result<()> {
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
            .map(|f| serde_json::json!({"path": f.path().display().to_string(), "size": f.len()}))
            .collect();
        let out = serde_json::json!({
            "path": a.path.display().to_string(),
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
    outln!("{}", a.path.display())?;
    outln!("files: {}", model.files().len())?;
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
