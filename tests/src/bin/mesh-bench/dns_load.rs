//! A DNS load that saturates the server, not itself.
//!
//! On this 2-CPU bed dnsperf (one query per sendto/recvfrom, on CPU 0) runs out of CPU 0 at
//! about the rate a fast server answers on CPU 1: both CPUs near 100 %, and the figure is
//! dnsperf's, not the server's. This load asks from a few connected UDP sockets with
//! sendmmsg(2)/recvmmsg(2) batches, keeping a fixed number of queries outstanding per socket
//! (as dnsperf's `-q` does), so its own cost per query is a fraction of dnsperf's and the
//! server's CPU is what runs out. Bounded in time; every answer is checked (a response with
//! the A record the server must give), and a socket whose answers stop for
//! [`STALL`] counts its outstanding queries as lost and asks again.

use std::{
    net::UdpSocket,
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::util;

/// Connected sockets the load asks from (dnsperf -c 4: as many).
pub const SOCKETS: usize = 4;
/// Queries outstanding per socket: 128 in all (dnsperf's default `-q` is 100).
pub const WINDOW: usize = 32;
/// Datagrams per sendmmsg/recvmmsg call.
const BATCH: usize = 32;
/// A socket with queries outstanding and no answer for this long counts them lost.
const STALL: Duration = Duration::from_millis(200);

/// What one run of the load saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadCounts {
    /// Queries sent.
    pub sent: u64,
    /// Correct answers received before the deadline.
    pub answered: u64,
    /// Datagrams received that were not a correct answer.
    pub wrong: u64,
    /// Queries given up on (no answer within [`STALL`]).
    pub lost: u64,
}

/// One socket's receive or send batch: buffers and the headers pointing into them.
struct Mmsg {
    bufs: Vec<[u8; 512]>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Mmsg {
    fn new() -> Self {
        Self {
            bufs: vec![[0; 512]; BATCH],
            // SAFETY: all-zero is a valid iovec / mmsghdr.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// Point the first `n` headers at the first `n` buffers, `lens[i]` bytes each (no
    /// address: the sockets are connected).
    fn point(&mut self, n: usize, len: impl Fn(usize) -> usize) {
        for i in 0..n {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: len(i),
            };
            let h = &mut self.hdrs[i];
            // SAFETY: all-zero is a valid msghdr.
            h.msg_hdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_len = 0;
        }
    }
}

/// Ask the server at 127.0.0.11:53 inside the namespace at `netns` for `secs` seconds
/// (this thread pinned to CPU 0), each query `query` with its ID (the first two bytes)
/// counting up; an answer is correct when `correct(datagram)` says so. Returns the counts and the seconds actually measured.
pub fn saturate(
    netns: &Path,
    secs: f64,
    query: Vec<u8>,
    correct: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Result<(LoadCounts, f64), String> {
    util::within(netns, move || {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        let mut socks = Vec::with_capacity(SOCKETS);
        for _ in 0..SOCKETS {
            let s =
                UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind a UDP socket: {e}"))?;
            s.connect("127.0.0.11:53")
                .map_err(|e| format!("connect to 127.0.0.11:53: {e}"))?;
            s.set_nonblocking(true)
                .map_err(|e| format!("non-blocking socket: {e}"))?;
            socks.push(s);
        }
        let template = query;
        let qlen = template.len();
        let mut tx = Mmsg::new();
        for b in &mut tx.bufs {
            b[..qlen].copy_from_slice(&template);
        }
        let mut rx = Mmsg::new();
        let mut counts = LoadCounts::default();
        let mut outstanding = [0usize; SOCKETS];
        let mut last_answer = [Instant::now(); SOCKETS];
        let mut id: u16 = 0;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        loop {
            let now = Instant::now();
            if now >= end || util::interrupted() {
                break;
            }
            let mut progress = false;
            for (i, s) in socks.iter().enumerate() {
                let fd = s.as_raw_fd();
                rx.point(BATCH, |_| 512);
                // SAFETY: the headers point at buffers owned by `rx` that outlive the call.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        rx.hdrs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    let n = n as usize;
                    for k in 0..n {
                        let len = (rx.hdrs[k].msg_len as usize).min(512);
                        if correct(&rx.bufs[k][..len]) {
                            counts.answered += 1;
                        } else {
                            counts.wrong += 1;
                        }
                    }
                    outstanding[i] = outstanding[i].saturating_sub(n);
                    last_answer[i] = now;
                    progress = true;
                } else if outstanding[i] > 0 && now.duration_since(last_answer[i]) > STALL {
                    counts.lost += outstanding[i] as u64;
                    outstanding[i] = 0;
                }
                let want = (WINDOW - outstanding[i]).min(BATCH);
                if want == 0 {
                    continue;
                }
                for b in &mut tx.bufs[..want] {
                    b[..2].copy_from_slice(&id.to_be_bytes());
                    id = id.wrapping_add(1);
                }
                tx.point(want, |_| qlen);
                // SAFETY: the first `want` headers point at buffers owned by `tx`.
                let sent = unsafe {
                    libc::sendmmsg(fd, tx.hdrs.as_mut_ptr(), want as u32, libc::MSG_DONTWAIT)
                };
                if sent > 0 {
                    if outstanding[i] == 0 {
                        last_answer[i] = now;
                    }
                    outstanding[i] += sent as usize;
                    counts.sent += sent as u64;
                    progress = true;
                }
            }
            if !progress {
                // Nothing to read and every window full: wait for an answer (bounded).
                let mut fds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: `fds` is a valid array of pollfd for the call.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
            }
        }
        Ok((counts, start.elapsed().as_secs_f64()))
    })
}

/// One saturating run with the CPUs' busy time around it: queries/s, the busy share of
/// CPU 0 (the load) and CPU 1 (the server), and the server CPU's µs per answer.
pub fn measure(
    netns: &Path,
    secs: f64,
    query: Vec<u8>,
    correct: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Value {
    let before = util::cpu_busy_ticks();
    match saturate(netns, secs, query, correct) {
        Ok((c, took)) => {
            let cpus = util::cpu_busy_each(&before, &util::cpu_busy_ticks(), took);
            let mut v = json!({
                "qps": c.answered as f64 / took,
                "sent": c.sent,
                "answered": c.answered,
                "wrong": c.wrong,
                "lost": c.lost,
                "secs": took,
                "sockets": SOCKETS,
                "window": WINDOW,
            });
            add_cpu(&mut v, &cpus, c.answered);
            v
        }
        Err(e) => json!({ "error": e }),
    }
}

/// Record the load CPU's and the server CPU's busy shares, and the server CPU's time per
/// answer, into `v`.
pub fn add_cpu(v: &mut Value, busy_share: &[f64], answered: u64) {
    let (c0, c1) = (
        busy_share.first().copied().unwrap_or(f64::NAN),
        busy_share.get(1).copied().unwrap_or(f64::NAN),
    );
    v["cpu0_busy"] = json!(c0);
    v["cpu1_busy"] = json!(c1);
    let secs = v["secs"].as_f64().unwrap_or(f64::NAN);
    v["server_cpu_us_per_query"] = json!(if answered > 0 {
        c1 * secs / answered as f64 * 1e6
    } else {
        f64::NAN
    });
}
