//! Checks of one credential on its own: `honeytoken`, `cleartext-credential`,
//! `expired-token`, `long-lived-token`, `human-identity`, `bound-token-mismatch`.

use std::time::Duration;

use serde_json::json;

use super::{Finding, Obs, default_severity, short_fp};
use crate::{
    credential::Credential,
    rules::{CredentialRule, Rules},
};

/// Clock skew tolerated before a token counts as expired.
const SKEW_SECS: i64 = 60;
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

fn finding(rule: &'static str, summary: String, expected: serde_json::Value) -> Finding {
    Finding {
        rule,
        severity: default_severity(rule),
        summary,
        expected,
        first_seen: None,
    }
}

/// None when the identity gives no such pattern, else whether `value` matches it.
fn glob_match(
    pattern: &Option<String>,
    compiled: &Option<globset::GlobMatcher>,
    value: Option<&str>,
) -> Option<bool> {
    pattern.as_ref()?;
    Some(crate::rules::pattern_matches(pattern, compiled, value))
}

pub fn check(
    rules: &Rules,
    cr: Option<&CredentialRule>,
    obs: &Obs,
    c: &Credential,
    out: &mut Vec<Finding>,
) {
    let rec = obs.rec;
    let fp = short_fp(&c.fingerprint);
    if cr.is_some_and(|r| r.honeytoken) {
        out.push(finding(
            "honeytoken",
            format!(
                "honeytoken {} ({}) used by {} towards {}",
                cr.map_or("", |r| r.name.as_str()),
                fp,
                obs.source,
                obs.destination
            ),
            json!({"uses": 0}),
        ));
    }
    if !rec.tls {
        let loopback = rec.destination.as_ref().is_some_and(|d| d.ip.is_loopback());
        if !loopback
            || rules
                .setting("cleartext-credential")
                .include_loopback
                .unwrap_or(false)
        {
            out.push(finding(
                "cleartext-credential",
                format!(
                    "{} credential {fp} sent without TLS by {} to {}",
                    c.kind, obs.source, obs.destination
                ),
                json!({"tls": true}),
            ));
        }
    }
    let now = (obs.time_ns / 1_000_000_000) as i64;
    if let Some(cl) = c.claims.as_deref() {
        if let Some(exp) = cl.exp
            && exp + SKEW_SECS < now
        {
            out.push(finding(
                "expired-token",
                format!(
                    "token {fp} (sub {}) expired {} s ago, presented by {}",
                    cl.sub.as_deref().unwrap_or("?"),
                    now - exp,
                    obs.source
                ),
                json!({"exp": exp, "not_after": super::rfc3339(exp.max(0) as u64 * 1_000_000_000)}),
            ));
        }
        let max = cr
            .and_then(|r| r.max_lifetime)
            .or(rules.setting("long-lived-token").max_lifetime)
            .unwrap_or(DEFAULT_MAX_LIFETIME);
        if let (Some(exp), Some(iat)) = (cl.exp, cl.iat)
            && exp - iat > max.as_secs() as i64
        {
            out.push(finding(
                "long-lived-token",
                format!("token {fp} lives {} (max {}), presented by {}", humantime::format_duration(Duration::from_secs((exp - iat).max(0) as u64)), humantime::format_duration(max), obs.source),
                json!({"max_lifetime": humantime::format_duration(max).to_string(), "lifetime_secs": exp - iat}),
            ));
        }
        if let Some(k) = &cl.kubernetes {
            bound_mismatch(rules, obs, fp, k, out);
        }
    }
    for h in &rules.human_identities {
        let cl = c.claims.as_deref();
        let checks = [
            glob_match(
                &h.issuer,
                &h.compiled.issuer,
                cl.and_then(|c| c.iss.as_deref()),
            ),
            glob_match(
                &h.subject,
                &h.compiled.subject,
                cl.and_then(|c| c.sub.as_deref()),
            ),
            glob_match(&h.user, &h.compiled.third, c.user.as_deref()),
        ];
        let given: Vec<bool> = checks.into_iter().flatten().collect();
        if !given.is_empty() && given.iter().all(|b| *b) {
            let who = cl
                .and_then(|c| c.sub.clone())
                .or_else(|| c.user.clone())
                .unwrap_or_default();
            out.push(finding(
                "human-identity",
                format!("human identity {who} used by {} for a service call to {}", obs.source, obs.destination),
                json!({"identity": "service", "human_pattern": {"issuer": h.issuer, "subject": h.subject, "user": h.user}}),
            ));
            break;
        }
    }
}

/// A self-describing token (Kubernetes projected service account token) names the pod,
/// service account and node it was issued to; the presenter must be that.
fn bound_mismatch(
    rules: &Rules,
    obs: &Obs,
    fp: &str,
    k: &crate::credential::jwt::KubernetesClaims,
    out: &mut Vec<Finding>,
) {
    let mut diffs = Vec::new();
    if let Some(node) = &k.node
        && node != obs.node
        && super::workload::is_client_side(obs.rec)
    {
        diffs.push(format!("node {node} ≠ {}", obs.node));
    }
    // The pod the process really runs in (from the API), when known: a projected token names
    // its pod, so a token presented from another pod was carried there.
    if let Some(pod) = obs
        .rec
        .pod
        .as_deref()
        .filter(|_| super::workload::is_client_side(obs.rec))
    {
        for (what, tok, have) in [
            ("namespace", &k.namespace, Some(&pod.namespace)),
            (
                "serviceaccount",
                &k.serviceaccount,
                pod.service_account.as_ref(),
            ),
            ("pod", &k.pod, Some(&pod.name)),
            ("pod uid", &k.pod_uid, Some(&pod.uid)),
        ] {
            if let (Some(t), Some(h)) = (tok, have)
                && t != h
            {
                diffs.push(format!("{what} {t} ≠ {h}"));
            }
        }
    } else if let Some(id) = rules
        .workloads
        .iter()
        .find(|w| w.name == obs.source)
        .and_then(|w| w.identity.as_ref())
    {
        for (what, tok, have) in [
            ("namespace", &k.namespace, &id.namespace),
            ("serviceaccount", &k.serviceaccount, &id.service_account),
            ("pod", &k.pod, &id.pod),
        ] {
            if let (Some(t), Some(h)) = (tok, have)
                && t != h
            {
                diffs.push(format!("{what} {t} ≠ {h}"));
            }
        }
    }
    if !diffs.is_empty() {
        out.push(Finding {
            rule: "bound-token-mismatch",
            severity: default_severity("bound-token-mismatch"),
            summary: format!(
                "token {fp} bound to another identity presented by {}: {}",
                obs.source,
                diffs.join(", ")
            ),
            expected: serde_json::to_value(k).unwrap_or_default(),
            first_seen: None,
        });
    }
}
