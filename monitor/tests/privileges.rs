//! Least privilege (root, real kernel): the daemon runs with capabilities only, names the one
//! that is missing, and degrades to what the capabilities it has allow.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

/// `setpriv` arguments that leave exactly `caps` in the bounding set (root keeps uid 0, so
/// its effective set becomes these).
fn only(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        "--bounding-set".into(),
        format!("-all,{caps}"),
        "--".into(),
    ]
}

/// Runs `monitor run` with `caps` only; it must fail at once, naming `missing`.
fn refused_naming(caps: &str, missing: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("setpriv")
        .args(["--bounding-set", &format!("-all,{caps}"), "--"])
        .arg(env!("CARGO_BIN_EXE_monitor"))
        .args(["run", "--key-file"])
        .arg(dir.path().join("key"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran without {missing}:\n{err}");
    assert!(err.contains(&format!("missing {missing}")), "{err}");
    assert!(
        !err.contains("kernel programs loaded") && !err.contains("attached TLS probes"),
        "went on to load or attach:\n{err}"
    );
}

#[test]
fn without_cap_bpf_the_daemon_refuses_naming_it() {
    require_root_and_tools(&["setpriv"]);
    refused_naming("+perfmon,+sys_ptrace,+sys_resource", "CAP_BPF");
}

#[test]
fn without_cap_perfmon_the_daemon_refuses_naming_it() {
    require_root_and_tools(&["setpriv"]);
    refused_naming("+bpf,+sys_ptrace,+sys_resource", "CAP_PERFMON");
}

#[test]
fn without_cap_sys_admin_tls_probes_are_refused_by_name_and_plaintext_is_still_captured() {
    let _g = serial();
    require_root_and_tools(&["setpriv", "nginx", "curl", "ip"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);
    let wrapper = only("+bpf,+perfmon,+sys_ptrace,+sys_resource,+dac_read_search");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mon = Monitor::start_wrapped(&wrapper, &[], None);
    let tok = format!("tok-{}", random_hex(24));
    let fp = mon.fingerprint(&tok);
    let argv = curl_args(
        &lab,
        &nginx,
        &[format!("Authorization: Bearer {tok}")],
        &[],
        "http://server.test/least-privilege",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(
        client_cg
            .spawn(&lab.client_ns, &argv)
            .wait()
            .unwrap()
            .success()
    );
    let out = mon.stop();
    assert!(
        out.stderr.contains("needs CAP_SYS_ADMIN"),
        "no hint naming CAP_SYS_ADMIN:\n{}",
        out.stderr
    );
    // Said once, not once per library.
    assert_eq!(out.stderr.matches("needs CAP_SYS_ADMIN").count(), 1);
    let recs = out.find(&[
        ("/side", json!("client")),
        ("/path", json!("/least-privilege")),
    ]);
    assert_eq!(recs.len(), 1, "{:#?}", out.records);
    assert_eq!(recs[0]["tls"], json!(false));
    assert_eq!(recs[0]["credentials"][0]["fingerprint"], json!(fp));
    out.assert_no_secret(&tok);
}
