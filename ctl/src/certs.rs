//! `fwctl certs`: a cluster CA and the certificates fwnode and fwctl present (rcgen), for labs
//! and deployment tooling.
//!
//! Names (what fwnode's `tls` module checks): a node certificate carries the DNS SANs
//! `node-<id>.keepstate` and `fwnode.keepstate` and may serve and dial; an operator
//! certificate carries the URI SAN `keepstate:role:<read|admin>` and may only dial. Keys are
//! ECDSA P-256, written 0600 in a 0700 directory; nothing is overwritten without `--force`.
//! Must not talk to a node.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fwnode::tls::{node_name, OperatorRole, ROLE_URI_PREFIX, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::client::CliError;

/// The CA is valid for this long; node and operator certificates for `LEAF_DAYS`.
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 825;

/// What `certs` does.
#[derive(Debug)]
pub enum Op {
    Init,
    Node { id: u64 },
    Operator { name: String, role: OperatorRole },
}

fn fail(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Rejected(format!("{what}: {e}"))
}

/// The files written, in order.
pub fn run(dir: &Path, op: &Op, force: bool) -> Result<Vec<PathBuf>, CliError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(&format!("creating {}", dir.display()), e))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (stem, params) = match op {
        Op::Init => {
            let mut p = CertificateParams::default();
            p.distinguished_name
                .push(DnType::CommonName, "keepstate cluster CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut p, CA_DAYS);
            let key = KeyPair::generate().map_err(|e| fail("generating a key", e))?;
            let cert = p.self_signed(&key).map_err(|e| fail("signing the CA", e))?;
            return write_pair(&ca_crt, &ca_key, &cert.pem(), &key.serialize_pem(), force);
        }
        Op::Node { id } => {
            if *id == 0 {
                return Err(CliError::Rejected("node ids start at 1".into()));
            }
            let mut p = CertificateParams::new(vec![node_name(*id), SERVER_NAME.to_string()])
                .map_err(|e| fail("certificate names", e))?;
            p.distinguished_name
                .push(DnType::CommonName, node_name(*id));
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            (format!("node-{id}"), p)
        }
        Op::Operator { name, role } => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || name.starts_with('.')
            {
                return Err(CliError::Rejected(format!(
                    "operator name {name:?}: use letters, digits, '-', '_' and '.' (it names the files)"
                )));
            }
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name.clone());
            let uri = format!("{ROLE_URI_PREFIX}{}", role.name());
            p.subject_alt_names = vec![SanType::URI(
                uri.as_str().try_into().map_err(|e| fail("role URI", e))?,
            )];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            (name.clone(), p)
        }
    };
    let mut params = params;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_DAYS);
    let ca_key_pem = std::fs::read_to_string(&ca_key).map_err(|e| {
        fail(
            &format!(
                "reading the CA key {} (run `fwctl certs init` first)",
                ca_key.display()
            ),
            e,
        )
    })?;
    let ca_pem = std::fs::read_to_string(&ca_crt)
        .map_err(|e| fail(&format!("reading {}", ca_crt.display()), e))?;
    let signer =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| fail(&format!("{}", ca_key.display()), e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, signer)
        .map_err(|e| fail(&format!("{}", ca_crt.display()), e))?;
    let key = KeyPair::generate().map_err(|e| fail("generating a key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| fail("signing", e))?;
    write_pair(
        &dir.join(format!("{stem}.crt")),
        &dir.join(format!("{stem}.key")),
        &cert.pem(),
        &key.serialize_pem(),
        force,
    )
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour back: clocks of a cluster are never quite in step.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

/// Write the certificate (0644) and the key (0600), refusing to replace either without
/// `force`.
fn write_pair(
    crt: &Path,
    key: &Path,
    crt_pem: &str,
    key_pem: &str,
    force: bool,
) -> Result<Vec<PathBuf>, CliError> {
    if !force {
        for p in [crt, key] {
            if p.exists() {
                return Err(CliError::Rejected(format!(
                    "{} exists; pass --force to replace it",
                    p.display()
                )));
            }
        }
    }
    write_file(key, key_pem, 0o600)?;
    write_file(crt, crt_pem, 0o644)?;
    Ok(vec![crt.to_path_buf(), key.to_path_buf()])
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    let e = |e| fail(&format!("writing {}", path.display()), e);
    // A new file under a temporary name, renamed over the old one: a reader (fwnode's reload)
    // never sees a half-written file, and a key is never world-readable, not even briefly.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(e)?;
    f.write_all(text.as_bytes()).map_err(e)?;
    f.sync_all().map_err(e)?;
    // The umask may have narrowed the mode; a certificate is meant to be readable.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(e)?;
    std::fs::rename(&tmp, path).map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fwctl-certs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_ca_signs_node_and_operator_certificates_that_name_what_fwnode_checks() {
        let d = temp("names");
        run(&d, &Op::Init, false).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join("ca.key")), 0o600);
        assert_eq!(mode(&d.join("ca.crt")), 0o644);
        run(&d, &Op::Node { id: 7 }, false).unwrap();
        run(
            &d,
            &Op::Operator {
                name: "alice".into(),
                role: OperatorRole::Read,
            },
            false,
        )
        .unwrap();
        assert_eq!(mode(&d.join("node-7.key")), 0o600);
        let der = |f: &str| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_file(d.join(f))
                .unwrap()
                .to_vec()
        };
        let n = fwnode::tls::identity(&der("node-7.crt")).unwrap();
        assert_eq!((n.node, n.role), (Some(7), None));
        let o = fwnode::tls::identity(&der("alice.crt")).unwrap();
        assert_eq!((o.node, o.role), (None, Some(OperatorRole::Read)));
        assert!(o.subject.contains("alice"), "{}", o.subject);
        // Both load as rustls credentials (chains to the CA, key matches).
        for stem in ["node-7", "alice"] {
            fwnode::tls::Credentials::load(fwnode::tls::TlsFiles {
                ca: d.join("ca.crt"),
                cert: d.join(format!("{stem}.crt")),
                key: d.join(format!("{stem}.key")),
            })
            .unwrap();
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn nothing_is_overwritten_without_force() {
        let d = temp("force");
        run(&d, &Op::Init, false).unwrap();
        let before = std::fs::read(d.join("ca.key")).unwrap();
        let e = run(&d, &Op::Init, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(e.exit_code(), 3);
        assert_eq!(std::fs::read(d.join("ca.key")).unwrap(), before);
        run(&d, &Op::Init, true).unwrap();
        assert_ne!(std::fs::read(d.join("ca.key")).unwrap(), before);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn issuing_needs_a_ca_and_a_sane_name() {
        let d = temp("noca");
        let e = run(&d, &Op::Node { id: 1 }, false).unwrap_err();
        assert!(e.to_string().contains("certs init"), "{e}");
        run(&d, &Op::Init, false).unwrap();
        let bad = Op::Operator {
            name: "../x".into(),
            role: OperatorRole::Admin,
        };
        assert!(run(&d, &bad, false).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
