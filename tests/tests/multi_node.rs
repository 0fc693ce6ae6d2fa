//! Multi-node: 3 nodes with one agent each, 2 overlay networks, tasks spread across nodes.
//! A published port on any node reaches tasks on every node; tasks reach services through
//! their VIP wherever the tasks run; networks stay isolated.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{cluster::*, *};

fn cluster() -> Cluster {
    cluster_with(&[])
}

fn cluster_with(agent_args: &[&str]) -> Cluster {
    let nets = vec![
        NetDef {
            name: "webnet".into(),
            octet: 231,
            vni: 4231,
        },
        NetDef {
            name: "dbnet".into(),
            octet: 232,
            vni: 4232,
        },
    ];
    let svcs = sample_services();
    let mut c = Cluster::new(3, nets, svcs);
    // web: 5 tasks over the 3 nodes; db: 1 on node 3; client: on nodes 1 and 2.
    for (slot, node) in [(1, 0), (2, 1), (3, 2), (4, 0), (5, 1)] {
        c.add_task("web", slot, node);
    }
    c.add_task("db", 1, 2);
    c.add_task("client", 1, 0);
    c.add_task("client", 2, 1);
    c.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    c.start_agents();
    c
}

fn web_names(c: &Cluster) -> BTreeSet<String> {
    c.tasks_of("web", "running")
        .iter()
        .map(|t| t.name())
        .collect()
}

/// `n` new connections from the external client to `node_ip:8080`.
fn external(c: &Cluster, node_ip: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            curl(&c.client, &format!("http://{node_ip}:8080/")).unwrap_or_else(|| "<none>".into())
        })
        .collect()
}

/// `n` new connections from a client task to web's VIP.
fn via_vip(c: &Cluster, from: &Netns, n: usize) -> Vec<String> {
    let vip = c.vip_of("web", "webnet");
    (0..n)
        .map(|_| curl(from, &format!("http://{vip}/")).unwrap_or_else(|| "<none>".into()))
        .collect()
}

fn wait_external_set(c: &Cluster, want: &BTreeSet<String>) {
    for node in &c.nodes {
        let ip = node.addr.to_string();
        eventually(
            &format!("{} serves exactly the running tasks", node.name),
            Duration::from_secs(30),
            || {
                let got: BTreeSet<String> = external(c, &ip, want.len() * 2).into_iter().collect();
                (&got == want).then_some(())
            },
        );
    }
}

#[test]
fn published_port_on_every_node_reaches_all_tasks_round_robin() {
    published_port_round_robin(cluster(), false);
}

/// The same through the TC hook, whose rewritten packets to remote tasks leave by
/// `bpf_fib_lookup` + `bpf_redirect` into the overlay's bridge (XDP hands them to the kernel).
#[test]
fn published_port_through_the_tc_hook_reaches_all_tasks_round_robin() {
    let c = cluster_with(&["--hook", "tc"]);
    published_port_round_robin(c, true);
}

fn published_port_round_robin(c: Cluster, tc: bool) {
    let want = web_names(&c);
    assert_eq!(want.len(), 5);
    wait_external_set(&c, &want);
    for node in &c.nodes {
        let t = tally(&external(&c, &node.addr.to_string(), 30));
        assert_eq!(t.len(), 5, "{}: {t:?}", node.name);
        assert!(t.values().all(|&n| n == 6), "{}: 6 each: {t:?}", node.name);
    }
    // UDP through the published port, to local and remote tasks.
    let to: SocketAddr = format!("{}:8007", c.nodes[2].addr).parse().unwrap();
    let answers: Vec<String> = (0..10)
        .map(|_| udp_ask(&c.client, to, b"ping").unwrap_or_default())
        .collect();
    let names: BTreeSet<String> = answers
        .iter()
        .filter_map(|a| a.strip_suffix(" ping").map(String::from))
        .collect();
    assert_eq!(names, want, "UDP reaches every task: {answers:?}");
    // Counters on one node: remote backends are marked, SNAT counted.
    let st = c.agent(2).status();
    let fe = st["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["port"] == 8080)
        .unwrap();
    assert_eq!(fe["backends"].as_array().unwrap().len(), 5);
    assert!(st["verdicts"]["snat"].as_u64().unwrap() > 0);
    if tc {
        // Every rewritten packet was sent on by the program itself, none left to the kernel.
        assert_eq!(st["verdicts"]["pass_rewritten"], 0, "{}", st["verdicts"]);
        assert!(st["verdicts"]["redirect"].as_u64().unwrap() > 0);
    }
    // Datagrams larger than the MTU, in fragments both ways: the client's 1500-byte fragments
    // are balanced on the first one's ports and handed to the kernel, which fragments them
    // again for the overlay; the tasks' fragmented echoes are reverse-NATed on their way back.
    let mut names = BTreeSet::new();
    for i in 0..10u8 {
        let (name, whole) = udp_ask_large(&c.client, to, 4000, b'a' + i)
            .unwrap_or_else(|| panic!("no answer to datagram {i} of 4000 bytes"));
        assert!(
            whole,
            "the echo of datagram {i} from {name} came back whole"
        );
        names.insert(name);
    }
    assert_eq!(
        names, want,
        "large UDP datagrams reach every task, local and remote"
    );
    assert!(
        c.agent(2).status()["verdicts"]["fragment"]
            .as_u64()
            .unwrap()
            >= 20
    );
    // Datagrams that fit the client's link but not the overlay's, with DF (as Linux sends
    // UDP): the node answers "fragmentation needed" from the address the client sent to, the
    // client learns the MTU and sends in fragments from then on.
    for i in 0..5u8 {
        let (name, whole) = eventually(
            &format!("a 1472-byte datagram with DF answered ({i})"),
            Duration::from_secs(10),
            || udp_ask_large(&c.client, to, 1472, b'A' + i),
        );
        assert!(whole, "the 1472-byte echo from {name} came back whole");
    }
    let v = &c.agent(2).status()["verdicts"];
    assert!(
        v["drop_too_big"].as_u64().unwrap_or(0) >= 1,
        "the client was told the MTU: {v}"
    );
}

#[test]
fn tasks_reach_services_through_their_vip_on_any_node() {
    let c = cluster();
    let want = web_names(&c);
    let client = &c.tasks_of("client", "running")[0].ns;
    eventually("VIP reaches every task", Duration::from_secs(30), || {
        let got: BTreeSet<String> = via_vip(&c, client, 10).into_iter().collect();
        (got == want).then_some(())
    });
    let t = tally(&via_vip(&c, client, 50));
    assert_eq!(t.len(), 5, "{t:?}");
    assert!(t.values().all(|&n| n == 10), "10 each: {t:?}");
    // A long TCP connection to the VIP stays on one task.
    let vip = c.vip_of("web", "webnet");
    let answers: Vec<String> = client.within(move || {
        let mut s = TcpStream::connect((vip, 80)).expect("connect to the VIP");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            s.peer_addr().unwrap().ip(),
            vip,
            "the app sees the VIP as its peer"
        );
        (0..10)
            .map(|_| {
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).expect("response");
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    });
    assert_eq!(tally(&answers).len(), 1, "{answers:?}");
    // UDP through the VIP (every port of a VIP is balanced).
    let to = SocketAddr::from((vip, 7));
    let names: BTreeSet<String> = (0..10)
        .filter_map(|_| udp_ask(client, to, b"hi"))
        .filter_map(|a| a.strip_suffix(" hi").map(String::from))
        .collect();
    assert_eq!(names, want, "UDP via the VIP");
}

#[test]
fn networks_are_isolated() {
    let c = cluster();
    let client = &c.tasks_of("client", "running")[0].ns;
    let db_vip = c.vip_of("db", "dbnet");
    let db_task = c.tasks_of("db", "running")[0].addrs[0].1;
    // The client (webnet) can reach web...
    curl_until(
        client,
        &format!("http://{}/", c.vip_of("web", "webnet")),
        "web VIP from the client",
    );
    // ...but not db's VIP (refused at connect) nor db's task (dropped).
    assert!(
        curl(client, &format!("http://{db_vip}/")).is_none(),
        "db's VIP unreachable"
    );
    assert!(
        curl(client, &format!("http://{db_task}/")).is_none(),
        "db's task unreachable"
    );
    let ping = client.run("ping", &["-c", "1", "-W", "1", &db_task.to_string()]);
    assert!(!ping.status.success(), "no ping into another network");
    let node = c.tasks_of("client", "running")[0].node;
    let st = c.agent(node).status();
    assert!(
        st["verdicts"]["drop_vip_other_network"].as_u64().unwrap() >= 1,
        "{}",
        st["verdicts"]
    );
    assert!(
        st["verdicts"]["drop_other_network"].as_u64().unwrap() >= 1,
        "{}",
        st["verdicts"]
    );
    // Tasks of one network on different nodes do reach each other (L2 over VXLAN).
    let web_remote = c
        .tasks_of("web", "running")
        .into_iter()
        .find(|t| t.node != node)
        .unwrap();
    let ping = client.run(
        "ping",
        &["-c", "2", "-W", "2", &web_remote.addrs[0].1.to_string()],
    );
    assert!(
        ping.status.success(),
        "same network across nodes: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
}

#[test]
fn scaling_and_moving_tasks_are_followed_on_every_node() {
    let mut c = cluster();
    wait_external_set(&c, &web_names(&c));
    // 5 → 8.
    for (slot, node) in [(6, 2), (7, 0), (8, 1)] {
        c.add_task("web", slot, node);
    }
    c.write_state();
    let want = web_names(&c);
    assert_eq!(want.len(), 8);
    wait_external_set(&c, &want);
    let t = tally(&external(&c, &c.nodes[1].addr.to_string(), 40));
    assert!(t.len() == 8 && t.values().all(|&n| n == 5), "{t:?}");
    // 8 → 2: keep slots 1 and 2.
    let ids: Vec<(String, u32)> = c
        .tasks_of("web", "running")
        .iter()
        .map(|t| (t.id.clone(), t.slot))
        .collect();
    for (id, slot) in &ids {
        if *slot > 2 {
            c.set_state(id, "shutdown");
        }
    }
    c.write_state();
    let want = web_names(&c);
    assert_eq!(want.len(), 2);
    wait_external_set(&c, &want);
    for node in &c.nodes {
        let got: BTreeSet<String> = external(&c, &node.addr.to_string(), 20)
            .into_iter()
            .collect();
        assert_eq!(
            got, want,
            "{}: nothing sent to a task that is gone",
            node.name
        );
    }
    // Move slot 2 to another node (Swarm: the old task shuts down, a new one starts there).
    let old = c
        .tasks_of("web", "running")
        .into_iter()
        .find(|t| t.slot == 2)
        .unwrap();
    let (old_id, old_node) = (old.id.clone(), old.node);
    c.set_state(&old_id, "shutdown");
    let new = c.add_task("web", 2, (old_node + 1) % 3);
    c.write_state();
    let want = web_names(&c);
    assert!(want.contains(&c.tasks[&new].name()));
    wait_external_set(&c, &want);
    let client = &c.tasks_of("client", "running")[1].ns;
    eventually("the VIP follows the move", Duration::from_secs(30), || {
        let got: BTreeSet<String> = via_vip(&c, client, 6).into_iter().collect();
        (got == want).then_some(())
    });
}

#[test]
fn restarting_an_agent_keeps_a_long_connection_through_it() {
    // Agents that keep their datapath (programs, maps, task interfaces) when stopped, as an
    // upgrade does.
    let mut c = cluster_with(&["--keep-datapath"]);
    wait_external_set(&c, &web_names(&c));
    let node_ip = c.nodes[0].addr;
    // A long-lived connection through node 1's published port.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<String>>();
    let client_path = c.client.path();
    let th = std::thread::spawn(move || {
        let f = std::fs::File::open(client_path).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let mut s = TcpStream::connect((node_ip, 8080)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answers = Vec::new();
        let ask = |s: &mut TcpStream| -> String {
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
        answers.push(ask(&mut s));
        rx.recv().unwrap(); // the agent restarts meanwhile
        for _ in 0..5 {
            answers.push(ask(&mut s));
            std::thread::sleep(Duration::from_millis(100));
        }
        done_tx.send(answers).unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    // Stop node 1's agent (SIGTERM), start a new one on the same pins.
    {
        let a = c.nodes[0].agent.as_mut().unwrap();
        a.keep_pins = true;
        assert!(a.stop(), "clean exit:\n{}", a.log());
    }
    c.nodes[0].agent = None;
    c.start_agent(0);
    tx.send(()).unwrap();
    let answers = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the connection thread finished");
    th.join().unwrap();
    assert!(
        answers.iter().all(|a| a.starts_with("web.")),
        "the connection survived the restart: {answers:?}"
    );
    assert_eq!(
        tally(&answers).len(),
        1,
        "and stayed on its task: {answers:?}"
    );
    // New connections work too.
    let t = tally(&external(&c, &node_ip.to_string(), 10));
    assert_eq!(t.len(), 5, "{t:?}");
}
