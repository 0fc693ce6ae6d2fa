//! Shared pieces of the benchmark: statistics, CPU accounting, bounded commands, machine
//! facts, the results model (checks against targets, findings) and cleanup of everything
//! the run creates.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// Median and spread of a set of samples (one per round or per repetition).
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    pub samples: Vec<f64>,
}

pub fn stat(samples: &[f64]) -> Stat {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            n: 0,
            samples: samples.to_vec(),
        };
    }
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
        samples: samples.to_vec(),
    }
}

impl Stat {
    /// `median (min–max)` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        if self.n == 1 {
            return fmt_num(self.median, digits);
        }
        format!(
            "{} ({}–{})",
            fmt_num(self.median, digits),
            fmt_num(self.min, digits),
            fmt_num(self.max, digits)
        )
    }
}

/// A number with thousands separators (integers) or fixed decimals.
pub fn fmt_num(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let s = format!("{:.*}", digits, x.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (s.clone(), None),
    };
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(&f);
    }
    if x < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        out.insert(0, '-');
    }
    out
}

/// Signed, for differences: `+1.23` / `-0.40`.
pub fn fmt_signed(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x >= 0.0 {
        format!("+{}", fmt_num(x, digits))
    } else {
        fmt_num(x, digits)
    }
}

pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

// ---------------------------------------------------------------------------------------
// CPU accounting (/proc/stat)
// ---------------------------------------------------------------------------------------

/// Busy time of every CPU, in clock ticks: user + nice + system + irq + softirq.
pub fn cpu_busy_ticks() -> Vec<u64> {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(|b| b.is_ascii_digit()))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal guest guest_nice
            f.first().copied().unwrap_or(0)
                + f.get(1).copied().unwrap_or(0)
                + f.get(2).copied().unwrap_or(0)
                + f.get(5).copied().unwrap_or(0)
                + f.get(6).copied().unwrap_or(0)
        })
        .collect()
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Busy CPU seconds of all CPUs between two samples.
pub fn cpu_busy_secs(before: &[u64], after: &[u64]) -> f64 {
    let ticks: u64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    ticks as f64 / clock_ticks_per_sec()
}

/// Busy share (0..1) of each CPU between two samples taken `secs` apart.
pub fn cpu_busy_each(before: &[u64], after: &[u64], secs: f64) -> Vec<f64> {
    let tick = clock_ticks_per_sec();
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b) as f64 / tick / secs)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Bounded commands
// ---------------------------------------------------------------------------------------

/// Run a command with a hard time limit (killed past it). `ns`: run inside that netns.
pub fn run_bounded(ns: Option<&str>, cmd: &str, args: &[&str], limit: Duration) -> Output {
    let mut c = match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, cmd]);
            c
        }
        None => Command::new(cmd),
    };
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    // Drain the pipes on threads so a chatty command cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > deadline || interrupted() {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Like [`run_bounded`] but panics (with the output) when the command fails.
#[track_caller]
pub fn must(ns: Option<&str>, cmd: &str, args: &[&str], limit: Duration) -> Output {
    let out = run_bounded(ns, cmd, args, limit);
    if !out.status.success() {
        panic!(
            "{}{cmd} {} failed ({}): {}{}",
            ns.map(|n| format!("[{n}] ")).unwrap_or_default(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// Interruption and cleanup
// ---------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag; the run stops at the next check and unwinds through every
/// guard (namespaces, processes, pins) instead of dying with them in place.
pub fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let _ = sigaction(s, &act);
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Panic (and so unwind through the guards) when the run was interrupted.
pub fn check_interrupt() {
    if interrupted() {
        panic!("interrupted by a signal");
    }
}

/// Everything a guard should have removed, swept once more at exit (a guard that never ran
/// because of a double panic or an abort path).
static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    netns: BTreeSet::new(),
    pins: BTreeSet::new(),
});

struct Leftovers {
    netns: BTreeSet<String>,
    pins: BTreeSet<PathBuf>,
}

pub fn track_netns(name: &str) {
    LEFTOVERS.lock().unwrap().netns.insert(name.to_string());
}

pub fn track_pins(dir: &Path) {
    LEFTOVERS.lock().unwrap().pins.insert(dir.to_path_buf());
}

/// Remove a pin directory and the pins in it (ignoring what is already gone).
pub fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Final sweep: namespaces (killing what runs in them) and pin directories left behind.
pub fn sweep_leftovers() -> Vec<String> {
    let mut swept = Vec::new();
    let l = std::mem::replace(
        &mut *LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner()),
        Leftovers {
            netns: BTreeSet::new(),
            pins: BTreeSet::new(),
        },
    );
    for ns in l.netns {
        if Path::new("/run/netns").join(&ns).exists() {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            swept.push(format!("netns {ns}"));
        }
    }
    for p in l.pins {
        if p.exists() {
            remove_pin_dir(&p);
            swept.push(format!("pins {}", p.display()));
        }
    }
    swept
}

/// A sysctl set for the duration of a guard, restored on drop.
pub struct SysctlGuard {
    path: PathBuf,
    old: Option<String>,
}

impl SysctlGuard {
    /// Set `path` (under /proc/sys) to `value` if it differs; remember the old value.
    pub fn set(path: &str, value: &str) -> SysctlGuard {
        let path = PathBuf::from(path);
        let cur = fs::read_to_string(&path).map(|s| s.trim().to_string()).ok();
        let old = match &cur {
            Some(c) if c != value => {
                fs::write(&path, value)
                    .unwrap_or_else(|e| panic!("cannot set {}: {e}", path.display()));
                Some(c.clone())
            }
            _ => None,
        };
        SysctlGuard { path, old }
    }

    pub fn changed(&self) -> bool {
        self.old.is_some()
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = fs::write(&self.path, old);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Machine facts
// ---------------------------------------------------------------------------------------

pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let ncpu = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let virt = Command::new("systemd-detect-virt")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            if cpuinfo.contains(" hypervisor") {
                "a hypervisor (cpu flag)".into()
            } else {
                "unknown".into()
            }
        });
    let jit = fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .unwrap_or_default()
        .trim()
        .to_string();
    let git = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "cpu": model,
        "cpus": ncpu,
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "virtualization": virt,
        "bpf_jit_enable": jit,
        "git": git,
    })
}

/// Now as an RFC 3339 UTC timestamp (no external crate).
pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// VmRSS and VmHWM of this process, in MiB.
pub fn rss_mib() -> (f64, f64) {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

// ---------------------------------------------------------------------------------------
// Results: checks against targets, findings, sections
// ---------------------------------------------------------------------------------------

/// One headline number beside its target.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub section: String,
    pub what: String,
    pub result: String,
    pub target: String,
    /// `None`: no target, or nothing measured.
    pub met: Option<bool>,
}

/// What the run found, collected by every scenario and written into the report.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub checks: Vec<Check>,
    pub findings: Vec<String>,
}

impl Outcome {
    pub fn check(
        &mut self,
        section: &str,
        what: &str,
        result: String,
        target: &str,
        met: Option<bool>,
    ) {
        self.checks.push(Check {
            section: section.into(),
            what: what.into(),
            result,
            target: target.into(),
            met,
        });
    }

    pub fn finding(&mut self, s: impl Into<String>) {
        self.findings.push(s.into());
    }
}

/// One scenario's share of the report.
pub struct Section {
    pub key: &'static str,
    pub json: Value,
    pub markdown: String,
}

/// Markdown table from a header and rows.
pub fn md_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    s.push_str(&format!("| {} |\n", header.join(" | ")));
    s.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// The three load tables both end-to-end scenarios print, one row per mode: new connections
/// (`conn`: mode, conn/s, × direct, CPU µs per conn, µs above direct), keep-alive requests
/// (`ka`, the same per request) and one-connection latency (`lat`: mode, p50, p50 above
/// direct, p99), whose title gets `lat_note` appended.
pub fn md_load_tables(
    conn: &[Vec<String>],
    ka: &[Vec<String>],
    lat: &[Vec<String>],
    lat_note: &str,
) -> String {
    let mut md = String::from("**New connections** (wrk -t1 -c16, `Connection: close`)\n\n");
    md.push_str(&md_table(
        &[
            "mode",
            "conn/s",
            "× direct",
            "CPU µs per conn",
            "µs above direct",
        ],
        conn,
    ));
    md.push_str("\n**Keep-alive requests** (wrk -t1 -c16)\n\n");
    md.push_str(&md_table(
        &[
            "mode",
            "req/s",
            "× direct",
            "CPU µs per req",
            "µs above direct",
        ],
        ka,
    ));
    md.push_str(&format!(
        "\n**Latency, one connection** (wrk -t1 -c1 --latency){lat_note}\n\n"
    ));
    md.push_str(&md_table(
        &["mode", "p50 µs", "p50 above direct, µs", "p99 µs"],
        lat,
    ));
    md
}

/// The "where the extra CPU goes" table of an end-to-end section: for every mode but direct
/// (`(key, title)`), each profiled load against direct's in the round that has profiles.
pub fn md_profile_table(
    rounds: &[std::collections::BTreeMap<&'static str, Value>],
    modes: &[(&str, &str)],
) -> String {
    let Some(r) = rounds.iter().find(|r| {
        r.get("direct")
            .is_some_and(|d| d.get("profile_close").is_some())
    }) else {
        return String::new();
    };
    let d = &r["direct"];
    let mut rows = Vec::new();
    for (key, title) in modes.iter().filter(|(k, _)| *k != "direct") {
        let Some(m) = r.get(key) else { continue };
        for (load, name) in [
            ("profile_close", "new connection"),
            ("profile_keepalive", "keep-alive request"),
        ] {
            if let Some((text, mt, dt)) = profile_diff(&m[load], &d[load], 6) {
                rows.push(vec![
                    title.to_string(),
                    name.to_string(),
                    format!("{} / {}", fmt_num(mt, 2), fmt_num(dt, 2)),
                    text,
                ]);
            }
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "\n**Where the CPU above direct goes**: each load run once more under `perf record -a -e cpu-clock -F {}` \
         (extra runs of the second round, not the measured ones), CPU time per request by symbol (idle loops left out; \
         JIT'd BPF programs by name), the mode's minus direct's, biggest first\n\n",
        PROFILE_HZ as u32
    );
    md.push_str(&md_table(
        &[
            "mode",
            "per",
            "profiled µs (mode / direct)",
            "most above direct, µs",
        ],
        &rows,
    ));
    md
}

pub fn yes_no(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "–",
    }
}

/// Log a progress line (stderr), with the time since the start.
pub fn log(start: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>6.1}s] {}", start.elapsed().as_secs_f64(), msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Background processes and namespaces
// ---------------------------------------------------------------------------------------

/// A long-running process (optionally inside a netns, optionally pinned to a CPU), its output
/// in a log file; SIGTERM then SIGKILL on drop.
pub struct Bg {
    child: Option<std::process::Child>,
    pub what: String,
    pub log: PathBuf,
}

impl Bg {
    pub fn spawn(ns: Option<&str>, cpu: Option<u32>, cmd: &str, args: &[&str], log: &Path) -> Bg {
        let mut argv: Vec<String> = Vec::new();
        if let Some(n) = ns {
            argv.extend(["ip", "netns", "exec", n].map(String::from));
        }
        if let Some(c) = cpu {
            argv.extend(["taskset".to_string(), "-c".to_string(), c.to_string()]);
        }
        argv.push(cmd.into());
        argv.extend(args.iter().map(|s| s.to_string()));
        let f = fs::File::create(log).expect("log file");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}"));
        Bg {
            child: Some(child),
            what: argv.join(" "),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. True when it exited on its own.
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
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "mesh-bench: `{}` did not stop on SIGTERM within {grace:?}: killed",
            self.what
        );
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Run `f` on a thread inside the network namespace at `path`.
pub fn within<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsFd;
    let file = fs::File::open(path).expect("open netns");
    thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// Rebuild a [`Stat`] from its JSON form.
pub fn stat_from_json(v: &Value) -> Stat {
    let s: Vec<f64> = v["samples"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    stat(&s)
}

/// Wait (bounded) until the machine is quiet: busy time of all CPUs below `max_busy` (in
/// CPUs) over a short window. Returns the busy level of the last window: other work on the
/// machine shows up in every CPU-time figure, so it is recorded with each run.
pub fn quiet_gate(max_busy: f64, limit: Duration) -> f64 {
    let end = Instant::now() + limit;
    loop {
        check_interrupt();
        let a = cpu_busy_ticks();
        let t = Instant::now();
        thread::sleep(Duration::from_millis(100));
        let busy = cpu_busy_secs(&a, &cpu_busy_ticks()) / t.elapsed().as_secs_f64();
        if busy <= max_busy || Instant::now() > end {
            return busy;
        }
    }
}

// ---------------------------------------------------------------------------------------
// CPU used by other work on the machine
// ---------------------------------------------------------------------------------------

/// utime+stime and cutime+cstime (ticks), parent pid and kernel-thread flag of every
/// process.
/// Per pid: utime+stime, cutime+cstime (ticks), parent pid, kernel thread.
type ProcTable = std::collections::HashMap<i32, (u64, u64, i32, bool)>;

fn proc_table() -> ProcTable {
    proc_table_named().0
}

/// [`proc_table`] plus the pids of kernel threads other than ksoftirqd (kworkers: e.g. the
/// asynchronous cleanup of network namespaces other work deletes).
fn proc_table_named() -> (ProcTable, BTreeSet<i32>) {
    let mut workers = BTreeSet::new();
    let mut m = std::collections::HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return (m, workers);
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ppid = f.get(1).and_then(|x| x.parse::<i32>().ok()).unwrap_or(0);
        let kthread = n(6) & 0x0020_0000 != 0;
        if kthread && !s.contains("(ksoftirqd/") {
            workers.insert(pid);
        }
        m.insert(pid, (n(11) + n(12), n(13) + n(14), ppid, kthread));
    }
    (m, workers)
}

/// CPU time used by processes that are neither this benchmark's (itself and its
/// descendants: load generators, servers, proxies, the agent) nor kernel threads, between
/// [`Foreign::start`] and [`Foreign::secs`]. Children such processes reap during the window
/// count in full (their parent's cutime), so this errs on the side of "disturbed".
pub struct Foreign {
    before: std::collections::HashMap<i32, (u64, u64, i32, bool)>,
}

impl Foreign {
    pub fn start() -> Foreign {
        Foreign {
            before: proc_table(),
        }
    }

    pub fn secs(&self) -> f64 {
        self.split().0
    }

    /// (foreign processes, kernel worker threads other than ksoftirqd) CPU seconds.
    pub fn split(&self) -> (f64, f64) {
        let (after, workers) = proc_table_named();
        let me = std::process::id() as i32;
        let ours = |mut pid: i32| {
            for _ in 0..64 {
                if pid == me {
                    return true;
                }
                match after.get(&pid).or_else(|| self.before.get(&pid)) {
                    Some(p) if p.2 > 1 => pid = p.2,
                    _ => return false,
                }
            }
            false
        };
        let mut ticks = 0u64;
        let mut kticks = 0u64;
        for (pid, a) in &after {
            let b = self.before.get(pid).copied().unwrap_or((0, 0, 0, false));
            let d = a.0.saturating_sub(b.0) + a.1.saturating_sub(b.1);
            if workers.contains(pid) {
                kticks += d;
            }
            if a.3 || ours(*pid) {
                continue;
            }
            ticks += d;
        }
        (
            ticks as f64 / clock_ticks_per_sec(),
            kticks as f64 / clock_ticks_per_sec(),
        )
    }
}

/// A cheap profile: `perf record -e cpu-clock` (software clock sampling: this VM has no
/// hardware PMU) on `target` (e.g. `["-t", tid]` or `["-p", pid]`) for `secs`, while `work`
/// runs (called until the recording ends, bounded). Returns the symbols with ≥ 2% of the
/// samples, largest first.
pub fn perf_top(target: &[&str], secs: f64, mut work: impl FnMut()) -> Option<Vec<(f64, String)>> {
    let dir = tempfile::tempdir().ok()?;
    let data = dir.path().join("perf.data");
    let mut args = vec!["record", "-q", "-e", "cpu-clock", "-F", "4999"];
    args.extend_from_slice(target);
    let secs_s = format!("{secs}");
    let data_s = data.to_str()?.to_string();
    args.extend(["-o", &data_s, "--", "sleep", &secs_s]);
    let mut perf = Command::new("perf")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    thread::sleep(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 5.0);
    loop {
        work();
        if matches!(perf.try_wait(), Ok(Some(_))) || Instant::now() > deadline || interrupted() {
            break;
        }
    }
    let _ = perf.kill();
    let _ = perf.wait();
    let out = run_bounded(
        None,
        "perf",
        &[
            "report",
            "-i",
            &data_s,
            "--sort",
            "sym",
            "--stdio",
            "--percent-limit",
            "2",
        ],
        Duration::from_secs(60),
    );
    let rows: Vec<(f64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('%'))
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            let sym = rest
                .trim()
                .trim_start_matches("[k]")
                .trim_start_matches("[.]")
                .trim();
            // JIT'd BPF programs: bpf_prog_<tag>_<name> → the name.
            let sym = match sym.strip_prefix("bpf_prog_") {
                Some(r) => r.split_once('_').map(|x| x.1).unwrap_or(r).to_string(),
                None => sym.chars().take(80).collect(),
            };
            Some((pct.trim().parse().ok()?, sym))
        })
        .take(10)
        .collect();
    (!rows.is_empty()).then_some(rows)
}

pub fn show_profile(p: &[(f64, String)]) -> String {
    p.iter()
        .map(|(pct, s)| format!("`{s}` {pct:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// End-to-end pieces shared by the single-node and cross-node scenarios
// ---------------------------------------------------------------------------------------

/// nginx's configuration for a task answering `name` (one worker, keep-alive, no access
/// log), written into `dir`.
fn nginx_conf(dir: &Path, name: &str) -> PathBuf {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    let text = format!(
        "worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 keepalive_requests 10000000;\n\
         \x20 keepalive_timeout 65;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n\
         \x20   listen 80 backlog=4096;\n\
         \x20   location / {{ return 200 \"{name}\\n\"; }}\n\
         \x20 }}\n\
         }}\n"
    );
    fs::write(&conf, text).expect("nginx.conf");
    conf
}

/// Arguments of `nginx` serving as task `name` from `dir` (configuration written there; runs
/// in the foreground, its pid and logs in `dir`).
pub fn nginx_args(dir: &Path, name: &str) -> Vec<String> {
    let conf = nginx_conf(dir, name);
    let p = dir.display().to_string();
    vec![
        "-p".into(),
        p.clone(),
        "-c".into(),
        conf.to_str().unwrap().into(),
        "-e".into(),
        format!("{p}/error.log"),
        "-g".into(),
        "daemon off;".into(),
    ]
}

/// A wrk duration (`850.00us`, `1.20ms`, `2.00s`) in µs.
fn parse_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

/// What one wrk run reports.
#[derive(Debug, Default, PartialEq)]
pub struct WrkSummary {
    /// Requests completed ("N requests in 3.00s" or, ended by SIGINT, "in 500.70ms").
    pub requests: Option<f64>,
    /// Requests/sec over the time it ran.
    pub rps: Option<f64>,
    /// Socket errors of every kind plus non-2xx/3xx answers.
    pub errors: u64,
    /// Latency percentiles in µs ("50", "90", "99"), with `--latency`.
    pub pct: BTreeMap<String, f64>,
}

/// Parse wrk's text report.
pub fn parse_wrk(text: &str, latency: bool) -> WrkSummary {
    let mut w = WrkSummary::default();
    for l in text.lines() {
        let l = l.trim();
        if l.contains("requests in") {
            w.requests = l
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<f64>().ok());
        } else if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if latency {
            for p in ["50%", "90%", "99%"] {
                if let Some(us) = l.strip_prefix(p).and_then(parse_dur_us) {
                    w.pct.insert(p.trim_end_matches('%').to_string(), us);
                }
            }
        }
    }
    w
}

/// Run `once` until it is not disturbed by other work on the machine (CPU used by foreign
/// processes under 5% of one CPU over the run), at most `ctx.e2e_attempts` times; keep the
/// least disturbed attempt. Every attempt starts after a bounded wait for a quiet machine.
pub fn undisturbed(ctx: &crate::Ctx, mut once: impl FnMut() -> Value) -> Value {
    let mut best: Option<(f64, Value)> = None;
    for attempt in 1..=ctx.e2e_attempts {
        let may_wait = ctx.retry_until.is_none_or(|t| Instant::now() < t);
        if attempt > 1 && !may_wait {
            break;
        }
        let gate = if !may_wait {
            Duration::ZERO
        } else if ctx.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3)
        };
        let bg = quiet_gate(0.10, gate);
        let foreign = Foreign::start();
        let t = Instant::now();
        let mut v = once();
        let wall = t.elapsed().as_secs_f64();
        let (fsecs, ksecs) = foreign.split();
        let frac = fsecs / wall;
        v["foreign_cpu_s"] = json!(fsecs);
        v["foreign_cpus"] = json!(frac);
        v["kworker_cpus"] = json!(ksecs / wall);
        v["background_busy_cpus"] = json!(bg);
        v["attempt"] = json!(attempt);
        let failed = v.get("error").is_some();
        if !failed && frac <= 0.05 {
            return v;
        }
        if best.as_ref().is_none_or(|(f, _)| {
            frac < *f || (failed && best.as_ref().is_some_and(|b| b.1.get("error").is_some()))
        }) {
            best = Some((frac, v));
        }
    }
    let mut v = best.unwrap().1;
    v["disturbed"] = json!(true);
    v
}

/// wrk's `-d` for a load of `secs`, and the command that goes before wrk to end it: wrk
/// counts whole seconds only, so a sub-second load (--quick) is a longer `-d` ended by
/// SIGINT from `timeout` after `secs`, on which wrk stops and reports what it did in the
/// time it ran ("N requests in 500.70ms"; its rate is over that time).
pub fn load_args(secs: f64) -> (String, Vec<String>) {
    if secs.fract() == 0.0 {
        (format!("{}s", secs as u64), Vec::new())
    } else {
        let cut = ["timeout", "--preserve-status", "-s", "INT"].map(String::from);
        let mut cut = cut.to_vec();
        cut.push(format!("{secs}"));
        (format!("{}s", secs.ceil() as u64 + 5), cut)
    }
}

/// How a load's length was kept, for the reports: "" for whole seconds.
pub fn load_note(secs: f64) -> &'static str {
    if secs.fract() == 0.0 {
        ""
    } else {
        " (wrk counts whole seconds: it runs with a longer `-d` and is ended by SIGINT, on which it reports the requests of the time it ran)"
    }
}

/// Per-reason packet counts of a running agent (its pinned maps), to tell how connections
/// were balanced.
fn verdicts(pins: Option<&Path>) -> Option<BTreeMap<&'static str, u64>> {
    let m = mesh_agent::ebpf::Maps::open_pinned(pins?).ok()?;
    Some(m.verdicts())
}

/// One wrk run from the client namespace `client_ns` (pinned to CPU 0), `ctx.e2e_secs` long:
/// requests served, rate, latency percentiles (`latency`), the busy CPU time of all CPUs
/// while it ran, and with `pins` (a running agent's maps) how many flows took the new-flow
/// path. The caller picks the client's source address first.
pub fn wrk_once(
    ctx: &crate::Ctx,
    client_ns: &str,
    pins: Option<&Path>,
    url: &str,
    conns: u32,
    close: bool,
    latency: bool,
) -> Value {
    wrk_run(ctx, client_ns, pins, url, conns, close, latency, None)
}

/// Samples per second of the system-wide profiles of [`wrk_profiled`].
const PROFILE_HZ: f64 = 1999.0;

/// Idle loops of a CPU with nothing to do (left out of a profile's CPU time).
fn is_idle_symbol(sym: &str) -> bool {
    sym.contains("idle") || sym.contains("safe_halt") || sym == "cpu_startup_entry"
}

/// A keep-alive or `Connection: close` load (as [`wrk_once`]) under a system-wide CPU profile
/// (`perf record -a -e cpu-clock` for exactly the load's duration): the load's figures, plus
/// `profile`: per symbol the CPU time it took per request (µs; idle loops left out; JIT'd BPF
/// programs by name), and their sum. Sampling costs a little CPU, so these loads are extra
/// runs, never the measured ones.
pub fn wrk_profiled(
    ctx: &crate::Ctx,
    client_ns: &str,
    url: &str,
    conns: u32,
    close: bool,
) -> Value {
    let Ok(dir) = tempfile::tempdir() else {
        return json!({"error": "no temporary directory"});
    };
    let data = dir.path().join("perf.data");
    let mut v = wrk_run(ctx, client_ns, None, url, conns, close, false, Some(&data));
    let Some(req) = v["requests"].as_f64().filter(|r| *r > 0.0) else {
        return v;
    };
    let data_s = data.to_string_lossy().to_string();
    let out = run_bounded(
        None,
        "perf",
        &[
            "report",
            "-i",
            &data_s,
            "--stdio",
            "--sort",
            "sym",
            "-n",
            "--percent-limit",
            "0.05",
        ],
        Duration::from_secs(120),
    );
    let mut syms = serde_json::Map::new();
    let mut total = 0.0;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let l = l.trim();
        if l.starts_with('#') || !l.contains('%') {
            continue;
        }
        // "12.34%  5678  [k] symbol"
        let mut it = l.split_whitespace();
        let (Some(_pct), Some(n), Some(_kind)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<f64>() else { continue };
        let sym = it.collect::<Vec<_>>().join(" ");
        let sym = match sym.strip_prefix("bpf_prog_") {
            Some(r) => r.split_once('_').map(|x| x.1).unwrap_or(r).to_string(),
            None => sym.chars().take(80).collect(),
        };
        if is_idle_symbol(&sym) {
            continue;
        }
        let us = n / PROFILE_HZ * 1e6 / req;
        total += us;
        let e = syms.entry(sym).or_insert(json!(0.0));
        *e = json!(e.as_f64().unwrap_or(0.0) + us);
    }
    v["profile"] = json!({"us_per_req": syms, "total_us_per_req": total, "hz": PROFILE_HZ});
    v
}

/// Where one mode's extra CPU per request goes: symbols whose µs per request (from
/// [`wrk_profiled`]) exceed the baseline's the most, as "`sym` +x.xx" (top `n`), and the
/// profiled totals (mode, baseline).
pub fn profile_diff(mode: &Value, base: &Value, n: usize) -> Option<(String, f64, f64)> {
    let (m, b) = (mode.get("profile")?, base.get("profile")?);
    let (mu, bu) = (m["us_per_req"].as_object()?, b["us_per_req"].as_object()?);
    let mut d: Vec<(f64, &str)> = mu
        .iter()
        .map(|(k, v)| {
            (
                v.as_f64().unwrap_or(0.0) - bu.get(k).and_then(Value::as_f64).unwrap_or(0.0),
                k.as_str(),
            )
        })
        .chain(
            bu.iter()
                .filter(|(k, _)| !mu.contains_key(*k))
                .map(|(k, v)| (-v.as_f64().unwrap_or(0.0), k.as_str())),
        )
        .collect();
    d.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top = d
        .iter()
        .take(n)
        .filter(|x| x.0 > 0.0)
        .map(|(x, k)| format!("`{k}` {}", fmt_signed(*x, 2)))
        .collect::<Vec<_>>()
        .join(", ");
    let less = d
        .iter()
        .rev()
        .take(3)
        .filter(|x| x.0 < 0.0)
        .map(|(x, k)| format!("`{k}` {}", fmt_signed(*x, 2)))
        .collect::<Vec<_>>()
        .join(", ");
    let text = if less.is_empty() {
        top
    } else {
        format!("{top}; less: {less}")
    };
    Some((
        text,
        m["total_us_per_req"].as_f64()?,
        b["total_us_per_req"].as_f64()?,
    ))
}

#[allow(clippy::too_many_arguments)]
fn wrk_run(
    ctx: &crate::Ctx,
    client_ns: &str,
    pins: Option<&Path>,
    url: &str,
    conns: u32,
    close: bool,
    latency: bool,
    perf_data: Option<&Path>,
) -> Value {
    let (d, cut) = load_args(ctx.e2e_secs);
    let c = conns.to_string();
    let hz = format!("{}", PROFILE_HZ as u32);
    let data_s = perf_data
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut args: Vec<&str> = Vec::new();
    if perf_data.is_some() {
        args.extend([
            "record",
            "-a",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            &hz,
            "-o",
            &data_s,
            "--",
            "taskset",
        ]);
    }
    args.extend(["-c", "0"]);
    args.extend(cut.iter().map(String::as_str));
    args.extend(["wrk", "-t1", "-c", &c, "-d", &d]);
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    if latency {
        args.push("--latency");
    }
    args.push(url);
    let v0 = verdicts(pins);
    let before = cpu_busy_ticks();
    let t = Instant::now();
    let out = run_bounded(
        Some(client_ns),
        if perf_data.is_some() {
            "perf"
        } else {
            "taskset"
        },
        &args,
        Duration::from_secs_f64(ctx.e2e_secs + 20.0),
    );
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_busy_secs(&before, &cpu_busy_ticks());
    let v1 = verdicts(pins);
    let WrkSummary {
        requests,
        rps,
        errors,
        pct,
    } = parse_wrk(&String::from_utf8_lossy(&out.stdout), latency);
    if !out.status.success() || requests.is_none() {
        return json!({"error": format!("wrk failed ({}): {}", out.status, crate::util::text(&out).chars().take(400).collect::<String>())});
    }
    let req = requests.unwrap();
    let mut v = json!({
        "requests": req,
        "rps": rps,
        "errors": errors,
        "p50_us": pct.get("50"),
        "p90_us": pct.get("90"),
        "p99_us": pct.get("99"),
        "cpu_busy_s": cpu,
        "wall_s": wall,
        "cpu_us_per_req": cpu * 1e6 / req,
    });
    if let (Some(a), Some(b)) = (v0, v1) {
        v["new_flows"] = json!(b["new_flow"] - a["new_flow"]);
        v["established_pkts"] = json!(b["established"] - a["established"]);
        v["reopened"] = json!(b["reopened"] - a["reopened"]);
    }
    v
}

/// `n` sequential requests from one curl process in `client_ns`, each on a new connection:
/// answers per body (`tally`) and in order (`sequence`).
pub fn curls(client_ns: &str, url: &str, n: usize) -> Value {
    let mut args = vec!["-s", "--max-time", "20", "-H", "Connection: close"];
    args.extend(std::iter::repeat_n(url, n));
    let out = run_bounded(Some(client_ns), "curl", &args, Duration::from_secs(30));
    let mut answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    answers.resize(n.max(answers.len()), "<no answer>".into());
    let t = mesh_tests::tally(&answers);
    json!({ "tally": t, "sequence": answers })
}
