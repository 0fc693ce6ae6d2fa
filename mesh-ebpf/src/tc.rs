//! TC (tcx) programs. They run on the skb, so they use the kernel's checksum helpers, which
//! also handle CHECKSUM_PARTIAL packets (everything a local TCP stack sends through a veth):
//! an address change updates the pseudo-header part, a port change is left to the offload.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use mesh_common::{CtEntry, proto, reason};

use crate::{
    lb::{self, Origin},
    maps::count,
    parse::{
        ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Pkt, ipv4_daddr,
        parse_ipv4, ptr_at,
    },
};
use network_types::eth::EthHdr;

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
    let _ = ctx.pull_data(if len < want { len } else { want });
    parse_ipv4(ctx.data(), ctx.data_end(), len as usize)
}

/// Published ports arriving from outside the node, from TC ingress of the external interface.
#[inline(always)]
pub fn tc_ingress(ctx: &TcContext) -> Result<i32, u32> {
    let pkt = pull(ctx)?;
    let bytes = ctx.len() as u64;
    let (ct, why) = lb::lb4_ingress(&pkt.key, pkt.closing, bytes, || tc_origin(ctx))?;
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
    let why = match pull(ctx) {
        Ok(pkt) => match lb::lb4_from_task(&pkt.key, pkt.closing, ctx.len() as u64) {
            Ok((ct, why)) => {
                count(why);
                return tc_nat(ctx, &pkt, &ct, Deliver::Egress);
            }
            Err(why) => why,
        },
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

#[inline(always)]
fn tc_replace_addr(ctx: &TcContext, pkt: &Pkt, off: usize, from: u32, to: u32) -> Result<(), u32> {
    let mangled = if pkt.key.proto == proto::UDP { BPF_F_MARK_MANGLED_0 } else { 0 };
    ctx.l4_csum_replace(pkt.l4_csum_off(), from as u64, to as u64, BPF_F_PSEUDO_HDR | 4 | mangled)
        .map_err(|_| reason::DROP_REWRITE)?;
    ctx.l3_csum_replace(ETH_LEN + IP_CSUM_OFF, from as u64, to as u64, 4)
        .map_err(|_| reason::DROP_REWRITE)?;
    ctx.store(ETH_LEN + off, &to, 0).map_err(|_| reason::DROP_REWRITE)
}

#[inline(always)]
fn tc_replace_port(ctx: &TcContext, pkt: &Pkt, off: usize, from: u16, to: u16) -> Result<(), u32> {
    let mangled = if pkt.key.proto == proto::UDP { BPF_F_MARK_MANGLED_0 } else { 0 };
    ctx.l4_csum_replace(pkt.l4_csum_off(), from as u64, to as u64, 2 | mangled)
        .map_err(|_| reason::DROP_REWRITE)?;
    ctx.store(pkt.l4_off + off, &to, 0).map_err(|_| reason::DROP_REWRITE)
}

#[inline(always)]
fn tc_rewrite_tuple(ctx: &TcContext, pkt: &Pkt, ct: &CtEntry) -> Result<(), u32> {
    let k = &pkt.key;
    if k.saddr != ct.saddr {
        tc_replace_addr(ctx, pkt, IP_SRC_OFF, k.saddr, ct.saddr)?;
    }
    if k.daddr != ct.daddr {
        tc_replace_addr(ctx, pkt, IP_DST_OFF, k.daddr, ct.daddr)?;
    }
    if k.sport != ct.sport {
        tc_replace_port(ctx, pkt, L4_SPORT_OFF, k.sport, ct.sport)?;
    }
    if k.dport != ct.dport {
        tc_replace_port(ctx, pkt, L4_DPORT_OFF, k.dport, ct.dport)?;
    }
    Ok(())
}

/// A rewritten packet for a backend this node reaches by routing (a remote task over an
/// overlay, or through Docker's): send it out of the route's interface at once. Handing it
/// back to the input path instead would make the kernel drop a SNATed packet (its source is
/// now a local address: a martian) unless `accept_local` is set, which a containerised agent
/// cannot do. Falls back to the stack when the FIB has no answer.
#[inline(always)]
fn tc_route_out(ctx: &TcContext, ct: &CtEntry, proto: u8) -> i32 {
    const AF_INET: u8 = 2;
    // SAFETY: an all-zero bpf_fib_lookup is a valid input; fields are set below.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.sport = ct.sport;
    p.dport = ct.dport;
    // SAFETY: a field of the context the kernel gave us; union fields written as documented.
    unsafe {
        p.ifindex = (*ctx.skb.skb).ifindex;
        p.__bindgen_anon_3.ipv4_src = ct.saddr;
        p.__bindgen_anon_4.ipv4_dst = ct.daddr;
    }
    // SAFETY: helper call with a valid, correctly sized parameter block.
    let rc = unsafe {
        fib_lookup(ctx.as_ptr(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(reason::REDIRECT);
        // SAFETY: helper call; NULL params: the kernel resolves the next hop's neighbour.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(reason::PASS_REWRITTEN);
    TC_ACT_OK
}

/// Rewrite to `ct`'s tuple with the kernel's checksum helpers and deliver.
#[inline(always)]
pub fn tc_nat(ctx: &TcContext, pkt: &Pkt, ct: &CtEntry, how: Deliver) -> Result<i32, u32> {
    if let Err(e) = tc_rewrite_tuple(ctx, pkt, ct) {
        // Half-rewritten: never let it through.
        count(e);
        return Ok(TC_ACT_SHOT);
    }
    if ct.ifindex == 0 {
        return Ok(tc_route_out(ctx, ct, pkt.key.proto));
    }
    if ctx.store(0, &ct.dmac, 0).is_err() || ctx.store(6, &ct.smac, 0).is_err() {
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
