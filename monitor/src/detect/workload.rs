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
        m.as_ref()
            .is_none_or(|m| v.is_some_and(|v| m.is_match(v)))
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
