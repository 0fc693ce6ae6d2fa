//! `cargo xtask cluster [--nodes N]`: bring up the multi-node test bed with a sample cluster
//! and keep it up until Ctrl-C, for people to poke at. The same harness the tests use
//! (tests/src/cluster.rs): N node namespaces and a client on one underlay bridge, a real
//! agent per node, task namespaces running the whoami server. Everything is removed on exit.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use mesh_tests::cluster::{Cluster, NetDef, sample_services};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let mut nodes = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => {
                nodes = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(3)
                    .clamp(1, 16)
            }
            "-h" | "--help" => {
                println!("usage: mesh-cluster [--nodes N]   (N node namespaces, default 3)");
                return;
            }
            other => {
                eprintln!("mesh-cluster: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let on_stop = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &on_stop) }.expect("install signal handler");
    }
    let nets = vec![
        NetDef {
            name: "webnet".into(),
            octet: 251,
            vni: 4251,
        },
        NetDef {
            name: "dbnet".into(),
            octet: 252,
            vni: 4252,
        },
    ];
    let svcs = sample_services();
    let mut c = Cluster::new(nodes, nets, svcs);
    for slot in 1..=5u32 {
        c.add_task("web", slot, (slot as usize - 1) % nodes);
    }
    c.add_task("db", 1, nodes - 1);
    c.add_task("client", 1, 0);
    c.start_agents();
    let client_task = c.tasks_of("client", "running")[0].ns.name.clone();
    println!(
        "mesh cluster: {nodes} nodes on an underlay bridge, service web (5 tasks) on port 8080, VXLAN overlays"
    );
    println!(
        "  state file (edit it; every agent follows): {}",
        c.state_path.display()
    );
    for n in &c.nodes {
        println!(
            "  node {}: ip netns exec {} ...   (address {})",
            n.name, n.ns.name, n.addr
        );
    }
    println!(
        "  external client: ip netns exec {} curl -s http://{}:8080/",
        c.client.name, c.nodes[0].addr
    );
    println!(
        "  from a task, via the VIP: ip netns exec {client_task} curl -s http://{}/",
        c.vip_of("web", "webnet")
    );
    println!("  DNS in a task: ip netns exec {client_task} dig +short tasks.web");
    println!(
        "  status: mesh-agent status --pin-dir {} --run-dir {}",
        c.agent(0).pin_dir.display(),
        c.agent(0).run_dir.display()
    );
    println!("  Ctrl-C removes everything");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("mesh cluster: tearing down");
    drop(c);
}
