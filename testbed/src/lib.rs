//! Hosts for live tests, benchmarks and the demo: two network namespaces joined by a veth
//! pair, a cgroup (v2) per workload, nginx serving TLS with a certificate made on the spot.
//! Everything is created by the caller and removed on drop.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

/// Fails loudly (never skips) when something the caller needs is missing.
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
    /// nginx in `lab`'s server namespace and in `cg`: HTTP/1.1 over TLS on 443 and plaintext on
    /// 80, HTTP/2 over TLS on 8443 and cleartext (h2c) on 8080, every path answering 200, a certificate for `server.test` and `*.shop.test`.
    pub fn start(lab: &Lab, cg: &Cgroup) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        sh(&format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN=server.test -addext subjectAltName=DNS:server.test,DNS:*.shop.test \
             -keyout {d}/key.pem -out {d}/cert.pem 2>/dev/null"
        ));
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
             events {{ worker_connections 128; }}
             http {{
               access_log off; client_body_temp_path {d}/body; large_client_header_buffers 4 32k;
               server {{ listen {ip}:443 ssl; server_name _;
                        ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
                        location / {{ return 200 \"ok\\n\"; }} }}
               server {{ listen {ip}:80; server_name _; location / {{ return 200 \"ok\\n\"; }} }}
               server {{ listen {ip}:8443 ssl http2; server_name _;
                        ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
                        location / {{ return 200 \"ok\\n\"; }} }}
               server {{ listen {ip}:8080 http2; server_name _; location / {{ return 200 \"ok\\n\"; }} }}
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

/// curl's arguments for a request from the client host to the lab's nginx: every test host
/// name resolves to the server, its certificate is trusted, headers are added.
pub fn curl_args(
    lab: &Lab,
    nginx: &Nginx,
    headers: &[String],
    extra: &[&str],
    url: &str,
) -> Vec<String> {
    let mut argv: Vec<String> = ["curl", "-sS", "-o", "/dev/null"]
        .map(String::from)
        .to_vec();
    for host in [
        "server.test",
        "orders.shop.test",
        "ledger.shop.test",
        "admin.shop.test",
    ] {
        for port in [443, 80, 8443, 8080] {
            argv.extend([
                "--resolve".into(),
                format!("{host}:{port}:{}", lab.server_ip),
            ]);
        }
    }
    argv.extend(["--cacert".into(), nginx.cert.display().to_string()]);
    for h in headers {
        argv.extend(["-H".into(), h.clone()]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.push(url.into());
    argv
}
