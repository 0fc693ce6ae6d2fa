//! A multi-node test bed: N node namespaces and a client namespace on one underlay bridge
//! (198.18.0.0/24), one real `mesh-agent` per node reading the same state file, and task
//! namespaces hanging off their node, each running the whoami server. Everything is removed
//! on drop, even on failure. `mesh-cluster` (run by `cargo xtask cluster`) brings one up for
//! people to poke at.
//!
//! The veth underlay models real NICs: TX checksum offload is off on every underlay port (a
//! NIC fills checksums in; a veth would hand over partial ones, which XDP cannot see), and
//! GRO is on at the bridge side so XDP redirects out of a node are accepted.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use crate::{Agent, AgentOpts, Netns, Proc, sh, whoami, write_atomic};

/// A network of the cluster.
#[derive(Debug, Clone)]
pub struct NetDef {
    pub name: String,
    /// The subnet is 10.<octet>.0.0/24.
    pub octet: u8,
    pub vni: u32,
}

impl NetDef {
    pub fn subnet(&self) -> String {
        format!("10.{}.0.0/24", self.octet)
    }
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, host)
    }
}

/// A service of the cluster.
#[derive(Debug, Clone)]
pub struct SvcDef {
    pub name: String,
    pub dnsrr: bool,
    /// Networks, in order; the VIP is host .2.. of the network (by service order).
    pub networks: Vec<String>,
    pub ports: Vec<(u16, u16, &'static str)>,
    pub aliases: Vec<String>,
}

/// The services of the sample cluster (`cargo xtask cluster`, the multi-node tests): `web`
/// on `webnet`, publishing 8080/tcp → 80 and 8007/udp → 7; `db` on `dbnet`; `client` on
/// `webnet`.
pub fn sample_services() -> Vec<SvcDef> {
    let svc = |name: &str, net: &str, ports: Vec<(u16, u16, &'static str)>| SvcDef {
        name: name.into(),
        dnsrr: false,
        networks: vec![net.into()],
        ports,
        aliases: vec![],
    };
    vec![
        svc("web", "webnet", vec![(8080, 80, "tcp"), (8007, 7, "udp")]),
        svc("db", "dbnet", vec![]),
        svc("client", "webnet", vec![]),
    ]
}

pub struct TaskBed {
    pub id: String,
    pub service: String,
    pub slot: u32,
    pub node: usize,
    pub state: String,
    /// (network, address)
    pub addrs: Vec<(String, Ipv4Addr)>,
    pub ns: Netns,
    pub server: Proc,
}

impl TaskBed {
    /// The name the whoami server answers with.
    pub fn name(&self) -> String {
        format!("{}.{}.{}", self.service, self.slot, self.id)
    }
}

pub struct NodeBed {
    pub name: String,
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub agent: Option<Agent>,
    pub pin_dir: PathBuf,
}

pub struct Cluster {
    pub underlay: Netns,
    pub client: Netns,
    pub client_addr: Ipv4Addr,
    pub nodes: Vec<NodeBed>,
    pub networks: Vec<NetDef>,
    pub services: Vec<SvcDef>,
    pub tasks: BTreeMap<String, TaskBed>,
    pub state_path: PathBuf,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    next_host: BTreeMap<String, u8>,
    next_task: u32,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes on an underlay bridge, a client, no agents yet.
    pub fn new(n: usize, networks: Vec<NetDef>, services: Vec<SvcDef>) -> Cluster {
        let underlay = Netns::new("u");
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let mut nodes = Vec::new();
        for i in 0..n {
            let ns = Netns::new(&format!("n{}", i + 1));
            let addr = Ipv4Addr::new(198, 18, 0, (i + 1) as u8);
            let port = format!("up{}", i + 1);
            sh(
                "ip",
                &[
                    "link",
                    "add",
                    "ul0",
                    "netns",
                    &ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    &underlay.name,
                ],
            );
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
            ns.ip(&["link", "set", "ul0", "up"]);
            ns.exec("ethtool", &["-K", "ul0", "tx", "off"]);
            underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
            underlay.exec("ethtool", &["-K", &port, "gro", "on"]);
            nodes.push(NodeBed {
                name: format!("n{}", i + 1),
                ns,
                addr,
                agent: None,
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/mesh-it-{}", crate::uniq())),
            });
        }
        let client = Netns::new("c");
        let client_addr = Ipv4Addr::new(198, 18, 0, 100);
        sh(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                "upc",
                "netns",
                &underlay.name,
            ],
        );
        client.ip(&["addr", "add", &format!("{client_addr}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        underlay.ip(&["link", "set", "upc", "master", "br0", "up"]);
        underlay.exec("ethtool", &["-K", "upc", "gro", "on"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let state_path = dir.path().join("state.yaml");
        Cluster {
            underlay,
            client,
            client_addr,
            nodes,
            networks,
            services,
            tasks: BTreeMap::new(),
            state_path,
            agent_args: Vec::new(),
            next_host: BTreeMap::new(),
            next_task: 1,
            _dir: dir,
        }
    }

    fn vip(&self, svc: &str, net: &str) -> Option<Ipv4Addr> {
        let s = self.services.iter().find(|s| s.name == svc)?;
        if s.dnsrr {
            return None;
        }
        let idx = self.services.iter().position(|s| s.name == svc)? as u8;
        Some(self.networks.iter().find(|n| n.name == net)?.addr(2 + idx))
    }

    /// The VIP of `svc` on `net`.
    pub fn vip_of(&self, svc: &str, net: &str) -> Ipv4Addr {
        self.vip(svc, net).expect("a VIP")
    }

    /// Start a task of `service` in `slot` on node `node` (0-based): namespace + server,
    /// addresses on each of the service's networks. Returns its id.
    pub fn add_task(&mut self, service: &str, slot: u32, node: usize) -> String {
        self.add_task_with(service, slot, node, whoami)
    }

    /// Like [`add_task`](Self::add_task), with the task's server started by `server` in the
    /// new namespace, given the task's name (what [`TaskBed::name`] returns); e.g. a
    /// benchmark's nginx instead of the whoami server. It goes with the task.
    pub fn add_task_with(
        &mut self,
        service: &str,
        slot: u32,
        node: usize,
        server: impl FnOnce(&Netns, &str) -> Proc,
    ) -> String {
        let svc = self
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service")
            .clone();
        let id = format!(
            "{}{:02}x{}",
            service.chars().next().unwrap_or('t'),
            self.next_task,
            crate::uniq()
        );
        self.next_task += 1;
        let mut addrs = Vec::new();
        for net in &svc.networks {
            let h = self.next_host.entry(net.clone()).or_insert(20);
            *h += 1;
            let nd = self
                .networks
                .iter()
                .find(|n| &n.name == net)
                .expect("network");
            addrs.push((net.clone(), nd.addr(*h)));
        }
        let ns = Netns::new("t");
        let name = format!("{service}.{slot}.{id}");
        let server = server(&ns, &name);
        self.tasks.insert(
            id.clone(),
            TaskBed {
                id: id.clone(),
                service: service.into(),
                slot,
                node,
                state: "running".into(),
                addrs,
                ns,
                server,
            },
        );
        id
    }

    pub fn set_state(&mut self, id: &str, state: &str) {
        self.tasks.get_mut(id).expect("task").state = state.into();
    }

    /// Tasks of `service` in `state`.
    pub fn tasks_of(&self, service: &str, state: &str) -> Vec<&TaskBed> {
        self.tasks
            .values()
            .filter(|t| t.service == service && t.state == state)
            .collect()
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from("version: 1\nnodes:\n");
        for n in &self.nodes {
            let _ = writeln!(y, "  - {{name: {}, address: {}}}", n.name, n.addr);
        }
        y.push_str("networks:\n");
        for n in &self.networks {
            let _ = writeln!(
                y,
                "  - {{name: {}, subnet: {}, vni: {}}}",
                n.name,
                n.subnet(),
                n.vni
            );
        }
        y.push_str("services:\n");
        for s in &self.services {
            let _ = writeln!(
                y,
                "  - name: {}\n    endpoint_mode: {}",
                s.name,
                if s.dnsrr { "dnsrr" } else { "vip" }
            );
            y.push_str("    networks:\n");
            for net in &s.networks {
                match self.vip(&s.name, net) {
                    Some(v) => {
                        let _ = write!(y, "      - {{network: {net}, vip: {v}");
                    }
                    None => {
                        let _ = write!(y, "      - {{network: {net}");
                    }
                }
                if !s.aliases.is_empty() && net == &s.networks[0] {
                    let _ = write!(y, ", aliases: [{}]", s.aliases.join(", "));
                }
                y.push_str("}\n");
            }
            if !s.ports.is_empty() {
                y.push_str("    ports:\n");
                for (p, t, proto) in &s.ports {
                    let _ = writeln!(
                        y,
                        "      - {{published: {p}, target: {t}, protocol: {proto}}}"
                    );
                }
            }
        }
        y.push_str("tasks:\n");
        for t in self.tasks.values() {
            let _ = write!(
                y,
                "  - {{id: {}, service: {}, slot: {}, node: {}, state: {}, netns: {}, networks: [",
                t.id,
                t.service,
                t.slot,
                self.nodes[t.node].name,
                t.state,
                t.ns.path().display()
            );
            let parts: Vec<String> = t
                .addrs
                .iter()
                .map(|(n, a)| format!("{{network: {n}, address: {a}}}"))
                .collect();
            y.push_str(&parts.join(", "));
            y.push_str("]}\n");
        }
        y
    }

    pub fn write_state(&self) {
        write_atomic(&self.state_path, &self.yaml());
    }

    fn agent_opts(&self) -> Vec<String> {
        let mut extra = vec!["--reach".to_string(), "cluster".to_string()];
        extra.extend(self.agent_args.iter().cloned());
        extra
    }

    /// Start (or restart) node `i`'s agent.
    pub fn start_agent(&mut self, i: usize) {
        let extra = self.agent_opts();
        let pin = self.nodes[i].pin_dir.clone();
        let a = Agent::start(AgentOpts {
            node: &self.nodes[i].name,
            netns: &self.nodes[i].ns,
            state: &self.state_path,
            ifaces: &["ul0"],
            extra,
            pin_dir: Some(pin),
        });
        self.nodes[i].agent = Some(a);
    }

    pub fn start_agents(&mut self) {
        self.write_state();
        for i in 0..self.nodes.len() {
            self.start_agent(i);
        }
    }

    /// Start every node's agent at once (each still waits for its own readiness): for callers
    /// that restart the whole cluster often. The state file is written first. If one fails,
    /// the others are kept (and stopped with the cluster) and its panic is passed on.
    pub fn start_agents_parallel(&mut self) {
        self.write_state();
        let extra = self.agent_opts();
        let state = self.state_path.clone();
        let started: Vec<std::thread::Result<Agent>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|n| {
                    let (extra, state) = (extra.clone(), &state);
                    s.spawn(move || {
                        Agent::start(AgentOpts {
                            node: &n.name,
                            netns: &n.ns,
                            state,
                            ifaces: &["ul0"],
                            extra,
                            pin_dir: Some(n.pin_dir.clone()),
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut failed = None;
        for (n, r) in self.nodes.iter_mut().zip(started) {
            match r {
                Ok(a) => n.agent = Some(a),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            std::panic::resume_unwind(e);
        }
    }

    pub fn agent(&self, i: usize) -> &Agent {
        self.nodes[i].agent.as_ref().expect("agent running")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (they remove what they made), then tasks, nodes, underlay.
        for n in &mut self.nodes {
            n.agent.take();
        }
        self.tasks.clear();
    }
}
