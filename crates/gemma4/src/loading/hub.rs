//! Hugging Face hub ids (`google/gemma-4-E2B-it`) resolved in the local hub cache, the
//! layout `huggingface_hub` writes: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, holding `models--ORG--NAME/snapshots/REVISION/` and
//! `refs/main` naming the revision. Nothing is downloaded here: a checkpoint missing from
//! the cache is an error that says how to fetch it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether `s` has the form of a hub id (`org/name`, no other path parts).
pub fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The hub cache directory the environment names.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// The snapshot directory of hub id `id` (`org/name`, optionally `@revision`) in
/// `cache`.
pub fn resolve_in(cache: &Path, id: &str) -> Result<PathBuf> {
    let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = |why: String| {
        Error::io(
            &root,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{why}; fetch it with `huggingface-cli download {repo}` (or `hf download {repo}`)"
                ),
            ),
        )
    };
    if !root.is_dir() {
        return Err(missing(format!(
            "no directory `{repo}`, and no such model in the hub cache"
        )));
    }
    // A revision is a commit hash or a ref (`main`) that names one.
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = root.join("snapshots").join(&commit);
    if is_plain_name(&commit) && snapshot.is_dir() {
        return Ok(snapshot);
    }
    Err(missing(format!(
        "`{repo}` has no snapshot for revision `{revision}` in the hub cache"
    )))
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s != ".."
}

/// `model` as a directory: itself when it is one, else a hub id looked up in the cache.
pub fn resolve(model: &Path) -> Result<PathBuf> {
    let text = model.to_string_lossy();
    let id = text.split('@').next().unwrap_or_default();
    if model.is_dir() || !is_hub_id(id) {
        return Ok(model.to_path_buf());
    }
    match cache_dir() {
        Some(cache) => resolve_in(&cache, &text),
        None => Ok(model.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_to_their_snapshot() {
        let cache = std::env::temp_dir().join(format!("gemma4-hub-{}", std::process::id()));
        let repo = cache.join("models--google--gemma-4-E2B-it");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snap = |id: &str| resolve_in(&cache, id);
        assert_eq!(
            snap("google/gemma-4-E2B-it").unwrap(),
            repo.join("snapshots/abc123")
        );
        assert_eq!(
            snap("google/gemma-4-E2B-it@def456").unwrap(),
            repo.join("snapshots/def456")
        );
        let e = snap("google/gemma-4-31B-it").unwrap_err().to_string();
        assert!(
            e.contains("hub cache") && e.contains("huggingface-cli download google/gemma-4-31B-it"),
            "{e}"
        );
        assert!(snap("google/gemma-4-E2B-it@nope").is_err());
        // A ref may not lead outside the snapshots.
        std::fs::write(repo.join("refs/evil"), "../../..\n").unwrap();
        assert!(snap("google/gemma-4-E2B-it@evil").is_err());
        std::fs::remove_dir_all(&cache).ok();
        assert!(is_hub_id("google/gemma-4-E2B-it"));
        for not in [
            "tests/fixtures/e2b_like/x",
            "/abs/path",
            "a/..",
            "./x",
            "plain",
            "a//b",
        ] {
            assert!(!is_hub_id(not), "{not}");
        }
    }
}
