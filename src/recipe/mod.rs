//! Recipes: YAML → validated plan.

mod error;

pub use error::RecipeError;
