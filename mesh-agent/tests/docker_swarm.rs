//! mesh under a real Docker Swarm (Debian's docker.io 20.10, private dockerd in its own
//! network namespace). This kernel has no IPVS, so Swarm's routing mesh is dead; the agent,
//! pointed at the manager, makes the published port and the VIPs work.

#[path = "common/agent_proc.rs"]
mod agent_proc;
#[path = "common/dockerd.rs"]
mod dockerd;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use agent_proc::AgentProc;
use dockerd::{Dockerd, eventually as eventually_every};

const IMAGE: &str = "mesh-busybox:test";

fn eventually<T>(why: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    eventually_every(why, timeout, Duration::from_millis(300), f)
}

fn tally(v: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in v {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}

/// What state Docker's networking is in, to compare before and after the agent.
fn docker_net_fingerprint(d: &Dockerd) -> String {
    let links = String::from_utf8_lossy(&d.in_ns("ip", &["-o", "link"]).stdout)
        .lines()
        .map(|l| {
            l.split(": ")
                .nth(1)
                .unwrap_or("")
                .split('@')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",");
    let ipt = String::from_utf8_lossy(&d.in_ns("iptables-save", &[]).stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
        .map(String::from)
        .collect::<Vec<_>>()
        .join("\n");
    format!("{links}\n{ipt}")
}

#[test]
fn mesh_replaces_ipvs_under_a_real_swarm() {
    let mut d = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            // Only when dockerd cannot start here; CI installs docker.io so that it does.
            eprintln!("SKIPPED: dockerd cannot start: {why}");
            return;
        }
    };
    d.swarm_init();
    d.import_busybox(IMAGE);
    d.web_service(IMAGE, 3, &[], Duration::from_secs(90));
    // Without mesh the routing mesh is dead here (no IPVS): nothing answers.
    assert!(
        d.curl("http://127.0.0.1:8080/").is_none(),
        "Swarm alone cannot forward on this kernel"
    );
    let before = docker_net_fingerprint(&d);

    // The agent, in the Docker host's namespace, pointed at the manager.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("agent.log");
    let pins = PathBuf::from(format!("/sys/fs/bpf/mesh-docker-{}", std::process::id()));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args([
            "run",
            "--runtime",
            "docker",
            "--no-dns",
            "--metrics-addr",
            "none",
            "--resync-ms",
            "500",
        ])
        .arg("--docker-host")
        .arg(&d.socket)
        .arg("--netns")
        .arg(format!("/run/netns/{}", d.netns))
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--run-dir")
        .arg(tmp.path().join("run"))
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("start mesh-agent");
    let mut agent = AgentProc {
        child: Some(child),
        log,
        pins: pins.clone(),
    };
    eventually("agent ready", Duration::from_secs(60), || {
        agent.log().contains("agent ready").then_some(())
    });

    // 30 requests to the published port from the node: all 3 tasks, evenly.
    let hosts = d.task_hosts("web");
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let answered = (0..60).find_map(|_| {
        let r = d.curl("http://127.0.0.1:8080/");
        if r.is_none() {
            std::thread::sleep(Duration::from_millis(500));
        }
        r
    });
    if answered.is_none() {
        let sbox = d.exec_root().join("netns/ingress_sbox");
        let ns = |args: &[&str]| {
            let o = Command::new("nsenter")
                .arg(format!("--net={}", sbox.display()))
                .args(args)
                .output()
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        let st = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["status", "--pin-dir"])
            .arg(&pins)
            .arg("--run-dir")
            .arg(tmp.path().join("run"))
            .output()
            .unwrap();
        panic!(
            "published port never answered\nAGENT LOG:\n{}\nSTATUS:\n{}\nSBOX ADDR:\n{}\nSBOX BPF:\n{}\nSBOX ROUTES:\n{}\nNAT:\n{}",
            agent.log(),
            String::from_utf8_lossy(&st.stdout),
            ns(&["ip", "-br", "addr"]),
            ns(&["bpftool", "net", "show"]),
            ns(&["ip", "route"]),
            String::from_utf8_lossy(&d.in_ns("iptables-save", &["-t", "nat"]).stdout),
        );
    }
    let answers: Vec<String> = (0..30)
        .map(|_| d.curl("http://127.0.0.1:8080/").unwrap_or_default())
        .collect();
    let t = tally(&answers);
    assert_eq!(
        t.keys().cloned().collect::<BTreeSet<_>>(),
        hosts,
        "{t:?}\n{}",
        agent.log()
    );
    assert!(t.values().all(|&n| n == 10), "10 each: {t:?}");

    // From inside one task, `wget http://web` (Docker's DNS → the VIP → mesh) reaches all tasks.
    let ctr = d
        .docker_ok(&[
            "ps",
            "-q",
            "--filter",
            "label=com.docker.swarm.service.name=web",
        ])
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    let seen: BTreeSet<String> = (0..12)
        .filter_map(|_| {
            // busybox 1.35's wget segfaults with -T: bound it with busybox's timeout instead.
            let o = d.docker(&[
                "exec",
                &ctr,
                "busybox",
                "timeout",
                "5",
                "wget",
                "-q",
                "-O",
                "-",
                "http://web/",
            ]);
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .collect();
    assert_eq!(
        seen,
        hosts,
        "`wget http://web` in a task: the VIP balances over every task\n{}",
        agent.log()
    );

    // Scaling is followed.
    d.docker_ok(&["service", "scale", "-d", "web=5"]);
    d.wait_running("web", 5, Duration::from_secs(90));
    let hosts5 = d.task_hosts("web");
    eventually(
        "5 tasks behind the published port",
        Duration::from_secs(40),
        || {
            let got: BTreeSet<String> = (0..15)
                .filter_map(|_| d.curl("http://127.0.0.1:8080/"))
                .collect();
            (got == hosts5).then_some(())
        },
    );
    d.docker_ok(&["service", "scale", "-d", "web=1"]);
    d.wait_running("web", 1, Duration::from_secs(90));
    eventually(
        "1 task behind the published port",
        Duration::from_secs(40),
        || {
            let hosts1 = d.task_hosts("web");
            let got: BTreeSet<String> = (0..6)
                .filter_map(|_| d.curl("http://127.0.0.1:8080/"))
                .collect();
            (hosts1.len() == 1 && got == hosts1).then_some(())
        },
    );

    // Stopping the agent leaves Docker exactly as it was: mesh made no interface and no
    // iptables rule at any point (Docker's own scaling changed its veths meanwhile).
    let iptables = |f: &str| {
        f.split_once('\n')
            .map(|(_, r)| r.to_string())
            .unwrap_or_default()
    };
    let before_stop = docker_net_fingerprint(&d);
    assert_eq!(
        iptables(&before_stop),
        iptables(&before),
        "mesh never touched Docker's iptables"
    );
    assert!(agent.stop(), "clean exit:\n{}", agent.log());
    assert!(!pins.exists(), "pins removed");
    assert_eq!(
        docker_net_fingerprint(&d),
        before_stop,
        "Docker's interfaces and iptables as they were"
    );

    // Debian's bpftool 7.1 does not list tcx attachments: check that no mesh program is
    // loaded at all any more (one still attached would be; nothing else loads them here).
    eventually("every program detached", Duration::from_secs(15), || {
        let progs = String::from_utf8_lossy(
            &Command::new("bpftool")
                .args(["prog", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        (!progs.contains("name mesh_")).then_some(())
    });
}
