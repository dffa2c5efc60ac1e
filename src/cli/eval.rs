//! `eval`, `generate`, `compare`: the built-in Gemma 2 forward pass on the command line.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use gemma_merge::evaluate::{self, LogitsWriter};
use gemma_merge::model::sampling::{self, Sampler, SamplingParams};
use gemma_merge::model::{folder_of, Gemma2, ModelError, Tokenizer};

use super::progress::Bars;
use super::{Global, PathArg, UsageError};
use gemma_merge::progress::{Progress, Unit};

/// Where the tokens come from: a text file (tokenized, `<bos>` prepended) or raw ids.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct TokenInput {
    /// A UTF-8 text file, tokenized with the model's tokenizer.json (`<bos>` prepended).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathArg>,
    /// Token ids used as given, comma separated: 2,651,...
    #[arg(long, value_name = "IDS", value_delimiter = ',', value_parser = parse_token_id)]
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
    /// Window length: long inputs are scored in windows of N tokens, each starting with <bos>
    /// (default: the whole input, up to max_position_embeddings).
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
    #[arg(long, value_name = "IDS", value_delimiter = ',', value_parser = parse_token_id)]
    pub token_ids: Option<Vec<u32>>,
    /// Truncate the prompt to its first N tokens (`--max-tokens` is an old name of this flag).
    #[arg(long, value_name = "N", alias = "max-tokens")]
    pub max_prompt_tokens: Option<usize>,
    /// Do not print the prompt before the continuation (it is printed unless -q or --json).
    #[arg(long)]
    pub no_echo: bool,
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

/// One token id of a comma-separated list; spaces around it are allowed.
fn parse_token_id(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a token id (a non-negative integer)"))
}

pub fn eval(args: &EvalArgs, g: &Global) -> anyhow::Result<()> {
    check_counts(args.max_tokens, args.context)?;
    let model = Gemma2::load(&args.model)?;
    let (tokens, context) = scored_input(
        &args.input,
        &[&args.model],
        &model,
        args.max_tokens,
        args.context,
    )?;

    let started = Instant::now();
    let bars = Bars::new(g);
    bars.start(
        "scoring",
        evaluate::positions_to_run(tokens.len(), context)?,
        Unit::Positions,
    );
    let score = match &args.dump_logits {
        Some(path) => {
            let mut writer = LogitsWriter::create(path, tokens.len(), model.config().vocab_size)?;
            let score = evaluate::score_with(&model, &tokens, context, &bars, |_, row| {
                writer.write_row(row)
            });
            match score {
                Ok(score) => {
                    writer.finish()?;
                    score
                }
                Err(e) => {
                    drop(writer);
                    let _ = std::fs::remove_file(path);
                    return Err(e.into());
                }
            }
        }
        None => evaluate::score_with(&model, &tokens, context, &bars, |_, _| Ok(()))?,
    };
    bars.finish();
    let seconds = started.elapsed().as_secs_f64();
    let tokens_per_second = score.positions_run as f64 / seconds;
    if args.json {
        print_json(&json!({
            "tokens": score.tokens,
            "mean_nll": score.mean_nll,
            "perplexity": score.perplexity,
            "tokens_per_second": tokens_per_second,
            "input_tokens": tokens.len(),
            "context": context,
            "windows": score.windows,
            "seconds": seconds,
        }))
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tokens      {}", score.tokens)?;
        writeln!(out, "mean_nll    {:.6}", score.mean_nll)?;
        writeln!(out, "perplexity  {:.4}", score.perplexity)?;
        writeln!(out, "tokens/s    {tokens_per_second:.1}")?;
        if g.verbose {
            per_window(&tokens, context, "mean_nll", |r| {
                -score.log_probs[r].iter().sum::<f64>()
            })?;
        }
        if !g.quiet {
            eprintln!(
                "{} input tokens, {} window(s) of up to {context} positions, {seconds:.2} s",
                tokens.len(),
                score.windows
            );
        }
        Ok(())
    }
}

pub fn generate(args: &GenerateArgs, g: &Global) -> anyhow::Result<()> {
    if args.max_prompt_tokens == Some(0) {
        return Err(UsageError("--max-prompt-tokens must be at least 1".into()).into());
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    params
        .validate()
        .map_err(|e| UsageError(format!("--{e}")))?;
    let model = Gemma2::load(&args.model)?;
    let folder = folder_of(&args.model);
    let (mut prompt, tokenizer) = match (&args.prompt, &args.token_ids) {
        (Some(text), _) => {
            let tokenizer = require_tokenizer(&[folder], "--prompt")?;
            (
                tokenizer.encode_with_bos(text, model.config().bos_token_id)?,
                Some(tokenizer),
            )
        }
        (None, Some(ids)) => (ids.clone(), Tokenizer::from_folder_if_present(folder)?),
        (None, None) => {
            return Err(UsageError("give --prompt TEXT or --token-ids IDS".into()).into())
        }
    };
    if let Some(n) = args.max_prompt_tokens {
        prompt.truncate(n);
    }
    model.check_tokens(&prompt)?;

    let mut stop = model.config().eos_token_ids.clone();
    if let Some(id) = tokenizer.as_ref().and_then(|t| t.token_id("<end_of_turn>")) {
        stop.push(id);
    }
    let mut sampler = Sampler::new(params);
    let mut stream = tokenizer.as_ref().map(|t| t.stream());
    let mut out = std::io::stdout().lock();
    let streaming = !args.json;
    if g.verbose {
        eprintln!("prompt: {} tokens {:?}", prompt.len(), prompt);
    }
    if streaming && !g.quiet && !args.no_echo {
        // The prompt goes through the same streaming decoder, so the continuation joins it seamlessly.
        let bos = model.config().bos_token_id;
        let shown = prompt.strip_prefix(&[bos]).unwrap_or(&prompt);
        for &id in shown {
            match &mut stream {
                Some(stream) => out.write_all(stream.push(id)?.as_bytes())?,
                None => write!(out, "{id} ")?,
            }
        }
        out.flush()?;
    }
    let generation = sampling::generate(
        &model,
        &prompt,
        args.max_new_tokens,
        &mut sampler,
        &stop,
        |id| {
            if !streaming {
                return Ok(());
            }
            let written = match &mut stream {
                Some(stream) => {
                    let piece = stream.push(id)?;
                    out.write_all(piece.as_bytes())
                }
                None => write!(out, "{id} "),
            };
            written
                .and_then(|()| out.flush())
                .map_err(|e| ModelError::io("<stdout>", e))
        },
    )?;
    let text = match &tokenizer {
        Some(t) => t.decode(&generation.token_ids)?,
        None => String::new(),
    };
    if let Some(stream) = stream.as_mut().filter(|_| streaming) {
        out.write_all(stream.finish()?.as_bytes())?;
    }
    if args.json {
        drop(out);
        return print_json(&json!({
            "token_ids": generation.token_ids,
            "text": text,
            "prefill_tokens_per_second": generation.prefill_tokens_per_second(),
            "decode_tokens_per_second": generation.decode_tokens_per_second(),
            "prompt_tokens": generation.prompt_tokens,
            "stopped": generation.stopped,
        }));
    }
    writeln!(out)?;
    if !g.quiet {
        eprintln!(
            "{} tokens{}; prefill {} tokens at {:.1} tokens/s, decode {:.2} tokens/s",
            generation.token_ids.len(),
            if generation.stopped {
                " (stopped at an end token)"
            } else {
                ""
            },
            generation.prompt_tokens,
            generation.prefill_tokens_per_second(),
            generation.decode_tokens_per_second()
        );
    }
    Ok(())
}

pub fn compare(args: &CompareArgs, g: &Global) -> anyhow::Result<()> {
    check_counts(args.max_tokens, args.context)?;
    let model = Gemma2::load(&args.model)?;
    let reference = Gemma2::load(&args.reference)?;
    let (vm, vr) = (model.config().vocab_size, reference.config().vocab_size);
    if vm != vr {
        return Err(ModelError::VocabMismatch {
            model: vm,
            reference: vr,
        })
        .with_context(|| {
            format!(
                "cannot compare {} with {}",
                args.model.display(),
                args.reference.display()
            )
        });
    }
    let (tokens, context) = scored_input(
        &args.input,
        &[&args.model, &args.reference],
        &model,
        args.max_tokens,
        args.context,
    )?;
    let started = Instant::now();
    let bars = Bars::new(g);
    bars.start(
        "comparing",
        2 * evaluate::positions_to_run(tokens.len(), context)?,
        Unit::Positions,
    );
    let r = evaluate::compare(&model, &reference, &tokens, context, &bars)?;
    bars.finish();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        return print_json(&json!({
            "tokens": r.tokens,
            "kl": r.kl,
            "kl_max": r.kl_max,
            "top1_agreement": r.top1_agreement,
            "perplexity": r.perplexity,
            "reference_perplexity": r.reference_perplexity,
            "context": context,
            "seconds": seconds,
        }));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "tokens                {}", r.tokens)?;
    writeln!(out, "kl                    {:.6}", r.kl)?;
    writeln!(out, "kl_max                {:.6}", r.kl_max)?;
    writeln!(out, "top1_agreement        {:.4}", r.top1_agreement)?;
    writeln!(out, "perplexity            {:.4}", r.perplexity)?;
    writeln!(out, "reference_perplexity  {:.4}", r.reference_perplexity)?;
    if g.verbose {
        per_window(&tokens, context, "kl", |i| {
            r.kl_per_position[i].iter().sum()
        })?;
    }
    if !g.quiet {
        eprintln!("{} positions per model in {seconds:.2} s", r.positions_run);
    }
    Ok(())
}

/// `-v`: one line per scoring window on stderr, with the mean over its predicted tokens of the value
/// whose sum `sum(range of predicted-token indices)` gives.
fn per_window(
    tokens: &[u32],
    context: usize,
    what: &str,
    sum: impl Fn(std::ops::Range<usize>) -> f64,
) -> anyhow::Result<()> {
    for (i, w) in evaluate::windows(tokens.len(), context)?.iter().enumerate() {
        // Predicted-token indices of a window: token p (p ≥ 1) is index p − 1.
        let r = w.start.saturating_sub(1)..w.end.saturating_sub(1);
        let n = r.len();
        eprintln!(
            "window {i}: tokens {}..{}, {n} predicted, {what} {}",
            w.start,
            w.end,
            if n == 0 {
                "-".to_string()
            } else {
                format!("{:.6}", sum(r) / n as f64)
            }
        );
    }
    Ok(())
}

/// `--max-tokens` and `--context` values that cannot work are usage errors.
fn check_counts(max_tokens: Option<usize>, context: Option<usize>) -> anyhow::Result<()> {
    if max_tokens == Some(0) {
        return Err(UsageError("--max-tokens must be at least 1".into()).into());
    }
    if let Some(c) = context.filter(|&c| c < 2) {
        return Err(UsageError(format!(
            "--context {c} is too short: a window needs <bos> and at least one token"
        ))
        .into());
    }
    Ok(())
}

/// The input tokens, checked against `model`, and the window length (`--context`, else the default).
fn scored_input(
    input: &TokenInput,
    models: &[&Path],
    model: &Gemma2,
    max_tokens: Option<usize>,
    context: Option<usize>,
) -> anyhow::Result<(Vec<u32>, usize)> {
    let tokens = input_tokens(input, models, model.config().bos_token_id, max_tokens)?;
    evaluate::check_input(model, &tokens)?;
    let context = context.unwrap_or_else(|| evaluate::default_context(model, tokens.len()));
    Ok((tokens, context))
}

/// The tokens of `--text` (tokenized with the first of `models` that has a tokenizer, `<bos>` prepended)
/// or `--token-ids` (as given), truncated to `max_tokens`.
pub(super) fn input_tokens(
    input: &TokenInput,
    models: &[&Path],
    bos: u32,
    max_tokens: Option<usize>,
) -> anyhow::Result<Vec<u32>> {
    let mut tokens = match (&input.text, &input.token_ids) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
            if text.is_empty() {
                anyhow::bail!(
                    "{}: the text file is empty: there are no tokens to run",
                    path.display()
                );
            }
            let folders: Vec<&Path> = models.iter().map(|m| folder_of(m)).collect();
            require_tokenizer(&folders, "--text")?.encode_with_bos(&text, bos)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err(UsageError("give --text FILE or --token-ids IDS".into()).into()),
    };
    if let Some(n) = max_tokens {
        tokens.truncate(n);
    }
    Ok(tokens)
}

/// The tokenizer of the first folder that has one; else an error that suggests `--token-ids`.
fn require_tokenizer(folders: &[&Path], flag: &str) -> anyhow::Result<Tokenizer> {
    for folder in folders {
        if let Some(t) = Tokenizer::from_folder_if_present(folder)? {
            return Ok(t);
        }
    }
    anyhow::bail!(
        "{}: no tokenizer.json, so {flag} cannot be tokenized; pass token ids instead, e.g. --token-ids 2,651,...",
        folders[0].display()
    )
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    Ok(())
}
