//! Transport security of every gRPC port: the `[tls]` settings, the cluster CA's rustls
//! configurations (reloaded from disk when the files change), what a peer's certificate says
//! about it, and the checks each service makes with that.
//!
//! Naming (what `fwctl certs` issues, and what is checked here):
//! - every node certificate names `node-<id>.keepstate` and the shared [`SERVER_NAME`]
//!   (`fwnode.keepstate`) as DNS SANs, for server and client use: a node dialling a known peer
//!   verifies `node-<id>.keepstate`, fwctl verifies `fwnode.keepstate`;
//! - an operator certificate carries its role as a URI SAN `keepstate:role:read` or
//!   `keepstate:role:admin`, for client use only.
//!
//! Owns certificate loading and parsing, and the decisions "may this caller do that". Must not
//! build servers or channels (that is `transport`) nor know any service's messages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;

/// The DNS name every node certificate carries and fwctl verifies.
pub const SERVER_NAME: &str = "fwnode.keepstate";
/// The URI SAN prefix of an operator certificate's role.
pub const ROLE_URI_PREFIX: &str = "keepstate:role:";
/// Files are checked for changes at most this often (on a new connection).
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The DNS name that identifies node `id` in its certificate.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.keepstate")
}

/// `[tls]`: the cluster CA and this node's certificate and key (PEM files), or an explicit
/// opt-out.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate that every peer and operator certificate must chain to.
    pub ca: Option<PathBuf>,
    /// This node's certificate (naming `node-<id>.keepstate` and `fwnode.keepstate`).
    pub cert: Option<PathBuf>,
    /// This node's private key.
    pub key: Option<PathBuf>,
    /// Serve and dial without TLS and without any identity check (labs only).
    #[serde(default)]
    pub plaintext: bool,
}

impl TlsConfig {
    /// The three files, or `None` for plaintext; an error when the section says neither
    /// clearly.
    pub fn files(&self) -> Result<Option<TlsFiles>, String> {
        match (&self.ca, &self.cert, &self.key, self.plaintext) {
            (None, None, None, true) => Ok(None),
            (_, _, _, true) => {
                Err("tls.plaintext = true excludes tls.ca, tls.cert and tls.key".into())
            }
            (Some(ca), Some(cert), Some(key), false) => Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ => Err(
                "[tls] needs ca, cert and key (PEM files; see `fwctl certs`), or plaintext = true"
                    .into(),
            ),
        }
    }

    /// Make relative paths relative to `dir` (the config file's directory).
    pub fn resolve(&mut self, dir: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// The PEM files of one end: the CA to verify the other end against, and our own chain + key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why certificates could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        source: e,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let pem = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        message: format!("no usable PEM private key: {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Both rustls configurations built from one reading of the files.
#[derive(Debug)]
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    stamps: [Option<SystemTime>; 3],
    /// The leaf certificate's notAfter (Unix seconds), when it parses.
    not_after: Option<u64>,
}

fn stamps(f: &TlsFiles) -> [Option<SystemTime>; 3] {
    [&f.ca, &f.cert, &f.key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn build(f: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamps = stamps(f);
    let mut roots = RootCertStore::empty();
    for c in certs(&f.ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: f.ca.display().to_string(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&f.cert)?;
    let not_after = chain.first().and_then(|leaf| not_after_unix(leaf));
    let key = key(&f.key)?;
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(cfg)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(cfg)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        stamps,
        not_after,
    })
}

/// The rustls configurations of one end, re-read from disk when a file's modification time
/// changes (checked at most every [`RELOAD_CHECK`], when a connection is made or accepted).
/// A change that does not load (a half-written file) keeps the previous configuration.
#[derive(Debug)]
pub struct Credentials {
    files: TlsFiles,
    loaded: ArcSwap<Loaded>,
    checked: Mutex<Instant>,
}

impl Credentials {
    pub fn load(files: TlsFiles) -> Result<Arc<Credentials>, TlsError> {
        let loaded = build(&files)?;
        Ok(Arc::new(Credentials {
            files,
            loaded: ArcSwap::from_pointee(loaded),
            checked: Mutex::new(Instant::now()),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn refresh(&self) {
        {
            let mut c = self.checked.lock();
            if c.elapsed() < RELOAD_CHECK {
                return;
            }
            *c = Instant::now();
        }
        self.reload_if_changed();
    }

    /// Re-read the files now if their modification times changed; true if a new
    /// configuration is in use.
    pub fn reload_if_changed(&self) -> bool {
        if stamps(&self.files) == self.loaded.load().stamps {
            return false;
        }
        match build(&self.files) {
            Ok(l) => {
                self.loaded.store(Arc::new(l));
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                false
            }
        }
    }

    /// When the certificate in use expires: the leaf's notAfter (Unix seconds; `None` when it
    /// does not parse as X.509 or is before 1970).
    pub fn not_after_unix(&self) -> Option<u64> {
        self.loaded.load().not_after
    }

    /// The server configuration for a connection accepted now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refresh();
        self.loaded.load().server.clone()
    }

    /// The client configuration for a connection made now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refresh();
        self.loaded.load().client.clone()
    }
}

/// A certificate's notAfter in Unix seconds.
pub fn not_after_unix(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// The server name a client verifies: a known peer's own name, or any node of the cluster.
pub fn server_name(peer: Option<u64>) -> Result<ServerName<'static>, TlsError> {
    let name = peer
        .map(node_name)
        .unwrap_or_else(|| SERVER_NAME.to_string());
    ServerName::try_from(name.clone())
        .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))
}

/// An operator's role, carried in the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperatorRole {
    /// Reads: status, connections, expectations, policy show/history, sync status, stats.
    Read,
    /// Everything.
    Admin,
}

impl OperatorRole {
    pub fn name(self) -> &'static str {
        match self {
            OperatorRole::Read => "read",
            OperatorRole::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<OperatorRole> {
        match s {
            "read" => Some(OperatorRole::Read),
            "admin" => Some(OperatorRole::Admin),
            _ => None,
        }
    }
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The certificate's subject, for messages and logs.
    pub subject: String,
    /// `node-<id>.keepstate`: a node of the cluster.
    pub node: Option<u64>,
    /// `keepstate:role:<role>`: an operator.
    pub role: Option<OperatorRole>,
}

/// Parse the identity out of a (CA-verified) end-entity certificate. A certificate naming two
/// node ids or two roles names none.
pub fn identity(der: &[u8]) -> Result<Identity, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut nodes = vec![];
    let mut roles = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    if let Some(id) = d
                        .strip_prefix("node-")
                        .and_then(|r| r.strip_suffix(".keepstate"))
                        .and_then(|s| s.parse::<u64>().ok().filter(|id| node_name(*id) == **d))
                    {
                        nodes.push(id);
                    }
                }
                GeneralName::URI(u) => {
                    if let Some(r) = u.strip_prefix(ROLE_URI_PREFIX) {
                        roles.push(OperatorRole::parse(r));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Identity {
        subject: cert.subject().to_string(),
        node: match nodes[..] {
            [id] => Some(id),
            _ => None,
        },
        role: match roles[..] {
            [r] => r,
            _ => None,
        },
    })
}

/// What the server knows of a request's connection (tonic puts it in the request's
/// extensions; see `transport`).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// `None` on a plaintext connection; on a TLS one, the verified client's identity.
    pub peer: Option<Arc<Identity>>,
}

/// Is a node id a member of the cluster now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Member,
    NotMember,
    /// This node knows no membership yet (a fresh node waiting to be added).
    Unknown,
}

type Lookup = Arc<dyn Fn(u64) -> Membership + Send + Sync>;

/// The current Raft membership, as the identity checks see it: set once the control plane
/// runs (until then nobody is a member).
#[derive(Clone, Default)]
pub struct Members(Arc<OnceLock<Lookup>>);

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

impl Members {
    /// Set the lookup (the first call wins).
    pub fn set(&self, f: impl Fn(u64) -> Membership + Send + Sync + 'static) {
        let _ = self.0.set(Arc::new(f));
    }

    pub fn check(&self, id: u64) -> Membership {
        self.0.get().map_or(Membership::Unknown, |f| f(id))
    }
}

/// Who made a request, as far as transport security tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext connection (`[tls] plaintext = true`): nothing is known, everything allowed.
    Plaintext,
    Node(u64),
    Operator(OperatorRole, String),
    /// A CA-signed certificate that names neither a node nor a role.
    Nobody(String),
}

/// The caller of `req`; a request that did not come through a `transport` listener (no
/// connection info) is refused.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    let info = req
        .extensions()
        .get::<ConnInfo>()
        .ok_or_else(|| tonic::Status::permission_denied("no connection identity"))?;
    Ok(match &info.peer {
        None => Caller::Plaintext,
        Some(id) => match (id.node, id.role) {
            (Some(n), _) => Caller::Node(n),
            (None, Some(r)) => Caller::Operator(r, id.subject.clone()),
            (None, None) => Caller::Nobody(id.subject.clone()),
        },
    })
}

/// A Raft or sync peer: a node certificate of a current member. `fresh_ok`: a node that knows
/// no membership yet accepts any node of the CA (the leader adding it).
pub fn require_member<T>(
    req: &tonic::Request<T>,
    members: &Members,
    fresh_ok: bool,
) -> Result<Option<u64>, tonic::Status> {
    match caller(req)? {
        Caller::Plaintext => Ok(None),
        Caller::Node(id) => match members.check(id) {
            Membership::Member => Ok(Some(id)),
            Membership::Unknown if fresh_ok => Ok(Some(id)),
            _ => Err(tonic::Status::permission_denied(format!(
                "node {id} is not a member of this cluster"
            ))),
        },
        Caller::Operator(_, s) | Caller::Nobody(s) => Err(tonic::Status::permission_denied(
            format!("a node certificate is required here; {s} is not one"),
        )),
    }
}

/// A control call that needs `need`: an operator with that role (admin includes read), or a
/// member node (nodes forward writes to the leader).
pub fn require_role<T>(
    req: &tonic::Request<T>,
    members: &Members,
    need: OperatorRole,
) -> Result<(), tonic::Status> {
    match caller(req)? {
        Caller::Plaintext => Ok(()),
        Caller::Operator(r, _) if r >= need => Ok(()),
        Caller::Operator(r, s) => Err(tonic::Status::permission_denied(format!(
            "this needs the {} role; {s} has the {} role",
            need.name(),
            r.name()
        ))),
        Caller::Node(id) => match members.check(id) {
            Membership::Member => Ok(()),
            _ => Err(tonic::Status::permission_denied(format!(
                "this needs the {} role; node {id} is not a member",
                need.name()
            ))),
        },
        Caller::Nobody(s) => Err(tonic::Status::permission_denied(format!(
            "this needs the {} role; {s} carries no keepstate role",
            need.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: Option<Identity>) -> tonic::Request<()> {
        let mut r = tonic::Request::new(());
        r.extensions_mut().insert(ConnInfo {
            remote: None,
            peer: peer.map(Arc::new),
        });
        r
    }

    fn node(id: u64) -> Option<Identity> {
        Some(Identity {
            subject: format!("CN=node-{id}.keepstate"),
            node: Some(id),
            role: None,
        })
    }

    fn operator(role: Option<OperatorRole>) -> Option<Identity> {
        Some(Identity {
            subject: "CN=alice".into(),
            node: None,
            role,
        })
    }

    fn members(ids: &'static [u64]) -> Members {
        let m = Members::default();
        m.set(move |id| {
            if ids.contains(&id) {
                Membership::Member
            } else if ids.is_empty() {
                Membership::Unknown
            } else {
                Membership::NotMember
            }
        });
        m
    }

    fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> String {
        let s = r.expect_err("expected a refusal");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        s.message().to_string()
    }

    #[test]
    fn roles_read_and_admin_and_what_nodes_may_do() {
        let m = members(&[1, 2]);
        use OperatorRole::*;
        assert!(require_role(&req(operator(Some(Read))), &m, Read).is_ok());
        assert!(require_role(&req(operator(Some(Admin))), &m, Admin).is_ok());
        assert!(require_role(&req(operator(Some(Admin))), &m, Read).is_ok());
        let e = denied(require_role(&req(operator(Some(Read))), &m, Admin));
        assert!(
            e.contains("needs the admin role") && e.contains("CN=alice has the read role"),
            "{e}"
        );
        let e = denied(require_role(&req(operator(None)), &m, Read));
        assert!(e.contains("carries no keepstate role"), "{e}");
        // A member node may (it forwards writes); a removed or unknown one may not.
        assert!(require_role(&req(node(2)), &m, Admin).is_ok());
        let e = denied(require_role(&req(node(9)), &m, Read));
        assert!(e.contains("node 9 is not a member"), "{e}");
        // Plaintext (by config) allows everything; a request from nowhere is refused.
        assert!(require_role(&req(None), &m, Admin).is_ok());
        denied(require_role(&tonic::Request::new(()), &m, Read));
    }

    #[test]
    fn peers_must_be_current_members_and_a_fresh_node_takes_any_node_for_raft_only() {
        let m = members(&[1, 2]);
        assert_eq!(require_member(&req(node(2)), &m, false).ok(), Some(Some(2)));
        let e = denied(require_member(&req(node(3)), &m, true));
        assert!(e.contains("node 3 is not a member"), "{e}");
        let e = denied(require_member(
            &req(operator(Some(OperatorRole::Admin))),
            &m,
            true,
        ));
        assert!(e.contains("node certificate is required"), "{e}");
        assert_eq!(require_member(&req(None), &m, false).ok(), Some(None));
        // No membership yet (a node waiting to be added), or not yet set at all.
        let fresh = members(&[]);
        assert_eq!(
            require_member(&req(node(5)), &fresh, true).ok(),
            Some(Some(5))
        );
        denied(require_member(&req(node(5)), &fresh, false));
        denied(require_member(&req(node(5)), &Members::default(), false));
    }

    fn cert(dns: &[&str], uris: &[&str]) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        for u in uris {
            p.subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identities_come_from_the_sans_and_ambiguity_names_nothing() {
        let id = identity(&cert(&["node-7.keepstate", SERVER_NAME], &[])).unwrap();
        assert_eq!((id.node, id.role), (Some(7), None));
        let id = identity(&cert(&[], &["keepstate:role:read"])).unwrap();
        assert_eq!((id.node, id.role), (None, Some(OperatorRole::Read)));
        // Two node ids, two roles, an unknown role, a look-alike name: nothing.
        let id = identity(&cert(&["node-1.keepstate", "node-2.keepstate"], &[])).unwrap();
        assert_eq!(id.node, None);
        let id = identity(&cert(&[], &["keepstate:role:read", "keepstate:role:admin"])).unwrap();
        assert_eq!(id.role, None);
        let id = identity(&cert(&[], &["keepstate:role:root"])).unwrap();
        assert_eq!(id.role, None);
        let id = identity(&cert(
            &[
                "node-1.keepstate.evil",
                "xnode-1.keepstate",
                "node-01.keepstate",
                "node-+1.keepstate",
            ],
            &[],
        ))
        .unwrap();
        assert_eq!(id.node, None);
        assert!(identity(b"not a certificate").is_err());
    }

    #[test]
    fn tls_sections_need_all_three_files_or_plaintext_alone() {
        let t = |ca: bool, cert: bool, key: bool, plaintext: bool| TlsConfig {
            ca: ca.then(|| "ca".into()),
            cert: cert.then(|| "c".into()),
            key: key.then(|| "k".into()),
            plaintext,
        };
        assert!(t(true, true, true, false).files().unwrap().is_some());
        assert!(t(false, false, false, true).files().unwrap().is_none());
        assert!(t(true, true, false, false).files().is_err());
        assert!(t(false, false, false, false).files().is_err());
        assert!(t(true, true, true, true).files().is_err());
    }
}
