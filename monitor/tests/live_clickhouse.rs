//! `monitor run --clickhouse-url` end to end (root): real TLS and plaintext requests from two
//! workloads in the testbed, the real kernel programs, a live ClickHouse (chdb-core, as in
//! tests/clickhouse.rs) killed and restarted while the monitor runs. Every request and alert
//! lands once, and no secret reaches any table, the log or the spool.

mod common;
mod common_ch;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use common_ch::Server;
use serde_json::Value;

const TOOLS: &[&str] = &["nginx", "curl", "openssl", "ip", "ss"];
const NODE: &str = "node-live";
const DB: &str = "live";
/// Requests per phase (one curl, one connection, a URL glob).
const N: usize = 20;

/// One query over HTTP, the answer as text; panics on an error.
fn query(server: &Server, sql: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--data-binary",
            sql,
            &server.url(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{sql}: {text}");
    text
}

fn count(server: &Server, sql: &str) -> u64 {
    query(server, sql).trim().parse().unwrap_or(0)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what} not within {limit:?}");
        sleep(Duration::from_millis(200));
    }
    eprintln!("{what} after {:.1}s", t.elapsed().as_secs_f64());
}

/// Batch files waiting in the spool, by table.
fn spooled(dir: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".jsonl")
            && let Some(table) = stem.split('.').nth(1)
        {
            *m.entry(table.to_string()).or_default() += 1;
        }
    }
    m
}

/// Every row of every table of the database, as JSON lines.
fn dump(server: &Server) -> String {
    let tables = query(
        server,
        &format!("SELECT name FROM system.tables WHERE database = '{DB}' ORDER BY name"),
    );
    let mut all = String::new();
    for t in tables.lines() {
        all.push_str(&query(
            server,
            &format!("SELECT * FROM {DB}.{t} FORMAT JSONEachRow"),
        ));
    }
    all
}

#[test]
fn run_writes_records_and_alerts_to_clickhouse_through_an_outage_every_row_once() {
    let _g = serial();
    require_root_and_tools(TOOLS);
    let server = Server::start();
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let nginx = Nginx::start(&lab, &server_cg);
    let payments = Cgroup::new(&format!("monitor-test-{t}-payments"));
    let intruder = Cgroup::new(&format!("monitor-test-{t}-intruder"));
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_str().unwrap().to_string();
    let token = format!("tok-{}", random_hex(24));
    let plain_token = format!("tok-{}", random_hex(24));
    // An unreachable API whose URL carries a password: it must not be logged either.
    let kube_canary = format!("kubepw-{}", random_hex(12));
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kube_api = format!("http://monitor:{kube_canary}@127.0.0.1:{dead_port}");
    let url = server.url();
    let m = Monitor::start_wrapped(
        // The HTTP clients asked to trace: the cap keeps them from logging URLs and headers.
        &[
            "env",
            "MONITOR_LOG=info,ureq=trace,ureq_proto=trace,hyper=trace,hyper_util=trace,clickhouse=trace",
        ],
        &[
            "--clickhouse-url",
            &url,
            "--clickhouse-database",
            DB,
            "--spool-dir",
            &spool_dir,
            "--node",
            NODE,
            "--cgroup",
            &payments.path,
            "--cgroup",
            &intruder.path,
            "--print",
            "alerts",
            "--kube-api",
            &kube_api,
        ],
        None,
    );
    let curl = |who: &Cgroup, tok: &str, url: &str| {
        let argv = curl_args(
            &lab,
            &nginx,
            &[format!("Authorization: Bearer {tok}")],
            &[],
            url,
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert!(
            who.spawn(&lab.client_ns, &argv).wait().unwrap().success(),
            "curl {url} failed"
        );
    };
    let flows = || {
        count(
            &server,
            &format!("SELECT count() FROM {DB}.flows WHERE path LIKE '/live/%'"),
        )
    };

    // Server up: payments' requests over TLS, and one in cleartext.
    curl(
        &payments,
        &token,
        &format!("https://server.test/live/a/[1-{N}]"),
    );
    curl(&payments, &plain_token, "http://server.test/live/plain");
    wait_for(
        "the first requests in ClickHouse",
        Duration::from_secs(30),
        || flows() == N as u64 + 1,
    );

    // Server down: the intruder replays payments' token; everything waits in the spool.
    server.kill();
    curl(
        &intruder,
        &token,
        &format!("https://server.test/live/b/[1-{N}]"),
    );
    wait_for(
        "flows and alerts spooled during the outage",
        Duration::from_secs(30),
        || {
            let s = spooled(spool.path());
            s.contains_key("flows") && s.contains_key("alerts")
        },
    );
    eprintln!("spooled during the outage: {:?}", spooled(spool.path()));

    // Server back: the spool drains; more requests go straight in.
    eprintln!("{}", server.up());
    wait_for("the spool drained", Duration::from_secs(60), || {
        spooled(spool.path()).is_empty()
    });
    curl(
        &payments,
        &token,
        &format!("https://server.test/live/c/[1-{N}]"),
    );
    let fp = m.fingerprint(&token);
    let fp_plain = m.fingerprint(&plain_token);
    let out = m.stop();

    // Every request once.
    let per_phase = query(
        &server,
        &format!(
            "SELECT splitByChar('/', path)[3] AS phase, count(), uniqExact(path) FROM {DB}.flows \
             WHERE path LIKE '/live/%' GROUP BY phase ORDER BY phase FORMAT CSV"
        ),
    );
    assert_eq!(
        per_phase,
        format!("\"a\",{N},{N}\n\"b\",{N},{N}\n\"c\",{N},{N}\n\"plain\",1,1\n"),
        "flows per phase (count, distinct paths)"
    );
    let obs = query(
        &server,
        &format!(
            "SELECT fingerprint, count(), uniqExact(path) FROM {DB}.credential_observations \
             WHERE path LIKE '/live/%' GROUP BY fingerprint ORDER BY count() DESC FORMAT CSV"
        ),
    );
    assert_eq!(
        obs,
        format!("\"{fp}\",{},{}\n\"{fp_plain}\",1,1\n", 3 * N, 3 * N),
        "credential observations"
    );
    // Bindings: payments bound the token first.
    let bound = query(
        &server,
        &format!(
            "SELECT argMin(workload, first_seen), argMin(node, first_seen) \
             FROM {DB}.credential_bindings WHERE fingerprint = '{fp}' FORMAT CSV"
        ),
    );
    assert_eq!(
        bound.trim(),
        format!("\"cgroup:{}\",\"{NODE}\"", payments.path)
    );

    // Every alert the monitor printed is in ClickHouse, once.
    let printed: Vec<&Value> = out.records.iter().collect();
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for a in &printed {
        let k = (
            a["rule"].as_str().unwrap().to_string(),
            a["id"].as_str().unwrap().to_string(),
        );
        let c = a["count"].as_u64().unwrap();
        let e = want.entry(k).or_default();
        *e = (*e).max(c);
    }
    let rules: Vec<&str> = want.keys().map(|(r, _)| r.as_str()).collect();
    assert!(rules.contains(&"token-replay"), "{printed:#?}");
    assert!(rules.contains(&"cleartext-credential"), "{printed:#?}");
    let stored = query(
        &server,
        &format!("SELECT rule, id, count FROM {DB}.alerts FINAL ORDER BY rule, id FORMAT CSV"),
    );
    let got: BTreeMap<(String, String), u64> = stored
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                (
                    f[0].trim_matches('"').to_string(),
                    f[1].trim_matches('"').to_string(),
                ),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want, "alerts in ClickHouse vs printed");
    let rows = count(&server, &format!("SELECT count() FROM {DB}.alerts"));
    assert!(
        rows <= printed.len() as u64,
        "{rows} alert rows for {} alerts printed: some were inserted twice",
        printed.len()
    );
    let replay = query(
        &server,
        &format!(
            "SELECT source_workload, first_seen_by, source_node FROM {DB}.alerts FINAL \
             WHERE rule = 'token-replay' AND credential_fingerprint = '{fp}' FORMAT CSV"
        ),
    );
    assert_eq!(
        replay,
        format!(
            "\"cgroup:{}\",\"cgroup:{}\",\"{NODE}\"\n",
            intruder.path, payments.path
        )
    );

    // The writer's own account: the outage was met by the spool, nothing lost or left.
    let ch = &out.summary["outputs"]["clickhouse"];
    eprintln!("clickhouse summary: {ch}");
    assert_eq!(ch["dropped"], 0, "{ch}");
    assert_eq!(ch["shed_rows"], 0, "{ch}");
    assert_eq!(ch["spool_rows"], 0, "{ch}");
    assert!(ch["errors"].as_u64().unwrap() > 0, "{ch}");
    assert!(ch["batches_from_spool"].as_u64().unwrap() > 0, "{ch}");
    assert!(spooled(spool.path()).is_empty());

    // No secret anywhere: every column of every table, the log, the files, the spool.
    let all = dump(&server);
    assert!(all.contains(&fp), "the dump holds the rows");
    for secret in [&token, &plain_token, &kube_canary] {
        assert!(!all.contains(secret.as_str()), "a secret in ClickHouse");
        out.assert_no_secret(secret);
        assert!(!dir_text(spool.path()).contains(secret.as_str()));
    }
    assert!(
        out.stderr.contains("Kubernetes API unreachable"),
        "{}",
        out.stderr
    );
    assert_eq!(out.events_lost(), 0);
}
