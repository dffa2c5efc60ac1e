//! Which output tensors a plan writes and where each comes from: the base's tensors (every input holds
//! the same names), or layers stacked from mergekit `slices`.

use super::{LayerPositions, MergeError};
use crate::format::{Model, TensorInfo};
use crate::model::family::{lm_head_name, LM_PREFIXES};
use crate::recipe::{LayoutSlice, Plan, RecipeError};

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
    /// The slice of a layer layout it belongs to (the first for embeddings, the last for the final norm).
    pub slice: Option<usize>,
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
            slice: None,
        })
        .collect()
}

/// A tensor of a language-model layer, split into its prefix (one of [`LM_PREFIXES`]), its layer N, and
/// the rest of its name after `layers.N.`.
fn lm_layer(name: &str) -> Option<(&'static str, usize, &str)> {
    LM_PREFIXES.iter().find_map(|&p| {
        let rest = name.strip_prefix(p)?.strip_prefix("layers.")?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n = rest[..digits].parse().ok()?;
        Some((p, n, rest[digits..].strip_prefix('.')?))
    })
}

/// Where a model keeps its language-model layers (`model.`, `language_model.model.` or
/// `model.language_model.`), and how many it has.
fn lm_layers(m: &Model) -> Option<(&'static str, usize)> {
    let mut found: Option<(&'static str, usize)> = None;
    for t in m.tensors() {
        if let Some((p, n, _)) = lm_layer(&t.name) {
            match &mut found {
                None => found = Some((p, n + 1)),
                Some((q, count)) if *q == p => *count = (*count).max(n + 1),
                Some(_) => {}
            }
        }
    }
    found
}

/// The tensors that follow the layers: the language model's final norm and its head. Everything else
/// outside the layers (embeddings, and a multimodal model's vision tower and projector) precedes them.
fn is_post(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with("norm."))
        || name == lm_head_name(prefix)
}

/// Layers stacked from slices: output layer k is the k-th layer of the concatenated slices, merged from
/// each source's matching layer, under the models' own prefix (every source must share it). Tensors
/// outside the language-model layers come from the first slice's sources (embeddings, vision tower,
/// projector), except the final norm and head, from the last slice's. Every `layer_range` is checked
/// against its model's layers first: an error there points at the recipe line.
pub(super) fn from_slices(
    plan: &Plan,
    slices: &[LayoutSlice],
    models: &[Model],
) -> Result<Vec<Wanted>, MergeError> {
    let leaves = models.len();
    let located = |k: usize, j: usize, message: String| {
        let (line, column) = slices[k].ranges_at.get(j).copied().unwrap_or((0, 0));
        MergeError::Recipe(RecipeError::Invalid {
            path: plan.recipe_path.clone(),
            line,
            column,
            message,
        })
    };
    let mut prefix: Option<(&'static str, usize)> = None;
    for (k, slice) in slices.iter().enumerate() {
        for (j, &(leaf, start)) in slice.sources.iter().enumerate() {
            let shown = &plan.leaves[leaf].shown;
            let Some((p, count)) = lm_layers(&models[leaf]) else {
                return Err(located(
                    k,
                    j,
                    format!("`{shown}` has no language-model layers to take (no `model.layers.N.` tensors, nor under a multimodal prefix)"),
                ));
            };
            let end = start + slice.len;
            if end > count {
                return Err(located(
                    k,
                    j,
                    format!("`layer_range` [{start}, {end}] goes past the last layer of `{shown}`, which has {count} (layers 0 to {})", count - 1),
                ));
            }
            match prefix {
                None => prefix = Some((p, leaf)),
                Some((q, first)) if q != p => {
                    return Err(located(
                        k,
                        j,
                        format!(
                            "`{shown}` keeps its layers under `{p}layers.`, `{}` under `{q}layers.`: the slices' models must share one layout",
                            plan.leaves[first].shown
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    let prefix = prefix.expect("slices have sources").0;
    let outside = |k: usize, post: bool| -> Vec<Wanted> {
        let slice = &slices[k];
        let (first, _) = slice.sources[0];
        models[first]
            .tensors()
            .iter()
            .filter(|t| lm_layer(&t.name).is_none() && is_post(&t.name, prefix) == post)
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
                    slice: Some(k),
                }
            })
            .collect()
    };
    let mut out = outside(0, false);
    let mut k = 0usize;
    for (i, slice) in slices.iter().enumerate() {
        let (first, start) = slice.sources[0];
        for o in 0..slice.len {
            let layer: Vec<(&TensorInfo, &str)> = models[first]
                .tensors()
                .iter()
                .filter_map(|t| match lm_layer(&t.name) {
                    Some((p, n, suffix)) if p == prefix && n == start + o => Some((t, suffix)),
                    _ => None,
                })
                .collect();
            if layer.is_empty() {
                return Err(MergeError::MissingTensor {
                    // Filled in by the caller, which knows the recipe.
                    step: String::new(),
                    tensor: format!("{prefix}layers.{}.*", start + o),
                    model: models[first].root().into(),
                });
            }
            let t = match slice.len {
                1 => 1.0,
                n => o as f64 / (n - 1) as f64,
            };
            for (info, suffix) in layer {
                let mut sources = vec![None; leaves];
                for &(l, s) in &slice.sources {
                    sources[l] = Some(format!("{prefix}layers.{}.{suffix}", s + o));
                }
                out.push(Wanted {
                    name: format!("{prefix}layers.{k}.{suffix}"),
                    template: info.clone(),
                    reference: first,
                    sources,
                    t,
                    slice: Some(i),
                });
            }
            k += 1;
        }
    }
    out.extend(outside(slices.len() - 1, true));
    Ok(out)
}

/// The attention kind of layer `i` of a model, from its config.json (a multimodal one's `text_config`): its
/// `layer_types`, else the family's pattern (Gemma 2 alternates sliding and full, starting sliding; Gemma 3
/// has every `sliding_window_pattern`-th layer full). `None` where the family has one kind only.
fn layer_type(config: &serde_json::Value, i: usize) -> Option<String> {
    let text = text_config(config).unwrap_or(config);
    if let Some(types) = text.get("layer_types").and_then(|v| v.as_array()) {
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
        Some("gemma2") => kind(i.is_multiple_of(2)),
        Some("gemma3" | "gemma3_text") => {
            let p = text
                .get("sliding_window_pattern")
                .and_then(|v| v.as_u64())
                .unwrap_or(6)
                .max(1) as usize;
            kind(!(i + 1).is_multiple_of(p))
        }
        _ => None,
    }
}

/// The `text_config` of a multimodal config, where its language model's fields are.
fn text_config(config: &serde_json::Value) -> Option<&serde_json::Value> {
    config.get("text_config").filter(|t| t.is_object())
}

/// What config.json gets for a layer layout, as top-level keys to set: `num_hidden_layers` = the total
/// and, where the sources' layers have kinds, an explicit `layer_types` with each output layer's kind in
/// its source. A multimodal config (`model_type: gemma3`, as `base`'s) gets them in its `text_config`.
pub(super) fn config_patch(
    slices: &[LayoutSlice],
    models: &[Model],
    base: &Model,
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
    let config = base.config()?.unwrap_or_default();
    let multimodal = config.get("model_type").and_then(|v| v.as_str()) == Some("gemma3");
    let mut text = match text_config(&config) {
        Some(serde_json::Value::Object(t)) => t.clone(),
        _ if multimodal => serde_json::Map::new(),
        _ => return Ok(patch),
    };
    text.extend(patch);
    Ok(serde_json::Map::from_iter([(
        "text_config".to_string(),
        serde_json::Value::Object(text),
    )]))
}
