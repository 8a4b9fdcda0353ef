//! Kernel side of the credential-reuse monitor.
//!
//! Two sources of plaintext:
//! - TLS library uprobes (`programs::openssl`, `programs::golang`) copy what was written
//!   before encryption / read after decryption;
//! - socket syscall tracepoints (`programs::syscalls`) copy plaintext TCP traffic, and, when
//!   they carry the TLS records of an SSL call of the same thread (inside it, or right after a
//!   write through a memory BIO), tie that `SSL *` to its socket (fd, flow) instead.
//!
//! Exec, executable mmap and process exit tracepoints (`programs::process`) tell userspace
//! what to attach to.
//!
//! Programs only copy and count (`STATS`): parsing happens in userspace, and nothing logs
//! from the kernel, per event or otherwise. Every record leaves through `emit`.
#![no_std]
#![no_main]

mod emit;
mod filter;
mod maps;
mod programs;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
