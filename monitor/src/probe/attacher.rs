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
    path::PathBuf,
    time::{Duration, Instant},
};

use monitor_common::MmapInfo;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{
    Link, ProbeSet, Probes,
    elf::{Budget, InspectError},
    inspector::{Inspector, Job, Locate, Outcome, Verdict, exec_mapping},
    site::{Kind, Placement},
    target::{self, Stack},
};

pub use super::elf::FileId;

/// Files waiting for the inspection worker at most; past that an arrival is dropped (and
/// counted), to be seen again at the file's next mapping.
const QUEUE: usize = 1024;
/// A worker this long on one file is blocked in a read no budget can interrupt (a FUSE
/// server that never answers): it is left behind and another one started.
const STUCK: Duration = Duration::from_secs(10);
/// Workers left behind at most, each one thread blocked in the kernel.
const MAX_ABANDONED: usize = 16;

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
    /// Files that could not be read or parsed (refused, over budget, malformed).
    pub inspect_errors: u64,
    /// Files not inspected, or not to the end, by reason: `not_regular`, `replaced`,
    /// `byte_budget`, `time_budget`, `read_error`, `malformed`, `queue_full`, `stuck`.
    pub inspect_failures: BTreeMap<&'static str, u64>,
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

/// A file queued for inspection.
struct Pending {
    users: HashSet<u32>,
    pinned: bool,
    /// Kernel time (monotonic) of the exec or mmap that brought it, for the latency gauge.
    since_ns: Option<u64>,
    /// Brought by an mmap record: not finding it is an mmap miss.
    mmap: bool,
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
    inspector: Inspector,
    budget: Budget,
    pending: HashMap<FileId, Pending>,
    abandoned: usize,
    /// In `attach_existing`: arrivals wait for room in the queue instead of being dropped.
    starting: bool,
    /// Last warning per failure reason: a user can make files fail at will.
    warned: HashMap<&'static str, Instant>,
    pub stats: AttachStats,
}

impl Attacher {
    pub fn new(caps: super::Caps, linger: Duration) -> std::io::Result<Self> {
        Self::with_budget(caps, linger, Budget::DEFAULT)
    }

    pub fn with_budget(
        caps: super::Caps,
        linger: Duration,
        budget: Budget,
    ) -> std::io::Result<Self> {
        Ok(Attacher {
            caps,
            linger,
            told_caps: false,
            ignored: HashSet::new(),
            attached: HashMap::new(),
            uses: HashMap::new(),
            inspector: Inspector::start(budget, QUEUE)?,
            budget,
            pending: HashMap::new(),
            abandoned: 0,
            starting: true,
            warned: HashMap::new(),
            stats: AttachStats::default(),
        })
    }

    /// At start: the TLS libraries installed on the host (pinned), then every file mapped
    /// executable by a running process; returns once all of them are inspected (and
    /// attached), so readiness means what it says.
    pub fn attach_existing(&mut self, probes: &mut Probes) {
        for lib in super::libs::installed_tls_libraries() {
            self.consider(probes, lib.id, Locate::Path(lib.path), None, true, None);
        }
        self.rescan(probes);
        while !self.pending.is_empty() {
            let wait = self.budget.time + Duration::from_secs(1);
            match self.inspector.wait_verdict(wait) {
                Some(v) => self.apply(probes, v),
                None => self.check_stuck(probes),
            }
        }
        self.starting = false;
    }

    /// Looks at every running process's executable mappings (a safety net; normally the
    /// exec and mmap records do this as things arrive).
    pub fn rescan(&mut self, probes: &mut Probes) {
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            if let Some(tgid) = p.file_name().to_str().and_then(|s| s.parse().ok()) {
                self.scan_maps(probes, tgid);
            }
        }
    }

    /// A process executed a program: its old mappings are gone, its new executable is here
    /// (libraries follow as mmap records).
    /// `exec_ns` is the exec's kernel timestamp (monotonic): how soon after it a new program
    /// is attached is measured.
    pub fn on_exec(&mut self, probes: &mut Probes, tgid: u32, exec_ns: u64) {
        self.release(probes, tgid);
        let Ok(meta) = fs::metadata(format!("/proc/{tgid}/exe")) else {
            return; // already gone
        };
        let id = (meta.dev(), meta.ino());
        self.consider(
            probes,
            id,
            Locate::Exe { tgid },
            Some(tgid),
            false,
            Some(exec_ns),
        );
    }

    /// Records how long after the kernel saw a program or library arrive (`since_ns`) its
    /// handling attached something.
    fn note_latency(&mut self, since_ns: u64) {
        let us = crate::pipeline::monotonic_ns().saturating_sub(since_ns) / 1000;
        self.stats.arrival_to_attach_max_us = self.stats.arrival_to_attach_max_us.max(us);
        debug!(us, "attached after arrival");
    }

    /// A process mapped a file executable.
    pub fn on_mmap(&mut self, probes: &mut Probes, tgid: u32, fd: i32, data: &[u8], mmap_ns: u64) {
        if data.len() < std::mem::size_of::<MmapInfo>() {
            return;
        }
        // SAFETY: MmapInfo is plain data and the length was checked.
        let info: MmapInfo = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        let id = (kernel_dev(info.dev), info.ino);
        self.consider(
            probes,
            id,
            Locate::Mapping { tgid, fd: Some(fd) },
            Some(tgid),
            false,
            Some(mmap_ns),
        );
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
        // Files still being inspected: attached later, they must not wait for this process.
        for p in self.pending.values_mut() {
            p.users.remove(&tgid);
        }
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

    /// Considers every executable mapping of `tgid` not seen yet.
    fn scan_maps(&mut self, probes: &mut Probes, tgid: u32) {
        let Ok(maps) = fs::read_to_string(format!("/proc/{tgid}/maps")) else {
            return;
        };
        let mut done = HashSet::new();
        for m in maps.lines().filter_map(exec_mapping) {
            if done.insert(m.id) {
                self.consider(
                    probes,
                    m.id,
                    Locate::Mapping { tgid, fd: None },
                    Some(tgid),
                    false,
                    None,
                );
            }
        }
    }

    /// Queues one file for inspection unless it is attached (then `user` is one more of its
    /// users), known to have nothing to probe, or queued already.
    fn consider(
        &mut self,
        probes: &mut Probes,
        id: FileId,
        locate: Locate,
        user: Option<u32>,
        pinned: bool,
        since_ns: Option<u64>,
    ) {
        // Verdicts first: the file may have just been attached.
        self.collect(probes);
        if self.attached.contains_key(&id) {
            if let Some(tgid) = user {
                self.add_user(id, tgid);
            }
            return;
        }
        if self.ignored.contains(&id) {
            return;
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.users.extend(user);
            p.pinned |= pinned;
            return;
        }
        let mmap = matches!(locate, Locate::Mapping { fd: Some(_), .. });
        let mut job = Job { id, locate };
        loop {
            match self.inspector.submit(job) {
                Ok(()) => {
                    let users = user.into_iter().collect();
                    let p = Pending {
                        users,
                        pinned,
                        since_ns,
                        mmap,
                    };
                    self.pending.insert(id, p);
                    return;
                }
                // At start nothing is dropped: readiness waits for every file.
                Err(j) if self.starting => {
                    job = j;
                    match self.inspector.wait_verdict(self.budget.time) {
                        Some(v) => self.apply(probes, v),
                        None => self.check_stuck(probes),
                    }
                }
                Err(j) => {
                    let what = format!("{:?}", j.locate);
                    return self.failed("queue_full", &what, "inspection queue full");
                }
            }
        }
    }

    /// Takes the verdicts the worker has reached; call often (the capture loop does after
    /// each drain), since a new program waits for its verdict to be attached.
    pub fn collect(&mut self, probes: &mut Probes) {
        while let Some(v) = self.inspector.try_verdict() {
            self.apply(probes, v);
        }
        self.check_stuck(probes);
    }

    /// Counts a failure and says so (once a minute per reason: a user can make files fail
    /// at will). Neither `what` nor `error` carries file contents.
    fn failed(&mut self, reason: &'static str, what: &str, error: &str) {
        *self.stats.inspect_failures.entry(reason).or_default() += 1;
        if reason != "queue_full" && reason != "stuck" {
            self.stats.inspect_errors += 1;
        }
        let now = Instant::now();
        let last = self.warned.get(reason);
        if last.is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            self.warned.insert(reason, now);
            warn!(
                file = what,
                reason,
                error,
                "file not inspected (further ones are counted in monitor_tls_inspect_failures_total)"
            );
        } else {
            debug!(file = what, reason, error, "file not inspected");
        }
    }

    /// A worker blocked for good is left behind with its file (which is not tried again:
    /// it is the inode that was mapped, so the user who made it hang owns it).
    fn check_stuck(&mut self, probes: &mut Probes) {
        let Some(id) = self.inspector.stuck(STUCK) else {
            return;
        };
        if self.abandoned >= MAX_ABANDONED {
            return;
        }
        let fresh = match Inspector::start(self.budget, QUEUE) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot start another inspection worker");
                return;
            }
        };
        self.abandoned += 1;
        // Its queue goes with it: those files are looked at again when next mapped.
        let old = std::mem::replace(&mut self.inspector, fresh);
        while let Some(v) = old.try_verdict() {
            self.apply(probes, v);
        }
        self.pending.clear();
        self.ignored.insert(id);
        self.failed(
            "stuck",
            &format!("{id:?}"),
            &format!(
                "no answer for {STUCK:?}; worker left behind ({} so far)",
                self.abandoned
            ),
        );
    }

    fn apply(&mut self, probes: &mut Probes, v: Verdict) {
        let Some(p) = self.pending.remove(&v.id) else {
            return;
        };
        let (path, result) = match v.outcome {
            Outcome::Gone => {
                self.stats.mmap_misses += p.mmap as u64;
                return;
            }
            Outcome::Inspected { path, result } => (path, result),
        };
        self.stats.inspected += 1;
        debug!(file = %path.display(), took = ?v.took, "inspected");
        let (file, target, placed) = match result {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.ignored.insert(v.id);
                return;
            }
            Err(InspectError::Open(e)) => {
                debug!(file = %path.display(), error = %e, "cannot open");
                return; // gone; a later process mapping it will show it again
            }
            Err(e) => {
                // What is at the path is not the file that was mapped: that one may be fine.
                if !matches!(e, InspectError::NotRegular(_) | InspectError::Replaced) {
                    self.ignored.insert(v.id);
                }
                self.failed(e.reason(), &path.display().to_string(), &e.to_string());
                return;
            }
        };
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
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
                if !p.pinned {
                    for &tgid in &p.users {
                        users.insert(tgid);
                        self.uses.entry(tgid).or_default().insert(v.id);
                    }
                }
                let idle_since = (!p.pinned && users.is_empty()).then(Instant::now);
                self.attached.insert(
                    v.id,
                    Attached {
                        path,
                        stack: target.stack,
                        links,
                        sites,
                        users,
                        pinned: p.pinned,
                        idle_since,
                    },
                );
                self.stats.attached_now = self.attached.len();
                if let Some(ns) = p.since_ns {
                    self.note_latency(ns);
                }
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
                self.ignored.insert(v.id);
            }
        }
    }
}

/// The kernel's `s_dev` (major << 20 | minor) as `st_dev`.
fn kernel_dev(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xfffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_device_numbers_match_stat() {
        let meta = fs::metadata("/proc/self/exe").unwrap();
        let st = meta.dev();
        let (maj, min) = (libc::major(st), libc::minor(st));
        assert_eq!(kernel_dev((maj << 20) | min), st);
    }
}
