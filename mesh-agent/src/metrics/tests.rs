//! Tests of the metrics: rendering from a hand-built catalog and fake map counters, checked
//! with a real OpenMetrics parser (Python's `prometheus_client`, Debian package
//! `python3-prometheus-client`); the HTTP endpoint on 127.0.0.1; and (root) the real eBPF
//! programs' counters through BPF_PROG_TEST_RUN up to `/metrics`.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_common::{TrafficStats, reason};
use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{
    agent::{Catalog, CatalogBackend, CatalogFrontend},
    dns::{DnsStats, LATENCY_BOUNDS_US, LatencyHistogram, RcodeCounts},
};

// ---------------------------------------------------------------------------------------
// The parser: prometheus_client.openmetrics.parser (strict: types, units, suffixes, EOF).
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    unit: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: String,
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "unit": f.unit,
                "samples": [{"name": s.name, "labels": s.labels, "value": repr(float(s.value))}
                            for s in f.samples]})
print(json.dumps(out))
"#;

/// A Python with `prometheus_client` (`MESH_TEST_PYTHON`, else /usr/bin/python3, python3).
fn python() -> &'static str {
    static PY: OnceLock<Option<String>> = OnceLock::new();
    PY.get_or_init(|| {
        let candidates = std::env::var("MESH_TEST_PYTHON")
            .into_iter()
            .chain(["/usr/bin/python3".to_string(), "python3".to_string()]);
        for py in candidates {
            let ok = Command::new(&py)
                .args(["-c", "import prometheus_client.openmetrics.parser"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Some(py);
            }
        }
        None
    })
    .as_deref()
    .expect(
        "these tests check the exposition with Python's prometheus_client parser: \
         install it (Debian: apt-get install python3-prometheus-client) or point \
         MESH_TEST_PYTHON at a python3 that has it",
    )
}

/// Parse an exposition; panics (with the text) if the parser refuses it.
fn parse(text: &str) -> Vec<Family> {
    let mut child = Command::new(python())
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition:\n{}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// The parsed exposition, with lookups.
struct Parsed {
    fams: Vec<Family>,
    text: String,
}

impl Parsed {
    fn of(text: String) -> Self {
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        Parsed {
            fams: parse(&text),
            text,
        }
    }

    fn family(&self, name: &str) -> Option<&Family> {
        self.fams.iter().find(|f| f.name == name)
    }

    fn kind(&self, name: &str) -> &str {
        &self
            .family(name)
            .unwrap_or_else(|| panic!("no family {name} in\n{}", self.text))
            .kind
    }

    /// Samples named `sample` whose labels include `labels`.
    fn matching(
        &self,
        sample: &str,
        labels: &[(&str, &str)],
    ) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.fams
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == sample)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| (&s.labels, s.value.parse::<f64>().expect("a number")))
            .collect()
    }

    /// The value of the one sample named `sample` whose labels include `labels`.
    fn get(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        let m = self.matching(sample, labels);
        assert_eq!(m.len(), 1, "{sample}{labels:?}: {m:?} in\n{}", self.text);
        m[0].1
    }

    fn has(&self, sample: &str) -> bool {
        !self.matching(sample, &[]).is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// Fixture: a catalog and fake map counters.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct FakeData {
    services: HashMap<u32, TrafficStats>,
    backends: HashMap<u32, TrafficStats>,
    verdicts: BTreeMap<&'static str, u64>,
    conntrack: [usize; 2],
    frontends: usize,
    slots: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeData>>);

impl MapStats for Fake {
    fn service(&self, svc_id: u32) -> TrafficStats {
        self.0
            .lock()
            .unwrap()
            .services
            .get(&svc_id)
            .copied()
            .unwrap_or_default()
    }
    fn backend(&self, id: u32) -> TrafficStats {
        self.0
            .lock()
            .unwrap()
            .backends
            .get(&id)
            .copied()
            .unwrap_or_default()
    }
    fn verdicts(&self) -> BTreeMap<&'static str, u64> {
        let d = self.0.lock().unwrap();
        reason::NAMES
            .iter()
            .map(|n| (*n, d.verdicts.get(n).copied().unwrap_or(0)))
            .collect()
    }
    fn conntrack_lens(&self) -> [usize; 2] {
        self.0.lock().unwrap().conntrack
    }
    fn conntrack_capacity(&self) -> [u32; 2] {
        // Sizes of a `--conntrack-tcp-max 4096 --conntrack-udp-max 2048` agent.
        [4_096, 2_048]
    }
    fn frontends_len(&self) -> usize {
        self.0.lock().unwrap().frontends
    }
    fn backends_len(&self) -> usize {
        self.0.lock().unwrap().slots
    }
}

fn ts(pkts_in: u64, bytes_in: u64, pkts_out: u64, bytes_out: u64, flows: u64) -> TrafficStats {
    TrafficStats {
        pkts_in,
        bytes_in,
        pkts_out,
        bytes_out,
        flows,
    }
}

const ODD_TASK: &str = "odd\"task\\name";

/// web: published 8080/tcp (a local and a remote task) and its VIP (tcp, every port);
/// dns: published 5353/udp with one task whose name needs escaping.
fn catalog() -> Catalog {
    let be = |id, task: &str, addr: [u8; 4], port, local| CatalogBackend {
        id,
        task: task.into(),
        addr: Ipv4Addr::from(addr),
        port,
        local,
    };
    Catalog {
        node: "n1".into(),
        frontends: vec![
            CatalogFrontend {
                svc_id: 1,
                service: "web".into(),
                protocol: "tcp".into(),
                addr: "*".into(),
                port: 8080,
                backends: vec![
                    be(1, "web.1.aaa", [10, 0, 0, 11], 80, true),
                    be(2, "web.2.bbb", [10, 0, 0, 12], 80, false),
                ],
            },
            CatalogFrontend {
                svc_id: 2,
                service: "web".into(),
                protocol: "tcp".into(),
                addr: "10.0.0.2".into(),
                port: 0,
                backends: vec![be(3, "web.1.aaa", [10, 0, 0, 11], 0, true)],
            },
            CatalogFrontend {
                svc_id: 7,
                service: "dns".into(),
                protocol: "udp".into(),
                addr: "*".into(),
                port: 5353,
                backends: vec![be(9, ODD_TASK, [10, 0, 0, 20], 53, true)],
            },
        ],
    }
}

fn fake() -> Fake {
    let f = Fake::default();
    {
        let mut d = f.0.lock().unwrap();
        d.services.insert(1, ts(10, 1000, 8, 4000, 3));
        d.services.insert(2, ts(5, 500, 5, 700, 1));
        d.services.insert(7, ts(2, 120, 2, 300, 2));
        d.backends.insert(1, ts(6, 600, 5, 2500, 2));
        d.backends.insert(2, ts(4, 400, 3, 1500, 1));
        d.backends.insert(3, ts(5, 500, 5, 700, 1));
        d.backends.insert(9, ts(2, 120, 2, 300, 2));
        d.verdicts.insert("new_flow", 6);
        d.verdicts.insert("established", 11);
        d.verdicts.insert("redirect", 15);
        d.verdicts.insert("pass_no_service", 42);
        d.verdicts.insert("drop_other_network", 3);
        d.verdicts.insert("err_ct_insert", 1);
        d.verdicts.insert("sock_translated", 4);
        d.conntrack = [12, 2];
        d.frontends = 3;
        d.slots = 4;
    }
    f
}

fn metrics_with_fake() -> (Arc<Metrics>, Fake) {
    let f = fake();
    let m = Metrics::with_map_stats(Box::new(f.clone()));
    m.set_catalog(catalog());
    (m, f)
}

fn scrape(m: &Metrics) -> Parsed {
    Parsed::of(m.render().expect("render"))
}

const WEB: [(&str, &str); 3] = [
    ("service", "web"),
    ("protocol", "tcp"),
    ("frontend", "*:8080"),
];

fn l<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(extra).copied().collect()
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

#[test]
fn frontend_and_backend_counters_are_labelled_from_the_catalog() {
    let (m, _) = metrics_with_fake();
    let p = scrape(&m);
    assert_eq!(p.get("mesh_maps_available", &[]), 1.0);
    for fam in [
        "mesh_service_packets",
        "mesh_service_bytes",
        "mesh_service_flows",
    ] {
        assert_eq!(p.kind(fam), "counter", "{fam}");
    }
    assert_eq!(p.family("mesh_service_bytes").unwrap().unit, "bytes");
    assert_eq!(p.family("mesh_backend_bytes").unwrap().unit, "bytes");

    // Per frontend.
    let get = |n: &str, extra: &[(&str, &str)]| p.get(n, &l(&WEB, extra));
    assert_eq!(
        get("mesh_service_packets_total", &[("direction", "in")]),
        10.0
    );
    assert_eq!(
        get("mesh_service_packets_total", &[("direction", "out")]),
        8.0
    );
    assert_eq!(
        get("mesh_service_bytes_total", &[("direction", "in")]),
        1000.0
    );
    assert_eq!(
        get("mesh_service_bytes_total", &[("direction", "out")]),
        4000.0
    );
    assert_eq!(get("mesh_service_flows_total", &[]), 3.0);
    let vip = [
        ("service", "web"),
        ("protocol", "tcp"),
        ("frontend", "10.0.0.2:*"),
    ];
    assert_eq!(
        p.get(
            "mesh_service_packets_total",
            &l(&vip, &[("direction", "out")])
        ),
        5.0
    );
    let dns = [
        ("service", "dns"),
        ("protocol", "udp"),
        ("frontend", "*:5353"),
    ];
    assert_eq!(p.get("mesh_service_flows_total", &dns), 2.0);
    assert_eq!(
        p.matching("mesh_service_packets_total", &[]).len(),
        6,
        "3 frontends × 2 directions"
    );
    assert_eq!(p.matching("mesh_service_flows_total", &[]).len(), 3);

    // Per backend: exactly the labels documented.
    let b1 = l(
        &WEB,
        &[
            ("task", "web.1.aaa"),
            ("backend", "10.0.0.11:80"),
            ("local", "true"),
        ],
    );
    let (labels, v) = p.matching(
        "mesh_backend_packets_total",
        &l(&b1, &[("direction", "in")]),
    )[0];
    assert_eq!(v, 6.0);
    let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "backend",
            "direction",
            "frontend",
            "local",
            "protocol",
            "service",
            "task"
        ]
    );
    assert_eq!(
        p.get(
            "mesh_backend_packets_total",
            &l(&b1, &[("direction", "out")])
        ),
        5.0
    );
    assert_eq!(
        p.get("mesh_backend_bytes_total", &l(&b1, &[("direction", "out")])),
        2500.0
    );
    assert_eq!(p.get("mesh_backend_flows_total", &b1), 2.0);
    let b2 = l(
        &WEB,
        &[
            ("task", "web.2.bbb"),
            ("backend", "10.0.0.12:80"),
            ("local", "false"),
        ],
    );
    assert_eq!(
        p.get("mesh_backend_bytes_total", &l(&b2, &[("direction", "in")])),
        400.0
    );
    assert_eq!(p.get("mesh_backend_flows_total", &b2), 1.0);
    // The same task behind the VIP is another series (its own backend id).
    let b3 = l(&vip, &[("task", "web.1.aaa"), ("backend", "10.0.0.11:*")]);
    assert_eq!(
        p.get(
            "mesh_backend_packets_total",
            &l(&b3, &[("direction", "in")])
        ),
        5.0
    );
    // Label values are escaped (and come back intact through the parser).
    assert_eq!(
        p.get(
            "mesh_backend_flows_total",
            &[("task", ODD_TASK), ("backend", "10.0.0.20:53")]
        ),
        2.0
    );
    assert_eq!(p.matching("mesh_backend_flows_total", &[]).len(), 4);
}

#[test]
fn verdicts_maps_and_build_info() {
    let (m, _) = metrics_with_fake();
    let p = scrape(&m);
    assert_eq!(p.kind("mesh_datapath_packets"), "counter");
    let all = p.matching("mesh_datapath_packets_total", &[]);
    assert_eq!(
        all.len(),
        reason::NAMES.len(),
        "every reason, zeros included"
    );
    let v = |r: &str, verdict: &str| {
        p.get(
            "mesh_datapath_packets_total",
            &[("reason", r), ("verdict", verdict)],
        )
    };
    assert_eq!(v("new_flow", "balance"), 6.0);
    assert_eq!(v("established", "balance"), 11.0);
    assert_eq!(v("redirect", "redirect"), 15.0);
    assert_eq!(v("pass_no_service", "pass"), 42.0);
    assert_eq!(v("drop_other_network", "drop"), 3.0);
    assert_eq!(v("err_ct_insert", "error"), 1.0);
    assert_eq!(v("sock_translated", "socket"), 4.0);
    assert_eq!(v("pass_fragment", "pass"), 0.0);
    let dropped: f64 = p
        .matching("mesh_datapath_packets_total", &[("verdict", "drop")])
        .iter()
        .map(|s| s.1)
        .sum();
    assert_eq!(dropped, 3.0);

    assert_eq!(p.kind("mesh_map_entries"), "gauge");
    let e = |map: &str| p.get("mesh_map_entries", &[("map", map)]);
    let c = |map: &str| p.get("mesh_map_max_entries", &[("map", map)]);
    assert_eq!(
        (
            e("frontends"),
            e("backends"),
            e("conntrack_tcp"),
            e("conntrack_udp")
        ),
        (3.0, 4.0, 12.0, 2.0)
    );
    assert_eq!(c("frontends"), 65_535.0);
    assert_eq!(c("backends"), 262_143.0);
    assert_eq!(
        c("conntrack_tcp"),
        4_096.0,
        "the map's own size, not the default"
    );
    assert_eq!(c("conntrack_udp"), 2_048.0);

    assert_eq!(p.kind("mesh_build_info"), "gauge");
    assert_eq!(
        p.get("mesh_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert_eq!(p.get("mesh_ready", &[]), 0.0);
    m.set_ready();
    assert_eq!(scrape(&m).get("mesh_ready", &[]), 1.0);
}

#[test]
fn every_reason_has_a_verdict() {
    for r in reason::NAMES {
        let v = verdict_of(r);
        assert_ne!(v, "other", "{r}");
        for (prefix, want) in [
            ("pass_", "pass"),
            ("drop_", "drop"),
            ("err_", "error"),
            ("sock_", "socket"),
        ] {
            if r.starts_with(prefix) {
                assert_eq!(v, want, "{r}");
            }
        }
    }
    assert_eq!(verdict_of("drop_something_new"), "drop");
    assert_eq!(verdict_of("mystery"), "other");
}

#[test]
fn counters_are_read_at_each_scrape_and_the_catalog_can_change() {
    let (m, f) = metrics_with_fake();
    assert_eq!(scrape(&m).get("mesh_service_flows_total", &WEB), 3.0);
    f.0.lock()
        .unwrap()
        .services
        .insert(1, ts(11, 1100, 9, 4100, 4));
    f.0.lock().unwrap().conntrack = [14, 0];
    let p = scrape(&m);
    assert_eq!(p.get("mesh_service_flows_total", &WEB), 4.0);
    assert_eq!(p.get("mesh_map_entries", &[("map", "conntrack_tcp")]), 14.0);
    // A sync removed the VIP and the dns service.
    let mut cat = catalog();
    cat.frontends.truncate(1);
    m.set_catalog(cat);
    let p = scrape(&m);
    assert_eq!(p.matching("mesh_service_flows_total", &[]).len(), 1);
    assert_eq!(p.matching("mesh_backend_flows_total", &[]).len(), 2);
    // An empty catalog leaves the families without samples (still valid).
    m.set_catalog(Catalog::default());
    let p = scrape(&m);
    assert!(!p.has("mesh_service_flows_total") && !p.has("mesh_backend_packets_total"));
    assert_eq!(
        p.matching("mesh_datapath_packets_total", &[]).len(),
        reason::NAMES.len()
    );
}

#[test]
fn without_pinned_maps_only_agent_metrics_are_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metrics::new(dir.path().join("no-pins-here"));
    m.set_catalog(catalog());
    m.record_sync(Duration::from_millis(3), true);
    let p = scrape(&m);
    assert_eq!(p.get("mesh_maps_available", &[]), 0.0);
    for gone in [
        "mesh_service_packets_total",
        "mesh_backend_packets_total",
        "mesh_datapath_packets_total",
        "mesh_map_entries",
    ] {
        assert!(!p.has(gone), "{gone} without maps");
    }
    assert!(p.family("mesh_service_packets").is_none());
    assert_eq!(p.get("mesh_syncs_total", &[]), 1.0);
    assert!(p.has("mesh_build_info"));
    assert!(!p.has("mesh_dns_responses_total"), "no DNS source given");
}

#[test]
fn sync_metrics() {
    let (m, _) = metrics_with_fake();
    let p = scrape(&m);
    assert_eq!(p.get("mesh_syncs_total", &[]), 0.0);
    assert_eq!(p.get("mesh_sync_last_success_timestamp_seconds", &[]), 0.0);
    assert_eq!(p.get("mesh_sync_duration_seconds_count", &[]), 0.0);

    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    m.record_sync(Duration::from_millis(3), true);
    m.record_sync(Duration::from_millis(40), true);
    m.record_sync(Duration::from_secs(2), false);
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let p = scrape(&m);
    assert_eq!(p.kind("mesh_syncs"), "counter");
    assert_eq!(p.kind("mesh_sync_errors"), "counter");
    assert_eq!(p.kind("mesh_sync_duration_seconds"), "histogram");
    assert_eq!(
        p.family("mesh_sync_duration_seconds").unwrap().unit,
        "seconds"
    );
    assert_eq!(p.kind("mesh_sync_last_success_timestamp_seconds"), "gauge");
    assert_eq!(p.get("mesh_syncs_total", &[]), 3.0);
    assert_eq!(p.get("mesh_sync_errors_total", &[]), 1.0);
    let t = p.get("mesh_sync_last_success_timestamp_seconds", &[]);
    assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
    assert_eq!(
        p.get("mesh_sync_duration_seconds_count", &[]),
        2.0,
        "failed syncs are not observed"
    );
    assert!((p.get("mesh_sync_duration_seconds_sum", &[]) - 0.043).abs() < 1e-9);
    let b = |le: &str| p.get("mesh_sync_duration_seconds_bucket", &[("le", le)]);
    assert_eq!(
        (b("0.0025"), b("0.005"), b("0.05"), b("+Inf")),
        (0.0, 1.0, 2.0, 2.0)
    );
}

fn dns_stats() -> DnsStats {
    // Cumulative, as the DNS server reports them.
    let hist = |per_bucket: &[u64], over: u64, sum_us: u64| {
        let mut acc = 0;
        let buckets: Vec<(Duration, u64)> = LATENCY_BOUNDS_US
            .iter()
            .enumerate()
            .map(|(i, b)| {
                acc += per_bucket.get(i).copied().unwrap_or(0);
                (Duration::from_micros(*b), acc)
            })
            .collect();
        LatencyHistogram {
            buckets,
            sum: Duration::from_micros(sum_us),
            count: acc + over,
        }
    };
    DnsStats {
        attached: 4,
        inflight_forwards: 2,
        responses: RcodeCounts {
            noerror: 100,
            formerr: 1,
            servfail: 3,
            nxdomain: 7,
            notimp: 0,
            refused: 2,
            other: 1,
        },
        local: 90,
        forwarded: 24,
        forward_failures: 3,
        forward_rejected: 2,
        dropped: 5,
        truncated: 6,
        send_errors: 1,
        local_latency: hist(&[50, 30, 10], 0, 9_000),
        forward_latency: hist(&[0, 0, 0, 0, 4, 10, 6], 4, 30_000_000),
    }
}

#[test]
fn dns_metrics_when_a_source_is_set() {
    let (m, _) = metrics_with_fake();
    assert!(!scrape(&m).has("mesh_dns_responses_total"));
    let stats = Arc::new(Mutex::new(dns_stats()));
    let s = stats.clone();
    m.set_dns(Box::new(move || s.lock().unwrap().clone()));
    let p = scrape(&m);
    let rc = |c: &str| p.get("mesh_dns_responses_total", &[("rcode", c)]);
    assert_eq!(
        [
            rc("noerror"),
            rc("formerr"),
            rc("servfail"),
            rc("nxdomain"),
            rc("notimp"),
            rc("refused"),
            rc("other")
        ],
        [100.0, 1.0, 3.0, 7.0, 0.0, 2.0, 1.0]
    );
    assert_eq!(
        p.get("mesh_dns_queries_total", &[("resolution", "local")]),
        90.0
    );
    assert_eq!(
        p.get("mesh_dns_queries_total", &[("resolution", "forwarded")]),
        24.0
    );
    assert_eq!(p.get("mesh_dns_forward_failures_total", &[]), 3.0);
    assert_eq!(p.get("mesh_dns_forward_rejected_total", &[]), 2.0);
    assert_eq!(p.get("mesh_dns_dropped_total", &[]), 5.0);
    assert_eq!(p.get("mesh_dns_truncated_total", &[]), 6.0);
    assert_eq!(p.get("mesh_dns_send_errors_total", &[]), 1.0);
    assert_eq!(p.get("mesh_dns_attached_tasks", &[]), 4.0);
    assert_eq!(p.get("mesh_dns_inflight_forwards", &[]), 2.0);

    assert_eq!(p.kind("mesh_dns_request_duration_seconds"), "histogram");
    let h = |res: &str, suffix: &str, le: Option<&str>| {
        let mut labels = vec![("resolution", res)];
        labels.extend(le.map(|le| ("le", le)));
        p.get(
            &format!("mesh_dns_request_duration_seconds_{suffix}"),
            &labels,
        )
    };
    // Buckets stay cumulative, in seconds; +Inf is the count.
    assert_eq!(h("local", "bucket", Some("0.0001")), 50.0);
    assert_eq!(h("local", "bucket", Some("0.00025")), 80.0);
    assert_eq!(h("local", "bucket", Some("0.0005")), 90.0);
    assert_eq!(h("local", "bucket", Some("5.0")), 90.0);
    assert_eq!(h("local", "bucket", Some("+Inf")), 90.0);
    assert_eq!(h("local", "count", None), 90.0);
    assert!((h("local", "sum", None) - 0.009).abs() < 1e-12);
    assert_eq!(h("forwarded", "bucket", Some("0.0025")), 4.0);
    assert_eq!(h("forwarded", "bucket", Some("0.01")), 20.0);
    assert_eq!(h("forwarded", "bucket", Some("5.0")), 20.0);
    assert_eq!(
        h("forwarded", "bucket", Some("+Inf")),
        24.0,
        "slower than the last bound"
    );
    assert_eq!(h("forwarded", "sum", None), 30.0);
    let buckets = p.matching(
        "mesh_dns_request_duration_seconds_bucket",
        &[("resolution", "local")],
    );
    assert_eq!(buckets.len(), LATENCY_BOUNDS_US.len() + 1);

    // A snapshot taken while queries go on (count read before a bucket) stays valid.
    {
        let mut s = stats.lock().unwrap();
        s.local_latency.count = 80;
    }
    let p = scrape(&m);
    assert_eq!(
        p.get(
            "mesh_dns_request_duration_seconds_count",
            &[("resolution", "local")]
        ),
        90.0
    );
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (closed by us), raw.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

#[tokio::test]
async fn http_endpoints() {
    let (m, _) = metrics_with_fake();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, m.clone()));

    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
    let r = request(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(CONTENT_TYPE));
    assert_eq!(
        CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let p = Parsed::of(r.body);
    assert_eq!(p.get("mesh_ready", &[]), 0.0);
    assert_eq!(p.get("mesh_service_flows_total", &WEB), 3.0);

    m.set_ready();
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = request(addr, "GET", "/metrics?x=1").await;
    assert_eq!(Parsed::of(r.body).get("mesh_ready", &[]), 1.0);

    let r = request(addr, "HEAD", "/metrics").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    for path in ["/", "/metric", "/metrics/x", "/healthz/"] {
        assert_eq!(request(addr, "GET", path).await.status, 404, "{path}");
    }
    let r = request(addr, "POST", "/metrics").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));

    // Aborting the server also closes the connections it serves (keep-alive included).
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    server.abort();
    let _ = server.await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection left open after the server stopped"
    );
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

// ---------------------------------------------------------------------------------------
// Real eBPF programs (root): packets through BPF_PROG_TEST_RUN, counters up to /metrics.
// ---------------------------------------------------------------------------------------

mod datapath {
    use aya::programs::{TestRun, TestRunOptions};
    use mesh_common::progs;

    use super::*;
    use crate::{
        ebpf::{
            Datapath,
            packet::{self, Frame, TCP_ACK, TCP_SYN},
            remove_pins,
        },
        model::{
            EndpointMode, Network, Node, PortSpec, Protocol, Service, ServiceNetwork, State, Task,
            TaskNetwork, TaskState,
        },
        tables::{self, LocalLink, LocalLinks, Reach, Tables},
    };

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const XDP_REDIRECT: u32 = 4;

    fn task_addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, 0, 10 + i)
    }

    fn state() -> State {
        let mut s = State::default();
        s.nodes.insert(
            "n1".into(),
            Node {
                name: "n1".into(),
                address: NODE,
            },
        );
        s.networks.insert(
            "demo".into(),
            Network {
                name: "demo".into(),
                subnet: "10.201.0.0/24".parse().unwrap(),
                vni: 4201,
                gateway: Ipv4Addr::new(10, 201, 0, 1),
            },
        );
        s.services.insert(
            "whoami".into(),
            Service {
                name: "whoami".into(),
                endpoint_mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "demo".into(),
                    vip: Some(Ipv4Addr::new(10, 201, 0, 2)),
                    aliases: vec![],
                }],
                ports: vec![PortSpec {
                    published: 8080,
                    target: 80,
                    protocol: Protocol::Tcp,
                }],
            },
        );
        for i in 1..=3u8 {
            let id = format!("t{i}");
            s.tasks.insert(
                id.clone(),
                Task {
                    id,
                    service: "whoami".into(),
                    slot: i as u32,
                    node: "n1".into(),
                    state: TaskState::Running,
                    netns: None,
                    resolv_conf: None,
                    networks: vec![TaskNetwork {
                        network: "demo".into(),
                        address: task_addr(i),
                    }],
                },
            );
        }
        s
    }

    fn links() -> LocalLinks {
        (1..=3u8)
            .map(|i| {
                (
                    (format!("t{i}"), "demo".to_string()),
                    LocalLink {
                        ifindex: 100 + i as u32,
                        task_mac: [0x02, 0x42, 10, 201, 0, 10 + i],
                        gw_mac: GW_MAC,
                    },
                )
            })
            .collect()
    }

    /// The catalog the agent writes (`Agent::write_catalog`) for these tables.
    fn catalog_of(t: &Tables, s: &State) -> Catalog {
        Catalog {
            node: "n1".into(),
            frontends: t
                .frontends()
                .map(|(id, pf)| CatalogFrontend {
                    svc_id: pf.svc_id,
                    service: pf.spec.service.clone(),
                    protocol: id.protocol.as_str().into(),
                    addr: if id.addr.is_unspecified() {
                        "*".into()
                    } else {
                        id.addr.to_string()
                    },
                    port: id.port,
                    backends: pf
                        .spec
                        .backends
                        .iter()
                        .zip(&pf.slots)
                        .map(|(b, bid)| CatalogBackend {
                            id: *bid,
                            task: s.tasks[&b.task_id].name(),
                            addr: b.addr,
                            port: b.port,
                            local: b.link.is_some(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    struct Pins(PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = remove_pins(&self.0);
        }
    }

    fn load(pins: &Pins) -> (Datapath, Catalog) {
        let mut dp = Datapath::load(&pins.0).expect("load the embedded eBPF object (needs root)");
        dp.maps.set_node_addrs(&[NODE]).unwrap();
        let s = state();
        let mut t = Tables::new();
        let ops = t
            .apply(&tables::desired(&s, "n1", &links(), Reach::LocalOnly))
            .unwrap();
        dp.maps.apply(&ops).unwrap();
        let cat = catalog_of(&t, &s);
        (dp, cat)
    }

    fn run(dp: &mut Datapath, tc: bool, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = if tc {
            dp.tc_program(progs::TC_TASK).unwrap().test_run(opts)
        } else {
            dp.xdp_program(progs::XDP_INGRESS).unwrap().test_run(opts)
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    #[derive(Default, Debug, PartialEq)]
    struct Want {
        pkts_in: u64,
        bytes_in: u64,
        pkts_out: u64,
        bytes_out: u64,
        flows: u64,
    }

    #[test]
    fn real_datapath_counters_reach_the_exposition() {
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/mesh-unit-metrics-{}",
            std::process::id()
        )));
        let _ = remove_pins(&pins.0);
        // The endpoint starts before the agent has pinned anything.
        let m = Metrics::new(pins.0.clone());
        assert_eq!(scrape(&m).get("mesh_maps_available", &[]), 0.0);

        let (mut dp, cat) = load(&pins);
        m.set_catalog(cat.clone());
        let p = scrape(&m);
        assert_eq!(
            p.get("mesh_maps_available", &[]),
            1.0,
            "maps opened once pinned"
        );
        let published = cat
            .frontends
            .iter()
            .find(|f| f.addr == "*")
            .expect("published frontend");
        assert_eq!(published.backends.len(), 3);
        let fe = [
            ("service", "whoami"),
            ("protocol", "tcp"),
            ("frontend", "*:8080"),
        ];
        for b in &published.backends {
            let addr = format!("{}:80", b.addr);
            let be = l(&fe, &[("backend", &addr), ("direction", "in")]);
            assert_eq!(p.get("mesh_backend_packets_total", &be), 0.0);
        }

        // 6 flows, flow k sends a SYN then k ACKs; the task answers each flow once.
        let mut want: HashMap<Ipv4Addr, Want> = HashMap::new();
        let mut acks = 0;
        for k in 0..6u16 {
            let sport = 50_000 + k;
            let syn = Frame::tcp(CLIENT, sport, NODE, 8080, TCP_SYN).build();
            let (rc, out) = run(&mut dp, false, &syn);
            assert_eq!(rc, XDP_REDIRECT);
            let task = packet::parse(&out).unwrap().dst;
            let w = want.entry(task).or_default();
            w.flows += 1;
            w.pkts_in += 1;
            w.bytes_in += syn.len() as u64;
            for _ in 0..k {
                let ack = Frame::tcp(CLIENT, sport, NODE, 8080, TCP_ACK).build();
                let (_, out) = run(&mut dp, false, &ack);
                assert_eq!(
                    packet::parse(&out).unwrap().dst,
                    task,
                    "a flow sticks to its task"
                );
                w.pkts_in += 1;
                w.bytes_in += ack.len() as u64;
                acks += 1;
            }
            let mut reply = Frame::tcp(task, 80, CLIENT, sport, TCP_SYN | TCP_ACK);
            reply.payload = vec![0u8; 10 * k as usize];
            let reply = reply.build();
            run(&mut dp, true, &reply);
            w.pkts_out += 1;
            w.bytes_out += reply.len() as u64;
        }
        assert_eq!(want.len(), 3, "round-robin over the three tasks");

        let p = scrape(&m);
        let mut total = Want::default();
        for b in &published.backends {
            let addr = format!("{}:80", b.addr);
            let be = l(
                &fe,
                &[("task", &b.task), ("backend", &addr), ("local", "true")],
            );
            let dir = |d: &'static str| l(&be, &[("direction", d)]);
            let got = Want {
                pkts_in: p.get("mesh_backend_packets_total", &dir("in")) as u64,
                bytes_in: p.get("mesh_backend_bytes_total", &dir("in")) as u64,
                pkts_out: p.get("mesh_backend_packets_total", &dir("out")) as u64,
                bytes_out: p.get("mesh_backend_bytes_total", &dir("out")) as u64,
                flows: p.get("mesh_backend_flows_total", &be) as u64,
            };
            assert_eq!(got, want[&b.addr], "backend {}", b.addr);
            total.pkts_in += got.pkts_in;
            total.bytes_in += got.bytes_in;
            total.pkts_out += got.pkts_out;
            total.bytes_out += got.bytes_out;
            total.flows += got.flows;
        }
        let svc = Want {
            pkts_in: p.get(
                "mesh_service_packets_total",
                &l(&fe, &[("direction", "in")]),
            ) as u64,
            bytes_in: p.get("mesh_service_bytes_total", &l(&fe, &[("direction", "in")])) as u64,
            pkts_out: p.get(
                "mesh_service_packets_total",
                &l(&fe, &[("direction", "out")]),
            ) as u64,
            bytes_out: p.get("mesh_service_bytes_total", &l(&fe, &[("direction", "out")])) as u64,
            flows: p.get("mesh_service_flows_total", &fe) as u64,
        };
        assert_eq!(svc, total, "the frontend counts what its backends count");
        assert_eq!(total.flows, 6);
        let v = |r: &str| p.get("mesh_datapath_packets_total", &[("reason", r)]);
        assert_eq!(
            (v("new_flow"), v("established"), v("reply")),
            (6.0, acks as f64, 6.0)
        );
        let e = |map: &str| p.get("mesh_map_entries", &[("map", map)]);
        assert_eq!(e("conntrack_tcp"), 12.0, "two entries per flow");
        // Map entries: a TCP+UDP VIP is one frontend under two keys.
        let keys: usize = cat
            .frontends
            .iter()
            .map(|f| if f.protocol == "tcp+udp" { 2 } else { 1 })
            .sum();
        assert_eq!(e("frontends"), keys as f64);
        assert_eq!(
            e("backends"),
            cat.frontends
                .iter()
                .map(|f| f.backends.len())
                .sum::<usize>() as f64
        );

        // The agent goes away with its pins: no stale numbers from maps that are gone...
        dp.unpin().unwrap();
        assert_eq!(scrape(&m).get("mesh_maps_available", &[]), 0.0);
        // ...and a new agent's maps are picked up (fresh counters).
        let (dp, _) = load(&pins);
        let p = scrape(&m);
        assert_eq!(p.get("mesh_maps_available", &[]), 1.0);
        assert_eq!(p.get("mesh_service_flows_total", &fe), 0.0);
        assert_eq!(p.get("mesh_map_entries", &[("map", "conntrack_tcp")]), 0.0);
        dp.unpin().unwrap();
    }
}
