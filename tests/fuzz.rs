//! Structured fuzzing (proptest) of the three parsers that read untrusted files: the safetensors reader
//! (mutated valid files), the recipe parser (mutated valid recipes) and the config reader (mutated valid
//! config.json). Whatever the mutation, the result is a value or an error, never a panic, and what is
//! accepted is consistent. Bounded to a few seconds each, so it runs in every `cargo test`.

use std::path::Path;

use gemma_merge::format::writer::{ModelWriter, TensorSpec};
use gemma_merge::format::{FloatType, Model};
use gemma_merge::model::Config;
use gemma_merge::recipe::Plan;
use proptest::prelude::*;
use safetensors::Dtype;

/// A valid two-file-free model: a few tensors of several dtypes, written by our writer.
fn valid_safetensors() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let specs = vec![
        TensorSpec {
            name: "a".into(),
            dtype: Dtype::F32,
            shape: vec![2, 3],
        },
        TensorSpec {
            name: "e".into(),
            dtype: Dtype::BF16,
            shape: vec![0, 4],
        },
        TensorSpec {
            name: "b".into(),
            dtype: Dtype::BF16,
            shape: vec![5],
        },
        TensorSpec {
            name: "i".into(),
            dtype: Dtype::I64,
            shape: vec![1],
        },
    ];
    let mut w = ModelWriter::create(d.path(), specs, u64::MAX).unwrap();
    w.write(&[1u8; 24]).unwrap();
    w.write(&[2u8; 10]).unwrap();
    w.write(&[3u8; 8]).unwrap();
    w.finish().unwrap();
    std::fs::read(d.path().join("model.safetensors")).unwrap()
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
    /// Replaces a run with a fragment likely to matter to the format being mutated.
    Splice(usize, usize, &'static str),
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Set(i, b) => {
                if !bytes.is_empty() {
                    let i = i % n;
                    bytes[i] = *b;
                }
            }
            Edit::Insert(i, v) => {
                let i = i % (bytes.len() + 1);
                bytes.splice(i..i, v.iter().copied());
            }
            Edit::Remove(i, len) => {
                let i = i % n;
                let end = (i + len).min(bytes.len());
                if i < end {
                    bytes.drain(i..end);
                }
            }
            Edit::Truncate(len) => bytes.truncate(len % n),
            Edit::Splice(i, len, s) => {
                let i = i % (bytes.len() + 1);
                let end = (i + len).min(bytes.len());
                bytes.splice(i..end, s.bytes());
            }
        }
    }
    bytes
}

const FRAGMENTS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-0.0",
    "18446744073709551615",
    "4294967296",
    "9223372036854775807",
    "null",
    "[]",
    "{}",
    "\"\"",
    "[0]",
    "[0, 0]",
    "[1, 18446744073709551615]",
    "\"F32\"",
    "\"BF16\"",
    "\"I8\"",
    "\"F64\"",
    "true",
    ".nan",
    ".inf",
    "~",
    "&a x",
    "*a",
    "\n",
    ": ",
    "- ",
    "\"\\u0000\"",
    "[0.0, -0.0]",
    "1e-320",
    "eta",
    "models",
    "weights",
    "steps",
    "liti",
    "slerp",
    "linear",
    "ema",
    "base",
    "t",
    "decay",
    "data_offsets",
    "shape",
    "dtype",
    "__metadata__",
    "\"..\"",
    "/dev/zero",
];

fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), 1usize..12).prop_map(|(i, n)| Edit::Remove(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (
            any::<usize>(),
            0usize..6,
            proptest::sample::select(FRAGMENTS)
        )
            .prop_map(|(i, n, s)| Edit::Splice(i, n, s)),
    ];
    proptest::collection::vec(edit, 1..max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A mutated safetensors file opens or fails cleanly; when it opens, every tensor's bytes are
    /// inside the file and agree with dtype × shape.
    #[test]
    fn mutated_safetensors_never_panic(e in edits(6), prefix in proptest::option::of(any::<u64>())) {
        let mut bytes = apply(valid_safetensors(), &e);
        if let (Some(p), true) = (prefix, bytes.len() >= 8) {
            bytes[..8].copy_from_slice(&(p % 4096).to_le_bytes());
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(m) = Model::open(&p) {
            for t in m.tensors() {
                let data = m.data(t);
                prop_assert_eq!(data.len(), t.len);
                if let Some(ft) = FloatType::from_dtype(t.dtype) {
                    prop_assert_eq!(t.numel() * ft.size(), t.len);
                }
            }
            // A model whose header was accepted is also a valid folder.
            prop_assert!(Model::open(d.path()).is_ok());
        }
    }
}

/// Two models in a folder, for recipes to refer to.
fn recipe_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, v) in [("a", 1u8), ("b", 2u8)] {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let specs = vec![TensorSpec {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        }];
        let mut w = ModelWriter::create(&dir, specs, u64::MAX).unwrap();
        w.write(&[v; 8]).unwrap();
        w.finish().unwrap();
    }
    d
}

const RECIPE: &str = "output: out
base: a
dtype: bfloat16
shard_size: 5GB
models:
  first: a
steps:
  - name: e
    method: ema
    models: [first, b]
    decay: 0.5
    steps: [10, 20]
    start: a
  - name: s
    method: slerp
    models: [e, b]
    weights: [1, 2]
    angle: layer
  - name: m
    method: linear
    models: [s, a]
    weights: [0.5, 0.5]
  - name: l
    method: liti
    model: m
    eta: [0.1, 0.5]
";

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A mutated recipe is a plan or an error with a location; a plan binds to the inputs cleanly.
    #[test]
    fn mutated_recipes_never_panic(e in edits(5)) {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        let d = DIR.get_or_init(recipe_dir);
        let text = String::from_utf8_lossy(&apply(RECIPE.as_bytes().to_vec(), &e)).into_owned();
        let path = d.path().join("r.yaml");
        match Plan::from_text(&text, &path, None) {
            Ok(plan) => {
                prop_assert!(!plan.targets.is_empty());
                let _ = gemma_merge::executor::Prepared::new(&plan);
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }
}

fn tiny_config() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gemma2-tiny-A/config.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 32)),
        Just(json!(1u64 << 62)),
        Just(json!(1e300)),
        Just(json!(-0.0)),
        Just(json!(0.5)),
        Just(json!(null)),
        Just(json!("gemma2")),
        Just(json!("")),
        Just(json!([])),
        Just(json!([1, 2])),
        Just(json!({})),
        Just(json!(true)),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |v| v.is_finite())
            .prop_map(|v| json!(v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A config with fields replaced, removed or added is read or refused, never a panic; mutated JSON
    /// text is read or refused as well.
    #[test]
    fn mutated_configs_never_panic(
        changes in proptest::collection::vec((0usize..40, proptest::option::of(json_value())), 1..5),
        text_edits in edits(4),
    ) {
        let mut config = tiny_config();
        let keys: Vec<String> = config.as_object().unwrap().keys().cloned().collect();
        for (k, v) in changes {
            let obj = config.as_object_mut().unwrap();
            let key = keys.get(k).cloned().unwrap_or_else(|| format!("extra_{k}"));
            match v {
                Some(v) => { obj.insert(key, v); }
                None => { obj.remove(&key); }
            }
        }
        let path = Path::new("config.json");
        let _ = Config::from_json(&config, path);
        let text = apply(serde_json::to_vec(&tiny_config()).unwrap(), &text_edits);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
            let _ = Config::from_json(&v, path);
        }
        // Through the file reader too (size limit, regular file).
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), &text).unwrap();
        let _ = Config::from_folder(d.path());
    }
}
