//! Sets `bpf_target_arch` as aya-ebpf sees it: the architecture whose registers (`pt_regs`) a
//! uprobe reads, which decides whether the Go register-ABI programs can be built.
fn main() -> aya_build::Result<()> {
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\", \"arm\", \"loongarch64\", \"mips\", \"mips64\", \"powerpc64\", \"riscv64\", \"s390x\"))"
    );
    aya_build::emit_bpf_target_arch_cfg()
}
