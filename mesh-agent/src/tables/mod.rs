//! Load-balancer tables, computed purely from a state snapshot (no kernel access), and the
//! diff that turns "what is programmed" into "what should be" as an ordered list of map
//! operations.
//!
//! Vocabulary (as in `ipvsadm`): a *frontend* is a virtual service — a published port on the
//! node's addresses, or later a VIP:port — and a *backend* is a real server, one running
//! task's address and target port. Each frontend has a svc id and `count` slots; each slot
//! holds a backend id.
//!
//! Ordering guarantees of [`Tables::apply`] (the data path reads the maps while they change):
//! a slot never points at a backend id before that backend is written; a frontend's count
//! never exceeds its written slots; a removed backend is deactivated only after no slot
//! points at it any more; ids freed in one diff are reused only in a later one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use mesh_common::{Backend, Frontend, FrontendKey, SlotKey, be_flags, fe_flags, maps};

use crate::model::{Protocol, State};

/// How this node reaches a local task on one network: filled in by the attach layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalLink {
    /// Host-side veth of the task on that network.
    pub ifindex: u32,
    /// MAC of the task's interface.
    pub task_mac: [u8; 6],
    /// MAC of the network's bridge (the task's gateway).
    pub gw_mac: [u8; 6],
}

/// (task id, network name) → link, for the tasks attached on this node.
pub type LocalLinks = HashMap<(String, String), LocalLink>;

/// A frontend as the state asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: FeProto,
    pub flags: u32,
    /// For a VIP: its network's id (the VNI); 0 for published ports.
    pub net_id: u32,
    /// In round-robin order.
    pub backends: Vec<BackendSpec>,
}

/// A backend as the state asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub task_id: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `None`: reached through the kernel's routing (e.g. over an overlay).
    pub link: Option<LinkKey>,
}

/// What identifies a backend in the maps (and survives an agent restart): where it is and
/// how it is reached, not which task it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BeKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub link: Option<LinkKey>,
}

impl BackendSpec {
    pub fn key(&self) -> BeKey {
        BeKey {
            addr: self.addr,
            port: self.port,
            link: self.link,
        }
    }
}

/// [`LocalLink`] in a hashable, ordered form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkKey {
    pub ifindex: u32,
    pub task_mac: [u8; 6],
    pub gw_mac: [u8; 6],
}

impl From<LocalLink> for LinkKey {
    fn from(l: LocalLink) -> Self {
        LinkKey {
            ifindex: l.ifindex,
            task_mac: l.task_mac,
            gw_mac: l.gw_mac,
        }
    }
}

/// The protocol(s) of a frontend. A VIP balances TCP and UDP alike: one frontend (one svc
/// id, one backend set, one round-robin cursor) under two map keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FeProto {
    Tcp,
    Udp,
    Both,
}

impl FeProto {
    pub fn as_str(self) -> &'static str {
        match self {
            FeProto::Tcp => "tcp",
            FeProto::Udp => "udp",
            FeProto::Both => "tcp+udp",
        }
    }

    fn numbers(self) -> &'static [u8] {
        match self {
            FeProto::Tcp => &[mesh_common::proto::TCP],
            FeProto::Udp => &[mesh_common::proto::UDP],
            FeProto::Both => &[mesh_common::proto::TCP, mesh_common::proto::UDP],
        }
    }
}

impl From<Protocol> for FeProto {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => FeProto::Tcp,
            Protocol::Udp => FeProto::Udp,
        }
    }
}

/// Identity of a frontend: what the client addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeId {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: FeProto,
}

impl FeId {
    /// The map keys of this frontend (two for a TCP+UDP VIP).
    pub fn keys(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.protocol.numbers().iter().map(|p| FrontendKey {
            addr: u32::from_ne_bytes(self.addr.octets()),
            port: self.port.to_be(),
            proto: *p,
            _pad: 0,
        })
    }
}

/// Which tasks can be backends on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only tasks attached on this node (single node, no overlay yet).
    LocalOnly,
    /// Every running task; remote ones through the kernel's routes (overlays).
    Cluster,
    /// Every running task, all through the kernel's routes: someone else (Docker) owns the
    /// tasks' interfaces, local ones included.
    Routed,
}

/// Is `task` a backend this node can reach on `network`, and how?
fn reachable(
    task: &crate::model::Task,
    network: &str,
    node: &str,
    links: &LocalLinks,
    reach: Reach,
) -> Option<Option<LinkKey>> {
    let link = links.get(&(task.id.clone(), network.to_string())).copied();
    match (task.node == node, link, reach) {
        (_, _, Reach::Routed) => Some(None),
        (true, Some(l), _) => Some(Some(l.into())),
        (true, None, _) => None, // attach failed: not reachable from here
        (false, _, Reach::Cluster) => Some(None),
        (false, _, Reach::LocalOnly) => None,
    }
}

/// The tables a snapshot asks for on `node`: published ports (on any node address, to the
/// tasks' addresses on the service's ingress network, target port) and service VIPs (per
/// network, every port, TCP and UDP, to the tasks' addresses on that network).
pub fn desired(
    state: &State,
    node: &str,
    links: &LocalLinks,
    reach: Reach,
) -> BTreeMap<FeId, FrontendSpec> {
    let mut out = BTreeMap::new();
    let by_service = state.running_tasks_by_service();
    for svc in state.services.values() {
        let running = by_service
            .get(svc.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        service_frontends(state, svc, running, node, links, reach, &mut out);
    }
    out
}

/// The frontends of one service (`running`: its running tasks in slot order).
fn service_frontends(
    state: &State,
    svc: &crate::model::Service,
    running: &[&crate::model::Task],
    node: &str,
    links: &LocalLinks,
    reach: Reach,
    out: &mut BTreeMap<FeId, FrontendSpec>,
) {
    // Published ports.
    if let Some(net) = svc.ingress_network() {
        for port in &svc.ports {
            let backends = running
                .iter()
                .filter_map(|task| {
                    let addr = task.address_on(net)?;
                    let link = reachable(task, net, node, links, reach)?;
                    Some(BackendSpec {
                        task_id: task.id.clone(),
                        addr,
                        port: port.target,
                        link,
                    })
                })
                .collect();
            let id = FeId {
                addr: Ipv4Addr::UNSPECIFIED,
                port: port.published,
                protocol: port.protocol.into(),
            };
            out.insert(
                id,
                FrontendSpec {
                    service: svc.name.clone(),
                    addr: Ipv4Addr::UNSPECIFIED,
                    port: port.published,
                    protocol: port.protocol.into(),
                    flags: fe_flags::PUBLISHED,
                    net_id: 0,
                    backends,
                },
            );
        }
    }
    // VIPs: every port of the VIP goes to the same port of a task (port 0 = keep).
    for sn in &svc.networks {
        let (Some(vip), Some(net)) = (sn.vip, state.networks.get(&sn.network)) else {
            continue;
        };
        let backends: Vec<BackendSpec> = running
            .iter()
            .filter_map(|task| {
                let addr = task.address_on(&sn.network)?;
                let link = reachable(task, &sn.network, node, links, reach)?;
                Some(BackendSpec {
                    task_id: task.id.clone(),
                    addr,
                    port: 0,
                    link,
                })
            })
            .collect();
        let id = FeId {
            addr: vip,
            port: 0,
            protocol: FeProto::Both,
        };
        out.insert(
            id,
            FrontendSpec {
                service: svc.name.clone(),
                addr: vip,
                port: 0,
                protocol: FeProto::Both,
                flags: fe_flags::VIP,
                net_id: net.vni,
                backends,
            },
        );
    }
}

/// Docker's ingress sandbox as this node sees it: the address Docker would DNAT published
/// ports to, and the veth that leads into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngressSandbox {
    /// The sandbox's address on Docker's gateway bridge.
    pub addr: Ipv4Addr,
    /// Host-side veth of the sandbox's gateway-bridge interface, its MAC inside, and the
    /// gateway bridge's MAC.
    pub link: LinkKey,
}

/// Two-stage published ports under Docker (whose own DNAT into the sandbox needs IPVS and is
/// missing): on the node, a published port balances to the ingress sandbox (one local
/// backend: redirect into its veth, reverse NAT on the way back); in the sandbox, the same
/// port on the sandbox's own address balances to the tasks (SNAT, as Swarm does).
pub fn via_ingress_sandbox(
    want: BTreeMap<FeId, FrontendSpec>,
    sbox: &IngressSandbox,
) -> BTreeMap<FeId, FrontendSpec> {
    let mut out = BTreeMap::new();
    for (id, spec) in want {
        if !id.addr.is_unspecified() || spec.flags & fe_flags::PUBLISHED == 0 {
            out.insert(id, spec);
            continue;
        }
        let inner = FeId {
            addr: sbox.addr,
            ..id
        };
        let to_sbox = BackendSpec {
            task_id: "ingress-sbox".into(),
            addr: sbox.addr,
            port: id.port,
            link: Some(sbox.link),
        };
        out.insert(
            inner,
            FrontendSpec {
                addr: sbox.addr,
                ..spec.clone()
            },
        );
        out.insert(
            id,
            FrontendSpec {
                backends: vec![to_sbox],
                ..spec
            },
        );
    }
    out
}

/// One write to the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    /// Write a backend (new, or changed link).
    SetBackend {
        id: u32,
        value: Backend,
    },
    /// Zero a svc id's round-robin cursor and counters (a fresh or recycled id).
    ResetService {
        svc_id: u32,
    },
    /// Zero a backend id's counters (a fresh or recycled id).
    ResetBackendStats {
        id: u32,
    },
    SetSlot {
        svc_id: u32,
        slot: u32,
        backend_id: u32,
    },
    SetFrontend {
        key: FrontendKey,
        value: Frontend,
    },
    DeleteFrontend {
        key: FrontendKey,
    },
    DeleteSlot {
        svc_id: u32,
        slot: u32,
    },
    /// Mark a backend inactive (zeroed): flows still pointing at it re-balance.
    ClearBackend {
        id: u32,
    },
    /// Replace one 32-port word of the ports bitmap.
    SetPortWord {
        word: u32,
        bits: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TablesError {
    #[error("too many frontends: the map holds {max}")]
    FrontendsFull { max: u32 },
    #[error("too many backends: the map holds {max}")]
    BackendsFull { max: u32 },
}

/// A programmed frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgFrontend {
    pub svc_id: u32,
    pub spec: FrontendSpec,
    /// Backend id per slot (slot n at index n-1).
    pub slots: Vec<u32>,
}

/// What the agent believes is in the maps, with the ids it handed out.
#[derive(Debug, Default, Clone)]
pub struct Tables {
    frontends: BTreeMap<FeId, ProgFrontend>,
    /// (svc id, backend key) → backend id.
    backends: HashMap<(u32, BeKey), u32>,
    free_svc: BTreeSet<u32>,
    next_svc: u32,
    free_be: BTreeSet<u32>,
    next_be: u32,
    ports: BTreeMap<u32, u32>,
    /// Port ranges (inclusive) always marked in the ports bitmap: the SNAT range, whose
    /// replies must reach conntrack on the packet path.
    reserved: Vec<(u16, u16)>,
    /// The maps were created empty with these tables: an id handed out for the first time
    /// has zero counters already (only a recycled id needs its counters reset).
    fresh: bool,
}

/// A backend's map value.
pub fn backend_value(svc_id: u32, b: &BackendSpec) -> Backend {
    let (flags, ifindex, mac, smac) = match b.link {
        Some(l) => (
            be_flags::ACTIVE | be_flags::LOCAL,
            l.ifindex,
            l.task_mac,
            l.gw_mac,
        ),
        None => (be_flags::ACTIVE, 0, [0; 6], [0; 6]),
    };
    Backend {
        addr: u32::from_ne_bytes(b.addr.octets()),
        port: b.port.to_be(),
        flags,
        ifindex,
        mac,
        smac,
        svc_id,
        _pad: 0,
    }
}

impl Tables {
    /// Tables for freshly created (empty) maps.
    pub fn new() -> Self {
        Tables {
            next_svc: 1,
            next_be: 1,
            fresh: true,
            ..Default::default()
        }
    }

    /// Keep `min..=max` marked in the ports bitmap from the next diff on.
    pub fn reserve_ports(&mut self, min: u16, max: u16) {
        self.reserved.push((min, max));
    }

    pub fn frontends(&self) -> impl Iterator<Item = (&FeId, &ProgFrontend)> {
        self.frontends.iter()
    }

    /// (backend id, svc id, spec) of every programmed backend, for status output.
    pub fn backends(&self) -> impl Iterator<Item = (u32, u32, &BackendSpec)> {
        self.frontends.values().flat_map(|pf| {
            pf.spec
                .backends
                .iter()
                .zip(pf.slots.iter())
                .map(move |(b, id)| (*id, pf.svc_id, b))
        })
    }

    /// Rebuild the programmed view from maps a previous agent left pinned, so that ids of
    /// unchanged frontends and backends are kept and the flows in conntrack stay valid.
    /// Entries of the old maps that the next diff does not want are listed in the returned
    /// tables and removed by it.
    pub fn adopt(
        frontends: &[(FrontendKey, Frontend)],
        slots: &[(SlotKey, u32)],
        backends: &[(u32, Backend)],
        ports: &[(u32, u32)],
    ) -> Tables {
        let mut t = Tables::new();
        t.fresh = false;
        let be_by_id: HashMap<u32, &Backend> = backends.iter().map(|(id, b)| (*id, b)).collect();
        let mut slots_by_svc: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for (s, b) in slots {
            slots_by_svc.entry(s.svc_id).or_default().push((s.slot, *b));
        }
        // One frontend per svc id: a VIP's TCP and UDP keys share theirs.
        let mut by_svc: BTreeMap<u32, (FrontendKey, Frontend, FeProto)> = BTreeMap::new();
        for (k, fe) in frontends {
            let p = if k.proto == mesh_common::proto::UDP {
                FeProto::Udp
            } else {
                FeProto::Tcp
            };
            by_svc
                .entry(fe.svc_id)
                .and_modify(|e| {
                    if e.2 != p {
                        e.2 = FeProto::Both;
                    }
                })
                .or_insert((*k, *fe, p));
        }
        let mut max_svc = 0;
        let mut max_be = 0;
        for (k, fe, protocol) in by_svc.values() {
            let id = FeId {
                addr: Ipv4Addr::from(k.addr.to_ne_bytes()),
                port: u16::from_be(k.port),
                protocol: *protocol,
            };
            let mut ids: Vec<(u32, u32)> = slots_by_svc
                .get(&fe.svc_id)
                .map(|v| {
                    v.iter()
                        .filter(|(slot, _)| *slot >= 1 && *slot <= fe.count)
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            ids.sort();
            let mut specs = Vec::new();
            let mut slot_ids = Vec::new();
            for (_, bid) in ids {
                let Some(b) = be_by_id.get(&bid) else {
                    continue;
                };
                if b.flags & be_flags::ACTIVE == 0 {
                    continue;
                }
                let spec = BackendSpec {
                    task_id: String::new(),
                    addr: Ipv4Addr::from(b.addr.to_ne_bytes()),
                    port: u16::from_be(b.port),
                    link: (b.flags & be_flags::LOCAL != 0).then_some(LinkKey {
                        ifindex: b.ifindex,
                        task_mac: b.mac,
                        gw_mac: b.smac,
                    }),
                };
                t.backends.insert((fe.svc_id, spec.key()), bid);
                max_be = max_be.max(bid);
                specs.push(spec);
                slot_ids.push(bid);
            }
            max_svc = max_svc.max(fe.svc_id);
            t.frontends.insert(
                id,
                ProgFrontend {
                    svc_id: fe.svc_id,
                    spec: FrontendSpec {
                        service: String::new(),
                        addr: id.addr,
                        port: id.port,
                        protocol: id.protocol,
                        flags: fe.flags,
                        net_id: fe.net_id,
                        backends: specs,
                    },
                    slots: slot_ids,
                },
            );
        }
        t.next_svc = max_svc + 1;
        t.next_be = max_be + 1;
        let used_svc: BTreeSet<u32> = t.frontends.values().map(|f| f.svc_id).collect();
        t.free_svc = (1..t.next_svc).filter(|i| !used_svc.contains(i)).collect();
        let used_be: BTreeSet<u32> = t.backends.values().copied().collect();
        t.free_be = (1..t.next_be).filter(|i| !used_be.contains(i)).collect();
        t.ports = ports.iter().filter(|(_, b)| *b != 0).copied().collect();
        t
    }

    /// A svc id, and whether its counters may hold a previous owner's values.
    fn alloc_svc(&mut self) -> Result<(u32, bool), TablesError> {
        if let Some(id) = self.free_svc.pop_first() {
            return Ok((id, true));
        }
        if self.next_svc >= maps::MAX_SERVICES {
            return Err(TablesError::FrontendsFull {
                max: maps::MAX_SERVICES - 1,
            });
        }
        self.next_svc += 1;
        Ok((self.next_svc - 1, !self.fresh))
    }

    /// A backend id, and whether its counters may hold a previous owner's values.
    fn alloc_be(&mut self) -> Result<(u32, bool), TablesError> {
        if let Some(id) = self.free_be.pop_first() {
            return Ok((id, true));
        }
        if self.next_be >= maps::MAX_BACKENDS {
            return Err(TablesError::BackendsFull {
                max: maps::MAX_BACKENDS - 1,
            });
        }
        self.next_be += 1;
        Ok((self.next_be - 1, !self.fresh))
    }

    /// Compute the operations that turn the programmed tables into `want`, and record `want`
    /// as programmed. On error nothing is recorded and no op should be applied.
    pub fn apply(
        &mut self,
        want: &BTreeMap<FeId, FrontendSpec>,
    ) -> Result<Vec<MapOp>, TablesError> {
        let mut changes: Vec<(FeId, Option<&FrontendSpec>)> = self
            .frontends
            .keys()
            .filter(|k| !want.contains_key(k))
            .map(|k| (*k, None))
            .collect();
        changes.extend(
            want.iter()
                .filter(|(id, spec)| self.frontends.get(id).map(|pf| &pf.spec) != Some(*spec))
                .map(|(id, spec)| (*id, Some(spec))),
        );
        self.apply_changes(&changes)
    }

    /// Like [`Tables::apply`] for just the frontends that changed (`None`: removed): the cost
    /// follows the size of the change, not of the tables.
    pub fn apply_changes(
        &mut self,
        changes: &[(FeId, Option<&FrontendSpec>)],
    ) -> Result<Vec<MapOp>, TablesError> {
        self.check_capacity(changes)?;
        let mut d = Delta::default();
        // Removals first: their ids are freed for the next diff only.
        for (id, spec) in changes {
            if spec.is_none() {
                self.remove_frontend(id, &mut d);
            }
        }
        for (id, spec) in changes {
            if let Some(spec) = spec {
                self.upsert_frontend(id, spec, &mut d)?;
            }
        }
        let port_ops = self.port_ops();
        self.free_svc.extend(d.freed_svc);
        self.free_be.extend(d.freed_be);
        // New ports must be wanted before their frontends exist; stale ones cleared last.
        let (port_adds, port_clears): (Vec<_>, Vec<_>) = port_ops
            .into_iter()
            .partition(|op| matches!(op, MapOp::SetPortWord { bits, .. } if *bits != 0));
        let mut ops = port_adds;
        ops.extend(d.adds);
        ops.extend(d.removes);
        ops.extend(port_clears);
        Ok(ops)
    }

    /// Refuse a change that could run out of ids before touching anything (an upper bound:
    /// every backend of a changed frontend counted as new).
    fn check_capacity(&self, changes: &[(FeId, Option<&FrontendSpec>)]) -> Result<(), TablesError> {
        let new_fe = changes
            .iter()
            .filter(|(id, spec)| spec.is_some() && !self.frontends.contains_key(id))
            .count();
        let free_svc = self.free_svc.len() + (maps::MAX_SERVICES - self.next_svc) as usize;
        if new_fe > free_svc {
            return Err(TablesError::FrontendsFull {
                max: maps::MAX_SERVICES - 1,
            });
        }
        let new_be: usize = changes
            .iter()
            .filter_map(|(_, s)| s.map(|s| s.backends.len()))
            .sum();
        let free_be = self.free_be.len() + (maps::MAX_BACKENDS - self.next_be) as usize;
        if new_be > free_be {
            // Exact count before giving up: most backends of a changed frontend are kept.
            let exact: usize = changes
                .iter()
                .filter_map(|(id, s)| {
                    let s = (*s)?;
                    let svc = self.frontends.get(id).map(|pf| pf.svc_id);
                    Some(
                        s.backends
                            .iter()
                            .filter(|b| {
                                svc.is_none_or(|svc| !self.backends.contains_key(&(svc, b.key())))
                            })
                            .count(),
                    )
                })
                .sum();
            if exact > free_be {
                return Err(TablesError::BackendsFull {
                    max: maps::MAX_BACKENDS - 1,
                });
            }
        }
        Ok(())
    }

    fn remove_frontend(&mut self, id: &FeId, d: &mut Delta) {
        let Some(pf) = self.frontends.remove(id) else {
            return;
        };
        d.removes
            .extend(id.keys().map(|key| MapOp::DeleteFrontend { key }));
        for (i, _) in pf.slots.iter().enumerate() {
            d.removes.push(MapOp::DeleteSlot {
                svc_id: pf.svc_id,
                slot: i as u32 + 1,
            });
        }
        for b in &pf.spec.backends {
            if let Some(bid) = self.backends.remove(&(pf.svc_id, b.key())) {
                d.removes.push(MapOp::ClearBackend { id: bid });
                d.freed_be.push(bid);
            }
        }
        d.freed_svc.push(pf.svc_id);
    }

    fn upsert_frontend(
        &mut self,
        id: &FeId,
        spec: &FrontendSpec,
        d: &mut Delta,
    ) -> Result<(), TablesError> {
        let (svc_id, old_slots, old_spec) = match self.frontends.get(id) {
            Some(pf) if pf.spec == *spec => return Ok(()),
            Some(pf) => (pf.svc_id, pf.slots.clone(), Some(pf.spec.clone())),
            None => {
                let (svc_id, used) = self.alloc_svc()?;
                if used {
                    d.adds.push(MapOp::ResetService { svc_id });
                }
                (svc_id, Vec::new(), None)
            }
        };
        // Backend ids: keep those whose key is unchanged, allocate the rest.
        let mut slots = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let key = (svc_id, b.key());
            let bid = match self.backends.get(&key) {
                Some(&bid) => bid,
                None => {
                    let (bid, used) = self.alloc_be()?;
                    self.backends.insert(key, bid);
                    if used {
                        d.adds.push(MapOp::ResetBackendStats { id: bid });
                    }
                    d.adds.push(MapOp::SetBackend {
                        id: bid,
                        value: backend_value(svc_id, b),
                    });
                    bid
                }
            };
            slots.push(bid);
        }
        for (i, bid) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(bid) {
                d.adds.push(MapOp::SetSlot {
                    svc_id,
                    slot: i as u32 + 1,
                    backend_id: *bid,
                });
            }
        }
        let value = Frontend {
            svc_id,
            count: slots.len() as u32,
            flags: spec.flags,
            net_id: spec.net_id,
        };
        d.adds
            .extend(id.keys().map(|key| MapOp::SetFrontend { key, value }));
        for slot in slots.len()..old_slots.len() {
            d.removes.push(MapOp::DeleteSlot {
                svc_id,
                slot: slot as u32 + 1,
            });
        }
        if let Some(old) = old_spec {
            let keep: BTreeSet<BeKey> = spec.backends.iter().map(BackendSpec::key).collect();
            for b in &old.backends {
                if !keep.contains(&b.key())
                    && let Some(bid) = self.backends.remove(&(svc_id, b.key()))
                {
                    d.removes.push(MapOp::ClearBackend { id: bid });
                    d.freed_be.push(bid);
                }
            }
        }
        self.frontends.insert(
            *id,
            ProgFrontend {
                svc_id,
                spec: spec.clone(),
                slots,
            },
        );
        Ok(())
    }

    /// The ports bitmap, recomputed from the programmed frontends: ops for changed words.
    fn port_ops(&mut self) -> Vec<MapOp> {
        let mut ports: BTreeMap<u32, u32> = BTreeMap::new();
        let published = self
            .frontends
            .iter()
            .filter(|(_, pf)| pf.spec.flags & fe_flags::PUBLISHED != 0)
            .map(|(id, _)| id.port);
        let reserved = self.reserved.iter().flat_map(|(a, b)| *a..=*b);
        for p in published.chain(reserved) {
            *ports.entry(p as u32 >> 5).or_default() |= 1 << (p as u32 & 31);
        }
        let mut ops = Vec::new();
        for (w, bits) in &ports {
            if self.ports.get(w) != Some(bits) {
                ops.push(MapOp::SetPortWord {
                    word: *w,
                    bits: *bits,
                });
            }
        }
        for w in self.ports.keys() {
            if !ports.contains_key(w) {
                ops.push(MapOp::SetPortWord { word: *w, bits: 0 });
            }
        }
        self.ports = ports;
        ops
    }
}

/// Map operations of one diff, in the groups they are emitted in.
#[derive(Default)]
struct Delta {
    /// Backends, resets, slots, frontends.
    adds: Vec<MapOp>,
    /// Frontend deletes, slot deletes, backend clears.
    removes: Vec<MapOp>,
    freed_svc: Vec<u32>,
    freed_be: Vec<u32>,
}

/// The running tasks of one service, in (slot, id) order: the order of its backends.
type RunningSet = BTreeSet<(u32, Box<str>)>;

/// The desired frontends of the last snapshot, per service, so that the next snapshot
/// recomputes only the services it changed.
///
/// A one-task change costs one comparison of the two snapshots plus the work for the services
/// it touched. The comparison is O(tasks) — the sources (state file, Engine API polling)
/// deliver whole snapshots, not events, so finding what changed means comparing them — but it
/// reads only what the tables depend on and allocates only for what differs. Everything after
/// it follows the size of the change: the running tasks of each service are kept in an index
/// updated from the tasks that differ, so a changed service finds its tasks without regrouping
/// the cluster's.
#[derive(Default)]
pub struct DesiredCache {
    specs: BTreeMap<FeId, FrontendSpec>,
    by_service: HashMap<String, Vec<FeId>>,
    /// Running tasks per service of `prev` (what [`State::running_tasks_by_service`] groups,
    /// by id).
    running: HashMap<String, RunningSet>,
    prev: Option<std::sync::Arc<State>>,
    links: LocalLinks,
    inputs: Option<(String, Reach, Option<IngressSandbox>)>,
}

impl DesiredCache {
    /// Bring the cache to `state` and return the frontends that changed (`None`: removed),
    /// ready for [`Tables::apply_changes`].
    pub fn update(
        &mut self,
        state: &std::sync::Arc<State>,
        node: &str,
        links: &LocalLinks,
        reach: Reach,
        sbox: Option<&IngressSandbox>,
    ) -> Vec<(FeId, Option<FrontendSpec>)> {
        let same_inputs = self
            .inputs
            .as_ref()
            .is_some_and(|(n, r, s)| n == node && *r == reach && s.as_ref() == sbox);
        let prev = self
            .prev
            .clone()
            .filter(|prev| same_inputs && prev.networks == state.networks);
        let links_changed = self.links != *links;
        // Running tasks by service, when every service is recomputed (grouped in one pass).
        let mut grouped: Option<BTreeMap<&str, Vec<&crate::model::Task>>> = None;
        let services: Vec<String> = match &prev {
            Some(prev) => {
                let same = std::sync::Arc::ptr_eq(prev, state);
                if same && !links_changed {
                    return Vec::new();
                }
                let mut changed = BTreeSet::new();
                if !same {
                    let diff = diff_snapshots(prev, state);
                    for (before, after) in diff.tasks {
                        self.reindex(before, after);
                    }
                    changed = diff.services;
                }
                if links_changed {
                    link_changes(prev, state, &self.links, links, &mut changed);
                }
                changed.into_iter().map(str::to_string).collect()
            }
            None => {
                let by_service = state.running_tasks_by_service();
                self.running = by_service
                    .iter()
                    .map(|(svc, tasks)| {
                        let set = tasks
                            .iter()
                            .map(|t| (t.slot, Box::from(t.id.as_str())))
                            .collect();
                        (svc.to_string(), set)
                    })
                    .collect();
                grouped = Some(by_service);
                self.inputs = Some((node.to_string(), reach, sbox.copied()));
                let names: BTreeSet<String> = self
                    .by_service
                    .keys()
                    .cloned()
                    .chain(state.services.keys().cloned())
                    .collect();
                names.into_iter().collect()
            }
        };
        let mut changes = BTreeMap::new();
        let mut buf: Vec<&crate::model::Task> = Vec::new();
        for name in services {
            for id in self.by_service.remove(&name).unwrap_or_default() {
                self.specs.remove(&id);
                changes.insert(id, None);
            }
            let Some(svc) = state.services.get(&name) else {
                continue;
            };
            let running: &[&crate::model::Task] = match &grouped {
                Some(g) => g.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]),
                None => {
                    buf.clear();
                    if let Some(set) = self.running.get(&name) {
                        buf.extend(set.iter().filter_map(|(_, id)| state.tasks.get(&**id)));
                    }
                    &buf
                }
            };
            let mut one = BTreeMap::new();
            service_frontends(state, svc, running, node, links, reach, &mut one);
            if let Some(sb) = sbox {
                one = via_ingress_sandbox(one, sb);
            }
            let ids: Vec<FeId> = one.keys().copied().collect();
            for (id, spec) in one {
                changes.insert(id, Some(spec.clone()));
                self.specs.insert(id, spec);
            }
            if !ids.is_empty() {
                self.by_service.insert(name, ids);
            }
        }
        if links_changed {
            self.links = links.clone();
        }
        // The previous snapshot is released here unless the caller still holds it (the
        // agent does, until the maps are programmed).
        self.prev = Some(state.clone());
        changes.into_iter().collect()
    }

    /// Every desired frontend (what [`desired`] would return).
    pub fn all(&self) -> &BTreeMap<FeId, FrontendSpec> {
        &self.specs
    }

    /// Move one task in the running index: `before` and `after` are its two versions (`None`:
    /// absent from that snapshot).
    fn reindex(&mut self, before: Option<&crate::model::Task>, after: Option<&crate::model::Task>) {
        if let Some(t) = before.filter(|t| t.state.is_running())
            && let Some(set) = self.running.get_mut(t.service.as_str())
        {
            set.remove(&(t.slot, Box::from(t.id.as_str())));
            if set.is_empty() {
                self.running.remove(t.service.as_str());
            }
        }
        if let Some(t) = after.filter(|t| t.state.is_running()) {
            self.running
                .entry(t.service.clone())
                .or_default()
                .insert((t.slot, Box::from(t.id.as_str())));
        }
    }

    /// The running-task index as (service, task ids in backend order), for tests.
    #[cfg(test)]
    fn running_index(&self) -> BTreeMap<String, Vec<String>> {
        self.running
            .iter()
            .map(|(s, set)| {
                (
                    s.clone(),
                    set.iter().map(|(_, id)| id.to_string()).collect(),
                )
            })
            .collect()
    }
}

/// What differs between two snapshots, as far as the tables can tell.
#[derive(Default)]
struct SnapshotDiff<'a> {
    /// Services whose frontends may differ: their definition changed, or a task that is (or
    /// was) one of their running tasks.
    services: BTreeSet<&'a str>,
    /// The tasks that differ, (before, after); `None`: absent on that side.
    tasks: Vec<(
        Option<&'a crate::model::Task>,
        Option<&'a crate::model::Task>,
    )>,
}

/// `f(a, b)` for every key whose value differs between two snapshots' maps (`None`: absent
/// on that side). `OrdMap::diff` skips the subtrees the two share, so on snapshots built on
/// top of each other ([`State::rebase`]) this costs what changed, not the map's size.
fn merge_join<'a, V: PartialEq + Clone>(
    a: &'a crate::model::OrdMap<String, V>,
    b: &'a crate::model::OrdMap<String, V>,
    mut f: impl FnMut(Option<&'a V>, Option<&'a V>),
) {
    use imbl::ordmap::DiffItem;
    for d in a.diff(b) {
        match d {
            DiffItem::Add(_, v) => f(None, Some(v)),
            DiffItem::Remove(_, v) => f(Some(v), None),
            DiffItem::Update { old, new } => f(Some(old.1), Some(new.1)),
        }
    }
}

/// Are two versions of a task (same id) the same backend, or the same non-backend? Only what
/// [`service_frontends`] reads counts (not the netns or resolv.conf paths), cheapest first;
/// tasks that are not running are no backends whatever else they say.
fn same_for_tables(a: &crate::model::Task, b: &crate::model::Task) -> bool {
    let running = a.state.is_running();
    if running != b.state.is_running() {
        return false;
    }
    if !running {
        return true;
    }
    // The ids are equal: they are the keys both were found under.
    a.slot == b.slot
        && a.networks.len() == b.networks.len()
        && a.node.len() == b.node.len()
        && a.service.len() == b.service.len()
        && a.networks
            .iter()
            .zip(&b.networks)
            .all(|(x, y)| x.address == y.address)
        && a.node == b.node
        && a.service == b.service
        && a.networks
            .iter()
            .zip(&b.networks)
            .all(|(x, y)| x.network == y.network)
}

/// Are two versions of a service (same name) the same? Cheapest first.
fn same_service(a: &crate::model::Service, b: &crate::model::Service) -> bool {
    // The names are equal: they are the keys both were found under.
    a.endpoint_mode == b.endpoint_mode
        && a.ports == b.ports
        && a.networks.len() == b.networks.len()
        && a.networks
            .iter()
            .zip(&b.networks)
            .all(|(x, y)| x.vip == y.vip)
        && a.networks == b.networks
}

/// Services and tasks that differ between two snapshots (see [`SnapshotDiff`]). This is the
/// part of an update that follows the size of the cluster (every task is compared), kept out
/// of line so that profiles name it.
#[inline(never)]
fn diff_snapshots<'a>(prev: &'a State, next: &'a State) -> SnapshotDiff<'a> {
    let mut d = SnapshotDiff::default();
    merge_join(&prev.services, &next.services, |a, b| match (a, b) {
        (Some(a), Some(b)) if same_service(a, b) => {
            debug_assert_eq!(a.name, b.name, "services are keyed by name")
        }
        (a, b) => d.services.extend(a.or(b).map(|s| s.name.as_str())),
    });
    merge_join(&prev.tasks, &next.tasks, |a, b| {
        if let (Some(a), Some(b)) = (a, b) {
            debug_assert_eq!(a.id, b.id, "tasks are keyed by id");
            if same_for_tables(a, b) {
                return;
            }
        }
        let (a, b) = (
            a.filter(|t| t.state.is_running()),
            b.filter(|t| t.state.is_running()),
        );
        if a.is_none() && b.is_none() {
            return; // added or removed, but never a backend
        }
        d.services
            .extend(a.iter().chain(b.iter()).map(|t| t.service.as_str()));
        d.tasks.push((a, b));
    });
    d
}

/// Add the services of the tasks whose link changed (re-attached, detached) to `out`.
fn link_changes<'a>(
    prev: &'a State,
    next: &'a State,
    prev_links: &LocalLinks,
    links: &LocalLinks,
    out: &mut BTreeSet<&'a str>,
) {
    let keys: BTreeSet<&(String, String)> = links.keys().chain(prev_links.keys()).collect();
    for k in keys {
        if links.get(k) != prev_links.get(k) {
            for t in [prev.tasks.get(&k.0), next.tasks.get(&k.0)]
                .into_iter()
                .flatten()
            {
                out.insert(t.service.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        EndpointMode, Network, Node, PortSpec, Service, ServiceNetwork, Task, TaskNetwork,
        TaskState,
    };

    /// Service `web` with published 8080→80 and, with `vip`, a VIP on network `app`.
    fn state(tasks: &[(&str, u32, &str, TaskState, [u8; 4])]) -> State {
        state_vip(tasks, None)
    }

    fn state_vip(tasks: &[(&str, u32, &str, TaskState, [u8; 4])], vip: Option<Ipv4Addr>) -> State {
        let mut s = State::default();
        s.nodes.insert(
            "n1".into(),
            Node {
                name: "n1".into(),
                address: Ipv4Addr::new(198, 18, 0, 1),
            },
        );
        s.nodes.insert(
            "n2".into(),
            Node {
                name: "n2".into(),
                address: Ipv4Addr::new(198, 18, 0, 2),
            },
        );
        s.networks.insert(
            "app".into(),
            Network {
                name: "app".into(),
                subnet: "10.0.1.0/24".parse().unwrap(),
                vni: 4097,
                gateway: Ipv4Addr::new(10, 0, 1, 1),
            },
        );
        s.services.insert(
            "web".into(),
            Service {
                name: "web".into(),
                endpoint_mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "app".into(),
                    vip,
                    aliases: vec![],
                }],
                ports: vec![PortSpec {
                    published: 8080,
                    target: 80,
                    protocol: Protocol::Tcp,
                }],
            },
        );
        for (id, slot, node, st, a) in tasks {
            s.tasks.insert(
                id.to_string(),
                Task {
                    id: id.to_string(),
                    service: "web".into(),
                    slot: *slot,
                    node: node.to_string(),
                    state: *st,
                    netns: Some(format!("/run/netns/{id}").into()),
                    resolv_conf: None,
                    networks: vec![TaskNetwork {
                        network: "app".into(),
                        address: Ipv4Addr::from(*a),
                    }],
                },
            );
        }
        s
    }

    fn links(ids: &[&str]) -> LocalLinks {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    (id.to_string(), "app".to_string()),
                    LocalLink {
                        ifindex: 100 + i as u32,
                        task_mac: [2, 0x42, 10, 0, 1, i as u8],
                        gw_mac: [2, 0, 0, 0, 0, 1],
                    },
                )
            })
            .collect()
    }

    use TaskState::*;

    #[test]
    fn published_port_lists_running_local_tasks_in_slot_order() {
        let s = state(&[
            ("t3", 3, "n1", Running, [10, 0, 1, 13]),
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Failed, [10, 0, 1, 12]),
            ("t4", 4, "n2", Running, [10, 0, 1, 14]),
        ]);
        let d = desired(&s, "n1", &links(&["t1", "t2", "t3"]), Reach::LocalOnly);
        assert_eq!(d.len(), 1);
        let fe = d.values().next().unwrap();
        let ids: Vec<_> = fe.backends.iter().map(|b| b.task_id.as_str()).collect();
        assert_eq!(
            ids,
            ["t1", "t3"],
            "failed and remote tasks are not backends"
        );
        assert_eq!(fe.backends[0].port, 80);
        assert_eq!(fe.backends[0].link.unwrap().ifindex, 100);

        let d = desired(&s, "n1", &links(&["t1", "t3"]), Reach::Cluster);
        let ids: Vec<_> = d
            .values()
            .next()
            .unwrap()
            .backends
            .iter()
            .map(|b| b.task_id.as_str())
            .collect();
        assert_eq!(ids, ["t1", "t3", "t4"], "cluster reach adds remote tasks");
        assert!(d.values().next().unwrap().backends[2].link.is_none());
    }

    #[test]
    fn local_task_without_link_is_not_a_backend() {
        let s = state(&[("t1", 1, "n1", Running, [10, 0, 1, 11])]);
        let d = desired(&s, "n1", &LocalLinks::new(), Reach::LocalOnly);
        assert!(d.values().next().unwrap().backends.is_empty());
    }

    fn check_invariants(ops: &[MapOp]) {
        // Every slot written points at a backend written earlier in this op list or before.
        let mut cleared = BTreeSet::new();
        for op in ops {
            if let MapOp::ClearBackend { id } = op {
                cleared.insert(*id);
            }
            if let MapOp::SetSlot { backend_id, .. } = op {
                assert!(
                    !cleared.contains(backend_id),
                    "slot set to a cleared backend"
                );
            }
        }
    }

    #[test]
    fn first_program_orders_backends_slots_frontend() {
        let s = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
        ]);
        let mut t = Tables::new();
        let ops = t
            .apply(&desired(&s, "n1", &links(&["t1", "t2"]), Reach::LocalOnly))
            .unwrap();
        let pos = |f: &dyn Fn(&MapOp) -> bool| ops.iter().position(f).unwrap();
        let port = pos(&|o| matches!(o, MapOp::SetPortWord { .. }));
        let be = pos(&|o| matches!(o, MapOp::SetBackend { .. }));
        let slot = pos(&|o| matches!(o, MapOp::SetSlot { .. }));
        let fe = pos(&|o| matches!(o, MapOp::SetFrontend { .. }));
        assert!(port < fe && be < slot && slot < fe);
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, MapOp::SetSlot { .. }))
                .count(),
            2
        );
        match &ops[fe] {
            MapOp::SetFrontend { key, value } => {
                assert_eq!(value.count, 2);
                assert_eq!(key.addr, 0);
                assert_eq!(u16::from_be(key.port), 8080);
                assert_eq!(key.proto, 6);
            }
            _ => unreachable!(),
        }
        let word = 8080u32 >> 5;
        assert!(ops.contains(&MapOp::SetPortWord {
            word,
            bits: 1 << (8080 & 31)
        }));
        // Same state again: nothing to do.
        assert!(
            t.apply(&desired(&s, "n1", &links(&["t1", "t2"]), Reach::LocalOnly))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn scale_down_shrinks_count_before_deleting_slots_and_clears_backend_last() {
        let s3 = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
            ("t3", 3, "n1", Running, [10, 0, 1, 13]),
        ]);
        let l = links(&["t1", "t2", "t3"]);
        let mut t = Tables::new();
        t.apply(&desired(&s3, "n1", &l, Reach::LocalOnly)).unwrap();
        let s1 = state(&[
            ("t1", 1, "n1", Shutdown, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
            ("t3", 3, "n1", Failed, [10, 0, 1, 13]),
        ]);
        let ops = t.apply(&desired(&s1, "n1", &l, Reach::LocalOnly)).unwrap();
        check_invariants(&ops);
        let fe = ops
            .iter()
            .position(|o| matches!(o, MapOp::SetFrontend { value, .. } if value.count == 1))
            .unwrap();
        let del: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, MapOp::DeleteSlot { .. }))
            .map(|(i, _)| i)
            .collect();
        let clr: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, MapOp::ClearBackend { .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(del.len(), 2);
        assert_eq!(clr.len(), 2);
        assert!(del.iter().all(|&d| d > fe));
        assert!(clr.iter().all(|&c| c > fe));
        // Slot 1 now holds t2's backend (which kept its id).
        let t2_id = t.backends().find(|(_, _, b)| b.task_id == "t2").unwrap().0;
        assert!(ops.contains(&MapOp::SetSlot {
            svc_id: 1,
            slot: 1,
            backend_id: t2_id
        }));
    }

    #[test]
    fn scale_up_keeps_existing_ids_and_adds_new() {
        let l = links(&["t1", "t2", "t3", "t4", "t5"]);
        let mut t = Tables::new();
        t.apply(&desired(
            &state(&[("t1", 1, "n1", Running, [10, 0, 1, 11])]),
            "n1",
            &l,
            Reach::LocalOnly,
        ))
        .unwrap();
        let before: Vec<_> = t
            .backends()
            .map(|(id, _, b)| (id, b.task_id.clone()))
            .collect();
        let s5 = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
            ("t3", 3, "n1", Running, [10, 0, 1, 13]),
            ("t4", 4, "n1", Running, [10, 0, 1, 14]),
            ("t5", 5, "n1", Running, [10, 0, 1, 15]),
        ]);
        let ops = t.apply(&desired(&s5, "n1", &l, Reach::LocalOnly)).unwrap();
        check_invariants(&ops);
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, MapOp::SetBackend { .. }))
                .count(),
            4
        );
        assert!(
            !ops.iter()
                .any(|o| matches!(o, MapOp::SetSlot { slot: 1, .. })),
            "slot 1 unchanged"
        );
        assert!(
            !ops.iter().any(|o| matches!(o, MapOp::ResetService { .. })),
            "svc id kept"
        );
        let t1 = t.backends().find(|(_, _, b)| b.task_id == "t1").unwrap().0;
        assert_eq!(before[0], (t1, "t1".to_string()));
    }

    #[test]
    fn removed_service_frees_ids_for_the_next_diff_only() {
        let l = links(&["t1"]);
        let s = state(&[("t1", 1, "n1", Running, [10, 0, 1, 11])]);
        let mut t = Tables::new();
        t.apply(&desired(&s, "n1", &l, Reach::LocalOnly)).unwrap();
        let mut empty = s.clone();
        empty.services.clear();
        empty.tasks.clear();
        let ops = t
            .apply(&desired(&empty, "n1", &l, Reach::LocalOnly))
            .unwrap();
        let key = FeId {
            addr: Ipv4Addr::UNSPECIFIED,
            port: 8080,
            protocol: FeProto::Tcp,
        }
        .keys()
        .next()
        .unwrap();
        assert!(ops.contains(&MapOp::DeleteFrontend { key }));
        assert!(ops.contains(&MapOp::DeleteSlot { svc_id: 1, slot: 1 }));
        assert!(ops.contains(&MapOp::ClearBackend { id: 1 }));
        assert_eq!(
            ops.last(),
            Some(&MapOp::SetPortWord {
                word: 8080 >> 5,
                bits: 0
            })
        );
        // Re-adding reuses id 1 and resets its counters.
        let ops = t.apply(&desired(&s, "n1", &l, Reach::LocalOnly)).unwrap();
        assert!(ops.contains(&MapOp::ResetService { svc_id: 1 }));
        assert!(ops.contains(&MapOp::ResetBackendStats { id: 1 }));
    }

    #[test]
    fn changed_link_gets_new_backend() {
        let s = state(&[("t1", 1, "n1", Running, [10, 0, 1, 11])]);
        let mut t = Tables::new();
        t.apply(&desired(&s, "n1", &links(&["t1"]), Reach::LocalOnly))
            .unwrap();
        let mut l2 = links(&["t1"]);
        l2.values_mut().for_each(|l| l.ifindex = 999);
        let ops = t.apply(&desired(&s, "n1", &l2, Reach::LocalOnly)).unwrap();
        check_invariants(&ops);
        let set = ops
            .iter()
            .find_map(|o| match o {
                MapOp::SetBackend { value, .. } => Some(*value),
                _ => None,
            })
            .unwrap();
        assert_eq!(set.ifindex, 999);
        assert!(
            ops.iter()
                .any(|o| matches!(o, MapOp::ClearBackend { id: 1 }))
        );
    }

    #[test]
    fn adopted_tables_keep_ids_and_rewrite_without_removing() {
        let s = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
        ]);
        let l = links(&["t1", "t2"]);
        let mut t = Tables::new();
        let ops = t.apply(&desired(&s, "n1", &l, Reach::LocalOnly)).unwrap();
        // What the maps hold after those ops.
        let mut fes = Vec::new();
        let mut slots = Vec::new();
        let mut bes = Vec::new();
        let mut ports = Vec::new();
        for op in &ops {
            match op {
                MapOp::SetFrontend { key, value } => fes.push((*key, *value)),
                MapOp::SetSlot {
                    svc_id,
                    slot,
                    backend_id,
                } => slots.push((
                    SlotKey {
                        svc_id: *svc_id,
                        slot: *slot,
                    },
                    *backend_id,
                )),
                MapOp::SetBackend { id, value } => bes.push((*id, *value)),
                MapOp::SetPortWord { word, bits } => ports.push((*word, *bits)),
                _ => {}
            }
        }
        let mut adopted = Tables::adopt(&fes, &slots, &bes, &ports);
        let ops = adopted
            .apply(&desired(&s, "n1", &l, Reach::LocalOnly))
            .unwrap();
        assert!(
            ops.iter().all(|o| matches!(o, MapOp::SetFrontend { .. })),
            "only frontends rewritten (names were unknown): {ops:?}"
        );
        let ids: BTreeSet<u32> = adopted.backends().map(|(id, _, _)| id).collect();
        assert_eq!(
            ids,
            BTreeSet::from([1, 2]),
            "backend ids kept: live flows stay valid"
        );
        // Scaling after adoption allocates past the adopted ids.
        let s3 = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n1", Running, [10, 0, 1, 12]),
            ("t3", 3, "n1", Running, [10, 0, 1, 13]),
        ]);
        let ops = adopted
            .apply(&desired(
                &s3,
                "n1",
                &links(&["t1", "t2", "t3"]),
                Reach::LocalOnly,
            ))
            .unwrap();
        assert!(ops.contains(&MapOp::SetSlot {
            svc_id: 1,
            slot: 3,
            backend_id: 3
        }));
    }

    #[test]
    fn vip_frontends_forward_every_port_to_tasks_on_that_network() {
        let vip = Ipv4Addr::new(10, 0, 1, 2);
        let s = state_vip(
            &[
                ("t1", 1, "n1", Running, [10, 0, 1, 11]),
                ("t2", 2, "n2", Running, [10, 0, 1, 12]),
                ("t3", 3, "n1", Shutdown, [10, 0, 1, 13]),
            ],
            Some(vip),
        );
        let d = desired(&s, "n1", &links(&["t1"]), Reach::Cluster);
        let fe = &d[&FeId {
            addr: vip,
            port: 0,
            protocol: FeProto::Both,
        }];
        assert_eq!(fe.flags, fe_flags::VIP);
        assert_eq!(fe.net_id, 4097, "the network's VNI");
        let b: Vec<_> = fe
            .backends
            .iter()
            .map(|b| (b.task_id.as_str(), b.port, b.link.is_some()))
            .collect();
        assert_eq!(
            b,
            [("t1", 0, true), ("t2", 0, false)],
            "port 0 keeps the client's port"
        );
        // One svc id, one backend set, written under the TCP and the UDP key.
        let mut t0 = Tables::new();
        let ops = t0.apply(&d).unwrap();
        let vip_keys: Vec<(u8, u32)> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::SetFrontend { key, value }
                    if key.addr == u32::from_ne_bytes(vip.octets()) =>
                {
                    Some((key.proto, value.svc_id))
                }
                _ => None,
            })
            .collect();
        assert_eq!(vip_keys.len(), 2);
        assert_eq!(vip_keys[0].1, vip_keys[1].1);
        assert_ne!(vip_keys[0].0, vip_keys[1].0);
        // Single-node reach: only local tasks.
        let d = desired(&s, "n1", &links(&["t1"]), Reach::LocalOnly);
        assert_eq!(
            d[&FeId {
                addr: vip,
                port: 0,
                protocol: FeProto::Both
            }]
                .backends
                .len(),
            1
        );
        // VIP ports are not in the packet-path port bitmap (VIPs are balanced at the socket).
        let mut t = Tables::new();
        let ops = t.apply(&d).unwrap();
        let words: Vec<u32> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::SetPortWord { word, .. } => Some(*word),
                _ => None,
            })
            .collect();
        assert_eq!(words, [8080 >> 5]);
        // A reserved range (SNAT replies) is marked too, whole words included.
        t.reserve_ports(61_000, 61_063);
        let ops = t.apply(&d).unwrap();
        let set: Vec<(u32, u32)> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::SetPortWord { word, bits } => Some((*word, *bits)),
                _ => None,
            })
            .collect();
        assert_eq!(
            set,
            [
                (61_000 >> 5, 0xffff_ffff << (61_000 & 31)),
                (61_000 / 32 + 1, u32::MAX),
                (61_063 >> 5, (1u32 << ((61_063 & 31) + 1)) - 1)
            ]
        );
    }

    #[test]
    fn docker_ingress_sandbox_gets_two_stages() {
        let s = state(&[
            ("t1", 1, "n1", Running, [10, 0, 1, 11]),
            ("t2", 2, "n2", Running, [10, 0, 1, 12]),
        ]);
        let d = desired(&s, "n1", &LocalLinks::new(), Reach::Routed);
        let sbox = IngressSandbox {
            addr: Ipv4Addr::new(172, 17, 0, 2),
            link: LinkKey {
                ifindex: 11,
                task_mac: [2, 0x42, 172, 17, 0, 2],
                gw_mac: [2; 6],
            },
        };
        let d = via_ingress_sandbox(d, &sbox);
        let node = &d[&FeId {
            addr: Ipv4Addr::UNSPECIFIED,
            port: 8080,
            protocol: FeProto::Tcp,
        }];
        assert_eq!(node.backends.len(), 1);
        assert_eq!(
            (
                node.backends[0].addr,
                node.backends[0].port,
                node.backends[0].link
            ),
            (sbox.addr, 8080, Some(sbox.link))
        );
        let inner = &d[&FeId {
            addr: sbox.addr,
            port: 8080,
            protocol: FeProto::Tcp,
        }];
        assert_eq!(inner.flags, fe_flags::PUBLISHED);
        let tasks: Vec<_> = inner
            .backends
            .iter()
            .map(|b| (b.task_id.as_str(), b.port, b.link))
            .collect();
        assert_eq!(
            tasks,
            [("t1", 80, None), ("t2", 80, None)],
            "remote: SNAT through the kernel"
        );
        let mut t = Tables::new();
        let ops = t.apply(&d).unwrap();
        let words: BTreeSet<u32> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::SetPortWord { word, .. } => Some(*word),
                _ => None,
            })
            .collect();
        assert_eq!(words, BTreeSet::from([8080 >> 5]));
    }

    #[test]
    fn desired_cache_matches_a_full_recomputation_and_reports_only_changes() {
        use std::sync::Arc;
        let mut s = state_vip(
            &[
                ("t1", 1, "n1", Running, [10, 0, 1, 11]),
                ("t2", 2, "n2", Running, [10, 0, 1, 12]),
                ("t3", 3, "n1", Running, [10, 0, 1, 13]),
            ],
            Some(Ipv4Addr::new(10, 0, 1, 2)),
        );
        // A second service that the changes below do not touch.
        let mut other = s.services["web"].clone();
        other.name = "api".into();
        other.ports = vec![PortSpec {
            published: 9090,
            target: 90,
            protocol: Protocol::Tcp,
        }];
        other.networks[0].vip = Some(Ipv4Addr::new(10, 0, 1, 3));
        s.services.insert("api".into(), other);
        let l = links(&["t1", "t3"]);
        let mut cache = DesiredCache::default();
        let mut tables = Tables::new();
        let first = Arc::new(s.clone());
        let ch = cache.update(&first, "n1", &l, Reach::Cluster, None);
        assert_eq!(cache.all(), &desired(&first, "n1", &l, Reach::Cluster));
        let ops = tables
            .apply_changes(
                &ch.iter()
                    .map(|(id, sp)| (*id, sp.as_ref()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert!(!ops.is_empty());
        // The same snapshot again: nothing.
        assert!(
            cache
                .update(&first, "n1", &l, Reach::Cluster, None)
                .is_empty()
        );
        // One task of `web` stops: only web's frontends are reported.
        s.tasks.get_mut("t2").unwrap().state = Shutdown;
        let next = Arc::new(s.clone());
        let ch = cache.update(&next, "n1", &l, Reach::Cluster, None);
        assert!(
            !ch.is_empty()
                && ch
                    .iter()
                    .all(|(_, sp)| sp.as_ref().is_none_or(|sp| sp.service == "web")),
            "{ch:?}"
        );
        assert_eq!(cache.all(), &desired(&next, "n1", &l, Reach::Cluster));
        let ops = tables
            .apply_changes(
                &ch.iter()
                    .map(|(id, sp)| (*id, sp.as_ref()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        check_invariants(&ops);
        // Same result as diffing the whole desired state from scratch.
        let mut full = Tables::new();
        full.apply(&desired(&next, "n1", &l, Reach::Cluster))
            .unwrap();
        let norm = |t: &Tables| {
            t.frontends()
                .map(|(id, pf)| (*id, pf.spec.clone(), pf.slots.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(norm(&tables), norm(&full));
        // A link change (task re-attached) touches its service only.
        let mut l2 = l.clone();
        l2.get_mut(&("t1".to_string(), "app".to_string()))
            .unwrap()
            .ifindex = 555;
        let ch = cache.update(&next, "n1", &l2, Reach::Cluster, None);
        assert!(
            ch.iter()
                .all(|(_, sp)| sp.as_ref().is_none_or(|sp| sp.service == "web"))
        );
        assert_eq!(cache.all(), &desired(&next, "n1", &l2, Reach::Cluster));
        // A removed service goes away entirely.
        s.services.remove("api");
        let last = Arc::new(s.clone());
        let ch = cache.update(&last, "n1", &l2, Reach::Cluster, None);
        assert!(ch.iter().any(|(id, sp)| id.port == 9090 && sp.is_none()));
        assert_eq!(cache.all(), &desired(&last, "n1", &l2, Reach::Cluster));
    }

    /// Running task ids per service, grouped from scratch (the index must equal this).
    fn grouped_ids(s: &State) -> BTreeMap<String, Vec<String>> {
        s.running_tasks_by_service()
            .into_iter()
            .map(|(svc, ts)| (svc.to_string(), ts.iter().map(|t| t.id.clone()).collect()))
            .collect()
    }

    /// Frontends as programmed, ids aside.
    fn programmed(t: &Tables) -> Vec<(FeId, FrontendSpec, usize)> {
        t.frontends()
            .map(|(id, pf)| (*id, pf.spec.clone(), pf.slots.len()))
            .collect()
    }

    /// One update of `cache` (and `tables` from its changes) to `s`, checked against a
    /// from-scratch computation. Returns the services the reported changes belong to.
    fn update_and_check(
        cache: &mut DesiredCache,
        tables: &mut Tables,
        s: &std::sync::Arc<State>,
        l: &LocalLinks,
        reach: Reach,
        sbox: Option<&IngressSandbox>,
    ) -> BTreeSet<String> {
        let ch = cache.update(s, "n1", l, reach, sbox);
        let mut want = desired(s, "n1", l, reach);
        if let Some(sb) = sbox {
            want = via_ingress_sandbox(want, sb);
        }
        assert_eq!(cache.all(), &want, "cache = desired()");
        assert_eq!(
            cache.running_index(),
            grouped_ids(s),
            "index = running_tasks_by_service()"
        );
        let ops = tables
            .apply_changes(
                &ch.iter()
                    .map(|(id, sp)| (*id, sp.as_ref()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        check_invariants(&ops);
        let mut full = Tables::new();
        full.apply(&want).unwrap();
        assert_eq!(
            programmed(tables),
            programmed(&full),
            "incremental tables = tables from scratch"
        );
        // The services of the reported frontends ("-": a removed frontend).
        ch.iter()
            .map(|(_, sp)| sp.as_ref().map_or("-".to_string(), |sp| sp.service.clone()))
            .collect()
    }

    /// `web` (8080, VIP 10.0.1.2) and `api` (9090, VIP 10.0.1.3), both on `app`; tasks t1..t4
    /// of web, a1..a2 of api.
    fn two_services() -> State {
        let mut s = state_vip(
            &[
                ("t1", 1, "n1", Running, [10, 0, 1, 11]),
                ("t2", 2, "n2", Running, [10, 0, 1, 12]),
                ("t3", 3, "n1", Running, [10, 0, 1, 13]),
                ("t4", 4, "n2", Shutdown, [10, 0, 1, 14]),
            ],
            Some(Ipv4Addr::new(10, 0, 1, 2)),
        );
        let mut api = s.services["web"].clone();
        api.name = "api".into();
        api.ports = vec![PortSpec {
            published: 9090,
            target: 90,
            protocol: Protocol::Tcp,
        }];
        api.networks[0].vip = Some(Ipv4Addr::new(10, 0, 1, 3));
        s.services.insert("api".into(), api);
        for (id, slot, a) in [("a1", 1, 21), ("a2", 2, 22)] {
            let mut t = s.tasks["t1"].clone();
            t.id = id.into();
            t.service = "api".into();
            t.slot = slot;
            t.networks[0].address = Ipv4Addr::new(10, 0, 1, a);
            s.tasks.insert(id.into(), t);
        }
        s
    }

    #[test]
    fn desired_cache_index_follows_each_kind_of_change() {
        use std::sync::Arc;
        let mut s = two_services();
        let mut l = links(&["t1", "t3", "a1"]);
        let mut cache = DesiredCache::default();
        let mut tables = Tables::new();
        let r = Reach::Cluster;
        update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None);
        let web = BTreeSet::from(["web".to_string()]);
        let api = BTreeSet::from(["api".to_string()]);
        let web_order = |c: &DesiredCache| c.running_index()["web"].clone();
        assert_eq!(web_order(&cache), ["t1", "t2", "t3"]);

        // Add a task (slot 0 sorts first: backend order is (slot, id)).
        let mut t = s.tasks["t2"].clone();
        t.id = "t0".into();
        t.slot = 0;
        t.networks[0].address = Ipv4Addr::new(10, 0, 1, 10);
        s.tasks.insert("t0".into(), t);
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            web
        );
        assert_eq!(web_order(&cache), ["t0", "t1", "t2", "t3"]);
        // Same slot as another task: the id breaks the tie.
        s.tasks.get_mut("t0").unwrap().slot = 2;
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            web
        );
        assert_eq!(web_order(&cache), ["t1", "t0", "t2", "t3"]);
        // Remove it.
        s.tasks.remove("t0");
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            web
        );
        assert_eq!(web_order(&cache), ["t1", "t2", "t3"]);
        // State changes: stops, comes back, and a stopped task that changes stays unreported.
        s.tasks.get_mut("t2").unwrap().state = Failed;
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            web
        );
        assert_eq!(web_order(&cache), ["t1", "t3"]);
        s.tasks.get_mut("t4").unwrap().state = Running;
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            web
        );
        assert_eq!(web_order(&cache), ["t1", "t3", "t4"]);
        s.tasks.get_mut("t2").unwrap().state = Shutdown;
        s.tasks.get_mut("t2").unwrap().networks[0].address = Ipv4Addr::new(10, 0, 1, 99);
        assert!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None).is_empty()
        );
        // A field the tables do not read (the netns path): nothing.
        s.tasks.get_mut("t1").unwrap().netns = Some("/run/netns/elsewhere".into());
        assert!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None).is_empty()
        );
        // Move: the task is rescheduled on this node (new id, new address, a link).
        let mut t = s.tasks.remove("a2").unwrap();
        t.id = "a9".into();
        t.node = "n1".into();
        t.networks[0].address = Ipv4Addr::new(10, 0, 1, 29);
        s.tasks.insert("a9".into(), t);
        l.extend(links(&["a9"]).into_iter().map(|(k, mut v)| {
            v.ifindex = 909;
            (k, v)
        }));
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            api
        );
        assert_eq!(cache.running_index()["api"], ["a1", "a9"]);
        // Same node, another address (same id).
        s.tasks.get_mut("a1").unwrap().networks[0].address = Ipv4Addr::new(10, 0, 1, 31);
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            api
        );
        // A task changes service: both are recomputed.
        s.tasks.get_mut("t4").unwrap().service = "api".into();
        let both = update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None);
        assert_eq!(both, BTreeSet::from(["api".to_string(), "web".to_string()]));
        assert_eq!(cache.running_index()["api"], ["a1", "a9", "t4"]);
        // Service definition change: only that service.
        s.services.get_mut("api").unwrap().ports[0].target = 91;
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None),
            api
        );
        // Link change only, on the same snapshot.
        let same = Arc::new(s.clone());
        update_and_check(&mut cache, &mut tables, &same, &l, r, None);
        l.get_mut(&("t1".to_string(), "app".to_string()))
            .unwrap()
            .ifindex = 777;
        assert_eq!(
            update_and_check(&mut cache, &mut tables, &same, &l, r, None),
            web
        );
        assert!(update_and_check(&mut cache, &mut tables, &same, &l, r, None).is_empty());
        // Service removal (its tasks with it): its frontends go, its index entry too.
        s.services.remove("api");
        s.tasks = s
            .tasks
            .into_iter()
            .filter(|(_, t)| t.service != "api")
            .collect();
        let ch = update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None);
        assert_eq!(ch, BTreeSet::from(["-".to_string()]), "only removals");
        assert!(!cache.running_index().contains_key("api"));
        assert!(cache.all().values().all(|sp| sp.service == "web"));
        // Every task of the last service stops: the index empties.
        s.tasks = s
            .tasks
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    Task {
                        state: Shutdown,
                        ..t
                    },
                )
            })
            .collect();
        update_and_check(&mut cache, &mut tables, &Arc::new(s.clone()), &l, r, None);
        assert!(cache.running_index().is_empty());
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, keys: impl Iterator<Item = &'a String>) -> Option<String> {
            let v: Vec<&String> = keys.collect();
            (!v.is_empty()).then(|| v[self.below(v.len())].clone())
        }
    }

    #[test]
    fn desired_cache_equals_a_full_recomputation_over_random_changes() {
        use std::sync::Arc;
        let states = [Running, Running, Running, Shutdown, Failed, Starting];
        for (seed, reach, sbox) in [
            (1u64, Reach::Cluster, None),
            (2, Reach::LocalOnly, None),
            (
                3,
                Reach::Routed,
                Some(IngressSandbox {
                    addr: Ipv4Addr::new(172, 17, 0, 2),
                    link: LinkKey {
                        ifindex: 11,
                        task_mac: [2; 6],
                        gw_mac: [3; 6],
                    },
                }),
            ),
            (4, Reach::Cluster, None),
        ] {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
            let mut s = two_services();
            s.networks.insert(
                "db".into(),
                Network {
                    name: "db".into(),
                    subnet: "10.0.2.0/24".parse().unwrap(),
                    vni: 4098,
                    gateway: Ipv4Addr::new(10, 0, 2, 1),
                },
            );
            // `db`: dnsrr on two networks, no published port.
            s.services.insert(
                "db".into(),
                Service {
                    name: "db".into(),
                    endpoint_mode: EndpointMode::Dnsrr,
                    networks: vec![
                        ServiceNetwork {
                            network: "db".into(),
                            vip: None,
                            aliases: vec![],
                        },
                        ServiceNetwork {
                            network: "app".into(),
                            vip: None,
                            aliases: vec![],
                        },
                    ],
                    ports: vec![],
                },
            );
            let mut removed_services: Vec<Service> = Vec::new();
            let mut l = links(&["t1", "t3", "a1"]);
            let mut cache = DesiredCache::default();
            let mut tables = Tables::new();
            let mut snap = Arc::new(s.clone());
            let mut reach = reach;
            let mut next_id = 0u32;
            // Addresses are unique (as validated): 10.1.x.y, never reused.
            let mut next_addr = 0u32;
            let fresh = |n: &mut u32| {
                *n += 1;
                Ipv4Addr::from(0x0a01_0000 + *n)
            };
            update_and_check(&mut cache, &mut tables, &snap, &l, reach, sbox.as_ref());
            for step in 0..400 {
                for _ in 0..1 + rng.below(3) {
                    let svc_names: Vec<String> = s.services.keys().cloned().collect();
                    match rng.below(16) {
                        // Add a task (sometimes on this node, with a link).
                        0 | 1 if !svc_names.is_empty() => {
                            next_id += 1;
                            let id = format!("r{next_id:03}");
                            let svc = svc_names[rng.below(svc_names.len())].clone();
                            let node = if rng.below(2) == 0 { "n1" } else { "n2" };
                            let mut networks = vec![TaskNetwork {
                                network: "app".into(),
                                address: fresh(&mut next_addr),
                            }];
                            if svc == "db" {
                                networks.insert(
                                    0,
                                    TaskNetwork {
                                        network: "db".into(),
                                        address: fresh(&mut next_addr),
                                    },
                                );
                            }
                            if node == "n1" && rng.below(4) != 0 {
                                for n in &networks {
                                    l.insert(
                                        (id.clone(), n.network.clone()),
                                        LocalLink {
                                            ifindex: 1000 + next_id,
                                            task_mac: [2, 0, 0, 0, 0, next_id as u8],
                                            gw_mac: [2; 6],
                                        },
                                    );
                                }
                            }
                            s.tasks.insert(
                                id.clone(),
                                Task {
                                    id,
                                    service: svc,
                                    slot: 1 + rng.below(5) as u32,
                                    node: node.into(),
                                    state: states[rng.below(states.len())],
                                    netns: None,
                                    resolv_conf: None,
                                    networks,
                                },
                            );
                        }
                        // Remove one (its links too, mostly).
                        2 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                s.tasks.remove(&id);
                                if rng.below(4) != 0 {
                                    l.retain(|k, _| k.0 != id);
                                }
                            }
                        }
                        // State change.
                        3 | 4 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                s.tasks.get_mut(&id).unwrap().state =
                                    states[rng.below(states.len())];
                            }
                        }
                        // Slot, node, address, netns, service of one task.
                        5 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                s.tasks.get_mut(&id).unwrap().slot = 1 + rng.below(5) as u32;
                            }
                        }
                        6 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                let t = s.tasks.get_mut(&id).unwrap();
                                t.node = if t.node == "n1" {
                                    "n2".into()
                                } else {
                                    "n1".into()
                                };
                            }
                        }
                        7 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                s.tasks
                                    .get_mut(&id)
                                    .unwrap()
                                    .networks
                                    .last_mut()
                                    .unwrap()
                                    .address = fresh(&mut next_addr);
                            }
                        }
                        8 => {
                            if let Some(id) = rng.pick(s.tasks.keys()) {
                                s.tasks.get_mut(&id).unwrap().netns =
                                    Some(format!("/run/netns/x{}", rng.below(9)).into());
                            }
                        }
                        9 => {
                            if let (Some(id), false) =
                                (rng.pick(s.tasks.keys()), svc_names.is_empty())
                            {
                                s.tasks.get_mut(&id).unwrap().service =
                                    svc_names[rng.below(svc_names.len())].clone();
                            }
                        }
                        // A service definition changes, goes, comes back.
                        10 => {
                            if let Some(name) = rng.pick(s.services.keys()) {
                                let svc = s.services.get_mut(&name).unwrap();
                                if svc.ports.is_empty() || rng.below(2) == 0 {
                                    // Published ports are unique across services (as validated).
                                    let base = match name.as_str() {
                                        "web" => 7100,
                                        "api" => 7200,
                                        _ => 7300,
                                    };
                                    svc.ports.push(PortSpec {
                                        published: base + rng.below(50) as u16,
                                        target: 80,
                                        protocol: Protocol::Udp,
                                    });
                                    svc.ports.dedup_by_key(|p| p.published);
                                } else {
                                    svc.ports.pop();
                                }
                            }
                        }
                        11 => {
                            if let Some(name) = rng.pick(s.services.keys()) {
                                removed_services.push(s.services.remove(&name).unwrap());
                            }
                        }
                        12 => {
                            if let Some(svc) = removed_services.pop() {
                                s.services.insert(svc.name.clone(), svc);
                            }
                        }
                        // A link changes, or a running task on this node loses its link.
                        13 => {
                            if let Some(k) = l.keys().nth(rng.below(l.len().max(1))).cloned() {
                                if rng.below(3) == 0 {
                                    l.remove(&k);
                                } else {
                                    l.get_mut(&k).unwrap().ifindex = 2000 + rng.below(100) as u32;
                                }
                            }
                        }
                        // Inputs change: everything recomputed.
                        14 if rng.below(8) == 0 => {
                            if sbox.is_none() {
                                reach = if reach == Reach::Cluster {
                                    Reach::LocalOnly
                                } else {
                                    Reach::Cluster
                                };
                            } else {
                                s.networks.get_mut("db").unwrap().vni ^= 1;
                            }
                        }
                        // Nothing.
                        _ => {}
                    }
                }
                // Usually a new snapshot; sometimes the very same one again.
                if rng.below(6) != 0 {
                    snap = Arc::new(s.clone());
                }
                let svcs =
                    update_and_check(&mut cache, &mut tables, &snap, &l, reach, sbox.as_ref());
                assert!(
                    svcs.iter()
                        .all(|n| n == "-" || snap.services.contains_key(n)),
                    "step {step}: {svcs:?}"
                );
            }
        }
    }

    #[test]
    fn capacity_is_checked_before_anything_changes() {
        let s = state(&[("t1", 1, "n1", Running, [10, 0, 1, 11])]);
        let mut t = Tables::new();
        t.next_be = maps::MAX_BACKENDS; // every backend id taken
        let want = desired(&s, "n1", &links(&["t1"]), Reach::LocalOnly);
        assert_eq!(
            t.apply(&want),
            Err(TablesError::BackendsFull {
                max: maps::MAX_BACKENDS - 1
            })
        );
        assert_eq!(t.frontends().count(), 0, "nothing recorded");
    }

    #[test]
    fn backend_value_layout() {
        let b = BackendSpec {
            task_id: "t".into(),
            addr: Ipv4Addr::new(10, 0, 1, 11),
            port: 80,
            link: Some(LinkKey {
                ifindex: 7,
                task_mac: [1; 6],
                gw_mac: [2; 6],
            }),
        };
        let v = backend_value(3, &b);
        assert_eq!(v.addr.to_ne_bytes(), [10, 0, 1, 11]);
        assert_eq!(v.port.to_ne_bytes(), [0, 80]);
        assert_eq!(v.flags, be_flags::ACTIVE | be_flags::LOCAL);
        assert_eq!((v.ifindex, v.mac, v.smac, v.svc_id), (7, [1; 6], [2; 6], 3));
    }
}
