//! Where a manager's Engine API is, given the way the docker CLI takes it: a host
//! (`unix:///path`, a plain path, or `tcp://host[:port]`) and, for TCP, TLS settings
//! (`--tlsverify` with a cert directory holding `ca.pem`, `cert.pem`, `key.pem`, or each file
//! on its own).
//!
//! Resolution ([`DockerEndpoint::resolve`]) checks that every TLS file it names exists;
//! [`TlsFiles::client_config`] reads them (on every connection, so renewed certificates are
//! picked up) into a rustls client configuration that trusts only the given CA and presents
//! the client certificate. Errors name the file and which setting it came from.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{DEFAULT_SOCKET, SwarmError};

/// Port of `tcp://host` without one: Docker's conventions (2376 with TLS, 2375 without).
pub const DEFAULT_TLS_PORT: u16 = 2376;
pub const DEFAULT_TCP_PORT: u16 = 2375;
/// The docker CLI's host when TLS verification is on and no host is given.
pub const DEFAULT_TLS_HOST: &str = "tcp://localhost:2376";

/// A manager's Engine API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEndpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// TCP: `addr` is `host:port` (`[v6]:port`); plain HTTP without `tls`.
    Tcp { addr: String, tls: Option<TlsFiles> },
}

/// The client's TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) the daemon's certificate must chain to (the only ones trusted).
    pub ca: PathBuf,
    /// The client certificate (chain) presented to the daemon.
    pub cert: PathBuf,
    /// The client certificate's private key.
    pub key: PathBuf,
}

/// TLS settings as given (docker CLI: `--tlsverify`, `--tlscacert`, `--tlscert`, `--tlskey`,
/// `DOCKER_CERT_PATH`): an individual file wins over the cert directory's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Connect with TLS, verifying the daemon against the CA and presenting the client
    /// certificate.
    pub verify: bool,
    /// Directory with `ca.pem`, `cert.pem` and `key.pem`.
    pub cert_path: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsOptions {
    /// Whether any file or directory is given.
    fn names_files(&self) -> bool {
        self.cert_path.is_some() || self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

impl Default for DockerEndpoint {
    /// [`DEFAULT_SOCKET`].
    fn default() -> Self {
        DockerEndpoint::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

impl From<PathBuf> for DockerEndpoint {
    fn from(socket: PathBuf) -> Self {
        DockerEndpoint::Unix(socket)
    }
}

impl From<&PathBuf> for DockerEndpoint {
    fn from(socket: &PathBuf) -> Self {
        DockerEndpoint::Unix(socket.clone())
    }
}

impl From<&Path> for DockerEndpoint {
    fn from(socket: &Path) -> Self {
        DockerEndpoint::Unix(socket.to_path_buf())
    }
}

/// A `DOCKER_HOST`-style host without TLS settings.
impl TryFrom<&str> for DockerEndpoint {
    type Error = SwarmError;
    fn try_from(host: &str) -> Result<Self, SwarmError> {
        DockerEndpoint::resolve(Some(host), &TlsOptions::default())
    }
}

impl TryFrom<&String> for DockerEndpoint {
    type Error = SwarmError;
    fn try_from(host: &String) -> Result<Self, SwarmError> {
        DockerEndpoint::try_from(host.as_str())
    }
}

impl fmt::Display for DockerEndpoint {
    /// `unix:///var/run/docker.sock`, `tcp://10.0.0.1:2375`, `tcp://10.0.0.1:2376 (TLS)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerEndpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            DockerEndpoint::Tcp { addr, tls: None } => write!(f, "tcp://{addr}"),
            DockerEndpoint::Tcp { addr, tls: Some(_) } => write!(f, "tcp://{addr} (TLS)"),
        }
    }
}

impl DockerEndpoint {
    /// The endpoint for `host` (`None`: [`DEFAULT_SOCKET`], or [`DEFAULT_TLS_HOST`] with
    /// `tls.verify`, as the docker CLI does) and `tls`. Refuses TLS settings on a unix socket,
    /// TLS files without `verify`, and schemes other than `unix://` and `tcp://`; with
    /// `verify`, each of the three files must be given (on its own or through the cert
    /// directory) and exist.
    pub fn resolve(host: Option<&str>, tls: &TlsOptions) -> Result<Self, SwarmError> {
        let host = match host {
            Some(h) => h,
            None if tls.verify => DEFAULT_TLS_HOST,
            None if tls.names_files() => {
                return Err(SwarmError::Tls {
                    what: "settings",
                    reason: "TLS files are given but not --docker-tls-verify (and no tcp:// host)"
                        .into(),
                });
            }
            None => return Ok(DockerEndpoint::default()),
        };
        let refuse = |reason: &str| SwarmError::Endpoint {
            endpoint: host.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = host.strip_prefix("tcp://") {
            let addr = tcp_addr(
                rest,
                if tls.verify {
                    DEFAULT_TLS_PORT
                } else {
                    DEFAULT_TCP_PORT
                },
            )
            .map_err(|r| refuse(&r))?;
            let tls = if tls.verify {
                Some(TlsFiles::resolve(tls)?)
            } else if tls.names_files() {
                return Err(refuse(
                    "TLS files are given but not --docker-tls-verify: pass it to use TLS \
                     (plain TCP otherwise sends the Engine API unencrypted)",
                ));
            } else {
                None
            };
            return Ok(DockerEndpoint::Tcp { addr, tls });
        }
        let socket = if let Some(path) = host.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(refuse("no socket path"));
            }
            path
        } else if host.contains("://") {
            return Err(refuse(
                "supported: unix:///path (or a plain path) and tcp://host[:port] (with \
                 --docker-tls-verify for TLS)",
            ));
        } else if host.is_empty() {
            return Err(refuse("empty"));
        } else {
            host
        };
        if tls.verify || tls.names_files() {
            return Err(refuse(
                "TLS settings (--docker-tls-verify, --docker-cert-path, --docker-tlscacert, \
                 --docker-tlscert, --docker-tlskey) apply to tcp:// hosts only",
            ));
        }
        Ok(DockerEndpoint::Unix(PathBuf::from(socket)))
    }

    /// The unix socket, if it is one.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            DockerEndpoint::Unix(p) => Some(p),
            DockerEndpoint::Tcp { .. } => None,
        }
    }

    /// As a path, for errors that carry one ([`crate::source::SourceError`]): the socket, or
    /// the endpoint's text.
    pub(super) fn as_path(&self) -> PathBuf {
        match self {
            DockerEndpoint::Unix(p) => p.clone(),
            other => PathBuf::from(other.to_string()),
        }
    }
}

/// `host[:port][/]` → `host:port`.
fn tcp_addr(rest: &str, default_port: u16) -> Result<String, String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("no host".into());
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err("expected tcp://host[:port], without a path, query or user".into());
    }
    // `[v6]`, `[v6]:port`, `host`, `host:port`.
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (inside, after) = v6.split_once(']').ok_or("unterminated `[` in the host")?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{inside}` is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?),
        };
        (format!("[{inside}]"), port)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("bad port `{p}`")),
        },
    };
    Ok(format!("{host}:{port}"))
}

impl TlsFiles {
    /// The three files from `tls`: each from its own setting, else from the cert directory;
    /// each must exist.
    pub fn resolve(tls: &TlsOptions) -> Result<TlsFiles, SwarmError> {
        let pick = |what: &'static str,
                    own: &Option<PathBuf>,
                    flag: &str,
                    name: &str|
         -> Result<PathBuf, SwarmError> {
            let (path, from) = match (own, &tls.cert_path) {
                (Some(p), _) => (p.clone(), format!("--docker-{flag}")),
                (None, Some(dir)) => (dir.join(name), format!("{name} in --docker-cert-path")),
                (None, None) => {
                    return Err(SwarmError::Tls {
                        what,
                        reason: format!(
                            "--docker-tls-verify needs --docker-cert-path (a directory with \
                             ca.pem, cert.pem, key.pem) or --docker-{flag}"
                        ),
                    });
                }
            };
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => Ok(path),
                Ok(_) => Err(SwarmError::TlsFile {
                    what,
                    path,
                    reason: format!("not a file ({from})"),
                }),
                Err(e) => Err(SwarmError::TlsFile {
                    what,
                    path,
                    reason: format!("{e} ({from})"),
                }),
            }
        };
        Ok(TlsFiles {
            ca: pick("CA certificate", &tls.ca, "tlscacert", "ca.pem")?,
            cert: pick("client certificate", &tls.cert, "tlscert", "cert.pem")?,
            key: pick("client key", &tls.key, "tlskey", "key.pem")?,
        })
    }

    /// Read the files into a client configuration: TLS 1.2/1.3 (ring), the daemon verified
    /// against the CA only (its certificate must name the host: a DNS name or an IP
    /// address), the client certificate presented.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, SwarmError> {
        let file_err = |what: &'static str, path: &Path, reason: String| SwarmError::TlsFile {
            what,
            path: path.to_path_buf(),
            reason,
        };
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| file_err(what, path, e.to_string()))
        };
        let certs = |what: &'static str, path: &Path| {
            let pem = read(what, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(what, path, format!("bad PEM: {e}")))?;
            if certs.is_empty() {
                return Err(file_err(
                    what,
                    path,
                    "no certificate in it (a PEM `CERTIFICATE` block is expected)".into(),
                ));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("CA certificate", &self.ca)? {
            roots
                .add(c)
                .map_err(|e| file_err("CA certificate", &self.ca, e.to_string()))?;
        }
        let chain = certs("client certificate", &self.cert)?;
        let key_pem = read("client key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            file_err(
                "client key",
                &self.key,
                match e {
                    rustls::pki_types::pem::Error::NoItemsFound => {
                        "no private key in it (a PEM `PRIVATE KEY` block is expected)".into()
                    }
                    e => format!("bad PEM: {e}"),
                },
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SwarmError::Tls {
                what: "settings",
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                file_err(
                    "client key",
                    &self.key,
                    format!(
                        "unusable with the client certificate {}: {e}",
                        self.cert.display()
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str, tls: Option<TlsFiles>) -> DockerEndpoint {
        DockerEndpoint::Tcp {
            addr: addr.into(),
            tls,
        }
    }

    #[test]
    fn hosts() {
        let none = TlsOptions::default();
        let ok = |h: &str| DockerEndpoint::resolve(Some(h), &none).unwrap();
        assert_eq!(
            ok("unix:///run/d.sock"),
            DockerEndpoint::Unix("/run/d.sock".into())
        );
        assert_eq!(
            ok("/run/d.sock"),
            DockerEndpoint::Unix("/run/d.sock".into())
        );
        assert_eq!(ok("tcp://10.0.0.1:2375"), tcp("10.0.0.1:2375", None));
        assert_eq!(
            ok("tcp://10.0.0.1/"),
            tcp("10.0.0.1:2375", None),
            "default port"
        );
        assert_eq!(ok("tcp://m.example:4243"), tcp("m.example:4243", None));
        assert_eq!(ok("tcp://[fd00::1]:2375"), tcp("[fd00::1]:2375", None));
        assert_eq!(ok("tcp://[fd00::1]"), tcp("[fd00::1]:2375", None));
        assert_eq!(
            DockerEndpoint::resolve(None, &none).unwrap(),
            DockerEndpoint::default()
        );
        assert_eq!(ok("tcp://10.0.0.1:2375").to_string(), "tcp://10.0.0.1:2375");
        assert_eq!(ok("/run/d.sock").to_string(), "unix:///run/d.sock");
        for bad in [
            "",
            "unix://",
            "tcp://",
            "tcp://:2375",
            "tcp://h:",
            "tcp://h:0",
            "tcp://h:99999",
            "tcp://h:x",
            "tcp://h:2375/v1.41",
            "tcp://[fd00::1",
            "tcp://[nonsense]:1",
            "https://m:2376",
            "ssh://m",
            "npipe:////./pipe/docker_engine",
        ] {
            match DockerEndpoint::resolve(Some(bad), &none) {
                Err(e @ SwarmError::Endpoint { .. }) => {
                    assert!(e.to_string().contains(&format!("`{bad}`")), "{e}")
                }
                other => panic!("{bad:?}: expected an endpoint error, got {other:?}"),
            }
        }
    }

    /// A cert directory with the three files.
    fn cert_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        d
    }

    #[test]
    fn tls_files_from_the_cert_path_or_each_setting() {
        let d = cert_dir();
        let dir = d.path();
        let opts = TlsOptions {
            verify: true,
            cert_path: Some(dir.into()),
            ..Default::default()
        };
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        let e = DockerEndpoint::resolve(Some("tcp://127.0.0.1:2376"), &opts).unwrap();
        assert_eq!(e, tcp("127.0.0.1:2376", Some(files.clone())));
        assert_eq!(e.to_string(), "tcp://127.0.0.1:2376 (TLS)");
        // Default port with TLS: 2376; no host with TLS: the docker CLI's default.
        let e = DockerEndpoint::resolve(Some("tcp://m"), &opts).unwrap();
        assert_eq!(e, tcp("m:2376", Some(files.clone())));
        let e = DockerEndpoint::resolve(None, &opts).unwrap();
        assert_eq!(e, tcp("localhost:2376", Some(files.clone())));
        // An individual file wins over the directory's.
        let other = dir.join("other-key.pem");
        std::fs::write(&other, "x").unwrap();
        let e = DockerEndpoint::resolve(
            Some("tcp://m:1"),
            &TlsOptions {
                key: Some(other.clone()),
                ..opts.clone()
            },
        )
        .unwrap();
        assert_eq!(
            e,
            tcp(
                "m:1",
                Some(TlsFiles {
                    key: other.clone(),
                    ..files.clone()
                })
            )
        );
        // All three on their own, no directory.
        let e = DockerEndpoint::resolve(
            Some("tcp://m:1"),
            &TlsOptions {
                verify: true,
                cert_path: None,
                ca: Some(files.ca.clone()),
                cert: Some(files.cert.clone()),
                key: Some(other.clone()),
            },
        )
        .unwrap();
        assert!(matches!(e, DockerEndpoint::Tcp { tls: Some(_), .. }));
    }

    #[test]
    fn missing_tls_files_are_named() {
        let d = cert_dir();
        let dir = d.path();
        std::fs::remove_file(dir.join("key.pem")).unwrap();
        let opts = TlsOptions {
            verify: true,
            cert_path: Some(dir.into()),
            ..Default::default()
        };
        let e = DockerEndpoint::resolve(Some("tcp://m:2376"), &opts).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SwarmError::TlsFile { .. }), "{e:?}");
        assert!(
            text.contains(&dir.join("key.pem").display().to_string()),
            "{text}"
        );
        assert!(text.contains("client key"), "{text}");
        assert!(text.contains("No such file"), "{text}");
        assert!(text.contains("key.pem in --docker-cert-path"), "{text}");
        // An individual file that is missing names its flag.
        let e = DockerEndpoint::resolve(
            Some("tcp://m:2376"),
            &TlsOptions {
                ca: Some(dir.join("nope.pem")),
                ..opts.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("CA certificate") && e.contains("nope.pem"),
            "{e}"
        );
        assert!(e.contains("--docker-tlscacert"), "{e}");
        // A directory where a file should be.
        let e = DockerEndpoint::resolve(
            Some("tcp://m:2376"),
            &TlsOptions {
                cert: Some(dir.into()),
                ..opts.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a file"), "{e}");
        // Verification without any file.
        let e = DockerEndpoint::resolve(
            Some("tcp://m:2376"),
            &TlsOptions {
                verify: true,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--docker-cert-path"), "{e}");
        assert!(e.contains("CA certificate"), "{e}");
    }

    #[test]
    fn tls_settings_where_they_do_not_apply() {
        let d = cert_dir();
        let with_dir = TlsOptions {
            cert_path: Some(d.path().into()),
            ..Default::default()
        };
        let verify = TlsOptions {
            verify: true,
            ..with_dir.clone()
        };
        // Files without verification: refused, not silently plain TCP.
        let e = DockerEndpoint::resolve(Some("tcp://m:2375"), &with_dir).unwrap_err();
        assert!(e.to_string().contains("--docker-tls-verify"), "{e}");
        let e = DockerEndpoint::resolve(None, &with_dir).unwrap_err();
        assert!(e.to_string().contains("--docker-tls-verify"), "{e}");
        // TLS on a unix socket.
        for o in [&with_dir, &verify] {
            let e = DockerEndpoint::resolve(Some("/run/d.sock"), o).unwrap_err();
            assert!(e.to_string().contains("tcp:// hosts only"), "{e}");
        }
    }

    #[test]
    fn unreadable_pem_files_are_named() {
        let d = cert_dir();
        let dir = d.path();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        // "x" is no certificate.
        let e = files.client_config().unwrap_err().to_string();
        assert!(e.contains("CA certificate") && e.contains("ca.pem"), "{e}");
        assert!(e.contains("no certificate in it"), "{e}");
        std::fs::remove_file(&files.ca).unwrap();
        let e = files.client_config().unwrap_err().to_string();
        assert!(e.contains(&files.ca.display().to_string()), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }
}
