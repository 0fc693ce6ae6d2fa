//! Multi-node networks: one VXLAN device per overlaid network on this node, enslaved to the
//! network's bridge, with every peer programmed statically from the managers' state.
//!
//! - Device `mvx-<vni>`: the network's VNI, UDP destination port 4789 (configurable),
//!   `local` = this node's underlay address, learning off, ARP proxy on, MTU 1450 (a
//!   1500-byte underlay minus the 50 bytes of outer Ethernet + IPv4 + UDP + VXLAN headers).
//! - FDB (`bridge fdb … self`): one all-zeros entry per remote node (broadcast and unknown
//!   unicast are replicated to each), one entry per remote task MAC → its node's address.
//! - Neighbours: one permanent entry per remote task address → its MAC; with `proxy` the
//!   device answers ARP from them, so ARP never crosses the overlay (nor does a task's ARP
//!   for its gateway, whose address every node's bridge holds, as with Docker).
//!
//! Nothing is learned by flooding. [`Overlay::converge`] plans from the state ([`plan`]),
//! reads what the kernel holds on each device and applies only the difference ([`diff`]),
//! so an agent restart neither duplicates nor flaps anything. Entries on other devices are
//! never touched; on our own devices, anything the plan does not want is removed.
//!
//! Wiring in the agent: run [`crate::attach::Attacher::converge`] first with `keep` = the
//! networks to overlay (so their bridges exist even without a local task), then
//! `overlay.converge(state, node, &attacher.bridges())`.

pub mod netlink;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use tracing::{Instrument, debug, info, info_span, warn};

pub use netlink::{OverlayLink, OverlayNetlink, errno};
pub use plan::{
    FdbEntry, Mac, NeighEntry, NetDiff, NetPlan, Observed, ObservedFdb, ObservedNeigh, PlanError,
    VXLAN_PREFIX, VxlanSpec, diff, plan, vxlan_name,
};

use crate::{attach::DEFAULT_MTU, model::State};

/// IANA's VXLAN port (Docker's default data-path port).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayConfig {
    /// UDP destination port of the VXLAN devices (every node must agree).
    pub port: u16,
    /// MTU of the VXLAN devices: the underlay MTU minus 50.
    pub mtu: u32,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            port: DEFAULT_VXLAN_PORT,
            mtu: DEFAULT_MTU,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("network {network}: no VXLAN device is managed for it")]
    NotManaged { network: String },
    #[error("network {network}: {device} exists but is not a VXLAN device; left alone")]
    NotVxlan { network: String, device: String },
    #[error("network {network}: {device} vanished right after {op}")]
    Vanished {
        network: String,
        device: String,
        op: &'static str,
    },
    /// A link operation (`network` is empty for a device no network of the state wants).
    #[error("network {network}: {op} {device}: {source}")]
    Link {
        op: &'static str,
        network: String,
        device: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("network {network}: {op} on {device} ({entry}, peer {peer}): {source}")]
    Fdb {
        op: &'static str,
        network: String,
        device: String,
        entry: String,
        peer: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("network {network}: {op} on {device} ({entry}): {source}")]
    Neigh {
        op: &'static str,
        network: String,
        device: String,
        entry: String,
        source: Box<rtnetlink::Error>,
    },
}

impl OverlayError {
    /// The errno of the kernel's refusal, if that is what it was.
    pub fn errno(&self) -> Option<i32> {
        match self {
            OverlayError::Link { source, .. }
            | OverlayError::Fdb { source, .. }
            | OverlayError::Neigh { source, .. } => errno(source.as_ref()),
            OverlayError::Socket(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// What a converge did.
#[derive(Debug, Default)]
pub struct OverlayReport {
    /// VXLAN devices created (also those re-created because their settings differed).
    pub devices_created: Vec<String>,
    /// VXLAN devices removed (networks no longer overlaid, or re-created ones).
    pub devices_removed: Vec<String>,
    /// Existing devices whose bridge, MTU or up state was fixed.
    pub devices_updated: Vec<String>,
    pub fdb_added: usize,
    pub fdb_removed: usize,
    pub neigh_added: usize,
    pub neigh_removed: usize,
    pub errors: Vec<OverlayError>,
}

impl OverlayReport {
    /// Nothing was changed in the kernel.
    pub fn is_noop(&self) -> bool {
        self.devices_created.is_empty()
            && self.devices_removed.is_empty()
            && self.devices_updated.is_empty()
            && self.fdb_added == 0
            && self.fdb_removed == 0
            && self.neigh_added == 0
            && self.neigh_removed == 0
    }
}

/// A VXLAN device this overlay manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub network: String,
    pub name: String,
    pub index: u32,
}

/// The overlay of one node: owns the `mvx-*` devices of its namespace.
pub struct Overlay {
    nl: OverlayNetlink,
    cfg: OverlayConfig,
    /// By network name: devices made or adopted by [`converge`](Self::converge).
    devices: BTreeMap<String, Device>,
}

impl Overlay {
    /// `handle` talks to the node's namespace; its connection must be running.
    pub fn new(handle: rtnetlink::Handle, cfg: OverlayConfig) -> Self {
        Overlay {
            nl: OverlayNetlink::new(handle),
            cfg,
            devices: BTreeMap::new(),
        }
    }

    /// Open a netlink connection in the calling thread's namespace (spawned on the current
    /// tokio runtime).
    pub fn open(cfg: OverlayConfig) -> Result<Self, OverlayError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(OverlayError::Socket)?;
        tokio::spawn(conn);
        Ok(Self::new(handle, cfg))
    }

    pub fn config(&self) -> OverlayConfig {
        self.cfg
    }

    /// The devices managed now, by network.
    pub fn devices(&self) -> &BTreeMap<String, Device> {
        &self.devices
    }

    /// What the kernel holds on a network's device now (after a converge).
    pub async fn observe(&self, network: &str) -> Result<Observed, OverlayError> {
        let dev = self
            .devices
            .get(network)
            .ok_or_else(|| OverlayError::NotManaged {
                network: network.to_string(),
            })?;
        self.observe_device(dev).await
    }

    async fn observe_device(&self, dev: &Device) -> Result<Observed, OverlayError> {
        let fdb = self
            .nl
            .fdb_list(dev.index)
            .await
            .map_err(|source| OverlayError::Link {
                op: "list FDB of",
                network: dev.network.clone(),
                device: dev.name.clone(),
                source: Box::new(source),
            })?;
        let neigh = self
            .nl
            .neigh_list(dev.index)
            .await
            .map_err(|source| OverlayError::Link {
                op: "list neighbours of",
                network: dev.network.clone(),
                device: dev.name.clone(),
                source: Box::new(source),
            })?;
        Ok(Observed { fdb, neigh })
    }

    /// Make the kernel match `state` for `node`: one VXLAN device per network of `bridges`
    /// (network name → ifindex of that network's bridge on this node, made by the attacher),
    /// holding exactly the planned FDB and neighbour entries; `mvx-*` VXLAN devices of any
    /// other network are removed. Errors are collected per network and entry; one failure
    /// stops nothing else. If `node` is not in the state, nothing is changed.
    pub async fn converge(
        &mut self,
        state: &State,
        node: &str,
        bridges: &BTreeMap<String, u32>,
    ) -> OverlayReport {
        let mut rep = OverlayReport::default();
        let mut wanted: Vec<&str> = Vec::new();
        for name in bridges.keys() {
            if state.networks.contains_key(name) {
                wanted.push(name);
            } else {
                rep.errors
                    .push(PlanError::UnknownNetwork(name.clone()).into());
            }
        }
        let plans = match plan(state, node, wanted) {
            Ok(p) => p,
            Err(e) => {
                warn!(node, error = %e, "overlay not converged");
                rep.errors.push(e.into());
                return rep;
            }
        };

        let links = match self.nl.links().await {
            Ok(l) => l,
            Err(source) => {
                rep.errors.push(OverlayError::Link {
                    op: "list links",
                    network: String::new(),
                    device: String::new(),
                    source: Box::new(source),
                });
                return rep;
            }
        };
        let mut by_name: BTreeMap<String, OverlayLink> =
            links.into_iter().map(|l| (l.name.clone(), l)).collect();

        // Devices no network wants any more (this run's or a previous run's).
        let wanted_devices: BTreeSet<&str> = plans.values().map(|p| p.device.as_str()).collect();
        let stale: Vec<OverlayLink> = by_name
            .values()
            .filter(|l| {
                l.is_vxlan()
                    && l.name.starts_with(VXLAN_PREFIX)
                    && !wanted_devices.contains(l.name.as_str())
            })
            .cloned()
            .collect();
        for l in stale {
            let network = self
                .devices
                .values()
                .find(|d| d.name == l.name)
                .map(|d| d.network.clone())
                .unwrap_or_default();
            match self.nl.delete_link(l.index).await {
                Ok(()) => {
                    info!(device = l.name, network, "VXLAN device removed");
                    by_name.remove(&l.name);
                    rep.devices_removed.push(l.name);
                }
                Err(source) => rep.errors.push(OverlayError::Link {
                    op: "delete",
                    network,
                    device: l.name,
                    source: Box::new(source),
                }),
            }
        }
        self.devices.retain(|n, _| plans.contains_key(n));

        for (name, p) in &plans {
            let span = info_span!("overlay", network = %name, device = %p.device, vni = p.vni);
            let Some(&bridge) = bridges.get(name) else {
                continue;
            };
            let existing = by_name.get(&p.device).cloned();
            self.converge_network(p, bridge, existing, &mut rep)
                .instrument(span)
                .await;
        }
        if !rep.is_noop() || !rep.errors.is_empty() {
            info!(
                node,
                created = rep.devices_created.len(),
                removed = rep.devices_removed.len(),
                fdb_added = rep.fdb_added,
                fdb_removed = rep.fdb_removed,
                neigh_added = rep.neigh_added,
                neigh_removed = rep.neigh_removed,
                errors = rep.errors.len(),
                "overlay converged"
            );
        }
        rep
    }

    async fn converge_network(
        &mut self,
        p: &NetPlan,
        bridge: u32,
        existing: Option<OverlayLink>,
        rep: &mut OverlayReport,
    ) {
        let dev = match self.ensure_device(p, bridge, existing, rep).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "VXLAN device not ready");
                self.devices.remove(&p.network);
                rep.errors.push(e);
                return;
            }
        };
        self.devices.insert(p.network.clone(), dev.clone());

        let observed = match self.observe_device(&dev).await {
            Ok(o) => o,
            Err(e) => {
                rep.errors.push(e);
                return;
            }
        };
        let d = diff(p, &observed);
        if d.is_empty() {
            debug!("overlay entries up to date");
            return;
        }
        let fdb_err = |op, entry: String, dst: Option<IpAddr>, source| OverlayError::Fdb {
            op,
            network: p.network.clone(),
            device: dev.name.clone(),
            entry,
            peer: dst.map(|d| p.peer_label(d)).unwrap_or_else(|| "-".into()),
            source: Box::new(source),
        };
        let neigh_err = |op, entry: String, source| OverlayError::Neigh {
            op,
            network: p.network.clone(),
            device: dev.name.clone(),
            entry,
            source: Box::new(source),
        };
        for o in &d.fdb_del {
            match self.nl.fdb_del(dev.index, o).await {
                Ok(()) => {
                    debug!(entry = %o, "FDB entry removed");
                    rep.fdb_removed += 1;
                }
                Err(source) => {
                    rep.errors
                        .push(fdb_err("delete FDB entry", o.to_string(), o.dst, source))
                }
            }
        }
        for o in &d.neigh_del {
            match self.nl.neigh_del(dev.index, o.ip).await {
                Ok(()) => {
                    debug!(entry = %o, "neighbour removed");
                    rep.neigh_removed += 1;
                }
                Err(source) => {
                    rep.errors
                        .push(neigh_err("delete neighbour", o.to_string(), source))
                }
            }
        }
        for e in &d.fdb_add {
            match self.nl.fdb_add(dev.index, e).await {
                Ok(()) => {
                    debug!(entry = %e, peer = p.peer_label(e.dst.into()), "FDB entry added");
                    rep.fdb_added += 1;
                }
                Err(source) => rep.errors.push(fdb_err(
                    "add FDB entry",
                    e.to_string(),
                    Some(e.dst.into()),
                    source,
                )),
            }
        }
        for e in &d.neigh_add {
            match self.nl.neigh_add(dev.index, e).await {
                Ok(()) => {
                    debug!(entry = %e, "neighbour added");
                    rep.neigh_added += 1;
                }
                Err(source) => rep
                    .errors
                    .push(neigh_err("add neighbour", e.to_string(), source)),
            }
        }
        info!(
            fdb_added = d.fdb_add.len(),
            fdb_removed = d.fdb_del.len(),
            neigh_added = d.neigh_add.len(),
            neigh_removed = d.neigh_del.len(),
            "overlay entries converged"
        );
    }

    /// The network's device, created, re-created or fixed as needed.
    async fn ensure_device(
        &mut self,
        p: &NetPlan,
        bridge: u32,
        existing: Option<OverlayLink>,
        rep: &mut OverlayReport,
    ) -> Result<Device, OverlayError> {
        let spec = p.spec(self.cfg.port);
        let link_err = |op, source| OverlayError::Link {
            op,
            network: p.network.clone(),
            device: p.device.clone(),
            source: Box::new(source),
        };
        let mut existing = existing;
        if let Some(l) = &existing {
            if !l.is_vxlan() {
                return Err(OverlayError::NotVxlan {
                    network: p.network.clone(),
                    device: p.device.clone(),
                });
            }
            if l.vxlan != Some(spec) {
                // VNI, local address, port, learning and proxy are fixed at creation.
                info!(have = ?l.vxlan, want = ?spec, "VXLAN settings differ; re-creating the device");
                self.nl
                    .delete_link(l.index)
                    .await
                    .map_err(|s| link_err("delete", s))?;
                rep.devices_removed.push(p.device.clone());
                existing = None;
            }
        }
        let link = match existing {
            Some(l) => {
                if l.controller != Some(bridge) || l.mtu != Some(self.cfg.mtu) || !l.up {
                    self.nl
                        .set_controller_mtu_up(l.index, bridge, self.cfg.mtu)
                        .await
                        .map_err(|s| link_err("attach to bridge", s))?;
                    info!(bridge, "VXLAN device re-attached");
                    rep.devices_updated.push(p.device.clone());
                }
                l
            }
            None => {
                self.nl
                    .create_vxlan(&p.device, &spec, self.cfg.mtu, bridge)
                    .await
                    .map_err(|s| link_err("create", s))?;
                let l = self
                    .nl
                    .link(&p.device)
                    .await
                    .map_err(|s| link_err("get", s))?
                    .ok_or_else(|| OverlayError::Vanished {
                        network: p.network.clone(),
                        device: p.device.clone(),
                        op: "create",
                    })?;
                info!(local = %spec.local, port = spec.port, bridge, "VXLAN device created");
                rep.devices_created.push(p.device.clone());
                l
            }
        };
        Ok(Device {
            network: p.network.clone(),
            name: p.device.clone(),
            index: link.index,
        })
    }

    /// Remove every VXLAN device this overlay manages, and any other `mvx-*` VXLAN device of
    /// the namespace (left by an earlier run); their FDB and neighbour entries go with them.
    /// Every error is collected; none stops the rest.
    pub async fn teardown(&mut self) -> Vec<OverlayError> {
        let mut errors = Vec::new();
        let mut targets: BTreeMap<String, (String, u32)> = BTreeMap::new();
        for d in std::mem::take(&mut self.devices).into_values() {
            targets.insert(d.name.clone(), (d.network, d.index));
        }
        match self.nl.links().await {
            Ok(links) => {
                // Current indexes win (a tracked device may have been re-created by someone).
                let present: BTreeMap<String, u32> = links
                    .iter()
                    .filter(|l| l.is_vxlan() && l.name.starts_with(VXLAN_PREFIX))
                    .map(|l| (l.name.clone(), l.index))
                    .collect();
                targets.retain(|name, _| present.contains_key(name));
                for (name, index) in present {
                    targets.entry(name).or_insert_with(|| (String::new(), 0)).1 = index;
                }
            }
            Err(source) => errors.push(OverlayError::Link {
                op: "list links",
                network: String::new(),
                device: String::new(),
                source: Box::new(source),
            }),
        }
        for (name, (network, index)) in targets {
            match self.nl.delete_link(index).await {
                Ok(()) => info!(device = name, network, "VXLAN device removed"),
                Err(source) => errors.push(OverlayError::Link {
                    op: "delete",
                    network,
                    device: name,
                    source: Box::new(source),
                }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_leave_room_for_encapsulation() {
        let c = OverlayConfig::default();
        assert_eq!(c.port, 4789);
        assert_eq!(c.mtu, 1500 - 50);
    }

    #[test]
    fn errors_name_network_device_and_peer() {
        let e = OverlayError::Fdb {
            op: "add FDB entry",
            network: "front".into(),
            device: "mvx-4200".into(),
            entry: "00:00:00:00:00:00 dst 198.18.0.2".into(),
            peer: "198.18.0.2 (node node2)".into(),
            source: Box::new(rtnetlink::Error::RequestFailed),
        };
        let s = e.to_string();
        assert!(
            s.contains("front") && s.contains("mvx-4200") && s.contains("node2"),
            "{s}"
        );
        assert_eq!(e.errno(), None);
        let e: OverlayError = PlanError::UnknownNode("n9".into()).into();
        assert!(e.to_string().contains("n9"));
    }
}
