//! Network-namespace helpers: run a closure inside another namespace on a dedicated thread
//! (so no tokio worker ever changes namespace), e.g. to create a socket that lives there.
//!
//! A socket belongs to the namespace it was created in, whichever thread later uses it; so
//! "enter, create, leave" is all it takes to serve DNS or talk netlink inside a task.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot return to the original network namespace: {0}")]
    Return(nix::Error),
    #[error("namespace worker thread panicked")]
    Panicked,
}

/// Open a namespace file (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Run `f` with the calling thread inside the namespace at `path`, on a fresh thread.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let target = open(path)?;
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        // The thread is thrown away afterwards, so there is nothing to restore; but a
        // thread that cannot enter must not run `f` in the wrong namespace.
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path, source })?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Panicked)?
}

/// Enter the namespace at `path` for the whole process. Call before any thread starts
/// (before the tokio runtime), so every thread inherits it.
pub fn enter_process(path: &Path) -> Result<(), NetnsError> {
    let target = open(path)?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })
}

/// The path naming the current thread's network namespace.
pub fn current_path() -> PathBuf {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    PathBuf::from(format!("/proc/self/task/{tid}/ns/net"))
}

/// Directory of named namespaces, as iproute2 uses it.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Create a named network namespace at `/run/netns/<name>` the way `ip netns add` does
/// (a fresh netns bind-mounted onto a file there), usable by `ip netns exec` too.
pub fn create_named(name: &str) -> Result<PathBuf, NetnsError> {
    use nix::mount::{MsFlags, mount};
    let dir = Path::new(NETNS_RUN_DIR);
    let path = dir.join(name);
    let io = |source: std::io::Error| NetnsError::Open {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Like iproute2: make /run/netns a shared mount so mounts propagate to other mount
    // namespaces (`ip netns exec` runs in its own).
    if mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .is_err()
    {
        let _ = mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        );
        let _ = mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        );
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let target = path.clone();
    let r = std::thread::spawn(move || -> Result<(), NetnsError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: target.clone(),
            source,
        })?;
        let me = current_path();
        mount(
            Some(&me),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetnsError::Enter {
            path: target.clone(),
            source,
        })
    })
    .join()
    .map_err(|_| NetnsError::Panicked)?;
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Delete a named namespace made by [`create_named`] or `ip netns add`.
pub fn delete_named(name: &str) -> Result<(), NetnsError> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Open { path, source }),
    }
}
