//! mesh-agent binary: parse the command line, set up logging, dispatch. Everything else is
//! in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use mesh_agent::{
    agent,
    cli::{Cli, Command, LogFormat, demo, status, whoami},
    model, netns,
    source::file::FileSource,
};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    // hickory-server logs every request at INFO: keep it to warnings (no line per query).
    let filter = EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("hickory_server=warn".parse().expect("static directive"))
        .add_directive("hickory_net=warn".parse().expect("static directive"))
        .add_directive("hickory_proto=warn".parse().expect("static directive"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            // Enter the node's namespace before any thread exists, so all inherit it.
            if let Some(ns) = &args.netns {
                netns::enter_process(ns)?;
            }
            let cfg = args.agent_config();
            let source = Box::new(FileSource::new(args.state.clone()));
            let rt = runtime()?;
            rt.block_on(async move {
                let dns = mesh_agent::cli::dns_service(&args).await?;
                agent::run(cfg, source, dns, stop_signal()).await?;
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
            let s = model::parse_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
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
        Command::Demo(args) => {
            let rt = runtime()?;
            rt.block_on(demo::run(args, stop_signal()))
        }
        Command::Whoami(args) => {
            if let Some(ns) = &args.netns {
                netns::enter_process(ns)?;
            }
            let rt = runtime()?;
            rt.block_on(whoami::serve(args.name, args.http, args.udp))?;
            Ok(())
        }
    }
}
