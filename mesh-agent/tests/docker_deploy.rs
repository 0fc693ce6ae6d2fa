//! mesh deployed the way node agents are: as a Swarm global service from its image, with the
//! stack file in deploy/swarm. A rolling update of the agent keeps a live connection through
//! the published port; removing the service removes everything it attached.

#[path = "common/dockerd.rs"]
mod dockerd;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use dockerd::{Dockerd, eventually as eventually_every};

fn eventually<T>(why: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    eventually_every(why, timeout, Duration::from_millis(500), f)
}

/// mesh's programs still loaded anywhere. (Debian's bpftool 7.1 does not list tcx
/// attachments, so look for the programs: one still attached is still loaded. Nothing else
/// loads them while this test binary runs.)
fn mesh_programs() -> Vec<String> {
    let o = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split("name ").nth(1))
        .filter_map(|n| n.split_whitespace().next())
        .filter(|n| n.starts_with("mesh_"))
        .map(String::from)
        .collect()
}

/// Undo the shared bind of the netns directory (before the dockerd guard cleans up).
struct SharedMount(PathBuf);
impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.0)
            .output();
    }
}

/// Pins the agent makes on the host (its node is named after the daemon's swarm node).
struct PinGuard(PathBuf);
impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn mesh_as_a_swarm_global_service_with_a_hitless_rolling_update() {
    let mut d = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: dockerd cannot start: {why}");
            return;
        }
    };
    d.swarm_init();

    // The image, built from the agent binary and its libraries (as `cargo xtask image`),
    // under two tags for the update.
    let tmp = tempfile::tempdir().unwrap();
    let tar = xtask::image::rootfs(Path::new(env!("CARGO_BIN_EXE_mesh-agent")), tmp.path())
        .expect("rootfs");
    d.docker_ok(&[
        "import",
        "--change",
        "ENTRYPOINT [\"/usr/local/bin/mesh-agent\"]",
        "--change",
        "CMD [\"run\"]",
        tar.to_str().unwrap(),
        "mesh-agent:test1",
    ]);
    d.docker_ok(&["tag", "mesh-agent:test1", "mesh-agent:test2"]);
    let v = d.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "mesh-agent:test1",
        "--version",
    ]);
    assert!(
        v.starts_with("mesh-agent "),
        "`mesh-agent --version` in the image: {v}"
    );
    // `web`: the image's own tiny server (HTTP keep-alive, answers with its container's id).
    d.docker_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "-p",
        "8080:80",
        "mesh-agent:test1",
        "whoami",
        "--http",
        "0.0.0.0:80",
    ]);
    d.wait_running("web", 3, Duration::from_secs(90));

    let node = mesh_agent::source::swarm::map::label(
        &nix::unistd::gethostname().unwrap().into_string().unwrap(),
    )
    .unwrap();
    let _pins = PinGuard(PathBuf::from(format!("/sys/fs/bpf/mesh/{node}")));
    // The agent's container follows sandboxes created after it started: Docker requires the
    // netns directory to be a shared (or slave) mount. Hosts with systemd have shared mounts
    // by default; this VM's / is private, so make the private daemon's directory shared.
    let netns_dir = d.exec_root().join("netns");
    let _shared = SharedMount(netns_dir.clone());
    for args in [
        vec![
            "--rbind",
            netns_dir.to_str().unwrap(),
            netns_dir.to_str().unwrap(),
        ],
        vec!["--make-rshared", netns_dir.to_str().unwrap()],
    ] {
        let o = Command::new("mount").args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let stack = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/swarm/mesh-stack.yml");
    let out = Command::new("docker")
        .args([
            "-H",
            &format!("unix://{}", d.socket.display()),
            "stack",
            "deploy",
            "-c",
        ])
        .arg(&stack)
        .arg("mesh")
        .env("DOCKER_CONFIG", d.root.join("cli"))
        .env("MESH_IMAGE", "mesh-agent:test1")
        .env("DOCKER_SOCK", &d.socket)
        .env("DOCKER_NETNS_DIR", d.exec_root().join("netns"))
        .env("CGROUP2", "/sys/fs/cgroup/unified")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stack deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_running("mesh_agent", 1, Duration::from_secs(90));

    // The published port reaches all three tasks.
    let logs = |d: &Dockerd| {
        let ids = d.docker_ok(&[
            "ps",
            "-aq",
            "--filter",
            "label=com.docker.swarm.service.name=mesh_agent",
        ]);
        ids.lines()
            .map(|id| {
                let o = d.docker(&["logs", id.trim()]);
                format!(
                    "--- {id}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .collect::<String>()
    };
    if (0..15).all(|_| {
        let r = d.curl("http://127.0.0.1:8080/").is_none();
        if r {
            std::thread::sleep(Duration::from_millis(1000));
        }
        r
    }) {
        let st = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args([
                "status",
                "--json",
                "--pin-dir",
                &format!("/sys/fs/bpf/mesh/{node}"),
                "--run-dir",
                "/nonexistent",
            ])
            .output()
            .unwrap();
        let cg = Command::new("bpftool")
            .args(["cgroup", "tree", "/sys/fs/cgroup/unified"])
            .output()
            .unwrap();
        panic!(
            "published port never answered through the deployed agent:\n{}\nSTATUS {}\nCGROUP {}\n{}",
            d.docker_ok(&["service", "ps", "--no-trunc", "mesh_agent"]),
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&cg.stdout),
            logs(&d)
        );
    }
    let mut t: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        *t.entry(d.curl("http://127.0.0.1:8080/").unwrap_or_default())
            .or_default() += 1;
    }
    assert!(
        t.len() == 3 && t.values().all(|&n| n == 10),
        "10 per task: {t:?}\n{}",
        logs(&d)
    );
    assert!(!mesh_programs().is_empty());

    // A long TCP connection through the published port, across a rolling update.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let ns = std::fs::File::open(format!("/run/netns/{}", d.netns)).unwrap();
    let th = std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut s = TcpStream::connect("127.0.0.1:8080").expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut ask = || -> String {
            if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                return "<write failed>".into();
            }
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string(),
                _ => "<read failed>".into(),
            }
        };
        let mut out = vec![ask()];
        go_rx.recv().unwrap();
        for _ in 0..3 {
            out.push(ask());
        }
        out
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = d.docker_ok(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=running",
        "mesh_agent",
    ]);
    d.docker_ok(&[
        "service",
        "update",
        "--detach",
        "--image",
        "mesh-agent:test2",
        "mesh_agent",
    ]);
    eventually(
        "the agent task is replaced",
        Duration::from_secs(90),
        || {
            let now = d.docker_ok(&[
                "service",
                "ps",
                "-q",
                "--filter",
                "desired-state=running",
                "mesh_agent",
            ]);
            (now != before && d.running_tasks("mesh_agent") == 1).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    go_tx.send(()).unwrap();
    let answers = th.join().unwrap();
    if !(answers.iter().all(|a| a.len() == 12) && answers.windows(2).all(|w| w[0] == w[1])) {
        let st = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args([
                "status",
                "--json",
                "--pin-dir",
                &format!("/sys/fs/bpf/mesh/{node}"),
                "--run-dir",
                "/nonexistent",
            ])
            .output()
            .unwrap();
        let host = Command::new("ip")
            .args(["netns", "exec", &d.netns, "bpftool", "net", "show"])
            .output()
            .unwrap();
        panic!(
            "the connection did not survive the rolling update on one task: {answers:?}\nSTATUS {}\nPROGS {:?}\nHOST {}\n{}",
            String::from_utf8_lossy(&st.stdout),
            mesh_programs(),
            String::from_utf8_lossy(&host.stdout),
            logs(&d)
        );
    }
    let got: std::collections::BTreeSet<String> = (0..9)
        .filter_map(|_| d.curl("http://127.0.0.1:8080/"))
        .collect();
    assert_eq!(got.len(), 3, "new connections after the update: {got:?}");

    // Removing the service (SIGTERM) removes every attachment.
    d.docker_ok(&["service", "rm", "mesh_agent"]);
    eventually(
        "the agent's container is gone",
        Duration::from_secs(60),
        || {
            let ps = d.docker_ok(&[
                "ps",
                "-q",
                "--filter",
                "label=com.docker.swarm.service.name=mesh_agent",
            ]);
            ps.trim().is_empty().then_some(())
        },
    );
    eventually("every program detached", Duration::from_secs(20), || {
        mesh_programs().is_empty().then_some(())
    });
    assert!(
        !Path::new(&format!("/sys/fs/bpf/mesh/{node}")).exists(),
        "pins removed"
    );
}
