//! Durable Raft storage: one redb file per node holding the log, the vote, the committed index
//! and the last snapshot; plus the state machine openraft applies entries to.
//!
//! Why redb: a pure-Rust embedded ACID store in one file (no C++ build like RocksDB, maintained
//! and with a stable file format unlike sled); every write transaction is fsynced before
//! openraft is told the log is durable. The state machine itself lives in memory: on start it
//! is restored from the last snapshot and openraft re-applies the committed log after it, so a
//! restarted node enforces the latest committed policy before it talks to anyone.
//!
//! Snapshot data (what openraft ships to a lagging member, in chunks) is binary: a format byte
//! ([`SNAPSHOT_FORMAT`]) then the postcard encoding of [`SmData`]; the first release's JSON is
//! still read. The stored snapshot is its metadata (JSON) and its data (raw bytes) under two
//! keys written in one transaction.
//!
//! A write that fails (a full disk, a read-only or failing file system) is logged as an ERROR
//! naming the file, the OS error and what to do ([`WriteError`]), and returned to openraft,
//! which stops this member's Raft core: nothing is reported durable that is not.
//!
//! Must not touch the network or the datapath (applied policies leave through [`PolicySink`]).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::state::ClusterState;
use super::{Member, NodeId, PolicySink, Response, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
/// The first release's snapshot record: JSON of meta and data together (still read).
const SNAPSHOT_LEGACY: &str = "snapshot";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

/// The first byte of snapshot data in the current format (postcard of [`SmData`] follows).
/// JSON snapshot data (the first release's) starts with `{`.
pub const SNAPSHOT_FORMAT: u8 = 1;

type SError = StorageError<NodeId>;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("creating {path}: {source}{}", io_advice(source))]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("opening Raft store {path}: {message}")]
    Db { path: String, message: String },
    #[error("Raft store {path}: the stored snapshot is unreadable: {message}")]
    Snapshot { path: String, message: String },
}

/// A write to the store that failed: what was being written, the file, the error under it
/// (redb's, carrying the OS error) and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("writing {what} to the Raft store {path}: {source}{}", advice(source))]
pub struct WriteError {
    pub what: &'static str,
    pub path: String,
    pub source: redb::Error,
}

/// What an operator does about a failed store operation, from the error under it ("" when
/// there is nothing specific to say).
fn advice(e: &redb::Error) -> &'static str {
    match e {
        redb::Error::Io(io) => io_advice(io),
        redb::Error::PreviousIo => {
            "; an earlier write to this file failed: fix the file system, then restart fwnode"
        }
        _ => "",
    }
}

/// [`advice`] for an OS error: a full file system, a read-only one, a failing disk.
fn io_advice(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded => {
            "; the file system is full: free space on it, then (re)start fwnode"
        }
        K::ReadOnlyFilesystem => {
            "; the file system is read-only: remount it read-write, then (re)start fwnode"
        }
        _ if e.raw_os_error() == Some(libc::EIO) => {
            "; the disk or the file system failed (see the kernel log: a file system that \
             found an error may have gone read-only): repair it, then (re)start fwnode"
        }
        _ => "",
    }
}

/// An open error of redb as [`OpenError::Db`]'s message, with [`advice`].
fn open_message(e: impl Into<redb::Error>) -> String {
    let e = e.into();
    format!("{e}{}", advice(&e))
}

/// The open store file and its path (for errors and logs).
#[derive(Debug)]
struct Db {
    db: Database,
    path: String,
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        &self.db
    }
}

impl Db {
    /// Runs `f` in one write transaction and commits it (the default durability fsyncs before
    /// the commit returns). A failure is logged as an ERROR naming the file and the OS error,
    /// and returned for openraft, which stops this member's Raft core on it: nothing that was
    /// not durable is ever reported durable.
    fn write(
        &self,
        what: &'static str,
        f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), AnyError> {
        let run = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        };
        run().map_err(|source| {
            let e = WriteError {
                what,
                path: self.path.clone(),
                source,
            };
            tracing::error!("{e}");
            AnyError::error(e)
        })
    }
}

/// Enforces `p` from the blocking pool and waits for it: parsing and compiling a large policy
/// takes milliseconds to seconds, and on one of the control runtime's two threads it would
/// stall Raft heartbeats and the API meanwhile. Applying still finishes only once the policy
/// is in force, so a reader of `last_applied` never sees a version this node does not enforce.
async fn enforce_off_runtime(sink: &Arc<dyn PolicySink>, p: crate::raft::PolicyRecord) {
    let sink = sink.clone();
    let version = p.version;
    if let Err(e) = tokio::task::spawn_blocking(move || sink.enforce(&p)).await {
        tracing::error!(version, "enforcing the committed policy failed: {e}");
    }
}

/// Opens (creating if needed) `<dir>/raft.redb`.
pub fn open(
    dir: &Path,
    sink: Arc<dyn PolicySink>,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::Dir {
        path: dir.display().to_string(),
        source: e,
    })?;
    let path = dir.join("raft.redb");
    let p = path.display().to_string();
    let db_err = |m: String| OpenError::Db {
        path: p.clone(),
        message: m,
    };
    // Only a store that does not exist is created. One that exists is opened as it is, and a
    // damaged one is refused: opening an empty store in its place would make this member
    // forget its vote and its log (it could vote twice in one term, or lose entries a quorum
    // acknowledged). A new store is made under another name and renamed into place once it
    // holds its tables, so a crash while creating it cannot leave an empty `raft.redb`.
    let init = |db: &Database| -> Result<(), OpenError> {
        // Create the tables so that readers never see "table does not exist".
        let tx = db.begin_write().map_err(|e| db_err(open_message(e)))?;
        tx.open_table(LOG).map_err(|e| db_err(open_message(e)))?;
        tx.open_table(META).map_err(|e| db_err(open_message(e)))?;
        tx.commit().map_err(|e| db_err(open_message(e)))
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == 0 => {
            return Err(db_err(
                "the file is empty: the store is damaged, and this member's vote and log are \
                 gone (README *Bad local state* says how to bring the member back)"
                    .into(),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let new = dir.join("raft.redb.new");
            let _ = std::fs::remove_file(&new);
            let db = Database::create(&new).map_err(|e| db_err(open_message(e)))?;
            init(&db)?;
            drop(db);
            std::fs::rename(&new, &path).map_err(|e| db_err(open_message(e)))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| db_err(open_message(e)))?;
        }
        Err(e) => return Err(db_err(open_message(e))),
    }
    let db = Database::open(&path).map_err(|e| db_err(open_message(e)))?;
    init(&db)?;
    let db = Arc::new(Db {
        db,
        path: p.clone(),
    });

    let log = LogStore { db: db.clone() };
    let mut data = SmData::default();
    let stored = read_snapshot(&db).map_err(|e| OpenError::Snapshot {
        path: p.clone(),
        message: e.to_string(),
    })?;
    if let Some((_, bytes)) = &stored {
        data = decode_snapshot(bytes).map_err(|e| OpenError::Snapshot {
            path: p.clone(),
            message: e.to_string(),
        })?;
    }
    if let Some(cur) = data.state.current() {
        sink.enforce(cur);
    }
    sink.ha(&data.state.ha);
    let sm = StateMachineStore {
        db,
        data: Arc::new(RwLock::new(data)),
        sink,
        snapshot_seq: Arc::new(AtomicU64::new(0)),
    };
    Ok((log, sm))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}

/// Why snapshot data could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCodecError {
    #[error("empty snapshot data")]
    Empty,
    #[error("unknown snapshot data format {0:#04x}")]
    UnknownFormat(u8),
    #[error("undecodable snapshot data: {0}")]
    Decode(String),
    #[error("encoding snapshot data: {0}")]
    Encode(String),
}

/// What snapshot data carries after the postcard of [`SmData`]: facts added since the format
/// was fixed. A member of the previous release reads the state and stops (postcard ignores
/// trailing bytes); so these must be facts it can do without. Absent when empty.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Trailer {
    /// `(version, who authorised it)` of the kept policy versions that record it.
    authorised_by: Vec<(u64, String)>,
}

/// Snapshot data of `d`: [`SNAPSHOT_FORMAT`], postcard of `d`, then its [`Trailer`] if any.
pub fn encode_snapshot(d: &SmData) -> Result<Vec<u8>, SnapshotCodecError> {
    let enc = |e: postcard::Error| SnapshotCodecError::Encode(e.to_string());
    let out = postcard::to_extend(d, vec![SNAPSHOT_FORMAT]).map_err(enc)?;
    let trailer = Trailer {
        authorised_by: d
            .state
            .policies
            .iter()
            .filter_map(|p| Some((p.version, p.authorised_by.clone()?)))
            .collect(),
    };
    if trailer == Trailer::default() {
        return Ok(out);
    }
    postcard::to_extend(&trailer, out).map_err(enc)
}

/// Reads snapshot data in the current format or the first release's JSON.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SmData, SnapshotCodecError> {
    let dec = |e: postcard::Error| SnapshotCodecError::Decode(e.to_string());
    match bytes.first() {
        None => Err(SnapshotCodecError::Empty),
        Some(&SNAPSHOT_FORMAT) => {
            let (mut d, rest) = postcard::take_from_bytes::<SmData>(&bytes[1..]).map_err(dec)?;
            if !rest.is_empty() {
                let trailer: Trailer = postcard::from_bytes(rest).map_err(dec)?;
                for (version, by) in trailer.authorised_by {
                    if let Some(p) = d.state.policies.iter_mut().find(|p| p.version == version) {
                        p.authorised_by = Some(by);
                    }
                }
            }
            Ok(d)
        }
        Some(b'{') => {
            serde_json::from_slice(bytes).map_err(|e| SnapshotCodecError::Decode(e.to_string()))
        }
        Some(&b) => Err(SnapshotCodecError::UnknownFormat(b)),
    }
}

/// A stored snapshot: its metadata and its data.
type Stored = (SnapshotMeta<NodeId, Member>, Vec<u8>);

/// The stored snapshot, in the current layout or the first release's.
fn read_snapshot(db: &Database) -> Result<Option<Stored>, AnyError> {
    let tx = db.begin_read().map_err(|e| AnyError::new(&e))?;
    let t = tx.open_table(META).map_err(|e| AnyError::new(&e))?;
    let meta = t.get(SNAPSHOT_META).map_err(|e| AnyError::new(&e))?;
    let data = t.get(SNAPSHOT_DATA).map_err(|e| AnyError::new(&e))?;
    if let (Some(m), Some(d)) = (meta, data) {
        let meta = serde_json::from_slice(m.value()).map_err(|e| AnyError::new(&e))?;
        return Ok(Some((meta, d.value().to_vec())));
    }
    let Some(v) = t.get(SNAPSHOT_LEGACY).map_err(|e| AnyError::new(&e))? else {
        return Ok(None);
    };
    let s: StoredSnapshot = serde_json::from_slice(v.value()).map_err(|e| AnyError::new(&e))?;
    Ok(Some((s.meta, s.data)))
}

/// Replace the stored snapshot (one fsynced transaction).
fn write_snapshot(
    db: &Db,
    meta: &SnapshotMeta<NodeId, Member>,
    data: &[u8],
) -> Result<(), AnyError> {
    let m = encode(meta).map_err(|e| AnyError::new(&e))?;
    db.write("the snapshot", |tx| {
        let mut t = tx.open_table(META)?;
        t.insert(SNAPSHOT_META, m.as_slice())?;
        t.insert(SNAPSHOT_DATA, data)?;
        t.remove(SNAPSHOT_LEGACY)?;
        Ok(())
    })
}

fn read_meta<T: for<'de> Deserialize<'de>>(
    db: &Database,
    key: &str,
) -> Result<Option<T>, AnyError> {
    let tx = db.begin_read().map_err(|e| AnyError::new(&e))?;
    let t = tx.open_table(META).map_err(|e| AnyError::new(&e))?;
    let Some(v) = t.get(key).map_err(|e| AnyError::new(&e))? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|e| AnyError::new(&e))
}

fn write_meta<T: Serialize>(db: &Db, what: &'static str, key: &str, v: &T) -> Result<(), AnyError> {
    let bytes = encode(v).map_err(|e| AnyError::new(&e))?;
    db.write(what, |tx| {
        tx.open_table(META)?.insert(key, bytes.as_slice())?;
        Ok(())
    })
}

/// The Raft log and vote.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Db>,
}

impl LogStore {
    fn read_range<RB: RangeBounds<u64>>(
        &self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, AnyError> {
        let tx = self.db.begin_read().map_err(|e| AnyError::new(&e))?;
        let t = tx.open_table(LOG).map_err(|e| AnyError::new(&e))?;
        let mut out = vec![];
        for item in t.range(range).map_err(|e| AnyError::new(&e))? {
            let (_, v) = item.map_err(|e| AnyError::new(&e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| AnyError::new(&e))?);
        }
        Ok(out)
    }

    fn last_entry(&self) -> Result<Option<Entry<TypeConfig>>, AnyError> {
        let tx = self.db.begin_read().map_err(|e| AnyError::new(&e))?;
        let t = tx.open_table(LOG).map_err(|e| AnyError::new(&e))?;
        let last = t.last().map_err(|e| AnyError::new(&e))?;
        let entry = match last {
            None => None,
            Some((_, v)) => Some(serde_json::from_slice(v.value()).map_err(|e| AnyError::new(&e))?),
        };
        Ok(entry)
    }

    /// Delete every entry whose index is in `range`.
    fn delete<RB: RangeBounds<u64>>(&self, range: RB) -> Result<(), AnyError> {
        self.db.write("a deletion of log entries", |tx| {
            tx.open_table(LOG)?.retain_in(range, |_, _| false)?;
            Ok(())
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        self.read_range(range)
            .map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let purged: Option<LogId<NodeId>> =
            read_meta(&self.db, PURGED).map_err(StorageIOError::read_logs)?;
        let last = self
            .last_entry()
            .map_err(StorageIOError::read_logs)?
            .map(|e| e.log_id)
            .or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        write_meta(&self.db, "the vote", VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        read_meta(&self.db, VOTE).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        write_meta(&self.db, "the committed index", COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        let c: Option<Option<LogId<NodeId>>> =
            read_meta(&self.db, COMMITTED).map_err(StorageIOError::read)?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let res = (|| -> Result<(), AnyError> {
            let mut encoded = vec![];
            for e in entries {
                encoded.push((e.log_id.index, encode(&e).map_err(|e| AnyError::new(&e))?));
            }
            self.db.write("log entries", |tx| {
                let mut t = tx.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    t.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
        })();
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        self.delete(log_id.index..)
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        write_meta(&self.db, "the purged index", PURGED, &log_id)
            .map_err(StorageIOError::write_logs)?;
        self.delete(..=log_id.index)
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// What the state machine holds; also the snapshot's content.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
    pub state: ClusterState,
}

/// The first release's stored snapshot (data as a JSON array of numbers).
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// The state machine as openraft drives it. `data()` gives readers (the control API) a handle.
pub struct StateMachineStore {
    db: Arc<Db>,
    data: Arc<RwLock<SmData>>,
    sink: Arc<dyn PolicySink>,
    /// Makes snapshot ids unique within this process (shared with the snapshot builders).
    snapshot_seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &self.data.read().last_applied)
            .finish()
    }
}

impl StateMachineStore {
    /// A read handle on the applied state (cheap to clone).
    pub fn data(&self) -> Arc<RwLock<SmData>> {
        self.data.clone()
    }

    // The error type is openraft's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    fn snapshot_of(&self) -> Result<Snapshot<TypeConfig>, SError> {
        let (bytes, meta) = {
            let d = self.data.read();
            let bytes = encode_snapshot(&d).map_err(|e| StorageIOError::read_state_machine(&e))?;
            let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let id = match d.last_applied {
                Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
                None => format!("0-0-{seq}"),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.membership.clone(),
                snapshot_id: id,
            };
            (bytes, meta)
        };
        write_snapshot(&self.db, &meta, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        self.snapshot_of()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), SError> {
        let d = self.data.read();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = vec![];
        let (changed, current, ha) = {
            let mut d = self.data.write();
            let before = d.state.version();
            let ha_before = d.state.ha.clone();
            for e in entries {
                d.last_applied = Some(e.log_id);
                out.push(match e.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Normal(req) => d.state.apply(&req),
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(e.log_id), m);
                        Response::Done
                    }
                });
            }
            let ha = (d.state.ha != ha_before).then(|| d.state.ha.clone());
            (d.state.version() != before, d.state.current().cloned(), ha)
        };
        if let Some(ha) = ha {
            self.sink.ha(&ha);
        }
        // One compile per batch, outside the lock, with the newest version only.
        if let (true, Some(p)) = (changed, current) {
            enforce_off_runtime(&self.sink, p).await;
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachineStore {
            db: self.db.clone(),
            data: self.data.clone(),
            sink: self.sink.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let bytes = snapshot.into_inner();
        // A snapshot from the leader that does not decode is refused; the state stays as it was.
        let new = decode_snapshot(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        write_snapshot(&self.db, meta, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        let current = new.state.current().cloned();
        self.sink.ha(&new.state.ha);
        *self.data.write() = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: new.state,
        };
        if let Some(p) = current {
            enforce_off_runtime(&self.sink, p).await;
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        let s = read_snapshot(&self.db).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(s.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, RaftLogReader};

    use super::*;
    use crate::raft::{PolicyRecord, Request};

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// A fresh directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let d = std::env::temp_dir().join(format!(
                "keepstate-store-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&d);
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Records what the store asked to enforce.
    #[derive(Default)]
    struct Recorder(parking_lot::Mutex<Vec<u64>>);

    impl PolicySink for Recorder {
        fn enforce(&self, p: &PolicyRecord) {
            self.0.lock().push(p.version);
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, Dir> for Builder {
        async fn build(&self) -> Result<(Dir, LogStore, StateMachineStore), SError> {
            let dir = Dir::new();
            let (log, sm) = open(&dir.0, Arc::new(Recorder::default()))
                .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log stores and state machines.
    #[test]
    fn passes_the_openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    fn entry(index: u64, req: Option<Request>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: req.map_or(EntryPayload::Blank, EntryPayload::Normal),
        }
    }

    fn set(text: &str) -> Request {
        Request::SetPolicy {
            text: text.into(),
            author: "t".into(),
            comment: String::new(),
            proposed_at_unix_ms: 0,
        }
    }

    /// A store with a log of three entries (two policies), a vote and a snapshot, closed;
    /// returns its directory.
    async fn written_store() -> Dir {
        let dir = Dir::new();
        let (mut log, mut sm) = open(&dir.0, Arc::new(Recorder::default())).unwrap();
        let entries = vec![
            entry(1, None),
            entry(2, Some(set("a"))),
            entry(3, Some(set("b"))),
        ];
        let tx = log.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(LOG).unwrap();
            for e in &entries {
                t.insert(e.log_id.index, encode(e).unwrap().as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        log.save_vote(&Vote::new(3, 2)).await.unwrap();
        let out = sm.apply(entries).await.unwrap();
        assert!(matches!(out[2], Response::Policy { version: 2, .. }));
        sm.build_snapshot().await.unwrap();
        dir
    }

    #[tokio::test]
    async fn a_reopened_store_has_its_log_vote_and_snapshot_and_enforces_the_policy_at_once() {
        let dir = written_store().await;
        let rec = Arc::new(Recorder::default());
        let (mut log, mut sm) = open(&dir.0, rec.clone()).unwrap();
        // The snapshot's policy is enforced before Raft even starts.
        assert_eq!(*rec.0.lock(), vec![2]);
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let got = log.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].log_id.index, 3);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        assert_eq!(sm.data().read().state.version(), 2);
    }

    /// Every way of damaging the file: the node refuses to start with an error naming the
    /// file, never with an empty store (a member that forgot its vote and log could vote twice
    /// in one term, or lose what a quorum acknowledged).
    #[tokio::test]
    async fn a_damaged_store_is_refused_with_its_path_never_opened_empty() {
        type Damage = fn(&mut Vec<u8>);
        let damages: [(&str, Damage); 4] = [
            ("truncated to half", |b| b.truncate(b.len() / 2)),
            ("truncated to nothing", |b| b.clear()),
            ("header overwritten", |b| b[..64].fill(0xa5)),
            ("every page's tail flipped", |b| {
                for page in b.chunks_mut(4096) {
                    let n = page.len();
                    for x in &mut page[n.saturating_sub(64)..] {
                        *x ^= 0xff;
                    }
                }
            }),
        ];
        for (what, damage) in damages {
            let dir = written_store().await;
            let path = dir.0.join("raft.redb");
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let rec = Arc::new(Recorder::default());
            match open(&dir.0, rec.clone()) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("raft.redb"), "{what}: {msg}");
                    eprintln!("{what}: refused: {msg}");
                }
                Ok((mut log, _)) => {
                    // Opened: then nothing may be missing.
                    assert_eq!(
                        log.read_vote().await.unwrap(),
                        Some(Vote::new(3, 2)),
                        "{what}: opened without its vote"
                    );
                    assert_eq!(*rec.0.lock(), vec![2], "{what}: opened without its policy");
                    eprintln!("{what}: opened with everything");
                }
            }
        }
    }

    /// Every failed write names the file, the OS error and what to do; so does a directory
    /// that cannot be created.
    #[test]
    fn a_failed_write_names_the_file_the_os_error_and_what_to_do() {
        use std::io::Error as E;
        let path = "/var/lib/keepstate/raft.redb";
        let failed = |source| WriteError {
            what: "log entries",
            path: path.into(),
            source,
        };
        let cases = [
            (
                libc::ENOSPC,
                "No space left on device",
                "the file system is full",
            ),
            (libc::EDQUOT, "quota exceeded", "the file system is full"),
            (
                libc::EROFS,
                "Read-only file system",
                "remount it read-write",
            ),
            (
                libc::EIO,
                "Input/output error",
                "the disk or the file system failed",
            ),
        ];
        for (errno, os, what_to_do) in cases {
            let msg = failed(redb::Error::Io(E::from_raw_os_error(errno))).to_string();
            assert!(
                msg.starts_with(&format!(
                    "writing log entries to the Raft store {path}: I/O error: "
                )),
                "{msg}"
            );
            assert!(msg.contains(os), "{errno}: {msg}");
            assert!(msg.contains(what_to_do), "{errno}: {msg}");
        }
        // Nothing specific to say: no advice.
        let msg = failed(redb::Error::Io(E::from_raw_os_error(libc::EBADF))).to_string();
        assert!(!msg.contains("start fwnode"), "{msg}");
        // redb refuses every write after a failed one until the file is reopened.
        let msg = failed(redb::Error::PreviousIo).to_string();
        assert!(
            msg.contains("an earlier write to this file failed"),
            "{msg}"
        );
        let msg = OpenError::Dir {
            path: "/var/lib/keepstate".into(),
            source: E::from_raw_os_error(libc::EROFS),
        }
        .to_string();
        assert!(
            msg.starts_with("creating /var/lib/keepstate: Read-only file system"),
            "{msg}"
        );
        assert!(msg.contains("remount it read-write"), "{msg}");
    }

    /// A crash while a new store was being made leaves `raft.redb.new` and no `raft.redb`:
    /// the next start makes the store again.
    #[test]
    fn a_store_whose_creation_was_cut_short_is_made_again() {
        let dir = Dir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join("raft.redb.new"), b"half a store").unwrap();
        open(&dir.0, Arc::new(Recorder::default())).unwrap();
        assert!(dir.0.join("raft.redb").exists());
        assert!(!dir.0.join("raft.redb.new").exists());
    }

    #[tokio::test]
    async fn snapshot_data_is_binary_and_a_first_release_store_still_opens() {
        let text = "x = \"y\"\n".repeat(10_000);
        let dir = Dir::new();
        {
            let (_log, mut sm) = open(&dir.0, Arc::new(Recorder::default())).unwrap();
            sm.apply(vec![entry(1, Some(set(&text))), entry(2, Some(set("b")))])
                .await
                .unwrap();
            let snap = sm.build_snapshot().await.unwrap();
            let bytes = snap.snapshot.into_inner();
            assert_eq!(bytes[0], SNAPSHOT_FORMAT);
            // The texts plus a little framing: no JSON escaping, no numbers per byte.
            assert!(bytes.len() < text.len() + 1024, "{}", bytes.len());
            assert_eq!(decode_snapshot(&bytes).unwrap().state.version(), 2);
            let got = sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(got.snapshot.into_inner(), bytes);
        }
        // A store written by the first release: one JSON record, data as JSON.
        let old = Dir::new();
        {
            let (_log, sm) = open(&old.0, Arc::new(Recorder::default())).unwrap();
            let mut d = SmData::default();
            d.state.apply(&set("old"));
            d.last_applied = Some(LogId::new(CommittedLeaderId::new(1, 1), 4));
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: StoredMembership::default(),
                snapshot_id: "1-1-4-0".into(),
            };
            let legacy = StoredSnapshot {
                meta,
                data: serde_json::to_vec(&d).unwrap(),
            };
            write_meta(&sm.db, "the legacy snapshot", SNAPSHOT_LEGACY, &legacy).unwrap();
        }
        let rec = Arc::new(Recorder::default());
        let (_log, mut sm) = open(&old.0, rec.clone()).unwrap();
        assert_eq!(*rec.0.lock(), vec![1]);
        let got = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(got.meta.snapshot_id, "1-1-4-0");
        // The next snapshot replaces the old record.
        sm.build_snapshot().await.unwrap();
        let tx = sm.db.begin_read().unwrap();
        let t = tx.open_table(META).unwrap();
        assert!(t.get(SNAPSHOT_LEGACY).unwrap().is_none());
        assert_eq!(
            t.get(SNAPSHOT_DATA).unwrap().unwrap().value()[0],
            SNAPSHOT_FORMAT
        );
    }

    /// Who authorised each version travels after the state in snapshot data: today's decoder
    /// restores it, and the previous release's decoder (`postcard::from_bytes` of the state
    /// after the format byte, which stops at the state's end) still reads the same state.
    #[test]
    fn who_authorised_a_version_is_in_the_snapshot_and_the_previous_release_still_reads_it() {
        let mut d = SmData::default();
        d.state.apply(&set("a"));
        d.state.apply(&Request::Authorised {
            by: "CN=alice (role admin)".into(),
            request: Box::new(set("b")),
        });
        let bytes = encode_snapshot(&d).unwrap();
        let back = decode_snapshot(&bytes).unwrap();
        assert_eq!(back.state, d.state);
        assert_eq!(
            back.state
                .policy(2)
                .and_then(|p| p.authorised_by.as_deref()),
            Some("CN=alice (role admin)")
        );
        let previous: SmData = postcard::from_bytes(&bytes[1..]).unwrap();
        let mut without = d.clone();
        for p in &mut without.state.policies {
            p.authorised_by = None;
        }
        assert_eq!(previous.state, without.state);
        // Nothing to add: no trailer, the bytes the previous release wrote.
        assert_eq!(
            encode_snapshot(&without).unwrap(),
            postcard::to_extend(&without, vec![SNAPSHOT_FORMAT]).unwrap()
        );
        // A damaged trailer (its last byte, in the identity's text, no longer UTF-8) is
        // refused like damaged state.
        let mut bad = bytes.clone();
        if let Some(b) = bad.last_mut() {
            *b = 0xff;
        }
        assert!(decode_snapshot(&bad).is_err());
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_decode_is_refused_and_changes_nothing() {
        let dir = Dir::new();
        let rec = Arc::new(Recorder::default());
        let (_log, mut sm) = open(&dir.0, rec.clone()).unwrap();
        sm.apply(vec![entry(1, Some(set("a")))]).await.unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 9)),
            last_membership: StoredMembership::default(),
            snapshot_id: "bad".into(),
        };
        for junk in [
            &b"{not json"[..],
            &[SNAPSHOT_FORMAT, 0xff, 0xff][..],
            &[9, 0][..],
            &[],
        ] {
            let r = sm
                .install_snapshot(&meta, Box::new(Cursor::new(junk.to_vec())))
                .await;
            assert!(r.is_err(), "{junk:?}");
        }
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        assert_eq!(sm.data().read().state.version(), 1);
        assert_eq!(
            sm.applied_state().await.unwrap().0.map(|l| l.index),
            Some(1)
        );
        assert_eq!(*rec.0.lock(), vec![1]);
    }
}
