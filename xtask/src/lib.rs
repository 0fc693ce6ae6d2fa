//! Build logic shared by `cargo xtask` and `mesh-agent/build.rs`: compile `mesh-ebpf` for
//! `bpfel-unknown-none` with whichever toolchain route this machine has.
//!
//! Routes, tried in order:
//! 1. `MESH_EBPF_OBJECT=/path/to/object`: use a prebuilt object (CI builds it once).
//! 2. Debian: `/usr/bin/rustc` with a prebuilt `core` for bpfel (`libstd-rust-web-dev-bpf`),
//!    unlocked with `RUSTC_BOOTSTRAP=1`.
//! 3. rustup nightly with `rust-src`: `cargo +nightly build -Z build-std=core`.
//!
//! Both need `bpf-linker` on PATH. With neither, the build fails and names the setup command:
//! an agent is never built around an empty object.
//!
//! This module has no dependencies so the agent's build script stays cheap.

use std::{
    env, fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// The command that installs everything a fresh machine needs.
pub const SETUP_COMMAND: &str = "bash xtask/setup.sh";

/// Which toolchain builds the eBPF object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Prebuilt(PathBuf),
    /// Debian's rustc with a prebuilt `core` for the BPF targets.
    DebianCore { rustc: PathBuf },
    /// A rustup nightly toolchain with `rust-src`: `-Z build-std=core`.
    NightlyBuildStd { toolchain: String },
}

#[derive(Debug)]
pub struct BuildError(pub String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

fn err<T>(msg: impl Into<String>) -> Result<T, BuildError> {
    Err(BuildError(msg.into()))
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    // bpf-linker is installed by `cargo install` into ~/.cargo/bin, which a build script's
    // PATH may lack.
    let mut paths: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| {
        env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"))
    }) {
        paths.push(home.join("bin"));
    }
    env::join_paths(paths).unwrap_or_default()
}

/// Detect the route this machine supports.
pub fn detect_route() -> Result<Route, BuildError> {
    if let Some(p) = env::var_os("MESH_EBPF_OBJECT") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return err(format!("MESH_EBPF_OBJECT={} is not a file", p.display()));
        }
        return Ok(Route::Prebuilt(p));
    }
    let path = path_with_cargo_bin();
    let has_linker = env::split_paths(&path).any(|d| d.join("bpf-linker").is_file());
    if !has_linker {
        return err(format!(
            "bpf-linker not found on PATH or in ~/.cargo/bin: run `{SETUP_COMMAND}` (as root) first"
        ));
    }
    let debian = PathBuf::from("/usr/bin/rustc");
    if debian.is_file() && Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").is_dir() {
        return Ok(Route::DebianCore { rustc: debian });
    }
    if on_path("rustup") || Path::new(&format!("{}/.cargo/bin/rustup", env::var("HOME").unwrap_or_default())).is_file() {
        let out = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").is_dir() {
                    return Ok(Route::NightlyBuildStd {
                        toolchain: "nightly".into(),
                    });
                }
            }
        }
    }
    err(format!(
        "no toolchain can build the eBPF object: need Debian's rustc with a bpfel core \
         (/usr/lib/rustlib/bpfel-unknown-none) or a rustup nightly with rust-src; run `{SETUP_COMMAND}` (as root)"
    ))
}

/// Where the object ends up for a given route.
pub fn ebpf_target_dir() -> PathBuf {
    workspace_root().join("target").join("bpf")
}

/// Build the eBPF object and return its path.
pub fn build_ebpf() -> Result<PathBuf, BuildError> {
    let route = detect_route()?;
    let root = workspace_root();
    let target_dir = ebpf_target_dir();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    match &route {
        Route::Prebuilt(p) => return Ok(p.clone()),
        Route::DebianCore { rustc } => {
            cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
            cmd.arg("build");
        }
        Route::NightlyBuildStd { toolchain } => {
            // Go through rustup so the nightly's cargo and rustc are used together.
            cmd = Command::new("rustup");
            cmd.args(["run", toolchain, "cargo", "build", "-Z", "build-std=core"]);
            cmd.env_remove("RUSTC");
        }
    }
    cmd.current_dir(&root)
        .args(["--release", "--target", "bpfel-unknown-none", "-p", "mesh-ebpf"])
        .arg("--target-dir")
        .arg(&target_dir)
        // A leaked wrapper or rustflags from an outer cargo (clippy, build scripts) breaks
        // the BPF build or silently drops BTF; set what we need explicitly.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        )
        .env("PATH", path_with_cargo_bin());
    for (k, _) in env::vars_os() {
        // Profile/feature settings of the outer build must not leak in.
        let k = k.to_string_lossy().to_string();
        if k.starts_with("CARGO_FEATURE_") || k.starts_with("CARGO_CFG_") || k == "TARGET" || k == "HOST" {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .map_err(|e| BuildError(format!("cannot run cargo for the eBPF build: {e}")))?;
    if !status.success() {
        return err(format!("eBPF build failed ({status}) via {route:?}"));
    }
    let obj = target_dir.join("bpfel-unknown-none/release/mesh");
    if !obj.is_file() {
        return err(format!("eBPF build produced no object at {}", obj.display()));
    }
    Ok(obj)
}

/// Paths whose change must rebuild the object (for `cargo:rerun-if-changed`).
pub fn ebpf_sources() -> Vec<PathBuf> {
    let root = workspace_root();
    vec![
        root.join("mesh-ebpf/src"),
        root.join("mesh-ebpf/Cargo.toml"),
        root.join("mesh-common/src"),
        root.join("mesh-common/Cargo.toml"),
    ]
}
