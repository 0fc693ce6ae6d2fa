//! Forwarding of non-local names to the upstream resolvers.
//!
//! One fresh socket per attempt (random source port) plus a random query id, created in the
//! agent's own network namespace (the tokio runtime's), so the upstreams are the node's.
//! Upstreams are tried in order, each with its own timeout, all within an overall deadline;
//! UDP first, TCP when the UDP answer is truncated (or the client itself asked over TCP).
//! An upstream's SERVFAIL/REFUSED moves on to the next one; if none does better, that answer
//! is passed on. Nothing is cached.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    serialize::binary::DecodeError,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

/// The EDNS UDP payload size we advertise to upstreams (DNS flag day 2020: no fragmentation).
pub(crate) const UPSTREAM_UDP_PAYLOAD: u16 = 1232;
/// Receive buffer for UDP answers; a datagram filling it is treated as truncated.
const UDP_RECV_BUF: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("cannot encode the query: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("no upstream answered ({tried} tried); last error: {last}")]
    AllFailed { tried: usize, last: AttemptError },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("{upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        source: io::Error,
    },
    #[error("{upstream}: timed out")]
    Timeout { upstream: SocketAddr },
    #[error("{upstream}: malformed answer: {source}")]
    Malformed {
        upstream: SocketAddr,
        source: DecodeError,
    },
    #[error("{upstream}: answer does not match the query")]
    Mismatch { upstream: SocketAddr },
    #[error("deadline reached before any upstream was tried")]
    Deadline,
}

/// What the forwarder needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub deadline: Duration,
}

/// The query as it is forwarded: the client's question and its RD/CD/DO bits.
pub(crate) struct Outgoing<'a> {
    pub query: &'a Query,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub dnssec_ok: bool,
    /// The client asked over TCP: skip UDP.
    pub tcp: bool,
}

enum UdpOutcome {
    Answer(Message),
    /// The datagram filled our buffer: assume it was cut.
    Overflow,
}

impl Forwarder {
    /// Resolve `out` upstream. Returns the first usable answer (not SERVFAIL/REFUSED), else
    /// the last SERVFAIL/REFUSED answer, else an error; never takes longer than the deadline.
    pub async fn resolve(&self, out: &Outgoing<'_>) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = out.recursion_desired;
        msg.metadata.checking_disabled = out.checking_disabled;
        msg.add_query(out.query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UPSTREAM_UDP_PAYLOAD);
        edns.set_dnssec_ok(out.dnssec_ok);
        msg.set_edns(edns);
        let mut wire = msg.to_vec()?;

        let deadline = Instant::now() + self.deadline;
        let mut fallback: Option<Message> = None;
        let mut last = AttemptError::Deadline;
        let mut tried = 0;
        for &upstream in &self.upstreams {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tried += 1;
            let until = deadline.min(now + self.timeout);
            let id = random_id();
            wire[..2].copy_from_slice(&id.to_be_bytes());
            match attempt(upstream, &wire, id, out, until).await {
                Ok(m)
                    if matches!(
                        m.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) =>
                {
                    fallback = Some(m);
                }
                Ok(m) => return Ok(m),
                Err(e) => last = e,
            }
        }
        fallback.ok_or(ForwardError::AllFailed { tried, last })
    }
}

async fn attempt(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    out: &Outgoing<'_>,
    until: Instant,
) -> Result<Message, AttemptError> {
    let timeout = |_| AttemptError::Timeout { upstream };
    if out.tcp {
        return timeout_at(until, tcp_exchange(upstream, wire, id, out.query))
            .await
            .map_err(timeout)?;
    }
    let udp = timeout_at(until, udp_exchange(upstream, wire, id, out.query))
        .await
        .map_err(timeout)??;
    match udp {
        UdpOutcome::Answer(m) if !m.metadata.truncation => Ok(m),
        // Truncated: retry over TCP; if that fails, pass the truncated answer on (TC set), so
        // the client can retry over TCP itself.
        UdpOutcome::Answer(m) => {
            match timeout_at(until, tcp_exchange(upstream, wire, id, out.query)).await {
                Ok(Ok(full)) => Ok(full),
                _ => Ok(m),
            }
        }
        UdpOutcome::Overflow => timeout_at(until, tcp_exchange(upstream, wire, id, out.query))
            .await
            .map_err(timeout)?,
    }
}

async fn udp_exchange(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    query: &Query,
) -> Result<UdpOutcome, AttemptError> {
    let io = |source| AttemptError::Io { upstream, source };
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: only the upstream's datagrams arrive, and ICMP errors surface.
    sock.connect(upstream).await.map_err(io)?;
    sock.send(wire).await.map_err(io)?;
    let mut buf = vec![0u8; UDP_RECV_BUF];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        if n >= buf.len() {
            return Ok(UdpOutcome::Overflow);
        }
        let data = &buf[..n];
        // Not an answer to this query (stray or spoofed): keep waiting.
        if n < 12 || data[..2] != id.to_be_bytes() || data[2] & 0x80 == 0 {
            continue;
        }
        let m = Message::from_vec(data)
            .map_err(|source| AttemptError::Malformed { upstream, source })?;
        if !answers(&m, id, query) {
            continue;
        }
        return Ok(UdpOutcome::Answer(m));
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, AttemptError> {
    let io = |source| AttemptError::Io { upstream, source };
    let mut s = TcpStream::connect(upstream).await.map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let len = u16::try_from(wire.len()).map_err(|_| {
        io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "query too long",
        ))
    })?;
    let mut framed = Vec::with_capacity(wire.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(wire);
    s.write_all(&framed).await.map_err(io)?;
    let mut lb = [0u8; 2];
    s.read_exact(&mut lb).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lb))];
    s.read_exact(&mut buf).await.map_err(io)?;
    let m =
        Message::from_vec(&buf).map_err(|source| AttemptError::Malformed { upstream, source })?;
    if !answers(&m, id, query) {
        return Err(AttemptError::Mismatch { upstream });
    }
    Ok(m)
}

/// `m` is a response to our query `id` for `query` (some servers leave the question out of
/// error responses; that is accepted).
fn answers(m: &Message, id: u16, query: &Query) -> bool {
    m.metadata.id == id
        && m.metadata.message_type == MessageType::Response
        && match m.queries.as_slice() {
            [] => m.metadata.response_code != ResponseCode::NoError,
            [q] => {
                q.name() == query.name()
                    && q.query_type() == query.query_type()
                    && q.query_class() == query.query_class()
            }
            _ => false,
        }
}

/// An unpredictable query id (from the kernel's CSPRNG).
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 2 {
        u16::from_ne_bytes(b)
    } else {
        // getrandom cannot fail for 2 bytes once the pool is initialised; be safe anyway.
        super::rng::next_u64() as u16
    }
}
