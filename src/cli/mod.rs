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
mod parts;
mod progress;
mod synth;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Merge Gemma-family checkpoints the way Gemma 2 was post-trained (WARP), and check the result.
#[derive(Debug, Parser)]
#[command(
    name = "gemma-merge",
    version,
    about,
    after_help = "Examples:\n  gemma-merge run recipes/demo-warp.yaml\n  gemma-merge eval out/demo-warp --text fixtures/demo/heldout-target.txt\n  gemma-merge completions bash > /etc/bash_completion.d/gemma-merge\n\nThe full contract (flags, JSON keys, exit codes) is docs/cli.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The help heading of the flags every command takes, shown apart from each command's own.
const GLOBAL: &str = "Global options";

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Worker threads (default: all cores).
    #[arg(long, global = true, value_name = "N", help_heading = GLOBAL)]
    pub threads: Option<usize>,
    /// Print only results and errors (no progress bar, no notes on stderr).
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub quiet: bool,
    /// Print more detail: the plan and phase timings (run, front, synth), each window (eval, compare),
    /// each file (verify, inspect), the prompt's token ids (generate).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "quiet",
        help_heading = GLOBAL
    )]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate a recipe and write the merged model.
    #[command(
        after_help = "Examples:\n  gemma-merge run recipes/demo-warp.yaml\n  gemma-merge run recipes/warp-round.yaml --out out/round1 --force\n  gemma-merge run recipes/demo-warp.yaml --dry-run --json"
    )]
    Run(merge::RunArgs),
    /// Assemble the parts written by `run --part I/N` into the output, byte-identical to a plain run.
    Join(parts::JoinArgs),
    /// Re-hash the files listed in DIR/merge-manifest.json; exit 1 on any mismatch.
    #[command(
        after_help = "Examples:\n  gemma-merge verify out/demo-warp\n  gemma-merge verify out/demo-warp --json"
    )]
    Verify(merge::VerifyArgs),
    /// Summarise a model folder or a .safetensors file.
    #[command(
        after_help = "Examples:\n  gemma-merge inspect fixtures/demo/sft\n  gemma-merge inspect fixtures/demo/sft/model.safetensors --json"
    )]
    Inspect(merge::InspectArgs),
    /// Perplexity of a text under a model (built-in Gemma 2 forward pass).
    #[command(
        after_help = "Examples:\n  gemma-merge eval out/demo-warp --text fixtures/demo/heldout-target.txt\n  gemma-merge eval out/demo-warp --token-ids 2,651,1234 --json"
    )]
    Eval(eval::EvalArgs),
    /// Continue a prompt (greedy by default).
    #[command(
        after_help = "Examples:\n  gemma-merge generate out/demo-warp --prompt \"This License\" --max-new-tokens 40\n  gemma-merge generate out/demo-warp --prompt \"This License\" --temperature 0.8 --top-p 0.9 --seed 1"
    )]
    Generate(eval::GenerateArgs),
    /// KL divergence, top-1 agreement and perplexities of a model against a reference.
    #[command(
        after_help = "Examples:\n  gemma-merge compare out/demo-warp --reference fixtures/demo/sft --text fixtures/demo/heldout-target.txt"
    )]
    Compare(eval::CompareArgs),
    /// Score the LITI front of a recipe (each η: KL to the init, perplexity) and draw it.
    #[command(
        after_help = "Examples:\n  gemma-merge front recipes/demo-warp.yaml --text fixtures/demo/heldout-target.txt --eta 0,0.1,0.3,0.5,1 --plot front.svg\n  gemma-merge front recipes/demo-warp.yaml --text fixtures/demo/heldout-target.txt --plot front.png --log-y --json"
    )]
    Front(front::FrontArgs),
    /// Write a random checkpoint with real Gemma 2 shapes, or a copy of a model plus relative noise.
    #[command(
        after_help = "Examples:\n  gemma-merge synth --shape 2b --out synth/sft\n  gemma-merge synth --shape 2b --layers 4 --vocab-size 32000 --out synth/small\n  gemma-merge synth --from synth/sft --drift 0.01 --seed 1 --out synth/run-a"
    )]
    Synth(synth::SynthArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    #[command(
        after_help = "Examples:\n  gemma-merge completions bash > ~/.local/share/bash-completion/completions/gemma-merge\n  gemma-merge completions zsh > ~/.zfunc/_gemma-merge\n  gemma-merge completions fish > ~/.config/fish/completions/gemma-merge.fish"
    )]
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
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

/// The forward pass allocates the same activation buffers (megabytes each) for every layer. glibc's
/// default hands blocks that large back to the kernel when they are freed, so every layer faulted in
/// fresh zeroed pages (about 120 000 faults for a 128-token prefill of the 2b shape; with this, 47 000,
/// nearly all first touches of the mapped weights, and prefill 7% faster). Here freed blocks up to 1 GiB
/// stay in the heap for the next layer. Only the forward-pass commands set it: the merge keeps the
/// default, so its memory goes back as it streams.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the work starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
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
    if matches!(
        cli.command,
        Command::Eval(_) | Command::Generate(_) | Command::Compare(_) | Command::Front(_)
    ) {
        keep_freed_memory();
    }
    match &cli.command {
        Command::Run(a) => merge::run(a, g),
        Command::Join(a) => parts::join(a, g),
        Command::Verify(a) => merge::verify(a, g),
        Command::Inspect(a) => merge::inspect(a, g),
        Command::Eval(a) => eval::eval(a, g),
        Command::Generate(a) => eval::generate(a, g),
        Command::Compare(a) => eval::compare(a, g),
        Command::Front(a) => front::front(a, g),
        Command::Synth(a) => synth::synth(a, g),
        Command::Completions(a) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "gemma-merge", &mut std::io::stdout());
            Ok(())
        }
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

/// A path as shown to the user: `.` and `..` components folded away lexically (`recipes/../out/x` is
/// `out/x`), never resolved through links, so it stays the path the user would type.
pub fn shown(path: &std::path::Path) -> String {
    use std::path::Component;
    let mut parts: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match parts.last() {
                Some(Component::Normal(_)) => {
                    parts.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => parts.push(c),
            },
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return ".".into();
    }
    parts.iter().collect::<PathBuf>().display().to_string()
}
