//! Live tests (root) for Go's crypto/tls: Go programs built from `testbed/go` with Debian's Go
//! (standard library only, no cgo), stripped and not, against nginx and curl in the lab.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss", "go"];

/// The test programs, built once per test run.
struct Bins {
    client: PathBuf,
    client_stripped: PathBuf,
    server: PathBuf,
    server_stripped: PathBuf,
}

fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        // Under the target directory: rebuilt each run, the Go build cache kept warm.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live_go");
        let out = dir.join("bin");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).unwrap();
        let build = |prog: &str, stripped: bool| {
            let path = out.join(format!("go-{prog}{}", if stripped { "-s" } else { "" }));
            let mut cmd = Command::new("go");
            cmd.arg("build").arg("-o").arg(&path);
            if stripped {
                cmd.arg("-ldflags=-s -w");
            }
            let st = cmd
                .arg(format!("./{prog}"))
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/go"))
                .env("GOCACHE", dir.join("gocache"))
                .env("HOME", &dir)
                .env("GOFLAGS", "-mod=mod")
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0")
                .status()
                .unwrap();
            assert!(st.success(), "go build ./{prog} failed");
            path
        };
        Bins {
            client: build("client", false),
            client_stripped: build("client", true),
            server: build("server", false),
            server_stripped: build("server", true),
        }
    })
}

fn token() -> String {
    format!("gotok-{}", random_hex(24))
}

/// Waits until `pid` runs `exe` (past the shell and `ip netns exec` that start it), so
/// that a scan of running processes sees the Go program.
fn wait_exe(pid: u32, exe: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() != Some(exe) {
        assert!(Instant::now() < deadline, "{} did not start", exe.display());
        sleep(Duration::from_millis(20));
    }
}

/// A Go client waiting on stdin before it sends its one request.
struct GoClient {
    child: Child,
    exe: PathBuf,
}

impl GoClient {
    fn spawn(
        lab: &Lab,
        cg: &Cgroup,
        nginx: &Nginx,
        exe: &Path,
        path: &str,
        token: &str,
    ) -> GoClient {
        let addr = format!("{}:443", lab.server_ip);
        let url = format!("https://server.test{path}");
        let cert = nginx.cert.display().to_string();
        let child = cg
            .command(
                &lab.client_ns,
                &[
                    exe.to_str().unwrap(),
                    "-addr",
                    &addr,
                    "-ca",
                    &cert,
                    "-url",
                    &url,
                    "-wait-stdin",
                ],
            )
            .env("GO_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_exe(child.id(), exe);
        GoClient {
            child,
            exe: exe.to_path_buf(),
        }
    }

    /// Sends the request; returns the client's pid. The client stays until the monitor has
    /// had time to resolve its executable (it started before the monitor: no exec event).
    fn go(mut self) -> u32 {
        let pid = self.child.id();
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        sleep(Duration::from_millis(300));
        drop(stdin);
        let out = self.child.wait_with_output().unwrap();
        let stdout = line + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("ok"),
            "{} failed: {out:?}",
            self.exe.display()
        );
        pid
    }
}

struct Setup {
    lab: Lab,
    server_cg: Cgroup,
    client_cg: Cgroup,
}

fn setup() -> Setup {
    require_root_and_tools(TOOLS);
    bins();
    let t = tag();
    Setup {
        lab: Lab::new(&t),
        server_cg: Cgroup::new(&format!("monitor-test-{t}-server")),
        client_cg: Cgroup::new(&format!("monitor-test-{t}-client")),
    }
}

fn one<'a>(out: &'a Output, want: &[(&str, Value)]) -> &'a Value {
    let found = out.find(want);
    assert_eq!(
        found.len(),
        1,
        "expected one record with {want:?}, got {found:#?}\nall: {:#?}\nstderr:\n{}",
        out.records,
        out.stderr
    );
    found[0]
}

/// Per-program kernel counters from the monitor's exit summary.
fn hits(out: &Output, program: &str) -> u64 {
    out.summary["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == json!(program))
        .map_or(0, |p| p["hits"].as_u64().unwrap())
}

fn assert_go_client_record(
    r: &Value,
    s: &Setup,
    pid: u32,
    exe: &Path,
    path: &str,
    fingerprint: &str,
) {
    assert_eq!(r["library"], json!("go"), "{r:#}");
    assert_eq!(r["tls"], json!(true));
    assert_eq!(r["side"], json!("client"));
    assert_eq!(r["pid"], json!(pid));
    assert_eq!(r["exe"], json!(exe.display().to_string()));
    assert_eq!(r["cgroup"], json!(s.client_cg.path));
    assert_eq!(
        r["destination"],
        json!({"ip": s.lab.server_ip, "port": 443})
    );
    assert_eq!(r["source"]["ip"], json!(s.lab.client_ip));
    assert!(r["source"]["port"].as_u64().is_some_and(|p| p > 0), "{r:#}");
    assert_eq!(r["method"], json!("GET"));
    assert_eq!(r["host"], json!("server.test"));
    assert_eq!(r["path"], json!(path));
    assert_eq!(
        r["credentials"],
        json!([{"header": "authorization", "kind": "bearer", "fingerprint": fingerprint}])
    );
}

#[test]
fn go_client_requests_are_seen_with_and_without_symbols() {
    let _g = serial();
    let s = setup();
    let nginx = Nginx::start(&s.lab, &s.server_cg);
    let b = bins();
    let (tok_a, tok_b) = (token(), token());
    // Running before the monitor starts: found by its first scan of running processes.
    let full = GoClient::spawn(&s.lab, &s.client_cg, &nginx, &b.client, "/go/full", &tok_a);
    let stripped = GoClient::spawn(
        &s.lab,
        &s.client_cg,
        &nginx,
        &b.client_stripped,
        "/go/stripped",
        &tok_b,
    );
    let mon = Monitor::start(&[]);
    let pid_a = full.go();
    let pid_b = stripped.go();
    let (fp_a, fp_b) = (mon.fingerprint(&tok_a), mon.fingerprint(&tok_b));
    let out = mon.stop();

    let r = one(
        &out,
        &[("/side", json!("client")), ("/path", json!("/go/full"))],
    );
    assert_go_client_record(r, &s, pid_a, &b.client, "/go/full", &fp_a);
    let r = one(
        &out,
        &[("/side", json!("client")), ("/path", json!("/go/stripped"))],
    );
    assert_go_client_record(r, &s, pid_b, &b.client_stripped, "/go/stripped", &fp_b);
    // nginx saw the same requests through OpenSSL.
    assert_eq!(
        out.find(&[("/side", json!("server")), ("/library", json!("openssl"))])
            .len(),
        2
    );
    eprintln!(
        "go probe hits for 2 requests: write {}, read {}, read_ret {}",
        hits(&out, "go_write"),
        hits(&out, "go_read"),
        hits(&out, "go_read_ret")
    );
    assert!(hits(&out, "go_write") >= 2);
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok_a);
    out.assert_no_secret(&tok_b);
    drop(nginx);
}

#[test]
fn go_server_sees_requests_through_read_returns() {
    let _g = serial();
    let s = setup();
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
         -subj /CN=server.test -addext subjectAltName=DNS:server.test \
         -keyout {d}/key.pem -out {d}/cert.pem 2>/dev/null"
    ));
    let servers: Vec<(Child, &PathBuf, u16)> = [(&b.server, 443u16), (&b.server_stripped, 8443)]
        .into_iter()
        .map(|(exe, port)| {
            let child = s
                .server_cg
                .command(
                    &s.lab.server_ns,
                    &[
                        exe.to_str().unwrap(),
                        "-listen",
                        &format!("{}:{port}", s.lab.server_ip),
                        "-cert",
                        &format!("{d}/cert.pem"),
                        "-key",
                        &format!("{d}/key.pem"),
                    ],
                )
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            wait_exe(child.id(), exe);
            (child, exe, port)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ss = sh(&format!("ip netns exec {} ss -ltnH", s.lab.server_ns));
        if ss.contains(":443 ") && ss.contains(":8443 ") {
            break;
        }
        assert!(Instant::now() < deadline, "Go servers not listening: {ss}");
        sleep(Duration::from_millis(50));
    }
    let mon = Monitor::start(&[]);
    let mut toks = Vec::new();
    for (_, _, port) in &servers {
        let tok = token();
        let url = format!("https://server.test:{port}/go/server/{port}");
        let resolve = format!("server.test:{port}:{}", s.lab.server_ip);
        let auth = format!("Authorization: Bearer {tok}");
        let cacert = format!("{d}/cert.pem");
        let st = s
            .client_cg
            .command(
                &s.lab.client_ns,
                &[
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--http1.1",
                    "--resolve",
                    &resolve,
                    "--cacert",
                    &cacert,
                    "-H",
                    &auth,
                    &url,
                ],
            )
            .status()
            .unwrap();
        assert!(st.success(), "curl to the Go server on {port} failed");
        toks.push(tok);
    }
    let fps: Vec<String> = toks.iter().map(|t| mon.fingerprint(t)).collect();
    let out = mon.stop();

    for ((child, exe, port), fp) in servers.iter().zip(&fps) {
        let path = format!("/go/server/{port}");
        let r = one(&out, &[("/side", json!("server")), ("/path", json!(path))]);
        assert_eq!(r["library"], json!("go"), "{r:#}");
        assert_eq!(r["tls"], json!(true));
        assert_eq!(r["pid"], json!(child.id()));
        assert_eq!(r["exe"], json!(exe.display().to_string()));
        assert_eq!(r["cgroup"], json!(s.server_cg.path));
        assert_eq!(
            r["destination"],
            json!({"ip": s.lab.server_ip, "port": port})
        );
        assert_eq!(r["source"]["ip"], json!(s.lab.client_ip));
        assert_eq!(r["method"], json!("GET"));
        assert_eq!(
            r["credentials"],
            json!([{"header": "authorization", "kind": "bearer", "fingerprint": fp}])
        );
    }
    eprintln!(
        "go probe hits for 2 requests served: write {}, read {}, read_ret {}",
        hits(&out, "go_write"),
        hits(&out, "go_read"),
        hits(&out, "go_read_ret")
    );
    assert!(hits(&out, "go_read_ret") >= 2);
    assert_eq!(out.events_lost(), 0);
    for t in &toks {
        out.assert_no_secret(t);
    }
}

#[test]
fn go_client_started_after_the_monitor_is_picked_up() {
    let _g = serial();
    let s = setup();
    let nginx = Nginx::start(&s.lab, &s.server_cg);
    let b = bins();
    let mon = Monitor::start(&[]);
    let tok = token();
    let client = GoClient::spawn(&s.lab, &s.client_cg, &nginx, &b.client, "/go/late", &tok);
    // Its exec is reported by the kernel and the executable attached (no polling).
    mon.wait_stderr("stack=\"go\"", 1);
    let pid = client.go();
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(
        &out,
        &[("/side", json!("client")), ("/path", json!("/go/late"))],
    );
    assert_go_client_record(r, &s, pid, &b.client, "/go/late", &fp);
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
    drop(nginx);
}

#[test]
fn go_egress_probe_set_attaches_write_only() {
    let _g = serial();
    let s = setup();
    let nginx = Nginx::start(&s.lab, &s.server_cg);
    let b = bins();
    let tok = token();
    let client = GoClient::spawn(&s.lab, &s.client_cg, &nginx, &b.client, "/go/egress", &tok);
    let mon = Monitor::start(&["--probes", "egress"]);
    let pid = client.go();
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();

    let r = one(
        &out,
        &[("/side", json!("client")), ("/path", json!("/go/egress"))],
    );
    assert_go_client_record(r, &s, pid, &b.client, "/go/egress", &fp);
    assert_eq!(hits(&out, "go_read"), 0);
    assert_eq!(hits(&out, "go_read_ret"), 0);
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
    drop(nginx);
}
