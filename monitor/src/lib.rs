//! The monitor's userspace pipeline: probe → event → parsed request → credential observation
//! → (detection) → sink. The `monitor` binary wires these together; tests, fuzz targets and
//! benchmarks use them directly.

pub mod alert;
pub mod credential;
pub mod detect;
pub mod event;
pub mod https;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod parse;
pub mod pipeline;
pub mod probe;
pub mod rules;
pub mod sink;

/// Default place of the fingerprint key; one key per cluster makes fingerprints agree.
pub const DEFAULT_KEY_FILE: &str = "/var/lib/monitor/fingerprint.key";
