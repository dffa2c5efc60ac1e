//! `run --part I/N` then `join`: the joined folders hold exactly the bytes of a plain `run` (every file;
//! the manifest's `seconds` aside), whatever the order of the parts and with parts running concurrently;
//! a missing, stale or foreign part is refused and nothing is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::s;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gemma-merge"));
    // `--part auto` must not pick up a scheduler the test suite itself might run under.
    for v in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
        "JOB_COMPLETION_INDEX",
        "GEMMA_MERGE_PARTS",
    ] {
        c.env_remove(v);
    }
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/merge-case")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn finish(c: Child, what: &str) -> Out {
    let o = c.wait_with_output().expect("binary runs");
    let out = Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        !out.stderr.contains("panicked"),
        "{what} panicked:\n{}",
        out.stderr
    );
    out
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    bin()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts")
}

fn gm(args: &[&str]) -> Out {
    finish(spawn(args, &[]), &format!("{args:?}"))
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

/// Writes `text` as a recipe in `dir`, with `@` standing for the fixture folder.
fn recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text.replace('@', s(&fixtures()))).unwrap();
    p
}

const WARP: &str = "output: out/warp
dtype: bfloat16
base: sft
shard_size: 60000
models:
  sft: @/sft
steps:
  - name: run_a
    method: ema
    models: [@/run_a/step-100, @/run_a/step-200, @/run_a/step-300]
    decay: 0.005
    steps: [100, 200, 300]
    start: sft
  - name: run_b
    method: ema
    models: [@/run_b/step-100, @/run_b/step-200, @/run_b/step-300]
    decay: 0.5
  - name: slerp
    method: slerp
    models: [run_a, run_b]
    t: 0.5
  - name: warp
    method: liti
    model: slerp
    eta: 0.3
";

/// An η list (one folder per η) plus a saved intermediate step (a second output folder), sharded.
const FRONT: &str = "output: out/front
dtype: float32
base: @/sft
shard_size: 150000
steps:
  - name: slerp
    method: slerp
    models: [@/run_a/step-300, @/run_b/step-300]
    angle: layer
    save: out/slerp
  - name: front
    method: liti
    model: slerp
    eta: [0.0, 0.3, 1.0]
";

/// Every file under `dir` (relative path → bytes), with `seconds` removed from each manifest (it is
/// the one field that differs between two runs).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(&p).unwrap();
            if rel.ends_with("merge-manifest.json") {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let seconds = v.as_object_mut().unwrap().remove("seconds");
                assert!(seconds.is_some_and(|s| s.as_f64().is_some_and(|x| x >= 0.0)));
                bytes = serde_json::to_vec_pretty(&v).unwrap();
            }
            out.insert(rel, bytes);
        }
    }
    out
}

fn assert_same_tree(joined: &Path, plain: &Path) {
    let (a, b) = (tree(joined), tree(plain));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "file lists differ between {} and {}",
        joined.display(),
        plain.display()
    );
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs from the plain run's");
    }
}

/// Names (not starting with `.`-less noise) of the entries of `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The manifest of part `i` of `n` in a staging folder.
fn part_manifest(staging: &Path, i: usize, n: usize) -> serde_json::Value {
    let path = staging.join(format!("part-{i:05}-of-{n:05}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn shards_in(dir: &Path) -> usize {
    entries(dir)
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count()
}

#[test]
fn warp_parts_in_any_order_and_concurrently_join_to_the_plain_run() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    let plain = d.path().join("plain/warp");
    ok(&["-q", "run", s(&r), "--out", s(&plain)]);
    assert!(
        shards_in(&plain) >= 6,
        "the output should be sharded: {:?}",
        entries(&plain)
    );

    // Part 3 first, then 1 and 2 at the same time (2 through SLURM's variables, 1 through Kubernetes').
    ok(&["-q", "run", s(&r), "--part", "3/3"]);
    let staging = d.path().join("out/.warp.gemma-merge-parts");
    assert!(staging.join("part-00003-of-00003.json").is_file());
    assert!(!d.path().join("out/warp").exists());
    let p2 = spawn(
        &["-q", "run", s(&r), "--part", "auto"],
        &[
            ("SLURM_ARRAY_TASK_ID", "11"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    );
    let p1 = spawn(
        &["-q", "run", s(&r), "--part", "auto"],
        &[("JOB_COMPLETION_INDEX", "0"), ("GEMMA_MERGE_PARTS", "3")],
    );
    for (c, name) in [(p1, "part 1"), (p2, "part 2")] {
        let o = finish(c, name);
        assert_eq!(o.code, 0, "{name}: {}", o.stderr);
    }
    // The three parts wrote disjoint shard sets covering every shard, balanced by bytes.
    let mut all: Vec<u64> = Vec::new();
    let mut per_part = Vec::new();
    for i in 1..=3 {
        let m = part_manifest(&staging, i as usize, 3);
        assert_eq!(m["part"], i);
        let shards: Vec<u64> = m["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(!shards.is_empty(), "part {i} got no shard");
        let bytes: u64 = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["size"].as_u64().unwrap())
            .sum();
        per_part.push(bytes);
        all.extend(shards);
    }
    assert_eq!(
        all,
        (0..shards_in(&plain) as u64).collect::<Vec<_>>(),
        "shards by part"
    );
    let (lo, hi) = (
        *per_part.iter().min().unwrap(),
        *per_part.iter().max().unwrap(),
    );
    assert!(
        hi < 2 * lo,
        "parts unbalanced: {per_part:?} bytes (shards of ~60 KB)"
    );

    // Some layer straddles two parts, so its SLERP angle (one per layer) needed tensors of both.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plain.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut part_of_shard = BTreeMap::new();
    for i in 1..=3u64 {
        let m = part_manifest(&staging, i as usize, 3);
        for k in m["shards"].as_array().unwrap() {
            let n = shards_in(&plain);
            part_of_shard.insert(
                format!("model-{:05}-of-{n:05}.safetensors", k.as_u64().unwrap() + 1),
                i,
            );
        }
    }
    let mut parts_of_layer: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (name, file) in index["weight_map"].as_object().unwrap() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let layer = rest.split('.').next().unwrap().to_string();
            let p = part_of_shard[file.as_str().unwrap()];
            let v = parts_of_layer.entry(layer).or_default();
            if !v.contains(&p) {
                v.push(p);
            }
        }
    }
    assert!(
        parts_of_layer.values().any(|v| v.len() > 1),
        "no layer straddles two parts: {parts_of_layer:?}"
    );

    // What a part killed before its commit leaves behind: a temporary folder, cleaned up by the join.
    let killed = staging.join(".part-00002-of-00003.tmp-otherhost-4242");
    std::fs::create_dir(&killed).unwrap();
    std::fs::write(killed.join("model-00005-of-00011.safetensors"), b"partial").unwrap();
    let out = ok(&["run", s(&r), "--join", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["tensors"], 46);
    let joined = d.path().join("out/warp");
    assert_same_tree(&joined, &plain);
    ok(&["-q", "verify", s(&joined)]);
    // The staging folder is gone, and nothing else was left beside the output.
    assert_eq!(entries(&d.path().join("out")), vec!["warp"]);
}

#[test]
fn eta_list_and_saved_step_join_to_the_plain_run() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "front.yaml", FRONT);
    let plain_dir = d.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let plain_recipe = recipe(&plain_dir, "front.yaml", FRONT);
    ok(&["-q", "run", s(&plain_recipe), "--hash-inputs"]);
    let plain = plain_dir.join("out");
    assert_eq!(
        entries(&plain.join("front")),
        vec!["eta-0.0", "eta-0.3", "eta-1.0"]
    );
    assert!(shards_in(&plain.join("front/eta-0.3")) >= 3);

    // Two at once, then the third; each hashes its share of the input files.
    let p2 = spawn(&["-q", "run", s(&r), "--part", "2/3", "--hash-inputs"], &[]);
    let p3 = spawn(&["-q", "run", s(&r), "--part", "3/3", "--hash-inputs"], &[]);
    for (c, name) in [(p2, "part 2"), (p3, "part 3")] {
        let o = finish(c, name);
        assert_eq!(o.code, 0, "{name}: {}", o.stderr);
    }
    ok(&["-q", "run", s(&r), "--part", "1/3", "--hash-inputs"]);
    // Every η folder and the saved step's folder got the same shards from part 1.
    let staging = d.path().join("out/.front.gemma-merge-parts");
    let first: Vec<String> = entries(&staging.join("eta-0.0"));
    assert!(!first.is_empty());
    assert_eq!(entries(&staging.join("eta-1.0")), first);
    assert_eq!(
        entries(&d.path().join("out/.slerp.gemma-merge-parts")),
        first
    );

    ok(&["-q", "join", s(&r)]);
    let out = d.path().join("out");
    // The recipe's own file name is recorded, and both recipes are called front.yaml: compare by folder.
    for sub in ["front", "slerp"] {
        let a = tree(&out.join(sub));
        let b = tree(&plain.join(sub));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, bytes) in &a {
            if name.ends_with("merge-manifest.json") {
                // Paths differ only by the recipe's folder: compare with it replaced.
                let a = String::from_utf8(bytes.clone()).unwrap();
                let b = String::from_utf8(b[name].clone()).unwrap();
                assert_eq!(
                    a.replace(s(d.path()), "DIR"),
                    b.replace(s(&plain_dir), "DIR"),
                    "{sub}/{name}"
                );
                assert!(a.contains("\"sha256\""), "input hashes recorded");
            } else {
                assert!(
                    bytes == &b[name],
                    "{sub}/{name} differs from the plain run's"
                );
            }
        }
        ok(&["-q", "verify", s(&out.join(sub))]);
    }
    assert_eq!(entries(&out), vec!["front", "slerp"]);
}

#[test]
fn an_unsharded_output_splits_into_one_busy_part_and_empty_ones() {
    let d = tempfile::tempdir().unwrap();
    let text = WARP.replace("shard_size: 60000\n", "");
    let r = recipe(d.path(), "warp.yaml", &text);
    let plain = d.path().join("plain/warp");
    ok(&["-q", "run", s(&r), "--out", s(&plain)]);
    assert_eq!(shards_in(&plain), 1);
    for i in [2, 1] {
        ok(&["-q", "run", s(&r), "--part", &format!("{i}/2")]);
    }
    let staging = d.path().join("out/.warp.gemma-merge-parts");
    let m = part_manifest(&staging, 2, 2);
    assert_eq!(m["shards"], serde_json::json!([]));
    ok(&["-q", "join", s(&r)]);
    assert_same_tree(&d.path().join("out/warp"), &plain);
}

#[test]
fn slerp_by_tensor_in_four_parts_joins_to_the_plain_run() {
    let d = tempfile::tempdir().unwrap();
    let text = "output: out/slerp\ndtype: float32\nbase: @/sft\nshard_size: 100000\nsteps:\n  - name: slerp\n    \
                method: slerp\n    models: [@/run_a/step-300, @/run_b/step-300]\n    t: 0.3\n    angle: tensor\n";
    let r = recipe(d.path(), "slerp.yaml", text);
    let plain = d.path().join("plain/slerp");
    ok(&["-q", "run", s(&r), "--out", s(&plain)]);
    assert!(shards_in(&plain) >= 8);
    for i in [4, 2, 1, 3] {
        ok(&["-q", "run", s(&r), "--part", &format!("{i}/4")]);
    }
    ok(&["-q", "join", s(&r)]);
    assert_same_tree(&d.path().join("out/slerp"), &plain);
}

#[test]
fn a_rerun_part_replaces_only_its_own_files() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    for i in 1..=3 {
        ok(&["-q", "run", s(&r), "--part", &format!("{i}/3")]);
    }
    let staging = d.path().join("out/.warp.gemma-merge-parts");
    let stamp = |name: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(staging.join(name)).unwrap();
        (m.ino(), m.mtime_nsec(), m.mtime())
    };
    let files_of = |i: usize| -> Vec<String> {
        let m = part_manifest(&staging, i, 3);
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect()
    };
    let others: Vec<String> = [1, 3]
        .iter()
        .flat_map(|&i| files_of(i))
        .chain([
            "part-00001-of-00003.json".into(),
            "part-00003-of-00003.json".into(),
        ])
        .collect();
    // Another machine's part in progress (its process id means nothing here): left alone.
    let elsewhere = staging.join(".part-00003-of-00003.tmp-otherhost-1");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(
        elsewhere.join("model-00009-of-00011.safetensors"),
        b"in progress",
    )
    .unwrap();
    let before: Vec<_> = others.iter().map(|n| stamp(n)).collect();
    let mine_before: Vec<_> = files_of(2).iter().map(|n| stamp(n)).collect();
    ok(&["-q", "run", s(&r), "--part", "2/3"]);
    let after: Vec<_> = others.iter().map(|n| stamp(n)).collect();
    assert_eq!(before, after, "another part's files were touched");
    let mine_after: Vec<_> = files_of(2).iter().map(|n| stamp(n)).collect();
    assert!(
        mine_before.iter().zip(&mine_after).all(|(a, b)| a.0 != b.0),
        "part 2's files were not replaced"
    );
    assert!(elsewhere.join("model-00009-of-00011.safetensors").is_file());
    // No temporary folder of this machine is left behind.
    assert_eq!(
        entries(&staging)
            .iter()
            .filter(|n| n.starts_with('.'))
            .collect::<Vec<_>>(),
        vec![".part-00003-of-00003.tmp-otherhost-1"]
    );
    let plain = d.path().join("plain/warp");
    ok(&["-q", "run", s(&r), "--out", s(&plain)]);
    ok(&["-q", "join", s(&r)]);
    assert_same_tree(&d.path().join("out/warp"), &plain);
    // Once every part is joined, leftovers of killed parts go with the staging folder.
    assert_eq!(entries(&d.path().join("out")), vec!["warp"]);
}

/// Lists everything under `dir` (paths and sizes), to show that a refused join wrote nothing.
fn snapshot(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::metadata(&p).unwrap();
            out.push((p.display().to_string(), meta.len()));
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_missing_part_fails_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    let nothing = gm(&["run", s(&r), "--join"]);
    assert_eq!(nothing.code, 1);
    assert!(
        nothing.stderr.contains("no parts to join"),
        "{}",
        nothing.stderr
    );

    ok(&["-q", "run", s(&r), "--part", "1/3"]);
    ok(&["-q", "run", s(&r), "--part", "3/3"]);
    let before = snapshot(d.path());
    let o = gm(&["join", s(&r)]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.starts_with("error: ")
            && o.stderr.contains("part-00002-of-00003.json")
            && o.stderr.contains("part 2/3 is missing"),
        "{}",
        o.stderr
    );
    assert_eq!(snapshot(d.path()), before, "a refused join changed files");

    // A part's shard deleted or truncated after it ran is caught by size, naming the file.
    ok(&["-q", "run", s(&r), "--part", "2/3"]);
    let staging = d.path().join("out/.warp.gemma-merge-parts");
    let m = part_manifest(&staging, 2, 3);
    let victim = staging.join(m["files"][0]["path"].as_str().unwrap());
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 1]).unwrap();
    let o = gm(&["join", s(&r)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains(victim.file_name().unwrap().to_str().unwrap())
            && o.stderr.contains("rerun `run --part 2/3`"),
        "{}",
        o.stderr
    );
    assert!(!d.path().join("out/warp").exists());
}

#[test]
fn stale_and_foreign_parts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    let other = recipe(
        d.path(),
        "other.yaml",
        &WARP.replace("eta: 0.3", "eta: 0.6"),
    );
    // Part 2 comes from another recipe writing to the same folder.
    ok(&["-q", "run", s(&r), "--part", "1/2"]);
    ok(&["-q", "run", s(&other), "--part", "2/2"]);
    let before = snapshot(d.path());
    let o = gm(&["join", s(&r)]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("part-00002-of-00002.json")
            && o.stderr.contains("belongs to another recipe")
            && o.stderr.contains("other.yaml"),
        "{}",
        o.stderr
    );
    assert_eq!(snapshot(d.path()), before);
    // The other recipe refuses part 1 the same way.
    let o = gm(&["join", s(&other)]);
    assert!(
        o.code == 1 && o.stderr.contains("part-00001-of-00002.json"),
        "{}",
        o.stderr
    );

    // The recipe edited after part 1 ran: part 1 is stale.
    ok(&["-q", "run", s(&r), "--part", "2/2"]);
    std::fs::write(
        &r,
        std::fs::read_to_string(&r)
            .unwrap()
            .replace("eta: 0.3", "eta: 0.4"),
    )
    .unwrap();
    ok(&["-q", "run", s(&r), "--part", "2/2"]);
    let o = gm(&["join", s(&r)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("part-00001-of-00002.json") && o.stderr.contains("stale"),
        "{}",
        o.stderr
    );

    // Parts of two different splits in one staging folder are refused, naming both.
    ok(&["-q", "run", s(&r), "--part", "1/3"]);
    let o = gm(&["join", s(&r)]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("of 2") && o.stderr.contains("of 3"),
        "{}",
        o.stderr
    );
    assert!(!d.path().join("out/warp").exists());
}

#[test]
fn bad_part_numbers_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    for spec in ["0/3", "4/3", "auto", "3", "1/0", "x/3"] {
        let o = gm(&["run", s(&r), "--part", spec]);
        assert_eq!(o.code, 2, "--part {spec}: {}", o.stderr);
        assert!(
            o.stderr.starts_with("error: ") && o.stderr.contains("--part"),
            "--part {spec}: {}",
            o.stderr
        );
    }
    let o = gm(&["run", s(&r), "--part", "1/2", "--join"]);
    assert_eq!(o.code, 2);
    // Nothing was created.
    assert_eq!(entries(d.path()), vec!["warp.yaml"]);
}

#[test]
fn a_part_refuses_an_existing_output_and_a_dry_run_names_its_shards() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), "warp.yaml", WARP);
    let o = ok(&["run", s(&r), "--part", "2/3", "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (v["part"].clone(), v["parts"].clone()),
        (2.into(), 3.into())
    );
    assert!(!v["shards"].as_array().unwrap().is_empty());
    assert!(v["bytes"].as_u64().unwrap() < v["total_bytes"].as_u64().unwrap());
    assert_eq!(entries(d.path()), vec!["warp.yaml"]);

    std::fs::create_dir_all(d.path().join("out/warp")).unwrap();
    let o = gm(&["run", s(&r), "--part", "1/3"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert_eq!(entries(&d.path().join("out")), vec!["warp"]);
}
