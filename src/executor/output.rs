//! Output folders: written under a temporary name beside the target, completed with config, tokenizer
//! files, a model card and a checksummed manifest, then renamed into place. A failed run leaves nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::MergeError;
use crate::format::writer::{hex, write_small_file, FileRecord};
use crate::format::Model;
use crate::recipe::Plan;
use crate::safe_out::{check_conflicts, check_target, model_inputs, Kind, Role, Staged};

/// Files copied from the base when present.
pub const SIDE_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];
/// The manifest's file name.
pub use crate::safe_out::MANIFEST;

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
    /// One staged folder per target, in target order.
    targets: Vec<Staged>,
}

/// The paths a run reads: every input model (its root and weight files) and the recipe.
fn run_inputs(plan: &Plan, models: &[Model], extra: &[Role]) -> Vec<Role> {
    let mut inputs = Vec::new();
    for (leaf, m) in plan.leaves.iter().zip(models) {
        let role = format!("the input model `{}`", leaf.shown);
        inputs.extend(model_inputs(&role, m.root()));
        inputs.extend(m.files().iter().map(|f| Role::new(&role, f.path())));
    }
    inputs.push(Role::new("the recipe", &plan.recipe_path));
    inputs.extend(extra.iter().cloned());
    inputs
}

/// Every check a run makes before it writes anything (and `--dry-run` makes instead of running):
/// no output is, contains or lies inside an input, the recipe, an `extra` input or another output; an
/// existing output is replaced only with `force` and only if gemma-merge wrote it; the base's
/// `config.json` (copied into every output) is valid JSON.
pub(crate) fn check_outputs(
    plan: &Plan,
    models: &[Model],
    force: bool,
    extra: &[Role],
) -> Result<(), MergeError> {
    let outputs: Vec<Role> = plan
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let role = match (i, t.models.first()) {
                (0, _) | (_, None) => "the output".to_string(),
                (_, Some(m)) => format!("the output of step `{}`", plan.steps[m.step].name),
            };
            Role::new(role, &t.path)
        })
        .collect();
    check_conflicts(&outputs, &run_inputs(plan, models, extra))?;
    for t in &plan.targets {
        check_target(&t.path, Kind::ModelFolder, force)?;
    }
    models[plan.base].config()?;
    Ok(())
}

impl Staging {
    /// Runs [`check_outputs`] and creates the temporary folders. Nothing is created when a check fails.
    pub fn begin(
        plan: &Plan,
        models: &[Model],
        force: bool,
        extra: &[Role],
    ) -> Result<Self, MergeError> {
        check_outputs(plan, models, force, extra)?;
        let mut targets = Vec::with_capacity(plan.targets.len());
        for t in &plan.targets {
            let staged = Staged::folder(&t.path, Kind::ModelFolder, force)?;
            for m in &t.models {
                if let Some(sub) = &m.subdir {
                    let d = staged.path().join(sub);
                    std::fs::create_dir_all(&d).map_err(|e| MergeError::io(&d, e))?;
                }
            }
            targets.push(staged);
        }
        Ok(Self { targets })
    }

    /// Where a final output path is being written now.
    pub fn staged(&self, path: &Path) -> PathBuf {
        for s in &self.targets {
            if let Ok(rest) = path.strip_prefix(s.target()) {
                return s.path().join(rest);
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
        side: &SideSources,
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
                for (k, v) in &side.config_patch {
                    obj.insert(k.clone(), v.clone());
                }
            }
            let mut text = serde_json::to_string_pretty(&config).expect("JSON serializes");
            text.push('\n');
            records.push(write_small_file(&dir, "config.json", text.as_bytes())?);
        }
        for name in SIDE_FILES {
            let src = side.tokenizer.join(name);
            if src.is_file() {
                let mut bytes = std::fs::read(&src).map_err(|e| MergeError::io(&src, e))?;
                if let (Some(template), "tokenizer_config.json") = (&plan.chat_template, name) {
                    bytes = with_chat_template(&bytes, template, &src)?;
                }
                records.push(write_small_file(&dir, name, &bytes)?);
            }
        }
        for (name, text) in &plan.extra_files {
            records.push(write_small_file(&dir, name, text.as_bytes())?);
        }
        let step_name = &plan.steps[step].name;
        let card = model_card(plan, step_name, eta, path);
        records.push(write_small_file(&dir, "README.md", card.as_bytes())?);
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

    /// Renames every staged folder into place (replacing an existing target only now, with --force,
    /// in one atomic swap).
    pub fn commit(self) -> Result<Vec<PathBuf>, MergeError> {
        let mut done = Vec::new();
        for s in self.targets {
            let target = s.target().to_path_buf();
            s.commit()?;
            done.push(target);
        }
        Ok(done)
    }
}

/// Where an output's config.json and tokenizer files come from, beyond the base's config.
pub(crate) struct SideSources {
    /// Keys set in config.json (a layer layout's `num_hidden_layers` and `layer_types`).
    pub config_patch: serde_json::Map<String, serde_json::Value>,
    /// The folder whose tokenizer and generation files are copied.
    pub tokenizer: PathBuf,
}

/// tokenizer_config.json with its `chat_template` replaced.
fn with_chat_template(bytes: &[u8], template: &str, src: &Path) -> Result<Vec<u8>, MergeError> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        MergeError::io(
            src,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("chat_template".into(), template.into());
    }
    let mut text = serde_json::to_string_pretty(&v).expect("JSON serializes");
    text.push('\n');
    Ok(text.into_bytes())
}

fn model_card(plan: &Plan, step: &str, eta: Option<f64>, path: &Path) -> String {
    let base_name = &plan.leaves[plan.base].shown;
    // `base_model` names a model on the Hub: only a model found by its hub id can be one.
    let base_line = match &plan.leaves[plan.base].hub_id {
        Some(id) => format!(
            "base_model: {}\n",
            serde_json::to_string(id).expect("a string serializes")
        ),
        None => String::new(),
    };
    let merged: String = plan
        .leaves
        .iter()
        .map(|l| format!("- {}\n", l.hub_id.as_deref().unwrap_or(&l.shown)))
        .collect();
    let title = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged model".into());
    let eta_text = eta.map(|e| format!(", η = {e:?}")).unwrap_or_default();
    format!(
        "---\n{base_line}tags:\n- merge\n- warp\n- gemma-merge\nlibrary_name: transformers\n---\n\n# {title}\n\n\
         Merged with gemma-merge {} from the recipe below (output step `{step}`{eta_text}): \
         WARP-style weight averaging (EMA, SLERP of task vectors, LITI towards the init) of checkpoints \
         sharing the base `{base_name}`. `merge-manifest.json` lists every input and the SHA-256 of every file \
         here; `gemma-merge verify` re-checks them.\n\n## Merged models\n\n{merged}\n## Recipe\n\n```yaml\n{}\n```\n",
        env!("CARGO_PKG_VERSION"),
        plan.recipe_text.trim_end()
    )
}

/// Every input file (the safetensors files of each input model), with sizes and optionally SHA-256.
pub(crate) fn input_records(models: &[Model], hash: bool) -> Result<Vec<InputRecord>, MergeError> {
    let mut out = Vec::new();
    for m in models {
        for f in m.files() {
            let sha256 = if hash {
                Some(hash_file(f.path())?)
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

fn hash_file(path: &Path) -> Result<String, MergeError> {
    let mut f = std::fs::File::open(path).map_err(|e| MergeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| MergeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
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
/// `DIR/eta-*/merge-manifest.json`).
pub fn verify_folder(dir: &Path) -> Result<VerifyReport, MergeError> {
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
            let r = verify_folder(&s)?;
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
                let got = hash_file(&p)?;
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
