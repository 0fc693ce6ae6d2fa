//! The VIP path's cost. mesh balances a task's connections to a service VIP in the socket
//! layer: the cgroup `connect4` hook rewrites the socket's destination once, at connect(),
//! so no packet of the connection is ever looked at (BPF_PROG_TEST_RUN cannot run that
//! hook type). What a VIP costs is therefore per connection: measured here as the time of
//! connect() of fresh UDP sockets to the VIP (translated by the hook: the frontend,
//! round-robin, the backend, counters, and the reverse entry for getpeername, a new LRU
//! insert per socket) against the same to a task's own address (the hook runs, finds no
//! frontend), from inside a task of a real agent's bed, alternated per round.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Ctx,
    e2e::{AgentProc, Bed, agent_status},
    util::{self, Stat, stat},
};

/// The bed's `web` VIP and a task address that is no frontend (task 2, `e2e::task_ip`).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const PLAIN: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);
const PORT: u16 = 80;

/// What [`measure`] found: ns per socket+connect+close to the VIP and to a plain address,
/// per round, their per-round differences, and how many connects the agent translated.
pub struct VipCost {
    pub vip_ns: Stat,
    pub plain_ns: Stat,
    pub above: Stat,
    pub translated: u64,
    pub expected: u64,
    pub per_batch: usize,
}

impl VipCost {
    pub fn json(&self) -> Value {
        json!({
            "vip_connect_ns": self.vip_ns, "plain_connect_ns": self.plain_ns,
            "vip_above_plain_ns": self.above, "connects_per_batch": self.per_batch,
            "translated": self.translated, "vip_connects": self.expected,
        })
    }
}

/// A cgroup-v2 child of the root for the socket hooks, removed on drop (after this process
/// left it).
struct Cgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    fn new() -> Result<Cgroup, String> {
        let root = mesh_agent::ebpf::default_cgroup().ok_or("no cgroup-v2 hierarchy mounted")?;
        let dir = root.join(format!("mesh-bench-vip-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("create cgroup {}: {e}", dir.display()))?;
        Ok(Cgroup { dir, root })
    }

    /// Move this whole process into `dir`.
    fn enter(dir: &Path) -> Result<(), String> {
        fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("join cgroup {}: {e}", dir.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = Cgroup::enter(&self.root);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Sockets made (untimed) before each timed run of connects: fewer than the default limit
/// of 1,024 descriptors.
const SOCKETS: usize = 512;

/// connect(`to`:[`PORT`]) of `n` fresh UDP sockets (each made before and closed after its
/// batch, untimed: the hook's reverse entry is keyed by the socket, so each connect is a new
/// connection's): ns per connect, or the first error.
fn connects(to: Ipv4Addr, n: usize) -> Result<f64, String> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (mut timed, mut done) = (Duration::ZERO, 0);
    while done < n {
        let k = SOCKETS.min(n - done);
        let mut fds = Vec::with_capacity(k);
        let mut err = None;
        for _ in 0..k {
            // SAFETY: a plain system call.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                err = Some(format!("socket: {}", std::io::Error::last_os_error()));
                break;
            }
            fds.push(fd);
        }
        let t = Instant::now();
        if err.is_none() {
            for &fd in &fds {
                // SAFETY: `fd` is a socket this loop owns; `sa` outlives the call.
                let rc = unsafe {
                    libc::connect(
                        fd,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if rc != 0 {
                    err = Some(format!(
                        "connect to {to}:{PORT}: {}",
                        std::io::Error::last_os_error()
                    ));
                    break;
                }
            }
        }
        timed += t.elapsed();
        for fd in fds {
            // SAFETY: closing a descriptor this loop owns.
            unsafe { libc::close(fd) };
        }
        if let Some(e) = err {
            return Err(e);
        }
        done += k;
    }
    Ok(timed.as_nanos() as f64 / n as f64)
}

/// The agent's `sock_translated` verdict count.
fn translated(a: &AgentProc) -> u64 {
    agent_status(a)["verdicts"]["sock_translated"]
        .as_u64()
        .unwrap_or(0)
}

/// Measure (bounded: `rounds` × 2 batches of `n` connects).
pub fn measure(ctx: &Ctx, rounds: usize, n: usize) -> Result<VipCost, String> {
    let cg = Cgroup::new()?;
    let mut bed = Bed::new(ctx, 3);
    bed.baseline_down();
    let cgroup = cg
        .dir
        .to_str()
        .ok_or("cgroup path is not UTF-8")?
        .to_string();
    let agent = AgentProc::start(
        &bed.node,
        &bed.state,
        &["--hook", "xdp", "--cgroup", &cgroup],
        Some(1),
    );
    util::log(
        ctx.start,
        "xdp: VIP connects: agent ready, hooks on a cgroup of this process",
    );
    let before = translated(&agent);
    Cgroup::enter(&cg.dir)?;
    let task = bed.tasks[0].ns.path();
    let res = util::within(&task, move || -> Result<Vec<(f64, f64)>, String> {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        // Warm-up, then rounds alternating plain and VIP.
        connects(PLAIN, n / 10)?;
        connects(VIP, n / 10)?;
        let mut out = Vec::new();
        for _ in 0..rounds {
            if util::interrupted() {
                break;
            }
            let plain = connects(PLAIN, n)?;
            let vip = connects(VIP, n)?;
            out.push((plain, vip));
        }
        Ok(out)
    });
    let left = Cgroup::enter(&cg.root);
    let after = translated(&agent);
    drop(agent);
    drop(bed);
    left?;
    let samples = res?;
    let plain: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let vip: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let above: Vec<f64> = samples.iter().map(|s| s.1 - s.0).collect();
    Ok(VipCost {
        vip_ns: stat(&vip),
        plain_ns: stat(&plain),
        above: stat(&above),
        translated: after.saturating_sub(before),
        expected: (n / 10 + samples.len() * n) as u64,
        per_batch: n,
    })
}
