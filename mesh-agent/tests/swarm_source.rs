//! Root only (CI runs as root): the Swarm source against a real Docker Swarm.
//!
//! A private dockerd (Debian's docker.io 20.10, see `common/dockerd.rs`) in its own network
//! namespace becomes a one-node swarm manager; the test imports a busybox image, creates an
//! overlay network `appnet` and `docker service create --name web --replicas 3 --network
//! appnet -p 8080:80 … httpd`, then checks:
//! - `initial()`: the node, `appnet` and `ingress` with their VNIs, `web` (vip, 8080→80/tcp,
//!   a VIP on each network), 3 running tasks with addresses on both networks and `netns` =
//!   the container's `SandboxKey` (as `docker inspect` reports it);
//! - `run()`: `docker service scale web=5` → a snapshot with 5 running tasks within 30 s;
//! - dockerd stopped → nothing is sent, the source keeps running;
//! - dockerd started again (same data root: the swarm comes back, its tasks are re-created)
//!   → snapshots again, up to 5 new running tasks;
//! - `initial()` started while dockerd is down keeps retrying and succeeds once it is back.
//!
//! Skipped (with the reason printed) only when dockerd cannot start here.

#[path = "common/dockerd.rs"]
mod dockerd;

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use dockerd::Dockerd;
use mesh_agent::{
    model::{EndpointMode, PortSpec, Protocol, State},
    source::{Source, SourceEvent, swarm::SwarmSource},
};
use tokio::sync::mpsc;

const IMAGE: &str = "mesh-busybox:test";

fn start_dockerd() -> Option<Dockerd> {
    match Dockerd::start() {
        Ok(d) => Some(d),
        Err(why) => {
            eprintln!("SKIPPED: dockerd cannot start here: {why}");
            None
        }
    }
}

/// Wait for a snapshot satisfying `pred` (bounded); every event seen is printed.
async fn wait_for(
    rx: &mut mpsc::Receiver<SourceEvent>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&State) -> bool,
) -> Arc<State> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(SourceEvent::Snapshot(s))) => {
                eprintln!("  snapshot: {}", summary(&s));
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            Ok(Some(SourceEvent::Rejected(why))) => eprintln!("  rejected: {why}"),
            Ok(None) => panic!("the source stopped while waiting for {what}"),
            Err(_) => panic!(
                "no snapshot with {what} within {timeout:?}; last: {}",
                last.map(|s| summary(&s)).unwrap_or_else(|| "none".into())
            ),
        }
    }
}

fn summary(s: &State) -> String {
    let mut tasks: Vec<String> = s
        .tasks
        .values()
        .map(|t| format!("{}.{}:{:?}", t.service, t.slot, t.state))
        .collect();
    tasks.sort();
    format!(
        "nodes {:?}, networks {:?}, services {:?}, tasks [{}]",
        s.nodes.keys().collect::<Vec<_>>(),
        s.networks.keys().collect::<Vec<_>>(),
        s.services.keys().collect::<Vec<_>>(),
        tasks.join(", ")
    )
}

/// Every running task of `web` has an address on both networks and a netns in dockerd's
/// exec root that exists.
fn check_running_tasks(d: &Dockerd, s: &State) {
    for t in s.running_tasks("web") {
        let appnet = t
            .address_on("appnet")
            .unwrap_or_else(|| panic!("{}: no appnet address", t.id));
        assert!(
            s.networks["appnet"].subnet.contains(&appnet),
            "{}: {appnet}",
            t.id
        );
        let ingress = t
            .address_on("ingress")
            .unwrap_or_else(|| panic!("{}: no ingress address", t.id));
        assert!(
            s.networks["ingress"].subnet.contains(&ingress),
            "{}: {ingress}",
            t.id
        );
        let netns = t
            .netns
            .as_deref()
            .unwrap_or_else(|| panic!("{}: no netns", t.id));
        assert!(
            netns.starts_with(d.exec_root().join("netns")),
            "{}: netns {} outside dockerd's exec root",
            t.id,
            netns.display()
        );
        assert!(
            netns.exists(),
            "{}: {} does not exist",
            t.id,
            netns.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_source_follows_a_real_swarm() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mesh_agent::source::swarm=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let Some(mut d) = start_dockerd() else {
        return;
    };
    let t0 = Instant::now();
    d.swarm_init();
    d.import_busybox(IMAGE);
    d.docker_ok(&["network", "create", "--driver", "overlay", "appnet"]);
    d.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "appnet",
        "--publish",
        "8080:80",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sh",
        "-c",
        "hostname > /www/index.html; exec httpd -f -p 80 -h /www",
    ]);
    d.wait_running("web", 3, Duration::from_secs(90));
    eprintln!("swarm with 3 running tasks after {:.1?}", t0.elapsed());

    // ---- initial() ---------------------------------------------------------------------
    let mut src = SwarmSource::new(&d.socket)
        .with_initial_timeout(Duration::from_secs(30))
        .with_max_backoff(Duration::from_secs(2));
    assert_eq!(
        src.describe(),
        format!("swarm:unix://{}", d.socket.display())
    );
    let t = Instant::now();
    let s = src
        .initial()
        .await
        .unwrap_or_else(|e| panic!("initial(): {e}"));
    eprintln!("initial() took {:.1?}: {}", t.elapsed(), summary(&s));

    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let node = mesh_agent::source::swarm::map::label(&hostname).unwrap();
    assert_eq!(s.nodes.len(), 1, "{:?}", s.nodes);
    assert_eq!(src.local_node(), Some(node.as_str()));
    assert_eq!(s.nodes[&node].address, Dockerd::ADDRESS);

    let names: Vec<&str> = s.networks.keys().map(String::as_str).collect();
    assert_eq!(names, ["appnet", "ingress"]);
    // Swarm allocates VNIs from 4096 upwards: ingress first.
    assert_eq!(s.networks["ingress"].vni, 4096);
    assert!(
        s.networks["appnet"].vni > 4096,
        "{:?}",
        s.networks["appnet"]
    );
    for n in s.networks.values() {
        assert!(n.subnet.contains(&n.gateway), "{n:?}");
    }

    let web = &s.services["web"];
    assert_eq!(web.endpoint_mode, EndpointMode::Vip);
    assert_eq!(
        web.ports,
        [PortSpec {
            published: 8080,
            target: 80,
            protocol: Protocol::Tcp
        }]
    );
    let nets: Vec<&str> = web.networks.iter().map(|n| n.network.as_str()).collect();
    assert_eq!(nets, ["ingress", "appnet"]);
    for n in &web.networks {
        let vip = n.vip.unwrap_or_else(|| panic!("no VIP on {}", n.network));
        assert!(
            s.networks[&n.network].subnet.contains(&vip),
            "{vip} on {}",
            n.network
        );
    }

    let running: Vec<_> = s.running_tasks("web").collect();
    assert_eq!(running.len(), 3, "{}", summary(&s));
    let slots: Vec<u32> = running.iter().map(|t| t.slot).collect();
    assert_eq!(slots, [1, 2, 3]);
    check_running_tasks(&d, &s);
    // netns is exactly the container's SandboxKey; addresses are docker's.
    for t in &running {
        let cid = d.docker_ok(&[
            "inspect",
            "--format",
            "{{.Status.ContainerStatus.ContainerID}}",
            &t.id,
        ]);
        let key = d.docker_ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            cid.trim(),
        ]);
        assert_eq!(
            t.netns.as_deref(),
            Some(Path::new(key.trim())),
            "task {}",
            t.id
        );
        let ip = d.docker_ok(&[
            "inspect",
            "--format",
            "{{(index .NetworkSettings.Networks \"appnet\").IPAddress}}",
            cid.trim(),
        ]);
        assert_eq!(
            t.address_on("appnet"),
            Some(ip.trim().parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(t.node, node);
    }

    // ---- run(): scale up ---------------------------------------------------------------
    let (tx, mut rx) = mpsc::channel(64);
    let handle = tokio::spawn(Box::new(src).run(tx));
    // Nothing changed since initial(): nothing is sent.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await;
    assert!(
        quiet.is_err(),
        "unexpected event before any change: {quiet:?}"
    );

    let t = Instant::now();
    d.docker_ok(&["service", "scale", "--detach", "web=5"]);
    let s5 = wait_for(
        &mut rx,
        Duration::from_secs(30),
        "5 running web tasks",
        |s| s.running_tasks("web").count() == 5,
    )
    .await;
    eprintln!(
        "5 running tasks seen {:.1?} after `docker service scale`",
        t.elapsed()
    );
    check_running_tasks(&d, &s5);
    let slots: Vec<u32> = s5.running_tasks("web").map(|t| t.slot).collect();
    assert_eq!(slots, [1, 2, 3, 4, 5]);

    // ---- the manager goes away ---------------------------------------------------------
    let t = Instant::now();
    d.stop();
    eprintln!("dockerd stopped in {:.1?}", t.elapsed());
    // What was sent while dockerd was shutting down (it stops the containers) is drained;
    // from now on nothing may come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(ev) = rx.try_recv() {
        eprintln!(
            "  (during the shutdown) {}",
            match &ev {
                SourceEvent::Snapshot(s) => summary(s),
                SourceEvent::Rejected(w) => w.clone(),
            }
        );
    }
    let quiet = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(quiet.is_err(), "event while dockerd is down: {quiet:?}");
    assert!(
        !handle.is_finished(),
        "the source stopped while dockerd was down"
    );

    // ---- and comes back ----------------------------------------------------------------
    let t = Instant::now();
    d.restart();
    eprintln!("dockerd answering again after {:.1?}", t.elapsed());
    let old: Vec<String> = s5.running_tasks("web").map(|t| t.id.clone()).collect();
    let first = wait_for(
        &mut rx,
        Duration::from_secs(30),
        "any change after the restart",
        |_| true,
    )
    .await;
    eprintln!("first snapshot {:.1?} after the restart", t.elapsed());
    assert!(first.services.contains_key("web"));
    let back = wait_for(
        &mut rx,
        Duration::from_secs(90),
        "5 new running web tasks",
        |s| {
            s.running_tasks("web").count() == 5
                && s.running_tasks("web").all(|t| !old.contains(&t.id))
        },
    )
    .await;
    eprintln!("5 new running tasks {:.1?} after the restart", t.elapsed());
    check_running_tasks(&d, &back);

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("run() ends when its receiver is dropped")
        .expect("run() panicked");

    // ---- initial() waits for a manager that is not there yet -----------------------------
    d.stop();
    let socket = d.socket.clone();
    let waiting = tokio::spawn(async move {
        let mut src = SwarmSource::new(socket).with_initial_timeout(Duration::from_secs(60));
        let t = Instant::now();
        (src.initial().await, t.elapsed())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "initial() gave up while dockerd was down"
    );
    d.restart();
    let (got, took) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("initial() did not return")
        .expect("initial() panicked");
    let s = got.unwrap_or_else(|e| panic!("initial() after the restart: {e}"));
    eprintln!("initial() succeeded after {took:.1?}: {}", summary(&s));
    assert!(s.services.contains_key("web"));
    drop(d);
}
