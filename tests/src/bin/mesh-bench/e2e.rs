//! 2. End to end through a node.
//!
//! client ns (eth0 198.18.0.2/24, TX checksum offload off) ⇄ node ns (ext0 198.18.0.1/24)
//! ⇄ task namespaces running nginx (one worker, `return 200 "taskN\n"`). Tasks 1–3 serve
//! `web` (published 8080 → 80); task 4 serves `one` (8081 → 80, and 5201 → iperf3), so that
//! bulk transfers and the one-backend runs go to one task in every mode.
//!
//! Modes, alternated in every round: `direct` (client → task 4 through kernel forwarding,
//! no LB), `iptables` (kube-proxy style DNAT, `-m statistic --mode nth`), `nft` (`numgen inc
//! mod 3` map), `haproxy` (TCP mode, roundrobin, one thread), `mesh-xdp` and `mesh-tc` (the
//! agent from MESH_AGENT_BIN with `--hook xdp|tc`). In baseline modes the task interfaces are
//! made by the benchmark with the same layout the agent makes (a bridge holding the gateway
//! 10.200.0.1/24, one veth per task, MTU 1450, GRO on the task side); in mesh modes the agent
//! makes them, and tears them down when it stops.
//!
//! Load generator pinned to CPU 0 (taskset), servers and proxies (nginx, iperf3 -s, haproxy,
//! the agent) to CPU 1. Every load run uses a fresh client source address (no PAWS/TIME_WAIT
//! carry-over between runs); conntrack is flushed in the node between modes.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_tests::{Netns, agent_bin, veth};
use serde_json::{Value, json};

use crate::{
    Ctx,
    util::{
        self, Bg, Section, Stat, fmt_num, fmt_signed, md_table, must, run_bounded, stat,
        undisturbed,
    },
};

pub const NODE_IP: &str = "198.18.0.1";
const SECOND: Duration = Duration::from_secs(1);

pub fn task_name(i: usize) -> String {
    format!("task{i}")
}

fn task_ip(i: usize) -> String {
    format!("10.200.0.{}", 10 + i)
}

/// A task namespace with its servers (stopped before the namespace goes).
pub struct TaskNs {
    pub i: usize,
    pub service: &'static str,
    _nginx: Bg,
    _iperf: Option<Bg>,
    pub ns: Netns,
}

/// The single-node bed: node, client, tasks, the state file, the client's source addresses.
pub struct Bed {
    pub tasks: Vec<TaskNs>,
    pub client: Netns,
    pub node: Netns,
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    baseline: bool,
    src_seq: u32,
    src_cur: Option<String>,
}

impl Bed {
    /// A node, a client and `web` tasks 1..=n_web plus task 4 (`one`, with iperf3).
    pub fn new(ctx: &Ctx, n_web: usize) -> Bed {
        let node = Netns::new("bn");
        util::track_netns(&node.name);
        let client = Netns::new("bc");
        util::track_netns(&client.name);
        veth(
            &node,
            "ext0",
            "198.18.0.1/24",
            &client,
            "eth0",
            "198.18.0.2/24",
        );
        // XDP redirect needs complete checksums (docs/architecture.md): same for every mode.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        client.ip(&["route", "add", "10.200.0.0/24", "via", NODE_IP]);
        // The whole port range: fewer reused 5-tuples within a run.
        client.exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
        );
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.yaml");
        let mut bed = Bed {
            tasks: Vec::new(),
            client,
            node,
            dir,
            state,
            baseline: false,
            src_seq: 16,
            src_cur: None,
        };
        for i in 1..=n_web.max(3) {
            bed.spawn_task(i, "web");
        }
        bed.spawn_task(4, "one");
        bed.write_state();
        util::log(
            ctx.start,
            format!(
                "e2e: bed ready (node {}, client {})",
                bed.node.name, bed.client.name
            ),
        );
        bed
    }

    fn spawn_task(&mut self, i: usize, service: &'static str) {
        let ns = Netns::new("bt");
        util::track_netns(&ns.name);
        let tdir = self.dir.path().join(task_name(i));
        fs::create_dir_all(&tdir).unwrap();
        let args = util::nginx_args(&tdir, &task_name(i));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nginx = Bg::spawn(
            Some(&ns.name),
            Some(1),
            "nginx",
            &args,
            &tdir.join("nginx.out"),
        );
        let iperf = (service == "one").then(|| {
            Bg::spawn(
                Some(&ns.name),
                Some(1),
                "iperf3",
                &["-s", "-p", "5201"],
                &tdir.join("iperf3.log"),
            )
        });
        if self.baseline {
            self.task_link_up(&ns, i);
        }
        self.tasks.push(TaskNs {
            i,
            service,
            _nginx: nginx,
            _iperf: iperf,
            ns,
        });
    }

    /// Create one more `web` task (namespace + nginx); the state is not written.
    pub fn add_task(&mut self, _ctx: &Ctx) -> usize {
        let i = self.tasks.iter().map(|t| t.i).max().unwrap_or(0) + 1;
        self.spawn_task(i, "web");
        i
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from(
            "version: 1\nnodes:\n  - {name: n1, address: 198.18.0.1}\n\
             networks:\n  - {name: appnet, subnet: 10.200.0.0/24, vni: 4200}\n\
             services:\n\
             \x20 - name: web\n    networks: [{network: appnet, vip: 10.200.0.2}]\n    ports:\n\
             \x20     - {published: 8080, target: 80, protocol: tcp}\n\
             \x20 - name: one\n    networks: [{network: appnet, vip: 10.200.0.3}]\n    ports:\n\
             \x20     - {published: 8081, target: 80, protocol: tcp}\n\
             \x20     - {published: 5201, target: 5201, protocol: tcp}\n\
             tasks:\n",
        );
        let mut slots: BTreeMap<&str, u32> = BTreeMap::new();
        for t in &self.tasks {
            let slot = slots.entry(t.service).or_default();
            *slot += 1;
            y.push_str(&format!(
                "  - {{id: {}, service: {}, slot: {slot}, node: n1, state: running, netns: {}, networks: [{{network: appnet, address: {}}}]}}\n",
                task_name(t.i),
                t.service,
                t.ns.path().display(),
                task_ip(t.i)
            ));
        }
        y
    }

    pub fn write_state(&self) {
        mesh_tests::write_atomic(&self.state, &self.yaml());
    }

    fn task_link_up(&self, ns: &Netns, i: usize) {
        let hv = format!("bv{i}");
        self.node.ip(&[
            "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.node
            .ip(&["link", "set", &hv, "master", "bbr0", "mtu", "1450", "up"]);
        let mac = format!("02:42:0a:c8:00:{:02x}", 10 + i);
        ns.ip(&["link", "set", "eth0", "address", &mac, "mtu", "1450", "up"]);
        ns.ip(&["addr", "add", &format!("{}/24", task_ip(i)), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", "10.200.0.1"]);
        ns.exec("ethtool", &["-K", "eth0", "gro", "on"]);
    }

    /// The baseline modes' task networking, laid out as the agent lays out its own.
    pub fn baseline_up(&mut self) {
        if self.baseline {
            return;
        }
        self.node.ip(&["link", "add", "bbr0", "type", "bridge"]);
        self.node
            .ip(&["addr", "add", "10.200.0.1/24", "dev", "bbr0"]);
        self.node.ip(&["link", "set", "bbr0", "mtu", "1450", "up"]);
        for t in &self.tasks {
            self.task_link_up(&t.ns, t.i);
        }
        self.baseline = true;
    }

    pub fn baseline_down(&mut self) {
        if !self.baseline {
            return;
        }
        for t in &self.tasks {
            let _ = self.node.run("ip", &["link", "del", &format!("bv{}", t.i)]);
        }
        let _ = self.node.run("ip", &["link", "del", "bbr0"]);
        self.baseline = false;
    }

    /// A fresh client source address for the next run: routes to the node and to the tasks
    /// prefer it, the previous one is removed.
    pub fn fresh_source(&mut self) -> String {
        let x = format!("198.18.0.{}", self.src_seq);
        self.src_seq = if self.src_seq >= 254 {
            16
        } else {
            self.src_seq + 1
        };
        let c = &self.client;
        c.ip(&["addr", "add", &format!("{x}/24"), "dev", "eth0"]);
        c.ip(&[
            "route",
            "replace",
            "198.18.0.1/32",
            "dev",
            "eth0",
            "src",
            &x,
        ]);
        c.ip(&[
            "route",
            "replace",
            "10.200.0.0/24",
            "via",
            NODE_IP,
            "dev",
            "eth0",
            "src",
            &x,
        ]);
        if let Some(old) = self.src_cur.replace(x.clone()) {
            let _ = c.run("ip", &["addr", "del", &format!("{old}/24"), "dev", "eth0"]);
        }
        x
    }

    pub fn flush_conntrack(&self) {
        let _ = run_bounded(Some(&self.node.name), "conntrack", &["-F"], 5 * SECOND);
    }

    /// Start the agent for this node; `hook`: xdp or tc.
    pub fn start_agent(&mut self, ctx: &Ctx, hook: &str, extra: &[&str]) -> AgentProc {
        self.baseline_down();
        let mut args = vec!["--hook", hook, "--cgroup", "none"];
        args.extend_from_slice(extra);
        let a = AgentProc::start(&self.node, &self.state, &args, Some(1));
        util::log(ctx.start, format!("e2e: agent ({hook}) ready"));
        a
    }

    /// `curl` from the client until `url` answers (bounded).
    pub fn wait_answer(&self, url: &str, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            util::check_interrupt();
            if let Some(s) = mesh_tests::curl(&self.client, url).filter(|s| !s.is_empty()) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.baseline_down();
    }
}

/// A `mesh-agent run` process for the bed's node: its own pins, run dir and log; stopped
/// (SIGTERM: it tears down what it made) and its pins removed on drop.
pub struct AgentProc {
    pub bg: Bg,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl AgentProc {
    pub fn start(node: &Netns, state: &Path, extra: &[&str], cpu: Option<u32>) -> AgentProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/mesh-bench-{}-{}",
            std::process::id(),
            mesh_tests::uniq()
        ));
        util::track_pins(&pin_dir);
        let run_dir = tmp.path().join("run");
        let bin = agent_bin();
        let netns = node.path();
        let mut args: Vec<&str> = vec![
            "run",
            "--netns",
            netns.to_str().unwrap(),
            "--node",
            "n1",
            "--state",
            state.to_str().unwrap(),
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--iface",
            "ext0",
        ];
        args.extend_from_slice(extra);
        // SAFETY: set before spawning; read by the child only.
        unsafe { std::env::set_var("MESH_LOG", "info") };
        let mut bg = Bg::spawn(
            None,
            cpu,
            bin.to_str().unwrap(),
            &args,
            &tmp.path().join("agent.log"),
        );
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            util::check_interrupt();
            if run_dir.join("catalog.json").exists() && bg.log_text().contains("agent ready") {
                break;
            }
            if !bg.running() {
                panic!("mesh-agent exited early:\n{}", bg.log_text());
            }
            if Instant::now() > end {
                panic!("mesh-agent not ready after 30 s:\n{}", bg.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        AgentProc {
            bg,
            pin_dir,
            run_dir,
            _tmp: tmp,
        }
    }

    pub fn log(&self) -> String {
        self.bg.log_text()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.bg.stop(Duration::from_secs(15));
        util::remove_pin_dir(&self.pin_dir);
    }
}

// ---------------------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Iptables,
    Nft,
    Haproxy,
    MeshXdp,
    MeshTc,
}

const MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::Iptables,
    Mode::Nft,
    Mode::Haproxy,
    Mode::MeshXdp,
    Mode::MeshTc,
];

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nft => "nft",
            Mode::Haproxy => "haproxy",
            Mode::MeshXdp => "mesh-xdp",
            Mode::MeshTc => "mesh-tc",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Mode::Direct => "direct (client → task 4, kernel forwarding, no LB)",
            Mode::Iptables => "iptables DNAT (kube-proxy style, statistic nth)",
            Mode::Nft => "nftables DNAT (numgen inc mod 3 map)",
            Mode::Haproxy => "haproxy (TCP mode, roundrobin, 1 thread)",
            Mode::MeshXdp => "mesh, --hook xdp",
            Mode::MeshTc => "mesh, --hook tc",
        }
    }

    fn mesh(self) -> bool {
        matches!(self, Mode::MeshXdp | Mode::MeshTc)
    }

    /// (HTTP URL of the balanced service, bulk host, bulk port).
    fn targets(self) -> (String, String, &'static str) {
        match self {
            Mode::Direct => (format!("http://{}:80/", task_ip(4)), task_ip(4), "5201"),
            _ => (
                format!("http://{NODE_IP}:8080/"),
                NODE_IP.to_string(),
                "5201",
            ),
        }
    }
}

/// What a mode left running (dropped at the end of the mode).
enum Running {
    Nothing,
    Haproxy(Bg),
    Agent(AgentProc),
}

fn iptables_rules() -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    r.push_str(":KUBE-SVC-WEB - [0:0]\n");
    for i in 1..=3 {
        r.push_str(&format!(":KUBE-SEP-WEB{i} - [0:0]\n"));
    }
    r.push_str(&format!(
        "-A PREROUTING -d {NODE_IP}/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-WEB\n"
    ));
    r.push_str(&format!(
        "-A PREROUTING -d {NODE_IP}/32 -p tcp -m tcp --dport 5201 -j DNAT --to-destination {}:5201\n",
        task_ip(4)
    ));
    r.push_str("-A KUBE-SVC-WEB -m statistic --mode nth --every 3 --packet 0 -j KUBE-SEP-WEB1\n");
    r.push_str("-A KUBE-SVC-WEB -m statistic --mode nth --every 2 --packet 0 -j KUBE-SEP-WEB2\n");
    r.push_str("-A KUBE-SVC-WEB -j KUBE-SEP-WEB3\n");
    for i in 1..=3 {
        r.push_str(&format!(
            "-A KUBE-SEP-WEB{i} -p tcp -m tcp -j DNAT --to-destination {}:80\n",
            task_ip(i)
        ));
    }
    r.push_str("COMMIT\n");
    r
}

fn nft_rules() -> String {
    format!(
        "table ip meshbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   ip daddr {NODE_IP} tcp dport 8080 dnat to numgen inc mod 3 map {{ 0 : {}, 1 : {}, 2 : {} }} : 80\n\
         \x20   ip daddr {NODE_IP} tcp dport 5201 dnat to {}\n  }}\n}}\n",
        task_ip(1),
        task_ip(2),
        task_ip(3),
        task_ip(4)
    )
}

fn haproxy_cfg() -> String {
    let mut c = String::from(
        "global\n  nbthread 1\n  maxconn 8000\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    c.push_str(&format!(
        "frontend web\n  bind {NODE_IP}:8080\n  default_backend web\n"
    ));
    c.push_str("backend web\n  balance roundrobin\n");
    for i in 1..=3 {
        c.push_str(&format!("  server t{i} {}:80\n", task_ip(i)));
    }
    c.push_str(&format!(
        "frontend bulk\n  bind {NODE_IP}:5201\n  default_backend bulk\n"
    ));
    c.push_str(&format!("backend bulk\n  server t4 {}:5201\n", task_ip(4)));
    c
}

fn setup(ctx: &Ctx, bed: &mut Bed, mode: Mode) -> Running {
    bed.flush_conntrack();
    let dir = bed.dir.path().to_path_buf();
    let node = bed.node.name.clone();
    let running = match mode {
        Mode::Direct => {
            bed.baseline_up();
            Running::Nothing
        }
        Mode::Iptables => {
            bed.baseline_up();
            let f = dir.join("iptables.rules");
            fs::write(&f, iptables_rules()).unwrap();
            must(
                Some(&node),
                "iptables-nft-restore",
                &[f.to_str().unwrap()],
                10 * SECOND,
            );
            Running::Nothing
        }
        Mode::Nft => {
            bed.baseline_up();
            let f = dir.join("nft.rules");
            fs::write(&f, nft_rules()).unwrap();
            must(
                Some(&node),
                "nft",
                &["-f", f.to_str().unwrap()],
                10 * SECOND,
            );
            Running::Nothing
        }
        Mode::Haproxy => {
            bed.baseline_up();
            let f = dir.join("haproxy.cfg");
            fs::write(&f, haproxy_cfg()).unwrap();
            Running::Haproxy(Bg::spawn(
                Some(&node),
                Some(1),
                "haproxy",
                &["-f", f.to_str().unwrap(), "-db"],
                &dir.join("haproxy.log"),
            ))
        }
        Mode::MeshXdp => Running::Agent(bed.start_agent(ctx, "xdp", &["--no-dns"])),
        Mode::MeshTc => Running::Agent(bed.start_agent(ctx, "tc", &["--no-dns"])),
    };
    let (url, _, _) = mode.targets();
    bed.fresh_source();
    if bed.wait_answer(&url, 20 * SECOND).is_none() {
        let extra = match &running {
            Running::Agent(a) => a.log(),
            Running::Haproxy(h) => h.log_text(),
            Running::Nothing => String::new(),
        };
        panic!("{}: {url} never answered\n{extra}", mode.key());
    }
    if mode.mesh() {
        bed.wait_answer(&format!("http://{NODE_IP}:8081/"), 20 * SECOND)
            .expect("one-backend service answers");
    }
    running
}

fn teardown(bed: &mut Bed, mode: Mode, running: Running) {
    match running {
        Running::Agent(a) => {
            drop(a);
            // The agent removes the interfaces it made; make sure before the next mode.
            for t in &bed.tasks {
                let left: Vec<String> = t.ns.links().into_iter().filter(|l| l != "lo").collect();
                for l in left {
                    let _ = t.ns.run("ip", &["link", "del", &l]);
                }
            }
            for l in bed.node.links() {
                if l.starts_with("mv") || l.starts_with("mbr-") {
                    let _ = bed.node.run("ip", &["link", "del", &l]);
                }
            }
        }
        Running::Haproxy(mut h) => {
            h.stop(5 * SECOND);
        }
        Running::Nothing => {}
    }
    let node = bed.node.name.clone();
    match mode {
        // iptables-nft leaves the table and its base chains after a flush: delete the table.
        Mode::Iptables => {
            let _ = run_bounded(
                Some(&node),
                "nft",
                &["delete", "table", "ip", "nat"],
                5 * SECOND,
            );
        }
        Mode::Nft => {
            let _ = run_bounded(
                Some(&node),
                "nft",
                &["delete", "table", "ip", "meshbench"],
                5 * SECOND,
            );
        }
        _ => {}
    }
    let left = run_bounded(Some(&node), "nft", &["list", "ruleset"], 5 * SECOND);
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "{}: nft ruleset left behind",
        mode.key()
    );
    bed.flush_conntrack();
}

// ---------------------------------------------------------------------------------------
// Loads
// ---------------------------------------------------------------------------------------

/// A wrk run from the client (CPU 0): requests served, rate, latency percentiles, and the
/// busy CPU time of both CPUs while it ran.
fn wrk(
    ctx: &Ctx,
    bed: &mut Bed,
    pins: Option<&Path>,
    url: &str,
    conns: u32,
    close: bool,
    latency: bool,
) -> Value {
    undisturbed(ctx, || wrk_once(ctx, bed, pins, url, conns, close, latency))
}

fn wrk_once(
    ctx: &Ctx,
    bed: &mut Bed,
    pins: Option<&Path>,
    url: &str,
    conns: u32,
    close: bool,
    latency: bool,
) -> Value {
    bed.fresh_source();
    util::wrk_once(ctx, &bed.client.name, pins, url, conns, close, latency)
}

fn iperf(ctx: &Ctx, bed: &mut Bed, host: &str, port: &str) -> Value {
    undisturbed(ctx, || iperf_once(ctx, bed, host, port))
}

fn iperf_once(ctx: &Ctx, bed: &mut Bed, host: &str, port: &str) -> Value {
    bed.fresh_source();
    // iperf3 counts whole seconds (`-t 0.5` runs forever): a sub-second load (--quick) is a
    // byte count instead, about that long at this bed's 3-5 Gbit/s.
    let (flag, amount) = if ctx.e2e_secs.fract() == 0.0 {
        ("-t", format!("{}", ctx.e2e_secs as u64))
    } else {
        ("-n", format!("{}M", (ctx.e2e_secs * 512.0).round() as u64))
    };
    let before = util::cpu_busy_ticks();
    let t0 = Instant::now();
    let out = run_bounded(
        Some(&bed.client.name),
        "taskset",
        &[
            "-c",
            "0",
            "iperf3",
            "-c",
            host,
            "-p",
            port,
            flag,
            &amount,
            "-J",
            "--connect-timeout",
            "3000",
        ],
        Duration::from_secs_f64(ctx.e2e_secs + 20.0),
    );
    let wall = t0.elapsed().as_secs_f64();
    let cpu = util::cpu_busy_secs(&before, &util::cpu_busy_ticks());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => json!({
            "gbit_s": bps / 1e9,
            "bytes": v["end"]["sum_received"]["bytes"],
            "retransmits": v["end"]["sum_sent"]["retransmits"],
            "cpu_busy_s": cpu,
            "wall_s": wall,
        }),
        None => {
            json!({"error": format!("iperf3 failed ({}): {}", out.status, v["error"].as_str().map(str::to_string).unwrap_or_else(|| util::text(&out).chars().take(300).collect()))})
        }
    }
}

/// `n` sequential requests from one curl process, each on a new connection.
fn curls(bed: &mut Bed, url: &str, n: usize) -> Value {
    bed.fresh_source();
    util::curls(&bed.client.name, url, n)
}

/// `profile`: also run the `Connection: close` and keep-alive loads once more under a
/// system-wide profile (extra runs, not measured).
fn run_mode(ctx: &Ctx, bed: &mut Bed, mode: Mode, profile: bool) -> Value {
    let running = setup(ctx, bed, mode);
    let pins = match &running {
        Running::Agent(a) => Some(a.pin_dir.clone()),
        _ => None,
    };
    let pins = pins.as_deref();
    let (url, host, port) = mode.targets();
    let mut r = json!({ "mode": mode.key() });
    r["close"] = wrk(ctx, bed, pins, &url, 16, true, false);
    r["keepalive"] = wrk(ctx, bed, pins, &url, 16, false, false);
    r["latency"] = wrk(ctx, bed, pins, &url, 1, false, true);
    if profile {
        for (key, close) in [("profile_close", true), ("profile_keepalive", false)] {
            bed.fresh_source();
            r[key] = util::wrk_profiled(ctx, &bed.client.name, &url, 16, close);
        }
    }
    r["bulk"] = iperf(ctx, bed, &host, port);
    if mode != Mode::Direct {
        r["rr"] = curls(bed, &url, 30);
    }
    if mode.mesh() {
        let one = format!("http://{NODE_IP}:8081/");
        r["close_1be"] = wrk(ctx, bed, pins, &one, 16, true, false);
        r["keepalive_1be"] = wrk(ctx, bed, pins, &one, 16, false, false);
        // --quick: the one-backend latency is left out (time).
        if !ctx.quick {
            r["latency_1be"] = wrk(ctx, bed, pins, &one, 1, false, true);
        }
        if let Running::Agent(a) = &running {
            r["agent_status"] = agent_status(a);
        }
    }
    teardown(bed, mode, running);
    r
}

/// Verdict counters after the mode's loads (how the packets were handled).
pub(crate) fn agent_status(a: &AgentProc) -> Value {
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

// ---------------------------------------------------------------------------------------
// Aggregation and report
// ---------------------------------------------------------------------------------------

/// One end-to-end target: a per-round statistic (and whether any round was clean) judged
/// on its median.
pub(crate) struct Target<'a> {
    pub what: &'static str,
    pub stat: &'a (Stat, bool),
    pub digits: usize,
    pub unit: &'static str,
    pub target: &'static str,
    pub ok: fn(f64) -> bool,
}

/// The end-to-end targets shared by the single-node and cross-node sections: CPU
/// per new connection and per keep-alive request above direct, rate and p50 vs direct.
pub(crate) fn targets<'a>(
    conn_cpu: &'a (Stat, bool),
    req_cpu: &'a (Stat, bool),
    conn_ratio: &'a (Stat, bool),
    p50: &'a (Stat, bool),
) -> Vec<Target<'a>> {
    vec![
        Target {
            what: "CPU per new connection above direct",
            stat: conn_cpu,
            digits: 2,
            unit: " µs",
            target: "≤ +2 µs",
            ok: |x| x <= 2.0,
        },
        Target {
            what: "CPU per keep-alive request above direct",
            stat: req_cpu,
            digits: 2,
            unit: " µs",
            target: "≤ +0.3 µs",
            ok: |x| x <= 0.3,
        },
        Target {
            what: "new connections/s vs direct",
            stat: conn_ratio,
            digits: 3,
            unit: "×",
            target: "≥ 0.97×",
            ok: |x| x >= 0.97,
        },
        Target {
            what: "p50 latency vs direct",
            stat: p50,
            digits: 1,
            unit: " µs",
            target: "within 2 µs",
            ok: |x| x <= 2.0,
        },
    ]
}

/// A target missed, for the caller's finding: the median as shown, the samples.
pub(crate) struct Miss {
    pub what: &'static str,
    pub value: String,
    pub unit: &'static str,
    pub target: &'static str,
    pub samples: String,
}

/// Put each target with data in the results table as `{label}: {what}` (judged only when a
/// round was clean); returns the missed ones.
pub(crate) fn judge(ctx: &mut Ctx, sec: &str, label: &str, items: Vec<Target<'_>>) -> Vec<Miss> {
    let mut missed = Vec::new();
    for t in items {
        let s = &t.stat.0;
        if s.n == 0 {
            continue;
        }
        let shown = if t.unit == "×" {
            format!("{}×", s.show(t.digits))
        } else {
            format!("{}{}", fmt_signed(s.median, t.digits), t.unit)
        };
        let met = t.stat.1.then(|| (t.ok)(s.median));
        let result = if t.stat.1 {
            format!("{shown} ({} clean rounds)", s.n)
        } else {
            format!("{shown} (every round disturbed: not judged)")
        };
        ctx.out
            .check(sec, &format!("{label}: {}", t.what), result, t.target, met);
        if met == Some(false) {
            missed.push(Miss {
                what: t.what,
                value: if t.unit == "×" {
                    fmt_num(s.median, 3)
                } else {
                    fmt_signed(s.median, t.digits)
                },
                unit: t.unit,
                target: t.target,
                samples: s
                    .samples
                    .iter()
                    .map(|x| fmt_num(*x, 2))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    missed
}

pub(crate) fn f(v: &Value, load: &str, field: &str) -> f64 {
    v[load][field].as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn clean(v: &Value, load: &str) -> bool {
    v[load]["disturbed"] != true && v[load].get("error").is_none()
}

/// Per round, a value of `mode` combined by `op` with the same of `direct`, over the rounds
/// where neither run was disturbed by other work on the machine (all rounds when there is
/// no such round; `.1` is then false).
pub(crate) fn per_round(
    rounds: &[BTreeMap<&'static str, Value>],
    mode: &str,
    load: &str,
    base_load: &str,
    field: &str,
    op: fn(f64, f64) -> f64,
) -> (Stat, bool) {
    let pairs = |only_clean: bool| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| {
                let (m, d) = (r.get(mode)?, r.get("direct")?);
                if only_clean && !(clean(m, load) && clean(d, base_load)) {
                    return None;
                }
                Some(op(f(m, load, field), f(d, base_load, field)))
            })
            .filter(|x| x.is_finite())
            .collect()
    };
    let c = pairs(true);
    if c.is_empty() {
        (stat(&pairs(false)), false)
    } else {
        (stat(&c), true)
    }
}

/// Per round, `mode`'s CPU per request above direct as a share of `base`'s (both on `load`),
/// over the rounds where the three runs were clean (all rounds when none was; `.1` is then
/// false). Both balance the same tasks, so this compares like with like; 0.2 is "5× less".
pub(crate) fn share_above_direct(
    rounds: &[BTreeMap<&'static str, Value>],
    mode: &str,
    base: &str,
    load: &str,
) -> (Stat, bool) {
    let shares = |only_clean: bool| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| {
                let (m, b, d) = (r.get(mode)?, r.get(base)?, r.get("direct")?);
                if only_clean && !(clean(m, load) && clean(b, load) && clean(d, load)) {
                    return None;
                }
                let dd = f(d, load, "cpu_us_per_req");
                let (mm, bb) = (
                    f(m, load, "cpu_us_per_req") - dd,
                    f(b, load, "cpu_us_per_req") - dd,
                );
                (bb > 0.0).then(|| mm / bb)
            })
            .filter(|x| x.is_finite())
            .collect()
    };
    let c = shares(true);
    if c.is_empty() {
        (stat(&shares(false)), false)
    } else {
        (stat(&c), true)
    }
}

/// The like-for-like form of the per-connection target: mesh's CPU per new connection
/// above direct at most a fifth of iptables' (and a fourteenth of HAProxy's), each balancing
/// the same three tasks.
pub(crate) fn share_targets<'a>(
    ipt: &'a (Stat, bool),
    haproxy: Option<&'a (Stat, bool)>,
) -> Vec<Target<'a>> {
    let mut v = vec![Target {
        what: "CPU per new connection above direct, as a share of iptables'",
        stat: ipt,
        digits: 3,
        unit: "×",
        target: "≤ 0.2× (5× less)",
        ok: |x| x <= 0.2,
    }];
    if let Some(h) = haproxy {
        v.push(Target {
            what: "CPU per new connection above direct, as a share of HAProxy's",
            stat: h,
            digits: 3,
            unit: "×",
            target: "≤ 0.071× (14× less)",
            ok: |x| x <= 1.0 / 14.0,
        });
    }
    v
}

/// A mode's own figure over rounds, undisturbed runs preferred.
pub(crate) fn of(
    rounds: &[BTreeMap<&'static str, Value>],
    mode: &str,
    load: &str,
    field: &str,
) -> Stat {
    let vals = |only_clean: bool| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| r.get(mode))
            .filter(|v| !only_clean || clean(v, load))
            .map(|v| f(v, load, field))
            .filter(|x| x.is_finite())
            .collect()
    };
    let c = vals(true);
    if c.is_empty() {
        stat(&vals(false))
    } else {
        stat(&c)
    }
}

pub fn run(ctx: &mut Ctx) -> Section {
    // Repeats of disturbed runs stop after this budget (--quick: 40 s; full: 5 min).
    ctx.retry_until = Some(Instant::now() + Duration::from_secs(if ctx.quick { 40 } else { 300 }));
    let mut bed = Bed::new(ctx, 3);
    let mut rounds: Vec<BTreeMap<&'static str, Value>> = Vec::new();
    for round in 0..ctx.e2e_rounds {
        let mut r = BTreeMap::new();
        for mode in MODES {
            util::check_interrupt();
            let t = Instant::now();
            // The profiles come from the second round, in the full run only (--quick stays
            // within its 3 minutes).
            let v = run_mode(ctx, &mut bed, mode, round == 1 && !ctx.quick);
            util::log(
                ctx.start,
                format!(
                    "e2e: round {} {:<9} close {:>7} conn/s, keep-alive {:>7} req/s, p50 {:>5} µs, bulk {:>5} Gbit/s ({})",
                    round + 1,
                    mode.key(),
                    fmt_num(f(&v, "close", "rps"), 0),
                    fmt_num(f(&v, "keepalive", "rps"), 0),
                    fmt_num(f(&v, "latency", "p50_us"), 1),
                    fmt_num(f(&v, "bulk", "gbit_s"), 2),
                    util::fmt_dur(t.elapsed())
                ),
            );
            r.insert(mode.key(), v);
        }
        rounds.push(r);
    }
    drop(bed);
    ctx.retry_until = None;
    report(ctx, rounds)
}

fn report(ctx: &mut Ctx, rounds: Vec<BTreeMap<&'static str, Value>>) -> Section {
    let sec = "2. End to end";
    let ratio: fn(f64, f64) -> f64 = |a, b| a / b;
    let diff: fn(f64, f64) -> f64 = |a, b| a - b;
    // Rows: every mode, plus the mesh one-backend runs.
    let mut variants: Vec<(String, &str, &str, String)> = Vec::new(); // (label, mode, suffix, title)
    for m in MODES {
        variants.push((m.key().into(), m.key(), "", m.title().into()));
        if m.mesh() {
            variants.push((
                format!("{}-1be", m.key()),
                m.key(),
                "_1be",
                format!("{}, one backend (like direct)", m.title()),
            ));
        }
    }
    let mut rows_conn = Vec::new();
    let mut rows_ka = Vec::new();
    let mut rows_lat = Vec::new();
    let mut rows_bulk = Vec::new();
    let mut jmodes = serde_json::Map::new();
    let mut dirty_cmp = 0;
    for (label, mode, sfx, title) in &variants {
        let close = format!("close{sfx}");
        let ka = format!("keepalive{sfx}");
        let lat = format!("latency{sfx}");
        let is_direct = *mode == "direct";
        let c_rps = of(&rounds, mode, &close, "rps");
        let c_ratio = per_round(&rounds, mode, &close, "close", "rps", ratio);
        let c_cpu = of(&rounds, mode, &close, "cpu_us_per_req");
        let c_cpu_d = per_round(&rounds, mode, &close, "close", "cpu_us_per_req", diff);
        let k_rps = of(&rounds, mode, &ka, "rps");
        let k_ratio = per_round(&rounds, mode, &ka, "keepalive", "rps", ratio);
        let k_cpu = of(&rounds, mode, &ka, "cpu_us_per_req");
        let k_cpu_d = per_round(&rounds, mode, &ka, "keepalive", "cpu_us_per_req", diff);
        let p50 = of(&rounds, mode, &lat, "p50_us");
        let p50_d = per_round(&rounds, mode, &lat, "latency", "p50_us", diff);
        let p99 = of(&rounds, mode, &lat, "p99_us");
        let mark = |c: &(Stat, bool)| if c.1 || c.0.n == 0 { "" } else { " †" };
        let rel = |c: &(Stat, bool), d: usize| {
            if is_direct || c.0.n == 0 {
                "–".to_string()
            } else {
                format!("{}{}", c.0.show(d), mark(c))
            }
        };
        let rels = |c: &(Stat, bool), d: usize| {
            let s = &c.0;
            if is_direct || s.n == 0 {
                "–".to_string()
            } else if s.n <= 1 {
                format!("{}{}", fmt_signed(s.median, d), mark(c))
            } else {
                format!(
                    "{} ({}…{}){}",
                    fmt_signed(s.median, d),
                    fmt_signed(s.min, d),
                    fmt_signed(s.max, d),
                    mark(c)
                )
            }
        };
        if !is_direct {
            dirty_cmp += [&c_ratio, &c_cpu_d, &k_ratio, &k_cpu_d, &p50_d]
                .iter()
                .filter(|c| !c.1 && c.0.n > 0)
                .count();
        }
        rows_conn.push(vec![
            title.clone(),
            c_rps.show(0),
            rel(&c_ratio, 3),
            c_cpu.show(1),
            rels(&c_cpu_d, 2),
        ]);
        rows_ka.push(vec![
            title.clone(),
            k_rps.show(0),
            rel(&k_ratio, 3),
            k_cpu.show(2),
            rels(&k_cpu_d, 2),
        ]);
        if p50.n > 0 {
            rows_lat.push(vec![
                title.clone(),
                p50.show(1),
                rels(&p50_d, 1),
                p99.show(1),
            ]);
        }
        let mut jm = json!({
            "title": title,
            "new_conn_per_s": c_rps, "new_conn_ratio_vs_direct": c_ratio.0, "new_conn_ratio_clean": c_ratio.1,
            "cpu_us_per_conn": c_cpu, "cpu_us_per_conn_above_direct": c_cpu_d.0, "cpu_us_per_conn_above_direct_clean": c_cpu_d.1,
            "keepalive_req_per_s": k_rps, "keepalive_ratio_vs_direct": k_ratio.0, "keepalive_ratio_clean": k_ratio.1,
            "cpu_us_per_req": k_cpu, "cpu_us_per_req_above_direct": k_cpu_d.0, "cpu_us_per_req_above_direct_clean": k_cpu_d.1,
            "p50_us": p50, "p50_us_above_direct": p50_d.0, "p50_clean": p50_d.1, "p99_us": p99,
        });
        let b_ratio = per_round(&rounds, mode, "bulk", "bulk", "gbit_s", ratio);
        if sfx.is_empty() {
            let bulk = of(&rounds, mode, "bulk", "gbit_s");
            rows_bulk.push(vec![title.clone(), bulk.show(2), rel(&b_ratio, 3)]);
            jm["bulk_gbit_s"] = json!(bulk);
            jm["bulk_ratio_vs_direct"] = json!(b_ratio.0);
            jm["bulk_ratio_clean"] = json!(b_ratio.1);
        }
        // Checks for mesh: judged on undisturbed rounds only.
        if mode.starts_with("mesh") {
            let one = !sfx.is_empty();
            let name = if one {
                format!("{mode} (1 backend)")
            } else {
                mode.to_string()
            };
            let share_ipt = share_above_direct(&rounds, mode, "iptables", "close");
            let share_hap = share_above_direct(&rounds, mode, "haproxy", "close");
            let mut items = targets(&c_cpu_d, &k_cpu_d, &c_ratio, &p50_d);
            if !one {
                items.extend(share_targets(&share_ipt, Some(&share_hap)));
                jm["cpu_us_per_conn_above_direct_share_of_iptables"] = json!(share_ipt.0);
                jm["cpu_us_per_conn_above_direct_share_of_haproxy"] = json!(share_hap.0);
                items.push(Target {
                    what: "bulk (1 stream) vs direct",
                    stat: &b_ratio,
                    digits: 3,
                    unit: "×",
                    target: "≥ 0.97×",
                    ok: |x| x >= 0.97,
                });
            }
            for miss in judge(ctx, sec, &name, items) {
                let what = miss.what;
                let mut msg = format!(
                    "{name}: {what} is {}{} (target {}; clean rounds: {}).",
                    miss.value, miss.unit, miss.target, miss.samples
                );
                if *mode == "mesh-xdp" && !what.starts_with("bulk") && !what.starts_with("p50") {
                    msg.push_str(
                        " XDP on a veth has a fixed tax (frames copied into a page for the XDP buffer, redirected \
                         frames rebuilt into skbs; shared/reference/xdp-on-veth.md measured ≈ +7 µs per connection \
                         for a do-nothing XDP program); the TC hook on the same bed is the like-for-like figure \
                         without it.",
                    );
                }
                if what.starts_with("bulk") && *mode == "mesh-xdp" {
                    msg.push_str(
                        " Attaching XDP to a veth turns GSO off on its peer (shared/reference/xdp-on-veth.md): \
                         the hook, not the LB.",
                    );
                }
                ctx.out.finding(msg);
            }
        }
        jmodes.insert(label.clone(), jm);
    }
    // Round-robin evenness.
    let mut rr_rows = Vec::new();
    for m in MODES.iter().filter(|m| **m != Mode::Direct) {
        let tallies: Vec<String> = rounds
            .iter()
            .filter_map(|r| r.get(m.key()))
            .map(|v| {
                let t = v["rr"]["tally"].as_object().cloned().unwrap_or_default();
                t.iter()
                    .map(|(k, n)| format!("{k}:{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let even = rounds.iter().filter_map(|r| r.get(m.key())).all(|v| {
            let t = v["rr"]["tally"].as_object().cloned().unwrap_or_default();
            t.len() == 3 && t.values().all(|n| n.as_u64() == Some(10))
        });
        let alternating = rounds.iter().filter_map(|r| r.get(m.key())).all(|v| {
            let s: Vec<&str> = v["rr"]["sequence"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            s.windows(2).all(|w| w[0] != w[1])
        });
        rr_rows.push(vec![
            m.title().to_string(),
            tallies.join(" / "),
            if even { "yes".into() } else { "**no**".into() },
            if alternating {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
        if m.mesh() {
            ctx.out.check(
                sec,
                &format!("{}: 30 requests over 3 tasks", m.key()),
                if even {
                    "10/10/10 every round".into()
                } else {
                    tallies.join(" / ")
                },
                "exactly even",
                Some(even),
            );
            if !even {
                ctx.out.finding(format!(
                    "{}: round-robin is not exactly even: {}",
                    m.key(),
                    tallies.join(" / ")
                ));
            }
        }
    }
    // Interference from other work on the machine.
    let loads: Vec<&Value> = rounds
        .iter()
        .flat_map(|r| r.values())
        .flat_map(|v| v.as_object().into_iter().flat_map(|o| o.values()))
        .filter(|x| x.get("attempt").is_some())
        .collect();
    let bg = stat(
        &loads
            .iter()
            .filter_map(|x| x["foreign_cpus"].as_f64())
            .collect::<Vec<_>>(),
    );
    let retried = loads
        .iter()
        .filter(|x| x["attempt"].as_u64() > Some(1))
        .count();
    let disturbed = loads.iter().filter(|x| x["disturbed"] == true).count();
    if disturbed > 0 {
        ctx.out.finding(format!(
            "e2e: {disturbed} of {} load runs stayed disturbed by other work on the machine after {} attempts \
             (foreign processes used > 5% of a CPU during the run); comparisons use the rounds where both runs \
             were clean, {dirty_cmp} comparisons had none (marked † in section 2, not judged).",
            loads.len(),
            ctx.e2e_attempts
        ));
    }
    // The noise floor: how much direct alone moves between (clean) rounds.
    let spread = |load: &str, field: &str| {
        let all = |only_clean: bool| -> Vec<f64> {
            rounds
                .iter()
                .filter_map(|r| r.get("direct"))
                .filter(|v| !only_clean || clean(v, load))
                .map(|v| f(v, load, field))
                .filter(|x| x.is_finite())
                .collect()
        };
        let c = all(true);
        let s = if c.len() >= 2 {
            stat(&c)
        } else {
            stat(&all(false))
        };
        (s.max - s.min, s)
    };
    let (sc, sc_s) = spread("close", "cpu_us_per_req");
    let (sk, sk_s) = spread("keepalive", "cpu_us_per_req");
    let (sl, _) = spread("latency", "p50_us");
    let (sr, sr_s) = spread("close", "rps");
    let noise = format!(
        "direct alone varies between rounds by {} µs CPU per connection ({}), {} µs per keep-alive request ({}), \
         {} µs p50 and {}% in connections/s",
        fmt_num(sc, 1),
        sc_s.show(1),
        fmt_num(sk, 2),
        sk_s.show(2),
        fmt_num(sl, 1),
        fmt_num(100.0 * sr / sr_s.median, 0)
    );
    if sc > 4.0 || sk > 0.6 || sr / sr_s.median > 0.06 {
        ctx.out.finding(format!(
            "e2e noise floor: {noise}. Differences of the size of the targets (2 µs per connection, 0.3 µs per \
             request, 3% in rate) are below what this run can resolve on this shared 2-vCPU machine; the per-round \
             figures are in results.json."
        ));
    }
    // How mesh balanced the connections of the close runs.
    let mut nf_rows = Vec::new();
    for (mode, sfx) in [
        ("mesh-xdp", ""),
        ("mesh-xdp", "_1be"),
        ("mesh-tc", ""),
        ("mesh-tc", "_1be"),
    ] {
        let mut shares = Vec::new();
        let mut reused = Vec::new();
        for r in &rounds {
            let Some(x) = r.get(mode).map(|m| &m[format!("close{sfx}")]) else {
                continue;
            };
            let (Some(nf), Some(req)) = (x["new_flows"].as_f64(), x["requests"].as_f64()) else {
                continue;
            };
            shares.push(nf / req);
            if let Some(re) = x["reopened"].as_f64() {
                reused.push(re / req);
            }
        }
        if !shares.is_empty() {
            nf_rows.push(vec![
                format!("{mode}{}", if sfx.is_empty() { "" } else { " (1 backend)" }),
                stat(&shares).show(3),
                if reused.is_empty() {
                    "–".into()
                } else {
                    stat(&reused).show(3)
                },
            ]);
        }
    }
    let errs: Vec<String> = rounds
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.iter().flat_map(move |(m, v)| {
                v.as_object()
                    .into_iter()
                    .flat_map(|o| o.iter())
                    .filter_map(move |(load, x)| {
                        let e = x["error"].as_str().map(str::to_string).or_else(|| {
                            x["errors"]
                                .as_u64()
                                .filter(|n| *n > 0)
                                .map(|n| format!("{n} socket errors or non-2xx"))
                        })?;
                        Some(format!("round {} {m} {load}: {e}", i + 1))
                    })
            })
        })
        .collect();
    for e in errs.iter().take(10) {
        ctx.out.finding(format!("e2e: {e}"));
    }

    let mut md = String::new();
    md.push_str(&format!(
        "client ns → node ns → task namespaces running nginx (one worker, `return 200 \"taskN\\n\"`, keep-alive, no \
         access log). `web` = tasks 1–3 (published 8080); `one` = task 4 (published 8081, and 5201 for iperf3), so \
         bulk and the one-backend runs go to a single task in every mode. `direct` is the client talking to task 4 \
         through the node's kernel forwarding, no load balancer. {} rounds, modes alternated within each round \
         (direct, iptables, nft, haproxy, mesh-xdp, mesh-tc); {} s per load{}. wrk pinned to CPU 0, nginx/iperf3 -s/\
         haproxy/the agent to CPU 1. CPU = busy time of both CPUs (user+nice+system+irq+softirq, /proc/stat) over \
         the run divided by requests served; \"× direct\" and \"above direct\" are computed per round, then the \
         median. Fresh client source address per run, node conntrack flushed between modes, nft tables deleted (not \
         flushed). Task interfaces have the same layout in every mode (bridge + veth, MTU 1450, GRO on in the task); \
         the client has TX checksum offload (and so TSO) off in every mode, which XDP redirect on a veth needs, so \
         bulk figures are for MTU-sized segments.\n\n\
         Other work on the machine is measured during each run (CPU time of processes that are not the benchmark's): \
         a run where it exceeds 5% of a CPU is repeated (up to {} attempts, the least disturbed kept); comparisons \
         use only the rounds where both runs were clean (†: no such round, all rounds shown, not judged). Foreign \
         CPU per run: median {} CPUs (max {}); {} runs were repeated, {} stayed disturbed. Noise floor: {}.\n\n\
         **Docker Swarm cannot forward here**: its routing mesh needs IPVS (`ip_vs`), which this kernel does not \
         provide{}, so Swarm is represented by the kube-proxy-style iptables baseline and by haproxy.\n\n",
        ctx.e2e_rounds,
        ctx.e2e_secs,
        util::load_note(ctx.e2e_secs),
        ctx.e2e_attempts,
        fmt_num(bg.median, 3),
        fmt_num(bg.max, 3),
        retried,
        disturbed,
        noise,
        if std::path::Path::new("/proc/net/ip_vs").exists() { " (NOTE: /proc/net/ip_vs exists on this run)" } else { " (no /proc/net/ip_vs)" }
    ));
    md.push_str(&util::md_load_tables(
        &rows_conn,
        &rows_ka,
        &rows_lat,
        if ctx.quick {
            "; --quick leaves out the one-backend runs"
        } else {
            ""
        },
    ));
    let titles: Vec<(&str, &str)> = MODES.iter().map(|m| (m.key(), m.title())).collect();
    md.push_str(&util::md_profile_table(&rounds, &titles));
    md.push_str(&format!(
        "\n**Bulk, one TCP stream** ({}, to task 4 in every mode)\n\n",
        if ctx.e2e_secs.fract() == 0.0 {
            format!("iperf3 -t {}", ctx.e2e_secs)
        } else {
            format!(
                "iperf3 -n {}M: a byte count, as iperf3 counts whole seconds only",
                (ctx.e2e_secs * 512.0).round()
            )
        }
    ));
    md.push_str(&md_table(&["mode", "Gbit/s", "× direct"], &rows_bulk));
    md.push_str("\n**Round robin**: 30 sequential requests (one curl, a new connection each) to the 3-task service, answers per task, each round\n\n");
    md.push_str(&md_table(
        &[
            "mode",
            "per round",
            "exactly even",
            "consecutive answers differ",
        ],
        &rr_rows,
    ));
    md.push_str(
        "\n**How mesh balanced the `Connection: close` runs**: share of connections that took the new-flow path \
         (verdict counters), and the share of connections whose SYN reused the client port of a connection the \
         client had closed while its entries were still in mesh's conntrack (`reopened`: balanced again as a new \
         flow, as IPVS and the kernel's conntrack do, rather than sent to the task of the old connection). Below \
         1 in the first column: SYNs that took the established path (retransmissions).\n\n",
    );
    md.push_str(&md_table(
        &[
            "mode",
            "new flows / connections",
            "of them on a reused tuple (reopened)",
        ],
        &nf_rows,
    ));
    let json = json!({
        "rounds": rounds.iter().map(|r| json!(r)).collect::<Vec<_>>(),
        "summary": jmodes,
        "foreign_cpus": bg,
        "runs_repeated": retried,
        "runs_disturbed": disturbed,
        "seconds_per_load": ctx.e2e_secs,
    });
    Section {
        key: "e2e",
        json,
        markdown: md,
    }
}
