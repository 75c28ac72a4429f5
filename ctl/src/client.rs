//! The connection to a node and what its errors mean to an operator.
//!
//! Owns the one place a channel is made (mTLS with the cluster CA plugs in here, as it does in
//! fwnode's `transport`), and the mapping of gRPC statuses to `CliError`s with exit codes and
//! advice. Must not format output.

use std::time::Duration;

use keepstate_proto::v1::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// An error that ends the command, with the exit code scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The request or policy is invalid, or refers to something that does not exist.
    #[error("{0}")]
    Rejected(String),
    /// The node, a leader or a quorum is unreachable; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Rejected(_) => 3,
            CliError::Unavailable(_) => 4,
            CliError::Internal(_) => 5,
        }
    }
}

/// Connect to `addr` (host:port), bounded by `timeout`.
pub async fn connect(addr: &str, timeout: Duration) -> Result<ControlClient<Channel>, CliError> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CliError::Rejected(format!("--node {addr:?} is not host:port: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ch = ep.connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        CliError::Unavailable(format!(
            "cannot reach fwnode at {addr}: {cause} — is fwnode running with a [cluster] listen \
             address there? set --node or FWCTL_NODE"
        ))
    })?;
    Ok(ControlClient::new(ch))
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
        Code::Unavailable if msg.contains("no quorum") || msg.contains("no Raft leader") => {
            CliError::Unavailable(msg)
        }
        Code::Unavailable => CliError::Unavailable(format!(
            "{addr}: {msg} (the node or the cluster leader is unreachable; nothing was changed)"
        )),
        Code::DeadlineExceeded | Code::Cancelled => CliError::Unavailable(format!(
            "{addr}: {msg} (no answer in time: the cluster may have lost its quorum)"
        )),
        _ => CliError::Internal(format!("{addr}: {} ({:?})", msg, s.code())),
    }
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
        assert_eq!(code(Status::deadline_exceeded("slow")), 4);
        assert_eq!(code(Status::internal("bug")), 5);
    }
}
