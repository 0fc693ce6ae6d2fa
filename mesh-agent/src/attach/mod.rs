//! Task networking on this node: a bridge per network (its address is the tasks' gateway)
//! and, per task and network, a veth pair whose peer is the task's `eth<i>` inside the
//! namespace the runtime created for it (address, MAC derived from it as Docker does,
//! default route via the first network's gateway).
//!
//! [`Attacher::converge`] makes the kernel match the state: it attaches new tasks, detaches
//! gone ones, re-attaches changed ones, and adopts what a previous run of the agent left
//! (names are deterministic), so a restart neither duplicates nor flaps anything.

pub mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

pub use netlink::{Netlink, NetlinkError};

use crate::{
    model::{Network, State, Task},
    netns,
    tables::{LocalLink, LocalLinks},
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("task {task}: {source}")]
    Netns {
        task: String,
        source: netns::NetnsError,
    },
    #[error("task {task}: has no netns in the state")]
    NoNetns { task: String },
    #[error("task {task}: {source}")]
    Netlink { task: String, source: NetlinkError },
    #[error("network {network}: {source}")]
    Bridge {
        network: String,
        source: NetlinkError,
    },
    #[error("task {task}: inside its namespace: {message}")]
    Inside { task: String, message: String },
}

/// MTU of task interfaces and bridges (room for the 50-byte VXLAN encapsulation on a
/// 1500-byte underlay, as Docker's overlays use).
pub const DEFAULT_MTU: u32 = 1450;

/// Task MAC derived from its IPv4 address: `02:42:a:b:c:d`, as Docker does.
pub fn task_mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// Bridge name of a network on this node.
pub fn bridge_name(net: &Network) -> String {
    format!("mbr-{}", net.vni)
}

/// Host-side veth name of a task on a network (≤ 15 chars, deterministic).
pub fn host_veth_name(task_id: &str, network: &str) -> String {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in task_id.bytes().chain([b'/']).chain(network.bytes()) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("mv{h:08x}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bridge {
    name: String,
    index: u32,
    mac: [u8; 6],
}

/// One of a task's interfaces, seen from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub network: String,
    pub host_name: String,
    pub host_index: u32,
    pub task_mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Attached {
    netns: PathBuf,
    /// (network, address, gateway, prefix) in order: a change re-attaches the task.
    fingerprint: Vec<(String, Ipv4Addr, Ipv4Addr, u8)>,
    links: Vec<HostLink>,
}

/// What a converge did.
#[derive(Debug, Default)]
pub struct Converged {
    /// Tasks newly attached (or re-attached after a change).
    pub added: Vec<String>,
    /// Tasks detached.
    pub removed: Vec<String>,
    /// Tasks that could not be attached, with why.
    pub failed: Vec<AttachError>,
}

pub struct Attacher {
    nl: Netlink,
    mtu: u32,
    bridges: BTreeMap<String, Bridge>,
    tasks: BTreeMap<String, Attached>,
}

fn fingerprint(state: &State, task: &Task) -> Vec<(String, Ipv4Addr, Ipv4Addr, u8)> {
    task.networks
        .iter()
        .filter_map(|tn| {
            let net = state.networks.get(&tn.network)?;
            Some((
                tn.network.clone(),
                tn.address,
                net.gateway,
                net.subnet.prefix_len(),
            ))
        })
        .collect()
}

impl Attacher {
    pub fn new(nl: Netlink) -> Self {
        Attacher {
            nl,
            mtu: DEFAULT_MTU,
            bridges: BTreeMap::new(),
            tasks: BTreeMap::new(),
        }
    }

    /// How the data path reaches each attached task.
    pub fn links(&self) -> LocalLinks {
        let mut out = LocalLinks::new();
        for (id, a) in &self.tasks {
            for l in &a.links {
                let gw_mac = self
                    .bridges
                    .get(&l.network)
                    .map(|b| b.mac)
                    .unwrap_or([0; 6]);
                out.insert(
                    (id.clone(), l.network.clone()),
                    LocalLink {
                        ifindex: l.host_index,
                        task_mac: l.task_mac,
                        gw_mac,
                    },
                );
            }
        }
        out
    }

    /// Host-side interfaces of an attached task.
    pub fn host_links(&self, task_id: &str) -> Vec<HostLink> {
        self.tasks
            .get(task_id)
            .map(|a| a.links.clone())
            .unwrap_or_default()
    }

    pub fn attached(&self) -> impl Iterator<Item = &String> {
        self.tasks.keys()
    }

    /// Bridge ifindex of every network with a bridge on this node.
    pub fn bridges(&self) -> BTreeMap<String, u32> {
        self.bridges
            .iter()
            .map(|(n, b)| (n.clone(), b.index))
            .collect()
    }

    /// Make the kernel match `state` for the tasks of `node`. Networks in `keep` get a bridge
    /// even without a local task (an overlay reaches remote tasks through it).
    pub async fn converge(
        &mut self,
        state: &State,
        node: &str,
        keep: &BTreeSet<String>,
    ) -> Converged {
        let mut out = Converged::default();
        let want: BTreeMap<&str, &Task> = state
            .attached_tasks_on(node)
            .map(|t| (t.id.as_str(), t))
            .collect();

        // Gone or changed tasks first (a changed task is detached, then attached again).
        let stale: Vec<String> = self
            .tasks
            .iter()
            .filter(|(id, a)| match want.get(id.as_str()) {
                None => true,
                Some(t) => {
                    t.netns.as_deref() != Some(a.netns.as_path())
                        || fingerprint(state, t) != a.fingerprint
                }
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.detach(&id).await;
            out.removed.push(id);
        }

        for (id, task) in want {
            if self.tasks.contains_key(id) {
                continue;
            }
            match self.attach(state, task).await {
                Ok(()) => out.added.push(id.to_string()),
                Err(e) => {
                    warn!(task = id, error = %e, "cannot attach task");
                    out.failed.push(e);
                }
            }
        }

        for name in keep {
            if let Some(net) = state.networks.get(name)
                && let Err(e) = self.ensure_bridge(net).await
            {
                warn!(network = name, error = %e, "cannot create bridge");
                out.failed.push(e);
            }
        }

        // Bridges of networks no attached task uses any more (and not kept).
        let used: BTreeSet<&str> = self
            .tasks
            .values()
            .flat_map(|a| a.links.iter().map(|l| l.network.as_str()))
            .chain(keep.iter().map(String::as_str))
            .collect();
        let unused: Vec<String> = self
            .bridges
            .keys()
            .filter(|n| !used.contains(n.as_str()))
            .cloned()
            .collect();
        for n in unused {
            if let Some(b) = self.bridges.remove(&n)
                && let Err(e) = self.nl.delete_link(&b.name).await
            {
                warn!(network = n, error = %e, "cannot delete bridge");
            }
        }
        out
    }

    async fn ensure_bridge(&mut self, net: &Network) -> Result<Bridge, AttachError> {
        if let Some(b) = self.bridges.get(&net.name) {
            return Ok(b.clone());
        }
        let name = bridge_name(net);
        let wrap = |source| AttachError::Bridge {
            network: net.name.clone(),
            source,
        };
        // The gateway's MAC derives from its address, like the tasks' (stable across restarts).
        let l = self
            .nl
            .ensure_bridge(&name, self.mtu, task_mac(net.gateway))
            .await
            .map_err(wrap)?;
        self.nl
            .add_addr(l.index, net.gateway, net.subnet.prefix_len())
            .await
            .map_err(wrap)?;
        self.nl.set_up(l.index).await.map_err(wrap)?;
        let b = Bridge {
            name,
            index: l.index,
            mac: l.mac,
        };
        info!(network = net.name, bridge = b.name, "bridge ready");
        self.bridges.insert(net.name.clone(), b.clone());
        Ok(b)
    }

    async fn attach(&mut self, state: &State, task: &Task) -> Result<(), AttachError> {
        let tid = task.id.clone();
        let path = task
            .netns
            .clone()
            .ok_or_else(|| AttachError::NoNetns { task: tid.clone() })?;
        let ns = netns::open(&path).map_err(|source| AttachError::Netns {
            task: tid.clone(),
            source,
        })?;
        let fp = fingerprint(state, task);
        let mut links = Vec::new();
        let mut inside = Vec::new();
        for (i, (network, addr, gw, prefix)) in fp.iter().enumerate() {
            let Some(net) = state.networks.get(network) else {
                continue;
            };
            let br = self.ensure_bridge(net).await?;
            let host = host_veth_name(&tid, network);
            let ifname = format!("eth{i}");
            let mac = task_mac(*addr);
            let wrap = |source| AttachError::Netlink {
                task: tid.clone(),
                source,
            };
            let l = match self.nl.link(&host).await.map_err(wrap)? {
                Some(l) => l, // left by a previous run: adopt it
                None => self
                    .nl
                    .create_veth_into(&host, &ifname, ns.as_raw_fd(), mac, self.mtu)
                    .await
                    .map_err(wrap)?,
            };
            self.nl
                .set_controller_up(l.index, br.index)
                .await
                .map_err(wrap)?;
            links.push(HostLink {
                network: network.clone(),
                host_name: host,
                host_index: l.index,
                task_mac: mac,
            });
            inside.push((ifname, *addr, *prefix, *gw));
        }
        let tid2 = tid.clone();
        let path2 = path.clone();
        let r = tokio::task::spawn_blocking(move || configure_inside(&path2, inside))
            .await
            .map_err(|e| AttachError::Inside {
                task: tid2.clone(),
                message: e.to_string(),
            })?;
        if let Err(message) = r {
            // Leave nothing half-made behind.
            for l in &links {
                let _ = self.nl.delete_link(&l.host_name).await;
            }
            return Err(AttachError::Inside { task: tid, message });
        }
        info!(task = tid, netns = %path.display(), interfaces = links.len(), "task attached");
        self.tasks.insert(
            tid,
            Attached {
                netns: path,
                fingerprint: fp,
                links,
            },
        );
        Ok(())
    }

    /// Remove a task's interfaces (deleting the host side removes the task side too).
    pub async fn detach(&mut self, task_id: &str) {
        if let Some(a) = self.tasks.remove(task_id) {
            for l in &a.links {
                if let Err(e) = self.nl.delete_link(&l.host_name).await {
                    warn!(task = task_id, error = %e, "cannot delete task interface");
                }
            }
            info!(task = task_id, "task detached");
        }
    }

    /// Remove everything this attacher made. Every error is collected, none stops the rest.
    pub async fn teardown(&mut self) -> Vec<AttachError> {
        let mut errors = Vec::new();
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            if let Some(a) = self.tasks.remove(&id) {
                for l in &a.links {
                    if let Err(source) = self.nl.delete_link(&l.host_name).await {
                        errors.push(AttachError::Netlink {
                            task: id.clone(),
                            source,
                        });
                    }
                }
            }
        }
        for (n, b) in std::mem::take(&mut self.bridges) {
            if let Err(source) = self.nl.delete_link(&b.name).await {
                errors.push(AttachError::Bridge { network: n, source });
            }
        }
        errors
    }
}

/// Inside the task's namespace: `lo` up; each `eth<i>` gets its address, comes up, gets GRO
/// (so frames redirected by XDP into the veth are accepted); default route via the first
/// network's gateway.
fn configure_inside(
    path: &Path,
    ifaces: Vec<(String, Ipv4Addr, u8, Ipv4Addr)>,
) -> Result<(), String> {
    netns::run_in(path, move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let nl = Netlink::open().map_err(|e| e.to_string())?;
            if let Some(lo) = nl.link("lo").await.map_err(|e| e.to_string())? {
                nl.set_up(lo.index).await.map_err(|e| e.to_string())?;
            }
            for (i, (name, addr, prefix, gw)) in ifaces.iter().enumerate() {
                let l = nl
                    .link(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{name} missing"))?;
                nl.add_addr(l.index, *addr, *prefix)
                    .await
                    .map_err(|e| e.to_string())?;
                nl.set_up(l.index).await.map_err(|e| e.to_string())?;
                set_gro(name, true).map_err(|e| format!("{name}: enable GRO: {e}"))?;
                if i == 0 {
                    nl.set_default_route(*gw, l.index)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
    })
    .map_err(|e| e.to_string())?
}

/// `ethtool -K IFACE gro on|off` through the legacy ioctl (no ethtool binary needed).
pub fn set_gro(ifname: &str, on: bool) -> std::io::Result<()> {
    ethtool_value(ifname, ETHTOOL_SGRO, on as u32).map(|_| ())
}

/// Is GRO on (`ethtool -k IFACE`)?
pub fn gro(ifname: &str) -> std::io::Result<bool> {
    ethtool_value(ifname, ETHTOOL_GGRO, 0).map(|v| v != 0)
}

const ETHTOOL_GGRO: u32 = 0x0000_002b;
const ETHTOOL_SGRO: u32 = 0x0000_002c;

/// One `SIOCETHTOOL` call with a `struct ethtool_value` (in this thread's namespace); the
/// value the kernel left in it.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data };
    // SAFETY: a zeroed ifreq is valid; we fill the name and the data pointer.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = ifname.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: plain socket.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours; ifr lives through the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(v.data) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_stable() {
        let n = host_veth_name("w1a2b3c4d5e6f7g8h9i0j1k2l", "demo");
        assert_eq!(n.len(), 10);
        assert_eq!(n, host_veth_name("w1a2b3c4d5e6f7g8h9i0j1k2l", "demo"));
        assert_ne!(n, host_veth_name("w1a2b3c4d5e6f7g8h9i0j1k2l", "other"));
        let net = Network {
            name: "x".into(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            vni: 16_777_215,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        };
        assert!(bridge_name(&net).len() <= 15);
    }

    #[test]
    fn mac_from_ip_like_docker() {
        assert_eq!(
            task_mac(Ipv4Addr::new(10, 0, 1, 11)),
            [0x02, 0x42, 10, 0, 1, 11]
        );
    }
}
