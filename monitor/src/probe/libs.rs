//! The TLS libraries installed on the host (linker cache and the usual directories), attached
//! at start and kept attached, so that a process loading one later is covered from its first
//! call. Everything else (containers' copies, static builds, Go programs) is found as it is
//! executed or mapped (`attacher`). Deduplicated by file identity: uprobes live on the inode.

use std::{collections::HashSet, fs, os::unix::fs::MetadataExt, path::PathBuf, process::Command};

/// A library file, identified by device and inode.
#[derive(Debug, Clone)]
pub struct LibFile {
    pub path: PathBuf,
    pub id: (u64, u64),
}

fn is_tls_library(name: &str) -> bool {
    name.starts_with("libssl.so") || name.starts_with("libgnutls.so")
}

fn lib_file(path: PathBuf) -> Option<LibFile> {
    let m = fs::metadata(&path).ok()?;
    m.is_file().then(|| LibFile {
        id: (m.dev(), m.ino()),
        path,
    })
}

/// TLS library files known to the dynamic linker cache and the usual library directories.
pub fn installed_tls_libraries() -> Vec<LibFile> {
    let mut paths = Vec::new();
    if let Ok(out) = Command::new("ldconfig").arg("-p").output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            if is_tls_library(line)
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
                if is_tls_library(&e.file_name().to_string_lossy()) {
                    paths.push(e.path());
                }
            }
        }
    }
    dedup(paths.into_iter().filter_map(lib_file))
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
        let libs = installed_tls_libraries();
        assert!(
            libs.iter()
                .any(|l| l.path.to_string_lossy().contains("libssl.so")),
            "no libssl on this machine: install libssl3"
        );
        let ids: HashSet<_> = libs.iter().map(|l| l.id).collect();
        assert_eq!(ids.len(), libs.len(), "duplicates: {libs:?}");
    }
}
