//! How every gRPC server and client of a node is built: the single place where transport
//! security plugs in.
//!
//! Owns endpoint and server construction (timeouts, keepalive, and later the rustls mTLS
//! configuration of the cluster CA). Every channel to a peer and every listener goes through
//! [`Transport`], so turning on mTLS changes this file and the config, not the services.
//! The message-size limit is not set here: tonic sets it per generated service and client,
//! so every one of them sets [`keepstate_proto::MAX_MESSAGE_BYTES`] where it is built (the
//! one constant both ends share, fwctl included).
//! Must not know about any service.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

/// Transport settings shared by the Raft transport, the control API and (later) state sync.
#[derive(Clone, Debug)]
pub struct Transport {
    pub connect_timeout: Duration,
    /// Upper bound for one unary call (Raft RPCs carry their own shorter deadline).
    pub request_timeout: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A channel target that is not a valid `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {addr:?}: {message}")]
pub struct AddrError {
    pub addr: String,
    pub message: String,
}

impl Transport {
    /// A lazily connecting endpoint for `host:port`.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, AddrError> {
        Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| {
                e.connect_timeout(self.connect_timeout)
                    .timeout(self.request_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
            })
            .map_err(|e| AddrError {
                addr: addr.to_string(),
                message: e.to_string(),
            })
    }

    /// A listening socket for `server()`. Its TCP options are set here: tonic's
    /// `Server::tcp_nodelay` applies only when tonic binds the socket itself, and without
    /// TCP_NODELAY small replies meet the peer's delayed ACK (a 40 ms stall per call).
    pub fn incoming(&self, addr: SocketAddr) -> std::io::Result<TcpIncoming> {
        Ok(TcpIncoming::bind(addr)?
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(10))))
    }

    /// A server builder with this transport's settings.
    pub fn server(&self) -> Server {
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
    }
}
