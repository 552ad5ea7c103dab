//! Mutual TLS: a service that trusts a CA ([`crate::ca`]) asks every caller for a
//! certificate, checks it against the CA and its revocation list, and tells handlers who
//! called ([`Peer`]).
//!
//! - **At the handshake** the client certificate must chain to the CA, be within its validity
//!   and not be on the revocation list ([`ClientAuth`]); otherwise the handshake fails.
//! - **On every request** the certificate of the connection is checked against the list again
//!   ([`crate::server::serve`]), so revoking a certificate also ends the connections it
//!   already holds open: a revoked agent is refused at once.
//! - The list is a file (`crl.pem`, signed by the CA) read again whenever it changes; a
//!   service on another machine keeps its copy fresh from the server (`GET /v1/ca/crl`).
//! - A service may accept callers without a certificate (`optional`, the backup server's API,
//!   which operators call with tokens); one that presents a certificate is still checked.
//!
//! Bearer tokens are still checked after the handshake: the certificate says who calls, the
//! token's scopes what it may do.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::ca::ServiceId;
use crate::tls::{TlsError, provider};

/// What a caller's certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// Hex of the serial number.
    pub serial: String,
    pub common_name: String,
    /// SHA-256 of the certificate.
    pub fingerprint: String,
    /// The identity, when the common name is `ROLE/NAME`.
    pub id: Option<ServiceId>,
}

impl PeerCert {
    /// Reads a DER certificate's serial and subject; `None` if it does not parse.
    pub fn parse(der: &[u8]) -> Option<Self> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Some(Self {
            serial: hex::encode(c.raw_serial()),
            id: ServiceId::parse(&common_name).ok(),
            common_name,
            fingerprint: crate::tls::fingerprint(der),
        })
    }
}

/// Who is at the other end of a connection: its address and, with mutual TLS, its
/// certificate. Handlers read it as `Extension<Peer>`.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub cert: Option<Arc<PeerCert>>,
}

impl Peer {
    /// The caller's identity, if it presented a Cairn certificate.
    pub fn id(&self) -> Option<&ServiceId> {
        self.cert.as_ref().and_then(|c| c.id.as_ref())
    }
}

type FileStamp = (SystemTime, u64);

struct Loaded {
    stamp: Option<FileStamp>,
    verifier: Arc<dyn ClientCertVerifier>,
    revoked: HashSet<String>,
}

/// The client-certificate policy of one service: the CA, the revocation list file, and
/// whether callers without a certificate are let through to the token check.
pub struct ClientAuth {
    roots: Arc<rustls::RootCertStore>,
    hints: Vec<DistinguishedName>,
    crl_path: Option<PathBuf>,
    optional: bool,
    /// The roles whose certificates may call this service (`None`: any role).
    roles: Option<Vec<String>>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("crl", &self.crl_path)
            .field("optional", &self.optional)
            .finish()
    }
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })?;
    let crls: Vec<_> = rustls_pemfile::crls(&mut data.as_slice())
        .filter_map(Result::ok)
        .collect();
    if crls.is_empty() {
        return Err(TlsError::Pem { path: path.into() });
    }
    Ok(crls)
}

impl ClientAuth {
    /// Trusts the CA certificates of `ca` (PEM); refuses what the list at `crl` revokes.
    pub fn new(ca: &Path, crl: Option<&Path>, optional: bool) -> Result<Arc<Self>, TlsError> {
        Self::for_roles(ca, crl, optional, None)
    }

    /// As [`new`](Self::new), letting through only certificates of `roles` (the host agent
    /// takes calls from the manager and the server, never from a storage agent).
    pub fn for_roles(
        ca: &Path,
        crl: Option<&Path>,
        optional: bool,
        roles: Option<&[&str]>,
    ) -> Result<Arc<Self>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(ca)? {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let hints = roots.subjects();
        let auth = Self {
            roots,
            hints,
            crl_path: crl.map(Path::to_path_buf),
            optional,
            roles: None,
            loaded: Mutex::new(Loaded {
                stamp: None,
                verifier: Arc::new(NoClients),
                revoked: HashSet::new(),
            }),
        };
        let auth = Self {
            roles: roles.map(|r| r.iter().map(|s| s.to_string()).collect()),
            ..auth
        };
        let loaded = auth.load()?;
        *auth.loaded.lock().expect("client auth") = loaded;
        Ok(Arc::new(auth))
    }

    fn load(&self) -> Result<Loaded, TlsError> {
        let mut b = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let mut revoked = HashSet::new();
        let stamp = match &self.crl_path {
            Some(p) => {
                let s = stamp(p);
                let crls = read_crls(p)?;
                for crl in &crls {
                    let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| {
                        TlsError::Generate(format!("{}: revocation list: {e}", p.display()))
                    })?;
                    for r in parsed.iter_revoked_certificates() {
                        revoked.insert(hex::encode(r.raw_serial()));
                    }
                }
                b = b.with_crls(crls).only_check_end_entity_revocation();
                s
            }
            None => None,
        };
        if self.optional {
            b = b.allow_unauthenticated();
        }
        let verifier = b
            .build()
            .map_err(|e| TlsError::Generate(format!("client verifier: {e}")))?;
        Ok(Loaded {
            stamp,
            verifier,
            revoked,
        })
    }

    /// The verifier and revoked serials as of now: the list is read again if its file
    /// changed. A list that no longer reads keeps the last good one (and says so).
    fn current(&self) -> (Arc<dyn ClientCertVerifier>, bool) {
        let now = self.crl_path.as_deref().and_then(stamp);
        let mut l = self.loaded.lock().expect("client auth");
        if self.crl_path.is_some() && now != l.stamp {
            match self.load() {
                Ok(n) => *l = n,
                Err(e) => {
                    tracing::error!("revocation list: {e} (keeping the previous one)");
                    l.stamp = now;
                }
            }
        }
        (l.verifier.clone(), !l.revoked.is_empty())
    }

    /// Whether the certificate with serial `serial` (hex) is revoked now.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.current();
        self.loaded
            .lock()
            .expect("client auth")
            .revoked
            .contains(serial)
    }

    /// Why a caller with `cert` may not call this service at all, if it may not: revoked, or
    /// of a role the service does not serve.
    pub fn refusal(&self, cert: &PeerCert) -> Option<String> {
        if self.is_revoked(&cert.serial) {
            return Some(format!(
                "certificate {} ({}) is revoked",
                cert.serial, cert.common_name
            ));
        }
        let roles = self.roles.as_ref()?;
        match &cert.id {
            Some(id) if roles.contains(&id.role) => None,
            _ => Some(format!(
                "certificate {:?} may not call this service (it takes {})",
                cert.common_name,
                roles.join(", ")
            )),
        }
    }

    /// Whether callers without a certificate get through the handshake.
    pub fn optional(&self) -> bool {
        self.optional
    }
}

/// Placeholder until the first load (never used for a handshake).
#[derive(Debug)]
struct NoClients;

impl ClientCertVerifier for NoClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General("no client verifier".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no client verifier".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no client verifier".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Vec::new()
    }
}

/// The verifier rustls calls: the current WebPKI verifier of a [`ClientAuth`].
#[derive(Debug)]
struct Reloading(Arc<ClientAuth>);

impl ClientCertVerifier for Reloading {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        !self.0.optional
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hints
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (v, _) = self.0.current();
        v.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A verifier for a server configuration.
pub(crate) fn verifier(auth: Arc<ClientAuth>) -> Arc<dyn ClientCertVerifier> {
    Arc::new(Reloading(auth))
}

/// Whether `pem` holds a revocation list that parses (before a service replaces its copy).
pub fn is_crl_pem(pem: &[u8]) -> bool {
    rustls_pemfile::crls(&mut &pem[..])
        .filter_map(Result::ok)
        .any(|c| x509_parser::parse_x509_crl(c.as_ref()).is_ok())
}
