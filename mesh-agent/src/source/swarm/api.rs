//! The Engine API calls the Swarm source makes, on a manager's unix socket or over TCP
//! (plain or TLS).
//!
//! Everything goes through bollard except `GET /tasks`: bollard 0.21's `Task` model (generated
//! from the Engine API's swagger file) has no `NetworksAttachments` field, yet that is where a
//! task's addresses are. Tasks are therefore read with a request of our own and decoded into
//! [`SwarmTask`], bollard's `Task` plus the attachments: on a unix socket a minimal HTTP/1.0
//! `GET` (HTTP/1.0: the daemon closes the connection after the body and never chunks it);
//! over TCP through the same hyper client that bollard uses (its custom transport), so both
//! share the connection setup and, with TLS, one rustls configuration.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, BollardRequest, Docker,
    models::{EventMessage, Network, Node, Service},
    query_parameters::{EventsOptions, ListNetworksOptions, ListNodesOptions, ListServicesOptions},
};
use futures::{Stream, future::BoxFuture};
use http_body_util::BodyExt;
use hyper::{Response, body::Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{DockerEndpoint, SwarmError, chain, map::SwarmTask};

/// Largest response body read by the raw client (a `GET /tasks` of a big cluster is a few MB).
const MAX_BODY: usize = 256 << 20;

/// Event types that can change the state ("task" events do not exist in the Engine API:
/// swarm-wide task changes surface as service updates, local ones as container events).
pub(super) const EVENT_TYPES: [&str; 4] = ["service", "node", "network", "container"];

/// A connection to one daemon, with the API version agreed on.
#[derive(Clone)]
pub(super) struct Api {
    docker: Docker,
    endpoint: DockerEndpoint,
    /// How the raw requests go.
    raw: Raw,
    /// `v1.41`: the path prefix of the raw requests.
    version: String,
    timeout: Duration,
}

/// The transport of the raw requests.
#[derive(Clone)]
enum Raw {
    Unix(PathBuf),
    /// `base`: `http://host:port` or `https://host:port`.
    Http {
        base: String,
        send: HttpSend,
    },
}

/// bollard's request body type (not exported by name).
type Body = <BollardRequest as HasBody>::Body;
trait HasBody {
    type Body;
}
impl<B> HasBody for hyper::Request<B> {
    type Body = B;
}

/// One hyper client (plain or TLS) behind a function, shared by bollard's custom transport
/// and the raw requests.
type HttpSend = Arc<
    dyn Fn(BollardRequest) -> BoxFuture<'static, Result<Response<Incoming>, bollard::errors::Error>>
        + Send
        + Sync,
>;

fn http_send<C>(client: Client<C, Body>) -> HttpSend
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    Arc::new(move |req| {
        let response = client.request(req);
        Box::pin(async move { Ok(response.await?) })
    })
}

/// The client for a TCP endpoint: `(base URL, sender)`. With TLS the files are read now.
fn tcp_client(
    addr: &str,
    tls: Option<&super::TlsFiles>,
    timeout: Duration,
) -> Result<(String, HttpSend), SwarmError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    let builder = Client::builder(TokioExecutor::new());
    Ok(match tls {
        None => (format!("http://{addr}"), http_send(builder.build(http))),
        Some(files) => {
            let config = files.client_config()?;
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            (format!("https://{addr}"), http_send(builder.build(https)))
        }
    })
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("endpoint", &self.endpoint)
            .field("version", &self.version)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What `GET /info` says about the daemon's place in the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SwarmRole {
    /// This daemon's swarm node id.
    pub node_id: String,
}

impl Api {
    /// Connect to `endpoint` and negotiate the API version (the daemon may be older than
    /// bollard's default, e.g. 20.10 speaks 1.41). With TLS, the files are read again here
    /// (renewed certificates apply from the next connection on).
    pub async fn connect(endpoint: &DockerEndpoint, timeout: Duration) -> Result<Api, SwarmError> {
        let secs = timeout.as_secs().max(1);
        let connect_err = |source| SwarmError::Connect {
            endpoint: endpoint.to_string(),
            source,
        };
        let (docker, raw) = match endpoint {
            DockerEndpoint::Unix(socket) => {
                let path = socket.to_str().ok_or_else(|| SwarmError::Endpoint {
                    endpoint: socket.display().to_string(),
                    reason: "the socket path is not UTF-8".into(),
                })?;
                let docker = Docker::connect_with_unix(path, secs, API_DEFAULT_VERSION)
                    .map_err(connect_err)?;
                (docker, Raw::Unix(socket.clone()))
            }
            DockerEndpoint::Tcp { addr, tls } => {
                let (base, send) = tcp_client(addr, tls.as_ref(), timeout)?;
                let transport = send.clone();
                let docker = Docker::connect_with_custom_transport(
                    move |req: BollardRequest| transport(req),
                    Some(base.as_str()),
                    secs,
                    API_DEFAULT_VERSION,
                )
                .map_err(connect_err)?;
                (docker, Raw::Http { base, send })
            }
        };
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| SwarmError::Version {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let v = docker.client_version();
        Ok(Api {
            docker,
            endpoint: endpoint.clone(),
            raw,
            version: format!("v{}.{}", v.major_version, v.minor_version),
            timeout,
        })
    }

    /// `call`, failing with bollard's timeout error if the whole answer (bollard bounds only
    /// the wait for the headers) takes longer than the request timeout.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, bollard::errors::Error> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(bollard::errors::Error::RequestTimeoutError))
    }

    /// `GET /info`: this daemon's swarm node id; an error unless it is an active manager
    /// (`manager`) or an active swarm node of any role (a worker's own daemon, whose cluster
    /// state is read from a manager elsewhere).
    pub async fn role(&self, manager: bool) -> Result<SwarmRole, SwarmError> {
        let info = self
            .bounded(self.docker.info())
            .await
            .map_err(|source| SwarmError::Info { source })?;
        check_role(&self.endpoint, info.swarm.unwrap_or_default(), manager)
    }

    /// `GET /nodes`.
    pub async fn nodes(&self) -> Result<Vec<Node>, SwarmError> {
        self.bounded(self.docker.list_nodes(None::<ListNodesOptions>))
            .await
            .map_err(|source| SwarmError::Nodes { source })
    }

    /// `GET /networks`.
    pub async fn networks(&self) -> Result<Vec<Network>, SwarmError> {
        self.bounded(self.docker.list_networks(None::<ListNetworksOptions>))
            .await
            .map_err(|source| SwarmError::Networks { source })
    }

    /// `GET /services`.
    pub async fn services(&self) -> Result<Vec<Service>, SwarmError> {
        self.bounded(self.docker.list_services(None::<ListServicesOptions>))
            .await
            .map_err(|source| SwarmError::Services { source })
    }

    /// `GET /tasks`, with their network attachments (raw request, see the module doc).
    pub async fn tasks(&self) -> Result<Vec<SwarmTask>, SwarmError> {
        let path = format!("/{}/tasks", self.version);
        let body = match &self.raw {
            Raw::Unix(socket) => raw_get(socket, &path, self.timeout).await,
            Raw::Http { base, send } => {
                http_get(send, &format!("{base}{path}"), self.timeout).await
            }
        }
        .map_err(|source| SwarmError::Tasks { source })?;
        serde_json::from_slice(&body).map_err(|e| SwarmError::Tasks {
            source: RawError::Decode(e),
        })
    }

    /// `GET /containers/{id}/json`: the container's network namespace path (`SandboxKey`)
    /// if it is running and has one; `None` if it is gone or not running.
    pub async fn sandbox(&self, container: &str) -> Result<Option<PathBuf>, SwarmError> {
        match self
            .bounded(self.docker.inspect_container(container, None))
            .await
        {
            Ok(c) => {
                let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
                let key = c
                    .network_settings
                    .and_then(|n| n.sandbox_key)
                    .filter(|k| !k.is_empty());
                Ok(key.filter(|_| running).map(PathBuf::from))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(SwarmError::InspectContainer {
                id: container.to_string(),
                source,
            }),
        }
    }

    /// `GET /events` of the given types (from [`EVENT_TYPES`]), from now on.
    pub fn events(
        &self,
        types: &[&str],
    ) -> impl Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
        let filters = HashMap::from([(
            "type".to_string(),
            types.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        )]);
        self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }))
    }
}

/// The daemon's place in the swarm, from `/info`'s `Swarm`: its node id if it is in a swarm
/// (local node state `active`) and, when `manager` is asked for, a manager (`ControlAvailable`).
pub(super) fn check_role(
    endpoint: &DockerEndpoint,
    swarm: bollard::models::SwarmInfo,
    manager: bool,
) -> Result<SwarmRole, SwarmError> {
    let state = swarm
        .local_node_state
        .map(|s| s.to_string())
        .unwrap_or_default();
    let node_id = swarm.node_id.filter(|id| !id.is_empty());
    match (swarm.control_available, node_id) {
        (Some(true), Some(node_id)) => Ok(SwarmRole { node_id }),
        (_, Some(node_id)) if !manager && state == "active" => Ok(SwarmRole { node_id }),
        (_, node_id) => {
            let detail = match node_id {
                None => format!("swarm state `{state}`: not part of a swarm"),
                Some(id) if manager => {
                    format!("swarm node {id} (state `{state}`) is not a manager")
                }
                Some(id) => format!("swarm node {id} is not active (state `{state}`)"),
            };
            let endpoint = endpoint.to_string();
            Err(if manager {
                SwarmError::NotManager { endpoint, detail }
            } else {
                SwarmError::NotInSwarm { endpoint, detail }
            })
        }
    }
}

/// Why a raw request failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("the response is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("Docker responded with status code {status}: {message}")]
    Status { status: u16, message: String },
    #[error("cannot decode the response: {0}")]
    Decode(serde_json::Error),
    #[error("{}", chain(.0))]
    Http(bollard::errors::Error),
}

/// `GET url` through the TCP endpoint's client; the body of a 2xx response.
async fn http_get(send: &HttpSend, url: &str, timeout: Duration) -> Result<Vec<u8>, RawError> {
    let request = hyper::Request::get(url)
        .header("User-Agent", "mesh-agent")
        .header("Accept", "application/json")
        .body(bollard::body_full(bytes::Bytes::new()))
        .map_err(|e| RawError::Malformed(format!("cannot build the request: {e}")))?;
    let exchange = async {
        let response = send(request).await.map_err(RawError::Http)?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    RawError::TooLarge
                } else {
                    RawError::Io(std::io::Error::other(e))
                }
            })?
            .to_bytes();
        status_body(status, body.to_vec())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RawError::Timeout(timeout))?
}

/// `GET path` over the unix socket with HTTP/1.0; the body of a 2xx response.
pub(super) async fn raw_get(
    socket: &Path,
    path: &str,
    timeout: Duration,
) -> Result<Vec<u8>, RawError> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: docker\r\nUser-Agent: mesh-agent\r\nAccept: \
             application/json\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        (&mut stream)
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut response)
            .await?;
        Ok::<_, RawError>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RawError::Timeout(timeout))??;
    parse_response(&response)
}

/// Split an HTTP/1.x response into status and body (de-chunked if need be); the body of a
/// 2xx response, an error carrying the daemon's `message` otherwise.
pub(super) fn parse_response(response: &[u8]) -> Result<Vec<u8>, RawError> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| RawError::Malformed("no end of headers".into()))?;
    let head = std::str::from_utf8(&response[..split])
        .map_err(|_| RawError::Malformed("headers are not UTF-8".into()))?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| RawError::Malformed(format!("bad status line `{status_line}`")))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok();
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        match length {
            Some(n) if body.len() < n => {
                return Err(RawError::Malformed(format!(
                    "body cut short: {} of {n} bytes",
                    body.len()
                )));
            }
            Some(n) => body[..n].to_vec(),
            None => body.to_vec(),
        }
    };
    if body.len() > MAX_BODY {
        return Err(RawError::TooLarge);
    }
    status_body(status, body)
}

/// The body of a 2xx response, an error carrying the daemon's `message` otherwise.
fn status_body(status: u16, body: Vec<u8>) -> Result<Vec<u8>, RawError> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
    Err(RawError::Status { status, message })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, RawError> {
    let mut out = Vec::with_capacity(data.len());
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| RawError::Malformed("chunk size line not terminated".into()))?;
        let line = std::str::from_utf8(&data[..eol])
            .map_err(|_| RawError::Malformed("chunk size is not UTF-8".into()))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| RawError::Malformed(format!("bad chunk size `{size_text}`")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(RawError::Malformed("chunk cut short".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]";
        assert_eq!(parse_response(r).unwrap(), b"[]");
        // HTTP/1.0 without a length: the body runs to the end.
        let r = b"HTTP/1.0 200 OK\r\n\r\n[1,2]";
        assert_eq!(parse_response(r).unwrap(), b"[1,2]");
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;x=y\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), b"[1,2]");
    }

    #[test]
    fn error_status_carries_the_message() {
        let r = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 74\r\n\r\n{\"message\":\"This node is not a swarm manager. Use \\\"docker swarm init\\\".\"}";
        match parse_response(r) {
            Err(RawError::Status { status, message }) => {
                assert_eq!(status, 503);
                assert!(
                    message.starts_with("This node is not a swarm manager"),
                    "{message}"
                );
            }
            other => panic!("expected a status error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_responses() {
        for r in [
            &b"HTTP/1.0 200 OK\r\n"[..],
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n[]",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(
                matches!(parse_response(r), Err(RawError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(r)
            );
        }
    }
}
