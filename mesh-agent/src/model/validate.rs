//! Strict validation of a [`StateFile`](super::StateFile) into a [`State`](super::State).
//!
//! Parsing ([`parse_yaml`]) refuses type errors and unknown keys with the field path that
//! carries them (`tasks[2].networks[0].address`, `services[0].bogus`). Validation
//! ([`validate`]) then checks every cross-reference and collision of the model, following
//! Swarm's semantics, and reports *all* the violations it finds, each with the precise path
//! of the offending field (`services[1].ports[0].published`), never just the first one.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::Path,
};

use ipnet::Ipv4Net;

use super::{
    EndpointMode, Network, Node, OrdMap, Protocol, STATE_VERSION, Service, ServiceNetwork, State,
    StateFile, Task, TaskNetwork,
};

/// Path used for errors that concern the whole document (YAML syntax, empty input).
pub const DOCUMENT_PATH: &str = "(document)";

/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = 16_777_215;

/// Longest subnet prefix accepted: a network needs a gateway and at least one task address.
pub const MAX_PREFIX_LEN: u8 = 30;

/// One problem, tied to the field that carries it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Field path in the state file, e.g. `tasks[2].networks[0].address`.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Why a state file was refused.
///
/// Display: one `path: message` line per error (lines separated by `\n`, no trailing newline).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The text is not a well-formed state file: YAML syntax, a value of the wrong type, an
    /// unknown key. Parsing stops at the first such error.
    #[error("{0}")]
    Parse(FieldError),
    /// The file is well-formed but breaks the model's rules; every violation is listed
    /// (never empty).
    #[error("{}", Lines(.0))]
    Invalid(Vec<FieldError>),
}

impl StateError {
    /// Every error, in the order found.
    pub fn errors(&self) -> &[FieldError] {
        match self {
            StateError::Parse(e) => std::slice::from_ref(e),
            StateError::Invalid(v) => v,
        }
    }
}

struct Lines<'a>(&'a [FieldError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Parse a YAML state file and validate it.
pub fn parse_yaml(text: &str) -> Result<State, StateError> {
    let de = serde_norway::Deserializer::from_str(text);
    let file: StateFile = serde_path_to_error::deserialize(de).map_err(parse_error)?;
    validate(file)
}

fn parse_error(err: serde_path_to_error::Error<serde_norway::Error>) -> StateError {
    let path = err.path().to_string();
    let mut message = err.inner().to_string();
    // serde_norway prefixes its own copy of the path (or of a parent's: it does not count an
    // unknown key) to some messages; keep a single, complete one.
    if let Some((head, rest)) = message.split_once(": ")
        && !head.is_empty()
        && !head.contains(' ')
        && path.starts_with(head)
    {
        message = rest.to_string();
    }
    if !message.contains(" at line ")
        && let Some(loc) = err.inner().location()
    {
        message = format!("{message} at line {} column {}", loc.line(), loc.column());
    }
    let path = if path == "." {
        DOCUMENT_PATH.to_string()
    } else {
        path
    };
    StateError::Parse(FieldError { path, message })
}

/// Validate a parsed state file: every rule is checked and every violation reported.
pub fn validate(file: StateFile) -> Result<State, StateError> {
    let mut v = Validator::default();
    let ctx = v.check(&file);
    if !v.errors.is_empty() {
        return Err(StateError::Invalid(v.errors));
    }
    Ok(build(&file, &ctx))
}

// ---------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

/// What the checks learn about the networks, reused when building the [`State`].
struct NetInfo {
    /// The subnet with host bits cleared.
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

struct Context {
    /// By network index.
    nets: Vec<NetInfo>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    fn check(&mut self, file: &StateFile) -> Context {
        if file.version != STATE_VERSION {
            self.err(
                "version",
                format!(
                    "unsupported version {} (this agent reads version {STATE_VERSION})",
                    file.version
                ),
            );
        }

        // ---- nodes -------------------------------------------------------------------
        let mut node_names: HashMap<&str, usize> = HashMap::new();
        let mut node_addrs: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, n) in file.nodes.iter().enumerate() {
            let p = format!("nodes[{i}]");
            if let Some(m) = label_problem(&n.name) {
                self.err(format!("{p}.name"), m);
            }
            if let Some(&first) = node_names.get(n.name.as_str()) {
                self.err(
                    format!("{p}.name"),
                    format!("duplicate node name `{}` (also nodes[{first}])", n.name),
                );
            } else {
                node_names.insert(&n.name, i);
            }
            let a = n.address;
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                self.err(
                    format!("{p}.address"),
                    format!("{a} is not a usable unicast node address"),
                );
            }
            if let Some(&first) = node_addrs.get(&a) {
                self.err(
                    format!("{p}.address"),
                    format!(
                        "address {a} is also the address of node `{}` (nodes[{first}])",
                        file.nodes[first].name
                    ),
                );
            } else {
                node_addrs.insert(a, i);
            }
        }

        // ---- networks ----------------------------------------------------------------
        let mut net_names: HashMap<&str, usize> = HashMap::new();
        let mut vnis: HashMap<u32, usize> = HashMap::new();
        let mut nets: Vec<NetInfo> = Vec::with_capacity(file.networks.len());
        for (i, n) in file.networks.iter().enumerate() {
            let p = format!("networks[{i}]");
            if let Some(m) = label_problem(&n.name) {
                self.err(format!("{p}.name"), m);
            }
            if let Some(&first) = net_names.get(n.name.as_str()) {
                self.err(
                    format!("{p}.name"),
                    format!(
                        "duplicate network name `{}` (also networks[{first}])",
                        n.name
                    ),
                );
            } else {
                net_names.insert(&n.name, i);
            }

            if n.vni == 0 || n.vni > MAX_VNI {
                self.err(
                    format!("{p}.vni"),
                    format!("vni {} is out of range 1..={MAX_VNI}", n.vni),
                );
            } else if let Some(&first) = vnis.get(&n.vni) {
                self.err(
                    format!("{p}.vni"),
                    format!(
                        "vni {} is also used by network `{}` (networks[{first}])",
                        n.vni, file.networks[first].name
                    ),
                );
            } else {
                vnis.insert(n.vni, i);
            }

            let subnet = n.subnet.trunc();
            if n.subnet.addr() != subnet.addr() {
                self.err(
                    format!("{p}.subnet"),
                    format!("{} has host bits set (did you mean {subnet}?)", n.subnet),
                );
            }
            if subnet.prefix_len() > MAX_PREFIX_LEN {
                self.err(
                    format!("{p}.subnet"),
                    format!(
                        "prefix /{} is too long: at most /{MAX_PREFIX_LEN} (room for a gateway \
                         and tasks)",
                        subnet.prefix_len()
                    ),
                );
            }
            for (j, other) in nets.iter().enumerate() {
                if subnet.contains(&other.subnet.network())
                    || other.subnet.contains(&subnet.network())
                {
                    self.err(
                        format!("{p}.subnet"),
                        format!(
                            "{subnet} overlaps the subnet {} of network `{}` (networks[{j}])",
                            other.subnet, file.networks[j].name
                        ),
                    );
                }
            }

            let gateway = match n.gateway {
                Some(g) => {
                    if !subnet.contains(&g) {
                        self.err(
                            format!("{p}.gateway"),
                            format!("gateway {g} is outside the subnet {subnet}"),
                        );
                    } else if g == subnet.network() {
                        self.err(
                            format!("{p}.gateway"),
                            format!("gateway {g} is the network address of {subnet}"),
                        );
                    } else if g == subnet.broadcast() {
                        self.err(
                            format!("{p}.gateway"),
                            format!("gateway {g} is the broadcast address of {subnet}"),
                        );
                    }
                    g
                }
                None => default_gateway(subnet),
            };
            nets.push(NetInfo { subnet, gateway });
        }

        // ---- services ----------------------------------------------------------------
        // Lowercased names; first occurrence wins (later ones are reported as duplicates).
        let svc_names: Vec<String> = file
            .services
            .iter()
            .map(|s| s.name.to_ascii_lowercase())
            .collect();
        let mut svc_by_name: HashMap<&str, usize> = HashMap::new();
        for (i, s) in file.services.iter().enumerate() {
            let p = format!("services[{i}].name");
            let name = svc_names[i].as_str();
            if name.contains('.') {
                self.err(&p, format!("service name `{}` may not contain '.'", s.name));
            } else if let Some(m) = label_problem(name) {
                self.err(&p, m);
            }
            if let Some(&first) = svc_by_name.get(name) {
                self.err(
                    &p,
                    format!(
                        "duplicate service name `{}` (also services[{first}], `{}`; service \
                         names are case-insensitive)",
                        s.name, file.services[first].name
                    ),
                );
            } else {
                svc_by_name.insert(name, i);
            }
        }

        // Service names per network (for alias clashes): (network, name) -> service index.
        let mut names_on_net: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, s) in file.services.iter().enumerate() {
            for sn in &s.networks {
                names_on_net
                    .entry((sn.network.as_str(), svc_names[i].as_str()))
                    .or_insert(i);
            }
        }

        // All task addresses, any state (a VIP may collide with none of them).
        let mut task_addrs: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (t, task) in file.tasks.iter().enumerate() {
            for tn in &task.networks {
                task_addrs.entry(tn.address).or_insert(t);
            }
        }

        let mut vips: HashMap<Ipv4Addr, (usize, usize)> = HashMap::new();
        let mut published: HashMap<(u16, Protocol), (usize, usize)> = HashMap::new();
        let mut aliases: HashMap<(&str, String), (usize, usize, usize)> = HashMap::new();
        for (i, s) in file.services.iter().enumerate() {
            let p = format!("services[{i}]");
            let mut listed: HashMap<&str, usize> = HashMap::new();
            for (j, sn) in s.networks.iter().enumerate() {
                let pn = format!("{p}.networks[{j}]");
                let net = net_names.get(sn.network.as_str()).copied();
                if net.is_none() {
                    self.err(
                        format!("{pn}.network"),
                        format!("unknown network `{}`", sn.network),
                    );
                }
                if let Some(&first) = listed.get(sn.network.as_str()) {
                    self.err(
                        format!("{pn}.network"),
                        format!(
                            "network `{}` is listed twice (also {p}.networks[{first}])",
                            sn.network
                        ),
                    );
                } else {
                    listed.insert(&sn.network, j);
                }

                match (s.endpoint_mode, sn.vip) {
                    (EndpointMode::Vip, None) => self.err(
                        format!("{pn}.vip"),
                        "required: the service's endpoint_mode is vip",
                    ),
                    (EndpointMode::Dnsrr, Some(_)) => self.err(
                        format!("{pn}.vip"),
                        "not allowed: the service's endpoint_mode is dnsrr",
                    ),
                    (EndpointMode::Vip, Some(vip)) => {
                        let pv = format!("{pn}.vip");
                        if let Some(n) = net
                            && let Some(m) = host_problem(vip, &sn.network, &nets[n])
                        {
                            self.err(&pv, format!("VIP {m}"));
                        }
                        if let Some(&(oi, oj)) = vips.get(&vip) {
                            self.err(
                                &pv,
                                format!(
                                    "VIP {vip} is also the VIP of service `{}` \
                                     (services[{oi}].networks[{oj}].vip)",
                                    file.services[oi].name
                                ),
                            );
                        } else {
                            vips.insert(vip, (i, j));
                        }
                        if let Some(&t) = task_addrs.get(&vip) {
                            self.err(
                                &pv,
                                format!(
                                    "VIP {vip} is also the address of task `{}` (tasks[{t}])",
                                    file.tasks[t].id
                                ),
                            );
                        }
                    }
                    (EndpointMode::Dnsrr, None) => {}
                }

                for (k, alias) in sn.aliases.iter().enumerate() {
                    let pa = format!("{pn}.aliases[{k}]");
                    let a = alias.to_ascii_lowercase();
                    if let Some(m) = dns_name_problem(&a) {
                        self.err(&pa, m);
                    }
                    if a == svc_names[i] {
                        self.err(&pa, format!("alias `{alias}` is the service's own name"));
                    } else if let Some(&other) = names_on_net.get(&(sn.network.as_str(), &a)) {
                        self.err(
                            &pa,
                            format!(
                                "alias `{alias}` is the name of service `{}` (services[{other}]) \
                                 on network `{}`",
                                file.services[other].name, sn.network
                            ),
                        );
                    }
                    match aliases.get(&(sn.network.as_str(), a.clone())) {
                        Some(&(oi, oj, ok)) => self.err(
                            &pa,
                            format!(
                                "alias `{alias}` on network `{}` is also an alias of service `{}` \
                                 (services[{oi}].networks[{oj}].aliases[{ok}])",
                                sn.network, file.services[oi].name
                            ),
                        ),
                        None => {
                            aliases.insert((sn.network.as_str(), a), (i, j, k));
                        }
                    }
                }
            }

            if !s.ports.is_empty() && s.networks.is_empty() && s.endpoint_mode == EndpointMode::Vip
            {
                self.err(
                    format!("{p}.ports"),
                    "published ports need at least one network (the first one carries their \
                     traffic to the tasks)",
                );
            }
            for (k, port) in s.ports.iter().enumerate() {
                let pp = format!("{p}.ports[{k}]");
                if s.endpoint_mode == EndpointMode::Dnsrr {
                    self.err(
                        format!("{pp}.published"),
                        "port published with ingress mode can't be used with dnsrr mode",
                    );
                }
                if port.published == 0 {
                    self.err(format!("{pp}.published"), "must be 1..=65535");
                } else {
                    let key = (port.published, port.protocol);
                    match published.get(&key) {
                        Some(&(oi, ok)) => self.err(
                            format!("{pp}.published"),
                            format!(
                                "port {}/{} of service `{}` is already published by service `{}` \
                                 (services[{oi}].ports[{ok}])",
                                port.published,
                                port.protocol.as_str(),
                                s.name,
                                file.services[oi].name
                            ),
                        ),
                        None => {
                            published.insert(key, (i, k));
                        }
                    }
                }
                if port.target == 0 {
                    self.err(format!("{pp}.target"), "must be 1..=65535");
                }
            }
        }

        // ---- tasks -------------------------------------------------------------------
        let mut task_ids: HashMap<&str, usize> = HashMap::new();
        let mut attached: HashMap<(&str, Ipv4Addr), usize> = HashMap::new();
        let mut running_slots: HashMap<(usize, u32), usize> = HashMap::new();
        for (t, task) in file.tasks.iter().enumerate() {
            let p = format!("tasks[{t}]");
            if let Some(m) = label_problem(&task.id) {
                self.err(format!("{p}.id"), m);
            }
            if let Some(&first) = task_ids.get(task.id.as_str()) {
                self.err(
                    format!("{p}.id"),
                    format!("duplicate task id `{}` (also tasks[{first}])", task.id),
                );
            } else {
                task_ids.insert(&task.id, t);
            }

            let svc = svc_by_name
                .get(task.service.to_ascii_lowercase().as_str())
                .copied();
            if svc.is_none() {
                self.err(
                    format!("{p}.service"),
                    format!("unknown service `{}`", task.service),
                );
            }
            if !node_names.contains_key(task.node.as_str()) {
                self.err(format!("{p}.node"), format!("unknown node `{}`", task.node));
            }
            if task.slot == 0 {
                self.err(
                    format!("{p}.slot"),
                    "must be at least 1 (slots are 1-based)",
                );
            } else if task.state.is_running()
                && let Some(s) = svc
            {
                if let Some(&other) = running_slots.get(&(s, task.slot)) {
                    self.err(
                        format!("{p}.slot"),
                        format!(
                            "slot {} of service `{}` is also held by running task `{}` \
                             (tasks[{other}])",
                            task.slot, file.services[s].name, file.tasks[other].id
                        ),
                    );
                } else {
                    running_slots.insert((s, task.slot), t);
                }
            }

            // `netns` is node-local runtime data: a manager (the Swarm source) knows only its
            // own host's sandboxes, so a running task on another node has none. The node that
            // runs a task without one reports it when it cannot attach it.
            if let Some(path) = &task.netns
                && let Some(m) = abs_path_problem(path)
            {
                self.err(format!("{p}.netns"), m);
            }
            if let Some(path) = &task.resolv_conf
                && let Some(m) = abs_path_problem(path)
            {
                self.err(format!("{p}.resolv_conf"), m);
            }

            let mut listed: HashMap<&str, usize> = HashMap::new();
            for (j, tn) in task.networks.iter().enumerate() {
                let pn = format!("{p}.networks[{j}]");
                let net = net_names.get(tn.network.as_str()).copied();
                match net {
                    None => self.err(
                        format!("{pn}.network"),
                        format!("unknown network `{}`", tn.network),
                    ),
                    Some(_) => {
                        if let Some(s) = svc
                            && !file.services[s]
                                .networks
                                .iter()
                                .any(|sn| sn.network == tn.network)
                        {
                            self.err(
                                format!("{pn}.network"),
                                format!(
                                    "service `{}` is not attached to network `{}`",
                                    file.services[s].name, tn.network
                                ),
                            );
                        }
                    }
                }
                if let Some(&first) = listed.get(tn.network.as_str()) {
                    self.err(
                        format!("{pn}.network"),
                        format!(
                            "network `{}` is listed twice (also {p}.networks[{first}])",
                            tn.network
                        ),
                    );
                } else {
                    listed.insert(&tn.network, j);
                }

                let pa = format!("{pn}.address");
                if let Some(n) = net
                    && let Some(m) = host_problem(tn.address, &tn.network, &nets[n])
                {
                    self.err(&pa, format!("address {m}"));
                }
                if task.state.is_attached() {
                    let key = (tn.network.as_str(), tn.address);
                    if let Some(&other) = attached.get(&key) {
                        self.err(
                            &pa,
                            format!(
                                "address {} on network `{}` is also used by task `{}` \
                                 (tasks[{other}])",
                                tn.address, tn.network, file.tasks[other].id
                            ),
                        );
                    } else {
                        attached.insert(key, t);
                    }
                }
            }

            if task.state.is_running()
                && let Some(s) = svc
            {
                let have: HashSet<&str> =
                    task.networks.iter().map(|n| n.network.as_str()).collect();
                for sn in &file.services[s].networks {
                    // An unknown network is reported on the service already.
                    if !have.contains(sn.network.as_str())
                        && net_names.contains_key(sn.network.as_str())
                    {
                        self.err(
                            format!("{p}.networks"),
                            format!(
                                "running task has no address on network `{}` of service `{}`",
                                sn.network, file.services[s].name
                            ),
                        );
                    }
                }
            }
        }

        Context { nets }
    }
}

/// Problem with a DNS label (node, network and service names, task ids), or `None`.
fn label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".to_string());
    }
    if s.len() > 63 {
        return Some(format!(
            "`{s}` is {} characters long: at most 63 (a DNS label)",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "`{s}` contains {c:?}: only lowercase letters, digits and '-' are allowed"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some(format!("`{s}` must start and end with a letter or digit"));
    }
    None
}

/// Problem with a DNS name (aliases: dot-separated labels), or `None`.
fn dns_name_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".to_string());
    }
    if s.len() > 253 {
        return Some(format!("`{s}` is longer than 253 characters"));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Some(format!("`{s}` has an empty label"));
        }
        if let Some(m) = label_problem(label) {
            return Some(if label == s {
                m
            } else {
                format!("in `{s}`: {m}")
            });
        }
    }
    None
}

fn abs_path_problem(p: &Path) -> Option<String> {
    if p.is_absolute() {
        None
    } else {
        Some(format!("`{}` must be an absolute path", p.display()))
    }
}

/// Why `addr` cannot be a host (VIP or task) address on network `name`, or `None`.
/// The message reads after "VIP " / "address ".
fn host_problem(addr: Ipv4Addr, name: &str, net: &NetInfo) -> Option<String> {
    let subnet = net.subnet;
    if !subnet.contains(&addr) {
        Some(format!(
            "{addr} is outside the subnet {subnet} of network `{name}`"
        ))
    } else if addr == subnet.network() {
        Some(format!(
            "{addr} is the network address of network `{name}` ({subnet})"
        ))
    } else if addr == subnet.broadcast() {
        Some(format!(
            "{addr} is the broadcast address of network `{name}` ({subnet})"
        ))
    } else if addr == net.gateway {
        Some(format!("{addr} is the gateway of network `{name}`"))
    } else {
        None
    }
}

/// The first host address of `subnet` (its network address + 1).
fn default_gateway(subnet: Ipv4Net) -> Ipv4Addr {
    let base = u32::from(subnet.network());
    Ipv4Addr::from(base.checked_add(1).unwrap_or(base))
}

// ---------------------------------------------------------------------------------------
// Building the validated State (only called once every check passed)
// ---------------------------------------------------------------------------------------

fn build(file: &StateFile, ctx: &Context) -> State {
    let nodes = file
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                Node {
                    name: n.name.clone(),
                    address: n.address,
                },
            )
        })
        .collect();
    let networks = file
        .networks
        .iter()
        .zip(&ctx.nets)
        .map(|(n, info)| {
            (
                n.name.clone(),
                Network {
                    name: n.name.clone(),
                    subnet: info.subnet,
                    vni: n.vni,
                    gateway: info.gateway,
                },
            )
        })
        .collect();
    let services = file
        .services
        .iter()
        .map(|s| {
            let name = s.name.to_ascii_lowercase();
            (
                name.clone(),
                Service {
                    name,
                    endpoint_mode: s.endpoint_mode,
                    networks: s
                        .networks
                        .iter()
                        .map(|sn| ServiceNetwork {
                            network: sn.network.clone(),
                            vip: sn.vip,
                            aliases: sn.aliases.iter().map(|a| a.to_ascii_lowercase()).collect(),
                        })
                        .collect(),
                    ports: s.ports.clone(),
                },
            )
        })
        .collect();
    let tasks = file
        .tasks
        .iter()
        .map(|t| {
            (
                t.id.clone(),
                Task {
                    id: t.id.clone(),
                    service: t.service.to_ascii_lowercase(),
                    slot: t.slot,
                    node: t.node.clone(),
                    state: t.state,
                    netns: t.netns.clone(),
                    resolv_conf: t.resolv_conf.clone(),
                    networks: t
                        .networks
                        .iter()
                        .map(|n| TaskNetwork {
                            network: n.network.clone(),
                            address: n.address,
                        })
                        .collect(),
                },
            )
        })
        .collect::<OrdMap<_, _>>();
    State {
        nodes,
        networks,
        services,
        tasks,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::model::{
        NetworkSpec, NodeSpec, PortSpec, ServiceNetworkSpec, ServiceSpec, TaskNetworkSpec,
        TaskSpec, TaskState,
    };
    use std::collections::BTreeMap;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn svc_net(network: &str, vip: Option<&str>, aliases: &[&str]) -> ServiceNetworkSpec {
        ServiceNetworkSpec {
            network: network.into(),
            vip: vip.map(ip),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn task(
        id: &str,
        service: &str,
        slot: u32,
        node: &str,
        state: TaskState,
        nets: &[(&str, &str)],
    ) -> TaskSpec {
        TaskSpec {
            id: id.into(),
            service: service.into(),
            slot,
            node: node.into(),
            state,
            netns: state
                .is_attached()
                .then(|| PathBuf::from(format!("/run/netns/{id}"))),
            resolv_conf: None,
            networks: nets
                .iter()
                .map(|(n, a)| TaskNetworkSpec {
                    network: n.to_string(),
                    address: ip(a),
                })
                .collect(),
        }
    }

    /// A valid state exercising most features.
    fn base() -> StateFile {
        StateFile {
            version: 1,
            nodes: vec![
                NodeSpec {
                    name: "n1".into(),
                    address: ip("192.168.0.1"),
                },
                NodeSpec {
                    name: "n2".into(),
                    address: ip("192.168.0.2"),
                },
            ],
            networks: vec![
                NetworkSpec {
                    name: "front".into(),
                    subnet: net("10.1.0.0/24"),
                    vni: 100,
                    gateway: None,
                },
                NetworkSpec {
                    name: "back".into(),
                    subnet: net("10.2.0.0/24"),
                    vni: 200,
                    gateway: Some(ip("10.2.0.254")),
                },
            ],
            services: vec![
                ServiceSpec {
                    name: "web".into(),
                    endpoint_mode: EndpointMode::Vip,
                    networks: vec![
                        svc_net("front", Some("10.1.0.2"), &["www"]),
                        svc_net("back", Some("10.2.0.2"), &[]),
                    ],
                    ports: vec![PortSpec {
                        published: 8080,
                        target: 80,
                        protocol: Protocol::Tcp,
                    }],
                },
                ServiceSpec {
                    name: "db".into(),
                    endpoint_mode: EndpointMode::Dnsrr,
                    networks: vec![svc_net("back", None, &["database"])],
                    ports: vec![],
                },
            ],
            tasks: vec![
                task(
                    "t1",
                    "web",
                    1,
                    "n1",
                    TaskState::Running,
                    &[("front", "10.1.0.11"), ("back", "10.2.0.11")],
                ),
                task(
                    "t2",
                    "web",
                    2,
                    "n2",
                    TaskState::Running,
                    &[("front", "10.1.0.12"), ("back", "10.2.0.12")],
                ),
                task(
                    "t3",
                    "db",
                    1,
                    "n1",
                    TaskState::Running,
                    &[("back", "10.2.0.21")],
                ),
                // Not attached: may share t1's address and slot, needs no netns nor every network.
                task(
                    "t4",
                    "web",
                    1,
                    "n2",
                    TaskState::Shutdown,
                    &[("front", "10.1.0.11")],
                ),
            ],
        }
    }

    fn errors(file: StateFile) -> Vec<FieldError> {
        match validate(file) {
            Ok(_) => panic!("expected the state to be refused"),
            Err(StateError::Invalid(v)) => v,
            Err(e) => panic!("expected Invalid, got {e:?}"),
        }
    }

    /// Exactly one error, at `path`, whose message contains `needle`.
    #[track_caller]
    fn assert_one(file: StateFile, path: &str, needle: &str) {
        let errs = errors(file);
        assert_eq!(errs.len(), 1, "expected one error at {path}, got {errs:#?}");
        assert_eq!(errs[0].path, path, "{errs:#?}");
        assert!(
            errs[0].message.contains(needle),
            "message {:?} lacks {needle:?}",
            errs[0].message
        );
    }

    fn parse_err(text: &str) -> FieldError {
        match parse_yaml(text) {
            Err(StateError::Parse(e)) => e,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn base_is_valid() {
        validate(base()).unwrap();
    }

    // ---- version ----

    #[test]
    fn version_must_be_1() {
        let mut f = base();
        f.version = 2;
        assert_one(f, "version", "unsupported version 2");
    }

    // ---- names ----

    #[test]
    fn node_name_empty() {
        let mut f = base();
        f.nodes[1].name = String::new();
        // The tasks on n2 now reference an unknown node too.
        let errs = errors(f);
        assert_eq!(errs[0].path, "nodes[1].name");
        assert_eq!(errs[0].message, "must not be empty");
    }

    #[test]
    fn node_name_charset() {
        let mut f = base();
        f.nodes.push(NodeSpec {
            name: "Node_3".into(),
            address: ip("192.168.0.3"),
        });
        assert_one(f, "nodes[2].name", "only lowercase letters");
    }

    #[test]
    fn node_name_too_long() {
        let mut f = base();
        f.nodes.push(NodeSpec {
            name: "a".repeat(64),
            address: ip("192.168.0.3"),
        });
        assert_one(f, "nodes[2].name", "at most 63");
        let mut f = base();
        f.nodes.push(NodeSpec {
            name: "a".repeat(63),
            address: ip("192.168.0.3"),
        });
        validate(f).unwrap();
    }

    #[test]
    fn node_name_must_start_with_alnum() {
        let mut f = base();
        f.nodes.push(NodeSpec {
            name: "-n3".into(),
            address: ip("192.168.0.3"),
        });
        assert_one(f, "nodes[2].name", "start and end");
    }

    #[test]
    fn node_name_duplicate() {
        let mut f = base();
        f.nodes.push(NodeSpec {
            name: "n1".into(),
            address: ip("192.168.0.3"),
        });
        assert_one(
            f,
            "nodes[2].name",
            "duplicate node name `n1` (also nodes[0])",
        );
    }

    #[test]
    fn node_address_duplicate() {
        let mut f = base();
        f.nodes[1].address = ip("192.168.0.1");
        assert_one(f, "nodes[1].address", "node `n1`");
    }

    #[test]
    fn node_address_unusable() {
        let mut f = base();
        f.nodes[1].address = ip("0.0.0.0");
        assert_one(f, "nodes[1].address", "not a usable");
    }

    #[test]
    fn network_name_invalid_and_duplicate() {
        let mut f = base();
        f.networks.push(NetworkSpec {
            name: "a.b".into(),
            subnet: net("10.3.0.0/24"),
            vni: 300,
            gateway: None,
        });
        assert_one(f, "networks[2].name", "'.'");

        let mut f = base();
        f.networks.push(NetworkSpec {
            name: "front".into(),
            subnet: net("10.3.0.0/24"),
            vni: 300,
            gateway: None,
        });
        assert_one(f, "networks[2].name", "duplicate network name `front`");
    }

    #[test]
    fn service_name_invalid() {
        let mut f = base();
        f.services[1].name = "my.db".into();
        f.services[1].networks[0].aliases.clear();
        f.tasks.retain(|t| t.service != "db");
        assert_one(f, "services[1].name", "may not contain '.'");

        let mut f = base();
        f.services[1].name = "db_1".into();
        f.tasks.retain(|t| t.service != "db");
        assert_one(f, "services[1].name", "'_'");

        let mut f = base();
        f.services[1].name = String::new();
        f.tasks.retain(|t| t.service != "db");
        assert_one(f, "services[1].name", "must not be empty");
    }

    #[test]
    fn service_names_are_case_insensitive() {
        // Upper case is accepted and lowercased, tasks may reference either spelling.
        let mut f = base();
        f.services[0].name = "Web".into();
        f.tasks[0].service = "WEB".into();
        let s = validate(f).unwrap();
        assert!(s.services.contains_key("web"));
        assert_eq!(s.services["web"].name, "web");
        assert_eq!(s.tasks["t1"].service, "web");

        // Two services differing only by case are duplicates.
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "DB".into(),
            endpoint_mode: EndpointMode::Dnsrr,
            networks: vec![],
            ports: vec![],
        });
        assert_one(f, "services[2].name", "duplicate service name `DB`");
    }

    #[test]
    fn task_id_invalid_and_duplicate() {
        let mut f = base();
        f.tasks[3].id = "T4!".into();
        assert_one(f, "tasks[3].id", "only lowercase letters");

        let mut f = base();
        f.tasks[3].id = "t1".into();
        assert_one(f, "tasks[3].id", "duplicate task id `t1` (also tasks[0])");
    }

    // ---- networks ----

    #[test]
    fn vni_range() {
        let mut f = base();
        f.networks[0].vni = 0;
        assert_one(f, "networks[0].vni", "out of range");
        let mut f = base();
        f.networks[0].vni = 16_777_216;
        assert_one(f, "networks[0].vni", "out of range");
        let mut f = base();
        f.networks[0].vni = 16_777_215;
        validate(f).unwrap();
    }

    #[test]
    fn vni_duplicate() {
        let mut f = base();
        f.networks[1].vni = 100;
        assert_one(f, "networks[1].vni", "network `front`");
    }

    #[test]
    fn subnet_prefix_too_long() {
        let mut f = base();
        f.networks.push(NetworkSpec {
            name: "tiny".into(),
            subnet: net("10.3.0.0/31"),
            vni: 300,
            gateway: None,
        });
        assert_one(f, "networks[2].subnet", "at most /30");
    }

    #[test]
    fn subnet_host_bits() {
        let mut f = base();
        f.networks.push(NetworkSpec {
            name: "other".into(),
            subnet: net("10.3.0.5/24"),
            vni: 300,
            gateway: None,
        });
        assert_one(f, "networks[2].subnet", "did you mean 10.3.0.0/24");
    }

    #[test]
    fn subnets_overlap() {
        let mut f = base();
        f.networks.push(NetworkSpec {
            name: "wide".into(),
            subnet: net("10.0.0.0/8"),
            vni: 300,
            gateway: None,
        });
        let errs = errors(f);
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["networks[2].subnet", "networks[2].subnet"],
            "{errs:#?}"
        );
        assert!(errs[0].message.contains("network `front`"));
        assert!(errs[1].message.contains("network `back`"));
    }

    #[test]
    fn gateway_outside_subnet() {
        let mut f = base();
        f.networks[1].gateway = Some(ip("10.9.0.1"));
        assert_one(f, "networks[1].gateway", "outside the subnet 10.2.0.0/24");
    }

    #[test]
    fn gateway_network_or_broadcast() {
        let mut f = base();
        f.networks[1].gateway = Some(ip("10.2.0.0"));
        assert_one(f, "networks[1].gateway", "network address");
        let mut f = base();
        f.networks[1].gateway = Some(ip("10.2.0.255"));
        assert_one(f, "networks[1].gateway", "broadcast address");
    }

    #[test]
    fn default_gateway_is_first_host() {
        let s = validate(base()).unwrap();
        assert_eq!(s.networks["front"].gateway, ip("10.1.0.1"));
        assert_eq!(s.networks["back"].gateway, ip("10.2.0.254"));
    }

    // ---- services ----

    #[test]
    fn vip_required_in_vip_mode() {
        let mut f = base();
        f.services[0].networks[1].vip = None;
        assert_one(f, "services[0].networks[1].vip", "required");
    }

    #[test]
    fn vip_forbidden_in_dnsrr_mode() {
        let mut f = base();
        f.services[1].networks[0].vip = Some(ip("10.2.0.3"));
        assert_one(f, "services[1].networks[0].vip", "not allowed");
    }

    #[test]
    fn published_port_forbidden_in_dnsrr_mode() {
        let mut f = base();
        f.services[1].ports.push(PortSpec {
            published: 5432,
            target: 5432,
            protocol: Protocol::Tcp,
        });
        assert_one(
            f,
            "services[1].ports[0].published",
            "port published with ingress mode can't be used with dnsrr mode",
        );
    }

    #[test]
    fn published_ports_need_a_network() {
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "lonely".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![],
            ports: vec![PortSpec {
                published: 9000,
                target: 9000,
                protocol: Protocol::Tcp,
            }],
        });
        assert_one(f, "services[2].ports", "at least one network");
    }

    #[test]
    fn service_network_unknown() {
        let mut f = base();
        f.services[0]
            .networks
            .push(svc_net("nowhere", Some("10.3.0.2"), &[]));
        assert_one(
            f,
            "services[0].networks[2].network",
            "unknown network `nowhere`",
        );
    }

    #[test]
    fn service_network_listed_twice() {
        let mut f = base();
        f.services[0]
            .networks
            .push(svc_net("front", Some("10.1.0.3"), &[]));
        assert_one(
            f,
            "services[0].networks[2].network",
            "listed twice (also services[0].networks[0])",
        );
    }

    #[test]
    fn vip_outside_subnet() {
        let mut f = base();
        f.services[0].networks[0].vip = Some(ip("10.2.0.3"));
        assert_one(
            f,
            "services[0].networks[0].vip",
            "outside the subnet 10.1.0.0/24",
        );
    }

    #[test]
    fn vip_reserved_addresses() {
        for (addr, needle) in [
            ("10.1.0.0", "network address"),
            ("10.1.0.255", "broadcast address"),
            ("10.1.0.1", "gateway"),
        ] {
            let mut f = base();
            f.services[0].networks[0].vip = Some(ip(addr));
            assert_one(f, "services[0].networks[0].vip", needle);
        }
    }

    #[test]
    fn vip_duplicate() {
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "api".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![svc_net("front", Some("10.1.0.2"), &[])],
            ports: vec![],
        });
        assert_one(
            f,
            "services[2].networks[0].vip",
            "also the VIP of service `web` (services[0].networks[0].vip)",
        );
    }

    #[test]
    fn vip_collides_with_task_address() {
        let mut f = base();
        f.services[0].networks[0].vip = Some(ip("10.1.0.12"));
        assert_one(
            f,
            "services[0].networks[0].vip",
            "address of task `t2` (tasks[1])",
        );
    }

    #[test]
    fn port_zero() {
        let mut f = base();
        f.services[0].ports[0].published = 0;
        assert_one(f, "services[0].ports[0].published", "1..=65535");
        let mut f = base();
        f.services[0].ports[0].target = 0;
        assert_one(f, "services[0].ports[0].target", "1..=65535");
    }

    #[test]
    fn published_port_duplicate_across_services() {
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "api".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![svc_net("front", Some("10.1.0.3"), &[])],
            ports: vec![
                // Same number, other protocol: fine.
                PortSpec {
                    published: 8080,
                    target: 80,
                    protocol: Protocol::Udp,
                },
                PortSpec {
                    published: 8080,
                    target: 8000,
                    protocol: Protocol::Tcp,
                },
            ],
        });
        let errs = errors(f);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].path, "services[2].ports[1].published");
        assert!(errs[0].message.contains("8080/tcp"), "{}", errs[0].message);
        assert!(
            errs[0].message.contains("service `api`"),
            "{}",
            errs[0].message
        );
        assert!(
            errs[0].message.contains("service `web`"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn alias_invalid() {
        let mut f = base();
        f.services[0].networks[0].aliases.push("bad_alias".into());
        assert_one(f, "services[0].networks[0].aliases[1]", "'_'");
        let mut f = base();
        f.services[0].networks[0].aliases.push("a..b".into());
        assert_one(f, "services[0].networks[0].aliases[1]", "empty label");
        // Dotted aliases are fine, and lowercased.
        let mut f = base();
        f.services[0].networks[0]
            .aliases
            .push("Web.Internal".into());
        let s = validate(f).unwrap();
        assert_eq!(
            s.services["web"].networks[0].aliases,
            ["www", "web.internal"]
        );
    }

    #[test]
    fn alias_duplicate_across_services() {
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "api".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![svc_net("front", Some("10.1.0.3"), &["WWW"])],
            ports: vec![],
        });
        assert_one(
            f,
            "services[2].networks[0].aliases[0]",
            "also an alias of service `web` (services[0].networks[0].aliases[0])",
        );
        // The same alias on another network is fine.
        let mut f = base();
        f.services.push(ServiceSpec {
            name: "api".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![svc_net("back", Some("10.2.0.3"), &["www"])],
            ports: vec![],
        });
        validate(f).unwrap();
    }

    #[test]
    fn alias_is_another_services_name() {
        let mut f = base();
        f.services[0].networks[1].aliases.push("db".into());
        assert_one(
            f,
            "services[0].networks[1].aliases[0]",
            "name of service `db` (services[1]) on network `back`",
        );
        // `db` is not on `front`: no clash there.
        let mut f = base();
        f.services[0].networks[0].aliases.push("db".into());
        validate(f).unwrap();
    }

    #[test]
    fn alias_is_own_name() {
        let mut f = base();
        f.services[0].networks[0].aliases.push("web".into());
        assert_one(f, "services[0].networks[0].aliases[1]", "own name");
    }

    // ---- tasks ----

    #[test]
    fn task_unknown_service() {
        let mut f = base();
        f.tasks[3].service = "ghost".into();
        assert_one(f, "tasks[3].service", "unknown service `ghost`");
    }

    #[test]
    fn task_unknown_node() {
        let mut f = base();
        f.tasks[3].node = "n9".into();
        assert_one(f, "tasks[3].node", "unknown node `n9`");
    }

    #[test]
    fn task_slot_zero() {
        let mut f = base();
        f.tasks[3].slot = 0;
        assert_one(f, "tasks[3].slot", "at least 1");
    }

    #[test]
    fn task_network_unknown() {
        let mut f = base();
        f.tasks[3].networks[0].network = "nowhere".into();
        assert_one(
            f,
            "tasks[3].networks[0].network",
            "unknown network `nowhere`",
        );
    }

    #[test]
    fn task_network_not_of_its_service() {
        let mut f = base();
        f.tasks[2].networks.push(TaskNetworkSpec {
            network: "front".into(),
            address: ip("10.1.0.21"),
        });
        assert_one(
            f,
            "tasks[2].networks[1].network",
            "service `db` is not attached to network `front`",
        );
    }

    #[test]
    fn task_network_listed_twice() {
        let mut f = base();
        f.tasks[3].networks.push(TaskNetworkSpec {
            network: "front".into(),
            address: ip("10.1.0.40"),
        });
        assert_one(
            f,
            "tasks[3].networks[1].network",
            "listed twice (also tasks[3].networks[0])",
        );
    }

    #[test]
    fn task_address_outside_or_reserved() {
        for (addr, needle) in [
            ("10.2.0.30", "outside the subnet 10.1.0.0/24"),
            ("10.1.0.0", "network address"),
            ("10.1.0.255", "broadcast address"),
            ("10.1.0.1", "gateway"),
        ] {
            let mut f = base();
            f.tasks[3].networks[0].address = ip(addr);
            assert_one(f, "tasks[3].networks[0].address", needle);
        }
        // An explicit gateway is reserved too.
        let mut f = base();
        f.tasks[2].networks[0].address = ip("10.2.0.254");
        assert_one(
            f,
            "tasks[2].networks[0].address",
            "gateway of network `back`",
        );
    }

    #[test]
    fn attached_tasks_share_address() {
        let mut f = base();
        f.tasks[1].networks[1].address = ip("10.2.0.11");
        assert_one(
            f,
            "tasks[1].networks[1].address",
            "also used by task `t1` (tasks[0])",
        );
        // A starting task counts as attached.
        let mut f = base();
        f.tasks[3].state = TaskState::Starting;
        f.tasks[3].netns = Some("/run/netns/t4".into());
        assert_one(f, "tasks[3].networks[0].address", "task `t1`");
    }

    #[test]
    fn running_tasks_share_slot() {
        let mut f = base();
        f.tasks[1].slot = 1;
        assert_one(
            f,
            "tasks[1].slot",
            "slot 1 of service `web` is also held by running task `t1`",
        );
        // Same slot in another service is fine.
        let mut f = base();
        f.tasks[2].slot = 2;
        validate(f).unwrap();
    }

    #[test]
    fn netns_is_optional_node_local_data() {
        // A running task on another node (as the Swarm source reports it) has no netns.
        let mut f = base();
        f.tasks[0].netns = None;
        validate(f).unwrap();
    }

    #[test]
    fn netns_and_resolv_conf_must_be_absolute() {
        let mut f = base();
        f.tasks[0].netns = Some("netns/t1".into());
        assert_one(f, "tasks[0].netns", "absolute");
        let mut f = base();
        f.tasks[0].resolv_conf = Some("resolv.conf".into());
        assert_one(f, "tasks[0].resolv_conf", "absolute");
    }

    #[test]
    fn running_task_needs_every_network() {
        let mut f = base();
        f.tasks[0].networks.pop();
        assert_one(
            f,
            "tasks[0].networks",
            "no address on network `back` of service `web`",
        );
    }

    // ---- reporting ----

    #[test]
    fn all_errors_are_reported() {
        let mut f = base();
        f.version = 3;
        f.networks[0].vni = 0;
        f.services[0].ports[0].published = 0;
        f.tasks[2].node = "nope".into();
        f.tasks[3].slot = 0;
        let err = validate(f).unwrap_err();
        let paths: Vec<&str> = err.errors().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "version",
                "networks[0].vni",
                "services[0].ports[0].published",
                "tasks[2].node",
                "tasks[3].slot",
            ]
        );
        // Display: one `path: message` line per error.
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(
            lines[0],
            "version: unsupported version 3 (this agent reads version 1)"
        );
        assert_eq!(lines[3], "tasks[2].node: unknown node `nope`");
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = parse_err("version: 1\nservices:\n  - name: web\n    bogus: 1\n");
        assert_eq!(e.path, "services[0].bogus");
        assert!(
            e.message
                .starts_with("unknown field `bogus`, expected one of `name`"),
            "{}",
            e.message
        );
        assert!(e.message.ends_with("at line 4 column 5"), "{}", e.message);

        let e = parse_err("version: 1\nextra: true\n");
        assert_eq!(e.path, "extra");
    }

    #[test]
    fn type_errors_name_the_path() {
        let text = "\
version: 1
networks:
  - name: net
    subnet: 10.9.0.0/24
    vni: 9
tasks:
  - id: a
    service: s
    slot: 1
    node: n
    state: running
    networks:
      - network: net
        address: 10.9.0.300
";
        let e = parse_err(text);
        assert_eq!(e.path, "tasks[0].networks[0].address");
        assert!(
            e.message.starts_with("invalid IPv4 address syntax"),
            "{}",
            e.message
        );
        assert_eq!(
            StateError::Parse(e.clone()).to_string(),
            format!("tasks[0].networks[0].address: {}", e.message)
        );

        let e = parse_err(
            "version: 1\ntasks:\n  - {id: a, service: s, slot: 1, node: n, state: dancing}\n",
        );
        assert_eq!(e.path, "tasks[0].state");
        assert!(
            e.message.contains("unknown variant `dancing`"),
            "{}",
            e.message
        );

        let e = parse_err("version: one\n");
        assert_eq!(e.path, "version");

        let e = parse_err("nodes: []\n");
        assert_eq!(e.path, DOCUMENT_PATH);
        assert!(
            e.message.contains("missing field `version`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn yaml_syntax_errors_are_document_level() {
        let e = parse_err("\tversion: 1\n");
        assert_eq!(e.path, DOCUMENT_PATH);
        assert!(e.message.contains("line 1"), "{}", e.message);
        // Later on, the path is where the parser stood.
        let e = parse_err("version: 1\nnodes: [\n");
        assert!(e.message.contains("line"), "{}", e.message);
        let e = parse_err("");
        assert_eq!(e.path, DOCUMENT_PATH);
    }

    #[test]
    fn valid_file_round_trips() {
        let text = "\
version: 1
nodes:
  - {name: n1, address: 192.168.0.1}
networks:
  - {name: front, subnet: 10.1.0.0/24, vni: 100}
services:
  - name: Web
    networks:
      - {network: front, vip: 10.1.0.2, aliases: [WWW]}
    ports:
      - {published: 8080, target: 80}
tasks:
  - id: t1
    service: web
    slot: 1
    node: n1
    state: running
    netns: /run/netns/t1
    resolv_conf: /etc/netns/t1/resolv.conf
    networks:
      - {network: front, address: 10.1.0.11}
";
        let s = parse_yaml(text).unwrap();
        let expected = State {
            nodes: BTreeMap::from([(
                "n1".to_string(),
                Node {
                    name: "n1".into(),
                    address: ip("192.168.0.1"),
                },
            )]),
            networks: BTreeMap::from([(
                "front".to_string(),
                Network {
                    name: "front".into(),
                    subnet: net("10.1.0.0/24"),
                    vni: 100,
                    gateway: ip("10.1.0.1"),
                },
            )]),
            services: OrdMap::from(vec![(
                "web".to_string(),
                Service {
                    name: "web".into(),
                    endpoint_mode: EndpointMode::Vip,
                    networks: vec![ServiceNetwork {
                        network: "front".into(),
                        vip: Some(ip("10.1.0.2")),
                        aliases: vec!["www".into()],
                    }],
                    ports: vec![PortSpec {
                        published: 8080,
                        target: 80,
                        protocol: Protocol::Tcp,
                    }],
                },
            )]),
            tasks: OrdMap::from(vec![(
                "t1".to_string(),
                Task {
                    id: "t1".into(),
                    service: "web".into(),
                    slot: 1,
                    node: "n1".into(),
                    state: TaskState::Running,
                    netns: Some("/run/netns/t1".into()),
                    resolv_conf: Some("/etc/netns/t1/resolv.conf".into()),
                    networks: vec![TaskNetwork {
                        network: "front".into(),
                        address: ip("10.1.0.11"),
                    }],
                },
            )]),
        };
        assert_eq!(s, expected);

        // Serializing the wire form and parsing it again gives the same state.
        let yaml = serde_norway::to_string(&base()).unwrap();
        assert_eq!(parse_yaml(&yaml).unwrap(), validate(base()).unwrap());
    }

    #[test]
    fn example_file_is_valid() {
        let s = parse_yaml(include_str!("../../../docs/state.example.yaml"))
            .unwrap_or_else(|e| panic!("docs/state.example.yaml:\n{e}"));
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.networks.len(), 2);
        assert_eq!(s.services["db"].endpoint_mode, EndpointMode::Dnsrr);
        assert!(
            s.services
                .values()
                .flat_map(|s| &s.ports)
                .any(|p| p.protocol == Protocol::Udp)
        );
        assert_eq!(s.networks["backend"].gateway, ip("10.0.2.254"));
    }

    #[test]
    fn demo_file_is_valid() {
        let s = parse_yaml(include_str!("../../assets/demo.yaml"))
            .unwrap_or_else(|e| panic!("assets/demo.yaml:\n{e}"));
        assert_eq!(s.nodes["demo"].address, ip("198.18.0.1"));
        let n = &s.networks["demo"];
        assert_eq!((n.subnet, n.vni), (net("10.200.0.0/24"), 4200));
        let w = &s.services["whoami"];
        assert_eq!(w.endpoint_mode, EndpointMode::Vip);
        assert_eq!(w.networks[0].vip, Some(ip("10.200.0.2")));
        assert_eq!(w.ports.len(), 2);
        let running: Vec<_> = s.running_tasks("whoami").collect();
        assert_eq!(running.len(), 3);
        for (i, t) in running.iter().enumerate() {
            assert_eq!(t.id.len(), 25);
            assert_eq!(t.slot as usize, i + 1);
            assert_eq!(
                t.netns.as_deref(),
                Some(std::path::Path::new(&format!(
                    "/run/netns/mesh-demo-{}",
                    i + 1
                )))
            );
            assert_eq!(
                t.address_on("demo"),
                Some(Ipv4Addr::new(10, 200, 0, 11 + i as u8))
            );
        }
    }

    /// A snapshot rebased on the previous one equals itself and shares what did not change:
    /// identical maps are the previous ones (pointer-equal), a one-task change differs from
    /// the previous snapshot by exactly that task.
    #[test]
    fn rebase_shares_unchanged_structure() {
        let yaml = |tasks: usize| {
            let mut y = String::from(
                "version: 1\nnodes: [{name: n1, address: 198.18.0.1}]\nnetworks: [{name: app, subnet: 10.0.0.0/16, vni: 4097}]\n\
                 services: [{name: web, networks: [{network: app, vip: 10.0.0.2}]}]\ntasks:\n",
            );
            for i in 0..tasks {
                y.push_str(&format!(
                    "- {{id: t{i}, service: web, slot: {}, node: n1, state: running, networks: [{{network: app, address: 10.0.{}.{}}}]}}\n",
                    i + 1,
                    1 + i / 200,
                    1 + i % 200
                ));
            }
            parse_yaml(&y).unwrap()
        };
        let prev = yaml(500);
        let same = yaml(500).rebase(&prev);
        assert_eq!(same, prev);
        assert!(same.tasks.ptr_eq(&prev.tasks) && same.services.ptr_eq(&prev.services));
        let next = yaml(501);
        let rebased = next.clone().rebase(&prev);
        assert_eq!(rebased, next);
        assert!(!rebased.tasks.ptr_eq(&prev.tasks) && rebased.services.ptr_eq(&prev.services));
        let diff: Vec<_> = prev.tasks.diff(&rebased.tasks).collect();
        assert_eq!(diff.len(), 1);
        assert!(matches!(diff[0], imbl::ordmap::DiffItem::Add(k, _) if k == "t500"));
        let shrunk = yaml(499).rebase(&rebased);
        assert_eq!(shrunk, yaml(499));
    }
}
