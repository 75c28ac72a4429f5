//! How every gRPC server and client of a node is built: the single place where transport
//! security plugs in.
//!
//! Owns endpoint and server construction (timeouts, keepalive, and the rustls mTLS of the
//! cluster CA: [`Security`]) and the running of a node's servers ([`Transport::serve`]). Every
//! channel to a peer, every listener and every server goes through [`Transport`]: a listener
//! hands tonic connections whose TLS handshake (client certificate required and verified
//! against the CA) has completed, each carrying a [`ConnInfo`] with the client's identity for
//! the services' checks (`tls`); a channel verifies the server's certificate against the CA
//! and, for a known peer, that it names that peer. Which connections may start a handshake at
//! all is [`admission`]'s count (members keep slots no flood takes); what a caller may send
//! before its request body is read is [`gate`]'s (who, and how many at once).
//! The message-size limit is not set here: tonic sets it per generated service and client,
//! so every one of them sets [`keepstate_proto::MAX_MESSAGE_BYTES`] where it is built (the
//! one constant both ends share, fwctl included).
//! Must not know about any service.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, Router, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::tls::{self, ConnInfo, Credentials, Identity};

pub mod admission;
pub mod gate;
/// The token bucket lives in the crate's bottom layer (the datapath's log limiter uses it too);
/// `transport::rate` stays its name for the gate and replication.
pub use crate::rate;

/// A server builder behind the [`gate`], and the router it makes ([`Transport::serve`]).
pub type GatedServer =
    Server<tower::layer::util::Stack<gate::GateLayer, tower::layer::util::Identity>>;
pub type GatedRouter =
    Router<tower::layer::util::Stack<gate::GateLayer, tower::layer::util::Identity>>;

use admission::Admission;

/// A TLS handshake that has not completed in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a source address is a known peer of a listener (a cluster member, a configured
/// sync peer): known sources may use the handshake slots strangers cannot (`admission`).
pub type Known = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

/// A known-nobody `Known` (every source is a stranger).
pub fn nobody_known() -> Known {
    Arc::new(|_| false)
}

/// Whether `ip` is the address of one of `addrs` (`ip:port` strings; names that are not
/// addresses match nothing).
pub fn is_one_of<'a>(ip: std::net::IpAddr, addrs: impl IntoIterator<Item = &'a str>) -> bool {
    let ip = ip.to_canonical();
    addrs
        .into_iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .any(|a| a.ip().to_canonical() == ip)
}

/// One admitted handshake; given back when dropped.
struct Slot {
    admission: Arc<parking_lot::Mutex<Admission>>,
    source: Option<std::net::IpAddr>,
    known: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.lock().release(self.source, self.known);
    }
}

/// Whether and how connections are secured.
#[derive(Clone, Debug)]
pub enum Security {
    /// No TLS, no identity: only when the config says `[tls] plaintext = true`.
    Plaintext,
    /// mTLS with the cluster CA.
    Mtls(Arc<Credentials>),
}

/// Transport settings shared by the Raft transport, the control API and state sync.
#[derive(Clone, Debug)]
pub struct Transport {
    pub connect_timeout: Duration,
    /// Upper bound for one unary call (Raft RPCs carry their own shorter deadline).
    pub request_timeout: Duration,
    pub security: Security,
    /// Every node's Raft-call bucket, shared by the servers this transport runs (`gate`).
    pub raft_rates: Arc<gate::NodeRates>,
}

impl Transport {
    pub fn new(security: Security) -> Transport {
        Transport {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            security,
            raft_rates: Arc::default(),
        }
    }

    pub fn is_plaintext(&self) -> bool {
        matches!(self.security, Security::Plaintext)
    }
}

/// A channel target that is not a valid `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {addr:?}: {message}")]
pub struct AddrError {
    pub addr: String,
    pub message: String,
}

/// Dials TCP, then TLS with the credentials current at that moment, verifying `name`.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    creds: Arc<Credentials>,
    name: ServerName<'static>,
}

impl TlsConnector {
    pub fn new(creds: Arc<Credentials>, name: ServerName<'static>) -> TlsConnector {
        TlsConnector { creds, name }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.creds.client_config());
        let name = self.name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no port"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

impl Transport {
    /// An endpoint for `host:port` with this transport's timeouts (no connector yet).
    fn endpoint(&self, addr: &str) -> Result<Endpoint, AddrError> {
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

    fn connector(&self, addr: &str, peer: Option<u64>) -> Result<Option<TlsConnector>, AddrError> {
        match &self.security {
            Security::Plaintext => Ok(None),
            Security::Mtls(c) => {
                let name = tls::server_name(peer).map_err(|e| AddrError {
                    addr: addr.to_string(),
                    message: e.to_string(),
                })?;
                Ok(Some(TlsConnector::new(c.clone(), name)))
            }
        }
    }

    /// A lazily connecting channel to `addr`; `peer`: the node id the server must prove (any
    /// node of the cluster when `None`).
    pub fn channel_lazy(&self, addr: &str, peer: Option<u64>) -> Result<Channel, AddrError> {
        let ep = self.endpoint(addr)?;
        Ok(match self.connector(addr, peer)? {
            None => ep.connect_lazy(),
            Some(c) => ep.connect_with_connector_lazy(c),
        })
    }

    /// A connected channel to `addr` (see [`Transport::channel_lazy`]).
    pub async fn connect(&self, addr: &str, peer: Option<u64>) -> Result<Channel, ConnectError> {
        let ep = self.endpoint(addr)?;
        let r = match self.connector(addr, peer)? {
            None => ep.connect().await,
            Some(c) => ep.connect_with_connector(c).await,
        };
        r.map_err(|e| ConnectError::Connect {
            addr: addr.to_string(),
            message: match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            },
        })
    }

    /// Whether a server accepts this end's certificate: a TLS handshake with `addr`, then a
    /// short wait for the server's verdict (with TLS 1.3 a server that refuses the client's
    /// certificate says so only after the client's handshake has completed, so a gRPC call
    /// sees no more than a closed connection). `Ok` for plaintext or when nothing was refused
    /// within `wait`; for diagnosing a failed call, not for every connection.
    pub async fn probe(&self, addr: &str, peer: Option<u64>, wait: Duration) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let Security::Mtls(creds) = &self.security else {
            return Ok(());
        };
        let name = tls::server_name(peer).map_err(|e| e.to_string())?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(creds.client_config());
        let mut s = tokio::time::timeout(wait, connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(0)) => Err("the server closed the TLS session".into()),
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }

    /// The connections accepted on `addr`, for `server()...serve_with_incoming`: with mTLS,
    /// only those whose handshake completed (a verified client certificate). The socket's TCP
    /// options are set here: tonic's `Server::tcp_nodelay` applies only when tonic binds the
    /// socket itself, and without TCP_NODELAY small replies meet the peer's delayed ACK (a
    /// 40 ms stall per call). Must be called inside a tokio runtime (it spawns the acceptor,
    /// which ends when the returned stream is dropped).
    /// `known`: which sources may use the slots reserved for members (`admission`).
    pub fn incoming(
        &self,
        addr: SocketAddr,
        known: Known,
    ) -> io::Result<ReceiverStream<io::Result<Conn>>> {
        let mut tcp = TcpIncoming::bind(addr)?
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(10)));
        let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
        let security = self.security.clone();
        let admission = Arc::new(parking_lot::Mutex::new(Admission::default()));
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    s = tcp.next() => s,
                    _ = tx.closed() => return,
                };
                let s = match s {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "accept failed");
                        continue;
                    }
                    None => return,
                };
                let remote = s.peer_addr().ok();
                match &security {
                    Security::Plaintext => {
                        if tx.send(Ok(Conn::Plain(s, remote))).await.is_err() {
                            return;
                        }
                    }
                    Security::Mtls(creds) => {
                        let source = remote.map(|r| r.ip());
                        let known = source.is_some_and(|ip| known(ip));
                        if let Err(why) = admission.lock().admit(source, known) {
                            tracing::debug!(%addr, ?remote, ?why, "TLS handshake not admitted");
                            continue;
                        }
                        let slot = Slot {
                            admission: admission.clone(),
                            source,
                            known,
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(creds.server_config());
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let r =
                                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await;
                            drop(slot);
                            let tls = match r {
                                Ok(Ok(t)) => t,
                                Ok(Err(e)) => {
                                    tracing::info!(%addr, ?remote, error = %e, "TLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::info!(%addr, ?remote, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let id = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| tls::identity(c));
                            let id = match id {
                                Some(Ok(id)) => id,
                                Some(Err(e)) => {
                                    tracing::info!(%addr, ?remote, error = %e, "unreadable client certificate");
                                    return;
                                }
                                None => return,
                            };
                            let _ = tx
                                .send(Ok(Conn::Tls(Box::new(tls), remote, Arc::new(id))))
                                .await;
                        });
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// A server builder with this transport's settings.
    pub fn server(&self) -> Server {
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
    }

    /// Serve the services `services` adds to [`Transport::server`], behind the [`gate`], on
    /// `incoming` (from
    /// [`Transport::incoming`] on `listen`), spawned on the current tokio runtime (so it must be
    /// called inside one), until the returned sender fires or is dropped. A server that fails
    /// is logged as "`what` server stopped" with `listen`.
    pub fn serve(
        &self,
        incoming: ReceiverStream<io::Result<Conn>>,
        listen: SocketAddr,
        what: &'static str,
        services: impl FnOnce(&mut GatedServer) -> GatedRouter,
    ) -> oneshot::Sender<()> {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let mut gated = self
            .server()
            .layer(gate::GateLayer::new(self.raft_rates.clone()));
        let server = services(&mut gated).serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(%listen, error = %e, "{what} server stopped");
            }
        });
        stop_tx
    }
}

/// A channel that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error("connecting to {addr}: {message}")]
    Connect { addr: String, message: String },
}

/// One accepted connection, plaintext or after a completed mTLS handshake.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream, Option<SocketAddr>),
    Tls(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        Option<SocketAddr>,
        Arc<Identity>,
    ),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(_, remote) => ConnInfo {
                remote: *remote,
                peer: None,
            },
            Conn::Tls(_, remote, id) => ConnInfo {
                remote: *remote,
                peer: Some(id.clone()),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _, _) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use keepstate_proto::v1::raft_client::RaftClient;
    use keepstate_proto::v1::raft_server::{Raft, RaftServer};
    use keepstate_proto::v1::RaftPayload;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, SanType,
    };

    use super::*;
    use crate::tls::{Caller, OperatorRole, TlsFiles};

    /// Answers every call with its caller, as the services' checks see it.
    struct Probe;

    fn who(
        req: &tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let c = tls::caller(req)?;
        Ok(tonic::Response::new(RaftPayload {
            payload: format!("{c:?}").into_bytes(),
            encoding: 0,
        }))
    }

    #[tonic::async_trait]
    impl Raft for Probe {
        async fn append_entries(
            &self,
            r: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            who(&r)
        }
        async fn vote(
            &self,
            r: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            who(&r)
        }
        async fn install_snapshot(
            &self,
            r: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            who(&r)
        }
    }

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// A leaf of `ca` with DNS names `dns` and/or a role URI; (cert PEM, key PEM).
    fn leaf(ca: &Ca, dns: &[String], role: Option<&str>) -> (String, String) {
        let mut p = CertificateParams::new(dns.to_vec()).unwrap();
        if let Some(r) = role {
            p.subject_alt_names.push(SanType::URI(
                format!("keepstate:role:{r}").as_str().try_into().unwrap(),
            ));
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn node(ca: &Ca, id: u64) -> (String, String) {
        leaf(ca, &[tls::node_name(id), tls::SERVER_NAME.into()], None)
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d =
                std::env::temp_dir().join(format!("ks-transport-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }

        /// Write CA `cas` (PEMs concatenated) and a cert/key pair as `<stem>.*`.
        fn files(&self, stem: &str, cas: &[&Ca], pair: &(String, String)) -> TlsFiles {
            let f = TlsFiles {
                ca: self.0.join(format!("{stem}-ca.crt")),
                cert: self.0.join(format!("{stem}.crt")),
                key: self.0.join(format!("{stem}.key")),
            };
            write(&f.ca, &cas.iter().map(|c| c.pem()).collect::<String>());
            write(&f.cert, &pair.0);
            write(&f.key, &pair.1);
            f
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(p: &Path, s: &str) {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, s).unwrap();
        std::fs::rename(&tmp, p).unwrap();
    }

    fn mtls(f: TlsFiles) -> Transport {
        Transport::new(Security::Mtls(Credentials::load(f).unwrap()))
    }

    async fn serve(t: &Transport) -> SocketAddr {
        serve_knowing(t, nobody_known()).await
    }

    async fn serve_knowing(t: &Transport, known: Known) -> SocketAddr {
        // Bind a free port first: `incoming` takes an address.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let incoming = t.incoming(addr, known).unwrap();
        let server = t
            .server()
            .add_service(RaftServer::new(Probe))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        addr
    }

    /// The caller the server saw, or the error of the call.
    async fn call(t: &Transport, addr: SocketAddr, peer: Option<u64>) -> Result<String, String> {
        let ch = t
            .connect(&addr.to_string(), peer)
            .await
            .map_err(|e| e.to_string())?;
        let r = RaftClient::new(ch)
            .vote(RaftPayload::default())
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(String::from_utf8_lossy(&r.into_inner().payload).into_owned())
    }

    /// One host that floods the shared Raft/control port with connections it never completes
    /// holds only its own few handshake slots: a member's call still goes through at once.
    /// The certificate's expiry (the metric `keepstate_certificate_expiry_timestamp_seconds`)
    /// is the leaf's notAfter, and follows a reload.
    #[test]
    fn credentials_report_the_leafs_not_after_and_follow_a_reload() {
        let d = Dir::new("notafter");
        let ca = ca("ca");
        let with_expiry = |y: i32| {
            let mut p = CertificateParams::new(vec![tls::node_name(1)]).unwrap();
            p.not_after = rcgen::date_time_ymd(y, 1, 2);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let f = d.files("n1", &[&ca], &with_expiry(2031));
        let creds = Credentials::load(f.clone()).unwrap();
        // 2031-01-02T00:00:00Z
        assert_eq!(creds.not_after_unix(), Some(1_925_078_400));
        // A renewed certificate (a later modification time) is what the metric then shows.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (cert, key) = with_expiry(2033);
        write(&f.cert, &cert);
        write(&f.key, &key);
        assert!(creds.reload_if_changed());
        assert_eq!(creds.not_after_unix(), Some(1_988_236_800));
    }

    #[tokio::test]
    async fn a_connection_flood_from_one_host_does_not_starve_the_others() {
        let d = Dir::new("flood");
        let ca1 = ca("ca1");
        let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
        let addr = serve(&server).await;
        // 2 * admission::MAX_HANDSHAKES idle connections from 127.0.0.2, none of which says a word.
        let held = flood(addr, &["127.0.0.2".into()], 2 * admission::MAX_HANDSHAKES).await;
        // Node 2 calls from 127.0.0.1 while the flood holds its connections open.
        let n2 = mtls(d.files("n2", &[&ca1], &node(&ca1, 2)));
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(3), call(&n2, addr, Some(1))).await;
        assert_eq!(
            r.ok(),
            Some(Ok(format!("{:?}", Caller::Node(2)))),
            "the member's call did not get through the flood"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(held);
    }

    /// Idle connections to `addr` from `per_host` ports of each of `sources`.
    async fn flood(addr: SocketAddr, sources: &[String], per_host: usize) -> Vec<TcpStream> {
        let mut out = Vec::new();
        for src in sources {
            for _ in 0..per_host {
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.bind(format!("{src}:0").parse().unwrap()).unwrap();
                out.push(s.connect(addr).await.unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out
    }

    /// The security review's flood: one host with 25 addresses (here 127.0.1.2-26) took
    /// every handshake slot with per-address limits alone. Its network's share now ends it,
    /// and a caller from another network (127.0.0.1, a stranger here) gets through.
    #[tokio::test]
    async fn a_flood_from_many_addresses_of_one_network_does_not_starve_the_others() {
        let d = Dir::new("netflood");
        let ca1 = ca("ca1");
        let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
        let addr = serve(&server).await;
        let sources: Vec<String> = (2..27).map(|h| format!("127.0.1.{h}")).collect();
        let held = flood(addr, &sources, admission::PER_HOST).await;
        let n2 = mtls(d.files("n2", &[&ca1], &node(&ca1, 2)));
        let r = tokio::time::timeout(Duration::from_secs(3), call(&n2, addr, Some(1))).await;
        assert_eq!(
            r.ok(),
            Some(Ok(format!("{:?}", Caller::Node(2)))),
            "a caller from another network did not get through"
        );
        drop(held);
    }

    /// Strangers from many networks fill what strangers may take; a member (a known
    /// address) still gets through, a stranger does not (the negative control: the same
    /// caller unknown).
    #[tokio::test]
    async fn members_keep_reserved_handshake_slots_that_no_stranger_flood_takes() {
        let d = Dir::new("reserved");
        let ca1 = ca("ca1");
        let sources: Vec<String> = (10..22)
            .flat_map(|n| (1..5).map(move |h| format!("127.0.{n}.{h}")))
            .collect();
        let n2 = mtls(d.files("n2", &[&ca1], &node(&ca1, 2)));
        for known in [true, false] {
            let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
            let me: std::net::IpAddr = "127.0.0.1".parse().unwrap();
            let addr = serve_knowing(&server, Arc::new(move |ip| known && ip == me)).await;
            let held = flood(addr, &sources, admission::PER_HOST).await;
            let r = tokio::time::timeout(Duration::from_secs(2), call(&n2, addr, Some(1))).await;
            assert_eq!(
                matches!(r, Ok(Ok(_))),
                known,
                "known caller: {known}, call: {r:?}"
            );
            drop(held);
        }
    }

    /// A server behind the gate, as `Transport::serve` runs every node's services.
    async fn serve_gated(t: &Transport) -> (SocketAddr, oneshot::Sender<()>) {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let incoming = t.incoming(addr, nobody_known()).unwrap();
        let stop = t.serve(incoming, addr, "test", |s| {
            s.add_service(RaftServer::new(Probe).max_decoding_message_size(64 * 1024 * 1024))
        });
        (addr, stop)
    }

    /// A Raft call with a 30 MB body, as the security review sent ApplyPolicy.
    async fn big_call(t: &Transport, addr: SocketAddr) -> Result<String, tonic::Status> {
        let ch = t.connect(&addr.to_string(), None).await.unwrap();
        let r = RaftClient::new(ch)
            .max_encoding_message_size(64 * 1024 * 1024)
            .vote(RaftPayload {
                payload: vec![b'x'; 30 * 1024 * 1024],
                encoding: 0,
            })
            .await?;
        Ok(String::from_utf8_lossy(&r.into_inner().payload).into_owned())
    }

    /// The security review's memory flood: certificates of the CA without a role sent 30 MB
    /// requests, which were read whole before the handler refused them. Behind the gate they
    /// are refused from their headers; the negative control (the same server without the gate)
    /// reads the body and runs the handler.
    #[tokio::test]
    async fn the_gate_refuses_callers_without_a_role_before_their_request_is_read() {
        let d = Dir::new("gate");
        let ca1 = ca("ca1");
        let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
        let (addr, _stop) = serve_gated(&server).await;
        let odd = mtls(d.files("odd", &[&ca1], &leaf(&ca1, &[], Some("root"))));
        let t = std::time::Instant::now();
        let e = big_call(&odd, addr).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("node certificate"), "{e:?}");
        eprintln!("refused in {:?}", t.elapsed());
        // An operator is not a node either; a node is let through.
        let admin = mtls(d.files("op", &[&ca1], &leaf(&ca1, &[], Some("admin"))));
        let e = big_call(&admin, addr).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let n2 = mtls(d.files("n2", &[&ca1], &node(&ca1, 2)));
        assert_eq!(
            call(&n2, addr, Some(1)).await,
            Ok(format!("{:?}", Caller::Node(2)))
        );
        // Without the gate the body is read and the handler answers.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = probe.local_addr().unwrap();
        drop(probe);
        let incoming = server.incoming(open, nobody_known()).unwrap();
        tokio::spawn(
            server
                .server()
                .add_service(RaftServer::new(Probe).max_decoding_message_size(64 * 1024 * 1024))
                .serve_with_incoming(incoming),
        );
        let c = big_call(&odd, open).await.unwrap();
        assert!(c.starts_with("Nobody("), "{c}");
    }

    #[tokio::test]
    async fn mtls_tells_the_server_who_calls_and_the_client_which_node_answers() {
        let d = Dir::new("who");
        let ca1 = ca("ca1");
        let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
        let addr = serve(&server).await;
        let n2 = mtls(d.files("n2", &[&ca1], &node(&ca1, 2)));
        assert_eq!(
            call(&n2, addr, Some(1)).await,
            Ok(format!("{:?}", Caller::Node(2)))
        );
        // Any node will do for fwctl: the shared name.
        assert!(call(&n2, addr, None).await.is_ok());
        // Node 1's certificate does not name node 3: a client that dials node 3 refuses it.
        let e = call(&n2, addr, Some(3)).await.unwrap_err();
        assert!(
            e.contains("certificate") || e.contains("Certificate"),
            "{e}"
        );
        let admin = mtls(d.files("op", &[&ca1], &leaf(&ca1, &[], Some("admin"))));
        let c = call(&admin, addr, None).await.unwrap();
        assert!(c.starts_with("Operator(Admin"), "{c}");
        let odd = mtls(d.files("odd", &[&ca1], &leaf(&ca1, &[], Some("root"))));
        let c = call(&odd, addr, None).await.unwrap();
        assert!(c.starts_with("Nobody("), "{c}");
    }

    #[tokio::test]
    async fn a_client_of_another_ca_or_without_tls_is_refused() {
        let d = Dir::new("refused");
        let (ca1, ca2) = (ca("ca1"), ca("ca2"));
        let server = mtls(d.files("n1", &[&ca1], &node(&ca1, 1)));
        let addr = serve(&server).await;
        // Trusts the server's CA, but its own certificate is another CA's.
        let stranger = mtls(d.files("x", &[&ca1], &node(&ca2, 2)));
        assert!(call(&stranger, addr, Some(1)).await.is_err());
        let plain = Transport::new(Security::Plaintext);
        assert!(call(&plain, addr, Some(1)).await.is_err());
        // And a plaintext server's callers are `Plaintext` (everything allowed, by config).
        let paddr = serve(&plain).await;
        assert_eq!(
            call(&plain, paddr, None).await,
            Ok(format!("{:?}", Caller::Plaintext))
        );
    }

    #[tokio::test]
    async fn certificates_and_the_ca_are_reloaded_from_disk_without_a_restart() {
        let d = Dir::new("rotate");
        let (ca1, ca2) = (ca("ca1"), ca("ca2"));
        let sfiles = d.files("n1", &[&ca1], &node(&ca1, 1));
        let server = mtls(sfiles.clone());
        let addr = serve(&server).await;
        // Client side: a read operator's certificate, replaced on disk by an admin's.
        let cfiles = d.files("op", &[&ca1], &leaf(&ca1, &[], Some("read")));
        let op = mtls(cfiles.clone());
        let c = call(&op, addr, None).await.unwrap();
        assert!(
            c.starts_with(
                &format!("{:?}", Caller::Operator(OperatorRole::Read, String::new()))[..14]
            ),
            "{c}"
        );
        let admin = leaf(&ca1, &[], Some("admin"));
        write(&cfiles.cert, &admin.0);
        write(&cfiles.key, &admin.1);
        // Server side: a client of a second CA is refused until the server's CA file trusts
        // both (a CA rotation's first step).
        let other = mtls(d.files("n2", &[&ca1], &node(&ca2, 2)));
        assert!(call(&other, addr, Some(1)).await.is_err());
        write(&sfiles.ca, &(ca1.pem() + &ca2.pem()));
        tokio::time::sleep(tls::RELOAD_CHECK + Duration::from_millis(200)).await;
        let c = call(&op, addr, None).await.unwrap();
        assert!(c.starts_with("Operator(Admin"), "{c}");
        assert_eq!(
            call(&other, addr, Some(1)).await,
            Ok(format!("{:?}", Caller::Node(2)))
        );
        // A half-written file is not taken: the previous configuration stays.
        write(&sfiles.key, "-----BEGIN PRIVATE KEY-----\ngarbage");
        tokio::time::sleep(tls::RELOAD_CHECK + Duration::from_millis(200)).await;
        assert!(call(&other, addr, Some(1)).await.is_ok());
    }
}
