//! Alert renderings for SOC tooling: the native `monitor.alert/v1` envelope, an OCSF 1.x
//! Detection Finding (class 2004) and Falco's output JSON (so Falcosidekick can route it).
//!
//! Every rendering is built from the alert alone (no clock, no randomness), so one alert always
//! renders to the same bytes: retries and files agree, and tests can compare goldens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::alert::{Alert, Severity};

/// Wire format of alerts on every output (stdout, alerts file, webhook).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum AlertFormat {
    /// The native `monitor.alert/v1` envelope.
    #[default]
    V1,
    /// OCSF 1.3 Detection Finding (class_uid 2004).
    Ocsf,
    /// Falco output JSON, as Falcosidekick accepts it.
    Falco,
}

impl AlertFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertFormat::V1 => "v1",
            AlertFormat::Ocsf => "ocsf",
            AlertFormat::Falco => "falco",
        }
    }
}

/// OCSF schema version the `ocsf` rendering follows.
pub const OCSF_VERSION: &str = "1.3.0";
/// OCSF class, category and activity of the rendering.
pub const OCSF_CLASS_UID: u32 = 2004;
pub const OCSF_CATEGORY_UID: u32 = 2;
pub const OCSF_ACTIVITY_CREATE: u32 = 1;
pub const OCSF_TYPE_UID: u32 = OCSF_CLASS_UID * 100 + OCSF_ACTIVITY_CREATE;
/// `source` of the Falco rendering (Falco's own are `syscall`, `k8s_audit`, plugin names).
pub const FALCO_SOURCE: &str = "monitor";

/// Renders `a` in `format`.
pub fn render(a: &Alert, format: AlertFormat) -> Value {
    match format {
        AlertFormat::V1 => serde_json::to_value(a).unwrap_or_else(|_| json!({})),
        AlertFormat::Ocsf => ocsf(a),
        AlertFormat::Falco => falco(a),
    }
}

/// OCSF `severity_id` (2 Low, 3 Medium, 4 High, 5 Critical) and its caption.
pub fn ocsf_severity(s: Severity) -> (u8, &'static str) {
    match s {
        Severity::Low => (2, "Low"),
        Severity::Medium => (3, "Medium"),
        Severity::High => (4, "High"),
        Severity::Critical => (5, "Critical"),
    }
}

/// Falco priority of a severity (Falco's scale: Emergency..Debug).
pub fn falco_priority(s: Severity) -> &'static str {
    match s {
        Severity::Low => "Notice",
        Severity::Medium => "Warning",
        Severity::High => "Error",
        Severity::Critical => "Critical",
    }
}

/// Parses the alert's RFC 3339 time (UTC `Z`, or `+00:00`).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .or_else(|| humantime::parse_rfc3339_weak(s.strip_suffix("+00:00")?).ok())
        .or_else(|| humantime::parse_rfc3339_weak(s.strip_suffix('Z')?).ok())
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// The alert's time; an unparsable one (never produced by the detector) reads as the epoch so
/// that rendering stays deterministic and the original string is kept alongside.
fn alert_time(a: &Alert) -> SystemTime {
    parse_time(&a.time).unwrap_or(UNIX_EPOCH)
}

/// A UUID (RFC 9562 version 8, name-based on SHA-256) identifying one delivery of one alert
/// occurrence: the same (id, time, count) always gives the same UUID, so receivers can drop
/// duplicates after a retry.
pub fn delivery_uuid(a: &Alert) -> String {
    let mut h = Sha256::new();
    h.update(a.id.as_bytes());
    h.update([0]);
    h.update(a.time.as_bytes());
    h.update([0]);
    h.update(a.count.to_be_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 9562 variant
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Splits `"namespace/name"` (the identity resolver's pod form) into its parts.
fn split_pod(pod: &str) -> (Option<&str>, &str) {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => (Some(ns), name),
        _ => (None, pod),
    }
}

/// `MITRE-ATT&CK T1550.001 Application Access Token` → (`T1550.001`, `Application Access Token`).
fn mitre_technique(reference: &str) -> Option<(&str, &str)> {
    let rest = reference
        .strip_prefix("MITRE-ATT&CK ")
        .or_else(|| reference.strip_prefix("MITRE ATT&CK "))?;
    let (id, name) = rest.split_once(' ').unwrap_or((rest, ""));
    (id.starts_with('T') && id.len() >= 5).then_some((id, name.trim()))
}

/// A short tag of a reference: `T1550.001` for MITRE techniques, `OWASP-NHI9` for OWASP items.
fn reference_tag(reference: &str) -> Option<&str> {
    if let Some((id, _)) = mitre_technique(reference) {
        return Some(id);
    }
    reference.split_whitespace().next()
}

fn insert_some<T: Into<Value>>(m: &mut Map<String, Value>, k: &str, v: Option<T>) {
    if let Some(v) = v {
        m.insert(k.to_string(), v.into());
    }
}

fn ocsf(a: &Alert) -> Value {
    let t = alert_time(a);
    let ms = epoch_ms(t);
    let (severity_id, severity) = ocsf_severity(a.severity);
    let src = &a.source;
    let dst = &a.destination;

    // Source endpoint: the workload presenting the credential.
    let mut src_ep = Map::new();
    insert_some(&mut src_ep, "ip", src.ip.map(|ip| ip.to_string()));
    insert_some(&mut src_ep, "port", src.port);
    src_ep.insert("name".into(), src.workload.clone().into());
    if let Some(c) = &src.container_id {
        src_ep.insert("container".into(), json!({ "uid": c }));
    }
    // Destination endpoint: where it was presented.
    let mut dst_ep = Map::new();
    insert_some(&mut dst_ep, "ip", dst.ip.map(|ip| ip.to_string()));
    insert_some(&mut dst_ep, "port", dst.port);
    insert_some(&mut dst_ep, "hostname", dst.host.clone());
    insert_some(&mut dst_ep, "svc_name", dst.workload.clone());

    // The presenting process.
    let mut process = Map::new();
    if src.pid != 0 {
        process.insert("pid".into(), src.pid.into());
    }
    if !src.comm.is_empty() {
        process.insert("name".into(), src.comm.clone().into());
    }
    if let Some(exe) = &src.exe {
        let name = exe.rsplit('/').next().unwrap_or(exe);
        process.insert(
            "file".into(),
            json!({ "path": &**exe, "name": name, "type_id": 1, "type": "Regular File" }),
        );
    }

    let mut evidence = Map::new();
    evidence.insert("src_endpoint".into(), Value::Object(src_ep.clone()));
    evidence.insert("dst_endpoint".into(), Value::Object(dst_ep.clone()));
    if !process.is_empty() {
        evidence.insert("process".into(), Value::Object(process.clone()));
        evidence.insert("actor".into(), json!({ "process": process }));
    }
    if let Some(c) = &src.container_id {
        evidence.insert("container".into(), json!({ "uid": c }));
    }
    if dst.method.is_some() || dst.path.is_some() {
        let mut url = Map::new();
        insert_some(&mut url, "hostname", dst.host.clone());
        insert_some(&mut url, "path", dst.path.clone());
        insert_some(&mut url, "port", dst.port);
        let mut req = Map::new();
        insert_some(&mut req, "http_method", dst.method.clone());
        req.insert("url".into(), Value::Object(url));
        evidence.insert("http_request".into(), Value::Object(req));
    }
    evidence.insert("name".into(), "credential-presentation".into());

    // Affected resources: the destination the credential reached, and the credential itself.
    let dst_name = dst
        .workload
        .clone()
        .or_else(|| dst.host.clone())
        .or_else(|| dst.ip.map(|ip| ip.to_string()))
        .unwrap_or_else(|| "unknown".into());
    let dst_uid = match (dst.ip, dst.port) {
        (Some(ip), Some(p)) => Some(std::net::SocketAddr::new(ip, p).to_string()),
        (Some(ip), None) => Some(ip.to_string()),
        _ => None,
    };
    let mut dst_res = Map::new();
    dst_res.insert("name".into(), dst_name.into());
    dst_res.insert("type".into(), "Destination Service".into());
    insert_some(&mut dst_res, "uid", dst_uid);
    let cred_res = json!({
        "name": format!("{} credential", a.credential.kind),
        "type": "Credential",
        "uid": a.credential.fingerprint,
    });

    // Observables: the credential fingerprint first (what a SOC pivots on), then addresses.
    let mut observables = vec![json!({
        "name": "credential.fingerprint",
        "type_id": 19,
        "type": "User Credential ID",
        "value": a.credential.fingerprint,
    })];
    if let Some(ip) = src.ip {
        observables.push(json!({"name": "evidences[0].src_endpoint.ip", "type_id": 2, "type": "IP Address", "value": ip.to_string()}));
    }
    if let Some(ip) = dst.ip {
        observables.push(json!({"name": "evidences[0].dst_endpoint.ip", "type_id": 2, "type": "IP Address", "value": ip.to_string()}));
    }
    if let Some(h) = &dst.host {
        observables.push(json!({"name": "evidences[0].dst_endpoint.hostname", "type_id": 1, "type": "Hostname", "value": h}));
    }
    if !src.comm.is_empty() {
        observables.push(json!({"name": "evidences[0].process.name", "type_id": 9, "type": "Process Name", "value": src.comm}));
    }

    let attacks: Vec<Value> = a
        .references
        .iter()
        .filter_map(|r| mitre_technique(r))
        .map(|(uid, name)| {
            let mut tech = Map::new();
            tech.insert("uid".into(), uid.into());
            if !name.is_empty() {
                tech.insert("name".into(), name.into());
            }
            json!({ "technique": tech })
        })
        .collect();

    let first_seen_ms = a
        .first_seen
        .as_deref()
        .and_then(parse_time)
        .map(epoch_ms)
        .unwrap_or(ms);
    let mut finding_info = Map::new();
    finding_info.insert("uid".into(), a.id.clone().into());
    finding_info.insert("title".into(), a.rule.clone().into());
    finding_info.insert("desc".into(), a.summary.clone().into());
    finding_info.insert("types".into(), json!([a.rule]));
    finding_info.insert("created_time".into(), ms.into());
    finding_info.insert("first_seen_time".into(), first_seen_ms.into());
    finding_info.insert("last_seen_time".into(), ms.into());
    finding_info.insert(
        "analytic".into(),
        json!({ "name": a.rule, "uid": a.rule, "type_id": 1, "type": "Rule" }),
    );
    if !attacks.is_empty() {
        finding_info.insert("attacks".into(), Value::Array(attacks));
    }
    finding_info.insert("product_uid".into(), "monitor".into());

    // What OCSF has no place for, kept verbatim.
    let mut unmapped = Map::new();
    unmapped.insert("schema".into(), a.schema.clone().into());
    unmapped.insert("time".into(), a.time.clone().into());
    unmapped.insert("severity".into(), a.severity.as_str().into());
    unmapped.insert(
        "credential".into(),
        json!({ "fingerprint": a.credential.fingerprint, "kind": a.credential.kind, "claims": a.credential.claims }),
    );
    unmapped.insert(
        "source".into(),
        json!({
            "workload": src.workload, "node": src.node, "cgroup": src.cgroup.as_deref(),
            "pod": src.pod, "container_id": src.container_id,
        }),
    );
    unmapped.insert(
        "destination".into(),
        json!({ "workload": dst.workload, "method": dst.method, "path": dst.path }),
    );
    unmapped.insert("expected".into(), a.expected.clone());
    insert_some(&mut unmapped, "first_seen", a.first_seen.clone());
    insert_some(&mut unmapped, "first_seen_by", a.first_seen_by.clone());
    insert_some(&mut unmapped, "owner", a.owner.clone());
    unmapped.insert("references".into(), json!(a.references));

    let mut device = Map::new();
    if !src.node.is_empty() {
        device.insert("hostname".into(), src.node.clone().into());
        device.insert("name".into(), src.node.clone().into());
        device.insert("type_id".into(), 0.into());
        device.insert("type".into(), "Unknown".into());
    }

    let mut out = Map::new();
    out.insert("activity_id".into(), OCSF_ACTIVITY_CREATE.into());
    out.insert("activity_name".into(), "Create".into());
    out.insert("category_uid".into(), OCSF_CATEGORY_UID.into());
    out.insert("category_name".into(), "Findings".into());
    out.insert("class_uid".into(), OCSF_CLASS_UID.into());
    out.insert("class_name".into(), "Detection Finding".into());
    out.insert("type_uid".into(), OCSF_TYPE_UID.into());
    out.insert("type_name".into(), "Detection Finding: Create".into());
    out.insert("severity_id".into(), severity_id.into());
    out.insert("severity".into(), severity.into());
    out.insert("time".into(), ms.into());
    out.insert("message".into(), a.summary.clone().into());
    out.insert("status_id".into(), 1.into());
    out.insert("status".into(), "New".into());
    out.insert("is_alert".into(), true.into());
    out.insert("count".into(), a.count.into());
    out.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "uid": a.id,
            "original_time": a.time,
            "log_name": crate::alert::SCHEMA,
            "product": {
                "name": "monitor",
                "vendor_name": "monitor",
                "version": env!("CARGO_PKG_VERSION"),
            },
        }),
    );
    out.insert("finding_info".into(), Value::Object(finding_info));
    out.insert("evidences".into(), json!([evidence]));
    out.insert("resources".into(), json!([dst_res, cred_res]));
    out.insert("observables".into(), Value::Array(observables));
    if !device.is_empty() {
        out.insert("device".into(), Value::Object(device));
    }
    out.insert("unmapped".into(), Value::Object(unmapped));
    Value::Object(out)
}

fn falco(a: &Alert) -> Value {
    let t = alert_time(a);
    let time = humantime::format_rfc3339_nanos(t).to_string();
    let src = &a.source;
    let dst = &a.destination;
    let priority = falco_priority(a.severity);

    let mut f = Map::new();
    // Falco's own field names where one means the same thing.
    f.insert(
        "evt.time.iso8601".into(),
        humantime::format_rfc3339_millis(t).to_string().into(),
    );
    if src.pid != 0 {
        f.insert("proc.pid".into(), src.pid.into());
    }
    if !src.comm.is_empty() {
        f.insert("proc.name".into(), src.comm.clone().into());
    }
    insert_some(
        &mut f,
        "proc.exepath",
        src.exe.as_deref().map(str::to_string),
    );
    insert_some(&mut f, "container.id", src.container_id.clone());
    if let Some(pod) = &src.pod {
        let (ns, name) = split_pod(pod);
        insert_some(&mut f, "k8s.ns.name", ns.map(str::to_string));
        f.insert("k8s.pod.name".into(), name.into());
    }
    insert_some(&mut f, "fd.cip", src.ip.map(|ip| ip.to_string()));
    insert_some(&mut f, "fd.cport", src.port);
    insert_some(&mut f, "fd.sip", dst.ip.map(|ip| ip.to_string()));
    insert_some(&mut f, "fd.sport", dst.port);
    insert_some(&mut f, "fd.sip.name", dst.host.clone());
    if !src.node.is_empty() {
        f.insert("evt.hostname".into(), src.node.clone().into());
    }
    // The monitor's own, under `monitor.`; structured values as JSON text so every
    // Falcosidekick output (which may template or label on them) sees a scalar.
    f.insert("monitor.alert_id".into(), a.id.clone().into());
    f.insert("monitor.severity".into(), a.severity.as_str().into());
    f.insert("monitor.count".into(), a.count.into());
    f.insert(
        "monitor.fingerprint".into(),
        a.credential.fingerprint.clone().into(),
    );
    f.insert(
        "monitor.credential_kind".into(),
        a.credential.kind.clone().into(),
    );
    if !a.credential.claims.is_empty() {
        for (k, v) in &a.credential.claims {
            let v = match v {
                Value::String(s) => Value::String(s.clone()),
                Value::Number(_) | Value::Bool(_) => v.clone(),
                other => Value::String(other.to_string()),
            };
            f.insert(format!("monitor.claims.{k}"), v);
        }
    }
    f.insert(
        "monitor.source_workload".into(),
        src.workload.clone().into(),
    );
    insert_some(
        &mut f,
        "monitor.source_cgroup",
        src.cgroup.as_deref().map(str::to_string),
    );
    if !src.node.is_empty() {
        f.insert("monitor.node".into(), src.node.clone().into());
    }
    insert_some(&mut f, "monitor.destination_workload", dst.workload.clone());
    insert_some(&mut f, "monitor.http_method", dst.method.clone());
    insert_some(&mut f, "monitor.http_path", dst.path.clone());
    if !a.expected.is_null() {
        f.insert("monitor.expected".into(), a.expected.to_string().into());
    }
    insert_some(&mut f, "monitor.first_seen", a.first_seen.clone());
    insert_some(&mut f, "monitor.first_seen_by", a.first_seen_by.clone());
    if let Some(o) = &a.owner {
        match o {
            Value::Object(m) => {
                for (k, v) in m {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    f.insert(format!("monitor.owner.{k}"), v.into());
                }
            }
            Value::String(s) => {
                f.insert("monitor.owner".into(), s.clone().into());
            }
            other => {
                f.insert("monitor.owner".into(), other.to_string().into());
            }
        }
    }
    if !a.references.is_empty() {
        f.insert("monitor.references".into(), a.references.join("; ").into());
    }

    let dest = match (&dst.host, dst.ip, dst.port) {
        (Some(h), _, Some(p)) => format!("{h}:{p}"),
        (Some(h), _, None) => h.clone(),
        (None, Some(ip), Some(p)) => std::net::SocketAddr::new(ip, p).to_string(),
        (None, Some(ip), None) => ip.to_string(),
        (None, None, _) => dst.workload.clone().unwrap_or_else(|| "unknown".into()),
    };
    // Falco's convention: "<time>: <Priority> <message> (<field>=<value> ...)".
    let output = format!(
        "{time}: {priority} {} (rule={} fingerprint={} kind={} source={} pid={} comm={} destination={} count={})",
        a.summary,
        a.rule,
        a.credential.fingerprint,
        a.credential.kind,
        src.workload,
        src.pid,
        if src.comm.is_empty() {
            "<NA>"
        } else {
            &src.comm
        },
        dest,
        a.count,
    );

    let mut tags = vec![
        "monitor".to_string(),
        "credential".to_string(),
        a.rule.clone(),
    ];
    for r in &a.references {
        if let Some(t) = reference_tag(r)
            && !tags.iter().any(|x| x == t)
        {
            tags.push(t.to_string());
        }
    }

    json!({
        "uuid": delivery_uuid(a),
        "output": output,
        "priority": priority,
        "rule": a.rule,
        "time": time,
        "output_fields": f,
        "source": FALCO_SOURCE,
        "tags": tags,
        "hostname": src.node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mitre_parsing() {
        assert_eq!(
            mitre_technique("MITRE-ATT&CK T1550.001 Application Access Token"),
            Some(("T1550.001", "Application Access Token"))
        );
        assert_eq!(mitre_technique("OWASP-NHI9 NHI Reuse"), None);
        assert_eq!(reference_tag("OWASP-NHI9 NHI Reuse"), Some("OWASP-NHI9"));
        assert_eq!(
            reference_tag("MITRE-ATT&CK T1078 Valid Accounts"),
            Some("T1078")
        );
    }

    #[test]
    fn time_parsing() {
        assert!(parse_time("2026-11-23T10:31:44.123456Z").is_some());
        assert!(parse_time("2026-11-23T10:31:44+00:00").is_some());
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn uuid_shape() {
        let a = crate::notify::tests_support::sample_alert();
        let u = delivery_uuid(&a);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
        assert_eq!(u, delivery_uuid(&a));
        let mut b = a.clone();
        b.count += 1;
        assert_ne!(u, delivery_uuid(&b));
    }
}
