//! Live detection tests (root), one per rule id: real curl clients in a cgroup per workload,
//! nginx over TLS and plaintext, the real kernel programs; each scenario must fire its rule
//! with the right source, destination and fingerprint, and its benign twin must not.

mod common;

use common::*;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss"];
const NODE: &str = "node-a";

struct Shop {
    lab: Lab,
    _server_cg: Cgroup,
    nginx: Nginx,
    payments: Cgroup,
    orders: Cgroup,
    reports: Cgroup,
    intruder: Cgroup,
    rules: tempfile::TempDir,
    key: Vec<u8>,
}

fn random_key() -> Vec<u8> {
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).unwrap();
    key
}

/// HMAC-SHA256 fingerprint under `key`, as the monitor computes it.
fn fingerprint(key: &[u8], secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(secret.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

impl Shop {
    fn new(extra_rules: &str) -> Shop {
        Self::with_key(random_key(), extra_rules)
    }

    fn with_key(key: Vec<u8>, extra_rules: &str) -> Shop {
        require_root_and_tools(TOOLS);
        let t = tag();
        let lab = Lab::new(&t);
        let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
        let nginx = Nginx::start(&lab, &server_cg);
        let cg = |n: &str| Cgroup::new(&format!("monitor-test-{t}-{n}"));
        let (payments, orders, reports, intruder) =
            (cg("payments"), cg("orders"), cg("reports"), cg("intruder"));
        let rules = tempfile::tempdir().unwrap();
        let yaml = format!(
            "workloads:
  - {{ name: payments, match: {{ cgroup: \"{}\" }}, owner: {{ team: payments-team, contact: \"#pay\" }} }}
  - {{ name: orders, match: {{ cgroup: \"{}\" }} }}
  - {{ name: reports, match: {{ cgroup: \"{}\" }} }}
  - {{ name: intruder, match: {{ cgroup: \"{}\" }} }}
destinations:
  - {{ name: shop-api, ips: [{ip}], ports: [443, 80] }}
edges:
  - {{ from: payments, to: shop-api, methods: [GET], paths: [/api/] }}
human_identities:
  - {{ issuer: \"https://login.shop.example/*\" }}
{extra_rules}",
            payments.path,
            orders.path,
            reports.path,
            intruder.path,
            ip = lab.server_ip
        );
        std::fs::write(rules.path().join("shop.yaml"), yaml).unwrap();
        Shop {
            lab,
            _server_cg: server_cg,
            nginx,
            payments,
            orders,
            reports,
            intruder,
            rules,
            key,
        }
    }

    fn monitor(&self) -> Monitor {
        let rules = self.rules.path().to_str().unwrap().to_string();
        Monitor::start_with_key(
            &["--rules", &rules, "--node", NODE, "--print", "alerts"],
            Some(&self.key),
        )
    }

    fn curl(&self, who: &Cgroup, url: &str, token: &str) {
        let argv = curl_args(
            &self.lab,
            &self.nginx,
            &[format!("Authorization: Bearer {token}")],
            &[],
            url,
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert!(
            who.spawn(&self.lab.client_ns, &argv)
                .wait()
                .unwrap()
                .success(),
            "curl {url} failed"
        );
    }
}

fn token() -> String {
    format!("tok-{}", random_hex(20))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn alerts<'a>(out: &'a Output, rule: &str, fp: &str) -> Vec<&'a Value> {
    out.records
        .iter()
        .filter(|a| a["rule"] == rule && a["credential"]["fingerprint"] == fp)
        .collect()
}

fn assert_fired(
    out: &Output,
    rule: &str,
    fp: &str,
    source: &str,
    dst_port: u16,
    shop: &Shop,
) -> Value {
    let a = alerts(out, rule, fp);
    assert_eq!(
        a.len(),
        1,
        "expected one {rule} alert for {fp}; all alerts: {:#?}",
        out.records
    );
    let a = a[0].clone();
    assert_eq!(a["schema"], "monitor.alert/v1");
    assert_eq!(a["source"]["workload"], source);
    assert_eq!(a["source"]["node"], NODE);
    assert_eq!(a["source"]["comm"], "curl");
    assert_eq!(a["destination"]["ip"], json!(shop.lab.server_ip));
    assert_eq!(a["destination"]["port"], json!(dst_port));
    assert!(!a["references"].as_array().unwrap().is_empty());
    assert_eq!(out.events_lost(), 0);
    a
}

fn assert_silent(out: &Output, rule: &str, fp: &str) {
    let a = alerts(out, rule, fp);
    assert!(a.is_empty(), "benign twin fired {rule}: {a:#?}");
}

#[test]
fn token_replay_fires_when_another_workload_presents_the_token() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let (t, benign) = (token(), token());
    s.curl(&s.payments, "https://server.test/api/pay", &t);
    s.curl(&s.intruder, "https://server.test/api/pay", &t);
    s.curl(&s.payments, "https://server.test/api/pay", &benign);
    s.curl(&s.payments, "https://server.test/api/pay", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    let a = assert_fired(&out, "token-replay", &fp, "intruder", 443, &s);
    assert_eq!(a["first_seen_by"], "payments");
    assert_eq!(a["expected"]["workload"], "payments");
    assert_silent(&out, "token-replay", &fp_b);
    out.assert_no_secret(&t);
}

#[test]
fn off_path_fires_outside_the_graph() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let t = token();
    s.curl(&s.payments, "https://server.test/admin/users", &t);
    s.curl(&s.payments, "https://server.test/api/ok", &t);
    let fp = m.fingerprint(&t);
    let out = m.stop();
    let a = assert_fired(&out, "off-path", &fp, "payments", 443, &s);
    assert_eq!(a["destination"]["path"], "/admin/users");
    assert_eq!(a["owner"]["team"], "payments-team");
    assert!(
        out.records
            .iter()
            .all(|a| a["rule"] != "off-path" || a["destination"]["path"] != "/api/ok"),
        "benign edge fired"
    );
}

#[test]
fn cleartext_credential_fires_without_tls() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let (t, benign) = (token(), token());
    s.curl(&s.orders, "http://server.test/api/plain", &t);
    s.curl(&s.orders, "https://server.test/api/tls", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    assert_fired(&out, "cleartext-credential", &fp, "orders", 80, &s);
    assert_silent(&out, "cleartext-credential", &fp_b);
    out.assert_no_secret(&t);
}

#[test]
fn expired_token_fires_past_exp() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let t = jwt(
        json!({"iss": "https://sts.shop", "sub": "orders", "iat": now() - 7200, "exp": now() - 3600}),
    );
    let benign =
        jwt(json!({"iss": "https://sts.shop", "sub": "orders", "iat": now(), "exp": now() + 3600}));
    s.curl(&s.orders, "https://server.test/api/x", &t);
    s.curl(&s.orders, "https://server.test/api/x", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    let a = assert_fired(&out, "expired-token", &fp, "orders", 443, &s);
    assert_eq!(a["credential"]["kind"], "bearer-jwt");
    assert_eq!(a["credential"]["claims"]["sub"], "orders");
    assert_silent(&out, "expired-token", &fp_b);
    out.assert_no_secret(&t);
}

#[test]
fn long_lived_token_fires_above_max_lifetime() {
    let _g = serial();
    let s = Shop::new("detections:\n  long-lived-token: { max_lifetime: 24h }\n");
    let m = s.monitor();
    let t = jwt(
        json!({"iss": "https://sts.shop", "sub": "reports", "iat": now(), "exp": now() + 90 * 86400}),
    );
    let benign = jwt(
        json!({"iss": "https://sts.shop", "sub": "reports", "iat": now(), "exp": now() + 3600}),
    );
    s.curl(&s.reports, "https://server.test/api/r", &t);
    s.curl(&s.reports, "https://server.test/api/r", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    assert_fired(&out, "long-lived-token", &fp, "reports", 443, &s);
    assert_silent(&out, "long-lived-token", &fp_b);
}

#[test]
fn shared_credential_fires_above_max_workloads() {
    let _g = serial();
    let s = Shop::new("detections:\n  shared-credential: { max_workloads: 2 }\n");
    let m = s.monitor();
    let (t, benign) = (token(), token());
    for w in [&s.orders, &s.reports, &s.intruder] {
        s.curl(w, "https://server.test/api/s", &t);
    }
    for w in [&s.orders, &s.reports] {
        s.curl(w, "https://server.test/api/s", &benign);
    }
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    assert_fired(&out, "shared-credential", &fp, "intruder", 443, &s);
    assert_silent(&out, "shared-credential", &fp_b);
}

#[test]
fn concurrent_use_fires_for_two_users_within_the_window() {
    let _g = serial();
    let s = Shop::new("detections:\n  concurrent-use: { window: 30s }\n");
    let m = s.monitor();
    let (t, benign) = (token(), token());
    s.curl(&s.orders, "https://server.test/api/c", &t);
    s.curl(&s.reports, "https://server.test/api/c", &t);
    s.curl(&s.orders, "https://server.test/api/c", &benign);
    s.curl(&s.orders, "https://server.test/api/c", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    assert_fired(&out, "concurrent-use", &fp, "reports", 443, &s);
    assert_silent(&out, "concurrent-use", &fp_b);
}

#[test]
fn human_identity_fires_for_a_person_token() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let t = jwt(
        json!({"iss": "https://login.shop.example/realms/staff", "sub": "alice@shop.example", "iat": now(), "exp": now() + 600}),
    );
    let benign =
        jwt(json!({"iss": "https://sts.shop", "sub": "orders", "iat": now(), "exp": now() + 600}));
    s.curl(&s.orders, "https://server.test/api/h", &t);
    s.curl(&s.orders, "https://server.test/api/h", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    let a = assert_fired(&out, "human-identity", &fp, "orders", 443, &s);
    assert_eq!(a["credential"]["claims"]["sub"], "alice@shop.example");
    assert_silent(&out, "human-identity", &fp_b);
}

#[test]
fn honeytoken_fires_on_any_use() {
    let _g = serial();
    let key = random_key();
    let (t, benign) = (token(), token());
    let fp = fingerprint(&key, &t);
    let s = Shop::with_key(
        key,
        &format!(
            "credentials:\n  - {{ name: canary, match: {{ fingerprint: \"{fp}\" }}, honeytoken: true }}\n"
        ),
    );
    let m = s.monitor();
    s.curl(&s.reports, "https://server.test/api/canary", &t);
    s.curl(&s.reports, "https://server.test/api/canary", &benign);
    let fp_b = m.fingerprint(&benign);
    assert_eq!(m.fingerprint(&t), fp);
    let out = m.stop();
    let a = assert_fired(&out, "honeytoken", &fp, "reports", 443, &s);
    assert_eq!(a["severity"], "critical");
    assert_silent(&out, "honeytoken", &fp_b);
    out.assert_no_secret(&t);
}

#[test]
fn bound_token_mismatch_fires_for_a_token_bound_to_another_node() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let k8s = |node: &str| {
        jwt(
            json!({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:shop:orders",
            "iat": now(), "exp": now() + 600,
            "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders"},
                              "pod": {"name": "orders-7d9f"}, "node": {"name": node}}}),
        )
    };
    let (t, benign) = (k8s("node-b"), k8s(NODE));
    s.curl(&s.orders, "https://server.test/api/k", &t);
    s.curl(&s.orders, "https://server.test/api/k", &benign);
    let (fp, fp_b) = (m.fingerprint(&t), m.fingerprint(&benign));
    let out = m.stop();
    let a = assert_fired(&out, "bound-token-mismatch", &fp, "orders", 443, &s);
    assert!(
        a["summary"].as_str().unwrap().contains("node node-b"),
        "{a:#?}"
    );
    assert_silent(&out, "bound-token-mismatch", &fp_b);
}

#[test]
fn sighup_keeps_the_rules_in_force_when_new_ones_are_broken() {
    let _g = serial();
    let s = Shop::new("");
    let m = s.monitor();
    let rules = s.rules.path().join("shop.yaml");
    let good = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, "edges:\n  - { from: nobody, to: nowhere }\n").unwrap();
    m.signal(libc::SIGHUP);
    m.wait_stderr("keeping the rules in force", 1);
    let t = token();
    // The old graph still governs payments.
    s.curl(&s.payments, "https://server.test/admin/kept", &t);
    // Valid rules without edges: payments is no longer governed.
    let no_edges = good.split("edges:").next().unwrap().to_string();
    std::fs::write(&rules, no_edges).unwrap();
    m.signal(libc::SIGHUP);
    m.wait_stderr("rules reloaded", 1);
    s.curl(&s.payments, "https://server.test/admin/after", &t);
    let out = m.stop();
    assert!(
        out.stderr.contains("shop.yaml:2:"),
        "the broken file's errors are reported:\n{}",
        out.stderr
    );
    let off: Vec<_> = out
        .records
        .iter()
        .filter(|a| a["rule"] == "off-path")
        .map(|a| a["destination"]["path"].clone())
        .collect();
    assert_eq!(off, vec![json!("/admin/kept")], "{:#?}", out.records);
}
