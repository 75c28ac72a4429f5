//! The connection to a node and what its errors mean to an operator.
//!
//! Owns the one place a channel is made (mTLS with the cluster CA through fwnode's
//! `transport`: fwctl verifies that the node's certificate is the CA's and names
//! `fwnode.keepstate`, and presents the operator's certificate), and the mapping of gRPC statuses to `CliError`s with exit codes and
//! advice, and the message-size limit fwctl shares with fwnode ([`MAX_MESSAGE_BYTES`]: tonic's
//! 4 MiB default cannot carry `ct list` of tens of thousands of entries). Must not format output.

use std::time::Duration;

use fwnode::tls::{Credentials, TlsFiles};
use fwnode::transport::{self, ConnectError, Transport};
use keepstate_proto::v1::control_client::ControlClient;
use keepstate_proto::MAX_MESSAGE_BYTES;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// An error that ends the command, with the exit code scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line asks for something fwctl will not do as given (e.g. `ct delete --all`
    /// without a terminal to confirm on and without `--yes`).
    #[error("{0}")]
    Usage(String),
    /// The request or policy is invalid, or refers to something that does not exist.
    #[error("{0}")]
    Rejected(String),
    /// The node, a leader or a quorum is unreachable (nothing was changed), or a write got no
    /// answer in time (it may still commit).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The caller may not do this (the local HA socket is root-only).
    #[error("{0}")]
    NotPermitted(String),
    /// The node refused the operator's certificate or its role.
    #[error("{0}")]
    PermissionDenied(String),
    /// A planned HA move (switchover, maintenance on) was refused: the peer could not carry
    /// every session now. Nothing changed.
    #[error("{0}")]
    HaRefused(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Rejected(_) => 3,
            CliError::Unavailable(_) => 4,
            CliError::Internal(_) => 5,
            CliError::NotPermitted(_) => 6,
            CliError::PermissionDenied(_) => 7,
            CliError::HaRefused(_) => 8,
        }
    }
}

/// How fwctl secures its channel.
#[derive(Clone, Debug)]
pub enum Security {
    /// `--plaintext`: for a node with `[tls] plaintext = true`.
    Plaintext,
    /// The cluster CA, and the operator's certificate and key.
    Mtls(TlsFiles),
}

/// Connect to `addr` (host:port), bounded by `timeout`.
pub async fn connect(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<ControlClient<Channel>, CliError> {
    let security = match security {
        Security::Plaintext => transport::Security::Plaintext,
        Security::Mtls(files) => {
            transport::Security::Mtls(Credentials::load(files.clone()).map_err(|e| {
                CliError::Rejected(format!(
                    "{e} — set --ca/--cert/--key (FWCTL_CA, FWCTL_CERT, FWCTL_KEY; `fwctl certs \
                     issue-operator` makes them), or --plaintext for a node without TLS"
                ))
            })?)
        }
    };
    let t = Transport {
        connect_timeout: timeout,
        request_timeout: timeout,
        ..Transport::new(security)
    };
    let ch = t.connect(addr, None).await.map_err(|e| match e {
        ConnectError::Addr(e) => {
            CliError::Rejected(format!("--node {addr:?} is not host:port: {e}"))
        }
        ConnectError::Connect { message, .. } => CliError::Unavailable(format!(
            "cannot reach fwnode at {addr}: {message} — is fwnode running with a [cluster] listen \
             address there? set --node or FWCTL_NODE"
        )),
    })?;
    Ok(control_client(ch))
}

/// After a call failed as if the connection broke: did the node refuse our certificate? Then
/// say so (exit 7) instead of "unreachable".
pub async fn explain(addr: &str, timeout: Duration, security: &Security, e: CliError) -> CliError {
    let files = match (security, &e) {
        (Security::Mtls(f), CliError::Unavailable(_) | CliError::Internal(_)) => f,
        // A plaintext HTTP/2 preface at a TLS listener: the connection just closes.
        (Security::Plaintext, CliError::Unavailable(m) | CliError::Internal(m)) => {
            return CliError::Unavailable(format!(
                "{m} (--plaintext: a node with [tls] certificates accepts only mTLS)"
            ))
        }
        _ => return e,
    };
    let Ok(creds) = Credentials::load(files.clone()) else {
        return e;
    };
    let t = Transport {
        connect_timeout: timeout,
        ..Transport::new(transport::Security::Mtls(creds))
    };
    match t.probe(addr, None, Duration::from_secs(1)).await {
        // rustls' own verdict on the node's certificate (ours was never looked at).
        Err(why) if why.contains("invalid peer certificate") => {
            CliError::PermissionDenied(format!(
            "{addr}: the node's certificate is not trusted ({why}); is --ca the cluster CA, and \
             does the node present a certificate of it?"
        ))
        }
        Err(why) if why.contains("corrupt message") => match e {
            CliError::Unavailable(m) => CliError::Unavailable(format!(
                "{m} (the node does not speak TLS: if it runs with [tls] plaintext = true, use \
                 --plaintext)"
            )),
            other => other,
        },
        Err(why) if tls_refusal_text(&why) => CliError::PermissionDenied(format!(
            "{addr}: the node refused this client's certificate ({why}); is it signed by the \
             cluster CA, and is it an operator's or a member's (--ca, --cert, --key)?"
        )),
        _ => e,
    }
}

fn tls_refusal_text(t: &str) -> bool {
    let t = t.to_ascii_lowercase();
    t.contains("certificate") || t.contains("alert") || t.contains("unknownca")
}

/// A control client on `ch` with the limits every keepstate end uses.
pub fn control_client(ch: Channel) -> ControlClient<Channel> {
    ControlClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Map a failed call to an error that says what to do.
pub fn status_error(addr: &str, s: Status) -> CliError {
    let msg = s.message().to_string();
    match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange => CliError::Rejected(msg),
        // The node says why itself (it is reachable).
        Code::Unavailable
            if msg.contains("no quorum")
                || msg.contains("no Raft leader")
                || msg.contains("Raft stopped on this node") =>
        {
            CliError::Unavailable(format!("{addr}: {msg}"))
        }
        // A node that refuses our certificate ends the TLS session with an alert, which the
        // first call sees as a broken connection.
        Code::Unavailable | Code::Unknown if tls_refusal(&s) => {
            CliError::PermissionDenied(format!(
                "{addr}: the node refused this client's certificate ({msg}); is it signed by \
                 the cluster CA (--ca, --cert, --key)?"
            ))
        }
        Code::Unavailable => CliError::Unavailable(format!(
            "{addr}: {msg} (the node or the cluster leader is unreachable; nothing was changed)"
        )),
        Code::PermissionDenied | Code::Unauthenticated => {
            CliError::PermissionDenied(format!("{addr}: permission denied: {msg}"))
        }
        Code::DeadlineExceeded | Code::Cancelled => CliError::Unavailable(format!(
            "{addr}: {msg} (no answer in time: the cluster may have lost its quorum; a write may \
             still commit: check `fwctl policy history`)"
        )),
        _ => CliError::Internal(format!("{addr}: {} ({:?})", msg, s.code())),
    }
}

/// Does a failed call's error chain end in a TLS alert about our certificate?
fn tls_refusal(s: &Status) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut text = s.message().to_string();
    while let Some(x) = e {
        text.push_str(&x.to_string());
        e = x.source();
    }
    tls_refusal_text(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes() {
        let code = |s: Status| status_error("n:1", s).exit_code();
        assert_eq!(code(Status::invalid_argument("p.toml:3:1: bad")), 3);
        assert_eq!(code(Status::not_found("no version 9")), 3);
        assert_eq!(code(Status::failed_precondition("not initialised")), 3);
        assert_eq!(code(Status::unavailable("no quorum: ...")), 4);
        let stopped = status_error("n:1", Status::unavailable("Raft stopped on this node: ..."));
        assert_eq!(stopped.exit_code(), 4);
        assert!(!stopped.to_string().contains("unreachable"), "{stopped}");
        assert_eq!(code(Status::deadline_exceeded("slow")), 4);
        assert_eq!(code(Status::internal("bug")), 5);
        assert_eq!(code(Status::permission_denied("needs admin")), 7);
    }

    use keepstate_proto::v1::{self, control_server};
    use tonic::{Request, Response};

    /// A node that only lists connections: `n` IPv6 entries.
    struct Lister(usize);

    /// The Control impl for `Lister`: `list_connections` as given, every other call refused.
    macro_rules! lister_impl {
        ($($name:ident($req:ident) -> $rep:ident;)* { $($body:tt)* }) => {
            #[tonic::async_trait]
            impl control_server::Control for Lister {
                $(
                    async fn $name(
                        &self,
                        _: Request<v1::$req>,
                    ) -> Result<Response<v1::$rep>, Status> {
                        Err(Status::unimplemented(stringify!($name)))
                    }
                )*
                $($body)*
            }
        };
    }

    lister_impl! {
        status(StatusRequest) -> StatusReply;
        get_policy(GetPolicyRequest) -> PolicyVersion;
        apply_policy(ApplyPolicyRequest) -> ApplyPolicyReply;
        rollback_policy(RollbackPolicyRequest) -> ApplyPolicyReply;
        policy_history(PolicyHistoryRequest) -> PolicyHistoryReply;
        cluster_init(ClusterInitRequest) -> MembersReply;
        cluster_members(MembersRequest) -> MembersReply;
        cluster_add(ClusterAddRequest) -> MembersReply;
        cluster_promote(ClusterPromoteRequest) -> MembersReply;
        cluster_remove(ClusterRemoveRequest) -> MembersReply;
        set_ha_settings(SetHaSettingsRequest) -> HaSettings;
        ha_move(HaMoveRequest) -> HaMoveReply;
        count_connections(CountConnectionsRequest) -> CountConnectionsReply;
        list_expectations(ListExpectationsRequest) -> ListExpectationsReply;
        delete_connections(DeleteConnectionsRequest) -> DeleteConnectionsReply;
        sync_status(SyncStatusRequest) -> SyncStatusReply;
        sync_resync(SyncResyncRequest) -> SyncStatusReply;
        stats(StatsRequest) -> StatsReply;
        {
        async fn list_connections(
            &self,
            _: Request<v1::ListConnectionsRequest>,
        ) -> Result<Response<v1::ListConnectionsReply>, Status> {
            let c = v1::Connection {
                protocol: 6,
                src: "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".into(),
                dst: "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe".into(),
                src_port: 65535,
                dst_port: 65535,
                state: "ESTABLISHED".into(),
                assured: true,
                seen_reply: true,
                related: true,
                from_peer: true,
                expires_in_ms: 432_000_000,
                helper: "ftp".into(),
            };
            Ok(Response::new(v1::ListConnectionsReply {
                connections: vec![c; self.0],
                truncated: false,
                next_page_token: 0,
            }))
        }
        }
    }

    /// `ct list` of 40 000 entries is ~5 MB: over tonic's 4 MiB default, under the shared limit.
    #[tokio::test]
    async fn a_large_connection_list_arrives() {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = Transport::new(transport::Security::Plaintext)
            .server()
            .add_service(
                control_server::ControlServer::new(Lister(40_000))
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(incoming);
        let task = tokio::spawn(server);
        let mut c = connect(
            &addr.to_string(),
            Duration::from_secs(5),
            &Security::Plaintext,
        )
        .await
        .unwrap();
        let r = c
            .list_connections(v1::ListConnectionsRequest::default())
            .await
            .map(|r| r.into_inner().connections.len());
        assert_eq!(r.ok(), Some(40_000));
        task.abort();
    }
}
