//! The Docker Swarm source: the managers' state, read from a manager's Engine API.
//!
//! [`SwarmSource`] talks to the Docker daemon of this node at a [`DockerEndpoint`]: its unix
//! socket (default `/var/run/docker.sock`), or TCP — plain (`tcp://host:2375`) or TLS
//! (`tcp://host:2376` with the client's CA, certificate and key, given the way the docker CLI
//! takes them: see [`endpoint`]). A sync reads `GET /info` (this daemon's node id), `/nodes`,
//! `/networks`, `/services`, `/tasks`, and `GET /containers/{id}/json` for the local node's
//! starting and running tasks (their network namespace, `SandboxKey`); [`map`] turns that
//! into the model's wire form, which is then validated exactly like a state file.
//!
//! Only managers answer `/nodes`, `/services` and `/tasks`, and only a node's own daemon
//! knows its containers' sandboxes. Alone, the endpoint must therefore be a manager, and the
//! node's own (over TCP it may be another machine, but the sandboxes must be this node's). On a
//! worker, [`SwarmSource::with_manager`] (`--docker-manager`) names a manager's daemon as well:
//! the cluster state (`/nodes`, `/networks`, `/services`, `/tasks`, and service, node and
//! network events) comes from it, while `/info` (whose node may then be a worker: active in
//! the swarm is enough), the sandboxes and container events come from this node's daemon. The
//! node's name follows from its daemon, and the ingress sandbox is found next to the local
//! tasks' sandboxes, as on a manager. The CLI applies the `--docker-*` TLS settings to
//! whichever of the two endpoints is TCP (one set of client files for both). Either endpoint
//! failing is an outage, handled as below.
//!
//! Following ([`Source::run`]): `GET /events` (types service, node, network, container;
//! with a separate manager, the first three from it and container from this node's daemon)
//! triggers a sync ~200 ms after the last event of a burst. The Engine API has no task
//! events (a task starting on another node changes nothing an event reports), so after any
//! event or change the source keeps re-syncing every second for a while ([`SETTLE_WINDOW`]),
//! and every [`RESYNC_INTERVAL`] otherwise, in case an event was missed. Only a changed
//! outcome is sent: a new valid [`State`] as [`SourceEvent::Snapshot`], a new validation
//! failure as [`SourceEvent::Rejected`].
//!
//! When a daemon is unreachable (stopped, restarting, not a manager any more) the source
//! sends nothing, so the agent keeps serving the last snapshot; it reconnects with
//! exponential backoff (capped at [`MAX_BACKOFF`]), logs the outage once and the recovery
//! once, and syncs right after reconnecting. [`Source::initial`] retries the same way for a
//! bounded time ([`INITIAL_TIMEOUT`] by default) before giving up.
//!
//! Errors: [`SwarmError`] names the API call that failed. Through the [`Source`] trait, an
//! unreachable manager is [`SourceError::Read`] (path: the socket, or the endpoint's text for
//! TCP; source: an `io::Error` wrapping the [`SwarmError`]) and a state that does not validate
//! [`SourceError::Invalid`]. A TLS file that is missing or unreadable is an error naming it
//! and the setting it came from.
//!
//! `GET /tasks` does not go through bollard: its `Task` model lacks `NetworksAttachments`
//! (see `api.rs`). Over TCP, bollard (through its custom transport) and that request share
//! one hyper client, with rustls (ring) for TLS: the daemon is verified against the given CA
//! only.

mod api;
pub mod endpoint;
pub mod map;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use tokio::{sync::mpsc, time::Instant};
use tracing::{Instrument, debug, info, info_span, warn};

use api::Api;
pub use api::RawError;
pub use endpoint::{DockerEndpoint, TlsFiles, TlsOptions};
use map::{ClusterView, Mapping};

use super::{Source, SourceError, SourceEvent};
use crate::model::{self, State, StateError};

/// Default Engine API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// How long [`Source::initial`] keeps trying to reach a manager (default).
pub const INITIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time after an event before syncing (events come in bursts).
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Period of the safety-net sync when nothing happens.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// Period of the sync while the swarm is settling (after an event or a change).
pub const SETTLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the swarm counts as settling after the last event or change.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(10);
/// First reconnection delay; doubled after every failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnection delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Timeout of one API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to the manager failed. Each variant names the API call, or the endpoint
/// setting or TLS file at fault.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("unsupported Docker endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("Docker TLS {what}: {reason}")]
    Tls { what: &'static str, reason: String },
    #[error("Docker TLS {what} {}: {reason}", path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot connect to {endpoint}: {}", chain(source))]
    Connect {
        /// The endpoint's text (`tcp://10.0.0.1:2376 (TLS)`).
        endpoint: String,
        source: bollard::errors::Error,
    },
    #[error(
        "GET /version on {endpoint} (API version negotiation): {}",
        chain(source)
    )]
    Version {
        /// The endpoint's text (`tcp://10.0.0.1:2376 (TLS)`).
        endpoint: String,
        source: bollard::errors::Error,
    },
    #[error("GET /info: {}", chain(source))]
    Info { source: bollard::errors::Error },
    #[error("{endpoint}: not a swarm manager ({detail})")]
    NotManager {
        /// The endpoint's text (`tcp://10.0.0.1:2376 (TLS)`).
        endpoint: String,
        detail: String,
    },
    #[error("{endpoint}: not an active swarm node ({detail})")]
    NotInSwarm {
        /// The endpoint's text (the local daemon's, with a separate manager).
        endpoint: String,
        detail: String,
    },
    #[error("GET /nodes: {}", chain(source))]
    Nodes { source: bollard::errors::Error },
    #[error("GET /networks: {}", chain(source))]
    Networks { source: bollard::errors::Error },
    #[error("GET /services: {}", chain(source))]
    Services { source: bollard::errors::Error },
    #[error("GET /tasks: {source}")]
    Tasks { source: RawError },
    #[error("GET /containers/{id}/json: {}", chain(source))]
    InspectContainer {
        id: String,
        source: bollard::errors::Error,
    },
    #[error("GET /events: {}", chain(source))]
    Events { source: bollard::errors::Error },
    #[error("GET /events: the daemon closed the stream")]
    EventsEnded,
}

/// `e` and its causes (`client error (Connect): Connection refused (os error 111)`): bollard's
/// messages alone do not say why a connection failed.
fn chain(e: &bollard::errors::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// Does the Swarm service `name` exist (Engine API at `endpoint`)? The agent asks this on
/// SIGTERM: its own service still there means a rolling update or restart (keep the data path
/// for the next agent); gone means `docker service rm` (clean up everything).
pub async fn service_exists(endpoint: &DockerEndpoint, name: &str) -> Result<bool, SwarmError> {
    let api = api::Api::connect(endpoint, Duration::from_secs(5)).await?;
    let services = api.services().await?;
    Ok(services
        .iter()
        .any(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name)))
}

/// A swarm manager's Engine API, followed.
#[derive(Debug)]
pub struct SwarmSource {
    /// The daemon of this node: `/info`, sandboxes, container events (and, without
    /// `manager`, everything).
    endpoint: DockerEndpoint,
    /// A manager's daemon elsewhere, for the cluster state (`/nodes`, `/networks`,
    /// `/services`, `/tasks` and their events), when this node's daemon is a worker's.
    manager: Option<DockerEndpoint>,
    initial_timeout: Duration,
    debounce: Duration,
    resync_interval: Duration,
    settle_interval: Duration,
    settle_window: Duration,
    max_backoff: Duration,
    request_timeout: Duration,
    /// The last outcome sent (or returned by `initial`), to send nothing when it repeats.
    last: Last,
    /// Sandbox of each local container already inspected (a container's sandbox never
    /// changes; entries go on the container's events and on reconnection).
    sandboxes: HashMap<String, PathBuf>,
    /// Mapping notes and warnings last logged.
    notes: Vec<String>,
    warnings: Vec<String>,
    /// The state's name for the node of the daemon talked to, as of the last sync.
    local_node: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq)]
enum Last {
    #[default]
    Nothing,
    State(Arc<State>),
    Rejected(String),
}

impl Default for SwarmSource {
    /// The daemon on [`DEFAULT_SOCKET`].
    fn default() -> Self {
        Self::new(DockerEndpoint::default())
    }
}

impl SwarmSource {
    /// The daemon at `endpoint` (a unix socket's path converts into one).
    pub fn new(endpoint: impl Into<DockerEndpoint>) -> Self {
        SwarmSource {
            endpoint: endpoint.into(),
            manager: None,
            initial_timeout: INITIAL_TIMEOUT,
            debounce: DEBOUNCE,
            resync_interval: RESYNC_INTERVAL,
            settle_interval: SETTLE_INTERVAL,
            settle_window: SETTLE_WINDOW,
            max_backoff: MAX_BACKOFF,
            request_timeout: REQUEST_TIMEOUT,
            last: Last::Nothing,
            sandboxes: HashMap::new(),
            notes: Vec::new(),
            warnings: Vec::new(),
            local_node: None,
        }
    }

    /// From a `DOCKER_HOST`-style host (`unix:///path`, a plain path, `tcp://host[:port]`),
    /// or anything else that resolves into a [`DockerEndpoint`] (the CLI's host and TLS
    /// settings). With TLS, the files are read once here, so that a bad one fails now rather
    /// than on every connection attempt.
    pub fn from_endpoint<E>(endpoint: E) -> Result<Self, SwarmError>
    where
        E: TryInto<DockerEndpoint, Error = SwarmError>,
    {
        let endpoint = endpoint.try_into()?;
        check_tls(&endpoint)?;
        Ok(Self::new(endpoint))
    }

    /// Read the cluster state (`/nodes`, `/networks`, `/services`, `/tasks`, and the
    /// service, node and network events) from the manager at `manager`, keeping this
    /// source's endpoint for this node's daemon (`/info`, which may then be a worker's,
    /// `/containers/{id}/json` and container events). TLS files are checked as in
    /// [`SwarmSource::from_endpoint`].
    pub fn with_manager(mut self, manager: impl Into<DockerEndpoint>) -> Result<Self, SwarmError> {
        let manager = manager.into();
        check_tls(&manager)?;
        self.manager = Some(manager);
        Ok(self)
    }

    pub fn endpoint(&self) -> &DockerEndpoint {
        &self.endpoint
    }

    /// The manager read for the cluster state, if it is not [`SwarmSource::endpoint`].
    pub fn manager(&self) -> Option<&DockerEndpoint> {
        self.manager.as_ref()
    }

    /// Connect to this node's daemon and, if separate, the manager.
    async fn connect(&self) -> Result<Apis, SwarmError> {
        let local = Api::connect(&self.endpoint, self.request_timeout).await?;
        let manager = match &self.manager {
            Some(m) => Some(Api::connect(m, self.request_timeout).await?),
            None => None,
        };
        Ok(Apis { local, manager })
    }

    /// The name, in the state, of the swarm node whose daemon this source talks to (known
    /// after [`Source::initial`]): the node an agent using this daemon runs on, whatever
    /// the host name says.
    pub fn local_node(&self) -> Option<&str> {
        self.local_node.as_deref()
    }

    /// How long [`Source::initial`] keeps retrying (default [`INITIAL_TIMEOUT`]).
    pub fn with_initial_timeout(mut self, timeout: Duration) -> Self {
        self.initial_timeout = timeout;
        self
    }

    /// Period of the safety-net sync (default [`RESYNC_INTERVAL`]).
    pub fn with_resync_interval(mut self, every: Duration) -> Self {
        self.resync_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Quiet time after an event before syncing (default [`DEBOUNCE`]).
    pub fn with_debounce(mut self, window: Duration) -> Self {
        self.debounce = window;
        self
    }

    /// Period and duration of the faster syncs after an event or change (defaults
    /// [`SETTLE_INTERVAL`], [`SETTLE_WINDOW`]).
    pub fn with_settle(mut self, every: Duration, window: Duration) -> Self {
        self.settle_interval = every.max(Duration::from_millis(10));
        self.settle_window = window;
        self
    }

    /// Longest delay between reconnection attempts (default [`MAX_BACKOFF`]).
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max.max(MIN_BACKOFF);
        self
    }

    /// Timeout of each API request (default [`REQUEST_TIMEOUT`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Read the whole swarm and map it; `Err` if the manager could not be read, `Ok(Err)` if
    /// it was read but its state does not validate.
    #[tracing::instrument(name = "swarm_sync", level = "debug", skip_all)]
    async fn sync(&mut self, apis: &Apis) -> Result<Result<State, StateError>, SwarmError> {
        let api = &apis.local;
        let cluster = apis.cluster();
        let role = api.role(apis.manager.is_none()).await?;
        let (nodes, networks, services, tasks) = futures::try_join!(
            cluster.nodes(),
            cluster.networks(),
            cluster.services(),
            cluster.tasks()
        )?;
        let wanted = map::local_containers(&tasks, Some(&role.node_id));
        self.sandboxes.retain(|id, _| wanted.contains(id));
        let missing: Vec<String> = wanted
            .iter()
            .filter(|id| !self.sandboxes.contains_key(*id))
            .cloned()
            .collect();
        let found: Vec<(String, Option<PathBuf>)> = futures::stream::iter(missing)
            .map(|id| async move {
                let sandbox = api.sandbox(&id).await?;
                Ok::<_, SwarmError>((id, sandbox))
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for (id, sandbox) in found {
            // Not running yet: ask again next time.
            if let Some(path) = sandbox {
                self.sandboxes.insert(id, path);
            }
        }
        let view = ClusterView {
            nodes,
            networks,
            services,
            tasks,
            local_node: Some(role.node_id),
            sandboxes: self.sandboxes.clone(),
        };
        let Mapping {
            file,
            local_node,
            notes,
            warnings,
        } = map::map(&view);
        self.local_node = local_node;
        if notes != self.notes {
            for n in &notes {
                debug!("mapping: {n}");
            }
            self.notes = notes;
        }
        if warnings != self.warnings {
            for w in &warnings {
                warn!("swarm mapping: {w}");
            }
            self.warnings = warnings;
        }
        Ok(model::validate(file))
    }

    /// The event to send for `outcome`, if it differs from the last one.
    fn judge(&mut self, outcome: Result<State, StateError>) -> Option<SourceEvent> {
        match outcome {
            Ok(state) => {
                let state = match &self.last {
                    Last::State(s) if **s == state => return None,
                    Last::State(s) => state.rebase(s),
                    _ => state,
                };
                let state = Arc::new(state);
                self.last = Last::State(state.clone());
                Some(SourceEvent::Snapshot(state))
            }
            Err(e) => {
                let text = self.invalid(e).to_string();
                if matches!(&self.last, Last::Rejected(t) if *t == text) {
                    return None;
                }
                self.last = Last::Rejected(text.clone());
                Some(SourceEvent::Rejected(text))
            }
        }
    }

    fn invalid(&self, source: StateError) -> SourceError {
        SourceError::Invalid {
            path: self.endpoint.as_path(),
            source,
        }
    }

    fn unreachable(&self, e: SwarmError) -> SourceError {
        SourceError::Read {
            path: self.endpoint.as_path(),
            source: std::io::Error::other(e),
        }
    }

    fn span(&self) -> tracing::Span {
        match &self.manager {
            None => info_span!("swarm", endpoint = %self.endpoint),
            Some(m) => info_span!("swarm", endpoint = %self.endpoint, manager = %m),
        }
    }

    /// A container's events: forget its sandbox (it stopped, or its id is reused).
    fn on_event(&mut self, ev: &bollard::models::EventMessage) -> bool {
        use bollard::models::EventMessageTypeEnum as T;
        match ev.typ {
            Some(T::SERVICE) | Some(T::NODE) | Some(T::NETWORK) => true,
            Some(T::CONTAINER) => {
                let actor = ev.actor.as_ref();
                let swarm_task = actor
                    .and_then(|a| a.attributes.as_ref())
                    .is_some_and(|a| a.contains_key("com.docker.swarm.task.id"));
                if !swarm_task {
                    return false;
                }
                let action = ev.action.as_deref().unwrap_or_default();
                if !matches!(action, "start" | "create")
                    && let Some(id) = actor.and_then(|a| a.id.as_deref())
                {
                    self.sandboxes.remove(id);
                }
                // Exec and health events change nothing.
                !action.starts_with("exec_") && !action.starts_with("health_status")
            }
            _ => false,
        }
    }

    async fn initial_inner(&mut self) -> Result<Arc<State>, SourceError> {
        let deadline = Instant::now() + self.initial_timeout;
        let mut backoff = Backoff::new(self.max_backoff);
        let mut logged = false;
        loop {
            let attempt = async {
                let apis = self.connect().await?;
                self.sync(&apis).await
            };
            let err = match attempt.await {
                Ok(Ok(state)) => {
                    if logged {
                        info!("swarm manager reachable");
                    }
                    let state = Arc::new(state);
                    self.last = Last::State(state.clone());
                    return Ok(state);
                }
                Ok(Err(invalid)) => self.invalid(invalid),
                Err(e) => self.unreachable(e),
            };
            let delay = backoff.next();
            if Instant::now() + delay > deadline {
                return Err(err);
            }
            if !logged {
                warn!("{err}; retrying for up to {:?}", self.initial_timeout);
                logged = true;
            } else {
                debug!("{err}; retrying in {delay:?}");
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn follow(mut self, tx: mpsc::Sender<SourceEvent>) {
        let mut backoff = Backoff::new(self.max_backoff);
        // Since when, and why, the manager is unreachable (logged once).
        let mut outage: Option<(Instant, String)> = None;
        loop {
            let broke = self.follow_connected(&tx, &mut outage, &mut backoff).await;
            let Some(err) = broke else {
                return; // the receiver is gone
            };
            match &outage {
                None => {
                    // A stream that merely ended is retried at once, quietly: the outage
                    // is declared only if reconnecting fails.
                    if matches!(err, SwarmError::EventsEnded | SwarmError::Events { .. }) {
                        debug!("{err}; reconnecting");
                    } else {
                        warn!(
                            "swarm manager unreachable: {err}; keeping the last state, \
                             reconnecting (backoff up to {:?})",
                            self.max_backoff
                        );
                        outage = Some((Instant::now(), err.to_string()));
                    }
                }
                Some(_) => debug!("swarm manager still unreachable: {err}"),
            }
            let delay = backoff.next();
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            self.sandboxes.clear();
        }
    }

    /// Connect, follow events and sync until something fails (`Some(error)`) or `tx` closes
    /// (`None`).
    async fn follow_connected(
        &mut self,
        tx: &mpsc::Sender<SourceEvent>,
        outage: &mut Option<(Instant, String)>,
        backoff: &mut Backoff,
    ) -> Option<SwarmError> {
        let apis = match self.connect().await {
            Ok(apis) => apis,
            Err(e) => return Some(e),
        };
        let mut events = apis.events();
        let mut next_sync = Instant::now();
        let mut debounce_at: Option<Instant> = None;
        // Settling right after (re)connecting: events may have been missed.
        let mut busy_until = Instant::now() + self.settle_window;
        loop {
            let wake = debounce_at.map_or(next_sync, |d| d.min(next_sync));
            tokio::select! {
                biased;
                _ = tx.closed() => return None,
                ev = events.next() => match ev.flatten() {
                    Some(Ok(msg)) => {
                        if self.on_event(&msg) {
                            let now = Instant::now();
                            debounce_at.get_or_insert(now + self.debounce);
                            busy_until = now + self.settle_window;
                        }
                    }
                    // An event bollard cannot decode still says something happened.
                    Some(Err(
                        bollard::errors::Error::JsonDataError { .. }
                        | bollard::errors::Error::JsonSerdeError { .. },
                    )) => {
                        debounce_at.get_or_insert(Instant::now() + self.debounce);
                    }
                    Some(Err(source)) => return Some(SwarmError::Events { source }),
                    None => return Some(SwarmError::EventsEnded),
                },
                _ = tokio::time::sleep_until(wake) => {
                    debounce_at = None;
                    let outcome = match self.sync(&apis).await {
                        Ok(o) => o,
                        Err(e) => return Some(e),
                    };
                    backoff.reset();
                    if let Some((since, why)) = outage.take() {
                        info!(
                            "swarm manager reachable again after {:.1?} (was: {why})",
                            since.elapsed()
                        );
                    }
                    let now = Instant::now();
                    if let Some(ev) = self.judge(outcome) {
                        busy_until = now + self.settle_window;
                        match &ev {
                            SourceEvent::Snapshot(s) => debug!(
                                nodes = s.nodes.len(),
                                services = s.services.len(),
                                tasks = s.tasks.len(),
                                "swarm state changed"
                            ),
                            SourceEvent::Rejected(why) => {
                                debug!("swarm state refused: {why}")
                            }
                        }
                        if tx.send(ev).await.is_err() {
                            return None;
                        }
                    }
                    let every = if now < busy_until {
                        self.settle_interval.min(self.resync_interval)
                    } else {
                        self.resync_interval
                    };
                    next_sync = Instant::now() + every;
                }
            }
        }
    }
}

/// With TLS, read the files now, so that a bad one fails at once rather than on every
/// connection attempt.
fn check_tls(endpoint: &DockerEndpoint) -> Result<(), SwarmError> {
    if let DockerEndpoint::Tcp {
        tls: Some(files), ..
    } = endpoint
    {
        files.client_config()?;
    }
    Ok(())
}

/// The connections of one session: this node's daemon and, if separate, the manager.
struct Apis {
    local: Api,
    manager: Option<Api>,
}

/// One stream of both daemons' events; `None` as soon as either stream ends.
type Events = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Option<Result<bollard::models::EventMessage, bollard::errors::Error>>,
            > + Send,
    >,
>;

impl Apis {
    /// Where the cluster state is read.
    fn cluster(&self) -> &Api {
        self.manager.as_ref().unwrap_or(&self.local)
    }

    /// The events that can change the state: all of [`api::EVENT_TYPES`] from the one
    /// daemon; with a separate manager, container events from this node's daemon and the
    /// others from the manager. An item `None` means a stream ended.
    fn events(&self) -> Events {
        let ended = || futures::stream::once(async { None });
        match &self.manager {
            None => Box::pin(
                self.local
                    .events(&api::EVENT_TYPES)
                    .map(Some)
                    .chain(ended()),
            ),
            Some(manager) => {
                let (local, cluster): (Vec<&str>, Vec<&str>) =
                    api::EVENT_TYPES.iter().partition(|t| **t == "container");
                Box::pin(futures::stream::select(
                    self.local.events(&local).map(Some).chain(ended()),
                    manager.events(&cluster).map(Some).chain(ended()),
                ))
            }
        }
    }
}

/// Exponential backoff from [`MIN_BACKOFF`] to a cap.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: MIN_BACKOFF.min(max),
            max,
        }
    }
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = MIN_BACKOFF.min(self.max);
    }
}

impl Source for SwarmSource {
    fn local_node(&self) -> Option<String> {
        SwarmSource::local_node(self).map(str::to_string)
    }

    fn describe(&self) -> String {
        match &self.manager {
            None => format!("swarm:{}", self.endpoint),
            Some(m) => format!("swarm:{} (manager {m})", self.endpoint),
        }
    }

    fn initial(&mut self) -> BoxFuture<'_, Result<Arc<State>, SourceError>> {
        let span = self.span();
        self.initial_inner().instrument(span).boxed()
    }

    fn run(self: Box<Self>, tx: mpsc::Sender<SourceEvent>) -> BoxFuture<'static, ()> {
        let span = self.span();
        (*self).follow(tx).instrument(span).boxed()
    }
}
