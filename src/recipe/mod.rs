//! Recipes: YAML → validated [`Plan`]. Every error carries the recipe's line and column, and all of them
//! are found before any tensor is read.

mod error;
mod plan;
mod raw;

pub use error::RecipeError;
pub use plan::{
    duplicate_eta, eta_label, operands, Angle, Leaf, Operand, OutputModel, OutputTarget, Plan,
    Step, StepKind, DEFAULT_SHARD_SIZE, MAX_ETAS,
};
pub use raw::parse_byte_size;
