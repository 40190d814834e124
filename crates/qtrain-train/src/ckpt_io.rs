//! Checkpoint directories on disk: written atomically, verified on read, pruned
//! within their run's lineage; and the atomic directory writes of exports.
//!
//! A checkpoint is assembled in `ROOT/.tmp-step-NNNNNNNN`, every file is fsynced,
//! a `manifest.json` lists each file with its size and checksum (and the run id and
//! write time of the checkpoint), and only then is the directory renamed to
//! `ROOT/step-NNNNNNNN` and the `latest` pointer replaced (write to a temporary
//! file, rename). A crash at any point leaves either the old or the new checkpoint
//! complete, never a half-written one that looks valid; a failed write (a full disk)
//! removes its temporary directory and says how many bytes it needed.
//!
//! **Lineage.** Every run has a run id, kept by its resumes. Pruning keeps the
//! newest `keep_last` checkpoints *of the writer's own lineage*, by write order (a
//! run resumed from an older checkpoint writes the newest ones from then on), and
//! never deletes the checkpoint the run resumed from: another run's checkpoints in
//! the same directory are never touched, and `latest` always names a complete
//! checkpoint (it is replaced before anything is pruned, and the newest one is
//! always kept).
//!
//! Every file of a checkpoint gets the same permission mode (what a file created by
//! this process gets), so whoever may read one may read all of them.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT_VERSION: u32 = 1;
/// The prefix of a checkpoint's (or an export's) directory while it is written.
pub const TMP_PREFIX: &str = ".tmp-";

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
    /// Writing failed for want of space; the partial files are gone.
    #[error(
        "{path}: no space left on the device: the write needs about {}, {} free; the \
         partial files were removed{}",
        human_bytes(*needed),
        free.map_or("an unknown amount".to_string(), human_bytes),
        previous.as_ref().map_or(String::new(), |p| format!(
            " and the previous checkpoint {} is intact",
            p.display()
        ))
    )]
    DiskFull {
        path: PathBuf,
        needed: u64,
        free: Option<u64>,
        previous: Option<PathBuf>,
    },
    /// Writing a checkpoint or export failed for another reason; the partial files
    /// are gone.
    #[error("{path}: writing failed: {msg}; the partial files were removed")]
    WriteFailed { path: PathBuf, msg: String },
    /// No checkpoint under a root passed its checks.
    #[error("{path}: no complete checkpoint: {}", problems.join("; "))]
    NoneComplete {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// `1.5 GB`, `300.2 MB`, `3.0 kB`, `12 bytes`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} bytes")
    }
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
    /// The lineage this checkpoint belongs to (empty in checkpoints from before
    /// lineages existed).
    #[serde(default)]
    pub run_id: String,
    /// When it was written (milliseconds since the Unix epoch): the write order
    /// pruning and `latest` fall-backs go by.
    #[serde(default)]
    pub saved_unix_ms: u64,
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
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CkptError::Io {
            path: tmp,
            source: e,
        });
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// A new run id: time and process, unique enough to tell runs apart in one
/// output directory.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{:x}-{:x}",
        now.as_millis(),
        (now.subsec_nanos() ^ std::process::id()) & 0xffff
    )
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How [`save_with`] names, prunes and guards a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Keep this many of the lineage's newest checkpoints (at least one).
    pub keep_last: usize,
    /// The writer's lineage; only its checkpoints are pruned.
    pub run_id: String,
    /// Never pruned: the checkpoint this run resumed from.
    pub protect: Option<PathBuf>,
    /// What the checkpoint is expected to take on disk (for the free-space check
    /// before writing and the message when the disk fills up).
    pub expected_bytes: Option<u64>,
    /// Fails the write as a full disk would once it holds more than this many
    /// bytes: how tests exercise the disk-full path.
    pub write_quota: Option<u64>,
}

/// Saves a checkpoint under `root` keeping the newest `keep_last` (one lineage,
/// nothing protected); see [`save_with`].
pub fn save(
    root: &Path,
    step: u64,
    elapsed_secs: f64,
    keep_last: usize,
    write: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<PathBuf, CkptError> {
    let opts = SaveOptions {
        keep_last,
        ..SaveOptions::default()
    };
    save_with(root, step, elapsed_secs, &opts, write)
}

/// Saves a checkpoint under `root`: `write` fills the given (temporary) directory,
/// then the manifest is added, the directory moved into place, `latest` pointed at
/// it and the lineage pruned. Returns its path.
pub fn save_with(
    root: &Path,
    step: u64,
    elapsed_secs: f64,
    opts: &SaveOptions,
    write: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<PathBuf, CkptError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let tmp = root.join(format!("{TMP_PREFIX}{}", step_dir_name(step)));
    let previous = latest_pointer(root);
    let files = stage(&tmp, opts, previous.clone(), write)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        elapsed_secs,
        files,
        run_id: opts.run_id.clone(),
        saved_unix_ms: now_unix_ms(),
    };
    let finish = (|| {
        write_atomic(
            &tmp.join(MANIFEST),
            serde_json::to_string_pretty(&manifest)
                .expect("manifest serializes")
                .as_bytes(),
        )?;
        uniform_permissions(&tmp)
    })();
    if let Err(e) = finish {
        return Err(failed_write(&tmp, e.to_string(), opts, previous));
    }
    let dest = root.join(step_dir_name(step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    write_atomic(&root.join("latest"), step_dir_name(step).as_bytes())?;
    prune(root, opts, &dest)?;
    Ok(dest)
}

/// Fills the temporary directory `tmp` with `write` and fsyncs its files; returns
/// their manifest entries. On any failure `tmp` is removed and the error says
/// whether the disk was full and how much the write needed.
fn stage(
    tmp: &Path,
    opts: &SaveOptions,
    previous: Option<PathBuf>,
    write: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Vec<FileEntry>, CkptError> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    if let (Some(need), Some(free)) = (opts.expected_bytes, free_bytes(tmp)) {
        if free < need {
            let _ = std::fs::remove_dir_all(tmp);
            return Err(CkptError::DiskFull {
                path: tmp.to_path_buf(),
                needed: need,
                free: Some(free),
                previous,
            });
        }
    }
    let written = write(tmp).and_then(|()| {
        let used = dir_bytes(tmp);
        match opts.write_quota {
            Some(q) if used > q => Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("write quota of {q} bytes exceeded (test hook)"),
            )) as Box<dyn std::error::Error + Send + Sync>),
            _ => Ok(()),
        }
    });
    if let Err(e) = written {
        let msg = error_chain(e.as_ref());
        let full = is_disk_full(e.as_ref());
        return Err(if full {
            let written = dir_bytes(tmp);
            let _ = std::fs::remove_dir_all(tmp);
            CkptError::DiskFull {
                path: tmp.to_path_buf(),
                needed: opts.expected_bytes.unwrap_or(written).max(written),
                free: free_bytes(tmp.parent().unwrap_or(tmp)),
                previous,
            }
        } else {
            failed_write(tmp, msg, opts, previous)
        });
    }
    let mut names: Vec<String> = std::fs::read_dir(tmp)
        .map_err(io(tmp))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let p = tmp.join(&name);
        // The writers may not have synced; make the content durable before the rename.
        let read = std::fs::read(&p).and_then(|bytes| {
            std::fs::File::open(&p)?.sync_all()?;
            Ok(bytes)
        });
        let bytes = match read {
            Ok(b) => b,
            Err(e) => return Err(failed_write(tmp, format!("{name}: {e}"), opts, previous)),
        };
        files.push(FileEntry {
            checksum: checksum(&bytes),
            bytes: bytes.len() as u64,
            name,
        });
    }
    Ok(files)
}

/// Removes a failed write's temporary directory; the error says why it failed.
fn failed_write(
    tmp: &Path,
    msg: String,
    opts: &SaveOptions,
    previous: Option<PathBuf>,
) -> CkptError {
    let written = dir_bytes(tmp);
    let _ = std::fs::remove_dir_all(tmp);
    let free = free_bytes(tmp.parent().unwrap_or(tmp));
    // Writers that lose the OS error in their own message still fail on a full disk:
    // so little room left that the write cannot have fit is a full disk too.
    let need = opts.expected_bytes.unwrap_or(written).max(written);
    if free.is_some_and(|f| f < need.clamp(1, 1 << 20)) {
        return CkptError::DiskFull {
            path: tmp.to_path_buf(),
            needed: need,
            free,
            previous,
        };
    }
    CkptError::WriteFailed {
        path: tmp.to_path_buf(),
        msg,
    }
}

/// One line of an error and its sources, without repeating a source whose text the
/// message already holds.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// Whether an error (or one of its sources) is the OS saying the disk is full.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.raw_os_error() == Some(libc::ENOSPC)
                || io.raw_os_error() == Some(libc::EDQUOT)
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Bytes free for this user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out value.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Total size of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Gives every file in `dir` the mode of its manifest (a file this process created
/// with the default mode): writers that create private files (a persisted temp file
/// is 0600) would otherwise leave one checkpoint readable only in part.
fn uniform_permissions(dir: &Path) -> Result<(), CkptError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(MANIFEST))
        .map_err(io(dir))?
        .permissions()
        .mode()
        & 0o777;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// A checkpoint directory and what its manifest says (without checking its files).
#[derive(Debug, Clone)]
pub struct Listed {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// The complete (manifest-bearing) checkpoints under `root`, oldest first in
/// write order (then step).
pub fn list(root: &Path) -> Vec<Listed> {
    let mut out: Vec<Listed> = list_steps(root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, dir)| {
            let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
            let manifest: Manifest = serde_json::from_str(&text).ok()?;
            Some(Listed { dir, manifest })
        })
        .collect();
    out.sort_by_key(|l| (l.manifest.saved_unix_ms, l.manifest.step));
    out
}

/// Deletes the lineage's checkpoints beyond the newest `keep_last`, never the one
/// just written (`newest`) nor the protected one.
fn prune(root: &Path, opts: &SaveOptions, newest: &Path) -> Result<(), CkptError> {
    let own: Vec<Listed> = list(root)
        .into_iter()
        .filter(|l| l.manifest.run_id == opts.run_id)
        .collect();
    let n = own.len();
    let keep = opts.keep_last.max(1);
    for l in own.into_iter().take(n.saturating_sub(keep)) {
        let protected = opts.protect.as_deref().is_some_and(|p| same_dir(p, &l.dir));
        if protected || same_dir(&l.dir, newest) {
            continue;
        }
        std::fs::remove_dir_all(&l.dir).map_err(io(&l.dir))?;
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Removes the temporary directories failed or killed writes left under `root`.
pub fn remove_stale_temporaries(root: &Path) -> Result<usize, CkptError> {
    remove_stale_with_prefix(root, TMP_PREFIX)
}

/// Removes the entries of `dir` whose names start with `prefix` (temporaries of
/// killed writes: [`write_dir_atomic`] stages `dest` in `.tmp-NAME-PID`).
pub fn remove_stale_with_prefix(dir: &Path, prefix: &str) -> Result<usize, CkptError> {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            } else {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
            n += 1;
        }
    }
    Ok(n)
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

/// Where `root/latest` points, when that directory has a manifest.
fn latest_pointer(root: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(root.join("latest")).ok()?;
    let dir = root.join(name.trim());
    dir.join(MANIFEST).exists().then_some(dir)
}

/// The newest complete checkpoint under `root` (by the `latest` pointer, else the
/// newest in write order).
pub fn latest(root: &Path) -> Result<PathBuf, CkptError> {
    if let Some(dir) = latest_pointer(root) {
        return Ok(dir);
    }
    list(root)
        .pop()
        .map(|l| l.dir)
        .ok_or_else(|| CkptError::NoCheckpoint {
            path: root.to_path_buf(),
        })
}

/// The newest checkpoint under `root` that passes [`verify`]: the one `latest`
/// names, else the others newest first. Returns it with one line per newer
/// checkpoint that failed (file and check), for the warning.
pub fn latest_verified(root: &Path) -> Result<(PathBuf, Vec<String>), CkptError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = latest_pointer(root) {
        candidates.push(p);
    }
    for l in list(root).into_iter().rev() {
        if !candidates.iter().any(|c| same_dir(c, &l.dir)) {
            candidates.push(l.dir);
        }
    }
    if candidates.is_empty() {
        return Err(CkptError::NoCheckpoint {
            path: root.to_path_buf(),
        });
    }
    let mut problems = Vec::new();
    for c in candidates {
        match verify(&c) {
            Ok(_) => return Ok((c, problems)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Err(CkptError::NoneComplete {
        path: root.to_path_buf(),
        problems,
    })
}

/// Checks every file of a checkpoint against its manifest: its size first, then
/// its checksum, each reported as such.
pub fn verify(dir: &Path) -> Result<Manifest, CkptError> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| CkptError::Corrupt {
        path: mpath.clone(),
        msg: format!(
            "no readable manifest ({e}): not a complete checkpoint (its write did not finish)"
        ),
    })?;
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
        if bytes.len() as u64 != f.bytes {
            return Err(CkptError::Corrupt {
                path: p,
                msg: format!(
                    "size check failed: {} bytes, the manifest says {} (truncated or \
                     overwritten)",
                    bytes.len(),
                    f.bytes
                ),
            });
        }
        let sum = checksum(&bytes);
        if sum != f.checksum {
            return Err(CkptError::Corrupt {
                path: p,
                msg: format!(
                    "checksum check failed: {sum}, the manifest says {} (the size matches, \
                     {} bytes: the content is damaged)",
                    f.checksum, f.bytes
                ),
            });
        }
    }
    Ok(manifest)
}

/// Writes a directory of outputs (an export) atomically: `write` fills a temporary
/// sibling of `dest`, whose files then replace same-named files in `dest` (other
/// files there are left alone). A failed write removes the temporary directory;
/// a full disk is reported with the bytes needed. `quota` is the test hook of
/// [`SaveOptions::write_quota`].
pub fn write_dir_atomic(
    dest: &Path,
    expected_bytes: Option<u64>,
    quota: Option<u64>,
    write: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<(), CkptError> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = dest
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let opts = SaveOptions {
        expected_bytes,
        write_quota: quota,
        ..SaveOptions::default()
    };
    stage(&tmp, &opts, None, write)?;
    let moved = (|| -> Result<(), CkptError> {
        uniform_permissions_by_first(&tmp)?;
        std::fs::create_dir_all(dest).map_err(io(dest))?;
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let e = e.map_err(io(&tmp))?;
            let to = dest.join(e.file_name());
            if to.is_dir() {
                std::fs::remove_dir_all(&to).map_err(io(&to))?;
            }
            std::fs::rename(e.path(), &to).map_err(io(&to))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    moved
}

/// [`uniform_permissions`] for a directory without a manifest: the mode a new file
/// of this process gets.
fn uniform_permissions_by_first(dir: &Path) -> Result<(), CkptError> {
    let probe = dir.join(MANIFEST);
    std::fs::write(&probe, b"").map_err(io(&probe))?;
    let r = uniform_permissions(dir);
    let _ = std::fs::remove_file(&probe);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save_with_content(root: &Path, step: u64, content: &str) -> PathBuf {
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
            save_with_content(root.path(), s, &format!("step {s}"));
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
        let d = save_with_content(root.path(), 1, "hello");
        std::fs::write(d.join("a.txt"), "hellO").unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("checksum"), "{e}");
        std::fs::remove_file(d.join("a.txt")).unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("unreadable"), "{e}");
    }

    #[test]
    fn size_and_checksum_failures_are_told_apart() {
        let root = tempfile::tempdir().unwrap();
        let d = save_with_content(root.path(), 1, "hello");
        std::fs::write(d.join("a.txt"), "hell").unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(
            e.contains("a.txt") && e.contains("size check failed: 4 bytes, the manifest says 5"),
            "{e}"
        );
        assert!(!e.contains("checksum"), "{e}");
        std::fs::write(d.join("a.txt"), "jello").unwrap();
        let e = verify(&d).unwrap_err().to_string();
        assert!(
            e.contains("checksum check failed") && e.contains("the size matches, 5 bytes"),
            "{e}"
        );
    }

    #[test]
    fn failed_write_leaves_previous_checkpoint_latest() {
        let root = tempfile::tempdir().unwrap();
        save_with_content(root.path(), 5, "ok");
        let r = save(root.path(), 6, 6.0, 2, |d| {
            std::fs::write(d.join("half.bin"), [1u8; 3])?;
            Err("disk full".into())
        });
        assert!(r.unwrap_err().to_string().contains("disk full"));
        assert_eq!(
            latest(root.path()).unwrap(),
            root.path().join("step-00000005")
        );
        assert!(
            !root.path().join(".tmp-step-00000006").exists(),
            "the partial write is removed"
        );
    }

    /// The disk fills up in the middle of a checkpoint (the quota hook): the
    /// temporary directory goes, the message says so and what was needed, and the
    /// previous checkpoint stays `latest` and intact.
    #[test]
    fn a_full_disk_cleans_up_and_says_what_was_needed() {
        let root = tempfile::tempdir().unwrap();
        let first = save_with_content(root.path(), 1, "ok");
        let opts = SaveOptions {
            keep_last: 1,
            expected_bytes: Some(3000),
            write_quota: Some(1000),
            ..SaveOptions::default()
        };
        let e = save_with(root.path(), 2, 2.0, &opts, |d| {
            std::fs::write(d.join("big.bin"), vec![7u8; 3000])?;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, CkptError::DiskFull { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("no space left"), "{msg}");
        assert!(msg.contains("needs about 3.0 kB"), "{msg}");
        assert!(
            msg.contains("step-00000001") && msg.contains("intact"),
            "{msg}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(latest(root.path()).unwrap(), first);
        verify(&first).unwrap();
        // An OS-level ENOSPC inside a writer's error chain is recognized too.
        let e = save_with(root.path(), 3, 3.0, &SaveOptions::default(), |_| {
            Err(Box::new(std::io::Error::from_raw_os_error(libc::ENOSPC)))
        })
        .unwrap_err();
        assert!(matches!(e, CkptError::DiskFull { .. }), "{e}");
    }

    /// Pruning keeps to its lineage, never deletes the protected (resumed-from)
    /// checkpoint, and goes by write order, not step number.
    #[test]
    fn pruning_keeps_to_the_lineage_and_the_protected_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let put = |step: u64, run: &str, keep: usize, protect: Option<PathBuf>| {
            let opts = SaveOptions {
                keep_last: keep,
                run_id: run.into(),
                protect,
                ..SaveOptions::default()
            };
            let d = save_with(root.path(), step, 0.0, &opts, |d| {
                std::fs::write(d.join("x"), step.to_string())?;
                Ok(())
            })
            .unwrap();
            // Distinct write times.
            std::thread::sleep(std::time::Duration::from_millis(3));
            d
        };
        let other = put(50, "other", 1, None);
        let ten = put(10, "mine", 1, None);
        let twenty = put(20, "mine", 1, None);
        assert!(!ten.exists(), "own lineage pruned to one");
        assert!(other.exists(), "another lineage is never pruned");
        // Resumed from step 20 with keep_last = 1: step 21 does not delete 20.
        let after = put(21, "mine", 1, Some(twenty.clone()));
        assert!(twenty.exists() && after.exists());
        // A run resumed from an older checkpoint writes the newest ones: step 15
        // written now outranks step 21 written before.
        let fifteen = put(15, "mine", 1, None);
        assert!(fifteen.exists());
        assert!(!after.exists() && !twenty.exists());
        assert_eq!(latest(root.path()).unwrap(), fifteen);
        assert!(other.exists());
    }

    #[test]
    fn a_corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
        let root = tempfile::tempdir().unwrap();
        let a = save_with_content(root.path(), 1, "one");
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = save_with_content(root.path(), 2, "two");
        std::fs::write(b.join("a.txt"), "twO").unwrap();
        let (found, problems) = latest_verified(root.path()).unwrap();
        assert_eq!(found, a);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("step-00000002") && problems[0].contains("a.txt"));
        assert!(
            problems[0].contains("checksum check failed"),
            "{problems:?}"
        );
        std::fs::write(a.join("a.txt"), "x").unwrap();
        let e = latest_verified(root.path()).unwrap_err().to_string();
        assert!(e.contains("no complete checkpoint"), "{e}");
    }

    #[test]
    fn checkpoint_files_share_one_mode() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let d = save(root.path(), 1, 0.0, 1, |d| {
            std::fs::write(d.join("open.bin"), b"a")?;
            let p = d.join("private.bin");
            std::fs::write(&p, b"b")?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            Ok(())
        })
        .unwrap();
        let mode = |n: &str| std::fs::metadata(d.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("private.bin"), mode("open.bin"));
        assert_eq!(mode(MANIFEST), mode("open.bin"));
    }

    #[test]
    fn exports_are_written_atomically() {
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("out");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("keep.txt"), "mine").unwrap();
        write_dir_atomic(&dest, None, None, |d| {
            std::fs::write(d.join("adapter.bin"), b"new")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(dest.join("adapter.bin")).unwrap(), b"new");
        assert_eq!(std::fs::read(dest.join("keep.txt")).unwrap(), b"mine");
        let e = write_dir_atomic(&dest, Some(4000), Some(100), |d| {
            std::fs::write(d.join("adapter.bin"), vec![0u8; 4000])?;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, CkptError::DiskFull { needed: 4000, .. }), "{e}");
        assert_eq!(std::fs::read(dest.join("adapter.bin")).unwrap(), b"new");
        let tmp_left = std::fs::read_dir(parent.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX));
        assert!(!tmp_left);
    }

    #[test]
    fn empty_root_names_itself() {
        let root = tempfile::tempdir().unwrap();
        let e = latest(root.path()).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
    }
}
