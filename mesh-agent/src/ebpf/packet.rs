//! Crafting and checking raw Ethernet/IPv4/TCP/UDP frames, for BPF_PROG_TEST_RUN fixtures
//! (tests and the per-packet benchmark).

use std::net::Ipv4Addr;

use mesh_common::csum;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A frame to build.
#[derive(Debug, Clone)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// Raw fragment field (flags + offset).
    pub frag: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// `zero_csum`: send without a UDP checksum (allowed over IPv4).
    Udp {
        zero_csum: bool,
    },
    /// Any other IP protocol with an opaque payload.
    Other(u8),
}

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0, 0xaa],
            dst_mac: [0x02, 0, 0, 0, 0, 0xbb],
            src,
            dst,
            sport,
            dport,
            l4: L4::Tcp { flags },
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Self {
        Frame {
            l4: L4::Udp { zero_csum: false },
            payload: payload.to_vec(),
            ..Frame::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let (proto, l4) = match self.l4 {
            L4::Tcp { flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&1000u32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&self.payload);
                let c = csum::ipv4_l4(self.src.octets(), self.dst.octets(), 6, &h);
                h[16..18].copy_from_slice(&c.to_be_bytes());
                (6u8, h)
            }
            L4::Udp { zero_csum } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.payload);
                if !zero_csum {
                    let mut c = csum::ipv4_l4(self.src.octets(), self.dst.octets(), 17, &h);
                    if c == 0 {
                        c = 0xffff;
                    }
                    h[6..8].copy_from_slice(&c.to_be_bytes());
                }
                (17u8, h)
            }
            L4::Other(p) => (p, self.payload.clone()),
        };
        let mut f = Vec::with_capacity(14 + ihl + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = csum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// What a frame says, checksums verified from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ip_csum_ok: bool,
    /// For UDP with a zero checksum: true (nothing to verify).
    pub l4_csum_ok: bool,
    pub udp_csum_zero: bool,
}

/// Parse a plain IPv4 TCP/UDP frame (no options) and verify both checksums.
pub fn parse(f: &[u8]) -> Option<Parsed> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let ip = &f[14..14 + ihl];
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &f[14 + ihl..14 + tot];
    let src: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst: [u8; 4] = ip[16..20].try_into().ok()?;
    let proto = ip[9];
    let ip_csum_ok = !csum::fold(csum::sum_be(ip)) == 0;
    let (l4_csum_ok, udp_csum_zero) = match proto {
        6 => (
            !csum::fold(
                csum::sum_be(&src) + csum::sum_be(&dst) + 6 + l4.len() as u64 + csum::sum_be(l4),
            ) == 0,
            false,
        ),
        17 => {
            if l4[6..8] == [0, 0] {
                (true, true)
            } else {
                (
                    !csum::fold(
                        csum::sum_be(&src)
                            + csum::sum_be(&dst)
                            + 17
                            + l4.len() as u64
                            + csum::sum_be(l4),
                    ) == 0,
                    false,
                )
            }
        }
        _ => (true, false),
    };
    Some(Parsed {
        dst_mac: f[0..6].try_into().ok()?,
        src_mac: f[6..12].try_into().ok()?,
        src: Ipv4Addr::from(src),
        dst: Ipv4Addr::from(dst),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        ip_csum_ok,
        l4_csum_ok,
        udp_csum_zero,
    })
}

/// Split a whole IPv4 frame without options (as [`Frame::build`] makes it) into two
/// fragments of its datagram: the first with `at` bytes of the IP payload (a multiple of 8)
/// and MF set, the later one with the rest at offset `at`; both carry IP identification `id`.
pub fn fragment(whole: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    assert!(
        at.is_multiple_of(8) && whole.len() > 34 + at,
        "a fragment boundary inside the payload"
    );
    let (hdr, payload) = whole.split_at(34);
    let piece = |data: &[u8], frag: u16| {
        let mut f = hdr.to_vec();
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = csum::ipv4_header(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    (
        piece(&payload[..at], 0x2000),
        piece(&payload[at..], (at / 8) as u16),
    )
}

/// The whole frame two fragments of [`fragment`] make (the first's Ethernet and IP header,
/// MF cleared), for [`parse`] to check the datagram's L4 checksum. `None` if they are not the
/// first and the later fragment of one datagram, or either IP header checksum is wrong.
pub fn reassemble(first: &[u8], later: &[u8]) -> Option<Vec<u8>> {
    let ok = |f: &[u8]| f.len() >= 34 && !csum::fold(csum::sum_be(&f[14..34])) == 0;
    let same = first.get(26..34)? == later.get(26..34)?
        && first[18..20] == later[18..20]
        && first[23] == later[23];
    let (ffrag, lfrag) = (
        u16::from_be_bytes([first[20], first[21]]),
        u16::from_be_bytes([later[20], later[21]]),
    );
    if !ok(first)
        || !ok(later)
        || !same
        || ffrag != 0x2000
        || (lfrag & 0x1fff) as usize * 8 != first.len() - 34
    {
        return None;
    }
    let mut w = first.to_vec();
    w.extend_from_slice(&later[34..]);
    let tot = (w.len() - 14) as u16;
    w[16..18].copy_from_slice(&tot.to_be_bytes());
    w[20..22].copy_from_slice(&[0, 0]);
    w[24..26].copy_from_slice(&[0, 0]);
    let c = csum::ipv4_header(&w[14..34]);
    w[24..26].copy_from_slice(&c.to_be_bytes());
    Some(w)
}
