//! Parameter values as mergekit defines them: constants, gradients over the layers, and filter lists.

/// A numeric parameter whose value may depend on the tensor (its name and its layer's position `t`).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Const(f64),
    /// Piecewise linear over t ∈ [0, 1]: v_k at t = k / (K − 1).
    Gradient(Vec<f64>),
    /// The first entry whose filter is a substring of the tensor name (or has no filter) gives the value;
    /// if none matches, the parameter is unset for that tensor.
    Filters(Vec<(Option<String>, Param)>),
    /// The first if it is set for the tensor, else the second (a model's own value, then the shared one).
    Or(Box<Param>, Box<Param>),
}

impl Param {
    /// The value for `tensor` at layer position `t`, or `None` if no filter entry matches.
    pub fn at(&self, tensor: &str, t: f64) -> Option<f64> {
        match self {
            Param::Const(v) => Some(*v),
            Param::Gradient(v) => Some(gradient(v, t)),
            Param::Filters(entries) => entries
                .iter()
                .find(|(f, _)| match f {
                    None => true,
                    Some(f) => f == "*" || tensor.contains(f.as_str()),
                })
                .and_then(|(_, p)| p.at(tensor, t)),
            Param::Or(a, b) => a.at(tensor, t).or_else(|| b.at(tensor, t)),
        }
    }

    /// The value, or `default` where unset.
    pub fn or_default(&self, tensor: &str, t: f64, default: f64) -> f64 {
        self.at(tensor, t).unwrap_or(default)
    }

    /// The value when it is the same for every tensor.
    pub fn as_const(&self) -> Option<f64> {
        match self {
            Param::Const(v) => Some(*v),
            _ => None,
        }
    }

    /// Every number written in the parameter (for range checks).
    pub fn constants(&self) -> Vec<f64> {
        match self {
            Param::Const(v) => vec![*v],
            Param::Gradient(v) => v.clone(),
            Param::Filters(e) => e.iter().flat_map(|(_, p)| p.constants()).collect(),
            Param::Or(a, b) => a.constants().into_iter().chain(b.constants()).collect(),
        }
    }
}

/// mergekit's gradient: s = t·(K − 1), linear between v_⌊s⌋ and v_min(⌊s⌋+1, K−1).
fn gradient(v: &[f64], t: f64) -> f64 {
    if v.len() == 1 {
        return v[0];
    }
    let s = t * (v.len() - 1) as f64;
    let i0 = (s.floor().max(0.0) as usize).min(v.len() - 1);
    let i1 = (i0 + 1).min(v.len() - 1);
    let frac = s - i0 as f64;
    (1.0 - frac) * v[i0] + frac * v[i1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_between_anchors() {
        let g = Param::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        assert_eq!(g.at("x", 0.0), Some(0.0));
        assert_eq!(g.at("x", 1.0), Some(1.0));
        assert_eq!(g.at("x", 0.25), Some(0.5));
        // Layer 1 of 4: t = 1/3, s = 4/3: 2/3 of 0.5 and 1/3 of 0.3.
        let v = g.at("x", 1.0 / 3.0).unwrap();
        assert!((v - (0.5 * (1.0 - 1.0 / 3.0) + 0.3 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn the_first_matching_filter_wins_and_unmatched_falls_back() {
        let p = Param::Filters(vec![
            (Some("self_attn".into()), Param::Const(0.1)),
            (Some("mlp".into()), Param::Gradient(vec![0.0, 1.0])),
        ]);
        assert_eq!(
            p.at("model.layers.0.self_attn.q_proj.weight", 0.5),
            Some(0.1)
        );
        assert_eq!(p.at("model.layers.0.mlp.up_proj.weight", 0.5), Some(0.5));
        assert_eq!(p.at("model.norm.weight", 0.0), None);
        let q = Param::Or(Box::new(p), Box::new(Param::Const(0.7)));
        assert_eq!(q.at("model.norm.weight", 0.0), Some(0.7));
        let star = Param::Filters(vec![(Some("*".into()), Param::Const(2.0))]);
        assert_eq!(star.at("anything", 0.0), Some(2.0));
    }
}
