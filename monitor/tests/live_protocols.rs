//! Live protocol tests (root): real clients and servers of each protocol, captured by the real
//! kernel programs. HTTP/2 over TLS and cleartext (curl, nginx), Redis AUTH (redis-cli,
//! redis-server), PostgreSQL password login (psql, postgres).

mod common;

use std::{
    process::{Child, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};

fn secret() -> String {
    format!("pw-{}", random_hex(16))
}

fn wait_port(lab: &Lab, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sh(&format!("ip netns exec {} ss -ltnH", lab.server_ns)).contains(&format!(":{port} ")) {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        sleep(Duration::from_millis(100));
    }
}

fn one<'a>(out: &'a Output, protocol: &str, side: &str) -> &'a Value {
    let f = out.find(&[("/protocol", json!(protocol)), ("/side", json!(side))]);
    assert_eq!(
        f.len(),
        1,
        "expected one {protocol} {side} record: {:#?}",
        out.records
    );
    f[0]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn http2_over_tls_and_cleartext_are_reported_with_hpack_decoded_headers() {
    let _g = serial();
    require_root_and_tools(&["nginx", "curl", "ip", "ss"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let nginx = Nginx::start(&lab, &server_cg);
    let mon = Monitor::start(&["--print", "requests"]);
    let tok = format!("tok-{}", random_hex(20));
    let auth = format!("Authorization: Bearer {tok}");
    for (flag, url) in [
        ("--http2", "https://server.test:8443/h2/tls"),
        (
            "--http2-prior-knowledge",
            "http://server.test:8080/h2/clear",
        ),
    ] {
        // Two requests on one TLS connection: the second reuses HPACK's dynamic table. (curl
        // 7.88 against nginx 1.22 fails to reuse an h2c connection, monitor or not: one there.)
        let again: &[&str] = if url.starts_with("https") {
            &["-o", "/dev/null", url]
        } else {
            &[]
        };
        let extra: Vec<&str> = [flag].into_iter().chain(again.iter().copied()).collect();
        let argv = curl_args(&lab, &nginx, std::slice::from_ref(&auth), &extra, url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let o = client_cg.command(&lab.client_ns, &argv).output().unwrap();
        assert!(
            o.status.success(),
            "curl {flag} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();
    for (path, tls) in [("/h2/tls", true), ("/h2/clear", false)] {
        for side in ["client", "server"] {
            let recs = out.find(&[("/path", json!(path)), ("/side", json!(side))]);
            assert_eq!(
                recs.len(),
                if tls { 2 } else { 1 },
                "{side} {path}: {:#?}",
                out.records
            );
            for r in recs {
                assert_eq!(r["protocol"], "http/2");
                assert_eq!(r["tls"], json!(tls));
                assert_eq!(r["method"], "GET");
                assert_eq!(
                    r["host"],
                    json!(format!("server.test:{}", if tls { 8443 } else { 8080 }))
                );
                assert_eq!(r["credentials"][0]["fingerprint"], json!(fp));
            }
        }
    }
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&tok);
}

#[test]
fn redis_auth_is_reported_with_the_password_fingerprint() {
    let _g = serial();
    require_root_and_tools(&["redis-server", "redis-cli", "ip", "ss"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-redis"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let pw = secret();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "bind {}\nport 6379\nrequirepass {pw}\nsave \"\"\nappendonly no\ndir {}\n",
            lab.server_ip,
            dir.path().display()
        ),
    )
    .unwrap();
    let _redis = Killed(
        server_cg
            .command(&lab.server_ns, &["redis-server", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&lab, 6379, "redis-server");
    let mon = Monitor::start(&["--print", "requests"]);
    let st = client_cg
        .command(
            &lab.client_ns,
            &[
                "redis-cli",
                "-h",
                &lab.server_ip,
                "-a",
                &pw,
                "--no-auth-warning",
                "PING",
            ],
        )
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let fp = mon.fingerprint(&pw);
    let out = mon.stop();
    let r = one(&out, "redis", "client");
    assert_eq!(r["method"], "AUTH");
    assert_eq!(r["comm"], "redis-cli");
    assert_eq!(r["cgroup"], json!(client_cg.path));
    assert_eq!(r["destination"], json!({"ip": lab.server_ip, "port": 6379}));
    assert_eq!(r["credentials"][0]["kind"], "redis-auth");
    assert_eq!(r["credentials"][0]["fingerprint"], json!(fp));
    assert_eq!(
        one(&out, "redis", "server")["credentials"][0]["fingerprint"],
        json!(fp)
    );
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&pw);
}

/// The PostgreSQL server binaries (Debian keeps them out of PATH).
fn pg_bin(name: &str) -> String {
    let dirs = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is not installed: `cargo xtask setup`");
    let mut versions: Vec<_> = dirs.flatten().map(|e| e.path()).collect();
    versions.sort();
    versions
        .last()
        .expect("no postgresql version")
        .join("bin")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn postgres_password_login_is_reported_with_user_and_database() {
    let _g = serial();
    require_root_and_tools(&["psql", "runuser", "ip", "ss"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-pg"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let pw = secret();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().display().to_string();
    sh(&format!("chown postgres {d} && chmod 700 {d}"));
    sh(&format!(
        "runuser -u postgres -- {} -D {d}/db -U postgres --auth-local=trust --auth-host=password >/dev/null",
        pg_bin("initdb")
    ));
    sh(&format!(
        "echo \"listen_addresses = '{ip}'\nunix_socket_directories = '{d}'\npassword_encryption = 'scram-sha-256'\" >> {d}/db/postgresql.conf && \
         echo 'host all all 0.0.0.0/0 password' > {d}/db/pg_hba.conf && echo 'local all all trust' >> {d}/db/pg_hba.conf",
        ip = lab.server_ip
    ));
    let _pg = Killed(
        server_cg
            .command(
                &lab.server_ns,
                &[
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    &pg_bin("postgres"),
                    "-D",
                    &format!("{d}/db"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&lab, 5432, "postgres");
    sh(&format!(
        "ip netns exec {} runuser -u postgres -- psql -h {d} -U postgres -qc \"CREATE USER app PASSWORD '{pw}'\" -qc \"CREATE DATABASE shop OWNER app\" >/dev/null",
        lab.server_ns
    ));
    let mon = Monitor::start(&["--print", "requests"]);
    let url = format!(
        "host={} user=app dbname=shop sslmode=disable",
        lab.server_ip
    );
    let st = client_cg
        .command(
            &lab.client_ns,
            &[
                "env",
                &format!("PGPASSWORD={pw}"),
                "psql",
                &url,
                "-qAtc",
                "select 1",
            ],
        )
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "psql failed");
    let fp = mon.fingerprint(&pw);
    let out = mon.stop();
    let r = one(&out, "postgres", "client");
    assert_eq!(r["comm"], "psql");
    assert_eq!(r["database"], "shop");
    assert_eq!(r["destination"]["port"], 5432);
    assert_eq!(r["credentials"][0]["kind"], "postgres-password");
    assert_eq!(r["credentials"][0]["user"], "app");
    assert_eq!(r["credentials"][0]["fingerprint"], json!(fp));
    assert_eq!(out.events_lost(), 0);
    out.assert_no_secret(&pw);
}
