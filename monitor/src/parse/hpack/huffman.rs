//! HPACK's canonical Huffman code (RFC 7541 Appendix B), decoded four bits at a time with a
//! table built once from the code tree. Strict about padding: more than 7 bits, padding that
//! is not the EOS prefix, or an EOS symbol in the data are errors, as the RFC requires.

use std::sync::OnceLock;

/// A child pointer with this bit set is a leaf holding the symbol in its low bits.
const LEAF: u16 = 0x8000;
const NO_SYMBOL: u16 = u16::MAX;

/// What four bits do from one tree node.
#[derive(Clone, Copy)]
struct Step {
    next: u8,
    /// The symbol completed on the way, or [`NO_SYMBOL`] (codes are at least 5 bits long, so
    /// four bits complete at most one).
    symbol: u16,
    fail: bool,
}

struct Table {
    steps: Vec<[Step; 16]>,
    /// Whether ending at a node is valid padding: at most 7 bits, all ones.
    accepts: Vec<bool>,
}

/// Internal nodes of the code tree; node 0 is the root, `0` as a child means "no such code".
fn tree() -> Vec<[u16; 2]> {
    let mut nodes: Vec<[u16; 2]> = vec![[0, 0]];
    for (sym, &(code, len)) in CODES.iter().enumerate() {
        let mut at = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                nodes[at][bit] = LEAF | sym as u16;
            } else {
                if nodes[at][bit] == 0 {
                    nodes.push([0, 0]);
                    nodes[at][bit] = (nodes.len() - 1) as u16;
                }
                at = nodes[at][bit] as usize;
            }
        }
    }
    nodes
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let tree = tree();
        // 256 internal nodes for 257 leaves: node ids fit a byte.
        assert!(tree.len() <= 256);
        let mut depth = vec![0u8; tree.len()];
        let mut ones = vec![false; tree.len()];
        ones[0] = true;
        // Children are created after their parents, so one pass in id order suffices.
        for n in 0..tree.len() {
            for (bit, &c) in tree[n].iter().enumerate() {
                if c != 0 && c & LEAF == 0 {
                    depth[c as usize] = depth[n] + 1;
                    ones[c as usize] = ones[n] && bit == 1;
                }
            }
        }
        let steps = (0..tree.len())
            .map(|n| {
                std::array::from_fn(|nibble| {
                    let mut at = n;
                    let mut step = Step {
                        next: 0,
                        symbol: NO_SYMBOL,
                        fail: false,
                    };
                    for i in (0..4).rev() {
                        let c = tree[at][(nibble >> i) & 1];
                        if c & LEAF != 0 {
                            let sym = c & !LEAF;
                            step.fail |= sym == 256 || step.symbol != NO_SYMBOL;
                            step.symbol = sym;
                            at = 0;
                        } else if c == 0 {
                            step.fail = true;
                            break;
                        } else {
                            at = c as usize;
                        }
                    }
                    step.next = at as u8;
                    step
                })
            })
            .collect();
        let accepts = (0..tree.len()).map(|n| ones[n] && depth[n] <= 7).collect();
        Table { steps, accepts }
    })
}

/// Decodes `src`, appending to `out`. `Err(())` on any invalid code or padding.
pub(crate) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
    let t = table();
    let mut at = 0usize;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0xf] {
            let step = t.steps[at][nibble as usize];
            if step.fail {
                return Err(());
            }
            if step.symbol != NO_SYMBOL {
                out.push(step.symbol as u8);
            }
            at = step.next as usize;
        }
    }
    if t.accepts[at] { Ok(()) } else { Err(()) }
}

/// Encodes `src` (EOS-prefix padding): what a peer sends, for tests and fuzzing.
pub fn encode(src: &[u8]) -> Vec<u8> {
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for &b in src {
        let (code, len) = CODES[b as usize];
        acc = (acc << len) | code as u64;
        bits += len as u32;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) | (0xff >> bits)) as u8);
    }
    out
}

#[rustfmt::skip]
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
    (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
    (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10),
    (0xf9, 8), (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6),
    (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
    (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7),
    (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5),
    (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7),
    (0x2c, 6), (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11), (0x3ffd, 14),
    (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23),
    (0x7fffdb, 23), (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21),
    (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
    (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22),
    (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23),
    (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27),
    (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
    (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
    (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(src: &[u8]) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|_| out)
    }

    #[test]
    fn rfc_vectors() {
        // RFC 7541 C.4.1: "www.example.com".
        let src = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(dec(&src).unwrap(), b"www.example.com");
        // C.4.2: "no-cache".
        assert_eq!(
            dec(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).unwrap(),
            b"no-cache"
        );
        assert_eq!(dec(&[]).unwrap(), b"");
    }

    #[test]
    fn bad_padding_and_eos_are_errors() {
        // 'a' is 00011 (5 bits): padding with zeros is invalid.
        assert!(dec(&[0b0001_1000]).is_err());
        assert!(dec(&[0b0001_1111]).is_ok());
        // A whole byte of padding is more than 7 bits.
        assert!(dec(&[0b0001_1111, 0xff]).is_err());
        // EOS (30 ones) inside the data.
        assert!(dec(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// Every symbol, any mix, round-trips through the encoder.
    #[test]
    fn every_symbol_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(dec(&encode(&all)).unwrap(), all);
        for b in 0..=255u8 {
            assert_eq!(dec(&encode(&[b, b'a', b])).unwrap(), [b, b'a', b]);
        }
    }
}
