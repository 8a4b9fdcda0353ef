//! The alerts file: JSON lines appended to `PATH`, rotated by size (`PATH` → `PATH.1` → ... →
//! `PATH.K`, the oldest dropped), created 0640, flushed per batch by the caller.
//!
//! Errors never reach the pipeline: they are counted and logged (rate-limited), and the writer
//! tries to reopen the file on the next batch. A line counts as written once the kernel took
//! all of it; the lines of a batch a failed write did not get to count as errors.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
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
    /// Lines (alerts) the kernel took whole.
    pub written: u64,
    /// Bytes in the current file.
    pub bytes: u64,
    pub rotations: u64,
    /// Lines lost to an I/O error (disk full, file removed under us, ...), whole or in part.
    pub errors: u64,
}

pub struct RotatingFile {
    path: PathBuf,
    /// 0: never rotate.
    max_bytes: u64,
    keep: usize,
    out: Option<File>,
    /// Lines since the last flush, each with its newline.
    pending: Vec<u8>,
    pending_lines: u64,
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
            out: Some(f),
            pending: Vec::new(),
            pending_lines: 0,
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

    /// Appends one line (`line` without its newline), buffered until [`flush`](Self::flush).
    /// Rotates first when the line would take the file past the limit (a file always holds
    /// at least one line, however long).
    pub fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64 + 1;
        let size = self.stats.bytes + self.pending.len() as u64;
        if self.max_bytes > 0
            && size > 0
            && size + len > self.max_bytes
            && let Err(e) = self.rotate()
        {
            self.warn("cannot rotate the alerts file", &e);
        }
        self.pending.extend_from_slice(line);
        self.pending.push(b'\n');
        self.pending_lines += 1;
        if self.pending.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Writes the buffered lines to the kernel (call once per batch); counts each as written
    /// or, past a failure, as an error.
    pub fn flush(&mut self) {
        if self.pending_lines == 0 {
            return;
        }
        if self.out.is_none() {
            self.reopen();
        }
        let buf = std::mem::take(&mut self.pending);
        let lines = std::mem::take(&mut self.pending_lines);
        let Some(out) = self.out.as_mut() else {
            // reopen() said why.
            self.stats.errors += lines;
            return;
        };
        let (sent, r) = write_counted(out, &buf);
        let whole = buf[..sent].iter().filter(|&&b| b == b'\n').count() as u64;
        self.stats.written += whole;
        self.stats.bytes += sent as u64;
        if let Err(e) = r {
            self.stats.errors += lines - whole;
            self.out = None;
            self.warn("cannot write the alerts file", &e);
        }
    }

    /// `PATH.K-1` → `PATH.K`, ..., `PATH` → `PATH.1`, then a fresh `PATH`.
    pub fn rotate(&mut self) -> io::Result<()> {
        // What is buffered belongs to the file being rotated.
        self.flush();
        self.out = None;
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
                self.out = Some(f);
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
        self.flush();
    }
}

/// Buffered lines past this are written without waiting for the batch's flush.
const FLUSH_AT: usize = 64 * 1024;

/// `write_all` that says how far it got: the bytes the kernel took, and the error that
/// stopped it, if any.
fn write_counted(out: &mut impl Write, buf: &[u8]) -> (usize, io::Result<()>) {
    let mut sent = 0;
    while sent < buf.len() {
        match out.write(&buf[sent..]) {
            Ok(0) => return (sent, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (sent, Err(e)),
        }
    }
    (sent, Ok(()))
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

    /// A disk that takes nothing: no line counts as written, each counts as an error.
    #[test]
    fn failed_writes_count_as_errors_not_written() {
        let mut f = RotatingFile::open("/dev/full", 0, 0).unwrap();
        for i in 0..3 {
            f.write_line(format!("alert-{i}").as_bytes());
        }
        f.flush();
        assert_eq!((f.stats().written, f.stats().errors), (0, 3));
        // The next batch tries again (reopening), and fails the same way.
        f.write_line(b"alert-3");
        f.flush();
        assert_eq!((f.stats().written, f.stats().errors), (0, 4));
    }

    /// A write the kernel takes in part: the lines it took whole are written, the rest errors.
    #[test]
    fn partial_write_counts_whole_lines_only() {
        struct Takes(usize, Vec<u8>);
        impl Write for Takes {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::ErrorKind::StorageFull.into());
                }
                let n = b.len().min(self.0).min(4);
                self.0 -= n;
                self.1.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut t = Takes(13, Vec::new());
        let (sent, r) = write_counted(&mut t, b"aaaa\nbbbb\ncccc\n");
        assert_eq!(sent, 13);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert_eq!(t.1, b"aaaa\nbbbb\nccc");
    }

    #[test]
    fn counted_written_only_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut f = RotatingFile::open(&p, 0, 3).unwrap();
        f.write_line(b"one");
        f.write_line(b"two");
        assert_eq!(f.stats().written, 0);
        f.flush();
        assert_eq!((f.stats().written, f.stats().bytes), (2, 8));
        assert_eq!(lines(&p), vec!["one", "two"]);
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
