//! mergekit configs (recognised by their top-level `merge_method`) read into the same [`Plan`] as a
//! gemma-merge recipe: one step, resolved through the method registry. Every key is checked before any
//! tensor is read; anything gemma-merge does not implement is an error naming the key and its line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Location;

use super::plan::{param, parse_yaml, LayoutSlice, Leaf, OutputModel, OutputTarget, Plan, Step};
use super::raw::{RawParam, S};
use super::{hub, Operand, RecipeError, StepKind, DEFAULT_SHARD_SIZE};
use crate::format::FloatType;
use crate::methods::{self, Param, StepArgs};

type Params = BTreeMap<String, S<RawParam>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: S<String>,
    base_model: Option<S<String>>,
    models: Option<S<Vec<S<RawModel>>>>,
    slices: Option<S<Vec<S<RawSlice>>>>,
    parameters: Option<S<Params>>,
    dtype: Option<S<String>>,
    out_dtype: Option<S<String>>,
    tokenizer_source: Option<S<String>>,
    chat_template: Option<S<String>>,
    name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: S<String>,
    parameters: Option<S<Params>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: S<Vec<S<RawSource>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: S<String>,
    layer_range: S<Vec<S<usize>>>,
    parameters: Option<S<Params>>,
}

/// Whether `text` is a mergekit config: a mapping with a top-level `merge_method` key.
pub fn is_mergekit(text: &str) -> bool {
    serde_saphyr::from_str::<BTreeMap<String, serde::de::IgnoredAny>>(text)
        .map(|m| m.contains_key("merge_method"))
        .unwrap_or(false)
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, loc: &Location, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid {
            path: self.path.into(),
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        }
    }
}

/// A model of the config with its parameters (from `models` or from the first slice's sources).
struct Model {
    leaf: usize,
    params: Option<S<Params>>,
}

pub fn plan(text: &str, path: &Path, out: Option<&Path>, seed: u64) -> Result<Plan, RecipeError> {
    let raw: RawConfig = parse_yaml(text, path)?;
    let cx = Ctx { path };
    let method = &raw.merge_method;
    let Some(def) = methods::mergekit(&method.value) else {
        return Err(cx.err(
            &method.referenced,
            format!(
                "unknown or unsupported merge_method `{}` (gemma-merge reads {})",
                method.value,
                methods::names(true)
            ),
        ));
    };
    let Some(out) = out else {
        return Err(cx.err(
            &method.referenced,
            "a mergekit config needs the output folder: pass --out DIR",
        ));
    };

    let mut leaves: Vec<Leaf> = Vec::new();
    let mut leaf_of = |r: &S<String>| -> Result<usize, RecipeError> {
        let (path, hub_id) = model_path(&cx, r)?;
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(i) = leaves
            .iter()
            .position(|l| std::fs::canonicalize(&l.path).unwrap_or_else(|_| l.path.clone()) == key)
        {
            return Ok(i);
        }
        leaves.push(Leaf {
            path,
            shown: r.value.clone(),
            hub_id,
        });
        Ok(leaves.len() - 1)
    };

    let base = match &raw.base_model {
        Some(b) => Some(leaf_of(b)?),
        None => None,
    };
    let mut models: Vec<Model> = Vec::new();
    let mut layout = None;
    // With `slices`: each slice's sources with that slice's own `parameters` (mergekit reads them per slice).
    let mut per_slice: Vec<Vec<Model>> = Vec::new();
    match (&raw.models, &raw.slices) {
        (Some(_), Some(s)) => {
            return Err(cx.err(&s.referenced, "give either `models` or `slices`, not both"))
        }
        (None, None) => {
            return Err(cx.err(&method.referenced, "the config needs `models` or `slices`"))
        }
        (Some(list), None) => {
            for m in &list.value {
                let leaf = leaf_of(&m.value.model)?;
                if models.iter().any(|x| x.leaf == leaf) {
                    return Err(cx.err(&m.value.model.referenced, "this model is listed twice"));
                }
                models.push(Model {
                    leaf,
                    params: m.value.parameters.clone(),
                });
            }
        }
        (None, Some(slices)) => {
            if slices.value.is_empty() {
                return Err(cx.err(&slices.referenced, "`slices` is empty"));
            }
            let mut out_slices = Vec::new();
            for sl in &slices.value {
                let mut own = Vec::new();
                let mut sources = Vec::new();
                let mut ranges_at = Vec::new();
                let mut len = None;
                for src in &sl.value.sources.value {
                    let src = &src.value;
                    let r = &src.layer_range;
                    let [a, b] = r.value.as_slice() else {
                        return Err(cx.err(&r.referenced, "`layer_range` is [first, end)"));
                    };
                    if b.value <= a.value {
                        return Err(
                            cx.err(&r.referenced, "`layer_range` must hold at least one layer")
                        );
                    }
                    let n = b.value - a.value;
                    if *len.get_or_insert(n) != n {
                        return Err(cx.err(
                            &r.referenced,
                            "every source of a slice must give the same number of layers",
                        ));
                    }
                    let leaf = leaf_of(&src.model)?;
                    if sources.iter().any(|&(l, _)| l == leaf) {
                        return Err(cx.err(
                            &src.model.referenced,
                            "a model can be a source only once per slice",
                        ));
                    }
                    sources.push((leaf, a.value));
                    own.push(Model {
                        leaf,
                        params: src.parameters.clone(),
                    });
                    ranges_at.push((r.referenced.line(), r.referenced.column()));
                    if !models.iter().any(|m| m.leaf == leaf) {
                        models.push(Model {
                            leaf,
                            params: src.parameters.clone(),
                        });
                    }
                }
                if sources.is_empty() {
                    return Err(cx.err(&sl.value.sources.referenced, "a slice needs sources"));
                }
                if let Some(b) = base {
                    if def.fields.contains(&"base") && !sources.iter().any(|&(l, _)| l == b) {
                        return Err(cx.err(
                            &sl.value.sources.referenced,
                            "the base_model must be a source of every slice",
                        ));
                    }
                }
                per_slice.push(own);
                out_slices.push(LayoutSlice {
                    sources,
                    len: len.unwrap_or(0),
                    ranges_at,
                    kind: None,
                });
            }
            layout = Some(out_slices);
        }
    }

    // Unknown parameters, before anything else is decided.
    for m in models.iter().chain(per_slice.iter().flatten()) {
        if let Some(p) = &m.params {
            for (k, v) in &p.value {
                if !def.model_params.contains(&k.as_str()) {
                    return Err(cx.err(
                        &v.referenced,
                        format!(
                            "unknown parameter `{k}` of a model for merge_method `{}` (it takes: {})",
                            method.value,
                            def.model_params.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    if let Some(p) = &raw.parameters {
        for (k, v) in &p.value {
            if !def.shared_params.contains(&k.as_str()) {
                return Err(cx.err(
                    &v.referenced,
                    format!(
                        "unknown parameter `{k}` for merge_method `{}` (it takes: {})",
                        method.value,
                        def.shared_params.join(", ")
                    ),
                ));
            }
        }
    }

    let uses_base = def.fields.contains(&"base");
    let resolve = |of: &[Model]| -> Result<StepKind, RecipeError> {
        let mut args = ConfigStep {
            cx: &cx,
            method: &method.value,
            at: method.referenced,
            models: of
                .iter()
                .filter(|m| !(uses_base && Some(m.leaf) == base))
                .collect(),
            base,
            shared: raw.parameters.as_ref(),
            seed,
        };
        (def.resolve)(&mut args)
    };
    // A sliced config resolves the method once per slice, over that slice's sources and their
    // parameters in it, as mergekit does; the step's own kind is the first slice's.
    let kind = match layout.as_mut() {
        Some(slices) => {
            let mut first = None;
            for (sl, own) in slices.iter_mut().zip(&per_slice) {
                let k = resolve(own)?;
                first.get_or_insert_with(|| k.clone());
                sl.kind = Some(k);
            }
            first.expect("slices are not empty")
        }
        None => resolve(&models)?,
    };

    let dtype_of = |d: &S<String>| {
        FloatType::from_torch_name(&d.value).ok_or_else(|| {
            cx.err(
                &d.referenced,
                format!(
                    "unknown dtype `{}` (use bfloat16, float16 or float32)",
                    d.value
                ),
            )
        })
    };
    // `dtype` is mergekit's compute dtype: the inputs are loaded in it (rounded, where they differ), as
    // mergekit loads them; the computation itself stays exact (f64), rounded once to the output dtype.
    let compute = raw.dtype.as_ref().map(dtype_of).transpose()?;
    let dtype = match &raw.out_dtype {
        Some(d) => Some(dtype_of(d)?),
        None => compute,
    };
    let tokenizer_source = match &raw.tokenizer_source {
        None => None,
        Some(t) if t.value == "base" => None,
        Some(t) if t.value == "union" => {
            return Err(cx.err(
                &t.referenced,
                "tokenizer_source `union` is not supported (it builds a new vocabulary); use `base` or a model",
            ))
        }
        Some(t) => Some(leaf_of(t)?),
    };
    if let Some(c) = &raw.chat_template {
        if !(c.value.contains("{{") || c.value.contains("{%")) {
            return Err(cx.err(
                &c.referenced,
                format!(
                    "chat_template `{}`: only a literal Jinja template is supported (no named templates)",
                    c.value
                ),
            ));
        }
    }
    let plan_base = base
        .or_else(|| layout.as_ref().map(|l| l[0].sources[0].0))
        .unwrap_or(models[0].leaf);
    let name = raw
        .name
        .as_ref()
        .map(|n| n.value.clone())
        .unwrap_or_else(|| "merge".into());
    Ok(Plan {
        recipe_path: path.to_path_buf(),
        recipe_text: text.to_string(),
        leaves,
        steps: vec![Step {
            name,
            method: def.name,
            kind,
            line: method.referenced.line(),
        }],
        base: plan_base,
        targets: vec![OutputTarget {
            path: out.to_path_buf(),
            models: vec![OutputModel {
                subdir: None,
                step: 0,
                eta: None,
            }],
        }],
        dtype,
        // mergekit computes each tensor in `dtype`, else in the promotion of its inputs' dtypes (bf16
        // with f16 → f32), and writes it so without `out_dtype`.
        mergekit_dtypes: true,
        input_dtype: compute,
        torch_order_cap: crate::selection::TORCH_ORDER_CAP,
        selection_windows: true,
        shard_size: DEFAULT_SHARD_SIZE,
        ignore_extra_tensors: false,
        allow_nonfinite: false,
        warnings: Vec::new(),
        layout,
        tokenizer_source,
        chat_template: raw.chat_template.map(|c| c.value),
        extra_files: vec![("mergekit_config.yml".into(), text.to_string())],
    })
}

/// A model reference: a path relative to the current directory, else a Hugging Face id in the cache.
fn model_path(cx: &Ctx, r: &S<String>) -> Result<(PathBuf, Option<String>), RecipeError> {
    let p = PathBuf::from(&r.value);
    if r.value.is_empty() {
        return Err(cx.err(&r.referenced, "empty model reference"));
    }
    if p.exists() {
        return Ok((p, None));
    }
    if hub::is_hub_id(&r.value) {
        let dir = hub::resolve(&r.value).map_err(|m| cx.err(&r.referenced, m))?;
        let id = r.value.split('@').next().unwrap_or(&r.value).to_string();
        return Ok((dir, Some(id)));
    }
    Err(cx.err(
        &r.referenced,
        format!(
            "model `{}` not found (paths in a mergekit config are relative to the current directory, {})",
            r.value,
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
    ))
}

/// The config's one step, as the methods see it.
struct ConfigStep<'a> {
    cx: &'a Ctx<'a>,
    method: &'a str,
    at: Location,
    models: Vec<&'a Model>,
    base: Option<usize>,
    shared: Option<&'a S<Params>>,
    seed: u64,
}

impl ConfigStep<'_> {
    fn shared_raw(&self, key: &str) -> Option<&S<RawParam>> {
        self.shared.and_then(|p| p.value.get(key))
    }

    fn to_param(&self, p: &S<RawParam>) -> Result<Param, RecipeError> {
        param(p).map_err(|(loc, m)| self.cx.err(&loc, m))
    }
}

impl StepArgs for ConfigStep<'_> {
    fn models(&mut self, min: usize) -> Result<Vec<Operand>, RecipeError> {
        if self.models.len() < min {
            return Err(self.cx.err(
                &self.at,
                format!(
                    "merge_method `{}` needs at least {min} model{} besides the base, got {}",
                    self.method,
                    if min == 1 { "" } else { "s" },
                    self.models.len()
                ),
            ));
        }
        Ok(self.models.iter().map(|m| Operand::Leaf(m.leaf)).collect())
    }

    fn model(&mut self) -> Result<Operand, RecipeError> {
        self.models(1).map(|m| m[0])
    }

    fn base(&mut self, required: bool) -> Result<Option<Operand>, RecipeError> {
        match self.base {
            Some(b) => Ok(Some(Operand::Leaf(b))),
            None if required => Err(self.cx.err(
                &self.at,
                format!("merge_method `{}` needs `base_model`", self.method),
            )),
            None => Ok(None),
        }
    }

    fn per_model(&self, key: &str, n: usize) -> Result<Option<Vec<Param>>, RecipeError> {
        debug_assert_eq!(n, self.models.len());
        let shared = self.shared_raw(key).map(|p| self.to_param(p)).transpose()?;
        let mut out = Vec::with_capacity(n);
        let mut any = shared.is_some();
        for m in &self.models {
            let own = m
                .params
                .as_ref()
                .and_then(|p| p.value.get(key))
                .map(|p| self.to_param(p))
                .transpose()?;
            any |= own.is_some();
            out.push((own, m.leaf));
        }
        if !any {
            return Ok(None);
        }
        out.into_iter()
            .map(|(own, _)| match (own, &shared) {
                (Some(o), Some(s)) => Ok(Param::Or(Box::new(o), Box::new(s.clone()))),
                (Some(o), None) => Ok(o),
                (None, Some(s)) => Ok(s.clone()),
                (None, None) => Err(self.cx.err(
                    &self.at,
                    format!("a model of this merge has no `{key}` (set it on every model, or in `parameters`)"),
                )),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn shared(&self, key: &str) -> Result<Option<Param>, RecipeError> {
        self.shared_raw(key).map(|p| self.to_param(p)).transpose()
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, RecipeError> {
        match self.shared_raw(key) {
            None => Ok(None),
            Some(p) => match p.value {
                RawParam::Bool(b) => Ok(Some(b)),
                RawParam::Number(v) if v == 0.0 || v == 1.0 => Ok(Some(v == 1.0)),
                _ => Err(self
                    .cx
                    .err(&p.referenced, format!("`{key}` must be true or false"))),
            },
        }
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn error(&self, key: Option<&str>, message: String) -> RecipeError {
        let loc = key
            .and_then(|k| {
                self.shared_raw(k).map(|p| p.referenced).or_else(|| {
                    self.models
                        .iter()
                        .find_map(|m| m.params.as_ref()?.value.get(k).map(|p| p.referenced))
                })
            })
            .unwrap_or(self.at);
        self.cx
            .err(&loc, format!("merge_method `{}`: {message}", self.method))
    }

    fn native(&mut self) -> Option<&mut dyn methods::NativeArgs> {
        None
    }
}
