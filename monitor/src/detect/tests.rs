//! Each rule id fires in its scenario and stays silent in a benign twin.

use std::sync::Arc;

use super::*;
use crate::{
    credential::{
        Credential,
        jwt::{Claims, KubernetesClaims},
    },
    pipeline::{Endpoint, RequestRecord},
    rules::{Rules, check},
};

const NOW: u64 = 1_800_000_000 * 1_000_000_000;

fn rules(yaml: &str) -> Arc<Rules> {
    let f = std::path::PathBuf::from("t.yaml");
    let parsed = check::parse(&f, yaml).unwrap();
    Arc::new(check::compile(vec![(f, yaml.to_string(), parsed)]).unwrap())
}

const RULES: &str = "
workloads:
  - { name: payments, match: { cgroup: /payments }, owner: { team: pay-team, contact: '#pay' }, identity: { namespace: shop, service_account: payments } }
  - { name: orders, match: { cgroup: /orders } }
  - { name: intruder, match: { cgroup: /intruder } }
destinations:
  - { name: orders-api, ips: [10.9.0.1], ports: [443] }
  - { name: reports-api, ips: [10.9.0.2], ports: [443] }
edges:
  - { from: payments, to: orders-api, methods: [GET, POST], paths: [/api/] }
credentials:
  - { name: canary, match: { fingerprint: 00000000000000000000000000000bad }, honeytoken: true }
  - { name: pay-static, match: { fingerprint: 0000000000000000000000000000000b }, bound_to: payments }
human_identities:
  - { issuer: 'https://idp.example.com/*' }
";

fn cred(fp: &str, claims: Option<Claims>) -> Credential {
    Credential {
        header: "authorization".into(),
        kind: if claims.is_some() {
            "bearer-jwt"
        } else {
            "bearer"
        },
        fingerprint: fp.into(),
        user: None,
        name: None,
        claims: claims.map(Box::new),
    }
}

fn req(cgroup: &str, dst: &str, tls: bool, t_secs: u64, creds: Vec<Credential>) -> RequestRecord {
    RequestRecord {
        time: NOW + t_secs * 1_000_000_000,
        pid: 42,
        tid: 42,
        comm: "curl".into(),
        exe: Some("/usr/bin/curl".into()),
        cgroup_id: 7,
        cgroup: Some(cgroup.into()),
        container_id: None,
        runtime: None,
        pod_uid: None,
        pod: None,
        unit: None,
        uid: None,
        gid: None,
        netns: 1,
        side: "client",
        source: Some(Endpoint {
            ip: "10.1.0.5".parse().unwrap(),
            port: 40000 + t_secs as u16,
        }),
        destination: Some(Endpoint {
            ip: dst.parse().unwrap(),
            port: 443,
        }),
        fd: 5,
        tls,
        library: None,
        protocol: "http/1.1",
        method: "GET".into(),
        host: None,
        path: "/api/x".into(),
        database: None,
        credentials: creds,
        ts_ns: 0,
    }
}

fn run(rules: &Arc<Rules>, node: &str, reqs: &[RequestRecord]) -> Vec<Alert> {
    let mut d = Detector::new(rules.clone(), node, None, None);
    let mut out = Vec::new();
    for r in reqs {
        d.observe(r, &mut out);
    }
    out
}

fn fired(alerts: &[Alert], rule: &str) -> Vec<Alert> {
    alerts.iter().filter(|a| a.rule == rule).cloned().collect()
}

const FP: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn token_replay_first_seen_and_rules_binding() {
    let r = rules(RULES);
    let a = run(
        &r,
        "n1",
        &[
            req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
            req("/intruder", "10.9.0.1", true, 5, vec![cred(FP, None)]),
        ],
    );
    let rep = fired(&a, "token-replay");
    assert_eq!(rep.len(), 1, "{a:#?}");
    assert_eq!(rep[0].source.workload, "intruder");
    assert_eq!(rep[0].destination.workload.as_deref(), Some("orders-api"));
    assert_eq!(rep[0].credential.fingerprint, FP);
    assert_eq!(rep[0].first_seen_by.as_deref(), Some("payments"));
    assert_eq!(rep[0].severity, Severity::High);
    assert!(rep[0].references.iter().any(|r| r.contains("T1550.001")));
    // Benign twin: the owner keeps using it.
    let a = run(
        &r,
        "n1",
        &[
            req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
            req("/payments", "10.9.0.1", true, 5, vec![cred(FP, None)]),
        ],
    );
    assert!(fired(&a, "token-replay").is_empty());
    // Bound by the rules: even the first use by someone else is a replay.
    let a = run(
        &r,
        "n1",
        &[req(
            "/intruder",
            "10.9.0.1",
            true,
            0,
            vec![cred("0000000000000000000000000000000b", None)],
        )],
    );
    assert_eq!(fired(&a, "token-replay")[0].expected["binding"], "rules");
}

#[test]
fn off_path_and_benign_edge() {
    let r = rules(RULES);
    let a = run(&r, "n1", &[req("/payments", "10.9.0.2", true, 0, vec![])]);
    let off = fired(&a, "off-path");
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].destination.workload.as_deref(), Some("reports-api"));
    assert_eq!(off[0].owner.as_ref().unwrap()["team"], "pay-team");
    assert!(
        fired(
            &run(&r, "n1", &[req("/payments", "10.9.0.1", true, 0, vec![])]),
            "off-path"
        )
        .is_empty()
    );
    // A workload without edges is not governed.
    assert!(
        fired(
            &run(&r, "n1", &[req("/orders", "10.9.0.2", true, 0, vec![])]),
            "off-path"
        )
        .is_empty()
    );
}

#[test]
fn cleartext_only_without_tls_and_off_loopback() {
    let r = rules(RULES);
    assert_eq!(
        fired(
            &run(
                &r,
                "n1",
                &[req("/payments", "10.9.0.1", false, 0, vec![cred(FP, None)])]
            ),
            "cleartext-credential"
        )
        .len(),
        1
    );
    assert!(
        fired(
            &run(
                &r,
                "n1",
                &[req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)])]
            ),
            "cleartext-credential"
        )
        .is_empty()
    );
    assert!(
        fired(
            &run(
                &r,
                "n1",
                &[req(
                    "/payments",
                    "127.0.0.1",
                    false,
                    0,
                    vec![cred(FP, None)]
                )]
            ),
            "cleartext-credential"
        )
        .is_empty()
    );
}

fn claims(iat: i64, exp: i64) -> Claims {
    Claims {
        iss: Some("https://sts.svc".into()),
        sub: Some("svc".into()),
        iat: Some(iat),
        exp: Some(exp),
        ..Default::default()
    }
}

#[test]
fn expired_and_long_lived() {
    let r = rules(RULES);
    let now = (NOW / 1_000_000_000) as i64;
    let with = |c: Claims| {
        run(
            &r,
            "n1",
            &[req(
                "/payments",
                "10.9.0.1",
                true,
                0,
                vec![cred(FP, Some(c))],
            )],
        )
    };
    let a = with(claims(now - 7200, now - 3600));
    assert_eq!(fired(&a, "expired-token").len(), 1);
    assert!(fired(&a, "long-lived-token").is_empty());
    let a = with(claims(now, now + 30 * 86400));
    assert_eq!(fired(&a, "long-lived-token").len(), 1);
    assert!(fired(&a, "expired-token").is_empty());
    let a = with(claims(now, now + 3600));
    assert!(fired(&a, "long-lived-token").is_empty() && fired(&a, "expired-token").is_empty());
}

#[test]
fn shared_and_concurrent() {
    let r = rules(RULES);
    let reqs: Vec<_> = ["/payments", "/orders", "/intruder"]
        .iter()
        .enumerate()
        .map(|(i, c)| req(c, "10.9.0.1", true, i as u64 * 3600, vec![cred(FP, None)]))
        .collect();
    let a = run(&r, "n1", &reqs);
    assert_eq!(
        fired(&a, "shared-credential").len(),
        1,
        "third workload crosses max 2"
    );
    assert!(
        fired(&a, "concurrent-use").is_empty(),
        "an hour apart is not concurrent"
    );
    let a = run(
        &r,
        "n1",
        &[
            req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
            req("/orders", "10.9.0.1", true, 2, vec![cred(FP, None)]),
        ],
    );
    assert_eq!(fired(&a, "concurrent-use").len(), 1);
    assert!(fired(&a, "shared-credential").is_empty());
}

#[test]
fn human_identity_and_honeytoken() {
    let r = rules(RULES);
    let mut c = claims(0, i64::MAX / 4);
    c.iss = Some("https://idp.example.com/realms/staff".into());
    assert_eq!(
        fired(
            &run(
                &r,
                "n1",
                &[req(
                    "/payments",
                    "10.9.0.1",
                    true,
                    0,
                    vec![cred(FP, Some(c))]
                )]
            ),
            "human-identity"
        )
        .len(),
        1
    );
    assert!(
        fired(
            &run(
                &r,
                "n1",
                &[req(
                    "/payments",
                    "10.9.0.1",
                    true,
                    0,
                    vec![cred(FP, Some(claims(0, i64::MAX / 4)))]
                )]
            ),
            "human-identity"
        )
        .is_empty()
    );
    let h = fired(
        &run(
            &r,
            "n1",
            &[req(
                "/orders",
                "10.9.0.1",
                true,
                0,
                vec![cred("00000000000000000000000000000bad", None)],
            )],
        ),
        "honeytoken",
    );
    assert_eq!((h.len(), h[0].severity), (1, Severity::Critical));
}

#[test]
fn bound_token_mismatch_by_node_and_service_account() {
    let r = rules(RULES);
    let mut c = claims(0, i64::MAX / 4);
    c.kubernetes = Some(KubernetesClaims {
        namespace: Some("shop".into()),
        serviceaccount: Some("payments".into()),
        node: Some("node-b".into()),
        ..Default::default()
    });
    let a = run(
        &r,
        "node-a",
        &[req(
            "/payments",
            "10.9.0.1",
            true,
            0,
            vec![cred(FP, Some(c.clone()))],
        )],
    );
    assert_eq!(
        fired(&a, "bound-token-mismatch").len(),
        1,
        "token bound to node-b used on node-a"
    );
    assert!(
        fired(
            &run(
                &r,
                "node-b",
                &[req(
                    "/payments",
                    "10.9.0.1",
                    true,
                    0,
                    vec![cred(FP, Some(c.clone()))]
                )]
            ),
            "bound-token-mismatch"
        )
        .is_empty()
    );
    c.kubernetes.as_mut().unwrap().serviceaccount = Some("reports".into());
    let a = run(
        &r,
        "node-b",
        &[req(
            "/payments",
            "10.9.0.1",
            true,
            0,
            vec![cred(FP, Some(c))],
        )],
    );
    assert!(
        fired(&a, "bound-token-mismatch")[0]
            .summary
            .contains("serviceaccount reports ≠ payments")
    );
}

#[test]
fn bound_token_mismatch_against_the_pod_the_process_runs_in() {
    let r = rules(RULES);
    let mut c = claims(0, i64::MAX / 4);
    c.kubernetes = Some(KubernetesClaims {
        namespace: Some("shop".into()),
        serviceaccount: Some("payments".into()),
        pod: Some("payments-7d9f-abcde".into()),
        pod_uid: Some("11111111-2222-3333-4444-555555555555".into()),
        ..Default::default()
    });
    let pod = |name: &str, uid: &str| {
        Arc::new(crate::identity::kube::Pod {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            service_account: Some("payments".into()),
            ..Default::default()
        })
    };
    let from = |p: Arc<crate::identity::kube::Pod>| {
        let mut rec = req(
            "/payments",
            "10.9.0.1",
            true,
            0,
            vec![cred(FP, Some(c.clone()))],
        );
        rec.pod = Some(p);
        rec
    };
    // Its own pod: silent.
    let own = from(pod(
        "payments-7d9f-abcde",
        "11111111-2222-3333-4444-555555555555",
    ));
    assert!(fired(&run(&r, "n1", &[own]), "bound-token-mismatch").is_empty());
    // Another replica of the same service account presents it: the token was carried there.
    let other = from(pod(
        "payments-7d9f-zzzzz",
        "99999999-2222-3333-4444-555555555555",
    ));
    let a = run(&r, "n1", &[other]);
    let f = fired(&a, "bound-token-mismatch");
    assert_eq!(f.len(), 1, "{a:#?}");
    assert!(
        f[0].summary
            .contains("pod payments-7d9f-abcde ≠ payments-7d9f-zzzzz"),
        "{}",
        f[0].summary
    );
}

#[test]
fn repeats_are_one_alert_with_a_count() {
    let r = rules(RULES);
    let mut d = Detector::new(r, "n1", None, None);
    let mut out = Vec::new();
    d.observe(
        &req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    for i in 1..=5 {
        d.observe(
            &req("/intruder", "10.9.0.1", true, 100 + i, vec![cred(FP, None)]),
            &mut out,
        );
    }
    assert_eq!(fired(&out, "token-replay").len(), 1);
    let mut later = Vec::new();
    d.flush(NOW + 3600 * 1_000_000_000, &mut later);
    let upd = fired(&later, "token-replay");
    assert_eq!(upd.len(), 1);
    assert_eq!(upd[0].count, 5);
    assert_eq!(upd[0].id, fired(&out, "token-replay")[0].id);
}

#[test]
fn learn_mode_binds_without_reuse_alerts() {
    let r = rules(RULES);
    let mut d = Detector::new(r, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    d.observe(
        &req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    d.observe(
        &req("/intruder", "10.9.0.2", true, 5, vec![cred(FP, None)]),
        &mut out,
    );
    assert!(
        out.iter().all(|a| !matches!(
            a.rule.as_str(),
            "token-replay" | "off-path" | "concurrent-use"
        )),
        "{out:#?}"
    );
    assert_eq!(
        &*d.state().creds.peek(FP).unwrap().first_workload,
        "payments"
    );
}

#[test]
fn server_side_of_a_client_side_request_is_not_a_second_use() {
    let r = rules(RULES);
    let c = req("/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]);
    let mut s = c.clone();
    s.side = "server";
    s.comm = "nginx".into();
    let a = run(&r, "n1", &[c, s]);
    assert!(fired(&a, "token-replay").is_empty(), "{a:#?}");
}

struct FakeShared(std::sync::Mutex<Vec<(String, String)>>);

impl SharedBindings for FakeShared {
    fn get(&self, fp: &str) -> Option<RemoteBinding> {
        (fp == FP).then(|| RemoteBinding {
            workload: "payments".into(),
            node: "node-1".into(),
            first_seen_ns: NOW - 1,
        })
    }
    fn publish(&self, fp: &str, workload: &str, _node: &str, _t: u64) {
        self.0.lock().unwrap().push((fp.into(), workload.into()));
    }
}

#[test]
fn replay_across_nodes_through_shared_bindings() {
    let r = rules(RULES);
    let shared = Arc::new(FakeShared(Default::default()));
    let mut d = Detector::new(r, "node-2", None, None).with_shared(shared.clone());
    let mut out = Vec::new();
    d.observe(
        &req("/intruder", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    let rep = fired(&out, "token-replay");
    assert_eq!(rep.len(), 1, "{out:#?}");
    assert!(rep[0].summary.contains("first seen on node-1"));
    // A credential new everywhere is published for the other nodes.
    d.observe(
        &req(
            "/orders",
            "10.9.0.1",
            true,
            1,
            vec![cred("ffffffffffffffffffffffffffffffff", None)],
        ),
        &mut out,
    );
    assert_eq!(
        shared.0.lock().unwrap().as_slice(),
        &[(
            "ffffffffffffffffffffffffffffffff".to_string(),
            "orders".to_string()
        )]
    );
}

#[test]
fn learnt_rules_round_trip_into_enforce() {
    // Learn: payments calls orders-ish destinations with its token; no reuse alerts.
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    d.observe(
        &req("/shop/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    d.observe(
        &req("/shop/payments", "10.9.0.1", true, 1, vec![cred(FP, None)]),
        &mut out,
    );
    let learnt = d.learnt_rules();
    let yaml = serde_yaml_ng::to_string(&learnt).unwrap();
    // What a person reviews is valid rules.
    let f = std::path::PathBuf::from("learnt.yaml");
    let parsed = check::parse(&f, &yaml).unwrap();
    let rules = Arc::new(
        check::compile(vec![(f, yaml.clone(), parsed)]).unwrap_or_else(|e| panic!("{e:?}\n{yaml}")),
    );
    assert_eq!(rules.workloads[0].name, "payments", "{yaml}");
    assert_eq!(rules.credentials[0].bound_to.as_deref(), Some("payments"));
    assert_eq!(rules.edges[0].paths, vec!["/api/".to_string()]);
    // Enforce on it: the same traffic is quiet; a replay and a new destination are not.
    let quiet = run(
        &rules,
        "n1",
        &[req(
            "/shop/payments",
            "10.9.0.1",
            true,
            0,
            vec![cred(FP, None)],
        )],
    );
    assert!(quiet.is_empty(), "{quiet:#?}");
    let loud = run(
        &rules,
        "n1",
        &[
            req("/shop/intruder", "10.9.0.1", true, 0, vec![cred(FP, None)]),
            req(
                "/shop/payments",
                "10.9.0.7",
                true,
                100,
                vec![cred(FP, None)],
            ),
        ],
    );
    assert_eq!(fired(&loud, "token-replay").len(), 1, "{loud:#?}");
    assert_eq!(fired(&loud, "off-path").len(), 1, "{loud:#?}");
}

#[test]
fn learn_names_pods_by_owner_and_enforce_selects_them() {
    use crate::identity::kube::Pod;
    let pod = |name: &str| {
        Some(Arc::new(Pod {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            owner_kind: Some("Deployment".into()),
            owner_name: Some("checkout".into()),
            ..Pod::default()
        }))
    };
    let mut a = req("/kubepods/a", "10.9.0.1", true, 0, vec![cred(FP, None)]);
    a.pod = pod("checkout-7d9-a");
    let mut b = req("/kubepods/b", "10.9.0.1", true, 1, vec![cred(FP, None)]);
    b.pod = pod("checkout-7d9-b");
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    d.observe(&a, &mut out);
    d.observe(&b, &mut out);
    let yaml = serde_yaml_ng::to_string(&d.learnt_rules()).unwrap();
    let f = std::path::PathBuf::from("learnt.yaml");
    let parsed = check::parse(&f, &yaml).unwrap();
    let rules = Arc::new(
        check::compile(vec![(f, yaml.clone(), parsed)]).unwrap_or_else(|e| panic!("{e:?}\n{yaml}")),
    );
    // One workload for both replicas, selected by namespace and owner.
    assert_eq!(rules.workloads.len(), 1, "{yaml}");
    assert_eq!(rules.workloads[0].name, "checkout", "{yaml}");
    assert!(
        yaml.contains("namespace: shop") && yaml.contains("owner: Deployment/checkout"),
        "{yaml}"
    );
    // A third replica, never seen, is the same workload under enforce: quiet.
    let mut c = req("/kubepods/c", "10.9.0.1", true, 2, vec![cred(FP, None)]);
    c.pod = pod("checkout-7d9-c");
    let quiet = run(&rules, "n1", &[c]);
    assert!(quiet.is_empty(), "{quiet:#?}");
}

fn at_path(mut r: RequestRecord, path: &str) -> RequestRecord {
    r.path = path.into();
    r
}

#[test]
fn off_path_compares_normalised_paths_by_segment() {
    let r = rules(RULES);
    for bad in [
        "/api/../admin/users",
        "/api/%2e%2e/admin/users",
        "/api/.%2E/admin",
        "/api%2f..%2fadmin",
        "/api/..;/admin",
        "/api\\..\\admin",
        "/apix",
        "/apix/y",
        "/api/../..",
        "/..",
        "é/x",
        "/api/x%zz",
        "",
    ] {
        let a = run(
            &r,
            "n1",
            &[at_path(req("/payments", "10.9.0.1", true, 0, vec![]), bad)],
        );
        assert_eq!(
            fired(&a, "off-path").len(),
            1,
            "{bad:?} passed the /api/ edge"
        );
    }
    for good in [
        "/api/orders",
        "/api",
        "/api//orders/./7",
        "/x/../api/orders",
        "/api/%6Frders?next=/admin",
        "/api/orders/%2e%2e",
        "http://orders.test/api/orders",
    ] {
        let a = run(
            &r,
            "n1",
            &[at_path(req("/payments", "10.9.0.1", true, 0, vec![]), good)],
        );
        assert!(fired(&a, "off-path").is_empty(), "{good:?}: {a:#?}");
    }
}

#[test]
fn edge_paths_are_normalised_and_checked_with_positions() {
    let r = rules(
        "workloads:\n  - { name: a, match: { comm: a } }\ndestinations:\n  - { name: d, ips: [10.0.0.1] }\nedges:\n  - { from: a, to: d, paths: [/v1/./orders/, /x//y] }\n",
    );
    assert_eq!(r.edges[0].paths, ["/v1/orders/", "/x/y"]);
    for bad in ["api/", "/../x", "/a?b=1", "/a%zz"] {
        let text = format!(
            "workloads:\n  - {{ name: a, match: {{ comm: a }} }}\ndestinations:\n  - {{ name: d, ips: [10.0.0.1] }}\nedges:\n  - from: a\n    to: d\n    paths: [\"{bad}\"]\n"
        );
        let f = std::path::PathBuf::from("e.yaml");
        let parsed = check::parse(&f, &text).unwrap();
        let e = check::compile(vec![(f, text.clone(), parsed)]).unwrap_err();
        let shown = e[0].to_string();
        assert!(
            shown.starts_with("e.yaml:8:14: edge from `a` to `d` path"),
            "{bad}: {shown}"
        );
    }
}

#[test]
fn learn_survives_paths_that_are_not_char_boundaries_or_normalisable() {
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    for (i, p) in ["é/x", "\u{FFFD}", "\u{FFFD}\u{FFFD}/a", "/..", "ü"]
        .iter()
        .enumerate()
    {
        d.observe(
            &at_path(
                req(
                    "/shop/payments",
                    "10.9.0.1",
                    true,
                    i as u64,
                    vec![cred(FP, None)],
                ),
                p,
            ),
            &mut out,
        );
    }
    assert_eq!(d.stats.unnormalisable_paths, 5);
    d.observe(
        &at_path(
            req("/shop/payments", "10.9.0.1", true, 9, vec![cred(FP, None)]),
            "/é/x",
        ),
        &mut out,
    );
    let learnt = d.learnt_rules();
    // Nothing learnt from the bad paths: the one edge allows only the good one's prefix.
    assert_eq!(learnt.edges.len(), 1);
    assert_eq!(learnt.edges[0].paths, ["/é/"]);
}

#[test]
fn a_tampered_binding_cannot_break_learn() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.json");
    let mut st = State::new(10);
    st.put(
        "éééééééé".into(),
        state::CredState {
            first_workload: "cgroup:/shop/payments".into(),
            first_node: "n1".into(),
            first_seen_ns: NOW,
            users: vec![],
            distinct_workloads: 1,
            kind: None,
        },
    );
    st.save(&p).unwrap();
    let st = State::load(&p, 10).unwrap();
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), Some(st));
    assert_eq!(d.stats.state_entries_dropped, 1);
    // Even one that got in some other way is left out of the learnt rules, not a panic.
    d.state_mut().put(
        "éééééééé".into(),
        state::CredState {
            first_workload: "cgroup:/shop/payments".into(),
            first_node: "n1".into(),
            first_seen_ns: NOW,
            users: vec![],
            distinct_workloads: 1,
            kind: None,
        },
    );
    let mut out = Vec::new();
    d.observe(
        &req("/shop/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    let learnt = d.learnt_rules();
    assert_eq!(learnt.credentials.len(), 1);
    assert_eq!(
        learnt.credentials[0].matcher.fingerprint.as_deref(),
        Some(FP)
    );
    assert_eq!(short_fp("éééééééééé"), "éééééééé");
}

#[test]
fn open_alerts_are_bounded_and_close_in_time_order() {
    let r = rules("detections:\n  max_open_alerts: 3\n  dedup_window: 60s\n");
    let mut d = Detector::new(r, "n1", None, None);
    let mut out = Vec::new();
    let fp = |i: u64| format!("{i:032x}");
    // Five distinct cleartext credentials, each seen twice: five alerts, three kept open.
    for i in 0..5u64 {
        for _ in 0..2 {
            d.observe(
                &req("/orders", "10.9.0.1", false, i, vec![cred(&fp(i), None)]),
                &mut out,
            );
        }
    }
    assert_eq!(fired(&out, "cleartext-credential").len(), 5 + 2, "{out:#?}");
    // The two closed early sent their final count (2) at once.
    assert_eq!(
        out.iter()
            .filter(|a| a.count == 2)
            .map(|a| a.credential.fingerprint.clone())
            .collect::<Vec<_>>(),
        [fp(0), fp(1)]
    );
    assert_eq!((d.stats.open_alerts, d.stats.open_alerts_evicted), (3, 2));
    // The window (60 s from t=2) has passed for t=2 only at t=62.
    let mut later = Vec::new();
    d.flush(NOW + 62 * 1_000_000_000, &mut later);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].credential.fingerprint, fp(2));
    assert_eq!(d.stats.open_alerts, 2);
    // Rules reloaded with a smaller bound: the oldest closes, its count sent at the next flush.
    d.set_rules(
        rules("detections:\n  max_open_alerts: 1\n  dedup_window: 60s\n"),
        None,
    );
    let mut later = Vec::new();
    d.flush(NOW + 62 * 1_000_000_000, &mut later);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].credential.fingerprint, fp(3));
    assert_eq!(d.stats.open_alerts, 1);
}

#[test]
fn requests_older_than_the_store_ttl_are_counted_on_arrival() {
    let r = rules(RULES);
    let mut d = Detector::new(r, "n1", None, None);
    d.set_retention(Some(std::time::Duration::from_secs(30 * 86_400)));
    let mut out = Vec::new();
    let mut old = req("/payments", "10.9.0.1", true, 0, vec![]);
    old.time = 1_600_000_000 * 1_000_000_000;
    d.observe(&old, &mut out);
    d.observe(&req("/payments", "10.9.0.1", true, 1, vec![]), &mut out);
    assert_eq!(d.stats.expired_on_arrival, 1);
    assert_eq!(d.oldest_expired_ns, Some(old.time));
    // Said once at the end, with the counts.
    let logs = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || LogBuf(sink.clone()))
        .finish();
    tracing::subscriber::with_default(sub, || d.finish(None, None)).unwrap();
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("older than the ClickHouse TTL").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("expired_on_arrival=1 observations=2"),
        "{text}"
    );
    assert!(text.contains("oldest=2020-09-13T12:26:40"), "{text}");
    // Without a store there is no TTL.
    d.set_retention(None);
    d.observe(&old, &mut out);
    assert_eq!(d.stats.expired_on_arrival, 1);
}

struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_state_save_still_writes_learn_out_and_the_reverse() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    d.observe(
        &req("/shop/payments", "10.9.0.1", true, 0, vec![cred(FP, None)]),
        &mut out,
    );
    let learnt = dir.path().join("learnt.yaml");
    // An earlier, world-readable learn-out is replaced by a private one.
    std::fs::write(&learnt, "old").unwrap();
    std::fs::set_permissions(&learnt, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = d
        .finish(Some(&not_a_dir.join("state.json")), Some(&learnt))
        .unwrap_err();
    assert!(format!("{e:#}").contains("saving state"), "{e:#}");
    let text = std::fs::read_to_string(&learnt).unwrap();
    assert!(text.contains(FP), "{text}");
    assert_eq!(
        std::fs::metadata(&learnt).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let state = dir.path().join("state.json");
    let e = d
        .finish(Some(&state), Some(&not_a_dir.join("learnt.yaml")))
        .unwrap_err();
    assert!(format!("{e:#}").contains("learnt.yaml"), "{e:#}");
    assert!(State::load(&state, 10).unwrap().creds.peek(FP).is_some());
}

#[test]
fn the_learnt_graph_is_bounded() {
    let empty = Arc::new(Rules::default());
    let mut d = Detector::new(empty, "n1", Some(crate::rules::Mode::Learn), None);
    let mut out = Vec::new();
    for i in 0..(learn::MAX_METHODS_PER_EDGE + 4) {
        let mut r = req("/shop/payments", "10.9.0.1", true, 0, vec![]);
        r.method = format!("M{i}");
        d.observe(&r, &mut out);
    }
    assert_eq!(d.stats.not_learnt, 4);
    let learnt = d.learnt_rules();
    assert_eq!(learnt.edges[0].methods.len(), learn::MAX_METHODS_PER_EDGE);
    // A request with a bad path adds no workload and no destination.
    d.observe(
        &at_path(req("/shop/other", "10.9.0.7", true, 0, vec![]), "/.."),
        &mut out,
    );
    let learnt = d.learnt_rules();
    assert_eq!(learnt.destinations.len(), 1, "{:#?}", learnt.destinations);
    assert_eq!(learnt.workloads.len(), 1);
}
