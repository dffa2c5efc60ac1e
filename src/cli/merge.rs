//! `run`, `verify`, `inspect`: the merge engine on the command line.

use clap::Args;

use super::{Global, PathArg};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The recipe (YAML).
    pub recipe: PathArg,
    /// Output folder (overrides the recipe's `output`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathArg>,
    /// Replace an existing output folder (only once the new one is complete).
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

pub fn run(_a: &RunArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("run is not built yet")
}

pub fn verify(_a: &VerifyArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("verify is not built yet")
}

pub fn inspect(_a: &InspectArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("inspect is not built yet")
}
