//! `synth`: random checkpoints with the real shapes of the Gemma family, or a drifted copy of a model.

use std::time::Instant;

use clap::{Args, ValueEnum};
use gemma_merge::format::{FloatType, Model};
use gemma_merge::safe_out::{check_conflicts, model_inputs, Kind, Role, Staged};
use gemma_merge::synth::{self, Shape};

use super::merge::human_bytes;
use super::{Global, PathArg, UsageError};
use gemma_merge::progress::{Progress, Unit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShapeName {
    #[value(name = "2b")]
    B2,
    #[value(name = "9b")]
    B9,
    #[value(name = "27b")]
    B27,
    #[value(name = "gemma-2b")]
    Gemma2b,
    #[value(name = "gemma-7b")]
    Gemma7b,
    #[value(name = "gemma3-1b")]
    Gemma3B1,
    #[value(name = "gemma3-4b")]
    Gemma3B4,
    #[value(name = "gemma3-12b")]
    Gemma3B12,
    #[value(name = "gemma3-27b")]
    Gemma3B27,
}

impl ShapeName {
    fn shape(self) -> Shape {
        let name = match self {
            Self::B2 => "2b",
            Self::B9 => "9b",
            Self::B27 => "27b",
            Self::Gemma2b => "gemma-2b",
            Self::Gemma7b => "gemma-7b",
            Self::Gemma3B1 => "gemma3-1b",
            Self::Gemma3B4 => "gemma3-4b",
            Self::Gemma3B12 => "gemma3-12b",
            Self::Gemma3B27 => "gemma3-27b",
        };
        Shape::named(name).expect("every ShapeName is in the table")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeName {
    Bfloat16,
    Float16,
    Float32,
}

impl DtypeName {
    fn float_type(self) -> FloatType {
        match self {
            Self::Bfloat16 => FloatType::BF16,
            Self::Float16 => FloatType::F16,
            Self::Float32 => FloatType::F32,
        }
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["shape", "from"])))]
pub struct SynthArgs {
    /// Size whose shapes to use (required unless --from): Gemma 2 (2b, 9b, 27b), Gemma 1 (gemma-2b,
    /// gemma-7b) or Gemma 3 (gemma3-1b, gemma3-4b, gemma3-12b, gemma3-27b: the language model, as
    /// Gemma3ForCausalLM).
    #[arg(long, value_enum)]
    pub shape: Option<ShapeName>,
    /// Number of layers (default: the real count: 26, 42, 46).
    #[arg(long, value_name = "N", conflicts_with = "from")]
    pub layers: Option<usize>,
    /// Vocabulary size (default 256000); smaller values make small models for tests and quick experiments.
    #[arg(long, value_name = "N", conflicts_with = "from")]
    pub vocab_size: Option<usize>,
    /// Hidden size override, for tests only.
    #[arg(long, value_name = "N", hide = true, conflicts_with = "from")]
    pub hidden_size: Option<usize>,
    /// Intermediate (MLP) size override, for tests only.
    #[arg(long, value_name = "N", hide = true, conflicts_with = "from")]
    pub intermediate_size: Option<usize>,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value = "bfloat16", conflicts_with = "from")]
    pub dtype: DtypeName,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Base model: write it plus noise of relative size --drift (an RL-like run near it).
    #[arg(long, value_name = "MODEL", requires = "drift")]
    pub from: Option<PathArg>,
    /// Noise standard deviation relative to each tensor's RMS (with --from).
    #[arg(long, value_name = "SIGMA", requires = "from")]
    pub drift: Option<f64>,
    /// Output folder (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathArg,
}

/// Sane upper bounds on the size flags, checked before anything is allocated: 1024 layers (Gemma 2 has at
/// most 46), a 2^22 vocabulary, widths of 2^20, and at most 1 TB of weights.
fn check_size(s: &Shape, dtype: FloatType) -> Result<u64, UsageError> {
    for (flag, value, max) in [
        ("--layers", s.num_hidden_layers, 1024),
        ("--vocab-size", s.vocab_size, 1 << 22),
        ("--hidden-size", s.hidden_size, 1 << 20),
        ("--intermediate-size", s.intermediate_size, 1 << 20),
    ] {
        if value > max {
            return Err(UsageError(format!("{flag} {value}: at most {max}")));
        }
    }
    // Within those bounds every product below fits u64; the sum is checked all the same.
    let bytes = s
        .tensors()
        .iter()
        .try_fold(0u64, |acc, t| {
            let n = t
                .shape
                .iter()
                .try_fold(dtype.size() as u64, |p, &d| p.checked_mul(d as u64))?;
            acc.checked_add(n)
        })
        .filter(|&b| b <= 1_000_000_000_000);
    bytes.ok_or_else(|| UsageError("the requested shape needs more than 1 TB of weights".into()))
}

/// Bytes free for this user in the file system holding `dir` (`None` where it cannot be told).
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

pub fn synth(a: &SynthArgs, g: &Global) -> anyhow::Result<()> {
    let started = Instant::now();
    // clap does not enforce `requires` when the required flag conflicts with one given (--shape).
    if a.drift.is_some() && a.from.is_none() {
        return Err(UsageError("--drift needs --from MODEL".into()).into());
    }
    let mut needed = 0u64;
    let base = match &a.from {
        Some(from) => {
            let sigma = a.drift.expect("clap requires --drift with --from");
            if !sigma.is_finite() || sigma < 0.0 {
                return Err(UsageError(format!(
                    "--drift must be a finite number ≥ 0, got {sigma}"
                ))
                .into());
            }
            let model = Model::open(from)?;
            let mut inputs = model_inputs("the --from model", from);
            inputs.extend(
                model
                    .files()
                    .iter()
                    .map(|f| Role::new("the --from model", f.path())),
            );
            check_conflicts(&[Role::new("the --out folder", &a.out)], &inputs)?;
            needed = model.data_bytes();
            Some((model, sigma as f32))
        }
        None => None,
    };
    let shape = match a.shape {
        Some(name) => {
            let mut s = name.shape();
            for (flag, value, field) in [
                ("--layers", a.layers, &mut s.num_hidden_layers),
                ("--vocab-size", a.vocab_size, &mut s.vocab_size),
                ("--hidden-size", a.hidden_size, &mut s.hidden_size),
                (
                    "--intermediate-size",
                    a.intermediate_size,
                    &mut s.intermediate_size,
                ),
            ] {
                if let Some(v) = value {
                    if v == 0 && flag != "--layers" {
                        return Err(UsageError(format!("{flag} must be at least 1")).into());
                    }
                    *field = v;
                }
            }
            // The sizes pass the same checks as a config.json read for evaluation (bounded, no
            // overflowing products), before anything is allocated or written.
            gemma_merge::model::Config::from_json(
                &s.config(a.dtype.float_type()),
                std::path::Path::new(s.name),
            )
            .map_err(|e| UsageError(format!("--shape {}: {e}", s.name)))?;
            needed = check_size(&s, a.dtype.float_type())?;
            Some(s)
        }
        None => None,
    };
    let staging = Staged::folder(&a.out, Kind::NewFolder, false)?;
    if let Some(free) = free_bytes(staging.path()).filter(|&f| f < needed) {
        anyhow::bail!(
            "{}: the weights need {} but only {} are free there",
            a.out.display(),
            human_bytes(needed),
            human_bytes(free)
        );
    }
    let bars = super::progress::Bars::new(g);
    let done = std::cell::Cell::new(None::<u64>);
    let progress = |now: u64, total: u64| {
        let before = done.get().unwrap_or_else(|| {
            bars.start("writing", total, Unit::Bytes);
            0
        });
        bars.advance(now - before);
        done.set(Some(now));
    };
    let records = match (&base, &shape) {
        (Some((model, sigma)), _) => {
            synth::write_drifted(staging.path(), model, *sigma, a.seed, &progress)?
        }
        (None, Some(shape)) => synth::write_random(
            staging.path(),
            shape,
            a.dtype.float_type(),
            a.seed,
            &progress,
        )?,
        (None, None) => unreachable!("clap requires --shape or --from"),
    };
    bars.finish();
    staging.commit()?;
    if !g.quiet {
        let bytes: u64 = records.iter().map(|r| r.size).sum();
        let params = match (&base, &shape) {
            (Some((model, _)), _) => model.tensors().iter().map(|t| t.numel() as u64).sum(),
            (None, Some(s)) => s.parameters(),
            (None, None) => 0,
        };
        outln!(
            "wrote {} ({} parameters, {} files, {}) in {:.2} s",
            super::shown(&a.out),
            params,
            records.len(),
            human_bytes(bytes),
            started.elapsed().as_secs_f64()
        )?;
    }
    Ok(())
}
