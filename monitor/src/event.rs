//! Captured events as userspace sees them: decoded from the ring buffer, or read back from a
//! recorded event log.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use anyhow::{Result, bail};
use monitor_common::{
    AF_INET, AF_INET6, DIR_INGRESS, EventHeader, FLAG_NO_FLOW, HEADER_LEN, KIND_CLOSE, KIND_DATA,
    KIND_EXEC, KIND_EXIT, KIND_MMAP, KIND_TLS_BIND, SOURCE_GNUTLS, SOURCE_GO, SOURCE_OPENSSL,
};
use serde::{Deserialize, Serialize};

use crate::identity::{container::Runtime, kube::Pod};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Data,
    TlsBind,
    Close,
    /// A program was executed; `data` is its file name.
    Exec,
    /// A file was mapped executable; `data` is its name. Drives attaching to new libraries.
    Mmap,
    /// A process exited. Drives detaching from libraries nobody maps any more.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

/// Where the bytes were taken: a TLS library's plaintext, or a socket syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Syscall,
    Openssl,
    Gnutls,
    Go,
}

impl Source {
    pub fn is_tls(self) -> bool {
        self != Source::Syscall
    }

    pub fn library(self) -> Option<&'static str> {
        match self {
            Source::Syscall => None,
            Source::Openssl => Some("openssl"),
            Source::Gnutls => Some("gnutls"),
            Source::Go => Some("go"),
        }
    }

    fn from_kernel(source: u8) -> Self {
        match source {
            SOURCE_OPENSSL => Source::Openssl,
            SOURCE_GNUTLS => Source::Gnutls,
            SOURCE_GO => Source::Go,
            _ => Source::Syscall,
        }
    }
}

/// The local and remote end of a TCP connection, from the observing process's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Version of the recorded event log format (`v` on every line).
pub const LOG_VERSION: u32 = 1;

/// One captured chunk. Serialised one per line, this is the event log of
/// `monitor run --record` and `monitor replay` (format in `docs/event-log.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    #[serde(default = "log_version")]
    pub v: u32,
    pub kind: Kind,
    /// Wall-clock time, ns since the Unix epoch (set by enrichment).
    #[serde(default)]
    pub time_ns: u64,
    /// Node (host) name (set by enrichment).
    #[serde(default)]
    pub node: String,
    /// Monotonic kernel time (ns).
    pub ts_ns: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    /// Executable, resolved from /proc at capture time.
    #[serde(default)]
    pub exe: Option<Arc<str>>,
    pub cgroup_id: u64,
    /// cgroup (v2) path, resolved at capture time.
    #[serde(default)]
    pub cgroup: Option<Arc<str>>,
    /// Container (64 hex) named by the cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// Pod uid named by the cgroup (kubelet layout), known even without the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<Arc<str>>,
    /// The pod, from the Kubernetes API at capture time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<Pod>>,
    /// systemd unit of a host process (`nginx.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Arc<str>>,
    /// Effective uid and gid of the process, as the host sees them, read by the kernel at
    /// the call (never from /proc later: a short-lived client is gone by then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    pub direction: Direction,
    pub source: Source,
    /// Derived from `source`; in the log for readers that do not know the sources.
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub library: Option<String>,
    /// Stream identity within the process: `SSL *` or `struct sock *`.
    pub conn: u64,
    pub sk: u64,
    pub fd: i32,
    pub netns: u32,
    pub flow: Option<Flow>,
    /// Length of the whole call (`u64::MAX` when the kernel could not tell).
    pub call_len: u64,
    /// Offset of `data` within the call.
    pub offset: u32,
    /// Captured bytes: plaintext, credentials included. Zeroed when the event is dropped.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
}

impl Drop for Event {
    // Every event's payload dies here, whichever way it took through the pipeline.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

impl Event {
    /// Decodes one ring buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            bail!(
                "record of {} bytes is shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            );
        }
        // SAFETY: length checked; EventHeader is plain old data.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let data = &bytes[HEADER_LEN..];
        if (h.len as usize) > data.len() {
            bail!("record claims {} data bytes, has {}", h.len, data.len());
        }
        let kind = match h.kind {
            KIND_DATA => Kind::Data,
            KIND_TLS_BIND => Kind::TlsBind,
            KIND_CLOSE => Kind::Close,
            KIND_EXEC => Kind::Exec,
            KIND_MMAP => Kind::Mmap,
            KIND_EXIT => Kind::Exit,
            k => bail!("unknown record kind {k}"),
        };
        let comm_len = h.comm.iter().position(|&b| b == 0).unwrap_or(h.comm.len());
        let source = Source::from_kernel(h.source);
        Ok(Event {
            v: LOG_VERSION,
            kind,
            time_ns: 0,
            node: String::new(),
            exe: None,
            cgroup: None,
            container_id: None,
            runtime: None,
            pod_uid: None,
            pod: None,
            unit: None,
            uid: known_id(h.uid),
            gid: known_id(h.gid),
            tls: source.is_tls(),
            library: source.library().map(str::to_string),
            ts_ns: h.ts_ns,
            pid: h.pid_tgid as u32,
            tgid: (h.pid_tgid >> 32) as u32,
            comm: String::from_utf8_lossy(&h.comm[..comm_len]).into_owned(),
            cgroup_id: h.cgroup_id,
            direction: if h.direction == DIR_INGRESS {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            source,
            conn: h.conn,
            sk: h.sk,
            fd: h.fd,
            netns: h.netns,
            flow: if h.flags & FLAG_NO_FLOW != 0 {
                None
            } else {
                decode_flow(&h.flow)
            },
            call_len: h.call_len,
            offset: h.offset,
            data: data[..h.len as usize].to_vec(),
        })
    }
}

/// The kernel writes `u32::MAX` (the "no id" value of `(uid_t)-1`) when it could not read one.
fn known_id(id: u32) -> Option<u32> {
    (id != u32::MAX).then_some(id)
}

fn log_version() -> u32 {
    LOG_VERSION
}

fn decode_flow(f: &monitor_common::Flow) -> Option<Flow> {
    let (l, r): (IpAddr, IpAddr) = match f.family {
        AF_INET => {
            let s: [u8; 4] = f.saddr[..4].try_into().ok()?;
            let d: [u8; 4] = f.daddr[..4].try_into().ok()?;
            (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into())
        }
        AF_INET6 => {
            let (s, d) = (Ipv6Addr::from(f.saddr), Ipv6Addr::from(f.daddr));
            // Dual-stack sockets carry IPv4 peers as ::ffff:a.b.c.d: show them as IPv4.
            (s.to_canonical(), d.to_canonical())
        }
        _ => return None,
    };
    Some(Flow {
        local: SocketAddr::new(l, f.sport),
        remote: SocketAddr::new(r, f.dport),
    })
}

/// What `--record` managed to write: the event log on disk is best effort (a full disk
/// drops events from it; capturing goes on).
#[derive(Debug, Default, Clone, Serialize)]
pub struct LogWriteStats {
    /// Events written to the log.
    pub events: u64,
    /// Events that could not be written (counted per batch that failed).
    pub dropped: u64,
    /// Failed writes per error kind (`StorageFull`, `QuotaExceeded`, ...).
    pub errors: std::collections::BTreeMap<String, u64>,
}

/// The longest event log line read: the largest record the kernel sends is 4 KiB of data
/// (5.5 KiB in base64), identity included a line stays far below this.
pub const MAX_LOG_LINE: usize = 1 << 20;

/// Why an event log line was not an event. Says where and what kind of problem, never the
/// content: a line holds captured plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogLineError {
    #[error("line longer than {MAX_LOG_LINE} bytes")]
    TooLong,
    #[error("not UTF-8 (byte {offset})")]
    NotUtf8 { offset: usize },
    #[error("{category} at column {column}")]
    Json {
        /// `syntax`, `data` (a field of the wrong type or value), `eof`.
        category: &'static str,
        column: usize,
    },
    #[error("event log version {0} is newer than this monitor's {LOG_VERSION}")]
    Version(u32),
}

impl Event {
    /// Decodes one event log line (without its newline).
    pub fn from_log_line(line: &[u8]) -> Result<Event, LogLineError> {
        if line.len() > MAX_LOG_LINE {
            return Err(LogLineError::TooLong);
        }
        // Checked first so that the error names the byte, not serde's wording.
        let text = std::str::from_utf8(line).map_err(|e| LogLineError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        let ev: Event = serde_json::from_str(text).map_err(|e| LogLineError::Json {
            // serde_json's message may quote the offending value: only its class is kept.
            category: match e.classify() {
                serde_json::error::Category::Io => "io",
                serde_json::error::Category::Syntax => "syntax",
                serde_json::error::Category::Data => "data",
                serde_json::error::Category::Eof => "eof",
            },
            column: e.column(),
        })?;
        if ev.v > LOG_VERSION {
            return Err(LogLineError::Version(ev.v));
        }
        Ok(ev)
    }
}

/// Zeroes the bytes in use and empties `buf`, keeping its allocation (its spare capacity
/// was zeroed when it was last in use).
pub fn wipe(buf: &mut Vec<u8>) {
    zeroize::Zeroize::zeroize(buf.as_mut_slice());
    buf.clear();
}

/// Reads an event log line by line, each line bounded by [`MAX_LOG_LINE`] (a longer one is
/// skipped without being held), blank lines skipped. Yields `(line number, event or why
/// not)`; only an I/O error of the reader itself ends it.
pub struct LogReader<R> {
    input: R,
    line: u64,
    buf: zeroize::Zeroizing<Vec<u8>>,
}

impl<R: std::io::BufRead> LogReader<R> {
    pub fn new(input: R) -> Self {
        LogReader {
            input,
            line: 0,
            buf: zeroize::Zeroizing::new(Vec::new()),
        }
    }

    /// Reads one line into `buf`, or past it when it is too long; `Ok(None)` at the end.
    fn read_line(&mut self) -> std::io::Result<Option<bool>> {
        wipe(&mut self.buf);
        let mut too_long = false;
        let mut any = false;
        loop {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(any.then_some(too_long));
            }
            any = true;
            let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if self.buf.len() + take > MAX_LOG_LINE {
                    too_long = true;
                    wipe(&mut self.buf);
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.input.consume(take + end as usize);
            if end {
                return Ok(Some(too_long));
            }
        }
    }
}

impl<R: std::io::BufRead> Iterator for LogReader<R> {
    type Item = std::io::Result<(u64, Result<Event, LogLineError>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let too_long = match self.read_line() {
                Ok(None) => return None,
                Ok(Some(t)) => t,
                Err(e) => return Some(Err(e)),
            };
            self.line += 1;
            if too_long {
                return Some(Ok((self.line, Err(LogLineError::TooLong))));
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok((self.line, Event::from_log_line(&self.buf))));
        }
    }
}

mod b64 {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::{DataEvent, MAX_DATA};

    fn raw(len: u32, family: u16) -> Vec<u8> {
        let mut ev: DataEvent = unsafe { std::mem::zeroed() };
        ev.header.kind = KIND_DATA;
        ev.header.source = SOURCE_OPENSSL;
        ev.header.len = len;
        ev.header.pid_tgid = (7 << 32) | 9;
        ev.header.uid = 1000;
        ev.header.gid = u32::MAX;
        ev.header.comm[..4].copy_from_slice(b"curl");
        ev.header.flow.family = family;
        ev.header.flow.sport = 5555;
        ev.header.flow.dport = 443;
        ev.header.flow.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.header.flow.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.data[..5].copy_from_slice(b"GET /");
        let bytes = unsafe {
            std::slice::from_raw_parts(&ev as *const DataEvent as *const u8, HEADER_LEN + MAX_DATA)
        };
        bytes[..HEADER_LEN + len as usize].to_vec()
    }

    #[test]
    fn decodes_header_flow_and_data() {
        let e = Event::decode(&raw(5, AF_INET)).unwrap();
        assert_eq!((e.tgid, e.pid, e.comm.as_str()), (7, 9, "curl"));
        // The caller's ids come with the record; an unreadable one is unknown, not root.
        assert_eq!((e.uid, e.gid), (Some(1000), None));
        assert_eq!(e.data, b"GET /");
        let f = e.flow.unwrap();
        assert_eq!(f.local.to_string(), "10.0.0.2:5555");
        assert_eq!(f.remote.to_string(), "10.0.0.1:443");
        assert!(e.source.is_tls());
    }

    #[test]
    fn log_lines_round_trip() {
        let e = Event::decode(&raw(5, AF_INET)).unwrap();
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.contains(r#""data":"R0VUIC8=""#), "{line}");
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back.data, e.data);
        assert_eq!(back.flow, e.flow);
        assert_eq!(back.v, LOG_VERSION);
    }

    #[test]
    fn bad_log_lines_are_skipped_with_their_number_and_no_content() {
        let good = serde_json::to_string(&Event::decode(&raw(5, AF_INET)).unwrap()).unwrap();
        // A secret in a field of the wrong type: serde_json would quote it in its message.
        let wrong_type = good.replace(
            r#""comm":"curl""#,
            r#""comm":"s3cr3t-value","pid":"s3cr3t""#,
        );
        let mut log = Vec::new();
        log.extend_from_slice(good.as_bytes());
        log.extend_from_slice(b"\n\xff\xfes3cr3t\n\n   \n");
        log.extend_from_slice(wrong_type.as_bytes());
        log.extend_from_slice(b"\n{\"kind\":\"s3cr3t\"}\n");
        log.extend(std::iter::repeat_n(b'x', MAX_LOG_LINE + 10));
        log.extend_from_slice(b"\n");
        log.extend_from_slice(good.as_bytes());
        let got: Vec<_> = LogReader::new(&log[..]).map(Result::unwrap).collect();
        let lines: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(lines, [1, 2, 5, 6, 7, 8]);
        assert!(got[0].1.is_ok() && got[5].1.is_ok());
        assert_eq!(
            got[1].1.as_ref().unwrap_err(),
            &LogLineError::NotUtf8 { offset: 0 }
        );
        assert!(matches!(
            got[2].1,
            Err(LogLineError::Json {
                category: "data",
                ..
            })
        ));
        assert!(matches!(
            got[3].1,
            Err(LogLineError::Json {
                category: "data",
                ..
            })
        ));
        assert_eq!(got[4].1.as_ref().unwrap_err(), &LogLineError::TooLong);
        for (_, r) in &got {
            if let Err(e) = r {
                let text = format!("{e} {e:?}");
                assert!(!text.contains("s3cr3t"), "{text}");
            }
        }
    }

    #[test]
    fn a_last_line_without_newline_is_read() {
        let good = serde_json::to_string(&Event::decode(&raw(5, AF_INET)).unwrap()).unwrap();
        let got: Vec<_> = LogReader::new(good.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].1.is_ok());
    }

    #[test]
    fn rejects_short_and_lying_records() {
        assert!(Event::decode(&[0u8; 10]).is_err());
        let mut r = raw(5, AF_INET);
        r.truncate(HEADER_LEN + 2);
        assert!(Event::decode(&r).is_err());
    }
}
