//! The agent's configuration file (TOML), layered under flags and environment:
//!
//! **precedence: command-line flag > `MESH_*` environment variable > config file > default.**
//!
//! Every key mirrors a `mesh-agent run` flag (dashes become underscores). An unknown key is
//! an error naming it. `mesh-agent config check FILE` validates a file without starting.
//!
//! ```toml
//! state = "/etc/mesh/state.yaml"
//! node = "node1"
//! ifaces = ["eth0"]
//! hook = "xdp"              # xdp | tc
//! cgroup = "/sys/fs/cgroup" # or "none"
//! keep_datapath = false
//! no_dns = false
//! dns_upstreams = ["10.0.0.2:53"]
//! reach = "cluster"         # local | cluster
//! snat_ports = "10000-32767"
//! conntrack_tcp_max = 1048576  # entries, two per flow
//! conntrack_udp_max = 131072
//! resync_ms = 2000
//! reconcile_ms = 30000      # full drift repair when idle
//! metrics_addr = "127.0.0.1:9464"  # or "none"
//! log = "info"              # a tracing filter; reloaded on SIGHUP
//! # under a real Docker Swarm:
//! runtime = "docker"        # mesh | docker
//! docker_host = "tcp://10.0.0.1:2376"
//! docker_tls_verify = true
//! docker_cert_path = "/etc/mesh/docker-certs"   # ca.pem, cert.pem, key.pem
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{ArgMatches, parser::ValueSource};
use serde::Deserialize;

use super::{ReachArg, RunArgs, RuntimeArg};
use crate::ebpf::{Hook, PortRange};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state: Option<PathBuf>,
    pub node: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    pub ifaces: Option<Vec<String>>,
    pub hook: Option<HookName>,
    pub cgroup: Option<String>,
    pub keep_datapath: Option<bool>,
    pub no_dns: Option<bool>,
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    pub reach: Option<ReachName>,
    pub snat_ports: Option<String>,
    pub conntrack_tcp_max: Option<u32>,
    pub conntrack_udp_max: Option<u32>,
    pub resync_ms: Option<u64>,
    pub reconcile_ms: Option<u64>,
    pub metrics_addr: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    pub runtime: Option<RuntimeName>,
    pub docker_host: Option<String>,
    pub docker_manager: Option<String>,
    pub docker_tls_verify: Option<bool>,
    pub docker_cert_path: Option<PathBuf>,
    pub docker_tlscacert: Option<PathBuf>,
    pub docker_tlscert: Option<PathBuf>,
    pub docker_tlskey: Option<PathBuf>,
    pub docker_ingress_sbox: Option<PathBuf>,
    pub swarm_service: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Mesh,
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookName {
    Xdp,
    Tc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReachName {
    Local,
    Cluster,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parse and validate a config file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.into(),
        message,
    })
}

/// Parse and validate config text; errors name the key.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    let c: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(m) = &c.metrics_addr
        && m != "none"
        && m.parse::<SocketAddr>().is_err()
    {
        return Err(format!(
            "metrics_addr: `{m}` is neither an address:port nor \"none\""
        ));
    }
    if let Some(f) = &c.log_format
        && f != "text"
        && f != "json"
    {
        return Err(format!(
            "log_format: `{f}` is neither \"text\" nor \"json\""
        ));
    }
    if let Some(l) = &c.log {
        tracing_subscriber::EnvFilter::try_new(l).map_err(|e| format!("log: {e}"))?;
    }
    if let Some(p) = &c.snat_ports {
        p.parse::<PortRange>()
            .map_err(|e| format!("snat_ports: {e}"))?;
    }
    if let Some(n) = c.conntrack_tcp_max {
        crate::ebpf::check_ct_size("conntrack_tcp_max", n)?;
    }
    if let Some(n) = c.conntrack_udp_max {
        crate::ebpf::check_ct_size("conntrack_udp_max", n)?;
    }
    if c.resync_ms == Some(0) {
        return Err("resync_ms: must be at least 1".into());
    }
    Ok(c)
}

/// Was `id` left at its default (neither on the command line nor in the environment)?
fn defaulted(m: &ArgMatches, id: &str) -> bool {
    !matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
    )
}

/// Fill every setting the command line and environment left unset from the file.
pub fn merge(args: &mut RunArgs, m: &ArgMatches, file: &FileConfig) {
    macro_rules! take {
        ($id:literal, $field:expr, $val:expr) => {
            if defaulted(m, $id) {
                if let Some(v) = $val {
                    $field = v;
                }
            }
        };
    }
    take!("state", args.state, file.state.clone().map(Some));
    take!("node", args.node.node, file.node.clone().map(Some));
    take!("pin_dir", args.node.pin_dir, file.pin_dir.clone().map(Some));
    take!("run_dir", args.node.run_dir, file.run_dir.clone().map(Some));
    take!("netns", args.netns, file.netns.clone().map(Some));
    take!("ifaces", args.ifaces, file.ifaces.clone());
    take!(
        "hook",
        args.hook,
        file.hook.map(|h| match h {
            HookName::Xdp => Hook::Xdp,
            HookName::Tc => Hook::Tc,
        })
    );
    take!("cgroup", args.cgroup, file.cgroup.clone().map(Some));
    take!("keep_datapath", args.keep_datapath, file.keep_datapath);
    take!("no_dns", args.no_dns, file.no_dns);
    take!(
        "dns_upstreams",
        args.dns_upstreams,
        file.dns_upstreams.clone()
    );
    take!(
        "reach",
        args.reach,
        file.reach.map(|r| match r {
            ReachName::Local => ReachArg::Local,
            ReachName::Cluster => ReachArg::Cluster,
        })
    );
    // Validated by `parse`.
    take!(
        "snat_ports",
        args.snat_ports,
        file.snat_ports.as_deref().and_then(|p| p.parse().ok())
    );
    take!(
        "conntrack_tcp_max",
        args.conntrack_tcp_max,
        file.conntrack_tcp_max
    );
    take!(
        "conntrack_udp_max",
        args.conntrack_udp_max,
        file.conntrack_udp_max
    );
    take!("resync_ms", args.resync_ms, file.resync_ms);
    take!("reconcile_ms", args.reconcile_ms, file.reconcile_ms);
    take!("metrics_addr", args.metrics_addr, file.metrics_addr.clone());
    take!("log", args.log, file.log.clone().map(Some));
    take!(
        "runtime",
        args.runtime,
        file.runtime.map(|r| match r {
            RuntimeName::Mesh => RuntimeArg::Mesh,
            RuntimeName::Docker => RuntimeArg::Docker,
        })
    );
    take!(
        "docker_ingress_sbox",
        args.docker_ingress_sbox,
        file.docker_ingress_sbox.clone().map(Some)
    );
    take!(
        "swarm_service",
        args.swarm_service,
        file.swarm_service.clone().map(Some)
    );
    // The Engine API settings form one group: any of them set (anywhere) selects the Swarm
    // source, as on the command line.
    let file_docker = file.docker_host.is_some()
        || file.docker_manager.is_some()
        || file.docker_tls_verify.is_some()
        || file.docker_cert_path.is_some()
        || file.docker_tlscacert.is_some()
        || file.docker_tlscert.is_some()
        || file.docker_tlskey.is_some();
    if file_docker {
        let mut d = args.docker_host.take().unwrap_or_default();
        take!("docker_host", d.host, file.docker_host.clone().map(Some));
        take!(
            "docker_manager",
            d.manager,
            file.docker_manager.clone().map(Some)
        );
        take!("docker_tls_verify", d.tls_verify, file.docker_tls_verify);
        take!(
            "docker_cert_path",
            d.cert_path,
            file.docker_cert_path.clone().map(Some)
        );
        take!(
            "docker_tlscacert",
            d.tlscacert,
            file.docker_tlscacert.clone().map(Some)
        );
        take!(
            "docker_tlscert",
            d.tlscert,
            file.docker_tlscert.clone().map(Some)
        );
        take!(
            "docker_tlskey",
            d.tlskey,
            file.docker_tlskey.clone().map(Some)
        );
        args.docker_host = Some(d);
    }
}

/// Keys of a reloaded file whose new value differs from the running one and only takes
/// effect on restart (everything but `log`).
pub fn restart_needed(running: &RunArgs, file: &FileConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |key: &'static str, changed: bool| {
        if changed {
            out.push(key);
        }
    };
    check("state", file.state.is_some() && file.state != running.state);
    check(
        "node",
        file.node.is_some() && file.node != running.node.node,
    );
    check(
        "ifaces",
        file.ifaces.as_ref().is_some_and(|i| *i != running.ifaces),
    );
    check(
        "hook",
        file.hook.is_some_and(|h| {
            matches!(
                (h, running.hook),
                (HookName::Xdp, Hook::Tc) | (HookName::Tc, Hook::Xdp)
            )
        }),
    );
    check(
        "cgroup",
        file.cgroup.is_some() && file.cgroup != running.cgroup,
    );
    check(
        "keep_datapath",
        file.keep_datapath
            .is_some_and(|k| k != running.keep_datapath),
    );
    check("no_dns", file.no_dns.is_some_and(|k| k != running.no_dns));
    check(
        "dns_upstreams",
        file.dns_upstreams
            .as_ref()
            .is_some_and(|u| *u != running.dns_upstreams),
    );
    check(
        "snat_ports",
        file.snat_ports
            .as_deref()
            .is_some_and(|p| p.parse::<PortRange>().ok() != Some(running.snat_ports)),
    );
    check(
        "conntrack_tcp_max",
        file.conntrack_tcp_max
            .is_some_and(|n| n != running.conntrack_tcp_max),
    );
    check(
        "conntrack_udp_max",
        file.conntrack_udp_max
            .is_some_and(|n| n != running.conntrack_udp_max),
    );
    check(
        "resync_ms",
        file.resync_ms.is_some_and(|r| r != running.resync_ms),
    );
    check(
        "reconcile_ms",
        file.reconcile_ms.is_some_and(|r| r != running.reconcile_ms),
    );
    check(
        "metrics_addr",
        file.metrics_addr
            .as_ref()
            .is_some_and(|m| *m != running.metrics_addr),
    );
    check(
        "runtime",
        file.runtime.is_some_and(|r| {
            matches!(
                (r, running.runtime),
                (RuntimeName::Mesh, RuntimeArg::Docker) | (RuntimeName::Docker, RuntimeArg::Mesh)
            )
        }),
    );
    let docker = running.docker_host.clone().unwrap_or_default();
    check(
        "docker_host",
        file.docker_host.is_some() && file.docker_host != docker.host,
    );
    check(
        "docker_manager",
        file.docker_manager.is_some() && file.docker_manager != docker.manager,
    );
    check(
        "docker_tls_verify",
        file.docker_tls_verify
            .is_some_and(|v| v != docker.tls_verify),
    );
    check(
        "docker_cert_path",
        file.docker_cert_path.is_some() && file.docker_cert_path != docker.cert_path,
    );
    check(
        "docker_tlscacert",
        file.docker_tlscacert.is_some() && file.docker_tlscacert != docker.tlscacert,
    );
    check(
        "docker_tlscert",
        file.docker_tlscert.is_some() && file.docker_tlscert != docker.tlscert,
    );
    check(
        "docker_tlskey",
        file.docker_tlskey.is_some() && file.docker_tlskey != docker.tlskey,
    );
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::cli::{Cli, Command};

    /// clap reads the environment of every flag that has `env`: a test that sets a MESH_*
    /// variable holds this for writing, every other parse for reading.
    static ENV: std::sync::RwLock<()> = std::sync::RwLock::new(());

    fn run_args(argv: &[&str], file: &str) -> RunArgs {
        let _env = ENV
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        run_args_unlocked(argv, file)
    }

    /// `f` with `key` set in the environment, no parse running meanwhile.
    fn with_env<T>(key: &str, value: &str, f: impl FnOnce() -> T) -> T {
        let _env = ENV
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: tests change the environment only here, under the write lock, and read
        // it only through parses holding the read lock.
        unsafe { std::env::set_var(key, value) };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: as above.
        unsafe { std::env::remove_var(key) };
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    fn run_args_unlocked(argv: &[&str], file: &str) -> RunArgs {
        let m = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let Command::Run(mut args) = cli.command else {
            panic!("run")
        };
        let (_, sub) = m.subcommand().unwrap();
        merge(&mut args, sub, &parse(file).unwrap());
        args
    }

    #[test]
    fn conntrack_sizes_come_from_flags_env_or_file_within_bounds() {
        use mesh_common::maps::{MAX_CT_TCP, MAX_CT_UDP};
        let d = run_args(&["mesh-agent", "run"], "");
        assert_eq!(
            (d.conntrack_tcp_max, d.conntrack_udp_max),
            (MAX_CT_TCP, MAX_CT_UDP)
        );
        let file = "conntrack_tcp_max = 1048576\n";
        let a = run_args(&["mesh-agent", "run"], file);
        assert_eq!(
            (a.conntrack_tcp_max, a.conntrack_udp_max),
            (1_048_576, MAX_CT_UDP)
        );
        let a = run_args(
            &[
                "mesh-agent",
                "run",
                "--conntrack-tcp-max",
                "65_536",
                "--conntrack-udp-max",
                "4096",
            ],
            file,
        );
        assert_eq!(
            (a.conntrack_tcp_max, a.conntrack_udp_max),
            (65_536, 4_096),
            "flags win"
        );
        assert_eq!(
            a.agent_config().conntrack,
            crate::ebpf::CtSizes {
                tcp: 65_536,
                udp: 4_096
            },
            "handed to the agent"
        );
        let a = with_env("MESH_CONNTRACK_UDP_MAX", "8192", || {
            run_args_unlocked(&["mesh-agent", "run"], "")
        });
        assert_eq!(a.conntrack_udp_max, 8_192);
        // Out of bounds, in the file or on the command line: an error naming the setting.
        let e = parse("conntrack_udp_max = 10\n").unwrap_err();
        assert!(e.contains("conntrack_udp_max") && e.contains("1024"), "{e}");
        assert!(
            parse("conntrack_tcp_max = 33554432\n")
                .unwrap_err()
                .contains("conntrack_tcp_max")
        );
        let e = Cli::command()
            .try_get_matches_from(["mesh-agent", "run", "--conntrack-tcp-max", "100"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--conntrack-tcp-max"), "{e}");
        // A new size in a reloaded file takes effect on restart only.
        assert_eq!(
            restart_needed(&d, &parse(file).unwrap()),
            ["conntrack_tcp_max"]
        );
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file = "state = \"/from/file.yaml\"\nhook = \"tc\"\nresync_ms = 700\nifaces = [\"eth9\"]\nreach = \"cluster\"\nreconcile_ms = 5000\n";
        let a = run_args(&["mesh-agent", "run", "--hook", "xdp"], file);
        assert_eq!(a.reconcile_ms, 5000, "file beats the default");
        assert_eq!(run_args(&["mesh-agent", "run"], "").reconcile_ms, 30_000);
        assert_eq!(
            run_args(&["mesh-agent", "run", "--reconcile-ms", "900"], file).reconcile_ms,
            900
        );
        assert_eq!(
            a.state.as_deref(),
            Some(Path::new("/from/file.yaml")),
            "file fills what flags left"
        );
        assert_eq!(a.hook, Hook::Xdp, "flag wins");
        assert_eq!(a.resync_ms, 700, "file beats the default");
        assert_eq!(a.ifaces, ["eth9"]);
        assert_eq!(a.reach, ReachArg::Cluster);
        let a = run_args(&["mesh-agent", "run", "--state", "/flag.yaml"], file);
        assert_eq!(a.state.as_deref(), Some(Path::new("/flag.yaml")));
        // The environment beats the file.
        let a = with_env("MESH_RESYNC_MS", "1234", || {
            run_args_unlocked(&["mesh-agent", "run"], "resync_ms = 700\n")
        });
        assert_eq!(a.resync_ms, 1234);
    }

    #[test]
    fn snat_ports_from_flag_file_and_default() {
        let dflt = PortRange::default();
        assert_eq!(run_args(&["mesh-agent", "run"], "").snat_ports, dflt);
        let a = run_args(&["mesh-agent", "run"], "snat_ports = \"40000-40999\"\n");
        assert_eq!(
            a.snat_ports,
            PortRange {
                min: 40000,
                max: 40999
            }
        );
        let a = run_args(
            &["mesh-agent", "run", "--snat-ports", "2000-2999"],
            "snat_ports = \"40000-40999\"\n",
        );
        assert_eq!(
            a.snat_ports,
            PortRange {
                min: 2000,
                max: 2999
            },
            "flag wins"
        );
        for bad in ["40000", "0-10", "9-8", "1-70000", "a-b"] {
            let e = parse(&format!("snat_ports = \"{bad}\"\n")).unwrap_err();
            assert!(
                e.starts_with("snat_ports: ") && e.contains(bad),
                "{bad}: {e}"
            );
        }
        assert!(
            Cli::command()
                .try_get_matches_from(["mesh-agent", "run", "--snat-ports", "9-8"])
                .is_err()
        );
        let running = run_args(&["mesh-agent", "run"], "");
        let changed = parse("snat_ports = \"10000-32767\"\nresync_ms = 2000\n").unwrap();
        assert_eq!(
            restart_needed(&running, &changed),
            Vec::<&str>::new(),
            "same as running"
        );
        let changed = parse("snat_ports = \"10000-20000\"\n").unwrap();
        assert_eq!(restart_needed(&running, &changed), ["snat_ports"]);
        // The default stays clear of Linux's default ephemeral range.
        assert!(!dflt.overlaps(&PortRange {
            min: 32768,
            max: 60999
        }));
        assert!(
            PortRange {
                min: 30000,
                max: 32768
            }
            .overlaps(&PortRange {
                min: 32768,
                max: 60999
            })
        );
    }

    #[test]
    fn docker_settings_from_the_file() {
        use crate::source::swarm::DockerEndpoint;
        let file = "runtime = \"docker\"\ndocker_host = \"unix:///run/file.sock\"\nswarm_service = \"mesh_agent\"\n";
        let a = run_args(&["mesh-agent", "run"], file);
        assert_eq!(a.runtime, RuntimeArg::Docker);
        assert_eq!(a.swarm_service.as_deref(), Some("mesh_agent"));
        assert_eq!(
            a.docker_endpoint().unwrap(),
            DockerEndpoint::Unix("/run/file.sock".into())
        );
        // A flag of the group wins over the file's value of the same key only.
        let a = run_args(
            &[
                "mesh-agent",
                "run",
                "--docker-host",
                "unix:///run/flag.sock",
            ],
            file,
        );
        assert_eq!(
            a.docker_endpoint().unwrap(),
            DockerEndpoint::Unix("/run/flag.sock".into())
        );
        // TLS files without verification are refused, naming the setting, as with flags.
        let a = run_args(
            &["mesh-agent", "run"],
            "docker_host = \"tcp://10.0.0.1:2376\"\ndocker_cert_path = \"/nowhere\"\n",
        );
        let e = a.docker_endpoint().unwrap_err().to_string();
        assert!(e.contains("docker-tls-verify") || e.contains("tls"), "{e}");
        assert!(
            parse("docker_tls_verify = \"yes\"\n")
                .unwrap_err()
                .contains("docker_tls_verify")
        );
        assert!(
            parse("runtime = \"k8s\"\n")
                .unwrap_err()
                .contains("runtime")
        );
        let running = run_args(&["mesh-agent", "run"], file);
        let changed =
            parse("runtime = \"mesh\"\ndocker_host = \"unix:///run/other.sock\"\n").unwrap();
        assert_eq!(
            restart_needed(&running, &changed),
            ["runtime", "docker_host"]
        );
    }

    #[test]
    fn docker_endpoint_flags() {
        use crate::source::swarm::{DockerEndpoint, SwarmError, TlsFiles};
        let a = run_args(&["mesh-agent", "run", "--runtime", "docker"], "");
        assert_eq!(a.docker_host, None, "no Docker setting: the default socket");
        assert_eq!(a.docker_endpoint().unwrap(), DockerEndpoint::default());
        let a = run_args(
            &["mesh-agent", "run", "--docker-host", "unix:///run/d.sock"],
            "",
        );
        assert_eq!(
            a.docker_endpoint().unwrap(),
            DockerEndpoint::Unix("/run/d.sock".into())
        );

        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_str().unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem", "k2.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let tls = [
            "mesh-agent",
            "run",
            "--docker-host",
            "tcp://10.0.0.1:2376",
            "--docker-tls-verify",
        ];
        let a = run_args(&[&tls[..], &["--docker-cert-path", dir]].concat(), "");
        let files = TlsFiles {
            ca: d.path().join("ca.pem"),
            cert: d.path().join("cert.pem"),
            key: d.path().join("key.pem"),
        };
        let tcp = |tls| DockerEndpoint::Tcp {
            addr: "10.0.0.1:2376".into(),
            tls,
        };
        assert_eq!(a.docker_endpoint().unwrap(), tcp(Some(files.clone())));
        // One file on its own beats the directory's.
        let k2 = d.path().join("k2.pem");
        let a = run_args(
            &[
                &tls[..],
                &[
                    "--docker-cert-path",
                    dir,
                    "--docker-tlskey",
                    k2.to_str().unwrap(),
                ],
            ]
            .concat(),
            "",
        );
        assert_eq!(
            a.docker_endpoint().unwrap(),
            tcp(Some(TlsFiles {
                key: k2,
                ..files.clone()
            }))
        );
        // Plain TCP.
        let a = run_args(
            &["mesh-agent", "run", "--docker-host", "tcp://10.0.0.1:2376"],
            "",
        );
        assert_eq!(a.docker_endpoint().unwrap(), tcp(None));
        // A missing file is named, with where it was looked for.
        std::fs::remove_file(d.path().join("cert.pem")).unwrap();
        let a = run_args(&[&tls[..], &["--docker-cert-path", dir]].concat(), "");
        let e = a.docker_endpoint().unwrap_err();
        assert!(matches!(e, SwarmError::TlsFile { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&d.path().join("cert.pem").display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("client certificate") && text.contains("--docker-cert-path"),
            "{text}"
        );
        // Only a TLS setting: still the Swarm source's settings (the docker CLI's
        // tcp://localhost:2376 with verification; refused without it).
        let a = run_args(&["mesh-agent", "run", "--docker-cert-path", dir], "");
        assert!(a.docker_host.is_some());
        let e = a.docker_endpoint().unwrap_err().to_string();
        assert!(e.contains("--docker-tls-verify"), "{e}");
    }

    #[test]
    fn docker_manager_flag_env_and_file() {
        use crate::source::swarm::DockerEndpoint;
        let unix = |p: &str| DockerEndpoint::Unix(p.into());
        // Flag: the manager apart, this node's daemon from --docker-host.
        let a = run_args(
            &[
                "mesh-agent",
                "run",
                "--docker-host",
                "unix:///run/local.sock",
                "--docker-manager",
                "/run/mgr.sock",
            ],
            "",
        );
        assert_eq!(a.docker_endpoint().unwrap(), unix("/run/local.sock"));
        assert_eq!(a.docker_manager().unwrap(), Some(unix("/run/mgr.sock")));
        // Only --docker-manager: the Swarm source, this node's daemon on the default socket.
        let a = run_args(
            &[
                "mesh-agent",
                "run",
                "--docker-manager",
                "unix:///run/mgr.sock",
            ],
            "",
        );
        assert_eq!(a.docker_endpoint().unwrap(), DockerEndpoint::default());
        assert_eq!(a.docker_manager().unwrap(), Some(unix("/run/mgr.sock")));
        // None: the one endpoint.
        let a = run_args(
            &["mesh-agent", "run", "--docker-host", "unix:///run/d.sock"],
            "",
        );
        assert_eq!(a.docker_manager().unwrap(), None);
        // The file's key, beaten by the flag; a change needs a restart.
        let file = "docker_manager = \"unix:///run/file-mgr.sock\"\n";
        let a = run_args(&["mesh-agent", "run"], file);
        assert_eq!(
            a.docker_manager().unwrap(),
            Some(unix("/run/file-mgr.sock"))
        );
        let a = run_args(
            &[
                "mesh-agent",
                "run",
                "--docker-manager",
                "/run/flag-mgr.sock",
            ],
            file,
        );
        assert_eq!(
            a.docker_manager().unwrap(),
            Some(unix("/run/flag-mgr.sock"))
        );
        let changed = parse("docker_manager = \"/run/other.sock\"\n").unwrap();
        assert_eq!(restart_needed(&a, &changed), ["docker_manager"]);
        assert!(
            restart_needed(
                &a,
                &parse("docker_manager = \"/run/flag-mgr.sock\"\n").unwrap()
            )
            .is_empty()
        );
        assert!(
            parse("docker_manager = 1\n")
                .unwrap_err()
                .contains("docker_manager")
        );
        // The environment.
        let a = with_env("MESH_DOCKER_MANAGER", "unix:///run/env-mgr.sock", || {
            run_args_unlocked(&["mesh-agent", "run"], file)
        });
        assert_eq!(a.docker_manager().unwrap(), Some(unix("/run/env-mgr.sock")));
        // A bad host is named.
        let a = run_args(&["mesh-agent", "run", "--docker-manager", "ssh://mgr"], "");
        assert!(
            a.docker_manager()
                .unwrap_err()
                .to_string()
                .contains("ssh://mgr")
        );
    }

    #[test]
    fn docker_manager_tls_applies_to_the_tcp_endpoints() {
        use crate::source::swarm::{DockerEndpoint, TlsFiles};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_str().unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let files = TlsFiles {
            ca: d.path().join("ca.pem"),
            cert: d.path().join("cert.pem"),
            key: d.path().join("key.pem"),
        };
        let tls = ["--docker-tls-verify", "--docker-cert-path", dir];
        // A worker: its own socket (default), the manager over TLS.
        let a = run_args(
            &[
                &["mesh-agent", "run", "--docker-manager", "tcp://10.0.0.1"][..],
                &tls,
            ]
            .concat(),
            "",
        );
        assert_eq!(a.docker_endpoint().unwrap(), DockerEndpoint::default());
        assert_eq!(
            a.docker_manager().unwrap(),
            Some(DockerEndpoint::Tcp {
                addr: "10.0.0.1:2376".into(),
                tls: Some(files.clone())
            })
        );
        // Both over TLS, with the same files.
        let a = run_args(
            &[
                &[
                    "mesh-agent",
                    "run",
                    "--docker-host",
                    "tcp://10.0.0.2",
                    "--docker-manager",
                    "tcp://10.0.0.1:2376",
                ][..],
                &tls,
            ]
            .concat(),
            "",
        );
        assert_eq!(
            a.docker_endpoint().unwrap(),
            DockerEndpoint::Tcp {
                addr: "10.0.0.2:2376".into(),
                tls: Some(files.clone())
            }
        );
        assert!(matches!(
            a.docker_manager().unwrap(),
            Some(DockerEndpoint::Tcp { tls: Some(_), .. })
        ));
        // TLS settings with two unix sockets: refused, as without a manager.
        let a = run_args(
            &[
                &["mesh-agent", "run", "--docker-manager", "/run/mgr.sock"][..],
                &tls,
            ]
            .concat(),
            "",
        );
        assert!(
            a.docker_manager()
                .unwrap_err()
                .to_string()
                .contains("tcp://")
        );
        assert!(a.docker_endpoint().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse("stat = \"/x\"\n").unwrap_err();
        assert!(e.contains("unknown field `stat`"), "{e}");
        let e = parse("hook = \"ebpf\"\n").unwrap_err();
        assert!(
            e.contains("hook") || e.contains("unknown variant `ebpf`"),
            "{e}"
        );
        let e = parse("metrics_addr = \"localhost\"\n").unwrap_err();
        assert!(e.starts_with("metrics_addr:"), "{e}");
        let e = parse("dns_upstreams = [\"nonsense\"]\n").unwrap_err();
        assert!(e.contains("dns_upstreams"), "{e}");
        assert!(parse("").is_ok());
    }
}
