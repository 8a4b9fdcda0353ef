//! Live capture tests (root): the real kernel programs against nginx, curl, openssl and Python
//! clients in network namespaces and cgroups the tests create.

mod common;

use common::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss", "python3"];

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
    fn curl(&self, url: &str, headers: &[String]) -> u32 {
        let argv = curl_args(&self.lab, &self.nginx, headers, &[], url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut child = self.client_cg.spawn(&self.lab.client_ns, &argv);
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "curl failed");
        pid
    }

    /// A Python client (SSL_write_ex/SSL_read_ex) sending one request in two writes.
    fn python_split(&self, tls: bool, path: &str, first: &str, second: &str) -> u32 {
        let script = r#"
import socket, ssl, sys, time
ip, port, tls, cafile, first, second = sys.argv[1:7]
s = socket.create_connection((ip, int(port)))
if tls == "1":
    s = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname="server.test")
s.sendall(first.encode())
time.sleep(0.3)
s.sendall(second.encode())
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
assert b" 200 " in data, data
"#;
        let port = if tls { "443" } else { "80" };
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n{first}");
        let cert = self.nginx.cert.display().to_string();
        let mut child = self.client_cg.spawn(
            &self.lab.client_ns,
            &[
                "/usr/bin/python3",
                "-c",
                script,
                &self.lab.server_ip,
                port,
                if tls { "1" } else { "0" },
                &cert,
                &head,
                second,
            ],
        );
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "python client failed");
        pid
    }
}

fn token() -> String {
    format!("tok-{}", random_hex(24))
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

/// The one record of the request at `path` seen from `side`, with its assertions' context.
fn one<'a>(out: &'a Output, side: &str, path: &str) -> &'a Value {
    let found = out.find(&[("/side", json!(side)), ("/path", json!(path))]);
    assert_eq!(
        found.len(),
        1,
        "expected one {side} record for {path}, got {found:#?}\nall: {:#?}",
        out.records
    );
    found[0]
}

/// uid and gid come from the kernel at the call, not from /proc later: a client running as
/// another user that exits right after its request still has them.
#[test]
fn short_lived_client_keeps_its_uid_and_gid() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let tok = token();
    let mut argv: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec();
    argv.extend(curl_args(
        &s.lab,
        &s.nginx,
        &[bearer(&tok)],
        &[],
        "http://server.test/as-nobody",
    ));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(
        s.client_cg
            .spawn(&s.lab.client_ns, &argv)
            .wait()
            .unwrap()
            .success(),
        "curl as nobody failed"
    );
    let out = mon.stop();

    let c = one(&out, "client", "/as-nobody");
    assert_eq!(
        (&c["uid"], &c["gid"]),
        (&json!(65534), &json!(65534)),
        "{c:#}"
    );
    // nginx's worker: whatever user it runs as, the record says the one the kernel saw.
    let srv = one(&out, "server", "/as-nobody");
    let worker = srv["pid"].as_u64().unwrap();
    assert!(srv["uid"].is_u64() && srv["gid"].is_u64(), "{srv:#}");
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(srv["uid"].to_string(), euid);
}

#[test]
fn tls_request_reports_client_process_cgroup_flow_and_fingerprint() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let tok = token();
    let pid = s.curl("https://server.test/api/orders?id=7", &[bearer(&tok)]);
    let want_fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(&out, "client", "/api/orders?id=7");
    assert_eq!(r["pid"], json!(pid));
    assert_eq!(r["comm"], json!("curl"));
    assert_eq!(r["exe"], json!("/usr/bin/curl"));
    assert_eq!(r["cgroup"], json!(s.client_cg.path));
    assert_eq!(r["cgroup_id"], json!(s.client_cg.id));
    assert_eq!(
        r["destination"],
        json!({"ip": s.lab.server_ip, "port": 443})
    );
    assert_eq!(r["source"]["ip"], json!(s.lab.client_ip));
    assert_eq!(r["tls"], json!(true));
    assert_eq!(r["library"], json!("openssl"));
    assert_eq!(r["method"], json!("GET"));
    assert_eq!(r["host"], json!("server.test"));
    assert_eq!(
        r["credentials"],
        json!([{"header": "authorization", "kind": "bearer", "fingerprint": want_fp}])
    );
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}

#[test]
fn tls_server_side_is_seen_through_ssl_read() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let tok = token();
    s.curl("https://server.test/server-side", &[bearer(&tok)]);
    let want_fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(&out, "server", "/server-side");
    assert_eq!(r["comm"], json!("nginx"));
    assert_eq!(r["cgroup"], json!(s.server_cg.path));
    assert_eq!(r["tls"], json!(true));
    assert_eq!(
        r["destination"],
        json!({"ip": s.lab.server_ip, "port": 443})
    );
    assert_eq!(r["source"]["ip"], json!(s.lab.client_ip));
    assert_eq!(r["credentials"][0]["fingerprint"], json!(want_fp));
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}

#[test]
fn plaintext_request_is_reported_with_tls_false() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let tok = token();
    let pid = s.curl("http://server.test/plain", &[bearer(&tok)]);
    let want_fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(&out, "client", "/plain");
    assert_eq!(r["pid"], json!(pid));
    assert_eq!(r["tls"], json!(false));
    assert_eq!(r["library"], json!(null));
    assert_eq!(r["destination"], json!({"ip": s.lab.server_ip, "port": 80}));
    assert_eq!(r["cgroup"], json!(s.client_cg.path));
    assert_eq!(r["credentials"][0]["fingerprint"], json!(want_fp));
    // nginx reads the same request with read(2).
    let srv = one(&out, "server", "/plain");
    assert_eq!(srv["tls"], json!(false));
    assert_eq!(srv["credentials"][0]["fingerprint"], json!(want_fp));
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}

#[test]
fn client_process_started_after_the_monitor_is_seen() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    // A process that did not exist when the probes were attached, with another TLS client
    // stack on top of libssl (Python's ssl module: SSL_write_ex/SSL_read_ex).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tok = token();
    let pid = s.python_split(true, "/late", &format!("{}\r\n\r\n", bearer(&tok)), "");
    let want_fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(&out, "client", "/late");
    assert_eq!(r["pid"], json!(pid));
    assert_eq!(r["tls"], json!(true));
    assert_eq!(r["credentials"][0]["fingerprint"], json!(want_fp));
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn headers_split_over_two_writes_are_reported_whole() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let tok = token();
    // The Authorization header itself is cut in the middle of its name.
    let tls_pid = s.python_split(
        true,
        "/split-tls",
        "Authorization: Bea",
        &format!("rer {tok}\r\n\r\n"),
    );
    let plain_pid = s.python_split(
        false,
        "/split-plain",
        "Authorization: Bea",
        &format!("rer {tok}\r\n\r\n"),
    );
    let want_fp = mon.fingerprint(&tok);
    let out = mon.stop();

    for (path, pid, tls) in [
        ("/split-tls", tls_pid, true),
        ("/split-plain", plain_pid, false),
    ] {
        let r = one(&out, "client", path);
        assert_eq!(r["pid"], json!(pid));
        assert_eq!(r["tls"], json!(tls));
        assert_eq!(
            r["credentials"],
            json!([{"header": "authorization", "kind": "bearer", "fingerprint": want_fp}])
        );
        let srv = one(&out, "server", path);
        assert_eq!(srv["credentials"][0]["fingerprint"], json!(want_fp));
    }
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}

/// A JWT-shaped token of about `size` bytes (header.payload.signature, base64url).
fn big_jwt(size: usize) -> String {
    let pad = "x".repeat(size.saturating_sub(600) * 3 / 4);
    jwt(
        json!({"iss": "https://issuer.test", "sub": "svc-payments", "exp": 4102444800u64, "pad": pad}),
    )
}

#[test]
fn long_jwt_and_a_request_larger_than_one_copy_are_reported_whole() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let jwt = big_jwt(3 * 1024);
    assert!(jwt.len() >= 3 * 1024, "{}", jwt.len());
    s.curl("https://server.test/jwt", &[bearer(&jwt)]);
    // Headers of ~9 KiB: the kernel copies them in 4 KiB pieces.
    let tok = token();
    let filler = format!("X-Filler: {}", "f".repeat(8 * 1024));
    s.curl("https://server.test/big-head", &[filler, bearer(&tok)]);
    let (fp_jwt, fp_tok) = (mon.fingerprint(&jwt), mon.fingerprint(&tok));
    let out = mon.stop();

    for side in ["client", "server"] {
        let r = one(&out, side, "/jwt");
        assert_eq!(r["credentials"][0]["kind"], json!("bearer-jwt"));
        assert_eq!(r["credentials"][0]["fingerprint"], json!(fp_jwt));
        let r = one(&out, side, "/big-head");
        assert_eq!(r["credentials"][0]["fingerprint"], json!(fp_tok));
    }
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&jwt);
    out.assert_no_secret(&tok);
}

#[test]
fn replay_of_a_recorded_log_reproduces_the_live_output() {
    use std::os::unix::fs::PermissionsExt;
    let _g = serial();
    let s = setup();
    // The log holds plaintext by design: it lives outside the monitor's scanned directory.
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("events.jsonl");
    let mon = Monitor::start(&["--record", log.to_str().unwrap(), "--node", "node-a"]);
    let key = mon.key_file.clone();
    let keep = tempfile::tempdir().unwrap();
    let tok = token();
    s.curl("https://server.test/rec-tls", &[bearer(&tok)]);
    s.curl("http://server.test/rec-plain", &[bearer(&tok)]);
    s.python_split(
        true,
        "/rec-split",
        "Authorization: Bea",
        &format!("rer {tok}\r\n\r\n"),
    );
    let key_copy = keep.path().join("key");
    std::fs::copy(&key, &key_copy).unwrap();
    let live = mon.stop();
    out_has_paths(&live, &["/rec-tls", "/rec-plain", "/rec-split"]);
    live.assert_no_secret(&tok);
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args([
            "replay",
            "--events",
            log.to_str().unwrap(),
            "--key-file",
            key_copy.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let stdout = String::from_utf8(replay.stdout).unwrap();
    let mut replayed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut lived = live.records.clone();
    let key_of = |v: &Value| v.to_string();
    replayed.sort_by_key(key_of);
    lived.sort_by_key(key_of);
    assert_eq!(replayed, lived, "replay differs from the live output");
    assert!(!stdout.contains(&tok) && !String::from_utf8_lossy(&replay.stderr).contains(&tok));
}

fn out_has_paths(out: &Output, paths: &[&str]) {
    for p in paths {
        assert!(
            !out.find(&[("/path", json!(p))]).is_empty(),
            "no record for {p}: {:#?}",
            out.records
        );
    }
}

#[test]
fn cgroup_selection_reports_only_the_selected_workload() {
    let _g = serial();
    let s = setup();
    let other = Cgroup::new(&format!(
        "{}-other",
        s.client_cg.path.trim_start_matches('/')
    ));
    let mon = Monitor::start(&["--cgroup", &s.client_cg.path]);
    let tok = token();
    let pid = s.curl("https://server.test/selected", &[bearer(&tok)]);
    // The same request from a cgroup that was not selected.
    let argv = curl_args(
        &s.lab,
        &s.nginx,
        &[bearer(&tok)],
        &[],
        "https://server.test/not-selected",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(
        other
            .spawn(&s.lab.client_ns, &argv)
            .wait()
            .unwrap()
            .success()
    );
    let out = mon.stop();

    let r = one(&out, "client", "/selected");
    assert_eq!(r["pid"], json!(pid));
    assert!(
        out.find(&[("/path", json!("/not-selected"))]).is_empty(),
        "unselected cgroup reported"
    );
    // nginx runs in the server cgroup, which was not selected either.
    assert!(
        out.find(&[("/side", json!("server"))]).is_empty(),
        "server side reported"
    );
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn egress_probe_set_reports_requests_and_keeps_responses_in_the_kernel() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&["--probes", "egress"]);
    let tok = token();
    s.curl("https://server.test/egress-tls", &[bearer(&tok)]);
    s.curl("http://server.test/egress-plain", &[bearer(&tok)]);
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();
    for p in ["/egress-tls", "/egress-plain"] {
        assert_eq!(
            one(&out, "client", p)["credentials"][0]["fingerprint"],
            json!(fp)
        );
    }
    // Responses (nginx SSL_write and writev, curl recvfrom) never left the kernel.
    assert_eq!(
        out.summary["pipeline"]["responses"], 0,
        "{:#?}",
        out.summary
    );
    let skipped: u64 = out.summary["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["skipped"].as_u64().unwrap())
        .sum();
    assert!(skipped >= 3, "{:#?}", out.summary["kernel"]);
    assert_eq!(out.events_lost(), 0);
}

/// GET on the monitor's metrics address; (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

/// Sum of every series of `family` whose labels contain all of `with` (`key="value"`).
fn metric_sum(body: &str, family: &str, with: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(head, _)| {
            head.split('{').next() == Some(family) && with.iter().all(|w| head.contains(w))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

#[test]
fn metrics_count_the_traffic_the_test_caused() {
    let _g = serial();
    let s = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // Only the test's client and server are watched: the counts are exact.
    let mon = Monitor::start(&[
        "--metrics-addr",
        &addr,
        "--bpf-stats",
        "--cgroup",
        &s.client_cg.path,
        "--cgroup",
        &s.server_cg.path,
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !http_get(&addr, "/ready").0.contains("200") {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let tok = token();
    for i in 0..3 {
        s.curl(&format!("https://server.test/metered/{i}"), &[bearer(&tok)]);
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("# TYPE monitor_requests counter\n"), "{body}");
    // Three requests, each seen by curl (SSL_write) and by nginx (SSL_read), with a token
    // each.
    assert_eq!(
        metric(&body, "monitor_requests_total{protocol=\"http/1.1\"}"),
        6.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "monitor_credentials_total{kind=\"bearer\"}"),
        6.0,
        "{body}"
    );
    assert_eq!(
        metric_sum(&body, "monitor_credentials_total", &[]),
        6.0,
        "{body}"
    );
    assert!(metric_sum(&body, "monitor_events_total", &["program=\"ssl_write\""]) >= 3.0);
    assert_eq!(metric_sum(&body, "monitor_events_lost_total", &[]), 0.0);
    assert!(
        metric(
            &body,
            "monitor_tls_attach_total{stack=\"openssl\",result=\"attached\"}"
        ) >= 1.0,
        "{body}"
    );
    assert!(metric(&body, "monitor_tls_files_attached") >= 1.0);
    assert!(metric(&body, "monitor_connections_evicted_total") == 0.0);
    assert!(metric(&body, "monitor_identity_cache_hits_total{cache=\"exe\"}") > 0.0);
    // Ring buffer positions: the test's records went through it (mmap and exit records of
    // every process may be in flight).
    let size = metric(&body, "monitor_ringbuf_size_bytes");
    assert_eq!(size, (16u64 << 20) as f64);
    let produced = metric(&body, "monitor_ringbuf_produced_bytes_total");
    let consumed = metric(&body, "monitor_ringbuf_consumed_bytes_total");
    assert!(consumed > 0.0 && consumed <= produced, "{body}");
    assert_eq!(
        metric(&body, "monitor_ringbuf_pending_bytes"),
        produced - consumed
    );
    assert!(metric(&body, "monitor_ringbuf_pending_peak_bytes") < size);
    // --bpf-stats: the kernel counted the programs' runs and time.
    assert_eq!(metric(&body, "monitor_bpf_stats_enabled"), 1.0);
    assert!(
        metric(
            &body,
            "monitor_program_runs_total{program=\"sys_enter_write\"}"
        ) > 0.0
    );
    assert!(metric_sum(&body, "monitor_program_runs_total", &[]) >= 6.0);
    assert!(metric_sum(&body, "monitor_program_run_seconds_total", &[]) > 0.0);
    assert_eq!(metric(&body, "monitor_ready"), 1.0);
    assert!(body.contains("monitor_build_info{version=\""));
    assert!(!body.contains(&tok));
    assert!(!body.contains("Bearer"));
    assert!(http_get(&addr, "/nope").0.contains("404"));
    let out = mon.stop();
    // Per CPU, the kernel counters add up to the per-program totals of the exit summary
    // (nothing in the watched cgroups ran between the scrape and the stop).
    for prog in out.summary["kernel"].as_array().unwrap() {
        let name = prog["program"].as_str().unwrap();
        if ["exec", "exit", "mmap"].contains(&name) {
            continue;
        }
        let want = format!("program=\"{name}\"");
        for (family, field) in [
            ("monitor_events_total", "events"),
            ("monitor_events_lost_total", "lost"),
        ] {
            assert_eq!(
                metric_sum(&body, family, &[&want]),
                prog[field].as_f64().unwrap(),
                "{family} of {name} per CPU vs the exit summary {prog}\n{body}"
            );
        }
    }
}
