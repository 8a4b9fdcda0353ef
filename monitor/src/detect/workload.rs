//! Which workload made a request and which destination it reached, from the rules'
//! selectors; a stable fallback name when no rule says.

use std::net::IpAddr;

use crate::{
    identity::kube::Pod,
    pipeline::RequestRecord,
    rules::{CompiledWorkload, Rules},
};

/// Whether the observing process sent the request (its own identity is the source) or
/// received it (the source is known only by address).
pub fn is_client_side(rec: &RequestRecord) -> bool {
    rec.side == "client"
}

pub fn source_workload(rules: &Rules, rec: &RequestRecord) -> String {
    let ip = rec.source.as_ref().map(|e| e.ip);
    if is_client_side(rec) {
        for w in &rules.workloads {
            let ok = w
                .cgroup
                .as_ref()
                .is_none_or(|g| rec.cgroup.as_deref().is_some_and(|c| g.is_match(c)))
                && w.exe
                    .as_ref()
                    .is_none_or(|g| rec.exe.as_deref().is_some_and(|e| g.is_match(e)))
                && w.comm.as_ref().is_none_or(|c| *c == rec.comm)
                && w.unit
                    .as_ref()
                    .is_none_or(|g| rec.unit.as_deref().is_some_and(|u| g.is_match(u)))
                && (!w.by_pod() || rec.pod.as_deref().is_some_and(|p| pod_matches(w, p)))
                && (w.nets.is_empty()
                    || ip.is_some_and(|ip| w.nets.iter().any(|n| n.contains(&ip))));
            if ok && (w.by_process() || !w.nets.is_empty()) {
                return w.name.clone();
            }
        }
        // All replicas of a Deployment are one workload; a service is its unit.
        if let Some(p) = rec.pod.as_deref() {
            return p.workload();
        }
        if let Some(u) = rec.unit.as_deref() {
            return format!("unit:{u}");
        }
        return match rec.cgroup.as_deref() {
            Some(c) if c != "/" && !c.is_empty() => format!("cgroup:{c}"),
            _ => match rec.exe.as_deref() {
                Some(e) => format!("exe:{e}"),
                None => format!("comm:{}", rec.comm),
            },
        };
    }
    by_address(rules, ip)
}

/// Every Kubernetes selector of `w` the pod satisfies (labels: all of them, same values).
fn pod_matches(w: &CompiledWorkload, p: &Pod) -> bool {
    let g = |m: &Option<globset::GlobMatcher>, v: Option<&str>| {
        m.as_ref().is_none_or(|m| v.is_some_and(|v| m.is_match(v)))
    };
    g(&w.namespace, Some(&p.namespace))
        && g(&w.pod, Some(&p.name))
        && g(&w.service_account, p.service_account.as_deref())
        && g(&w.pod_owner, p.owner().as_deref())
        && w.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v))
}

fn by_address(rules: &Rules, ip: Option<IpAddr>) -> String {
    let Some(ip) = ip else {
        return "unknown".into();
    };
    rules
        .workloads
        .iter()
        .find(|w| w.nets.iter().any(|n| n.contains(&ip)))
        .map_or_else(|| format!("ip:{ip}"), |w| w.name.clone())
}

/// The destination's name in the rules, or `host:port` / `ip:port`.
pub fn destination(rules: &Rules, rec: &RequestRecord) -> String {
    let ip = rec.destination.as_ref().map(|e| e.ip);
    let port = rec.destination.as_ref().map(|e| e.port);
    let host = rec
        .host
        .as_deref()
        .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase());
    for d in &rules.destinations {
        let ip_ok =
            d.nets.is_empty() || ip.is_some_and(|ip| d.nets.iter().any(|n| n.contains(&ip)));
        let port_ok = d.ports.is_empty() || port.is_some_and(|p| d.ports.contains(&p));
        let host_ok = d.hosts.is_empty()
            || host
                .as_deref()
                .is_some_and(|h| d.hosts.iter().any(|g| g.is_match(h)));
        if ip_ok && port_ok && host_ok {
            return d.name.clone();
        }
    }
    // A destination that is itself a known workload (by address).
    if let Some(ip) = ip
        && let Some(w) = rules
            .workloads
            .iter()
            .find(|w| w.nets.iter().any(|n| n.contains(&ip)))
    {
        return w.name.clone();
    }
    match (host, ip, port) {
        (Some(h), _, Some(p)) => format!("{h}:{p}"),
        (None, Some(ip), Some(p)) => format!("{ip}:{p}"),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use super::*;
    use crate::{pipeline::Endpoint, rules::check};

    fn rec(pod: Option<Pod>, unit: Option<&str>, cgroup: &str) -> RequestRecord {
        RequestRecord {
            time: 0,
            pid: 1,
            tid: 1,
            comm: "app".into(),
            exe: Some("/usr/bin/app".into()),
            cgroup_id: 9,
            cgroup: Some(cgroup.into()),
            container_id: None,
            runtime: None,
            pod_uid: None,
            pod: pod.map(Arc::new),
            unit: unit.map(Arc::from),
            uid: Some(0),
            gid: None,
            netns: 1,
            side: "client",
            source: Some(Endpoint {
                ip: "10.1.0.5".parse().unwrap(),
                port: 40000,
            }),
            destination: None,
            fd: 3,
            tls: true,
            library: None,
            protocol: "http/1.1",
            method: "GET".into(),
            host: None,
            path: "/".into(),
            database: None,
            credentials: Vec::new(),
            ts_ns: 0,
        }
    }

    fn checkout(name: &str) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: Some("checkout".into()),
            labels: [("app", "checkout"), ("tier", "web")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            owner_kind: Some("Deployment".into()),
            owner_name: Some("checkout".into()),
            node: Some("n1".into()),
        }
    }

    fn rules(yaml: &str) -> Rules {
        let f = PathBuf::from("r.yaml");
        let r = check::parse(&f, yaml).unwrap();
        check::compile(vec![(f, yaml.to_string(), r)]).unwrap()
    }

    #[test]
    fn replicas_are_one_workload_and_units_are_named() {
        let r = Rules::default();
        let cg = "/kubepods.slice/kubepods-besteffort.slice/x.scope";
        let a = source_workload(&r, &rec(Some(checkout("checkout-7d9-a")), None, cg));
        let b = source_workload(&r, &rec(Some(checkout("checkout-7d9-b")), None, "/other"));
        assert_eq!(a, "k8s:shop/Deployment/checkout");
        assert_eq!(a, b);
        let mut bare = checkout("debug");
        bare.owner_kind = None;
        bare.owner_name = None;
        assert_eq!(
            source_workload(&r, &rec(Some(bare), None, cg)),
            "k8s:shop/pod/debug"
        );
        assert_eq!(
            source_workload(
                &r,
                &rec(None, Some("nginx.service"), "/system.slice/nginx.service")
            ),
            "unit:nginx.service"
        );
        assert_eq!(
            source_workload(&r, &rec(None, None, cg)),
            format!("cgroup:{cg}")
        );
    }

    #[test]
    fn pod_selectors_all_must_match() {
        let r = rules(
            "workloads:
  - name: exact
    match: { namespace: shop, service_account: checkout, owner: Deployment/checkout, labels: { app: checkout, tier: web } }
  - name: by-pod-glob
    match: { pod: \"cart-*\" }
  - name: by-unit
    match: { unit: \"nginx*.service\" }
  - name: any-daemonset
    match: { owner: \"DaemonSet/*\" }
",
        );
        let cg = "/x";
        assert_eq!(
            source_workload(&r, &rec(Some(checkout("checkout-1")), None, cg)),
            "exact"
        );
        // One label off: not that workload (falls back to the pod's owner).
        let mut p = checkout("checkout-1");
        p.labels.insert("tier".into(), "batch".into());
        assert_eq!(
            source_workload(&r, &rec(Some(p), None, cg)),
            "k8s:shop/Deployment/checkout"
        );
        let mut p = checkout("cart-5");
        p.service_account = Some("cart".into());
        assert_eq!(source_workload(&r, &rec(Some(p), None, cg)), "by-pod-glob");
        let mut p = checkout("fluent-bit-x");
        p.namespace = "logging".into();
        p.owner_kind = Some("DaemonSet".into());
        assert_eq!(
            source_workload(&r, &rec(Some(p), None, cg)),
            "any-daemonset"
        );
        assert_eq!(
            source_workload(&r, &rec(None, Some("nginx.service"), cg)),
            "by-unit"
        );
        // Pod selectors never match a process whose pod is unknown.
        assert_eq!(source_workload(&r, &rec(None, None, cg)), "cgroup:/x");
    }
}
