//! `slices` in gemma-merge recipes (mergekit's layer stacking): the same bytes as the mergekit config,
//! per-slice merges with their own parameters, layouts under every Gemma checkpoint prefix (multimodal Gemma 3
//! included) checked against transformers' logits of the stacked models (fixtures/slices, from
//! tools/make_slices_golden.py), and every refusal at its recipe line, writing nothing.

use std::path::{Path, PathBuf};

mod common;
use common::s;
use common::{bin, load, Tensors};

use gemma_merge::format::{FloatType, Model};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn case() -> PathBuf {
    fixtures().join("methods-case")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs gemma-merge in `cwd`.
fn gm_in(cwd: &Path, args: &[&str]) -> Run {
    let o = bin()
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("binary runs");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok_in(cwd: &Path, args: &[&str]) -> String {
    let o = gm_in(cwd, args);
    assert_eq!(o.code, 0, "gemma-merge {args:?} failed:\n{}", o.stderr);
    o.stdout
}

/// Writes `DIR/recipe.yaml`: aliases `sft`, `ft_a`, `ft_b`, `ft_c` for the methods-case models (9 lines),
/// then `body`.
fn recipe(dir: &Path, body: &str) -> PathBuf {
    let c = case();
    let text = format!(
        "output: out\ndtype: float32\nbase: sft\nmodels:\n  sft: {}\n  ft_a: {}\n  ft_b: {}\n  ft_c: {}\nsteps:\n{body}",
        s(&c.join("sft")),
        s(&c.join("ft_a")),
        s(&c.join("ft_b")),
        s(&c.join("ft_c"))
    );
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs the recipe of `dir` and returns its output folder.
fn run(dir: &Path) -> PathBuf {
    ok_in(dir, &["-q", "run", "recipe.yaml"]);
    dir.join("out")
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The f32 values of a tensor.
fn values(t: &Tensors, name: &str) -> Vec<f32> {
    let (dtype, _, v) = &t[name];
    assert_eq!(*dtype, FloatType::F32, "{name}");
    v.iter().map(|&x| x as f32).collect()
}

/// Every tensor's raw bytes, by name.
fn raw(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let m = Model::open(dir).unwrap();
    m.tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                (
                    format!("{:?}", t.dtype),
                    t.shape.clone(),
                    m.data(t).to_vec(),
                ),
            )
        })
        .collect()
}

const PASSTHROUGH: &str = "  - name: stacked
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
      - sources: [{model: ft_b, layer_range: [1, 4]}]
";

#[test]
fn native_passthrough_slices_write_the_mergekit_configs_bytes() {
    let d = tempfile::tempdir().unwrap();
    recipe(&d.path().join("native"), PASSTHROUGH);
    let native = run(&d.path().join("native"));
    let mk = d.path().join("mergekit");
    ok_in(
        &case().join("mergekit"),
        &["-q", "run", "passthrough.yml", "--out", s(&mk)],
    );
    assert_eq!(
        std::fs::read(native.join("model.safetensors")).unwrap(),
        std::fs::read(mk.join("model.safetensors")).unwrap()
    );
    // And the reference stack (fixtures/methods-case/expected/passthrough), value for value.
    let got = load(&native);
    let want = load(&case().join("expected/passthrough"));
    assert_eq!(got, want);
    let (c, w) = (
        config(&native),
        config(&case().join("expected/passthrough")),
    );
    assert_eq!(c["num_hidden_layers"], 6);
    assert_eq!(c["layer_types"], w["layer_types"]);
    // Output layer 3 is ft_b's layer 1, a full-attention layer (Gemma 2 alternates, from sliding).
    assert_eq!(c["layer_types"][3], "full_attention");
    let card = std::fs::read_to_string(native.join("README.md")).unwrap();
    assert!(
        card.contains("6 layers stacked from 2 slices:\n   - layers 0–2 (from layers 0–2 of `ft_a`): **passthrough** of `ft_a`\n   - layers 3–5 (from layers 1–3 of `ft_b`): **passthrough** of `ft_b`"),
        "{card}"
    );
}

/// transformers' logits of a stacked model (fixtures/slices/CASE).
struct Golden {
    json: Value,
    logits: Vec<f32>,
}

fn golden(case: &str) -> Golden {
    let dir = fixtures().join("slices").join(case);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let logits = load(&dir.join("golden.safetensors"))["logits"]
        .2
        .iter()
        .map(|&x| x as f32)
        .collect();
    Golden { json, logits }
}

/// `gemma-merge eval` of `model` on the golden's tokens: its logits within 1e-4 of transformers', and its
/// perplexity within 1e-4 relative.
fn eval_matches(model: &Path, g: &Golden, dump: &Path) {
    let tokens: Vec<String> = g.json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = ok_in(
        Path::new("."),
        &[
            "eval",
            s(model),
            "--token-ids",
            &tokens.join(","),
            "--dump-logits",
            s(dump),
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let want = g.json["perplexity"].as_f64().unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() / want < 1e-4,
        "{model:?}: {ppl} vs {want}"
    );
    let logits = load(dump)["logits"].2.clone();
    assert_eq!(logits.len(), g.logits.len());
    let err = logits
        .iter()
        .zip(&g.logits)
        .fold(0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
    assert!(
        err < 1e-4,
        "{model:?}: max |logits − transformers'| = {err}"
    );
}

#[test]
fn our_forward_pass_runs_the_stacked_model_as_transformers_does() {
    let d = tempfile::tempdir().unwrap();
    recipe(d.path(), PASSTHROUGH);
    let out = run(d.path());
    eval_matches(
        &out,
        &golden("gemma2-passthrough"),
        &d.path().join("logits.safetensors"),
    );
}

/// A recipe stacking layer ranges of one multimodal fixture.
fn multimodal(dir: &Path, fixture: &str, ranges: &[(usize, usize)]) -> PathBuf {
    let slices: String = ranges
        .iter()
        .map(|(a, b)| format!("      - sources: [{{model: mm, layer_range: [{a}, {b}]}}]\n"))
        .collect();
    let text = format!(
        "output: out\nmodels:\n  mm: {}\nsteps:\n  - name: stacked\n    method: passthrough\n    slices:\n{slices}",
        s(&fixtures().join("family").join(fixture))
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("recipe.yaml"), text).unwrap();
    run(dir)
}

/// The layer prefix of a multimodal fixture's language model.
fn lm_prefix(fixture: &str) -> &'static str {
    match fixture {
        "gemma3-mm-tiny" => "language_model.model.layers.",
        "gemma3-mm-t5" => "model.language_model.layers.",
        _ => unreachable!(),
    }
}

#[test]
fn multimodal_stacks_keep_the_vision_tower_and_patch_text_config() {
    let d = tempfile::tempdir().unwrap();
    for (fixture, golden_case) in [
        ("gemma3-mm-tiny", "gemma3-mm-tiny-stack"),
        ("gemma3-mm-t5", "gemma3-mm-t5-stack"),
    ] {
        let g = golden(golden_case);
        let ranges: Vec<(usize, usize)> = g.json["slices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_u64().unwrap() as usize,
                    r[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let src = fixtures().join("family").join(fixture);
        let out = multimodal(&d.path().join(fixture), fixture, &ranges);
        let (got, input) = (raw(&out), raw(&src));
        let prefix = lm_prefix(fixture);
        // Output layer k is source layer map[k], every tensor of it, bit for bit.
        let map: Vec<usize> = ranges.iter().flat_map(|&(a, b)| a..b).collect();
        let mut vision = 0;
        for (name, t) in &input {
            match name.strip_prefix(prefix) {
                Some(rest) => {
                    let (n, suffix) = rest.split_once('.').unwrap();
                    let n: usize = n.parse().unwrap();
                    for (k, _) in map.iter().enumerate().filter(|(_, &m)| m == n) {
                        assert_eq!(
                            &got[&format!("{prefix}{k}.{suffix}")],
                            t,
                            "{fixture}: {name}"
                        );
                    }
                }
                // Everything else (embeddings, final norm, vision tower, projector) is kept as it is.
                None => {
                    assert_eq!(got.get(name), Some(t), "{fixture}: {name}");
                    vision += name.contains("vision_tower") as usize;
                }
            }
        }
        assert!(vision > 10, "{fixture}: the vision tower is there");
        let layer_tensors = input.keys().filter(|n| n.starts_with(prefix)).count();
        let per_layer = layer_tensors / input_layers(&input, prefix);
        assert_eq!(
            got.len(),
            input.len() - layer_tensors + map.len() * per_layer,
            "{fixture}: no other tensor"
        );
        // config.json: the language model's fields in text_config, nothing at the top level.
        let (c, c_in) = (config(&out), config(&src));
        let text = &c["text_config"];
        assert_eq!(text["num_hidden_layers"], map.len());
        assert_eq!(text["layer_types"], g.json["layer_types"]);
        for (k, v) in c.as_object().unwrap() {
            if !["text_config", "torch_dtype"].contains(&k.as_str()) {
                assert_eq!(&c_in[k], v, "{fixture}: {k}");
            }
        }
        assert!(c.get("num_hidden_layers").is_none());
        for (k, v) in c_in["text_config"].as_object().unwrap() {
            if !["num_hidden_layers", "layer_types"].contains(&k.as_str()) {
                assert_eq!(&text[k], v, "{fixture}: text_config.{k}");
            }
        }
        eval_matches(&out, &g, &d.path().join(format!("{fixture}.logits")));
    }
}

/// How many layers a model has under `prefix`.
fn input_layers(
    t: &std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    prefix: &str,
) -> usize {
    t.keys()
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

#[test]
fn a_stack_of_all_the_layers_in_order_is_the_model_itself() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("family/gemma3-mm-tiny");
    let out = multimodal(d.path(), "gemma3-mm-tiny", &[(0, 4), (4, 7)]);
    assert_eq!(raw(&out), raw(&src));
    // Its forward pass gives the fixture's own golden logits (transformers').
    let dir = src;
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let logits = load(&dir.join("golden.safetensors"))["logits"]
        .2
        .iter()
        .map(|&x| x as f32)
        .collect();
    eval_matches(
        &out,
        &Golden { json, logits },
        &d.path().join("logits.safetensors"),
    );
}

/// A native step of the task-vector family, as `models:` (the form tests/methods.rs checks against mergekit).
fn ties_with_models(weights: &str, density: &str) -> String {
    format!("  - {{name: t, method: ties, models: [ft_a, ft_b, ft_c], weights: {weights}, density: {density}}}\n")
}

/// The same step as one slice of layers [a, b): every model a source (the base too), each with its own
/// parameters.
fn ties_slice(a: usize, b: usize, weights: [f64; 3], density: [f64; 3]) -> String {
    let mut o = format!("      - sources:\n          - {{model: sft, layer_range: [{a}, {b}]}}\n");
    for (i, m) in ["ft_a", "ft_b", "ft_c"].iter().enumerate() {
        o += &format!(
            "          - {{model: {m}, layer_range: [{a}, {b}], parameters: {{weight: {}, density: {}}}}}\n",
            weights[i], density[i]
        );
    }
    o
}

#[test]
fn ties_slices_are_merged_per_slice_with_their_own_parameters() {
    let d = tempfile::tempdir().unwrap();
    let (w1, d1) = ([1.0, 0.8, 0.5], [0.5, 0.6, 0.4]);
    let (w2, d2) = ([0.3, 1.0, 0.7], [0.9, 0.3, 0.5]);
    // The whole model with each parameter set, as `models:` steps (mergekit's ties.yml is the first).
    recipe(
        &d.path().join("p1"),
        &ties_with_models("[1.0, 0.8, 0.5]", "[0.5, 0.6, 0.4]"),
    );
    recipe(
        &d.path().join("p2"),
        &ties_with_models("[0.3, 1.0, 0.7]", "[0.9, 0.3, 0.5]"),
    );
    let (p1, p2) = (
        load(&run(&d.path().join("p1"))),
        load(&run(&d.path().join("p2"))),
    );
    // Two slices with the same parameters: the same merge as the whole model.
    recipe(
        &d.path().join("same"),
        &format!(
            "  - name: t\n    method: ties\n    slices:\n{}{}",
            ties_slice(0, 2, w1, d1),
            ties_slice(2, 4, w1, d1)
        ),
    );
    assert_eq!(load(&run(&d.path().join("same"))), p1);
    // Layers 2-3 with the second set: those layers and the final norm (from the last slice) as the whole
    // model merged with it; the rest as with the first.
    recipe(
        &d.path().join("mixed"),
        &format!(
            "  - name: t\n    method: ties\n    slices:\n{}{}",
            ties_slice(0, 2, w1, d1),
            ties_slice(2, 4, w2, d2)
        ),
    );
    let mixed = load(&run(&d.path().join("mixed")));
    assert_eq!(
        mixed.keys().collect::<Vec<_>>(),
        p1.keys().collect::<Vec<_>>()
    );
    let mut from_second = 0;
    for (name, v) in &mixed {
        let second = name.starts_with("model.layers.2.")
            || name.starts_with("model.layers.3.")
            || name == "model.norm.weight";
        from_second += second as usize;
        let want = if second { &p2[name] } else { &p1[name] };
        assert_eq!(v, want, "{name}");
        // The two parameter sets do give different merges.
        if name.contains("self_attn.q_proj") {
            assert_ne!(p1[name], p2[name], "{name}");
        }
    }
    assert!(from_second > 20);
}

#[test]
fn slices_take_layers_from_other_positions_and_gradients_run_over_each_slice() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (load(&case().join("ft_a")), load(&case().join("ft_b")));
    // linear: output layer o = (1·ft_a's layer 2 + o, 3·ft_b's layer o) / 4, rounded once to f32.
    recipe(
        &d.path().join("linear"),
        "  - name: l
    method: linear
    slices:
      - sources:
          - {model: ft_a, layer_range: [2, 4], parameters: {weight: 1}}
          - {model: ft_b, layer_range: [0, 2], parameters: {weight: 3}}
",
    );
    let out = load(&run(&d.path().join("linear")));
    assert_eq!(config(&d.path().join("linear/out"))["num_hidden_layers"], 2);
    let mut checked = 0;
    for name in out.keys() {
        let (ia, ib) = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (o, suffix) = rest.split_once('.').unwrap();
                let o: usize = o.parse().unwrap();
                (
                    format!("model.layers.{}.{suffix}", 2 + o),
                    format!("model.layers.{o}.{suffix}"),
                )
            }
            None => (name.clone(), name.clone()),
        };
        let want: Vec<f32> = values(&a, &ia)
            .iter()
            .zip(values(&b, &ib))
            .map(|(&x, y)| ((x as f64 + 3.0 * y as f64) / 4.0) as f32)
            .collect();
        assert_eq!(values(&out, name), want, "{name}");
        checked += 1;
    }
    let per_layer = a
        .keys()
        .filter(|n| n.starts_with("model.layers.0."))
        .count();
    assert_eq!(
        checked,
        a.len() - 2 * per_layer,
        "two of the four layers and the tensors outside them"
    );
    // A model's parameter filters match its own tensor names, as mergekit's do: `layers.3.` is ft_a's
    // layer 3, which becomes output layer 1 (ft_b's layer 1 there keeps weight 3).
    recipe(
        &d.path().join("filters"),
        "  - name: l
    method: linear
    slices:
      - sources:
          - {model: ft_a, layer_range: [2, 4], parameters: {weight: [{filter: layers.3., value: 5}, {value: 1}]}}
          - {model: ft_b, layer_range: [0, 2], parameters: {weight: [{filter: layers.3., value: 7}, {value: 3}]}}
",
    );
    let out = load(&run(&d.path().join("filters")));
    for name in out.keys() {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            continue;
        };
        let (o, suffix) = rest.split_once('.').unwrap();
        let o: usize = o.parse().unwrap();
        let wa = [1.0, 5.0][o];
        let want: Vec<f32> = values(&a, &format!("model.layers.{}.{suffix}", 2 + o))
            .iter()
            .zip(values(&b, &format!("model.layers.{o}.{suffix}")))
            .map(|(&x, y)| ((wa * x as f64 + 3.0 * y as f64) / (wa + 3.0)) as f32)
            .collect();
        assert_eq!(values(&out, name), want, "{name}");
    }
    // passthrough: a `scale` gradient [1, 3] over a slice of two layers scales its first layer by 1 and
    // its second by 3; tensors outside the layers sit at t = 0 (scale 1).
    recipe(
        &d.path().join("scale"),
        "  - name: p
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [1, 3], parameters: {scale: [1, 3]}}]
",
    );
    let out = load(&run(&d.path().join("scale")));
    for name in out.keys() {
        let (source, factor) = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (o, suffix) = rest.split_once('.').unwrap();
                let o: usize = o.parse().unwrap();
                (format!("model.layers.{}.{suffix}", 1 + o), [1.0, 3.0][o])
            }
            None => (name.clone(), 1.0),
        };
        let want: Vec<f32> = values(&a, &source)
            .iter()
            .map(|&x| (x as f64 * factor) as f32)
            .collect();
        assert_eq!(values(&out, name), want, "{name}");
    }
}

/// Runs `body` as the steps of a recipe in a fresh folder: it must fail with exit 2 and exactly
/// `error: recipe.yaml:LINE:COL: message` (the step list starts on line 10), before writing anything.
fn refused(body: &str, want: &str) {
    let d = tempfile::tempdir().unwrap();
    recipe(d.path(), body);
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["-q", "run", "recipe.yaml"];
        args.extend_from_slice(extra);
        let o = gm_in(d.path(), &args);
        assert_eq!(o.code, 2, "{body}\n{}", o.stderr);
        assert_eq!(
            o.stderr.trim_end(),
            format!("error: recipe.yaml:{want}"),
            "{body}"
        );
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["recipe.yaml"], "{body}: nothing written");
    }
}

#[test]
fn every_refusal_names_its_recipe_line() {
    refused(
        "  - name: s
    method: passthrough
    models: [ft_a]
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
",
        "14:7: give either `models` or `slices`, not both",
    );
    refused(
        "  - name: s
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
  - name: t
    method: passthrough
    models: [ft_a]
",
        "13:7: `slices` only on the output step: a layer layout is the whole output's (this recipe writes step `t`)",
    );
    refused(
        "  - name: s
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
  - name: t
    method: passthrough
    models: [s]
output_step: s
",
        "16:14: step `s` has `slices`: its layer layout is the output's, no step can read it",
    );
    refused(
        "  - name: t
    method: passthrough
    models: [ft_a]
    save: saved
  - name: s
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
",
        "13:11: `save` in a recipe whose step `s` has `slices`: the layer layout applies to all the run writes, so it writes that step only (step `t` cannot be saved)",
    );
    refused(
        "  - name: t
    method: passthrough
    models: [ft_a]
  - name: s
    method: passthrough
    slices:
      - sources: [{model: t, layer_range: [0, 3]}]
",
        "16:27: slice sources are input models, not steps: `t` is a step",
    );
    // Found once the headers are read, still before any tensor data (and by --dry-run).
    refused(
        "  - name: s
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}]
      - sources: [{model: ft_b, layer_range: [1, 9]}]
",
        "14:46: `layer_range` [1, 9] goes past the last layer of `ft_b`, which has 4 (layers 0 to 3)",
    );
    refused(
        "  - name: s
    method: linear
    weights: 1
    slices:
      - sources: [{model: ft_a, layer_range: [0, 3]}, {model: ft_b, layer_range: [0, 2]}]
",
        "14:82: every source of a slice gives the same number of layers: this one gives 2, the first 3",
    );
    refused(
        "  - name: s\n    method: passthrough\n    slices: []\n",
        "12:13: `slices` is empty: give at least one slice",
    );
    refused(
        "  - name: s\n    method: passthrough\n    slices:\n      - sources: []\n",
        "13:18: a slice needs at least one source",
    );
    refused(
        "  - name: s\n    method: passthrough\n    slices:\n      - sources: [{model: ft_a, layer_range: [2, 2]}]\n",
        "13:46: `layer_range` [2, 2] holds no layer: it is [first, end), the end above the first",
    );
    refused(
        "  - name: s\n    method: passthrough\n    slices:\n      - sources: [{model: ft_a, layer_range: [0, 1, 2]}]\n",
        "13:46: `layer_range` is two numbers [first, end), got 3",
    );
    refused(
        "  - name: s
    method: ema
    decay: 0.5
    slices:
      - sources: [{model: ft_a, layer_range: [0, 2]}]
",
        "14:7: method `ema` does not take `slices` (mergekit's methods do: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, model_stock, weight_slerp, nuslerp, passthrough)",
    );
    refused(
        "  - name: s
    method: passthrough
    slices:
      - sources: [{model: ft_a, layer_range: [0, 2]}, {model: ft_b, layer_range: [0, 2]}]
",
        "13:18: step `s` (passthrough), slice 1: passthrough copies one model, got 2 (to stack layers of several, give each its own slice)",
    );
    refused(
        "  - name: s
    method: ties
    weights: 1
    slices:
      - sources: [{model: sft, layer_range: [0, 2]}, {model: ft_a, layer_range: [0, 2]}]
      - sources:
          - {model: ft_a, layer_range: [2, 4]}
",
        "16:11: the base `sft` must be a source of every slice: each slice's layers are merged against the base's",
    );
    refused(
        "  - name: s
    method: ties
    slices:
      - sources:
          - {model: sft, layer_range: [0, 2]}
          - {model: ft_a, layer_range: [0, 2], parameters: {weight: 1, densty: 0.5}}
",
        "15:80: unknown parameter `densty` of a source for method `ties` (it takes: weight, density, gamma)",
    );
    refused(
        "  - name: s
    method: ties
    slices:
      - sources:
          - {model: sft, layer_range: [0, 2], parameters: {weight: 1}}
          - {model: ft_a, layer_range: [0, 2], parameters: {weight: 1, density: 0.5}}
",
        "14:59: `sft` is the base of this `ties` step: it takes no per-model parameters",
    );
    refused(
        "  - name: s
    method: linear
    slices:
      - sources:
          - {model: ft_a, layer_range: [0, 2], parameters: {weight: 1}}
          - {model: ft_b, layer_range: [2, 4]}
",
        "14:11: step `s` (linear), slice 1: a source has no `weight` (set it in the `parameters` of every source, or `weights` on the step)",
    );
    refused(
        "  - name: s
    method: linear
    weights: 1
    slices:
      - sources:
          - {model: ft_a, layer_range: [0, 2]}
          - {model: ft_a, layer_range: [2, 4]}
",
        "16:21: `ft_a` is a source of this slice twice (a model can be a source only once per slice)",
    );
    // Without slices, passthrough copies one model: at plan time now, not when the tensors are read.
    refused(
        "  - name: s\n    method: passthrough\n    models: [ft_a, ft_b]\n",
        "12:13: passthrough copies one model, got 2 (to stack layers of several, give each its own slice)",
    );
}

#[test]
fn models_with_other_layouts_cannot_share_a_stack() {
    refused(
        &format!(
            "  - name: s
    method: passthrough
    slices:
      - sources: [{{model: ft_a, layer_range: [0, 2]}}]
      - sources: [{{model: {}, layer_range: [0, 2]}}]
",
            s(&fixtures().join("family/gemma3-mm-t5"))
        ),
        &format!(
            "14:{}: `{}` keeps its layers under `model.language_model.layers.`, `ft_a` under `model.layers.`: the slices' models must share one layout",
            42 + s(&fixtures().join("family/gemma3-mm-t5")).len(),
            s(&fixtures().join("family/gemma3-mm-t5"))
        ),
    );
}

#[test]
fn the_vision_tower_comes_with_the_embeddings_from_the_first_slice_the_final_norm_from_the_last() {
    let d = tempfile::tempdir().unwrap();
    // A second multimodal model: the fixture with every value negated (exact in bf16).
    let a_dir = fixtures().join("family/gemma3-mm-t5");
    let a = load(&a_dir);
    let b_dir = d.path().join("negated");
    let negated: Vec<(&str, Vec<usize>, Vec<f32>)> = a
        .iter()
        .map(|(name, (_, shape, v))| {
            (
                name.as_str(),
                shape.clone(),
                v.iter().map(|&x| -x as f32).collect(),
            )
        })
        .collect();
    common::write_model(&b_dir, FloatType::BF16, &negated);
    std::fs::copy(a_dir.join("config.json"), b_dir.join("config.json")).unwrap();
    std::fs::write(
        d.path().join("recipe.yaml"),
        format!(
            "output: out\nmodels:\n  a: {}\n  b: {}\nsteps:\n  - name: stacked\n    method: passthrough\n    slices:\n      - sources: [{{model: a, layer_range: [0, 2]}}]\n      - sources: [{{model: b, layer_range: [1, 3]}}]\n",
            s(&a_dir),
            s(&b_dir)
        ),
    )
    .unwrap();
    let out = load(&run(d.path()));
    let b = load(&b_dir);
    let prefix = "model.language_model.layers.";
    let mut vision = 0;
    for (name, v) in &out {
        let want = match name.strip_prefix(prefix) {
            Some(rest) => {
                let (k, suffix) = rest.split_once('.').unwrap();
                match k.parse::<usize>().unwrap() {
                    k @ (0 | 1) => &a[&format!("{prefix}{k}.{suffix}")],
                    k => &b[&format!("{prefix}{}.{suffix}", k - 1)],
                }
            }
            None if name == "model.language_model.norm.weight" => &b[name],
            None => {
                vision += name.contains("vision_tower") as usize;
                &a[name]
            }
        };
        assert_eq!(v, want, "{name}");
    }
    assert!(vision > 10);
    assert!(out.contains_key("model.multi_modal_projector.mm_input_projection_weight"));
    assert_eq!(out.len(), a.len(), "4 layers, as the fixture");
}

#[test]
fn a_mergekit_configs_layer_range_past_the_end_names_its_line_too() {
    let d = tempfile::tempdir().unwrap();
    let config = format!(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        layer_range: [0, 3]\n  - sources:\n      - model: {}\n        layer_range: [2, 5]\n",
        s(&case().join("ft_a")),
        s(&case().join("ft_b"))
    );
    std::fs::write(d.path().join("config.yml"), config).unwrap();
    let o = gm_in(d.path(), &["-q", "run", "config.yml", "--out", "out"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr.trim_end(),
        "error: config.yml:8:22: `layer_range` [2, 5] goes past the last layer of `".to_string()
            + s(&case().join("ft_b"))
            + "`, which has 4 (layers 0 to 3)"
    );
    assert!(!d.path().join("out").exists());
}

/// A mergekit config reads each source's `parameters` per slice, as mergekit does: a linear merge weighting
/// ft_b 3:1 in the first slice and ft_a 3:1 in the second gives each layer (and the embeddings, from the
/// first slice; the final norm, from the last) its own slice's mix, derived here by hand in f64 and rounded
/// once to f32.
#[test]
fn mergekit_configs_take_each_slices_own_parameters() {
    let d = tempfile::tempdir().unwrap();
    let c = case();
    let src = |m: &str, a: usize, b: usize, w: f64| {
        format!(
            "      - model: {}\n        layer_range: [{a}, {b}]\n        parameters: {{weight: {w}}}\n",
            s(&c.join(m))
        )
    };
    let text = format!(
        "merge_method: linear\ndtype: float32\nslices:\n  - sources:\n{}{}  - sources:\n{}{}",
        src("ft_a", 0, 2, 1.0),
        src("ft_b", 0, 2, 3.0),
        src("ft_a", 2, 4, 3.0),
        src("ft_b", 2, 4, 1.0)
    );
    std::fs::write(d.path().join("config.yml"), text).unwrap();
    let out = d.path().join("out");
    ok_in(d.path(), &["-q", "run", "config.yml", "--out", s(&out)]);
    let (a, b, got) = (load(&c.join("ft_a")), load(&c.join("ft_b")), load(&out));
    let mut checked = 0;
    for name in got.keys() {
        // Layers 0-1, the embeddings: the first slice (1:3); layers 2-3, the final norm: the second (3:1).
        let first =
            name.contains("embed") || name.contains("layers.0.") || name.contains("layers.1.");
        let (wa, wb) = if first { (1.0, 3.0) } else { (3.0, 1.0) };
        let (va, vb) = (values(&a, name), values(&b, name));
        let want: Vec<f32> = va
            .iter()
            .zip(&vb)
            .map(|(&x, &y)| ((wa * x as f64 + wb * y as f64) / 4.0) as f32)
            .collect();
        assert_eq!(values(&got, name), want, "{name}");
        checked += 1;
    }
    assert!(checked > 10, "only {checked} tensors");
}
