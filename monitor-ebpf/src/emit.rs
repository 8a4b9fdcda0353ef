//! The one path by which records reach userspace: `begin` fills the per-CPU scratch header
//! from a [`Call`], `emit` copies the call's user bytes after it as records of up to
//! `MAX_DATA` bytes, `output` sends a record without data.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
};
use monitor_common::*;

use crate::{
    maps::{EVENTS, SCRATCH, config, stat},
    task::{current_euid_egid, flow_of},
};

/// Bytes of one call copied at most: the longest HTTP/1 head (and HTTP/2 header block) the
/// parsers take, so that a head padded to push its credential far into the call is still
/// copied whole. Whatever lies past it is counted as truncated.
pub const MAX_CALL_BYTES: u64 = (MAX_CHUNKS as u64) * MAX_DATA as u64;

/// The per-CPU record being built. `data` is twice what a record carries: a piece of a
/// segment is copied at any offset below `MAX_DATA` and, as far as the verifier can tell, may
/// be `MAX_DATA` long; only the first `header.len <= MAX_DATA` bytes are ever sent.
#[repr(C)]
pub struct Scratch {
    pub header: EventHeader,
    pub data: [u8; 2 * MAX_DATA],
    walk: Walk,
}

/// Where `emit` is in a call, kept in the scratch rather than in registers: read back at each
/// step, its values are unknown to the verifier again, so every step's paths end in one state
/// and a long walk costs steps times one step, not the product of every step's branches.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Walk {
    /// Bytes still to copy.
    left: u64,
    /// Next byte and bytes left of the current segment.
    base: u64,
    seg_left: u64,
    /// Index of the next segment.
    next: u64,
    /// Bytes in the record being filled, and its offset in the call.
    pos: u64,
    sent: u64,
}

/// What the records of one call say about it, apart from its bytes.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// `KIND_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub dir: u8,
    /// `SOURCE_*`.
    pub source: u8,
    /// Stream identity: the `SSL *` (or `*tls.Conn`) for TLS, the `struct sock *` otherwise.
    pub conn: u64,
    /// `struct sock *`, 0 when not known.
    pub sk: usize,
    /// The socket's fd, -1 when not known.
    pub fd: i32,
    /// The flow an SSL object's socket had when it was bound; without it the flow is read from
    /// `sk`.
    pub cached: Option<&'a SslConn>,
}

impl Call<'static> {
    /// A record about the current process (exec, mmap, exit), tied to no connection.
    pub const fn process(kind: u8) -> Self {
        Call {
            kind,
            dir: DIR_EGRESS,
            source: SOURCE_SYSCALL,
            conn: 0,
            sk: 0,
            fd: -1,
            cached: None,
        }
    }
}

/// Prepares the per-CPU scratch header for one call; its data is filled by `emit`.
#[inline(always)]
pub unsafe fn begin(c: &Call) -> Option<&'static mut Scratch> {
    let ev = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let h = &mut ev.header;
    h.kind = c.kind;
    h.direction = c.dir;
    h.source = c.source;
    h.flags = 0;
    h.len = 0;
    h.ts_ns = unsafe { bpf_ktime_get_ns() };
    h.pid_tgid = bpf_get_current_pid_tgid();
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.conn = c.conn;
    h.sk = c.sk as u64;
    h.fd = c.fd;
    h.call_len = 0;
    h.offset = 0;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    (h.uid, h.gid) = unsafe { current_euid_egid() };
    match c.cached {
        Some(conn) => {
            h.flow = conn.flow;
            h.netns = conn.netns;
        }
        None if c.sk != 0 => (h.flow, h.netns) = unsafe { flow_of(c.sk) },
        None => {
            h.flow = Flow::default();
            h.netns = 0;
            h.flags |= FLAG_NO_FLOW;
        }
    }
    Some(ev)
}

/// Wake the reader only once this much is waiting: a wakeup per record costs more than the
/// record (the reader also drains on a short timer).
const WAKEUP_BYTES: u64 = 256 << 10;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// When the reader is to see a record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// With the next batch: data.
    Batched,
    /// At once: records that drive attaching (exec, mmap), since the process is about to
    /// make its first TLS call.
    Now,
}

/// Sends the header and the first `len` bytes of data. Nothing past `len` leaves the
/// scratch, so bytes an earlier call left there never reach a record.
#[inline(always)]
pub fn output(prog: u32, ev: &Scratch, len: usize, wake: Wake) {
    if len > MAX_DATA {
        return;
    }
    let bytes =
        unsafe { core::slice::from_raw_parts(ev as *const Scratch as *const u8, HEADER_LEN + len) };
    let flags = if wake == Wake::Now || EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => stat(prog, STAT_EVENTS),
        Err(_) => stat(prog, STAT_LOST),
    }
}

#[inline(always)]
pub fn looks_like_tls_record(d: &[u8]) -> bool {
    d.len() >= 3 && (0x14..=0x17).contains(&d[0]) && d[1] == 3 && d[2] <= 4
}

/// Where the bytes of a call lie in user memory.
#[derive(Clone, Copy)]
pub enum UserBytes {
    /// One buffer.
    Buf { ptr: u64, len: u64 },
    /// An array of `cnt` `struct iovec`; only the first `MAX_IOV` segments are looked at.
    Iov { iov: u64, cnt: u64 },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Segment `i` of the `cnt` at `iov`, if it is one of those looked at.
#[inline(always)]
unsafe fn segment(iov: u64, cnt: u64, i: u64) -> Option<Iovec> {
    if i >= cnt || i >= MAX_IOV as u64 {
        return None;
    }
    unsafe { bpf_probe_read_user((iov + i * 16) as *const Iovec) }.ok()
}

/// Bytes of the segments looked at, and whether they are all the call has.
#[inline(always)]
unsafe fn iov_reach(iov: u64, cnt: u64) -> Option<(u64, bool)> {
    let mut sum: u64 = 0;
    for i in 0..MAX_IOV as u64 {
        if i >= cnt {
            break;
        }
        let len: u64 = unsafe { bpf_probe_read_user((iov + i * 16 + 8) as *const u64) }.ok()?;
        sum = sum.saturating_add(len);
    }
    Some((sum, cnt <= MAX_IOV as u64))
}

/// Copies the bytes of a call as records of up to `MAX_DATA` bytes, segments packed one after
/// another, each record's `offset` its place in the call. `returned` is what a receive
/// returned; a send's length is that of its bytes. Sets the header's `call_len` (`u64::MAX`
/// when not known: a gather write of more than `MAX_IOV` segments) and, when not every byte of
/// the call is copied, `FLAG_TRUNCATED` on every record of it. Nothing is sent when the first
/// bytes are a TLS record (syscalls) or an HTTP response (with `skip_responses`).
#[inline(always)]
pub unsafe fn emit(prog: u32, ev: &mut Scratch, bytes: UserBytes, returned: Option<u64>) {
    let (reach, complete) = match bytes {
        UserBytes::Buf { len, .. } => (len, true),
        UserBytes::Iov { iov, cnt } => match unsafe { iov_reach(iov, cnt) } {
            Some(r) => r,
            None => {
                stat(prog, STAT_READ_ERRORS);
                return;
            }
        },
    };
    let call_len = match returned {
        Some(n) => n,
        None if complete => reach,
        None => u64::MAX,
    };
    let left = call_len.min(reach).min(MAX_CALL_BYTES);
    ev.header.call_len = call_len;
    if left < call_len {
        ev.header.flags |= FLAG_TRUNCATED;
        stat(prog, STAT_TRUNCATED);
    }
    let walk = &raw mut ev.walk;
    unsafe {
        walk.write_volatile(Walk {
            left,
            ..Walk::default()
        })
    };
    match bytes {
        UserBytes::Buf { ptr, .. } => unsafe { copy_buf(prog, ev, ptr) },
        UserBytes::Iov { iov, cnt } => unsafe { copy_iov(prog, ev, iov, cnt) },
    }
}

/// One buffer: a record per `MAX_DATA` bytes, each copied to the start of the scratch.
#[inline(always)]
unsafe fn copy_buf(prog: u32, ev: &mut Scratch, ptr: u64) {
    let walk = &raw mut ev.walk;
    for _ in 0..MAX_CHUNKS {
        let mut w = unsafe { walk.read_volatile() };
        let mut n = w.left;
        if n > MAX_DATA as u64 {
            n = MAX_DATA as u64;
        }
        let n = n as usize;
        if n == 0 || n > MAX_DATA {
            break;
        }
        if unsafe { bpf_probe_read_user_buf((ptr + w.sent) as *const u8, &mut ev.data[..n]) }
            .is_err()
        {
            stat(prog, STAT_READ_ERRORS);
            break;
        }
        if !unsafe { flush(prog, ev, w.sent as u32, n) } {
            break;
        }
        w.sent += n as u64;
        w.left -= n as u64;
        unsafe { walk.write_volatile(w) };
    }
}

/// Segments: their bytes packed into records one after another. Each step opens at most one
/// segment and copies until the segment or the record ends, so `MAX_IOV + MAX_CHUNKS` steps
/// always suffice.
#[inline(always)]
unsafe fn copy_iov(prog: u32, ev: &mut Scratch, iov: u64, cnt: u64) {
    let walk = &raw mut ev.walk;
    for _ in 0..MAX_IOV + MAX_CHUNKS {
        let mut w = unsafe { walk.read_volatile() };
        if w.left == 0 {
            break;
        }
        if w.seg_left == 0 {
            let Some(seg) = (unsafe { segment(iov, cnt, w.next) }) else {
                stat(prog, STAT_READ_ERRORS);
                break;
            };
            w.next += 1;
            w.base = seg.base;
            w.seg_left = seg.len;
            if seg.len == 0 {
                unsafe { walk.write_volatile(w) };
                continue;
            }
        }
        let at = w.pos as usize & (MAX_DATA - 1);
        let mut n = w.seg_left.min(w.left).min((MAX_DATA - at) as u64);
        if n > MAX_DATA as u64 {
            n = MAX_DATA as u64;
        }
        let n = n as usize;
        if n == 0 || n > MAX_DATA {
            break;
        }
        let dst = &mut ev.data[at..at + n];
        if unsafe { bpf_probe_read_user_buf(w.base as *const u8, dst) }.is_err() {
            stat(prog, STAT_READ_ERRORS);
            break;
        }
        w.pos = (at + n) as u64;
        w.base += n as u64;
        w.seg_left -= n as u64;
        w.left -= n as u64;
        if w.pos == MAX_DATA as u64 || w.left == 0 {
            if !unsafe { flush(prog, ev, w.sent as u32, w.pos as usize) } {
                return;
            }
            w.sent += w.pos;
            w.pos = 0;
        }
        unsafe { walk.write_volatile(w) };
    }
    // A read that failed part way: what was read before it still goes up.
    let w = unsafe { walk.read_volatile() };
    if w.pos > 0 {
        unsafe { flush(prog, ev, w.sent as u32, w.pos as usize) };
    }
}

/// Sends the `len` bytes gathered at `offset` of the call; false when the call is not to be
/// reported (judged on its first record).
#[inline(always)]
unsafe fn flush(prog: u32, ev: &mut Scratch, offset: u32, len: usize) -> bool {
    if len == 0 || len > MAX_DATA {
        return false;
    }
    if offset == 0 {
        let d = &ev.data[..len];
        if ev.header.source == SOURCE_SYSCALL && looks_like_tls_record(d) {
            return false;
        }
        // Only responses start with `HTTP/`, in either direction (a server's write, a
        // client's read).
        if config!(skip_responses) != 0 && len >= 5 && d[..5] == *b"HTTP/" {
            stat(prog, STAT_SKIPPED);
            return false;
        }
    }
    ev.header.len = len as u32;
    ev.header.offset = offset;
    output(prog, ev, len, Wake::Batched);
    true
}
