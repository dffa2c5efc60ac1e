//! End-to-end tests of `gemma-merge run / verify / inspect` against the float64 reference outputs in
//! fixtures/merge-case (copied from shared/golden), plus hand-derived cases and error cases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gemma_merge::format::writer::{ModelWriter, TensorSpec};
use gemma_merge::format::{FloatType, Model};

mod common;
use common::s;
use common::{gm, load, write_model, Out};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/merge-case")
}

fn ok(args: &[&str]) -> Out {
    let o = gm(args);
    assert_eq!(
        o.code, 0,
        "gemma-merge {args:?} failed:\n{}\n{}",
        o.stdout, o.stderr
    );
    o
}

/// Half a unit in the last place of `dtype` at `x`.
fn half_ulp(dtype: FloatType, x: f64) -> f64 {
    let mant = match dtype {
        FloatType::BF16 => 7,
        FloatType::F16 => 10,
        FloatType::F32 => 23,
    };
    let min_exp = match dtype {
        FloatType::F16 => -14,
        _ => -126,
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    0.5 * 2f64.powi(e - mant)
}

/// Asserts `got` equals the f64 reference within half an ulp of its dtype plus 1e-5 relative.
fn assert_matches_reference(got: &Path, expected: &Path, dtype: FloatType) {
    let g = load(got);
    let w = load(expected);
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    for (name, (_, wshape, wv)) in &w {
        let (gt, gshape, gv) = &g[name];
        assert_eq!(*gt, dtype, "{name}: dtype");
        assert_eq!(gshape, wshape, "{name}: shape");
        for (i, (a, b)) in gv.iter().zip(wv).enumerate() {
            let tol = half_ulp(dtype, *b) * (1.0 + 1e-9) + 1e-5 * b.abs();
            assert!(
                (a - b).abs() <= tol,
                "{name}[{i}]: got {a}, expected {b} (tolerance {tol})"
            );
        }
    }
}

fn run_golden(recipe: &str, out: &Path) {
    let r = fixtures().join("recipes").join(recipe);
    ok(&["-q", "run", s(&r), "--out", s(out)]);
}

#[test]
fn golden_warp_round_matches_float64_reference() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("warp");
    run_golden("warp.yaml", &out);
    assert_matches_reference(
        &out,
        &fixtures().join("expected/warp.safetensors"),
        FloatType::BF16,
    );
}

#[test]
fn golden_linear_matches_float64_reference() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("linear");
    run_golden("linear.yaml", &out);
    assert_matches_reference(
        &out,
        &fixtures().join("expected/linear.safetensors"),
        FloatType::F16,
    );
}

#[test]
fn golden_slerp_per_tensor_matches_float64_reference() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("slerp");
    run_golden("slerp-tensor.yaml", &out);
    assert_matches_reference(
        &out,
        &fixtures().join("expected/slerp-tensor.safetensors"),
        FloatType::F32,
    );
}

#[test]
fn golden_liti_front_writes_one_model_per_eta() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("front");
    run_golden("front.yaml", &out);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["eta-0.0", "eta-0.5", "eta-1.0"]);
    for eta in ["0.0", "0.5", "1.0"] {
        let expected = fixtures().join(format!("expected/front/eta-{eta}.safetensors"));
        assert_matches_reference(&out.join(format!("eta-{eta}")), &expected, FloatType::F32);
    }
    // η = 0 is the base itself, bit for bit (bf16 values are exact in f32).
    let base = load(&fixtures().join("sft"));
    for (name, (_, _, v)) in load(&out.join("eta-0.0")) {
        assert_eq!(v, base[&name].2, "{name}");
    }
    ok(&["verify", s(&out)]);
}

#[test]
fn output_folder_has_config_card_and_manifest() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("warp");
    run_golden("warp.yaml", &out);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["model_type"], "gemma2");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    // No base_model: the inputs are local checkpoints, not Hugging Face ids (tests/cli.rs pins cards).
    assert!(card.starts_with("---\nlibrary_name: transformers\ntags:\n- merge\n- gemma-merge\n- ema\n- liti\n- slerp\n- warp\n---\n"), "{card}");
    assert!(
        card.contains("**SLERP**"),
        "the card says what the recipe did"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("recipe.yaml")).unwrap(),
        std::fs::read_to_string(fixtures().join("recipes/warp.yaml")).unwrap(),
        "the recipe is beside the weights"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merge-manifest.json")).unwrap())
            .unwrap();
    let files: Vec<&str> = manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            "model.safetensors",
            "config.json",
            "README.md",
            "recipe.yaml"
        ]
    );
    assert_eq!(manifest["step"], "warp");
    assert_eq!(
        manifest["inputs"].as_array().unwrap().len(),
        8,
        "sft (2 shards) + 6 checkpoints"
    );
    let text = std::fs::read_to_string(fixtures().join("recipes/warp.yaml")).unwrap();
    assert_eq!(manifest["recipe"]["text"], text);
    // The safetensors header carries only {"format": "pt"} as metadata.
    let m = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&m[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"], serde_json::json!({"format": "pt"}));
    // No temporary folder is left beside the output.
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("warp")]);
}

#[test]
fn output_is_byte_identical_for_any_thread_count() {
    let d = tempfile::tempdir().unwrap();
    let r = fixtures().join("recipes/warp.yaml");
    let (a, b) = (d.path().join("t1"), d.path().join("t2"));
    ok(&["-q", "--threads", "1", "run", s(&r), "--out", s(&a)]);
    ok(&["-q", "--threads", "2", "run", s(&r), "--out", s(&b)]);
    for f in ["model.safetensors", "config.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    // The card differs only in its title, the folder's name.
    let card = |p: &Path| {
        std::fs::read_to_string(p.join("README.md"))
            .unwrap()
            .replace("# t1", "# t")
            .replace("# t2", "# t")
    };
    assert_eq!(card(&a), card(&b));
}

#[test]
fn verify_fails_after_one_byte_changes() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lin");
    run_golden("linear.yaml", &out);
    let o = ok(&["verify", s(&out)]);
    assert!(o.stdout.contains("4 files match"), "{}", o.stdout);
    let p = out.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let i = bytes.len() - 100;
    bytes[i] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let o = gm(&["verify", s(&out)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("model.safetensors: SHA-256"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.starts_with("mismatch:") && o.stderr.contains("error: "),
        "{}",
        o.stderr
    );
}

#[test]
fn hash_inputs_records_each_input_file_checksum() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lin");
    let r = fixtures().join("recipes/linear.yaml");
    ok(&["-q", "run", s(&r), "--out", s(&out), "--hash-inputs"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merge-manifest.json")).unwrap())
            .unwrap();
    let inputs = manifest["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 5, "sft's 2 shards + 3 checkpoints");
    for i in inputs {
        let p = PathBuf::from(i["path"].as_str().unwrap());
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(i["size"], bytes.len() as u64);
        use sha2::Digest;
        let want: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(i["sha256"], want, "{}", p.display());
    }
}

#[test]
fn existing_output_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lin");
    run_golden("linear.yaml", &out);
    std::fs::write(out.join("README.md"), "old").unwrap();
    let r = fixtures().join("recipes/linear.yaml");
    let o = gm(&["run", s(&r), "--out", s(&out)]);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("exists (pass --force to replace it)"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(out.join("README.md")).unwrap(),
        "old"
    );
    ok(&["-q", "run", s(&r), "--out", s(&out), "--force"]);
    assert_ne!(
        std::fs::read_to_string(out.join("README.md")).unwrap(),
        "old",
        "--force replaced the folder"
    );
    ok(&["verify", s(&out)]);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("warp");
    let r = fixtures().join("recipes/warp.yaml");
    let o = ok(&["run", s(&r), "--out", s(&out), "--dry-run"]);
    for needle in [
        "run_a",
        "ema",
        "slerp",
        "liti",
        "tensors: 46 (46 merged, 0 copied)",
        "passes over the inputs: 2",
        "peak memory estimate",
    ] {
        assert!(
            o.stdout.contains(needle),
            "missing {needle:?} in\n{}",
            o.stdout
        );
    }
    assert!(
        std::fs::read_dir(d.path()).unwrap().next().is_none(),
        "dry run wrote something"
    );
    let o = ok(&["run", s(&r), "--out", s(&out), "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["tensors"], 46);
    assert!(v["bytes_to_write"].as_u64().unwrap() > 490_000);
}

#[test]
fn json_summary_has_the_contract_keys() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lin");
    let r = fixtures().join("recipes/linear.yaml");
    let o = ok(&["run", s(&r), "--out", s(&out), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["output"], s(&out));
    assert_eq!(v["tensors"], 46);
    let on_disk: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(v["bytes_written"], on_disk);
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);
}

#[test]
fn inspect_reports_tensors_and_parameters() {
    let o = ok(&["inspect", s(&fixtures().join("sft")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 46);
    // 384·64 embeddings + 4 layers · (4·64 norms + 3·64·160 mlp + (128+64+64)·64 qkv + 64·128 o) + 64
    let per_layer = 4 * 64 + 3 * 64 * 160 + (128 + 64 + 64) * 64 + 64 * 128;
    assert_eq!(v["parameters"], 384 * 64 + 4 * per_layer + 64);
    assert_eq!(v["config"]["model_type"], "gemma2");
    let emb = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(emb["dtype"], "BF16");
    assert_eq!(emb["shape"], serde_json::json!([384, 64]));
}

#[test]
fn shipped_recipes_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let d = tempfile::tempdir().unwrap();
            let o = ok(&["run", s(&p), "--out", s(&d.path().join("o")), "--dry-run"]);
            assert!(o.stdout.contains("peak memory estimate"), "{}", o.stdout);
            n += 1;
        }
    }
    assert!(n >= 4, "expected the example recipes, found {n}");
}

// ---------------------------------------------------------------------------------------------------
// Hand-built models

/// A deterministic pseudo-random vector.
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

const NAMES: [(&str, usize); 4] = [
    ("model.embed_tokens.weight", 48),
    ("model.layers.0.mlp.up_proj.weight", 40),
    ("model.layers.0.self_attn.q_proj.weight", 24),
    ("model.norm.weight", 8),
];

/// A base and `n` policies near it (f32), in `root/base`, `root/p1`, ...
fn family(root: &Path, n: usize) {
    let base: Vec<(&str, Vec<usize>, Vec<f32>)> = NAMES
        .iter()
        .enumerate()
        .map(|(i, (name, len))| (*name, vec![*len], noise(100 + i as u64, *len, 0.5)))
        .collect();
    write_model(&root.join("base"), FloatType::F32, &base);
    for p in 1..=n {
        let t: Vec<(&str, Vec<usize>, Vec<f32>)> = base
            .iter()
            .enumerate()
            .map(|(i, (name, shape, v))| {
                let d = noise((p * 1000 + i) as u64, v.len(), 0.05);
                (
                    *name,
                    shape.clone(),
                    v.iter().zip(d).map(|(a, b)| a + b).collect(),
                )
            })
            .collect();
        write_model(&root.join(format!("p{p}")), FloatType::F32, &t);
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// SLERP of two vectors the explicit way (recipe.md), in f64.
fn slerp_explicit(a: &[f64], b: &[f64], lambda: f64) -> Vec<f64> {
    let (na, nb) = (dot(a, a).sqrt(), dot(b, b).sqrt());
    let (ca, cb) = if na == 0.0 || nb == 0.0 {
        (1.0 - lambda, lambda)
    } else {
        let omega = (dot(a, b) / (na * nb)).clamp(-1.0, 1.0).acos();
        if omega.sin() < 1e-6 {
            (1.0 - lambda, lambda)
        } else {
            (
                ((1.0 - lambda) * omega).sin() / omega.sin(),
                (lambda * omega).sin() / omega.sin(),
            )
        }
    };
    a.iter().zip(b).map(|(x, y)| ca * x + cb * y).collect()
}

#[test]
fn three_policy_slerp_chain_with_layer_angle_matches_explicit_evaluation() {
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 3);
    let recipe = d.path().join("r.yaml");
    std::fs::write(
        &recipe,
        "output: out\ndtype: float32\nbase: base\nsteps:\n  - name: s\n    method: slerp\n    models: [p1, p2, p3]\n    weights: [1, 2, 3]\n",
    )
    .unwrap();
    ok(&["-q", "run", s(&recipe)]);
    let got = load(&d.path().join("out"));
    let base = load(&d.path().join("base"));
    let ps: Vec<_> = (1..=3)
        .map(|p| load(&d.path().join(format!("p{p}"))))
        .collect();
    // Groups: the two layer-0 tensors share one angle; the others are alone.
    let groups: Vec<Vec<&str>> = vec![
        vec!["model.embed_tokens.weight"],
        vec![
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ],
        vec!["model.norm.weight"],
    ];
    let lambdas = [2.0 / 3.0, 3.0 / 6.0];
    for g in groups {
        let flat = |m: &BTreeMap<String, (FloatType, Vec<usize>, Vec<f64>)>| -> Vec<f64> {
            g.iter().flat_map(|n| m[*n].2.clone()).collect()
        };
        let b = flat(&base);
        let deltas: Vec<Vec<f64>> = ps
            .iter()
            .map(|p| flat(p).iter().zip(&b).map(|(x, y)| x - y).collect())
            .collect();
        let mut r = deltas[0].clone();
        for (k, lambda) in lambdas.iter().enumerate() {
            r = slerp_explicit(&r, &deltas[k + 1], *lambda);
        }
        let want: Vec<f64> = b.iter().zip(&r).map(|(x, y)| x + y).collect();
        let have = flat(&got);
        for (i, (h, w)) in have.iter().zip(&want).enumerate() {
            assert!(
                (h - w).abs() <= half_ulp(FloatType::F32, *w) * 1.001 + 1e-12,
                "{g:?}[{i}]: {h} vs {w}"
            );
        }
    }
}

#[test]
fn small_shard_size_splits_output_with_an_index() {
    let d = tempfile::tempdir().unwrap();
    let sft = fixtures().join("sft");
    let recipe = d.path().join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "output: out\nshard_size: 100KB\nbase: {0}\nsteps:\n  - name: l\n    method: liti\n    model: {1}\n    eta: 0.25\n",
            s(&sft),
            s(&fixtures().join("run_b/step-300"))
        ),
    )
    .unwrap();
    ok(&["-q", "run", s(&recipe)]);
    let out = d.path().join("out");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 46);
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() >= 5, "{shards:?}");
    for sh in &shards {
        let len = std::fs::metadata(out.join(sh)).unwrap().len();
        assert!(len <= 100_000 + 8192, "{sh} is {len} bytes");
    }
    assert_eq!(index["metadata"]["total_size"], 493_696);
    // Same values as an unsharded run (dtype defaults to the base's: bf16).
    let loaded = load(&out);
    let b = load(&sft);
    let r = load(&fixtures().join("run_b/step-300"));
    for (name, (ft, _, v)) in &loaded {
        assert_eq!(*ft, FloatType::BF16);
        for (i, x) in v.iter().enumerate() {
            let want = 0.75 * b[name].2[i] + 0.25 * r[name].2[i];
            assert!(
                (x - want).abs() <= half_ulp(FloatType::BF16, want) * 1.0001,
                "{name}[{i}]"
            );
        }
    }
    ok(&["verify", s(&out)]);
}

#[test]
fn integer_tensors_are_copied_and_extra_tensors_are_refused_unless_ignored() {
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 1);
    // Add an integer tensor to the base only, and an extra float tensor to the policy.
    let base_dir = d.path().join("base");
    let base = load(&base_dir);
    std::fs::remove_dir_all(&base_dir).unwrap();
    std::fs::create_dir_all(&base_dir).unwrap();
    let mut specs: Vec<TensorSpec> = base
        .iter()
        .map(|(n, (_, sh, _))| TensorSpec {
            name: n.clone(),
            dtype: safetensors::Dtype::F32,
            shape: sh.clone(),
        })
        .collect();
    specs.push(TensorSpec {
        name: "position_ids".into(),
        dtype: safetensors::Dtype::I64,
        shape: vec![3],
    });
    let mut w = ModelWriter::create(&base_dir, specs, u64::MAX).unwrap();
    for (_, _, v) in base.values() {
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let mut b = Vec::new();
        FloatType::F32.encode(&f, &mut b);
        w.write(&b).unwrap();
    }
    let ids: Vec<u8> = [7i64, 8, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
    w.write(&ids).unwrap();
    w.finish().unwrap();

    let recipe = d.path().join("r.yaml");
    std::fs::write(&recipe, "output: out\nbase: base\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 0.5\n").unwrap();
    ok(&["-q", "run", s(&recipe)]);
    let m = Model::open(&d.path().join("out")).unwrap();
    assert_eq!(m.data(m.get("position_ids").unwrap()), &ids[..]);

    let p1 = d.path().join("p1");
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = load(&p1)
        .into_iter()
        .map(|(n, (_, sh, v))| (n, sh, v.into_iter().map(|x| x as f32).collect()))
        .collect();
    t.push(("lm_head.weight".into(), vec![4], vec![1.0; 4]));
    std::fs::remove_dir_all(&p1).unwrap();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t
        .iter()
        .map(|(n, sh, v)| (n.as_str(), sh.clone(), v.clone()))
        .collect();
    write_model(&p1, FloatType::F32, &refs);
    let o = gm(&["run", s(&recipe), "--force"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("tensor `lm_head.weight`") && o.stderr.contains("extra_tensors: ignore"),
        "{}",
        o.stderr
    );
    std::fs::write(&recipe, "output: out\nbase: base\nextra_tensors: ignore\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 0.5\n").unwrap();
    ok(&["-q", "run", s(&recipe), "--force"]);
}

// ---------------------------------------------------------------------------------------------------
// Errors: a clear message, exit code 1 or 2, nothing written

fn recipe_error(body: &str) -> Out {
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 2);
    let recipe = d.path().join("recipe.yaml");
    std::fs::write(&recipe, body).unwrap();
    let o = gm(&["run", s(&recipe)]);
    assert!(
        !d.path().join("out").exists(),
        "an invalid recipe wrote output"
    );
    o
}

const GOOD_HEAD: &str = "output: out\nbase: base\nsteps:\n";

#[test]
fn recipe_errors_name_the_line_and_column() {
    let cases: &[(&str, &str, &str)] = &[
        ("  - name: s\n    method: slerp\n    models: [p1, p2]\n    tt: 0.5\n", "recipe.yaml:7:5", "unknown field `tt`"),
        ("  - name: s\n    method: merge\n    models: [p1, p2]\n", "recipe.yaml:5:13", "unknown method `merge`"),
        ("  - name: s\n    method: slerp\n    models: [p1, later]\n  - name: later\n    method: liti\n    model: s\n    eta: 0.5\n", "recipe.yaml:6:18", "defined below"),
        ("  - name: s\n    method: slerp\n    models: [p1, nowhere]\n", "recipe.yaml:6:18", "`nowhere` is not a step, an alias, or an existing path"),
        ("  - name: e\n    method: ema\n    models: [p1, p2]\n    decay: 1.5\n", "recipe.yaml:7:12", "`decay` must be in (0, 1]"),
        ("  - name: s\n    method: slerp\n    models: [p1, p2]\n    t: 2\n", "recipe.yaml:7:8", "`t` must be in [0, 1]"),
        ("  - name: s\n    method: slerp\n    models: [p1, p2]\n    weights: [1, -1]\n", "recipe.yaml:7:18", "slerp weights must be positive"),
        ("  - name: e\n    method: ema\n    models: [p1, p2]\n    decay: 0.1\n    steps: [20, 10]\n", "recipe.yaml:8:17", "strictly increasing"),
        ("  - name: s\n    method: liti\n    model: p1\n    eta: 0.5\n    t: 0.3\n", "recipe.yaml:8:8", "`t` is not a field of method `liti`"),
        ("  - name: a\n    method: liti\n    model: p1\n    eta: 0.5\n  - name: b\n    method: liti\n    model: p2\n    eta: 0.5\n", "recipe.yaml:4:11", "step `a` is not used"),
        ("  - name: s\n    method: slerp\n    models: [p1]\n", "recipe.yaml:6:13", "at least 2 models"),
        ("  - name: s\n    method: liti\n    model: p1\n", "recipe.yaml:4:5", "needs `eta`"),
        ("  - name: s\n    method: slerp\n    models: p1\n", "recipe.yaml:6:13", ""),
        ("  - name: s\n    method: linear\n    models: [p1, p2]\n    weights: [1, -1]\n", "recipe.yaml:7:14", "sum to 0"),
    ];
    for (steps, at, msg) in cases {
        let o = recipe_error(&format!("{GOOD_HEAD}{steps}"));
        assert_eq!(o.code, 2, "{steps}\n{}", o.stderr);
        assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
        assert!(o.stderr.contains(at), "expected {at} in {:?}", o.stderr);
        assert!(o.stderr.contains(msg), "expected {msg:?} in {:?}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    }
    // A list of η anywhere but the output step.
    let o = recipe_error(&format!("{GOOD_HEAD}  - name: f\n    method: liti\n    model: p1\n    eta: [0.1, 0.2]\n  - name: g\n    method: liti\n    model: f\n    eta: 0.5\n"));
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("recipe.yaml:7:10") && o.stderr.contains("only on the output step"),
        "{}",
        o.stderr
    );
    // Unknown top-level key.
    let o = recipe_error("output: out\nbase: base\nouptut_step: x\nsteps: []\n");
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("recipe.yaml:3:1") && o.stderr.contains("unknown field `ouptut_step`"),
        "{}",
        o.stderr
    );
    // Invalid YAML.
    let o = recipe_error("steps: [\n");
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("recipe.yaml:1:"), "{}", o.stderr);
}

#[test]
fn eta_outside_unit_interval_warns_and_extrapolates() {
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 1);
    let recipe = d.path().join("r.yaml");
    std::fs::write(&recipe, "output: out\ndtype: float32\nbase: base\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 1.5\n").unwrap();
    let o = ok(&["run", s(&recipe)]);
    assert!(
        o.stderr.contains("warning:") && o.stderr.contains("extrapolating"),
        "{}",
        o.stderr
    );
    let (b, p, out) = (
        load(&d.path().join("base")),
        load(&d.path().join("p1")),
        load(&d.path().join("out")),
    );
    for (name, (_, _, v)) in out {
        for (i, x) in v.iter().enumerate() {
            let want = -0.5 * b[&name].2[i] + 1.5 * p[&name].2[i];
            assert!(
                (x - want).abs() <= half_ulp(FloatType::F32, want) * 1.001,
                "{name}[{i}]"
            );
        }
    }
}

#[test]
fn input_errors_name_tensor_and_file_and_write_nothing() {
    // Shape mismatch.
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 1);
    let recipe = d.path().join("r.yaml");
    std::fs::write(&recipe, "output: out\nbase: base\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 0.5\n").unwrap();
    let p1 = d.path().join("p1");
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = load(&p1)
        .into_iter()
        .map(|(n, (_, sh, v))| (n, sh, v.into_iter().map(|x| x as f32).collect()))
        .collect();
    t[3] = (t[3].0.clone(), vec![2, 4], t[3].2.clone());
    std::fs::remove_dir_all(&p1).unwrap();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t
        .iter()
        .map(|(n, sh, v)| (n.as_str(), sh.clone(), v.clone()))
        .collect();
    write_model(&p1, FloatType::F32, &refs);
    let o = gm(&["run", s(&recipe)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("tensor `model.norm.weight` has shape [2, 4]")
            && o.stderr.contains("[8] in the base"),
        "{}",
        o.stderr
    );
    assert!(!d.path().join("out").exists());

    // NaN in an input: found while streaming; the staged folder is removed.
    let mut t2 = t.clone();
    t2[3].1 = vec![8];
    t2[3].2[5] = f32::NAN;
    std::fs::remove_dir_all(&p1).unwrap();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t2
        .iter()
        .map(|(n, sh, v)| (n.as_str(), sh.clone(), v.clone()))
        .collect();
    write_model(&p1, FloatType::F32, &refs);
    let o = gm(&["run", s(&recipe)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("tensor `model.norm.weight`")
            && o.stderr.contains("non-finite")
            && o.stderr.contains("element 5"),
        "{}",
        o.stderr
    );
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.starts_with(".out") || n == "out"),
        "{left:?}"
    );
    std::fs::write(&recipe, "output: out\nbase: base\nallow_nonfinite: true\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 0.5\n").unwrap();
    ok(&["-q", "run", s(&recipe)]);

    // Missing tensor.
    std::fs::remove_dir_all(&p1).unwrap();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t2[..3]
        .iter()
        .map(|(n, sh, v)| (n.as_str(), sh.clone(), v.clone()))
        .collect();
    write_model(&p1, FloatType::F32, &refs);
    let o = gm(&["run", s(&recipe), "--force"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("tensor `model.norm.weight` of the base is missing from")
            && o.stderr.contains("p1"),
        "{}",
        o.stderr
    );

    // A truncated file: the header promises more bytes than there are.
    let f = p1.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 3]).unwrap();
    let o = gm(&["run", s(&recipe), "--force"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("model.safetensors: invalid safetensors file"),
        "{}",
        o.stderr
    );
    // Garbage instead of a header.
    std::fs::write(&f, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    let o = gm(&["inspect", s(&f)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("invalid safetensors file"),
        "{}",
        o.stderr
    );
}

#[test]
fn output_inside_an_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    family(d.path(), 1);
    let recipe = d.path().join("r.yaml");
    std::fs::write(&recipe, "output: base/merged\nbase: base\nsteps:\n  - name: l\n    method: liti\n    model: p1\n    eta: 0.5\n").unwrap();
    let o = gm(&["run", s(&recipe)]);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("lies inside the input model `base`"),
        "{}",
        o.stderr
    );
    // Replacing a folder that holds an input is refused even with --force.
    let o = gm(&["run", s(&recipe), "--out", s(d.path()), "--force"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(d.path().join("base/model.safetensors").exists());
}

#[test]
fn bad_flags_exit_with_code_2() {
    assert_eq!(gm(&["run"]).code, 2);
    assert_eq!(gm(&["frobnicate"]).code, 2);
    let o = gm(&["--threads", "0", "inspect", s(&fixtures().join("sft"))]);
    assert_eq!(o.code, 2);
    let o = gm(&["run", "/nonexistent/recipe.yaml"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("/nonexistent/recipe.yaml"),
        "{}",
        o.stderr
    );
}

/// SLERP of two multimodal Gemma 3 checkpoints (language model under `language_model.model.`, a vision
/// tower, a projector): one angle per language-model layer, one per vision-tower layer, every other tensor
/// alone. Each tensor's coefficients (c₁, c₂ with out − base = c₁·δ₁ + c₂·δ₂) are recovered by least squares
/// and must be equal across a layer and equal to the explicit f64 SLERP of the layer's flattened deltas.
/// The processor's side files and the chat template come along.
#[test]
fn slerp_of_multimodal_gemma3_uses_one_angle_per_layer() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let mm = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/family/gemma3-mm-tiny");
    for e in std::fs::read_dir(&mm).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    let side = [
        (
            "preprocessor_config.json",
            "{\"image_processor_type\": \"Gemma3ImageProcessor\"}",
        ),
        ("processor_config.json", "{\"image_seq_length\": 4}"),
        (
            "chat_template.jinja",
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        ),
    ];
    for (name, text) in side {
        std::fs::write(base.join(name), text).unwrap();
    }
    for (p, seed) in [("p1", "1"), ("p2", "2")] {
        ok(&[
            "-q",
            "synth",
            "--from",
            s(&base),
            "--drift",
            "0.05",
            "--seed",
            seed,
            "--out",
            s(&d.path().join(p)),
        ]);
    }
    let recipe = d.path().join("r.yaml");
    std::fs::write(
        &recipe,
        "output: out\ndtype: float32\nbase: base\nsteps:\n  - name: s\n    method: slerp\n    models: [p1, p2]\n",
    )
    .unwrap();
    ok(&["-q", "run", s(&recipe)]);
    let out_dir = d.path().join("out");
    for (name, text) in side {
        assert_eq!(
            std::fs::read_to_string(out_dir.join(name)).unwrap(),
            text,
            "{name}"
        );
    }
    let (out, b) = (load(&out_dir), load(&base));
    let (p1, p2) = (load(&d.path().join("p1")), load(&d.path().join("p2")));
    let delta = |m: &BTreeMap<String, (FloatType, Vec<usize>, Vec<f64>)>, n: &str| -> Vec<f64> {
        m[n].2.iter().zip(&b[n].2).map(|(x, y)| x - y).collect()
    };
    // The groups, by hand.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in b.keys() {
        let key = [
            "language_model.model.layers.",
            "vision_tower.vision_model.encoder.layers.",
            "vision_tower.encoder.layers.",
        ]
        .iter()
        .find_map(|p| {
            let rest = name.strip_prefix(p)?;
            let n = rest.split('.').next()?;
            Some(format!("{p}{n}."))
        })
        .unwrap_or_else(|| name.clone());
        groups.entry(key).or_default().push(name.clone());
    }
    let lm_layers = groups
        .keys()
        .filter(|k| k.starts_with("language_model.model.layers."))
        .count();
    assert_eq!(lm_layers, 7);
    assert!(groups.contains_key("vision_tower.encoder.layers.0."));
    assert!(groups
        .keys()
        .any(|k| k.starts_with("multi_modal_projector.")));
    for (key, names) in &groups {
        // The explicit f64 SLERP (λ = 1/2) of the group's flattened deltas.
        let d1: Vec<f64> = names.iter().flat_map(|n| delta(&p1, n)).collect();
        let d2: Vec<f64> = names.iter().flat_map(|n| delta(&p2, n)).collect();
        let omega = (dot(&d1, &d2) / (dot(&d1, &d1) * dot(&d2, &d2)).sqrt())
            .clamp(-1.0, 1.0)
            .acos();
        let c = (0.5 * omega).sin() / omega.sin();
        for n in names {
            let (x, y, r) = (delta(&p1, n), delta(&p2, n), delta(&out, n));
            // Least squares for r ≈ c₁x + c₂y.
            let (xx, yy, xy, xr, yr) = (
                dot(&x, &x),
                dot(&y, &y),
                dot(&x, &y),
                dot(&x, &r),
                dot(&y, &r),
            );
            let det = xx * yy - xy * xy;
            if det <= 1e-12 * xx * yy || x.len() < 16 {
                continue; // too small to recover two coefficients from f32-rounded outputs
            }
            let (c1, c2) = ((xr * yy - yr * xy) / det, (yr * xx - xr * xy) / det);
            assert!(
                (c1 - c).abs() < 2e-4 && (c2 - c).abs() < 2e-4,
                "{key}: {n}: ({c1}, {c2}) vs {c}"
            );
        }
        // And every element is the explicit value, rounded once to f32.
        let want = slerp_explicit(&d1, &d2, 0.5);
        let got: Vec<f64> = names.iter().flat_map(|n| out[n].2.clone()).collect();
        let base_flat: Vec<f64> = names.iter().flat_map(|n| b[n].2.clone()).collect();
        for ((g, w), b0) in got.iter().zip(&want).zip(&base_flat) {
            assert!(
                (g - (b0 + w)).abs() <= half_ulp(FloatType::F32, b0 + w) * 1.001 + 1e-12,
                "{key}"
            );
        }
    }
    // The merged checkpoint is a Gemma 3 multimodal model the forward pass reads.
    ok(&["eval", s(&out_dir), "--token-ids", "2,5,9,11", "--json"]);
}
