//! Attach on arrival: the kernel reports every program executed and every file mapped
//! executable; each file is inspected once (by device and inode: uprobes live on the inode) and,
//! when it implements a TLS stack, probed at once. A file that stops being used (its last
//! process exits or executes something else) is detached after a while (`linger`), unless it
//! is a system library found at start, which stays attached so a process loading it later is
//! covered from its first call. The linger spares the churn of programs that run again and
//! again (cron jobs, short-lived clients): unregistering uprobes costs the kernel RCU grace
//! periods (1 to 2.5 s for a Go program's nine probes, measured here), done off the capture
//! loop (`Probes::detach`), and attaching anew costs an ELF inspection.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use monitor_common::MmapInfo;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{
    Link, ProbeSet, Probes,
    site::{self, Kind, Placement},
    target::{self, Stack},
};

/// A file as `stat` names it: (st_dev, st_ino).
pub type FileId = (u64, u64);

/// Counters per stack and result, for `/metrics` and the exit summary.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AttachStats {
    /// Files inspected (ELF symbols read), whatever the verdict.
    pub inspected: u64,
    /// (stack, result) → count; results: attached, failed, detached.
    pub by_stack: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Files attached now.
    pub attached_now: usize,
    /// mmap records whose file was not among the process's mappings when looked up (the
    /// process had exited or unmapped it).
    pub mmap_misses: u64,
    /// Files that could not be read or parsed.
    pub inspect_errors: u64,
    /// Longest time from a program's exec (or a library's mmap) to its probes being attached
    /// (µs).
    pub arrival_to_attach_max_us: u64,
    /// Probes attached now by where they sit: (stack, function, kind, placement) → count.
    #[serde(skip)]
    pub sites: BTreeMap<SiteKey, u64>,
}

/// (stack, function, kind, placement) of an attached probe.
pub type SiteKey = (&'static str, &'static str, Kind, Placement);

impl AttachStats {
    fn count(&mut self, stack: Stack, result: &'static str) {
        *self
            .by_stack
            .entry(stack.name().to_string())
            .or_default()
            .entry(result)
            .or_default() += 1;
    }
}

struct Attached {
    path: PathBuf,
    stack: Stack,
    links: Vec<Link>,
    sites: Vec<SiteKey>,
    users: HashSet<u32>,
    /// Found at start in the library directories: never detached.
    pinned: bool,
    /// Since when no process has used it.
    idle_since: Option<Instant>,
}

pub struct Attacher {
    caps: super::Caps,
    /// The capability hint was given (once: every file would fail the same way).
    told_caps: bool,
    /// Files looked at whose verdict was "nothing to probe" (or that failed).
    ignored: HashSet<FileId>,
    attached: HashMap<FileId, Attached>,
    /// Process → attached files it maps.
    uses: HashMap<u32, HashSet<FileId>>,
    /// How long an unused file stays attached.
    linger: Duration,
    pub stats: AttachStats,
}

impl Attacher {
    pub fn new(caps: super::Caps, linger: Duration) -> Self {
        Attacher {
            caps,
            linger,
            told_caps: false,
            ignored: HashSet::new(),
            attached: HashMap::new(),
            uses: HashMap::new(),
            stats: AttachStats::default(),
        }
    }

    /// At start: the TLS libraries installed on the host (pinned), then every file mapped
    /// executable by a running process.
    pub fn attach_existing(&mut self, probes: &mut Probes) {
        for lib in super::libs::installed_tls_libraries() {
            self.consider(probes, &lib.path, lib.id, None, true);
        }
        self.rescan(probes);
    }

    /// Looks at every running process's executable mappings (a safety net; normally the
    /// exec and mmap records do this as things arrive).
    pub fn rescan(&mut self, probes: &mut Probes) {
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            if let Some(tgid) = p.file_name().to_str().and_then(|s| s.parse().ok()) {
                self.scan_maps(probes, tgid, None);
            }
        }
    }

    /// A process executed a program: its old mappings are gone, its new executable is here
    /// (libraries follow as mmap records).
    /// `exec_ns` is the exec's kernel timestamp (monotonic): how soon after it a new program
    /// is attached is measured.
    pub fn on_exec(&mut self, probes: &mut Probes, tgid: u32, exec_ns: u64) {
        self.release(probes, tgid);
        let exe = format!("/proc/{tgid}/exe");
        let (Ok(meta), Ok(path)) = (fs::metadata(&exe), fs::read_link(&exe)) else {
            return; // already gone
        };
        let id = (meta.dev(), meta.ino());
        let full = in_root(tgid, &path);
        if self.consider(probes, &full, id, Some(tgid), false) {
            self.note_latency(exec_ns);
        }
    }

    /// Records how long after the kernel saw a program or library arrive (`since_ns`) its
    /// handling attached something.
    fn note_latency(&mut self, since_ns: u64) {
        let us = crate::pipeline::monotonic_ns().saturating_sub(since_ns) / 1000;
        self.stats.arrival_to_attach_max_us = self.stats.arrival_to_attach_max_us.max(us);
        debug!(us, "attached after arrival");
    }

    /// A process mapped a file executable.
    pub fn on_mmap(&mut self, probes: &mut Probes, tgid: u32, data: &[u8], mmap_ns: u64) {
        if data.len() < std::mem::size_of::<MmapInfo>() {
            return;
        }
        // SAFETY: MmapInfo is plain data and the length was checked.
        let info: MmapInfo = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        let id = (kernel_dev(info.dev), info.ino);
        if self.attached.contains_key(&id) {
            self.add_user(id, tgid);
            return;
        }
        if self.ignored.contains(&id) {
            return;
        }
        let (found, attached) = self.scan_maps(probes, tgid, Some(id));
        if !found {
            self.stats.mmap_misses += 1;
        }
        if attached {
            self.note_latency(mmap_ns);
        }
    }

    /// A process exited: files only it used are detached.
    pub fn on_exit(&mut self, probes: &mut Probes, tgid: u32) {
        self.release(probes, tgid);
    }

    pub fn attached_files(&self) -> usize {
        self.attached.len()
    }

    fn add_user(&mut self, id: FileId, tgid: u32) {
        if let Some(a) = self.attached.get_mut(&id)
            && !a.pinned
        {
            a.users.insert(tgid);
            a.idle_since = None;
            self.uses.entry(tgid).or_default().insert(id);
        }
    }

    fn release(&mut self, probes: &mut Probes, tgid: u32) {
        let Some(ids) = self.uses.remove(&tgid) else {
            return;
        };
        let now = Instant::now();
        for id in ids {
            if let Some(a) = self.attached.get_mut(&id) {
                a.users.remove(&tgid);
                if a.users.is_empty() && !a.pinned {
                    a.idle_since = Some(now);
                }
            }
        }
        self.sweep(probes, now);
    }

    /// Detaches the files nobody has used for `linger`; call now and then.
    pub fn sweep(&mut self, probes: &mut Probes, now: Instant) {
        let due: Vec<FileId> = self
            .attached
            .iter()
            .filter(|(_, a)| {
                a.idle_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.linger)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let a = self.attached.remove(&id).expect("present");
            probes.detach(a.links);
            for k in &a.sites {
                if let Some(n) = self.stats.sites.get_mut(k) {
                    *n = n.saturating_sub(1);
                }
            }
            self.stats.count(a.stack, "detached");
            info!(file = %a.path.display(), stack = a.stack.name(), "detached: no process uses it any more");
        }
        self.stats.attached_now = self.attached.len();
    }

    /// Considers every executable mapping of `tgid` not seen yet; (whether `want`, if any,
    /// was among them, whether a file was newly attached).
    fn scan_maps(&mut self, probes: &mut Probes, tgid: u32, want: Option<FileId>) -> (bool, bool) {
        let Ok(maps) = fs::read_to_string(format!("/proc/{tgid}/maps")) else {
            return (false, false);
        };
        let mut found = want.is_none();
        let mut attached = false;
        let mut done = HashSet::new();
        for line in maps.lines() {
            let Some((id, path)) = exec_mapping(line) else {
                continue;
            };
            found |= want == Some(id);
            if done.insert(id) {
                attached |= self.consider(
                    probes,
                    &in_root(tgid, Path::new(path)),
                    id,
                    Some(tgid),
                    false,
                );
            }
        }
        (found, attached)
    }

    /// Looks at one file and attaches to it if it implements a TLS stack; true when it was
    /// attached now (not before).
    fn consider(
        &mut self,
        probes: &mut Probes,
        path: &Path,
        id: FileId,
        user: Option<u32>,
        pinned: bool,
    ) -> bool {
        if self.attached.contains_key(&id) {
            if let Some(tgid) = user {
                self.add_user(id, tgid);
            }
            return false;
        }
        if self.ignored.contains(&id) {
            return false;
        }
        self.stats.inspected += 1;
        // Opened once and named through our own fd from here on: the process that showed us
        // the file may exit (and its /proc entry vanish) while we inspect and attach.
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                debug!(file = %path.display(), error = %e, "cannot open");
                return false; // gone; a later process mapping it will show it again
            }
        };
        let target = match target::inspect_file(&file, path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.ignored.insert(id);
                return false;
            }
            Err(e) => {
                debug!(file = %path.display(), error = %format!("{e:#}"), "cannot inspect");
                self.stats.inspect_errors += 1;
                self.ignored.insert(id);
                return false;
            }
        };
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let placed = site::plan_file(&file, &target);
        let points: Vec<target::Point> = placed.iter().map(|p| p.point.clone()).collect();
        match probes.attach_points(&by_fd, &points) {
            Ok(links) => {
                info!(file = %path.display(), stack = target.stack.name(), points = links.len(), "attached TLS probes");
                let mut sites = Vec::new();
                let full = probes.probe_set() == ProbeSet::Full;
                for p in placed.iter().filter(|p| full || !p.point.read_side) {
                    info!(
                        file = %path.display(),
                        function = p.point.symbol,
                        program = p.point.program,
                        kind = p.kind.name(),
                        placement = p.placement.name(),
                        offset = format_args!("{:#x}+{:#x}", p.entry, p.point.offset.saturating_sub(p.entry)),
                        reason = %p.reason,
                        "probe site"
                    );
                    let key = (target.stack.name(), p.point.symbol, p.kind, p.placement);
                    *self.stats.sites.entry(key).or_default() += 1;
                    sites.push(key);
                }
                self.stats.count(target.stack, "attached");
                let mut users = HashSet::new();
                if let Some(tgid) = user.filter(|_| !pinned) {
                    users.insert(tgid);
                    self.uses.entry(tgid).or_default().insert(id);
                }
                self.attached.insert(
                    id,
                    Attached {
                        path: path.to_path_buf(),
                        stack: target.stack,
                        links,
                        sites,
                        users,
                        pinned,
                        idle_since: None,
                    },
                );
                self.stats.attached_now = self.attached.len();
                true
            }
            Err(e) => {
                let text = format!("{e:#}");
                match super::uprobe_permission_hint(self.caps, &text) {
                    Some(hint) if !self.told_caps => {
                        self.told_caps = true;
                        tracing::error!(file = %path.display(), error = %text, "{hint}");
                    }
                    Some(_) => debug!(file = %path.display(), error = %text, "cannot attach"),
                    None => {
                        warn!(file = %path.display(), stack = target.stack.name(), error = %text, "cannot attach")
                    }
                }
                self.stats.count(target.stack, "failed");
                // Do not retry a file that failed: its symbols will not change.
                self.ignored.insert(id);
                false
            }
        }
    }
}

/// `(file id, path)` of an executable, file-backed line of /proc/<pid>/maps.
fn exec_mapping(line: &str) -> Option<(FileId, &str)> {
    let mut f = line.split_whitespace();
    let (_, perms, _, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let path = f.next()?;
    if !perms.contains('x') || !path.starts_with('/') || f.next().is_some() {
        return None; // not executable, anonymous, or "(deleted)"
    }
    let (maj, min) = dev.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    );
    Some(((dev, ino.parse().ok()?), path))
}

/// The kernel's `s_dev` (major << 20 | minor) as `st_dev`.
fn kernel_dev(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xfffff)
}

/// A path as the process sees it, reachable from here (containers have their own root).
fn in_root(tgid: u32, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{tgid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_mappings_only() {
        let x = "7f1c5a000000-7f1c5a0a0000 r-xp 00022000 fe:01 1311012                    /usr/lib/x86_64-linux-gnu/libssl.so.3";
        let ((dev, ino), path) = exec_mapping(x).unwrap();
        assert_eq!((dev, ino), (libc::makedev(0xfe, 1), 1311012));
        assert_eq!(path, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let ro = x.replace("r-xp", "r--p");
        assert!(exec_mapping(&ro).is_none());
        assert!(
            exec_mapping("7ffd-7ffe r-xp 00000000 00:00 0                          [vdso]")
                .is_none()
        );
        assert!(exec_mapping(&format!("{x} (deleted)")).is_none());
    }

    #[test]
    fn kernel_device_numbers_match_stat() {
        let meta = fs::metadata("/proc/self/exe").unwrap();
        let st = meta.dev();
        let (maj, min) = (libc::major(st), libc::minor(st));
        assert_eq!(kernel_dev((maj << 20) | min), st);
    }
}
