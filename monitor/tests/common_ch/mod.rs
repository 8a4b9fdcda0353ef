//! A live ClickHouse per test: `cargo xtask clickhouse up` in a temporary directory on a free
//! loopback port, the engine's venv shared by every test (installed once, ~6 s). A test that
//! needs the server fails loudly when it cannot start one: it is never skipped.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// Where the tests keep the engine between runs.
pub const VENV: &str = "/var/tmp/monitor-clickhouse-test/venv";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

fn xtask(args: &[&str]) -> Result<String, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["run", "-q", "-p", "xtask", "--", "clickhouse"])
        .args(args)
        .env("MONITOR_CLICKHOUSE_VENV", VENV)
        .env_remove("MONITOR_CLICKHOUSE_DIR")
        .output()
        .map_err(|e| format!("cannot run cargo xtask: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

pub struct Server {
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts a fresh server; panics (with the log) if it cannot.
    pub fn start() -> Server {
        let s = Server::stopped();
        s.up();
        s
    }

    /// A directory and a port for a server that is not started yet ([`Server::up`]).
    pub fn stopped() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("monitor-ch-")
            .tempdir()
            .expect("temp dir");
        Server {
            port: free_port(),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on the same directory and port; returns what xtask said.
    pub fn up(&self) -> String {
        let t = Instant::now();
        let dir = self.dir().to_string_lossy().into_owned();
        let port = self.port.to_string();
        match xtask(&["up", "--dir", &dir, "--http-port", &port, "--tcp-port", "0"]) {
            Ok(out) => {
                eprintln!(
                    "clickhouse: {} ({:.1}s)",
                    out.trim(),
                    t.elapsed().as_secs_f64()
                );
                out
            }
            Err(out) => {
                panic!("cannot start ClickHouse for the test (cargo xtask clickhouse up):\n{out}")
            }
        }
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir().join("server.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `cargo xtask clickhouse status`: Ok(what it said) when up.
    pub fn status(&self) -> Result<String, String> {
        xtask(&["status", "--dir", &self.dir().to_string_lossy()])
    }

    /// SIGKILL, as a crash would; returns when the process is gone.
    pub fn kill(&self) {
        let pid = self.pid().expect("server.pid");
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}/cmdline")).exists()
            && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pid {pid} survives SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The server was started in its own session by xtask: reap is not ours to do.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
