//! Unit tests: the real handler served by hickory's `Server` on 127.0.0.1 ephemeral ports
//! (no root, no namespace), queried over UDP and TCP; fake upstreams on 127.0.0.1 too. No
//! test ever sends a query to the machine's real resolvers.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, PTR},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::*;
use crate::model::{
    EndpointMode, Network, Service, ServiceNetwork, State, Task, TaskNetwork, TaskState,
};

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// The address every fake upstream answers with: seeing it means "forwarded".
const FORWARDED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("fixture address")
}

fn network(name: &str, subnet: &str) -> Network {
    let subnet: ipnet::Ipv4Net = subnet.parse().expect("fixture subnet");
    Network {
        name: name.into(),
        subnet,
        vni: 4096,
        gateway: subnet.hosts().next().expect("gateway"),
    }
}

/// `nets`: (network, vip, aliases).
fn service(name: &str, mode: EndpointMode, nets: &[(&str, Option<&str>, &[&str])]) -> Service {
    Service {
        name: name.into(),
        endpoint_mode: mode,
        networks: nets
            .iter()
            .map(|(n, vip, aliases)| ServiceNetwork {
                network: (*n).into(),
                vip: vip.map(ip),
                aliases: aliases.iter().map(|a| a.to_string()).collect(),
            })
            .collect(),
        ports: vec![],
    }
}

fn task(id: &str, svc: &str, slot: u32, state: TaskState, nets: &[(&str, &str)]) -> Task {
    Task {
        id: id.into(),
        service: svc.into(),
        slot,
        node: "node1".into(),
        state,
        netns: None,
        resolv_conf: None,
        networks: nets
            .iter()
            .map(|(n, a)| TaskNetwork {
                network: (*n).into(),
                address: ip(a),
            })
            .collect(),
    }
}

/// Networks appnet (10.0.1/24), backnet (10.0.2/24), othernet (10.0.3/24).
/// - web (vip): appnet 10.0.1.2 aliases www, frontend; backnet 10.0.2.2 alias web-internal.
///   Tasks w1 (slot 1) and w2 (slot 2) running, w3 (slot 3) failed.
/// - db (dnsrr) on backnet, alias database: d1, d2 running, d3 shutdown.
/// - secret (vip) on othernet only, 10.0.3.2: s1 running.
/// - client (vip) on appnet+backnet: c1 running, networks [appnet, backnet] (an asker).
/// - worker (vip) on backnet+appnet: k1 running, networks [backnet, appnet] (an asker).
/// - lonely (vip) on othernet: l1 running (an asker).
fn fixture() -> State {
    use EndpointMode::*;
    use TaskState::*;
    let mut s = State::default();
    for n in [
        network("appnet", "10.0.1.0/24"),
        network("backnet", "10.0.2.0/24"),
        network("othernet", "10.0.3.0/24"),
    ] {
        s.networks.insert(n.name.clone(), n);
    }
    for sv in [
        service(
            "web",
            Vip,
            &[
                ("appnet", Some("10.0.1.2"), &["www", "frontend"]),
                ("backnet", Some("10.0.2.2"), &["web-internal"]),
            ],
        ),
        service("db", Dnsrr, &[("backnet", None, &["database"])]),
        service("secret", Vip, &[("othernet", Some("10.0.3.2"), &[])]),
        service(
            "client",
            Vip,
            &[
                ("appnet", Some("10.0.1.3"), &[]),
                ("backnet", Some("10.0.2.3"), &[]),
            ],
        ),
        service(
            "worker",
            Vip,
            &[
                ("backnet", Some("10.0.2.4"), &[]),
                ("appnet", Some("10.0.1.4"), &[]),
            ],
        ),
        service("lonely", Vip, &[("othernet", Some("10.0.3.5"), &[])]),
    ] {
        s.services.insert(sv.name.clone(), sv);
    }
    for t in [
        task(
            "w1",
            "web",
            1,
            Running,
            &[("appnet", "10.0.1.10"), ("backnet", "10.0.2.10")],
        ),
        task(
            "w2",
            "web",
            2,
            Running,
            &[("appnet", "10.0.1.11"), ("backnet", "10.0.2.11")],
        ),
        task(
            "w3",
            "web",
            3,
            Failed,
            &[("appnet", "10.0.1.12"), ("backnet", "10.0.2.12")],
        ),
        task("d1", "db", 1, Running, &[("backnet", "10.0.2.20")]),
        task("d2", "db", 2, Running, &[("backnet", "10.0.2.21")]),
        task("d3", "db", 3, Shutdown, &[("backnet", "10.0.2.22")]),
        task("s1", "secret", 1, Running, &[("othernet", "10.0.3.10")]),
        task(
            "c1",
            "client",
            1,
            Running,
            &[("appnet", "10.0.1.30"), ("backnet", "10.0.2.30")],
        ),
        task(
            "k1",
            "worker",
            1,
            Running,
            &[("backnet", "10.0.2.40"), ("appnet", "10.0.1.40")],
        ),
        task("l1", "lonely", 1, Running, &[("othernet", "10.0.3.40")]),
    ] {
        s.tasks.insert(t.id.clone(), t);
    }
    s
}

// ---------------------------------------------------------------------------------------
// Harness: a Dns serving tasks on 127.0.0.1, fake upstreams, a tiny client
// ---------------------------------------------------------------------------------------

/// Bind UDP and TCP on the same free 127.0.0.1 port.
fn bind_pair() -> (std::net::UdpSocket, std::net::TcpListener, SocketAddr) {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let addr = udp.local_addr().expect("local addr");
        if let Ok(tcp) = std::net::TcpListener::bind(addr) {
            return (udp, tcp, addr);
        }
    }
    panic!("no free 127.0.0.1 port for both UDP and TCP");
}

/// Serve `task_id` of `state` on a fresh port.
async fn serve(dns: &Dns, state: &State, task_id: &str) -> SocketAddr {
    let task = state.tasks.get(task_id).expect("fixture task");
    let (udp, tcp, addr) = bind_pair();
    dns.serve_sockets(task, udp, tcp)
        .await
        .expect("serve sockets");
    addr
}

fn cfg(upstreams: Vec<SocketAddr>) -> DnsConfig {
    DnsConfig {
        upstreams,
        upstream_timeout: Duration::from_millis(500),
        forward_deadline: Duration::from_secs(2),
        ..DnsConfig::default()
    }
}

/// A Dns answering `fixture()`, an upstream answering everything, and listeners for the
/// tasks in `askers`.
async fn setup(askers: &[&str]) -> (Dns, Vec<SocketAddr>, Upstream) {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    let state = fixture();
    dns.update(Arc::new(state.clone()));
    let mut addrs = vec![];
    for a in askers {
        addrs.push(serve(&dns, &state, a).await);
    }
    (dns, addrs, up)
}

fn query_bytes(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(next_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("query name"), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode query")
}

fn next_id() -> u16 {
    static ID: AtomicUsize = AtomicUsize::new(1);
    ID.fetch_add(1, Ordering::Relaxed) as u16
}

/// Send raw bytes over UDP; the reply's bytes, or None after `wait`.
/// The server counts a query once its answer has left, on its own thread: the stats as soon
/// as `done` holds of them, or as they are after 2 s (for the caller's assertion to show).
async fn stats_once(dns: &Dns, done: impl Fn(&DnsStats) -> bool) -> DnsStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let st = dns.stats();
        if done(&st) || std::time::Instant::now() > deadline {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
    sock.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp_msg(server: SocketAddr, bytes: &[u8]) -> Message {
    let reply = udp_raw(server, bytes, Duration::from_secs(5))
        .await
        .expect("no UDP answer within 5 s");
    let m = Message::from_vec(&reply).expect("decode answer");
    assert_eq!(m.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
    m
}

async fn tcp_msg(server: SocketAddr, bytes: &[u8]) -> Message {
    let fut = async {
        let mut s = TcpStream::connect(server).await.expect("tcp connect");
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(bytes);
        s.write_all(&framed).await.expect("tcp write");
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).await.expect("tcp read len");
        let mut buf = vec![0u8; u16::from_be_bytes(lb) as usize];
        s.read_exact(&mut buf).await.expect("tcp read");
        Message::from_vec(&buf).expect("decode answer")
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("no TCP answer within 5 s")
}

async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
    udp_msg(server, &query_bytes(name, t, None)).await
}

fn a_of(m: &Message) -> Vec<Ipv4Addr> {
    let mut v: Vec<_> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(a)) => Some(*a),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn ptr_of(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(PTR(n)) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// Ask for A records; assert NOERROR; the sorted addresses.
async fn a(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let m = ask(server, name, RecordType::A).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "{name}: {m:?}"
    );
    a_of(&m)
}

fn ips(v: &[&str]) -> Vec<Ipv4Addr> {
    let mut v: Vec<_> = v.iter().map(|s| ip(s)).collect();
    v.sort();
    v
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Up {
    /// A 192.0.2.53 for every name, UDP and TCP.
    Answer,
    /// UDP: TC set and no records; TCP: the full answer.
    TruncateUdp,
    /// Reads queries, never answers.
    Silent,
    /// REFUSED.
    Refuse,
}

struct Upstream {
    addr: SocketAddr,
    udp_hits: Arc<AtomicUsize>,
    tcp_hits: Arc<AtomicUsize>,
}

fn upstream_reply(q: &Message, mode: Up, over_tcp: bool) -> Vec<u8> {
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    match mode {
        Up::Refuse => r.metadata.response_code = ResponseCode::Refused,
        Up::TruncateUdp if !over_tcp => r.metadata.truncation = true,
        _ => {
            if let Some(q0) = q.queries.first() {
                r.add_answer(Record::from_rdata(
                    q0.name().clone(),
                    300,
                    RData::A(A(FORWARDED)),
                ));
            }
        }
    }
    r.to_vec().expect("encode upstream reply")
}

async fn upstream(mode: Up) -> Upstream {
    let (udp, tcp, addr) = bind_pair();
    udp.set_nonblocking(true).expect("nonblocking");
    tcp.set_nonblocking(true).expect("nonblocking");
    let udp = UdpSocket::from_std(udp).expect("tokio udp");
    let tcp = TcpListener::from_std(tcp).expect("tokio tcp");
    let udp_hits = Arc::new(AtomicUsize::new(0));
    let tcp_hits = Arc::new(AtomicUsize::new(0));
    let hits = udp_hits.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            hits.fetch_add(1, Ordering::SeqCst);
            if mode == Up::Silent {
                continue;
            }
            if let Ok(q) = Message::from_vec(&buf[..n]) {
                let _ = udp.send_to(&upstream_reply(&q, mode, false), from).await;
            }
        }
    });
    let hits = tcp_hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            hits.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut lb = [0u8; 2];
                if s.read_exact(&mut lb).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; u16::from_be_bytes(lb) as usize];
                if s.read_exact(&mut buf).await.is_err() {
                    return;
                }
                if mode == Up::Silent {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                if let Ok(q) = Message::from_vec(&buf) {
                    let r = upstream_reply(&q, mode, true);
                    let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&r);
                    let _ = s.write_all(&framed).await;
                }
            });
        }
    });
    Upstream {
        addr,
        udp_hits,
        tcp_hits,
    }
}

impl Upstream {
    fn hits(&self) -> usize {
        self.udp_hits.load(Ordering::SeqCst) + self.tcp_hits.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Local names
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn service_name_gives_the_vip_on_the_shared_network() {
    let (_dns, s, up) = setup(&["c1", "l1"]).await;
    assert_eq!(a(s[0], "web").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[1], "secret").await, ips(&["10.0.3.2"]));
    assert_eq!(up.hits(), 0, "local names are never forwarded");
}

#[tokio::test]
async fn first_of_the_askers_networks_wins_and_networks_never_mix() {
    // c1 is on [appnet, backnet], k1 on [backnet, appnet]; web is on both.
    let (_dns, s, _up) = setup(&["c1", "k1"]).await;
    assert_eq!(a(s[0], "web").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[1], "web").await, ips(&["10.0.2.2"]));
    assert_eq!(a(s[0], "tasks.web").await, ips(&["10.0.1.10", "10.0.1.11"]));
    assert_eq!(a(s[1], "tasks.web").await, ips(&["10.0.2.10", "10.0.2.11"]));
    // A name only on the second network is still found there.
    assert_eq!(a(s[0], "web-internal").await, ips(&["10.0.2.2"]));
}

#[tokio::test]
async fn dnsrr_service_gives_every_running_task() {
    let (_dns, s, up) = setup(&["c1"]).await;
    assert_eq!(a(s[0], "db").await, ips(&["10.0.2.20", "10.0.2.21"]));
    assert_eq!(a(s[0], "database").await, ips(&["10.0.2.20", "10.0.2.21"]));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn tasks_name_lists_running_tasks_only() {
    let (_dns, s, _up) = setup(&["c1"]).await;
    // w3 (failed) and d3 (shutdown) never appear.
    assert_eq!(a(s[0], "tasks.web").await, ips(&["10.0.1.10", "10.0.1.11"]));
    assert_eq!(a(s[0], "tasks.db").await, ips(&["10.0.2.20", "10.0.2.21"]));
}

#[tokio::test]
async fn task_names_resolve_to_the_task() {
    let (_dns, s, up) = setup(&["c1", "k1"]).await;
    assert_eq!(a(s[0], "web.1.w1").await, ips(&["10.0.1.10"]));
    assert_eq!(a(s[0], "web.2").await, ips(&["10.0.1.11"]));
    assert_eq!(a(s[1], "web.2.w2").await, ips(&["10.0.2.11"]));
    assert_eq!(a(s[0], "db.1.d1").await, ips(&["10.0.2.20"]));
    assert_eq!(up.hits(), 0);
    // Stopped/failed tasks have no names: forwarded like unknown names.
    assert_eq!(a(s[0], "web.3.w3").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "web.3").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "db.3.d3").await, vec![FORWARDED]);
}

#[tokio::test]
async fn aliases_resolve_like_the_service_on_their_network() {
    let (_dns, s, _up) = setup(&["c1", "k1"]).await;
    assert_eq!(a(s[0], "www").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[0], "frontend").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[0], "web-internal").await, ips(&["10.0.2.2"]));
    assert_eq!(a(s[1], "www").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[0], "www.appnet").await, ips(&["10.0.1.2"]));
}

#[tokio::test]
async fn names_of_networks_the_asker_is_not_on_are_forwarded() {
    let (_dns, s, up) = setup(&["c1", "l1"]).await;
    // secret is only on othernet; c1 is not.
    assert_eq!(a(s[0], "secret").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "tasks.secret").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "secret.1.s1").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "secret.othernet").await, vec![FORWARDED]);
    // l1 (othernet only) does not see web or db.
    assert_eq!(a(s[1], "web").await, vec![FORWARDED]);
    assert_eq!(a(s[1], "db").await, vec![FORWARDED]);
    assert_eq!(a(s[1], "web.appnet").await, vec![FORWARDED]);
    assert_eq!(a(s[1], "secret").await, ips(&["10.0.3.2"]));
    assert_eq!(up.hits(), 7);
}

#[tokio::test]
async fn ptr_for_vips_and_task_addresses_on_the_askers_networks() {
    let (_dns, s, up) = setup(&["c1", "k1"]).await;
    let ptr = |m: Message| {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        ptr_of(&m)
    };
    let c = s[0];
    assert_eq!(
        ptr(ask(c, "2.1.0.10.in-addr.arpa.", RecordType::PTR).await),
        ["web.appnet."]
    );
    assert_eq!(
        ptr(ask(c, "2.2.0.10.in-addr.arpa.", RecordType::PTR).await),
        ["web.backnet."]
    );
    assert_eq!(
        ptr(ask(c, "10.1.0.10.in-addr.arpa.", RecordType::PTR).await),
        ["web.1.w1.appnet."]
    );
    assert_eq!(
        ptr(ask(c, "21.2.0.10.in-addr.arpa.", RecordType::PTR).await),
        ["db.2.d2.backnet."]
    );
    // Case-insensitive reverse names, and from another asker.
    assert_eq!(
        ptr(ask(s[1], "11.2.0.10.IN-ADDR.ARPA.", RecordType::PTR).await),
        ["web.2.w2.backnet."]
    );
    assert_eq!(up.hits(), 0);
    // The PTR target resolves back.
    assert_eq!(a(c, "web.1.w1.appnet").await, ips(&["10.0.1.10"]));
    // A PTR name asked for A: known name, NOERROR without records.
    assert_eq!(a(c, "2.1.0.10.in-addr.arpa.").await, Vec::<Ipv4Addr>::new());
    assert_eq!(up.hits(), 0);
    // Addresses on othernet (c1 is not on it), a failed task's and unknown ones: forwarded.
    for name in [
        "2.3.0.10.in-addr.arpa.",
        "10.3.0.10.in-addr.arpa.",
        "12.1.0.10.in-addr.arpa.",
        "99.1.0.10.in-addr.arpa.",
    ] {
        let m = ask(c, name, RecordType::PTR).await;
        assert_eq!(a_of(&m), vec![FORWARDED], "{name}");
    }
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn other_types_of_known_names_are_noerror_without_records() {
    let (dns, s, up) = setup(&["c1"]).await;
    for t in [
        RecordType::AAAA,
        RecordType::MX,
        RecordType::TXT,
        RecordType::SRV,
        RecordType::SOA,
        RecordType::CNAME,
    ] {
        for name in ["web", "tasks.web", "web.1.w1", "db", "www.appnet"] {
            let m = ask(s[0], name, t).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NoError,
                "{name} {t}"
            );
            assert!(m.answers.is_empty(), "{name} {t}: {:?}", m.answers);
            assert!(m.metadata.recursion_available);
            assert!(!m.metadata.authoritative);
        }
    }
    assert_eq!(up.hits(), 0, "never forwarded");
    let st = stats_once(&dns, |st| st.local >= 30).await;
    assert_eq!(st.forwarded, 0);
    assert_eq!(st.responses.nxdomain, 0);
    assert_eq!(st.local, 30);
    // ANY gets what we have.
    let m = ask(s[0], "web", RecordType::ANY).await;
    assert_eq!(a_of(&m), ips(&["10.0.1.2"]));
}

#[tokio::test]
async fn names_are_case_insensitive() {
    let (_dns, s, up) = setup(&["c1"]).await;
    assert_eq!(a(s[0], "WEB").await, ips(&["10.0.1.2"]));
    assert_eq!(a(s[0], "Tasks.Web").await, ips(&["10.0.1.10", "10.0.1.11"]));
    assert_eq!(a(s[0], "WEB.1.W1").await, ips(&["10.0.1.10"]));
    assert_eq!(a(s[0], "wWw.AppNet").await, ips(&["10.0.1.2"]));
    assert_eq!(up.hits(), 0);
    // The question keeps the client's case (raw bytes: hickory's Name parser lowercases).
    let mut q = header(42, 0x0100, 1, 0, 0, 0);
    q.extend_from_slice(&question(&[b"WeB", b"APPnet"], 1));
    let m = udp_msg(s[0], &q).await;
    assert_eq!(m.queries[0].name().to_string(), "WeB.APPnet.");
    assert_eq!(a_of(&m), ips(&["10.0.1.2"]));
    assert_eq!(m.answers[0].name.to_string(), "web.appnet.");
}

#[tokio::test]
async fn trailing_dot_and_network_suffix_are_accepted() {
    let (_dns, s, up) = setup(&["c1"]).await;
    for name in ["web", "web.", "web.appnet", "web.appnet."] {
        assert_eq!(a(s[0], name).await, ips(&["10.0.1.2"]), "{name}");
    }
    // The suffix picks the network, even if not the asker's first.
    assert_eq!(a(s[0], "web.backnet").await, ips(&["10.0.2.2"]));
    assert_eq!(
        a(s[0], "tasks.web.appnet.").await,
        ips(&["10.0.1.10", "10.0.1.11"])
    );
    assert_eq!(
        a(s[0], "tasks.web.backnet").await,
        ips(&["10.0.2.10", "10.0.2.11"])
    );
    assert_eq!(a(s[0], "web.1.w1.backnet").await, ips(&["10.0.2.10"]));
    assert_eq!(a(s[0], "web.2.appnet").await, ips(&["10.0.1.11"]));
    assert_eq!(
        a(s[0], "db.backnet").await,
        ips(&["10.0.2.20", "10.0.2.21"])
    );
    assert_eq!(up.hits(), 0);
    // A suffix of a network without the name: forwarded.
    assert_eq!(a(s[0], "db.appnet").await, vec![FORWARDED]);
}

#[tokio::test]
async fn the_next_query_after_an_update_sees_the_new_state() {
    let (dns, s, _up) = setup(&["c1"]).await;
    assert_eq!(a(s[0], "tasks.web").await, ips(&["10.0.1.10", "10.0.1.11"]));
    let before = dns.inner.shared.index.load().generation;

    let mut st = fixture();
    // Scale up, fail w1, move the VIP, add an alias.
    st.tasks.insert(
        "w4".into(),
        task(
            "w4",
            "web",
            4,
            TaskState::Running,
            &[("appnet", "10.0.1.13"), ("backnet", "10.0.2.13")],
        ),
    );
    st.tasks.get_mut("w1").expect("w1").state = TaskState::Failed;
    let web = st.services.get_mut("web").expect("web");
    web.networks[0].vip = Some(ip("10.0.1.99"));
    web.networks[0].aliases.push("newname".into());
    dns.update(Arc::new(st));
    assert!(dns.inner.shared.index.load().generation > before);

    assert_eq!(a(s[0], "tasks.web").await, ips(&["10.0.1.11", "10.0.1.13"]));
    assert_eq!(a(s[0], "web").await, ips(&["10.0.1.99"]));
    assert_eq!(a(s[0], "newname").await, ips(&["10.0.1.99"]));
    assert_eq!(a(s[0], "web.1.w1").await, vec![FORWARDED]);
    assert_eq!(a(s[0], "web.4.w4").await, ips(&["10.0.1.13"]));

    // The asker's own networks come from the index too: move c1 off appnet.
    let mut st = fixture();
    st.tasks.get_mut("c1").expect("c1").networks.remove(0);
    dns.update(Arc::new(st));
    assert_eq!(a(s[0], "web").await, ips(&["10.0.2.2"]));
    assert_eq!(a(s[0], "www").await, vec![FORWARDED]);

    // Service gone: forwarded.
    let mut st = fixture();
    st.services.remove("db");
    st.tasks = st
        .tasks
        .into_iter()
        .filter(|(_, t)| t.service != "db")
        .collect();
    dns.update(Arc::new(st));
    assert_eq!(a(s[0], "db").await, vec![FORWARDED]);
}

#[tokio::test]
async fn a_service_without_running_tasks_answers_empty_not_forwarded() {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    let mut st = fixture();
    for id in ["d1", "d2"] {
        st.tasks.get_mut(id).expect("db task").state = TaskState::Shutdown;
    }
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    assert_eq!(a(c, "db").await, Vec::<Ipv4Addr>::new());
    assert_eq!(a(c, "tasks.db").await, Vec::<Ipv4Addr>::new());
    assert_eq!(a(c, "database").await, Vec::<Ipv4Addr>::new());
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_task_unknown_to_the_index_uses_its_attach_time_networks() {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    dns.update(Arc::new(fixture()));
    let newcomer = task(
        "n1",
        "newsvc",
        1,
        TaskState::Starting,
        &[("backnet", "10.0.2.50")],
    );
    let (udp, tcp, addr) = bind_pair();
    dns.serve_sockets(&newcomer, udp, tcp).await.expect("serve");
    assert_eq!(a(addr, "web").await, ips(&["10.0.2.2"]));
    assert_eq!(a(addr, "www").await, vec![FORWARDED]);
}

#[tokio::test]
async fn multi_record_answers_are_shuffled() {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    let mut st = fixture();
    for i in 0..5u32 {
        let id = format!("x{i}");
        let addr = format!("10.0.2.{}", 100 + i);
        st.tasks.insert(
            id.clone(),
            task(&id, "db", 10 + i, TaskState::Running, &[("backnet", &addr)]),
        );
    }
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let mut firsts = BTreeSet::new();
    for _ in 0..60 {
        let m = ask(c, "tasks.db", RecordType::A).await;
        assert_eq!(m.answers.len(), 7);
        if let RData::A(A(first)) = m.answers[0].data {
            firsts.insert(first);
        }
    }
    assert!(firsts.len() >= 3, "first answers seen: {firsts:?}");
}

#[tokio::test]
async fn local_answers_carry_the_configured_ttl_and_lowercase_owner() {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(DnsConfig {
        ttl: 7,
        ..cfg(vec![up.addr])
    });
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let m = ask(c, "Tasks.Web.AppNet", RecordType::A).await;
    assert_eq!(m.answers.len(), 2);
    for r in &m.answers {
        assert_eq!(r.ttl, 7);
        assert_eq!(r.dns_class, DNSClass::IN);
        assert_eq!(r.name.to_string(), "tasks.web.appnet.");
    }
    assert_eq!(DnsConfig::default().ttl, 5);
}

// ---------------------------------------------------------------------------------------
// Sizes, EDNS, TCP
// ---------------------------------------------------------------------------------------

/// A dnsrr service with `n` running tasks on backnet (10.0.2.0/24 is too small; use a /16).
fn big_state(n: u32) -> State {
    let mut st = fixture();
    st.networks
        .insert("bignet".into(), network("bignet", "10.9.0.0/16"));
    st.services.insert(
        "big".into(),
        service("big", EndpointMode::Dnsrr, &[("bignet", None, &[])]),
    );
    for i in 0..n {
        let id = format!("b{i}");
        let addr = format!("10.9.{}.{}", 1 + i / 200, 1 + i % 200);
        st.tasks.insert(
            id.clone(),
            task(&id, "big", i + 1, TaskState::Running, &[("bignet", &addr)]),
        );
    }
    st.tasks
        .get_mut("c1")
        .expect("c1")
        .networks
        .push(TaskNetwork {
            network: "bignet".into(),
            address: ip("10.9.250.1"),
        });
    st
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let up = upstream(Up::Answer).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    let st = big_state(100);
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;

    // Plain UDP: at most 512 bytes, TC set.
    let q = query_bytes("big", RecordType::A, None);
    let raw = udp_raw(c, &q, Duration::from_secs(5))
        .await
        .expect("udp answer");
    assert!(raw.len() <= 512, "{} bytes", raw.len());
    let m = Message::from_vec(&raw).expect("decode");
    assert!(m.metadata.truncation);
    assert!(m.answers.len() < 100);
    assert!(m.edns.is_none(), "no OPT without one in the query");

    // TCP: everything.
    let m = tcp_msg(c, &q).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);

    // EDNS 1232: bigger than 512, still cut at 1232, OPT echoed.
    let q = query_bytes("big", RecordType::A, Some(1232));
    let raw = udp_raw(c, &q, Duration::from_secs(5))
        .await
        .expect("udp answer");
    assert!(raw.len() > 512 && raw.len() <= 1232, "{} bytes", raw.len());
    let m = Message::from_vec(&raw).expect("decode");
    assert!(m.metadata.truncation);

    // EDNS 4096: 100 A records (~1.6 KB) fit.
    let q = query_bytes("big", RecordType::A, Some(4096));
    let m = udp_msg(c, &q).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert_eq!(m.edns.as_ref().expect("OPT echoed").max_payload(), 4096);

    // A client offering more than our udp_payload gets ours.
    let q = query_bytes("web", RecordType::A, Some(65000));
    let m = udp_msg(c, &q).await;
    assert_eq!(m.edns.as_ref().expect("OPT").max_payload(), 4096);
    assert!(stats_once(&dns, |st| st.truncated >= 2).await.truncated >= 2);
}

#[tokio::test]
async fn edns_is_echoed_and_unknown_versions_get_badvers() {
    let (_dns, s, up) = setup(&["c1"]).await;
    let m = udp_msg(s[0], &query_bytes("web", RecordType::A, Some(1232))).await;
    assert_eq!(a_of(&m), ips(&["10.0.1.2"]));
    let e = m.edns.expect("OPT in the answer");
    assert_eq!(e.max_payload(), 1232);
    assert_eq!(e.version(), 0);

    let m = udp_msg(s[0], &query_bytes("web", RecordType::A, None)).await;
    assert!(m.edns.is_none());

    let mut q = Message::new(77, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_str("web.").expect("name"),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    q.set_edns(e);
    let m = udp_msg(s[0], &q.to_vec().expect("encode")).await;
    // BADVERS shares code 16 with BADSIG (which is what the decoder names it).
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.edns.is_some(), "extended RCODE needs the OPT");
    assert!(m.answers.is_empty());
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn tcp_queries_answer_locally_and_forward() {
    let (_dns, s, up) = setup(&["c1"]).await;
    let m = tcp_msg(s[0], &query_bytes("web", RecordType::A, None)).await;
    assert_eq!(a_of(&m), ips(&["10.0.1.2"]));
    let m = tcp_msg(s[0], &query_bytes("example.test", RecordType::A, None)).await;
    assert_eq!(a_of(&m), vec![FORWARDED]);
    // The client asked over TCP: forwarded over TCP directly.
    assert_eq!(up.tcp_hits.load(Ordering::SeqCst), 1);
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_names_are_forwarded_with_flags() {
    let (dns, s, up) = setup(&["c1"]).await;
    let m = ask(s[0], "example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_of(&m), vec![FORWARDED]);
    assert_eq!(m.answers[0].ttl, 300, "upstream TTLs are kept");
    assert!(m.metadata.recursion_available);
    assert!(m.metadata.recursion_desired);
    assert_eq!(m.queries[0].name().to_string(), "example.test.");
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 1);
    // AAAA of an unknown name too; with EDNS and DO, the OPT comes back with DO.
    let mut q = Message::new(next_id(), MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_str("example.test.").expect("name"),
        RecordType::AAAA,
    ));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    e.set_dnssec_ok(true);
    q.set_edns(e);
    let m = udp_msg(s[0], &q.to_vec().expect("encode")).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.edns.as_ref().expect("OPT").flags().dnssec_ok);
    let st = stats_once(&dns, |st| {
        st.forwarded >= 2 && st.forward_latency.count >= 2
    })
    .await;
    assert_eq!(st.forwarded, 2);
    assert_eq!(st.forward_failures, 0);
    assert_eq!(st.forward_latency.count, 2);
}

#[tokio::test]
async fn truncated_upstream_answers_are_retried_over_tcp() {
    let up = upstream(Up::TruncateUdp).await;
    let dns = Dns::new(cfg(vec![up.addr]));
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let m = ask(c, "big.example.test", RecordType::A).await;
    assert_eq!(a_of(&m), vec![FORWARDED], "the UDP answer had no records");
    assert!(!m.metadata.truncation);
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 1);
    assert_eq!(up.tcp_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_within_the_timeout() {
    let silent = upstream(Up::Silent).await;
    let timeout = Duration::from_millis(400);
    let dns = Dns::new(DnsConfig {
        upstreams: vec![silent.addr],
        upstream_timeout: timeout,
        forward_deadline: Duration::from_secs(3),
        ..DnsConfig::default()
    });
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let t0 = Instant::now();
    let m = ask(c, "example.test", RecordType::A).await;
    let took = t0.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(took >= timeout, "answered before the timeout: {took:?}");
    assert!(took < 2 * timeout, "took {took:?}");
    // Over TCP too.
    let t0 = Instant::now();
    let m = tcp_msg(c, &query_bytes("example.test", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t0.elapsed() < 2 * timeout, "took {:?}", t0.elapsed());
    // Local names are unaffected.
    assert_eq!(a(c, "web").await, ips(&["10.0.1.2"]));
    let st = stats_once(&dns, |st| {
        st.responses.servfail >= 2 && st.responses.noerror >= 1
    })
    .await;
    assert_eq!(st.forward_failures, 2);
    assert_eq!(st.responses.servfail, 2);
}

#[tokio::test]
async fn upstreams_are_tried_in_turn_within_the_deadline() {
    let silent = upstream(Up::Silent).await;
    let refuse = upstream(Up::Refuse).await;
    let good = upstream(Up::Answer).await;
    let timeout = Duration::from_millis(300);
    let dns = Dns::new(DnsConfig {
        upstreams: vec![silent.addr, refuse.addr, good.addr],
        upstream_timeout: timeout,
        forward_deadline: Duration::from_secs(3),
        ..DnsConfig::default()
    });
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let t0 = Instant::now();
    assert_eq!(a(c, "example.test").await, vec![FORWARDED]);
    assert!(t0.elapsed() < 2 * timeout, "took {:?}", t0.elapsed());
    assert_eq!(silent.hits(), 1);
    assert_eq!(refuse.hits(), 1);
    assert_eq!(good.hits(), 1);

    // The overall deadline bounds many silent upstreams.
    let s2 = upstream(Up::Silent).await;
    let s3 = upstream(Up::Silent).await;
    let dns = Dns::new(DnsConfig {
        upstreams: vec![silent.addr, s2.addr, s3.addr, good.addr],
        upstream_timeout: timeout,
        forward_deadline: Duration::from_millis(700),
        ..DnsConfig::default()
    });
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let t0 = Instant::now();
    let m = ask(c, "example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert_eq!(
        s3.hits(),
        1,
        "third upstream tried with the remaining 100 ms"
    );
    assert_eq!(good.hits(), 1, "fourth upstream not reached");
}

#[tokio::test]
async fn only_refusing_upstreams_pass_their_answer_on() {
    let refuse = upstream(Up::Refuse).await;
    let dns = Dns::new(cfg(vec![refuse.addr]));
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let m = ask(c, "example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn no_upstreams_or_unreachable_ones_give_servfail_at_once() {
    let dns = Dns::new(cfg(vec![]));
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let t0 = Instant::now();
    let m = ask(c, "example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t0.elapsed() < Duration::from_millis(200));

    // A port nothing listens on: ICMP port unreachable fails the attempt at once.
    let (udp, tcp, dead) = bind_pair();
    drop((udp, tcp));
    let dns = Dns::new(cfg(vec![dead]));
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let t0 = Instant::now();
    let m = ask(c, "example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn forwards_beyond_the_in_flight_bound_are_refused() {
    let silent = upstream(Up::Silent).await;
    let dns = Dns::new(DnsConfig {
        upstreams: vec![silent.addr],
        upstream_timeout: Duration::from_secs(2),
        forward_deadline: Duration::from_secs(2),
        max_inflight_forwards: 2,
        ..DnsConfig::default()
    });
    let st = fixture();
    dns.update(Arc::new(st.clone()));
    let c = serve(&dns, &st, "c1").await;
    let pending: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(
                async move { ask(c, &format!("slow{i}.example.test"), RecordType::A).await },
            )
        })
        .collect();
    // Wait until both are in flight.
    let t0 = Instant::now();
    while dns.stats().inflight_forwards < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "forwards never in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let m = ask(c, "third.example.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(t0.elapsed() < Duration::from_millis(200));
    // Local answers still work meanwhile.
    assert_eq!(a(c, "web").await, ips(&["10.0.1.2"]));
    for p in pending {
        let m = p.await.expect("join");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    let st = stats_once(&dns, |st| {
        st.forward_rejected >= 1 && st.inflight_forwards == 0
    })
    .await;
    assert_eq!(st.forward_rejected, 1);
    assert_eq!(st.inflight_forwards, 0);
}

// ---------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------

/// A header: id, flags, and the four counts.
fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    [id, flags, qd, an, ns, ar]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

fn question(labels: &[&[u8]], qtype: u16) -> Vec<u8> {
    let mut v = vec![];
    for l in labels {
        v.push(l.len() as u8);
        v.extend_from_slice(l);
    }
    v.push(0);
    v.extend_from_slice(&qtype.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v
}

async fn rcode_of(server: SocketAddr, bytes: &[u8]) -> Option<ResponseCode> {
    let raw = udp_raw(server, bytes, Duration::from_millis(300)).await?;
    Some(
        Message::from_vec(&raw)
            .expect("our answers decode")
            .metadata
            .response_code,
    )
}

#[tokio::test]
async fn malformed_queries_get_errors_and_never_stop_the_server() {
    let (dns, s, up) = setup(&["c1"]).await;
    let c = s[0];
    let web = question(&[b"web"], 1);

    // Zero and two questions: FORMERR.
    assert_eq!(
        rcode_of(c, &header(1, 0x0100, 0, 0, 0, 0)).await,
        Some(ResponseCode::FormErr)
    );
    let mut two = header(2, 0x0100, 2, 0, 0, 0);
    two.extend_from_slice(&web);
    two.extend_from_slice(&web);
    assert_eq!(rcode_of(c, &two).await, Some(ResponseCode::FormErr));
    // Other opcodes: NOTIMP (NOTIFY = 4, UPDATE = 5, STATUS = 2).
    for op in [2u16, 4, 5] {
        let mut m = header(3, op << 11, 1, 0, 0, 0);
        m.extend_from_slice(&web);
        assert_eq!(
            rcode_of(c, &m).await,
            Some(ResponseCode::NotImp),
            "opcode {op}"
        );
    }
    // QR set: no answer at all (no reflection).
    let mut m = header(4, 0x8100, 1, 0, 0, 0);
    m.extend_from_slice(&web);
    assert_eq!(rcode_of(c, &m).await, None);
    // Too-long label (64 bytes), name over 255 bytes, count larger than the content,
    // a compression pointer loop: FORMERR.
    let long = [b'a'; 64];
    let mut m = header(5, 0x0100, 1, 0, 0, 0);
    m.extend_from_slice(&question(&[&long], 1));
    assert_eq!(rcode_of(c, &m).await, Some(ResponseCode::FormErr));
    let l63 = [b'b'; 63];
    let mut m = header(6, 0x0100, 1, 0, 0, 0);
    m.extend_from_slice(&question(&[&l63, &l63, &l63, &l63, &l63], 1));
    assert_eq!(rcode_of(c, &m).await, Some(ResponseCode::FormErr));
    assert_eq!(
        rcode_of(c, &header(7, 0x0100, 1, 0, 0, 0)).await,
        Some(ResponseCode::FormErr)
    );
    let mut m = header(8, 0x0100, 1, 0, 0, 0);
    m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(rcode_of(c, &m).await, Some(ResponseCode::FormErr));
    // Truncated headers: dropped.
    for n in 0..12 {
        let _ = udp_raw(c, &vec![0x42; n], Duration::from_millis(20)).await;
    }
    // Random garbage, deterministic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for _ in 0..500 {
        let len = (next() % 600) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        sock.send_to(&bytes, c).await.expect("send garbage");
    }
    // TCP: garbage, a huge length prefix then close, a half message.
    for payload in [
        vec![0xff, 0xff, 1, 2, 3],
        vec![0x00, 0x05, 1, 2, 3, 4, 5],
        vec![0x00, 0x00],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        if let Ok(mut s) = TcpStream::connect(c).await {
            let _ = s.write_all(&payload).await;
        }
    }
    // Still answering, over both transports. The UDP loop runs on its own thread: let it
    // finish the garbage still queued first (a full receive queue drops new datagrams, and
    // this query is asked once, without a resolver's retries).
    let handled = |st: &crate::dns::DnsStats| {
        st.dropped + st.responses.formerr + st.responses.notimp + st.responses.noerror
    };
    let mut last = handled(&dns.stats());
    let mut quiet = 0;
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = handled(&dns.stats());
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
        if quiet == 3 {
            break;
        }
    }
    assert_eq!(a(c, "web").await, ips(&["10.0.1.2"]));
    let m = tcp_msg(c, &query_bytes("tasks.web", RecordType::A, None)).await;
    assert_eq!(a_of(&m), ips(&["10.0.1.10", "10.0.1.11"]));
    assert_eq!(up.hits(), 0, "garbage is never forwarded");
    let st = stats_once(&dns, |st| {
        st.responses.formerr >= 2 && st.responses.notimp >= 3
    })
    .await;
    assert!(
        st.responses.formerr >= 2 && st.responses.notimp == 3,
        "{st:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Lifecycle, config, resolv.conf, index
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn detach_closes_the_listeners_and_reattach_is_idempotent() {
    let (dns, s, _up) = setup(&["c1", "k1"]).await;
    assert_eq!(dns.attached(), ["c1", "k1"]);
    let st = fixture();
    // Serving an attached id again is a no-op (the old listener keeps working).
    let (udp, tcp, other) = bind_pair();
    dns.serve_sockets(&st.tasks["c1"], udp, tcp)
        .await
        .expect("no-op");
    assert_eq!(dns.attached(), ["c1", "k1"]);
    assert_eq!(a(s[0], "web").await, ips(&["10.0.1.2"]));
    assert_eq!(
        udp_raw(
            other,
            &query_bytes("web", RecordType::A, None),
            Duration::from_millis(200)
        )
        .await,
        None
    );

    dns.detach("c1").await;
    assert_eq!(dns.attached(), ["k1"]);
    // The port is free again (nothing listens), on both transports.
    std::net::UdpSocket::bind(s[0]).expect("UDP port released");
    std::net::TcpListener::bind(s[0]).expect("TCP port released");
    // The other task is unaffected.
    assert_eq!(a(s[1], "web").await, ips(&["10.0.2.2"]));
    dns.detach("nope").await;
    dns.shutdown().await;
    assert!(dns.attached().is_empty());
    std::net::UdpSocket::bind(s[1]).expect("UDP port released");
}

#[test]
fn config_from_resolv_conf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        "# comment\n\
         nameserver 10.255.255.53\n\
         nameserver 127.0.0.11   # ours: would loop\n\
         nameserver 127.0.0.53\n\
         nameserver fe80::1%2\n\
         nameserver fe80::2%no-such-if0\n\
         nameserver not-an-address\n\
         domain old.example\n\
         search corp.example svc.example\n\
         options ndots:5 edns0\n",
    )
    .expect("write");
    let c = DnsConfig::from_resolv_conf(&path).expect("parse");
    let want: Vec<SocketAddr> = vec![
        "10.255.255.53:53".parse().expect("addr"),
        "127.0.0.53:53".parse().expect("addr"),
        "[fe80::1%2]:53".parse().expect("addr"),
    ];
    assert_eq!(c.upstreams, want);
    assert_eq!(c.search, ["corp.example", "svc.example"]);
    assert_eq!(c.listen, Ipv4Addr::new(127, 0, 0, 11));
    assert_eq!(c.port, 53);
    assert_eq!(c.ttl, 5);
    assert_eq!(c.upstream_timeout, Duration::from_secs(2));
    assert_eq!(c.max_inflight_forwards, 1024);

    let err = DnsConfig::from_resolv_conf(&dir.path().join("missing")).expect_err("missing file");
    assert!(matches!(err, DnsError::ReadResolvConf { .. }), "{err}");
    assert!(err.to_string().contains("missing"));

    // domain alone gives one search domain; the last of search/domain wins.
    assert_eq!(resolv::parse("search a b\ndomain c\n").search, ["c"]);
}

#[test]
fn resolv_conf_content() {
    let text = resolv::render(
        "t1",
        DEFAULT_LISTEN,
        &["corp.example".into(), "x.example".into()],
    );
    assert!(text.starts_with(resolv::MARKER));
    let lines: Vec<_> = text.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "nameserver 127.0.0.11",
            "search corp.example x.example",
            "options ndots:0"
        ]
    );
    let text = resolv::render("t1", DEFAULT_LISTEN, &[]);
    assert!(!text.contains("search"));
    // What glibc would read back.
    let rc = resolv::parse(&text);
    assert_eq!(rc.nameservers, [SocketAddr::from((DEFAULT_LISTEN, 53))]);
}

#[test]
fn resolv_conf_paths() {
    let etc = PathBuf::from("/x/etc/netns");
    let mut t = task("t1", "web", 1, TaskState::Running, &[]);
    assert_eq!(resolv::task_path(&t, &etc), None, "no netns, no path");
    t.netns = Some("/proc/123/ns/net".into());
    assert_eq!(
        resolv::task_path(&t, &etc),
        None,
        "unnamed netns: the runtime's business"
    );
    t.netns = Some("/run/netns/task-a".into());
    assert_eq!(
        resolv::task_path(&t, &etc),
        Some((etc.join("task-a/resolv.conf"), Some(etc.join("task-a"))))
    );
    t.netns = Some("/var/run/netns/task-b".into());
    assert_eq!(
        resolv::task_path(&t, &etc),
        Some((etc.join("task-b/resolv.conf"), Some(etc.join("task-b"))))
    );
    t.resolv_conf = Some("/containers/t1/resolv.conf".into());
    assert_eq!(
        resolv::task_path(&t, &etc),
        Some((PathBuf::from("/containers/t1/resolv.conf"), None))
    );
}

#[test]
fn resolv_conf_is_written_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc/netns");
    let mut t = task("t1", "web", 1, TaskState::Running, &[]);
    t.netns = Some("/run/netns/mesh-test-ns".into());
    let search = vec!["corp.example".to_string()];

    // <etc>/netns missing: created, with the namespace's dir.
    let w = resolv::write(&t, &etc, DEFAULT_LISTEN, &search)
        .expect("write")
        .expect("a path");
    assert_eq!(w.path, etc.join("mesh-test-ns/resolv.conf"));
    let text = std::fs::read_to_string(&w.path).expect("read");
    assert!(text.contains("nameserver 127.0.0.11\n") && text.contains("options ndots:0\n"));
    assert!(!etc.join("mesh-test-ns/resolv.conf.mesh-tmp").exists());
    w.remove();
    assert!(!w.path.exists());
    assert!(
        !etc.join("mesh-test-ns").exists(),
        "the dir we created is gone"
    );
    assert!(etc.exists(), "the shared parent stays");

    // A pre-existing dir with other files stays; a file replaced by someone else stays.
    std::fs::create_dir_all(etc.join("mesh-test-ns")).expect("mkdir");
    std::fs::write(etc.join("mesh-test-ns/hosts"), "x").expect("write hosts");
    let w = resolv::write(&t, &etc, DEFAULT_LISTEN, &search)
        .expect("write")
        .expect("path");
    assert!(w.created_dir.is_none());
    std::fs::write(&w.path, "nameserver 1.1.1.1\n").expect("replace");
    w.remove();
    assert!(w.path.exists(), "not ours any more");
    assert!(etc.join("mesh-test-ns/hosts").exists());

    // An explicit path in a missing directory: a typed error naming task and path.
    t.resolv_conf = Some(dir.path().join("nope/resolv.conf"));
    let err = resolv::write(&t, &etc, DEFAULT_LISTEN, &search).expect_err("missing dir");
    match &err {
        DnsError::ResolvConf { task, path, .. } => {
            assert_eq!(task, "t1");
            assert_eq!(path, &dir.path().join("nope/resolv.conf"));
        }
        other => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn attach_without_a_netns_is_a_typed_error() {
    let dns = Dns::new(DnsConfig::default());
    let t = task("t1", "web", 1, TaskState::Running, &[]);
    let err = dns.attach(&t).await.expect_err("no netns");
    assert!(
        matches!(&err, DnsError::NoNetns { task } if task == "t1"),
        "{err}"
    );
    let mut t = t;
    t.netns = Some("/nonexistent/netns/x".into());
    let err = dns.attach(&t).await.expect_err("bad netns");
    assert!(
        matches!(&err, DnsError::Netns { task, .. } if task == "t1"),
        "{err}"
    );
    assert!(dns.attached().is_empty());
}

#[test]
fn index_scopes_names_per_network() {
    let (idx, skipped) = index::Index::build(&fixture(), 5);
    assert!(skipped.is_empty());
    let n = |s: &str| Name::from_str(s).expect("name");
    let f = idx.lookup("c1", &[], &n("web.")).expect("web");
    assert_eq!((f.network, f.entry.a.len()), ("appnet", 1));
    let f = idx.lookup("k1", &[], &n("web.")).expect("web");
    assert_eq!(f.network, "backnet");
    assert!(idx.lookup("c1", &[], &n("secret.")).is_none());
    assert!(idx.lookup("l1", &[], &n("secret.")).is_some());
    // Unknown task: fallback networks; none: nothing.
    assert!(idx.lookup("zz", &[], &n("web.")).is_none());
    let f = idx
        .lookup("zz", &["othernet".into(), "backnet".into()], &n("web."))
        .expect("via fallback");
    assert_eq!(f.network, "backnet");
}

#[test]
fn invalid_dns_names_are_skipped_not_fatal() {
    let mut st = fixture();
    let long = "x".repeat(70);
    st.services.insert(
        long.clone(),
        service(
            &long,
            EndpointMode::Vip,
            &[("appnet", Some("10.0.1.77"), &["ok-alias"])],
        ),
    );
    let (idx, skipped) = index::Index::build(&st, 5);
    assert!(skipped.iter().any(|s| s.starts_with(&long)), "{skipped:?}");
    let n = Name::from_str("ok-alias.").expect("name");
    assert!(
        idx.lookup("c1", &[], &n).is_some(),
        "the valid alias still works"
    );
}

#[tokio::test]
async fn stats_count_by_rcode_and_path() {
    let (dns, s, _up) = setup(&["c1"]).await;
    a(s[0], "web").await;
    a(s[0], "example.test").await;
    rcode_of(s[0], &header(9, 0x0100, 0, 0, 0, 0)).await;
    let st = stats_once(&dns, |st| {
        st.responses.total() >= 3 && st.local_latency.count >= 1
    })
    .await;
    assert_eq!(st.attached, 1);
    assert_eq!(st.local, 1);
    assert_eq!(st.forwarded, 1);
    assert_eq!(st.responses.noerror, 2);
    assert_eq!(st.responses.formerr, 1);
    assert_eq!(st.responses.total(), 3);
    assert_eq!(st.local_latency.count, 1);
    assert_eq!(st.local_latency.buckets.len(), LATENCY_BOUNDS_US.len());
    let last = st.local_latency.buckets.last().expect("buckets").1;
    assert_eq!(last, 1, "cumulative");
    assert!(st.local_latency.sum > Duration::ZERO);
}

// ---------------------------------------------------------------------------------------
// UDP fast path (udp.rs)
// ---------------------------------------------------------------------------------------

/// Everything a client sees in an answer, names compared in their wire spelling (the
/// general path writes lowercase owner names: the fast path must too).
fn seen(m: &Message) -> String {
    let mut answers: Vec<String> = m
        .answers
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {:?}",
                r.name.to_ascii(),
                r.ttl,
                r.dns_class,
                r.data
            )
        })
        .collect();
    answers.sort();
    format!(
        "id {} {} q {:?} an {:?} ns {} ar {} edns {:?}",
        m.metadata.id,
        m.metadata.flags(),
        m.queries
            .iter()
            .map(|q| (q.name().to_ascii(), q.query_type(), q.query_class()))
            .collect::<Vec<_>>(),
        answers,
        m.authorities.len(),
        m.additionals.len(),
        m.edns
            .as_ref()
            .map(|e| (e.max_payload(), e.version(), e.flags().dnssec_ok)),
    ) + &format!(" rcode {:?}", m.metadata.response_code)
}

#[tokio::test]
async fn udp_fast_path_answers_exactly_as_the_general_path() {
    let (dns, addrs, _up) = setup(&["c1"]).await;
    let h = TaskHandler {
        shared: dns.inner.shared.clone(),
        task: Arc::from("c1"),
        fallback: Arc::from(Vec::<String>::new()),
    };
    // (name, type, EDNS payload, answered by the fast path?)
    let cases: &[(&str, RecordType, Option<u16>, bool)] = &[
        ("web.", RecordType::A, None, true),
        ("web", RecordType::A, Some(1232), true),
        ("WeB.AppNet.", RecordType::A, None, true),
        ("tasks.web.", RecordType::A, Some(4096), true),
        ("TASKS.WEB.", RecordType::A, Some(300), true),
        ("web.1.w1.", RecordType::A, None, true),
        ("web.", RecordType::AAAA, None, true),
        ("web.", RecordType::MX, Some(1232), true),
        ("web-internal.", RecordType::A, None, true),
        // General path only: PTR, ANY, names to forward, names of networks c1 is not on.
        ("10.1.0.10.in-addr.arpa.", RecordType::PTR, None, false),
        ("web.", RecordType::ANY, None, false),
        ("example.org.", RecordType::A, None, false),
        ("secret.", RecordType::A, None, false),
    ];
    for &(name, t, edns, fast) in cases {
        let q = query_bytes(name, t, edns);
        let mut out = Vec::new();
        assert_eq!(
            udp::fast_answer(&h, &q, &mut out),
            fast,
            "{name} {t}: fast path taken?"
        );
        // The general path, through hickory's server, over TCP (same handler, no size limit).
        let general = tcp_msg(addrs[0], &q).await;
        if fast {
            let m = Message::from_vec(&out).expect("fast answer decodes");
            assert_eq!(seen(&m), seen(&general), "{name} {t}");
            // Owner names are lowercase on the wire, as the general path writes them.
            for r in &m.answers {
                assert_eq!(
                    r.name.to_ascii(),
                    r.name.to_ascii().to_lowercase(),
                    "{name}"
                );
            }
        }
        // What a client gets over UDP is the same either way.
        let udp = udp_msg(addrs[0], &q).await;
        assert_eq!(seen(&udp), seen(&general), "{name} {t} over UDP");
    }
}

#[tokio::test]
async fn udp_fast_path_leaves_unusual_queries_to_the_general_path() {
    let (dns, _addrs, _up) = setup(&["c1"]).await;
    let h = TaskHandler {
        shared: dns.inner.shared.clone(),
        task: Arc::from("c1"),
        fallback: Arc::from(Vec::<String>::new()),
    };
    let base = query_bytes("web.", RecordType::A, None);
    let mut out = Vec::new();
    assert!(udp::fast_answer(&h, &base, &mut out));
    let variant = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut q = base.clone();
        f(&mut q);
        q
    };
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("a response", variant(&|q| q[2] |= 0x80)),
        ("opcode STATUS", variant(&|q| q[2] |= 2 << 3)),
        ("TC set", variant(&|q| q[2] |= 0x02)),
        ("two questions", variant(&|q| q[5] = 2)),
        ("an answer record", variant(&|q| q[7] = 1)),
        ("trailing bytes", variant(&|q| q.push(0))),
        ("truncated question", variant(&|q| q.truncate(q.len() - 2))),
        (
            "class CH",
            variant(&|q| {
                let n = q.len();
                q[n - 1] = 3;
            }),
        ),
        ("compression pointer in the question", {
            let mut q = base[..12].to_vec();
            q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            q
        }),
        ("header only", base[..12].to_vec()),
    ];
    for (what, q) in refused {
        assert!(
            !udp::fast_answer(&h, &q, &mut out),
            "{what}: not for the fast path"
        );
    }
    // EDNS version 1 gets BADVERS from the general path.
    let mut m = Message::from_vec(&query_bytes("web.", RecordType::A, Some(1232))).unwrap();
    m.edns.as_mut().unwrap().set_version(1);
    assert!(
        !udp::fast_answer(&h, &m.to_vec().unwrap(), &mut out),
        "EDNS version 1"
    );
    // An answer over the client's UDP size needs TC: the general path truncates.
    let mut big = fixture();
    for i in 0..60u8 {
        big.tasks.insert(
            format!("x{i}"),
            task(
                &format!("x{i}"),
                "web",
                10 + i as u32,
                TaskState::Running,
                &[("appnet", &format!("10.0.1.{}", 100 + i))],
            ),
        );
    }
    dns.update(Arc::new(big));
    assert!(!udp::fast_answer(
        &h,
        &query_bytes("tasks.web.", RecordType::A, None),
        &mut out
    ));
    assert!(udp::fast_answer(
        &h,
        &query_bytes("tasks.web.", RecordType::A, Some(4096)),
        &mut out
    ));
}

/// UDP is served by the DNS thread, not the caller's runtime: a current-thread test runtime
/// that is blocked still gets its answers. Dropping the last `Dns` ends that thread's loops
/// and closes the socket (its port can be bound again).
#[tokio::test(flavor = "current_thread")]
async fn udp_runs_on_the_dns_thread_and_stops_with_the_last_dns() {
    let (dns, s, _up) = setup(&["c1"]).await;
    let c = s[0];
    // Block this runtime's only thread while a plain std socket asks: only the DNS thread
    // can answer.
    let q = query_bytes("web", RecordType::A, None);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind client");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    sock.send_to(&q, c).expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("answered while the caller's runtime is blocked");
    let m = Message::from_vec(&buf[..n]).expect("decode");
    assert_eq!(a_of(&m), ips(&["10.0.1.2"]));
    drop(dns);
    let mut rebound = false;
    for _ in 0..100 {
        if std::net::UdpSocket::bind(c).is_ok() {
            rebound = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rebound,
        "the UDP socket {c} is still open after the last Dns was dropped"
    );
}
