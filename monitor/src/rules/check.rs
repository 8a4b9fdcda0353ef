//! Parsing and semantic checks with positions. YAML errors carry serde's location; a
//! semantic error (an unknown workload in an edge, a bad CIDR) is located at the offending
//! value's text in the file.

use std::path::{Path, PathBuf};

use super::*;

pub fn parse(file: &Path, text: &str) -> Result<RulesFile, RuleError> {
    serde_yaml_ng::from_str::<Option<RulesFile>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            // serde_yaml_ng prefixes the message with its own "at line X column Y": keep only ours.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            RuleError {
                file: file.to_path_buf(),
                line,
                column,
                message: msg,
            }
        })
}

/// Line and column (1-based) of the first `needle` at or after the first `anchor`.
fn locate(text: &str, anchor: &str, needle: &str) -> (usize, usize) {
    let start = text.find(anchor).unwrap_or(0);
    let at = text[start..]
        .find(needle)
        .map(|i| start + i)
        .or_else(|| text.find(needle))
        .unwrap_or(0);
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<RuleError>,
}

impl Ctx<'_> {
    fn err(&mut self, anchor: &str, needle: &str, message: String) {
        let (line, column) = locate(self.text, anchor, needle);
        self.errors.push(RuleError {
            file: self.file.to_path_buf(),
            line,
            column,
            message,
        });
    }
}

pub fn compile(files: Vec<(PathBuf, String, RulesFile)>) -> Result<Rules, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut rules = Rules::default();
    let mut merged = RulesFile::default();
    let mut mode_seen = false;
    // Names first, across files, so edges may refer to workloads defined in another file.
    let workload_names: Vec<String> = files
        .iter()
        .flat_map(|(_, _, r)| r.workloads.iter().map(|w| w.name.clone()))
        .collect();
    let dest_names: Vec<String> = files
        .iter()
        .flat_map(|(_, _, r)| r.destinations.iter().map(|d| d.name.clone()))
        .collect();
    for (file, text, r) in &files {
        let mut c = Ctx {
            file,
            text,
            errors: &mut errors,
        };
        if let Some(m) = r.mode {
            if mode_seen && m != rules.mode {
                c.err(
                    "mode:",
                    "mode:",
                    "`mode` is set differently in two files".into(),
                );
            }
            rules.mode = m;
            mode_seen = true;
        }
        for w in &r.workloads {
            if workload_names.iter().filter(|n| **n == w.name).count() > 1 {
                c.err(
                    "workloads:",
                    &format!("name: {}", w.name),
                    format!("workload `{}` is defined more than once", w.name),
                );
            }
            let mut cw = CompiledWorkload {
                name: w.name.clone(),
                cgroup: None,
                exe: None,
                comm: w.selector.comm.clone(),
                nets: Vec::new(),
                unit: None,
                namespace: None,
                pod: None,
                service_account: None,
                labels: w.selector.labels.clone(),
                pod_owner: None,
                owner: w.owner.clone(),
                identity: w.identity.clone(),
            };
            if let Some(o) = &w.selector.owner
                && o.split_once('/')
                    .is_none_or(|(k, n)| k.is_empty() || n.is_empty())
            {
                c.err(
                    &format!("name: {}", w.name),
                    &format!("owner: {o}"),
                    format!(
                        "workload `{}` owner: expected `Kind/name` such as `Deployment/checkout`, got `{o}`",
                        w.name
                    ),
                );
            }
            for (field, pat, slot) in [
                ("cgroup", &w.selector.cgroup, &mut cw.cgroup),
                ("exe", &w.selector.exe, &mut cw.exe),
                ("unit", &w.selector.unit, &mut cw.unit),
                ("namespace", &w.selector.namespace, &mut cw.namespace),
                ("pod", &w.selector.pod, &mut cw.pod),
                (
                    "service_account",
                    &w.selector.service_account,
                    &mut cw.service_account,
                ),
                ("owner", &w.selector.owner, &mut cw.pod_owner),
            ] {
                if let Some(p) = pat {
                    match glob(p) {
                        Ok(g) => *slot = Some(g),
                        Err(e) => c.err(
                            &format!("name: {}", w.name),
                            p,
                            format!("workload `{}` {field}: {e}", w.name),
                        ),
                    }
                }
            }
            for ip in &w.selector.ips {
                match parse_net(ip) {
                    Ok(n) => cw.nets.push(n),
                    Err(e) => c.err(
                        &format!("name: {}", w.name),
                        ip,
                        format!("workload `{}` ips: {e}", w.name),
                    ),
                }
            }
            if w.selector.is_empty() {
                c.err(&format!("name: {}", w.name), &w.name, format!("workload `{}` has an empty `match`: expected one of cgroup, exe, comm, unit, ips, namespace, pod, service_account, labels, owner", w.name));
            }
            rules.workloads.push(cw);
        }
        for d in &r.destinations {
            let mut cd = CompiledDestination {
                name: d.name.clone(),
                nets: Vec::new(),
                ports: d.ports.clone(),
                hosts: Vec::new(),
            };
            for ip in &d.ips {
                match parse_net(ip) {
                    Ok(n) => cd.nets.push(n),
                    Err(e) => c.err(
                        &format!("name: {}", d.name),
                        ip,
                        format!("destination `{}` ips: {e}", d.name),
                    ),
                }
            }
            for h in &d.hosts {
                match glob(&h.to_ascii_lowercase()) {
                    Ok(g) => cd.hosts.push(g),
                    Err(e) => c.err(
                        &format!("name: {}", d.name),
                        h,
                        format!("destination `{}` hosts: {e}", d.name),
                    ),
                }
            }
            if d.ips.is_empty() && d.hosts.is_empty() {
                c.err(
                    &format!("name: {}", d.name),
                    &d.name,
                    format!("destination `{}` needs `ips` or `hosts`", d.name),
                );
            }
            rules.destinations.push(cd);
        }
        for e in &r.edges {
            if !workload_names.contains(&e.from) {
                c.err(
                    "edges:",
                    &format!("from: {}", e.from),
                    format!(
                        "edge from `{}`: no such workload (expected one of: {})",
                        e.from,
                        workload_names.join(", ")
                    ),
                );
            }
            if !dest_names.contains(&e.to) && !workload_names.contains(&e.to) {
                c.err(
                    "edges:",
                    &format!("to: {}", e.to),
                    format!(
                        "edge to `{}`: no such destination (expected one of: {})",
                        e.to,
                        dest_names.join(", ")
                    ),
                );
            }
            for p in &e.paths {
                if p.contains(['?', '#']) || path::normalize(p).is_none() {
                    c.err(
                        "edges:",
                        p,
                        format!(
                            "edge from `{}` to `{}` path `{p}`: expected an absolute path prefix such as /api/ (no query, not climbing above /)",
                            e.from, e.to
                        ),
                    );
                }
            }
            for m in &e.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    c.err(
                        "edges:",
                        m,
                        format!("method `{m}`: expected an upper-case HTTP method such as GET"),
                    );
                }
            }
        }
        for cr in &r.credentials {
            if let Some(b) = &cr.bound_to
                && !workload_names.contains(b)
            {
                c.err(
                    "credentials:",
                    &format!("bound_to: {b}"),
                    format!("credential `{}` bound_to `{b}`: no such workload", cr.name),
                );
            }
            if let Some(fp) = &cr.matcher.fingerprint
                && (fp.len() != 32 || !fp.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                c.err(
                    "credentials:",
                    fp,
                    format!(
                        "credential `{}`: fingerprint must be 32 hex digits",
                        cr.name
                    ),
                );
            }
            for p in [
                &cr.matcher.issuer,
                &cr.matcher.subject,
                &cr.matcher.audience,
            ]
            .into_iter()
            .flatten()
            {
                if let Err(e) = glob(p) {
                    c.err("credentials:", p, format!("credential `{}`: {e}", cr.name));
                }
            }
            let m = &cr.matcher;
            if m.fingerprint.is_none()
                && m.kind.is_none()
                && m.issuer.is_none()
                && m.subject.is_none()
                && m.audience.is_none()
            {
                c.err("credentials:", &format!("name: {}", cr.name), format!("credential `{}` has an empty `match`: expected fingerprint, kind, issuer, subject or audience", cr.name));
            }
        }
        for h in &r.human_identities {
            for p in [&h.issuer, &h.subject, &h.user].into_iter().flatten() {
                if let Err(e) = glob(p) {
                    c.err("human_identities:", p, e);
                }
            }
        }
        if let Some(d) = &r.detections {
            for id in d.rules.keys() {
                if !RULE_IDS.contains(&id.as_str()) {
                    c.err(
                        "detections:",
                        &format!("{id}:"),
                        format!(
                            "unknown detection `{id}` (expected one of: {})",
                            RULE_IDS.join(", ")
                        ),
                    );
                }
            }
            if d.dedup_window.is_some() {
                rules.settings.dedup_window = d.dedup_window;
            }
            if d.max_tracked_credentials.is_some() {
                rules.settings.max_tracked_credentials = d.max_tracked_credentials;
            }
            if d.max_open_alerts.is_some() {
                rules.settings.max_open_alerts = d.max_open_alerts;
            }
            rules.settings.rules.extend(d.rules.clone());
        }
        // Compared in normal form with normalised request paths (rules::path).
        rules.edges.extend(r.edges.iter().cloned().map(|mut e| {
            for p in &mut e.paths {
                if let Some(n) = path::normalize(p) {
                    *p = n;
                }
            }
            e
        }));
        rules
            .credentials
            .extend(r.credentials.iter().cloned().map(|mut c| {
                let m = &c.matcher;
                c.compiled = ClaimGlobs::of(&m.issuer, &m.subject, &m.audience);
                c
            }));
        rules
            .human_identities
            .extend(r.human_identities.iter().cloned().map(|mut h| {
                h.compiled = ClaimGlobs::of(&h.issuer, &h.subject, &h.user);
                h
            }));
        merged.workloads.extend(r.workloads.iter().cloned());
        merged.destinations.extend(r.destinations.iter().cloned());
        merged.edges.extend(r.edges.iter().cloned());
        merged.credentials.extend(r.credentials.iter().cloned());
        merged
            .human_identities
            .extend(r.human_identities.iter().cloned());
        if r.detections.is_some() {
            merged.detections = r.detections.clone();
        }
        if r.mode.is_some() {
            merged.mode = r.mode;
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    rules.source = merged;
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(files: &[(&str, &str)]) -> Result<Rules, Vec<RuleError>> {
        let dir = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(dir.path().join(n), t).unwrap();
        }
        Rules::load(dir.path()).map_err(|es| {
            es.into_iter()
                .map(|mut e| {
                    e.file = PathBuf::from(e.file.file_name().unwrap());
                    e
                })
                .collect()
        })
    }

    const GOOD: &str = "mode: enforce
workloads:
  - name: payments
    match: { cgroup: \"/payments*\" }
    owner: { team: payments, contact: \"#pay\" }
destinations:
  - name: orders
    ips: [10.0.0.0/24]
    ports: [443]
edges:
  - { from: payments, to: orders, methods: [GET] }
detections:
  shared-credential: { max_workloads: 3, severity: medium }
  dedup_window: 10m
";

    #[test]
    fn loads_and_merges_files() {
        let r = load_str(&[("a.yaml", GOOD), ("b.yaml", "workloads:\n  - name: reports\n    match: { comm: report }\nedges:\n  - { from: reports, to: orders }\n")]).unwrap();
        assert_eq!(r.workloads.len(), 2);
        assert_eq!(r.edges.len(), 2);
        assert_eq!(r.setting("shared-credential").max_workloads, Some(3));
        assert_eq!(r.settings.dedup_window, Some(Duration::from_secs(600)));
        assert_eq!(r.owner_of("payments").unwrap().team, "payments");
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = load_str(&[(
            "bad.yaml",
            "workloads:\n  - name: x\n    match: { cgroup: [unclosed\n",
        )])
        .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].file, PathBuf::from("bad.yaml"));
        assert!(e[0].line >= 3, "{e:?}");
    }

    #[test]
    fn unknown_fields_are_located() {
        let e = load_str(&[(
            "bad.yaml",
            "workloads:\n  - name: x\n    matches: { comm: a }\n",
        )])
        .unwrap_err();
        assert_eq!((e[0].line, e[0].column), (3, 5), "{e:?}");
        assert!(
            e[0].message.contains("unknown field `matches`"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = "workloads:\n  - name: payments\n    match: { comm: pay }\nedges:\n  - from: paymnts\n    to: nowhere\ndestinations:\n  - name: d\n    ips: [10.0.0.300]\n";
        let e = load_str(&[("r.yaml", text)]).unwrap_err();
        let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.yaml:5:5: edge from `paymnts`: no such workload")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.yaml:6:5: edge to `nowhere`")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.yaml:9:11: destination `d` ips")),
            "{shown:#?}"
        );
    }

    #[test]
    fn bad_durations_and_unknown_detections() {
        let e = load_str(&[(
            "r.yaml",
            "detections:\n  concurrent-use: { window: soon }\n",
        )])
        .unwrap_err();
        assert!(e[0].message.contains("expected a duration"), "{e:?}");
        let e =
            load_str(&[("r.yaml", "detections:\n  token-reuse: { enabled: true }\n")]).unwrap_err();
        assert_eq!(e[0].line, 2);
        assert!(e[0].message.contains("unknown detection `token-reuse`"));
    }

    #[test]
    fn kubernetes_selectors_are_checked() {
        let r = load_str(&[(
            "k.yaml",
            "workloads:\n  - name: checkout\n    match: { namespace: shop, owner: Deployment/checkout, labels: { app: checkout } }\n",
        )])
        .unwrap();
        assert!(r.workloads[0].by_pod() && r.workloads[0].by_process());
        let e = load_str(&[(
            "k.yaml",
            "workloads:\n  - name: checkout\n    match: { owner: checkout }\n  - name: b\n    match: { namespace: \"[shop\" }\n",
        )])
        .unwrap_err();
        let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert!(
            shown
                .iter()
                .any(|s| s
                    .starts_with("k.yaml:3:14: workload `checkout` owner: expected `Kind/name`")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("k.yaml:5:26: workload `b` namespace: bad glob")),
            "{shown:#?}"
        );
    }

    #[test]
    fn shipped_rules_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        Rules::load(&dir).unwrap_or_else(|e| {
            panic!(
                "{:#?}",
                e.iter().map(ToString::to_string).collect::<Vec<_>>()
            )
        });
    }
}
