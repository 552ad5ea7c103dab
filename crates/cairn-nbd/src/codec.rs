//! Pure encoding and decoding of transmission-phase messages, with no I/O.
//!
//! The client's reader task uses exactly these functions: [`next_frame`] cuts the byte
//! stream from the server into frames (bounded by [`Limits`]), [`parse_chunk`] decodes a
//! structured chunk's payload, and [`ReplyState`] checks every chunk against the request it
//! answers and assembles the result. [`simulate_replies`] drives the same path over an
//! arbitrary byte string; it is the entry point of the fuzz target and of the property
//! tests that feed random bytes.

use std::collections::{BTreeMap, HashMap};

use bytes::{Buf, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::proto::*;

/// Upper bounds on everything the server sends. Exceeding one is a fatal
/// [`Error::LimitExceeded`]; nothing larger than these is ever allocated on the server's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one option reply during the handshake.
    pub max_option_reply: u32,
    /// Most replies the server may send to one option (e.g. `NBD_REP_INFO`s, contexts).
    pub max_option_replies: u32,
    /// Largest payload of one structured reply chunk.
    pub max_chunk_len: u32,
    /// Most descriptors in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
    pub max_extents: u32,
    /// Most chunks in the structured reply to one request.
    pub max_chunks_per_reply: u32,
    /// Most metadata contexts the server may select.
    pub max_meta_contexts: u32,
}

/// Largest request we send by default (qemu's limit too).
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_option_reply: 64 << 10,
            max_option_replies: 1024,
            max_chunk_len: DEFAULT_MAX_REQUEST + 4096,
            max_extents: 128 << 10,
            max_chunks_per_reply: 64 << 10,
            max_meta_contexts: 64,
        }
    }
}

/// Length of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header on the wire.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Length of a structured reply chunk header on the wire.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Longest error message or name we keep (the protocol's string limit).
pub const MAX_STRING: usize = 4096;

/// A transmission-phase request header (the write payload follows it separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a request header (used by test servers); checks the length and magic.
    pub fn decode(mut b: &[u8]) -> Result<Self> {
        if b.len() < REQUEST_HEADER_LEN {
            return Err(Error::protocol("short request header"));
        }
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(Error::protocol(format!("bad request magic {magic:#x}")));
        }
        Ok(RequestHeader {
            flags: b.get_u16(),
            command: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            len: b.get_u32(),
        })
    }
}

/// Encodes a simple reply header (for test servers).
pub fn encode_simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIMPLE_REPLY_HEADER_LEN);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// Encodes a structured reply chunk header followed by its payload (for test servers).
///
/// # Panics
///
/// If `payload` is longer than `u32::MAX` bytes.
pub fn encode_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + payload.len());
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    let len = u32::try_from(payload.len()).expect("chunk payload longer than u32::MAX");
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// One message from the server in the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A simple reply; `payload` is the read data for a successful simple READ reply.
    Simple {
        error: u32,
        cookie: u64,
        payload: Bytes,
    },
    /// One structured reply chunk with its raw payload.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Bytes,
    },
}

impl Frame {
    pub fn cookie(&self) -> u64 {
        match self {
            Frame::Simple { cookie, .. } | Frame::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Result of [`next_frame`].
#[derive(Debug)]
pub enum Progress {
    Frame(Frame),
    /// The buffer holds an incomplete frame; this many bytes in total are needed.
    NeedMore(usize),
}

/// Cuts the next frame off the front of `buf`.
///
/// `simple_payload` tells, for the cookie of a successful simple reply, how many data bytes
/// follow (the length of a READ, else 0), or `None` if the cookie is not in flight. Frames are
/// checked against `limits` before any byte of their payload is awaited.
pub fn next_frame(
    buf: &mut BytesMut,
    structured: bool,
    limits: &Limits,
    mut simple_payload: impl FnMut(u64) -> Option<usize>,
) -> Result<Progress> {
    if buf.len() < 4 {
        return Ok(Progress::NeedMore(4));
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    match magic {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_HEADER_LEN {
                return Ok(Progress::NeedMore(SIMPLE_REPLY_HEADER_LEN));
            }
            let mut h = &buf[4..SIMPLE_REPLY_HEADER_LEN];
            let error = h.get_u32();
            let cookie = h.get_u64();
            let plen = if error != 0 {
                0
            } else {
                simple_payload(cookie).ok_or_else(|| unknown_cookie(cookie))?
            };
            if plen > limits.max_chunk_len as usize {
                return Err(Error::limit(
                    "simple reply payload",
                    plen as u64,
                    limits.max_chunk_len.into(),
                ));
            }
            let total = SIMPLE_REPLY_HEADER_LEN + plen;
            if buf.len() < total {
                return Ok(Progress::NeedMore(total));
            }
            let mut frame = buf.split_to(total).freeze();
            frame.advance(SIMPLE_REPLY_HEADER_LEN);
            Ok(Progress::Frame(Frame::Simple {
                error,
                cookie,
                payload: frame,
            }))
        }
        STRUCTURED_REPLY_MAGIC => {
            if !structured {
                return Err(Error::protocol(
                    "structured reply chunk although structured replies were not negotiated",
                ));
            }
            if buf.len() < STRUCTURED_REPLY_HEADER_LEN {
                return Ok(Progress::NeedMore(STRUCTURED_REPLY_HEADER_LEN));
            }
            let mut h = &buf[4..STRUCTURED_REPLY_HEADER_LEN];
            let flags = h.get_u16();
            let kind = h.get_u16();
            let cookie = h.get_u64();
            let len = h.get_u32();
            if len > limits.max_chunk_len {
                return Err(Error::limit(
                    "reply chunk length",
                    len.into(),
                    limits.max_chunk_len.into(),
                ));
            }
            let total = STRUCTURED_REPLY_HEADER_LEN + len as usize;
            if buf.len() < total {
                return Ok(Progress::NeedMore(total));
            }
            let mut frame = buf.split_to(total).freeze();
            frame.advance(STRUCTURED_REPLY_HEADER_LEN);
            Ok(Progress::Frame(Frame::Chunk {
                flags,
                kind,
                cookie,
                payload: frame,
            }))
        }
        EXTENDED_REPLY_MAGIC => Err(Error::protocol(
            "extended-header reply although extended headers were not negotiated",
        )),
        m => Err(Error::protocol(format!("bad reply magic {m:#010x}"))),
    }
}

pub(crate) fn unknown_cookie(cookie: u64) -> Error {
    Error::protocol(format!("reply for unknown cookie {cookie:#x}"))
}

/// A decoded structured reply chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    /// Descriptors as (length, flags) pairs.
    BlockStatus {
        context_id: u32,
        descriptors: Vec<(u32, u32)>,
    },
    /// An error chunk (`NBD_REPLY_TYPE_ERROR`, `_ERROR_OFFSET` or an unknown error type).
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_STRING)]).into_owned()
}

/// Decodes the payload of a chunk of type `kind`.
pub fn parse_chunk(kind: u16, mut p: Bytes, limits: &Limits) -> Result<Chunk> {
    let plen = p.len();
    let bad = |what: &str| {
        Error::protocol(format!(
            "{what} (chunk type {kind:#x}, payload length {plen})"
        ))
    };
    match kind {
        REPLY_TYPE_NONE => {
            if plen != 0 {
                return Err(bad("NBD_REPLY_TYPE_NONE with payload"));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if plen < 9 {
                return Err(bad("short NBD_REPLY_TYPE_OFFSET_DATA"));
            }
            let offset = p.get_u64();
            Ok(Chunk::OffsetData { offset, data: p })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if plen != 12 {
                return Err(bad("NBD_REPLY_TYPE_OFFSET_HOLE of wrong length"));
            }
            let offset = p.get_u64();
            let len = p.get_u32();
            if len == 0 {
                return Err(bad("empty hole"));
            }
            Ok(Chunk::OffsetHole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if plen < 12 || !(plen - 4).is_multiple_of(8) {
                return Err(bad("NBD_REPLY_TYPE_BLOCK_STATUS of wrong length"));
            }
            let n = (plen - 4) / 8;
            if n > limits.max_extents as usize {
                return Err(Error::limit(
                    "block status extents",
                    n as u64,
                    limits.max_extents.into(),
                ));
            }
            let context_id = p.get_u32();
            let mut descriptors = Vec::with_capacity(n);
            for _ in 0..n {
                let len = p.get_u32();
                let flags = p.get_u32();
                if len == 0 {
                    return Err(bad("block status descriptor of length 0"));
                }
                descriptors.push((len, flags));
            }
            Ok(Chunk::BlockStatus {
                context_id,
                descriptors,
            })
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            if plen < 6 {
                return Err(bad("short error chunk"));
            }
            let errno = p.get_u32();
            let mlen = p.get_u16() as usize;
            if errno == 0 {
                return Err(bad("error chunk with error value 0"));
            }
            let rest = plen - 6;
            let offset = if k == REPLY_TYPE_ERROR_OFFSET {
                if rest < 8 || mlen != rest - 8 {
                    return Err(bad("malformed NBD_REPLY_TYPE_ERROR_OFFSET"));
                }
                let message = lossy(&p[..mlen]);
                p.advance(mlen);
                return Ok(Chunk::Error {
                    errno,
                    message,
                    offset: Some(p.get_u64()),
                });
            } else {
                None
            };
            if mlen > rest {
                return Err(bad("error message longer than chunk"));
            }
            Ok(Chunk::Error {
                errno,
                message: lossy(&p[..mlen]),
                offset,
            })
        }
        _ => Err(bad("unknown structured reply type")),
    }
}

/// One extent of a block status reply, in absolute export offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub len: u64,
    /// Status flags defined by the metadata context (e.g. [`STATE_HOLE`], [`STATE_ZERO`]
    /// for `base:allocation`, [`STATE_DIRTY`] for `qemu:dirty-bitmap:*`).
    pub flags: u32,
}

impl StatusExtent {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    pub fn extent(&self) -> cairn_types::Extent {
        cairn_types::Extent::new(self.offset, self.len)
    }
}

/// The successful outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Read(Bytes),
    /// Extents per metadata context id, in the order the server sent them.
    BlockStatus(Vec<(u32, Vec<StatusExtent>)>),
}

enum Piece {
    Data(Bytes),
    Hole,
}

/// What the reader knows about one request in flight, and the reply so far.
pub struct ReplyState {
    command: u16,
    offset: u64,
    len: u32,
    flags: u16,
    contexts: Vec<u32>,
    chunks: u32,
    /// Content pieces of a READ by relative start: (end, piece).
    pieces: BTreeMap<u64, (u64, Piece)>,
    covered: u64,
    status: Vec<(u32, Vec<StatusExtent>)>,
    error: Option<Error>,
}

impl ReplyState {
    /// `contexts` are the negotiated metadata context ids (for BLOCK_STATUS).
    pub fn new(command: u16, flags: u16, offset: u64, len: u32, contexts: Vec<u32>) -> Self {
        ReplyState {
            command,
            offset,
            len,
            flags,
            contexts,
            chunks: 0,
            pieces: BTreeMap::new(),
            covered: 0,
            status: Vec::new(),
            error: None,
        }
    }

    /// Bytes of data that follow a successful simple reply to this request.
    pub fn simple_payload_len(&self) -> usize {
        if self.command == CMD_READ {
            self.len as usize
        } else {
            0
        }
    }

    fn server_error(&self, errno: u32, message: String, error_offset: Option<u64>) -> Error {
        Error::Server {
            errno,
            command: self.command,
            offset: self.offset,
            len: self.len.into(),
            error_offset,
            message,
        }
    }

    /// Applies a simple reply. The outer `Err` is fatal for the connection; the inner result
    /// is the request's.
    pub fn on_simple(
        &self,
        error: u32,
        payload: Bytes,
        structured: bool,
    ) -> Result<Result<Outcome>> {
        if structured && self.command == CMD_READ {
            return Err(Error::protocol(
                "simple reply to NBD_CMD_READ although structured replies were negotiated",
            ));
        }
        if error != 0 {
            return Ok(Err(self.server_error(error, String::new(), None)));
        }
        match self.command {
            CMD_READ => {
                if payload.len() != self.len as usize {
                    return Err(Error::protocol("simple read reply of wrong length"));
                }
                Ok(Ok(Outcome::Read(payload)))
            }
            CMD_BLOCK_STATUS => Err(Error::protocol(
                "successful simple reply to NBD_CMD_BLOCK_STATUS",
            )),
            _ => Ok(Ok(Outcome::Ack)),
        }
    }

    /// Applies one structured chunk; returns `Some(result)` when the reply is complete.
    pub fn on_chunk(
        &mut self,
        flags: u16,
        kind: u16,
        payload: Bytes,
        limits: &Limits,
    ) -> Result<Option<Result<Outcome>>> {
        self.chunks += 1;
        if self.chunks > limits.max_chunks_per_reply {
            return Err(Error::limit(
                "chunks in one reply",
                self.chunks.into(),
                limits.max_chunks_per_reply.into(),
            ));
        }
        let done = flags & REPLY_FLAG_DONE != 0;
        let chunk = parse_chunk(kind, payload, limits)?;
        let (command, req_offset, req_len) = (self.command, self.offset, self.len);
        let ctx = move |what: &str| {
            Error::protocol(format!(
                "{what} in reply to {} offset {req_offset} length {req_len}",
                command_name(command)
            ))
        };
        match chunk {
            Chunk::None => {
                if !done {
                    return Err(ctx("NBD_REPLY_TYPE_NONE without the done flag"));
                }
            }
            Chunk::OffsetData { offset, data } => {
                if self.command != CMD_READ {
                    return Err(ctx("data chunk"));
                }
                let len = data.len() as u64;
                self.add_piece(offset, len, Piece::Data(data))
                    .map_err(&ctx)?;
            }
            Chunk::OffsetHole { offset, len } => {
                if self.command != CMD_READ {
                    return Err(ctx("hole chunk"));
                }
                self.add_piece(offset, len.into(), Piece::Hole)
                    .map_err(&ctx)?;
            }
            Chunk::BlockStatus {
                context_id,
                descriptors,
            } => {
                if self.command != CMD_BLOCK_STATUS {
                    return Err(ctx("block status chunk"));
                }
                if !self.contexts.contains(&context_id) {
                    return Err(ctx(&format!(
                        "block status for unnegotiated context id {context_id}"
                    )));
                }
                if self.status.iter().any(|(id, _)| *id == context_id) {
                    return Err(ctx(&format!(
                        "second block status chunk for context id {context_id}"
                    )));
                }
                if self.flags & CMD_FLAG_REQ_ONE != 0 && descriptors.len() != 1 {
                    return Err(ctx("several descriptors despite NBD_CMD_FLAG_REQ_ONE"));
                }
                let req_len = u64::from(self.len);
                let mut rel = 0u64;
                let mut extents = Vec::with_capacity(descriptors.len());
                for (len, flags) in descriptors {
                    if rel >= req_len {
                        return Err(ctx("block status extents beyond the requested range"));
                    }
                    // The last extent may run past the request; clamp it.
                    let len = u64::from(len).min(req_len - rel);
                    extents.push(StatusExtent {
                        offset: self.offset + rel,
                        len,
                        flags,
                    });
                    rel += len;
                }
                self.status.push((context_id, extents));
            }
            Chunk::Error {
                errno,
                message,
                offset,
            } => {
                if let Some(o) = offset {
                    let rel = o.checked_sub(self.offset);
                    if !matches!(rel, Some(r) if r < u64::from(self.len)) {
                        return Err(ctx(&format!("error offset {o} outside the request")));
                    }
                }
                if self.error.is_none() {
                    self.error = Some(self.server_error(errno, message, offset));
                }
            }
        }
        if !done {
            return Ok(None);
        }
        if let Some(e) = self.error.take() {
            return Ok(Some(Err(e)));
        }
        match self.command {
            CMD_READ => {
                if self.covered != u64::from(self.len) {
                    return Err(ctx(&format!(
                        "read reply covers only {} bytes",
                        self.covered
                    )));
                }
                Ok(Some(Ok(Outcome::Read(self.assemble()))))
            }
            CMD_BLOCK_STATUS => {
                if self.status.len() != self.contexts.len() {
                    return Err(ctx("block status reply lacks a negotiated context"));
                }
                Ok(Some(Ok(Outcome::BlockStatus(std::mem::take(
                    &mut self.status,
                )))))
            }
            _ => Ok(Some(Ok(Outcome::Ack))),
        }
    }

    fn add_piece(&mut self, offset: u64, len: u64, piece: Piece) -> Result<(), &'static str> {
        let start = offset
            .checked_sub(self.offset)
            .ok_or("chunk before the requested range")?;
        let end = start.checked_add(len).ok_or("chunk range overflows")?;
        if end > u64::from(self.len) {
            return Err("chunk beyond the requested range");
        }
        if let Some((_, (prev_end, _))) = self.pieces.range(..end).next_back()
            && *prev_end > start
        {
            return Err("overlapping content chunks");
        }
        self.pieces.insert(start, (end, piece));
        self.covered += len;
        Ok(())
    }

    fn assemble(&mut self) -> Bytes {
        let pieces = std::mem::take(&mut self.pieces);
        if pieces.len() == 1
            && let Some((_, (_, Piece::Data(d)))) = pieces.first_key_value()
        {
            return d.clone();
        }
        let mut out = BytesMut::zeroed(self.len as usize);
        for (start, (_, piece)) in pieces {
            if let Piece::Data(d) = piece {
                #[allow(clippy::cast_possible_truncation)] // add_piece keeps start below len, a u32
                let s = start as usize;
                out[s..s + d.len()].copy_from_slice(&d);
            }
        }
        out.freeze()
    }
}

/// Runs an arbitrary server byte stream through the reply path against a fixed set of
/// requests in flight (cookie 1: READ 4096+8192, 2: BLOCK_STATUS 0+1 MiB with context ids
/// 1 and 2, 3: WRITE, 4: FLUSH, 5: READ 0+16 with DF). Returns the number of completed
/// replies, or the first fatal error. Never panics; meant for fuzzing.
pub fn simulate_replies(data: &[u8], structured: bool) -> Result<usize> {
    let limits = Limits {
        max_chunk_len: 1 << 20,
        max_extents: 1024,
        max_chunks_per_reply: 256,
        ..Limits::default()
    };
    let mut inflight: HashMap<u64, ReplyState> = HashMap::new();
    inflight.insert(1, ReplyState::new(CMD_READ, 0, 4096, 8192, vec![]));
    inflight.insert(
        2,
        ReplyState::new(CMD_BLOCK_STATUS, 0, 0, 1 << 20, vec![1, 2]),
    );
    inflight.insert(3, ReplyState::new(CMD_WRITE, 0, 0, 512, vec![]));
    inflight.insert(4, ReplyState::new(CMD_FLUSH, 0, 0, 0, vec![]));
    inflight.insert(5, ReplyState::new(CMD_READ, CMD_FLAG_DF, 0, 16, vec![]));
    let mut buf = BytesMut::from(data);
    let mut completed = 0;
    loop {
        let progress = next_frame(&mut buf, structured, &limits, |c| {
            inflight.get(&c).map(|s| s.simple_payload_len())
        })?;
        let frame = match progress {
            Progress::NeedMore(_) => return Ok(completed),
            Progress::Frame(f) => f,
        };
        let cookie = frame.cookie();
        let state = inflight
            .get_mut(&cookie)
            .ok_or_else(|| unknown_cookie(cookie))?;
        let finished = match frame {
            Frame::Simple { error, payload, .. } => {
                Some(state.on_simple(error, payload, structured)?)
            }
            Frame::Chunk {
                flags,
                kind,
                payload,
                ..
            } => state.on_chunk(flags, kind, payload, &limits)?,
        };
        if finished.is_some() {
            inflight.remove(&cookie);
            completed += 1;
        }
    }
}
