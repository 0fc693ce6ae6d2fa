//! Shared pieces of the benchmark: statistics, CPU accounting, bounded commands, machine
//! facts, the results model (checks against targets, findings) and cleanup of everything
//! the run creates.

use std::{
    collections::BTreeSet,
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
        return Stat { median: f64::NAN, min: f64::NAN, max: f64::NAN, n: 0, samples: samples.to_vec() };
    }
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Stat { median, min: v[0], max: v[n - 1], n, samples: samples.to_vec() }
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
        format!("{} ({}–{})", fmt_num(self.median, digits), fmt_num(self.min, digits), fmt_num(self.max, digits))
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
    if x >= 0.0 { format!("+{}", fmt_num(x, digits)) } else { fmt_num(x, digits) }
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
            let f: Vec<u64> = l.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
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
    let ticks: u64 = after.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).sum();
    ticks as f64 / clock_ticks_per_sec()
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
    c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
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
    Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() }
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
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
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
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
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

/// Sleep in small steps, stopping early on a signal.
pub fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt();
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
}

/// Everything a guard should have removed, swept once more at exit (a guard that never ran
/// because of a double panic or an abort path).
static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers { netns: BTreeSet::new(), pins: BTreeSet::new() });

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
        Leftovers { netns: BTreeSet::new(), pins: BTreeSet::new() },
    );
    for ns in l.netns {
        if Path::new("/run/netns").join(&ns).exists() {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
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
                fs::write(&path, value).unwrap_or_else(|e| panic!("cannot set {}: {e}", path.display()));
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
    let ncpu = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let virt = Command::new("systemd-detect-virt")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            if cpuinfo.contains(" hypervisor") { "a hypervisor (cpu flag)".into() } else { "unknown".into() }
        });
    let jit = fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").unwrap_or_default().trim().to_string();
    let git = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"])
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
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
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
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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
    pub fn check(&mut self, section: &str, what: &str, result: String, target: &str, met: Option<bool>) {
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
    s.push_str(&format!("|{}\n", header.iter().map(|h| if h.is_empty() { "---|" } else { "---|" }).collect::<String>()));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
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
