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
    DebianCore {
        rustc: PathBuf,
    },
    /// A rustup nightly toolchain with `rust-src`: `-Z build-std=core`.
    NightlyBuildStd {
        toolchain: String,
    },
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
    if let Some(home) = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
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
    if on_path("rustup")
        || Path::new(&format!(
            "{}/.cargo/bin/rustup",
            env::var("HOME").unwrap_or_default()
        ))
        .is_file()
    {
        let out = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"])
            .output();
        if let Ok(out) = out
            && out.status.success()
        {
            let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
            {
                return Ok(Route::NightlyBuildStd {
                    toolchain: "nightly".into(),
                });
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
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-p",
            "mesh-ebpf",
        ])
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
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k == "TARGET"
            || k == "HOST"
        {
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
        return err(format!(
            "eBPF build produced no object at {}",
            obj.display()
        ));
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

pub mod image {
    //! The agent's container image without pulling anything: a rootfs holding the release
    //! binary and exactly the shared libraries `ldd` names, imported with `docker import`.

    use std::{
        path::{Path, PathBuf},
        process::Command,
    };

    use super::BuildError;

    type Result<T> = std::result::Result<T, BuildError>;

    fn fail<T>(msg: impl Into<String>) -> Result<T> {
        Err(BuildError(msg.into()))
    }

    fn io<T>(what: &str, r: std::io::Result<T>) -> Result<T> {
        r.map_err(|e| BuildError(format!("{what}: {e}")))
    }

    /// Paths `ldd` lists for `bin` (libraries and the dynamic loader).
    pub fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
        let out = io("cannot run ldd", Command::new("ldd").arg(bin).output())?;
        if !out.status.success() {
            return fail(format!(
                "ldd {}: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut libs = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split("=>").nth(1) {
                Some(rhs) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.push(PathBuf::from(p));
            }
        }
        Ok(libs)
    }

    /// Write `<out>/rootfs.tar` (the agent binary, stripped of host debug info, and its
    /// libraries) and return its path.
    pub fn rootfs(bin: &Path, out: &Path) -> Result<PathBuf> {
        let fs = out.join("rootfs");
        let _ = std::fs::remove_dir_all(&fs);
        io(
            "create rootfs",
            std::fs::create_dir_all(fs.join("usr/local/bin")),
        )?;
        let dest = fs.join("usr/local/bin/mesh-agent");
        io("copy the agent", std::fs::copy(bin, &dest))?;
        // Host debug info is not needed in the image (the embedded eBPF object keeps its BTF:
        // it is data inside the binary, not a section strip touches).
        let st = io(
            "cannot run strip",
            Command::new("strip")
                .arg("--strip-debug")
                .arg(&dest)
                .status(),
        )?;
        if !st.success() {
            return fail("strip failed");
        }
        let mut listing = vec![(
            "/usr/local/bin/mesh-agent".to_string(),
            io("stat", std::fs::metadata(&dest))?.len(),
        )];
        for lib in libraries(bin)? {
            // Copy the file the path resolves to, under the path the loader looks for.
            let real = io("resolve library", std::fs::canonicalize(&lib))?;
            let rel = lib
                .strip_prefix("/")
                .map_err(|e| BuildError(e.to_string()))?;
            let dest = fs.join(rel);
            if let Some(parent) = dest.parent() {
                io("create library dir", std::fs::create_dir_all(parent))?;
            }
            io("copy library", std::fs::copy(&real, &dest))?;
            listing.push((
                lib.display().to_string(),
                io("stat", std::fs::metadata(&real))?.len(),
            ));
        }
        // Mount points and files the agent uses at run time.
        for d in ["tmp", "run", "sys", "proc", "etc", "var/run", "host"] {
            io("create mount point", std::fs::create_dir_all(fs.join(d)))?;
        }
        let tar = out.join("rootfs.tar");
        let st = io(
            "cannot run tar",
            Command::new("tar")
                .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
                .arg(&fs)
                .args(["-cf"])
                .arg(&tar)
                .arg(".")
                .status(),
        )?;
        if !st.success() {
            return fail("tar failed");
        }
        let total: u64 = listing.iter().map(|(_, n)| n).sum();
        println!(
            "image content ({} files, {:.1} MiB):",
            listing.len(),
            total as f64 / 1048576.0
        );
        for (p, n) in &listing {
            println!("  {p:<50} {:>8.1} KiB", *n as f64 / 1024.0);
        }
        Ok(tar)
    }

    /// `docker import` the rootfs as `image` with the agent as entrypoint (`docker`: the CLI
    /// command, e.g. "docker" or a wrapper pointing at another daemon).
    pub fn import(docker: &str, tar: &Path, image: &str) -> Result<()> {
        let st = io(
            "cannot run docker (is a daemon reachable? DOCKER_HOST)",
            Command::new(docker)
                .arg("import")
                .args(["--change", "ENTRYPOINT [\"/usr/local/bin/mesh-agent\"]"])
                .args(["--change", "CMD [\"run\"]"])
                .arg(tar)
                .arg(image)
                .status(),
        )?;
        if !st.success() {
            return fail("docker import failed");
        }
        let out = io(
            "docker run",
            Command::new(docker)
                .args(["run", "--rm", image, "--version"])
                .output(),
        )?;
        println!("{image}: {}", String::from_utf8_lossy(&out.stdout).trim());
        Ok(())
    }
}
