//! "Fragmentation needed" (ICMP destination unreachable, code 4, RFC 1191) for a datagram with
//! DF set that does not fit the link toward its task: what a router on the path would send.
//! It comes from the address the client sent to and quotes the datagram as the client sent
//! it, so the client's stack finds its socket and lowers its path MTU to that address (the
//! kernel's own error would quote the rewritten datagram, which the client cannot match).

/// What the error quotes: the datagram's IPv4 header (no options) and 8 bytes after it.
pub const QUOTE: usize = 20 + 8;
/// The error's own headers: IPv4 and ICMP.
pub const HDRS: usize = 20 + 8;
/// No link of a mesh is smaller (IPv6's minimum): datagrams up to it are never checked.
pub const MIN_MTU: usize = 1280;

/// The whole error frame: Ethernet, the error's IPv4 and ICMP headers, the quote.
pub const FRAME: usize = ETH + HDRS + QUOTE;
const ETH: usize = 14;
const Q: usize = ETH + HDRS;

/// Fill in the error's IPv4 and ICMP headers (bytes 14..42 of `f`, checksums included) for
/// the quote already at `f[42..70]` (the datagram's first [`QUOTE`] bytes, as received), with
/// `mtu` as the next hop's MTU. In place: nothing of the frame is copied to the stack.
#[inline(always)]
pub fn fill_frag_needed(f: &mut [u8; FRAME], mtu: u16) {
    f[ETH] = 0x45;
    f[ETH + 1] = 0xc0; // precedence "internetwork control", as the kernel's ICMP errors
    let tot = ((HDRS + QUOTE) as u16).to_be_bytes();
    f[ETH + 2] = tot[0];
    f[ETH + 3] = tot[1];
    let mut i = 4;
    while i < 12 {
        f[ETH + i] = 0; // id, flags, fragment offset, then TTL, protocol, checksum below
        i += 1;
    }
    f[ETH + 8] = 64;
    f[ETH + 9] = 1; // ICMP
    let mut i = 0;
    while i < 4 {
        f[ETH + 12 + i] = f[Q + 16 + i]; // from the address the client sent to
        f[ETH + 16 + i] = f[Q + 12 + i]; // to the client
        i += 1;
    }
    let c = (!fold(sum(f, ETH, ETH + 20))).to_be_bytes();
    f[ETH + 10] = c[0];
    f[ETH + 11] = c[1];
    let m = mtu.to_be_bytes();
    let icmp = [3, 4, 0, 0, 0, 0, m[0], m[1]]; // destination unreachable: fragmentation needed
    let mut i = 0;
    while i < 8 {
        f[ETH + 20 + i] = icmp[i];
        i += 1;
    }
    let c = (!fold(sum(f, ETH + 20, FRAME))).to_be_bytes();
    f[ETH + 22] = c[0];
    f[ETH + 23] = c[1];
}

/// Sum of the big-endian 16-bit words of `b[from..to]` (an even span), not folded.
#[inline(always)]
fn sum<const N: usize>(b: &[u8; N], from: usize, to: usize) -> u32 {
    let mut s = 0u32;
    let mut i = from;
    while i + 1 < to {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum;

    #[test]
    fn the_error_quotes_the_datagram_and_both_checksums_verify() {
        let mut f = [0u8; FRAME];
        // The quote: a UDP datagram 198.18.0.2:5002 → 198.18.0.1:8053 of 1500 bytes, DF.
        let mut ip = [
            0x45, 0, 0x05, 0xdc, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1,
        ];
        let c = csum::ipv4_header(&ip).to_be_bytes();
        ip[10..12].copy_from_slice(&c);
        f[ETH + HDRS..ETH + HDRS + 20].copy_from_slice(&ip);
        f[ETH + HDRS + 20..].copy_from_slice(&[0x13, 0x8a, 0x1f, 0x75, 0x05, 0xc8, 0xab, 0xcd]);
        let quote = f[ETH + HDRS..].to_vec();
        fill_frag_needed(&mut f, 1450);
        let e = &f[ETH..];
        assert_eq!(e[0], 0x45);
        assert_eq!(
            u16::from_be_bytes([e[2], e[3]]) as usize,
            HDRS + QUOTE,
            "total length"
        );
        assert_eq!(e[9], 1, "ICMP");
        assert_eq!(
            &e[12..16],
            &[198, 18, 0, 1],
            "from the address the client sent to"
        );
        assert_eq!(&e[16..20], &[198, 18, 0, 2], "to the client");
        assert_eq!(
            !csum::fold(csum::sum_be(&e[..20])),
            0,
            "IPv4 header checksum"
        );
        assert_eq!(
            (e[20], e[21]),
            (3, 4),
            "destination unreachable, fragmentation needed"
        );
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1450, "next-hop MTU");
        assert_eq!(
            !csum::fold(csum::sum_be(&e[20..])),
            0,
            "ICMP checksum over header and quote"
        );
        assert_eq!(&e[HDRS..], &quote[..], "the quote is left as received");
    }
}
