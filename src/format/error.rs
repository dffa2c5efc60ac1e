use std::path::PathBuf;

/// Everything that can be wrong with a model on disk. Each variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The path could not be opened, mapped, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The safetensors header failed validation (size, JSON, offsets, lengths, trailing bytes).
    #[error("{path}: invalid safetensors file: {reason}")]
    InvalidHeader { path: PathBuf, reason: String },
    /// A folder holds no `.safetensors` file.
    #[error(
        "{path}: no .safetensors files (expected model.safetensors, an index, or *.safetensors)"
    )]
    NoWeights { path: PathBuf },
    /// `model.safetensors.index.json` is malformed or disagrees with its shards.
    #[error("{path}: invalid index: {reason}")]
    InvalidIndex { path: PathBuf, reason: String },
    /// The same tensor name appears in two files of one model.
    #[error("tensor `{name}` appears in both {first} and {second}")]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// `config.json` exists but is not valid JSON.
    #[error("{path}: invalid JSON: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
}

impl FormatError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
