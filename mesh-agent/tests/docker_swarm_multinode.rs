//! mesh under a real multi-node Docker Swarm (issue 5): three private dockerd (Debian's
//! docker.io 20.10), each in its own network namespace and UTS namespace (node name), on one
//! bridge in 198.18.0.0/24, joined with `docker swarm join`; a service with 6 replicas spread
//! over the three nodes publishes port 8080. This kernel has no IPVS, so Swarm's routing mesh
//! is dead; with one mesh-agent per node, a client outside the nodes reaches, on each node's
//! address, the tasks of every node in turn (the node's `ingress_sbox` → Docker's ingress
//! overlay → the task's node).
//!
//! Only managers serve `/nodes`, `/services`, `/tasks`, and only a node's own daemon knows its
//! tasks' sandboxes (`/containers/{id}/json`): the agents of the workers run with
//! `--docker-host` their own daemon (node id, sandboxes, container events) and
//! `--docker-manager` the manager's (here its unix socket, over TCP+TLS on real machines), and
//! need neither `--node` nor `--docker-ingress-sbox`. A VIP (`wget http://web`) from a task
//! of the manager's node and from one of a worker's reaches the tasks of every node.

#[path = "common/agent_proc.rs"]
mod agent_proc;
#[path = "common/dockerd.rs"]
mod dockerd;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agent_proc::AgentProc;
use dockerd::Dockerd;

const IMAGE: &str = "mesh-busybox:test";
const NODES: usize = 3;
const REPLICAS: usize = 6;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, i as u8 + 1)
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The namespaces: a hub with a bridge, one per node, one for the client. Deleted on drop
/// (after the daemons, which are declared later).
struct Bed {
    hub: String,
    nodes: Vec<String>,
    client: String,
}

impl Bed {
    fn new() -> Bed {
        let p = std::process::id();
        let bed = Bed {
            hub: format!("meshmn-{p}-hub"),
            nodes: (1..=NODES).map(|i| format!("meshmn-{p}-{i}")).collect(),
            client: format!("meshmn-{p}-c"),
        };
        ip(&["netns", "add", &bed.hub]);
        ip(&["-n", &bed.hub, "link", "set", "lo", "up"]);
        ip(&["-n", &bed.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bed.hub, "link", "set", "br0", "up"]);
        let all: Vec<(String, Ipv4Addr)> = bed
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), node_addr(i)))
            .chain([(bed.client.clone(), CLIENT)])
            .collect();
        for (k, (ns, addr)) in all.iter().enumerate() {
            let port = format!("p{k}");
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &bed.hub,
            ]);
            ip(&["-n", &bed.hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        // A veth hands over CHECKSUM_PARTIAL packets; a NIC would have filled checksums in.
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &bed.client,
                "ethtool",
                "-K",
                "eth0",
                "tx",
                "off",
            ])
            .output()
            .expect("ethtool");
        assert!(
            o.status.success(),
            "ethtool: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        bed
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.client, &self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The daemons, workers dropped (left, stopped, cleaned) before the manager.
struct Cluster(Vec<Dockerd>);

impl Drop for Cluster {
    fn drop(&mut self) {
        while let Some(d) = self.0.pop() {
            drop(d);
        }
    }
}

fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .output()
        .expect("ip netns exec")
}

fn curl(ns: &str, url: &str) -> Option<String> {
    let o = in_ns(ns, "curl", &["-s", "--max-time", "5", url]);
    (o.status.success() && !o.stdout.is_empty())
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn eventually<T>(why: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {why}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Hostnames (container ids) of the tasks of `web` running on this node.
fn task_hosts(d: &Dockerd) -> BTreeSet<String> {
    let out = d.docker_ok(&[
        "ps",
        "-q",
        "--filter",
        "label=com.docker.swarm.service.name=web",
    ]);
    out.lines()
        .map(|l| l.trim().chars().take(12).collect())
        .filter(|s: &String| !s.is_empty())
        .collect()
}

#[test]
fn published_port_of_every_node_reaches_tasks_of_every_node() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root");
        return;
    }
    let bed = Bed::new();
    let mut cluster = Cluster(Vec::new());
    for (i, ns) in bed.nodes.iter().enumerate() {
        match Dockerd::start_in(ns, &format!("meshmn-node{}", i + 1), &[]) {
            Ok(d) => cluster.0.push(d),
            // Only when dockerd cannot start here; CI installs docker.io so that it does.
            Err(why) if i == 0 => {
                eprintln!("SKIPPED: dockerd cannot start: {why}");
                return;
            }
            Err(why) => panic!(
                "dockerd of node {} cannot start (the first one did): {why}",
                i + 1
            ),
        }
    }
    let token = cluster.0[0].swarm_init_on(node_addr(0));
    for (i, d) in cluster.0.iter_mut().enumerate().skip(1) {
        d.swarm_join(&token, node_addr(0), node_addr(i));
    }
    let nodes = &cluster.0;
    let manager = &nodes[0];
    let names: BTreeSet<String> = (1..=NODES).map(|i| format!("meshmn-node{i}")).collect();
    eventually("every node ready", Duration::from_secs(60), || {
        let out = manager.docker_ok(&["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]);
        let ready: BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_suffix(" Ready"))
            .map(String::from)
            .collect();
        (ready == names).then_some(())
    });
    // No registry: every node imports the image itself.
    for d in nodes {
        d.import_busybox(IMAGE);
    }
    manager.web_service(IMAGE, REPLICAS, &["-d"], Duration::from_secs(120));
    let per_node: Vec<BTreeSet<String>> = nodes.iter().map(task_hosts).collect();
    assert!(
        per_node.iter().all(|h| !h.is_empty()),
        "tasks on every node: {per_node:?}"
    );
    let all: BTreeSet<String> = per_node.iter().flatten().cloned().collect();
    assert_eq!(all.len(), REPLICAS, "{per_node:?}");

    // Without mesh the routing mesh is dead here (no IPVS): no node answers.
    for i in 0..NODES {
        assert!(
            curl(&bed.client, &format!("http://{}:8080/", node_addr(i))).is_none(),
            "Swarm alone cannot forward on this kernel"
        );
    }

    // One agent per node, in its namespace. Workers: their own daemon and the manager's
    // (--docker-manager). Both hooks: XDP (the default) on nodes 1 and 3, TC on node 2.
    // With XDP, an external client's SYN is redirected into the sandbox's gateway veth,
    // which drops XDP-redirected frames unless its peer has GRO on: Docker leaves it off, the
    // agent turns it on (and back off when it cleans up).
    let tmp = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut offloads_before = Vec::new();
    for (i, d) in nodes.iter().enumerate() {
        let sbox = d.exec_root().join("netns/ingress_sbox");
        eventually(
            "the node's ingress sandbox",
            Duration::from_secs(30),
            || sbox.exists().then_some(()),
        );
        offloads_before.push(sandbox_gro(&sbox));
        let log = tmp.path().join(format!("agent{i}.log"));
        let pins = PathBuf::from(format!("/sys/fs/bpf/meshmn-{}-{i}", std::process::id()));
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
        cmd.args([
            "run",
            "--runtime",
            "docker",
            "--no-dns",
            "--metrics-addr",
            "none",
            "--resync-ms",
            "500",
        ])
        .args([
            "--hook",
            if i == 1 { "tc" } else { "xdp" },
            "--iface",
            "eth0",
        ])
        .arg("--docker-host")
        .arg(&d.socket)
        .arg("--netns")
        .arg(format!("/run/netns/{}", d.netns))
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--run-dir")
        .arg(tmp.path().join(format!("run{i}")));
        if i > 0 {
            cmd.arg("--docker-manager").arg(&manager.socket);
        }
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("start mesh-agent");
        agents.push(AgentProc {
            child: Some(child),
            log,
            pins,
        });
    }
    for (i, a) in agents.iter().enumerate() {
        eventually(
            &format!("agent {} ready", i + 1),
            Duration::from_secs(60),
            || a.log().contains("agent ready").then_some(()),
        );
        let want = format!("\"meshmn-node{}\"", i + 1);
        assert!(
            a.log()
                .lines()
                .any(|l| l.contains("agent ready") && l.contains(&want)),
            "agent {} on its node:\n{}",
            i + 1,
            a.log()
        );
    }
    let logs = || {
        agents
            .iter()
            .map(AgentProc::log)
            .collect::<Vec<_>>()
            .join("\n-----\n")
    };

    // Each node's published port, from the client: every task of every node, evenly.
    for i in 0..NODES {
        let url = format!("http://{}:8080/", node_addr(i));
        let first = (0..60).find_map(|_| {
            let r = curl(&bed.client, &url);
            if r.is_none() {
                std::thread::sleep(Duration::from_millis(500));
            }
            r
        });
        assert!(
            first.is_some(),
            "node {}'s published port never answered\n{}",
            i + 1,
            logs()
        );
        let answers: Vec<String> = (0..REPLICAS * 5)
            .map(|_| curl(&bed.client, &url).unwrap_or_default())
            .collect();
        let mut t = BTreeMap::new();
        for a in &answers {
            *t.entry(a.clone()).or_insert(0usize) += 1;
        }
        assert_eq!(
            t.keys().cloned().collect::<BTreeSet<_>>(),
            all,
            "node {}: {t:?}\n{}",
            i + 1,
            logs()
        );
        assert!(t.values().all(|&n| n == 5), "node {}: 5 each: {t:?}", i + 1);
    }

    // A VIP from a task of the manager's node and from one of a worker's node (whose
    // sandboxes its own daemon gives): `wget http://web` reaches the tasks of every node over
    // the overlay.
    for (i, what) in [(0, "a manager's task"), (1, "a worker's task")] {
        let d = &nodes[i];
        let ctr = per_node[i].iter().next().unwrap().clone();
        let seen: BTreeSet<String> = eventually_seen(&all, Duration::from_secs(30), || {
            // busybox 1.35's wget segfaults with -T: bound it with busybox's timeout instead.
            let o = d.docker(&[
                "exec",
                &ctr,
                "busybox",
                "timeout",
                "5",
                "wget",
                "-q",
                "-O",
                "-",
                "http://web/",
            ]);
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        });
        assert_eq!(
            seen,
            all,
            "`wget http://web` in {what} (node {}): every task of every node\n{}",
            i + 1,
            logs()
        );
    }

    for (i, a) in agents.iter_mut().enumerate() {
        assert!(a.stop(), "agent {} exits cleanly:\n{}", i + 1, a.log());
        assert!(!a.pins.exists(), "pins removed");
    }
    for (i, d) in nodes.iter().enumerate() {
        let sbox = d.exec_root().join("netns/ingress_sbox");
        assert_eq!(
            sandbox_gro(&sbox),
            offloads_before[i],
            "node {}: the ingress sandbox's GRO as Docker left it",
            i + 1
        );
    }
}

/// Answers of `get` until every one of `want` was seen, at least `want.len() * 3` tries
/// and then until `timeout` (the worker's agent may still be attaching its tasks).
fn eventually_seen(
    want: &BTreeSet<String>,
    timeout: Duration,
    mut get: impl FnMut() -> Option<String>,
) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = BTreeSet::new();
    let mut tries = 0;
    loop {
        if let Some(a) = get() {
            seen.insert(a);
        }
        tries += 1;
        if tries >= want.len() * 3 && (seen == *want || Instant::now() > deadline) {
            break;
        }
    }
    seen
}

/// `interface: generic-receive-offload` of every interface in the sandbox (ethtool, entered
/// with nsenter: the sandbox is a bind-mounted netns, not a named one).
fn sandbox_gro(sbox: &Path) -> Vec<String> {
    let net = format!("--net={}", sbox.display());
    let links = Command::new("nsenter")
        .args([&net, "ip", "-o", "link"])
        .output()
        .expect("nsenter ip link");
    let mut out = Vec::new();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        let name = l
            .split(": ")
            .nth(1)
            .unwrap_or("")
            .split('@')
            .next()
            .unwrap_or("")
            .to_string();
        if name.is_empty() || name == "lo" {
            continue;
        }
        let k = Command::new("nsenter")
            .args([&net, "ethtool", "-k", &name])
            .output()
            .expect("nsenter ethtool");
        let gro = String::from_utf8_lossy(&k.stdout)
            .lines()
            .find(|l| l.starts_with("generic-receive-offload:"))
            .unwrap_or("?")
            .to_string();
        out.push(format!("{name}: {gro}"));
    }
    assert!(!out.is_empty(), "no interfaces in {}", sbox.display());
    out
}
