//! Certificates: a self-signed one made on first start, and client-side trust by fingerprint
//! or CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;

/// A TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no certificate or key found in PEM")]
    Pem { path: PathBuf },
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("fingerprint {0:?} is not 64 hex digits (SHA-256 of the certificate)")]
    BadFingerprint(String),
}

/// The crypto provider: ring (builds fast, no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, as PEM files on disk.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// SHA-256 of a DER certificate, lowercase hex: what clients pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

/// Loads `DIR/cert.pem` + `DIR/key.pem`, generating a self-signed pair for `names` (and
/// localhost, 127.0.0.1, ::1) when they do not exist. Returns the identity and its fingerprint.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<(Identity, String), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        sans.extend(names.iter().cloned());
        let ck = rcgen::generate_simple_self_signed(sans)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let key_pem = ck.signing_key.serialize_pem();
        write_private(&key_path, key_pem.as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, ck.cert.pem()).map_err(io(&cert_path))?;
    }
    let id = Identity {
        cert_path,
        key_path,
    };
    let certs = load_certs(&id.cert_path)?;
    let fp = fingerprint(&certs[0]);
    Ok((id, fp))
}

/// Writes a file only its owner can read, atomically and durably.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    cairn_types::durable::write_atomic_private(path, data)
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into() });
    }
    Ok(certs)
}

/// The first certificate of a PEM stream, as DER.
pub fn first_cert_der(pem: &mut &[u8]) -> Option<Vec<u8>> {
    rustls_pemfile::certs(pem)
        .filter_map(Result::ok)
        .next()
        .map(|c| c.as_ref().to_vec())
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::Pem { path: path.into() })
}

/// A server configuration from an identity.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with(id, None)
}

/// A server configuration from an identity that, given a client policy, asks callers for
/// certificates (mutual TLS, [`crate::mtls`]).
pub fn server_config_with(
    id: &Identity,
    clients: Option<Arc<crate::mtls::ClientAuth>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(&id.cert_path)?;
    let key = load_key(&id.key_path)?;
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let b = match clients {
        Some(auth) => b.with_client_cert_verifier(crate::mtls::verifier(auth)),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b.with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Checks a fingerprint string.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&clean, &mut out).map_err(|_| TlsError::BadFingerprint(s.to_string()))?;
    Ok(out)
}

/// Trusts exactly one certificate, by SHA-256 of its DER; still checks handshake signatures.
#[derive(Debug)]
struct PinnedVerifier {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} is not the pinned {}",
                hex::encode(got),
                hex::encode(self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that pins a fingerprint; it presents `me` when given.
pub fn client_config_pinned(
    fp: [u8; 32],
    me: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            fingerprint: fp,
            provider,
        }));
    Ok(match me {
        Some(id) => b.with_client_auth_cert(load_certs(&id.cert_path)?, load_key(&id.key_path)?)?,
        None => b.with_no_client_auth(),
    })
}

/// A client configuration that trusts the CA certificates in a PEM file; it presents `me`
/// when given.
pub fn client_config_ca(
    ca: &Path,
    me: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match me {
        Some(id) => b.with_client_auth_cert(load_certs(&id.cert_path)?, load_key(&id.key_path)?)?,
        None => b.with_no_client_auth(),
    })
}
