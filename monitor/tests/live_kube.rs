//! Kubernetes identity end to end (root): curl runs in a cgroup laid out as the kubelet's
//! systemd driver lays out a containerd container; `monitor run --kube-api` resolves it,
//! through a fake API server serving a pod whose status names that container, to the pod's
//! namespace, name, service account and owning Deployment; rules select the workload by
//! namespace and service account, and a call outside its graph raises `off-path` naming the
//! pod.

mod common;
mod common_kube;

use std::path::PathBuf;

use common::*;
use common_kube::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss"];

/// The kubelet's slices for one pod's container, created for the test; every directory the
/// test made is removed afterwards (the container's by `Cgroup`'s drop, the slices here).
struct PodCgroup {
    cg: Option<Cgroup>,
    made: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(pod_uid: &str, container_id: &str) -> PodCgroup {
        let root = cgroup2_root();
        let slices = [
            "kubepods.slice".to_string(),
            "kubepods.slice/kubepods-besteffort.slice".to_string(),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                pod_uid.replace('-', "_")
            ),
        ];
        let made = slices
            .iter()
            .map(|s| root.join(s))
            .filter(|d| !d.exists())
            .collect();
        let cg = Cgroup::new(&format!(
            "{}/cri-containerd-{container_id}.scope",
            slices[2]
        ));
        PodCgroup { cg: Some(cg), made }
    }

    fn cg(&self) -> &Cgroup {
        self.cg.as_ref().unwrap()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        drop(self.cg.take());
        for d in self.made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

#[test]
fn pod_identity_names_records_and_alerts() {
    let _g = serial();
    require_root_and_tools(TOOLS);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let nginx = Nginx::start(&lab, &server_cg);
    let pod_uid = uuid();
    let container_id = random_hex(32);
    let node = format!("node-{t}");
    let pc = PodCgroup::new(&pod_uid, &container_id);
    let pod_name = "checkout-7d9c5b8f6-x2x4q";
    let api = FakeApi::start(pod_list(
        "100",
        &[pod(&PodSpec {
            namespace: "shop",
            name: pod_name,
            uid: &pod_uid,
            node: &node,
            service_account: "checkout",
            owner: Some(("ReplicaSet", "checkout-7d9c5b8f6")),
            labels: json!({"app": "checkout", "pod-template-hash": "7d9c5b8f6"}),
            containers: &[&container_id],
            init_containers: &[],
            rv: "99",
        })],
    ));
    let dir = tempfile::tempdir().unwrap();
    let api_token = format!("kube-api-token-{}", random_hex(16));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &api_token).unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "workloads:
  - name: checkout
    match: { namespace: shop, service_account: checkout }
destinations:
  - name: orders
    hosts: [orders.shop.test]
  - name: admin
    hosts: [admin.shop.test]
edges:
  - { from: checkout, to: orders }
",
    )
    .unwrap();
    let mon = Monitor::start(&[
        "--kube-api",
        &api.url(),
        "--kube-token-file",
        token_file.to_str().unwrap(),
        "--node",
        &node,
        "--rules",
        rules.to_str().unwrap(),
    ]);
    mon.wait_stderr("pod cache synced", 1);

    let secret = format!("tok-{}", random_hex(24));
    for url in [
        "https://orders.shop.test/api/orders",
        "https://admin.shop.test/admin/users",
    ] {
        let argv = curl_args(
            &lab,
            &nginx,
            &[format!("Authorization: Bearer {secret}")],
            &[],
            url,
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut child = pc.cg().spawn(&lab.client_ns, &argv);
        assert!(child.wait().unwrap().success(), "curl {url} failed");
    }
    let out = mon.stop();

    // The monitor asked for this node's pods, with the token.
    let lists = api.lists();
    assert!(!lists.is_empty());
    assert_eq!(
        lists[0].query["fieldSelector"],
        format!("spec.nodeName={node}")
    );
    assert_eq!(
        lists[0].authorization.as_deref(),
        Some(format!("Bearer {api_token}").as_str())
    );

    let want_pod = json!({
        "namespace": "shop", "name": pod_name, "uid": pod_uid, "service_account": "checkout",
        "labels": {"app": "checkout", "pod-template-hash": "7d9c5b8f6"},
        "owner_kind": "Deployment", "owner_name": "checkout", "node": node,
    });
    let recs = out.find(&[("/side", json!("client")), ("/path", json!("/admin/users"))]);
    assert_eq!(recs.len(), 1, "records: {:#?}", out.records);
    let r = recs[0];
    assert_eq!(r["cgroup"], json!(pc.cg().path));
    assert_eq!(r["container_id"], json!(container_id));
    assert_eq!(r["runtime"], json!("containerd"));
    assert_eq!(r["pod_uid"], json!(pod_uid));
    assert_eq!(r["pod"], want_pod);
    assert_eq!(r["uid"], json!(0));
    assert_eq!(r["comm"], json!("curl"));

    // The rules' workload was selected by namespace and service account; admin is off its
    // graph, orders is on it.
    let alerts: Vec<&Value> = out
        .records
        .iter()
        .filter(|v| v["schema"] == "monitor.alert/v1" && v["rule"] == "off-path")
        .collect();
    assert_eq!(alerts.len(), 1, "alerts: {alerts:#?}");
    let a = alerts[0];
    assert_eq!(a["destination"]["workload"], json!("admin"));
    let s = &a["source"];
    assert_eq!(s["workload"], json!("checkout"));
    assert_eq!(s["pod"], json!(format!("shop/{pod_name}")));
    assert_eq!(s["namespace"], json!("shop"));
    assert_eq!(s["service_account"], json!("checkout"));
    assert_eq!(s["owner_kind"], json!("Deployment"));
    assert_eq!(s["owner_name"], json!("checkout"));
    assert_eq!(s["container_id"], json!(container_id));
    assert_eq!(s["pod_uid"], json!(pod_uid));
    assert_eq!(s["node"], json!(node));

    let kube = &out.summary["kube"];
    assert!(kube["cache_hits"].as_u64().unwrap() >= 1, "{kube}");
    assert_eq!(kube["synced"], json!(true));
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&secret);
    out.assert_no_secret(&api_token);
    drop(pc);
}
