//! Policy: who the workloads are, where they may go, which credentials belong to whom, and how
//! each detection behaves. Several YAML files in one directory are merged; every error names
//! file:line:column and what was expected.

pub mod check;
pub mod path;

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobMatcher};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One rules file as written.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<Edge>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub human_identities: Vec<HumanIdentity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detections: Option<DetectionSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Build bindings and the graph from traffic; no reuse alerts.
    Learn,
    /// Alert on everything the rules and learnt bindings say is wrong.
    #[default]
    Enforce,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub team: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
}

/// A workload and how to recognise its processes or addresses. All given selectors must match.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default, rename = "match")]
    pub selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Identity the workload runs as (Kubernetes), compared with self-describing tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<K8sIdentity>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Glob on the cgroup v2 path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Glob on the executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Addresses or CIDRs: the static inventory for sources seen only by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Glob on the systemd unit of a host process (`nginx.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Kubernetes (from the API; a process whose pod is unknown matches none of these):
    /// glob on the pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Glob on the pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Glob on the pod's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Pod labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Glob on the owning workload as `Kind/name` (`Deployment/checkout`, `DaemonSet/*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Selector {
    /// No selector given at all.
    pub fn is_empty(&self) -> bool {
        self.cgroup.is_none()
            && self.exe.is_none()
            && self.comm.is_none()
            && self.ips.is_empty()
            && self.unit.is_none()
            && self.namespace.is_none()
            && self.pod.is_none()
            && self.service_account.is_none()
            && self.labels.is_empty()
            && self.owner.is_none()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Globs on the HTTP Host (or TLS SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// An allowed call: workload → destination, optionally only some methods and path prefixes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Globs on JWT claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRule {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: CredentialMatch,
    /// The workload this credential belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<String>,
    /// Longest acceptable lifetime (`exp - iat`), e.g. `1h`.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_lifetime: Option<Duration>,
    /// A canary: any use at all is an alert.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub honeytoken: bool,
    /// `issuer`, `subject`, `audience` of `match`, compiled when the rules load.
    #[serde(skip)]
    pub compiled: ClaimGlobs,
}

/// Claim globs compiled once when the rules load, not per observation.
#[derive(Debug, Clone, Default)]
pub struct ClaimGlobs {
    pub issuer: Option<GlobMatcher>,
    pub subject: Option<GlobMatcher>,
    /// `audience` of a credential rule, `user` of a human identity.
    pub third: Option<GlobMatcher>,
}

impl ClaimGlobs {
    /// Patterns that do not compile are left out: the checker has refused them already.
    pub fn of(issuer: &Option<String>, subject: &Option<String>, third: &Option<String>) -> Self {
        let c = |p: &Option<String>| p.as_deref().and_then(|p| glob(p).ok());
        ClaimGlobs {
            issuer: c(issuer),
            subject: c(subject),
            third: c(third),
        }
    }
}

/// Whether `value` matches the rule's `pattern` (no pattern: anything does), with its compiled
/// form when the rules were loaded, else (rules built in code) compiled here.
pub fn pattern_matches(
    pattern: &Option<String>,
    compiled: &Option<GlobMatcher>,
    value: Option<&str>,
) -> bool {
    match (pattern, compiled) {
        (None, _) => true,
        (Some(_), Some(g)) => value.is_some_and(|v| g.is_match(v)),
        (Some(p), None) => value.is_some_and(|v| glob(p).is_ok_and(|g| g.is_match(v))),
    }
}

/// A human identity: tokens matching these globs belong to people, not services.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HumanIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Basic-auth user names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip)]
    pub compiled: ClaimGlobs,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<crate::alert::Severity>,
    /// shared-credential: alert above this many distinct workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workloads: Option<usize>,
    /// concurrent-use: window in which two users count as concurrent.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    /// long-lived-token: default maximum lifetime.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_lifetime: Option<Duration>,
    /// cleartext-credential: also alert on loopback traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_loopback: Option<bool>,
}

/// Unknown keys land in `rules` and are reported as unknown detections by the checker
/// (serde cannot deny unknown fields next to a flattened map).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DetectionSettings {
    /// One alert per (rule, credential, source, destination) in this window; repeats count.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub dedup_window: Option<Duration>,
    /// Bindings (first-seen workload per credential) kept in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tracked_credentials: Option<usize>,
    /// Alerts with an open deduplication window kept in memory (default 20000); past it the
    /// oldest window closes early, its final count sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_alerts: Option<usize>,
    #[serde(default, flatten)]
    pub rules: BTreeMap<String, RuleSetting>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!("expected a duration like `90s`, `1h`: {e}"))
            })
        })
        .transpose()
    }
}

/// The rule ids of the detection catalogue: part of the interface.
pub const RULE_IDS: &[&str] = &[
    "token-replay",
    "bound-token-mismatch",
    "off-path",
    "cleartext-credential",
    "expired-token",
    "long-lived-token",
    "shared-credential",
    "concurrent-use",
    "human-identity",
    "honeytoken",
];

/// An error in a rules file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// A compiled workload selector.
#[derive(Debug, Clone)]
pub struct CompiledWorkload {
    pub name: String,
    pub cgroup: Option<GlobMatcher>,
    pub exe: Option<GlobMatcher>,
    pub comm: Option<String>,
    pub nets: Vec<IpNet>,
    pub unit: Option<GlobMatcher>,
    pub namespace: Option<GlobMatcher>,
    pub pod: Option<GlobMatcher>,
    pub service_account: Option<GlobMatcher>,
    pub labels: BTreeMap<String, String>,
    /// `Kind/name` of the pod's owner (`owner` in the rules; not the team `owner`).
    pub pod_owner: Option<GlobMatcher>,
    pub owner: Option<Owner>,
    pub identity: Option<K8sIdentity>,
}

impl CompiledWorkload {
    /// Selects by the process itself (cgroup, exe, comm, unit, pod), not only by address.
    pub fn by_process(&self) -> bool {
        self.cgroup.is_some()
            || self.exe.is_some()
            || self.comm.is_some()
            || self.unit.is_some()
            || self.by_pod()
    }

    /// Selects by Kubernetes pod identity.
    pub fn by_pod(&self) -> bool {
        self.namespace.is_some()
            || self.pod.is_some()
            || self.service_account.is_some()
            || !self.labels.is_empty()
            || self.pod_owner.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct CompiledDestination {
    pub name: String,
    pub nets: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub hosts: Vec<GlobMatcher>,
}

/// Rules merged from a directory and ready to evaluate.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub mode: Mode,
    pub workloads: Vec<CompiledWorkload>,
    pub destinations: Vec<CompiledDestination>,
    pub edges: Vec<Edge>,
    pub credentials: Vec<CredentialRule>,
    pub human_identities: Vec<HumanIdentity>,
    pub settings: DetectionSettings,
    /// The merged source, for `learn` to extend.
    pub source: RulesFile,
}

pub fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("bad glob `{pattern}`: {e}"))
}

pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("expected an IP address or CIDR, got `{s}`"))
}

/// Rules files of a directory (or a single file), in name order.
pub fn rule_files(path: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let at = |message: String| RuleError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message,
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = fs::read_dir(path).map_err(|e| at(format!("cannot read the rules directory: {e}")))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

impl Rules {
    /// Loads and checks every rules file under `path`; all errors are returned, not just the first.
    pub fn load(path: &Path) -> Result<Rules, Vec<RuleError>> {
        let files = rule_files(path).map_err(|e| vec![e])?;
        let mut parsed = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            let text = match fs::read_to_string(&f) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(RuleError {
                        file: f,
                        line: 0,
                        column: 0,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            match check::parse(&f, &text) {
                Ok(r) => parsed.push((f, text, r)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        check::compile(parsed)
    }

    pub fn setting(&self, rule: &str) -> RuleSetting {
        self.settings.rules.get(rule).cloned().unwrap_or_default()
    }

    pub fn enabled(&self, rule: &str) -> bool {
        self.setting(rule).enabled.unwrap_or(true)
    }

    pub fn owner_of(&self, workload: &str) -> Option<&Owner> {
        self.workloads
            .iter()
            .find(|w| w.name == workload)
            .and_then(|w| w.owner.as_ref())
    }
}
