//! Checks against what was seen before: `token-replay` (a credential bound to, or first seen
//! with, one workload presented by another, on this node or any other), `shared-credential`
//! (more distinct workloads than allowed) and `concurrent-use` (two users within a window).

use std::time::Duration;

use serde_json::json;

use super::{Detector, Finding, Obs, default_severity, rfc3339, short_fp, state::CredState};
use crate::{credential::Credential, rules::CredentialRule};

pub const DEFAULT_MAX_WORKLOADS: usize = 2;
pub const DEFAULT_CONCURRENCY_WINDOW: Duration = Duration::from_secs(10);

pub fn check(
    d: &mut Detector,
    cr: Option<&CredentialRule>,
    obs: &Obs,
    c: &Credential,
    out: &mut Vec<Finding>,
) {
    let fp = &c.fingerprint;
    let now = obs.time_ns;
    let remote = d.shared().and_then(|s| s.get(fp));
    let state = d.state_mut();
    let local = state.creds.get(fp).cloned();
    let names = &mut state.names;
    let (source, node) = (names.get(&obs.source), names.get(obs.node));
    // The owner: the rules' binding, else whoever used it first (here or on another node).
    let first = match (&local, &remote) {
        (Some(l), Some(r)) if r.first_seen_ns < l.first_seen_ns => {
            Some((names.get(&r.workload), names.get(&r.node), r.first_seen_ns))
        }
        (Some(l), _) => Some((
            l.first_workload.clone(),
            l.first_node.clone(),
            l.first_seen_ns,
        )),
        (None, Some(r)) => Some((names.get(&r.workload), names.get(&r.node), r.first_seen_ns)),
        (None, None) => None,
    };
    let owner = cr
        .and_then(|r| r.bound_to.as_deref())
        .map(|w| (names.get(w), names.get("rules"), 0))
        .or(first.clone());
    if let Some((ow, onode, ons)) = &owner
        && **ow != *obs.source
    {
        let how = if &**onode == "rules" {
            "bound by the rules".to_string()
        } else {
            format!("first seen on {onode} at {}", rfc3339(*ons))
        };
        out.push(Finding {
            rule: "token-replay",
            severity: default_severity("token-replay"),
            summary: format!("credential {} of {ow} ({how}) presented by {} to {}", short_fp(fp), obs.source, obs.destination),
            expected: json!({"workload": &**ow, "binding": if &**onode == "rules" { "rules" } else { "first-seen" }}),
            first_seen: (*ons > 0).then(|| (*ons, ow.to_string())),
        });
    }
    let mut st = local.unwrap_or_else(|| {
        let (w, n, t) = first
            .clone()
            .unwrap_or_else(|| (source.clone(), node.clone(), now));
        CredState {
            first_workload: w,
            first_node: n,
            first_seen_ns: t,
            users: Vec::new(),
            distinct_workloads: 0,
            kind: None,
        }
    });
    if st.kind.as_deref() != Some(c.kind) {
        st.kind = Some(d.state_mut().names.get(c.kind));
    }
    let window = d
        .rules()
        .setting("concurrent-use")
        .window
        .unwrap_or(DEFAULT_CONCURRENCY_WINDOW)
        .as_nanos() as u64;
    let others: Vec<&(super::state::Name, super::state::Name, u64)> = st
        .users
        .iter()
        .filter(|u| (u.0 != source || u.1 != node) && now.saturating_sub(u.2) < window)
        .collect();
    if !others.is_empty() {
        out.push(Finding {
            rule: "concurrent-use",
            severity: default_severity("concurrent-use"),
            summary: format!(
                "credential {} used by {} on {} while {} used it within {}",
                short_fp(fp),
                obs.source,
                obs.node,
                others.iter().map(|u| format!("{} on {}", u.0, u.1)).collect::<Vec<_>>().join(", "),
                humantime::format_duration(Duration::from_nanos(window))
            ),
            expected: json!({"max_concurrent_users": 1, "window": humantime::format_duration(Duration::from_nanos(window)).to_string()}),
            first_seen: Some((st.first_seen_ns, st.first_workload.to_string())),
        });
    }
    let was_new = st.users.is_empty() && st.distinct_workloads == 0;
    st.touch(&source, &node, now);
    let max = d
        .rules()
        .setting("shared-credential")
        .max_workloads
        .unwrap_or(DEFAULT_MAX_WORKLOADS);
    if st.distinct_workloads > max {
        out.push(Finding {
            rule: "shared-credential",
            severity: default_severity("shared-credential"),
            summary: format!(
                "credential {} used by {} distinct workloads (max {max}), now {}",
                short_fp(fp),
                st.distinct_workloads,
                obs.source
            ),
            expected: json!({"max_workloads": max}),
            first_seen: Some((st.first_seen_ns, st.first_workload.to_string())),
        });
    }
    // Publish only bindings made here; one learnt from another node is already shared.
    if was_new
        && remote.is_none()
        && let Some(s) = d.shared()
    {
        s.publish(fp, &st.first_workload, &st.first_node, st.first_seen_ns);
    }
    d.state_mut().put(fp.clone(), st);
}
