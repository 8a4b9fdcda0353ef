//! `monitor replay` on hostile event logs, inside a 512 MiB memory cgroup (the Helm chart's
//! limit): what a node can throw at the pipeline (binds never closed, TLS requests whose
//! socket is never told, connections holding big partial heads, broken lines, odd key files)
//! keeps it within its budget, and nothing stops it. Needs root (the cgroup).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common_log;

use common_log::{T0, request};
use monitor::event::{Direction, Event, Kind, Source};
use serde_json::Value;

const LIMIT: u64 = 512 << 20;

/// A memory cgroup with the chart's limit, v2 or (hybrid hosts) v1.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new(name: &str) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "hostile_daemon needs root: it puts the monitor in a memory cgroup"
        );
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let parent = if v2 {
            let _ = std::fs::write(v2_root.join("cgroup.subtree_control"), "+memory");
            v2_root.to_path_buf()
        } else {
            // Hybrid: the v1 memory hierarchy, under our own memory cgroup.
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            let rel = own
                .lines()
                .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
                .expect("no memory controller, v1 or v2: cannot bound the monitor's memory");
            Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'))
        };
        let dir = parent.join(format!("monitor-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        let (max, swap) = if v2 {
            ("memory.max", "memory.swap.max")
        } else {
            ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        };
        std::fs::write(dir.join(max), LIMIT.to_string()).unwrap();
        // No swap to hide in (absent when swap is not accounted).
        let _ = std::fs::write(
            dir.join(swap),
            if v2 { "0".into() } else { LIMIT.to_string() },
        );
        MemCgroup { dir, v2 }
    }

    fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Replay {
    ok: bool,
    /// Peak of the same replay on a log of one request: the process, its binary's pages.
    baseline: u64,
    stderr: String,
    records: u64,
    summary: Value,
    peak: u64,
    elapsed: Duration,
}

/// Runs `monitor replay --events -` in a 512 MiB cgroup, the log written by `feed` into its
/// stdin as it reads (never on disk: page cache would be charged to the cgroup).
fn replay_hostile(name: &str, feed: impl FnOnce(&mut dyn Write) + Send + 'static) -> Replay {
    let base = replay_in_cgroup(&format!("{name}-base"), |w| {
        w.write_all(&line(&request(0, "/base", "tok-base", "/base")))
            .unwrap();
    });
    assert!(base.ok, "{}", base.stderr);
    let mut r = replay_in_cgroup(name, feed);
    r.baseline = base.peak;
    r
}

fn replay_in_cgroup(name: &str, feed: impl FnOnce(&mut dyn Write) + Send + 'static) -> Replay {
    let cg = MemCgroup::new(name);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.dir.join("cgroup.procs"))
        .unwrap();
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_monitor"));
    cmd.args([
        "replay",
        "--events",
        "-",
        "--print",
        "requests",
        "--key-file",
    ])
    .arg(&key)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: only write(2) between fork and exec; "0" moves the writing process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(procs);
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut stdin);
        feed(&mut w);
        let _ = w.flush();
    });
    let stdout = child.stdout.take().unwrap();
    let counter = std::thread::spawn(move || BufReader::new(stdout).lines().count() as u64);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    writer.join().unwrap();
    let records = counter.join().unwrap();
    let summary = stderr
        .lines()
        .find_map(|l| {
            let s = l.split_once("summary=")?.1;
            let s = s.rsplit_once(" replay finished").map_or(s, |(a, _)| a);
            serde_json::from_str(s).ok()
        })
        .unwrap_or(Value::Null);
    Replay {
        ok: status.success(),
        baseline: 0,
        stderr,
        records,
        summary,
        peak: cg.peak(),
        elapsed,
    }
}

fn line(e: &Event) -> Vec<u8> {
    let mut v = serde_json::to_vec(e).unwrap();
    v.push(b'\n');
    v
}

/// A TLS event of process 100 on `SSL *` `conn` (the template of every event below).
fn tls(kind: Kind, conn: u64, sk: u64, ts: u64, data: &[u8]) -> Event {
    let mut e = request(0, "/hostile", "unused", "/");
    e.kind = kind;
    e.source = Source::Openssl;
    e.tls = true;
    e.library = Some("openssl".into());
    e.direction = Direction::Egress;
    e.pid = 100;
    e.tgid = 100;
    e.conn = conn;
    e.sk = sk;
    e.ts_ns = ts;
    e.time_ns = T0 + ts;
    e.call_len = data.len() as u64;
    e.data = data.to_vec();
    if kind == Kind::Data {
        e.flow = None;
    }
    e
}

/// The replay finished within the cgroup, growing by less than `growth` over its baseline.
fn assert_bounded(r: &Replay, growth: u64) {
    assert!(r.ok, "replay failed (OOM kill?): {}", r.stderr);
    assert!(
        r.peak < r.baseline + growth,
        "peak {} MiB over a baseline of {} MiB, bound {} MiB",
        r.peak.saturating_sub(r.baseline) >> 20,
        r.baseline >> 20,
        growth >> 20
    );
}

#[test]
fn two_million_tls_binds_never_closed_stay_bounded() {
    const BINDS: u64 = 2_000_000;
    let r = replay_hostile("binds", |w| {
        // The same line with the numbers changed: generating must not be the slow part.
        let text =
            String::from_utf8(line(&tls(Kind::TlsBind, 111_111_111, 222_222_222, 1, b""))).unwrap();
        for i in 0..BINDS {
            let l = text
                .replace("111111111", &(1 << 40 | i).to_string())
                .replace("222222222", &(1 << 41 | i).to_string());
            w.write_all(l.as_bytes()).unwrap();
        }
        // Still working afterwards: a plaintext request is reported.
        w.write_all(&line(&request(1, "/hostile", "tok-after", "/after")))
            .unwrap();
    });
    eprintln!(
        "{BINDS} binds: peak {} MiB (baseline {} MiB) in {:?}; pipeline {}",
        r.peak >> 20,
        r.baseline >> 20,
        r.elapsed,
        r.summary["pipeline"]
    );
    // 65,536 connections of ~460 bytes (28 MB accounted), the maps' spare room and their
    // doubling when they grow, page cache charged to the cgroup; unbounded, the socket map
    // grew by 320 MB.
    assert_bounded(&r, 192 << 20);
    let p = &r.summary["pipeline"];
    assert!(p["tls_bound"].as_u64().unwrap() <= 65536, "{p}");
    assert!(p["conns"].as_u64().unwrap() <= 65536, "{p}");
    assert!(p["conns_evicted"].as_u64().unwrap() >= BINDS - 65536, "{p}");
    assert_eq!(r.records, 1);
}

/// `WAITING` TLS requests within one wait, their socket told only later (`bound`: told with
/// every request, so none waits).
fn waiting_requests(name: &str, bound: bool) -> Replay {
    const WAITING: u64 = 40_000;
    replay_hostile(name, move |w| {
        let req = b"GET /w HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tok-waiting\r\n\r\n";
        let mut e = tls(Kind::Data, 111_111_111, 0, 222_222_222, req);
        if bound {
            e.flow = request(0, "/", "", "/").flow;
        }
        let text = String::from_utf8(line(&e)).unwrap();
        for i in 0..WAITING {
            let l = text
                .replace("111111111", &(1 << 40 | i).to_string())
                .replace("222222222", &(1_000_000 + i * 10_000).to_string());
            w.write_all(l.as_bytes()).unwrap();
        }
        let late = tls(Kind::TlsBind, 7, 7, 5_000_000_000, b"");
        w.write_all(&line(&late)).unwrap();
    })
}

#[test]
fn forty_thousand_waiting_tls_requests_flush_in_linear_time() {
    let base = waiting_requests("bound", true);
    let r = waiting_requests("pending", false);
    eprintln!(
        "40000 waiting: {:?} (bound at once: {:?}), peak {} MiB",
        r.elapsed,
        base.elapsed,
        r.peak >> 20
    );
    assert_bounded(&r, 192 << 20);
    assert_eq!(r.records, 40_000, "every waiting request is reported once");
    assert_eq!(base.records, 40_000);
    // Flushing while they wait costs little next to decoding them (quadratic, it alone
    // took 34 s in a release build).
    assert!(
        r.elapsed < base.elapsed * 3 / 2 + Duration::from_secs(3),
        "{:?} against {:?}",
        r.elapsed,
        base.elapsed
    );
}

#[test]
fn connections_with_big_partial_heads_stay_within_the_node_budget() {
    // 12,000 connections × 60 KiB of an unfinished request head: 700 MiB if all were kept.
    const CONNS: u64 = 12_000;
    let r = replay_hostile("heads", |w| {
        let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        head.resize(60 * 1024, b'a');
        let mut e = request(0, "/hostile", "unused", "/");
        e.data = head;
        e.call_len = u64::MAX;
        let text = String::from_utf8(line(&e)).unwrap();
        let needle = format!("\"conn\":{}", e.conn);
        for i in 0..CONNS {
            let l = text.replace(&needle, &format!("\"conn\":{}", 1 << 40 | i));
            w.write_all(l.as_bytes()).unwrap();
        }
        w.write_all(&line(&request(1, "/hostile", "tok-after", "/after")))
            .unwrap();
    });
    eprintln!(
        "{CONNS} heads: peak {} MiB (baseline {} MiB) in {:?}; pipeline {}",
        r.peak >> 20,
        r.baseline >> 20,
        r.elapsed,
        r.summary["pipeline"]
    );
    // The node budget (256 MiB), allocator slack and a line in flight.
    assert_bounded(&r, 320 << 20);
    let p = &r.summary["pipeline"];
    assert!(p["conns_evicted"].as_u64().unwrap() > 0, "{p}");
    assert!(p["bytes_held"].as_u64().unwrap() <= 256 << 20, "{p}");
    assert_eq!(r.records, 1);
}

#[test]
fn broken_lines_are_counted_and_skipped_never_echoed() {
    const SECRET: &str = "s3cr3t-in-a-broken-line";
    let r = replay_hostile("lines", |w| {
        w.write_all(&line(&request(0, "/a", "tok-1", "/one")))
            .unwrap();
        w.write_all(format!("\u{0}{SECRET}").as_bytes()).unwrap();
        w.write_all(b"\xff\xfe").unwrap();
        w.write_all(SECRET.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        // Valid JSON, a secret in a field of the wrong type: serde_json would quote it.
        let good = String::from_utf8(line(&request(1, "/a", "tok-2", "/two"))).unwrap();
        let bad = good.replace(
            r#""comm":"curl""#,
            &format!(r#""comm":"x","pid":"{SECRET}""#),
        );
        w.write_all(bad.as_bytes()).unwrap();
        w.write_all(format!("{{\"kind\":\"{SECRET}\"}}\n").as_bytes())
            .unwrap();
        w.write_all(&vec![b'{'; 2 << 20]).unwrap();
        w.write_all(b"\n").unwrap();
        w.write_all(good.as_bytes()).unwrap();
    });
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.records, 2, "{}", r.stderr);
    assert_eq!(r.summary["malformed_lines"], 4, "{}", r.stderr);
    for n in [2, 3, 4, 5] {
        assert!(r.stderr.contains(&format!("line={n}")), "{}", r.stderr);
    }
    assert!(!r.stderr.contains(SECRET), "{}", r.stderr);
}

#[test]
fn a_key_file_that_is_a_device_or_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("empty.jsonl");
    std::fs::write(&log, "").unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (key, says) in [
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (fifo.as_path(), "is a FIFO, not a regular file"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_monitor"))
            .args(["replay", "--events"])
            .arg(&log)
            .arg("--key-file")
            .arg(key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("monitor hangs on key file {}", key.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}
