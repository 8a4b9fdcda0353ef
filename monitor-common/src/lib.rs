//! Types shared by the kernel programs (`monitor-ebpf`) and the daemon (`monitor`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into ring buffers and
//! maps, userspace reads the same bytes back. The `user` feature adds `aya::Pod` impls.
#![no_std]

/// Bytes of user data copied into one event. 4 KiB holds long JWTs and cookies.
pub const MAX_DATA: usize = 4096;
/// A single call (write, SSL_write, the segments of a writev) is copied in at most this many
/// events of [`MAX_DATA`] bytes: 64 KiB, the longest HTTP/1 head and HTTP/2 header block the
/// parsers take, so that padding cannot push a credential past what is copied. Anything past
/// it is counted as truncated.
pub const MAX_CHUNKS: u32 = 16;
/// iovec segments looked at for writev/readv/sendmsg/recvmsg; their bytes are packed into
/// records one after another.
pub const MAX_IOV: u32 = 32;

/// Plaintext bytes of a connection, in call order.
pub const KIND_DATA: u8 = 1;
/// An SSL object was tied to a socket (fd and flow are now known for that `conn`).
pub const KIND_TLS_BIND: u8 = 2;
/// A tracked TCP socket was closed by its process.
pub const KIND_CLOSE: u8 = 3;
/// A process executed a program; data is the file name. Reading /proc later would race with
/// short-lived clients that exit before their events are processed.
pub const KIND_EXEC: u8 = 4;
/// A process mapped a file executable (a library arriving by `dlopen` or at start); data is
/// the file's name (its last path component), enough to decide whether to look at it.
pub const KIND_MMAP: u8 = 5;
/// A process (thread-group leader) exited: its libraries may no longer be in use.
pub const KIND_EXIT: u8 = 6;

pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

pub const SOURCE_SYSCALL: u8 = 0;
pub const SOURCE_OPENSSL: u8 = 1;
pub const SOURCE_GNUTLS: u8 = 2;
/// Go's `crypto/tls` (`(*Conn).Write` / `(*Conn).Read`).
pub const SOURCE_GO: u8 = 3;

/// Not every byte of the call is copied: it is longer than `MAX_CHUNKS * MAX_DATA` bytes, has
/// more than `MAX_IOV` segments, or a read failed. Set on every record of the call.
pub const FLAG_TRUNCATED: u8 = 1;
/// The flow could not be read for this event (TLS data before its socket was seen).
pub const FLAG_NO_FLOW: u8 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A TCP flow as seen from the process that made the call: `s` is the local end.
/// Ports are in host byte order; IPv4 addresses sit in the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Header of every ring buffer record; `len` bytes of data follow it for `KIND_DATA`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    pub kind: u8,
    pub direction: u8,
    pub source: u8,
    pub flags: u8,
    /// Bytes of data that follow this header.
    pub len: u32,
    /// `bpf_ktime_get_ns` (monotonic, includes no suspend).
    pub ts_ns: u64,
    /// Thread id in the low half, process id (tgid) in the high half.
    pub pid_tgid: u64,
    pub cgroup_id: u64,
    /// Stream identity: the `SSL *` for TLS events, the `struct sock *` for syscall events.
    pub conn: u64,
    /// `struct sock *` of the socket (0 when not yet known).
    pub sk: u64,
    /// File descriptor of the socket, -1 when not yet known.
    pub fd: i32,
    /// Network namespace inode of the socket (0 when not known).
    pub netns: u32,
    /// Bytes the call asked for (egress) or returned (ingress).
    pub call_len: u64,
    /// Offset of this record's data within the call.
    pub offset: u32,
    /// Effective uid and gid of the caller (`task->cred`, as the host sees them), read at the
    /// call: a short-lived client is gone from /proc before userspace could look.
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    pub flow: Flow,
}

pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// A record as the kernel sends it: the header, then `header.len` bytes of data and nothing
/// more (the kernel's per-CPU scratch starts the same way and is sent `HEADER_LEN + len`
/// bytes long).
#[repr(C)]
pub struct DataEvent {
    pub header: EventHeader,
    pub data: [u8; MAX_DATA],
}

/// Offsets into kernel structures, read from the running kernel's BTF by the loader and
/// written into the programs' read-only data: Rust eBPF has no CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub socket_sk: u32,
    pub sock_protocol: u32,
    pub sock_family: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_dport: u32,
    pub sock_num: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    pub sock_net: u32,
    pub net_ns_inum: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub task_cred: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
}

/// Data of a `KIND_MMAP` record: the mapped file, as the kernel identifies it. Userspace keeps
/// a verdict per file, so a library seen before costs no look at /proc.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapInfo {
    /// `super_block.s_dev` (kernel encoding: major << 20 | minor).
    pub dev: u32,
    pub prot: u32,
    pub ino: u64,
}

/// Settings the loader writes into the programs' read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeConfig {
    /// The daemon's own tgid: its traffic (ClickHouse, webhooks) is never captured.
    pub self_tgid: u32,
    /// Capture plaintext from socket syscalls (1) or only use them to find TLS sockets (0).
    pub capture_plaintext: u32,
    /// 1: only processes whose cgroup id is in the `CGROUPS` map are looked at.
    pub filter_cgroups: u32,
    /// 1: data that starts an HTTP/1 response (`HTTP/`), written or read, is not copied:
    /// credentials travel in requests, and responses are half of what would be sent up.
    pub skip_responses: u32,
}

/// Value of the per-thread map that says "this thread is inside an SSL call".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SslActive {
    pub ssl: u64,
    /// User buffer and its size (read calls; copied at return).
    pub buf: u64,
    pub len: u64,
    /// `size_t *readbytes` of SSL_read_ex, 0 for SSL_read.
    pub out_len: u64,
    pub is_read: u32,
    /// The library whose call this is (`SOURCE_*`), for the events and binds it leads to.
    pub source: u32,
}

impl SslActive {
    pub fn source(&self) -> u8 {
        self.source as u8
    }
}

/// Key of the map from an SSL object to its socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslKey {
    pub tgid: u64,
    pub ssl: u64,
}

/// An SSL object's socket, with its flow read once at bind time: a connection's addresses do
/// not change, and reading them from the socket on every SSL call costs a dozen probe reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SslConn {
    pub sk: u64,
    pub fd: i32,
    pub netns: u32,
    pub flow: Flow,
}

/// Saved arguments of a read-like syscall, copied at its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadArgs {
    pub sk: u64,
    /// Buffer for read/recvfrom, `struct iovec *` for readv, `struct user_msghdr *` for recvmsg.
    pub buf: u64,
    /// Buffer size for read/recvfrom, iovec count for readv.
    pub count: u64,
    pub fd: i32,
    /// One of the `SHAPE_*` constants.
    pub shape: u32,
}

pub const SHAPE_BUF: u32 = 0;
pub const SHAPE_IOV: u32 = 1;
pub const SHAPE_MSG: u32 = 2;

/// Counters kept per program in a per-CPU array at `prog * STAT_COUNT + stat`.
pub const STAT_HITS: u32 = 0;
pub const STAT_EVENTS: u32 = 1;
/// Records the ring buffer had no room for: events lost.
pub const STAT_LOST: u32 = 2;
pub const STAT_TRUNCATED: u32 = 3;
/// bpf_probe_read failures (buffer not readable).
pub const STAT_READ_ERRORS: u32 = 4;
/// Writes not copied because they start an HTTP response (`skip_responses`).
pub const STAT_SKIPPED: u32 = 5;
pub const STAT_COUNT: u32 = 6;

/// Program ids for the statistics array; names in [`PROG_NAMES`].
pub const PROG_SSL_WRITE: u32 = 0;
pub const PROG_SSL_READ: u32 = 1;
pub const PROG_SSL_READ_RET: u32 = 2;
pub const PROG_SYS_WRITE: u32 = 3;
pub const PROG_SYS_READ: u32 = 4;
pub const PROG_SYS_READ_RET: u32 = 5;
pub const PROG_SYS_CLOSE: u32 = 6;
pub const PROG_EXEC: u32 = 7;
pub const PROG_MMAP: u32 = 8;
pub const PROG_EXIT: u32 = 9;
pub const PROG_GO_WRITE: u32 = 10;
pub const PROG_GO_READ: u32 = 11;
pub const PROG_GO_READ_RET: u32 = 12;
pub const PROG_COUNT: u32 = 13;

pub const PROG_NAMES: [&str; PROG_COUNT as usize] = [
    "ssl_write",
    "ssl_read",
    "ssl_read_ret",
    "sys_write",
    "sys_read",
    "sys_read_ret",
    "sys_close",
    "exec",
    "mmap",
    "exit",
    "go_write",
    "go_read",
    "go_read_ret",
];

pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "hits",
    "events",
    "lost",
    "truncated",
    "read_errors",
    "skipped",
];

/// Where a Go program's `crypto/tls.Conn` keeps its socket's file descriptor: the kernel
/// follows `tls.Conn.conn` (a `net.Conn` interface: itab, data) → `*net.TCPConn` →
/// `conn.fd *netFD` → `netFD.pfd` (`poll.FD`) → `Sysfd`. Written by the loader like
/// [`KernelOffsets`], so a Go release that moves a field needs no kernel change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoOffsets {
    /// Offset of the interface's data word in `tls.Conn` (`conn` is its first field).
    pub tls_conn_data: u32,
    /// Offset of `fd *netFD` in `net.TCPConn` (embedded `conn{fd}`).
    pub tcp_conn_fd: u32,
    /// Offset of `pfd.Sysfd` in `netFD`: `poll.FD` starts with the 16-byte `fdMutex`.
    pub net_fd_sysfd: u32,
    pub _pad: u32,
}

impl GoOffsets {
    /// 64-bit Go since the register ABI (1.17): these fields have not moved in years.
    /// Verified against the Go 1.19 sources and binaries (`monitor/tests/live_go.rs`).
    pub const GO1_17: GoOffsets = GoOffsets {
        tls_conn_data: 8,
        tcp_conn_fd: 0,
        net_fd_sysfd: 16,
        _pad: 0,
    };
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for ProbeConfig {}
    unsafe impl aya::Pod for SslKey {}
    unsafe impl aya::Pod for SslConn {}
    unsafe impl aya::Pod for GoOffsets {}
}
