//! Recipes: YAML → validated [`Plan`]. Every error carries the recipe's line and column, and all of them
//! are found before any tensor is read.

mod error;
pub mod hub;
mod mergekit;
mod plan;
pub(crate) mod raw;

pub use error::RecipeError;
pub use plan::{
    duplicate_eta, eta_label, operands, step_operands, Angle, Grouping, LayoutSlice, Leaf, Operand,
    OutputModel, OutputTarget, Plan, Sparsify, Step, StepKind, TaskVectorStep, DEFAULT_SHARD_SIZE,
    MAX_ETAS,
};
pub use raw::parse_byte_size;
