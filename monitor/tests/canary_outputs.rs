//! Secrets that once reached the outputs, each a random canary sent through `monitor replay`
//! (the same pipeline as `run`, no root) with trace logging: none may appear in the request
//! records, the alerts, the alerts file, the state file or stderr, and each must still be
//! fingerprinted as the credential it is.

use std::{path::Path, process::Command};

mod common_log;

use base64::{Engine, engine::general_purpose::STANDARD};
use common_log::{request, write_log};
use monitor::{credential::Fingerprinter, event::Event};
use serde_json::{Value, json};

fn canary() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    format!("canary{}", hex::encode(b))
}

/// A plaintext request event from `cgroup` whose bytes are exactly `data`.
fn raw(i: u64, data: Vec<u8>) -> Event {
    let mut e = request(i, "/shop/payments", "unused", "/");
    e.call_len = data.len() as u64;
    e.data = data;
    e
}

fn http(i: u64, head: &str) -> Event {
    raw(i, head.as_bytes().to_vec())
}

struct Run {
    stdout: String,
    stderr: String,
    records: Vec<Value>,
    files: String,
    fp: Fingerprinter,
}

fn replay(events: &[Event]) -> Run {
    // The event log holds plaintext by design: it is kept apart from what the monitor writes.
    let input = tempfile::tempdir().unwrap();
    let log = write_log(input.path(), "events.jsonl", events);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let out = Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["replay", "--events", &log, "--print", "all", "--key-file"])
        .arg(&key)
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .arg("--alerts-file")
        .arg(dir.path().join("alerts.jsonl"))
        .env("MONITOR_LOG", "trace")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed:\n{stderr}");
    let records = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("credentials").is_some())
        .collect();
    let key_hex = std::fs::read_to_string(&key).unwrap();
    Run {
        files: files_text(dir.path()),
        fp: Fingerprinter::from_key(&hex::decode(key_hex.trim()).unwrap()),
        stdout,
        stderr,
        records,
    }
}

fn files_text(dir: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        all.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()));
    }
    all
}

impl Run {
    fn assert_absent(&self, secret: &str) {
        assert!(!self.stdout.contains(secret), "{secret} on stdout");
        assert!(!self.stderr.contains(secret), "{secret} on stderr");
        assert!(!self.files.contains(secret), "{secret} in a file");
    }

    fn record(&self, method: &str) -> &Value {
        let found: Vec<_> = self
            .records
            .iter()
            .filter(|r| r["method"] == method)
            .collect();
        assert_eq!(found.len(), 1, "{method}: {:#?}", self.records);
        found[0]
    }

    fn fingerprint(&self, s: &str) -> String {
        self.fp.fingerprint(s.as_bytes())
    }
}

#[test]
fn leaked_secrets_reach_no_output_and_are_still_fingerprinted() {
    let c: Vec<String> = (0..12).map(|_| canary()).collect();
    let many: String = (0..70).map(|i| format!("p{i}=v&")).collect();
    let events = vec![
        // Basic without a colon: a token, not a user name.
        http(
            0,
            &format!(
                "BASIC1 / HTTP/1.1\r\nAuthorization: Basic {}\r\n\r\n",
                STANDARD.encode(&c[0])
            ),
        ),
        // A token past the 64th query parameter.
        http(
            1,
            &format!("MANY /q?{many}access_token={} HTTP/1.1\r\n\r\n", c[1]),
        ),
        // Secret-bearing names the old list missed.
        http(
            2,
            &format!(
                "NAMES /n?x-amz-security-token={}&refresh_token={}&client_secret={}&password={}&code={} HTTP/1.1\r\n\r\n",
                c[2], c[3], c[4], c[5], c[6]
            ),
        ),
        // Userinfo in an absolute-form target.
        http(
            3,
            &format!("PROXY http://svc:{}@orders.test/api HTTP/1.1\r\n\r\n", c[7]),
        ),
        // A target that is not UTF-8, after empty lines, with 200 headers.
        raw(4, {
            let mut d = b"\r\n\r\nODD /caf\xe9?token=".to_vec();
            d.extend(c[8].as_bytes());
            d.extend(b" HTTP/1.1\r\n");
            for i in 0..200 {
                d.extend(format!("X-Pad-{i}: v\r\n").as_bytes());
            }
            d.extend(format!("X-Api-Key: {}\r\n\r\n", c[9]).as_bytes());
            d
        }),
        // Redis inline AUTH with a quoted password holding a space.
        raw(5, format!("AUTH \"{} {}\"\r\n", c[10], c[11]).into_bytes()),
    ];
    let r = replay(&events);
    for s in &c {
        r.assert_absent(s);
    }

    let basic = r.record("BASIC1");
    assert_eq!(
        basic["credentials"],
        json!([{"header": "authorization", "kind": "basic", "fingerprint": r.fingerprint(&c[0])}])
    );
    let rec = r.record("MANY");
    assert_eq!(rec["path"], format!("/q?{many}access_token=REDACTED"));
    assert_eq!(rec["credentials"][0]["fingerprint"], r.fingerprint(&c[1]));
    let names = r.record("NAMES");
    assert_eq!(
        names["path"],
        "/n?x-amz-security-token=REDACTED&refresh_token=REDACTED&client_secret=REDACTED&password=REDACTED&code=REDACTED"
    );
    let fps: Vec<_> = names["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["fingerprint"].clone())
        .collect();
    assert_eq!(
        fps,
        c[2..6]
            .iter()
            .map(|s| json!(r.fingerprint(s)))
            .collect::<Vec<_>>()
    );
    let proxy = r.record("PROXY");
    assert_eq!(proxy["path"], "http://orders.test/api");
    assert_eq!(
        proxy["credentials"],
        json!([{"header": "userinfo", "kind": "basic", "user": "svc",
                "fingerprint": r.fingerprint(&format!("svc:{}", c[7]))}])
    );
    let odd = r.record("ODD");
    assert_eq!(odd["path"], "/caf%E9?token=REDACTED");
    let kinds: Vec<_> = odd["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kind"].clone(), c["fingerprint"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (json!("api-key"), json!(r.fingerprint(&c[9]))),
            (json!("query"), json!(r.fingerprint(&c[8])))
        ]
    );
    let auth = r.record("AUTH");
    assert_eq!(
        auth["credentials"],
        json!([{"header": "auth", "kind": "redis-auth",
                "fingerprint": r.fingerprint(&format!("{} {}", c[10], c[11]))}])
    );
    // Alerts were written (to stdout and the file): the scans above covered them.
    assert!(r.files.contains("cleartext-credential"), "{}", r.files);
}
