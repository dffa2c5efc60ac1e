//! Hostile inputs (issue 8, groups 2–4): every case ends with exit 1 or 2 and an `error:` line naming the
//! culprit, no panic or signal, nothing left behind, no hang.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::s;
use common::write_model;

use gemma_merge::format::{FloatType, Model};

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with a deadline (a hang is a failure, not a stuck test run).
fn gm_in(dir: Option<&Path>, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemma-merge"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().expect("binary runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("gemma-merge {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let out = Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "gemma-merge {args:?} panicked:\n{}",
        out.stderr
    );
    assert!(out.code.is_some(), "gemma-merge {args:?} died of a signal");
    out
}

fn gm(args: &[&str]) -> Out {
    gm_in(None, args)
}

/// Asserts a clean failure: the exit code, one `error:` line, and that it mentions every `needles`.
fn fails(o: &Out, code: i32, needles: &[&str]) {
    assert_eq!(
        o.code,
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        o.stdout,
        o.stderr
    );
    assert!(o.stderr.contains("error: "), "{}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "{n:?} not in:\n{}", o.stderr);
    }
}

/// f32 values of every tensor of a model.
fn values(path: &Path, name: &str) -> Vec<f32> {
    let m = Model::open(path).unwrap();
    let t = m.get(name).unwrap();
    let ft = FloatType::from_dtype(t.dtype).unwrap();
    let mut v = vec![0f32; t.numel()];
    ft.decode(m.data(t), &mut v);
    v
}

/// Names of the entries of a folder.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A base `a` and a model `b`, each with two small tensors, in `root`.
fn pair(root: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (root.join("a"), root.join("b"));
    write_model(
        &a,
        FloatType::F32,
        &[
            ("x", vec![3], vec![1.0, 2.0, 3.0]),
            ("y", vec![2], vec![0.5, -0.5]),
        ],
    );
    write_model(
        &b,
        FloatType::F32,
        &[
            ("x", vec![3], vec![3.0, 2.0, 1.0]),
            ("y", vec![2], vec![1.5, 0.5]),
        ],
    );
    (a, b)
}

/// A recipe of one LITI step halfway from the base `a` to `b`.
const LITI: &str =
    "output: out\nbase: a\nsteps:\n  - {name: l, method: liti, model: b, eta: 0.5}\n";

fn recipe(root: &Path, body: &str) -> PathBuf {
    let p = root.join("r.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------------
// Group 2: zero-element tensors

#[test]
fn zero_element_tensors_first_and_between_are_merged() {
    let d = tempfile::tempdir().unwrap();
    let t = |x: f32| {
        vec![
            ("empty", vec![0usize], vec![]),
            ("empty2", vec![0, 5], vec![]),
            ("x", vec![2], vec![x, 2.0 * x]),
            ("mid", vec![4, 0], vec![]),
            ("z", vec![1], vec![x]),
        ]
    };
    write_model(&d.path().join("a"), FloatType::F32, &t(1.0));
    write_model(&d.path().join("b"), FloatType::F32, &t(3.0));
    let r = recipe(d.path(), LITI);
    let o = gm(&["run", s(&r)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let out = d.path().join("out");
    assert_eq!(values(&out, "x"), [2.0, 4.0]);
    assert_eq!(values(&out, "z"), [2.0]);
    let m = Model::open(&out).unwrap();
    assert_eq!(m.get("empty2").unwrap().shape, vec![0, 5]);
    assert_eq!(m.get("mid").unwrap().shape, vec![4, 0]);
    assert_eq!(gm(&["verify", s(&out)]).code, Some(0));

    // The methods that rank, sample or measure a tensor's elements take empty tensors too (TIES's
    // top-k of an empty tensor was a panic).
    write_model(&d.path().join("c"), FloatType::F32, &t(5.0));
    for step in [
        "{name: t, method: ties, models: [b, c], weights: [0.5, 0.5], density: 0.5}",
        "{name: t, method: breadcrumbs_ties, models: [b, c], weights: [0.5, 0.5], density: 0.8, gamma: 0.1}",
        "{name: t, method: dare_ties, models: [b, c], weights: [0.5, 0.5], density: 0.5}",
        "{name: t, method: model_stock, models: [b, c]}",
        "{name: t, method: nuslerp, models: [b, c], weights: [0.5, 0.5]}",
    ] {
        let r = recipe(
            d.path(),
            &format!("output: out\nbase: a\nmodels:\n  a: a\n  b: b\n  c: c\nsteps:\n  - {step}\n"),
        );
        let o = gm(&["run", s(&r), "--force"]);
        assert_eq!(o.code, Some(0), "{step}: {}", o.stderr);
        let m = Model::open(&out).unwrap();
        assert_eq!(m.get("empty2").unwrap().shape, vec![0, 5], "{step}");
        assert_eq!(m.tensors().len(), 5, "{step}");
    }

    // A base made only of empty tensors merges into a model of empty tensors.
    let r = recipe(d.path(), LITI);
    let e = |_: f32| vec![("empty", vec![0usize], vec![]), ("e2", vec![0, 3], vec![])];
    write_model(&d.path().join("a"), FloatType::F32, &e(0.0));
    write_model(&d.path().join("b"), FloatType::F32, &e(0.0));
    let o = gm(&["run", s(&r), "--force"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(Model::open(&out).unwrap().tensors().len(), 2);
}

// ---------------------------------------------------------------------------------------------------
// Group 2: closed pipes, flag bounds

/// Runs with stdout a pipe whose reading end is closed at once: the output must fail quietly.
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path());
    let r = recipe(d.path(), LITI);
    assert_eq!(gm(&["run", s(&r)]).code, Some(0));
    let out = d.path().join("out");
    let dry = d.path().join("dry");
    for args in [
        vec!["inspect", s(&a)],
        vec!["inspect", s(&b), "--json"],
        vec!["verify", "-v", s(&out)],
        vec!["run", s(&r), "--dry-run", "--out", s(&dry)],
        vec!["run", s(&r), "--dry-run", "--json", "--out", s(&dry)],
    ] {
        let (code, stderr) = with_closed_stdout(&args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn thread_counts_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = pair(d.path());
    for n in ["100000000", "1025", "18446744073709551615", "0"] {
        let o = gm(&["--threads", n, "inspect", s(&a)]);
        fails(&o, 2, &["--threads"]);
    }
    assert_eq!(gm(&["--threads", "3", "inspect", s(&a)]).code, Some(0));
}

#[test]
fn max_new_tokens_is_bounded_before_anything_is_allocated() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gemma2-tiny-A");
    for n in ["1000000000", "4611686018427387904", "1e9"] {
        let o = gm(&[
            "generate",
            s(&model),
            "--token-ids",
            "2,5",
            "--max-new-tokens",
            n,
        ]);
        fails(&o, 2, &["--max-new-tokens"]);
    }
    let o = gm(&[
        "generate",
        s(&model),
        "--token-ids",
        "2,5",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(v["token_ids"].as_array().unwrap().len() <= 3);
}

// ---------------------------------------------------------------------------------------------------
// Group 4: no silently wrong models

#[test]
fn huge_weights_normalise_exactly() {
    let d = tempfile::tempdir().unwrap();
    pair(d.path());
    // linear: [1e308, 1e308] is the plain average, not zeros.
    let r = recipe(
        d.path(),
        "output: out\nbase: a\nsteps:\n  - {name: m, method: linear, models: [a, b], weights: [1e308, 1e308]}\n",
    );
    let o = gm(&["run", s(&r)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(values(&d.path().join("out"), "x"), [2.0, 2.0, 2.0]);
    assert_eq!(values(&d.path().join("out"), "y"), [1.0, 0.0]);
    // linear weights that cancel to nothing cannot be normalised.
    let r = recipe(
        d.path(),
        "output: out2\nbase: a\nsteps:\n  - name: m\n    method: linear\n    models: [a, b, a]\n    weights: [1e308, -1e308, 1e-10]\n",
    );
    fails(&gm(&["run", s(&r)]), 2, &["r.yaml:7", "normalize"]);
    assert!(!d.path().join("out2").exists());

    // slerp: weights [1e308, 1e308] are λ = 1/2, exactly as `t: 0.5`.
    let root = d.path();
    write_model(
        &root.join("c"),
        FloatType::F32,
        &[
            ("x", vec![3], vec![1.0, 2.5, 3.0]),
            ("y", vec![2], vec![0.5, 0.0]),
        ],
    );
    for (name, how) in [("s1", "weights: [1e308, 1e308]"), ("s2", "t: 0.5")] {
        let r = recipe(
            root,
            &format!("output: {name}\nbase: a\nsteps:\n  - {{name: m, method: slerp, models: [b, c], {how}, angle: tensor}}\n"),
        );
        let o = gm(&["run", s(&r)]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
    }
    for t in ["x", "y"] {
        let (v1, v2) = (values(&root.join("s1"), t), values(&root.join("s2"), t));
        assert_eq!(v1, v2, "{t}");
        assert_ne!(
            v1,
            values(&root.join("a"), t),
            "λ = 0 would give the base's task vector 0"
        );
    }
}

#[test]
fn non_finite_outputs_are_errors_in_every_dtype_and_layout() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    // Values that fit every dtype, but whose merge overflows float16 (beyond ±65504).
    write_model(
        &root.join("a"),
        FloatType::F32,
        &[
            ("p", vec![2], vec![1.0, 2.0]),
            ("x", vec![3], vec![60000.0, 1.0, 2.0]),
        ],
    );
    write_model(
        &root.join("b"),
        FloatType::F32,
        &[
            ("p", vec![2], vec![1.0, 2.0]),
            ("x", vec![3], vec![1.0, 70000.0, 2.0]),
        ],
    );
    let cases = [
        // (dtype, step, shard size, tensor, what) — f16 overflow in a single file and in shards.
        (
            "float16",
            "{name: m, method: linear, models: [a, b], weights: [1, 1], normalize: false}",
            "5GB",
            "tensor `x`",
            "`m`",
        ),
        (
            "float16",
            "{name: m, method: linear, models: [a, b], weights: [1, 1], normalize: false}",
            "8",
            "tensor `x`",
            "`m`",
        ),
        // Huge un-normalised weights overflow every dtype.
        (
            "bfloat16",
            "{name: m, method: linear, models: [a, b], weights: [1e300, 1e300], normalize: false}",
            "5GB",
            "tensor `p`",
            "`m`",
        ),
        (
            "float32",
            "{name: m, method: linear, models: [a, b], weights: [1e300, 1e300], normalize: false}",
            "12",
            "tensor `p`",
            "`m`",
        ),
        (
            "float32",
            "{name: m, method: liti, model: b, eta: 1e300}",
            "5GB",
            "tensor `x`",
            "`m` (η = 1e300)",
        ),
        (
            "bfloat16",
            "{name: m, method: liti, model: b, eta: [0.5, 1e300]}",
            "5GB",
            "tensor `x`",
            "`m` (η = 1e300)",
        ),
    ];
    for (dtype, step, shard, tensor, what) in cases {
        let body = format!(
            "output: out\nbase: a\ndtype: {dtype}\nshard_size: {shard}\nsteps:\n  - {step}\n"
        );
        let r = recipe(root, &body);
        let o = gm(&["-q", "run", s(&r)]);
        fails(&o, 1, &[tensor, what, "allow_nonfinite", dtype]);
        assert!(
            !entries(root).iter().any(|e| e.contains("out")),
            "{body}: {:?}",
            entries(root)
        );
        // Allowed when asked for.
        let r = recipe(root, &format!("allow_nonfinite: true\n{body}"));
        let o = gm(&["-q", "run", s(&r)]);
        assert_eq!(o.code, Some(0), "{body}: {}", o.stderr);
        std::fs::remove_dir_all(root.join("out")).unwrap();
    }
    // The value that does fit float16 is written.
    let r = recipe(root, "output: out\nbase: a\ndtype: float16\nsteps:\n  - {name: m, method: linear, models: [a, b], weights: [1, 1]}\n");
    assert_eq!(gm(&["run", s(&r)]).code, Some(0));
    assert_eq!(
        values(&root.join("out"), "x"),
        [30000.5, 35000.5, 2.0].map(|v: f32| half::f16::from_f32(v).to_f32())
    );
}

#[test]
fn eta_lists_write_subfolders_and_refuse_duplicates() {
    let d = tempfile::tempdir().unwrap();
    pair(d.path());
    let r = recipe(
        d.path(),
        "output: out\nbase: a\nsteps:\n  - {name: l, method: liti, model: b, eta: [0.5]}\n",
    );
    let o = gm(&["run", s(&r)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(entries(&d.path().join("out")), ["eta-0.5"]);
    assert_eq!(values(&d.path().join("out/eta-0.5"), "x"), [2.0, 2.0, 2.0]);
    assert_eq!(gm(&["verify", s(&d.path().join("out"))]).code, Some(0));
    // −0.0 is 0.0: a duplicate, named with the recipe line.
    for list in ["[0.0, -0.0]", "[0.3, 0.1, 0.30]", "[-0.0, 0, 1]"] {
        let r = recipe(
            d.path(),
            &format!("output: out2\nbase: a\nsteps:\n  - name: l\n    method: liti\n    model: b\n    eta: {list}\n"),
        );
        fails(&gm(&["run", s(&r)]), 2, &["r.yaml:7", "twice"]);
    }
    assert!(!d.path().join("out2").exists());
    let many: Vec<String> = (0..1001)
        .map(|k| format!("{}", k as f64 / 1000.0))
        .collect();
    let r = recipe(
        d.path(),
        &format!("output: out2\nbase: a\nsteps:\n  - name: l\n    method: liti\n    model: b\n    eta: [{}]\n", many.join(", ")),
    );
    fails(&gm(&["run", s(&r)]), 2, &["r.yaml:7", "at most 1000"]);
    assert!(!d.path().join("out2").exists());
}

// ---------------------------------------------------------------------------------------------------
// Group 3: FIFOs, devices and huge side files are refused, never waited on

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// A copy of the demo's sft model (weights, config, tokenizer) in `dir`.
fn demo_copy(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo/sft");
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir.to_path_buf()
}

/// Replaces `file` by each kind of non-regular file in turn and runs `args`: a clean failure naming
/// the file, at once.
#[cfg(unix)]
fn refused_as_non_regular(file: &Path, args: &[&str], code: i32) {
    refused_as(file, args, code, "not a regular file")
}

#[cfg(unix)]
fn refused_as(file: &Path, args: &[&str], code: i32, what: &str) {
    let saved = std::fs::read(file).ok();
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    for kind in ["fifo", "zero", "dir"] {
        let _ = std::fs::remove_file(file);
        match kind {
            "fifo" => mkfifo(file),
            "zero" => std::os::unix::fs::symlink("/dev/zero", file).unwrap(),
            _ => std::fs::create_dir(file).unwrap(),
        }
        let started = Instant::now();
        let o = gm(args);
        fails(&o, code, &[&name, what]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{kind} {name}: slow"
        );
        if kind == "dir" {
            std::fs::remove_dir(file).unwrap();
        }
    }
    let _ = std::fs::remove_file(file);
    // Too large (a sparse file): refused with the limit named, before reading it.
    let f = std::fs::File::create(file).unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    drop(f);
    if name != "model.safetensors" {
        let o = gm(args);
        fails(&o, code, &[&name, "MiB"]);
    }
    match saved {
        Some(b) => std::fs::write(file, b).unwrap(),
        None => std::fs::remove_file(file).unwrap(),
    }
}

#[cfg(unix)]
#[test]
fn fifos_devices_and_huge_side_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = demo_copy(&d.path().join("m"));
    let text = d.path().join("t.txt");
    std::fs::write(&text, "This License applies to any program").unwrap();
    let eval = ["eval", s(&m), "--text", s(&text)];
    assert_eq!(gm(&eval).code, Some(0));
    refused_as_non_regular(&m.join("model.safetensors"), &eval, 1);
    refused_as_non_regular(&m.join("config.json"), &eval, 1);
    refused_as_non_regular(&m.join("tokenizer.json"), &eval, 1);
    refused_as_non_regular(&text, &eval, 1);
    refused_as_non_regular(&m.join("model.safetensors"), &["inspect", s(&m)], 1);

    // A recipe, and a side file copied from the base.
    let (_, _) = pair(d.path());
    let r = recipe(d.path(), LITI);
    refused_as_non_regular(&r, &["run", s(&r)], 1);
    refused_as_non_regular(
        &d.path().join("a/tokenizer_config.json"),
        &["run", s(&r)],
        1,
    );
    assert!(!d.path().join("out").exists());
    assert!(
        !entries(d.path()).iter().any(|e| e.contains("tmp")),
        "{:?}",
        entries(d.path())
    );

    // A manifest entry, and the manifest itself.
    assert_eq!(gm(&["run", s(&r)]).code, Some(0));
    let out = d.path().join("out");
    let o = gm(&["verify", s(&out)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    std::fs::remove_file(out.join("README.md")).unwrap();
    mkfifo(&out.join("README.md"));
    let o = gm(&["verify", s(&out)]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("README.md"), "{}", o.stderr);
    refused_as(
        &out.join("merge-manifest.json"),
        &["verify", s(&out)],
        1,
        "",
    );
}

// ---------------------------------------------------------------------------------------------------
// Group 4: verify checks that the folder holds exactly what the manifest lists

fn verify_fails(dir: &Path, needle: &str) {
    let o = gm(&["verify", s(dir)]);
    assert_eq!(o.code, Some(1), "{needle}: {}\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains(needle), "{needle} not in:\n{}", o.stderr);
}

#[test]
fn verify_refuses_what_the_manifest_does_not_cover() {
    let d = tempfile::tempdir().unwrap();
    pair(d.path());
    let r = recipe(
        d.path(),
        "output: out\nbase: a\nsteps:\n  - {name: l, method: liti, model: b, eta: [0.0, 0.5, 1.0]}\n",
    );
    assert_eq!(gm(&["run", s(&r)]).code, Some(0));
    let out = d.path().join("out");
    assert_eq!(gm(&["verify", s(&out)]).code, Some(0));
    let m5 = out.join("eta-0.5");

    // An η folder deleted.
    let saved = d.path().join("saved");
    std::fs::rename(out.join("eta-1.0"), &saved).unwrap();
    verify_fails(&out, "eta-1.0: missing");
    std::fs::rename(&saved, out.join("eta-1.0")).unwrap();
    assert_eq!(gm(&["verify", s(&out)]).code, Some(0));

    // Weights a loader would pick up instead: another model's index and shards beside ours.
    let other = d.path().join("other");
    let big = recipe(
        d.path(),
        "output: other\nbase: a\nshard_size: 12\nsteps:\n  - {name: l, method: liti, model: b, eta: 0.2}\n",
    );
    assert_eq!(gm(&["run", s(&big)]).code, Some(0));
    for e in entries(&other) {
        if e.contains("safetensors") {
            std::fs::copy(other.join(&e), m5.join(&e)).unwrap();
        }
    }
    verify_fails(
        &m5,
        "model.safetensors.index.json: not listed in the manifest",
    );
    verify_fails(&out, "not listed in the manifest");
    for e in entries(&other) {
        if e.starts_with("model-") || e.ends_with(".json") && e.contains("index") {
            std::fs::remove_file(m5.join(&e)).unwrap();
        }
    }
    assert_eq!(gm(&["verify", s(&m5)]).code, Some(0));
    // Another model's weights under our names: the hash differs.
    std::fs::copy(
        other.join("model-00001-of-00002.safetensors"),
        m5.join("model.safetensors"),
    )
    .unwrap();
    verify_fails(&m5, "model.safetensors");
    std::fs::copy(
        out.join("eta-0.0/model.safetensors"),
        m5.join("model.safetensors"),
    )
    .unwrap();
    verify_fails(&m5, "SHA-256");
    let back = recipe(
        d.path(),
        "output: out\nbase: a\nsteps:\n  - {name: l, method: liti, model: b, eta: [0.0, 0.5, 1.0]}\n",
    );
    assert_eq!(gm(&["run", s(&back), "--force"]).code, Some(0));

    // Stray pytorch weights or an unlisted config.
    std::fs::write(m5.join("pytorch_model.bin"), b"x").unwrap();
    verify_fails(&m5, "pytorch_model.bin: not listed");
    std::fs::remove_file(m5.join("pytorch_model.bin")).unwrap();

    // A symlink leading outside the folder, even to identical bytes.
    let outside = d.path().join("outside.safetensors");
    std::fs::copy(m5.join("model.safetensors"), &outside).unwrap();
    std::fs::remove_file(m5.join("model.safetensors")).unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, m5.join("model.safetensors")).unwrap();
        verify_fails(&m5, "symlink leading outside");
        std::fs::remove_file(m5.join("model.safetensors")).unwrap();
    }
    std::fs::copy(&outside, m5.join("model.safetensors")).unwrap();
    assert_eq!(gm(&["verify", s(&out)]).code, Some(0));

    // A manifest with no outputs.
    let mp = m5.join("merge-manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    assert_eq!(
        m["front"],
        serde_json::json!(["eta-0.0", "eta-0.5", "eta-1.0"])
    );
    let outputs = m["outputs"].clone();
    m["outputs"] = serde_json::json!([]);
    std::fs::write(&mp, serde_json::to_string(&m).unwrap()).unwrap();
    verify_fails(&m5, "lists no output files");
    // An old manifest (no `front` key) is still read.
    m["outputs"] = outputs;
    m.as_object_mut().unwrap().remove("front");
    std::fs::write(&mp, serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(gm(&["verify", s(&out)]).code, Some(0));
}

#[test]
fn synth_sizes_are_checked_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s");
    for args in [
        vec!["--shape", "2b", "--layers", "1000000"],
        vec!["--shape", "2b", "--vocab-size", "100000000000"],
        vec!["--shape", "27b", "--layers", "1024"],
    ] {
        let mut all = vec!["synth"];
        all.extend(&args);
        all.extend(["--out", s(&out)]);
        let o = gm(&all);
        assert_eq!(o.code, Some(2), "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("error: "), "{}", o.stderr);
        assert!(
            entries(d.path()).is_empty(),
            "{args:?}: {:?}",
            entries(d.path())
        );
    }
}
