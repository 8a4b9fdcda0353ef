//! The alert envelope (`monitor.alert/v1`): what SOC tooling receives. Field names are part of
//! the interface (see DESIGN.md); secrets never appear, only fingerprints and claims.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "monitor.alert/v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertCredential {
    pub fingerprint: String,
    pub kind: String,
    /// Non-secret claims (JWT iss/sub/aud/exp..., basic-auth user).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertSource {
    pub workload: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<Arc<str>>,
    pub cgroup: Option<Arc<str>>,
    pub container_id: Option<String>,
    /// `namespace/name`.
    pub pod: Option<String>,
    pub node: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    // Added within v1: optional, absent when unknown (older readers ignore them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::identity::container::Runtime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The pod's controller (`Deployment`, `DaemonSet`, ...) and its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_name: Option<String>,
    /// systemd unit of a host process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertDestination {
    pub workload: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub host: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub schema: String,
    /// RFC 3339.
    pub time: String,
    /// Stable for one (rule, credential, source, destination): repeats within the
    /// deduplication window raise `count` instead of a new alert.
    pub id: String,
    pub rule: String,
    pub severity: Severity,
    pub summary: String,
    pub credential: AlertCredential,
    pub source: AlertSource,
    pub destination: AlertDestination,
    /// What the graph or binding said should have happened.
    pub expected: serde_json::Value,
    /// When this credential was first seen (RFC 3339), and by which workload.
    pub first_seen: Option<String>,
    pub first_seen_by: Option<String>,
    /// Team and contact owning the source workload (from rules).
    pub owner: Option<serde_json::Value>,
    /// OWASP NHI items and MITRE ATT&CK techniques.
    pub references: Vec<String>,
    /// Occurrences folded into this alert within the window (1 for the first).
    pub count: u64,
}
