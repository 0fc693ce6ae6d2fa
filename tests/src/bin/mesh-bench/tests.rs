//! The benchmark's pure logic: statistics, per-round comparisons with the baseline, the
//! parsing of wrk's report, the sub-second loads of --quick, number formatting.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{
    e2e::{of, per_round, share_above_direct},
    util::{fmt_num, fmt_signed, load_args, parse_wrk, stat},
};

/// One round: mode → its runs (load → figures).
fn round(modes: &[(&'static str, Value)]) -> BTreeMap<&'static str, Value> {
    modes.iter().cloned().collect()
}

fn close_cpu(us: f64) -> Value {
    json!({ "close": { "cpu_us_per_req": us, "rps": 10_000.0 } })
}

#[test]
fn stat_is_the_median_with_the_spread_and_skips_what_is_not_a_number() {
    let s = stat(&[3.0, 1.0, 2.0]);
    assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
    assert_eq!(
        stat(&[4.0, 1.0, 2.0, 3.0]).median,
        2.5,
        "even count: mean of the middle two"
    );
    let s = stat(&[f64::NAN, 5.0, f64::INFINITY]);
    assert_eq!((s.median, s.n), (5.0, 1));
    assert_eq!(s.show(1), "5.0", "one sample: no spread shown");
    let none = stat(&[]);
    assert_eq!(none.n, 0);
    assert_eq!(none.show(1), "n/a");
    assert_eq!(stat(&[1.0, 2.0, 30.0]).show(0), "2 (1–30)");
}

/// "Ratios and differences against a baseline are computed per round, then their median is
/// taken": not the difference of the medians, which pairs runs of different rounds.
#[test]
fn differences_to_direct_are_taken_per_round_then_the_median() {
    // direct is noisy (100, 140, 120); mesh stays 5 µs above it in every round.
    let rounds = vec![
        round(&[("direct", close_cpu(100.0)), ("mesh-tc", close_cpu(105.0))]),
        round(&[("direct", close_cpu(140.0)), ("mesh-tc", close_cpu(145.0))]),
        round(&[("direct", close_cpu(120.0)), ("mesh-tc", close_cpu(125.0))]),
    ];
    let (d, clean) = per_round(
        &rounds,
        "mesh-tc",
        "close",
        "close",
        "cpu_us_per_req",
        |m, d| m - d,
    );
    assert!(clean);
    assert_eq!((d.median, d.min, d.max, d.n), (5.0, 5.0, 5.0, 3));
    let (r, _) = per_round(&rounds, "mesh-tc", "close", "close", "rps", |m, d| m / d);
    assert_eq!(r.median, 1.0);
    assert_eq!(
        of(&rounds, "direct", "close", "cpu_us_per_req").median,
        120.0
    );
}

#[test]
fn a_round_disturbed_by_other_work_is_left_out_of_the_comparison() {
    let mut noisy = close_cpu(180.0);
    noisy["close"]["disturbed"] = json!(true);
    let rounds = vec![
        round(&[("direct", close_cpu(100.0)), ("mesh-xdp", close_cpu(102.0))]),
        round(&[("direct", close_cpu(100.0)), ("mesh-xdp", noisy.clone())]),
        round(&[("direct", close_cpu(100.0)), ("mesh-xdp", close_cpu(104.0))]),
    ];
    let (d, clean) = per_round(
        &rounds,
        "mesh-xdp",
        "close",
        "close",
        "cpu_us_per_req",
        |m, d| m - d,
    );
    assert!(clean);
    assert_eq!(
        (d.median, d.n),
        (3.0, 2),
        "the disturbed round (+80) is not judged"
    );
    assert_eq!(of(&rounds, "mesh-xdp", "close", "cpu_us_per_req").n, 2);
    // Every round disturbed: all are shown, flagged as not clean (the report marks them †
    // and does not judge the target).
    let all: Vec<_> = (0..3)
        .map(|_| round(&[("direct", close_cpu(100.0)), ("mesh-xdp", noisy.clone())]))
        .collect();
    let (d, clean) = per_round(
        &all,
        "mesh-xdp",
        "close",
        "close",
        "cpu_us_per_req",
        |m, d| m - d,
    );
    assert!(!clean);
    assert_eq!((d.median, d.n), (80.0, 3));
    // A failed run has no figure: the round drops out.
    let failed = vec![round(&[
        ("direct", close_cpu(100.0)),
        ("mesh-xdp", json!({"close": {"error": "wrk failed"}})),
    ])];
    assert_eq!(
        per_round(
            &failed,
            "mesh-xdp",
            "close",
            "close",
            "cpu_us_per_req",
            |m, d| m - d
        )
        .0
        .n,
        0
    );
}

#[test]
fn the_share_of_iptables_cost_compares_the_cost_above_direct_of_both() {
    let rounds = vec![
        // mesh +2 µs, iptables +10 µs above direct: 0.2 ("5× less").
        round(&[
            ("direct", close_cpu(100.0)),
            ("iptables", close_cpu(110.0)),
            ("mesh-tc", close_cpu(102.0)),
        ]),
        round(&[
            ("direct", close_cpu(120.0)),
            ("iptables", close_cpu(140.0)),
            ("mesh-tc", close_cpu(122.0)),
        ]),
        // iptables at or below direct in this round: no share to take.
        round(&[
            ("direct", close_cpu(100.0)),
            ("iptables", close_cpu(99.0)),
            ("mesh-tc", close_cpu(101.0)),
        ]),
    ];
    let (s, clean) = share_above_direct(&rounds, "mesh-tc", "iptables", "close");
    assert!(clean);
    assert_eq!(s.n, 2);
    assert!(
        (s.median - 0.15).abs() < 1e-9,
        "median of 0.2 and 0.1: {}",
        s.median
    );
}

#[test]
fn wrk_reports_are_parsed_also_when_ended_by_sigint() {
    // wrk 4.1 ended by SIGINT after 0.5 s (--quick): the time it ran, not -d.
    let cut = "Running 6s test @ http://198.18.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.31ms    2.34ms  15.09ms   67.64%
    Req/Sec   744.80     24.41   770.00     60.00%
  371 requests in 500.70ms, 806.49KB read
Requests/sec:    740.96
Transfer/sec:      1.57MB
";
    let w = parse_wrk(cut, false);
    assert_eq!(
        (w.requests, w.rps, w.errors),
        (Some(371.0), Some(740.96), 0)
    );
    assert!(w.pct.is_empty());
    let full = "Running 3s test @ http://198.18.0.1:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    80.12us   30.01us   1.20ms   90.00%
  Latency Distribution
     50%   75.00us
     75%   80.00us
     90%    1.10ms
     99%    2.00s
  36000 requests in 3.00s, 5.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  12000.00
";
    let w = parse_wrk(full, true);
    assert_eq!((w.requests, w.rps), (Some(36_000.0), Some(12_000.0)));
    assert_eq!(
        w.errors, 10,
        "socket errors of every kind plus non-2xx answers"
    );
    let pct: Vec<(&str, f64)> = w.pct.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(pct, [("50", 75.0), ("90", 1_100.0), ("99", 2_000_000.0)]);
    assert_eq!(
        parse_wrk(
            "unable to connect to 198.18.0.1:8080 Connection refused\n",
            false
        )
        .requests,
        None
    );
}

#[test]
fn sub_second_loads_are_a_longer_wrk_ended_by_sigint() {
    let (d, cut) = load_args(3.0);
    assert_eq!(d, "3s");
    assert!(cut.is_empty(), "whole seconds: wrk's own -d");
    let (d, cut) = load_args(0.5);
    assert_eq!(d, "6s", "longer than the load, so SIGINT ends it");
    assert_eq!(cut, ["timeout", "--preserve-status", "-s", "INT", "0.5"]);
}

#[test]
fn numbers_are_formatted_with_separators_and_signs() {
    assert_eq!(fmt_num(1_234_567.0, 0), "1,234,567");
    assert_eq!(fmt_num(-1_234.5, 1), "-1,234.5");
    assert_eq!(
        fmt_num(-0.001, 2),
        "0.00",
        "no minus on a value shown as zero"
    );
    assert_eq!(fmt_num(f64::NAN, 1), "n/a");
    assert_eq!(fmt_signed(2.0, 2), "+2.00");
    assert_eq!(fmt_signed(-14.29, 2), "-14.29");
}

/// A toy DNS server for the load's tests: 127.0.0.11:53 in its own namespace, answering each
/// query with `reply(query)` (`None`: silence) until dropped.
struct ToyDns {
    _ns: mesh_tests::Netns,
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ToyDns {
    fn start(reply: fn(&[u8]) -> Option<Vec<u8>>) -> ToyDns {
        use std::{os::fd::AsFd, sync::atomic::Ordering};
        let ns = mesh_tests::Netns::new("dl");
        let path = ns.path();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (file, halt) = (
            std::fs::File::open(&path).expect("open the netns"),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let s = std::net::UdpSocket::bind("127.0.0.11:53").expect("bind 127.0.0.11:53");
            s.set_read_timeout(Some(std::time::Duration::from_millis(20)))
                .expect("timeout");
            ready_tx.send(()).expect("signal ready");
            let mut buf = [0u8; 512];
            while !halt.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf)
                    && let Some(r) = reply(&buf[..n])
                {
                    let _ = s.send_to(&r, from);
                }
            }
        });
        ready.recv().expect("the toy server started");
        ToyDns {
            _ns: ns,
            path,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ToyDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The query with QR set and one A record for `addr` appended.
fn answer_with(q: &[u8], addr: [u8; 4]) -> Vec<u8> {
    let mut r = q.to_vec();
    r[2] |= 0x80;
    r[6..8].copy_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&addr);
    r
}

fn saturate_toy(reply: fn(&[u8]) -> Option<Vec<u8>>, secs: f64) -> crate::dns_load::LoadCounts {
    let toy = ToyDns::start(reply);
    let expect = [10, 0, 0, 1];
    let (c, took) = crate::dns_load::saturate(&toy.path, secs, crate::dns::query(0), move |r| {
        r.len() >= 2 && crate::dns::answers(r, u16::from_be_bytes([r[0], r[1]]), expect)
    })
    .expect("the load ran");
    assert!(
        took >= secs && took < secs + 1.0,
        "bounded in time: {took} s for {secs} s"
    );
    c
}

/// The saturating DNS load counts only correct answers, keeps at most its window outstanding,
/// and counts wrong answers and silence as such.
#[test]
fn the_batched_dns_load_counts_correct_answers_wrong_ones_and_silence() {
    use crate::dns_load::{SOCKETS, WINDOW};
    let outstanding = (SOCKETS * WINDOW) as u64;
    let c = saturate_toy(|q| Some(answer_with(q, [10, 0, 0, 1])), 0.3);
    assert!(
        c.answered > 1_000,
        "a correct server is answered many times: {c:?}"
    );
    assert_eq!((c.wrong, c.lost), (0, 0), "{c:?}");
    assert!(
        c.sent >= c.answered && c.sent - c.answered <= outstanding,
        "at most the window in flight: {c:?}"
    );

    let c = saturate_toy(|q| Some(answer_with(q, [10, 0, 0, 9])), 0.3);
    assert_eq!(c.answered, 0, "another address is not an answer: {c:?}");
    assert!(c.wrong > 1_000, "{c:?}");

    // Silence: the first window goes out, is given up on after the stall, and is asked again.
    let c = saturate_toy(|_| None, 0.5);
    assert_eq!((c.answered, c.wrong), (0, 0));
    assert!(
        c.lost >= outstanding && c.sent >= c.lost + outstanding,
        "window lost, then resent: {c:?}"
    );
}
