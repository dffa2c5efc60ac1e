//! Never destroy what we did not write: every command that writes (`run`, `front --keep/--plot`,
//! `eval --dump-logits`, `synth`) refuses, with exit code 2 and an `error:` line naming the culprit, any
//! output that is, contains or lies inside an input, or that exists and is not ours; a refused command
//! leaves the whole tree byte for byte as it was, and a killed one leaves no temporary behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::s;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
}

struct Out {
    code: i32,
    stderr: String,
}

fn gm(args: &[&str]) -> Out {
    let o = bin().args(args).output().expect("binary runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) {
    let o = gm(args);
    assert_eq!(o.code, 0, "gemma-merge {args:?} failed:\n{}", o.stderr);
}

const IDS: &str = "2,71,294,35,133,63,256,233,244,336,197,110,51,252,17,202";

/// Every file (and symlink) under `root`: relative path → content (symlinks: their target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, target.into_os_string().into_encoded_bytes());
            } else if meta.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Runs a command that must be refused with `code` and an error naming `needles`, changing nothing.
#[track_caller]
fn refused(root: &Path, code: i32, args: &[&str], needles: &[&str]) -> String {
    let before = snapshot(root);
    let o = gm(args);
    assert_eq!(o.code, code, "{args:?}:\n{}", o.stderr);
    assert!(o.stderr.starts_with("error: "), "{args:?}: {}", o.stderr);
    assert_eq!(o.stderr.trim_end().lines().count(), 1, "{}", o.stderr);
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "{args:?}: expected {n:?} in {}",
            o.stderr
        );
    }
    let after = snapshot(root);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{args:?} added or removed files"
    );
    assert!(before == after, "{args:?} changed a file");
    o.stderr
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

const RECIPE: &str = "output: out\ndtype: float32\nbase: sft\nsteps:\n  - name: slerp\n    method: slerp\n    models: [a, b]\n  - name: front\n    method: liti\n    model: slerp\n    eta: [0.0, 0.5]\n";

/// A folder with the merge case's init (`sft`), two policies (`a`, `b`) and a front recipe.
fn workspace() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/merge-case");
    copy_dir(&case.join("sft"), &d.path().join("sft"));
    copy_dir(&case.join("run_a/step-300"), &d.path().join("a"));
    copy_dir(&case.join("run_b/step-300"), &d.path().join("b"));
    let recipe = d.path().join("r.yaml");
    std::fs::write(&recipe, RECIPE).unwrap();
    (d, recipe)
}

fn no_temporaries(root: &Path) {
    for p in snapshot(root).keys() {
        let name = p.to_string_lossy();
        assert!(
            !name.contains(".gemma-merge-tmp-") && !name.contains(".gemma-merge-old-"),
            "left behind: {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// run

#[test]
fn run_force_never_replaces_a_folder_gemma_merge_did_not_write() {
    let (d, recipe) = workspace();
    let r = d.path();
    // A user's folder, holding notes, data and the recipe itself.
    let user = r.join("mine");
    std::fs::create_dir_all(user.join("data")).unwrap();
    std::fs::write(user.join("notes.txt"), "keep me").unwrap();
    std::fs::write(user.join("data/x.bin"), [1u8, 2, 3]).unwrap();
    refused(
        r,
        2,
        &["run", s(&recipe), "--out", s(&user), "--force"],
        &[
            "mine holds `data` and no merge-manifest.json that lists it",
            "even with --force",
        ],
    );
    let inner = user.join("r2.yaml");
    std::fs::write(
        &inner,
        RECIPE
            .replace("sft", "../sft")
            .replace("[a, b]", "[../a, ../b]"),
    )
    .unwrap();
    refused(
        r,
        2,
        &["run", s(&inner), "--out", s(&user), "--force"],
        &["contains the recipe"],
    );
    // A regular file never becomes a folder (and is not hidden as `.NAME...old`).
    let file = r.join("file");
    std::fs::write(&file, "a file").unwrap();
    refused(
        r,
        2,
        &["run", s(&recipe), "--out", s(&file), "--force"],
        &["file is not a folder"],
    );
    // An output of ours with a user's file added is not ours any more.
    let out = r.join("out");
    ok(&["-q", "run", s(&recipe)]);
    std::fs::write(out.join("eta-0.5/notes.txt"), "mine").unwrap();
    refused(
        r,
        2,
        &["run", s(&recipe), "--force"],
        &["holds `eta-0.5/notes.txt`, which its eta-0.5/merge-manifest.json does not list"],
    );
    std::fs::remove_file(out.join("eta-0.5/notes.txt")).unwrap();
    // A foreign manifest does not make a folder ours.
    let fake = r.join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(
        fake.join("merge-manifest.json"),
        r#"{"tool": "other", "outputs": []}"#,
    )
    .unwrap();
    refused(
        r,
        2,
        &["run", s(&recipe), "--out", s(&fake), "--force"],
        &["not written by gemma-merge"],
    );
    // A symlink to our own output is not replaced either (that would replace the link, not the folder).
    #[cfg(unix)]
    {
        let link = r.join("link");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        refused(
            r,
            2,
            &["run", s(&recipe), "--out", s(&link), "--force"],
            &["is a symbolic link"],
        );
    }
    // Ours: replaced with --force, and nothing hidden is left beside it.
    ok(&["-q", "run", s(&recipe), "--force"]);
    ok(&["verify", s(&out)]);
    no_temporaries(r);
}

#[test]
fn outputs_may_not_touch_inputs_through_dotdot_or_symlinks() {
    let (d, recipe) = workspace();
    let r = d.path();
    for (out, needle) in [
        ("sft/merged", "lies inside the input model `sft`"),
        ("nonexist/../sft", "is the input model `sft`"),
        ("sft/x/../../a", "is the input model `a`"),
        (".", "contains the input model"),
        ("r.yaml", "is the recipe"),
        ("sft/model-00001-of-00002.safetensors", "input model `sft`"),
    ] {
        for force in [false, true] {
            let mut args = vec!["run", s(&recipe), "--out"];
            let path = r.join(out);
            args.push(s(&path));
            if force {
                args.push("--force");
            }
            refused(r, 2, &args, &[needle]);
            args.push("--dry-run");
            refused(r, 2, &args, &[needle]);
        }
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(r.join("a"), r.join("alias")).unwrap();
        refused(
            r,
            2,
            &["run", s(&recipe), "--out", s(&r.join("alias/m"))],
            &["lies inside the input model `a`"],
        );
    }
    // A `save:`d step and the output that name one folder through `..` over a missing folder.
    let twice = r.join("twice.yaml");
    std::fs::write(
        &twice,
        RECIPE.replace(
            "models: [a, b]\n",
            "models: [a, b]\n    save: nonexist/../out\n",
        ),
    )
    .unwrap();
    refused(
        r,
        2,
        &["run", s(&twice)],
        &[
            "the output",
            "the output of step `slerp`",
            "are the same path",
        ],
    );
    let nested = r.join("nested.yaml");
    std::fs::write(
        &nested,
        RECIPE.replace("models: [a, b]\n", "models: [a, b]\n    save: out/inner\n"),
    )
    .unwrap();
    refused(r, 2, &["run", s(&nested)], &["overlap"]);
    // `..` over a missing folder: written where the OS resolves it, without creating the missing folder.
    let fresh = r.join("nonexist/../fresh");
    ok(&["-q", "run", s(&recipe), "--out", s(&fresh)]);
    assert!(r.join("fresh/eta-0.5/merge-manifest.json").exists());
    assert!(!r.join("nonexist").exists());
    refused(
        r,
        2,
        &["run", s(&recipe), "--out", s(&fresh)],
        &["exists (pass --force"],
    );
    ok(&["-q", "run", s(&recipe), "--out", s(&fresh), "--force"]);
    let up = r.join("fresh/eta-0.5/..");
    refused(
        r,
        2,
        &["run", s(&recipe), "--out", s(&up), "--force"],
        &["output"],
    );
    no_temporaries(r);
}

#[test]
fn dry_run_rejects_what_the_run_would_reject() {
    let (d, recipe) = workspace();
    let r = d.path();
    ok(&["-q", "run", s(&recipe)]);
    refused(
        r,
        2,
        &["run", s(&recipe), "--dry-run"],
        &["out exists (pass --force to replace it)"],
    );
    ok(&["-q", "run", s(&recipe), "--dry-run", "--force"]);
    let foreign = r.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("x"), "x").unwrap();
    refused(
        r,
        2,
        &[
            "run",
            s(&recipe),
            "--out",
            s(&foreign),
            "--dry-run",
            "--force",
        ],
        &["foreign", "even with --force"],
    );
    // The base's config.json is copied into every output: invalid JSON fails before anything is written.
    std::fs::write(r.join("sft/config.json"), "{not json").unwrap();
    for extra in [&["--dry-run"][..], &[]] {
        let mut args = vec!["run", s(&recipe), "--force", "--out"];
        let o = r.join("new");
        args.push(s(&o));
        args.extend_from_slice(extra);
        refused(r, 1, &args, &["config.json", "invalid JSON"]);
    }
}

// ---------------------------------------------------------------------------------------------------
// eval --dump-logits, front --plot / --keep

#[test]
fn dump_logits_never_truncates_an_input_or_a_foreign_file() {
    let (d, _) = workspace();
    let r = d.path();
    let model = r.join("sft");
    let weights = model.join("model-00001-of-00002.safetensors");
    for force in [false, true] {
        let mut args = vec![
            "eval",
            s(&model),
            "--token-ids",
            IDS,
            "--dump-logits",
            s(&weights),
        ];
        if force {
            args.push("--force");
        }
        refused(r, 2, &args, &["lies inside the model"]);
    }
    let text = r.join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    refused(
        r,
        2,
        &[
            "eval",
            s(&model),
            "--text",
            s(&text),
            "--dump-logits",
            s(&text),
            "--force",
        ],
        &["is the --text file"],
    );
    // Someone else's file: exists without --force, not ours with it.
    let foreign = r.join("foreign.safetensors");
    std::fs::copy(&weights, &foreign).unwrap();
    refused(
        r,
        2,
        &[
            "eval",
            s(&model),
            "--token-ids",
            IDS,
            "--dump-logits",
            s(&foreign),
        ],
        &["foreign.safetensors is not a logits file written by `eval --dump-logits`"],
    );
    refused(
        r,
        2,
        &[
            "eval",
            s(&model),
            "--token-ids",
            IDS,
            "--dump-logits",
            s(&foreign),
            "--force",
        ],
        &["is not a logits file written by `eval --dump-logits`"],
    );
    refused(
        r,
        2,
        &[
            "eval",
            s(&model),
            "--token-ids",
            IDS,
            "--dump-logits",
            s(&r.join("a")),
            "--force",
        ],
        &["is a folder, not a file"],
    );
    // Our own logits file: replaced only with --force.
    let dump = r.join("logits.safetensors");
    ok(&[
        "eval",
        s(&model),
        "--token-ids",
        IDS,
        "--dump-logits",
        s(&dump),
    ]);
    let first = std::fs::read(&dump).unwrap();
    refused(
        r,
        2,
        &[
            "eval",
            s(&model),
            "--token-ids",
            IDS,
            "--dump-logits",
            s(&dump),
        ],
        &["exists"],
    );
    ok(&[
        "eval",
        s(&model),
        "--token-ids",
        "2,71,294",
        "--dump-logits",
        s(&dump),
        "--force",
    ]);
    assert!(std::fs::read(&dump).unwrap().len() < first.len());
    no_temporaries(r);
}

#[test]
fn front_plot_and_keep_never_replace_inputs_or_foreign_files() {
    let (d, recipe) = workspace();
    let r = d.path();
    let front = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["front", s(&recipe), "--token-ids", IDS, "--no-policies"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let refuse = |extra: &[&str], needles: &[&str]| {
        let args = front(extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(r, 2, &a, needles);
    };
    let weights = r.join("a/model-00001-of-00002.safetensors");
    refuse(
        &["--plot", s(&weights)],
        &["lies inside the input model `a`"],
    );
    refuse(
        &["--plot", s(&weights), "--force"],
        &["lies inside the input model `a`"],
    );
    refuse(&["--plot", s(&recipe), "--force"], &["is the recipe"]);
    let text = r.join("t.txt");
    std::fs::write(&text, "x").unwrap();
    let foreign = r.join("notes.svg");
    std::fs::write(
        &foreign,
        "<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>\n",
    )
    .unwrap();
    refuse(
        &["--plot", s(&foreign)],
        &["notes.svg is not an SVG plot written by `front --plot`"],
    );
    refuse(
        &["--plot", s(&foreign), "--force"],
        &["is not an SVG plot written by `front --plot`"],
    );
    // --keep: never onto the reference, an input, or the plot; exit 2 like `run`.
    let reference = r.join("b");
    refuse(
        &[
            "--keep",
            s(&reference),
            "--force",
            "--reference",
            s(&reference),
        ],
        &["the reference"],
    );
    refuse(
        &["--keep", s(&r.join("sft")), "--force"],
        &["is the input model `sft`"],
    );
    refuse(
        &["--keep", s(&r.join("sft/kept"))],
        &["lies inside the input model `sft`"],
    );
    let keep = r.join("kept");
    refuse(
        &["--keep", s(&keep), "--plot", s(&keep.join("p.svg"))],
        &["the --keep folder", "the --plot file", "overlap"],
    );
    // Ours: written, then replaced only with --force.
    let plot = r.join("front.svg");
    let args = front(&["--plot", s(&plot), "--keep", s(&keep)]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    refuse(&["--plot", s(&plot)], &["exists"]);
    refuse(&["--keep", s(&keep)], &["exists"]);
    let args = front(&["--plot", s(&plot), "--keep", s(&keep), "--force"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&["verify", s(&keep)]);
    no_temporaries(r);
}

#[test]
fn synth_never_overwrites_and_stays_out_of_its_base() {
    let (d, _) = workspace();
    let r = d.path();
    refused(
        r,
        2,
        &[
            "synth",
            "--from",
            s(&r.join("a")),
            "--drift",
            "0.01",
            "--out",
            s(&r.join("a/x")),
        ],
        &["lies inside the --from model"],
    );
    refused(
        r,
        2,
        &[
            "synth",
            "--from",
            s(&r.join("a")),
            "--drift",
            "0.01",
            "--out",
            s(&r.join("b")),
        ],
        &["already exists (synth never overwrites)"],
    );
}

// ---------------------------------------------------------------------------------------------------
// Temporaries: removed on SIGINT/SIGTERM/SIGHUP, and by the next run after SIGKILL

/// A one-layer model with Gemma 2 2b's layout and the given sizes, written by `synth`.
fn synth_one_layer(out: &Path, vocab: &str, hidden: &str, mlp: &str, seed: &str) {
    ok(&[
        "-q",
        "synth",
        "--shape",
        "2b",
        "--layers",
        "1",
        "--vocab-size",
        vocab,
        "--hidden-size",
        hidden,
        "--intermediate-size",
        mlp,
        "--seed",
        seed,
        "--out",
        s(out),
    ]);
}

/// A process id that is not running (a child that has exited and been reaped).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn stale_temporaries_of_dead_runs_are_cleaned_and_interrupted_swaps_restored() {
    let (d, recipe) = workspace();
    let r = d.path();
    let pid = dead_pid();
    let stale = r.join(format!(".out.gemma-merge-tmp-{pid}"));
    std::fs::create_dir_all(stale.join("eta-0.5")).unwrap();
    std::fs::write(stale.join("eta-0.5/model.safetensors"), [0u8; 64]).unwrap();
    let stale_file = r.join(format!(".x.svg.gemma-merge-tmp-{pid}"));
    std::fs::write(&stale_file, "<svg").unwrap();
    // Not ours (a user's file among the shards): left alone.
    let odd = r.join(format!(".odd.gemma-merge-tmp-{pid}"));
    std::fs::create_dir(&odd).unwrap();
    std::fs::write(odd.join("thesis.tex"), "mine").unwrap();
    // A live process's temporary: left alone.
    let live = r.join(format!(".live.gemma-merge-tmp-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    // A swap interrupted between its two renames: the old copy is put back.
    let old = r.join(format!(".kept.gemma-merge-old-{pid}"));
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("merge-manifest.json"), "{}").unwrap();
    ok(&["-q", "run", s(&recipe)]);
    assert!(!stale.exists() && !stale_file.exists());
    assert!(odd.join("thesis.tex").exists() && live.exists());
    assert!(!old.exists() && r.join("kept/merge-manifest.json").exists());
}

/// Starts `args`, waits until its temporary appears in `dir`, then delivers `signal` (the process is
/// stopped first so that it cannot finish in between) and returns its exit status.
#[cfg(unix)]
fn kill_while_writing(args: &[&str], dir: &Path, signal: &str) -> std::process::ExitStatus {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp_prefix = ".out.gemma-merge-tmp-";
    let started = Instant::now();
    loop {
        let seen = std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(tmp_prefix))
        });
        if seen {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{args:?} ended ({status}) before its temporary was seen");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no temporary appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    kill("-STOP");
    kill(signal);
    if signal != "-KILL" {
        kill("-CONT");
    }
    child.wait().unwrap()
}

#[cfg(unix)]
#[test]
fn killed_runs_leave_no_temporary() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    // Two inputs large enough that a merge takes a while (about 60 MB each).
    for (name, seed) in [("p", "1"), ("q", "2")] {
        synth_one_layer(&r.join(name), "1000", "2304", "2048", seed);
    }
    let recipe = r.join("r.yaml");
    std::fs::write(
        &recipe,
        "output: out\nbase: p\nsteps:\n  - name: m\n    method: linear\n    models: [p, q]\n    weights: [1, 1]\n",
    )
    .unwrap();
    // The output's parent folders do not exist yet: the run creates them, and removes them when stopped.
    let deep = r.join("new/deeper/out");
    let args = ["-q", "--threads", "1", "run", s(&recipe), "--out", s(&deep)];
    for (signal, code) in [("-TERM", 143), ("-INT", 130), ("-HUP", 129)] {
        let status = kill_while_writing(&args, &r.join("new/deeper"), signal);
        assert_eq!(status.code(), Some(code), "{signal}: {status}");
        no_temporaries(r);
        assert!(
            !r.join("new").exists(),
            "{signal}: created folders left behind"
        );
    }
    let args = ["-q", "--threads", "1", "run", s(&recipe)];
    // SIGKILL cannot be caught: the temporary stays until the next run beside it removes it.
    let status = kill_while_writing(&args, r, "-KILL");
    assert_eq!(status.signal(), Some(9));
    ok(&args);
    no_temporaries(r);
    ok(&["verify", s(&r.join("out"))]);
}

// ---------------------------------------------------------------------------------------------------
// Group 5: validation up front, nothing left behind, messages that help

#[test]
fn failed_runs_leave_no_folder_they_created() {
    let (d, recipe) = workspace();
    let r = d.path();
    // A NaN at the end of a policy's last shard: found only while merging, after the outputs are staged.
    let shard = r.join("b/model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&[0xff; 4]);
    std::fs::write(&shard, bytes).unwrap();
    let before = snapshot(r);
    let o = gm(&["run", s(&recipe), "--out", s(&r.join("new/deep/out"))]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("non-finite"), "{}", o.stderr);
    assert!(snapshot(r) == before, "a failed run left something behind");
    // A parent that is a file: refused up front, by --dry-run too.
    std::fs::write(r.join("afile"), "x").unwrap();
    for dry in [true, false] {
        let out = r.join("afile/sub");
        let mut args = vec!["run", s(&recipe), "--out", s(&out)];
        if dry {
            args.push("--dry-run");
        }
        refused(
            r,
            2,
            &args,
            &["afile/sub: cannot be created, because", "is not a folder"],
        );
    }
}

#[test]
fn messages_say_each_thing_once_without_library_internals() {
    let (d, _) = workspace();
    let r = d.path();
    let yaml = |name: &str, body: &str| -> String {
        let p = r.join(name);
        std::fs::write(&p, body).unwrap();
        let o = gm(&["run", s(&p)]);
        assert_eq!(o.code, 2, "{body}: {}", o.stderr);
        assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
        assert!(!r.join("out").exists());
        for internal in ["budget", "Options", "{ ", "line 1 column", "at line"] {
            assert!(!o.stderr.contains(internal), "{body}: {}", o.stderr);
        }
        o.stderr
    };
    let e = yaml("dup.yaml", "output: out\nbase: sft\nbase: a\nsteps: []\n");
    assert_eq!(
        e.trim_end(),
        format!(
            "error: {}:3:1: duplicate key `base`",
            s(&r.join("dup.yaml"))
        )
    );
    let e = yaml("typo.yaml", "output: out\nbase: sft\nsteps:\n  - name: e\n    method: ema\n    models: [sft, a]\n    decai: 0.5\n");
    assert!(
        e.contains("typo.yaml:7:5: unknown field `decai` (did you mean `decay`?)"),
        "{e}"
    );
    let e = yaml("typo2.yaml", "output: out\nbase: sft\nstepz: []\n");
    assert!(
        e.contains("unknown field `stepz` (did you mean `steps`?)"),
        "{e}"
    );
    let e = yaml("ref.yaml", &RECIPE.replace("model: slerp", "model: slepr"));
    assert!(
        e.contains("`slepr` is not a step") && e.contains("(did you mean `slerp`?)"),
        "{e}"
    );
    let e = yaml("far.yaml", "output: out\nbase: sft\ntemperature: 1\n");
    assert!(
        e.contains("unknown field `temperature`; expected one of `output`"),
        "{e}"
    );
    let e = yaml("syntax.yaml", "output: out\n  base: [\n");
    assert!(e.contains("syntax.yaml:2:7: mapping values"), "{e}");
    assert!(!e.contains("line 2") && !e.contains("at line"), "{e}");
    let big = format!(
        "output: out\nbase: sft\nsteps:\n  - name: e\n    method: linear\n    models: [{}]\n",
        vec!["a"; 260_000].join(",")
    );
    let e = yaml("big.yaml", &big);
    assert!(e.contains("recipe too large or too deeply nested"), "{e}");
    let e = yaml("deep.yaml", &"[".repeat(100_000));
    assert!(e.contains("too deeply nested"), "{e}");

    // A missing path is named once, with the OS error once.
    for args in [
        &["eval", s(&r.join("nothere")), "--token-ids", "2,3"][..],
        &["inspect", s(&r.join("nothere"))],
        &["run", s(&r.join("nothere.yaml"))],
        &["verify", s(&r.join("nothere"))],
    ] {
        let o = gm(args);
        assert_eq!(o.code, 1, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("nothere"), "{}", o.stderr);
        assert_eq!(o.stderr.matches("(os error 2)").count(), 1, "{}", o.stderr);
        assert!(!o.stderr.contains("config.json"), "{}", o.stderr);
    }
}

#[test]
fn a_shape_mismatch_names_the_recipe_step() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for (name, mlp) in [("p", "8"), ("q", "12")] {
        synth_one_layer(&r.join(name), "10", "8", mlp, "0");
    }
    let recipe = r.join("r.yaml");
    std::fs::write(
        &recipe,
        "output: out\nbase: p\nsteps:\n  - name: mix\n    method: linear\n    models: [p, q]\n    weights: [1, 1]\n",
    )
    .unwrap();
    for dry in [true, false] {
        let mut args = vec!["run", s(&recipe)];
        if dry {
            args.push("--dry-run");
        }
        let e = refused(
            r,
            1,
            &args,
            &["step `mix` (", "r.yaml:4): tensor `model.layers.0.mlp."],
        );
        assert!(
            e.contains("has shape [12, 8] in") || e.contains("has shape [8, 12] in"),
            "{e}"
        );
    }
}
