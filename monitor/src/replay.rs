//! `monitor replay`: the userspace pipeline on a recorded event log, without the kernel.
//! Deterministic: time advances with the events, never with the wall clock.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::PathBuf,
};

/// Malformed lines warned about one by one; later ones are only counted.
const MAX_WARNED: u64 = 10;

use anyhow::{Context, Result};
use clap::Args;
use monitor::{credential::Fingerprinter, event::LogReader, pipeline::Pipeline};
use tracing::{info, warn};

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Event log written by `monitor run --record` (JSON lines; `-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub events: PathBuf,
    /// Fingerprint key; the live run's key reproduces its fingerprints.
    #[arg(long, env = "MONITOR_KEY_FILE", default_value = monitor::DEFAULT_KEY_FILE)]
    pub key_file: PathBuf,
    /// Node name for detections (default: the node recorded in the events).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub detect: crate::outputs::DetectArgs,
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let fp = Fingerprinter::load_or_create(&args.key_file)?;
    let input: Box<dyn BufRead> = if args.events.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            File::open(&args.events)
                .with_context(|| format!("opening {}", args.events.display()))?,
        ))
    };
    let mut pipe = Pipeline::new(fp);
    let mut outputs: Option<crate::outputs::Outputs> = None;
    let mut recs = Vec::new();
    let mut bad = 0u64;
    for item in LogReader::new(input) {
        let (n, ev) = item.context("reading the event log")?;
        // A bad line is counted and stepped over; its error names the position and the kind
        // of problem, never the content (it may hold a credential).
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                bad += 1;
                if bad <= MAX_WARNED {
                    warn!(line = n, error = %e, "skipping a malformed event");
                }
                if bad == MAX_WARNED {
                    warn!("further malformed events are only counted (malformed_lines)");
                }
                continue;
            }
        };
        if outputs.is_none() {
            let node = args.node.clone().unwrap_or_else(|| ev.node.clone());
            outputs = Some(crate::outputs::Outputs::new(&args.detect, &node, false)?);
        }
        let out = outputs.as_mut().expect("made above");
        let (now, wall) = (ev.ts_ns, ev.time_ns);
        pipe.handle(ev, &mut recs);
        pipe.flush(now, &mut recs);
        if !recs.is_empty() {
            out.write(&mut recs);
        }
        // Deduplication windows close on the events' clock, never the wall clock.
        out.tick(wall);
    }
    pipe.flush_all(&mut recs);
    let out = match outputs.as_mut() {
        Some(o) => o,
        None => outputs.insert(crate::outputs::Outputs::new(
            &args.detect,
            args.node.as_deref().unwrap_or("replay"),
            false,
        )?),
    };
    out.write(&mut recs);
    let notify = out.finish()?;
    let summary = serde_json::json!({
        "malformed_lines": bad,
        "pipeline": pipe.stats,
        "detect": out.detector.stats,
        "outputs": notify,
    });
    info!(summary = %summary, "replay finished");
    Ok(())
}
