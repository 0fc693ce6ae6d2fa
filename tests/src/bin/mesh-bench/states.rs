//! Synthetic cluster states, built directly as `mesh_agent::model::State` (no YAML): the
//! shapes of the control-plane scale runs and the big-table XDP fixture.

use std::{net::Ipv4Addr, sync::Arc};

use mesh_agent::{
    model::{
        EndpointMode, Network, Node, PortSpec, Protocol, Service, ServiceNetwork, State, Task,
        TaskNetwork, TaskState,
    },
    tables::{LocalLink, LocalLinks},
};

/// This node's name in every generated state.
pub const ME: &str = "n0";
pub const ME_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The shape of a generated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub nodes: usize,
    pub services: usize,
    pub tasks: usize,
    pub networks: usize,
    /// Every n-th service publishes one TCP port (0: none).
    pub publish_every: usize,
    /// Every n-th service is in `dnsrr` mode (no VIP; 0: none, all have a VIP).
    pub dnsrr_every: usize,
    /// First published port.
    pub port_base: u16,
}

/// Address `i` of network `k`: 10.(100+k).x.y, skipping .0/.1 (the gateway).
fn net_addr(k: usize, i: usize) -> Ipv4Addr {
    let off = i + 2;
    Ipv4Addr::new(10, (100 + k) as u8, (off >> 8) as u8, (off & 255) as u8)
}

/// A VIP of network `k`: from the top of its /16, away from task addresses.
fn vip_addr(k: usize, v: usize) -> Ipv4Addr {
    net_addr(k, 60_000 + v)
}

pub fn task_id(g: usize) -> String {
    // Swarm task ids are 25 characters.
    format!("t{g:024}")
}

pub fn node_name(n: usize) -> String {
    format!("n{n}")
}

/// A generated state and the links this node has to its local tasks, plus counters to make
/// more tasks with fresh ids and addresses.
pub struct Cluster {
    pub shape: Shape,
    /// Shared with the snapshot last handed to the agent's code, as the agent holds it: a
    /// change clones it first (copy on write), outside any timing.
    pub state: Arc<State>,
    pub links: LocalLinks,
    next_task: usize,
    next_addr: Vec<usize>,
    next_ifindex: u32,
}

impl Cluster {
    pub fn generate(shape: Shape) -> Cluster {
        let mut s = State::default();
        for n in 0..shape.nodes {
            let address = if n == 0 {
                ME_ADDR
            } else {
                Ipv4Addr::new(198, 19, (n >> 8) as u8, (n & 255) as u8)
            };
            s.nodes.insert(
                node_name(n),
                Node {
                    name: node_name(n),
                    address,
                },
            );
        }
        for k in 0..shape.networks {
            let name = format!("net{k:02}");
            s.networks.insert(
                name.clone(),
                Network {
                    name,
                    subnet: format!("10.{}.0.0/16", 100 + k).parse().unwrap(),
                    vni: 4096 + k as u32,
                    gateway: Ipv4Addr::new(10, (100 + k) as u8, 0, 1),
                },
            );
        }
        let mut c = Cluster {
            shape,
            state: Arc::new(s),
            links: LocalLinks::new(),
            next_task: 0,
            next_addr: vec![0; shape.networks],
            next_ifindex: 1000,
        };
        let mut vips = vec![0usize; shape.networks];
        for i in 0..shape.services {
            let k = i % shape.networks;
            let dnsrr = shape.dnsrr_every > 0 && i % shape.dnsrr_every == 0;
            let vip = (!dnsrr).then(|| {
                vips[k] += 1;
                vip_addr(k, vips[k])
            });
            let ports = if shape.publish_every > 0 && i % shape.publish_every == 0 {
                vec![PortSpec {
                    published: shape.port_base + (i / shape.publish_every) as u16,
                    target: 80,
                    protocol: Protocol::Tcp,
                }]
            } else {
                vec![]
            };
            let name = service_name(i);
            Arc::make_mut(&mut c.state).services.insert(
                name.clone(),
                Service {
                    name,
                    endpoint_mode: if dnsrr {
                        EndpointMode::Dnsrr
                    } else {
                        EndpointMode::Vip
                    },
                    networks: vec![ServiceNetwork {
                        network: format!("net{k:02}"),
                        vip,
                        aliases: vec![],
                    }],
                    ports,
                },
            );
        }
        // Tasks: service by service, spread over the nodes round-robin, so this node (n0)
        // gets about tasks / nodes of them.
        let per = shape.tasks / shape.services.max(1);
        let extra = shape.tasks % shape.services.max(1);
        for i in 0..shape.services {
            let n = per + usize::from(i < extra);
            for slot in 1..=n {
                let node = c.next_task % shape.nodes;
                c.add_task(i, slot as u32, node);
            }
        }
        c
    }

    /// Add a running task of service `svc` on node `node` (a local one gets a link).
    /// Returns its id.
    pub fn add_task(&mut self, svc: usize, slot: u32, node: usize) -> String {
        let g = self.next_task;
        self.next_task += 1;
        let k = svc % self.shape.networks;
        let a = self.next_addr[k];
        self.next_addr[k] += 1;
        let id = task_id(g);
        let net = format!("net{k:02}");
        let address = net_addr(k, a);
        Arc::make_mut(&mut self.state).tasks.insert(
            id.clone(),
            Task {
                id: id.clone(),
                service: service_name(svc),
                slot,
                node: node_name(node),
                state: TaskState::Running,
                netns: Some(format!("/run/netns/{id}").into()),
                resolv_conf: None,
                networks: vec![TaskNetwork {
                    network: net.clone(),
                    address,
                }],
            },
        );
        if node == 0 {
            let o = address.octets();
            self.links.insert(
                (id.clone(), net),
                LocalLink {
                    ifindex: self.next_ifindex,
                    task_mac: [0x02, 0x42, o[0], o[1], o[2], o[3]],
                    gw_mac: [0x02, 0, 0, 0, k as u8, 1],
                },
            );
            self.next_ifindex += 1;
        }
        id
    }

    pub fn remove_task(&mut self, id: &str) {
        if let Some(t) = Arc::make_mut(&mut self.state).tasks.remove(id) {
            for n in &t.networks {
                self.links.remove(&(id.to_string(), n.network.clone()));
            }
        }
    }

    /// Some running task of service `svc` (the first by id).
    pub fn a_task_of(&self, svc: usize) -> Option<(String, u32, usize)> {
        let name = service_name(svc);
        self.state
            .tasks
            .values()
            .find(|t| t.service == name)
            .map(|t| (t.id.clone(), t.slot, t.node[1..].parse().unwrap_or(0)))
    }

    pub fn local_tasks(&self) -> usize {
        self.state.tasks.values().filter(|t| t.node == ME).count()
    }
}

pub fn service_name(i: usize) -> String {
    format!("svc{i:05}")
}
