//! Pods of this node, from the Kubernetes API: list, then watch (`fieldSelector=
//! spec.nodeName=<node>`), kept in a cache indexed by container id and pod uid that the
//! capture loop reads without waiting on the network. A background thread (blocking ureq)
//! keeps it current; when the API is away the cached pods keep serving.
//!
//! Protocol: `GET /api/v1/pods?fieldSelector=...` gives the pods and `metadata.resourceVersion`;
//! `GET ...&watch=1&resourceVersion=<rv>&allowWatchBookmarks=true` streams one JSON object per
//! line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`). A `410 Gone` (as an HTTP status
//! or an `ERROR` whose status code is 410) means the resource version is too old: list again.
//! A dropped stream is watched again from the last version seen, with backoff on errors.

use std::{
    collections::{BTreeMap, HashMap},
    io::BufRead,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, info, warn};

use super::container::Runtime;

/// In-cluster service account files.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Who a pod is, as records, alerts and rules see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The controller's kind (`Deployment`, `DaemonSet`, `StatefulSet`, `Job`, `CronJob`,
    /// or the owner's own kind); absent for bare pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Pod {
    /// `Kind/name` of the owning workload (`Deployment/checkout`).
    pub fn owner(&self) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.owner_kind.as_deref()?,
            self.owner_name.as_deref()?
        ))
    }

    /// The fallback workload name: every replica of a Deployment is one workload.
    pub fn workload(&self) -> String {
        match self.owner() {
            Some(o) => format!("k8s:{}/{o}", self.namespace),
            None => format!("k8s:{}/pod/{}", self.namespace, self.name),
        }
    }
}

// --- the API's objects, as much of them as is read -------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: String,
    uid: String,
    resource_version: String,
    #[serde(rename = "continue")]
    continue_: Option<String>,
    labels: BTreeMap<String, String>,
    owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct OwnerReference {
    kind: String,
    name: String,
    controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct PodStatus {
    container_statuses: Vec<ContainerStatus>,
    init_container_statuses: Vec<ContainerStatus>,
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodObject {
    metadata: ObjectMeta,
    spec: PodSpec,
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodList {
    metadata: ObjectMeta,
    items: Vec<PodObject>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: Value,
}

/// A pod with the containers it runs: (id, runtime from the `containerID` scheme).
#[derive(Debug, Clone)]
pub struct PodEntry {
    pub pod: Arc<Pod>,
    pub containers: Vec<(String, Option<Runtime>)>,
}

/// CronJob-made Jobs are named `<cronjob>-<scheduled time in minutes>`.
fn cronjob_of(job: &str) -> Option<&str> {
    let (base, suffix) = job.rsplit_once('-')?;
    (!base.is_empty()
        && (8..=10).contains(&suffix.len())
        && suffix.bytes().all(|b| b.is_ascii_digit()))
    .then_some(base)
}

impl PodObject {
    fn entry(self) -> Option<PodEntry> {
        let m = self.metadata;
        if m.uid.is_empty() || m.name.is_empty() {
            return None;
        }
        let owner = m
            .owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .or(m.owner_references.first());
        let (owner_kind, owner_name) = match owner {
            // Static (mirror) pods are "owned" by their Node: bare pods really.
            None => (None, None),
            Some(o) if o.kind == "Node" => (None, None),
            Some(o) if o.kind == "ReplicaSet" => {
                // The Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
                match m
                    .labels
                    .get("pod-template-hash")
                    .and_then(|h| o.name.strip_suffix(h.as_str()))
                    .and_then(|d| d.strip_suffix('-'))
                {
                    Some(d) if !d.is_empty() => (Some("Deployment".into()), Some(d.to_string())),
                    _ => (Some(o.kind.clone()), Some(o.name.clone())),
                }
            }
            Some(o) if o.kind == "Job" => match cronjob_of(&o.name) {
                Some(c) => (Some("CronJob".into()), Some(c.to_string())),
                None => (Some(o.kind.clone()), Some(o.name.clone())),
            },
            Some(o) => (Some(o.kind.clone()), Some(o.name.clone())),
        };
        let s = self.status;
        let containers = s
            .container_statuses
            .iter()
            .chain(&s.init_container_statuses)
            .chain(&s.ephemeral_container_statuses)
            .filter_map(|c| c.container_id.as_deref())
            .filter_map(|c| {
                let (scheme, id) = c.split_once("://")?;
                (!id.is_empty()).then(|| (id.to_ascii_lowercase(), Runtime::from_scheme(scheme)))
            })
            .collect();
        Some(PodEntry {
            pod: Arc::new(Pod {
                namespace: m.namespace,
                name: m.name,
                uid: m.uid,
                service_account: self.spec.service_account_name,
                labels: m.labels,
                owner_kind,
                owner_name,
                node: self.spec.node_name,
            }),
            containers,
        })
    }
}

/// A pod object (JSON, as the API serves it) as the cache keeps it.
pub fn parse_pod(v: &Value) -> Option<PodEntry> {
    PodObject::deserialize(v).ok()?.entry()
}

// --- the cache ---------------------------------------------------------------------------

#[derive(Default)]
struct Maps {
    pods: HashMap<String, PodEntry>,
    by_container: HashMap<String, String>,
}

impl Maps {
    fn insert(&mut self, e: PodEntry) {
        self.remove(&e.pod.uid.clone());
        for (id, _) in &e.containers {
            self.by_container.insert(id.clone(), e.pod.uid.clone());
        }
        self.pods.insert(e.pod.uid.clone(), e);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for (id, _) in old.containers {
                self.by_container.remove(&id);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    lists: AtomicU64,
    relists: AtomicU64,
    watch_events: AtomicU64,
    watch_restarts: AtomicU64,
    api_errors: AtomicU64,
}

/// The cache's counters, for the exit summary and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeStats {
    /// Lookups answered (by container id, or by the pod uid of the cgroup).
    pub cache_hits: u64,
    /// Lookups not answered (asked again on a later event).
    pub cache_misses: u64,
    pub lists: u64,
    /// Lists after the first: a watch that expired (410), or the API back after an error.
    pub relists: u64,
    pub watch_events: u64,
    pub watch_restarts: u64,
    pub api_errors: u64,
    pub pods: usize,
    /// A list has succeeded at least once.
    pub synced: bool,
}

/// This node's pods, shared by the watcher thread (writer) and the capture loop (reader).
#[derive(Default)]
pub struct PodCache {
    maps: RwLock<Maps>,
    c: Counters,
    synced: AtomicBool,
    stop: AtomicBool,
}

impl PodCache {
    pub fn new() -> Arc<PodCache> {
        Arc::new(PodCache::default())
    }

    /// The pod of a container, else of the pod uid its cgroup names (a container not yet in
    /// the pod's status: just started). A miss is not remembered: the next event asks again.
    pub fn lookup(
        &self,
        container_id: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Option<(Arc<Pod>, Option<Runtime>)> {
        let m = self.maps.read().unwrap_or_else(|p| p.into_inner());
        let found = container_id
            .and_then(|c| {
                let e = m.pods.get(m.by_container.get(c)?)?;
                let rt = e
                    .containers
                    .iter()
                    .find(|(id, _)| id == c)
                    .and_then(|x| x.1);
                Some((e.pod.clone(), rt))
            })
            .or_else(|| {
                pod_uid
                    .and_then(|u| m.pods.get(u))
                    .map(|e| (e.pod.clone(), None))
            });
        let counter = if found.is_some() {
            &self.c.hits
        } else {
            &self.c.misses
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    /// A pod by uid, without counting (tests, diagnostics).
    pub fn pod(&self, uid: &str) -> Option<PodEntry> {
        let m = self.maps.read().unwrap_or_else(|p| p.into_inner());
        m.pods.get(uid).cloned()
    }

    /// The uid of the pod running a container, without counting.
    pub fn pod_of_container(&self, id: &str) -> Option<String> {
        let m = self.maps.read().unwrap_or_else(|p| p.into_inner());
        m.by_container.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.maps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn upsert(&self, e: PodEntry) {
        self.maps
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(e);
    }

    pub fn remove(&self, uid: &str) {
        self.maps
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// A fresh list replaces everything: pods deleted while nobody watched go.
    pub fn replace_all(&self, entries: Vec<PodEntry>) {
        let mut fresh = Maps::default();
        for e in entries {
            fresh.insert(e);
        }
        *self.maps.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    pub fn stats(&self) -> KubeStats {
        let c = &self.c;
        KubeStats {
            cache_hits: c.hits.load(Relaxed),
            cache_misses: c.misses.load(Relaxed),
            lists: c.lists.load(Relaxed),
            relists: c.relists.load(Relaxed),
            watch_events: c.watch_events.load(Relaxed),
            watch_restarts: c.watch_restarts.load(Relaxed),
            api_errors: c.api_errors.load(Relaxed),
            pods: self.len(),
            synced: self.synced.load(Relaxed),
        }
    }

    /// Asks the watcher thread to end (it notices between requests and stream lines).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

// --- the API client ----------------------------------------------------------------------

/// Where the API is and how to authenticate.
#[derive(Clone)]
pub struct KubeConfig {
    /// `https://10.96.0.1:443`, or `http://127.0.0.1:8001` (kubectl proxy, tests).
    pub api: String,
    /// Bearer token, re-read before every request: projected tokens rotate.
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) for an https API.
    pub ca_file: Option<PathBuf>,
    /// Pods of this node only.
    pub node: String,
    /// Longest wait between retries.
    pub backoff_max: Duration,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("api", &self.api_for_logs())
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("node", &self.node)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

impl KubeConfig {
    /// The API's address fit for logs (`--kube-api` may carry a user and password).
    pub fn api_for_logs(&self) -> String {
        crate::https::url_for_logs(&self.api)
    }

    pub fn new(api: &str, node: &str) -> KubeConfig {
        KubeConfig {
            api: api.trim_end_matches('/').to_string(),
            token_file: None,
            ca_file: None,
            node: node.to_string(),
            backoff_max: Duration::from_secs(30),
        }
    }

    /// In a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's token and CA.
    pub fn in_cluster(node: &str) -> Option<KubeConfig> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let mut c = KubeConfig::new(&format!("https://{host}:{port}"), node);
        c.token_file = Some(PathBuf::from(SA_DIR).join("token"));
        let ca = PathBuf::from(SA_DIR).join("ca.crt");
        c.ca_file = ca.exists().then_some(ca);
        Some(c)
    }

    fn pods_url(&self) -> String {
        format!(
            "{}/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
            self.api,
            encode(&self.node)
        )
    }
}

/// Percent-encoding for a query value (node names are DNS labels: rarely needed).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a watch ended.
enum WatchEnd {
    /// The server closed the stream (its timeout): watch again from the last version.
    Closed,
    /// 410: the version is gone; list again.
    Expired,
}

struct Client {
    agent: ureq::Agent,
    cfg: KubeConfig,
    cache: Arc<PodCache>,
}

/// Largest list accepted (a node's pods are a few MB at most).
const MAX_LIST: u64 = 256 << 20;
/// Pods per list page.
const PAGE: u32 = 500;
/// The server ends a watch after this; bookmarks come about once a minute before that.
const WATCH_SECS: u32 = 290;

impl Client {
    fn new(cfg: KubeConfig, cache: Arc<PodCache>) -> Result<Client> {
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            // Between watch lines; bookmarks keep a quiet stream alive.
            .timeout_per_read(Some(Duration::from_secs(WATCH_SECS as u64 + 30)))
            .user_agent(format!("monitor/{}", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            b = b.tls_config(crate::https::trust_only(ca)?);
        }
        Ok(Client {
            agent: b.build().into(),
            cfg,
            cache,
        })
    }

    fn get(&self, url: &str) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url).header("Accept", "application/json");
        if let Some(f) = &self.cfg.token_file {
            // Read each time: the kubelet rotates projected tokens.
            let tok = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            req = req.header("Authorization", format!("Bearer {}", tok.trim()));
        }
        req.call()
            .map_err(|e| anyhow::anyhow!(crate::https::describe(&e)))
    }

    /// Lists the node's pods (paged) into the cache; returns the list's resource version.
    fn list(&self) -> Result<String> {
        let mut entries = Vec::new();
        let mut cont: Option<String> = None;
        let rv = loop {
            let mut url = format!("{}&limit={PAGE}", self.cfg.pods_url());
            if let Some(c) = &cont {
                url.push_str(&format!("&continue={}", encode(c)));
            }
            let mut resp = self.get(&url)?;
            let status = resp.status().as_u16();
            if status == 410 && cont.is_some() {
                // The continue token expired mid-list: start over.
                entries.clear();
                cont = None;
                continue;
            }
            if status != 200 {
                bail!("listing pods: HTTP {status}");
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(MAX_LIST)
                .read_to_vec()
                .map_err(|e| anyhow::anyhow!(crate::https::describe(&e)))?;
            let list: PodList = serde_json::from_slice(&body).context("decoding the pod list")?;
            entries.extend(list.items.into_iter().filter_map(PodObject::entry));
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => cont = Some(c),
                None => break list.metadata.resource_version,
            }
        };
        let n = entries.len();
        self.cache.replace_all(entries);
        let c = &self.cache.c;
        if c.lists.fetch_add(1, Relaxed) > 0 {
            c.relists.fetch_add(1, Relaxed);
        }
        if !self.cache.synced.swap(true, Relaxed) {
            info!(pods = n, node = %self.cfg.node, "pod cache synced from the Kubernetes API");
        } else {
            debug!(pods = n, "pods listed again");
        }
        Ok(rv)
    }

    /// Watches from `rv`, applying events and advancing `rv`, until the stream ends.
    fn watch(&self, rv: &mut String) -> Result<WatchEnd> {
        let url = format!(
            "{}&watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECS}",
            self.cfg.pods_url(),
            encode(rv)
        );
        let resp = self.get(&url)?;
        match resp.status().as_u16() {
            200 => {}
            410 => return Ok(WatchEnd::Expired),
            s => bail!("watching pods: HTTP {s}"),
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            if self.cache.stopped() {
                return Ok(WatchEnd::Closed);
            }
            let line = line.map_err(|e| anyhow::anyhow!("reading the watch: {}", e.kind()))?;
            if line.trim().is_empty() {
                continue;
            }
            let ev: WatchEvent = serde_json::from_str(&line).context("decoding a watch event")?;
            let c = &self.cache.c;
            if ev.kind == "ERROR" {
                let code = ev.object.get("code").and_then(Value::as_u64);
                if code == Some(410) {
                    return Ok(WatchEnd::Expired);
                }
                let reason = ev
                    .object
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                bail!("watch error {}: {reason}", code.unwrap_or(0));
            }
            c.watch_events.fetch_add(1, Relaxed);
            if let Some(v) = ev
                .object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                *rv = v.to_string();
            }
            match ev.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    if let Some(e) = parse_pod(&ev.object) {
                        self.cache.upsert(e);
                    }
                }
                "DELETED" => {
                    if let Some(uid) = ev.object.pointer("/metadata/uid").and_then(Value::as_str) {
                        self.cache.remove(uid);
                    }
                }
                // Only the resource version, taken above.
                "BOOKMARK" => {}
                other => debug!(kind = other, "unknown watch event ignored"),
            }
        }
        Ok(WatchEnd::Closed)
    }

    fn run(self) {
        const MIN_BACKOFF: Duration = Duration::from_millis(200);
        let mut backoff = MIN_BACKOFF;
        let mut rv: Option<String> = None;
        let mut warned: Option<Instant> = None;
        let mut failing = false;
        let c = &self.cache.c;
        while !self.cache.stopped() {
            let started = Instant::now();
            let r = match rv.as_mut() {
                None => self.list().map(|v| {
                    rv = Some(v);
                }),
                Some(v) => match self.watch(v) {
                    Ok(WatchEnd::Closed) => {
                        c.watch_restarts.fetch_add(1, Relaxed);
                        // A server that closes at once must not make us spin.
                        if started.elapsed() < Duration::from_secs(1) {
                            std::thread::sleep(MIN_BACKOFF);
                        }
                        Ok(())
                    }
                    Ok(WatchEnd::Expired) => {
                        debug!("watch expired (410): listing again");
                        rv = None;
                        Ok(())
                    }
                    Err(e) => {
                        c.watch_restarts.fetch_add(1, Relaxed);
                        Err(e)
                    }
                },
            };
            match r {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    if failing {
                        failing = false;
                        info!("Kubernetes API reachable again");
                    }
                }
                Err(e) => {
                    c.api_errors.fetch_add(1, Relaxed);
                    failing = true;
                    // Once a minute at most: an unreachable API must not flood the log.
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        warned = Some(Instant::now());
                        warn!(api = %self.cfg.api_for_logs(), error = %format!("{e:#}"), pods_cached = self.cache.len(),
                            "Kubernetes API unreachable: serving cached pods, retrying");
                    } else {
                        debug!(error = %format!("{e:#}"), "Kubernetes API still unreachable");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.cfg.backoff_max.max(MIN_BACKOFF));
                }
            }
        }
    }
}

/// Starts the watcher thread feeding `cache`.
pub fn spawn(cfg: KubeConfig, cache: Arc<PodCache>) -> Result<std::thread::JoinHandle<()>> {
    let client = Client::new(cfg, cache)?;
    std::thread::Builder::new()
        .name("kube-pods".into())
        .spawn(move || client.run())
        .context("starting the pod watcher")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(owner: Value, labels: Value) -> Value {
        json!({
            "metadata": {"name": "checkout-7d9c5b8f6-x2x4q", "namespace": "shop", "uid": "u-1",
                "resourceVersion": "42", "labels": labels, "ownerReferences": owner},
            "spec": {"nodeName": "node-1", "serviceAccountName": "checkout"},
            "status": {"containerStatuses": [{"name": "app", "containerID": "containerd://ABCDEF"}],
                "initContainerStatuses": [{"name": "init", "containerID": "cri-o://init1"}],
                "ephemeralContainerStatuses": [{"name": "dbg"}]}
        })
    }

    #[test]
    fn owners() {
        let rs = json!([{"kind": "ReplicaSet", "name": "checkout-7d9c5b8f6", "controller": true}]);
        let e = parse_pod(&pod(rs.clone(), json!({"pod-template-hash": "7d9c5b8f6"}))).unwrap();
        assert_eq!(e.pod.owner().as_deref(), Some("Deployment/checkout"));
        assert_eq!(e.pod.workload(), "k8s:shop/Deployment/checkout");
        assert_eq!(e.pod.service_account.as_deref(), Some("checkout"));
        assert_eq!(e.pod.node.as_deref(), Some("node-1"));
        assert_eq!(
            e.containers,
            vec![
                ("abcdef".to_string(), Some(Runtime::Containerd)),
                ("init1".to_string(), Some(Runtime::CriO))
            ]
        );
        // A ReplicaSet of its own (no template hash) stays one.
        let e = parse_pod(&pod(rs, json!({}))).unwrap();
        assert_eq!(
            e.pod.owner().as_deref(),
            Some("ReplicaSet/checkout-7d9c5b8f6")
        );
        for (kind, name, want) in [
            ("DaemonSet", "fluentbit", "DaemonSet/fluentbit"),
            ("StatefulSet", "db", "StatefulSet/db"),
            ("Job", "migrate", "Job/migrate"),
            ("Job", "backup-29012345", "CronJob/backup"),
        ] {
            let o = json!([{"kind": kind, "name": name, "controller": true}]);
            assert_eq!(
                parse_pod(&pod(o, json!({})))
                    .unwrap()
                    .pod
                    .owner()
                    .as_deref(),
                Some(want)
            );
        }
        // Bare and static (Node-owned) pods.
        let e = parse_pod(&pod(json!([]), json!({}))).unwrap();
        assert_eq!(e.pod.workload(), "k8s:shop/pod/checkout-7d9c5b8f6-x2x4q");
        let node = json!([{"kind": "Node", "name": "node-1", "controller": true}]);
        assert_eq!(parse_pod(&pod(node, json!({}))).unwrap().pod.owner(), None);
        assert!(parse_pod(&json!({"metadata": {}})).is_none());
    }

    #[test]
    fn cache_indexes_and_forgets() {
        let c = PodCache::new();
        let e = parse_pod(&pod(json!([]), json!({}))).unwrap();
        c.upsert(e);
        assert_eq!(
            c.lookup(Some("abcdef"), None).unwrap().1,
            Some(Runtime::Containerd)
        );
        assert!(c.lookup(Some("zzz"), Some("u-1")).is_some(), "by pod uid");
        assert!(c.lookup(Some("zzz"), None).is_none());
        c.remove("u-1");
        assert!(c.lookup(Some("abcdef"), None).is_none());
        let s = c.stats();
        assert_eq!((s.cache_hits, s.cache_misses, s.pods), (2, 2, 0));
    }

    #[test]
    fn urls() {
        let c = KubeConfig::new("http://127.0.0.1:8001/", "node-1");
        assert_eq!(
            c.pods_url(),
            "http://127.0.0.1:8001/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1"
        );
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    /// `--kube-api` may carry a password: neither its log form nor `Debug` shows it.
    #[test]
    fn api_url_credentials_never_shown() {
        let c = KubeConfig::new("https://monitor:s3cret@10.96.0.1:443/?token=s3cret", "n");
        assert_eq!(c.api_for_logs(), "https://10.96.0.1:443");
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    }
}
