//! The real eBPF programs run on crafted packets through BPF_PROG_TEST_RUN (needs root, as
//! CI has). Each test loads the embedded object with its own pin directory, so tests run in
//! parallel without sharing maps.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use mesh_common::progs;

use super::{
    CtSizes, Datapath,
    packet::{self, Frame, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use crate::{
    model::{
        EndpointMode, Network, Node, PortSpec, Protocol, Service, ServiceNetwork, State, Task,
        TaskNetwork, TaskState,
    },
    tables::{self, LocalLink, LocalLinks, Reach, Tables},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn task_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 10 + i)
}
fn task_mac(i: u8) -> [u8; 6] {
    [0x02, 0x42, 10, 200, 0, 10 + i]
}

/// A loaded datapath with its own pins, removed on drop.
struct Fixture {
    dp: Option<Datapath>,
    pins: PathBuf,
    tables: Tables,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.unpin();
        }
        let _ = super::remove_pins(&self.pins);
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn state(n_tasks: u8, running: &[u8]) -> State {
    let mut s = State::default();
    s.nodes.insert(
        "n1".into(),
        Node {
            name: "n1".into(),
            address: NODE,
        },
    );
    s.networks.insert(
        "demo".into(),
        Network {
            name: "demo".into(),
            subnet: "10.200.0.0/24".parse().unwrap(),
            vni: 4200,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
        },
    );
    s.services.insert(
        "whoami".into(),
        Service {
            name: "whoami".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![ServiceNetwork {
                network: "demo".into(),
                vip: Some(Ipv4Addr::new(10, 200, 0, 2)),
                aliases: vec![],
            }],
            ports: vec![
                PortSpec {
                    published: 8080,
                    target: 80,
                    protocol: Protocol::Tcp,
                },
                PortSpec {
                    published: 8053,
                    target: 53,
                    protocol: Protocol::Udp,
                },
            ],
        },
    );
    for i in 1..=n_tasks {
        let id = format!("t{i}");
        s.tasks.insert(
            id.clone(),
            Task {
                id,
                service: "whoami".into(),
                slot: i as u32,
                node: "n1".into(),
                state: if running.contains(&i) {
                    TaskState::Running
                } else {
                    TaskState::Shutdown
                },
                netns: Some(format!("/run/netns/t{i}").into()),
                resolv_conf: None,
                networks: vec![TaskNetwork {
                    network: "demo".into(),
                    address: task_addr(i),
                }],
            },
        );
    }
    s
}

fn links(n: u8) -> LocalLinks {
    (1..=n)
        .map(|i| {
            (
                (format!("t{i}"), "demo".to_string()),
                LocalLink {
                    ifindex: 100 + i as u32,
                    task_mac: task_mac(i),
                    gw_mac: GW_MAC,
                },
            )
        })
        .collect()
}

/// A pin directory of this test process no other test uses.
fn unit_pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/mesh-unit-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Fixture {
    fn new() -> Self {
        let pins = unit_pin_dir();
        let mut dp = Datapath::load(&pins).expect("load the embedded eBPF object (needs root)");
        dp.maps.set_node_addrs(&[NODE]).unwrap();
        let mut f = Fixture {
            dp: Some(dp),
            pins,
            tables: Tables::new(),
        };
        f.program(&state(3, &[1, 2, 3]), 3);
        f
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    fn program(&mut self, s: &State, n_links: u8) {
        self.program_links(s, &links(n_links));
    }

    fn program_links(&mut self, s: &State, links: &LocalLinks) {
        let want = tables::desired(s, "n1", links, Reach::LocalOnly);
        let ops = self.tables.apply(&want).unwrap();
        self.dp().maps.apply(&ops).unwrap();
    }

    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dp().xdp_program(progs::XDP_INGRESS).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn tc(&mut self, name: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dp().tc_program(name).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn verdict(&mut self, name: &str) -> u64 {
        self.dp().maps.verdicts()[name]
    }
}

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT, sport, NODE, 8080, TCP_SYN)
}

fn checked(out: &[u8]) -> packet::Parsed {
    let p = packet::parse(out).expect("an IPv4 TCP/UDP frame");
    assert!(p.ip_csum_ok, "IPv4 checksum wrong: {p:?}");
    assert!(p.l4_csum_ok, "L4 checksum wrong: {p:?}");
    p
}

#[test]
fn published_syn_is_rewritten_to_a_task_with_exact_checksums_and_redirected() {
    let mut f = Fixture::new();
    let (rc, out) = f.xdp(&syn(40000).build());
    assert_eq!(rc, XDP_REDIRECT);
    let p = checked(&out);
    assert_eq!((p.src, p.sport), (CLIENT, 40000), "source untouched");
    assert_eq!(p.dport, 80);
    assert!((1..=3).any(|i| p.dst == task_addr(i)));
    let i = p.dst.octets()[3] - 10;
    assert_eq!(p.dst_mac, task_mac(i), "frame addressed to the task");
    assert_eq!(p.src_mac, GW_MAC, "from the task's gateway");
    assert_eq!(f.verdict("new_flow"), 1);
    assert_eq!(f.dp().maps.conntrack_len(), 2, "forward and reply entries");
}

#[test]
fn established_flow_sticks_and_new_flows_round_robin() {
    let mut f = Fixture::new();
    let first = checked(&f.xdp(&syn(40000).build()).1).dst;
    for _ in 0..5 {
        let (rc, out) = f.xdp(&Frame::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK).build());
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(
            checked(&out).dst,
            first,
            "every packet of a flow goes to one task"
        );
    }
    assert_eq!(f.verdict("established"), 5);
    // 30 new flows: strict round-robin, 10 per task, in rotation.
    let mut per = [0u32; 4];
    let mut seq = Vec::new();
    for sport in 41000..41030 {
        let d = checked(&f.xdp(&syn(sport).build()).1).dst;
        per[(d.octets()[3] - 10) as usize] += 1;
        seq.push(d);
    }
    assert_eq!(&per[1..], &[10, 10, 10]);
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "consecutive flows go to different tasks"
    );
}

/// A client that reuses the port of a connection it closed opens a new connection: balanced
/// again (round-robin moves on, as IPVS and the kernel's conntrack do), not stuck to the old
/// flow's task. A SYN retransmitted on an open flow is the same connection and stays with
/// its task.
#[test]
fn a_syn_on_the_tuple_of_a_closed_flow_is_balanced_again() {
    for hook in [None, Some(progs::TC_INGRESS)] {
        let mut f = Fixture::new();
        let send = |f: &mut Fixture, fr: Frame| match hook {
            None => f.xdp(&fr.build()),
            Some(p) => f.tc(p, &fr.build()),
        };
        let first = checked(&send(&mut f, syn(40000)).1).dst;
        let again = checked(&send(&mut f, syn(40000)).1).dst;
        assert_eq!(
            again, first,
            "{hook:?}: a retransmitted SYN stays with its task"
        );
        assert_eq!((f.verdict("new_flow"), f.verdict("established")), (1, 1));
        // A SYN on a flow the task closed but the client did not is a retransmission too.
        let (rc, out) = f.tc(
            progs::TC_TASK,
            &Frame::tcp(first, 80, CLIENT, 40000, TCP_FIN | TCP_ACK).build(),
        );
        assert_eq!(
            (rc, checked(&out).sport),
            (TC_ACT_REDIRECT, 8080),
            "the task's FIN reaches the client"
        );
        assert_eq!(checked(&send(&mut f, syn(40000)).1).dst, first);
        // The client closes too, then opens a new connection from the same port.
        assert_eq!(
            checked(
                &send(
                    &mut f,
                    Frame::tcp(CLIENT, 40000, NODE, 8080, TCP_FIN | TCP_ACK)
                )
                .1
            )
            .dst,
            first
        );
        let next = checked(&send(&mut f, syn(40000)).1).dst;
        assert_ne!(
            next, first,
            "{hook:?}: the new connection is balanced again"
        );
        assert_eq!((f.verdict("new_flow"), f.verdict("reopened")), (2, 1));
        assert_eq!(
            f.dp().maps.conntrack_len(),
            3,
            "the new flow's two entries and the old flow's reply entry"
        );
        // The new task's answer is reverse-NATed, and so is the old task's last FIN (sent
        // again from its TIME_WAIT): the client must see it from the published address.
        for task in [next, first] {
            let (rc, out) = f.tc(
                progs::TC_TASK,
                &Frame::tcp(task, 80, CLIENT, 40000, TCP_FIN | TCP_ACK).build(),
            );
            assert_eq!(
                (rc, checked(&out).src, checked(&out).sport),
                (TC_ACT_REDIRECT, NODE, 8080)
            );
        }
        // A RST from the old task reaches the client too, but does not close the new flow:
        // a SYN sent again on it is still a retransmission.
        let (rc, _) = f.tc(
            progs::TC_TASK,
            &Frame::tcp(first, 80, CLIENT, 40000, TCP_RST).build(),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(checked(&send(&mut f, syn(40000)).1).dst, next);
        assert_eq!(
            f.verdict("reopened"),
            1,
            "{hook:?}: the old task's RST closed the new flow"
        );
        // And the new flow is established on its task.
        let (_, out) = send(&mut f, Frame::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK));
        assert_eq!(checked(&out).dst, next);
    }
}

#[test]
fn reply_from_task_is_reverse_nated_to_the_node_address_and_client_mac() {
    let mut f = Fixture::new();
    let mut s = syn(40001);
    s.src_mac = CLIENT_MAC;
    s.dst_mac = NODE_MAC;
    let task = checked(&f.xdp(&s.build()).1).dst;
    let reply = Frame::tcp(task, 80, CLIENT, 40001, TCP_SYN | TCP_ACK);
    let (rc, out) = f.tc(progs::TC_TASK, &reply.build());
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = checked(&out);
    assert_eq!(
        (p.src, p.sport),
        (NODE, 8080),
        "client sees the published address"
    );
    assert_eq!((p.dst, p.dport), (CLIENT, 40001));
    assert_eq!(
        (p.dst_mac, p.src_mac),
        (CLIENT_MAC, NODE_MAC),
        "back the way it came"
    );
    assert_eq!(f.verdict("reply"), 1);
    // A task's other traffic is not touched.
    let other = Frame::tcp(task, 80, Ipv4Addr::new(10, 200, 0, 99), 5555, TCP_ACK).build();
    let (rc, out) = f.tc(progs::TC_TASK, &other);
    assert_eq!((rc, out), (TC_ACT_OK, other));
}

#[test]
fn udp_checksums_and_zero_checksum() {
    let mut f = Fixture::new();
    let (rc, out) = f.xdp(&Frame::udp(CLIENT, 5000, NODE, 8053, b"hello").build());
    assert_eq!(rc, XDP_REDIRECT);
    let p = checked(&out);
    assert_eq!((p.proto, p.dport), (17, 53));
    assert!(!p.udp_csum_zero);

    let mut z = Frame::udp(CLIENT, 5001, NODE, 8053, b"hello");
    z.l4 = L4::Udp { zero_csum: true };
    let (rc, out) = f.xdp(&z.build());
    assert_eq!(rc, XDP_REDIRECT);
    let p = checked(&out);
    assert!(
        p.udp_csum_zero,
        "a zero UDP checksum means none and must stay zero"
    );
    // And through TC (the reply direction) with the kernel helpers.
    let reply = Frame::udp(p.dst, 53, CLIENT, 5001, b"world");
    let (rc, out) = f.tc(progs::TC_TASK, &reply.build());
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = checked(&out);
    assert_eq!((p.src, p.sport), (NODE, 8053));
}

/// Where a test sends a frame: the XDP program, or a TC program by name.
#[derive(Clone, Copy)]
enum Hook {
    Xdp,
    Tc(&'static str),
}

/// `whole` in two fragments (`at` bytes of IP payload in the first, IP id `id`) through
/// `hook`, each returning `rc`: the datagram they make, checksums checked (and both with one
/// IP id: `reassemble` takes nothing else), and the IP id they left with.
fn through(
    f: &mut Fixture,
    hook: Hook,
    whole: &[u8],
    at: usize,
    id: u16,
    rc: u32,
) -> (packet::Parsed, u16) {
    let (first, later) = packet::fragment(whole, at, id);
    let ((rc1, out1), (rc2, out2)) = match hook {
        Hook::Xdp => (f.xdp(&first), f.xdp(&later)),
        Hook::Tc(prog) => (f.tc(prog, &first), f.tc(prog, &later)),
    };
    let what = match hook {
        Hook::Xdp => "xdp",
        Hook::Tc(prog) => prog,
    };
    assert_eq!((rc1, rc2), (rc, rc), "{what}: both fragments");
    let whole = packet::reassemble(&out1, &out2).expect("two fragments of one datagram");
    (checked(&whole), u16::from_be_bytes([out1[18], out1[19]]))
}

#[test]
fn fragments_of_a_balanced_datagram_follow_its_first_fragment_both_ways() {
    let mut f = Fixture::new();
    let mut d = Frame::udp(CLIENT, 5002, NODE, 8053, &[7u8; 100]);
    d.frag = 0; // no DF: the client's stack fragments what exceeds its MTU
    let (first, later) = packet::fragment(&d.build(), 48, 0x4242);

    // A later fragment that arrives before its first is not held back: passed untouched.
    let (rc, out) = f.xdp(&later);
    assert_eq!((rc, &out), (XDP_PASS, &later));
    assert_eq!(f.verdict("pass_fragment"), 1);

    // The first fragment is balanced by its ports and goes to the kernel rewritten (which
    // fragments it again for a task link of a smaller MTU); the later one follows it.
    let (rc, f1) = f.xdp(&first);
    assert_eq!(rc, XDP_PASS);
    let (rc, f2) = f.xdp(&later);
    assert_eq!(rc, XDP_PASS);
    assert_eq!(f.verdict("new_flow"), 1);
    assert_eq!(f.verdict("fragment"), 2);
    assert_eq!(f.verdict("pass_rewritten"), 2);
    let whole =
        packet::reassemble(&f1, &f2).expect("two fragments of one datagram, IP checksums right");
    let p = checked(&whole);
    assert_eq!((p.src, p.sport, p.dport), (CLIENT, 5002, 53));
    let task = p.dst;
    assert!((1..=3).any(|i| task == task_addr(i)), "{p:?}");
    assert_eq!(&whole[42..], &[7u8; 100], "payload untouched");

    // A datagram that is not ours, with the same addresses and IP id (the id wraps): its
    // first fragment takes back what the balanced one left, so its later fragment is not
    // taken for the balanced datagram's.
    let mut other = Frame::udp(CLIENT, 5002, NODE, 22, &[8u8; 100]);
    other.frag = 0;
    let (o1, o2) = packet::fragment(&other.build(), 48, 0x4242);
    assert_eq!(f.xdp(&o1), (XDP_PASS, o1.clone()), "not ours: untouched");
    assert_eq!(
        f.xdp(&o2),
        (XDP_PASS, o2.clone()),
        "its later fragment: untouched"
    );
    assert_eq!(f.verdict("pass_fragment"), 2);

    // The same flow's next datagram, whole, goes the same way (redirected: it fits).
    let (rc, out) = f.xdp(&d.build());
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(checked(&out).dst, task);

    // The task's reply, fragmented by its stack: reverse NAT on both fragments.
    let mut r = Frame::udp(task, 53, CLIENT, 5002, &[9u8; 200]);
    r.frag = 0;
    let (p, _) = through(
        &mut f,
        Hook::Tc(progs::TC_TASK),
        &r.build(),
        104,
        0x0101,
        TC_ACT_REDIRECT,
    );
    assert_eq!((p.src, p.sport, p.dst, p.dport), (NODE, 8053, CLIENT, 5002));

    // From the TC ingress hook: a datagram of another flow, fragments to the kernel rewritten.
    let mut d2 = Frame::udp(CLIENT, 5003, NODE, 8053, &[5u8; 64]);
    d2.frag = 0;
    let (p, _) = through(
        &mut f,
        Hook::Tc(progs::TC_INGRESS),
        &d2.build(),
        40,
        0x4343,
        TC_ACT_OK,
    );
    assert_eq!((p.src, p.sport, p.dport), (CLIENT, 5003, 53));
    assert!(
        (1..=3).any(|i| p.dst == task_addr(i)) && p.dst != task,
        "the next task: {p:?}"
    );
}

/// Every fragmented datagram mesh rewrites leaves with a fresh IP id, the same on all of its
/// fragments: datagrams that shared an id as sent (two clients', here) no longer do once
/// their addresses are rewritten, so no reassembly behind the node can mix them up (after
/// SNAT toward one task, or replies to one client through one frontend). Through XDP, TC
/// ingress and the task's TC reply path.
#[test]
fn rewritten_fragmented_datagrams_leave_with_fresh_ip_ids() {
    let mut f = Fixture::new();
    let client2 = Ipv4Addr::new(198, 18, 0, 9);
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for (src, sport, hook, to_kernel) in [
        (CLIENT, 5004, Hook::Xdp, XDP_PASS),
        (client2, 5004, Hook::Xdp, XDP_PASS),
        (CLIENT, 5005, Hook::Tc(progs::TC_INGRESS), TC_ACT_OK),
        (client2, 5005, Hook::Tc(progs::TC_INGRESS), TC_ACT_OK),
    ] {
        let mut d = Frame::udp(src, sport, NODE, 8053, &[3u8; 100]);
        d.frag = 0;
        let (p, id) = through(&mut f, hook, &d.build(), 48, 0x5151, to_kernel);
        assert_eq!((p.src, p.sport, p.dport), (src, sport, 53));
        ids.push(id);
        tasks.push((p.dst, src, sport));
    }
    // The tasks' replies, fragmented by their stacks with one id: reverse NAT, fresh ids.
    for (task, client, port) in tasks {
        let mut r = Frame::udp(task, 53, client, port, &[4u8; 200]);
        r.frag = 0;
        let hook = Hook::Tc(progs::TC_TASK);
        let (p, id) = through(&mut f, hook, &r.build(), 104, 0x5151, TC_ACT_REDIRECT);
        assert_eq!((p.src, p.sport, p.dst, p.dport), (NODE, 8053, client, port));
        ids.push(id);
    }
    let distinct: std::collections::BTreeSet<u16> = ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "a fresh id per datagram: {ids:04x?}"
    );
    assert_eq!(f.verdict("fragment"), 16);
}

/// A datagram larger than its task's link: with DF, XDP answers "fragmentation needed" with
/// that link's MTU, quoting the datagram as the client sent it, back out of the interface it
/// came in on; without DF, it goes to the kernel rewritten (which fragments it). The task
/// links are a real device of a network namespace of the test's own (`bpf_check_mtu` reads
/// its MTU), which BPF_PROG_TEST_RUN runs in when the test's thread is in it.
#[test]
fn a_datagram_too_big_for_its_tasks_link_is_answered_or_fragmented() {
    in_netns_with_mtu0(&[], || {
        let ifindex = nix::net::if_::if_nametoindex("mtu0").expect("mtu0's index");
        let mut f = Fixture::new();
        let links: LocalLinks = (1..=3u8)
            .map(|i| {
                (
                    (format!("t{i}"), "demo".to_string()),
                    LocalLink {
                        ifindex,
                        task_mac: task_mac(i),
                        gw_mac: GW_MAC,
                    },
                )
            })
            .collect();
        f.program_links(&state(3, &[1, 2, 3]), &links);

        // Fits (1400 bytes of IP): redirected as usual.
        let fits = Frame::udp(CLIENT, 6000, NODE, 8053, &[1u8; 1400 - 28]).build();
        assert_eq!(f.xdp(&fits).0, XDP_REDIRECT);

        // 1401 bytes with DF: the error, from the address the client sent to.
        let big = Frame::udp(CLIENT, 6001, NODE, 8053, &[2u8; 1401 - 28]).build();
        let (rc, out) = f.xdp(&big);
        assert_eq!(
            rc, XDP_REDIRECT,
            "sent back out of the interface it came in on"
        );
        assert_frag_needed(&out, &big, 1400);
        assert_eq!(f.verdict("drop_too_big"), 1);

        // The same without DF: to the kernel, rewritten.
        let mut nodf = Frame::udp(CLIENT, 6002, NODE, 8053, &[3u8; 1401 - 28]);
        nodf.frag = 0;
        let (rc, out) = f.xdp(&nodf.build());
        assert_eq!(rc, XDP_PASS);
        let p = checked(&out);
        assert_eq!((p.dst, p.dport), (task_addr(p.dst.octets()[3] - 10), 53));
        assert_eq!(f.verdict("drop_too_big"), 1);
    });
}

#[test]
fn tc_ingress_hook_balances_like_xdp() {
    let mut f = Fixture::new();
    let mut per = [0u32; 4];
    for sport in 42000..42006 {
        let (rc, out) = f.tc(progs::TC_INGRESS, &syn(sport).build());
        assert_eq!(rc, TC_ACT_REDIRECT);
        let p = checked(&out);
        assert_eq!(p.dport, 80);
        per[(p.dst.octets()[3] - 10) as usize] += 1;
    }
    assert_eq!(&per[1..], &[2, 2, 2]);
}

#[test]
fn traffic_that_is_not_ours_passes_untouched_and_is_counted() {
    let mut f = Fixture::new();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "pass_no_service",
            Frame::tcp(CLIENT, 1, NODE, 22, TCP_SYN).build(),
        ),
        (
            "pass_no_service",
            Frame::tcp(CLIENT, 1, Ipv4Addr::new(198, 18, 0, 77), 8080, TCP_SYN).build(),
        ),
        (
            "pass_no_service",
            Frame::udp(CLIENT, 1, NODE, 8080, b"x").build(),
        ),
    ];
    let mut icmp = syn(1);
    icmp.l4 = L4::Other(1);
    icmp.payload = vec![8, 0, 0, 0, 0, 0, 0, 0];
    cases.push(("pass_not_tcp_udp", icmp.build()));
    // A first fragment of a port no frontend uses, and a later fragment whose first fragment
    // was never seen (one of a balanced flow follows it: see the fragment test).
    let mut frag = Frame::tcp(CLIENT, 2, NODE, 22, TCP_SYN);
    frag.frag = 0x2000; // MF
    cases.push(("pass_no_service", frag.build()));
    let mut later = syn(2);
    later.frag = 0x0010; // offset
    cases.push(("pass_fragment", later.build()));
    let mut opts = syn(3);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    cases.push(("pass_ip_options", opts.build()));
    let mut v6 = syn(4).build();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    cases.push(("pass_not_ipv4", v6));
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    cases.push(("pass_not_ipv4", arp));
    let full = syn(5).build();
    cases.push(("pass_malformed", full[..40].to_vec())); // truncated TCP header
    cases.push(("pass_malformed", full[..20].to_vec())); // truncated IP header
    let mut badlen = full.clone();
    badlen[16..18].copy_from_slice(&400u16.to_be_bytes()); // tot_len beyond the frame
    cases.push(("pass_malformed", badlen));
    let mut ihl = full.clone();
    ihl[14] = 0x44; // IHL 4
    cases.push(("pass_malformed", ihl));
    let mut doff = full.clone();
    doff[14 + 20 + 12] = 0x40; // data offset 4
    cases.push(("pass_malformed", doff));

    for (why, frame) in cases {
        let before = f.verdict(why);
        let (rc, out) = f.xdp(&frame);
        assert_eq!(rc, XDP_PASS, "{why}");
        assert_eq!(out, frame, "{why}: passed untouched");
        assert_eq!(f.verdict(why), before + 1, "{why} counted");
        // BPF_PROG_TEST_RUN refuses an IPv4 skb shorter than an IP header before running
        // the program, so that one case is XDP-only.
        if frame.len() >= 34 || frame[12..14] != [0x08, 0x00] {
            let (rc, out) = f.tc(progs::TC_INGRESS, &frame);
            assert_eq!(
                (rc, out),
                (TC_ACT_OK, frame.clone()),
                "{why} (tc): passed untouched"
            );
        }
    }
    assert_eq!(f.dp().maps.conntrack_len(), 0, "nothing tracked");
}

#[test]
fn scaling_changes_new_flows_and_removed_backend_rebalances_its_flows() {
    let mut f = Fixture::new();
    // Find a flow on task 3.
    let mut on3 = None;
    for sport in 43000..43003 {
        if checked(&f.xdp(&syn(sport).build()).1).dst == task_addr(3) {
            on3 = Some(sport);
        }
    }
    let on3 = on3.expect("one of three flows lands on task 3");
    // Scale to 1 task.
    f.program(&state(3, &[1]), 3);
    for sport in 44000..44006 {
        assert_eq!(checked(&f.xdp(&syn(sport).build()).1).dst, task_addr(1));
    }
    // The flow that was on task 3 is not sent to the removed task any more.
    let (rc, out) = f.xdp(&Frame::tcp(CLIENT, on3, NODE, 8080, TCP_ACK).build());
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(checked(&out).dst, task_addr(1));
    assert_eq!(f.verdict("backend_gone"), 1);
    // Scale to 0 running tasks: the kernel gets the packet (and answers with a RST).
    f.program(&state(3, &[]), 3);
    let frame = syn(45000).build();
    let (rc, out) = f.xdp(&frame);
    assert_eq!((rc, out), (XDP_PASS, frame));
    assert_eq!(f.verdict("pass_no_backend"), 1);
}

#[test]
fn counters_track_packets_bytes_and_flows_per_service_and_backend() {
    let mut f = Fixture::new();
    let frame = syn(46000).build();
    let dst = checked(&f.xdp(&frame).1).dst;
    f.xdp(&Frame::tcp(CLIENT, 46000, NODE, 8080, TCP_ACK).build());
    let reply = Frame::tcp(dst, 80, CLIENT, 46000, TCP_ACK).build();
    f.tc(progs::TC_TASK, &reply);
    let (svc_id, be_id) = {
        let (_, fe) = f
            .tables
            .frontends()
            .find(|(id, _)| id.port == 8080)
            .unwrap();
        let be = f
            .tables
            .backends()
            .find(|(_, _, b)| b.addr == dst && b.port == 80)
            .unwrap()
            .0;
        (fe.svc_id, be)
    };
    let s = f.dp().maps.service_stats(svc_id);
    assert_eq!((s.flows, s.pkts_in, s.pkts_out), (1, 2, 1));
    assert_eq!(s.bytes_in, 2 * frame.len() as u64);
    assert_eq!(s.bytes_out, reply.len() as u64);
    let b = f.dp().maps.backend_stats(be_id);
    assert_eq!((b.flows, b.pkts_in, b.pkts_out), (1, 2, 1));
}

#[test]
fn a_task_cannot_send_into_another_network() {
    const TC_ACT_SHOT: u32 = 2;
    let mut f = Fixture::new();
    f.dp()
        .maps
        .set_subnets(&[
            ("10.200.0.0/24".parse().unwrap(), 4200),
            ("10.201.0.0/24".parse().unwrap(), 4201),
        ])
        .unwrap();
    // BPF_PROG_TEST_RUN runs TC programs on loopback (ifindex 1): call it a task veth on 4200.
    f.dp()
        .maps
        .set_iface_nets(&[(1u32, 4200u32)].into_iter().collect())
        .unwrap();
    let from_task = |dst: Ipv4Addr| Frame::tcp(task_addr(1), 5555, dst, 80, TCP_SYN).build();
    let (rc, _) = f.tc(progs::TC_TASK, &from_task(Ipv4Addr::new(10, 201, 0, 5)));
    assert_eq!(rc, TC_ACT_SHOT, "other network: dropped");
    assert_eq!(f.verdict("drop_other_network"), 1);
    // ICMP too (not only what the load balancer parses).
    let mut icmp = Frame::tcp(task_addr(1), 0, Ipv4Addr::new(10, 201, 0, 5), 0, 0);
    icmp.l4 = L4::Other(1);
    icmp.payload = vec![8, 0, 0, 0, 0, 0, 0, 0];
    let (rc, _) = f.tc(progs::TC_TASK, &icmp.build());
    assert_eq!(rc, TC_ACT_SHOT, "ICMP into another network: dropped");
    assert_eq!(f.verdict("drop_other_network"), 2);
    for ok in [Ipv4Addr::new(10, 200, 0, 99), Ipv4Addr::new(198, 18, 0, 7)] {
        let frame = from_task(ok);
        let (rc, out) = f.tc(progs::TC_TASK, &frame);
        assert_eq!(
            (rc, out),
            (TC_ACT_OK, frame),
            "{ok}: own network or outside the mesh passes"
        );
    }
    assert_eq!(f.verdict("drop_other_network"), 2);
}

#[test]
fn remote_backend_flows_are_snated_to_the_node_and_replies_come_back() {
    let mut f = Fixture::new();
    f.dp().configure(Some(NODE), true).unwrap();
    f.tables
        .reserve_ports(mesh_common::SNAT_PORT_MIN, mesh_common::SNAT_PORT_MAX);
    // Task 1 local, tasks 2 and 3 on another node (no link: reached through the kernel).
    let mut s = state(3, &[1, 2, 3]);
    for i in [2u8, 3] {
        s.tasks.get_mut(&format!("t{i}")).unwrap().node = "n2".into();
    }
    s.nodes.insert(
        "n2".into(),
        crate::model::Node {
            name: "n2".into(),
            address: Ipv4Addr::new(198, 18, 0, 9),
        },
    );
    let want = tables::desired(&s, "n1", &links(1), Reach::Cluster);
    let ops = f.tables.apply(&want).unwrap();
    f.dp().maps.apply(&ops).unwrap();
    let mut frame = syn(47000);
    frame.src_mac = CLIENT_MAC;
    frame.dst_mac = NODE_MAC;
    let mut remote = None;
    for sport in 47000..47003 {
        frame.sport = sport;
        let (rc, out) = f.xdp(&frame.build());
        let p = checked(&out);
        if p.dst == task_addr(1) {
            assert_eq!(
                (rc, p.src, p.sport),
                (XDP_REDIRECT, CLIENT, sport),
                "local task: client address kept"
            );
        } else {
            assert_eq!(
                rc, XDP_PASS,
                "remote task: the kernel routes it over the overlay"
            );
            assert_eq!(p.src, NODE, "SNAT to the node's underlay address");
            assert!(
                p.sport >= mesh_common::SNAT_PORT_MIN,
                "SNAT port from the reserved range: {}",
                p.sport
            );
            remote = Some((sport, p.dst, p.sport));
        }
    }
    let (csport, task, snat_port) = remote.expect("two of three flows are remote");
    assert_eq!(f.verdict("snat"), 2);
    // The remote task's reply arrives on the node's interface (routed over the underlay).
    let reply = Frame::tcp(task, 80, NODE, snat_port, TCP_SYN | TCP_ACK);
    let (rc, out) = f.xdp(&reply.build());
    assert_eq!(rc, XDP_REDIRECT);
    let p = checked(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (NODE, 8080, CLIENT, csport)
    );
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, NODE_MAC));
}

/// One task on another node (every flow is SNATed) and a SNAT range of one port.
fn one_port_snat_fixture() -> Fixture {
    snat_fixture(1)
}

/// One task on another node (every flow is SNATed) and a SNAT range of `ports` ports from
/// 61000.
fn snat_fixture(ports: u16) -> Fixture {
    let mut f = Fixture::new();
    f.dp()
        .maps
        .set_config(mesh_common::Config {
            netns_cookie: 0,
            flags: 0,
            snat_addr: u32::from_ne_bytes(NODE.octets()),
            snat_port_min: 61_000,
            snat_port_max: 61_000 + ports - 1,
            dns_port: 0,
            _pad: 0,
        })
        .unwrap();
    f.tables.reserve_ports(61_000, 61_000 + ports - 1);
    // One task, on another node: every flow is SNATed to it.
    let mut s = state(1, &[1]);
    s.tasks = s
        .tasks
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                Task {
                    node: "n2".into(),
                    ..t
                },
            )
        })
        .collect();
    s.nodes.insert(
        "n2".into(),
        crate::model::Node {
            name: "n2".into(),
            address: Ipv4Addr::new(198, 18, 0, 9),
        },
    );
    let want = tables::desired(&s, "n1", &links(0), Reach::Cluster);
    let ops = f.tables.apply(&want).unwrap();
    f.dp().maps.apply(&ops).unwrap();
    f
}

fn client_to_node(f: &mut Fixture, sport: u16, flags: u8) -> (u32, Vec<u8>) {
    let mut fr = Frame::tcp(CLIENT, sport, NODE, 8080, flags);
    fr.src_mac = CLIENT_MAC;
    fr.dst_mac = NODE_MAC;
    f.xdp(&fr.build())
}

/// A RST ends a flow both ways: the side that receives it sends no FIN. Whichever side
/// resets, the flow's SNAT port becomes reclaimable at once.
#[test]
fn a_reset_from_either_side_frees_the_snat_port() {
    for task_resets in [true, false] {
        let mut f = one_port_snat_fixture();
        let (_, out) = client_to_node(&mut f, 40_001, TCP_SYN);
        let p = checked(&out);
        assert_eq!(p.sport, 61_000);
        let task = p.dst;
        if task_resets {
            let (rc, out) = f.xdp(&Frame::tcp(task, 80, NODE, 61_000, TCP_RST | TCP_ACK).build());
            assert_eq!(
                (rc, checked(&out).dport),
                (XDP_REDIRECT, 40_001),
                "the RST reaches the client"
            );
        } else {
            let (_, out) = client_to_node(&mut f, 40_001, TCP_RST);
            assert_eq!(
                checked(&out).sport,
                61_000,
                "the client's RST reaches the task"
            );
        }
        let (_, out) = client_to_node(&mut f, 40_002, TCP_SYN);
        let p = checked(&out);
        assert_eq!(
            p.sport, 61_000,
            "task_resets={task_resets}: the reset flow's port is reclaimed"
        );
        assert_eq!(f.verdict("snat_reclaimed"), 1);
    }
}

/// A backend's SNAT ports are handed out in turn, so a port comes back only after every other
/// one of the range was used: the port reused is the one used longest ago, whatever order
/// the flows closed in. A port whose flow is still open is skipped; when every port tried
/// is held by an open flow, the new flow gets none.
#[test]
fn snat_ports_are_handed_out_in_turn_and_an_open_flows_port_is_skipped() {
    for close_last_first in [false, true] {
        let mut f = snat_fixture(3);
        let mut flows = Vec::new();
        for sport in [40_001, 40_002, 40_003] {
            let (_, out) = client_to_node(&mut f, sport, TCP_SYN);
            let p = checked(&out);
            flows.push((sport, p.sport, p.dst));
        }
        let ports: Vec<u16> = flows.iter().map(|f| f.1).collect();
        assert_eq!(
            ports,
            [61_000, 61_001, 61_002],
            "in turn from the start of the range"
        );
        // Close the first and the third flow both ways (in either order); the second stays open.
        let mut closed = vec![flows[0], flows[2]];
        if close_last_first {
            closed.reverse();
        }
        for (sport, port, task) in &closed {
            client_to_node(&mut f, *sport, TCP_FIN | TCP_ACK);
            f.xdp(&Frame::tcp(*task, 80, NODE, *port, TCP_FIN | TCP_ACK).build());
        }
        // The range starts over: the first port (its flow closed) is reclaimed...
        let (_, out) = client_to_node(&mut f, 40_004, TCP_SYN);
        assert_eq!(
            checked(&out).sport,
            61_000,
            "close_last_first={close_last_first}"
        );
        assert_eq!(f.verdict("snat_reclaimed"), 1);
        // ... the second is held by an open flow and skipped, the third is reclaimed.
        let (_, out) = client_to_node(&mut f, 40_005, TCP_SYN);
        assert_eq!(
            checked(&out).sport,
            61_002,
            "close_last_first={close_last_first}"
        );
        assert_eq!(f.verdict("snat_reclaimed"), 2);
        // Every port now held by an open flow: none for another (passed untouched).
        let (_, out) = client_to_node(&mut f, 40_006, TCP_SYN);
        assert_eq!(checked(&out).sport, 40_006);
        assert_eq!(f.verdict("err_snat_ports"), 1);
        // The open flow and the two new ones keep their ports, both ways.
        for (sport, port) in [(40_002, 61_001), (40_004, 61_000), (40_005, 61_002)] {
            let (_, out) = client_to_node(&mut f, sport, TCP_ACK);
            assert_eq!(checked(&out).sport, port);
            let (_, out) = f.xdp(&Frame::tcp(flows[0].2, 80, NODE, port, TCP_ACK).build());
            assert_eq!(checked(&out).dport, sport);
        }
    }
}

/// A SNAT range of one port: a second flow to the remote task finds no port while the
/// first is open, even half-closed; once it has closed both ways (FIN from the client, FIN
/// from the task), a new flow takes its port over and the old flow's entries are gone.
#[test]
fn snat_port_of_a_flow_closed_both_ways_is_reclaimed() {
    let mut f = one_port_snat_fixture();
    let send = client_to_node;
    // Flow 1 gets the one port.
    let (rc, out) = send(&mut f, 40_001, TCP_SYN);
    let p = checked(&out);
    assert_eq!((rc, p.src, p.sport), (XDP_PASS, NODE, 61_000));
    let task = p.dst;
    assert_eq!(task, task_addr(1));
    // No port for a second flow while flow 1 is open.
    let (rc, out) = send(&mut f, 40_004, TCP_SYN);
    assert_eq!(
        (rc, checked(&out).sport),
        (XDP_PASS, 40_004),
        "no free port: passed untouched"
    );
    assert_eq!(f.verdict("err_snat_ports"), 1);
    // The client closes (FIN): half-closed, the port stays taken.
    let (_, out) = send(&mut f, 40_001, TCP_FIN | TCP_ACK);
    assert_eq!(
        checked(&out).sport,
        61_000,
        "FIN of an open flow is rewritten as usual"
    );
    let (_, out) = send(&mut f, 40_005, TCP_SYN);
    assert_eq!(checked(&out).sport, 40_005, "half-closed: still no port");
    // The task closes too: its FIN comes back over the underlay and is reverse-NATed.
    let (rc, out) = f.xdp(&Frame::tcp(task, 80, NODE, 61_000, TCP_FIN | TCP_ACK).build());
    let p = checked(&out);
    assert_eq!(
        (rc, p.src, p.dst, p.dport),
        (XDP_REDIRECT, NODE, CLIENT, 40_001)
    );
    // Now a new flow to that task takes the port over.
    let (rc, out) = send(&mut f, 40_006, TCP_SYN);
    let p = checked(&out);
    assert_eq!(
        (rc, p.dst, p.sport),
        (XDP_PASS, task, 61_000),
        "the closed flow's port is reclaimed"
    );
    assert_eq!(f.verdict("snat_reclaimed"), 1);
    // The task's replies go to the new flow's client port; the old flow is forgotten.
    let (_, out) = f.xdp(&Frame::tcp(task, 80, NODE, 61_000, TCP_SYN | TCP_ACK).build());
    assert_eq!(checked(&out).dport, 40_006);
    let (rc, out) = send(&mut f, 40_001, TCP_ACK);
    assert_eq!(
        (rc, checked(&out).sport),
        (XDP_PASS, 40_001),
        "the old flow's last ACK is not sent as the new flow's (no port for it: passed untouched)"
    );
}

/// A client reopens its tuple after a SNATed flow closed both ways: the new flow takes a free
/// port, and the old flow's reply entry (the task may still hold that port in TIME_WAIT)
/// stays. That orphaned port is reclaimable for another client without touching the
/// reopened flow, whose forward entry now has the client tuple.
#[test]
fn a_reopened_tuple_keeps_its_new_snat_port_when_the_old_one_is_reclaimed() {
    let mut f = snat_fixture(2);
    let (_, out) = client_to_node(&mut f, 40_001, TCP_SYN);
    let p = checked(&out);
    let (old_port, task) = (p.sport, p.dst);
    client_to_node(&mut f, 40_001, TCP_FIN | TCP_ACK);
    f.xdp(&Frame::tcp(task, 80, NODE, old_port, TCP_FIN | TCP_ACK).build());
    let (_, out) = client_to_node(&mut f, 40_001, TCP_SYN);
    let new_port = checked(&out).sport;
    assert_ne!(
        new_port, old_port,
        "the free port, not the one the task may hold in TIME_WAIT"
    );
    assert_eq!((f.verdict("reopened"), f.verdict("snat_reclaimed")), (1, 0));
    // Another client: the only port left is the old flow's.
    let (_, out) = client_to_node(&mut f, 40_002, TCP_SYN);
    assert_eq!(
        checked(&out).sport,
        old_port,
        "the orphaned closed port is reclaimed"
    );
    assert_eq!(f.verdict("snat_reclaimed"), 1);
    // The reopened flow is untouched, both ways.
    let (_, out) = client_to_node(&mut f, 40_001, TCP_ACK);
    assert_eq!(checked(&out).sport, new_port);
    let (_, out) = f.xdp(&Frame::tcp(task, 80, NODE, new_port, TCP_ACK).build());
    assert_eq!(checked(&out).dport, 40_001);
    let (_, out) = f.xdp(&Frame::tcp(task, 80, NODE, old_port, TCP_ACK).build());
    assert_eq!(checked(&out).dport, 40_002);
}

/// Conntrack keeps a live flow while the map has room, however the flows are spread over
/// the CPUs: here every flow is made on one CPU (a veth's packets are handled on the
/// sender's CPU). With per-CPU LRU lists the kernel would give each possible CPU an equal
/// share of the entries and this CPU would evict its oldest flows once its share was used.
#[test]
fn flows_made_on_one_cpu_can_use_the_whole_conntrack() {
    let me = nix::unistd::Pid::from_raw(0);
    let old = nix::sched::sched_getaffinity(me).expect("affinity");
    let mut one = nix::sched::CpuSet::new();
    let cpu = (0..nix::sched::CpuSet::count())
        .find(|c| old.is_set(*c).unwrap_or(false))
        .unwrap_or(0);
    one.set(cpu).unwrap();
    nix::sched::sched_setaffinity(me, &one).expect("pin to one CPU");
    let mut f = Fixture::new();
    let first = checked(&f.xdp(&syn(40000).build()).1).dst;
    // Three quarters of the map, two entries per flow.
    let flows = mesh_common::maps::MAX_CT_TCP as usize * 3 / 8;
    for i in 0..flows {
        let src = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
        let (rc, _) =
            f.xdp(&Frame::tcp(src, 10_000 + (i >> 16) as u16, NODE, 8080, TCP_SYN).build());
        assert_eq!(rc, XDP_REDIRECT);
    }
    nix::sched::sched_setaffinity(me, &old).expect("restore affinity");
    assert_eq!(
        f.dp().maps.conntrack_lens()[0],
        2 * flows + 2,
        "no flow was evicted"
    );
    let est = f.verdict("established");
    let (_, out) = f.xdp(&Frame::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK).build());
    assert_eq!(checked(&out).dst, first);
    assert_eq!(
        f.verdict("established"),
        est + 1,
        "the first flow is still known"
    );
}

/// Removes a pin directory when the test ends, passed or not.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = super::remove_pins(&self.0);
    }
}

/// `--conntrack-*-max` sizes the conntrack maps when they are created. The kernel cannot
/// resize a map: an agent started with the pinned maps of one that had other sizes replaces
/// the conntrack map whose size changed (empty) and keeps the other, with its flows.
#[test]
fn conntrack_is_sized_at_load_and_replaced_when_its_size_changes() {
    let pins = Pins(unit_pin_dir());
    let small = CtSizes {
        tcp: 4_096,
        udp: 2_048,
    };
    let key = |i: u32| mesh_common::CtKey {
        saddr: i,
        daddr: 7,
        sport: 1,
        dport: 2,
    };
    let entry = |i: u32| mesh_common::CtEntry {
        saddr: i,
        daddr: 7,
        sport: 1,
        dport: 2,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        svc_id: 1,
        backend_id: 1,
        flags: mesh_common::ct_flags::FORWARD,
    };
    {
        let mut dp = Datapath::load_sized(&pins.0, small).expect("load (needs root)");
        assert_eq!(
            dp.maps.ct_capacity,
            [4_096, 2_048],
            "created at the asked sizes"
        );
        for i in 0..3 {
            dp.maps.ct_tcp.insert(key(i), entry(i), 0).unwrap();
        }
        dp.maps.ct_udp.insert(key(9), entry(9), 0).unwrap();
        // The agent stops keeping its maps pinned (an upgrade).
    }
    {
        let dp = Datapath::load_sized(&pins.0, small).expect("reload");
        assert_eq!(
            dp.maps.conntrack_lens(),
            [3, 1],
            "same sizes: the pinned flows are kept"
        );
    }
    let bigger = CtSizes {
        tcp: 8_192,
        ..small
    };
    let mut dp = Datapath::load_sized(&pins.0, bigger).expect("reload at another size");
    assert_eq!(dp.maps.ct_capacity, [8_192, 2_048]);
    assert_eq!(
        dp.maps.conntrack_lens(),
        [0, 1],
        "the resized TCP conntrack starts empty, UDP kept"
    );
    // The new map holds what the old one could not: the kernel itself enforces the size.
    for i in 0..6_000 {
        dp.maps.ct_tcp.insert(key(i), entry(i), 0).unwrap();
    }
    assert_eq!(
        dp.maps.conntrack_lens()[0],
        6_000,
        "more entries than the 4,096 of before, none evicted"
    );
    assert_eq!(
        aya::maps::MapInfo::from_pin(pins.0.join(mesh_common::maps::CT_TCP))
            .unwrap()
            .max_entries(),
        8_192,
        "the pin names the new map"
    );
    drop(dp);
    // Out of bounds: a clear error naming the setting, nothing loaded.
    let err = Datapath::load_sized(&pins.0, CtSizes { udp: 10, ..small })
        .err()
        .expect("refused");
    assert!(err.to_string().contains("conntrack_udp_max"), "{err}");
}

#[test]
fn a_tcp_and_a_udp_flow_on_one_tuple_are_tracked_apart() {
    let mut f = Fixture::new();
    let mut s = state(3, &[1, 2, 3]);
    s.services.get_mut("whoami").unwrap().ports.push(PortSpec {
        published: 8053,
        target: 53,
        protocol: Protocol::Tcp,
    });
    f.program(&s, 3);
    // UDP then TCP from the same client port to the same published port: two flows. (Each
    // frontend has its own round-robin cursor: a first UDP flow from another port moves the
    // UDP one on, so the two flows of the tuple land on different tasks.)
    assert_eq!(
        f.xdp(&Frame::udp(CLIENT, 4999, NODE, 8053, b"q").build()).0,
        XDP_REDIRECT
    );
    let (rc, out) = f.xdp(&Frame::udp(CLIENT, 5000, NODE, 8053, b"q").build());
    assert_eq!(rc, XDP_REDIRECT);
    let udp_task = checked(&out).dst;
    let (rc, out) = f.xdp(&Frame::tcp(CLIENT, 5000, NODE, 8053, TCP_SYN).build());
    assert_eq!(rc, XDP_REDIRECT);
    let tcp_task = checked(&out).dst;
    assert_eq!(
        f.verdict("new_flow"),
        3,
        "the TCP SYN is a new flow, not the UDP flow's packet"
    );
    assert_ne!(tcp_task, udp_task);
    assert_eq!(
        f.dp().maps.conntrack_lens(),
        [2, 4],
        "two entries per flow, each in its protocol's table"
    );
    // Each keeps its own task.
    for _ in 0..3 {
        assert_eq!(
            checked(&f.xdp(&Frame::udp(CLIENT, 5000, NODE, 8053, b"q").build()).1).dst,
            udp_task
        );
        assert_eq!(
            checked(
                &f.xdp(&Frame::tcp(CLIENT, 5000, NODE, 8053, TCP_ACK).build())
                    .1
            )
            .dst,
            tcp_task
        );
    }
    assert_eq!(f.verdict("established"), 6);
}

/// The programs' own code calls no `memset`, `memmove`, `memcpy`, `memcmp` or `bcmp`: the
/// BPF backend emits those it does not inline as calls of byte-at-a-time loops (zeroing a
/// 38-byte header image and a 52-byte `bpf_fib_lookup` that way cost the TC path ≈ 50 ns
/// per packet). Only cold functions of their own in `.text` (`#[inline(never)]`: the ICMP
/// builders) may use them.
#[test]
fn programs_call_no_byte_loop_mem_functions() {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};
    let obj = object::File::parse(super::OBJECT).expect("the embedded eBPF object parses");
    let mut programs = 0;
    let mut calls = Vec::new();
    for sec in obj.sections() {
        let name = sec.name().unwrap_or_default();
        if sec.kind() != SectionKind::Text || name == ".text" {
            continue;
        }
        programs += 1;
        for (off, rel) in sec.relocations() {
            let RelocationTarget::Symbol(i) = rel.target() else {
                continue;
            };
            let sym = obj
                .symbol_by_index(i)
                .and_then(|s| s.name())
                .unwrap_or_default();
            if matches!(sym, "memset" | "memmove" | "memcpy" | "memcmp" | "bcmp") {
                calls.push(format!("{name}+{off:#x}: {sym}"));
            }
        }
    }
    assert!(programs >= 3, "found only {programs} program sections");
    assert!(
        calls.is_empty(),
        "byte-loop calls in the programs: {calls:?}"
    );
}

/// Pins of maps of an older layout (a renamed `_V<n>`) are removed when the datapath loads;
/// this object's maps, links and anything not shaped like a map of mesh's stay.
#[test]
fn pins_of_superseded_map_layouts_are_removed() {
    use mesh_common::maps;
    assert!(super::superseded_map_pin("FRAGS_V1"));
    assert!(super::superseded_map_pin("CT_TCP_V2"));
    for keep in [
        maps::FRAGS,
        maps::CT_TCP,
        "links",
        "FRAGS_V",
        "frags_V1",
        "_V1",
        "X_V1a",
    ] {
        assert!(!super::superseded_map_pin(keep), "{keep}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for f in ["FRAGS_V1", maps::FRAGS, "CT_TCP_V2", maps::CT_TCP, "README"] {
        std::fs::write(dir.path().join(f), b"").expect("write");
    }
    std::fs::create_dir(dir.path().join("OLD_V1")).expect("a directory is never a map pin");
    let mut gone = super::unpin_superseded(dir.path()).expect("unpin");
    gone.sort();
    assert_eq!(gone, ["CT_TCP_V2", "FRAGS_V1"]);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = vec![maps::CT_TCP, maps::FRAGS, "OLD_V1", "README"];
    want.sort();
    assert_eq!(left, want);
}

/// TC toward a task on another node checks the route's MTU with the datagram's IP length:
/// one byte over it with DF is answered with "fragmentation needed", even while the next
/// hop's neighbour is unresolved (the kernel's check of an skb without a length allowed 4
/// bytes more, and ran only once the neighbour was known). The route is a real one, in a
/// network namespace of the test's own with a 1400-byte veth.
#[test]
fn a_datagram_too_big_for_the_route_to_a_remote_task_is_answered_by_tc() {
    let route = format!("{}/32", task_addr(1));
    in_netns_with_mtu0(
        &[
            &["link", "set", "mtu1", "up"],
            &["route", "add", &route, "dev", "mtu0"],
        ],
        || {
            let mut f = snat_fixture(8);
            // Fits the route (1400 bytes of IP): out of it, the neighbour resolved by the kernel.
            let fits = Frame::udp(CLIENT, 6100, NODE, 8053, &[1u8; 1400 - 28]).build();
            assert_eq!(f.tc(progs::TC_INGRESS, &fits).0, TC_ACT_REDIRECT);
            assert_eq!((f.verdict("redirect"), f.verdict("drop_too_big")), (1, 0));
            // 1401 to 1404 bytes with DF: the error, with the route's MTU.
            for (i, len) in (1401..=1404usize).enumerate() {
                let big =
                    Frame::udp(CLIENT, 6101 + i as u16, NODE, 8053, &vec![2u8; len - 28]).build();
                let (rc, out) = f.tc(progs::TC_INGRESS, &big);
                assert_eq!(rc, TC_ACT_REDIRECT, "{len}");
                assert_frag_needed(&out, &big, 1400);
            }
            assert_eq!(f.verdict("drop_too_big"), 4);
        },
    );
}

/// Run `body` on a thread of its own in a new network namespace holding a veth pair, `mtu0`
/// (MTU 1400, up) and `mtu1`, after `ip` runs each of `more` there. BPF_PROG_TEST_RUN runs
/// in the namespace of the calling thread, so the programs see these devices and routes;
/// the namespace goes with the thread.
fn in_netns_with_mtu0(more: &[&[&str]], body: impl FnOnce() + Send + 'static) {
    let veth: [&[&str]; 2] = [
        &[
            "link", "add", "mtu0", "type", "veth", "peer", "name", "mtu1",
        ],
        &["link", "set", "mtu0", "mtu", "1400", "up"],
    ];
    let cmds: Vec<Vec<String>> = veth
        .iter()
        .chain(more)
        .map(|a| a.iter().map(|s| s.to_string()).collect())
        .collect();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of its own");
        for args in &cmds {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?}");
        }
        body();
    })
    .join()
    .expect("the test's thread");
}

/// `out` is the ICMP "fragmentation needed" answer to `sent` (a frame from CLIENT to NODE):
/// back to the client's MAC from the node's, from the address the client sent to, both
/// checksums right, the next-hop MTU `mtu`, quoting the datagram's headers as sent.
fn assert_frag_needed(out: &[u8], sent: &[u8], mtu: u16) {
    assert_eq!(out.len(), 14 + 56, "Ethernet + IPv4 + ICMP + the quote");
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&CLIENT_MAC[..], &NODE_MAC[..]),
        "MACs swapped"
    );
    let ip = &out[14..34];
    assert_eq!(
        !mesh_common::csum::fold(mesh_common::csum::sum_be(ip)),
        0,
        "IPv4 checksum"
    );
    assert_eq!(
        (ip[9], &ip[12..16], &ip[16..20]),
        (1, &NODE.octets()[..], &CLIENT.octets()[..])
    );
    let icmp = &out[34..];
    assert_eq!(
        !mesh_common::csum::fold(mesh_common::csum::sum_be(icmp)),
        0,
        "ICMP checksum"
    );
    assert_eq!(
        (icmp[0], icmp[1], u16::from_be_bytes([icmp[6], icmp[7]])),
        (3, 4, mtu)
    );
    assert_eq!(
        &icmp[8..],
        &sent[14..42],
        "quotes the datagram as the client sent it"
    );
}
