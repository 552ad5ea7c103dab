//! A blocking client for Cairn services: base URL, bearer token, TLS trust, JSON errors.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::tls;

/// How the client trusts the server's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// SHA-256 of the server certificate, hex.
    Fingerprint(String),
    /// A PEM file of CA certificates.
    Ca(PathBuf),
}

impl Trust {
    /// From `CAIRN_FINGERPRINT` or `CAIRN_CA`.
    pub fn from_env() -> Option<Self> {
        if let Ok(f) = std::env::var("CAIRN_FINGERPRINT")
            && !f.is_empty()
        {
            return Some(Self::Fingerprint(f));
        }
        std::env::var("CAIRN_CA")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|p| Self::Ca(p.into()))
    }
}

/// A request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error.
    #[error("{url}: {status} {}: {}", .api.kind.as_str(), .api.message)]
    Api {
        url: String,
        status: u16,
        api: ApiError,
    },
    /// The request did not get an answer (connection, TLS, timeout).
    #[error("{url}: {msg}")]
    Transport { url: String, msg: String },
    #[error("{url}: bad response: {msg}")]
    Decode { url: String, msg: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl ClientError {
    /// The service's error kind, if it answered.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Api { api, .. } => Some(api.kind),
            _ => None,
        }
    }
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::InsufficientStorage => "insufficient_storage",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        }
    }
}

/// The certificate every [`Client`] of this process presents, once set.
static DEFAULT_IDENTITY: std::sync::OnceLock<tls::Identity> = std::sync::OnceLock::new();

/// Makes `id` the certificate every client made afterwards presents (mutual TLS). A service
/// process has one identity, given once at start; a second call changes nothing and returns
/// `false`.
pub fn present_by_default(id: tls::Identity) -> bool {
    DEFAULT_IDENTITY.set(id).is_ok()
}

/// An answer's body and its `x-cairn-*` headers (name, value).
pub type BytesAndHeaders = (Vec<u8>, Vec<(String, String)>);

/// A connection pool to one service.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// `base` is `https://host:port`. The client presents the process's identity
    /// ([`present_by_default`]) when it has one.
    pub fn new(base: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        Self::with_identity(base, token, trust, DEFAULT_IDENTITY.get())
    }

    /// As [`new`](Self::new), presenting `me` (mutual TLS) instead of the process default.
    pub fn with_identity(
        base: &str,
        token: &str,
        trust: &Trust,
        me: Option<&tls::Identity>,
    ) -> Result<Self, ClientError> {
        let cfg = match trust {
            Trust::Fingerprint(fp) => tls::client_config_pinned(tls::parse_fingerprint(fp)?, me)?,
            Trust::Ca(p) => tls::client_config_ca(p, me)?,
        };
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(cfg))
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(300))
            .timeout_write(Duration::from_secs(300))
            .max_idle_connections_per_host(16)
            .build();
        Ok(Self {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn call(&self, req: ureq::Request, body: Option<&[u8]>) -> Result<ureq::Response, ClientError> {
        let url = req.url().to_string();
        let req = req.set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                let api = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| {
                        ApiError::new(
                            ErrorKind::Unknown,
                            text.chars().take(300).collect::<String>(),
                        )
                    });
                Err(ClientError::Api { url, status, api })
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Transport {
                url,
                msg: t.to_string(),
            }),
        }
    }

    /// GET returning JSON.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.call(self.agent.get(&self.url(path)), None)?;
        decode_json(&self.url(path), r)
    }

    /// GET returning raw bytes.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let url = self.url(path);
        let r = self.call(self.agent.get(&url), None)?;
        read_body(&url, r)
    }

    /// GET returning a streaming reader.
    pub fn get_reader(&self, path: &str) -> Result<Box<dyn Read + Send + Sync>, ClientError> {
        let r = self.call(self.agent.get(&self.url(path)), None)?;
        Ok(r.into_reader())
    }

    /// POST a JSON body, JSON answer.
    pub fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send_json("POST", path, body)
    }

    /// POST a JSON body; the answer's bytes and its `x-cairn-*` headers.
    pub fn post_json_for_bytes<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<BytesAndHeaders, ClientError> {
        let url = self.url(path);
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            url: url.clone(),
            msg: e.to_string(),
        })?;
        let r = self.call(
            self.agent
                .post(&url)
                .set("Content-Type", "application/json"),
            Some(&bytes),
        )?;
        with_headers(&url, r)
    }

    /// GET; the answer's bytes and its `x-cairn-*` headers.
    pub fn get_for_bytes(&self, path: &str) -> Result<BytesAndHeaders, ClientError> {
        let url = self.url(path);
        let r = self.call(self.agent.get(&url), None)?;
        with_headers(&url, r)
    }

    /// PUT a JSON body, JSON answer.
    pub fn put_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send_json("PUT", path, body)
    }

    fn send_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            url: url.clone(),
            msg: e.to_string(),
        })?;
        let r = self.call(
            self.agent
                .request(method, &url)
                .set("Content-Type", "application/json"),
            Some(&bytes),
        )?;
        decode_json(&url, r)
    }

    /// POST raw bytes, JSON answer.
    pub fn post_bytes<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let r = self.call(
            self.agent
                .post(&url)
                .set("Content-Type", "application/octet-stream"),
            Some(body),
        )?;
        decode_json(&url, r)
    }

    /// POST raw bytes, raw answer.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        let url = self.url(path);
        let r = self.call(
            self.agent
                .post(&url)
                .set("Content-Type", "application/octet-stream"),
            Some(body),
        )?;
        read_body(&url, r)
    }

    /// DELETE, JSON answer.
    pub fn delete_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let r = self.call(self.agent.delete(&url), None)?;
        decode_json(&url, r)
    }
}

fn read_body(url: &str, r: ureq::Response) -> Result<Vec<u8>, ClientError> {
    read_limited(url, r, 1 << 31)
}

/// The body (up to 8 GiB) and the `x-cairn-*` headers of an answer.
fn with_headers(url: &str, r: ureq::Response) -> Result<BytesAndHeaders, ClientError> {
    let headers = r
        .headers_names()
        .into_iter()
        .filter(|h| h.starts_with("x-cairn-"))
        .filter_map(|h| r.header(&h).map(|v| (h.clone(), v.to_string())))
        .collect();
    Ok((read_limited(url, r, 1 << 33)?, headers))
}

fn read_limited(url: &str, r: ureq::Response, limit: u64) -> Result<Vec<u8>, ClientError> {
    let mut v = Vec::new();
    r.into_reader()
        .take(limit)
        .read_to_end(&mut v)
        .map_err(|e| ClientError::Transport {
            url: url.to_string(),
            msg: e.to_string(),
        })?;
    Ok(v)
}

fn decode_json<T: serde::de::DeserializeOwned>(
    url: &str,
    r: ureq::Response,
) -> Result<T, ClientError> {
    let text = read_limited(url, r, 256 << 20)?;
    serde_json::from_slice(&text).map_err(|e| ClientError::Decode {
        url: url.to_string(),
        msg: e.to_string(),
    })
}
