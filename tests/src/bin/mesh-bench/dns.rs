//! 4. DNS: mesh's embedded server (127.0.0.11 inside a task, served by the agent) against
//! dnsmasq answering the same record from a hosts file (127.0.0.11 in its own namespace).
//! Both over loopback, load generator on CPU 0, server on CPU 1, alternated per round:
//! dnsperf -c 4 for throughput, then sequential queries from one socket for latency
//! percentiles. Only names both servers know are asked (nothing is forwarded upstream; the
//! agent's upstream is an address inside the bed that does not exist).

use std::{
    fs,
    net::UdpSocket,
    time::{Duration, Instant},
};

use mesh_tests::Netns;
use serde_json::{Value, json};

use crate::{
    Ctx,
    e2e::Bed,
    util::{self, Bg, Section, fmt_num, md_table, run_bounded, stat},
};

const NAME: &str = "web";
const VIP: [u8; 4] = [10, 200, 0, 2];

fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    q.push(NAME.len() as u8);
    q.extend_from_slice(NAME.as_bytes());
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, A, IN
    q
}

/// Does `r` answer query `id` with the VIP?
fn answers(r: &[u8], id: u16) -> bool {
    r.len() >= 12
        && r[0..2] == id.to_be_bytes()
        && r[3] & 0x0f == 0
        && r.windows(4).any(|w| w == VIP)
}

/// `n` sequential queries from one UDP socket inside the namespace at `path`, this thread
/// pinned to CPU 0: per-query round-trip times in µs, and how many went unanswered.
fn latency(path: &std::path::Path, n: usize) -> (Vec<f64>, usize) {
    util::within(path, move || {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.connect("127.0.0.11:53").expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut rtt = Vec::with_capacity(n);
        let mut lost = 0;
        let mut buf = [0u8; 512];
        for i in 0..n {
            let id = i as u16;
            let q = query(id);
            let t = Instant::now();
            if s.send(&q).is_err() {
                lost += 1;
                continue;
            }
            loop {
                match s.recv(&mut buf) {
                    Ok(k) if answers(&buf[..k], id) => {
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

fn dnsperf(ctx: &Ctx, ns: &str, file: &str) -> Value {
    let l = ctx.dns_secs.to_string();
    let out = run_bounded(
        Some(ns),
        "taskset",
        &[
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
    let text = util::text(&out);
    let num = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    match num("Queries per second") {
        Some(qps) => json!({
            "qps": qps,
            "completed": num("Queries completed"),
            "lost": num("Queries lost"),
            "avg_latency_us": num("Average Latency (s)").map(|s| s * 1e6),
        }),
        None => {
            json!({"error": format!("dnsperf ({}): {}", out.status, text.chars().take(300).collect::<String>())})
        }
    }
}

fn measure(ctx: &Ctx, ns: &Netns, file: &str) -> Value {
    let bg = util::quiet_gate(0.10, Duration::from_secs(if ctx.quick { 1 } else { 3 }));
    let foreign = util::Foreign::start();
    let t = Instant::now();
    let mut v = dnsperf(ctx, &ns.name, file);
    let (mut rtt, lost) = latency(&ns.path(), if ctx.quick { 2_000 } else { 10_000 });
    v["latency_queries"] = json!(rtt.len() + lost);
    v["latency_lost"] = json!(lost);
    v["p50_us"] = json!(pct(&mut rtt, 0.50));
    v["p90_us"] = json!(pct(&mut rtt, 0.90));
    v["p99_us"] = json!(pct(&mut rtt, 0.99));
    v["background_busy_cpus"] = json!(bg);
    v["foreign_cpus"] = json!(foreign.secs() / t.elapsed().as_secs_f64());
    v
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
    let mut bed = Bed::new(ctx, 3);
    // The agent serves 127.0.0.11 in every task; an upstream that does not exist (only known
    // names are asked, so nothing leaves the bed).
    let agent = bed.start_agent(ctx, "xdp", &["--dns-upstream", "198.18.0.254:53"]);
    let task = &bed.tasks[0].ns;
    let dir = bed.dir.path().to_path_buf();
    let qfile = dir.join("queries");
    fs::write(&qfile, format!("{NAME} A\n")).unwrap();
    let qfile = qfile.to_str().unwrap().to_string();
    // dnsmasq in its own namespace, same record from a hosts file, same address.
    let dm_ns = Netns::new("bd");
    util::track_netns(&dm_ns.name);
    dm_ns.ip(&["addr", "add", "127.0.0.11/8", "dev", "lo"]);
    let hosts = dir.join("hosts");
    fs::write(
        &hosts,
        format!("{}.{}.{}.{} {NAME}\n", VIP[0], VIP[1], VIP[2], VIP[3]),
    )
    .unwrap();
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
    // Both answer before measuring.
    for (what, ns) in [("mesh", task), ("dnsmasq", &dm_ns)] {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            util::check_interrupt();
            let (r, _) = latency(&ns.path(), 1);
            if !r.is_empty() {
                break;
            }
            if Instant::now() > end {
                panic!(
                    "{what} DNS never answered {NAME} at 127.0.0.11:\n{}",
                    if what == "mesh" {
                        agent.log()
                    } else {
                        dnsmasq.log_text()
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut rounds = Vec::new();
    for r in 0..ctx.dns_rounds {
        let m = measure(ctx, task, &qfile);
        let d = measure(ctx, &dm_ns, &qfile);
        util::log(
            ctx.start,
            format!(
                "dns: round {} mesh {} q/s p50 {} µs; dnsmasq {} q/s p50 {} µs",
                r + 1,
                fmt_num(m["qps"].as_f64().unwrap_or(f64::NAN), 0),
                fmt_num(m["p50_us"].as_f64().unwrap_or(f64::NAN), 1),
                fmt_num(d["qps"].as_f64().unwrap_or(f64::NAN), 0),
                fmt_num(d["p50_us"].as_f64().unwrap_or(f64::NAN), 1)
            ),
        );
        rounds.push(json!({"mesh": m, "dnsmasq": d}));
    }
    // Where mesh's server spends its time, when it is far behind (cheap: one more dnsperf).
    let ratio_now = stat(
        &rounds
            .iter()
            .filter_map(|r| Some(r["mesh"]["qps"].as_f64()? / r["dnsmasq"]["qps"].as_f64()?))
            .collect::<Vec<_>>(),
    );
    let profile = if ratio_now.median < 0.5 {
        let pid = agent.bg.pid().to_string();
        let mut done = false;
        util::perf_top(&["-p", &pid], ctx.dns_secs as f64, || {
            if !done {
                dnsperf(ctx, &task.name, &qfile);
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

    let col = |who: &str, k: &str| {
        stat(
            &rounds
                .iter()
                .filter_map(|r| r[who][k].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let ratio = stat(
        &rounds
            .iter()
            .filter_map(|r| Some(r["mesh"]["qps"].as_f64()? / r["dnsmasq"]["qps"].as_f64()?))
            .collect::<Vec<_>>(),
    );
    let mut rows = Vec::new();
    for (who, title) in [
        (
            "mesh",
            "mesh embedded DNS (in the agent, 127.0.0.11 in a task)",
        ),
        ("dnsmasq", "dnsmasq 2.90 (hosts file, own netns)"),
    ] {
        rows.push(vec![
            title.to_string(),
            col(who, "qps").show(0),
            if who == "mesh" {
                format!("{}×", ratio.show(2))
            } else {
                "–".into()
            },
            col(who, "avg_latency_us").show(1),
            col(who, "p50_us").show(1),
            col(who, "p90_us").show(1),
            col(who, "p99_us").show(1),
        ]);
    }
    let mesh_qps = col("mesh", "qps");
    ctx.out.check(
        "4. DNS",
        "mesh DNS queries/s vs dnsmasq (dnsperf -c 4)",
        format!(
            "{} q/s, {}× dnsmasq",
            fmt_num(mesh_qps.median, 0),
            fmt_num(ratio.median, 2)
        ),
        "(no target)",
        None,
    );
    if ratio.median < 0.5 {
        ctx.out.finding(format!(
            "DNS: mesh's embedded server answers {} queries/s, {}× dnsmasq's {} (p50 {} µs vs {} µs); Docker 20.10's \
             resolver did ≈35k/s on this kind of machine (reference).{}",
            fmt_num(mesh_qps.median, 0),
            fmt_num(ratio.median, 2),
            fmt_num(col("dnsmasq", "qps").median, 0),
            fmt_num(col("mesh", "p50_us").median, 0),
            fmt_num(col("dnsmasq", "p50_us").median, 0),
            profile.as_ref().map(|p| format!(" Profile of the agent under dnsperf: {}.", util::show_profile(p))).unwrap_or_default()
        ));
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
         socket for the latency percentiles; mesh's server inside task 1's namespace (the agent, pinned to CPU 1, \
         answering the service's VIP), dnsmasq in its own namespace with the same record in a hosts file (pinned \
         to CPU 1); the load on CPU 0. {} rounds, alternated; the ratio is per round, then the median.\n\n",
        ctx.dns_secs,
        if ctx.quick { "2,000" } else { "10,000" },
        ctx.dns_rounds
    ));
    md.push_str(&md_table(
        &[
            "server",
            "queries/s",
            "× dnsmasq",
            "dnsperf avg µs",
            "p50 µs",
            "p90 µs",
            "p99 µs",
        ],
        &rows,
    ));
    md.push_str(
        "\nDocker's embedded DNS was not measured in this run (it needs a running Swarm with containers); for \
         reference, shared/reference/swarm-behaviour.md records Docker 20.10's resolver at ≈35k queries/s and \
         dnsmasq at ≈87k queries/s with the same dnsperf settings on this kind of machine.\n",
    );
    if let Some(p) = &profile {
        md.push_str(&format!(
            "\nProfile of the agent process under dnsperf (`perf record -e cpu-clock -p`, symbols ≥ 2%): {}\n",
            util::show_profile(p)
        ));
    }
    let json = json!({
        "rounds": rounds,
        "ratio_vs_dnsmasq": ratio,
        "seconds": ctx.dns_secs,
        "agent_profile": profile.map(|p| p.into_iter().map(|(pct, s)| json!({"symbol": s, "pct": pct})).collect::<Vec<_>>()),
    });
    Section {
        key: "dns",
        json,
        markdown: md,
    }
}
