//! The mapping from the Engine API's objects (bollard's models, built here) to the model, and
//! the source's bookkeeping, without Docker.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use bollard::models::{
    ContainerStatus, EndpointPortConfig, EndpointPortConfigProtocolEnum as Proto,
    EndpointPortConfigPublishModeEnum as PublishMode, EndpointSpec, EndpointSpecModeEnum, Ipam,
    IpamConfig, ManagerStatus, Network, NetworkAttachmentConfig, Node, NodeDescription, NodeState,
    NodeStatus, ObjectVersion, Service, ServiceEndpoint, ServiceEndpointVirtualIps, ServiceSpec,
    Task, TaskSpec, TaskState as D, TaskStatus,
};

use super::{
    DockerEndpoint, Last, SwarmError, SwarmSource,
    map::{
        AttachedNetwork, AttachedNetworkSpec, ClusterView, NetworkAttachment, SwarmTask,
        VXLANID_OPTION, addr, label, local_containers, map, task_state,
    },
};
use crate::{
    model::{self, EndpointMode, PortSpec, Protocol, State, StateFile, TaskState},
    source::{Source, SourceError, SourceEvent},
};

const LOCAL: &str = "nodelocal0000000000000001";
const REMOTE: &str = "noderemote000000000000002";
const INGRESS: &str = "ingressnet000000000000000";
const APPNET: &str = "appnet0000000000000000000";
const WEB: &str = "websvc0000000000000000000";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn node(id: &str, host: &str, address: &str, state: NodeState, version: u64) -> Node {
    Node {
        id: Some(id.into()),
        version: Some(ObjectVersion {
            index: Some(version),
        }),
        description: Some(NodeDescription {
            hostname: Some(host.into()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            state: Some(state),
            addr: Some(address.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn network(id: &str, name: &str, subnet: &str, gateway: &str, vni: &str, ingress: bool) -> Network {
    Network {
        name: Some(name.into()),
        id: Some(id.into()),
        scope: Some("swarm".into()),
        driver: Some("overlay".into()),
        ingress: Some(ingress),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.into()),
                gateway: Some(gateway.into()),
                ..Default::default()
            }]),
            options: None,
        }),
        options: Some(HashMap::from([(
            VXLANID_OPTION.to_string(),
            vni.to_string(),
        )])),
        ..Default::default()
    }
}

fn port(published: i64, target: i64, proto: Proto, mode: PublishMode) -> EndpointPortConfig {
    EndpointPortConfig {
        protocol: Some(proto),
        target_port: Some(target),
        published_port: Some(published),
        publish_mode: Some(mode),
        ..Default::default()
    }
}

/// A service as Docker 20.10 lists it: the spec (mode, networks by id, ports) and the
/// allocated endpoint (ports, VIPs in CIDR notation).
fn service(
    id: &str,
    name: &str,
    mode: EndpointSpecModeEnum,
    networks: &[&str],
    vips: &[(&str, &str)],
    ports: Vec<EndpointPortConfig>,
) -> Service {
    Service {
        id: Some(id.into()),
        spec: Some(ServiceSpec {
            name: Some(name.into()),
            task_template: Some(TaskSpec {
                networks: Some(
                    networks
                        .iter()
                        .map(|n| NetworkAttachmentConfig {
                            target: Some(n.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            endpoint_spec: Some(EndpointSpec {
                mode: Some(mode),
                ports: Some(ports.clone()),
            }),
            ..Default::default()
        }),
        endpoint: Some(ServiceEndpoint {
            // Docker 20.10 leaves the allocated mode empty for dnsrr services.
            spec: Some(EndpointSpec {
                mode: (mode == EndpointSpecModeEnum::VIP).then_some(mode),
                ports: Some(ports.clone()),
            }),
            ports: (!ports.is_empty()).then_some(ports),
            virtual_ips: (!vips.is_empty()).then(|| {
                vips.iter()
                    .map(|(n, a)| ServiceEndpointVirtualIps {
                        network_id: Some(n.to_string()),
                        addr: Some(a.to_string()),
                    })
                    .collect()
            }),
        }),
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn task(
    id: &str,
    service: &str,
    slot: Option<i64>,
    node: &str,
    state: D,
    desired: D,
    attachments: &[(&str, &str)],
    container: Option<&str>,
) -> SwarmTask {
    SwarmTask {
        task: Task {
            id: Some(id.into()),
            version: Some(ObjectVersion { index: Some(10) }),
            service_id: Some(service.into()),
            slot,
            node_id: (!node.is_empty()).then(|| node.to_string()),
            status: Some(TaskStatus {
                state: Some(state),
                container_status: container.map(|c| ContainerStatus {
                    container_id: Some(c.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            desired_state: Some(desired),
            ..Default::default()
        },
        networks_attachments: Some(
            attachments
                .iter()
                .map(|(n, a)| NetworkAttachment {
                    network: Some(AttachedNetwork {
                        id: Some(n.to_string()),
                        spec: None,
                    }),
                    addresses: Some(vec![a.to_string()]),
                })
                .collect(),
        ),
    }
}

fn sandbox(c: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/docker/netns/{}", &c[..12]))
}

/// One local node, ingress + appnet, service `web` (vip, 8080->80/tcp) with three running
/// local tasks whose containers run here.
fn base() -> ClusterView {
    let containers = ["c1c1c1c1c1c1c1c1", "c2c2c2c2c2c2c2c2", "c3c3c3c3c3c3c3c3"];
    ClusterView {
        nodes: vec![node(LOCAL, "vm", "10.231.0.1", NodeState::READY, 5)],
        networks: vec![
            network(INGRESS, "ingress", "10.0.0.0/24", "10.0.0.1", "4096", true),
            network(APPNET, "appnet", "10.0.1.0/24", "10.0.1.1", "4097", false),
            // Local networks are not the swarm's.
            Network {
                name: Some("docker_gwbridge".into()),
                id: Some("gw".into()),
                scope: Some("local".into()),
                driver: Some("bridge".into()),
                ..Default::default()
            },
        ],
        services: vec![service(
            WEB,
            "web",
            EndpointSpecModeEnum::VIP,
            &[APPNET],
            &[(INGRESS, "10.0.0.3/24"), (APPNET, "10.0.1.2/24")],
            vec![port(8080, 80, Proto::TCP, PublishMode::INGRESS)],
        )],
        tasks: (1..=3)
            .map(|i| {
                task(
                    &format!("task{i}00000000000000000000"),
                    WEB,
                    Some(i),
                    LOCAL,
                    D::RUNNING,
                    D::RUNNING,
                    &[
                        (INGRESS, &format!("10.0.0.{}/24", 3 + i)),
                        (APPNET, &format!("10.0.1.{}/24", 2 + i)),
                    ],
                    Some(containers[i as usize - 1]),
                )
            })
            .collect(),
        local_node: Some(LOCAL.into()),
        sandboxes: containers
            .iter()
            .map(|c| (c.to_string(), sandbox(c)))
            .collect(),
    }
}

fn file(view: &ClusterView) -> StateFile {
    map(view).file
}

fn state(view: &ClusterView) -> State {
    let m = map(view);
    model::validate(m.file.clone()).unwrap_or_else(|e| {
        panic!(
            "mapped state does not validate:\n{e}\nnotes: {:#?}",
            m.notes
        )
    })
}

#[test]
fn replicated_vip_service_with_ingress_port() {
    assert_eq!(map(&base()).local_node.as_deref(), Some("vm"));
    let s = state(&base());
    assert_eq!(s.nodes["vm"].address, ip("10.231.0.1"));
    let ingress = &s.networks["ingress"];
    assert_eq!(
        (ingress.subnet.to_string(), ingress.vni),
        ("10.0.0.0/24".into(), 4096)
    );
    assert_eq!(ingress.gateway, ip("10.0.0.1"));
    assert_eq!(s.networks["appnet"].vni, 4097);
    assert!(!s.networks.contains_key("docker_gwbridge"));

    let web = &s.services["web"];
    assert_eq!(web.endpoint_mode, EndpointMode::Vip);
    // Ingress first (it carries the published ports), VIPs without their prefix.
    let nets: Vec<(&str, Option<Ipv4Addr>)> = web
        .networks
        .iter()
        .map(|n| (n.network.as_str(), n.vip))
        .collect();
    assert_eq!(
        nets,
        [
            ("ingress", Some(ip("10.0.0.3"))),
            ("appnet", Some(ip("10.0.1.2")))
        ]
    );
    assert_eq!(
        web.ports,
        [PortSpec {
            published: 8080,
            target: 80,
            protocol: Protocol::Tcp
        }]
    );

    let running: Vec<_> = s.running_tasks("web").collect();
    assert_eq!(running.len(), 3);
    for (i, t) in running.iter().enumerate() {
        assert_eq!(t.slot as usize, i + 1);
        assert_eq!(t.node, "vm");
        assert_eq!(
            t.address_on("appnet"),
            Some(Ipv4Addr::new(10, 0, 1, 3 + i as u8))
        );
        assert_eq!(
            t.address_on("ingress"),
            Some(Ipv4Addr::new(10, 0, 0, 4 + i as u8))
        );
        assert!(
            t.netns
                .as_ref()
                .unwrap()
                .starts_with("/var/run/docker/netns/")
        );
        assert_eq!(t.resolv_conf, None);
    }
}

#[test]
fn dnsrr_service_has_no_vips_and_no_ports() {
    let mut v = base();
    // As Docker 20.10 lists a dnsrr service: Endpoint.Spec.Mode empty, no VirtualIPs. Ports
    // (which Docker refuses with dnsrr) are dropped rather than making the state invalid.
    v.services.push(service(
        "dbsvc00000000000000000000",
        "db",
        EndpointSpecModeEnum::DNSRR,
        &[APPNET],
        &[],
        vec![port(5432, 5432, Proto::TCP, PublishMode::INGRESS)],
    ));
    v.tasks.push(task(
        "dbtask0000000000000000001",
        "dbsvc00000000000000000000",
        Some(1),
        LOCAL,
        D::RUNNING,
        D::RUNNING,
        &[(APPNET, "10.0.1.20/24")],
        Some("c1c1c1c1c1c1c1c1"),
    ));
    let m = map(&v);
    assert!(
        m.notes.iter().any(|n| n.contains("dnsrr")),
        "{:#?}",
        m.notes
    );
    let s = state(&v);
    let db = &s.services["db"];
    assert_eq!(db.endpoint_mode, EndpointMode::Dnsrr);
    assert!(db.ports.is_empty());
    assert_eq!(db.networks.len(), 1);
    assert_eq!(db.networks[0].network, "appnet");
    assert_eq!(db.networks[0].vip, None);
    assert_eq!(
        s.tasks["dbtask0000000000000000001"].address_on("appnet"),
        Some(ip("10.0.1.20"))
    );
}

#[test]
fn only_ingress_mode_tcp_and_udp_ports_are_published() {
    let mut v = base();
    v.services[0] = service(
        WEB,
        "web",
        EndpointSpecModeEnum::VIP,
        &[APPNET],
        &[(INGRESS, "10.0.0.3/24"), (APPNET, "10.0.1.2/24")],
        vec![
            port(8080, 80, Proto::TCP, PublishMode::INGRESS),
            port(8181, 81, Proto::TCP, PublishMode::HOST),
            port(9090, 90, Proto::UDP, PublishMode::INGRESS),
            port(9191, 91, Proto::SCTP, PublishMode::INGRESS),
            // Protocol and mode left empty mean tcp and ingress.
            port(7070, 70, Proto::EMPTY, PublishMode::EMPTY),
        ],
    );
    let s = state(&v);
    let got: Vec<(u16, u16, Protocol)> = s.services["web"]
        .ports
        .iter()
        .map(|p| (p.published, p.target, p.protocol))
        .collect();
    assert_eq!(
        got,
        [
            (8080, 80, Protocol::Tcp),
            (9090, 90, Protocol::Udp),
            (7070, 70, Protocol::Tcp)
        ]
    );
}

#[test]
fn service_without_ports_is_not_on_ingress() {
    let mut v = base();
    // Ports removed; a stale ingress VIP is still listed.
    v.services[0] = service(
        WEB,
        "web",
        EndpointSpecModeEnum::VIP,
        &[APPNET],
        &[(INGRESS, "10.0.0.3/24"), (APPNET, "10.0.1.2/24")],
        vec![],
    );
    let s = state(&v);
    let nets: Vec<&str> = s.services["web"]
        .networks
        .iter()
        .map(|n| n.network.as_str())
        .collect();
    assert_eq!(nets, ["appnet"]);
    // The tasks' ingress addresses are not listed either.
    for t in s.tasks.values() {
        assert_eq!(t.address_on("ingress"), None);
    }
}

#[test]
fn vip_prefix_and_addresses() {
    assert_eq!(addr("10.0.1.2/24"), Some(ip("10.0.1.2")));
    assert_eq!(addr("10.0.1.2"), Some(ip("10.0.1.2")));
    assert_eq!(addr("fd00::2/64"), None);
    assert_eq!(addr(""), None);
}

#[test]
fn network_without_vip_yet_is_left_out_of_the_service() {
    let mut v = base();
    v.services[0].endpoint.as_mut().unwrap().virtual_ips = Some(vec![ServiceEndpointVirtualIps {
        network_id: Some(INGRESS.into()),
        addr: Some("10.0.0.3/24".into()),
    }]);
    let m = map(&v);
    assert!(
        m.notes
            .iter()
            .any(|n| n.contains("no VIP on network `appnet`")),
        "{:#?}",
        m.notes
    );
    let s = state(&v);
    let nets: Vec<&str> = s.services["web"]
        .networks
        .iter()
        .map(|n| n.network.as_str())
        .collect();
    assert_eq!(nets, ["ingress"]);
}

#[test]
fn missing_addresses() {
    let mut v = base();
    // Pending, not yet allocated: no attachments at all; assigned with addresses.
    v.tasks.push(task(
        "pending000000000000000004",
        WEB,
        Some(4),
        LOCAL,
        D::PREPARING,
        D::RUNNING,
        &[],
        None,
    ));
    // Running (locally, container running) but with no address on appnet: not a backend.
    v.tasks[0].networks_attachments.as_mut().unwrap().pop();
    let s = state(&v);
    let p = &s.tasks["pending000000000000000004"];
    assert_eq!(p.state, TaskState::Preparing);
    assert!(p.networks.is_empty());
    assert_eq!(p.netns, None);
    let t1 = &s.tasks["task100000000000000000000"];
    assert_eq!(t1.state, TaskState::Starting);
    assert_eq!(t1.address_on("appnet"), None);
    assert_eq!(s.running_tasks("web").count(), 2);
}

#[test]
fn global_service_slots_follow_node_order() {
    let mut v = base();
    v.nodes
        .push(node(REMOTE, "other", "10.231.0.2", NodeState::READY, 3));
    v.services.push(service(
        "globalsvc0000000000000000",
        "agent",
        EndpointSpecModeEnum::DNSRR,
        &[APPNET],
        &[],
        vec![],
    ));
    for (id, n, a) in [
        ("glocal0000000000000000001", LOCAL, "10.0.1.30/24"),
        ("gremote000000000000000001", REMOTE, "10.0.1.31/24"),
    ] {
        v.tasks.push(task(
            id,
            "globalsvc0000000000000000",
            None,
            n,
            D::PREPARING,
            D::RUNNING,
            &[(APPNET, a)],
            None,
        ));
    }
    let f = file(&v);
    let slot = |id: &str| f.tasks.iter().find(|t| t.id == id).unwrap().slot;
    // Sorted node ids: nodelocal… < noderemote…
    assert_eq!(slot("glocal0000000000000000001"), 1);
    assert_eq!(slot("gremote000000000000000001"), 2);
    let s = state(&v);
    assert_eq!(s.tasks["gremote000000000000000001"].node, "other");
    // Stable: the same view maps to the same state.
    assert_eq!(state(&v), s);
}

#[test]
fn task_states() {
    for (docker, ours) in [
        (D::NEW, TaskState::New),
        (D::ALLOCATED, TaskState::Pending),
        (D::PENDING, TaskState::Pending),
        (D::ASSIGNED, TaskState::Assigned),
        (D::ACCEPTED, TaskState::Accepted),
        (D::PREPARING, TaskState::Preparing),
        (D::READY, TaskState::Preparing),
        (D::STARTING, TaskState::Starting),
        (D::RUNNING, TaskState::Running),
        (D::COMPLETE, TaskState::Complete),
        (D::SHUTDOWN, TaskState::Shutdown),
        (D::FAILED, TaskState::Failed),
        (D::REJECTED, TaskState::Rejected),
        (D::REMOVE, TaskState::Remove),
        (D::ORPHANED, TaskState::Orphaned),
    ] {
        assert_eq!(task_state(docker), ours, "{docker:?}");
    }

    let mut v = base();
    // History (terminal) tasks are left out: their addresses are reused by newer tasks.
    v.tasks.push(task(
        "failed0000000000000000001",
        WEB,
        Some(1),
        LOCAL,
        D::FAILED,
        D::SHUTDOWN,
        &[(INGRESS, "10.0.0.4/24"), (APPNET, "10.0.1.3/24")],
        Some("deaddeaddeaddead"),
    ));
    // Not yet assigned to a node.
    v.tasks.push(task(
        "unassigned000000000000001",
        WEB,
        Some(4),
        "",
        D::PENDING,
        D::RUNNING,
        &[],
        None,
    ));
    // Being shut down (scaled down) while still running: attached, no longer a backend.
    v.tasks[2].task.desired_state = Some(D::SHUTDOWN);
    // Running locally, but its container is gone: nothing to attach.
    v.sandboxes.remove("c2c2c2c2c2c2c2c2");
    let m = map(&v);
    assert!(
        m.notes
            .iter()
            .any(|n| n.contains("1 task(s) in a terminal state")),
        "{:#?}",
        m.notes
    );
    let s = state(&v);
    assert!(!s.tasks.contains_key("failed0000000000000000001"));
    assert!(!s.tasks.contains_key("unassigned000000000000001"));
    assert_eq!(
        s.tasks["task300000000000000000000"].state,
        TaskState::Starting
    );
    assert!(s.tasks["task300000000000000000000"].netns.is_some());
    assert_eq!(
        s.tasks["task200000000000000000000"].state,
        TaskState::Preparing
    );
    assert_eq!(s.tasks["task200000000000000000000"].netns, None);
    let running: Vec<&str> = s.running_tasks("web").map(|t| t.id.as_str()).collect();
    assert_eq!(running, ["task100000000000000000000"]);
}

#[test]
fn start_first_update_keeps_one_running_task_per_slot() {
    let mut v = base();
    let mut newer = task(
        "newer0000000000000000001",
        WEB,
        Some(1),
        LOCAL,
        D::RUNNING,
        D::RUNNING,
        &[(INGRESS, "10.0.0.40/24"), (APPNET, "10.0.1.40/24")],
        Some("c9c9c9c9c9c9c9c9"),
    );
    newer.task.version = Some(ObjectVersion { index: Some(99) });
    v.tasks.push(newer);
    v.sandboxes
        .insert("c9c9c9c9c9c9c9c9".into(), sandbox("c9c9c9c9c9c9c9c9"));
    let s = state(&v);
    assert_eq!(
        s.tasks["newer0000000000000000001"].state,
        TaskState::Running
    );
    assert_eq!(
        s.tasks["task100000000000000000000"].state,
        TaskState::Starting
    );
}

#[test]
fn remote_tasks_get_no_netns() {
    let mut v = base();
    v.nodes
        .push(node(REMOTE, "other", "10.231.0.2", NodeState::READY, 3));
    v.tasks.push(task(
        "remote0000000000000000001",
        WEB,
        Some(4),
        REMOTE,
        D::RUNNING,
        D::RUNNING,
        &[(INGRESS, "10.0.0.50/24"), (APPNET, "10.0.1.50/24")],
        Some("r1r1r1r1r1r1r1r1"),
    ));
    // The sandbox of a container of another node is not asked for.
    let wanted = local_containers(&v.tasks, v.local_node.as_deref());
    assert!(!wanted.contains("r1r1r1r1r1r1r1r1"));
    assert_eq!(wanted.len(), 3);
    let f = file(&v);
    let t = f
        .tasks
        .iter()
        .find(|t| t.id == "remote0000000000000000001")
        .unwrap();
    assert_eq!(t.state, TaskState::Running);
    assert_eq!(t.node, "other");
    assert_eq!(t.netns, None);
}

#[test]
fn names_become_dns_labels() {
    assert_eq!(label("stack_web").as_deref(), Some("stack-web"));
    assert_eq!(
        label("Node1.Example.COM").as_deref(),
        Some("node1-example-com")
    );
    assert_eq!(label("_x_").as_deref(), Some("x"));
    assert_eq!(label("___"), None);
    assert_eq!(label(&"a".repeat(70)).map(|l| l.len()), Some(63));

    let mut v = base();
    v.nodes[0].description.as_mut().unwrap().hostname = Some("VM.example.com".into());
    v.networks[1].name = Some("stack_appnet".into());
    v.services[0].spec.as_mut().unwrap().name = Some("Stack_Web".into());
    v.services[0]
        .spec
        .as_mut()
        .unwrap()
        .task_template
        .as_mut()
        .unwrap()
        .networks = Some(vec![NetworkAttachmentConfig {
        target: Some(APPNET.into()),
        aliases: Some(vec![
            "Www.Front".into(),
            "stack-web".into(),
            "bad alias!".into(),
        ]),
        ..Default::default()
    }]);
    let s = state(&v);
    assert!(s.nodes.contains_key("vm-example-com"));
    assert!(s.networks.contains_key("stack-appnet"));
    let web = &s.services["stack-web"];
    assert_eq!(web.networks[1].network, "stack-appnet");
    // The alias equal to the service's own name is dropped, the others sanitized.
    assert_eq!(web.networks[1].aliases, ["www.front", "bad-alias"]);
    assert!(
        s.tasks
            .values()
            .all(|t| t.service == "stack-web" && t.node == "vm-example-com")
    );
}

#[test]
fn duplicate_and_addressless_nodes() {
    let mut v = base();
    // A node that left and re-joined: a `down` copy with the same hostname and address.
    v.nodes.push(node(
        "oldcopy000000000000000001",
        "vm",
        "10.231.0.1",
        NodeState::DOWN,
        50,
    ));
    // A manager whose Status.Addr is 0.0.0.0: the manager address is used.
    let mut m = node(
        "manager000000000000000001",
        "mgr",
        "0.0.0.0",
        NodeState::READY,
        1,
    );
    m.manager_status = Some(ManagerStatus {
        addr: Some("10.231.0.9:2377".into()),
        ..Default::default()
    });
    v.nodes.push(m);
    // No address at all.
    v.nodes.push(node(
        "noaddr0000000000000000001",
        "ghost",
        "",
        NodeState::UNKNOWN,
        1,
    ));
    // A task of the dropped copy is dropped with it.
    v.tasks.push(task(
        "oncopy0000000000000000001",
        WEB,
        Some(9),
        "oldcopy000000000000000001",
        D::RUNNING,
        D::RUNNING,
        &[],
        None,
    ));
    let s = state(&v);
    let nodes: Vec<(&str, Ipv4Addr)> = s
        .nodes
        .values()
        .map(|n| (n.name.as_str(), n.address))
        .collect();
    assert_eq!(nodes, [("mgr", ip("10.231.0.9")), ("vm", ip("10.231.0.1"))]);
    assert!(!s.tasks.contains_key("oncopy0000000000000000001"));
    assert_eq!(
        map(&v).warnings,
        Vec::<String>::new(),
        "a re-joined node's stale copy is expected"
    );
}

#[test]
fn two_ready_hosts_with_one_hostname_are_a_warning() {
    let mut v = base();
    // A second live host that was given the same hostname: its tasks are not served, which
    // the operator must hear about (not only at debug level).
    v.nodes.push(node(
        "twin00000000000000000001",
        "vm",
        "10.231.0.7",
        NodeState::READY,
        1,
    ));
    let m = map(&v);
    let nodes: Vec<_> = m
        .file
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.address))
        .collect();
    assert_eq!(
        nodes,
        [("vm", ip("10.231.0.1"))],
        "the most recently updated one is kept"
    );
    assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
    let w = &m.warnings[0];
    assert!(
        w.contains("10.231.0.7") && w.contains("10.231.0.1") && w.contains("`vm`"),
        "{w}"
    );
}

#[test]
fn networks_without_vni_or_subnet_and_overlaps_are_left_out() {
    let mut v = base();
    let mut no_vni = network("novni", "novni", "10.9.0.0/24", "10.9.0.1", "", false);
    no_vni.options = None;
    v.networks.push(no_vni);
    v.networks.push(network(
        "v6",
        "v6only",
        "fd00::/64",
        "fd00::1",
        "4200",
        false,
    ));
    v.networks.push(network(
        "overlap",
        "overlap",
        "10.0.1.128/25",
        "10.0.1.129",
        "4300",
        false,
    ));
    v.networks.push(network(
        "multi",
        "multi",
        "10.7.0.0/24",
        "10.7.0.1",
        "4400,4401",
        false,
    ));
    let s = state(&v);
    let names: Vec<&str> = s.networks.keys().map(String::as_str).collect();
    assert_eq!(names, ["appnet", "ingress", "multi"]);
    assert_eq!(s.networks["multi"].vni, 4400);
}

#[test]
fn ingress_is_named_ingress_whatever_docker_calls_it() {
    let mut v = base();
    v.networks[0].name = Some("my-ingress".into());
    // A regular overlay that happens to be called `ingress` (possible once the real one was
    // re-created under another name) would be mistaken for it: left out.
    v.networks.push(network(
        "fake",
        "ingress",
        "10.8.0.0/24",
        "10.8.0.1",
        "4500",
        false,
    ));
    let m = map(&v);
    assert!(
        m.notes
            .iter()
            .any(|n| n.contains("network `ingress`: name `ingress` is taken")),
        "{:#?}",
        m.notes
    );
    let s = state(&v);
    assert_eq!(s.networks["ingress"].vni, 4096);
    assert_eq!(s.networks.len(), 2);
    assert_eq!(s.services["web"].ingress_network(), Some("ingress"));
}

#[test]
fn real_docker_20_10_json() {
    // What Docker 20.10.24 returned (node TLS and engine info trimmed) for `docker service
    // create --name web --replicas 3 --network appnet -p 8080:80 …`, a daemon restart (the
    // old tasks failed, their addresses were reused), then `docker service create --name g
    // --mode global --endpoint-mode dnsrr --network appnet …`.
    let nodes: Vec<Node> = serde_json::from_str(include_str!("testdata/nodes.json")).unwrap();
    let networks: Vec<Network> =
        serde_json::from_str(include_str!("testdata/networks.json")).unwrap();
    let services: Vec<Service> =
        serde_json::from_str(include_str!("testdata/services.json")).unwrap();
    let tasks: Vec<SwarmTask> = serde_json::from_str(include_str!("testdata/tasks.json")).unwrap();
    // The global task (no Slot) is attached to appnet only.
    assert_eq!(tasks[0].task.slot, None);
    assert_eq!(
        tasks[0].networks_attachments.as_ref().unwrap()[..],
        [NetworkAttachment {
            network: Some(AttachedNetwork {
                id: Some("26ntgdx1pzmfes8foks1tvsgm".into()),
                spec: Some(AttachedNetworkSpec {
                    name: Some("appnet".into())
                }),
            }),
            addresses: Some(vec!["10.0.1.6/24".into()]),
        }]
    );
    let local = "5fsv09b3d93fed5wmi1r1exap";
    let wanted = local_containers(&tasks, Some(local));
    assert_eq!(wanted.len(), 4, "{wanted:?}");
    let view = ClusterView {
        nodes,
        networks,
        services,
        sandboxes: wanted
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    PathBuf::from(format!("/var/run/docker/netns/{}", &c[..12])),
                )
            })
            .collect(),
        tasks,
        local_node: Some(local.into()),
    };
    let s = state(&view);
    assert_eq!(s.nodes["vm"].address, ip("10.231.0.1"));
    assert_eq!(s.networks["ingress"].vni, 4096);
    assert_eq!(s.networks["appnet"].vni, 4097);
    let web = &s.services["web"];
    assert_eq!(web.networks[0].vip, Some(ip("10.0.0.3")));
    assert_eq!(web.networks[1].vip, Some(ip("10.0.1.2")));
    assert_eq!(s.services["g"].endpoint_mode, EndpointMode::Dnsrr);
    assert_eq!(s.running_tasks("web").count(), 3);
    let g: Vec<_> = s.running_tasks("g").collect();
    assert_eq!((g.len(), g[0].slot), (1, 1));
    // The failed history tasks (whose addresses the new ones reuse) are gone.
    assert_eq!(s.tasks.len(), 4);
}

// ---- the source's bookkeeping -----------------------------------------------------------

#[test]
fn only_changed_outcomes_are_sent() {
    let mut src = SwarmSource::new(std::path::Path::new("/nonexistent/docker.sock"));
    let s1 = state(&base());
    assert!(matches!(
        src.judge(Ok(s1.clone())),
        Some(SourceEvent::Snapshot(_))
    ));
    assert!(src.judge(Ok(s1.clone())).is_none());
    let bad = model::validate(StateFile {
        version: 2,
        nodes: vec![],
        networks: vec![],
        services: vec![],
        tasks: vec![],
    })
    .unwrap_err();
    match src.judge(Err(bad.clone())) {
        Some(SourceEvent::Rejected(why)) => {
            assert!(why.contains("/nonexistent/docker.sock"), "{why}");
            assert!(why.contains("version"), "{why}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(src.judge(Err(bad)).is_none());
    // Back to the same good state after a refusal: sent again.
    assert!(matches!(src.judge(Ok(s1)), Some(SourceEvent::Snapshot(_))));
    assert!(matches!(src.last, Last::State(_)));
}

#[test]
fn endpoints() {
    let s = SwarmSource::from_endpoint("unix:///run/docker.sock").unwrap();
    assert_eq!(
        s.endpoint().socket(),
        Some(std::path::Path::new("/run/docker.sock"))
    );
    assert_eq!(s.describe(), "swarm:unix:///run/docker.sock");
    let s = SwarmSource::from_endpoint("/tmp/d.sock").unwrap();
    assert_eq!(
        s.endpoint().socket(),
        Some(std::path::Path::new("/tmp/d.sock"))
    );
    let s = SwarmSource::from_endpoint("tcp://10.0.0.1:2375").unwrap();
    assert_eq!(
        s.endpoint(),
        &DockerEndpoint::Tcp {
            addr: "10.0.0.1:2375".into(),
            tls: None
        }
    );
    assert_eq!(s.describe(), "swarm:tcp://10.0.0.1:2375");
    for bad in ["https://m:2376", "ssh://m", "unix://", "tcp://", ""] {
        match SwarmSource::from_endpoint(bad) {
            Err(e @ SwarmError::Endpoint { .. }) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad}: expected an endpoint error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn initial_gives_up_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let mut src = SwarmSource::new(&socket).with_initial_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let err = src.initial().await.expect_err("no daemon");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "gave up after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match &err {
        SourceError::Read { path, source } => {
            assert_eq!(path, &socket);
            let inner = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<SwarmError>());
            assert!(matches!(inner, Some(SwarmError::Connect { .. })), "{err}");
        }
        other => panic!("expected Read, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_errors_say_why() {
    // A socket file nobody listens on: connection refused, and the message says so.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut src = SwarmSource::new(&socket).with_initial_timeout(Duration::ZERO);
    let text = src.initial().await.expect_err("nobody listens").to_string();
    assert!(text.contains("GET /version"), "{text}");
    assert!(text.contains("refused"), "{text}");
}

#[tokio::test]
async fn run_survives_a_missing_daemon_and_stops_with_its_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let src = SwarmSource::new(dir.path().join("docker.sock"))
        .with_max_backoff(Duration::from_millis(300));
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let handle = tokio::spawn(Box::new(src).run(tx));
    let got = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    assert!(got.is_err(), "unexpected event: {got:?}");
    assert!(!handle.is_finished());
    drop(rx);
    tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("run() ends when the receiver goes")
        .unwrap();
}

#[test]
fn local_daemon_may_be_a_worker_the_manager_may_not() {
    use super::api::check_role;
    use bollard::models::{LocalNodeState, SwarmInfo};
    let ep = DockerEndpoint::default();
    let info = |id: &str, state, control| SwarmInfo {
        node_id: Some(id.to_string()),
        local_node_state: Some(state),
        control_available: Some(control),
        ..Default::default()
    };
    let worker = info("w1", LocalNodeState::ACTIVE, false);
    assert_eq!(
        check_role(&ep, worker.clone(), false).unwrap().node_id,
        "w1"
    );
    let e = check_role(&ep, worker, true).unwrap_err();
    assert!(matches!(e, SwarmError::NotManager { .. }), "{e}");
    assert!(e.to_string().contains("not a manager"), "{e}");
    let manager = info("m1", LocalNodeState::ACTIVE, true);
    assert_eq!(
        check_role(&ep, manager.clone(), true).unwrap().node_id,
        "m1"
    );
    assert_eq!(check_role(&ep, manager, false).unwrap().node_id, "m1");
    // A worker still joining, or no swarm at all: not usable as this node's daemon.
    let e = check_role(&ep, info("w2", LocalNodeState::PENDING, false), false).unwrap_err();
    assert!(
        matches!(e, SwarmError::NotInSwarm { .. }) && e.to_string().contains("pending"),
        "{e}"
    );
    let none = SwarmInfo {
        local_node_state: Some(LocalNodeState::INACTIVE),
        node_id: Some(String::new()),
        ..Default::default()
    };
    let e = check_role(&ep, none, false).unwrap_err();
    assert!(e.to_string().contains("not part of a swarm"), "{e}");
}

#[test]
fn a_separate_manager_is_described() {
    let s = SwarmSource::from_endpoint("unix:///run/local.sock")
        .unwrap()
        .with_manager(DockerEndpoint::try_from("tcp://10.0.0.1:2375").unwrap())
        .unwrap();
    assert_eq!(
        s.manager(),
        Some(&DockerEndpoint::Tcp {
            addr: "10.0.0.1:2375".into(),
            tls: None
        })
    );
    assert_eq!(
        crate::source::Source::describe(&s),
        "swarm:unix:///run/local.sock (manager tcp://10.0.0.1:2375)"
    );
    assert_eq!(
        SwarmSource::from_endpoint("/run/d.sock").unwrap().manager(),
        None
    );
}
