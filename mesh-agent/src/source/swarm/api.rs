//! The Engine API calls the Swarm source makes, on a manager's unix socket.
//!
//! Everything goes through bollard except `GET /tasks`: bollard 0.21's `Task` model (generated
//! from the Engine API's swagger file) has no `NetworksAttachments` field, yet that is where a
//! task's addresses are. Tasks are therefore read with a minimal HTTP/1.0 `GET` on the same
//! socket (HTTP/1.0: the daemon closes the connection after the body and never chunks it) and
//! decoded into [`SwarmTask`], bollard's `Task` plus the attachments.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{EventMessage, Network, Node, Service},
    query_parameters::{EventsOptions, ListNetworksOptions, ListNodesOptions, ListServicesOptions},
};
use futures::Stream;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{SwarmError, map::SwarmTask};

/// Largest response body read by the raw client (a `GET /tasks` of a big cluster is a few MB).
const MAX_BODY: usize = 256 << 20;

/// Event types that can change the state ("task" events do not exist in the Engine API:
/// swarm-wide task changes surface as service updates, local ones as container events).
pub(super) const EVENT_TYPES: [&str; 4] = ["service", "node", "network", "container"];

/// A connection to one daemon, with the API version agreed on.
#[derive(Debug, Clone)]
pub(super) struct Api {
    docker: Docker,
    socket: PathBuf,
    /// `v1.41`: the path prefix of the raw requests.
    version: String,
    timeout: Duration,
}

/// What `GET /info` says about the daemon's place in the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SwarmRole {
    /// This daemon's swarm node id.
    pub node_id: String,
}

impl Api {
    /// Connect to `socket` and negotiate the API version (the daemon may be older than
    /// bollard's default, e.g. 20.10 speaks 1.41).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Api, SwarmError> {
        let path = socket.to_str().ok_or_else(|| SwarmError::Endpoint {
            endpoint: socket.display().to_string(),
            reason: "the socket path is not UTF-8".into(),
        })?;
        let secs = timeout.as_secs().max(1);
        let docker =
            Docker::connect_with_unix(path, secs, API_DEFAULT_VERSION).map_err(|source| {
                SwarmError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                }
            })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| SwarmError::Version {
                socket: socket.to_path_buf(),
                source,
            })?;
        let v = docker.client_version();
        Ok(Api {
            docker,
            socket: socket.to_path_buf(),
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

    /// `GET /info`: this daemon's swarm node id; an error unless it is an active manager.
    pub async fn role(&self) -> Result<SwarmRole, SwarmError> {
        let info = self
            .bounded(self.docker.info())
            .await
            .map_err(|source| SwarmError::Info { source })?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm
            .local_node_state
            .map(|s| s.to_string())
            .unwrap_or_default();
        let node_id = swarm.node_id.filter(|id| !id.is_empty());
        match (swarm.control_available, node_id) {
            (Some(true), Some(node_id)) => Ok(SwarmRole { node_id }),
            (_, node_id) => Err(SwarmError::NotManager {
                socket: self.socket.clone(),
                detail: match node_id {
                    None => format!("swarm state `{state}`: not part of a swarm"),
                    Some(id) => format!("swarm node {id} (state `{state}`) is not a manager"),
                },
            }),
        }
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
        let body = raw_get(&self.socket, &path, self.timeout)
            .await
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

    /// `GET /events` for the types that can change the state, from now on.
    pub fn events(
        &self,
    ) -> impl Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
        let filters = HashMap::from([(
            "type".to_string(),
            EVENT_TYPES
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>(),
        )]);
        self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }))
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
