//! openraft's RPCs over tonic: the client side (`Network`, one lazily connected channel per
//! peer) and the server side (`RaftService`, the `keepstate.v1.Raft` gRPC service).
//!
//! openraft's request and response types are serde types; each RPC carries one serialized in a
//! `RaftPayload` whose `encoding` says how: postcard (compact binary; snapshot chunks travel as
//! raw bytes) is what members send, JSON (the first release's format) is still accepted and
//! answered in kind. Mirroring openraft's types field by field in protobuf would be a large
//! second definition to keep in step with openraft for no gain: the protobuf envelope is what we
//! version. A payload in an unknown encoding, or one that does not decode, is refused with
//! INVALID_ARGUMENT and touches nothing.
//!
//! Also owns how replication stays below the message limit
//! ([`keepstate_proto::MAX_MESSAGE_BYTES`], set on both ends) and within openraft's deadline: a
//! log batch over [`APPEND_BATCH_BYTES`] is refused locally with `PayloadTooLarge` naming how
//! many entries fit,
//! and a batch the peer or tonic refuses as too large (OUT_OF_RANGE / RESOURCE_EXHAUSTED) is
//! reported the same way, so openraft retries with a smaller batch instead of the same one
//! forever. Snapshots go in chunks of [`SNAPSHOT_CHUNK_BYTES`].
//!
//! Every answer names the newest Raft command this node applies ([`LEVEL_HEADER`]); the client
//! side records what each peer said ([`PeerLevels`]), which is how a leader knows whether every
//! member can decode a command a previous release lacks.
//!
//! Must not decide anything: it only moves messages between openraft instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepstate_proto::v1::raft_client::RaftClient;
use keepstate_proto::v1::{raft_server, RaftEncoding, RaftPayload};
use keepstate_proto::{MAX_MESSAGE_BYTES, MAX_NOTE_BYTES, MAX_POLICY_BYTES};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Entry;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::state::COMMAND_LEVEL;
use super::{Member, NodeId, Raft, TypeConfig};
use crate::tls::{self, Members};
use crate::transport::Transport;

/// A log batch whose entries add up to more than this is split before it is sent (a single
/// entry is always sent). openraft gives an AppendEntries call one heartbeat interval, and a
/// batch that does not reach the follower within it is sent again, unchanged: so no batch is
/// larger than the largest single entry, and the one requirement on the management network is
/// that the largest policy (plus the follower's fsync) fits one heartbeat interval (2 MiB in
/// 100 ms needs ~200 Mbit/s).
pub const APPEND_BATCH_BYTES: usize = MAX_ENTRY_BYTES;

/// Snapshot data per InstallSnapshot call (openraft's `snapshot_max_chunk_size`).
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// The largest encoded log entry the control API can create: a policy of the largest accepted
/// size with author and comment of the largest accepted size, plus the entry's own fields.
pub const MAX_ENTRY_BYTES: usize = MAX_POLICY_BYTES + 2 * MAX_NOTE_BYTES + 1024;

/// openraft's `max_payload_entries`: even a batch of entries of the largest size fits one
/// message (the byte budget above usually splits it earlier).
pub const MAX_PAYLOAD_ENTRIES: u64 = (MAX_MESSAGE_BYTES / MAX_ENTRY_BYTES) as u64;

// A snapshot chunk plus its metadata, and one entry of the largest size, each fit one message.
const _: () = assert!(SNAPSHOT_CHUNK_BYTES + 64 * 1024 < MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_PAYLOAD_ENTRIES >= 1);

/// Why a payload could not be (de)serialized.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown Raft payload encoding {0} (this member reads 0 = JSON and 1 = postcard)")]
    UnknownEncoding(i32),
    #[error("undecodable Raft payload ({encoding:?}): {message}")]
    Decode { encoding: Encoding, message: String },
    #[error("encoding a Raft payload ({encoding:?}): {message}")]
    Encode { encoding: Encoding, message: String },
}

/// How a payload is serialized: the envelope's `encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Postcard,
}

impl Encoding {
    /// What this member sends.
    pub const SEND: Encoding = Encoding::Postcard;

    pub fn of(p: &RaftPayload) -> Result<Encoding, CodecError> {
        match RaftEncoding::try_from(p.encoding) {
            Ok(RaftEncoding::Json) => Ok(Encoding::Json),
            Ok(RaftEncoding::Postcard) => Ok(Encoding::Postcard),
            Err(_) => Err(CodecError::UnknownEncoding(p.encoding)),
        }
    }

    fn wire(self) -> i32 {
        match self {
            Encoding::Json => RaftEncoding::Json as i32,
            Encoding::Postcard => RaftEncoding::Postcard as i32,
        }
    }

    pub fn encode<T: Serialize>(self, v: &T) -> Result<RaftPayload, CodecError> {
        let payload = match self {
            Encoding::Json => serde_json::to_vec(v).map_err(|e| e.to_string()),
            Encoding::Postcard => postcard::to_stdvec(v).map_err(|e| e.to_string()),
        }
        .map_err(|message| CodecError::Encode {
            encoding: self,
            message,
        })?;
        Ok(RaftPayload {
            payload,
            encoding: self.wire(),
        })
    }

    pub fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, CodecError> {
        let encoding = Encoding::of(p)?;
        match encoding {
            Encoding::Json => serde_json::from_slice(&p.payload).map_err(|e| e.to_string()),
            Encoding::Postcard => postcard::from_bytes(&p.payload).map_err(|e| e.to_string()),
        }
        .map_err(|message| CodecError::Decode { encoding, message })
    }
}

/// The response header in which a Raft peer names the newest command it applies
/// ([`COMMAND_LEVEL`]); a peer of a release before it sends none (level 1).
pub const LEVEL_HEADER: &str = "x-keepstate-raft-command-level";

/// What this node last heard from each Raft peer about the commands it applies, and when:
/// recorded from every Raft response (a leader hears from each member every heartbeat), read by
/// the leader before it proposes a command an older member could not decode.
#[derive(Clone, Debug, Default)]
pub struct PeerLevels(Arc<parking_lot::Mutex<HashMap<NodeId, (u32, Instant)>>>);

impl PeerLevels {
    pub fn record(&self, peer: NodeId, level: u32, now: Instant) {
        self.0.lock().insert(peer, (level, now));
    }

    /// Did every one of `peers` answer within `fresh` before `now`, naming at least `level`?
    /// A peer not heard from lately may be down or restarting with another release: no.
    pub fn all_at_least(
        &self,
        peers: impl IntoIterator<Item = NodeId>,
        level: u32,
        fresh: Duration,
        now: Instant,
    ) -> bool {
        let heard = self.0.lock();
        peers.into_iter().all(|p| {
            heard
                .get(&p)
                .is_some_and(|&(l, at)| l >= level && now.saturating_duration_since(at) <= fresh)
        })
    }
}

/// Creates a client per peer.
#[derive(Clone, Debug)]
pub struct Network {
    pub transport: Transport,
    pub levels: PeerLevels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        // The peer must prove it is `target` (its certificate names node-<target>).
        let client = self
            .transport
            .channel_lazy(&node.addr, Some(target))
            .map(|ch| {
                RaftClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            });
        if let Err(e) = &client {
            tracing::error!(target, error = %e, "cannot reach Raft member");
        }
        PeerClient {
            target,
            client: client.map_err(|e| e.to_string()),
            levels: self.levels.clone(),
        }
    }
}

/// The channel to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
    levels: PeerLevels,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn unreachable<E: std::error::Error>(e: impl std::fmt::Display) -> RPCError<NodeId, Member, E> {
    RPCError::Unreachable(Unreachable::new(&Msg(e.to_string())))
}

fn network<E: std::error::Error>(e: impl std::fmt::Display) -> RPCError<NodeId, Member, E> {
    RPCError::Network(NetworkError::new(&Msg(e.to_string())))
}

/// Does this status say the message was over a size limit (tonic says OUT_OF_RANGE, other
/// gRPC implementations RESOURCE_EXHAUSTED)? Not when the peer's gate throttled the call
/// (`gate::THROTTLED`): a smaller batch would be refused just the same.
fn is_too_large(s: &Status) -> bool {
    matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)
        && !s.metadata().contains_key(crate::transport::gate::THROTTLED)
}

/// A failed AppendEntries call of `entries` entries, as openraft should see it. A batch that
/// was too large becomes `PayloadTooLarge` with half the entries as the hint, so openraft
/// retries with a smaller batch. A single entry cannot be split: retrying it at once would
/// spin, so it is a network error (openraft retries it on its next heartbeat, and it is
/// logged).
fn append_error<E: std::error::Error>(s: Status, entries: usize) -> RPCError<NodeId, Member, E> {
    if is_too_large(&s) && entries > 1 {
        let hint = (entries / 2).max(1) as u64;
        return RPCError::PayloadTooLarge(
            PayloadTooLarge::new_entries_hint(hint).with_source_error(&Msg(format!(
                "{} entries: {}",
                entries,
                s.message()
            ))),
        );
    }
    status_error(s)
}

/// A failed call as openraft should see it: a peer that is down or slow is unreachable
/// (openraft backs off, sending nothing for 500 ms), anything else a network error (a
/// throttled call among them: openraft sends again with its next heartbeat or write, and
/// keeps heartbeating).
fn status_error<E: std::error::Error>(s: Status) -> RPCError<NodeId, Member, E> {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded => unreachable(s.message()),
        _ => network(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// If the entries add up to more than `budget` bytes, how many leading entries to send instead
/// (at least one). `None`: send them all.
fn batch_hint(entries: &[Entry<TypeConfig>], budget: usize) -> Option<u64> {
    if entries.len() < 2 {
        return None;
    }
    let mut total = 0usize;
    for (i, e) in entries.iter().enumerate() {
        // Unencodable entries are reported by the real encode that follows.
        let size =
            postcard::serialize_with_flavor(e, postcard::ser_flavors::Size::default()).unwrap_or(0);
        total = total.saturating_add(size);
        if total > budget {
            return Some(i.max(1) as u64);
        }
    }
    None
}

impl PeerClient {
    /// One round trip: encode, call, decode `Result<Resp, E>` as the peer's openraft answered.
    /// `failed` maps a failed call (including a refused, too large message) to openraft's error.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        failed: impl FnOnce(Status) -> RPCError<NodeId, Member, E>,
        f: F,
    ) -> Result<Resp, RPCError<NodeId, Member, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, Status>>,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(unreachable(e)),
        };
        let payload = Encoding::SEND.encode(req).map_err(network)?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = f(client, request).await.map_err(failed)?;
        let level = reply
            .metadata()
            .get(LEVEL_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1);
        self.levels.record(self.target, level, Instant::now());
        let reply = reply.into_inner();
        let res: Result<Resp, E> = Encoding::decode(&reply).map_err(network)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let n = rpc.entries.len();
        if let Some(hint) = batch_hint(&rpc.entries, APPEND_BATCH_BYTES) {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint).with_source_error(&Msg(format!(
                    "{n} entries exceed the {APPEND_BATCH_BYTES}-byte batch budget"
                ))),
            ));
        }
        self.call(
            &rpc,
            &option,
            |s| append_error(s, n),
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, status_error, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(&rpc, &option, status_error, |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }
}

/// The `keepstate.v1.Raft` service: hands decoded RPCs to the local openraft instance, from
/// callers whose certificate names a current member (any node of the CA while this node knows
/// no membership yet: the leader adding it) and the node the RPC says it comes from.
#[derive(Clone)]
pub struct RaftService {
    pub raft: Raft,
    pub members: Members,
}

impl RaftService {
    /// The certified caller, checked against the node id the RPC claims to come from.
    fn admit<T>(&self, req: &tonic::Request<T>) -> Result<Option<NodeId>, Status> {
        tls::require_member(req, &self.members, true)
    }
}

/// A certified caller must be the node the RPC names (a leader or a candidate).
fn same_node(cert: Option<NodeId>, claimed: Option<NodeId>) -> Result<(), Status> {
    match (cert, claimed) {
        (Some(c), Some(r)) if c != r => Err(Status::permission_denied(format!(
            "node {c} sent an RPC in the name of node {r}"
        ))),
        _ => Ok(()),
    }
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftService")
    }
}

/// The request's content and the encoding to answer in.
fn decode<T: DeserializeOwned>(req: tonic::Request<RaftPayload>) -> Result<(T, Encoding), Status> {
    let p = req.into_inner();
    let bad = |e: CodecError| Status::invalid_argument(e.to_string());
    let enc = Encoding::of(&p).map_err(bad)?;
    Ok((Encoding::decode(&p).map_err(bad)?, enc))
}

/// The answer in `enc`, naming this node's [`COMMAND_LEVEL`] ([`LEVEL_HEADER`]).
fn encode<T: Serialize>(enc: Encoding, v: &T) -> Result<tonic::Response<RaftPayload>, Status> {
    let mut r = enc
        .encode(v)
        .map(tonic::Response::new)
        .map_err(|e| Status::internal(e.to_string()))?;
    r.metadata_mut().insert(
        LEVEL_HEADER,
        tonic::metadata::MetadataValue::from(COMMAND_LEVEL),
    );
    Ok(r)
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let who = self.admit(&request)?;
        let (rpc, enc): (AppendEntriesRequest<TypeConfig>, _) = decode(request)?;
        same_node(who, rpc.vote.leader_id().voted_for())?;
        encode(enc, &self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let who = self.admit(&request)?;
        let (rpc, enc): (VoteRequest<NodeId>, _) = decode(request)?;
        same_node(who, rpc.vote.leader_id().voted_for())?;
        encode(enc, &self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let who = self.admit(&request)?;
        let (rpc, enc): (InstallSnapshotRequest<TypeConfig>, _) = decode(request)?;
        same_node(who, rpc.vote.leader_id().voted_for())?;
        encode(enc, &self.raft.install_snapshot(rpc).await)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId, SnapshotMeta, Vote};

    use super::*;

    /// The leader may propose a newer command only when every peer said it applies it and was
    /// heard from lately: a peer that is silent, stale, or of an older release says no.
    #[test]
    fn peer_levels_say_yes_only_for_fresh_answers_at_the_level() {
        let levels = PeerLevels::default();
        let t0 = Instant::now();
        let fresh = Duration::from_secs(1);
        let ask = |peers: &[NodeId], at: Instant| levels.all_at_least(peers.to_vec(), 2, fresh, at);
        assert!(ask(&[], t0), "no other member: nobody to wait for");
        assert!(!ask(&[2], t0), "never heard from");
        levels.record(2, 2, t0);
        levels.record(3, 1, t0);
        assert!(ask(&[2], t0));
        assert!(!ask(&[2, 3], t0), "node 3 runs an older release");
        levels.record(3, 2, t0 + Duration::from_millis(500));
        assert!(ask(&[2, 3], t0 + Duration::from_millis(900)));
        assert!(
            !ask(&[2, 3], t0 + Duration::from_millis(1200)),
            "node 2 not heard from for 1.2 s"
        );
        // Back with an older release: its first answer says so.
        levels.record(2, 1, t0 + Duration::from_millis(1300));
        assert!(!ask(&[2, 3], t0 + Duration::from_millis(1300)));
    }
    use crate::raft::Request;

    fn payload(bytes: &[u8], encoding: i32) -> tonic::Request<RaftPayload> {
        tonic::Request::new(RaftPayload {
            payload: bytes.to_vec(),
            encoding,
        })
    }

    #[test]
    fn an_undecodable_payload_is_refused_as_invalid_argument() {
        let code = |r| decode::<VoteRequest<NodeId>>(r).err().map(|s| s.code());
        // Truncated JSON, truncated postcard, an encoding from the future.
        assert_eq!(
            code(payload(b"{\"vote\": 1", 0)),
            Some(Code::InvalidArgument)
        );
        assert_eq!(code(payload(&[1], 1)), Some(Code::InvalidArgument));
        let good = Encoding::Postcard
            .encode(&VoteRequest::new(Vote::new(2, 1), None::<LogId<NodeId>>))
            .unwrap();
        let unknown = decode::<VoteRequest<NodeId>>(payload(&good.payload, 7)).unwrap_err();
        assert_eq!(unknown.code(), Code::InvalidArgument);
        assert!(unknown
            .message()
            .contains("unknown Raft payload encoding 7"));
        // The same bytes with the right encoding decode.
        assert!(decode::<VoteRequest<NodeId>>(payload(&good.payload, 1)).is_ok());
    }

    fn big_entry(index: u64, text_len: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request::SetPolicy {
                text: "x".repeat(text_len),
                author: "a".into(),
                comment: String::new(),
                proposed_at_unix_ms: 0,
            }),
        }
    }

    #[test]
    fn payloads_round_trip_in_both_encodings_and_snapshot_bytes_stay_raw() {
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
                last_membership: Default::default(),
                snapshot_id: "s".into(),
            },
            offset: 0,
            data: data.clone(),
            done: true,
        };
        for enc in [Encoding::Json, Encoding::Postcard] {
            let p = enc.encode(&req).unwrap();
            let back: InstallSnapshotRequest<TypeConfig> = Encoding::decode(&p).unwrap();
            assert_eq!(back.data, data);
            if enc == Encoding::Postcard {
                // The bytes plus a little framing, not a number per byte.
                assert!(p.payload.len() < data.len() + 200, "{}", p.payload.len());
            }
        }
        let ae = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(3, 1),
            prev_log_id: None,
            entries: vec![big_entry(1, 10)],
            leader_commit: None,
        };
        let back: AppendEntriesRequest<TypeConfig> =
            Encoding::decode(&Encoding::Postcard.encode(&ae).unwrap()).unwrap();
        assert_eq!(back.entries, ae.entries);
        // A reply carrying openraft's errors decodes too.
        let r: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Err(RaftError::Fatal(openraft::error::Fatal::Panicked));
        let back: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Encoding::decode(&Encoding::Postcard.encode(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_too_large_status_becomes_payload_too_large_for_a_batch() {
        type E = RPCError<NodeId, Member, RaftError<NodeId>>;
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 40000000 bytes, the limit is: 33554432 bytes",
        );
        match append_error::<RaftError<NodeId>>(too_large.clone(), 8) {
            RPCError::PayloadTooLarge(p) => assert_eq!(p.entries_hint(), 4),
            e => panic!("expected PayloadTooLarge, got {e}"),
        }
        let exhausted = Status::resource_exhausted("message too large");
        assert!(matches!(
            append_error::<RaftError<NodeId>>(exhausted, 3),
            RPCError::PayloadTooLarge(p) if p.entries_hint() == 1
        ));
        // One entry cannot be split: not a retry-at-once error.
        let single: E = append_error(too_large, 1);
        assert!(matches!(single, RPCError::Network(_)), "{single}");
        // Other failures keep their meaning.
        let down: E = append_error(Status::unavailable("connection refused"), 8);
        assert!(matches!(down, RPCError::Unreachable(_)), "{down}");
        let other: E = append_error(Status::internal("boom"), 8);
        assert!(matches!(other, RPCError::Network(_)), "{other}");
        // A peer's throttling is not a size problem: halving the batch would not help.
        let mut throttled = Status::resource_exhausted("over its Raft rate");
        throttled.metadata_mut().insert(
            crate::transport::gate::THROTTLED,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let t: E = append_error(throttled, 8);
        assert!(matches!(t, RPCError::Network(_)), "{t}");
    }

    #[test]
    fn a_batch_over_the_byte_budget_is_split_before_it_is_sent() {
        let mb = 1024 * 1024;
        let entries: Vec<_> = (1..=5).map(|i| big_entry(i, mb)).collect();
        // Four 1 MiB entries do not fit 4 MiB with their framing: three do.
        assert_eq!(batch_hint(&entries, 4 * mb), Some(3));
        assert_eq!(batch_hint(&entries[..3], 4 * mb), None);
        // The budget: two such entries, as they fit one policy of the largest size.
        assert_eq!(batch_hint(&entries, APPEND_BATCH_BYTES), Some(2));
        let small: Vec<_> = (1..=15).map(|i| big_entry(i, 1000)).collect();
        assert_eq!(batch_hint(&small, APPEND_BATCH_BYTES), None);
        // A single entry is always sent, however large.
        let huge = vec![big_entry(1, 5 * mb), big_entry(2, 10)];
        assert_eq!(batch_hint(&huge, APPEND_BATCH_BYTES), Some(1));
        assert_eq!(batch_hint(&huge[..1], APPEND_BATCH_BYTES), None);
        assert_eq!(batch_hint(&[], APPEND_BATCH_BYTES), None);
    }

    #[test]
    fn the_largest_entry_fits_one_message() {
        let e = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(u64::MAX, u64::MAX), u64::MAX),
            payload: EntryPayload::Normal(Request::SetPolicy {
                text: "\u{10FFFF}".repeat(MAX_POLICY_BYTES / 4),
                author: "a".repeat(MAX_NOTE_BYTES),
                comment: "c".repeat(MAX_NOTE_BYTES),
                proposed_at_unix_ms: u64::MAX,
            }),
        };
        let ae = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(u64::MAX, u64::MAX),
            prev_log_id: Some(e.log_id),
            leader_commit: Some(e.log_id),
            entries: vec![e.clone()],
        };
        let one = Encoding::Postcard.encode(&ae).unwrap().payload.len();
        assert!(one <= MAX_ENTRY_BYTES, "{one} > {MAX_ENTRY_BYTES}");
        let full = AppendEntriesRequest::<TypeConfig> {
            entries: vec![e; MAX_PAYLOAD_ENTRIES as usize],
            ..ae
        };
        let all = Encoding::Postcard.encode(&full).unwrap().payload.len();
        // The protobuf envelope adds a tag and a length.
        assert!(all + 16 <= MAX_MESSAGE_BYTES, "{all}");
    }
}
