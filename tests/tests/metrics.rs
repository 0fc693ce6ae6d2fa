//! /metrics, /healthz, /readyz of a real agent, scraped during traffic and parsed with a real
//! Prometheus text-format parser (Python's prometheus_client): per-backend counters move by
//! exactly the traffic sent.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mesh_tests::{cluster::*, *};

/// Parse an exposition with prometheus_client's parser; returns (name, labels, value) rows.
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let script = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    // Debian's python3 (where python3-prometheus-client lives), not a pyenv one on PATH.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3");
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (with python3-prometheus-client, installed by xtask/setup.sh)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition parses: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(ns: &Netns, path: &str) -> (u16, String) {
    let out = ns.run(
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:9464{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn backend_flows(rows: &[(String, BTreeMap<String, String>, f64)]) -> BTreeMap<String, f64> {
    rows.iter()
        .filter(|(n, l, _)| {
            n == "mesh_backend_flows_total"
                && l.get("frontend").map(String::as_str) == Some("*:8080")
        })
        .map(|(_, l, v)| (l["task"].clone(), *v))
        .collect()
}

#[test]
fn metrics_count_exactly_the_traffic_sent() {
    let nets = vec![NetDef {
        name: "appnet".into(),
        octet: 241,
        vni: 4241,
    }];
    let svcs = vec![SvcDef {
        name: "web".into(),
        dnsrr: false,
        networks: vec!["appnet".into()],
        ports: vec![(8080, 80, "tcp")],
        aliases: vec![],
    }];
    let mut c = Cluster::new(1, nets, svcs);
    for slot in 1..=3 {
        c.add_task("web", slot, 0);
    }
    // A conntrack sized by flag (the UDP one left at its default).
    c.agent_args
        .extend(["--conntrack-tcp-max".to_string(), "65536".to_string()]);
    c.start_agents();
    let node = &c.nodes[0].ns;
    assert_eq!(scrape(node, "/healthz"), (200, "ok".into()));
    eventually(
        "ready after the first sync",
        Duration::from_secs(10),
        || (scrape(node, "/readyz").0 == 200).then_some(()),
    );
    assert_eq!(scrape(node, "/nope").0, 404);
    let url = format!("http://{}:8080/", c.nodes[0].addr);
    curl_until(&c.client, &url, "published port");

    let before = backend_flows(&parse(&scrape(node, "/metrics").1));
    assert_eq!(before.len(), 3, "{before:?}");
    for _ in 0..30 {
        assert!(curl(&c.client, &url).is_some());
    }
    let rows = parse(&scrape(node, "/metrics").1);
    let after = backend_flows(&rows);
    let moved: Vec<f64> = after.iter().map(|(k, v)| v - before[k]).collect();
    assert_eq!(
        moved,
        [10.0, 10.0, 10.0],
        "30 connections, 10 per task: {before:?} → {after:?}"
    );
    // Packets in/out moved too; sync and build metrics exist; readiness is 1.
    let get = |name: &str| {
        rows.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    assert!(get("mesh_service_packets_total") > 0.0);
    assert!(get("mesh_syncs_total") >= 1.0);
    assert_eq!(get("mesh_ready"), 1.0);
    assert_eq!(get("mesh_build_info"), 1.0);
    let max_entries = |map: &str| {
        rows.iter()
            .find(|(n, l, _)| {
                n == "mesh_map_max_entries" && l.get("map").map(String::as_str) == Some(map)
            })
            .map(|r| r.2)
    };
    assert_eq!(
        max_entries("conntrack_tcp"),
        Some(65_536.0),
        "the map has the flag's size"
    );
    assert_eq!(
        max_entries("conntrack_udp"),
        Some(mesh_common::maps::MAX_CT_UDP as f64)
    );

    // Settled and nothing to retry: resync ticks (every 300 ms here) leave the tables alone;
    // a full reconcile comes only every FULL_RESYNC (30 s).
    let syncs = || {
        parse(&scrape(node, "/metrics").1)
            .iter()
            .filter(|(n, _, _)| n == "mesh_syncs_total")
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    let before = syncs();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        syncs(),
        before,
        "an idle agent does not re-sync on every tick"
    );
}
