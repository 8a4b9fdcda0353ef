//! Go crypto/tls: `(*Conn).Write` at entry, `(*Conn).Read` at entry and at each of its RET
//! instructions (userspace finds them). No uretprobes: they rewrite return addresses on the
//! goroutine stack, which Go moves when it grows. A goroutine blocked in Read can resume on
//! another thread, so a Read's entry and return are paired by (tgid, g), not by thread.
//! Known gap: a Read buffer on the goroutine's own stack that moves (stack growth) while the
//! Read blocks is stale at the RET; net/http and bufio buffers live on the heap.
//!
//! Built only where the probed processes use Go's amd64 register ABI (`bpf_target_arch`, the
//! architecture whose `pt_regs` a uprobe sees): [`GoRegs::of`] is the one place that reads
//! registers; another architecture needs its own version of it (arm64: R0–R2, g in R28).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use monitor_common::*;

use super::{bind, ssl_key, tls_call};
use crate::{
    emit::{UserBytes, begin, emit},
    filter::ignored,
    maps::{GO_READS, SSL_CONN, go_off, stat},
    task::tcp_sock_of_fd,
};

/// The registers a probe on `(*Conn).Write`/`Read` and its RETs reads, Go ≥ 1.17 amd64
/// ABIInternal: Write/Read(c, b) get RAX = c, RBX = b.ptr, RCX = b.len; Read returns n in
/// RAX; R14 always holds the current goroutine `g`.
struct GoRegs {
    /// First argument at entry (`c *Conn`), first result at a RET (`n`).
    ax: u64,
    buf: u64,
    len: u64,
    g: u64,
}

impl GoRegs {
    #[inline(always)]
    fn of(ctx: &ProbeContext) -> GoRegs {
        let regs = unsafe { &*ctx.regs };
        GoRegs {
            ax: regs.rax,
            buf: regs.rbx,
            len: regs.rcx,
            g: regs.r14,
        }
    }
}

/// The socket fd inside a `*tls.Conn`, through its `net.Conn` (a `*net.TCPConn` for every
/// TCP connection; anything else yields a number that `tcp_sock_of_fd` checks).
#[inline(always)]
unsafe fn go_fd(c: u64) -> Option<i64> {
    unsafe {
        let data: u64 = bpf_probe_read_user((c + go_off!(tls_conn_data)) as *const u64).ok()?;
        let nfd: u64 = bpf_probe_read_user((data + go_off!(tcp_conn_fd)) as *const u64).ok()?;
        bpf_probe_read_user((nfd + go_off!(net_fd_sysfd)) as *const i64).ok()
    }
}

/// The socket and flow of a `*tls.Conn`: cached in `SSL_CONN` per (tgid, c); bound (and
/// reported) the first time, or again when the fd changed (the address was reused).
#[inline(always)]
unsafe fn go_conn(prog: u32, pid_tgid: u64, c: u64) -> Option<SslConn> {
    let key = ssl_key(pid_tgid, c);
    let fd = unsafe { go_fd(c) };
    if let Some(conn) = unsafe { SSL_CONN.get(key) }
        && fd.is_none_or(|fd| fd == conn.fd as i64)
    {
        return Some(*conn);
    }
    let fd = fd?;
    let sk = unsafe { tcp_sock_of_fd(fd)? };
    unsafe {
        bind(prog, SOURCE_GO, pid_tgid, c, fd as i32, sk);
        SSL_CONN.get(key).copied()
    }
}

/// Copies `len` bytes at `buf` as the plaintext of `c`.
#[inline(always)]
unsafe fn go_emit(prog: u32, dir: u8, c: u64, conn: Option<SslConn>, buf: u64, len: u64) {
    unsafe {
        if let Some(ev) = begin(&tls_call(dir, SOURCE_GO, c, conn.as_ref())) {
            emit(prog, ev, UserBytes::Buf { ptr: buf, len }, None);
        }
    }
}

/// `func (c *Conn) Write(b []byte) (int, error)`: the plaintext is complete at entry.
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    unsafe { on_go_write(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_go_write(ctx: &ProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_GO_WRITE, STAT_HITS);
    let r = GoRegs::of(ctx);
    let (c, buf, len) = (r.ax, r.buf, r.len);
    if c == 0 || len == 0 || len as i64 <= 0 {
        return None;
    }
    unsafe {
        let conn = go_conn(PROG_GO_WRITE, pid_tgid, c);
        go_emit(PROG_GO_WRITE, DIR_EGRESS, c, conn, buf, len);
    }
    Some(())
}

/// `func (c *Conn) Read(b []byte) (int, error)` entry: remember the buffer for the RET, and
/// tie the connection to its socket now, before the handshake's ciphertext is read.
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    unsafe { on_go_read(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_go_read(ctx: &ProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_GO_READ, STAT_HITS);
    let r = GoRegs::of(ctx);
    let (c, g) = (r.ax, r.g);
    if c == 0 || g == 0 {
        return None;
    }
    let active = SslActive {
        ssl: c,
        buf: r.buf,
        len: r.len,
        out_len: 0,
        is_read: 1,
        source: SOURCE_GO as u32,
    };
    let _ = GO_READS.insert(ssl_key(pid_tgid, g), active, 0);
    unsafe { go_conn(PROG_GO_READ, pid_tgid, c) };
    Some(())
}

/// At each RET of `(*Conn).Read` (a uprobe on the instruction): RAX = n.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    unsafe { on_go_read_ret(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_go_read_ret(ctx: &ProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_GO_READ_RET, STAT_HITS);
    let r = GoRegs::of(ctx);
    let key = ssl_key(pid_tgid, r.g);
    let a = unsafe { *GO_READS.get(key)? };
    let _ = GO_READS.remove(key);
    let n = r.ax as i64;
    if n <= 0 {
        return None;
    }
    let n = if n as u64 > a.len { a.len } else { n as u64 };
    unsafe {
        // Bound at entry; looked up again only if the entry lost it (closed, evicted).
        let conn = match SSL_CONN.get(ssl_key(pid_tgid, a.ssl)) {
            Some(c) => Some(*c),
            None => go_conn(PROG_GO_READ_RET, pid_tgid, a.ssl),
        };
        go_emit(PROG_GO_READ_RET, DIR_INGRESS, a.ssl, conn, a.buf, n);
    }
    Some(())
}
