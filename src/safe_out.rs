//! Safe outputs: the one place where gemma-merge decides whether it may write a path, and how.
//!
//! The rules, kept by every command that writes (`run`, `front --keep/--plot`, `eval --dump-logits`,
//! `synth`):
//! - every file or folder is written under a temporary sibling name `.NAME.gemma-merge-tmp-PID` and renamed
//!   into place only once complete;
//! - a target that exists is replaced only with `--force`, and only if it is ours: a folder holding our
//!   `merge-manifest.json` and nothing it does not list (or only such folders: a LITI front), or a file of
//!   the exact kind we write, recognised by its content; a file never becomes a folder or the reverse;
//! - the replacement is one atomic step (`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere, or where the
//!   file system lacks it, two renames whose intermediate state the next run repairs);
//! - no output may be, contain or lie inside an input (model, reference, recipe, text file) or another
//!   output, compared on normalised absolute paths and, where they exist, on device and inode;
//! - temporaries are registered so that a signal handler can remove them ([`remove_all_temps`]), and stale
//!   temporaries of dead processes are removed by the next run that writes beside them.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The manifest file name that marks a folder as ours.
pub const MANIFEST: &str = "merge-manifest.json";
/// The infix of temporary names: `.NAME.gemma-merge-tmp-PID`.
const TMP_INFIX: &str = ".gemma-merge-tmp-";
/// The infix of an old copy moved aside by the fallback swap: `.NAME.gemma-merge-old-PID`.
const OLD_INFIX: &str = ".gemma-merge-old-";
/// The infix of an old copy a failed undo could not put back: `.NAME.gemma-merge-kept-PID`, named in the
/// error and never taken for a stale temporary (the sweep would remove an old copy beside its target).
const KEPT_INFIX: &str = ".gemma-merge-kept-";
/// Largest manifest or recognisable file read to decide ownership.
const MAX_SNIFF: u64 = 16 << 20;
/// Deepest folder nesting searched when deciding whether a folder is ours.
const MAX_DEPTH: usize = 4;
/// Value of `__metadata__.producer` in the logits files `eval --dump-logits` writes.
pub const LOGITS_PRODUCER: &str = "gemma-merge eval --dump-logits";

/// What is written at a target: decides which existing targets count as ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A model folder with `merge-manifest.json`, or a folder of such folders.
    ModelFolder,
    /// A folder that is never replaced (`synth --out`).
    NewFolder,
    /// A safetensors file holding one F32 tensor `logits` written by `eval --dump-logits`.
    Logits,
    /// An SVG drawn by `front --plot`.
    Svg,
    /// A PNG drawn by `front --plot` (a `tEXt` chunk names gemma-merge).
    Png,
}

impl Kind {
    fn is_folder(self) -> bool {
        matches!(self, Kind::ModelFolder | Kind::NewFolder)
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::ModelFolder => "a gemma-merge output folder",
            Kind::NewFolder => "a new folder",
            Kind::Logits => "a logits file written by `eval --dump-logits`",
            Kind::Svg => "an SVG plot written by `front --plot`",
            Kind::Png => "a PNG plot written by `front --plot`",
        }
    }
}

/// Why an output may not be written. All but `Io` are wrong requests (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The target exists and `--force` was not given.
    #[error("{0} exists (pass --force to replace it)")]
    Exists(PathBuf),
    /// `synth` and the like never replace anything.
    #[error("{0}: already exists ({1} never overwrites)")]
    NeverReplaced(PathBuf, &'static str),
    /// The target exists and is not something gemma-merge wrote: never replaced, even with `--force`.
    #[error("{path} {why}, so gemma-merge will not replace it, even with --force")]
    NotOurs { path: PathBuf, why: String },
    /// An output is, contains or lies inside an input.
    #[error("output {output} {relation} {role} ({input})")]
    Conflict {
        output: PathBuf,
        relation: &'static str,
        role: String,
        input: PathBuf,
    },
    /// Two outputs of one command are the same path, or one lies inside the other.
    #[error("{first_role} {first} and {second_role} {second} {relation}")]
    Overlap {
        first_role: String,
        first: PathBuf,
        second_role: String,
        second: PathBuf,
        relation: &'static str,
    },
    /// The target ends in `.`, `..` or a root: there is no name to write under.
    #[error("{0}: an output path must end in a file or folder name (not `.` or `..`)")]
    NoName(PathBuf),
    /// A path above the target exists and is not a folder.
    #[error("{target}: cannot be created, because {ancestor} is not a folder")]
    ParentNotFolder { target: PathBuf, ancestor: PathBuf },
    /// The process is being stopped by a signal.
    #[error("interrupted")]
    Interrupted,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl OutputError {
    /// True when the request itself is wrong (exit code 2).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Io { .. } | Self::Interrupted)
    }

    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Paths

/// An absolute path with `.` and `..` resolved and symlinks followed as far as the path exists. Each
/// existing prefix is canonicalised before the next component is applied, so `link/..` means the link
/// target's parent (as the OS sees it), while `missing/../b` means `b` (as `create_dir_all` would make it).
pub fn normalize(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let mut cur = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => cur.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(n) => {
                cur.push(n);
                if let Ok(real) = std::fs::canonicalize(&cur) {
                    cur = real;
                }
            }
        }
    }
    cur
}

/// Device and inode of an existing path (following symlinks).
#[cfg(unix)]
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_p: &Path) -> Option<(u64, u64)> {
    None
}

/// Ids of a normalised path and of every existing ancestor, nearest first.
fn ancestor_ids(p: &Path) -> Vec<(u64, u64)> {
    p.ancestors().filter_map(file_id).collect()
}

/// How `a` relates to `b` on disk: `Some("is")`, `Some("contains")` (b lies inside a) or
/// `Some("lies inside")`.
fn relation(a: &Path, b: &Path) -> Option<&'static str> {
    let (na, nb) = (normalize(a), normalize(b));
    if na == nb {
        return Some("is");
    }
    if nb.starts_with(&na) {
        return Some("contains");
    }
    if na.starts_with(&nb) {
        return Some("lies inside");
    }
    let (ida, idb) = (file_id(&na), file_id(&nb));
    if ida.is_some() && ida == idb {
        return Some("is");
    }
    if ida.is_some_and(|x| ancestor_ids(&nb).contains(&x)) {
        return Some("contains");
    }
    if idb.is_some_and(|y| ancestor_ids(&na).contains(&y)) {
        return Some("lies inside");
    }
    None
}

/// A path a command reads, with what it is ("the input model", "the recipe", ...).
#[derive(Debug, Clone)]
pub struct Role {
    pub role: String,
    pub path: PathBuf,
}

impl Role {
    pub fn new(role: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            role: role.into(),
            path: path.into(),
        }
    }
}

/// The paths a model given as `path` is read from: the path itself, and when it is a file, the files
/// beside it that loaders read (config, tokenizer, index, other shards).
pub fn model_inputs(role: &str, path: &Path) -> Vec<Role> {
    let mut v = vec![Role::new(role, path)];
    if path.is_file() {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors")
                    || name.ends_with(".json")
                    || name == "tokenizer.model"
                {
                    v.push(Role::new(role, e.path()));
                }
            }
        }
    }
    v
}

/// Checks that no output is, contains or lies inside an input, and that no two outputs overlap.
pub fn check_conflicts(outputs: &[Role], inputs: &[Role]) -> Result<(), OutputError> {
    for (i, o) in outputs.iter().enumerate() {
        for other in &outputs[..i] {
            if let Some(r) = relation(&other.path, &o.path) {
                return Err(OutputError::Overlap {
                    first_role: other.role.clone(),
                    first: other.path.clone(),
                    second_role: o.role.clone(),
                    second: o.path.clone(),
                    relation: match r {
                        "is" => "are the same path",
                        _ => "overlap (one lies inside the other)",
                    },
                });
            }
        }
        for input in inputs {
            if let Some(relation) = relation(&o.path, &input.path) {
                return Err(OutputError::Conflict {
                    output: o.path.clone(),
                    relation,
                    role: input.role.clone(),
                    input: input.path.clone(),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Ownership

/// Checks whether `target` may be written: absent, or present, `force` given and ours.
pub fn check_target(target: &Path, kind: Kind, force: bool) -> Result<(), OutputError> {
    if !matches!(target.components().next_back(), Some(Component::Normal(_))) {
        return Err(OutputError::NoName(target.to_path_buf()));
    }
    let real = real_path(target);
    let meta = match std::fs::symlink_metadata(&real) {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return check_creatable(target)
        }
        Err(e) => return Err(OutputError::io(target, e)),
    };
    if kind == Kind::NewFolder {
        return Err(OutputError::NeverReplaced(target.to_path_buf(), "synth"));
    }
    let not_ours = |why: String| OutputError::NotOurs {
        path: target.to_path_buf(),
        why,
    };
    if meta.file_type().is_symlink() {
        return Err(not_ours("is a symbolic link".into()));
    }
    if kind.is_folder() && !meta.is_dir() {
        return Err(not_ours("is not a folder".into()));
    }
    if !kind.is_folder() && meta.is_dir() {
        return Err(not_ours("is a folder, not a file".into()));
    }
    let verdict = match kind {
        Kind::ModelFolder => folder_is_ours(&real, &real, 0),
        Kind::NewFolder => unreachable!("handled above"),
        Kind::Logits | Kind::Svg | Kind::Png => file_is_ours(&real, kind),
    };
    verdict.map_err(not_ours)?;
    if !force {
        return Err(OutputError::Exists(target.to_path_buf()));
    }
    // Replacing needs a temporary beside the target.
    check_creatable(target)
}

/// The path a target names on disk: its parent normalised (`..` and symlinks resolved), its own name kept
/// (a symlink at the target itself is not followed).
fn real_path(target: &Path) -> PathBuf {
    match target.file_name() {
        Some(name) => normalize(&parent_of(target)).join(name),
        None => normalize(target),
    }
}

/// Ok when the nearest existing folder above the target is a folder we may write in.
fn check_creatable(target: &Path) -> Result<(), OutputError> {
    let abs = normalize(target);
    let Some(ancestor) = abs
        .ancestors()
        .skip(1)
        .find(|a| std::fs::symlink_metadata(a).is_ok())
    else {
        return Ok(());
    };
    if !ancestor.is_dir() {
        return Err(OutputError::ParentNotFolder {
            target: target.to_path_buf(),
            ancestor: ancestor.to_path_buf(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        if let Ok(c) = std::ffi::CString::new(ancestor.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
                return Err(OutputError::io(ancestor, std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// Ok when the folder holds our manifest and only what it lists, or only `eta-*` such folders (a LITI
/// front), or nothing.
fn folder_is_ours(root: &Path, dir: &Path, depth: usize) -> Result<(), String> {
    let manifest = dir.join(MANIFEST);
    let entries = list_dir(dir)?;
    if std::fs::symlink_metadata(&manifest).is_ok() {
        let listed = manifest_outputs(&manifest).map_err(|why| {
            if dir == root {
                why
            } else {
                format!("`{}` {why}", rel_name(root, dir))
            }
        })?;
        return only_listed(root, dir, &listed, depth);
    }
    for e in &entries {
        let meta = std::fs::symlink_metadata(e).map_err(|x| x.to_string())?;
        // Without a manifest, a folder is ours only as the parent of a LITI front's `eta-*` outputs.
        let eta = e
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("eta-"));
        if !meta.is_dir() || !eta || depth >= 1 {
            return Err(format!(
                "holds `{}` and no {MANIFEST} that lists it",
                rel_name(root, e)
            ));
        }
        folder_is_ours(root, e, depth + 1)?;
    }
    Ok(())
}

/// `path` relative to `root`, with `/` separators.
fn rel_name(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("cannot be listed ({e})"))? {
        v.push(e.map_err(|e| format!("cannot be listed ({e})"))?.path());
        if v.len() > 1 << 16 {
            return Err("holds too many entries".into());
        }
    }
    v.sort();
    Ok(v)
}

/// The relative paths a manifest lists as written (plus the manifest itself), if it is ours.
fn manifest_outputs(manifest: &Path) -> Result<HashSet<String>, String> {
    let bytes = read_regular(manifest, MAX_SNIFF)
        .map_err(|e| format!("has a {MANIFEST} that cannot be read ({e})"))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("has a {MANIFEST} that is not valid JSON"))?;
    if json.get("tool").and_then(|t| t.as_str()) != Some("gemma-merge") {
        return Err(format!("has a {MANIFEST} not written by gemma-merge"));
    }
    let outputs = json
        .get("outputs")
        .and_then(|o| o.as_array())
        .ok_or_else(|| format!("has a {MANIFEST} without an `outputs` list"))?;
    let mut listed = HashSet::from([MANIFEST.to_string()]);
    for o in outputs {
        let p = o
            .get("path")
            .and_then(|p| p.as_str())
            .ok_or_else(|| format!("has a {MANIFEST} with an output that has no path"))?;
        // Every folder above a listed file is listed too, as "dir/".
        for (i, _) in p.match_indices('/') {
            listed.insert(p[..=i].to_string());
        }
        listed.insert(p.to_string());
    }
    Ok(listed)
}

/// Ok when every file under `dir` is listed in the manifest of `base` (as a path relative to `base`).
fn only_listed(
    root: &Path,
    base: &Path,
    listed: &HashSet<String>,
    depth: usize,
) -> Result<(), String> {
    let mut stack = vec![(base.to_path_buf(), depth)];
    while let Some((dir, depth)) = stack.pop() {
        for e in list_dir(&dir)? {
            let rel = rel_name(base, &e);
            let meta = std::fs::symlink_metadata(&e).map_err(|x| x.to_string())?;
            let prefix = format!("{rel}/");
            if meta.is_dir() && depth < MAX_DEPTH && listed.contains(&prefix) {
                stack.push((e, depth + 1));
            } else if !meta.is_file() || !listed.contains(&rel) {
                let shown = rel_name(root, &e);
                let manifest = rel_name(root, &base.join(MANIFEST));
                return Err(format!(
                    "holds `{shown}`, which its {manifest} does not list"
                ));
            }
        }
    }
    Ok(())
}

/// Reads at most `limit` bytes of a regular file (never a FIFO or device).
fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut v = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut v)?;
    Ok(v)
}

/// Ok when a file is of the exact kind we write, recognised by content.
fn file_is_ours(path: &Path, kind: Kind) -> Result<(), String> {
    let is = match kind {
        Kind::Logits => is_our_logits(path),
        Kind::Svg => is_our_svg(path),
        Kind::Png => is_our_png(path),
        Kind::ModelFolder | Kind::NewFolder => false,
    };
    if is {
        Ok(())
    } else {
        Err(format!("is not {}", kind.noun()))
    }
}

fn is_our_logits(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut n = [0u8; 8];
    if !meta.is_file() || f.read_exact(&mut n).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(n);
    if n > 1 << 20 {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return false;
    };
    let Some(obj) = json.as_object() else {
        return false;
    };
    let producer = obj
        .get("__metadata__")
        .and_then(|m| m.get("producer"))
        .and_then(|p| p.as_str());
    let Some(logits) = obj.get("logits") else {
        return false;
    };
    let shape: Option<Vec<u64>> = logits
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
    let bytes = shape
        .filter(|s| s.len() == 2)
        .and_then(|s| s[0].checked_mul(s[1])?.checked_mul(4));
    obj.len() == 2
        && producer == Some(LOGITS_PRODUCER)
        && logits.get("dtype").and_then(|d| d.as_str()) == Some("F32")
        && bytes.and_then(|b| b.checked_add(8 + n)) == Some(meta.len())
}

/// The opening of every SVG `front --plot` draws (see [`crate::plot`]).
const SVG_HEAD: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=";
const SVG_FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

fn is_our_svg(path: &Path) -> bool {
    let Ok(bytes) = read_regular(path, MAX_SNIFF) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return false;
    };
    let first = text.lines().next().unwrap_or("");
    text.starts_with(SVG_HEAD) && first.contains(SVG_FONT) && text.trim_end().ends_with("</svg>")
}

fn is_our_png(path: &Path) -> bool {
    let Ok(bytes) = read_regular(path, 1 << 16) else {
        return false;
    };
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
        && bytes
            .windows(b"gemma-merge".len())
            .any(|w| w == b"gemma-merge")
}

// ---------------------------------------------------------------------------------------------------
// Temporaries and the registry the signal handler empties

/// Every live temporary, with the parent folders its output created (outermost first).
static TEMPS: Mutex<Vec<(PathBuf, Vec<PathBuf>)>> = Mutex::new(Vec::new());
static STOPPING: AtomicBool = AtomicBool::new(false);

fn registry() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Vec<PathBuf>)>> {
    TEMPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every registered temporary and refuses new ones; returns how many there were. For a signal
/// handler that then exits: the registry stays locked until the process ends, so no rename completes after.
pub fn remove_all_temps() -> usize {
    STOPPING.store(true, Ordering::SeqCst);
    let guard = registry();
    for (tmp, created) in guard.iter() {
        remove_any(tmp);
        remove_empty(created);
    }
    let n = guard.len();
    // Keep the lock: the process is about to exit, and no commit may start meanwhile.
    std::mem::forget(guard);
    n
}

/// Removes a file or a folder (a few tries: a writer thread may add a file meanwhile).
fn remove_any(p: &Path) {
    for _ in 0..8 {
        let r = match std::fs::symlink_metadata(p) {
            Err(_) => return,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
            Ok(_) => std::fs::remove_file(p),
        };
        if r.is_ok() {
            return;
        }
    }
}

/// A temporary folder at a path the caller names, which [`remove_stale`] does not recognise (so that no
/// other process, on this machine or another one sharing the file system, removes it while it is in use):
/// removed on drop and by the signal handler. For `run --part`, whose parts run on several machines.
#[derive(Debug)]
pub struct TempFolder {
    path: PathBuf,
}

impl TempFolder {
    /// Creates the folder `path` (its parent must exist), replacing a leftover of that name.
    pub fn create(path: &Path) -> Result<Self, OutputError> {
        let mut reg = registry();
        if STOPPING.load(Ordering::SeqCst) {
            return Err(OutputError::Interrupted);
        }
        if std::fs::symlink_metadata(path).is_ok() {
            remove_any(path);
        }
        std::fs::create_dir(path).map_err(|e| OutputError::io(path, e))?;
        reg.push((path.to_path_buf(), Vec::new()));
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        remove_any(&self.path);
        unregister(&self.path);
    }
}

fn temp_path(target: &Path, infix: &str, pid: u32) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    parent_of(target).join(format!(".{name}{infix}{}-{pid}", host_tag()))
}

/// This machine's name as it appears in temporary names (`-` and anything unusual become `_`), so that a
/// run never takes another machine's temporaries on a shared file system for a dead process's.
fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        #[cfg(unix)]
        let raw = {
            let mut buf = [0u8; 256];
            // SAFETY: gethostname writes at most buf.len() bytes into buf.
            let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            if r == 0 {
                String::from_utf8_lossy(&buf[..end]).into_owned()
            } else {
                String::new()
            }
        };
        #[cfg(not(unix))]
        let raw = std::env::var("COMPUTERNAME").unwrap_or_default();
        let tag: String = raw
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if tag.is_empty() {
            "host".into()
        } else {
            tag
        }
    })
}

fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An output being written under its temporary name; removed unless [`Staged::commit`] renames it into
/// place.
#[derive(Debug)]
pub struct Staged {
    /// The target as given (for messages and for callers mapping paths under it).
    target: PathBuf,
    /// The target on disk (see [`real_path`]): what is renamed.
    real: PathBuf,
    tmp: PathBuf,
    kind: Kind,
    force: bool,
    done: bool,
    /// Parent folders this output created, outermost first: removed again (if empty) on failure.
    created: Vec<PathBuf>,
}

impl Staged {
    /// Checks the target and creates its temporary folder (creating the parent folders as needed).
    pub fn folder(target: &Path, kind: Kind, force: bool) -> Result<Self, OutputError> {
        Self::begin(target, kind, force, |tmp| std::fs::create_dir(tmp)).map(|(s, _)| s)
    }

    /// Checks the target and creates its temporary file, opened for writing.
    pub fn file(target: &Path, kind: Kind, force: bool) -> Result<(Self, File), OutputError> {
        Self::begin(target, kind, force, |tmp| {
            File::options().write(true).create_new(true).open(tmp)
        })
    }

    fn begin<T>(
        target: &Path,
        kind: Kind,
        force: bool,
        create: impl FnOnce(&Path) -> std::io::Result<T>,
    ) -> Result<(Self, T), OutputError> {
        check_target(target, kind, force)?;
        let real = real_path(target);
        let parent = parent_of(&real);
        let mut created: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        created.reverse();
        if let Err(e) = std::fs::create_dir_all(&parent) {
            remove_empty(&created);
            return Err(OutputError::io(&parent, e));
        }
        remove_stale(&parent);
        let tmp = temp_path(&real, TMP_INFIX, std::process::id());
        let mut reg = registry();
        if STOPPING.load(Ordering::SeqCst) {
            return Err(OutputError::Interrupted);
        }
        if std::fs::symlink_metadata(&tmp).is_ok() {
            // A leftover of an earlier process that had our id: this process never registered it.
            if !looks_like_our_temp(&tmp, 0) {
                return Err(OutputError::io(
                    &tmp,
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            remove_any(&tmp);
        }
        let made = match create(&tmp) {
            Ok(m) => m,
            Err(e) => {
                remove_empty(&created);
                return Err(OutputError::io(&tmp, e));
            }
        };
        reg.push((tmp.clone(), created.clone()));
        Ok((
            Self {
                target: target.to_path_buf(),
                real,
                tmp,
                kind,
                force,
                done: false,
                created,
            },
            made,
        ))
    }

    /// Where the output is being written now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temporary into place. An existing target is checked again (it may have appeared or
    /// changed since the start) and swapped out in one step, then removed.
    pub fn commit(self) -> Result<(), OutputError> {
        commit_all(vec![self]).map(|_| ())
    }
}

/// Commits the outputs of one run all together, or none of them. Every target is checked again first
/// (it may have appeared or changed since the start); then each is renamed into place, an existing one
/// swapped out in one step. Should a rename fail, the ones done are put back as they were (a new target
/// removed, a replaced one restored) before the error is returned; the old copies of replaced targets
/// are removed only once all are in place. Returns the targets.
pub fn commit_all(mut staged: Vec<Staged>) -> Result<Vec<PathBuf>, OutputError> {
    // Checks and renames under the registry's lock, as a single commit had them.
    let reg = registry();
    if STOPPING.load(Ordering::SeqCst) {
        return Err(OutputError::Interrupted);
    }
    for s in &staged {
        check_target(&s.target, s.kind, s.force)?;
    }
    let mut placed: Vec<Placed> = Vec::with_capacity(staged.len());
    for i in 0..staged.len() {
        match place(&staged[i].tmp, &staged[i].real, false) {
            Ok(p) => placed.push(p),
            Err(e) => {
                drop(reg);
                let e = undo_places(&mut staged, placed, e);
                // The temporaries (the new outputs, again) are removed as `staged` drops.
                return Err(OutputError::io(&staged[i].target, e));
            }
        }
    }
    for (s, p) in staged.iter().zip(placed) {
        finish(&s.tmp, p);
    }
    drop(reg);
    Ok(staged
        .iter_mut()
        .map(|s| {
            s.done = true;
            unregister(&s.tmp);
            s.target.clone()
        })
        .collect())
}

/// How an output was put in place by [`place`], so that it can be put back or finished.
#[derive(Debug)]
enum Placed {
    /// There was no target: the temporary was renamed to it.
    Created,
    /// Swapped with the existing target, whose old copy now sits at the temporary name.
    Exchanged,
    /// No atomic swap: the old copy was moved aside to this path first.
    Moved(PathBuf),
}

/// Puts `tmp` in the place of `target`: a rename where there is no target; else one atomic exchange
/// where the OS and file system offer it (or unless `two_renames`), else the old copy is moved aside
/// to `.NAME.gemma-merge-old-PID` first (the next run puts it back if this process dies in between).
fn place(tmp: &Path, target: &Path, two_renames: bool) -> std::io::Result<Placed> {
    if std::fs::symlink_metadata(target).is_err() {
        rename_noreplace(tmp, target)?;
        return Ok(Placed::Created);
    }
    let swapped = if two_renames {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    } else {
        exchange(tmp, target)
    };
    match swapped {
        Ok(()) => Ok(Placed::Exchanged),
        Err(e) if exchange_unsupported(&e) => {
            let old = temp_path(target, OLD_INFIX, std::process::id());
            std::fs::rename(target, &old)?;
            if let Err(e) = std::fs::rename(tmp, target) {
                let _ = std::fs::rename(&old, target);
                return Err(e);
            }
            Ok(Placed::Moved(old))
        }
        Err(e) => Err(e),
    }
}

/// Undoes the places of a commit that failed with `e` (last first). An old copy that could not be put
/// back is kept, renamed to a `KEPT_INFIX` name that no run removes (or, failing that, where it is, its
/// temporary no longer removed), and named in the error returned.
fn undo_places(staged: &mut [Staged], placed: Vec<Placed>, e: std::io::Error) -> std::io::Error {
    let mut kept = Vec::new();
    for (i, p) in placed.into_iter().enumerate().rev() {
        let s = &mut staged[i];
        if let Some(at) = unplace(&s.tmp, &s.real, p) {
            let safe = temp_path(&s.real, KEPT_INFIX, std::process::id());
            let at = if std::fs::rename(&at, &safe).is_ok() {
                safe
            } else {
                at
            };
            if at == s.tmp {
                s.done = true;
                unregister(&s.tmp);
            }
            kept.push(format!("{} at {}", s.target.display(), at.display()));
        }
    }
    if kept.is_empty() {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        format!(
            "{e}; the previous {} could not be put back and {} kept there",
            kept.join(", "),
            if kept.len() == 1 { "is" } else { "are" }
        ),
    )
}

/// Undoes [`place`]: the new output goes back to `tmp`, an old copy back to `target`. Where the new
/// output cannot go back (its temporary name taken in between), it is removed instead (it is ours, and
/// undone either way), so that the old copy can return. Returns where an old copy was left instead, if
/// even that failed (before, a failed undo left the old copy to be removed: with the temporary as the
/// commit's outputs are dropped, or by the next run's sweep of stale copies).
fn unplace(tmp: &Path, target: &Path, p: Placed) -> Option<PathBuf> {
    match p {
        Placed::Created => {
            if std::fs::rename(target, tmp).is_err() {
                remove_any(target);
            }
            None
        }
        Placed::Exchanged => {
            if exchange(tmp, target).is_ok() {
                return None;
            }
            // The old copy is at `tmp`, the new one at `target`.
            remove_any(target);
            std::fs::rename(tmp, target)
                .err()
                .map(|_| tmp.to_path_buf())
        }
        Placed::Moved(old) => {
            if std::fs::rename(target, tmp).is_err() {
                remove_any(target);
            }
            std::fs::rename(&old, target).err().map(|_| old)
        }
    }
}

/// Removes the old copy [`place`] left, if any.
fn finish(tmp: &Path, p: Placed) {
    match p {
        Placed::Created => {}
        Placed::Exchanged => remove_any(tmp),
        Placed::Moved(old) => remove_any(&old),
    }
}

/// Removes folders (innermost first) that are still empty.
fn remove_empty(outermost_first: &[PathBuf]) {
    for d in outermost_first.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

fn unregister(tmp: &Path) {
    registry().retain(|(p, _)| p != tmp);
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            remove_any(&self.tmp);
            unregister(&self.tmp);
            remove_empty(&self.created);
        }
    }
}

/// Renames `from` to `to`, failing if `to` exists (where the OS can tell).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        match renameat2(from, to, libc::RENAME_NOREPLACE) {
            Err(e) if exchange_unsupported(&e) => {}
            r => return r,
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    std::fs::rename(from, to)
}

/// Swaps two existing paths atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        renameat2(a, b, libc::RENAME_EXCHANGE)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

fn exchange_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(c) if is_unsupported_errno(c))
}

#[cfg(target_os = "linux")]
fn is_unsupported_errno(c: i32) -> bool {
    c == libc::EINVAL || c == libc::ENOSYS || c == libc::EOPNOTSUPP
}

#[cfg(not(target_os = "linux"))]
fn is_unsupported_errno(_c: i32) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call; renameat2 reads them
    // and touches no other memory of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------------
// Stale temporaries

/// True when a process with this id may still run (its temporaries must be left alone).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if p <= 0 {
            return true;
        }
        // SAFETY: kill with signal 0 only checks for the process; it sends nothing.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Parses `.NAME<infix>HOST-PID` (and the older `.NAME<infix>PID` and `.NAME.gemma-merge-tmp-PID.old`,
/// taken to be this machine's) into (NAME, PID, old copy?). `None` for names that are not ours, and for
/// another machine's temporaries: whether that process lives cannot be told from here.
fn parse_temp_name(file_name: &str) -> Option<(String, u32, bool)> {
    let rest = file_name.strip_prefix('.')?;
    let (rest, legacy_old) = match rest.strip_suffix(".old") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    for (infix, old) in [(TMP_INFIX, legacy_old), (OLD_INFIX, true)] {
        if let Some(i) = rest.rfind(infix) {
            let tail = &rest[i + infix.len()..];
            let pid = match tail.rsplit_once('-') {
                Some((host, pid)) if host == host_tag() => pid,
                Some(_) => return None,
                None => tail,
            };
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                return Some((rest[..i].to_string(), pid.parse().ok()?, old));
            }
        }
    }
    None
}

/// True for what a gemma-merge temporary can hold: a file, or folders of the files we write.
fn looks_like_our_temp(p: &Path, depth: usize) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return false;
    };
    if meta.is_file() {
        return true;
    }
    if !meta.is_dir() || depth > MAX_DEPTH {
        return false;
    }
    let Ok(entries) = list_dir(p) else {
        return false;
    };
    entries.iter().all(|e| {
        let name = e
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Shards, config and side files, the card, the chat template, a mergekit config.
        let ours_file = [".safetensors", ".json", ".jinja", ".yml", ".yaml"]
            .iter()
            .any(|ext| name.ends_with(ext))
            || name == "README.md"
            || name == "tokenizer.model";
        match std::fs::symlink_metadata(e) {
            Ok(m) if m.is_file() => ours_file,
            Ok(m) if m.is_dir() => looks_like_our_temp(e, depth + 1),
            _ => false,
        }
    })
}

/// Removes temporaries of dead gemma-merge processes in `dir`; an old copy whose target is missing (a
/// swap interrupted between its two renames) is put back instead.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten().take(1 << 16) {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some((name, pid, old)) = parse_temp_name(&file_name) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = e.path();
        let target = dir.join(&name);
        if old && std::fs::symlink_metadata(&target).is_err() {
            let _ = std::fs::rename(&path, &target);
        } else if looks_like_our_temp(&path, 0) {
            remove_any(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dotdot_over_missing_folders() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        assert_eq!(normalize(&d.path().join("nonexist/../b")), root.join("b"));
        assert_eq!(normalize(&d.path().join("./a/./b/..")), root.join("a"));
        std::fs::create_dir(d.path().join("real")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
            assert_eq!(normalize(&d.path().join("link/x")), root.join("real/x"));
        }
    }

    #[test]
    fn temp_names_parse() {
        assert_eq!(
            parse_temp_name(".out.gemma-merge-tmp-123"),
            Some(("out".into(), 123, false))
        );
        assert_eq!(
            parse_temp_name(".a.b.gemma-merge-old-9"),
            Some(("a.b".into(), 9, true))
        );
        assert_eq!(
            parse_temp_name(".out.gemma-merge-tmp-77.old"),
            Some(("out".into(), 77, true))
        );
        assert_eq!(parse_temp_name("out.gemma-merge-tmp-1"), None);
        // An old copy a failed undo kept is never a stale temporary.
        let kept = temp_path(Path::new("d/out"), KEPT_INFIX, 7);
        let kept = kept.file_name().unwrap().to_str().unwrap();
        assert!(kept.starts_with(".out.gemma-merge-kept-"), "{kept}");
        assert_eq!(parse_temp_name(kept), None);
        assert_eq!(parse_temp_name(".out.gemma-merge-tmp-x1"), None);
        // This machine's temporaries carry its name; another machine's are never taken for stale.
        let ours = format!(".out.gemma-merge-tmp-{}-42", host_tag());
        assert_eq!(parse_temp_name(&ours), Some(("out".into(), 42, false)));
        let mine = temp_path(Path::new("d/out"), TMP_INFIX, 7);
        assert_eq!(
            parse_temp_name(&mine.file_name().unwrap().to_string_lossy()),
            Some(("out".into(), 7, false))
        );
        assert_eq!(parse_temp_name(".out.gemma-merge-tmp-otherhost_x-42"), None);
    }

    #[test]
    fn relations_on_paths_and_inodes() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::create_dir(&a).unwrap();
        assert_eq!(relation(&a, &a.join("x")), Some("contains"));
        assert_eq!(relation(&a.join("x/../y"), &a), Some("lies inside"));
        assert_eq!(relation(&d.path().join("m/../a"), &a), Some("is"));
        assert_eq!(relation(&d.path().join("b"), &a), None);
        std::fs::write(a.join("f"), b"x").unwrap();
        std::fs::hard_link(a.join("f"), d.path().join("h")).unwrap();
        assert_eq!(relation(&d.path().join("h"), &a.join("f")), Some("is"));
    }

    /// Two outputs of one run; the second's target appears (a user's file) before the commit: neither
    /// is renamed into place, the user's file is untouched, and no temporary is left.
    #[test]
    fn a_target_that_appears_during_a_run_stops_all_its_outputs() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let staged: Vec<Staged> = [&a, &b]
            .iter()
            .map(|t| Staged::folder(t, Kind::ModelFolder, false).unwrap())
            .collect();
        std::fs::write(staged[0].path().join("model.safetensors"), b"x").unwrap();
        std::fs::write(&b, b"the user's").unwrap();
        let err = commit_all(staged).unwrap_err();
        assert!(err.to_string().contains(b.to_str().unwrap()), "{err}");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b"], "nothing but the user's file");
        assert_eq!(std::fs::read(&b).unwrap(), b"the user's");
        // Without the conflict, both are committed.
        std::fs::remove_file(&b).unwrap();
        let staged: Vec<Staged> = [&a, &b]
            .iter()
            .map(|t| Staged::folder(t, Kind::ModelFolder, false).unwrap())
            .collect();
        assert_eq!(commit_all(staged).unwrap(), [a.clone(), b.clone()]);
        assert!(a.is_dir() && b.is_dir());
    }

    /// In `dir`, a new output at a temporary name and the old one at its target, `t`: folders holding
    /// `new` and `old`, or files holding those words. Returns (temporary, target).
    fn new_over_old(dir: &Path, folders: bool) -> (PathBuf, PathBuf) {
        let (tmp, target) = (dir.join(".t.gemma-merge-tmp-1"), dir.join("t"));
        if folders {
            std::fs::create_dir(&tmp).unwrap();
            std::fs::write(tmp.join("new"), b"1").unwrap();
            std::fs::create_dir(&target).unwrap();
            std::fs::write(target.join("old"), b"0").unwrap();
        } else {
            std::fs::write(&tmp, b"new").unwrap();
            std::fs::write(&target, b"old").unwrap();
        }
        (tmp, target)
    }

    /// Both ways of replacing a target (one exchange, or two renames) end with only the new copy in place;
    /// undone, with the old copy back in place and the new one at the temporary name.
    #[test]
    fn both_ways_of_replacing_leave_the_new_copy_or_put_the_old_back() {
        for two_renames in [false, true] {
            for undo in [false, true] {
                let d = tempfile::tempdir().unwrap();
                let (tmp, target) = new_over_old(d.path(), true);
                let placed = place(&tmp, &target, two_renames).unwrap();
                if undo {
                    assert_eq!(unplace(&tmp, &target, placed), None);
                } else {
                    finish(&tmp, placed);
                }
                let mut names: Vec<_> = std::fs::read_dir(d.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                let case = format!("two_renames={two_renames} undo={undo}");
                if undo {
                    assert_eq!(names, [".t.gemma-merge-tmp-1", "t"], "{case}");
                    assert!(
                        target.join("old").exists() && tmp.join("new").exists(),
                        "{case}"
                    );
                } else {
                    assert_eq!(names, ["t"], "{case}");
                    assert!(target.join("new").exists() && !target.join("old").exists());
                }
            }
        }
    }

    /// An undo whose way back is blocked (the temporary's name taken in between, here by a non-empty
    /// folder) still puts the old copy back in place: the new output is removed instead.
    #[test]
    fn an_undo_whose_way_back_is_blocked_still_puts_the_old_copy_back() {
        for two_renames in [false, true] {
            for folders in [false, true] {
                let d = tempfile::tempdir().unwrap();
                let (tmp, target) = new_over_old(d.path(), folders);
                let (old_file, new_file) = if folders {
                    (target.join("old"), target.join("new"))
                } else {
                    (target.clone(), target.clone())
                };
                let placed = place(&tmp, &target, two_renames).unwrap();
                let case = format!("two_renames={two_renames} folders={folders} {placed:?}");
                // After an exchange the old copy sits at `tmp` and the way back is the exchange itself,
                // blocked here by the new copy being gone from `target`; after two renames, by a
                // non-empty folder taking the temporary's name.
                if matches!(placed, Placed::Exchanged) {
                    remove_any(&target);
                } else {
                    std::fs::create_dir(&tmp).unwrap();
                    std::fs::write(tmp.join("blocker"), b"").unwrap();
                }
                assert_eq!(unplace(&tmp, &target, placed), None, "{case}");
                if folders {
                    assert!(old_file.exists() && !new_file.exists(), "{case}");
                } else {
                    assert_eq!(std::fs::read(&target).unwrap(), b"old", "{case}");
                }
                let names: Vec<_> = std::fs::read_dir(d.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| !n.starts_with(".t.gemma-merge-tmp"))
                    .collect();
                assert_eq!(names, ["t"], "no old copy left aside: {case}");
            }
        }
    }

    /// A rename that fails part way through a run's outputs (here: the second output's temporary is
    /// gone) puts back those already in place: a replaced target gets its old contents again, and no
    /// temporary is left.
    #[test]
    fn a_commit_failing_part_way_puts_back_the_outputs_already_in_place() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        let staged: Vec<Staged> = [&a, &b]
            .iter()
            .map(|t| Staged::folder(t, Kind::ModelFolder, true).unwrap())
            .collect();
        std::fs::write(staged[0].path().join("model.safetensors"), b"x").unwrap();
        std::fs::remove_dir(staged[1].path()).unwrap();
        assert!(commit_all(staged).is_err());
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a"], "the old `a` only");
        assert_eq!(
            std::fs::read_dir(&a).unwrap().count(),
            0,
            "`a` as it was (empty)"
        );
    }

    #[test]
    fn exchange_swaps_or_reports_unsupported() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        match exchange(&a, &b) {
            Ok(()) => {
                assert_eq!(std::fs::read(&b).unwrap(), b"new");
                assert_eq!(std::fs::read(&a).unwrap(), b"old");
            }
            Err(e) => assert!(exchange_unsupported(&e), "{e}"),
        }
    }
}
