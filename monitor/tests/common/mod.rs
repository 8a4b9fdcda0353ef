//! Harness for live tests: real kernel programs, real servers and clients, in network
//! namespaces and cgroups that each test creates and removes.
#![allow(dead_code)]

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command},
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

pub use testbed::*;

/// An unsigned JWT with the given payload (the monitor never verifies signatures).
pub fn jwt(payload: Value) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    let h = B64.encode(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
    format!(
        "{h}.{}.{}",
        B64.encode(payload.to_string()),
        B64.encode(random_hex(256))
    )
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
        Self::start_with_key(extra, None)
    }

    /// Starts with a known fingerprint key (so a test can name fingerprints in rules).
    pub fn start_with_key(extra: &[&str], key: Option<&[u8]>) -> Monitor {
        Self::start_wrapped(&[], extra, key)
    }

    /// Starts under `wrapper` (e.g. `setpriv` with a reduced capability set).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str], key: Option<&[u8]>) -> Monitor {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("fingerprint.key");
        if let Some(k) = key {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_file)
                .unwrap();
            writeln!(f, "{}", hex::encode(k)).unwrap();
        }
        let stdout = fs::File::create(dir.path().join("stdout")).unwrap();
        let stderr = fs::File::create(dir.path().join("stderr")).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(env!("CARGO_BIN_EXE_monitor"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_monitor")),
        };
        let child = cmd
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

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
    }

    /// Waits until `text` appears in the monitor's stderr for the `n`-th time.
    pub fn wait_stderr(&self, text: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let err = fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
            if err.matches(text).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "`{text}` not logged:\n{err}");
            sleep(Duration::from_millis(50));
        }
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
