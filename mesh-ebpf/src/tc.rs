//! TC (tcx) programs. They run on the skb, so they use the kernel's checksum helpers, which
//! also handle CHECKSUM_PARTIAL packets (everything a local TCP stack sends through a veth):
//! an address change updates the pseudo-header part, a port change is left to the offload.

use core::mem::MaybeUninit;

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
        ETH_LEN, FRAG_LATER, FRAG_NONE, IP_CSUM_OFF, L4_OFF, Pkt, ipv4_daddr, parse_ipv4, ptr_at,
    },
};

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
        let r = if pkt.proto == proto::TCP {
            lb::lb4_ingress_fragment::<Tcp>(&pkt, bytes, origin)
        } else {
            lb::lb4_ingress_fragment::<Udp>(&pkt, bytes, origin)
        };
        match r {
            Ok(d) => {
                lb::frag_balanced(&mut pkt);
                Ok(d)
            }
            Err(why) => return Err(lb::frag_passed(&pkt, why)),
        }
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
    Ok(tc_nat(ctx, &pkt, &ct, how))
}

/// Packets a task sends (TC ingress of its host-side veth): replies of balanced flows are
/// rewritten back to the frontend and sent out of the interface the flow came in on.
#[inline(always)]
pub fn tc_from_task(ctx: &TcContext) -> Result<i32, u32> {
    let why = match tc_task_reply(ctx) {
        Ok(verdict) => return Ok(verdict),
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

/// A reply (or a later fragment of one) of a flow this node balanced, rewritten and sent:
/// the verdict; `Err(reason)` for anything else. Each step returns early, so no half-built
/// result travels between them (LLVM stored one's undefined part, which the verifier
/// refuses to read).
#[inline(always)]
fn tc_task_reply(ctx: &TcContext) -> Result<i32, u32> {
    let mut pkt = pull(ctx)?;
    // A fragmented reply (the task's stack fragments what exceeds its MTU): the first
    // fragment by its ports, the later ones by the ports the first left.
    lb::frag_ports(&mut pkt)?;
    let bytes = ctx.len() as u64;
    let tracked = if pkt.proto == proto::TCP {
        lb::lb4_tracked::<Tcp>(&pkt.key, pkt.tcp, bytes)
    } else {
        lb::lb4_tracked::<Udp>(&pkt.key, pkt.tcp, bytes)
    };
    let (ct, why) = match tracked {
        Ok(d) => d,
        Err(why) => return Err(lb::frag_passed(&pkt, why)),
    };
    lb::frag_balanced(&mut pkt);
    count(why);
    Ok(tc_nat(ctx, &pkt, &ct, Deliver::Egress))
}

#[inline(always)]
fn tc_origin(ctx: &TcContext) -> Option<Origin> {
    // SAFETY: reading a field of the context the kernel gave us.
    Origin::of_frame(
        unsafe { (*ctx.skb.skb).ifindex },
        ctx.data(),
        ctx.data_end(),
    )
}

/// The frame from its start to the end of the L4 ports, in 16-bit words: Ethernet (7),
/// the IPv4 header without options (10: they are passed), the ports (2).
const IMG_WORDS: usize = 19;
/// The words up to the end of the IPv4 header (what a later fragment has).
const IMG_L3_WORDS: usize = L4_OFF / 2;
/// The first word of the IPv4 header checksum.
const IMG_CHECK: usize = (ETH_LEN + IP_CSUM_OFF) / 2;

/// Two bytes as the 16-bit word they make in memory.
#[inline(always)]
fn w(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}

/// A 32-bit field as its two words in memory.
#[inline(always)]
fn w2(v: u32) -> (u16, u16) {
    (v as u16, (v >> 16) as u16)
}

/// Rewrite the 5-tuple to `ct`'s (and the MACs to `macs`, destination then source, when
/// given) in at most three helper calls, without writing to the packet directly (a direct
/// write anywhere in the program makes the verifier un-clone every packet it sees):
/// - one `bpf_skb_store_bytes` of the frame's start as it must become (MACs, a fragment's
///   IP id, addresses, the IPv4 checksum, which is never offloaded, ports), built on the
///   stack from the words the frame has and the ones that change;
/// - the L4 checksum gets the addresses' difference in one `bpf_l4_csum_replace` with
///   `BPF_F_PSEUDO_HDR` (the kernel applies it as the skb's checksum state requires: a
///   CHECKSUM_PARTIAL packet holds only the pseudo-header sum, a CHECKSUM_COMPLETE one has
///   its sum fixed too), and the ports' difference in one without the flag (a no-op on
///   CHECKSUM_PARTIAL, whose offload sums the new ports).
///
/// The image is built word by word from scalars, never zeroed or copied as an array: the
/// BPF backend turns `memset`/`memmove` into calls of byte-at-a-time loops.
///
/// A later fragment has no L4 header: only its MACs and addresses are written (the first
/// fragment's L4 checksum covers the whole datagram, and its update covers the new
/// addresses).
#[inline(always)]
fn tc_rewrite_tuple(
    ctx: &TcContext,
    pkt: &Pkt,
    ct: &CtEntry,
    macs: Option<&[u8; 12]>,
) -> Result<(), u32> {
    let k = &pkt.key;
    let l4 = pkt.frag != FRAG_LATER;
    // The frame's own words up to the IPv4 checksum.
    let h: *const [u16; IMG_CHECK + 1] =
        ptr_at(ctx.data(), ctx.data_end(), 0).map_err(|_| reason::DROP_REWRITE)?;
    // SAFETY: bounds checked by ptr_at; read word by word.
    let o = |i: usize| unsafe { (*h)[i] };
    let (m0, m1, m2, m3, m4, m5) = match macs {
        Some(m) => (
            w(m[0], m[1]),
            w(m[2], m[3]),
            w(m[4], m[5]),
            w(m[6], m[7]),
            w(m[8], m[9]),
            w(m[10], m[11]),
        ),
        None => (o(0), o(1), o(2), o(3), o(4), o(5)),
    };
    let check = o(IMG_CHECK);
    let addr_diff = csum::add_diff(
        csum::diff4(k.saddr, ct.saddr),
        csum::diff4(k.daddr, ct.daddr),
    );
    // A fragment leaves with its datagram's fresh IP id (see lb::frag_balanced); the id is
    // covered by the IPv4 header's checksum only.
    let ip_diff = csum::add_diff(addr_diff, csum::diff4(pkt.ip_id as u32, pkt.new_id as u32));
    let (s0, s1) = w2(ct.saddr);
    let (d0, d1) = w2(ct.daddr);
    let img: [u16; IMG_WORDS] = [
        m0,
        m1,
        m2,
        m3,
        m4,
        m5,
        o(6),
        o(7),
        o(8),
        pkt.new_id,
        o(10),
        o(11),
        csum::apply_diff(check, ip_diff),
        s0,
        s1,
        d0,
        d1,
        ct.sport,
        ct.dport,
    ];
    let skb = ctx.skb.skb;
    let src = img.as_ptr() as *const core::ffi::c_void;
    // SAFETY: helper calls on the program's own context, reading `img` in bounds.
    let rc = unsafe {
        if l4 {
            bpf_skb_store_bytes(skb, 0, src, (IMG_WORDS * 2) as u32, 0)
        } else {
            bpf_skb_store_bytes(skb, 0, src, (IMG_L3_WORDS * 2) as u32, 0)
        }
    };
    if rc != 0 {
        return Err(reason::DROP_REWRITE);
    }
    if !l4 {
        return Ok(());
    }
    let mangled = if pkt.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();
    if k.saddr != ct.saddr || k.daddr != ct.daddr {
        ctx.l4_csum_replace(csum_off, 0, addr_diff as u64, BPF_F_PSEUDO_HDR | mangled)
            .map_err(|_| reason::DROP_REWRITE)?;
    }
    let from = ports_word(k.sport, k.dport);
    let to = ports_word(ct.sport, ct.dport);
    if from != to {
        ctx.l4_csum_replace(csum_off, 0, csum::diff4(from, to) as u64, mangled)
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
/// the client sent it: `BPF_FIB_LKUP_RET_FRAG_NEEDED`, with the route's MTU in `mtu_result`.
/// The lookup gets the packet's IP length, which the kernel checks against the route's MTU
/// exactly and before it looks for the next hop's neighbour. A GSO packet (a local sender's
/// TCP segments) is left to the kernel's own check (length 0: the segments it will become
/// are checked), which allows 4 bytes more and only runs once the neighbour is known.
#[inline(always)]
fn tc_route(ctx: &TcContext, ct: &CtEntry, proto: u8) -> Route {
    let mut fib = MaybeUninit::uninit();
    // SAFETY: fields of the context the kernel gave us.
    let (ifindex, gso) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    let tot_len = if gso == 0 {
        ctx.len().saturating_sub(ETH_LEN as u32) as u16
    } else {
        0
    };
    let p = lb::fib_params4(&mut fib, ct, proto, ifindex, tot_len);
    // SAFETY: helper call with a valid, correctly sized parameter block.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // Copied out as values: a reference into the parameter block, kept across the rewrite,
    // came out of LLVM as a pointer the verifier could not follow.
    Route {
        rc,
        ifindex: p.ifindex,
        // SAFETY: a u16 either way (tot_len in, mtu_result out).
        mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        macs: macs(&p.dmac, &p.smac),
    }
}

/// What [`tc_route`] found.
#[derive(Clone, Copy)]
struct Route {
    /// `bpf_fib_lookup`'s return code.
    rc: i64,
    /// The route's device.
    ifindex: u32,
    /// The route's MTU, with `BPF_FIB_LKUP_RET_FRAG_NEEDED`.
    mtu: u16,
    /// The next hop's MAC then the device's, with `BPF_FIB_LKUP_RET_SUCCESS`.
    macs: [u8; 12],
}

/// Send a rewritten packet out of the route [`tc_route`] found, at once. Handing it back to
/// the input path instead would make the kernel drop a SNATed packet (its source is now a
/// local address: a martian) unless `accept_local` is set, which a containerised agent cannot
/// do. Falls back to the stack when the FIB has no answer, and for a packet too big for the
/// route (without DF: the kernel fragments it). (A route to a task on another node leads to
/// the overlay's bridge; the frame is addressed to the task's MAC, which the bridge's static
/// FDB entry sends over VXLAN.) On success the rewrite has already addressed the frame to
/// the next hop the lookup resolved ([`Route::macs`]).
#[inline(always)]
fn tc_route_out(r: &Route) -> i32 {
    if r.rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // Out of the route's device (bpf_redirect_neigh would look the route and neighbour
        // up again).
        count(reason::REDIRECT);
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(r.ifindex, 0) } as i32;
    }
    if r.rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(reason::REDIRECT);
        // SAFETY: helper call; NULL params: the kernel resolves the next hop's neighbour.
        return unsafe { bpf_redirect_neigh(r.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(reason::PASS_REWRITTEN);
    TC_ACT_OK
}

/// Destination then source MAC, as a frame's first 12 bytes.
#[inline(always)]
fn macs(d: &[u8; 6], s: &[u8; 6]) -> [u8; 12] {
    // A literal: no zeroed array for the BPF backend to memset.
    [
        d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
    ]
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
pub fn tc_nat(ctx: &TcContext, pkt: &Pkt, ct: &CtEntry, how: Deliver) -> i32 {
    // A task this node reaches by routing: the route first. A datagram with DF too big for
    // it is answered with its MTU, as the client sent it (the kernel would tell the
    // rewritten source, this node). A task's own link is not checked: redirect_peer
    // delivers into its namespace whatever the link's MTU.
    let route = if ct.ifindex == 0 {
        Some(tc_route(ctx, ct, pkt.proto))
    } else {
        None
    };
    if let Some(r) = &route
        && r.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64
        && pkt.df
        && ct.flags & ct_flags::FORWARD != 0
    {
        return tc_frag_needed(ctx.skb.skb, r.mtu);
    }
    // The frame's new MACs: the route's next hop, or the task's (or client's) own when it
    // is redirected; none when it goes to the kernel.
    let to_kernel = pkt.frag != FRAG_NONE && ct.flags & ct_flags::FORWARD != 0;
    let m = match &route {
        Some(r) => (r.rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some(r.macs),
        None if to_kernel => None,
        None => Some(macs(&ct.dmac, &ct.smac)),
    };
    if let Err(e) = tc_rewrite_tuple(ctx, pkt, ct, m.as_ref()) {
        // Half-rewritten: never let it through.
        count(e);
        return TC_ACT_SHOT;
    }
    // A routed task: out of the route (fragments too, when they fit it: the kernel's input
    // path would take a SNATed one for a martian unless accept_local is set; one too big for
    // the route goes to the kernel, which fragments it again).
    if let Some(r) = &route {
        return tc_route_out(r);
    }
    // A fragment toward a task of this node: to the kernel, which fragments it again for the
    // task's link (redirect_peer would hand the task's stack a frame over its MTU).
    if to_kernel {
        count(reason::PASS_REWRITTEN);
        return TC_ACT_OK;
    }
    count(reason::REDIRECT);
    // SAFETY: plain helper calls.
    let r = unsafe {
        match how {
            Deliver::Egress => bpf_redirect(ct.ifindex, 0),
            Deliver::Peer => bpf_redirect_peer(ct.ifindex, 0),
        }
    };
    r as i32
}
