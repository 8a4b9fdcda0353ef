//! Loads the kernel programs, attaches them, and reads their counters.

pub mod btf;
pub mod golang;
pub mod libs;

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use monitor_common::{GoOffsets, PROG_COUNT, PROG_NAMES, ProbeConfig, STAT_COUNT, STAT_LOST};
use serde::Serialize;
use tracing::{info, warn};

use self::{golang::GoTls, libs::LibFile};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor.bpf.o"));

/// Which probes to attach. Each uprobe hit traps into the kernel (several µs on a VM), so the
/// choice is a cost/coverage trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeSet {
    /// SSL_write/SSL_write_ex entry and SSL_read/SSL_read_ex entry+return: both sides of
    /// every TLS connection (servers see the requests they receive).
    Full,
    /// SSL_write/SSL_write_ex entry only: credentials travel in requests, so where every
    /// client is monitored the sending side suffices, at well under half the uprobe hits.
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
];

pub struct Probes {
    ebpf: Ebpf,
    set: ProbeSet,
    attached: HashSet<(u64, u64)>,
    /// Go executables with probes, by (device, inode), with their links (for detaching).
    go_links: HashMap<(u64, u64), Vec<(&'static str, UProbeLinkId)>>,
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
        Ok(Self {
            ebpf,
            set,
            attached: HashSet::new(),
            go_links: HashMap::new(),
        })
    }

    /// Attaches the OpenSSL probes to each library not attached yet; returns how many were new.
    pub fn attach_openssl(&mut self, libs: &[LibFile]) -> usize {
        let mut n = 0;
        for lib in libs {
            if self.attached.contains(&lib.id) {
                continue;
            }
            match self.attach_one(&lib.path) {
                Ok(points) => {
                    info!(library = %lib.path.display(), points, "attached OpenSSL probes");
                    n += 1;
                }
                Err(e) => {
                    warn!(library = %lib.path.display(), error = %format!("{e:#}"), "cannot attach")
                }
            }
            // Do not retry a file that failed: its symbols will not appear later.
            self.attached.insert(lib.id);
        }
        n
    }

    fn attach_one(&mut self, path: &Path) -> Result<usize> {
        let mut points = 0;
        let mut plan: Vec<(&str, &str)> =
            vec![("ssl_write", "SSL_write"), ("ssl_write", "SSL_write_ex")];
        if self.set == ProbeSet::Full {
            plan.extend([
                ("ssl_read", "SSL_read"),
                ("ssl_read_ex", "SSL_read_ex"),
                ("ssl_read_ret", "SSL_read"),
                ("ssl_read_ret", "SSL_read_ex"),
            ]);
        }
        for (prog, sym) in plan {
            let p: &mut UProbe = self
                .ebpf
                .program_mut(prog)
                .context("uprobe missing")?
                .try_into()?;
            match p.attach(sym, path, UProbeScope::AllProcesses) {
                Ok(_) => points += 1,
                // SSL_write_ex/SSL_read_ex arrived in OpenSSL 1.1.1; older copies lack them.
                Err(e) if sym.ends_with("_ex") => {
                    tracing::debug!(symbol = sym, error = %e, "symbol not attached")
                }
                Err(e) => return Err(e).with_context(|| format!("attaching {prog} to {sym}")),
            }
        }
        Ok(points)
    }

    pub fn attached_libraries(&self) -> usize {
        self.attached.len()
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
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("STATS map missing")?)?;
        let mut out = Vec::new();
        for prog in 0..PROG_COUNT {
            let mut v = [0u64; STAT_COUNT as usize];
            for (s, slot) in v.iter_mut().enumerate() {
                *slot = arr.get(&(prog * STAT_COUNT + s as u32), 0)?.iter().sum();
            }
            out.push(ProgStats {
                program: PROG_NAMES[prog as usize],
                hits: v[0],
                events: v[1],
                lost: v[STAT_LOST as usize],
                truncated: v[3],
                read_errors: v[4],
                skipped: v[5],
            });
        }
        Ok(out)
    }

    /// Attaches the Go crypto/tls probes to one executable (`id` its device and inode):
    /// Write's entry, and with `ProbeSet::Full` Read's entry and every RET of Read. All or
    /// nothing: a Read entry without its returns would only fill the kernel's map.
    pub fn attach_go(&mut self, path: &Path, id: (u64, u64), go: &GoTls) -> Result<usize> {
        if self.go_links.contains_key(&id) {
            return Ok(0);
        }
        let mut plan = vec![("go_tls_write", go.write)];
        if self.set == ProbeSet::Full {
            plan.push(("go_tls_read", go.read));
            plan.extend(go.read_rets.iter().map(|&r| ("go_tls_read_ret", r)));
        }
        let mut links = Vec::with_capacity(plan.len());
        let mut failed = None;
        for (prog, offset) in plan {
            let p: &mut UProbe = self
                .ebpf
                .program_mut(prog)
                .context("uprobe missing")?
                .try_into()?;
            match p.attach(offset, path, UProbeScope::AllProcesses) {
                Ok(link) => links.push((prog, link)),
                Err(e) => {
                    failed = Some(anyhow::Error::from(e).context(format!(
                        "attaching {prog} at {offset:#x} of {}",
                        path.display()
                    )));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for (prog, link) in links {
                if let Ok(p) = <&mut UProbe>::try_from(self.ebpf.program_mut(prog).unwrap()) {
                    let _ = p.detach(link);
                }
            }
            // Not retried: the same file would fail the same way.
            self.go_links.insert(id, Vec::new());
            return Err(e);
        }
        let n = links.len();
        info!(exe = %path.display(), points = n, go = go.go_version.as_deref().unwrap_or("unknown"), "attached Go crypto/tls probes");
        self.go_links.insert(id, links);
        Ok(n)
    }

    /// Go executables with probes attached.
    pub fn attached_go_programs(&self) -> usize {
        self.go_links.values().filter(|l| !l.is_empty()).count()
    }
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

/// Whether this process may load BPF programs at all (for a clear message up front).
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    if eff & CAP_SYS_ADMIN == 0 && eff & (CAP_BPF | CAP_PERFMON) != CAP_BPF | CAP_PERFMON {
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(b, _)| eff & b == 0)
            .map(|(_, n)| n)
            .collect();
        bail!(
            "missing {}: run as root or grant them (see README, Requirements)",
            missing.join(" and ")
        );
    }
    Ok(())
}
