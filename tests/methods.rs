//! mergekit's methods and configs: every config in fixtures/methods-case/mergekit against mergekit's own
//! output, native recipe steps against the same configs, DARE's reproducibility and kept fraction,
//! composition with the WARP methods, Hugging Face ids, and the errors that must write nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::s;
use common::{load, Tensors};

use gemma_merge::format::FloatType;
use gemma_merge::selection::{bernoulli_keep, probability_threshold, stream_key};

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/methods-case")
}

struct Out {
    code: i32,
    stderr: String,
}

/// Runs gemma-merge in `cwd` (mergekit resolves a config's model paths against the current directory).
fn gm_in(cwd: &Path, args: &[&str], env: &[(&str, &Path)]) -> Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gemma-merge"));
    c.current_dir(cwd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("binary runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok_in(cwd: &Path, args: &[&str]) {
    let o = gm_in(cwd, args, &[]);
    assert_eq!(o.code, 0, "gemma-merge {args:?} failed:\n{}", o.stderr);
}

/// One unit in the last place of `dtype` at `x`.
fn ulp(dtype: FloatType, x: f64) -> f64 {
    let mant = match dtype {
        FloatType::BF16 => 7,
        FloatType::F16 => 10,
        FloatType::F32 => 23,
    };
    let e = if x == 0.0 {
        -126
    } else {
        (x.abs().log2().floor() as i32).max(-126)
    };
    2f64.powi(e - mant)
}

/// Runs a config of fixtures/methods-case/mergekit from that folder (as mergekit was run) into `out`.
fn run_config(name: &str, out: &Path, extra: &[&str]) {
    run_config_of(&case(), name, out, extra);
}

/// Runs a config of `case`/mergekit from that folder into `out`.
fn run_config_of(case: &Path, name: &str, out: &Path, extra: &[&str]) {
    let dir = case.join("mergekit");
    let mut args = vec!["-q", "run", name, "--out", s(out)];
    args.extend_from_slice(extra);
    ok_in(&dir, &args);
}

/// How an output compares with mergekit's.
#[derive(Debug)]
struct Comparison {
    /// The largest difference, in ulps of the output dtype at mergekit's value.
    max_ulp: f64,
    /// The largest difference, in ulps of the output dtype at the inputs' magnitude there (large
    /// `max_ulp` only where the result cancels to near zero).
    max_scale_ulp: f64,
    /// Elements outside one ulp of the output dtype plus mergekit's own float32 rounding.
    outside: usize,
}

/// Compares an output with mergekit's: same names, shapes and dtypes; each element within one ulp of the
/// output dtype, plus mergekit's own float32 rounding (it computes in f32, we exactly): 8 f32 ulps of
/// the largest input at that element, which matters only where the result cancels to far below its
/// inputs. Counts the elements outside that (sparsifying methods could differ at a top-k threshold).
fn compare_with_mergekit(got: &Path, expected: &Path) -> usize {
    compare_outputs(&case(), &["sft", "ft_a", "ft_b", "ft_c"], got, expected).outside
}

/// [`compare_with_mergekit`] for the models `inputs` of `case`.
fn compare_outputs(case: &Path, inputs: &[&str], got: &Path, expected: &Path) -> Comparison {
    let g = load(got);
    let w = load(expected);
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    let inputs: Vec<Tensors> = inputs.iter().map(|m| load(&case.join(m))).collect();
    let mut c = Comparison {
        max_ulp: 0.0,
        max_scale_ulp: 0.0,
        outside: 0,
    };
    for (name, (wt, wshape, wv)) in &w {
        let (gt, gshape, gv) = &g[name];
        assert_eq!(gt, wt, "{name}: dtype");
        assert_eq!(gshape, wshape, "{name}: shape");
        for (i, (a, b)) in gv.iter().zip(wv).enumerate() {
            let scale = inputs
                .iter()
                .filter_map(|m| m.get(name).filter(|t| t.2.len() == wv.len()))
                .map(|t| t.2[i].abs())
                .fold(b.abs(), f64::max);
            let tol = ulp(*wt, *b) + 8.0 * ulp(FloatType::F32, scale);
            c.max_ulp = c.max_ulp.max((a - b).abs() / ulp(*wt, *b));
            c.max_scale_ulp = c.max_scale_ulp.max((a - b).abs() / ulp(*wt, scale));
            if (a - b).abs() > tol {
                c.outside += 1;
            }
        }
    }
    c
}

#[test]
fn mergekit_configs_match_mergekits_outputs() {
    let d = tempfile::tempdir().unwrap();
    for name in [
        "linear",
        "task_arithmetic",
        "slerp",
        "nuslerp",
        "model_stock",
        "passthrough",
        "ties",
        "breadcrumbs",
    ] {
        let out = d.path().join(name);
        run_config(&format!("{name}.yml"), &out, &[]);
        // Sparsifying methods included: equal magnitudes at the threshold are kept as torch sorts them.
        let outside = compare_with_mergekit(&out, &case().join("expected").join(name));
        assert_eq!(
            outside, 0,
            "{name}: {outside} elements differ from mergekit's"
        );
        let config =
            std::fs::read_to_string(case().join("mergekit").join(format!("{name}.yml"))).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
            config,
            "{name}: the output holds the config"
        );
    }
}

/// DARE's mask of model `model` for tensor `name` (the documented counter-based draw of (seed 0, tensor,
/// model, element) with probability `density`) and its one rescale factor ‖δ‖₁ / ‖kept δ‖₁, δ as mergekit
/// computes it (float32); no rescale where either norm is below 1e-7, as the spec says.
fn dare_mask_and_rescale(
    name: &str,
    model: usize,
    density: f64,
    x: &[f64],
    b: &[f64],
) -> (Vec<bool>, f64) {
    let stream = stream_key(0, name, model);
    let threshold = probability_threshold(density);
    let mask: Vec<bool> = (0..x.len())
        .map(|i| bernoulli_keep(stream, i as u64, threshold))
        .collect();
    let (mut l1, mut l1_kept) = (0.0, 0.0);
    for i in 0..x.len() {
        let delta = ((x[i] - b[i]) as f32).abs() as f64;
        l1 += delta;
        if mask[i] {
            l1_kept += delta;
        }
    }
    let f = if l1 < 1e-7 || l1_kept < 1e-7 {
        1.0
    } else {
        l1 / l1_kept
    };
    (mask, f)
}

fn case2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/methods-case2")
}

/// Every model of fixtures/methods-case2 (for the tolerance's input scale).
const CASE2_MODELS: [&str; 8] = [
    "base", "ft_a", "ft_b", "ft_c", "ft_d", "mm_base", "mm_a", "mm_b",
];

/// The Gemma 3 case: a bf16 base, fine-tunes in bf16 (embeddings frozen), f16, f32 and bf16 in 2 shards,
/// a multimodal checkpoint; TIES with per-model gradients and filters, a negative weight, λ and
/// normalize off; task arithmetic with a negative weight; configs without `dtype` (each tensor computed
/// and written in its inputs' promoted dtype), with only `dtype: bfloat16` or `float16` (mergekit computes
/// task vectors in 16 bits, operation by operation). Every element within the tolerance: no threshold tie
/// is counted apart, because none differs.
#[test]
fn gemma3_configs_in_mixed_dtypes_match_mergekits_outputs() {
    let d = tempfile::tempdir().unwrap();
    let mut report = String::new();
    for name in [
        "ties",
        "ties_promoted",
        "ties_all_bf16",
        "ties_f16",
        "task_arithmetic",
        "task_arithmetic_bf16",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "model_stock_filter_wise",
        "slerp",
        "slerp_bf16",
        "nuslerp",
        "nuslerp_rows",
        "linear",
        "linear_no_normalize",
        "linear_bf16",
        "passthrough",
        "passthrough_mixed",
        "mm_ties",
        "mm_linear",
    ] {
        let out = d.path().join(name);
        run_config_of(&case2(), &format!("{name}.yml"), &out, &[]);
        let c = compare_outputs(
            &case2(),
            &CASE2_MODELS,
            &out,
            &case2().join("expected").join(name),
        );
        report.push_str(&format!(
            "{name}: max {:.1} ulp at the value, {:.2} ulp at the inputs' magnitude\n",
            c.max_ulp, c.max_scale_ulp
        ));
        assert_eq!(c.outside, 0, "{name}: {c:?}");
    }
    eprint!("{report}");
}

#[test]
fn without_dtype_keys_each_tensor_takes_its_inputs_promoted_dtype() {
    let d = tempfile::tempdir().unwrap();
    for (name, want) in [
        // bf16, f16 and f32 inputs: float32, whatever the base's dtype.
        ("ties_promoted", FloatType::F32),
        // Only bf16 inputs: bfloat16.
        ("ties_all_bf16", FloatType::BF16),
        // Only `dtype`: that dtype.
        ("linear_bf16", FloatType::BF16),
    ] {
        let out = d.path().join(name);
        run_config_of(&case2(), &format!("{name}.yml"), &out, &[]);
        assert!(load(&out).values().all(|t| t.0 == want), "{name}");
    }
    // A passthrough keeps each tensor's own: its source's.
    let out = d.path().join("p");
    run_config_of(&case2(), "passthrough_mixed.yml", &out, &[]);
    let got = load(&out);
    assert_eq!(got["model.layers.0.mlp.up_proj.weight"].0, FloatType::F32); // ft_c's layer 4
    assert_eq!(got["model.layers.2.mlp.up_proj.weight"].0, FloatType::BF16); // the base's layer 0
    assert_eq!(
        got["model.layers.2.mlp.up_proj.weight"].2,
        load(&case2().join("base"))["model.layers.0.mlp.up_proj.weight"].2
    );
}

/// mergekit computes Model Stock and NuSLERP in a 16-bit `dtype` operation by operation; gemma-merge
/// merges the inputs as loaded in that dtype exactly and rounds once. The two stay within a few ulps of
/// the inputs' magnitude (measured: 2 for model_stock_bf16, 3 for nuslerp_bf16).
#[test]
fn model_stock_and_nuslerp_in_bfloat16_stay_within_a_few_ulps_of_mergekits() {
    let d = tempfile::tempdir().unwrap();
    let inputs: Vec<Tensors> = ["base", "ft_a", "ft_b", "ft_c", "ft_d"]
        .iter()
        .map(|m| load(&case2().join(m)))
        .collect();
    for name in ["model_stock_bf16", "nuslerp_bf16"] {
        let out = d.path().join(name);
        run_config_of(&case2(), &format!("{name}.yml"), &out, &[]);
        let (got, want) = (load(&out), load(&case2().join("expected").join(name)));
        let mut worst: f64 = 0.0;
        for (t, (_, _, w)) in &want {
            let g = &got[t].2;
            for i in 0..w.len() {
                let scale = inputs.iter().map(|m| m[t].2[i].abs()).fold(0.0, f64::max);
                worst = worst.max((g[i] - w[i]).abs() / ulp(FloatType::BF16, scale));
            }
        }
        assert!(worst <= 4.0, "{name}: {worst} bf16 ulps");
        assert!(worst > 0.0, "{name}: now exact: tighten the comparison");
    }
}

#[test]
fn passthrough_on_gemma3_writes_the_layer_count_and_each_layers_kind() {
    let d = tempfile::tempdir().unwrap();
    let kinds = |m: &str| -> Vec<serde_json::Value> {
        let c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case2().join(m).join("config.json")).unwrap(),
        )
        .unwrap();
        c["layer_types"].as_array().unwrap().clone()
    };
    let (base, ft_c) = (kinds("base"), kinds("ft_c"));
    // passthrough: base 0..3, then ft_c 2..5; passthrough_mixed: ft_c 4..6, then base 0..2.
    for (name, want) in [
        ("passthrough", [&base[0..3], &ft_c[2..5]].concat()),
        ("passthrough_mixed", [&ft_c[4..6], &base[0..2]].concat()),
    ] {
        let out = d.path().join(name);
        run_config_of(&case2(), &format!("{name}.yml"), &out, &[]);
        let got: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(got["num_hidden_layers"], want.len(), "{name}");
        assert_eq!(got["layer_types"].as_array().unwrap(), &want, "{name}");
    }
    // Not the base's pattern: output layer 3 is ft_c's layer 2, a full-attention layer.
    assert_eq!(ft_c[2], "full_attention");
    assert_eq!(base[3], "sliding_attention");
}

#[test]
fn a_native_ties_step_on_gemma3_gives_the_mergekit_configs_bytes() {
    let d = tempfile::tempdir().unwrap();
    let c = case2();
    let recipe = format!(
        "output: out\nbase: base\ndtype: bfloat16\nmodels:\n  base: {}\n  ft_a: {}\n  ft_b: {}\n  ft_c: {}\n  ft_d: {}\nsteps:\n  - name: t\n    method: ties\n    models: [ft_a, ft_b, ft_c, ft_d]\n    weights: [[1.0, 0.5], 0.8, -0.4, [{{filter: embed, value: 0.2}}, {{value: [0.3, 0.9, 0.6]}}]]\n    density: [[{{filter: mlp, value: [0.3, 0.7]}}, {{value: 0.5}}], 0.6, [{{filter: self_attn, value: 0.9}}, {{value: 0.4}}], 0.5]\n    lambda: 1.3\n    normalize: false\n",
        s(&c.join("base")),
        s(&c.join("ft_a")),
        s(&c.join("ft_b")),
        s(&c.join("ft_c")),
        s(&c.join("ft_d"))
    );
    let path = d.path().join("recipe.yaml");
    std::fs::write(&path, recipe).unwrap();
    ok_in(d.path(), &["-q", "run", s(&path)]);
    let mk = d.path().join("mk");
    run_config_of(&c, "ties.yml", &mk, &[]);
    assert!(weights_of(&d.path().join("out")) == weights_of(&mk));
    let cmp = compare_outputs(&c, &CASE2_MODELS, &mk, &c.join("expected/ties"));
    assert_eq!(cmp.outside, 0, "{cmp:?}");
}

/// DARE on the Gemma 3 case (2 models, f32 and sharded bf16): the documented mask, one rescale factor
/// per model and tensor, about `density` kept, the same bytes again, other bytes for another seed.
#[test]
fn dare_on_gemma3_keeps_about_density_with_one_rescale_factor_per_tensor() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dare");
    run_config_of(&case2(), "dare_linear.yml", &out, &[]);
    let again = d.path().join("again");
    run_config_of(&case2(), "dare_linear.yml", &again, &["--threads", "1"]);
    assert!(
        weights_of(&out) == weights_of(&again),
        "same seed, same bytes"
    );
    let other = d.path().join("other");
    run_config_of(&case2(), "dare_linear.yml", &other, &["--seed", "3"]);
    assert!(weights_of(&out) != weights_of(&other), "another seed");
    for name in ["dare_ties"] {
        let (a, b) = (d.path().join("t1"), d.path().join("t2"));
        run_config_of(&case2(), &format!("{name}.yml"), &a, &[]);
        run_config_of(&case2(), &format!("{name}.yml"), &b, &["--threads", "1"]);
        assert!(weights_of(&a) == weights_of(&b), "{name}");
    }

    let got = load(&out);
    let base = load(&case2().join("base"));
    let models = [("ft_c", 0.7, 0.3), ("ft_d", 0.3, 0.6)];
    let fts: Vec<Tensors> = models.iter().map(|m| load(&case2().join(m.0))).collect();
    let mut kept = [0usize; 2];
    let mut total = 0usize;
    for (name, (_, _, v)) in &got {
        let b = &base[name].2;
        let mut want: Vec<f64> = b.clone();
        for (k, &(_, w, density)) in models.iter().enumerate() {
            let x = &fts[k][name].2;
            let (mask, f) = dare_mask_and_rescale(name, k, density, x, b);
            for i in 0..v.len() {
                if mask[i] {
                    want[i] += w * f * (x[i] - b[i]);
                }
            }
            kept[k] += mask.iter().filter(|&&m| m).count();
        }
        total += v.len();
        for i in 0..v.len() {
            assert!(
                (v[i] - want[i]).abs() <= ulp(FloatType::F32, want[i]),
                "{name}[{i}]: {} vs {}",
                v[i],
                want[i]
            );
        }
    }
    for (k, &(m, _, density)) in models.iter().enumerate() {
        let frac = kept[k] as f64 / total as f64;
        assert!((frac - density).abs() < 0.01, "{m}: kept {frac}");
    }
}

#[test]
fn passthrough_writes_the_layer_count_and_each_layers_kind() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("p");
    run_config("passthrough.yml", &out, &[]);
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(case().join("expected/passthrough/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got["num_hidden_layers"], 6);
    assert_eq!(got["layer_types"], want["layer_types"]);
    // Layers 0..3 of ft_a, then 1..4 of ft_b: output layer 3 is ft_b's layer 1, bit for bit.
    let out_t = load(&out);
    let b = load(&case().join("ft_b"));
    let name = "self_attn.q_proj.weight";
    assert_eq!(
        out_t[&format!("model.layers.3.{name}")].2,
        b[&format!("model.layers.1.{name}")].2
    );
    // ft_b's layer 1 is a full-attention layer (Gemma 2 alternates from sliding): so is output layer 3.
    assert_eq!(got["layer_types"][3], "full_attention");
}

/// Writes a recipe into `dir` whose model aliases point at the fixtures.
fn native_recipe(dir: &Path, body: &str) -> PathBuf {
    native_recipe_on(dir, "sft", body)
}

/// [`native_recipe`] with another recipe `base`.
fn native_recipe_on(dir: &Path, base: &str, body: &str) -> PathBuf {
    let c = case();
    let text = format!(
        "output: out\nbase: {base}\nmodels:\n  sft: {}\n  ft_a: {}\n  ft_b: {}\n  ft_c: {}\n{body}",
        s(&c.join("sft")),
        s(&c.join("ft_a")),
        s(&c.join("ft_b")),
        s(&c.join("ft_c"))
    );
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn weights_of(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn native_steps_give_the_same_bytes_as_the_mergekit_configs() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("ties", "  - {name: t, method: ties, models: [ft_a, ft_b, ft_c], weights: [1.0, 0.8, 0.5], density: [0.5, 0.6, 0.4]}\n"),
        ("breadcrumbs", "  - {name: b, method: breadcrumbs, models: [ft_a, ft_b], weights: [0.5, 0.5], density: [0.8, 0.7], gamma: [0.05, 0.02]}\n"),
        ("model_stock", "  - {name: m, method: model_stock, models: [ft_a, ft_b, ft_c]}\n"),
        ("nuslerp", "  - {name: n, method: nuslerp, models: [ft_a, ft_c], weights: [1.0, 2.0]}\n"),
        ("task_arithmetic", "  - {name: t, method: task_arithmetic, models: [ft_a, ft_b, ft_c], weights: [0.6, 0.4, 0.3], lambda: 0.9}\n"),
        ("slerp", "  - {name: s, method: weight_slerp, models: [ft_b], t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]}\n"),
    ];
    for (name, step) in cases {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // The configs' out_dtype, and their base (the reference every weighted sum is evaluated against).
        let (dtype, base) = match name {
            "task_arithmetic" => ("bfloat16", "sft"),
            "slerp" => ("bfloat16", "ft_a"),
            _ => ("float32", "sft"),
        };
        let recipe = native_recipe_on(&dir, base, &format!("dtype: {dtype}\nsteps:\n{step}"));
        ok_in(&dir, &["-q", "run", s(&recipe)]);
        let mk = d.path().join(format!("{name}-mk"));
        run_config(&format!("{name}.yml"), &mk, &[]);
        assert!(
            weights_of(&dir.join("out")) == weights_of(&mk),
            "{name}: native step and mergekit config differ"
        );
    }
}

#[test]
fn sparsifying_merges_are_byte_identical_for_any_thread_count() {
    let d = tempfile::tempdir().unwrap();
    for name in ["ties", "breadcrumbs", "dare_linear", "model_stock"] {
        let one = d.path().join(format!("{name}-1"));
        let two = d.path().join(format!("{name}-2"));
        let dir = case().join("mergekit");
        ok_in(
            &dir,
            &[
                "-q",
                "--threads",
                "1",
                "run",
                &format!("{name}.yml"),
                "--out",
                s(&one),
            ],
        );
        ok_in(
            &dir,
            &[
                "-q",
                "--threads",
                "2",
                "run",
                &format!("{name}.yml"),
                "--out",
                s(&two),
            ],
        );
        assert!(weights_of(&one) == weights_of(&two), "{name}");
    }
}

#[test]
fn dare_keeps_about_density_with_one_rescale_factor_per_tensor() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dare");
    run_config("dare_linear.yml", &out, &[]);
    let again = d.path().join("dare-again");
    run_config("dare_linear.yml", &again, &[]);
    assert!(
        weights_of(&out) == weights_of(&again),
        "same seed, same bytes"
    );
    let other = d.path().join("dare-seed");
    run_config("dare_linear.yml", &other, &["--seed", "7"]);
    assert!(
        weights_of(&out) != weights_of(&other),
        "another seed, another mask"
    );

    let got = load(&out);
    let base = load(&case().join("sft"));
    let a = load(&case().join("ft_a"));
    let (mut kept_total, mut n_total) = (0usize, 0usize);
    for (name, (_, _, v)) in &got {
        let (b, x) = (&base[name].2, &a[name].2);
        let (mask, f) = dare_mask_and_rescale(name, 0, 0.3, x, b);
        let kept = mask.iter().filter(|&&k| k).count();
        // Every element is θ_b + f·δ where kept, θ_b elsewhere, with one factor f per tensor, rounded once.
        for i in 0..v.len() {
            let want = if mask[i] {
                b[i] + f * (x[i] - b[i])
            } else {
                b[i]
            };
            assert!(
                (v[i] - want).abs() <= 0.5 * ulp(FloatType::F32, want),
                "{name}[{i}]: {} vs {want}",
                v[i]
            );
        }
        kept_total += kept;
        n_total += v.len();
        if v.len() >= 4096 {
            let frac = kept as f64 / v.len() as f64;
            assert!((frac - 0.3).abs() < 0.03, "{name}: kept {frac}");
        }
    }
    let frac = kept_total as f64 / n_total as f64;
    assert!((frac - 0.3).abs() < 0.005, "kept {frac} of all elements");
}

#[test]
fn ties_of_emas_then_liti_equals_the_steps_run_one_by_one() {
    let d = tempfile::tempdir().unwrap();
    let one = d.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    let emas = "  - {name: e1, method: ema, models: [ft_a, ft_b], decay: 0.5}\n  - {name: e2, method: ema, models: [ft_b, ft_c], decay: 0.5}\n  - {name: e3, method: ema, models: [ft_c, ft_a], decay: 0.5}\n";
    let recipe = native_recipe(
        &one,
        &format!("dtype: float32\nsteps:\n{emas}  - {{name: t, method: ties, models: [e1, e2, e3], weights: [1.0, 0.8, 0.5], density: 0.5}}\n  - {{name: w, method: liti, model: t, eta: 0.5}}\n"),
    );
    ok_in(&one, &["-q", "run", s(&recipe)]);

    // The same, one step at a time: the EMAs saved (f32), TIES of the saved ones, LITI by hand.
    let two = d.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    let recipe = native_recipe(
        &two,
        &format!("dtype: float32\nsteps:\n{emas}  - {{name: t, method: ties, models: [e1, e2, e3], weights: [1.0, 0.8, 0.5], density: 0.5}}\n"),
    );
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("decay: 0.5}\n", "decay: 0.5, save: SAVE}\n");
    let text = text
        .replacen("SAVE", "e1", 1)
        .replacen("SAVE", "e2", 1)
        .replacen("SAVE", "e3", 1);
    std::fs::write(&recipe, text).unwrap();
    ok_in(&two, &["-q", "run", s(&recipe)]);
    let ties = load(&two.join("out"));
    let base = load(&case().join("sft"));
    let got = load(&one.join("out"));
    for (name, (_, _, v)) in &got {
        for i in 0..v.len() {
            let want = 0.5 * base[name].2[i] + 0.5 * ties[name].2[i];
            let tol = 2.0 * ulp(FloatType::F32, want.abs().max(base[name].2[i].abs()));
            assert!(
                (v[i] - want).abs() <= tol,
                "{name}[{i}]: {} vs {want}",
                v[i]
            );
        }
    }
}

#[test]
fn gradients_and_filters_apply_per_layer_in_native_recipes() {
    // The linear config's ft_c weight (mlp: gradient 0.5 → 2.0 over the layers; elsewhere 1.0), natively.
    let d = tempfile::tempdir().unwrap();
    let recipe = native_recipe(
        d.path(),
        "dtype: bfloat16\nsteps:\n  - name: l\n    method: linear\n    models: [ft_a, ft_b, ft_c]\n    weights: [3.0, 1.0, [{filter: mlp, value: [0.5, 2.0]}, {value: 1.0}]]\n",
    );
    ok_in(d.path(), &["-q", "run", s(&recipe)]);
    let mk = d.path().join("mk");
    run_config("linear.yml", &mk, &[]);
    assert!(weights_of(&d.path().join("out")) == weights_of(&mk));
}

/// Runs a config written into `dir` from `dir`; returns the result and whether `out` exists after.
fn config_error(dir: &Path, text: &str, env: &[(&str, &Path)]) -> (Out, bool) {
    std::fs::write(dir.join("config.yml"), text).unwrap();
    let out = dir.join("out-error");
    let o = gm_in(dir, &["run", "config.yml", "--out", "out-error"], env);
    (o, out.exists())
}

#[test]
fn config_errors_name_the_key_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let c = case();
    let models = format!(
        "base_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        s(&c.join("sft")),
        s(&c.join("ft_a"))
    );
    let cases = [
        (format!("merge_method: frankenmerge\n{models}"), "config.yml:1:15", "unknown or unsupported merge_method `frankenmerge`"),
        (format!("merge_method: ties\n{models}tokenizer_source: union\n"), "config.yml:6:19", "tokenizer_source `union`"),
        (format!("merge_method: ties\n{models}tokenizer: {{source: base}}\n"), "config.yml:6:1", "unknown field `tokenizer`"),
        (format!("merge_method: ties\n{models}parameters: {{lamda: 0.5}}\n"), "config.yml:6:21", "unknown parameter `lamda`"),
        (format!("merge_method: ties\nbase_model: {}\nmodels:\n  - model: ../nowhere/ft_x\n    parameters: {{weight: 1.0}}\n", s(&c.join("sft"))), "config.yml:4:12", "model `../nowhere/ft_x` not found"),
        (format!("merge_method: passthrough\nmodels:\n  - model: {}\n  - model: {}\n", s(&c.join("ft_a")), s(&c.join("ft_b"))), "config.yml:1:15", "passthrough copies one model, got 2"),
    ];
    for (text, at, msg) in &cases {
        let (o, written) = config_error(d.path(), text, &[]);
        assert_eq!(o.code, 2, "{text}\n{}", o.stderr);
        assert!(
            o.stderr.contains(at) && o.stderr.contains(msg),
            "want {at} {msg}, got {}",
            o.stderr
        );
        assert!(!written, "{text}: wrote output");
        assert_eq!(o.stderr.lines().count(), 1, "one line: {}", o.stderr);
    }
    // A config without --out.
    let o = gm_in(d.path(), &["run", "config.yml"], &[]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("--out"), "{}", o.stderr);
}

#[test]
fn hub_ids_resolve_in_the_local_cache_and_name_the_folder_when_missing() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("hub");
    for (id, src) in [("org--base", "sft"), ("org--tuned", "ft_a")] {
        let snap = cache.join(format!("models--{id}/snapshots/0123abcd"));
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(case().join(src).join(f), snap.join(f)).unwrap();
        }
        std::fs::create_dir_all(cache.join(format!("models--{id}/refs"))).unwrap();
        std::fs::write(cache.join(format!("models--{id}/refs/main")), "0123abcd").unwrap();
    }
    let text = "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/tuned@0123abcd\n    parameters: {weight: 0.5}\ndtype: float32\n";
    std::fs::write(d.path().join("c.yml"), text).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let o = gm_in(d.path(), &["-q", "run", "c.yml", "--out", "out"], &env);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let card = std::fs::read_to_string(d.path().join("out/README.md")).unwrap();
    // Hub ids, and only they, are the card's `base_model` (the Hub's list form for merges).
    assert!(
        card.starts_with("---\nbase_model:\n- org/base\n- org/tuned\nbase_model_relation: merge\n"),
        "{card}"
    );
    // The merge itself: base + 0.5·(ft_a − base).
    let got = load(&d.path().join("out"));
    let (b, a) = (load(&case().join("sft")), load(&case().join("ft_a")));
    let name = "model.layers.2.mlp.up_proj.weight";
    for i in 0..got[name].2.len() {
        let want = b[name].2[i] + 0.5 * (a[name].2[i] - b[name].2[i]);
        assert!((got[name].2[i] - want).abs() <= ulp(FloatType::F32, want));
    }

    let (o, written) = config_error(
        d.path(),
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/absent\n    parameters: {weight: 0.5}\n",
        &env,
    );
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("models--org--absent"), "{}", o.stderr);
    assert!(!written);
}

#[test]
fn a_local_base_is_not_written_as_the_cards_base_model() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ties");
    run_config("ties.yml", &out, &[]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let front_matter = card.split("---").nth(1).unwrap();
    assert!(!front_matter.contains("base_model:"), "{card}");
    // The merged models are listed by name, never by a local path.
    assert!(
        card.contains("- `sft` (base) — a local checkpoint\n"),
        "{card}"
    );
    for m in ["ft_a", "ft_b", "ft_c"] {
        assert!(
            card.contains(&format!("- `{m}` — a local checkpoint\n")),
            "{card}"
        );
    }
    assert!(!card.contains("../") && !card.contains("/work"), "{card}");
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The SLERP pair of recipe.md, written out: coefficients of a and b.
fn slerp_pair(a: &[f64], b: &[f64], lambda: f64) -> (f64, f64) {
    let (na, nb) = (dot(a, a).sqrt(), dot(b, b).sqrt());
    if na == 0.0 || nb == 0.0 {
        return (1.0 - lambda, lambda);
    }
    let omega = (dot(a, b) / (na * nb)).clamp(-1.0, 1.0).acos();
    if omega.sin() < 1e-6 {
        return (1.0 - lambda, lambda);
    }
    (
        ((1.0 - lambda) * omega).sin() / omega.sin(),
        (lambda * omega).sin() / omega.sin(),
    )
}

#[test]
fn per_row_and_per_column_angles_match_explicit_evaluation() {
    let d = tempfile::tempdir().unwrap();
    let recipe = native_recipe(
        d.path(),
        "dtype: float32\nsteps:\n  - {name: r, method: nuslerp, models: [ft_a, ft_c], weights: [1.0, 2.0], nuslerp_flatten: false, save: rows}\n  - {name: c, method: nuslerp, models: [ft_a, ft_c], weights: [1.0, 2.0], nuslerp_flatten: false, nuslerp_row_wise: true, save: cols}\n  - {name: m, method: model_stock, models: [ft_a, ft_b, ft_c], filter_wise: true}\n  - {name: out, method: linear, models: [r, c, m], weights: [1, 1, 1]}\n",
    );
    ok_in(d.path(), &["-q", "run", s(&recipe)]);
    let (rows, cols) = (load(&d.path().join("rows")), load(&d.path().join("cols")));
    let base = load(&case().join("sft"));
    let fts: Vec<Tensors> = ["ft_a", "ft_b", "ft_c"]
        .iter()
        .map(|m| load(&case().join(m)))
        .collect();
    let name = "model.layers.1.mlp.gate_proj.weight"; // [160, 64]
    let (r, c) = (160, 64);
    let b = &base[name].2;
    let delta = |k: usize, i: usize| fts[k][name].2[i] - b[i];
    let check = |got: f64, want: f64, what: &str| {
        let tol = ulp(FloatType::F32, want) + 8.0 * ulp(FloatType::F32, 0.1);
        assert!((got - want).abs() <= tol, "{what}: {got} vs {want}");
    };
    // Rows: one angle per row of 64.
    for row in [0, 17, 159] {
        let idx: Vec<usize> = (row * c..(row + 1) * c).collect();
        let a: Vec<f64> = idx.iter().map(|&i| delta(0, i)).collect();
        let z: Vec<f64> = idx.iter().map(|&i| delta(2, i)).collect();
        let (ca, cz) = slerp_pair(&a, &z, 2.0 / 3.0);
        for (j, &i) in idx.iter().enumerate() {
            check(rows[name].2[i], b[i] + ca * a[j] + cz * z[j], "row");
        }
    }
    // Columns (row_wise): one angle per vector along the first dimension.
    for col in [0, 31, 63] {
        let idx: Vec<usize> = (0..r).map(|k| k * c + col).collect();
        let a: Vec<f64> = idx.iter().map(|&i| delta(0, i)).collect();
        let z: Vec<f64> = idx.iter().map(|&i| delta(2, i)).collect();
        let (ca, cz) = slerp_pair(&a, &z, 2.0 / 3.0);
        for (j, &i) in idx.iter().enumerate() {
            check(cols[name].2[i], b[i] + ca * a[j] + cz * z[j], "column");
        }
    }
}

/// Records the total a merge announces and what its advances add up to.
#[derive(Default)]
struct Counted(std::sync::Mutex<(u64, u64)>);

impl gemma_merge::progress::Progress for Counted {
    fn start(&self, _: &str, total: u64, _: gemma_merge::progress::Unit) {
        self.0.lock().unwrap().0 = total;
    }
    fn advance(&self, n: u64) {
        self.0.lock().unwrap().1 += n;
    }
}

/// The plan of case 2's `ties_all_bf16` mergekit config (paths made absolute), its output in `d`.
fn ties_all_bf16_plan(d: &Path) -> gemma_merge::recipe::Plan {
    let c = case2();
    let text = std::fs::read_to_string(c.join("mergekit/ties_all_bf16.yml"))
        .unwrap()
        .replace("../", &format!("{}/", s(&c)));
    let config = d.join("ties_all_bf16.yml");
    std::fs::write(&config, text).unwrap();
    gemma_merge::recipe::Plan::load(&config, Some(&d.join("out")), None).unwrap()
}

/// The dry run's estimate leaves out what the streaming selections' windows hold (a few MiB in practice);
/// its bound adds their whole budget, and only where a tensor is past the in-memory sort's cap.
#[test]
fn dry_run_bounds_the_selection_windows_apart_from_its_estimate() {
    use gemma_merge::executor::Prepared;
    let d = tempfile::tempdir().unwrap();
    let mut plan = ties_all_bf16_plan(d.path());
    let sorted = Prepared::new(&plan).unwrap().summary();
    assert_eq!(sorted.peak_memory_bound, sorted.peak_memory_estimate);
    plan.torch_order_cap = 0;
    let streamed = Prepared::new(&plan).unwrap().summary();
    assert_eq!(
        streamed.peak_memory_bound - streamed.peak_memory_estimate,
        gemma_merge::selection::WINDOW_CAP as u64 * 24,
        "the windows' budget: 16 bytes per entry and half as much again to sort"
    );
    // Nothing sorted in memory then: the estimate is lower by the sort's buffer.
    assert!(streamed.peak_memory_estimate < sorted.peak_memory_estimate);
}

/// Past `torch_order_cap` elements a tensor is sparsified by the streaming rank selection instead of an
/// in-memory sort: equal magnitudes at the threshold are then kept by flat index, not in torch's order.
/// On bf16 fine-tunes (ties_all_bf16) that changes which of them are kept, and nothing else: every element
/// that differs from mergekit's has, in some model, exactly that model's threshold magnitude.
#[test]
fn past_the_sort_cap_only_threshold_ties_differ_from_mergekit() {
    use gemma_merge::executor::Prepared;
    let d = tempfile::tempdir().unwrap();
    let c = case2();
    let expected = load(&c.join("expected/ties_all_bf16"));
    let base = load(&c.join("base"));
    let models: Vec<Tensors> = ["ft_a", "ft_d"].iter().map(|m| load(&c.join(m))).collect();
    let mut differing = [0usize; 2];
    for (k, cap) in [gemma_merge::selection::TORCH_ORDER_CAP, 0]
        .into_iter()
        .enumerate()
    {
        let mut plan = ties_all_bf16_plan(d.path());
        plan.torch_order_cap = cap;
        let counted = Counted::default();
        let merged = Prepared::new(&plan)
            .unwrap()
            .run_in_memory(&counted)
            .unwrap()
            .remove(0);
        if cap > 0 {
            // The in-memory sort counts as the two passes the streaming selection usually makes.
            let (total, done) = *counted.0.lock().unwrap();
            assert_eq!(done, total, "progress adds up");
        }
        for (spec, bytes) in &merged.tensors {
            let ft = FloatType::from_dtype(spec.dtype).unwrap();
            let mut got = vec![0f32; spec.shape.iter().product()];
            ft.decode(bytes, &mut got);
            let want = &expected[&spec.name].2;
            // Each model's threshold: the ⌊0.5·n⌋-th largest |δ| (density 0.5 for both), δ as mergekit
            // computes it: in bf16, the inputs' dtype.
            let b = &base[&spec.name].2;
            let mags: Vec<Vec<f32>> = models
                .iter()
                .map(|m| {
                    m[&spec.name]
                        .2
                        .iter()
                        .zip(b)
                        .map(|(x, y)| FloatType::BF16.round_f64(x - y).abs())
                        .collect()
                })
                .collect();
            let thresholds: Vec<f32> = mags
                .iter()
                .map(|a| {
                    let mut a = a.clone();
                    a.sort_by(|x, y| y.total_cmp(x));
                    a[(a.len() / 2).max(1) - 1]
                })
                .collect();
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                if g as f64 != w {
                    differing[k] += 1;
                    let at_threshold = mags.iter().zip(&thresholds).any(|(m, &t)| m[i] == t);
                    assert!(at_threshold, "cap {cap}: {}[{i}]: {g} vs {w}", spec.name);
                }
            }
        }
    }
    eprintln!(
        "past the cap: {} elements differ, all at a threshold",
        differing[1]
    );
    assert_eq!(differing[0], 0, "in torch's order, nothing differs");
    assert!(differing[1] > 0, "past the cap, ties are kept by index");
}

/// A tensor past the sample size starts its top-k selections from a window of keys guessed from a
/// sample, and finds each in one pass when the rank falls inside. The merge is byte-identical to the
/// histogram passes' (windows off), for TIES (one descending rank per model) and breadcrumbs (two
/// ascending ranks per model), over bf16 fine-tunes (few distinct |δ|, each repeated: windows of one
/// key or a few) and f32 ones (all distinct). Progress adds up to what the plan announced either way.
#[test]
fn sampled_selection_windows_give_the_histogram_passes_bytes() {
    let d = tempfile::tempdir().unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        x = gemma_merge::selection::mix64(x);
        (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    // Past 16 sample sub-blocks × 2 048 × 4 elements, so that the selection samples.
    let shapes = [
        ("model.embed_tokens.weight", vec![512, 320]),
        ("model.layers.0.mlp.down_proj.weight", vec![320, 512]),
    ];
    let base: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| (0..s[0] * s[1]).map(|_| 0.1 * uniform()).collect())
        .collect();
    let drifted = |v: &[f32], u: &mut dyn FnMut() -> f32| -> Vec<f32> {
        v.iter().map(|&b| b + 0.02 * b * u()).collect()
    };
    let ft_a: Vec<Vec<f32>> = base.iter().map(|v| drifted(v, &mut uniform)).collect();
    let ft_b: Vec<Vec<f32>> = ft_a.iter().map(|v| drifted(v, &mut uniform)).collect();
    let named = |vals: &[Vec<f32>]| -> Vec<(&str, Vec<usize>, Vec<f32>)> {
        shapes
            .iter()
            .zip(vals)
            .map(|((n, s), v)| (*n, s.clone(), v.clone()))
            .collect()
    };
    let steps = [
        "  - {name: t, method: ties, models: [ft_a, ft_b], weights: [0.6, 0.4], density: [0.5, 0.3]}\n",
        "  - {name: b, method: breadcrumbs, models: [ft_a, ft_b], weights: [0.5, 0.5], density: [0.8, 0.7], gamma: [0.05, 0.02]}\n",
    ];
    for dtype in [FloatType::BF16, FloatType::F32] {
        let root = d.path().join(format!("{dtype:?}"));
        for (name, vals) in [("sft", &base), ("ft_a", &ft_a), ("ft_b", &ft_b)] {
            common::write_model(&root.join(name), dtype, &named(vals));
        }
        for step in steps {
            let recipe = root.join("recipe.yaml");
            std::fs::write(
                &recipe,
                format!(
                    "output: out\nbase: sft\nmodels:\n  sft: {}\n  ft_a: {}\n  ft_b: {}\nsteps:\n{step}",
                    s(&root.join("sft")),
                    s(&root.join("ft_a")),
                    s(&root.join("ft_b"))
                ),
            )
            .unwrap();
            let mut outputs = Vec::new();
            for windows in [true, false] {
                let mut plan =
                    gemma_merge::recipe::Plan::load(&recipe, Some(&root.join("out")), None)
                        .unwrap();
                plan.torch_order_cap = 0;
                plan.selection_windows = windows;
                let prepared = gemma_merge::executor::Prepared::new(&plan).unwrap();
                let counted = Counted::default();
                let merged = prepared.run_in_memory(&counted).unwrap().remove(0);
                let (total, done) = *counted.0.lock().unwrap();
                assert_eq!(
                    done, total,
                    "{dtype:?} {step} windows {windows}: progress adds up"
                );
                let stats = prepared.selection_stats();
                let selections = if step.contains("ties") { 2 } else { 4 } * shapes.len() as u64;
                assert_eq!(
                    stats.found_in_window + stats.histogram,
                    selections,
                    "{dtype:?} {step}: {stats:?}"
                );
                if windows {
                    // This data's windows all hold their rank.
                    assert_eq!(stats.windowed, selections, "{dtype:?} {step}: {stats:?}");
                    assert_eq!(
                        stats.found_in_window, selections,
                        "{dtype:?} {step}: {stats:?}"
                    );
                } else {
                    assert_eq!(stats.windowed + stats.found_in_window, 0, "{stats:?}");
                }
                outputs.push(merged.tensors);
            }
            assert!(
                outputs[0] == outputs[1],
                "{dtype:?} {step}: windows change the bytes"
            );
        }
    }
}
