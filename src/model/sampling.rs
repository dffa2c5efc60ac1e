//! Choosing the next token (greedy, or temperature / top-k / top-p sampling from a seeded generator) and
//! the generation loop over the KV cache.

use std::time::Instant;

use super::{Gemma2, ModelError};

/// How to pick the next token. Greedy when `temperature` is 0 (the default), and then `top_k` / `top_p`
/// are ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Sample only among the K most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to at least P.
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges: temperature ≥ 0 and finite, top-k ≥ 1, 0 < top-p ≤ 1.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number ≥ 0, not {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top-p must be in (0, 1], not {p}"));
            }
        }
        Ok(())
    }
}

/// Picks tokens from logits as [`SamplingParams`] say; deterministic for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: Rng::new(params.seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for one row of logits. Order as in transformers: temperature, then top-k, then top-p.
    pub fn next_token(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let key = |i: u32| {
            let v = logits[i as usize];
            if v.is_nan() {
                f32::NEG_INFINITY
            } else {
                v
            }
        };
        // Candidates, most likely first (ties: lower id first) when top-k or top-p needs an order.
        let by_logit = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
        let mut candidates: Vec<u32> = (0..logits.len() as u32).collect();
        if let Some(k) = p.top_k.filter(|&k| k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
            candidates.sort_unstable_by(by_logit);
        } else if p.top_p.is_some() {
            candidates.sort_unstable_by(by_logit);
        }
        let max = candidates
            .iter()
            .map(|&i| key(i))
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let t = p.temperature as f64;
        let mut weights: Vec<f64> = candidates
            .iter()
            .map(|&i| ((key(i) as f64 - max) / t).exp())
            .collect();
        if let Some(top_p) = p.top_p {
            let total: f64 = weights.iter().sum();
            let mut cumulative = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    cumulative += w / total;
                    cumulative >= top_p as f64
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (w, &id) in weights.iter().zip(&candidates) {
            if u < *w {
                return id;
            }
            u -= w;
        }
        candidates[weights.len() - 1]
    }
}

/// The id of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || (logits[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// A small, fast, seedable generator: xoshiro256** seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// What [`generate`] produced, and how fast.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated ids only (not the prompt), including the stop token if one ended the run.
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Whether a stop token ended the run (rather than the token limit).
    pub stopped: bool,
    /// Seconds of the prompt's forward pass.
    pub prefill_seconds: f64,
    /// Seconds of the one-token forward passes after it.
    pub decode_seconds: f64,
    /// Number of one-token forward passes (the first new token comes from the prefill's logits).
    pub decode_steps: usize,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.decode_steps, self.decode_seconds)
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if n == 0 || seconds <= 0.0 {
        0.0
    } else {
        n as f64 / seconds
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens with the KV cache, stopping after any id in `stop`.
/// `on_token` sees each new id as soon as it is chosen (to stream it).
pub fn generate(
    model: &Gemma2,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<(), ModelError>,
) -> Result<Generation, ModelError> {
    let mut cache = model.new_cache();
    let started = Instant::now();
    // Only the last prompt position's logits are used: project that row alone (not [prompt, vocab]).
    let hidden = model.hidden_states(prompt, &mut cache)?;
    let logits = model.logits(hidden.slice(ndarray::s![hidden.nrows() - 1.., ..]));
    let prefill_seconds = started.elapsed().as_secs_f64();
    let mut last = logits.row(0).to_vec();
    let mut generation = Generation {
        // Grown as tokens come: a large limit reserves nothing up front.
        token_ids: Vec::with_capacity(max_new_tokens.min(1024)),
        prompt_tokens: prompt.len(),
        stopped: false,
        prefill_seconds,
        decode_seconds: 0.0,
        decode_steps: 0,
    };
    while generation.token_ids.len() < max_new_tokens {
        let token = sampler.next_token(&last);
        generation.token_ids.push(token);
        on_token(token)?;
        if stop.contains(&token) {
            generation.stopped = true;
            break;
        }
        if generation.token_ids.len() == max_new_tokens {
            break;
        }
        let started = Instant::now();
        let logits = model.forward_cached(&[token], &mut cache)?;
        generation.decode_seconds += started.elapsed().as_secs_f64();
        generation.decode_steps += 1;
        last = logits.row(0).to_vec();
    }
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.next_token(&[0.5, 0.1, 2.0]), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 17) as f32 / 4.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 7,
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.next_token(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(params), draw(params));
        assert_ne!(draw(params), draw(SamplingParams { seed: 8, ..params }));
        let greedy = argmax(&logits);
        assert!(draw(SamplingParams {
            top_k: Some(1),
            ..params
        })
        .iter()
        .all(|&t| t == greedy));
        // A tiny top-p keeps only the most likely token too.
        assert!(draw(SamplingParams {
            top_p: Some(1e-6),
            ..params
        })
        .iter()
        .all(|&t| t == greedy));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        // Probabilities ∝ e^logit: token 0 has ~0.665, 1 ~0.245, 2 ~0.09, the rest ~0.
        let logits = [3.0f32, 2.0, 1.0, -30.0, -30.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
            seed: 1,
        });
        let picks: Vec<u32> = (0..500).map(|_| s.next_token(&logits)).collect();
        assert!(picks.iter().all(|&t| t < 2));
        assert!(picks.contains(&0) && picks.contains(&1));
        // top-p 0.8: {0, 1} reach 0.91 ≥ 0.8, so token 2 is cut.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.8),
            seed: 1,
        });
        assert!((0..500).all(|_| s.next_token(&logits) < 2));
        // Frequencies follow the distribution at temperature 1.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 3,
        });
        let zeros = (0..4000).filter(|_| s.next_token(&logits) == 0).count() as f64 / 4000.0;
        assert!((zeros - 0.665).abs() < 0.03, "{zeros}");
    }

    #[test]
    fn invalid_parameters_are_reported() {
        let base = SamplingParams::default();
        assert!(SamplingParams {
            temperature: -1.0,
            ..base
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: f32::NAN,
            ..base
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_k: Some(0),
            ..base
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: Some(0.0),
            ..base
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: Some(1.5),
            ..base
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 1
        }
        .validate()
        .is_ok());
    }
}
