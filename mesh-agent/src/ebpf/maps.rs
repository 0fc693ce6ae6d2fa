//! Typed access to the pinned maps: applying table operations, reading counters.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use mesh_common::{
    Backend, Config, CtEntry, CtKey, Frontend, FrontendKey, SlotKey, TaskNetKey, TrafficStats,
    maps as names, reason,
};

use super::DatapathError;
use crate::tables::MapOp;

/// Every map of the object, typed.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: Array<MapData, Backend>,
    pub rr: Array<MapData, u64>,
    /// Conntrack of TCP flows.
    pub ct_tcp: HashMap<MapData, CtKey, CtEntry>,
    /// Conntrack of UDP flows.
    pub ct_udp: HashMap<MapData, CtKey, CtEntry>,
    pub node_addrs: HashMap<MapData, u32, u32>,
    pub ports: Array<MapData, u32>,
    pub verdicts: PerCpuArray<MapData, u64>,
    pub svc_stats: PerCpuArray<MapData, TrafficStats>,
    pub be_stats: PerCpuArray<MapData, TrafficStats>,
    pub config: Array<MapData, Config>,
    pub task_nets: HashMap<MapData, TaskNetKey, u32>,
    pub subnets: LpmTrie<MapData, u32, u32>,
    pub iface_net: HashMap<MapData, u32, u32>,
    /// Entries the TCP and UDP conntrack maps hold (as created or pinned).
    pub ct_capacity: [u32; 2],
}

/// The `max_entries` of a map, 0 if unknown.
fn capacity(map: &Option<Map>) -> u32 {
    match map {
        Some(Map::LruHashMap(d) | Map::HashMap(d)) => {
            d.info().map(|i| i.max_entries()).unwrap_or(0)
        }
        _ => 0,
    }
}

fn typed<T>(name: &'static str, map: Option<Map>) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = map.ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn me(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Maps {
    /// Take the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Self::build(|n| ebpf.take_map(n))
    }

    /// Open the maps pinned in `dir` by a running (or stopped) agent.
    pub fn open_pinned(dir: &Path) -> Result<Self, DatapathError> {
        Self::build(|n| {
            MapData::from_pin(dir.join(n))
                .ok()
                .and_then(|d| Map::from_map_data(d).ok())
        })
    }

    fn build(mut get: impl FnMut(&str) -> Option<Map>) -> Result<Self, DatapathError> {
        let (ct_tcp, ct_udp) = (get(names::CT_TCP), get(names::CT_UDP));
        let ct_capacity = [capacity(&ct_tcp), capacity(&ct_udp)];
        Ok(Maps {
            ct_capacity,
            frontends: typed(names::FRONTENDS, get(names::FRONTENDS))?,
            slots: typed(names::SLOTS, get(names::SLOTS))?,
            backends: typed(names::BACKENDS, get(names::BACKENDS))?,
            rr: typed(names::RR, get(names::RR))?,
            ct_tcp: typed(names::CT_TCP, ct_tcp)?,
            ct_udp: typed(names::CT_UDP, ct_udp)?,
            node_addrs: typed(names::NODE_ADDRS, get(names::NODE_ADDRS))?,
            ports: typed(names::PORTS, get(names::PORTS))?,
            verdicts: typed(names::VERDICTS, get(names::VERDICTS))?,
            svc_stats: typed(names::SVC_STATS, get(names::SVC_STATS))?,
            be_stats: typed(names::BACKEND_STATS, get(names::BACKEND_STATS))?,
            config: typed(names::CONFIG, get(names::CONFIG))?,
            task_nets: typed(names::TASK_NETS, get(names::TASK_NETS))?,
            subnets: typed(names::SUBNETS, get(names::SUBNETS))?,
            iface_net: typed(names::IFACE_NET, get(names::IFACE_NET))?,
        })
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<(), DatapathError> {
        self.config.set(0, cfg, 0).map_err(me(names::CONFIG))
    }

    /// Replace the task-namespace table: netns cookie → ids of the networks it is attached to.
    pub fn set_task_nets(&mut self, tasks: &BTreeMap<u64, Vec<u32>>) -> Result<(), DatapathError> {
        let mut want = std::collections::BTreeSet::new();
        for (cookie, nets) in tasks {
            want.insert(TaskNetKey {
                cookie: *cookie,
                net_id: 0,
                _pad: 0,
            });
            for n in nets {
                want.insert(TaskNetKey {
                    cookie: *cookie,
                    net_id: *n,
                    _pad: 0,
                });
            }
        }
        let have: Vec<TaskNetKey> = self.task_nets.keys().filter_map(Result::ok).collect();
        for k in &want {
            self.task_nets
                .insert(k, 1, 0)
                .map_err(me(names::TASK_NETS))?;
        }
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = self.task_nets.remove(k);
        }
        Ok(())
    }

    /// Replace the subnet → network table (network isolation).
    pub fn set_subnets(&mut self, nets: &[(ipnet::Ipv4Net, u32)]) -> Result<(), DatapathError> {
        let want: Vec<(u32, u32, u32)> = nets
            .iter()
            .map(|(n, id)| {
                (
                    n.prefix_len() as u32,
                    u32::from_ne_bytes(n.network().octets()),
                    *id,
                )
            })
            .collect();
        let have: Vec<LpmKey<u32>> = self.subnets.keys().filter_map(Result::ok).collect();
        for (plen, addr, id) in &want {
            self.subnets
                .insert(&LpmKey::new(*plen, *addr), id, 0)
                .map_err(me(names::SUBNETS))?;
        }
        for k in have {
            let (plen, addr) = (k.prefix_len(), k.data());
            if !want.iter().any(|(p, a, _)| *p == plen && *a == addr) {
                let _ = self.subnets.remove(&k);
            }
        }
        Ok(())
    }

    /// Replace the task interface → network table (network isolation).
    pub fn set_iface_nets(&mut self, ifaces: &BTreeMap<u32, u32>) -> Result<(), DatapathError> {
        let have: Vec<u32> = self.iface_net.keys().filter_map(Result::ok).collect();
        for (ifindex, id) in ifaces {
            self.iface_net
                .insert(ifindex, id, 0)
                .map_err(me(names::IFACE_NET))?;
        }
        for k in have.iter().filter(|k| !ifaces.contains_key(k)) {
            let _ = self.iface_net.remove(k);
        }
        Ok(())
    }

    /// Replace the node-address set with `addrs`.
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<(), DatapathError> {
        let want: Vec<u32> = addrs
            .iter()
            .map(|a| u32::from_ne_bytes(a.octets()))
            .collect();
        let have: Vec<u32> = self.node_addrs.keys().filter_map(Result::ok).collect();
        for a in &want {
            self.node_addrs
                .insert(a, 1, 0)
                .map_err(me(names::NODE_ADDRS))?;
        }
        for a in have.iter().filter(|a| !want.contains(a)) {
            let _ = self.node_addrs.remove(a);
        }
        Ok(())
    }

    fn zero_percpu<T: aya::Pod + Default>(
        map: &mut PerCpuArray<MapData, T>,
        name: &'static str,
        idx: u32,
    ) -> Result<(), DatapathError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        let v = PerCpuValues::try_from(vec![T::default(); n]).map_err(|e| DatapathError::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "percpu",
                io_error: e,
            }),
        })?;
        map.set(idx, v, 0).map_err(me(name))
    }

    /// Apply table operations in order.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        for op in ops {
            match op {
                MapOp::SetBackend { id, value } => self
                    .backends
                    .set(*id, value, 0)
                    .map_err(me(names::BACKENDS))?,
                MapOp::ClearBackend { id } => self
                    .backends
                    .set(*id, zero_backend(), 0)
                    .map_err(me(names::BACKENDS))?,
                MapOp::ResetService { svc_id } => {
                    self.rr.set(*svc_id, 0, 0).map_err(me(names::RR))?;
                    Self::zero_percpu(&mut self.svc_stats, names::SVC_STATS, *svc_id)?;
                }
                MapOp::ResetBackendStats { id } => {
                    Self::zero_percpu(&mut self.be_stats, names::BACKEND_STATS, *id)?
                }
                MapOp::SetSlot {
                    svc_id,
                    slot,
                    backend_id,
                } => self
                    .slots
                    .insert(
                        SlotKey {
                            svc_id: *svc_id,
                            slot: *slot,
                        },
                        backend_id,
                        0,
                    )
                    .map_err(me(names::SLOTS))?,
                MapOp::DeleteSlot { svc_id, slot } => ignore_missing(self.slots.remove(&SlotKey {
                    svc_id: *svc_id,
                    slot: *slot,
                }))
                .map_err(me(names::SLOTS))?,
                MapOp::SetFrontend { key, value } => self
                    .frontends
                    .insert(key, value, 0)
                    .map_err(me(names::FRONTENDS))?,
                MapOp::DeleteFrontend { key } => {
                    ignore_missing(self.frontends.remove(key)).map_err(me(names::FRONTENDS))?
                }
                MapOp::SetPortWord { word, bits } => {
                    self.ports.set(*word, bits, 0).map_err(me(names::PORTS))?
                }
            }
        }
        Ok(())
    }

    /// The programmed view a previous agent left in these (pinned) maps.
    pub fn adopt_tables(&self) -> crate::tables::Tables {
        let fes: Vec<(FrontendKey, Frontend)> =
            self.frontends.iter().filter_map(Result::ok).collect();
        let slots: Vec<(SlotKey, u32)> = self.slots.iter().filter_map(Result::ok).collect();
        let mut ids: Vec<u32> = slots.iter().map(|(_, b)| *b).collect();
        ids.sort_unstable();
        ids.dedup();
        let bes: Vec<(u32, Backend)> = ids
            .into_iter()
            .filter_map(|id| self.backends.get(&id, 0).ok().map(|b| (id, b)))
            .collect();
        let ports: Vec<(u32, u32)> = (0..names::PORT_WORDS)
            .filter_map(|w| {
                self.ports
                    .get(&w, 0)
                    .ok()
                    .filter(|b| *b != 0)
                    .map(|b| (w, b))
            })
            .collect();
        crate::tables::Tables::adopt(&fes, &slots, &bes, &ports)
    }

    /// Sum of a per-CPU stats slot.
    pub fn sum_stats(map: &PerCpuArray<MapData, TrafficStats>, idx: u32) -> TrafficStats {
        let mut total = TrafficStats::default();
        if let Ok(v) = map.get(&idx, 0) {
            for s in v.iter() {
                total.add(s);
            }
        }
        total
    }

    pub fn service_stats(&self, svc_id: u32) -> TrafficStats {
        Self::sum_stats(&self.svc_stats, svc_id)
    }

    pub fn backend_stats(&self, id: u32) -> TrafficStats {
        Self::sum_stats(&self.be_stats, id)
    }

    /// Packets per verdict reason (summed over CPUs), by name.
    pub fn verdicts(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let n = self
                .verdicts
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            out.insert(*name, n);
        }
        out
    }

    /// Number of live conntrack entries (both directions), TCP and UDP.
    pub fn conntrack_lens(&self) -> [usize; 2] {
        [&self.ct_tcp, &self.ct_udp].map(|m| m.keys().filter(|k| k.is_ok()).count())
    }

    /// Number of live conntrack entries (both directions) of both protocols.
    pub fn conntrack_len(&self) -> usize {
        self.conntrack_lens().iter().sum()
    }

    /// The conntrack table of `proto` ([`mesh_common::proto`]).
    pub fn conntrack(&mut self, proto: u8) -> &mut HashMap<MapData, CtKey, CtEntry> {
        if proto == mesh_common::proto::UDP {
            &mut self.ct_udp
        } else {
            &mut self.ct_tcp
        }
    }
}

fn zero_backend() -> Backend {
    Backend {
        addr: 0,
        port: 0,
        flags: 0,
        ifindex: 0,
        mac: [0; 6],
        smac: [0; 6],
        svc_id: 0,
        _pad: 0,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
