//! Hugging Face ids (`org/name`, optionally `@revision`) resolved in the local Hugging Face cache. Nothing
//! is ever downloaded.

use std::path::{Path, PathBuf};

/// Whether a model reference looks like a hub id rather than a path: `org/name` or `org/name@rev`, with
/// no other slash and nothing that only a path has.
pub fn is_hub_id(reference: &str) -> bool {
    let id = reference.split('@').next().unwrap_or("");
    let mut parts = id.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name) && reference.matches('@').count() <= 1
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The snapshot folder of `org/name[@revision]` in `cache`: `models--org--name/snapshots/<commit>`, the
/// commit being `refs/<revision or main>` (or the revision itself when it is a commit hash).
pub fn resolve_in(cache: &Path, reference: &str) -> Result<PathBuf, String> {
    let (id, revision) = match reference.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (reference, "main"),
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let direct = snapshots.join(revision);
    let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if direct.is_dir() => revision.to_string(),
        Err(_) => {
            return Err(format!(
                "the Hugging Face model `{reference}` is not in the local cache (searched {}; gemma-merge never downloads: fetch it first, e.g. `huggingface-cli download {id}`)",
                repo.join("refs").join(revision).display()
            ))
        }
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(format!(
            "{}: not a commit",
            repo.join("refs").join(revision).display()
        ));
    }
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        return Err(format!(
            "the Hugging Face model `{reference}` is not in the local cache ({} is missing)",
            dir.display()
        ));
    }
    Ok(dir)
}

/// [`resolve_in`] the [`cache_dir`].
pub fn resolve(reference: &str) -> Result<PathBuf, String> {
    resolve_in(&cache_dir(), reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert!(is_hub_id("google/gemma-2-2b"));
        assert!(is_hub_id("google/gemma-2-2b@main"));
        assert!(!is_hub_id("../sft"));
        assert!(!is_hub_id("./a/b"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("sft"));
    }

    #[test]
    fn snapshots_resolve_through_refs_and_missing_ones_name_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            resolve_in(d.path(), "org/name").unwrap(),
            repo.join("snapshots/abc123")
        );
        assert_eq!(
            resolve_in(d.path(), "org/name@def456").unwrap(),
            repo.join("snapshots/def456")
        );
        let e = resolve_in(d.path(), "org/other").unwrap_err();
        assert!(e.contains("models--org--other"), "{e}");
        let e = resolve_in(d.path(), "org/name@v2").unwrap_err();
        assert!(e.contains("refs/v2"), "{e}");
    }
}
