use std::path::PathBuf;

use crate::format::FormatError;

/// Why a merge could not run. Input problems name the tensor and the file or model.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A floating tensor of the base is missing from an input.
    #[error("{step}: tensor `{tensor}` of the base is missing from {model}")]
    MissingTensor {
        /// The recipe step that reads the input: "step `s` (recipe.yaml:7)".
        step: String,
        tensor: String,
        model: PathBuf,
    },
    /// An input's tensor has another shape than the base's.
    #[error(
        "{step}: tensor `{tensor}` has shape {found:?} in {model} but {expected:?} in the base"
    )]
    ShapeMismatch {
        step: String,
        tensor: String,
        model: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// An input holds a tensor the base does not have (allowed with `extra_tensors: ignore`).
    #[error(
        "tensor `{tensor}` of {model} is not in the base (set `extra_tensors: ignore` to skip it)"
    )]
    ExtraTensor { tensor: String, model: PathBuf },
    /// A tensor to merge has a dtype the engine does not compute with.
    #[error("tensor `{tensor}` in {file} has dtype {dtype}, which cannot be merged (BF16, F16, F32 can)")]
    UnsupportedDtype {
        tensor: String,
        file: PathBuf,
        dtype: String,
    },
    /// NaN or ±Inf in an input (allowed with `allow_nonfinite: true`).
    #[error("tensor `{tensor}` in {file} holds a non-finite value (NaN or Inf) at element {index} (set `allow_nonfinite: true` to merge it anyway)")]
    NonFinite {
        tensor: String,
        file: PathBuf,
        index: usize,
    },
    /// An output may not be written there (exists, not ours, inside an input, overlapping).
    #[error(transparent)]
    Output(#[from] crate::safe_out::OutputError),
    /// A merged value is NaN or ±Inf once rounded to the output dtype (overflow of float16 beyond
    /// ±65504, an extreme η or weights); allowed with `allow_nonfinite: true`.
    #[error("step {step}: tensor `{tensor}` is not finite at element {index} once merged and rounded to {dtype} (overflow? set `allow_nonfinite: true` to write it anyway)")]
    NonFiniteOutput {
        step: String,
        tensor: String,
        index: usize,
        dtype: String,
    },
    /// A method cannot compute a tensor (weights summing to 0 where they must be normalized, ...).
    #[error("tensor `{tensor}`: {message}")]
    Method { tensor: String, message: String },
    /// A part of a split run (`run --part`, `join`) is missing, stale, foreign or damaged.
    #[error("{path}: {message}")]
    Part { path: PathBuf, message: String },
    /// A part number outside 1..=N.
    #[error("{0}")]
    BadPart(String),
    /// A recipe error that shows only once the inputs' headers are read (a `layer_range` past a model's
    /// last layer), with the recipe's line.
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl MergeError {
    /// True when the request itself is wrong (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Output(e) if e.is_usage())
            || matches!(self, Self::Recipe(e) if e.is_usage())
            || matches!(self, Self::BadPart(_))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
