//! Probe sites chosen by decoding (root for the live part): Debian's libssl.so.3 gets its
//! SSL_write and SSL_read probes on emulated instructions inside the functions, not at their
//! entries, and requests are still reported whole, with flow and fingerprint, through them.

mod common;

use common::*;
use monitor::probe::{
    site::{self, Kind, Placement},
    target::{self, Stack},
};
use serde_json::json;

const LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

#[test]
fn debian_libssl_write_and_read_sites_are_emulated_not_the_entry() {
    let path = std::path::Path::new(LIBSSL);
    assert!(path.exists(), "install libssl3");
    let t = target::inspect(path).unwrap().expect("libssl is OpenSSL");
    assert_eq!(t.stack, Stack::Openssl);
    let file = std::fs::File::open(path).unwrap();
    let placed = site::plan_file(&file, &t);
    for function in ["SSL_write", "SSL_read"] {
        let of: Vec<_> = placed
            .iter()
            .filter(|p| p.point.symbol == function)
            .collect();
        for kind in [Kind::Entry, Kind::Return] {
            let p = of
                .iter()
                .find(|p| p.kind == kind)
                .unwrap_or_else(|| panic!("no {kind:?} probe for {function}: {of:#?}"));
            assert_eq!(p.placement, Placement::Emulated, "{p:#?}");
            assert!(p.point.offset > p.entry, "still at the entry: {p:#?}");
        }
        // No uretprobe left on them: the return is read at the instruction after the call.
        assert!(
            of.iter().all(|p| p.placement != Placement::Uretprobe),
            "{of:#?}"
        );
    }
    // The `_ex` forms have no emulated instruction between their call and `ret`: their
    // uretprobe stays, with the entry program at the same (first) instruction: one trap.
    for function in ["SSL_write_ex", "SSL_read_ex"] {
        let of: Vec<_> = placed
            .iter()
            .filter(|p| p.point.symbol == function)
            .collect();
        assert_eq!(of.len(), 2, "{of:#?}");
        assert!(of.iter().all(|p| p.point.offset == p.entry), "{of:#?}");
        assert!(of.iter().any(|p| p.placement == Placement::Uretprobe));
    }
}

#[test]
fn requests_are_reported_whole_through_the_chosen_sites() {
    let _g = serial();
    require_root_and_tools(&["nginx", "curl", "openssl", "ip", "python3"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);
    let mon = Monitor::start(&[]);
    let tok = format!("tok-{}", random_hex(24));
    // Large enough that the request takes more than one copy in the kernel.
    let filler = format!("X-Filler: {}", "f".repeat(6000));
    let argv = curl_args(
        &lab,
        &nginx,
        &[format!("Authorization: Bearer {tok}"), filler],
        &[],
        "https://server.test/sites/curl",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut child = client_cg.spawn(&lab.client_ns, &argv);
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "curl failed");
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();

    // curl (SSL_write) and nginx (SSL_read) both use Debian's libssl: their sites moved.
    for (function, program) in [
        ("SSL_write", "ssl_write_ex"),
        ("SSL_write", "ssl_write_ret_site"),
        ("SSL_read", "ssl_read_ex"),
        ("SSL_read", "ssl_read_ret_site"),
    ] {
        assert!(
            out.stderr.lines().any(|l| l.contains("probe site")
                && l.contains("libssl.so.3")
                && l.contains(&format!("function=\"{function}\""))
                && l.contains(&format!("program=\"{program}\""))
                && l.contains("placement=\"emulated\"")),
            "no emulated {program} site logged for {function}:\n{}",
            out.stderr
        );
    }
    for side in ["client", "server"] {
        let found = out.find(&[("/side", json!(side)), ("/path", json!("/sites/curl"))]);
        assert_eq!(found.len(), 1, "{side}: {:#?}", out.records);
        let r = found[0];
        assert_eq!(r["tls"], json!(true));
        assert_eq!(r["library"], json!("openssl"));
        assert_eq!(r["credentials"][0]["fingerprint"], json!(fp), "{r:#}");
        assert_eq!(r["source"]["ip"], json!(lab.client_ip), "{r:#}");
        assert_eq!(r["destination"]["ip"], json!(lab.server_ip), "{r:#}");
        assert_eq!(r["destination"]["port"], json!(443), "{r:#}");
        if side == "client" {
            assert_eq!(r["pid"], json!(pid), "{r:#}");
        }
    }
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}
