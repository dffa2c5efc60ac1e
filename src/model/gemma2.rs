//! Gemma 2 (`Gemma2ForCausalLM`): config, weights named after the checkpoint keys, the forward pass, and
//! the KV cache. Numerics follow transformers' eager implementation (`spec/gemma2.md`):
//!
//! - `h = E[ids] · √H`; each layer: h += post_attention_layernorm(attn(input_layernorm(h))), then
//!   h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); RMSNorm scales by (1 + w).
//! - attention: RoPE (rotate-half) on q and k; scores q·kᵀ · query_pre_attn_scalar^(−1/2), soft-capped
//!   before the mask; causal, and on sliding layers query i sees only keys i − W < j ≤ i; grouped-query.
//! - MLP: down(gelu_tanh(gate(x)) · up(x)). Output: final norm, tied embedding, final soft-cap.
//!
//! Weights stay in their stored type (see [`super::weights`]); activations are f32.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::format::{reader::read_config, Model};

use super::ops::{attend, gelu_mul, matmul_many, matmul_p, rms_norm, softcap, Precision, Rope};
use super::weights::{Weight, WeightSource};
use super::ModelError;

/// The architecture fields of a Gemma 2 `config.json`, in either of the forms transformers writes:
/// published (`rope_theta`, sliding layers implied: the even ones) or newer (`layer_types`,
/// `rope_parameters`). Missing optional keys take transformers' `Gemma2Config` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// W: a query on a sliding layer sees its last W positions (`usize::MAX` when the config has null).
    pub sliding_window: usize,
    pub query_pre_attn_scalar: f64,
    /// `None` when the config sets it to null (no cap).
    pub attn_logit_softcapping: Option<f64>,
    /// `None` when the config sets it to null (no cap).
    pub final_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    /// `eos_token_id`, which may be a single id or a list.
    pub eos_token_ids: Vec<u32>,
    /// Whether each layer uses sliding-window attention (from `layer_types`, else the even layers).
    pub sliding_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
}

impl Config {
    /// Reads `DIR/config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        match read_config(dir)? {
            Some(value) => Self::from_json(&value, &path),
            None => Err(ModelError::NoConfig {
                path: dir.to_path_buf(),
            }),
        }
    }

    /// Reads a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| invalid("config.json is not a JSON object".into()))?;
        match obj.get("model_type").and_then(Value::as_str) {
            Some("gemma2") => {}
            Some(other) => {
                return Err(ModelError::NotGemma2 {
                    path: path.to_path_buf(),
                    model_type: other.to_string(),
                })
            }
            None => {
                return Err(invalid(
                    "no \"model_type\" (a Gemma 2 config has \"model_type\": \"gemma2\")".into(),
                ))
            }
        }
        let f = Fields { obj };
        let hidden_size = f.usize("hidden_size", Some(2304)).map_err(invalid)?;
        let num_attention_heads = f.usize("num_attention_heads", Some(8)).map_err(invalid)?;
        let num_hidden_layers = f.usize("num_hidden_layers", Some(26)).map_err(invalid)?;
        let rope_theta = match obj.get("rope_parameters").filter(|v| !v.is_null()) {
            Some(p) => rope_parameters(p).map_err(invalid)?,
            None => f.f64("rope_theta", Some(10_000.0)).map_err(invalid)?,
        };
        if obj.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(invalid(
                "\"rope_scaling\" is set: scaled RoPE is not supported for Gemma 2".into(),
            ));
        }
        let mut sliding_layers = match obj.get("layer_types").filter(|v| !v.is_null()) {
            Some(types) => layer_types(types, num_hidden_layers).map_err(invalid)?,
            None => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
        };
        // "sliding_window": null means no window on any layer (as transformers reads it).
        let sliding_window = match obj.get("sliding_window") {
            Some(Value::Null) => {
                sliding_layers.iter_mut().for_each(|s| *s = false);
                usize::MAX
            }
            _ => f.usize("sliding_window", Some(4096)).map_err(invalid)?,
        };
        let activation = obj
            .get("hidden_activation")
            .or_else(|| obj.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(activation, "gelu_pytorch_tanh" | "gelu_tanh") {
            return Err(invalid(format!("hidden_activation {activation:?} is not supported (Gemma 2 uses gelu_pytorch_tanh)")));
        }
        if obj
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err(invalid(
                "use_bidirectional_attention is true: only causal Gemma 2 is supported".into(),
            ));
        }
        let eos_token_ids = match obj.get("eos_token_id") {
            None => vec![1],
            Some(Value::Null) => vec![],
            Some(v @ Value::Number(_)) => {
                vec![token_id(v).ok_or_else(|| invalid("eos_token_id is not a token id".into()))?]
            }
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    token_id(v).ok_or_else(|| {
                        invalid("eos_token_id holds a value that is not a token id".into())
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(invalid(
                    "eos_token_id must be a token id or a list of them".into(),
                ))
            }
        };
        let config = Config {
            vocab_size: f.usize("vocab_size", Some(256_000)).map_err(invalid)?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size", Some(9216)).map_err(invalid)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: f.usize("num_key_value_heads", Some(4)).map_err(invalid)?,
            head_dim: f.usize("head_dim", Some(256)).map_err(invalid)?,
            rms_norm_eps: f.f64("rms_norm_eps", Some(1e-6)).map_err(invalid)?,
            rope_theta,
            sliding_window,
            query_pre_attn_scalar: f
                .f64("query_pre_attn_scalar", Some(256.0))
                .map_err(invalid)?,
            attn_logit_softcapping: f
                .optional_f64("attn_logit_softcapping", Some(50.0))
                .map_err(invalid)?,
            final_logit_softcapping: f
                .optional_f64("final_logit_softcapping", Some(30.0))
                .map_err(invalid)?,
            max_position_embeddings: f
                .usize("max_position_embeddings", Some(8192))
                .map_err(invalid)?,
            bos_token_id: u32::try_from(f.usize("bos_token_id", Some(2)).map_err(invalid)?)
                .map_err(|_| invalid("bos_token_id is out of range".into()))?,
            eos_token_ids,
            sliding_layers,
            tie_word_embeddings: f.bool("tie_word_embeddings", true).map_err(invalid)?,
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("sliding_window", self.sliding_window),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries for {} layers",
                self.sliding_layers.len(),
                self.num_hidden_layers
            ));
        }
        let finite_positive = |v: f64| v.is_finite() && v > 0.0;
        let valid = finite_positive(self.query_pre_attn_scalar)
            && finite_positive(self.rope_theta)
            && self.rms_norm_eps.is_finite()
            && self.rms_norm_eps >= 0.0;
        if !valid {
            return Err(
                "query_pre_attn_scalar and rope_theta must be positive, rms_norm_eps not negative"
                    .into(),
            );
        }
        for (name, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if cap.is_some_and(|c| !finite_positive(c)) {
                return Err(format!("{name} must be positive or null"));
            }
        }
        if self.bos_token_id as usize >= self.vocab_size {
            return Err(format!(
                "bos_token_id {} is outside the vocabulary of {}",
                self.bos_token_id, self.vocab_size
            ));
        }
        Ok(())
    }

    /// The window of layer `layer`, `None` for a full-attention layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_layers[layer].then_some(self.sliding_window)
    }
}

/// Typed access to config fields, with defaults for absent keys.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn usize(&self, key: &str, default: Option<usize>) -> Result<usize, String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| format!("\"{key}\" is missing")),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("\"{key}\" must be a non-negative integer, found {v}")),
        }
    }

    fn f64(&self, key: &str, default: Option<f64>) -> Result<f64, String> {
        self.optional_f64(key, default)?
            .ok_or_else(|| format!("\"{key}\" must be a number, found null"))
    }

    /// Absent: the default; null: `None`; a number: `Some`.
    fn optional_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>, String> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("\"{key}\" must be a number, found {v}")),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("\"{key}\" must be true or false, found {v}")),
        }
    }
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// θ from the newer `rope_parameters` object (default RoPE only).
fn rope_parameters(p: &Value) -> Result<f64, String> {
    let obj = p
        .as_object()
        .ok_or("\"rope_parameters\" must be an object")?;
    if let Some(kind) = obj.get("rope_type").and_then(Value::as_str) {
        if kind != "default" {
            return Err(format!(
                "rope_parameters.rope_type {kind:?} is not supported (only \"default\")"
            ));
        }
    }
    obj.get("rope_theta")
        .and_then(Value::as_f64)
        .ok_or_else(|| "rope_parameters has no numeric rope_theta".to_string())
}

/// Per-layer sliding flags from `layer_types`.
fn layer_types(types: &Value, layers: usize) -> Result<Vec<bool>, String> {
    let list = types.as_array().ok_or("\"layer_types\" must be a list")?;
    if list.len() != layers {
        return Err(format!(
            "layer_types has {} entries for {layers} layers",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(format!(
                "layer_types[{i}] is {t}, expected \"sliding_attention\" or \"full_attention\""
            )),
        })
        .collect()
}

/// Keys a query at position `i` attends to: every j ≤ i, or on a sliding layer of window W the last W
/// positions, i − W < j ≤ i.
pub(crate) fn key_range(i: usize, window: Option<usize>) -> RangeInclusive<usize> {
    window.map_or(0, |w| (i + 1).saturating_sub(w))..=i
}

/// RMSNorm weights, kept as `1 + w` in f32 (they are stored zero-centred).
struct RmsNorm {
    scale: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &mut Array2<f32>) {
        rms_norm(x, &self.scale, self.eps)
    }
}

struct Attention {
    q_proj: Weight,
    k_proj: Weight,
    v_proj: Weight,
    o_proj: Weight,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// `query_pre_attn_scalar^(−1/2)`, not `head_dim^(−1/2)`.
    scaling: f32,
    softcap: Option<f32>,
    /// Sliding window, `None` on full-attention layers.
    window: Option<usize>,
}

struct Mlp {
    gate_proj: Weight,
    up_proj: Weight,
    down_proj: Weight,
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

/// A Gemma 2 causal language model ready to run.
pub struct Gemma2 {
    config: Config,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection: the embedding itself (tied), unless `tie_word_embeddings` is false.
    lm_head: Weight,
    rope: Rope,
    /// `√hidden_size`, rounded to f32 as transformers rounds it to the activation dtype.
    normalizer: f32,
    /// How matrix products are computed (exact unless `--fast`).
    precision: Precision,
}

/// The keys and values seen so far, per layer. A sliding layer keeps only its last W positions (a ring
/// buffer), a full-attention layer all of them.
pub struct Cache {
    layers: Vec<LayerCache>,
    /// Positions processed so far: the position of the next token.
    len: usize,
}

struct LayerCache {
    window: Option<usize>,
    /// kv_heads · head_dim.
    width: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Cache {
    /// Number of positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions held by each layer (at most W on a sliding layer).
    pub fn held_positions(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.keys.len() / l.width).collect()
    }
}

impl LayerCache {
    fn slot(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => pos % w,
            None => pos,
        }
    }

    fn key(&self, pos: usize) -> &[f32] {
        let s = self.slot(pos) * self.width;
        &self.keys[s..s + self.width]
    }

    fn value(&self, pos: usize) -> &[f32] {
        let s = self.slot(pos) * self.width;
        &self.values[s..s + self.width]
    }

    /// Stores rows of `k` and `v` for positions `first..first + n`, keeping only the last W on a
    /// sliding layer.
    fn append(&mut self, first: usize, k: &Array2<f32>, v: &Array2<f32>) {
        let n = k.nrows();
        let end = first + n;
        let from = self
            .window
            .map_or(first, |w| first.max(end.saturating_sub(w)));
        let slots = self.window.map_or(end, |w| end.min(w));
        if self.keys.len() < slots * self.width {
            self.keys.resize(slots * self.width, 0.0);
            self.values.resize(slots * self.width, 0.0);
        }
        for pos in from..end {
            let s = self.slot(pos) * self.width;
            self.keys[s..s + self.width]
                .copy_from_slice(k.row(pos - first).as_slice().expect("contiguous"));
            self.values[s..s + self.width]
                .copy_from_slice(v.row(pos - first).as_slice().expect("contiguous"));
        }
    }
}

/// Looks up tensors by checkpoint key and checks their shapes against the config.
struct Loader<'a> {
    source: &'a dyn WeightSource,
    origin: String,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight, ModelError> {
        let w = self
            .source
            .weight(name)?
            .ok_or_else(|| ModelError::MissingTensor {
                origin: self.origin.clone(),
                name: name.to_string(),
            })?;
        if w.shape() != shape {
            return Err(ModelError::TensorShape {
                origin: self.origin.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: w.shape().to_vec(),
            });
        }
        Ok(w)
    }

    fn norm(&self, name: &str, size: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        let w = self.get(name, &[size])?;
        Ok(RmsNorm {
            scale: w.to_f32().iter().map(|w| 1.0 + w).collect(),
            eps,
        })
    }
}

impl Gemma2 {
    /// Opens a model folder (or a `.safetensors` file with `config.json` beside it): the config is read and
    /// checked first, then the weights are memory-mapped and checked against it. Nothing is converted.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let config = Config::from_folder(super::folder_of(path))?;
        let model = Arc::new(Model::open(path)?);
        Self::from_source(config, &model)
    }

    /// Builds the model from any source of tensors named as in a checkpoint.
    pub fn from_source(config: Config, source: &dyn WeightSource) -> Result<Self, ModelError> {
        let c = &config;
        let l = Loader {
            source,
            origin: source.origin(),
        };
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let embed_tokens = l.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            l.get("lm_head.weight", &[c.vocab_size, h])?
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let p = format!("model.layers.{n}.");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: l.get(&format!("{p}self_attn.q_proj.weight"), &[q_dim, h])?,
                    k_proj: l.get(&format!("{p}self_attn.k_proj.weight"), &[kv_dim, h])?,
                    v_proj: l.get(&format!("{p}self_attn.v_proj.weight"), &[kv_dim, h])?,
                    o_proj: l.get(&format!("{p}self_attn.o_proj.weight"), &[h, q_dim])?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                    scaling: c.query_pre_attn_scalar.powf(-0.5) as f32,
                    softcap: c.attn_logit_softcapping.map(|v| v as f32),
                    window: c.window(n),
                },
                mlp: Mlp {
                    gate_proj: l.get(&format!("{p}mlp.gate_proj.weight"), &[i, h])?,
                    up_proj: l.get(&format!("{p}mlp.up_proj.weight"), &[i, h])?,
                    down_proj: l.get(&format!("{p}mlp.down_proj.weight"), &[h, i])?,
                },
                input_layernorm: l.norm(
                    &format!("{p}input_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                )?,
                post_attention_layernorm: l.norm(
                    &format!("{p}post_attention_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                )?,
                pre_feedforward_layernorm: l.norm(
                    &format!("{p}pre_feedforward_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                )?,
                post_feedforward_layernorm: l.norm(
                    &format!("{p}post_feedforward_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                )?,
            });
        }
        let norm = l.norm("model.norm.weight", h, c.rms_norm_eps)?;
        let rope = Rope::new(hd, c.rope_theta);
        let normalizer = (h as f64).sqrt() as f32;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            normalizer,
            precision: super::gemm::default_precision(),
        })
    }

    /// Builds the model from tensors held in memory, each in its own type (e.g. a merge's output rounded
    /// to bf16 with [`Weight::from_values`]).
    pub fn from_weights(
        config: Config,
        weights: &HashMap<String, Weight>,
    ) -> Result<Self, ModelError> {
        Self::from_source(config, weights)
    }

    /// Builds the model from f32 tensors held in memory: name → (shape, values).
    pub fn from_f32_tensors(
        config: Config,
        tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self, ModelError> {
        let mut weights = HashMap::with_capacity(tensors.len());
        for (name, (shape, values)) in tensors {
            weights.insert(name, Weight::from_f32(shape, &values)?);
        }
        Self::from_source(config, &weights)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Chooses how matrix products are computed: [`Precision::Exact`] (the default) or the faster
    /// [`Precision::Bf16`] (bf16 products where the CPU has AVX512-BF16; see `model::gemm`).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> Cache {
        let width = self.config.num_key_value_heads * self.config.head_dim;
        let layers = (0..self.layers.len())
            .map(|n| LayerCache {
                window: self.config.window(n),
                width,
                keys: Vec::new(),
                values: Vec::new(),
            })
            .collect();
        Cache { layers, len: 0 }
    }

    /// Checks that `tokens` is not empty and that every id is inside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let vocab = self.config.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(position) => Err(ModelError::TokenOutOfRange {
                token: tokens[position],
                position,
                vocab,
            }),
            None => Ok(()),
        }
    }

    /// Logits [n, vocab] (soft-capped) at every position of `tokens`, which start at position 0.
    pub fn forward(&self, tokens: &[u32]) -> Result<Array2<f32>, ModelError> {
        self.forward_cached(tokens, &mut self.new_cache())
    }

    /// Logits [n, vocab] for `tokens` placed after the positions already in `cache`, which is extended.
    /// Decoding one token at a time this way gives the logits of the full pass.
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
    ) -> Result<Array2<f32>, ModelError> {
        let hidden = self.hidden_states(tokens, cache)?;
        Ok(self.logits(hidden.view()))
    }

    /// The final-normed hidden states [n, hidden_size] of `tokens` placed after `cache`, which is
    /// extended. [`Gemma2::logits`] turns any rows of them into logits: scoring long inputs projects a
    /// few rows at a time instead of holding [n, vocab] at once.
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
    ) -> Result<Array2<f32>, ModelError> {
        self.check_tokens(tokens)?;
        assert_eq!(
            cache.layers.len(),
            self.layers.len(),
            "a cache is used only with the model that made it"
        );
        let first = cache.len;
        let mut h = self.embed(tokens);
        for (layer, layer_cache) in self.layers.iter().zip(&mut cache.layers) {
            layer.forward(&mut h, first, layer_cache, &self.rope, self.precision);
        }
        cache.len += tokens.len();
        self.norm.forward(&mut h);
        Ok(h)
    }

    /// Logits [n, vocab] of final hidden states: `h · Eᵀ`, then the final soft-cap.
    pub fn logits(&self, hidden: ArrayView2<f32>) -> Array2<f32> {
        let mut logits = matmul_p(hidden, &self.lm_head, self.precision);
        if let Some(cap) = self.config.final_logit_softcapping {
            let cap = cap as f32;
            logits
                .as_slice_mut()
                .expect("contiguous")
                .par_chunks_mut(4096)
                .for_each(|c| softcap(c, cap));
        }
        logits
    }

    fn embed(&self, tokens: &[u32]) -> Array2<f32> {
        let mut h = Array2::<f32>::zeros((tokens.len(), self.config.hidden_size));
        for (mut row, &t) in h.rows_mut().into_iter().zip(tokens) {
            let row = row.as_slice_mut().expect("contiguous");
            self.embed_tokens.decode_row(t as usize, row);
            row.iter_mut().for_each(|v| *v *= self.normalizer);
        }
        h
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        h: &mut Array2<f32>,
        first: usize,
        cache: &mut LayerCache,
        rope: &Rope,
        p: Precision,
    ) {
        let mut x = h.clone();
        self.input_layernorm.forward(&mut x);
        let mut a = self.self_attn.forward(&x, first, cache, rope, p);
        self.post_attention_layernorm.forward(&mut a);
        *h += &a;
        let mut x = h.clone();
        self.pre_feedforward_layernorm.forward(&mut x);
        let mut m = self.mlp.forward(&x, p);
        self.post_feedforward_layernorm.forward(&mut m);
        *h += &m;
    }
}

impl Mlp {
    fn forward(&self, x: &Array2<f32>, p: Precision) -> Array2<f32> {
        let [mut gate, up] = matmul_many(x.view(), [&self.gate_proj, &self.up_proj], p);
        gate.as_slice_mut()
            .expect("contiguous")
            .par_chunks_mut(4096)
            .zip(up.as_slice().expect("contiguous").par_chunks(4096))
            .for_each(|(g, u)| gelu_mul(g, u));
        matmul_p(gate.view(), &self.down_proj, p)
    }
}

impl Attention {
    /// Attention of the rows of `x` (positions `first..`) over the cached positions and themselves.
    fn forward(
        &self,
        x: &Array2<f32>,
        first: usize,
        cache: &mut LayerCache,
        rope: &Rope,
        p: Precision,
    ) -> Array2<f32> {
        let (n, nh, hd) = (x.nrows(), self.num_heads, self.head_dim);
        let group = nh / self.num_kv_heads;
        let kv_width = self.num_kv_heads * hd;
        let [mut q, mut k, v] =
            matmul_many(x.view(), [&self.q_proj, &self.k_proj, &self.v_proj], p);
        rope.apply(&mut q.view_mut(), hd, first);
        rope.apply(&mut k.view_mut(), hd, first);

        let (qs, ks, vs) = (
            q.as_slice().expect("contiguous"),
            k.as_slice().expect("contiguous"),
            v.as_slice().expect("contiguous"),
        );
        let cached: &LayerCache = cache;
        // Key and value rows of kv head g at position j: new rows from k/v, earlier ones from the cache.
        let key = |j: usize, g: usize| -> &[f32] {
            if j >= first {
                &ks[(j - first) * kv_width + g * hd..][..hd]
            } else {
                &cached.key(j)[g * hd..][..hd]
            }
        };
        let value = |j: usize, g: usize| -> &[f32] {
            if j >= first {
                &vs[(j - first) * kv_width + g * hd..][..hd]
            } else {
                &cached.value(j)[g * hd..][..hd]
            }
        };
        let mut out = Array2::<f32>::zeros((n, nh * hd));
        out.as_slice_mut()
            .expect("contiguous")
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(idx, o)| {
                let (t, head) = (idx / nh, idx % nh);
                let g = head / group;
                let i = first + t;
                let keys = key_range(i, self.window);
                let qh = &qs[t * nh * hd + head * hd..][..hd];
                attend(
                    qh,
                    keys,
                    |j| key(j, g),
                    |j| value(j, g),
                    self.scaling,
                    self.softcap,
                    o,
                );
            });
        cache.append(first, &k, &v);
        matmul_p(out.view(), &self.o_proj, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn models_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Gemma2>();
        shareable::<Cache>();
    }

    #[test]
    fn sliding_window_sees_exactly_the_last_w_keys() {
        // Query i sees i − W < j ≤ i: W keys including itself, fewer at the start.
        assert_eq!(key_range(0, Some(3)), 0..=0);
        assert_eq!(key_range(2, Some(3)), 0..=2);
        assert_eq!(key_range(3, Some(3)), 1..=3);
        assert_eq!(key_range(10, Some(3)), 8..=10);
        assert_eq!(key_range(10, Some(3)).count(), 3);
        assert_eq!(key_range(10, Some(1)), 10..=10);
        // Full attention: everything up to i.
        assert_eq!(key_range(10, None), 0..=10);
    }

    fn published() -> Value {
        json!({
            "model_type": "gemma2", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 6, "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 8.0, "final_logit_softcapping": 6.0, "max_position_embeddings": 256,
            "bos_token_id": 2, "eos_token_id": 1, "hidden_activation": "gelu_pytorch_tanh"
        })
    }

    #[test]
    fn both_config_forms_read_the_same() {
        let old = Config::from_json(&published(), Path::new("config.json")).unwrap();
        assert_eq!(old.sliding_layers, vec![true, false, true, false]);
        assert!(old.tie_word_embeddings);
        let mut new = published();
        let obj = new.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 10000.0, "rope_type": "default"}),
        );
        obj.insert(
            "layer_types".into(),
            json!([
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention"
            ]),
        );
        obj.insert("eos_token_id".into(), json!([1, 107]));
        let new = Config::from_json(&new, Path::new("config.json")).unwrap();
        assert_eq!(new.eos_token_ids, vec![1, 107]);
        assert_eq!(
            Config {
                eos_token_ids: vec![1],
                ..new
            },
            old
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let check = |edit: &dyn Fn(&mut Map<String, Value>), needle: &str| {
            let mut v = published();
            edit(v.as_object_mut().unwrap());
            let err = Config::from_json(&v, Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        };
        check(
            &|o| drop(o.insert("model_type".into(), json!("llama"))),
            "model_type is llama, not gemma2",
        );
        check(&|o| drop(o.remove("model_type")), "no \"model_type\"");
        check(
            &|o| drop(o.insert("num_key_value_heads".into(), json!(3))),
            "not a multiple",
        );
        check(
            &|o| drop(o.insert("hidden_size".into(), json!("big"))),
            "\"hidden_size\" must be a non-negative integer",
        );
        check(
            &|o| drop(o.insert("layer_types".into(), json!(["full_attention"]))),
            "layer_types has 1 entries",
        );
        check(
            &|o| {
                drop(o.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "yarn", "rope_theta": 1.0}),
                ))
            },
            "yarn",
        );
        check(
            &|o| drop(o.insert("hidden_activation".into(), json!("relu"))),
            "relu",
        );
    }

    #[test]
    fn null_sliding_window_means_full_attention_everywhere() {
        let mut v = published();
        v["sliding_window"] = Value::Null;
        let c = Config::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.sliding_layers, vec![false; 4]);
        assert_eq!(c.window(0), None);
    }

    #[test]
    fn null_soft_caps_disable_them_and_absent_ones_default() {
        let mut v = published();
        v["attn_logit_softcapping"] = Value::Null;
        v.as_object_mut().unwrap().remove("final_logit_softcapping");
        let c = Config::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.attn_logit_softcapping, None);
        assert_eq!(c.final_logit_softcapping, Some(30.0));
    }

    #[test]
    fn ring_cache_keeps_the_last_w_positions() {
        let mut c = LayerCache {
            window: Some(3),
            width: 1,
            keys: vec![],
            values: vec![],
        };
        let rows = |a: usize, b: usize| Array2::from_shape_fn((b - a, 1), |(t, _)| (a + t) as f32);
        c.append(0, &rows(0, 2), &rows(0, 2));
        assert_eq!((c.key(0)[0], c.key(1)[0]), (0.0, 1.0));
        c.append(2, &rows(2, 7), &rows(2, 7));
        assert_eq!(c.keys.len(), 3);
        assert_eq!((c.key(4)[0], c.key(5)[0], c.value(6)[0]), (4.0, 5.0, 6.0));
        c.append(7, &rows(7, 8), &rows(7, 8));
        assert_eq!((c.key(5)[0], c.key(6)[0], c.key(7)[0]), (5.0, 6.0, 7.0));
    }
}
