//! Types shared by mesh's eBPF programs (`mesh-ebpf`) and its agent (`mesh-agent`).
//!
//! Every map key and value here is `#[repr(C)]`, `Copy`, padding-free (explicit `_pad`
//! fields) and size-checked at compile time, because the kernel copies them byte for byte.
//!
//! Byte order, per field:
//! - `*addr` fields hold an IPv4 address in **network order**, stored as the `u32` you get by
//!   loading the 4 packet bytes natively (`u32::from_ne_bytes(ip.octets())` in user space).
//! - `*port` fields hold a port in **network order** (`port.to_be()` in user space).
//! - everything else (ids, counts, flags, ifindex) is host order.
//!
//! When a pinned map's layout changes, bump the `_V<n>` suffix of its name (see [`maps`]) so an
//! agent never reuses a pin with an incompatible layout.
#![no_std]

pub mod csum;
pub mod icmp;

/// Map names (as they appear in the object and under the pin directory) and capacities.
pub mod maps {
    /// (addr, port, proto) → [`crate::Frontend`]. addr 0 = any node address (published port).
    pub const FRONTENDS: &str = "FRONTENDS_V1";
    /// (svc_id, slot) → backend id. Slot numbers are 1..=count.
    pub const SLOTS: &str = "SLOTS_V1";
    /// backend id → [`crate::Backend`] (array; id 0 is never used).
    pub const BACKENDS: &str = "BACKENDS_V1";
    /// svc_id → round-robin cursor (array of u64, shared by every CPU and every hook).
    pub const RR: &str = "RR_V1";
    /// LRU conntrack of TCP flows: [`crate::CtKey`] → [`crate::CtEntry`], one entry per
    /// direction. One table per protocol keeps the key at 12 bytes (three words to hash).
    pub const CT_TCP: &str = "CT_TCP_V3";
    /// LRU conntrack of UDP flows, as [`CT_TCP`].
    pub const CT_UDP: &str = "CT_UDP_V3";
    /// IPv4 addresses of the node (network order) → 1. Published ports answer on these.
    pub const NODE_ADDRS: &str = "NODE_ADDRS_V1";
    /// Bitmap of frontend ports (host order): word `port >> 5`, bit `port & 31`.
    pub const PORTS: &str = "PORTS_V1";
    /// Per-CPU packet counters indexed by [`crate::reason`].
    pub const VERDICTS: &str = "VERDICTS_V1";
    /// Per-CPU [`crate::TrafficStats`] indexed by svc_id.
    pub const SVC_STATS: &str = "SVC_STATS_V1";
    /// Per-CPU [`crate::TrafficStats`] indexed by backend id.
    pub const BACKEND_STATS: &str = "BE_STATS_V1";
    /// Single-entry array holding [`crate::Config`].
    pub const CONFIG: &str = "CONFIG_V1";
    /// Socket-LB reverse translations for unconnected UDP: [`crate::SockRevKey`] → [`crate::SockRevEntry`].
    pub const SOCK_REV: &str = "SOCK_REV_V1";
    /// Task namespaces served by the socket-level VIP LB: [`crate::TaskNetKey`] → 1.
    /// `(cookie, 0)` marks "this netns is a task of this node"; `(cookie, net_id)` lists the
    /// networks the task is attached to.
    pub const TASK_NETS: &str = "TASK_NETS_V1";
    /// LPM trie: subnet of every mesh network (network-order address, prefix) → network id.
    pub const SUBNETS: &str = "SUBNETS_V1";
    /// Host-side veth ifindex of a task → id of the network that veth is on.
    pub const IFACE_NET: &str = "IFACE_NET_V1";
    /// Array of u64 indexed by backend id: a cursor into the SNAT port range, so each
    /// backend's SNAT ports are handed out in turn (the port reused is the one used longest
    /// ago).
    pub const SNAT_NEXT: &str = "SNAT_NEXT_V1";
    /// LRU: fragmented datagrams of balanced flows, [`crate::FragKey`] → [`crate::FragEntry`]:
    /// the ports a datagram's first fragment carried, so its later fragments (which carry none)
    /// follow it, and the IP id all its fragments leave with.
    pub const FRAGS: &str = "FRAGS_V2";
    /// Array of one u64: the next IP id a rewritten fragmented datagram gets (atomic add).
    pub const FRAG_IDS: &str = "FRAG_IDS_V1";

    pub const MAX_FRONTENDS: u32 = 65_536;
    /// svc ids are 1..MAX_SERVICES (0 = none).
    pub const MAX_SERVICES: u32 = 65_536;
    /// backend ids are 1..MAX_BACKENDS (0 = none).
    pub const MAX_BACKENDS: u32 = 262_144;
    pub const MAX_SLOTS: u32 = 262_144;
    pub const MAX_CT_TCP: u32 = 262_144;
    pub const MAX_CT_UDP: u32 = 131_072;
    pub const MAX_NODE_ADDRS: u32 = 256;
    pub const MAX_SOCK_REV: u32 = 65_536;
    pub const MAX_TASK_NETS: u32 = 65_536;
    pub const MAX_SUBNETS: u32 = 4_096;
    pub const MAX_IFACES: u32 = 65_536;
    pub const PORT_WORDS: u32 = 65_536 / 32;
    /// Fragmented datagrams in flight at once (as Cilium's default).
    pub const MAX_FRAGS: u32 = 8_192;

    /// All maps the agent pins, in a stable order (status, cleanup).
    /// Map names must stay within the kernel's 15 characters (BPF_OBJ_NAME_LEN - 1).
    pub const ALL: [&str; 19] = [
        FRONTENDS,
        SLOTS,
        BACKENDS,
        RR,
        CT_TCP,
        CT_UDP,
        NODE_ADDRS,
        PORTS,
        VERDICTS,
        SVC_STATS,
        BACKEND_STATS,
        CONFIG,
        SOCK_REV,
        TASK_NETS,
        SUBNETS,
        IFACE_NET,
        SNAT_NEXT,
        FRAGS,
        FRAG_IDS,
    ];
}

/// eBPF program names in the object.
pub mod progs {
    /// XDP on the node's external interface(s): published ports → tasks.
    pub const XDP_INGRESS: &str = "mesh_xdp_ingress";
    /// Same job as [`XDP_INGRESS`] from TC/tcx ingress (works on the skb: no veth XDP tax).
    pub const TC_INGRESS: &str = "mesh_tc_ingress";
    /// TC/tcx ingress on a task's host-side veth: replies from the task → reverse NAT.
    pub const TC_TASK: &str = "mesh_tc_task";
    /// cgroup/connect4: a process on the node connecting to a published port.
    pub const CONNECT4: &str = "mesh_connect4";
    /// cgroup/sendmsg4 and recvmsg4: unconnected UDP from processes on the node.
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// cgroup/getpeername4: report the published address to a translated socket.
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
}

/// IP protocol numbers used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Indices into the per-CPU `VERDICTS` counter array: why a packet got the verdict it got.
pub mod reason {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): passed untouched.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// IPv4 fragment passed untouched: not of a balanced flow, or a later fragment whose first
    /// fragment was not seen (yet: fragments that arrive before their first are not held).
    pub const PASS_FRAGMENT: u32 = 1;
    /// IPv4 header with options (IHL > 5): passed untouched.
    pub const PASS_IP_OPTIONS: u32 = 2;
    /// Neither TCP nor UDP (ICMP, ...): passed untouched.
    pub const PASS_NOT_TCP_UDP: u32 = 3;
    /// Shorter than its headers claim, or IHL < 5 / TCP data offset < 5: passed untouched.
    pub const PASS_MALFORMED: u32 = 4;
    /// Not addressed to a published port or VIP, and no connection entry: passed untouched.
    pub const PASS_NO_SERVICE: u32 = 5;
    /// A service matched but it has no running backend: passed, so the kernel answers (RST/ICMP).
    pub const PASS_NO_BACKEND: u32 = 6;
    /// First packet of a flow: backend chosen, conntrack created, packet rewritten.
    pub const NEW_FLOW: u32 = 7;
    /// Packet of a known flow rewritten towards its backend.
    pub const ESTABLISHED: u32 = 8;
    /// Reply rewritten back to the client (reverse NAT).
    pub const REPLY: u32 = 9;
    /// Rewritten packet redirected straight to its device.
    pub const REDIRECT: u32 = 10;
    /// Rewritten packet handed to the kernel (no device to redirect to).
    pub const PASS_REWRITTEN: u32 = 11;
    /// Conntrack insert failed: packet passed untouched.
    pub const ERR_CT_INSERT: u32 = 12;
    /// A flow's backend was removed: the flow was re-balanced to a live backend.
    pub const BACKEND_GONE: u32 = 13;
    /// A packet could not be rewritten (helper error): dropped.
    pub const DROP_REWRITE: u32 = 14;
    /// A socket was translated by the socket-level load balancer (connect/sendmsg).
    pub const SOCK_TRANSLATED: u32 = 15;
    /// A socket-level translation found no backend.
    pub const SOCK_NO_BACKEND: u32 = 16;
    /// A task addressed the VIP of a network it is not attached to: refused (EPERM).
    pub const DROP_VIP_OTHER_NETWORK: u32 = 17;
    /// A new flow to a remote task got the node's address as its source (SNAT).
    pub const SNAT: u32 = 18;
    /// No free SNAT port for a new flow: passed untouched.
    pub const ERR_SNAT_PORTS: u32 = 19;
    /// A task sent to an address of a mesh network it is not attached to: dropped.
    pub const DROP_OTHER_NETWORK: u32 = 20;
    /// A new flow took over the SNAT port of a flow closed both ways (no free port probed).
    pub const SNAT_RECLAIMED: u32 = 21;
    /// A SYN reused the tuple of a flow that had closed: balanced again as a new flow (also
    /// counted `new_flow`).
    pub const REOPENED: u32 = 22;
    /// A fragment of a balanced flow's datagram rewritten (the first by its ports, a later one
    /// by the ports its first fragment carried); also counted with the flow's verdict.
    pub const FRAGMENT: u32 = 23;
    /// A datagram with DF set too big for the link toward its task: dropped, and the client
    /// told the MTU (ICMP fragmentation needed, from the address it sent to), as a router
    /// on its path would.
    pub const DROP_TOO_BIG: u32 = 24;
    pub const COUNT: u32 = 32;

    /// Human-readable names, index = reason code.
    pub const NAMES: [&str; 25] = [
        "pass_not_ipv4",
        "pass_fragment",
        "pass_ip_options",
        "pass_not_tcp_udp",
        "pass_malformed",
        "pass_no_service",
        "pass_no_backend",
        "new_flow",
        "established",
        "reply",
        "redirect",
        "pass_rewritten",
        "err_ct_insert",
        "backend_gone",
        "drop_rewrite",
        "sock_translated",
        "sock_no_backend",
        "drop_vip_other_network",
        "snat",
        "err_snat_ports",
        "drop_other_network",
        "snat_reclaimed",
        "reopened",
        "fragment",
        "drop_too_big",
    ];
}

/// Frontend flags.
pub mod fe_flags {
    /// A published port: matched on any node address (key.addr = 0).
    pub const PUBLISHED: u32 = 1;
    /// A service VIP (key.addr = the VIP).
    pub const VIP: u32 = 2;
}

/// Backend flags.
pub mod be_flags {
    /// The backend is live; a conntrack entry pointing at a backend without it re-balances.
    pub const ACTIVE: u16 = 1;
    /// The backend is a task on this node: `ifindex` is its host-side veth.
    pub const LOCAL: u16 = 2;
}

/// Conntrack entry flags.
pub mod ct_flags {
    /// Entry for packets client → backend (forward NAT).
    pub const FORWARD: u32 = 1;
    /// Entry for packets backend → client (reverse NAT).
    pub const REPLY: u32 = 2;
    /// A TCP FIN or RST went this entry's way: that side is done sending. (Agents before
    /// this one also wrote when, in bits 8..32; no flag uses those bits.) A SNAT port whose
    /// two entries are both closing may be reclaimed for a new flow when its turn comes
    /// (each backend's ports are handed out in turn; closed flows otherwise hold their port
    /// until the LRU evicts them).
    pub const CLOSING: u32 = 4;
}

/// Key of the frontends map: what a client addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Network order. 0 = any address of the node (published port).
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// [`proto`] number.
    pub proto: u8,
    pub _pad: u8,
}

/// A load-balanced service port (an `ipvsadm` virtual service).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// 1..MAX_SERVICES; indexes `RR` and `SVC_STATS`.
    pub svc_id: u32,
    /// Number of backend slots (1..=count) in `SLOTS`; 0 = no backend.
    pub count: u32,
    /// [`fe_flags`].
    pub flags: u32,
    /// For a VIP: the id of its network (see `TASK_NETS`); 0 for published ports.
    pub net_id: u32,
}

/// Key of the slots map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    /// 1..=count.
    pub slot: u32,
}

/// A backend (an `ipvsadm` real server): a task's address and target port, and how to reach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Network order.
    pub addr: u32,
    /// Network order (the service's target port); 0 = keep the port the client used (VIPs
    /// forward every port, as Swarm's do).
    pub port: u16,
    /// [`be_flags`].
    pub flags: u16,
    /// Device to redirect to (the task's host-side veth); 0 = let the kernel route.
    pub ifindex: u32,
    /// Destination MAC for a redirected frame (the task's eth0).
    pub mac: [u8; 6],
    /// Source MAC for a redirected frame (the network's bridge, i.e. the task's gateway).
    pub smac: [u8; 6],
    /// The frontend this backend serves.
    pub svc_id: u32,
    pub _pad: u32,
}

/// Conntrack key: a flow's addresses and ports exactly as seen on the wire in one direction.
/// The protocol is the table's ([`maps::CT_TCP`], [`maps::CT_UDP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Key of [`maps::FRAGS`]: one IPv4 datagram, identified as RFC 791 identifies the fragments
/// of one (source, destination, protocol, identification), addresses as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// The IP identification field (network order).
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`maps::FRAGS`]: what the datagram's first fragment decided for the later ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragEntry {
    /// The first fragment's ports (network order).
    pub sport: u16,
    pub dport: u16,
    /// The IP id every fragment of the datagram leaves with (raw field), fresh from
    /// [`maps::FRAG_IDS`]: rewritten datagrams of different clients, or of one client to two
    /// frontends, then never share an id toward one task (which would merge them in its
    /// reassembly), as they could with their own ids once their addresses are rewritten.
    pub id: u16,
    pub _pad: u16,
}

/// Conntrack value: the tuple to rewrite the packet to, and where to send it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// New source address (network order).
    pub saddr: u32,
    /// New destination address (network order).
    pub daddr: u32,
    /// New source port (network order).
    pub sport: u16,
    /// New destination port (network order).
    pub dport: u16,
    /// Redirect target; 0 = hand the rewritten packet to the kernel.
    pub ifindex: u32,
    /// Source MAC of the redirected frame.
    pub smac: [u8; 6],
    /// Destination MAC of the redirected frame.
    pub dmac: [u8; 6],
    pub svc_id: u32,
    pub backend_id: u32,
    /// [`ct_flags`].
    pub flags: u32,
}

/// Traffic counters of one service or backend (per CPU in the map; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets/bytes client → backend.
    pub pkts_in: u64,
    pub bytes_in: u64,
    /// Packets/bytes backend → client.
    pub pkts_out: u64,
    pub bytes_out: u64,
    /// Flows (connections) balanced.
    pub flows: u64,
}

/// Agent-wide settings read by the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network-namespace cookie of the node. The cgroup socket hooks fire for every process
    /// of the cgroup whatever its netns, so they act only on sockets of this netns (and of
    /// the task namespaces listed in `TASK_NETS`).
    pub netns_cookie: u64,
    /// Reserved for later modes (e.g. DSR); 0 today.
    pub flags: u32,
    /// Source address for flows balanced to a task on another node (network order): the
    /// node's underlay address, where the remote task's replies come back to. 0 = none.
    pub snat_addr: u32,
    /// SNAT source ports, host order, inclusive (`mesh-agent run --snat-ports`). Kept outside
    /// the node's `ip_local_port_range` so they never collide with its own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Port (host order) the embedded DNS server really listens on at 127.0.0.11 in tasks;
    /// the socket hooks send 127.0.0.11:53 there, so a task's own server can bind port 53
    /// (Docker does the same with an iptables redirect). 0 = listens on 53 itself.
    pub dns_port: u16,
    pub _pad: u16,
}

/// The embedded DNS server's address in every task (network order when loaded natively).
pub const DNS_ADDR: [u8; 4] = [127, 0, 0, 11];

/// Default SNAT port range: 22,768 ports below `net.ipv4.ip_local_port_range`'s default
/// 32768–60999 (the node's own connections) and above the ports node services commonly listen
/// on. The SNAT tuples are per backend; a backend's task keeps each closed one in TIME_WAIT
/// for 60 s, and a tuple reused sooner by a client whose TCP timestamp is older is refused
/// (PAWS) until the client retries after 1 s, so a wide range matters under connection churn
/// (Swarm's and kube-proxy's masquerade use 1024–65535, with conntrack to avoid the node's
/// own connections).
pub const SNAT_PORT_MIN: u16 = 10_000;
pub const SNAT_PORT_MAX: u16 = 32_767;

/// Key of the `TASK_NETS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskNetKey {
    /// Network-namespace cookie of a task.
    pub cookie: u64,
    /// A network id the task is attached to; 0 = the "is a task" marker.
    pub net_id: u32,
    pub _pad: u32,
}

/// Key of the socket-LB reverse map (unconnected UDP): which socket sent to which backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    /// Backend address (network order).
    pub addr: u32,
    /// Backend port (network order).
    pub port: u16,
    pub _pad: u16,
}

/// Value of the socket-LB reverse map: the address the socket originally sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevEntry {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

// Layout is ABI: any change here must be a deliberate one (and bump the map's `_V` suffix).
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<FrontendKey>() == 8 && align_of::<FrontendKey>() == 4);
    assert!(size_of::<Frontend>() == 16);
    assert!(size_of::<SlotKey>() == 8);
    assert!(size_of::<Backend>() == 32 && align_of::<Backend>() == 4);
    assert!(size_of::<CtKey>() == 12 && align_of::<CtKey>() == 4);
    assert!(size_of::<CtEntry>() == 40 && align_of::<CtEntry>() == 4);
    assert!(size_of::<FragKey>() == 12 && size_of::<FragEntry>() == 8);
    assert!(size_of::<TrafficStats>() == 40);
    assert!(size_of::<Config>() == 24);
    assert!(size_of::<TaskNetKey>() == 16);
    assert!(size_of::<SockRevKey>() == 16);
    assert!(size_of::<SockRevEntry>() == 8);
    assert!(reason::NAMES.len() as u32 <= reason::COUNT);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding (asserted above).
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevEntry {}
    unsafe impl aya::Pod for TaskNetKey {}
}

impl CtKey {
    /// The key of the opposite direction of this tuple.
    #[inline(always)]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

impl CtEntry {
    /// The conntrack key of packets coming back along the tuple this entry rewrites to (its
    /// tuple reversed): the other direction's entry of the same flow.
    #[inline(always)]
    pub const fn peer_key(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

impl TrafficStats {
    /// Sum of per-CPU values.
    pub fn add(&mut self, o: &TrafficStats) {
        self.pkts_in += o.pkts_in;
        self.bytes_in += o.bytes_in;
        self.pkts_out += o.pkts_out;
        self.bytes_out += o.bytes_out;
        self.flows += o.flows;
    }
}

const _: () = {
    let mut i = 0;
    while i < maps::ALL.len() {
        assert!(
            maps::ALL[i].len() <= 15,
            "map name longer than BPF_OBJ_NAME_LEN - 1"
        );
        i += 1;
    }
};
