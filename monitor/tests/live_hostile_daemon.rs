//! The live daemon (root) under hostile conditions: few file descriptors left, a stdout
//! nobody reads, `--record` to a full filesystem. Capturing goes on in each, and each
//! problem is said once and counted.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss", "python3", "prlimit"];

struct Setup {
    lab: Lab,
    server_cg: Cgroup,
    client_cg: Cgroup,
    nginx: Nginx,
}

fn setup() -> Setup {
    require_root_and_tools(TOOLS);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);
    Setup {
        lab,
        server_cg,
        client_cg,
        nginx,
    }
}

impl Setup {
    fn curl(&self, url: &str, headers: &[String]) {
        let argv = curl_args(&self.lab, &self.nginx, headers, &[], url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let st = self
            .client_cg
            .spawn(&self.lab.client_ns, &argv)
            .wait()
            .unwrap();
        assert!(st.success(), "curl failed");
    }

    /// `n` plaintext requests over one keep-alive connection, each with a path of `pad`
    /// bytes (so that records are big) and a bearer token.
    fn many(&self, n: usize, pad: usize, prefix: &str, token: &str) {
        let script = r#"
import http.client, sys
ip, n, pad, prefix, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
c = http.client.HTTPConnection(ip, 80)
for i in range(n):
    c.request("GET", "%s/%d?pad=%s" % (prefix, i, "p" * pad), headers={"Host": "server.test", "Authorization": "Bearer " + token})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
"#;
        let st = self
            .client_cg
            .spawn(
                &self.lab.client_ns,
                &[
                    "python3",
                    "-c",
                    script,
                    &self.lab.server_ip,
                    &n.to_string(),
                    &pad.to_string(),
                    prefix,
                    token,
                ],
            )
            .wait()
            .unwrap();
        assert!(st.success(), "python client failed");
    }
}

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// GET with a deadline: a daemon that blocks must fail the test, not hang it.
fn get(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), timeout)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    Ok(text)
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

fn wait_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(addr, "/ready", Duration::from_secs(2)).is_ok_and(|t| t.contains(" 200 ")) {
        assert!(Instant::now() < deadline, "never ready");
        sleep(Duration::from_millis(100));
    }
}

/// The pid of the monitor whose command line names `key_file` (unique to each test).
fn monitor_pid(key_file: &Path) -> i32 {
    let want = key_file.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.starts_with(env!("CARGO_BIN_EXE_monitor").as_bytes())
            && cmd.windows(want.len()).any(|w| w == want)
        {
            return pid;
        }
    }
    panic!("monitor process not found");
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn with_no_fd_left_metrics_do_not_spin_and_the_cgroup_selection_stays() {
    let _g = serial();
    let s = setup();
    let addr = free_addr();
    let mon = Monitor::start(&["--metrics-addr", &addr, "--cgroup", &s.client_cg.path]);
    wait_ready(&addr);
    let pid = monitor_pid(&mon.key_file);
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 4;
    // The soft limit only: it is put back afterwards.
    let soft = sh(&format!(
        "prlimit --pid {pid} --nofile --output SOFT --noheadings"
    ));
    sh(&format!("prlimit --pid {pid} --nofile={limit}:"));
    // Connections the metrics server accepts until no fd is left; the rest wait in the
    // backlog, keeping the listener readable (each accepted one is dropped after 5 s, and
    // the next takes its fd at once).
    let hog: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    mon.wait_stderr("metrics: cannot accept connections", 1);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - c0;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64();
    assert!(
        cpu < 0.3,
        "monitor used {:.0}% of a core with no fd left",
        cpu * 100.0
    );
    // The 2 s cgroup refresh ran without fds: the selection in force must stay.
    mon.wait_stderr(
        "cannot refresh the selected cgroups; keeping the last set",
        1,
    );
    let tok = random_hex(24);
    s.curl(
        "http://server.test/while-starved",
        &[format!("Authorization: Bearer {tok}")],
    );
    sleep(Duration::from_secs(1));
    drop(hog);
    sh(&format!("prlimit --pid {pid} --nofile={}:", soft.trim()));
    mon.wait_stderr("cgroup selection refreshed again", 1);
    let out = mon.stop();
    let r = out.find(&[
        ("/path", json!("/while-starved")),
        ("/side", json!("client")),
    ]);
    assert_eq!(
        r.len(),
        1,
        "selected cgroup not captured while starved:\n{}",
        out.stderr
    );
    // Said at most once a minute (the test runs for about one), not once per failed accept.
    let said = out
        .stderr
        .matches("metrics: cannot accept connections")
        .count();
    assert!(said <= 3, "warned {said} times:\n{}", out.stderr);
    out.assert_no_secret(&tok);
}

#[test]
fn a_stdout_nobody_reads_drops_lines_and_capture_goes_on() {
    let _g = serial();
    let s = setup();
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let stderr_path = dir.path().join("stderr");
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args([
            "run",
            "--metrics-addr",
            &addr,
            "--cgroup",
            &s.client_cg.path,
        ])
        .arg("--key-file")
        .arg(&key)
        .stdout(writer)
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&addr);
    let tok = random_hex(24);
    // ~1 KiB records: far more than the pipe (64 KiB) and the queue (8 MiB) hold.
    s.many(12_000, 700, "/unread", &tok);
    sleep(Duration::from_millis(1500));
    let body = get(&addr, "/metrics", Duration::from_secs(5)).expect("/metrics must answer");
    assert!(
        metric(&body, "monitor_stdout_dropped_lines_total") > 0.0,
        "{body}"
    );
    assert!(metric(&body, "monitor_stdout_queued_bytes") <= (8 << 20) as f64);
    let events = metric(&body, "monitor_pipeline_events_total");
    // The capture loop still runs: new traffic is counted.
    s.many(50, 10, "/later", &tok);
    sleep(Duration::from_millis(1500));
    let body = get(&addr, "/metrics", Duration::from_secs(5)).expect("/metrics must answer");
    assert!(
        metric(&body, "monitor_pipeline_events_total") > events,
        "{body}"
    );
    assert!(metric(&body, "monitor_requests_total{protocol=\"http/1.1\"}") >= 12_050.0);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("monitor did not exit with its stdout unread");
        }
        sleep(Duration::from_millis(50));
    };
    drop(reader);
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(st.success(), "{err}");
    assert!(err.contains("stdout is not read fast enough"), "{err}");
    assert!(!err.contains(&tok));
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size},mode=0700 monitor-test {}",
            dir.display()
        ));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn record_to_a_full_filesystem_warns_once_and_capture_goes_on() {
    let _g = serial();
    let s = setup();
    let addr = free_addr();
    let disk = tempfile::tempdir().unwrap();
    let full = Tmpfs::mount(&disk.path().join("full"), "256k");
    let log = full.0.join("events.jsonl");
    let mon = Monitor::start(&[
        "--metrics-addr",
        &addr,
        "--cgroup",
        &s.client_cg.path,
        "--cgroup",
        &s.server_cg.path,
        "--record",
        log.to_str().unwrap(),
    ]);
    wait_ready(&addr);
    let tok = random_hex(24);
    // Each request makes events of ~1 KiB on both sides: the 256 KiB fill up early.
    s.many(2_000, 200, "/filling", &tok);
    s.curl(
        "http://server.test/after-full",
        &[format!("Authorization: Bearer {tok}")],
    );
    sleep(Duration::from_millis(1500));
    let body = get(&addr, "/metrics", Duration::from_secs(5)).unwrap();
    assert!(
        metric(
            &body,
            "monitor_record_write_errors_total{kind=\"StorageFull\"}"
        ) >= 1.0,
        "{body}"
    );
    assert!(metric(&body, "monitor_record_dropped_events_total") > 0.0);
    assert!(metric(&body, "monitor_record_events_total") > 0.0);
    let out = mon.stop();
    assert_eq!(
        out.find(&[("/path", json!("/after-full")), ("/side", json!("client"))])
            .len(),
        1
    );
    assert_eq!(
        out.stderr.matches("event log write failed").count(),
        1,
        "{}",
        out.stderr
    );
    // What reached the disk still replays (a line cut by the full disk is skipped).
    let rep = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["replay", "--print", "none", "--events"])
        .arg(&log)
        .arg("--key-file")
        .arg(disk.path().join("replay.key"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&rep.stderr);
    assert!(rep.status.success(), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(err.split_once("summary=").unwrap().1.trim()).unwrap();
    assert!(
        summary["malformed_lines"].as_u64().unwrap() <= 1,
        "{summary}"
    );
    assert!(
        summary["pipeline"]["requests"].as_u64().unwrap() > 0,
        "{summary}"
    );
    out.assert_no_secret(&tok);
    drop(full);
}
