//! Kernel side of the credential-reuse monitor.
//!
//! Two sources of plaintext:
//! - TLS library uprobes (OpenSSL `SSL_write`/`SSL_read` and `_ex`, GnuTLS
//!   `gnutls_record_send`/`_recv`, at entry and return) copy what was written before
//!   encryption / read after decryption;
//! - socket syscall tracepoints copy plaintext TCP traffic, and, when they carry the TLS records
//!   of an SSL call of the same thread (inside it, or right after a write through a memory
//!   BIO), tie that `SSL *` to its socket (fd, flow) instead.
//!
//! Exec, executable mmap and process exit tracepoints tell userspace what to attach to.
//!
//! Programs only copy and count; parsing happens in userspace. Nothing logs per event.
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use monitor_common::*;

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = unsafe { core::mem::zeroed() };

/// 16 MiB: at ~300 bytes a request that is ~50k requests of slack for a stalled reader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);
#[map]
static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROG_COUNT * STAT_COUNT, 0);
/// Threads inside an SSL call (entry seen, nested syscall or return not yet).
#[map]
static ACTIVE: HashMap<u64, SslActive> = HashMap::with_max_entries(16384, 0);
/// SSL_write calls between entry and return.
#[map]
static WRITES: HashMap<u64, SslActive> = HashMap::with_max_entries(16384, 0);
/// Per SSL object, bytes already reported that the library has not taken yet: a write that
/// failed for want of I/O (or took only part) must be retried with the same data (possibly
/// from another address: Node moves its buffer), and the retry is not reported again. Data is
/// copied at entry, not return, so that it reaches userspace before the peer's copy does.
#[map]
static UNSENT: LruHashMap<SslKey, u64> = LruHashMap::with_max_entries(65536, 0);
/// Per thread, the SSL object of its last SSL_write, until a TLS record leaves the thread:
/// that record is its ciphertext, whether written inside the call (blocking sockets) or just
/// after it (memory BIOs, as in Node's event loop).
#[map]
static WRITE_MARK: LruHashMap<u64, SslActive> = LruHashMap::with_max_entries(16384, 0);
/// SSL object → its socket, learnt from the syscall nested in an SSL call.
#[map]
static SSL_CONN: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(65536, 0);
/// Sockets carrying TLS through a probed library: their syscall bytes are ciphertext.
#[map]
static TLS_SOCKS: LruHashMap<u64, SslKey> = LruHashMap::with_max_entries(65536, 0);
/// Selected cgroups (`--cgroup`), when `CONFIG.filter_cgroups` is set.
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);
/// Read-like syscalls between entry and exit.
#[map]
static READS: HashMap<u64, ReadArgs> = HashMap::with_max_entries(16384, 0);

macro_rules! off {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { read_volatile(addr_of!(OFFSETS.$f)) as usize };
        v
    }};
}

#[inline(always)]
fn stat(prog: u32, which: u32) {
    if let Some(p) = STATS.get_ptr_mut(prog * STAT_COUNT + which) {
        unsafe { *p += 1 };
    }
}

/// Calls to ignore: the monitor's own (its ClickHouse and webhook traffic), and, when the
/// user selected cgroups, every other cgroup's. Checked first, before any other work.
#[inline(always)]
fn is_self(pid_tgid: u64) -> bool {
    if (pid_tgid >> 32) as u32 == unsafe { read_volatile(addr_of!(CONFIG.self_tgid)) } {
        return true;
    }
    if unsafe { read_volatile(addr_of!(CONFIG.filter_cgroups)) } != 0 {
        let cg = unsafe { bpf_get_current_cgroup_id() };
        return unsafe { CGROUPS.get(&cg) }.is_none();
    }
    false
}

#[inline(always)]
unsafe fn kread<T>(base: usize, off: usize) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off) as *const T).ok() }
}

/// `struct file *` behind `fd` of the current task.
#[inline(always)]
unsafe fn file_of_fd(fd: i64) -> Option<usize> {
    if fd < 0 {
        return None;
    }
    unsafe {
        let task = bpf_get_current_task() as usize;
        let files: usize = kread(task, off!(task_files))?;
        let fdt: usize = kread(files, off!(files_fdt))?;
        let max_fds: u32 = kread(fdt, off!(fdt_max_fds))?;
        if fd as u64 >= max_fds as u64 {
            return None;
        }
        let fd_array: usize = kread(fdt, off!(fdt_fd))?;
        let file: usize = kread(fd_array, fd as usize * 8)?;
        (file != 0).then_some(file)
    }
}

/// `struct sock *` behind `fd` of the current task, if it is a TCP socket (IPv4 or IPv6).
#[inline(always)]
unsafe fn tcp_sock_of_fd(fd: i64) -> Option<usize> {
    unsafe {
        let file = file_of_fd(fd)?;
        let inode: usize = kread(file, off!(file_inode))?;
        let mode: u16 = kread(inode, off!(inode_mode))?;
        if mode & 0o170000 != 0o140000 {
            return None; // not a socket
        }
        let socket: usize = kread(file, off!(file_private_data))?;
        let sk: usize = kread(socket, off!(socket_sk))?;
        if sk == 0 {
            return None;
        }
        let protocol: u16 = kread(sk, off!(sock_protocol))?;
        let family: u16 = kread(sk, off!(sock_family))?;
        if protocol != 6 || (family != AF_INET && family != AF_INET6) {
            return None;
        }
        Some(sk)
    }
}

#[inline(always)]
unsafe fn fill_flow(sk: usize, h: &mut EventHeader) {
    h.flow = Flow::default();
    h.netns = 0;
    if sk == 0 {
        h.flags |= FLAG_NO_FLOW;
        return;
    }
    unsafe {
        let family: u16 = kread(sk, off!(sock_family)).unwrap_or(0);
        h.flow.family = family;
        h.flow.sport = kread(sk, off!(sock_num)).unwrap_or(0);
        h.flow.dport = u16::from_be(kread(sk, off!(sock_dport)).unwrap_or(0));
        if family == AF_INET {
            let s: [u8; 4] = kread(sk, off!(sock_rcv_saddr)).unwrap_or([0; 4]);
            let d: [u8; 4] = kread(sk, off!(sock_daddr)).unwrap_or([0; 4]);
            h.flow.saddr[..4].copy_from_slice(&s);
            h.flow.daddr[..4].copy_from_slice(&d);
        } else {
            h.flow.saddr = kread(sk, off!(sock_v6_rcv_saddr)).unwrap_or([0; 16]);
            h.flow.daddr = kread(sk, off!(sock_v6_daddr)).unwrap_or([0; 16]);
        }
        let net: usize = kread(sk, off!(sock_net)).unwrap_or(0);
        if net != 0 {
            h.netns = kread(net, off!(net_ns_inum)).unwrap_or(0);
        }
    }
}

/// Effective uid and gid of the current task (`task->cred->euid/egid`, kernel-global ids);
/// `u32::MAX` (no such id) when the credentials cannot be read.
#[inline(always)]
unsafe fn current_euid_egid() -> (u32, u32) {
    let task = unsafe { bpf_get_current_task() } as usize;
    let Some(cred) = (unsafe { kread::<usize>(task, off!(task_cred)) }) else {
        return (u32::MAX, u32::MAX);
    };
    unsafe {
        (
            kread::<u32>(cred, off!(cred_euid)).unwrap_or(u32::MAX),
            kread::<u32>(cred, off!(cred_egid)).unwrap_or(u32::MAX),
        )
    }
}

/// Prepares the per-CPU scratch header for one call; data chunks are filled by `emit_chunks`.
#[inline(always)]
unsafe fn begin(
    kind: u8,
    dir: u8,
    source: u8,
    conn: u64,
    sk: usize,
    fd: i32,
    call_len: u64,
    cached: Option<&SslConn>,
) -> Option<&'static mut DataEvent> {
    let ev = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let h = &mut ev.header;
    h.kind = kind;
    h.direction = dir;
    h.source = source;
    h.flags = 0;
    h.len = 0;
    h.ts_ns = unsafe { bpf_ktime_get_ns() };
    h.pid_tgid = bpf_get_current_pid_tgid();
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.conn = conn;
    h.sk = sk as u64;
    h.fd = fd;
    h.call_len = call_len;
    h.offset = 0;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    (h.uid, h.gid) = unsafe { current_euid_egid() };
    match cached {
        Some(c) => {
            h.flow = c.flow;
            h.netns = c.netns;
        }
        None => unsafe { fill_flow(sk, h) },
    }
    Some(ev)
}

/// Wake the reader only once this much is waiting: a wakeup per record costs more than the
/// record (the reader also drains on a short timer).
const WAKEUP_BYTES: u64 = 256 << 10;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[inline(always)]
fn output(prog: u32, ev: &DataEvent, len: usize) {
    let bytes = unsafe {
        core::slice::from_raw_parts(ev as *const DataEvent as *const u8, HEADER_LEN + len)
    };
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => stat(prog, STAT_EVENTS),
        Err(_) => stat(prog, STAT_LOST),
    }
}

/// For records that drive attaching (exec, mmap): the reader must see them at once, since the
/// process is about to make its first TLS call.
#[inline(always)]
fn output_now(prog: u32, ev: &DataEvent, len: usize) {
    let bytes = unsafe {
        core::slice::from_raw_parts(ev as *const DataEvent as *const u8, HEADER_LEN + len)
    };
    match EVENTS.output::<[u8]>(bytes, BPF_RB_FORCE_WAKEUP) {
        Ok(()) => stat(prog, STAT_EVENTS),
        Err(_) => stat(prog, STAT_LOST),
    }
}

#[inline(always)]
fn looks_like_tls_record(d: &[u8]) -> bool {
    d.len() >= 3 && (0x14..=0x17).contains(&d[0]) && d[1] == 3 && d[2] <= 4
}

/// Copies `len` bytes at user address `ptr` out as up to `chunks` records; returns false when
/// the first chunk turned out to be a TLS record that should not be reported as plaintext.
#[inline(always)]
unsafe fn emit_chunks(prog: u32, ev: &mut DataEvent, ptr: u64, len: u64, chunks: u32) -> bool {
    let base = ev.header.offset;
    let mut done: u64 = 0;
    for _ in 0..chunks {
        if done >= len {
            break;
        }
        let mut n = len - done;
        if n > MAX_DATA as u64 {
            n = MAX_DATA as u64;
        }
        let n = n as usize;
        if n == 0 || n > MAX_DATA {
            break;
        }
        if unsafe { bpf_probe_read_user_buf((ptr + done) as *const u8, &mut ev.data[..n]) }.is_err()
        {
            stat(prog, STAT_READ_ERRORS);
            return true;
        }
        if done == 0 && ev.header.source == SOURCE_SYSCALL && looks_like_tls_record(&ev.data[..n]) {
            return false;
        }
        // Only responses start with `HTTP/`, in either direction (a server's write, a client's read).
        if done == 0
            && unsafe { read_volatile(addr_of!(CONFIG.skip_responses)) } != 0
            && n >= 5
            && ev.data[..5] == *b"HTTP/"
        {
            stat(prog, STAT_SKIPPED);
            return false;
        }
        ev.header.len = n as u32;
        ev.header.offset = base + done as u32;
        output(prog, ev, n);
        done += n as u64;
    }
    if done < len {
        stat(prog, STAT_TRUNCATED);
    }
    ev.header.offset = base + done as u32;
    true
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Copies up to `total` bytes spread over an iovec array, one chunk per segment.
/// `total` is `u64::MAX` when every segment is to be copied whole.
#[inline(always)]
unsafe fn emit_iov(prog: u32, ev: &mut DataEvent, iov: u64, iovcnt: u64, total: u64) {
    let mut left = total;
    for i in 0..MAX_IOV {
        if i as u64 >= iovcnt || left == 0 {
            break;
        }
        let Ok(seg) = (unsafe { bpf_probe_read_user((iov + i as u64 * 16) as *const Iovec) })
        else {
            stat(prog, STAT_READ_ERRORS);
            return;
        };
        let n = if seg.len < left { seg.len } else { left };
        if !unsafe { emit_chunks(prog, ev, seg.base, n, 1) } {
            return;
        }
        left -= n;
    }
    // `total` is u64::MAX for sends (the sum is not known): then only segments past
    // MAX_IOV were left out; for receives, bytes returned and not copied were.
    let dropped = if total == u64::MAX {
        iovcnt > MAX_IOV as u64
    } else {
        left > 0
    };
    if dropped {
        stat(prog, STAT_TRUNCATED);
    }
}

/// `struct user_msghdr` → (msg_iov, msg_iovlen).
#[inline(always)]
unsafe fn msg_iov(msg: u64) -> Option<(u64, u64)> {
    unsafe {
        let iov: u64 = bpf_probe_read_user((msg + 16) as *const u64).ok()?;
        let cnt: u64 = bpf_probe_read_user((msg + 24) as *const u64).ok()?;
        Some((iov, cnt))
    }
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

/// Ties an SSL object to the socket its nested syscall used; reports it when new or changed.
#[inline(always)]
unsafe fn bind(prog: u32, source: u8, pid_tgid: u64, ssl: u64, fd: i32, sk: usize) {
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    };
    let changed = match unsafe { SSL_CONN.get(&key) } {
        Some(c) => c.sk != sk as u64 || c.fd != fd,
        None => true,
    };
    if !changed {
        return;
    }
    let Some(ev) = (unsafe {
        begin(
            KIND_TLS_BIND,
            DIR_EGRESS,
            source,
            ssl,
            sk,
            fd,
            0,
            None,
        )
    }) else {
        return;
    };
    let conn = SslConn {
        sk: sk as u64,
        fd,
        netns: ev.header.netns,
        flow: ev.header.flow,
    };
    let _ = SSL_CONN.insert(&key, &conn, 0);
    let _ = TLS_SOCKS.insert(&(sk as u64), &key, 0);
    output(prog, ev, 0);
}

/// True when the thread is inside an SSL call (or, for writes, just after one) whose object
/// is already tied to `fd`: the syscall is that call's ciphertext and needs no look at the
/// socket at all.
#[inline(always)]
unsafe fn nested_in_bound_ssl(pid_tgid: u64, fd: i64, reading: bool) -> bool {
    let a = if reading {
        unsafe { ACTIVE.get(&pid_tgid) }
    } else {
        unsafe { WRITE_MARK.get(&pid_tgid) }
    };
    let Some(a) = a else {
        return false;
    };
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: a.ssl,
    };
    let bound = unsafe { SSL_CONN.get(&key) }.is_some_and(|c| c.fd as i64 == fd);
    if bound && !reading {
        let _ = WRITE_MARK.remove(&pid_tgid);
    }
    bound
}

#[inline(always)]
unsafe fn on_send(ctx: &TracePointContext, shape: u32) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_self(pid_tgid) {
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
        if let Some(m) = WRITE_MARK.get(&pid_tgid) {
            // Only a TLS record is the last SSL_write's ciphertext; other writes of the thread
            // (plaintext sockets, logs) leave the mark in place.
            if looks_like_tls_record(&first_bytes(shape, arg)) {
                let (ssl, source) = (m.ssl, m.source());
                let _ = WRITE_MARK.remove(&pid_tgid);
                bind(PROG_SYS_WRITE, source, pid_tgid, ssl, fd as i32, sk);
                return None;
            }
        }
        if TLS_SOCKS.get(&(sk as u64)).is_some() {
            return None;
        }
        if read_volatile(addr_of!(CONFIG.capture_plaintext)) == 0 {
            return None;
        }
        let ev = begin(
            KIND_DATA,
            DIR_EGRESS,
            SOURCE_SYSCALL,
            sk as u64,
            sk,
            fd as i32,
            0,
            None,
        )?;
        match shape {
            SHAPE_BUF => {
                ev.header.call_len = count;
                emit_chunks(PROG_SYS_WRITE, ev, arg, count, MAX_CHUNKS);
            }
            SHAPE_IOV => {
                ev.header.call_len = u64::MAX;
                emit_iov(PROG_SYS_WRITE, ev, arg, count, u64::MAX);
            }
            _ => {
                let (iov, cnt) = msg_iov(arg)?;
                ev.header.call_len = u64::MAX;
                emit_iov(PROG_SYS_WRITE, ev, iov, cnt, u64::MAX);
            }
        }
    }
    Some(())
}

#[inline(always)]
unsafe fn on_recv_enter(ctx: &TracePointContext, shape: u32) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_self(pid_tgid) {
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
        if let Some(a) = ACTIVE.get(&pid_tgid) {
            bind(PROG_SYS_READ, a.source(), pid_tgid, a.ssl, fd as i32, sk);
            return None;
        }
        if TLS_SOCKS.get(&(sk as u64)).is_some() {
            return None;
        }
        if read_volatile(addr_of!(CONFIG.capture_plaintext)) == 0 {
            return None;
        }
        let args = ReadArgs {
            sk: sk as u64,
            buf: arg,
            count,
            fd: fd as i32,
            shape,
        };
        let _ = READS.insert(&pid_tgid, &args, 0);
    }
    Some(())
}

#[inline(always)]
unsafe fn on_recv_exit(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let args = unsafe { *READS.get(&pid_tgid)? };
    let _ = READS.remove(&pid_tgid);
    stat(PROG_SYS_READ_RET, STAT_HITS);
    let ret: i64 = unsafe { ctx.read_at(16).ok()? };
    if ret <= 0 {
        return None;
    }
    let sk = args.sk as usize;
    unsafe {
        let ev = begin(
            KIND_DATA,
            DIR_INGRESS,
            SOURCE_SYSCALL,
            sk as u64,
            sk,
            args.fd,
            ret as u64,
            None,
        )?;
        match args.shape {
            SHAPE_BUF => {
                emit_chunks(PROG_SYS_READ_RET, ev, args.buf, ret as u64, MAX_CHUNKS);
            }
            SHAPE_IOV => emit_iov(PROG_SYS_READ_RET, ev, args.buf, args.count, ret as u64),
            _ => {
                let (iov, cnt) = msg_iov(args.buf)?;
                emit_iov(PROG_SYS_READ_RET, ev, iov, cnt, ret as u64);
            }
        }
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
    if is_self(pid_tgid) {
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
        if let Some(key) = TLS_SOCKS.get(&(sk as u64)) {
            let key = *key;
            let _ = SSL_CONN.remove(&key);
            let _ = TLS_SOCKS.remove(&(sk as u64));
        }
        if let Some(ev) = begin(
            KIND_CLOSE,
            DIR_EGRESS,
            SOURCE_SYSCALL,
            sk as u64,
            sk,
            fd as i32,
            0,
            None,
        ) {
            output(PROG_SYS_CLOSE, ev, 0);
        }
    }
    0
}

/// `sched:sched_process_exec`: the executable of every new program, before its first call.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    unsafe { on_exec(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_exec(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_self(pid_tgid) {
        return None;
    }
    stat(PROG_EXEC, STAT_HITS);
    unsafe {
        // `__data_loc char[] filename` at offset 8: low 16 bits offset, high 16 bits length.
        let loc: u32 = ctx.read_at(8).ok()?;
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        let ev = begin(KIND_EXEC, DIR_EGRESS, SOURCE_SYSCALL, 0, 0, -1, 0, None)?;
        let n = match bpf_probe_read_kernel_str_bytes(src, &mut ev.data[..MAX_PATH]) {
            Ok(s) => s.len(),
            Err(_) => {
                stat(PROG_EXEC, STAT_READ_ERRORS);
                return None;
            }
        };
        let n = if n > MAX_PATH { MAX_PATH } else { n };
        ev.header.len = n as u32;
        output_now(PROG_EXEC, ev, n);
    }
    Some(())
}

/// Longest executable path reported.
const MAX_PATH: usize = 512;

const PROT_EXEC: u64 = 4;

/// `syscalls:sys_enter_mmap` of a file mapped executable: a library (or interpreter-loaded
/// code) arriving, so the daemon can attach to it before its first TLS call, without polling.
/// Only the file's identity goes up; a file seen before costs userspace a hash lookup.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    unsafe { on_mmap(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_mmap(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == unsafe { read_volatile(addr_of!(CONFIG.self_tgid)) } {
        return None;
    }
    unsafe {
        let prot: u64 = ctx.read_at(32).ok()?;
        if prot & PROT_EXEC == 0 {
            return None;
        }
        let fd: i64 = ctx.read_at(48).ok()?;
        let file = file_of_fd(fd)?;
        stat(PROG_MMAP, STAT_HITS);
        let inode: usize = kread(file, off!(file_inode))?;
        let sb: usize = kread(inode, off!(inode_sb))?;
        let info = MmapInfo {
            dev: kread(sb, off!(sb_dev)).unwrap_or(0),
            prot: prot as u32,
            ino: kread(inode, off!(inode_ino))?,
        };
        let ev = begin(KIND_MMAP, DIR_EGRESS, SOURCE_SYSCALL, 0, 0, fd as i32, 0, None)?;
        let n = core::mem::size_of::<MmapInfo>();
        core::ptr::write_unaligned(ev.data.as_mut_ptr() as *mut MmapInfo, info);
        ev.header.len = n as u32;
        output_now(PROG_MMAP, ev, n);
    }
    Some(())
}

/// `sched:sched_process_exit` of a process's last thread: its libraries may be unused now.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == unsafe { read_volatile(addr_of!(CONFIG.self_tgid)) } {
        return 0;
    }
    // `bool group_dead` at offset 32: the whole thread group is gone.
    if unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) == 0 {
        return 0;
    }
    stat(PROG_EXIT, STAT_HITS);
    if let Some(ev) =
        unsafe { begin(KIND_EXIT, DIR_EGRESS, SOURCE_SYSCALL, 0, 0, -1, 0, None) }
    {
        output(PROG_EXIT, ev, 0);
    }
    0
}

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

/// `SSL_write(ssl, buf, num)` (and `gnutls_record_send`, the same shape): remember the
/// buffer; what was written is copied at return.
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
    if is_self(pid_tgid) {
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
    let _ = WRITES.insert(&pid_tgid, &a, 0);
    let _ = WRITE_MARK.insert(&pid_tgid, &a, 0);
    if a.len == 0 || a.len > i32::MAX as u64 {
        return None;
    }
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: a.ssl,
    };
    if unsafe { UNSENT.get(&key) }.is_some_and(|left| *left == a.len) {
        return None; // a retry: reported when first tried
    }
    let conn = unsafe { SSL_CONN.get(&key) };
    let (sk, fd) = conn.map_or((0, -1), |c| (c.sk as usize, c.fd));
    unsafe {
        let ev = begin(
            KIND_DATA,
            DIR_EGRESS,
            source,
            a.ssl,
            sk,
            fd,
            a.len,
            conn,
        )?;
        emit_chunks(PROG_SSL_WRITE, ev, a.buf, a.len, MAX_CHUNKS);
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

#[inline(always)]
unsafe fn on_ssl_write_ret(ctx: &RetProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let a = unsafe { *WRITES.get(&pid_tgid)? };
    let _ = WRITES.remove(&pid_tgid);
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: a.ssl,
    };
    match unsafe { call_result(ctx, &a) } {
        Some(n) if n >= a.len => {
            let _ = UNSENT.remove(&key);
        }
        Some(n) => {
            let _ = UNSENT.insert(&key, &(a.len - n), 0);
        }
        None => {
            let _ = UNSENT.insert(&key, &a.len, 0);
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
    if is_self(pid_tgid) {
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
    let _ = ACTIVE.insert(&pid_tgid, &active, 0);
    Some(())
}

/// Return of `SSL_read` and `SSL_read_ex`.
#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    unsafe { on_ssl_read_ret(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_ssl_read_ret(ctx: &RetProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let a = unsafe { *ACTIVE.get(&pid_tgid)? };
    let _ = ACTIVE.remove(&pid_tgid);
    if a.is_read == 0 {
        return None;
    }
    stat(PROG_SSL_READ_RET, STAT_HITS);
    let n = unsafe { call_result(ctx, &a)? };
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: a.ssl,
    };
    let conn = unsafe { SSL_CONN.get(&key) };
    let (sk, fd) = conn.map_or((0, -1), |c| (c.sk as usize, c.fd));
    unsafe {
        let ev = begin(
            KIND_DATA,
            DIR_INGRESS,
            a.source(),
            a.ssl,
            sk,
            fd,
            n,
            conn,
        )?;
        emit_chunks(PROG_SSL_READ_RET, ev, a.buf, n, MAX_CHUNKS);
    }
    Some(())
}

// ===================================================================================
// Go crypto/tls: `(*Conn).Write` at entry, `(*Conn).Read` at entry and at each of its RET
// instructions (userspace finds them). Go ≥ 1.17 amd64 register ABI (ABIInternal):
// Write/Read(c, b) get RAX = c, RBX = b.ptr, RCX = b.len; Read returns n in RAX; R14 always
// holds the current goroutine `g`. No uretprobes: they rewrite return addresses on the
// goroutine stack, which Go moves when it grows. A goroutine blocked in Read can resume on
// another thread, so a Read's entry and return are paired by (tgid, g), not by thread.
// Known gap: a Read buffer on the goroutine's own stack that moves (stack growth) while the
// Read blocks is stale at the RET; net/http and bufio buffers live on the heap.
// ===================================================================================

#[unsafe(no_mangle)]
static GO_OFFSETS: GoOffsets = unsafe { core::mem::zeroed() };

/// Goroutines inside `(*Conn).Read`: (tgid, g) → the call (`ssl` is the `*tls.Conn`).
/// LRU: goroutines that never return (connection leaked, process killed) age out.
#[map]
static GO_READS: LruHashMap<SslKey, SslActive> = LruHashMap::with_max_entries(65536, 0);

macro_rules! go_off {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { read_volatile(addr_of!(GO_OFFSETS.$f)) as u64 };
        v
    }};
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
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: c,
    };
    let fd = unsafe { go_fd(c) };
    if let Some(conn) = unsafe { SSL_CONN.get(&key) } {
        if fd.is_none_or(|fd| fd == conn.fd as i64) {
            return Some(*conn);
        }
    }
    let fd = fd?;
    let sk = unsafe { tcp_sock_of_fd(fd)? };
    unsafe {
        bind(prog, SOURCE_GO, pid_tgid, c, fd as i32, sk);
        SSL_CONN.get(&key).copied()
    }
}

/// Copies `len` bytes at `buf` as the plaintext of `c`.
#[inline(always)]
unsafe fn go_emit(prog: u32, dir: u8, c: u64, conn: Option<SslConn>, buf: u64, len: u64) {
    let (sk, fd) = conn.map_or((0, -1), |c| (c.sk as usize, c.fd));
    unsafe {
        if let Some(ev) = begin(KIND_DATA, dir, SOURCE_GO, c, sk, fd, len, conn.as_ref()) {
            emit_chunks(prog, ev, buf, len, MAX_CHUNKS);
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
    if is_self(pid_tgid) {
        return None;
    }
    stat(PROG_GO_WRITE, STAT_HITS);
    let regs = unsafe { &*ctx.regs };
    let (c, buf, len) = (regs.rax, regs.rbx, regs.rcx);
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
    if is_self(pid_tgid) {
        return None;
    }
    stat(PROG_GO_READ, STAT_HITS);
    let regs = unsafe { &*ctx.regs };
    let (c, g) = (regs.rax, regs.r14);
    if c == 0 || g == 0 {
        return None;
    }
    let active = SslActive {
        ssl: c,
        buf: regs.rbx,
        len: regs.rcx,
        out_len: 0,
        is_read: 1,
        source: SOURCE_GO as u32,
    };
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: g,
    };
    let _ = GO_READS.insert(&key, &active, 0);
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
    if is_self(pid_tgid) {
        return None;
    }
    stat(PROG_GO_READ_RET, STAT_HITS);
    let regs = unsafe { &*ctx.regs };
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: regs.r14,
    };
    let a = unsafe { *GO_READS.get(&key)? };
    let _ = GO_READS.remove(&key);
    let n = regs.rax as i64;
    if n <= 0 {
        return None;
    }
    let n = if n as u64 > a.len { a.len } else { n as u64 };
    let ckey = SslKey {
        tgid: pid_tgid >> 32,
        ssl: a.ssl,
    };
    unsafe {
        // Bound at entry; looked up again only if the entry lost it (closed, evicted).
        let conn = match SSL_CONN.get(&ckey) {
            Some(c) => Some(*c),
            None => go_conn(PROG_GO_READ_RET, pid_tgid, a.ssl),
        };
        go_emit(PROG_GO_READ_RET, DIR_INGRESS, a.ssl, conn, a.buf, n);
    }
    Some(())
}

// ===================================================================================
// BEGIN probe sites (helper "sites"): returns without uretprobes. Userspace proves from the
// instruction stream that an emulated instruction right after the call to the library's
// inner `_ex`-shaped function (e.g. the `jle` after `call ssl_read_internal` in `SSL_read`)
// sees that call's result in RAX with its frame (and so the out-parameter) still live; the
// entry was taken at that call by `ssl_write_ex`/`ssl_read_ex`. Same bodies as the
// uretprobes: pt_regs at the site hold what they would read at the return.
// ===================================================================================

/// After the inner write call in `SSL_write` (a uprobe on an emulated instruction).
#[uprobe]
pub fn ssl_write_ret_site(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_write_ret(&RetProbeContext { regs: ctx.regs }) };
    0
}

/// After the inner read call in `SSL_read` (a uprobe on an emulated instruction).
#[uprobe]
pub fn ssl_read_ret_site(ctx: ProbeContext) -> u32 {
    unsafe { on_ssl_read_ret(&RetProbeContext { regs: ctx.regs }) };
    0
}

/// Empty programs for `cargo xtask bench overhead`'s floors: the cost of the traps alone at
/// the monitor's exact probe set (`monitor probes --floor`).
#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn floor_uretprobe(_ctx: RetProbeContext) -> u32 {
    0
}

#[tracepoint]
pub fn floor_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

// END probe sites
// ===================================================================================

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
