//! `eval`, `generate`, `compare`: the built-in Gemma 2 forward pass on the command line.

use clap::Args;

use super::{Global, PathArg};

/// Where the tokens come from: a text file (tokenized, `<bos>` prepended) or raw ids.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct TokenInput {
    /// A UTF-8 text file, tokenized with the model's tokenizer.json (`<bos>` prepended).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathArg>,
    /// Token ids used as given, comma separated: 2,651,...
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model folder (config.json + safetensors).
    pub model: PathArg,
    #[command(flatten)]
    pub input: TokenInput,
    /// Truncate the input to N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Window length: long inputs are scored in windows of N tokens, each starting with <bos>.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Write the logits at every input position as a safetensors file (tensor `logits`, F32).
    #[arg(long, value_name = "FILE")]
    pub dump_logits: Option<PathArg>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (config.json + safetensors).
    pub model: PathArg,
    /// Prompt text (tokenized, <bos> prepended).
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt token ids used as given, comma separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
    /// Truncate the prompt to N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Stop after N generated tokens.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print a JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The model under test.
    pub model: PathArg,
    /// The reference model (same vocabulary).
    #[arg(long, value_name = "MODEL")]
    pub reference: PathArg,
    #[command(flatten)]
    pub input: TokenInput,
    /// Truncate the input to N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Window length, as for eval.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(_args: &EvalArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("eval is not built yet")
}

pub fn generate(_args: &GenerateArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("generate is not built yet")
}

pub fn compare(_args: &CompareArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("compare is not built yet")
}
