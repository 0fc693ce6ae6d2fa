//! `mesh-agent status`: services → published ports/VIPs → backends with their counters,
//! read straight from the pinned maps (like `ipvsadm -Ln --stats`), so it works whether
//! or not the agent is running right now.

use std::{fmt::Write, path::Path};

use serde::Serialize;

use crate::{
    agent::{Catalog, read_catalog},
    ebpf::Maps,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    pub frontends: Vec<FrontendStatus>,
    pub conntrack_entries: usize,
    /// Sizes of the TCP and UDP conntrack maps (`--conntrack-*-max` of the agent that
    /// created them).
    pub conntrack_tcp_max: u32,
    pub conntrack_udp_max: u32,
    pub verdicts: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct FrontendStatus {
    pub service: String,
    pub protocol: String,
    pub addr: String,
    pub port: u16,
    pub flows: u64,
    pub pkts_in: u64,
    pub pkts_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub task: String,
    pub addr: String,
    pub port: u16,
    pub local: bool,
    pub flows: u64,
    pub pkts_in: u64,
    pub pkts_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no pinned maps in {0} (is an agent running for this node? try --node or --pin-dir)")]
    NoPins(String),
    #[error("{0}")]
    Maps(#[from] crate::ebpf::DatapathError),
}

pub fn collect(pin_dir: &Path, run_dir: &Path) -> Result<Status, StatusError> {
    if !pin_dir.join(mesh_common::maps::FRONTENDS).exists() {
        return Err(StatusError::NoPins(pin_dir.display().to_string()));
    }
    let maps = Maps::open_pinned(pin_dir)?;
    // Without a catalog (agent stopped with --keep-datapath), ids are shown without names.
    let cat = read_catalog(run_dir).unwrap_or_else(|_| Catalog::default());
    let mut frontends = Vec::new();
    for fe in &cat.frontends {
        let s = maps.service_stats(fe.svc_id);
        let backends = fe
            .backends
            .iter()
            .map(|b| {
                let bs = maps.backend_stats(b.id);
                BackendStatus {
                    task: b.task.clone(),
                    addr: b.addr.to_string(),
                    port: b.port,
                    local: b.local,
                    flows: bs.flows,
                    pkts_in: bs.pkts_in,
                    pkts_out: bs.pkts_out,
                    bytes_in: bs.bytes_in,
                    bytes_out: bs.bytes_out,
                }
            })
            .collect();
        frontends.push(FrontendStatus {
            service: fe.service.clone(),
            protocol: fe.protocol.clone(),
            addr: fe.addr.clone(),
            port: fe.port,
            flows: s.flows,
            pkts_in: s.pkts_in,
            pkts_out: s.pkts_out,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            backends,
        });
    }
    Ok(Status {
        node: cat.node,
        frontends,
        conntrack_entries: maps.conntrack_len(),
        conntrack_tcp_max: maps.ct_capacity[0],
        conntrack_udp_max: maps.ct_capacity[1],
        verdicts: maps.verdicts(),
    })
}

/// `ipvsadm -Ln --stats`-style text.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "mesh node {}",
        if s.node.is_empty() { "?" } else { &s.node }
    );
    let _ = writeln!(
        o,
        "{:<5} {:<28} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "Prot", "LocalAddress:Port / Service", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"
    );
    let _ = writeln!(o, "  -> RemoteAddress:Port         Task");
    for f in &s.frontends {
        let _ = writeln!(
            o,
            "{:<5} {:<28} {:>8} {:>10} {:>10} {:>12} {:>12}",
            f.protocol.to_uppercase(),
            format!("{}:{} ({})", f.addr, f.port, f.service),
            f.flows,
            f.pkts_in,
            f.pkts_out,
            f.bytes_in,
            f.bytes_out
        );
        for b in &f.backends {
            let _ = writeln!(
                o,
                "  -> {:<26} {:<40} {:>8} {:>10} {:>10} {:>12} {:>12}",
                format!("{}:{}", b.addr, b.port),
                format!("{}{}", b.task, if b.local { "" } else { " (remote)" }),
                b.flows,
                b.pkts_in,
                b.pkts_out,
                b.bytes_in,
                b.bytes_out
            );
        }
    }
    let _ = writeln!(
        o,
        "conntrack entries: {} (maps of {} TCP, {} UDP)",
        s.conntrack_entries, s.conntrack_tcp_max, s.conntrack_udp_max
    );
    let v: Vec<String> = s
        .verdicts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let _ = writeln!(
        o,
        "packets: {}",
        if v.is_empty() {
            "none yet".into()
        } else {
            v.join(" ")
        }
    );
    o
}
