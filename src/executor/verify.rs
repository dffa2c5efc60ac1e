//! `verify`: a folder must hold exactly what its `merge-manifest.json` lists — every listed file present,
//! a regular file inside the folder, with the recorded size and SHA-256 — and nothing a loader would read
//! instead (weights, an index, a config or tokenizer file that the manifest does not list). A LITI front
//! (`DIR/eta-*/`) must hold every η folder its manifests name.

use std::path::{Component, Path, PathBuf};

use super::output::{hash_file, Manifest, MANIFEST, SIDE_FILES};
use super::MergeError;
use crate::format::files;
use crate::progress::{Progress, Unit};

/// Result of re-hashing a folder: one line per file checked, and the mismatches.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub checked: Vec<String>,
    pub mismatches: Vec<String>,
}

/// File names that transformers (or another loader) would read from a model folder.
fn loader_reads(name: &str) -> bool {
    const SUFFIXES: [&str; 9] = [
        ".safetensors",
        ".safetensors.index.json",
        ".bin",
        ".bin.index.json",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".gguf",
    ];
    name == "config.json"
        || name.ends_with(".msgpack")
        || SIDE_FILES.contains(&name)
        || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Where `p` really is, or `None` when it cannot be resolved.
fn resolved(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// A mismatch when `p` is a symlink that leads outside `root` (resolved).
fn escapes(p: &Path, root: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(p).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    match resolved(p) {
        Some(target) if target.starts_with(root) => None,
        Some(target) => Some(format!(
            "{}: a symlink leading outside the folder (to {})",
            p.display(),
            target.display()
        )),
        None => Some(format!("{}: a dangling symlink", p.display())),
    }
}

/// Re-checks `dir` against `DIR/merge-manifest.json`, or, for a LITI front, each
/// `DIR/eta-*/merge-manifest.json` and the list of η folders they record. `progress` gets one
/// "verifying" phase per manifest, by bytes hashed.
pub fn verify_folder(dir: &Path, progress: &dyn Progress) -> Result<VerifyReport, MergeError> {
    let mut report = VerifyReport {
        checked: Vec::new(),
        mismatches: Vec::new(),
    };
    let root = resolved(dir).ok_or_else(|| {
        MergeError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        )
    })?;
    let manifest_path = dir.join(MANIFEST);
    if std::fs::symlink_metadata(&manifest_path).is_ok() {
        verify_model(dir, &root, &mut report, progress)?;
        return Ok(report);
    }
    let mut subs: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| MergeError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(_, p)| p.join(MANIFEST).exists())
        .collect();
    if subs.is_empty() {
        return Err(MergeError::io(
            &manifest_path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no merge-manifest.json here (nor in eta-* folders of a LITI front)",
            ),
        ));
    }
    subs.sort();
    let mut expected: Option<Vec<String>> = None;
    for (name, sub) in &subs {
        if let Some(m) = escapes(sub, &root) {
            report.mismatches.push(m);
            continue;
        }
        let manifest = verify_model(sub, &root, &mut report, progress)?;
        if let Some(front) = manifest.and_then(|m| m.front) {
            if !front.contains(name) {
                report.mismatches.push(format!(
                    "{}: not one of the front's folders ({})",
                    sub.display(),
                    front.join(", ")
                ));
            }
            match &expected {
                Some(e) if *e != front => report.mismatches.push(format!(
                    "{}: its manifest lists other η folders than its siblings'",
                    sub.display()
                )),
                _ => expected = Some(front),
            }
        }
    }
    for name in expected.unwrap_or_default() {
        if !subs.iter().any(|(n, _)| *n == name) {
            report.mismatches.push(format!(
                "{}: missing (the front's manifests list it)",
                dir.join(&name).display()
            ));
        }
    }
    Ok(report)
}

/// Checks one model folder; returns its manifest when it could be read.
fn verify_model(
    dir: &Path,
    root: &Path,
    report: &mut VerifyReport,
    progress: &dyn Progress,
) -> Result<Option<Manifest>, MergeError> {
    let manifest_path = dir.join(MANIFEST);
    if let Some(m) = escapes(&manifest_path, root) {
        report.mismatches.push(m);
        return Ok(None);
    }
    let text = files::read_text_limited(&manifest_path, files::SIDE_FILE_LIMIT)
        .map_err(|e| MergeError::io(&manifest_path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        MergeError::io(
            &manifest_path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    if manifest.outputs.is_empty() {
        report.mismatches.push(format!(
            "{}: lists no output files",
            manifest_path.display()
        ));
    } else if !manifest
        .outputs
        .iter()
        .any(|r| r.path.ends_with(".safetensors"))
    {
        report.mismatches.push(format!(
            "{}: lists no weights (.safetensors)",
            manifest_path.display()
        ));
    }
    progress.start(
        "verifying",
        manifest.outputs.iter().map(|r| r.size).sum(),
        Unit::Bytes,
    );
    let mut listed: Vec<&str> = Vec::new();
    for rec in &manifest.outputs {
        let p = dir.join(&rec.path);
        let plain = Path::new(&rec.path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !plain || rec.path.is_empty() {
            report
                .mismatches
                .push(format!("{}: path escapes the folder", p.display()));
            continue;
        }
        if listed.contains(&rec.path.as_str()) {
            report
                .mismatches
                .push(format!("{}: listed twice in the manifest", p.display()));
            continue;
        }
        listed.push(&rec.path);
        if let Some(m) = escapes(&p, root) {
            report.mismatches.push(m);
            continue;
        }
        let meta = match std::fs::metadata(&p) {
            Err(_) => {
                report.mismatches.push(format!("{}: missing", p.display()));
                continue;
            }
            Ok(meta) => meta,
        };
        if !meta.is_file() {
            report
                .mismatches
                .push(format!("{}: not a regular file", p.display()));
        } else if meta.len() != rec.size {
            report.mismatches.push(format!(
                "{}: size {} but the manifest says {}",
                p.display(),
                meta.len(),
                rec.size
            ));
        } else {
            let got = hash_file(&p, progress)?;
            if got != rec.sha256 {
                report.mismatches.push(format!(
                    "{}: SHA-256 {got} but the manifest says {}",
                    p.display(),
                    rec.sha256
                ));
            } else {
                report.checked.push(p.display().to_string());
            }
        }
    }
    // Nothing a loader would pick up instead of (or beside) what was written.
    let mut extra: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| MergeError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST && !listed.contains(&n.as_str()) && loader_reads(n))
        .collect();
    extra.sort();
    for name in extra {
        report.mismatches.push(format!(
            "{}: not listed in the manifest, but a loader would read it",
            dir.join(&name).display()
        ));
    }
    Ok(Some(manifest))
}

#[cfg(test)]
mod tests {
    use super::loader_reads;

    #[test]
    fn files_that_loaders_read_are_recognised() {
        for n in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "config.json",
            "tokenizer.json",
            "generation_config.json",
            "flax_model.msgpack",
        ] {
            assert!(loader_reads(n), "{n}");
        }
        for n in [
            "README.md",
            "notes.txt",
            "merge-manifest.json.bak",
            "config.yaml",
        ] {
            assert!(!loader_reads(n), "{n}");
        }
    }
}
