//! From the Engine API's objects to the model's wire form ([`StateFile`]).
//!
//! [`map`] is pure: it takes what the API returned ([`ClusterView`]) and produces the state
//! file a human would have written for the same swarm, plus notes on everything it left out
//! or adjusted. The rules (each one a fact about real Docker data that the model's validator
//! would otherwise refuse, or that the data plane must not see):
//!
//! **Names.** Node, network and service names become DNS labels: lowercased, every character
//! other than `a-z`, `0-9` and `-` replaced by `-` (`stack_web` → `stack-web`, an FQDN
//! hostname `n1.example.com` → `n1-example-com`), trimmed to 63 characters. Docker allows `_`,
//! `.` and upper case where the model does not. When two objects end up with the same name the
//! preferred one is kept (nodes: `ready` first, then the most recently updated) and the other
//! is left out with a note. Aliases are lowercased and sanitized label by label; one that is
//! the service's own name, another service's name or an alias already taken on that network
//! is dropped.
//!
//! **Nodes.** Name from `Description.Hostname`, address from `Status.Addr` (or, when that is
//! missing or `0.0.0.0` as on some managers, the host part of `ManagerStatus.Addr`). A node
//! without a usable address, or with the address of a preferred node (a node that left and
//! re-joined leaves a `down` duplicate behind), is left out, and so are its tasks.
//!
//! **Networks.** Swarm-scoped `overlay` networks, `ingress` included (found by its `Ingress`
//! flag and always named [`INGRESS_NETWORK`] in the model, even if it was re-created under
//! another name; another network that would then be called `ingress` is left out). Subnet and gateway from the first IPv4 IPAM config, VNI from the
//! option `com.docker.network.driver.overlay.vxlanid_list` (the first entry). A network
//! without both, with a prefix longer than /30, or whose subnet overlaps one already taken
//! (ingress first, then by name) is left out.
//!
//! **Services.** Endpoint mode from `Spec.EndpointSpec.Mode` (Docker 20.10 leaves the
//! allocated `Endpoint.Spec.Mode` empty for `dnsrr` services), else `Endpoint.Spec.Mode`,
//! else `vip`. Published ports from `Endpoint.Ports` (the allocated ones), `ingress` publish
//! mode only (`host` mode bypasses the routing mesh), TCP and UDP only (SCTP is not
//! modelled). A service with ingress ports is attached to the ingress network *first* (the
//! model sends published-port traffic over the first network); a service without them is not
//! attached to ingress even if a stale ingress VIP is still listed. Then the networks of
//! `Spec.TaskTemplate.Networks` (or the deprecated `Spec.Networks`), in order, with their
//! aliases. In `vip` mode each network's VIP comes from `Endpoint.VirtualIPs` by network id,
//! prefix stripped (`10.0.1.2/24` → `10.0.1.2`); a network that has no VIP yet is left out of
//! the service (and the ports with it if it is ingress). Ports of a `dnsrr` service (Docker
//! refuses them) are dropped.
//!
//! **Tasks.** Tasks in a terminal state (`complete`, `shutdown`, `failed`, `rejected`,
//! `remove`, `orphaned`) are left out: Docker keeps a history of them (5 per slot by default)
//! whose addresses are already released and reused by newer tasks or VIPs. So are tasks not
//! yet assigned to a node. States map one to one, except `allocated` → `pending` and `ready`
//! → `preparing` (the model has neither). Addresses from `NetworksAttachments[].Addresses`
//! (prefix stripped), for the networks the task's service is attached to; a task whose
//! container has not been set up yet simply has none.
//!
//! * Slot: `Slot`; global services have none (Docker names their tasks
//!   `svc.<node id>.<task id>`), so their slot is the 1-based position of the task's node id
//!   in the sorted list of all node ids of the swarm: stable while the set of nodes is.
//! * A task that is `starting` or `running` but whose desired state is past `running`
//!   (being shut down: scaled down, updated, its node gone) is mapped as `starting`: still
//!   attached (existing connections continue) but no longer a backend and no longer in DNS,
//!   which is what Docker does at that point (weight 0, DNS records removed).
//! * Two running tasks in one slot (an update with `--update-order start-first`): the one
//!   whose desired state is `running` and that was updated last keeps the slot, the other is
//!   mapped as `starting` (draining).
//! * A running task without an address on one of its service's networks (a network added to
//!   a service whose old tasks are still running) is mapped as `starting`.
//! * `netns`: for tasks of the Docker host the source talks to, the container's
//!   `NetworkSettings.SandboxKey`. Such a task that is `starting`/`running` but whose
//!   container is not running (gone, not started yet) is mapped as `preparing`: there is no
//!   namespace to attach. Tasks of other nodes get none (the API cannot tell).
//! * `resolv_conf` is left unset: Docker manages the container's resolv.conf (it already
//!   points at 127.0.0.11), and its sandbox paths are not `/run/netns/<name>`, so the DNS
//!   layer writes none.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use bollard::models::{
    EndpointPortConfigProtocolEnum as Proto, EndpointPortConfigPublishModeEnum as PublishMode,
    EndpointSpecModeEnum, Network, Node, NodeState, Service, Task, TaskState as DockerTaskState,
};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::model::{
    EndpointMode, INGRESS_NETWORK, NetworkSpec, NodeSpec, PortSpec, Protocol, STATE_VERSION,
    ServiceNetworkSpec, ServiceSpec, StateFile, TaskNetworkSpec, TaskSpec, TaskState,
    validate::{MAX_PREFIX_LEN, MAX_VNI},
};

/// Network option carrying an overlay's VXLAN ids (one per IPv4 subnet, comma-separated).
pub const VXLANID_OPTION: &str = "com.docker.network.driver.overlay.vxlanid_list";

/// A task as `GET /tasks` returns it: bollard's [`Task`] plus the `NetworksAttachments`
/// bollard's model lacks.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SwarmTask {
    #[serde(flatten)]
    pub task: Task,
    #[serde(rename = "NetworksAttachments", default)]
    pub networks_attachments: Option<Vec<NetworkAttachment>>,
}

/// One network of a task: the swarm network object and the task's addresses on it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NetworkAttachment {
    #[serde(rename = "Network", default)]
    pub network: Option<AttachedNetwork>,
    /// CIDR notation (`10.0.1.4/24`).
    #[serde(rename = "Addresses", default)]
    pub addresses: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AttachedNetwork {
    #[serde(rename = "ID", default)]
    pub id: Option<String>,
    #[serde(rename = "Spec", default)]
    pub spec: Option<AttachedNetworkSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AttachedNetworkSpec {
    #[serde(rename = "Name", default)]
    pub name: Option<String>,
}

/// Everything the mapping reads, as the Engine API returned it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub nodes: Vec<Node>,
    pub networks: Vec<Network>,
    pub services: Vec<Service>,
    pub tasks: Vec<SwarmTask>,
    /// Swarm node id of the Docker host the source talks to (`GET /info`): its tasks'
    /// sandboxes are in [`sandboxes`](Self::sandboxes).
    pub local_node: Option<String>,
    /// `SandboxKey` of the running containers of the local host, by container id (only those
    /// of [`local_containers`]).
    pub sandboxes: HashMap<String, PathBuf>,
}

/// The state file for a [`ClusterView`], and what was left out or adjusted on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub file: StateFile,
    /// The name of [`ClusterView::local_node`] in the state, if it is there.
    pub local_node: Option<String>,
    /// What was left out or adjusted (logged at debug level: expected of real swarms).
    pub notes: Vec<String>,
    /// What was left out that a running cluster needs (logged as warnings): a ready node
    /// whose hostname another ready node already has.
    pub warnings: Vec<String>,
}

/// Containers whose sandbox the mapping needs: those of the local node's tasks that are
/// `starting` or `running`.
pub fn local_containers(tasks: &[SwarmTask], local_node: Option<&str>) -> BTreeSet<String> {
    let Some(local) = local_node else {
        return BTreeSet::new();
    };
    tasks
        .iter()
        .filter(|t| t.task.node_id.as_deref() == Some(local))
        .filter(|t| {
            t.task
                .status
                .as_ref()
                .and_then(|s| s.state)
                .map(task_state)
                .is_some_and(|s| s.is_attached())
        })
        .filter_map(|t| container_id(&t.task))
        .collect()
}

fn container_id(t: &Task) -> Option<String> {
    t.status
        .as_ref()?
        .container_status
        .as_ref()?
        .container_id
        .clone()
        .filter(|id| !id.is_empty())
}

/// Swarm's task state in the model (which has no `allocated` and no `ready`).
pub fn task_state(s: DockerTaskState) -> TaskState {
    match s {
        DockerTaskState::NEW => TaskState::New,
        DockerTaskState::ALLOCATED | DockerTaskState::PENDING => TaskState::Pending,
        DockerTaskState::ASSIGNED => TaskState::Assigned,
        DockerTaskState::ACCEPTED => TaskState::Accepted,
        DockerTaskState::PREPARING | DockerTaskState::READY => TaskState::Preparing,
        DockerTaskState::STARTING => TaskState::Starting,
        DockerTaskState::RUNNING => TaskState::Running,
        DockerTaskState::COMPLETE => TaskState::Complete,
        DockerTaskState::SHUTDOWN => TaskState::Shutdown,
        DockerTaskState::FAILED => TaskState::Failed,
        DockerTaskState::REJECTED => TaskState::Rejected,
        DockerTaskState::REMOVE => TaskState::Remove,
        DockerTaskState::ORPHANED => TaskState::Orphaned,
    }
}

/// Position in Swarm's task life cycle (`new` … `running` … `orphaned`).
fn rank(s: DockerTaskState) -> u8 {
    match s {
        DockerTaskState::NEW => 0,
        DockerTaskState::ALLOCATED => 1,
        DockerTaskState::PENDING => 2,
        DockerTaskState::ASSIGNED => 3,
        DockerTaskState::ACCEPTED => 4,
        DockerTaskState::PREPARING => 5,
        DockerTaskState::READY => 6,
        DockerTaskState::STARTING => 7,
        DockerTaskState::RUNNING => 8,
        DockerTaskState::COMPLETE => 9,
        DockerTaskState::SHUTDOWN => 10,
        DockerTaskState::FAILED => 11,
        DockerTaskState::REJECTED => 12,
        DockerTaskState::REMOVE => 13,
        DockerTaskState::ORPHANED => 14,
    }
}

fn is_terminal(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::Complete
            | TaskState::Shutdown
            | TaskState::Failed
            | TaskState::Rejected
            | TaskState::Remove
            | TaskState::Orphaned
    )
}

/// `s` as a DNS label (see the module doc), or `None` if nothing is left of it.
pub fn label(s: &str) -> Option<String> {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut out: String = mapped.trim_matches('-').chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// A dotted DNS name, sanitized label by label.
fn dns_name(s: &str) -> Option<String> {
    let labels: Option<Vec<String>> = s.split('.').map(label).collect();
    labels
        .map(|l| l.join("."))
        .filter(|n| n.len() <= 253 && !n.is_empty())
}

/// An IPv4 address, with or without a `/prefix`.
pub fn addr(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.trim().parse().ok()
}

fn usable(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a.is_broadcast())
}

fn version(v: &Option<bollard::models::ObjectVersion>) -> u64 {
    v.as_ref().and_then(|v| v.index).unwrap_or(0)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

struct MappedNetwork {
    spec: NetworkSpec,
    ingress: bool,
}

struct MappedService {
    spec: ServiceSpec,
}

struct MappedTask {
    spec: TaskSpec,
    /// Desired state is `running` or before.
    desired_running: bool,
    version: u64,
}

/// Map the API's view of a swarm onto the model (see the module doc for the rules).
pub fn map(view: &ClusterView) -> Mapping {
    let mut notes = Vec::new();
    let mut warnings = Vec::new();

    // ---- nodes -------------------------------------------------------------------------
    let mut node_order: Vec<&Node> = view.nodes.iter().collect();
    node_order.sort_by_key(|n| {
        let ready = n.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY);
        (!ready, std::cmp::Reverse(version(&n.version)), n.id.clone())
    });
    let mut nodes: Vec<NodeSpec> = Vec::new();
    let mut node_by_id: HashMap<&str, String> = HashMap::new();
    for n in node_order {
        let Some(id) = n.id.as_deref().filter(|id| !id.is_empty()) else {
            notes.push("node without an ID: left out".into());
            continue;
        };
        let hostname = n
            .description
            .as_ref()
            .and_then(|d| d.hostname.as_deref())
            .unwrap_or_default();
        let Some(name) = label(hostname) else {
            notes.push(format!(
                "node {}: hostname `{hostname}` is not usable as a name: left out",
                short(id)
            ));
            continue;
        };
        let status_addr = n.status.as_ref().and_then(|s| s.addr.as_deref());
        let manager_addr = n
            .manager_status
            .as_ref()
            .and_then(|m| m.addr.as_deref())
            .and_then(|a| a.rsplit_once(':').map(|(host, _)| host));
        let Some(address) = status_addr
            .and_then(addr)
            .filter(|a| usable(*a))
            .or_else(|| manager_addr.and_then(addr).filter(|a| usable(*a)))
        else {
            notes.push(format!(
                "node {} (`{name}`): no usable address (Status.Addr {:?}): left out with its \
                 tasks",
                short(id),
                status_addr.unwrap_or("")
            ));
            continue;
        };
        if let Some(other) = nodes.iter().find(|o| o.name == name) {
            let ready = n.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY);
            if ready && other.address != address {
                // Not a re-joined node's stale copy: two live hosts share a hostname, and the
                // tasks of this one are not served.
                warnings.push(format!(
                    "node {} ({address}) is ready but its hostname `{name}` is also node {}'s: \
                     left out with its tasks (give the hosts distinct hostnames)",
                    short(id),
                    other.address
                ));
            }
            notes.push(format!(
                "node {}: name `{name}` is taken by a preferred node ({}): left out with its \
                 tasks",
                short(id),
                other.address
            ));
            continue;
        }
        if let Some(other) = nodes.iter().find(|o| o.address == address) {
            notes.push(format!(
                "node {} (`{name}`): address {address} is taken by node `{}`: left out with its \
                 tasks",
                short(id),
                other.name
            ));
            continue;
        }
        if name != hostname {
            notes.push(format!(
                "node {}: hostname `{hostname}` named `{name}`",
                short(id)
            ));
        }
        node_by_id.insert(id, name.clone());
        nodes.push(NodeSpec { name, address });
    }
    // Global services' slots: position of the node id among all the swarm's node ids.
    let mut all_ids: Vec<&str> = view
        .nodes
        .iter()
        .filter_map(|n| n.id.as_deref())
        .filter(|id| !id.is_empty())
        .collect();
    all_ids.sort_unstable();
    all_ids.dedup();
    let node_slot: HashMap<&str, u32> = all_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32 + 1))
        .collect();

    // ---- networks ----------------------------------------------------------------------
    let mut candidates: Vec<(&Network, bool)> = view
        .networks
        .iter()
        .filter(|n| n.scope.as_deref() == Some("swarm") && n.driver.as_deref() == Some("overlay"))
        .map(|n| {
            let ingress = n.ingress.unwrap_or(false)
                || (n.ingress.is_none() && n.name.as_deref() == Some("ingress"));
            (n, ingress)
        })
        .collect();
    candidates.sort_by(|(a, ai), (b, bi)| (!ai, &a.name, &a.id).cmp(&(!bi, &b.name, &b.id)));
    let mut networks: Vec<MappedNetwork> = Vec::new();
    let mut net_by_id: HashMap<&str, usize> = HashMap::new();
    let mut net_by_raw_name: HashMap<&str, usize> = HashMap::new();
    for (n, ingress) in candidates {
        let raw = n.name.as_deref().unwrap_or_default();
        let Some(id) = n.id.as_deref().filter(|id| !id.is_empty()) else {
            notes.push(format!("network `{raw}` without an Id: left out"));
            continue;
        };
        // The model knows Swarm's routing-mesh network by its usual name.
        let name = if ingress {
            Some(INGRESS_NETWORK.to_string())
        } else {
            label(raw)
        };
        let Some(name) = name else {
            notes.push(format!(
                "network {}: name `{raw}` is not usable: left out",
                short(id)
            ));
            continue;
        };
        let v4 = n
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let subnet: Ipv4Net = c.subnet.as_deref()?.parse().ok()?;
                Some((subnet, c.gateway.as_deref().and_then(addr)))
            })
            .collect::<Vec<_>>();
        let Some(&(subnet, gateway)) = v4.first() else {
            notes.push(format!("network `{raw}`: no IPv4 subnet: left out"));
            continue;
        };
        if v4.len() > 1 {
            notes.push(format!(
                "network `{raw}`: {} IPv4 subnets, only the first ({subnet}) is used",
                v4.len()
            ));
        }
        let subnet = subnet.trunc();
        let vni = n
            .options
            .as_ref()
            .and_then(|o| o.get(VXLANID_OPTION))
            .and_then(|list| list.split(',').next())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|v| (1..=MAX_VNI).contains(v));
        let Some(vni) = vni else {
            notes.push(format!(
                "network `{raw}`: no VXLAN id (option {VXLANID_OPTION}): left out"
            ));
            continue;
        };
        if subnet.prefix_len() > MAX_PREFIX_LEN {
            notes.push(format!(
                "network `{raw}`: subnet {subnet} is longer than /{MAX_PREFIX_LEN}: left out"
            ));
            continue;
        }
        if let Some(other) = networks.iter().find(|o| o.spec.name == name) {
            notes.push(format!(
                "network `{raw}`: name `{name}` is taken by network `{}`: left out",
                other.spec.name
            ));
            continue;
        }
        if let Some(other) = networks.iter().find(|o| {
            o.spec.subnet.contains(&subnet.network()) || subnet.contains(&o.spec.subnet.network())
        }) {
            notes.push(format!(
                "network `{raw}`: subnet {subnet} overlaps {} of network `{}`: left out",
                other.spec.subnet, other.spec.name
            ));
            continue;
        }
        if let Some(other) = networks.iter().find(|o| o.spec.vni == vni) {
            notes.push(format!(
                "network `{raw}`: VXLAN id {vni} is also network `{}`'s: left out",
                other.spec.name
            ));
            continue;
        }
        let gateway = gateway
            .filter(|g| subnet.contains(g) && *g != subnet.network() && *g != subnet.broadcast());
        if name != raw {
            notes.push(format!("network `{raw}` named `{name}`"));
        }
        let i = networks.len();
        net_by_id.insert(id, i);
        net_by_raw_name.insert(raw, i);
        networks.push(MappedNetwork {
            spec: NetworkSpec {
                name,
                subnet,
                vni,
                gateway,
            },
            ingress,
        });
    }
    let ingress = networks.iter().position(|n| n.ingress);

    // ---- services ----------------------------------------------------------------------
    let mut svc_order: Vec<&Service> = view.services.iter().collect();
    svc_order.sort_by_key(|s| (s.spec.as_ref().and_then(|sp| sp.name.clone()), s.id.clone()));
    let mut services: Vec<MappedService> = Vec::new();
    let mut svc_by_id: HashMap<&str, usize> = HashMap::new();
    let mut published_by: HashMap<(u16, Protocol), String> = HashMap::new();
    for s in svc_order {
        let Some(spec) = s.spec.as_ref() else {
            continue;
        };
        let raw = spec.name.as_deref().unwrap_or_default();
        let Some(id) = s.id.as_deref().filter(|id| !id.is_empty()) else {
            notes.push(format!("service `{raw}` without an ID: left out"));
            continue;
        };
        let Some(name) = label(raw) else {
            notes.push(format!(
                "service {}: name `{raw}` is not usable: left out",
                short(id)
            ));
            continue;
        };
        if let Some(other) = services.iter().find(|o| o.spec.name == name) {
            notes.push(format!(
                "service `{raw}`: name `{name}` is taken by service `{}`: left out",
                other.spec.name
            ));
            continue;
        }
        if name != raw.to_ascii_lowercase() {
            notes.push(format!("service `{raw}` named `{name}`"));
        }
        let endpoint = s.endpoint.as_ref();
        let mode_of = |m: Option<EndpointSpecModeEnum>| match m {
            Some(EndpointSpecModeEnum::VIP) => Some(EndpointMode::Vip),
            Some(EndpointSpecModeEnum::DNSRR) => Some(EndpointMode::Dnsrr),
            Some(EndpointSpecModeEnum::EMPTY) | None => None,
        };
        let endpoint_mode = mode_of(spec.endpoint_spec.as_ref().and_then(|e| e.mode))
            .or_else(|| mode_of(endpoint.and_then(|e| e.spec.as_ref()).and_then(|e| e.mode)))
            .unwrap_or(EndpointMode::Vip);

        // Published ports (ingress mode).
        let port_configs = endpoint
            .and_then(|e| e.ports.as_ref())
            .or_else(|| spec.endpoint_spec.as_ref().and_then(|e| e.ports.as_ref()));
        let mut ports: Vec<PortSpec> = Vec::new();
        for p in port_configs.into_iter().flatten() {
            if matches!(p.publish_mode, Some(PublishMode::HOST)) {
                continue;
            }
            let protocol = match p.protocol {
                Some(Proto::TCP) | Some(Proto::EMPTY) | None => Protocol::Tcp,
                Some(Proto::UDP) => Protocol::Udp,
                Some(Proto::SCTP) => {
                    notes.push(format!(
                        "service `{name}`: SCTP port {:?} is not supported: left out",
                        p.published_port
                    ));
                    continue;
                }
            };
            let port = |v: Option<i64>| v.and_then(|v| u16::try_from(v).ok()).filter(|v| *v > 0);
            let (Some(published), Some(target)) = (port(p.published_port), port(p.target_port))
            else {
                notes.push(format!(
                    "service `{name}`: port {:?}->{:?} is not allocated yet: left out",
                    p.published_port, p.target_port
                ));
                continue;
            };
            if ports
                .iter()
                .any(|q| q.published == published && q.protocol == protocol)
            {
                continue;
            }
            if let Some(other) = published_by.get(&(published, protocol)) {
                notes.push(format!(
                    "service `{name}`: port {published}/{} is already published by service \
                     `{other}`: left out",
                    protocol.as_str()
                ));
                continue;
            }
            ports.push(PortSpec {
                published,
                target,
                protocol,
            });
        }
        if endpoint_mode == EndpointMode::Dnsrr && !ports.is_empty() {
            notes.push(format!(
                "service `{name}`: ingress ports with endpoint mode dnsrr (Docker refuses them): \
                 left out"
            ));
            ports.clear();
        }

        let vips: HashMap<&str, Ipv4Addr> = endpoint
            .and_then(|e| e.virtual_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v.network_id.as_deref()?, addr(v.addr.as_deref()?)?)))
            .collect();
        let vip_for = |net: usize| -> Option<Ipv4Addr> {
            let (id, _) = net_by_id.iter().find(|(_, i)| **i == net)?;
            vips.get(id).copied()
        };

        let mut nets: Vec<ServiceNetworkSpec> = Vec::new();
        let mut net_idx: Vec<usize> = Vec::new();
        if !ports.is_empty() {
            match ingress {
                None => {
                    notes.push(format!(
                        "service `{name}`: published ports but no ingress network: ports left out"
                    ));
                    ports.clear();
                }
                Some(i) => {
                    let vip = match endpoint_mode {
                        EndpointMode::Vip => vip_for(i),
                        EndpointMode::Dnsrr => None,
                    };
                    if endpoint_mode == EndpointMode::Vip && vip.is_none() {
                        notes.push(format!(
                            "service `{name}`: no VIP on the ingress network yet: ports left out"
                        ));
                        ports.clear();
                    } else {
                        nets.push(ServiceNetworkSpec {
                            network: networks[i].spec.name.clone(),
                            vip,
                            aliases: Vec::new(),
                        });
                        net_idx.push(i);
                    }
                }
            }
        }
        let attachments = spec
            .task_template
            .as_ref()
            .and_then(|t| t.networks.as_ref())
            .filter(|n| !n.is_empty())
            .or(spec.networks.as_ref());
        for att in attachments.into_iter().flatten() {
            let target = att.target.as_deref().unwrap_or_default();
            let Some(i) = net_by_id
                .get(target)
                .or_else(|| net_by_raw_name.get(target))
                .copied()
            else {
                notes.push(format!(
                    "service `{name}`: network `{target}` is not a known swarm overlay: left out"
                ));
                continue;
            };
            if Some(i) == ingress || net_idx.contains(&i) {
                continue;
            }
            let vip = match endpoint_mode {
                EndpointMode::Vip => match vip_for(i) {
                    Some(v) => Some(v),
                    None => {
                        notes.push(format!(
                            "service `{name}`: no VIP on network `{}` yet: network left out",
                            networks[i].spec.name
                        ));
                        continue;
                    }
                },
                EndpointMode::Dnsrr => None,
            };
            let mut aliases = Vec::new();
            for a in att.aliases.iter().flatten() {
                match dns_name(a) {
                    Some(a) if !aliases.contains(&a) => aliases.push(a),
                    Some(_) => {}
                    None => notes.push(format!(
                        "service `{name}`: alias `{a}` is not a usable DNS name: left out"
                    )),
                }
            }
            nets.push(ServiceNetworkSpec {
                network: networks[i].spec.name.clone(),
                vip,
                aliases,
            });
            net_idx.push(i);
        }
        for p in &ports {
            published_by.insert((p.published, p.protocol), name.clone());
        }
        svc_by_id.insert(id, services.len());
        services.push(MappedService {
            spec: ServiceSpec {
                name,
                endpoint_mode,
                networks: nets,
                ports,
            },
        });
    }
    // Aliases that clash with a service name or an earlier alias on the same network.
    let names_on_net: HashSet<(String, String)> = services
        .iter()
        .flat_map(|s| {
            s.spec
                .networks
                .iter()
                .map(|n| (n.network.clone(), s.spec.name.clone()))
        })
        .collect();
    let mut taken: HashSet<(String, String)> = HashSet::new();
    for s in &mut services {
        let name = s.spec.name.clone();
        for n in &mut s.spec.networks {
            n.aliases.retain(|a| {
                let key = (n.network.clone(), a.clone());
                let clash = *a == name || names_on_net.contains(&key) || taken.contains(&key);
                if clash {
                    notes.push(format!(
                        "service `{name}`: alias `{a}` on network `{}` is another name there: \
                         left out",
                        n.network
                    ));
                } else {
                    taken.insert(key);
                }
                !clash
            });
        }
    }

    // ---- tasks -------------------------------------------------------------------------
    let net_name_by_id: HashMap<&str, &str> = net_by_id
        .iter()
        .map(|(id, i)| (*id, networks[*i].spec.name.as_str()))
        .collect();
    let mut tasks: Vec<MappedTask> = Vec::new();
    let mut skipped_terminal = 0usize;
    let mut skipped_unassigned = 0usize;
    for st in &view.tasks {
        let t = &st.task;
        let Some(id) = t.id.as_deref().filter(|id| !id.is_empty()) else {
            continue;
        };
        let Some(observed) = t.status.as_ref().and_then(|s| s.state) else {
            notes.push(format!("task {id}: no state: left out"));
            continue;
        };
        let mut state = task_state(observed);
        if is_terminal(state) {
            skipped_terminal += 1;
            continue;
        }
        let Some(&si) = t.service_id.as_deref().and_then(|s| svc_by_id.get(s)) else {
            notes.push(format!(
                "task {id}: service {} is not in the state: left out",
                t.service_id.as_deref().unwrap_or("?")
            ));
            continue;
        };
        let service = &services[si].spec;
        let Some(node_id) = t.node_id.as_deref().filter(|n| !n.is_empty()) else {
            skipped_unassigned += 1;
            continue;
        };
        let Some(node) = node_by_id.get(node_id) else {
            notes.push(format!(
                "task {id} of `{}`: node {} is not in the state: left out",
                service.name,
                short(node_id)
            ));
            continue;
        };
        if label(id).as_deref() != Some(id) {
            notes.push(format!("task `{id}`: id is not a DNS label: left out"));
            continue;
        }
        let slot = match t
            .slot
            .and_then(|s| u32::try_from(s).ok())
            .filter(|s| *s > 0)
        {
            Some(s) => s,
            None => node_slot.get(node_id).copied().unwrap_or(1),
        };
        let desired_running = t
            .desired_state
            .is_none_or(|d| rank(d) <= rank(DockerTaskState::RUNNING));

        // Addresses, on the service's networks, in the service's order.
        let mut by_net: HashMap<&str, Ipv4Addr> = HashMap::new();
        for a in st.networks_attachments.iter().flatten() {
            let Some(n) = a.network.as_ref() else {
                continue;
            };
            let net =
                n.id.as_deref()
                    .and_then(|id| net_name_by_id.get(id).copied())
                    .or_else(|| {
                        let raw = n.spec.as_ref()?.name.as_deref()?;
                        net_by_raw_name
                            .get(raw)
                            .map(|i| networks[*i].spec.name.as_str())
                    });
            let Some(net) = net else { continue };
            if let Some(address) = a.addresses.iter().flatten().find_map(|s| addr(s)) {
                by_net.insert(net, address);
            }
        }
        let mut task_nets = Vec::new();
        let mut missing = Vec::new();
        for sn in &service.networks {
            match by_net.get(sn.network.as_str()) {
                Some(a) => task_nets.push(TaskNetworkSpec {
                    network: sn.network.clone(),
                    address: *a,
                }),
                None => missing.push(sn.network.as_str()),
            }
        }

        if state.is_attached() && !desired_running {
            // Being shut down: attached, no longer a backend (Docker: weight 0, out of DNS).
            state = TaskState::Starting;
        }
        if state.is_running() && !missing.is_empty() {
            notes.push(format!(
                "task {id} of `{}`: running without an address on {}: mapped as starting",
                service.name,
                missing.join(", ")
            ));
            state = TaskState::Starting;
        }
        let mut netns = None;
        if state.is_attached() && view.local_node.as_deref() == Some(node_id) {
            netns = container_id(t).and_then(|c| view.sandboxes.get(&c).cloned());
            if netns.is_none() {
                notes.push(format!(
                    "task {id} of `{}`: {} but its container is not running here: mapped as \
                     preparing",
                    service.name,
                    if state.is_running() {
                        "running"
                    } else {
                        "starting"
                    }
                ));
                state = TaskState::Preparing;
            }
        }
        tasks.push(MappedTask {
            spec: TaskSpec {
                id: id.to_string(),
                service: service.name.clone(),
                slot,
                node: node.clone(),
                state,
                netns,
                resolv_conf: None,
                networks: task_nets,
            },
            desired_running,
            version: version(&t.version),
        });
    }
    // One running task per slot: the one meant to run, updated last, keeps it.
    let mut holder: HashMap<(String, u32), usize> = HashMap::new();
    for i in 0..tasks.len() {
        if !tasks[i].spec.state.is_running() {
            continue;
        }
        let key = (tasks[i].spec.service.clone(), tasks[i].spec.slot);
        match holder.get(&key).copied() {
            None => {
                holder.insert(key, i);
            }
            Some(j) => {
                let better = |t: &MappedTask| (t.desired_running, t.version, t.spec.id.clone());
                let (keep, demote) = if better(&tasks[i]) > better(&tasks[j]) {
                    (i, j)
                } else {
                    (j, i)
                };
                notes.push(format!(
                    "task {} of `{}`: slot {} is held by running task {}: mapped as starting",
                    tasks[demote].spec.id, key.0, key.1, tasks[keep].spec.id
                ));
                tasks[demote].spec.state = TaskState::Starting;
                holder.insert(key, keep);
            }
        }
    }
    if skipped_terminal > 0 {
        notes.push(format!(
            "{skipped_terminal} task(s) in a terminal state (history) left out"
        ));
    }
    if skipped_unassigned > 0 {
        notes.push(format!(
            "{skipped_unassigned} task(s) not assigned to a node yet left out"
        ));
    }
    let mut tasks: Vec<TaskSpec> = tasks.into_iter().map(|t| t.spec).collect();
    tasks.sort_by(|a, b| (&a.service, a.slot, &a.id).cmp(&(&b.service, b.slot, &b.id)));
    nodes.sort_by(|a, b| a.name.cmp(&b.name));

    let local_node = view
        .local_node
        .as_deref()
        .and_then(|id| node_by_id.get(id))
        .cloned();
    Mapping {
        local_node,
        file: StateFile {
            version: STATE_VERSION,
            nodes,
            networks: networks.into_iter().map(|n| n.spec).collect(),
            services: services.into_iter().map(|s| s.spec).collect(),
            tasks,
        },
        notes,
        warnings,
    }
}
