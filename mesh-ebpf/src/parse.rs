//! Header parsing shared by the XDP and TC programs. Every access goes through [`ptr_at`],
//! which proves to the verifier that the bytes lie inside the packet.

use core::mem;

use mesh_common::{CtKey, proto, reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

pub const ETH_LEN: usize = EthHdr::LEN;
/// Where the L4 header starts: IPv4 options are passed, so the IP header is 20 bytes.
pub const L4_OFF: usize = ETH_LEN + 20;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
/// Offsets inside the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Result<*mut T, u32> {
    if data + off + mem::size_of::<T>() > data_end {
        return Err(reason::PASS_MALFORMED);
    }
    Ok((data + off) as *mut T)
}

/// What the load balancer needs from an IPv4 TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Pkt {
    /// Addresses and ports as seen on the wire (raw network-order fields).
    pub key: CtKey,
    /// [`proto::TCP`] or [`proto::UDP`]: which conntrack table `key` belongs to.
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame (IHL-derived).
    pub l4_off: usize,
    /// What this TCP packet does to its flow: [`CLOSE_NONE`], [`CLOSE_FIN`] (the sender is
    /// done sending), [`CLOSE_RST`] (the flow is over both ways) or [`OPEN_SYN`] (a pure SYN:
    /// the sender opens a connection). Always [`CLOSE_NONE`] for UDP.
    pub tcp: u8,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`].
    pub frag: u8,
    /// DF ("don't fragment") is set.
    pub df: bool,
    /// The IP identification field (network order): with the addresses and protocol, what
    /// names a fragment's datagram.
    pub ip_id: u16,
    /// The IP id a rewritten fragment leaves with: its datagram's fresh one
    /// ([`crate::lb::frag_balanced`], [`crate::lb::frag_ports`]); `ip_id` for anything else.
    pub new_id: u16,
}

/// A whole datagram.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (MF set, offset 0): it carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset ≠ 0): no L4 header; `key`'s ports are 0 until the first
/// fragment's are looked up ([`crate::lb::frag_ports`]).
pub const FRAG_LATER: u8 = 2;

pub const CLOSE_NONE: u8 = 0;
pub const CLOSE_FIN: u8 = 1;
pub const CLOSE_RST: u8 = 2;
/// SYN without ACK, FIN or RST: the first packet of a connection (or its retransmission).
pub const OPEN_SYN: u8 = 3;

impl Pkt {
    /// Offset of the L4 checksum field from the start of the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP {
            self.l4_off + TCP_CSUM_OFF
        } else {
            self.l4_off + UDP_CSUM_OFF
        }
    }
}

/// Parse Ethernet + IPv4 + TCP/UDP. Anything else comes back as `Err(reason)` and is passed
/// untouched by the caller: non-IPv4, IP options, other protocols, and truncated or
/// inconsistent headers. A fragment comes back as a [`Pkt`] with [`Pkt::frag`] set: the first
/// with its ports, a later one without (the caller looks them up or passes it).
///
/// `frame_len` is the whole frame's length: `data_end - data` for XDP, the skb length for TC
/// (where the directly readable part may hold only the headers).
#[inline(always)]
pub fn parse_ipv4(data: usize, data_end: usize, frame_len: usize) -> Result<Pkt, u32> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0)?;
    // SAFETY: ptr_at checked the bounds; fields are byte arrays or read unaligned.
    if unsafe { core::ptr::read_unaligned(&raw const (*eth).ether_type) } != ETH_P_IP.to_be() {
        return Err(reason::PASS_NOT_IPV4);
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, ETH_LEN)?;
    let (vihl, frags, tot_len, l4proto, saddr, daddr, ip_id) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            u16::from_be_bytes((*ip).tot_len) as usize,
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            u16::from_ne_bytes((*ip).id),
        )
    };
    if vihl >> 4 != 4 {
        return Err(reason::PASS_MALFORMED);
    }
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(reason::PASS_MALFORMED);
    }
    if ihl > 5 {
        return Err(reason::PASS_IP_OPTIONS);
    }
    // No options (IHL 5, checked above): the L4 header is at a constant offset, which the
    // verifier sees as one through every spill (a variable one can come back unbounded).
    let l4_off = L4_OFF;
    // The IP datagram must fit in the frame (Ethernet padding may make the frame longer).
    if tot_len < ihl * 4 || ETH_LEN + tot_len > frame_len {
        return Err(reason::PASS_MALFORMED);
    }
    // A non-zero offset: a later fragment, no L4 header (its first fragment's ports name
    // its flow). MF with offset 0: the first fragment, parsed as a whole datagram (it must
    // hold the whole L4 header: a shorter one is malformed, as the tiny-fragment attack).
    let frag = if frags & 0x1fff != 0 {
        FRAG_LATER
    } else if frags & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    if frag == FRAG_LATER {
        if l4proto != proto::TCP && l4proto != proto::UDP {
            return Err(reason::PASS_NOT_TCP_UDP);
        }
        return Ok(Pkt {
            key: CtKey {
                saddr,
                daddr,
                sport: 0,
                dport: 0,
            },
            proto: l4proto,
            l4_off,
            tcp: CLOSE_NONE,
            frag,
            df: false,
            ip_id,
            new_id: ip_id,
        });
    }
    let (sport, dport, tcp) = match l4proto {
        proto::TCP => {
            let tcp: *const TcpHdr = ptr_at(data, data_end, l4_off)?;
            // SAFETY: bounds checked by ptr_at.
            let (s, d, doff, fin, rst, syn, ack) = unsafe {
                let t = &*tcp;
                (
                    t.source,
                    t.dest,
                    t.doff(),
                    t.fin(),
                    t.rst(),
                    t.syn(),
                    t.ack(),
                )
            };
            if doff < 5 || tot_len < ihl * 4 + TcpHdr::LEN {
                return Err(reason::PASS_MALFORMED);
            }
            let event = if rst != 0 {
                CLOSE_RST
            } else if fin != 0 {
                CLOSE_FIN
            } else if syn != 0 && ack == 0 {
                OPEN_SYN
            } else {
                CLOSE_NONE
            };
            (u16::from_ne_bytes(s), u16::from_ne_bytes(d), event)
        }
        proto::UDP => {
            let udp: *const UdpHdr = ptr_at(data, data_end, l4_off)?;
            // SAFETY: bounds checked by ptr_at.
            let (s, d) = unsafe { ((*udp).src, (*udp).dst) };
            if tot_len < ihl * 4 + UdpHdr::LEN {
                return Err(reason::PASS_MALFORMED);
            }
            (u16::from_ne_bytes(s), u16::from_ne_bytes(d), CLOSE_NONE)
        }
        _ => return Err(reason::PASS_NOT_TCP_UDP),
    };
    Ok(Pkt {
        key: CtKey {
            saddr,
            daddr,
            sport,
            dport,
        },
        proto: l4proto,
        l4_off,
        tcp,
        frag,
        df: frags & 0x4000 != 0,
        ip_id,
        new_id: ip_id,
    })
}

/// The IPv4 destination of any IPv4 frame (fragments, ICMP, options included), for checks
/// that apply to every packet, not only to the TCP/UDP the load balancer rewrites.
#[inline(always)]
pub fn ipv4_daddr(data: usize, data_end: usize) -> Option<u32> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0).ok()?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { core::ptr::read_unaligned(&raw const (*eth).ether_type) } != ETH_P_IP.to_be() {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, ETH_LEN).ok()?;
    // SAFETY: bounds checked by ptr_at.
    Some(u32::from_ne_bytes(unsafe { (*ip).dst_addr }))
}
