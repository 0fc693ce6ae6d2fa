//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624 eq. 3:
//! `HC' = ~(~HC + ~m + m')`).
//!
//! All words are raw 16-bit values *as loaded from the packet* (native load of network-order
//! bytes). Ones'-complement sums are byte-order independent, so neither side needs to swap.
//! These are used by the XDP program (which has no checksum helpers) and tested on the host.

/// Fold a 64-bit accumulator of 16-bit words into 16 bits (no complement).
#[inline(always)]
pub const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after a 16-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u64 + (!from) as u64 + to as u64;
    !fold(sum)
}

/// New checksum after a 32-bit field (two words) of the covered data changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let sum = (!check) as u64
        + (nf & 0xffff) as u64
        + (nf >> 16) as u64
        + (to & 0xffff) as u64
        + (to >> 16) as u64;
    !fold(sum)
}

/// The checksum difference of a 32-bit field changing from `from` to `to`: the ones'-complement
/// sum of `~from` and `to`, folded to 16 bits. Differences add with [`add_diff`]; the TC
/// programs hand one to `bpf_l4_csum_replace` in its diff mode (field size 0), which applies
/// it the way the skb's checksum state requires (CHECKSUM_PARTIAL included).
#[inline(always)]
pub const fn diff4(from: u32, to: u32) -> u32 {
    let nf = !from;
    fold((nf & 0xffff) as u64 + (nf >> 16) as u64 + (to & 0xffff) as u64 + (to >> 16) as u64) as u32
}

/// Sum of two differences from [`diff4`].
#[inline(always)]
pub const fn add_diff(a: u32, b: u32) -> u32 {
    fold(a as u64 + b as u64) as u32
}

/// A checksum with a difference from [`diff4`] applied (what the kernel does for a checksum
/// that covers the changed bytes): equals [`replace4`] for one field.
#[inline(always)]
pub const fn apply_diff(check: u16, diff: u32) -> u16 {
    !fold((!check) as u64 + diff as u64)
}

/// UDP variant of [`replace4`]: a zero checksum means "none" and stays zero; a computed zero
/// is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace4(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace4(check, from, to);
    if c == 0 { 0xffff } else { c }
}

/// UDP variant of [`replace2`].
#[inline(always)]
pub const fn udp_replace2(check: u16, from: u16, to: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace2(check, from, to);
    if c == 0 { 0xffff } else { c }
}

/// Sum of big-endian 16-bit words of `data` (odd length padded with a zero byte), not folded.
pub fn sum_be(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u64;
        i += 2;
    }
    if i < data.len() {
        sum += (data[i] as u64) << 8;
    }
    sum
}

/// Full IPv4 header checksum of `hdr` (the checksum field must be zero or is ignored by
/// callers that zero it first). Result is big-endian (as written to the wire via `to_be_bytes`).
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    !fold(sum_be(hdr))
}

/// Full TCP/UDP checksum over the IPv4 pseudo-header and `segment` (checksum field zeroed).
/// Big-endian result.
pub fn ipv4_l4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = sum_be(&src) + sum_be(&dst) + proto as u64 + segment.len() as u64;
    sum += sum_be(segment);
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header with its checksum at bytes 10..12.
    fn hdr(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    fn load16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }
    fn load32(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn valid_header_sums_to_zero() {
        let h = hdr([192, 168, 0, 1], [10, 0, 0, 7]);
        assert_eq!(!fold(sum_be(&h)), 0);
    }

    #[test]
    fn replace4_matches_full_recompute() {
        let mut h = hdr([198, 18, 0, 2], [198, 18, 0, 1]);
        let new_dst = [10, 0, 1, 11];
        let old = load32(&h[16..20]);
        let newv = u32::from_ne_bytes(new_dst);
        let c = replace4(load16(&h[10..12]), old, newv);
        h[16..20].copy_from_slice(&new_dst);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        let expect = hdr([198, 18, 0, 2], new_dst);
        assert_eq!(h, expect);
    }

    #[test]
    fn replace2_matches_full_recompute_many_values() {
        // Exhaustive over ports for one segment: incremental == full.
        let src = [198, 18, 0, 2];
        let dst = [10, 0, 1, 11];
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        seg[12] = 0x50;
        seg[13] = 0x02;
        let base = ipv4_l4(src, dst, 6, &seg);
        for p in (0u32..=65535).step_by(7) {
            let p = p as u16;
            let c = replace2(base.to_be(), 8080u16.to_be(), p.to_be());
            let mut s2 = seg;
            s2[2..4].copy_from_slice(&p.to_be_bytes());
            assert_eq!(u16::from_be(c), ipv4_l4(src, dst, 6, &s2), "port {p}");
        }
    }

    #[test]
    fn diffs_add_up_to_the_replacements_they_stand_for() {
        let (c, a0, a1, b0, b1) = (
            0x1c46u16,
            0x0200_12c6u32,
            0x0b01_000au32,
            0x901f_40c4u32,
            0x5000_40c4u32,
        );
        for (from, to) in [(a0, a1), (b0, b1), (0, u32::MAX), (u32::MAX, 0), (a1, a1)] {
            assert_eq!(
                apply_diff(c, diff4(from, to)),
                replace4(c, from, to),
                "{from:#x} -> {to:#x}"
            );
        }
        let both = add_diff(diff4(a0, a1), diff4(b0, b1));
        assert_eq!(apply_diff(c, both), replace4(replace4(c, a0, a1), b0, b1));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }

    #[test]
    fn udp_computed_zero_becomes_ffff() {
        // Find a change that makes the ones'-complement result 0.
        // replace2(c, from, to) == 0 when ~c + ~from + to == 0xffff (folded).
        let c: u16 = 0x1234;
        let from: u16 = 0x0000;
        // need (!c) + 0xffff + to ≡ 0xffff  → to = c (mod ones' complement)
        let to = c;
        assert_eq!(replace2(c, from, to), 0);
        assert_eq!(udp_replace2(c, from, to), 0xffff);
    }
}
