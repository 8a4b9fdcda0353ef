//! The programs, one module per family, and what the families share: which socket an SSL
//! object (or Go `*tls.Conn`) writes to.

pub mod floor;
#[cfg(bpf_target_arch = "x86_64")]
pub mod golang;
pub mod openssl;
pub mod process;
pub mod syscalls;

use monitor_common::{DIR_EGRESS, KIND_TLS_BIND, SslConn, SslKey};

use crate::{
    emit::{Call, Wake, begin, output},
    maps::{SSL_CONN, TLS_SOCKS},
};

/// The key of a TLS object (`SSL *`, `gnutls_session_t`, `*tls.Conn`) of the current process.
#[inline(always)]
pub fn ssl_key(pid_tgid: u64, ssl: u64) -> SslKey {
    SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    }
}

/// A data call on TLS object `ssl`, with its socket and flow when it is bound already.
#[inline(always)]
pub fn tls_call(dir: u8, source: u8, ssl: u64, conn: Option<&SslConn>) -> Call<'_> {
    let (sk, fd) = conn.map_or((0, -1), |c| (c.sk as usize, c.fd));
    Call {
        kind: monitor_common::KIND_DATA,
        dir,
        source,
        conn: ssl,
        sk,
        fd,
        cached: conn,
    }
}

/// Ties a TLS object to the socket its nested syscall used; reports it when new or changed.
#[inline(always)]
pub unsafe fn bind(prog: u32, source: u8, pid_tgid: u64, ssl: u64, fd: i32, sk: usize) {
    let key = ssl_key(pid_tgid, ssl);
    let changed = match unsafe { SSL_CONN.get(key) } {
        Some(c) => c.sk != sk as u64 || c.fd != fd,
        None => true,
    };
    if !changed {
        return;
    }
    let call = Call {
        kind: KIND_TLS_BIND,
        dir: DIR_EGRESS,
        source,
        conn: ssl,
        sk,
        fd,
        cached: None,
    };
    let Some(ev) = (unsafe { begin(&call) }) else {
        return;
    };
    let conn = SslConn {
        sk: sk as u64,
        fd,
        netns: ev.header.netns,
        flow: ev.header.flow,
    };
    let _ = SSL_CONN.insert(key, conn, 0);
    let _ = TLS_SOCKS.insert(sk as u64, key, 0);
    output(prog, ev, 0, Wake::Batched);
}
