//! Live tests (root) for TLS stacks beyond the system's libssl: GnuTLS (`gnutls-cli`), OpenSSL
//! linked statically into a program, Node.js's bundled OpenSSL; each attached as the program
//! starts (exec and mmap records), not by polling, and detached when it has gone.

mod common;

use std::{path::PathBuf, process::Command};

use common::*;
use serde_json::{Value, json};

struct Setup {
    lab: Lab,
    _server_cg: Cgroup,
    client_cg: Cgroup,
    nginx: Nginx,
}

fn setup(tools: &[&str]) -> Setup {
    require_root_and_tools(tools);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);
    Setup {
        lab,
        _server_cg: server_cg,
        client_cg,
        nginx,
    }
}

impl Setup {
    /// Runs the static OpenSSL client in the client host: it waits `delay_ms` after it starts,
    /// then sends one request for `path` with `token`; returns its pid once it has exited.
    fn run_static_client(
        &self,
        exe: &std::path::Path,
        delay_ms: u32,
        path: &str,
        token: &str,
    ) -> u32 {
        let delay = delay_ms.to_string();
        let mut child = self.client_cg.spawn(
            &self.lab.client_ns,
            &[
                exe.to_str().unwrap(),
                &self.lab.server_ip,
                "443",
                "server.test",
                self.nginx.cert.to_str().unwrap(),
                &delay,
                &request(path, token),
            ],
        );
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "static client failed");
        pid
    }
}

fn token() -> String {
    format!("tok-{}", random_hex(24))
}

fn request(path: &str, token: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: server.test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
}

/// The one client-side record of `path`.
fn client_record<'a>(out: &'a Output, path: &str) -> &'a Value {
    let found = out.find(&[("/side", json!("client")), ("/path", json!(path))]);
    assert_eq!(
        found.len(),
        1,
        "expected one client record for {path}, got {found:#?}\nall records: {:#?}\nstderr:\n{}",
        out.records,
        out.stderr
    );
    found[0]
}

/// What every client-side record of these tests must say.
fn assert_client(rec: &Value, s: &Setup, library: &str, pid: u32, fp: &str) {
    assert_eq!(rec["library"], json!(library), "{rec:#}");
    assert_eq!(rec["tls"], json!(true), "{rec:#}");
    assert_eq!(rec["pid"], json!(pid), "{rec:#}");
    assert_eq!(rec["source"]["ip"], json!(s.lab.client_ip), "{rec:#}");
    assert_eq!(rec["destination"]["ip"], json!(s.lab.server_ip), "{rec:#}");
    assert_eq!(rec["destination"]["port"], json!(443), "{rec:#}");
    assert_eq!(rec["credentials"][0]["fingerprint"], json!(fp), "{rec:#}");
    assert_eq!(rec["cgroup"], json!(s.client_cg.path), "{rec:#}");
}

/// Attach counts for one stack from the exit summary.
fn attach_count(out: &Output, stack: &str, result: &str) -> u64 {
    out.summary["attach"]["by_stack"][stack][result]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn gnutls_client_is_reported_through_gnutls_record_send() {
    let _g = serial();
    let s = setup(&["nginx", "ip", "gnutls-cli"]);
    let mon = Monitor::start(&[]);
    let tok = token();
    let fp = mon.fingerprint(&tok);
    let req = request("/gnutls", &tok);
    // stdin stays open a second so gnutls-cli reads the response before it quits.
    let script = format!(
        "(printf '%s' \"$REQ\"; sleep 1) | gnutls-cli --x509cafile {} --sni-hostname server.test \
         --verify-hostname server.test --port 443 {} >/dev/null 2>&1",
        s.nginx.cert.display(),
        s.lab.server_ip
    );
    let mut child = s
        .client_cg
        .command(&s.lab.client_ns, &["sh", "-c", &script])
        .env("REQ", &req)
        .spawn()
        .unwrap();
    assert!(child.wait().unwrap().success(), "gnutls-cli failed");
    let out = mon.stop();
    let rec = client_record(&out, "/gnutls");
    assert_eq!(rec["comm"], json!("gnutls-cli"), "{rec:#}");
    let pid = rec["pid"].as_u64().unwrap() as u32;
    assert_client(rec, &s, "gnutls", pid, &fp);
    // nginx saw the same request through its OpenSSL.
    let server = out.find(&[("/side", json!("server")), ("/path", json!("/gnutls"))]);
    assert_eq!(server.len(), 1, "{:#?}", out.records);
    assert_eq!(server[0]["library"], json!("openssl"));
    out.assert_no_secret(&tok);
    assert_eq!(out.events_lost(), 0);
}

/// Builds the C client linked statically against libssl.a/libcrypto.a.
fn static_client(dir: &std::path::Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testbed/clients/ssl_client.c");
    let exe = dir.join("ssl_client_static");
    let out = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .args([
            "-Wl,-Bstatic",
            "-lssl",
            "-lcrypto",
            "-Wl,-Bdynamic",
            "-lpthread",
            "-ldl",
        ])
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "building the static OpenSSL client (needs gcc and libssl-dev): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

#[test]
fn static_openssl_program_started_after_the_monitor_is_attached_within_a_second() {
    let _g = serial();
    let s = setup(&["nginx", "ip", "gcc"]);
    let build = tempfile::tempdir().unwrap();
    let exe = static_client(build.path());
    let mon = Monitor::start(&["--detach-after", "1"]);
    let tok = token();
    let fp = mon.fingerprint(&tok);
    // The program is new to the monitor (no process mapped it at start); it makes its first
    // TLS call one second after it starts.
    let pid = s.run_static_client(&exe, 1000, "/static", &tok);
    // It has exited: the monitor detaches from it a second later.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = mon.stop();
    let rec = client_record(&out, "/static");
    assert_client(rec, &s, "openssl", pid, &fp);
    assert_eq!(rec["exe"], json!(exe.to_str().unwrap()), "{rec:#}");
    assert!(
        out.stderr.contains("attached TLS probes")
            && out
                .stderr
                .contains(exe.file_name().unwrap().to_str().unwrap()),
        "{}",
        out.stderr
    );
    assert!(
        attach_count(&out, "openssl", "detached") >= 1,
        "{:#}",
        out.summary
    );
    eprintln!(
        "arrival to attach: {} µs",
        out.summary["attach"]["arrival_to_attach_max_us"]
    );
    out.assert_no_secret(&tok);
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn node_client_is_reported_through_its_bundled_openssl() {
    let _g = serial();
    let s = setup(&["nginx", "ip", "node"]);
    let mon = Monitor::start(&[]);
    let tok = token();
    let fp = mon.fingerprint(&tok);
    let script = r#"
const https = require('https'), fs = require('fs');
const [ip, ca, token] = process.argv.slice(1);
const req = https.request({host: ip, port: 443, servername: 'server.test', path: '/node',
  ca: fs.readFileSync(ca), headers: {Host: 'server.test', Authorization: 'Bearer ' + token,
  Connection: 'close'}}, res => { res.resume(); res.on('end', () => process.exit(res.statusCode == 200 ? 0 : 1)); });
req.on('error', e => { console.error(e); process.exit(1); });
req.end();
"#;
    let mut child = s.client_cg.spawn(
        &s.lab.client_ns,
        &[
            "node",
            "-e",
            script,
            &s.lab.server_ip,
            s.nginx.cert.to_str().unwrap(),
            &tok,
        ],
    );
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "node client failed");
    let out = mon.stop();
    let rec = client_record(&out, "/node");
    assert_client(rec, &s, "openssl", pid, &fp);
    assert!(
        rec["exe"].as_str().is_some_and(|e| e.ends_with("/node")),
        "{rec:#}"
    );
    // Node writes through memory BIOs and retries writes the handshake held back: one
    // request is one record, tied to its socket, and nginx's view of it is the same use
    // (not a second workload replaying the token).
    let alerts: Vec<_> = out
        .records
        .iter()
        .filter(|r| r.get("rule").is_some())
        .collect();
    assert!(alerts.is_empty(), "{alerts:#?}");
    out.assert_no_secret(&tok);
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn a_program_run_again_right_after_it_exited_is_seen_both_times() {
    // Its file stays attached for a while after the first run has gone (`--detach-after`), so
    // the second run is covered from its start without a new attach.
    let _g = serial();
    let s = setup(&["nginx", "ip", "gcc"]);
    let build = tempfile::tempdir().unwrap();
    let exe = static_client(build.path());
    let mon = Monitor::start(&[]);
    let tok = token();
    let fp = mon.fingerprint(&tok);
    let mut pids = Vec::new();
    for run in ["/again/1", "/again/2"] {
        pids.push(s.run_static_client(&exe, 300, run, &tok));
    }
    let out = mon.stop();
    for (run, pid) in ["/again/1", "/again/2"].iter().zip(pids) {
        assert_client(client_record(&out, run), &s, "openssl", pid, &fp);
    }
    assert_eq!(
        attach_count(&out, "openssl", "detached"),
        0,
        "{:#}",
        out.summary
    );
    out.assert_no_secret(&tok);
}
