//! The command line as its users meet it: help with examples, completions, flags, JSON shapes, `-v`,
//! normalised paths, progress on a terminal.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::s;
use common::{gm, Out};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn case() -> PathBuf {
    root().join("fixtures/merge-case")
}

fn ok(args: &[&str]) -> Out {
    let o = gm(args);
    assert_eq!(
        o.code, 0,
        "gemma-merge {args:?}:\n{}\n{}",
        o.stdout, o.stderr
    );
    o
}

fn json(args: &[&str]) -> serde_json::Value {
    let o = ok(args);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.stdout))
}

const COMMANDS: [&str; 9] = [
    "run",
    "verify",
    "inspect",
    "eval",
    "generate",
    "compare",
    "front",
    "synth",
    "completions",
];

#[test]
fn every_help_has_an_example_and_lists_global_flags_apart() {
    let top = ok(&["--help"]).stdout;
    assert!(top.contains("Examples:\n  gemma-merge run "), "{top}");
    for cmd in COMMANDS {
        let help = ok(&[cmd, "--help"]).stdout;
        assert!(
            help.contains(&format!("Examples:\n  gemma-merge {cmd} ")),
            "{cmd} --help has no example:\n{help}"
        );
        let (own, global) = help
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("{cmd} --help has no global section:\n{help}"));
        assert!(
            !own.contains("--threads"),
            "{cmd}: --threads among its own flags"
        );
        for flag in ["--threads <N>", "-q, --quiet", "-v, --verbose"] {
            assert!(
                global.contains(flag),
                "{cmd}: {flag} not under Global options"
            );
        }
    }
}

#[test]
fn completions_are_generated_for_each_shell() {
    let bash = ok(&["completions", "bash"]).stdout;
    assert!(bash.contains("_gemma__merge()"), "{bash}");
    assert!(bash.contains("complete -F _gemma__merge"), "{bash}");
    for cmd in ["front", "synth", "--max-prompt-tokens"] {
        assert!(bash.contains(cmd), "bash completion lacks {cmd}");
    }
    assert!(ok(&["completions", "zsh"])
        .stdout
        .contains("#compdef gemma-merge"));
    assert!(ok(&["completions", "fish"])
        .stdout
        .contains("complete -c gemma-merge"));
    assert_eq!(gm(&["completions", "tcsh"]).code, 2);
}

#[test]
fn synth_help_shows_shape_or_from_as_required() {
    let help = ok(&["synth", "--help"]).stdout;
    assert!(help.contains("<--shape <SHAPE>|--from <MODEL>>"), "{help}");
    let o = gm(&["synth", "--out", "never-written"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("--shape"), "{}", o.stderr);
}

#[test]
fn generate_max_prompt_tokens_keeps_the_old_name_and_echoes_the_prompt() {
    let sft = root().join("fixtures/demo/sft");
    let args = |flag: &str| {
        json(&[
            "generate",
            s(&sft),
            "--token-ids",
            "2,651,1000,37,90",
            flag,
            "3",
            "--max-new-tokens",
            "4",
            "--json",
        ])
    };
    let new = args("--max-prompt-tokens");
    assert_eq!(new["prompt_tokens"], 3);
    assert_eq!(new, {
        let mut old = args("--max-tokens");
        // Timings differ from run to run.
        for k in ["prefill_tokens_per_second", "decode_tokens_per_second"] {
            old[k] = new[k].clone();
        }
        old
    });
    let help = ok(&["generate", "--help"]).stdout;
    assert!(!help.contains("--max-tokens <N>"), "{help}");

    // The prompt is printed before the continuation unless --no-echo (or -q, or --json).
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            s(&sft),
            "--prompt",
            "This License",
            "--max-new-tokens",
            "6",
        ];
        a.extend_from_slice(extra);
        ok(&a).stdout
    };
    let text = json(&[
        "generate",
        s(&sft),
        "--prompt",
        "This License",
        "--max-new-tokens",
        "6",
        "--json",
    ])["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gen(&[]), format!("This License{text}\n"));
    assert_eq!(gen(&["--no-echo"]), format!("{text}\n"));
    assert_eq!(gen(&["-q"]), format!("{text}\n"));
}

#[test]
fn verify_json_reports_each_file_and_still_fails_on_a_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lin");
    ok(&[
        "-q",
        "run",
        s(&case().join("recipes/linear.yaml")),
        "--out",
        s(&out),
    ]);
    let v = json(&["verify", s(&out), "--json"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["dir"], s(&out));
    let checked: Vec<&str> = v["checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(checked.contains(&s(&out.join("model.safetensors"))), "{v}");
    assert_eq!(v["mismatches"].as_array().unwrap().len(), 0);

    std::fs::write(out.join("config.json"), "{}").unwrap();
    let o = gm(&["verify", s(&out), "--json"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let m = v["mismatches"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{v}");
    assert!(m[0].as_str().unwrap().contains("config.json"));
    assert_eq!(v["checked"].as_array().unwrap().len(), checked.len() - 1);
}

#[test]
fn dry_run_json_lists_are_objects_with_named_keys() {
    let v = json(&[
        "run",
        s(&case().join("recipes/warp.yaml")),
        "--out",
        "unused",
        "--dry-run",
        "--json",
    ]);
    let steps = v["steps"].as_array().unwrap();
    let names: Vec<(&str, &str)> = steps
        .iter()
        .map(|st| (st["name"].as_str().unwrap(), st["method"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("run_a", "ema"),
            ("run_b", "ema"),
            ("slerp", "slerp"),
            ("warp", "liti")
        ]
    );
    let inputs = v["inputs"].as_array().unwrap();
    assert_eq!(inputs[0]["name"], "sft");
    assert_eq!(inputs[0]["path"], s(&case().join("sft")));
    assert_eq!(
        inputs[0]["bytes"].as_u64().unwrap(),
        json(&["inspect", s(&case().join("sft")), "--json"])["bytes"]
            .as_u64()
            .unwrap()
    );
    assert_eq!(v["outputs"], serde_json::json!(["unused"]));
}

#[test]
fn paths_are_printed_normalised() {
    let d = tempfile::tempdir().unwrap();
    let twisted = d.path().join("a/../b/./lin");
    std::fs::create_dir_all(d.path().join("a")).unwrap();
    let o = ok(&[
        "run",
        s(&case().join("recipes/linear.yaml")),
        "--out",
        s(&twisted),
    ]);
    let clean = d.path().join("b/lin");
    assert!(
        o.stdout
            .starts_with(&format!("wrote {}\n", clean.display())),
        "{}",
        o.stdout
    );
    let o = ok(&["verify", s(&twisted)]);
    assert!(
        o.stdout.starts_with(&format!("{}: ", clean.display())),
        "{}",
        o.stdout
    );
}

#[test]
fn verbose_eval_and_compare_print_each_window() {
    let sft = case().join("sft");
    let ids = "2,71,294,35,133,63,256,233,244,336,197,110,51,252,17,202,224,314,4,359";
    let o = ok(&["-v", "eval", s(&sft), "--token-ids", ids, "--context", "8"]);
    // 20 tokens in windows of 8: 0..8, then <bos> + 7: 8..15, 15..20.
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("window"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", o.stderr);
    assert!(lines[0].starts_with("window 0: tokens 0..8, 7 predicted, mean_nll "));
    assert!(lines[2].starts_with("window 2: tokens 15..20, 5 predicted, mean_nll "));
    // The windows' mean NLLs, weighted by their counts, give the total mean_nll.
    let nll = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let total = (7.0 * nll(lines[0]) + 7.0 * nll(lines[1]) + 5.0 * nll(lines[2])) / 19.0;
    let e = json(&[
        "eval",
        s(&sft),
        "--token-ids",
        ids,
        "--context",
        "8",
        "--json",
    ]);
    assert!(
        (total - e["mean_nll"].as_f64().unwrap()).abs() < 1e-5,
        "{total} vs {e}"
    );

    let o = ok(&[
        "-v",
        "compare",
        s(&sft),
        "--reference",
        s(&sft),
        "--token-ids",
        ids,
        "--context",
        "8",
    ]);
    let kl: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("window"))
        .collect();
    assert_eq!(kl.len(), 3, "{}", o.stderr);
    assert!(kl.iter().all(|l| l.ends_with("kl 0.000000")), "{kl:?}");
}

/// Runs the binary on a pseudo-terminal (util-linux `script`), returning the exit code and everything it
/// printed there (stdout and stderr together, as a terminal shows them).
fn on_terminal(args: &[&str]) -> (i32, String) {
    on_terminal_to(args, None)
}

/// [`on_terminal`], with stdout redirected to `stdout` when given (stderr stays on the terminal).
fn on_terminal_to(args: &[&str], stdout: Option<&Path>) -> (i32, String) {
    let mut quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_gemma-merge"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    if let Some(path) = stdout {
        quoted.push(format!("> '{}'", path.display()));
    }
    let o = Command::new("script")
        .args(["-qfec", &quoted.join(" "), "/dev/null"])
        .env("COLUMNS", "100")
        .output()
        .expect("util-linux `script` runs (the progress tests need a pseudo-terminal)");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// A bar moves on a terminal: it names the phase and shows a percentage and an ETA; `-q` and a stderr
/// that is not a terminal have none.
#[test]
fn progress_shows_on_a_terminal_only() {
    let d = tempfile::tempdir().unwrap();
    let p = |name: &str| d.path().join(name);
    // A small model: each phase draws its bar as it starts (the test checks the bar, not its speed).
    for (name, seed) in [("sft", "1"), ("a", "2"), ("b", "3")] {
        ok(&[
            "-q",
            "synth",
            "--shape",
            "2b",
            "--layers",
            "2",
            "--vocab-size",
            "2048",
            "--hidden-size",
            "256",
            "--intermediate-size",
            "1024",
            "--seed",
            seed,
            "--out",
            s(&p(name)),
        ]);
    }
    let recipe = p("r.yaml");
    std::fs::write(
        &recipe,
        "output: out\nbase: sft\nmodels:\n  sft: sft\nsteps:\n  - name: avg\n    method: linear\n    models: [a, b]\n    weights: [1, 1]\n",
    )
    .unwrap();
    let ids: Vec<String> = (0..300)
        .map(|i| ((i * 37) % 2000 + 3).to_string())
        .collect();
    let ids = ids.join(",");
    let out = s(&p("out")).to_string();
    let drifted = s(&p("drifted")).to_string();
    let cases: [(&str, Vec<&str>); 4] = [
        ("merging", vec!["run", s(&recipe)]),
        ("verifying", vec!["verify", &out]),
        ("scoring", vec!["eval", &out, "--token-ids", &ids]),
        (
            "writing",
            vec!["synth", "--from", &out, "--drift", "0.1", "--out", &drifted],
        ),
    ];
    for (phase, args) in &cases {
        let (code, shown) = on_terminal(args);
        assert_eq!(code, 0, "{args:?}: {shown}");
        assert!(
            shown.contains(phase) && shown.contains("% ") && shown.contains("eta "),
            "{args:?} drew no {phase} bar:\n{shown}"
        );
    }
    // -q: no bar, even on a terminal; not a terminal: no bar on stderr, the same stdout.
    let (code, quiet) = on_terminal(&["-q", "verify", &out]);
    assert_eq!(code, 0);
    assert!(!quiet.contains("verifying"), "{quiet}");
    let piped = ok(&["eval", &out, "--token-ids", &ids, "--json"]);
    assert!(!piped.stderr.contains("scoring"), "{}", piped.stderr);
    let v: serde_json::Value = serde_json::from_str(&piped.stdout).unwrap();
    assert_eq!(v["tokens"], 299);
    // --json on a terminal: the bar is on stderr, so stdout (redirected) is still one JSON object.
    let json_out = p("eval.json");
    let (code, shown) = on_terminal_to(
        &["eval", &out, "--token-ids", &ids, "--json"],
        Some(&json_out),
    );
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("scoring"), "{shown}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    assert_eq!(v["tokens"], 299);
}

/// Records each phase with the sum and count of its advances.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, u64, u64, usize)>>);

impl gemma_merge::progress::Progress for Recorder {
    fn start(&self, phase: &str, total: u64, _: gemma_merge::progress::Unit) {
        self.0.lock().unwrap().push((phase.into(), total, 0, 0));
    }
    fn advance(&self, n: u64) {
        let mut p = self.0.lock().unwrap();
        let last = p.last_mut().expect("advance after start");
        last.2 += n;
        last.3 += 1;
    }
}

/// The merge counts the base's bytes once per pass (here: SLERP's reduction pass, then the writing
/// pass), and its advances add up to exactly that total; verify counts every byte it hashes.
#[test]
fn progress_counts_the_bytes_of_both_passes() {
    use gemma_merge::executor::{verify_folder, Prepared};
    use gemma_merge::recipe::Plan;
    let d = tempfile::tempdir().unwrap();
    let plan =
        Plan::from_file(&case().join("recipes/warp.yaml"), Some(&d.path().join("w"))).unwrap();
    let rec = Recorder::default();
    Prepared::new(&plan).unwrap().run_in_memory(&rec).unwrap();
    let base_bytes = json(&["inspect", s(&case().join("sft")), "--json"])["bytes"]
        .as_u64()
        .unwrap();
    let phases = rec.0.into_inner().unwrap();
    assert_eq!(phases.len(), 1);
    let (name, total, done, steps) = &phases[0];
    assert_eq!(name, "merging");
    assert_eq!(*total, 2 * base_bytes);
    assert_eq!(done, total);
    assert!(
        *steps >= 2 * 46,
        "{steps} advances for 46 tensors over 2 passes"
    );

    let out = d.path().join("lin");
    ok(&[
        "-q",
        "run",
        s(&case().join("recipes/linear.yaml")),
        "--out",
        s(&out),
    ]);
    let rec = Recorder::default();
    verify_folder(&out, &rec).unwrap();
    let files: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "merge-manifest.json")
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let phases = rec.0.into_inner().unwrap();
    assert_eq!(phases.len(), 1);
    assert_eq!((phases[0].1, phases[0].2), (files, files));
}

/// The card of a `linear` merge says linear (no WARP text or tag), names no local path and no hub id it
/// does not have; the recipe is beside the weights and in the manifest.
#[test]
fn card_of_a_linear_merge() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("linear");
    let recipe = case().join("recipes/linear.yaml");
    ok(&["-q", "run", s(&recipe), "--out", s(&out)]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert_eq!(
        card,
        std::fs::read_to_string(root().join("fixtures/cards/linear.md")).unwrap()
    );
    assert!(card.contains("**linear**"));
    for absent in [
        "warp",
        "WARP",
        "EMA",
        "base_model",
        &d.path().display().to_string(),
        &root().display().to_string(),
    ] {
        assert!(!card.contains(absent), "{absent:?} in\n{card}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("recipe.yaml")).unwrap(),
        std::fs::read_to_string(&recipe).unwrap()
    );
    let manifest = std::fs::read_to_string(out.join("merge-manifest.json")).unwrap();
    assert!(manifest.contains("\"path\": \"recipe.yaml\""), "{manifest}");
}

/// The WARP demo's card lists its four steps with their coefficients and its seven inputs.
#[test]
fn card_of_the_warp_demo() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo-warp");
    ok(&[
        "-q",
        "run",
        s(&root().join("recipes/demo-warp.yaml")),
        "--out",
        s(&out),
    ]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert_eq!(
        card,
        std::fs::read_to_string(root().join("fixtures/cards/demo-warp.md")).unwrap()
    );
    // EMA with μ = 0.01 over 100 steps: the last checkpoint gets 1 − 0.99^100 = 0.634.
    assert!(card.contains("0.634·`run_a/step-300`"), "{card}");
    assert!(card.contains("- warp\n") && card.contains("**LITI**"));
    assert!(!card.contains(&root().display().to_string()));
}

/// `base_model` comes only from a Hugging Face cache layout; `license` from the base's own card.
#[test]
fn card_takes_hub_ids_and_the_base_licence() {
    let d = tempfile::tempdir().unwrap();
    let snapshot = d
        .path()
        .join("hub/models--google--gemma-2-2b/snapshots/0123abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in std::fs::read_dir(case().join("sft")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snapshot.join(f.file_name())).unwrap();
    }
    std::fs::write(
        snapshot.join("README.md"),
        "---\nlicense: gemma\nlibrary_name: transformers\n---\n# Gemma 2\n",
    )
    .unwrap();
    let run_a = case().join("run_a/step-300");
    let recipe = d.path().join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "output: out\nbase: {}\nsteps:\n  - name: avg\n    method: linear\n    models: [{}, {}]\n    weights: [1, 1]\n",
            snapshot.display(),
            snapshot.display(),
            run_a.display()
        ),
    )
    .unwrap();
    ok(&["-q", "run", s(&recipe)]);
    let card = std::fs::read_to_string(d.path().join("out/README.md")).unwrap();
    assert!(
        card.starts_with(
            "---\nlicense: gemma\nbase_model:\n- google/gemma-2-2b\nbase_model_relation: merge\n"
        ),
        "{card}"
    );
    assert!(card.contains("- `google/gemma-2-2b` (base) — [google/gemma-2-2b](https://huggingface.co/google/gemma-2-2b)"), "{card}");
    assert!(
        card.contains("- `run_a/step-300` — a local checkpoint"),
        "{card}"
    );
    assert!(!card.contains(&d.path().display().to_string()), "{card}");
}
