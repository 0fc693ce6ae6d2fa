//! 2b. End to end across nodes: the published port of one node, the service's tasks on two
//! other nodes, reached over the VXLAN overlay.
//!
//! The 3-node cluster bed of the integration tests (tests/src/cluster.rs): node namespaces
//! n1 (A, 198.18.0.1), n2 (B), n3 (C) and a client (198.18.0.100) on one underlay bridge,
//! TX checksum offload off on every underlay port. Service `web` (published 8080 → 80, network
//! `webnet` 10.240.0.0/24, VNI 4240) has 3 tasks, none on A: web.1 and web.3 on B, web.2 on
//! C, each a namespace running nginx (one worker, `return 200 "<task name>\n"`, pinned to
//! CPU 1; wrk and curl run on CPU 0).
//!
//! The client's source for each run is a fresh address of 198.19.0.0/24 (no TIME_WAIT or PAWS
//! carry-over between runs), routed through A in both directions: B and C route 198.19.0.0/24
//! via A, so a reply crosses A in every mode, as the replies of mesh's SNATed flows do.
//!
//! Modes, alternated in every round:
//! - `direct`: the client talks to web.1 (on B) at its overlay address, routed by A's kernel
//!   onto the overlay (A's bridge → VXLAN → B's bridge → the task); the reply goes back over
//!   the underlay through A's kernel forwarding. No load balancer: the ceiling, same hops as
//!   the balanced modes.
//! - `iptables`: kube-proxy style on A: DNAT to the 3 remote tasks (`-m statistic --mode nth`)
//!   and the masquerade mark, SNAT to A's underlay address (`--random-fully`, as kube-proxy's
//!   MASQUERADE; MASQUERADE itself would pick the address of the overlay bridge, the gateway
//!   every node holds, and the replies would never leave B).
//! - `mesh-xdp`, `mesh-tc`: a real `mesh-agent --reach cluster` on every node (`--hook xdp|tc`,
//!   no DNS, no socket LB; the cluster bed's `--resync-ms 300`), which makes the bridges, veths
//!   and VXLAN devices itself.
//!
//! In the baseline modes the benchmark lays out the overlay as the agent does (bridge
//! `mbr-<vni>` holding the gateway, `mvx-<vni>` VXLAN device without learning, with ARP proxy,
//! static FDB and neighbour entries, task veths with Docker-style MACs, MTU 1450, GRO on in
//! the task); it removes it before the agents start. After a mode: A's conntrack flushed, the
//! tasks' TIME_WAIT sockets destroyed (see [`Bed::cleanup`]).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_agent::attach::{DEFAULT_MTU, task_mac};
use mesh_tests::{
    Netns, agent_bin,
    cluster::{Cluster, NetDef, SvcDef},
};
use serde_json::{Value, json};

use crate::{
    Ctx,
    e2e::{clean, f, of, per_round},
    util::{
        self, Section, Stat, fmt_num, fmt_signed, md_table, must, run_bounded, stat, undisturbed,
    },
};

const SEC: &str = "2b. End to end across nodes";
const SECOND: Duration = Duration::from_secs(1);
const NET: &str = "webnet";
const OCTET: u8 = 240;
const VNI: u32 = 4240;
/// Node index of each task (slot = position + 1): web.1 and web.3 on B, web.2 on C.
const TASK_NODES: [usize; 3] = [1, 2, 1];
const NODE_A: &str = "198.18.0.1";
const CLIENT: &str = "198.18.0.100";
const SRC_NET: &str = "198.19.0.0/24";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Iptables,
    MeshXdp,
    MeshTc,
}

const MODES: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::MeshXdp, Mode::MeshTc];

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::MeshXdp => "mesh-xdp",
            Mode::MeshTc => "mesh-tc",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Mode::Direct => "direct (client → web.1 on B, routed through A, no LB)",
            Mode::Iptables => "iptables on A (DNAT statistic nth + SNAT to A)",
            Mode::MeshXdp => "mesh, --hook xdp",
            Mode::MeshTc => "mesh, --hook tc",
        }
    }

    fn hook(self) -> Option<&'static str> {
        match self {
            Mode::MeshXdp => Some("xdp"),
            Mode::MeshTc => Some("tc"),
            _ => None,
        }
    }
}

/// A task of `web`, as the benchmark sees it.
struct Task {
    addr: Ipv4Addr,
    /// `web.1@n2`, for the report.
    label: String,
    /// What its nginx answers (the cluster's task name).
    name: String,
    /// Index of its node.
    node: usize,
}

/// The cluster bed with nginx tasks, the baseline overlay's state and the client's sources.
struct Bed {
    c: Cluster,
    tasks: Vec<Task>,
    overlay: bool,
    src_seq: u32,
    src_cur: Option<String>,
    dir: tempfile::TempDir,
}

fn gateway() -> Ipv4Addr {
    Ipv4Addr::new(10, OCTET, 0, 1)
}

fn mac(a: Ipv4Addr) -> String {
    task_mac(a)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Bed {
    fn new(ctx: &Ctx) -> Bed {
        let nets = vec![NetDef {
            name: NET.into(),
            octet: OCTET,
            vni: VNI,
        }];
        let svcs = vec![SvcDef {
            name: "web".into(),
            dnsrr: false,
            networks: vec![NET.into()],
            ports: vec![(8080, 80, "tcp")],
            aliases: vec![],
        }];
        let mut c = Cluster::new(3, nets, svcs);
        util::track_netns(&c.underlay.name);
        util::track_netns(&c.client.name);
        for n in &c.nodes {
            util::track_netns(&n.ns.name);
            util::track_pins(&n.pin_dir);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tasks = Vec::new();
        for (i, node) in TASK_NODES.iter().enumerate() {
            let tdir = dir.path().join(format!("task{}", i + 1));
            std::fs::create_dir_all(&tdir).unwrap();
            let id = c.add_task_with("web", i as u32 + 1, *node, |ns, name| {
                util::track_netns(&ns.name);
                let mut args = vec!["-c".to_string(), "1".into(), "nginx".into()];
                args.extend(util::nginx_args(&tdir, name));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ns.spawn("taskset", &args)
            });
            let t = &c.tasks[&id];
            tasks.push(Task {
                addr: t.addrs[0].1,
                label: format!("web.{}@{}", t.slot, c.nodes[*node].name),
                name: t.name(),
                node: *node,
            });
        }
        // Client sources of 198.19.0.0/24 are routed through A, by every node.
        c.client.exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
        );
        for (i, n) in c.nodes.iter().enumerate() {
            let via = if i == 0 { CLIENT } else { NODE_A };
            n.ns.ip(&["route", "add", SRC_NET, "via", via, "dev", "ul0"]);
            // Forwarding on; no reverse-path filter: in `direct` and `iptables` the replies of
            // the overlay's addresses come back over the underlay, not the overlay bridge.
            for (k, v) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.ul0.rp_filter", "0"),
            ] {
                n.ns.exec("sysctl", &["-qw", &format!("{k}={v}")]);
            }
        }
        c.write_state();
        util::log(
            ctx.start,
            format!(
                "e2e-remote: bed ready (nodes {}, client {}; tasks {})",
                c.nodes
                    .iter()
                    .map(|n| n.ns.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                c.client.name,
                tasks
                    .iter()
                    .map(|t| format!("{} {}", t.label, t.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        Bed {
            c,
            tasks,
            overlay: false,
            src_seq: 2,
            src_cur: None,
            dir,
        }
    }

    fn client_ns(&self) -> &str {
        &self.c.client.name
    }

    /// The baseline modes' overlay, laid out as the agent lays out its own (one `ip -batch`
    /// and one `bridge -batch` per node, one `ip -batch` per task).
    fn overlay_up(&mut self) {
        if self.overlay {
            return;
        }
        self.overlay = true;
        let (br, vx, mtu, gw) = (
            format!("mbr-{VNI}"),
            format!("mvx-{VNI}"),
            DEFAULT_MTU,
            gateway(),
        );
        let batch = |name: &str, text: String| {
            let f = self.dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            f.to_str().unwrap().to_string()
        };
        for (i, n) in self.c.nodes.iter().enumerate() {
            let mut ip = format!(
                "link add {br} address {} mtu {mtu} type bridge\n\
                 link set {br} up\n\
                 addr add {gw}/24 dev {br}\n\
                 link add {vx} mtu {mtu} type vxlan id {VNI} local {} dstport 4789 nolearning proxy\n\
                 link set {vx} master {br} up\n",
                mac(gw),
                n.addr
            );
            let mut fdb = String::new();
            for m in self.c.nodes.iter().filter(|m| m.name != n.name) {
                fdb.push_str(&format!(
                    "fdb append 00:00:00:00:00:00 dev {vx} dst {} self permanent\n",
                    m.addr
                ));
            }
            let mut inside = Vec::new();
            for (k, t) in self.tasks.iter().enumerate() {
                let m = mac(t.addr);
                if t.node != i {
                    let dst = self.c.nodes[t.node].addr;
                    fdb.push_str(&format!("fdb add {m} dev {vx} dst {dst} self permanent\n"));
                    ip.push_str(&format!(
                        "neigh add {} lladdr {m} dev {vx} nud permanent\n",
                        t.addr
                    ));
                    continue;
                }
                let tns = &self
                    .c
                    .tasks
                    .values()
                    .find(|x| x.addrs[0].1 == t.addr)
                    .expect("task")
                    .ns;
                ip.push_str(&format!(
                    "link add mvb{k} mtu {mtu} type veth peer name eth0 address {m} mtu {mtu} netns {}\n\
                     link set mvb{k} master {br} up\n",
                    tns.name
                ));
                inside.push((tns, t.addr));
            }
            n.ns.ip(&["-batch", &batch("up-ip.batch", ip)]);
            n.ns.exec("bridge", &["-batch", &batch("up-fdb.batch", fdb)]);
            for (tns, addr) in inside {
                tns.ip(&[
                    "-batch",
                    &batch(
                        "up-task.batch",
                        format!(
                            "addr add {addr}/24 dev eth0\nlink set eth0 up\nroute add default via {gw}\n"
                        ),
                    ),
                ]);
                tns.exec("ethtool", &["-K", "eth0", "gro", "on"]);
            }
        }
    }

    /// Remove every overlay interface (the baseline's, or what an agent left): bridges, VXLAN
    /// devices and task veths.
    fn overlay_down(&mut self) {
        self.cleanup(true, false, false);
    }

    /// Node `ns`: delete the host veths (the agent's `mv<hash>`, the baseline's `mvb<k>`;
    /// their task ends go with them), VXLAN devices and bridges, in one `ip -batch`.
    fn node_links_down(ns: &Netns, batch: &Path) {
        let del: String = ns
            .links()
            .iter()
            .filter(|l| l.starts_with("mv") || l.starts_with("mbr-"))
            .map(|l| format!("link del {l}\n"))
            .collect();
        if !del.is_empty() {
            std::fs::write(batch, del).unwrap();
            let _ = ns.run("ip", &["-force", "-batch", batch.to_str().unwrap()]);
        }
    }

    /// Everything a mode may leave, each namespace on its own thread: overlay interfaces
    /// (`links`), A's NAT table and conntrack (`nat`), the tasks' TIME_WAIT sockets (`tw`).
    fn cleanup(&mut self, links: bool, nat: bool, tw: bool) {
        let dir = self.dir.path();
        std::thread::scope(|s| {
            for (i, n) in self.c.nodes.iter().enumerate() {
                s.spawn(move || {
                    if links {
                        Self::node_links_down(&n.ns, &dir.join(format!("del{i}.batch")));
                    }
                    if nat && i == 0 {
                        let a = Some(n.ns.name.as_str());
                        let _ =
                            run_bounded(a, "nft", &["delete", "table", "ip", "nat"], 5 * SECOND);
                        // Only A has NAT rules (iptables mode), so only A tracks connections.
                        let _ = run_bounded(a, "conntrack", &["-F"], 5 * SECOND);
                    }
                });
            }
        });
        std::thread::scope(|s| {
            for t in self.c.tasks.values() {
                s.spawn(move || {
                    if links {
                        for l in t.ns.links().into_iter().filter(|l| l != "lo") {
                            let _ = t.ns.run("ip", &["link", "del", &l]);
                        }
                    }
                    // The SNATed modes reach a task from A's address, so the tuples it sees
                    // repeat across modes: a SYN meeting a TIME_WAIT socket left by the previous
                    // mode (about half of them, by sequence number and timestamp) is answered
                    // with a bare ACK, reset and sent again: a SYN retransmit. (Within a mode
                    // neither iptables, whose conntrack keeps closed flows 120 s, nor mesh, whose
                    // conntrack keeps them until evicted, reuses a tuple.)
                    if tw {
                        let _ = run_bounded(
                            Some(&t.ns.name),
                            "ss",
                            &["-K", "-t", "state", "time-wait"],
                            5 * SECOND,
                        );
                    }
                });
            }
        });
        if links {
            self.overlay = false;
        }
    }

    /// A fresh client source address for the next run (198.19.0.2–254 in turn); the routes
    /// to A and to the overlay prefer it, the previous one is removed.
    fn fresh_source(&mut self) -> String {
        let x = format!("198.19.0.{}", self.src_seq);
        self.src_seq = if self.src_seq >= 254 {
            2
        } else {
            self.src_seq + 1
        };
        // One `ip -batch` (this runs before every load).
        let mut cmds = format!(
            "addr add {x}/32 dev eth0\n\
             route replace {NODE_A}/32 dev eth0 src {x}\n\
             route replace 10.{OCTET}.0.0/24 via {NODE_A} dev eth0 src {x}\n"
        );
        if let Some(old) = self.src_cur.replace(x.clone()) {
            cmds.push_str(&format!("addr del {old}/32 dev eth0\n"));
        }
        let f = self.dir.path().join("source.batch");
        std::fs::write(&f, cmds).unwrap();
        self.c.client.ip(&["-batch", f.to_str().unwrap()]);
        x
    }

    /// Stop every agent (SIGTERM, all at once: each removes what it made) and remove its pins.
    fn stop_agents(&mut self) {
        let agents: Vec<_> = self
            .c
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take())
            .collect();
        std::thread::scope(|s| {
            for a in agents {
                s.spawn(move || drop(a));
            }
        });
    }

    /// After `mode`: no agent, no NAT rules on A, empty conntrack there, and after a SNATed
    /// mode no TIME_WAIT socket in the tasks (`direct`'s tuples, from the client's own
    /// addresses, never meet a later mode's). The baseline overlay stays for the next baseline
    /// mode; after a mesh mode, whatever the agents left is removed. `everything` (after a
    /// failure): whatever may have been half made goes too.
    fn reset(&mut self, mode: Mode, everything: bool) {
        self.stop_agents();
        self.cleanup(
            everything || mode.hook().is_some(),
            everything || mode == Mode::Iptables,
            everything || mode != Mode::Direct,
        );
    }

    /// (SYN retransmits, retransmitted segments) of the client namespace so far.
    fn tcp_counters(&self) -> (u64, u64) {
        let c = ns_counters(&self.c.client.path());
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        (get("TcpExt.TCPSynRetrans"), get("Tcp.RetransSegs"))
    }

    /// [`TASK_COUNTERS`] summed over the task namespaces so far: why a task answered a SYN
    /// with something else than a SYN-ACK (or not at all).
    fn task_counters(&self) -> BTreeMap<String, u64> {
        let mut sum = BTreeMap::new();
        for t in self.c.tasks.values() {
            let c = ns_counters(&t.ns.path());
            for k in TASK_COUNTERS {
                *sum.entry(k.to_string()).or_insert(0) += c.get(k).copied().unwrap_or(0);
            }
        }
        sum
    }
}

/// Task-side TCP counters recorded per load (`task_tcp` in results.json): a SYN meeting a
/// TIME_WAIT socket with an older timestamp (`PAWSTimewait`) or an unexpected one
/// (`TCPChallengeACK`), a full accept queue (`ListenOverflows`, `ListenDrops`), resets sent.
const TASK_COUNTERS: [&str; 7] = [
    "TcpExt.PAWSTimewait",
    "TcpExt.TCPChallengeACK",
    "TcpExt.TCPSYNChallenge",
    "TcpExt.TCPACKSkippedTimeWait",
    "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops",
    "Tcp.OutRsts",
];

/// Every `Table.Key` counter of /proc/net/{netstat,snmp} in the namespace at `path`.
fn ns_counters(path: &Path) -> BTreeMap<String, u64> {
    util::within(path, || {
        let mut out = BTreeMap::new();
        for file in ["netstat", "snmp"] {
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.chunks_exact(2) {
                let (Some((t, keys)), Some((_, vals))) =
                    (pair[0].split_once(':'), pair[1].split_once(':'))
                else {
                    continue;
                };
                for (k, v) in keys.split_whitespace().zip(vals.split_whitespace()) {
                    if let Ok(v) = v.parse() {
                        out.insert(format!("{t}.{k}"), v);
                    }
                }
            }
        }
        out
    })
}

/// `after - before`, key by key.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Value {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!(v.saturating_sub(before.get(k).copied().unwrap_or(0))),
            )
        })
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Agents first (they remove what they made); nginx stopped gracefully (its master
        // reaps its worker), then the cluster goes with its namespaces.
        self.stop_agents();
        for t in self.c.tasks.values_mut() {
            t.server.stop(Duration::from_secs(5));
        }
    }
}

fn iptables_rules(tasks: &[Task]) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SVC-WEB - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    for i in 1..=tasks.len() {
        r.push_str(&format!(":KUBE-SEP-WEB{i} - [0:0]\n"));
    }
    r.push_str(&format!(
        "-A PREROUTING -d {NODE_A}/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-WEB\n\
         -A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j SNAT --to-source {NODE_A} --random-fully\n"
    ));
    let n = tasks.len();
    for i in 1..n {
        r.push_str(&format!(
            "-A KUBE-SVC-WEB -m statistic --mode nth --every {} --packet 0 -j KUBE-SEP-WEB{i}\n",
            n - i + 1
        ));
    }
    r.push_str(&format!("-A KUBE-SVC-WEB -j KUBE-SEP-WEB{n}\n"));
    for (i, t) in tasks.iter().enumerate() {
        r.push_str(&format!(
            "-A KUBE-SEP-WEB{0} -j KUBE-MARK-MASQ\n-A KUBE-SEP-WEB{0} -p tcp -m tcp -j DNAT --to-destination {1}:80\n",
            i + 1,
            t.addr
        ));
    }
    r.push_str("COMMIT\n");
    r
}

/// One HTTP/1.1 request on a new connection; the body, trimmed.
fn http_get(addr: SocketAddr, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let t = String::from_utf8_lossy(&buf);
    t.split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
}

/// From the client: new connections to `addr`, 20 ms apart, until one is answered (bounded):
/// how long the first flow took once the mode was set up, the tries, and the client's SYN
/// retransmits meanwhile (a dropped SYN is sent again after the 1 s initial RTO).
fn first_answer(bed: &mut Bed, addr: SocketAddr, limit: Duration) -> Value {
    bed.fresh_source();
    let (s0, _) = bed.tcp_counters();
    let (took, tries, body) = util::within(&bed.c.client.path(), move || {
        let t0 = Instant::now();
        let mut tries = 0;
        while t0.elapsed() < limit && !util::interrupted() {
            tries += 1;
            if let Some(b) = http_get(addr, 3 * SECOND) {
                return (Some(t0.elapsed()), tries, Some(b));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (None, tries, None)
    });
    let (s1, _) = bed.tcp_counters();
    json!({
        "ms": took.map(|d| d.as_secs_f64() * 1e3),
        "tries": tries,
        "syn_retrans": s1.saturating_sub(s0),
        "answer": body,
    })
}

/// One wrk load (fresh client source), repeated while disturbed by other work; with the
/// client's TCP retransmit counters over the run.
fn load(
    ctx: &Ctx,
    bed: &mut Bed,
    pins: Option<&Path>,
    url: &str,
    conns: u32,
    close: bool,
    latency: bool,
) -> Value {
    undisturbed(ctx, || {
        bed.fresh_source();
        let (s0, r0) = bed.tcp_counters();
        let t0 = bed.task_counters();
        let mut v = util::wrk_once(ctx, bed.client_ns(), pins, url, conns, close, latency);
        let (s1, r1) = bed.tcp_counters();
        v["syn_retrans"] = json!(s1.saturating_sub(s0));
        v["retrans_segs"] = json!(r1.saturating_sub(r0));
        v["task_tcp"] = delta(&t0, &bed.task_counters());
        v
    })
}

/// Verdict and conntrack counters of node A's agent (how the flows were handled).
fn agent_status(bed: &Bed) -> Value {
    let Some(a) = bed.c.nodes[0].agent.as_ref() else {
        return Value::Null;
    };
    let out = run_bounded(
        None,
        agent_bin().to_str().unwrap(),
        &[
            "status",
            "--json",
            "--pin-dir",
            a.pin_dir.to_str().unwrap(),
            "--run-dir",
            a.run_dir.to_str().unwrap(),
        ],
        10 * SECOND,
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    json!({
        "verdicts": v["verdicts"],
        "conntrack": v["conntrack_entries"],
        "conntrack_max": [v["conntrack_tcp_max"], v["conntrack_udp_max"]],
    })
}

fn setup(ctx: &Ctx, bed: &mut Bed, mode: Mode) -> Value {
    let t = Instant::now();
    match mode {
        Mode::Direct => bed.overlay_up(),
        Mode::Iptables => {
            bed.overlay_up();
            let f = bed.dir.path().join("iptables.rules");
            std::fs::write(&f, iptables_rules(&bed.tasks)).unwrap();
            must(
                Some(&bed.c.nodes[0].ns.name),
                "iptables-nft-restore",
                &[f.to_str().unwrap()],
                10 * SECOND,
            );
        }
        Mode::MeshXdp | Mode::MeshTc => {
            if bed.overlay {
                bed.overlay_down();
            }
            bed.c.agent_args = [
                "--hook",
                mode.hook().unwrap(),
                "--no-dns",
                "--cgroup",
                "none",
            ]
            .map(String::from)
            .to_vec();
            bed.c.start_agents_parallel();
        }
    }
    let setup_ms = t.elapsed().as_secs_f64() * 1e3;
    let addr: SocketAddr = match mode {
        Mode::Direct => SocketAddr::from((bed.tasks[0].addr, 80)),
        _ => format!("{NODE_A}:8080").parse().unwrap(),
    };
    let mut first = first_answer(bed, addr, 20 * SECOND);
    first["setup_ms"] = json!(setup_ms);
    if first["ms"].is_null() {
        let logs: String = bed
            .c
            .nodes
            .iter()
            .filter_map(|n| {
                n.agent
                    .as_ref()
                    .map(|a| format!("--- {}:\n{}", n.name, a.log()))
            })
            .collect();
        panic!(
            "{}: {addr} never answered within 20 s\n{}",
            mode.key(),
            logs.chars()
                .skip(logs.chars().count().saturating_sub(4000))
                .collect::<String>()
        );
    }
    util::log(
        ctx.start,
        format!(
            "e2e-remote: {} set up in {}, first answer after {} ms ({} tries, {} SYN retransmits)",
            mode.key(),
            util::fmt_dur(t.elapsed()),
            fmt_num(first["ms"].as_f64().unwrap_or(f64::NAN), 1),
            first["tries"],
            first["syn_retrans"]
        ),
    );
    first
}

/// `profile`: also run the `Connection: close` and keep-alive loads once more under a
/// system-wide profile (extra runs, not measured).
fn run_mode(ctx: &Ctx, bed: &mut Bed, mode: Mode, profile: bool) -> Value {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let first = setup(ctx, bed, mode);
        let pins: Option<PathBuf> = bed.c.nodes[0].agent.as_ref().map(|a| a.pin_dir.clone());
        let pins = pins.as_deref();
        let url = match mode {
            Mode::Direct => format!("http://{}:80/", bed.tasks[0].addr),
            _ => format!("http://{NODE_A}:8080/"),
        };
        let mut r = json!({ "mode": mode.key(), "first_answer": first });
        r["close"] = load(ctx, bed, pins, &url, 16, true, false);
        r["keepalive"] = load(ctx, bed, pins, &url, 16, false, false);
        r["latency"] = load(ctx, bed, pins, &url, 1, false, true);
        if profile {
            for (key, close) in [("profile_close", true), ("profile_keepalive", false)] {
                bed.fresh_source();
                r[key] = util::wrk_profiled(ctx, bed.client_ns(), &url, 16, close);
            }
        }
        if mode != Mode::Direct {
            bed.fresh_source();
            let (s0, _) = bed.tcp_counters();
            let mut rr = util::curls(bed.client_ns(), &url, 30);
            let (s1, _) = bed.tcp_counters();
            rr["syn_retrans"] = json!(s1.saturating_sub(s0));
            r["rr"] = rr;
        }
        if mode.hook().is_some() {
            r["agent_status"] = agent_status(bed);
        }
        r
    }));
    let t = Instant::now();
    bed.reset(mode, r.is_err());
    let reset_ms = t.elapsed().as_secs_f64() * 1e3;
    match r {
        Ok(mut v) => {
            v["reset_ms"] = json!(reset_ms);
            v
        }
        Err(e) => {
            util::check_interrupt();
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            util::log(
                ctx.start,
                format!("e2e-remote: {} failed: {msg}", mode.key()),
            );
            json!({ "mode": mode.key(), "error": msg })
        }
    }
}

pub fn run(ctx: &mut Ctx) -> Section {
    // The end-to-end rounds, fewer when the run's time is spent (never fewer than 3).
    // Repeats of disturbed runs stop after 6 s (--quick) or 2 min.
    let want = ctx.e2e_rounds.max(3);
    ctx.retry_until = Some(Instant::now() + Duration::from_secs(if ctx.quick { 6 } else { 120 }));
    let mut bed = Bed::new(ctx);
    let mut rounds: Vec<BTreeMap<&'static str, Value>> = Vec::new();
    for round in 0..want {
        if round >= 3 && Instant::now() > ctx.deadline {
            util::log(
                ctx.start,
                format!("e2e-remote: the run's time is spent: {round} rounds"),
            );
            break;
        }
        let mut r = BTreeMap::new();
        for mode in MODES {
            util::check_interrupt();
            let t = Instant::now();
            // The profiles come from the second round (every run has one), in the full run
            // only (--quick stays within its 3 minutes).
            let v = run_mode(ctx, &mut bed, mode, round == 1 && !ctx.quick);
            let syn: u64 = ["close", "keepalive", "latency", "rr"]
                .iter()
                .filter_map(|l| v[l]["syn_retrans"].as_u64())
                .sum();
            util::log(
                ctx.start,
                format!(
                    "e2e-remote: round {} {:<9} close {:>7} conn/s ({} µs CPU), keep-alive {:>7} req/s ({} µs CPU), p50 {:>5} µs, SYN retransmits {syn} ({})",
                    round + 1,
                    mode.key(),
                    fmt_num(f(&v, "close", "rps"), 0),
                    fmt_num(f(&v, "close", "cpu_us_per_req"), 1),
                    fmt_num(f(&v, "keepalive", "rps"), 0),
                    fmt_num(f(&v, "keepalive", "cpu_us_per_req"), 2),
                    fmt_num(f(&v, "latency", "p50_us"), 1),
                    util::fmt_dur(t.elapsed())
                ),
            );
            r.insert(mode.key(), v);
        }
        rounds.push(r);
    }
    let labels: BTreeMap<String, String> = bed
        .tasks
        .iter()
        .map(|t| (t.name.clone(), t.label.clone()))
        .collect();
    drop(bed);
    ctx.retry_until = None;
    report(ctx, rounds, &labels)
}

fn report(
    ctx: &mut Ctx,
    rounds: Vec<BTreeMap<&'static str, Value>>,
    labels: &BTreeMap<String, String>,
) -> Section {
    let ratio: fn(f64, f64) -> f64 = |a, b| a / b;
    let diff: fn(f64, f64) -> f64 = |a, b| a - b;
    let mut rows_conn = Vec::new();
    let mut rows_ka = Vec::new();
    let mut rows_lat = Vec::new();
    let mut jmodes = serde_json::Map::new();
    let rels = |c: &(Stat, bool), d: usize, direct: bool| {
        let s = &c.0;
        let mark = if c.1 || s.n == 0 { "" } else { " †" };
        if direct || s.n == 0 {
            "–".to_string()
        } else if s.n <= 1 {
            format!("{}{mark}", fmt_signed(s.median, d))
        } else {
            format!(
                "{} ({}…{}){mark}",
                fmt_signed(s.median, d),
                fmt_signed(s.min, d),
                fmt_signed(s.max, d)
            )
        }
    };
    let rel = |c: &(Stat, bool), d: usize, direct: bool| {
        if direct || c.0.n == 0 {
            "–".to_string()
        } else {
            format!("{}{}", c.0.show(d), if c.1 { "" } else { " †" })
        }
    };
    for m in MODES {
        let key = m.key();
        let direct = m == Mode::Direct;
        let c_rps = of(&rounds, key, "close", "rps");
        let c_ratio = per_round(&rounds, key, "close", "close", "rps", ratio);
        let c_cpu = of(&rounds, key, "close", "cpu_us_per_req");
        let c_cpu_d = per_round(&rounds, key, "close", "close", "cpu_us_per_req", diff);
        let k_rps = of(&rounds, key, "keepalive", "rps");
        let k_ratio = per_round(&rounds, key, "keepalive", "keepalive", "rps", ratio);
        let k_cpu = of(&rounds, key, "keepalive", "cpu_us_per_req");
        let k_cpu_d = per_round(
            &rounds,
            key,
            "keepalive",
            "keepalive",
            "cpu_us_per_req",
            diff,
        );
        let p50 = of(&rounds, key, "latency", "p50_us");
        let p50_d = per_round(&rounds, key, "latency", "latency", "p50_us", diff);
        let p99 = of(&rounds, key, "latency", "p99_us");
        rows_conn.push(vec![
            m.title().to_string(),
            c_rps.show(0),
            rel(&c_ratio, 3, direct),
            c_cpu.show(1),
            rels(&c_cpu_d, 2, direct),
        ]);
        rows_ka.push(vec![
            m.title().to_string(),
            k_rps.show(0),
            rel(&k_ratio, 3, direct),
            k_cpu.show(2),
            rels(&k_cpu_d, 2, direct),
        ]);
        rows_lat.push(vec![
            m.title().to_string(),
            p50.show(1),
            rels(&p50_d, 1, direct),
            p99.show(1),
        ]);
        jmodes.insert(
            key.into(),
            json!({
                "title": m.title(),
                "new_conn_per_s": c_rps, "new_conn_ratio_vs_direct": c_ratio.0, "new_conn_ratio_clean": c_ratio.1,
                "cpu_us_per_conn": c_cpu, "cpu_us_per_conn_above_direct": c_cpu_d.0, "cpu_us_per_conn_above_direct_clean": c_cpu_d.1,
                "keepalive_req_per_s": k_rps, "keepalive_ratio_vs_direct": k_ratio.0, "keepalive_ratio_clean": k_ratio.1,
                "cpu_us_per_req": k_cpu, "cpu_us_per_req_above_direct": k_cpu_d.0, "cpu_us_per_req_above_direct_clean": k_cpu_d.1,
                "p50_us": p50, "p50_us_above_direct": p50_d.0, "p50_clean": p50_d.1, "p99_us": p99,
            }),
        );
        if m.hook().is_none() {
            continue;
        }
        // The single-node section's targets, applied across nodes.
        let share_ipt = crate::e2e::share_above_direct(&rounds, key, "iptables", "close");
        let mut items = crate::e2e::targets(&c_cpu_d, &k_cpu_d, &c_ratio, &p50_d);
        items.extend(crate::e2e::share_targets(&share_ipt, None));
        jmodes[key]["cpu_us_per_conn_above_direct_share_of_iptables"] = json!(share_ipt.0);
        for miss in crate::e2e::judge(ctx, SEC, &format!("{key} (remote tasks)"), items) {
            ctx.out.finding(format!(
                "{key}, tasks on other nodes: {} is {}{} (target {}; rounds: {}).",
                miss.what, miss.value, miss.unit, miss.target, miss.samples
            ));
        }
        // Against the kube-proxy-style baseline on the same path (context, no target).
        let vs_ipt = |load: &str| -> Stat {
            stat(
                &rounds
                    .iter()
                    .filter_map(|r| {
                        let (a, b) = (r.get(key)?, r.get("iptables")?);
                        (clean(a, load) && clean(b, load))
                            .then(|| f(a, load, "cpu_us_per_req") - f(b, load, "cpu_us_per_req"))
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let (vc, vk) = (vs_ipt("close"), vs_ipt("keepalive"));
        if vc.n > 0 {
            ctx.out.check(
                SEC,
                &format!(
                    "{key} (remote tasks): CPU per connection / per keep-alive request vs iptables"
                ),
                format!(
                    "{} µs / {} µs",
                    fmt_signed(vc.median, 2),
                    fmt_signed(vk.median, 2)
                ),
                "(context)",
                None,
            );
        }
        jmodes[key]["cpu_us_per_conn_vs_iptables"] = json!(vc);
        jmodes[key]["cpu_us_per_req_vs_iptables"] = json!(vk);
    }

    // Round robin: answers per task from 30 sequential connections.
    let mut rr_rows = Vec::new();
    for m in MODES.iter().filter(|m| **m != Mode::Direct) {
        let runs: Vec<&Value> = rounds
            .iter()
            .filter_map(|r| r.get(m.key()))
            .filter(|v| v.get("rr").is_some())
            .collect();
        let tallies: Vec<String> = runs
            .iter()
            .map(|v| {
                v["rr"]["tally"]
                    .as_object()
                    .map(|t| {
                        t.iter()
                            .map(|(k, n)| {
                                format!("{}:{n}", labels.get(k).cloned().unwrap_or(k.clone()))
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            })
            .collect();
        let even = !runs.is_empty()
            && runs.iter().all(|v| {
                let t = v["rr"]["tally"].as_object().cloned().unwrap_or_default();
                t.len() == 3
                    && t.keys().all(|k| labels.contains_key(k))
                    && t.values().all(|n| n.as_u64() == Some(10))
            });
        rr_rows.push(vec![
            m.title().to_string(),
            if tallies.is_empty() {
                "n/a".into()
            } else {
                tallies.join(" / ")
            },
            if even { "yes".into() } else { "**no**".into() },
        ]);
        if m.hook().is_some() {
            ctx.out.check(
                SEC,
                &format!("{} (remote tasks): 30 requests over 3 tasks", m.key()),
                if even {
                    "10/10/10 every round".into()
                } else {
                    tallies.join(" / ")
                },
                "exactly even",
                Some(even),
            );
            if !even {
                // SYN retransmits of each round's 30 connections: a refused SYN that the
                // client answered with a RST is balanced again when it is sent again.
                let retrans: Vec<String> = runs
                    .iter()
                    .map(|v| {
                        v["rr"]["syn_retrans"]
                            .as_u64()
                            .map_or("?".into(), |n| n.to_string())
                    })
                    .collect();
                ctx.out.finding(format!(
                    "{}, tasks on other nodes: round-robin is not exactly even: {} (SYN retransmits of the 30 \
                     connections per round: {}). A SYN the task refuses (`PAWSTimewait`: a SNAT tuple it still holds \
                     in TIME_WAIT, its port reclaimed or evicted from conntrack before that 60 s ended) gets a bare ACK, the \
                     client resets and sends its SYN again 1 s later, and mesh balances that SYN as a new flow (the \
                     RST closed the tuple), as the kernel's conntrack does: one task is skipped or taken twice",
                    m.key(),
                    tallies.join(" / "),
                    retrans.join(", ")
                ));
            }
        }
    }

    // First flow after setup, and SYN retransmits seen by the client.
    let mut syn_rows = Vec::new();
    let mut syn_total = BTreeMap::new();
    for m in MODES {
        let runs: Vec<&Value> = rounds.iter().filter_map(|r| r.get(m.key())).collect();
        let first = stat(
            &runs
                .iter()
                .filter_map(|v| v["first_answer"]["ms"].as_f64())
                .collect::<Vec<_>>(),
        );
        let setup = stat(
            &runs
                .iter()
                .filter_map(|v| v["first_answer"]["setup_ms"].as_f64())
                .collect::<Vec<_>>(),
        );
        let first_syn: u64 = runs
            .iter()
            .filter_map(|v| v["first_answer"]["syn_retrans"].as_u64())
            .sum();
        let per_load = |load: &str| -> (u64, u64) {
            (
                runs.iter()
                    .filter_map(|v| v[load]["syn_retrans"].as_u64())
                    .sum(),
                runs.iter()
                    .filter_map(|v| v[load]["requests"].as_f64())
                    .sum::<f64>() as u64,
            )
        };
        let (sc, nc) = per_load("close");
        let (sk, _) = per_load("keepalive");
        let (sl, _) = per_load("latency");
        let (sr, _) = per_load("rr");
        // Why, seen from the tasks: their counters over every load of the mode.
        let mut why = BTreeMap::<String, u64>::new();
        for v in &runs {
            for load in ["close", "keepalive", "latency"] {
                if let Some(o) = v[load]["task_tcp"].as_object() {
                    for (k, n) in o {
                        *why.entry(k.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                    }
                }
            }
        }
        let why: Vec<String> = why
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        syn_total.insert(m.key(), (first_syn, sc, nc, sk + sl + sr, why.join(", ")));
        syn_rows.push(vec![
            m.title().to_string(),
            setup.show(0),
            first.show(1),
            first_syn.to_string(),
            format!("{sc} in {} connections", fmt_num(nc as f64, 0)),
            (sk + sl + sr).to_string(),
        ]);
    }
    for (mode, (first, sc, nc, other, why)) in &syn_total {
        if first + sc + other > 0 {
            let why = if why.is_empty() {
                "none".to_string()
            } else {
                why.clone()
            };
            ctx.out.finding(format!(
                "{mode}, tasks on other nodes: the client retransmitted SYNs ({first} for the first connection after \
                 setup, {sc} in {} `Connection: close` connections, {other} in the other loads): a dropped SYN or \
                 SYN-ACK is sent again after the 1 s initial RTO (per-round counts in results.json, `syn_retrans`). \
                 The tasks' TCP counters over the loads: {why} (`PAWSTimewait`: a SYN on a tuple the task still \
                 holds in TIME_WAIT, with an older TCP timestamp than that tuple's last flow, i.e. from another \
                 client address: answered with a bare ACK, so the client resets and retries after 1 s; \
                 `task_tcp` in results.json).",
                fmt_num(*nc as f64, 0)
            ));
        }
    }
    // What mesh's data path refused on A.
    for m in [Mode::MeshXdp, Mode::MeshTc] {
        let counts: Vec<(u64, u64, u64)> = rounds
            .iter()
            .filter_map(|r| r.get(m.key()))
            .map(|v| {
                let vd = &v["agent_status"]["verdicts"];
                let n = |k: &str| vd[k].as_u64().unwrap_or(0);
                (n("new_flow"), n("err_snat_ports"), n("err_ct_insert"))
            })
            .collect();
        let snat: u64 = counts.iter().map(|c| c.1).sum();
        if snat > 0 {
            let range = (mesh_common::SNAT_PORT_MAX - mesh_common::SNAT_PORT_MIN) as u64 + 1;
            let full = range * TASK_NODES.len() as u64;
            ctx.out.finding(format!(
                "{}, tasks on other nodes: node A found no free SNAT port for {snat} new flow{} (per round: {}; \
                 {} backends × {} ports = {} flows). Such a SYN is passed to A's own stack, which resets it: \
                 connection refused (wrk socket errors, a missing answer in the round-robin check). A SNAT port stays \
                 taken as long as its flow's conntrack entries (the map holds {} entries) unless A saw that flow close \
                 both ways (a FIN marks its direction's entry closing, a RST both; such a port is taken over when its \
                 turn comes: each backend's ports are handed out in turn, and up to 8 are tried per new flow): \
                 refusals here mean 8 ports in a row were all held by flows not seen closing (still open, or gone without a FIN or RST through A), out of \
                 {} ports × backends.",
                m.key(),
                if snat == 1 { "" } else { "s" },
                counts
                    .iter()
                    .map(|c| format!("{} refused, {} opened", c.1, c.0))
                    .collect::<Vec<_>>()
                    .join("; "),
                TASK_NODES.len(),
                fmt_num(range as f64, 0),
                fmt_num(full as f64, 0),
                fmt_num(mesh_common::maps::MAX_CT_TCP as f64, 0),
                fmt_num(full as f64, 0),
            ));
        }
        let ct: u64 = counts.iter().map(|c| c.2).sum();
        if ct > 0 {
            ctx.out.finding(format!(
                "{}, tasks on other nodes: {ct} new flows could not be inserted into node A's conntrack \
                 (`err_ct_insert`).",
                m.key()
            ));
        }
    }
    // Runs disturbed by other work, and errors.
    let loads: Vec<&Value> = rounds
        .iter()
        .flat_map(|r| r.values())
        .flat_map(|v| {
            ["close", "keepalive", "latency"]
                .into_iter()
                .map(move |l| &v[l])
        })
        .filter(|x| x.get("attempt").is_some())
        .collect();
    let bg = stat(
        &loads
            .iter()
            .filter_map(|x| x["foreign_cpus"].as_f64())
            .collect::<Vec<_>>(),
    );
    let disturbed = loads.iter().filter(|x| x["disturbed"] == true).count();
    if disturbed > 0 {
        ctx.out.finding(format!(
            "e2e-remote: {disturbed} of {} load runs stayed disturbed by other work on the machine (foreign \
             processes used > 5% of a CPU); comparisons use the rounds where both runs were clean (†: none, not judged).",
            loads.len()
        ));
    }
    for (i, r) in rounds.iter().enumerate() {
        for (m, v) in r {
            if let Some(e) = v["error"].as_str() {
                ctx.out.finding(format!(
                    "e2e-remote: round {} {m} did not run: {}",
                    i + 1,
                    e.lines().next().unwrap_or(e)
                ));
            }
            for l in ["close", "keepalive", "latency"] {
                if let Some(e) = v[l]["error"].as_str() {
                    ctx.out
                        .finding(format!("e2e-remote: round {} {m} {l}: {e}", i + 1));
                } else if let Some(n) = v[l]["errors"].as_u64().filter(|n| *n > 0) {
                    ctx.out.finding(format!(
                        "e2e-remote: round {} {m} {l}: {n} socket errors or non-2xx",
                        i + 1
                    ));
                }
            }
        }
    }

    let ipvs = Path::new("/proc/net/ip_vs").exists();
    let mut md = String::new();
    md.push_str(&format!(
        "The same loads as section 2, through node A's published port to a service whose 3 tasks all run on \
         other nodes (web.1 and web.3 on B, web.2 on C), reached over the VXLAN overlay: the 3-node cluster bed of \
         the integration tests (tests/src/cluster.rs; node, client and task namespaces on one underlay bridge, TX \
         checksum offload off on every underlay port), nginx in each task (one worker, pinned to CPU 1; wrk and \
         curl on CPU 0). Each run uses a fresh client source address from 198.19.0.0/24, which every node routes \
         through A, so replies cross A in every mode.\n\n\
         Modes, alternated within each round ({} rounds, {} s per load{}): **direct** = the client talks to web.1 \
         at its overlay address, routed by A's kernel (A's bridge → VXLAN → B), the reply back over the underlay \
         through A's kernel forwarding: no load balancer, the same hops as the balanced modes (the ceiling); \
         **iptables** = kube-proxy-style rules on A: DNAT to the 3 remote tasks with `-m statistic --mode nth`, \
         the masquerade mark, and SNAT to A's underlay address `--random-fully` (MASQUERADE would take the overlay \
         bridge's address, the gateway every node holds, and replies would stay on B); **mesh-xdp / mesh-tc** = a \
         real `mesh-agent --reach cluster` on every node (`--no-dns --cgroup none`, and the cluster bed's \
         `--resync-ms 300`: the agents' own CPU is in the figures): DNAT + SNAT to A:{}–{} (the default `--snat-ports`) \
         in the program on A's underlay interface, the kernel routes onto the overlay, the reply comes back over \
         the underlay and is reverse-translated and redirected to the client on A. In the baseline modes the \
         benchmark lays out the overlay as the agent does (bridge with the gateway, VXLAN device without learning \
         and with ARP proxy, static FDB and neighbour entries, MTU 1450, Docker-style MACs); in mesh modes the \
         agents make it and remove it when they stop. Between modes A's conntrack is flushed and, after a \
         SNATed mode, the tasks' TIME_WAIT sockets are destroyed (`ss -K`): the SNATed modes reach a task from A's address, so \
         the tuples a task sees repeat from one mode to the next, and a SYN meeting a TIME_WAIT socket of the \
         previous mode is answered with a bare ACK and has to be sent again. CPU = \
         busy time of both CPUs (/proc/stat) over the run divided by requests served; \"above direct\" and \
         \"× direct\" are per round, then the median. Other work on the machine: median {} CPUs during the runs, \
         {disturbed} runs stayed disturbed (> 5% of a CPU; repeated up to {} times).\n\n\
         **Docker Swarm itself is not a baseline here: it cannot forward on this kernel.** Its routing mesh \
         balances published ports with IPVS (`ip_vs`) inside the ingress sandbox, and this kernel has no IPVS{} \
         and no loadable modules, so a published port of a Swarm service never reaches a task. Swarm's ingress \
         path (DNAT + SNAT on the entry node, VXLAN to the task's node) is what the iptables mode reproduces.\n\n",
        rounds.len(),
        ctx.e2e_secs,
        util::load_note(ctx.e2e_secs),
        mesh_common::SNAT_PORT_MIN,
        mesh_common::SNAT_PORT_MAX,
        fmt_num(bg.median, 3),
        ctx.e2e_attempts,
        if ipvs {
            " (NOTE: /proc/net/ip_vs exists on this run)"
        } else {
            " (no /proc/net/ip_vs)"
        }
    ));
    md.push_str(&util::md_load_tables(&rows_conn, &rows_ka, &rows_lat, ""));
    let titles: Vec<(&str, &str)> = MODES.iter().map(|m| (m.key(), m.title())).collect();
    md.push_str(&util::md_profile_table(&rounds, &titles));
    md.push_str(
        "\n**Round robin**: 30 sequential requests (one curl, a new connection each) through A, answers per task \
         (task@node), each round\n\n",
    );
    md.push_str(&md_table(&["mode", "per round", "exactly even"], &rr_rows));
    md.push_str(
        "\n**First flow and SYN retransmits**: setup = building the overlay and rules (baselines) or starting the \
         three agents until each is ready; first answer = from then until the first new connection from the client \
         is answered (one try every 20 ms); SYN retransmits = the client namespace's `TCPSynRetrans` over the \
         first connection and over the loads, all rounds together\n\n",
    );
    md.push_str(&md_table(
        &[
            "mode",
            "setup ms",
            "first answer ms",
            "SYN retransmits, first connection",
            "SYN retransmits, `Connection: close` runs",
            "SYN retransmits, other loads",
        ],
        &syn_rows,
    ));
    let json = json!({
        "rounds": rounds.iter().map(|r| json!(r)).collect::<Vec<_>>(),
        "summary": jmodes,
        "foreign_cpus": bg,
        "runs_disturbed": disturbed,
        "seconds_per_load": ctx.e2e_secs,
        "ipvs_available": ipvs,
    });
    Section {
        key: "e2e-remote",
        json,
        markdown: md,
    }
}
