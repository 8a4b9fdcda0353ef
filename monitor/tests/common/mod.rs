//! Harness for live tests: real kernel programs, real servers and clients, in network
//! namespaces and cgroups that each test creates and removes.
#![allow(dead_code)]

use std::{
    fs,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    thread::sleep,
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

static SERIAL: Mutex<()> = Mutex::new(());

/// Live tests run one at a time: each starts its own monitor and servers.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fails loudly (never skips) when the test cannot run here.
pub fn require_root_and_tools(tools: &[&str]) {
    let uid = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().nth(1).unwrap().to_string())
        })
        .unwrap();
    assert_eq!(
        uid, "0",
        "live eBPF tests must run as root: use `cargo xtask test`"
    );
    for t in tools {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "{t} is not installed: `cargo xtask setup` installs it");
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// A short tag unique to this test run, for namespace, interface and cgroup names.
pub fn tag() -> String {
    random_hex(3)
}

/// Two hosts, `server` and `client`, in their own network namespaces joined by a veth pair.
pub struct Lab {
    pub server_ns: String,
    pub client_ns: String,
    pub server_ip: String,
    pub client_ip: String,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let n = u8::from_str_radix(&tag[..2], 16).unwrap() % 200 + 20;
        let lab = Lab {
            server_ns: format!("mon-{tag}-srv"),
            client_ns: format!("mon-{tag}-cli"),
            server_ip: format!("10.213.{n}.1"),
            client_ip: format!("10.213.{n}.2"),
        };
        let (s, c) = (&lab.server_ns, &lab.client_ns);
        sh(&format!(
            "ip netns add {s} && ip netns add {c} && \
             ip link add mv{tag}s netns {s} type veth peer name mv{tag}c netns {c} && \
             ip -n {s} addr add {sip}/24 dev mv{tag}s && ip -n {c} addr add {cip}/24 dev mv{tag}c && \
             ip -n {s} link set lo up && ip -n {c} link set lo up && \
             ip -n {s} link set mv{tag}s up && ip -n {c} link set mv{tag}c up",
            sip = lab.server_ip,
            cip = lab.client_ip
        ));
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.server_ns])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client_ns])
            .status();
    }
}

pub fn cgroup2_root() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap()))
        })
        .expect("cgroup2 is not mounted")
}

/// A cgroup (v2) for one workload; its processes are killed and it is removed on drop.
pub struct Cgroup {
    pub dir: PathBuf,
    /// Path relative to the cgroup2 mount, as the monitor reports it.
    pub path: String,
    pub id: u64,
}

impl Cgroup {
    pub fn new(name: &str) -> Cgroup {
        let root = cgroup2_root();
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        let id = fs::metadata(&dir).unwrap().ino();
        Cgroup {
            path: format!("/{name}"),
            dir,
            id,
        }
    }

    /// Starts `argv` inside this cgroup and network namespace `ns`.
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> Child {
        self.command(ns, argv).spawn().unwrap()
    }

    pub fn command(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec ip netns exec {ns} \"$@\"",
                self.dir.display()
            ))
            .arg("sh")
            .args(argv);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
    }
}

/// nginx in the server namespace: TLS on 443 and plaintext on 80, with a test certificate.
pub struct Nginx {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
}

impl Nginx {
    pub fn start(lab: &Lab, cg: &Cgroup) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        sh(&format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN=server.test -addext subjectAltName=DNS:server.test \
             -keyout {d}/key.pem -out {d}/cert.pem 2>/dev/null"
        ));
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
             events {{ worker_connections 128; }}
             http {{
               access_log off; client_body_temp_path {d}/body; large_client_header_buffers 4 32k;
               server {{ listen {ip}:443 ssl; server_name server.test;
                        ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
                        location / {{ return 200 \"ok\\n\"; }} }}
               server {{ listen {ip}:80; server_name server.test; location / {{ return 200 \"ok\\n\"; }} }}
             }}",
            ip = lab.server_ip
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = cg
            .command(
                &lab.server_ns,
                &[
                    "nginx",
                    "-e",
                    &format!("{d}/error.log"),
                    "-c",
                    &format!("{d}/nginx.conf"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = sh(&format!("ip netns exec {} ss -ltnH", lab.server_ns));
            if out.contains(":443") && out.contains(":80") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                fs::read_to_string(format!("{d}/error.log")).unwrap_or_default()
            );
            sleep(Duration::from_millis(50));
        }
        Nginx {
            child,
            cert: dir.path().join("cert.pem"),
            dir,
        }
    }
}

impl Drop for Nginx {
    /// SIGTERM: the master stops its workers (the cgroup's removal kills any that remain).
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A running `monitor run`, its outputs going to files in its own directory.
pub struct Monitor {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
}

/// What a stopped monitor printed.
pub struct Output {
    pub records: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
    pub summary: Value,
    pub files: String,
}

impl Monitor {
    pub fn start(extra: &[&str]) -> Monitor {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("fingerprint.key");
        let stdout = fs::File::create(dir.path().join("stdout")).unwrap();
        let stderr = fs::File::create(dir.path().join("stderr")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_monitor"))
            .arg("run")
            .arg("--key-file")
            .arg(&key_file)
            .args(extra)
            .env("MONITOR_LOG", "info")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut m = Monitor {
            child: Some(child),
            dir,
            key_file,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let err = fs::read_to_string(m.dir.path().join("stderr")).unwrap_or_default();
            if err.contains("monitor ready") {
                break;
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("monitor exited ({st}) before it was ready:\n{err}");
            }
            assert!(
                Instant::now() < deadline,
                "monitor not ready after 60 s:\n{err}"
            );
            sleep(Duration::from_millis(50));
        }
        m
    }

    /// HMAC-SHA256 under the monitor's key, as the monitor prints fingerprints.
    pub fn fingerprint(&self, secret: &str) -> String {
        let key = hex::decode(fs::read_to_string(&self.key_file).unwrap().trim()).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        mac.update(secret.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Stops with SIGINT (as Ctrl-C does) after giving in-flight events time to arrive.
    pub fn stop(mut self) -> Output {
        sleep(Duration::from_millis(800));
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("monitor did not stop within 20 s of SIGINT");
            }
            sleep(Duration::from_millis(50));
        };
        let stdout = fs::read_to_string(self.dir.path().join("stdout")).unwrap();
        let stderr = fs::read_to_string(self.dir.path().join("stderr")).unwrap();
        assert!(status.success(), "monitor exited with {status}:\n{stderr}");
        let records = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        let summary = stderr
            .lines()
            .find_map(|l| l.split_once("summary=").map(|(_, j)| j))
            .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("bad summary {j}: {e}")))
            .unwrap_or_else(|| panic!("no summary in stderr:\n{stderr}"));
        // Everything the monitor wrote (outputs, key file), for secret scans.
        let files = dir_text(self.dir.path());
        Output {
            records,
            stdout,
            stderr,
            summary,
            files,
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every file under `dir`, concatenated (lossy), for secret scans.
pub fn dir_text(dir: &Path) -> String {
    let mut all = String::new();
    for e in walk(dir) {
        let mut s = Vec::new();
        if fs::File::open(&e)
            .and_then(|mut f| f.read_to_end(&mut s))
            .is_ok()
        {
            all.push_str(&String::from_utf8_lossy(&s));
        }
    }
    all
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
    }
    out
}

impl Output {
    pub fn events_lost(&self) -> u64 {
        self.summary["events_lost"]
            .as_u64()
            .expect("events_lost in summary")
    }

    /// Records matching every (field, value) pair; fields are JSON pointers.
    pub fn find(&self, want: &[(&str, Value)]) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| want.iter().all(|(p, v)| r.pointer(p) == Some(v)))
            .collect()
    }

    pub fn assert_no_secret(&self, secret: &str) {
        assert!(!self.stdout.contains(secret), "secret on stdout");
        assert!(!self.stderr.contains(secret), "secret on stderr");
        assert!(
            !self.files.contains(secret),
            "secret in a file the monitor wrote"
        );
    }
}
