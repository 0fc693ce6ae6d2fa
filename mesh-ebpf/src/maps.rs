//! Every map of the hot path. Names and sizes come from `mesh_common::maps`; all maps are
//! pinned by name under the agent's pin directory so a restarted agent reuses them (and their
//! live connections) instead of starting empty.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use mesh_common::{
    Backend, Config, CtEntry, CtKey, FragEntry, FragKey, Frontend, FrontendKey, SlotKey,
    SockRevEntry, SockRevKey, TaskNetKey, TrafficStats, maps::*, reason,
};

#[map(name = "FRONTENDS_V1")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(MAX_FRONTENDS, 0);

#[map(name = "SLOTS_V1")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_SLOTS, 0);

#[map(name = "BACKENDS_V1")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "RR_V1")]
pub static RR: Array<u64> = Array::pinned(MAX_SERVICES, 0);

/// Conntrack, one table per protocol. One LRU list for the whole map (no
/// `BPF_F_NO_COMMON_LRU`): with per-CPU lists the kernel splits the entries evenly over the
/// possible CPUs and a CPU evicts only from its own share, so when new flows arrive on few
/// CPUs (a veth's packets are handled on the sender's CPU) live flows are evicted with the
/// map mostly empty: 1/64 of its size on a 64-CPU node. Each CPU still takes free entries
/// from the shared list in batches, so the list's lock is not taken per flow.
#[map(name = "CT_TCP_V3")]
pub static CT_TCP: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CT_TCP, 0);

#[map(name = "CT_UDP_V3")]
pub static CT_UDP: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CT_UDP, 0);

/// Per backend id: the next position in the SNAT port range (atomic add), so a node hands
/// out each backend's SNAT ports in turn: the port a new flow gets is the one this node used
/// longest ago for that backend, with no search through the range.
#[map(name = "SNAT_NEXT_V1")]
pub static SNAT_NEXT: Array<u64> = Array::pinned(MAX_BACKENDS, 0);

/// The ports of fragmented datagrams of balanced flows, from their first fragments, for
/// their later fragments (which carry none), and the IP id they all leave with.
#[map(name = "FRAGS_V2")]
pub static FRAGS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(MAX_FRAGS, 0);

/// The next IP id of a rewritten fragmented datagram (one counter for the node).
#[map(name = "FRAG_IDS_V1")]
pub static FRAG_IDS: Array<u64> = Array::pinned(1, 0);

#[map(name = "NODE_ADDRS_V1")]
pub static NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(MAX_NODE_ADDRS, 0);

/// Bitmap of destination ports (host order) that some frontend uses: bit `p & 31` of word
/// `p >> 5`. Lets pass-through traffic leave after one array access.
#[map(name = "PORTS_V1")]
pub static PORTS: Array<u32> = Array::pinned(PORT_WORDS, 0);

#[map(name = "VERDICTS_V1")]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

#[map(name = "SVC_STATS_V1")]
pub static SVC_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "BE_STATS_V1")]
pub static BE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "CONFIG_V1")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "SOCK_REV_V1")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevEntry> = LruHashMap::pinned(MAX_SOCK_REV, 0);

#[map(name = "TASK_NETS_V1")]
pub static TASK_NETS: HashMap<TaskNetKey, u32> = HashMap::pinned(MAX_TASK_NETS, 0);

#[map(name = "SUBNETS_V1")]
pub static SUBNETS: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_SUBNETS, 0);

#[map(name = "IFACE_NET_V1")]
pub static IFACE_NET: HashMap<u32, u32> = HashMap::pinned(MAX_IFACES, 0);

/// Count one packet under `reason`.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}
