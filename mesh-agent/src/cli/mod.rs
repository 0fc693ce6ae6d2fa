//! Command-line interface: one subcommand per verb. Every flag has a `MESH_*` environment
//! fallback; flags win over the environment.

pub mod config;
pub mod demo;
pub mod status;
pub mod whoami;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    ebpf::{Hook, PortRange},
    source::swarm::{DockerEndpoint, SwarmError, TlsOptions},
    tables::Reach,
};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "mesh: eBPF routing mesh and service load balancer node agent"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
// Parsed once at start; boxing `RunArgs` would only add noise at every use.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the node agent.
    Run(RunArgs),
    /// Print services → frontends → backends with counters, from the pinned maps.
    Status(StatusArgs),
    /// Validate a state file without starting anything.
    Check {
        /// The state file.
        file: PathBuf,
    },
    /// The agent's configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Bring up a working single-node mesh on this machine from a bundled example.
    Demo(DemoArgs),
    /// A tiny HTTP (answers its name) and UDP (echo) server for task namespaces.
    #[command(hide = true)]
    Whoami(WhoamiArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (TOML) without starting; unknown keys are errors.
    Check { file: PathBuf },
}

#[derive(Debug, Args, Clone)]
pub struct NodeArgs {
    /// This node's name in the managers' state (default: the host name).
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,
    /// bpffs directory of the pinned maps (default: /sys/fs/bpf/mesh/<node>).
    #[arg(long, env = "MESH_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Directory for the agent's catalog (default: /run/mesh/<node>).
    #[arg(long, env = "MESH_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
}

impl NodeArgs {
    pub fn node(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/mesh/{}", self.node())))
    }
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/mesh/{}", self.node())))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); flags and MESH_* variables override it.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The managers' state file (YAML), watched for changes.
    #[arg(long, env = "MESH_STATE")]
    pub state: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Enter this network namespace first (the node's), e.g. /run/netns/node1.
    #[arg(long, env = "MESH_NETNS")]
    pub netns: Option<PathBuf>,
    /// Interface(s) whose published-port traffic is balanced (default: the default route's).
    #[arg(long = "iface", env = "MESH_IFACES", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// Hook for published-port traffic on those interfaces.
    #[arg(long, env = "MESH_HOOK", value_enum, default_value_t = Hook::Xdp)]
    pub hook: Hook,
    /// Source ports (MIN-MAX) of flows SNATed to tasks on other nodes, per backend: keep them
    /// outside the node's net.ipv4.ip_local_port_range. A task keeps a closed tuple in
    /// TIME_WAIT for 60 s, so the range bounds how many new connections per second one
    /// backend takes from this node before tuples are reused early.
    #[arg(long, env = "MESH_SNAT_PORTS", default_value_t = PortRange::default())]
    pub snat_ports: PortRange,
    /// Entries of the TCP conntrack (two per flow; an LRU: when full, a new flow evicts the
    /// least recently used entry). A flow should outlive its task's 60 s TIME_WAIT: size it
    /// to about 2 × 60 × new connections per second through this node. Each entry takes
    /// about 128 bytes of kernel memory, allocated up front. Changing it replaces the
    /// pinned conntrack on restart (open flows are balanced again).
    #[arg(long, env = "MESH_CONNTRACK_TCP_MAX", default_value_t = mesh_common::maps::MAX_CT_TCP, value_parser = ct_size)]
    pub conntrack_tcp_max: u32,
    /// Entries of the UDP conntrack (as --conntrack-tcp-max).
    #[arg(long, env = "MESH_CONNTRACK_UDP_MAX", default_value_t = mesh_common::maps::MAX_CT_UDP, value_parser = ct_size)]
    pub conntrack_udp_max: u32,
    /// cgroup-v2 directory for socket-level LB of local clients ("none" disables it;
    /// default: the cgroup-v2 root).
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: Option<String>,
    /// Keep the maps pinned on exit so the next agent takes over live connections.
    #[arg(long, env = "MESH_KEEP_DATAPATH")]
    pub keep_datapath: bool,
    /// Do not serve DNS on 127.0.0.11 in tasks.
    #[arg(long, env = "MESH_NO_DNS")]
    pub no_dns: bool,
    /// Upstream resolvers for names mesh does not know (default: the node's resolv.conf).
    #[arg(
        long = "dns-upstream",
        env = "MESH_DNS_UPSTREAMS",
        value_delimiter = ','
    )]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Which tasks can be backends: this node's only, or the whole cluster (over overlays).
    #[arg(long, env = "MESH_REACH", value_enum, default_value_t = ReachArg::Local)]
    pub reach: ReachArg,
    /// Period of retries (what failed or waits for a namespace) and node-address refresh, in
    /// milliseconds.
    #[arg(long, env = "MESH_RESYNC_MS", default_value_t = 2000)]
    pub resync_ms: u64,
    /// Period of the full reconcile against the kernel (drift repair: links, overlays, maps
    /// someone else changed) when nothing waits for a retry, in milliseconds; it runs on a
    /// resync tick, so never more often than --resync-ms.
    #[arg(long, env = "MESH_RECONCILE_MS", default_value_t = crate::agent::FULL_RESYNC.as_millis() as u64)]
    pub reconcile_ms: u64,
    /// Address of the /metrics, /healthz, /readyz endpoint ("none" disables it).
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Log filter (tracing syntax, e.g. "info" or "mesh_agent=debug"); reloaded on SIGHUP
    /// from the config file.
    #[arg(long, env = "MESH_LOG")]
    pub log: Option<String>,
    /// Who owns the tasks' namespaces: mesh (state file, mesh attaches tasks) or docker (a real
    /// Swarm: mesh replaces only IPVS).
    #[arg(long, env = "MESH_RUNTIME", value_enum, default_value_t = RuntimeArg::Mesh)]
    pub runtime: RuntimeArg,
    /// Docker runtime: the managers' Engine API (host and TLS settings); `Some` as soon as
    /// any of them is given, which implies the Swarm source.
    #[command(flatten)]
    pub docker_host: Option<DockerHostArgs>,
    /// Docker runtime: the ingress sandbox's netns (default: found next to the tasks'
    /// sandboxes, whose paths come from the Engine API).
    #[arg(long, env = "MESH_DOCKER_INGRESS_SBOX")]
    pub docker_ingress_sbox: Option<PathBuf>,
    /// The Swarm service this agent runs as (set by the stack file from
    /// `{{.Service.Name}}`): on SIGTERM the data path is kept while the service exists (a
    /// rolling update hands over without cutting connections) and removed once it is gone
    /// (`docker service rm`).
    #[arg(long, env = "MESH_SWARM_SERVICE")]
    pub swarm_service: Option<String>,
}

/// Where the managers' Engine API is, the way the docker CLI takes it (`-H`, `--tlsverify`,
/// `--tlscacert`, `--tlscert`, `--tlskey`, `DOCKER_CERT_PATH`), under `--docker-*` names and
/// `MESH_DOCKER_*` variables. Docker's own `DOCKER_HOST`, `DOCKER_TLS_VERIFY` and
/// `DOCKER_CERT_PATH` are not read: a shell's docker settings must not switch the agent's
/// source.
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
#[group(id = "docker_endpoint", multiple = true)]
pub struct DockerHostArgs {
    /// Docker runtime: the managers' Engine API, as docker's -H: unix:///path (or a path;
    /// default /var/run/docker.sock) or tcp://host[:port] (with --docker-tls-verify for TLS);
    /// implies the Swarm source.
    #[arg(
        id = "docker_host",
        long = "docker-host",
        env = "MESH_DOCKER_HOST",
        value_name = "HOST"
    )]
    pub host: Option<String>,
    /// Docker runtime on a worker node: a manager's Engine API (same syntax as
    /// --docker-host), read for the cluster state (nodes, networks, services, tasks), while
    /// --docker-host is this node's own daemon (its swarm node id, its tasks' sandboxes,
    /// container events), which may then be a worker's. The TLS settings below apply to
    /// both (to whichever of them is tcp://). Without it, --docker-host must be a manager.
    #[arg(
        id = "docker_manager",
        long = "docker-manager",
        env = "MESH_DOCKER_MANAGER",
        value_name = "HOST"
    )]
    pub manager: Option<String>,
    /// TLS to the tcp:// host: verify the daemon against the CA, present the client
    /// certificate (docker --tlsverify). Without --docker-host: tcp://localhost:2376, as
    /// docker does.
    #[arg(
        id = "docker_tls_verify",
        long = "docker-tls-verify",
        env = "MESH_DOCKER_TLS_VERIFY"
    )]
    pub tls_verify: bool,
    /// Directory with ca.pem, cert.pem and key.pem (docker's DOCKER_CERT_PATH).
    #[arg(
        id = "docker_cert_path",
        long = "docker-cert-path",
        env = "MESH_DOCKER_CERT_PATH",
        value_name = "DIR"
    )]
    pub cert_path: Option<PathBuf>,
    /// CA certificate that the daemon's certificate must chain to (default: ca.pem in
    /// --docker-cert-path).
    #[arg(
        id = "docker_tlscacert",
        long = "docker-tlscacert",
        env = "MESH_DOCKER_TLSCACERT",
        value_name = "FILE"
    )]
    pub tlscacert: Option<PathBuf>,
    /// Client certificate (default: cert.pem in --docker-cert-path).
    #[arg(
        id = "docker_tlscert",
        long = "docker-tlscert",
        env = "MESH_DOCKER_TLSCERT",
        value_name = "FILE"
    )]
    pub tlscert: Option<PathBuf>,
    /// Client certificate's key (default: key.pem in --docker-cert-path).
    #[arg(
        id = "docker_tlskey",
        long = "docker-tlskey",
        env = "MESH_DOCKER_TLSKEY",
        value_name = "FILE"
    )]
    pub tlskey: Option<PathBuf>,
}

impl DockerHostArgs {
    pub fn tls_options(&self) -> TlsOptions {
        TlsOptions {
            verify: self.tls_verify,
            cert_path: self.cert_path.clone(),
            ca: self.tlscacert.clone(),
            cert: self.tlscert.clone(),
            key: self.tlskey.clone(),
        }
    }
}

/// This node's daemon, as the settings name it (TLS files checked to exist); errors name the
/// setting or file at fault.
impl TryFrom<&DockerHostArgs> for DockerEndpoint {
    type Error = SwarmError;
    fn try_from(args: &DockerHostArgs) -> Result<Self, SwarmError> {
        if args.manager.is_none() {
            return DockerEndpoint::resolve(args.host.as_deref(), &args.tls_options());
        }
        args.resolve_with_manager(
            args.host
                .as_deref()
                .unwrap_or(crate::source::swarm::DEFAULT_SOCKET),
        )
    }
}

impl DockerHostArgs {
    /// The manager named by --docker-manager, if any.
    ///
    /// With a manager, the TLS settings apply to whichever of the two endpoints is tcp://
    /// (both, if both are), and --docker-host defaults to the local socket
    /// ([`crate::source::swarm::DEFAULT_SOCKET`]) even with --docker-tls-verify. TLS
    /// settings while neither is tcp:// are refused, as without a manager.
    pub fn manager_endpoint(&self) -> Result<Option<DockerEndpoint>, SwarmError> {
        self.manager
            .as_deref()
            .map(|m| self.resolve_with_manager(m))
            .transpose()
    }

    fn resolve_with_manager(&self, host: &str) -> Result<DockerEndpoint, SwarmError> {
        let tcp = |h: &str| h.starts_with("tcp://");
        let local = self
            .host
            .as_deref()
            .unwrap_or(crate::source::swarm::DEFAULT_SOCKET);
        let any_tcp = tcp(local) || self.manager.as_deref().is_some_and(tcp);
        if tcp(host) || !any_tcp {
            DockerEndpoint::resolve(Some(host), &self.tls_options())
        } else {
            DockerEndpoint::resolve(Some(host), &TlsOptions::default())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeArg {
    Mesh,
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReachArg {
    Local,
    Cluster,
}

impl From<ReachArg> for Reach {
    fn from(r: ReachArg) -> Self {
        match r {
            ReachArg::Local => Reach::LocalOnly,
            ReachArg::Cluster => Reach::Cluster,
        }
    }
}

impl RunArgs {
    /// The Engine API the Docker settings name ([`DockerEndpoint::default`] without any):
    /// this node's daemon.
    pub fn docker_endpoint(&self) -> Result<DockerEndpoint, SwarmError> {
        self.docker_host
            .as_ref()
            .map_or_else(|| Ok(DockerEndpoint::default()), DockerEndpoint::try_from)
    }

    /// The manager's Engine API (--docker-manager), if one is named apart from this node's.
    pub fn docker_manager(&self) -> Result<Option<DockerEndpoint>, SwarmError> {
        self.docker_host
            .as_ref()
            .map_or(Ok(None), DockerHostArgs::manager_endpoint)
    }

    pub fn agent_config(&self) -> crate::agent::AgentConfig {
        let node = self.node.node();
        let mut cfg = crate::agent::AgentConfig::for_node(&node);
        cfg.interfaces = self.ifaces.clone();
        cfg.hook = self.hook;
        cfg.snat_ports = self.snat_ports;
        cfg.conntrack = crate::ebpf::CtSizes {
            tcp: self.conntrack_tcp_max,
            udp: self.conntrack_udp_max,
        };
        cfg.pin_dir = self.node.pin_dir();
        cfg.run_dir = self.node.run_dir();
        if self.runtime == RuntimeArg::Docker && self.node.node.is_none() {
            // The Swarm source names this node (its daemon's node), after its first sync.
            cfg.node = String::new();
            cfg.pin_dir = self.node.pin_dir.clone().unwrap_or_default();
            cfg.run_dir = self.node.run_dir.clone().unwrap_or_default();
        }
        cfg.cgroup = match self.cgroup.as_deref() {
            Some("none") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => crate::ebpf::default_cgroup(),
        };
        cfg.keep_datapath = self.keep_datapath;
        cfg.reach = self.reach.into();
        cfg.resync = Duration::from_millis(self.resync_ms.max(100));
        cfg.reconcile = Duration::from_millis(self.reconcile_ms);
        cfg.metrics_addr = match self.metrics_addr.as_str() {
            "none" | "" => None,
            a => a.parse().ok(),
        };
        if let Some(name) = &self.swarm_service {
            // The source was made from the same settings, so they resolve (checked anyway).
            // Services are listed by a manager: --docker-manager if given.
            let endpoint = match self.docker_manager() {
                Ok(Some(m)) => Ok(m),
                Ok(None) => self.docker_endpoint(),
                Err(e) => Err(e),
            };
            match endpoint {
                Ok(endpoint) => cfg.swarm_service = Some((endpoint, name.clone())),
                Err(e) => tracing::warn!(error = %e, "--swarm-service ignored: no Docker endpoint"),
            }
        }
        if self.runtime == RuntimeArg::Docker {
            cfg.runtime = crate::agent::Runtime::Docker {
                ingress_sbox: self.docker_ingress_sbox.clone(),
            };
            // Every task of the cluster, local ones too, is reached over Docker's overlays.
            cfg.reach = Reach::Routed;
        }
        cfg
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Interface to balance published ports on (default: the default route's).
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
    /// Hook for published-port traffic.
    #[arg(long, value_enum, default_value_t = Hook::Xdp)]
    pub hook: Hook,
}

#[derive(Debug, Args)]
pub struct WhoamiArgs {
    /// Name to answer with (default: the host name, e.g. a container's id).
    #[arg(long)]
    pub name: Option<String>,
    /// Enter this network namespace first.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// HTTP listen address(es).
    #[arg(long)]
    pub http: Vec<SocketAddr>,
    /// UDP echo listen address(es).
    #[arg(long)]
    pub udp: Vec<SocketAddr>,
}

/// The embedded DNS server as the agent's per-task service, unless disabled: upstreams from
/// `--dns-upstream`, else from the node's /etc/resolv.conf.
pub async fn dns_service(
    args: &RunArgs,
) -> anyhow::Result<Option<Box<dyn crate::agent::TaskService>>> {
    use anyhow::Context;
    if args.no_dns {
        return Ok(None);
    }
    let resolv = std::path::Path::new("/etc/resolv.conf");
    let mut cfg = if resolv.exists() {
        crate::dns::DnsConfig::from_resolv_conf(resolv).context("DNS upstreams")?
    } else {
        crate::dns::DnsConfig::default()
    };
    if !args.dns_upstreams.is_empty() {
        cfg.upstreams = args.dns_upstreams.clone();
    }
    // With the socket hooks (the default), the server listens on a high port and the hooks
    // send 127.0.0.11:53 there, leaving port 53 free for the tasks' own servers.
    if args.cgroup.as_deref() != Some("none") && args.runtime == RuntimeArg::Mesh {
        cfg.port = DNS_HOOKED_PORT;
    }
    tracing::info!(upstreams = ?cfg.upstreams, ttl = cfg.ttl, "embedded DNS on {}:{} in every task", cfg.listen, cfg.port);
    Ok(Some(Box::new(DnsService(crate::dns::Dns::new(cfg)))))
}

/// Where the embedded DNS server listens at 127.0.0.11 in tasks when the socket hooks
/// redirect port 53 to it.
pub const DNS_HOOKED_PORT: u16 = 53053;

/// [`crate::dns::Dns`] as the agent's per-task service.
pub struct DnsService(pub crate::dns::Dns);

impl crate::agent::TaskService for DnsService {
    fn update(&self, state: std::sync::Arc<crate::model::State>) {
        self.0.update(state);
    }
    fn attach<'a>(
        &'a self,
        task: &'a crate::model::Task,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.attach(task).await.map_err(|e| e.to_string()) })
    }
    fn detach<'a>(&'a self, task_id: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.0.detach(task_id))
    }
    fn shutdown(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.0.shutdown())
    }
    fn dns_stats(&self) -> Option<Box<dyn Fn() -> crate::dns::DnsStats + Send + Sync>> {
        let dns = self.0.clone();
        Some(Box::new(move || dns.stats()))
    }
    fn dns_port(&self) -> Option<u16> {
        Some(self.0.config().port).filter(|p| *p != 53)
    }
}

/// A conntrack size flag: a number of entries within the bounds of [`crate::ebpf::CtSizes`].
fn ct_size(v: &str) -> Result<u32, String> {
    let n: u32 = v
        .replace('_', "")
        .parse()
        .map_err(|e| format!("`{v}`: {e}"))?;
    crate::ebpf::check_ct_size("entries", n)?;
    Ok(n)
}
