//! Events → per-connection byte streams → parsed requests → request records with credentials.
//!
//! Streams are keyed by (tgid, conn) where conn is the `SSL *` (TLS) or `struct sock *`
//! (plaintext), one parser per direction. TLS data may arrive before the kernel has tied its
//! `SSL *` to a socket (the first `SSL_write` of a connection); such requests wait briefly for
//! the bind event so they carry their flow.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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

/// Connections tracked at once; the least recently used are dropped past it.
const MAX_CONNS: usize = 65536;
/// How long a TLS request waits for its socket to be known.
const PENDING_WAIT_NS: u64 = 500_000_000;

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
    pub conns_evicted: u64,
    pub conns: usize,
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
}

pub struct Pipeline {
    fp: Fingerprinter,
    cfg: CredentialConfig,
    conns: HashMap<(u32, u64), Conn>,
    /// (tgid, sk) → SSL conn ids, to drop TLS streams when their socket closes.
    tls_by_sk: HashMap<(u32, u64), u64>,
    pending: HashSet<(u32, u64)>,
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
        Pipeline {
            fp,
            cfg,
            conns: HashMap::new(),
            tls_by_sk: HashMap::new(),
            pending: HashSet::new(),
            stats: PipelineStats::default(),
        }
    }

    /// Handles one event; finished records are appended to `out`.
    pub fn handle(&mut self, ev: Event, out: &mut Vec<RequestRecord>) {
        self.stats.events += 1;
        self.stats.bytes += ev.data.len() as u64;
        match ev.kind {
            Kind::Data => self.on_data(ev, out),
            Kind::TlsBind => {
                let key = (ev.tgid, ev.conn);
                let conn = self.conn(&ev);
                conn.fd = ev.fd;
                conn.sk = ev.sk;
                conn.flow = ev.flow;
                conn.netns = ev.netns;
                self.tls_by_sk.insert((ev.tgid, ev.sk), ev.conn);
                self.release(key, out);
            }
            Kind::Close => {
                let mut keys = vec![(ev.tgid, ev.sk)];
                if let Some(ssl) = self.tls_by_sk.remove(&(ev.tgid, ev.sk)) {
                    keys.push((ev.tgid, ssl));
                }
                for k in keys {
                    self.release(k, out);
                    self.conns.remove(&k);
                }
            }
            // Consumed by identity enrichment and by the attacher.
            Kind::Exec | Kind::Mmap | Kind::Exit => {}
        }
        self.stats.conns = self.conns.len();
    }

    fn conn(&mut self, ev: &Event) -> &mut Conn {
        if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&(ev.tgid, ev.conn)) {
            self.evict();
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
            });
        conn.last_ns = conn.last_ns.max(ev.ts_ns);
        conn
    }

    /// Drops the least recently used tenth of the connections.
    fn evict(&mut self) {
        let mut ages: Vec<(u64, (u32, u64))> =
            self.conns.iter().map(|(k, c)| (c.last_ns, *k)).collect();
        ages.sort_unstable();
        for (_, k) in ages.iter().take(MAX_CONNS / 10) {
            self.conns.remove(k);
            self.pending.remove(k);
            self.stats.conns_evicted += 1;
        }
    }

    fn on_data(&mut self, ev: Event, out: &mut Vec<RequestRecord>) {
        let key = (ev.tgid, ev.conn);
        self.conn(&ev);
        let conn = self.conns.get_mut(&key).expect("conn just made");
        if ev.fd >= 0 {
            conn.fd = ev.fd;
        }
        if ev.sk != 0 {
            conn.sk = ev.sk;
        }
        if ev.flow.is_some() {
            conn.flow = ev.flow;
            conn.netns = ev.netns;
        }
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
            let mut rec = self.record(&ev, key, method, host, path, credentials);
            rec.protocol = protocol;
            rec.database = database;
            let conn = self.conns.get_mut(&key).expect("conn exists");
            if conn.flow.is_none() && conn.source.is_tls() {
                conn.pending.push(rec);
                self.pending.insert(key);
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
        if !self.pending.remove(&key) {
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            for mut rec in conn.pending.drain(..) {
                set_flow(&mut rec, conn.flow, conn.fd, conn.netns);
                out.push(rec);
            }
        }
    }

    /// Emits requests that waited too long for their socket; call periodically with the
    /// current monotonic time (or the last event's time when replaying).
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<RequestRecord>) {
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|k| {
                self.conns
                    .get(k)
                    .and_then(|c| c.pending.first())
                    .is_none_or(|r| now_ns.saturating_sub(r.ts_ns) >= PENDING_WAIT_NS)
            })
            .copied()
            .collect();
        for k in due {
            self.release(k, out);
        }
    }

    /// Emits everything still waiting (shutdown).
    pub fn flush_all(&mut self, out: &mut Vec<RequestRecord>) {
        self.flush(u64::MAX, out);
    }
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
