//! `eval`, `generate`, `compare`: the built-in Gemma 2 forward pass on the command line.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use gemma_merge::evaluate::{self, LogitsWriter};
use gemma_merge::model::chat::{self, ChatFormat};
use gemma_merge::model::sampling::{self, Sampler, SamplingParams};
use gemma_merge::model::{folder_of, Gemma2, ModelError, Tokenizer};

use super::progress::Bars;
use gemma_merge::safe_out::{check_conflicts, check_target, model_inputs, Kind, Role, Staged};

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
    /// Conversations, one {"messages": [...]} per line, rendered with the model's chat template; only
    /// the model's turns count towards the loss.
    #[arg(long, value_name = "FILE", group = "TokenInput")]
    pub chat_file: Option<PathArg>,
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
    /// With --dump-logits: replace an existing logits file written by gemma-merge.
    #[arg(long, requires = "dump_logits")]
    pub force: bool,
    /// Fast mode: bf16 × bf16 matrix products with f32 sums (AVX512-BF16 `vdpbf16ps`, as llama.cpp and
    /// PyTorch's bf16 path), activations rounded to bf16; exact mode where the CPU lacks AVX512-BF16.
    /// Less exact than the default (see docs/performance.md for the measured deviation).
    #[arg(long)]
    pub fast: bool,
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
    /// Stop after N generated tokens (at most 1000000).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_max_new_tokens)]
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
    /// Fast mode: bf16 × bf16 matrix products with f32 sums (AVX512-BF16 `vdpbf16ps`, as llama.cpp and
    /// PyTorch's bf16 path), activations rounded to bf16; exact mode where the CPU lacks AVX512-BF16.
    /// Less exact than the default (see docs/performance.md for the measured deviation).
    #[arg(long)]
    pub fast: bool,
    /// Print a JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Treat --prompt as a user turn of a chat, rendered with the model's chat template (Gemma's turn
    /// format when it has none); generation stops at <end_of_turn>.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// A system message for --chat (implies --chat).
    #[arg(long, value_name = "TEXT", requires = "prompt")]
    pub system: Option<String>,
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
    /// Conversations (JSONL), as for eval: only the model's turns are compared.
    #[arg(long, value_name = "FILE", group = "TokenInput")]
    pub chat_file: Option<PathArg>,
    /// Truncate the input to N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Window length, as for eval.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Fast mode: bf16 × bf16 matrix products with f32 sums (AVX512-BF16 `vdpbf16ps`, as llama.cpp and
    /// PyTorch's bf16 path), activations rounded to bf16; exact mode where the CPU lacks AVX512-BF16.
    /// Less exact than the default (see docs/performance.md for the measured deviation).
    #[arg(long)]
    pub fast: bool,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One token id of a comma-separated list; spaces around it are allowed.
/// Largest `--max-new-tokens`: far beyond what a CPU decodes in a session, small enough that nothing
/// sized by it can exhaust memory.
pub const MAX_NEW_TOKENS: usize = 1_000_000;

fn parse_max_new_tokens(s: &str) -> Result<usize, String> {
    let n: u128 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of tokens (a non-negative integer)"))?;
    if n > MAX_NEW_TOKENS as u128 {
        return Err(format!("{s} is more than {MAX_NEW_TOKENS} tokens"));
    }
    Ok(n as usize)
}

fn parse_token_id(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a token id (a non-negative integer)"))
}

pub fn eval(args: &EvalArgs, g: &Global) -> anyhow::Result<()> {
    check_counts(args.max_tokens, args.context)?;
    if let Some(path) = &args.dump_logits {
        let mut inputs = model_inputs("the model", &args.model);
        if let Some(t) = &args.input.text {
            inputs.push(Role::new("the --text file", t));
        }
        check_conflicts(&[Role::new("the --dump-logits file", path)], &inputs)?;
        check_target(path, Kind::Logits, args.force)?;
    }
    set_fast(args.fast);
    let model = Gemma2::load(&args.model)?;
    if let Some(file) = &args.chat_file {
        if args.dump_logits.is_some() || args.max_tokens.is_some() {
            return Err(UsageError(
                "--dump-logits and --max-tokens do not go with --chat-file".into(),
            )
            .into());
        }
        let conversations = chat_inputs(file, &[&args.model], &model)?;
        let started = Instant::now();
        let s = evaluate::score_chats(&model, &conversations, args.context)?;
        let seconds = started.elapsed().as_secs_f64();
        if args.json {
            return print_json(&json!({
                "tokens": s.tokens,
                "mean_nll": s.mean_nll,
                "perplexity": s.perplexity,
                "conversations": conversations.len(),
                "seconds": seconds,
            }));
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "tokens         {}  (model turns only)", s.tokens)?;
        writeln!(out, "mean_nll       {:.6}", s.mean_nll)?;
        writeln!(out, "perplexity     {:.4}", s.perplexity)?;
        writeln!(out, "conversations  {}", conversations.len())?;
        return Ok(());
    }
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
            // The logits go to a temporary file renamed into place once complete: the target (checked
            // above) is untouched until then, and removed with nothing else on failure.
            let (staged, file) = Staged::file(path, Kind::Logits, args.force)?;
            let mut writer =
                LogitsWriter::new(file, staged.path(), tokens.len(), model.config().vocab_size)?;
            let score = evaluate::score_with(&model, &tokens, context, &bars, |_, row| {
                writer.write_row(row)
            })?;
            writer.finish()?;
            staged.commit()?;
            score
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
            per_window(tokens.len(), context, "mean_nll", |r| {
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
    set_fast(args.fast);
    let model = Gemma2::load(&args.model)?;
    let folder = folder_of(&args.model);
    let (mut prompt, tokenizer) = match (&args.prompt, &args.token_ids) {
        (Some(text), _) if args.chat || args.system.is_some() => {
            let tokenizer = require_tokenizer(&[folder], "--chat")?;
            let format = ChatFormat::from_folder(folder)?;
            let messages = chat::user_turn(args.system.as_deref(), text);
            let rendered = format.render(&messages, true)?;
            let mut ids = tokenizer.encode(&rendered)?;
            if ids.first() != Some(&model.config().bos_token_id) {
                ids.insert(0, model.config().bos_token_id);
            }
            (ids, Some(tokenizer))
        }
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
    // A chat prompt is the template's rendering, not the user's text: only the reply is printed.
    let chat = args.chat || args.system.is_some();
    if streaming && !g.quiet && !args.no_echo && !chat {
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
    set_fast(args.fast);
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
    let started = Instant::now();
    let bars = Bars::new(g);
    // Input tokens and window length, for -v (not with --chat-file).
    let mut windows: Option<(usize, usize)> = None;
    let (r, context) = match &args.chat_file {
        Some(file) => {
            if args.max_tokens.is_some() {
                return Err(UsageError("--max-tokens does not go with --chat-file".into()).into());
            }
            let conversations = chat_inputs(file, &[&args.model, &args.reference], &model)?;
            let r = evaluate::compare_chats(&model, &reference, &conversations, args.context)?;
            (r, args.context)
        }
        None => {
            let (tokens, context) = scored_input(
                &args.input,
                &[&args.model, &args.reference],
                &model,
                args.max_tokens,
                args.context,
            )?;
            bars.start(
                "comparing",
                2 * evaluate::positions_to_run(tokens.len(), context)?,
                Unit::Positions,
            );
            windows = Some((tokens.len(), context));
            (
                evaluate::compare(&model, &reference, &tokens, context, &bars)?,
                Some(context),
            )
        }
    };
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
    if let Some((n, context)) = windows.filter(|_| g.verbose) {
        per_window(n, context, "kl", |i| r.kl_per_position[i].iter().sum())?;
    }
    if !g.quiet {
        eprintln!("{} positions per model in {seconds:.2} s", r.positions_run);
    }
    Ok(())
}

/// `-v`: one line per scoring window on stderr, with the mean over its predicted tokens of the value
/// whose sum `sum(range of predicted-token indices)` gives.
fn per_window(
    n_tokens: usize,
    context: usize,
    what: &str,
    sum: impl Fn(std::ops::Range<usize>) -> f64,
) -> anyhow::Result<()> {
    for (i, w) in evaluate::windows(n_tokens, context)?.iter().enumerate() {
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
/// `--fast`: every model this process builds from now on computes in bf16 (see `model::gemm`).
pub(super) fn set_fast(fast: bool) {
    if fast {
        gemma_merge::model::set_default_precision(gemma_merge::model::Precision::Bf16);
    }
}

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

/// The conversations of `--chat-file`: token ids (rendered with the chat template of the first of
/// `models` that has a tokenizer) and which tokens belong to the model's turns.
fn chat_inputs(
    file: &Path,
    models: &[&Path],
    model: &Gemma2,
) -> anyhow::Result<Vec<(Vec<u32>, Vec<bool>)>> {
    let conversations = chat::read_chat_file(file)?;
    let folders: Vec<&Path> = models.iter().map(|m| folder_of(m)).collect();
    let tokenizer = require_tokenizer(&folders, "--chat-file")?;
    let folder = folders
        .iter()
        .find(|f| f.join("tokenizer.json").is_file())
        .unwrap_or(&folders[0]);
    let format = ChatFormat::from_folder(folder)?;
    conversations
        .iter()
        .enumerate()
        .map(|(i, messages)| {
            let (ids, counted) = format
                .tokens(&tokenizer, messages, model.config().bos_token_id)
                .with_context(|| format!("{}: conversation {}", file.display(), i + 1))?;
            evaluate::check_input(model, &ids)
                .with_context(|| format!("{}: conversation {}", file.display(), i + 1))?;
            Ok((ids, counted))
        })
        .collect()
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
            let text = gemma_merge::format::files::read_text_limited(
                path,
                gemma_merge::format::files::SIDE_FILE_LIMIT,
            )
            .map_err(|e| ModelError::io(path, e))?;
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
