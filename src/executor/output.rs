//! Output folders: written under a temporary name beside the target, completed with config, tokenizer
//! files, a model card and a checksummed manifest, then renamed into place. A failed run leaves nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{absolute, check_not_input, MergeError};
use crate::format::writer::{hex, write_small_file, FileRecord};
use crate::format::Model;
use crate::progress::{Progress, Unit};
use crate::recipe::Plan;

/// Files copied from the base when present.
pub const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// The manifest's file name.
pub const MANIFEST: &str = "merge-manifest.json";

/// An input file as the manifest records it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InputRecord {
    pub path: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecipeRecord {
    pub path: String,
    pub sha256: String,
    pub text: String,
}

/// `merge-manifest.json`: what was merged, from what, and the checksum of every file written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub version: String,
    pub recipe: RecipeRecord,
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eta: Option<f64>,
    pub dtype: String,
    pub inputs: Vec<InputRecord>,
    pub outputs: Vec<FileRecord>,
    pub seconds: f64,
}

/// Staged output targets of one run.
pub(crate) struct Staging {
    /// (final path, temporary path) per target.
    targets: Vec<(PathBuf, PathBuf)>,
    force: bool,
    committed: bool,
}

impl Staging {
    /// Checks every target (exists without --force, inside an input, duplicated) and creates the
    /// temporary folders. Nothing is created when a check fails.
    pub fn begin(plan: &Plan, models: &[Model], force: bool) -> Result<Self, MergeError> {
        let mut seen: Vec<PathBuf> = Vec::new();
        for t in &plan.targets {
            let abs = absolute(&t.path);
            if seen
                .iter()
                .any(|s| s.starts_with(&abs) || abs.starts_with(s))
            {
                return Err(MergeError::DuplicateOutput(t.path.clone()));
            }
            seen.push(abs);
            if t.path.exists() && !force {
                return Err(MergeError::TargetExists(t.path.clone()));
            }
            check_not_input(&t.path, models)?;
        }
        let mut staging = Self {
            targets: Vec::new(),
            force,
            committed: false,
        };
        for t in &plan.targets {
            let parent = match t.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            std::fs::create_dir_all(&parent).map_err(|e| MergeError::io(&parent, e))?;
            let name = t
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into());
            let tmp = parent.join(format!(".{name}.gemma-merge-tmp-{}", std::process::id()));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
            staging.targets.push((t.path.clone(), tmp.clone()));
            for m in &t.models {
                if let Some(sub) = &m.subdir {
                    let d = tmp.join(sub);
                    std::fs::create_dir_all(&d).map_err(|e| MergeError::io(&d, e))?;
                }
            }
        }
        Ok(staging)
    }

    /// Where a final output path is being written now.
    pub fn staged(&self, path: &Path) -> PathBuf {
        for (final_path, tmp) in &self.targets {
            if let Ok(rest) = path.strip_prefix(final_path) {
                return tmp.join(rest);
            }
        }
        unreachable!("output path outside every target")
    }

    /// Adds config, tokenizer files, model card and manifest to a model folder whose weights are written.
    /// Returns the bytes written to the folder.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_model(
        &self,
        path: &Path,
        base: &Model,
        plan: &Plan,
        step: usize,
        eta: Option<f64>,
        mut records: Vec<FileRecord>,
        inputs: &[InputRecord],
        seconds: f64,
    ) -> Result<u64, MergeError> {
        let dir = self.staged(path);
        let dtype = plan
            .dtype
            .map(|d| d.torch_name().to_string())
            .or_else(|| {
                base.config().ok().flatten().and_then(|c| {
                    c.get("torch_dtype")
                        .and_then(|v| v.as_str())
                        .map(String::from)
                })
            })
            .unwrap_or_else(|| "bfloat16".to_string());
        if let Some(mut config) = base.config()? {
            if let Some(obj) = config.as_object_mut() {
                obj.insert(
                    "torch_dtype".into(),
                    serde_json::Value::String(dtype.clone()),
                );
            }
            let mut text = serde_json::to_string_pretty(&config).expect("JSON serializes");
            text.push('\n');
            records.push(write_small_file(&dir, "config.json", text.as_bytes())?);
        }
        for name in SIDE_FILES {
            let src = base.folder().join(name);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| MergeError::io(&src, e))?;
                records.push(write_small_file(&dir, name, &bytes)?);
            }
        }
        let step_name = &plan.steps[step].name;
        let card = super::card::model_card(plan, step, eta, path);
        records.push(write_small_file(&dir, "README.md", card.as_bytes())?);
        records.push(write_small_file(
            &dir,
            super::card::RECIPE_FILE,
            plan.recipe_text.as_bytes(),
        )?);
        let manifest = Manifest {
            tool: "gemma-merge".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            recipe: RecipeRecord {
                path: plan.recipe_path.display().to_string(),
                sha256: hex(&Sha256::digest(plan.recipe_text.as_bytes())),
                text: plan.recipe_text.clone(),
            },
            step: step_name.clone(),
            eta,
            dtype,
            inputs: inputs.to_vec(),
            outputs: records.clone(),
            seconds,
        };
        let mut text = serde_json::to_string_pretty(&manifest).expect("JSON serializes");
        text.push('\n');
        let m = write_small_file(&dir, MANIFEST, text.as_bytes())?;
        Ok(records.iter().map(|r| r.size).sum::<u64>() + m.size)
    }

    /// Renames every staged folder into place (replacing an existing target only now, with --force).
    pub fn commit(mut self) -> Result<Vec<PathBuf>, MergeError> {
        let mut done = Vec::new();
        for (final_path, tmp) in &self.targets {
            if final_path.exists() {
                if !self.force {
                    return Err(MergeError::TargetExists(final_path.clone()));
                }
                let old = tmp.with_file_name(format!(
                    "{}.old",
                    tmp.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                std::fs::rename(final_path, &old).map_err(|e| MergeError::io(final_path, e))?;
                std::fs::rename(tmp, final_path).map_err(|e| MergeError::io(final_path, e))?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(tmp, final_path).map_err(|e| MergeError::io(final_path, e))?;
            }
            done.push(final_path.clone());
        }
        self.committed = true;
        Ok(done)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            for (_, tmp) in &self.targets {
                let _ = std::fs::remove_dir_all(tmp);
            }
        }
    }
}

/// Every input file (the safetensors files of each input model), with sizes and optionally SHA-256.
pub(crate) fn input_records(models: &[Model], hash: bool) -> Result<Vec<InputRecord>, MergeError> {
    let mut out = Vec::new();
    for m in models {
        for f in m.files() {
            let sha256 = if hash {
                Some(hash_file(f.path(), &crate::progress::Silent)?)
            } else {
                None
            };
            out.push(InputRecord {
                path: f.path().display().to_string(),
                size: f.len() as u64,
                sha256,
            });
        }
    }
    Ok(out)
}

fn hash_file(path: &Path, progress: &dyn Progress) -> Result<String, MergeError> {
    let mut f = std::fs::File::open(path).map_err(|e| MergeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| MergeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
    Ok(hex(&h.finalize()))
}

/// Result of re-hashing a folder: one line per file checked, and the mismatches.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub checked: Vec<String>,
    pub mismatches: Vec<String>,
}

/// Re-hashes every file listed in `DIR/merge-manifest.json` (or, for a LITI front, in each
/// `DIR/eta-*/merge-manifest.json`). `progress` gets one "verifying" phase per manifest, by bytes hashed.
pub fn verify_folder(dir: &Path, progress: &dyn Progress) -> Result<VerifyReport, MergeError> {
    let mut report = VerifyReport {
        checked: Vec::new(),
        mismatches: Vec::new(),
    };
    let manifest_path = dir.join(MANIFEST);
    if !manifest_path.is_file() {
        let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| MergeError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(MANIFEST).is_file())
            .collect();
        if subs.is_empty() {
            return Err(MergeError::io(
                &manifest_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no merge-manifest.json here"),
            ));
        }
        subs.sort();
        for s in subs {
            let r = verify_folder(&s, progress)?;
            report.checked.extend(r.checked);
            report.mismatches.extend(r.mismatches);
        }
        return Ok(report);
    }
    let text =
        std::fs::read_to_string(&manifest_path).map_err(|e| MergeError::io(&manifest_path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        MergeError::io(
            &manifest_path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    progress.start(
        "verifying",
        manifest.outputs.iter().map(|r| r.size).sum(),
        Unit::Bytes,
    );
    for rec in &manifest.outputs {
        let p = dir.join(&rec.path);
        if rec.path.contains("..") || rec.path.starts_with('/') {
            report
                .mismatches
                .push(format!("{}: path escapes the folder", p.display()));
            continue;
        }
        match std::fs::metadata(&p) {
            Err(_) => report.mismatches.push(format!("{}: missing", p.display())),
            Ok(meta) if meta.len() != rec.size => report.mismatches.push(format!(
                "{}: size {} but the manifest says {}",
                p.display(),
                meta.len(),
                rec.size
            )),
            Ok(_) => {
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
    }
    Ok(report)
}
