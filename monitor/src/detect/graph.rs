//! `off-path`: a workload that the graph governs calls a destination (or method, or path)
//! that none of its edges allow.

use serde_json::json;

use super::{Finding, Obs, default_severity};
use crate::rules::Rules;

pub fn off_path(rules: &Rules, obs: &Obs, out: &mut Vec<Finding>) {
    let edges: Vec<_> = rules
        .edges
        .iter()
        .filter(|e| e.from == obs.source)
        .collect();
    if edges.is_empty() {
        // Not governed by the graph: nothing is expected of it.
        return;
    }
    let rec = obs.rec;
    let allowed = edges.iter().any(|e| {
        e.to == obs.destination
            && (e.methods.is_empty()
                || e.methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&rec.method)))
            && (e.paths.is_empty() || e.paths.iter().any(|p| rec.path.starts_with(p.as_str())))
    });
    if allowed {
        return;
    }
    out.push(Finding {
        rule: "off-path",
        severity: default_severity("off-path"),
        summary: format!("{} called {} ({} {}), which its graph does not allow", obs.source, obs.destination, rec.method, rec.path.split('?').next().unwrap_or("")),
        expected: json!({"allowed_edges": edges.iter().map(|e| json!({"to": e.to, "methods": e.methods, "paths": e.paths})).collect::<Vec<_>>()}),
        first_seen: None,
    });
}
