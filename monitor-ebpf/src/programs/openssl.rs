//! TLS library uprobes: OpenSSL `SSL_write`/`SSL_read` (and `_ex`) and GnuTLS
//! `gnutls_record_send`/`_recv`, at entry and return. Writes are copied at entry, before
//! encryption; reads at return, after decryption.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use monitor_common::*;

use super::{ssl_key, tls_call};
use crate::{
    emit::{UserBytes, begin, emit},
    filter::ignored,
    maps::{ACTIVE, SSL_CONN, UNSENT, WRITE_MARK, WRITES, stat},
};

/// `gnutls_record_send(session, data, size)`: the same shape as `SSL_write`; its return is
/// handled by `ssl_write_ret`.
#[uprobe]
pub fn gnutls_send(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_write(&ctx, false, SOURCE_GNUTLS) };
    0
}

/// `gnutls_record_recv(session, data, size)`: the same shape as `SSL_read`; its return is
/// handled by `ssl_read_ret`, which takes the library from the saved call.
#[uprobe]
pub fn gnutls_recv(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_read(&ctx, false, SOURCE_GNUTLS) };
    0
}

/// `SSL_write(ssl, buf, num)` (and `gnutls_record_send`, the same shape): the plaintext is
/// copied now; the return notes what the library did not take.
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_write(&ctx, false, SOURCE_OPENSSL) };
    0
}

/// `SSL_write_ex(ssl, buf, num, size_t *written)`.
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_write(&ctx, true, SOURCE_OPENSSL) };
    0
}

#[inline(always)]
unsafe fn on_ssl_write(ctx: &ProbeContext, ex: bool, source: u8) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_SSL_WRITE, STAT_HITS);
    let a = SslActive {
        ssl: ctx.arg(0)?,
        buf: ctx.arg(1)?,
        // `int num` for SSL_write, `size_t` for _ex and GnuTLS.
        len: if ex {
            ctx.arg::<u64>(2)?
        } else {
            ctx.arg::<u64>(2)? as u32 as u64
        },
        out_len: if ex { ctx.arg(3)? } else { 0 },
        is_read: 0,
        source: source as u32,
    };
    let _ = WRITES.insert(pid_tgid, a, 0);
    let _ = WRITE_MARK.insert(pid_tgid, a, 0);
    if a.len == 0 || a.len > i32::MAX as u64 {
        return None;
    }
    let key = ssl_key(pid_tgid, a.ssl);
    if unsafe { UNSENT.get(key) }.is_some_and(|left| *left == a.len) {
        return None; // a retry: reported when first tried
    }
    let conn = unsafe { SSL_CONN.get(key) };
    unsafe {
        let ev = begin(&tls_call(DIR_EGRESS, source, a.ssl, conn))?;
        let bytes = UserBytes::Buf {
            ptr: a.buf,
            len: a.len,
        };
        emit(PROG_SSL_WRITE, ev, bytes, None);
    }
    Some(())
}

/// Return of `SSL_write`, `SSL_write_ex` and `gnutls_record_send`: notes what the library did
/// not take, so its retry is not reported twice.
#[uretprobe]
pub fn ssl_write_ret(ctx: RetProbeContext) -> u32 {
    unsafe { on_ssl_write_ret(&ctx) };
    0
}

/// The return of `SSL_write` without a uretprobe: a uprobe on the emulated instruction right
/// after its call to the inner `_ex`-shaped function, where RAX holds that call's result and
/// its frame (so the out-parameter) is still live. Userspace proves the site from the
/// instruction stream (`probe/site.rs`); the entry was taken at that call by `ssl_write_ex`.
#[uprobe]
pub fn ssl_write_ret_site(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_write_ret(&RetProbeContext { regs: ctx.regs }) };
    0
}

#[inline(always)]
unsafe fn on_ssl_write_ret(ctx: &RetProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let a = unsafe { *WRITES.get(pid_tgid)? };
    let _ = WRITES.remove(pid_tgid);
    let key = ssl_key(pid_tgid, a.ssl);
    match unsafe { call_result(ctx, &a) } {
        Some(n) if n >= a.len => {
            let _ = UNSENT.remove(key);
        }
        Some(n) => {
            let _ = UNSENT.insert(key, a.len - n, 0);
        }
        None => {
            let _ = UNSENT.insert(key, a.len, 0);
        }
    }
    Some(())
}

/// Bytes a read or write call moved, from its return value (and `*out_len` for the `_ex`
/// forms); None when it failed or moved nothing.
#[inline(always)]
unsafe fn call_result(ctx: &RetProbeContext, a: &SslActive) -> Option<u64> {
    if a.out_len != 0 {
        if ctx.ret::<u64>() as u32 as i32 != 1 {
            return None;
        }
        return unsafe { bpf_probe_read_user(a.out_len as *const u64).ok() };
    }
    // ssize_t for GnuTLS, int for OpenSSL: the low half is right for both (calls move < 2 GiB).
    let ret = ctx.ret::<u64>() as u32 as i32;
    (ret > 0).then_some(ret as u64)
}

/// `SSL_read(ssl, buf, num)`: remember the buffer; the data is there at return.
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_read(&ctx, false, SOURCE_OPENSSL) };
    0
}

/// `SSL_read_ex(ssl, buf, num, size_t *readbytes)`.
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_read(&ctx, true, SOURCE_OPENSSL) };
    0
}

#[inline(always)]
unsafe fn on_ssl_read(ctx: &ProbeContext, ex: bool, source: u8) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_SSL_READ, STAT_HITS);
    let active = SslActive {
        ssl: ctx.arg(0)?,
        buf: ctx.arg(1)?,
        len: ctx.arg::<u64>(2)?,
        out_len: if ex { ctx.arg(3)? } else { 0 },
        is_read: 1,
        source: source as u32,
    };
    let _ = ACTIVE.insert(pid_tgid, active, 0);
    Some(())
}

/// Return of `SSL_read` and `SSL_read_ex`.
#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    unsafe { on_ssl_read_ret(&ctx) };
    0
}

/// The return of `SSL_read` without a uretprobe (the `jle` after `call ssl_read_internal`):
/// as `ssl_write_ret_site`.
#[uprobe]
pub fn ssl_read_ret_site(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_read_ret(&RetProbeContext { regs: ctx.regs }) };
    0
}

#[inline(always)]
unsafe fn on_ssl_read_ret(ctx: &RetProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let a = unsafe { *ACTIVE.get(pid_tgid)? };
    let _ = ACTIVE.remove(pid_tgid);
    if a.is_read == 0 {
        return None;
    }
    stat(PROG_SSL_READ_RET, STAT_HITS);
    let n = unsafe { call_result(ctx, &a)? };
    let conn = unsafe { SSL_CONN.get(ssl_key(pid_tgid, a.ssl)) };
    unsafe {
        let ev = begin(&tls_call(DIR_INGRESS, a.source(), a.ssl, conn))?;
        let bytes = UserBytes::Buf {
            ptr: a.buf,
            len: a.len,
        };
        emit(PROG_SSL_READ_RET, ev, bytes, Some(n));
    }
    Some(())
}
