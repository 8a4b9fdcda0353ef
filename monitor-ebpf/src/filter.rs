//! Which calls are looked at. Checked first in every program, before any other work.

use aya_ebpf::helpers::generated::bpf_get_current_cgroup_id;

use crate::maps::{CGROUPS, config};

/// The monitor's own calls (its ClickHouse and webhook traffic, its reads of /proc).
#[inline(always)]
pub fn is_own(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == config!(self_tgid)
}

/// False when the user selected cgroups (`--cgroup`) and the current task is in none of them.
#[inline(always)]
pub fn cgroup_selected() -> bool {
    if config!(filter_cgroups) == 0 {
        return true;
    }
    let cg = unsafe { bpf_get_current_cgroup_id() };
    unsafe { CGROUPS.get(cg) }.is_some()
}

/// Calls whose data is not captured: the monitor's own, and other cgroups' than the selected.
#[inline(always)]
pub fn ignored(pid_tgid: u64) -> bool {
    is_own(pid_tgid) || !cgroup_selected()
}
