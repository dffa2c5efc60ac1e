//! Command-line definitions (clap) and dispatch. Each command's implementation lives in its own file.

/// `println!` that returns the write's `io::Result` instead of panicking (on a closed pipe, `main` then
/// exits quietly with success, as `head` expects).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod eval;
mod front;
mod merge;
mod synth;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Merge Gemma-family checkpoints the way Gemma 2 was post-trained (WARP), and check the result.
#[derive(Debug, Parser)]
#[command(name = "gemma-merge", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Worker threads (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// Print only results and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more detail about what is done.
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate a recipe and write the merged model.
    Run(merge::RunArgs),
    /// Re-hash the files listed in DIR/merge-manifest.json; exit 1 on any mismatch.
    Verify(merge::VerifyArgs),
    /// Summarise a model folder or a .safetensors file.
    Inspect(merge::InspectArgs),
    /// Perplexity of a text under a model (built-in Gemma 2 forward pass).
    Eval(eval::EvalArgs),
    /// Continue a prompt (greedy by default).
    Generate(eval::GenerateArgs),
    /// KL divergence, top-1 agreement and perplexities of a model against a reference.
    Compare(eval::CompareArgs),
    /// Score the LITI front of a recipe (each η: KL to the init, perplexity) and draw it.
    Front(front::FrontArgs),
    /// Write a random checkpoint with real Gemma 2 shapes, or a copy of a model plus relative noise.
    Synth(synth::SynthArgs),
}

/// A request that is wrong in itself (exit code 2), as opposed to work that failed (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error: 2 for a wrong request (bad flags, invalid recipe), 1 for failed work.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<gemma_merge::recipe::RecipeError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<gemma_merge::executor::MergeError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<gemma_merge::safe_out::OutputError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
    }
    1
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = match cli.global.threads {
        Some(n) => check_threads(n, cores)?,
        None => cores,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let g = &cli.global;
    match &cli.command {
        Command::Run(a) => merge::run(a, g),
        Command::Verify(a) => merge::verify(a, g),
        Command::Inspect(a) => merge::inspect(a, g),
        Command::Eval(a) => eval::eval(a, g),
        Command::Generate(a) => eval::generate(a, g),
        Command::Compare(a) => eval::compare(a, g),
        Command::Front(a) => front::front(a, g),
        Command::Synth(a) => synth::synth(a, g),
    }
}

/// Most worker threads `--threads` may ask for: 16 per core, at least 64, at most 1024. More only
/// thrashes (every thread holds chunk buffers) and, unbounded, can exhaust the machine's thread limit.
pub fn max_threads(cores: usize) -> usize {
    cores.saturating_mul(16).clamp(64, 1024)
}

fn check_threads(n: usize, cores: usize) -> Result<usize, UsageError> {
    let max = max_threads(cores);
    if n == 0 || n > max {
        return Err(UsageError(format!(
            "--threads {n}: must be between 1 and {max} (16 per core, at least 64, at most 1024; this machine has {cores} cores)"
        )));
    }
    Ok(n)
}

/// A path argument, kept as given.
pub type PathArg = PathBuf;

/// A progress bar on stderr, only on a terminal and without `-q`, drawn with `template`.
pub fn progress_bar(g: &Global, template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if g.quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    Some(b)
}
