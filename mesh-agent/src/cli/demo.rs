//! `mesh-agent demo`: a working single-node mesh on this machine in one command.
//!
//! It plays both roles Swarm would: the "runtime" (it creates each task's network namespace
//! and starts a `whoami` server in it) and the node agent (a real agent reading a real state
//! file). Edit the printed state file to scale: the runtime part creates or removes task
//! namespaces for tasks of node `demo` under /run/netns/mesh-demo-*, the agent follows.
//! Ctrl-C stops everything and removes what it created.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::DemoArgs;
use crate::{
    agent::{self, AgentConfig},
    attach::Netlink,
    model::{self, State},
    netns,
    source::file::FileSource,
};

/// The bundled example state.
pub const DEMO_STATE: &str = include_str!("../../assets/demo.yaml");
pub const DEMO_NODE: &str = "demo";
const NETNS_PREFIX: &str = "mesh-demo-";
const RUN_DIR: &str = "/run/mesh-demo";

/// Task namespaces and their whoami servers, as the "runtime".
struct Runtime {
    /// task id → (netns name, server process)
    tasks: BTreeMap<String, (String, Child)>,
}

impl Runtime {
    fn netns_name(path: &Path) -> Option<String> {
        let name = path
            .strip_prefix(netns::NETNS_RUN_DIR)
            .ok()?
            .to_str()?
            .to_string();
        name.starts_with(NETNS_PREFIX).then_some(name)
    }

    /// Create namespaces + servers for new tasks of the demo node, remove gone ones.
    async fn sync(&mut self, state: &State) {
        let mut want = BTreeMap::new();
        for t in state.attached_tasks_on(DEMO_NODE) {
            if let Some(ns) = t.netns.as_deref().and_then(Self::netns_name) {
                want.insert(t.id.clone(), (ns, t.name()));
            }
        }
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some((ns, mut child)) = self.tasks.remove(&id) {
                let _ = child.kill().await;
                let _ = netns::delete_named(&ns);
                info!(task = id, "task stopped");
            }
        }
        for (id, (ns, name)) in want {
            if self.tasks.contains_key(&id) {
                continue;
            }
            match start_task(&ns, &name) {
                Ok(child) => {
                    info!(task = id, netns = ns, "task started");
                    self.tasks.insert(id, (ns, child));
                }
                Err(e) => warn!(task = id, error = %e, "cannot start task"),
            }
        }
    }

    async fn stop(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for (_, (ns, mut child)) in tasks {
            let _ = child.kill().await;
            let _ = netns::delete_named(&ns);
        }
    }
}

fn start_task(ns: &str, name: &str) -> anyhow::Result<Child> {
    let path = netns::create_named(ns)?;
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let child = Command::new(exe)
        .args([
            "whoami",
            "--name",
            name,
            "--http",
            "0.0.0.0:80",
            "--udp",
            "0.0.0.0:7",
        ])
        .arg("--netns")
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the whoami server")?;
    Ok(child)
}

async fn node_address(ifaces: &[String]) -> Option<(String, Ipv4Addr)> {
    let nl = Netlink::open().ok()?;
    let idx = match ifaces.first() {
        Some(name) => nl.link(name).await.ok()??.index,
        None => nl.default_route_ifindex().await.ok()??,
    };
    let name = nl.link_by_index(idx).await.ok()??.name;
    let addr = nl
        .ipv4_addrs()
        .await
        .ok()?
        .into_iter()
        .find(|(i, _)| *i == idx)?
        .1;
    Some((name, addr))
}

pub async fn run(
    args: DemoArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let run_dir = PathBuf::from(RUN_DIR);
    std::fs::create_dir_all(&run_dir)?;
    let state_path = run_dir.join("state.yaml");
    std::fs::write(&state_path, DEMO_STATE)?;
    let initial =
        model::parse_yaml(DEMO_STATE).map_err(|e| anyhow::anyhow!("bundled demo state: {e}"))?;

    let mut rt = Runtime {
        tasks: BTreeMap::new(),
    };
    rt.sync(&initial).await;

    let mut cfg = AgentConfig::for_node(DEMO_NODE);
    cfg.interfaces = args.ifaces.clone();
    cfg.hook = args.hook;
    cfg.resync = Duration::from_millis(500);
    cfg.metrics_addr = "127.0.0.1:9464".parse().ok();
    let source = Box::new(FileSource::new(state_path.clone()));

    let (where_, addr) = node_address(&args.ifaces)
        .await
        .map(|(n, a)| (n, a.to_string()))
        .unwrap_or_else(|| ("?".into(), "NODE_IP".into()));
    println!(
        "mesh demo: service whoami (3 tasks), published tcp/8080 and udp/8053 on every address of this node"
    );
    println!("  XDP on {where_}; local clients through the socket-level LB");
    println!();
    println!("  for i in 1 2 3 4 5 6; do curl -s http://{addr}:8080; done");
    println!("  for i in 1 2 3; do curl -s http://localhost:8080; done");
    println!("  mesh-agent status --node {DEMO_NODE}");
    println!("  curl -s http://127.0.0.1:9464/metrics | grep mesh_backend_flows_total");
    println!(
        "  ip netns exec mesh-demo-1 getent hosts whoami tasks.whoami   # embedded DNS in every task"
    );
    println!(
        "  edit {} to scale (tasks of node demo, netns /run/netns/mesh-demo-N)",
        state_path.display()
    );
    println!("  Ctrl-C stops and removes everything");
    println!();

    // The runtime follows the state file too.
    let sp = state_path.clone();
    let (rt_tx, mut rt_rx) = tokio::sync::mpsc::channel::<State>(4);
    let watcher = tokio::spawn(async move {
        let mut last = String::new();
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Ok(text) = tokio::fs::read_to_string(&sp).await else {
                continue;
            };
            if text == last {
                continue;
            }
            last = text.clone();
            if let Ok(s) = model::parse_yaml(&text)
                && rt_tx.send(s).await.is_err()
            {
                return;
            }
        }
    });

    let dns: Option<Box<dyn crate::agent::TaskService>> = {
        let resolv = Path::new("/etc/resolv.conf");
        let mut cfg = if resolv.exists() {
            crate::dns::DnsConfig::from_resolv_conf(resolv).unwrap_or_default()
        } else {
            crate::dns::DnsConfig::default()
        };
        cfg.port = super::DNS_HOOKED_PORT;
        Some(Box::new(super::DnsService(crate::dns::Dns::new(cfg))))
    };
    let agent_fut = agent::run(cfg, source, dns, stop);
    tokio::pin!(agent_fut);
    let result = loop {
        tokio::select! {
            r = &mut agent_fut => break r,
            Some(s) = rt_rx.recv() => rt.sync(&s).await,
        }
    };
    watcher.abort();
    rt.stop().await;
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_dir(&run_dir);
    result.map_err(anyhow::Error::from)?;
    println!("mesh demo stopped; everything it created is removed");
    Ok(())
}
