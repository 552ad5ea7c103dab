//! The certificate authority that gives every service its own identity.
//!
//! It lives in the backup server's state (`STATE/ca/`) and issues each service a certificate
//! whose subject common name is its identity, `ROLE/NAME` (`storage/st1`, `host/h1`,
//! `manager/m`, `vault/v`, `server/s`). Services present it as clients and as servers
//! (mutual TLS, [`crate::mtls`]), so every call between services says who made it.
//!
//! | file | holds | written |
//! |---|---|---|
//! | `ca.pem` | the CA certificate (ECDSA P-256, 10 years) | once |
//! | `ca.key` | its private key (0600) | once |
//! | `book.json` | every certificate issued (serial, identity, fingerprint, validity, revocation) and every join token (SHA-256 of the secret, identity, expiry, use) | under `lock`, atomically |
//! | `crl.pem` | the signed revocation list, rewritten on every revocation | under `lock`, atomically |
//!
//! **Join tokens.** An operator makes one for an identity (`cairn ca join-token`); the secret
//! is shown once, only its SHA-256 is kept. An agent that starts with it sends it with its
//! new public key (`POST /v1/join` on the server, [`JoinRequest`]); the CA marks the token
//! used and signs a certificate for the token's identity — never for a name the caller picks.
//! A used, expired or unknown token is refused and changes nothing. The agent's private key
//! never leaves the agent.
//!
//! **Revocation** adds the certificate's serial to the revocation list. Services re-read the
//! list when it changes and refuse a revoked certificate on its next handshake and its next
//! request on a connection already open.
//!
//! Every change runs under an exclusive lock of `ca/lock`, so `cairn ca` commands and a
//! running server never lose each other's writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::tls::fingerprint;

/// How long a certificate the CA issues is valid unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the CA's own certificate is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a join token is valid unless told otherwise.
pub const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);
/// Roles a certificate may name.
pub const ROLES: &[&str] = &["host", "storage", "manager", "vault", "server", "operator"];

/// A CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("certificate: {0}")]
    Sign(String),
    /// The caller's fault: a bad name, role or key.
    #[error("{0}")]
    Invalid(String),
    /// The join token is unknown, used or expired.
    #[error("join token refused: {0}")]
    Join(String),
    #[error("no certificate matches {0:?}")]
    NotFound(String),
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Sign(e.to_string())
}

/// An identity: `ROLE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceId {
    pub role: String,
    pub name: String,
}

impl ServiceId {
    /// Checks the role against [`ROLES`] and the name (1–64 of letters, digits, `-_.`).
    pub fn new(role: &str, name: &str) -> Result<Self, CaError> {
        if !ROLES.contains(&role) {
            return Err(CaError::Invalid(format!(
                "role {role:?} is none of {}",
                ROLES.join(", ")
            )));
        }
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(CaError::Invalid(format!(
                "name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self {
            role: role.into(),
            name: name.into(),
        })
    }

    /// Parses `ROLE/NAME`.
    pub fn parse(s: &str) -> Result<Self, CaError> {
        let (r, n) = s
            .split_once('/')
            .ok_or_else(|| CaError::Invalid(format!("{s:?} is not ROLE/NAME")))?;
        Self::new(r, n)
    }
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// One certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Hex of the serial number.
    pub serial: String,
    pub id: ServiceId,
    /// SHA-256 of the certificate (what a client pins).
    pub fingerprint: String,
    pub issued_ms: i64,
    pub not_after_ms: i64,
    /// `issue` (by an operator) or `join:<token id>`.
    pub via: String,
    pub revoked_ms: Option<i64>,
}

/// One join token (its secret is never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// A short public id, to list and name it.
    pub id: String,
    pub sha256: String,
    pub identity: ServiceId,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
    /// The serial of the certificate it was exchanged for.
    pub serial: Option<String>,
}

/// The CA's records.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Book {
    pub issued: Vec<IssuedCert>,
    pub joins: Vec<JoinToken>,
    /// The number of the latest revocation list.
    pub crl_number: u64,
}

/// `POST /v1/join`: a join token and the agent's new public key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// The raw public key (an uncompressed P-256 point, 65 bytes), hex.
    pub public_key: String,
    /// Host names and addresses the agent serves on, added to its certificate.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The answer to a join: the certificate, the CA's, and the revocation list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinAnswer {
    pub id: ServiceId,
    pub serial: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub crl_pem: String,
}

/// A key pair and its certificate, both PEM (what `cairn ca issue` writes).
#[derive(Debug)]
pub struct IssuedPair {
    pub cert: IssuedCert,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The certificate authority over its directory.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn at_ms(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn span_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// The CA's subject; rebuilt the same way each time the CA signs, so it matches `ca.pem`.
fn ca_params(ca_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cairn");
    dn.push(DnType::CommonName, format!("Cairn CA {ca_id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

/// An agent's raw P-256 public key, for signing.
struct RawP256(Vec<u8>);

impl PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    b[0] |= 0x10; // positive, and no leading zero byte to strip
    (SerialNumber::from_slice(&b), hex::encode(b))
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

impl Ca {
    /// Opens the CA in `dir`, creating it (key, certificate, empty revocation list) if the
    /// directory has none.
    pub fn open_or_create(dir: &Path) -> Result<Self, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _lock = lock(dir)?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() {
            let key = KeyPair::generate().map_err(sign_err)?;
            let ca_id = hex::encode(rand::random::<[u8; 4]>());
            let mut p = ca_params(&ca_id);
            let now = now_ms();
            p.not_before = at_ms(now - 60_000);
            p.not_after = at_ms(now + span_ms(CA_VALIDITY));
            let cert = p.self_signed(&key).map_err(sign_err)?;
            crate::tls::write_private(&key_path, key.serialize_pem().as_bytes())
                .map_err(io(&key_path))?;
            cairn_types::durable::write_atomic(&cert_path, cert.pem().as_bytes())
                .map_err(io(&cert_path))?;
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            path: key_path.clone(),
            msg: e.to_string(),
        })?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let ca = Self {
            dir: dir.to_path_buf(),
            key,
            cert_pem,
        };
        if !ca.crl_path().exists() {
            let book = ca.book()?;
            ca.write_crl(&book)?;
        }
        Ok(ca)
    }

    /// Whether `dir` holds a CA.
    pub fn exists(dir: &Path) -> bool {
        dir.join("ca.pem").exists() && dir.join("ca.key").exists()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn book_path(&self) -> PathBuf {
        self.dir.join("book.json")
    }

    /// The CA's id, from its certificate's common name.
    fn ca_id(&self) -> Result<String, CaError> {
        let der = crate::tls::first_cert_der(&mut self.cert_pem.as_bytes()).ok_or_else(|| {
            CaError::Corrupt {
                path: self.cert_path(),
                msg: "no certificate".into(),
            }
        })?;
        let cn = crate::mtls::PeerCert::parse(&der)
            .map(|p| p.common_name)
            .unwrap_or_default();
        cn.strip_prefix("Cairn CA ")
            .map(str::to_string)
            .ok_or_else(|| CaError::Corrupt {
                path: self.cert_path(),
                msg: format!("common name {cn:?} is not a Cairn CA's"),
            })
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CaError> {
        Ok(Issuer::new(ca_params(&self.ca_id()?), &self.key))
    }

    /// The records (certificates and join tokens).
    pub fn book(&self) -> Result<Book, CaError> {
        let path = self.book_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CaError::Corrupt {
                path,
                msg: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Book::default()),
            Err(source) => Err(CaError::Io { path, source }),
        }
    }

    fn save(&self, book: &Book) -> Result<(), CaError> {
        let path = self.book_path();
        let json = serde_json::to_vec_pretty(book).expect("the book serializes");
        crate::tls::write_private(&path, &json).map_err(|source| CaError::Io { path, source })
    }

    /// Signs a certificate for `id` over `public_key`; `hosts` become its DNS and IP names.
    fn sign(
        &self,
        id: &ServiceId,
        public_key: &impl PublicKeyData,
        hosts: &[String],
        not_before_ms: i64,
        not_after_ms: i64,
    ) -> Result<(String, String, String), CaError> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for h in hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let mut p = CertificateParams::new(names).map_err(|e| CaError::Invalid(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Cairn");
        dn.push(DnType::CommonName, id.to_string());
        p.distinguished_name = dn;
        p.subject_alt_names
            .retain(|s| !matches!(s, SanType::URI(_)));
        let (serial, serial_hex) = random_serial();
        p.serial_number = Some(serial);
        p.not_before = at_ms(not_before_ms);
        p.not_after = at_ms(not_after_ms);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(public_key, &self.issuer()?).map_err(sign_err)?;
        Ok((serial_hex, fingerprint(cert.der()), cert.pem()))
    }

    /// Issues a certificate and a new key for `id` (an operator's `cairn ca issue`, for
    /// services that do not join). `valid` is (not before, not after) in Unix milliseconds.
    pub fn issue(
        &self,
        id: &ServiceId,
        hosts: &[String],
        valid: Option<(i64, i64)>,
    ) -> Result<IssuedPair, CaError> {
        let key = KeyPair::generate().map_err(sign_err)?;
        let now = now_ms();
        let (from, until) = valid.unwrap_or((now - 60_000, now + span_ms(DEFAULT_VALIDITY)));
        let _lock = lock(&self.dir)?;
        let (serial, fp, cert_pem) = self.sign(id, &key, hosts, from, until)?;
        let cert = IssuedCert {
            serial,
            id: id.clone(),
            fingerprint: fp,
            issued_ms: now,
            not_after_ms: until,
            via: "issue".into(),
            revoked_ms: None,
        };
        let mut book = self.book()?;
        book.issued.push(cert.clone());
        self.save(&book)?;
        Ok(IssuedPair {
            cert,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Makes a single-use join token for `id`, valid for `ttl`; returns the secret (shown
    /// once) and the record.
    pub fn join_token(
        &self,
        id: &ServiceId,
        ttl: Duration,
    ) -> Result<(String, JoinToken), CaError> {
        let secret = format!("cairn-join-{}", hex::encode(rand::random::<[u8; 24]>()));
        let now = now_ms();
        let t = JoinToken {
            id: hex::encode(rand::random::<[u8; 4]>()),
            sha256: sha256_hex(secret.as_bytes()),
            identity: id.clone(),
            created_ms: now,
            expires_ms: now + span_ms(ttl),
            used_ms: None,
            serial: None,
        };
        let _lock = lock(&self.dir)?;
        let mut book = self.book()?;
        book.joins.push(t.clone());
        self.save(&book)?;
        Ok((secret, t))
    }

    /// Exchanges a join token for a certificate, once.
    pub fn join(&self, req: &JoinRequest) -> Result<JoinAnswer, CaError> {
        let raw = hex::decode(req.public_key.trim())
            .map_err(|_| CaError::Invalid("public_key is not hex".into()))?;
        if raw.len() != 65 || raw[0] != 4 {
            return Err(CaError::Invalid(
                "public_key is not an uncompressed P-256 point (65 bytes, 0x04 first)".into(),
            ));
        }
        if req.hosts.len() > 16 || req.hosts.iter().any(|h| h.len() > 253) {
            return Err(CaError::Invalid("at most 16 hosts of 253 bytes".into()));
        }
        let hash = sha256_hex(req.token.trim().as_bytes());
        let now = now_ms();
        let _lock = lock(&self.dir)?;
        let mut book = self.book()?;
        let t = book
            .joins
            .iter_mut()
            .find(|t| crate::access::constant_time_eq(t.sha256.as_bytes(), hash.as_bytes()))
            .ok_or_else(|| CaError::Join("unknown token".into()))?;
        if let Some(used) = t.used_ms {
            return Err(CaError::Join(format!(
                "token {} was already used (at {}, for certificate {})",
                t.id,
                cairn_types::time::rfc3339(u64::try_from(used / 1000).unwrap_or(0)),
                t.serial.as_deref().unwrap_or("?")
            )));
        }
        if t.expires_ms <= now {
            return Err(CaError::Join(format!("token {} has expired", t.id)));
        }
        let id = t.identity.clone();
        let until = now + span_ms(DEFAULT_VALIDITY);
        let (serial, fp, cert_pem) =
            self.sign(&id, &RawP256(raw), &req.hosts, now - 60_000, until)?;
        t.used_ms = Some(now);
        t.serial = Some(serial.clone());
        let via = format!("join:{}", t.id);
        book.issued.push(IssuedCert {
            serial: serial.clone(),
            id: id.clone(),
            fingerprint: fp,
            issued_ms: now,
            not_after_ms: until,
            via,
            revoked_ms: None,
        });
        self.save(&book)?;
        Ok(JoinAnswer {
            id,
            serial,
            cert_pem,
            ca_pem: self.cert_pem.clone(),
            crl_pem: self.crl_pem()?,
        })
    }

    /// Revokes every unrevoked certificate whose serial is `who` or whose identity is
    /// `who` (`ROLE/NAME`); rewrites the revocation list. Returns what it revoked.
    pub fn revoke(&self, who: &str) -> Result<Vec<IssuedCert>, CaError> {
        let _lock = lock(&self.dir)?;
        let mut book = self.book()?;
        let now = now_ms();
        let mut done = Vec::new();
        for c in book.issued.iter_mut() {
            let hit = c.serial.eq_ignore_ascii_case(who) || c.id.to_string() == who;
            if hit && c.revoked_ms.is_none() {
                c.revoked_ms = Some(now);
                done.push(c.clone());
            }
        }
        if done.is_empty() {
            let known = book
                .issued
                .iter()
                .any(|c| c.serial.eq_ignore_ascii_case(who) || c.id.to_string() == who);
            if !known {
                return Err(CaError::NotFound(who.into()));
            }
            return Ok(done);
        }
        book.crl_number += 1;
        self.save(&book)?;
        self.write_crl(&book)?;
        Ok(done)
    }

    /// The current revocation list, PEM.
    pub fn crl_pem(&self) -> Result<String, CaError> {
        let path = self.crl_path();
        std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
    }

    fn write_crl(&self, book: &Book) -> Result<(), CaError> {
        let now = now_ms();
        let mut revoked = Vec::new();
        for c in &book.issued {
            if let Some(at) = c.revoked_ms {
                let bytes = hex::decode(&c.serial).map_err(|_| CaError::Corrupt {
                    path: self.book_path(),
                    msg: format!("serial {:?} is not hex", c.serial),
                })?;
                revoked.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: at_ms(at),
                    reason_code: None,
                    invalidity_date: None,
                });
            }
        }
        let params = CertificateRevocationListParams {
            this_update: at_ms(now - 60_000),
            next_update: at_ms(now + span_ms(CA_VALIDITY)),
            crl_number: SerialNumber::from(book.crl_number.max(1)),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?).map_err(sign_err)?;
        let pem = crl.pem().map_err(sign_err)?;
        let path = self.crl_path();
        cairn_types::durable::write_atomic(&path, pem.as_bytes())
            .map_err(|source| CaError::Io { path, source })
    }
}

/// Holds `DIR/lock` exclusively until dropped.
fn lock(dir: &Path) -> Result<std::fs::File, CaError> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| CaError::Io {
            path: path.clone(),
            source,
        })?;
    f.lock().map_err(|source| CaError::Io { path, source })?;
    Ok(f)
}

/// A new key pair for joining: the private key PEM and the raw public key, hex.
pub fn new_join_key() -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(sign_err)?;
    Ok((key.serialize_pem(), hex::encode(key.public_key_raw())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (tempfile::TempDir, Ca) {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(&d.path().join("ca")).unwrap();
        (d, ca)
    }

    #[test]
    fn identities_are_checked() {
        assert!(ServiceId::parse("storage/st-1.a_b").is_ok());
        for bad in ["storage", "root/x", "storage/", "storage/a b", "host/../x"] {
            assert!(ServiceId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_join_token_gives_one_certificate_for_its_own_identity() {
        let (_d, ca) = ca();
        let id = ServiceId::new("host", "h1").unwrap();
        let (secret, t) = ca.join_token(&id, Duration::from_secs(60)).unwrap();
        let (_, pk) = new_join_key().unwrap();
        let req = JoinRequest {
            token: secret,
            public_key: pk,
            hosts: vec!["h1.example".into()],
        };
        let a = ca.join(&req).unwrap();
        assert_eq!(a.id, id);
        let der = crate::tls::first_cert_der(&mut a.cert_pem.as_bytes()).unwrap();
        let peer = crate::mtls::PeerCert::parse(&der).unwrap();
        assert_eq!(peer.common_name, "host/h1");
        assert_eq!(peer.serial, a.serial);
        let before = std::fs::read(ca.book_path()).unwrap();
        assert!(matches!(ca.join(&req), Err(CaError::Join(m)) if m.contains("already used")));
        assert_eq!(
            std::fs::read(ca.book_path()).unwrap(),
            before,
            "a refusal writes nothing"
        );
        let book = ca.book().unwrap();
        assert_eq!(book.joins[0].id, t.id);
        assert_eq!(book.joins[0].serial.as_deref(), Some(a.serial.as_str()));
        assert!(
            !book.joins[0].sha256.contains(&req.token),
            "only the hash is kept"
        );
        // A malformed key changes nothing.
        let (secret, _) = ca.join_token(&id, Duration::from_secs(60)).unwrap();
        let bad = JoinRequest {
            token: secret.clone(),
            public_key: "04".into(),
            hosts: vec![],
        };
        assert!(matches!(ca.join(&bad), Err(CaError::Invalid(_))));
        assert!(ca.book().unwrap().joins[1].used_ms.is_none());
    }

    #[test]
    fn revocation_lists_the_serial_in_a_signed_list() {
        let (_d, ca) = ca();
        let id = ServiceId::new("storage", "s1").unwrap();
        let a = ca.issue(&id, &[], None).unwrap();
        let b = ca.issue(&id, &[], None).unwrap();
        let done = ca.revoke("storage/s1").unwrap();
        assert_eq!(done.len(), 2);
        assert!(ca.revoke(&a.cert.serial).unwrap().is_empty(), "already");
        assert!(matches!(
            ca.revoke("storage/none"),
            Err(CaError::NotFound(_))
        ));
        let auth =
            crate::mtls::ClientAuth::new(&ca.cert_path(), Some(&ca.crl_path()), false).unwrap();
        assert!(auth.is_revoked(&a.cert.serial) && auth.is_revoked(&b.cert.serial));
        let c = ca.issue(&id, &[], None).unwrap();
        assert!(!auth.is_revoked(&c.cert.serial));
        ca.revoke(&c.cert.serial).unwrap();
        assert!(
            auth.is_revoked(&c.cert.serial),
            "the list is read again when it changes"
        );
    }
}
