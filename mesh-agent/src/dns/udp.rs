//! UDP serving of one task's listener.
//!
//! Almost every query a container sends is the same shape: one question, class IN, for a
//! name the index holds (`web`, `tasks.web`), with or without an EDNS OPT record. Those are
//! answered here straight from the index into a reused buffer, on the receive loop, with no
//! allocation and no task spawned ([`fast_answer`]). Everything else (names to forward,
//! PTR/ANY, answers that need truncation, other opcodes, malformed input) is decoded by
//! hickory-proto and goes through the same [`TaskHandler::handle`] as TCP, on its own tokio
//! task, answered through [`UdpResponder`]. Both paths give the same answers (the unit tests
//! compare them byte for byte).

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::ResponseCode,
    rr::{Name, RData, rdata::A},
    serialize::binary::{BinDecodable, BinDecoder, BinEncoder},
};
use hickory_server::{
    net::{NetError, xfer::Protocol},
    server::{Request, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tokio::{net::UdpSocket, task::JoinSet};

use super::{
    handler::{Shared, TaskHandler},
    rng,
    stats::inc,
};

/// Largest query read; longer datagrams are cut and then fail to decode (FORMERR).
const MAX_QUERY: usize = 2048;
/// Datagrams taken per recvmmsg(2) and answered per sendmmsg(2).
const BATCH: usize = 16;
/// Queries on the slow path in flight per listener; more are dropped (the client retries).
const MAX_SLOW: usize = 256;

/// Receive and answer buffers of one listener, reused for every batch.
struct Batch {
    bufs: Vec<[u8; MAX_QUERY]>,
    names: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    outs: Vec<Vec<u8>>,
    /// Slots of this batch answered by the fast path, in order.
    ready: Vec<usize>,
}

// SAFETY: the raw pointers in `iov`/`hdrs` only ever point into this same `Batch` (they are
// rewritten before every system call); moving the whole batch between threads is sound.
unsafe impl Send for Batch {}

impl Batch {
    fn new() -> Self {
        Self {
            bufs: vec![[0; MAX_QUERY]; BATCH],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            outs: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            ready: Vec::with_capacity(BATCH),
        }
    }

    /// recvmmsg(2) of at most `want` (≤ [`BATCH`]) datagrams, non-blocking: how many came.
    fn recv(&mut self, fd: i32, want: usize) -> io::Result<usize> {
        let want = want.clamp(1, BATCH);
        for i in 0..want {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_QUERY,
            };
            let len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            point(&mut self.hdrs[i], &mut self.names[i], len, &mut self.iov[i]);
        }
        // SAFETY: every header points at buffers owned by `self` that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                want as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// sendmmsg(2) the fast answers of this batch, non-blocking: how many went out.
    fn send_ready(&mut self, fd: i32) -> usize {
        let mut k = 0;
        for &i in &self.ready {
            self.iov[k] = libc::iovec {
                iov_base: self.outs[i].as_mut_ptr().cast(),
                iov_len: self.outs[i].len(),
            };
            let len = if self.names[i].ss_family == libc::AF_INET6 as u16 {
                std::mem::size_of::<libc::sockaddr_in6>() as u32
            } else {
                std::mem::size_of::<libc::sockaddr_in>() as u32
            };
            point(&mut self.hdrs[k], &mut self.names[i], len, &mut self.iov[k]);
            k += 1;
        }
        if k == 0 {
            return 0;
        }
        // SAFETY: the first `k` headers point at buffers owned by `self`.
        let n = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), k as u32, libc::MSG_DONTWAIT) };
        n.max(0) as usize
    }
}

/// Point `h` at one address and one buffer, no control data, flags and length cleared.
fn point(
    h: &mut libc::mmsghdr,
    name: &mut libc::sockaddr_storage,
    namelen: u32,
    iov: &mut libc::iovec,
) {
    h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
    h.msg_hdr.msg_namelen = namelen;
    h.msg_hdr.msg_iov = iov;
    h.msg_hdr.msg_iovlen = 1;
    h.msg_hdr.msg_control = std::ptr::null_mut();
    h.msg_hdr.msg_controllen = 0;
    h.msg_hdr.msg_flags = 0;
    h.msg_len = 0;
}

/// A socket address from what recvmmsg(2) wrote.
fn sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    }
}

/// Serve `sock` until the task is aborted (detach) or the socket fails for good. Datagrams
/// are taken in batches (recvmmsg) and the fast answers of a batch leave together
/// (sendmmsg): under load a query costs a fraction of two system calls.
pub(crate) async fn serve(sock: UdpSocket, handler: TaskHandler) {
    use std::os::fd::AsRawFd;
    let sock = Arc::new(sock);
    let fd = sock.as_raw_fd();
    let mut b = Batch::new();
    let mut want = BATCH;
    let mut slow = JoinSet::new();
    let mut scratch = Vec::with_capacity(512);
    loop {
        if let Err(e) = sock.readable().await {
            tracing::warn!(task = %handler.task, error = %e, "DNS UDP socket failed; no longer serving UDP");
            return;
        }
        // A short batch means the queue was empty when the kernel looked: report WouldBlock
        // so tokio clears the readiness now (a datagram arriving since raises a new edge),
        // instead of asking the kernel once more only to hear EAGAIN. After such a batch
        // the next query likely comes alone: ask for one, so its answer is not held up by
        // the kernel looking for a second (a full batch of one asks for a whole batch next).
        let mut got = 0;
        let n = match sock.try_io(tokio::io::Interest::READABLE, || {
            got = b.recv(fd, want)?;
            if got < want {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        }) {
            Ok(n) => {
                want = BATCH;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                want = 1;
                if got == 0 {
                    continue;
                }
                got
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
                ) =>
            {
                tracing::warn!(task = %handler.task, error = %e, "DNS UDP socket failed; no longer serving UDP");
                return;
            }
            Err(e) => {
                tracing::debug!(task = %handler.task, error = %e, "DNS UDP receive error");
                continue;
            }
        };
        while slow.try_join_next().is_some() {}
        b.ready.clear();
        let started = Instant::now();
        for i in 0..n {
            let len = (b.hdrs[i].msg_len as usize).min(MAX_QUERY);
            let (query, src) = (&b.bufs[i][..len], sockaddr(&b.names[i]));
            // Never answer to an address an answer cannot go back to (hickory's rule).
            let Some(src) = src.filter(|s| {
                s.port() != 0 && !s.ip().is_unspecified() && s.ip() != std::net::Ipv4Addr::BROADCAST
            }) else {
                inc(&handler.shared.stats.dropped);
                continue;
            };
            if fast_answer(&handler, query, &mut b.outs[i]) {
                b.ready.push(i);
            } else {
                slow_path(&sock, &handler, query, src, &mut slow, &mut scratch).await;
            }
        }
        if b.ready.is_empty() {
            continue;
        }
        let sent = b.send_ready(fd);
        // What the socket could not take at once (buffer full) goes out one by one.
        for k in sent..b.ready.len() {
            let i = b.ready[k];
            if let Some(dst) = sockaddr(&b.names[i]) {
                send(&sock, &b.outs[i], dst, &handler.shared).await;
            }
        }
        let stats = &handler.shared.stats;
        let per = started.elapsed() / b.ready.len() as u32;
        for _ in 0..b.ready.len() {
            inc(&stats.local);
            stats.local_latency.observe(per);
            stats.response(ResponseCode::NoError, false);
        }
    }
}

/// Send one datagram: at once when the socket has room, else wait for it (bounded).
async fn send(sock: &UdpSocket, data: &[u8], dst: SocketAddr, shared: &Shared) {
    let r = match sock.try_send_to(data, dst) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            match tokio::time::timeout(Duration::from_secs(1), sock.send_to(data, dst)).await {
                Ok(r) => r,
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            }
        }
        r => r,
    };
    if let Err(e) = r {
        inc(&shared.stats.send_errors);
        tracing::debug!(%dst, error = %e, "cannot send DNS response");
    }
}

/// Decode `query` with hickory-proto and hand it to the handler on its own task.
async fn slow_path(
    sock: &Arc<UdpSocket>,
    handler: &TaskHandler,
    query: &[u8],
    src: SocketAddr,
    slow: &mut JoinSet<()>,
    out: &mut Vec<u8>,
) {
    if query.len() < 12 {
        // Not even a header: nothing to answer to.
        inc(&handler.shared.stats.dropped);
        return;
    }
    if query[2] & 0x80 != 0 {
        // A response: never answered (reflection loops).
        inc(&handler.shared.stats.dropped);
        return;
    }
    match Request::from_bytes(query.to_vec(), src, Protocol::Udp) {
        Ok(req) => {
            if slow.len() >= MAX_SLOW {
                inc(&handler.shared.stats.dropped);
                return;
            }
            let h = handler.clone();
            let rh = UdpResponder {
                sock: sock.clone(),
                dst: src,
            };
            slow.spawn(async move {
                h.handle(&req, rh).await;
            });
        }
        Err(_) => {
            // A header but an undecodable body: FORMERR with the query's id, opcode and RD.
            out.clear();
            out.extend_from_slice(&query[0..2]);
            out.push(0x80 | (query[2] & 0x79));
            out.push(0x80 | ResponseCode::FormErr.low());
            out.extend_from_slice(&[0; 8]);
            send(sock, out, src, &handler.shared).await;
            handler.shared.stats.response(ResponseCode::FormErr, false);
        }
    }
}

/// Sends the handler's answer for one UDP query, sized to the query's EDNS payload (512
/// without), truncated with TC by hickory's encoder when larger.
#[derive(Clone)]
pub(crate) struct UdpResponder {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = response.edns().map_or(512, |e| e.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut bytes);
        enc.set_max_size(max);
        let info = response
            .destructive_emit(&mut enc)
            .map_err(|e| NetError::from(format!("cannot encode DNS response: {e}")))?;
        self.sock.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// The parts of a query the fast path needs.
struct Simple {
    /// End of the question section.
    qend: usize,
    qtype: u16,
    /// The query's EDNS UDP payload size, when it had an OPT record.
    edns: Option<u16>,
}

/// Is `q` a plain query the fast path may answer: QUERY opcode, not a response, not
/// truncated, exactly one question of class IN, no answer/authority records, at most one
/// additional record which is an EDNS version 0 OPT, nothing after it?
#[inline]
fn simple(q: &[u8]) -> Option<Simple> {
    if q.len() < 12 + 5 {
        return None;
    }
    let (f1, counts) = (q[2], &q[4..12]);
    // QR = 0, opcode 0, TC = 0.
    if f1 & 0xfa != 0 {
        return None;
    }
    if counts[0..6] != [0, 1, 0, 0, 0, 0] || counts[6] != 0 || counts[7] > 1 {
        return None;
    }
    // QNAME: uncompressed labels (a question has nothing to point back to).
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 || i + 1 + len - 12 > 255 {
            return None;
        }
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*q.get(i + 2)?, *q.get(i + 3)?]);
    let qend = i + 4;
    // IN only; PTR and ANY carry names or several sections: the general path.
    if qclass != 1 || qtype == 12 || qtype == 255 {
        return None;
    }
    let edns = if counts[7] == 1 {
        // OPT: root name, type 41, class = payload, ttl = ext-rcode, version, flags, rdata.
        let o = q.get(qend..qend + 11)?;
        let rdlen = u16::from_be_bytes([o[9], o[10]]) as usize;
        if o[0] != 0 || o[1..3] != [0, 41] || o[6] != 0 || qend + 11 + rdlen != q.len() {
            return None;
        }
        Some(u16::from_be_bytes([o[3], o[4]]))
    } else {
        if qend != q.len() {
            return None;
        }
        None
    };
    Some(Simple { qend, qtype, edns })
}

/// Answer `q` into `out` when it is a plain query for a name the asking task's networks
/// hold; `false` sends it down the general path. The answer is what
/// [`TaskHandler::handle`] would send: id, RD and CD echoed, RA set, the question as asked,
/// the A records (rotated to a random start; none for other types) with lowercase owner
/// names, and an OPT record of version 0 sized min(client's, ours) when the query had one.
pub(crate) fn fast_answer(h: &TaskHandler, q: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(s) = simple(q) else { return false };
    let mut d = BinDecoder::new(&q[12..s.qend]);
    let Ok(name) = Name::read(&mut d) else {
        return false;
    };
    let index = h.shared.index.load();
    let Some(found) = index.lookup(&h.task, &h.fallback, &name) else {
        return false;
    };
    let a: &[hickory_proto::rr::Record] = if s.qtype == 1 { &found.entry.a } else { &[] };
    let payload = s
        .edns
        .map(|p| p.clamp(512, h.shared.cfg.udp_payload.max(512)));
    let qname = &q[12..s.qend - 4];
    let lower = !qname.iter().any(u8::is_ascii_uppercase);
    let size = 12
        + (s.qend - 12)
        + if lower || a.is_empty() {
            0
        } else {
            qname.len() - 2
        }
        + a.len() * 16
        + if payload.is_some() { 11 } else { 0 };
    if size > payload.unwrap_or(512) as usize || a.len() > u16::MAX as usize {
        return false; // needs TC: the general path truncates
    }
    out.clear();
    out.extend_from_slice(&q[0..2]);
    out.push(0x80 | (q[2] & 0x01)); // QR, opcode 0, RD echoed
    out.push(0x80 | (q[3] & 0x10)); // RA, CD echoed, NOERROR
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(a.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, u8::from(payload.is_some())]);
    out.extend_from_slice(&q[12..s.qend]);
    // Owner names: a pointer to the question when it is lowercase already; otherwise the
    // first answer spells the lowercase name out and the others point at it.
    let mut owner: u16 = 12;
    let k = rng::below(a.len());
    for (n, rec) in a[k..].iter().chain(&a[..k]).enumerate() {
        let RData::A(A(addr)) = rec.data else {
            return false;
        };
        if n == 0 && !lower {
            owner = out.len() as u16;
            out.extend(qname.iter().map(u8::to_ascii_lowercase));
        } else {
            out.extend_from_slice(&(0xc000 | owner).to_be_bytes());
        }
        out.extend_from_slice(&[0, 1, 0, 1]);
        out.extend_from_slice(&rec.ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&addr.octets());
    }
    if let Some(p) = payload {
        out.push(0);
        out.extend_from_slice(&[0, 41]);
        out.extend_from_slice(&p.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    debug_assert_eq!(out.len(), size);
    true
}
