//! Who made a call: process (exe) and cgroup path from the cgroup id the kernel reports;
//! from the path, the container or systemd unit (`container`); for containers, the pod
//! (`kube`, when a Kubernetes API is configured).

pub mod container;
pub mod kube;

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use self::{container::CgroupInfo, kube::PodCache};

const MAX_CACHE: usize = 65536;

/// What is read once per process from /proc. (uid and gid come with each event from the
/// kernel: a short-lived process is often gone before its first event is enriched.)
#[derive(Clone, Default)]
struct Proc {
    exe: Option<Arc<str>>,
    /// From `/proc/<pid>/cgroup`, on hosts with v1 hierarchies (where the v2 path may not
    /// show the container).
    v1: Option<Arc<CgroupInfo>>,
    /// v1 read (an exec event gives only the exe: the rest is read on first use,
    /// as most executed programs never send anything).
    read: bool,
}

/// Lookups in the identity caches: answered from the cache (hit) or from /proc and
/// cgroupfs (miss).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IdentityStats {
    pub exe_hits: u64,
    pub exe_misses: u64,
    pub cgroup_hits: u64,
    pub cgroup_misses: u64,
    /// Cgroup ids no path was found for (the cgroup was already gone).
    pub cgroup_unresolved: u64,
}

pub struct Identity {
    /// (tgid, hash of comm) → process; comm is in the key because exec keeps the pid.
    procs: HashMap<(u32, u64), Proc>,
    cgroups: HashMap<u64, Arc<str>>,
    /// cgroup id → what its path says.
    infos: HashMap<u64, Arc<CgroupInfo>>,
    cgroup_root: Option<PathBuf>,
    last_scan: Option<Instant>,
    /// The host has cgroup v1 hierarchies (legacy or hybrid).
    v1: bool,
    pods: Option<Arc<PodCache>>,
    pub stats: IdentityStats,
}

impl Default for Identity {
    fn default() -> Self {
        Self::new()
    }
}

impl Identity {
    pub fn new() -> Self {
        let v1 = fs::read_to_string("/proc/self/cgroup")
            .is_ok_and(|t| t.lines().any(|l| !l.starts_with("0::")));
        Identity {
            procs: HashMap::new(),
            cgroups: HashMap::new(),
            infos: HashMap::new(),
            cgroup_root: cgroup2_root(),
            last_scan: None,
            v1,
            pods: None,
            stats: IdentityStats::default(),
        }
    }

    /// Containers are resolved to pods through this cache (fed by `kube::spawn`).
    pub fn with_pods(mut self, pods: Arc<PodCache>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Fills in what the kernel cannot see: wall-clock time, node, executable, cgroup
    /// path, container or unit, pod. Done once per event before it is recorded or parsed, so
    /// replay needs no /proc and no API.
    pub fn enrich(&mut self, ev: &mut crate::event::Event, boot_offset_ns: i128, node: &str) {
        ev.time_ns = (ev.ts_ns as i128 + boot_offset_ns).max(0) as u64;
        ev.node = node.to_string();
        match ev.kind {
            crate::event::Kind::Data => {
                let p = self.proc(ev.tgid, &ev.comm);
                ev.exe = p.exe;
                ev.cgroup = self.cgroup_path(ev.cgroup_id, ev.tgid);
                let info = self.cgroup_info(ev.cgroup_id, ev.cgroup.as_deref(), p.v1);
                ev.container_id = info.container_id.as_deref().map(Arc::from);
                ev.runtime = info.runtime;
                ev.pod_uid = info.pod_uid.as_deref().map(Arc::from);
                ev.unit = info.unit.as_deref().map(Arc::from);
                if let Some(pods) = &self.pods
                    && info.is_container()
                    && let Some((pod, rt)) =
                        pods.lookup(info.container_id.as_deref(), info.pod_uid.as_deref())
                {
                    ev.runtime = ev.runtime.or(rt);
                    ev.pod = Some(pod);
                }
            }
            crate::event::Kind::Exec => {
                let exe: Arc<str> = String::from_utf8_lossy(&ev.data).into();
                let key = (ev.tgid, comm_hash(&ev.comm));
                self.procs.insert(
                    key,
                    Proc {
                        exe: Some(exe.clone()),
                        ..Proc::default()
                    },
                );
                ev.exe = Some(exe);
            }
            _ => {}
        }
    }

    fn read_proc(&self, tgid: u32, exe: bool) -> Proc {
        let v1 = if self.v1 {
            fs::read_to_string(format!("/proc/{tgid}/cgroup"))
                .ok()
                .map(|t| Arc::new(container::parse_proc_cgroup(&t)))
        } else {
            None
        };
        Proc {
            exe: if exe {
                fs::read_link(format!("/proc/{tgid}/exe"))
                    .ok()
                    .map(|p| p.display().to_string().into())
            } else {
                None
            },
            v1,
            read: true,
        }
    }

    fn proc(&mut self, tgid: u32, comm: &str) -> Proc {
        if self.procs.len() > MAX_CACHE {
            self.procs.clear();
        }
        let key = (tgid, comm_hash(comm));
        match self.procs.get(&key) {
            Some(p) if p.read => {
                self.stats.exe_hits += 1;
                p.clone()
            }
            Some(p) => {
                self.stats.exe_misses += 1;
                let exe = p.exe.clone();
                let mut p = self.read_proc(tgid, false);
                p.exe = exe;
                self.procs.insert(key, p.clone());
                p
            }
            None => {
                self.stats.exe_misses += 1;
                let p = self.read_proc(tgid, true);
                self.procs.insert(key, p.clone());
                p
            }
        }
    }

    pub fn exe(&mut self, tgid: u32, comm: &str) -> Option<Arc<str>> {
        self.proc(tgid, comm).exe
    }

    /// Reads every running process once, at start: one that exits right after its last
    /// request would otherwise be gone from /proc before its events are enriched.
    pub fn seed_running(&mut self) {
        let Ok(rd) = fs::read_dir("/proc") else {
            return;
        };
        for e in rd.flatten() {
            let Some(tgid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(comm) = fs::read_to_string(format!("/proc/{tgid}/comm")) {
                self.proc(tgid, comm.trim_end_matches('\n'));
            }
        }
    }

    /// Container or unit of a cgroup: its v2 path, else (v1 hosts) the process's v1 lines.
    fn cgroup_info(
        &mut self,
        id: u64,
        path: Option<&str>,
        v1: Option<Arc<CgroupInfo>>,
    ) -> Arc<CgroupInfo> {
        let v2 = match path {
            Some(p) => {
                if self.infos.len() > MAX_CACHE {
                    self.infos.clear();
                }
                self.infos
                    .entry(id)
                    .or_insert_with(|| Arc::new(container::parse_path(p)))
                    .clone()
            }
            None => Arc::default(),
        };
        match v1 {
            Some(v1) if !v2.is_container() && (v1.is_container() || v2.unit.is_none()) => v1,
            _ => v2,
        }
    }

    /// Path of the cgroup (v2) with this id, relative to the cgroup2 mount ("/a/b").
    pub fn cgroup_path(&mut self, id: u64, tgid: u32) -> Option<Arc<str>> {
        if let Some(p) = self.cgroups.get(&id) {
            self.stats.cgroup_hits += 1;
            return Some(p.clone());
        }
        self.stats.cgroup_misses += 1;
        let found = self.resolve_cgroup(id, tgid);
        if found.is_none() {
            self.stats.cgroup_unresolved += 1;
        }
        found
    }

    fn resolve_cgroup(&mut self, id: u64, tgid: u32) -> Option<Arc<str>> {
        let root = self.cgroup_root.clone()?;
        // Fast path: the process's own cgroup file, checked against the id.
        if let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/cgroup")) {
            for line in text.lines() {
                if let Some(rel) = line.strip_prefix("0::")
                    && inode(&root.join(rel.trim_start_matches('/'))) == Some(id)
                {
                    return Some(self.remember(id, rel.to_string()));
                }
            }
        }
        // Slow path: walk the hierarchy and remember every cgroup in it (one walk serves all
        // the workloads started meanwhile), at most four times a second.
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return None;
        }
        self.last_scan = Some(Instant::now());
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            if let (Some(ino), Ok(rel)) = (inode(&dir), dir.strip_prefix(&root)) {
                self.remember(ino, format!("/{}", rel.display()));
            }
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        self.cgroups.get(&id).cloned()
    }

    fn remember(&mut self, id: u64, path: String) -> Arc<str> {
        if self.cgroups.len() > MAX_CACHE {
            self.cgroups.clear();
        }
        let path: Arc<str> = path.into();
        self.cgroups.insert(id, path.clone());
        path
    }
}

fn comm_hash(comm: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    comm.hash(&mut h);
    h.finish()
}

fn inode(p: &Path) -> Option<u64> {
    fs::metadata(p).ok().map(|m| m.ino())
}

/// Mount point of the cgroup2 hierarchy (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Option<PathBuf> {
    try_cgroup2_root().ok().flatten()
}

/// Like [`cgroup2_root`], telling an unreadable mount table (no fd left) from no cgroup2.
fn try_cgroup2_root() -> std::io::Result<Option<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(pre.split_whitespace().nth(4)?))
    }))
}

/// Ids of the cgroups at `paths` (relative to the cgroup2 mount, or absolute under it) and of
/// all their descendants: a pod's or service's processes live in child cgroups.
pub fn cgroup_ids_under(paths: &[String]) -> std::io::Result<HashSet<u64>> {
    let mut ids = HashSet::new();
    let Some(root) = try_cgroup2_root()? else {
        return Ok(ids);
    };
    for p in paths {
        let rel = p.strip_prefix(root.to_str().unwrap_or("")).unwrap_or(p);
        let mut stack = vec![root.join(rel.trim_start_matches('/'))];
        while let Some(dir) = stack.pop() {
            if let Some(id) = inode(&dir) {
                ids.insert(id);
            }
            // A cgroup removed while walking is simply gone; any other error (no fd left)
            // means the set is incomplete, and the caller must not take it for the truth.
            match fs::read_dir(&dir) {
                Ok(rd) => {
                    for e in rd {
                        let e = e?;
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(e.path());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(ids)
}

/// This host's name, the default node name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_own_cgroup_and_exe() {
        let mut id = Identity::new();
        let root = id.cgroup_root.clone().expect("cgroup2 mounted");
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        let ino = inode(&root.join(rel.trim_start_matches('/'))).unwrap();
        assert_eq!(
            id.cgroup_path(ino, std::process::id()).as_deref(),
            Some(rel.as_str())
        );
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert!(id.exe(std::process::id(), comm.trim()).is_some());
    }
}
