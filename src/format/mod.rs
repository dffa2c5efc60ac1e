//! The format layer: safetensors models in and out, checksummed.

mod convert;
pub mod dtype;
pub mod error;
pub mod files;
pub mod reader;
pub mod writer;

pub use dtype::FloatType;
pub use error::FormatError;
pub use reader::{Model, SafetensorsFile, TensorInfo};
pub use writer::{FileRecord, ModelWriter, TensorSpec};
