//! Request bodies read as they stream, never whole before they are checked.
//!
//! | bound | what | error |
//! |---|---|---|
//! | per request | `limit`: a `Content-Length` over it is refused before a byte is read, and so is a chunked body the moment it passes it | `413` |
//! | in total | a [`BodyBudget`] of bytes that every request of a service shares: a handler reserves what it is about to hold before reading it, and the reservation ends when the handler drops it | `503` when it cannot be had within the budget's wait |
//! | in time | no data for `idle` (a stalled or vanished peer) | `400` |
//!
//! A handler that refuses a body before its end can [`BodyStream::drain`] the rest beside its
//! answer (discarded as it arrives, bounded in bytes and time) so that the client, which
//! writes its whole body before it reads the answer, gets the error instead of a reset
//! connection.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ApiError, ErrorKind};

/// Reading a request body failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body over the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("request body stalled: no data for {} s", .idle.as_secs())]
    Stalled { idle: Duration },
    #[error("request body ended after {got} bytes, {wanted} more were expected")]
    Truncated { got: u64, wanted: u64 },
    #[error("service busy: no room for {bytes} more request bytes within {} s", .wait.as_secs())]
    Busy { bytes: u64, wait: Duration },
    #[error("reading the request body")]
    Read(#[source] axum::Error),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let kind = match e {
            BodyError::TooLarge { .. } => ErrorKind::TooLarge,
            BodyError::Busy { .. } => ErrorKind::Unavailable,
            _ => ErrorKind::BadRequest,
        };
        ApiError::new(kind, crate::chain(&e))
    }
}

/// The request-body bytes a service may hold at once, shared by all its connections.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    sem: Arc<Semaphore>,
    total: usize,
    wait: Duration,
}

/// Budget reserved by one request; returned when dropped. The default holds nothing.
#[derive(Debug, Default)]
pub struct Reservation {
    permits: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permits.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Takes over what `other` holds.
    pub fn merge(&mut self, other: Reservation) {
        match (&mut self.permits, other.permits) {
            (Some(have), Some(p)) => have.merge(p),
            (have @ None, p) => *have = p,
            (Some(_), None) => {}
        }
    }
}

impl BodyBudget {
    /// `total` bytes; a reservation waits at most `wait` for room.
    pub fn new(total: usize, wait: Duration) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        Self {
            sem: Arc::new(Semaphore::new(total)),
            total,
            wait,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Reserves `bytes` (at most the whole budget: one request may always proceed alone).
    /// Waits in turn (first come, first served) up to the budget's wait.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, BodyError> {
        let n = bytes.min(self.total);
        if n == 0 {
            return Ok(Reservation { permits: None });
        }
        match tokio::time::timeout(self.wait, self.sem.clone().acquire_many_owned(n as u32)).await {
            Ok(Ok(p)) => Ok(Reservation { permits: Some(p) }),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(BodyError::Busy {
                bytes: bytes as u64,
                wait: self.wait,
            }),
        }
    }

    /// Adds `bytes` to `r`, waiting like [`reserve`](Self::reserve).
    pub async fn grow(&self, r: &mut Reservation, bytes: usize) -> Result<(), BodyError> {
        let more = self.reserve(bytes.min(self.total - r.bytes())).await?;
        r.merge(more);
        Ok(())
    }
}

/// A request body read chunk by chunk, within a byte limit and an idle timeout.
pub struct BodyStream {
    body: Body,
    /// Received and not yet consumed.
    pending: Bytes,
    received: u64,
    limit: u64,
    idle: Duration,
    declared: Option<u64>,
    on_data: Option<Box<dyn FnMut() + Send>>,
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStream")
            .field("received", &self.received)
            .field("limit", &self.limit)
            .finish()
    }
}

impl BodyStream {
    /// The body of `req`, read up to `limit` bytes; one whose `Content-Length` is over the
    /// limit is refused by the first read, before a byte is taken.
    pub fn new(req: Request, limit: u64, idle: Duration) -> Self {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Self {
            body: req.into_body(),
            pending: Bytes::new(),
            received: 0,
            limit,
            idle,
            declared,
            on_data: None,
        }
    }

    /// Calls `f` whenever data arrives (a lease renewed while a long body streams in).
    pub fn on_data(&mut self, f: impl FnMut() + Send + 'static) {
        self.on_data = Some(Box::new(f));
    }

    /// The declared `Content-Length`, if any.
    pub fn declared_len(&self) -> Option<u64> {
        self.declared
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if self.declared.is_some_and(|n| n > self.limit) {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        let Some(data) = self.next_data().await? else {
            return Ok(None);
        };
        if self.received > self.limit {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        if let Some(f) = &mut self.on_data {
            f();
        }
        Ok(Some(data))
    }

    /// The next data frame from the connection, counted, within the idle timeout.
    async fn next_data(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx));
            let frame = match tokio::time::timeout(self.idle, frame).await {
                Err(_) => return Err(BodyError::Stalled { idle: self.idle }),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(BodyError::Read(e)),
                Ok(Some(Ok(f))) => f,
            };
            // Trailers carry nothing a handler reads.
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                self.received += data.len() as u64;
                return Ok(Some(data));
            }
        }
    }

    /// True at the end of the body.
    pub async fn at_end(&mut self) -> Result<bool, BodyError> {
        match self.chunk().await? {
            None => Ok(true),
            Some(b) => {
                self.pending = b;
                Ok(false)
            }
        }
    }

    /// Exactly `n` more bytes (the caller has reserved room for them).
    pub async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(mut b) = self.chunk().await? else {
                return Err(BodyError::Truncated {
                    got: self.received,
                    wanted: (n - out.len()) as u64,
                });
            };
            let take = b.len().min(n - out.len());
            out.extend_from_slice(&b.split_to(take));
            self.pending = b;
        }
        Ok(out)
    }

    /// The whole body, after reserving room for it in `budget` (its declared length, or the
    /// limit when it declares none). The reservation is the caller's to hold while it uses
    /// the bytes.
    pub async fn to_vec(
        &mut self,
        budget: &BodyBudget,
    ) -> Result<(Vec<u8>, Reservation), BodyError> {
        if self.declared.is_some_and(|n| n > self.limit) {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        let want = self.declared.unwrap_or(self.limit);
        let r = budget.reserve(want as usize).await?;
        let mut out = Vec::with_capacity(want.min(1 << 20) as usize);
        while let Some(b) = self.chunk().await? {
            if (out.len() + b.len()) as u64 > want {
                // hyper holds a body to its declared length; this only guards the reservation.
                return Err(BodyError::TooLarge { limit: self.limit });
            }
            out.extend_from_slice(&b);
        }
        Ok((out, r))
    }

    /// Reads and discards the rest of the body, up to `max_bytes` in all and for at most
    /// `max_time` (and within the idle timeout), then drops it. Spawned beside an error
    /// answer, it lets a client that writes its whole body before it reads get the answer
    /// rather than a reset connection (as a web server's lingering close does).
    pub async fn drain(mut self, max_bytes: u64, max_time: Duration) {
        self.pending = Bytes::new();
        self.on_data = None;
        let _ = tokio::time::timeout(max_time, async {
            while self.received <= max_bytes {
                match self.next_data().await {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: impl Into<Body>, len: Option<u64>) -> Request {
        let mut b = axum::http::Request::builder().method("POST").uri("/x");
        if let Some(n) = len {
            b = b.header(CONTENT_LENGTH, n);
        }
        b.body(body.into()).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_reading() {
        rt().block_on(async {
            let mut s = BodyStream::new(req(vec![0u8; 10], Some(10)), 9, Duration::from_secs(1));
            let e = s.chunk().await.unwrap_err();
            assert!(matches!(e, BodyError::TooLarge { limit: 9 }), "{e}");
            assert_eq!(s.received(), 0);
            assert_eq!(ApiError::from(e).kind, ErrorKind::TooLarge);
        });
    }

    #[test]
    fn an_undeclared_body_is_cut_at_the_limit() {
        rt().block_on(async {
            let budget = BodyBudget::new(100, Duration::from_millis(10));
            let mut s = BodyStream::new(req(vec![1u8; 50], None), 20, Duration::from_secs(1));
            let e = s.to_vec(&budget).await.unwrap_err();
            assert!(matches!(e, BodyError::TooLarge { limit: 20 }), "{e}");
            assert_eq!(budget.available(), 100, "the reservation was returned");
        });
    }

    #[test]
    fn reads_exact_pieces_across_chunks_and_reports_truncation() {
        rt().block_on(async {
            let mut s =
                BodyStream::new(req(b"abcdefgh".to_vec(), None), 100, Duration::from_secs(1));
            assert_eq!(s.read_exact(3).await.unwrap(), b"abc");
            assert!(!s.at_end().await.unwrap());
            assert_eq!(s.read_exact(4).await.unwrap(), b"defg");
            let e = s.read_exact(2).await.unwrap_err();
            assert!(
                matches!(e, BodyError::Truncated { got: 8, wanted: 1 }),
                "{e}"
            );
        });
    }

    #[test]
    fn the_budget_is_shared_and_waits_are_bounded() {
        rt().block_on(async {
            let budget = BodyBudget::new(100, Duration::from_millis(20));
            let mut a = budget.reserve(60).await.unwrap();
            assert_eq!(budget.available(), 40);
            let e = budget.reserve(50).await.unwrap_err();
            assert!(matches!(e, BodyError::Busy { .. }), "{e}");
            assert_eq!(ApiError::from(e).kind, ErrorKind::Unavailable);
            budget.grow(&mut a, 30).await.unwrap();
            assert_eq!((a.bytes(), budget.available()), (90, 10));
            // More than the whole budget is clamped: one request can always proceed alone.
            drop(a);
            let all = budget.reserve(1000).await.unwrap();
            assert_eq!((all.bytes(), budget.available()), (100, 0));
        });
    }
}
