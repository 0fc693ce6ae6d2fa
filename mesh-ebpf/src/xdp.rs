//! XDP: the hot path on the node's external interface. XDP has no checksum helpers, so the
//! rewrite fixes the IPv4 and L4 checksums incrementally (RFC 1624, `mesh_common::csum`).
//!
//! XDP sees frames as they come off the wire, with complete checksums. (On a veth test bed the
//! sender's TX checksum offload must be off, or its frames carry only a partial checksum:
//! see docs/architecture.md.)

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
        bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
        xdp_md,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use mesh_common::{
    CtEntry, csum, ct_flags,
    icmp::{self, FRAME, HDRS, MIN_MTU, QUOTE},
    proto,
};
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
    let mut to_kernel = ct.ifindex == 0;
    if let Some(mtu) = xdp_too_big(ctx, &pkt, &ct) {
        if pkt.df {
            return Ok(xdp_frag_needed(ctx.ctx, mtu));
        }
        // Without DF it may be fragmented: the kernel does that on its way to the task.
        to_kernel = true;
    }
    xdp_nat(ctx, &pkt, &ct, to_kernel)
}

/// The MTU a datagram toward a task exceeds, if it does: the task's link (a redirect there
/// would drop the frame) or, with DF set and the task on another node, the route's (the
/// kernel would tell the rewritten source, this node, not the client; without DF it just
/// fragments). Frames up to [`MIN_MTU`] are not checked; bigger ones in [`xdp_path_mtu`], a
/// function of its own so the hot path's registers do not pay for it.
#[inline(always)]
fn xdp_too_big(ctx: &XdpContext, pkt: &Pkt, ct: &CtEntry) -> Option<u16> {
    let len = ctx.data_end() - ctx.data() - ETH_LEN;
    if len <= MIN_MTU || ct.flags & ct_flags::FORWARD == 0 || (!pkt.df && ct.ifindex == 0) {
        return None;
    }
    let mtu = xdp_path_mtu(ctx.ctx, ct, pkt.proto, len as u32);
    (mtu != 0).then_some(mtu)
}

/// The MTU toward `ct`'s task if an IP datagram of `len` bytes exceeds it, else 0.
#[inline(never)]
fn xdp_path_mtu(ctx: *mut xdp_md, ct: &CtEntry, proto: u8, len: u32) -> u16 {
    if ct.ifindex != 0 {
        let mut mtu = 0u32;
        // SAFETY: helper call on the program's own context.
        let rc = unsafe { bpf_check_mtu(ctx as *mut _, ct.ifindex, &mut mtu, 0, 0) };
        return if rc == BPF_MTU_CHK_RET_FRAG_NEEDED as i64 {
            mtu as u16
        } else {
            0
        };
    }
    // SAFETY: reading a field of the context the kernel gave us.
    let mut fib = core::mem::MaybeUninit::uninit();
    let p = lb::fib_params4(
        &mut fib,
        ct,
        proto,
        unsafe { (*ctx).ingress_ifindex },
        len as u16,
    );
    // SAFETY: helper call with a valid, correctly sized parameter block.
    let rc = unsafe {
        fib_lookup(
            ctx as *mut _,
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the kernel wrote mtu_result with this return code.
        unsafe { p.__bindgen_anon_1.mtu_result }
    } else {
        0
    }
}

/// Answer the frame with ICMP "fragmentation needed" (see [`icmp`]): cut it to the quoted
/// headers, put the error's headers in front, and send it back out of the interface it came
/// in on. A function of its own: its stack is not the hot path's.
#[inline(never)]
fn xdp_frag_needed(raw: *mut xdp_md, mtu: u16) -> u32 {
    let ctx = XdpContext::new(raw);
    let cut = (ETH_LEN + QUOTE) as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper calls on our own context; every pointer is derived after them.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, cut) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HDRS as i32)) } != 0
    {
        count(mesh_common::reason::DROP_REWRITE);
        return XDP_DROP;
    }
    // Now: [room for the error's Ethernet and IP headers][the frame's Ethernet header]
    // [its IP header and 8 bytes: the quote, already where the error carries it].
    let Ok(out) = ptr_at::<[u8; FRAME]>(ctx.data(), ctx.data_end(), 0) else {
        count(mesh_common::reason::DROP_REWRITE);
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let o = &mut *out;
        let mut i = 0;
        while i < 6 {
            o[i] = o[HDRS + 6 + i]; // to the client's MAC
            o[6 + i] = o[HDRS + i]; // from the node's
            i += 1;
        }
        o[12] = 0x08;
        o[13] = 0x00;
        icmp::fill_frag_needed(o, mtu);
    }
    count(mesh_common::reason::DROP_TOO_BIG);
    // Back out of the interface it came in on: a redirect to it rather than XDP_TX, which a
    // veth only delivers once something else wakes its peer (the kernel's veth_xdp_flush
    // schedules the peer only if that has an XDP program; a redirect's flush always does).
    // SAFETY: reading a field of the context the kernel gave us; plain helper call.
    let r = unsafe { bpf_redirect((*raw).ingress_ifindex, 0) } as u32;
    if r == XDP_REDIRECT { r } else { XDP_DROP }
}

/// A fragment: balanced as the other packets of its flow. The first fragment is looked up
/// (or starts the flow) by its ports and leaves them for the later ones, which only follow an
/// existing flow. See [`xdp_nat`] for where a fragment goes.
#[inline(always)]
fn xdp_fragment(ctx: &XdpContext, pkt: &mut Pkt) -> Result<u32, u32> {
    lb::frag_ports(pkt)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let origin = || xdp_origin(ctx);
    let r = if pkt.proto == proto::TCP {
        lb::lb4_ingress_fragment::<Tcp>(pkt, bytes, origin)
    } else {
        lb::lb4_ingress_fragment::<Udp>(pkt, bytes, origin)
    };
    let (ct, why) = match r {
        Ok(d) => d,
        Err(why) => return Err(lb::frag_passed(pkt, why)),
    };
    lb::frag_balanced(pkt);
    count(why);
    // Toward a task, fragments go to the kernel (see xdp_nat); a reply's leave as replies do.
    let to_kernel = ct.ifindex == 0 || ct.flags & ct_flags::FORWARD != 0;
    xdp_nat(ctx, pkt, &ct, to_kernel)
}

#[inline(always)]
fn xdp_origin(ctx: &XdpContext) -> Option<Origin> {
    Origin::of_frame(ctx.ingress_ifindex() as u32, ctx.data(), ctx.data_end())
}

/// Rewrite addresses and ports to `ct`'s tuple with exact incremental checksums, then
/// redirect to `ct.ifindex` (with its MACs) or hand the packet to the kernel.
///
/// A later fragment has no L4 header: only its addresses change (the first fragment's L4
/// checksum covers the whole datagram, and its update covers the new addresses).
///
/// `to_kernel`: hand the rewritten packet to the kernel instead of redirecting it: no device
/// to redirect to (a task on another node), or a packet that may need fragmenting on its way
/// (a fragment, or a datagram without DF larger than the task's link), which the kernel
/// forwards and fragments again where the link is smaller (a redirect would drop it).
#[inline(always)]
pub fn xdp_nat(ctx: &XdpContext, pkt: &Pkt, ct: &CtEntry, to_kernel: bool) -> Result<u32, u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(data, end, ETH_LEN)?;
    let k = &pkt.key;
    // SAFETY: every pointer below was bounds-checked by ptr_at; fields are byte arrays.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        if pkt.new_id != pkt.ip_id {
            // A fragment leaves with its datagram's fresh IP id (see lb::frag_balanced).
            ipc = csum::replace2(ipc, pkt.ip_id, pkt.new_id);
            (*ip).id = pkt.new_id.to_ne_bytes();
        }
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
