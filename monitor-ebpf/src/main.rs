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
