//! Prometheus metrics and health endpoints of the agent.
//!
//! [`serve`] answers on one TCP listener (the agent binds a loopback port by default):
//! - `GET /metrics`: the [OpenMetrics] text exposition of [`Metrics::render`], with content type
//!   [`CONTENT_TYPE`] (`application/openmetrics-text; version=1.0.0; charset=utf-8`, what
//!   prometheus-client produces: counter families are typed without their `_total` suffix and
//!   the body ends with `# EOF`; Prometheus and its agents negotiate it natively);
//! - `GET /healthz`: 200 `ok` while the process lives;
//! - `GET /readyz`: 503 `not ready` until [`Metrics::set_ready`] (the first full sync is
//!   programmed into the maps), 200 `ok` after;
//! - `HEAD` as `GET`; other methods on those paths 405; any other path 404.
//!
//! No log line per request.
//!
//! Datapath metrics are read from the eBPF maps at scrape time by a prometheus-client
//! [`Collector`]: the maps pinned under the agent's pin directory are opened on the first
//! scrape that finds them, kept open, and reopened if the pins are replaced. Without pins only
//! the agent-side metrics are exposed, with `mesh_maps_available 0`. The reads go through the
//! small [`MapStats`] trait (implemented for [`Maps`], and by fakes in tests).
//!
//! # Metrics
//!
//! Datapath, from the maps (present when `mesh_maps_available` is 1); frontends and backends
//! are the ones of the last [`Catalog`] given to [`Metrics::set_catalog`]:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `mesh_service_packets_total` | counter | service, protocol, frontend, direction |
//! | `mesh_service_bytes_total` | counter | service, protocol, frontend, direction |
//! | `mesh_service_flows_total` | counter | service, protocol, frontend |
//! | `mesh_backend_packets_total` | counter | service, protocol, frontend, task, backend, local, direction |
//! | `mesh_backend_bytes_total` | counter | service, protocol, frontend, task, backend, local, direction |
//! | `mesh_backend_flows_total` | counter | service, protocol, frontend, task, backend, local |
//! | `mesh_datapath_packets_total` | counter | reason, verdict |
//! | `mesh_map_entries` | gauge | map |
//! | `mesh_map_max_entries` | gauge | map |
//!
//! - `frontend` is `addr:port` as a client addresses it: `*:8080` for a published port (any
//!   node address), `10.0.1.2:*` for a service VIP (every port); `backend` is the task's
//!   `addr:port` (`*` for port 0: a VIP backend keeps the port the client used); `local` is
//!   `true` for a task on this node, `false` for one reached through the kernel (overlay).
//! - `direction` is `in` (client → backend) or `out` (backend → client, the replies).
//!   `flows` are the new flows (connections) balanced, VIP sockets included.
//! - `mesh_datapath_packets_total` counts the programs' decisions by `reason` (the names of
//!   [`mesh_common::reason::NAMES`]). A packet can be counted under several reasons — its
//!   balancing decision (`new_flow`, `established`, `reply`, `backend_gone`, `snat`) and its
//!   delivery (`redirect`, `pass_rewritten` or `drop_rewrite`) — and the `sock_*` reasons
//!   count socket operations of the socket-level load balancer, not packets. `verdict` groups
//!   the reasons ([`verdict_of`]): `pass` (to the kernel, untouched or rewritten), `redirect`
//!   (sent straight to a device), `drop` (dropped or refused), `error` (a failure, the packet
//!   passed untouched), `balance` (a balancing decision), `socket` (socket-level LB).
//!   Delivered packets are `pass` + `redirect`, dropped ones `drop`.
//! - `map` is `frontends` (entries of the frontends map), `backends` (backend slots in use:
//!   one per backend of each frontend) or `conntrack` (live entries, two per flow — one per
//!   direction; the map is an LRU: at capacity, old flows are evicted).
//!
//! Agent:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `mesh_build_info` | gauge (always 1) | version |
//! | `mesh_ready` | gauge (0/1) | |
//! | `mesh_maps_available` | gauge (0/1) | |
//! | `mesh_syncs_total` | counter | |
//! | `mesh_sync_errors_total` | counter | |
//! | `mesh_sync_last_success_timestamp_seconds` | gauge (unix time; 0 = never) | |
//! | `mesh_sync_duration_seconds` | histogram (successful syncs) | |
//!
//! DNS (when a source is given with [`Metrics::set_dns`]):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `mesh_dns_responses_total` | counter | rcode (`noerror`, `formerr`, `servfail`, `nxdomain`, `notimp`, `refused`, `other`) |
//! | `mesh_dns_queries_total` | counter | resolution (`local`, `forwarded`) |
//! | `mesh_dns_request_duration_seconds` | histogram | resolution |
//! | `mesh_dns_forward_failures_total` | counter | |
//! | `mesh_dns_forward_rejected_total` | counter | |
//! | `mesh_dns_dropped_total` | counter | |
//! | `mesh_dns_truncated_total` | counter | |
//! | `mesh_dns_send_errors_total` | counter | |
//! | `mesh_dns_attached_tasks` | gauge | |
//! | `mesh_dns_inflight_forwards` | gauge | |
//!
//! [OpenMetrics]: https://prometheus.io/docs/specs/om/open_metrics_spec/

mod http;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    fmt,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use mesh_common::{TrafficStats, maps as names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::{MetricType, counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::{
    agent::{Catalog, CatalogBackend, CatalogFrontend},
    dns::{DnsStats, LatencyHistogram},
    ebpf::Maps,
};

pub use http::{CONTENT_TYPE, serve};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics")]
    Encode(#[from] fmt::Error),
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// What the metrics read from the eBPF maps. Implemented for [`Maps`] (the pinned maps of a
/// running agent); tests implement it with fixed values.
pub trait MapStats: Send {
    /// Counters of a frontend (by svc id), summed over CPUs.
    fn service(&self, svc_id: u32) -> TrafficStats;
    /// Counters of a backend (by backend id), summed over CPUs.
    fn backend(&self, id: u32) -> TrafficStats;
    /// Packets per verdict reason (the names of [`mesh_common::reason::NAMES`]).
    fn verdicts(&self) -> BTreeMap<&'static str, u64>;
    /// Live conntrack entries (two per flow): TCP, UDP.
    fn conntrack_lens(&self) -> [usize; 2];
    /// Capacity of the conntrack maps: TCP, UDP.
    fn conntrack_capacity(&self) -> [u32; 2];
    /// Entries of the frontends map.
    fn frontends_len(&self) -> usize;
    /// Backend slots in use (one per backend of each frontend).
    fn backends_len(&self) -> usize;
}

impl MapStats for Maps {
    fn service(&self, svc_id: u32) -> TrafficStats {
        self.service_stats(svc_id)
    }
    fn backend(&self, id: u32) -> TrafficStats {
        self.backend_stats(id)
    }
    fn verdicts(&self) -> BTreeMap<&'static str, u64> {
        Maps::verdicts(self)
    }
    fn conntrack_lens(&self) -> [usize; 2] {
        Maps::conntrack_lens(self)
    }
    fn conntrack_capacity(&self) -> [u32; 2] {
        self.ct_capacity
    }
    fn frontends_len(&self) -> usize {
        self.frontends.keys().filter(|k| k.is_ok()).count()
    }
    fn backends_len(&self) -> usize {
        self.slots.keys().filter(|k| k.is_ok()).count()
    }
}

/// Capacities reported as `mesh_map_max_entries`: what the agent can program (ids 0 are
/// never used); the conntrack LRUs' come from the maps themselves (`--conntrack-*-max`).
pub const FRONTENDS_CAPACITY: u32 = if names::MAX_FRONTENDS < names::MAX_SERVICES - 1 {
    names::MAX_FRONTENDS
} else {
    names::MAX_SERVICES - 1
};
pub const BACKENDS_CAPACITY: u32 = if names::MAX_SLOTS < names::MAX_BACKENDS - 1 {
    names::MAX_SLOTS
} else {
    names::MAX_BACKENDS - 1
};

/// The `verdict` label of a verdict reason (see the module documentation).
pub fn verdict_of(reason: &str) -> &'static str {
    match reason {
        "new_flow" | "established" | "reply" | "backend_gone" | "reopened" | "snat"
        | "snat_reclaimed" | "fragment" => "balance",
        "redirect" => "redirect",
        "sock_translated" | "sock_no_backend" => "socket",
        r if r.starts_with("pass_") => "pass",
        r if r.starts_with("drop_") => "drop",
        r if r.starts_with("err_") => "error",
        r if r.starts_with("sock_") => "socket",
        _ => "other",
    }
}

/// Buckets of `mesh_sync_duration_seconds`.
pub const SYNC_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type DnsSource = dyn Fn() -> DnsStats + Send + Sync;

/// Where the datapath counters come from.
enum MapSource {
    /// The maps pinned in `dir`, opened on demand; `open` remembers the pin's identity
    /// (device, inode) to notice a replaced pin.
    Pinned {
        dir: PathBuf,
        open: Option<((u64, u64), Box<Maps>)>,
        last_error: Option<String>,
    },
    Fixed(Box<dyn MapStats>),
}

impl MapSource {
    fn get(&mut self) -> Option<&dyn MapStats> {
        match self {
            MapSource::Fixed(s) => Some(&**s),
            MapSource::Pinned {
                dir,
                open,
                last_error,
            } => {
                let id = std::fs::metadata(dir.join(names::FRONTENDS))
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                let Some(id) = id else {
                    *open = None;
                    return None;
                };
                if open.as_ref().map(|(i, _)| *i) != Some(id) {
                    *open = match Maps::open_pinned(dir) {
                        Ok(m) => {
                            *last_error = None;
                            Some((id, Box::new(m)))
                        }
                        Err(e) => {
                            let e = e.to_string();
                            if last_error.as_ref() != Some(&e) {
                                tracing::warn!(pins = %dir.display(), error = %e, "metrics: cannot open the pinned maps");
                                *last_error = Some(e);
                            }
                            None
                        }
                    };
                }
                open.as_ref().map(|(_, m)| &**m as &dyn MapStats)
            }
        }
    }
}

/// State read at scrape time.
struct Shared {
    catalog: ArcSwap<Catalog>,
    maps: Mutex<MapSource>,
    dns: RwLock<Option<Arc<DnsSource>>>,
    ready: AtomicBool,
}

/// The agent's metrics: cheap to update from any thread, rendered on scrape.
pub struct Metrics {
    registry: Registry,
    shared: Arc<Shared>,
    syncs: Counter,
    sync_errors: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    sync_duration: Histogram,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("ready", &self.is_ready())
            .field("syncs", &self.syncs.get())
            .field("sync_errors", &self.sync_errors.get())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics reading the maps pinned in `pin_dir` (opened when they appear).
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        Self::build(MapSource::Pinned {
            dir: pin_dir,
            open: None,
            last_error: None,
        })
    }

    /// Metrics reading the datapath counters from `stats` (tests, tools).
    pub fn with_map_stats(stats: Box<dyn MapStats>) -> Arc<Self> {
        Self::build(MapSource::Fixed(stats))
    }

    fn build(maps: MapSource) -> Arc<Self> {
        let shared = Arc::new(Shared {
            catalog: ArcSwap::from_pointee(Catalog::default()),
            maps: Mutex::new(maps),
            dns: RwLock::new(None),
            ready: AtomicBool::new(false),
        });
        let syncs = Counter::default();
        let sync_errors = Counter::default();
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let sync_duration = Histogram::new(SYNC_BUCKETS);
        let mut registry = Registry::default();
        registry.register(
            "mesh_syncs",
            "Syncs of the node's state into the kernel (Agent::apply), successful or not",
            syncs.clone(),
        );
        registry.register(
            "mesh_sync_errors",
            "Syncs that failed to program the maps",
            sync_errors.clone(),
        );
        registry.register_with_unit(
            "mesh_sync_last_success_timestamp",
            "Unix time of the last successful sync (0: none yet)",
            Unit::Seconds,
            last_sync.clone(),
        );
        registry.register_with_unit(
            "mesh_sync_duration",
            "Time from a state change to its tables programmed in the maps (successful syncs)",
            Unit::Seconds,
            sync_duration.clone(),
        );
        registry.register_collector(Box::new(Scrape {
            shared: shared.clone(),
        }));
        Arc::new(Metrics {
            registry,
            shared,
            syncs,
            sync_errors,
            last_sync,
            sync_duration,
        })
    }

    /// The names of frontends and backends (svc ids and backend ids → labels).
    pub fn set_catalog(&self, cat: Catalog) {
        self.shared.catalog.store(Arc::new(cat));
    }

    /// Record one sync (one `Agent::apply`): how long it took from the state change to the
    /// programmed maps, and whether the maps were programmed.
    pub fn record_sync(&self, took: Duration, ok: bool) {
        self.syncs.inc();
        if ok {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_sync.set(now);
            self.sync_duration.observe(took.as_secs_f64());
        } else {
            self.sync_errors.inc();
        }
    }

    /// The first full sync is programmed: `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.shared.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Where DNS statistics come from (called on every scrape).
    pub fn set_dns(&self, f: Box<dyn Fn() -> DnsStats + Send + Sync>) {
        *self
            .shared
            .dns
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::from(f));
    }

    /// The OpenMetrics text exposition (ends with `# EOF`). Reads the maps: may block for a
    /// while on big conntrack tables (the server calls it off the async workers).
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The collector reading maps, catalog and DNS on each scrape.
struct Scrape {
    shared: Arc<Shared>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn counter_rows<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

fn gauge_rows<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// `port`, or `*` for 0 (any port).
fn port_label(port: u16) -> String {
    if port == 0 {
        "*".to_string()
    } else {
        port.to_string()
    }
}

fn frontend_label(fe: &CatalogFrontend) -> String {
    format!("{}:{}", fe.addr, port_label(fe.port))
}

fn backend_label(be: &CatalogBackend) -> String {
    format!("{}:{}", be.addr, port_label(be.port))
}

/// Traffic rows: packets/bytes (in, out) and flows, for one label set.
struct Traffic<'a> {
    labels: Labels<'a>,
    stats: TrafficStats,
}

fn with<'a>(labels: &Labels<'a>, extra: (&'static str, &'static str)) -> Labels<'a> {
    let mut l = labels.clone();
    l.push(extra);
    l
}

fn traffic_families(enc: &mut DescriptorEncoder, what: &str, rows: &[Traffic<'_>]) -> fmt::Result {
    let (subject, flows_help) = match what {
        "service" => (
            "frontend",
            "New flows (connections) balanced by a frontend.",
        ),
        _ => ("backend", "New flows (connections) balanced to a backend."),
    };
    counter_rows(
        enc,
        &format!("mesh_{what}_packets"),
        &format!(
            "Packets through a {subject}, by direction (in: client to backend, out: replies)."
        ),
        None,
        rows.iter().flat_map(|r| {
            [
                (with(&r.labels, ("direction", "in")), r.stats.pkts_in),
                (with(&r.labels, ("direction", "out")), r.stats.pkts_out),
            ]
        }),
    )?;
    counter_rows(
        enc,
        &format!("mesh_{what}"),
        &format!("Bytes (whole frames) through a {subject}, by direction."),
        Some(&Unit::Bytes),
        rows.iter().flat_map(|r| {
            [
                (with(&r.labels, ("direction", "in")), r.stats.bytes_in),
                (with(&r.labels, ("direction", "out")), r.stats.bytes_out),
            ]
        }),
    )?;
    counter_rows(
        enc,
        &format!("mesh_{what}_flows"),
        flows_help,
        None,
        rows.iter().map(|r| (r.labels.clone(), r.stats.flows)),
    )
}

fn encode_maps(enc: &mut DescriptorEncoder, maps: &dyn MapStats, cat: &Catalog) -> fmt::Result {
    struct Names {
        frontend: String,
        backends: Vec<(String, String)>,
    }
    let names: Vec<Names> = cat
        .frontends
        .iter()
        .map(|fe| Names {
            frontend: frontend_label(fe),
            backends: fe
                .backends
                .iter()
                .map(|b| (backend_label(b), b.local.to_string()))
                .collect(),
        })
        .collect();
    let mut services = Vec::new();
    let mut backends = Vec::new();
    for (fe, n) in cat.frontends.iter().zip(&names) {
        let labels: Labels<'_> = vec![
            ("service", fe.service.as_str()),
            ("protocol", fe.protocol.as_str()),
            ("frontend", n.frontend.as_str()),
        ];
        for (be, (addr, local)) in fe.backends.iter().zip(&n.backends) {
            let mut l = labels.clone();
            l.extend([
                ("task", be.task.as_str()),
                ("backend", addr.as_str()),
                ("local", local.as_str()),
            ]);
            backends.push(Traffic {
                labels: l,
                stats: maps.backend(be.id),
            });
        }
        services.push(Traffic {
            labels,
            stats: maps.service(fe.svc_id),
        });
    }
    traffic_families(enc, "service", &services)?;
    traffic_families(enc, "backend", &backends)?;

    counter_rows(
        enc,
        "mesh_datapath_packets",
        "Decisions of the eBPF programs by reason (a packet may count under a decision and a delivery; sock_* count socket operations).",
        None,
        maps.verdicts()
            .into_iter()
            .map(|(reason, n)| ([("reason", reason), ("verdict", verdict_of(reason))], n)),
    )?;

    let [ct_tcp, ct_udp] = maps.conntrack_lens();
    let [cap_tcp, cap_udp] = maps.conntrack_capacity();
    let sizes = [
        ("frontends", maps.frontends_len() as u64, FRONTENDS_CAPACITY),
        ("backends", maps.backends_len() as u64, BACKENDS_CAPACITY),
        ("conntrack_tcp", ct_tcp as u64, cap_tcp),
        ("conntrack_udp", ct_udp as u64, cap_udp),
    ];
    gauge_rows(
        enc,
        "mesh_map_entries",
        "Entries in use in a map (conntrack: two per flow).",
        sizes.iter().map(|(m, n, _)| ([("map", *m)], *n)),
    )?;
    gauge_rows(
        enc,
        "mesh_map_max_entries",
        "Capacity of a map.",
        sizes.iter().map(|(m, _, cap)| ([("map", *m)], *cap as u64)),
    )
}

/// A histogram from the DNS server's cumulative buckets.
fn latency_histogram(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &[(&'static str, &'static str); 1],
    h: &LatencyHistogram,
) -> fmt::Result {
    let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
    let mut prev = 0u64;
    for (le, cum) in &h.buckets {
        let cum = (*cum).max(prev);
        buckets.push((le.as_secs_f64(), cum - prev));
        prev = cum;
    }
    // Counters are read one by one while queries go on: keep the snapshot consistent.
    let count = h.count.max(prev);
    buckets.push((f64::INFINITY, count - prev));
    m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
        h.sum.as_secs_f64(),
        count,
        &buckets,
        None,
    )
}

fn encode_dns(enc: &mut DescriptorEncoder, s: &DnsStats) -> fmt::Result {
    let r = &s.responses;
    counter_rows(
        enc,
        "mesh_dns_responses",
        "DNS responses sent to tasks, by response code.",
        None,
        [
            ("noerror", r.noerror),
            ("formerr", r.formerr),
            ("servfail", r.servfail),
            ("nxdomain", r.nxdomain),
            ("notimp", r.notimp),
            ("refused", r.refused),
            ("other", r.other),
        ]
        .map(|(c, n)| ([("rcode", c)], n)),
    )?;
    counter_rows(
        enc,
        "mesh_dns_queries",
        "DNS queries answered from the service index (local) or forwarded to the upstreams.",
        None,
        [
            ([("resolution", "local")], s.local),
            ([("resolution", "forwarded")], s.forwarded),
        ],
    )?;
    {
        let mut m = enc.encode_descriptor(
            "mesh_dns_request_duration",
            "Time from a DNS query reaching the server to its response sent.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        latency_histogram(&mut m, &[("resolution", "local")], &s.local_latency)?;
        latency_histogram(&mut m, &[("resolution", "forwarded")], &s.forward_latency)?;
    }
    counter(
        enc,
        "mesh_dns_forward_failures",
        "Forwarded queries no upstream answered usably (answered SERVFAIL).",
        s.forward_failures,
    )?;
    counter(
        enc,
        "mesh_dns_forward_rejected",
        "Queries refused because too many forwards were in flight (answered REFUSED).",
        s.forward_rejected,
    )?;
    counter(
        enc,
        "mesh_dns_dropped",
        "DNS messages dropped without an answer.",
        s.dropped,
    )?;
    counter(
        enc,
        "mesh_dns_truncated",
        "UDP DNS responses sent truncated (TC).",
        s.truncated,
    )?;
    counter(
        enc,
        "mesh_dns_send_errors",
        "DNS responses that could not be sent.",
        s.send_errors,
    )?;
    gauge(
        enc,
        "mesh_dns_attached_tasks",
        "Tasks served by the embedded DNS.",
        s.attached as u64,
    )?;
    gauge(
        enc,
        "mesh_dns_inflight_forwards",
        "DNS queries waiting for an upstream.",
        s.inflight_forwards as u64,
    )
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        enc.encode_descriptor(
            "mesh_build_info",
            "Version of the running agent.",
            None,
            MetricType::Gauge,
        )?
        .encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
        .encode_gauge(&1u64)?;
        gauge(
            &mut enc,
            "mesh_ready",
            "1 once the first full sync is programmed in the maps.",
            self.shared.ready.load(Ordering::Acquire) as u64,
        )?;
        {
            let mut src = self
                .shared
                .maps
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let maps = src.get();
            gauge(
                &mut enc,
                "mesh_maps_available",
                "1 when the pinned eBPF maps could be read.",
                maps.is_some() as u64,
            )?;
            if let Some(maps) = maps {
                let cat = self.shared.catalog.load();
                encode_maps(&mut enc, maps, &cat)?;
            }
        }
        let dns = self
            .shared
            .dns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(f) = dns {
            encode_dns(&mut enc, &f())?;
        }
        Ok(())
    }
}
