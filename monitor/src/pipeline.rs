//! Events → per-connection byte streams → parsed requests → request records with credentials.
//!
//! Streams are keyed by (tgid, conn) where conn is the `SSL *` (TLS) or `struct sock *`
//! (plaintext), one parser per direction. TLS data may arrive before the kernel has tied its
//! `SSL *` to a socket (the first `SSL_write` of a connection); such requests wait briefly for
//! the bind event so they carry their flow.
//!
//! Memory is bounded in one place, [`Limits`]: every connection's bytes (its fixed part,
//! parser buffers, HPACK tables, requests waiting for their flow) are accounted after each
//! event; a connection over its budget has the stream that grew reset, and past the node
//! budget the least recently used connections are dropped. Every drop is counted.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    credential::{self, Credential, CredentialConfig, Fingerprinter},
    event::{Direction, Event, Flow, Kind, Source},
    identity::{container::Runtime, kube::Pod},
    parse::{self, Message, ParseError, Parser, Sniff},
};

/// How long a TLS request waits for its socket to be known.
const PENDING_WAIT_NS: u64 = 500_000_000;
/// How often (in event time) idle connections are looked for.
const SWEEP_EVERY_NS: u64 = 10_000_000_000;

/// The pipeline's memory budget. The defaults are what the Helm chart's memory limit is
/// derived from (`node_bytes` plus the detector, the output queue and the ring buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections tracked at once (a socket, or an `SSL *` with the socket it is bound to);
    /// the least recently used are dropped past it.
    pub max_conns: usize,
    /// Most bytes one connection may hold (both directions: parser buffers, HPACK tables,
    /// requests waiting for their flow, and its fixed part). The stream that crosses it is
    /// reset and resynchronises at its next call.
    pub conn_bytes: usize,
    /// Most bytes all connections together may hold; past it the least recently used are
    /// dropped until a tenth is free again.
    pub node_bytes: usize,
    /// A connection with no event for this long is forgotten (its close was never seen).
    pub idle_ns: u64,
}

impl Limits {
    /// 65,536 connections of 4 KiB on average make the 256 MiB node budget; one connection
    /// may use up to 256 KiB (an HTTP/2 header block of 64 KiB being assembled, with the
    /// largest HPACK tables, fits).
    pub const DEFAULT: Limits = Limits {
        max_conns: 65536,
        conn_bytes: 256 * 1024,
        node_bytes: 65536 * 4096,
        idle_ns: 15 * 60 * 1_000_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

/// RFC 3339 with microseconds, formatted only when a record is written.
fn rfc3339<S: serde::Serializer>(ns: &u64, s: S) -> Result<S::Ok, S::Error> {
    let t = UNIX_EPOCH + Duration::from_nanos(*ns);
    s.collect_str(&humantime::format_rfc3339_micros(t))
}

/// One parsed request as printed by `monitor run`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Wall-clock ns since the epoch, written as RFC 3339.
    #[serde(serialize_with = "rfc3339")]
    pub time: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub exe: Option<Arc<str>>,
    pub cgroup_id: u64,
    pub cgroup: Option<Arc<str>>,
    /// Container, pod, unit and uid of the observing process (see `Event`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<Pod>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    pub netns: u32,
    /// Whether the observing process sent the request (client) or received it (server).
    pub side: &'static str,
    pub source: Option<Endpoint>,
    pub destination: Option<Endpoint>,
    pub fd: i32,
    pub tls: bool,
    pub library: Option<&'static str>,
    pub protocol: &'static str,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    /// PostgreSQL database of a login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    pub credentials: Vec<Credential>,
    /// Kernel time of the event that completed the request (latency measurements).
    #[serde(skip)]
    pub ts_ns: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PipelineStats {
    pub events: u64,
    pub bytes: u64,
    pub requests: u64,
    pub responses: u64,
    pub credentials: u64,
    /// Redis and PostgreSQL logins.
    pub logins: u64,
    /// Streams no parser recognised (the name predates the other protocols).
    pub streams_not_http: u64,
    pub parse_errors: u64,
    /// Fields or header blocks stepped over undecoded (HTTP/2 seen mid-stream, lost HPACK
    /// state).
    pub parse_drops: u64,
    pub gaps: u64,
    /// Connections dropped to bound memory: past `max_conns`, or past the node budget.
    pub conns_evicted: u64,
    /// Connections forgotten after `idle_ns` without an event.
    pub conns_expired: u64,
    /// Streams reset because their connection went over its byte budget.
    pub conn_budget_resets: u64,
    pub conns: usize,
    /// Bytes held by all connections now (what the node budget bounds).
    pub bytes_held: usize,
    /// TLS connections whose socket is known (bounded by the connections tracked).
    pub tls_bound: usize,
    /// Requests (HTTP) and logins (Redis, PostgreSQL) per protocol (`http/1.1`, `http/2`,
    /// `redis`, `postgres`).
    pub requests_by_protocol: BTreeMap<&'static str, u64>,
    pub responses_by_protocol: BTreeMap<&'static str, u64>,
    pub parse_errors_by_protocol: BTreeMap<&'static str, u64>,
    /// Credentials found, per kind (`bearer`, `basic`, `cookie`, ...).
    pub credentials_by_kind: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Stream {
    parser: Option<Parser>,
    /// Bytes seen before the protocol could be told.
    sniff: Vec<u8>,
    /// No known protocol: ignored from now on.
    dead: bool,
    /// After a parse error or a gap: wait for the next call to start.
    resync: bool,
    call_len: u64,
    received: u64,
}

struct Conn {
    source: Source,
    fd: i32,
    sk: u64,
    netns: u32,
    flow: Option<Flow>,
    egress: Stream,
    ingress: Stream,
    pending: Vec<RequestRecord>,
    last_ns: u64,
    /// Bytes accounted to this connection at its last event.
    held: usize,
}

/// Bytes a stream holds: what it buffered before the protocol was known, its parser's
/// buffers and, for HTTP/2, the HPACK table and the boxed parser itself.
fn stream_bytes(s: &Stream) -> usize {
    s.sniff.capacity()
        + match &s.parser {
            None => 0,
            Some(Parser::Http2(p)) => {
                std::mem::size_of::<parse::http2::Http2Parser>() + p.buffered() + p.table_size()
            }
            Some(p) => p.buffered(),
        }
}

/// Approximate bytes of a record waiting for its flow.
fn record_bytes(r: &RequestRecord) -> usize {
    std::mem::size_of::<RequestRecord>()
        + r.comm.len()
        + r.method.len()
        + r.path.len()
        + r.host.as_ref().map_or(0, String::len)
        + r.database.as_ref().map_or(0, String::len)
        + r.credentials.len() * (std::mem::size_of::<Credential>() + 128)
}

/// Fixed bytes of a tracked connection: the map entry and its `tls_by_sk` entry.
pub const CONN_FIXED_BYTES: usize =
    std::mem::size_of::<((u32, u64), Conn)>() + std::mem::size_of::<((u32, u64), u64)>() + 16;

impl Conn {
    fn bytes(&self) -> usize {
        CONN_FIXED_BYTES
            + stream_bytes(&self.egress)
            + stream_bytes(&self.ingress)
            + self.pending.iter().map(record_bytes).sum::<usize>()
    }
}

pub struct Pipeline {
    fp: Fingerprinter,
    cfg: CredentialConfig,
    limits: Limits,
    conns: HashMap<(u32, u64), Conn>,
    /// (tgid, sk) → SSL conn id, to drop TLS streams when their socket closes. An entry lives
    /// as long as the SSL connection it names, so it is bounded with the connections.
    tls_by_sk: HashMap<(u32, u64), u64>,
    /// Connections with requests waiting for their flow, oldest first, with the kernel time
    /// of the first waiting request: flushing looks only at the front. Entries of connections
    /// released meanwhile are stale and skipped.
    pending: VecDeque<(u64, (u32, u64))>,
    /// Sum of every connection's `held`.
    held: usize,
    last_sweep_ns: u64,
    pub stats: PipelineStats,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Wall clock minus the monotonic clock `bpf_ktime_get_ns` uses.
pub fn boot_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

impl Pipeline {
    /// Events must be enriched (time, exe, cgroup: `Identity::enrich`) before they get here.
    pub fn new(fp: Fingerprinter) -> Self {
        Self::with_config(fp, CredentialConfig::default())
    }

    /// Like [`Pipeline::new`], with the headers, cookies and query keys to look in.
    pub fn with_config(fp: Fingerprinter, cfg: CredentialConfig) -> Self {
        Self::with_limits(fp, cfg, Limits::DEFAULT)
    }

    /// Like [`Pipeline::with_config`], with another memory budget.
    pub fn with_limits(fp: Fingerprinter, cfg: CredentialConfig, limits: Limits) -> Self {
        Pipeline {
            fp,
            cfg,
            limits,
            conns: HashMap::new(),
            tls_by_sk: HashMap::new(),
            pending: VecDeque::new(),
            held: 0,
            last_sweep_ns: 0,
            stats: PipelineStats::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Handles one event; finished records are appended to `out`.
    pub fn handle(&mut self, ev: Event, out: &mut Vec<RequestRecord>) {
        self.stats.events += 1;
        self.stats.bytes += ev.data.len() as u64;
        match ev.kind {
            Kind::Data => self.on_data(ev, out),
            Kind::TlsBind => {
                let key = (ev.tgid, ev.conn);
                let conn = self.conn(&ev, out);
                conn.fd = ev.fd;
                conn.flow = ev.flow;
                conn.netns = ev.netns;
                self.bind_sk(key, ev.sk);
                self.release(key, out);
                self.account(key);
            }
            Kind::Close => {
                let mut keys = vec![(ev.tgid, ev.sk)];
                if let Some(ssl) = self.tls_by_sk.remove(&(ev.tgid, ev.sk)) {
                    keys.push((ev.tgid, ssl));
                }
                for k in keys {
                    self.remove(k, out);
                }
            }
            // Consumed by identity enrichment and by the attacher.
            Kind::Exec | Kind::Mmap | Kind::Exit => {}
        }
        self.stats.conns = self.conns.len();
        self.stats.bytes_held = self.held;
        self.stats.tls_bound = self.tls_by_sk.len();
    }

    /// Ties a TLS connection to its socket, so that the socket's close drops it.
    fn bind_sk(&mut self, key: (u32, u64), sk: u64) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut conn.sk, sk);
        // A rebound SSL object no longer answers for its old socket.
        if old != sk && self.tls_by_sk.get(&(key.0, old)) == Some(&key.1) {
            self.tls_by_sk.remove(&(key.0, old));
        }
        self.tls_by_sk.insert((key.0, sk), key.1);
    }

    /// Forgets a connection: its waiting requests are emitted (without their flow), its
    /// bytes returned to the node budget, its socket mapping dropped.
    fn remove(&mut self, key: (u32, u64), out: &mut Vec<RequestRecord>) -> bool {
        self.release(key, out);
        let Some(conn) = self.conns.remove(&key) else {
            return false;
        };
        self.held -= conn.held;
        if conn.source.is_tls() && self.tls_by_sk.get(&(key.0, conn.sk)) == Some(&key.1) {
            self.tls_by_sk.remove(&(key.0, conn.sk));
        }
        true
    }

    /// Re-counts the bytes of `key` after an event, enforcing the connection's budget.
    fn account(&mut self, key: (u32, u64)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut now = conn.bytes();
        if now > self.limits.conn_bytes {
            // The parsers' own bounds are per stream and protocol; this is the one bound on
            // what a connection holds in all. Both streams start over at their next call.
            for s in [&mut conn.egress, &mut conn.ingress] {
                if stream_bytes(s) > 0 {
                    reset_stream(s);
                    self.stats.conn_budget_resets += 1;
                }
            }
            now = conn.bytes();
        }
        self.held = self.held - conn.held + now;
        conn.held = now;
    }

    /// Drops least recently used connections past the connection cap or the node budget.
    /// `room`: connections about to be added.
    fn enforce_node_budget(&mut self, keep: (u32, u64), room: usize, out: &mut Vec<RequestRecord>) {
        if self.held <= self.limits.node_bytes && self.conns.len() + room <= self.limits.max_conns {
            return;
        }
        let target_bytes = self.limits.node_bytes - self.limits.node_bytes / 10;
        let target_conns = self.limits.max_conns - self.limits.max_conns / 10;
        let mut ages: Vec<(u64, (u32, u64))> = self
            .conns
            .iter()
            .filter(|(k, _)| **k != keep)
            .map(|(k, c)| (c.last_ns, *k))
            .collect();
        ages.sort_unstable();
        for (_, k) in ages {
            if self.held <= target_bytes && self.conns.len() <= target_conns {
                break;
            }
            if self.remove(k, out) {
                self.stats.conns_evicted += 1;
            }
        }
    }

    /// Forgets connections idle for longer than `idle_ns` (their close was never seen).
    fn expire(&mut self, now_ns: u64, out: &mut Vec<RequestRecord>) {
        let idle: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_ns) > self.limits.idle_ns)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            if self.remove(k, out) {
                self.stats.conns_expired += 1;
            }
        }
    }

    fn conn(&mut self, ev: &Event, out: &mut Vec<RequestRecord>) -> &mut Conn {
        let key = (ev.tgid, ev.conn);
        if self.conns.len() >= self.limits.max_conns && !self.conns.contains_key(&key) {
            self.enforce_node_budget(key, 1, out);
        }
        let conn = self
            .conns
            .entry((ev.tgid, ev.conn))
            .or_insert_with(|| Conn {
                source: ev.source,
                fd: -1,
                sk: 0,
                netns: 0,
                flow: None,
                egress: Stream::default(),
                ingress: Stream::default(),
                pending: Vec::new(),
                last_ns: ev.ts_ns,
                held: 0,
            });
        conn.last_ns = conn.last_ns.max(ev.ts_ns);
        conn
    }

    fn on_data(&mut self, ev: Event, out: &mut Vec<RequestRecord>) {
        let key = (ev.tgid, ev.conn);
        self.feed(&ev, out);
        self.account(key);
        self.enforce_node_budget(key, 0, out);
    }

    fn feed(&mut self, ev: &Event, out: &mut Vec<RequestRecord>) {
        let key = (ev.tgid, ev.conn);
        self.conn(ev, out);
        let conn = self.conns.get_mut(&key).expect("conn just made");
        if ev.fd >= 0 {
            conn.fd = ev.fd;
        }
        if ev.flow.is_some() {
            conn.flow = ev.flow;
            conn.netns = ev.netns;
        }
        if ev.sk != 0 && ev.sk != conn.sk {
            if conn.source.is_tls() {
                self.bind_sk(key, ev.sk);
            } else {
                conn.sk = ev.sk;
            }
        }
        let conn = self.conns.get_mut(&key).expect("conn just made");
        let stream = match ev.direction {
            Direction::Egress => &mut conn.egress,
            Direction::Ingress => &mut conn.ingress,
        };
        // A call that was not copied whole leaves a hole: resynchronise at the next call.
        if ev.offset == 0 {
            if stream.call_len != u64::MAX && stream.received < stream.call_len {
                stream.resync = true;
                self.stats.gaps += 1;
            }
            stream.call_len = ev.call_len;
            stream.received = 0;
            if stream.resync {
                stream.resync = false;
                stream.sniff.clear();
                if let Some(p) = stream.parser.as_mut() {
                    p.reset();
                }
            }
        } else if ev.offset as u64 != stream.received {
            stream.resync = true;
            self.stats.gaps += 1;
        }
        stream.received += ev.data.len() as u64;
        if stream.dead || stream.resync {
            return;
        }
        let mut msgs = Vec::new();
        if stream.parser.is_none() {
            stream.sniff.extend_from_slice(&ev.data);
            match parse::sniff(&stream.sniff) {
                Sniff::Undecided => return,
                Sniff::Known(p) => stream.parser = Some(p),
                Sniff::Unknown => {
                    stream.dead = true;
                    zeroize::Zeroize::zeroize(&mut stream.sniff);
                    stream.sniff = Vec::new();
                    self.stats.streams_not_http += 1;
                    return;
                }
            }
        }
        let first = std::mem::take(&mut stream.sniff);
        let data = if first.is_empty() { &ev.data } else { &first };
        let Some(parser) = stream.parser.as_mut() else {
            return;
        };
        let drops = parser.drops();
        let r = parser.feed(data, &mut msgs);
        self.stats.parse_drops += parser.drops().saturating_sub(drops);
        let protocol = parser.protocol();
        let table_size = parser.take_table_size();
        zeroize::Zeroize::zeroize(&mut { first });
        if let Err(e) = r {
            *self
                .stats
                .parse_errors_by_protocol
                .entry(protocol)
                .or_default() += 1;
            Self::parse_error(&mut self.stats, stream, e);
        }
        // An HTTP/2 side's SETTINGS bounds the HPACK table of the other direction.
        if let Some(size) = table_size {
            let other = match ev.direction {
                Direction::Egress => &mut conn.ingress,
                Direction::Ingress => &mut conn.egress,
            };
            if let Some(p) = other.parser.as_mut() {
                p.set_table_limit(size);
            }
        }
        for m in msgs {
            let (method, host, path, database, credentials) = match m {
                Message::Response { .. } => {
                    self.stats.responses += 1;
                    *self
                        .stats
                        .responses_by_protocol
                        .entry(protocol)
                        .or_default() += 1;
                    continue;
                }
                Message::Request(req) => {
                    self.stats.requests += 1;
                    let credentials =
                        credential::extract(&req.headers, &req.path, &self.cfg, &self.fp);
                    // The path is printed: query tokens are not.
                    let path = match credential::redact_path(&req.path, &self.cfg) {
                        std::borrow::Cow::Borrowed(_) => req.path,
                        std::borrow::Cow::Owned(p) => p,
                    };
                    (req.method, req.host, path, None, credentials)
                }
                Message::Login(login) => {
                    self.stats.logins += 1;
                    let credentials = credential::login(&login, &self.fp).into_iter().collect();
                    (
                        login.command.to_string(),
                        None,
                        String::new(),
                        login.database,
                        credentials,
                    )
                }
            };
            self.stats.credentials += credentials.len() as u64;
            *self.stats.requests_by_protocol.entry(protocol).or_default() += 1;
            for c in &credentials {
                *self.stats.credentials_by_kind.entry(c.kind).or_default() += 1;
            }
            let mut rec = self.record(ev, key, method, host, path, credentials);
            rec.protocol = protocol;
            rec.database = database;
            let conn = self.conns.get_mut(&key).expect("conn exists");
            if conn.flow.is_none() && conn.source.is_tls() {
                if conn.pending.is_empty() {
                    self.pending.push_back((rec.ts_ns, key));
                }
                conn.pending.push(rec);
            } else {
                out.push(rec);
            }
        }
    }

    fn parse_error(stats: &mut PipelineStats, stream: &mut Stream, e: ParseError) {
        stats.parse_errors += 1;
        tracing::debug!(error = %e, "parse error; resynchronising");
        stream.resync = true;
    }

    fn record(
        &mut self,
        ev: &Event,
        key: (u32, u64),
        method: String,
        host: Option<String>,
        path: String,
        credentials: Vec<Credential>,
    ) -> RequestRecord {
        let time = ev.time_ns;
        let conn = &self.conns[&key];
        let side = if ev.direction == Direction::Egress {
            "client"
        } else {
            "server"
        };
        let mut rec = RequestRecord {
            time,
            pid: ev.tgid,
            tid: ev.pid,
            comm: ev.comm.clone(),
            exe: ev.exe.clone(),
            cgroup_id: ev.cgroup_id,
            cgroup: ev.cgroup.clone(),
            container_id: ev.container_id.clone(),
            runtime: ev.runtime,
            pod_uid: ev.pod_uid.clone(),
            pod: ev.pod.clone(),
            unit: ev.unit.clone(),
            uid: ev.uid,
            gid: ev.gid,
            netns: conn.netns,
            side,
            source: None,
            destination: None,
            fd: conn.fd,
            tls: conn.source.is_tls(),
            library: conn.source.library(),
            protocol: "http/1.1",
            method,
            host,
            path,
            database: None,
            credentials,
            ts_ns: ev.ts_ns,
        };
        set_flow(&mut rec, conn.flow, conn.fd, conn.netns);
        rec
    }

    /// Emits the requests of `key` that waited for their flow.
    fn release(&mut self, key: (u32, u64), out: &mut Vec<RequestRecord>) {
        if let Some(conn) = self.conns.get_mut(&key) {
            for mut rec in conn.pending.drain(..) {
                set_flow(&mut rec, conn.flow, conn.fd, conn.netns);
                out.push(rec);
            }
        }
    }

    /// Emits requests that waited too long for their socket; call periodically with the
    /// current monotonic time (or the last event's time when replaying). Also forgets
    /// connections idle past the limit, every few seconds of that clock.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<RequestRecord>) {
        self.release_due(now_ns, out);
        if now_ns.saturating_sub(self.last_sweep_ns) >= SWEEP_EVERY_NS {
            self.last_sweep_ns = now_ns;
            self.expire(now_ns, out);
            self.stats.conns = self.conns.len();
            self.stats.bytes_held = self.held;
            self.stats.tls_bound = self.tls_by_sk.len();
        }
    }

    fn release_due(&mut self, now_ns: u64, out: &mut Vec<RequestRecord>) {
        while let Some(&(ts, key)) = self.pending.front() {
            if now_ns.saturating_sub(ts) < PENDING_WAIT_NS {
                break;
            }
            self.pending.pop_front();
            // Stale when the connection was released (and perhaps waits again, queued later).
            let waiting = self
                .conns
                .get(&key)
                .and_then(|c| c.pending.first())
                .is_some_and(|r| r.ts_ns <= ts);
            if waiting {
                self.release(key, out);
                self.account(key);
            }
        }
    }

    /// Emits everything still waiting (shutdown).
    pub fn flush_all(&mut self, out: &mut Vec<RequestRecord>) {
        self.release_due(u64::MAX, out);
    }
}

/// Forgets a stream's partial state (zeroed: it may hold credentials); it resynchronises at
/// its next call.
fn reset_stream(s: &mut Stream) {
    zeroize::Zeroize::zeroize(&mut s.sniff);
    s.sniff = Vec::new();
    if let Some(p) = s.parser.as_mut() {
        p.reset();
    }
    s.resync = true;
}

fn set_flow(rec: &mut RequestRecord, flow: Option<Flow>, fd: i32, netns: u32) {
    rec.fd = fd;
    rec.netns = netns;
    if let Some(f) = flow {
        let (src, dst) = if rec.side == "client" {
            (f.local, f.remote)
        } else {
            (f.remote, f.local)
        };
        rec.source = Some(src.into());
        rec.destination = Some(dst.into());
    }
}

/// Monotonic now, in the kernel's timestamp clock.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(limits: Limits) -> Pipeline {
        Pipeline::with_limits(
            Fingerprinter::from_key(b"0123456789abcdef"),
            CredentialConfig::default(),
            limits,
        )
    }

    fn ev(kind: Kind, source: Source, conn: u64, sk: u64, ts: u64, data: &[u8]) -> Event {
        Event {
            v: 1,
            kind,
            time_ns: ts,
            node: String::new(),
            ts_ns: ts,
            pid: 7,
            tgid: 7,
            comm: "client".into(),
            exe: None,
            cgroup_id: 1,
            cgroup: None,
            container_id: None,
            runtime: None,
            pod_uid: None,
            pod: None,
            unit: None,
            uid: None,
            gid: None,
            direction: Direction::Egress,
            source,
            tls: source.is_tls(),
            library: None,
            conn,
            sk,
            fd: 3,
            netns: 1,
            flow: (kind == Kind::TlsBind || source == Source::Syscall).then(|| Flow {
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:443".parse().unwrap(),
            }),
            call_len: data.len() as u64,
            offset: 0,
            data: data.to_vec(),
        }
    }

    const REQ: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tok\r\n\r\n";

    #[test]
    fn tls_binds_never_closed_stay_bounded() {
        let mut p = pipe(Limits {
            max_conns: 100,
            ..Limits::DEFAULT
        });
        let mut out = Vec::new();
        for i in 0..10_000u64 {
            p.handle(
                ev(Kind::TlsBind, Source::Openssl, 1 << 40 | i, i, i, b""),
                &mut out,
            );
            assert!(p.tls_by_sk.len() <= 100 && p.conns.len() <= 100);
        }
        assert!(p.stats.conns_evicted >= 9_900, "{}", p.stats.conns_evicted);
        assert_eq!(p.stats.tls_bound, p.tls_by_sk.len());
        // The survivors still work: a close drops both the socket's and the SSL's streams.
        p.handle(
            ev(Kind::Close, Source::Syscall, 9_999, 9_999, 10_001, b""),
            &mut out,
        );
        assert!(!p.conns.contains_key(&(7, 1 << 40 | 9_999)));
        assert!(!p.tls_by_sk.contains_key(&(7, 9_999)));
    }

    #[test]
    fn idle_connections_are_forgotten() {
        let mut p = pipe(Limits::DEFAULT);
        let mut out = Vec::new();
        p.handle(
            ev(Kind::TlsBind, Source::Openssl, 1 << 40, 5, 1, b""),
            &mut out,
        );
        p.handle(
            ev(Kind::Data, Source::Syscall, 6, 6, 1, b"GET / HT"),
            &mut out,
        );
        p.flush(Limits::DEFAULT.idle_ns / 2, &mut out);
        assert_eq!(p.conns.len(), 2);
        p.flush(Limits::DEFAULT.idle_ns + SWEEP_EVERY_NS, &mut out);
        assert_eq!((p.conns.len(), p.tls_by_sk.len(), p.held), (0, 0, 0));
        assert_eq!(p.stats.conns_expired, 2);
    }

    #[test]
    fn waiting_requests_are_released_in_order_and_never_lost() {
        let mut p = pipe(Limits {
            max_conns: 1_000,
            ..Limits::DEFAULT
        });
        let mut out = Vec::new();
        // 40,000 TLS requests whose socket is never told, within one wait.
        for i in 0..40_000u64 {
            p.handle(ev(Kind::Data, Source::Openssl, i, 0, i * 10, REQ), &mut out);
            p.flush(i * 10, &mut out);
        }
        // Evicted connections hand their waiting requests on rather than drop them.
        let evicted = out.len();
        assert!(evicted >= 39_000, "{evicted}");
        assert!(out.iter().all(|r| r.source.is_none()));
        p.flush(400_000 + PENDING_WAIT_NS, &mut out);
        assert_eq!(out.len(), 40_000);
        assert!(p.pending.is_empty());
    }

    #[test]
    fn a_bind_releases_with_the_flow_and_leaves_a_stale_entry_skipped() {
        let mut p = pipe(Limits::DEFAULT);
        let mut out = Vec::new();
        p.handle(ev(Kind::Data, Source::Openssl, 1, 0, 0, REQ), &mut out);
        assert!(out.is_empty());
        p.handle(ev(Kind::TlsBind, Source::Openssl, 1, 9, 10, b""), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].destination.is_some());
        p.flush(PENDING_WAIT_NS * 2, &mut out);
        assert_eq!(out.len(), 1);
        assert!(p.pending.is_empty());
    }

    #[test]
    fn a_connection_over_its_budget_is_reset_and_counted() {
        let mut p = pipe(Limits {
            conn_bytes: 16 * 1024,
            ..Limits::DEFAULT
        });
        let mut out = Vec::new();
        let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        head.resize(4000, b'a');
        p.handle(ev(Kind::Data, Source::Syscall, 1, 1, 0, &head), &mut out);
        let pad = vec![b'a'; 4000];
        for i in 0..10u32 {
            let mut e = ev(Kind::Data, Source::Syscall, 1, 1, 1, &pad);
            e.offset = 4000 * (i + 1);
            e.call_len = u64::MAX;
            p.handle(e, &mut out);
            assert!(
                p.held <= 16 * 1024 + 4096 + CONN_FIXED_BYTES * 2,
                "{}",
                p.held
            );
        }
        assert!(p.stats.conn_budget_resets >= 1);
        // The next call starts clean and parses.
        p.handle(ev(Kind::Data, Source::Syscall, 1, 1, 2, REQ), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn the_node_budget_drops_the_least_recently_used() {
        let node = 1 << 20;
        let mut p = pipe(Limits {
            node_bytes: node,
            ..Limits::DEFAULT
        });
        let mut out = Vec::new();
        let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        head.resize(30_000, b'a');
        for i in 0..200u64 {
            p.handle(ev(Kind::Data, Source::Syscall, i, i, i, &head), &mut out);
            assert!(p.held <= node, "{}", p.held);
            assert_eq!(p.held, p.conns.values().map(|c| c.held).sum::<usize>());
        }
        assert!(p.stats.conns_evicted > 100);
        assert!(p.conns.contains_key(&(7, 199)));
        assert!(!p.conns.contains_key(&(7, 0)));
        p.handle(
            ev(Kind::Data, Source::Syscall, 1000, 1000, 300, REQ),
            &mut out,
        );
        assert_eq!(out.len(), 1);
    }
}
