//! `cargo xtask clickhouse up | down | status`: a modern ClickHouse (the 26.9 engine of the
//! pinned `chdb-core` wheel) on 127.0.0.1 for development, CI and the integration tests.
//!
//! Debian's `clickhouse-server` is from 2018 and lacks the types the schema uses, and there is
//! no container engine here; chdb's clickhouse-local can open real HTTP and native listeners
//! while a blocking query runs, which makes a server of it. Everything lives under one
//! directory: `venv/` (the wheel), `config.xml`, `data/`, `server.pid`, `server.port`,
//! `server.log`. Data survives `down` + `up`.
//!
//! Caveats: chdb's private `_chdb.query` entry point is used, hence the exact pin; the only
//! user is `default` without a password, hence the loopback bind.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

/// The wheel carrying the engine; `chdb_server.py` uses a private entry point of exactly it.
pub const CHDB_WHEEL: &str = "chdb-core==26.9.0";
const DEFAULT_DIR: &str = "/var/tmp/monitor-clickhouse";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs clickhouse-local as a server; written into the directory by `up`.
const SERVER_PY: &str = r#"#!/usr/bin/env python3
"""Run chdb-core's embedded ClickHouse (26.x) as an HTTP (+native TCP) server.

Written by `cargo xtask clickhouse up`. Usage:
    python3 chdb_server.py <dir-with-config.xml> <data-path> <HTTP[,TCP]>
config.xml sets http_port / tcp_port / listen_host. The listeners live only while the
blocking query below runs (~31 years); stop the server by killing this process.
"""
import os, sys

workdir, data, listen = sys.argv[1], sys.argv[2], sys.argv[3]
os.chdir(workdir)          # clickhouse-local picks up ./config.xml
from chdb import _chdb     # module-level _chdb.query() runs the full clickhouse-local main(),
                           # which wires SYSTEM START LISTEN (chdb.connect() sessions do not)
start = "".join("SYSTEM START LISTEN %s; " % p for p in listen.split(",") if p)
res = _chdb.query(
    start +
    # block forever at ~0 CPU: one sleeping row per second; NOT ignore() forces evaluation
    "SELECT count() FROM numbers(1000000000) WHERE NOT ignore(sleepEachRow(1)) "
    "SETTINGS max_block_size = 1, max_execution_time = 0",
    "TabSeparated",        # also becomes the default output format for HTTP queries
    path=data)
print("chdb server query ended:", res.bytes(), res.error_message(), file=sys.stderr)
sys.exit(1)
"#;

#[derive(Subcommand)]
pub enum Clickhouse {
    /// Start the server in the background (installs the engine on first use); idempotent.
    Up(UpArgs),
    /// Stop the server started by `up` (data is kept).
    Down(DirArgs),
    /// Tell whether it runs, where, and which version.
    Status(DirArgs),
}

#[derive(Args)]
pub struct DirArgs {
    /// Directory holding the engine, config, data, pid file and log.
    #[arg(long, env = "MONITOR_CLICKHOUSE_DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// HTTP port on 127.0.0.1.
    #[arg(long, default_value_t = 8123)]
    http_port: u16,
    /// Native protocol port on 127.0.0.1 (0: none).
    #[arg(long, default_value_t = 9000)]
    tcp_port: u16,
    /// Python virtual environment holding the engine (default: DIR/venv); several
    /// directories may share one.
    #[arg(long, env = "MONITOR_CLICKHOUSE_VENV")]
    venv: Option<PathBuf>,
}

pub fn main(c: Clickhouse) -> Result<()> {
    match c {
        Clickhouse::Up(a) => up(a),
        Clickhouse::Down(a) => down(&a.dir),
        Clickhouse::Status(a) => status(&a.dir),
    }
}

/// An exclusive `flock` held while it lives: `up` and `down` on one directory (or two `up`s
/// installing one venv) do not interleave.
struct Lock(fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// One HTTP/1.0 GET on loopback; the body if the status is 200.
pub(crate) fn http_get(port: u16, path: &str) -> Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "GET {path}: HTTP {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    Ok(body.trim().to_string())
}

fn ping(port: u16) -> bool {
    http_get(port, "/ping").is_ok_and(|b| b.starts_with("Ok"))
}

fn version(port: u16) -> Result<String> {
    http_get(port, "/?query=SELECT%20version()")
}

fn port_taken(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// The server's pid, if the pid file names a live process running our script.
fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("server.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    // A zombie has an empty cmdline: it is not running.
    (cmdline.contains("chdb_server.py") && cmdline.contains(&*dir.to_string_lossy())).then_some(pid)
}

fn recorded_port(dir: &Path) -> Option<u16> {
    fs::read_to_string(dir.join("server.port"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A python3 that can make virtual environments, installing Debian's if there is none.
fn python() -> Result<PathBuf> {
    let works = |p: &str| {
        Command::new(p)
            .args(["-c", "import venv, ensurepip"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for p in ["python3", "/usr/bin/python3"] {
        if works(p) {
            return Ok(p.into());
        }
    }
    crate::apt_install(&["python3", "python3-venv"])?;
    for p in ["python3", "/usr/bin/python3"] {
        if works(p) {
            return Ok(p.into());
        }
    }
    bail!("python3 with the venv module is needed (Debian: apt-get install python3-venv)")
}

/// A venv holding exactly `pins` (installed with `--no-deps`, so every package is pinned);
/// built once (into a temporary directory, then renamed, so that an interrupted install is
/// never taken for a finished one). `marker` names the file that records a finished install:
/// change it with the pins. Returns the venv's python.
pub(crate) fn ensure_venv(venv: &Path, marker: &str, pins: &[&str]) -> Result<PathBuf> {
    let py = venv.join("bin/python");
    if venv.join(marker).exists() {
        return Ok(py);
    }
    let parent = venv.parent().context("venv path has no parent")?;
    fs::create_dir_all(parent)?;
    let _lock = Lock::take(&parent.join(format!(
        ".{}.lock",
        venv.file_name().unwrap_or_default().to_string_lossy()
    )))?;
    if venv.join(marker).exists() {
        return Ok(py);
    }
    let t = Instant::now();
    let what = pins.join(" ");
    eprintln!("xtask: installing {what} into {}", venv.display());
    let tmp = venv.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    crate::run(Command::new(python()?).args(["-m", "venv"]).arg(&tmp))?;
    crate::run(
        Command::new(tmp.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
            ])
            .args(pins)
            .env("PIP_NO_INPUT", "1"),
    )?;
    fs::write(tmp.join(marker), pins.join("\n") + "\n")?;
    let _ = fs::remove_dir_all(venv);
    fs::rename(&tmp, venv)?;
    eprintln!(
        "xtask: {what} installed ({:.1}s)",
        t.elapsed().as_secs_f64()
    );
    Ok(py)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    Ok(fs::canonicalize(p)?)
}

fn log_tail(dir: &Path) -> String {
    let log = fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn up(a: UpArgs) -> Result<()> {
    let dir = absolute(&a.dir.dir)?;
    let _lock = Lock::take(&dir.join(".xtask.lock"))?;
    if let Some(pid) = running_pid(&dir) {
        let port = recorded_port(&dir).unwrap_or(a.http_port);
        let t = Instant::now();
        while !ping(port) {
            if t.elapsed() > START_TIMEOUT || running_pid(&dir).is_none() {
                bail!(
                    "clickhouse pid {pid} (dir {}) does not answer on port {port}: \
                     `cargo xtask clickhouse down --dir {0}` and retry\n{}",
                    dir.display(),
                    log_tail(&dir)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        if port != a.http_port {
            bail!(
                "clickhouse is already up in {} on port {port}, not {}: `down` it first",
                dir.display(),
                a.http_port
            );
        }
        println!(
            "clickhouse {} already up on http://127.0.0.1:{port} (pid {pid}, dir {})",
            version(port)?,
            dir.display()
        );
        return Ok(());
    }
    for p in [a.http_port, a.tcp_port] {
        if p != 0 && port_taken(p) {
            bail!("port {p} on 127.0.0.1 is taken by another process");
        }
    }
    let venv = match &a.venv {
        Some(v) => {
            fs::create_dir_all(v.parent().unwrap_or(Path::new("/")))?;
            v.clone()
        }
        None => dir.join("venv"),
    };
    let py = ensure_venv(&venv, &format!(".installed-{CHDB_WHEEL}"), &[CHDB_WHEEL])?;
    fs::write(dir.join("chdb_server.py"), SERVER_PY)?;
    let mut config = format!("<clickhouse>\n    <http_port>{}</http_port>\n", a.http_port);
    let mut listen = "HTTP".to_string();
    if a.tcp_port != 0 {
        config += &format!("    <tcp_port>{}</tcp_port>\n", a.tcp_port);
        listen += ",TCP";
    }
    config += "    <listen_host>127.0.0.1</listen_host>\n</clickhouse>\n";
    fs::write(dir.join("config.xml"), config)?;
    fs::create_dir_all(dir.join("data"))?;
    let log = fs::File::create(dir.join("server.log"))?;
    let mut cmd = Command::new(&py);
    cmd.arg(dir.join("chdb_server.py"))
        .arg(&dir)
        .arg(dir.join("data"))
        .arg(&listen)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: not killed with the terminal or the test that started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", py.display()))?;
    let pid = child.id();
    fs::write(dir.join("server.pid"), format!("{pid}\n"))?;
    fs::write(dir.join("server.port"), format!("{}\n", a.http_port))?;
    let t = Instant::now();
    loop {
        if ping(a.http_port) {
            break;
        }
        if let Some(st) = child.try_wait()? {
            let _ = fs::remove_file(dir.join("server.pid"));
            bail!("clickhouse exited at start ({st}):\n{}", log_tail(&dir));
        }
        if t.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(dir.join("server.pid"));
            bail!(
                "clickhouse did not answer /ping within {:?}:\n{}",
                START_TIMEOUT,
                log_tail(&dir)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "clickhouse {} up on http://127.0.0.1:{} (pid {pid}, dir {}, {:.1}s)",
        version(a.http_port)?,
        a.http_port,
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    if !dir.exists() {
        println!("clickhouse is not running (no {})", dir.display());
        return Ok(());
    }
    let dir = absolute(dir)?;
    let _lock = Lock::take(&dir.join(".xtask.lock"))?;
    let Some(pid) = running_pid(&dir) else {
        let _ = fs::remove_file(dir.join("server.pid"));
        println!("clickhouse is not running (dir {})", dir.display());
        return Ok(());
    };
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    while running_pid(&dir).is_some() {
        if t.elapsed() > Duration::from_secs(10) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("clickhouse pid {pid} does not exit");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = fs::remove_file(dir.join("server.pid"));
    println!("clickhouse stopped (pid {pid}, dir {})", dir.display());
    Ok(())
}

fn status(dir: &Path) -> Result<()> {
    let Some(dir) = fs::canonicalize(dir).ok() else {
        bail!("clickhouse is down (no {})", dir.display());
    };
    let Some(pid) = running_pid(&dir) else {
        bail!("clickhouse is down (dir {})", dir.display());
    };
    let port = recorded_port(&dir).context("server.port missing")?;
    match version(port) {
        Ok(v) => {
            println!(
                "clickhouse {v} up on http://127.0.0.1:{port} (pid {pid}, dir {})",
                dir.display()
            );
            Ok(())
        }
        Err(e) => bail!("clickhouse pid {pid} runs but does not answer on port {port}: {e}"),
    }
}
