//! The demo family (fixtures/demo, made by tools/make_demo.py): the README's main command, and what the
//! README claims about its result, with the numbers pinned.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::s;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn gm(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
        .args(args)
        .output()
        .expect("binary runs");
    assert!(
        o.status.success(),
        "gemma-merge {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = gm(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

/// Tokens scored: the first 512 of each held-out text keep the suite fast; the README's table uses all.
const MAX: &str = "512";

#[test]
fn demo_warp_merge_beats_sft_on_target_text_and_liti_stays_closer_to_sft() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo-warp");
    gm(&[
        "-q",
        "run",
        s(&root().join("recipes/demo-warp.yaml")),
        "--out",
        s(&out),
    ]);
    gm(&["verify", s(&out)]);
    let target = root().join("fixtures/demo/heldout-target.txt");
    let pretrain = root().join("fixtures/demo/heldout-pretrain.txt");
    let sft = root().join("fixtures/demo/sft");

    let ppl = |model: &Path, text: &Path| -> f64 {
        json(&[
            "eval",
            s(model),
            "--text",
            s(text),
            "--max-tokens",
            MAX,
            "--json",
        ])["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (merge_t, sft_t) = (ppl(&out, &target), ppl(&sft, &target));
    let (merge_p, sft_p) = (ppl(&out, &pretrain), ppl(&sft, &pretrain));
    // The merge (LITI η = 0.5) learned the target text: far lower perplexity than sft...
    assert!(merge_t < 0.5 * sft_t, "merge {merge_t} vs sft {sft_t}");
    // ... while forgetting little of the pre-training text.
    assert!(merge_p < 1.1 * sft_p, "merge {merge_p} vs sft {sft_p}");
    // Pinned (bf16 weights, f32 forward pass; the first 512 tokens).
    assert!(close(sft_t, 202.113, 1e-3), "sft target perplexity {sft_t}");
    assert!(
        close(merge_t, 46.6705, 1e-3),
        "merge target perplexity {merge_t}"
    );

    // KL to sft along the front: LITI η = 0.3 stays much closer to sft than the SLERP merge (η = 1).
    let front = json(&[
        "front",
        s(&root().join("recipes/demo-warp.yaml")),
        "--text",
        s(&target),
        "--max-tokens",
        MAX,
        "--eta",
        "0.3,1.0",
        "--no-policies",
        "--json",
    ]);
    let (kl_liti, kl_slerp) = (
        front[0]["kl"].as_f64().unwrap(),
        front[1]["kl"].as_f64().unwrap(),
    );
    assert!(
        kl_liti < 0.2 * kl_slerp,
        "KL(LITI 0.3) {kl_liti} vs KL(SLERP) {kl_slerp}"
    );
    assert!(close(kl_liti, 0.15297, 0.02), "{kl_liti}");
    assert!(close(kl_slerp, 1.62115, 0.02), "{kl_slerp}");
}

#[test]
fn demo_generate_prints_text() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    gm(&[
        "-q",
        "run",
        s(&root().join("recipes/demo-warp.yaml")),
        "--out",
        s(&out),
    ]);
    let g = json(&[
        "generate",
        s(&out),
        "--prompt",
        "This License",
        "--max-new-tokens",
        "20",
        "--json",
    ]);
    let text = g["text"].as_str().unwrap();
    assert_eq!(g["token_ids"].as_array().unwrap().len(), 20);
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() > 20,
        "{text:?}"
    );
}
