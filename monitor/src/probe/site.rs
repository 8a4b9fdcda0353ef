//! Where on a probed function its uprobes sit, chosen by decoding the function.
//!
//! A uprobe replaces one instruction with INT3. When it is hit, x86-64 Linux (6.x) emulates
//! only a few instructions in the kernel: `call rel32`, `jmp rel8/rel32`, `jcc`, `nop` and
//! `push reg` (`arch/x86/kernel/uprobes.c`: `branch_setup_xol_ops`, `push_setup_xol_ops`);
//! every other one is copied out of line and single-stepped, a second trap (measured here:
//! ~7.6 µs a hit against ~0.6 µs for an emulated one). So each entry program goes on the first
//! emulated instruction before which none of the registers it reads has changed, and where
//! the code proves it, the return is read at an emulated instruction right after the inner
//! call instead of by a uretprobe (whose trap is at the function's first instruction).
//!
//! Pure functions over bytes: [`entry_site`], [`forwarded_call`], [`return_site`]; [`plan`]
//! applies them to a file's probe points.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::fs::FileExt,
};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, InstructionInfoFactory,
    IntelFormatter, Mnemonic, OpAccess, OpKind, Register,
};
use serde::Serialize;

use super::target::{Point, Stack, Target};

/// How the kernel executes the instruction a uprobe sits on, or a uretprobe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Emulated by the kernel: one trap.
    Emulated,
    /// Copied out of line and single-stepped: a second trap.
    SingleStep,
    /// A return probe: its trap is at the instruction it was attached to (shared with the
    /// entry program when they sit together), and it returns through a trampoline.
    Uretprobe,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Emulated => "emulated",
            Placement::SingleStep => "single-step",
            Placement::Uretprobe => "uretprobe",
        }
    }
}

/// Whether a probe captures a call's arguments or its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Entry,
    Return,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Entry => "entry",
            Kind::Return => "return",
        }
    }
}

/// A function's code as the file holds it: `code[0]` is at file offset `at`. All addresses
/// here are file offsets: branches are relative, so the analysis is the same as in memory.
#[derive(Debug, Clone, Copy)]
pub struct Func<'a> {
    pub code: &'a [u8],
    pub at: u64,
}

/// The chooser's verdict for one probe: where, how the kernel runs it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub offset: u64,
    pub placement: Placement,
    pub reason: String,
}

/// Instructions scanned from the entry for a site: prologues are short, and a site far in
/// is not worth the analysis.
const MAX_PREFIX: usize = 32;
/// Bytes of a function read and decoded: its branches are needed to know where other paths
/// join (the extent is found by decoding; a function that does not end within this keeps
/// its probes at the entry).
pub const MAX_FUNCTION: usize = 16 * 1024;

/// Whether the kernel emulates `ins` (whose bytes are `bytes`) at a uprobe.
pub fn emulated(ins: &Instruction, bytes: &[u8]) -> bool {
    if ins.mnemonic() == Mnemonic::Nop {
        return true; // `insn_is_nop`: 0x90 and 0x0f 0x1f with any prefixes
    }
    let (prefixes, rest) = split_prefixes(bytes);
    let Some(&op) = rest.first() else {
        return false;
    };
    let branch = match op {
        0xe8 | 0xe9 | 0xeb | 0x70..=0x7f => true,
        0x0f => matches!(rest.get(1), Some(0x80..=0x8f)),
        _ => false,
    };
    if branch {
        // The kernel refuses 16-bit operand overrides on branches (`66 e8`...).
        return !prefixes.contains(&0x66);
    }
    if (0x50..=0x57).contains(&op) {
        // `push reg`, or `push r8..r15` with exactly the REX prefix 0x41.
        return matches!(prefixes, [] | [0x41]);
    }
    false
}

/// Legacy and REX prefixes, then the rest of the instruction.
fn split_prefixes(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
            ) || (0x40..=0x4f).contains(*b)
        })
        .count();
    bytes.split_at(n)
}

/// A function decoded from its entry to where its code ends.
struct Decoded<'a> {
    f: Func<'a>,
    insns: Vec<Instruction>,
    /// Targets of direct jumps and conditional branches (not calls).
    targets: BTreeSet<u64>,
    /// The first indirect jump: where it lands cannot be known.
    indirect_jump: Option<u64>,
    /// The end of the function was found before the bytes ran out.
    complete: bool,
}

impl<'a> Decoded<'a> {
    /// Linear decode from the entry. The function ends at an instruction boundary where
    /// control cannot fall through (after `ret`, `jmp`, `ud2`, or padding after a call that
    /// does not return) and no branch seen so far lands further on.
    fn new(f: Func<'a>) -> Self {
        let mut d = Decoder::with_ip(64, f.code, f.at, DecoderOptions::NONE);
        let mut out = Decoded {
            f,
            insns: Vec::new(),
            targets: BTreeSet::new(),
            indirect_jump: None,
            complete: false,
        };
        let mut prev: Option<Instruction> = None;
        let ends_at = |targets: &BTreeSet<u64>,
                       prev: Option<Instruction>,
                       ip: u64,
                       next: Option<&Instruction>| {
            if targets.range(ip..).next().is_some() {
                return false;
            }
            let Some(p) = prev else { return false };
            let stop = matches!(
                p.flow_control(),
                FlowControl::Return
                    | FlowControl::UnconditionalBranch
                    | FlowControl::IndirectBranch
                    | FlowControl::Exception
                    | FlowControl::Interrupt
            ) || p.mnemonic() == Mnemonic::Ud2;
            let padding = next
                .is_some_and(|n| matches!(n.mnemonic(), Mnemonic::Nop | Mnemonic::Int3))
                && p.flow_control() == FlowControl::Call;
            stop || padding
        };
        while d.can_decode() {
            let ins = d.decode();
            if ins.is_invalid() {
                break;
            }
            if ends_at(&out.targets, prev, ins.ip(), Some(&ins)) {
                out.complete = true;
                break;
            }
            match ins.flow_control() {
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                    if ins.op0_kind() == OpKind::NearBranch64 =>
                {
                    out.targets.insert(ins.near_branch_target());
                }
                FlowControl::IndirectBranch => {
                    out.indirect_jump.get_or_insert(ins.ip());
                }
                _ => {}
            }
            out.insns.push(ins);
            prev = Some(ins);
        }
        if !out.complete && !d.can_decode() {
            // The bytes ran out exactly where the function ends.
            out.complete = ends_at(&out.targets, prev, f.at + f.code.len() as u64, None);
        }
        out
    }

    fn bytes(&self, ins: &Instruction) -> &'a [u8] {
        let start = (ins.ip() - self.f.at) as usize;
        &self.f.code[start..start + ins.len()]
    }

    fn emulated(&self, ins: &Instruction) -> bool {
        emulated(ins, self.bytes(ins))
    }

    fn rel(&self, addr: u64) -> u64 {
        addr - self.f.at
    }

    /// A branch that lands in `(from, to]`: another path joins there.
    fn join_in(&self, from: u64, to: u64) -> Option<u64> {
        (from < to)
            .then(|| self.targets.range(from + 1..=to).next().copied())
            .flatten()
    }

    /// Why the join points of the function cannot be trusted, if they cannot.
    fn unknown_joins(&self) -> Option<String> {
        if let Some(at) = self.indirect_jump {
            return Some(format!(
                "indirect jump at +{:#x}: where other paths join is unknown",
                self.rel(at)
            ));
        }
        (!self.complete).then(|| {
            format!(
                "the function's end was not found within {} bytes",
                self.f.code.len()
            )
        })
    }
}

/// What one instruction changes that a program reading `reads` at a later site would see
/// differently: a register it reads (sign extension of the same register aside), memory
/// other than the stack, or (with `keep_sp`) the stack pointer.
fn clobbers(
    info: &mut InstructionInfoFactory,
    ins: &Instruction,
    reads: &[Register],
    keep_sp: bool,
) -> Option<String> {
    let same_reg_extension = matches!(ins.mnemonic(), Mnemonic::Movsxd | Mnemonic::Cdqe)
        && (ins.mnemonic() == Mnemonic::Cdqe
            || (ins.op1_kind() == OpKind::Register
                && ins.op0_register().full_register() == ins.op1_register().full_register()));
    let i = info.info(ins);
    for r in i.used_registers() {
        let written = matches!(
            r.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if !written {
            continue;
        }
        let full = r.register().full_register();
        if reads.contains(&full) && !same_reg_extension {
            return Some(format!("writes {full:?}").to_lowercase());
        }
        if keep_sp && full == Register::RSP {
            return Some(
                "moves the stack pointer (a uretprobe needs the return address on top)".into(),
            );
        }
    }
    for m in i.used_memory() {
        let written = matches!(
            m.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if written && m.base().full_register() != Register::RSP {
            return Some("writes memory other than the stack".into());
        }
    }
    None
}

/// The site for an entry program that reads `reads` (full 64-bit registers) in function `f`:
/// the first emulated instruction before which none of them changed, reached only from the
/// entry. The scan stops at the first control-flow instruction (chosen if emulated): past a
/// branch, what the registers hold depends on the path. With `keep_sp` (a uretprobe shares
/// the site) the stack pointer must not have moved either. Falls back to the entry, saying
/// why.
pub fn entry_site(f: Func<'_>, reads: &[Register], keep_sp: bool) -> Site {
    let d = Decoded::new(f);
    let fallback = |why: String| {
        let placement = match d.insns.first() {
            Some(i) if d.emulated(i) => Placement::Emulated,
            _ => Placement::SingleStep,
        };
        Site {
            offset: f.at,
            placement,
            reason: why,
        }
    };
    let mut info = InstructionInfoFactory::new();
    for (n, ins) in d.insns.iter().take(MAX_PREFIX).enumerate() {
        if d.emulated(ins) {
            if n == 0 {
                return Site {
                    offset: f.at,
                    placement: Placement::Emulated,
                    reason: format!("the entry ({}) is emulated", text(ins)),
                };
            }
            if let Some(why) = d.unknown_joins() {
                return fallback(why);
            }
            if let Some(t) = d.join_in(f.at, ins.ip()) {
                return fallback(format!(
                    "a branch lands at +{:#x}, before the first emulated instruction (+{:#x})",
                    d.rel(t),
                    d.rel(ins.ip())
                ));
            }
            return Site {
                offset: ins.ip(),
                placement: Placement::Emulated,
                reason: format!(
                    "first emulated instruction ({} at +{:#x}), the registers read unchanged",
                    text(ins),
                    d.rel(ins.ip())
                ),
            };
        }
        if ins.flow_control() != FlowControl::Next {
            return fallback(format!(
                "the first control-flow instruction ({} at +{:#x}) is not emulated",
                text(ins),
                d.rel(ins.ip())
            ));
        }
        if let Some(what) = clobbers(&mut info, ins, reads, keep_sp) {
            return fallback(format!(
                "{} at +{:#x} {what} before any emulated instruction",
                text(ins),
                d.rel(ins.ip())
            ));
        }
    }
    fallback(format!(
        "no emulated instruction in the first {MAX_PREFIX} instructions"
    ))
}

/// The target `X` when `g` passes its argument registers `args` unchanged to `call X`
/// (straight from the entry, only the stack pointer moving) and returns right after it
/// without another call: then calling `X` does what calling `g` does, with `X`'s own result
/// (for OpenSSL's `SSL_read_ex`: `ssl_read_internal`, which `SSL_read` calls too).
pub fn forwarded_call(g: Func<'_>, args: &[Register]) -> Option<u64> {
    let d = Decoded::new(g);
    let mut info = InstructionInfoFactory::new();
    let mut insns = d.insns.iter().take(MAX_PREFIX);
    let call = loop {
        let ins = insns.next()?;
        if ins.flow_control() == FlowControl::Call {
            break ins;
        }
        if ins.flow_control() != FlowControl::Next
            || clobbers(&mut info, ins, args, false).is_some()
        {
            return None;
        }
    };
    if call.op0_kind() != OpKind::NearBranch64 || d.join_in(g.at, call.ip()).is_some() {
        return None;
    }
    // Nothing but register shuffling up to the return.
    for ins in insns {
        match ins.flow_control() {
            FlowControl::Next => {}
            FlowControl::Return => return Some(call.near_branch_target()),
            _ => return None,
        }
    }
    None
}

/// In `f`, its only call to `x` and the site right after it where the call's result is
/// still in RAX and its frame still live: the first emulated instruction after the call,
/// with no branch landing between the call and it and nothing writing RAX or moving the
/// stack pointer on the way. (call offset, return site).
pub fn return_site(f: Func<'_>, x: u64) -> Result<(u64, Site), String> {
    let d = Decoded::new(f);
    if let Some(why) = d.unknown_joins() {
        return Err(why);
    }
    let calls: Vec<&Instruction> = d
        .insns
        .iter()
        .filter(|i| {
            i.flow_control() == FlowControl::Call
                && i.op0_kind() == OpKind::NearBranch64
                && i.near_branch_target() == x
        })
        .collect();
    let [call] = calls[..] else {
        return Err(format!(
            "{} calls to the inner function (one is needed)",
            calls.len()
        ));
    };
    let mut info = InstructionInfoFactory::new();
    let after = call.next_ip();
    let pos = d
        .insns
        .iter()
        .position(|i| i.ip() == after)
        .ok_or("the call ends the code")?;
    for ins in d.insns[pos..].iter().take(8) {
        if let Some(t) = d.targets.range(after..=ins.ip()).next() {
            return Err(format!(
                "a branch lands at +{:#x}, between the call and its first emulated instruction",
                d.rel(*t)
            ));
        }
        if d.emulated(ins) {
            return Ok((
                call.ip(),
                Site {
                    offset: ins.ip(),
                    placement: Placement::Emulated,
                    reason: format!(
                        "{} at +{:#x}, right after the inner call: its result in rax",
                        text(ins),
                        d.rel(ins.ip())
                    ),
                },
            ));
        }
        if ins.flow_control() != FlowControl::Next {
            return Err(format!(
                "{} at +{:#x} after the inner call is not emulated",
                text(ins),
                d.rel(ins.ip())
            ));
        }
        if let Some(what) = clobbers(&mut info, ins, &[Register::RAX], true) {
            return Err(format!(
                "{} at +{:#x} {what} before an emulated instruction",
                text(ins),
                d.rel(ins.ip())
            ));
        }
    }
    Err("no emulated instruction soon after the inner call".into())
}

fn text(ins: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(ins, &mut out);
    out
}

/// What a kernel program needs where it sits, as `monitor-ebpf` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// An entry program reading these argument registers.
    Args(&'static [Register]),
    /// A uretprobe.
    Uretprobe,
    /// Attached at an instruction found elsewhere (Go's RETs): kept where it is.
    Fixed,
}

use Register::{R14, RAX, RBX, RCX, RDI, RDX, RSI};

fn needs(program: &str) -> Needs {
    match program {
        "ssl_write" | "ssl_read" | "gnutls_send" | "gnutls_recv" => Needs::Args(&[RDI, RSI, RDX]),
        "ssl_write_ex" | "ssl_read_ex" => Needs::Args(&[RDI, RSI, RDX, RCX]),
        "go_tls_write" => Needs::Args(&[RAX, RBX, RCX]),
        "go_tls_read" => Needs::Args(&[RAX, RBX, RCX, R14]),
        "ssl_write_ret" | "ssl_read_ret" => Needs::Uretprobe,
        _ => Needs::Fixed,
    }
}

/// Whether `program` is attached as a uretprobe.
pub fn is_uretprobe(program: &str) -> bool {
    needs(program) == Needs::Uretprobe
}

/// The uprobe that reads what a uretprobe reads, at an instruction after the inner call.
fn return_at_site(uretprobe: &str) -> Option<&'static str> {
    match uretprobe {
        "ssl_write_ret" => Some("ssl_write_ret_site"),
        "ssl_read_ret" => Some("ssl_read_ret_site"),
        _ => None,
    }
}

/// One probe as it will be attached: the point (program and file offset possibly moved off
/// the function's entry), and the choice that put it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub point: Point,
    /// The function's entry (file offset).
    pub entry: u64,
    pub kind: Kind,
    pub placement: Placement,
    pub reason: String,
}

/// Places every point of `target`; `code(offset)` gives the bytes of the function at that
/// file offset (up to [`MAX_FUNCTION`]; `None` when unreadable: the points stay at entry).
///
/// Per function: an entry probe moves to [`entry_site`]; a uretprobe moves with it when the
/// stack pointer has not moved (so they share one trap), else the entry stays with the
/// uretprobe at the first instruction. Where the function's `_ex` sibling proves its inner
/// call ([`forwarded_call`]) and [`return_site`] finds an emulated instruction after it, the
/// entry is read at that call with the `_ex` program and the return there, without a
/// uretprobe.
pub fn plan(target: &Target, code: impl Fn(u64) -> Option<Vec<u8>>) -> Vec<Placed> {
    let mut by_symbol: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    let mut order = Vec::new();
    for p in &target.points {
        let e = by_symbol.entry(p.symbol).or_default();
        if e.is_empty() {
            order.push(p.symbol);
        }
        e.push(p);
    }
    let mut cache: BTreeMap<u64, Option<Vec<u8>>> = BTreeMap::new();
    let mut bytes = |off: u64| cache.entry(off).or_insert_with(|| code(off)).clone();
    let mut out = Vec::new();
    for symbol in order {
        let points = &by_symbol[symbol];
        let entry = points
            .iter()
            .find(|p| !matches!(needs(p.program), Needs::Fixed))
            .map_or(points[0].offset, |p| p.offset);
        let own = bytes(entry);
        let func = own.as_deref().map(|c| Func { code: c, at: entry });
        // The `_ex` sibling's forwarded call, for moving the return off the uretprobe.
        let own_entry = points
            .iter()
            .find(|p| matches!(needs(p.program), Needs::Args(_)));
        let moved = (|| -> Result<_, String> {
            let ret = points
                .iter()
                .find(|p| needs(p.program) == Needs::Uretprobe)
                .ok_or("")?;
            let site_program = return_at_site(ret.program).ok_or("")?;
            let (Some(f), Some(own_entry)) = (func, own_entry) else {
                return Err("code not readable".into());
            };
            // The `_ex` sibling's forward proves the inner call; an `_ex` form (or a
            // function without one) can only prove its own.
            let sibling = format!("{symbol}_ex");
            let ex_symbol = if by_symbol.contains_key(sibling.as_str()) {
                sibling
            } else {
                symbol.to_string()
            };
            let no_proof = || format!("{ex_symbol} does not prove what the inner call does");
            let ex = by_symbol.get(ex_symbol.as_str()).ok_or_else(no_proof)?;
            let ex_entry = ex
                .iter()
                .find(|p| matches!(needs(p.program), Needs::Args(_)))
                .ok_or_else(no_proof)?;
            let Needs::Args(ex_args) = needs(ex_entry.program) else {
                return Err(no_proof());
            };
            let ex_code = bytes(ex_entry.offset).ok_or_else(no_proof)?;
            let x = forwarded_call(
                Func {
                    code: &ex_code,
                    at: ex_entry.offset,
                },
                ex_args,
            )
            .ok_or_else(|| format!("{ex_symbol} does not forward its arguments to one call"))?;
            let (call, site) = return_site(f, x)?;
            Ok((own_entry, ex_entry, site_program, ret, call, site))
        })();
        if let Ok((own_entry, ex_entry, site_program, ret, call, site)) = moved {
            out.push(Placed {
                point: Point {
                    program: ex_entry.program,
                    offset: call,
                    ..(*own_entry).clone()
                },
                entry,
                kind: Kind::Entry,
                placement: Placement::Emulated,
                reason: format!(
                    "the call to the inner function (+{:#x}) that {} forwards to: read as {}",
                    call - entry,
                    ex_entry.symbol,
                    ex_entry.program
                ),
            });
            out.push(Placed {
                point: Point {
                    program: site_program,
                    offset: site.offset,
                    ..(*ret).clone()
                },
                entry,
                kind: Kind::Return,
                placement: site.placement,
                reason: site.reason,
            });
            continue;
        }
        let no_return_site = match moved {
            Err(why) if !why.is_empty() => Some(why),
            _ => None,
        };
        let has_uretprobe = points.iter().any(|p| needs(p.program) == Needs::Uretprobe);
        let reads: Vec<Register> = points
            .iter()
            .filter_map(|p| match needs(p.program) {
                Needs::Args(r) => Some(r),
                _ => None,
            })
            .flatten()
            .copied()
            .collect();
        let site = match func {
            Some(f) if !reads.is_empty() || has_uretprobe => entry_site(f, &reads, has_uretprobe),
            _ => Site {
                offset: entry,
                placement: Placement::SingleStep,
                reason: "code not readable: at the entry".into(),
            },
        };
        for p in points {
            let (offset, kind, placement, reason) = match needs(p.program) {
                Needs::Args(_) => (
                    site.offset,
                    Kind::Entry,
                    site.placement,
                    site.reason.clone(),
                ),
                Needs::Uretprobe => (
                    site.offset,
                    Kind::Return,
                    Placement::Uretprobe,
                    match &no_return_site {
                        Some(why) => format!("uretprobe kept: {why}"),
                        None => "uretprobe: no proven return site".into(),
                    },
                ),
                Needs::Fixed => {
                    let placement = bytes(p.offset)
                        .and_then(|c| {
                            let f = Func {
                                code: &c,
                                at: p.offset,
                            };
                            let d = Decoded::new(f);
                            d.insns.first().map(|i| d.emulated(i))
                        })
                        .map_or(Placement::SingleStep, |e| {
                            if e {
                                Placement::Emulated
                            } else {
                                Placement::SingleStep
                            }
                        });
                    (
                        p.offset,
                        Kind::Return,
                        placement,
                        "at a return instruction found by the inspection".into(),
                    )
                }
            };
            out.push(Placed {
                point: Point {
                    offset,
                    ..(*p).clone()
                },
                entry,
                kind,
                placement,
                reason,
            });
        }
    }
    out
}

/// [`plan`] for a file open for reading: each function's bytes read with `pread`, bounded.
pub fn plan_file(file: &File, target: &Target) -> Vec<Placed> {
    plan(target, |off| {
        let mut buf = vec![0; MAX_FUNCTION];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        buf.truncate(got);
        (!buf.is_empty()).then_some(buf)
    })
}

/// The stack and the placed points of one file, as `monitor probes --explain` prints them.
pub fn explain(stack: Stack, placed: &[Placed], code: impl Fn(u64) -> Option<Vec<u8>>) -> String {
    let mut out = format!("stack {}\n", stack.name());
    for p in placed {
        let at = code(p.point.offset)
            .and_then(|c| {
                let mut d = Decoder::with_ip(64, &c, p.point.offset, DecoderOptions::NONE);
                d.can_decode().then(|| text(&d.decode()))
            })
            .unwrap_or_else(|| "?".into());
        out.push_str(&format!(
            "{:<28} {:<6} {:<20} {:<11} entry {:#x} site {:#x} (+{:#x}) `{}`: {}\n",
            p.point.symbol,
            p.kind.name(),
            p.point.program,
            p.placement.name(),
            p.entry,
            p.point.offset,
            p.point.offset.saturating_sub(p.entry),
            at,
            p.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARGS3: &[Register] = &[RDI, RSI, RDX];

    fn f(code: &[u8]) -> Func<'_> {
        Func { code, at: 0x1000 }
    }

    #[test]
    fn emulated_instructions_are_the_kernels_list() {
        let one = |b: &[u8]| {
            let ins = Decoder::with_ip(64, b, 0, DecoderOptions::NONE).decode();
            emulated(&ins, &b[..ins.len()])
        };
        assert!(one(&[0xe8, 0, 0, 0, 0])); // call rel32
        assert!(one(&[0xe9, 0, 0, 0, 0])); // jmp rel32
        assert!(one(&[0xeb, 0])); // jmp rel8
        assert!(one(&[0x7e, 3])); // jle rel8
        assert!(one(&[0x0f, 0x86, 0, 0, 0, 0])); // jbe rel32
        assert!(one(&[0x90])); // nop
        assert!(one(&[0x0f, 0x1f, 0x44, 0, 0])); // nopl
        assert!(one(&[0x55])); // push rbp
        assert!(one(&[0x41, 0x56])); // push r14
        assert!(!one(&[0x48, 0x83, 0xec, 0x18])); // sub rsp, 0x18
        assert!(!one(&[0xc3])); // ret
        assert!(!one(&[0xff, 0xe0])); // jmp rax
        assert!(!one(&[0x66, 0xe8, 0, 0])); // call with an operand-size override
        assert!(!one(&[0x48, 0x53])); // push rbx with REX.W: not the kernel's form
        assert!(!one(&[0xe3, 0])); // jrcxz
    }

    #[test]
    fn site_entry_already_emulated() {
        // push rbp; mov rbp, rsp; ... ret
        let s = entry_site(f(&[0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3]), ARGS3, false);
        assert_eq!(
            (s.offset, s.placement),
            (0x1000, Placement::Emulated),
            "{s:?}"
        );
    }

    #[test]
    fn site_past_endbr64() {
        // CET builds (Fedora, Ubuntu) open every function with `endbr64`, which the kernel
        // single-steps; the `push rbp` after it is emulated, and the stack pointer has not
        // moved yet, so a uretprobe can share it.
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
        let s = entry_site(f(&code), ARGS3, true);
        assert_eq!(
            (s.offset, s.placement),
            (0x1004, Placement::Emulated),
            "{s:?}"
        );
    }

    /// `SSL_write` of Debian 12's libssl.so.3 (OpenSSL 3.0), its first 0x30 bytes and the
    /// error path, as objdump shows them.
    const SSL_WRITE: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, // sub rsp, 0x18
        0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0, // mov rax, fs:[0x28]
        0x48, 0x89, 0x44, 0x24, 0x08, // mov [rsp+8], rax
        0x31, 0xc0, // xor eax, eax
        0x85, 0xd2, // test edx, edx
        0x78, 0x2f, // js +0x47
        0x48, 0x89, 0xe1, // mov rcx, rsp
        0x48, 0x63, 0xd2, // movsxd rdx, edx
        0xe8, 0xfd, 0xfb, 0xff, 0xff, // call internal
        0x85, 0xc0, // test eax, eax
        0x7e, 0x03, // jle +0x2a
        0x8b, 0x04, 0x24, // mov eax, [rsp]
        0x48, 0x8b, 0x54, 0x24, 0x08, // mov rdx, [rsp+8]
        0x64, 0x48, 0x2b, 0x14, 0x25, 0x28, 0, 0, 0, // sub rdx, fs:[0x28]
        0x75, 0x19, // jne +0x53 (the stack check's failure)
        0x48, 0x83, 0xc4, 0x18, // add rsp, 0x18
        0x31, 0xd2, 0x31, 0xc9, 0x31, 0xf6, 0x31, 0xff, // xor edx..edi
        0xc3, // ret (+0x46)
        0xe8, 0, 0, 0, 0, // +0x47: call ERR_new
        0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, -1
        0xeb, 0xd7, // jmp +0x2a
        0xe8, 0, 0, 0, 0, // +0x53: call __stack_chk_fail
        0x66, 0x90, // padding
        0x48, 0x83, 0xec, 0x08, // the next function: sub rsp, 8
        0xe8, 0, 0, 0, 0, // call
        0xc3,
    ];

    #[test]
    fn site_sub_rsp_then_branch() {
        // The first emulated instruction is the `js` of the length check: the arguments are
        // untouched up to it.
        let s = entry_site(f(SSL_WRITE), ARGS3, false);
        assert_eq!(
            (s.offset, s.placement),
            (0x1016, Placement::Emulated),
            "{s:?}"
        );
        // A uretprobe sharing the site needs the return address on top: the `sub rsp` at
        // the entry rules out every later site.
        let s = entry_site(f(SSL_WRITE), ARGS3, true);
        assert_eq!((s.offset, s.placement), (0x1000, Placement::SingleStep));
        assert!(s.reason.contains("stack pointer"), "{}", s.reason);
    }

    #[test]
    fn site_sub_rsp_then_call() {
        // SSL_write_ex: sub rsp, 8; call internal; ...
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        let s = entry_site(f(&code), &[RDI, RSI, RDX, RCX], false);
        assert_eq!(
            (s.offset, s.placement),
            (0x1004, Placement::Emulated),
            "{s:?}"
        );
        assert_eq!(
            forwarded_call(f(&code), &[RDI, RSI, RDX, RCX]),
            Some(0x1009)
        );
    }

    #[test]
    fn site_argument_overwritten_falls_back() {
        // sub rsp, 8; mov rdx, rsi; call ...: rdx changed before the call.
        let code = [
            0x48, 0x83, 0xec, 0x08, 0x48, 0x89, 0xf2, 0xe8, 0, 0, 0, 0, 0xc3,
        ];
        let s = entry_site(f(&code), ARGS3, false);
        assert_eq!((s.offset, s.placement), (0x1000, Placement::SingleStep));
        assert!(s.reason.contains("writes rdx"), "{}", s.reason);
        // An implicit write counts: cqo (rdx = sign of rax).
        let code = [0x48, 0x99, 0xe8, 0, 0, 0, 0, 0xc3];
        let s = entry_site(f(&code), ARGS3, false);
        assert_eq!(s.offset, 0x1000, "{s:?}");
        // A register the program does not read may change (gnutls_record_send:
        // xor r8d, r8d; xor ecx, ecx; jmp gnutls_record_send2).
        let code = [0x45, 0x31, 0xc0, 0x31, 0xc9, 0xe9, 0x86, 0x9c, 0xff, 0xff];
        let far = Func {
            code: &code,
            at: 0x40000,
        }; // the PLT is 0x637a bytes before
        let s = entry_site(far, ARGS3, true);
        assert_eq!(
            (s.offset, s.placement),
            (0x40005, Placement::Emulated),
            "{s:?}"
        );
        // The same register sign-extended is the same argument.
        let code = [0x48, 0x63, 0xd2, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(entry_site(f(&code), ARGS3, false).offset, 0x1003);
        // Another register sign-extended into it is not.
        let code = [0x48, 0x63, 0xd6, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(entry_site(f(&code), ARGS3, false).offset, 0x1000);
        // A store through an argument changes what the program may read.
        let code = [0x48, 0x89, 0x07, 0xe8, 0, 0, 0, 0, 0xc3]; // mov [rdi], rax
        assert_eq!(entry_site(f(&code), ARGS3, false).offset, 0x1000);
        // The first control-flow instruction is not emulated: stop there.
        let code = [0x48, 0x83, 0xec, 0x08, 0xff, 0xe0]; // jmp rax
        let s = entry_site(f(&code), ARGS3, false);
        assert_eq!(s.offset, 0x1000);
    }

    #[test]
    fn site_jump_into_the_middle_falls_back() {
        // +0 sub rsp,8; +4 mov rax,rdi; +7 call; +c test eax,eax; +e jne +4; +10 ret:
        // the `jne` loops back to +4, before the call, so the call is reached by a path
        // the prefix scan did not follow.
        let code = [
            0x48, 0x83, 0xec, 0x08, 0x48, 0x89, 0xf8, 0xe8, 0, 0, 0, 0, 0x85, 0xc0, 0x75, 0xf4,
            0xc3,
        ];
        let s = entry_site(f(&code), ARGS3, false);
        assert_eq!(s.offset, 0x1000, "{s:?}");
        assert!(s.reason.contains("lands at +0x4"), "{}", s.reason);
        // A branch back to the entry itself is no join inside the prefix.
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0x85, 0xc0, 0x75, 0xf3, 0xc3,
        ];
        assert_eq!(entry_site(f(&code), ARGS3, false).offset, 0x1004);
    }

    #[test]
    fn site_go_prologue() {
        // crypto/tls.(*Conn).Write, Go 1.19: lea r12, [rsp-0x98]; cmp r12, [r14+0x10];
        // jbe morestack; push rbp; ...; morestack: call runtime.morestack; jmp entry.
        let mut code = vec![
            0x4c, 0x8d, 0xa4, 0x24, 0x68, 0xff, 0xff, 0xff, // lea r12, [rsp-0x98]
            0x4d, 0x3b, 0x66, 0x10, // cmp r12, [r14+0x10]
            0x0f, 0x86, 0x08, 0, 0, 0,    // jbe +0x1a
            0x55, // push rbp
            0x48, 0x89, 0xe5, // mov rbp, rsp
            0x5d, // pop rbp
            0xc3, // ret (+0x17)
            0x90, 0x90, // (+0x18)
        ];
        code.extend([0xe8, 0, 0, 0, 0]); // +0x1a: call runtime.morestack_noctxt
        let back = -(code.len() as i32 + 5);
        code.push(0xe9);
        code.extend(back.to_le_bytes()); // jmp entry
        code.extend([0xcc; 4]);
        let s = entry_site(f(&code), &[RAX, RBX, RCX, R14], false);
        assert_eq!(
            (s.offset, s.placement),
            (0x100c, Placement::Emulated),
            "{s:?}"
        );
    }

    #[test]
    fn site_return_after_the_inner_call() {
        let (call, site) = return_site(f(SSL_WRITE), 0x1023 - 0x403).unwrap();
        assert_eq!(call, 0x101e);
        assert_eq!((site.offset, site.placement), (0x1025, Placement::Emulated));
        // SSL_write_ex: after the call only `xor`, `test`, `cmovs`, `add rsp`: none emulated.
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0x31, 0xd2, 0x85, 0xc0, 0x0f, 0x48, 0xc2,
            0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        assert!(return_site(f(&code), 0x1009).is_err());
        // A call whose result is overwritten before the next emulated instruction.
        let code = [0xe8, 0, 0, 0, 0, 0x31, 0xc0, 0x74, 0x00, 0xc3];
        let e = return_site(f(&code), 0x1005).unwrap_err();
        assert!(e.contains("writes rax"), "{e}");
        // No call to that function.
        assert!(return_site(f(&code), 0x2000).is_err());
    }

    #[test]
    fn site_forwarding_needs_untouched_arguments() {
        // mov rcx, rsp; call: rcx (the 4th argument) changed.
        let code = [0x48, 0x89, 0xe1, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(forwarded_call(f(&code), &[RDI, RSI, RDX, RCX]), None);
        // A second call after the forwarded one: not a plain forward.
        let code = [0xe8, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(forwarded_call(f(&code), &[RDI, RSI, RDX, RCX]), None);
    }

    fn point(program: &'static str, symbol: &'static str, offset: u64) -> Point {
        Point {
            program,
            symbol,
            offset,
            read_side: false,
        }
    }

    #[test]
    fn site_plan_moves_openssl_returns_off_uretprobes() {
        // SSL_write at 0x1000 and SSL_write_ex right after it (its call lands on the same
        // inner function as SSL_write's).
        let mut image = SSL_WRITE[..0x5a].to_vec();
        image.resize(0x60, 0xcc);
        let ex_at = 0x1060u64;
        let inner = 0x1023 - 0x403u64;
        let rel = (inner as i64 - (ex_at as i64 + 9)) as i32;
        image.extend([0x48, 0x83, 0xec, 0x08, 0xe8]);
        image.extend(rel.to_le_bytes());
        image.extend([0x48, 0x83, 0xc4, 0x08, 0xc3, 0xcc, 0xcc]);
        let target = Target {
            stack: Stack::Openssl,
            points: vec![
                point("ssl_write", "SSL_write", 0x1000),
                point("ssl_write_ret", "SSL_write", 0x1000),
                point("ssl_write_ex", "SSL_write_ex", ex_at),
                point("ssl_write_ret", "SSL_write_ex", ex_at),
            ],
        };
        let placed = plan(&target, |off| {
            image.get((off - 0x1000) as usize..).map(<[u8]>::to_vec)
        });
        let got: Vec<_> = placed
            .iter()
            .map(|p| {
                (
                    p.point.symbol,
                    p.point.program,
                    p.point.offset,
                    p.kind,
                    p.placement,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "SSL_write",
                    "ssl_write_ex",
                    0x101e,
                    Kind::Entry,
                    Placement::Emulated
                ),
                (
                    "SSL_write",
                    "ssl_write_ret_site",
                    0x1025,
                    Kind::Return,
                    Placement::Emulated
                ),
                // No emulated instruction after SSL_write_ex's call: the uretprobe stays,
                // and the entry program with it at the first instruction (one trap).
                (
                    "SSL_write_ex",
                    "ssl_write_ex",
                    ex_at,
                    Kind::Entry,
                    Placement::SingleStep
                ),
                (
                    "SSL_write_ex",
                    "ssl_write_ret",
                    ex_at,
                    Kind::Return,
                    Placement::Uretprobe
                ),
            ],
            "{placed:#?}"
        );
    }
}
