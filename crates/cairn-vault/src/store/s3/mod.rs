//! An [`ObjectStore`] on an S3-compatible object store (AWS S3, Garage, Ceph RGW, ...).
//!
//! Objects live under `s3://BUCKET/PREFIX/`, addressed path-style (`ENDPOINT/BUCKET/KEY`),
//! every request signed with SigV4 ([`sign`]). The store speaks plain blocking HTTP through the
//! workspace's `ureq` agent: the [`ObjectStore`] trait is synchronous, so there is no runtime
//! to bridge, and the few calls beyond object I/O that matter here (bucket settings) are plain
//! requests too.
//!
//! # What the server really does
//!
//! [`S3Store::open`] checks that the bucket exists and is ours to write, then probes (and
//! reports in [`S3Store::probe`]):
//!
//! - **create-only writes** (`If-None-Match: *`): written twice under a fresh name. Servers
//!   that ignore the header (Garage does) get `exclusive_create: false`; `put_new` then checks
//!   for the key first (a race between two writers of the same new key stays possible there).
//!   The vault never depends on it: objects it writes once have unique names (random container,
//!   snapshot, key and lock ids), and the config is written once by `init`.
//! - **versioning**: on a versioned bucket a delete leaves the old version behind; the vault
//!   still works, but space comes back only through the bucket's lifecycle rules (reported).
//! - **object lock**: reported; `protect` does not set S3 retention yet (see docs/SECURITY.md).
//!
//! # Failures
//!
//! Throttling (`503 SlowDown`, 429), server errors (500, 502, 504) and transport failures
//! (refused, reset, timed out) are retried with exponential backoff and jitter, up to
//! [`MAX_ATTEMPTS`]; what still fails is a [`StoreErrorKind::Transient`] error naming the
//! attempts. A body shorter than announced, or a range answered with other bytes than asked,
//! is an error, never a short read. A missing bucket and denied access are reported as such.

pub mod sign;
mod xml;

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Capabilities, Key, ObjectMeta, ObjectStore, StoreError, StoreErrorKind};
pub use sign::Credentials;

/// Attempts per request before a transient failure is reported.
pub const MAX_ATTEMPTS: u32 = 6;
/// First backoff; doubles each attempt, with up to 50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle connections kept per host (parallel uploads and reads each hold one).
const POOL_PER_HOST: usize = 16;
/// The hint a 416 answer carries (a range past the end).
const RANGE_NOT_SATISFIABLE: &str = " (range past the end)";
/// Where the create-only probe writes (removed again at once).
const PROBE_PREFIX: &str = ".cairn-probe";

/// Where the bucket is and who we are: from flags or the usual `AWS_*` variables.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`; may be empty.
    pub prefix: String,
    pub credentials: Credentials,
    /// PEM file of the CA that signed an `https` endpoint's certificate (default: the
    /// system's bundle).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Whether a repository argument names an S3 location.
pub fn is_s3_url(s: &str) -> bool {
    s.starts_with("s3://")
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix).
pub fn parse_url(url: &str) -> Result<(String, String), StoreError> {
    let bad = |m: &str| StoreError::new(StoreErrorKind::InvalidKey, url, m.to_string());
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("an S3 location is s3://BUCKET[/PREFIX]"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok_bucket {
        return Err(bad(
            "bucket names are 3–63 characters of a-z, 0-9, '-' and '.'",
        ));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if !prefix.is_empty() {
        Key::new(prefix.clone())?;
    }
    Ok((bucket.to_string(), prefix))
}

/// What [`S3Store::open`] found the server to do.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct S3Probe {
    /// `If-None-Match: *` refuses to overwrite.
    pub exclusive_create: bool,
    /// The bucket's versioning status (`Enabled`, `Suspended`), if any.
    pub versioning: Option<String>,
    /// The bucket has object lock enabled.
    pub object_lock: bool,
}

/// Objects in one S3 bucket under one prefix. See the module docs.
pub struct S3Store {
    agent: ureq::Agent,
    cfg: S3Config,
    /// `host[:port]` as sent in the `Host` header and signed.
    host: String,
    /// Endpoint without a trailing `/`.
    base: String,
    /// The prefix with a trailing `/`, or empty: what every key of ours starts with.
    root: String,
    probe: S3Probe,
    /// Requests sent (each attempt counts), by method; LIST counts as GET.
    sent: RequestCounts,
}

/// Requests an [`S3Store`] sent, by method (reported when the store is dropped, at `info`,
/// for benchmarks: `CAIRN_LOG=cairn_vault::store::s3=info`).
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub head: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let c = &self.sent;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        tracing::info!(
            "S3 requests to {}: GET {} PUT {} HEAD {} DELETE {}; {} bytes up, {} down",
            self.location(),
            n(&c.get),
            n(&c.put),
            n(&c.head),
            n(&c.delete),
            n(&c.bytes_up),
            n(&c.bytes_down)
        );
    }
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location())
            .field("probe", &self.probe)
            .finish()
    }
}

/// An answer: status, headers we read, body.
struct Answer {
    status: u16,
    content_length: Option<u64>,
    body: Vec<u8>,
}

impl S3Store {
    /// Connects, checks the bucket and probes what the server does (module docs).
    pub fn open(cfg: S3Config) -> Result<Self, StoreError> {
        let mut store = Self::connect(cfg)?;
        store.probe = store.run_probe()?;
        Ok(store)
    }

    /// The client without the probe (assumes the least: no create-only writes).
    fn connect(cfg: S3Config) -> Result<Self, StoreError> {
        let err = |m: String| StoreError::new(StoreErrorKind::Other, &cfg.endpoint, m);
        let url =
            url::Url::parse(&cfg.endpoint).map_err(|e| err(format!("not an endpoint URL: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| err("the endpoint has no host".into()))?;
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            .max_idle_connections_per_host(POOL_PER_HOST)
            .redirects(0);
        match url.scheme() {
            "http" => {}
            "https" => {
                let ca = cfg
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                let tls = cairn_http::tls::client_config_ca(&ca, None)
                    .map_err(|e| err(format!("TLS trust from {}: {e}", ca.display())))?;
                builder = builder.tls_config(std::sync::Arc::new(tls));
            }
            s => return Err(err(format!("unsupported endpoint scheme {s}"))),
        }
        let store = Self {
            agent: builder.build(),
            base: cfg.endpoint.trim_end_matches('/').to_string(),
            root: if cfg.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", cfg.prefix)
            },
            cfg,
            host,
            probe: S3Probe {
                exclusive_create: false,
                versioning: None,
                object_lock: false,
            },
            sent: RequestCounts::default(),
        };
        Ok(store)
    }

    /// What the server was found to do.
    pub fn probe(&self) -> &S3Probe {
        &self.probe
    }

    fn run_probe(&self) -> Result<S3Probe, StoreError> {
        // The bucket: exists, and we may list it.
        self.request(
            "GET",
            None,
            &[("list-type", "2"), ("max-keys", "1")],
            &[],
            b"",
        )?;
        let key = Key::new(format!("{PROBE_PREFIX}/{:016x}", rand::random::<u64>()))?;
        let create = [("if-none-match", "*")];
        self.request("PUT", Some(&key), &[], &create, b"1")?;
        let exclusive_create = match self.request("PUT", Some(&key), &[], &create, b"2") {
            Err(e) if e.kind == StoreErrorKind::AlreadyExists => true,
            Ok(_) => false,
            // 501 NotImplemented and the like: the server cannot do it.
            Err(e) if e.kind == StoreErrorKind::Other => false,
            Err(e) => return Err(e),
        };
        self.request("DELETE", Some(&key), &[], &[], b"")?;
        let versioning = self
            .request("GET", None, &[("versioning", "")], &[], b"")
            .ok()
            .and_then(|a| xml::first(&String::from_utf8_lossy(&a.body), "Status"));
        let object_lock = self
            .request("GET", None, &[("object-lock", "")], &[], b"")
            .ok()
            .and_then(|a| xml::first(&String::from_utf8_lossy(&a.body), "ObjectLockEnabled"))
            .is_some_and(|s| s == "Enabled");
        if versioning.as_deref() == Some("Enabled") {
            tracing::warn!(
                "{}: versioning is on: deleted objects keep their old versions, so space \
                 comes back only through the bucket's lifecycle rules",
                self.location()
            );
        }
        Ok(S3Probe {
            exclusive_create,
            versioning,
            object_lock,
        })
    }

    fn object_path(&self, key: Option<&str>) -> String {
        match key {
            None => format!("/{}", self.cfg.bucket),
            Some(k) => format!(
                "/{}/{}",
                self.cfg.bucket,
                sign::uri_encode(&format!("{}{k}", self.root), true)
            ),
        }
    }

    /// One signed request, retried while the failure is transient.
    fn request(
        &self,
        method: &str,
        key: Option<&Key>,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, StoreError> {
        let name = key.map(Key::as_str).unwrap_or("");
        let path = self.object_path(key.map(Key::as_str));
        let hash = sign::payload_hash(body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(method, &path, query, headers, body, &hash, name) {
                Err(e) if e.kind == StoreErrorKind::Transient && attempt < MAX_ATTEMPTS => {
                    let wait = BACKOFF_FIRST
                        .saturating_mul(1 << (attempt - 1))
                        .min(BACKOFF_MAX);
                    let jitter = wait.mul_f64(rand::random::<f64>() * 0.5);
                    tracing::debug!("{method} {name}: {e}; retrying in {:?}", wait + jitter);
                    std::thread::sleep(wait + jitter);
                }
                Err(mut e) if e.kind == StoreErrorKind::Transient => {
                    e.msg = format!("{} (after {attempt} attempts)", e.msg);
                    return Err(e);
                }
                r => return r,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
        hash: &str,
        name: &str,
    ) -> Result<Answer, StoreError> {
        let date = sign::amz_date(crate::manifest::now().cast_signed());
        let signed = sign::sign(
            &sign::Request {
                method,
                path,
                query,
                host: &self.host,
                headers,
                payload_hash: hash,
            },
            &self.cfg.credentials,
            &self.cfg.region,
            &date,
        );
        let q = sign::canonical_query(query);
        let url = if q.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{q}", self.base)
        };
        let mut req = self.agent.request(method, &url).set("host", &self.host);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        for (k, v) in &signed {
            req = req.set(k, v);
        }
        let what = format!("S3 {method}");
        let name = &self.display_key(name);
        let counter = match method {
            "PUT" => &self.sent.put,
            "HEAD" => &self.sent.head,
            "DELETE" => &self.sent.delete,
            _ => &self.sent.get,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.sent
            .bytes_up
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let resp = if method == "PUT" {
            req.send_bytes(body)
        } else {
            req.call()
        };
        match resp {
            Ok(r) => read_answer(r, method, name, &what).inspect(|a| {
                self.sent
                    .bytes_down
                    .fetch_add(a.body.len() as u64, Ordering::Relaxed);
            }),
            Err(ureq::Error::Status(status, r)) => {
                let a = read_answer(r, method, name, &what).unwrap_or(Answer {
                    status,
                    content_length: None,
                    body: Vec::new(),
                });
                Err(status_error(status, &a.body, name, &what, method))
            }
            Err(ureq::Error::Transport(t)) => {
                // The kind and the cause, without the URL (the key names the object).
                let mut m = format!("{what}: {}", t.kind());
                if let Some(msg) = t.message() {
                    m.push_str(&format!(": {msg}"));
                }
                if let Some(src) = std::error::Error::source(&t) {
                    m.push_str(&format!(": {src}"));
                }
                Err(StoreError::new(StoreErrorKind::Transient, name, m))
            }
        }
    }

    /// `s3://BUCKET/PREFIX/NAME`, for messages.
    fn display_key(&self, name: &str) -> String {
        format!("s3://{}/{}{name}", self.cfg.bucket, self.root)
            .trim_end_matches('/')
            .to_string()
    }
}

fn read_answer(
    r: ureq::Response,
    method: &str,
    name: &str,
    what: &str,
) -> Result<Answer, StoreError> {
    let status = r.status();
    let content_length = r.header("content-length").and_then(|v| v.parse().ok());
    let mut body = Vec::new();
    if method != "HEAD" {
        let cap = content_length.unwrap_or(0).min(64 << 20) as usize;
        body.reserve_exact(cap);
        r.into_reader().read_to_end(&mut body).map_err(|e| {
            StoreError::new(
                StoreErrorKind::Transient,
                name,
                format!("{what}: reading the answer: {e}"),
            )
        })?;
        if let Some(n) = content_length
            && body.len() as u64 != n
        {
            return Err(StoreError::new(
                StoreErrorKind::Transient,
                name,
                format!("{what}: {} bytes where {n} were announced", body.len()),
            ));
        }
    }
    Ok(Answer {
        status,
        content_length,
        body,
    })
}

/// Maps an S3 error answer to a kind and a message that says what to do.
fn status_error(status: u16, body: &[u8], name: &str, what: &str, method: &str) -> StoreError {
    let text = String::from_utf8_lossy(body);
    let code = xml::first(&text, "Code").unwrap_or_default();
    let message = xml::first(&text, "Message").unwrap_or_default();
    let detail = match (code.is_empty(), message.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => format!("HTTP {status} {code}"),
        (false, false) => format!("HTTP {status} {code}: {message}"),
    };
    let (kind, hint) = match (status, code.as_str()) {
        (_, "NoSuchBucket") => (StoreErrorKind::Other, " (the bucket does not exist)"),
        (404, _) if method == "HEAD" || !name.is_empty() => (StoreErrorKind::NotFound, ""),
        (403, _) => (
            StoreErrorKind::Other,
            " (access denied: check the credentials and the bucket's permissions)",
        ),
        (412, _) => (StoreErrorKind::AlreadyExists, ""),
        (416, _) => (StoreErrorKind::Other, RANGE_NOT_SATISFIABLE),
        (409, _) | (429, _) | (500, _) | (502, _) | (503, _) | (504, _) => {
            (StoreErrorKind::Transient, "")
        }
        (301, _) | (307, _) => (
            StoreErrorKind::Other,
            " (the bucket is elsewhere: check the endpoint and the region)",
        ),
        (507, _) | (_, "QuotaExceeded") => (StoreErrorKind::NoSpace, ""),
        _ => (StoreErrorKind::Other, ""),
    };
    StoreError::new(kind, name, format!("{what}: {detail}{hint}"))
}

impl ObjectStore for S3Store {
    fn put(&self, key: &Key, data: &[u8]) -> Result<(), StoreError> {
        self.request("PUT", Some(key), &[], &[], data).map(drop)
    }

    fn put_new(&self, key: &Key, data: &[u8]) -> Result<(), StoreError> {
        if !self.probe.exclusive_create {
            match self.size(key) {
                Ok(_) => {
                    return Err(StoreError::new(
                        StoreErrorKind::AlreadyExists,
                        key.as_str(),
                        "already exists",
                    ));
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        self.request("PUT", Some(key), &[], &[("if-none-match", "*")], data)
            .map(drop)
            .map_err(|mut e| {
                if e.kind == StoreErrorKind::AlreadyExists {
                    e.msg = "already exists".into();
                }
                e
            })
    }

    fn get(&self, key: &Key) -> Result<Vec<u8>, StoreError> {
        Ok(self.request("GET", Some(key), &[], &[], b"")?.body)
    }

    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let past_end = |size: u64| {
            StoreError::new(
                StoreErrorKind::Other,
                key.as_str(),
                format!("range {offset}+{len} past the end ({size} bytes)"),
            )
        };
        if len == 0 {
            let size = self.size(key)?;
            return if offset <= size {
                Ok(Vec::new())
            } else {
                Err(past_end(size))
            };
        }
        let end = offset
            .checked_add(len - 1)
            .ok_or_else(|| past_end(u64::MAX))?;
        let range = format!("bytes={offset}-{end}");
        let a = match self.request("GET", Some(key), &[], &[("range", &range)], b"") {
            Err(e) if e.msg.contains(RANGE_NOT_SATISFIABLE) => {
                return Err(past_end(self.size(key)?));
            }
            r => r?,
        };
        let body = match a.status {
            206 => a.body,
            // A server that ignores ranges sends the whole object.
            200 => {
                let size = a.body.len() as u64;
                if end >= size {
                    return Err(past_end(size));
                }
                let (Ok(from), Ok(to)) = (usize::try_from(offset), usize::try_from(end)) else {
                    return Err(past_end(size));
                };
                a.body[from..=to].to_vec()
            }
            s => {
                return Err(StoreError::new(
                    StoreErrorKind::Other,
                    key.as_str(),
                    format!("range read answered with HTTP {s}"),
                ));
            }
        };
        if body.len() as u64 != len {
            // S3 answers a range that runs past the end with what there is.
            return Err(StoreError::new(
                StoreErrorKind::Other,
                key.as_str(),
                format!(
                    "range {offset}+{len}: {} bytes came back (past the end, or a short read)",
                    body.len()
                ),
            ));
        }
        Ok(body)
    }

    fn size(&self, key: &Key) -> Result<u64, StoreError> {
        let a = self.request("HEAD", Some(key), &[], &[], b"")?;
        a.content_length.ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Other,
                key.as_str(),
                "HEAD answered without a Content-Length",
            )
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let rel = prefix.trim_matches('/');
        let mut full = self.root.clone();
        if !rel.is_empty() {
            full.push_str(rel);
            full.push('/');
        }
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![("list-type", "2"), ("prefix", full.as_str())];
            if let Some(t) = &token {
                q.push(("continuation-token", t.as_str()));
            }
            let a = self.request("GET", None, &q, &[], b"")?;
            let text = String::from_utf8_lossy(&a.body);
            let (items, next) = xml::list_page(&text).map_err(|m| {
                StoreError::new(StoreErrorKind::Other, prefix, format!("S3 list: {m}"))
            })?;
            for (k, size, modified) in items {
                let Some(rel) = k.strip_prefix(&self.root) else {
                    continue;
                };
                if rel.starts_with(PROBE_PREFIX) {
                    continue;
                }
                // Keys written by others that are not ours to name are skipped.
                if let Ok(key) = Key::new(rel) {
                    out.push(ObjectMeta {
                        key,
                        size,
                        modified,
                    });
                }
            }
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    fn delete(&self, key: &Key) -> Result<(), StoreError> {
        match self.request("DELETE", Some(key), &[], &[], b"") {
            Err(e) if e.is_not_found() => Ok(()),
            r => r.map(drop),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exclusive_create: self.probe.exclusive_create,
            local: false,
        }
    }

    fn location(&self) -> String {
        format!("{} at {}", self.display_key(""), self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://my-bucket/some/prefix/").unwrap(),
            ("my-bucket".into(), "some/prefix".into())
        );
        assert_eq!(
            parse_url("s3://bkt").unwrap(),
            ("bkt".into(), String::new())
        );
        for bad in ["s3://B/x", "s3://a", "file:///x", "s3://ok-bucket/../x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    /// A peer that answers `503 SlowDown` twice and then the object: the store retries
    /// through the throttling (a fake in a unit test; the real servers here never throttle).
    #[test]
    fn throttling_is_retried() {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let peer = std::thread::spawn(move || {
            let mut seen = 0;
            for conn in l.incoming().take(3) {
                let mut c = conn.unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                seen += 1;
                let (status, body) = if seen < 3 {
                    ("503 Slow Down", "<Error><Code>SlowDown</Code></Error>")
                } else {
                    ("200 OK", "hello")
                };
                write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        let s = S3Store::connect(S3Config {
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "us-east-1".into(),
            bucket: "bkt".into(),
            prefix: String::new(),
            credentials: Credentials {
                access_key: "a".into(),
                secret_key: "s".into(),
            },
            ca_file: None,
        })
        .unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(s.get(&Key::new("k").unwrap()).unwrap(), b"hello");
        assert!(
            t0.elapsed() >= BACKOFF_FIRST * 3,
            "it backed off between attempts"
        );
        assert_eq!(peer.join().unwrap(), 3);
        assert_eq!(s.sent.get.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = status_error(
            404,
            b"<Error><Code>NoSuchBucket</Code><Message>m</Message></Error>",
            "",
            "S3 GET s3://x",
            "GET",
        );
        assert_eq!(e.kind, StoreErrorKind::Other);
        assert!(e.msg.contains("does not exist"), "{}", e.msg);
        let e = status_error(404, b"", "k", "S3 HEAD k", "HEAD");
        assert_eq!(e.kind, StoreErrorKind::NotFound);
        let e = status_error(
            503,
            b"<Error><Code>SlowDown</Code></Error>",
            "k",
            "w",
            "PUT",
        );
        assert_eq!(e.kind, StoreErrorKind::Transient);
        assert!(
            status_error(403, b"", "k", "w", "GET")
                .msg
                .contains("access denied")
        );
    }
}
