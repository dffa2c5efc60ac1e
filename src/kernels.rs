//! The merge methods as pure math: closed-form weights and SLERP coefficients (f64), and the f32 kernels
//! that apply them to slices. No I/O here.
//!
//! Every method is linear in its inputs once its coefficients are known, so a whole recipe reduces, per
//! tensor, to a weighted sum of input tensors. Only SLERP's coefficients depend on the data (the angle
//! between task vectors over a group of tensors), through the Gram matrix of its task vectors.

/// Below this, sin Ω is treated as zero and SLERP falls back to linear interpolation (recipe.md).
pub const SLERP_PARALLEL_EPS: f64 = 1e-6;

/// Closed-form EMA weights. Returns `(start_weight, checkpoint_weights)`; they sum to 1.
///
/// Without `steps`, each checkpoint is one update with rate `mu`; with `steps`, the rate applies per
/// training step and checkpoint k stands for the Δ_k = s_k − s_{k−1} steps since the previous one
/// (s₀ = 0 when there is a start). Without a start, e₁ = θ₁.
pub fn ema_weights(mu: f64, n: usize, steps: Option<&[u64]>, has_start: bool) -> (f64, Vec<f64>) {
    assert!(n >= 1, "EMA of no checkpoints");
    // keep[k] = fraction of e_{k-1} kept at update k (k = 0-based checkpoint index).
    let keep: Vec<f64> = (0..n)
        .map(|k| match steps {
            Some(s) => {
                let prev = if k == 0 { 0 } else { s[k - 1] };
                (1.0 - mu).powf((s[k] - prev) as f64)
            }
            None => 1.0 - mu,
        })
        .collect();
    let mut w = vec![0.0; n];
    let mut start_w = 0.0;
    // Walk backwards: the weight of what existed before update k is the product of later keeps.
    let mut tail = 1.0; // Π_{j>k} keep[j]
    for k in (0..n).rev() {
        if k == 0 && !has_start {
            w[0] = tail; // e₁ = θ₁
        } else {
            w[k] = (1.0 - keep[k]) * tail;
            tail *= keep[k];
        }
    }
    if has_start {
        start_w = tail;
    }
    (start_w, w)
}

/// The two coefficients of one SLERP pair: result = ca·a + cb·b, given ⟨a,b⟩, ‖a‖², ‖b‖² (f64) and λ.
pub fn slerp_pair(dot: f64, norm2_a: f64, norm2_b: f64, lambda: f64) -> (f64, f64) {
    if norm2_a <= 0.0 || norm2_b <= 0.0 {
        return (1.0 - lambda, lambda);
    }
    let cos = (dot / (norm2_a.sqrt() * norm2_b.sqrt())).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let sin = omega.sin();
    if sin < SLERP_PARALLEL_EPS {
        return (1.0 - lambda, lambda);
    }
    (
        ((1.0 - lambda) * omega).sin() / sin,
        (lambda * omega).sin() / sin,
    )
}

/// mergekit's `nuslerp` pair, edge cases included: each vector is normalised by its norm clamped to at
/// least 1e-7, so a zero vector has cosine 0 with anything (Ω = π/2, not the linear fallback of
/// [`slerp_pair`]); linear only where 1 − cos² ≤ 1e-16.
pub fn nuslerp_pair(dot: f64, norm2_a: f64, norm2_b: f64, lambda: f64) -> (f64, f64) {
    let na = norm2_a.sqrt().max(1e-7);
    let nb = norm2_b.sqrt().max(1e-7);
    let cos = (dot / (na * nb)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return (1.0 - lambda, lambda);
    }
    let omega = cos.acos();
    let sin = omega.sin();
    (
        ((1.0 - lambda) * omega).sin() / sin,
        (lambda * omega).sin() / sin,
    )
}

/// SLERP of M task vectors given their Gram matrix `gram[m][n] = ⟨δ_m, δ_n⟩` (over one group), as WARP's
/// chain: r₁ = δ₁, r_m = pair(r_{m−1}, δ_m, λ_m). Returns r_M's coefficients over δ₁..δ_M.
///
/// A chain vector whose squared norm cancels to below 1e-20 of its terms' magnitude is exactly zero in
/// exact arithmetic (e.g. antiparallel halves), and is treated as zero, as an explicit evaluation would.
pub fn slerp_chain(gram: &[Vec<f64>], lambdas: &[f64]) -> Vec<f64> {
    let m = gram.len();
    assert_eq!(lambdas.len() + 1, m);
    let mut r = vec![0.0; m];
    r[0] = 1.0;
    for (k, &lambda) in lambdas.iter().enumerate() {
        let b = k + 1;
        let (mut norm2_a, mut scale) = (0.0, 0.0);
        let mut dot = 0.0;
        for i in 0..m {
            dot += r[i] * gram[i][b];
            for j in 0..m {
                norm2_a += r[i] * r[j] * gram[i][j];
                scale += (r[i] * r[j] * gram[i][j]).abs();
            }
        }
        if norm2_a <= 1e-20 * scale {
            norm2_a = 0.0;
        }
        let (ca, cb) = slerp_pair(dot, norm2_a, gram[b][b], lambda);
        for x in r.iter_mut() {
            *x *= ca;
        }
        r[b] += cb;
    }
    r
}

/// λ_m = w_m / (w₁ + … + w_m) for m = 2..M (WARP appendix B.3): equal weights give 1/2, 1/3, ...
/// The weights are scaled by their largest first, so sums of huge weights (1e308) cannot overflow.
pub fn chain_lambdas(weights: &[f64]) -> Vec<f64> {
    let scale = weights.iter().fold(0f64, |m, w| m.max(w.abs()));
    let scale = if scale > 0.0 && scale.is_finite() {
        scale
    } else {
        1.0
    };
    let mut acc = weights[0] / scale;
    weights[1..]
        .iter()
        .map(|&w| {
            let w = w / scale;
            acc += w;
            w / acc
        })
        .collect()
}

/// `weights` divided by their sum, computed without overflow or underflow (scaled by the largest
/// magnitude before summing). `None` when the sum is zero or the quotients are not finite (a sum that
/// cancels to almost nothing): there is no representable normalisation.
pub fn normalize_weights(weights: &[f64]) -> Option<Vec<f64>> {
    let scale = weights.iter().fold(0f64, |m, w| m.max(w.abs()));
    if !(scale > 0.0 && scale.is_finite()) {
        return None;
    }
    let scaled: Vec<f64> = weights.iter().map(|w| w / scale).collect();
    let total: f64 = scaled.iter().sum();
    if total == 0.0 {
        return None;
    }
    let out: Vec<f64> = scaled.iter().map(|w| w / total).collect();
    out.iter().all(|w| w.is_finite()).then_some(out)
}

/// out = Σ_i c_i·x_i, evaluated as s·x_ref + Σ_{i≠ref} c_i·(x_i − x_ref) with s = Σ c_i.
///
/// Inputs are exact f32 (upcast from bf16/f16/f32); the sum is formed in f64 so that the single rounding
/// to the output dtype is the only one that matters. Differences to the reference (the base) are exact in
/// f64, so a task vector (s = 0) carries no cancellation error and a merge (s = 1) is the base plus a
/// small correction.
pub fn combine(coefs: &[f64], sum: f64, inputs: &[&[f32]], reference: usize, out: &mut [f64]) {
    // Vectorised at the process's SIMD level, with the same operations per element in the same order
    // (the order of additions per element is the input order) at every level.
    crate::sum::combine_at(coefs, sum, inputs, reference, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nuslerp_pair_normalises_as_mergekit() {
        // A zero vector: cosine 0, Ω = π/2, so sin(λπ/2) of the other (not λ, the linear fallback).
        let (a, b) = nuslerp_pair(0.0, 0.0, 4.0, 0.25);
        assert!((a - (0.75 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-15);
        assert!((b - (0.25 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-15);
        // Parallel: linear.
        assert_eq!(nuslerp_pair(2.0, 1.0, 4.0, 0.25), (0.75, 0.25));
        // Otherwise the same pair as recipe `slerp`.
        let (x, y) = nuslerp_pair(0.3, 1.0, 2.0, 0.4);
        let (u, v) = slerp_pair(0.3, 1.0, 2.0, 0.4);
        assert!((x - u).abs() < 1e-15 && (y - v).abs() < 1e-15);
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn gram_accumulates_exact_dot_products_over_any_length() {
        // Small integers: every partial sum is exact, so the result is the exact dot product whatever the
        // order; lengths around the 8-lane blocks, added onto an existing Gram.
        for n in [0, 1, 7, 8, 9, 19, 64] {
            let v: Vec<Vec<f64>> = (0..3)
                .map(|k| (0..n).map(|i| ((i * (k + 2)) % 7) as f64 - 3.0).collect())
                .collect();
            let refs: Vec<&[f64]> = v.iter().map(|x| x.as_slice()).collect();
            let mut g = vec![vec![1.0; 3]; 3];
            let mut lanes = vec![[0.0; crate::sum::LANES]; 9];
            crate::sum::gram_lanes(&refs, &mut lanes);
            crate::sum::gram_fold(&lanes, &mut g);
            let want = gram_of(&v);
            for a in 0..3 {
                for b in 0..3 {
                    assert_eq!(g[a][b], want[a][b] + 1.0, "n={n} ({a},{b})");
                }
            }
        }
    }

    fn gram_of(v: &[Vec<f64>]) -> Vec<Vec<f64>> {
        v.iter()
            .map(|a| v.iter().map(|b| dot(a, b)).collect())
            .collect()
    }

    #[test]
    fn ema_without_steps_matches_the_recursion() {
        let mu = 0.3;
        let (s, w) = ema_weights(mu, 3, None, false);
        // e1 = θ1; e2 = .7θ1 + .3θ2; e3 = .7e2 + .3θ3 = .49θ1 + .21θ2 + .3θ3
        assert_eq!(s, 0.0);
        assert!(
            (w[0] - 0.49).abs() < 1e-15
                && (w[1] - 0.21).abs() < 1e-15
                && (w[2] - 0.3).abs() < 1e-15
        );
        let (s, w) = ema_weights(mu, 2, None, true);
        // e0 = start; e1 = .7s + .3θ1; e2 = .49s + .21θ1 + .3θ2
        assert!(
            (s - 0.49).abs() < 1e-15 && (w[0] - 0.21).abs() < 1e-15 && (w[1] - 0.3).abs() < 1e-15
        );
    }

    #[test]
    fn ema_with_steps_applies_the_rate_per_step() {
        let mu = 0.01;
        let (s, w) = ema_weights(mu, 3, Some(&[100, 200, 300]), true);
        let k = 0.99f64.powi(100);
        assert!((w[2] - (1.0 - k)).abs() < 1e-15);
        assert!((w[1] - (1.0 - k) * k).abs() < 1e-15);
        assert!((w[0] - (1.0 - k) * k * k).abs() < 1e-15);
        assert!((s - k * k * k).abs() < 1e-15);
        // Without a start, the first checkpoint seeds the average.
        let (s, w) = ema_weights(mu, 2, Some(&[10, 30]), false);
        assert_eq!(s, 0.0);
        assert!((w[0] - 0.99f64.powi(20)).abs() < 1e-15);
    }

    #[test]
    fn ema_weights_sum_to_one() {
        for &(mu, n, start) in &[
            (0.5, 1, false),
            (0.5, 1, true),
            (0.01, 7, true),
            (1.0, 4, false),
            (0.2, 5, false),
        ] {
            let steps: Vec<u64> = (1..=n as u64).map(|k| k * 17 + k * k).collect();
            for st in [None, Some(steps.as_slice())] {
                let (s, w) = ema_weights(mu, n, st, start);
                let total: f64 = s + w.iter().sum::<f64>();
                assert!(
                    (total - 1.0).abs() < 1e-12,
                    "mu={mu} n={n} start={start} steps={st:?}: {total}"
                );
            }
        }
        // μ = 1 keeps only the last checkpoint.
        let (s, w) = ema_weights(1.0, 3, None, true);
        assert_eq!((s, w), (0.0, vec![0.0, 0.0, 1.0]));
    }

    #[test]
    fn slerp_endpoints() {
        for &(d, na, nb) in &[(0.3, 1.0, 2.0), (-0.5, 1.0, 1.0), (0.0, 3.0, 0.5)] {
            let (ca, cb) = slerp_pair(d, na, nb, 0.0);
            assert!((ca - 1.0).abs() < 1e-12 && cb.abs() < 1e-12);
            let (ca, cb) = slerp_pair(d, na, nb, 1.0);
            assert!(ca.abs() < 1e-12 && (cb - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn slerp_zero_parallel_antiparallel_fall_back_to_linear() {
        assert_eq!(slerp_pair(0.0, 0.0, 1.0, 0.3), (0.7, 0.3)); // ‖a‖ = 0
        assert_eq!(slerp_pair(0.0, 1.0, 0.0, 0.3), (0.7, 0.3)); // ‖b‖ = 0
        assert_eq!(slerp_pair(2.0, 1.0, 4.0, 0.3), (0.7, 0.3)); // b = 2a
        assert_eq!(slerp_pair(-2.0, 1.0, 4.0, 0.3), (0.7, 0.3)); // b = −2a
    }

    #[test]
    fn slerp_preserves_norm_of_equal_norm_vectors() {
        let a = vec![1.0, 0.0, 0.0];
        let b = vec![0.0, 0.6, 0.8];
        for &lambda in &[0.1, 0.25, 0.5, 0.9] {
            let (ca, cb) = slerp_pair(dot(&a, &b), dot(&a, &a), dot(&b, &b), lambda);
            let r: Vec<f64> = a.iter().zip(&b).map(|(x, y)| ca * x + cb * y).collect();
            assert!((dot(&r, &r).sqrt() - 1.0).abs() < 1e-12, "λ={lambda}");
            // The angle to a is λ·Ω.
            let angle = (dot(&r, &a) / dot(&r, &r).sqrt()).acos();
            assert!((angle - lambda * std::f64::consts::FRAC_PI_2).abs() < 1e-12);
        }
    }

    #[test]
    fn slerp_chain_of_two_equals_the_pair_and_three_uses_running_lambdas() {
        let v = vec![
            vec![1.0, 0.2, 0.0],
            vec![0.1, 1.0, 0.3],
            vec![0.0, -0.4, 1.0],
        ];
        let g = gram_of(&v);
        let r = slerp_chain(
            &g[..2]
                .iter()
                .map(|row| row[..2].to_vec())
                .collect::<Vec<_>>(),
            &[0.3],
        );
        let (ca, cb) = slerp_pair(g[0][1], g[0][0], g[1][1], 0.3);
        assert!((r[0] - ca).abs() < 1e-15 && (r[1] - cb).abs() < 1e-15);
        // Three models, equal weights: λ = 1/2 then 1/3; compare with explicit vectors.
        let lambdas = chain_lambdas(&[1.0, 1.0, 1.0]);
        assert_eq!(lambdas, vec![0.5, 1.0 / 3.0]);
        let r = slerp_chain(&g, &lambdas);
        let (c1, c2) = slerp_pair(g[0][1], g[0][0], g[1][1], 0.5);
        let r2: Vec<f64> = (0..3).map(|j| c1 * v[0][j] + c2 * v[1][j]).collect();
        let (c3, c4) = slerp_pair(dot(&r2, &v[2]), dot(&r2, &r2), g[2][2], 1.0 / 3.0);
        for j in 0..3 {
            let explicit = c3 * r2[j] + c4 * v[2][j];
            let via_gram: f64 = (0..3).map(|m| r[m] * v[m][j]).sum();
            assert!((explicit - via_gram).abs() < 1e-14);
        }
    }

    #[test]
    fn slerp_chain_treats_a_cancelled_vector_as_zero() {
        // δ₂ = −δ₁ with λ = 1/2 gives r₂ = 0; the next pair must then be linear: r₃ = (2/3)·0 + (1/3)·δ₃.
        let v = vec![vec![1.0, 2.0], vec![-1.0, -2.0], vec![0.5, -3.0]];
        let r = slerp_chain(&gram_of(&v), &[0.5, 1.0 / 3.0]);
        let out: Vec<f64> = (0..2)
            .map(|j| (0..3).map(|m| r[m] * v[m][j]).sum())
            .collect();
        assert!((out[0] - 0.5 / 3.0).abs() < 1e-15 && (out[1] + 1.0).abs() < 1e-15);
    }

    #[test]
    fn huge_and_tiny_weights_normalise_without_overflow() {
        assert_eq!(normalize_weights(&[1e308, 1e308]), Some(vec![0.5, 0.5]));
        assert_eq!(
            normalize_weights(&[3e307, 1e308]).unwrap()[1],
            1e308 / 1.3e308
        );
        assert_eq!(normalize_weights(&[5e-324, 5e-324]), Some(vec![0.5, 0.5]));
        assert_eq!(normalize_weights(&[2.0, 6.0]), Some(vec![0.25, 0.75]));
        assert_eq!(normalize_weights(&[1.0, -1.0]), None);
        assert_eq!(normalize_weights(&[0.0, 0.0]), None);
        // 1e308 − 1e308 + 1 is 1: exact, and representable.
        assert_eq!(
            normalize_weights(&[1e308, -1e308, 1.0]),
            Some(vec![1e308, -1e308, 1.0])
        );
        // 1e308 − 1e308 + 1e-10 cancels to 1e-318 of the largest: the quotients overflow.
        assert_eq!(normalize_weights(&[1e308, -1e308, 1e-10]), None);
        assert_eq!(chain_lambdas(&[1e308, 1e308, 1e308]), vec![0.5, 1.0 / 3.0]);
        assert!((chain_lambdas(&[1.6e308, 1.2e308])[0] - 3.0 / 7.0).abs() < 1e-15);
        assert_eq!(chain_lambdas(&[5e-324, 5e-324]), vec![0.5]);
    }

    #[test]
    fn combine_is_the_weighted_sum() {
        let x0 = [1.0f32, 2.0, -3.0];
        let x1 = [1.5f32, 2.5, -2.0];
        let x2 = [0.0f32, 1.0, 4.0];
        let mut out = [0f64; 3];
        combine(&[0.2, 0.5, 0.3], 1.0, &[&x0, &x1, &x2], 0, &mut out);
        for j in 0..3 {
            let want = 0.2 * x0[j] as f64 + 0.5 * x1[j] as f64 + 0.3 * x2[j] as f64;
            assert!((out[j] - want).abs() < 1e-15);
        }
        // λ = 0 and 1 of a LITI give the endpoints exactly.
        combine(&[1.0, 0.0], 1.0, &[&x0, &x1], 0, &mut out);
        assert_eq!(out, x0.map(f64::from));
        combine(&[0.0, 1.0], 1.0, &[&x0, &x1], 0, &mut out);
        assert_eq!(out, x1.map(f64::from));
        // A task vector (coefficients summing to 0) is the exact difference.
        combine(&[-1.0, 1.0], 0.0, &[&x0, &x1], 0, &mut out);
        assert_eq!(out, [0.5, 0.5, 1.0]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    proptest! {
        #[test]
        fn ema_weights_always_sum_to_one(mu in 1e-4f64..=1.0, n in 1usize..12, start: bool, gaps in proptest::collection::vec(1u64..500, 12)) {
            let steps: Vec<u64> = gaps[..n].iter().scan(0u64, |acc, g| { *acc += g; Some(*acc) }).collect();
            for st in [None, Some(steps.as_slice())] {
                let (s, w) = ema_weights(mu, n, st, start);
                prop_assert!(w.iter().all(|&x| x >= 0.0) && s >= 0.0);
                prop_assert!((s + w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }

        #[test]
        fn slerp_of_equal_norm_vectors_keeps_the_norm(
            a in proptest::collection::vec(-1.0f64..1.0, 8),
            b in proptest::collection::vec(-1.0f64..1.0, 8),
            lambda in 0.0f64..=1.0,
        ) {
            let (na, nb) = (dot(&a, &a).sqrt(), dot(&b, &b).sqrt());
            prop_assume!(na > 1e-3 && nb > 1e-3);
            let b: Vec<f64> = b.iter().map(|x| x * na / nb).collect();
            let cos = dot(&a, &b) / (na * na);
            prop_assume!((1.0 - cos * cos).sqrt() > 1e-3); // not (anti)parallel
            let (ca, cb) = slerp_pair(dot(&a, &b), na * na, na * na, lambda);
            let r: Vec<f64> = a.iter().zip(&b).map(|(x, y)| ca * x + cb * y).collect();
            prop_assert!((dot(&r, &r).sqrt() - na).abs() < 1e-9 * na);
        }

        #[test]
        fn slerp_endpoints_are_the_inputs(d in -1.0f64..1.0, na in 0.1f64..4.0, nb in 0.1f64..4.0) {
            let dotv = d * na.sqrt() * nb.sqrt();
            let (ca, cb) = slerp_pair(dotv, na, nb, 0.0);
            prop_assert!((ca - 1.0).abs() < 1e-9 && cb.abs() < 1e-9);
            let (ca, cb) = slerp_pair(dotv, na, nb, 1.0);
            prop_assert!(ca.abs() < 1e-9 && (cb - 1.0).abs() < 1e-9);
        }

        #[test]
        fn parallel_and_antiparallel_task_vectors_interpolate_linearly(k in -5.0f64..5.0, lambda in 0.0f64..=1.0) {
            prop_assume!(k.abs() > 1e-3);
            // b = k·a: sin Ω = 0.
            let (ca, cb) = slerp_pair(k * 2.0, 2.0, k * k * 2.0, lambda);
            prop_assert_eq!((ca, cb), (1.0 - lambda, lambda));
        }
    }
}

/// Model Stock's interpolation factor from the Gram matrix of N task vectors: c = mean pairwise cosine
/// (each norm product clamped below at 1e-6, the cosine to [−1, 1], as mergekit), t = N·c / (1 + (N − 1)·c);
/// 0 (the base) when the denominator is below 1e-6 in magnitude.
pub fn model_stock_t(gram: &[Vec<f64>]) -> f64 {
    let n = gram.len();
    let mut sum = 0.0;
    let mut pairs = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            let norm = (gram[i][i].sqrt() * gram[j][j].sqrt()).max(1e-6);
            sum += (gram[i][j] / norm).clamp(-1.0, 1.0);
            pairs += 1.0;
        }
    }
    let c = sum / pairs;
    let nf = n as f64;
    let denom = 1.0 + (nf - 1.0) * c;
    if denom.abs() < 1e-6 {
        return 0.0;
    }
    nf * c / denom
}

/// mergekit's two-model SLERP of weights a (t = 0) and b (t = 1), from ⟨a,b⟩, ‖a‖², ‖b‖²: the cosine of
/// the normalised copies (a norm ≤ 1e-8 is not normalised); linear when |cos| > 0.9995.
pub fn weight_slerp(dot: f64, norm2_a: f64, norm2_b: f64, t: f64) -> (f64, f64) {
    let na = norm2_a.sqrt();
    let nb = norm2_b.sqrt();
    let sa = if na > 1e-8 { na } else { 1.0 };
    let sb = if nb > 1e-8 { nb } else { 1.0 };
    let cos = dot / (sa * sb);
    if cos.abs() > 0.9995 {
        return (1.0 - t, t);
    }
    let theta = cos.acos();
    let sin = theta.sin();
    (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
}
