//! Query counters, shared by every listener; read as a [`DnsStats`] snapshot (for Prometheus).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use hickory_proto::op::ResponseCode;

/// Upper bounds of the latency histogram buckets, in microseconds (the last bucket, +Inf, is
/// implicit: it is `count`).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 2_500_000, 5_000_000,
];

/// A snapshot of the DNS server's counters since [`Dns::new`](super::Dns::new).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Tasks with a listener.
    pub attached: usize,
    /// Forwards waiting for an upstream right now.
    pub inflight_forwards: usize,
    /// Responses sent by the handler, by response code. (Messages hickory cannot decode at
    /// all get FORMERR from hickory itself, or nothing if the header is short; not counted.)
    pub responses: RcodeCounts,
    /// Queries answered from the index (including NOERROR with no records).
    pub local: u64,
    /// Queries forwarded upstream (whatever the outcome).
    pub forwarded: u64,
    /// Forwards where no upstream gave a usable answer (answered SERVFAIL).
    pub forward_failures: u64,
    /// Forwards refused because too many were in flight (answered REFUSED).
    pub forward_rejected: u64,
    /// Requests dropped without an answer (responses sent to us).
    pub dropped: u64,
    /// UDP responses sent with TC set.
    pub truncated: u64,
    /// Responses that could not be sent.
    pub send_errors: u64,
    /// Latency of local answers, from the request reaching the handler to the response sent.
    pub local_latency: LatencyHistogram,
    /// Latency of forwarded queries (including failures).
    pub forward_latency: LatencyHistogram,
}

/// Responses by RCODE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcodeCounts {
    pub noerror: u64,
    pub formerr: u64,
    pub servfail: u64,
    pub nxdomain: u64,
    pub notimp: u64,
    pub refused: u64,
    /// Anything else (BADVERS, YXDOMAIN from an upstream, ...).
    pub other: u64,
}

impl RcodeCounts {
    pub fn total(&self) -> u64 {
        self.noerror
            + self.formerr
            + self.servfail
            + self.nxdomain
            + self.notimp
            + self.refused
            + self.other
    }
}

/// A Prometheus-style histogram: cumulative counts per upper bound, plus sum and count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `(le, observations <= le)`, bounds from [`LATENCY_BOUNDS_US`].
    pub buckets: Vec<(Duration, u64)>,
    pub sum: Duration,
    pub count: u64,
}

#[derive(Default)]
pub(crate) struct Hist {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Hist {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = LATENCY_BOUNDS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        let mut acc = 0;
        let buckets = LATENCY_BOUNDS_US
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                acc += c.load(Relaxed);
                (Duration::from_micros(b), acc)
            })
            .collect();
        LatencyHistogram {
            buckets,
            sum: Duration::from_nanos(self.sum_ns.load(Relaxed)),
            count: self.count.load(Relaxed),
        }
    }
}

#[derive(Default)]
pub(crate) struct Stats {
    noerror: AtomicU64,
    formerr: AtomicU64,
    servfail: AtomicU64,
    nxdomain: AtomicU64,
    notimp: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    pub local: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    pub forward_rejected: AtomicU64,
    pub dropped: AtomicU64,
    pub truncated: AtomicU64,
    pub send_errors: AtomicU64,
    pub local_latency: Hist,
    pub forward_latency: Hist,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Stats {
    pub fn response(&self, rcode: ResponseCode, truncated: bool) {
        let c = match rcode {
            ResponseCode::NoError => &self.noerror,
            ResponseCode::FormErr => &self.formerr,
            ResponseCode::ServFail => &self.servfail,
            ResponseCode::NXDomain => &self.nxdomain,
            ResponseCode::NotImp => &self.notimp,
            ResponseCode::Refused => &self.refused,
            _ => &self.other,
        };
        inc(c);
        if truncated {
            inc(&self.truncated);
        }
    }

    pub fn snapshot(&self, attached: usize, inflight_forwards: usize) -> DnsStats {
        DnsStats {
            attached,
            inflight_forwards,
            responses: RcodeCounts {
                noerror: self.noerror.load(Relaxed),
                formerr: self.formerr.load(Relaxed),
                servfail: self.servfail.load(Relaxed),
                nxdomain: self.nxdomain.load(Relaxed),
                notimp: self.notimp.load(Relaxed),
                refused: self.refused.load(Relaxed),
                other: self.other.load(Relaxed),
            },
            local: self.local.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            forward_failures: self.forward_failures.load(Relaxed),
            forward_rejected: self.forward_rejected.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            local_latency: self.local_latency.snapshot(),
            forward_latency: self.forward_latency.snapshot(),
        }
    }
}
