//! Single-node routing mesh, end to end: a real agent in a node namespace, tasks in their
//! own namespaces running a real server, a client namespace on the node's external link,
//! and real clients (curl, UDP sockets).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use mesh_tests::*;

const NODE_IP: &str = "198.18.0.1";

/// One node, a client on its external link, tasks of service `web`.
struct Bed {
    node: Netns,
    client: Netns,
    tasks: Vec<(usize, Netns, Proc)>,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn task_id(i: usize) -> String {
    format!("task{i}")
}

impl Bed {
    fn new(n: usize) -> Bed {
        let node = Netns::new("n");
        let client = Netns::new("c");
        veth(
            &node,
            "ext0",
            "198.18.0.1/24",
            &client,
            "eth0",
            "198.18.0.2/24",
        );
        // XDP redirect needs complete checksums, as frames from a real wire have: a veth
        // sender with TX offload would hand over only a partial one (docs/architecture.md).
        client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        // A veth drops frames XDP redirects into it (the ICMP errors XDP answers with, sent
        // back out of this link) unless its peer has GRO on or an XDP program; a real NIC
        // has no such rule.
        client.exec("ethtool", &["-K", "eth0", "gro", "on"]);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        let mut bed = Bed {
            node,
            client,
            tasks: Vec::new(),
            state,
            _dir: dir,
        };
        for i in 1..=n {
            bed.add_task(i);
        }
        bed.write_state(&(1..=n).map(|i| (i, "running")).collect::<Vec<_>>());
        bed
    }

    /// Create task `i`'s namespace and server (what the container runtime would do).
    fn add_task(&mut self, i: usize) {
        let ns = Netns::new("t");
        let srv = whoami(&ns, &format!("web.{i}.{}", task_id(i)));
        self.tasks.push((i, ns, srv));
    }

    fn task_ns(&self, i: usize) -> &Netns {
        &self.tasks.iter().find(|(j, _, _)| *j == i).unwrap().1
    }

    fn yaml(&self, tasks: &[(usize, &str)]) -> String {
        let mut y = String::from(
            "version: 1\nnodes:\n  - {name: n1, address: 198.18.0.1}\nnetworks:\n  - {name: appnet, subnet: 10.200.0.0/24, vni: 4200}\n\
             services:\n  - name: web\n    networks: [{network: appnet, vip: 10.200.0.2}]\n    ports:\n\
             \x20     - {published: 8080, target: 80, protocol: tcp}\n      - {published: 8053, target: 7, protocol: udp}\ntasks:\n",
        );
        for (i, st) in tasks {
            y.push_str(&format!(
                "  - {{id: {}, service: web, slot: {i}, node: n1, state: {st}, netns: {}, networks: [{{network: appnet, address: 10.200.0.{}}}]}}\n",
                task_id(*i),
                self.task_ns(*i).path().display(),
                10 + i
            ));
        }
        y
    }

    fn write_state(&self, tasks: &[(usize, &str)]) {
        write_atomic(&self.state, &self.yaml(tasks));
    }

    fn agent(&self) -> Agent {
        self.agent_with(&[], None)
    }

    fn agent_with(&self, extra: &[&str], pin_dir: Option<PathBuf>) -> Agent {
        let mut e = vec!["--no-dns".to_string()];
        e.extend(extra.iter().map(|s| s.to_string()));
        Agent::start(AgentOpts {
            node: "n1",
            netns: &self.node,
            state: &self.state,
            ifaces: &["ext0"],
            extra: e,
            pin_dir,
        })
    }

    /// `n` requests from the client, each a new connection.
    fn requests(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                curl(&self.client, &format!("http://{NODE_IP}:8080/"))
                    .unwrap_or_else(|| "<no answer>".into())
            })
            .collect()
    }
}

fn name(i: usize) -> String {
    format!("web.{i}.{}", task_id(i))
}

/// Wait until new flows reach exactly the tasks `want` (the agent has followed the state).
fn wait_for_set(bed: &Bed, want: &[usize]) {
    let want: std::collections::BTreeSet<String> = want.iter().map(|i| name(*i)).collect();
    eventually(
        "new flows reach exactly the expected tasks",
        Duration::from_secs(20),
        || {
            let got: std::collections::BTreeSet<String> =
                bed.requests(want.len() * 2).into_iter().collect();
            (got == want).then_some(())
        },
    );
}

#[test]
fn thirty_requests_are_spread_evenly_round_robin_over_three_tasks() {
    let bed = Bed::new(3);
    let agent = bed.agent();
    curl_until(
        &bed.client,
        &format!("http://{NODE_IP}:8080/"),
        "published port",
    );
    // Strict round-robin from here on: 30 new connections → 10 per task, in rotation.
    let answers = bed.requests(30);
    let t = tally(&answers);
    assert_eq!(t.len(), 3, "all three tasks answer: {t:?}");
    assert!(t.values().all(|&n| n == 10), "10 each: {t:?}");
    assert!(
        answers.windows(2).all(|w| w[0] != w[1]),
        "consecutive connections rotate: {answers:?}"
    );

    // Counters in the maps, as `mesh-agent status` shows them (31 flows incl. the probe).
    let st = agent.status();
    let fe = st["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["port"] == 8080)
        .unwrap();
    assert_eq!(fe["service"], "web");
    assert_eq!(fe["flows"].as_u64().unwrap(), 31);
    let flows: Vec<u64> = fe["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flows"].as_u64().unwrap())
        .collect();
    assert_eq!(flows.iter().sum::<u64>(), 31);
    assert!(flows.iter().all(|&f| f == 10 || f == 11), "{flows:?}");
    assert!(fe["pkts_in"].as_u64().unwrap() > 0 && fe["pkts_out"].as_u64().unwrap() > 0);
    // The human-readable form names the service and tasks.
    let text = sh(
        agent_bin().to_str().unwrap(),
        &[
            "status",
            "--pin-dir",
            agent.pin_dir.to_str().unwrap(),
            "--run-dir",
            agent.run_dir.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("*:8080 (web)") && text.contains(&name(2)),
        "{text}"
    );
}

#[test]
fn a_long_lived_connection_stays_on_one_task() {
    let bed = Bed::new(3);
    let _agent = bed.agent();
    curl_until(
        &bed.client,
        &format!("http://{NODE_IP}:8080/"),
        "published port",
    );
    let answers: Vec<String> = bed.client.within(|| {
        let mut s = TcpStream::connect("198.18.0.1:8080").expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        for _ in 0..20 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).expect("response");
            let r = String::from_utf8_lossy(&buf[..n]).to_string();
            out.push(r.lines().last().unwrap_or_default().to_string());
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    });
    let t = tally(&answers);
    assert_eq!(t.len(), 1, "one connection, one task: {t:?}");
    assert!(answers[0].starts_with("web."), "{answers:?}");
}

#[test]
fn udp_published_port_balances_per_flow() {
    let bed = Bed::new(3);
    let _agent = bed.agent();
    let to: SocketAddr = "198.18.0.1:8053".parse().unwrap();
    eventually("UDP answer", Duration::from_secs(20), || {
        udp_ask(&bed.client, to, b"ping")
    });
    let answers: Vec<String> = (0..6)
        .map(|_| udp_ask(&bed.client, to, b"ping").expect("UDP answer"))
        .collect();
    assert!(answers.iter().all(|a| a.ends_with(" ping")), "{answers:?}");
    let t = tally(&answers);
    assert_eq!(t.len(), 3, "each new source port is a new flow: {t:?}");
    assert!(t.values().all(|&n| n == 2), "{t:?}");
}

/// A datagram larger than the links' MTU crosses the mesh in fragments, both ways: the
/// client's stack fragments it to its link's 1500 bytes, the first fragment is balanced and
/// leaves its ports for the later ones, the node's kernel fragments them again for the
/// task's 1450-byte link, and the task's echo comes back in fragments, each reverse-NATed.
#[test]
fn udp_datagrams_larger_than_the_mtu_cross_in_fragments_both_ways() {
    let bed = Bed::new(3);
    let to: SocketAddr = "198.18.0.1:8053".parse().unwrap();
    for hook in ["xdp", "tc"] {
        let agent = bed.agent_with(&["--hook", hook], None);
        eventually("UDP answer", Duration::from_secs(20), || {
            udp_ask(&bed.client, to, b"ping")
        });
        let mut names = Vec::new();
        for (i, size) in [3000usize, 9000, 3000, 20000, 3000, 9000]
            .into_iter()
            .enumerate()
        {
            let (name, whole) = udp_ask_large(&bed.client, to, size, b'a' + i as u8)
                .unwrap_or_else(|| panic!("{hook}: no answer to a {size}-byte datagram"));
            assert!(
                whole,
                "{hook}: the {size}-byte echo from {name} came back whole"
            );
            names.push(name);
        }
        let t = tally(&names);
        assert_eq!(
            t.len(),
            3,
            "{hook}: each datagram is a new flow, round robin: {t:?}"
        );
        let v = &agent.status()["verdicts"];
        assert!(
            v["fragment"].as_u64().unwrap_or(0) >= 12,
            "{hook}: fragments were balanced, not passed: {v}"
        );
        // A datagram that fits the client's link but not the task's, with DF (as Linux sends
        // UDP by default). XDP cannot redirect it into the task's smaller link: the client
        // gets ICMP "fragmentation needed" from the node's address, learns the MTU, and its
        // next try goes in fragments. (TC's redirect into the task's namespace delivers it.)
        let (name, whole) = eventually(
            &format!("{hook}: a 1472-byte datagram with DF answered"),
            Duration::from_secs(10),
            || udp_ask_large(&bed.client, to, 1472, b'z'),
        );
        assert!(
            whole,
            "{hook}: the 1472-byte echo from {name} came back whole"
        );
        if hook == "xdp" {
            let v = &agent.status()["verdicts"];
            assert!(
                v["drop_too_big"].as_u64().unwrap_or(0) >= 1,
                "the client was told the MTU: {v}"
            );
        }
        drop(agent);
    }
}

#[test]
fn clients_on_the_node_itself_reach_the_published_port() {
    let bed = Bed::new(3);
    let _agent = bed.agent();
    for url in ["http://127.0.0.1:8080/", "http://198.18.0.1:8080/"] {
        curl_until(&bed.node, url, "local client");
        let answers: Vec<String> = (0..6)
            .map(|_| curl(&bed.node, url).expect("answer"))
            .collect();
        let t = tally(&answers);
        assert_eq!(t.len(), 3, "{url}: {t:?}");
        assert!(t.values().all(|&n| n == 2), "{url}: {t:?}");
    }
    // UDP from the node (unconnected socket: sendmsg/recvmsg hooks); the answer appears to
    // come from the address the client sent to.
    let got = bed.node.within(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"hi", "127.0.0.1:8053").unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf).expect("UDP answer on the node");
        (String::from_utf8_lossy(&buf[..n]).to_string(), from)
    });
    assert!(got.0.ends_with(" hi"), "{got:?}");
    assert_eq!(
        got.1,
        "127.0.0.1:8053".parse::<SocketAddr>().unwrap(),
        "reverse-translated source"
    );
}

#[test]
fn scaling_the_state_file_changes_where_new_flows_go() {
    let mut bed = Bed::new(3);
    let agent = bed.agent();
    wait_for_set(&bed, &[1, 2, 3]);
    // Scale up to 5: the runtime creates two more tasks, then the state lists them.
    bed.add_task(4);
    bed.add_task(5);
    bed.write_state(&[
        (1, "running"),
        (2, "running"),
        (3, "running"),
        (4, "running"),
        (5, "running"),
    ]);
    wait_for_set(&bed, &[1, 2, 3, 4, 5]);
    let t = tally(&bed.requests(30));
    assert_eq!(t.len(), 5, "{t:?}");
    assert!(t.values().all(|&n| n == 6), "6 each: {t:?}");
    // Down to 1 (the others stopped/failed): only task 1 gets new flows.
    bed.write_state(&[
        (1, "running"),
        (2, "shutdown"),
        (3, "failed"),
        (4, "shutdown"),
        (5, "complete"),
    ]);
    wait_for_set(&bed, &[1]);
    let t = tally(&bed.requests(30));
    assert_eq!(t.get(&name(1)), Some(&30), "{t:?}");
    // The stopped tasks' interfaces are gone from their namespaces.
    for i in 2..=5 {
        let links = bed.task_ns(i).links();
        assert_eq!(
            links,
            vec!["lo".to_string()],
            "task {i} detached: {links:?}"
        );
    }
    drop(agent);
}

#[test]
fn a_malformed_state_edit_is_refused_and_traffic_keeps_flowing() {
    let bed = Bed::new(3);
    let agent = bed.agent();
    wait_for_set(&bed, &[1, 2, 3]);
    // Task 2's address outside its network's subnet.
    let bad = bed
        .yaml(&[(1, "running"), (2, "running"), (3, "running")])
        .replace("10.200.0.12", "10.99.0.12");
    write_atomic(&bed.state, &bad);
    eventually(
        "the refusal is logged, naming the field",
        Duration::from_secs(10),
        || {
            let log = agent.log();
            (log.contains("refused") && log.contains("tasks[1].networks[0].address")).then_some(())
        },
    );
    let t = tally(&bed.requests(30));
    assert_eq!(t.len(), 3, "last good tables keep serving: {t:?}");
    assert!(t.values().all(|&n| n == 10), "{t:?}");
    // Broken YAML too.
    write_atomic(&bed.state, "version: 1\nnodes: [ {name: n1\n");
    std::thread::sleep(Duration::from_millis(800));
    let t = tally(&bed.requests(9));
    assert_eq!(t.len(), 3, "{t:?}");
}

#[test]
fn shutdown_leaves_nothing_behind() {
    let bed = Bed::new(2);
    let mut agent = bed.agent();
    wait_for_set(&bed, &[1, 2]);
    let links = bed.node.links();
    assert!(
        links.iter().any(|l| l.starts_with("mbr-")),
        "bridge made: {links:?}"
    );
    assert!(
        links.iter().filter(|l| l.starts_with("mv")).count() == 2,
        "veths made: {links:?}"
    );
    let xdp =
        String::from_utf8_lossy(&bed.node.ip(&["-d", "link", "show", "ext0"]).stdout).to_string();
    assert!(xdp.contains("xdp"), "XDP attached: {xdp}");
    assert!(agent.pin_dir.join(mesh_common::maps::CT_TCP).exists());

    assert!(
        agent.stop(),
        "agent exits cleanly on SIGTERM:\n{}",
        agent.log()
    );
    let links = bed.node.links();
    assert_eq!(
        links,
        vec!["lo".to_string(), "ext0".to_string()],
        "only what the test made"
    );
    for i in 1..=2 {
        assert_eq!(bed.task_ns(i).links(), vec!["lo".to_string()], "task {i}");
    }
    let xdp =
        String::from_utf8_lossy(&bed.node.ip(&["-d", "link", "show", "ext0"]).stdout).to_string();
    assert!(!xdp.contains("prog/xdp"), "XDP detached: {xdp}");
    // Debian's bpftool 7.1 does not list tcx attachments: no mesh program may still be
    // loaded (an attached one would be; tests run one at a time).
    // (The kernel frees programs of earlier tests' deleted namespaces asynchronously.)
    eventually("every program detached", Duration::from_secs(15), || {
        let progs = String::from_utf8_lossy(&sh("bpftool", &["prog", "show"]).stdout).to_string();
        (!progs.contains("name mesh_")).then_some(())
    });
    assert!(!agent.pin_dir.exists(), "pins removed");
    assert!(
        !agent.run_dir.join("catalog.json").exists(),
        "catalog removed"
    );
    assert!(
        curl(&bed.client, &format!("http://{NODE_IP}:8080/")).is_none(),
        "nothing answers any more"
    );
}

#[test]
fn an_upgrade_hands_over_without_breaking_a_live_connection() {
    let bed = Bed::new(3);
    let mut old = bed.agent_with(&["--keep-datapath"], None);
    wait_for_set(&bed, &[1, 2, 3]);
    let pins = old.pin_dir.clone();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = bed.client.path();
    let th = std::thread::spawn(move || {
        let f = std::fs::File::open(client).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let mut s = TcpStream::connect("198.18.0.1:8080").expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ask = || -> String {
            if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                return "<write failed>".into();
            }
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string(),
                _ => "<read failed>".into(),
            }
        };
        let mut out = vec![ask()];
        go_rx.recv().unwrap(); // old agent gone
        out.push(ask());
        go_rx.recv().unwrap(); // new agent up
        out.push(ask());
        out
    });
    std::thread::sleep(Duration::from_millis(300));
    old.keep_pins = true;
    assert!(old.stop(), "clean exit:\n{}", old.log());
    assert!(
        pins.join("links").exists(),
        "attachments pinned for the next agent"
    );
    go_tx.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let new = bed.agent_with(&[], Some(pins.clone()));
    assert!(
        new.log().contains("replaced in the pinned link"),
        "{}",
        new.log()
    );
    go_tx.send(()).unwrap();
    let answers = th.join().unwrap();
    assert!(
        answers.iter().all(|a| a.starts_with("web.")),
        "served with no agent and across the hand-over: {answers:?}\n{}\n{}",
        new.log(),
        new.status()
    );
    assert_eq!(tally(&answers).len(), 1, "one task all along: {answers:?}");
    let t = tally(&bed.requests(9));
    assert_eq!(t.len(), 3, "new connections balance: {t:?}");
    drop(new);
    assert!(
        !pins.exists(),
        "the last agent (no --keep-datapath) removes everything"
    );
}
