//! Output folders: written under a temporary name beside the target, completed with config, tokenizer
//! files, a model card and a checksummed manifest, then renamed into place. A failed run leaves nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::MergeError;
use crate::format::writer::{hex, write_small_file, FileRecord};
use crate::format::{files, Model};
use crate::progress::Progress;
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
    /// For one model of a LITI front (`OUTPUT/eta-<η>`): every sibling folder of the front, so that
    /// `verify OUTPUT` notices one that is missing. Absent in manifests of single models (and in
    /// manifests written before gemma-merge recorded it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub front: Option<Vec<String>>,
}

/// Staged output targets of one run.
pub(crate) struct Staging {
    /// One staged folder per target, in target order.
    targets: Vec<Staged>,
}

/// The keys of config.json that name the weights' dtype (transformers 5's, then older versions').
const DTYPE_KEYS: [&str; 2] = ["dtype", "torch_dtype"];

/// The paths a run reads: every input model (its root and weight files) and the recipe.
pub(crate) fn run_inputs(plan: &Plan, models: &[Model], extra: &[Role]) -> Vec<Role> {
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
    let base = &models[plan.base];
    base.config()?;
    for name in SIDE_FILES {
        let src = base.folder().join(name);
        if src.is_file() {
            std::fs::File::open(&src).map_err(|e| MergeError::io(&src, e))?;
        }
    }
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
                    DTYPE_KEYS
                        .iter()
                        .find_map(|k| c.get(*k).and_then(|v| v.as_str()))
                        .map(String::from)
                })
            })
            .unwrap_or_else(|| "bfloat16".to_string());
        if let Some(mut config) = base.config()? {
            if let Some(obj) = config.as_object_mut() {
                // transformers 5 writes `dtype`, older versions `torch_dtype`: set the one(s) the base has,
                // so that no stale value is left behind.
                let keys: Vec<&str> = DTYPE_KEYS
                    .iter()
                    .copied()
                    .filter(|k| obj.contains_key(*k))
                    .collect();
                for k in if keys.is_empty() {
                    vec!["torch_dtype"]
                } else {
                    keys
                } {
                    obj.insert(k.into(), serde_json::Value::String(dtype.clone()));
                }
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
            if src.exists() {
                let mut bytes = files::read_limited(&src, files::SIDE_FILE_LIMIT)
                    .map_err(|e| MergeError::io(&src, e))?;
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
            front: front_folders(plan, path),
        };
        let mut text = serde_json::to_string_pretty(&manifest).expect("JSON serializes");
        text.push('\n');
        let m = write_small_file(&dir, MANIFEST, text.as_bytes())?;
        Ok(records.iter().map(|r| r.size).sum::<u64>() + m.size)
    }

    /// Renames every staged folder into place (replacing an existing target only now, with --force,
    /// in one atomic swap), after checking all of them again ([`safe_out::commit_all`]).
    pub fn commit(self) -> Result<Vec<PathBuf>, MergeError> {
        Ok(crate::safe_out::commit_all(self.targets)?)
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

/// The η folders of the front that `path` belongs to, if it is one model of a front.
fn front_folders(plan: &Plan, path: &Path) -> Option<Vec<String>> {
    let target = plan
        .targets
        .iter()
        .find(|t| path != t.path && path.starts_with(&t.path))?;
    let subdirs: Vec<String> = target
        .models
        .iter()
        .filter_map(|m| m.subdir.clone())
        .collect();
    (!subdirs.is_empty()).then_some(subdirs)
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

pub(crate) fn hash_file(path: &Path, progress: &dyn Progress) -> Result<String, MergeError> {
    let mut f = files::open_regular(path).map_err(|e| MergeError::io(path, e))?;
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
