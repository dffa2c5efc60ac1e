//! The model card (`README.md`) of an output folder: what the recipe did, method by method, which models
//! went in, and Hugging Face metadata that is true (hub ids only for models that came from the Hub, the
//! base's licence). No local path is ever written: a model that did not come from the Hub is named by the
//! recipe's alias or by the last components of its path.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Component, Path};

use crate::recipe::{operands, step_operands, Angle, Operand, Plan, Step, StepKind};

/// The file the recipe is copied to, beside the weights.
pub const RECIPE_FILE: &str = "recipe.yaml";

/// The card of the model that output step `step` (at `eta`, for a LITI list) writes into `folder`.
pub fn model_card(plan: &Plan, step: usize, eta: Option<f64>, folder: &Path) -> String {
    let used = steps_used(plan, step);
    let methods: BTreeSet<&str> = used.iter().map(|&s| plan.steps[s].method).collect();
    let warp = methods.iter().any(|m| ["ema", "slerp", "liti"].contains(m));
    let read = leaves_read(plan, &used);
    let leaves = leaves_used(plan, &read);
    let merged = read.iter().filter(|&&r| r).count();

    let mut o = String::from("---\n");
    if let Some(license) = base_license(&plan.leaves[plan.base].path) {
        let _ = writeln!(o, "license: {}", yaml_string(&license));
    }
    let hub: Vec<String> = leaves
        .iter()
        .filter_map(|&l| leaf_hub_id(plan, l))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !hub.is_empty() {
        o.push_str("base_model:\n");
        for id in &hub {
            let _ = writeln!(o, "- {}", yaml_string(id));
        }
        if merged > 1 {
            o.push_str("base_model_relation: merge\n");
        }
    }
    o.push_str("library_name: transformers\ntags:\n- merge\n- gemma-merge\n");
    for m in &methods {
        let _ = writeln!(o, "- {m}");
    }
    if warp {
        o.push_str("- warp\n");
    }
    o.push_str("---\n\n");

    let title = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged model".into());
    let _ = writeln!(o, "# {title}\n");
    let step_name = &plan.steps[step].name;
    let eta_text = eta.map(|e| format!(" at η = {e:?}")).unwrap_or_default();
    let _ = writeln!(
        o,
        "A merge of {} made with gemma-merge {}: the output of step `{step_name}`{eta_text} of the recipe in \
         [`{RECIPE_FILE}`]({RECIPE_FILE}).\n",
        count(merged, "model"),
        env!("CARGO_PKG_VERSION"),
    );

    o.push_str("## Method\n\n");
    for (i, &s) in used.iter().enumerate() {
        let _ = writeln!(
            o,
            "{}. `{}`: {}",
            i + 1,
            plan.steps[s].name,
            describe(plan, s, (s == step).then_some(eta).flatten())
        );
    }
    if warp {
        o.push_str(
            "\nEMA, SLERP of task vectors and LITI are the steps of WARP (Ramé et al. 2024, *WARP: On the \
             Benefits of Weight Averaged Rewarded Policies*), the weight averaging Gemma 2 was post-trained with.\n",
        );
    }
    o.push_str(
        "\nEvery output element is one f64 weighted sum of the inputs, rounded once to the output dtype.\n\n",
    );

    o.push_str("## Merged models\n\n");
    for &l in &leaves {
        let role = match (l == plan.base, read[l]) {
            (true, true) => " (base)",
            (true, false) => " (base: config and tokenizer only)",
            _ => "",
        };
        let origin = match leaf_hub_id(plan, l) {
            Some(id) => format!(" — [{id}](https://huggingface.co/{id})"),
            None => " — a local checkpoint".into(),
        };
        let _ = writeln!(o, "- `{}`{role}{origin}", leaf_name(plan, l));
    }
    o.push_str(
        "\n`merge-manifest.json` lists every input file and the SHA-256 of every file here; \
         `gemma-merge verify` re-checks them.\n",
    );
    o
}

/// The steps the output step depends on (itself included), in recipe order.
fn steps_used(plan: &Plan, step: usize) -> Vec<usize> {
    let mut used = vec![false; plan.steps.len()];
    let mut todo = vec![step];
    while let Some(s) = todo.pop() {
        if std::mem::replace(&mut used[s], true) {
            continue;
        }
        todo.extend(
            operands(&plan.steps[s].kind)
                .into_iter()
                .filter_map(|op| match op {
                    Operand::Step(p) => Some(p),
                    Operand::Leaf(_) => None,
                }),
        );
    }
    (0..plan.steps.len()).filter(|&s| used[s]).collect()
}

/// Whether each input model is read by those steps.
fn leaves_read(plan: &Plan, used: &[usize]) -> Vec<bool> {
    let mut read = vec![false; plan.leaves.len()];
    for &s in used {
        for op in step_operands(plan, s) {
            if let Operand::Leaf(l) = op {
                read[l] = true;
            }
        }
    }
    read
}

/// The base first (it gives the config and tokenizer even when no step reads its weights), then the
/// models read, in recipe order.
fn leaves_used(plan: &Plan, read: &[bool]) -> Vec<usize> {
    std::iter::once(plan.base)
        .chain((0..plan.leaves.len()).filter(|&l| l != plan.base && read[l]))
        .collect()
}

/// One line on what a step computes; for a layer layout, one line per slice.
fn describe(plan: &Plan, s: usize, eta: Option<f64>) -> String {
    let step = &plan.steps[s];
    let Some(slices) = &plan.layout else {
        return describe_kind(plan, step, &step.kind, eta);
    };
    let total: usize = slices.iter().map(|sl| sl.len).sum();
    let mut o = format!(
        "{} stacked from {}:",
        count(total, "layer"),
        count(slices.len(), "slice")
    );
    let mut k = 0;
    for sl in slices {
        let from = sl
            .sources
            .iter()
            .map(|&(l, a)| format!("{} of `{}`", span(a, sl.len), leaf_name(plan, l)))
            .collect::<Vec<_>>()
            .join(", ");
        let what = match &sl.kind {
            Some(kind) => describe_kind(plan, step, kind, None),
            None => format!("**{}**", step.method),
        };
        let _ = write!(
            o,
            "\n   - layers {} (from layers {from}): {what}",
            span(k, sl.len)
        );
        k += sl.len;
    }
    o
}

/// Layers `first` to `first + len − 1`, as "3–5" (or "3").
fn span(first: usize, len: usize) -> String {
    match len {
        1 => first.to_string(),
        _ => format!("{first}–{}", first + len - 1),
    }
}

/// One line on what `kind` (of `step`) computes.
fn describe_kind(plan: &Plan, step: &Step, kind: &StepKind, eta: Option<f64>) -> String {
    let name = |op: &Operand| match *op {
        Operand::Leaf(l) => format!("`{}`", leaf_name(plan, l)),
        Operand::Step(p) => format!("`{}`", plan.steps[p].name),
    };
    match kind {
        StepKind::Weighted { terms } => {
            let sum = terms
                .iter()
                .map(|(op, w)| format!("{}·{}", number(*w), name(op)))
                .collect::<Vec<_>>()
                .join(" + ");
            match step.method {
                "ema" => {
                    format!("**EMA** (exponential moving average) of a run's checkpoints: {sum}")
                }
                "linear" => format!("**linear** (weighted average): {sum}"),
                other => format!("**{other}**: {sum}"),
            }
        }
        StepKind::Slerp {
            base,
            models,
            lambdas,
            angle,
        } => {
            let ms = models.iter().map(name).collect::<Vec<_>>().join(", ");
            let per = match angle {
                Angle::Layer => "one angle per layer",
                Angle::Tensor => "one angle per tensor",
            };
            let t = match lambdas.as_slice() {
                [t] => format!("t = {}", number(*t)),
                l => format!(
                    "λ = [{}]",
                    l.iter().map(|&x| number(x)).collect::<Vec<_>>().join(", ")
                ),
            };
            format!(
                "**SLERP** of the task vectors of {ms} (each minus {}), {per}, {t}",
                name(base)
            )
        }
        StepKind::Liti { base, model, etas } => {
            let e = match (eta, etas.as_slice()) {
                (Some(e), _) | (None, &[e]) => format!("η = {}", number(e)),
                (None, l) => format!(
                    "η in [{}]",
                    l.iter().map(|&x| number(x)).collect::<Vec<_>>().join(", ")
                ),
            };
            format!(
                "**LITI** (interpolation towards the init): (1 − η)·{} + η·{}, {e}",
                name(base),
                name(model)
            )
        }
        other => {
            let inputs = operands(other)
                .iter()
                .map(name)
                .collect::<Vec<_>>()
                .join(", ");
            format!("**{}** of {inputs}", step.method)
        }
    }
}

/// A number as short as it can be said exactly enough: 0.5, 0.0493, 1.
fn number(x: f64) -> String {
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".into()
    } else {
        s.into()
    }
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// How the card names an input: its hub id, else the recipe's alias, else the last two components of its
/// path (never the folders above it).
fn leaf_name(plan: &Plan, l: usize) -> String {
    let leaf = &plan.leaves[l];
    if let Some(id) = leaf_hub_id(plan, l) {
        return id;
    }
    let shown = Path::new(&leaf.shown);
    let normal: Vec<String> = shown
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match normal.len() {
        0 => "model".into(),
        1 => normal[0].clone(),
        n => normal[n - 2..].join("/"),
    }
}

/// The Hugging Face id of an input: as the recipe resolved it (`org/name` found in the local cache), else
/// read from a Hub cache path.
fn leaf_hub_id(plan: &Plan, l: usize) -> Option<String> {
    let leaf = &plan.leaves[l];
    leaf.hub_id.clone().or_else(|| hub_id(&leaf.path))
}

/// `org/name` for a model inside a Hugging Face cache (`.../models--org--name/snapshots/REV/`).
pub fn hub_id(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let i = parts.iter().rposition(|p| p.starts_with("models--"))?;
    if parts.get(i + 1).map(String::as_str) != Some("snapshots") || parts.len() < i + 3 {
        return None;
    }
    let mut it = parts[i]["models--".len()..].splitn(2, "--");
    let (org, name) = (it.next()?, it.next()?);
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name) && !name.contains("--")).then(|| format!("{org}/{name}"))
}

/// The `license` of the base model: from the front matter of its README.md, else from its config.json.
fn base_license(base: &Path) -> Option<String> {
    let folder = if base.is_file() { base.parent()? } else { base };
    if let Ok(text) = std::fs::read_to_string(folder.join("README.md")) {
        if let Some(rest) = text.strip_prefix("---") {
            for line in rest.lines().skip(1) {
                if line.trim_end() == "---" {
                    break;
                }
                if let Some(v) = line.strip_prefix("license:") {
                    let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
                    if !v.is_empty() {
                        return Some(v.to_string());
                    }
                }
            }
        }
    }
    let config = std::fs::read_to_string(folder.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&config).ok()?;
    v.get("license")?.as_str().map(String::from)
}

/// A YAML scalar: plain when safe, else JSON-quoted (JSON strings are YAML).
fn yaml_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_come_only_from_a_hub_cache_layout() {
        let p =
            Path::new("/home/u/.cache/huggingface/hub/models--google--gemma-2-2b/snapshots/abc123");
        assert_eq!(hub_id(p).as_deref(), Some("google/gemma-2-2b"));
        assert_eq!(
            hub_id(&p.join("model.safetensors")).as_deref(),
            Some("google/gemma-2-2b")
        );
        for not in [
            "/data/gemma-2-2b",
            "models--google--gemma-2-2b",
            "/x/models--google/snapshots/a",
            "/x/models--google--gemma/refs/main",
            "/x/models--a--b--c/snapshots/r",
        ] {
            assert_eq!(hub_id(Path::new(not)), None, "{not}");
        }
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(1.0), "1");
        assert_eq!(number(1.0 / 6.0), "0.1667");
        assert_eq!(number(0.0), "0");
    }
}
