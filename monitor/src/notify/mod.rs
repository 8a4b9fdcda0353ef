//! Alert outputs for SOC tooling: the wire format (`--alert-format`), an alerts file with
//! size-based rotation, and a signed webhook with a bounded queue and retries.
//!
//! [`Notifier`] is what the daemon calls: `send` per alert (never blocks), `flush` per batch,
//! `shutdown` at exit, `stats` for metrics. stdout is the daemon's own; it can use
//! [`Notifier::render_line`] to print in the same format.

pub mod file;
pub mod format;
pub mod webhook;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};

pub use self::{
    file::{FileStats, RotatingFile},
    format::{AlertFormat, render},
    webhook::{Secret, Webhook, WebhookConfig, WebhookStats, WebhookUrl},
};
use crate::alert::Alert;

/// Output options shared by `run` and `replay` (flatten into their arguments).
#[derive(clap::Args, Debug, Clone)]
pub struct NotifyArgs {
    /// Format of alerts on every output: `v1` (monitor.alert/v1), `ocsf` (OCSF Detection
    /// Finding, class 2004) or `falco` (Falco output JSON, for Falcosidekick).
    #[arg(long, value_enum, default_value_t = AlertFormat::V1, env = "MONITOR_ALERT_FORMAT")]
    pub alert_format: AlertFormat,
    /// Rotate the alerts file when it would grow past this many MiB (0: never).
    #[arg(long, value_name = "MB", default_value_t = 100)]
    pub alerts_file_max_mb: u64,
    /// Rotated alerts files kept (PATH.1 ... PATH.K).
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub alerts_file_keep: usize,
    /// POST each alert as JSON to this http:// or https:// URL.
    #[arg(
        long,
        value_name = "URL",
        env = "MONITOR_WEBHOOK",
        hide_env_values = true
    )]
    pub webhook: Option<WebhookUrl>,
    /// File holding the HMAC-SHA256 key that signs webhook bodies (X-Monitor-Signature).
    #[arg(long, value_name = "PATH", env = "MONITOR_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Alerts waiting for the webhook; beyond it they are dropped (counted).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub webhook_queue: usize,
    /// Attempts per alert (the first included) before it is given up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub webhook_max_attempts: u32,
    /// An alert not delivered this long after it was queued is given up.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub webhook_max_age: Duration,
    /// Timeout of one webhook request (connect, TLS, send, response).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
    /// PEM CA certificates to trust for an https:// webhook instead of the bundled web roots.
    #[arg(long, value_name = "PATH")]
    pub webhook_ca_file: Option<PathBuf>,
}

impl Default for NotifyArgs {
    fn default() -> Self {
        NotifyArgs {
            alert_format: AlertFormat::V1,
            alerts_file_max_mb: 100,
            alerts_file_keep: 5,
            webhook: None,
            webhook_secret_file: None,
            webhook_queue: 10_000,
            webhook_max_attempts: 10,
            webhook_max_age: Duration::from_secs(300),
            webhook_timeout: Duration::from_secs(10),
            webhook_ca_file: None,
        }
    }
}

impl NotifyArgs {
    /// The webhook settings these arguments give, if a webhook is set (reads the secret file).
    pub fn webhook_config(&self) -> Result<Option<WebhookConfig>> {
        let Some(url) = &self.webhook else {
            return Ok(None);
        };
        let mut cfg = WebhookConfig::new(url.clone());
        cfg.secret = self
            .webhook_secret_file
            .as_deref()
            .map(Secret::from_file)
            .transpose()?;
        cfg.queue = self.webhook_queue.max(1);
        cfg.max_attempts = self.webhook_max_attempts.max(1);
        cfg.max_age = self.webhook_max_age;
        cfg.timeout = self.webhook_timeout;
        cfg.ca_file = self.webhook_ca_file.clone();
        Ok(Some(cfg))
    }
}

/// The alerts file and the webhook, in the chosen format.
pub struct Notifier {
    format: AlertFormat,
    file: Option<RotatingFile>,
    webhook: Option<Webhook>,
    alerts: u64,
    render_errors: u64,
}

impl Notifier {
    /// Opens the alerts file (0640, appending) and starts the webhook worker. Errors (a file
    /// that cannot be opened, an unreadable secret, a bad CA file) are for startup to report.
    pub fn new(args: &NotifyArgs, alerts_file: Option<PathBuf>) -> Result<Self> {
        let file = alerts_file
            .map(|p| {
                RotatingFile::open(
                    &p,
                    args.alerts_file_max_mb.saturating_mul(1024 * 1024),
                    args.alerts_file_keep,
                )
                .with_context(|| format!("opening the alerts file {}", p.display()))
            })
            .transpose()?;
        let webhook = args.webhook_config()?.map(Webhook::new).transpose()?;
        Ok(Notifier {
            format: args.alert_format,
            file,
            webhook,
            alerts: 0,
            render_errors: 0,
        })
    }

    /// A notifier with a ready webhook configuration (tests, embedding).
    pub fn with_webhook(
        format: AlertFormat,
        file: Option<RotatingFile>,
        webhook: Option<WebhookConfig>,
    ) -> Result<Self> {
        Ok(Notifier {
            format,
            file,
            webhook: webhook.map(Webhook::new).transpose()?,
            alerts: 0,
            render_errors: 0,
        })
    }

    pub fn format(&self) -> AlertFormat {
        self.format
    }

    /// True when there is a file or a webhook to send to.
    pub fn is_active(&self) -> bool {
        self.file.is_some() || self.webhook.is_some()
    }

    /// The alert in the chosen format.
    pub fn render(&self, a: &Alert) -> Value {
        render(a, self.format)
    }

    /// The alert in the chosen format as one JSON line, without the newline (for stdout).
    pub fn render_line(&self, a: &Alert) -> Vec<u8> {
        serde_json::to_vec(&self.render(a)).unwrap_or_default()
    }

    /// Writes the alert to the file (buffered until [`flush`](Self::flush)) and queues it for
    /// the webhook. Never blocks on the network; failures are counted.
    pub fn send(&mut self, a: &Alert) {
        self.alerts += 1;
        if !self.is_active() {
            return;
        }
        let line = match serde_json::to_vec(&self.render(a)) {
            Ok(l) => l,
            Err(_) => {
                self.render_errors += 1;
                return;
            }
        };
        if let Some(f) = self.file.as_mut() {
            f.write_line(&line);
        }
        if let Some(w) = &self.webhook {
            w.enqueue(line, format::delivery_uuid(a));
        }
    }

    /// Flushes the alerts file (call once per batch).
    pub fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            f.flush();
        }
    }

    /// Flushes the file and gives the webhook up to `timeout` to deliver what is queued.
    /// Returns the final counters (as [`stats`](Self::stats)).
    pub fn shutdown(mut self, timeout: Duration) -> Value {
        self.flush();
        let mut s = self.stats();
        if let Some(w) = self.webhook.take() {
            let target = w.target().to_string();
            s["webhook"] = webhook_json(&w.shutdown(timeout), target.into());
        }
        s
    }

    /// Counters of the alerts file, if there is one.
    pub fn file_stats(&self) -> Option<FileStats> {
        self.file.as_ref().map(|f| f.stats().clone())
    }

    /// Alerts that could not be rendered in the chosen format.
    pub fn render_errors(&self) -> u64 {
        self.render_errors
    }

    pub fn webhook_stats(&self) -> Option<WebhookStats> {
        self.webhook.as_ref().map(Webhook::stats)
    }

    /// `{format, alerts, render_errors, file: {...}|null, webhook: {...}|null}`.
    pub fn stats(&self) -> Value {
        json!({
            "format": self.format.as_str(),
            "alerts": self.alerts,
            "render_errors": self.render_errors,
            "file": self.file.as_ref().map(RotatingFile::stats_json),
            "webhook": self.webhook.as_ref().map(|w| webhook_json(&w.stats(), w.target().into())),
        })
    }
}

fn webhook_json(s: &WebhookStats, target: Value) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_else(|_| json!({}));
    v["target"] = target;
    v
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::collections::BTreeMap;

    use crate::alert::*;

    pub fn sample_alert() -> Alert {
        Alert {
            schema: SCHEMA.into(),
            time: "2026-11-23T10:31:44.123456Z".into(),
            id: "a1b2c3d4".into(),
            rule: "token-replay".into(),
            severity: Severity::High,
            summary: "token 3f2a presented by intruder, bound to payments".into(),
            credential: AlertCredential {
                fingerprint: "3f2a9c0d11223344556677889900aabb".into(),
                kind: "jwt".into(),
                claims: BTreeMap::from([("sub".into(), "payments".into())]),
            },
            source: AlertSource {
                workload: "intruder".into(),
                pid: 4242,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                node: "node-1".into(),
                ..Default::default()
            },
            destination: AlertDestination::default(),
            expected: serde_json::json!({"bound_to": "payments"}),
            first_seen: None,
            first_seen_by: None,
            owner: None,
            references: vec![],
            count: 1,
        }
    }
}
