//! `cargo xtask bench overhead | load`: the monitor on real TLS traffic (nginx + wrk/h2load on
//! loopback), beside the empty-probe floor for the same probes and a bpftrace capture peer.
//! Every figure is a ratio to a baseline measured in the same invocation, in alternating
//! rounds so that noise hits all configurations alike.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum Bench {
    /// Requests/s of TLS keep-alive traffic: bare, empty-probe floor, bpftrace peer, monitor.
    Overhead(OverheadArgs),
    /// Fixed request rates (plaintext and TLS): events lost and event-to-record latency.
    Load(LoadArgs),
    /// Userspace pipeline on a synthetic event log: requests/s on one core, peak RSS.
    Pipeline(PipelineArgs),
}

#[derive(Args)]
pub struct PipelineArgs {
    /// Requests in the generated log.
    #[arg(long, default_value_t = 1_000_000)]
    requests: usize,
    /// Distinct connections they are spread over.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
}

pub fn pipeline(a: PipelineArgs) -> Result<()> {
    crate::run(
        crate::cargo()
            .args([
                "bench",
                "-p",
                "monitor",
                "--bench",
                "pipeline",
                "--",
                "--requests",
            ])
            .arg(a.requests.to_string())
            .arg("--connections")
            .arg(a.connections.to_string()),
    )
}

#[derive(Args)]
pub struct OverheadArgs {
    /// Rounds; each round runs every configuration once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 8)]
    secs: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
}

#[derive(Args)]
pub struct LoadArgs {
    /// Target request rates (requests/s), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    rates: Vec<u32>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 10)]
    secs: u32,
}

const TLS_PORT: u16 = 18443;
const PLAIN_PORT: u16 = 18080;

fn libssl() -> Result<PathBuf> {
    let out = Command::new("ldconfig").arg("-p").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| {
            l.trim_start().starts_with("libssl.so.3") || l.trim_start().starts_with("libssl.so.1.1")
        })
        .and_then(|l| l.split("=> ").nth(1))
        .map(|p| PathBuf::from(p.trim()))
        .context("no libssl in the linker cache")
}

struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start() -> Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().display().to_string();
        crate::run(Command::new("sh").args([
            "-c",
            &format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
                 -subj /CN=bench.test -keyout {d}/key.pem -out {d}/cert.pem 2>/dev/null"
            ),
        ]))?;
        fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
                 events {{ worker_connections 1024; }}
                 http {{ access_log off; keepalive_requests 10000000; client_body_temp_path {d}/body;
                   server {{ listen 127.0.0.1:{TLS_PORT} ssl; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
                            location / {{ return 200 \"ok\\n\"; }} }}
                   server {{ listen 127.0.0.1:{PLAIN_PORT}; location / {{ return 200 \"ok\\n\"; }} }} }}"
            ),
        )?;
        let child = Command::new("nginx")
            .args([
                "-e",
                &format!("{d}/error.log"),
                "-c",
                &format!("{d}/nginx.conf"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", TLS_PORT)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not listen on {TLS_PORT}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Nginx { child, _dir: dir })
    }
}

impl Drop for Nginx {
    /// SIGTERM: the master stops its workers (SIGKILL would orphan them, still listening).
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Something attached while a run goes: a bpftrace script or the monitor. Its output goes
/// to files in /dev/shm (the cheapest sink, the same for every configuration), not through
/// reader threads that would compete with the load for CPU.
struct Attached {
    child: Child,
    dir: tempfile::TempDir,
}

/// Spawns `cmd`, waits until `ready` shows in its stdout or stderr.
fn spawn_until(mut cmd: Command, ready: &str) -> Result<Attached> {
    let dir = tempfile::Builder::new()
        .prefix("monitor-bench")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })?;
    let out = fs::File::create(dir.path().join("stdout"))?;
    let err = fs::File::create(dir.path().join("stderr"))?;
    let mut child = cmd
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = |f: &str| {
        let mut buf = Vec::new();
        let _ = fs::File::open(dir.path().join(f))
            .and_then(|mut h| std::io::Read::read_to_end(&mut h, &mut buf));
        String::from_utf8_lossy(&buf).contains(ready)
    };
    while !seen("stdout") && !seen("stderr") {
        if let Some(st) = child.try_wait()? {
            bail!(
                "{cmd:?} exited ({st}) before it was ready: {}",
                fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{cmd:?} not ready after 60 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Give attach a moment to settle everywhere.
    thread::sleep(Duration::from_millis(500));
    Ok(Attached { child, dir })
}

impl Attached {
    fn cpu_ticks(&self) -> u64 {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGINT, wait, return stderr lines (the monitor's summary is there).
    fn stop(mut self) -> Vec<String> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        fs::read_to_string(self.dir.path().join("stderr"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn monitor_summary(lines: &[String]) -> Value {
    lines
        .iter()
        .find_map(|l| {
            l.split_once("summary=")
                .and_then(|(_, j)| serde_json::from_str(j).ok())
        })
        .unwrap_or(Value::Null)
}

#[derive(Clone, Copy, PartialEq)]
enum Config {
    Bare,
    FloorEntryFull,
    FloorSitesFull,
    Peer,
    MonitorFull,
    FloorEntryEgress,
    FloorSitesEgress,
    MonitorEgress,
}

impl Config {
    const ALL: [Config; 8] = [
        Config::Bare,
        Config::FloorEntryFull,
        Config::FloorSitesFull,
        Config::Peer,
        Config::MonitorFull,
        Config::FloorEntryEgress,
        Config::FloorSitesEgress,
        Config::MonitorEgress,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Bare => "bare",
            Config::FloorEntryFull => "floor-entry-full",
            Config::FloorSitesFull => "floor-sites-full",
            Config::Peer => "bpftrace-sslsniff",
            Config::MonitorFull => "monitor-full",
            Config::FloorEntryEgress => "floor-entry-egress",
            Config::FloorSitesEgress => "floor-sites-egress",
            Config::MonitorEgress => "monitor-egress",
        }
    }

    fn is_monitor(self) -> bool {
        matches!(self, Config::MonitorFull | Config::MonitorEgress)
    }

    /// The floor of the same probe set at the chosen sites, and at the functions' entries.
    fn floors(self) -> Option<(Config, Config)> {
        match self {
            Config::MonitorFull | Config::Peer => {
                Some((Config::FloorSitesFull, Config::FloorEntryFull))
            }
            Config::MonitorEgress => Some((Config::FloorSitesEgress, Config::FloorEntryEgress)),
            _ => None,
        }
    }
}

/// sslsniff-style capture: every SSL_write buffer and every SSL_read result, printed.
fn peer_script(lib: &Path) -> String {
    let l = lib.display();
    format!(
        "uprobe:{l}:SSL_write {{ printf(\"W %d %s %d %r\\n\", pid, comm, arg2, buf(arg1, arg2)); }}
         uprobe:{l}:SSL_read {{ @b[tid] = arg1; }}
         uretprobe:{l}:SSL_read /@b[tid] != 0 && (int32)retval > 0/ {{
             printf(\"R %d %s %d %r\\n\", pid, comm, retval, buf(@b[tid], retval)); delete(@b[tid]); }}"
    )
}

/// Where the monitor's metrics are served during its runs (program run times).
const METRICS_PORT: u16 = 18099;

fn attach(cfg: Config, lib: &Path, monitor: &Path, keydir: &Path) -> Result<Option<Attached>> {
    let bpftrace = |script: String| {
        let mut c = Command::new("bpftrace");
        c.env("BPFTRACE_MAX_STRLEN", "200").arg("-e").arg(script);
        spawn_until(c, "Attaching")
    };
    let mon = |set: &str| {
        let mut c = Command::new(monitor);
        c.args(["run", "--probes", set, "--bpf-stats", "--metrics-addr"])
            .arg(format!("127.0.0.1:{METRICS_PORT}"))
            .arg("--key-file")
            .arg(keydir.join("key"))
            .env("MONITOR_LOG", "info");
        spawn_until(c, "monitor ready")
    };
    // Empty programs on the monitor's exact probe set (and its tracepoints), at the entries
    // (where the probes sat before sites were chosen) or at the chosen sites.
    let floor = |at: &str, set: &str| {
        let mut c = Command::new(monitor);
        c.args(["probes", "--explain"])
            .arg(lib)
            .args(["--floor", at, "--probes", set]);
        spawn_until(c, "floor attached")
    };
    Ok(Some(match cfg {
        Config::Bare => return Ok(None),
        Config::FloorEntryFull => floor("entry", "full")?,
        Config::FloorSitesFull => floor("sites", "full")?,
        Config::FloorEntryEgress => floor("entry", "egress")?,
        Config::FloorSitesEgress => floor("sites", "egress")?,
        Config::Peer => bpftrace(peer_script(lib))?,
        Config::MonitorFull => mon("full")?,
        Config::MonitorEgress => mon("egress")?,
    }))
}

/// (requests/s, requests) of one wrk run.
fn wrk(secs: u32, connections: u32) -> Result<(f64, u64)> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s")])
        .args(["-H", "Authorization: Bearer bench-token-not-secret"])
        .arg(format!("https://127.0.0.1:{TLS_PORT}/"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    // "  123456 requests in 8.00s, ..."
    let n = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    Ok((rps, n))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// (max - min) / median, as a percentage.
fn spread(v: &[f64]) -> f64 {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    if v.is_empty() {
        0.0
    } else {
        (hi - lo) / median(v) * 100.0
    }
}

fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(c, _)| !crate::have(c))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    crate::apt_install(&missing)
}

fn monitor_binary() -> Result<PathBuf> {
    crate::run(crate::cargo().args(["build", "--release", "-p", "monitor"]))?;
    Ok(crate::root().join("target/release/monitor"))
}

/// Per-call run time (ns) of each TLS program that ran, from the monitor's metrics (kernel
/// BPF statistics): (program, runs, ns per run).
fn tls_program_runs() -> Result<Vec<(String, f64, f64)>> {
    let body = crate::clickhouse::http_get(METRICS_PORT, "/metrics")?;
    let series = |family: &str| -> Vec<(String, f64)> {
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(family)?.strip_prefix("{program=\"")?;
                let (prog, v) = rest.split_once("\"} ")?;
                Some((prog.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    };
    let secs = series("monitor_program_run_seconds_total");
    Ok(series("monitor_program_runs_total")
        .into_iter()
        .filter(|(p, n)| (p.starts_with("ssl_") || p.starts_with("gnutls_")) && *n > 0.0)
        .map(|(p, n)| {
            let s = secs.iter().find(|(q, _)| *q == p).map_or(0.0, |x| x.1);
            (p, n, s * 1e9 / n)
        })
        .collect())
}

pub fn overhead(a: OverheadArgs) -> Result<()> {
    ensure_tools(&[
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("bpftrace", "bpftrace"),
        ("openssl", "openssl"),
    ])?;
    let monitor = monitor_binary()?;
    let lib = libssl()?;
    let keydir = tempfile::tempdir()?;
    let _nginx = Nginx::start()?;
    let n = Config::ALL.len();
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut rss = vec![0u64; n];
    let mut lost = vec![0u64; n];
    // Probe hits per request, by program (the monitor's own counters).
    let mut hits: Vec<Vec<(String, f64)>> = vec![Vec::new(); n];
    // Per-call run time by program (ns), each monitor run.
    let mut runs: Vec<Vec<(String, f64, f64)>> = vec![Vec::new(); n];
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    println!(
        "TLS keep-alive, nginx 1 worker + wrk -t1 -c{} on loopback; {} rounds x {} configurations x {} s, in turn",
        a.connections, a.rounds, n, a.secs
    );
    println!("{}", explain_sites(&monitor, &lib)?);
    let header: Vec<String> = Config::ALL
        .iter()
        .map(|c| format!("{:>12.12}", c.name()))
        .collect();
    println!(
        "round {}   (req/s; in brackets: / this round's bare)",
        header.join(" ")
    );
    for round in 0..a.rounds {
        let mut line = Vec::new();
        let mut bare_now = 0.0;
        for (i, cfg) in Config::ALL.iter().enumerate() {
            let att = attach(*cfg, &lib, &monitor, keydir.path())?;
            let c0 = att.as_ref().map_or(0, Attached::cpu_ticks);
            let t0 = Instant::now();
            let (r, requests) = wrk(a.secs, a.connections)?;
            let wall = t0.elapsed().as_secs_f64();
            if let Some(att) = att {
                cpu[i].push((att.cpu_ticks() - c0) as f64 / ticks / wall * 100.0);
                rss[i] = rss[i].max(att.rss_kib());
                if cfg.is_monitor() {
                    runs[i].extend(tls_program_runs()?);
                }
                let lines = att.stop();
                if cfg.is_monitor() {
                    let s = monitor_summary(&lines);
                    lost[i] += s["events_lost"]
                        .as_u64()
                        .context("monitor summary missing")?;
                    if let Some(k) = s["kernel"].as_array() {
                        for p in k {
                            let (Some(name), Some(h)) = (p["program"].as_str(), p["hits"].as_u64())
                            else {
                                continue;
                            };
                            if name.starts_with("ssl_") && h > 0 {
                                hits[i].push((name.to_string(), h as f64 / requests as f64));
                            }
                        }
                    }
                }
            }
            if *cfg == Config::Bare {
                bare_now = r;
            }
            rps[i].push(r);
            line.push(format!("{r:>7.0}[{:.2}]", r / bare_now));
        }
        println!("{:>5} {}", round + 1, line.join(" "));
    }
    let med: Vec<f64> = rps.iter().map(|v| median(v)).collect();
    let idx = |c: Config| Config::ALL.iter().position(|x| *x == c).unwrap();
    let bare = med[idx(Config::Bare)];
    // The ratio to bare in each round (both measured minutes apart at most), then its median:
    // steadier than a ratio of medians when the machine's speed drifts.
    let per_round = |i: usize| -> Vec<f64> {
        rps[i]
            .iter()
            .zip(&rps[idx(Config::Bare)])
            .map(|(x, b)| x / b)
            .collect()
    };
    let mut rows = Vec::new();
    println!(
        "\n{:<20} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10} {:>6} {:>9} {:>6}",
        "config",
        "median/s",
        "spread%",
        "vs bare",
        "rnd-bare",
        "vs sites",
        "vs entry",
        "cpu %",
        "rss KiB",
        "lost"
    );
    for (i, cfg) in Config::ALL.iter().enumerate() {
        let floors = cfg.floors();
        let vs_sites = floors.map(|(s, _)| med[i] / med[idx(s)]);
        let vs_entry = floors.map(|(_, e)| med[i] / med[idx(e)]);
        let rb = median(&per_round(i));
        println!(
            "{:<20} {:>9.0} {:>8.1} {:>8.3} {:>9.3} {:>10} {:>10} {:>6.1} {:>9} {:>6}",
            cfg.name(),
            med[i],
            spread(&rps[i]),
            med[i] / bare,
            rb,
            vs_sites.map_or("-".into(), |v| format!("{v:.3}")),
            vs_entry.map_or("-".into(), |v| format!("{v:.3}")),
            median(&cpu[i]),
            rss[i],
            lost[i]
        );
        let hits_json: Vec<Value> = hits[i]
            .iter()
            .map(|(p, h)| json!({"program": p, "per_request": h}))
            .collect();
        let runs_json: Vec<Value> = runs[i]
            .iter()
            .map(|(p, n, ns)| json!({"program": p, "runs": n, "ns_per_run": ns}))
            .collect();
        rows.push(json!({"config": cfg.name(), "rps_median": med[i], "rps_runs": rps[i],
            "spread_percent": spread(&rps[i]), "vs_bare": med[i] / bare, "vs_bare_per_round": per_round(i),
            "vs_bare_per_round_median": rb, "vs_floor_sites": vs_sites, "vs_floor_entry": vs_entry,
            "cpu_percent": median(&cpu[i]), "rss_kib": rss[i], "events_lost": lost[i],
            "hits_per_request": hits_json, "program_runs": runs_json}));
    }
    for cfg in [Config::MonitorFull, Config::MonitorEgress] {
        let i = idx(cfg);
        let mut h: Vec<String> = Vec::new();
        for (p, v) in &hits[i] {
            if !h.iter().any(|x| x.starts_with(&format!("{p} "))) {
                let all: Vec<f64> = hits[i]
                    .iter()
                    .filter(|(q, _)| q == p)
                    .map(|x| x.1)
                    .collect();
                h.push(format!("{p} {:.2}", median(&all)));
            }
            let _ = v;
        }
        println!(
            "{} probe hits per request (median over rounds): {}",
            cfg.name(),
            h.join(", ")
        );
        let mut r: Vec<String> = Vec::new();
        for (p, _, _) in &runs[i] {
            if !r.iter().any(|x| x.starts_with(&format!("{p} "))) {
                let all: Vec<f64> = runs[i]
                    .iter()
                    .filter(|(q, _, _)| q == p)
                    .map(|x| x.2)
                    .collect();
                r.push(format!("{p} {:.0} ns", median(&all)));
            }
        }
        println!(
            "{} per-call run time (bpf_stats, median over rounds): {}",
            cfg.name(),
            r.join(", ")
        );
    }
    let vs_peer = med[idx(Config::MonitorFull)] / med[idx(Config::Peer)];
    let full = idx(Config::MonitorFull);
    let egress = idx(Config::MonitorEgress);
    println!("targets:");
    println!(
        "  monitor-full / bare {:.3} (>= 0.60); / floor-sites-full {:.3} (>= 0.85)",
        med[full] / bare,
        med[full] / med[idx(Config::FloorSitesFull)]
    );
    println!(
        "  monitor-egress / bare {:.3} (>= 0.80)",
        med[egress] / bare
    );
    println!("  monitor-full / bpftrace-sslsniff {vs_peer:.2}x (>= 6)");
    println!("  events lost {} (0)", lost[full] + lost[egress]);
    let report = json!({"bench": "overhead", "rounds": a.rounds, "secs": a.secs, "connections": a.connections,
        "results": rows, "monitor_vs_peer": vs_peer});
    write_report("overhead", &report)
}

/// The monitor's decoded choice for the library, as `monitor probes --explain` prints it.
fn explain_sites(monitor: &Path, lib: &Path) -> Result<String> {
    let out = Command::new(monitor)
        .args(["probes", "--explain"])
        .arg(lib)
        .output()
        .context("monitor probes --explain")?;
    if !out.status.success() {
        bail!(
            "monitor probes --explain {}: {}",
            lib.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_report(name: &str, report: &Value) -> Result<()> {
    let dir = crate::root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    fs::write(&path, serde_json::to_string_pretty(report)?)?;
    println!("{}", serde_json::to_string(report)?);
    eprintln!("xtask: report in {}", path.display());
    Ok(())
}

/// h2load in HTTP/1.1 mode at a fixed rate: `clients` connections x `rps` each.
fn h2load(url: &str, rate: u32, secs: u32) -> Result<(f64, u64)> {
    let clients = 50u32.min(rate.max(1));
    let per = rate.div_ceil(clients);
    let out = Command::new("h2load")
        .args([
            "--h1",
            "-c",
            &clients.to_string(),
            "--rps",
            &per.to_string(),
            "-D",
            &secs.to_string(),
        ])
        .args(["-H", "Authorization: Bearer load-token-not-secret"])
        .arg(url)
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 10.00s, 49990.10 req/s, ..." and "requests: N total, N started, N done, N succeeded"
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("no rate in h2load output:\n{text}"))?;
    let done = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" succeeded")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((rps, done))
}

pub fn load(a: LoadArgs) -> Result<()> {
    ensure_tools(&[
        ("nginx", "nginx"),
        ("h2load", "nghttp2-client"),
        ("openssl", "openssl"),
    ])?;
    let monitor = monitor_binary()?;
    let keydir = tempfile::tempdir()?;
    let _nginx = Nginx::start()?;
    let mut rows = Vec::new();
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>9}",
        "proto", "target/s", "achieved", "requests", "records", "lost", "p50 us", "p99 us"
    );
    for &rate in &a.rates {
        for (proto, url) in [
            ("plain", format!("http://127.0.0.1:{PLAIN_PORT}/")),
            ("tls", format!("https://127.0.0.1:{TLS_PORT}/")),
        ] {
            let mut c = Command::new(&monitor);
            c.args(["run", "--key-file"])
                .arg(keydir.path().join("key"))
                .env("MONITOR_LOG", "info");
            let att = spawn_until(c, "monitor ready")?;
            let (achieved, done) = h2load(&url, rate, a.secs)?;
            thread::sleep(Duration::from_millis(500));
            let s = monitor_summary(&att.stop());
            let lost = s["events_lost"]
                .as_u64()
                .context("monitor summary missing")?;
            let lat = &s["latency_event_to_record"];
            // Both ends are on this node: each request is seen by the client and by nginx.
            let records = lat["records"].as_u64().unwrap_or(0);
            println!(
                "{proto:<6} {rate:>10} {achieved:>10.0} {done:>10} {records:>10} {lost:>8} {:>9} {:>9}",
                lat["p50_us"], lat["p99_us"]
            );
            rows.push(json!({"protocol": proto, "target_rps": rate, "achieved_rps": achieved, "requests": done,
                "records": records, "events_lost": lost, "latency": lat, "kernel": s["kernel"]}));
        }
    }
    write_report(
        "load",
        &json!({"bench": "load", "secs": a.secs, "results": rows}),
    )
}
