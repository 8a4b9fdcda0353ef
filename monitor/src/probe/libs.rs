//! Finds the TLS libraries to attach to: every libssl that a process has mapped (through
//! `/proc/<pid>/root`, so containers' own copies count) plus those in the linker cache, so that
//! processes started later are covered too. Deduplicated by file identity: uprobes live on
//! the inode, not the path.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

/// A library file, identified by device and inode.
#[derive(Debug, Clone)]
pub struct LibFile {
    pub path: PathBuf,
    pub id: (u64, u64),
}

fn is_libssl(name: &str) -> bool {
    name.starts_with("libssl.so")
}

fn lib_file(path: PathBuf) -> Option<LibFile> {
    let m = fs::metadata(&path).ok()?;
    m.is_file().then(|| LibFile {
        id: (m.dev(), m.ino()),
        path,
    })
}

/// libssl files currently mapped by any process.
pub fn mapped_libssl() -> Vec<LibFile> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    let mut seen_paths = HashSet::new();
    for p in procs.flatten() {
        let pid = p.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(maps) = fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            let base = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            if !base.is_some_and(|b| is_libssl(&b)) {
                continue;
            }
            let full = p.path().join("root").join(path.trim_start_matches('/'));
            if seen_paths.insert((pid.clone(), path.to_string()))
                && let Some(f) = lib_file(full)
            {
                found.push(f);
            }
        }
    }
    found
}

/// libssl files known to the dynamic linker cache and the usual library directories.
pub fn installed_libssl() -> Vec<LibFile> {
    let mut paths = Vec::new();
    if let Ok(out) = Command::new("ldconfig").arg("-p").output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            if is_libssl(line)
                && let Some((_, p)) = line.split_once("=> ")
            {
                paths.push(PathBuf::from(p.trim()));
            }
        }
    }
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib/aarch64-linux-gnu",
    ] {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if is_libssl(&e.file_name().to_string_lossy()) {
                    paths.push(e.path());
                }
            }
        }
    }
    paths.into_iter().filter_map(lib_file).collect()
}

/// Everything to attach to, without duplicates of one file.
pub fn discover() -> Vec<LibFile> {
    dedup(installed_libssl().into_iter().chain(mapped_libssl()))
}

pub fn dedup(libs: impl IntoIterator<Item = LibFile>) -> Vec<LibFile> {
    let mut seen = HashSet::new();
    libs.into_iter().filter(|l| seen.insert(l.id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_system_libssl_once() {
        let libs = discover();
        assert!(
            !libs.is_empty(),
            "no libssl on this machine: install libssl3"
        );
        let ids: HashSet<_> = libs.iter().map(|l| l.id).collect();
        assert_eq!(ids.len(), libs.len(), "duplicates: {libs:?}");
    }
}
