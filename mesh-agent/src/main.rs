//! mesh-agent binary: parse the command line (layered over the config file), set up logging,
//! dispatch. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use mesh_agent::{
    agent,
    cli::{
        Cli, Command, ConfigCommand, LogFormat, RunArgs, RuntimeArg, config, demo, status, whoami,
    },
    model, netns,
    source::{file::FileSource, swarm::SwarmSource},
};
use tracing::{info, warn};
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// hickory-server logs every request at INFO: keep it to warnings (no line per query).
fn filter(spec: &str) -> EnvFilter {
    let f = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    [
        "hickory_server=warn",
        "hickory_net=warn",
        "hickory_proto=warn",
    ]
    .into_iter()
    .fold(f, |f, d| {
        f.add_directive(d.parse().expect("static directive"))
    })
}

/// Human-readable logs (JSON with `--log-format json`) to stderr, with a reloadable filter.
fn init_logging(format: LogFormat, spec: &str) -> FilterHandle {
    let (layer, handle) = reload::Layer::new(filter(spec));
    let registry = tracing_subscriber::registry().with(layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    handle
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Resolves on SIGINT or SIGTERM. SIGHUP reloads the config file's log filter meanwhile.
async fn stop_signal(args: Option<(std::path::PathBuf, FilterHandle, RunArgs)>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                let Some((path, handle, running)) = &args else {
                    info!("SIGHUP: no config file to reload");
                    continue;
                };
                match config::load(path) {
                    Ok(c) => {
                        if let Some(l) = &c.log
                            && handle.reload(filter(l)).is_ok() {
                                info!(filter = l, "SIGHUP: log filter reloaded");
                            }
                        let restart = config::restart_needed(running, &c);
                        if !restart.is_empty() {
                            warn!(keys = ?restart, "SIGHUP: these settings changed and apply on restart");
                        }
                    }
                    Err(e) => warn!(error = %e, "SIGHUP: config refused, keeping the running one"),
                }
            }
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(mut args) => {
            let sub = matches
                .subcommand()
                .map(|(_, m)| m.clone())
                .context("run arguments")?;
            let file = match &args.config {
                Some(p) => Some((p.clone(), config::load(p)?)),
                None => None,
            };
            if let Some((_, f)) = &file {
                config::merge(&mut args, &sub, f);
            }
            // `--log-format` is a global flag: the file's value applies only when it is unset.
            let format_set = matches!(
                matches.value_source("log_format"),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            );
            let format = match file.as_ref().and_then(|(_, f)| f.log_format.as_deref()) {
                Some("json") if !format_set => LogFormat::Json,
                Some("text") if !format_set => LogFormat::Text,
                _ => cli.log_format,
            };
            let handle = init_logging(format, args.log.as_deref().unwrap_or("info"));
            if args.metrics_addr != "none"
                && args.metrics_addr.parse::<std::net::SocketAddr>().is_err()
            {
                anyhow::bail!(
                    "--metrics-addr {}: neither address:port nor \"none\"",
                    args.metrics_addr
                );
            }
            // The managers' state: a Swarm manager's Engine API under the docker runtime (or
            // with --docker-host), else the state file.
            let source: Box<dyn mesh_agent::source::Source> =
                match (&args.docker_host, args.runtime) {
                    (Some(h), _) => {
                        // With --docker-manager: cluster state from the manager, this node's
                        // id and sandboxes from --docker-host (which may be a worker's daemon).
                        let source = SwarmSource::from_endpoint(h)?;
                        match h.manager_endpoint()? {
                            Some(m) => Box::new(source.with_manager(m)?),
                            None => Box::new(source),
                        }
                    }
                    (None, RuntimeArg::Docker) => Box::new(SwarmSource::default()),
                    (None, RuntimeArg::Mesh) => {
                        Box::new(FileSource::new(args.state.clone().context(
                            "no state file: pass --state, MESH_STATE or `state` in the config file",
                        )?))
                    }
                };
            // Enter the node's namespace before any thread exists, so all inherit it.
            if let Some(ns) = &args.netns {
                netns::enter_process(ns)?;
            }
            let cfg = args.agent_config();
            let rt = runtime()?;
            rt.block_on(async move {
                let dns = mesh_agent::cli::dns_service(&args).await?;
                let hup = args.config.clone().map(|p| (p, handle, args));
                agent::run(cfg, source, dns, stop_signal(hup)).await?;
                anyhow::Ok(())
            })
        }
        Command::Status(args) => {
            let s = status::collect(&args.node.pin_dir(), &args.node.run_dir())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(())
        }
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let s = model::parse_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}:\n{e}", file.display()))?;
            println!(
                "{}: ok ({} nodes, {} networks, {} services, {} tasks)",
                file.display(),
                s.nodes.len(),
                s.networks.len(),
                s.services.len(),
                s.tasks.len()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Demo(args) => {
            init_logging(
                cli.log_format,
                &std::env::var("MESH_LOG").unwrap_or_else(|_| "info".into()),
            );
            let rt = runtime()?;
            rt.block_on(demo::run(args, stop_signal(None)))
        }
        Command::Whoami(args) => {
            if let Some(ns) = &args.netns {
                netns::enter_process(ns)?;
            }
            let rt = runtime()?;
            let name = args.name.unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default()
            });
            rt.block_on(whoami::serve(name, args.http, args.udp))?;
            Ok(())
        }
    }
}
