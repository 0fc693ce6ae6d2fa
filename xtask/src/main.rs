//! `cargo xtask <task>`: mesh's dev tasks.
//!
//! - `build [--release]`   the eBPF object, then the agent (which embeds it)
//! - `test`                every test: unit (incl. BPF_PROG_TEST_RUN) and integration (root)
//! - `demo`                build and run the single-node demo (`mesh-agent demo`)
//! - `bench [--quick] [--only ..] [--out DIR]` benchmarks, written to bench/RESULTS.md and bench/results.json

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use xtask::{build_ebpf, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test (needs root: namespaces, eBPF).
    Test {
        /// Only the unit tests (no namespaces; BPF_PROG_TEST_RUN still needs root).
        #[arg(long)]
        unit: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting (rustfmt) and lints (clippy, warnings are errors); `test` runs it
    /// first.
    Lint,
    /// Build and run the single-node demo mesh.
    Demo {
        /// Extra arguments for `mesh-agent demo`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the container image mesh-agent:<version> (rootfs from the release binary and the
    /// libraries `ldd` names, loaded with `docker import`).
    Image {
        /// Image tag (default: the crate version).
        #[arg(long)]
        tag: Option<String>,
        /// Only write target/image/rootfs.tar; do not talk to Docker.
        #[arg(long)]
        rootfs_only: bool,
    },
    /// Bring up the multi-node test bed (N node namespaces, a real agent each, a sample
    /// cluster) and keep it up until Ctrl-C.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Run the benchmarks and write bench/RESULTS.md + bench/results.json.
    Bench {
        /// The short run (< 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Run only these scenarios (comma-separated: xdp,e2e,e2e-remote,control,dns).
        #[arg(long)]
        only: Option<String>,
        /// Write the results here instead of bench/.
        #[arg(long)]
        out: Option<String>,
    },
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    // `cargo run` gave xtask its own package's variables; build scripts that track them
    // (ring tracks CARGO_MANIFEST_DIR) would otherwise rebuild on every switch between
    // `cargo xtask ...` and a plain `cargo build`.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "CARGO_MANIFEST_DIR"
            || k == "CARGO_MANIFEST_PATH"
            || k == "CARGO_CRATE_NAME"
            || k == "CARGO_BIN_NAME"
            || k == "CARGO_PRIMARY_PACKAGE"
            || k.starts_with("CARGO_PKG_")
        {
            c.env_remove(&*k);
        }
    }
    c
}

fn run(mut c: Command) -> anyhow::Result<()> {
    let what = format!("{c:?}");
    let st = c.status().with_context(|| format!("cannot run {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// rustfmt and clippy over the host crates (mesh-ebpf only builds for the BPF target).
fn lint(built: &Built) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run(c).context("the tree is not rustfmt-clean: run `cargo fmt --all`")?;
    let mut c = built.cargo();
    c.args([
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(c)
}

/// Is `cargo <sub>` installed?
fn has_subcommand(sub: &str) -> bool {
    let mut c = cargo();
    c.args([sub, "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c.status().is_ok_and(|s| s.success())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why} needs root (CI runs as root); run it with sudo");
    }
    Ok(())
}

/// The agent binary just built, and the eBPF object it embeds.
struct Built {
    bin: PathBuf,
    obj: PathBuf,
}

impl Built {
    /// A cargo command that builds the agent the same way: every cargo run after `build`
    /// passes the same MESH_EBPF_OBJECT, or the agent's build script would see the variable
    /// change and the agent would be rebuilt (and relinked) by each of them.
    fn cargo(&self) -> Command {
        let mut c = cargo();
        c.env("MESH_EBPF_OBJECT", &self.obj);
        c
    }
}

fn build(release: bool) -> anyhow::Result<Built> {
    let obj = build_ebpf().map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("eBPF object: {}", obj.display());
    let bin = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("mesh-agent");
    // The object was just built: the agent's build script reuses it.
    let built = Built { bin, obj };
    let mut c = built.cargo();
    c.args(["build", "-p", "mesh-agent"]);
    if release {
        c.arg("--release");
    }
    run(c)?;
    Ok(built)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Build { release } => {
            let built = build(release)?;
            println!("agent: {}", built.bin.display());
        }
        Task::Test { unit, args } => {
            require_root("the test suite (BPF_PROG_TEST_RUN, network namespaces)")?;
            let built = build(false)?;
            // Lints first, where the toolchain has them (rustup's does; Debian's cargo may
            // lack rustfmt and clippy).
            if has_subcommand("fmt") && has_subcommand("clippy") {
                lint(&built)?;
            } else {
                eprintln!("note: cargo fmt/clippy not installed: lints skipped");
            }
            let bin = &built.bin;
            // Unit tests: pure logic, checksum math, and the real programs through
            // BPF_PROG_TEST_RUN (each test loads its own copy; they run in parallel).
            let mut c = built.cargo();
            c.args([
                "test",
                "-p",
                "mesh-common",
                "-p",
                "mesh-agent",
                "-p",
                "xtask",
            ])
            .env("MESH_AGENT_BIN", bin)
            .arg("--")
            .args(&args);
            run(c)?;
            if !unit {
                // Integration: real agents in namespaces. One at a time: they share the
                // machine's cgroup hooks and CPU, and timing-sensitive checks stay honest.
                let mut c = built.cargo();
                c.args(["test", "-p", "mesh-tests"])
                    .env("MESH_AGENT_BIN", bin)
                    .arg("--")
                    .arg("--test-threads=1")
                    .args(&args);
                run(c)?;
            }
        }
        Task::Lint => lint(&build(false)?)?,
        Task::Demo { args } => {
            require_root("the demo (it attaches eBPF programs and creates namespaces)")?;
            let built = build(true)?;
            let mut c = Command::new(&built.bin);
            c.arg("demo").args(&args);
            run(c)?;
        }
        Task::Image { tag, rootfs_only } => {
            let built = build(true)?;
            let tag = tag.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
            let tar = xtask::image::rootfs(&built.bin, &workspace_root().join("target/image"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if rootfs_only {
                println!("{}", tar.display());
            } else {
                xtask::image::import("docker", &tar, &format!("mesh-agent:{tag}"))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Task::Cluster { nodes } => {
            require_root("the cluster test bed (namespaces, eBPF)")?;
            let built = build(false)?;
            let mut c = built.cargo();
            c.args(["run", "-p", "mesh-tests", "--bin", "mesh-cluster", "--"])
                .arg("--nodes")
                .arg(nodes.to_string())
                .env("MESH_AGENT_BIN", &built.bin);
            run(c)?;
        }
        Task::Bench { quick, only, out } => {
            require_root("the benchmarks")?;
            let built = build(true)?;
            let mut c = built.cargo();
            c.args([
                "run",
                "--release",
                "-p",
                "mesh-tests",
                "--bin",
                "mesh-bench",
                "--",
            ])
            .env("MESH_AGENT_BIN", &built.bin);
            if quick {
                c.arg("--quick");
            }
            if let Some(only) = only {
                c.args(["--only", &only]);
            }
            if let Some(out) = out {
                c.args(["--out", &out]);
            }
            run(c)?;
        }
    }
    Ok(())
}
