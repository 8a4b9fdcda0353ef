//! Kernel structure offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the loader reads each field the programs need from
//! `/sys/kernel/btf/vmlinux` and writes the offsets into the programs' read-only data.

use anyhow::{Context, Result, bail};
use btf_rs::{Btf, Type};
use monitor_common::KernelOffsets;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

pub fn kernel_offsets() -> Result<KernelOffsets> {
    let btf = Btf::from_file(VMLINUX).with_context(|| {
        format!("cannot read {VMLINUX}: the kernel needs CONFIG_DEBUG_INFO_BTF")
    })?;
    let f = |s: &str, path: &[&str]| field_offset(&btf, s, path);
    Ok(KernelOffsets {
        task_files: f("task_struct", &["files"])?,
        files_fdt: f("files_struct", &["fdt"])?,
        fdt_max_fds: f("fdtable", &["max_fds"])?,
        fdt_fd: f("fdtable", &["fd"])?,
        file_private_data: f("file", &["private_data"])?,
        file_inode: f("file", &["f_inode"])?,
        inode_mode: f("inode", &["i_mode"])?,
        socket_sk: f("socket", &["sk"])?,
        sock_protocol: f("sock", &["sk_protocol"])?,
        sock_family: f("sock", &["__sk_common", "skc_family"])?,
        sock_daddr: f("sock", &["__sk_common", "skc_daddr"])?,
        sock_rcv_saddr: f("sock", &["__sk_common", "skc_rcv_saddr"])?,
        sock_dport: f("sock", &["__sk_common", "skc_dport"])?,
        sock_num: f("sock", &["__sk_common", "skc_num"])?,
        sock_v6_daddr: f("sock", &["__sk_common", "skc_v6_daddr"])?,
        sock_v6_rcv_saddr: f("sock", &["__sk_common", "skc_v6_rcv_saddr"])?,
        sock_net: f("sock", &["__sk_common", "skc_net"])?,
        net_ns_inum: f("net", &["ns", "inum"])?,
        inode_ino: f("inode", &["i_ino"])?,
        inode_sb: f("inode", &["i_sb"])?,
        sb_dev: f("super_block", &["s_dev"])?,
        task_cred: f("task_struct", &["cred"])?,
        cred_euid: f("cred", &["euid"])?,
        cred_egid: f("cred", &["egid"])?,
    })
}

/// Byte offset of `path` (nested named members) inside `struct name`.
fn field_offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    let mut ty = btf
        .resolve_types_by_name(name)
        .with_context(|| format!("struct {name} not in BTF"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .with_context(|| format!("{name} is not a struct in BTF"))?;
    let mut bits = 0u32;
    for (i, member) in path.iter().enumerate() {
        let (off, next) = find_member(btf, &ty, member)?
            .with_context(|| format!("struct {name} has no member {}", path[..=i].join(".")))?;
        bits += off;
        ty = next;
    }
    if !bits.is_multiple_of(8) {
        bail!("{name}.{} is a bit field", path.join("."));
    }
    Ok(bits / 8)
}

/// Finds `name` among the members of a struct/union, looking into anonymous members.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>> {
    let s = match ty {
        Type::Struct(s) | Type::Union(s) => s,
        _ => return Ok(None),
    };
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let mty = strip(btf, btf.resolve_chained_type(m)?)?;
        if mname == name {
            if m.bitfield_size().is_some_and(|b| b != 0) {
                bail!("member {name} is a bit field");
            }
            return Ok(Some((m.bit_offset(), mty)));
        }
        if mname.is_empty()
            && let Some((off, t)) = find_member(btf, &mty, name)?
        {
            return Ok(Some((m.bit_offset() + off, t)));
        }
    }
    Ok(None)
}

/// Follows typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        };
    }
    Ok(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the offsets of the kernel this test runs on: every field must resolve.
    #[test]
    fn resolves_every_offset_on_this_kernel() {
        let o = kernel_offsets().expect("offsets from /sys/kernel/btf/vmlinux");
        assert!(
            o.task_files > 0 && o.sock_protocol > 0 && o.net_ns_inum > 0,
            "{o:?}"
        );
        // skc_daddr and skc_rcv_saddr are adjacent u32s at the start of sock_common.
        assert_eq!(o.sock_rcv_saddr, o.sock_daddr + 4);
        assert_eq!(o.sock_num, o.sock_dport + 2);
    }
}
