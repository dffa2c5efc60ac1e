//! The forward pass of the Gemma family (`GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM` and
//! the language model of `Gemma3ForConditionalGeneration`): weights named after the checkpoint keys, the
//! forward pass, and the KV cache. What differs between members is read from [`super::family`]; numerics
//! follow transformers' eager implementation (`spec/gemma2.md`, `spec/family.md`):
//!
//! - `h = E[ids] · √H`; each layer: h += post_attention_layernorm(attn(input_layernorm(h))), then
//!   h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); RMSNorm scales by (1 + w).
//!   Gemma 1 has neither post-norm: its `post_attention_layernorm` is the norm before the MLP.
//! - attention: Gemma 3 normalises each head's q and k (QK-norm); RoPE (rotate-half) on q and k, from the
//!   table of the layer's kind; scores q·kᵀ · query_pre_attn_scalar^(−1/2), soft-capped (if the config
//!   says so) before the mask; causal, and on sliding layers query i sees only keys i − W < j ≤ i;
//!   grouped-query.
//! - MLP: down(gelu_tanh(gate(x)) · up(x)). Output: final norm, tied embedding, final soft-cap (if any).
//!
//! Weights stay in their stored type (see [`super::weights`]); activations are f32. The type keeps its
//! historical name [`Gemma2`]; [`super::Gemma`] names the same.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::format::Model;

pub use super::family::Config;
use super::family::{layer_group, lm_head_name};
use super::ops::{
    attend, gelu_mul, matmul_many, matmul_p, rms_norm, softcap, Precision, Rope, QUERY_BLOCK,
};
use super::weights::{Weight, WeightSource};
use super::ModelError;

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

    /// Normalises each head (`head_dim` columns) of each row of `x` on its own.
    fn per_head(&self, x: Array2<f32>, head_dim: usize) -> Array2<f32> {
        let (n, width) = x.dim();
        let mut heads = x
            .into_shape_with_order((n * width / head_dim, head_dim))
            .expect("contiguous rows of whole heads");
        self.forward(&mut heads);
        heads
            .into_shape_with_order((n, width))
            .expect("the same number of elements")
    }
}

struct Attention {
    q_proj: Weight,
    k_proj: Weight,
    v_proj: Weight,
    o_proj: Weight,
    /// Gemma 3's per-head RMSNorms of q and k (over head_dim), applied before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// `query_pre_attn_scalar^(−1/2)`, not `head_dim^(−1/2)`.
    scaling: f32,
    softcap: Option<f32>,
    /// Sliding window, `None` on full-attention layers.
    window: Option<usize>,
    /// The RoPE table of the layer's kind (Gemma 3: local on sliding layers, scaled global on full ones).
    rope: Arc<Rope>,
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
    /// After attention (Gemma 2 and 3); `None` in Gemma 1.
    post_attention_layernorm: Option<RmsNorm>,
    /// Before the MLP: `pre_feedforward_layernorm`, or Gemma 1's `post_attention_layernorm`.
    pre_feedforward_layernorm: RmsNorm,
    /// After the MLP (Gemma 2 and 3); `None` in Gemma 1.
    post_feedforward_layernorm: Option<RmsNorm>,
}

/// A Gemma causal language model (any member of the family) ready to run.
pub struct Gemma2 {
    config: Config,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection: the embedding itself (tied), unless `tie_word_embeddings` is false.
    lm_head: Weight,
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

/// Refuses a checkpoint holding layers the config does not have (`num_hidden_layers` too small): they
/// would be silently ignored. Too few layers show up as a missing tensor.
fn check_layer_count(
    source: &dyn WeightSource,
    prefix: &str,
    layers: usize,
    origin: &str,
) -> Result<(), ModelError> {
    let layers_prefix = format!("{prefix}layers.");
    let beyond = source.names().into_iter().find(|name| {
        layer_group(name)
            .strip_prefix(&layers_prefix)
            .and_then(|rest| rest.trim_end_matches('.').parse::<usize>().ok())
            .is_some_and(|n| n >= layers)
    });
    match beyond {
        Some(name) => Err(ModelError::ExtraLayer {
            origin: origin.to_string(),
            name,
            layers,
        }),
        None => Ok(()),
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
        if let Some(index) = w.first_non_finite() {
            return Err(ModelError::NonFiniteWeight {
                origin: self.origin.clone(),
                name: name.to_string(),
                index,
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
        // The weights first: a path that does not exist is named as such, not as a folder without config.
        let model = Arc::new(Model::open(path)?);
        let config = Config::from_folder(super::folder_of(path))?;
        Self::from_source(config, &model)
    }

    /// Builds the model from any source of tensors named as in a checkpoint: the language model's tensors
    /// under whichever prefix the checkpoint uses (see [`super::family::LM_PREFIXES`]). Every tensor is
    /// checked against the config (shape, and finite values: NaN or infinite weights are an error here,
    /// not garbage later), and the checkpoint may not hold layers beyond `num_hidden_layers`.
    pub fn from_source(config: Config, source: &dyn WeightSource) -> Result<Self, ModelError> {
        let c = &config;
        let origin = source.origin();
        let mut prefix = None;
        for p in c.prefixes() {
            if source.weight(&format!("{p}embed_tokens.weight"))?.is_some() {
                prefix = Some(p);
                break;
            }
        }
        let prefix = prefix.unwrap_or(c.prefixes()[0]);
        let l = Loader {
            source,
            origin: origin.clone(),
        };
        check_layer_count(source, prefix, c.num_hidden_layers, &origin)?;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let embed_tokens = l.get(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            l.get(lm_head_name(prefix), &[c.vocab_size, h])?
        };
        let family = c.family;
        // Each layer's tensors and their shapes, from the family description.
        let shapes: HashMap<&str, Vec<usize>> = family
            .layer_tensors(&c.dims())
            .into_iter()
            .map(|(suffix, shape, _)| (suffix, shape))
            .collect();
        let ropes =
            [c.rope_full, c.rope_sliding].map(|r| Arc::new(Rope::linear(hd, r.theta, r.factor)));
        let eps = c.rms_norm_eps;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let p = format!("{prefix}layers.{n}.");
            let shape = |suffix: &str| -> &[usize] {
                shapes
                    .get(suffix)
                    .expect("the family description lists every tensor the model reads")
            };
            let t = |suffix: &str| l.get(&format!("{p}{suffix}"), shape(suffix));
            let norm = |name: &str| {
                let suffix = format!("{name}.weight");
                l.norm(&format!("{p}{suffix}"), shape(&suffix)[0], eps)
            };
            let qk_norm = |name: &str| -> Result<Option<RmsNorm>, ModelError> {
                family.qk_norm().then(|| norm(name)).transpose()
            };
            let (post_attention, pre_feedforward, post_feedforward) = if family.sandwich_norms() {
                (
                    Some(norm("post_attention_layernorm")?),
                    norm("pre_feedforward_layernorm")?,
                    Some(norm("post_feedforward_layernorm")?),
                )
            } else {
                (None, norm("post_attention_layernorm")?, None)
            };
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: t("self_attn.q_proj.weight")?,
                    k_proj: t("self_attn.k_proj.weight")?,
                    v_proj: t("self_attn.v_proj.weight")?,
                    o_proj: t("self_attn.o_proj.weight")?,
                    q_norm: qk_norm("self_attn.q_norm")?,
                    k_norm: qk_norm("self_attn.k_norm")?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                    scaling: c.query_pre_attn_scalar.powf(-0.5) as f32,
                    softcap: c
                        .attn_logit_softcapping
                        .filter(|_| family.attention_softcap())
                        .map(|v| v as f32),
                    window: c.window(n),
                    rope: ropes[usize::from(c.sliding_layers[n])].clone(),
                },
                mlp: Mlp {
                    gate_proj: t("mlp.gate_proj.weight")?,
                    up_proj: t("mlp.up_proj.weight")?,
                    down_proj: t("mlp.down_proj.weight")?,
                },
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: post_attention,
                pre_feedforward_layernorm: pre_feedforward,
                post_feedforward_layernorm: post_feedforward,
            });
        }
        let norm = l.norm(&format!("{prefix}norm.weight"), h, eps)?;
        let normalizer = (h as f64).sqrt() as f32;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
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
            layer.forward(&mut h, first, layer_cache, self.precision);
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
    fn forward(&self, h: &mut Array2<f32>, first: usize, cache: &mut LayerCache, p: Precision) {
        let mut x = h.clone();
        self.input_layernorm.forward(&mut x);
        let mut a = self.self_attn.forward(&x, first, cache, p);
        if let Some(norm) = &self.post_attention_layernorm {
            norm.forward(&mut a);
        }
        *h += &a;
        let mut x = h.clone();
        self.pre_feedforward_layernorm.forward(&mut x);
        let mut m = self.mlp.forward(&x, p);
        if let Some(norm) = &self.post_feedforward_layernorm {
            norm.forward(&mut m);
        }
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
        p: Precision,
    ) -> Array2<f32> {
        let (n, nh, hd) = (x.nrows(), self.num_heads, self.head_dim);
        let group = nh / self.num_kv_heads;
        let kv_width = self.num_kv_heads * hd;
        let [mut q, mut k, v] =
            matmul_many(x.view(), [&self.q_proj, &self.k_proj, &self.v_proj], p);
        if let (Some(q_norm), Some(k_norm)) = (&self.q_norm, &self.k_norm) {
            q = q_norm.per_head(q, hd);
            k = k_norm.per_head(k, hd);
        }
        self.rope.apply(&mut q.view_mut(), hd, first);
        self.rope.apply(&mut k.view_mut(), hd, first);

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
        // Per head, blocks of QUERY_BLOCK positions ([nh][n][hd]), then laid out as [n][nh·hd].
        let mut heads = vec![0f32; nh * n * hd];
        heads
            .par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(head, hbuf)| {
                let g = head / group;
                hbuf.par_chunks_mut(QUERY_BLOCK * hd)
                    .enumerate()
                    .for_each(|(blk, o)| {
                        let t0 = blk * QUERY_BLOCK;
                        let b = o.len() / hd;
                        let q: Vec<f32> = (t0..t0 + b)
                            .flat_map(|t| &qs[t * nh * hd + head * hd..][..hd])
                            .copied()
                            .collect();
                        let ranges: Vec<_> = (t0..t0 + b)
                            .map(|t| key_range(first + t, self.window))
                            .collect();
                        attend(
                            &q,
                            hd,
                            &ranges,
                            |j| key(j, g),
                            |j| value(j, g),
                            self.scaling,
                            self.softcap,
                            o,
                        );
                    });
            });
        let mut out = Array2::<f32>::zeros((n, nh * hd));
        out.as_slice_mut()
            .expect("contiguous")
            .par_chunks_mut(nh * hd)
            .enumerate()
            .for_each(|(t, row)| {
                for (head, o) in row.chunks_exact_mut(hd).enumerate() {
                    o.copy_from_slice(&heads[(head * n + t) * hd..][..hd]);
                }
            });
        cache.append(first, &k, &v);
        matmul_p(out.view(), &self.o_proj, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
