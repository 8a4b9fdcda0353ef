//! What `run` and `replay` share after the pipeline: detection, and writing request records
//! and alerts (stdout JSON lines, an alerts file).

use std::{io::Write, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use clap::{Args, ValueEnum};
use monitor::{
    alert::Alert,
    detect::{Detector, state::State, workload},
    notify::{Notifier, NotifyArgs},
    pipeline::RequestRecord,
    rules::{Mode, Rules},
    sink::{
        bindings::SharedBindings,
        clickhouse::{ClickHouseArgs, ClickHouseSink, SinkRuntime},
    },
};
use tracing::{error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Print {
    /// Request records and alerts.
    All,
    Requests,
    Alerts,
    None,
}

#[derive(Args, Debug, Clone)]
pub struct DetectArgs {
    /// Rules directory (or file): workloads, destinations, edges, credentials, settings.
    /// Without it every detection that needs no policy still runs.
    #[arg(long, env = "MONITOR_RULES")]
    pub rules: Option<PathBuf>,
    /// `learn` builds bindings without reuse alerts; `enforce` alerts. Default: the rules' mode.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// What goes to stdout as JSON lines.
    #[arg(long, value_enum, default_value_t = Print::All)]
    pub print: Print,
    /// Also append alerts (JSON lines, in `--alert-format`) to this file, rotated by size.
    #[arg(long, value_name = "PATH")]
    pub alerts_file: Option<PathBuf>,
    /// Bindings and open alerts are restored from and saved to this file (fingerprints only).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// With `--mode learn`: write the rules in force plus the workloads, destinations, edges
    /// and credential bindings seen to this file on exit, for review.
    #[arg(long, value_name = "FILE")]
    pub learn_out: Option<PathBuf>,
    #[command(flatten)]
    pub notify: NotifyArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

/// History in ClickHouse and bindings shared with the other nodes through it. The sink runs
/// on its own runtime thread, so neither the capture loop nor replay waits on the server;
/// `run` (inside the daemon's runtime) and `replay` (synchronous) reach it the same way.
struct Store {
    sink: ClickHouseSink,
    rt: SinkRuntime,
    node: String,
}

pub fn load_rules(path: Option<&std::path::Path>) -> Result<Arc<Rules>> {
    match path {
        None => Ok(Arc::new(Rules::default())),
        Some(p) => Rules::load(p).map(Arc::new).map_err(|errs| {
            for e in &errs {
                error!("{e}");
            }
            anyhow::anyhow!("{} error(s) in the rules at {}", errs.len(), p.display())
        }),
    }
}

pub struct Outputs {
    pub detector: Detector,
    args: DetectArgs,
    /// Live: a bounded queue that drops (counted) rather than block the capture loop.
    stdout: crate::stdout::Stdout,
    /// Alerts file (rotated) and webhook, in the chosen alert format.
    notifier: Option<Notifier>,
    store: Option<Store>,
    alerts: Vec<Alert>,
}

impl Outputs {
    /// `live`: bindings from other nodes are refreshed in the background (run); a replay
    /// reads them once at the start, so that it stays deterministic.
    pub fn new(args: &DetectArgs, node: &str, live: bool) -> Result<Self> {
        let rules = load_rules(args.rules.as_deref())?;
        let cap = rules
            .settings
            .max_tracked_credentials
            .unwrap_or(monitor::detect::DEFAULT_MAX_CREDENTIALS);
        let state = match &args.state_file {
            Some(p) => Some(State::load_bounded(
                p,
                cap,
                rules
                    .settings
                    .max_open_alerts
                    .unwrap_or(monitor::detect::state::DEFAULT_MAX_OPEN_ALERTS),
            )?),
            None => None,
        };
        let mut detector = Detector::new(rules, node, args.mode, state);
        let notifier = Notifier::new(&args.notify, args.alerts_file.clone())?;
        let store = match args.clickhouse.sink_config() {
            None => None,
            Some(cfg) => {
                let (sink, rt) = ClickHouseSink::start_dedicated(cfg)?;
                let bindings = SharedBindings::new(&sink);
                let loading = bindings.clone();
                // Each wait is bounded by --clickhouse-timeout; a server that did not answer
                // the migration is not waited on twice. Live, the first refresh that gets
                // through loads them all.
                let loaded = if sink.answered_at_start() {
                    rt.wait(async move { loading.load_initial().await })
                } else {
                    Err(anyhow::anyhow!("no answer at start"))
                };
                match loaded {
                    Ok(n) => info!(bindings = n, "bindings from all nodes loaded"),
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "ClickHouse not reachable: bindings of other nodes unknown until it is")
                    }
                }
                if live {
                    let _guard = rt.handle().enter();
                    bindings.spawn_refresh(Duration::from_secs(5));
                }
                detector = detector.with_shared(Arc::new(bindings));
                detector.set_retention(Some(Duration::from_secs(
                    u64::from(args.clickhouse.clickhouse_ttl_days) * 86_400,
                )));
                Some(Store {
                    sink,
                    rt,
                    node: node.to_string(),
                })
            }
        };
        Ok(Outputs {
            detector,
            args: args.clone(),
            stdout: crate::stdout::Stdout::new(live),
            notifier: Some(notifier),
            store,
            alerts: Vec::new(),
        })
    }

    /// Re-reads the rules (SIGHUP); on any error the rules in force stay.
    pub fn reload(&mut self) {
        match load_rules(self.args.rules.as_deref()) {
            Ok(r) => {
                self.detector.set_rules(r, self.args.mode);
                info!("rules reloaded");
            }
            Err(e) => warn!(error = %e, "rules not reloaded; keeping the rules in force"),
        }
    }

    /// Detects on, then writes, a batch of records.
    pub fn write(&mut self, recs: &mut Vec<RequestRecord>) {
        for r in recs.iter() {
            self.detector.observe(r, &mut self.alerts);
        }
        if let Some(st) = &self.store {
            for r in recs.iter() {
                st.sink.record(
                    r,
                    &st.node,
                    &workload::source_workload(self.detector.rules(), r),
                );
            }
        }
        let print_req = matches!(self.args.print, Print::All | Print::Requests);
        let print_alerts = matches!(self.args.print, Print::All | Print::Alerts);
        for r in recs.drain(..) {
            if print_req {
                write_json(&mut self.stdout, &r);
            }
        }
        let notifier = self.notifier.as_mut().expect("notifier until finish");
        for a in self.alerts.drain(..) {
            if print_alerts {
                let _ = self.stdout.write_all(&notifier.render_line(&a));
                let _ = self.stdout.write_all(b"\n");
            }
            notifier.send(&a);
            if let Some(st) = &self.store {
                st.sink.alert(&a);
            }
        }
        notifier.flush();
        self.stdout.flush();
    }

    /// Periodic: close deduplication windows (their final counts are written).
    pub fn tick(&mut self, now_ns: u64) {
        self.detector.flush(now_ns, &mut self.alerts);
        if !self.alerts.is_empty() {
            self.write(&mut Vec::new());
        }
    }

    /// Lines stdout's reader did not take in time (for the exit summary).
    pub fn stdout_dropped(&self) -> u64 {
        self.stdout.dropped
    }

    /// Detector and output counters for `/metrics`.
    pub fn fill_metrics(&self, s: &mut monitor::metrics::Snapshot) {
        s.detect = self.detector.stats.clone();
        if let Some(n) = &self.notifier {
            s.webhook = n.webhook_stats();
            s.alerts_file = n.file_stats();
            s.alert_render_errors = n.render_errors();
        }
        s.clickhouse = self.store.as_ref().map(|st| st.sink.stats());
        s.stdout_dropped_lines = self.stdout.dropped;
        s.stdout_queued_bytes = self.stdout.queued() as u64;
    }

    /// Final counts out, webhook drained (up to 5 s), state and learnt rules saved; returns
    /// the notifier's counters for the exit summary.
    pub fn finish(&mut self) -> Result<serde_json::Value> {
        self.detector.flush_counts(&mut self.alerts);
        self.write(&mut Vec::new());
        // Local files first: what follows waits on the network, and a stop cut short there
        // (systemd's TimeoutStopSec, a pod's grace period) must not cost them.
        let saved = self.save_files();
        let notify = self.notifier.take().map_or(serde_json::Value::Null, |n| {
            n.shutdown(Duration::from_secs(5))
        });
        let ch_stats = match self.store.take() {
            None => serde_json::Value::Null,
            Some(st) => {
                // Rows in hand go to the spool first, then it is sent until the first
                // request that fails (each bounded by --clickhouse-timeout): what is not sent
                // waits there for the next start, so being killed meanwhile loses nothing.
                let sink = st.sink.clone();
                if let Err(e) = st.rt.wait(async move { sink.shutdown().await }) {
                    warn!(error = %format!("{e:#}"), "ClickHouse shutdown");
                }
                serde_json::to_value(st.sink.stats()).unwrap_or_default()
            }
        };
        saved?;
        Ok(serde_json::json!({"notify": notify, "clickhouse": ch_stats}))
    }

    /// The state file and the learnt rules, each written whatever happened to the other.
    fn save_files(&self) -> Result<()> {
        self.detector.finish(
            self.args.state_file.as_deref(),
            self.args.learn_out.as_deref(),
        )
    }
}

fn write_json(out: &mut impl Write, v: &impl serde::Serialize) {
    match serde_json::to_writer(&mut *out, v) {
        Ok(()) => {
            let _ = out.write_all(b"\n");
        }
        Err(e) => warn!(error = %e, "cannot serialise"),
    }
}
