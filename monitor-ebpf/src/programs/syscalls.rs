//! Socket syscall tracepoints: plaintext TCP is copied; a TLS record leaving a thread inside
//! (or just after) an SSL call ties that SSL object to its socket instead.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use monitor_common::*;

use super::{bind, ssl_key};
use crate::{
    emit::{Call, UserBytes, Wake, begin, emit, looks_like_tls_record, output},
    filter::ignored,
    maps::{ACTIVE, READS, SSL_CONN, TLS_SOCKS, WRITE_MARK, config, stat},
    task::tcp_sock_of_fd,
};

/// `struct user_msghdr` → (msg_iov, msg_iovlen).
#[inline(always)]
unsafe fn msg_iov(msg: u64) -> Option<(u64, u64)> {
    unsafe {
        let iov: u64 = bpf_probe_read_user((msg + 16) as *const u64).ok()?;
        let cnt: u64 = bpf_probe_read_user((msg + 24) as *const u64).ok()?;
        Some((iov, cnt))
    }
}

/// The user bytes of a call of `shape` whose buffer argument is `arg` (and length `count`).
#[inline(always)]
unsafe fn user_bytes(shape: u32, arg: u64, count: u64) -> Option<UserBytes> {
    Some(match shape {
        SHAPE_BUF => UserBytes::Buf {
            ptr: arg,
            len: count,
        },
        SHAPE_IOV => UserBytes::Iov {
            iov: arg,
            cnt: count,
        },
        _ => {
            let (iov, cnt) = unsafe { msg_iov(arg)? };
            UserBytes::Iov { iov, cnt }
        }
    })
}

/// First user buffer of a write-like call, to recognise a TLS record.
#[inline(always)]
unsafe fn first_bytes(shape: u32, arg: u64) -> [u8; 3] {
    unsafe {
        let ptr = match shape {
            SHAPE_BUF => arg,
            SHAPE_IOV => bpf_probe_read_user(arg as *const u64).unwrap_or(0),
            _ => match msg_iov(arg) {
                Some((iov, _)) => bpf_probe_read_user(iov as *const u64).unwrap_or(0),
                None => 0,
            },
        };
        bpf_probe_read_user(ptr as *const [u8; 3]).unwrap_or([0; 3])
    }
}

/// True when the thread is inside an SSL call (or, for writes, just after one) whose object
/// is already tied to `fd`: the syscall is that call's ciphertext and needs no look at the
/// socket at all.
#[inline(always)]
unsafe fn nested_in_bound_ssl(pid_tgid: u64, fd: i64, reading: bool) -> bool {
    let a = if reading {
        unsafe { ACTIVE.get(pid_tgid) }
    } else {
        unsafe { WRITE_MARK.get(pid_tgid) }
    };
    let Some(a) = a else {
        return false;
    };
    let key = ssl_key(pid_tgid, a.ssl);
    let bound = unsafe { SSL_CONN.get(key) }.is_some_and(|c| c.fd as i64 == fd);
    if bound && !reading {
        let _ = WRITE_MARK.remove(pid_tgid);
    }
    bound
}

/// A plaintext data call on socket `sk`.
#[inline(always)]
fn socket_call(dir: u8, sk: usize, fd: i32) -> Call<'static> {
    Call {
        kind: KIND_DATA,
        dir,
        source: SOURCE_SYSCALL,
        conn: sk as u64,
        sk,
        fd,
        cached: None,
    }
}

#[inline(always)]
unsafe fn on_send(ctx: &TracePointContext, shape: u32) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_SYS_WRITE, STAT_HITS);
    unsafe {
        let fd: i64 = ctx.read_at(16).ok()?;
        let arg: u64 = ctx.read_at(24).ok()?;
        let count: u64 = ctx.read_at(32).ok()?;
        if nested_in_bound_ssl(pid_tgid, fd, false) {
            return None;
        }
        let sk = tcp_sock_of_fd(fd)?;
        if let Some(m) = WRITE_MARK.get(pid_tgid) {
            // Only a TLS record is the last SSL_write's ciphertext; other writes of the thread
            // (plaintext sockets, logs) leave the mark in place.
            if looks_like_tls_record(&first_bytes(shape, arg)) {
                let (ssl, source) = (m.ssl, m.source());
                let _ = WRITE_MARK.remove(pid_tgid);
                bind(PROG_SYS_WRITE, source, pid_tgid, ssl, fd as i32, sk);
                return None;
            }
        }
        if TLS_SOCKS.get(sk as u64).is_some() {
            return None;
        }
        if config!(capture_plaintext) == 0 {
            return None;
        }
        let bytes = user_bytes(shape, arg, count)?;
        let ev = begin(&socket_call(DIR_EGRESS, sk, fd as i32))?;
        emit(PROG_SYS_WRITE, ev, bytes, None);
    }
    Some(())
}

#[inline(always)]
unsafe fn on_recv_enter(ctx: &TracePointContext, shape: u32) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_SYS_READ, STAT_HITS);
    unsafe {
        let fd: i64 = ctx.read_at(16).ok()?;
        let arg: u64 = ctx.read_at(24).ok()?;
        let count: u64 = ctx.read_at(32).ok()?;
        if nested_in_bound_ssl(pid_tgid, fd, true) {
            return None;
        }
        let sk = tcp_sock_of_fd(fd)?;
        if let Some(a) = ACTIVE.get(pid_tgid) {
            bind(PROG_SYS_READ, a.source(), pid_tgid, a.ssl, fd as i32, sk);
            return None;
        }
        if TLS_SOCKS.get(sk as u64).is_some() {
            return None;
        }
        if config!(capture_plaintext) == 0 {
            return None;
        }
        let args = ReadArgs {
            sk: sk as u64,
            buf: arg,
            count,
            fd: fd as i32,
            shape,
        };
        let _ = READS.insert(pid_tgid, args, 0);
    }
    Some(())
}

#[inline(always)]
unsafe fn on_recv_exit(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let args = unsafe { *READS.get(pid_tgid)? };
    let _ = READS.remove(pid_tgid);
    stat(PROG_SYS_READ_RET, STAT_HITS);
    let ret: i64 = unsafe { ctx.read_at(16).ok()? };
    if ret <= 0 {
        return None;
    }
    unsafe {
        let bytes = user_bytes(args.shape, args.buf, args.count)?;
        let ev = begin(&socket_call(DIR_INGRESS, args.sk as usize, args.fd))?;
        emit(PROG_SYS_READ_RET, ev, bytes, Some(ret as u64));
    }
    Some(())
}

/// One program per syscall tracepoint (a program attaches to one event), each a call into
/// the shared handler with the shape of the syscall's buffer argument.
macro_rules! syscall_programs {
    ($($name:ident => $handler:ident($shape:expr);)*) => {$(
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            unsafe { $handler(&ctx, $shape) };
            0
        }
    )*};
}

syscall_programs! {
    sys_enter_write => on_send(SHAPE_BUF);
    sys_enter_sendto => on_send(SHAPE_BUF);
    sys_enter_writev => on_send(SHAPE_IOV);
    sys_enter_sendmsg => on_send(SHAPE_MSG);
    sys_enter_read => on_recv_enter(SHAPE_BUF);
    sys_enter_recvfrom => on_recv_enter(SHAPE_BUF);
    sys_enter_readv => on_recv_enter(SHAPE_IOV);
    sys_enter_recvmsg => on_recv_enter(SHAPE_MSG);
}

/// Attached to the exit of read, recvfrom, readv and recvmsg.
#[tracepoint]
pub fn sys_exit_recv(ctx: TracePointContext) -> u32 {
    unsafe { on_recv_exit(&ctx) };
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return 0;
    }
    unsafe {
        let Ok(fd) = ctx.read_at::<i64>(16) else {
            return 0;
        };
        let Some(sk) = tcp_sock_of_fd(fd) else {
            return 0;
        };
        stat(PROG_SYS_CLOSE, STAT_HITS);
        if let Some(key) = TLS_SOCKS.get(sk as u64) {
            let key = *key;
            let _ = SSL_CONN.remove(key);
            let _ = TLS_SOCKS.remove(sk as u64);
        }
        let call = Call {
            kind: KIND_CLOSE,
            ..socket_call(DIR_EGRESS, sk, fd as i32)
        };
        if let Some(ev) = begin(&call) {
            output(PROG_SYS_CLOSE, ev, 0, Wake::Batched);
        }
    }
    0
}
