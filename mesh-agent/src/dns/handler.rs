//! The hickory [`RequestHandler`] serving one task: answers from the index, forwards the rest.

use std::{
    future::Future,
    iter,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use hickory_proto::{
    op::{Edns, Header, HeaderCounts, LowerQuery, MessageType, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, Record, RecordType},
};
use hickory_server::{
    net::{NetError, runtime::Time, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
};

use super::{
    DnsConfig,
    forward::{Forwarder, Outgoing},
    index::{Entry, Index},
    rng,
    stats::{Stats, inc},
};

/// What every listener shares: configuration, the current index, counters.
pub(crate) struct Shared {
    pub cfg: DnsConfig,
    pub forwarder: Forwarder,
    pub index: ArcSwap<Index>,
    pub stats: Stats,
    pub inflight: AtomicUsize,
    started: Instant,
    /// Seconds since `started` of the last "upstreams failing" warning (rate limit).
    last_warn: AtomicU64,
}

impl Shared {
    pub fn new(cfg: DnsConfig) -> Self {
        Self {
            forwarder: Forwarder {
                upstreams: cfg.upstreams.clone(),
                timeout: cfg.upstream_timeout,
                deadline: cfg.forward_deadline,
            },
            cfg,
            index: ArcSwap::from_pointee(Index::default()),
            stats: Stats::default(),
            inflight: AtomicUsize::new(0),
            started: Instant::now(),
            last_warn: AtomicU64::new(u64::MAX),
        }
    }

    /// At most one warning per 30 s about failing upstreams, not one per query.
    fn warn_upstreams(&self, task: &str, error: &dyn std::fmt::Display) {
        let now = self.started.elapsed().as_secs();
        let last = self.last_warn.load(Ordering::Relaxed);
        if (last == u64::MAX || now >= last.saturating_add(30))
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                task,
                %error,
                "DNS forwarding failed; answering SERVFAIL (more failures in the next 30 s \
                 are only counted)"
            );
        }
    }
}

/// Holds one in-flight forward slot.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(c: &'a AtomicUsize, max: usize) -> Option<Self> {
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(c))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The handler behind one task's listeners. The asker is the task the listener was made
/// for, never the packet's source address.
#[derive(Clone)]
pub(crate) struct TaskHandler {
    pub shared: Arc<Shared>,
    pub task: Arc<str>,
    /// The task's networks at attach time, used while the index does not list the task.
    pub fallback: Arc<[String]>,
}

enum Kind {
    Local,
    Forward,
    Error,
}

impl RequestHandler for TaskHandler {
    // Written out as `#[async_trait]` expands it (its generic `T` is easier to see here).
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(request, response_handle))
    }
}

impl TaskHandler {
    pub(crate) async fn handle<R: ResponseHandler>(
        &self,
        request: &Request,
        rh: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let stats = &self.shared.stats;
        if request.metadata.message_type != MessageType::Query {
            // Never answer a response (reflection loops); hickory's server already drops them.
            inc(&stats.dropped);
            return no_response(&request.metadata);
        }

        // EDNS: answer with an OPT when the query had one, sized min(client's, ours).
        let mut resp_edns = None;
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(
                req.max_payload()
                    .clamp(512, self.shared.cfg.udp_payload.max(512)),
            );
            e.set_version(0);
            resp_edns = Some(e);
            if req.version() > 0 {
                return self
                    .error(
                        request,
                        resp_edns.as_ref(),
                        ResponseCode::BADVERS,
                        rh,
                        started,
                    )
                    .await;
            }
        }
        if request.metadata.op_code != OpCode::Query {
            return self
                .error(
                    request,
                    resp_edns.as_ref(),
                    ResponseCode::NotImp,
                    rh,
                    started,
                )
                .await;
        }
        let [query] = request.queries.queries() else {
            return self
                .error(
                    request,
                    resp_edns.as_ref(),
                    ResponseCode::FormErr,
                    rh,
                    started,
                )
                .await;
        };

        if query.query_class() == DNSClass::IN {
            let index = self.shared.index.load_full();
            let name = query.original().name();
            let fq;
            let name = if name.is_fqdn() {
                name
            } else {
                let mut n = name.clone();
                n.set_fqdn(true);
                fq = n;
                &fq
            };
            if let Some(found) = index.lookup(&self.task, &self.fallback, name) {
                return self
                    .local(
                        request,
                        resp_edns.as_ref(),
                        found.entry,
                        query.query_type(),
                        rh,
                        started,
                    )
                    .await;
            }
        }
        self.forward(request, query, resp_edns.as_ref(), rh, started)
            .await
    }

    async fn local<R: ResponseHandler>(
        &self,
        request: &Request,
        edns: Option<&Edns>,
        entry: &Entry,
        qtype: RecordType,
        mut rh: R,
        started: Instant,
    ) -> ResponseInfo {
        // A known name never gets NXDOMAIN and is never forwarded: types we do not hold get
        // NOERROR with no records.
        let (a, ptr): (&[Record], Option<&Record>) = match qtype {
            RecordType::A => (&entry.a, None),
            RecordType::PTR => (&[], entry.ptr.as_ref()),
            RecordType::ANY => (&entry.a, entry.ptr.as_ref()),
            _ => (&[], None),
        };
        // Shuffle (rotate to a random start) so clients taking the first address spread.
        let k = rng::below(a.len());
        let answers = a[k..].iter().chain(&a[..k]).chain(ptr);
        let mut md = Metadata::response_from_request(&request.metadata);
        md.recursion_available = true;
        let resp = MessageResponseBuilder::new(&request.queries, edns).build(
            md,
            answers,
            iter::empty(),
            iter::empty(),
            iter::empty(),
        );
        let sent = rh.send_response(resp).await;
        self.finish(&request.metadata, sent, Kind::Local, started)
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        query: &LowerQuery,
        edns: Option<&Edns>,
        mut rh: R,
        started: Instant,
    ) -> ResponseInfo {
        let shared = &self.shared;
        let Some(_slot) = Slot::take(&shared.inflight, shared.cfg.max_inflight_forwards) else {
            inc(&shared.stats.forward_rejected);
            return self
                .error(request, edns, ResponseCode::Refused, rh, started)
                .await;
        };
        inc(&shared.stats.forwarded);
        let out = Outgoing {
            query: query.original(),
            recursion_desired: request.metadata.recursion_desired,
            checking_disabled: request.metadata.checking_disabled,
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            tcp: request.protocol() == Protocol::Tcp,
        };
        // Echo DO on forwarded answers (they may carry the upstream's DNSSEC records).
        let fwd_edns = edns.map(|e| {
            let mut e = e.clone();
            e.set_dnssec_ok(out.dnssec_ok);
            e
        });
        let edns = fwd_edns.as_ref();
        match shared.forwarder.resolve(&out).await {
            Ok(up) => {
                let mut md = Metadata::response_from_request(&request.metadata);
                md.recursion_available = true;
                md.authoritative = up.metadata.authoritative;
                md.authentic_data = up.metadata.authentic_data;
                md.truncation = up.metadata.truncation;
                md.response_code = up.metadata.response_code;
                let resp = MessageResponseBuilder::new(&request.queries, edns).build(
                    md,
                    up.answers.iter(),
                    up.authorities.iter(),
                    iter::empty(),
                    up.additionals.iter(),
                );
                let sent = rh.send_response(resp).await;
                self.finish(&request.metadata, sent, Kind::Forward, started)
            }
            Err(e) => {
                inc(&shared.stats.forward_failures);
                tracing::debug!(task = %self.task, error = %e, "forward failed");
                shared.warn_upstreams(&self.task, &e);
                let mut resp = MessageResponseBuilder::new(&request.queries, edns)
                    .error_msg(&request.metadata, ResponseCode::ServFail);
                resp.metadata_mut().recursion_available = true;
                let sent = rh.send_response(resp).await;
                self.finish(&request.metadata, sent, Kind::Forward, started)
            }
        }
    }

    async fn error<R: ResponseHandler>(
        &self,
        request: &Request,
        edns: Option<&Edns>,
        rcode: ResponseCode,
        mut rh: R,
        started: Instant,
    ) -> ResponseInfo {
        let mut resp: MessageResponse<'_, '_, _, _, _, _> =
            MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, rcode);
        resp.metadata_mut().recursion_available = true;
        let sent = rh.send_response(resp).await;
        self.finish(&request.metadata, sent, Kind::Error, started)
    }

    fn finish(
        &self,
        req: &Metadata,
        sent: Result<ResponseInfo, NetError>,
        kind: Kind,
        started: Instant,
    ) -> ResponseInfo {
        let stats = &self.shared.stats;
        let elapsed = started.elapsed();
        match kind {
            Kind::Local => {
                inc(&stats.local);
                stats.local_latency.observe(elapsed);
            }
            Kind::Forward => stats.forward_latency.observe(elapsed),
            Kind::Error => {}
        }
        match sent {
            Ok(info) => {
                stats.response(info.response_code, info.truncation);
                info
            }
            Err(e) => {
                inc(&stats.send_errors);
                tracing::debug!(task = %self.task, error = %e, "cannot send DNS response");
                let mut md = Metadata::response_from_request(req);
                md.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: md,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

fn no_response(req: &Metadata) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: *req,
        counts: HeaderCounts::default(),
    })
}
