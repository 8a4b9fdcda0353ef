//! Live tests (root): requests written in one large call or gathered from many iovec segments
//! are seen on both sides, the client's call as well as the server's reads. An evasion pads a
//! request so that its credential lies past what one call used to copy (16 KiB, 4 segments).

mod common;

use common::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "ip", "ss", "python3"];

/// Writes one request per mode on its own connection, each in a single call:
/// - `bighead`: a 17 KiB head, the credential its last header (`sendall`: one write or
///   SSL_write);
/// - `bigbody`: the credential in a small head followed by a 17 KiB body, in the same call;
/// - `sendmsg5` / `writev5`: a head gathered from 5 segments, one of them over 4 KiB, the
///   credential in the fifth (plaintext only: TLS libraries take one buffer);
/// - `hugewrite` / `hugewritev`: a request with a 100 KiB body, longer than a call is copied,
///   in one write (or a writev of head and body), then a second request at `<path>/next` on
///   the same connection: the cut-off body must not swallow it.
const CLIENT: &str = r#"
import os, socket, ssl, sys
ip, port, tls, cafile, mode, path, token = sys.argv[1:8]
s = socket.create_connection((ip, int(port)))
if tls == "1":
    s = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname="server.test")
auth = "Authorization: Bearer %s\r\n" % token
start = "GET %s HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n" % path
if mode == "bighead":
    pad = "".join("X-Pad-%d: %s\r\n" % (i, "p" * 4000) for i in range(5))
    req = (start + pad + auth + "\r\n").encode()
    assert len(req) > 17 * 1024, len(req)
    s.sendall(req)
elif mode == "bigbody":
    body = b"b" * (17 * 1024)
    head = "POST %s HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n" % (path, auth, len(body))
    s.sendall(head.encode() + body)
elif mode.startswith("huge"):
    body = b"b" * (100 * 1024)
    head = "POST %s HTTP/1.1\r\nHost: server.test\r\n%sContent-Length: %d\r\n\r\n" % (path, auth, len(body))
    if mode == "hugewrite":
        s.sendall(head.encode() + body)
    else:
        n = os.writev(s.fileno(), [head.encode(), body])
        assert n == len(head) + len(body), n
    first = b""
    while b"ok\n" not in first:
        chunk = s.recv(4096)
        assert chunk, first
        first += chunk
    nxt = (start.replace(path, path + "/next", 1) + auth + "\r\n").encode()
    if mode == "hugewrite":
        s.sendall(nxt)
    else:
        os.writev(s.fileno(), [nxt])
else:
    segs = [
        ("GET %s HTTP/1.1\r\n" % path).encode(),
        b"Host: server.test\r\n",
        ("X-Pad: %s\r\n" % ("p" * 5000)).encode(),
        b"Connection: close\r\n",
        (auth + "\r\n").encode(),
    ]
    total = sum(len(x) for x in segs)
    n = s.sendmsg(segs) if mode == "sendmsg5" else os.writev(s.fileno(), segs)
    assert n == total, (n, total)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
assert b" 200 " in data, data
"#;

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
    fn client(&self, tls: bool, mode: &str, path: &str, token: &str) {
        let cert = self.nginx.cert.display().to_string();
        let mut child = self.client_cg.spawn(
            &self.lab.client_ns,
            &[
                "/usr/bin/python3",
                "-c",
                CLIENT,
                &self.lab.server_ip,
                if tls { "443" } else { "80" },
                if tls { "1" } else { "0" },
                &cert,
                mode,
                path,
                token,
            ],
        );
        assert!(
            child.wait().unwrap().success(),
            "python client ({mode}) failed"
        );
    }
}

/// What is wrong with `side`'s report of the request at `path` (none or more than one record,
/// not the credential `fp`), or None.
fn missed(out: &Output, side: &str, path: &str, tls: bool, fp: &str) -> Option<String> {
    let found: Vec<&Value> = out.find(&[("/side", json!(side)), ("/path", json!(path))]);
    let want = json!([{"header": "authorization", "kind": "bearer", "fingerprint": fp}]);
    match found[..] {
        [r] if r["tls"] == json!(tls) && r["credentials"] == want => None,
        _ => Some(format!("{side} {path}: {found:?}")),
    }
}

/// Runs every `mode` over one transport under one monitor; both sides see every credential.
fn both_sides_see(tls: bool, modes: &[&str]) {
    let _g = serial();
    let s = setup();
    let mon = Monitor::start(&[]);
    let cases: Vec<(&str, String, String, String)> = modes
        .iter()
        .map(|m| {
            let tok = format!("tok-{}", random_hex(24));
            let fp = mon.fingerprint(&tok);
            (*m, format!("/{m}"), tok, fp)
        })
        .collect();
    for (m, path, tok, _) in &cases {
        s.client(tls, m, path, tok);
    }
    let out = mon.stop();
    let mut wrong = Vec::new();
    for (m, path, tok, fp) in &cases {
        let mut paths = vec![path.clone()];
        if m.starts_with("huge") {
            paths.push(format!("{path}/next"));
        }
        for p in &paths {
            for side in ["client", "server"] {
                wrong.extend(missed(&out, side, p, tls, fp));
            }
        }
        out.assert_no_secret(tok);
    }
    assert!(
        wrong.is_empty(),
        "requests not seen as sent:\n{}\nsummary: {}",
        wrong.join("\n"),
        out.summary
    );
    assert_eq!(out.events_lost(), 0);
    assert_eq!(
        out.summary["decode_errors"],
        json!(0),
        "records the decoder refused"
    );
}

#[test]
fn plaintext_17k_single_write_credential_seen_on_both_sides() {
    both_sides_see(false, &["bighead", "bigbody"]);
}

#[test]
fn tls_17k_single_write_credential_seen_on_both_sides() {
    both_sides_see(true, &["bighead", "bigbody"]);
}

#[test]
fn plaintext_5_iovec_write_credential_seen_on_both_sides() {
    both_sides_see(false, &["sendmsg5", "writev5"]);
}

/// The call is cut off at the copy limit and marked so (its length is known, for a writev
/// too): the stream resynchronises at the next call instead of taking it for body bytes.
#[test]
fn plaintext_request_after_a_call_past_the_copy_limit_is_seen_on_both_sides() {
    both_sides_see(false, &["hugewrite", "hugewritev"]);
}
