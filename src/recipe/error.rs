use std::path::PathBuf;

/// A recipe that cannot be run. Every variant names the recipe file and, where it has one, the line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid YAML, an unknown key, a wrong type, a missing field, a bad reference or value.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
}

impl RecipeError {
    /// True when the recipe itself is wrong (exit code 2) rather than unreadable (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}
