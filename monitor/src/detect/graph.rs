//! `off-path`: a workload that the graph governs calls a destination (or method, or path)
//! that none of its edges allow.

use serde_json::json;

use super::{Finding, Obs, default_severity};
use crate::rules::{Rules, path};

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
    // Edges hold normalised prefixes (rules::check); a path without a normal form matches
    // none of them.
    let path = edges
        .iter()
        .any(|e| !e.paths.is_empty())
        .then(|| path::normalize(&rec.path))
        .flatten();
    let allowed = edges.iter().any(|e| {
        e.to == obs.destination
            && (e.methods.is_empty()
                || e.methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&rec.method)))
            && (e.paths.is_empty()
                || path
                    .as_deref()
                    .is_some_and(|n| e.paths.iter().any(|p| path::under(n, p))))
    });
    if allowed {
        return;
    }
    out.push(Finding {
        rule: "off-path",
        severity: default_severity("off-path"),
        summary: format!("{} called {} ({} {}), which its graph does not allow", obs.source, obs.destination, rec.method, rec.path.split('?').next().unwrap_or("")),
        expected: json!({"allowed_edges": edges.iter().map(|e| json!({"to": e.to, "methods": e.methods, "paths": e.paths})).collect::<Vec<_>>(), "normalised_path": path}),
        first_seen: None,
    });
}
