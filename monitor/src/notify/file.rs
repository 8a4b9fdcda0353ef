//! The alerts file: JSON lines appended to `PATH`, rotated by size (`PATH` → `PATH.1` → ... →
//! `PATH.K`, the oldest dropped), created 0640, flushed per batch by the caller.
//!
//! Errors never reach the pipeline: they are counted and logged (rate-limited), and the writer
//! tries to reopen the file on the next batch.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tracing::warn;

/// Mode of a newly created alerts file: owner read/write, group read.
pub const FILE_MODE: u32 = 0o640;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Lines (alerts) written.
    pub written: u64,
    /// Bytes in the current file.
    pub bytes: u64,
    pub rotations: u64,
    /// Lines lost to an I/O error (disk full, file removed under us, ...).
    pub errors: u64,
}

pub struct RotatingFile {
    path: PathBuf,
    /// 0: never rotate.
    max_bytes: u64,
    keep: usize,
    out: Option<BufWriter<File>>,
    stats: FileStats,
    last_warn: Option<Instant>,
}

impl RotatingFile {
    /// Opens (appending) or creates `path`. `max_bytes` 0 disables rotation; `keep` 0 means a
    /// full file is truncated rather than kept.
    pub fn open(path: impl Into<PathBuf>, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let path = path.into();
        let (f, size) = open_append(&path)?;
        Ok(RotatingFile {
            path,
            max_bytes,
            keep,
            out: Some(BufWriter::new(f)),
            stats: FileStats {
                bytes: size,
                ..Default::default()
            },
            last_warn: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name of the `n`th rotated file (`PATH.n`).
    pub fn rotated_path(&self, n: usize) -> PathBuf {
        rotated(&self.path, n)
    }

    /// Appends one line (`line` without its newline). Rotates first when the line would take
    /// the file past the limit (a file always holds at least one line, however long).
    pub fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64 + 1;
        if self.max_bytes > 0
            && self.stats.bytes > 0
            && self.stats.bytes + len > self.max_bytes
            && let Err(e) = self.rotate()
        {
            self.warn("cannot rotate the alerts file", &e);
        }
        if self.out.is_none() {
            self.reopen();
        }
        let Some(out) = self.out.as_mut() else {
            self.stats.errors += 1;
            return;
        };
        match out.write_all(line).and_then(|()| out.write_all(b"\n")) {
            Ok(()) => {
                self.stats.written += 1;
                self.stats.bytes += len;
            }
            Err(e) => {
                self.stats.errors += 1;
                self.out = None;
                self.warn("cannot write the alerts file", &e);
            }
        }
    }

    /// Flushes buffered lines to the kernel (call once per batch).
    pub fn flush(&mut self) {
        if let Some(out) = self.out.as_mut()
            && let Err(e) = out.flush()
        {
            self.stats.errors += 1;
            self.out = None;
            self.warn("cannot flush the alerts file", &e);
        }
    }

    /// `PATH.K-1` → `PATH.K`, ..., `PATH` → `PATH.1`, then a fresh `PATH`.
    pub fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        if self.keep == 0 {
            match fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else {
            // The oldest goes; rename() replaces it anyway, removing is for clarity on
            // filesystems where it would not.
            let _ = fs::remove_file(rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            match fs::rename(&self.path, rotated(&self.path, 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.stats.rotations += 1;
        self.reopen();
        Ok(())
    }

    pub fn stats(&self) -> &FileStats {
        &self.stats
    }

    pub fn stats_json(&self) -> Value {
        json!({
            "path": self.path.display().to_string(),
            "written": self.stats.written,
            "bytes": self.stats.bytes,
            "rotations": self.stats.rotations,
            "errors": self.stats.errors,
            "max_bytes": self.max_bytes,
            "keep": self.keep,
        })
    }

    fn reopen(&mut self) {
        match open_append(&self.path) {
            Ok((f, size)) => {
                self.out = Some(BufWriter::new(f));
                self.stats.bytes = size;
            }
            Err(e) => self.warn("cannot open the alerts file", &e),
        }
    }

    fn warn(&mut self, what: &str, e: &io::Error) {
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_warn = Some(now);
            warn!(path = %self.path.display(), error = %e, errors = self.stats.errors, "{what}");
        }
    }
}

impl Drop for RotatingFile {
    fn drop(&mut self) {
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    let size = f.metadata()?.len();
    Ok((f, size))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn lines(p: &Path) -> Vec<String> {
        fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotates_and_keeps_k() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("alerts.jsonl");
        // Each line is 10 bytes with its newline; 35 bytes hold 3 lines.
        let mut f = RotatingFile::open(&p, 35, 2).unwrap();
        for i in 0..10 {
            f.write_line(format!("line-{i:04}").as_bytes());
        }
        f.flush();
        // 10 lines, 3 per file: [0,1,2] [3,4,5] [6,7,8] [9]; keep 2 → .2=[3..5], .1=[6..8].
        assert_eq!(lines(&p), vec!["line-0009"]);
        assert_eq!(
            lines(&f.rotated_path(1)),
            vec!["line-0006", "line-0007", "line-0008"]
        );
        assert_eq!(
            lines(&f.rotated_path(2)),
            vec!["line-0003", "line-0004", "line-0005"]
        );
        assert!(!f.rotated_path(3).exists());
        assert_eq!(f.stats().rotations, 3);
        assert_eq!(f.stats().written, 10);
        assert_eq!(f.stats().errors, 0);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !FILE_MODE, 0, "mode {mode:o}");
    }

    #[test]
    fn appends_to_existing_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        fs::write(&p, "old-line1\nold-line2\n").unwrap();
        let mut f = RotatingFile::open(&p, 25, 3).unwrap();
        f.write_line(b"new-line1"); // 20 + 10 > 25 → rotate first
        f.flush();
        assert_eq!(lines(&f.rotated_path(1)), vec!["old-line1", "old-line2"]);
        assert_eq!(lines(&p), vec!["new-line1"]);
    }

    #[test]
    fn keep_zero_truncates_and_oversized_lines_fit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut f = RotatingFile::open(&p, 8, 0).unwrap();
        f.write_line(b"a-very-long-line");
        f.write_line(b"another-long-line");
        f.flush();
        assert_eq!(lines(&p), vec!["another-long-line"]);
        assert!(!f.rotated_path(1).exists());
    }

    #[test]
    fn unlimited_never_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut f = RotatingFile::open(&p, 0, 3).unwrap();
        for _ in 0..100 {
            f.write_line(b"xxxxxxxxxxxxxxxxxxxx");
        }
        f.flush();
        assert_eq!(lines(&p).len(), 100);
        assert_eq!(f.stats().rotations, 0);
    }
}
