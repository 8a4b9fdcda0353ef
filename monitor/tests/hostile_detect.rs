//! Detection through `monitor replay` on hostile event logs and files: memory of the open
//! alerts bounded under a flood of unique credentials (measured in a 512 MiB memory cgroup),
//! paths that climb out of an edge's prefix, learn on paths that are not char boundaries, a
//! corrupt state file, a state save that fails. The memory test needs root (cgroups); the
//! others need nothing.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

mod common_log;

use common_log::{T0, request, write_log};
use monitor::event::{Event, Flow};
use serde_json::Value;

struct Run {
    alerts: Vec<Value>,
    stderr: String,
    summary: Option<Value>,
    ok: bool,
}

impl Run {
    fn of(out: Output) -> Run {
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Run {
            alerts: stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            summary: stderr
                .lines()
                .find_map(|l| l.split_once("summary=").map(|(_, j)| j))
                .map(|j| {
                    serde_json::from_str(j).unwrap_or_else(|e| panic!("bad summary {j}: {e}"))
                }),
            stderr,
            ok: out.status.success(),
        }
    }

    fn rule(&self, id: &str) -> Vec<&Value> {
        self.alerts.iter().filter(|a| a["rule"] == id).collect()
    }

    fn detect(&self) -> &Value {
        &self
            .summary
            .as_ref()
            .unwrap_or_else(|| panic!("no summary:\n{}", self.stderr))["detect"]
    }
}

fn replay_cmd(dir: &Path, log: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_monitor"));
    c.args(["replay", "--events", log, "--key-file"])
        .arg(dir.join("key"))
        .args(extra)
        .env("MONITOR_LOG", "info");
    c
}

fn replay(dir: &Path, log: &str, extra: &[&str]) -> Run {
    let mut c = replay_cmd(dir, log, extra);
    Run::of(c.args(["--print", "alerts"]).output().unwrap())
}

/// Request `i` of a flood, `spacing_ns` after the previous one, on one of eight keep-alive
/// connections (the memory measured is the detector's, not that of many connections).
fn flood_request(i: u64, spacing_ns: u64, cgroup: &str, token: &str, path: &str) -> Event {
    let mut e = request(0, cgroup, token, path);
    let c = i % 8;
    e.time_ns = T0 + i * spacing_ns;
    e.ts_ns = 1_000 + i * spacing_ns;
    e.conn = 0x10_0000 + c;
    e.sk = 0x10_0000 + c;
    e.pid = 100 + c as u32;
    e.tgid = e.pid;
    e.flow = Some(Flow {
        local: format!("10.1.0.2:{}", 40000 + c).parse().unwrap(),
        remote: "10.9.0.1:80".parse().unwrap(),
    });
    e
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A memory cgroup of its own with a hard limit, v2 (`memory.max`, `memory.peak`) or v1
/// (`memory.limit_in_bytes`, `memory.max_usage_in_bytes`), under the cgroup this test runs in.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new(name: &str, limit: u64) -> MemCgroup {
        assert!(
            nix_is_root(),
            "this test measures memory in a cgroup it creates: run it as root"
        );
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (base, rel) = if v2 {
            let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            (
                PathBuf::from("/sys/fs/cgroup"),
                rel.trim_start_matches('/').to_string(),
            )
        } else {
            let rel = own
                .lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctrl, p) = (f.next()?, f.next()?, f.next()?);
                    ctrl.split(',')
                        .any(|c| c == "memory")
                        .then(|| p.to_string())
                })
                .expect("a memory controller (cgroup v1) or cgroup v2");
            (
                PathBuf::from("/sys/fs/cgroup/memory"),
                rel.trim_start_matches('/').to_string(),
            )
        };
        // v2: a process cgroup may not hold both processes and children; place it beside us.
        let parent = if v2 {
            base.join(&rel).parent().unwrap_or(&base).to_path_buf()
        } else {
            base.join(&rel)
        };
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let limit_file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        fs::write(dir.join(limit_file), limit.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(limit_file).display()));
        MemCgroup { dir, v2 }
    }

    /// `cmd` run through a shell that first moves itself into the cgroup.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                sh.env(k, v);
            }
        }
        sh
    }

    fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        fs::read_to_string(self.dir.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn oom_killed(&self) -> bool {
        let (f, key) = if self.v2 {
            ("memory.events", "oom_kill ")
        } else {
            ("memory.oom_control", "oom_kill ")
        };
        fs::read_to_string(self.dir.join(f))
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix(key).is_some_and(|n| n.trim() != "0"))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

const MIB: u64 = 1 << 20;

#[test]
fn open_alerts_stay_bounded_under_80k_unique_cleartext_tokens() {
    const N: u64 = 80_000;
    const MAX_OPEN: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    // Every token unique, all inside the 5 min deduplication window (1 ms apart).
    let events: Vec<Event> = (0..N)
        .map(|i| {
            flood_request(
                i,
                1_000_000,
                "/shop/orders",
                &format!("flood-{i:08}-secret"),
                "/api/x",
            )
        })
        .collect();
    let log = write_log(dir.path(), "flood.jsonl", &events);
    drop(events);
    let state = dir.path().join("state.json");
    let cg = MemCgroup::new("monitor-hostile-detect", 512 * MIB);
    let cmd = replay_cmd(
        dir.path(),
        &log,
        &["--state-file", state.to_str().unwrap(), "--print", "none"],
    );
    let started = std::time::Instant::now();
    let r = Run::of(cg.wrap(&cmd).output().unwrap());
    let took = started.elapsed();
    let peak = cg.peak();
    assert!(!cg.oom_killed(), "OOM-killed in 512 MiB:\n{}", r.stderr);
    assert!(r.ok, "{}", r.stderr);
    let st = fs::read_to_string(&state).unwrap();
    let state_len = st.len() as u64;
    let d = r.detect();
    eprintln!(
        "{N} unique cleartext tokens: peak {:.1} MiB, state file {:.1} MiB, {took:?}; detect {d}",
        peak as f64 / MIB as f64,
        state_len as f64 / MIB as f64
    );
    // Every credential alerted once; the open windows are bounded, the rest closed early.
    assert_eq!(d["alerts_by_rule"]["cleartext-credential"], N, "{d}");
    assert_eq!(d["open_alerts"], MAX_OPEN, "{d}");
    assert_eq!(d["open_alerts_evicted"], N - MAX_OPEN, "{d}");
    assert_eq!(d["bindings"], N, "{d}");
    // The budget: the process without detection state (~22 MiB), bindings ≤ 1 KiB each
    // (~280 B measured, plus the part of the hash table sized for the default 1M bindings
    // that they touch), open alerts ≤ 2 KiB each (~1.5 KiB measured), and the state file
    // written (page cache, charged to the cgroup). The unbounded map took 697 MB.
    let budget = 32 * MIB + N * 1024 + MAX_OPEN * 2048 + state_len;
    assert!(
        peak < budget,
        "peak {peak} bytes in the memory cgroup, budget {budget}"
    );
    // The state file is bounded with them: ~200 B per binding, ~1 KiB per open alert.
    assert!(
        state_len < N * 256 + MAX_OPEN * 1536,
        "state file {state_len} bytes"
    );
    let saved: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(saved["open"].as_array().unwrap().len() as u64, MAX_OPEN);
    // Never a raw credential in the state or the logs.
    for text in [&st, &r.stderr] {
        assert!(!text.contains("-secret"), "raw token written");
    }
    // Restarted on its state: the bound holds on load too.
    let again = write_log(
        dir.path(),
        "one.jsonl",
        &[flood_request(
            N,
            1_000_000,
            "/shop/orders",
            "flood-last-secret",
            "/api/x",
        )],
    );
    let r = replay(
        dir.path(),
        &again,
        &["--state-file", state.to_str().unwrap()],
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.detect()["open_alerts"], MAX_OPEN, "{}", r.detect());
}

const EDGE_RULES: &str = "workloads:
  - { name: payments, match: { cgroup: /shop/payments } }
destinations:
  - { name: orders-api, hosts: [orders.test] }
edges:
  - { from: payments, to: orders-api, methods: [GET], paths: [/api/] }
";

#[test]
fn paths_that_climb_out_of_an_edge_prefix_are_off_path() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    fs::write(&rules, EDGE_RULES).unwrap();
    let bad = [
        "/api/../admin/users",
        "/api/%2e%2e/admin/users",
        "/api%2F..%2Fadmin",
        "/apix/users",
        "/api/../../etc",
    ];
    let good = [
        "/api/orders",
        "/api//orders/./1",
        "/api/orders?next=/../admin",
    ];
    let events: Vec<Event> = bad
        .iter()
        .chain(&good)
        .enumerate()
        .map(|(i, p)| flood_request(i as u64, 1_000_000_000, "/shop/payments", "tok-pay", p))
        .collect();
    let log = write_log(dir.path(), "a.jsonl", &events);
    let r = replay(dir.path(), &log, &["--rules", rules.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    // One alert per (rule, credential, source, destination): raised on the first bad path,
    // every other bad one counted into it (the update at exit), none of the good ones.
    let off = r.rule("off-path");
    assert!(
        off.iter().all(|a| a["id"] == off[0]["id"]),
        "{:#?}",
        r.alerts
    );
    assert_eq!(off[0]["destination"]["path"], bad[0]);
    assert_eq!(
        off.last().unwrap()["count"],
        bad.len() as u64,
        "{:#?}",
        r.alerts
    );
    // An edge prefix that is not an absolute path is refused with its position.
    fs::write(&rules, EDGE_RULES.replace("[/api/]", "[\"api/../x\"]")).unwrap();
    let r = replay(dir.path(), &log, &["--rules", rules.to_str().unwrap()]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("rules.yaml:6:64: edge from `payments` to `orders-api` path `api/../x`"),
        "{}",
        r.stderr
    );
}

#[test]
fn learn_on_a_multibyte_path_keeps_its_state_and_writes_learn_out() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let learnt = dir.path().join("learnt.yaml");
    let mut events = vec![
        request(0, "/shop/payments", "tok-pay", "é/x"),
        request(1, "/shop/payments", "tok-pay", "/api/orders/1"),
    ];
    // 40 distinct top-level paths: the learnt prefixes of the edge collapse to `/`.
    events.extend((0..40).map(|i| {
        flood_request(
            10 + i,
            1_000_000,
            "/shop/reports",
            "tok-rep",
            &format!("/r{i}/x"),
        )
    }));
    let log = write_log(dir.path(), "a.jsonl", &events);
    let r = replay(
        dir.path(),
        &log,
        &[
            "--mode",
            "learn",
            "--learn-out",
            learnt.to_str().unwrap(),
            "--state-file",
            state.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_eq!(r.detect()["unnormalisable_paths"], 1, "{}", r.detect());
    assert_eq!(mode(&learnt), 0o600);
    assert_eq!(mode(&state), 0o600);
    let text = fs::read_to_string(&learnt).unwrap();
    let rules: Value = serde_yaml_ng::from_str(&text).unwrap();
    let paths = |from: &str| -> Vec<String> {
        rules["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["from"] == from)
            .unwrap_or_else(|| panic!("no edge from {from}:\n{text}"))["paths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(paths("payments"), ["/api/"], "{text}");
    assert_eq!(paths("reports"), ["/"], "{text}");
    assert!(!text.contains("tok-pay"));
    let check = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["rules", "check"])
        .arg(&learnt)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_replay_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    fs::write(&state, b"{\"version\":1,\"creds\":[[\"0123").unwrap();
    let log = write_log(
        dir.path(),
        "a.jsonl",
        &[request(0, "/shop/payments", "tok-pay", "/api/a")],
    );
    let r = replay(dir.path(), &log, &["--state-file", state.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stderr.matches("moved aside").count(), 1, "{}", r.stderr);
    let aside: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        fs::read(dir.path().join(&aside[0])).unwrap(),
        b"{\"version\":1,\"creds\":[[\"0123",
        "the corrupt file is kept as it was"
    );
    // A new state was saved from the replay.
    let saved: Value = serde_json::from_str(&fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["creds"].as_array().unwrap().len(), 1);
    // A tampered entry (non-hex fingerprint) is dropped and counted; the rest is kept.
    let mut tampered = saved.clone();
    let good = tampered["creds"][0].clone();
    let mut bad = good.clone();
    bad[0] = Value::from("ééééééééééééééééé");
    tampered["creds"] = Value::from(vec![bad, good]);
    fs::write(&state, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let r = replay(
        dir.path(),
        &log,
        &[
            "--state-file",
            state.to_str().unwrap(),
            "--mode",
            "learn",
            "--learn-out",
            dir.path().join("l.yaml").to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.detect()["state_entries_dropped"], 1, "{}", r.detect());
    assert_eq!(r.detect()["bindings"], 1, "{}", r.detect());
}

#[test]
fn a_failed_state_save_still_writes_learn_out() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    // The state loads (there is none yet) but cannot be saved: its temporary file's name
    // is taken by a directory.
    fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
    let learnt = dir.path().join("learnt.yaml");
    let log = write_log(
        dir.path(),
        "a.jsonl",
        &[request(0, "/shop/payments", "tok-pay", "/api/a")],
    );
    let r = replay(
        dir.path(),
        &log,
        &[
            "--mode",
            "learn",
            "--learn-out",
            learnt.to_str().unwrap(),
            "--state-file",
            state.to_str().unwrap(),
        ],
    );
    assert!(!r.ok, "a failed save is an error at exit");
    assert!(r.stderr.contains("state not saved"), "{}", r.stderr);
    assert!(fs::read_to_string(&learnt).unwrap().contains("payments"));
    assert_eq!(mode(&learnt), 0o600);
}
