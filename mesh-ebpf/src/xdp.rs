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
use mesh_common::{CtEntry, csum, proto};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    lb::{self, Origin, Tcp, Udp},
    maps::count,
    parse::{ETH_LEN, Pkt, parse_ipv4, ptr_at},
};

/// Published ports arriving from outside the node: balance, rewrite, redirect to the task.
#[inline(always)]
pub fn xdp_ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let pkt = parse_ipv4(data, end, end - data)?;
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
#[inline(always)]
pub fn xdp_nat(ctx: &XdpContext, pkt: &Pkt, ct: &CtEntry) -> Result<u32, u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(data, end, ETH_LEN)?;
    let k = &pkt.key;
    // SAFETY: every pointer below was bounds-checked by ptr_at; fields are byte arrays.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        if pkt.proto == proto::TCP {
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

        if ct.ifindex == 0 {
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
