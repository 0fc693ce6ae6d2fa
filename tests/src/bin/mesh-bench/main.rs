//! mesh-bench: mesh's benchmarks side by side with the baselines they replace.
//!
//! `cargo xtask bench [--quick]` builds the agent in release mode and runs this with
//! `MESH_AGENT_BIN` set. Scenarios (each bounded in count and time, traffic only on loopback
//! or in the benchmark's own namespaces, 198.18.0.0/15):
//!
//! 1. `xdp`     per-packet cost of the eBPF programs (BPF_PROG_TEST_RUN), small and big tables
//! 2. `e2e`     end to end through a node: direct, iptables, nft, haproxy, mesh (XDP, TC)
//! 3. `control` control plane at scale (in memory + real maps), iptables-restore, and the
//!    time from a state-file change to the first new flow reaching a new task
//! 4. `dns`     the embedded DNS server against dnsmasq and Docker's own embedded DNS
//! 5. `e2e-remote` end to end across nodes (report section 2b): node A's published port to
//!    tasks on nodes B and C over VXLAN: direct, iptables, mesh (XDP, TC). Runs last, so the
//!    time it takes never shortens the budgets of the others.
//!
//! Results: `bench/RESULTS.md` (tables, targets beside results, findings) and
//! `bench/results.json`. Nothing here asserts on a timing: a missed target is a finding.
//!
//! Usage: `mesh-bench [--quick] [--only xdp,e2e,control,dns,e2e-remote] [--out DIR]`.

mod control;
mod dns;
mod dns_load;
mod docker_dns;
mod e2e;
mod e2e_remote;
mod report;
mod states;
#[cfg(test)]
mod tests;
mod util;
mod vip;
mod xdp;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

use serde_json::json;
use util::{Outcome, Section};

/// Run-wide settings and the collected outcome.
pub struct Ctx {
    pub quick: bool,
    pub start: Instant,
    pub out: Outcome,
    /// BPF_PROG_TEST_RUN repeat count, rounds per path, distinct SYNs for the repeat-1 runs.
    pub xdp_repeat: u32,
    pub xdp_rounds: usize,
    pub xdp_distinct: usize,
    /// Seconds per load (--quick: half a second, see [`util::load_args`]) and rounds of
    /// the end-to-end modes.
    pub e2e_secs: f64,
    pub e2e_rounds: usize,
    /// Attempts per load run when other work on the machine disturbs it, and until when
    /// repeating (and waiting for a quiet machine) is allowed: the run stays bounded.
    pub e2e_attempts: usize,
    pub retry_until: Option<Instant>,
    /// The whole run should end by then (--quick: 3 minutes; full: 20); later scenarios
    /// shorten their time limits to fit.
    pub deadline: Instant,
    /// Repetitions of each one-task change; state-change-to-flow samples.
    pub ctl_reps: usize,
    pub ctl_flow_samples: usize,
    /// Seconds per dnsperf run, rounds.
    pub dns_secs: u32,
    pub dns_rounds: usize,
}

const SCENARIOS: [&str; 5] = ["xdp", "e2e", "control", "dns", "e2e-remote"];

fn usage() -> ! {
    eprintln!(
        "usage: mesh-bench [--quick] [--only {}] [--out DIR]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Internal: one control-plane scale scenario in a fresh process (its own RSS).
    if args.first().map(String::as_str) == Some("--child-control") {
        return control::child_main(&args[1..]);
    }
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("bench");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let v = it.next().unwrap_or_else(|| usage());
                let list: Vec<String> = v.split(',').map(str::to_string).collect();
                if list.iter().any(|s| !SCENARIOS.contains(&s.as_str())) {
                    usage();
                }
                only = Some(list);
            }
            "--out" => out_dir = PathBuf::from(it.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("mesh-bench needs root (namespaces, eBPF); run it through `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    util::install_signal_handlers();
    let mut ctx = Ctx {
        quick,
        start: Instant::now(),
        out: Outcome::default(),
        xdp_repeat: if quick { 200_000 } else { 1_000_000 },
        xdp_rounds: if quick { 3 } else { 11 },
        xdp_distinct: if quick { 20_000 } else { 100_000 },
        e2e_secs: if quick { 0.5 } else { 3.0 },
        e2e_rounds: if quick { 3 } else { 4 },
        e2e_attempts: if quick { 2 } else { 3 },
        retry_until: None,
        deadline: Instant::now() + std::time::Duration::from_secs(if quick { 170 } else { 1140 }),
        ctl_reps: if quick { 3 } else { 7 },
        ctl_flow_samples: if quick { 3 } else { 7 },
        dns_secs: if quick { 1 } else { 5 },
        dns_rounds: 3,
    };
    let started_at = util::now_utc();
    let machine = util::machine();
    util::log(
        ctx.start,
        format!(
            "mesh-bench {} on {}",
            if quick { "--quick" } else { "(full)" },
            machine["kernel"]
        ),
    );

    let mut sections: Vec<Section> = Vec::new();
    let mut timings = serde_json::Map::new();
    let mut failed = Vec::new();
    for name in SCENARIOS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|s| s == name)) {
            continue;
        }
        if util::interrupted() {
            break;
        }
        let t = Instant::now();
        util::log(ctx.start, format!("== {name}"));
        let r = catch_unwind(AssertUnwindSafe(|| match name {
            "xdp" => xdp::run(&mut ctx),
            "control" => control::run(&mut ctx),
            "e2e" => e2e::run(&mut ctx),
            "dns" => dns::run(&mut ctx),
            "e2e-remote" => e2e_remote::run(&mut ctx),
            _ => unreachable!(),
        }));
        let took = t.elapsed();
        timings.insert(name.into(), json!(took.as_secs_f64()));
        match r {
            Ok(s) => sections.push(s),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                util::log(ctx.start, format!("!! {name} failed: {msg}"));
                ctx.out
                    .finding(format!("Scenario `{name}` did not complete: {msg}"));
                failed.push(name);
                sections.push(Section {
                    key: name,
                    json: json!({ "error": msg }),
                    markdown: format!("**Did not complete**: `{}`\n", msg.replace('`', "'")),
                });
            }
        }
        util::log(
            ctx.start,
            format!("== {name} done in {}", util::fmt_dur(took)),
        );
    }
    let swept = util::sweep_leftovers();
    if !swept.is_empty() {
        util::log(ctx.start, format!("swept leftovers: {}", swept.join(", ")));
    }
    let total = ctx.start.elapsed();
    let meta = json!({
        "started_at": started_at,
        "quick": quick,
        "only": only,
        "duration_s": total.as_secs_f64(),
        "scenario_duration_s": timings,
        "machine": machine,
        "command": if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" },
        "agent_bin": mesh_tests::agent_bin(),
    });
    if let Err(e) = report::write(&out_dir, &meta, &sections, &ctx.out) {
        eprintln!("mesh-bench: cannot write results: {e}");
        return ExitCode::FAILURE;
    }
    util::log(
        ctx.start,
        format!(
            "wrote {} and results.json in {}",
            out_dir.join("RESULTS.md").display(),
            util::fmt_dur(total)
        ),
    );
    if util::interrupted() || !failed.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
