//! openraft's RPCs over tonic: the client side (`Network`, one lazily connected channel per
//! peer) and the server side (`RaftService`, the `keepstate.v1.Raft` gRPC service).
//!
//! openraft's request and response types are serde types; each RPC carries one JSON-encoded in a
//! `RaftPayload`. Mirroring them field by field in protobuf would be a large second definition to
//! keep in step with openraft for no gain: the protobuf envelope is what we version, and these
//! messages are small (policy texts, votes, heartbeats) and rare. A payload that does not
//! decode is refused with INVALID_ARGUMENT and touches nothing.
//!
//! Must not decide anything: it only moves messages between openraft instances.

use keepstate_proto::v1::raft_client::RaftClient;
use keepstate_proto::v1::raft_server;
use keepstate_proto::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{Member, NodeId, Raft, TypeConfig};
use crate::transport::Transport;

/// Creates a client per peer.
#[derive(Clone, Debug)]
pub struct Network {
    pub transport: Transport,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        let client = self
            .transport
            .endpoint(&node.addr)
            .map(|e| RaftClient::new(e.connect_lazy()));
        if let Err(e) = &client {
            tracing::error!(target, error = %e, "cannot reach Raft member");
        }
        PeerClient {
            target,
            client: client.map_err(|e| e.to_string()),
        }
    }
}

/// The channel to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn unreachable<E: std::error::Error>(e: impl std::fmt::Display) -> RPCError<NodeId, Member, E> {
    RPCError::Unreachable(Unreachable::new(&Msg(e.to_string())))
}

impl PeerClient {
    /// One round trip: encode, call, decode `Result<Resp, E>` as the peer's openraft answered.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
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
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { payload });
        request.set_timeout(option.hard_ttl());
        let reply = match f(client, request).await {
            Ok(r) => r.into_inner(),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                return Err(unreachable(s.message()))
            }
            Err(s) => return Err(RPCError::Network(NetworkError::new(&s))),
        };
        let res: Result<Resp, E> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
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
        self.call(&rpc, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }
}

/// The `keepstate.v1.Raft` service: hands decoded RPCs to the local openraft instance.
#[derive(Clone)]
pub struct RaftService {
    pub raft: Raft,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftService")
    }
}

fn decode<T: DeserializeOwned>(req: tonic::Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable Raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<tonic::Response<RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|payload| tonic::Response::new(RaftPayload { payload }))
        .map_err(|e| Status::internal(format!("encoding Raft reply: {e}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undecodable_payload_is_refused_as_invalid_argument() {
        let junk = tonic::Request::new(RaftPayload {
            payload: b"{\"vote\": 1".to_vec(),
        });
        let e = decode::<VoteRequest<NodeId>>(junk).err().map(|s| s.code());
        assert_eq!(e, Some(Code::InvalidArgument));
    }
}
