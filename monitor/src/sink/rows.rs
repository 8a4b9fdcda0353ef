//! Rows of the ClickHouse tables (the latest schema version), and how records and alerts
//! become them. They serialize both to RowBinary (the `clickhouse` crate) and to JSON (the
//! spool): IPv6 addresses are octets in RowBinary and strings in JSON.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    time::UNIX_EPOCH,
};

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::{alert::Alert, pipeline::RequestRecord};

/// One row of `flows`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct FlowRow {
    /// µs since the epoch (DateTime64(6)).
    pub time: i64,
    pub node: String,
    pub source_workload: String,
    pub source_pid: u32,
    pub source_comm: String,
    pub source_exe: String,
    pub source_cgroup: String,
    /// `client` or `server`: which end of the connection the monitor saw (v2).
    pub side: String,
    /// The observing process's container, pod, unit and uid, like `source_exe` (v3).
    #[serde(default)]
    pub source_container_id: String,
    #[serde(default)]
    pub source_runtime: String,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub source_pod: String,
    #[serde(default)]
    pub source_pod_uid: String,
    #[serde(default)]
    pub source_service_account: String,
    /// `Kind/name` (`Deployment/checkout`).
    #[serde(default)]
    pub source_owner: String,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_unit: String,
    #[serde(default)]
    pub source_uid: Option<u32>,
    pub source_ip: Ipv6Addr,
    pub source_port: u16,
    pub destination_ip: Ipv6Addr,
    pub destination_port: u16,
    pub destination_host: String,
    pub tls: bool,
    pub library: String,
    pub protocol: String,
    pub method: String,
    pub path: String,
    /// PostgreSQL database of a login (v2).
    pub database_name: String,
    pub status: Option<u16>,
    pub credential_fingerprints: Vec<String>,
    pub credential_kinds: Vec<String>,
}

/// One row of `credential_observations`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct ObservationRow {
    pub time: i64,
    pub node: String,
    pub fingerprint: String,
    pub kind: String,
    pub header: String,
    pub name: String,
    pub user: String,
    pub claims: BTreeMap<String, String>,
    pub source_workload: String,
    pub source_pid: u32,
    pub source_comm: String,
    /// v3.
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub source_pod: String,
    #[serde(default)]
    pub source_service_account: String,
    #[serde(default)]
    pub source_owner: String,
    pub source_ip: Ipv6Addr,
    pub destination_ip: Ipv6Addr,
    pub destination_port: u16,
    pub destination_host: String,
    pub tls: bool,
    pub protocol: String,
    pub method: String,
    pub path: String,
}

/// One row of `alerts`: the alert's nested objects flattened, free-form parts as JSON.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct AlertRow {
    pub time: i64,
    pub id: String,
    pub schema: String,
    pub rule: String,
    pub severity: String,
    pub summary: String,
    pub credential_fingerprint: String,
    pub credential_kind: String,
    pub credential_claims: String,
    pub source_workload: String,
    pub source_pid: u32,
    pub source_comm: String,
    pub source_exe: String,
    pub source_cgroup: String,
    pub source_container_id: String,
    pub source_pod: String,
    /// v3.
    #[serde(default)]
    pub source_runtime: String,
    #[serde(default)]
    pub source_pod_uid: String,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub source_service_account: String,
    #[serde(default)]
    pub source_owner: String,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_unit: String,
    #[serde(default)]
    pub source_uid: Option<u32>,
    pub source_node: String,
    pub source_ip: Ipv6Addr,
    pub source_port: u16,
    pub destination_workload: String,
    pub destination_ip: Ipv6Addr,
    pub destination_port: u16,
    pub destination_host: String,
    pub destination_method: String,
    pub destination_path: String,
    pub expected: String,
    pub first_seen: Option<i64>,
    pub first_seen_by: String,
    pub owner: String,
    pub references: Vec<String>,
    pub count: u64,
}

/// One row of `credential_bindings` (`inserted_at` is the server's clock).
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct BindingRow {
    pub fingerprint: String,
    pub workload: String,
    pub node: String,
    /// ns since the epoch (DateTime64(9)).
    pub first_seen: i64,
}

/// An address as ClickHouse `IPv6` stores it: IPv4 mapped, `::` when unknown.
pub fn ipv6(ip: Option<IpAddr>) -> Ipv6Addr {
    match ip {
        Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped(),
        Some(IpAddr::V6(v6)) => v6,
        None => Ipv6Addr::UNSPECIFIED,
    }
}

/// The address back: IPv4-mapped ones as IPv4, `::` as unknown.
pub fn ip_of(v6: Ipv6Addr) -> Option<IpAddr> {
    if v6.is_unspecified() {
        None
    } else {
        Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
    }
}

fn micros(ns: u64) -> i64 {
    (ns / 1000) as i64
}

/// RFC 3339 (as alerts carry it) to µs since the epoch.
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_rfc3339_weak(s.strip_suffix("+00:00").unwrap_or(s)))
        .ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_micros() as i64)
}

/// Claims as a flat string map: nested objects as `a.b` keys, arrays and numbers as JSON.
pub fn flatten_claims(v: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

fn opt(s: Option<&str>) -> String {
    s.unwrap_or_default().to_string()
}

/// The `flows` row and the `credential_observations` rows of one request.
pub fn request_rows(
    r: &RequestRecord,
    node: &str,
    source_workload: &str,
) -> (FlowRow, Vec<ObservationRow>) {
    let time = micros(r.time);
    let source_ip = ipv6(r.source.as_ref().map(|e| e.ip));
    let destination_ip = ipv6(r.destination.as_ref().map(|e| e.ip));
    let destination_port = r.destination.as_ref().map_or(0, |e| e.port);
    let destination_host = opt(r.host.as_deref());
    let pod = r.pod.as_deref();
    let namespace = opt(pod.map(|p| p.namespace.as_str()));
    let pod_name = opt(pod.map(|p| p.name.as_str()));
    let service_account = opt(pod.and_then(|p| p.service_account.as_deref()));
    let owner = pod.and_then(|p| p.owner()).unwrap_or_default();
    let obs = r
        .credentials
        .iter()
        .map(|c| ObservationRow {
            time,
            node: node.to_string(),
            fingerprint: c.fingerprint.clone(),
            kind: c.kind.to_string(),
            header: c.header.clone(),
            name: opt(c.name.as_deref()),
            user: opt(c.user.as_deref()),
            claims: c
                .claims
                .as_ref()
                .and_then(|cl| serde_json::to_value(cl).ok())
                .map(|v| flatten_claims(&v))
                .unwrap_or_default(),
            source_workload: source_workload.to_string(),
            source_pid: r.pid,
            source_comm: r.comm.clone(),
            source_namespace: namespace.clone(),
            source_pod: pod_name.clone(),
            source_service_account: service_account.clone(),
            source_owner: owner.clone(),
            source_ip,
            destination_ip,
            destination_port,
            destination_host: destination_host.clone(),
            tls: r.tls,
            protocol: r.protocol.to_string(),
            method: r.method.clone(),
            path: r.path.clone(),
        })
        .collect();
    let flow = FlowRow {
        time,
        node: node.to_string(),
        source_workload: source_workload.to_string(),
        source_pid: r.pid,
        source_comm: r.comm.clone(),
        source_exe: opt(r.exe.as_deref()),
        source_cgroup: opt(r.cgroup.as_deref()),
        side: r.side.to_string(),
        source_container_id: opt(r.container_id.as_deref()),
        source_runtime: opt(r.runtime.map(|x| x.as_str())),
        source_namespace: namespace,
        source_pod: pod_name,
        source_pod_uid: opt(pod.map(|p| p.uid.as_str()).or(r.pod_uid.as_deref())),
        source_service_account: service_account,
        source_owner: owner,
        source_labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
        source_unit: opt(r.unit.as_deref()),
        source_uid: r.uid,
        source_ip,
        source_port: r.source.as_ref().map_or(0, |e| e.port),
        destination_ip,
        destination_port,
        destination_host,
        tls: r.tls,
        library: opt(r.library),
        protocol: r.protocol.to_string(),
        method: r.method.clone(),
        path: r.path.clone(),
        database_name: opt(r.database.as_deref()),
        status: None,
        credential_fingerprints: r
            .credentials
            .iter()
            .map(|c| c.fingerprint.clone())
            .collect(),
        credential_kinds: r.credentials.iter().map(|c| c.kind.to_string()).collect(),
    };
    (flow, obs)
}

fn json_or_empty(v: &serde_json::Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

/// The `alerts` row of an alert (a time that does not parse becomes 0 and is logged).
pub fn alert_row(a: &Alert) -> AlertRow {
    let time = rfc3339_micros(&a.time).unwrap_or_else(|| {
        tracing::warn!(id = %a.id, time = %a.time, "alert time is not RFC 3339");
        0
    });
    let claims = if a.credential.claims.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&a.credential.claims).unwrap_or_default()
    };
    AlertRow {
        time,
        id: a.id.clone(),
        schema: a.schema.clone(),
        rule: a.rule.clone(),
        severity: a.severity.as_str().to_string(),
        summary: a.summary.clone(),
        credential_fingerprint: a.credential.fingerprint.clone(),
        credential_kind: a.credential.kind.clone(),
        credential_claims: claims,
        source_workload: a.source.workload.clone(),
        source_pid: a.source.pid,
        source_comm: a.source.comm.clone(),
        source_exe: opt(a.source.exe.as_deref()),
        source_cgroup: opt(a.source.cgroup.as_deref()),
        source_container_id: opt(a.source.container_id.as_deref()),
        source_pod: opt(a.source.pod.as_deref()),
        source_runtime: opt(a.source.runtime.map(|x| x.as_str())),
        source_pod_uid: opt(a.source.pod_uid.as_deref()),
        source_namespace: opt(a.source.namespace.as_deref()),
        source_service_account: opt(a.source.service_account.as_deref()),
        source_owner: match (&a.source.owner_kind, &a.source.owner_name) {
            (Some(k), Some(n)) => format!("{k}/{n}"),
            _ => String::new(),
        },
        source_labels: a.source.labels.clone(),
        source_unit: opt(a.source.unit.as_deref()),
        source_uid: a.source.uid,
        source_node: a.source.node.clone(),
        source_ip: ipv6(a.source.ip),
        source_port: a.source.port.unwrap_or(0),
        destination_workload: opt(a.destination.workload.as_deref()),
        destination_ip: ipv6(a.destination.ip),
        destination_port: a.destination.port.unwrap_or(0),
        destination_host: opt(a.destination.host.as_deref()),
        destination_method: opt(a.destination.method.as_deref()),
        destination_path: opt(a.destination.path.as_deref()),
        expected: json_or_empty(&a.expected),
        first_seen: a.first_seen.as_deref().and_then(rfc3339_micros),
        first_seen_by: opt(a.first_seen_by.as_deref()),
        owner: a.owner.as_ref().map(json_or_empty).unwrap_or_default(),
        references: a.references.clone(),
        count: a.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(ipv6(Some(v4)).to_string(), "::ffff:10.1.2.3");
        assert_eq!(ip_of(ipv6(Some(v4))), Some(v4));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_of(ipv6(Some(v6))), Some(v6));
        assert_eq!(ip_of(ipv6(None)), None);
    }

    #[test]
    fn times() {
        assert_eq!(
            rfc3339_micros("1970-01-01T00:00:01.000002Z"),
            Some(1_000_002)
        );
        assert_eq!(
            rfc3339_micros("2026-01-01T00:00:00Z"),
            Some(1_767_225_600_000_000)
        );
        assert_eq!(rfc3339_micros("yesterday"), None);
    }

    #[test]
    fn claims_flatten() {
        let v = serde_json::json!({
            "iss": "https://kubernetes.default.svc",
            "aud": ["a", "b"],
            "exp": 17,
            "kubernetes": {"pod": "p-1", "namespace": "ns"},
            "nbf": null,
        });
        let m = flatten_claims(&v);
        assert_eq!(m["iss"], "https://kubernetes.default.svc");
        assert_eq!(m["aud"], r#"["a","b"]"#);
        assert_eq!(m["exp"], "17");
        assert_eq!(m["kubernetes.pod"], "p-1");
        assert!(!m.contains_key("nbf"));
    }

    #[test]
    fn json_round_trip() {
        let r = BindingRow {
            fingerprint: "ab".into(),
            workload: "payments".into(),
            node: "n1".into(),
            first_seen: 5,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<BindingRow>(&s).unwrap(), r);
    }
}
