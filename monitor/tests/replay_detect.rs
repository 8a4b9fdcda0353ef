//! Detection through `monitor replay` on event logs the tests write (no root, no kernel):
//! state surviving a restart, broken rules refusing to start, learn then enforce.

use std::{path::Path, process::Command};

mod common_log;

use common_log::{request, write_log};
use serde_json::Value;

struct Run {
    alerts: Vec<Value>,
    stderr: String,
    ok: bool,
}

fn replay(dir: &Path, log: &str, extra: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["replay", "--events", log, "--print", "alerts", "--key-file"])
        .arg(dir.join("key"))
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    Run {
        alerts: stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

fn rule<'a>(r: &'a Run, id: &str) -> Vec<&'a Value> {
    r.alerts.iter().filter(|a| a["rule"] == id).collect()
}

#[test]
fn state_survives_a_restart_without_forgetting_or_realerting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state = state.to_str().unwrap();
    let a = write_log(
        dir.path(),
        "a.jsonl",
        &[request(0, "/shop/payments", "tok-shared-1", "/api/a")],
    );
    let b = write_log(
        dir.path(),
        "b.jsonl",
        &[request(5, "/shop/intruder", "tok-shared-1", "/api/a")],
    );
    let first = replay(dir.path(), &a, &["--state-file", state]);
    assert!(first.ok, "{}", first.stderr);
    assert!(rule(&first, "token-replay").is_empty());
    // A new process: it remembers that payments owns the token.
    let second = replay(dir.path(), &b, &["--state-file", state]);
    let rep = rule(&second, "token-replay");
    assert_eq!(rep.len(), 1, "{:#?}", second.alerts);
    assert_eq!(rep[0]["first_seen_by"], "cgroup:/shop/payments");
    // Again: the open alert is restored; the repeat is a count update of the same alert.
    let third = replay(dir.path(), &b, &["--state-file", state]);
    let again = rule(&third, "token-replay");
    assert_eq!(again.len(), 1, "{:#?}", third.alerts);
    assert_eq!(again[0]["id"], rep[0]["id"]);
    assert_eq!(again[0]["count"], 2);
    let saved = std::fs::read_to_string(state).unwrap();
    assert!(
        !saved.contains("tok-shared-1"),
        "raw token in the state file"
    );
}

#[test]
fn broken_rules_refuse_to_start_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("bad.yaml"),
        "workloads:\n  - name: a\n    match: { comm: x }\nedges:\n  - { from: b, to: c }\n",
    )
    .unwrap();
    let a = write_log(dir.path(), "a.jsonl", &[request(0, "/x", "t", "/")]);
    let r = replay(dir.path(), &a, &["--rules", rules.to_str().unwrap()]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("bad.yaml:5:7: edge from `b`: no such workload"),
        "{}",
        r.stderr
    );
    assert!(r.alerts.is_empty());
    let check = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["rules", "check"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("bad.yaml:5:"));
}

#[test]
fn learn_writes_rules_that_enforce_uses() {
    let dir = tempfile::tempdir().unwrap();
    let learnt = dir.path().join("learnt.yaml");
    let a = write_log(
        dir.path(),
        "a.jsonl",
        &[
            request(0, "/shop/payments", "tok-pay", "/api/orders/1"),
            request(1, "/shop/payments", "tok-pay", "/api/orders/2"),
        ],
    );
    let r = replay(
        dir.path(),
        &a,
        &["--mode", "learn", "--learn-out", learnt.to_str().unwrap()],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(rule(&r, "token-replay").is_empty() && rule(&r, "off-path").is_empty());
    let text = std::fs::read_to_string(&learnt).unwrap();
    assert!(text.starts_with("# Learnt by `monitor`"), "{text}");
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
    let b = write_log(
        dir.path(),
        "b.jsonl",
        &[
            request(10, "/shop/intruder", "tok-pay", "/api/orders/1"),
            request(11, "/shop/payments", "tok-pay", "/admin"),
        ],
    );
    let r = replay(dir.path(), &b, &["--rules", learnt.to_str().unwrap()]);
    assert_eq!(rule(&r, "token-replay").len(), 1, "{:#?}", r.alerts);
    assert_eq!(rule(&r, "token-replay")[0]["expected"]["binding"], "rules");
    assert_eq!(rule(&r, "off-path").len(), 1, "{:#?}", r.alerts);
}

#[test]
fn alert_format_and_webhook_are_wired_into_the_cli() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let a = write_log(
        dir.path(),
        "a.jsonl",
        &[request(0, "/shop/payments", "tok-x", "/api/a")],
    );
    // A one-shot webhook receiver on loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read until the body (Content-Length) is complete.
        loop {
            let n = s.read(&mut chunk).unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .unwrap();
                    return text;
                }
            }
            if n == 0 {
                return text;
            }
        }
    });
    let url = format!("http://127.0.0.1:{port}/hook");
    let r = replay(
        dir.path(),
        &a,
        &["--alert-format", "ocsf", "--webhook", &url],
    );
    assert!(r.ok, "{}", r.stderr);
    let clear = r
        .alerts
        .iter()
        .find(|a| a["finding_info"]["title"] == "cleartext-credential")
        .expect("OCSF alert on stdout");
    assert_eq!(clear["class_uid"], 2004);
    let posted = server.join().unwrap();
    assert!(posted.starts_with("POST /hook"), "{posted}");
    assert!(posted.contains("\"class_uid\":2004"), "{posted}");
    assert!(!posted.contains("tok-x") && !r.stderr.contains("tok-x"));
}
