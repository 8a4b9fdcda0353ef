//! What `run` and `replay` share after the pipeline: detection, and writing request records
//! and alerts (stdout JSON lines, an alerts file).

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use monitor::{
    alert::Alert,
    detect::{Detector, state::State},
    pipeline::RequestRecord,
    rules::{Mode, Rules},
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
    /// Also append alerts (JSON lines) to this file.
    #[arg(long, value_name = "PATH")]
    pub alerts_file: Option<PathBuf>,
    /// Bindings and open alerts are restored from and saved to this file (fingerprints only).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// With `--mode learn`: write the rules in force plus the workloads, destinations, edges
    /// and credential bindings seen to this file on exit, for review.
    #[arg(long, value_name = "FILE")]
    pub learn_out: Option<PathBuf>,
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
    stdout: BufWriter<std::io::Stdout>,
    alerts_file: Option<BufWriter<File>>,
    alerts: Vec<Alert>,
}

impl Outputs {
    pub fn new(args: &DetectArgs, node: &str) -> Result<Self> {
        let rules = load_rules(args.rules.as_deref())?;
        let cap = rules
            .settings
            .max_tracked_credentials
            .unwrap_or(monitor::detect::DEFAULT_MAX_CREDENTIALS);
        let state = match &args.state_file {
            Some(p) => Some(State::load(p, cap)?),
            None => None,
        };
        let detector = Detector::new(rules, node, args.mode, state);
        let alerts_file = args
            .alerts_file
            .as_ref()
            .map(|p| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map(BufWriter::new)
                    .with_context(|| format!("opening {}", p.display()))
            })
            .transpose()?;
        Ok(Outputs {
            detector,
            args: args.clone(),
            stdout: BufWriter::new(std::io::stdout()),
            alerts_file,
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
        let print_req = matches!(self.args.print, Print::All | Print::Requests);
        let print_alerts = matches!(self.args.print, Print::All | Print::Alerts);
        for r in recs.drain(..) {
            if print_req {
                write_json(&mut self.stdout, &r);
            }
        }
        for a in self.alerts.drain(..) {
            if print_alerts {
                write_json(&mut self.stdout, &a);
            }
            if let Some(f) = self.alerts_file.as_mut() {
                write_json(f, &a);
            }
        }
        let _ = self.stdout.flush();
        if let Some(f) = self.alerts_file.as_mut() {
            let _ = f.flush();
        }
    }

    /// Periodic: close deduplication windows (their final counts are written).
    pub fn tick(&mut self, now_ns: u64) {
        self.detector.flush(now_ns, &mut self.alerts);
        if !self.alerts.is_empty() {
            self.write(&mut Vec::new());
        }
    }

    pub fn finish(&mut self) -> Result<()> {
        self.detector.flush_counts(&mut self.alerts);
        self.write(&mut Vec::new());
        if let Some(p) = &self.args.state_file {
            self.detector.save_state(p)?;
        }
        if let Some(p) = &self.args.learn_out {
            let yaml = serde_yaml_ng::to_string(&self.detector.learnt_rules())?;
            let header = format!(
                "# Learnt by `monitor` ({} mode) from the traffic it saw: review before committing.\n\
                 # Workload names were derived from cgroups or executables; rename them freely.\n",
                if self.args.mode == Some(Mode::Learn) {
                    "learn"
                } else {
                    "enforce"
                }
            );
            std::fs::write(p, header + &yaml)
                .with_context(|| format!("writing {}", p.display()))?;
            info!(path = %p.display(), "learnt rules written");
        }
        Ok(())
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
