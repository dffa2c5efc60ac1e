//! Synthetic checkpoints: random weights with the real Gemma 2 shapes, written like a published checkpoint
//! (config.json, ≤ 5 GB shards, index), for benchmarks and tests; or a "drifted" copy of a model (its
//! weights plus small relative noise: an RL-like run near it).
//!
//! Every value is a pure function of (seed, tensor name, element index), drawn from a counter-based
//! generator (SplitMix64), so chunks are generated in parallel and the bytes never depend on the thread
//! count. Tensors stream to the writer in chunks: memory stays flat whatever the model size.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

use crate::format::error::FormatError;
use crate::format::writer::{write_small_file, FileRecord, ModelWriter, TensorSpec};
use crate::format::{FloatType, Model};
use crate::model::family::{Dims, Family};

/// Largest shard written, in bytes (Hugging Face's default `max_shard_size="5GB"`).
pub const SHARD_SIZE: u64 = 5_000_000_000;
/// Standard deviation of weight matrices and the embedding (Gemma's `initializer_range`).
pub const MATRIX_STD: f32 = 0.02;
/// Standard deviation of norm weights, stored zero-centred (RMSNorm scales by 1 + w).
pub const NORM_STD: f32 = 0.05;
/// Side files copied from the base model of a drifted copy, when present: the same as a merge copies.
pub use crate::executor::SIDE_FILES;

/// Elements generated per write to the output (one chunk in flight while the previous one is written).
const CHUNK: usize = 1 << 21;
/// Elements per parallel task inside a chunk.
const BLOCK: usize = 1 << 14;
/// Domain separators, so a drift's noise is independent of the random weights of the same seed.
const DOMAIN_WEIGHTS: u64 = 0x5745_4947_4854_5321; // "WEIGHTS!"
const DOMAIN_DRIFT: u64 = 0x4452_4946_544e_4f49; // "DRIFTNOI"

/// The architecture numbers of a member of the Gemma family (see spec/gemma2.md, spec/family.md); which
/// tensors a layer has comes from [`Family::layer_tensors`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub query_pre_attn_scalar: usize,
    pub vocab_size: usize,
    /// Sliding window (Gemma 2 and 3; unused by Gemma 1).
    pub sliding_window: usize,
    /// Gemma 3's linear RoPE scaling factor of full-attention layers, if any.
    pub rope_scaling: Option<f64>,
}

/// The published sizes: Gemma 2 (`2b`, `9b`, `27b`), Gemma 1 (`gemma-2b`, `gemma-7b`) and the language
/// models of Gemma 3 (`gemma3-1b` ... `gemma3-27b`, written as text-only `Gemma3ForCausalLM`).
pub const SHAPES: [Shape; 9] = [
    Shape {
        name: "2b",
        family: Family::Gemma2,
        hidden_size: 2304,
        intermediate_size: 9216,
        num_hidden_layers: 26,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 256_000,
        sliding_window: 4096,
        rope_scaling: None,
    },
    Shape {
        name: "9b",
        family: Family::Gemma2,
        hidden_size: 3584,
        intermediate_size: 14336,
        num_hidden_layers: 42,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 256_000,
        sliding_window: 4096,
        rope_scaling: None,
    },
    Shape {
        name: "27b",
        family: Family::Gemma2,
        hidden_size: 4608,
        intermediate_size: 36864,
        num_hidden_layers: 46,
        num_attention_heads: 32,
        num_key_value_heads: 16,
        head_dim: 128,
        query_pre_attn_scalar: 144,
        vocab_size: 256_000,
        sliding_window: 4096,
        rope_scaling: None,
    },
    Shape {
        name: "gemma-2b",
        family: Family::Gemma,
        hidden_size: 2048,
        intermediate_size: 16384,
        num_hidden_layers: 18,
        num_attention_heads: 8,
        num_key_value_heads: 1,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 256_000,
        sliding_window: 0,
        rope_scaling: None,
    },
    Shape {
        name: "gemma-7b",
        family: Family::Gemma,
        hidden_size: 3072,
        intermediate_size: 24576,
        num_hidden_layers: 28,
        num_attention_heads: 16,
        num_key_value_heads: 16,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 256_000,
        sliding_window: 0,
        rope_scaling: None,
    },
    Shape {
        name: "gemma3-1b",
        family: Family::Gemma3,
        hidden_size: 1152,
        intermediate_size: 6912,
        num_hidden_layers: 26,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 262_144,
        sliding_window: 512,
        rope_scaling: None,
    },
    Shape {
        name: "gemma3-4b",
        family: Family::Gemma3,
        hidden_size: 2560,
        intermediate_size: 10240,
        num_hidden_layers: 34,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 262_208,
        sliding_window: 1024,
        rope_scaling: Some(8.0),
    },
    Shape {
        name: "gemma3-12b",
        family: Family::Gemma3,
        hidden_size: 3840,
        intermediate_size: 15360,
        num_hidden_layers: 48,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        head_dim: 256,
        query_pre_attn_scalar: 256,
        vocab_size: 262_208,
        sliding_window: 1024,
        rope_scaling: Some(8.0),
    },
    Shape {
        name: "gemma3-27b",
        family: Family::Gemma3,
        hidden_size: 5376,
        intermediate_size: 21504,
        num_hidden_layers: 62,
        num_attention_heads: 32,
        num_key_value_heads: 16,
        head_dim: 128,
        query_pre_attn_scalar: 168,
        vocab_size: 262_208,
        sliding_window: 1024,
        rope_scaling: Some(8.0),
    },
];

/// How a synthetic tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// A weight matrix or the embedding: N(0, [`MATRIX_STD`]).
    Matrix,
    /// An RMSNorm weight (zero-centred): N(0, [`NORM_STD`]).
    Norm,
}

impl Init {
    pub fn std(self) -> f32 {
        match self {
            Self::Matrix => MATRIX_STD,
            Self::Norm => NORM_STD,
        }
    }
}

/// One tensor of a synthetic checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl SynthTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Shape {
    /// The published shape called `name` (see [`SHAPES`]).
    pub fn named(name: &str) -> Option<Shape> {
        SHAPES.iter().copied().find(|s| s.name == name)
    }

    /// The tensors of the checkpoint, in the order they are written: the embedding, each layer (its
    /// tensors in name order, layers in numeric order), the final norm. No `lm_head`: it is tied.
    pub fn tensors(&self) -> Vec<SynthTensor> {
        let h = self.hidden_size;
        let t = |name: String, shape: Vec<usize>, init| SynthTensor { name, shape, init };
        let mut v = vec![t(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
            Init::Matrix,
        )];
        let layer = self.family.layer_tensors(&self.dims());
        for l in 0..self.num_hidden_layers {
            for (suffix, shape, norm) in &layer {
                let init = if *norm { Init::Norm } else { Init::Matrix };
                v.push(t(format!("model.layers.{l}.{suffix}"), shape.clone(), init));
            }
        }
        v.push(t("model.norm.weight".into(), vec![h], Init::Norm));
        v
    }

    fn dims(&self) -> Dims {
        Dims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }

    /// The writer's specs for the tensors, in `dtype`.
    pub fn specs(&self, dtype: FloatType) -> Vec<TensorSpec> {
        self.tensors()
            .into_iter()
            .map(|t| TensorSpec {
                name: t.name,
                dtype: dtype.dtype(),
                shape: t.shape,
            })
            .collect()
    }

    /// Number of parameters.
    pub fn parameters(&self) -> u64 {
        self.tensors().iter().map(|t| t.numel() as u64).sum()
    }

    /// `config.json` in the published form of the family (Gemma 2: transformers 4.42; Gemma 3: 4.50),
    /// keys in the published order.
    pub fn config(&self, dtype: FloatType) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [self.family.architecture()],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "head_dim": self.head_dim,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "initializer_range": MATRIX_STD as f64,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 8192,
            "model_type": self.family.model_type(),
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "torch_dtype": dtype.torch_name(),
            "transformers_version": "4.42.4",
            "use_cache": true,
            "vocab_size": self.vocab_size,
        });
        let o = c.as_object_mut().expect("an object");
        let mut set = |k: &str, v: serde_json::Value| drop(o.insert(k.to_string(), v));
        match self.family {
            Family::Gemma => {
                set("transformers_version", "4.38.0".into());
            }
            Family::Gemma2 => {
                set("attn_logit_softcapping", 50.0.into());
                set("cache_implementation", "hybrid".into());
                set("final_logit_softcapping", 30.0.into());
                set("query_pre_attn_scalar", self.query_pre_attn_scalar.into());
                set("sliding_window", self.sliding_window.into());
            }
            Family::Gemma3 => {
                set("attn_logit_softcapping", serde_json::Value::Null);
                set("cache_implementation", "hybrid".into());
                set("eos_token_id", serde_json::json!([1, 106]));
                set("final_logit_softcapping", serde_json::Value::Null);
                set("max_position_embeddings", 131_072.into());
                set("query_pre_attn_scalar", self.query_pre_attn_scalar.into());
                set("rope_local_base_freq", 10000.0.into());
                set("rope_theta", 1_000_000.0.into());
                set(
                    "rope_scaling",
                    match self.rope_scaling {
                        Some(f) => serde_json::json!({"factor": f, "rope_type": "linear"}),
                        None => serde_json::Value::Null,
                    },
                );
                set("sliding_window", self.sliding_window.into());
                set("sliding_window_pattern", 6.into());
                set("transformers_version", "4.50.0".into());
            }
        }
        c
    }
}

/// `generation_config.json` as published with Gemma 2 checkpoints.
pub fn generation_config() -> serde_json::Value {
    serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "pad_token_id": 0,
        "transformers_version": "4.42.4",
    })
}

// ---------------------------------------------------------------------------------------------------
// The generator

/// SplitMix64's output function (Steele, Lea, Flood 2014): a bijective 64-bit mix.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The stream key of one tensor: a hash of the seed, a domain and the tensor's name (not its position,
/// so a layer's weights do not depend on how many layers the model has).
pub fn tensor_key(seed: u64, domain: u64, name: &str) -> u64 {
    let mut h = mix64(seed.wrapping_add(GOLDEN) ^ mix64(domain));
    for chunk in name.as_bytes().chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix64(h.wrapping_add(GOLDEN) ^ u64::from_le_bytes(w));
    }
    mix64(h ^ name.len() as u64)
}

/// Variance of a sum of four independent uniform integers on 0..=65535.
const SUM4_VAR: f64 = 4.0 * (65536.0 * 65536.0 - 1.0) / 12.0;
const SUM4_MEAN: f32 = 4.0 * 32767.5;

/// The factor turning a centred sum of four 16-bit uniforms into a value of standard deviation `std`.
fn sum4_scale(std: f32) -> f32 {
    (std as f64 / SUM4_VAR.sqrt()) as f32
}

/// Element `index` of the stream `key`, times `scale`: an approximately normal deviate (the Irwin–Hall sum
/// of four 16-bit uniforms from one SplitMix64 output: mean 0, variance 1 after scaling, bounded at
/// ±3.46 σ). Integer arithmetic and a single f32 multiplication: the same bits on every platform.
#[inline]
fn deviate(key: u64, index: u64, scale: f32) -> f32 {
    let h = mix64(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    let s = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    (s as f32 - SUM4_MEAN) * scale
}

/// Fills `out` with elements `start..start + out.len()` of stream `key`, of standard deviation `std`.
pub fn fill_normal(key: u64, std: f32, start: u64, out: &mut [f32]) {
    let scale = sum4_scale(std);
    for (i, v) in out.iter_mut().enumerate() {
        *v = deviate(key, start + i as u64, scale);
    }
}

// ---------------------------------------------------------------------------------------------------
// Streaming

/// Where a streamed tensor's bytes come from. A tensor is measured in `unit`-byte units (elements of
/// its dtype, or single bytes for a verbatim copy).
trait Source: Sync {
    /// Units and unit size in bytes of tensor `t`.
    fn layout(&self, t: usize) -> (usize, usize);
    /// Called once before the first chunk of tensor `t` is produced.
    fn begin(&self, _t: usize) {}
    /// Writes units `start..` of tensor `t` into `dst` (a whole number of units, at most [`BLOCK`]).
    fn fill(&self, t: usize, start: usize, dst: &mut [u8]);
    /// Called once the last chunk of tensor `t` has been written.
    fn end(&self, _t: usize) {}
}

/// Streams every tensor of `source`, in order, into `writer`: chunk k + 1 is produced (in parallel blocks)
/// while chunk k is hashed and written.
fn stream(
    writer: &mut ModelWriter,
    source: &dyn Source,
    tensors: usize,
    progress: &dyn Fn(u64, u64),
) -> Result<(), FormatError> {
    let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
    let mut total = 0u64;
    for t in 0..tensors {
        let (units, unit) = source.layout(t);
        total += (units * unit) as u64;
        let mut start = 0;
        while start < units {
            let len = CHUNK.min(units - start);
            jobs.push((t, start, len));
            start += len;
        }
    }
    let produce = |&(t, start, len): &(usize, usize, usize), buf: &mut Vec<u8>| {
        if start == 0 {
            source.begin(t);
        }
        let unit = source.layout(t).1;
        buf.clear();
        buf.resize(len * unit, 0);
        buf.par_chunks_mut(BLOCK * unit)
            .enumerate()
            .for_each(|(j, dst)| source.fill(t, start + j * BLOCK, dst));
    };
    let mut cur = Vec::new();
    let mut next = Vec::new();
    if let Some(first) = jobs.first() {
        produce(first, &mut cur);
    }
    let mut done = 0u64;
    for k in 0..jobs.len() {
        let (written, ()) = rayon::join(
            || writer.write(&cur),
            || {
                if let Some(job) = jobs.get(k + 1) {
                    produce(job, &mut next);
                }
            },
        );
        written?;
        done += cur.len() as u64;
        progress(done, total);
        let (t, start, len) = jobs[k];
        if start + len == source.layout(t).0 {
            source.end(t);
        }
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(())
}

/// Random weights of `shape` in `dtype`.
struct Random {
    dtype: FloatType,
    tensors: Vec<(u64, f32, usize)>,
}

impl Source for Random {
    fn layout(&self, t: usize) -> (usize, usize) {
        (self.tensors[t].2, self.dtype.size())
    }

    fn fill(&self, t: usize, start: usize, dst: &mut [u8]) {
        let (key, std, _) = self.tensors[t];
        let mut vals = vec![0f32; dst.len() / self.dtype.size()];
        fill_normal(key, std, start as u64, &mut vals);
        let mut bytes = Vec::with_capacity(dst.len());
        self.dtype.encode(&vals, &mut bytes);
        dst.copy_from_slice(&bytes);
    }
}

/// Writes a random checkpoint of `shape` into the existing folder `dir`: the weights (sharded at
/// [`SHARD_SIZE`], with an index when there is more than one shard), `config.json` and
/// `generation_config.json`. Returns the files written. `progress(done, total)` gets tensor bytes.
pub fn write_random(
    dir: &Path,
    shape: &Shape,
    dtype: FloatType,
    seed: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<FileRecord>, FormatError> {
    write_random_sharded(dir, shape, dtype, seed, SHARD_SIZE, progress)
}

fn write_random_sharded(
    dir: &Path,
    shape: &Shape,
    dtype: FloatType,
    seed: u64,
    shard_size: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<FileRecord>, FormatError> {
    let tensors = shape.tensors();
    let source = Random {
        dtype,
        tensors: tensors
            .iter()
            .map(|t| {
                (
                    tensor_key(seed, DOMAIN_WEIGHTS, &t.name),
                    t.init.std(),
                    t.numel(),
                )
            })
            .collect(),
    };
    let mut writer = ModelWriter::create(dir, shape.specs(dtype), shard_size)?;
    stream(&mut writer, &source, tensors.len(), progress)?;
    let mut records = writer.finish()?;
    records.push(write_small_file(
        dir,
        "config.json",
        json_text(&shape.config(dtype)).as_bytes(),
    )?);
    records.push(write_small_file(
        dir,
        "generation_config.json",
        json_text(&generation_config()).as_bytes(),
    )?);
    Ok(records)
}

fn json_text(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON serializes");
    s.push('\n');
    s
}

/// A model's weights plus noise of relative size `sigma`.
struct Drift<'a> {
    base: &'a Model,
    sigma: f32,
    keys: Vec<u64>,
    /// Per tensor: its float type (`None`: copied verbatim), and the noise std (f32 bits) once known.
    types: Vec<Option<FloatType>>,
    noise_std: Vec<AtomicU32>,
}

impl Drift<'_> {
    fn bytes(&self, t: usize) -> &[u8] {
        self.base.data(&self.base.tensors()[t])
    }
}

impl Source for Drift<'_> {
    fn layout(&self, t: usize) -> (usize, usize) {
        let info = &self.base.tensors()[t];
        match self.types[t] {
            Some(ft) => (info.numel(), ft.size()),
            None => (info.len, 1),
        }
    }

    fn begin(&self, t: usize) {
        let Some(ft) = self.types[t] else { return };
        let bytes = self.bytes(t);
        let n = bytes.len() / ft.size();
        if n == 0 {
            return;
        }
        // Per-block sums in f64, added in block order: the same result for any thread count.
        let partial: Vec<f64> = bytes
            .par_chunks(BLOCK * ft.size())
            .map(|b| {
                let mut vals = vec![0f32; b.len() / ft.size()];
                ft.decode(b, &mut vals);
                vals.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
            })
            .collect();
        let rms = (partial.iter().sum::<f64>() / n as f64).sqrt();
        let std = (self.sigma as f64 * rms) as f32;
        self.noise_std[t].store(std.to_bits(), Ordering::Relaxed);
    }

    fn fill(&self, t: usize, start: usize, dst: &mut [u8]) {
        let bytes = self.bytes(t);
        let Some(ft) = self.types[t] else {
            dst.copy_from_slice(&bytes[start..start + dst.len()]);
            return;
        };
        let size = ft.size();
        let mut vals = vec![0f32; dst.len() / size];
        ft.decode(&bytes[start * size..start * size + dst.len()], &mut vals);
        let std = f32::from_bits(self.noise_std[t].load(Ordering::Relaxed));
        if std != 0.0 {
            let scale = sum4_scale(std);
            for (i, v) in vals.iter_mut().enumerate() {
                *v += deviate(self.keys[t], (start + i) as u64, scale);
            }
        }
        let mut out = Vec::with_capacity(dst.len());
        ft.encode(&vals, &mut out);
        dst.copy_from_slice(&out);
    }

    fn end(&self, t: usize) {
        let info = &self.base.tensors()[t];
        self.base.file_of(info).release(info.start, info.len);
    }
}

/// Writes into the existing folder `dir` a copy of `base` whose floating tensors (bf16, f16, f32) get
/// added noise of standard deviation `sigma` × the tensor's RMS (rounded once to the tensor's dtype);
/// other tensors are copied. Names, shapes, dtypes and order are the base's; `config.json` and the
/// tokenizer and generation files are copied from the base's folder when present.
pub fn write_drifted(
    dir: &Path,
    base: &Model,
    sigma: f32,
    seed: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<FileRecord>, FormatError> {
    let tensors = base.tensors();
    let source = Drift {
        base,
        sigma,
        keys: tensors
            .iter()
            .map(|t| tensor_key(seed, DOMAIN_DRIFT, &t.name))
            .collect(),
        types: tensors
            .iter()
            .map(|t| FloatType::from_dtype(t.dtype))
            .collect(),
        noise_std: tensors.iter().map(|_| AtomicU32::new(0)).collect(),
    };
    let specs = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut writer = ModelWriter::create(dir, specs, SHARD_SIZE)?;
    stream(&mut writer, &source, tensors.len(), progress)?;
    let mut records = writer.finish()?;
    for name in std::iter::once("config.json").chain(SIDE_FILES) {
        let from = base.folder().join(name);
        match crate::format::files::read_limited(&from, crate::format::files::SIDE_FILE_LIMIT) {
            Ok(bytes) => records.push(write_small_file(dir, name, &bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FormatError::io(from, e)),
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Shape {
        Shape {
            name: "tiny",
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            query_pre_attn_scalar: 8,
            vocab_size: 40_000,
            family: Family::Gemma2,
            sliding_window: 4096,
            rope_scaling: None,
        }
    }

    #[test]
    fn every_shape_is_a_valid_config_of_its_family_with_its_tensors() {
        use crate::model::{Config, Family};
        for shape in SHAPES {
            let c =
                Config::from_json(&shape.config(FloatType::BF16), Path::new(shape.name)).unwrap();
            assert_eq!(c.family, shape.family, "{}", shape.name);
            assert_eq!(c.dims(), shape.dims());
            let layer0: Vec<String> = shape
                .tensors()
                .into_iter()
                .filter_map(|t| t.name.strip_prefix("model.layers.0.").map(String::from))
                .collect();
            // Gemma 1: 2 norms + 7 matrices; Gemma 2: 4 norms; Gemma 3: and QK-norm.
            let want = match shape.family {
                Family::Gemma => 9,
                Family::Gemma2 => 11,
                Family::Gemma3 => 13,
            };
            assert_eq!(layer0.len(), want, "{}", shape.name);
            let mut sorted = layer0.clone();
            sorted.sort();
            assert_eq!(layer0, sorted, "tensors in name order");
        }
        let g3 = Shape::named("gemma3-27b").unwrap();
        let c = Config::from_json(&g3.config(FloatType::BF16), Path::new("x")).unwrap();
        assert_eq!(c.query_pre_attn_scalar, 168.0);
        assert_eq!(c.rope_full.factor, 8.0);
        assert_eq!(c.rope_sliding.theta, 10_000.0);
        assert_eq!(c.sliding_window, 1024);
        assert_eq!(c.sliding_layers.iter().filter(|s| !**s).count(), 10);
    }

    fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn values(m: &Model, name: &str) -> Vec<f32> {
        let t = m.get(name).unwrap();
        let ft = FloatType::from_dtype(t.dtype).unwrap();
        let mut out = vec![0f32; t.numel()];
        ft.decode(m.data(t), &mut out);
        out
    }

    #[test]
    fn published_parameter_counts() {
        assert_eq!(Shape::named("2b").unwrap().parameters(), 2_614_341_888);
        assert_eq!(Shape::named("9b").unwrap().parameters(), 9_241_705_984);
        assert_eq!(Shape::named("27b").unwrap().parameters(), 27_227_128_320);
        assert!(Shape::named("7b").is_none());
    }

    #[test]
    fn tensor_names_and_shapes_follow_gemma2() {
        let s = Shape::named("27b").unwrap();
        let t = s.tensors();
        assert_eq!(t.len(), 2 + 11 * 46);
        assert_eq!(t[0].name, "model.embed_tokens.weight");
        assert_eq!(t[0].shape, vec![256_000, 4608]);
        assert_eq!(t.last().unwrap().name, "model.norm.weight");
        let get = |n: &str| t.iter().find(|x| x.name == n).unwrap().shape.clone();
        assert_eq!(
            get("model.layers.45.self_attn.q_proj.weight"),
            vec![4096, 4608]
        );
        assert_eq!(
            get("model.layers.0.self_attn.k_proj.weight"),
            vec![2048, 4608]
        );
        assert_eq!(
            get("model.layers.0.self_attn.o_proj.weight"),
            vec![4608, 4096]
        );
        assert_eq!(
            get("model.layers.0.mlp.down_proj.weight"),
            vec![4608, 36864]
        );
        assert_eq!(get("model.layers.0.mlp.up_proj.weight"), vec![36864, 4608]);
        assert_eq!(
            get("model.layers.0.pre_feedforward_layernorm.weight"),
            vec![4608]
        );
        assert!(t.iter().all(|x| !x.name.contains("lm_head")));
        let c = s.config(FloatType::BF16);
        assert_eq!(c["query_pre_attn_scalar"], 144);
        assert_eq!(c["num_hidden_layers"], 46);
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["architectures"][0], "Gemma2ForCausalLM");
        // The largest tensors of every Gemma 2 shape fit a 5 GB shard in f32 (Gemma 3 27B's embedding
        // does not: the writer gives such a tensor a shard of its own, as transformers does).
        for s in SHAPES.iter().filter(|s| s.family == Family::Gemma2) {
            assert!(s
                .specs(FloatType::F32)
                .iter()
                .all(|t| t.byte_len() <= SHARD_SIZE));
        }
    }

    #[test]
    fn deviates_have_the_requested_moments() {
        let mut v = vec![0f32; 1 << 20];
        fill_normal(tensor_key(7, DOMAIN_WEIGHTS, "x"), 0.02, 0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((sd / 0.02 - 1.0).abs() < 0.01, "sd {sd}");
        // A chunk starting mid-stream is the same as the tail of the whole stream.
        let mut tail = vec![0f32; 1000];
        fill_normal(tensor_key(7, DOMAIN_WEIGHTS, "x"), 0.02, 5000, &mut tail);
        assert_eq!(&tail[..], &v[5000..6000]);
        // Different names and seeds give different streams.
        let mut other = vec![0f32; 1000];
        fill_normal(tensor_key(8, DOMAIN_WEIGHTS, "x"), 0.02, 5000, &mut other);
        assert_ne!(other, tail);
        fill_normal(tensor_key(7, DOMAIN_WEIGHTS, "y"), 0.02, 5000, &mut other);
        assert_ne!(other, tail);
    }

    #[test]
    fn same_seed_same_bytes_whatever_the_threads() {
        let write = |threads: usize, seed: u64| {
            let dir = tempfile::tempdir().unwrap();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                write_random(dir.path(), &tiny(), FloatType::BF16, seed, &|_, _| {}).unwrap()
            });
            read_all(dir.path())
        };
        let a = write(1, 3);
        assert_eq!(a, write(3, 3));
        assert_ne!(a, write(2, 4));
        let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["config.json", "generation_config.json", "model.safetensors"]
        );
    }

    #[test]
    fn random_model_reads_back_with_the_right_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let shape = tiny();
        let records = write_random(dir.path(), &shape, FloatType::F32, 1, &|_, _| {}).unwrap();
        assert_eq!(records.len(), 3);
        let m = Model::open(dir.path()).unwrap();
        let names: Vec<&str> = m.tensors().iter().map(|t| t.name.as_str()).collect();
        let expected: Vec<String> = shape.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names, expected);
        let e = values(&m, "model.embed_tokens.weight");
        let rms = (e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
        assert!((rms / 0.02 - 1.0).abs() < 0.02, "rms {rms}");
        let cfg = m.config().unwrap().unwrap();
        assert_eq!(cfg["vocab_size"], 40_000);
        assert_eq!(cfg["torch_dtype"], "float32");
    }

    #[test]
    fn drift_has_the_requested_relative_size() {
        let base_dir = tempfile::tempdir().unwrap();
        write_random(base_dir.path(), &tiny(), FloatType::F32, 5, &|_, _| {}).unwrap();
        std::fs::write(base_dir.path().join("tokenizer.json"), b"{}").unwrap();
        let base = Model::open(base_dir.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        write_drifted(out.path(), &base, 0.01, 5, &|_, _| {}).unwrap();
        let d = Model::open(out.path()).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("config.json")).unwrap(),
            std::fs::read(base_dir.path().join("config.json")).unwrap()
        );
        assert!(out.path().join("tokenizer.json").exists());
        for t in base.tensors() {
            let dt = d.get(&t.name).unwrap();
            assert_eq!((dt.dtype, &dt.shape), (t.dtype, &t.shape));
            let a = values(&base, &t.name);
            let b = values(&d, &t.name);
            let norm = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>().sqrt();
            let diff = norm(&mut a.iter().zip(&b).map(|(x, y)| ((y - x) as f64).powi(2)));
            let base_norm = norm(&mut a.iter().map(|&x| (x as f64).powi(2)));
            let rel = diff / base_norm;
            // Small tensors (norms: 16 elements) scatter more.
            let tol = if t.numel() > 10_000 { 0.0005 } else { 0.006 };
            assert!((rel - 0.01).abs() < tol, "{}: relative {rel}", t.name);
        }
        // The same seed gives the same bytes; the noise is not a copy of the weights' own stream.
        let again = tempfile::tempdir().unwrap();
        write_drifted(again.path(), &base, 0.01, 5, &|_, _| {}).unwrap();
        assert_eq!(read_all(out.path()), read_all(again.path()));
        let (a, b) = (
            values(&base, "model.norm.weight"),
            values(&d, "model.norm.weight"),
        );
        let ratio: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (y - x) / x).collect();
        assert!(ratio.iter().any(|r| (r - ratio[0]).abs() > 1e-3));
    }

    #[test]
    fn sharded_output_has_an_index_and_reads_back() {
        let one = tempfile::tempdir().unwrap();
        write_random(one.path(), &tiny(), FloatType::BF16, 9, &|_, _| {}).unwrap();
        let many = tempfile::tempdir().unwrap();
        let records = write_random_sharded(
            many.path(),
            &tiny(),
            FloatType::BF16,
            9,
            700_000,
            &|_, _| {},
        )
        .unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "config.json",
                "generation_config.json"
            ]
        );
        let (a, b) = (
            Model::open(one.path()).unwrap(),
            Model::open(many.path()).unwrap(),
        );
        for t in a.tensors() {
            assert_eq!(a.data(t), b.data(b.get(&t.name).unwrap()), "{}", t.name);
        }
        // The full 2b in f32 (10.5 GB) needs three 5 GB shards.
        let full = Shape::named("2b").unwrap().specs(FloatType::F32);
        assert_eq!(
            crate::format::writer::plan_shards(&full, SHARD_SIZE).len(),
            3
        );
    }
}
