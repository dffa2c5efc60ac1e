//! `gemma-merge synth` through the built binary: real shapes, determinism, drift, refusals.

use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Small model with the 2b layout but tiny widths (hidden test-only flags), for fast checks.
fn small(dir: &Path, extra: &[&str]) {
    let mut args = vec![
        "-q",
        "synth",
        "--shape",
        "2b",
        "--layers",
        "2",
        "--vocab-size",
        "300",
        "--hidden-size",
        "64",
        "--intermediate-size",
        "96",
        "--out",
        p(dir),
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn inspect(dir: &Path) -> serde_json::Value {
    let out = ok(&["inspect", p(dir), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A tensor's values as f32 (bf16, f16 or f32 data).
fn values(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let d = t.data();
    match t.dtype() {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn real_2b_layer_shapes_and_published_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    ok(&[
        "synth",
        "--shape",
        "2b",
        "--layers",
        "1",
        "--vocab-size",
        "256",
        "--dtype",
        "float16",
        "--out",
        p(&out),
    ]);
    let j = inspect(&out);
    let shapes: Vec<(String, String, Vec<u64>)> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["dtype"].as_str().unwrap().to_string(),
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    let get = |n: &str| {
        shapes
            .iter()
            .find(|s| s.0 == n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .2
            .clone()
    };
    assert_eq!(shapes.len(), 13);
    assert!(shapes.iter().all(|s| s.1 == "F16"));
    assert_eq!(get("model.embed_tokens.weight"), [256, 2304]);
    assert_eq!(get("model.norm.weight"), [2304]);
    let l = "model.layers.0.";
    assert_eq!(get(&format!("{l}self_attn.q_proj.weight")), [2048, 2304]);
    assert_eq!(get(&format!("{l}self_attn.k_proj.weight")), [1024, 2304]);
    assert_eq!(get(&format!("{l}self_attn.v_proj.weight")), [1024, 2304]);
    assert_eq!(get(&format!("{l}self_attn.o_proj.weight")), [2304, 2048]);
    assert_eq!(get(&format!("{l}mlp.gate_proj.weight")), [9216, 2304]);
    assert_eq!(get(&format!("{l}mlp.up_proj.weight")), [9216, 2304]);
    assert_eq!(get(&format!("{l}mlp.down_proj.weight")), [2304, 9216]);
    for n in [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ] {
        assert_eq!(get(&format!("{l}{n}.weight")), [2304]);
    }
    assert_eq!(j["parameters"], 256 * 2304 + 2304 + 77_865_984);

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let expect = serde_json::json!({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0, "max_position_embeddings": 8192, "torch_dtype": "float16",
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&cfg[k], v, "config key {k}");
    }
    assert!(cfg.get("tie_word_embeddings").is_none());
    // Nothing is left beside the output.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    small(&a, &["--seed", "11", "--threads", "1"]);
    small(&b, &["--seed", "11", "--threads", "2"]);
    small(&c, &["--seed", "12"]);
    assert_eq!(files(&a), files(&b));
    assert_ne!(
        values(&a, "model.embed_tokens.weight"),
        values(&c, "model.embed_tokens.weight")
    );
    // Values look like N(0, 0.02) for matrices, small for norms.
    let e = values(&a, "model.layers.1.mlp.up_proj.weight");
    let rms = (e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
    assert!((rms - 0.02).abs() < 0.001, "rms {rms}");
    let n = values(&a, "model.norm.weight");
    assert!(n.iter().all(|x| x.abs() < 0.5));
}

#[test]
fn drift_adds_noise_of_the_requested_relative_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, run) = (tmp.path().join("sft"), tmp.path().join("run"));
    small(&base, &["--dtype", "float32", "--seed", "1"]);
    ok(&[
        "-q",
        "synth",
        "--from",
        p(&base),
        "--drift",
        "0.01",
        "--seed",
        "2",
        "--out",
        p(&run),
    ]);
    let (jb, jr) = (inspect(&base), inspect(&run));
    assert_eq!(jb["tensors"], jr["tensors"]);
    assert_eq!(
        std::fs::read(base.join("config.json")).unwrap(),
        std::fs::read(run.join("config.json")).unwrap()
    );
    for t in jb["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let (x, y) = (values(&base, name), values(&run, name));
        let diff: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((b - a) as f64).powi(2))
            .sum();
        let norm: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
        let rel = (diff / norm).sqrt();
        let tol = if x.len() > 10_000 { 0.0005 } else { 0.004 };
        assert!(
            (rel - 0.01).abs() < tol,
            "{name}: relative difference {rel}"
        );
    }
}

#[test]
fn refusals_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    small(&a, &[]);
    let before = files(&a);
    // An existing output is never replaced.
    let out = run(&["synth", "--shape", "2b", "--out", p(&a)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(files(&a), before);
    let b = tmp.path().join("b");
    for args in [
        vec!["synth", "--shape", "5b", "--out", p(&b)],
        vec!["synth", "--out", p(&b)],
        vec![
            "synth",
            "--shape",
            "2b",
            "--layers",
            "0",
            "--vocab-size",
            "8",
            "--drift",
            "0.1",
            "--out",
            p(&b),
        ],
        vec!["synth", "--from", p(&a), "--out", p(&b)],
        vec!["synth", "--from", p(&a), "--drift", "-1", "--out", p(&b)],
        vec![
            "synth",
            "--from",
            p(&a),
            "--drift",
            "0.1",
            "--shape",
            "2b",
            "--out",
            p(&b),
        ],
        vec![
            "synth",
            "--shape",
            "2b",
            "--vocab-size",
            "0",
            "--out",
            p(&b),
        ],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!b.exists(), "{args:?}");
    }
    // A base that is not a model is failed work (exit 1), with no output left behind.
    let out = run(&[
        "synth",
        "--from",
        p(tmp.path()),
        "--drift",
        "0.1",
        "--out",
        p(&b),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!b.exists());
}
