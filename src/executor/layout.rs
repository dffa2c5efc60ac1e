//! Which output tensors a plan writes and where each comes from: the base's tensors (every input holds
//! the same names), or layers stacked from mergekit `slices`.

use super::{layer_index, LayerPositions, MergeError};
use crate::format::{Model, TensorInfo};
use crate::recipe::LayoutSlice;

/// One output tensor: its name, the tensor it is shaped after, and each leaf's source tensor.
pub(super) struct Wanted {
    pub name: String,
    /// The reference leaf's tensor (shape, dtype; its data for copies).
    pub template: TensorInfo,
    pub reference: usize,
    /// Per leaf: the tensor read from it, or `None` if it takes no part.
    pub sources: Vec<Option<String>>,
    /// Layer position in [0, 1] for gradients.
    pub t: f64,
}

/// Every tensor of the base, from every leaf under the same name.
pub(super) fn from_base(base: &Model, base_leaf: usize, leaves: usize) -> Vec<Wanted> {
    let positions = LayerPositions::of(base.tensors().iter().map(|t| t.name.as_str()));
    base.tensors()
        .iter()
        .map(|t| Wanted {
            name: t.name.clone(),
            template: t.clone(),
            reference: base_leaf,
            sources: vec![Some(t.name.clone()); leaves],
            t: positions.at(&t.name),
        })
        .collect()
}

/// Tensors outside the layers that belong before them (embeddings); the others (final norm, head) go after.
fn is_pre(name: &str) -> bool {
    name.contains("embed")
}

/// Layers stacked from slices: output layer k is the k-th layer of the concatenated slices, merged from
/// each source's matching layer; embeddings from the first slice's sources, the rest from the last's.
pub(super) fn from_slices(
    slices: &[LayoutSlice],
    models: &[Model],
) -> Result<Vec<Wanted>, MergeError> {
    let leaves = models.len();
    let outside = |slice: &LayoutSlice, pre: bool| -> Vec<Wanted> {
        let (first, _) = slice.sources[0];
        models[first]
            .tensors()
            .iter()
            .filter(|t| layer_index(&t.name).is_none() && is_pre(&t.name) == pre)
            .map(|t| {
                let mut sources = vec![None; leaves];
                for &(l, _) in &slice.sources {
                    sources[l] = Some(t.name.clone());
                }
                Wanted {
                    name: t.name.clone(),
                    template: t.clone(),
                    reference: first,
                    sources,
                    t: 0.0,
                }
            })
            .collect()
    };
    let mut out = outside(&slices[0], true);
    let mut k = 0usize;
    for slice in slices {
        let (first, start) = slice.sources[0];
        for o in 0..slice.len {
            let prefix = format!("model.layers.{}.", start + o);
            let layer: Vec<&TensorInfo> = models[first]
                .tensors()
                .iter()
                .filter(|t| t.name.starts_with(&prefix))
                .collect();
            if layer.is_empty() {
                return Err(MergeError::MissingTensor {
                    // Filled in by the caller, which knows the recipe.
                    step: String::new(),
                    tensor: format!("{prefix}*"),
                    model: models[first].root().into(),
                });
            }
            let t = match slice.len {
                1 => 1.0,
                n => o as f64 / (n - 1) as f64,
            };
            for info in layer {
                let suffix = &info.name[prefix.len()..];
                let mut sources = vec![None; leaves];
                for &(l, s) in &slice.sources {
                    sources[l] = Some(format!("model.layers.{}.{suffix}", s + o));
                }
                out.push(Wanted {
                    name: format!("model.layers.{k}.{suffix}"),
                    template: info.clone(),
                    reference: first,
                    sources,
                    t,
                });
            }
            k += 1;
        }
    }
    out.extend(outside(slices.last().expect("slices are not empty"), false));
    Ok(out)
}

/// The attention kind of layer `i` of a model, from its config.json: its `layer_types`, else the family's
/// pattern (Gemma 2 alternates sliding and full, starting sliding; Gemma 3 has every `sliding_window_pattern`-th
/// layer full). `None` where the family has one kind only.
fn layer_type(config: &serde_json::Value, i: usize) -> Option<String> {
    if let Some(types) = config.get("layer_types").and_then(|v| v.as_array()) {
        return types.get(i).and_then(|v| v.as_str()).map(String::from);
    }
    let kind = |sliding: bool| {
        Some(
            if sliding {
                "sliding_attention"
            } else {
                "full_attention"
            }
            .to_string(),
        )
    };
    match config.get("model_type").and_then(|v| v.as_str()) {
        Some("gemma2") => kind(i % 2 == 0),
        Some("gemma3" | "gemma3_text") => {
            let cfg = config.get("text_config").unwrap_or(config);
            let p = cfg
                .get("sliding_window_pattern")
                .and_then(|v| v.as_u64())
                .unwrap_or(6)
                .max(1) as usize;
            kind((i + 1) % p != 0)
        }
        _ => None,
    }
}

/// What config.json gets for a layer layout: `num_hidden_layers` = the total and, where the sources'
/// layers have kinds, an explicit `layer_types` with each output layer's kind in its source.
pub(super) fn config_patch(
    slices: &[LayoutSlice],
    models: &[Model],
) -> Result<serde_json::Map<String, serde_json::Value>, MergeError> {
    let mut patch = serde_json::Map::new();
    let total: usize = slices.iter().map(|s| s.len).sum();
    patch.insert("num_hidden_layers".into(), total.into());
    let mut types = Vec::with_capacity(total);
    for slice in slices {
        let (first, start) = slice.sources[0];
        let config = models[first].config()?.unwrap_or_default();
        for o in 0..slice.len {
            types.push(layer_type(&config, start + o));
        }
    }
    if types.iter().all(Option::is_some) && !types.is_empty() {
        patch.insert(
            "layer_types".into(),
            types
                .into_iter()
                .map(|t| serde_json::Value::from(t.expect("checked")))
                .collect(),
        );
    }
    Ok(patch)
}
