//! Scoring token sequences with the Gemma 2 forward pass: perplexity, and KL divergence / top-1 agreement
//! against a reference model, over windows of a fixed context.
//!
//! # Windows
//! An input of T tokens is cut into windows of at most `context` model positions. The first window is
//! the input's first `context` tokens as given (text input already starts with `<bos>`). Every later
//! window is `<bos>` followed by the next `context − 1` input tokens, so the model always sees `<bos>` first
//! and no input token is run twice. Each input token after the first is predicted exactly once: the first
//! token of a later window from its `<bos>`, the others from the tokens before them in their window. So
//! `tokens` (predicted positions) is T − 1, and the logits of input position p are those of p's own
//! place in its window (the row for a window's `<bos>` belongs to no input position).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ndarray::{s, Array2};
use rayon::prelude::*;

use crate::model::{Gemma2, ModelError};
use crate::progress::{Progress, Silent};

/// Positions a window is run in at a time (through the model's cache, which gives the logits of the
/// whole window): progress moves every few dozen positions, and attention scores stay [128, window].
const PREFILL_POSITIONS: usize = 128;

/// Rows of logits computed at once ([rows, vocab] f32: 32 MiB for a 256 000-token vocabulary).
const LOGITS_ROWS: usize = 32;

/// One window: input tokens `start..end`, run after a `<bos>` when `bos` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub bos: bool,
}

impl Window {
    /// Model positions the window runs.
    pub fn len(&self) -> usize {
        self.end - self.start + usize::from(self.bos)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The windows of an input of `n` tokens (see the module documentation).
pub fn windows(n: usize, context: usize) -> Result<Vec<Window>, ModelError> {
    if context < 2 {
        return Err(ModelError::ContextTooShort { context });
    }
    let mut out = vec![Window {
        start: 0,
        end: n.min(context),
        bos: false,
    }];
    let mut start = out[0].end;
    while start < n {
        let end = n.min(start + context - 1);
        out.push(Window {
            start,
            end,
            bos: true,
        });
        start = end;
    }
    Ok(out)
}

/// What each model position of a window stands for.
struct Row {
    /// The input position whose logits these are (`None` for a prepended `<bos>`).
    input: Option<usize>,
    /// The token this position predicts, if it is scored.
    target: Option<u32>,
}

/// The model tokens of a window and the meaning of each of its positions.
fn window_rows(tokens: &[u32], w: &Window, bos: u32) -> (Vec<u32>, Vec<Row>) {
    let mut ids = Vec::with_capacity(w.len());
    let mut rows = Vec::with_capacity(w.len());
    if w.bos {
        ids.push(bos);
        rows.push(Row {
            input: None,
            target: Some(tokens[w.start]),
        });
    }
    for p in w.start..w.end {
        ids.push(tokens[p]);
        rows.push(Row {
            input: Some(p),
            target: (p + 1 < w.end).then(|| tokens[p + 1]),
        });
    }
    (ids, rows)
}

/// The default context: the whole input, up to `max_position_embeddings`.
pub fn default_context(model: &Gemma2, n: usize) -> usize {
    n.min(model.config().max_position_embeddings).max(2)
}

/// Perplexity of an input.
#[derive(Debug, Clone)]
pub struct Score {
    /// Predicted positions (input tokens − 1).
    pub tokens: usize,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// `log p(token)` of each predicted input token, in input order (tokens 1..T).
    pub log_probs: Vec<f64>,
    /// Windows run.
    pub windows: usize,
    /// Model positions run (input tokens plus one `<bos>` per later window).
    pub positions_run: usize,
}

/// What running models over the windows of an input took.
struct WindowRun {
    windows: usize,
    positions_run: usize,
}

/// Runs each of `models` over the windows of `tokens` and hands `each` the rows of a window a few at a
/// time, with every model's logits at those rows ([rows, vocab] each, soft-capped). Rows come in window
/// order, so their input positions and targets come in input order.
/// `progress` is advanced by each model's positions as they are run (callers start the phase, with
/// [`positions_to_run`] per model, so that several runs can share one bar).
fn run_windows(
    models: &[&Gemma2],
    tokens: &[u32],
    context: usize,
    progress: &dyn Progress,
    mut each: impl FnMut(&[Row], &[Array2<f32>]) -> Result<(), ModelError>,
) -> Result<WindowRun, ModelError> {
    let windows = windows(tokens.len(), context)?;
    let bos = models[0].config().bos_token_id;
    let mut positions_run = 0;
    for w in &windows {
        let (ids, rows) = window_rows(tokens, w, bos);
        positions_run += ids.len();
        let hidden = models
            .iter()
            .map(|m| {
                let mut cache = m.new_cache();
                let mut parts = Vec::with_capacity(ids.len().div_ceil(PREFILL_POSITIONS));
                for part in ids.chunks(PREFILL_POSITIONS) {
                    parts.push(m.hidden_states(part, &mut cache)?);
                    progress.advance(part.len() as u64);
                }
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                Ok(ndarray::concatenate(ndarray::Axis(0), &views).expect("same width"))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        for start in (0..rows.len()).step_by(LOGITS_ROWS) {
            let end = (start + LOGITS_ROWS).min(rows.len());
            let logits: Vec<Array2<f32>> = models
                .iter()
                .zip(&hidden)
                .map(|(m, h)| m.logits(h.slice(s![start..end, ..])))
                .collect();
            each(&rows[start..end], &logits)?;
        }
    }
    Ok(WindowRun {
        windows: windows.len(),
        positions_run,
    })
}

/// The rows of a chunk that predict a token: (row index in the chunk, target).
fn targets(rows: &[Row]) -> Vec<(usize, u32)> {
    rows.iter()
        .enumerate()
        .filter_map(|(i, r)| r.target.map(|t| (i, t)))
        .collect()
}

fn row_of(logits: &Array2<f32>, i: usize) -> &[f32] {
    logits
        .row(i)
        .to_slice()
        .expect("logits rows are contiguous")
}

/// Perplexity of `tokens` in windows of `context` positions.
pub fn score(model: &Gemma2, tokens: &[u32], context: usize) -> Result<Score, ModelError> {
    score_with(model, tokens, context, &Silent, |_, _| Ok(()))
}

/// Model positions that scoring `n` tokens in windows of `context` runs, per model (what progress
/// counts).
pub fn positions_to_run(n: usize, context: usize) -> Result<u64, ModelError> {
    Ok(windows(n, context)?.iter().map(|w| w.len() as u64).sum())
}

/// [`score`], also handing the logits row of every input position, in order, to `logits_sink`
/// (e.g. a [`LogitsWriter`]).
pub fn score_with(
    model: &Gemma2,
    tokens: &[u32],
    context: usize,
    progress: &dyn Progress,
    mut logits_sink: impl FnMut(usize, &[f32]) -> Result<(), ModelError>,
) -> Result<Score, ModelError> {
    check_input(model, tokens)?;
    let mut log_probs = Vec::with_capacity(tokens.len() - 1);
    let run = run_windows(&[model], tokens, context, progress, |rows, logits| {
        let logits = &logits[0];
        let scored: Vec<f64> = targets(rows)
            .par_iter()
            .map(|&(i, t)| log_softmax_at(row_of(logits, i), t))
            .collect();
        log_probs.extend(scored);
        for (i, row) in rows.iter().enumerate() {
            if let Some(p) = row.input {
                logits_sink(p, row_of(logits, i))?;
            }
        }
        Ok(())
    })?;
    if let Some(i) = log_probs.iter().position(|lp| !lp.is_finite()) {
        return Err(ModelError::NonFinite { position: i + 1 });
    }
    Ok(score_of(log_probs, run.windows, run.positions_run))
}

/// The [`Score`] of the scored positions' log-probabilities.
fn score_of(log_probs: Vec<f64>, windows: usize, positions_run: usize) -> Score {
    let mean_nll = -log_probs.iter().sum::<f64>() / log_probs.len() as f64;
    Score {
        tokens: log_probs.len(),
        mean_nll,
        perplexity: mean_nll.exp(),
        log_probs,
        windows,
        positions_run,
    }
}

/// A model against a reference on the same tokens.
#[derive(Debug, Clone)]
pub struct CompareResult {
    /// Predicted positions compared (input tokens − 1).
    pub tokens: usize,
    /// Mean over positions of KL(model ‖ reference), in nats.
    pub kl: f64,
    /// Largest per-position KL(model ‖ reference).
    pub kl_max: f64,
    /// Fraction of positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
    pub perplexity: f64,
    pub reference_perplexity: f64,
    /// KL(model ‖ reference) at each predicted position, in input order.
    pub kl_per_position: Vec<f64>,
    /// Model positions run per model.
    pub positions_run: usize,
}

/// Runs `model` and `reference` over the same windows of `tokens` and compares their next-token
/// distributions at every predicted position (the positions [`score`] scores). Memory: a few rows of
/// logits at a time. To compare many models with one reference, see [`ReferenceLogits`].
pub fn compare(
    model: &Gemma2,
    reference: &Gemma2,
    tokens: &[u32],
    context: usize,
    progress: &dyn Progress,
) -> Result<CompareResult, ModelError> {
    let (stats, positions_run) = compare_stats(model, reference, tokens, context, progress)?;
    summarize(stats, positions_run)
}

/// The per-position statistics of [`compare`], in input order, and the positions run per model.
fn compare_stats(
    model: &Gemma2,
    reference: &Gemma2,
    tokens: &[u32],
    context: usize,
    progress: &dyn Progress,
) -> Result<(Vec<PositionStats>, usize), ModelError> {
    check_vocab(model, reference.config().vocab_size)?;
    check_input(model, tokens)?;
    let mut stats: Vec<PositionStats> = Vec::with_capacity(tokens.len() - 1);
    let run = run_windows(
        &[model, reference],
        tokens,
        context,
        progress,
        |rows, logits| {
            let (a, b) = (&logits[0], &logits[1]);
            let found: Vec<PositionStats> = targets(rows)
                .par_iter()
                .map(|&(i, t)| position_stats(row_of(a, i), row_of(b, i), t))
                .collect();
            stats.extend(found);
            Ok(())
        },
    )?;
    Ok((stats, run.positions_run))
}

/// Conversations as token ids with, per token, whether it belongs to a model turn (see
/// [`crate::model::chat::ChatFormat::tokens`]).
pub type Conversation = (Vec<u32>, Vec<bool>);

/// [`score`] over conversations, each scored on its own (`context`: window length, default the whole
/// conversation up to `max_position_embeddings`), counting only the tokens of model turns.
pub fn score_chats(
    model: &Gemma2,
    conversations: &[Conversation],
    context: Option<usize>,
) -> Result<Score, ModelError> {
    let (mut log_probs, mut windows, mut positions_run) = (Vec::new(), 0, 0);
    for (tokens, counted) in conversations {
        let context = context.unwrap_or_else(|| default_context(model, tokens.len()));
        let s = score(model, tokens, context)?;
        log_probs.extend(
            s.log_probs
                .iter()
                .zip(&counted[1..])
                .filter(|(_, c)| **c)
                .map(|(lp, _)| *lp),
        );
        windows += s.windows;
        positions_run += s.positions_run;
    }
    if log_probs.is_empty() {
        return Err(no_model_turns());
    }
    Ok(score_of(log_probs, windows, positions_run))
}

/// [`compare`] over conversations, counting only the positions that predict a model turn's tokens.
pub fn compare_chats(
    model: &Gemma2,
    reference: &Gemma2,
    conversations: &[Conversation],
    context: Option<usize>,
) -> Result<CompareResult, ModelError> {
    let (mut all, mut positions_run) = (Vec::new(), 0);
    for (tokens, counted) in conversations {
        let context = context.unwrap_or_else(|| default_context(model, tokens.len()));
        let (stats, run) = compare_stats(model, reference, tokens, context, &Silent)?;
        all.extend(
            stats
                .into_iter()
                .zip(&counted[1..])
                .filter(|(_, c)| **c)
                .map(|(s, _)| s),
        );
        positions_run += run;
    }
    if all.is_empty() {
        return Err(no_model_turns());
    }
    summarize(all, positions_run)
}

fn no_model_turns() -> ModelError {
    ModelError::Chat {
        origin: "the conversations".into(),
        reason: "have no model (assistant) turns to score".into(),
    }
}

/// A reference model's logits at every predicted position of an input, computed once so that many
/// models can be compared with it by [`compare_to`] (a LITI front, say) at the cost of one forward pass
/// each. Holds predicted positions × vocabulary f32: 1 GiB for 1 000 positions of a 256 000-token
/// vocabulary. The results are exactly those of [`compare`].
pub struct ReferenceLogits {
    tokens: Vec<u32>,
    context: usize,
    vocab: usize,
    /// [predicted positions, vocab], in input order.
    logits: Vec<f32>,
}

impl ReferenceLogits {
    /// `progress` is told the reference's positions as they are run (no phase is started).
    pub fn new(
        reference: &Gemma2,
        tokens: &[u32],
        context: usize,
        progress: &dyn Progress,
    ) -> Result<Self, ModelError> {
        check_input(reference, tokens)?;
        let vocab = reference.config().vocab_size;
        let mut logits = Vec::with_capacity((tokens.len() - 1) * vocab);
        run_windows(&[reference], tokens, context, progress, |rows, chunk| {
            for (i, _) in targets(rows) {
                logits.extend_from_slice(row_of(&chunk[0], i));
            }
            Ok(())
        })?;
        Ok(Self {
            tokens: tokens.to_vec(),
            context,
            vocab,
            logits,
        })
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.logits.len() * 4
    }
}

/// [`compare`] against a reference run once with [`ReferenceLogits::new`], on its tokens and context.
pub fn compare_to(
    model: &Gemma2,
    reference: &ReferenceLogits,
    progress: &dyn Progress,
) -> Result<CompareResult, ModelError> {
    check_vocab(model, reference.vocab)?;
    let tokens = &reference.tokens;
    check_input(model, tokens)?;
    let mut stats: Vec<PositionStats> = Vec::with_capacity(tokens.len() - 1);
    let run = run_windows(
        &[model],
        tokens,
        reference.context,
        progress,
        |rows, logits| {
            let first = stats.len();
            let found: Vec<PositionStats> = targets(rows)
                .par_iter()
                .enumerate()
                .map(|(j, &(i, t))| {
                    let b = &reference.logits[(first + j) * reference.vocab..][..reference.vocab];
                    position_stats(row_of(&logits[0], i), b, t)
                })
                .collect();
            stats.extend(found);
            Ok(())
        },
    )?;
    summarize(stats, run.positions_run)
}

fn check_vocab(model: &Gemma2, reference: usize) -> Result<(), ModelError> {
    let vocab = model.config().vocab_size;
    if vocab != reference {
        return Err(ModelError::VocabMismatch {
            model: vocab,
            reference,
        });
    }
    Ok(())
}

/// Means and maxima over positions; an error if any position is not finite.
fn summarize(stats: Vec<PositionStats>, positions_run: usize) -> Result<CompareResult, ModelError> {
    let finite = |s: &PositionStats| s.kl.is_finite() && s.nll.is_finite() && s.nll_ref.is_finite();
    if let Some(i) = stats.iter().position(|s| !finite(s)) {
        return Err(ModelError::NonFinite { position: i + 1 });
    }
    let n = stats.len() as f64;
    let kl_per_position: Vec<f64> = stats.iter().map(|s| s.kl).collect();
    let mean = |f: fn(&PositionStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    Ok(CompareResult {
        tokens: stats.len(),
        kl: mean(|s| s.kl),
        kl_max: kl_per_position.iter().copied().fold(0.0, f64::max),
        top1_agreement: mean(|s| f64::from(u8::from(s.agree))),
        perplexity: mean(|s| s.nll).exp(),
        reference_perplexity: mean(|s| s.nll_ref).exp(),
        kl_per_position,
        positions_run,
    })
}

/// Checks that `tokens` can be scored: ids inside the vocabulary, at least two of them.
pub fn check_input(model: &Gemma2, tokens: &[u32]) -> Result<(), ModelError> {
    model.check_tokens(tokens)?;
    if tokens.len() < 2 {
        return Err(ModelError::TooFewTokens {
            tokens: tokens.len(),
        });
    }
    Ok(())
}

/// `log softmax(logits)[target]`, in f64.
pub fn log_softmax_at(logits: &[f32], target: u32) -> f64 {
    logits[target as usize] as f64 - log_sum_exp(logits)
}

/// `log Σ exp(v)`, in f64.
pub fn log_sum_exp(v: &[f32]) -> f64 {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

struct PositionStats {
    kl: f64,
    agree: bool,
    nll: f64,
    nll_ref: f64,
}

/// KL(softmax(a) ‖ softmax(b)), whether the argmaxes agree, and both NLLs of `target`.
fn position_stats(a: &[f32], b: &[f32], target: u32) -> PositionStats {
    let (za, zb) = (log_sum_exp(a), log_sum_exp(b));
    let kl = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let lp = x as f64 - za;
            lp.exp() * (lp - (y as f64 - zb))
        })
        .sum::<f64>()
        .max(0.0);
    let agree = crate::model::sampling::argmax(a) == crate::model::sampling::argmax(b);
    PositionStats {
        kl,
        agree,
        nll: za - a[target as usize] as f64,
        nll_ref: zb - b[target as usize] as f64,
    }
}

/// Writes logits row by row as a safetensors file with one F32 tensor `logits` [rows, vocab] and header
/// metadata `{"format": "pt", "producer": "gemma-merge eval --dump-logits"}` (how a later `--force`
/// recognises the file as one it may replace), without holding them all in memory.
pub struct LogitsWriter {
    out: BufWriter<File>,
    path: PathBuf,
    rows: usize,
    vocab: usize,
    written: usize,
    buf: Vec<u8>,
}

impl LogitsWriter {
    /// Writes into `file` (a temporary, see [`crate::safe_out::Staged`]); `path` names it in errors.
    pub fn new(file: File, path: &Path, rows: usize, vocab: usize) -> Result<Self, ModelError> {
        let io = |e| ModelError::io(path, e);
        let bytes = rows * vocab * 4;
        let header = serde_json::json!({
            "__metadata__": {"format": "pt", "producer": crate::safe_out::LOGITS_PRODUCER},
            "logits": {"dtype": "F32", "shape": [rows, vocab], "data_offsets": [0, bytes]},
        })
        .to_string();
        // The data must start 8-byte aligned: pad the header with spaces, as the safetensors writer does.
        let padded = header.len().div_ceil(8) * 8;
        let header = format!("{header:padded$}");
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            rows,
            vocab,
            written: 0,
            buf: Vec::with_capacity(vocab * 4),
        })
    }

    /// Appends the next row.
    pub fn write_row(&mut self, row: &[f32]) -> Result<(), ModelError> {
        assert_eq!(row.len(), self.vocab, "logits row of the wrong width");
        assert!(self.written < self.rows, "more logits rows than declared");
        self.buf.clear();
        self.buf.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        self.out
            .write_all(&self.buf)
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes the file; every declared row must have been written.
    pub fn finish(mut self) -> Result<(), ModelError> {
        assert_eq!(self.written, self.rows, "fewer logits rows than declared");
        self.out
            .flush()
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| ModelError::io(&self.path, e))
    }
}

/// Logits of every position of `tokens` with the scoring windows, as [n, vocab] in memory (for tests and
/// small inputs; long inputs go through [`score_with`]).
pub fn window_logits(
    model: &Gemma2,
    tokens: &[u32],
    context: usize,
) -> Result<Array2<f32>, ModelError> {
    let mut out = Array2::zeros((tokens.len(), model.config().vocab_size));
    score_with(model, tokens, context, &Silent, |p, row| {
        out.row_mut(p).assign(&ndarray::ArrayView1::from(row));
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_each_token_once_and_start_with_bos() {
        assert_eq!(
            windows(5, 8).unwrap(),
            vec![Window {
                start: 0,
                end: 5,
                bos: false
            }]
        );
        let w = windows(10, 4).unwrap();
        assert_eq!(
            w,
            vec![
                Window {
                    start: 0,
                    end: 4,
                    bos: false
                },
                Window {
                    start: 4,
                    end: 7,
                    bos: true
                },
                Window {
                    start: 7,
                    end: 10,
                    bos: true
                },
            ]
        );
        assert!(w.iter().all(|w| w.len() <= 4));
        assert!(matches!(
            windows(10, 1),
            Err(ModelError::ContextTooShort { context: 1 })
        ));
        // Targets: every token after the first, once, in order.
        let tokens: Vec<u32> = (10..20).collect();
        let targets: Vec<u32> = w
            .iter()
            .flat_map(|w| window_rows(&tokens, w, 2).1)
            .filter_map(|r| r.target)
            .collect();
        assert_eq!(targets, (11..20).collect::<Vec<_>>());
        let inputs: Vec<usize> = w
            .iter()
            .flat_map(|w| window_rows(&tokens, w, 2).1)
            .filter_map(|r| r.input)
            .collect();
        assert_eq!(inputs, (0..10).collect::<Vec<_>>());
        let (ids, _) = window_rows(&tokens, &w[1], 2);
        assert_eq!(ids, vec![2, 14, 15, 16]);
    }

    #[test]
    fn kl_of_identical_rows_is_zero_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        let s = position_stats(&a, &a, 2);
        assert!(s.kl.abs() < 1e-12 && s.agree);
        assert!((s.nll - s.nll_ref).abs() < 1e-12);
        let b = [3.0f32, 2.0, 1.0];
        let s = position_stats(&a, &b, 2);
        // Direct: p = softmax(a), q = softmax(b), KL = Σ p log(p/q).
        let sm = |v: &[f32]| {
            let z: f64 = v.iter().map(|&x| (x as f64).exp()).sum();
            v.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
        };
        let (p, q) = (sm(&a), sm(&b));
        let want: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((s.kl - want).abs() < 1e-12 && !s.agree);
    }
}
