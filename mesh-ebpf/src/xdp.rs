//! XDP: the hot path on the node's external interface. XDP has no checksum helpers, so the
//! rewrite fixes the IPv4 and L4 checksums incrementally (RFC 1624, `mesh_common::csum`).
//!
//! XDP sees frames as they come off the wire, with complete checksums. (On a veth test bed the
//! sender's TX checksum offload must be off, or its frames carry only a partial checksum:
//! see docs/architecture.md.)

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_REDIRECT},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use mesh_common::{CtEntry, csum, ct_flags, proto};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    lb::{self, Origin, Tcp, Udp},
    maps::count,
    parse::{ETH_LEN, FRAG_LATER, FRAG_NONE, Pkt, parse_ipv4, ptr_at},
};

/// Published ports arriving from outside the node: balance, rewrite, redirect to the task.
#[inline(always)]
pub fn xdp_ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut pkt = parse_ipv4(data, end, end - data)?;
    if pkt.frag != FRAG_NONE {
        return xdp_fragment(ctx, &mut pkt);
    }
    let bytes = (end - data) as u64;
    let origin = || xdp_origin(ctx);
    let (ct, why) = if pkt.proto == proto::TCP {
        lb::lb4_ingress::<Tcp>(&pkt.key, pkt.tcp, bytes, origin)
    } else {
        lb::lb4_ingress::<Udp>(&pkt.key, pkt.tcp, bytes, origin)
    }?;
    count(why);
    xdp_nat(ctx, &pkt, &ct)
}

/// A fragment: balanced as the other packets of its flow. The first fragment is looked up
/// (or starts the flow) by its ports and leaves them for the later ones, which only follow an
/// existing flow. See [`xdp_nat`] for where a fragment goes.
#[inline(always)]
fn xdp_fragment(ctx: &XdpContext, pkt: &mut Pkt) -> Result<u32, u32> {
    lb::frag_ports(pkt)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let origin = || xdp_origin(ctx);
    let (ct, why) = match (pkt.proto == proto::TCP, pkt.frag == FRAG_LATER) {
        (true, true) => lb::lb4_fragment::<Tcp>(&pkt.key, bytes),
        (false, true) => lb::lb4_fragment::<Udp>(&pkt.key, bytes),
        (true, false) => lb::lb4_ingress::<Tcp>(&pkt.key, pkt.tcp, bytes, origin),
        (false, false) => lb::lb4_ingress::<Udp>(&pkt.key, pkt.tcp, bytes, origin),
    }?;
    count(why);
    lb::frag_seen(pkt);
    xdp_nat(ctx, pkt, &ct)
}

#[inline(always)]
fn xdp_origin(ctx: &XdpContext) -> Origin {
    let mut o = Origin {
        ifindex: ctx.ingress_ifindex() as u32,
        src_mac: [0; 6],
        dst_mac: [0; 6],
    };
    if let Ok(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) {
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            o.src_mac = (*eth).src_addr;
            o.dst_mac = (*eth).dst_addr;
        }
    }
    o
}

/// Rewrite addresses and ports to `ct`'s tuple with exact incremental checksums, then
/// redirect to `ct.ifindex` (with its MACs) or hand the packet to the kernel.
///
/// A later fragment has no L4 header: only its addresses change (the first fragment's L4
/// checksum covers the whole datagram, and its update covers the new addresses). A fragment
/// toward a task goes to the kernel, which forwards it and fragments it again if the task's
/// link has a smaller MTU than the one it came in on (a redirect would drop a frame that does
/// not fit); a reply's fragments leave as whole replies do.
#[inline(always)]
pub fn xdp_nat(ctx: &XdpContext, pkt: &Pkt, ct: &CtEntry) -> Result<u32, u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(data, end, ETH_LEN)?;
    let k = &pkt.key;
    let to_kernel = ct.ifindex == 0 || (pkt.frag != FRAG_NONE && ct.flags & ct_flags::FORWARD != 0);
    // SAFETY: every pointer below was bounds-checked by ptr_at; fields are byte arrays.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        if pkt.frag == FRAG_LATER {
            if k.saddr != ct.saddr {
                ipc = csum::replace4(ipc, k.saddr, ct.saddr);
            }
            if k.daddr != ct.daddr {
                ipc = csum::replace4(ipc, k.daddr, ct.daddr);
            }
        } else if pkt.proto == proto::TCP {
            let tcp: *mut TcpHdr = ptr_at(data, end, pkt.l4_off)?;
            let mut c = u16::from_ne_bytes((*tcp).check);
            if k.saddr != ct.saddr {
                ipc = csum::replace4(ipc, k.saddr, ct.saddr);
                c = csum::replace4(c, k.saddr, ct.saddr);
            }
            if k.daddr != ct.daddr {
                ipc = csum::replace4(ipc, k.daddr, ct.daddr);
                c = csum::replace4(c, k.daddr, ct.daddr);
            }
            if k.sport != ct.sport {
                c = csum::replace2(c, k.sport, ct.sport);
                (*tcp).source = ct.sport.to_ne_bytes();
            }
            if k.dport != ct.dport {
                c = csum::replace2(c, k.dport, ct.dport);
                (*tcp).dest = ct.dport.to_ne_bytes();
            }
            (*tcp).check = c.to_ne_bytes();
        } else {
            let udp: *mut UdpHdr = ptr_at(data, end, pkt.l4_off)?;
            let mut c = u16::from_ne_bytes((*udp).check);
            if k.saddr != ct.saddr {
                ipc = csum::replace4(ipc, k.saddr, ct.saddr);
                c = csum::udp_replace4(c, k.saddr, ct.saddr);
            }
            if k.daddr != ct.daddr {
                ipc = csum::replace4(ipc, k.daddr, ct.daddr);
                c = csum::udp_replace4(c, k.daddr, ct.daddr);
            }
            if k.sport != ct.sport {
                c = csum::udp_replace2(c, k.sport, ct.sport);
                (*udp).src = ct.sport.to_ne_bytes();
            }
            if k.dport != ct.dport {
                c = csum::udp_replace2(c, k.dport, ct.dport);
                (*udp).dst = ct.dport.to_ne_bytes();
            }
            (*udp).check = c.to_ne_bytes();
        }
        (*ip).src_addr = ct.saddr.to_ne_bytes();
        (*ip).dst_addr = ct.daddr.to_ne_bytes();
        (*ip).check = ipc.to_ne_bytes();

        if to_kernel {
            count(mesh_common::reason::PASS_REWRITTEN);
            return Ok(XDP_PASS);
        }
        let eth: *mut EthHdr = ptr_at(data, end, 0)?;
        (*eth).dst_addr = ct.dmac;
        (*eth).src_addr = ct.smac;
    }
    count(mesh_common::reason::REDIRECT);
    // SAFETY: plain helper call.
    let r = unsafe { bpf_redirect(ct.ifindex, 0) } as u32;
    Ok(if r == XDP_REDIRECT { r } else { XDP_PASS })
}
