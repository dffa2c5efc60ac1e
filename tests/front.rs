//! `gemma-merge front`: the LITI front scored in one pass, equal to what `run` + `compare` give, and drawn.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::s;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
}

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/merge-case")
}

const IDS: &str = "2,71,294,35,133,63,256,233,244,336,197,110,51,252,17,202,224,314,4,359";

fn run(args: &[&str]) -> (i32, String, String) {
    let o = bin().args(args).output().expect("binary runs");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn front_rows_equal_compare_on_models_built_by_run() {
    let recipe = case().join("recipes/front.yaml");
    let front = ok_json(&["front", s(&recipe), "--token-ids", IDS, "--json"]);
    let all = front.as_array().unwrap();
    let rows: Vec<&serde_json::Value> = all.iter().filter(|r| r["kind"] == "eta").collect();
    assert_eq!(
        rows.iter()
            .map(|r| r["eta"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        vec![0.0, 0.5, 1.0]
    );

    // η = 0 is the base: KL 0, agreement 1, the base's own perplexity (as `eval` reports it).
    let eval = ok_json(&["eval", s(&case().join("sft")), "--token-ids", IDS, "--json"]);
    assert_eq!(rows[0]["kl"], 0.0);
    assert_eq!(rows[0]["top1_agreement"], 1.0);
    let p0 = rows[0]["perplexity"].as_f64().unwrap();
    assert!((p0 - eval["perplexity"].as_f64().unwrap()).abs() < 1e-9 * p0);
    // The table's reference row is in the JSON too: the base, at KL 0, with the base's perplexity.
    let reference: Vec<&serde_json::Value> =
        all.iter().filter(|r| r["kind"] == "reference").collect();
    assert_eq!(reference.len(), 1, "{front}");
    assert_eq!(reference[0]["kl"], 0.0);
    assert!(reference[0]["eta"].is_null());
    let pr = reference[0]["perplexity"].as_f64().unwrap();
    assert!((pr - p0).abs() < 1e-9 * p0, "{pr} vs {p0}");

    // Every η equals `compare` on the model that `run` writes for that η.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("front");
    let (code, _, err) = run(&["-q", "run", s(&recipe), "--out", s(&out)]);
    assert_eq!(code, 0, "{err}");
    for r in &rows {
        let eta = r["eta"].as_f64().unwrap();
        let model = out.join(format!("eta-{eta:?}"));
        let c = ok_json(&[
            "compare",
            s(&model),
            "--reference",
            s(&case().join("sft")),
            "--token-ids",
            IDS,
            "--json",
        ]);
        for key in ["kl", "kl_max", "top1_agreement", "perplexity"] {
            let (a, b) = (r[key].as_f64().unwrap(), c[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "η={eta} {key}: front {a} vs compare {b}"
            );
        }
    }
    // KL to the init grows along the front.
    let kls: Vec<f64> = rows.iter().map(|r| r["kl"].as_f64().unwrap()).collect();
    assert!(kls[0] < kls[1] && kls[1] < kls[2], "{kls:?}");
}

#[test]
fn eta_flag_overrides_the_list_and_keep_writes_ordinary_folders() {
    let d = tempfile::tempdir().unwrap();
    let keep = d.path().join("kept");
    let recipe = case().join("recipes/warp.yaml");
    let rows = ok_json(&[
        "front",
        s(&recipe),
        "--token-ids",
        IDS,
        "--eta",
        "0,0.3,1",
        "--keep",
        s(&keep),
        "--json",
    ]);
    let etas: Vec<f64> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "eta")
        .map(|r| r["eta"].as_f64().unwrap())
        .collect();
    assert_eq!(etas, vec![0.0, 0.3, 1.0]);
    // The SLERP step's two input policies are rows too, with their KL to the base.
    let policies: Vec<&serde_json::Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "policy")
        .collect();
    assert_eq!(policies.len(), 2, "{rows}");
    assert!(policies.iter().all(|p| p["kl"].as_f64().unwrap() > 0.0));
    for name in ["eta-0.0", "eta-0.3", "eta-1.0"] {
        let (code, _, err) = run(&["verify", s(&keep.join(name))]);
        assert_eq!(code, 0, "{name}: {err}");
    }
    // The kept η = 0.3 model is the recipe's own output.
    let out = d.path().join("warp");
    run(&["-q", "run", s(&recipe), "--out", s(&out)]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(keep.join("eta-0.3/model.safetensors")).unwrap()
    );
}

#[test]
fn front_needs_a_liti_output_step() {
    let (code, _, err) = run(&[
        "front",
        s(&case().join("recipes/linear.yaml")),
        "--token-ids",
        IDS,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a `liti` step"), "{err}");
    let (code, _, err) = run(&[
        "front",
        s(&case().join("recipes/front.yaml")),
        "--token-ids",
        IDS,
        "--eta",
        "0.5,0.5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("given twice"), "{err}");
}

/// Renders the SVG in headless Chromium and checks the picture: the front's blue, the policies' red and
/// the reference's green are all drawn. Skipped (with the reason printed) only where Chromium is missing.
#[test]
fn front_plot_renders_in_headless_chromium() {
    let d = tempfile::tempdir().unwrap();
    let svg = d.path().join("front.svg");
    let (code, _, err) = run(&[
        "front",
        s(&case().join("recipes/front.yaml")),
        "--token-ids",
        IDS,
        "--plot",
        s(&svg),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&svg).unwrap();
    for needle in [
        "LITI front of front on 20 token ids",
        "merge inputs",
        "η=0.0",
        "η=0.5",
        "η=1.0",
        "../sft (reference)",
        "../run_a/step-300",
        "perplexity",
        "KL(model ‖ ../sft) [nats/token]",
    ] {
        assert!(text.contains(needle), "the SVG lacks {needle:?}");
    }
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        // CI (.ci/run sets GEMMA_MERGE_REQUIRE_CHROMIUM) must render; a developer's machine may lack Chromium.
        assert!(
            std::env::var_os("GEMMA_MERGE_REQUIRE_CHROMIUM").is_none(),
            "no chromium on PATH, and GEMMA_MERGE_REQUIRE_CHROMIUM is set"
        );
        println!("SKIPPED front_plot_renders_in_headless_chromium: no chromium on PATH (.ci/run installs Debian's chromium)");
        return;
    };
    let png = d.path().join("front.png");
    let profile = d.path().join("profile");
    let o = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=760,520",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", svg.display()))
        .output()
        .unwrap();
    assert!(
        png.exists(),
        "chromium wrote no PNG: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_front_drawn(&std::fs::read(&png).unwrap());
}

/// Decodes a 760×520 PNG of the front and checks that its three colours are drawn: the front's blue,
/// the inputs' red, the reference's green. Returns the count of near-black (text) pixels.
fn assert_front_drawn(bytes: &[u8]) -> usize {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (760, 520));
    let channels = info.color_type.samples();
    let count = |rgb: (i32, i32, i32)| {
        buf[..info.buffer_size()]
            .chunks(channels)
            .filter(|p| {
                (p[0] as i32 - rgb.0).abs() < 30
                    && (p[1] as i32 - rgb.1).abs() < 30
                    && (p[2] as i32 - rgb.2).abs() < 30
            })
            .count()
    };
    assert!(
        count((0x1f, 0x77, 0xb4)) > 200,
        "the front (blue) is not drawn"
    );
    assert!(
        count((0xd6, 0x27, 0x28)) > 40,
        "the inputs (red) are not drawn"
    );
    assert!(
        count((0x2c, 0xa0, 0x2c)) > 20,
        "the reference (green) is not drawn"
    );
    count((0, 0, 0))
}

/// `--plot f.png` writes a real PNG (resvg) of the same chart; other extensions and missing folders are
/// refused before any work, with exit code 2.
#[test]
fn front_plot_png_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let png_path = d.path().join("front.png");
    let recipe = case().join("recipes/front.yaml");
    let (code, _, err) = run(&[
        "front",
        s(&recipe),
        "--token-ids",
        IDS,
        "--plot",
        s(&png_path),
        "--log-y",
    ]);
    assert_eq!(code, 0, "{err}");
    // Dark text pixels: titles, ticks and labels were drawn with a font.
    let bytes = std::fs::read(&png_path).unwrap();
    let text = assert_front_drawn(&bytes);
    // Marked as ours (a tEXt chunk the png decoder accepted above), so --force may replace it.
    assert!(bytes.windows(11).any(|w| w == b"gemma-merge"));
    let (code, _, err) = run(&[
        "front",
        s(&recipe),
        "--token-ids",
        IDS,
        "--plot",
        s(&png_path),
        "--force",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text > 500, "no text in the PNG ({text} dark pixels)");

    for (plot, needle) in [
        (d.path().join("missing/front.svg"), "does not exist"),
        (d.path().join("front.pdf"), "must end in .svg or .png"),
    ] {
        let (code, _, err) = run(&["front", s(&recipe), "--token-ids", IDS, "--plot", s(&plot)]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.starts_with("error: --plot ") && err.contains(needle),
            "{err}"
        );
        assert!(!plot.exists());
    }
}
