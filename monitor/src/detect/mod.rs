//! Correlation: each credential observation is checked against the rules and against what
//! was seen before (bindings, users, times); findings become alerts, deduplicated per
//! (rule, credential, source, destination) within a window.

pub mod graph;
pub mod hygiene;
pub mod learn;
pub mod replay;
pub mod state;
pub mod workload;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    alert::{Alert, AlertCredential, AlertDestination, AlertSource, SCHEMA, Severity},
    credential::Credential,
    pipeline::RequestRecord,
    rules::{CredentialRule, Mode, Rules},
};

use self::state::State;

pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_CREDENTIALS: usize = 1_000_000;

/// Bindings made on other nodes (read from the shared store), by fingerprint.
pub trait SharedBindings: Send + Sync {
    fn get(&self, fingerprint: &str) -> Option<RemoteBinding>;
    /// A binding made here, for the other nodes.
    fn publish(&self, fingerprint: &str, workload: &str, node: &str, first_seen_ns: u64);
}

#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBinding {
    pub workload: String,
    pub node: String,
    pub first_seen_ns: u64,
}

/// One request as the detectors see it.
pub struct Obs<'a> {
    pub rec: &'a RequestRecord,
    pub time_ns: u64,
    pub source: String,
    pub destination: String,
    pub node: &'a str,
}

/// What a detector found; the engine turns it into an alert.
pub struct Finding {
    pub rule: &'static str,
    pub severity: Severity,
    pub summary: String,
    pub expected: Value,
    pub first_seen: Option<(u64, String)>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DetectStats {
    pub observations: u64,
    pub alerts: u64,
    pub deduplicated: u64,
    pub server_side_duplicates: u64,
    pub bindings: usize,
    pub bindings_evicted: u64,
    /// Alerts whose deduplication window is open now.
    pub open_alerts: usize,
    /// Open alerts closed before their window passed, to stay within `max_open_alerts`.
    pub open_alerts_evicted: u64,
    /// Entries of the state file dropped at load because they failed validation.
    pub state_entries_dropped: u64,
    /// Requests already older than the ClickHouse TTL when they arrived (a replayed old
    /// log): ClickHouse acknowledges their rows and then drops them.
    pub expired_on_arrival: u64,
    /// Requests whose path could not be normalised (learn mode: nothing learnt from them).
    pub unnormalisable_paths: u64,
    /// Requests not learnt because a bound of the learnt graph was reached (learn mode).
    pub not_learnt: u64,
    pub alerts_by_rule: BTreeMap<&'static str, u64>,
    /// (rule, severity in force) → alerts raised (metrics).
    #[serde(skip)]
    pub alerts_by_rule_severity: BTreeMap<(&'static str, Severity), u64>,
}

pub struct Detector {
    rules: Arc<Rules>,
    mode: Mode,
    node: String,
    state: State,
    shared: Option<Arc<dyn SharedBindings>>,
    /// Client-side flows seen recently: the server side of the same request is not a second use.
    client_flows: lru::LruCache<(std::net::SocketAddr, std::net::SocketAddr), u64>,
    graph: learn::Graph,
    /// Final counts of open alerts closed outside `emit` (rules reloaded with a smaller
    /// bound), sent with the next `flush`.
    pending: Vec<Alert>,
    /// ClickHouse's TTL, when rows go there: older requests are counted as expired on arrival.
    retention: Option<Duration>,
    /// Time of the oldest request expired on arrival.
    oldest_expired_ns: Option<u64>,
    pub stats: DetectStats,
}

pub fn references(rule: &str) -> Vec<String> {
    let r: &[&str] = match rule {
        "token-replay" => &[
            "OWASP-NHI9 NHI Reuse",
            "OWASP-NHI2 Secret Leakage",
            "MITRE-ATT&CK T1550.001 Application Access Token",
        ],
        "bound-token-mismatch" => &[
            "OWASP-NHI9 NHI Reuse",
            "MITRE-ATT&CK T1550.001 Application Access Token",
        ],
        "off-path" => &[
            "OWASP-NHI5 Overprivileged NHI",
            "MITRE-ATT&CK T1078 Valid Accounts",
            "NIST SP 800-207",
        ],
        "cleartext-credential" => &[
            "OWASP-NHI4 Insecure Authentication",
            "OWASP-NHI2 Secret Leakage",
            "MITRE-ATT&CK T1040 Network Sniffing",
        ],
        "expired-token" => &[
            "OWASP-NHI1 Improper Offboarding",
            "MITRE-ATT&CK T1078 Valid Accounts",
        ],
        "long-lived-token" => &["OWASP-NHI7 Long-Lived Secrets"],
        "shared-credential" => &["OWASP-NHI9 NHI Reuse"],
        "concurrent-use" => &[
            "OWASP-NHI9 NHI Reuse",
            "MITRE-ATT&CK T1550.001 Application Access Token",
        ],
        "human-identity" => &[
            "OWASP-NHI10 Human Use of NHI",
            "MITRE-ATT&CK T1078 Valid Accounts",
        ],
        "honeytoken" => &[
            "OWASP-NHI2 Secret Leakage",
            "MITRE-ATT&CK T1552 Unsecured Credentials",
        ],
        _ => &[],
    };
    r.iter().map(|s| s.to_string()).collect()
}

pub fn default_severity(rule: &str) -> Severity {
    match rule {
        "honeytoken" => Severity::Critical,
        "token-replay" | "bound-token-mismatch" | "concurrent-use" | "human-identity" => {
            Severity::High
        }
        "long-lived-token" => Severity::Low,
        _ => Severity::Medium,
    }
}

pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// Short form of a fingerprint for summaries and learnt names; any string (a fingerprint
/// from a tampered state file may not be hex) is cut at a character boundary.
pub(crate) fn short_fp(fp: &str) -> &str {
    fp.char_indices().nth(8).map_or(fp, |(i, _)| &fp[..i])
}

impl Detector {
    pub fn new(rules: Arc<Rules>, node: &str, mode: Option<Mode>, state: Option<State>) -> Self {
        let cap = rules
            .settings
            .max_tracked_credentials
            .unwrap_or(DEFAULT_MAX_CREDENTIALS);
        let mut d = Detector {
            mode: mode.unwrap_or(rules.mode),
            rules,
            node: node.to_string(),
            state: state.unwrap_or_else(|| State::new(cap)),
            shared: None,
            client_flows: lru::LruCache::new(std::num::NonZeroUsize::new(65536).expect("non-zero")),
            graph: learn::Graph::default(),
            pending: Vec::new(),
            retention: None,
            oldest_expired_ns: None,
            stats: DetectStats::default(),
        };
        d.apply_open_bound();
        d.stats.state_entries_dropped = d.state.dropped_on_load;
        d.update_gauges();
        d
    }

    /// Rows of requests older than this are dropped by the store they go to (ClickHouse's
    /// TTL): such requests are counted, and `finish` says how many there were.
    pub fn set_retention(&mut self, retention: Option<Duration>) {
        self.retention = retention.filter(|r| !r.is_zero());
    }

    fn apply_open_bound(&mut self) {
        let cap = self
            .rules
            .settings
            .max_open_alerts
            .unwrap_or(state::DEFAULT_MAX_OPEN_ALERTS);
        let closed = self.state.open.set_capacity(cap);
        self.pending
            .extend(closed.iter().filter_map(state::Open::unreported));
    }

    fn update_gauges(&mut self) {
        self.stats.bindings = self.state.creds.len();
        self.stats.bindings_evicted = self.state.evicted;
        self.stats.open_alerts = self.state.open.len();
        self.stats.open_alerts_evicted = self.state.open.evicted;
    }

    pub fn with_shared(mut self, shared: Arc<dyn SharedBindings>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// New rules (SIGHUP); learnt state is kept.
    pub fn set_rules(&mut self, rules: Arc<Rules>, mode: Option<Mode>) {
        self.mode = mode.unwrap_or(rules.mode);
        self.rules = rules;
        self.apply_open_bound();
        self.update_gauges();
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    fn window(&self) -> u64 {
        self.rules
            .settings
            .dedup_window
            .unwrap_or(DEFAULT_DEDUP_WINDOW)
            .as_nanos() as u64
    }

    /// The credential rule (if any) this credential falls under.
    pub fn credential_rule<'r>(rules: &'r Rules, c: &Credential) -> Option<&'r CredentialRule> {
        use crate::rules::pattern_matches as g;
        rules.credentials.iter().find(|r| {
            let (m, k) = (&r.matcher, &r.compiled);
            let claims = c.claims.as_deref();
            m.fingerprint
                .as_ref()
                .is_none_or(|f| f.eq_ignore_ascii_case(&c.fingerprint))
                && m.kind.as_ref().is_none_or(|k| k == c.kind)
                && g(&m.issuer, &k.issuer, claims.and_then(|c| c.iss.as_deref()))
                && g(
                    &m.subject,
                    &k.subject,
                    claims.and_then(|c| c.sub.as_deref()),
                )
                && match &m.audience {
                    None => true,
                    Some(_) => claims
                        .is_some_and(|cl| cl.aud.iter().any(|a| g(&m.audience, &k.third, Some(a)))),
                }
        })
    }

    /// Checks one request; alerts (new ones, not repeats) are appended to `out`.
    pub fn observe(&mut self, rec: &RequestRecord, out: &mut Vec<Alert>) {
        if let Some(r) = self.retention {
            let now = std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if rec.time.saturating_add(r.as_nanos() as u64) < now {
                self.stats.expired_on_arrival += 1;
                self.oldest_expired_ns =
                    Some(self.oldest_expired_ns.map_or(rec.time, |t| t.min(rec.time)));
            }
        }
        let client = workload::is_client_side(rec);
        if let (Some(s), Some(d)) = (&rec.source, &rec.destination) {
            let key = ((s.ip, s.port).into(), (d.ip, d.port).into());
            if client {
                self.client_flows.put(key, rec.time);
            } else if self.client_flows.get(&key).is_some() {
                // Already checked from the client's side, with the client's real identity.
                self.stats.server_side_duplicates += 1;
                return;
            }
        }
        self.stats.observations += 1;
        let rules = self.rules.clone();
        let obs = Obs {
            rec,
            time_ns: rec.time,
            source: workload::source_workload(&rules, rec),
            destination: workload::destination(&rules, rec),
            node: &self.node.clone(),
        };
        if self.mode == Mode::Learn {
            self.graph.observe(&obs);
            self.stats.unnormalisable_paths = self.graph.unnormalisable_paths;
            self.stats.not_learnt = self.graph.not_learnt;
        }
        let mut findings = Vec::new();
        graph::off_path(&rules, &obs, &mut findings);
        // Name the credential the off-path call carried, if it carried one.
        self.emit(&obs, rec.credentials.first(), findings, out);
        for c in &rec.credentials {
            let mut findings = Vec::new();
            let cr = Self::credential_rule(&rules, c);
            hygiene::check(&rules, cr, &obs, c, &mut findings);
            replay::check(self, cr, &obs, c, &mut findings);
            self.emit(&obs, Some(c), findings, out);
        }
        self.update_gauges();
    }

    fn emit(
        &mut self,
        obs: &Obs,
        cred: Option<&Credential>,
        findings: Vec<Finding>,
        out: &mut Vec<Alert>,
    ) {
        for f in findings {
            let setting = self.rules.setting(f.rule);
            if !setting.enabled.unwrap_or(true) {
                continue;
            }
            // Learn mode builds bindings and the graph; it raises no reuse alerts.
            if self.mode == Mode::Learn
                && matches!(
                    f.rule,
                    "token-replay" | "off-path" | "shared-credential" | "concurrent-use"
                )
            {
                continue;
            }
            let fp = cred.map_or("", |c| c.fingerprint.as_str());
            let key = format!("{}|{fp}|{}|{}", f.rule, obs.source, obs.destination);
            let window = self.window();
            if let Some(open) = self.state.open.get_mut(&key)
                && obs.time_ns.saturating_sub(open.first_ns) < window
            {
                open.count += 1;
                open.last_ns = obs.time_ns;
                self.stats.deduplicated += 1;
                continue;
            }
            let severity = setting.severity.unwrap_or(f.severity);
            let alert = self.build(obs, cred, &f, severity);
            *self.stats.alerts_by_rule.entry(f.rule).or_default() += 1;
            *self
                .stats
                .alerts_by_rule_severity
                .entry((f.rule, severity))
                .or_default() += 1;
            self.stats.alerts += 1;
            match state::Open::new(&alert, obs.time_ns) {
                Ok(open) => {
                    let displaced = self.state.open.insert(key, open);
                    // A window closed early (or replaced) still sends its final count.
                    out.extend(displaced.iter().filter_map(state::Open::unreported));
                }
                // Alerts are plain data: this does not happen; the alert still goes out.
                Err(e) => tracing::warn!(error = %e, "alert not kept for deduplication"),
            }
            out.push(alert);
        }
    }

    fn build(
        &self,
        obs: &Obs,
        cred: Option<&Credential>,
        f: &Finding,
        severity: Severity,
    ) -> Alert {
        let rec = obs.rec;
        let client = workload::is_client_side(rec);
        let fp = cred.map_or("", |c| c.fingerprint.as_str());
        let mut h = Sha256::new();
        h.update(format!(
            "{}|{fp}|{}|{}|{}",
            f.rule, obs.source, obs.destination, obs.time_ns
        ));
        let id = hex::encode(&h.finalize()[..8]);
        let credential = cred.map(|c| {
            let mut claims = BTreeMap::new();
            if let Some(cl) = &c.claims
                && let Ok(Value::Object(m)) = serde_json::to_value(cl)
            {
                claims.extend(m);
            }
            if let Some(u) = &c.user {
                claims.insert("user".into(), json!(u));
            }
            AlertCredential {
                fingerprint: c.fingerprint.clone(),
                kind: c.kind.to_string(),
                claims,
            }
        });
        let owner = self
            .rules
            .owner_of(&obs.source)
            .map(|o| json!({"team": o.team, "contact": o.contact}));
        Alert {
            schema: SCHEMA.into(),
            time: rfc3339(obs.time_ns),
            id,
            rule: f.rule.into(),
            severity,
            summary: f.summary.clone(),
            credential: credential.unwrap_or_default(),
            source: source(obs, client),
            destination: AlertDestination {
                workload: Some(obs.destination.clone()),
                ip: rec.destination.as_ref().map(|e| e.ip),
                port: rec.destination.as_ref().map(|e| e.port),
                host: rec.host.clone(),
                method: Some(rec.method.clone()),
                path: Some(rec.path.split('?').next().unwrap_or_default().to_string()),
            },
            expected: f.expected.clone(),
            first_seen: f.first_seen.as_ref().map(|(ns, _)| rfc3339(*ns)),
            first_seen_by: f.first_seen.as_ref().map(|(_, w)| w.clone()),
            owner,
            references: references(f.rule),
            count: 1,
        }
    }

    /// Closes alerts whose window has passed; those that repeated are re-sent with their
    /// final count (same id), so a flood becomes one alert and one update.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<Alert>) {
        out.append(&mut self.pending);
        let window = self.window();
        let closed = self.state.open.expire(now_ns, window);
        out.extend(closed.iter().filter_map(state::Open::unreported));
        self.update_gauges();
    }

    /// At shutdown: report the final counts of open alerts that repeated, keep them open.
    pub fn flush_counts(&mut self, out: &mut Vec<Alert>) {
        for o in self.state.open.values_mut() {
            if let Some(a) = o.unreported() {
                o.reported = o.count;
                out.push(a);
            }
        }
    }

    /// The rules in force extended with the graph and bindings learnt (learn mode).
    pub fn learnt_rules(&self) -> crate::rules::RulesFile {
        let bindings: Vec<(&str, &str, &str)> = self
            .state
            .creds
            .iter()
            .map(|(fp, st)| {
                (
                    fp.as_str(),
                    &*st.first_workload,
                    st.kind.as_deref().unwrap_or("credential"),
                )
            })
            .collect();
        self.graph.to_rules(&self.rules.source, &bindings)
    }

    /// At exit: says how many requests were expired on arrival, then saves the state and the
    /// learnt rules. Each is attempted whatever happened to the other; every failure is
    /// logged and the first is returned.
    pub fn finish(
        &self,
        state_file: Option<&std::path::Path>,
        learn_out: Option<&std::path::Path>,
    ) -> anyhow::Result<()> {
        if self.stats.expired_on_arrival > 0 {
            tracing::warn!(
                expired_on_arrival = self.stats.expired_on_arrival,
                observations = self.stats.observations + self.stats.server_side_duplicates,
                oldest = %self.oldest_expired_ns.map(rfc3339).unwrap_or_default(),
                ttl_days = self.retention.map_or(0, |r| r.as_secs() / 86_400),
                "requests older than the ClickHouse TTL: ClickHouse acknowledges their rows and then drops them"
            );
        }
        let mut first: Option<anyhow::Error> = None;
        if let Some(p) = state_file
            && let Err(e) = self.state.save(p)
        {
            tracing::error!(error = %format!("{e:#}"), "state not saved");
            first.get_or_insert(e);
        }
        if let Some(p) = learn_out {
            match learn::write_learn_out(p, &self.learnt_rules(), self.mode) {
                Ok(()) => tracing::info!(path = %p.display(), "learnt rules written"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "learnt rules not written");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    pub(crate) fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    pub(crate) fn shared(&self) -> Option<&Arc<dyn SharedBindings>> {
        self.shared.as_ref()
    }
}

/// The alert's source: the presenting process's identity when it was observed (client side),
/// only its address otherwise.
fn source(obs: &Obs, client: bool) -> AlertSource {
    let rec = obs.rec;
    let src = rec.source.as_ref();
    let mut s = AlertSource {
        workload: obs.source.clone(),
        node: obs.node.to_string(),
        ip: src.map(|e| e.ip),
        port: src.map(|e| e.port),
        ..AlertSource::default()
    };
    if !client {
        return s;
    }
    s.pid = rec.pid;
    s.comm = rec.comm.clone();
    s.exe = rec.exe.clone();
    s.cgroup = rec.cgroup.clone();
    s.container_id = rec.container_id.as_deref().map(str::to_string);
    s.runtime = rec.runtime;
    s.unit = rec.unit.as_deref().map(str::to_string);
    s.uid = rec.uid;
    s.pod_uid = rec.pod_uid.as_deref().map(str::to_string);
    if let Some(p) = rec.pod.as_deref() {
        s.pod = Some(format!("{}/{}", p.namespace, p.name));
        s.pod_uid = Some(p.uid.clone());
        s.namespace = Some(p.namespace.clone());
        s.service_account = p.service_account.clone();
        s.labels = p.labels.clone();
        s.owner_kind = p.owner_kind.clone();
        s.owner_name = p.owner_name.clone();
    }
    s
}

#[cfg(test)]
mod tests;
