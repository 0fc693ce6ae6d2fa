//! Sources of the managers' state. A source yields whole validated snapshots; the agent
//! diffs each against what it has programmed. A refused update (bad file, unreachable
//! manager) never replaces the last good snapshot: the source reports it and carries on.
//!
//! Implementations: [`file::FileSource`] (a YAML state file watched with inotify). Later
//! sources (Docker Swarm's Engine API, etcd) implement the same trait.

pub mod file;
pub mod swarm;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::model::State;

/// What a source tells the agent.
#[derive(Debug)]
pub enum SourceEvent {
    /// A new, valid snapshot of the whole state.
    Snapshot(Arc<State>),
    /// An update was refused; the previous snapshot stays in force. The text names the
    /// offending field(s).
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: std::path::PathBuf,
        source: crate::model::StateError,
    },
    #[error("cannot watch {path}: {message}")]
    Watch {
        path: std::path::PathBuf,
        message: String,
    },
}

pub trait Source: Send + 'static {
    /// A short description for logs (`file:/etc/mesh/state.yaml`).
    fn describe(&self) -> String;

    /// Load the first snapshot. An error here is fatal at start-up: there is nothing to serve.
    fn initial(&mut self) -> BoxFuture<'_, Result<Arc<State>, SourceError>>;

    /// Follow changes and send one event per change until `tx` closes.
    fn run(self: Box<Self>, tx: mpsc::Sender<SourceEvent>) -> BoxFuture<'static, ()>;

    /// The state's name for the node this source runs on, when the source knows it (a
    /// Swarm manager knows its own node); known after `initial`.
    fn local_node(&self) -> Option<String> {
        None
    }
}
