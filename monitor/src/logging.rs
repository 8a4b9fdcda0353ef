//! The binary's log set-up: `MONITOR_LOG` (an `EnvFilter`; default `info`) to stderr, with
//! the HTTP client crates capped at `warn` whatever `MONITOR_LOG` asks for. At debug and
//! trace they log request lines, URLs (with any user, password or token in them) and
//! headers (`Authorization`), and a log must never hold a credential. Their warnings and
//! errors say nothing of a request; the monitor's own messages about the same failures go
//! through [`crate::https::describe`] and [`crate::https::url_for_logs`].

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter,
    filter::{LevelFilter, Targets},
    fmt::MakeWriter,
    layer::SubscriberExt,
};

/// Crates (and their modules) never logged below `warn`: the HTTP clients of the webhook and
/// the Kubernetes API (ureq), of ClickHouse (clickhouse, hyper, hyper-util), and TLS.
pub const CAPPED: &[&str] = &[
    "ureq",
    "ureq_proto",
    "hyper",
    "hyper_util",
    "h2",
    "clickhouse",
    "rustls",
    "tokio_rustls",
];

/// A filter of its own, after the `EnvFilter`: an event passes only if both let it, so no
/// directive in `MONITOR_LOG` (`ureq=trace`, `hyper_util::client=trace`) can lift the cap.
pub fn cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(CAPPED.iter().map(|t| (*t, LevelFilter::WARN)))
}

/// `env` and [`cap`] over a formatter writing to `writer`.
pub fn subscriber<W>(env: EnvFilter, writer: W, ansi: bool) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(env).with(cap()).with(
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi),
    )
}

/// Installs the subscriber (and the bridge for crates that log through `log`, as ureq and
/// rustls do: their records get the same filters).
pub fn init() {
    use tracing_subscriber::util::SubscriberInitExt;
    let env = EnvFilter::try_from_env("MONITOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    subscriber(env, std::io::stderr, ansi).init();
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn http_clients_never_log_below_warn_whatever_monitor_log_says() {
        let buf = Buf::default();
        let env = EnvFilter::new(
            "trace,ureq=trace,ureq_proto::client=trace,hyper_util::client::legacy=trace,clickhouse=trace",
        );
        tracing::subscriber::with_default(subscriber(env, buf.clone(), false), || {
            tracing::trace!(target: "ureq::unversioned::transport", "GET http://u:canary-1@h/");
            tracing::debug!(target: "ureq_proto::client::flow", "authorization: Bearer canary-2");
            tracing::trace!(target: "hyper_util::client::legacy::connect::http", "canary-3");
            tracing::info!(target: "clickhouse::query", "canary-4");
            tracing::debug!(target: "rustls::client", "canary-5");
            tracing::warn!(target: "ureq::pool", "pool warning shown");
            tracing::trace!(target: "monitor::sink", "own trace shown");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains("canary"), "{out}");
        for shown in ["pool warning shown", "own trace shown"] {
            assert!(out.contains(shown), "{shown} missing from:\n{out}");
        }
    }
}
