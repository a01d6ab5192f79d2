//! What a cluster's Raft log carries and how nodes are named: the openraft
//! type configuration, shared by the log store, the state machine, the
//! network and the journal.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::engine::Lsn;

/// A node as its peers know it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Where peer traffic reaches it (`host:port`).
    pub raft: String,
    /// Its HTTP API (`http://host:port`), where followers forward requests.
    pub api: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft {} api {}", self.raft, self.api)
    }
}

/// One engine record as the leader applied it. Effects, not commands: a
/// follower applies exactly what the leader decided, through the same path
/// recovery replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The engine's LSN of the record. Not the Raft index: blank and
    /// membership entries carry no record, so LSNs only increase along the log.
    pub lsn: Lsn,
    /// Format version of `bytes`.
    pub version: u16,
    /// The record as the WAL stores it (engine time and mutations).
    pub bytes: Vec<u8>,
}

/// The payload of a normal Raft entry: records with consecutive LSNs, as
/// many as were queued when the entry was proposed. One entry per record
/// would cost one leader fsync per record: openraft 0.9 waits for each
/// append to be flushed before it takes the next, so batching here is the
/// cluster's group commit.
pub type Records = Vec<Record>;

openraft::declare_raft_types!(
    /// The Raft types of a quotad cluster.
    pub TypeConfig:
        D = Records,
        R = (),
        NodeId = u64,
        Node = Peer,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
);

/// A Raft log id of this cluster.
pub type LogId = openraft::LogId<u64>;
/// A log entry of this cluster.
pub type Entry = openraft::Entry<TypeConfig>;
/// The Raft handle of this cluster.
pub type Raft = openraft::Raft<TypeConfig>;
/// A storage error as openraft takes it.
pub type StorageError = openraft::StorageError<u64>;
/// Membership as stored with the log position that made it.
pub type StoredMembership = openraft::StoredMembership<u64, Peer>;

/// Openraft's I/O error kinds (what was being read or written).
pub type IoError = openraft::StorageIOError<u64>;

/// A storage error for openraft: `kind` says what failed (e.g.
/// `|e| IoError::write_logs(e)`), `message` why.
pub fn io_error(kind: impl FnOnce(openraft::AnyError) -> IoError, message: impl fmt::Display) -> StorageError {
    kind(openraft::AnyError::error(message.to_string())).into()
}
