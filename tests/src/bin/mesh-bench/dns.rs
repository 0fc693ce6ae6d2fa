//! 4. DNS.
//!
//! mesh's embedded server (127.0.0.11 inside a task, served by the agent) against dnsmasq
//! answering the same record from a hosts file (127.0.0.11 in its own namespace) and against
//! Docker's own embedded DNS (127.0.0.11 inside a real Swarm task of a private dockerd,
//! [`docker_dns`](crate::docker_dns)). All over loopback, load generator on CPU 0, server on
//! CPU 1, alternated per round: dnsperf -c 4 for throughput, then sequential queries from one
//! socket for latency percentiles. Only names the servers know are asked (nothing is
//! forwarded upstream; the agent's upstream is an address inside the bed that does not
//! exist), and every latency answer is checked against the address that server must give.

use std::{
    fs,
    net::UdpSocket,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_tests::Netns;
use serde_json::{Value, json};

use crate::{
    Ctx, dns_load,
    docker_dns::DockerDns,
    e2e::Bed,
    util::{self, Bg, Section, Stat, fmt_num, md_table, run_bounded, stat},
};

const NAME: &str = "web";
const VIP: [u8; 4] = [10, 200, 0, 2];
const SEC: &str = "4. DNS";
/// Targets: mesh's queries/s at least these multiples of dnsmasq's and Docker's.
const VS_DNSMASQ: f64 = 1.2;
const VS_DOCKER: f64 = 3.0;

pub(crate) fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    q.push(NAME.len() as u8);
    q.extend_from_slice(NAME.as_bytes());
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, A, IN
    q
}

/// The addresses of the A (IN) records of `r`, when `r` is a response to query `id` with
/// RCODE 0; `None` when it is not, or is malformed.
fn a_records(r: &[u8], id: u16) -> Option<Vec<[u8; 4]>> {
    if r.len() < 12 || r[0..2] != id.to_be_bytes() || r[2] & 0x80 == 0 || r[3] & 0x0f != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
    // A name: labels up to the root, or up to a compression pointer. Where it ends.
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *r.get(i)? as usize;
            match l & 0xc0 {
                0 if l == 0 => return Some(i + 1),
                0 => i += 1 + l,
                0xc0 => return r.get(i + 1).map(|_| i + 2),
                _ => return None,
            }
        }
    };
    let mut i = 12;
    for _ in 0..count(4) {
        i = skip_name(i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..count(6) {
        i = skip_name(i)?;
        let h = r.get(i..i + 10)?;
        let (ty, class) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        );
        let len = u16::from_be_bytes([h[8], h[9]]) as usize;
        let data = r.get(i + 10..i + 10 + len)?;
        if ty == 1 && class == 1 && len == 4 {
            out.push([data[0], data[1], data[2], data[3]]);
        }
        i += 10 + len;
    }
    Some(out)
}

/// Does `r` answer query `id` with an A record of `expect`?
pub(crate) fn answers(r: &[u8], id: u16, expect: [u8; 4]) -> bool {
    a_records(r, id).is_some_and(|a| a.contains(&expect))
}

fn show_addr(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

/// One server under test: where it is asked from and what it must answer.
struct Server {
    /// Key in the results (`mesh`, `dnsmasq`, `docker`).
    key: &'static str,
    /// The network namespace the load generator and the latency probe enter (a named
    /// namespace's `/run/netns/…`, or a container's `SandboxKey`).
    netns: PathBuf,
    /// The A record it answers for [`NAME`].
    expect: [u8; 4],
}

/// One query for [`NAME`] from inside the namespace at `path`: the A records of the answer,
/// if one came within 500 ms.
fn ask(path: &Path) -> Option<Vec<[u8; 4]>> {
    let path = path.to_path_buf();
    util::within(&path, move || {
        let s = UdpSocket::bind("127.0.0.1:0").ok()?;
        s.connect("127.0.0.11:53").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.send(&query(7)).ok()?;
        let mut buf = [0u8; 512];
        loop {
            let k = s.recv(&mut buf).ok()?;
            if let Some(a) = a_records(&buf[..k], 7) {
                return Some(a);
            }
        }
    })
}

/// Ask (bounded) until the server in `path` answers with at least one A record.
fn wait_answer(path: &Path, limit: Duration) -> Option<Vec<[u8; 4]>> {
    let end = Instant::now() + limit;
    loop {
        util::check_interrupt();
        if let Some(a) = ask(path).filter(|a| !a.is_empty()) {
            return Some(a);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Up to `n` sequential queries from one UDP socket inside the namespace at `path` (for at
/// most `limit`), this thread pinned to CPU 0: per-query round-trip times in µs of the
/// answers carrying `expect`, and how many went unanswered (500 ms each).
fn latency(path: &Path, n: usize, expect: [u8; 4], limit: Duration) -> (Vec<f64>, usize) {
    util::within(path, move || {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1");
        s.connect("127.0.0.11:53")
            .expect("connect to 127.0.0.11:53");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("set a read timeout");
        let mut rtt = Vec::with_capacity(n);
        let mut lost = 0;
        let mut buf = [0u8; 512];
        let end = Instant::now() + limit;
        for i in 0..n {
            if Instant::now() > end || util::interrupted() {
                break;
            }
            let id = i as u16;
            let q = query(id);
            let t = Instant::now();
            if s.send(&q).is_err() {
                lost += 1;
                continue;
            }
            loop {
                match s.recv(&mut buf) {
                    Ok(k) if answers(&buf[..k], id, expect) => {
                        rtt.push(t.elapsed().as_secs_f64() * 1e6);
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
        }
        (rtt, lost)
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// dnsperf on CPU 0 inside the namespace at `netns` (`nsenter --net`: the same way into a
/// named namespace and into a container's sandbox), against 127.0.0.11.
fn dnsperf(ctx: &Ctx, netns: &Path, file: &str) -> Value {
    let l = ctx.dns_secs.to_string();
    let net = format!("--net={}", netns.display());
    let (before, t) = (util::cpu_busy_ticks(), Instant::now());
    let out = run_bounded(
        None,
        "nsenter",
        &[
            &net,
            "taskset",
            "-c",
            "0",
            "dnsperf",
            "-s",
            "127.0.0.11",
            "-d",
            file,
            "-c",
            "4",
            "-l",
            &l,
        ],
        Duration::from_secs(ctx.dns_secs as u64 + 20),
    );
    let took = t.elapsed().as_secs_f64();
    let busy = util::cpu_busy_each(&before, &util::cpu_busy_ticks(), took);
    let text = util::text(&out);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let num = |key: &str| {
        line(key)
            .and_then(|v| v.split_whitespace().next().map(str::to_string))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match num("Queries per second") {
        Some(qps) => {
            let completed = num("Queries completed");
            let mut v = json!({
                "qps": qps,
                "completed": completed,
                "lost": num("Queries lost"),
                "response_codes": line("Response codes"),
                "avg_latency_us": num("Average Latency (s)").map(|s| s * 1e6),
                "secs": took,
            });
            dns_load::add_cpu(&mut v, &busy, completed.unwrap_or(0.0) as u64);
            v
        }
        None => {
            json!({"error": format!("dnsperf ({}): {}", out.status, text.chars().take(300).collect::<String>())})
        }
    }
}

/// Seconds of each saturating run: dnsperf's in the full run, half a second in --quick (it
/// reaches its rate at once, and --quick must stay under 3 minutes).
fn saturated_secs(ctx: &Ctx) -> f64 {
    if ctx.quick { 0.5 } else { ctx.dns_secs as f64 }
}

fn measure(ctx: &Ctx, s: &Server, file: &str) -> Value {
    let bg = util::quiet_gate(0.10, Duration::from_secs(if ctx.quick { 1 } else { 3 }));
    let foreign = util::Foreign::start();
    let t = Instant::now();
    let mut v = dnsperf(ctx, &s.netns, file);
    let expect = s.expect;
    v["saturated"] = dns_load::measure(&s.netns, saturated_secs(ctx), query(0), move |r| {
        r.len() >= 2 && answers(r, u16::from_be_bytes([r[0], r[1]]), expect)
    });
    let (mut rtt, lost) = latency(
        &s.netns,
        if ctx.quick { 2_000 } else { 10_000 },
        s.expect,
        Duration::from_secs(if ctx.quick { 15 } else { 60 }),
    );
    v["latency_queries"] = json!(rtt.len() + lost);
    v["latency_lost"] = json!(lost);
    v["p50_us"] = json!(pct(&mut rtt, 0.50));
    v["p90_us"] = json!(pct(&mut rtt, 0.90));
    v["p99_us"] = json!(pct(&mut rtt, 0.99));
    v["background_busy_cpus"] = json!(bg);
    v["foreign_cpus"] = json!(foreign.secs() / t.elapsed().as_secs_f64());
    v
}

/// A reason on one line, short enough for a table cell: its first line, and when that only
/// introduces what follows (`dockerd exited (…):` and a log's tail) the last line too (the
/// daemon's final error); a command's output stops at the daemon log appended to it.
fn short(why: &str) -> String {
    let head = why.split("\n--- ").next().unwrap_or(why);
    let lines: Vec<&str> = head
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let one = match lines.as_slice() {
        [] => String::new(),
        [first] => first.to_string(),
        [first, .., last] if first.ends_with(':') => format!("{first} {last}"),
        [first, ..] => format!("{first} …"),
    };
    let mut s: String = one.chars().take(200).collect();
    if s.len() < one.len() {
        s.push('…');
    }
    s.replace('|', "/").replace('`', "'")
}

/// Docker's side: a private dockerd with a one-task service `web`, and the address its
/// resolver answers for `web A` in that task. `Err`: why Docker is not measured.
fn start_docker(ctx: &Ctx) -> Result<(DockerDns, [u8; 4]), String> {
    util::log(
        ctx.start,
        "dns: starting a private dockerd with a one-task swarm service",
    );
    let docker = DockerDns::start(
        NAME,
        1,
        Duration::from_secs(if ctx.quick { 60 } else { 120 }),
    )?;
    let Some(a) = wait_answer(&docker.netns, Duration::from_secs(20)) else {
        return Err(format!(
            "Docker's resolver never answered {NAME} A at 127.0.0.11 in the task within 20 s:\n{}",
            docker.log_tail(20)
        ));
    };
    Ok((docker, a[0]))
}

pub fn run(ctx: &mut Ctx) -> Section {
    let dns_mod = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mesh-agent/src/dns/mod.rs"
    ));
    if !dns_mod.exists() {
        return Section {
            key: "dns",
            json: json!({"pending": "DNS lands separately"}),
            markdown: "Pending: DNS lands separately.\n".into(),
        };
    }
    // Docker first: its setup (dockerd, swarm, image, service) is the slow part, and over
    // before anything is measured.
    let docker = start_docker(ctx);
    let mut docker_json = match &docker {
        Ok((k, a)) => {
            util::log(
                ctx.start,
                format!(
                    "dns: Docker {} swarm task up in {:.1} s; its resolver answers {NAME} A = {}",
                    k.version,
                    k.setup_secs,
                    show_addr(*a)
                ),
            );
            json!({
                "version": k.version,
                "setup_s": k.setup_secs,
                "answer": show_addr(*a),
                "service_vip": k.service_vip,
                "sandbox": k.netns,
            })
        }
        Err(why) => {
            util::log(ctx.start, format!("dns: Docker not measured: {why}"));
            json!({ "not_measured": why })
        }
    };
    let mut bed = Bed::new(ctx, 3);
    // The agent serves 127.0.0.11 in every task; an upstream that does not exist (only known
    // names are asked, so nothing leaves the bed).
    let agent = bed.start_agent(ctx, "xdp", &["--dns-upstream", "198.18.0.254:53"]);
    let task = &bed.tasks[0].ns;
    let dir = bed.dir.path().to_path_buf();
    let qfile = dir.join("queries");
    fs::write(&qfile, format!("{NAME} A\n")).expect("write the dnsperf query file");
    let qfile = qfile
        .to_str()
        .expect("the bed's directory is UTF-8")
        .to_string();
    // dnsmasq in its own namespace, same record from a hosts file, same address.
    let dm_ns = Netns::new("bd");
    util::track_netns(&dm_ns.name);
    dm_ns.ip(&["addr", "add", "127.0.0.11/8", "dev", "lo"]);
    let hosts = dir.join("hosts");
    fs::write(&hosts, format!("{} {NAME}\n", show_addr(VIP))).expect("write dnsmasq's hosts file");
    let dnsmasq = Bg::spawn(
        Some(&dm_ns.name),
        Some(1),
        "dnsmasq",
        &[
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", hosts.display()),
            "--listen-address=127.0.0.11",
            "--bind-interfaces",
            "--cache-size=1000",
            "--pid-file=",
        ],
        &dir.join("dnsmasq.log"),
    );
    let mut servers = vec![
        Server {
            key: "mesh",
            netns: task.path(),
            expect: VIP,
        },
        Server {
            key: "dnsmasq",
            netns: dm_ns.path(),
            expect: VIP,
        },
    ];
    if let Ok((k, a)) = &docker {
        servers.push(Server {
            key: "docker",
            netns: k.netns.clone(),
            expect: *a,
        });
    }
    // mesh and dnsmasq answer the right address before measuring (Docker already did).
    for s in &servers[..2] {
        let got = wait_answer(&s.netns, Duration::from_secs(20));
        if !got.as_ref().is_some_and(|a| a.contains(&s.expect)) {
            panic!(
                "{} DNS did not answer {NAME} A = {} at 127.0.0.11 within 20 s ({}):\n{}",
                s.key,
                show_addr(s.expect),
                match got {
                    Some(a) => format!(
                        "it answered {}",
                        a.into_iter().map(show_addr).collect::<Vec<_>>().join(", ")
                    ),
                    None => "no answer".into(),
                },
                if s.key == "mesh" {
                    agent.log()
                } else {
                    dnsmasq.log_text()
                }
            );
        }
    }
    let mut rounds = Vec::new();
    for r in 0..ctx.dns_rounds {
        let mut round = serde_json::Map::new();
        for s in &servers {
            round.insert(s.key.into(), measure(ctx, s, &qfile));
        }
        util::log(
            ctx.start,
            format!(
                "dns: round {}: {}",
                r + 1,
                servers
                    .iter()
                    .map(|s| format!(
                        "{} {} q/s (saturated {} q/s) p50 {} µs",
                        s.key,
                        fmt_num(round[s.key]["qps"].as_f64().unwrap_or(f64::NAN), 0),
                        fmt_num(
                            round[s.key]["saturated"]["qps"]
                                .as_f64()
                                .unwrap_or(f64::NAN),
                            0
                        ),
                        fmt_num(round[s.key]["p50_us"].as_f64().unwrap_or(f64::NAN), 1)
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
        rounds.push(Value::Object(round));
    }
    // Per round mesh's figure (at JSON pointer `k` in its run) over a baseline's, then the median.
    let per_round = |k: &str, other: &str| {
        stat(
            &rounds
                .iter()
                .filter_map(|r| {
                    Some(r["mesh"].pointer(k)?.as_f64()? / r[other].pointer(k)?.as_f64()?)
                })
                .collect::<Vec<_>>(),
        )
    };
    let vs_dnsmasq = per_round("/qps", "dnsmasq");
    let vs_docker = per_round("/qps", "docker");
    // Where mesh's server spends its time, when it misses a throughput target (cheap: one
    // more dnsperf).
    let profile = if vs_dnsmasq.median < VS_DNSMASQ || vs_docker.median < VS_DOCKER {
        let pid = agent.bg.pid().to_string();
        let mut done = false;
        util::perf_top(&["-p", &pid], ctx.dns_secs as f64, || {
            if !done {
                dnsperf(ctx, &servers[0].netns, &qfile);
                done = true;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    } else {
        None
    };
    drop(dnsmasq);
    drop(dm_ns);
    drop(agent);
    drop(bed);
    // dockerd, the swarm and the task go (the guard's cleanup, bounded: ~10 s).
    let docker = docker.map(|(k, a)| {
        let t = Instant::now();
        let version = k.version.clone();
        let vip = k.service_vip.clone();
        drop(k);
        docker_json["cleanup_s"] = json!(t.elapsed().as_secs_f64());
        (version, vip, a)
    });

    let col = |who: &str, k: &str| {
        stat(
            &rounds
                .iter()
                .filter_map(|r| r[who].pointer(k)?.as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let p99_vs_dnsmasq = per_round("/p99_us", "dnsmasq");
    let p99_vs_docker = per_round("/p99_us", "docker");
    let times = |s: &Stat| format!("{}×", s.show(2));
    let docker_title = match &docker {
        Ok((version, _, _)) => {
            format!("Docker {version} embedded DNS (in dockerd, 127.0.0.11 in a Swarm task)")
        }
        Err(_) => "Docker embedded DNS (127.0.0.11 in a Swarm task)".into(),
    };
    // The cells both tables start with, for the runs at JSON pointer `base` ("" for
    // dnsperf's, "/saturated"): queries/s, mesh's ratios to the baselines, both CPUs' busy
    // shares, the server's CPU per query.
    let lead = |who: &str, base: &str, vs_dnsmasq: &Stat, vs_docker: &Stat| -> Vec<String> {
        let mesh = who == "mesh";
        let at = |k: &str| col(who, &format!("{base}/{k}"));
        vec![
            at("qps").show(0),
            if mesh {
                times(vs_dnsmasq)
            } else {
                "–".into()
            },
            match (&docker, mesh) {
                (Ok(_), true) => times(vs_docker),
                (Err(_), true) => "not measured".into(),
                _ => "–".into(),
            },
            format!(
                "{} / {} %",
                fmt_num(at("cpu0_busy").median * 100.0, 0),
                fmt_num(at("cpu1_busy").median * 100.0, 0)
            ),
            at("server_cpu_us_per_query").show(2),
        ]
    };
    const LEAD_HEAD: [&str; 6] = [
        "server",
        "queries/s",
        "× dnsmasq",
        "× Docker",
        "CPU 0 / CPU 1 busy",
        "server CPU µs per query",
    ];
    // One row per server: its name, then `cells` of its runs (or why Docker was not measured).
    let table_rows = |cells: &dyn Fn(&str) -> Vec<String>| {
        let mut rows = Vec::new();
        for (who, title) in [
            (
                "mesh",
                "mesh embedded DNS (in the agent, 127.0.0.11 in a task)".to_string(),
            ),
            ("dnsmasq", "dnsmasq 2.90 (hosts file, own netns)".into()),
            ("docker", docker_title.clone()),
        ] {
            let mut row = vec![title];
            let c = cells(who);
            match (&docker, who) {
                (Err(why), "docker") => {
                    row.push(format!("not measured: {}", short(why)));
                    row.extend(std::iter::repeat_n("–".to_string(), c.len() - 1));
                }
                _ => row.extend(c),
            }
            rows.push(row);
        }
        rows
    };
    let rows = table_rows(&|who| {
        let mut r = lead(who, "", &vs_dnsmasq, &vs_docker);
        r.extend([
            col(who, "/avg_latency_us").show(1),
            col(who, "/p50_us").show(1),
            col(who, "/p90_us").show(1),
            col(who, "/p99_us").show(1),
        ]);
        r
    });
    let sat_vs_dnsmasq = per_round("/saturated/qps", "dnsmasq");
    let sat_vs_docker = per_round("/saturated/qps", "docker");
    let sat_rows = table_rows(&|who| {
        let mut r = lead(who, "/saturated", &sat_vs_dnsmasq, &sat_vs_docker);
        r.extend([fmt_num(
            rounds
                .iter()
                .filter_map(|r| {
                    Some(
                        r[who]["saturated"]["lost"].as_f64()?
                            + r[who]["saturated"]["wrong"].as_f64()?,
                    )
                })
                .sum::<f64>(),
            0,
        )]);
        r
    });

    // Targets.
    let mesh_qps = col("mesh", "/qps");
    let met = |s: &Stat, ok: fn(f64) -> bool| (s.n > 0).then(|| ok(s.median));
    // One queries/s target: mesh's figure at JSON pointer `k` over `other`'s (per round:
    // `vs`), at least `min` times.
    let qps_check =
        |ctx: &mut Ctx, what: &str, k: &str, vs: &Stat, other: &str, title: &str, min: f64| {
            let m = (vs.n > 0).then_some(vs.median >= min);
            let result = match (&docker, other) {
                (Err(why), "docker") => format!("not measured: {}", short(why)),
                _ => format!(
                    "{} q/s, {}× {title} ({} q/s)",
                    fmt_num(col("mesh", k).median, 0),
                    fmt_num(vs.median, 2),
                    fmt_num(col(other, k).median, 0)
                ),
            };
            ctx.out
                .check(SEC, what, result, &format!("≥ {min}× {title}"), m);
            m
        };
    let dnsmasq_met = qps_check(
        ctx,
        "mesh DNS queries/s vs dnsmasq (dnsperf -c 4)",
        "/qps",
        &vs_dnsmasq,
        "dnsmasq",
        "dnsmasq",
        VS_DNSMASQ,
    );
    let docker_met = qps_check(
        ctx,
        "mesh DNS queries/s vs Docker's embedded DNS (dnsperf -c 4)",
        "/qps",
        &vs_docker,
        "docker",
        "Docker",
        VS_DOCKER,
    );
    let sat_dnsmasq_met = qps_check(
        ctx,
        "mesh DNS queries/s vs dnsmasq, server CPU saturated (batched load)",
        "/saturated/qps",
        &sat_vs_dnsmasq,
        "dnsmasq",
        "dnsmasq",
        VS_DNSMASQ,
    );
    let sat_docker_met = qps_check(
        ctx,
        "mesh DNS queries/s vs Docker's embedded DNS, server CPU saturated (batched load)",
        "/saturated/qps",
        &sat_vs_docker,
        "docker",
        "Docker",
        VS_DOCKER,
    );
    ctx.out.check(
        SEC,
        "server CPU per query under dnsperf: mesh / dnsmasq / Docker",
        format!(
            "{} / {} / {} µs",
            fmt_num(col("mesh", "/server_cpu_us_per_query").median, 2),
            fmt_num(col("dnsmasq", "/server_cpu_us_per_query").median, 2),
            fmt_num(col("docker", "/server_cpu_us_per_query").median, 2)
        ),
        "(context)",
        None,
    );
    let p99 = |who: &str| format!("{} µs", fmt_num(col(who, "/p99_us").median, 1));
    // Below a baseline = below it in most rounds (the per-round ratio's median) *and* in the
    // medians themselves: in a noisy run the two can disagree, and then it is not below.
    let p99_below = |ratio: &Stat, who: &str| {
        met(ratio, |r| r < 1.0)
            .map(|m| m && col("mesh", "/p99_us").median < col(who, "/p99_us").median)
    };
    let (p99_dm, p99_dk) = (
        p99_below(&p99_vs_dnsmasq, "dnsmasq"),
        p99_below(&p99_vs_docker, "docker"),
    );
    let p99_met = match (p99_dm, p99_dk) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    };
    ctx.out.check(
        SEC,
        "mesh DNS p99 latency (sequential queries, one socket)",
        format!(
            "{} (dnsmasq {}, Docker {})",
            p99("mesh"),
            p99("dnsmasq"),
            if docker.is_ok() {
                p99("docker")
            } else {
                "not measured".into()
            }
        ),
        "below both",
        p99_met,
    );

    // Findings.
    let profile_note = profile
        .as_ref()
        .map(|p| {
            format!(
                " Profile of the agent under dnsperf: {}.",
                util::show_profile(p)
            )
        })
        .unwrap_or_default();
    // Under dnsperf, is the load (CPU 0) the bound rather than mesh's server (CPU 1)?
    let load_bound = {
        let (c0, c1) = (
            col("mesh", "/cpu0_busy").median,
            col("mesh", "/cpu1_busy").median,
        );
        (c0 >= 0.95 && c1 < 0.95).then(|| {
            format!(
                " Under dnsperf the load is the bound, not mesh's server: CPU 0 (dnsperf, and the kernel's \
                 receive path of every query over loopback) was {} % busy while CPU 1 (mesh's server) was {} %; \
                 the server's CPU per query is {} µs vs dnsmasq's {} µs, and with a load that costs less per query \
                 (sendmmsg/recvmmsg batches, CPU 1 saturated) mesh answers {}× dnsmasq's queries/s and {}× Docker's.",
                fmt_num(c0 * 100.0, 0),
                fmt_num(c1 * 100.0, 0),
                fmt_num(col("mesh", "/server_cpu_us_per_query").median, 2),
                fmt_num(col("dnsmasq", "/server_cpu_us_per_query").median, 2),
                fmt_num(sat_vs_dnsmasq.median, 2),
                fmt_num(sat_vs_docker.median, 2),
            )
        })
    };
    if dnsmasq_met == Some(false) {
        ctx.out.finding(format!(
            "DNS: mesh's embedded server answers {} queries/s under dnsperf, {}× dnsmasq's {} (target ≥ {VS_DNSMASQ}×; \
             p50 {} µs vs {} µs).{}{profile_note}",
            fmt_num(mesh_qps.median, 0),
            fmt_num(vs_dnsmasq.median, 2),
            fmt_num(col("dnsmasq", "/qps").median, 0),
            fmt_num(col("mesh", "/p50_us").median, 0),
            fmt_num(col("dnsmasq", "/p50_us").median, 0),
            load_bound.as_deref().unwrap_or(""),
        ));
    }
    for (met, vs, who) in [
        (sat_dnsmasq_met, &sat_vs_dnsmasq, "dnsmasq's"),
        (sat_docker_met, &sat_vs_docker, "Docker's"),
    ] {
        if met == Some(false) {
            ctx.out.finding(format!(
                "DNS: with the server's CPU saturated (batched load) mesh answers {}× {who} queries/s (target ≥ {}×).",
                fmt_num(vs.median, 2),
                if who == "Docker's" { VS_DOCKER } else { VS_DNSMASQ },
            ));
        }
    }
    if docker_met == Some(false) {
        ctx.out.finding(format!(
            "DNS: mesh's embedded server answers {}× the queries/s of Docker's embedded DNS under dnsperf ({} vs {}; \
             target ≥ {VS_DOCKER}×).{}",
            fmt_num(vs_docker.median, 2),
            fmt_num(mesh_qps.median, 0),
            fmt_num(col("docker", "/qps").median, 0),
            if dnsmasq_met == Some(false) {
                String::new()
            } else {
                format!("{}{profile_note}", load_bound.as_deref().unwrap_or(""))
            }
        ));
    }
    if p99_met == Some(false) {
        ctx.out.finding(format!(
            "DNS: mesh's p99 ({}) is not below {}.",
            p99("mesh"),
            [("dnsmasq", p99_dm), ("docker", p99_dk)]
                .iter()
                .filter(|(_, m)| *m == Some(false))
                .map(|(who, _)| format!("{who}'s ({})", p99(who)))
                .collect::<Vec<_>>()
                .join(" nor ")
        ));
    }
    match &docker {
        Err(why) => ctx.out.finding(format!(
            "DNS: Docker's embedded DNS was not measured: {}",
            short(why)
        )),
        Ok((_, Some(vip), a)) if vip.split('/').next() != Some(show_addr(*a).as_str()) => {
            ctx.out.finding(format!(
                "DNS: Docker's resolver answered {NAME} A = {} but the service's VIP on appnet is {vip}.",
                show_addr(*a)
            ))
        }
        Ok(_) => {}
    }
    let lost: f64 = rounds
        .iter()
        .filter_map(|r| r["mesh"]["lost"].as_f64())
        .sum();
    if lost > 0.0 {
        ctx.out.finding(format!(
            "DNS: dnsperf lost {lost} queries to mesh's server over {} rounds.",
            rounds.len()
        ));
    }

    let mut md = String::new();
    md.push_str(&format!(
        "`dnsperf -c 4 -l {}` asking `{NAME} A` at 127.0.0.11 over loopback, then {} sequential queries from one \
         socket for the latency percentiles (each answer checked: the A record that server must give); mesh's \
         server inside task 1's namespace (the agent, pinned to CPU 1, answering the service's VIP), dnsmasq in \
         its own namespace with the same record in a hosts file (pinned to CPU 1), Docker's resolver inside a \
         Swarm task (below); the load on CPU 0, entering each namespace with `nsenter --net`. {} rounds, \
         alternated (mesh, dnsmasq, Docker in each); ratios are per round, then the median.\n\n",
        ctx.dns_secs,
        if ctx.quick { "2,000" } else { "10,000" },
        ctx.dns_rounds
    ));
    md.push_str(&md_table(
        &[
            &LEAD_HEAD[..],
            &["dnsperf avg µs", "p50 µs", "p90 µs", "p99 µs"],
        ]
        .concat(),
        &rows,
    ));
    md.push_str(&format!(
        "\nCPU 0 / CPU 1 busy: the share of each CPU busy (user + system + softirq, /proc/stat) during the dnsperf \
         run; server CPU per query = CPU 1's busy time / queries answered (it includes the kernel's delivery of \
         the answers, which runs on the sending CPU over loopback, as the queries' delivery runs on CPU 0). When \
         CPU 0 is the one at 100 %, the queries/s are dnsperf's bound, not the server's.\n\n\
         **Server CPU saturated**: the same servers, right after each dnsperf run, asked by mesh-bench's own load \
         ({} connected UDP sockets, {} queries outstanding on each, sendmmsg/recvmmsg batches, every answer \
         checked), which costs CPU 0 less per query than dnsperf, so the server's CPU 1 is what runs out \
         ({} s per run).\n\n",
        dns_load::SOCKETS,
        dns_load::WINDOW,
        saturated_secs(ctx),
    ));
    md.push_str(&md_table(
        &[&LEAD_HEAD[..], &["unanswered or wrong"]].concat(),
        &sat_rows,
    ));
    match &docker {
        Ok((version, vip, a)) => md.push_str(&format!(
            "\nDocker's embedded DNS: a private dockerd {version} (Debian's docker.io, in its own network namespace, \
             vfs storage) with a single-node swarm (`docker swarm init`), an attachable overlay network `appnet` and \
             a service `{NAME}` of one busybox task on it. The load and the latency probe run inside that task's \
             network namespace (its `SandboxKey` from `docker inspect`), where Docker's own iptables rule sends \
             127.0.0.11:53 to the resolver that dockerd serves; it answers the service's VIP on `appnet` ({}{}). \
             Every dockerd thread pinned to CPU 1 (`taskset -a -p`) after the setup ({} s, before the rounds).\n",
            show_addr(*a),
            match vip {
                Some(v) if v.split('/').next() == Some(show_addr(*a).as_str()) => {
                    ", as `docker service inspect` reports it".to_string()
                }
                Some(v) => format!("; `docker service inspect` reports {v}"),
                None => String::new(),
            },
            fmt_num(docker_json["setup_s"].as_f64().unwrap_or(f64::NAN), 1)
        )),
        Err(why) => md.push_str(&format!(
            "\nDocker's embedded DNS was not measured in this run: {}\n",
            short(why)
        )),
    }
    if let Some(p) = &profile {
        md.push_str(&format!(
            "\nProfile of the agent process under dnsperf (`perf record -e cpu-clock -p`, symbols ≥ 2%): {}\n",
            util::show_profile(p)
        ));
    }
    let json = json!({
        "rounds": rounds,
        "ratio_vs_dnsmasq": vs_dnsmasq,
        "ratio_vs_docker": vs_docker,
        "saturated_ratio_vs_dnsmasq": sat_vs_dnsmasq,
        "saturated_ratio_vs_docker": sat_vs_docker,
        "p99_ratio_vs_dnsmasq": p99_vs_dnsmasq,
        "p99_ratio_vs_docker": p99_vs_docker,
        "docker": docker_json,
        "seconds": ctx.dns_secs,
        "agent_profile": profile.map(|p| p.into_iter().map(|(pct, s)| json!({"symbol": s, "pct": pct})).collect::<Vec<_>>()),
    });
    Section {
        key: "dns",
        json,
        markdown: md,
    }
}
