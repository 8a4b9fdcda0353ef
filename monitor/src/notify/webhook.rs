//! Webhook delivery: each alert is POSTed as JSON by a background thread fed by a bounded
//! queue. The caller never blocks: a full queue drops the alert and counts it.
//!
//! - Retries with exponential backoff (100 ms doubling to 10 s by default, honouring a
//!   `Retry-After` in seconds) on connection errors, timeouts, 5xx, 408 and 429, up to
//!   `max_attempts` attempts or `max_age` since the alert was queued; other statuses (3xx, 4xx)
//!   are not retried and count as `rejected`.
//! - With a secret, `X-Monitor-Signature: sha256=<hex HMAC-SHA256(secret, body)>` over the exact
//!   bytes sent, plus `X-Monitor-Timestamp` (Unix seconds of the attempt), `X-Monitor-Delivery`
//!   (a UUID stable across the retries of one alert occurrence, for de-duplication) and
//!   `X-Monitor-Attempt`.
//! - The secret and the URL's path, query and credentials (webhook URLs often embed tokens)
//!   never reach a log line: only `scheme://host[:port]` does.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tracing::{info, warn};
use zeroize::Zeroizing;

pub const SIGNATURE_HEADER: &str = "X-Monitor-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Monitor-Timestamp";
pub const DELIVERY_HEADER: &str = "X-Monitor-Delivery";
pub const ATTEMPT_HEADER: &str = "X-Monitor-Attempt";

/// A webhook URL (http or https). Its `Debug` and `Display` show only `scheme://host[:port]`
/// ([`crate::https::url_for_logs`]): the path and query of a webhook often carry a token.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    url: String,
    redacted: String,
}

impl WebhookUrl {
    pub fn as_str(&self) -> &str {
        &self.url
    }
    /// `scheme://host[:port]`, safe to log.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl FromStr for WebhookUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let uri: ureq::http::Uri = s.parse().map_err(|_| {
            "not a valid URL (expected http://host[:port]/path or https://...)".to_string()
        })?;
        let scheme = uri.scheme_str().unwrap_or("");
        if scheme != "http" && scheme != "https" {
            return Err("the webhook URL must start with http:// or https://".into());
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err("the webhook URL has no host".into());
        }
        Ok(WebhookUrl {
            url: s.to_string(),
            redacted: crate::https::url_for_logs(s),
        })
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/…)", self.redacted)
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/…", self.redacted)
    }
}

/// The HMAC key. `Debug` never shows it; the bytes are zeroed on drop.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// Reads a secret file; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = Zeroizing::new(
            std::fs::read(path)
                .with_context(|| format!("reading the webhook secret file {}", path.display()))?,
        );
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            bail!("the webhook secret file {} is empty", path.display());
        }
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o004 != 0
            {
                warn!(path = %path.display(), "the webhook secret file is world-readable");
            }
        }
        Ok(Secret::new(trimmed.to_vec()))
    }

    /// `sha256=<hex>` of HMAC-SHA256 over `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        sign(&self.0, body)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `sha256=<hex HMAC-SHA256(key, body)>`, the value of [`SIGNATURE_HEADER`].
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a [`SIGNATURE_HEADER`] value in constant time (for receivers and tests).
pub fn verify(key: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hexsig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hexsig.trim()) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    pub secret: Option<Secret>,
    /// Alerts waiting for the worker; more are dropped (counted).
    pub queue: usize,
    /// Attempts per alert, the first included (at least 1).
    pub max_attempts: u32,
    /// An alert still undelivered this long after it was queued is given up.
    pub max_age: Duration,
    /// Whole-request timeout (connect, TLS, send, response).
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// PEM file of CA certificates to trust instead of the bundled web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Honour HTTP(S)_PROXY / NO_PROXY from the environment.
    pub env_proxy: bool,
}

impl WebhookConfig {
    pub fn new(url: WebhookUrl) -> Self {
        WebhookConfig {
            url,
            secret: None,
            queue: 10_000,
            max_attempts: 10,
            max_age: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            ca_file: None,
            env_proxy: true,
        }
    }
}

/// Counters of the webhook. `queued` is the current depth; the others only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Delivered (2xx).
    pub sent: u64,
    /// Attempts after the first (each retry counts once).
    pub retried: u64,
    /// Given up after the attempts or the age ran out, or left in the queue at shutdown.
    pub failed: u64,
    /// Refused by the receiver with a status that is not retried (3xx, 4xx but 408/429).
    pub rejected: u64,
    /// Not queued: the queue was full (or the worker gone).
    pub dropped: u64,
    /// Waiting in the queue now.
    pub queued: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
}

struct Shared {
    c: Counters,
    /// Set by shutdown: work stops at this instant.
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
}

impl Shared {
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps `d`, unless shutdown's deadline comes first: then returns false at once.
    fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut g = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.is_some_and(|dl| dl < until) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            g = self
                .wake
                .wait_timeout(g, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct Job {
    body: Vec<u8>,
    delivery: String,
    queued_at: Instant,
}

pub struct Webhook {
    tx: Option<SyncSender<Job>>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    target: String,
}

enum Outcome {
    Sent,
    Rejected(u16),
    Retry(String, Option<Duration>),
}

impl Webhook {
    pub fn new(cfg: WebhookConfig) -> Result<Self> {
        let agent = build_agent(&cfg)?;
        let (tx, rx) = sync_channel(cfg.queue.max(1));
        let shared = Arc::new(Shared {
            c: Counters::default(),
            deadline: Mutex::new(None),
            wake: Condvar::new(),
        });
        let target = cfg.url.redacted().to_string();
        if cfg.secret.is_none() {
            warn!(webhook = %target, "webhook requests are not signed (no --webhook-secret-file)");
        }
        let w = Worker {
            agent,
            cfg,
            shared: shared.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("monitor-webhook".into())
            .spawn(move || w.run(rx))
            .context("starting the webhook thread")?;
        info!(webhook = %target, "webhook output on");
        Ok(Webhook {
            tx: Some(tx),
            shared,
            worker: Some(worker),
            target,
        })
    }

    /// Queues one rendered alert; never blocks. False (and counted in `dropped`) when the
    /// queue is full.
    pub fn enqueue(&self, body: Vec<u8>, delivery: String) -> bool {
        let Some(tx) = &self.tx else {
            self.shared.c.dropped.fetch_add(1, Relaxed);
            return false;
        };
        // Counted before the send so that the worker's decrement never precedes it.
        self.shared.c.queued.fetch_add(1, Relaxed);
        let job = Job {
            body,
            delivery,
            queued_at: Instant::now(),
        };
        match tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.c.queued.fetch_sub(1, Relaxed);
                let n = self.shared.c.dropped.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(webhook = %self.target, dropped = n, "webhook queue full: alerts dropped");
                }
                false
            }
        }
    }

    pub fn stats(&self) -> WebhookStats {
        let c = &self.shared.c;
        WebhookStats {
            sent: c.sent.load(Relaxed),
            retried: c.retried.load(Relaxed),
            failed: c.failed.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            queued: c.queued.load(Relaxed),
        }
    }

    /// `scheme://host:port` of the receiver.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Stops taking alerts and delivers what is queued for at most `timeout` (retries
    /// included); what is left then counts as failed. Returns the final counters.
    pub fn shutdown(mut self, timeout: Duration) -> WebhookStats {
        self.stop(timeout);
        self.stats()
    }

    fn stop(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(deadline);
        self.shared.wake.notify_all();
        drop(self.tx.take()); // the worker ends once the queue is empty
        if let Some(h) = self.worker.take() {
            // A request in flight may run to its own timeout: wait a little past the deadline,
            // then leave the thread behind rather than hold the caller.
            let grace = deadline + Duration::from_millis(200);
            while !h.is_finished() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                warn!(webhook = %self.target, "webhook worker still busy at shutdown; left behind");
            }
        }
        let s = self.stats();
        if s.queued > 0 || s.failed > 0 || s.dropped > 0 {
            warn!(webhook = %self.target, sent = s.sent, failed = s.failed, rejected = s.rejected,
                dropped = s.dropped, queued = s.queued, "webhook stopped with undelivered alerts");
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

fn build_agent(cfg: &WebhookConfig) -> Result<ureq::Agent> {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_global(Some(cfg.timeout))
        .user_agent(format!("monitor/{}", env!("CARGO_PKG_VERSION")));
    if !cfg.env_proxy {
        b = b.proxy(None);
    }
    if let Some(ca) = &cfg.ca_file {
        b = b.tls_config(crate::https::trust_only(ca)?);
    }
    Ok(b.build().into())
}

struct Worker {
    agent: ureq::Agent,
    cfg: WebhookConfig,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(self, rx: Receiver<Job>) {
        let c = &self.shared.c;
        while let Ok(job) = rx.recv() {
            c.queued.fetch_sub(1, Relaxed);
            if self.shared.deadline().is_some_and(|d| Instant::now() >= d) {
                c.failed.fetch_add(1, Relaxed);
                break;
            }
            self.deliver(&job);
        }
        // Past the deadline: whatever is still queued is given up.
        for _ in rx.try_iter() {
            c.queued.fetch_sub(1, Relaxed);
            c.failed.fetch_add(1, Relaxed);
        }
    }

    fn deliver(&self, job: &Job) {
        let c = &self.shared.c;
        let max_attempts = self.cfg.max_attempts.max(1);
        let mut backoff = self.cfg.backoff_initial;
        let mut attempt = 1u32;
        loop {
            match self.post(job, attempt) {
                Outcome::Sent => {
                    c.sent.fetch_add(1, Relaxed);
                    return;
                }
                Outcome::Rejected(status) => {
                    c.rejected.fetch_add(1, Relaxed);
                    warn!(webhook = %self.target(), status, delivery = %job.delivery,
                        "webhook rejected an alert; not retried");
                    return;
                }
                Outcome::Retry(why, retry_after) => {
                    let wait = retry_after.unwrap_or(backoff).min(self.cfg.backoff_max);
                    let too_old = job.queued_at.elapsed() + wait >= self.cfg.max_age;
                    if attempt >= max_attempts || too_old || !self.shared.sleep(wait) {
                        c.failed.fetch_add(1, Relaxed);
                        warn!(webhook = %self.target(), attempts = attempt, error = %why,
                            delivery = %job.delivery, "webhook delivery failed; alert given up");
                        return;
                    }
                    c.retried.fetch_add(1, Relaxed);
                    attempt += 1;
                    backoff = (backoff * 2).min(self.cfg.backoff_max);
                }
            }
        }
    }

    fn target(&self) -> &str {
        self.cfg.url.redacted()
    }

    fn post(&self, job: &Job, attempt: u32) -> Outcome {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut req = self
            .agent
            .post(self.cfg.url.as_str())
            .header("Content-Type", "application/json")
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(DELIVERY_HEADER, job.delivery.as_str())
            .header(ATTEMPT_HEADER, attempt.to_string());
        if let Some(s) = &self.cfg.secret {
            req = req.header(SIGNATURE_HEADER, s.sign(&job.body));
        }
        match req.send(&job.body[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // Read (a bounded amount of) the body so the connection can be reused.
                let _ = resp.body_mut().with_config().limit(64 * 1024).read_to_vec();
                match status {
                    200..=299 => Outcome::Sent,
                    408 | 429 | 500..=599 => Outcome::Retry(format!("HTTP {status}"), retry_after),
                    _ => Outcome::Rejected(status),
                }
            }
            Err(e) => Outcome::Retry(crate::https::describe(&e), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_is_redacted() {
        let u: WebhookUrl = "https://hooks.example.com/services/T000/B000/SECRETTOKEN?x=1"
            .parse()
            .unwrap();
        assert_eq!(u.redacted(), "https://hooks.example.com");
        assert!(!format!("{u:?} {u}").contains("SECRET"));
        let u: WebhookUrl = "https://user:SECRET@hooks.example.com:8443/x"
            .parse()
            .unwrap();
        assert_eq!(u.redacted(), "https://hooks.example.com:8443");
        assert!(!format!("{u:?} {u}").contains("SECRET"));
        assert!("ftp://x/".parse::<WebhookUrl>().is_err());
        assert!("not a url".parse::<WebhookUrl>().is_err());
        assert_eq!(
            "http://127.0.0.1:8080/x"
                .parse::<WebhookUrl>()
                .unwrap()
                .redacted(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn signature_round_trip() {
        let s = Secret::new(b"k3y".to_vec());
        let h = s.sign(b"{\"a\":1}");
        assert!(h.starts_with("sha256=") && h.len() == 7 + 64);
        assert!(verify(b"k3y", b"{\"a\":1}", &h));
        assert!(!verify(b"k3y", b"{\"a\":2}", &h));
        assert!(!verify(b"other", b"{\"a\":1}", &h));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn secret_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "k3y\n").unwrap();
        let s = Secret::from_file(&p).unwrap();
        assert!(verify(b"k3y", b"x", &s.sign(b"x")));
        std::fs::write(&p, "\n").unwrap();
        assert!(Secret::from_file(&p).is_err());
    }
}
