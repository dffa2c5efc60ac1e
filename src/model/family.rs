//! What a member of the Gemma family is, in one place (`spec/family.md`, `spec/gemma2.md`): the
//! `config.json` forms users have (published, nested `text_config`, transformers 5's `layer_types` and
//! `rope_parameters`), transformers' defaults for what sparse configs leave out, the tensors of each family
//! and the prefixes checkpoints put them under, norms, QK-norm, soft-caps, the RoPE table of each layer kind,
//! and how tensor names group into layers. The loader, the KV cache, `synth` and the merger's layer grouping
//! all read this module.

use std::path::Path;

use serde_json::{Map, Value};

use crate::format::reader::read_config;

use super::ModelError;

/// A member of the Gemma family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Gemma 1 (`model_type: gemma`): two norms per layer, global attention, no soft-caps.
    Gemma,
    /// Gemma 2 (`gemma2`): sandwich norms, alternating sliding/global layers, soft-caps.
    Gemma2,
    /// Gemma 3 (`gemma3_text`, or `gemma3` with a `text_config`): QK-norm, two RoPE tables.
    Gemma3,
}

impl Family {
    /// The family of a text model's `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "gemma" => Some(Self::Gemma),
            "gemma2" => Some(Self::Gemma2),
            "gemma3_text" | "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The `model_type` of a text-only checkpoint.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Gemma => "gemma",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
        }
    }

    /// The transformers class of a text-only checkpoint.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Gemma => "GemmaForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Whether each layer has `pre_feedforward_layernorm` and `post_feedforward_layernorm` (Gemma 2 and 3)
    /// around the MLP, with `post_attention_layernorm` after attention; in Gemma 1
    /// `post_attention_layernorm` is the norm before the MLP and there are no others.
    pub fn sandwich_norms(self) -> bool {
        self != Self::Gemma
    }

    /// Whether attention scores are soft-capped by `attn_logit_softcapping`. Only Gemma 2's are:
    /// transformers' Gemma 3 attention reads the field but never applies it (checked against transformers
    /// 5.24 with a cap of 20: fixtures/family/gemma3-linear8-t5), and the forward pass follows transformers.
    pub fn attention_softcap(self) -> bool {
        self == Self::Gemma2
    }

    /// Whether attention normalises each head's q and k (`self_attn.q_norm`, `self_attn.k_norm`).
    pub fn qk_norm(self) -> bool {
        self == Self::Gemma3
    }

    /// The tensors of one layer (suffixes after `…layers.N.`), in name order, with their shapes and whether
    /// each is a norm weight.
    pub fn layer_tensors(self, d: &Dims) -> Vec<(&'static str, Vec<usize>, bool)> {
        let (h, i, hd) = (d.hidden_size, d.intermediate_size, d.head_dim);
        let (q, kv) = (d.num_attention_heads * hd, d.num_key_value_heads * hd);
        let mut v = vec![
            ("input_layernorm.weight", vec![h], true),
            ("mlp.down_proj.weight", vec![h, i], false),
            ("mlp.gate_proj.weight", vec![i, h], false),
            ("mlp.up_proj.weight", vec![i, h], false),
            ("post_attention_layernorm.weight", vec![h], true),
        ];
        if self.sandwich_norms() {
            v.push(("post_feedforward_layernorm.weight", vec![h], true));
            v.push(("pre_feedforward_layernorm.weight", vec![h], true));
        }
        if self.qk_norm() {
            v.push(("self_attn.k_norm.weight", vec![hd], true));
        }
        v.push(("self_attn.k_proj.weight", vec![kv, h], false));
        v.push(("self_attn.o_proj.weight", vec![h, q], false));
        if self.qk_norm() {
            v.push(("self_attn.q_norm.weight", vec![hd], true));
        }
        v.push(("self_attn.q_proj.weight", vec![q, h], false));
        v.push(("self_attn.v_proj.weight", vec![kv, h], false));
        v
    }
}

/// The prefixes a checkpoint may put the language model under: text models (`model.`), multimodal Gemma 3
/// as published (`language_model.model.`) and as transformers 5 writes it (`model.language_model.`).
pub const LM_PREFIXES: [&str; 3] = ["model.", "language_model.model.", "model.language_model."];

/// The untied output projection that goes with each of [`LM_PREFIXES`].
pub fn lm_head_name(prefix: &str) -> &'static str {
    match prefix {
        "language_model.model." => "language_model.lm_head.weight",
        _ => "lm_head.weight",
    }
}

/// The group a tensor belongs to for per-layer merging (SLERP's `angle: layer`): the name up to and
/// including `layers.N.` for any transformer layer, whatever the prefix (`model.layers.N.`,
/// `language_model.model.layers.N.`, `model.language_model.layers.N.`, and vision-tower layers
/// `vision_tower.vision_model.encoder.layers.N.`, which thus form groups of their own). Every other tensor
/// is its own group (the whole name).
pub fn layer_group(name: &str) -> &str {
    let mut start = 0;
    while let Some(found) = name[start..].find("layers.") {
        let at = start + found;
        let after = at + "layers.".len();
        let digits = name[after..].bytes().take_while(u8::is_ascii_digit).count();
        let boundary = at == 0 || name.as_bytes()[at - 1] == b'.';
        if boundary && digits > 0 && name.as_bytes().get(after + digits) == Some(&b'.') {
            return &name[..after + digits + 1];
        }
        start = after;
    }
    name
}

/// The sizes that shape a model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

/// Upper bounds on config sizes: far above any Gemma (the largest has hidden 5376, 62 layers, a 262k
/// vocabulary), low enough that no product of them overflows or asks for an absurd allocation.
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_LAYERS: usize = 4096;
const MAX_HEADS: usize = 1 << 14;
/// Largest number of elements of one weight matrix (2^36: 128 GiB in bf16).
const MAX_MATRIX: usize = 1 << 36;

/// Rotary embedding of one layer kind: base θ and the linear scaling factor positions are divided by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    /// 1 without scaling; `rope_type: linear` divides positions by it.
    pub factor: f64,
}

/// The architecture fields of a Gemma `config.json`, in any of the forms transformers writes. Missing keys
/// take transformers' defaults for the family (`GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub family: Family,
    /// Whether the config is a multimodal Gemma 3 one (`model_type: gemma3` with `text_config`): the
    /// language model's tensors then sit under `language_model.model.` or `model.language_model.`.
    pub multimodal: bool,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE of full-attention layers (Gemma 3: `rope_theta` and `rope_scaling`).
    pub rope_full: RopeParams,
    /// RoPE of sliding layers (Gemma 3: `rope_local_base_freq`, unscaled; the others: as full layers).
    pub rope_sliding: RopeParams,
    /// W: a query on a sliding layer sees its last W positions (`usize::MAX` when the config has null).
    pub sliding_window: usize,
    /// Scores are scaled by its −½ power (Gemma 1: head_dim).
    pub query_pre_attn_scalar: f64,
    /// `None` when the config sets it to null (no cap).
    pub attn_logit_softcapping: Option<f64>,
    /// `None` when the config sets it to null (no cap).
    pub final_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    /// `eos_token_id`, which may be a single id or a list.
    pub eos_token_ids: Vec<u32>,
    /// Whether each layer uses sliding-window attention.
    pub sliding_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
}

/// transformers' defaults of one family's config class.
struct Defaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    rope_theta: f64,
    max_position_embeddings: usize,
    caps: (Option<f64>, Option<f64>),
}

fn defaults(family: Family) -> Defaults {
    match family {
        Family::Gemma => Defaults {
            vocab_size: 256_000,
            hidden_size: 3072,
            intermediate_size: 24576,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            rope_theta: 10_000.0,
            max_position_embeddings: 8192,
            caps: (None, None),
        },
        Family::Gemma2 => Defaults {
            vocab_size: 256_000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            rope_theta: 10_000.0,
            max_position_embeddings: 8192,
            caps: (Some(50.0), Some(30.0)),
        },
        Family::Gemma3 => Defaults {
            vocab_size: 262_208,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 131_072,
            caps: (None, None),
        },
    }
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
        let top = value
            .as_object()
            .ok_or_else(|| invalid("config.json is not a JSON object".into()))?;
        let model_type = match top.get("model_type").and_then(Value::as_str) {
            Some(t) => t,
            None => {
                return Err(invalid(
                    "no \"model_type\" (a Gemma config has \"model_type\": \"gemma\", \"gemma2\", \"gemma3_text\" or \"gemma3\")"
                        .into(),
                ))
            }
        };
        let family = Family::from_model_type(model_type).ok_or_else(|| ModelError::NotGemma {
            path: path.to_path_buf(),
            model_type: model_type.to_string(),
        })?;
        // A multimodal Gemma 3 config keeps the language model's fields in `text_config` (possibly
        // absent or sparse: missing fields take Gemma3TextConfig's defaults).
        let empty = Map::new();
        let (obj, multimodal) = if model_type == "gemma3" {
            match top.get("text_config") {
                Some(Value::Object(t)) => (t, true),
                None | Some(Value::Null) => (&empty, true),
                Some(_) => return Err(invalid("\"text_config\" must be an object".into())),
            }
        } else {
            (top, false)
        };
        let d = defaults(family);
        let f = Fields { obj };
        let num_hidden_layers = f
            .usize("num_hidden_layers", Some(d.num_hidden_layers))
            .map_err(invalid)?;
        if num_hidden_layers > MAX_LAYERS {
            return Err(invalid(format!(
                "num_hidden_layers {num_hidden_layers} is absurd (at most {MAX_LAYERS})"
            )));
        }
        let (rope_full, rope_sliding) = rope(family, obj, d.rope_theta).map_err(invalid)?;
        let mut sliding_layers = match obj.get("layer_types").filter(|v| !v.is_null()) {
            Some(types) => layer_types(types, num_hidden_layers).map_err(invalid)?,
            None => match family {
                Family::Gemma => vec![false; num_hidden_layers],
                Family::Gemma2 => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
                Family::Gemma3 => {
                    let pattern = f
                        .usize("sliding_window_pattern", Some(6))
                        .map_err(invalid)?;
                    if pattern == 0 {
                        return Err(invalid("sliding_window_pattern must be positive".into()));
                    }
                    (0..num_hidden_layers)
                        .map(|i| (i + 1) % pattern != 0)
                        .collect()
                }
            },
        };
        // "sliding_window": null means no window on any layer (as transformers reads it).
        let sliding_window = match (family, obj.get("sliding_window")) {
            (Family::Gemma, _) => usize::MAX,
            (_, Some(Value::Null)) => {
                sliding_layers.iter_mut().for_each(|s| *s = false);
                usize::MAX
            }
            _ => f.usize("sliding_window", Some(4096)).map_err(invalid)?,
        };
        // Gemma 1 configs name the activation `hidden_act` ("gelu" in old ones, which transformers maps to
        // the tanh approximation); `hidden_activation` wins when both are given.
        let activation = obj
            .get("hidden_activation")
            .filter(|v| !v.is_null())
            .or_else(|| obj.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        let tanh_gelu = matches!(activation, "gelu_pytorch_tanh" | "gelu_tanh")
            || (family == Family::Gemma && activation == "gelu");
        if !tanh_gelu {
            return Err(invalid(format!(
                "hidden_activation {activation:?} is not supported (Gemma uses gelu_pytorch_tanh)"
            )));
        }
        for key in ["use_bidirectional_attention", "attention_bias"] {
            if obj.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(invalid(format!(
                    "{key} is true: only causal Gemma models without biases are supported"
                )));
            }
        }
        // Multimodal configs often keep the token ids at the top level only.
        let token = |key: &str| obj.get(key).or_else(|| top.get(key));
        let eos_token_ids = match token("eos_token_id") {
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
        let bos_token_id = match token("bos_token_id") {
            None | Some(Value::Null) => 2,
            Some(v) => token_id(v).ok_or_else(|| invalid("bos_token_id is out of range".into()))?,
        };
        let head_dim = f.usize("head_dim", Some(256)).map_err(invalid)?;
        let (attn_cap, final_cap) = match family {
            Family::Gemma => (None, None),
            _ => (
                f.optional_f64("attn_logit_softcapping", d.caps.0)
                    .map_err(invalid)?,
                f.optional_f64("final_logit_softcapping", d.caps.1)
                    .map_err(invalid)?,
            ),
        };
        let query_pre_attn_scalar = match family {
            Family::Gemma => head_dim as f64,
            _ => f
                .f64("query_pre_attn_scalar", Some(256.0))
                .map_err(invalid)?,
        };
        let config = Config {
            family,
            multimodal,
            vocab_size: f.usize("vocab_size", Some(d.vocab_size)).map_err(invalid)?,
            hidden_size: f
                .usize("hidden_size", Some(d.hidden_size))
                .map_err(invalid)?,
            intermediate_size: f
                .usize("intermediate_size", Some(d.intermediate_size))
                .map_err(invalid)?,
            num_hidden_layers,
            num_attention_heads: f
                .usize("num_attention_heads", Some(d.num_attention_heads))
                .map_err(invalid)?,
            num_key_value_heads: f
                .usize("num_key_value_heads", Some(d.num_key_value_heads))
                .map_err(invalid)?,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps", Some(1e-6)).map_err(invalid)?,
            rope_full,
            rope_sliding,
            sliding_window,
            query_pre_attn_scalar,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            max_position_embeddings: f
                .usize("max_position_embeddings", Some(d.max_position_embeddings))
                .map_err(invalid)?,
            bos_token_id,
            eos_token_ids,
            sliding_layers,
            tie_word_embeddings: f
                .bool(
                    "tie_word_embeddings",
                    top.get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                )
                .map_err(invalid)?,
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// The sizes that shape the tensors.
    pub fn dims(&self) -> Dims {
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

    /// Checks the relations between fields that the forward pass relies on, and bounds every size so that
    /// no product of them overflows or asks for an absurd allocation.
    pub fn validate(&self) -> Result<(), String> {
        // (name, value, may it be 0, largest sane value)
        let sizes = [
            ("vocab_size", self.vocab_size, false, MAX_VOCAB),
            ("hidden_size", self.hidden_size, false, MAX_WIDTH),
            (
                "intermediate_size",
                self.intermediate_size,
                false,
                MAX_WIDTH,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                false,
                MAX_HEADS,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                false,
                MAX_HEADS,
            ),
            ("head_dim", self.head_dim, false, MAX_WIDTH),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                true,
                MAX_LAYERS,
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                false,
                usize::MAX,
            ),
            ("sliding_window", self.sliding_window, false, usize::MAX),
        ];
        for (name, value, zero_ok, max) in sizes {
            if value == 0 && !zero_ok {
                return Err(format!("{name} must be positive"));
            }
            if value > max {
                return Err(format!("{name} {value} is absurd (at most {max})"));
            }
        }
        let product = |a: (&str, usize), b: (&str, usize), max: usize| match a.1.checked_mul(b.1) {
            Some(p) if p <= max => Ok(p),
            _ => Err(format!(
                "{} × {} ({} × {}) is absurd (at most {max})",
                a.0, b.0, a.1, b.1
            )),
        };
        let heads = ("num_attention_heads", self.num_attention_heads);
        let kv_heads = ("num_key_value_heads", self.num_key_value_heads);
        let head_dim = ("head_dim", self.head_dim);
        let hidden = ("hidden_size", self.hidden_size);
        let q = product(heads, head_dim, MAX_WIDTH)?;
        product(kv_heads, head_dim, MAX_WIDTH)?;
        product(("vocab_size", self.vocab_size), hidden, MAX_MATRIX)?;
        product(
            ("intermediate_size", self.intermediate_size),
            hidden,
            MAX_MATRIX,
        )?;
        product(("num_attention_heads × head_dim", q), hidden, MAX_MATRIX)?;
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
        let rope_ok = |r: &RopeParams| finite_positive(r.theta) && finite_positive(r.factor);
        if !(rope_ok(&self.rope_full) && rope_ok(&self.rope_sliding)) {
            return Err(
                "rope_theta, rope_local_base_freq and RoPE scaling factors must be positive".into(),
            );
        }
        let valid = finite_positive(self.query_pre_attn_scalar)
            && self.rms_norm_eps.is_finite()
            && self.rms_norm_eps >= 0.0;
        if !valid {
            return Err("query_pre_attn_scalar must be positive, rms_norm_eps not negative".into());
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

    /// The RoPE of layer `layer`.
    pub fn rope(&self, layer: usize) -> RopeParams {
        if self.sliding_layers[layer] {
            self.rope_sliding
        } else {
            self.rope_full
        }
    }

    /// The prefixes this config's language model may sit under, most likely first.
    pub fn prefixes(&self) -> [&'static str; 3] {
        if self.multimodal {
            [LM_PREFIXES[1], LM_PREFIXES[2], LM_PREFIXES[0]]
        } else {
            LM_PREFIXES
        }
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

/// The RoPE of full and sliding layers, from `rope_parameters` (transformers 5: one object, or one per
/// layer kind) or the published `rope_theta`, `rope_scaling` and (Gemma 3) `rope_local_base_freq`.
fn rope(
    family: Family,
    obj: &Map<String, Value>,
    default_theta: f64,
) -> Result<(RopeParams, RopeParams), String> {
    let f = Fields { obj };
    let theta = f.f64("rope_theta", Some(default_theta))?;
    let local_theta = match family {
        Family::Gemma3 => f.f64("rope_local_base_freq", Some(10_000.0))?,
        _ => theta,
    };
    if let Some(p) = obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let p = p
            .as_object()
            .ok_or("\"rope_parameters\" must be an object")?;
        if p.contains_key("full_attention") || p.contains_key("sliding_attention") {
            let kind = |key: &str, fallback: f64| match p.get(key) {
                Some(v) => rope_object(v, &format!("rope_parameters.{key}"), fallback),
                None => Ok(RopeParams {
                    theta: fallback,
                    factor: 1.0,
                }),
            };
            return Ok((
                kind("full_attention", theta)?,
                kind("sliding_attention", local_theta)?,
            ));
        }
        let all = rope_object(&Value::Object(p.clone()), "rope_parameters", theta)?;
        return Ok(match family {
            Family::Gemma3 => (
                all,
                RopeParams {
                    theta: local_theta,
                    factor: 1.0,
                },
            ),
            _ => (all, all),
        });
    }
    let full = match obj.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(s) => rope_object(s, "rope_scaling", theta)?,
        None => RopeParams { theta, factor: 1.0 },
    };
    let sliding = match family {
        // Gemma 3's local table is never scaled; Gemma 1 and 2 use one table everywhere.
        Family::Gemma3 => RopeParams {
            theta: local_theta,
            factor: 1.0,
        },
        _ => full,
    };
    Ok((full, sliding))
}

/// One RoPE description: `rope_type` `default` or `linear` (with `factor`), optional `rope_theta`.
fn rope_object(v: &Value, what: &str, theta: f64) -> Result<RopeParams, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("\"{what}\" must be an object"))?;
    let kind = o
        .get("rope_type")
        .or_else(|| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let theta = match o.get("rope_theta") {
        None | Some(Value::Null) => theta,
        Some(t) => t
            .as_f64()
            .ok_or_else(|| format!("{what}.rope_theta must be a number, found {t}"))?,
    };
    let factor = match kind {
        "default" => 1.0,
        "linear" => o
            .get("factor")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("{what} is linear but has no numeric \"factor\""))?,
        other => {
            return Err(format!(
                "{what}.rope_type {other:?} is not supported (only \"default\" and \"linear\")"
            ))
        }
    };
    Ok(RopeParams { theta, factor })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            "model_type is llama, not a Gemma model",
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
    fn gemma3_layer_kinds_and_rope_tables_in_both_forms() {
        let published = json!({
            "model_type": "gemma3_text", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3, "sliding_window": 5,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}
        });
        let old = Config::from_json(&published, Path::new("config.json")).unwrap();
        // Layer i is full when (i + 1) % pattern == 0.
        assert_eq!(
            old.sliding_layers,
            vec![true, true, false, true, true, false, true]
        );
        assert_eq!(
            old.rope(2),
            RopeParams {
                theta: 1e6,
                factor: 8.0
            }
        );
        assert_eq!(
            old.rope(0),
            RopeParams {
                theta: 1e4,
                factor: 1.0
            }
        );
        assert_eq!(old.attn_logit_softcapping, None);
        assert_eq!(old.query_pre_attn_scalar, 256.0);
        let mut v5 = published.clone();
        let o = v5.as_object_mut().unwrap();
        for k in [
            "rope_theta",
            "rope_local_base_freq",
            "rope_scaling",
            "sliding_window_pattern",
        ] {
            o.remove(k);
        }
        o.insert(
            "layer_types".into(),
            json!([
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention"
            ]),
        );
        o.insert(
            "rope_parameters".into(),
            json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        assert_eq!(
            Config::from_json(&v5, Path::new("config.json")).unwrap(),
            old
        );
    }

    #[test]
    fn sparse_multimodal_config_takes_gemma3_text_defaults() {
        let mm = json!({"model_type": "gemma3", "eos_token_id": [1, 106],
            "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 384}});
        let c = Config::from_json(&mm, Path::new("config.json")).unwrap();
        assert!(c.multimodal);
        assert_eq!(c.family, Family::Gemma3);
        assert_eq!(
            (c.head_dim, c.num_attention_heads, c.num_key_value_heads),
            (256, 8, 4)
        );
        assert_eq!((c.sliding_window, c.query_pre_attn_scalar), (4096, 256.0));
        assert_eq!(
            c.rope_full,
            RopeParams {
                theta: 1e6,
                factor: 1.0
            }
        );
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert_eq!(c.prefixes()[0], "language_model.model.");
    }

    #[test]
    fn gemma1_is_global_without_caps_and_scales_by_head_dim() {
        let g1 = json!({"model_type": "gemma", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24,
            "hidden_act": "gelu"});
        let c = Config::from_json(&g1, Path::new("config.json")).unwrap();
        assert_eq!(c.sliding_layers, vec![false; 3]);
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (None, None)
        );
        assert_eq!(c.query_pre_attn_scalar, 24.0);
    }

    #[test]
    fn absurd_sizes_are_refused_before_any_allocation() {
        let check = |key: &str, value: Value, needle: &str| {
            let mut v = published();
            v[key] = value;
            let err = Config::from_json(&v, Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        };
        // heads × head_dim wraps to 0 on 64 bits without checked arithmetic.
        check(
            "num_attention_heads",
            json!(1u64 << 33),
            "num_attention_heads",
        );
        check("head_dim", json!(1u64 << 62), "head_dim");
        check("head_dim", json!(1 << 19), "num_attention_heads × head_dim");
        check("vocab_size", json!(1u64 << 40), "vocab_size");
        check(
            "num_hidden_layers",
            json!(1_000_000),
            "num_hidden_layers 1000000 is absurd",
        );
        check(
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings must be positive",
        );
        check(
            "rope_scaling",
            json!({"rope_type": "dynamic", "factor": 2.0}),
            "dynamic",
        );
    }

    #[test]
    fn layer_groups_under_every_prefix() {
        for (name, group) in [
            ("model.layers.12.mlp.up_proj.weight", "model.layers.12."),
            (
                "language_model.model.layers.0.self_attn.q_norm.weight",
                "language_model.model.layers.0.",
            ),
            (
                "model.language_model.layers.3.input_layernorm.weight",
                "model.language_model.layers.3.",
            ),
            (
                "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.1.",
            ),
            ("model.embed_tokens.weight", "model.embed_tokens.weight"),
            (
                "multi_modal_projector.mm_input_projection_weight",
                "multi_modal_projector.mm_input_projection_weight",
            ),
            ("model.layers.x.weight", "model.layers.x.weight"),
            ("model.sublayers.1.w", "model.sublayers.1.w"),
            ("layers.4.w", "layers.4."),
        ] {
            assert_eq!(layer_group(name), group, "{name}");
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn size() -> impl Strategy<Value = Value> {
            prop_oneof![
                (0u64..64).prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (0u32..40).prop_map(|b| Value::from(1u64 << b)),
                Just(Value::Null),
                Just(json!(-1)),
                Just(json!(1.5)),
                Just(json!("8")),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            /// Arbitrary sizes in any family and form: a config is read or refused, never a panic, and
            /// what is accepted has every product the forward pass forms within the bounds.
            #[test]
            fn config_reader_never_panics_and_bounds_products(
                model_type in prop_oneof![Just("gemma"), Just("gemma2"), Just("gemma3_text"), Just("gemma3")],
                vals in proptest::collection::vec(size(), 9),
                nested in any::<bool>(),
            ) {
                let keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "sliding_window"];
                let mut fields = Map::new();
                for (k, v) in keys.iter().zip(vals) {
                    fields.insert(k.to_string(), v);
                }
                let config = if model_type == "gemma3" && nested {
                    json!({"model_type": "gemma3", "text_config": fields})
                } else {
                    let mut f = fields;
                    f.insert("model_type".into(), model_type.into());
                    Value::Object(f)
                };
                if let Ok(c) = Config::from_json(&config, Path::new("config.json")) {
                    let q = c.num_attention_heads.checked_mul(c.head_dim).unwrap();
                    prop_assert!(q <= MAX_WIDTH);
                    prop_assert!(c.vocab_size.checked_mul(c.hidden_size).unwrap() <= MAX_MATRIX);
                    prop_assert!(q.checked_mul(c.hidden_size).unwrap() <= MAX_MATRIX);
                    prop_assert!(c.intermediate_size.checked_mul(c.hidden_size).unwrap() <= MAX_MATRIX);
                    prop_assert!(c.max_position_embeddings > 0);
                    prop_assert_eq!(c.sliding_layers.len(), c.num_hidden_layers);
                }
            }
        }
    }
}
