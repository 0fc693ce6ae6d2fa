//! 3. Control plane at scale.
//!
//! - In memory, no namespaces: generated `State`s run through the agent's real path
//!   (`Agent::apply`), `DesiredCache::update` (Reach::Cluster, so remote tasks are backends) →
//!   `Tables::apply` (first sync) or `Tables::apply_changes` (later ones) → `Maps::apply`
//!   on real maps of a loaded `Datapath`, then the new snapshot replaces the previous one
//!   (whose release is timed on its own). Each shape runs in a fresh
//!   child process (this binary with `--child-control`), so its VmRSS/VmHWM are its own.
//! - `iptables-restore` of an equivalent kube-proxy-style ruleset, once, in a scratch netns.
//! - Time from a state-file change to the first new flow reaching the new task, on a real
//!   single-node bed (agent process, XDP, nginx tasks).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::{
    ebpf::Datapath,
    model::State,
    tables::{self, LocalLinks, Reach, Tables},
};
use mesh_tests::Netns;
use serde_json::{Value, json};

use crate::{
    Ctx,
    e2e::{self, Bed},
    states::{Cluster, Shape},
    util::{self, Section, fmt_dur, fmt_num, md_table, stat},
};

/// The shapes, smallest first. `fit`: a variant that fits the maps when the requested one
/// does not.
fn shapes() -> Vec<(&'static str, &'static str, Shape, (u64, u64))> {
    let s = |nodes, services, tasks, dnsrr_every| Shape {
        nodes,
        services,
        tasks,
        networks: 20,
        publish_every: 10,
        dnsrr_every,
        port_base: 30_000,
    };
    vec![
        (
            "1k",
            "100 services × 10 tasks, 20 nodes",
            s(20, 100, 1_000, 0),
            (20, 60),
        ),
        (
            "10k",
            "1k services × 10 tasks, 200 nodes",
            s(200, 1_000, 10_000, 0),
            (20, 60),
        ),
        (
            "1kx100",
            "1k services × 100 tasks, 2,000 nodes",
            s(2_000, 1_000, 100_000, 0),
            (10, 60),
        ),
        (
            "10kx10",
            "10k services × 10 tasks, 2,000 nodes",
            s(2_000, 10_000, 100_000, 0),
            (10, 100),
        ),
        (
            "swarm3k",
            "Swarm3k: 3,000 nodes, 10k services, 150k tasks, 20 networks",
            s(3_000, 10_000, 150_000, 0),
            (12, 150),
        ),
        (
            "swarm3k-fit",
            "Swarm3k, a third of the services in dnsrr mode (no VIP)",
            s(3_000, 10_000, 150_000, 3),
            (12, 150),
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Child: one shape
// ---------------------------------------------------------------------------------------

struct Pins(PathBuf, Option<Datapath>);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Some(dp) = self.1.take() {
            let _ = dp.unpin();
        }
        util::remove_pin_dir(&self.0);
    }
}

/// The agent's programming state: its cache of desired frontends, its tables, and the
/// snapshot it last programmed.
struct Programmer {
    cache: tables::DesiredCache,
    tables: Tables,
    synced: bool,
    /// Held as the agent holds it (`Agent::state`, replaced once the maps are programmed): the
    /// previous snapshot is released after the pass, not inside the cache update. The release
    /// is timed on its own (`release_prev_s`).
    state: Option<Arc<State>>,
}

/// The times of one pass (seconds) and its map operations.
struct Pass {
    desired: f64,
    diff: f64,
    maps: f64,
    ops: usize,
    /// Dropping the previous snapshot (its last reference), after the maps are programmed.
    release: f64,
}

impl Pass {
    fn total(&self) -> f64 {
        self.desired + self.diff + self.maps
    }
}

/// One pass as the agent makes it for a new snapshot (`Agent::apply`): desired (only the
/// services the snapshot changed) → diff → maps, then the snapshot replaces the previous one.
fn program(
    snap: &Arc<State>,
    links: &LocalLinks,
    p: &mut Programmer,
    dp: &mut Datapath,
) -> Result<Pass, String> {
    let t0 = Instant::now();
    let changes = p
        .cache
        .update(snap, crate::states::ME, links, Reach::Cluster, None);
    let t1 = Instant::now();
    let ops = if p.synced {
        let refs: Vec<(tables::FeId, Option<&tables::FrontendSpec>)> = changes
            .iter()
            .map(|(id, spec)| (*id, spec.as_ref()))
            .collect();
        p.tables.apply_changes(&refs)
    } else {
        p.tables.apply(p.cache.all())
    };
    let t2 = Instant::now();
    let ops = ops.map_err(|e| {
        format!(
            "Tables::apply: {e} (after {:.2} s of desired)",
            (t1 - t0).as_secs_f64()
        )
    });
    let mapped = ops.and_then(|ops| {
        dp.maps
            .apply(&ops)
            .map(|_| ops.len())
            .map_err(|e| format!("Maps::apply: {e}"))
    });
    let t3 = Instant::now();
    let old = p.state.replace(snap.clone());
    let t4 = Instant::now();
    drop(old);
    let release = t4.elapsed().as_secs_f64();
    let n = mapped?;
    p.synced = true;
    Ok(Pass {
        desired: (t1 - t0).as_secs_f64(),
        diff: (t2 - t1).as_secs_f64(),
        maps: (t3 - t2).as_secs_f64(),
        ops: n,
        release,
    })
}

fn pass_json(r: &Result<Pass, String>) -> Value {
    match r {
        Ok(p) => json!({
            "desired_s": p.desired, "diff_s": p.diff, "maps_s": p.maps, "total_s": p.total(),
            "ops": p.ops, "release_prev_s": p.release,
        }),
        Err(e) => json!({"error": e}),
    }
}

/// A progress line for the parent (which keeps the last one if the child is killed).
fn progress(phase: &str, t: Instant, extra: Value) {
    let (rss, hwm) = util::rss_mib();
    println!(
        "{}",
        json!({"progress": phase, "t_s": t.elapsed().as_secs_f64(), "rss_mib": rss, "vmhwm_mib": hwm, "extra": extra})
    );
    let _ = std::io::stdout().flush();
}

/// `--child-control <shape> <reps> <pin dir> <budget s>`: prints progress lines and, last,
/// one JSON object with the results on stdout. One-task changes are measured while the
/// budget allows (each costs about one full pass).
pub fn child_main(args: &[String]) -> ExitCode {
    let (Some(name), Some(reps), Some(pins), Some(budget)) =
        (args.first(), args.get(1), args.get(2), args.get(3))
    else {
        eprintln!("usage: --child-control SHAPE REPS PIN_DIR BUDGET_S");
        return ExitCode::FAILURE;
    };
    let reps: usize = reps.parse().unwrap_or(3);
    let budget: f64 = budget.parse().unwrap_or(60.0);
    let Some((_, _, shape, _)) = shapes().into_iter().find(|(n, _, _, _)| n == name) else {
        eprintln!("unknown shape {name}");
        return ExitCode::FAILURE;
    };
    let t_all = Instant::now();
    let mut out = json!({ "shape": name });
    let rss0 = util::rss_mib();
    let t = Instant::now();
    let mut c = Cluster::generate(shape);
    out["generate_s"] = json!(t.elapsed().as_secs_f64());
    out["state"] = json!({
        "nodes": c.state.nodes.len(),
        "services": c.state.services.len(),
        "tasks": c.state.tasks.len(),
        "networks": c.state.networks.len(),
        "local_tasks": c.local_tasks(),
        "published_ports": c.state.services.values().map(|s| s.ports.len()).sum::<usize>(),
        "vips": c.state.services.values().flat_map(|s| &s.networks).filter(|n| n.vip.is_some()).count(),
    });
    let rss_state = util::rss_mib();
    progress("generated", t_all, out["state"].clone());
    let t = Instant::now();
    let pins = PathBuf::from(pins);
    let mut guard = Pins(pins.clone(), None);
    let dp = match Datapath::load(&pins) {
        Ok(dp) => dp,
        Err(e) => {
            out["error"] = json!(format!("Datapath::load: {e}"));
            println!("{out}");
            return ExitCode::SUCCESS;
        }
    };
    guard.1 = Some(dp);
    let dp = guard.1.as_mut().unwrap();
    out["load_s"] = json!(t.elapsed().as_secs_f64());
    dp.maps.set_node_addrs(&[crate::states::ME_ADDR]).unwrap();
    let mut prog = Programmer {
        cache: tables::DesiredCache::default(),
        tables: Tables::new(),
        synced: false,
        state: None,
    };
    progress("programming from scratch", t_all, Value::Null);
    let scratch = program(&c.state, &c.links, &mut prog, dp);
    out["scratch"] = pass_json(&scratch);
    if let Ok(p) = &scratch {
        out["map_ops_per_s"] = json!(p.ops as f64 / p.maps);
        out["frontends"] = json!(prog.tables.frontends().count());
        out["backends"] = json!(prog.tables.backends().count());
    }
    let rss_prog = util::rss_mib();
    progress("programmed", t_all, out["scratch"].clone());
    let mut changes = serde_json::Map::new();
    if let Ok(p) = &scratch {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        let mut mv = Vec::new();
        let mut pass = p.total() + p.release;
        for r in 0..reps {
            if t_all.elapsed().as_secs_f64() + 3.2 * pass > budget {
                changes.insert(
                    "budget".into(),
                    json!(format!(
                        "{r} of {reps} repetitions: one pass takes {:.1} s, budget {budget:.0} s",
                        pass
                    )),
                );
                break;
            }
            let svc = (r * 7919 + 13) % shape.services;
            let node = 1 + (r * 31) % (shape.nodes - 1).max(1);
            // Add a task (on another node) ...
            let id = c.add_task(svc, 10_000 + r as u32, node);
            let p = program(&c.state, &c.links, &mut prog, dp);
            if let Ok(p) = &p {
                pass = p.total() + p.release;
            }
            add.push(pass_json(&p));
            // ... remove it again ...
            c.remove_task(&id);
            remove.push(pass_json(&program(&c.state, &c.links, &mut prog, dp)));
            // ... and move one: rescheduled on another node (new id, new address), this node
            // included every other time.
            if let Some((old, slot, from)) = c.a_task_of((svc + 1) % shape.services) {
                c.remove_task(&old);
                let to = if r % 2 == 0 {
                    0
                } else {
                    (from + 1) % shape.nodes
                };
                c.add_task((svc + 1) % shape.services, slot, to);
                mv.push(pass_json(&program(&c.state, &c.links, &mut prog, dp)));
            }
            progress("changes", t_all, json!(r + 1));
        }
        // Where a one-task change spends its time, on the Swarm3k shapes (cheap: perf on this
        // thread for 1.5 s of passes). The passes alternate between two snapshots that differ
        // by one task, both built before perf starts: the profile holds the agent's pass only
        // (not the bench's copy-on-write of the state, nor freeing a snapshot), and no more
        // snapshots are alive at once than during the changes above.
        if name.starts_with("swarm3k") && t_all.elapsed().as_secs_f64() + 4.0 < budget {
            let extra = c.add_task(0, 20_000, 1 % shape.nodes.max(1));
            let _ = program(&c.state, &c.links, &mut prog, dp);
            let with = c.state.clone();
            c.remove_task(&extra);
            let _ = program(&c.state, &c.links, &mut prog, dp);
            let without = c.state.clone();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() }.to_string();
            let mut k = 0usize;
            let prof = util::perf_top(&["-t", &tid], 1.5, || {
                let snap = if k.is_multiple_of(2) { &with } else { &without };
                k += 1;
                let _ = program(snap, &c.links, &mut prog, dp);
            });
            changes.insert("profile_passes".into(), json!(k));
            if let Some(p) = prof {
                changes.insert(
                    "profile".into(),
                    json!(
                        p.iter()
                            .map(|(pct, s)| json!({"symbol": s, "pct": pct}))
                            .collect::<Vec<_>>()
                    ),
                );
            }
        }
        // What a source pays to give the agent that sharing: a snapshot read afresh (no
        // structure shared, as after parsing a file or polling the Engine API) with one task
        // more, rebased on the previous one (`State::rebase`: an O(tasks) walk in the source).
        if t_all.elapsed().as_secs_f64() + 4.0 < budget {
            let prev = c.state.clone();
            let extra = c.add_task(0, 30_000, 1 % shape.nodes.max(1));
            let fresh = State {
                nodes: c.state.nodes.clone(),
                networks: c.state.networks.clone(),
                services: c
                    .state
                    .services
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                tasks: c
                    .state
                    .tasks
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            let t = Instant::now();
            let rebased = fresh.rebase(&prev);
            changes.insert("source_rebase_s".into(), json!(t.elapsed().as_secs_f64()));
            debug_assert!(rebased == *c.state);
            drop(rebased);
            c.remove_task(&extra);
            let _ = program(&c.state, &c.links, &mut prog, dp);
        }
        changes.insert("add".into(), json!(add));
        changes.insert("remove".into(), json!(remove));
        changes.insert("move".into(), json!(mv));
    }
    out["changes"] = Value::Object(changes);
    let rss_end = util::rss_mib();
    out["rss_mib"] = json!({
        "start": rss0.0,
        "after_state": rss_state.0,
        "after_programming": rss_prog.0,
        "end": rss_end.0,
        "peak_vmhwm": rss_end.1,
    });
    drop(guard);
    println!("{out}");
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------

fn run_child(ctx: &Ctx, name: &str, reps: usize, limit: Duration) -> Value {
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/mesh-bench-{}-ctl-{name}",
        std::process::id()
    ));
    util::track_pins(&pins);
    // /proc/self/exe: still this binary even if a rebuild replaced the file meanwhile.
    let mut child = Command::new("/proc/self/exe")
        .args(["--child-control", name, &reps.to_string()])
        .arg(&pins)
        .arg(format!("{:.0}", limit.as_secs_f64() * 0.9))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn control child");
    let mut so = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let mut killed = false;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline || util::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = reader.join().unwrap_or_default();
    util::remove_pin_dir(&pins);
    util::check_interrupt();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let last_progress = lines
        .iter()
        .rev()
        .find(|v| v.get("progress").is_some())
        .cloned()
        .unwrap_or(Value::Null);
    if killed {
        util::log(
            ctx.start,
            format!("control: {name} killed after {}", fmt_dur(limit)),
        );
        let state = lines
            .iter()
            .find(|v| v["progress"] == "generated")
            .map(|v| v["extra"].clone())
            .unwrap_or(Value::Null);
        return json!({
            "shape": name,
            "killed": true,
            "error": format!(
                "did not finish within {}: still {} (since {:.1} s)",
                fmt_dur(limit),
                last_progress["progress"].as_str().unwrap_or("starting"),
                last_progress["t_s"].as_f64().unwrap_or(0.0)
            ),
            "state": state,
            "rss_mib": {"peak_vmhwm": last_progress["vmhwm_mib"]},
        });
    }
    lines
        .into_iter()
        .rev()
        .find(|v| v.get("progress").is_none())
        .unwrap_or_else(|| json!({"shape": name, "error": format!("no result from the child: {}", text.trim())}))
}

fn change_stat(v: &Value, kind: &str, field: &str) -> util::Stat {
    let samples: Vec<f64> = v["changes"][kind]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x[field].as_f64()).collect())
        .unwrap_or_default();
    stat(&samples)
}

fn ms(s: &util::Stat) -> String {
    let m = util::Stat {
        median: s.median * 1e3,
        min: s.min * 1e3,
        max: s.max * 1e3,
        n: s.n,
        samples: vec![],
    };
    m.show(if s.median * 1e3 < 10.0 { 2 } else { 0 })
}

// ---------------------------------------------------------------------------------------
// kube-proxy-style iptables ruleset
// ---------------------------------------------------------------------------------------

/// A kube-proxy (iptables mode) nat table for `services` services × `endpoints` endpoints:
/// KUBE-SERVICES → KUBE-SVC-* (random probability per endpoint) → KUBE-SEP-* (mark + DNAT).
fn kube_proxy_ruleset(services: usize, endpoints: usize) -> (String, usize) {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut n = 0;
    chains.push_str(":PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MASQUERADE\n");
    n += 6;
    for s in 0..services {
        let vip = format!("10.96.{}.{}", s >> 8, s & 255);
        let svc = format!("KUBE-SVC-{s:012X}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"ns/svc{s}:http cluster IP\" -m tcp --dport 80 -j {svc}\n"
        ));
        n += 1;
        for e in 0..endpoints {
            let sep = format!("KUBE-SEP-{s:08X}{e:04X}");
            let ep = format!("10.{}.{}.{}", 128 + (s >> 8) % 64, s & 255, 2 + e);
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = endpoints - e;
            if left > 1 {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"ns/svc{s}:http -> {ep}:80\" -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"ns/svc{s}:http -> {ep}:80\" -j {sep}\n"
                ));
            }
            rules.push_str(&format!("-A {sep} -s {ep}/32 -j KUBE-MARK-MASQ\n"));
            rules.push_str(&format!(
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep}:80\n"
            ));
            n += 3;
        }
    }
    (format!("*nat\n{chains}{rules}COMMIT\n"), n)
}

fn iptables_restore(ctx: &Ctx, services: usize, endpoints: usize) -> Value {
    let (text, rules) = kube_proxy_ruleset(services, endpoints);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules");
    std::fs::write(&file, &text).expect("write rules");
    let mut res = json!({"services": services, "endpoints_per_service": endpoints, "rules": rules});
    for (tool, key) in [
        ("iptables-nft-restore", "nft"),
        ("iptables-legacy-restore", "legacy"),
    ] {
        let ns = Netns::new("bip");
        util::track_netns(&ns.name);
        let t = Instant::now();
        let limit = Duration::from_secs(if ctx.quick { 60 } else { 180 });
        let out = util::run_bounded(Some(&ns.name), tool, &[file.to_str().unwrap()], limit);
        let took = t.elapsed();
        res[key] = if out.status.success() {
            json!({"tool": tool, "seconds": took.as_secs_f64()})
        } else {
            json!({"tool": tool, "error": format!("{} after {}: {}", out.status, fmt_dur(took), util::text(&out).chars().take(300).collect::<String>())})
        };
        util::log(
            ctx.start,
            format!("control: {tool} of {rules} rules: {}", fmt_dur(took)),
        );
        // Deleting the namespace removes its tables (never the host's).
        drop(ns);
    }
    res
}

// ---------------------------------------------------------------------------------------
// State-file change → first new flow on the new task
// ---------------------------------------------------------------------------------------

/// One HTTP/1.0 request on a new connection from inside the client namespace's thread.
fn get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let t = String::from_utf8_lossy(&buf);
    t.split("\r\n\r\n").nth(1).map(|b| b.trim().to_string())
}

/// From the calling thread's namespace: one new connection to `addr` per try, `pause` apart,
/// until the answer is `want` (any answer when `None`) or `limit` has passed since `t0`.
/// Returns when the answer came (measured from `t0`) and the tries made.
fn poll_answer(
    addr: &str,
    want: Option<&str>,
    t0: Instant,
    limit: Duration,
    pause: Duration,
) -> (Option<Duration>, usize) {
    let mut n = 0;
    while t0.elapsed() < limit {
        n += 1;
        match get(addr) {
            Some(body) if want.is_none_or(|w| body == w) => return (Some(t0.elapsed()), n),
            _ => std::thread::sleep(pause),
        }
    }
    (None, n)
}

fn state_to_flow(ctx: &Ctx) -> Value {
    let mut bed = Bed::new(ctx, 3);
    let agent = bed.start_agent(ctx, "xdp", &[]);
    let samples = ctx.ctl_flow_samples;
    let mut ms_samples = Vec::new();
    let mut attempts = Vec::new();
    for k in 0..samples {
        util::check_interrupt();
        let i = bed.add_task(ctx);
        let want = e2e::task_name(i);
        let client = bed.client.path();
        let t0 = Instant::now();
        bed.write_state();
        // Poll from the client namespace: one new connection per try, until the new task
        // answers (bounded).
        let (came, n) = util::within(&client, move || {
            poll_answer(
                "198.18.0.1:8080",
                Some(&want),
                t0,
                Duration::from_secs(10),
                Duration::from_micros(500),
            )
        });
        let took = came.unwrap_or_else(|| t0.elapsed());
        if came.is_some() {
            ms_samples.push(took.as_secs_f64() * 1e3);
        }
        attempts.push(n);
        util::log(
            ctx.start,
            format!(
                "control: state change {k}: task {i} answered after {} ({n} tries)",
                fmt_dur(took)
            ),
        );
    }
    drop(agent);
    json!({
        "ms": stat(&ms_samples),
        "tries": attempts,
        "debounce_ms": mesh_agent::source::file::DEBOUNCE.as_millis() as u64,
    })
}

/// The same across nodes: a 3-node cluster bed (one agent per node, VXLAN overlay, tasks
/// spread over the nodes), a task added on one node, and from the external client each
/// node's published port polled in parallel until the new task answers through it (local
/// on one node, over the overlay with SNAT from the two others). The task goes `starting`
/// (attached on its node) → `running` (backend everywhere), as Swarm tasks do.
fn state_to_flow_cluster(ctx: &Ctx) -> Value {
    use mesh_tests::cluster::{Cluster, NetDef, SvcDef};
    let nets = vec![NetDef {
        name: "webnet".into(),
        octet: 241,
        vni: 4241,
    }];
    let svcs = vec![SvcDef {
        name: "web".into(),
        dnsrr: false,
        networks: vec!["webnet".into()],
        ports: vec![(8080, 80, "tcp")],
        aliases: vec![],
    }];
    let mut c = Cluster::new(3, nets, svcs);
    for (slot, node) in [(1, 0), (2, 1), (3, 2)] {
        c.add_task("web", slot, node);
    }
    c.start_agents();
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.addr.to_string()).collect();
    let client = c.client.path();
    // Every node answers before measuring (bounded).
    for n in &nodes {
        let addr = format!("{n}:8080");
        let (came, _) = util::within(&client, move || {
            poll_answer(
                &addr,
                None,
                Instant::now(),
                Duration::from_secs(30),
                Duration::from_millis(100),
            )
        });
        assert!(came.is_some(), "node {n}:8080 never answered");
    }
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); nodes.len()];
    for k in 0..ctx.ctl_flow_samples.min(5) {
        util::check_interrupt();
        let on = k % nodes.len();
        let id = c.add_task("web", 10 + k as u32, on);
        let want = c.tasks[&id].name();
        // As in Swarm, the task is `starting` first: its node wires its network (the agent
        // attaches starting tasks; they are not backends yet), and only then does it turn
        // `running` everywhere. Written as running at once, the other nodes' first SYN can
        // reach the task's node before that node's agent has attached it (a race between two
        // agents on one file, not a property of the data path): the SYN is lost and the
        // client's retry (1 s in TCP) decides. Measured from the `running` write.
        c.set_state(&id, "starting");
        c.write_state();
        let (ns, addr) = (
            c.tasks[&id].ns.name.clone(),
            c.tasks[&id].addrs[0].1.to_string(),
        );
        let attached = Instant::now();
        while attached.elapsed() < Duration::from_secs(10) {
            let out = std::process::Command::new("ip")
                .args(["-n", &ns, "-4", "-o", "addr", "show"])
                .output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr}/")))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        c.set_state(&id, "running");
        let t0 = Instant::now();
        c.write_state();
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (addr, want, client) = (format!("{n}:8080"), want.clone(), client.clone());
                std::thread::spawn(move || {
                    util::within(&client, move || {
                        poll_answer(
                            &addr,
                            Some(&want),
                            t0,
                            Duration::from_secs(10),
                            Duration::from_micros(500),
                        )
                        .0
                    })
                })
            })
            .collect();
        let mut this_round = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let ms = h.join().ok().flatten().map(|d| d.as_secs_f64() * 1e3);
            if let Some(ms) = ms {
                per_node[i].push(ms);
            }
            this_round.push(ms.map(|m| format!("{m:.0} ms")).unwrap_or("-".into()));
        }
        util::log(
            ctx.start,
            format!(
                "control: cluster state change {k} (task on node {}): {}",
                on + 1,
                this_round.join(", ")
            ),
        );
    }
    drop(c);
    json!({ "nodes": per_node.iter().map(|v| stat(v)).collect::<Vec<_>>() })
}

// ---------------------------------------------------------------------------------------

pub fn run(ctx: &mut Ctx) -> Section {
    let reps = ctx.ctl_reps;
    let mut results = Vec::new();
    for (name, title, shape, caps) in shapes() {
        util::check_interrupt();
        // The dnsrr variant only when the requested Swarm3k state ran into the maps' capacity.
        if name == "swarm3k-fit"
            && !results.iter().any(|v: &Value| {
                v["shape"] == "swarm3k"
                    && v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("too many backends"))
            })
        {
            continue;
        }
        // Within the run's time budget (leaving room for what follows: iptables-restore,
        // the state-change measurement and DNS).
        let reserve = Duration::from_secs(if ctx.quick { 25 } else { 120 });
        let left = ctx
            .deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(reserve);
        let limit = Duration::from_secs(if ctx.quick { caps.0 } else { caps.1 }).min(left);
        if limit < Duration::from_secs(3) {
            results.push(json!({
                "shape": name,
                "title": title,
                "tasks_requested": shape.tasks,
                "killed": true,
                "time_limit_s": limit.as_secs(),
                "error": "skipped: the run's time budget is spent",
            }));
            continue;
        }
        let t = Instant::now();
        let mut v = run_child(ctx, name, reps, limit);
        v["title"] = json!(title);
        v["tasks_requested"] = json!(shape.tasks);
        v["time_limit_s"] = json!(limit.as_secs());
        util::log(
            ctx.start,
            format!(
                "control: {name}: scratch {} s, peak RSS {} MiB ({}){}",
                v["scratch"]["total_s"]
                    .as_f64()
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or("?".into()),
                v["rss_mib"]["peak_vmhwm"]
                    .as_f64()
                    .map(|x| format!("{x:.0}"))
                    .unwrap_or("?".into()),
                fmt_dur(t.elapsed()),
                v["error"]
                    .as_str()
                    .or(v["scratch"]["error"].as_str())
                    .map(|e| format!(" ERROR {e}"))
                    .unwrap_or_default()
            ),
        );
        results.push(v);
    }
    // --quick restores a tenth of the ruleset (1k services); the full run the 10k-service one.
    let ipt = iptables_restore(ctx, if ctx.quick { 1_000 } else { 10_000 }, 10);
    let flow = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state_to_flow(ctx))) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panic".into());
            json!({"error": msg})
        }
    };
    let mut flow = flow;
    flow["cluster"] = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        state_to_flow_cluster(ctx)
    })) {
        Ok(v) => v,
        Err(e) => {
            json!({"error": e.downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into())})
        }
    };
    util::check_interrupt();
    report(ctx, results, ipt, flow)
}

fn report(ctx: &mut Ctx, results: Vec<Value>, ipt: Value, flow: Value) -> Section {
    let sec = "3. Control plane";
    let mut md = String::new();
    md.push_str(
        "Generated states (built in Rust, no YAML) go through the agent's real path for a new snapshot: \
         `DesiredCache::update` (desired frontends of the services the snapshot changed; Reach::Cluster, so \
         remote tasks are backends) → `Tables::apply` on the first sync, `Tables::apply_changes` after (diff \
         to ordered map operations) → `Maps::apply` on the real maps of a loaded `Datapath`; \"desired\" below \
         is the cache update, \"diff\" the tables. Timing starts with the snapshot in hand (reading and \
         validating the state file is not included, nor the agent's other per-snapshot work: attaching local \
         tasks, DNS). As in the agent, the previous snapshot is released once the maps are programmed (the \
         agent holds it until then); that release is timed on its own and shown beside the one-task changes. \
         Each shape runs in a fresh process, so its RSS is its \
         own (state + desired cache + tables + map handles; the agent would also hold the parsed YAML). Every \
         service has a VIP unless in dnsrr mode, and every 10th publishes one \
         port; tasks are spread round-robin over the nodes, so this node hosts tasks/nodes of them.\n\n",
    );
    let mut rows = Vec::new();
    for v in &results {
        let err = v["error"].as_str().or(v["scratch"]["error"].as_str());
        let s = &v["scratch"];
        let f = |x: &Value| {
            x.as_f64()
                .map(|x| fmt_num(x * 1e3, 0))
                .unwrap_or("–".into())
        };
        let hwm = v["rss_mib"]["peak_vmhwm"]
            .as_f64()
            .map(|x| fmt_num(x, 0))
            .unwrap_or("–".into());
        rows.push(vec![
            v["title"].as_str().unwrap_or("?").to_string(),
            fmt_num(
                v["state"]["tasks"]
                    .as_f64()
                    .unwrap_or(v["tasks_requested"].as_f64().unwrap_or(f64::NAN)),
                0,
            ),
            v["state"]["local_tasks"]
                .as_u64()
                .map(|x| x.to_string())
                .unwrap_or("–".into()),
            match (v["frontends"].as_f64(), v["backends"].as_f64()) {
                (Some(f), Some(b)) => format!("{} / {}", fmt_num(f, 0), fmt_num(b, 0)),
                _ => "–".into(),
            },
            match err {
                Some(e) => format!("**failed**: {e}"),
                None => format!(
                    "{} ({} + {} + {})",
                    f(&s["total_s"]),
                    f(&s["desired_s"]),
                    f(&s["diff_s"]),
                    f(&s["maps_s"])
                ),
            },
            v["scratch"]["ops"]
                .as_f64()
                .map(|x| fmt_num(x, 0))
                .unwrap_or("–".into()),
            v["map_ops_per_s"]
                .as_f64()
                .map(|x| fmt_num(x, 0))
                .unwrap_or("–".into()),
            if v["killed"] == true {
                format!("– / ≥ {hwm} (at kill)")
            } else {
                format!(
                    "{} / {hwm}",
                    v["rss_mib"]["after_programming"]
                        .as_f64()
                        .map(|x| fmt_num(x, 0))
                        .unwrap_or("–".into())
                )
            },
        ]);
    }
    md.push_str(&format!(
        "**Programming from scratch** (each shape in its own process with a time limit: {}; the BACKENDS map \
         holds {} entries, one per frontend and task)\n\n",
        if ctx.quick { "a few seconds in --quick, where the big shapes only show that they exceed it" } else { "up to 150 s" },
        fmt_num((mesh_common::maps::MAX_BACKENDS - 1) as f64, 0)
    ));
    md.push_str(&md_table(
        &[
            "state",
            "tasks",
            "on this node",
            "frontends / backend entries",
            "ms: total (desired + diff + maps)",
            "map ops",
            "map ops/s",
            "RSS MiB after / peak (VmHWM)",
        ],
        &rows,
    ));
    // One-task changes.
    let mut rows = Vec::new();
    for v in &results {
        let measured = v["changes"]["add"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        let mut row = vec![
            v["title"].as_str().unwrap_or("?").to_string(),
            fmt_num(
                v["state"]["tasks"]
                    .as_f64()
                    .unwrap_or(v["tasks_requested"].as_f64().unwrap_or(f64::NAN)),
                0,
            ),
        ];
        if !measured {
            let why = v["changes"]["budget"]
                .as_str()
                .map(str::to_string)
                .or_else(|| {
                    v["error"]
                        .as_str()
                        .or(v["scratch"]["error"].as_str())
                        .map(|_| "not programmed".to_string())
                })
                .unwrap_or_else(|| "–".into());
            row.extend([
                format!("not measured: {why}"),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ]);
            rows.push(row);
            continue;
        }
        for kind in ["add", "remove", "move"] {
            let tot = change_stat(v, kind, "total_s");
            let des = change_stat(v, kind, "desired_s");
            row.push(format!("{} (desired {})", ms(&tot), ms(&des)));
        }
        let ops = change_stat(v, "move", "ops");
        row.push(fmt_num(ops.median, 0));
        let release: Vec<f64> = ["add", "remove", "move"]
            .iter()
            .flat_map(|k| change_stat(v, k, "release_prev_s").samples)
            .collect();
        row.push(if release.is_empty() {
            "–".into()
        } else {
            ms(&stat(&release))
        });
        rows.push(row);
    }
    md.push_str(&format!(
        "\n**One-task changes** (full path desired + diff + maps; ms, median (min–max) of up to {} each, as the \
         time limit allows; a task added on another node, removed again, and a task moved to another node, every \
         other time onto this one)\n\n",
        ctx.ctl_reps
    ));
    md.push_str(&md_table(
        &[
            "state",
            "tasks",
            "add",
            "remove",
            "move",
            "map ops per move",
            "then: previous snapshot released",
        ],
        &rows,
    ));
    // What still follows the size of the cluster, with the profile where there is one.
    let largest = results
        .iter()
        .rev()
        .find(|v| change_stat(v, "add", "total_s").n > 0);
    let profile_of = |v: &Value| {
        v["changes"]["profile"].as_array().map(|p| {
            let top: Vec<(f64, String)> = p
                .iter()
                .filter_map(|x| Some((x["pct"].as_f64()?, x["symbol"].as_str()?.to_string())))
                .collect();
            util::show_profile(&top)
        })
    };
    md.push_str(
        "\nA one-task change recomputes only the services it touched (their running tasks come from an index \
         the cache keeps per service), and the diff and the map writes follow the change. Finding the change \
         follows it too: a snapshot's services and tasks are persistent ordered maps (`imbl::OrdMap`) and each \
         new snapshot is built on top of the previous one, so `DesiredCache::update` compares them with \
         `OrdMap::diff`, which skips the subtrees they share, and freeing the previous snapshot frees only what \
         changed. The O(tasks) walk that finds what differs moved to where the O(tasks) read already is: the \
         sources deliver whole snapshots (the state file is re-read, the Docker Engine API is polled; Docker \
         emits no task events) and rebase each on the previous one (`State::rebase`) before the agent sees it.",
    );
    if let Some(v) = largest
        && let Some(r) = v["changes"]["source_rebase_s"].as_f64()
    {
        md.push_str(&format!(
                " On {}, that source-side rebase of a freshly read snapshot (one task more) takes {} ms.",
                v["title"].as_str().unwrap_or("?"),
                fmt_num(r * 1e3, 1)
            ));
    }
    if let Some(v) = largest {
        md.push_str(&format!(
            " On {}: desired {} ms per added task.{}",
            v["title"].as_str().unwrap_or("?"),
            fmt_num(change_stat(v, "add", "desired_s").median * 1e3, 1),
            profile_of(v)
                .map(|p| format!(
                    " Profile (perf over {} passes alternating two snapshots one task apart; \
                     `diff_snapshots` is the comparison): {p}.",
                    v["changes"]["profile_passes"]
                ))
                .unwrap_or_default()
        ));
    }
    md.push('\n');

    // Checks.
    let get = |k: &str| results.iter().find(|v| v["shape"] == k);
    let scratch_result = |v: &Value| -> (String, Option<f64>) {
        let t = v["scratch"]["total_s"].as_f64();
        let err = v["error"].as_str().or(v["scratch"]["error"].as_str());
        match (t, err) {
            (Some(t), _) => (format!("{} ms", fmt_num(t * 1e3, 0)), Some(t)),
            (None, Some(_)) if v["killed"] == true => (
                format!("> {} s (not finished, stopped)", v["time_limit_s"]),
                None,
            ),
            (None, Some(e)) => (format!("failed: {e}"), None),
            _ => ("–".into(), None),
        }
    };
    if let Some(v) = get("10kx10") {
        let (res, t) = scratch_result(v);
        let met = Some(t.is_some_and(|t| t < 1.0));
        ctx.out.check(
            sec,
            "10k services × 10 tasks programmed from scratch",
            res.clone(),
            "< 1 s",
            met,
        );
        if met == Some(false) {
            ctx.out.finding(format!(
                "Programming 10k services × 10 tasks from scratch: {res}. {}",
                explain(v, &results)
            ));
        }
    }
    let s3k = get("swarm3k-fit").or(get("swarm3k"));
    if let Some(v) = get("swarm3k")
        && let Some(e) = v["error"].as_str().filter(|e| e.contains("too many"))
    {
        ctx.out.finding(format!(
                "The Swarm3k state as specified (every service with a VIP) does not fit the maps ({} entries): {e}.",
                fmt_num((mesh_common::maps::MAX_BACKENDS - 1) as f64, 0)
            ));
    }
    if let Some(v) = s3k {
        let what = if v["shape"] == "swarm3k" {
            "3,000-node Swarm3k state"
        } else {
            "3,000-node Swarm3k state (⅓ dnsrr so it fits)"
        };
        let (res, t) = scratch_result(v);
        let met = Some(t.is_some_and(|t| t < 2.0));
        ctx.out.check(
            sec,
            &format!("{what} programmed"),
            res.clone(),
            "< 2 s",
            met,
        );
        if met == Some(false) {
            ctx.out.finding(format!(
                "Programming the {what}: {res}. {}",
                explain(v, &results)
            ));
        }
        let rss = v["rss_mib"]["peak_vmhwm"].as_f64();
        let killed = v["killed"] == true;
        ctx.out.check(
            sec,
            &format!("{what}: RSS (peak)"),
            rss.map(|r| {
                format!(
                    "{}{} MiB{}",
                    if killed { "≥ " } else { "" },
                    fmt_num(r, 0),
                    if killed { " (at kill)" } else { "" }
                )
            })
            .unwrap_or("–".into()),
            "< 300 MiB",
            rss.and_then(|r| {
                if r >= 300.0 {
                    Some(false)
                } else if killed {
                    None
                } else {
                    Some(true)
                }
            }),
        );
        if rss.is_some_and(|r| r >= 300.0) {
            ctx.out.finding(format!(
                "The {what} needs {} MiB (VmHWM) ≥ 300 MiB.",
                fmt_num(rss.unwrap(), 0)
            ));
        }
    }
    // One-task change: worst median over shapes and kinds.
    let mut worst: Option<(f64, String)> = None;
    let mut series = Vec::new();
    let mut medians = Vec::new();
    for v in &results {
        let mut m: f64 = 0.0;
        for kind in ["add", "remove", "move"] {
            let s = change_stat(v, kind, "total_s");
            if s.n > 0 {
                m = m.max(s.median);
            }
        }
        if m > 0.0 {
            medians.push(m);
            series.push(format!(
                "{} tasks: {} ms",
                fmt_num(v["state"]["tasks"].as_f64().unwrap_or(0.0), 0),
                fmt_num(m * 1e3, 1)
            ));
            if worst.as_ref().is_none_or(|(w, _)| m > *w) {
                worst = Some((m, v["title"].as_str().unwrap_or("?").to_string()));
            }
        }
    }
    if let Some((w, at)) = &worst {
        let met = *w < 0.010;
        ctx.out.check(
            sec,
            "one-task change (worst median over shapes)",
            format!("{} ms ({at})", fmt_num(w * 1e3, 1)),
            "< 10 ms",
            Some(met),
        );
        let first = series.first().cloned().unwrap_or_default();
        let last = series.last().cloned().unwrap_or_default();
        let flat = match (medians.first(), medians.last()) {
            (Some(a), Some(b)) if medians.len() > 1 => Some(*b <= 2.0 * a + 0.001),
            _ => None,
        };
        ctx.out.check(
            sec,
            "one-task change flat from 1k to 150k tasks",
            format!("{first} → {last}"),
            "flat (largest ≤ 2 × smallest + 1 ms)",
            flat,
        );
        if !met {
            // Where a change's time goes on the largest shape that measured changes.
            let split = results
                .iter()
                .rev()
                .find(|v| change_stat(v, "add", "total_s").n > 0)
                .map(|v| {
                    let m = |f: &str| fmt_num(change_stat(v, "add", f).median * 1e3, 1);
                    format!(
                        " On {}: desired {} ms, diff {} ms, maps {} ms per added task ({} map ops).",
                        v["title"].as_str().unwrap_or("?"),
                        m("desired_s"),
                        m("diff_s"),
                        m("maps_s"),
                        fmt_num(change_stat(v, "add", "ops").median, 0)
                    )
                })
                .unwrap_or_default();
            let prof = results
                .iter()
                .rev()
                .find_map(|v| {
                    profile_of(v).map(|p| (p, v["title"].as_str().unwrap_or("?").to_string()))
                })
                .map(|(p, t)| format!(" Profile of one-task passes on {t}: {p}."))
                .unwrap_or_default();
            ctx.out.finding(format!(
                "A one-task change misses < 10 ms and grows with the cluster: {}.{split} The map operations stay \
                 a handful and only the touched services are recomputed; finding the change should follow it too \
                 (`OrdMap::diff` skips what consecutive snapshots share), so a growth here means the snapshots \
                 stopped sharing their structure (see `State::rebase`).{prof}",
                series.join(", ")
            ));
        }
    }

    // iptables-restore.
    md.push_str("\n**kube-proxy-style iptables ruleset, restored once in a scratch netns**\n\n");
    let f = |x: &Value| match (x["seconds"].as_f64(), x["error"].as_str()) {
        (Some(s), _) => format!("{} ms", fmt_num(s * 1e3, 0)),
        (_, Some(e)) => format!("failed: {e}"),
        _ => "–".into(),
    };
    md.push_str(&md_table(
        &["ruleset", "rules", "iptables-nft-restore", "iptables-legacy-restore"],
        &[vec![
            format!(
                "{} services × {} endpoints (KUBE-SERVICES → KUBE-SVC → KUBE-SEP, random probability, DNAT)",
                fmt_num(ipt["services"].as_f64().unwrap_or(0.0), 0),
                ipt["endpoints_per_service"]
            ),
            fmt_num(ipt["rules"].as_f64().unwrap_or(0.0), 0),
            f(&ipt["nft"]),
            f(&ipt["legacy"]),
        ]],
    ));
    md.push_str(
        "\nkube-proxy (iptables mode) rewrites the whole table on every sync, so this is also roughly the \
         cost of one endpoint change at that size; mesh's one-task change is the table above.\n",
    );
    if let Some(v) = get("10kx10")
        && let (Some(t), Some(i)) = (
            v["scratch"]["total_s"].as_f64(),
            ipt["nft"]["seconds"].as_f64(),
        )
    {
        ctx.out.check(
            sec,
            "10k services × 10: mesh from scratch vs iptables-nft-restore",
            format!("{} ms vs {} ms", fmt_num(t * 1e3, 0), fmt_num(i * 1e3, 0)),
            "(context)",
            None,
        );
    }

    // State change to flow.
    md.push_str("\n**State-file change → first new flow on the new task** (real node: agent with --hook xdp, nginx tasks)\n\n");
    match flow["ms"]["n"].as_u64() {
        Some(n) if n > 0 => {
            let s = util::stat_from_json(&flow["ms"]);
            md.push_str(&format!(
                "Write the state adding task N (its namespace and nginx already running), then poll the published \
                 port from the client (one new connection per try, 0.5 ms apart) until task N answers: **{} ms** \
                 median (min–max) over {n} additions. This includes the file watcher's {} ms debounce, the \
                 reload, attaching the task (veth, addresses, TC program) and the map update.\n",
                s.show(0),
                flow["debounce_ms"]
            ));
            ctx.out.check(
                sec,
                "state-file change → first new flow on the new task",
                format!("{} ms", fmt_num(s.median, 0)),
                "(no target)",
                None,
            );
        }
        _ => {
            md.push_str(&format!(
                "Did not complete: {}\n",
                flow["error"]
                    .as_str()
                    .unwrap_or("the new task never answered")
            ));
            ctx.out.finding(format!(
                "State-change-to-flow measurement failed: {}",
                flow["error"]
                    .as_str()
                    .unwrap_or("the new task never answered")
            ));
        }
    }
    md.push_str("\n**State-file change → first new flow on the new task, on every node** (3-node cluster bed, one agent per node, --reach cluster, VXLAN overlay; the new task lands on nodes 1, 2, 3 in turn)\n\n");
    match flow["cluster"]["nodes"].as_array() {
        Some(nodes) if nodes.iter().any(|n| n["n"].as_u64().unwrap_or(0) > 0) => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    vec![
                        format!("node {} published port", i + 1),
                        util::stat_from_json(n).show(0),
                    ]
                })
                .collect();
            md.push_str(&md_table(
                &[
                    "through",
                    "ms from the state write to the new task answering",
                ],
                &rows,
            ));
            md.push_str("\nEach node polls with one new connection per try, 0.5 ms apart; the new task is reached after the agent of that node has reloaded the file and programmed its maps. As in Swarm's task lifecycle, the task is first written `starting` (its node's agent attaches its network; it is not a backend yet) and the clock starts when it is written `running`. Written `running` at once, the other nodes' first SYN sometimes reached the task's node before that node's agent had attached it, and the client's retry decided (≈ 665 ms with this poll's 500 ms connect timeout, 1 s+ with TCP's own): a race between agents reading one file, measured and explained here rather than hidden. Round-robin over the growing task list adds up to one cycle of tries.\n");
            let worst = nodes
                .iter()
                .map(|n| n["median"].as_f64().unwrap_or(f64::NAN))
                .fold(0.0, f64::max);
            ctx.out.check(
                sec,
                "state-file change → first new flow, worst node of 3",
                format!("{} ms", fmt_num(worst, 0)),
                "(no target)",
                None,
            );
        }
        _ => {
            let e = flow["cluster"]["error"]
                .as_str()
                .unwrap_or("no node reached the new task")
                .to_string();
            md.push_str(&format!("Did not complete: {e}\n"));
            ctx.out.finding(format!(
                "Cluster state-change-to-flow measurement failed: {e}"
            ));
        }
    }
    let json = json!({ "shapes": results, "iptables_restore": ipt, "state_change_to_flow": flow });
    Section {
        key: "control",
        json,
        markdown: md,
    }
}

/// Where the time of a from-scratch pass went.
fn explain(v: &Value, _all: &[Value]) -> String {
    let s = &v["scratch"];
    let (Some(d), Some(a), Some(m)) = (
        s["desired_s"].as_f64(),
        s["diff_s"].as_f64(),
        s["maps_s"].as_f64(),
    ) else {
        return String::new();
    };
    let mut parts = vec![
        (d, format!("desired {} ms", fmt_num(d * 1e3, 0))),
        (a, format!("the diff {} ms", fmt_num(a * 1e3, 0))),
        (
            m,
            format!(
                "{} map writes {} ms",
                fmt_num(s["ops"].as_f64().unwrap_or(0.0), 0),
                fmt_num(m * 1e3, 0)
            ),
        ),
    ];
    parts.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap());
    format!(
        "Split: {}.",
        parts
            .into_iter()
            .map(|p| p.1)
            .collect::<Vec<_>>()
            .join(", ")
    )
}
