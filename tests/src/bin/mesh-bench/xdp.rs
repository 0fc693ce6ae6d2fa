//! Section 1, per-packet cost of the hot path through BPF_PROG_TEST_RUN (aya `TestRun`): the
//! kernel's own `duration` (ns per run, averaged over `repeat` runs on one buffer).
//!
//! With `repeat` > 1 every iteration reuses one buffer, so a rewrite persists into the next
//! iteration. Each path is forced so that it really is taken on every iteration, and the
//! per-reason verdict counters (`VERDICTS_V1`) prove it afterwards:
//! - established: two conntrack entries that map the flow onto each other (A → B, B → A),
//!   so every iteration is a conntrack hit with a full rewrite (address, port, both
//!   checksums, MACs) and a redirect;
//! - reply (TC `mesh_tc_task`): the same ping-pong with two REPLY entries;
//! - pass-through: a TCP SYN to a port no frontend uses (nothing is rewritten);
//! - new flow: (a) distinct SYNs to a published port with local backends, one run each
//!   (repeat = 1), mean of `duration` minus the timer overhead of a repeat-1 run (measured
//!   on the pass-through path); (b) a self-regenerating new flow at full repeat: a service
//!   whose backends are remote (so the agent's SNAT applies) and whose addresses are node
//!   addresses on the published port: every rewrite gives the packet the next SNAT
//!   source port of the next backend, so the next iteration misses conntrack again and balances, SNATs and
//!   inserts two entries anew. (a) and (b) run with conntrack full, so every insert evicts
//!   (what a conntrack without garbage collection does in a steady state); (a') repeats (a)
//!   into a conntrack with free entries, so the difference is the cost of eviction; (a'')
//!   repeats (a) into full conntrack maps of three sizes (`--conntrack-tcp-max`): what the
//!   size of the map, i.e. cold memory, costs a new flow.

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use aya::programs::{TestRun, TestRunOptions};
use mesh_agent::{
    ebpf::{
        CtSizes, Datapath,
        packet::{self, Frame, TCP_ACK, TCP_SYN},
    },
    model::{
        EndpointMode, Network, Node, PortSpec, Protocol, Service, ServiceNetwork, State, Task,
        TaskNetwork, TaskState,
    },
    tables::{self, LocalLink, LocalLinks, Reach, Tables},
};
use mesh_common::{Backend, Config, CtEntry, CtKey, be_flags, ct_flags, maps as mapnames, progs};
use serde_json::{Value, json};

use crate::{
    Ctx,
    util::{self, Section, Stat, fmt_num, md_table, stat},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_OK: u32 = 0;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Node addresses that double as remote backends of the self-regenerating new-flow service.
const LOOP_BACKENDS: u8 = 200;
const LOOP_PORT: u16 = 9090;
/// A backend id outside what the tables hand out, for the established ping-pong.
const PINGPONG_BE: u32 = mapnames::MAX_BACKENDS - 2;

fn task_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 10 + i)
}
fn task_mac(i: u8) -> [u8; 6] {
    [0x02, 0x42, 10, 200, 0, 10 + i]
}
fn loop_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i)
}
fn ne(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// The small fixture: `web` (published 8080 → 80, three local tasks, a VIP) and `loop`
/// (published 9090 → 9090, 200 remote tasks whose addresses are node addresses).
fn base_state(s: &mut State) {
    s.nodes.insert(
        "n0".into(),
        Node {
            name: "n0".into(),
            address: NODE,
        },
    );
    s.nodes.insert(
        "n2".into(),
        Node {
            name: "n2".into(),
            address: Ipv4Addr::new(198, 19, 0, 2),
        },
    );
    s.networks.insert(
        "benchnet".into(),
        Network {
            name: "benchnet".into(),
            subnet: "10.200.0.0/24".parse().unwrap(),
            vni: 4200,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
        },
    );
    s.services.insert(
        "web".into(),
        Service {
            name: "web".into(),
            endpoint_mode: EndpointMode::Vip,
            networks: vec![ServiceNetwork {
                network: "benchnet".into(),
                vip: Some(Ipv4Addr::new(10, 200, 0, 2)),
                aliases: vec![],
            }],
            ports: vec![PortSpec {
                published: 8080,
                target: 80,
                protocol: Protocol::Tcp,
            }],
        },
    );
    for i in 1..=3u8 {
        let id = format!("web{i}");
        s.tasks.insert(
            id.clone(),
            Task {
                id,
                service: "web".into(),
                slot: i as u32,
                node: "n0".into(),
                state: TaskState::Running,
                netns: Some(format!("/run/netns/web{i}").into()),
                resolv_conf: None,
                networks: vec![TaskNetwork {
                    network: "benchnet".into(),
                    address: task_addr(i),
                }],
            },
        );
    }
    s.services.insert(
        "loop".into(),
        Service {
            name: "loop".into(),
            endpoint_mode: EndpointMode::Dnsrr,
            networks: vec![ServiceNetwork {
                network: "benchnet".into(),
                vip: None,
                aliases: vec![],
            }],
            ports: vec![PortSpec {
                published: LOOP_PORT,
                target: LOOP_PORT,
                protocol: Protocol::Tcp,
            }],
        },
    );
    for i in 1..=LOOP_BACKENDS {
        let id = format!("loop{i:03}");
        s.tasks.insert(
            id.clone(),
            Task {
                id,
                service: "loop".into(),
                slot: i as u32,
                node: "n2".into(),
                state: TaskState::Running,
                netns: None,
                resolv_conf: None,
                networks: vec![TaskNetwork {
                    network: "benchnet".into(),
                    address: loop_addr(i),
                }],
            },
        );
    }
}

fn base_links() -> LocalLinks {
    (1..=3u8)
        .map(|i| {
            (
                (format!("web{i}"), "benchnet".to_string()),
                LocalLink {
                    ifindex: 1,
                    task_mac: task_mac(i),
                    gw_mac: GW_MAC,
                },
            )
        })
        .collect()
}

/// 10k more services written straight into the maps (what `desired` + `Tables::apply` would
/// write for them, without the control plane's cost, measured in section 3): each a published
/// port (20000 + i) and a VIP (TCP and UDP frontends), three remote backends per frontend.
fn big_tables(dp: &mut Datapath) -> (usize, usize, usize) {
    use mesh_agent::tables::MapOp;
    use mesh_common::{Frontend, FrontendKey, fe_flags};
    const SERVICES: usize = 10_000;
    let (first_svc, first_be) = (1_000u32, 10_000u32);
    let mut ops = Vec::new();
    let mut words: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    let (mut svc, mut be) = (first_svc, first_be);
    let mut frontends = 0;
    for i in 0..SERVICES {
        let net = 100 + (i % 20) as u8;
        let vip = Ipv4Addr::new(
            10,
            net,
            250 + (i / 20 / 250) as u8,
            (i / 20 % 250) as u8 + 2,
        );
        let port = 20_000 + i as u16;
        let fes = [
            (
                FrontendKey {
                    addr: 0,
                    port: port.to_be(),
                    proto: 6,
                    _pad: 0,
                },
                fe_flags::PUBLISHED,
                80u16,
            ),
            (
                FrontendKey {
                    addr: ne(vip),
                    port: 0,
                    proto: 6,
                    _pad: 0,
                },
                fe_flags::VIP,
                0,
            ),
            (
                FrontendKey {
                    addr: ne(vip),
                    port: 0,
                    proto: 17,
                    _pad: 0,
                },
                fe_flags::VIP,
                0,
            ),
        ];
        for (key, flags, target) in fes {
            for slot in 1..=3u32 {
                let t = i * 3 + slot as usize;
                let addr = Ipv4Addr::new(10, net, (t >> 8) as u8, (t & 255) as u8);
                ops.push(MapOp::SetBackend {
                    id: be,
                    value: Backend {
                        addr: ne(addr),
                        port: target.to_be(),
                        flags: be_flags::ACTIVE,
                        ifindex: 0,
                        mac: [0; 6],
                        smac: [0; 6],
                        svc_id: svc,
                        _pad: 0,
                    },
                });
                ops.push(MapOp::SetSlot {
                    svc_id: svc,
                    slot,
                    backend_id: be,
                });
                be += 1;
            }
            ops.push(MapOp::SetFrontend {
                key,
                value: Frontend {
                    svc_id: svc,
                    count: 3,
                    flags,
                    net_id: 0,
                },
            });
            svc += 1;
            frontends += 1;
        }
        *words.entry(port as u32 >> 5).or_default() |= 1 << (port as u32 & 31);
    }
    for (w, bits) in words {
        let old = dp.maps.ports.get(&w, 0).unwrap_or(0);
        ops.push(MapOp::SetPortWord {
            word: w,
            bits: old | bits,
        });
    }
    dp.maps.apply(&ops).expect("program 10k services");
    (SERVICES, frontends, (be - first_be) as usize)
}

/// A loaded datapath with its own pins (removed on drop) and programmed tables.
struct Fixture {
    dp: Option<Datapath>,
    pins: PathBuf,
    /// 10k services and 100k conntrack entries (else: the small tables).
    big: bool,
    label: &'static str,
    services: usize,
    frontends: usize,
    backends: usize,
    ct_filled: usize,
    web_backend: u32,
    web_svc: u32,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.unpin();
        }
        util::remove_pin_dir(&self.pins);
    }
}

impl Fixture {
    /// `big`: add 10k services (published port + VIP, three remote tasks each) and fill
    /// conntrack with 100k live entries. `ct`: the conntrack maps' sizes.
    fn new(big: bool, ct: CtSizes) -> Fixture {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/mesh-bench-{}-xdp-{}-{}",
            std::process::id(),
            if big { "big" } else { "small" },
            ct.tcp
        ));
        util::track_pins(&pins);
        util::remove_pin_dir(&pins);
        let dp =
            Datapath::load_sized(&pins, ct).expect("load the embedded eBPF object (root needed)");
        let mut f = Fixture {
            dp: Some(dp),
            pins,
            big,
            label: if big {
                "10k services, 100k conntrack entries"
            } else {
                "2 services, empty conntrack"
            },
            services: 0,
            frontends: 0,
            backends: 0,
            ct_filled: 0,
            web_backend: 0,
            web_svc: 0,
        };
        let mut state = State::default();
        let links = base_links();
        base_state(&mut state);
        let mut node_addrs = vec![NODE];
        node_addrs.extend((1..=LOOP_BACKENDS).map(loop_addr));
        let mut tables = Tables::new();
        let want = tables::desired(&state, "n0", &links, Reach::Cluster);
        let ops = tables.apply(&want).expect("tables fit the maps");
        {
            let dp = f.dp();
            dp.maps.set_node_addrs(&node_addrs).unwrap();
            dp.maps.apply(&ops).expect("program the maps");
            dp.maps
                .set_config(Config {
                    netns_cookie: 0,
                    flags: 0,
                    snat_addr: ne(SNAT),
                    snat_port_min: 1024,
                    snat_port_max: 65_535,
                    dns_port: 0,
                    _pad: 0,
                })
                .unwrap();
        }
        f.services = state.services.len();
        f.frontends = tables.frontends().count();
        f.backends = tables.backends().count();
        if big {
            let (s, fe, be) = big_tables(f.dp());
            f.services += s;
            f.frontends += fe;
            f.backends += be;
        }
        let (web_svc, web_be) = {
            let (_, fe) = tables.frontends().find(|(id, _)| id.port == 8080).unwrap();
            let be = tables
                .backends()
                .find(|(_, _, b)| b.addr == task_addr(1) && b.port == 80)
                .unwrap()
                .0;
            (fe.svc_id, be)
        };
        f.web_svc = web_svc;
        f.web_backend = web_be;
        if big {
            f.fill_conntrack(100_000);
        }
        f.install_pingpong();
        f
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    /// 100k live flows (both directions of 50k connections) from 198.20.0.0/16 clients.
    fn fill_conntrack(&mut self, n: usize) {
        let (svc, be) = (self.web_svc, self.web_backend);
        let dp = self.dp();
        for i in 0..n / 2 {
            let c = Ipv4Addr::new(198, 20, (i >> 8) as u8, (i & 255) as u8);
            let sport = (10_000 + (i % 50_000) as u16).to_be();
            let fwd = CtKey {
                saddr: ne(c),
                daddr: ne(NODE),
                sport,
                dport: 8080u16.to_be(),
            };
            let rev = CtKey {
                saddr: ne(task_addr(1)),
                daddr: ne(c),
                sport: 80u16.to_be(),
                dport: sport,
            };
            let fe = CtEntry {
                saddr: ne(c),
                daddr: ne(task_addr(1)),
                sport,
                dport: 80u16.to_be(),
                ifindex: 1,
                smac: GW_MAC,
                dmac: task_mac(1),
                svc_id: svc,
                backend_id: be,
                flags: ct_flags::FORWARD,
            };
            let re = CtEntry {
                saddr: ne(NODE),
                daddr: ne(c),
                sport: 8080u16.to_be(),
                dport: sport,
                ifindex: 1,
                smac: NODE_MAC,
                dmac: CLIENT_MAC,
                svc_id: svc,
                backend_id: be,
                flags: ct_flags::REPLY,
            };
            dp.maps.ct_tcp.insert(fwd, fe, 0).expect("conntrack insert");
            dp.maps.ct_tcp.insert(rev, re, 0).expect("conntrack insert");
        }
        self.ct_filled = self.dp().maps.conntrack_len();
    }

    /// The TCP conntrack keys there are now (the fixture's own entries), for
    /// [`Fixture::clear_flows`].
    fn ct_keys(&mut self) -> std::collections::HashSet<CtKey> {
        self.dp()
            .maps
            .ct_tcp
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Delete every TCP conntrack entry that is not one of `keep` (the flows the measured
    /// paths made). Returns the entries left.
    fn clear_flows(&mut self, keep: &std::collections::HashSet<CtKey>) -> usize {
        let ct = &mut self.dp().maps.ct_tcp;
        let keys: Vec<CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in &keys {
            let _ = ct.remove(k);
        }
        self.dp().maps.conntrack_lens()[0]
    }

    /// The established and reply ping-pongs (see the module doc).
    fn install_pingpong(&mut self) {
        let (svc, be) = (self.web_svc, self.web_backend);
        let dp = self.dp();
        // A backend at the frontend's own address, so B → A passes the "backend alive" check.
        dp.maps
            .backends
            .set(
                PINGPONG_BE,
                Backend {
                    addr: ne(NODE),
                    port: 8080u16.to_be(),
                    flags: be_flags::ACTIVE | be_flags::LOCAL,
                    ifindex: 1,
                    mac: NODE_MAC,
                    smac: CLIENT_MAC,
                    svc_id: svc,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        // Port 80 must be "wanted" for B's lookup to happen, and the client's port 40000 for
        // the reply ping-pong through XDP (as the SNAT range is for real replies).
        for port in [80u32, 40_000] {
            let w = port >> 5;
            let bits = dp.maps.ports.get(&w, 0).unwrap_or(0);
            dp.maps.ports.set(w, bits | 1 << (port & 31), 0).unwrap();
        }
        let sport = 40_000u16.to_be();
        let key = |s: Ipv4Addr, sp: u16, d: Ipv4Addr, dp_: u16| CtKey {
            saddr: ne(s),
            daddr: ne(d),
            sport: sp,
            dport: dp_.to_be(),
        };
        let entry =
            |s: Ipv4Addr, sp: u16, d: Ipv4Addr, dport: u16, smac, dmac, be_id, flags| CtEntry {
                saddr: ne(s),
                daddr: ne(d),
                sport: sp,
                dport: dport.to_be(),
                ifindex: 1,
                smac,
                dmac,
                svc_id: svc,
                backend_id: be_id,
                flags,
            };
        let ct = &mut dp.maps.ct_tcp;
        // Forward: A = client → node:8080 ⇒ task1:80; B = client → task1:80 ⇒ node:8080.
        ct.insert(
            key(CLIENT, sport, NODE, 8080),
            entry(
                CLIENT,
                sport,
                task_addr(1),
                80,
                GW_MAC,
                task_mac(1),
                be,
                ct_flags::FORWARD,
            ),
            0,
        )
        .unwrap();
        ct.insert(
            key(CLIENT, sport, task_addr(1), 80),
            entry(
                CLIENT,
                sport,
                NODE,
                8080,
                CLIENT_MAC,
                NODE_MAC,
                PINGPONG_BE,
                ct_flags::FORWARD,
            ),
            0,
        )
        .unwrap();
        // Reply: task1:80 → client ⇒ node:8080 → client, and back.
        let r1 = CtKey {
            saddr: ne(task_addr(1)),
            daddr: ne(CLIENT),
            sport: 80u16.to_be(),
            dport: sport,
        };
        let r2 = CtKey {
            saddr: ne(NODE),
            daddr: ne(CLIENT),
            sport: 8080u16.to_be(),
            dport: sport,
        };
        let rep = |s: Ipv4Addr, p: u16| CtEntry {
            saddr: ne(s),
            daddr: ne(CLIENT),
            sport: p.to_be(),
            dport: sport,
            ifindex: 1,
            smac: NODE_MAC,
            dmac: CLIENT_MAC,
            svc_id: svc,
            backend_id: be,
            flags: ct_flags::REPLY,
        };
        ct.insert(r1, rep(NODE, 8080), 0).unwrap();
        ct.insert(r2, rep(task_addr(1), 80), 0).unwrap();
    }

    fn verdicts(&mut self) -> std::collections::BTreeMap<&'static str, u64> {
        self.dp().maps.verdicts()
    }

    /// One BPF_PROG_TEST_RUN: (return value, ns per run, output frame).
    fn run(&mut self, prog: Prog, frame: &[u8], repeat: u32) -> (u32, f64, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let r = match prog {
            Prog::Xdp => self
                .dp()
                .xdp_program(progs::XDP_INGRESS)
                .unwrap()
                .test_run(opts),
            Prog::TcIngress => self
                .dp()
                .tc_program(progs::TC_INGRESS)
                .unwrap()
                .test_run(opts),
            Prog::TcTask => self.dp().tc_program(progs::TC_TASK).unwrap().test_run(opts),
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, r.duration.as_nanos() as f64, out)
    }

    fn prog_info(&mut self, prog: Prog) -> Value {
        let info = match prog {
            Prog::Xdp => self.dp().xdp_program(progs::XDP_INGRESS).unwrap().info(),
            Prog::TcIngress => self.dp().tc_program(progs::TC_INGRESS).unwrap().info(),
            Prog::TcTask => self.dp().tc_program(progs::TC_TASK).unwrap().info(),
        };
        match info {
            Ok(i) => json!({
                "id": i.id(),
                "jited_bytes": i.size_jitted(),
                "xlated_bytes": i.size_translated(),
                "verified_insns": i.verified_instruction_count(),
            }),
            Err(e) => json!({ "error": e.to_string() }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prog {
    Xdp,
    TcIngress,
    TcTask,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::Xdp => progs::XDP_INGRESS,
            Prog::TcIngress => progs::TC_INGRESS,
            Prog::TcTask => progs::TC_TASK,
        }
    }
}

/// Iterations per BPF_PROG_TEST_RUN of the self-regenerating new-flow path.
const SNAT_CHUNK: u32 = 50_000;

/// The next seed packet of the self-regenerating new-flow path: a SYN from a client port not
/// used before, to the first loop backend.
fn snat_seed(n: &mut u32) -> Vec<u8> {
    *n += 1;
    let src = Ipv4Addr::new(198, 22, (*n >> 16) as u8, (*n >> 8) as u8);
    let mut fr = Frame::tcp(
        src,
        1024 + (*n & 255) as u16,
        loop_addr(1),
        LOOP_PORT,
        TCP_SYN,
    );
    fr.src_mac = CLIENT_MAC;
    fr.dst_mac = NODE_MAC;
    fr.build()
}

/// A path measured at full repeat: its frame, the verdict every iteration must count and
/// the return value it must give.
struct Path {
    key: &'static str,
    title: &'static str,
    prog: Prog,
    frame: Vec<u8>,
    reason: &'static str,
    rc: u32,
    target_ns: Option<f64>,
    how: &'static str,
}

fn paths() -> Vec<Path> {
    let mut est = Frame::tcp(CLIENT, 40_000, NODE, 8080, TCP_ACK);
    est.src_mac = CLIENT_MAC;
    est.dst_mac = NODE_MAC;
    vec![
        Path {
            key: "pass",
            title: "non-matching packet (pass-through)",
            prog: Prog::Xdp,
            frame: pass_frame(),
            reason: "pass_no_service",
            rc: XDP_PASS,
            target_ns: Some(20.0),
            how: "TCP SYN to node:22, a port no frontend uses: parse + one PORTS bitmap read, XDP_PASS",
        },
        Path {
            key: "established",
            title: "established flow (conntrack hit)",
            prog: Prog::Xdp,
            frame: est.build(),
            reason: "established",
            rc: XDP_REDIRECT,
            target_ns: Some(50.0),
            how: "two FORWARD entries map client→node:8080 onto client→task:80 and back, so every \
                  iteration is a hit + backend-alive check + counters + rewrite of daddr, dport, both \
                  checksums, MACs + bpf_redirect",
        },
        Path {
            key: "reply",
            title: "reply reverse-NAT (TC mesh_tc_task)",
            prog: Prog::TcTask,
            frame: Frame::tcp(task_addr(1), 80, CLIENT, 40_000, TCP_ACK).build(),
            reason: "reply",
            rc: TC_ACT_REDIRECT,
            target_ns: None,
            how: "two REPLY entries map task:80→client onto node:8080→client and back: every \
                  iteration is a hit + rewrite (MACs, addresses, IPv4 checksum and ports in one bpf_skb_store_bytes, the L4 checksum with two bpf_l4_csum_replace) + bpf_redirect",
        },
        Path {
            key: "xdp_reply",
            title: "reply reverse-NAT (XDP, reply of a remote backend)",
            prog: Prog::Xdp,
            frame: {
                let mut f = Frame::tcp(task_addr(1), 80, CLIENT, 40_000, TCP_ACK);
                f.src_mac = GW_MAC;
                f.dst_mac = NODE_MAC;
                f.build()
            },
            reason: "reply",
            rc: XDP_REDIRECT,
            target_ns: Some(50.0),
            how: "the two REPLY entries of the TC reply path, with the client's port wanted (as the SNAT \
                  range is for replies of remote backends arriving at the node's interface): every \
                  iteration is a REPLY hit + counters + rewrite of saddr, sport, both checksums, MACs + \
                  bpf_redirect back out of the ingress interface",
        },
        Path {
            key: "tc_pass",
            title: "non-matching packet, TC ingress hook",
            prog: Prog::TcIngress,
            frame: pass_frame(),
            reason: "pass_no_service",
            rc: TC_ACT_OK,
            target_ns: None,
            how: "as pass-through, from mesh_tc_ingress (--hook tc)",
        },
        Path {
            key: "tc_established",
            title: "established flow, TC ingress hook",
            prog: Prog::TcIngress,
            frame: est.build(),
            reason: "established",
            rc: TC_ACT_REDIRECT,
            target_ns: None,
            how: "as established, from mesh_tc_ingress (--hook tc): one bpf_skb_store_bytes of the new headers, two bpf_l4_csum_replace, bpf_redirect_peer",
        },
    ]
}

struct PathResult {
    key: &'static str,
    title: &'static str,
    prog: Prog,
    ns: Stat,
    share: f64,
    target_ns: Option<f64>,
    how: String,
    /// ns per round, for paths measured in the rounds both fixtures share (see
    /// [`measure_interleaved`]); empty for the others.
    per_round: Vec<f64>,
}

/// Check that one run of `p` takes the intended path and leaves a valid frame.
fn verify(f: &mut Fixture, p: &Path) {
    let before = f.verdicts()[p.reason];
    let (rc, _, out) = f.run(p.prog, &p.frame, 1);
    assert_eq!(rc, p.rc, "{}: return value", p.key);
    assert_eq!(
        f.verdicts()[p.reason],
        before + 1,
        "{}: counted as {}",
        p.key,
        p.reason
    );
    if p.rc != XDP_PASS && p.rc != TC_ACT_OK {
        let q = packet::parse(&out).expect("rewritten frame parses");
        assert!(
            q.ip_csum_ok && q.l4_csum_ok,
            "{}: checksums after rewrite: {q:?}",
            p.key
        );
        // And the rewritten frame is the other half of the ping-pong, which leads back.
        let (rc2, _, back) = f.run(p.prog, &out, 1);
        assert_eq!(rc2, p.rc, "{}: second half", p.key);
        let (a, b) = (
            packet::parse(&back).expect("frame"),
            packet::parse(&p.frame).expect("frame"),
        );
        assert!(
            a.ip_csum_ok && a.l4_csum_ok,
            "{}: checksums after two rewrites",
            p.key
        );
        assert_eq!(
            (a.src, a.sport, a.dst, a.dport),
            (b.src, b.sport, b.dst, b.dport),
            "{}: ping-pong returns",
            p.key
        );
    }
}

fn measure_path(f: &mut Fixture, p: &Path, repeat: u32) -> (f64, f64) {
    let before = f.verdicts()[p.reason];
    let (rc, ns, _) = f.run(p.prog, &p.frame, repeat);
    let after = f.verdicts()[p.reason];
    assert_eq!(rc, p.rc, "{}: return value at repeat {repeat}", p.key);
    (ns, (after - before) as f64 / repeat as f64)
}

/// New flows to local backends, one distinct SYN per run (repeat = 1). Returns the mean
/// kernel duration, and the share of runs counted as new flows.
fn new_flow_distinct(f: &mut Fixture, n: usize, round: usize) -> (f64, f64) {
    let before = f.verdicts()["new_flow"];
    let mut sum = 0.0;
    for i in 0..n {
        let src = Ipv4Addr::new(
            198,
            21 + round as u8,
            (i >> 16) as u8 | 0x40,
            (i >> 8) as u8,
        );
        let sport = 1024 + (i & 255) as u16 * 200 + (i >> 8 & 127) as u16;
        let mut fr = Frame::tcp(src, sport, NODE, 8080, TCP_SYN);
        fr.src_mac = CLIENT_MAC;
        fr.dst_mac = NODE_MAC;
        let (rc, ns, _) = f.run(Prog::Xdp, &fr.build(), 1);
        assert_eq!(
            rc, XDP_REDIRECT,
            "new flow to a local backend is redirected"
        );
        sum += ns;
    }
    let share = (f.verdicts()["new_flow"] - before) as f64 / n as f64;
    (sum / n as f64, share)
}

/// A SYN to a port no frontend uses: the pass-through path's frame, and a frame for
/// programs that do not read it.
fn pass_frame() -> Vec<u8> {
    Frame::tcp(CLIENT, 40_000, NODE, 22, TCP_SYN).build()
}

/// Mean duration of repeat-1 runs of the pass-through path (timer overhead calibration).
fn pass_repeat1(f: &mut Fixture, n: usize) -> f64 {
    let frame = pass_frame();
    let mut sum = 0.0;
    for _ in 0..n {
        sum += f.run(Prog::Xdp, &frame, 1).1;
    }
    sum / n as f64
}

/// An empty XDP program (`return XDP_PASS`), loaded with raw bpf(2) calls: the floor of the
/// harness (loop, bh disable/enable, the program call) on this machine.
struct EmptyProg {
    fd: i32,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: `attr` is a zeroed, 8-byte aligned bpf_attr of 128 bytes, large enough for the
    // PROG_LOAD and PROG_TEST_RUN layouts filled in below.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

impl EmptyProg {
    fn load() -> Option<EmptyProg> {
        load_raw_xdp(&[]) // r0 = XDP_PASS; exit
    }

    /// ns per run at `repeat`.
    fn run(&self, frame: &[u8], repeat: u32) -> Option<f64> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut a = [0u64; 16];
        a[0] = self.fd as u64;
        a[1] = frame.len() as u64 | ((out.len() as u64) << 32);
        a[2] = frame.as_ptr() as u64;
        a[3] = out.as_mut_ptr() as u64;
        a[4] = repeat as u64;
        let rc = bpf(10, &mut a); // BPF_PROG_TEST_RUN
        (rc == 0).then(|| (a[4] >> 32) as f64)
    }
}

impl Drop for EmptyProg {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// One BPF instruction: opcode, registers, offset, immediate.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([op, dst | (src << 4), o0, o1, i0, i1, i2, i3])
}

/// A map made with raw bpf(2) (closed on drop).
struct RawMap(i32);

impl RawMap {
    fn create(map_type: u32, key: u32, value: u32, entries: u32) -> Option<RawMap> {
        let mut a = [0u64; 16];
        a[0] = map_type as u64 | (key as u64) << 32;
        a[1] = value as u64 | (entries as u64) << 32;
        let fd = bpf(0, &mut a); // BPF_MAP_CREATE
        (fd >= 0).then_some(RawMap(fd as i32))
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}

/// The kernel's floor for a new flow: an XDP program of raw instructions that does only one
/// LRU hash insert of a new key per run (a counter in an array map makes the key), into a map
/// with conntrack's layout (12-byte key, 44-byte value, one LRU list) of `entries`, which
/// its own runs keep full, so every insert evicts. A new flow does two such inserts (forward
/// and reply entry) and one lookup that misses.
struct LruInsertProg {
    prog: EmptyProg,
    _maps: (RawMap, RawMap),
}

impl LruInsertProg {
    fn load(entries: u32) -> Option<LruInsertProg> {
        Self::load_typed(9, entries) // BPF_MAP_TYPE_LRU_HASH, common LRU
    }

    /// The same program inserting into a map of `map_type` (1: a plain preallocated hash).
    fn load_typed(map_type: u32, entries: u32) -> Option<LruInsertProg> {
        let counter = RawMap::create(2, 4, 8, 1)?; // BPF_MAP_TYPE_ARRAY
        let lru = RawMap::create(map_type, 12, 44, entries)?;
        let ld_map = |dst: u8, fd: i32| [insn(0x18, dst, 1, 0, fd), 0]; // BPF_PSEUDO_MAP_FD
        let mut p = vec![insn(0x62, 10, 0, -4, 0)]; // *(u32 *)(fp - 4) = 0: the counter's index
        p.extend(ld_map(1, counter.0));
        p.extend([
            insn(0xbf, 2, 10, 0, 0),   // r2 = fp
            insn(0x07, 2, 0, 0, -4),   // r2 -= 4
            insn(0x85, 0, 0, 0, 1),    // r0 = bpf_map_lookup_elem(counter, &0)
            insn(0x15, 0, 0, 19, 0),   // if r0 == 0 goto out
            insn(0x79, 7, 0, 0, 0),    // r7 = *(u64 *)r0
            insn(0x07, 7, 0, 0, 1),    // r7 += 1
            insn(0x7b, 0, 7, 0, 0),    // *(u64 *)r0 = r7
            insn(0x7b, 10, 7, -16, 0), // key: the counter, then a zero word
            insn(0x62, 10, 0, -8, 0),
        ]);
        p.extend((0..6).map(|k| insn(0x7a, 10, 0, -64 + 8 * k, 0))); // value: zeros
        p.extend(ld_map(1, lru.0));
        p.extend([
            insn(0xbf, 2, 10, 0, 0),
            insn(0x07, 2, 0, 0, -16), // r2 = &key
            insn(0xbf, 3, 10, 0, 0),
            insn(0x07, 3, 0, 0, -64), // r3 = &value
            insn(0xb7, 4, 0, 0, 0),   // r4 = BPF_ANY
            insn(0x85, 0, 0, 0, 2),   // bpf_map_update_elem(lru, &key, &value, 0)
        ]); // out: load_raw_xdp's r0 = XDP_PASS; exit
        let prog = load_raw_xdp(&p)?;
        Some(LruInsertProg {
            prog,
            _maps: (counter, lru),
        })
    }
}

/// A raw XDP program of `body` followed by `r0 = XDP_PASS; exit`.
fn load_raw_xdp(body: &[u64]) -> Option<EmptyProg> {
    let mut p = body.to_vec();
    p.extend([insn(0xb7, 0, 0, 0, 2), insn(0x95, 0, 0, 0, 0)]);
    let license = b"GPL\0";
    let mut a = [0u64; 16];
    a[0] = 6 | (p.len() as u64) << 32; // BPF_PROG_TYPE_XDP
    a[1] = p.as_ptr() as u64;
    a[2] = license.as_ptr() as u64;
    let fd = bpf(5, &mut a); // BPF_PROG_LOAD
    (fd >= 0).then_some(EmptyProg { fd: fd as i32 })
}

/// Helper calls in [`CallCost::load`]'s program.
const CALLS: usize = 8;

/// What a function call costs on this machine, from two raw programs run beside the empty
/// one: [`CALLS`] calls of `bpf_get_prandom_u32` (a call, a few instructions of work, a
/// return), and one lookup that hits in a map of conntrack's layout (an LRU hash with a
/// 12-byte key and 262,144 entries: the verifier turns it into a direct call of the map's
/// lookup, which calls the hash and the bucket walk, which calls memcmp). The established
/// path does such a lookup, and `bpf_redirect`.
struct CallCost {
    calls: EmptyProg,
    lookup: EmptyProg,
    _map: RawMap,
}

impl CallCost {
    fn load() -> Option<CallCost> {
        let calls = load_raw_xdp(&[insn(0x85, 0, 0, 0, 7); CALLS])?; // bpf_get_prandom_u32
        let map = RawMap::create(9, 12, 44, mapnames::MAX_CT_TCP)?;
        // The all-zero key, present.
        let (key, value) = ([0u8; 12], [0u8; 44]);
        let mut a = [0u64; 16];
        a[0] = map.0 as u64;
        a[1] = key.as_ptr() as u64;
        a[2] = value.as_ptr() as u64;
        if bpf(2, &mut a) != 0 {
            return None; // BPF_MAP_UPDATE_ELEM
        }
        let p = [
            insn(0x7a, 10, 0, -16, 0),  // *(u64 *)(fp - 16) = 0
            insn(0x62, 10, 0, -8, 0),   // *(u32 *)(fp - 8) = 0: the 12-byte key
            insn(0x18, 1, 1, 0, map.0), // r1 = map (BPF_PSEUDO_MAP_FD)
            0,
            insn(0xbf, 2, 10, 0, 0),  // r2 = fp
            insn(0x07, 2, 0, 0, -16), // r2 -= 16
            insn(0x85, 0, 0, 0, 1),   // bpf_map_lookup_elem(map, &key)
        ];
        let lookup = load_raw_xdp(&p)?;
        Some(CallCost {
            calls,
            lookup,
            _map: map,
        })
    }

    /// Per round, interleaved with the empty program: (empty, calls, lookup) ns per run.
    fn measure(frame: &[u8], repeat: u32, rounds: usize) -> Option<CallCostResult> {
        let c = CallCost::load()?;
        let empty = EmptyProg::load()?;
        let (mut e, mut k, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            util::check_interrupt();
            e.push(empty.run(frame, repeat)?);
            k.push(c.calls.run(frame, repeat)?);
            l.push(c.lookup.run(frame, repeat)?);
        }
        let per_call: Vec<f64> = e
            .iter()
            .zip(&k)
            .map(|(e, k)| (k - e) / CALLS as f64)
            .collect();
        let lookup: Vec<f64> = e.iter().zip(&l).map(|(e, l)| l - e).collect();
        Some(CallCostResult {
            empty: stat(&e),
            per_call: stat(&per_call),
            lookup: stat(&lookup),
        })
    }
}

/// [`CallCost::measure`]: the empty program, one helper call and one conntrack lookup (both
/// net of the empty program), ns.
struct CallCostResult {
    empty: Stat,
    per_call: Stat,
    lookup: Stat,
}

/// This CPU's mitigations that make calls and returns expensive (the kernel's own report).
fn call_mitigations() -> Vec<(String, String)> {
    ["spec_rstack_overflow", "spectre_v2", "retbleed"]
        .iter()
        .filter_map(|v| {
            let t = std::fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{v}"))
                .ok()?;
            Some((v.to_string(), t.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
#[test]
fn the_call_cost_programs_load_and_run() {
    let frame = pass_frame();
    let r = CallCost::measure(&frame, 1_000, 2).expect("the verifier accepts them (needs root)");
    assert_eq!((r.empty.n, r.per_call.n, r.lookup.n), (2, 2, 2));
    assert!(r.empty.median > 0.0);
}

/// Keys in a raw map of `key_size`-byte keys (BPF_MAP_GET_NEXT_KEY walk).
#[cfg(test)]
fn raw_map_len(m: &RawMap, key_size: usize) -> usize {
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut n = 0;
    loop {
        let mut a = [0u64; 16];
        a[0] = m.0 as u64;
        a[1] = if n == 0 { 0 } else { key.as_ptr() as u64 };
        a[2] = next.as_mut_ptr() as u64;
        if bpf(4, &mut a) != 0 {
            return n;
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
}

#[cfg(test)]
#[test]
fn the_lru_floor_program_inserts_one_new_key_per_run_into_a_full_map() {
    let p = LruInsertProg::load(1_024).expect("the verifier accepts it (needs root)");
    let frame = pass_frame();
    let ns = p.prog.run(&frame, 600).expect("BPF_PROG_TEST_RUN");
    assert!(ns > 0.0);
    assert_eq!(raw_map_len(&p._maps.1, 12), 600, "one new key per run");
    p.prog.run(&frame, 3_000).unwrap();
    // 3,600 keys inserted into 1,024 entries: the map stays full, each insert evicting (the
    // kernel frees LRU entries to a CPU's free list in batches of up to 128, so up to that
    // many sit free at any time).
    let len = raw_map_len(&p._maps.1, 12);
    assert!(
        (1_024 - 128..=1_024).contains(&len),
        "full, evicting: {len}"
    );
}

/// ns per insert of [`LruInsertProg`] into a fresh map of `map_type` with free entries: one
/// run of `entries / 2` inserts per round, each round in a new map (nothing evicts, nothing
/// fails): LRU (9) against a plain preallocated hash (1), which pops a per-CPU free list and
/// keeps no LRU lists, but never evicts (a conntrack on it needs a garbage collector).
fn insert_floor_free(frame: &[u8], map_type: u32, entries: u32, rounds: usize) -> Option<Stat> {
    let ns: Vec<f64> = (0..rounds)
        .filter_map(|_| {
            LruInsertProg::load_typed(map_type, entries)?
                .prog
                .run(frame, entries / 2)
        })
        .collect();
    (!ns.is_empty()).then(|| stat(&ns))
}

/// ns per LRU insert (net of nothing: the harness floor is reported beside it) at `repeat`
/// into a full map of each of `sizes`: (entries, median over `rounds`).
fn lru_insert_floor(frame: &[u8], sizes: &[u32], repeat: u32, rounds: usize) -> Vec<(u32, Stat)> {
    sizes
        .iter()
        .filter_map(|&entries| {
            let p = LruInsertProg::load(entries)?;
            // Fill the map (and then some) so every measured insert evicts.
            let mut left = entries as u64 * 3 / 2;
            while left > 0 {
                let n = left.min(1_000_000) as u32;
                p.prog.run(frame, n)?;
                left -= n as u64;
            }
            let ns: Vec<f64> = (0..rounds)
                .filter_map(|_| p.prog.run(frame, repeat))
                .collect();
            Some((entries, stat(&ns)))
        })
        .collect()
}

/// Where the time of `path` goes: `perf record -e cpu-clock` on this thread while it runs
/// the path at full repeat (`bpftool prog profile` needs hardware counters this VM lacks).
fn profile(f: &mut Fixture, prog: Prog, frame: &[u8], repeat: u32) -> Option<Vec<(f64, String)>> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() }.to_string();
    util::perf_top(&["-t", &tid], 1.5, || {
        f.run(prog, frame, repeat);
    })
}

struct FixtureResult {
    profiles: Vec<(String, Vec<(f64, String)>)>,
    floor: Stat,
    label: &'static str,
    services: usize,
    frontends: usize,
    backends: usize,
    ct_filled: usize,
    paths: Vec<PathResult>,
    calib: Value,
    progs: Value,
}

/// A fixture, loaded and verified.
fn new_fixture(ctx: &Ctx, big: bool) -> Fixture {
    let t = Instant::now();
    let mut f = Fixture::new(big, CtSizes::default());
    util::log(
        ctx.start,
        format!(
            "xdp: fixture '{}' ready in {}",
            f.label,
            util::fmt_dur(t.elapsed())
        ),
    );
    for p in &paths() {
        verify(&mut f, p);
    }
    f
}

/// Per fixture: the empty program's ns per run and every path's (ns, share) per round.
struct Interleaved {
    floor: Vec<f64>,
    samples: Vec<Vec<(f64, f64)>>,
}

/// The repeat paths of every fixture in shared rounds: each round runs the empty program,
/// then every path on the first fixture, then every path on the next, and so on. A
/// difference between table sizes is then a difference within each round (a ratio per round,
/// then its median), not between two phases of the run that the machine's noise also tells
/// apart.
fn measure_interleaved(ctx: &Ctx, fixtures: &mut [&mut Fixture]) -> Vec<Interleaved> {
    let (repeat, rounds) = (ctx.xdp_repeat, ctx.xdp_rounds);
    let ps = paths();
    let mut out: Vec<Interleaved> = fixtures
        .iter()
        .map(|_| Interleaved {
            floor: Vec::new(),
            samples: vec![Vec::new(); ps.len()],
        })
        .collect();
    // Warm-up (JIT'd code and map buckets in cache), then rounds with the paths interleaved.
    for f in fixtures.iter_mut() {
        for p in &ps {
            measure_path(f, p, repeat / 10);
        }
    }
    let empty = EmptyProg::load();
    for _ in 0..rounds {
        for (f, o) in fixtures.iter_mut().zip(out.iter_mut()) {
            util::check_interrupt();
            if let Some(ns) = empty.as_ref().and_then(|e| e.run(&ps[0].frame, repeat)) {
                o.floor.push(ns);
            }
            for (i, p) in ps.iter().enumerate() {
                o.samples[i].push(measure_path(f, p, repeat));
            }
        }
    }
    out
}

/// Everything else of one fixture (the new-flow paths, profiles), after its repeat paths
/// were measured in [`measure_interleaved`].
fn run_fixture(ctx: &Ctx, mut f: Fixture, measured: Interleaved) -> FixtureResult {
    let repeat = ctx.xdp_repeat;
    let rounds = ctx.xdp_rounds;
    let fixture_keys = f.ct_keys();
    let ps = paths();
    let Interleaved { floor, samples } = measured;
    let mut results: Vec<PathResult> = ps
        .iter()
        .zip(&samples)
        .map(|(p, s)| PathResult {
            key: p.key,
            title: p.title,
            prog: p.prog,
            ns: stat(&s.iter().map(|x| x.0).collect::<Vec<_>>()),
            share: s.iter().map(|x| x.1).fold(f64::INFINITY, f64::min),
            target_ns: p.target_ns,
            how: p.how.to_string(),
            per_round: s.iter().map(|x| x.0).collect(),
        })
        .collect();

    // New flow (a): distinct SYNs, repeat 1, calibrated by the pass-through's repeat-1 cost.
    let n1 = ctx.xdp_distinct;
    let mut nf = Vec::new();
    let mut p1 = Vec::new();
    let mut share_min = f64::INFINITY;
    let pass_full = results.iter().find(|r| r.key == "pass").unwrap().ns.median;
    for r in 0..rounds {
        util::check_interrupt();
        p1.push(pass_repeat1(&mut f, n1 / 2));
        let (mean, share) = new_flow_distinct(&mut f, n1, r);
        share_min = share_min.min(share);
        nf.push(mean);
    }
    let p1s = stat(&p1);
    let overhead = (p1s.median - pass_full).max(0.0);
    let calibrated: Vec<f64> = nf.iter().map(|x| x - overhead).collect();
    results.push(PathResult {
        per_round: Vec::new(),
        key: "new_flow",
        title: "published-port SYN, new flow (local backend)",
        prog: Prog::Xdp,
        ns: stat(&calibrated),
        share: share_min,
        target_ns: Some(150.0),
        how: format!(
            "{} distinct SYNs per round (fresh 5-tuples), one BPF_PROG_TEST_RUN each (repeat = 1): \
             mean kernel duration {} ns minus the timer overhead of a repeat-1 run, {} ns (pass-through \
             at repeat 1: {} ns vs {} ns at full repeat). Cold caches per packet; conntrack evicts (LRU) once full",
            fmt_num(n1 as f64, 0),
            stat(&nf).show(1),
            fmt_num(overhead, 1),
            fmt_num(p1s.median, 1),
            fmt_num(pass_full, 1)
        ),
    });
    let calib = json!({
        "pass_repeat1_ns": p1s,
        "pass_full_repeat_ns": pass_full,
        "timer_overhead_ns": overhead,
        "new_flow_repeat1_raw_ns": stat(&nf),
    });

    // New flow (b): self-regenerating, remote backends with SNAT, at full repeat, in runs
    // of at most 50k iterations, each from a fresh seed packet (see `snat_seed`).
    let mut seed = 0u32;
    {
        let before = f.verdicts()["new_flow"];
        let (rc, _, out) = f.run(Prog::Xdp, &snat_seed(&mut seed), 1);
        assert_eq!(
            rc, XDP_PASS,
            "SNAT'd flow to a remote backend goes to the kernel"
        );
        assert_eq!(f.verdicts()["new_flow"], before + 1);
        let q = packet::parse(&out).unwrap();
        assert!(q.ip_csum_ok && q.l4_csum_ok && q.src == SNAT, "{q:?}");
    }
    let chunk = repeat.min(SNAT_CHUNK);
    let calls = repeat.div_ceil(chunk);
    let mut snat = Vec::new();
    let mut snat_share = f64::INFINITY;
    let mut discarded = 0;
    for _ in 0..rounds {
        util::check_interrupt();
        let mut kept = Vec::new();
        let mut tries = 0;
        // A run that ran into its own trajectory (see `how`) is discarded: it measured
        // established hits, not new flows. Bounded: at most twice the runs needed.
        while kept.len() < calls as usize && tries < 2 * calls {
            tries += 1;
            let before = f.verdicts()["new_flow"];
            let (rc, ns, _) = f.run(Prog::Xdp, &snat_seed(&mut seed), chunk);
            assert_eq!(rc, XDP_PASS);
            let share = (f.verdicts()["new_flow"] - before) as f64 / chunk as f64;
            if share >= 0.99 {
                kept.push((ns, share));
            } else {
                discarded += 1;
            }
        }
        if kept.is_empty() {
            continue;
        }
        snat_share = snat_share.min(kept.iter().map(|k| k.1).fold(f64::INFINITY, f64::min));
        snat.push(kept.iter().map(|k| k.0).sum::<f64>() / kept.len() as f64);
    }
    if snat.is_empty() {
        snat_share = 0.0;
    }
    results.push(PathResult {
        per_round: Vec::new(),
        key: "new_flow_snat",
        title: "new flow, remote backend + SNAT (full repeat)",
        prog: Prog::Xdp,
        ns: stat(&snat),
        share: snat_share,
        target_ns: Some(150.0),
        how: format!(
            "service with {LOOP_BACKENDS} remote backends whose addresses are node addresses on the published \
             port: each rewrite picks the next backend and that backend's next SNAT source port (1024–65535, \
             handed out in turn), so the next iteration misses conntrack and is a new flow again (round-robin, \
             SNAT port lookup, two LRU \
             inserts, rewrite of saddr/sport/daddr). Runs of {} iterations, each from a fresh seed packet \
             (a run that met an entry of its own trajectory whose reply entry the LRU had already evicted \
             would otherwise circle through established hits); conntrack stays full, so inserts evict. \
             Runs where fewer than 99% of the iterations were new flows are discarded ({discarded} here). \
             Share = iterations counted new_flow in the kept runs",
            fmt_num(chunk as f64, 0)
        ),
    });

    // New flow (a'), as (a) but into a conntrack with free entries (see `free_entry_rounds`).
    // No insert evicts: the difference to (a) is what evicting costs, i.e. what a conntrack
    // that deletes closed flows would save.
    let cap = mapnames::MAX_CT_TCP as usize;
    let (free_ns, free_share, free_n) =
        free_entry_rounds(&mut f, &fixture_keys, rounds, n1 / 2, |f, n, r| {
            let (mean, share) = new_flow_distinct(f, n, rounds + r);
            Some((mean - overhead, share))
        });
    if !free_ns.is_empty() {
        insert_after(
            &mut results,
            "new_flow",
            PathResult {
                per_round: Vec::new(),
                key: "new_flow_free",
                title: "published-port SYN, new flow (local backend), conntrack with free entries",
                prog: Prog::Xdp,
                ns: stat(&free_ns),
                share: free_share,
                target_ns: None,
                how: format!(
                    "as the distinct SYNs above (local backend), but each round first deletes every conntrack entry \
                 the measured flows made (the fixture's stay) and then sends {} fresh SYNs, fewer than the map's \
                 free entries (of {}; one LRU list for the whole map): no insert evicts. Minus the same timer \
                 overhead. The difference to that row is the cost of evicting from a full table",
                    stat(&free_n).show(0),
                    fmt_num(cap as f64, 0)
                ),
            },
        );
    }

    // New flow (b'), as (b) but into a conntrack with free entries: one run per round, of at
    // most one chunk of iterations; runs that were not all new flows are discarded, as in (b).
    let (snat_free, snat_free_share, snat_free_n) = free_entry_rounds(
        &mut f,
        &fixture_keys,
        rounds,
        SNAT_CHUNK as usize,
        |f, n, _| {
            let before = f.verdicts()["new_flow"];
            let (rc, ns, _) = f.run(Prog::Xdp, &snat_seed(&mut seed), n as u32);
            assert_eq!(rc, XDP_PASS);
            let share = (f.verdicts()["new_flow"] - before) as f64 / n as f64;
            (share >= 0.99).then_some((ns, share))
        },
    );
    if !snat_free.is_empty() {
        insert_after(
            &mut results,
            "new_flow_snat",
            PathResult {
                per_round: Vec::new(),
                key: "new_flow_snat_free",
                title: "new flow, remote backend + SNAT (full repeat), conntrack with free entries",
                prog: Prog::Xdp,
                ns: stat(&snat_free),
                share: snat_free_share,
                target_ns: None,
                how: format!(
                    "as the SNAT new flows above, but each round first deletes every conntrack entry the measured \
                 flows made (the fixture's stay) and then makes one run of {} iterations, fewer than the map's \
                 free entries: no insert evicts. The difference to that row is the cost of evicting from a \
                 full table",
                    stat(&snat_free_n).show(0)
                ),
            },
        );
    }

    // Cheap profiles of the paths that miss their target (small tables only).
    let mut profiles = Vec::new();
    if !f.big {
        // MESH_BENCH_PROFILE_ALL=1: every path, targets met or not (a developer's look).
        let all = std::env::var_os("MESH_BENCH_PROFILE_ALL").is_some_and(|v| v == "1");
        for r in &results {
            if !all && r.target_ns.is_none_or(|t| r.ns.median <= t) {
                continue;
            }
            let (prog, frame) = match r.key {
                "new_flow" | "new_flow_snat" => {
                    // Fresh seeds per call, as measured.
                    let chunk = repeat.min(SNAT_CHUNK);
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() }.to_string();
                    if r.key == "new_flow_snat"
                        && let Some(p) = util::perf_top(&["-t", &tid], 1.5, || {
                            let fr = snat_seed(&mut seed);
                            f.run(Prog::Xdp, &fr, chunk);
                        })
                    {
                        profiles.push((r.title.to_string(), p));
                    }
                    continue;
                }
                k => match ps.iter().find(|p| p.key == k) {
                    Some(p) => (p.prog, p.frame.clone()),
                    None => continue,
                },
            };
            if r.key == "new_flow" {
                continue; // profiled through its full-repeat twin below
            }
            if let Some(p) = profile(&mut f, prog, &frame, repeat) {
                profiles.push((r.title.to_string(), p));
            }
        }
    }
    let progs = json!({
        "xdp": f.prog_info(Prog::Xdp),
        "tc_ingress": f.prog_info(Prog::TcIngress),
        "tc_task": f.prog_info(Prog::TcTask),
    });
    FixtureResult {
        profiles,
        floor: stat(&floor),
        label: f.label,
        services: f.services,
        frontends: f.frontends,
        backends: f.backends,
        ct_filled: f.ct_filled,
        paths: results,
        calib,
        progs,
    }
}

/// Rounds of new flows into a conntrack with free entries: before each, every TCP entry the
/// measured flows made is deleted (`keep`, the fixture's, stays), then `run(f, n, round)`
/// makes `n` new flows, fewer than the map then has free (two entries per flow, 80% of the
/// room, at most `max`); it returns ns per flow and the share counted `new_flow`, or `None`
/// to discard the round. Stops early when there is no room for 1,000 flows. Returns the kept
/// ns, their lowest share and the flow counts.
fn free_entry_rounds(
    f: &mut Fixture,
    keep: &std::collections::HashSet<CtKey>,
    rounds: usize,
    max: usize,
    mut run: impl FnMut(&mut Fixture, usize, usize) -> Option<(f64, f64)>,
) -> (Vec<f64>, f64, Vec<f64>) {
    let cap = mapnames::MAX_CT_TCP as usize;
    let (mut ns, mut share, mut counts) = (Vec::new(), f64::INFINITY, Vec::new());
    for r in 0..rounds {
        util::check_interrupt();
        let live = f.clear_flows(keep);
        let n = (cap.saturating_sub(live) * 2 / 5).min(max);
        if n < 1_000 {
            break;
        }
        if let Some((x, s)) = run(f, n, r) {
            ns.push(x);
            share = share.min(s);
            counts.push(n as f64);
        }
    }
    (ns, share, counts)
}

/// Put `row` right after the row of path `key` (at the end if there is none).
fn insert_after(results: &mut Vec<PathResult>, key: &str, row: PathResult) {
    let at = results
        .iter()
        .position(|r| r.key == key)
        .map_or(results.len(), |i| i + 1);
    results.insert(at, row);
}

/// This thread pinned to one CPU while alive (the conntrack map hands free entries to each
/// CPU in batches: entries written from user space and by the programs then come from one
/// CPU's batch, and the runs keep one CPU's caches), then back.
struct Pinned(Option<nix::sched::CpuSet>);

impl Pinned {
    fn to(cpu: usize) -> Pinned {
        let me = nix::unistd::Pid::from_raw(0);
        let old = nix::sched::sched_getaffinity(me).ok();
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(cpu);
        let _ = nix::sched::sched_setaffinity(me, &set);
        Pinned(old)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old);
        }
    }
}

/// New flows into a full conntrack of one size (`--conntrack-tcp-max`).
struct SizeResult {
    entries: u32,
    /// ns per new flow (calibrated as the new-flow row), per round.
    ns: Stat,
    share: f64,
    /// ns per run of [`LruInsertProg`] into a full map of this size (one LRU insert).
    lru_insert: Option<Stat>,
    /// At the default size only: one insert into an LRU map with free entries, and into a
    /// plain preallocated hash (see [`insert_floor_free`]).
    free_inserts: Option<(Stat, Stat)>,
}

/// Sizes of the sweep: a map whose elements fit this machine's caches (2 MiB), the default,
/// and one sized for a task's 60 s TIME_WAIT at about 8,700 new connections/s (two entries
/// per flow).
const SWEEP_SIZES: [u32; 3] = [16_384, mapnames::MAX_CT_TCP, 1 << 20];

/// New flow (a''): distinct SYNs to local backends (as (a)) into a full conntrack of each
/// of [`SWEEP_SIZES`], small tables otherwise; each size in a fresh datapath, filled to
/// capacity through the map API first so every insert evicts, calibrated by its own
/// repeat-1 pass-through overhead.
fn ct_size_sweep(ctx: &Ctx) -> Vec<SizeResult> {
    let rounds = ctx.xdp_rounds.clamp(3, 5);
    let n = ctx.xdp_distinct;
    let mut out = Vec::new();
    for entries in SWEEP_SIZES {
        util::check_interrupt();
        let t = Instant::now();
        let mut f = Fixture::new(
            false,
            CtSizes {
                tcp: entries,
                ..CtSizes::default()
            },
        );
        f.fill_conntrack(entries as usize);
        let pass = pass_frame();
        // Warm-up (JIT'd code, the tables): flows of a source range the rounds do not use.
        new_flow_distinct(&mut f, n / 10, rounds);
        let (mut ns, mut share) = (Vec::new(), f64::INFINITY);
        for r in 0..rounds {
            util::check_interrupt();
            let full = f.run(Prog::Xdp, &pass, ctx.xdp_repeat / 10).1;
            let overhead = (pass_repeat1(&mut f, n / 2) - full).max(0.0);
            let (mean, s) = new_flow_distinct(&mut f, n, r);
            ns.push(mean - overhead);
            share = share.min(s);
        }
        let len = f.dp().maps.conntrack_lens()[0];
        util::log(
            ctx.start,
            format!(
                "xdp: new flows into a full conntrack of {} entries ({} live): {} ns ({})",
                fmt_num(entries as f64, 0),
                fmt_num(len as f64, 0),
                fmt_num(stat(&ns).median, 0),
                util::fmt_dur(t.elapsed())
            ),
        );
        drop(f);
        let lru_insert = lru_insert_floor(&pass, &[entries], ctx.xdp_repeat, rounds)
            .pop()
            .map(|x| x.1);
        let free_inserts = (entries == mapnames::MAX_CT_TCP)
            .then(|| {
                Some((
                    insert_floor_free(&pass, 9, entries, rounds)?,
                    insert_floor_free(&pass, 1, entries, rounds)?,
                ))
            })
            .flatten();
        out.push(SizeResult {
            entries,
            ns: stat(&ns),
            share,
            lru_insert,
            free_inserts,
        });
    }
    out
}

/// Most a path's cost may grow from the small to the big tables (median of the per-round
/// ratios) and still count as flat: the issue asks that it not grow; this leaves room for
/// the rounds' noise, not for a cost that scales.
const GROWTH_MAX: f64 = 1.10;

pub fn run(ctx: &mut Ctx) -> Section {
    let _pinned = Pinned::to(0);
    // bpf_stats_enabled=1 adds ~75 ns per run: off while timing (restored after).
    let stats = util::SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "0");
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .unwrap_or_default()
        .trim()
        .to_string();
    let (mut fs, mut fb) = (new_fixture(ctx, false), new_fixture(ctx, true));
    let [ms, mb]: [Interleaved; 2] = measure_interleaved(ctx, &mut [&mut fs, &mut fb])
        .try_into()
        .unwrap_or_else(|_| unreachable!("one result per fixture"));
    let small = run_fixture(ctx, fs, ms);
    let big = run_fixture(ctx, fb, mb);
    let sweep = ct_size_sweep(ctx);
    let pass = pass_frame();
    let calls = CallCost::measure(&pass, ctx.xdp_repeat, ctx.xdp_rounds);
    let stats_was_on = stats.changed();
    drop(stats);
    let vip = crate::vip::measure(
        ctx,
        ctx.xdp_rounds,
        if ctx.quick { 20_000 } else { 100_000 },
    );

    let mut rows = vec![vec![
        "empty XDP program `return XDP_PASS` (harness floor)".to_string(),
        "raw bpf(2)".into(),
        small.floor.show(1),
        big.floor.show(1),
        "0".into(),
        "–".into(),
        "–".into(),
        "–".into(),
    ]];
    let mut jpaths = Vec::new();
    let mut growth: Vec<(&str, Stat)> = Vec::new();
    for r in &small.paths {
        // Rows are matched by path: a fixture may skip one (no room for the free-entries run).
        let Some(b) = big.paths.iter().find(|b| b.key == r.key) else {
            continue;
        };
        let target = r
            .target_ns
            .map(|t| format!("≤ {t} ns"))
            .unwrap_or_else(|| "–".into());
        let met = r.target_ns.map(|t| r.ns.median <= t && b.ns.median <= t);
        rows.push(vec![
            r.title.to_string(),
            format!("`{}`", r.prog.name()),
            r.ns.show(1),
            b.ns.show(1),
            fmt_num(r.ns.median - small.floor.median, 1),
            format!("{:.1}% / {:.1}%", r.share * 100.0, b.share * 100.0),
            target,
            util::yes_no(met).to_string(),
        ]);
        jpaths.push(json!({
            "path": r.key, "title": r.title, "program": r.prog.name(),
            "ns_per_packet_small": r.ns, "ns_per_packet_big": b.ns,
            "path_share_small": r.share, "path_share_big": b.share,
            "target_ns": r.target_ns, "met": met, "how": r.how,
        }));
        if let Some(t) = r.target_ns {
            ctx.out.check(
                "1. XDP hot path",
                r.title,
                format!(
                    "{} ns (10k svc/100k ct: {} ns)",
                    fmt_num(r.ns.median, 1),
                    fmt_num(b.ns.median, 1)
                ),
                &format!("≤ {t} ns"),
                met,
            );
            if met == Some(false) {
                let prof = small
                    .profiles
                    .iter()
                    .find(|(title, _)| {
                        title == r.title || (r.key == "new_flow" && title.starts_with("new flow"))
                    })
                    .map(|(title, p)| {
                        if title == r.title {
                            format!(" Profile: {}.", util::show_profile(p))
                        } else {
                            format!(
                                " Profile (of its full-repeat twin, {title}): {}.",
                                util::show_profile(p)
                            )
                        }
                    })
                    .unwrap_or_default();
                ctx.out.finding(format!(
                    "XDP {}: {} ns/packet (big tables {} ns) misses the ≤ {t} ns target. An empty XDP program costs \
                     {} ns in this harness here, so mesh's own share is ≈ {} ns.{prof}",
                    r.title,
                    fmt_num(r.ns.median, 1),
                    fmt_num(b.ns.median, 1),
                    fmt_num(small.floor.median, 0),
                    fmt_num(r.ns.median - small.floor.median, 0),
                ));
            }
        }
        // Big over small, per round (both fixtures ran in the same rounds).
        if r.per_round.len() == b.per_round.len() && !r.per_round.is_empty() {
            let ratio = stat(
                &r.per_round
                    .iter()
                    .zip(&b.per_round)
                    .map(|(s, b)| b / s)
                    .collect::<Vec<_>>(),
            );
            if let Some(j) = jpaths.last_mut() {
                j["big_over_small_per_round"] = json!(ratio);
            }
            growth.push((r.title, ratio));
        }
    }
    if !growth.is_empty() {
        let worst = growth
            .iter()
            .map(|g| g.1.median)
            .fold(f64::NEG_INFINITY, f64::max);
        let met = worst <= GROWTH_MAX;
        ctx.out.check(
            "1. XDP hot path",
            "cost with 10k services + 100k conntrack entries over small tables (per-round ratio, paths at full repeat)",
            growth
                .iter()
                .map(|(t, g)| format!("{t}: {}×", fmt_num(g.median, 2)))
                .collect::<Vec<_>>()
                .join("; "),
            &format!("flat (≤ {GROWTH_MAX}×)"),
            Some(met),
        );
        for (t, g) in growth.iter().filter(|g| g.1.median > GROWTH_MAX) {
            ctx.out.finding(format!(
                "XDP {t}: cost grows with table size: {}× per round (10k services, 100k conntrack entries vs small \
                 tables, measured in the same rounds).",
                g.show(2)
            ));
        }
    }
    // What evicting from a full conntrack costs: each new-flow path against its twin run into
    // a conntrack with free entries (small tables).
    let by_key = |k: &str| small.paths.iter().find(|r| r.key == k).map(|r| r.ns.median);
    let pairs: Vec<(f64, f64)> = [
        ("new_flow", "new_flow_free"),
        ("new_flow_snat", "new_flow_snat_free"),
    ]
    .iter()
    .filter_map(|(full, free)| Some((by_key(full)?, by_key(free)?)))
    .collect();
    if !pairs.is_empty() {
        let shown = pairs
            .iter()
            .map(|(full, free)| {
                format!(
                    "{} ns full vs {} ns with free entries",
                    fmt_num(*full, 0),
                    fmt_num(*free, 0)
                )
            })
            .collect::<Vec<_>>()
            .join("; SNAT: ");
        let saves = pairs.iter().all(|(full, free)| *free < 0.9 * *full);
        ctx.out.finding(if saves {
            format!(
                "XDP new flows: evicting from the full conntrack costs {} ns per new flow (local backend: {shown}): a \
                 conntrack that deleted closed flows (garbage collection) would save that much.",
                pairs.iter().map(|(full, free)| fmt_num(full - free, 0)).collect::<Vec<_>>().join(" / ")
            )
        } else {
            format!(
                "XDP new flows: evicting is not what makes a new flow expensive (local backend: {shown}). Popping a \
                 node from a free list costs as much as evicting one or more: either way the insert touches cold memory (the \
                 map element it reuses, its LRU list neighbours, two buckets; the profile's `bpf_lru_pop_free` and \
                 `lookup_nulls_elem_raw`), so a conntrack garbage collector would not make new flows cheaper here."
            )
        });
    }
    rows.push(match &vip {
        Ok(v) => vec![
            "VIP connection: no per-packet work (a task's connect() to a VIP is translated once by the cgroup \
             connect4 hook); ns per connect() of a fresh UDP socket to the VIP above the same to a task's address"
                .into(),
            "`mesh_connect4`".into(),
            format!("{} (VIP {} vs plain {})", v.above.show(1), v.vip_ns.show(0), v.plain_ns.show(0)),
            "–".into(),
            "–".into(),
            format!("{} of {} connects translated", fmt_num(v.translated as f64, 0), fmt_num(v.expected as f64, 0)),
            "–".into(),
            "–".into(),
        ],
        Err(why) => vec![
            "VIP connection (cgroup connect4 hook)".into(),
            "`mesh_connect4`".into(),
            format!("not measured: {why}"),
            "–".into(),
            "–".into(),
            "–".into(),
            "–".into(),
            "–".into(),
        ],
    });
    match &vip {
        Ok(v) if v.translated != v.expected => ctx.out.finding(format!(
            "VIP connects: the agent translated {} of the {} connects to the VIP (the rest were not balanced).",
            v.translated, v.expected
        )),
        Err(why) => ctx.out.finding(format!("VIP connects were not measured: {why}")),
        _ => {}
    }

    let mut md = String::new();
    md.push_str(&format!(
        "BPF_PROG_TEST_RUN through aya `TestRun`, `repeat` = {}, {} rounds per path (paths interleaved, after a \
         warm-up); the number is the kernel's `duration` (ns per run), median (min–max) over rounds. JIT: \
         `net.core.bpf_jit_enable = {jit}`; `kernel.bpf_stats_enabled` = 0 while timing{}. Two table sizes: \
         **small** ({} services, {} frontends, {} backends, conntrack empty apart from the fixtures) and **big** \
         ({} services, {} frontends, {} backends, {} live conntrack entries written through the map API). Both \
         sizes are loaded at once and share the rounds of the full-repeat paths (each round: the empty program, \
         every path on the small tables, every path on the big ones), so their ratio is taken per round; the \
         new-flow rows run per size after that.\n\n",
        fmt_num(ctx.xdp_repeat as f64, 0),
        ctx.xdp_rounds,
        if stats_was_on { " (it was 1: set to 0 for the run, restored after)" } else { "" },
        small.services,
        small.frontends,
        small.backends,
        big.services,
        big.frontends,
        big.backends,
        fmt_num(big.ct_filled as f64, 0),
    ));
    md.push_str(&md_table(
        &[
            "path",
            "program",
            "ns/packet, small tables",
            "ns/packet, 10k svc + 100k ct",
            "small, net of the empty-program floor",
            "iterations on the path (small / big)",
            "target",
            "met",
        ],
        &rows,
    ));
    md.push_str("\nHow each path was forced (the verdict counters confirm the share of iterations that took it):\n\n");
    for r in &small.paths {
        md.push_str(&format!("- **{}**: {}.\n", r.title, r.how));
    }
    if !small.profiles.is_empty() {
        md.push_str(
            "\nProfiles of the paths that miss their target (`perf record -e cpu-clock` on the thread running \
             the path at full repeat, small tables; share of samples, symbols ≥ 2%; `bpf_prog_…` is the JIT'd \
             program itself):\n\n",
        );
        for (title, p) in &small.profiles {
            md.push_str(&format!("- {title}: {}\n", util::show_profile(p)));
        }
    }
    md.push_str(&sweep_markdown(ctx, &sweep));
    md.push_str(&calls_markdown(ctx, calls.as_ref(), &small));
    md.push_str(&format!(
        "\nPrograms as loaded (bytes of JIT code / translated BPF, verified instructions): {}\n",
        program_sizes(&small.progs)
    ));
    let json = json!({
        "repeat": ctx.xdp_repeat,
        "rounds": ctx.xdp_rounds,
        "distinct_syns": ctx.xdp_distinct,
        "bpf_jit_enable": jit,
        "bpf_stats_enabled_was_on": stats_was_on,
        "tables": {
            "small": {"label": small.label, "services": small.services, "frontends": small.frontends, "backends": small.backends, "conntrack": small.ct_filled},
            "big": {"label": big.label, "services": big.services, "frontends": big.frontends, "backends": big.backends, "conntrack": big.ct_filled},
        },
        "paths": jpaths,
        "empty_program_floor_ns": {"small": small.floor, "big": big.floor},
        "call_cost": calls.as_ref().map(|c| json!({
            "empty_ns": c.empty, "helper_call_ns": c.per_call, "conntrack_lookup_hit_ns": c.lookup,
            "mitigations": call_mitigations().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        })),
        "vip_path": match &vip {
            Ok(v) => v.json(),
            Err(why) => json!({ "not_measured": why }),
        },
        "new_flow_calibration": {"small": small.calib, "big": big.calib},
        "programs": small.progs,
        "new_flow_by_conntrack_size": sweep.iter().map(|r| json!({
            "conntrack_tcp_max": r.entries, "ns_per_new_flow": r.ns, "path_share": r.share,
            "one_lru_insert_ns": r.lru_insert,
            "one_insert_free_entries_ns": r.free_inserts.as_ref().map(|(l, h)| json!({"lru": l, "hash": h})),
        })).collect::<Vec<_>>(),
        "profiles": small.profiles.iter().map(|(t, p)| json!({"path": t, "top": p.iter().map(|(pct, s)| json!({"symbol": s, "pct": pct})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    Section {
        key: "xdp",
        json,
        markdown: md,
    }
}

/// What calls cost on this machine, and the finding that explains the per-packet figures.
fn calls_markdown(ctx: &mut Ctx, c: Option<&CallCostResult>, small: &FixtureResult) -> String {
    let Some(c) = c else {
        return "\nThe call-cost programs did not load: no figures for what a call costs here.\n"
            .into();
    };
    let mit = call_mitigations();
    let shown = mit
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let est = small
        .paths
        .iter()
        .find(|r| r.key == "established")
        .map(|r| r.ns.median);
    let mut md = format!(
        "\n**What a call costs here.** Raw XDP programs beside the empty one, interleaved, `repeat` = {}: {} calls of \
         `bpf_get_prandom_u32` (a call, a few instructions, a return), and one lookup that hits in a 262,144-entry LRU \
         hash of conntrack's layout (the verifier makes it a direct call of the map's lookup, which calls the hash \
         function, the bucket walk and memcmp). CPU mitigations the kernel reports: {}.\n\n",
        fmt_num(ctx.xdp_repeat as f64, 0),
        CALLS,
        if shown.is_empty() {
            "none read".into()
        } else {
            shown
        },
    );
    md.push_str(&md_table(
        &["program", "ns per run", "net of the empty program"],
        &[
            vec![
                "empty (`return XDP_PASS`)".into(),
                c.empty.show(1),
                "–".into(),
            ],
            vec![
                format!("{CALLS} × `bpf_get_prandom_u32`"),
                "–".into(),
                format!("{} per call", c.per_call.show(1)),
            ],
            vec![
                "one conntrack lookup (hit)".into(),
                "–".into(),
                c.lookup.show(1),
            ],
        ],
    ));
    if let Some(est) = est {
        ctx.out.finding(format!(
            "XDP per-packet figures on this machine: one helper call and return costs {} ns and one conntrack lookup \
             that hits {} ns (raw programs, net of the {} ns empty program){}. The established path is {} ns: the \
             harness floor, one such lookup, the `bpf_redirect` call, and ≈ {} ns of mesh's own instructions \
             (parse, port bitmap, backend check, counters, checksums, rewrite): the calls into the kernel, not the \
             program, are most of a packet's cost on this machine, and they shrink on a CPU that returns cheaply.",
            fmt_num(c.per_call.median, 1),
            fmt_num(c.lookup.median, 1),
            fmt_num(c.empty.median, 0),
            match mit.iter().find(|(k, _)| k == "spec_rstack_overflow") {
                Some((_, v)) if v.contains("Safe RET") => format!(
                    "; this CPU returns from every kernel function through the SRSO mitigation's thunk \
                     (spec_rstack_overflow: {v}), which is what makes calls, the harness's own included, dear here"
                ),
                _ => String::new(),
            },
            fmt_num(est, 0),
            fmt_num(est - c.empty.median - c.lookup.median - c.per_call.median, 0),
        ));
    }
    md
}

/// The conntrack-size table and its finding.
fn sweep_markdown(ctx: &mut Ctx, sweep: &[SizeResult]) -> String {
    if sweep.is_empty() {
        return String::new();
    }
    let base = sweep[0].ns.median;
    let rows: Vec<Vec<String>> = sweep
        .iter()
        .map(|r| {
            vec![
                format!(
                    "{}{}",
                    fmt_num(r.entries as f64, 0),
                    if r.entries == mapnames::MAX_CT_TCP {
                        " (default)"
                    } else {
                        ""
                    }
                ),
                // Element (112 bytes here: 48 of kernel header, 16 of key, 48 of value) plus
                // a 16-byte bucket per entry.
                format!("{:.0} MiB", r.entries as f64 * 128.0 / (1024.0 * 1024.0)),
                r.ns.show(0),
                format!("{:.2}×", r.ns.median / base),
                r.lru_insert
                    .as_ref()
                    .map(|l| l.show(0))
                    .unwrap_or_else(|| "n/a".into()),
                format!("{:.1}%", r.share * 100.0),
            ]
        })
        .collect();
    let mut md = format!(
        "\n**New flows by conntrack size** (`--conntrack-tcp-max`): distinct SYNs to a local backend as in the \
         new-flow row, {} per round, into a TCP conntrack of each size filled to capacity through the map API first \
         (every insert evicts), small tables otherwise, each size in a fresh datapath, calibrated by its own repeat-1 \
         overhead; median (min–max) over rounds. Beside it, the kernel's floor: **one LRU insert**, an XDP \
         program of raw instructions that only inserts a new key (a counter) into an LRU hash map of the same \
         size and layout (12-byte key, 44-byte value, one LRU list) kept full by its own runs, so every insert \
         evicts; `repeat` = {}, ns per run including the harness floor of section 1's empty program. A new flow \
         makes two such inserts (forward and reply entry) after a lookup that misses.\n\n",
        fmt_num(ctx.xdp_distinct as f64, 0),
        fmt_num(ctx.xdp_repeat as f64, 0)
    );
    md.push_str(&md_table(
        &[
            "TCP conntrack entries",
            "kernel memory",
            "ns per new flow",
            "× the smallest",
            "one LRU insert, raw program (ns per run)",
            "iterations on the path",
        ],
        &rows,
    ));
    let (small, default) = (
        &sweep[0],
        sweep.iter().find(|r| r.entries == mapnames::MAX_CT_TCP),
    );
    if let Some(d) = default {
        let big = sweep
            .last()
            .filter(|l| l.entries > d.entries)
            .map(|l| {
                format!(
                    ", {} ns into {} entries",
                    fmt_num(l.ns.median, 0),
                    fmt_num(l.entries as f64, 0)
                )
            })
            .unwrap_or_default();
        let shown = format!(
            "{} ns into a full conntrack of {} entries (2 MiB), {} ns into the default {}{big}",
            fmt_num(small.ns.median, 0),
            fmt_num(small.entries as f64, 0),
            fmt_num(d.ns.median, 0),
            fmt_num(d.entries as f64, 0),
        );
        let floor = d
            .lru_insert
            .as_ref()
            .map(|l| {
                format!(
                    " The kernel's own floor at the default size: one LRU insert of a new key into a full map costs {} ns \
                     in a program that does nothing else, so the two inserts of a new flow cost ≈ {} ns of its {} ns.",
                    fmt_num(l.median, 0),
                    fmt_num(2.0 * l.median, 0),
                    fmt_num(d.ns.median, 0)
                )
            })
            .unwrap_or_default();
        let free = d
            .free_inserts
            .as_ref()
            .map(|(lru, hash)| {
                format!(
                    " Into a map of that size with free entries, an insert costs {} ns (LRU) and {} ns (a plain \
                     preallocated hash, which pops a per-CPU free list and keeps no LRU lists but never evicts: a \
                     conntrack on it needs a garbage collector, as Cilium's non-LRU mode has).",
                    fmt_num(lru.median, 0),
                    fmt_num(hash.median, 0)
                )
            })
            .unwrap_or_default();
        let floor = floor + &free;
        ctx.out.finding(if d.ns.median >= 1.15 * small.ns.median {
            format!(
                "XDP new flows by conntrack size (`--conntrack-tcp-max`): {shown}. The size of the map costs a new \
                 flow {} ns at the default (cold memory: the buckets and elements an insert and its evictions touch \
                 miss the caches once the map outgrows them), but most of a new flow's cost is there even in a map \
                 that fits the caches. The profile of the new-flow path (section 1) says where: the kernel's hash-map \
                 work (lookups that miss, two LRU inserts under bucket and LRU locks, free entries refilled in batches \
                 by rotating the LRU lists), not the program's own instructions.{floor} The ≤ 150 ns target is \
                 missed at every size.",
                fmt_num(d.ns.median - small.ns.median, 0)
            )
        } else {
            format!(
                "XDP new flows by conntrack size (`--conntrack-tcp-max`): {shown}: the map's size hardly changes a new \
                 flow's cost here. The profile of the new-flow path (section 1) says where it goes: the kernel's \
                 hash-map work (lookups that miss, two LRU inserts under bucket and LRU locks, free entries refilled \
                 in batches by rotating the LRU lists), not the program's own instructions.{floor}"
            )
        });
    }
    md
}

fn program_sizes(p: &Value) -> String {
    ["xdp", "tc_ingress", "tc_task"]
        .iter()
        .map(|k| {
            let v = &p[k];
            format!(
                "`{k}` {} / {} B, {} insns",
                v["jited_bytes"]
                    .as_u64()
                    .map(|x| x.to_string())
                    .unwrap_or("?".into()),
                v["xlated_bytes"]
                    .as_u64()
                    .map(|x| x.to_string())
                    .unwrap_or("?".into()),
                v["verified_insns"]
                    .as_u64()
                    .map(|x| x.to_string())
                    .unwrap_or("?".into())
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
