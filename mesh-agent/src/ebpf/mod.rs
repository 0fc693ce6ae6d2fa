//! The eBPF side of the agent: load the embedded object, pin its maps, attach programs,
//! and write the tables into the maps.
//!
//! Maps are pinned by name under `<pin dir>` (default `/sys/fs/bpf/mesh/<node>`); a restarted
//! agent reuses them, so its conntrack (live connections) survives the restart. `status`
//! opens the same pins read-only.

pub mod maps;

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use mesh_common::progs;
use tracing::{info, warn};

pub use maps::Maps;

/// An inclusive port range, `MIN-MAX` on the command line: the SNAT source ports
/// (`--snat-ports`; its default is [`mesh_common::SNAT_PORT_MIN`]..=`SNAT_PORT_MAX`), or the
/// node's `ip_local_port_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            min: mesh_common::SNAT_PORT_MIN,
            max: mesh_common::SNAT_PORT_MAX,
        }
    }
}

impl PortRange {
    /// Does it share a port with `other` (e.g. the node's `ip_local_port_range`)?
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// `net.ipv4.ip_local_port_range` of the current network namespace: the ports its own
    /// connections take.
    pub fn ephemeral() -> Option<PortRange> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
        Some(PortRange {
            min: it.next()??,
            max: it.next()??,
        })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not a port range MIN-MAX (e.g. 10000-32767)"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{p}` in `{s}` is not a port 1-65535"))
        };
        let (min, max) = (port(a)?, port(b)?);
        if min > max {
            return Err(format!("`{s}`: the first port is above the second"));
        }
        Ok(PortRange { min, max })
    }
}

/// The object built from `mesh-ebpf`, embedded at compile time (see `build.rs`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh.bpf.o"));

/// Where the node's external traffic is intercepted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP (native where the driver supports it, else generic): what runs on a real NIC.
    Xdp,
    /// TC ingress (tcx): runs on the skb, avoids the veth XDP tax.
    Tc,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot prepare bpffs pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount bpffs on /sys/fs/bpf: {0}")]
    MountBpffs(nix::Error),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {op}: {source}")]
    Program {
        name: &'static str,
        op: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attach {name} to {target}: {source}")]
    Attach {
        name: &'static str,
        target: String,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the netns cookie: {0}")]
    NetnsCookie(std::io::Error),
    #[error("{0}")]
    CtSize(String),
}

/// Entries of the conntrack maps (two per flow: forward and reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtSizes {
    pub tcp: u32,
    pub udp: u32,
}

impl Default for CtSizes {
    fn default() -> Self {
        CtSizes {
            tcp: mesh_common::maps::MAX_CT_TCP,
            udp: mesh_common::maps::MAX_CT_UDP,
        }
    }
}

impl CtSizes {
    /// Smallest size: a few hundred flows.
    pub const MIN: u32 = 1_024;
    /// Largest size: 2^24 entries, about 2 GiB of kernel memory per map (the kernel
    /// preallocates every entry: 112 bytes of element plus a 16-byte bucket each).
    pub const MAX: u32 = 1 << 24;

    /// Both sizes within [`CtSizes::MIN`]..=[`CtSizes::MAX`]; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        for (key, n) in [
            ("conntrack_tcp_max", self.tcp),
            ("conntrack_udp_max", self.udp),
        ] {
            check_ct_size(key, n)?;
        }
        Ok(())
    }
}

/// One conntrack size within bounds, or an error naming `key`.
pub fn check_ct_size(key: &str, n: u32) -> Result<(), String> {
    if !(CtSizes::MIN..=CtSizes::MAX).contains(&n) {
        return Err(format!(
            "{key}: {n} entries is outside {}..={}",
            CtSizes::MIN,
            CtSizes::MAX
        ));
    }
    Ok(())
}

/// Remove the pin of map `name` in `dir` if the pinned map does not have `want` entries, so
/// that loading creates it at that size (the old map lives on while programs of a previous
/// agent hold it).
fn unpin_if_resized(dir: &Path, name: &'static str, want: u32) -> Result<(), DatapathError> {
    let path = dir.join(name);
    let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
        return Ok(());
    };
    let have = info.max_entries();
    if have != want {
        warn!(
            map = name,
            pinned = have,
            wanted = want,
            "conntrack size changed: the pinned map is replaced by an empty one; flows through this node are balanced again"
        );
        std::fs::remove_file(&path).map_err(|source| DatapathError::PinDir { path, source })?;
    }
    Ok(())
}

/// Is `name` the pin of a map of an older layout: shaped like mesh's map names (upper case,
/// ending in `_V<n>`), but not one of this object's ([`mesh_common::maps::ALL`])?
pub fn superseded_map_pin(name: &str) -> bool {
    let Some((stem, version)) = name.rsplit_once("_V") else {
        return false;
    };
    !stem.is_empty()
        && stem
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && !mesh_common::maps::ALL.contains(&name)
}

/// Remove the pins in `dir` of maps this object no longer has: a layout change renames its
/// map (`FRAGS_V1` → `FRAGS_V2`), and the old pin would keep the old map's memory (a
/// conntrack of 262,144 entries is ≈ 32 MiB) for as long as it exists. Programs of a
/// previous agent that still hold such a map keep it until they go. Returns the names.
fn unpin_superseded(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let mut gone = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(gone),
        Err(source) => {
            return Err(DatapathError::PinDir {
                path: dir.into(),
                source,
            });
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().is_ok_and(|t| t.is_file()) && superseded_map_pin(&name) {
            std::fs::remove_file(e.path()).map_err(|source| DatapathError::PinDir {
                path: e.path(),
                source,
            })?;
            gone.push(name);
        }
    }
    Ok(gone)
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

fn fs_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// Make sure bpffs is mounted at /sys/fs/bpf (it is not by default on every host).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if fs_magic(root) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| DatapathError::PinDir {
        path: root.into(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(DatapathError::MountBpffs)
}

/// The cgroup-v2 root the socket hooks attach to: /sys/fs/cgroup/unified on hybrid hosts,
/// /sys/fs/cgroup on unified ones.
pub fn default_cgroup() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| fs_magic(p) == Some(CGROUP2_SUPER_MAGIC))
}

/// Cookie of the calling thread's network namespace (SO_NETNS_COOKIE, kernel ≥ 5.14).
pub fn netns_cookie() -> Result<u64, DatapathError> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(DatapathError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: valid socket fd and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(DatapathError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Directory (inside the pin directory) where attachments are pinned for a hand-over.
const LINKS_DIR: &str = "links";

/// A pinned link left by a previous agent at `path`, if any (a stale one is removed).
fn take_pinned(path: &Path) -> Option<FdLink> {
    match PinnedLink::from_pin(path) {
        Ok(p) => Some(FdLink::from(p)),
        Err(_) => None,
    }
}

/// Take attachment `$id` out of program `$name` as a plain bpf_link (to pin it).
macro_rules! take_fd_link {
    ($self:ident, $getter:ident, $name:expr, $id:expr) => {
        $self
            .$getter($name)
            .map_err(|e| e.to_string())
            .and_then(|p| p.take_link($id).map_err(|e| e.to_string()))
            .and_then(|l| FdLink::try_from(l).map_err(|e| e.to_string()))
    };
}

/// `name` as a program of type `$ty`, loaded into the kernel on first use.
macro_rules! loaded_program {
    ($self:ident, $name:ident, $ty:ty) => {{
        let p: &mut $ty = $self
            .ebpf
            .program_mut($name)
            .ok_or(DatapathError::MissingProgram { name: $name })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: $name,
                op: "type",
                source,
            })?;
        if p.fd().is_err() {
            p.load().map_err(|source| DatapathError::Program {
                name: $name,
                op: "load",
                source,
            })?;
        }
        Ok(p)
    }};
}

/// The loaded programs and their attachments. Dropping it detaches every program (links
/// close); the pinned maps stay until [`Datapath::unpin`].
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub maps: Maps,
    ingress: Vec<(String, Attached)>,
    tasks: HashMap<String, SchedClassifierLinkId>,
    sock: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

enum Attached {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

impl Datapath {
    /// Load the embedded object, creating or reusing the maps pinned in `pin_dir`, with the
    /// default conntrack sizes.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_sized(pin_dir, CtSizes::default())
    }

    /// [`Datapath::load`] with conntrack maps of `ct` entries. A pinned conntrack map of
    /// another size is replaced by a new, empty one (the kernel cannot resize a map): the
    /// flows it tracked are balanced again, as after Cilium changes `bpf-ct-global-*-max`.
    pub fn load_sized(pin_dir: &Path, ct: CtSizes) -> Result<Self, DatapathError> {
        Self::load_object(OBJECT, pin_dir, ct)
    }

    pub fn load_object(object: &[u8], pin_dir: &Path, ct: CtSizes) -> Result<Self, DatapathError> {
        ct.validate().map_err(DatapathError::CtSize)?;
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.into(),
            source,
        })?;
        let sizes = [
            (mesh_common::maps::CT_TCP, ct.tcp),
            (mesh_common::maps::CT_UDP, ct.udp),
        ];
        for (name, want) in sizes {
            unpin_if_resized(pin_dir, name, want)?;
        }
        for name in unpin_superseded(pin_dir)? {
            info!(map = name, "removed the pin of a map of an older layout");
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, want) in sizes {
            loader.map_max_entries(name, want);
        }
        let mut ebpf = loader.load(object)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            maps,
            ingress: Vec::new(),
            tasks: HashMap::new(),
            sock: Vec::new(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_pin(&self, kind: &str, name: &str) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(format!("{kind}-{name}"))
    }

    /// A loaded program of the object, for attaching and for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        loaded_program!(self, name, Xdp)
    }

    pub fn tc_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        loaded_program!(self, name, SchedClassifier)
    }

    fn sock_program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, DatapathError> {
        loaded_program!(self, name, CgroupSockAddr)
    }

    /// Write the agent-wide settings: this netns's cookie (for the socket hooks) and the
    /// SNAT source for flows to tasks on other nodes.
    pub fn configure(
        &mut self,
        snat_addr: Option<std::net::Ipv4Addr>,
        node_scope: bool,
    ) -> Result<(), DatapathError> {
        self.configure_dns(snat_addr.map(|a| (a, PortRange::default())), node_scope, 0)
    }

    /// [`Datapath::configure`], plus the port the embedded DNS server listens on in tasks
    /// (0: port 53 itself, no redirect).
    pub fn configure_dns(
        &mut self,
        snat: Option<(std::net::Ipv4Addr, PortRange)>,
        node_scope: bool,
        dns_port: u16,
    ) -> Result<(), DatapathError> {
        let ports = snat.map(|s| s.1).unwrap_or_default();
        // Without the node scope (under Docker, whose iptables steer published ports into its
        // ingress sandbox) the socket hooks act only in task namespaces.
        let cookie = if node_scope { netns_cookie()? } else { 0 };
        self.maps.set_config(mesh_common::Config {
            netns_cookie: cookie,
            flags: 0,
            snat_addr: snat
                .map(|(a, _)| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            snat_port_min: ports.min,
            snat_port_max: ports.max,
            dns_port,
            _pad: 0,
        })
    }

    /// Intercept published-port traffic arriving on `iface`.
    pub fn attach_ingress(&mut self, iface: &str, hook: Hook) -> Result<(), DatapathError> {
        let pin = self.link_pin(
            match hook {
                Hook::Xdp => "xdp",
                Hook::Tc => "tc",
            },
            iface,
        );
        let pinned = take_pinned(&pin);
        let attached = match hook {
            Hook::Xdp => {
                let prog = self.xdp_program(progs::XDP_INGRESS)?;
                // A hand-over: swap the new program into the previous agent's link atomically
                // (no packet sees the interface without a program).
                if let Some(link) =
                    pinned.and_then(|l| aya::programs::xdp::XdpLink::try_from(l).ok())
                {
                    match prog.attach_to_link(link) {
                        Ok(id) => {
                            info!(iface, "XDP program replaced in the pinned link");
                            self.ingress.push((iface.to_string(), Attached::Xdp(id)));
                            return Ok(());
                        }
                        Err(e) => {
                            warn!(iface, error = %e, "cannot reuse the pinned XDP link; attaching afresh")
                        }
                    }
                }
                let _ = std::fs::remove_file(&pin);
                let id = match prog.attach(iface, XdpMode::Default) {
                    Ok(id) => id,
                    Err(e) => {
                        warn!(iface, error = %e, "native XDP attach failed; falling back to generic (skb) XDP");
                        prog.attach(iface, XdpMode::Skb).map_err(|source| {
                            DatapathError::Attach {
                                name: progs::XDP_INGRESS,
                                target: iface.into(),
                                source,
                            }
                        })?
                    }
                };
                Attached::Xdp(id)
            }
            Hook::Tc => {
                let prog = self.tc_program(progs::TC_INGRESS)?;
                if let Some(link) =
                    pinned.and_then(|l| aya::programs::tc::SchedClassifierLink::try_from(l).ok())
                    && let Ok(id) = prog.attach_to_link(link)
                {
                    info!(iface, "TC program replaced in the pinned link");
                    self.ingress.push((iface.to_string(), Attached::Tc(id)));
                    return Ok(());
                }
                let _ = std::fs::remove_file(&pin);
                let id = prog
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(|source| DatapathError::Attach {
                        name: progs::TC_INGRESS,
                        target: iface.into(),
                        source,
                    })?;
                Attached::Tc(id)
            }
        };
        info!(iface, ?hook, "published ports intercepted");
        self.ingress.push((iface.to_string(), attached));
        Ok(())
    }

    /// [`Datapath::attach_ingress`] on an interface of another network namespace (Docker's
    /// ingress sandbox): the attach runs on a thread inside it, where the name resolves.
    pub fn attach_ingress_in(
        &mut self,
        netns_path: &Path,
        iface: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        let ns = File::open(netns_path).map_err(|source| DatapathError::PinDir {
            path: netns_path.into(),
            source,
        })?;
        std::thread::scope(|sc| {
            sc.spawn(|| {
                nix::sched::setns(
                    std::os::fd::AsFd::as_fd(&ns),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )
                .map_err(|e| DatapathError::PinDir {
                    path: netns_path.into(),
                    source: e.into(),
                })?;
                self.attach_ingress(iface, hook)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(DatapathError::PinDir {
                    path: netns_path.into(),
                    source: std::io::Error::other("attach thread panicked"),
                })
            })
        })
    }

    /// Reverse NAT for replies a task sends: TC ingress on its host-side veth.
    pub fn attach_task(&mut self, host_veth: &str) -> Result<(), DatapathError> {
        if self.tasks.contains_key(host_veth) {
            return Ok(());
        }
        let pin = self.link_pin("task", host_veth);
        let pinned = take_pinned(&pin);
        let prog = self.tc_program(progs::TC_TASK)?;
        if let Some(link) =
            pinned.and_then(|l| aya::programs::tc::SchedClassifierLink::try_from(l).ok())
            && let Ok(id) = prog.attach_to_link(link)
        {
            self.tasks.insert(host_veth.to_string(), id);
            return Ok(());
        }
        let _ = std::fs::remove_file(&pin);
        let id = prog
            .attach(host_veth, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Attach {
                name: progs::TC_TASK,
                target: host_veth.into(),
                source,
            })?;
        self.tasks.insert(host_veth.to_string(), id);
        Ok(())
    }

    /// Forget (and detach, if the device still exists) a task interface's program.
    pub fn detach_task(&mut self, host_veth: &str) {
        let _ = std::fs::remove_file(self.link_pin("task", host_veth));
        if let Some(id) = self.tasks.remove(host_veth)
            && let Ok(prog) = self.tc_program(progs::TC_TASK)
        {
            // The link is already gone when the veth was deleted first.
            let _ = prog.detach(id);
        }
    }

    /// Socket-level LB for processes on the node: connect4/sendmsg4/recvmsg4/getpeername4 on
    /// the cgroup-v2 root (they then fire only for sockets in this node's netns).
    pub fn attach_sock(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        for name in [
            progs::CONNECT4,
            progs::SENDMSG4,
            progs::RECVMSG4,
            progs::GETPEERNAME4,
        ] {
            // cgroup links cannot swap programs; a hand-over attaches the new program next to
            // the old one, then drops the old link (both act the same on the same maps).
            let old = take_pinned(&self.link_pin("sock", name));
            let prog = self.sock_program(name)?;
            // With bpf_link (kernel ≥ 5.7) every attachment coexists with others (other
            // agents' on the same cgroup too); the link API wants flags 0, i.e. `Single`.
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Attach {
                    name,
                    target: cgroup.display().to_string(),
                    source,
                })?;
            self.sock.push((name, id));
            if old.is_some() {
                let _ = std::fs::remove_file(self.link_pin("sock", name));
            }
            drop(old);
        }
        info!(cgroup = %cgroup.display(), "socket-level LB attached");
        Ok(())
    }

    /// Detach every program now (dropping the Datapath does the same).
    pub fn detach_all(&mut self) {
        for (iface, a) in std::mem::take(&mut self.ingress) {
            let r = match a {
                Attached::Xdp(id) => self
                    .xdp_program(progs::XDP_INGRESS)
                    .map(|p| p.detach(id).is_ok()),
                Attached::Tc(id) => self
                    .tc_program(progs::TC_INGRESS)
                    .map(|p| p.detach(id).is_ok()),
            };
            if !matches!(r, Ok(true)) {
                warn!(iface, "ingress program was already detached");
            }
        }
        let tasks: Vec<String> = self.tasks.keys().cloned().collect();
        for t in tasks {
            self.detach_task(&t);
        }
        for (name, id) in std::mem::take(&mut self.sock) {
            if let Ok(p) = self.sock_program(name) {
                let _ = p.detach(id);
            }
        }
    }

    /// Pin every attachment under `<pin dir>/links`, so the programs stay attached after this
    /// process exits and the next agent swaps its programs in (an upgrade's hand-over).
    pub fn persist_links(&mut self) -> Vec<DatapathError> {
        let mut errors = Vec::new();
        let dir = self.pin_dir.join(LINKS_DIR);
        if let Err(source) = std::fs::create_dir_all(&dir) {
            errors.push(DatapathError::PinDir {
                path: dir.clone(),
                source,
            });
            return errors;
        }
        let pin = |link: Result<FdLink, String>, path: PathBuf, errors: &mut Vec<DatapathError>| {
            match link {
                Ok(l) => {
                    if path.exists() {
                        // Already pinned (adopted from the previous agent): it runs our program now.
                        return;
                    }
                    if let Err(e) = l.pin(&path) {
                        errors.push(DatapathError::PinDir {
                            path,
                            source: std::io::Error::other(e.to_string()),
                        });
                    }
                }
                Err(e) => errors.push(DatapathError::PinDir {
                    path,
                    source: std::io::Error::other(e),
                }),
            }
        };
        for (iface, a) in std::mem::take(&mut self.ingress) {
            match a {
                Attached::Xdp(id) => {
                    let l = take_fd_link!(self, xdp_program, progs::XDP_INGRESS, id);
                    pin(l, self.link_pin("xdp", &iface), &mut errors);
                }
                Attached::Tc(id) => {
                    let l = take_fd_link!(self, tc_program, progs::TC_INGRESS, id);
                    pin(l, self.link_pin("tc", &iface), &mut errors);
                }
            }
        }
        for (veth, id) in std::mem::take(&mut self.tasks) {
            let l = take_fd_link!(self, tc_program, progs::TC_TASK, id);
            pin(l, self.link_pin("task", &veth), &mut errors);
        }
        for (name, id) in std::mem::take(&mut self.sock) {
            let l = take_fd_link!(self, sock_program, name, id);
            pin(l, self.link_pin("sock", name), &mut errors);
        }
        errors
    }

    /// Remove the pinned maps (a clean shutdown; an upgrade keeps them instead).
    pub fn unpin(self) -> std::io::Result<()> {
        let dir = self.pin_dir.clone();
        drop(self);
        remove_pins(&dir)
    }
}

/// Remove a pin directory and every pin in it (pinned links included: unpinning a link
/// that no process holds detaches its program).
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    remove_pins(&e.path())?;
                    continue;
                }
                std::fs::remove_file(e.path())?;
            }
            std::fs::remove_dir(dir)?;
            // Remove the parent (/sys/fs/bpf/mesh) too when it is now empty.
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub mod packet;
#[cfg(test)]
mod tests;
