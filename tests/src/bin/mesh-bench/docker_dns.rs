//! Docker's own embedded DNS, the third server of scenario 4: a private dockerd (the
//! integration tests' harness, `mesh-agent/tests/common/dockerd.rs`: its own network
//! namespace, data and exec roots under one temporary directory, everything undone on drop)
//! with a single-node swarm, an attachable overlay network `appnet` and a one-task service.
//! Inside that task's network namespace (Docker's `SandboxKey`) Docker's resolver answers at
//! 127.0.0.11:53 exactly as in production: an iptables DNAT rule Docker wrote there sends
//! port 53 to a socket that dockerd itself serves, answering the service's VIP on `appnet`.

#[path = "../../../../mesh-agent/tests/common/dockerd.rs"]
mod dockerd;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dockerd::Dockerd;
use serde_json::Value;

use crate::util;

const IMAGE: &str = "mesh-busybox:bench";
const NETWORK: &str = "appnet";

/// A running private dockerd with one Swarm task whose resolver is measured; the daemon,
/// the swarm and everything they created are removed on drop (also on panic).
pub struct DockerDns {
    d: Dockerd,
    /// `docker version --format '{{.Server.Version}}'`.
    pub version: String,
    /// The task container's network namespace (its `SandboxKey`, a bind-mounted nsfs file
    /// under dockerd's exec root): where the load generator and the latency probe run.
    pub netns: PathBuf,
    /// The service's VIP on `appnet` as the Swarm API reports it (`10.0.1.2/24`), to compare
    /// with what the resolver answers.
    pub service_vip: Option<String>,
    /// Seconds from starting dockerd to a running task with its namespace known.
    pub setup_secs: f64,
}

impl DockerDns {
    /// Start dockerd, `swarm init`, create the network and a service `service` of one task
    /// (busybox `sleep`), wait until it runs (all within `limit`, besides the harness's own
    /// bounds on each docker command), then pin every dockerd thread to `cpu`. `Err` says
    /// why Docker cannot be measured here; whatever was set up is undone before returning.
    pub fn start(service: &str, cpu: u32, limit: Duration) -> Result<DockerDns, String> {
        let t = Instant::now();
        let d = Dockerd::start()?;
        // Swept once more at exit should the guard never run (its sandboxes go with it).
        util::track_netns(&d.netns);
        // Every later step panics with the command's output and the daemon's log when it
        // fails; catch that here so that the scenario goes on without Docker. The guard
        // inside cleans up as the closure unwinds.
        let r = catch_unwind(AssertUnwindSafe(move || setup(d, service, cpu, t, limit)));
        // An interruption is not a reason to go on without Docker: stop the scenario.
        util::check_interrupt();
        match r {
            Ok(r) => r,
            Err(e) => Err(e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())),
        }
    }

    /// The last lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.d.log_tail(lines)
    }
}

fn setup(
    mut d: Dockerd,
    service: &str,
    cpu: u32,
    t: Instant,
    limit: Duration,
) -> Result<DockerDns, String> {
    let deadline = t + limit;
    let in_time = |what: &str| {
        util::check_interrupt();
        if Instant::now() > deadline {
            Err(format!(
                "{what}: setting up the swarm took longer than {} s",
                limit.as_secs()
            ))
        } else {
            Ok(())
        }
    };
    // The API version the CLI negotiated is irrelevant; the daemon's is what serves DNS.
    let version = d
        .docker_ok(&["version", "--format", "{{.Server.Version}}"])
        .trim()
        .to_string();
    d.swarm_init();
    in_time("swarm init")?;
    d.import_busybox(IMAGE);
    d.docker_ok(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--attachable",
        NETWORK,
    ]);
    d.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        service,
        "--replicas",
        "1",
        "--network",
        NETWORK,
        IMAGE,
        "sleep",
        "100000",
    ]);
    in_time("service create")?;
    d.wait_running(
        service,
        1,
        deadline.saturating_duration_since(Instant::now()),
    );
    let label = format!("label=com.docker.swarm.service.name={service}");
    let container = d
        .docker_ok(&["ps", "-q", "--filter", &label])
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("service {service} runs but `docker ps` lists no container"))?;
    let netns = loop {
        let key = d
            .docker_ok(&[
                "inspect",
                "-f",
                "{{.NetworkSettings.SandboxKey}}",
                &container,
            ])
            .trim()
            .to_string();
        if !key.is_empty() && Path::new(&key).exists() {
            break PathBuf::from(key);
        }
        in_time(&format!(
            "container {container} has no network namespace yet"
        ))?;
        std::thread::sleep(Duration::from_millis(100));
    };
    let service_vip = service_vip(&d, service);
    let setup_secs = t.elapsed().as_secs_f64();
    // Like the other servers: every thread of the daemon (its resolver's goroutines run on
    // them) on `cpu`; threads the Go runtime starts later inherit the mask.
    let pid = d.pid().ok_or("dockerd is not running")?;
    let mask = format!("{:x}", 1u64 << cpu);
    let out = util::run_bounded(
        None,
        "taskset",
        &["-a", "-p", &mask, &pid.to_string()],
        Duration::from_secs(10),
    );
    if !out.status.success() {
        return Err(format!(
            "taskset -a -p {mask} {pid} (dockerd): {}",
            util::text(&out).trim()
        ));
    }
    Ok(DockerDns {
        d,
        version,
        netns,
        service_vip,
        setup_secs,
    })
}

/// The service's VIP on [`NETWORK`] from `docker service inspect` (`Endpoint.VirtualIPs`).
fn service_vip(d: &Dockerd, service: &str) -> Option<String> {
    let net = d
        .docker_ok(&["network", "inspect", "-f", "{{.Id}}", NETWORK])
        .trim()
        .to_string();
    let vips = d.docker_ok(&[
        "service",
        "inspect",
        "-f",
        "{{json .Endpoint.VirtualIPs}}",
        service,
    ]);
    let vips: Value = serde_json::from_str(vips.trim()).ok()?;
    vips.as_array()?
        .iter()
        .find(|v| v["NetworkID"].as_str() == Some(net.as_str()))
        .and_then(|v| v["Addr"].as_str())
        .map(str::to_string)
}
