//! The pipelined client: one writer behind an async mutex, one reader task that demultiplexes
//! replies by cookie to the waiting requests.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;

use crate::codec::{
    DEFAULT_MAX_REQUEST, Frame, Limits, Outcome, Progress, REQUEST_HEADER_LEN, ReplyState,
    RequestHeader, StatusExtent, next_frame, unknown_cookie,
};
use crate::error::{Error, Result};
use crate::handshake::{ExportInfo, Handshake, MetaContext};
use crate::proto::*;

/// Options for [`Client::connect_unix`] and friends.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Ask for structured replies (needed for holes in reads and for block status).
    pub structured_replies: bool,
    /// Metadata context queries for `NBD_OPT_SET_META_CONTEXT`, e.g. `base:allocation`.
    pub meta_contexts: Vec<String>,
    /// Bound on every wait: connect, handshake, request send, reply.
    pub timeout: Duration,
    /// Most requests in flight at once on this connection.
    pub max_in_flight: usize,
    /// Largest READ/WRITE request sent; larger calls are split. Also capped by the
    /// server's advertised maximum block size.
    pub max_request_len: u32,
    /// Bounds on what the server may send.
    pub limits: Limits,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            structured_replies: true,
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
            max_in_flight: 64,
            max_request_len: DEFAULT_MAX_REQUEST,
            limits: Limits::default(),
        }
    }
}

impl ConnectOptions {
    /// Adds a metadata context query (e.g. [`BASE_ALLOCATION`]).
    pub fn with_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }

    /// Adds the `qemu:dirty-bitmap:NAME` context.
    pub fn with_dirty_bitmap(self, bitmap: &str) -> Self {
        self.with_context(format!("qemu:dirty-bitmap:{bitmap}"))
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Block status of one metadata context over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextStatus {
    pub context: MetaContext,
    pub extents: Vec<StatusExtent>,
}

struct Pending {
    state: ReplyState,
    tx: oneshot::Sender<Result<Outcome>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is unusable; later requests fail with a clone.
    closed: Option<Error>,
    /// The server answered `ESHUTDOWN`: no new requests; [`Client::disconnect`] still works.
    server_shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` inconsistent in a way that
        // matters more than refusing to go on, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every request in flight with `err`.
    fn fail(&self, err: Error) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(err.clone());
            }
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.tx.send(Err(err.clone()));
        }
    }
}

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

struct Inner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<BoxWrite>,
    reader: JoinHandle<()>,
    info: ExportInfo,
    context_ids: Vec<u32>,
    next_cookie: AtomicU64,
    sem: Arc<Semaphore>,
    max_in_flight: u32,
    max_request: u32,
    timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An NBD connection in transmission phase. Cheap to clone; clones share the connection, and
/// requests from any clone or task are pipelined on it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

async fn with_timeout<T>(
    after: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(Error::Timeout { op, after }))
}

impl Client {
    /// Connects to a server on a unix socket and opens `export`.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client> {
        let s = with_timeout(opts.timeout, "connecting", async {
            UnixStream::connect(path)
                .await
                .map_err(|e| Error::io("connecting", e))
        })
        .await?;
        let (r, w) = s.into_split();
        Self::connect_split(Box::new(r), Box::new(w), export, opts).await
    }

    /// Connects to a server over TCP (`"host:port"`) and opens `export`.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client> {
        let s = with_timeout(opts.timeout, "connecting", async {
            TcpStream::connect(addr)
                .await
                .map_err(|e| Error::io("connecting", e))
        })
        .await?;
        s.set_nodelay(true)
            .map_err(|e| Error::io("connecting", e))?;
        let (r, w) = s.into_split();
        Self::connect_split(Box::new(r), Box::new(w), export, opts).await
    }

    /// Runs the handshake over any byte stream and opens `export`.
    pub async fn connect_stream<S>(stream: S, export: &str, opts: ConnectOptions) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::connect_split(Box::new(r), Box::new(w), export, opts).await
    }

    async fn connect_split(
        mut r: BoxRead,
        mut w: BoxWrite,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client> {
        let max_in_flight = u32::try_from(opts.max_in_flight)
            .ok()
            .filter(|&n| n > 0 && opts.max_in_flight <= Semaphore::MAX_PERMITS)
            .ok_or_else(|| {
                Error::invalid(format!("max_in_flight {} out of range", opts.max_in_flight))
            })?;
        if opts.max_request_len == 0
            || u64::from(opts.max_request_len) + 8 > u64::from(opts.limits.max_chunk_len)
        {
            return Err(Error::invalid(
                "max_request_len must be > 0 and fit in limits.max_chunk_len - 8",
            ));
        }
        let mut hs = Handshake {
            r: &mut r,
            w: &mut w,
            limits: &opts.limits,
        };
        let info = with_timeout(
            opts.timeout,
            "handshaking",
            hs.run(export, opts.structured_replies, &opts.meta_contexts),
        )
        .await?;
        let mut max_request = opts.max_request_len;
        if let Some(bs) = info.block_size {
            max_request = max_request.min(bs.max);
            if bs.min > 1 {
                // Keep split points aligned to the minimum block size.
                max_request = (max_request / bs.min * bs.min).max(bs.min);
            }
        }
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(reader_task(
            r,
            shared.clone(),
            info.structured_replies,
            opts.limits.clone(),
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                writer: tokio::sync::Mutex::new(w),
                reader,
                context_ids: info.meta_contexts.iter().map(|c| c.id).collect(),
                info,
                next_cookie: AtomicU64::new(1),
                sem: Arc::new(Semaphore::new(opts.max_in_flight)),
                max_in_flight,
                max_request,
                timeout: opts.timeout,
            }),
        })
    }

    /// What the handshake established.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Largest single READ/WRITE request this client sends.
    pub fn max_request_len(&self) -> u32 {
        self.inner.max_request
    }

    /// The error that closed the connection, if it is closed.
    pub fn closed_reason(&self) -> Option<Error> {
        self.inner.shared.lock().closed.clone()
    }

    fn fail(&self, err: Error) {
        self.inner.shared.fail(err);
        self.inner.reader.abort();
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.info.size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range offset {offset} length {len} beyond export size {}",
                self.inner.info.size
            ))),
        }
    }

    /// Sends one request and returns the receiver of its outcome.
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<oneshot::Receiver<Result<Outcome>>> {
        let inner = &*self.inner;
        let t = inner.timeout;
        let permit = match tokio::time::timeout(t, inner.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                let e = Error::Timeout {
                    op: "waiting for a request slot",
                    after: t,
                };
                self.fail(e.clone());
                return Err(e);
            }
        };
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.shared.lock();
            if let Some(e) = &st.closed {
                return Err(e.clone());
            }
            if st.server_shutdown {
                return Err(Error::Closed);
            }
            let state = ReplyState::new(command, flags, offset, len, inner.context_ids.clone());
            st.pending.insert(
                cookie,
                Pending {
                    state,
                    tx,
                    _permit: permit,
                },
            );
        }
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            len,
        }
        .encode();
        let res = with_timeout(t, "sending a request", async {
            let mut w = inner.writer.lock().await;
            let io = |e| Error::io("sending a request", e);
            match payload {
                Some(p) if p.len() <= 64 << 10 => {
                    let mut b = Vec::with_capacity(REQUEST_HEADER_LEN + p.len());
                    b.extend_from_slice(&header);
                    b.extend_from_slice(p);
                    w.write_all(&b).await.map_err(io)?;
                }
                Some(p) => {
                    w.write_all(&header).await.map_err(io)?;
                    w.write_all(p).await.map_err(io)?;
                }
                None => w.write_all(&header).await.map_err(io)?,
            }
            w.flush().await.map_err(io)
        })
        .await;
        if let Err(e) = res {
            self.fail(e.clone());
            return Err(e);
        }
        Ok(rx)
    }

    async fn wait(&self, rx: oneshot::Receiver<Result<Outcome>>) -> Result<Outcome> {
        let t = self.inner.timeout;
        match tokio::time::timeout(t, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(self.closed_reason().unwrap_or(Error::Closed)),
            Err(_) => {
                let e = Error::Timeout {
                    op: "waiting for a reply",
                    after: t,
                };
                self.fail(e.clone());
                Err(e)
            }
        }
    }

    async fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Outcome> {
        let rx = self.submit(command, flags, offset, len, payload).await?;
        self.wait(rx).await
    }

    /// Reads `len` bytes at `offset`. Calls longer than [`Client::max_request_len`] are split
    /// into that many pipelined requests.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check_range(offset, len as u64)?;
        let max = self.inner.max_request;
        let mut rxs = Vec::with_capacity(len.div_ceil((max as usize).max(1)));
        let mut done = 0usize;
        while done < len {
            let n = u32::try_from(len - done).map_or(max, |rest| rest.min(max));
            rxs.push(
                self.submit(CMD_READ, 0, offset + done as u64, n, None)
                    .await?,
            );
            done += n as usize;
        }
        if rxs.len() == 1 {
            return self.wait_read(rxs.remove(0)).await;
        }
        let mut out = BytesMut::with_capacity(len);
        for rx in rxs {
            out.extend_from_slice(&self.wait_read(rx).await?);
        }
        Ok(out.freeze())
    }

    async fn wait_read(&self, rx: oneshot::Receiver<Result<Outcome>>) -> Result<Bytes> {
        match self.wait(rx).await? {
            Outcome::Read(b) => Ok(b),
            _ => Err(Error::protocol("read completed without data")),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.inner.info.flags.read_only() {
            return Err(Error::unsupported("export is read-only"));
        }
        Ok(())
    }

    /// Writes `data` at `offset` (split into pipelined requests if long). With `fua`, the
    /// server persists the data before answering (if it advertised FUA; ignored otherwise).
    pub async fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua && self.inner.info.flags.can_fua() {
            CMD_FLAG_FUA
        } else {
            0
        };
        let mut rxs = Vec::new();
        for (i, piece) in data.chunks(self.inner.max_request as usize).enumerate() {
            let off = offset + (i as u64) * u64::from(self.inner.max_request);
            #[allow(clippy::cast_possible_truncation)] // a piece is at most max_request, a u32
            let n = piece.len() as u32;
            rxs.push(self.submit(CMD_WRITE, flags, off, n, Some(piece)).await?);
        }
        for rx in rxs {
            self.wait(rx).await?;
        }
        Ok(())
    }

    /// Splits `[offset, offset+len)` into requests of at most 1 GiB for zeroes and trim.
    async fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        const MAX: u64 = 1 << 30;
        self.check_range(offset, len)?;
        let mut rxs = Vec::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX);
            rxs.push(
                self.submit(command, flags, offset + done, n as u32, None)
                    .await?,
            );
            done += n;
        }
        for rx in rxs {
            self.wait(rx).await?;
        }
        Ok(())
    }

    /// Writes zeroes over the range; with `no_hole` the server must allocate it.
    pub async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.check_writable()?;
        if !self.inner.info.flags.can_write_zeroes() {
            return Err(Error::unsupported(
                "server does not support NBD_CMD_WRITE_ZEROES",
            ));
        }
        self.ranged(
            CMD_WRITE_ZEROES,
            if no_hole { CMD_FLAG_NO_HOLE } else { 0 },
            offset,
            len,
        )
        .await
    }

    /// Tells the server the range is no longer needed.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.inner.info.flags.can_trim() {
            return Err(Error::unsupported("server does not support NBD_CMD_TRIM"));
        }
        self.ranged(CMD_TRIM, 0, offset, len).await
    }

    /// Persists all writes the server has answered.
    pub async fn flush(&self) -> Result<()> {
        if !self.inner.info.flags.can_flush() {
            return Err(Error::unsupported("server does not support NBD_CMD_FLUSH"));
        }
        self.call(CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    /// Block status of every negotiated context over `[offset, offset+len)`, by one request.
    /// The server may describe less than asked (at least one extent per context); extents
    /// never run past the requested range.
    pub async fn block_status_all(&self, offset: u64, len: u64) -> Result<Vec<ContextStatus>> {
        if self.inner.context_ids.is_empty() {
            return Err(Error::unsupported("no metadata context was negotiated"));
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        // Stay well inside 32 bits, aligned.
        let len = len.min(1 << 31) as u32;
        match self.call(CMD_BLOCK_STATUS, 0, offset, len, None).await? {
            Outcome::BlockStatus(v) => Ok(v
                .into_iter()
                .filter_map(|(id, extents)| {
                    let context = self
                        .inner
                        .info
                        .meta_contexts
                        .iter()
                        .find(|c| c.id == id)?
                        .clone();
                    Some(ContextStatus { context, extents })
                })
                .collect()),
            _ => Err(Error::protocol("block status completed without status")),
        }
    }

    /// Block status of the context named `context` over `[offset, offset+len)` by one
    /// request; may describe less than asked (see [`Client::block_status_all`]).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        context: &str,
    ) -> Result<Vec<StatusExtent>> {
        if !self
            .inner
            .info
            .meta_contexts
            .iter()
            .any(|c| c.name == context)
        {
            return Err(Error::unsupported(format!(
                "metadata context {context:?} was not negotiated"
            )));
        }
        let all = self.block_status_all(offset, len).await?;
        all.into_iter()
            .find(|c| c.context.name == context)
            .map(|c| c.extents)
            .ok_or_else(|| Error::protocol("reply lacks the requested context"))
    }

    /// The full map of `context` over `[offset, offset+len)`: repeats block status until the
    /// range is covered and merges neighbours with equal flags.
    pub async fn map(&self, context: &str, offset: u64, len: u64) -> Result<Vec<StatusExtent>> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<StatusExtent> = Vec::new();
        while pos < end {
            let extents = self.block_status(pos, end - pos, context).await?;
            for e in extents {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.end() == e.offset => {
                        last.len += e.len
                    }
                    _ => out.push(e),
                }
                pos = e.end();
            }
        }
        Ok(out)
    }

    /// Soft disconnect: waits (bounded by the timeout) for requests in flight, sends
    /// `NBD_CMD_DISC` and closes the write side. Later requests on any clone fail with
    /// [`Error::Closed`].
    pub async fn disconnect(&self) -> Result<()> {
        let inner = &*self.inner;
        let _all =
            tokio::time::timeout(inner.timeout, inner.sem.acquire_many(inner.max_in_flight)).await;
        {
            let mut st = inner.shared.lock();
            if let Some(e) = &st.closed {
                return match e {
                    Error::Closed => Ok(()),
                    e => Err(e.clone()),
                };
            }
            st.closed = Some(Error::Closed);
        }
        let header = RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        let res = with_timeout(inner.timeout, "disconnecting", async {
            let mut w = inner.writer.lock().await;
            w.write_all(&header)
                .await
                .map_err(|e| Error::io("disconnecting", e))?;
            w.shutdown()
                .await
                .map_err(|e| Error::io("disconnecting", e))
        })
        .await;
        inner.sem.close();
        res
    }
}

async fn reader_task(r: BoxRead, shared: Arc<Shared>, structured: bool, limits: Limits) {
    let err = read_loop(r, &shared, structured, &limits).await;
    shared.fail(err);
}

/// Bytes asked of the socket per read while looking for frame headers (and small frames).
const HEADER_READ: usize = 16 << 10;
/// Frames longer than this (in practice READ data) are read straight into a buffer of their
/// own exact size, so their payload is copied once (kernel to destination) and never moved.
const DIRECT_FRAME: usize = 32 << 10;

/// Reads and dispatches replies until the first fatal error, which it returns.
///
/// Small frames (headers, acks, block status, short reads) are cut out of a small shared
/// buffer. Once [`next_frame`] has validated a header (against the limits) and says a frame
/// of `total` bytes is longer than [`DIRECT_FRAME`], the frame gets a buffer of exactly
/// `total` bytes: the few bytes already buffered are copied in and the rest is read from the
/// socket directly into it. The frame's payload is then handed out without further copies.
async fn read_loop(mut r: BoxRead, shared: &Shared, structured: bool, limits: &Limits) -> Error {
    let mut buf = BytesMut::with_capacity(HEADER_READ);
    loop {
        let progress = cut_frame(&mut buf, shared, structured, limits);
        match progress {
            Err(e) => return e,
            Ok(Progress::NeedMore(total)) if total > DIRECT_FRAME => {
                let mut frame = BytesMut::with_capacity(total);
                frame.extend_from_slice(&buf);
                buf.clear();
                while frame.len() < total {
                    let want = total - frame.len();
                    if let Err(e) = fill(&mut r, &mut frame, want).await {
                        return e;
                    }
                }
                match cut_frame(&mut frame, shared, structured, limits) {
                    Err(e) => return e,
                    Ok(Progress::Frame(f)) => {
                        if let Err(e) = dispatch(shared, f, structured, limits) {
                            return e;
                        }
                    }
                    Ok(Progress::NeedMore(_)) => {
                        return Error::protocol("reply frame changed length while being read");
                    }
                }
            }
            Ok(Progress::NeedMore(_)) => {
                if let Err(e) = fill(&mut r, &mut buf, HEADER_READ).await {
                    return e;
                }
            }
            Ok(Progress::Frame(frame)) => {
                if let Err(e) = dispatch(shared, frame, structured, limits) {
                    return e;
                }
            }
        }
    }
}

fn cut_frame(
    buf: &mut BytesMut,
    shared: &Shared,
    structured: bool,
    limits: &Limits,
) -> Result<Progress> {
    let st = shared.lock();
    next_frame(buf, structured, limits, |c| {
        st.pending.get(&c).map(|p| p.state.simple_payload_len())
    })
}

/// One read of at most `max` bytes appended to `buf`; end of stream is an error.
async fn fill(r: &mut BoxRead, buf: &mut BytesMut, max: usize) -> Result<()> {
    use bytes::BufMut;
    buf.reserve(max);
    match r.read_buf(&mut (&mut *buf).limit(max)).await {
        Ok(0) => Err(Error::io(
            "reading replies",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(Error::io("reading replies", e)),
    }
}

fn dispatch(shared: &Shared, frame: Frame, structured: bool, limits: &Limits) -> Result<()> {
    let mut st = shared.lock();
    let cookie = frame.cookie();
    let p = st
        .pending
        .get_mut(&cookie)
        .ok_or_else(|| unknown_cookie(cookie))?;
    let finished = match frame {
        Frame::Simple { error, payload, .. } => {
            Some(p.state.on_simple(error, payload, structured)?)
        }
        Frame::Chunk {
            flags,
            kind,
            payload,
            ..
        } => p.state.on_chunk(flags, kind, payload, limits)?,
    };
    if let Some(Err(Error::Server {
        errno: ESHUTDOWN, ..
    })) = &finished
    {
        // The server is going away; the client must not start anything new.
        st.server_shutdown = true;
    }
    if let Some(res) = finished
        && let Some(p) = st.pending.remove(&cookie)
    {
        // The requester may have given up (dropped its future); that is fine.
        let _ = p.tx.send(res);
    }
    Ok(())
}
