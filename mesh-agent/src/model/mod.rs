//! The managers' state: Swarm's model of nodes, networks, services and tasks.
//!
//! [`StateFile`] is the wire form (what a source reads: the YAML state file, later the Engine
//! API); [`validate`](validate::validate) turns it into a [`State`], or refuses it with errors
//! that name the offending field path (`tasks[2].networks[0].address`). Every consumer (tables,
//! attach, DNS) reads only validated [`State`]s.

pub mod validate;

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

pub use imbl::OrdMap;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use validate::{FieldError, StateError, parse_yaml, validate};

/// The only state-file format version this agent reads.
pub const STATE_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------
// Wire form
// ---------------------------------------------------------------------------------------

/// A whole state file (see `docs/state.example.yaml` for a commented example).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Format version; must be 1.
    pub version: u32,
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// Underlay (data-path) address of the node.
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    /// VXLAN network identifier (1..=16777215).
    pub vni: u32,
    /// The address of the network's bridge on every node, the tasks' default gateway.
    /// Default: the first host address of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP per network, load-balanced over the running tasks (Swarm's default).
    #[default]
    Vip,
    /// No VIP: the service name resolves to every running task's address.
    Dnsrr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// Networks the service is attached to, in order (the first one carries published-port
    /// traffic to the tasks).
    #[serde(default)]
    pub networks: Vec<ServiceNetworkSpec>,
    /// Ports published on every node (Swarm's ingress routing mesh).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceNetworkSpec {
    pub network: String,
    /// The service's virtual IP on this network (required in `vip` mode, forbidden in `dnsrr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    /// Extra DNS names of the service on this network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => mesh_common::proto::TCP,
            Protocol::Udp => mesh_common::proto::UDP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port answered on every node address.
    pub published: u16,
    /// Port the tasks listen on.
    pub target: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Swarm's task states. Only `running` tasks receive traffic and appear in DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
}

impl TaskState {
    /// Receives traffic and is listed in DNS.
    pub fn is_running(self) -> bool {
        self == TaskState::Running
    }
    /// Its container (and network namespace) exists, so the node attaches its networking.
    pub fn is_attached(self) -> bool {
        matches!(self, TaskState::Starting | TaskState::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Task id (Swarm: 25 lowercase alphanumerics; any DNS label here).
    pub id: String,
    pub service: String,
    /// Replica slot (1-based).
    pub slot: u32,
    pub node: String,
    pub state: TaskState,
    /// The network namespace the runtime created for the task, on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Where to write the task's resolv.conf (default: /etc/netns/<netns name>/resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<PathBuf>,
    /// One address per network, in order.
    #[serde(default)]
    pub networks: Vec<TaskNetworkSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskNetworkSpec {
    pub network: String,
    pub address: Ipv4Addr,
}

// ---------------------------------------------------------------------------------------
// Validated form
// ---------------------------------------------------------------------------------------

/// A validated snapshot of the managers' state. Names are unique; every reference resolves;
/// addresses are inside their subnets and collide with nothing.
///
/// Services and tasks, the parts that grow with the cluster, are persistent ordered maps
/// ([`imbl::OrdMap`]): a snapshot made from the previous one by a few inserts and removals
/// shares all the rest of its structure with it, so cloning is O(1) and comparing the two
/// (`OrdMap::diff`, used by the tables' snapshot diff) skips the shared subtrees: the agent's
/// work for a one-task change does not follow the size of the cluster. Sources build each
/// new snapshot on top of the previous one ([`State::rebase`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    pub nodes: BTreeMap<String, Node>,
    pub networks: BTreeMap<String, Network>,
    pub services: OrdMap<String, Service>,
    /// By task id.
    pub tasks: OrdMap<String, Task>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub subnet: Ipv4Net,
    pub vni: u32,
    /// Bridge address on every node (explicit or the subnet's first host address).
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub endpoint_mode: EndpointMode,
    pub networks: Vec<ServiceNetwork>,
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    pub network: String,
    /// `Some` exactly in `vip` mode.
    pub vip: Option<Ipv4Addr>,
    /// Lowercased.
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub service: String,
    pub slot: u32,
    pub node: String,
    pub state: TaskState,
    pub netns: Option<PathBuf>,
    pub resolv_conf: Option<PathBuf>,
    pub networks: Vec<TaskNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNetwork {
    pub network: String,
    pub address: Ipv4Addr,
}

impl Task {
    /// The task's address on `network`, if attached to it.
    pub fn address_on(&self, network: &str) -> Option<Ipv4Addr> {
        self.networks
            .iter()
            .find(|n| n.network == network)
            .map(|n| n.address)
    }

    /// Swarm's task name: `<service>.<slot>.<id>`.
    pub fn name(&self) -> String {
        format!("{}.{}.{}", self.service, self.slot, self.id)
    }
}

/// Name of Swarm's routing-mesh network. A service attached to it receives published-port
/// traffic there (as on Swarm); otherwise on its first network.
pub const INGRESS_NETWORK: &str = "ingress";

impl Service {
    /// The network published-port traffic reaches the tasks on: `ingress` when the service is
    /// on it (a Swarm cluster), else the service's first network.
    pub fn ingress_network(&self) -> Option<&str> {
        self.networks
            .iter()
            .find(|n| n.network == INGRESS_NETWORK)
            .or_else(|| self.networks.first())
            .map(|n| n.network.as_str())
    }
}

impl State {
    /// Running tasks of every service, each list in (slot, id) order: one pass over the tasks
    /// (what code visiting every service should use, not [`State::running_tasks`] per service).
    /// This snapshot built on top of `prev`: equal services and tasks are `prev`'s own (shared
    /// structure), only the differences are inserted or removed. The result compares equal to
    /// `self`. Sources call this on every new snapshot, so that the agent's comparison of
    /// consecutive snapshots (and cloning one) costs what changed, not the cluster's size;
    /// the O(n) walk here is the source's, beside the O(n) read it just did.
    pub fn rebase(mut self, prev: &State) -> State {
        self.services = rebase_map(&prev.services, self.services);
        self.tasks = rebase_map(&prev.tasks, self.tasks);
        self
    }

    pub fn running_tasks_by_service(&self) -> BTreeMap<&str, Vec<&Task>> {
        let mut m: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.state.is_running()) {
            m.entry(t.service.as_str()).or_default().push(t);
        }
        for v in m.values_mut() {
            v.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        }
        m
    }

    /// Running tasks of `service`, in (slot, id) order.
    pub fn running_tasks<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        let mut v: Vec<&Task> = self
            .tasks
            .values()
            .filter(|t| t.service == service && t.state.is_running())
            .collect();
        v.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        v.into_iter()
    }

    /// Tasks scheduled on `node` whose networking the node's agent attaches.
    pub fn attached_tasks_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| t.node == node && t.state.is_attached())
    }
}

/// `next` as `prev` plus the differences (see [`State::rebase`]).
fn rebase_map<V: Clone + PartialEq>(
    prev: &OrdMap<String, V>,
    next: OrdMap<String, V>,
) -> OrdMap<String, V> {
    let mut out = prev.clone();
    for d in prev.diff(&next) {
        match d {
            imbl::ordmap::DiffItem::Add(k, v)
            | imbl::ordmap::DiffItem::Update { new: (k, v), .. } => {
                out.insert(k.clone(), v.clone());
            }
            imbl::ordmap::DiffItem::Remove(k, _) => {
                out.remove(k);
            }
        }
    }
    out
}
