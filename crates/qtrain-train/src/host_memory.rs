//! How much host memory this process may pin for offloaded gradient checkpoints:
//! the kernel's `MemAvailable`, or less where the process runs in a memory cgroup
//! with a limit (a container started with `--memory`, a Kubernetes pod, a systemd
//! slice). `MemAvailable` describes the whole machine, so inside a 16 GiB container
//! on a 128 GiB host it would promise ~120 GiB; pinned pages cannot be swapped or
//! reclaimed, and pinning past the cgroup's limit gets the process OOM-killed.

use std::path::{Path, PathBuf};

/// What the host can give this process without swapping, in bytes: the smaller of
/// `MemAvailable` (`/proc/meminfo`) and the headroom of every memory cgroup the
/// process is in, its own and its ancestors' (limit minus working set); None where
/// neither can be read (not Linux).
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let machine = meminfo.as_deref().and_then(parse_mem_available);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_headroom(&text, Path::new("/sys/fs/cgroup")));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The smallest headroom of the memory cgroups named by `proc_self_cgroup` (the text
/// of `/proc/self/cgroup`) under the cgroup mount `root`, each directory from the
/// process's own up to the mount (a limit on an ancestor binds too); None where no
/// directory on the way has a limit. cgroup v2 (`0::/path`, files `memory.max`,
/// `memory.current`) and v1 (`N:memory:/path` under `root/memory`, files
/// `memory.limit_in_bytes`, `memory.usage_in_bytes`).
pub fn cgroup_headroom(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    proc_self_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            match controllers {
                "" => Some((root.to_path_buf(), path, Version::V2)),
                c if c.split(',').any(|c| c == "memory") => {
                    Some((root.join("memory"), path, Version::V1))
                }
                _ => None,
            }
        })
        .flat_map(|(mount, path, version)| {
            ancestors(&mount, path)
                .into_iter()
                .filter_map(move |dir| dir_headroom(&dir, version))
        })
        .min()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// `mount/path` and each directory above it up to `mount` itself.
fn ancestors(mount: &Path, path: &str) -> Vec<PathBuf> {
    let mut dirs = vec![mount.to_path_buf()];
    let mut dir = mount.to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
        dir = dir.join(part);
        dirs.push(dir.clone());
    }
    dirs
}

/// The headroom of one cgroup directory (None: no limit there, or not readable).
fn dir_headroom(dir: &Path, version: Version) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (limit, usage) = match version {
        Version::V2 => ("memory.max", "memory.current"),
        Version::V1 => ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    };
    headroom(
        &read(limit)?,
        &read(usage)?,
        read("memory.stat").as_deref().unwrap_or(""),
        version,
    )
}

/// A v1 limit this large means none: the kernel writes the largest page-aligned
/// `i64` (9223372036854771712) for "unlimited".
const V1_UNLIMITED: u64 = 1 << 62;

/// The room left under a cgroup's memory limit: the limit minus the working set,
/// which is the usage less the inactive file pages (page cache the kernel reclaims
/// before it fails an allocation, as `docker stats` and the kubelet count it). None
/// for no limit (`max` in v2, a huge value in v1) or text that is not a number.
fn headroom(limit: &str, usage: &str, stat: &str, version: Version) -> Option<u64> {
    let limit = limit.trim();
    if version == Version::V2 && limit == "max" {
        return None;
    }
    let limit: u64 = limit.parse().ok()?;
    if version == Version::V1 && limit >= V1_UNLIMITED {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let key = match version {
        Version::V2 => "inactive_file",
        Version::V1 => "total_inactive_file",
    };
    let inactive = stat
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0u64);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text =
            "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   65536000 kB\n";
        assert_eq!(parse_mem_available(text), Some(65536000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn headroom_is_the_limit_less_the_working_set() {
        let stat = "active_file 100\ninactive_file 1073741824\nfile 5\n";
        let v2 = |limit, usage| headroom(limit, usage, stat, Version::V2);
        // 16 GiB limit, 5 GiB used of which 1 GiB is reclaimable page cache.
        assert_eq!(v2("17179869184\n", "5368709120\n"), Some(12 * GIB));
        assert_eq!(v2("max\n", "5368709120\n"), None);
        assert_eq!(v2("lots", "1"), None);
        // Over the limit (usage counted before reclaim): nothing left, no underflow.
        assert_eq!(v2("1024", "1073745920"), Some(0));
        let v1_stat = "inactive_file 7\ntotal_inactive_file 1073741824\n";
        let v1 = |limit| headroom(limit, "5368709120", v1_stat, Version::V1);
        assert_eq!(v1("17179869184"), Some(12 * GIB));
        assert_eq!(v1("9223372036854771712"), None);
        // No memory.stat: the whole usage counts.
        assert_eq!(
            headroom("17179869184", "5368709120", "", Version::V2),
            Some(11 * GIB)
        );
    }

    /// A cgroup tree as a container runtime lays it out: the process's own cgroup
    /// has no limit, its parent (the container) has 16 GiB, the mount's root none;
    /// the parent's headroom binds. v1 and v2 alike; no memory cgroup, no answer.
    #[test]
    fn the_tightest_cgroup_on_the_way_up_binds() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |dir: &Path, files: &[(&str, &str)]| {
            std::fs::create_dir_all(dir).unwrap();
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
        };
        let root = tmp.path();
        // v2: root without files, /pod (16 GiB, 6 GiB used, 1 GiB inactive), /pod/app.
        write(
            &root.join("pod"),
            &[
                ("memory.max", "17179869184\n"),
                ("memory.current", "6442450944\n"),
                ("memory.stat", "inactive_file 1073741824\n"),
            ],
        );
        write(
            &root.join("pod/app"),
            &[("memory.max", "max\n"), ("memory.current", "4294967296\n")],
        );
        assert_eq!(cgroup_headroom("0::/pod/app\n", root), Some(11 * GIB));
        assert_eq!(cgroup_headroom("0::/\n", root), None);
        // v1: the memory controller's own hierarchy under root/memory.
        write(
            &root.join("memory/docker/abc"),
            &[
                ("memory.limit_in_bytes", "8589934592\n"),
                ("memory.usage_in_bytes", "2147483648\n"),
                ("memory.stat", "total_inactive_file 0\n"),
            ],
        );
        write(
            &root.join("memory"),
            &[
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory.usage_in_bytes", "99999999999\n"),
            ],
        );
        let v1 = "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(cgroup_headroom(v1, root), Some(6 * GIB));
        assert_eq!(cgroup_headroom("3:cpu,cpuacct:/x\n", root), None);
    }
}
