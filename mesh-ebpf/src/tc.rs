//! TC (tcx) programs. They run on the skb, so they use the kernel's checksum helpers, which
//! also handle CHECKSUM_PARTIAL packets (everything a local TCP stack sends through a veth):
//! an address change updates the pseudo-header part, a port change is left to the offload.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_fib_lookup,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use mesh_common::{
    CtEntry, csum, ct_flags,
    icmp::{self, FRAME, HDRS, QUOTE},
    proto, reason,
};

use crate::{
    lb::{self, Origin, Tcp, Udp},
    maps::count,
    parse::{
        ETH_LEN, FRAG_LATER, FRAG_NONE, IP_CSUM_OFF, L4_SPORT_OFF, Pkt, ipv4_daddr, parse_ipv4,
        ptr_at,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// How a rewritten packet leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// `bpf_redirect` to the target's egress.
    Egress,
    /// `bpf_redirect_peer`: straight into the network namespace behind a veth (ingress hooks
    /// only), skipping the host's stack and the bridge.
    Peer,
}

#[inline(always)]
fn pull(ctx: &TcContext) -> Result<Pkt, u32> {
    // Make the headers (Ethernet, IPv4 without options, TCP) linear for direct access; the
    // payload may stay in fragments. A no-op when they already are.
    let len = ctx.len();
    let want = (ETH_LEN + 20 + 20) as u32;
    if ctx.data() + (want as usize) > ctx.data_end() {
        let _ = ctx.pull_data(if len < want { len } else { want });
    }
    parse_ipv4(ctx.data(), ctx.data_end(), len as usize)
}

/// Published ports arriving from outside the node, from TC ingress of the external interface.
#[inline(always)]
pub fn tc_ingress(ctx: &TcContext) -> Result<i32, u32> {
    let mut pkt = pull(ctx)?;
    let bytes = ctx.len() as u64;
    let origin = || tc_origin(ctx);
    let (ct, why) = if pkt.frag != FRAG_NONE {
        // A fragment: the first is balanced by its ports and leaves them for the later ones,
        // which only follow an existing flow (see tc_nat for where fragments go).
        lb::frag_ports(&mut pkt)?;
        lb::frag_done(
            &pkt,
            if pkt.proto == proto::TCP {
                lb::lb4_ingress_fragment::<Tcp>(&pkt, bytes, origin)
            } else {
                lb::lb4_ingress_fragment::<Udp>(&pkt, bytes, origin)
            },
        )
    } else if pkt.proto == proto::TCP {
        lb::lb4_ingress::<Tcp>(&pkt.key, pkt.tcp, bytes, origin)
    } else {
        lb::lb4_ingress::<Udp>(&pkt.key, pkt.tcp, bytes, origin)
    }?;
    count(why);
    let how = if why == reason::REPLY {
        Deliver::Egress
    } else {
        Deliver::Peer
    };
    tc_nat(ctx, &pkt, &ct, how)
}

/// Packets a task sends (TC ingress of its host-side veth): replies of balanced flows are
/// rewritten back to the frontend and sent out of the interface the flow came in on.
#[inline(always)]
pub fn tc_from_task(ctx: &TcContext) -> Result<i32, u32> {
    let why = match pull(ctx).and_then(|mut pkt| {
        // A fragmented reply (the task's stack fragments what exceeds its MTU): the first
        // fragment by its ports, the later ones by the ports the first left.
        lb::frag_ports(&mut pkt)?;
        let bytes = ctx.len() as u64;
        let r = lb::frag_done(
            &pkt,
            if pkt.proto == proto::TCP {
                lb::lb4_tracked::<Tcp>(&pkt.key, pkt.tcp, bytes)
            } else {
                lb::lb4_tracked::<Udp>(&pkt.key, pkt.tcp, bytes)
            },
        )?;
        Ok((pkt, r))
    }) {
        Ok((pkt, (ct, why))) => {
            count(why);
            return tc_nat(ctx, &pkt, &ct, Deliver::Egress);
        }
        Err(why) => why,
    };
    // Not a flow this node balanced: isolation applies to every IPv4 packet (ICMP and
    // fragments too), not only to TCP/UDP.
    if let Some(daddr) = ipv4_daddr(ctx.data(), ctx.data_end()) {
        // SAFETY: reading a field of the context the kernel gave us.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if lb::net4_crosses_networks(ifindex, daddr) {
            count(reason::DROP_OTHER_NETWORK);
            return Ok(TC_ACT_SHOT);
        }
    }
    Err(why)
}

#[inline(always)]
fn tc_origin(ctx: &TcContext) -> Origin {
    let mut o = Origin {
        // SAFETY: reading a field of the context the kernel gave us.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
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

/// Rewrite the 5-tuple to `ct`'s in at most four helper calls (the old one-field-at-a-time
/// rewrite took up to eight):
/// - addresses: the IPv4 header checksum is never offloaded, so it is fixed here and written
///   with both addresses in one 10-byte store; the L4 checksum gets the addresses' difference
///   in one `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` (the kernel applies it as the skb's
///   checksum state requires: a CHECKSUM_PARTIAL packet holds only the pseudo-header sum);
/// - ports: their difference in one `bpf_l4_csum_replace` without the pseudo-header flag (a
///   no-op on CHECKSUM_PARTIAL, whose offload sums the new ports), then one 4-byte store.
#[inline(always)]
fn tc_rewrite_tuple(ctx: &TcContext, pkt: &Pkt, ct: &CtEntry) -> Result<(), u32> {
    let k = &pkt.key;
    let mangled = if pkt.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();
    // A later fragment has no L4 header: its addresses only (the first fragment's L4
    // checksum covers the whole datagram, and its update covers the new addresses).
    let l4 = pkt.frag != FRAG_LATER;
    if k.saddr != ct.saddr || k.daddr != ct.daddr {
        let ip: *const Ipv4Hdr = ptr_at(ctx.data(), ctx.data_end(), ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let check = u16::from_ne_bytes(unsafe { (*ip).check });
        let diff = csum::add_diff(
            csum::diff4(k.saddr, ct.saddr),
            csum::diff4(k.daddr, ct.daddr),
        );
        let mut hdr = [0u8; 10];
        hdr[0..2].copy_from_slice(&csum::apply_diff(check, diff).to_ne_bytes());
        hdr[2..6].copy_from_slice(&ct.saddr.to_ne_bytes());
        hdr[6..10].copy_from_slice(&ct.daddr.to_ne_bytes());
        if l4 {
            ctx.l4_csum_replace(csum_off, 0, diff as u64, BPF_F_PSEUDO_HDR | mangled)
                .map_err(|_| reason::DROP_REWRITE)?;
        }
        ctx.store(ETH_LEN + IP_CSUM_OFF, &hdr, 0)
            .map_err(|_| reason::DROP_REWRITE)?;
    }
    if l4 && (k.sport != ct.sport || k.dport != ct.dport) {
        let from = ports_word(k.sport, k.dport);
        let to = ports_word(ct.sport, ct.dport);
        ctx.l4_csum_replace(csum_off, 0, csum::diff4(from, to) as u64, mangled)
            .map_err(|_| reason::DROP_REWRITE)?;
        ctx.store(pkt.l4_off + L4_SPORT_OFF, &to, 0)
            .map_err(|_| reason::DROP_REWRITE)?;
    }
    Ok(())
}

/// Source and destination port (network order) as the 4 bytes they occupy in the L4 header,
/// loaded natively.
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// The route to a backend this node reaches by routing (a remote task over an overlay, or
/// through Docker's): the FIB's answer for `ct`'s rewritten tuple, looked up before the
/// packet is rewritten, so that a datagram too big for the route can still be answered as
/// the client sent it. The kernel checks the skb against the route's MTU (GSO packets
/// excepted): `BPF_FIB_LKUP_RET_FRAG_NEEDED`, with the MTU in `mtu_result`.
#[inline(always)]
fn tc_route(ctx: &TcContext, ct: &CtEntry, proto: u8) -> (i64, bpf_fib_lookup) {
    // SAFETY: a field of the context the kernel gave us.
    let mut p = lb::fib_params4(ct, proto, unsafe { (*ctx.skb.skb).ifindex }, 0);
    // SAFETY: helper call with a valid, correctly sized parameter block.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (rc, p)
}

/// Send a rewritten packet out of the route [`tc_route`] found, at once. Handing it back to
/// the input path instead would make the kernel drop a SNATed packet (its source is now a
/// local address: a martian) unless `accept_local` is set, which a containerised agent cannot
/// do. Falls back to the stack when the FIB has no answer, and for a packet too big for the
/// route (without DF: the kernel fragments it). (A route to a task on another node leads to
/// the overlay's bridge; the frame is addressed to the task's MAC, which the bridge's static
/// FDB entry sends over VXLAN.)
#[inline(always)]
fn tc_route_out(ctx: &TcContext, rc: i64, p: &bpf_fib_lookup) -> i32 {
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // The lookup resolved the next hop's MAC too: address the frame and send it out of
        // the route's device (bpf_redirect_neigh would look the route and neighbour up again).
        let mut macs = [0u8; 12];
        macs[0..6].copy_from_slice(&p.dmac);
        macs[6..12].copy_from_slice(&p.smac);
        if ctx.store(0, &macs, 0).is_err() {
            count(reason::DROP_REWRITE);
            return TC_ACT_SHOT;
        }
        count(reason::REDIRECT);
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(reason::REDIRECT);
        // SAFETY: helper call; NULL params: the kernel resolves the next hop's neighbour.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(reason::PASS_REWRITTEN);
    TC_ACT_OK
}

/// Answer the packet with ICMP "fragmentation needed" (see [`mesh_common::icmp`]): cut it
/// after the quoted headers, open room for the error's after the Ethernet header, fill them
/// in and send the frame back out of the interface it came in on. A function of its own: its
/// stack is not the hot path's.
#[inline(never)]
fn tc_frag_needed(skb: *mut __sk_buff, mtu: u16) -> i32 {
    let mut f = [0u8; FRAME];
    // SAFETY: helper calls on the program's own context, into and out of `f` (FRAME bytes).
    // Plain loads and stores: a direct packet write anywhere in the program would make the
    // verifier un-clone every packet it sees.
    let ok = unsafe {
        bpf_skb_change_tail(skb, (ETH_LEN + QUOTE) as u32, 0) == 0
            && bpf_skb_adjust_room(skb, HDRS as i32, BPF_ADJ_ROOM_MAC, 0) == 0
            && bpf_skb_load_bytes(skb as *const _, 0, f.as_mut_ptr() as *mut _, FRAME as u32) == 0
    };
    if !ok {
        count(reason::DROP_REWRITE);
        return TC_ACT_SHOT;
    }
    let mut i = 0;
    while i < 6 {
        f.swap(i, 6 + i); // to the client's MAC, from the node's
        i += 1;
    }
    icmp::fill_frag_needed(&mut f, mtu);
    // SAFETY: as above.
    if unsafe { bpf_skb_store_bytes(skb, 0, f.as_ptr() as *const _, FRAME as u32, 0) } != 0 {
        count(reason::DROP_REWRITE);
        return TC_ACT_SHOT;
    }
    count(reason::DROP_TOO_BIG);
    // SAFETY: a field of the context the kernel gave us; plain helper call.
    unsafe { bpf_redirect((*skb).ifindex, 0) as i32 }
}

/// Rewrite to `ct`'s tuple with the kernel's checksum helpers and deliver. A fragment toward
/// a task goes to the kernel, which forwards it and fragments it again if the task's link has
/// a smaller MTU (a redirect would drop an skb that does not fit); a reply's fragments leave
/// as whole replies do.
#[inline(always)]
pub fn tc_nat(ctx: &TcContext, pkt: &Pkt, ct: &CtEntry, how: Deliver) -> Result<i32, u32> {
    // A task this node reaches by routing: the route first. A datagram with DF too big for
    // it is answered with its MTU, as the client sent it (the kernel would tell the
    // rewritten source, this node). A task's own link is not checked: redirect_peer
    // delivers into its namespace whatever the link's MTU.
    let route = if ct.ifindex == 0 {
        Some(tc_route(ctx, ct, pkt.proto))
    } else {
        None
    };
    if let Some((rc, p)) = &route {
        if *rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 && pkt.df && ct.flags & ct_flags::FORWARD != 0
        {
            // SAFETY: the kernel wrote mtu_result with this return code.
            return Ok(tc_frag_needed(ctx.skb.skb, unsafe {
                p.__bindgen_anon_1.mtu_result
            }));
        }
    }
    if let Err(e) = tc_rewrite_tuple(ctx, pkt, ct) {
        // Half-rewritten: never let it through.
        count(e);
        return Ok(TC_ACT_SHOT);
    }
    // A routed task: out of the route (fragments too, when they fit it: the kernel's input
    // path would take a SNATed one for a martian unless accept_local is set; one too big for
    // the route goes to the kernel, which fragments it again).
    if let Some((rc, p)) = &route {
        return Ok(tc_route_out(ctx, *rc, p));
    }
    // A fragment toward a task of this node: to the kernel, which fragments it again for the
    // task's link (redirect_peer would hand the task's stack a frame over its MTU).
    if pkt.frag != FRAG_NONE && ct.flags & ct_flags::FORWARD != 0 {
        count(reason::PASS_REWRITTEN);
        return Ok(TC_ACT_OK);
    }
    let mut macs = [0u8; 12];
    macs[0..6].copy_from_slice(&ct.dmac);
    macs[6..12].copy_from_slice(&ct.smac);
    if ctx.store(0, &macs, 0).is_err() {
        count(reason::DROP_REWRITE);
        return Ok(TC_ACT_SHOT);
    }
    count(reason::REDIRECT);
    // SAFETY: plain helper calls.
    let r = unsafe {
        match how {
            Deliver::Egress => bpf_redirect(ct.ifindex, 0),
            Deliver::Peer => bpf_redirect_peer(ct.ifindex, 0),
        }
    };
    Ok(r as i32)
}
