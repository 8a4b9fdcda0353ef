//! `monitor run`: load, attach, drain the ring buffer, print one JSON line per request.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use clap::Args;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use monitor::{
    credential::Fingerprinter,
    event::{Event, Kind, wipe},
    identity::{
        self, Identity,
        kube::{self, KubeConfig, PodCache},
    },
    pipeline::{self, Pipeline, RequestRecord},
    probe::{self, ProbeSet, Probes, attacher::Attacher},
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Fingerprint key (hex); created with a random key, mode 0600, if missing.
    #[arg(long, env = "MONITOR_KEY_FILE", default_value = monitor::DEFAULT_KEY_FILE)]
    pub key_file: PathBuf,
    /// Which TLS probes to attach: `full` sees both sides, `egress` only senders (cheaper).
    #[arg(long, value_enum, default_value_t = ProbeSet::Full)]
    pub probes: ProbeSet,
    /// Do not send HTTP responses up from the kernel (default with `--probes egress`):
    /// credentials travel in requests; response status codes are then not reported.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_responses: Option<bool>,
    /// Do not capture plaintext (non-TLS) TCP traffic.
    #[arg(long)]
    pub no_plaintext: bool,
    /// Also look at every process's mappings for TLS libraries and programs every N seconds
    /// (0: never). A safety net only: they are attached as they are executed or mapped.
    #[arg(long, default_value_t = 0)]
    pub rescan_secs: u64,
    /// Seconds a program or library (other than the host's own TLS libraries) stays attached
    /// after the last process using it has gone.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub detach_after: u64,
    /// Also write every captured event to FILE (JSON lines, for `monitor replay`).
    /// WARNING: the file holds captured PLAINTEXT, credentials included; it is created 0600.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Watch only these cgroups (v2 paths such as `/kubepods.slice/...` or
    /// `/system.slice/nginx.service`) and their descendants; repeatable. Other processes still
    /// trap into TLS probes but the programs return at once.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Node name carried in events and records (default: the host name).
    #[arg(long, env = "MONITOR_NODE")]
    pub node: Option<String>,
    /// Serve Prometheus metrics (`/metrics`) and readiness (`/ready`: 200 once every probe
    /// is attached) on this address, e.g. 127.0.0.1:9464. Off unless given.
    #[arg(long, env = "MONITOR_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Have the kernel count runs and run time of the BPF programs while the monitor runs
    /// (`monitor_program_runs_total`, `monitor_program_run_seconds_total`); costs some
    /// nanoseconds per program run. Already on if `kernel.bpf_stats_enabled` is 1.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Kubernetes API server whose pods of `--node` name the containers (e.g.
    /// `http://127.0.0.1:8001` through `kubectl proxy`). Default: the in-cluster API when
    /// `KUBERNETES_SERVICE_HOST` is set, with the pod's service account.
    #[arg(long, env = "MONITOR_KUBE_API", value_name = "URL")]
    pub kube_api: Option<String>,
    /// Bearer token for `--kube-api` (re-read before each request: tokens rotate).
    #[arg(long, env = "MONITOR_KUBE_TOKEN_FILE", value_name = "PATH")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle (PEM) for an https `--kube-api`.
    #[arg(long, env = "MONITOR_KUBE_CA_FILE", value_name = "PATH")]
    pub kube_ca_file: Option<PathBuf>,
    /// Do not ask the Kubernetes API even in a cluster: process identity only.
    #[arg(long)]
    pub no_kube: bool,
    #[command(flatten)]
    pub detect: crate::outputs::DetectArgs,
}

/// The pod cache and its watcher, if a cluster is configured; said once either way.
fn start_kube(args: &RunArgs, node: &str) -> Result<Option<std::sync::Arc<PodCache>>> {
    let cfg = if args.no_kube {
        None
    } else if let Some(api) = &args.kube_api {
        let mut c = KubeConfig::new(api, node);
        c.token_file = args.kube_token_file.clone();
        c.ca_file = args.kube_ca_file.clone();
        Some(c)
    } else {
        KubeConfig::in_cluster(node).map(|mut c| {
            if args.kube_token_file.is_some() {
                c.token_file = args.kube_token_file.clone();
            }
            if args.kube_ca_file.is_some() {
                c.ca_file = args.kube_ca_file.clone();
            }
            c
        })
    };
    let Some(cfg) = cfg else {
        info!(
            "no Kubernetes API configured: workloads are named by process identity (cgroup, systemd unit, executable)"
        );
        return Ok(None);
    };
    info!(api = %cfg.api_for_logs(), node, "resolving containers to pods through the Kubernetes API");
    let cache = PodCache::new();
    kube::spawn(cfg, cache.clone())?;
    Ok(Some(cache))
}

/// What `/metrics` and `/ready` answer, refreshed by the capture loop.
#[derive(Default)]
struct Exposed {
    text: String,
    ready: bool,
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    exposed: std::sync::Arc<std::sync::Mutex<Exposed>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Said at most once a minute, with the number of failed accepts since.
    let mut last_warn: Option<std::time::Instant> = None;
    let mut starved = 0u64;
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            // Out of fds (or memory): the connection stays in the backlog and the listener
            // stays readable, so retrying at once would spin. Wait for fds to come back.
            Err(e) if accept_starved(&e) => {
                starved += 1;
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    last_warn = Some(std::time::Instant::now());
                    warn!(error = %e, failed = std::mem::take(&mut starved), "metrics: cannot accept connections; retrying every 100 ms");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            // The peer gave up before the accept (ECONNABORTED and the like).
            Err(_) => continue,
        };
        let exposed = exposed.clone();
        tokio::spawn(async move {
            // The whole head (a request may arrive in pieces; unread bytes left at close
            // would reset the connection and lose the answer), at most 4 KiB, within 5 s.
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 4096 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let (status, ctype, body) = {
                let e = exposed.lock().unwrap_or_else(|p| p.into_inner());
                if line.starts_with("GET /metrics") {
                    ("200 OK", monitor::metrics::CONTENT_TYPE, e.text.clone())
                } else if line.starts_with("GET /ready") {
                    if e.ready {
                        ("200 OK", "text/plain", "ready\n".into())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            "not ready\n".into(),
                        )
                    }
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics or /ready\n".into(),
                    )
                }
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

fn accept_starved(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The counters of every component, for `/metrics`.
fn metrics_text(
    ctx: &Ctx,
    outputs: &crate::outputs::Outputs,
    ring: Option<&mut monitor::metrics::RingUsage>,
    pods: Option<&PodCache>,
) -> String {
    let mut s = monitor::metrics::Snapshot::new();
    s.ready = true;
    match ctx.probes.stats_per_cpu() {
        Ok(p) => s.probes = p,
        Err(e) => warn!(error = %format!("{e:#}"), "reading the kernel counters"),
    }
    s.bpf_stats_enabled |= ctx.bpf_stats_held;
    if s.bpf_stats_enabled {
        s.program_runs = ctx.probes.program_runs();
    }
    s.ring = ring.map(|r| r.snapshot());
    s.decode_errors = ctx.decode_errors;
    s.record = ctx.recorder.as_ref().map(|r| r.stats.clone());
    s.attach = ctx.attacher.stats.clone();
    s.pipeline = ctx.pipe.stats.clone();
    s.identity = ctx.identity.stats;
    s.kube = pods.map(PodCache::stats);
    outputs.fill_metrics(&mut s);
    monitor::metrics::render(s)
}

/// The event log: plaintext on disk, so owner-only and announced loudly. Best effort: a
/// failed write (full disk) drops that batch from the log, is warned about once per kind of
/// error and counted, and capturing goes on.
pub struct Recorder {
    file: std::fs::File,
    path: PathBuf,
    /// Lines not yet written, and how many events they hold.
    buf: zeroize::Zeroizing<Vec<u8>>,
    buffered: u64,
    /// A write failed, perhaps part-way through a line: the next write starts a new line,
    /// so the log stays one event per line (replay skips the broken one).
    broken: bool,
    pub stats: monitor::event::LogWriteStats,
}

/// Bytes gathered before they are written (also written at the end of every drain).
const RECORD_BATCH: usize = 256 * 1024;

impl Recorder {
    pub fn create(path: &std::path::Path) -> Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        // An existing file keeps its mode on open: force 0600.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        warn!(path = %path.display(), "recording captured plaintext, credentials included: protect and delete this file");
        Ok(Recorder {
            file: f,
            path: path.to_path_buf(),
            buf: zeroize::Zeroizing::new(Vec::with_capacity(RECORD_BATCH + 8192)),
            buffered: 0,
            broken: false,
            stats: Default::default(),
        })
    }

    pub fn write(&mut self, ev: &Event) {
        if self.broken && self.buf.is_empty() {
            self.buf.push(b'\n');
        }
        // Serialising an event to memory cannot fail (string keys, no maps of other keys).
        if serde_json::to_writer(&mut *self.buf, ev).is_ok() {
            self.buf.push(b'\n');
            self.buffered += 1;
        }
        if self.buf.len() >= RECORD_BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                self.stats.events += self.buffered;
                if self.broken {
                    self.broken = false;
                    info!(path = %self.path.display(), dropped = self.stats.dropped, "event log written again");
                }
            }
            Err(e) => {
                let kind = format!("{:?}", e.kind());
                let n = self.stats.errors.entry(kind).or_default();
                *n += 1;
                if *n == 1 {
                    warn!(path = %self.path.display(), error = %e, "event log write failed: the log misses events from here on while it does (counted in monitor_record_dropped_events_total); capturing goes on");
                }
                self.stats.dropped += self.buffered;
                self.broken = true;
            }
        }
        wipe(&mut self.buf);
        self.buffered = 0;
    }
}

/// Keeps the kernel's cgroup filter in step with the selected cgroups' descendants. A walk
/// that fails (cgroupfs unreadable, no fd left) keeps the set in force: pushing what it
/// found would delete ids the programs still need, and they would see nothing.
#[derive(Default)]
struct CgroupRefresh {
    failing: bool,
}

impl CgroupRefresh {
    fn refresh(&mut self, probes: &mut Probes, paths: &[String]) {
        let r = identity::cgroup_ids_under(paths)
            .map_err(anyhow::Error::from)
            .and_then(|ids| probes.select_cgroups(&ids));
        match r {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    info!("cgroup selection refreshed again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(error = %format!("{e:#}"), "cannot refresh the selected cgroups; keeping the last set (new cgroups are not watched until this recovers)");
                }
            }
        }
    }
}

/// Time from the kernel event that completed a request to its record being written,
/// sampled for the exit summary (bounded: at most `MAX_SAMPLES` kept).
#[derive(Default)]
struct Latency {
    samples: Vec<u32>,
    seen: u64,
}

const MAX_SAMPLES: usize = 1 << 20;

impl Latency {
    fn observe(&mut self, recs: &[RequestRecord]) {
        if recs.is_empty() {
            return;
        }
        let now = pipeline::monotonic_ns();
        for r in recs {
            self.seen += 1;
            let us = (now.saturating_sub(r.ts_ns) / 1000).min(u32::MAX as u64) as u32;
            if self.samples.len() < MAX_SAMPLES {
                self.samples.push(us);
            } else {
                // Reservoir sampling keeps the distribution of the whole run.
                let j = (self.seen.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.seen) as usize;
                if j < MAX_SAMPLES {
                    self.samples[j] = us;
                }
            }
        }
    }

    fn summary(&mut self) -> serde_json::Value {
        self.samples.sort_unstable();
        let q = |p: f64| -> u32 {
            if self.samples.is_empty() {
                return 0;
            }
            self.samples[((self.samples.len() - 1) as f64 * p) as usize]
        };
        serde_json::json!({"records": self.seen, "p50_us": q(0.5), "p99_us": q(0.99), "max_us": q(1.0)})
    }
}

fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Everything one ring buffer record goes through, in order.
struct Ctx {
    probes: Probes,
    attacher: Attacher,
    pipe: Pipeline,
    identity: Identity,
    boot_offset: i128,
    node: String,
    recorder: Option<Recorder>,
    decode_errors: u64,
    /// The daemon holds a `BPF_ENABLE_STATS` fd: the kernel counts runs although the sysctl,
    /// which reflects only its own setting, still reads 0.
    bpf_stats_held: bool,
}

fn drain(rb: &mut RingBuf<MapData>, ctx: &mut Ctx, recs: &mut Vec<RequestRecord>) -> Result<()> {
    while let Some(item) = rb.next() {
        match Event::decode(&item) {
            Ok(mut ev) => {
                // Arrivals and departures of programs and libraries: attach before their
                // first TLS call, detach when nobody uses them.
                match ev.kind {
                    Kind::Mmap => {
                        ctx.attacher
                            .on_mmap(&mut ctx.probes, ev.tgid, ev.fd, &ev.data, ev.ts_ns);
                        continue;
                    }
                    Kind::Exit => {
                        ctx.attacher.on_exit(&mut ctx.probes, ev.tgid);
                        continue;
                    }
                    Kind::Exec => ctx.attacher.on_exec(&mut ctx.probes, ev.tgid, ev.ts_ns),
                    _ => {}
                }
                ctx.identity.enrich(&mut ev, ctx.boot_offset, &ctx.node);
                if let Some(r) = ctx.recorder.as_mut() {
                    r.write(&ev);
                }
                ctx.pipe.handle(ev, recs);
            }
            Err(e) => {
                ctx.decode_errors += 1;
                warn!(error = %e, "undecodable ring buffer record");
            }
        }
    }
    // Verdicts on the files that arrived: a new program is attached as soon as its verdict is in.
    ctx.attacher.collect(&mut ctx.probes);
    if let Some(r) = ctx.recorder.as_mut() {
        r.flush();
    }
    Ok(())
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Rules first: broken rules stop the daemon before anything is attached.
    let node = args.node.clone().unwrap_or_else(identity::hostname);
    let mut outputs = crate::outputs::Outputs::new(&args.detect, &node, true)?;
    let caps = probe::check_privileges()?;
    let fp = Fingerprinter::load_or_create(&args.key_file)?;
    let skip_responses = args
        .skip_responses
        .unwrap_or(args.probes == ProbeSet::Egress);
    let mut probes = Probes::load(
        args.probes,
        !args.no_plaintext,
        !args.cgroups.is_empty(),
        skip_responses,
    )?;
    if !args.cgroups.is_empty() {
        let ids =
            identity::cgroup_ids_under(&args.cgroups).context("listing the --cgroup cgroups")?;
        if ids.is_empty() {
            anyhow::bail!("none of the --cgroup paths exist: {:?}", args.cgroups);
        }
        probes.select_cgroups(&ids)?;
        info!(cgroups = ids.len(), "watching only the selected cgroups");
    }
    let mut attacher = Attacher::new(caps, Duration::from_secs(args.detach_after))
        .context("starting the file inspection worker")?;
    attacher.attach_existing(&mut probes);
    if attacher.attached_files() == 0 {
        warn!("no TLS library or program found yet: they are attached as they start");
    }
    // SAFETY: the ring buffer map is owned by the AsyncFd, so its fd outlives the registration.
    let mut ring =
        unsafe { AsyncFd::register(probes.take_events()?) }.context("polling the ring buffer")?;
    let mut ring_usage = if args.metrics_addr.is_some() {
        use std::os::fd::AsFd;
        monitor::metrics::RingUsage::new(ring.get_ref().as_fd())
            .inspect_err(|e| warn!(error = %e, "ring buffer usage not measured"))
            .ok()
    } else {
        None
    };
    // Kept while running: the kernel counts program runs as long as one such fd is open.
    let _bpf_stats = if args.bpf_stats {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .inspect_err(|e| warn!(error = %e, "BPF run statistics not enabled"))
            .ok()
    } else {
        None
    };
    let pods = start_kube(&args, &node)?;
    let mut ctx = Ctx {
        probes,
        attacher,
        pipe: Pipeline::new(fp),
        identity: match &pods {
            Some(p) => Identity::new().with_pods(p.clone()),
            None => Identity::new(),
        },
        boot_offset: pipeline::boot_offset_ns(),
        node,
        recorder: args.record.as_deref().map(Recorder::create).transpose()?,
        decode_errors: 0,
        bpf_stats_held: _bpf_stats.is_some(),
    };
    ctx.identity.seed_running();

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut drain_tick = tokio::time::interval(Duration::from_millis(5));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(Duration::from_secs(args.rescan_secs.max(1)));
    let mut cgroup_tick = tokio::time::interval(Duration::from_secs(2));
    let mut cgroups = CgroupRefresh::default();
    let mut sighup = signal(SignalKind::hangup())?;
    let mut recs = Vec::new();
    let mut latency = Latency::default();
    // Until the loop's first snapshot: valid text with `monitor_ready 0`.
    let exposed = std::sync::Arc::new(std::sync::Mutex::new(Exposed {
        text: monitor::metrics::render(monitor::metrics::Snapshot::new()),
        ready: false,
    }));
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        info!(%addr, "metrics on /metrics, readiness on /ready");
        tokio::spawn(serve_metrics(listener, exposed.clone()));
    }
    let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
    info!(files = ctx.attacher.attached_files(), "monitor ready");

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                if let Some(u) = ring_usage.as_mut() {
                    u.observe();
                }
                drain(guard.get_inner_mut(), &mut ctx, &mut recs)?;
                guard.clear_ready();
                latency.observe(&recs);
                outputs.write(&mut recs);
            }
            // The kernel wakes us only when a lot is waiting: drain on a short timer too.
            _ = drain_tick.tick() => {
                if let Some(u) = ring_usage.as_mut() {
                    u.observe();
                }
                drain(ring.get_mut(), &mut ctx, &mut recs)?;
                latency.observe(&recs);
                outputs.write(&mut recs);
            }
            _ = tick.tick() => {
                ctx.pipe.flush(pipeline::monotonic_ns(), &mut recs);
                ctx.attacher.sweep(&mut ctx.probes, std::time::Instant::now());
                outputs.write(&mut recs);
                outputs.tick(wall_clock_ns());
            }
            _ = rescan.tick(), if args.rescan_secs > 0 => {
                ctx.attacher.rescan(&mut ctx.probes);
            }
            // New cgroups under the selected ones (a pod's new container).
            _ = cgroup_tick.tick(), if !args.cgroups.is_empty() => {
                cgroups.refresh(&mut ctx.probes, &args.cgroups);
            }
            _ = metrics_tick.tick(), if args.metrics_addr.is_some() => {
                let text = metrics_text(&ctx, &outputs, ring_usage.as_mut(), pods.as_deref());
                let mut e = exposed.lock().unwrap_or_else(|p| p.into_inner());
                e.text = text;
                e.ready = true;
            }
            _ = sighup.recv() => {
                // What happened before the reload is judged by the rules it happened under.
                drain(ring.get_mut(), &mut ctx, &mut recs)?;
                outputs.write(&mut recs);
                outputs.reload();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    // Drain what is already in the ring before detaching.
    drain(ring.get_mut(), &mut ctx, &mut recs)?;
    let Ctx {
        mut pipe,
        decode_errors,
        probes,
        attacher,
        identity,
        mut recorder,
        ..
    } = ctx;
    if let Some(r) = recorder.as_mut() {
        r.flush();
    }
    pipe.flush_all(&mut recs);
    outputs.write(&mut recs);
    let notify = outputs.finish()?;
    let kernel = probes.stats()?;
    let lost: u64 = kernel.iter().map(|s| s.lost).sum();
    let summary = serde_json::json!({
        "events_lost": lost,
        "decode_errors": decode_errors,
        "latency_event_to_record": latency.summary(),
        "kernel": kernel,
        "attach": attacher.stats,
        "pipeline": pipe.stats,
        "detect": outputs.detector.stats,
        "outputs": notify,
        "identity": identity.stats,
        "kube": pods.as_ref().map(|p| p.stats()),
        "record": recorder.as_ref().map(|r| &r.stats),
        "stdout_dropped_lines": outputs.stdout_dropped(),
    });
    info!(summary = %summary, "monitor stopped");
    if lost > 0 {
        warn!(lost, "events were lost: the ring buffer was full");
    }
    drop(probes);
    Ok(())
}
