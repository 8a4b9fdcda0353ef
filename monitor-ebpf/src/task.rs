//! Reads of kernel state through the BTF offsets the loader wrote (`OFFSETS`): the current
//! task's files and credentials, a socket's flow. Rust eBPF has no CO-RE relocations.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};
use monitor_common::{AF_INET, AF_INET6, Flow};

use crate::maps::off;

#[inline(always)]
pub unsafe fn kread<T>(base: usize, off: usize) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off) as *const T).ok() }
}

/// `struct file *` behind `fd` of the current task.
#[inline(always)]
pub unsafe fn file_of_fd(fd: i64) -> Option<usize> {
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
pub unsafe fn tcp_sock_of_fd(fd: i64) -> Option<usize> {
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

/// The flow of socket `sk` and the inode of its network namespace (0 when unreadable).
#[inline(always)]
pub unsafe fn flow_of(sk: usize) -> (Flow, u32) {
    let mut flow = Flow::default();
    let mut netns = 0;
    unsafe {
        let family: u16 = kread(sk, off!(sock_family)).unwrap_or(0);
        flow.family = family;
        flow.sport = kread(sk, off!(sock_num)).unwrap_or(0);
        flow.dport = u16::from_be(kread(sk, off!(sock_dport)).unwrap_or(0));
        if family == AF_INET {
            let s: [u8; 4] = kread(sk, off!(sock_rcv_saddr)).unwrap_or([0; 4]);
            let d: [u8; 4] = kread(sk, off!(sock_daddr)).unwrap_or([0; 4]);
            flow.saddr[..4].copy_from_slice(&s);
            flow.daddr[..4].copy_from_slice(&d);
        } else {
            flow.saddr = kread(sk, off!(sock_v6_rcv_saddr)).unwrap_or([0; 16]);
            flow.daddr = kread(sk, off!(sock_v6_daddr)).unwrap_or([0; 16]);
        }
        let net: usize = kread(sk, off!(sock_net)).unwrap_or(0);
        if net != 0 {
            netns = kread(net, off!(net_ns_inum)).unwrap_or(0);
        }
    }
    (flow, netns)
}

/// Effective uid and gid of the current task (`task->cred->euid/egid`, kernel-global ids);
/// `u32::MAX` (no such id) when the credentials cannot be read.
#[inline(always)]
pub unsafe fn current_euid_egid() -> (u32, u32) {
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
