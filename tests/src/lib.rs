//! Test bed for mesh's integration tests: network namespaces, veth links, real agent
//! processes and real clients. Every object has a unique name and is removed on drop, even
//! when a test panics. Traffic stays inside the namespaces a test made (198.18.0.0/15).
//!
//! Tests need root (CI runs as root) and the `mesh-agent` binary: `cargo xtask test` builds
//! it and passes `MESH_AGENT_BIN`; otherwise `target/{debug,release}/mesh-agent` is used.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub mod cluster;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique tag for names (interface names are limited to 15 characters).
pub fn uniq() -> String {
    format!(
        "{:x}{:x}",
        std::process::id() % 0xffff,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Run a command, panicking with its output if it fails.
#[track_caller]
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A named network namespace, deleted (with every process-less link in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = format!("mt{prefix}{}", uniq());
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip netns exec NAME cmd args...`, output returned whatever the status.
    pub fn run(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd} in {}: {e}", self.name))
    }

    /// Like [`Netns::run`] but panics on failure.
    #[track_caller]
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let out = self.run(cmd, args);
        if !out.status.success() {
            panic!(
                "[{}] {cmd} {} failed: {}{}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Start a long-running process inside the namespace; killed on drop of the guard.
    pub fn spawn(&self, cmd: &str, args: &[&str]) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd} in {}: {e}", self.name));
        Proc {
            child: Some(child),
            name: cmd.to_string(),
            log: None,
        }
    }

    /// Run `f` on a thread inside this namespace (e.g. to use a socket from there).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = fs::File::open(self.path()).expect("open netns");
        thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running in it, then delete it.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair between two namespaces, with addresses; deleted with its namespaces.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    sh(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    );
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    log: Option<PathBuf>,
}

impl Proc {
    /// Run the agent binary with `args` inside `ns` (e.g. a whoami server); killed on drop.
    pub fn spawn_in(ns: &Netns, args: &[&str]) -> Proc {
        let child = Command::new(agent_bin())
            .args(args)
            .arg("--netns")
            .arg(ns.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent binary");
        Proc {
            child: Some(child),
            name: args.join(" "),
            log: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Send SIGTERM and wait (bounded) for exit; returns true when it exited on its own.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target");
    for profile in ["debug", "release"] {
        let p = root.join(profile).join("mesh-agent");
        if p.is_file() {
            return p;
        }
    }
    panic!("mesh-agent binary not found: run `cargo xtask test` (or `cargo build -p mesh-agent`)");
}

/// A running agent for one node: its own pin dir, run dir and log file.
pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Leave the pins for the next agent (hand-over tests); the last one removes them.
    pub keep_pins: bool,
    _tmp: tempfile::TempDir,
}

pub struct AgentOpts<'a> {
    pub node: &'a str,
    pub netns: &'a Netns,
    pub state: &'a Path,
    pub ifaces: &'a [&'a str],
    pub extra: Vec<String>,
    /// Reuse this pin dir (restart tests); default: a fresh unique one.
    pub pin_dir: Option<PathBuf>,
}

impl Agent {
    pub fn start(o: AgentOpts<'_>) -> Agent {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pin_dir = o
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/mesh-it-{}", uniq())));
        let run_dir = tmp.path().join("run");
        let log = tmp.path().join("agent.log");
        let logf = fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--netns")
            .arg(o.netns.path())
            .args(["--node", o.node])
            .arg("--state")
            .arg(o.state)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--resync-ms", "300"]);
        for i in o.ifaces {
            cmd.args(["--iface", i]);
        }
        cmd.args(&o.extra);
        cmd.env("MESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf);
        let child = cmd.spawn().expect("start mesh-agent");
        let mut a = Agent {
            proc: Proc {
                child: Some(child),
                name: "mesh-agent".into(),
                log: Some(log),
            },
            node: o.node.to_string(),
            pin_dir,
            run_dir,
            keep_pins: false,
            _tmp: tmp,
        };
        a.wait_ready();
        a
    }

    /// Wait for the agent's first programming (its catalog appears).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.run_dir.join("catalog.json").exists() && self.proc.log().contains("agent ready")
            {
                return;
            }
            if !self.proc.is_running() {
                panic!("mesh-agent exited early:\n{}", self.proc.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("mesh-agent not ready after 30 s:\n{}", self.proc.log());
    }

    /// `mesh-agent status --json` for this agent.
    pub fn status(&self) -> serde_json::Value {
        let out = sh(
            agent_bin().to_str().unwrap(),
            &[
                "status",
                "--json",
                "--pin-dir",
                self.pin_dir.to_str().unwrap(),
                "--run-dir",
                self.run_dir.to_str().unwrap(),
            ],
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> bool {
        self.proc.stop(Duration::from_secs(15))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(15));
        if self.keep_pins {
            return;
        }
        // A test that kept the datapath (or an agent that crashed) must not leak pins
        // (maps, and links under links/ whose unpinning detaches their programs).
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// Start the agent binary's whoami server inside `ns` (HTTP on :80, UDP echo on :53).
pub fn whoami(ns: &Netns, name: &str) -> Proc {
    let bin = agent_bin();
    let child = Command::new(bin)
        .args([
            "whoami",
            "--name",
            name,
            "--http",
            "0.0.0.0:80",
            "--udp",
            "0.0.0.0:7",
        ])
        .arg("--netns")
        .arg(ns.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start whoami");
    Proc {
        child: Some(child),
        name: format!("whoami {name}"),
        log: None,
    }
}

/// `curl -s --max-time 5 URL` from `ns`; `None` on failure.
pub fn curl(ns: &Netns, url: &str) -> Option<String> {
    let out = ns.run("curl", &["-s", "--max-time", "5", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Retry `curl` until it answers (bounded); panics with `why` otherwise.
#[track_caller]
pub fn curl_until(ns: &Netns, url: &str, why: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = curl(ns, url)
            && !s.is_empty()
        {
            return s;
        }
        if Instant::now() > deadline {
            panic!("{why}: {url} never answered from {}", ns.name);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// One UDP request/response from inside `ns`.
pub fn udp_ask(ns: &Netns, to: SocketAddr, payload: &[u8]) -> Option<String> {
    let payload = payload.to_vec();
    ns.within(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.send_to(&payload, to).ok()?;
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_string())
    })
}

/// One UDP request of `size` bytes and its echo from inside `ns`: (the task's name, whether
/// the echoed payload came back whole), `None` on silence.
pub fn udp_ask_large(ns: &Netns, to: SocketAddr, size: usize, fill: u8) -> Option<(String, bool)> {
    ns.within(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.send_to(&vec![fill; size], to).ok()?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        let sp = buf[..n].iter().position(|&b| b == b' ')?;
        let echo = &buf[sp + 1..n];
        Some((
            String::from_utf8_lossy(&buf[..sp]).to_string(),
            echo.len() == size && echo.iter().all(|&b| b == fill),
        ))
    })
}

/// Write `text` to `path` atomically (rename), as an editor or a manager would.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write state");
    fs::rename(&tmp, path).expect("rename state");
}

/// Poll `f` until it returns `Some` (bounded), panicking with `why`.
#[track_caller]
pub fn eventually<T>(why: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out: {why}");
        }
        thread::sleep(Duration::from_millis(150));
    }
}

/// Count answers per distinct body.
pub fn tally(answers: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}

pub const fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}
