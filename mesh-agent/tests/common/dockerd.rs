//! A private Docker daemon for tests (root only; Debian's `docker.io` 20.10 `dockerd` and a
//! `docker` CLI on `PATH`).
//!
//! [`Dockerd::start`] runs `dockerd` inside its own network namespace (`ip netns add
//! meshdk-<pid>-<n>`, `lo` up, a veth pair with [`Dockerd::ADDRESS`] to advertise), with
//! everything it writes under one temporary directory:
//!
//! ```text
//! dockerd --config-file <tmp>/daemon.json    ({"deprecated-key-path": "<tmp>/key.json"}:
//!                                             no /etc/docker/key.json)
//!         --storage-driver vfs --data-root <tmp>/data --exec-root <tmp>/exec
//!         -H unix://<tmp>/docker.sock --pidfile <tmp>/docker.pid --bridge=none
//!         --containerd-namespace mesh-<pid>-<n> --containerd-plugins-namespace …
//! ```
//!
//! iptables stays enabled (Swarm's ingress needs it) but every rule, chain (`DOCKER-*`) and
//! interface dockerd creates (`docker_gwbridge`, veths, vxlans, bridges) is in the private
//! namespace; the host's are never touched. Its own containerd runs under the exec root; the
//! `docker` CLI gets `DOCKER_CONFIG=<tmp>/cli`.
//!
//! [`Dockerd::start_with`] adds arguments of the caller's (e.g. a TLS-protected `-H
//! tcp://127.0.0.1:2376`: the port is the private namespace's, so always free).
//!
//! [`Dockerd::start_in`] runs it in a namespace of the caller's instead (addressed by the
//! caller, left in place on drop) and in its own UTS namespace with a given host name, so
//! that several daemons on one machine make distinct swarm nodes
//! ([`swarm_init_on`](Dockerd::swarm_init_on) an address of the caller's,
//! [`swarm_join`](Dockerd::swarm_join)).
//!
//! Use it from a test crate with `#[path = "common/dockerd.rs"] mod dockerd;`.
//!
//! Dropping the guard (also on panic): `docker service rm` of every service, `docker swarm
//! leave --force`, dockerd stopped (SIGTERM, up to 20 s, then SIGKILL), any process left
//! over (whose command line names the temporary directory or the containerd namespace:
//! containerd, shims) and their descendants (containers) killed by pid, every mount under it (container sandboxes `exec/netns/*`, `ingress_sbox`,
//! `lb_*`, overlay namespaces, which dockerd 20.10 leaks on `swarm leave` + stop) lazily
//! unmounted, the namespace deleted (and with it docker_gwbridge, the DOCKER chains…), the
//! directory removed, and the host paths dockerd creates outside it (`/run/docker/plugins`,
//! `/run/containerd/s`, `/etc/docker`) removed again if they did not exist before and are
//! empty.

#![allow(dead_code)]

use std::{
    fs,
    io::{Read, Write},
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Host paths dockerd (or its containerd) creates outside its data and exec roots.
const HOST_PATHS: [&str; 5] = [
    "/run/docker/plugins",
    "/run/docker",
    "/run/containerd/s",
    "/run/containerd",
    "/etc/docker",
];

/// A running private dockerd; everything is undone on drop.
pub struct Dockerd {
    /// The temporary directory holding everything.
    pub root: PathBuf,
    /// The network namespace dockerd runs in (`ip netns exec <netns> …` reaches its tasks).
    pub netns: String,
    /// The Engine API socket.
    pub socket: PathBuf,
    id: String,
    child: Option<Child>,
    /// Host paths of [`HOST_PATHS`] that did not exist before.
    created_host_paths: Vec<&'static str>,
    swarm: bool,
    /// Arguments added to dockerd's own ([`start_with`](Self::start_with)).
    extra_args: Vec<String>,
    /// Whether the namespace is this guard's (made and deleted by it) or the caller's
    /// ([`start_in`](Self::start_in)).
    own_netns: bool,
    /// Host name of dockerd's own UTS namespace ([`start_in`](Self::start_in)): the swarm
    /// node's name.
    hostname: Option<String>,
}

impl Dockerd {
    /// The address dockerd's namespace has (advertised to the swarm).
    pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    /// Start a private dockerd and wait for its API (bounded). `Err` says why it cannot
    /// start (no dockerd binary, not root, the daemon failed: with its log's tail).
    pub fn start() -> Result<Dockerd, String> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with `extra_args` added to dockerd's command line (kept for
    /// [`restart`](Self::restart)). The unix socket stays: the `docker` CLI and
    /// [`ping`](Self::ping) use it.
    pub fn start_with(extra_args: &[&str]) -> Result<Dockerd, String> {
        Self::start_inner(None, None, extra_args)
    }

    /// A dockerd in the caller's network namespace `netns` (made, addressed and deleted by
    /// the caller; this guard leaves it in place), with its own UTS namespace named
    /// `hostname` (the swarm node's name: several daemons on one machine would otherwise all
    /// be the machine's host name). For several daemons joined into one swarm
    /// ([`swarm_init_on`](Self::swarm_init_on), [`swarm_join`](Self::swarm_join)).
    pub fn start_in(netns: &str, hostname: &str, extra_args: &[&str]) -> Result<Dockerd, String> {
        Self::start_inner(Some(netns), Some(hostname), extra_args)
    }

    fn start_inner(
        netns: Option<&str>,
        hostname: Option<&str>,
        extra_args: &[&str],
    ) -> Result<Dockerd, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root".into());
        }
        which("dockerd")?;
        which("docker")?;
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let root = tempfile::Builder::new()
            .prefix("mesh-dockerd-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?
            .keep();
        let created_host_paths = HOST_PATHS
            .iter()
            .copied()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let mut d = Dockerd {
            socket: root.join("docker.sock"),
            netns: netns.map_or_else(|| format!("meshdk-{id}"), str::to_string),
            root,
            id,
            child: None,
            created_host_paths,
            swarm: false,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            own_netns: netns.is_none(),
            hostname: hostname.map(str::to_string),
        };
        // From here on, Drop cleans up whatever was set up.
        if d.own_netns {
            d.setup_netns()?;
        }
        let config = format!(
            "{{\"deprecated-key-path\": \"{}\"}}\n",
            d.root.join("key.json").display()
        );
        fs::write(d.root.join("daemon.json"), config)
            .map_err(|e| format!("cannot write daemon.json: {e}"))?;
        fs::create_dir_all(d.root.join("cli"))
            .map_err(|e| format!("cannot create cli dir: {e}"))?;
        d.spawn()?;
        Ok(d)
    }

    fn setup_netns(&self) -> Result<(), String> {
        let ns = self.netns.as_str();
        let addr = format!("{}/24", Self::ADDRESS);
        for args in [
            vec!["netns", "add", ns],
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec![
                "-n", ns, "link", "add", "dk0", "type", "veth", "peer", "name", "dk1",
            ],
            vec!["-n", ns, "addr", "add", addr.as_str(), "dev", "dk0"],
            vec!["-n", ns, "link", "set", "dk0", "up"],
            vec!["-n", ns, "link", "set", "dk1", "up"],
        ] {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// Start (or restart, with the same data root) the daemon and wait for its API.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open the log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let ns = fs::File::open(format!("/run/netns/{}", self.netns))
            .map_err(|e| format!("cannot open netns {}: {e}", self.netns))?;
        let ns_fd = ns.as_raw_fd();
        let hostname = self
            .hostname
            .as_ref()
            .map(|h| std::ffi::CString::new(h.as_str()).map_err(|e| format!("hostname: {e}")))
            .transpose()?;
        let r = |p: &str| self.root.join(p).display().to_string();
        let mut cmd = Command::new("dockerd");
        cmd.args([
            "--config-file",
            &r("daemon.json"),
            "--storage-driver",
            "vfs",
            "--data-root",
            &r("data"),
            "--exec-root",
            &r("exec"),
            "-H",
            &format!("unix://{}", self.socket.display()),
            "--pidfile",
            &r("docker.pid"),
            "--bridge=none",
            "--containerd-namespace",
            &format!("mesh-{}", self.id),
            "--containerd-plugins-namespace",
            &format!("mesh-{}-plugins", self.id),
        ])
        .args(&self.extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
        // SAFETY: setns(2) is async-signal-safe; the fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(h) = &hostname
                    && (libc::unshare(libc::CLONE_NEWUTS) != 0
                        || libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run dockerd: {e}"))?;
        drop(ns);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("dockerd exited ({status}):\n{}", self.log_tail(30)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd's API did not answer within 60 s:\n{}",
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start the daemon again after [`stop`](Self::stop) (same data root: the swarm, its
    /// services and networks come back).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "dockerd is still running");
        if let Err(e) = self.spawn() {
            panic!("cannot restart dockerd: {e}");
        }
    }

    /// Whether the API answers `GET /_ping`.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") && buf.ends_with("OK")
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("dockerd.log")
    }

    /// dockerd's exec root: container sandboxes are `<exec root>/netns/<id>`.
    pub fn exec_root(&self) -> PathBuf {
        self.root.join("exec")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `docker -H unix://<socket> args…` (killed after 120 s).
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_timeout(args, Duration::from_secs(120))
    }

    fn docker_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.root.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
    }

    /// `cmd args…` run in the daemon's network namespace (`ip netns exec`).
    pub fn in_ns(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {cmd}: {e}", self.netns))
    }

    /// `curl -s --max-time 5 url` from the daemon's namespace: the body, if any.
    pub fn curl(&self, url: &str) -> Option<String> {
        let o = self.in_ns("curl", &["-s", "--max-time", "5", url]);
        (o.status.success() && !o.stdout.is_empty())
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Host names (12-digit container ids) of the running tasks of Swarm service `service`
    /// on this daemon's node.
    pub fn task_hosts(&self, service: &str) -> std::collections::BTreeSet<String> {
        let filter = format!("label=com.docker.swarm.service.name={service}");
        let out = self.docker_ok(&["ps", "-q", "--filter", &filter]);
        out.lines()
            .map(|l| l.trim().chars().take(12).collect())
            .filter(|s: &String| !s.is_empty())
            .collect()
    }

    /// `docker args…`, which must succeed; its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}{}\n--- dockerd log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker swarm init --advertise-addr` [`ADDRESS`](Self::ADDRESS).
    pub fn swarm_init(&mut self) {
        self.swarm = true;
        self.docker_ok(&[
            "swarm",
            "init",
            "--advertise-addr",
            &Self::ADDRESS.to_string(),
        ]);
    }

    /// `docker swarm init --advertise-addr addr` (a daemon of [`start_in`](Self::start_in),
    /// whose namespace has `addr`); returns the worker join token.
    pub fn swarm_init_on(&mut self, addr: Ipv4Addr) -> String {
        self.swarm = true;
        self.docker_ok(&["swarm", "init", "--advertise-addr", &addr.to_string()]);
        self.docker_ok(&["swarm", "join-token", "-q", "worker"])
            .trim()
            .to_string()
    }

    /// `docker swarm join --advertise-addr addr --token token manager:2377`.
    pub fn swarm_join(&mut self, token: &str, manager: Ipv4Addr, addr: Ipv4Addr) {
        self.swarm = true;
        self.docker_ok(&[
            "swarm",
            "join",
            "--advertise-addr",
            &addr.to_string(),
            "--token",
            token,
            &format!("{manager}:2377"),
        ]);
    }

    /// This daemon's swarm node id.
    pub fn node_id(&self) -> String {
        self.docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"])
            .trim()
            .to_string()
    }

    /// Import a busybox image as `tag`: `/bin/busybox` (busybox-static) with `sh`, `httpd`,
    /// `wget`, `sleep`, `hostname`, `cat`, `echo`, `ls` links, and an empty `/www`.
    pub fn import_busybox(&self, tag: &str) {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| panic!("no /bin/busybox: install busybox-static"));
        let rootfs = self.root.join("rootfs");
        for d in ["bin", "www", "tmp", "etc"] {
            fs::create_dir_all(rootfs.join(d)).expect("create rootfs dirs");
        }
        fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for l in [
            "sh", "httpd", "wget", "sleep", "hostname", "cat", "echo", "ls",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).expect("symlink");
        }
        fs::write(rootfs.join("www/index.html"), "mesh\n").expect("index.html");
        let tar = self.root.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.docker_ok(&[
            "import",
            "-c",
            "CMD [\"/bin/sh\"]",
            &tar.display().to_string(),
            tag,
        ]);
    }

    /// On a swarm manager: an attachable overlay network `appnet` and a service `web` of
    /// `replicas` busybox httpd tasks of `image` on it, publishing 8080 → 80, each answering
    /// its own hostname; returns once they all run (panics after `timeout`). `create_args`
    /// go to `docker service create` before the name (e.g. `-d`).
    pub fn web_service(
        &self,
        image: &str,
        replicas: usize,
        create_args: &[&str],
        timeout: Duration,
    ) {
        self.docker_ok(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "appnet",
        ]);
        let replicas_arg = replicas.to_string();
        let mut args = vec!["service", "create"];
        args.extend_from_slice(create_args);
        args.extend([
            "--name",
            "web",
            "--replicas",
            &replicas_arg,
            "--network",
            "appnet",
            "-p",
            "8080:80",
            image,
            "sh",
            "-c",
            "hostname > /www/index.html; exec httpd -f -p 80 -h /www",
        ]);
        self.docker_ok(&args);
        self.wait_running("web", replicas, timeout);
    }

    /// Tasks of `service` currently running (and meant to run), from `docker service ps`.
    pub fn running_tasks(&self, service: &str) -> usize {
        let out = self.docker(&[
            "service",
            "ps",
            service,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.CurrentState}}",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("Running"))
            .count()
    }

    /// Wait (bounded) until `service` has exactly `n` running tasks; panics with
    /// `docker service ps` and the daemon log otherwise.
    pub fn wait_running(&self, service: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.running_tasks(service) == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let ps = self.docker(&["service", "ps", "--no-trunc", service]);
        panic!(
            "service {service}: not {n} running tasks within {timeout:?}:\n{}{}\n--- dockerd log \
             ---\n{}",
            String::from_utf8_lossy(&ps.stdout),
            String::from_utf8_lossy(&ps.stderr),
            self.log_tail(30)
        );
    }

    /// Stop the daemon: SIGTERM, wait up to 20 s, then SIGKILL. Its containers stop with it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("dockerd did not stop within 20 s: SIGKILL");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Processes left from this daemon: those whose command line names the temporary
    /// directory or the containerd namespace (containerd, its shims), and all their
    /// descendants (the containers).
    fn leftover_pids(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let root = self.root.display().to_string();
        let ns = format!("mesh-{}", self.id);
        let mut parent: Vec<(i32, i32)> = Vec::new();
        let mut matched: Vec<i32> = Vec::new();
        let Ok(dir) = fs::read_dir("/proc") else {
            return matched;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            // `pid (comm) state ppid …`; comm may contain spaces: split after the last ')'.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok())
            {
                parent.push((pid, ppid));
            }
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&root) || cmdline.split(' ').any(|w| w == ns) {
                matched.push(pid);
            }
        }
        let mut all = matched.clone();
        let mut i = 0;
        while i < all.len() {
            let p = all[i];
            for (child, _) in parent.iter().filter(|(_, pp)| *pp == p) {
                if !all.contains(child) && *child != me {
                    all.push(*child);
                }
            }
            i += 1;
        }
        all
    }

    fn cleanup(&mut self) {
        if self.is_running() && self.ping() {
            let quick = Duration::from_secs(30);
            if self.swarm {
                let out = self.docker_timeout(&["service", "ls", "-q"], quick);
                let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if !ids.is_empty() {
                    let mut args = vec!["service", "rm"];
                    args.extend(ids.iter().map(String::as_str));
                    let _ = self.docker_timeout(&args, quick);
                }
                let _ = self.docker_timeout(&["swarm", "leave", "--force"], quick);
            }
        }
        self.stop();
        let leftovers = self.leftover_pids();
        if !leftovers.is_empty() {
            eprintln!("killing processes left by dockerd: {leftovers:?}");
            for pid in &leftovers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && leftovers
                    .iter()
                    .any(|p| Path::new(&format!("/proc/{p}")).exists())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Mounts under the directory, deepest first.
        let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        mounts.dedup();
        for m in mounts {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cannot unmount {}: {e}", m.display());
            }
        }
        if self.own_netns {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .output();
        }
        if let Err(e) = fs::remove_dir_all(&self.root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cannot remove {}: {e}", self.root.display());
        }
        // Deepest first (HOST_PATHS lists children before parents); only empty directories.
        for p in &self.created_host_paths {
            let _ = fs::remove_dir(p);
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// `/proc/self/mountinfo` escapes spaces and such as `\040`.
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|t| u8::from_str_radix(t, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out))
}

fn which(bin: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{bin}` is not installed (not on PATH)"))
}

/// Run `cmd` to completion, killing it after `timeout`.
fn run_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("no answer within {timeout:?} (killed)"))
        }
    }
}

/// `f()` until it gives a value, every `pause`, for at most `timeout` (then the test fails
/// naming `why`).
pub fn eventually<T>(
    why: &str,
    timeout: Duration,
    pause: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {why}");
        std::thread::sleep(pause);
    }
}
