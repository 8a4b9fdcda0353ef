//! Every map and every loader-written global of the programs, in one place: userspace finds
//! them by these names.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use monitor_common::*;

/// Kernel structure offsets from the running kernel's BTF (written by the loader).
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
#[unsafe(no_mangle)]
pub static CONFIG: ProbeConfig = unsafe { core::mem::zeroed() };
/// Field offsets of Go's `crypto/tls.Conn` chain (written by the loader).
#[unsafe(no_mangle)]
pub static GO_OFFSETS: GoOffsets = unsafe { core::mem::zeroed() };

/// 16 MiB: at ~300 bytes a request that is ~50k requests of slack for a stalled reader.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);
#[map]
pub static SCRATCH: PerCpuArray<crate::emit::Scratch> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROG_COUNT * STAT_COUNT, 0);
/// Threads inside an SSL call (entry seen, nested syscall or return not yet).
#[map]
pub static ACTIVE: HashMap<u64, SslActive> = HashMap::with_max_entries(16384, 0);
/// SSL_write calls between entry and return.
#[map]
pub static WRITES: HashMap<u64, SslActive> = HashMap::with_max_entries(16384, 0);
/// Per SSL object, bytes already reported that the library has not taken yet: a write that
/// failed for want of I/O (or took only part) must be retried with the same data (possibly
/// from another address: Node moves its buffer), and the retry is not reported again. Data is
/// copied at entry, not return, so that it reaches userspace before the peer's copy does.
#[map]
pub static UNSENT: LruHashMap<SslKey, u64> = LruHashMap::with_max_entries(65536, 0);
/// Per thread, the SSL object of its last SSL_write, until a TLS record leaves the thread:
/// that record is its ciphertext, whether written inside the call (blocking sockets) or just
/// after it (memory BIOs, as in Node's event loop).
#[map]
pub static WRITE_MARK: LruHashMap<u64, SslActive> = LruHashMap::with_max_entries(16384, 0);
/// SSL object → its socket, learnt from the syscall nested in an SSL call.
#[map]
pub static SSL_CONN: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(65536, 0);
/// Sockets carrying TLS through a probed library: their syscall bytes are ciphertext.
#[map]
pub static TLS_SOCKS: LruHashMap<u64, SslKey> = LruHashMap::with_max_entries(65536, 0);
/// Selected cgroups (`--cgroup`), when `CONFIG.filter_cgroups` is set.
#[map]
pub static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);
/// Read-like syscalls between entry and exit.
#[map]
pub static READS: HashMap<u64, ReadArgs> = HashMap::with_max_entries(16384, 0);
/// Goroutines inside `(*Conn).Read`: (tgid, g) → the call (`ssl` is the `*tls.Conn`).
/// LRU: goroutines that never return (connection leaked, process killed) age out.
#[map]
pub static GO_READS: LruHashMap<SslKey, SslActive> = LruHashMap::with_max_entries(65536, 0);

/// A loader-written setting: read through a volatile load, or the compiler would fold the
/// zeroes the object was built with.
macro_rules! config {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::CONFIG.$f)) };
        v
    }};
}

/// A kernel structure offset (see `config!`).
macro_rules! off {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::OFFSETS.$f)) as usize
        };
        v
    }};
}

/// A Go structure offset (see `config!`).
macro_rules! go_off {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::GO_OFFSETS.$f)) as u64
        };
        v
    }};
}

pub(crate) use {config, go_off, off};

/// Counts one `which` (`STAT_*`) for program `prog` (`PROG_*`).
#[inline(always)]
pub fn stat(prog: u32, which: u32) {
    if let Some(p) = STATS.get_ptr_mut(prog * STAT_COUNT + which) {
        unsafe { *p += 1 };
    }
}
