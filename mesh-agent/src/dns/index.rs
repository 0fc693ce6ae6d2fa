//! The in-memory answer index: per network, every local name with its precomputed records.
//!
//! Built once per state snapshot ([`Index::build`]) and swapped atomically, so a query costs
//! a few hash lookups and no allocation: the records (owner name, TTL, data) are ready to be
//! encoded. Modelled on aardvark-dns's backend (names per network, reverse maps per network,
//! lowercased names), with the network chosen from the asking task, not its source address.
//!
//! Names on network `N` (all lowercase, each also accepted with `.N` appended):
//! - `<service>` and every alias of the service on `N`: the service's VIP on `N` (`vip` mode)
//!   or one A per running task with an address on `N` (`dnsrr` mode);
//! - `tasks.<service>`: one A per running task with an address on `N`;
//! - `<service>.<slot>.<task-id>` and `<service>.<slot>` of every running task: its address
//!   on `N` (`<service>.<slot>` holds every running task of that slot, e.g. during an update);
//! - reverse names (`d.c.b.a.in-addr.arpa.`): a running task's address → PTR
//!   `<service>.<slot>.<task-id>.<N>.`; a VIP → PTR `<service>.<N>.`.
//!
//! A service that exists on `N` keeps its names even with no running task: they answer
//! NOERROR with no records (not forwarded), so a scaled-to-zero service never leaks to the
//! upstream resolvers or gets a cacheable NXDOMAIN there.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
};

use hickory_proto::rr::{
    Name, RData, Record,
    rdata::{A, PTR},
};

use crate::model::{EndpointMode, State, Task};

/// Records of one name on one network.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    /// A records (possibly none: a known name without running tasks).
    pub a: Vec<Record>,
    /// The PTR record, for reverse names.
    pub ptr: Option<Record>,
}

/// One network's names.
#[derive(Debug)]
pub(crate) struct NetIndex {
    pub name: String,
    pub names: HashMap<Name, Entry>,
}

/// Every network's names, plus each known task's networks (in the task's order).
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Increases with every build; for diagnostics and tests.
    pub generation: u64,
    nets: Vec<NetIndex>,
    net_ids: HashMap<String, usize>,
    task_nets: HashMap<String, Box<[usize]>>,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A found name: the network that answered and its records.
pub(crate) struct Found<'a> {
    #[cfg_attr(not(test), allow(dead_code))]
    pub network: &'a str,
    pub entry: &'a Entry,
}

impl Index {
    /// Index `state`, with `ttl` on every record. Names that are not valid DNS names (a label
    /// over 63 bytes, a name over 255) are left out and reported in the returned list.
    pub fn build(state: &State, ttl: u32) -> (Self, Vec<String>) {
        let mut b = Builder {
            ttl,
            skipped: Vec::new(),
        };
        let mut nets = Vec::with_capacity(state.networks.len());
        let mut net_ids = HashMap::with_capacity(state.networks.len());
        for net in state.networks.values() {
            net_ids.insert(net.name.clone(), nets.len());
            nets.push(NetIndex {
                name: net.name.clone(),
                names: HashMap::new(),
            });
        }

        // Running tasks by service, in (slot, id) order: one pass over the tasks.
        let mut running_by_service: HashMap<&str, Vec<&Task>> = HashMap::new();
        for t in state.tasks.values().filter(|t| t.state.is_running()) {
            running_by_service.entry(&t.service).or_default().push(t);
        }
        for v in running_by_service.values_mut() {
            v.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        }
        let none = Vec::new();

        for svc in state.services.values() {
            let running = running_by_service.get(svc.name.as_str()).unwrap_or(&none);
            for sn in &svc.networks {
                let Some(&ni) = net_ids.get(&sn.network) else {
                    continue;
                };
                let net = &mut nets[ni];
                let netname = sn.network.to_ascii_lowercase();
                let svcname = svc.name.to_ascii_lowercase();
                let task_addrs: Vec<Ipv4Addr> = running
                    .iter()
                    .filter_map(|t| t.address_on(&sn.network))
                    .collect();
                let svc_addrs: Vec<Ipv4Addr> = match (svc.endpoint_mode, sn.vip) {
                    (EndpointMode::Vip, Some(vip)) => vec![vip],
                    // dnsrr, or (invalid) vip mode without a VIP: the tasks themselves.
                    _ => task_addrs.clone(),
                };

                // The service name and its aliases on this network.
                b.add_a(net, &svcname, &netname, &svc_addrs);
                for alias in &sn.aliases {
                    b.add_a(net, &alias.to_ascii_lowercase(), &netname, &svc_addrs);
                }
                b.add_a(net, &format!("tasks.{svcname}"), &netname, &task_addrs);
                if let (EndpointMode::Vip, Some(vip)) = (svc.endpoint_mode, sn.vip) {
                    b.add_ptr(net, vip, &format!("{svcname}.{netname}"));
                }

                // Running tasks by name.
                for t in running {
                    let Some(addr) = t.address_on(&sn.network) else {
                        continue;
                    };
                    let id = t.id.to_ascii_lowercase();
                    let full = format!("{svcname}.{}.{id}", t.slot);
                    b.add_a(net, &full, &netname, &[addr]);
                    b.add_a(net, &format!("{svcname}.{}", t.slot), &netname, &[addr]);
                    b.add_ptr(net, addr, &format!("{full}.{netname}"));
                }
            }
        }

        let task_nets = state
            .tasks
            .values()
            .map(|t| {
                let ids: Box<[usize]> = t
                    .networks
                    .iter()
                    .filter_map(|n| net_ids.get(&n.network).copied())
                    .collect();
                (t.id.clone(), ids)
            })
            .collect();

        (
            Self {
                generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
                nets,
                net_ids,
                task_nets,
            },
            b.skipped,
        )
    }

    /// Find `name` for the asking task: the first of the task's networks (in its order) that
    /// has the name. `fallback` lists the task's networks when this index does not know the
    /// task (attached before the state listing it arrived). `name` must be fully qualified;
    /// matching is case-insensitive.
    pub fn lookup<'a>(&'a self, task: &str, fallback: &[String], name: &Name) -> Option<Found<'a>> {
        if let Some(ids) = self.task_nets.get(task) {
            ids.iter().find_map(|&i| self.find_in(i, name))
        } else {
            fallback
                .iter()
                .filter_map(|n| self.net_ids.get(n.as_str()).copied())
                .find_map(|i| self.find_in(i, name))
        }
    }

    fn find_in<'a>(&'a self, i: usize, name: &Name) -> Option<Found<'a>> {
        let net = self.nets.get(i)?;
        net.names.get(name).map(|entry| Found {
            network: &net.name,
            entry,
        })
    }

    /// Number of names (forward and reverse) over all networks.
    pub fn len(&self) -> usize {
        self.nets.iter().map(|n| n.names.len()).sum()
    }
}

struct Builder {
    ttl: u32,
    skipped: Vec<String>,
}

impl Builder {
    fn name(&mut self, text: &str) -> Option<Name> {
        let fq = format!("{text}.");
        match Name::from_ascii(&fq) {
            Ok(n) if n.len() <= 255 => Some(n),
            Ok(_) => {
                self.skipped.push(text.to_string());
                None
            }
            Err(_) => {
                self.skipped.push(text.to_string());
                None
            }
        }
    }

    /// Add `base` and `base.<net>` with `addrs` (merged, without duplicates, into what the
    /// names already hold). An empty `addrs` still creates the names.
    fn add_a(&mut self, net: &mut NetIndex, base: &str, netname: &str, addrs: &[Ipv4Addr]) {
        for text in [base.to_string(), format!("{base}.{netname}")] {
            let Some(owner) = self.name(&text) else {
                continue;
            };
            let entry = net.names.entry(owner.clone()).or_default();
            for &addr in addrs {
                let dup = entry
                    .a
                    .iter()
                    .any(|r| matches!(r.data, RData::A(A(a)) if a == addr));
                if !dup {
                    entry.a.push(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::A(A(addr)),
                    ));
                }
            }
        }
    }

    /// Add the reverse name of `addr` pointing at `target` (first one wins).
    fn add_ptr(&mut self, net: &mut NetIndex, addr: Ipv4Addr, target: &str) {
        let Some(target) = self.name(target) else {
            return;
        };
        let mut owner = Name::from(addr);
        owner.set_fqdn(true);
        let entry = net.names.entry(owner.clone()).or_default();
        if entry.ptr.is_none() {
            entry.ptr = Some(Record::from_rdata(owner, self.ttl, RData::PTR(PTR(target))));
        }
    }
}
