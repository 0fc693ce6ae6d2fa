//! The reconcile loop: every snapshot from the source is converged into the kernel —
//! task interfaces (attach), reverse-NAT programs on them, load-balancer maps (tables), DNS —
//! and a refused snapshot changes nothing: the last good tables keep serving.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    attach::{Attacher, Netlink, NetlinkError},
    ebpf::{Datapath, DatapathError, Hook, PortRange},
    model::State,
    source::{Source, SourceError, SourceEvent},
    tables::{self, Reach, Tables},
};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name in the state.
    pub node: String,
    /// Interfaces whose incoming published-port traffic is balanced (empty: the default
    /// route's interface).
    pub interfaces: Vec<String>,
    pub hook: Hook,
    /// Source ports of flows SNATed to tasks on other nodes.
    pub snat_ports: PortRange,
    /// Sizes of the conntrack maps.
    pub conntrack: crate::ebpf::CtSizes,
    /// bpffs directory of the pinned maps.
    pub pin_dir: PathBuf,
    /// Directory for the catalog that `status` reads (ids → names).
    pub run_dir: PathBuf,
    /// cgroup-v2 directory for the socket-level LB (local clients); `None` disables it.
    pub cgroup: Option<PathBuf>,
    /// On shutdown keep the maps pinned (an upgrade hands them to the next agent).
    pub keep_datapath: bool,
    pub reach: Reach,
    /// Retry period for tasks that could not be attached, and node-address refresh.
    pub resync: Duration,
    /// Period of the full reconcile against the kernel (drift repair) when nothing waits
    /// for a retry; checked on resync ticks.
    pub reconcile: Duration,
    pub runtime: Runtime,
    /// Where to serve /metrics, /healthz, /readyz (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Running as this Swarm service (Engine API endpoint, service name): on shutdown, keep
    /// the data path while the service exists (a rolling update), remove it when it is gone.
    pub swarm_service: Option<(crate::source::swarm::DockerEndpoint, String)>,
}

/// Who owns the tasks' namespaces and networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// mesh does: it attaches tasks to per-network bridges, builds the overlays, serves DNS
    /// (the state file's world).
    Mesh,
    /// Docker does (a real Swarm): mesh takes over only what IPVS would do, where Docker puts
    /// IPVS — published ports in the `ingress_sbox` namespace (TC, SNAT as Swarm does) and
    /// service VIPs in each task's sandbox (socket-level LB).
    Docker {
        /// The ingress sandbox's netns; default: `ingress_sbox` next to the tasks' sandboxes
        /// (their `SandboxKey`s come from the Engine API).
        ingress_sbox: Option<PathBuf>,
    },
}

impl AgentConfig {
    pub fn for_node(node: &str) -> Self {
        AgentConfig {
            node: node.to_string(),
            interfaces: Vec::new(),
            hook: Hook::Xdp,
            snat_ports: PortRange::default(),
            conntrack: crate::ebpf::CtSizes::default(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/mesh/{node}")),
            run_dir: PathBuf::from(format!("/run/mesh/{node}")),
            cgroup: crate::ebpf::default_cgroup(),
            keep_datapath: false,
            reach: Reach::LocalOnly,
            resync: Duration::from_secs(2),
            reconcile: FULL_RESYNC,
            runtime: Runtime::Mesh,
            metrics_addr: None,
            swarm_service: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("no interface given and no IPv4 default route to pick one from: pass --iface")]
    NoInterface,
    #[error("node {node} is not in the state (nodes: {known})")]
    UnknownNode { node: String, known: String },
    #[error("cannot write {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("overlay: {0}")]
    Overlay(String),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "docker runtime: no ingress sandbox found (no local task with a sandbox yet); pass --docker-ingress-sbox"
    )]
    NoIngressSandbox,
    #[error("docker runtime: ingress sandbox {path}: {message}")]
    Sandbox { path: PathBuf, message: String },
}

/// Docker's ingress sandbox: `ingress_sbox` in the directory of the local tasks' sandboxes.
fn docker_ingress_sbox(state: &State, node: &str) -> Option<PathBuf> {
    state
        .tasks
        .values()
        .filter(|t| t.node == node)
        .filter_map(|t| t.netns.as_ref())
        .filter_map(|p| p.parent().map(|d| d.join("ingress_sbox")))
        .find(|p| p.exists())
}

/// Interface names and IPv4 addresses inside a namespace (loopback left out).
async fn sandbox_addrs(sbox: &Path) -> Result<Vec<(String, Ipv4Addr)>, AgentError> {
    let path = sbox.to_path_buf();
    let err = |message: String| AgentError::Sandbox {
        path: sbox.to_path_buf(),
        message,
    };
    let r = tokio::task::spawn_blocking(move || {
        crate::netns::run_in(&path, || -> Result<Vec<(String, Ipv4Addr)>, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let nl = Netlink::open().map_err(|e| e.to_string())?;
                let links = nl.links().await.map_err(|e| e.to_string())?;
                let addrs = nl.ipv4_addrs().await.map_err(|e| e.to_string())?;
                Ok(addrs
                    .into_iter()
                    .filter(|(_, a)| !a.is_loopback())
                    .filter_map(|(i, a)| {
                        links
                            .iter()
                            .find(|l| l.index == i)
                            .map(|l| (l.name.clone(), a))
                    })
                    .collect())
            })
        })
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(|e| err(e.to_string()))?;
    r.map_err(err)
}

async fn sandbox_interfaces(sbox: &Path) -> Result<Vec<String>, AgentError> {
    let mut v: Vec<String> = sandbox_addrs(sbox)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Let the ingress sandbox's interfaces forward, per device and over rtnetlink (the agent's
/// container has /proc/sys read-only). The TC program routes rewritten packets with
/// `bpf_fib_lookup`, which refuses (FWD_DISABLED) on an ingress device that does not forward;
/// a sandbox copies its settings from the host's namespace when Docker creates it, so a host
/// with forwarding off (or a dockerd outside the host's namespace) leaves it off. Rewritten
/// packets the kernel gets back (no route answer) have the sandbox's own address as source:
/// `accept_local` on, and `rp_filter` off on the device, let them through.
async fn sandbox_forwarding(sbox: &Path, ifaces: &[String]) -> Result<(), String> {
    use crate::attach::netlink::ipv4_conf::{ACCEPT_LOCAL, FORWARDING, RP_FILTER};
    let path = sbox.to_path_buf();
    let ifaces = ifaces.to_vec();
    tokio::task::spawn_blocking(move || {
        crate::netns::run_in(&path, move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let nl = Netlink::open().map_err(|e| e.to_string())?;
                for name in &ifaces {
                    let l = nl
                        .link(name)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("{name}: no such link"))?;
                    nl.set_ipv4_conf(
                        l.index,
                        &[(FORWARDING, 1), (ACCEPT_LOCAL, 1), (RP_FILTER, 0)],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                }
                // The effective rp_filter is the higher of the device's and `all`'s; only
                // /proc/sys reaches `all` (best effort: read-only in a container).
                let _ = std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0");
                Ok(())
            })
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?
}

/// The sandbox's interface on Docker's gateway bridge (the one not on the ingress network):
/// its address and MAC, and the host-side veth leading to it (and that bridge's MAC).
/// The ingress sandbox's veth on Docker's gateway bridge, as the data path sees it, and its
/// host-side name. XDP redirects published-port traffic into that veth, and a veth drops
/// XDP-redirected frames unless its peer (the sandbox's side) has GRO on or an XDP program:
/// Docker leaves GRO off there, so it is turned on; the returned `SandboxGro` says whether to
/// turn it off again when the agent cleans up.
async fn ingress_sandbox_link(
    nl: &Netlink,
    sbox: &Path,
    state: &State,
) -> Result<(tables::IngressSandbox, String, SandboxGro), AgentError> {
    let err = |message: String| AgentError::Sandbox {
        path: sbox.to_path_buf(),
        message,
    };
    let net = state
        .networks
        .get(crate::model::INGRESS_NETWORK)
        .ok_or_else(|| err("the state has no ingress network".into()))?;
    let subnet = net.subnet;
    let path = sbox.to_path_buf();
    let inside = tokio::task::spawn_blocking(move || {
        crate::netns::run_in(
            &path,
            move || -> Result<(Ipv4Addr, [u8; 6], u32, Option<String>), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let nl = Netlink::open().map_err(|e| e.to_string())?;
                    let links = nl.links().await.map_err(|e| e.to_string())?;
                    for (i, a) in nl.ipv4_addrs().await.map_err(|e| e.to_string())? {
                        if a.is_loopback() || subnet.contains(&a) {
                            continue;
                        }
                        if let Some(l) = links.iter().find(|l| l.index == i)
                            && let Some(peer) = l.peer
                        {
                            let was_on = crate::attach::gro(&l.name)
                                .map_err(|e| format!("{}: read GRO: {e}", l.name))?;
                            if !was_on {
                                crate::attach::set_gro(&l.name, true)
                                    .map_err(|e| format!("{}: enable GRO: {e}", l.name))?;
                            }
                            return Ok((a, l.mac, peer, (!was_on).then(|| l.name.clone())));
                        }
                    }
                    Err("no veth on Docker's gateway bridge".into())
                })
            },
        )
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(|e| err(e.to_string()))?
    .map_err(err)?;
    let (addr, mac, peer, gro_enabled) = inside;
    let host = nl
        .link_by_index(peer)
        .await?
        .ok_or_else(|| err(format!("its veth peer #{peer} is not in this namespace")))?;
    let bridge_mac = match host.controller {
        Some(b) => nl.link_by_index(b).await?.map(|l| l.mac).unwrap_or([0; 6]),
        None => [0; 6],
    };
    let sb = tables::IngressSandbox {
        addr,
        link: tables::LinkKey {
            ifindex: host.index,
            task_mac: mac,
            gw_mac: bridge_mac,
        },
    };
    Ok((
        sb,
        host.name,
        SandboxGro {
            sbox: sbox.to_path_buf(),
            iface: gro_enabled,
        },
    ))
}

/// GRO the agent turned on in the ingress sandbox (see [`ingress_sandbox_link`]).
#[derive(Debug, Default)]
struct SandboxGro {
    sbox: PathBuf,
    /// The sandbox-side interface whose GRO was off before the agent.
    iface: Option<String>,
}

impl SandboxGro {
    /// Put GRO back as Docker left it.
    async fn restore(&self) {
        let Some(name) = self.iface.clone() else {
            return;
        };
        let path = self.sbox.clone();
        let r = tokio::task::spawn_blocking(move || {
            crate::netns::run_in(&path, move || crate::attach::set_gro(&name, false))
        })
        .await;
        if !matches!(r, Ok(Ok(Ok(())))) {
            warn!(sandbox = %self.sbox.display(), "cannot turn GRO back off in the ingress sandbox");
        }
    }
}

/// The ingress sandbox's address on the `ingress` network (Swarm SNATs to it).
async fn sandbox_ingress_addr(sbox: &Path, state: &State) -> Result<Ipv4Addr, AgentError> {
    let net = state
        .networks
        .get(crate::model::INGRESS_NETWORK)
        .ok_or_else(|| AgentError::Sandbox {
            path: sbox.into(),
            message: "the state has no ingress network".into(),
        })?;
    sandbox_addrs(sbox)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .find(|a| net.subnet.contains(a))
        .ok_or_else(|| AgentError::Sandbox {
            path: sbox.into(),
            message: format!("no address in {}", net.subnet),
        })
}

/// What `status` needs to name ids (written next to the pinned maps' owner, in `run_dir`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub node: String,
    pub frontends: Vec<CatalogFrontend>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CatalogFrontend {
    pub svc_id: u32,
    pub service: String,
    pub protocol: String,
    /// "*" for a published port (any node address), else the VIP.
    pub addr: String,
    pub port: u16,
    pub backends: Vec<CatalogBackend>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CatalogBackend {
    pub id: u32,
    pub task: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub local: bool,
}

pub const CATALOG_FILE: &str = "catalog.json";

/// A per-task service the agent runs inside attached tasks (the embedded DNS server): told
/// of every snapshot, attached to every attached task, detached when it goes.
pub trait TaskService: Send {
    fn update(&self, state: Arc<State>);
    /// Idempotent: called on every converge for every attached task.
    fn attach<'a>(&'a self, task: &'a crate::model::Task) -> BoxFuture<'a, Result<(), String>>;
    fn detach<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, ()>;
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// The DNS server's counters, for /metrics (None for other services).
    fn dns_stats(&self) -> Option<Box<dyn Fn() -> crate::dns::DnsStats + Send + Sync>> {
        None
    }
    /// For the DNS server: the port it listens on at 127.0.0.11 in tasks, when that is not
    /// 53 (the socket hooks then send 127.0.0.11:53 there).
    fn dns_port(&self) -> Option<u16> {
        None
    }
}

pub struct Agent {
    cfg: AgentConfig,
    dp: Datapath,
    nl: Netlink,
    attacher: Attacher,
    tables: Tables,
    /// Desired frontends per service, recomputed only for what a snapshot changed.
    desired: tables::DesiredCache,
    /// Diff the whole desired state on the next sync (first sync, after an error).
    full_sync: bool,
    catalog_written: bool,
    state: Arc<State>,
    /// Host veths with the reverse-NAT program attached.
    tc_attached: BTreeSet<String>,
    node_addrs: Vec<Ipv4Addr>,
    /// Network-namespace cookie of each attached task (socket-level VIP LB).
    task_cookies: std::collections::BTreeMap<String, u64>,
    /// Last per-task service error, so a retried failure is logged once, not per retry.
    service_errors: std::collections::BTreeMap<String, String>,
    /// Docker runtime: the ingress sandbox mesh's programs run in.
    docker_sbox: Option<PathBuf>,
    /// Docker runtime: how the node reaches that sandbox.
    ingress_sbox: Option<tables::IngressSandbox>,
    /// GRO turned on in Docker's ingress sandbox, undone on cleanup.
    sandbox_gro: SandboxGro,
    /// VXLAN overlays (mesh runtime, cluster reach).
    overlay: Option<crate::overlay::Overlay>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    overlay_errors: Vec<String>,
    pub dns: Option<Box<dyn TaskService>>,
    /// The snapshot the DNS index was last built from (rebuilt only when it changes).
    dns_indexed: std::sync::Weak<State>,
    /// Something in the last sync failed or waits for the outside world (a namespace not
    /// there yet, a netlink or map error): the next resync tick retries.
    retry: bool,
    /// When everything was last reconciled against the kernel (drift repair).
    last_full: Instant,
}

/// Without pending retries, a resync tick reconciles everything (links, overlays, maps)
/// only this often by default (`--reconcile-ms`): an idle agent then costs next to nothing
/// between changes.
pub const FULL_RESYNC: Duration = Duration::from_secs(30);

impl Agent {
    /// Load (or adopt) the datapath, converge to `state`, then attach the programs.
    pub async fn start(
        cfg: AgentConfig,
        state: Arc<State>,
        dns: Option<Box<dyn TaskService>>,
    ) -> Result<Agent, AgentError> {
        let cfg_metrics = cfg.metrics_addr.is_some();
        if !state.nodes.contains_key(&cfg.node) {
            return Err(AgentError::UnknownNode {
                node: cfg.node.clone(),
                known: state.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let nl = Netlink::open()?;
        // Forwarding on, as on a Swarm node: traffic the programs hand to the kernel
        // (no redirect target) is routed to the tasks.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            warn!(error = %e, "cannot enable IPv4 forwarding");
        }
        let pinned_before = cfg.pin_dir.join(mesh_common::maps::FRONTENDS).exists();
        let mut dp = Datapath::load_sized(&cfg.pin_dir, cfg.conntrack)?;
        let mut tables = if pinned_before {
            info!(pins = %cfg.pin_dir.display(), "reusing pinned maps: live connections are kept");
            dp.maps.adopt_tables()
        } else {
            Tables::new()
        };
        // Flows to tasks on other nodes get this node's underlay address as their source,
        // so the replies come back here (cluster reach only).
        let docker_sbox = match &cfg.runtime {
            Runtime::Docker { ingress_sbox } => Some(
                ingress_sbox
                    .clone()
                    .or_else(|| docker_ingress_sbox(&state, &cfg.node))
                    .ok_or(AgentError::NoIngressSandbox)?,
            ),
            Runtime::Mesh => None,
        };
        let snat = match &docker_sbox {
            // Under Docker the ingress sandbox's address on the ingress network, as Swarm SNATs.
            Some(sbox) => Some(sandbox_ingress_addr(sbox, &state).await?),
            None => (cfg.reach == Reach::Cluster).then(|| state.nodes[&cfg.node].address),
        };
        let dns_port = match (&cfg.runtime, &dns, &cfg.cgroup) {
            (Runtime::Mesh, Some(d), Some(_)) => d.dns_port().unwrap_or(0),
            _ => 0,
        };
        let ports = cfg.snat_ports;
        dp.configure_dns(snat.map(|a| (a, ports)), true, dns_port)?;
        if snat.is_some() {
            tables.reserve_ports(ports.min, ports.max);
            match PortRange::ephemeral() {
                Some(eph) if eph.overlaps(&ports) => warn!(
                    snat_ports = %ports,
                    ip_local_port_range = %eph,
                    "the SNAT ports overlap the node's own connection ports: a node connection \
                     and a SNATed flow to the same task may pick the same tuple (move --snat-ports \
                     or net.ipv4.ip_local_port_range)"
                ),
                _ => {}
            }
        }
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| AgentError::RunDir {
            path: cfg.run_dir.clone(),
            source,
        })?;
        let mut agent = Agent {
            attacher: Attacher::new(nl.clone()),
            cfg,
            dp,
            nl,
            tables,
            desired: tables::DesiredCache::default(),
            full_sync: true,
            catalog_written: false,
            state: Arc::new(State::default()),
            tc_attached: BTreeSet::new(),
            node_addrs: Vec::new(),
            task_cookies: Default::default(),
            service_errors: Default::default(),
            docker_sbox: None,
            ingress_sbox: None,
            sandbox_gro: SandboxGro::default(),
            overlay: None,
            metrics: None,
            overlay_errors: Vec::new(),
            dns,
            dns_indexed: std::sync::Weak::new(),
            retry: false,
            last_full: Instant::now(),
        };
        if cfg_metrics {
            let m = crate::metrics::Metrics::new(agent.cfg.pin_dir.clone());
            if let Some(f) = agent.dns.as_ref().and_then(|d| d.dns_stats()) {
                m.set_dns(f);
            }
            agent.metrics = Some(m);
        }
        if agent.cfg.runtime == Runtime::Mesh && agent.cfg.reach == Reach::Cluster {
            agent.overlay = Some(
                crate::overlay::Overlay::open(crate::overlay::OverlayConfig::default())
                    .map_err(|e| AgentError::Overlay(e.to_string()))?,
            );
        }
        agent.docker_sbox = docker_sbox.clone();
        if let Some(sbox) = &docker_sbox {
            let (sb, host_veth, gro) = ingress_sandbox_link(&agent.nl, sbox, &state).await?;
            agent.sandbox_gro = gro;
            // Reverse NAT for what comes back out of the sandbox (the TC program tasks get).
            agent.dp.attach_task(&host_veth)?;
            info!(sandbox_addr = %sb.addr, host_veth, "published ports reach Docker's ingress sandbox");
            agent.ingress_sbox = Some(sb);
        }
        agent.refresh_node_addrs().await;
        agent.apply(state).await;

        if let Some(sbox) = &docker_sbox {
            // Published ports: Docker's iptables steer them into the ingress sandbox; its
            // interfaces get the TC program (forward on the gateway-bridge side, replies on
            // the ingress-overlay side).
            let ifaces = sandbox_interfaces(sbox).await?;
            if let Err(e) = sandbox_forwarding(sbox, &ifaces).await {
                warn!(sandbox = %sbox.display(), error = %e, "cannot enable forwarding in the ingress sandbox: published ports will not reach tasks");
            }
            for iface in &ifaces {
                agent.dp.attach_ingress_in(sbox, iface, Hook::Tc)?;
            }
            // External clients: XDP on the node's interfaces (given, or the default route's).
            let host_ifaces = if agent.cfg.interfaces.is_empty() {
                match agent.nl.default_route_ifindex().await? {
                    Some(i) => agent
                        .nl
                        .link_by_index(i)
                        .await?
                        .map(|l| vec![l.name])
                        .unwrap_or_default(),
                    None => {
                        warn!(
                            "no default route and no --iface: only local clients reach published ports"
                        );
                        Vec::new()
                    }
                }
            } else {
                agent.cfg.interfaces.clone()
            };
            for iface in &host_ifaces {
                agent.dp.attach_ingress(iface, agent.cfg.hook)?;
            }
            if let Some(cg) = agent.cfg.cgroup.clone() {
                agent.dp.attach_sock(&cg)?;
            }
            info!(node = agent.cfg.node, sandbox = %sbox.display(), interfaces = ?ifaces, host_interfaces = ?host_ifaces, "agent ready (docker runtime)");
            if let Some(m) = &agent.metrics {
                m.set_ready();
            }
            return Ok(agent);
        }

        let ifaces = if agent.cfg.interfaces.is_empty() {
            let idx = agent
                .nl
                .default_route_ifindex()
                .await?
                .ok_or(AgentError::NoInterface)?;
            let l = agent
                .nl
                .link_by_index(idx)
                .await?
                .ok_or(AgentError::NoInterface)?;
            vec![l.name]
        } else {
            agent.cfg.interfaces.clone()
        };
        for iface in &ifaces {
            if snat.is_some() {
                // SNATed flows leave through the kernel with the node's own address as
                // source; accept them (and their routing) on the interfaces they arrive on.
                for (knob, v) in [("accept_local", "1"), ("rp_filter", "0")] {
                    let p = format!("/proc/sys/net/ipv4/conf/{iface}/{knob}");
                    if let Err(e) = std::fs::write(&p, v) {
                        warn!(path = p, error = %e, "cannot set sysctl");
                    }
                }
            }
            agent.dp.attach_ingress(iface, agent.cfg.hook)?;
        }
        if let Some(cg) = agent.cfg.cgroup.clone() {
            agent.dp.attach_sock(&cg)?;
        }
        info!(node = agent.cfg.node, interfaces = ?ifaces, hook = ?agent.cfg.hook, "agent ready");
        if let Some(m) = &agent.metrics {
            m.set_ready();
        }
        Ok(agent)
    }

    /// Should a resync tick reconcile now: something is waiting to be retried, or the last
    /// full reconcile is [`AgentConfig::reconcile`] old.
    pub fn resync_due(&self) -> bool {
        self.retry || self.last_full.elapsed() >= self.cfg.reconcile
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Converge everything to `state`.
    pub async fn apply(&mut self, state: Arc<State>) {
        let started = Instant::now();
        self.last_full = started;
        let mut retry = false;
        let span = info_span!("converge", node = %self.cfg.node);
        async {
            // With overlays, every network gets its bridge on every node: published ports
            // reach remote tasks through it.
            let keep: BTreeSet<String> = match self.cfg.reach {
                Reach::Cluster => state.networks.keys().cloned().collect(),
                Reach::LocalOnly | Reach::Routed => BTreeSet::new(),
            };
            let conv = if self.cfg.runtime == Runtime::Mesh {
                self.attacher.converge(&state, &self.cfg.node, &keep).await
            } else {
                crate::attach::Converged::default()
            };
            retry |= !conv.failed.is_empty();
            if let Some(ov) = &mut self.overlay {
                let rep = ov.converge(&state, &self.cfg.node, &self.attacher.bridges()).await;
                // Errors are retried every sync: log them when they change, not per retry.
                let errs: Vec<String> = rep.errors.iter().map(|e| e.to_string()).collect();
                if errs != self.overlay_errors {
                    for e in &errs {
                        warn!(error = e, "overlay");
                    }
                    self.overlay_errors = errs;
                }
                retry |= !self.overlay_errors.is_empty();
                if !rep.is_noop() {
                    info!(report = ?rep, "overlays converged");
                }
            }
            // Reverse-NAT programs follow the task interfaces.
            let want: BTreeSet<String> = self
                .attacher
                .attached()
                .flat_map(|id| self.attacher.host_links(id))
                .map(|l| l.host_name)
                .collect();
            for gone in self.tc_attached.difference(&want).cloned().collect::<Vec<_>>() {
                self.dp.detach_task(&gone);
                self.tc_attached.remove(&gone);
            }
            for new in want.difference(&self.tc_attached).cloned().collect::<Vec<_>>() {
                match self.dp.attach_task(&new) {
                    Ok(()) => {
                        self.tc_attached.insert(new);
                    }
                    Err(e) => {
                        error!(iface = new, error = %e, "cannot attach reverse NAT");
                        retry = true;
                    }
                }
            }
            retry |= !self.sync_task_nets(&state).await;
            retry |= !self.sync_isolation(&state);
            if let (Some(dns), Runtime::Mesh) = (&self.dns, &self.cfg.runtime) {
                if !std::sync::Weak::ptr_eq(&self.dns_indexed, &Arc::downgrade(&state)) {
                    dns.update(state.clone());
                    self.dns_indexed = Arc::downgrade(&state);
                }
                for id in &conv.removed {
                    dns.detach(id).await;
                }
                let attached: Vec<String> = self.attacher.attached().cloned().collect();
                self.service_errors.retain(|id, _| attached.contains(id));
                for id in attached {
                    if let Some(task) = state.tasks.get(&id) {
                        match dns.attach(task).await {
                            Ok(()) => {
                                if self.service_errors.remove(&id).is_some() {
                                    info!(task = id, "DNS now served in task");
                                }
                            }
                            Err(e) => {
                                if self.service_errors.get(&id) != Some(&e) {
                                    warn!(task = id, error = %e, "cannot serve DNS in task (retrying quietly)");
                                    self.service_errors.insert(id, e);
                                }
                            }
                        }
                    }
                }
                retry |= !self.service_errors.is_empty();
            }
            // Only the services this snapshot changed are recomputed and diffed.
            let changes = self.desired.update(
                &state,
                &self.cfg.node,
                &self.attacher.links(),
                self.cfg.reach,
                self.ingress_sbox.as_ref(),
            );
            let refs: Vec<(tables::FeId, Option<&tables::FrontendSpec>)> =
                changes.iter().map(|(id, spec)| (*id, spec.as_ref())).collect();
            let mut programmed = false;
            let changed = !changes.is_empty() || !self.catalog_written;
            // The first sync (and the one after an error) diffs everything: what the maps
            // hold (adopted from a previous agent, say) may include frontends nobody wants.
            let result = if self.full_sync {
                self.tables.apply(self.desired.all())
            } else {
                self.tables.apply_changes(&refs)
            };
            match result {
                Ok(ops) => {
                    if let Err(e) = self.dp.maps.apply(&ops) {
                        error!(error = %e, "programming the maps failed; retrying on the next sync");
                        // Forget what we believe is programmed: the next sync rewrites it all.
                        self.tables = self.dp.maps.adopt_tables();
                        self.desired = tables::DesiredCache::default();
                        self.full_sync = true;
                    } else if !ops.is_empty() {
                        programmed = true;
                        info!(
                            ops = ops.len(),
                            attached = conv.added.len(),
                            detached = conv.removed.len(),
                            elapsed_us = started.elapsed().as_micros() as u64,
                            "tables programmed"
                        );
                    } else {
                        programmed = true;
                    }
                    if programmed {
                        self.full_sync = false;
                    }
                }
                Err(e) => {
                    error!(error = %e, "state does not fit the maps; keeping the last good tables");
                    // Recompute everything next time (the cache moved ahead of the maps).
                    self.desired = tables::DesiredCache::default();
                    self.full_sync = true;
                }
            }
            let old = std::mem::replace(&mut self.state, state);
            release_off_path(old);
            if changed && programmed {
                match self.write_catalog() {
                    Ok(cat) => {
                        self.catalog_written = true;
                        if let Some(m) = &self.metrics {
                            m.set_catalog(cat);
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot write the catalog"),
                }
            }
            if let Some(m) = &self.metrics {
                m.record_sync(started.elapsed(), programmed);
            }
            self.retry = retry || self.full_sync;
        }
        .instrument(span)
        .await
    }

    /// Tell the socket-level VIP LB which namespaces are tasks and which networks each is on.
    /// False if some task could not be covered yet (retried on the next tick).
    async fn sync_task_nets(&mut self, state: &State) -> bool {
        let mut complete = true;
        let attached: BTreeSet<String> = match self.cfg.runtime {
            Runtime::Mesh => self.attacher.attached().cloned().collect(),
            // Docker made them: every running task of this node with a sandbox.
            Runtime::Docker { .. } => state
                .attached_tasks_on(&self.cfg.node)
                .filter(|t| {
                    let there = t.netns.as_ref().is_some_and(|p| p.exists());
                    // A sandbox Docker has not made yet: look again on the next tick.
                    complete &= there || t.netns.is_none();
                    there
                })
                .map(|t| t.id.clone())
                .collect(),
        };
        self.task_cookies.retain(|id, _| attached.contains(id));
        for id in &attached {
            if self.task_cookies.contains_key(id) {
                continue;
            }
            let Some(path) = state.tasks.get(id).and_then(|t| t.netns.clone()) else {
                continue;
            };
            let r = tokio::task::spawn_blocking(move || {
                crate::netns::run_in(&path, crate::ebpf::netns_cookie)
            })
            .await;
            complete &= matches!(r, Ok(Ok(Ok(_))));
            match r {
                Ok(Ok(Ok(cookie))) => {
                    self.task_cookies.insert(id.clone(), cookie);
                }
                Ok(Ok(Err(e))) => {
                    warn!(task = id, error = %e, "cannot read the task's netns cookie")
                }
                Ok(Err(e)) => warn!(task = id, error = %e, "cannot enter the task's netns"),
                Err(e) => warn!(task = id, error = %e, "netns cookie worker failed"),
            }
        }
        let mut nets = std::collections::BTreeMap::new();
        for (id, cookie) in &self.task_cookies {
            let Some(task) = state.tasks.get(id) else {
                continue;
            };
            let ids: Vec<u32> = task
                .networks
                .iter()
                .filter_map(|n| state.networks.get(&n.network).map(|net| net.vni))
                .collect();
            nets.insert(*cookie, ids);
        }
        if let Err(e) = self.dp.maps.set_task_nets(&nets) {
            error!(error = %e, "cannot program task namespaces");
            complete = false;
        }
        complete
    }

    /// Network isolation tables: every network's subnet, and which network each task
    /// interface is on. False if the maps could not be programmed.
    fn sync_isolation(&mut self, state: &State) -> bool {
        let subnets: Vec<(ipnet::Ipv4Net, u32)> =
            state.networks.values().map(|n| (n.subnet, n.vni)).collect();
        let mut ifaces = std::collections::BTreeMap::new();
        for id in self.attacher.attached() {
            for l in self.attacher.host_links(id) {
                if let Some(net) = state.networks.get(&l.network) {
                    ifaces.insert(l.host_index, net.vni);
                }
            }
        }
        if let Err(e) = self
            .dp
            .maps
            .set_subnets(&subnets)
            .and_then(|_| self.dp.maps.set_iface_nets(&ifaces))
        {
            error!(error = %e, "cannot program network isolation");
            return false;
        }
        true
    }

    /// Keep the node-address set (where published ports answer) in sync with the kernel.
    pub async fn refresh_node_addrs(&mut self) {
        match self.nl.ipv4_addrs().await {
            Ok(a) => {
                let mut addrs: Vec<Ipv4Addr> = a.into_iter().map(|(_, ip)| ip).collect();

                addrs.sort();
                addrs.dedup();
                if addrs != self.node_addrs {
                    match self.dp.maps.set_node_addrs(&addrs) {
                        Ok(()) => {
                            info!(addrs = ?addrs, "node addresses");
                            self.node_addrs = addrs;
                        }
                        Err(e) => error!(error = %e, "cannot program node addresses"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list node addresses"),
        }
    }

    fn write_catalog(&self) -> Result<Catalog, AgentError> {
        let mut frontends: Vec<CatalogFrontend> = self
            .tables
            .frontends()
            .map(|(id, pf)| CatalogFrontend {
                svc_id: pf.svc_id,
                service: pf.spec.service.clone(),
                protocol: id.protocol.as_str().to_string(),
                addr: if id.addr.is_unspecified() {
                    "*".into()
                } else {
                    id.addr.to_string()
                },
                port: id.port,
                backends: pf
                    .spec
                    .backends
                    .iter()
                    .zip(&pf.slots)
                    .map(|(b, bid)| CatalogBackend {
                        id: *bid,
                        task: self
                            .state
                            .tasks
                            .get(&b.task_id)
                            .map(|t| t.name())
                            .unwrap_or_else(|| b.task_id.clone()),
                        addr: b.addr,
                        port: b.port,
                        local: b.link.is_some(),
                    })
                    .collect(),
            })
            .collect();
        frontends.sort_by_key(|f| (f.port, f.protocol.clone()));
        let cat = Catalog {
            node: self.cfg.node.clone(),
            frontends,
        };
        let path = self.cfg.run_dir.join(CATALOG_FILE);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&cat).unwrap_or_default();
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| AgentError::RunDir { path, source })?;
        Ok(cat)
    }

    /// Detach everything and remove what the agent made — or, with `keep_datapath`, leave
    /// the data path running for the next agent: programs stay attached (pinned links),
    /// maps pinned, task interfaces and overlays in place. Only this process goes away.
    pub async fn shutdown(mut self) {
        info!(
            node = self.cfg.node,
            keep_datapath = self.cfg.keep_datapath,
            "shutting down"
        );
        let _ = std::fs::remove_file(self.cfg.run_dir.join(CATALOG_FILE));
        let _ = std::fs::remove_dir(&self.cfg.run_dir);
        let mut keep = self.cfg.keep_datapath;
        if let Some((endpoint, name)) = &self.cfg.swarm_service {
            keep = match crate::source::swarm::service_exists(endpoint, name).await {
                Ok(exists) => {
                    info!(
                        service = name,
                        exists, "own Swarm service checked: kept while it exists"
                    );
                    exists
                }
                // Unknown: keep (a wrong keep leaves programs for the next agent to adopt;
                // a wrong cleanup would cut live connections).
                Err(e) => {
                    warn!(service = name, error = %e, "cannot check the own Swarm service; keeping the data path");
                    true
                }
            };
        }
        if keep {
            for e in self.dp.persist_links() {
                warn!(error = %e, "cannot pin an attachment for the next agent");
            }
            // DNS sockets close with the process; the tasks' resolv.conf stays for the next
            // agent, which serves 127.0.0.11 again as it starts.
            info!(pins = %self.cfg.pin_dir.display(), "data path left running for the next agent");
            return;
        }
        if let Some(dns) = &self.dns {
            dns.shutdown().await;
        }
        self.dp.detach_all();
        self.sandbox_gro.restore().await;
        if let Some(ov) = &mut self.overlay {
            for e in ov.teardown().await {
                warn!(error = %e, "overlay teardown");
            }
        }
        for e in self.attacher.teardown().await {
            warn!(error = %e, "teardown");
        }
        if let Err(e) = self.dp.unpin() {
            warn!(error = %e, "cannot remove pinned maps");
        }
    }
}

/// Run an agent until `stop` resolves: initial snapshot, then follow the source.
pub async fn run(
    cfg: AgentConfig,
    mut source: Box<dyn Source>,
    dns: Option<Box<dyn TaskService>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    info!(source = source.describe(), node = cfg.node, "starting");
    // The health endpoint comes up first: /healthz at once, /readyz after the first sync.
    let listener = match cfg.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let initial = source.initial().await?;
    let mut cfg = cfg;
    if cfg.node.is_empty() {
        // No --node: the source's own node (a Swarm manager knows which node it is).
        cfg.node = source.local_node().ok_or_else(|| AgentError::UnknownNode {
            node: "(none given, and the source does not know this node)".into(),
            known: initial.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        if cfg.pin_dir.as_os_str().is_empty() {
            cfg.pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh/{}", cfg.node));
        }
        if cfg.run_dir.as_os_str().is_empty() {
            cfg.run_dir = PathBuf::from(format!("/run/mesh/{}", cfg.node));
        }
        info!(node = cfg.node, "node name from the source");
    }
    let resync = cfg.resync;
    let mut agent = Agent::start(cfg, initial, dns).await?;
    let server = match (listener, &agent.metrics) {
        (Some(l), Some(m)) => {
            info!(addr = ?l.local_addr().ok(), "serving /metrics, /healthz, /readyz");
            Some(tokio::spawn(crate::metrics::serve(l, m.clone())))
        }
        _ => None,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let follower = tokio::spawn(source.run(tx));
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            ev = rx.recv() => match ev {
                Some(SourceEvent::Snapshot(s)) => {
                    info!(services = s.services.len(), tasks = s.tasks.len(), "new state");
                    agent.apply(s).await;
                }
                Some(SourceEvent::Rejected(why)) => {
                    error!("state update refused, keeping the last good tables: {why}");
                }
                None => {
                    warn!("source stopped; serving the last good tables");
                    // Nothing more will come; keep serving until told to stop.
                    (&mut stop).await;
                    break;
                }
            },
            _ = tick.tick() => {
                agent.refresh_node_addrs().await;
                // Retries what failed (a namespace that did not exist yet, a netlink error);
                // otherwise everything is re-checked against the kernel only every
                // cfg.reconcile (drift repair), so an idle agent stays idle.
                if agent.resync_due() {
                    let s = agent.state().clone();
                    agent.apply(s).await;
                }
            }
        }
    }
    follower.abort();
    if let Some(s) = server {
        s.abort();
    }
    agent.shutdown().await;
    Ok(())
}

/// Read the catalog a running agent wrote.
pub fn read_catalog(run_dir: &Path) -> std::io::Result<Catalog> {
    let body = std::fs::read(run_dir.join(CATALOG_FILE))?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Drop the previous snapshot off the sync path: freeing a Swarm3k-sized state (150k tasks)
/// takes tens of milliseconds, which the next change should not wait for.
fn release_off_path(old: Arc<State>) {
    if Arc::strong_count(&old) > 1 {
        return; // someone else still holds it; dropping our reference is cheap
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(old));
        }
        Err(_) => drop(old),
    }
}
