//! `--model ORG/NAME[@REVISION]` missing from the local hub cache: downloaded into it with
//! `hf-hub`, Hugging Face's own Rust client, in the layout `huggingface_hub` writes
//! (`models--ORG--NAME/{blobs,snapshots/COMMIT,refs/REVISION}`), so the next run, and
//! Python tools, find it there.
//!
//! What is fetched: the checkpoint's JSON files (config, tokenizer, processor, generation
//! config, the safetensors index), its `.jinja` chat template and its `.safetensors`
//! shards; not the README, other weight formats or GGUF quantizations (a GGUF repository
//! holds many; download the one file you want into a directory instead). The environment
//! is read as `huggingface_hub` reads it: `HF_HUB_OFFLINE=1` never downloads,
//! `HF_ENDPOINT` names a mirror, `HF_TOKEN` (else the token file `huggingface-cli login`
//! writes) opens gated repositories, as Gemma's are.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

/// Whether `name` is a file the engine reads.
fn wanted(name: &str) -> bool {
    let top_level = !name.contains('/');
    top_level
        && (name.ends_with(".json") || name.ends_with(".jinja") || name.ends_with(".safetensors"))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Downloads hub id `id` (`org/name`, optionally `@revision`) into `cache`; returns its
/// snapshot directory.
pub(crate) fn download(cache: &Path, id: &str) -> Result<PathBuf, String> {
    if offline() {
        return Err("HF_HUB_OFFLINE is set, so it is not downloaded".into());
    }
    let (repo_id, revision) = id.split_once('@').unwrap_or((id, "main"));
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let mut builder = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(3);
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = repo
        .info()
        .map_err(|e| format!("the hub did not list `{id}`: {e}"))?;
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|n| wanted(n))
        .collect();
    if !files.contains(&"config.json") {
        return Err(format!(
            "`{id}` on the hub has no config.json next to safetensors weights"
        ));
    }
    let mut snapshot = None;
    for name in files {
        if !std::io::stderr().is_terminal() {
            eprintln!("downloading {repo_id}/{name}");
        }
        let path = repo
            .get(name)
            .map_err(|e| format!("downloading `{name}` of `{id}` failed: {e}"))?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| format!("`{id}` has no files to download"))
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn only_the_files_the_engine_reads_are_fetched() {
        for yes in [
            "config.json",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "chat_template.jinja",
        ] {
            assert!(wanted(yes), "{yes}");
        }
        for no in [
            "README.md",
            "model.gguf",
            "pytorch_model.bin",
            "onnx/model.json",
            ".gitattributes",
        ] {
            assert!(!wanted(no), "{no}");
        }
    }
}
