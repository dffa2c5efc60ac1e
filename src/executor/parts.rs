//! One run split over N processes or machines (`run --part I/N`, then `join`), with no coordinator.
//!
//! Every part computes the same shard layout from the plan ([`plan_shards`] over the output tensors, as a
//! plain run) and the same assignment of shards to parts ([`split_by_bytes`]: contiguous runs of shards,
//! balanced by bytes). Part I evaluates only the tensors of its shards (the statistics of a unit that spans
//! two parts, SLERP's layer Gram, are computed by both), writes those shards of every output model into a
//! staging folder beside each output (`.NAME.gemma-merge-parts/`), then its part manifest
//! (`part-0000I-of-0000N.json`: plan hash, inputs' sizes, the SHA-256 and size of each file it wrote),
//! each under a temporary name renamed into place. The manifest is the part's commit: a rerun first removes
//! it, then replaces the part's files, then writes it again.
//!
//! The join checks every part manifest against its own plan (same plan hash, same input sizes, the
//! expected shards, each file present with the recorded size), hard-links the shards into a temporary
//! output folder (copying where the filesystem has no hard links), writes the index, config, side files,
//! model card and `merge-manifest.json` exactly as a plain run does, and renames the folder into place.
//! It trusts the SHA-256 that each part computed while writing (it checks sizes, not contents: re-hashing
//! would read the whole output again); `gemma-merge verify` re-hashes every file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::output::{self, check_outputs, hash_file, run_inputs, InputRecord, Staging};
use super::{MergeError, Prepared, RunOptions, RunReport};
use crate::format::reader::INDEX_FILE;
use crate::format::writer::{
    hex, index_text, plan_shards, shard_name, write_small_file, FileRecord,
};
use crate::format::ModelWriter;
use crate::safe_out::{check_conflicts, normalize, Role, TempFolder};

/// The infix of a part's temporary folder: `.part-0000I-of-0000N.tmp-HOST-PID`.
const TMP_INFIX: &str = ".tmp-";

/// This machine's name, for temporary names (parts of other machines write into the same folder).
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

/// Version of the part manifest format (in the plan hash, so parts of another format are stale).
const PART_FORMAT: u32 = 1;

/// Part `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl Part {
    /// Part `index` of `count`; `1 <= index <= count` (a wrong request otherwise).
    pub fn new(index: usize, count: usize) -> Result<Self, MergeError> {
        if count == 0 {
            return Err(MergeError::BadPart(format!(
                "part {index}/{count}: the number of parts must be at least 1"
            )));
        }
        if index == 0 || index > count {
            return Err(MergeError::BadPart(format!(
                "part {index}/{count}: the part number must be between 1 and {count} (parts are numbered from 1)"
            )));
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Assigns items (shards, input files) of the given sizes, in order, to `parts` parts: contiguous runs,
/// balanced by bytes. Item k goes to the part whose share of the total, `(p·T/N, (p+1)·T/N]`, holds the
/// item's midpoint (the lower part on a tie). Returns the 0-based part of each item (non-decreasing). Pure and deterministic, so
/// every part and the join agree on it.
pub fn split_by_bytes(sizes: &[u64], parts: usize) -> Vec<usize> {
    let total: u128 = sizes.iter().map(|&s| s as u128).sum();
    let n = parts.max(1) as u128;
    let mut start = 0u128;
    sizes
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let p = if total == 0 {
                k as u128 * n / sizes.len() as u128
            } else {
                // ⌈midpoint·N/T⌉ − 1: a midpoint on a boundary goes to the lower part.
                ((2 * start + s as u128) * n).saturating_sub(1) / (2 * total)
            };
            start += s as u128;
            p.min(n - 1) as usize
        })
        .collect()
}

/// The staging folder of the parts of output `target`: `.NAME.gemma-merge-parts` beside it.
pub fn parts_dir(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.gemma-merge-parts"))
}

/// File name of part `index` of `count`'s manifest.
pub fn part_manifest_name(index: usize, count: usize) -> String {
    format!("part-{index:05}-of-{count:05}.json")
}

/// A file a part wrote: which output target, its path inside that target, size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartFile {
    pub target: usize,
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `part-0000I-of-0000N.json`: what one part wrote and for which plan.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartManifest {
    pub tool: String,
    pub version: String,
    pub plan_hash: String,
    /// The recipe, resolved, and the SHA-256 of its text (to tell a stale part from a foreign one).
    pub recipe_path: String,
    pub recipe_sha256: String,
    pub part: usize,
    pub parts: usize,
    /// Shard indices (0-based, the same in every output model) written by this part.
    pub shards: Vec<usize>,
    /// Every input file's size; with `--hash-inputs`, the SHA-256 of this part's share of them.
    pub hash_inputs: bool,
    pub inputs: Vec<InputRecord>,
    pub files: Vec<PartFile>,
    pub seconds: f64,
}

/// What one part wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartReport {
    pub part: usize,
    pub parts: usize,
    /// The part manifest written.
    pub manifest: PathBuf,
    /// Shard file names written (per output model; the same names in each).
    pub shards: Vec<String>,
    pub tensors: usize,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// The shard layout and part assignment of a plan.
#[derive(Debug, Clone)]
pub struct PartLayout {
    /// Tensor indices of each shard.
    pub shards: Vec<Vec<usize>>,
    /// Data bytes of each shard.
    pub shard_bytes: Vec<u64>,
    /// 0-based part of each shard.
    pub part_of: Vec<usize>,
}

impl PartLayout {
    /// Shards (0-based) of part `p` (1-based), increasing.
    pub fn shards_of(&self, part: Part) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&k| self.part_of[k] + 1 == part.index)
            .collect()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |e| MergeError::io(path, e)
}

fn part_err(path: &Path, message: impl Into<String>) -> MergeError {
    MergeError::Part {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Renames `from` onto `to`, replacing it.
fn rename(from: &Path, to: &Path) -> Result<(), MergeError> {
    std::fs::rename(from, to).map_err(io_err(to))
}

impl Prepared<'_> {
    /// The shard layout every part and the join share, and which part writes each shard.
    pub fn part_layout(&self, parts: usize) -> PartLayout {
        let specs = self.specs();
        let shards = plan_shards(&specs, self.plan.shard_size);
        let shard_bytes: Vec<u64> = shards
            .iter()
            .map(|s| s.iter().map(|&i| specs[i].byte_len()).sum())
            .collect();
        let part_of = split_by_bytes(&shard_bytes, parts);
        PartLayout {
            shards,
            shard_bytes,
            part_of,
        }
    }

    /// SHA-256 of everything the output bytes depend on besides the inputs' contents: the tool version and
    /// part format, the recipe text, the inputs' resolved paths, the outputs' paths and models, every
    /// output tensor's name, dtype and shape with the shard size (hence the shard layout), and the resolved
    /// steps, layout and side-file options.
    pub fn plan_hash(&self) -> String {
        let plan = self.plan;
        let specs: Vec<serde_json::Value> = self
            .specs()
            .iter()
            .map(|s| serde_json::json!([s.name, format!("{:?}", s.dtype), s.shape]))
            .collect();
        let targets: Vec<serde_json::Value> = plan
            .targets
            .iter()
            .map(|t| {
                let models: Vec<serde_json::Value> = t
                    .models
                    .iter()
                    .map(|m| serde_json::json!([m.subdir, m.step, m.eta]))
                    .collect();
                serde_json::json!([normalize(&t.path).display().to_string(), models])
            })
            .collect();
        let leaves: Vec<String> = plan
            .leaves
            .iter()
            .map(|l| normalize(&l.path).display().to_string())
            .collect();
        let doc = serde_json::json!({
            "tool": "gemma-merge",
            "version": env!("CARGO_PKG_VERSION"),
            "part_format": PART_FORMAT,
            "recipe_sha256": hex(&Sha256::digest(plan.recipe_text.as_bytes())),
            "leaves": leaves,
            "base": plan.base,
            "targets": targets,
            "shard_size": plan.shard_size,
            "tensors": specs,
            // What the recipe text alone may not fix (a mergekit config's `--seed`, resolved weights):
            // every step's resolved parameters, the layer layout and the side-file sources.
            "steps": format!("{:?}", plan.steps),
            "layout": format!("{:?}", plan.layout),
            "dtype": format!("{:?}", plan.dtype),
            "extra_tensors_ignored": plan.ignore_extra_tensors,
            "allow_nonfinite": plan.allow_nonfinite,
            "tokenizer_source": plan.tokenizer_source,
            "chat_template": plan.chat_template,
            "extra_files": plan.extra_files,
        });
        hex(&Sha256::digest(doc.to_string().as_bytes()))
    }

    /// Writes part `part` of the outputs' shards into the staging folders (see the module notes).
    pub fn run_part(
        &self,
        part: Part,
        opts: &RunOptions,
        progress: &dyn crate::progress::Progress,
    ) -> Result<PartReport, MergeError> {
        let started = Instant::now();
        let plan = self.plan;
        check_outputs(plan, &self.models, opts.force, &opts.extra_inputs)?;
        let dirs: Vec<PathBuf> = plan.targets.iter().map(|t| parts_dir(&t.path)).collect();
        let roles: Vec<Role> = dirs
            .iter()
            .map(|d| Role::new("the parts' staging folder", d))
            .collect();
        check_conflicts(&roles, &run_inputs(plan, &self.models, &opts.extra_inputs))?;
        let layout = self.part_layout(part.count);
        let mine = layout.shards_of(part);
        let mut subset = vec![false; self.tensors.len()];
        for &k in &mine {
            for &i in &layout.shards[k] {
                subset[i] = true;
            }
        }
        let n_shards = layout.shards.len();
        let shard_names: Vec<String> = mine.iter().map(|&k| shard_name(k, n_shards)).collect();

        // Write into a temporary folder inside each staging folder (same filesystem: renames are atomic),
        // named after this machine and process (parts of other machines write beside it), removed on
        // failure and by the signal handler.
        let tmp_name = format!(
            ".part-{:05}-of-{:05}{TMP_INFIX}{}-{}",
            part.index,
            part.count,
            host_name(),
            std::process::id()
        );
        let mut tmps = Vec::with_capacity(dirs.len());
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
            tmps.push(TempFolder::create(&d.join(&tmp_name))?);
        }
        let tmp_of = |t: usize| tmps[t].path().to_path_buf();
        let places = self.places();
        let specs = self.specs();
        let mut writers = Vec::with_capacity(places.len());
        for (t, sub) in &places {
            let dir = match sub {
                Some(s) => tmp_of(*t).join(s),
                None => tmp_of(*t),
            };
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            writers.push(ModelWriter::create_part(
                &dir,
                specs.clone(),
                plan.shard_size,
                &mine,
            )?);
        }
        let outputs = self.output_models();
        self.evaluate(&outputs, &mut writers, Some(&subset), progress)?;
        let mut files = Vec::new();
        for ((t, sub), w) in places.iter().zip(writers) {
            for r in w.finish()? {
                let path = match sub {
                    Some(s) => format!("{s}/{}", r.path),
                    None => r.path,
                };
                files.push(PartFile {
                    target: *t,
                    path,
                    size: r.size,
                    sha256: r.sha256,
                });
            }
        }
        let inputs = self.part_input_records(part, opts.hash_inputs)?;
        let seconds = started.elapsed().as_secs_f64();
        let manifest = PartManifest {
            tool: "gemma-merge".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            plan_hash: self.plan_hash(),
            recipe_path: normalize(&plan.recipe_path).display().to_string(),
            recipe_sha256: hex(&Sha256::digest(plan.recipe_text.as_bytes())),
            part: part.index,
            parts: part.count,
            shards: mine.clone(),
            hash_inputs: opts.hash_inputs,
            inputs,
            files: files.clone(),
            seconds,
        };

        // Commit: invalidate the old manifest, replace this part's files, then write the new manifest.
        let manifest_path = dirs[0].join(part_manifest_name(part.index, part.count));
        match std::fs::remove_file(&manifest_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(MergeError::io(&manifest_path, e)),
        }
        for f in &files {
            let to = dirs[f.target].join(&f.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            rename(&tmp_of(f.target).join(&f.path), &to)?;
        }
        let mut text = serde_json::to_string_pretty(&manifest).expect("JSON serializes");
        text.push('\n');
        let staged = tmp_of(0).join(part_manifest_name(part.index, part.count));
        std::fs::write(&staged, text.as_bytes()).map_err(io_err(&staged))?;
        std::fs::File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&staged))?;
        rename(&staged, &manifest_path)?;
        drop(tmps);
        Ok(PartReport {
            part: part.index,
            parts: part.count,
            manifest: manifest_path,
            shards: shard_names,
            tensors: subset.iter().filter(|&&b| b).count(),
            bytes_written: files.iter().map(|f| f.size).sum(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// (target, sub-folder) of each output model, in output order.
    fn places(&self) -> Vec<(usize, Option<String>)> {
        let mut places = Vec::new();
        for (t, target) in self.plan.targets.iter().enumerate() {
            for m in &target.models {
                places.push((t, m.subdir.clone()));
            }
        }
        places
    }

    /// Every input file, in the order of [`output::input_records`].
    fn input_paths(&self) -> Vec<&Path> {
        self.models
            .iter()
            .flat_map(|m| m.files().iter().map(|f| f.path()))
            .collect()
    }

    /// Every input file's size, and with `hash` the SHA-256 of this part's share of the files (split by
    /// bytes like the shards), so that across all parts each input file is hashed exactly once.
    fn part_input_records(&self, part: Part, hash: bool) -> Result<Vec<InputRecord>, MergeError> {
        let mut records = output::input_records(&self.models, false)?;
        if hash {
            let files = self.input_paths();
            let sizes: Vec<u64> = records.iter().map(|r| r.size).collect();
            let owner = split_by_bytes(&sizes, part.count);
            for ((rec, path), p) in records.iter_mut().zip(files).zip(owner) {
                if p + 1 == part.index {
                    rec.sha256 = Some(hash_file(path, &crate::progress::Silent)?);
                }
            }
        }
        Ok(records)
    }

    /// Checks every part and assembles the output folders from them; see the module notes.
    pub fn join(&self, opts: &RunOptions) -> Result<RunReport, MergeError> {
        let started = Instant::now();
        let plan = self.plan;
        check_outputs(plan, &self.models, opts.force, &opts.extra_inputs)?;
        let dirs: Vec<PathBuf> = plan.targets.iter().map(|t| parts_dir(&t.path)).collect();
        let manifests = self.read_parts(&dirs[0])?;
        let count = manifests.len();
        let layout = self.part_layout(count);
        let plan_hash = self.plan_hash();
        let recipe_sha = hex(&Sha256::digest(plan.recipe_text.as_bytes()));
        let recipe_path = normalize(&plan.recipe_path).display().to_string();
        let mut inputs = output::input_records(&self.models, false)?;
        let mut hash_inputs = opts.hash_inputs;
        // (target, path) → the record of the file a part wrote.
        let mut written: std::collections::HashMap<(usize, String), FileRecord> =
            std::collections::HashMap::new();
        let mut seconds = 0.0;
        for (path, m) in &manifests {
            let part = Part::new(m.part, m.parts)?;
            if m.tool != "gemma-merge" || m.plan_hash != plan_hash {
                let why = if m.recipe_path != recipe_path {
                    format!("belongs to another recipe ({})", m.recipe_path)
                } else if m.recipe_sha256 != recipe_sha {
                    "is stale: the recipe changed since it ran".to_string()
                } else if m.version != env!("CARGO_PKG_VERSION") {
                    format!(
                        "was written by gemma-merge {}, this is {}",
                        m.version,
                        env!("CARGO_PKG_VERSION")
                    )
                } else {
                    "was written for another plan (same recipe text, but other input paths, output \
                     or tensors)"
                        .to_string()
                };
                return Err(part_err(
                    path,
                    format!(
                        "part {part} {why}: plan hash {} ≠ {plan_hash}; rerun `run --part {part}`",
                        m.plan_hash
                    ),
                ));
            }
            let expected = layout.shards_of(part);
            if m.shards != expected {
                return Err(part_err(
                    path,
                    format!(
                        "part {part} lists shards {:?}, but the plan gives it {expected:?}",
                        m.shards
                    ),
                ));
            }
            if m.inputs.len() != inputs.len() {
                return Err(part_err(
                    path,
                    format!(
                        "part {part} read {} input files, the recipe now has {}",
                        m.inputs.len(),
                        inputs.len()
                    ),
                ));
            }
            for (now, then) in inputs.iter_mut().zip(&m.inputs) {
                if now.size != then.size {
                    return Err(part_err(
                        path,
                        format!(
                            "part {part} read {} with {} bytes, it has {} now: rerun every part",
                            now.path, then.size, now.size
                        ),
                    ));
                }
                if let Some(h) = &then.sha256 {
                    match &now.sha256 {
                        Some(prev) if prev != h => {
                            return Err(part_err(
                                path,
                                format!(
                                    "part {part} hashed {} as {h}, another part as {prev}",
                                    now.path
                                ),
                            ))
                        }
                        _ => now.sha256 = Some(h.clone()),
                    }
                }
            }
            hash_inputs |= m.hash_inputs;
            seconds += m.seconds;
            for f in &m.files {
                let Some(dir) = dirs.get(f.target) else {
                    return Err(part_err(
                        path,
                        format!("part {part} names output {} of {}", f.target, dirs.len()),
                    ));
                };
                let on_disk = dir.join(&f.path);
                match std::fs::metadata(&on_disk) {
                    Err(e) => {
                        return Err(part_err(
                            &on_disk,
                            format!("a file of part {part} is unreadable ({e}): rerun `run --part {part}`"),
                        ))
                    }
                    Ok(meta) if meta.len() != f.size => {
                        return Err(part_err(
                            &on_disk,
                            format!(
                                "a file of part {part} has {} bytes, its manifest says {}: rerun `run --part {part}`",
                                meta.len(),
                                f.size
                            ),
                        ))
                    }
                    Ok(_) => {}
                }
                written.insert(
                    (f.target, f.path.clone()),
                    FileRecord {
                        path: f.path.rsplit('/').next().unwrap_or(&f.path).to_string(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                    },
                );
            }
        }
        // Every shard of every output model, from the part that owns it.
        let n_shards = layout.shards.len();
        let outputs = self.output_models();
        let places = self.places();
        let mut shard_records: Vec<Vec<(PathBuf, FileRecord)>> = Vec::new();
        for (t, sub) in &places {
            let mut recs = Vec::with_capacity(n_shards);
            for k in 0..n_shards {
                let name = shard_name(k, n_shards);
                let rel = match sub {
                    Some(s) => format!("{s}/{name}"),
                    None => name,
                };
                let Some(rec) = written.get(&(*t, rel.clone())) else {
                    let owner = layout.part_of[k] + 1;
                    return Err(part_err(
                        &dirs[0].join(part_manifest_name(owner, count)),
                        format!("part {owner}/{count} does not list {rel}: rerun `run --part {owner}/{count}`"),
                    ));
                };
                recs.push((dirs[*t].join(&rel), rec.clone()));
            }
            shard_records.push(recs);
        }
        if hash_inputs {
            for (rec, path) in inputs.iter_mut().zip(self.input_paths()) {
                if rec.sha256.is_none() {
                    rec.sha256 = Some(hash_file(path, &crate::progress::Silent)?);
                }
            }
        } else {
            for rec in inputs.iter_mut() {
                rec.sha256 = None;
            }
        }

        // Assemble exactly as a plain run: shards, index, then config, side files, card and manifest.
        let staging = Staging::begin(plan, &self.models, opts.force, &opts.extra_inputs)?;
        let index = index_text(&self.specs(), &layout.shards);
        let mut records = Vec::with_capacity(outputs.len());
        for ((path, _, _), recs) in outputs.iter().zip(shard_records) {
            let dir = staging.staged(path);
            let mut model = Vec::with_capacity(recs.len() + 1);
            for (from, rec) in recs {
                link_or_copy(&from, &dir.join(&rec.path))?;
                model.push(rec);
            }
            if let Some(text) = &index {
                model.push(write_small_file(&dir, INDEX_FILE, text.as_bytes())?);
            }
            records.push(model);
        }
        let bytes_written = self.finish_outputs(&staging, records, &inputs, seconds)?;
        let written_targets = staging.commit()?;
        remove_staging(&dirs, &places, &manifests);
        Ok(RunReport {
            output: plan.targets[0].path.clone(),
            outputs: written_targets,
            tensors: self.tensors.len(),
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Reads the part manifests in `dir`: all of one split, 1..=N, each parsed. Errors name the missing
    /// or unreadable part.
    fn read_parts(&self, dir: &Path) -> Result<Vec<(PathBuf, PartManifest)>, MergeError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(part_err(
                    dir,
                    "no parts to join: the folder does not exist (run `gemma-merge run RECIPE --part I/N` for every I first)",
                ))
            }
            Err(e) => return Err(MergeError::io(dir, e)),
        };
        let mut counts: Vec<usize> = Vec::new();
        for e in entries {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((_, n)) = parse_manifest_name(&name) {
                if !counts.contains(&n) {
                    counts.push(n);
                }
            }
        }
        counts.sort();
        let count = match counts.as_slice() {
            [] => {
                return Err(part_err(
                    dir,
                    "no part manifests to join (run `gemma-merge run RECIPE --part I/N` for every I first)",
                ))
            }
            [n] => *n,
            several => {
                let list: Vec<String> = several.iter().map(|n| format!("of {n}")).collect();
                return Err(part_err(
                    dir,
                    format!(
                        "holds parts of different splits ({}): delete the part-*-of-*.json files of the \
                         split you abandoned and rerun the parts of the one you keep",
                        list.join(", ")
                    ),
                ));
            }
        };
        let mut out = Vec::with_capacity(count);
        for i in 1..=count {
            let path = dir.join(part_manifest_name(i, count));
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(part_err(
                        &path,
                        format!("part {i}/{count} is missing: run `gemma-merge run RECIPE --part {i}/{count}`"),
                    ))
                }
                Err(e) => return Err(MergeError::io(&path, e)),
            };
            let m: PartManifest = serde_json::from_str(&text)
                .map_err(|e| part_err(&path, format!("not a part manifest of gemma-merge: {e}")))?;
            if m.part != i || m.parts != count {
                return Err(part_err(
                    &path,
                    format!(
                        "says it is part {}/{}, its name says {i}/{count}",
                        m.part, m.parts
                    ),
                ));
            }
            out.push((path, m));
        }
        Ok(out)
    }
}

/// `part-0000I-of-0000N.json` → (I, N).
fn parse_manifest_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("part-")?.strip_suffix(".json")?;
    let (i, n) = rest.split_once("-of-")?;
    if i.is_empty() || n.is_empty() || !(i.bytes().chain(n.bytes()).all(|b| b.is_ascii_digit())) {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Hard-links `from` to `to` (no data copied); copies where the filesystem cannot link.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), MergeError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(io_err(from))?;
    Ok(())
}

/// After a join: removes the parts' files and manifests and the temporary folders of killed parts, then
/// the staging folders if nothing else is in them (best effort: what is left is harmless).
fn remove_staging(
    dirs: &[PathBuf],
    places: &[(usize, Option<String>)],
    manifests: &[(PathBuf, PartManifest)],
) {
    for (path, m) in manifests {
        for f in &m.files {
            if let Some(d) = dirs.get(f.target) {
                let _ = std::fs::remove_file(d.join(&f.path));
            }
        }
        let _ = std::fs::remove_file(path);
    }
    for (t, sub) in places {
        if let Some(s) = sub {
            let _ = std::fs::remove_dir(dirs[*t].join(s));
        }
    }
    for d in dirs {
        // Temporary folders of parts killed before their commit (every part has finished by now).
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".part-") && name.contains(TMP_INFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_contiguous_balanced_and_covers_every_part_when_it_can() {
        assert_eq!(split_by_bytes(&[10, 10, 10, 10], 2), vec![0, 0, 1, 1]);
        assert_eq!(split_by_bytes(&[10, 10, 10], 3), vec![0, 1, 2]);
        assert_eq!(split_by_bytes(&[7], 3), vec![1]);
        assert_eq!(split_by_bytes(&[7, 7], 4), vec![0, 2]);
        // One big item among small ones: it takes a part of its own.
        assert_eq!(split_by_bytes(&[1, 1, 100, 1, 1], 3), vec![0, 0, 1, 2, 2]);
        // The 5 GB shards of a 27B model (10 full, one of 4.5 GB) over 4 parts: at most 15 GB each.
        let mut shards = vec![5_000_000_000u64; 10];
        shards.push(4_500_000_000);
        let p = split_by_bytes(&shards, 4);
        assert_eq!(p, vec![0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]);
        // Zero sizes are spread by count; no items, no parts.
        assert_eq!(split_by_bytes(&[0, 0, 0, 0], 2), vec![0, 0, 1, 1]);
        assert_eq!(split_by_bytes(&[], 5), Vec::<usize>::new());
        // Invariants over many shapes: non-decreasing, in range, the heaviest part within one item of T/N.
        for n in 1..7usize {
            for len in 0..12usize {
                let sizes: Vec<u64> = (0..len as u64)
                    .map(|k| 1 + (k * 37 + n as u64) % 11)
                    .collect();
                let p = split_by_bytes(&sizes, n);
                assert!(p.windows(2).all(|w| w[0] <= w[1]) && p.iter().all(|&x| x < n));
                let total: u64 = sizes.iter().sum();
                let biggest = sizes.iter().copied().max().unwrap_or(0);
                for part in 0..n {
                    let load: u64 = sizes
                        .iter()
                        .zip(&p)
                        .filter(|(_, &q)| q == part)
                        .map(|(s, _)| s)
                        .sum();
                    assert!(
                        load as f64 <= total as f64 / n as f64 + biggest as f64,
                        "{sizes:?} {n} {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn part_numbers_and_manifest_names() {
        assert!(Part::new(0, 3).is_err() && Part::new(4, 3).is_err() && Part::new(1, 0).is_err());
        assert_eq!(Part::new(3, 3).unwrap().to_string(), "3/3");
        assert_eq!(part_manifest_name(2, 12), "part-00002-of-00012.json");
        assert_eq!(
            parse_manifest_name("part-00002-of-00012.json"),
            Some((2, 12))
        );
        assert_eq!(parse_manifest_name("part-2-of-x.json"), None);
        assert_eq!(parse_manifest_name("part-00002-of-00012.json.tmp"), None);
        assert_eq!(
            parts_dir(Path::new("out/warp")),
            Path::new("out/.warp.gemma-merge-parts")
        );
        assert_eq!(
            parts_dir(Path::new("warp")),
            Path::new("./.warp.gemma-merge-parts")
        );
    }
}
