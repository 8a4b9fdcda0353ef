//! The on-disk spool: batches ClickHouse could not take wait here, one file per batch, until
//! they are sent. A file is JSON lines: a header (`table`, `token`, `rows`) and one row per
//! line. It is written to a temporary name, fsync'd, renamed and the directory fsync'd, so
//! after a crash a batch is there whole or not at all. The header's deduplication token is
//! the one the batch was first sent with: a batch that reached the server before its answer
//! was lost is dropped there when sent again.
//!
//! The spool is bounded in bytes: to take a new batch it sheds the oldest ones (never the one
//! being sent), and says so. Files it cannot read are renamed `*.bad` and left for a human;
//! batches the server keeps rejecting are renamed `*.rejected`.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::rows::{AlertRow, BindingRow, FlowRow, ObservationRow};

/// The tables the writer fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Flows,
    CredentialObservations,
    Alerts,
    CredentialBindings,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Flows,
        Table::CredentialObservations,
        Table::Alerts,
        Table::CredentialBindings,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Flows => "flows",
            Table::CredentialObservations => "credential_observations",
            Table::Alerts => "alerts",
            Table::CredentialBindings => "credential_bindings",
        }
    }

    fn from_name(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// Rows of one table.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Flows(Vec<FlowRow>),
    Observations(Vec<ObservationRow>),
    Alerts(Vec<AlertRow>),
    Bindings(Vec<BindingRow>),
}

impl Rows {
    pub fn table(&self) -> Table {
        match self {
            Rows::Flows(_) => Table::Flows,
            Rows::Observations(_) => Table::CredentialObservations,
            Rows::Alerts(_) => Table::Alerts,
            Rows::Bindings(_) => Table::CredentialBindings,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Flows(v) => v.len(),
            Rows::Observations(v) => v.len(),
            Rows::Alerts(v) => v.len(),
            Rows::Bindings(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What is sent in one INSERT: rows of one table and the token that makes resending it
/// harmless.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub token: String,
    pub rows: Rows,
}

impl Batch {
    /// A batch with a fresh random token.
    pub fn new(rows: Rows) -> Batch {
        let mut b = [0u8; 16];
        if getrandom::fill(&mut b).is_err() {
            // Never reached on Linux; a clock-based token still differs between batches.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            b = t.to_le_bytes();
        }
        Batch {
            token: hex::encode(b),
            rows,
        }
    }

    pub fn table(&self) -> Table {
        self.rows.table()
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    v: u32,
    table: Table,
    token: String,
    rows: u64,
}

/// A batch file in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolEntry {
    pub seq: u64,
    pub table: Table,
    pub rows: u64,
    pub bytes: u64,
    pub path: PathBuf,
}

/// What a push cost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shed {
    pub batches: u64,
    pub rows: u64,
}

/// What became of a pushed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The batch is on disk; false when it alone is larger than the spool's bound (then it
    /// is counted in `shed`).
    pub stored: bool,
    pub shed: Shed,
}

impl Pushed {
    fn stored(shed: Shed) -> Pushed {
        Pushed { stored: true, shed }
    }
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<SpoolEntry>,
    bytes: u64,
    rows: u64,
    next_seq: u64,
    /// The batch being sent: not shed under the sender's feet.
    in_flight: Option<u64>,
}

fn write_rows<T: Serialize>(out: &mut Vec<u8>, rows: &[T]) -> Result<()> {
    for r in rows {
        serde_json::to_writer(&mut *out, r)?;
        out.push(b'\n');
    }
    Ok(())
}

fn read_rows<T: DeserializeOwned>(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    n: u64,
) -> Result<Vec<T>> {
    let mut v = Vec::with_capacity(n as usize);
    for i in 0..n {
        let line = lines
            .next()
            .with_context(|| format!("{n} rows announced, {i} found"))??;
        v.push(serde_json::from_str(&line).with_context(|| format!("row {i}"))?);
    }
    Ok(v)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl Spool {
    /// Opens (creating, mode 0700) the spool directory and takes stock of the batches left in
    /// it by an earlier run.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create spool directory {}", dir.display()))?;
        let mut entries = Vec::new();
        for e in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // An interrupted write: the batch was never in the spool.
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Some(stem) = name.strip_suffix(".jsonl") else {
                continue;
            };
            let mut parts = stem.split('.');
            let (Some(seq), Some(table), Some(rows), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(seq), Some(table), Ok(rows)) =
                (seq.parse(), Table::from_name(table), rows.parse())
            else {
                continue;
            };
            entries.push(SpoolEntry {
                seq,
                table,
                rows,
                bytes: e.metadata()?.len(),
                path: e.path(),
            });
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map_or(0, |e| e.seq + 1);
        let s = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            bytes: entries.iter().map(|e| e.bytes).sum(),
            rows: entries.iter().map(|e| e.rows).sum(),
            entries: entries.into(),
            next_seq,
            in_flight: None,
        };
        if !s.entries.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                batches = s.entries.len(),
                rows = s.rows,
                bytes = s.bytes,
                "spool holds batches from an earlier run: they will be sent"
            );
        }
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (batches, rows, bytes) waiting.
    pub fn depth(&self) -> (u64, u64, u64) {
        (self.entries.len() as u64, self.rows, self.bytes)
    }

    pub fn oldest(&self) -> Option<&SpoolEntry> {
        self.entries.front()
    }

    /// Marks the batch the sender is working on (so that it is not shed), or none.
    pub fn set_in_flight(&mut self, seq: Option<u64>) {
        self.in_flight = seq;
    }

    fn encode(batch: &Batch) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        serde_json::to_writer(
            &mut out,
            &Header {
                v: 1,
                table: batch.table(),
                token: batch.token.clone(),
                rows: batch.rows.len() as u64,
            },
        )?;
        out.push(b'\n');
        match &batch.rows {
            Rows::Flows(v) => write_rows(&mut out, v)?,
            Rows::Observations(v) => write_rows(&mut out, v)?,
            Rows::Alerts(v) => write_rows(&mut out, v)?,
            Rows::Bindings(v) => write_rows(&mut out, v)?,
        }
        Ok(out)
    }

    /// Writes a batch durably, shedding the oldest batches if the spool would outgrow its
    /// bound (or the new one, if it alone is larger than the bound).
    pub fn push(&mut self, batch: &Batch) -> Result<Pushed> {
        let data = Self::encode(batch)?;
        let len = data.len() as u64;
        let mut shed = Shed::default();
        if len > self.max_bytes {
            shed.batches += 1;
            shed.rows += batch.rows.len() as u64;
            tracing::warn!(
                rows = batch.rows.len(),
                bytes = len,
                max_bytes = self.max_bytes,
                table = batch.table().name(),
                "spool: batch larger than the whole spool, shed"
            );
            return Ok(Pushed {
                stored: false,
                shed,
            });
        }
        while self.bytes + len > self.max_bytes {
            let Some(pos) = self
                .entries
                .iter()
                .position(|e| Some(e.seq) != self.in_flight)
            else {
                break;
            };
            let e = self.entries.remove(pos).expect("position is valid");
            self.bytes -= e.bytes;
            self.rows -= e.rows;
            if let Err(err) = fs::remove_file(&e.path) {
                tracing::error!(path = %e.path.display(), "spool: cannot remove shed batch: {err}");
            }
            shed.batches += 1;
            shed.rows += e.rows;
        }
        if shed.batches > 0 {
            tracing::warn!(
                batches = shed.batches,
                rows = shed.rows,
                max_bytes = self.max_bytes,
                "spool full: oldest batches shed"
            );
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = format!(
            "{seq:016}.{}.{}.jsonl",
            batch.table().name(),
            batch.rows.len()
        );
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let r = (|| -> Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(e.context(format!("cannot write spool file {}", path.display())));
        }
        self.bytes += len;
        self.rows += batch.rows.len() as u64;
        self.entries.push_back(SpoolEntry {
            seq,
            table: batch.table(),
            rows: batch.rows.len() as u64,
            bytes: len,
            path,
        });
        Ok(Pushed::stored(shed))
    }

    /// Reads a spooled batch back.
    pub fn load(&self, e: &SpoolEntry) -> Result<Batch> {
        let f =
            fs::File::open(&e.path).with_context(|| format!("cannot open {}", e.path.display()))?;
        let mut lines = BufReader::new(f).lines();
        let head: Header = serde_json::from_str(&lines.next().context("empty spool file")??)
            .context("spool file header")?;
        if head.v != 1 || head.table != e.table || head.rows != e.rows {
            bail!("spool file header does not match its name");
        }
        let rows = match head.table {
            Table::Flows => Rows::Flows(read_rows(&mut lines, head.rows)?),
            Table::CredentialObservations => Rows::Observations(read_rows(&mut lines, head.rows)?),
            Table::Alerts => Rows::Alerts(read_rows(&mut lines, head.rows)?),
            Table::CredentialBindings => Rows::Bindings(read_rows(&mut lines, head.rows)?),
        };
        Ok(Batch {
            token: head.token,
            rows,
        })
    }

    fn take(&mut self, seq: u64) -> Option<SpoolEntry> {
        let pos = self.entries.iter().position(|e| e.seq == seq)?;
        let e = self.entries.remove(pos)?;
        self.bytes -= e.bytes;
        self.rows -= e.rows;
        if self.in_flight == Some(seq) {
            self.in_flight = None;
        }
        Some(e)
    }

    /// Forgets a batch that reached the server.
    pub fn remove(&mut self, seq: u64) -> Result<()> {
        if let Some(e) = self.take(seq) {
            fs::remove_file(&e.path)
                .with_context(|| format!("cannot remove {}", e.path.display()))?;
        }
        Ok(())
    }

    /// Sets a batch aside under a new suffix (`bad`: unreadable; `rejected`: refused by the
    /// server again and again): kept on disk for a human, out of the bound and the queue.
    pub fn set_aside(&mut self, seq: u64, suffix: &str) -> Result<Option<PathBuf>> {
        let Some(e) = self.take(seq) else {
            return Ok(None);
        };
        let to = e.path.with_extension(format!("jsonl.{suffix}"));
        fs::rename(&e.path, &to).with_context(|| format!("cannot rename {}", e.path.display()))?;
        Ok(Some(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bindings(n: usize, tag: &str) -> Batch {
        Batch::new(Rows::Bindings(
            (0..n)
                .map(|i| BindingRow {
                    fingerprint: format!("{tag}-{i}"),
                    workload: "w".into(),
                    node: "n".into(),
                    first_seen: i as i64,
                })
                .collect(),
        ))
    }

    #[test]
    fn round_trip_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = bindings(3, "a");
        let b = bindings(2, "b");
        assert_eq!(s.push(&a).unwrap(), Pushed::stored(Shed::default()));
        assert_eq!(s.push(&b).unwrap(), Pushed::stored(Shed::default()));
        assert_eq!(s.depth().0, 2);
        assert_eq!(s.depth().1, 5);
        drop(s);
        // A torn write from a crash is ignored.
        fs::write(d.path().join("0000000000000009.flows.1.jsonl.tmp"), "{").unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.depth().0, 2);
        let e = s.oldest().unwrap().clone();
        assert_eq!(s.load(&e).unwrap(), a);
        s.remove(e.seq).unwrap();
        let e = s.oldest().unwrap().clone();
        assert_eq!(s.load(&e).unwrap(), b);
        s.remove(e.seq).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.depth(), (0, 0, 0));
        // New batches come after the old ones even after a reopen.
        s.push(&a).unwrap();
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.oldest().unwrap().seq, 2);
    }

    #[test]
    fn sheds_oldest_but_not_in_flight() {
        let d = tempfile::tempdir().unwrap();
        let one = Spool::encode(&bindings(10, "x")).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 3).unwrap();
        for t in ["a", "b", "c"] {
            assert_eq!(
                s.push(&bindings(10, t)).unwrap(),
                Pushed::stored(Shed::default())
            );
        }
        let first = s.oldest().unwrap().seq;
        s.set_in_flight(Some(first));
        let p = s.push(&bindings(10, "d")).unwrap();
        assert_eq!(
            p,
            Pushed::stored(Shed {
                batches: 1,
                rows: 10
            })
        );
        // The in-flight one (a) stays, b went.
        let left: Vec<_> = s.entries.iter().map(|e| s.load(e).unwrap()).collect();
        let tags: Vec<_> = left
            .iter()
            .map(|b| match &b.rows {
                Rows::Bindings(v) => v[0].fingerprint.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(tags, ["a-0", "c-0", "d-0"]);
        // Larger than the whole spool: the new batch itself is shed.
        let p = s.push(&bindings(100, "big")).unwrap();
        assert_eq!(
            p,
            Pushed {
                stored: false,
                shed: Shed {
                    batches: 1,
                    rows: 100
                }
            }
        );
        assert_eq!(s.depth().0, 3);
    }

    #[test]
    fn unreadable_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        s.push(&bindings(2, "a")).unwrap();
        let e = s.oldest().unwrap().clone();
        fs::write(
            &e.path,
            "{\"v\":1,\"table\":\"credential_bindings\",\"token\":\"t\",\"rows\":2}\n{}\n",
        )
        .unwrap();
        assert!(s.load(&e).is_err());
        let to = s.set_aside(e.seq, "bad").unwrap().unwrap();
        assert!(to.to_string_lossy().ends_with(".jsonl.bad"));
        assert!(to.exists());
        assert!(s.is_empty());
        // Not taken back at the next start.
        assert!(Spool::open(d.path(), 1 << 20).unwrap().is_empty());
    }
}
