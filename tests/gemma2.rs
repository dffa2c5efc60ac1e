//! The Gemma 2 forward pass against transformers' golden outputs (fixtures/gemma2-tiny-A: bf16, published
//! config; -A2: the same model in f32, two shards, newer config), through the library and the binary.

use gemma_merge::progress::Silent;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use gemma_merge::evaluate;
use gemma_merge::format::{FloatType, Model};
use gemma_merge::model::sampling::{self, Sampler, SamplingParams};
use gemma_merge::model::{Config, Gemma2, Tokenizer, Weight, WeightSource};
use gemma_merge::simd::Level;
use ndarray::Array2;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

/// Models with transformers' outputs: A and A2 (given), and variants that change what A keeps fixed
/// (f16 in 3 shards with one kv head, no soft-caps, explicit layer_types; see gemma2-variants/make.py).
/// The rest of the family (fixtures/family: the shared goldens, then variants from tools/make_family.py):
/// Gemma 1 (MHA; MQA in f16 over 6 shards), Gemma 3 text (published form; transformers 5's form with
/// linear RoPE factor 8 on every 3rd layer and soft-caps; published form with pattern 2, factor 4 and an
/// untied lm_head) and Gemma 3 multimodal (`language_model.model.` and `model.language_model.` layouts).
const MODELS: [&str; 12] = [
    "gemma2-tiny-A",
    "gemma2-tiny-A2",
    "gemma2-variants/gemma2-tiny-mqa-f16",
    "gemma2-variants/gemma2-tiny-mha-nocap",
    "gemma2-variants/gemma2-tiny-layer-types",
    "family/gemma1-tiny",
    "family/gemma3-tiny",
    "family/gemma3-mm-tiny",
    "family/gemma1-mqa-f16",
    "family/gemma3-linear8-t5",
    "family/gemma3-published-untied",
    "family/gemma3-mm-t5",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

struct Golden {
    tokens: Vec<u32>,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    mean_nll: f64,
    perplexity: f64,
    logits: Array2<f32>,
}

fn id_list(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn read_logits(path: &Path) -> Array2<f32> {
    let file = Model::open(path).unwrap();
    let info = file.get("logits").expect("tensor `logits`");
    assert_eq!(info.dtype, Dtype::F32);
    let mut values = vec![0f32; info.numel()];
    FloatType::F32.decode(file.data(info), &mut values);
    Array2::from_shape_vec((info.shape[0], info.shape[1]), values).unwrap()
}

fn golden(name: &str) -> Golden {
    let dir = fixture(name);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    Golden {
        tokens: id_list(&json["tokens"]),
        prompt: id_list(&json["prompt"]),
        greedy: id_list(&json["greedy"]),
        mean_nll: json["mean_nll"].as_f64().unwrap(),
        perplexity: json["perplexity"].as_f64().unwrap(),
        logits: read_logits(&dir.join("golden.safetensors")),
    }
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
        .args(args)
        .output()
        .expect("run gemma-merge")
}

/// Runs a command that must succeed and print one JSON object.
fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", out.stdout))
}

/// Runs a command that must fail with `code` and an `error: ...` line containing `needle`, no panic.
fn run_err(args: &[&str], code: i32, needle: &str) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "{args:?}: stderr {stderr}");
    assert!(
        stderr.starts_with("error: ") || code == 2,
        "{args:?}: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

/// All tensors of a model as (dtype, shape, bytes).
fn tensors(dir: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let m = Model::open(dir).unwrap();
    m.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), m.data(t).to_vec()))
        .collect()
}

/// Writes a single-file model folder with `config.json` from `config_from`.
fn write_model(dir: &Path, config_from: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(config_from.join("config.json"), dir.join("config.json")).unwrap();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), &dir.join("model.safetensors"))
        .unwrap();
}

/// A copy of model A whose `name` is scaled by `factor` (rounded back to bf16).
fn scaled_copy(dir: &Path, name: &str, factor: f32) -> PathBuf {
    let a = fixture("gemma2-tiny-A");
    let mut ts = tensors(&a);
    let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
    let mut v = vec![0f32; t.3.len() / 2];
    FloatType::BF16.decode(&t.3, &mut v);
    v.iter_mut().for_each(|x| *x *= factor);
    t.3.clear();
    FloatType::BF16.encode(&v, &mut t.3);
    write_model(dir, &a, &ts);
    dir.to_path_buf()
}

// ---------------------------------------------------------------------------------------------- library

#[test]
fn logits_match_transformers() {
    // Under a forced level (see `every_simd_level_matches_transformers`), that level must be the one used.
    if let Ok(forced) = std::env::var("GEMMA_MERGE_SIMD") {
        let want = [Level::Portable, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|l| l.name() == forced)
            .expect("a level name");
        assert_eq!(
            gemma_merge::simd::level(),
            want.min(gemma_merge::simd::detected())
        );
    }
    for name in MODELS {
        let g = golden(name);
        let model = Gemma2::load(&fixture(name)).unwrap();
        let logits = model.forward(&g.tokens).unwrap();
        let err = max_abs_diff(&logits, &g.logits);
        eprintln!("{name}: max |logits − golden| = {err:.2e}");
        assert!(err < 1e-4, "{name}: max |logits − golden| = {err}");
    }
}

#[test]
fn perplexity_matches_transformers() {
    for name in MODELS {
        let g = golden(name);
        let model = Gemma2::load(&fixture(name)).unwrap();
        let s = evaluate::score(&model, &g.tokens, g.tokens.len()).unwrap();
        assert_eq!(s.tokens, g.tokens.len() - 1);
        assert!(
            ((s.perplexity - g.perplexity) / g.perplexity).abs() < 1e-4,
            "{name}: {} vs {}",
            s.perplexity,
            g.perplexity
        );
        assert!(
            (s.mean_nll - g.mean_nll).abs() < 1e-5,
            "{name}: {} vs {}",
            s.mean_nll,
            g.mean_nll
        );
        // Per-position log-probs are those of the golden logits.
        for (i, lp) in s.log_probs.iter().enumerate() {
            let want =
                evaluate::log_softmax_at(g.logits.row(i).as_slice().unwrap(), g.tokens[i + 1]);
            assert!((lp - want).abs() < 1e-4);
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers_past_the_window() {
    for name in MODELS {
        let g = golden(name);
        let model = Gemma2::load(&fixture(name)).unwrap();
        let c = model.config();
        if c.sliding_layers.contains(&true) {
            assert!(g.prompt.len() + g.greedy.len() > c.sliding_window, "{name}");
        }
        let mut sampler = Sampler::new(SamplingParams::default());
        let mut seen = Vec::new();
        let out = sampling::generate(&model, &g.prompt, g.greedy.len(), &mut sampler, &[], |t| {
            seen.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(out.token_ids, g.greedy, "{name}");
        assert_eq!(seen, g.greedy);
        assert_eq!(out.decode_steps, g.greedy.len() - 1);
    }
}

#[test]
fn cached_decoding_gives_the_full_pass_logits() {
    for name in MODELS {
        let g = golden(name);
        let model = Gemma2::load(&fixture(name)).unwrap();
        let c = model.config();
        let n = g.tokens.len();
        let full = model.forward(&g.tokens).unwrap();
        // One token at a time, and in uneven chunks (some longer than the window), through one cache.
        let mut uneven = vec![3, 8, 1, 5];
        uneven.push(n - uneven.iter().sum::<usize>());
        for chunks in [vec![1; n], uneven] {
            let mut cache = model.new_cache();
            let mut rows = Vec::new();
            let mut at = 0;
            for k in chunks {
                let logits = model
                    .forward_cached(&g.tokens[at..at + k], &mut cache)
                    .unwrap();
                rows.extend(logits.rows().into_iter().map(|r| r.to_vec()));
                at += k;
            }
            assert_eq!(cache.len(), n);
            // Sliding layers hold only the last W positions; full ones hold all.
            let held: Vec<usize> = c
                .sliding_layers
                .iter()
                .map(|&s| if s { c.sliding_window.min(n) } else { n })
                .collect();
            assert_eq!(cache.held_positions(), held, "{name}");
            let cached = Array2::from_shape_vec((n, full.ncols()), rows.concat()).unwrap();
            // Equal up to f32 summation order (products of 1 row and of n rows block differently). Gemma
            // 1 has no post-norms, so its residual stream grows (to ~280 in gemma1-tiny, giving 3.3e-5
            // here); all others stay below 1e-5. Inside the 1e-4 bound to transformers either way.
            let err = max_abs_diff(&cached, &full);
            assert!(err < 5e-5, "{name}: cached vs full: {err}");
        }
    }
}

#[test]
fn in_memory_weights_give_the_mapped_model_logits() {
    let dir = fixture("gemma2-tiny-A");
    let g = golden("gemma2-tiny-A");
    let mapped = Gemma2::load(&dir).unwrap();
    let config = Config::from_folder(&dir).unwrap();
    let source = Arc::new(Model::open(&dir).unwrap());
    // Every tensor decoded to f32 and held in memory: the same numbers, so the same logits.
    let mut f32_tensors = HashMap::new();
    for t in source.tensors() {
        let w = source.weight(&t.name).unwrap().unwrap();
        f32_tensors.insert(t.name.clone(), (w.shape().to_vec(), w.to_f32()));
    }
    let from_f32 = Gemma2::from_f32_tensors(config.clone(), f32_tensors).unwrap();
    assert_eq!(
        from_f32.forward(&g.tokens).unwrap(),
        mapped.forward(&g.tokens).unwrap()
    );

    // A bf16 in-memory model with one tensor changed compares with the original as a perturbed model.
    let mut weights: HashMap<String, Weight> = source
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), source.weight(&t.name).unwrap().unwrap()))
        .collect();
    let name = "model.layers.1.self_attn.v_proj.weight";
    let noisy: Vec<f32> = weights[name]
        .to_f32()
        .iter()
        .enumerate()
        .map(|(i, v)| v + ((i % 7) as f32 - 3.0) * 0.05)
        .collect();
    weights.insert(
        name.into(),
        Weight::from_values(FloatType::BF16, vec![64, 64], &noisy).unwrap(),
    );
    let perturbed = Gemma2::from_weights(config, &weights).unwrap();
    let same = evaluate::compare(&mapped, &mapped, &g.tokens, 24, &Silent).unwrap();
    assert_eq!((same.kl, same.kl_max, same.top1_agreement), (0.0, 0.0, 1.0));
    let r = evaluate::compare(&perturbed, &mapped, &g.tokens, 24, &Silent).unwrap();
    assert!(r.kl > 1e-4 && r.kl_max >= r.kl, "{r:?}");
    assert!((r.reference_perplexity - g.perplexity).abs() / g.perplexity < 1e-4);
    // The reference computed once gives the same numbers, with one window or several.
    for context in [24, 10] {
        let lockstep = evaluate::compare(&perturbed, &mapped, &g.tokens, context, &Silent).unwrap();
        let cached = evaluate::ReferenceLogits::new(&mapped, &g.tokens, context, &Silent).unwrap();
        assert_eq!(cached.bytes(), 23 * 384 * 4);
        let once = evaluate::compare_to(&perturbed, &cached, &Silent).unwrap();
        assert_eq!(once.kl_per_position, lockstep.kl_per_position);
        assert_eq!(
            (
                once.top1_agreement,
                once.perplexity,
                once.reference_perplexity
            ),
            (
                lockstep.top1_agreement,
                lockstep.perplexity,
                lockstep.reference_perplexity
            )
        );
    }
    let own = evaluate::score(&perturbed, &g.tokens, 24).unwrap();
    assert!((r.perplexity - own.perplexity).abs() / own.perplexity < 1e-9);
}

#[test]
fn windows_restart_with_bos_and_score_each_token_once() {
    let g = golden("gemma2-tiny-A");
    let model = Gemma2::load(&fixture("gemma2-tiny-A")).unwrap();
    let bos = model.config().bos_token_id;
    let s = evaluate::score(&model, &g.tokens, 10).unwrap();
    assert_eq!((s.tokens, s.windows, s.positions_run), (23, 3, 26));
    // Window 2 is <bos> + tokens 10..19: its first row predicts token 10, its rows 1.. are positions 10..18.
    let mut w2 = vec![bos];
    w2.extend_from_slice(&g.tokens[10..19]);
    let logits = model.forward(&w2).unwrap();
    let want = evaluate::log_softmax_at(logits.row(0).as_slice().unwrap(), g.tokens[10]);
    assert!((s.log_probs[9] - want).abs() < 1e-9);
    let dumped = evaluate::window_logits(&model, &g.tokens, 10).unwrap();
    assert!(
        max_abs_diff(
            &dumped.slice(ndarray::s![10..19, ..]).to_owned(),
            &logits.slice(ndarray::s![1.., ..]).to_owned()
        ) < 1e-6
    );
    // One window over everything is the plain forward pass.
    let whole = evaluate::window_logits(&model, &g.tokens, 64).unwrap();
    assert!(max_abs_diff(&whole, &g.logits) < 1e-4);
}

#[test]
fn load_errors_name_the_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = fixture("gemma2-tiny-A");
    let mut ts = tensors(&a);
    ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    write_model(&tmp.path().join("missing"), &a, &ts);
    let err = Gemma2::load(&tmp.path().join("missing"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tensor `model.layers.1.mlp.up_proj.weight` is missing")
            && err.contains("missing"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------- binary

#[test]
fn eval_json_and_dumped_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let g = golden(name);
        let dump = tmp
            .path()
            .join(format!("{}.safetensors", name.replace('/', "-")));
        let model = fixture(name);
        let v = run_json(&[
            "eval",
            model.to_str().unwrap(),
            "--token-ids",
            &csv(&g.tokens),
            "--dump-logits",
            dump.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(v["tokens"], g.tokens.len() - 1);
        assert!(
            ((v["perplexity"].as_f64().unwrap() - g.perplexity) / g.perplexity).abs() < 1e-4,
            "{name}: {v}"
        );
        assert!((v["mean_nll"].as_f64().unwrap() - g.mean_nll).abs() < 1e-5);
        assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
        // The dump: one F32 tensor `logits` [n, vocab] with {"format": "pt"}, equal to the golden logits.
        let bytes = std::fs::read(&dump).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
        let logits = read_logits(&dump);
        assert_eq!(logits.dim(), g.logits.dim());
        assert!(max_abs_diff(&logits, &g.logits) < 1e-4, "{name}");
    }
    // Windows of 10 dump one row per input position too, and text output has the same numbers.
    let g = golden("gemma2-tiny-A");
    let dump = tmp.path().join("windows.safetensors");
    let model = fixture("gemma2-tiny-A");
    let ids = csv(&g.tokens);
    let args = [
        "eval",
        model.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--context",
        "10",
    ];
    let v = run_json(
        &[
            &args[..],
            &["--json", "--dump-logits", dump.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(
        (v["tokens"].as_u64(), v["windows"].as_u64()),
        (Some(23), Some(3))
    );
    assert_eq!(read_logits(&dump).dim(), (24, 384));
    let text = String::from_utf8(run(&args).stdout).unwrap();
    assert!(
        text.contains("tokens      23")
            && text.contains(&format!(
                "perplexity  {:.4}",
                v["perplexity"].as_f64().unwrap()
            )),
        "{text}"
    );
    // --max-tokens truncates the input.
    let v = run_json(&[
        "eval",
        model.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(v["tokens"], 4);
}

#[test]
fn generate_json_matches_the_greedy_continuation() {
    for name in MODELS {
        let g = golden(name);
        let model = fixture(name);
        let v = run_json(&[
            "generate",
            model.to_str().unwrap(),
            "--token-ids",
            &csv(&g.prompt),
            "--max-new-tokens",
            &g.greedy.len().to_string(),
            "--json",
        ]);
        assert_eq!(id_list(&v["token_ids"]), g.greedy, "{name}");
        assert_eq!(v["text"], "");
        assert!(v["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(v["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    // Sampling is reproducible from the seed, and stays in range.
    let model = fixture("gemma2-tiny-A");
    let args = [
        "generate",
        model.to_str().unwrap(),
        "--token-ids",
        "2,71,294",
        "--max-new-tokens",
        "20",
    ];
    let sampled = |seed: &str| {
        let extra = [
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ];
        id_list(&run_json(&[&args[..], &extra[..]].concat())["token_ids"])
    };
    assert_eq!(sampled("5"), sampled("5"));
    assert_ne!(sampled("5"), sampled("6"));
    // Without --json the ids stream to stdout (no tokenizer here).
    let g = golden("gemma2-tiny-A");
    let out = run(&[
        "generate",
        model.to_str().unwrap(),
        "--token-ids",
        &csv(&g.prompt),
        "--max-new-tokens",
        "3",
    ]);
    assert!(out.status.success());
    // The prompt is echoed first (as ids, without its <bos>), then the continuation.
    let prompt: Vec<String> = g.prompt[1..].iter().map(|t| t.to_string()).collect();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{} 186 291 86", prompt.join(" "))
    );
}

#[test]
fn compare_same_model_bf16_vs_f32_and_a_perturbed_copy() {
    let g = golden("gemma2-tiny-A");
    let (a, a2) = (fixture("gemma2-tiny-A"), fixture("gemma2-tiny-A2"));
    let ids = csv(&g.tokens);
    let v = run_json(&[
        "compare",
        a.to_str().unwrap(),
        "--reference",
        a2.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--json",
    ]);
    assert_eq!(v["tokens"], 23);
    assert!(
        v["kl"].as_f64().unwrap() < 1e-4 && v["kl_max"].as_f64().unwrap() < 1e-3,
        "{v}"
    );
    assert_eq!(v["top1_agreement"], 1.0);
    let ga2 = golden("gemma2-tiny-A2");
    assert!(((v["perplexity"].as_f64().unwrap() - g.perplexity) / g.perplexity).abs() < 1e-4);
    assert!(
        ((v["reference_perplexity"].as_f64().unwrap() - ga2.perplexity) / ga2.perplexity).abs()
            < 1e-4
    );
    let v = run_json(&[
        "compare",
        a.to_str().unwrap(),
        "--reference",
        a.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--json",
    ]);
    assert_eq!(
        (
            v["kl"].as_f64(),
            v["kl_max"].as_f64(),
            v["top1_agreement"].as_f64()
        ),
        (Some(0.0), Some(0.0), Some(1.0))
    );

    let tmp = tempfile::tempdir().unwrap();
    // Scaling down_proj changes nothing: post_feedforward_layernorm undoes it (eps aside).
    let p = scaled_copy(
        &tmp.path().join("down"),
        "model.layers.2.mlp.down_proj.weight",
        4.0,
    );
    let v = run_json(&[
        "compare",
        p.to_str().unwrap(),
        "--reference",
        a.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--json",
    ]);
    assert!(
        v["kl"].as_f64().unwrap() < 1e-9 && v["top1_agreement"] == 1.0,
        "{v}"
    );
    // Scaling gate_proj goes through the GELU: a real change.
    let p = scaled_copy(
        &tmp.path().join("gate"),
        "model.layers.2.mlp.gate_proj.weight",
        3.0,
    );
    let v = run_json(&[
        "compare",
        p.to_str().unwrap(),
        "--reference",
        a.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--json",
    ]);
    let (kl, kl_max) = (v["kl"].as_f64().unwrap(), v["kl_max"].as_f64().unwrap());
    assert!(
        kl > 1e-4 && kl_max > kl && v["top1_agreement"].as_f64().unwrap() < 1.0,
        "{v}"
    );
    assert!(
        ((v["reference_perplexity"].as_f64().unwrap() - g.perplexity) / g.perplexity).abs() < 1e-4
    );
    let own = run_json(&["eval", p.to_str().unwrap(), "--token-ids", &ids, "--json"]);
    assert!((v["perplexity"].as_f64().unwrap() - own["perplexity"].as_f64().unwrap()).abs() < 1e-9);
    // KL(P ‖ A) differs from KL(A ‖ P): the direction is the model's against the reference's.
    let back = run_json(&[
        "compare",
        a.to_str().unwrap(),
        "--reference",
        p.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--json",
    ]);
    assert!((back["kl"].as_f64().unwrap() - kl).abs() > 1e-9);
    assert_eq!(back["top1_agreement"], v["top1_agreement"]);
}

/// A small Gemma-style tokenizer.json: BPE with byte fallback, " " → "▁", no pre-tokenizer, a
/// post-processor that prepends <bos>; specials <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>.
fn write_tokenizer(dir: &Path) {
    let specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), (6 + b).into());
    }
    let pieces = [
        "▁", "t", "h", "e", "c", "a", "s", "o", "n", "th", "the", "▁c", "at", "▁the", "▁s", "on",
    ];
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.to_string(), (262 + i).into());
    }
    let merges = ["t h", "th e", "▁ c", "a t", "▁ the", "▁ s", "o n"];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// Model A with a tokenizer, in a temporary folder.
fn model_with_tokenizer(tmp: &Path) -> PathBuf {
    let dir = tmp.join("with-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("gemma2-tiny-A").join(f), dir.join(f)).unwrap();
    }
    write_tokenizer(&dir);
    dir
}

#[test]
fn text_input_is_tokenized_with_bos_prepended() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_with_tokenizer(tmp.path());
    let tok = Tokenizer::from_folder(&dir).unwrap();
    // "the cat é": the, ▁c, at, ▁, then é by byte fallback (C3 A9); <bos> once, in front.
    let expected = tok.encode_with_bos("the cat é", 2).unwrap();
    assert_eq!(expected, vec![2, 272, 273, 274, 262, 6 + 0xC3, 6 + 0xA9]);
    assert_eq!(tok.decode(&expected).unwrap(), "the cat é");
    assert_eq!(tok.token_id("<end_of_turn>"), Some(5));
    // Streaming pieces put together are the whole text; a run of byte tokens (é) waits for its end.
    let mut stream = tok.stream();
    let pieces: Vec<String> = expected[1..]
        .iter()
        .chain(&[275])
        .map(|&id| stream.push(id).unwrap())
        .collect();
    assert_eq!(pieces, vec!["the", " c", "at", " ", "", "", "é the"]);
    assert_eq!(stream.finish().unwrap(), "");
    let mut stream = tok.stream();
    let pieces: Vec<String> = expected[1..]
        .iter()
        .map(|&id| stream.push(id).unwrap())
        .collect();
    assert_eq!(pieces.concat() + &stream.finish().unwrap(), "the cat é");

    let text = tmp.path().join("input.txt");
    std::fs::write(&text, "the cat é").unwrap();
    let d = dir.to_str().unwrap();
    let by_text = run_json(&["eval", d, "--text", text.to_str().unwrap(), "--json"]);
    let by_ids = run_json(&["eval", d, "--token-ids", &csv(&expected), "--json"]);
    assert_eq!(by_text["tokens"], 6);
    assert_eq!(by_text["perplexity"], by_ids["perplexity"]);
    let cmp = run_json(&[
        "compare",
        d,
        "--reference",
        fixture("gemma2-tiny-A2").to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(cmp["tokens"], 6);

    // generate --prompt: streamed text equals the JSON text, which decodes the JSON ids.
    let gen = [
        "generate",
        d,
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "16",
    ];
    let v = run_json(&[&gen[..], &["--json"]].concat());
    let generated = id_list(&v["token_ids"]);
    assert_eq!(v["text"].as_str().unwrap(), tok.decode(&generated).unwrap());
    assert!(generated.len() == 16 || [1, 5].contains(generated.last().unwrap()));
    let streamed = run(&[&gen[..], &["--no-echo"]].concat());
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8(streamed.stdout).unwrap(),
        format!("{}\n", v["text"].as_str().unwrap())
    );
    // By default the prompt is printed first.
    let echoed = run(&gen);
    assert_eq!(
        String::from_utf8(echoed.stdout).unwrap(),
        format!("the cat{}\n", v["text"].as_str().unwrap())
    );
}

#[test]
fn errors_are_clear_with_the_right_exit_code() {
    let a = fixture("gemma2-tiny-A");
    let a_str = a.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Token id ≥ vocab.
    run_err(
        &["eval", a_str, "--token-ids", "2,384,5"],
        1,
        "token id 384 at position 1 is out of range: the vocabulary has 384 tokens",
    );
    run_err(
        &["generate", a_str, "--token-ids", "2,1000"],
        1,
        "token id 1000 at position 1 is out of range",
    );
    // Too little input.
    run_err(
        &["eval", a_str, "--token-ids", "2"],
        1,
        "at least 2 are needed",
    );
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let dir = model_with_tokenizer(tmp.path());
    run_err(
        &[
            "eval",
            dir.to_str().unwrap(),
            "--text",
            empty.to_str().unwrap(),
        ],
        1,
        "the text file is empty",
    );
    // Text without tokenizer.json: suggest --token-ids.
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    let e = run_err(
        &["eval", a_str, "--text", text.to_str().unwrap()],
        1,
        "no tokenizer.json",
    );
    assert!(e.contains("--token-ids"), "{e}");
    run_err(&["generate", a_str, "--prompt", "hi"], 1, "--token-ids");
    run_err(
        &[
            "eval",
            a_str,
            "--text",
            tmp.path().join("nope.txt").to_str().unwrap(),
        ],
        1,
        "nope.txt",
    );
    // Not a Gemma 2 config.
    let llama = tmp.path().join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    std::fs::copy(a.join("model.safetensors"), llama.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(a.join("config.json"))
        .unwrap()
        .replace("\"gemma2\"", "\"llama\"");
    std::fs::write(llama.join("config.json"), cfg).unwrap();
    run_err(
        &["eval", llama.to_str().unwrap(), "--token-ids", "2,3"],
        1,
        "model_type is llama, not a Gemma model",
    );
    let nocfg = tmp.path().join("nocfg");
    std::fs::create_dir_all(&nocfg).unwrap();
    std::fs::copy(a.join("model.safetensors"), nocfg.join("model.safetensors")).unwrap();
    run_err(
        &["eval", nocfg.to_str().unwrap(), "--token-ids", "2,3"],
        1,
        "no config.json",
    );
    // Missing and mis-shaped tensors.
    let mut ts = tensors(&a);
    ts.retain(|t| t.0 != "model.layers.3.self_attn.k_proj.weight");
    let missing = tmp.path().join("missing");
    write_model(&missing, &a, &ts);
    run_err(
        &["eval", missing.to_str().unwrap(), "--token-ids", "2,3"],
        1,
        "tensor `model.layers.3.self_attn.k_proj.weight` is missing",
    );
    let mut ts = tensors(&a);
    let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    t.2 = vec![32];
    t.3.truncate(64);
    let shaped = tmp.path().join("shaped");
    write_model(&shaped, &a, &ts);
    run_err(
        &["eval", shaped.to_str().unwrap(), "--token-ids", "2,3"],
        1,
        "tensor `model.norm.weight` has shape [32], expected [64]",
    );
    // Broken weights: a clear numerical error, not NaN in the JSON.
    let nan = scaled_copy(
        &tmp.path().join("nan"),
        "model.layers.0.mlp.gate_proj.weight",
        f32::NAN,
    );
    run_err(
        &["eval", nan.to_str().unwrap(), "--token-ids", "2,3,4"],
        1,
        "tensor `model.layers.0.mlp.gate_proj.weight` holds a non-finite value (NaN or infinity) at element 0",
    );
    // Different vocabularies cannot be compared.
    let mut ts = tensors(&a);
    let t = ts
        .iter_mut()
        .find(|t| t.0 == "model.embed_tokens.weight")
        .unwrap();
    t.2 = vec![256, 64];
    t.3.truncate(256 * 64 * 2);
    let small = tmp.path().join("small");
    write_model(&small, &a, &ts);
    let cfg = std::fs::read_to_string(a.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 384", "\"vocab_size\": 256");
    std::fs::write(small.join("config.json"), cfg).unwrap();
    run_err(
        &[
            "compare",
            small.to_str().unwrap(),
            "--reference",
            a_str,
            "--token-ids",
            "2,3",
        ],
        1,
        "different vocabularies: 256 tokens vs 384",
    );
    // Bad flags: exit 2.
    run_err(
        &["eval", a_str, "--token-ids", "2,3", "--context", "1"],
        2,
        "--context 1 is too short",
    );
    run_err(&["eval", a_str, "--token-ids", "2,x"], 2, "not a token id");
    run_err(
        &["eval", a_str, "--token-ids", "2,3", "--max-tokens", "0"],
        2,
        "--max-tokens must be at least 1",
    );
    run_err(
        &["generate", a_str, "--token-ids", "2", "--temperature=-1"],
        2,
        "temperature",
    );
    run_err(
        &["generate", a_str, "--token-ids", "2", "--top-p", "0"],
        2,
        "top-p",
    );
    run_err(&["eval", a_str], 2, "");
}

// ------------------------------------------------------------------------------------- the family

/// A copy of a fixture folder (all its files) whose config.json is edited by `edit`.
fn edited_copy(dir: &Path, from: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(fixture(from)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn absurd_or_inconsistent_configs_are_clear_errors_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let eval = |dir: &Path, needle: &str| {
        run_err(
            &["eval", dir.to_str().unwrap(), "--token-ids", "2,3"],
            1,
            needle,
        );
        run_err(
            &["generate", dir.to_str().unwrap(), "--token-ids", "2,3"],
            1,
            needle,
        );
    };
    // heads × head_dim wraps to a small number on 64 bits without checked arithmetic.
    let wrap = edited_copy(&t.join("wrap"), "gemma2-tiny-A", |c| {
        c["num_attention_heads"] = (1u64 << 33).into();
        c["num_key_value_heads"] = (1u64 << 33).into();
        c["head_dim"] = (1u64 << 31).into();
    });
    eval(&wrap, "is absurd");
    // Fewer layers in config.json than in the checkpoint: the extra layers are named, not ignored.
    let fewer = edited_copy(&t.join("fewer"), "family/gemma3-mm-tiny", |c| {
        c["text_config"]["num_hidden_layers"] = 5.into();
    });
    eval(&fewer, "tensor `language_model.model.layers.5.");
    eval(&fewer, "beyond num_hidden_layers = 5");
    let more = edited_copy(&t.join("more"), "family/gemma1-tiny", |c| {
        c["num_hidden_layers"] = 4.into();
    });
    eval(&more, "tensor `model.layers.3.");
    eval(&more, "` is missing");
    let nopos = edited_copy(&t.join("nopos"), "family/gemma3-tiny", |c| {
        c["max_position_embeddings"] = 0.into();
    });
    eval(&nopos, "max_position_embeddings must be positive");
    let scaled = edited_copy(&t.join("scaled"), "family/gemma3-tiny", |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    eval(&scaled, "rope_scaling.rope_type \"yarn\" is not supported");
    // An infinity in a norm weight of Gemma 2 would be hidden by the soft-caps; NaN in Gemma 3's QK-norm.
    let inf = scaled_copy(
        &t.join("inf"),
        "model.layers.1.pre_feedforward_layernorm.weight",
        f32::INFINITY,
    );
    eval(
        &inf,
        "tensor `model.layers.1.pre_feedforward_layernorm.weight` holds a non-finite value",
    );
    let g3 = fixture("family/gemma3-tiny");
    let mut ts = tensors(&g3);
    let k = ts
        .iter_mut()
        .find(|t| t.0 == "model.layers.2.self_attn.k_norm.weight")
        .unwrap();
    k.3[6..8].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    let nan = t.join("nan3");
    write_model(&nan, &g3, &ts);
    eval(&nan, "tensor `model.layers.2.self_attn.k_norm.weight` holds a non-finite value (NaN or infinity) at element 3");
}

#[test]
fn chat_turns_render_with_the_template_and_only_model_tokens_count() {
    use gemma_merge::model::chat::{self, ChatFormat};
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_with_tokenizer(tmp.path());
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let convo = vec![
        serde_json::json!({"role": "user", "content": "the cat"}),
        serde_json::json!({"role": "assistant", "content": " the son "}),
        serde_json::json!({"role": "user", "content": "cat"}),
        serde_json::json!({"role": "assistant", "content": "on"}),
    ];
    let g2 = std::fs::read_to_string(fixture("chat/gemma2-chat-template.jinja")).unwrap();
    let g3 = std::fs::read_to_string(fixture("chat/gemma3-chat-template.jinja")).unwrap();
    // The built-in format is Gemma 3's published template.
    assert_eq!(g3, chat::GEMMA_TEMPLATE);
    for template in [&g2, &g3] {
        let f = ChatFormat::from_template(template, "<bos>");
        let text = f.render(&convo, false).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nthe cat<end_of_turn>\n<start_of_turn>model\nthe son<end_of_turn>\n\
             <start_of_turn>user\ncat<end_of_turn>\n<start_of_turn>model\non<end_of_turn>\n"
        );
        let (ids, counted) = f.tokens(&tok, &convo, 2).unwrap();
        // By hand: "the" 272, "▁s" 276, "on" 277, <end_of_turn> 5; then "on" 277, <end_of_turn> 5. The
        // newline after <end_of_turn> (byte token 0x0A = 16) is the template's, not the model's.
        let model_tokens: Vec<u32> = ids
            .iter()
            .zip(&counted)
            .filter(|(_, c)| **c)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(model_tokens, vec![272, 276, 277, 5, 277, 5]);
        let first = counted.iter().position(|c| *c).unwrap();
        // ... and they come right after "<start_of_turn>model\n" ("model": m o d e l, bytes but o, e).
        let prefix = tok.encode("<start_of_turn>model\n").unwrap();
        assert_eq!(&ids[first - prefix.len()..first], &prefix[..]);
        assert_eq!(ids[first + 4], 6 + b'\n' as u32);
        assert!(!counted[first + 4]);
        assert_eq!(ids[0], 2);
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "one <bos>");
    }
    // Gemma 2's template refuses a system turn; it is folded into the first user turn instead.
    let sys = chat::user_turn(Some("Be brief."), "Hi");
    let want = "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(
        ChatFormat::from_template(&g2, "<bos>")
            .render(&sys, true)
            .unwrap(),
        want
    );
    assert_eq!(ChatFormat::gemma().render(&sys, true).unwrap(), want);

    // The CLI: a template from tokenizer_config.json; eval --chat-file scores only the model's turns.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<bos>", "chat_template": g2}).to_string(),
    )
    .unwrap();
    let file = tmp.path().join("chats.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n\n{}\n",
            serde_json::json!({"messages": convo}),
            serde_json::json!({"messages": convo[..2]})
        ),
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let v = run_json(&["eval", d, "--chat-file", file.to_str().unwrap(), "--json"]);
    let model = Gemma2::load(&dir).unwrap();
    let f = ChatFormat::from_folder(&dir).unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for c in [&convo[..], &convo[..2]] {
        let (ids, counted) = f.tokens(&tok, c, 2).unwrap();
        let s = evaluate::score(&model, &ids, ids.len()).unwrap();
        for (lp, _) in s.log_probs.iter().zip(&counted[1..]).filter(|(_, c)| **c) {
            sum -= lp;
            n += 1;
        }
    }
    assert_eq!(v["tokens"], n);
    assert_eq!(n, 6 + 4);
    assert!((v["mean_nll"].as_f64().unwrap() - sum / n as f64).abs() < 1e-9);
    let c = run_json(&[
        "compare",
        d,
        "--reference",
        d,
        "--chat-file",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(c["tokens"], n);
    assert_eq!(c["kl"].as_f64().unwrap(), 0.0);
    // generate --chat: the prompt is the rendered user turn plus the generation prompt.
    let g = run_json(&[
        "generate",
        d,
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(g["prompt_tokens"], tok.encode(want).unwrap().len());
    // A chat file without model turns, or not JSONL: clear errors naming the file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\nnot json\n",
    )
    .unwrap();
    run_err(
        &["eval", d, "--chat-file", bad.to_str().unwrap()],
        1,
        "bad.jsonl:2: not JSON",
    );
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    run_err(
        &["eval", d, "--chat-file", bad.to_str().unwrap()],
        1,
        "no model (assistant) turns",
    );
    run_err(
        &[
            "eval",
            d,
            "--chat-file",
            bad.to_str().unwrap(),
            "--text",
            bad.to_str().unwrap(),
        ],
        2,
        "",
    );
}

/// Gemma 3's vocabulary size (262 208, `<start_of_turn>` 105, `<end_of_turn>` 106, `<image_soft_token>`
/// 262 144) through the same tokenizers crate, end to end: a synthetic Gemma 3 4B-shaped model (1 layer,
/// narrow) with a tokenizer of that size, `generate --chat` rendering Gemma's turn format.
#[test]
fn gemma3_vocabulary_and_chat_end_to_end() {
    const V: usize = 262_208;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("g3");
    let out = run(&[
        "-q",
        "synth",
        "--shape",
        "gemma3-4b",
        "--layers",
        "1",
        "--hidden-size",
        "64",
        "--intermediate-size",
        "32",
        "--dtype",
        "bfloat16",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut vocab = serde_json::Map::new();
    let mut specials = vec![
        (0, "<pad>"),
        (1, "<eos>"),
        (2, "<bos>"),
        (3, "<unk>"),
        (105, "<start_of_turn>"),
        (106, "<end_of_turn>"),
        (262_144, "<image_soft_token>"),
    ];
    specials.sort();
    for (id, s) in &specials {
        vocab.insert(s.to_string(), (*id).into());
    }
    let mut next = 0usize;
    let mut take = |vocab: &mut serde_json::Map<String, Value>, piece: String| {
        while specials.iter().any(|(id, _)| *id == next) {
            next += 1;
        }
        vocab.insert(piece, next.into());
        next += 1;
    };
    for b in 0..256 {
        take(&mut vocab, format!("<0x{b:02X}>"));
    }
    for p in ["▁", "h", "i", "hi", "▁hi"] {
        take(&mut vocab, p.to_string());
    }
    while vocab.len() < V {
        let n = vocab.len();
        take(&mut vocab, format!("[unused{n}]"));
    }
    assert_eq!(vocab.len(), V);
    let added: Vec<Value> = specials.iter()
        .map(|(id, s)| serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}, "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": ["h i", "▁ hi"]}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let t = Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(t.token_id("<end_of_turn>"), Some(106));
    assert_eq!(t.token_id("<image_soft_token>"), Some(262_144));
    let rendered = "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n";
    let ids = t.encode(rendered).unwrap();
    assert_eq!((ids[0], ids[1]), (2, 105));
    assert_eq!(ids.iter().filter(|&&i| i == 105).count(), 2);
    assert!(ids.contains(&106));
    let v = run_json(&[
        "generate",
        dir.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert_eq!(v["prompt_tokens"], ids.len());
    let model = Gemma2::load(&dir).unwrap();
    assert_eq!(model.config().vocab_size, V);
    assert_eq!(model.config().eos_token_ids, vec![1, 106]);
    assert!(v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i.as_u64().unwrap() < V as u64));
}

/// The golden-model checks again in child processes of this test binary with `GEMMA_MERGE_SIMD` forcing
/// each narrower level, so the AVX2 and portable kernels are held to 1e-4 of transformers on every
/// machine (the level is read once per process).
#[test]
fn every_simd_level_matches_transformers() {
    if std::env::var_os("GEMMA_MERGE_SIMD").is_some() {
        return; // already a child (or the whole run is forced): the checks below run as themselves
    }
    let exe = std::env::current_exe().unwrap();
    let checks = [
        "logits_match_transformers",
        "perplexity_matches_transformers",
        "cached_decoding_gives_the_full_pass_logits",
        "greedy_continuation_matches_transformers_past_the_window",
    ];
    for level in ["avx2", "portable"] {
        let mut cmd = Command::new(&exe);
        cmd.env("GEMMA_MERGE_SIMD", level)
            .args(["--test-threads", "2", "--exact"]);
        cmd.args(checks);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains(&format!("test result: ok. {} passed", checks.len())),
            "GEMMA_MERGE_SIMD={level}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `--fast` (bf16 products where the CPU has AVX512-BF16): close to exact mode on every golden model
/// (relative perplexity within 1e-2, logits within 0.05), and, on such a CPU, not the exact numbers.
#[test]
fn fast_mode_stays_close_to_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let g = golden(name);
        let model = fixture(name);
        let fast_dump = tmp
            .path()
            .join(format!("{}.fast.safetensors", name.replace('/', "-")));
        let v = run_json(&[
            "eval",
            model.to_str().unwrap(),
            "--token-ids",
            &csv(&g.tokens),
            "--fast",
            "--dump-logits",
            fast_dump.to_str().unwrap(),
            "--json",
        ]);
        let ppl = v["perplexity"].as_f64().unwrap();
        assert!(
            ((ppl - g.perplexity) / g.perplexity).abs() < 1e-2,
            "{name}: {ppl} vs {}",
            g.perplexity
        );
        let fast = read_logits(&fast_dump);
        let err = max_abs_diff(&fast, &g.logits);
        // bf16 products lose relative precision; gemma1-tiny's residual stream reaches ~280 (no
        // post-norms), so its logits move by up to 0.24 (its perplexity stays within 1e-2).
        let bound = if name == "family/gemma1-tiny" {
            0.5
        } else {
            0.05
        };
        assert!(err < bound, "{name}: fast logits differ by {err}");
        if gemma_merge::simd::has_bf16_dot() && g.tokens.len() > 8 {
            assert!(
                err > 1e-6,
                "{name}: --fast gave the exact logits on a CPU with AVX512-BF16"
            );
        }
    }
}
