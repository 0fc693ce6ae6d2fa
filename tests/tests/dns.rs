//! Embedded DNS through a real agent: tasks resolve service names at 127.0.0.11 with real
//! clients (dig, getent through the written resolv.conf); unknown names go to an upstream
//! resolver (dnsmasq) the test runs in its own namespace, never the machine's own.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use mesh_tests::{cluster::*, *};

const UPSTREAM: &str = "198.18.0.53";

struct Bed {
    c: Cluster,
    upstream_ns: Netns,
    upstream: Option<Proc>,
}

fn bed() -> Bed {
    let nets = vec![
        NetDef {
            name: "appnet".into(),
            octet: 221,
            vni: 4221,
        },
        NetDef {
            name: "dbnet".into(),
            octet: 222,
            vni: 4222,
        },
    ];
    let svcs = vec![
        SvcDef {
            name: "web".into(),
            dnsrr: false,
            networks: vec!["appnet".into()],
            ports: vec![],
            aliases: vec!["www".into()],
        },
        SvcDef {
            name: "db".into(),
            dnsrr: false,
            networks: vec!["dbnet".into()],
            ports: vec![],
            aliases: vec![],
        },
        SvcDef {
            name: "cache".into(),
            dnsrr: true,
            networks: vec!["appnet".into()],
            ports: vec![],
            aliases: vec![],
        },
        SvcDef {
            name: "client".into(),
            dnsrr: false,
            networks: vec!["appnet".into()],
            ports: vec![],
            aliases: vec![],
        },
    ];
    let mut c = Cluster::new(1, nets, svcs);
    // The upstream resolver, on the underlay, with one record of its own.
    let upstream_ns = Netns::new("d");
    sh(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            &upstream_ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "upd",
            "netns",
            &c.underlay.name,
        ],
    );
    upstream_ns.ip(&["addr", "add", &format!("{UPSTREAM}/24"), "dev", "eth0"]);
    upstream_ns.ip(&["link", "set", "eth0", "up"]);
    c.underlay
        .ip(&["link", "set", "upd", "master", "br0", "up"]);
    let upstream = Some(start_dnsmasq(&upstream_ns));
    for slot in 1..=3 {
        c.add_task("web", slot, 0);
    }
    c.add_task("db", 1, 0);
    c.add_task("cache", 1, 0);
    c.add_task("cache", 2, 0);
    c.add_task("client", 1, 0);
    c.agent_args = vec!["--dns-upstream".into(), format!("{UPSTREAM}:53")];
    c.start_agents();
    Bed {
        c,
        upstream_ns,
        upstream,
    }
}

fn start_dnsmasq(ns: &Netns) -> Proc {
    ns.spawn(
        "dnsmasq",
        &[
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={UPSTREAM}"),
            "--address=/example.test/198.51.100.7",
            "--pid-file=",
            "--user=root",
        ],
    )
}

impl Bed {
    fn client(&self) -> &Netns {
        &self.c.tasks_of("client", "running")[0].ns
    }

    fn dig(&self, args: &[&str]) -> String {
        let mut a = vec!["+time=5", "+tries=1"];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&self.client().run("dig", &a).stdout).to_string()
    }

    /// `dig +short` answers, sorted.
    fn short(&self, args: &[&str]) -> Vec<String> {
        let mut a = vec!["+short"];
        a.extend_from_slice(args);
        let mut v: Vec<String> = self
            .dig(&a)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    fn addrs(&self, svc: &str, net: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .c
            .tasks_of(svc, "running")
            .iter()
            .map(|t| {
                t.addrs
                    .iter()
                    .find(|(n, _)| n == net)
                    .unwrap()
                    .1
                    .to_string()
            })
            .collect();
        v.sort();
        v
    }
}

fn status_of(out: &str) -> String {
    out.lines()
        .find(|l| l.contains("status:"))
        .and_then(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn tasks_resolve_services_tasks_names_and_ptr_from_their_networks() {
    let b = bed();
    let vip = b.c.vip_of("web", "appnet").to_string();
    eventually("DNS answers in the task", Duration::from_secs(20), || {
        (b.short(&["@127.0.0.11", "web"]) == std::slice::from_ref(&vip)).then_some(())
    });
    // Through the written resolv.conf, no flags; libc too.
    assert_eq!(b.short(&["web"]), std::slice::from_ref(&vip));
    let getent =
        String::from_utf8_lossy(&b.client().exec("getent", &["hosts", "web"]).stdout).to_string();
    assert!(getent.starts_with(&vip), "getent: {getent}");
    // Case, trailing dot, network suffix, alias.
    assert_eq!(b.short(&["WeB."]), std::slice::from_ref(&vip));
    assert_eq!(b.short(&["web.appnet"]), std::slice::from_ref(&vip));
    assert_eq!(b.short(&["www"]), std::slice::from_ref(&vip));
    // tasks.<service>: every running task.
    assert_eq!(b.short(&["tasks.web"]), b.addrs("web", "appnet"));
    // dnsrr: the service name is its tasks.
    assert_eq!(b.short(&["cache"]), b.addrs("cache", "appnet"));
    // Task names.
    let t =
        b.c.tasks_of("web", "running")
            .into_iter()
            .find(|t| t.slot == 2)
            .unwrap();
    let taddr = t.addrs[0].1.to_string();
    assert_eq!(
        b.short(&[&format!("web.2.{}", t.id)]),
        std::slice::from_ref(&taddr)
    );
    assert_eq!(b.short(&["web.2"]), std::slice::from_ref(&taddr));
    // PTR for a task address and for the VIP.
    let ptr = b.short(&["-x", &taddr]);
    assert_eq!(ptr, [format!("web.2.{}.appnet.", t.id)]);
    assert_eq!(b.short(&["-x", &vip]), ["web.appnet.".to_string()]);
    // AAAA for a known name: NOERROR, no answer.
    let aaaa = b.dig(&["web", "AAAA"]);
    assert_eq!(status_of(&aaaa), "NOERROR", "{aaaa}");
    assert!(b.short(&["web", "AAAA"]).is_empty());
    // A name that exists only on another network is not answered locally: it goes upstream
    // (which does not know it) — never db's VIP.
    let db = b.dig(&["db"]);
    assert!(!db.contains(&b.c.vip_of("db", "dbnet").to_string()), "{db}");
    assert_ne!(status_of(&db), "NOERROR", "{db}");
    // Over TCP too.
    assert_eq!(b.short(&["+tcp", "web"]), [vip]);
}

#[test]
fn unknown_names_go_upstream_and_a_dead_upstream_is_a_quick_servfail() {
    let mut b = bed();
    eventually(
        "upstream answers through the task's DNS",
        Duration::from_secs(20),
        || (b.short(&["www.example.test"]) == ["198.51.100.7"]).then_some(()),
    );
    b.upstream
        .take()
        .map(|mut p| p.stop(Duration::from_secs(5)));
    let started = Instant::now();
    let out = b.dig(&["+time=8", "other.example.test"]);
    let took = started.elapsed();
    assert_eq!(status_of(&out), "SERVFAIL", "{out}");
    assert!(
        took < Duration::from_secs(7),
        "SERVFAIL came quickly, not a hang: {took:?}"
    );
    // Local names keep working.
    assert_eq!(b.short(&["web"]), [b.c.vip_of("web", "appnet").to_string()]);
    let _ = &b.upstream_ns;
}

#[test]
fn scaling_shows_up_on_the_next_query_and_hostile_queries_do_not_hurt() {
    let mut b = bed();
    eventually("DNS up", Duration::from_secs(20), || {
        (b.short(&["tasks.web"]).len() == 3).then_some(())
    });
    let extra = b.c.add_task("web", 4, 0);
    let gone =
        b.c.tasks_of("web", "running")
            .into_iter()
            .find(|t| t.slot == 1)
            .unwrap()
            .id
            .clone();
    b.c.set_state(&gone, "shutdown");
    b.c.write_state();
    let want = b.addrs("web", "appnet");
    assert_eq!(want.len(), 3);
    eventually(
        "tasks.web follows the state",
        Duration::from_secs(20),
        || (b.short(&["tasks.web"]) == want).then_some(()),
    );
    let new_addr = b.c.tasks[&extra].addrs[0].1.to_string();
    assert!(b.short(&["tasks.web"]).contains(&new_addr));

    // A barrage of malformed datagrams and TCP garbage at 127.0.0.11:53 from the task.
    b.client().within(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x: u32 = 0x1234_5678;
        for i in 0..2000u32 {
            let len = (i % 700) as usize;
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            if len >= 12 && i % 3 == 0 {
                buf[4] = 0;
                buf[5] = if i % 2 == 0 { 0 } else { 9 }; // zero or many questions
            }
            let _ = s.send_to(&buf, "127.0.0.11:53");
        }
        for _ in 0..20 {
            if let Ok(mut t) = std::net::TcpStream::connect("127.0.0.11:53") {
                use std::io::Write;
                let _ = t.write_all(&[0xff, 0xff, 1, 2, 3, 4, 5]);
            }
        }
    });
    // Still answering.
    assert_eq!(b.short(&["web"]), [b.c.vip_of("web", "appnet").to_string()]);
    assert_eq!(b.short(&["tasks.web"]), want);
    let _ = Ipv4Addr::LOCALHOST;
}

#[test]
fn a_task_can_serve_on_port_53_itself() {
    let b = bed();
    let vip = b.c.vip_of("web", "appnet").to_string();
    eventually("DNS answers in the task", Duration::from_secs(20), || {
        (b.short(&["web"]) == std::slice::from_ref(&vip)).then_some(())
    });
    // The client task runs its own UDP and TCP servers on port 53 (a DNS service in a task,
    // say): the embedded DNS listens elsewhere and the socket hooks send 127.0.0.11:53 there.
    let client = b.client();
    let own = mesh_tests::Proc::spawn_in(
        client,
        &[
            "whoami",
            "--name",
            "own53",
            "--udp",
            "0.0.0.0:53",
            "--http",
            "0.0.0.0:53",
        ],
    );
    let addr = b.c.tasks_of("client", "running")[0].addrs[0].1;
    eventually(
        "the task's own port-53 server answers",
        Duration::from_secs(10),
        || {
            udp_ask(
                &b.c.tasks_of("web", "running")[0].ns,
                std::net::SocketAddr::from((addr, 53)),
                b"hi",
            )
            .filter(|a| a == "own53 hi")
        },
    );
    // ...and the embedded DNS still answers in that task, over UDP and TCP.
    assert_eq!(b.short(&["web"]), std::slice::from_ref(&vip));
    assert_eq!(b.short(&["+tcp", "web"]), [vip]);
    drop(own);
}
