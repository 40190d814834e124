//! Turning what the user wrote (`./my-model`, `mistralai/Mistral-7B-v0.3`,
//! `org/name@revision`) into a local model directory.
//!
//! A path is used as is. A model id is looked up in the Hugging Face cache layout
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `models--org--name/refs/<rev>` holds the commit, `snapshots/<commit>/` the files),
//! so a model downloaded once by any HF tool works offline. Only when it is not
//! there, and `HF_HUB_OFFLINE` is not set, is it downloaded through `hf-hub` into
//! that same cache.

use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};

/// The HF hub cache directory this process should use.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// `org/name@rev` → (`org/name`, `rev`), with `main` as the default revision.
fn split_revision(id: &str) -> (&str, &str) {
    match id.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (id, "main"),
    }
}

/// Looks `id` up in a hub cache without touching the network. `kind` is `models`
/// or `datasets`.
pub fn find_in_cache(cache: &Path, kind: &str, id: &str) -> Option<PathBuf> {
    let (id, rev) = split_revision(id);
    let repo = cache.join(format!("{kind}--{}", id.replace('/', "--")));
    // A revision is either a ref name (refs/<rev> holds the commit) or a commit hash.
    let commit = std::fs::read_to_string(repo.join("refs").join(rev))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| rev.to_string());
    let snap = repo.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

/// Resolves a model path or hub id to a directory containing `config.json`.
pub fn resolve_model(id_or_path: &str) -> Result<PathBuf> {
    let as_path = Path::new(id_or_path);
    if as_path.is_dir() {
        if !as_path.join("config.json").exists() {
            return Err(ModelError::ModelNotFound {
                dir: as_path.to_path_buf(),
                msg: "the directory has no config.json".into(),
            });
        }
        return Ok(as_path.to_path_buf());
    }
    let looks_like_id = id_or_path.split('/').count() == 2
        && !id_or_path.starts_with('.')
        && !id_or_path.starts_with('/');
    if !looks_like_id {
        return Err(ModelError::ModelNotFound {
            dir: as_path.to_path_buf(),
            msg: "no such directory (and it is not an `org/name` hub id)".into(),
        });
    }
    let cache = hub_cache_dir();
    if let Some(dir) = find_in_cache(&cache, "models", id_or_path) {
        if dir.join("config.json").exists() {
            return Ok(dir);
        }
    }
    if offline() {
        return Err(ModelError::ModelNotFound {
            dir: cache,
            msg: format!("`{id_or_path}` is not in the hub cache and HF_HUB_OFFLINE is set"),
        });
    }
    download(&cache, id_or_path)
}

/// Downloads config, tokenizer and weights of `id` into the hub cache.
fn download(cache: &Path, id: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let (name, rev) = split_revision(id);
    let api = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(format!("{id}: {e}")))?;
    let repo = api.repo(Repo::with_revision(
        name.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| ModelError::Hub(format!("{id}: {f}: {e}")))
    };
    let config = get("config.json")?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        // Optional files: a model may lack a generation config.
        let _ = repo.get(f);
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
                    path: index.clone(),
                    msg: e.to_string(),
                })?;
            let mut files: Vec<String> = json["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                get(&f)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().expect("file in snapshot dir").to_path_buf())
}

/// Loads `tokenizer.json` of a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::Tokenizer {
            path,
            msg: "missing (qtrain needs the fast-tokenizer file tokenizer.json)".into(),
        });
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
        path,
        msg: e.to_string(),
    })
}

/// Reads `tokenizer_config.json` if present (chat template, special tokens).
pub fn load_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::ConfigParse {
            path,
            msg: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_refs_and_by_commit() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        assert_eq!(
            find_in_cache(cache.path(), "models", "org/tiny"),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(
            find_in_cache(cache.path(), "models", "org/tiny@def456"),
            Some(repo.join("snapshots/def456"))
        );
        assert_eq!(find_in_cache(cache.path(), "models", "org/other"), None);
    }

    #[test]
    fn missing_directory_is_reported() {
        let err = resolve_model("./definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(err.contains("definitely/not/here"), "{err}");
    }
}
