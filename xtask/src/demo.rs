//! `cargo xtask demo`: a shop of four workloads in their own cgroups, legitimate TLS calls
//! with per-workload tokens, then an intruder replaying the payments token and payments
//! calling an endpoint off its graph; the alerts are shown as they arrive. Cleans up after
//! itself (namespaces, cgroups, servers).

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;
use testbed::{Cgroup, Lab, Nginx};

const WORKLOADS: [&str; 4] = ["payments", "orders", "reports", "intruder"];

fn token(workload: &str) -> String {
    use std::time::SystemTime;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let b64 = |s: &str| {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut o = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..=c.len() {
                o.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        o
    };
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"iss":"https://sts.shop.example","sub":"spiffe://shop/{workload}","iat":{now},"exp":{}}}"#,
            now + 900
        )),
        testbed::random_hex(32)
    )
}

pub fn demo() -> Result<()> {
    testbed::require_root_and_tools(&["nginx", "curl", "openssl", "ip", "ss"]);
    crate::run(crate::cargo().args(["build", "--release", "-p", "monitor"]))?;
    let monitor = crate::root().join("target/release/monitor");

    println!(
        "== setting up: a server host and a client host (network namespaces), one cgroup per workload"
    );
    let tag = testbed::tag();
    let lab = Lab::new(&tag);
    let server_cg = Cgroup::new(&format!("monitor-demo-{tag}-server"));
    let nginx = Nginx::start(&lab, &server_cg);
    let parent = Cgroup::new("monitor-demo");
    let cgroups: Vec<Cgroup> = WORKLOADS
        .iter()
        .map(|w| Cgroup::new(&format!("monitor-demo/{w}")))
        .collect();

    let rules = tempfile::tempdir()?;
    for f in ["rules/detections.yaml", "rules/examples/shop.yaml"] {
        let src = crate::root().join(f);
        fs::copy(
            &src,
            rules.path().join(src.file_name().context("file name")?),
        )?;
    }
    let key = tempfile::tempdir()?;
    println!("== starting the monitor with rules/detections.yaml + rules/examples/shop.yaml");
    let mut child = Command::new(&monitor)
        .args([
            "run",
            "--print",
            "alerts",
            "--node",
            "demo-node",
            "--key-file",
        ])
        .arg(key.path().join("key"))
        .arg("--rules")
        .arg(rules.path())
        .env("MONITOR_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("stdout")?;
    thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let stderr = child.stderr.take().context("stderr")?;
    let (rtx, rrx) = mpsc::channel::<()>();
    thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.contains("monitor ready") {
                let _ = rtx.send(());
            }
        }
    });
    // Readiness is logged at info; with MONITOR_LOG=warn wait for the probes by time instead.
    let _ = rrx.recv_timeout(Duration::from_secs(3));

    let tokens: Vec<String> = WORKLOADS.iter().map(|w| token(w)).collect();
    let curl = |who: usize, url: &str, tok: &str| -> Result<()> {
        let method = if url.contains("/api/ledger") {
            "POST"
        } else {
            "GET"
        };
        let auth = format!("Authorization: Bearer {tok}");
        let argv = testbed::curl_args(&lab, &nginx, &[auth], &["-X", method], url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        println!(
            "   {:<9} {} {url}",
            WORKLOADS[who],
            if who == 3 { "->" } else { "  " }
        );
        let st = cgroups[who].spawn(&lab.client_ns, &argv).wait()?;
        anyhow::ensure!(st.success(), "curl failed");
        Ok(())
    };
    println!("== legitimate traffic, each workload with its own token");
    curl(0, "https://orders.shop.test/api/orders", &tokens[0])?;
    curl(0, "https://ledger.shop.test/api/ledger", &tokens[0])?;
    curl(1, "https://ledger.shop.test/api/balance", &tokens[1])?;
    curl(2, "https://orders.shop.test/api/reports/daily", &tokens[2])?;
    thread::sleep(Duration::from_millis(500));
    println!(
        "== attack: the intruder replays the payments token; payments calls an endpoint off its graph"
    );
    curl(3, "https://orders.shop.test/api/orders", &tokens[0])?;
    curl(0, "https://admin.shop.test/admin/users", &tokens[0])?;

    println!("== alerts");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let a: Value = serde_json::from_str(&line).unwrap_or_default();
            n += 1;
            println!(
                "   [{:<8}] {:<21} {}\n              source={} destination={} fingerprint={} owner={}",
                a["severity"].as_str().unwrap_or(""),
                a["rule"].as_str().unwrap_or(""),
                a["summary"].as_str().unwrap_or(""),
                a["source"]["workload"].as_str().unwrap_or(""),
                a["destination"]["workload"].as_str().unwrap_or(""),
                a["credential"]["fingerprint"].as_str().unwrap_or(""),
                a["owner"]["team"].as_str().unwrap_or("-"),
            );
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    println!("== {n} alerts; cleaning up");
    drop(cgroups);
    drop(parent);
    drop(nginx);
    drop(server_cg);
    drop(lab);
    Ok(())
}
