//! Root only (CI runs as root): VXLAN overlays between two "nodes", each a network namespace
//! joined by a veth underlay (198.18.0.1/24 ↔ 198.18.0.2/24). Each node has the network
//! bridges (`mbr-<vni>`, the gateway address, the same on every node as with Docker) and
//! one task namespace per network plugged into them; [`Overlay::converge`] runs inside each
//! node namespace on its own thread, like one agent per node. Assertions use real clients
//! (`ping`, TCP sockets) and the kernel's own view (`ip`, `bridge`).
//!
//! Every namespace has a unique name (pid + counter) and is deleted on drop, even on panic.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Output},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mesh_agent::{
    attach::Netlink,
    model::{Network, Node, State, Task, TaskNetwork, TaskState},
    netns,
    overlay::{Observed, Overlay, OverlayConfig, OverlayError, OverlayReport},
};

#[path = "common/cmd.rs"]
mod cmd;
use cmd::{run, run_ok};

/// How long any single reply from a node agent may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// `ip <args>`, which must succeed.
fn ip(args: &[&str]) -> String {
    run_ok("ip", args)
}

// ---------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------

/// Uniquely named namespaces, all deleted on drop (even on panic). Deleting a namespace
/// deletes every interface inside, so this cleans up everything the test made.
struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        Namespaces {
            prefix: format!(
                "mo{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            names: Vec::new(),
        }
    }

    /// Create `<prefix>-<role>` with `lo` up; returns its name.
    fn add(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn ns_path(name: &str) -> PathBuf {
    PathBuf::from(netns::NETNS_RUN_DIR).join(name)
}

/// `ip netns exec <ns> <args>`: its output, success or not.
fn exec(ns: &str, args: &[&str]) -> Output {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Ping with every wait bounded (per reply and overall).
fn ping(ns: &str, extra: &[&str], dst: &str) -> bool {
    let mut args = vec!["ping", "-n", "-c", "2", "-W", "2", "-w", "6"];
    args.extend_from_slice(extra);
    args.push(dst);
    exec(ns, &args).status.success()
}

// ---------------------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------------------

const GW_A: &str = "10.210.0.1";
const GW_B: &str = "10.211.0.1";

fn mac_of(addr: &str) -> String {
    let a: Ipv4Addr = addr.parse().expect("fixture address");
    let o = a.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// A network bridge as the attacher makes it: gateway address, MAC derived from it, MTU 1450.
fn add_bridge(node: &str, name: &str, gw: &str) {
    ip(&["-n", node, "link", "add", name, "type", "bridge"]);
    ip(&[
        "-n",
        node,
        "link",
        "set",
        name,
        "address",
        &mac_of(gw),
        "mtu",
        "1450",
        "up",
    ]);
    ip(&["-n", node, "addr", "add", &format!("{gw}/24"), "dev", name]);
}

/// A task namespace plugged into `bridge` on `node`: `eth0` with the task's address and MAC,
/// default route via the gateway.
fn add_task(node: &str, task_ns: &str, host_if: &str, bridge: &str, addr: &str, gw: &str) {
    ip(&[
        "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
        task_ns,
    ]);
    ip(&[
        "-n", node, "link", "set", host_if, "master", bridge, "mtu", "1450", "up",
    ]);
    ip(&[
        "-n",
        task_ns,
        "link",
        "set",
        "eth0",
        "address",
        &mac_of(addr),
        "mtu",
        "1450",
        "up",
    ]);
    ip(&[
        "-n",
        task_ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", task_ns, "route", "add", "default", "via", gw]);
}

/// Two node namespaces joined by a veth underlay.
fn add_underlay(n1: &str, n2: &str) {
    ip(&[
        "-n", n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", n2,
    ]);
    for (n, a) in [(n1, "198.18.0.1/24"), (n2, "198.18.0.2/24")] {
        ip(&["-n", n, "addr", "add", a, "dev", "ul0"]);
        ip(&["-n", n, "link", "set", "ul0", "up"]);
    }
}

fn node(name: &str, addr: [u8; 4]) -> Node {
    Node {
        name: name.into(),
        address: Ipv4Addr::from(addr),
    }
}

fn network(name: &str, vni: u32, third: u8) -> Network {
    Network {
        name: name.into(),
        subnet: format!("10.{third}.0.0/24").parse().expect("subnet"),
        vni,
        gateway: Ipv4Addr::new(10, third, 0, 1),
    }
}

fn task(id: &str, node: &str, network: &str, addr: &str) -> Task {
    Task {
        id: id.into(),
        service: "web".into(),
        slot: 1,
        node: node.into(),
        state: TaskState::Running,
        netns: None,
        resolv_conf: None,
        networks: vec![TaskNetwork {
            network: network.into(),
            address: addr.parse().expect("fixture address"),
        }],
    }
}

fn state(nodes: &[Node], networks: &[Network], tasks: &[Task]) -> State {
    let mut s = State::default();
    for n in nodes {
        s.nodes.insert(n.name.clone(), n.clone());
    }
    for n in networks {
        s.networks.insert(n.name.clone(), n.clone());
    }
    for t in tasks {
        s.tasks.insert(t.id.clone(), t.clone());
    }
    s
}

// ---------------------------------------------------------------------------------------
// One agent per node: an Overlay living on a thread inside the node's namespace
// ---------------------------------------------------------------------------------------

enum Cmd {
    /// State, node name, network → bridge *name* (resolved to an ifindex inside the node).
    Converge(
        State,
        String,
        BTreeMap<String, String>,
        mpsc::Sender<Result<OverlayReport, String>>,
    ),
    Observe(String, mpsc::Sender<Result<Observed, String>>),
    Teardown(mpsc::Sender<Vec<OverlayError>>),
}

struct NodeAgent {
    ns: String,
    tx: Option<tokio::sync::mpsc::UnboundedSender<Cmd>>,
    thread: Option<JoinHandle<()>>,
}

impl NodeAgent {
    fn start(ns: &str) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let path = ns_path(ns);
        let thread = std::thread::spawn(move || {
            let r = netns::run_in(&path, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let mut ov =
                        Overlay::open(OverlayConfig::default()).expect("overlay netlink socket");
                    let nl = Netlink::open().expect("netlink socket");
                    while let Some(cmd) = rx.recv().await {
                        match cmd {
                            Cmd::Converge(st, node, bridges, reply) => {
                                let mut idx = BTreeMap::new();
                                let mut missing = None;
                                for (net, br) in bridges {
                                    match nl.link(&br).await {
                                        Ok(Some(l)) => {
                                            idx.insert(net, l.index);
                                        }
                                        other => missing = Some(format!("bridge {br}: {other:?}")),
                                    }
                                }
                                let r = match missing {
                                    Some(m) => Err(m),
                                    None => Ok(ov.converge(&st, &node, &idx).await),
                                };
                                let _ = reply.send(r);
                            }
                            Cmd::Observe(net, reply) => {
                                let _ =
                                    reply.send(ov.observe(&net).await.map_err(|e| e.to_string()));
                            }
                            Cmd::Teardown(reply) => {
                                let _ = reply.send(ov.teardown().await);
                            }
                        }
                    }
                });
            });
            if let Err(e) = r {
                panic!("node agent thread: {e}");
            }
        });
        NodeAgent {
            ns: ns.to_string(),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&self, cmd: Cmd) {
        self.tx
            .as_ref()
            .expect("agent running")
            .send(cmd)
            .unwrap_or_else(|_| panic!("agent in {} is gone", self.ns));
    }

    fn converge(&self, st: &State, node: &str, bridges: &[(&str, &str)]) -> OverlayReport {
        let (tx, rx) = mpsc::channel();
        let bridges = bridges
            .iter()
            .map(|(n, b)| (n.to_string(), b.to_string()))
            .collect();
        self.send(Cmd::Converge(st.clone(), node.into(), bridges, tx));
        rx.recv_timeout(AGENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("converge in {}: no reply: {e}", self.ns))
            .unwrap_or_else(|e| panic!("converge in {}: {e}", self.ns))
    }

    fn observe(&self, network: &str) -> Observed {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Observe(network.into(), tx));
        rx.recv_timeout(AGENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("observe in {}: no reply: {e}", self.ns))
            .unwrap_or_else(|e| panic!("observe {network} in {}: {e}", self.ns))
    }

    fn teardown(&self) -> Vec<OverlayError> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Teardown(tx));
        rx.recv_timeout(AGENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("teardown in {}: no reply: {e}", self.ns))
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // Closing the channel ends the agent's loop; the thread then leaves the namespace.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn assert_clean(what: &str, r: &OverlayReport) {
    assert!(
        r.errors.is_empty(),
        "{what}: errors: {:?}",
        r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// Kernel views, through iproute2 (independent of the code under test)
// ---------------------------------------------------------------------------------------

/// The device's own FDB entries, `bridge fdb show dev D` lines marked `self` (the bridge's
/// entries for the port are `master`), as "MAC dst IP".
fn fdb_self(ns: &str, dev: &str) -> BTreeSet<String> {
    run_ok("bridge", &["-n", ns, "fdb", "show", "dev", dev])
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "self"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(l.contains("permanent"), "not permanent: {l}");
            let dst = w
                .iter()
                .position(|x| *x == "dst")
                .map(|i| w[i + 1])
                .unwrap_or("-");
            format!("{} dst {dst}", w[0])
        })
        .collect()
}

/// The device's IPv4 neighbours as "IP MAC STATE".
fn neigh(ns: &str, dev: &str) -> BTreeSet<String> {
    ip(&["-n", ns, "-4", "neigh", "show", "dev", dev])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let mac = w
                .iter()
                .position(|x| *x == "lladdr")
                .map(|i| w[i + 1])
                .unwrap_or("-");
            format!("{} {mac} {}", w[0], w.last().copied().unwrap_or(""))
        })
        .collect()
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

fn link_json(ns: &str, dev: &str) -> serde_json::Value {
    let out = ip(&["-n", ns, "-d", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j output {out:?}: {e}"));
    v.get(0)
        .cloned()
        .unwrap_or_else(|| panic!("{dev} not found in {ns}"))
}

fn rx_packets(ns: &str, dev: &str) -> u64 {
    let out = ip(&["-n", ns, "-s", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j output {out:?}: {e}"));
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx counter for {dev}: {v}"))
}

fn vxlan_devices(ns: &str) -> BTreeSet<String> {
    let out = ip(&["-n", ns, "-j", "link", "show", "type", "vxlan"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j output {out:?}: {e}"));
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Assert the device is exactly what the overlay promises.
fn assert_vxlan(ns: &str, dev: &str, vni: u64, local: &str, bridge: &str) {
    let l = link_json(ns, dev);
    let d = &l["linkinfo"]["info_data"];
    assert_eq!(l["linkinfo"]["info_kind"], "vxlan", "{dev}: {l}");
    assert_eq!(d["id"], vni, "{dev}: {d}");
    assert_eq!(d["local"], local, "{dev}: {d}");
    assert_eq!(d["port"], 4789, "{dev}: {d}");
    assert_eq!(d["learning"], false, "{dev}: {d}");
    assert_eq!(d["proxy"], true, "{dev}: {d}");
    assert_eq!(l["mtu"], 1450, "{dev}: {l}");
    assert_eq!(l["master"], bridge, "{dev}: {l}");
    assert!(
        l["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "{dev} is not up: {l}"
    );
}

// ---------------------------------------------------------------------------------------
// TCP across nodes
// ---------------------------------------------------------------------------------------

/// A listener bound inside `server_ns` (a socket belongs to the namespace it was created
/// in), a client connecting from `client_ns`: one request, one reply, every wait bounded.
/// Returns the client address the server saw.
fn tcp_round_trip(server_ns: &str, server_ip: &str, client_ns: &str) -> SocketAddr {
    let bind: SocketAddr = format!("{server_ip}:0").parse().expect("addr");
    let listener = netns::run_in(&ns_path(server_ns), move || TcpListener::bind(bind))
        .expect("enter server ns")
        .expect("bind in server ns");
    let addr = listener.local_addr().expect("listener addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let server = std::thread::spawn(move || -> Result<SocketAddr, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        if &buf != b"ping" {
            return Err(format!("got {buf:?}"));
        }
        s.write_all(b"pong").map_err(|e| format!("write: {e}"))?;
        Ok(peer)
    });
    let reply = netns::run_in(&ns_path(client_ns), move || -> Result<Vec<u8>, String> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        Ok(buf.to_vec())
    })
    .expect("enter client ns");
    let peer = server.join().expect("server thread").expect("server side");
    assert_eq!(reply.expect("client side"), b"pong");
    peer
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn two_nodes_reach_each_other_over_vxlan_and_converge_exactly() {
    let mut nss = Namespaces::new();
    let n1 = nss.add("n1");
    let n2 = nss.add("n2");
    let t1 = nss.add("t1"); // front, node1
    let t2 = nss.add("t2"); // front, node2
    let t3 = nss.add("t3"); // back, node1
    let t4 = nss.add("t4"); // back, node2
    add_underlay(&n1, &n2);
    for n in [&n1, &n2] {
        add_bridge(n, "mbr-4200", GW_A);
        add_bridge(n, "mbr-4201", GW_B);
    }
    add_task(&n1, &t1, "vt1", "mbr-4200", "10.210.0.11", GW_A);
    add_task(&n2, &t2, "vt2", "mbr-4200", "10.210.0.12", GW_A);
    add_task(&n1, &t3, "vt3", "mbr-4201", "10.211.0.13", GW_B);
    add_task(&n2, &t4, "vt4", "mbr-4201", "10.211.0.14", GW_B);

    let nodes = [
        node("node1", [198, 18, 0, 1]),
        node("node2", [198, 18, 0, 2]),
    ];
    let nets = [network("front", 4200, 210), network("back", 4201, 211)];
    let tasks = [
        task("t1", "node1", "front", "10.210.0.11"),
        task("t2", "node2", "front", "10.210.0.12"),
        task("t3", "node1", "back", "10.211.0.13"),
        task("t4", "node2", "back", "10.211.0.14"),
    ];
    let full = state(&nodes, &nets, &tasks);
    let bridges = [("front", "mbr-4200"), ("back", "mbr-4201")];

    let a1 = NodeAgent::start(&n1);
    let a2 = NodeAgent::start(&n2);

    // --- First converge: two devices per node, 1 zero + 1 task entry per network.
    for (a, name) in [(&a1, "node1"), (&a2, "node2")] {
        let r = a.converge(&full, name, &bridges);
        assert_clean(name, &r);
        assert_eq!(
            r.devices_created,
            vec!["mvx-4201".to_string(), "mvx-4200".to_string()],
            "{name}"
        );
        assert!(r.devices_removed.is_empty(), "{name}: {r:?}");
        assert_eq!(
            (r.fdb_added, r.neigh_added, r.fdb_removed, r.neigh_removed),
            (4, 2, 0, 0),
            "{name}"
        );
    }
    assert_vxlan(&n1, "mvx-4200", 4200, "198.18.0.1", "mbr-4200");
    assert_vxlan(&n1, "mvx-4201", 4201, "198.18.0.1", "mbr-4201");
    assert_vxlan(&n2, "mvx-4200", 4200, "198.18.0.2", "mbr-4200");
    assert_vxlan(&n2, "mvx-4201", 4201, "198.18.0.2", "mbr-4201");
    assert_eq!(
        fdb_self(&n1, "mvx-4200"),
        set(&[
            "00:00:00:00:00:00 dst 198.18.0.2".into(),
            "02:42:0a:d2:00:0c dst 198.18.0.2".into()
        ])
    );
    assert_eq!(
        neigh(&n1, "mvx-4200"),
        set(&["10.210.0.12 02:42:0a:d2:00:0c PERMANENT".into()])
    );
    assert_eq!(
        fdb_self(&n2, "mvx-4201"),
        set(&[
            "00:00:00:00:00:00 dst 198.18.0.1".into(),
            "02:42:0a:d3:00:0d dst 198.18.0.1".into()
        ])
    );
    assert_eq!(
        neigh(&n2, "mvx-4201"),
        set(&["10.211.0.13 02:42:0a:d3:00:0d PERMANENT".into()])
    );

    // --- Data path: ICMP and TCP across nodes, on both networks.
    assert!(
        ping(&t1, &[], "10.210.0.12"),
        "t1 (node1) cannot ping t2 (node2) over VNI 4200"
    );
    assert!(
        ping(&t4, &[], "10.211.0.13"),
        "t4 (node2) cannot ping t3 (node1) over VNI 4201"
    );
    let peer = tcp_round_trip(&t2, "10.210.0.12", &t1);
    assert_eq!(
        peer.ip(),
        "10.210.0.11".parse::<std::net::IpAddr>().expect("ip"),
        "no NAT on the overlay"
    );

    // MTU: 1422 bytes of ICMP payload + 28 = 1450 fit (the 1500-byte underlay carries the 50
    // bytes of encapsulation); one byte more does not leave the task.
    assert!(
        ping(&t1, &["-M", "do", "-s", "1422"], "10.210.0.12"),
        "a full 1450-byte packet did not cross"
    );
    assert!(
        !ping(&t1, &["-M", "do", "-s", "1423"], "10.210.0.12"),
        "a 1451-byte packet left a 1450 MTU task"
    );

    // --- ARP stays local. t1 learnt t2's MAC from node1's ARP proxy; t1's ARP requests for
    // its gateway (10.210.0.1, on every node's bridge) were answered by node1 only: node2's
    // stack never saw an ARP request from t1 (it would have created a neighbour for it).
    let t1_neigh = ip(&["-n", &t1, "-4", "neigh", "show", "dev", "eth0"]);
    assert!(
        t1_neigh.contains("10.210.0.12 lladdr 02:42:0a:d2:00:0c"),
        "t1 neighbours: {t1_neigh}"
    );
    let n2_bridge_neigh = ip(&["-n", &n2, "-4", "neigh", "show", "dev", "mbr-4200"]);
    assert!(
        !n2_bridge_neigh.contains("10.210.0.11"),
        "an ARP from node1's task reached node2: {n2_bridge_neigh}"
    );
    // With the gateway address on every node, a node's own stack cannot talk to a remote
    // task: the reply goes to the task's local gateway (same as Docker's overlays).
    assert!(
        !ping(&n1, &["-c", "1", "-W", "1", "-w", "2"], "10.210.0.12"),
        "node1's stack reached t2"
    );
    // ...while task-to-task still works afterwards.
    assert!(ping(&t2, &[], "10.210.0.11"));

    // --- Isolation: a frame for t4's MAC sent on VNI 4200 never reaches VNI 4201.
    ip(&["-n", &t1, "route", "add", "10.211.0.0/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &t1,
        "neigh",
        "replace",
        "10.211.0.14",
        "lladdr",
        &mac_of("10.211.0.14"),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let rx_before = rx_packets(&n2, "mvx-4200");
    assert!(
        !ping(&t1, &["-c", "2", "-W", "1", "-w", "3"], "10.211.0.14"),
        "front (4200) reached back (4201)"
    );
    // The frames did cross the underlay (flooded through the all-zeros entry), on VNI 4200.
    let rx_after = rx_packets(&n2, "mvx-4200");
    assert!(
        rx_after >= rx_before + 2,
        "node2's mvx-4200 received {} packets",
        rx_after - rx_before
    );
    ip(&["-n", &t1, "route", "del", "10.211.0.0/24", "dev", "eth0"]);

    // --- Converging again changes nothing: same instance, and a fresh one (agent restart).
    let before = (
        fdb_self(&n1, "mvx-4200"),
        neigh(&n1, "mvx-4200"),
        fdb_self(&n1, "mvx-4201"),
    );
    let obs_before = a1.observe("front");
    for (a, name) in [(&a1, "node1"), (&a2, "node2")] {
        let r = a.converge(&full, name, &bridges);
        assert_clean(name, &r);
        assert!(
            r.is_noop(),
            "second converge on {name} changed something: {r:?}"
        );
    }
    {
        let restarted = NodeAgent::start(&n1);
        let r = restarted.converge(&full, "node1", &bridges);
        assert_clean("restart", &r);
        assert!(
            r.is_noop(),
            "converge after a restart changed something: {r:?}"
        );
    }
    assert_eq!(
        before,
        (
            fdb_self(&n1, "mvx-4200"),
            neigh(&n1, "mvx-4200"),
            fdb_self(&n1, "mvx-4201")
        )
    );
    assert_eq!(obs_before, a1.observe("front"));
    assert_eq!((obs_before.fdb.len(), obs_before.neigh.len()), (2, 1));

    // --- t2 stops: exactly its FDB and neighbour entries go on node1, nothing else.
    let no_t2 = state(
        &nodes,
        &nets,
        &[tasks[0].clone(), tasks[2].clone(), tasks[3].clone()],
    );
    let back_before = (fdb_self(&n1, "mvx-4201"), neigh(&n1, "mvx-4201"));
    let r = a1.converge(&no_t2, "node1", &bridges);
    assert_clean("t2 removed", &r);
    assert_eq!(
        (r.fdb_added, r.neigh_added, r.fdb_removed, r.neigh_removed),
        (0, 0, 1, 1),
        "{r:?}"
    );
    assert_eq!(
        fdb_self(&n1, "mvx-4200"),
        set(&["00:00:00:00:00:00 dst 198.18.0.2".into()])
    );
    assert!(neigh(&n1, "mvx-4200").is_empty());
    assert_eq!(
        back_before,
        (fdb_self(&n1, "mvx-4201"), neigh(&n1, "mvx-4201"))
    );
    // (Were t2 still there, t1 would still reach it while its ARP cache holds t2's MAC: an
    // unknown unicast MAC is flooded to every node through the all-zeros entries.)
    // t2 back: its entries come back and traffic flows again.
    let r = a1.converge(&full, "node1", &bridges);
    assert_clean("t2 back", &r);
    assert_eq!(
        (r.fdb_added, r.neigh_added, r.fdb_removed, r.neigh_removed),
        (1, 1, 0, 0),
        "{r:?}"
    );
    assert!(ping(&t1, &[], "10.210.0.12"));

    // --- node2 leaves (with its tasks): its all-zeros entries go, with t2's and t4's entries.
    let only_node1 = state(&nodes[..1], &nets, &[tasks[0].clone(), tasks[2].clone()]);
    let r = a1.converge(&only_node1, "node1", &bridges);
    assert_clean("node2 removed", &r);
    assert_eq!(
        (r.fdb_added, r.neigh_added, r.fdb_removed, r.neigh_removed),
        (0, 0, 4, 2),
        "{r:?}"
    );
    assert!(
        fdb_self(&n1, "mvx-4200").is_empty(),
        "{:?}",
        fdb_self(&n1, "mvx-4200")
    );
    assert!(fdb_self(&n1, "mvx-4201").is_empty());
    assert!(!ping(
        &t1,
        &["-c", "1", "-W", "1", "-w", "2"],
        "10.210.0.12"
    ));

    // --- A network no longer overlaid on node1: its device goes, the other stays.
    let r = a1.converge(&only_node1, "node1", &[("front", "mbr-4200")]);
    assert_clean("back removed", &r);
    assert_eq!(r.devices_removed, vec!["mvx-4201".to_string()]);
    assert_eq!(vxlan_devices(&n1), set(&["mvx-4200".into()]));
    assert!(
        ip(&["-n", &n1, "-j", "link", "show", "dev", "mbr-4201"]).contains("mbr-4201"),
        "the bridge is not ours to remove"
    );

    // --- Teardown removes every VXLAN device and nothing else.
    for (a, n) in [(&a1, &n1), (&a2, &n2)] {
        let errs = a.teardown();
        assert!(
            errs.is_empty(),
            "teardown in {n}: {:?}",
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        assert!(
            vxlan_devices(n).is_empty(),
            "left in {n}: {:?}",
            vxlan_devices(n)
        );
        assert!(ip(&["-n", n, "link", "show", "dev", "mbr-4200"]).contains("mbr-4200"));
    }
    drop(a1);
    drop(a2);
}

#[test]
fn restart_adopts_repairs_and_leaves_foreign_devices_alone() {
    let mut nss = Namespaces::new();
    let n1 = nss.add("n1");
    // node1 alone: the remote VTEPs need not answer to check the programming.
    ip(&[
        "-n", &n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    ip(&["-n", &n1, "link", "set", "ul1", "up"]);
    ip(&["-n", &n1, "addr", "add", "198.18.0.1/24", "dev", "ul0"]);
    ip(&["-n", &n1, "link", "set", "ul0", "up"]);
    add_bridge(&n1, "mbr-4200", GW_A);
    add_bridge(&n1, "mbr-4201", GW_B);

    // Left by "someone": our device name with the wrong settings (learning on, no proxy); a
    // stray mesh device of a network that no longer exists; a non-VXLAN link squatting the
    // name of the second network's device; a foreign VXLAN device with its own FDB entry.
    ip(&[
        "-n",
        &n1,
        "link",
        "add",
        "mvx-4200",
        "type",
        "vxlan",
        "id",
        "4200",
        "dstport",
        "4789",
        "local",
        "198.18.0.1",
    ]);
    ip(&[
        "-n",
        &n1,
        "link",
        "add",
        "mvx-4999",
        "type",
        "vxlan",
        "id",
        "4999",
        "dstport",
        "4789",
        "local",
        "198.18.0.1",
    ]);
    ip(&["-n", &n1, "link", "add", "mvx-4201", "type", "bridge"]);
    ip(&[
        "-n",
        &n1,
        "link",
        "add",
        "vx-other",
        "type",
        "vxlan",
        "id",
        "9999",
        "dstport",
        "4789",
        "local",
        "198.18.0.1",
    ]);
    run_ok(
        "bridge",
        &[
            "-n",
            &n1,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx-other",
            "dst",
            "198.18.0.77",
            "self",
            "permanent",
        ],
    );

    let nodes = [
        node("node1", [198, 18, 0, 1]),
        node("node2", [198, 18, 0, 2]),
        node("node3", [198, 18, 0, 3]),
    ];
    let nets = [network("front", 4200, 210), network("back", 4201, 211)];
    let tasks = [
        task("w2", "node2", "front", "10.210.0.12"),
        task("w3", "node3", "front", "10.210.0.13"),
    ];
    let st = state(&nodes, &nets, &tasks);
    let bridges = [("front", "mbr-4200"), ("back", "mbr-4201")];

    let a = NodeAgent::start(&n1);
    let r = a.converge(&st, "node1", &bridges);
    // The squatter is reported, by network and device, and left alone; the rest converges.
    assert_eq!(
        r.errors.len(),
        1,
        "{:?}",
        r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    let e = r.errors[0].to_string();
    assert!(
        e.contains("back") && e.contains("mvx-4201") && e.contains("not a VXLAN"),
        "{e}"
    );
    assert_eq!(
        link_json(&n1, "mvx-4201")["linkinfo"]["info_kind"],
        "bridge"
    );
    let removed: BTreeSet<String> = r.devices_removed.iter().cloned().collect();
    assert_eq!(
        removed,
        set(&["mvx-4200".into(), "mvx-4999".into()]),
        "re-created and stray devices"
    );
    assert_eq!(r.devices_created, vec!["mvx-4200".to_string()]);
    assert_vxlan(&n1, "mvx-4200", 4200, "198.18.0.1", "mbr-4200");
    assert_eq!(
        vxlan_devices(&n1),
        set(&["mvx-4200".into(), "vx-other".into()])
    );
    let want_fdb = set(&[
        "00:00:00:00:00:00 dst 198.18.0.2".into(),
        "00:00:00:00:00:00 dst 198.18.0.3".into(),
        "02:42:0a:d2:00:0c dst 198.18.0.2".into(),
        "02:42:0a:d2:00:0d dst 198.18.0.3".into(),
    ]);
    assert_eq!(fdb_self(&n1, "mvx-4200"), want_fdb);

    // Detached from its bridge by hand: re-attached, entries untouched.
    ip(&["-n", &n1, "link", "set", "mvx-4200", "nomaster"]);
    let r = a.converge(&st, "node1", &bridges);
    assert_eq!(r.devices_updated, vec!["mvx-4200".to_string()]);
    assert_eq!(
        (r.fdb_added, r.fdb_removed, r.neigh_added, r.neigh_removed),
        (0, 0, 0, 0)
    );
    assert_vxlan(&n1, "mvx-4200", 4200, "198.18.0.1", "mbr-4200");

    // Entries someone added on *our* device are removed; a stale neighbour is rewritten.
    run_ok(
        "bridge",
        &[
            "-n",
            &n1,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "mvx-4200",
            "dst",
            "198.18.0.9",
            "self",
            "permanent",
        ],
    );
    ip(&[
        "-n",
        &n1,
        "neigh",
        "add",
        "10.210.0.99",
        "lladdr",
        "02:00:00:00:00:63",
        "dev",
        "mvx-4200",
        "nud",
        "permanent",
    ]);
    ip(&[
        "-n",
        &n1,
        "neigh",
        "replace",
        "10.210.0.12",
        "lladdr",
        "02:00:00:00:00:0c",
        "dev",
        "mvx-4200",
        "nud",
        "stale",
    ]);
    let r = a.converge(&st, "node1", &bridges);
    assert_eq!(
        (r.fdb_added, r.fdb_removed, r.neigh_added, r.neigh_removed),
        (0, 1, 1, 1),
        "{r:?}"
    );
    assert_eq!(fdb_self(&n1, "mvx-4200"), want_fdb);
    assert_eq!(
        neigh(&n1, "mvx-4200"),
        set(&[
            "10.210.0.12 02:42:0a:d2:00:0c PERMANENT".into(),
            "10.210.0.13 02:42:0a:d2:00:0d PERMANENT".into()
        ])
    );

    // A task moving to another node is one FDB replace (no remove + add), neighbours unchanged.
    let mut moved = st.clone();
    moved.tasks.get_mut("w2").expect("w2").node = "node3".into();
    let r = a.converge(&moved, "node1", &bridges);
    assert_eq!(
        (r.fdb_added, r.fdb_removed, r.neigh_added, r.neigh_removed),
        (1, 0, 0, 0),
        "{r:?}"
    );
    assert!(fdb_self(&n1, "mvx-4200").contains("02:42:0a:d2:00:0c dst 198.18.0.3"));
    assert!(!fdb_self(&n1, "mvx-4200").contains("02:42:0a:d2:00:0c dst 198.18.0.2"));
    assert_eq!(fdb_self(&n1, "mvx-4200").len(), 4);

    // The foreign device and its entry were never touched; teardown leaves them too.
    assert_eq!(
        fdb_self(&n1, "vx-other"),
        set(&["00:00:00:00:00:00 dst 198.18.0.77".into()])
    );
    let errs = a.teardown();
    assert!(
        errs.is_empty(),
        "{:?}",
        errs.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(vxlan_devices(&n1), set(&["vx-other".into()]));
    assert_eq!(
        fdb_self(&n1, "vx-other"),
        set(&["00:00:00:00:00:00 dst 198.18.0.77".into()])
    );
    assert_eq!(
        link_json(&n1, "mvx-4201")["linkinfo"]["info_kind"],
        "bridge"
    );
}
