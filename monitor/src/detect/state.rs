//! What the detector remembers about each credential, bounded: a least-recently-used map of
//! fingerprints (evictions counted), saved to disk and restored so a restart neither forgets
//! bindings nor alerts again on what it already reported.

use std::{collections::HashMap, fs, io::Write, num::NonZeroUsize, path::Path};

use anyhow::{Context, Result};
use lru::LruCache;
use serde::{Deserialize, Serialize};

/// Distinct recent users kept per credential.
const MAX_USERS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CredState {
    /// The workload the credential was first seen with: its owner, unless the rules say.
    pub first_workload: String,
    pub first_node: String,
    pub first_seen_ns: u64,
    /// Recent users: (workload, node, last use).
    pub users: Vec<(String, String, u64)>,
    /// Distinct workloads ever seen (bounded by MAX_USERS for memory; the count keeps going).
    pub distinct_workloads: usize,
}

impl CredState {
    pub fn touch(&mut self, workload: &str, node: &str, now_ns: u64) {
        if let Some(u) = self
            .users
            .iter_mut()
            .find(|u| u.0 == workload && u.1 == node)
        {
            u.2 = u.2.max(now_ns);
            return;
        }
        if !self.users.iter().any(|u| u.0 == workload) {
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
        self.users
            .push((workload.to_string(), node.to_string(), now_ns));
    }
}

/// One open alert: repeats within the window fold into `count`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Open {
    pub alert: crate::alert::Alert,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Count already reported.
    pub reported: u64,
}

pub struct State {
    pub creds: LruCache<String, CredState>,
    pub open: HashMap<String, Open>,
    pub evicted: u64,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    creds: Vec<(String, CredState)>,
    open: Vec<(String, Open)>,
}

impl State {
    pub fn new(capacity: usize) -> Self {
        State {
            creds: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            open: HashMap::new(),
            evicted: 0,
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
        use std::os::unix::fs::OpenOptionsExt;
        let saved = Saved {
            version: 1,
            // Least recent first, so a restore rebuilds the same LRU order.
            creds: self
                .creds
                .iter()
                .rev()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            open: self
                .open
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(&saved)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("saving state to {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path, capacity: usize) -> Result<Self> {
        let mut st = State::new(capacity);
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(st),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let saved: Saved = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a state file", path.display()))?;
        for (k, v) in saved.creds {
            st.put(k, v);
        }
        st.open = saved.open.into_iter().collect();
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(w: &str) -> CredState {
        CredState {
            first_workload: w.into(),
            first_node: "n".into(),
            first_seen_ns: 1,
            users: vec![],
            distinct_workloads: 1,
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
        c.touch("payments", "n", 5);
        s.put("fp1".into(), c.clone());
        s.save(&p).unwrap();
        let back = State::load(&p, 10).unwrap();
        assert_eq!(back.creds.peek("fp1"), Some(&c));
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
            c.touch(&format!("w{i}"), "n", i);
        }
        assert_eq!(c.users.len(), MAX_USERS);
        assert_eq!(c.distinct_workloads, 101);
    }
}
