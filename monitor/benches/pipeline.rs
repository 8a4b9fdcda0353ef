//! Userspace pipeline throughput on a synthetic event log: parsed requests per second on one
//! core, and peak memory. Run with `cargo xtask bench pipeline`.
//!
//! The log mixes what a node sees: TLS (library) and plaintext (syscall) connections, requests
//! split over two chunks, pipelined requests, bearer JWTs, opaque bearer tokens, Basic auth
//! and responses, over many connections with rotating credentials.

use std::{
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use monitor::{
    credential::Fingerprinter,
    event::{Direction, Event, Flow, Kind, Source},
    pipeline::Pipeline,
};

struct Args {
    requests: usize,
    connections: usize,
    /// Also measure the full replay path (JSON lines + base64 decoding).
    json: bool,
}

fn args() -> Args {
    let mut a = Args {
        requests: 1_000_000,
        connections: 1000,
        json: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--requests" => {
                a.requests = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--requests N")
            }
            "--connections" => {
                a.connections = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--connections N")
            }
            "--no-json" => a.json = false,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Small deterministic generator (no external randomness: runs are comparable).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn jwt(rng: &mut Rng) -> String {
    let h = B64.encode(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
    let p = B64.encode(format!(
        r#"{{"iss":"https://issuer.test","sub":"system:serviceaccount:shop:svc-{}","aud":["api"],"exp":4102444800,"iat":1700000000}}"#,
        rng.next() % 50
    ));
    let s = B64.encode(rng.next().to_le_bytes().repeat(32));
    format!("{h}.{p}.{s}")
}

fn request(rng: &mut Rng, i: usize) -> String {
    let cred = match i % 4 {
        0 => format!("Authorization: Bearer {}", jwt(rng)),
        1 => format!("Authorization: Bearer tok-{:016x}", rng.next() % 5000),
        2 => format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "svc{}:pw{}",
                i % 20,
                rng.next() % 100
            ))
        ),
        _ => format!("Cookie: theme=dark; session={:032x}", rng.next() % 5000),
    };
    format!(
        "GET /api/v1/orders/{}?page=2 HTTP/1.1\r\nHost: orders.shop.svc:8080\r\nUser-Agent: svc-client/1.0\r\nAccept: application/json\r\n{cred}\r\nX-Request-Id: {:016x}\r\n\r\n",
        i % 997,
        rng.next()
    )
}

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"status\":\"ok\"}\n\n";

fn event(
    conn: usize,
    dir: Direction,
    tls: bool,
    data: Vec<u8>,
    call_len: u64,
    offset: u32,
    ts: u64,
) -> Event {
    let local: SocketAddr = format!(
        "10.1.{}.{}:{}",
        conn / 250 % 250,
        conn % 250 + 1,
        40000 + conn % 20000
    )
    .parse()
    .unwrap();
    let remote: SocketAddr = "10.2.0.10:8443".parse().unwrap();
    let source = if tls {
        Source::Openssl
    } else {
        Source::Syscall
    };
    Event {
        v: 1,
        kind: Kind::Data,
        time_ns: 1_700_000_000_000_000_000 + ts,
        node: String::new(),
        ts_ns: ts,
        pid: 1000 + (conn % 64) as u32,
        tgid: 1000 + (conn % 64) as u32,
        comm: "svc-client".into(),
        exe: Some("/usr/bin/svc-client".into()),
        cgroup_id: 5000 + (conn % 64) as u64,
        cgroup: Some(format!("/kubepods/pod{}/ctr", conn % 64).into()),
        container_id: None,
        runtime: None,
        pod_uid: None,
        pod: None,
        unit: None,
        uid: None,
        gid: None,
        direction: dir,
        source,
        tls,
        library: source.library().map(str::to_string),
        conn: 0x10000 + conn as u64 * 64,
        sk: 0x90000 + conn as u64 * 64,
        fd: (conn % 1000) as i32 + 3,
        netns: 4026531840,
        flow: Some(Flow { local, remote }),
        call_len,
        offset,
        data,
    }
}

/// Events for `n` requests (and their responses) and the number of requests they hold.
fn generate(n: usize, conns: usize) -> (Vec<Event>, usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut evs = Vec::with_capacity(n * 2);
    let mut i = 0;
    let mut ts = 1u64;
    while i < n {
        let conn = (rng.next() as usize) % conns;
        let tls = !conn.is_multiple_of(3);
        ts += 1000;
        match i % 10 {
            // One request split in the middle of a header over two calls.
            0 => {
                let r = request(&mut rng, i).into_bytes();
                let cut = r.len() / 2;
                evs.push(event(
                    conn,
                    Direction::Egress,
                    tls,
                    r[..cut].to_vec(),
                    cut as u64,
                    0,
                    ts,
                ));
                evs.push(event(
                    conn,
                    Direction::Egress,
                    tls,
                    r[cut..].to_vec(),
                    (r.len() - cut) as u64,
                    0,
                    ts + 1,
                ));
                i += 1;
            }
            // Four pipelined requests in one write.
            1 => {
                let mut r = Vec::new();
                for k in 0..4 {
                    r.extend_from_slice(request(&mut rng, i + k).as_bytes());
                }
                let len = r.len() as u64;
                evs.push(event(conn, Direction::Egress, tls, r, len, 0, ts));
                i += 4;
            }
            _ => {
                let r = request(&mut rng, i).into_bytes();
                let len = r.len() as u64;
                evs.push(event(conn, Direction::Egress, tls, r, len, 0, ts));
                i += 1;
            }
        }
        evs.push(event(
            conn,
            Direction::Ingress,
            tls,
            RESPONSE.to_vec(),
            RESPONSE.len() as u64,
            0,
            ts + 2,
        ));
    }
    (evs, i)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn run(evs: Vec<Event>) -> (Duration, usize) {
    let mut pipe = Pipeline::new(Fingerprinter::from_key(b"bench-key-0123456789abcdef"));
    let mut out = Vec::with_capacity(4096);
    let mut records = 0;
    let t = Instant::now();
    for ev in evs {
        pipe.handle(ev, &mut out);
        records += out.len();
        black_box(&out);
        out.clear();
    }
    (t.elapsed(), records)
}

fn main() {
    let a = args();
    let (evs, requests) = generate(a.requests, a.connections);
    let n_events = evs.len();
    let bytes: usize = evs.iter().map(|e| e.data.len()).sum();
    let json: Vec<String> = if a.json {
        evs.iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let rss_before = peak_rss_kib();

    let (d, records) = run(evs);
    assert_eq!(records, requests, "every generated request must be parsed");
    let rps = requests as f64 / d.as_secs_f64();
    println!(
        "pipeline (events in memory): {requests} requests, {n_events} events, {:.1} MiB in {:.3} s = {:.0} requests/s on one core ({:.0} ns/request)",
        bytes as f64 / (1 << 20) as f64,
        d.as_secs_f64(),
        rps,
        d.as_nanos() as f64 / requests as f64
    );

    let mut report = serde_json::json!({"bench": "pipeline", "requests": requests, "events": n_events, "bytes": bytes,
        "connections": a.connections, "pipeline_rps": rps, "target_rps": 1_000_000});
    if a.json {
        let t = Instant::now();
        let evs: Vec<Event> = json
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (d2, records) = run(evs);
        let total = t.elapsed();
        assert_eq!(records, requests);
        let replay_rps = requests as f64 / total.as_secs_f64();
        println!(
            "replay (JSON lines + base64 + pipeline): {:.3} s = {:.0} requests/s (pipeline part {:.3} s)",
            total.as_secs_f64(),
            replay_rps,
            d2.as_secs_f64()
        );
        report["replay_rps"] = replay_rps.into();
    }
    let rss = peak_rss_kib();
    println!("peak RSS {rss} KiB (input held in memory: {rss_before} KiB before the run)");
    report["peak_rss_kib"] = rss.into();
    println!(
        "target >= 1,000,000 requests/s/core: {}",
        if rps >= 1e6 { "met" } else { "NOT met" }
    );
    println!("{report}");
}
