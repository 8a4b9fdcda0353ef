//! Loads the kernel programs, attaches them, and reads their counters.

pub mod attacher;
pub mod btf;
pub mod elf;
pub mod golang;
pub mod inspector;
pub mod libs;
pub mod site;
pub mod target;

use std::{collections::HashSet, fs, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use monitor_common::{
    GoOffsets, PROG_COUNT, PROG_NAMES, ProbeConfig, STAT_COUNT, STAT_EVENTS, STAT_HITS, STAT_LOST,
    STAT_READ_ERRORS, STAT_SKIPPED, STAT_TRUNCATED,
};
use serde::Serialize;
use tracing::{info, warn};

/// One attached uprobe: its program and link, for detaching.
pub struct Link {
    program: &'static str,
    id: UProbeLinkId,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor.bpf.o"));

/// Which probes to attach. Each uprobe hit traps into the kernel (several µs on a VM), so the
/// choice is a cost/coverage trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeSet {
    /// Write and read calls, entry and return: both sides of every TLS connection (servers
    /// see the requests they receive).
    Full,
    /// Write calls only: credentials travel in requests, so where every client is monitored
    /// the sending side suffices, at half the uprobe hits.
    Egress,
}

/// Syscall tracepoints: (program, tracepoint names).
const TRACEPOINTS: &[(&str, &[&str])] = &[
    ("sys_enter_write", &["sys_enter_write"]),
    ("sys_enter_sendto", &["sys_enter_sendto"]),
    ("sys_enter_writev", &["sys_enter_writev"]),
    ("sys_enter_sendmsg", &["sys_enter_sendmsg"]),
    ("sys_enter_read", &["sys_enter_read"]),
    ("sys_enter_recvfrom", &["sys_enter_recvfrom"]),
    ("sys_enter_readv", &["sys_enter_readv"]),
    ("sys_enter_recvmsg", &["sys_enter_recvmsg"]),
    (
        "sys_exit_recv",
        &[
            "sys_exit_read",
            "sys_exit_recvfrom",
            "sys_exit_readv",
            "sys_exit_recvmsg",
        ],
    ),
    ("sys_enter_close", &["sys_enter_close"]),
    ("sys_enter_mmap", &["sys_enter_mmap"]),
];

pub struct Probes {
    ebpf: Ebpf,
    set: ProbeSet,
}

/// Per-program counters summed over CPUs.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ProgStats {
    pub program: &'static str,
    pub hits: u64,
    pub events: u64,
    pub lost: u64,
    pub truncated: u64,
    pub read_errors: u64,
    pub skipped: u64,
}

fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let st = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .context("mounting tracefs")?;
    if !st.success() {
        bail!("tracefs is not mounted and `mount -t tracefs nodev /sys/kernel/tracing` failed");
    }
    Ok(())
}

impl Probes {
    pub fn load(
        set: ProbeSet,
        capture_plaintext: bool,
        filter_cgroups: bool,
        skip_responses: bool,
    ) -> Result<Self> {
        raise_memlock();
        ensure_tracefs()?;
        let offsets = btf::kernel_offsets()?;
        let config = ProbeConfig {
            self_tgid: std::process::id(),
            capture_plaintext: capture_plaintext as u32,
            filter_cgroups: filter_cgroups as u32,
            skip_responses: skip_responses as u32,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("CONFIG", &config, true)
            .override_global("GO_OFFSETS", &GoOffsets::GO1_17, true)
            .load(OBJECT)
            .map_err(|e| explain_permission(anyhow::Error::from(e)))
            .context("loading the eBPF object")?;
        let exec: &mut TracePoint = ebpf
            .program_mut("sched_process_exec")
            .context("exec program missing")?
            .try_into()?;
        exec.load().context("loading sched_process_exec")?;
        exec.attach("sched", "sched_process_exec")
            .context("attaching sched:sched_process_exec")?;
        let exit: &mut TracePoint = ebpf
            .program_mut("sched_process_exit")
            .context("exit program missing")?
            .try_into()?;
        exit.load().context("loading sched_process_exit")?;
        exit.attach("sched", "sched_process_exit")
            .context("attaching sched:sched_process_exit")?;
        for (prog, tps) in TRACEPOINTS {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the object"))?
                .try_into()?;
            p.load()
                .map_err(|e| explain_permission(e.into()))
                .with_context(|| format!("loading {prog}"))?;
            for tp in *tps {
                p.attach("syscalls", tp)
                    .with_context(|| format!("attaching {prog} to syscalls:{tp}"))?;
            }
        }
        // Every uprobe in the object is loaded (cheap); which ones attach depends on `set`
        // and on the library each target uses.
        for (name, prog) in ebpf.programs_mut() {
            if let aya::programs::Program::UProbe(p) = prog {
                p.load().with_context(|| format!("loading {name}"))?;
            }
        }
        info!(probes = ?set, tracepoints = TRACEPOINTS.len(), "kernel programs loaded");
        Ok(Self { ebpf, set })
    }

    /// Attaches each point at its file offset in `path` (all processes that map the file);
    /// read-side points only with `ProbeSet::Full`. All or nothing: on an error the points
    /// attached so far are detached again.
    pub fn attach_points(&mut self, path: &Path, points: &[target::Point]) -> Result<Vec<Link>> {
        let mut links = Vec::new();
        for p in points {
            if p.read_side && self.set != ProbeSet::Full {
                continue;
            }
            let r = self
                .uprobe(p.program)
                .and_then(|prog| {
                    Ok(prog.attach(
                        UProbeAttachLocation::AbsoluteOffset(p.offset),
                        path,
                        UProbeScope::AllProcesses,
                    )?)
                })
                .with_context(|| format!("attaching {} to {}", p.program, p.symbol));
            match r {
                Ok(id) => links.push(Link {
                    program: p.program,
                    id,
                }),
                Err(e) => {
                    self.detach(links);
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    /// Detaches off the capture loop: the kernel unregisters a uprobe only after an RCU grace
    /// period (about half a second measured here), and events must not wait meanwhile.
    pub fn detach(&mut self, links: Vec<Link>) {
        let mut owned = Vec::with_capacity(links.len());
        for l in links {
            match self.uprobe(l.program).and_then(|p| Ok(p.take_link(l.id)?)) {
                Ok(link) => owned.push(link),
                Err(e) => warn!(program = l.program, error = %format!("{e:#}"), "detaching"),
            }
        }
        std::thread::spawn(move || {
            use aya::programs::links::Link as _;
            let t0 = std::time::Instant::now();
            for link in owned {
                if let Err(e) = link.detach() {
                    warn!(error = %e, "detaching");
                }
            }
            tracing::debug!(took = ?t0.elapsed(), "uprobes detached");
        });
    }

    pub fn probe_set(&self) -> ProbeSet {
        self.set
    }

    fn uprobe(&mut self, name: &str) -> Result<&mut UProbe> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?)
    }

    /// Replaces the set of selected cgroup ids (with `filter_cgroups`).
    pub fn select_cgroups(&mut self, ids: &HashSet<u64>) -> Result<()> {
        let mut map: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("CGROUPS")
                .context("CGROUPS map missing")?,
        )?;
        let old: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for id in ids {
            map.insert(id, 1, 0)?;
        }
        for id in old.into_iter().filter(|i| !ids.contains(i)) {
            let _ = map.remove(&id);
        }
        Ok(())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn stats(&self) -> Result<Vec<ProgStats>> {
        Ok(self
            .stats_per_cpu()?
            .iter()
            .map(ProgCpuStats::total)
            .collect())
    }

    /// Per-program counters as each CPU holds them (index = CPU number).
    pub fn stats_per_cpu(&self) -> Result<Vec<ProgCpuStats>> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("STATS map missing")?)?;
        let mut out = Vec::new();
        for prog in 0..PROG_COUNT {
            let mut cpus: Vec<[u64; STAT_COUNT as usize]> = Vec::new();
            for s in 0..STAT_COUNT {
                let values = arr.get(&(prog * STAT_COUNT + s), 0)?;
                if cpus.len() < values.len() {
                    cpus.resize(values.len(), [0; STAT_COUNT as usize]);
                }
                for (cpu, v) in values.iter().enumerate() {
                    cpus[cpu][s as usize] = *v;
                }
            }
            out.push(ProgCpuStats {
                program: PROG_NAMES[prog as usize],
                cpus,
            });
        }
        Ok(out)
    }

    /// Run count and run time of every loaded program (its name in the object), as the
    /// kernel keeps them while BPF statistics are enabled (`kernel.bpf_stats_enabled`).
    pub fn program_runs(&self) -> Vec<ProgramRuns> {
        let mut runs: Vec<ProgramRuns> = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramRuns {
                    program: name.to_string(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect();
        runs.sort_by(|a, b| a.program.cmp(&b.program));
        runs
    }
}

/// Empty programs at `points` of `path` (file offset, whether a uretprobe) and on every
/// tracepoint the monitor attaches: the cost of the traps alone, for the bench's floors.
/// Attached while the returned object lives.
pub fn attach_floor(path: &Path, points: &[(u64, bool)]) -> Result<Ebpf> {
    raise_memlock();
    ensure_tracefs()?;
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| explain_permission(anyhow::Error::from(e)))
        .context("loading the eBPF object")?;
    let tp: &mut TracePoint = ebpf
        .program_mut("floor_tracepoint")
        .context("floor_tracepoint missing")?
        .try_into()?;
    tp.load()?;
    tp.attach("sched", "sched_process_exec")?;
    tp.attach("sched", "sched_process_exit")?;
    for (_, tps) in TRACEPOINTS {
        for t in *tps {
            tp.attach("syscalls", t)
                .with_context(|| format!("attaching syscalls:{t}"))?;
        }
    }
    for (prog, ret) in [("floor_uprobe", false), ("floor_uretprobe", true)] {
        let p: &mut UProbe = ebpf
            .program_mut(prog)
            .with_context(|| format!("{prog} missing"))?
            .try_into()?;
        p.load()?;
        for &(offset, _) in points.iter().filter(|(_, r)| *r == ret) {
            p.attach(
                UProbeAttachLocation::AbsoluteOffset(offset),
                path,
                UProbeScope::AllProcesses,
            )
            .with_context(|| format!("attaching {prog} at {offset:#x}"))?;
        }
    }
    Ok(ebpf)
}

/// One program's counters per CPU, `[stat; STAT_COUNT]` for each CPU.
#[derive(Debug, Default, Clone)]
pub struct ProgCpuStats {
    pub program: &'static str,
    pub cpus: Vec<[u64; STAT_COUNT as usize]>,
}

impl ProgCpuStats {
    /// Summed over CPUs.
    pub fn total(&self) -> ProgStats {
        let sum = |s: u32| self.cpus.iter().map(|c| c[s as usize]).sum();
        ProgStats {
            program: self.program,
            hits: sum(STAT_HITS),
            events: sum(STAT_EVENTS),
            lost: sum(STAT_LOST),
            truncated: sum(STAT_TRUNCATED),
            read_errors: sum(STAT_READ_ERRORS),
            skipped: sum(STAT_SKIPPED),
        }
    }
}

/// `bpf_prog_info` run statistics of one loaded program.
#[derive(Debug, Clone)]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

/// Names the capability that is missing instead of a bare EPERM.
fn explain_permission(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        e.context(
            "permission denied: run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE",
        )
    } else {
        e
    }
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("cannot raise RLIMIT_MEMLOCK");
    }
}

/// Capabilities this process has (effective set), for clear messages: the kernel only ever
/// says EPERM/EACCES.
#[derive(Debug, Clone, Copy)]
pub struct Caps(u64);

impl Caps {
    pub const DAC_READ_SEARCH: u32 = 2;
    pub const SYS_PTRACE: u32 = 19;
    pub const SYS_ADMIN: u32 = 21;
    pub const SYS_RESOURCE: u32 = 24;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;

    pub fn current() -> Caps {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Caps(
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0),
        )
    }

    pub fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }
}

/// Whether this process may load and attach the programs at all, naming what is missing;
/// warns about what only limits coverage.
pub fn check_privileges() -> Result<Caps> {
    let caps = Caps::current();
    if !caps.has(Caps::SYS_ADMIN) {
        let missing: Vec<&str> = [(Caps::BPF, "CAP_BPF"), (Caps::PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(c, _)| !caps.has(*c))
            .map(|(_, n)| n)
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing {}: the kernel programs cannot be loaded or attached; run as root or \
                 grant CAP_BPF and CAP_PERFMON (see README, Requirements)",
                missing.join(" and ")
            );
        }
    }
    if !caps.has(Caps::SYS_PTRACE) {
        warn!(
            "no CAP_SYS_PTRACE: programs and libraries of other users' processes cannot be \
             inspected (/proc/<pid>/maps), so their TLS is not attached"
        );
    }
    Ok(caps)
}

/// Why a uprobe could not be created, when the reason is a capability.
pub fn uprobe_permission_hint(caps: Caps, error: &str) -> Option<&'static str> {
    let denied = error.contains("Permission denied") || error.contains("Operation not permitted");
    (denied && !caps.has(Caps::SYS_ADMIN)).then_some(
        "creating uprobes needs CAP_SYS_ADMIN on this kernel (Linux requires it for the perf \
         uprobe PMU since the 2025 fix to c9e0924e5c2b): TLS libraries are not attached, only \
         plaintext TCP is captured; grant CAP_SYS_ADMIN for TLS",
    )
}
