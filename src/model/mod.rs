//! The built-in forward pass of the Gemma family (Gemma 1, 2 and 3, and the language model of multimodal
//! Gemma 3), on the CPU in f32, numerically following Hugging Face transformers with eager attention (see
//! `spec/gemma2.md`, `spec/family.md`).
//!
//! - [`family`]: what a member of the family is: [`Config`] in every config.json form, tensor names and
//!   prefixes, norms, RoPE tables, layer kinds, and the layer grouping of tensor names.
//! - [`gemma2`]: the model, named after the checkpoint keys ([`Gemma2`], also called [`Gemma`], and
//!   [`Cache`]).
//! - [`weights`]: tensors kept in their stored type, memory-mapped from a checkpoint or owned in memory
//!   ([`Weight`], [`WeightSource`]), so a model needs little more RAM than its file size.
//! - [`chat`]: conversations through the model's `chat_template` (minijinja) or Gemma's turn format.
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate.
//! - [`sampling`]: greedy, temperature, top-k and top-p sampling with a seeded generator.
//!
//! Perplexity, KL and top-1 agreement over windows live in [`crate::evaluate`].

pub mod chat;
pub mod family;
#[doc(hidden)]
pub mod gemm;
pub mod gemma2;
mod ops;
pub mod sampling;
pub mod tokenizer;
mod vmath;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::format::FormatError;

pub use family::Family;
pub use gemm::{default_precision, set_default_precision, Precision};
pub use gemma2::{Cache, Config, Gemma2};
/// The model of any member of the family (the type's historical name is [`Gemma2`]).
pub type Gemma = Gemma2;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
pub use weights::{Weight, WeightSource};

/// Everything that can go wrong loading or running a model. Each variant names the file, tensor or token.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The weights could not be opened or failed validation.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A file could not be read or written (a text input, a logits dump).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model folder has no `config.json`.
    #[error("{path}: no config.json beside the weights (a Gemma model folder needs one)")]
    NoConfig { path: PathBuf },
    /// `config.json` describes another architecture.
    #[error(
        "{path}: model_type is {model_type}, not a Gemma model (gemma, gemma2, gemma3_text or gemma3 can be evaluated)"
    )]
    NotGemma { path: PathBuf, model_type: String },
    /// `config.json` has a missing, mistyped or inconsistent field.
    #[error("{path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    /// A tensor the config requires is not in the checkpoint.
    #[error("{origin}: tensor `{name}` is missing")]
    MissingTensor { origin: String, name: String },
    /// The checkpoint holds layers beyond the config's `num_hidden_layers`.
    #[error("{origin}: tensor `{name}` belongs to a layer beyond num_hidden_layers = {layers} in config.json")]
    ExtraLayer {
        origin: String,
        name: String,
        layers: usize,
    },
    /// A weight holds NaN or an infinity.
    #[error(
        "{origin}: tensor `{name}` holds a non-finite value (NaN or infinity) at element {index}"
    )]
    NonFiniteWeight {
        origin: String,
        name: String,
        index: usize,
    },
    /// A tensor's shape disagrees with the config.
    #[error(
        "{origin}: tensor `{name}` has shape {found:?}, expected {expected:?} from config.json"
    )]
    TensorShape {
        origin: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor is stored in a type the forward pass does not read (only BF16, F16 and F32 are).
    #[error("{origin}: tensor `{name}` is stored as {dtype}; only BF16, F16 and F32 weights can be evaluated")]
    TensorDtype {
        origin: String,
        name: String,
        dtype: String,
    },
    /// In-memory tensor data whose length disagrees with its shape.
    #[error("tensor data of {len} bytes does not match shape {shape:?} of {dtype}")]
    TensorData {
        shape: Vec<usize>,
        dtype: String,
        len: usize,
    },
    /// No tokens to run.
    #[error("the input is empty: there are no tokens to run")]
    EmptyInput,
    /// Scoring needs at least one predicted position.
    #[error("the input has {tokens} token; at least 2 are needed to predict one")]
    TooFewTokens { tokens: usize },
    /// A scoring window too short to predict anything.
    #[error(
        "a context of {context} tokens is too short: a window needs <bos> and at least one token"
    )]
    ContextTooShort { context: usize },
    /// A token id outside the vocabulary.
    #[error("token id {token} at position {position} is out of range: the vocabulary has {vocab} tokens (0..{vocab})")]
    TokenOutOfRange {
        token: u32,
        position: usize,
        vocab: usize,
    },
    /// The forward pass produced NaN or infinite log-probabilities (broken weights).
    #[error("the model's prediction of input position {position} is not finite (NaN or infinite weights?)")]
    NonFinite { position: usize },
    /// Two models compared on the same tokens must share a vocabulary.
    #[error(
        "the models have different vocabularies: {model} tokens vs {reference} in the reference"
    )]
    VocabMismatch { model: usize, reference: usize },
    /// The folder has no `tokenizer.json`, so text cannot be tokenized.
    #[error("{folder}: no tokenizer.json, so text cannot be tokenized (give token ids instead)")]
    NoTokenizer { folder: PathBuf },
    /// A chat template, its side file or a chat file is unusable.
    #[error("{origin}: {reason}")]
    Chat { origin: String, reason: String },
    /// `tokenizer.json` could not be loaded, or encoding / decoding failed.
    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

/// The folder holding a model's side files (config.json, tokenizer.json): the path itself, or a weights
/// file's parent.
pub fn folder_of(model: &Path) -> &Path {
    if model.is_dir() {
        model
    } else {
        model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Deterministic test values in [-1, 1): `len` of them, a different sequence for each `seed`.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104_729) % 1999) as f32 / 1999.0 - 0.5) * 2.0)
        .collect()
}
