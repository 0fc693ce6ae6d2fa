//! Pure planning: what the VXLAN device of each network should hold on one node, computed
//! from the managers' state alone, and the diff of that plan against what the kernel holds.
//! No kernel access here, so everything is unit-tested without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use crate::{
    attach::task_mac,
    model::{Network, State},
};

/// Prefix of every VXLAN device mesh makes. Reserved: a VXLAN device named `mvx-*` is taken
/// to be mesh's (left by this or a previous run of the agent) and removed when no network
/// of the state wants it.
pub const VXLAN_PREFIX: &str = "mvx-";

/// Name of a network's VXLAN device on every node: `mvx-<vni>` (≤ 12 chars for VNIs up to
/// 16777215, within IFNAMSIZ-1 = 15).
pub fn vxlan_name(net: &Network) -> String {
    format!("{VXLAN_PREFIX}{}", net.vni)
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `00:00:00:00:00:00`: in a VXLAN FDB, the default destination(s) of broadcast,
    /// multicast and unknown unicast frames (head-end replication, one copy per entry).
    pub const ZERO: Mac = Mac([0; 6]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Parse a link-layer address attribute (exactly 6 bytes).
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A static FDB entry on a VXLAN device: frames to `mac` are encapsulated to the VTEP `dst`
/// (a node's underlay address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dst {}", self.mac, self.dst)
    }
}

/// A permanent neighbour (ARP) entry on a VXLAN device, which the device's ARP proxy
/// answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighEntry {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

impl fmt::Display for NeighEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {}", self.ip, self.mac)
    }
}

/// The VXLAN device settings mesh programs (and compares to decide whether an existing
/// device can be kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanSpec {
    pub vni: u32,
    /// This node's underlay address: the source of encapsulated packets (pinned so the kernel
    /// cannot pick another one, moby#53004).
    pub local: Ipv4Addr,
    /// UDP destination port.
    pub port: u16,
    /// Always false: peers come from the managers' state, never from flooding.
    pub learning: bool,
    /// Always true: ARP requests are answered from the neighbour entries, never sent over
    /// the overlay.
    pub proxy: bool,
}

/// What one network's VXLAN device should hold on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    pub network: String,
    pub vni: u32,
    /// `mvx-<vni>`.
    pub device: String,
    /// This node's underlay address.
    pub local: Ipv4Addr,
    /// One all-zeros entry per remote node, plus one entry per remote task MAC.
    pub fdb: BTreeSet<FdbEntry>,
    /// One entry per remote task address.
    pub neigh: BTreeSet<NeighEntry>,
    /// Underlay address → node name, to name peers in logs and errors.
    pub peers: BTreeMap<Ipv4Addr, String>,
}

impl NetPlan {
    pub fn spec(&self, port: u16) -> VxlanSpec {
        VxlanSpec {
            vni: self.vni,
            local: self.local,
            port,
            learning: false,
            proxy: true,
        }
    }

    /// `"<ip> (node <name>)"`, or just the address when it is no node of the plan.
    pub fn peer_label(&self, dst: IpAddr) -> String {
        match dst {
            IpAddr::V4(v4) => match self.peers.get(&v4) {
                Some(n) => format!("{v4} (node {n})"),
                None => v4.to_string(),
            },
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("node `{0}` is not in the state: no underlay address for its VXLAN devices")]
    UnknownNode(String),
    #[error("network `{0}` is not in the state")]
    UnknownNetwork(String),
}

/// The plan of every network of `networks` (names of `state.networks`) on `node`.
///
/// Remote tasks are the tasks of other nodes that are attached (starting or running) and
/// have an address on the network; local tasks need nothing, the bridge reaches them.
///
/// Every remote node of the cluster gets its all-zeros FDB entry on every overlaid network,
/// even a node with no task on that network (yet): broadcast and unknown-unicast frames
/// then reach every node that may host the network, the entry set does not churn as tasks
/// come and go, and a task scheduled on a fresh node is reachable as soon as its MAC entry
/// lands. The cost is one extra copy per broadcast frame per idle node; ARP, the bulk of
/// broadcast, never crosses the overlay (proxy), and a node that does not overlay the
/// network has no device with that VNI and drops the copy.
pub fn plan<'a>(
    state: &State,
    node: &str,
    networks: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, NetPlan>, PlanError> {
    let local = state
        .nodes
        .get(node)
        .ok_or_else(|| PlanError::UnknownNode(node.to_string()))?
        .address;
    // Remote nodes by name (the local one and any sharing its underlay address excluded:
    // encapsulating to ourselves would loop).
    let remotes: BTreeMap<&str, Ipv4Addr> = state
        .nodes
        .values()
        .filter(|n| n.name != node && n.address != local)
        .map(|n| (n.name.as_str(), n.address))
        .collect();
    let mut out = BTreeMap::new();
    for name in networks {
        let net = state
            .networks
            .get(name)
            .ok_or_else(|| PlanError::UnknownNetwork(name.to_string()))?;
        let mut p = NetPlan {
            network: net.name.clone(),
            vni: net.vni,
            device: vxlan_name(net),
            local,
            fdb: BTreeSet::new(),
            neigh: BTreeSet::new(),
            peers: remotes.iter().map(|(n, a)| (*a, n.to_string())).collect(),
        };
        for addr in remotes.values() {
            p.fdb.insert(FdbEntry {
                mac: Mac::ZERO,
                dst: *addr,
            });
        }
        // Task ids in order, so a (validation-forbidden) duplicate address resolves the same
        // way on every run: the first task keeps it.
        let mut seen_ip: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for t in state.tasks.values() {
            if !t.state.is_attached() {
                continue;
            }
            let Some(dst) = remotes.get(t.node.as_str()) else {
                continue;
            };
            let Some(ip) = t.address_on(&net.name) else {
                continue;
            };
            if !seen_ip.insert(ip) {
                tracing::warn!(network = net.name, task = t.id, %ip, "address used by two remote tasks; keeping the first");
                continue;
            }
            let mac = Mac(task_mac(ip));
            p.fdb.insert(FdbEntry { mac, dst: *dst });
            p.neigh.insert(NeighEntry { ip, mac });
        }
        out.insert(net.name.clone(), p);
    }
    Ok(out)
}

/// An FDB entry of a VXLAN device as the kernel reports it (`bridge fdb show dev mvx-*`,
/// `self` entries only: the bridge's own entries for the port are not the device's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObservedFdb {
    pub mac: Mac,
    pub dst: Option<IpAddr>,
    /// Set only when it differs from the device's port / VNI (the kernel omits defaults).
    pub port: Option<u16>,
    pub vni: Option<u32>,
    pub ifindex: Option<u32>,
    pub src_vni: Option<u32>,
    /// NUD_PERMANENT is set (never aged out).
    pub permanent: bool,
}

impl ObservedFdb {
    /// The entry as mesh writes it, if it is exactly of that shape.
    pub fn as_plain(&self) -> Option<FdbEntry> {
        match self.dst {
            Some(IpAddr::V4(dst))
                if self.permanent
                    && self.port.is_none()
                    && self.vni.is_none()
                    && self.ifindex.is_none()
                    && self.src_vni.is_none() =>
            {
                Some(FdbEntry { mac: self.mac, dst })
            }
            _ => None,
        }
    }

    /// The same entry as we would write it.
    pub fn plain(entry: FdbEntry) -> Self {
        ObservedFdb {
            mac: entry.mac,
            dst: Some(IpAddr::V4(entry.dst)),
            port: None,
            vni: None,
            ifindex: None,
            src_vni: None,
            permanent: true,
        }
    }
}

impl fmt::Display for ObservedFdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mac)?;
        if let Some(d) = self.dst {
            write!(f, " dst {d}")?;
        }
        if let Some(p) = self.port {
            write!(f, " port {p}")?;
        }
        if let Some(v) = self.vni {
            write!(f, " vni {v}")?;
        }
        Ok(())
    }
}

/// An IPv4 neighbour entry of a VXLAN device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNeigh {
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    /// NUD_PERMANENT is set. The ARP proxy answers only from connected (permanent, noarp,
    /// reachable) entries, so anything else is rewritten.
    pub permanent: bool,
}

impl fmt::Display for ObservedNeigh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mac {
            Some(m) => write!(f, "{} lladdr {m}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// Everything the kernel holds on one VXLAN device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub fdb: Vec<ObservedFdb>,
    pub neigh: Vec<ObservedNeigh>,
}

impl Observed {
    /// What the kernel would hold after a clean apply of `p` (for tests and dry runs).
    pub fn from_plan(p: &NetPlan) -> Self {
        Observed {
            fdb: p.fdb.iter().copied().map(ObservedFdb::plain).collect(),
            neigh: p
                .neigh
                .iter()
                .map(|n| ObservedNeigh {
                    ip: n.ip,
                    mac: Some(n.mac),
                    permanent: true,
                })
                .collect(),
        }
    }
}

/// The operations that turn an [`Observed`] device into its [`NetPlan`]. Apply deletions
/// first, then additions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetDiff {
    /// All-zeros entries are *appended* (one per remote node); unicast entries are written
    /// with *replace*, which also moves a MAC to another node in one step (no deletion of
    /// the old destination is planned for it).
    pub fdb_add: Vec<FdbEntry>,
    /// Entries on our device that the plan does not want, deleted one remote at a time.
    pub fdb_del: Vec<ObservedFdb>,
    /// Written permanent, with replace.
    pub neigh_add: Vec<NeighEntry>,
    pub neigh_del: Vec<ObservedNeigh>,
}

impl NetDiff {
    pub fn is_empty(&self) -> bool {
        self.fdb_add.is_empty()
            && self.fdb_del.is_empty()
            && self.neigh_add.is_empty()
            && self.neigh_del.is_empty()
    }
}

/// Diff a plan against what the kernel holds on the plan's device. Entries already present
/// as written are left alone (a restart neither duplicates nor flaps anything); entries of
/// any other shape on the device are ours to remove.
pub fn diff(plan: &NetPlan, observed: &Observed) -> NetDiff {
    let mut d = NetDiff::default();

    let present: BTreeSet<FdbEntry> = observed
        .fdb
        .iter()
        .filter_map(ObservedFdb::as_plain)
        .collect();
    d.fdb_add = plan.fdb.difference(&present).copied().collect();
    // Unicast MACs rewritten by a replace: their old destination goes with it.
    let replaced: BTreeSet<Mac> = d
        .fdb_add
        .iter()
        .filter(|e| !e.mac.is_zero())
        .map(|e| e.mac)
        .collect();
    let mut seen = BTreeSet::new();
    for o in &observed.fdb {
        let wanted = o.as_plain().is_some_and(|e| plan.fdb.contains(&e));
        if wanted || (!o.mac.is_zero() && replaced.contains(&o.mac)) {
            continue;
        }
        if seen.insert(o.clone()) {
            d.fdb_del.push(o.clone());
        }
    }

    let by_ip: BTreeMap<Ipv4Addr, &ObservedNeigh> =
        observed.neigh.iter().map(|n| (n.ip, n)).collect();
    let wanted_ips: BTreeSet<Ipv4Addr> = plan.neigh.iter().map(|n| n.ip).collect();
    for n in &plan.neigh {
        match by_ip.get(&n.ip) {
            Some(o) if o.permanent && o.mac == Some(n.mac) => {}
            _ => d.neigh_add.push(*n),
        }
    }
    for o in by_ip.values() {
        if !wanted_ips.contains(&o.ip) {
            d.neigh_del.push((*o).clone());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Node, Task, TaskNetwork, TaskState};

    const N1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const N2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const N3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

    fn net(name: &str, vni: u32, third: u8) -> Network {
        Network {
            name: name.into(),
            subnet: format!("10.{third}.0.0/24").parse().unwrap(),
            vni,
            gateway: Ipv4Addr::new(10, third, 0, 1),
        }
    }

    fn task(id: &str, node: &str, state: TaskState, nets: &[(&str, Ipv4Addr)]) -> Task {
        Task {
            id: id.into(),
            service: "web".into(),
            slot: 1,
            node: node.into(),
            state,
            netns: None,
            resolv_conf: None,
            networks: nets
                .iter()
                .map(|(n, a)| TaskNetwork {
                    network: n.to_string(),
                    address: *a,
                })
                .collect(),
        }
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(a, b, c, d)
    }

    /// node1..3; networks front (4200) and back (4201); t1 on node1, t2 on node2 (front),
    /// t3 on node3 (front + back).
    fn state() -> State {
        let mut s = State::default();
        for (n, a) in [("node1", N1), ("node2", N2), ("node3", N3)] {
            s.nodes.insert(
                n.into(),
                Node {
                    name: n.into(),
                    address: a,
                },
            );
        }
        s.networks.insert("front".into(), net("front", 4200, 210));
        s.networks.insert("back".into(), net("back", 4201, 211));
        for t in [
            task(
                "t1",
                "node1",
                TaskState::Running,
                &[("front", ip(10, 210, 0, 11))],
            ),
            task(
                "t2",
                "node2",
                TaskState::Running,
                &[("front", ip(10, 210, 0, 12))],
            ),
            task(
                "t3",
                "node3",
                TaskState::Starting,
                &[("front", ip(10, 210, 0, 13)), ("back", ip(10, 211, 0, 13))],
            ),
        ] {
            s.tasks.insert(t.id.clone(), t);
        }
        s
    }

    fn mac_of(a: Ipv4Addr) -> Mac {
        Mac(task_mac(a))
    }

    fn fdb(mac: Mac, dst: Ipv4Addr) -> FdbEntry {
        FdbEntry { mac, dst }
    }

    fn neigh(a: Ipv4Addr) -> NeighEntry {
        NeighEntry {
            ip: a,
            mac: mac_of(a),
        }
    }

    fn plan1(s: &State) -> NetPlan {
        plan(s, "node1", ["front"])
            .unwrap()
            .remove("front")
            .unwrap()
    }

    #[test]
    fn name_fits_ifnamsiz() {
        let n = net("x", 16_777_215, 1);
        assert_eq!(vxlan_name(&n), "mvx-16777215");
        assert!(vxlan_name(&n).len() <= 15);
    }

    #[test]
    fn mac_display() {
        assert_eq!(
            Mac([2, 0x42, 10, 210, 0, 11]).to_string(),
            "02:42:0a:d2:00:0b"
        );
        assert_eq!(Mac::ZERO.to_string(), "00:00:00:00:00:00");
        assert_eq!(Mac::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn plan_has_remote_nodes_and_remote_tasks_only() {
        let s = state();
        let p = plan1(&s);
        assert_eq!(p.vni, 4200);
        assert_eq!(p.device, "mvx-4200");
        assert_eq!(p.local, N1);
        let want: BTreeSet<FdbEntry> = [
            fdb(Mac::ZERO, N2),
            fdb(Mac::ZERO, N3),
            fdb(mac_of(ip(10, 210, 0, 12)), N2),
            fdb(mac_of(ip(10, 210, 0, 13)), N3),
        ]
        .into();
        assert_eq!(p.fdb, want);
        assert_eq!(
            p.neigh,
            [neigh(ip(10, 210, 0, 12)), neigh(ip(10, 210, 0, 13))].into()
        );
        assert_eq!(
            p.spec(4789),
            VxlanSpec {
                vni: 4200,
                local: N1,
                port: 4789,
                learning: false,
                proxy: true
            }
        );
    }

    #[test]
    fn node_without_tasks_on_network_still_gets_its_zero_entry() {
        // node2 has no task on `back`; it still receives broadcasts of `back`.
        let s = state();
        let p = plan(&s, "node1", ["back"]).unwrap().remove("back").unwrap();
        assert!(p.fdb.contains(&fdb(Mac::ZERO, N2)));
        assert!(p.fdb.contains(&fdb(Mac::ZERO, N3)));
        assert_eq!(p.neigh, [neigh(ip(10, 211, 0, 13))].into());
        assert_eq!(p.fdb.len(), 3);
    }

    #[test]
    fn unknown_node_and_network_are_refused() {
        let s = state();
        assert_eq!(
            plan(&s, "nodeX", ["front"]),
            Err(PlanError::UnknownNode("nodeX".into()))
        );
        assert_eq!(
            plan(&s, "node1", ["nope"]),
            Err(PlanError::UnknownNetwork("nope".into()))
        );
        assert!(plan(&s, "node1", []).unwrap().is_empty());
    }

    #[test]
    fn clean_device_needs_nothing() {
        let s = state();
        let p = plan1(&s);
        assert!(diff(&p, &Observed::from_plan(&p)).is_empty());
    }

    #[test]
    fn empty_device_gets_everything() {
        let s = state();
        let p = plan1(&s);
        let d = diff(&p, &Observed::default());
        assert_eq!(d.fdb_add.len(), 4);
        assert_eq!(d.neigh_add.len(), 2);
        assert!(d.fdb_del.is_empty() && d.neigh_del.is_empty());
    }

    #[test]
    fn node_added() {
        let s = state();
        let before = Observed::from_plan(&plan1(&s));
        let mut s2 = s.clone();
        s2.nodes.insert(
            "node4".into(),
            Node {
                name: "node4".into(),
                address: ip(198, 18, 0, 4),
            },
        );
        let d = diff(&plan1(&s2), &before);
        assert_eq!(d.fdb_add, vec![fdb(Mac::ZERO, ip(198, 18, 0, 4))]);
        assert!(d.fdb_del.is_empty() && d.neigh_add.is_empty() && d.neigh_del.is_empty());
    }

    #[test]
    fn node_removed_takes_its_zero_entry_and_its_tasks() {
        let s = state();
        let before = Observed::from_plan(&plan1(&s));
        let mut s2 = s.clone();
        s2.nodes.remove("node3");
        s2.tasks.remove("t3");
        let d = diff(&plan1(&s2), &before);
        assert!(d.fdb_add.is_empty() && d.neigh_add.is_empty());
        let dels: BTreeSet<Option<FdbEntry>> =
            d.fdb_del.iter().map(ObservedFdb::as_plain).collect();
        assert_eq!(
            dels,
            [
                Some(fdb(Mac::ZERO, N3)),
                Some(fdb(mac_of(ip(10, 210, 0, 13)), N3))
            ]
            .into()
        );
        assert_eq!(d.neigh_del.len(), 1);
        assert_eq!(d.neigh_del[0].ip, ip(10, 210, 0, 13));
    }

    #[test]
    fn task_added_and_stopped() {
        let s = state();
        let before = Observed::from_plan(&plan1(&s));

        let mut added = s.clone();
        let t = task(
            "t4",
            "node2",
            TaskState::Running,
            &[("front", ip(10, 210, 0, 14))],
        );
        added.tasks.insert(t.id.clone(), t);
        let d = diff(&plan1(&added), &before);
        assert_eq!(d.fdb_add, vec![fdb(mac_of(ip(10, 210, 0, 14)), N2)]);
        assert_eq!(d.neigh_add, vec![neigh(ip(10, 210, 0, 14))]);
        assert!(d.fdb_del.is_empty() && d.neigh_del.is_empty());

        // A task that is not attached (here: shut down) is no peer: exactly its two entries go.
        let mut stopped = s.clone();
        stopped.tasks.get_mut("t2").unwrap().state = TaskState::Shutdown;
        let d = diff(&plan1(&stopped), &before);
        assert!(d.fdb_add.is_empty() && d.neigh_add.is_empty());
        assert_eq!(
            d.fdb_del,
            vec![ObservedFdb::plain(fdb(mac_of(ip(10, 210, 0, 12)), N2))]
        );
        assert_eq!(
            d.neigh_del.iter().map(|n| n.ip).collect::<Vec<_>>(),
            vec![ip(10, 210, 0, 12)]
        );
        // The node stays: its all-zeros entry stays.
        assert!(plan1(&stopped).fdb.contains(&fdb(Mac::ZERO, N2)));
    }

    #[test]
    fn task_moved_to_another_node_is_one_replace() {
        let s = state();
        let before = Observed::from_plan(&plan1(&s));
        let mut moved = s.clone();
        moved.tasks.get_mut("t2").unwrap().node = "node3".into();
        let d = diff(&plan1(&moved), &before);
        assert_eq!(d.fdb_add, vec![fdb(mac_of(ip(10, 210, 0, 12)), N3)]);
        assert!(
            d.fdb_del.is_empty(),
            "the replace moves it: {:?}",
            d.fdb_del
        );
        // Same address, same MAC: the neighbour entry stays.
        assert!(d.neigh_add.is_empty() && d.neigh_del.is_empty());
    }

    #[test]
    fn task_moved_to_this_node_is_no_longer_remote() {
        let s = state();
        let before = Observed::from_plan(&plan1(&s));
        let mut moved = s.clone();
        moved.tasks.get_mut("t2").unwrap().node = "node1".into();
        let d = diff(&plan1(&moved), &before);
        assert!(d.fdb_add.is_empty() && d.neigh_add.is_empty());
        assert_eq!(d.fdb_del.len(), 1);
        assert_eq!(d.neigh_del.len(), 1);
    }

    #[test]
    fn network_removed_plans_nothing_for_it() {
        let s = state();
        let mut s2 = s.clone();
        s2.networks.remove("back");
        s2.tasks
            .get_mut("t3")
            .unwrap()
            .networks
            .retain(|n| n.network != "back");
        assert_eq!(
            plan(&s2, "node1", ["back"]),
            Err(PlanError::UnknownNetwork("back".into()))
        );
        assert_eq!(
            plan(&s2, "node1", ["front"])
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["front"]
        );
    }

    #[test]
    fn foreign_and_stale_entries_on_our_device_are_fixed() {
        let s = state();
        let p = plan1(&s);
        let mut obs = Observed::from_plan(&p);
        // Someone appended a peer with its own port; a learned (non-permanent) entry; a neighbour
        // entry that went stale and one with the wrong MAC; one nobody wants.
        let odd_port = ObservedFdb {
            port: Some(9999),
            ..ObservedFdb::plain(fdb(Mac::ZERO, ip(198, 18, 0, 9)))
        };
        let learned = ObservedFdb {
            permanent: false,
            ..ObservedFdb::plain(fdb(Mac([2, 0, 0, 0, 0, 1]), N2))
        };
        obs.fdb.push(odd_port.clone());
        obs.fdb.push(learned.clone());
        for n in obs.neigh.iter_mut() {
            if n.ip == ip(10, 210, 0, 12) {
                n.permanent = false;
            } else {
                n.mac = Some(Mac([2, 0, 0, 0, 0, 2]));
            }
        }
        let unwanted = ObservedNeigh {
            ip: ip(10, 210, 0, 99),
            mac: Some(Mac([2, 0, 0, 0, 0, 3])),
            permanent: true,
        };
        obs.neigh.push(unwanted.clone());
        let d = diff(&p, &obs);
        assert!(d.fdb_add.is_empty());
        assert_eq!(d.fdb_del, vec![odd_port, learned]);
        assert_eq!(
            d.neigh_add,
            vec![neigh(ip(10, 210, 0, 12)), neigh(ip(10, 210, 0, 13))]
        );
        assert_eq!(d.neigh_del, vec![unwanted]);
    }

    #[test]
    fn zero_entry_to_a_node_is_not_replaced_by_another() {
        // Several all-zeros entries coexist (append); adding one deletes none.
        let s = state();
        let p = plan1(&s);
        let mut obs = Observed::from_plan(&p);
        obs.fdb.retain(|o| o.as_plain() != Some(fdb(Mac::ZERO, N3)));
        let d = diff(&p, &obs);
        assert_eq!(d.fdb_add, vec![fdb(Mac::ZERO, N3)]);
        assert!(d.fdb_del.is_empty());
    }
}
