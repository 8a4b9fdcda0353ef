//! The pod cache against a fake API server speaking the API server's wire format: list, then
//! watch with bookmarks, modifications and deletions; a 410 (as a watch `ERROR` or as the
//! HTTP status) relists; an API error keeps the cached pods; the node's field selector and the
//! (rotating) bearer token are sent. No root needed.

mod common_kube;
mod common_log;

use std::{sync::Arc, time::Duration};

use common_kube::*;
use monitor::identity::{
    container::Runtime,
    kube::{self, KubeConfig, PodCache},
};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const C_A1: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
const C_A2: &str = "2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a";
const C_INIT: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b";
const C_B: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
const C_C: &str = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
const C_D: &str = "6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e";
const UID_A: &str = "7c1d9a8e-2f3b-4c5d-8e9f-0a1b2c3d4e5f";
const UID_B: &str = "8d2e0b9f-3a4c-4d6e-9f0a-1b2c3d4e5f60";
const UID_C: &str = "9e3f1c0a-4b5d-4e7f-8a1b-2c3d4e5f6071";
const UID_D: &str = "af402d1b-5c6e-4f80-9b2c-3d4e5f607182";

fn checkout(containers: &[&str], rv: &str) -> Value {
    pod(&PodSpec {
        namespace: "shop",
        name: "checkout-7d9c5b8f6-x2x4q",
        uid: UID_A,
        node: NODE,
        service_account: "checkout",
        owner: Some(("ReplicaSet", "checkout-7d9c5b8f6")),
        labels: json!({"app": "checkout", "pod-template-hash": "7d9c5b8f6", "tier": "web"}),
        containers,
        init_containers: &[C_INIT],
        rv,
    })
}

fn fluentbit(rv: &str) -> Value {
    pod(&PodSpec {
        namespace: "logging",
        name: "fluent-bit-9xk2p",
        uid: UID_B,
        node: NODE,
        service_account: "fluent-bit",
        owner: Some(("DaemonSet", "fluent-bit")),
        labels: json!({"app.kubernetes.io/name": "fluent-bit"}),
        containers: &[C_B],
        init_containers: &[],
        rv,
    })
}

fn postgres(rv: &str) -> Value {
    pod(&PodSpec {
        namespace: "db",
        name: "postgres-0",
        uid: UID_C,
        node: NODE,
        service_account: "default",
        owner: Some(("StatefulSet", "postgres")),
        labels: json!({"app": "postgres"}),
        containers: &[C_C],
        init_containers: &[],
        rv,
    })
}

fn debug_pod(rv: &str) -> Value {
    pod(&PodSpec {
        namespace: "ops",
        name: "debug-shell",
        uid: UID_D,
        node: NODE,
        service_account: "ops",
        owner: None,
        labels: json!({}),
        containers: &[C_D],
        init_containers: &[],
        rv,
    })
}

struct Client {
    cache: Arc<PodCache>,
    token: tempfile::NamedTempFile,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cache.stop();
    }
}

fn start(api: &FakeApi, token: &str) -> Client {
    let tf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tf.path(), format!("{token}\n")).unwrap();
    let mut cfg = KubeConfig::new(&api.url(), NODE);
    cfg.token_file = Some(tf.path().to_path_buf());
    cfg.backoff_max = Duration::from_millis(300);
    let cache = PodCache::new();
    kube::spawn(cfg, cache.clone()).unwrap();
    Client { cache, token: tf }
}

fn owner_of(c: &PodCache, container: &str) -> Option<String> {
    let uid = c.pod_of_container(container)?;
    c.pod(&uid)?.pod.owner()
}

#[test]
fn list_watch_bookmark_delete_and_410_relist() {
    let api = FakeApi::start(pod_list("10", &[checkout(&[C_A1], "8"), fluentbit("9")]));
    let tok1 = format!("sa-token-{}", std::process::id());
    let c = start(&api, &tok1);

    // After the list: both pods, indexed by every container (init included) and by uid.
    wait_for("the first list", || (c.cache.len() == 2).then_some(()));
    let a = c.cache.pod(UID_A).unwrap();
    assert_eq!(a.pod.namespace, "shop");
    assert_eq!(a.pod.name, "checkout-7d9c5b8f6-x2x4q");
    assert_eq!(a.pod.service_account.as_deref(), Some("checkout"));
    assert_eq!(a.pod.owner().as_deref(), Some("Deployment/checkout"));
    assert_eq!(a.pod.node.as_deref(), Some(NODE));
    assert_eq!(a.pod.labels["tier"], "web");
    assert_eq!(c.cache.pod_of_container(C_A1).as_deref(), Some(UID_A));
    assert_eq!(c.cache.pod_of_container(C_INIT).as_deref(), Some(UID_A));
    assert_eq!(
        owner_of(&c.cache, C_B).as_deref(),
        Some("DaemonSet/fluent-bit")
    );
    let (p, rt) = c.cache.lookup(Some(C_A1), None).unwrap();
    assert_eq!((p.uid.as_str(), rt), (UID_A, Some(Runtime::Containerd)));

    // The list named the node and carried the token.
    let l = &api.lists()[0];
    assert_eq!(l.path, "/api/v1/pods");
    assert_eq!(l.query["fieldSelector"], format!("spec.nodeName={NODE}"));
    assert_eq!(
        l.authorization.as_deref(),
        Some(format!("Bearer {tok1}").as_str())
    );

    // The watch starts from the list's version, with bookmarks.
    let w = api.wait_watch(1);
    assert_eq!(w.query["resourceVersion"], "10");
    assert_eq!(w.query["allowWatchBookmarks"], "true");
    assert_eq!(w.query["fieldSelector"], format!("spec.nodeName={NODE}"));
    assert_eq!(
        w.authorization.as_deref(),
        Some(format!("Bearer {tok1}").as_str())
    );

    // Watch events: a restarted container, a new pod, a deleted pod, bookmarks.
    api.push(bookmark("12"));
    api.push(event("MODIFIED", checkout(&[C_A2], "13")));
    api.push(event("ADDED", postgres("14")));
    api.push(event("DELETED", fluentbit("15")));
    api.push(bookmark("16"));
    wait_for("the watch events", || {
        (c.cache.pod(UID_B).is_none() && c.cache.pod(UID_C).is_some()).then_some(())
    });
    assert_eq!(c.cache.pod_of_container(C_A2).as_deref(), Some(UID_A));
    assert_eq!(
        c.cache.pod_of_container(C_A1),
        None,
        "old container forgotten"
    );
    assert_eq!(
        c.cache.pod_of_container(C_B),
        None,
        "deleted pod's containers gone"
    );
    assert_eq!(
        owner_of(&c.cache, C_C).as_deref(),
        Some("StatefulSet/postgres")
    );
    assert_eq!(c.cache.len(), 2);

    // The token rotates; the stream ends (server timeout): the next watch resumes from the
    // last bookmark with the new token.
    let tok2 = format!("sa-token-rotated-{}", std::process::id());
    std::fs::write(c.token.path(), &tok2).unwrap();
    api.push(Line::Close);
    let w = api.wait_watch(2);
    assert_eq!(w.query["resourceVersion"], "16");
    assert_eq!(
        w.authorization.as_deref(),
        Some(format!("Bearer {tok2}").as_str())
    );
    assert_eq!(
        api.lists().len(),
        1,
        "a closed stream is re-watched, not relisted"
    );

    // ERROR 410 in the stream: relist (postgres went while we were not watching; debug came).
    api.set_list(pod_list("20", &[checkout(&[C_A2], "13"), debug_pod("19")]));
    api.push(error_410());
    wait_for("the relist after ERROR 410", || {
        (c.cache.pod(UID_D).is_some()).then_some(())
    });
    assert!(c.cache.pod(UID_C).is_none(), "a relist replaces the cache");
    assert_eq!(
        c.cache.pod(UID_D).unwrap().pod.workload(),
        "k8s:ops/pod/debug-shell"
    );
    assert_eq!(api.lists().len(), 2);
    let w = api.wait_watch(3);
    assert_eq!(w.query["resourceVersion"], "20");

    // HTTP 410 on the watch request itself: relist too.
    api.plan(Plan::Gone);
    api.plan(Plan::Stream);
    api.push(Line::Close);
    api.wait_watch(5);
    assert_eq!(api.lists().len(), 3, "HTTP 410 relists");
    let s = c.cache.stats();
    assert_eq!((s.lists, s.relists), (3, 2), "{s:?}");
    assert!(s.synced);
    assert!(s.watch_events >= 5, "{s:?}");
    assert!(s.watch_restarts >= 1, "{s:?}");
    assert_eq!(s.api_errors, 0, "{s:?}");
}

#[test]
fn api_errors_keep_the_cache_and_are_retried() {
    let api = FakeApi::start(pod_list("10", &[checkout(&[C_A1], "8")]));
    let c = start(&api, "tok");
    wait_for("the first list", || (c.cache.len() == 1).then_some(()));
    api.wait_watch(1);
    // The next two watches fail with 500; the third streams again.
    api.plan(Plan::Error);
    api.plan(Plan::Error);
    api.push(Line::Close);
    let w = api.wait_watch(4);
    assert_eq!(w.query["resourceVersion"], "10", "errors keep the version");
    let s = c.cache.stats();
    assert_eq!(s.api_errors, 2, "{s:?}");
    assert_eq!(s.lists, 1, "a failed watch is retried, not relisted: {s:?}");
    // Still serving what it had.
    assert!(c.cache.lookup(Some(C_A1), None).is_some());
    // A container the cache does not know (yet) is a miss, and asked again later: once the
    // pod's status names it, the next lookup finds it.
    assert!(c.cache.lookup(Some(C_A2), None).is_none());
    api.push(event("MODIFIED", checkout(&[C_A1, C_A2], "11")));
    wait_for("the new container", || c.cache.lookup(Some(C_A2), None));
    let s = c.cache.stats();
    assert!(s.cache_misses >= 1 && s.cache_hits >= 2, "{s:?}");
}

#[test]
fn unreachable_api_is_counted_and_retried() {
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = KubeConfig::new(&format!("http://127.0.0.1:{port}"), NODE);
    cfg.backoff_max = Duration::from_millis(100);
    let cache = PodCache::new();
    kube::spawn(cfg, cache.clone()).unwrap();
    wait_for("two failed lists", || {
        (cache.stats().api_errors >= 2).then_some(())
    });
    let s = cache.stats();
    assert!(!s.synced && s.pods == 0 && s.lists == 0, "{s:?}");
    cache.stop();
}

/// Replay needs no API: the pod travels in the event log. Two replicas of one Deployment
/// are one workload (sharing a token is no replay); another namespace's pod presenting it is.
#[test]
fn replay_uses_the_pod_in_the_log() {
    use monitor::identity::kube::Pod;
    let dir = tempfile::tempdir().unwrap();
    let pod_of = |ns: &str, name: &str, owner: &str| {
        Arc::new(Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: Some(owner.into()),
            owner_kind: Some("Deployment".into()),
            owner_name: Some(owner.into()),
            ..Pod::default()
        })
    };
    let mut evs = Vec::new();
    for (i, (ns, name, owner)) in [
        ("shop", "checkout-7d9c5b8f6-aaaaa", "checkout"),
        ("shop", "checkout-7d9c5b8f6-bbbbb", "checkout"),
        ("attack", "miner-5f5d8c9b7-ccccc", "miner"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = common_log::request(
            i as u64,
            &format!("/kubepods/pod-{i}/c"),
            "tok-k8s-shared",
            "/api/a",
        );
        e.container_id = Some(Arc::from(C_A1));
        e.runtime = Some(Runtime::Containerd);
        e.pod = Some(pod_of(ns, name, owner));
        evs.push(e);
    }
    let log = common_log::write_log(dir.path(), "k.jsonl", &evs);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monitor"))
        .args(["replay", "--events", &log, "--key-file"])
        .arg(dir.path().join("key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let recs: Vec<&Value> = lines.iter().filter(|v| v.get("schema").is_none()).collect();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1]["pod"]["name"], "checkout-7d9c5b8f6-bbbbb");
    assert_eq!(recs[1]["runtime"], "containerd");
    let replays: Vec<&Value> = lines
        .iter()
        .filter(|v| v["rule"] == "token-replay")
        .collect();
    assert_eq!(replays.len(), 1, "{lines:#?}");
    let a = replays[0];
    assert_eq!(a["first_seen_by"], "k8s:shop/Deployment/checkout");
    assert_eq!(a["source"]["workload"], "k8s:attack/Deployment/miner");
    assert_eq!(a["source"]["namespace"], "attack");
    assert_eq!(a["source"]["pod"], "attack/miner-5f5d8c9b7-ccccc");
    assert_eq!(a["source"]["service_account"], "miner");
    assert_eq!(a["source"]["runtime"], "containerd");
}
