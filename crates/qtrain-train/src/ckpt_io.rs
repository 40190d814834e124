//! Checkpoint directories on disk: written atomically, verified on read, pruned to
//! the newest K.
//!
//! A checkpoint is assembled in `ROOT/.tmp-step-NNNNNNNN`, every file is fsynced,
//! a `manifest.json` lists each file with its size and checksum, and only then is
//! the directory renamed to `ROOT/step-NNNNNNNN` and the `latest` pointer replaced
//! (write to a temporary file, rename). A crash at any point leaves either the old
//! or the new checkpoint complete, never a half-written one that looks valid.
//! Older checkpoints are deleted only after the new one is in place.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt checkpoint: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("{path}: no checkpoint found (expected a `latest` file or step-* directories)")]
    NoCheckpoint { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |e| CkptError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    /// FNV-1a 64 of the content, hex.
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub elapsed_secs: f64,
    pub files: Vec<FileEntry>,
}

/// FNV-1a 64: a cheap checksum that catches truncation and bit rot (not tampering).
fn checksum(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CkptError> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}tmp",
        path.extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Saves a checkpoint under `root`: `write` fills the given (temporary) directory,
/// then the manifest is added and the directory moved into place. Returns its path.
pub fn save(
    root: &Path,
    step: u64,
    elapsed_secs: f64,
    keep_last: usize,
    write: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<PathBuf, CkptError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let tmp = root.join(format!(".tmp-{}", step_dir_name(step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write(&tmp).map_err(|e| CkptError::Corrupt {
        path: tmp.clone(),
        msg: format!("writing the checkpoint failed: {e}"),
    })?;
    let mut names: Vec<String> = std::fs::read_dir(&tmp)
        .map_err(io(&tmp))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let p = tmp.join(&name);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        // The writers may not have synced; make the content durable before the rename.
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io(&p))?;
        files.push(FileEntry {
            checksum: checksum(&bytes),
            bytes: bytes.len() as u64,
            name,
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        elapsed_secs,
        files,
    };
    write_atomic(
        &tmp.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)
            .expect("manifest serializes")
            .as_bytes(),
    )?;
    let dest = root.join(step_dir_name(step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    write_atomic(&root.join("latest"), step_dir_name(step).as_bytes())?;
    prune(root, keep_last)?;
    Ok(dest)
}

/// Deletes all but the newest `keep_last` step directories (and stale temporaries).
fn prune(root: &Path, keep_last: usize) -> Result<(), CkptError> {
    let mut steps = list_steps(root)?;
    steps.sort();
    let n = steps.len();
    for (_, dir) in steps.into_iter().take(n.saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

fn list_steps(root: &Path) -> Result<Vec<(u64, PathBuf)>, CkptError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(io(root))? {
        let e = e.map_err(io(root))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    Ok(out)
}

/// The newest complete checkpoint under `root` (by the `latest` pointer, else the
/// highest step directory).
pub fn latest(root: &Path) -> Result<PathBuf, CkptError> {
    if let Ok(name) = std::fs::read_to_string(root.join("latest")) {
        let dir = root.join(name.trim());
        if dir.join(MANIFEST).exists() {
            return Ok(dir);
        }
    }
    let mut steps = list_steps(root).unwrap_or_default();
    steps.sort();
    steps
        .into_iter()
        .rev()
        .map(|(_, d)| d)
        .find(|d| d.join(MANIFEST).exists())
        .ok_or_else(|| CkptError::NoCheckpoint {
            path: root.to_path_buf(),
        })
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest, CkptError> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| CkptError::Corrupt {
        path: mpath.clone(),
        msg: e.to_string(),
    })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(CkptError::Corrupt {
            path: mpath,
            msg: format!(
                "format version {} (this qtrain reads {FORMAT_VERSION})",
                manifest.format_version
            ),
        });
    }
    for f in &manifest.files {
        let p = dir.join(&f.name);
        let bytes = std::fs::read(&p).map_err(|e| CkptError::Corrupt {
            path: p.clone(),
            msg: format!("listed in the manifest but unreadable: {e}"),
        })?;
        if bytes.len() as u64 != f.bytes || checksum(&bytes) != f.checksum {
            return Err(CkptError::Corrupt {
                path: p,
                msg: format!(
                    "size or checksum differs from the manifest ({} bytes, expected {})",
                    bytes.len(),
                    f.bytes
                ),
            });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save_with(root: &Path, step: u64, content: &str) -> PathBuf {
        let c = content.to_string();
        save(root, step, step as f64, 2, move |d| {
            std::fs::write(d.join("a.txt"), c)?;
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn saves_verifies_and_keeps_last_k() {
        let root = tempfile::tempdir().unwrap();
        for s in [10, 20, 30] {
            save_with(root.path(), s, &format!("step {s}"));
        }
        assert_eq!(
            latest(root.path()).unwrap(),
            root.path().join("step-00000030")
        );
        assert!(!root.path().join("step-00000010").exists(), "oldest pruned");
        assert!(root.path().join("step-00000020").exists());
        let m = verify(&root.path().join("step-00000030")).unwrap();
        assert_eq!(m.step, 30);
        assert_eq!(m.files.len(), 1);
        assert!(!root.path().join(".tmp-step-00000030").exists());
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let root = tempfile::tempdir().unwrap();
        let d = save_with(root.path(), 1, "hello");
        std::fs::write(d.join("a.txt"), "hellO").unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("checksum"), "{e}");
        std::fs::remove_file(d.join("a.txt")).unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("unreadable"), "{e}");
    }

    #[test]
    fn failed_write_leaves_previous_checkpoint_latest() {
        let root = tempfile::tempdir().unwrap();
        save_with(root.path(), 5, "ok");
        let r = save(root.path(), 6, 6.0, 2, |d| {
            std::fs::write(d.join("half.bin"), [1u8; 3])?;
            Err("disk full".into())
        });
        assert!(r.unwrap_err().to_string().contains("disk full"));
        assert_eq!(
            latest(root.path()).unwrap(),
            root.path().join("step-00000005")
        );
    }

    #[test]
    fn empty_root_names_itself() {
        let root = tempfile::tempdir().unwrap();
        let e = latest(root.path()).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
    }
}
