//! Learn mode's product: the workloads, destinations, edges and credential bindings seen,
//! written as a rules file that a person reviews and commits; `enforce` then alerts on it.

use std::collections::{BTreeMap, BTreeSet};

use super::Obs;
use crate::rules::{
    CredentialMatch, CredentialRule, Destination, Edge, RulesFile, Selector, Workload,
};

/// A destination as seen: addresses, ports, HTTP hosts.
#[derive(Debug, Default)]
struct SeenDestination {
    ips: BTreeSet<String>,
    ports: BTreeSet<u16>,
    hosts: BTreeSet<String>,
}

/// What learning has seen so far, bounded by the number of distinct workloads and edges.
#[derive(Debug, Default)]
pub struct Graph {
    /// Implicit or rules name → selector that recognises it.
    workloads: BTreeMap<String, Selector>,
    destinations: BTreeMap<String, SeenDestination>,
    edges: BTreeMap<(String, String), (BTreeSet<String>, BTreeSet<String>)>,
}

const MAX_EDGES: usize = 100_000;

/// A readable, rules-friendly name for an implicit workload (`cgroup:/a/b.service` → `b.service`).
fn readable(name: &str) -> String {
    let last = name
        .rsplit(['/', ':'])
        .find(|s| !s.is_empty())
        .unwrap_or(name);
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "workload".into()
    } else {
        clean
    }
}

/// First path segment as the allowed prefix: `/api/v1/orders/7` → `/api/`.
fn prefix(path: &str) -> String {
    let p = path.split('?').next().unwrap_or("/");
    match p[1.min(p.len())..].find('/') {
        Some(i) => p[..i + 2].to_string(),
        None => "/".into(),
    }
}

impl Graph {
    pub fn observe(&mut self, obs: &Obs) {
        if self.edges.len() >= MAX_EDGES {
            return;
        }
        let rec = obs.rec;
        if super::workload::is_client_side(rec) {
            let sel = if let Some(c) = obs.source.strip_prefix("cgroup:") {
                Selector {
                    cgroup: Some(c.to_string()),
                    ..Default::default()
                }
            } else if let Some(e) = obs.source.strip_prefix("exe:") {
                Selector {
                    exe: Some(e.to_string()),
                    ..Default::default()
                }
            } else if obs.source.starts_with("k8s:")
                && let Some(pod) = rec.pod.as_deref()
            {
                // `k8s:<ns>/<Kind>/<name>`, or `k8s:<ns>/pod/<name>` for a bare pod.
                Selector {
                    namespace: Some(pod.namespace.clone()),
                    owner: pod.owner(),
                    pod: pod.owner().is_none().then(|| pod.name.clone()),
                    ..Default::default()
                }
            } else if let Some(u) = obs.source.strip_prefix("unit:") {
                Selector {
                    unit: Some(u.to_string()),
                    ..Default::default()
                }
            } else if let Some(c) = obs.source.strip_prefix("comm:") {
                Selector {
                    comm: Some(c.to_string()),
                    ..Default::default()
                }
            } else {
                Selector::default()
            };
            self.workloads.entry(obs.source.clone()).or_insert(sel);
        } else if let Some(ip) = obs.source.strip_prefix("ip:") {
            self.workloads
                .entry(obs.source.clone())
                .or_insert(Selector {
                    ips: vec![ip.to_string()],
                    ..Default::default()
                });
        }
        let d = self
            .destinations
            .entry(obs.destination.clone())
            .or_default();
        if let Some(e) = &rec.destination {
            d.ips.insert(e.ip.to_string());
            d.ports.insert(e.port);
        }
        if let Some(h) = &rec.host {
            d.hosts
                .insert(h.split(':').next().unwrap_or(h).to_ascii_lowercase());
        }
        let e = self
            .edges
            .entry((obs.source.clone(), obs.destination.clone()))
            .or_default();
        e.0.insert(rec.method.to_ascii_uppercase());
        e.1.insert(prefix(&rec.path));
    }

    /// The rules in force extended with what was learnt (bindings from `bindings`).
    pub fn to_rules(
        &self,
        base: &RulesFile,
        bindings: &[(String, String, &'static str)],
    ) -> RulesFile {
        let mut out = base.clone();
        out.mode = Some(crate::rules::Mode::Enforce);
        let known_w: BTreeSet<String> = base.workloads.iter().map(|w| w.name.clone()).collect();
        let known_d: BTreeSet<String> = base.destinations.iter().map(|d| d.name.clone()).collect();
        // Implicit names become readable, unique rules names.
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut taken: BTreeSet<String> = known_w.iter().chain(known_d.iter()).cloned().collect();
        let mut name_for = |implicit: &str, taken: &mut BTreeSet<String>| -> String {
            if let Some(n) = names.get(implicit) {
                return n.clone();
            }
            let base = readable(implicit);
            let mut n = base.clone();
            let mut i = 2;
            while taken.contains(&n) {
                n = format!("{base}-{i}");
                i += 1;
            }
            taken.insert(n.clone());
            names.insert(implicit.to_string(), n.clone());
            n
        };
        for (implicit, sel) in &self.workloads {
            if known_w.contains(implicit) || sel.is_empty() {
                continue;
            }
            let name = name_for(implicit, &mut taken);
            out.workloads.push(Workload {
                name,
                selector: sel.clone(),
                owner: None,
                identity: None,
            });
        }
        for (implicit, SeenDestination { ips, ports, hosts }) in &self.destinations {
            if known_d.contains(implicit) || known_w.contains(implicit) {
                continue;
            }
            let name = name_for(implicit, &mut taken);
            out.destinations.push(Destination {
                name,
                ips: if hosts.is_empty() {
                    ips.iter().cloned().collect()
                } else {
                    Vec::new()
                },
                ports: ports.iter().copied().collect(),
                hosts: hosts.iter().cloned().collect(),
            });
        }
        let rename = |n: &str| names.get(n).cloned().unwrap_or_else(|| n.to_string());
        let have: BTreeSet<(String, String)> = base
            .edges
            .iter()
            .map(|e| (e.from.clone(), e.to.clone()))
            .collect();
        for ((from, to), (methods, paths)) in &self.edges {
            let (from, to) = (rename(from), rename(to));
            if have.contains(&(from.clone(), to.clone()))
                || !out.workloads.iter().any(|w| w.name == from)
            {
                continue;
            }
            out.edges.push(Edge {
                from,
                to,
                methods: methods.iter().cloned().collect(),
                paths: paths.iter().cloned().collect(),
            });
        }
        let bound: BTreeSet<String> = base
            .credentials
            .iter()
            .filter_map(|c| c.matcher.fingerprint.clone())
            .collect();
        for (fp, workload, kind) in bindings {
            let w = rename(workload);
            if bound.contains(fp) || !out.workloads.iter().any(|x| x.name == w) {
                continue;
            }
            out.credentials.push(CredentialRule {
                name: format!("{w}-{kind}-{}", &fp[..8.min(fp.len())]),
                matcher: CredentialMatch {
                    fingerprint: Some(fp.clone()),
                    ..Default::default()
                },
                bound_to: Some(w),
                ..Default::default()
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_prefixes() {
        assert_eq!(
            readable("cgroup:/system.slice/nginx.service"),
            "nginx.service"
        );
        assert_eq!(readable("exe:/usr/bin/curl"), "curl");
        assert_eq!(readable("10.0.0.1:443"), "443");
        assert_eq!(prefix("/api/v1/x?y=1"), "/api/");
        assert_eq!(prefix("/health"), "/");
    }
}
