//! Hostile HTTP/2 from one connection (root).
//!
//! Memory: `monitor replay` runs in a cgroup limited to 512 MiB (the chart's limit) on event
//! logs fed through stdin (no page cache charged to it), and its peak memory is compared with
//! that of a replay of one ordinary request: an HPACK bomb, SETTINGS frames of 16 MiB.
//!
//! Evasion: requests nginx accepts and answers, sent by a client that writes prepared frames
//! (h2c), captured live: a header block over 64 KiB on the wire, and HPACK names that are not
//! UTF-8 before a table reference to the credential. The credential must be seen on both
//! sides.

mod common;
mod common_log;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use common::*;
use monitor::event::{Direction, Event};
use serde_json::{Value, json};

/// Frames and HPACK representations as a peer writes them.
mod h2 {
    pub use monitor::parse::http2::PREFACE;

    pub const HEADERS: u8 = 1;
    pub const SETTINGS: u8 = 4;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// RFC 7541 §5.1 integer; `first` holds the representation bits above the prefix.
    pub fn int(first: u8, prefix: u8, n: usize) -> Vec<u8> {
        let mask = (1usize << prefix) - 1;
        if n < mask {
            return vec![first | n as u8];
        }
        let mut b = vec![first | mask as u8];
        let mut n = n - mask;
        while n >= 128 {
            b.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        b.push(n as u8);
        b
    }

    pub fn string(s: &[u8], huffman: bool) -> Vec<u8> {
        let coded = if huffman {
            monitor::parse::hpack::huffman::encode(s)
        } else {
            s.to_vec()
        };
        let mut b = int(if huffman { 0x80 } else { 0 }, 7, coded.len());
        b.extend(coded);
        b
    }

    /// Literal without indexing, new name.
    pub fn lit(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x00];
        b.extend(string(name, false));
        b.extend(string(value, false));
        b
    }

    /// Literal with incremental indexing, new name.
    pub fn lit_indexed(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x40];
        b.extend(string(name, false));
        b.extend(string(value, false));
        b
    }

    /// `GET http://{authority}{path}`: the pseudo-header fields, none indexed.
    pub fn get(authority: &str, path: &str) -> Vec<u8> {
        let mut b = vec![0x82, 0x86];
        b.extend([0x04]);
        b.extend(string(path.as_bytes(), false));
        b.extend([0x01]);
        b.extend(string(authority.as_bytes(), false));
        b
    }

    /// A request's header block as HEADERS + CONTINUATIONs of at most `max` payload bytes.
    pub fn headers(stream: u32, block: &[u8], max: usize) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = block.chunks(max).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (kind, mut flags) = if i == 0 {
                    (HEADERS, END_STREAM)
                } else {
                    (CONTINUATION, 0)
                };
                if i + 1 == chunks.len() {
                    flags |= END_HEADERS;
                }
                frame(kind, flags, stream, c)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Memory under a 512 MiB cgroup.

/// A memory cgroup limited to 512 MiB (v2 `memory.max`, or v1 `memory.limit_in_bytes` where
/// the memory controller is still on v1), removed on drop.
struct MemCgroup {
    dir: PathBuf,
    peak_file: &'static str,
}

impl MemCgroup {
    fn new(name: &str) -> MemCgroup {
        let v2 = cgroup2_root();
        let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        let (dir, max_file, limit, peak_file) =
            if controllers.split_whitespace().any(|c| c == "memory") {
                (v2.join(name), "memory.max", "512M", "memory.peak")
            } else {
                let v1 = PathBuf::from("/sys/fs/cgroup/memory");
                assert!(
                    v1.join("memory.limit_in_bytes").exists(),
                    "no memory cgroup controller, v2 or v1"
                );
                (
                    v1.join(name),
                    "memory.limit_in_bytes",
                    "536870912",
                    "memory.max_usage_in_bytes",
                )
            };
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(max_file), limit).unwrap();
        MemCgroup { dir, peak_file }
    }

    fn peak(&self) -> u64 {
        fs::read_to_string(self.dir.join(self.peak_file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

struct Replay {
    records: Vec<Value>,
    summary: Value,
    peak: u64,
}

/// `monitor replay` of `events` (made on the fly, streamed to its stdin) inside a fresh
/// 512 MiB cgroup.
fn replay_in_cgroup(key: &Path, events: impl Iterator<Item = Event> + Send + 'static) -> Replay {
    let cg = MemCgroup::new(&format!("monitor-test-{}-h2mem", tag()));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$@\"",
            cg.dir.display()
        ))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_monitor"))
        .args([
            "replay",
            "--events",
            "-",
            "--print",
            "requests",
            "--key-file",
        ])
        .arg(key)
        .env("MONITOR_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || {
        for e in events {
            let mut line = serde_json::to_vec(&e).unwrap();
            line.push(b'\n');
            if stdin.write_all(&line).is_err() {
                return;
            }
        }
    });
    let stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
            .collect::<Vec<_>>()
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let records = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "replay failed ({}), OOM-killed under 512 MiB?\n{stderr}",
        out.status
    );
    let summary = stderr
        .lines()
        .find_map(|l| l.split_once("summary=").map(|(_, j)| j))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    Replay {
        records,
        summary,
        peak: cg.peak(),
    }
}

/// The bytes a client wrote on connection `conn`, as the kernel reports them: one call per
/// 4 KiB (an event's most), so nothing is truncated.
fn writes(conn: u64, bytes: Vec<u8>) -> impl Iterator<Item = Event> {
    let chunks: Vec<Vec<u8>> = bytes.chunks(4096).map(<[u8]>::to_vec).collect();
    chunks.into_iter().enumerate().map(move |(i, data)| {
        let mut e = common_log::request(0, "/hostile", "x", "/");
        e.ts_ns += i as u64;
        e.conn = conn;
        e.sk = conn;
        e.direction = Direction::Egress;
        e.call_len = data.len() as u64;
        e.offset = 0;
        e.data = data;
        e
    })
}

fn fingerprint(key: &Path, secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let key = hex::decode(fs::read_to_string(key).unwrap().trim()).unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(secret.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// The fingerprints of the credentials of the records with this path.
fn credentials(records: &[Value], path: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["path"] == path)
        .flat_map(|r| r["credentials"].as_array().cloned().unwrap_or_default())
        .map(|c| c["fingerprint"].as_str().unwrap().to_string())
        .collect()
}

/// One ordinary request on its own: what replay takes without hostile input.
fn baseline(key: &Path) -> u64 {
    let mut s = h2::PREFACE.to_vec();
    s.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    let mut b = h2::get("orders.test", "/baseline");
    b.extend(h2::lit(b"authorization", b"Bearer base"));
    s.extend(h2::headers(1, &b, 16 * 1024).concat());
    let r = replay_in_cgroup(key, writes(0x100, s));
    assert_eq!(
        credentials(&r.records, "/baseline"),
        [fingerprint(key, "base")]
    );
    r.peak
}

/// Memory a hostile connection may add to the baseline: the decoded list limit of one block
/// and the HPACK table, with room for the allocator.
const HOSTILE_ALLOWANCE: u64 = 16 << 20;

/// The HPACK bomb of the issue: a 32 KiB table entry (an API key) referenced 180,000 times
/// in three blocks, each under 64 KiB on the wire (~210 KB in all, ~5.9 GB decoded). Each
/// block is dropped at the header list limit with the table kept in step: the request after
/// them refers to the same entry and is reported with both its credentials.
#[test]
fn hpack_bomb_stays_within_the_memory_limit() {
    let _g = serial();
    require_root_and_tools(&[]);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let base = baseline(&key);

    let api_key = format!("k{}", "7".repeat(32 * 1024 - 1));
    let mut s = h2::PREFACE.to_vec();
    s.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    let mut first = h2::get("orders.test", "/insert");
    first.extend(h2::int(0x20, 5, 65_535));
    first.extend(h2::lit_indexed(b"x-api-key", api_key.as_bytes()));
    s.extend(h2::headers(1, &first, 16 * 1024).concat());
    let mut bomb = h2::get("orders.test", "/bomb");
    bomb.extend(std::iter::repeat_n(0xbe, 60_000));
    for stream in [3, 5, 7] {
        s.extend(h2::headers(stream, &bomb, 16 * 1024).concat());
    }
    let mut last = h2::get("orders.test", "/after");
    last.push(0xbe);
    last.extend(h2::lit(b"authorization", b"Bearer after-the-bomb"));
    s.extend(h2::headers(9, &last, 16 * 1024).concat());
    let wire = s.len();

    let r = replay_in_cgroup(&key, writes(0x200, s));
    eprintln!(
        "hpack bomb: {wire} bytes on the wire, peak {} KiB (baseline {} KiB)",
        r.peak >> 10,
        base >> 10
    );
    assert!(wire > 190_000 && bomb.len() < 64 * 1024);
    assert_eq!(
        credentials(&r.records, "/after"),
        [
            fingerprint(&key, &api_key),
            fingerprint(&key, "after-the-bomb")
        ]
    );
    assert!(r.records.iter().all(|rec| rec["path"] != "/bomb"));
    assert!(r.summary["pipeline"]["parse_drops"].as_u64().unwrap() >= 3);
    assert!(
        r.peak <= base + HOSTILE_ALLOWANCE,
        "peak {} KiB, baseline {} KiB",
        r.peak >> 10,
        base >> 10
    );
}

/// SETTINGS frames of 16 MiB on two connections at once are read entry by entry, never
/// buffered; the table size they carry still applies, and the requests after them are
/// reported.
#[test]
fn settings_frames_of_16_mib_are_not_buffered() {
    let _g = serial();
    require_root_and_tools(&[]);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let base = baseline(&key);

    let conn = |n: u64| {
        let len = (1 << 24) - 4; // the largest multiple of 6 a frame holds
        let mut payload = vec![0u8; len];
        for e in payload.chunks_exact_mut(6) {
            e[1] = 3; // SETTINGS_MAX_CONCURRENT_STREAMS
        }
        let mut s = h2::PREFACE.to_vec();
        s.extend(h2::frame(h2::SETTINGS, 0, 0, &payload));
        let mut b = h2::get("orders.test", &format!("/after-settings-{n}"));
        b.extend(h2::lit(b"authorization", format!("Bearer s{n}").as_bytes()));
        s.extend(h2::headers(1, &b, 16 * 1024).concat());
        writes(0x300 + n, s)
    };
    // Interleaved: both frames are half read at the same time.
    let (a, b) = (conn(1), conn(2));
    let events = a.zip(b).flat_map(|(x, y)| [x, y]);
    let r = replay_in_cgroup(&key, events);
    eprintln!(
        "16 MiB SETTINGS x2: peak {} KiB (baseline {} KiB)",
        r.peak >> 10,
        base >> 10
    );
    for n in [1, 2] {
        assert_eq!(
            credentials(&r.records, &format!("/after-settings-{n}")),
            [fingerprint(&key, &format!("s{n}"))]
        );
    }
    // Two frames buffered whole would take 32 MiB.
    assert!(
        r.peak <= base + 8 * 1024 * 1024,
        "peak {} KiB, baseline {} KiB",
        r.peak >> 10,
        base >> 10
    );
}

// ---------------------------------------------------------------------------------------
// Evasion with requests nginx accepts.

/// Sends prepared frames to nginx (h2c), one write per frame with a pause, so each write and
/// each of nginx's reads is one captured call; then prints the streams nginx answered with
/// 200 (`:status` indexed, 0x88).
const CLIENT: &str = r#"
import socket, struct, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
s = socket.create_connection((host, port))
i = 0
while i < len(data):
    n = struct.unpack(">I", data[i:i + 4])[0]
    s.sendall(data[i + 4:i + 4 + n])
    i += 4 + n
    time.sleep(0.02)
s.settimeout(1.0)
buf = b""
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        buf += b
except socket.timeout:
    pass
i, ok = 0, []
while i + 9 <= len(buf):
    n = int.from_bytes(buf[i:i + 3], "big")
    kind, sid = buf[i + 3], int.from_bytes(buf[i + 5:i + 9], "big") & 0x7fffffff
    if kind == 1 and buf[i + 9:i + 10] == b"\x88":
        ok.append(sid)
    if kind == 7:
        print("goaway", buf[i + 13:i + 17].hex(), file=sys.stderr)
    i += 9 + n
print(" ".join(map(str, ok)))
"#;

/// Runs the frames through the lab's client against nginx's h2c port; the streams answered.
fn send(lab: &Lab, cg: &Cgroup, dir: &Path, frames: &[Vec<u8>]) -> Vec<u32> {
    let mut file = Vec::new();
    for f in frames {
        file.extend((f.len() as u32).to_be_bytes());
        file.extend(f);
    }
    let data = dir.join("frames");
    fs::write(&data, file).unwrap();
    let script = dir.join("client.py");
    fs::write(&script, CLIENT).unwrap();
    let o = cg
        .command(
            &lab.client_ns,
            &[
                "python3",
                script.to_str().unwrap(),
                &lab.server_ip,
                "8080",
                data.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// A header block nginx accepts with its default limits (decoded fields within 4 x 8 KiB,
/// every string within 8 KiB) that is over 64 KiB on the wire, the credential last: 70 KiB of
/// table size updates, or values that Huffman coding makes 3.4 times longer.
#[test]
fn header_blocks_over_64k_on_the_wire_keep_their_credential() {
    let _g = serial();
    require_root_and_tools(&["nginx", "python3", "ip", "ss"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let _nginx = Nginx::start(&lab, &server_cg);
    let dir = tempfile::tempdir().unwrap();
    let mon = Monitor::start(&["--print", "requests"]);
    let authority = "server.test:8080";
    let mut updates = h2::get(authority, "/h2/big/updates");
    updates.extend(vec![0x20; 70 * 1024]);
    let mut inflated = h2::get(authority, "/h2/big/huffman");
    for i in 0..12 {
        inflated.extend([0x00]);
        inflated.extend(h2::string(format!("x-pad-{i}").as_bytes(), false));
        inflated.extend(h2::string(&[0xfe; 2300], true));
    }
    let toks = [
        format!("tok-{}", random_hex(20)),
        format!("tok-{}", random_hex(20)),
    ];
    let mut frames = vec![h2::PREFACE.to_vec(), h2::frame(h2::SETTINGS, 0, 0, &[])];
    for (i, (block, tok)) in [updates, inflated].into_iter().zip(&toks).enumerate() {
        let mut block = block;
        block.extend(h2::lit(
            b"authorization",
            format!("Bearer {tok}").as_bytes(),
        ));
        assert!(block.len() > 64 * 1024);
        // 12 KiB frames: each write (and each read of nginx's) is captured whole.
        frames.extend(h2::headers(1 + 2 * i as u32, &block, 12 * 1024));
    }
    let answered = send(&lab, &client_cg, dir.path(), &frames);
    let fps: Vec<String> = toks.iter().map(|t| mon.fingerprint(t)).collect();
    let out = mon.stop();
    assert_eq!(answered, [1, 3], "nginx did not answer both requests");
    for (path, fp) in ["/h2/big/updates", "/h2/big/huffman"].iter().zip(&fps) {
        for side in ["client", "server"] {
            let recs = out.find(&[("/path", json!(path)), ("/side", json!(side))]);
            assert_eq!(recs.len(), 1, "{side} {path}: {:#?}", out.records);
            assert_eq!(recs[0]["protocol"], "http/2");
            assert_eq!(recs[0]["credentials"][0]["fingerprint"], json!(fp));
        }
    }
    for tok in &toks {
        out.assert_no_secret(tok);
    }
}

/// nginx ignores a header whose name is not valid (here, not UTF-8) but enters it into its
/// HPACK table, sized by its raw octets. The next request refers to the credential's entry
/// behind it: a table sized after lossy conversion would have evicted it.
#[test]
fn names_that_are_not_utf8_do_not_desync_the_table() {
    let _g = serial();
    require_root_and_tools(&["nginx", "python3", "ip", "ss"]);
    let t = tag();
    let lab = Lab::new(&t);
    let server_cg = Cgroup::new(&format!("monitor-test-{t}-server"));
    let client_cg = Cgroup::new(&format!("monitor-test-{t}-client"));
    let _nginx = Nginx::start(&lab, &server_cg);
    let dir = tempfile::tempdir().unwrap();
    let mon = Monitor::start(&["--print", "requests"]);
    let authority = "server.test:8080";
    let tok = format!("tok-{}", random_hex(20));
    let auth = format!("Bearer {tok}");
    let mut first = h2::get(authority, "/h2/names/first");
    // authorization, indexed name 23, into the table: 13 + len + 32 octets.
    first.extend(h2::int(0x40, 6, 23));
    first.extend(h2::string(auth.as_bytes(), false));
    // Then a name of 0xff octets that fills the 4,096-octet table exactly (nginx's table
    // size), with the credential's entry still in it.
    let name = vec![0xffu8; 4096 - (13 + auth.len() + 32) - (1 + 32)];
    first.extend(h2::lit_indexed(&name, b"v"));
    // The second request names the credential by its dynamic index (63: behind the other).
    let mut second = h2::get(authority, "/h2/names/second");
    second.push(0xbf);
    let mut frames = vec![h2::PREFACE.to_vec(), h2::frame(h2::SETTINGS, 0, 0, &[])];
    frames.extend(h2::headers(1, &first, 12 * 1024));
    frames.extend(h2::headers(3, &second, 12 * 1024));
    let answered = send(&lab, &client_cg, dir.path(), &frames);
    let fp = mon.fingerprint(&tok);
    let out = mon.stop();
    assert_eq!(answered, [1, 3], "nginx did not answer both requests");
    for path in ["/h2/names/first", "/h2/names/second"] {
        for side in ["client", "server"] {
            let recs = out.find(&[("/path", json!(path)), ("/side", json!(side))]);
            assert_eq!(recs.len(), 1, "{side} {path}: {:#?}", out.records);
            assert_eq!(recs[0]["credentials"][0]["fingerprint"], json!(fp));
        }
    }
    out.assert_no_secret(&tok);
}
