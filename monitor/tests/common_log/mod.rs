//! Event logs written by tests, as `monitor run --record` would have: for `monitor replay`.
#![allow(dead_code)]

use std::path::Path;

use monitor::event::{Direction, Event, Flow, Kind, Source};

pub const T0: u64 = 1_800_000_000_000_000_000;

/// A plaintext request from `cgroup` carrying `token`, as the kernel would have reported it.
pub fn request(i: u64, cgroup: &str, token: &str, path: &str) -> Event {
    let data = format!(
        "GET {path} HTTP/1.1\r\nHost: orders.test\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    Event {
        v: 1,
        kind: Kind::Data,
        time_ns: T0 + i * 1_000_000_000,
        node: "node-a".into(),
        ts_ns: 1_000 + i * 1_000_000_000,
        pid: 100 + i as u32,
        tgid: 100 + i as u32,
        comm: "curl".into(),
        exe: Some("/usr/bin/curl".into()),
        cgroup_id: 7,
        cgroup: Some(cgroup.into()),
        container_id: None,
        runtime: None,
        pod_uid: None,
        pod: None,
        unit: None,
        uid: None,
        gid: None,
        direction: Direction::Egress,
        source: Source::Syscall,
        tls: false,
        library: None,
        conn: 0x1000 + i,
        sk: 0x1000 + i,
        fd: 5,
        netns: 1,
        flow: Some(Flow {
            local: format!("10.1.0.2:{}", 40000 + i).parse().unwrap(),
            remote: "10.9.0.1:80".parse().unwrap(),
        }),
        call_len: data.len() as u64,
        offset: 0,
        data,
    }
}

pub fn write_log(dir: &Path, name: &str, events: &[Event]) -> String {
    let p = dir.join(name);
    let text: String = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap() + "\n")
        .collect();
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}
