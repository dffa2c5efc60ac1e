//! Progress of long work, told to whoever runs it. The library counts; the command line draws the bars.
//!
//! A run is a sequence of phases; each [`Progress::start`]s with the total it will count (bytes of tensor
//! data for merges, hashing and writing; model positions for the forward pass), then
//! [`Progress::advance`]s as it goes, in small steps (a block of a tensor, a few dozen positions), so that a
//! bar moves from the first second whatever the size of the largest tensor.

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of data processed (a merge counts the base tensor's bytes once per pass over it).
    Bytes,
    /// Model positions run through the forward pass (one per token per model).
    Positions,
}

/// Receives progress. Implementations must be cheap: `advance` is called from worker threads, often.
pub trait Progress: Sync {
    /// A phase begins (`phase` is a short lower-case verb: "merging", "scoring", "verifying") that will
    /// count `total` units.
    fn start(&self, phase: &str, total: u64, unit: Unit);
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64);
}

/// No progress reporting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64, _: Unit) {}
    fn advance(&self, _: u64) {}
}
