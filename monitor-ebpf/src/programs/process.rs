//! Exec, executable mmap and process exit: what userspace needs to attach to new programs and
//! libraries before their first TLS call, and to detach from those nobody runs any more.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
};
use monitor_common::*;

use crate::{
    emit::{Call, Wake, begin, output},
    filter::{ignored, is_own},
    maps::{off, stat},
    task::{file_of_fd, kread},
};

/// Longest executable path reported.
const MAX_PATH: usize = 512;

const PROT_EXEC: u64 = 4;

/// `sched:sched_process_exec`: the executable of every new program, before its first call.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    unsafe { on_exec(&ctx) };
    0
}

#[inline(always)]
unsafe fn on_exec(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if ignored(pid_tgid) {
        return None;
    }
    stat(PROG_EXEC, STAT_HITS);
    unsafe {
        // `__data_loc char[] filename` at offset 8: low 16 bits offset, high 16 bits length.
        let loc: u32 = ctx.read_at(8).ok()?;
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        let ev = begin(&Call::process(KIND_EXEC))?;
        let n = match bpf_probe_read_kernel_str_bytes(src, &mut ev.data[..MAX_PATH]) {
            Ok(s) => s.len(),
            Err(_) => {
                stat(PROG_EXEC, STAT_READ_ERRORS);
                return None;
            }
        };
        let n = if n > MAX_PATH { MAX_PATH } else { n };
        ev.header.len = n as u32;
        output(PROG_EXEC, ev, n, Wake::Now);
    }
    Some(())
}

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
    if is_own(bpf_get_current_pid_tgid()) {
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
        let ev = begin(&Call {
            fd: fd as i32,
            ..Call::process(KIND_MMAP)
        })?;
        let n = core::mem::size_of::<MmapInfo>();
        core::ptr::write_unaligned(ev.data.as_mut_ptr() as *mut MmapInfo, info);
        ev.header.len = n as u32;
        output(PROG_MMAP, ev, n, Wake::Now);
    }
    Some(())
}

/// `sched:sched_process_exit` of a process's last thread: its libraries may be unused now.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    if is_own(bpf_get_current_pid_tgid()) {
        return 0;
    }
    // `bool group_dead` at offset 32: the whole thread group is gone.
    if unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) == 0 {
        return 0;
    }
    stat(PROG_EXIT, STAT_HITS);
    if let Some(ev) = unsafe { begin(&Call::process(KIND_EXIT)) } {
        output(PROG_EXIT, ev, 0, Wake::Batched);
    }
    0
}
