//! mergekit's methods and configs: every config in fixtures/methods-case/mergekit against mergekit's own
//! output, native recipe steps against the same configs, DARE's reproducibility and kept fraction,
//! composition with the WARP methods, Hugging Face ids, and the errors that must write nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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
    let dir = case().join("mergekit");
    let mut args = vec!["-q", "run", name, "--out", s(out)];
    args.extend_from_slice(extra);
    ok_in(&dir, &args);
}

/// Compares an output with mergekit's: same names, shapes and dtypes; each element within one ulp of the
/// output dtype, plus mergekit's own float32 rounding (it computes in f32, we exactly): 8 f32 ulps of
/// the largest input at that element, which matters only where the result cancels to far below its
/// inputs. Returns the number of elements outside that (threshold ties of sparsifying methods).
fn compare_with_mergekit(got: &Path, expected: &Path) -> usize {
    let g = load(got);
    let w = load(expected);
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    let inputs: Vec<Tensors> = ["sft", "ft_a", "ft_b", "ft_c"]
        .iter()
        .map(|m| load(&case().join(m)))
        .collect();
    let mut outside = 0;
    for (name, (wt, wshape, wv)) in &w {
        let (gt, gshape, gv) = &g[name];
        assert_eq!(gt, wt, "{name}: dtype");
        assert_eq!(gshape, wshape, "{name}: shape");
        for (i, (a, b)) in gv.iter().zip(wv).enumerate() {
            let scale = inputs
                .iter()
                .filter_map(|m| m.get(name).map(|t| t.2[i].abs()))
                .fold(b.abs(), f64::max);
            let tol = ulp(*wt, *b) + 8.0 * ulp(FloatType::F32, scale);
            if (a - b).abs() > tol {
                outside += 1;
            }
        }
    }
    outside
}

#[test]
fn mergekit_configs_match_mergekits_outputs() {
    let d = tempfile::tempdir().unwrap();
    // (config, elements allowed outside the tolerance: threshold ties of sparsifying methods)
    for (name, ties) in [
        ("linear", 0),
        ("task_arithmetic", 0),
        ("slerp", 0),
        ("nuslerp", 0),
        ("model_stock", 0),
        ("passthrough", 0),
        ("ties", 8),
        ("breadcrumbs", 8),
    ] {
        let out = d.path().join(name);
        run_config(&format!("{name}.yml"), &out, &[]);
        let outside = compare_with_mergekit(&out, &case().join("expected").join(name));
        assert!(
            outside <= ties,
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
        // The mask is the documented counter-based draw of (seed 0, tensor, model 0, element).
        let stream = stream_key(0, name, 0);
        let threshold = probability_threshold(0.3);
        let mask: Vec<bool> = (0..v.len())
            .map(|i| bernoulli_keep(stream, i as u64, threshold))
            .collect();
        let (mut l1, mut l1_kept) = (0.0, 0.0);
        for i in 0..v.len() {
            let delta = x[i] - b[i];
            l1 += delta.abs();
            if mask[i] {
                l1_kept += delta.abs();
            }
        }
        let kept = mask.iter().filter(|&&k| k).count();
        // Every element is θ_b + f·δ where kept, θ_b elsewhere, with one factor f = ‖δ‖₁ / ‖kept‖₁ per
        // tensor, rounded once.
        // (No rescale where either norm is below 1e-7, as the spec says.)
        let f = if l1 < 1e-7 || l1_kept < 1e-7 {
            1.0
        } else {
            l1 / l1_kept
        };
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
    assert!(
        card.starts_with("---\nbase_model: \"org/base\"\n"),
        "{card}"
    );
    assert!(card.contains("- org/tuned\n"), "{card}");
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
    for m in ["../sft", "../ft_a", "../ft_b", "../ft_c"] {
        assert!(card.contains(&format!("- {m}\n")), "{card}");
    }
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
