//! Learn mode's product: the workloads, destinations, edges and credential bindings seen,
//! written as a rules file that a person reviews and commits; `enforce` then alerts on it.

use std::collections::{BTreeMap, BTreeSet};

use super::{Obs, short_fp};
use crate::rules::{
    CredentialMatch, CredentialRule, Destination, Edge, Mode, RulesFile, Selector, Workload, path,
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
    edges: BTreeMap<(String, String), SeenEdge>,
    /// Requests whose path has no normal form: nothing is learnt from them.
    pub unnormalisable_paths: u64,
    /// Requests not learnt because a bound of the graph was reached.
    pub not_learnt: u64,
}

#[derive(Debug, Default)]
struct SeenEdge {
    methods: BTreeSet<String>,
    /// Normalised prefixes, none under another, at most `MAX_PREFIXES_PER_EDGE`.
    paths: BTreeSet<String>,
    /// Used by a protocol without paths (Redis, PostgreSQL logins): paths do not constrain it.
    pathless: bool,
}

/// Edges learnt; workloads and destinations are at most as many (each comes with an edge).
/// With the bounds below, learn mode's graph stays under ~5 KiB per edge (~100 MiB).
pub const MAX_EDGES: usize = 20_000;

/// Addresses, ports and hosts learnt per destination.
pub const MAX_PER_DESTINATION: usize = 16;

/// Methods learnt per edge; a request with another one is not learnt (enforce will then
/// call it off-path, rather than allow any method).
pub const MAX_METHODS_PER_EDGE: usize = 16;

/// Path prefixes learnt per edge; past it they collapse to their common parent (`/` for
/// first-segment prefixes), so a caller of many distinct top-level paths does not grow the
/// graph without bound.
pub const MAX_PREFIXES_PER_EDGE: usize = 32;

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

/// The first segment of the normalised path as the allowed prefix: `/api/v1/orders/7` →
/// `/api/`, `/health` → `/health`; `None` when the path has no normal form.
fn prefix(raw: &str) -> Option<String> {
    let n = path::normalize(raw)?;
    let mut segs = path::segments(&n);
    Some(match (segs.next(), segs.next()) {
        (None, _) => "/".into(),
        (Some(first), None) if !n.ends_with('/') => format!("/{first}"),
        (Some(first), _) => format!("/{first}/"),
    })
}

/// The longest prefix, by whole segments, that every one of `prefixes` lies under.
fn common_parent<'a>(prefixes: impl IntoIterator<Item = &'a String>) -> String {
    let mut common: Option<Vec<&str>> = None;
    for p in prefixes {
        let segs: Vec<&str> = path::segments(p).collect();
        common = Some(match common {
            None => segs,
            Some(c) => c
                .iter()
                .zip(&segs)
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| *a)
                .collect(),
        });
    }
    let c = common.unwrap_or_default();
    if c.is_empty() {
        "/".into()
    } else {
        format!("/{}/", c.join("/"))
    }
}

impl SeenEdge {
    fn add_path(&mut self, p: String) {
        if self.paths.iter().any(|q| path::under(&p, q)) {
            return;
        }
        self.paths.retain(|q| !path::under(q, &p));
        self.paths.insert(p);
        if self.paths.len() > MAX_PREFIXES_PER_EDGE {
            let parent = common_parent(&self.paths);
            self.paths = BTreeSet::from([parent]);
        }
    }
}

/// Writes the learnt rules for review, 0600 like the state (they name workloads, hosts and
/// credential fingerprints).
pub fn write_learn_out(
    path: &std::path::Path,
    rules: &RulesFile,
    mode: Mode,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let yaml = serde_yaml_ng::to_string(rules)?;
    let header = format!(
        "# Learnt by `monitor` ({} mode) from the traffic it saw: review before committing.\n\
         # Workload names were derived from cgroups or executables; rename them freely.\n",
        match mode {
            Mode::Learn => "learn",
            Mode::Enforce => "enforce",
        }
    );
    super::state::write_private(path, (header + &yaml).as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

impl Graph {
    pub fn observe(&mut self, obs: &Obs) {
        let key = (obs.source.clone(), obs.destination.clone());
        let rec = obs.rec;
        let method = rec.method.to_ascii_uppercase();
        let full = match self.edges.get(&key) {
            None => self.edges.len() >= MAX_EDGES,
            Some(e) => !e.methods.contains(&method) && e.methods.len() >= MAX_METHODS_PER_EDGE,
        };
        if full {
            self.not_learnt += 1;
            return;
        }
        // A request whose path has no normal form teaches nothing (learning its edge without
        // a path would allow every path), nor its workload or destination: each of those
        // comes with an edge, which bounds them.
        let learnt = if rec.path.is_empty() {
            None
        } else {
            match prefix(&rec.path) {
                Some(p) => Some(p),
                None => {
                    self.unnormalisable_paths += 1;
                    return;
                }
            }
        };
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
        // Addresses, ports and hosts of one destination are bounded too (a name that
        // resolves to ever new addresses would grow them).
        if let Some(e) = &rec.destination {
            if d.ips.len() < MAX_PER_DESTINATION {
                d.ips.insert(e.ip.to_string());
            }
            if d.ports.len() < MAX_PER_DESTINATION {
                d.ports.insert(e.port);
            }
        }
        if let Some(h) = &rec.host
            && d.hosts.len() < MAX_PER_DESTINATION
        {
            d.hosts
                .insert(h.split(':').next().unwrap_or(h).to_ascii_lowercase());
        }
        let e = self.edges.entry(key).or_default();
        e.methods.insert(method);
        match learnt {
            Some(p) => e.add_path(p),
            None => e.pathless = true,
        }
    }

    /// The rules in force extended with what was learnt (bindings from `bindings`).
    pub fn to_rules(&self, base: &RulesFile, bindings: &[(&str, &str, &str)]) -> RulesFile {
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
        for ((from, to), seen) in &self.edges {
            let (from, to) = (rename(from), rename(to));
            if have.contains(&(from.clone(), to.clone()))
                || !out.workloads.iter().any(|w| w.name == from)
            {
                continue;
            }
            out.edges.push(Edge {
                from,
                to,
                methods: seen.methods.iter().cloned().collect(),
                paths: if seen.pathless {
                    Vec::new()
                } else {
                    seen.paths.iter().cloned().collect()
                },
            });
        }
        let bound: BTreeSet<String> = base
            .credentials
            .iter()
            .filter_map(|c| c.matcher.fingerprint.clone())
            .collect();
        for &(fp, workload, kind) in bindings {
            let w = rename(workload);
            // The rules checker refuses anything but 32 hex digits.
            if !super::state::valid_fingerprint(fp)
                || bound.contains(fp)
                || !out.workloads.iter().any(|x| x.name == w)
            {
                continue;
            }
            out.credentials.push(CredentialRule {
                name: format!("{w}-{kind}-{}", short_fp(fp)),
                matcher: CredentialMatch {
                    fingerprint: Some(fp.to_string()),
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
        assert_eq!(prefix("/api/v1/x?y=1").as_deref(), Some("/api/"));
        assert_eq!(prefix("/health").as_deref(), Some("/health"));
        assert_eq!(prefix("/api/").as_deref(), Some("/api/"));
        assert_eq!(prefix("/").as_deref(), Some("/"));
        assert_eq!(prefix("/x/../api/%2e/v1").as_deref(), Some("/api/"));
    }

    #[test]
    fn multibyte_and_invalid_paths_never_panic() {
        for p in [
            "é/x",
            "\u{FFFD}",
            "\u{FFFD}/a",
            "/é",
            "ü",
            "/..",
            "/%2e%2e/admin",
            "*",
        ] {
            let _ = prefix(p);
        }
        assert_eq!(prefix("/é/x").as_deref(), Some("/é/"));
        assert_eq!(prefix("é/x"), None);
    }

    #[test]
    fn prefixes_per_edge_are_bounded() {
        let mut e = SeenEdge::default();
        e.add_path("/api/".into());
        e.add_path("/api/".into());
        assert_eq!(e.paths.len(), 1);
        for i in 0..MAX_PREFIXES_PER_EDGE - 1 {
            e.add_path(format!("/p{i}"));
        }
        assert_eq!(e.paths.len(), MAX_PREFIXES_PER_EDGE);
        e.add_path("/one-more/".into());
        assert_eq!(e.paths, BTreeSet::from(["/".to_string()]));
        // Everything is under `/` now: the set stays at one.
        e.add_path("/z/".into());
        assert_eq!(e.paths.len(), 1);
        assert_eq!(
            common_parent(&BTreeSet::from(["/a/b/".to_string(), "/a/c".to_string()])),
            "/a/"
        );
    }
}
