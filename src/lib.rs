//! gemma-merge: WARP-style merging of Gemma-family checkpoints (EMA, SLERP, LITI, linear), streamed from
//! memory-mapped safetensors into sharded safetensors, and a CPU Gemma 2 forward pass to check the result.
//!
//! Data flows one way: [`recipe`] (YAML → validated plan) → [`kernels`] (pure math) → [`executor`]
//! (streams tensors through the kernels) → [`format`](mod@crate::format) (safetensors in and out).

pub mod evaluate;
pub mod executor;
pub mod format;
pub mod front;
pub mod kernels;
pub mod methods;
pub mod model;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod safe_out;
pub mod selection;
pub mod simd;
mod sum;
pub mod synth;
