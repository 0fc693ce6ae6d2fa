//! The YAML state-file source.
//!
//! [`FileSource`] reads the state file once at start-up ([`Source::initial`]) and then
//! follows it ([`Source::run`]): the file's *parent directory* is watched (inotify, through
//! `notify` with a ~150 ms debounce) and events are filtered on the file's name, so that
//! in-place writes, editors that save by writing a new file and renaming it over the old
//! one, and `mv new.yaml state.yaml` are all seen. Every change is re-read; identical bytes
//! send nothing, a valid file sends a [`SourceEvent::Snapshot`], anything else a
//! [`SourceEvent::Rejected`] naming the offending fields (the previous snapshot stays in
//! force). A cheap periodic re-read backs up inotify (missed events, a watch that could not
//! be set up, a symlinked file whose target changes).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use notify_debouncer_full::{
    DebounceEventResult, DebouncedEvent, Debouncer, RecommendedCache, new_debouncer,
    notify::{
        EventKind, RecommendedWatcher, RecursiveMode,
        event::{AccessKind, AccessMode},
    },
};
use tokio::sync::mpsc;

use super::{Source, SourceError, SourceEvent};
use crate::model::{self, FieldError, State, StateError};

/// Debounce window for file-system events.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Period of the safety-net re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// A YAML state file, watched for changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    debounce: Duration,
    poll_interval: Duration,
    /// The last outcome seen, to send nothing when it did not change.
    last: Last,
    /// The last snapshot sent: the next one is built on top of it ([`State::rebase`]).
    prev: Option<Arc<State>>,
}

#[derive(Debug, Default, PartialEq)]
enum Last {
    #[default]
    Nothing,
    /// The bytes last read (valid or not).
    Bytes(Vec<u8>),
    /// The file could not be read; the error text.
    ReadError(String),
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource {
            path: path.into(),
            debounce: DEBOUNCE,
            poll_interval: POLL_INTERVAL,
            last: Last::Nothing,
            prev: None,
        }
    }

    /// Change the safety-net re-read period (default [`POLL_INTERVAL`]).
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Change the debounce window of file-system events (default [`DEBOUNCE`]).
    pub fn with_debounce(mut self, window: Duration) -> Self {
        self.debounce = window.max(Duration::from_millis(1));
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory to watch and the file name to filter its events on.
    fn watch_target(&self) -> (PathBuf, Option<OsString>) {
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, self.path.file_name().map(|n| n.to_os_string()))
    }

    /// `state` built on top of the last snapshot sent, which it replaces.
    fn shared(&mut self, state: State) -> Arc<State> {
        let state = Arc::new(match &self.prev {
            Some(prev) => state.rebase(prev),
            None => state,
        });
        self.prev = Some(state.clone());
        state
    }

    /// Re-read the file; the event to send, if its outcome changed.
    async fn reread(&mut self) -> Option<SourceEvent> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                if matches!(&self.last, Last::Bytes(b) if *b == bytes) {
                    return None;
                }
                let result = parse_bytes(&bytes);
                self.last = Last::Bytes(bytes);
                Some(match result {
                    Ok(state) => SourceEvent::Snapshot(self.shared(state)),
                    Err(source) => SourceEvent::Rejected(
                        SourceError::Invalid {
                            path: self.path.clone(),
                            source,
                        }
                        .to_string(),
                    ),
                })
            }
            Err(source) => {
                let text = SourceError::Read {
                    path: self.path.clone(),
                    source,
                }
                .to_string();
                if matches!(&self.last, Last::ReadError(t) if *t == text) {
                    return None;
                }
                self.last = Last::ReadError(text.clone());
                Some(SourceEvent::Rejected(text))
            }
        }
    }

    async fn follow(mut self, tx: mpsc::Sender<SourceEvent>) {
        let (dir, name) = self.watch_target();
        // Capacity 1: a pending notification already causes a re-read of the newest content.
        let (ntx, mut nrx) = mpsc::channel::<()>(1);
        let mut watcher = start_watch(&dir, name.clone(), self.debounce, ntx.clone());
        if let Err(e) = &watcher {
            tracing::warn!(file = %self.path.display(), "{e}; falling back to re-reading every {:?}", self.poll_interval);
        }
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate

        // Re-read first (a change made between `initial()` and the watch being set up), then
        // on every notification and every poll tick.
        loop {
            if let Some(ev) = self.reread().await {
                log_event(&self.path, &ev);
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                _ = tx.closed() => break,
                // `ntx` is kept alive here, so this never yields `None`.
                Some(()) = nrx.recv() => {}
                _ = poll.tick() => {
                    if watcher.is_err() {
                        watcher = start_watch(&dir, name.clone(), self.debounce, ntx.clone());
                        if watcher.is_ok() {
                            tracing::info!(file = %self.path.display(), "watching for changes");
                        }
                    }
                }
            }
        }
        if let Ok(w) = watcher {
            w.stop_nonblocking();
        }
        drop(ntx);
    }
}

fn log_event(path: &Path, ev: &SourceEvent) {
    match ev {
        SourceEvent::Snapshot(_) => {
            tracing::debug!(file = %path.display(), "state file changed")
        }
        SourceEvent::Rejected(why) => {
            tracing::debug!(file = %path.display(), "state file change refused: {why}")
        }
    }
}

/// Parse the file's bytes (UTF-8 YAML) into a validated state.
fn parse_bytes(bytes: &[u8]) -> Result<State, StateError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        StateError::Parse(FieldError::new(
            model::validate::DOCUMENT_PATH,
            format!("not UTF-8 text: {e}"),
        ))
    })?;
    model::parse_yaml(text)
}

type Watch = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Watch `dir` (non-recursively) and signal `ntx` on every debounced event concerning the
/// file `name` (any event at all if the name is unknown or the backend asks for a rescan).
fn start_watch(
    dir: &Path,
    name: Option<OsString>,
    debounce: Duration,
    ntx: mpsc::Sender<()>,
) -> Result<Watch, SourceError> {
    let watch_err = |e: notify_debouncer_full::notify::Error| SourceError::Watch {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let handler = move |result: DebounceEventResult| {
        let relevant = match &result {
            Ok(events) => events.iter().any(|e| concerns(e, name.as_deref())),
            Err(errors) => {
                for e in errors {
                    tracing::warn!("state file watch: {e}");
                }
                // Events may have been lost: re-read to be sure.
                true
            }
        };
        if relevant {
            // Full means a re-read is already pending; closed means the source stopped.
            let _ = ntx.try_send(());
        }
    };
    let mut debouncer = new_debouncer(debounce, None, handler).map_err(watch_err)?;
    debouncer
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(watch_err)?;
    Ok(debouncer)
}

/// Whether a debounced event may have changed the file `name`.
fn concerns(event: &DebouncedEvent, name: Option<&std::ffi::OsStr>) -> bool {
    if event.need_rescan() {
        return true;
    }
    match event.kind {
        // Opening, reading, closing without writing: our own re-reads among them.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    match name {
        None => true,
        Some(name) => event.paths.iter().any(|p| p.file_name() == Some(name)),
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn initial(&mut self) -> BoxFuture<'_, Result<Arc<State>, SourceError>> {
        async move {
            let bytes = tokio::fs::read(&self.path)
                .await
                .map_err(|source| SourceError::Read {
                    path: self.path.clone(),
                    source,
                })?;
            let result = parse_bytes(&bytes);
            self.last = Last::Bytes(bytes);
            let state = result.map_err(|source| SourceError::Invalid {
                path: self.path.clone(),
                source,
            })?;
            Ok(self.shared(state))
        }
        .boxed()
    }

    fn run(self: Box<Self>, tx: mpsc::Sender<SourceEvent>) -> BoxFuture<'static, ()> {
        (*self).follow(tx).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
version: 1
nodes:
  - name: n1
    address: 192.168.1.1
networks:
  - name: net
    subnet: 10.9.0.0/24
    vni: 9
services:
  - name: web
    networks:
      - network: net
        vip: 10.9.0.2
";

    fn with_service(name: &str) -> String {
        VALID.replace("name: web", &format!("name: {name}"))
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// Start following `path` (after `initial()`); long poll so inotify does the work.
    async fn start(path: &Path) -> (mpsc::Receiver<SourceEvent>, Arc<State>) {
        let mut src = FileSource::new(path).with_poll_interval(Duration::from_secs(3600));
        let first = match src.initial().await {
            Ok(s) => s,
            Err(e) => panic!("initial: {e}"),
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(Box::new(src).run(tx));
        // Let the watch be set up before the test edits the file.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (rx, first)
    }

    async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("source stopped"),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    fn snapshot(ev: SourceEvent) -> Arc<State> {
        match ev {
            SourceEvent::Snapshot(s) => s,
            SourceEvent::Rejected(why) => panic!("expected a snapshot, got Rejected({why})"),
        }
    }

    #[tokio::test]
    async fn initial_reads_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let mut src = FileSource::new(&path);
        assert_eq!(src.describe(), format!("file:{}", path.display()));
        let s = src.initial().await.unwrap();
        assert!(s.services.contains_key("web"));
    }

    #[tokio::test]
    async fn initial_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let mut src = FileSource::new(&path);
        assert!(matches!(src.initial().await, Err(SourceError::Read { .. })));
        std::fs::write(
            &path,
            "version: 1\nnodes:\n  - name: n1\n    address: nope\n",
        )
        .unwrap();
        match src.initial().await {
            Err(e @ SourceError::Invalid { .. }) => {
                let text = e.to_string();
                assert!(text.contains("nodes[0].address"), "{text}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        std::fs::write(&path, b"version: 1\n\xff\n").unwrap();
        assert!(matches!(
            src.initial().await,
            Err(SourceError::Invalid { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edit_sends_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let (mut rx, first) = start(&path).await;
        assert!(first.services.contains_key("web"));

        std::fs::write(&path, with_service("api")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("api"), "{s:?}");
        assert!(!s.services.contains_key("web"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unchanged_bytes_send_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let (mut rx, _) = start(&path).await;

        // Same content rewritten, and another file of the directory changed.
        std::fs::write(&path, VALID).unwrap();
        std::fs::write(dir.path().join("other.yaml"), "x").unwrap();
        let got = tokio::time::timeout(Duration::from_millis(800), rx.recv()).await;
        assert!(got.is_err(), "unexpected event: {got:?}");

        // A real change still comes through afterwards.
        std::fs::write(&path, with_service("api")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("api"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_edit_is_rejected_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let (mut rx, _) = start(&path).await;

        std::fs::write(&path, VALID.replace("vip: 10.9.0.2", "vip: 10.8.0.2")).unwrap();
        match next(&mut rx).await {
            SourceEvent::Rejected(why) => {
                assert!(why.contains("services[0].networks[0].vip"), "{why}");
                assert!(why.contains(&path.display().to_string()), "{why}");
            }
            SourceEvent::Snapshot(s) => panic!("expected Rejected, got {s:?}"),
        }

        // Fixing it sends a snapshot again.
        std::fs::write(&path, with_service("fixed")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("fixed"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replace_by_rename_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let (mut rx, _) = start(&path).await;

        // `mv new state.yaml`
        let new = dir.path().join("state.yaml.new");
        std::fs::write(&new, with_service("moved")).unwrap();
        std::fs::rename(&new, &path).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("moved"));

        // An editor's save: old file renamed away, new one written in its place.
        std::fs::rename(&path, dir.path().join("state.yaml~")).unwrap();
        std::fs::write(&path, with_service("saved")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("saved"));

        // And further in-place edits of the new inode are still seen.
        std::fs::write(&path, with_service("again")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("again"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn periodic_reread_catches_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        // Watching a symlink's directory does not see its target change: only polling can.
        let real_dir = tempfile::tempdir().unwrap();
        let target = real_dir.path().join("real.yaml");
        std::fs::write(&target, VALID).unwrap();
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let mut src = FileSource::new(&link).with_poll_interval(Duration::from_millis(200));
        src.initial().await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(Box::new(src).run(tx));
        tokio::time::sleep(Duration::from_millis(300)).await;

        std::fs::write(&target, with_service("polled")).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("polled"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removal_is_reported_once_and_recovery_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let mut src = FileSource::new(&path).with_poll_interval(Duration::from_millis(100));
        src.initial().await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(Box::new(src).run(tx));
        tokio::time::sleep(Duration::from_millis(300)).await;

        std::fs::remove_file(&path).unwrap();
        match next(&mut rx).await {
            SourceEvent::Rejected(why) => assert!(why.contains("cannot read"), "{why}"),
            SourceEvent::Snapshot(s) => panic!("expected Rejected, got {s:?}"),
        }
        // Several polls later: nothing more while the error is the same.
        let got = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(got.is_err(), "unexpected event: {got:?}");

        std::fs::write(&path, VALID).unwrap();
        let s = snapshot(next(&mut rx).await);
        assert!(s.services.contains_key("web"));
    }

    #[tokio::test]
    async fn stops_when_receiver_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, VALID).unwrap();
        let mut src = FileSource::new(&path);
        src.initial().await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(Box::new(src).run(tx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(rx);
        tokio::time::timeout(WAIT, task)
            .await
            .expect("run() did not stop")
            .unwrap();
    }
}
