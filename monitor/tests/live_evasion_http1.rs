//! HTTP/1 requests nginx accepts but a strict parser would drop (root, real kernel programs):
//! empty lines before the request line, methods outside the common list, more than 128
//! headers, a target that is not UTF-8. Each is written byte for byte by a raw client and
//! must be reported, with its credential's fingerprint, by both the client (the sender's
//! write) and the server (nginx's read), and its secret must appear in no output.

mod common;

use common::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "openssl", "ip", "ss", "python3"];

struct Setup {
    lab: Lab,
    _server_cg: Cgroup,
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
        _server_cg: server_cg,
        client_cg,
        nginx,
    }
}

impl Setup {
    /// Sends `data` as it is in one write (over TLS or not) and returns nginx's status line.
    fn send(&self, tls: bool, data: &[u8]) -> String {
        let script = r#"
import socket, ssl, sys
ip, port, tls, cafile, data = sys.argv[1:6]
s = socket.create_connection((ip, int(port)), timeout=10)
if tls == "1":
    s = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname="server.test")
s.sendall(bytes.fromhex(data))
resp = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    resp += chunk
print(resp.split(b"\r\n")[0].decode())
"#;
        let cert = self.nginx.cert.display().to_string();
        let hex = hex::encode(data);
        let out = self
            .client_cg
            .command(
                &self.lab.client_ns,
                &[
                    "/usr/bin/python3",
                    "-c",
                    script,
                    &self.lab.server_ip,
                    if tls { "443" } else { "80" },
                    if tls { "1" } else { "0" },
                    &cert,
                    &hex,
                ],
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "raw client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn token() -> String {
    format!("tok-{}", random_hex(24))
}

/// The request at `path` must be reported once by each side, by that side's process, with
/// the credentials' fingerprints `want` in order.
fn assert_both_sides(out: &Output, path: &str, method: &str, want: &[Value]) {
    for (side, comm) in [("client", "python3"), ("server", "nginx")] {
        let found = out.find(&[("/side", json!(side)), ("/path", json!(path))]);
        assert_eq!(
            found.len(),
            1,
            "expected one {side} record for {path:?}, got {found:#?}\nall: {:#?}",
            out.records
        );
        let r = found[0];
        assert_eq!(r["method"], json!(method), "{side} {path}");
        assert_eq!(r["comm"], json!(comm), "{side} {path}");
        assert_eq!(r["protocol"], json!("http/1.1"));
        let got: Vec<_> = r["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["fingerprint"].clone())
            .collect();
        assert_eq!(got, want, "{side} {path}: {r:#}");
    }
}

fn request(method: &str, path: &str, extra: &str, tok: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: server.test\r\n{extra}Authorization: Bearer {tok}\r\n\
         Connection: close\r\n\r\n"
    )
}

#[test]
fn empty_lines_before_the_request_line_and_unknown_methods_are_seen() {
    let _g = serial();
    let s = setup();
    // Trace logging: the secrets must not reach stderr at any level.
    let mon = Monitor::start_wrapped(&["env", "MONITOR_LOG=trace"], &[], None);
    let mut sent = Vec::new();
    for tls in [false, true] {
        let t = if tls { "tls" } else { "plain" };
        let cases = [
            ("GET", format!("/crlf-{t}"), "\r\n\r\n\r\n"),
            ("PROPFIND", format!("/propfind-{t}"), ""),
            ("FOO-BAR", format!("/unknown-method-{t}"), ""),
        ];
        for (method, path, before) in cases {
            let tok = token();
            let req = format!("{before}{}", request(method, &path, "", &tok));
            let status = s.send(tls, req.as_bytes());
            assert!(status.starts_with("HTTP/1.1 "), "nginx said {status:?}");
            sent.push((method, path, tok));
        }
    }
    let want: Vec<_> = sent.iter().map(|(_, _, t)| mon.fingerprint(t)).collect();
    let out = mon.stop();
    assert!(
        out.stderr.contains(" DEBUG ") || out.stderr.contains(" TRACE "),
        "trace logging was not on:\n{}",
        out.stderr
    );
    for ((method, path, tok), fp) in sent.iter().zip(want) {
        assert_both_sides(&out, path, method, &[json!(fp)]);
        out.assert_no_secret(tok);
    }
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn a_request_with_more_than_128_headers_is_seen() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let mut sent = Vec::new();
    for n in [129, 600] {
        let tok = token();
        let pad: String = (0..n).map(|i| format!("X-Pad-{i}: v\r\n")).collect();
        let path = format!("/headers-{n}");
        let status = s.send(false, request("GET", &path, &pad, &tok).as_bytes());
        assert!(status.contains(" 200 "), "nginx said {status:?}");
        sent.push((path, tok));
    }
    let want: Vec<_> = sent.iter().map(|(_, t)| mon.fingerprint(t)).collect();
    let out = mon.stop();
    for ((path, tok), fp) in sent.iter().zip(want) {
        assert_both_sides(&out, path, "GET", &[json!(fp)]);
        out.assert_no_secret(tok);
    }
    assert_eq!(out.events_lost(), 0);
}

#[test]
fn a_target_that_is_not_utf8_is_seen_and_redacted() {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let (tok, qtok) = (token(), token());
    let mut req = b"GET /caf\xe9/x?token=".to_vec();
    req.extend(qtok.as_bytes());
    req.extend(
        format!(" HTTP/1.1\r\nHost: server.test\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    let status = s.send(false, &req);
    assert!(status.contains(" 200 "), "nginx said {status:?}");
    let want = [json!(mon.fingerprint(&tok)), json!(mon.fingerprint(&qtok))];
    let out = mon.stop();
    assert_both_sides(&out, "/caf%E9/x?token=REDACTED", "GET", &want);
    out.assert_no_secret(&tok);
    out.assert_no_secret(&qtok);
    assert_eq!(out.events_lost(), 0);
}
