//! Live test (root): any local user can make the daemon inspect a file, by mapping it
//! executable (mmap records are not cgroup-filtered, so `--cgroup` does not protect). An
//! unprivileged user in a user+mount namespace maps, one after the other: a file whose path
//! then resolves to a FIFO (bind-mounted over it), ELF files truncated and re-extended while
//! they are inspected, a sparse 8 GB ELF, and a fake Go ELF whose `.gopclntab` claims 2 GB.
//! Meanwhile curl keeps sending requests through TLS: every one of them must be captured
//! with its fingerprint, `/ready` must stay 200, the daemon's memory must stay bounded, and
//! it must neither exit nor stop.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use monitor::probe::elf::{SHT_PROGBITS, synthetic_elf};
use serde_json::json;

const NOBODY: u32 = 65534;

/// What the unprivileged user runs, in its own user and mount namespaces.
const ATTACKER: &str = r#"
import mmap, os, subprocess, sys, threading
d, small, full = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keep = []
def xmap(fd):
    m = mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    keep.append((fd, m))

# 1. The path of the mapped file is a FIFO by the time the daemon opens it: opened first,
#    then a FIFO bind-mounted over the path (in this mount namespace only), then mapped.
fd = os.open(d + "/fifo-target", os.O_RDONLY)
subprocess.run(["mount", "--bind", d + "/fifo", d + "/fifo-target"], check=True)
xmap(fd)

# 2. ELF files whose symbol tables are cut off and put back, again and again, while the
#    daemon reads them (a memory-mapped read faults with SIGBUS).
trunc = []
for i in range(10):
    p = "%s/trunc-%d" % (d, i)
    with open(p, "wb") as f:
        f.write(open(d + "/trunc.elf", "rb").read())
    trunc.append(os.open(p, os.O_RDWR))
stop = False
def toggle():
    while not stop:
        for fd in trunc:
            os.ftruncate(fd, full)
            os.ftruncate(fd, small)
threading.Thread(target=toggle, daemon=True).start()
for fd in trunc:
    xmap(fd)

# 3. A sparse 8 GB ELF, 4. a fake Go ELF with a 2 GB .gopclntab.
for name in ["sparse.elf", "fakego.elf"]:
    xmap(os.open(d + "/" + name, os.O_RDONLY))
print("mapped", flush=True)
sys.stdin.read()  # until the test has seen the verdicts
stop = True
print("done", flush=True)
"#;

/// `curl -w %{http_code}` of the monitor's `/ready`.
fn ready(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/ready"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "2"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn reason(body: &str, r: &str) -> f64 {
    metric(
        body,
        &format!("monitor_tls_inspect_failures_total{{reason=\"{r}\"}}"),
    )
}

/// The monitor's pid: the one process whose command line names its key file.
fn monitor_pid(mon: &Monitor) -> u32 {
    let key = mon.key_file.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&key))
        })
        .expect("monitor process")
}

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("monitor alive");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn hostile_files_mapped_by_an_unprivileged_user_neither_stop_nor_blind_the_daemon() {
    let _g = serial();
    require_root_and_tools(&["unshare", "setpriv", "python3", "curl", "mount"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);

    // The user's files, made here and handed to it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy("/bin/true", d.join("fifo-target")).unwrap();
    let fifo = std::ffi::CString::new(d.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Headers in the first 4 KiB, symbol tables after them: cutting the file at 4 KiB keeps
    // it an ELF file whose tables are gone.
    let table = 16 << 20;
    let mut trunc = synthetic_elf(&[
        (".dynsym", SHT_PROGBITS, 4096, table),
        (".dynstr", SHT_PROGBITS, 4096, table),
    ]);
    trunc.resize(4096, 0);
    fs::write(d.join("trunc.elf"), &trunc).unwrap();
    let sparse = synthetic_elf(&[
        (".dynsym", SHT_PROGBITS, 4096, (8 << 30) - 4096),
        (".dynstr", SHT_PROGBITS, 4096, (8 << 30) - 4096),
    ]);
    fs::write(d.join("sparse.elf"), &sparse).unwrap();
    fs::File::options()
        .write(true)
        .open(d.join("sparse.elf"))
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let fakego = synthetic_elf(&[(".gopclntab", SHT_PROGBITS, 4096, 2 << 30)]);
    fs::write(d.join("fakego.elf"), &fakego).unwrap();
    fs::File::options()
        .write(true)
        .open(d.join("fakego.elf"))
        .unwrap()
        .set_len(4096 + (2 << 30))
        .unwrap();
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{NOBODY}:{NOBODY}"))
        .arg(d)
        .status()
        .unwrap();
    assert!(st.success());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mon = Monitor::start(&[
        "--metrics-addr",
        &addr,
        "--cgroup",
        &client_cg.path,
        "--cgroup",
        &server_cg.path,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(&addr) != "200" {
        assert!(Instant::now() < deadline, "never ready");
        sleep(Duration::from_millis(100));
    }
    let pid = monitor_pid(&mon);
    sleep(Duration::from_secs(1));
    let (rss_before, _) = memory_kib(pid);

    // curl, all along: a request every 100 ms.
    let tok = format!("tok-{}", random_hex(24));
    let stop = AtomicBool::new(false);
    let curls = {
        let (stop, tok) = (&stop, &tok);
        let (lab, client_cg, nginx) = (&lab, &client_cg, &nginx);
        std::thread::scope(|s| {
            let curls = s.spawn(move || {
                let mut sent = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = format!("/steady/{i}");
                    let hdr = format!("Authorization: Bearer {tok}");
                    let argv = curl_args(
                        lab,
                        nginx,
                        &[hdr],
                        &[],
                        &format!("https://server.test{path}"),
                    );
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    let mut child = client_cg.spawn(&lab.client_ns, &argv);
                    let cpid = child.id();
                    assert!(child.wait().unwrap().success(), "curl failed");
                    sent.push((path, cpid));
                    sleep(Duration::from_millis(100));
                }
                sent
            });

            // The attacker, with /ready polled while it works, until the daemon has
            // given its verdict on each kind of file.
            let mut attacker = Command::new("setpriv")
                .args([
                    &format!("--reuid={NOBODY}"),
                    &format!("--regid={NOBODY}"),
                    "--clear-groups",
                    "unshare",
                    "-Urm",
                    "python3",
                    "-c",
                    ATTACKER,
                ])
                .arg(d)
                .arg(trunc.len().to_string())
                .arg((4096 + table).to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let r = ready(&addr);
                assert_eq!(r, "200", "/ready answered {r:?} while the attacker ran");
                if let Some(st) = attacker.try_wait().unwrap() {
                    panic!("attacker exited early: {st}");
                }
                let body = metrics(&addr);
                if reason(&body, "byte_budget") >= 2.0
                    && reason(&body, "read_error") + reason(&body, "malformed") >= 1.0
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no verdict on the attacker's files after 90 s:\n{body}"
                );
                sleep(Duration::from_millis(200));
            }
            drop(attacker.stdin.take());
            let out = attacker.wait_with_output().unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("done"),
                "attacker failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            sleep(Duration::from_secs(1));
            stop.store(true, Ordering::Relaxed);
            curls.join().unwrap()
        })
    };
    assert_eq!(ready(&addr), "200");
    let body = metrics(&addr);
    let (rss_after, hwm) = memory_kib(pid);
    eprintln!("monitor RSS {rss_before} KiB before, {rss_after} KiB after, peak {hwm} KiB");
    eprintln!(
        "{}",
        body.lines()
            .filter(|l| l.starts_with("monitor_tls_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Refused within its budget, not read: a 2 GB or 8 GB read would show here.
    assert!(
        hwm < rss_before + 100 * 1024,
        "peak RSS {hwm} KiB, {rss_before} KiB before the attack"
    );
    // The FIFO was never opened: the file was opened as the one mapped, not by its path.
    assert_eq!(reason(&body, "not_regular"), 0.0, "{body}");

    let want = mon.fingerprint(&tok);
    let out = mon.stop();
    assert!(curls.len() >= 5, "only {} requests sent", curls.len());
    eprintln!("attach summary: {}", out.summary["attach"]);
    for (path, cpid) in &curls {
        let found = out.find(&[
            ("/side", json!("client")),
            ("/path", json!(path)),
            ("/pid", json!(cpid)),
        ]);
        assert_eq!(
            found.len(),
            1,
            "request {path} not captured once:\n{}",
            out.stderr
        );
        assert_eq!(
            found[0]["credentials"][0]["fingerprint"],
            json!(want),
            "{path}"
        );
    }
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}
