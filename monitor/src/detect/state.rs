//! What the detector remembers about each credential, bounded: a least-recently-used map of
//! fingerprints (evictions counted), and the open alerts, bounded and ordered by the time
//! their window opened; saved to disk and restored so a restart neither forgets bindings nor
//! alerts again on what it already reported. A state file that cannot be parsed is moved
//! aside and the daemon starts empty; entries that fail validation are dropped and counted.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    io::Write,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use lru::LruCache;
use serde::{
    Deserialize, Serialize,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::value::RawValue;
use tracing::warn;

/// Distinct recent users kept per credential.
pub const MAX_USERS: usize = 16;

/// Open alerts kept by default (`detections.max_open_alerts`); past it the oldest window is
/// closed early (its final count reported) and counted in `open_alerts_evicted`.
pub const DEFAULT_MAX_OPEN_ALERTS: usize = 20_000;

/// A fingerprint as the fingerprinter writes it: 32 hex digits (16 bytes of HMAC).
pub fn valid_fingerprint(fp: &str) -> bool {
    fp.len() == 32 && fp.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state file {path} is not a regular file")]
    NotRegular { path: PathBuf },
}

/// A workload, node or kind name: one allocation shared by every binding that holds it.
pub type Name = Arc<str>;

/// The names in use, so that a million bindings of a few workloads do not hold a million
/// copies of their names. Bounded: when full it starts over (names already handed out stay
/// valid, later ones are allocated again).
#[derive(Default)]
pub struct Names {
    set: HashSet<Name>,
}

const MAX_NAMES: usize = 65_536;

impl Names {
    pub fn get(&mut self, s: &str) -> Name {
        if let Some(n) = self.set.get(s) {
            return n.clone();
        }
        if self.set.len() >= MAX_NAMES {
            self.set.clear();
        }
        let n: Name = s.into();
        self.set.insert(n.clone());
        n
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CredState {
    /// The workload the credential was first seen with: its owner, unless the rules say.
    pub first_workload: Name,
    pub first_node: Name,
    pub first_seen_ns: u64,
    /// Recent users: (workload, node, last use).
    pub users: Vec<(Name, Name, u64)>,
    /// Distinct workloads ever seen (bounded by MAX_USERS for memory; the count keeps going).
    pub distinct_workloads: usize,
    /// Kind of the credential (`bearer`, `basic`, ...), for naming learnt bindings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Name>,
}

impl CredState {
    pub fn touch(&mut self, workload: &Name, node: &Name, now_ns: u64) {
        if let Some(u) = self
            .users
            .iter_mut()
            .find(|u| u.0 == *workload && u.1 == *node)
        {
            u.2 = u.2.max(now_ns);
            return;
        }
        if !self.users.iter().any(|u| u.0 == *workload) {
            self.distinct_workloads += 1;
        }
        if self.users.len() >= MAX_USERS {
            // Forget the least recent user.
            if let Some(i) = self
                .users
                .iter()
                .enumerate()
                .min_by_key(|(_, u)| u.2)
                .map(|(i, _)| i)
            {
                self.users.swap_remove(i);
            }
        }
        // Most credentials have one user: no room reserved for more.
        self.users.reserve_exact(1);
        self.users.push((workload.clone(), node.clone(), now_ns));
    }
}

/// One open alert: repeats within the window fold into `count`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Open {
    /// The alert as first raised, kept as its JSON: a parsed `Alert` is several KiB of small
    /// allocations, its JSON under 1 KiB. Holds fingerprints, never a secret.
    alert: Box<RawValue>,
    /// Occurrences within the window (0 in files from before it was kept here: the alert's
    /// own count is used).
    #[serde(default)]
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Count already reported.
    pub reported: u64,
}

impl Open {
    pub fn new(alert: &crate::alert::Alert, first_ns: u64) -> serde_json::Result<Self> {
        Ok(Open {
            alert: serde_json::value::to_raw_value(alert)?,
            count: alert.count,
            first_ns,
            last_ns: first_ns,
            reported: alert.count,
        })
    }

    /// The alert with the count reached, to be sent again.
    pub fn alert(&self) -> Option<crate::alert::Alert> {
        let mut a: crate::alert::Alert = serde_json::from_str(self.alert.get()).ok()?;
        a.count = self.count;
        Some(a)
    }

    /// The alert again if it repeated since it was last reported.
    pub fn unreported(&self) -> Option<crate::alert::Alert> {
        (self.count > self.reported).then(|| self.alert()).flatten()
    }
}

/// The open alerts, bounded, with their windows in time order: closing the windows that have
/// passed pops from the front instead of scanning every open alert.
pub struct OpenAlerts {
    map: HashMap<String, Open>,
    /// (first_ns, key) of every entry of `map`.
    by_time: BTreeSet<(u64, String)>,
    cap: usize,
    /// Alerts whose window was closed early to make room.
    pub evicted: u64,
}

impl OpenAlerts {
    pub fn new(cap: usize) -> Self {
        OpenAlerts {
            map: HashMap::new(),
            by_time: BTreeSet::new(),
            cap: cap.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Open> {
        self.map.get_mut(key)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Open> {
        self.map.values_mut()
    }

    /// Oldest window first (saved in this order, so a smaller bound at load keeps the latest).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Open)> {
        self.by_time
            .iter()
            .filter_map(|(_, k)| self.map.get_key_value(k))
    }

    fn remove(&mut self, key: &str) -> Option<Open> {
        let o = self.map.remove(key)?;
        self.by_time.remove(&(o.first_ns, key.to_string()));
        Some(o)
    }

    fn pop_oldest(&mut self) -> Option<Open> {
        let (_, key) = self.by_time.pop_first()?;
        self.map.remove(&key)
    }

    /// Opens `key`; returns what it displaced (an entry of the same key, or the oldest one
    /// when full), so that a count not yet reported can still be.
    pub fn insert(&mut self, key: String, open: Open) -> Vec<Open> {
        let mut out: Vec<Open> = self.remove(&key).into_iter().collect();
        while self.map.len() >= self.cap {
            match self.pop_oldest() {
                Some(o) => {
                    self.evicted += 1;
                    out.push(o);
                }
                None => break,
            }
        }
        self.by_time.insert((open.first_ns, key.clone()));
        self.map.insert(key, open);
        out
    }

    /// New capacity (rules reloaded); the oldest go first if it shrank.
    pub fn set_capacity(&mut self, cap: usize) -> Vec<Open> {
        self.cap = cap.max(1);
        let mut out = Vec::new();
        while self.map.len() > self.cap {
            match self.pop_oldest() {
                Some(o) => {
                    self.evicted += 1;
                    out.push(o);
                }
                None => break,
            }
        }
        out
    }

    /// Removes the alerts whose window (opened at `first_ns`) has passed at `now_ns`.
    pub fn expire(&mut self, now_ns: u64, window_ns: u64) -> Vec<Open> {
        let mut out = Vec::new();
        while let Some((first, _)) = self.by_time.first() {
            if now_ns.saturating_sub(*first) < window_ns {
                break;
            }
            if let Some(o) = self.pop_oldest() {
                out.push(o);
            }
        }
        out
    }
}

pub struct State {
    pub creds: LruCache<String, CredState>,
    pub open: OpenAlerts,
    pub evicted: u64,
    /// Entries of the state file that failed validation and were dropped at load.
    pub dropped_on_load: u64,
    pub names: Names,
}

/// What `save` writes (and `Loader` reads), borrowed, so saving does not copy the state.
#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    creds: Vec<(&'a String, &'a CredState)>,
    open: Vec<(&'a String, &'a Open)>,
}

impl State {
    pub fn new(capacity: usize) -> Self {
        State {
            creds: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            open: OpenAlerts::new(DEFAULT_MAX_OPEN_ALERTS),
            evicted: 0,
            dropped_on_load: 0,
            names: Names::default(),
        }
    }

    /// Inserts or updates; counts the entry the cache had to drop.
    pub fn put(&mut self, fp: String, st: CredState) {
        if let Some((old, _)) = self.creds.push(fp.clone(), st)
            && old != fp
        {
            self.evicted += 1;
        }
    }

    /// Writes the state atomically (temp file + rename), mode 0600: fingerprints only.
    pub fn save(&self, path: &Path) -> Result<()> {
        let saved = SavedRef {
            version: 1,
            // Least recent first, so a restore rebuilds the same LRU order.
            creds: self.creds.iter().rev().collect(),
            open: self.open.iter().collect(),
        };
        write_private_with(path, |w| {
            serde_json::to_writer(w, &saved).map_err(std::io::Error::other)
        })
        .with_context(|| format!("saving state to {}", path.display()))
    }

    /// Restores a saved state, with at most `DEFAULT_MAX_OPEN_ALERTS` open alerts.
    pub fn load(path: &Path, capacity: usize) -> Result<Self, StateError> {
        Self::load_bounded(path, capacity, DEFAULT_MAX_OPEN_ALERTS)
    }

    /// Restores a saved state, entry by entry into the bounded maps (the most recent
    /// `capacity` bindings, `open_capacity` open alerts), so that a huge file costs no more
    /// memory than a full state. A file that is not a state file (truncated, tampered,
    /// another format or version) is moved aside to `<path>.corrupt-<unix seconds>` with one
    /// warning and the state starts empty; entries that fail validation are dropped and
    /// counted.
    pub fn load_bounded(
        path: &Path,
        capacity: usize,
        open_capacity: usize,
    ) -> Result<Self, StateError> {
        let fresh = || {
            let mut st = State::new(capacity);
            st.open.cap = open_capacity.max(1);
            st
        };
        let mut st = fresh();
        let read_err = |source| StateError::Read {
            path: path.to_path_buf(),
            source,
        };
        let f = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(st),
            Err(e) => return Err(read_err(e)),
        };
        // A FIFO or a device would block or never end.
        if !f.metadata().map_err(read_err)?.is_file() {
            return Err(StateError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(f));
        let loaded = Loader(&mut st).deserialize(&mut de).and_then(|()| de.end());
        if let Err(e) = loaded {
            let aside = set_aside(path);
            // serde_json's error names a position, never the content.
            warn!(
                path = %path.display(),
                moved_to = %aside.as_deref().map_or_else(|| "-".into(), |p| p.display().to_string()),
                error = %e,
                "the state file is not a state file: moved aside, starting with empty state"
            );
            return Ok(fresh());
        }
        if st.dropped_on_load > 0 {
            warn!(
                path = %path.display(),
                dropped = st.dropped_on_load,
                "state file entries with an invalid fingerprint dropped"
            );
        }
        Ok(st)
    }

    fn restore_cred(&mut self, k: String, mut v: CredState) {
        if !valid_fingerprint(&k) {
            self.dropped_on_load += 1;
            return;
        }
        v.users.truncate(MAX_USERS);
        // Decoded names are copies of their own: share them again.
        let n = &mut self.names;
        v.first_workload = n.get(&v.first_workload);
        v.first_node = n.get(&v.first_node);
        v.kind = v.kind.map(|k| n.get(&k));
        for u in &mut v.users {
            *u = (n.get(&u.0), n.get(&u.1), u.2);
        }
        self.put(k, v);
    }

    fn restore_open(&mut self, k: String, mut o: Open) {
        let Some(a) = serde_json::from_str::<crate::alert::Alert>(o.alert.get())
            .ok()
            .filter(|a| {
                let fp = &a.credential.fingerprint;
                fp.is_empty() || valid_fingerprint(fp)
            })
        else {
            self.dropped_on_load += 1;
            return;
        };
        if o.count == 0 {
            o.count = a.count;
        }
        self.open.insert(k, o);
    }
}

/// Decodes a state file (`{"version": 1, "creds": [...], "open": [...]}`) straight into a
/// `State`.
struct Loader<'a>(&'a mut State);

impl<'de> DeserializeSeed<'de> for Loader<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Loader<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a monitor state file")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let mut version = false;
        while let Some(k) = m.next_key::<String>()? {
            match k.as_str() {
                "version" => match m.next_value::<u32>()? {
                    1 => version = true,
                    v => return Err(de::Error::custom(format!("unknown version {v}"))),
                },
                "creds" => m.next_value_seed(Entries(&mut *self.0, State::restore_cred))?,
                "open" => m.next_value_seed(Entries(&mut *self.0, State::restore_open))?,
                _ => {
                    m.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        if version {
            Ok(())
        } else {
            Err(de::Error::missing_field("version"))
        }
    }
}

/// A list of `(key, value)` entries, each handed to `restore` as soon as it is decoded.
struct Entries<'a, T>(&'a mut State, fn(&mut State, String, T));

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Entries<'_, T> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Entries<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of [key, value] entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some((k, v)) = seq.next_element::<(String, T)>()? {
            (self.1)(&mut *self.0, k, v);
        }
        Ok(())
    }
}

/// Moves a file that could not be used out of the way, keeping it for inspection.
fn set_aside(path: &Path) -> Option<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{secs}"));
    let aside = PathBuf::from(name);
    fs::rename(path, &aside).ok().map(|()| aside)
}

/// Writes `bytes` to `path` atomically (temp file + rename), mode 0600, creating its
/// directory: for files that hold fingerprints or policy (state, learnt rules).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private_with(path, |w| w.write_all(bytes))
}

/// `write_private` with the content written by `fill`, through a buffer.
pub fn write_private_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    // A left-over temp file (or a link planted there) is not reused with its own mode.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut w = std::io::BufWriter::new(&f);
    fill(&mut w)?;
    w.flush()?;
    drop(w);
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef";

    fn open_at(first_ns: u64) -> Open {
        open_with(first_ns, "")
    }

    fn open_with(first_ns: u64, fp: &str) -> Open {
        Open::new(
            &crate::alert::Alert {
                schema: String::new(),
                time: String::new(),
                id: String::new(),
                rule: "cleartext-credential".into(),
                severity: crate::alert::Severity::Medium,
                summary: String::new(),
                credential: crate::alert::AlertCredential {
                    fingerprint: fp.into(),
                    ..Default::default()
                },
                source: Default::default(),
                destination: Default::default(),
                expected: serde_json::Value::Null,
                first_seen: None,
                first_seen_by: None,
                owner: None,
                references: Vec::new(),
                count: 1,
            },
            first_ns,
        )
        .unwrap()
    }

    #[test]
    fn open_alerts_are_bounded_and_expire_in_time_order() {
        let mut o = OpenAlerts::new(3);
        for (i, t) in [30, 10, 20].into_iter().enumerate() {
            assert!(o.insert(format!("k{i}"), open_at(t)).is_empty());
        }
        // Full: the oldest window (10) makes room, counted.
        let out = o.insert("k3".into(), open_at(40));
        assert_eq!(out.iter().map(|o| o.first_ns).collect::<Vec<_>>(), [10]);
        assert_eq!((o.len(), o.evicted), (3, 1));
        // Re-opening a key replaces it without growing.
        let out = o.insert("k3".into(), open_at(45));
        assert_eq!(out.len(), 1);
        assert_eq!(o.len(), 3);
        // Windows of 15 at 40: 20 and 30 have passed, 45 has not.
        let done = o.expire(40, 15);
        assert_eq!(done.iter().map(|o| o.first_ns).collect::<Vec<_>>(), [20]);
        let done = o.expire(45, 15);
        assert_eq!(done.iter().map(|o| o.first_ns).collect::<Vec<_>>(), [30]);
        assert_eq!(o.len(), 1);
        assert_eq!(o.set_capacity(0).len(), 0, "capacity is at least one");
        assert_eq!(o.by_time.len(), o.map.len());
    }

    #[test]
    fn a_corrupt_state_file_is_moved_aside_and_state_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, b"{\"version\":1,\"creds\":[[\"").unwrap();
        let st = State::load(&p, 10).unwrap();
        assert_eq!(st.creds.len(), 0);
        assert!(!p.exists());
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(aside[0].starts_with("state.json.corrupt-"), "{aside:?}");
        // Not a regular file: a clear error, nothing moved.
        let e = State::load(Path::new("/dev/null"), 10).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn tampered_entries_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut s = State::new(10);
        s.put(FP.into(), cs("a"));
        s.put("éééééééééééééééé".into(), cs("b"));
        s.put("zz".into(), cs("c"));
        s.open.insert("bad".into(), open_with(1, "not hex"));
        s.open.insert("ok".into(), open_at(2));
        s.save(&p).unwrap();
        let back = State::load(&p, 10).unwrap();
        assert_eq!(back.dropped_on_load, 3);
        assert_eq!(back.creds.len(), 1);
        assert_eq!(back.open.len(), 1);
    }

    #[test]
    fn loading_applies_the_bounds_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut s = State::new(100);
        for i in 0..100u64 {
            s.put(format!("{i:032x}"), cs("a"));
            s.open.insert(format!("k{i}"), open_at(i));
        }
        s.save(&p).unwrap();
        let back = State::load_bounded(&p, 10, 5).unwrap();
        // The most recent bindings and the latest windows are the ones kept.
        assert_eq!(back.creds.len(), 10);
        assert!(back.creds.peek(&format!("{:032x}", 99)).is_some());
        assert!(back.creds.peek(&format!("{:032x}", 89)).is_none());
        assert_eq!(back.open.len(), 5);
        assert_eq!(back.open.by_time.first().unwrap().0, 95);
        // Another version is not this state file: moved aside.
        fs::write(&p, br#"{"version":2,"creds":[],"open":[]}"#).unwrap();
        assert_eq!(State::load(&p, 10).unwrap().creds.len(), 0);
        assert!(!p.exists());
    }

    fn cs(w: &str) -> CredState {
        CredState {
            first_workload: w.into(),
            first_node: "n".into(),
            first_seen_ns: 1,
            users: vec![],
            distinct_workloads: 1,
            kind: None,
        }
    }

    #[test]
    fn bounded_with_counted_evictions() {
        let mut s = State::new(2);
        s.put("a".into(), cs("x"));
        s.put("b".into(), cs("x"));
        s.put("a".into(), cs("y"));
        assert_eq!(s.evicted, 0);
        s.put("c".into(), cs("x"));
        assert_eq!(s.evicted, 1);
        assert!(
            s.creds.peek("b").is_none(),
            "least recently used goes first"
        );
    }

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut s = State::new(10);
        let mut c = cs("payments");
        c.touch(&"payments".into(), &"n".into(), 5);
        s.put(FP.into(), c.clone());
        s.save(&p).unwrap();
        let back = State::load(&p, 10).unwrap();
        assert_eq!(back.creds.peek(FP), Some(&c));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn users_are_bounded() {
        let mut c = cs("a");
        for i in 0..100 {
            c.touch(&format!("w{i}").into(), &"n".into(), i);
        }
        assert_eq!(c.users.len(), MAX_USERS);
        assert_eq!(c.distinct_workloads, 101);
    }
}
