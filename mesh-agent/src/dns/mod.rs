//! Embedded DNS: a resolver on 127.0.0.11:53 (UDP and TCP) inside every attached task.
//!
//! Each task gets its own listeners, bound inside its network namespace: TCP served by a
//! hickory-server [`Server`], UDP by our own loop (`udp.rs`, every task's loop on one DNS
//! thread with a current-thread runtime of its own) that answers plain queries for
//! local names straight from the index and hands everything else to the same
//! [`RequestHandler`](hickory_server::server::RequestHandler). The handler knows which task
//! it serves: the asker is identified by its listener, never by the packet's source address. Answers come from an in-memory index (`index.rs`) built from the
//! managers' [`State`] and swapped atomically on [`Dns::update`]; everything else is
//! forwarded to the node's upstream resolvers (`forward.rs`).
//!
//! Behaviour (Docker's embedded DNS, see `swarm-behaviour.md`, with these choices):
//! - Names, per network the asking task shares with the service: `<service>` and its aliases
//!   (VIP in `vip` mode, every running task in `dnsrr` mode), `tasks.<service>`, the task
//!   names `<service>.<slot>.<task-id>` and `<service>.<slot>` (running tasks only). Each is
//!   also accepted with the network as suffix (`web.appnet`), case-insensitively. The first
//!   of the asker's networks (in its order) that has the name answers; networks never mix.
//!   A name that exists only on networks the asker is not on is forwarded like any other.
//! - PTR, on the asker's networks: a task address → `<service>.<slot>.<task-id>.<network>.`
//!   (Docker's `<container-name>.<network>.`); a VIP → `<service>.<network>.` (beyond
//!   Docker, which has none for VIPs). Both resolve back to the address.
//! - A known name asked for another type (AAAA, MX, TXT, ...): NOERROR, no records, not
//!   forwarded (ANY gets the A/PTR records). A service without running tasks keeps its
//!   names (NOERROR, no records) rather than leaking to the upstreams.
//! - TTL [`DnsConfig::ttl`], default 5 s (Docker: 600 s), so scaling shows quickly; nothing
//!   is cached server-side, so every answer reflects the index of that moment.
//! - Multi-record answers are rotated to a random start on every query. Owner names are the
//!   lowercase form of the name asked (the question section keeps the client's case).
//! - Flags: QR, RA, RD echoed; AA never set (as Docker). An OPT record is returned when the
//!   query had one, with UDP size min(client's, [`DnsConfig::udp_payload`]); UDP answers
//!   over that size (512 without EDNS) are truncated with TC and complete over TCP.
//! - Forwarding: upstreams in order, [`DnsConfig::upstream_timeout`] each, within
//!   [`DnsConfig::forward_deadline`] overall, UDP then TCP on truncation; then SERVFAIL
//!   (Docker sends nothing and the client waits). At most
//!   [`DnsConfig::max_inflight_forwards`] forwards in flight over all tasks; beyond that,
//!   REFUSED at once. Upstream answers are decoded and re-encoded (hickory-proto), TTLs
//!   kept; an answer hickory-proto cannot decode counts as that upstream failing.
//! - Malformed input: undecodable messages get FORMERR (or are dropped if even the header is
//!   short), responses are dropped, opcodes other than QUERY get NOTIMP, zero or several
//!   questions FORMERR, EDNS versions above 0 BADVERS.
//! - No log line per query (but hickory-server logs each request at INFO under the
//!   `hickory_server` target: filter it to `warn`).
//! - resolv.conf: [`Dns::attach`] writes `nameserver 127.0.0.11`, the node's search domains
//!   and `options ndots:0` to `task.resolv_conf`, or to `/etc/netns/<name>/resolv.conf` for
//!   a namespace at `/run/netns/<name>` (what `ip netns exec` mounts); [`Dns::detach`]
//!   removes it (and that directory if attach created it and it is empty).
//!
//! The listeners hold a reference to the task's namespace: detach when the task goes.

mod forward;
mod handler;
mod index;
mod resolv;
mod rng;
mod stats;
#[cfg(test)]
mod tests;
mod udp;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tracing::Instrument;

use crate::{
    model::{State, Task},
    netns::{self, NetnsError},
};

use handler::{Shared, TaskHandler};
pub use stats::{DnsStats, LATENCY_BOUNDS_US, LatencyHistogram, RcodeCounts};

/// The address Docker's embedded DNS listens on, which containers expect.
pub const DEFAULT_LISTEN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// Configuration of the embedded DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Resolvers for non-local names, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Time given to one upstream before trying the next (default 2 s).
    pub upstream_timeout: Duration,
    /// Bound on a whole forward over all upstreams, after which the client gets SERVFAIL
    /// (default 4 s: below glibc's 5 s retry timeout, so the client sees our answer).
    pub forward_deadline: Duration,
    /// Forwards in flight over all tasks; more are answered REFUSED (default 1024).
    pub max_inflight_forwards: usize,
    /// TTL of local answers, in seconds (default 5).
    pub ttl: u32,
    /// Listen address inside each task (default 127.0.0.11).
    pub listen: Ipv4Addr,
    /// Listen port (default 53).
    pub port: u16,
    /// Search domains written into tasks' resolv.conf (default: none; the node's ones with
    /// [`from_resolv_conf`](Self::from_resolv_conf)).
    pub search: Vec<String>,
    /// Idle TCP connections are closed after this long (default 3 s, as aardvark-dns).
    pub tcp_idle_timeout: Duration,
    /// Our EDNS UDP payload size towards clients (default 4096; the client path is loopback).
    pub udp_payload: u16,
    /// Where named namespaces' config lives (default `/etc/netns`, what `ip netns exec` reads).
    pub etc_netns: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            forward_deadline: Duration::from_secs(4),
            max_inflight_forwards: 1024,
            ttl: 5,
            listen: DEFAULT_LISTEN,
            port: 53,
            search: Vec::new(),
            tcp_idle_timeout: Duration::from_secs(3),
            udp_payload: 4096,
            etc_netns: PathBuf::from("/etc/netns"),
        }
    }
}

impl DnsConfig {
    /// Defaults, plus upstreams and search domains from a resolv.conf (normally the node's
    /// `/etc/resolv.conf`). A nameserver equal to our own listen address is skipped (it would
    /// be a loop); other loopback ones (e.g. systemd-resolved's 127.0.0.53) are kept, since
    /// forwarding happens from the agent's namespace, where they are reachable.
    pub fn from_resolv_conf(path: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string(path).map_err(|source| DnsError::ReadResolvConf {
            path: path.to_path_buf(),
            source,
        })?;
        let rc = resolv::parse(&text);
        let mut cfg = Self::default();
        cfg.upstreams = rc
            .nameservers
            .iter()
            .filter(|ns| ns.ip() != IpAddr::V4(cfg.listen))
            .copied()
            .collect();
        cfg.search = rc.search;
        if cfg.upstreams.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "no usable nameserver: non-local names will get SERVFAIL"
            );
        }
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read resolver configuration {path}: {source}")]
    ReadResolvConf { path: PathBuf, source: io::Error },
    #[error("task {task}: no network namespace to serve DNS in")]
    NoNetns { task: String },
    #[error("task {task}: {source}")]
    Netns { task: String, source: NetnsError },
    #[error("task {task}: cannot bind DNS {proto} on {addr} in {netns}: {source}")]
    Bind {
        task: String,
        netns: PathBuf,
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("task {task}: cannot hand the DNS sockets to the runtime: {source}")]
    Register { task: String, source: io::Error },
    #[error("task {task}: socket thread failed: {source}")]
    Join {
        task: String,
        source: tokio::task::JoinError,
    },
    #[error("task {task}: cannot write {path}: {source}")]
    ResolvConf {
        task: String,
        path: PathBuf,
        source: io::Error,
    },
}

/// The embedded DNS server of a node: one listener pair per attached task. Cheap to clone
/// (all clones share the listeners and the index).
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Where the UDP loops run (`None`: on the caller's runtime, if the thread could not
    /// start).
    udp_rt: Option<UdpRuntime>,
    /// Serialises attach/detach (held across their awaits).
    ops: tokio::sync::Mutex<()>,
    tasks: Mutex<HashMap<String, Attached>>,
}

struct Attached {
    server: Listeners,
    resolv: Option<resolv::Written>,
}

/// The thread every task's UDP loop runs on: a current-thread tokio runtime of its own. A
/// query's wake-up goes from epoll straight to its loop, with no work-stealing scheduler in
/// between, and a burst of queries never queues behind the agent's control work (nor the
/// other way round). The slow path (forwards) runs there too; TCP stays on the agent's
/// runtime. The thread ends, and its loops with it, when the last clone of [`Dns`] goes.
struct UdpRuntime {
    handle: tokio::runtime::Handle,
    /// Dropped with [`Inner`]: the thread's `block_on` returns and drops the runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl UdpRuntime {
    fn start() -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("mesh-dns-udp".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// One task's listeners: hickory's server for TCP, our UDP loop (`udp.rs`).
struct Listeners {
    tcp: Server<TaskHandler>,
    udp: tokio::task::JoinHandle<()>,
}

impl Dns {
    pub fn new(cfg: DnsConfig) -> Self {
        let udp_rt = UdpRuntime::start()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot start the DNS UDP thread; serving UDP on the agent's runtime")
            })
            .ok();
        Self {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared::new(cfg)),
                udp_rt,
                ops: tokio::sync::Mutex::new(()),
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &DnsConfig {
        &self.inner.shared.cfg
    }

    /// Answer from `state` from the next query on (atomic swap of the index).
    pub fn update(&self, state: Arc<State>) {
        let (index, skipped) = index::Index::build(&state, self.inner.shared.cfg.ttl);
        if !skipped.is_empty() {
            tracing::warn!(
                count = skipped.len(),
                first = %skipped[0],
                "names that are not valid DNS names are not served"
            );
        }
        tracing::debug!(
            generation = index.generation,
            names = index.len(),
            "DNS index updated"
        );
        self.inner.shared.index.store(Arc::new(index));
    }

    /// Serve DNS inside `task`'s network namespace and write its resolv.conf. Idempotent: an
    /// attached task id is left as is (its network changes come through
    /// [`update`](Self::update)). On error nothing is left behind.
    pub async fn attach(&self, task: &Task) -> Result<(), DnsError> {
        let span = tracing::info_span!("dns_attach", task = %task.id);
        self.attach_in_span(task).instrument(span).await
    }

    async fn attach_in_span(&self, task: &Task) -> Result<(), DnsError> {
        let _op = self.inner.ops.lock().await;
        if self.is_attached(&task.id) {
            return Ok(());
        }
        let id = || task.id.clone();
        let netns_path = task
            .netns
            .clone()
            .ok_or_else(|| DnsError::NoNetns { task: id() })?;
        let cfg = &self.inner.shared.cfg;
        let addr = SocketAddr::from((cfg.listen, cfg.port));
        let path = netns_path.clone();
        let bound = tokio::task::spawn_blocking(move || netns::run_in(&path, move || bind(addr)))
            .await
            .map_err(|source| DnsError::Join { task: id(), source })?
            .map_err(|source| DnsError::Netns { task: id(), source })?;
        let (udp, tcp) = bound.map_err(|(proto, source)| DnsError::Bind {
            task: id(),
            netns: netns_path.clone(),
            proto,
            addr,
            source,
        })?;
        let mut server = self.serve(task, udp, tcp)?;
        let resolv = match resolv::write(task, &cfg.etc_netns, cfg.listen, &cfg.search) {
            Ok(w) => w,
            Err(e) => {
                stop(&task.id, &mut server).await;
                return Err(e);
            }
        };
        tracing::info!(
            netns = %netns_path.display(),
            resolv_conf = ?resolv.as_ref().map(|w| &w.path),
            "DNS attached"
        );
        self.lock_tasks()
            .insert(task.id.clone(), Attached { server, resolv });
        Ok(())
    }

    /// Serve `task` on sockets bound by the caller (no namespace switch, no resolv.conf):
    /// for tests, or to serve a task from sockets handed over by a runtime. Idempotent like
    /// [`attach`](Self::attach); [`detach`](Self::detach) closes them.
    pub async fn serve_sockets(
        &self,
        task: &Task,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<(), DnsError> {
        let _op = self.inner.ops.lock().await;
        if self.is_attached(&task.id) {
            return Ok(());
        }
        let server = self.serve(task, udp, tcp)?;
        self.lock_tasks().insert(
            task.id.clone(),
            Attached {
                server,
                resolv: None,
            },
        );
        Ok(())
    }

    fn serve(
        &self,
        task: &Task,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<Listeners, DnsError> {
        let reg = |source| DnsError::Register {
            task: task.id.clone(),
            source,
        };
        udp.set_nonblocking(true).map_err(reg)?;
        tcp.set_nonblocking(true).map_err(reg)?;
        let tcp = TcpListener::from_std(tcp).map_err(reg)?;
        // The UDP socket registers with the runtime that will poll it.
        let udp_rt = self.inner.udp_rt.as_ref().map(|r| r.handle.clone());
        let udp = {
            let _in = udp_rt.as_ref().map(|h| h.enter());
            UdpSocket::from_std(udp).map_err(reg)?
        };
        let handler = TaskHandler {
            shared: self.inner.shared.clone(),
            task: Arc::from(task.id.as_str()),
            fallback: task.networks.iter().map(|n| n.network.clone()).collect(),
        };
        let mut server = Server::new(handler.clone());
        server.register_listener(tcp, self.inner.shared.cfg.tcp_idle_timeout, 32);
        let udp = match &udp_rt {
            Some(h) => h.spawn(udp::serve(udp, handler)),
            None => tokio::spawn(udp::serve(udp, handler)),
        };
        Ok(Listeners { tcp: server, udp })
    }

    /// Stop serving `task_id` (its listeners are closed when this returns) and remove the
    /// resolv.conf written for it. Unknown ids are ignored.
    pub async fn detach(&self, task_id: &str) {
        let span = tracing::info_span!("dns_detach", task = %task_id);
        async {
            let _op = self.inner.ops.lock().await;
            let Some(mut att) = self.lock_tasks().remove(task_id) else {
                return;
            };
            stop(task_id, &mut att.server).await;
            if let Some(w) = &att.resolv {
                w.remove();
            }
            tracing::info!("DNS detached");
        }
        .instrument(span)
        .await
    }

    /// Detach every task.
    pub async fn shutdown(&self) {
        for id in self.attached() {
            self.detach(&id).await;
        }
    }

    /// Ids of the attached tasks, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock_tasks().keys().cloned().collect();
        v.sort();
        v
    }

    pub fn stats(&self) -> DnsStats {
        let attached = self.lock_tasks().len();
        let shared = &self.inner.shared;
        shared.stats.snapshot(
            attached,
            shared.inflight.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn is_attached(&self, id: &str) -> bool {
        self.lock_tasks().contains_key(id)
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attached>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Bind UDP and TCP on `addr` (run inside the task's namespace).
fn bind(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), (&'static str, io::Error)> {
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| ("udp", e))?;
    let tcp = std::net::TcpListener::bind(addr).map_err(|e| ("tcp", e))?;
    Ok((udp, tcp))
}

/// Shut a task's server down: stop accepting, wait (bounded) for its tasks; dropping the
/// server aborts whatever is left, closing the sockets.
async fn stop(task_id: &str, l: &mut Listeners) {
    // The UDP loop holds no state worth finishing: abort it and wait until its socket is
    // closed (queries in flight are dropped; clients retry).
    l.udp.abort();
    let _ = (&mut l.udp).await;
    let server = &mut l.tcp;
    match tokio::time::timeout(Duration::from_secs(2), server.shutdown_gracefully()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(task = task_id, error = %e, "DNS server ended with an error"),
        Err(_) => tracing::warn!(
            task = task_id,
            "DNS server did not stop within 2 s; aborting it"
        ),
    }
}
