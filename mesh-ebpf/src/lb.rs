//! Load-balancing core shared by every hook: frontend lookup, round-robin backend choice,
//! connection tracking and per-service/per-backend counters. It decides *what* a packet
//! becomes (a [`CtEntry`]); the XDP and TC modules decide *how* to rewrite and deliver it.

use mesh_common::{
    Backend, CtEntry, CtKey, FragEntry, FragKey, Frontend, FrontendKey, SlotKey, TrafficStats,
    be_flags, ct_flags, fe_flags, reason,
};

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{LruHashMap, lpm_trie::Key as LpmKey},
};

use crate::maps::{
    BACKENDS, BE_STATS, CONFIG, CT_TCP, CT_UDP, FRAG_IDS, FRAGS, FRONTENDS, IFACE_NET, NODE_ADDRS,
    PORTS, RR, SLOTS, SNAT_NEXT, SUBNETS, SVC_STATS, count,
};
use crate::parse::{CLOSE_FIN, CLOSE_RST, FRAG_FIRST, FRAG_LATER, FRAG_NONE, OPEN_SYN, Pkt};

/// How many SNAT ports a new flow tries before giving up.
const SNAT_TRIES: u32 = 8;

/// Is `port` (network order) used by any frontend? One array access: the fast exit for
/// traffic that is none of mesh's business.
#[inline(always)]
pub fn lb4_port_wanted(port: u16) -> bool {
    let p = u16::from_be(port) as u32;
    match PORTS.get(p >> 5) {
        Some(w) => *w & (1 << (p & 31)) != 0,
        None => false,
    }
}

/// Is `addr` one of the node's addresses?
#[inline(always)]
pub fn lb4_is_node_addr(addr: u32) -> bool {
    NODE_ADDRS.get_ptr(addr).is_some()
}

/// The frontend a packet addresses: a published port of this very address (a frontend bound
/// to one address, like Docker's ingress sandbox), else one on any of the node's addresses.
#[inline(always)]
pub fn lb4_lookup_published(proto: u8, key: &CtKey) -> Option<Frontend> {
    if let Some(fe) = lb4_lookup_frontend(key.daddr, key.dport, proto) {
        if fe.flags & fe_flags::PUBLISHED != 0 {
            return Some(fe);
        }
    }
    if !lb4_is_node_addr(key.daddr) {
        return None;
    }
    lb4_lookup_frontend(0, key.dport, proto)
}

#[inline(always)]
pub fn lb4_lookup_frontend(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let fk = FrontendKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces values whole.
    FRONTENDS.get_ptr(fk).map(|p| unsafe { *p })
}

/// Round-robin: the frontend's shared cursor advances by one per new flow (atomically, so
/// every CPU and every hook share one sequence), and picks slot `cursor % count + 1`.
#[inline(always)]
pub fn lb4_select_backend(fe: &Frontend) -> Option<(u32, Backend)> {
    let count = fe.count;
    if count == 0 {
        return None;
    }
    let cursor = RR.get_ptr_mut(fe.svc_id)?;
    let n = atomic_fetch_add_u64(cursor, 1);
    let slot = (n % count as u64) as u32 + 1;
    let id = *unsafe {
        SLOTS.get(SlotKey {
            svc_id: fe.svc_id,
            slot,
        })
    }?;
    let be = *BACKENDS.get(id)?;
    if be.flags & be_flags::ACTIVE == 0 {
        return None;
    }
    Some((id, be))
}

/// `*p += v` atomically, returning the old value (BPF_ATOMIC | BPF_FETCH, kernel ≥ 5.12).
/// The bpfel target has no CAS, so core's `fetch_add` is unavailable: say it in BPF asm.
#[inline(always)]
fn atomic_fetch_add_u64(p: *mut u64, v: u64) -> u64 {
    let mut v = v;
    // SAFETY: `p` is a live, 8-byte aligned map value for the program's lifetime.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) p,
            v = inout(reg) v,
        );
    }
    v
}

/// Is the backend a conntrack entry points at still the one it was created for?
#[inline(always)]
pub fn lb4_backend_alive(ct: &CtEntry) -> bool {
    match BACKENDS.get(ct.backend_id) {
        Some(be) => {
            be.flags & be_flags::ACTIVE != 0
                && be.addr == ct.daddr
                && (be.port == ct.dport || be.port == 0)
        }
        None => false,
    }
}

/// A conntrack table: one per L4 protocol, so the key is three words to hash. The load-balancing
/// functions are generic over it and the entry points pick the table once per packet: every
/// map operation then names its map statically, and the verifier inlines each lookup.
pub trait CtTable {
    /// The IP protocol number of the table's flows.
    const PROTO: u8;
    fn map() -> &'static LruHashMap<CtKey, CtEntry>;
}

/// TCP flows ([`CT_TCP`]).
pub struct Tcp;
/// UDP flows ([`CT_UDP`]).
pub struct Udp;

impl CtTable for Tcp {
    const PROTO: u8 = mesh_common::proto::TCP;
    #[inline(always)]
    fn map() -> &'static LruHashMap<CtKey, CtEntry> {
        &CT_TCP
    }
}

impl CtTable for Udp {
    const PROTO: u8 = mesh_common::proto::UDP;
    #[inline(always)]
    fn map() -> &'static LruHashMap<CtKey, CtEntry> {
        &CT_UDP
    }
}

/// The conntrack entry of `key`, copied out.
#[inline(always)]
pub fn ct_lookup4<C: CtTable>(key: &CtKey) -> Option<CtEntry> {
    // SAFETY: copied out at once.
    C::map().get_ptr(key).map(|p| unsafe { *p })
}

/// L2 addresses and ingress device of a new flow's first packet: where replies go back to.
#[derive(Clone, Copy)]
pub struct Origin {
    pub ifindex: u32,
    /// Source MAC of the first packet (the client or its router).
    pub src_mac: [u8; 6],
    /// Destination MAC of the first packet (the node's own interface).
    pub dst_mac: [u8; 6],
}

impl Origin {
    /// The device a frame came in on (`ifindex`) and its MACs; `None` for a frame too short
    /// for an Ethernet header (the parser lets none this far). No zeroed fallback: a zeroed
    /// array is a `memset` call, which the BPF backend makes a byte loop.
    #[inline(always)]
    pub fn of_frame(ifindex: u32, data: usize, data_end: usize) -> Option<Origin> {
        let eth = crate::parse::ptr_at::<network_types::eth::EthHdr>(data, data_end, 0).ok()?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            Some(Origin {
                ifindex,
                src_mac: (*eth).src_addr,
                dst_mac: (*eth).dst_addr,
            })
        }
    }
}

/// A SNAT source port (network order) for a flow to backend `be_id` at `be_addr:be_port`.
/// Each backend's ports are handed out in turn (its cursor in [`SNAT_NEXT`], an atomic add
/// per try): the port whose turn it is is the one this node used longest ago for that
/// backend, so it is either free (no reply entry: taken) or held by an old flow. An old flow
/// that has closed both ways ([`ct_flags::CLOSING`] on both entries) gives its port up: its
/// forward entry is removed and the reply entry is overwritten by the caller. A closing reply
/// entry whose client tuple now belongs to a newer flow (the client reopened it, see
/// [`lb4_ingress`]) is closed too; that newer flow's forward entry stays. A flow still open
/// keeps its port, and the next one is tried, up to [`SNAT_TRIES`].
///
/// A closed flow's reply entry is this node's memory of the task's TIME_WAIT for the port:
/// it is never removed early, and in turn order a port comes back only after every other
/// port of the range was handed out (the longest any policy can wait at a given rate), so
/// a free port is one no recent flow used. One lookup per try, two when the port is held:
/// a random start with linear probes needed up to twice [`SNAT_TRIES`] lookups once the
/// range was full of closed flows, and chose among those few.
#[inline(always)]
fn snat_port<C: CtTable>(
    snat_addr: u32,
    min: u16,
    max: u16,
    be_id: u32,
    be_addr: u32,
    be_port: u16,
) -> Result<u16, u32> {
    if max < min {
        return Err(reason::ERR_SNAT_PORTS);
    }
    let range = (max - min) as u64 + 1;
    let cursor = SNAT_NEXT.get_ptr_mut(be_id).ok_or(reason::ERR_SNAT_PORTS)?;
    for _ in 0..SNAT_TRIES {
        let p = (min as u64 + atomic_fetch_add_u64(cursor, 1) % range) as u16;
        let rk = CtKey {
            saddr: be_addr,
            daddr: snat_addr,
            sport: be_port,
            dport: p.to_be(),
        };
        let Some(rev) = ct_lookup4::<C>(&rk) else {
            return Ok(p.to_be());
        };
        if rev.flags & ct_flags::CLOSING == 0 {
            continue;
        }
        // The forward entry's key: the client tuple the reply entry restores. Is it still
        // this port's flow (does it lead back to this reply entry), and has it closed?
        let fk = rev.peer_key();
        let (closed, owned) = match ct_lookup4::<C>(&fk) {
            Some(fwd) => {
                let owned = fwd.peer_key() == rk;
                (!owned || fwd.flags & ct_flags::CLOSING != 0, owned)
            }
            None => (true, false),
        };
        if closed {
            if owned {
                let _ = C::map().remove(&fk);
            }
            count(reason::SNAT_RECLAIMED);
            return Ok(p.to_be());
        }
    }
    Err(reason::ERR_SNAT_PORTS)
}

/// A FIN or RST went `ct`'s way (`key` is its conntrack key): mark the entry closing once.
/// A RST ends the flow both ways (the peer will send no FIN), so it marks the entry of the
/// other direction too: its key is the rewritten tuple of this one, reversed, and it is
/// marked only if it still leads back to `key` (after a client reopened its tuple, the old
/// flow's reply entry points at the new flow's forward entry, which a RST of the old task
/// must not close).
#[inline(always)]
fn ct_mark_closing<C: CtTable>(key: &CtKey, ct: &CtEntry, closing: u8) {
    let first = ct.flags & ct_flags::CLOSING == 0;
    // Nothing to mark: no FIN/RST, or a FIN on an entry already closing.
    if (closing != CLOSE_FIN && closing != CLOSE_RST) || (!first && closing != CLOSE_RST) {
        return;
    }
    if first {
        ct_set_closing::<C>(key, None);
    }
    if closing == CLOSE_RST {
        ct_set_closing::<C>(&ct.peer_key(), Some(key));
    }
}

/// Mark `key`'s entry [`ct_flags::CLOSING`]. With `back_to`, only if the entry's rewritten
/// tuple, reversed, is that key.
#[inline(always)]
fn ct_set_closing<C: CtTable>(key: &CtKey, back_to: Option<&CtKey>) {
    if let Some(p) = C::map().get_ptr_mut(key) {
        // SAFETY: a live map value; racing writers can only set the same bit.
        unsafe {
            if back_to.is_some_and(|k| (*p).peer_key() != *k) {
                return;
            }
            (*p).flags |= ct_flags::CLOSING;
        }
    }
}

/// Create both conntrack entries of a new flow: forward (client → backend) and reply
/// (backend → client, rewritten back to the frontend address and port).
///
/// A backend on another node is reached through the kernel's routes (the overlay); its
/// replies must come back here, so the flow's source becomes this node's underlay address
/// and a port of the SNAT range (Swarm's ingress does the same SNAT). A local backend sees
/// the client's own address.
#[inline(always)]
pub fn ct_create4<C: CtTable>(
    key: &CtKey,
    fe: &Frontend,
    be_id: u32,
    be: &Backend,
    origin: &Origin,
) -> Result<CtEntry, u32> {
    let local = be.flags & be_flags::LOCAL != 0;
    // Port 0: keep the port the client addressed (VIPs forward every port).
    let be_port = if be.port == 0 { key.dport } else { be.port };
    let (saddr, sport) = match CONFIG.get(0) {
        Some(cfg) if !local && cfg.snat_addr != 0 => {
            let p = snat_port::<C>(
                cfg.snat_addr,
                cfg.snat_port_min,
                cfg.snat_port_max,
                be_id,
                be.addr,
                be_port,
            )?;
            count(reason::SNAT);
            (cfg.snat_addr, p)
        }
        _ => (key.saddr, key.sport),
    };
    let fwd = CtEntry {
        saddr,
        daddr: be.addr,
        sport,
        dport: be_port,
        ifindex: if local { be.ifindex } else { 0 },
        smac: be.smac,
        dmac: be.mac,
        svc_id: fe.svc_id,
        backend_id: be_id,
        flags: ct_flags::FORWARD,
    };
    let rev_key = fwd.peer_key();
    let rev = CtEntry {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        ifindex: origin.ifindex,
        smac: origin.dst_mac,
        dmac: origin.src_mac,
        svc_id: fe.svc_id,
        backend_id: be_id,
        flags: ct_flags::REPLY,
    };
    // Reply entry first: once the forward entry exists the backend may answer at once.
    C::map()
        .insert(rev_key, rev, 0)
        .map_err(|_| reason::ERR_CT_INSERT)?;
    if C::map().insert(key, fwd, 0).is_err() {
        let _ = C::map().remove(rev_key);
        return Err(reason::ERR_CT_INSERT);
    }
    Ok(fwd)
}

#[inline(always)]
fn stats_add(stats: Option<*mut TrafficStats>, bytes: u64, forward: bool, new_flow: bool) {
    if let Some(s) = stats {
        // SAFETY: per-CPU slot, written only by this CPU while this program runs.
        let s = unsafe { &mut *s };
        if forward {
            s.pkts_in += 1;
            s.bytes_in += bytes;
        } else {
            s.pkts_out += 1;
            s.bytes_out += bytes;
        }
        if new_flow {
            s.flows += 1;
        }
    }
}

/// Account one packet of a flow to its service and backend.
#[inline(always)]
pub fn lb4_account(ct: &CtEntry, bytes: u64, new_flow: bool) {
    let forward = ct.flags & ct_flags::FORWARD != 0;
    stats_add(SVC_STATS.get_ptr_mut(ct.svc_id), bytes, forward, new_flow);
    stats_add(
        BE_STATS.get_ptr_mut(ct.backend_id),
        bytes,
        forward,
        new_flow,
    );
}

/// Count a flow balanced at the socket layer (no packets are seen there).
#[inline(always)]
pub fn lb4_account_sock(svc_id: u32, be_id: u32) {
    for s in [SVC_STATS.get_ptr_mut(svc_id), BE_STATS.get_ptr_mut(be_id)] {
        if let Some(s) = s {
            // SAFETY: per-CPU slot, written only by this CPU while this program runs.
            unsafe { (*s).flows += 1 };
        }
    }
}

/// The whole decision for a packet arriving from outside the node (published ports), or a
/// reply of a flow this node balanced: returns the entry to rewrite the packet with and the
/// verdict reason, or `Err(reason)` to pass it untouched.
#[inline(always)]
pub fn lb4_ingress<C: CtTable>(
    key: &CtKey,
    tcp: u8,
    bytes: u64,
    origin: impl FnOnce() -> Option<Origin>,
) -> Result<(CtEntry, u32), u32> {
    if !lb4_port_wanted(key.dport) {
        return Err(reason::PASS_NO_SERVICE);
    }
    if let Some(ct) = ct_lookup4::<C>(key) {
        if ct.flags & ct_flags::FORWARD == 0 {
            ct_mark_closing::<C>(key, &ct, tcp);
            lb4_account(&ct, bytes, false);
            return Ok((ct, reason::REPLY));
        }
        if tcp == OPEN_SYN && ct.flags & ct_flags::CLOSING != 0 {
            // A new connection on the tuple of a flow that closed (the client reuses its
            // port): balanced again, as IPVS (conn_reuse_mode 1) and the kernel's conntrack
            // (a SYN in TIME_WAIT) do, rather than stuck to the old flow's task. The new
            // flow's entries overwrite the forward one; the old flow's reply entry stays
            // until the LRU or a SNAT reclaim takes it: the old task's last packets (a FIN
            // sent again from its TIME_WAIT) still reach the client, and a SNAT port is not
            // handed out while the task may hold it in TIME_WAIT. A SYN on an open flow is a
            // retransmission and stays with its task.
            crate::maps::count(reason::REOPENED);
        } else if lb4_backend_alive(&ct) {
            ct_mark_closing::<C>(key, &ct, tcp);
            lb4_account(&ct, bytes, false);
            return Ok((ct, reason::ESTABLISHED));
        } else {
            // Its task is gone: the flow is balanced again below (a TCP peer will get a RST
            // from the new backend rather than silence).
            crate::maps::count(reason::BACKEND_GONE);
        }
    }
    let fe = lb4_lookup_published(C::PROTO, key).ok_or(reason::PASS_NO_SERVICE)?;
    let origin = origin().ok_or(reason::PASS_MALFORMED)?;
    lb4_new_flow::<C>(key, &fe, bytes, &origin)
}

/// Pick a backend for a new flow to `fe`, create its conntrack entries and count it.
#[inline(always)]
pub fn lb4_new_flow<C: CtTable>(
    key: &CtKey,
    fe: &Frontend,
    bytes: u64,
    origin: &Origin,
) -> Result<(CtEntry, u32), u32> {
    let (be_id, be) = lb4_select_backend(fe).ok_or(reason::PASS_NO_BACKEND)?;
    let ct = ct_create4::<C>(key, fe, be_id, &be, origin)?;
    lb4_account(&ct, bytes, true);
    Ok((ct, reason::NEW_FLOW))
}

/// `bpf_fib_lookup` parameters for `ct`'s rewritten tuple (protocol `proto`), as if it
/// arrived on `ifindex`, written into the caller's `p` (returned by value, LLVM would copy
/// it back out through a `memset` of its zero words). `tot_len` is the IP length the route's
/// MTU is checked against; 0 lets the TC helper check the skb's own length.
#[inline(always)]
pub fn fib_params4<'a>(
    p: &'a mut core::mem::MaybeUninit<bpf_fib_lookup>,
    ct: &CtEntry,
    proto: u8,
    ifindex: u32,
    tot_len: u16,
) -> &'a mut bpf_fib_lookup {
    const AF_INET: u64 = 2;
    // Written as the eight words it is, each with its own (volatile) store: a zeroed struct
    // with fields set after, or LLVM merging a run of zero words, is a `memset` call, which
    // the BPF backend makes a byte-at-a-time loop (52 bytes of it, per packet). The layout
    // (uapi struct bpf_fib_lookup, little endian; checked below): family, l4_protocol,
    // sport, dport, tot_len | ifindex, tos | ipv4_src | ipv6 rest | ipv4_dst | ipv6 rest |
    // vlan, mark | smac/dmac.
    let words: [u64; 8] = [
        AF_INET
            | (proto as u64) << 8
            | (ct.sport as u64) << 16
            | (ct.dport as u64) << 32
            | (tot_len as u64) << 48,
        ifindex as u64,
        ct.saddr as u64,
        0,
        ct.daddr as u64,
        0,
        0,
        0,
    ];
    let w = p.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < 8 {
        // SAFETY: 8 aligned words inside the 64-byte struct (bpf_fib_lookup is 4-aligned;
        // MaybeUninit of it on the BPF stack is 8-aligned as every stack slot is, and the
        // assertions below pin its size).
        unsafe { core::ptr::write_volatile(w.add(i), words[i]) };
        i += 1;
    }
    // SAFETY: every byte written above; any bit pattern is a valid bpf_fib_lookup.
    unsafe { p.assume_init_mut() }
}

// The words of fib_params4 are where the kernel's struct has these fields.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<bpf_fib_lookup>() == 64);
    assert!(offset_of!(bpf_fib_lookup, sport) == 2 && offset_of!(bpf_fib_lookup, dport) == 4);
    assert!(
        offset_of!(bpf_fib_lookup, __bindgen_anon_1) == 6
            && offset_of!(bpf_fib_lookup, ifindex) == 8
    );
    assert!(
        offset_of!(bpf_fib_lookup, __bindgen_anon_3) == 16
            && offset_of!(bpf_fib_lookup, __bindgen_anon_4) == 32
    );
};

/// The datagram a fragment belongs to.
#[inline(always)]
fn frag_key(pkt: &Pkt) -> FragKey {
    FragKey {
        saddr: pkt.key.saddr,
        daddr: pkt.key.daddr,
        id: pkt.ip_id,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// A later fragment gets the ports its datagram's first fragment carried, so it follows its
/// flow, and the IP id that fragment left with; `Err(PASS_FRAGMENT)` when no first fragment
/// of a balanced flow was seen (not ours, or it arrived first: fragments are not held back
/// to wait for it). Other packets: a no-op.
#[inline(always)]
pub fn frag_ports(pkt: &mut Pkt) -> Result<(), u32> {
    if pkt.frag != FRAG_LATER {
        return Ok(());
    }
    // SAFETY: copied out at once.
    let p = FRAGS
        .get_ptr(&frag_key(pkt))
        .map(|p| unsafe { *p })
        .ok_or(reason::PASS_FRAGMENT)?;
    pkt.key.sport = p.sport;
    pkt.key.dport = p.dport;
    pkt.new_id = p.id;
    Ok(())
}

/// A fragment's decision was to balance it: a first fragment takes a fresh IP id for its
/// datagram and leaves it, with its ports, for the later fragments (the LRU forgets them, as
/// a reassembly queue times out); every fragment is counted. A whole packet: a no-op.
///
/// The fresh id: once their addresses are rewritten, datagrams that could not be confused
/// before can be (two clients' through SNAT toward one task, a task's replies to one client
/// through one frontend, one client's to two frontends of one task), and a reassembly that
/// takes fragments of two datagrams for one datagram's drops or corrupts both. One counter
/// for the node, so the ids of the datagrams it rewrites repeat only every 65,536.
///
/// This and [`frag_passed`] take no `Result` through: a decision passed on by value and
/// returned carried its unset half along, which LLVM stored from an unset register and the
/// verifier refused ("!read_ok"). The callers match once and return early.
#[inline(always)]
pub fn frag_balanced(pkt: &mut Pkt) {
    if pkt.frag == FRAG_NONE {
        return;
    }
    if pkt.frag == FRAG_FIRST {
        if let Some(next) = FRAG_IDS.get_ptr_mut(0) {
            pkt.new_id = atomic_fetch_add_u64(next, 1) as u16;
        }
        let e = FragEntry {
            sport: pkt.key.sport,
            dport: pkt.key.dport,
            id: pkt.new_id,
            _pad: 0,
        };
        let _ = FRAGS.insert(&frag_key(pkt), &e, 0);
    }
    count(reason::FRAGMENT);
}

/// A fragment's decision was to pass it with `why`: the reason it is passed with (a later
/// fragment whose flow is gone: `PASS_FRAGMENT`). A first fragment removes what an older
/// datagram with the same addresses, protocol and IP id left (the id wraps), so that this
/// datagram's later fragments are not taken for that one's. A whole packet: `why`.
#[inline(always)]
pub fn frag_passed(pkt: &Pkt, why: u32) -> u32 {
    if pkt.frag == FRAG_FIRST {
        let _ = FRAGS.remove(&frag_key(pkt));
    }
    if pkt.frag == FRAG_LATER {
        reason::PASS_FRAGMENT
    } else {
        why
    }
}

/// A fragment from outside the node: the first is balanced as a whole packet (it may start
/// a flow); a later one only follows the flow its first fragment's ports name
/// ([`lb4_tracked`]): it has no L4 header to rewrite for a new one.
#[inline(always)]
pub fn lb4_ingress_fragment<C: CtTable>(
    pkt: &Pkt,
    bytes: u64,
    origin: impl FnOnce() -> Option<Origin>,
) -> Result<(CtEntry, u32), u32> {
    if pkt.frag == FRAG_LATER {
        lb4_tracked::<C>(&pkt.key, pkt.tcp, bytes)
    } else {
        lb4_ingress::<C>(&pkt.key, pkt.tcp, bytes, origin)
    }
}

/// A packet of a flow this node balanced, or nothing: the reply path at a task's interface,
/// and a later fragment (see [`lb4_ingress_fragment`]). Never starts a flow.
#[inline(always)]
pub fn lb4_tracked<C: CtTable>(key: &CtKey, tcp: u8, bytes: u64) -> Result<(CtEntry, u32), u32> {
    let ct = ct_lookup4::<C>(key).ok_or(reason::PASS_NO_SERVICE)?;
    ct_mark_closing::<C>(key, &ct, tcp);
    lb4_account(&ct, bytes, false);
    let r = if ct.flags & ct_flags::REPLY != 0 {
        reason::REPLY
    } else {
        reason::ESTABLISHED
    };
    Ok((ct, r))
}

/// Network isolation: does a packet entering from a task's interface `ifindex` head for an
/// address of a mesh network other than that interface's? (Every network's bridge lives in
/// the node's namespace, so without this the node would route between networks.)
#[inline(always)]
pub fn net4_crosses_networks(ifindex: u32, daddr: u32) -> bool {
    // SAFETY: copied out at once.
    let Some(src) = IFACE_NET.get_ptr(ifindex).map(|p| unsafe { *p }) else {
        return false;
    };
    match SUBNETS.get(LpmKey::new(32, daddr)) {
        Some(dst) => *dst != src,
        None => false,
    }
}
