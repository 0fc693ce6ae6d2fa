//! Root only (CI runs as root): the embedded DNS inside a real network namespace, queried by
//! real clients (`dig` over UDP and TCP, glibc's `getent` through the written resolv.conf).
//!
//! The "upstream" is a fake resolver this test starts on 127.0.0.1 in the test's own
//! namespace; no query ever reaches the machine's real resolvers.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, OpCode},
    rr::{RData, Record, rdata::A},
};
use mesh_agent::{
    dns::{Dns, DnsConfig},
    model::{EndpointMode, Network, Service, ServiceNetwork, State, Task, TaskNetwork, TaskState},
    netns,
};

#[path = "common/cmd.rs"]
mod cmd;
use cmd::run_ok;

const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// A uniquely named network namespace with `lo` up; deleted on drop, even on panic, with
/// whatever `/etc/netns/<name>` config was left behind.
struct NetnsGuard {
    name: String,
    /// /etc/netns did not exist before: remove it again if it is empty.
    etc_netns_was_missing: bool,
}

impl NetnsGuard {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mesh-dns-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let etc_netns_was_missing = !std::path::Path::new("/etc/netns").exists();
        run_ok("ip", &["netns", "add", &name]);
        let guard = Self {
            name,
            etc_netns_was_missing,
        };
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &guard.name,
                "ip",
                "link",
                "set",
                "lo",
                "up",
            ],
        );
        guard
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }

    /// Run a command inside the namespace (blocking: call from spawn_blocking).
    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(self.etc_dir());
        if self.etc_netns_was_missing {
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// A fake upstream on 127.0.0.1 (UDP): A 192.0.2.7 for every name. Returns its address and
/// a query counter.
async fn fake_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind fake upstream");
    let addr = sock.local_addr().expect("upstream addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            h.fetch_add(1, Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.add_queries(q.queries.clone());
            if let Some(q0) = q.queries.first()
                && q0.query_type() == hickory_proto::rr::RecordType::A
            {
                r.add_answer(Record::from_rdata(
                    q0.name().clone(),
                    60,
                    RData::A(A(UPSTREAM_ANSWER)),
                ));
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, from).await;
            }
        }
    });
    (addr, hits)
}

fn state(client_netns: PathBuf) -> (State, Task) {
    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("fixture address") };
    let mut st = State::default();
    st.networks.insert(
        "appnet".into(),
        Network {
            name: "appnet".into(),
            subnet: "10.20.0.0/24".parse().expect("subnet"),
            vni: 4100,
            gateway: ip("10.20.0.1"),
        },
    );
    for (name, vip, aliases) in [
        ("web", "10.20.0.2", vec!["www".to_string()]),
        ("client", "10.20.0.3", vec![]),
    ] {
        st.services.insert(
            name.into(),
            Service {
                name: name.into(),
                endpoint_mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "appnet".into(),
                    vip: Some(ip(vip)),
                    aliases,
                }],
                ports: vec![],
            },
        );
    }
    let task = |id: &str, svc: &str, slot, addr: &str, netns: Option<PathBuf>| Task {
        id: id.into(),
        service: svc.into(),
        slot,
        node: "node1".into(),
        state: TaskState::Running,
        netns,
        resolv_conf: None,
        networks: vec![TaskNetwork {
            network: "appnet".into(),
            address: ip(addr),
        }],
    };
    let client = task("c1", "client", 1, "10.20.0.30", Some(client_netns));
    for t in [
        task("w1", "web", 1, "10.20.0.10", None),
        task("w2", "web", 2, "10.20.0.11", None),
        client.clone(),
    ] {
        st.tasks.insert(t.id.clone(), t);
    }
    (st, client)
}

/// Run `args` in the namespace off the runtime (the DNS server must keep running).
async fn exec(ns: &Arc<NetnsGuard>, args: &[&str]) -> String {
    let ns = ns.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ns.exec(&refs)
    })
    .await
    .expect("command thread")
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_serves_a_task_namespace_for_dig_and_libc() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root (CI runs it as root)"
    );
    let ns = Arc::new(NetnsGuard::new());
    // The task's overlay address (a veth pair inside the namespace here): glibc's
    // AI_ADDRCONFIG ignores 127.0.0.1, so without one getaddrinfo(AF_INET) would not even ask.
    for cmd in [
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ][..],
        &["ip", "addr", "add", "10.20.0.30/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
    ] {
        exec(&ns, cmd).await;
    }
    let (upstream, upstream_hits) = fake_upstream().await;
    let dns = Dns::new(DnsConfig {
        upstreams: vec![upstream],
        upstream_timeout: Duration::from_secs(1),
        forward_deadline: Duration::from_secs(2),
        search: vec!["corp.example".into()],
        ..DnsConfig::default()
    });
    let (st, client) = state(ns.path());
    dns.update(Arc::new(st));
    dns.attach(&client).await.expect("attach");
    dns.attach(&client).await.expect("re-attach is a no-op");
    assert_eq!(dns.attached(), ["c1"]);

    let resolv = ns.etc_dir().join("resolv.conf");
    let text = std::fs::read_to_string(&resolv).expect("resolv.conf written");
    let conf: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        conf,
        [
            "nameserver 127.0.0.11",
            "search corp.example",
            "options ndots:0"
        ]
    );

    let dig = ["dig", "+time=2", "+tries=1", "+short"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        dig.iter().chain(extra).copied().collect()
    };
    // UDP and TCP at 127.0.0.11 explicitly.
    assert_eq!(
        lines(&exec(&ns, &with(&["@127.0.0.11", "web"])).await),
        ["10.20.0.2"]
    );
    assert_eq!(
        lines(&exec(&ns, &with(&["+tcp", "@127.0.0.11", "web"])).await),
        ["10.20.0.2"]
    );
    assert_eq!(
        lines(&exec(&ns, &with(&["@127.0.0.11", "tasks.web"])).await),
        ["10.20.0.10", "10.20.0.11"]
    );
    assert_eq!(
        lines(&exec(&ns, &with(&["+tcp", "@127.0.0.11", "WWW.appnet"])).await),
        ["10.20.0.2"]
    );
    // No flags: dig reads the resolv.conf `ip netns exec` mounted over /etc/resolv.conf.
    assert_eq!(lines(&exec(&ns, &with(&["web"])).await), ["10.20.0.2"]);
    assert_eq!(
        lines(&exec(&ns, &with(&["-x", "10.20.0.10"])).await),
        ["web.1.w1.appnet."]
    );
    assert_eq!(
        lines(&exec(&ns, &with(&["-x", "10.20.0.2"])).await),
        ["web.appnet."]
    );
    // AAAA of a known name: NOERROR, nothing.
    let out = exec(&ns, &["dig", "+time=2", "+tries=1", "web", "AAAA"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    assert_eq!(
        upstream_hits.load(Ordering::SeqCst),
        0,
        "local names stay local"
    );
    // Anything else goes to the (fake) upstream, from the agent's namespace.
    assert_eq!(
        lines(&exec(&ns, &with(&["outside.example"])).await),
        [UPSTREAM_ANSWER.to_string()]
    );
    assert!(upstream_hits.load(Ordering::SeqCst) >= 1);

    // libc (getent) through the written resolv.conf.
    let out = exec(&ns, &["getent", "hosts", "web"]).await;
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"10.20.0.2"), "getent: {out}");
    let out = exec(&ns, &["getent", "ahostsv4", "tasks.web"]).await;
    let addrs: std::collections::BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        addrs.into_iter().collect::<Vec<_>>(),
        ["10.20.0.10", "10.20.0.11"]
    );

    let stats = dns.stats();
    assert!(stats.local >= 8, "{stats:?}");
    assert_eq!(stats.responses.servfail, 0, "{stats:?}");

    // Detach: resolv.conf and its directory gone, nothing listens any more.
    dns.detach("c1").await;
    assert!(dns.attached().is_empty());
    assert!(!resolv.exists(), "resolv.conf removed");
    assert!(!ns.etc_dir().exists(), "/etc/netns/<name> removed");
    let listening = exec(&ns, &["ss", "-H", "-lnut"]).await;
    assert!(listening.trim().is_empty(), "still listening: {listening}");
    // The address is free again: bind it ourselves inside the namespace.
    let bound = netns::run_in(&ns.path(), || {
        let udp = std::net::UdpSocket::bind("127.0.0.11:53").is_ok();
        let tcp = std::net::TcpListener::bind("127.0.0.11:53").is_ok();
        (udp, tcp)
    })
    .expect("enter namespace");
    assert_eq!(bound, (true, true));

    // Attach again after detach works (fresh listeners).
    dns.attach(&client).await.expect("attach again");
    assert_eq!(lines(&exec(&ns, &with(&["web"])).await), ["10.20.0.2"]);
    dns.shutdown().await;
    assert!(!resolv.exists());
}
