//! Alert outputs: OCSF and Falco shapes, the rotating alerts file, and webhook delivery against
//! a local HTTP server (127.0.0.1) that fails the first attempts. No root needed.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use monitor::{
    alert::{Alert, AlertCredential, AlertDestination, AlertSource, SCHEMA, Severity},
    notify::{
        AlertFormat, Notifier, NotifyArgs, WebhookConfig, render,
        webhook::{self, DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER},
    },
};
use serde_json::{Value, json};

/// A golden alert: every field set, no secret (fingerprints and claims only).
fn golden() -> Alert {
    Alert {
        schema: SCHEMA.into(),
        time: "2026-11-23T10:31:44.123456Z".into(),
        id: "tr-7f3e9a0b1c2d".into(),
        rule: "token-replay".into(),
        severity: Severity::Critical,
        summary: "token 3f2a9c0d presented by intruder; bound to payments".into(),
        credential: AlertCredential {
            fingerprint: "3f2a9c0d112233445566778899aabbcc".into(),
            kind: "jwt".into(),
            claims: BTreeMap::from([
                ("iss".into(), json!("https://issuer.example")),
                ("sub".into(), json!("system:serviceaccount:payments:api")),
                ("exp".into(), json!(1_795_000_000)),
            ]),
        },
        source: AlertSource {
            workload: "intruder".into(),
            pid: 4242,
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            cgroup: Some("/sys/fs/cgroup/demo/intruder".into()),
            container_id: Some("0123456789ab".into()),
            pod: Some("attack/intruder-5d9f".into()),
            node: "node-1".into(),
            ip: Some("10.0.0.9".parse().unwrap()),
            port: Some(53122),
            ..Default::default()
        },
        destination: AlertDestination {
            workload: Some("ledger".into()),
            ip: Some("10.0.0.20".parse().unwrap()),
            port: Some(8443),
            host: Some("ledger.internal".into()),
            method: Some("POST".into()),
            path: Some("/v1/transfer".into()),
        },
        expected: json!({"bound_to": "payments"}),
        first_seen: Some("2026-11-23T09:00:00.000000Z".into()),
        first_seen_by: Some("payments".into()),
        owner: Some(json!({"team": "payments", "contact": "#payments-oncall"})),
        references: vec![
            "OWASP-NHI9 NHI Reuse".into(),
            "MITRE-ATT&CK T1550.001 Application Access Token".into(),
        ],
        count: 3,
    }
}

// ---------------------------------------------------------------- formats

#[test]
fn v1_is_the_alert_as_is() {
    let a = golden();
    let v = render(&a, AlertFormat::V1);
    assert_eq!(v, serde_json::to_value(&a).unwrap());
    let back: Alert = serde_json::from_value(v).unwrap();
    assert_eq!(back, a);
}

#[test]
fn ocsf_detection_finding_shape() {
    let v = render(&golden(), AlertFormat::Ocsf);
    // Every attribute the schema requires of class 2004 (base event + finding).
    for k in [
        "activity_id",
        "category_uid",
        "class_uid",
        "finding_info",
        "metadata",
        "severity_id",
        "time",
        "type_uid",
    ] {
        assert!(v.get(k).is_some_and(|x| !x.is_null()), "missing {k}: {v:#}");
    }
    assert_eq!(v["class_uid"], 2004);
    assert_eq!(v["category_uid"], 2);
    assert_eq!(v["activity_id"], 1);
    assert_eq!(v["type_uid"], 200401);
    assert_eq!(v["severity_id"], 5);
    assert_eq!(v["severity"], "Critical");
    assert_eq!(v["status_id"], 1);
    assert_eq!(v["count"], 3);
    // time is epoch milliseconds.
    assert_eq!(v["time"], 1_795_429_904_123u64);
    // Required sub-attributes: metadata.version, metadata.product.vendor_name, finding_info.uid.
    assert_eq!(v["metadata"]["version"], "1.3.0");
    assert_eq!(v["metadata"]["product"]["name"], "monitor");
    assert!(v["metadata"]["product"]["vendor_name"].is_string());
    assert_eq!(v["metadata"]["uid"], "tr-7f3e9a0b1c2d");
    let fi = &v["finding_info"];
    assert_eq!(fi["uid"], "tr-7f3e9a0b1c2d");
    assert_eq!(fi["title"], "token-replay");
    assert_eq!(fi["types"], json!(["token-replay"]));
    assert!(fi["desc"].as_str().unwrap().contains("intruder"));
    assert_eq!(fi["created_time"], v["time"]);
    assert_eq!(fi["first_seen_time"], 1_795_424_400_000u64);
    assert_eq!(fi["attacks"][0]["technique"]["uid"], "T1550.001");
    // Evidence: endpoints, process, HTTP request.
    let ev = &v["evidences"][0];
    assert_eq!(
        ev["src_endpoint"],
        json!({"ip": "10.0.0.9", "port": 53122, "name": "intruder", "container": {"uid": "0123456789ab"}})
    );
    assert_eq!(ev["dst_endpoint"]["ip"], "10.0.0.20");
    assert_eq!(ev["dst_endpoint"]["port"], 8443);
    assert_eq!(ev["dst_endpoint"]["hostname"], "ledger.internal");
    assert_eq!(ev["process"]["pid"], 4242);
    assert_eq!(ev["process"]["file"]["path"], "/usr/bin/curl");
    assert_eq!(ev["http_request"]["http_method"], "POST");
    assert_eq!(ev["http_request"]["url"]["path"], "/v1/transfer");
    assert!(v["resources"].as_array().is_some_and(|r| !r.is_empty()));
    let obs = v["observables"].as_array().unwrap();
    assert!(
        obs.iter()
            .any(|o| o["value"] == "3f2a9c0d112233445566778899aabbcc"
                && o["type_id"] == 19
                && o["name"].is_string())
    );
    for o in obs {
        assert!(
            o["type_id"].is_u64() && o["name"].is_string() && o["value"].is_string(),
            "{o}"
        );
    }
    // The rest is kept, unmapped.
    assert_eq!(v["unmapped"]["expected"], json!({"bound_to": "payments"}));
    assert_eq!(v["unmapped"]["owner"]["team"], "payments");
    assert_eq!(
        v["unmapped"]["credential"]["claims"]["sub"],
        "system:serviceaccount:payments:api"
    );

    // Severity mapping and a minimal alert (no optional fields) still has the required ones.
    for (s, id) in [
        (Severity::Low, 2),
        (Severity::Medium, 3),
        (Severity::High, 4),
        (Severity::Critical, 5),
    ] {
        let mut a = minimal();
        a.severity = s;
        let v = render(&a, AlertFormat::Ocsf);
        assert_eq!(v["severity_id"], id);
        assert_eq!(v["class_uid"], 2004);
        assert!(v["finding_info"]["uid"].is_string());
    }
}

fn minimal() -> Alert {
    Alert {
        schema: SCHEMA.into(),
        time: "2026-11-23T10:31:44Z".into(),
        id: "x".into(),
        rule: "cleartext-credential".into(),
        severity: Severity::Medium,
        summary: "s".into(),
        credential: AlertCredential::default(),
        source: AlertSource::default(),
        destination: AlertDestination::default(),
        expected: Value::Null,
        first_seen: None,
        first_seen_by: None,
        owner: None,
        references: vec![],
        count: 1,
    }
}

#[test]
fn falco_output_shape() {
    let v = render(&golden(), AlertFormat::Falco);
    // What Falcosidekick's FalcoPayload decodes.
    assert!(
        v["output"]
            .as_str()
            .is_some_and(|s| s.contains("token-replay"))
    );
    assert_eq!(v["priority"], "Critical");
    assert_eq!(v["rule"], "token-replay");
    assert_eq!(v["source"], "monitor");
    assert_eq!(v["hostname"], "node-1");
    assert_eq!(v["time"], "2026-11-23T10:31:44.123456000Z");
    let uuid = v["uuid"].as_str().unwrap();
    assert_eq!(uuid.len(), 36);
    assert_eq!(uuid.matches('-').count(), 4);
    assert!(v["tags"].as_array().unwrap().iter().all(Value::is_string));
    assert!(v["tags"].as_array().unwrap().contains(&json!("T1550.001")));
    let f = v["output_fields"].as_object().unwrap();
    assert_eq!(f["proc.pid"], 4242);
    assert_eq!(f["proc.name"], "curl");
    assert_eq!(f["proc.exepath"], "/usr/bin/curl");
    assert_eq!(f["container.id"], "0123456789ab");
    assert_eq!(f["k8s.ns.name"], "attack");
    assert_eq!(f["k8s.pod.name"], "intruder-5d9f");
    assert_eq!(f["fd.cip"], "10.0.0.9");
    assert_eq!(f["fd.cport"], 53122);
    assert_eq!(f["fd.sip"], "10.0.0.20");
    assert_eq!(f["fd.sport"], 8443);
    assert_eq!(f["monitor.fingerprint"], "3f2a9c0d112233445566778899aabbcc");
    assert_eq!(f["monitor.source_workload"], "intruder");
    assert_eq!(f["monitor.destination_workload"], "ledger");
    assert_eq!(f["monitor.owner.team"], "payments");
    // Every output field is a scalar (Falcosidekick outputs template and label on them).
    for (k, x) in f {
        assert!(x.is_string() || x.is_number() || x.is_boolean(), "{k}: {x}");
    }
    // Priorities.
    for (s, p) in [
        (Severity::Low, "Notice"),
        (Severity::Medium, "Warning"),
        (Severity::High, "Error"),
        (Severity::Critical, "Critical"),
    ] {
        let mut a = minimal();
        a.severity = s;
        assert_eq!(render(&a, AlertFormat::Falco)["priority"], p);
    }
    // Deterministic: one alert, one rendering.
    assert_eq!(v, render(&golden(), AlertFormat::Falco));
}

// ---------------------------------------------------------------- alerts file

#[test]
fn notifier_file_rotates_and_keeps_k() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.jsonl");
    let args = NotifyArgs {
        alert_format: AlertFormat::Ocsf,
        alerts_file_max_mb: 1,
        alerts_file_keep: 2,
        ..Default::default()
    };
    let mut n = Notifier::new(&args, Some(path.clone())).unwrap();
    let line_len = n.render_line(&golden()).len() as u64 + 1;
    let per_file = (1024 * 1024) / line_len;
    let total = per_file * 3 + 10; // four files' worth: PATH, .1, .2 and one dropped
    for i in 0..total {
        let mut a = golden();
        a.count = 1_000 + i % 10; // same length
        n.send(&a);
        if i % 100 == 0 {
            n.flush();
        }
    }
    n.flush();
    let stats = n.stats();
    assert_eq!(stats["file"]["rotations"], 3);
    assert_eq!(stats["file"]["errors"], 0);
    let name = |s: &str| dir.path().join(format!("alerts.jsonl{s}"));
    for s in ["", ".1", ".2"] {
        let meta = std::fs::metadata(name(s)).unwrap();
        assert!(meta.len() <= 1024 * 1024, "{s}: {}", meta.len());
        let text = std::fs::read_to_string(name(s)).unwrap();
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["class_uid"], 2004);
        }
    }
    assert!(!name(".3").exists());
    assert_eq!(
        std::fs::read_to_string(name("")).unwrap().lines().count() as u64,
        10
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    }
    n.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------- webhook

#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Read the request, then reset the connection (RST, no response).
    Reset,
    /// Read the request, then say nothing for this long.
    Hang(Duration),
}

#[derive(Debug, Clone)]
struct Seen {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    reply: Option<Reply>,
}

/// A tiny HTTP/1.1 server on 127.0.0.1: replies follow `script`, then 200. One thread per
/// connection (keep-alive honoured); stops with the test process.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(script: Vec<Reply>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook/secret-path-token", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        {
            let seen = seen.clone();
            thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (seen, next, script) = (seen.clone(), next.clone(), script.clone());
                    thread::spawn(move || serve(conn, &seen, &next, &script));
                }
            });
        }
        Server { url, seen }
    }

    /// The same over TLS, with a fresh self-signed certificate for 127.0.0.1 (its PEM is
    /// returned to be trusted through `--webhook-ca-file`).
    fn start_tls(script: Vec<Reply>) -> (Server, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let pem = ck.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/hook", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        {
            let seen = seen.clone();
            thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let (seen, next, script) = (seen.clone(), next.clone(), script.clone());
                    let tls = tls.clone();
                    thread::spawn(move || {
                        let fd = conn.as_raw_fd();
                        let Ok(sc) = rustls::ServerConnection::new(tls) else {
                            return;
                        };
                        serve_on(
                            rustls::StreamOwned::new(sc, conn),
                            fd,
                            &seen,
                            &next,
                            &script,
                        );
                    });
                }
            });
        }
        (Server { url, seen }, pem)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn accepted(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| matches!(s.reply, Some(Reply::Status(200))))
            .collect()
    }
}

fn serve(c: TcpStream, seen: &Mutex<Vec<Seen>>, next: &AtomicUsize, script: &[Reply]) {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let fd = c.as_raw_fd();
    serve_on(c, fd, seen, next, script);
}

fn serve_on(
    mut c: impl Read + Write,
    fd: std::os::fd::RawFd,
    seen: &Mutex<Vec<Seen>>,
    next: &AtomicUsize,
    script: &[Reply],
) {
    let mut buf = Vec::new();
    loop {
        // Read one request: head, then Content-Length bytes.
        let (head_len, headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut hs);
            let parsed = req.parse(&buf);
            if parsed.is_err() {
                // Not HTTP (a TLS ClientHello, say): answer plain text and hang up.
                let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                return;
            }
            if let Ok(httparse::Status::Complete(n)) = parsed {
                let h: HashMap<String, String> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (n, h);
            }
            let mut chunk = [0u8; 4096];
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_len + len {
            let mut chunk = [0u8; 4096];
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        let body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);
        let i = next.fetch_add(1, Ordering::SeqCst);
        let reply = script.get(i).copied().unwrap_or(Reply::Status(200));
        seen.lock().unwrap().push(Seen {
            headers,
            body,
            reply: Some(reply),
        });
        match reply {
            Reply::Status(s) => {
                let msg = format!("HTTP/1.1 {s} X\r\nContent-Length: 2\r\n\r\nok");
                if c.write_all(msg.as_bytes()).is_err() {
                    return;
                }
            }
            Reply::Reset => {
                reset(fd);
                return;
            }
            Reply::Hang(d) => {
                thread::sleep(d);
                return;
            }
        }
    }
}

/// Closes with RST: SO_LINGER on, timeout 0.
fn reset(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

const SECRET: &[u8] = b"test-only-webhook-key";

fn config(url: &str) -> WebhookConfig {
    let mut cfg = WebhookConfig::new(url.parse().unwrap());
    cfg.secret = Some(webhook::Secret::new(SECRET.to_vec()));
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(80);
    cfg.max_attempts = 6;
    cfg.timeout = Duration::from_secs(3);
    cfg.env_proxy = false;
    cfg
}

fn wait_until(mut done: impl FnMut() -> bool, limit: Duration) {
    let t = Instant::now();
    while !done() && t.elapsed() < limit {
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn webhook_retries_then_delivers_once_signed() {
    let srv = Server::start(vec![Reply::Status(500), Reply::Reset, Reply::Status(503)]);
    let mut n = Notifier::with_webhook(AlertFormat::Falco, None, Some(config(&srv.url))).unwrap();
    let a = golden();
    n.send(&a);
    wait_until(
        || n.webhook_stats().unwrap().sent == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!(
        (s.sent, s.retried, s.failed, s.rejected, s.dropped, s.queued),
        (1, 3, 0, 0, 0, 0),
        "{s:?}"
    );

    let seen = srv.seen();
    assert_eq!(seen.len(), 4, "three failures, then the accepted attempt");
    let ok = srv.accepted();
    assert_eq!(ok.len(), 1, "the alert arrives exactly once");
    let got = &ok[0];
    // The body is the rendered alert, byte for byte, and the signature verifies over it.
    assert_eq!(got.body, n.render_line(&a));
    let v: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(v["rule"], "token-replay");
    assert_eq!(got.headers["content-type"], "application/json");
    let sig = &got.headers[&SIGNATURE_HEADER.to_ascii_lowercase()];
    assert!(webhook::verify(SECRET, &got.body, sig), "{sig}");
    assert!(!webhook::verify(b"wrong", &got.body, sig));
    assert_eq!(*sig, webhook::sign(SECRET, &got.body));
    let ts: u64 = got.headers[&TIMESTAMP_HEADER.to_ascii_lowercase()]
        .parse()
        .unwrap();
    assert!(ts > 1_700_000_000);
    // One delivery id across the retries; it is the Falco uuid.
    let ids: Vec<_> = seen
        .iter()
        .map(|s| s.headers[&DELIVERY_HEADER.to_ascii_lowercase()].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]));
    assert_eq!(ids[0], v["uuid"]);
    // The secret is in no header.
    for s in &seen {
        for val in s.headers.values() {
            assert!(!val.contains("test-only-webhook-key"));
        }
    }
    let fin = n.shutdown(Duration::from_secs(2));
    assert_eq!(fin["webhook"]["sent"], 1);
    assert_eq!(
        fin["webhook"]["target"],
        srv.url.split("/hook").next().unwrap()
    );
}

#[test]
fn webhook_4xx_is_not_retried() {
    let srv = Server::start(vec![Reply::Status(400)]);
    let n = Notifier::with_webhook(AlertFormat::V1, None, Some(config(&srv.url))).unwrap();
    let mut n = n;
    n.send(&golden());
    wait_until(
        || n.webhook_stats().unwrap().rejected == 1,
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_millis(100)); // a retry, if any, would have come by now
    let s = n.webhook_stats().unwrap();
    assert_eq!(
        (s.sent, s.retried, s.rejected, s.failed),
        (0, 0, 1, 0),
        "{s:?}"
    );
    assert_eq!(srv.seen().len(), 1);
    // The next alert goes through (the script is spent).
    let mut b = golden();
    b.count += 1;
    n.send(&b);
    let fin = n.shutdown(Duration::from_secs(5));
    assert_eq!(fin["webhook"]["sent"], 1);
    assert_eq!(fin["webhook"]["rejected"], 1);
}

#[test]
fn webhook_gives_up_after_max_attempts() {
    let srv = Server::start(vec![Reply::Status(500); 10]);
    let mut cfg = config(&srv.url);
    cfg.max_attempts = 3;
    let mut n = Notifier::with_webhook(AlertFormat::V1, None, Some(cfg)).unwrap();
    n.send(&golden());
    wait_until(
        || n.webhook_stats().unwrap().failed == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!((s.sent, s.retried, s.failed), (0, 2, 1), "{s:?}");
    assert_eq!(srv.seen().len(), 3);
    n.shutdown(Duration::from_millis(100));
}

#[test]
fn webhook_full_queue_counts_drops_and_never_blocks() {
    // The receiver takes the first request and sits on it: the worker is busy, the queue fills.
    let srv = Server::start(vec![Reply::Hang(Duration::from_secs(3))]);
    let mut cfg = config(&srv.url);
    cfg.queue = 2;
    cfg.timeout = Duration::from_secs(2);
    let mut n = Notifier::with_webhook(AlertFormat::V1, None, Some(cfg)).unwrap();
    let mut a = golden();
    n.send(&a);
    wait_until(|| !srv.seen().is_empty(), Duration::from_secs(5)); // the worker is in flight
    let t = Instant::now();
    for i in 0..50 {
        a.count = 10 + i;
        n.send(&a);
    }
    assert!(t.elapsed() < Duration::from_millis(500), "send blocked");
    let s = n.webhook_stats().unwrap();
    assert_eq!(s.queued, 2, "{s:?}");
    assert_eq!(s.dropped, 48, "{s:?}");
    // Shutdown with a short deadline returns promptly; the queued ones count as failed.
    let t = Instant::now();
    let fin = n.shutdown(Duration::from_millis(100));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "shutdown held the caller"
    );
    assert_eq!(fin["webhook"]["dropped"], 48);
    assert_eq!(fin["webhook"]["sent"], 0);
}

#[test]
fn webhook_down_is_counted_not_fatal() {
    // Nothing listens on this port (bound then closed): connection refused on every attempt.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(&format!("http://127.0.0.1:{port}/x"));
    cfg.max_attempts = 3;
    let mut n = Notifier::with_webhook(AlertFormat::Ocsf, None, Some(cfg)).unwrap();
    n.send(&golden());
    wait_until(
        || n.webhook_stats().unwrap().failed == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!((s.failed, s.retried), (1, 2), "{s:?}");
    n.shutdown(Duration::from_millis(100));
}

#[test]
fn webhook_https_to_plain_server_fails_cleanly() {
    // The TLS path (rustls) runs: a plain-HTTP peer fails the handshake, which is retried
    // and counted, never a panic.
    let srv = Server::start(vec![]);
    let url = srv.url.replacen("http://", "https://", 1);
    let mut cfg = config(&url);
    cfg.max_attempts = 2;
    let mut n = Notifier::with_webhook(AlertFormat::V1, None, Some(cfg)).unwrap();
    n.send(&golden());
    wait_until(
        || n.webhook_stats().unwrap().failed == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!((s.sent, s.failed), (0, 1), "{s:?}");
    n.shutdown(Duration::from_millis(100));
}

#[test]
fn notify_args_parse_and_secret_file() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        n: NotifyArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "k\n").unwrap();
    let cli = Cli::try_parse_from([
        "x",
        "--alert-format",
        "falco",
        "--webhook",
        "https://hooks.example.com/T0/SECRETPATH",
        "--webhook-secret-file",
        secret.to_str().unwrap(),
        "--webhook-queue",
        "5",
        "--webhook-max-attempts",
        "4",
        "--webhook-max-age",
        "30s",
        "--alerts-file-max-mb",
        "7",
        "--alerts-file-keep",
        "3",
    ])
    .unwrap();
    assert_eq!(cli.n.alert_format, AlertFormat::Falco);
    assert_eq!(cli.n.alerts_file_max_mb, 7);
    assert_eq!(cli.n.alerts_file_keep, 3);
    assert!(!format!("{:?}", cli.n).contains("SECRETPATH"));
    let cfg = cli.n.webhook_config().unwrap().unwrap();
    assert_eq!(cfg.queue, 5);
    assert_eq!(cfg.max_attempts, 4);
    assert_eq!(cfg.max_age, Duration::from_secs(30));
    assert!(!format!("{cfg:?}").contains("SECRETPATH"));
    assert!(Cli::try_parse_from(["x", "--webhook", "ftp://x/"]).is_err());
    let d = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(d.n.alert_format, AlertFormat::V1);
    assert_eq!(d.n.alerts_file_max_mb, 100);
    assert_eq!(d.n.alerts_file_keep, 5);
    assert_eq!(d.n.webhook_queue, 10_000);
    assert!(d.n.webhook.is_none());
}

#[test]
fn webhook_https_with_ca_file_delivers() {
    let (srv, pem) = Server::start_tls(vec![Reply::Status(503)]);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let mut cfg = config(&srv.url);
    cfg.ca_file = Some(ca);
    let mut n = Notifier::with_webhook(AlertFormat::Ocsf, None, Some(cfg)).unwrap();
    let a = golden();
    n.send(&a);
    wait_until(
        || n.webhook_stats().unwrap().sent == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!((s.sent, s.retried, s.failed), (1, 1, 0), "{s:?}");
    let ok = srv.accepted();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].body, n.render_line(&a));
    let sig = &ok[0].headers[&SIGNATURE_HEADER.to_ascii_lowercase()];
    assert!(webhook::verify(SECRET, &ok[0].body, sig));
    n.shutdown(Duration::from_secs(1));
}

#[test]
fn webhook_https_untrusted_certificate_fails() {
    // Without the CA file the bundled web roots do not trust a self-signed certificate.
    let (srv, _pem) = Server::start_tls(vec![]);
    let mut cfg = config(&srv.url);
    cfg.max_attempts = 2;
    let mut n = Notifier::with_webhook(AlertFormat::V1, None, Some(cfg)).unwrap();
    n.send(&golden());
    wait_until(
        || n.webhook_stats().unwrap().failed == 1,
        Duration::from_secs(10),
    );
    let s = n.webhook_stats().unwrap();
    assert_eq!((s.sent, s.failed), (0, 1), "{s:?}");
    assert!(srv.accepted().is_empty());
    n.shutdown(Duration::from_millis(100));
}
