//! An async client for the Network Block Device protocol, as served by `qemu-nbd`,
//! `qemu-storage-daemon`, nbdkit and nbd-server.
//!
//! ```no_run
//! # async fn demo() -> cairn_nbd::Result<()> {
//! use cairn_nbd::{Client, ConnectOptions, BASE_ALLOCATION};
//! let opts = ConnectOptions::default().with_context(BASE_ALLOCATION).with_dirty_bitmap("b0");
//! let client = Client::connect_unix("/run/disk.sock", "", opts).await?;
//! let map = client.map(BASE_ALLOCATION, 0, client.size()).await?;
//! let first = client.read_at(0, 1 << 20).await?;
//! client.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! # Handshake
//!
//! Fixed newstyle only. The client asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`),
//! then, if it got them and was asked to, selects metadata contexts
//! (`NBD_OPT_SET_META_CONTEXT`, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`), then
//! enters transmission with `NBD_OPT_GO` asking for `NBD_INFO_EXPORT` and
//! `NBD_INFO_BLOCK_SIZE` (falling back to `NBD_OPT_EXPORT_NAME` if the server does not know
//! `NBD_OPT_GO`). A missing export gives [`Error::ExportNotFound`]; any other refused option
//! gives [`Error::OptionRejected`]; both are followed by a soft disconnect (`NBD_OPT_ABORT`).
//! Contexts the server does not know are simply absent from [`ExportInfo::meta_contexts`];
//! asking for their block status is an [`ErrorKind::Unsupported`] error.
//!
//! # Pipelining model
//!
//! A [`Client`] is a cheap handle (clone it freely, use it from many tasks). Each request gets
//! a fresh 64-bit cookie and an entry in a table of requests in flight, then its header (and
//! write payload) is written under an async mutex, so requests never interleave on the wire.
//! A single reader task owns the read half of the socket: it cuts the stream into frames,
//! looks each cookie up in the table, checks the chunk against the request it answers and,
//! when the reply is complete, hands the outcome to the waiting request over a oneshot
//! channel. Replies may come in any order. The reader cuts headers and small frames out of a
//! small buffer; a frame longer than 32 KiB (READ data), once its header has been checked
//! against the limits, is read from the socket straight into a buffer of its exact size, so
//! read data is copied once (kernel to that buffer) and handed to the caller as is. At most `max_in_flight` requests (default 64) are
//! outstanding; further requests wait for a slot. Long reads and writes are split into
//! requests of at most `max_request_len` (default 32 MiB, lowered to the server's maximum
//! block size) which are all sent before the first reply is awaited.
//!
//! # Limits
//!
//! Everything the server sends is bounded before it is allocated (see [`Limits`]): an option
//! reply is at most 64 KiB, at most 1024 replies per option and 64 metadata contexts; a reply
//! chunk is at most 32 MiB + 4 KiB; a block status chunk has at most 131072 descriptors; one
//! reply has at most 65536 chunks. Read chunks must lie inside the request and not overlap,
//! and a successful read must be covered completely; block status extents must start inside
//! the request (the last one is clamped to it), one chunk per negotiated context; error
//! offsets must lie inside the request; a reply with an unknown cookie, an unknown chunk type
//! or a bad magic is a protocol error. Every wait (connect, handshake, request slot, send,
//! reply) is bounded by `timeout` (default 30 s).
//!
//! # Errors and disconnects
//!
//! An error value from the server ([`ErrorKind::Server`]) fails only its request. Any
//! protocol violation, exceeded limit, timeout or I/O error (including the server closing
//! the socket) is fatal: the reader stops, every request in flight fails with that error, and
//! every later request fails with a clone of it ([`Client::closed_reason`]). There is no
//! reconnection; open a new [`Client`]. After a server error `ESHUTDOWN` new requests fail
//! with [`Error::Closed`] while those in flight complete; call [`Client::disconnect`], which
//! waits for requests in flight, sends `NBD_CMD_DISC` and closes. Dropping the last handle
//! closes the socket without `NBD_CMD_DISC`.
//!
//! # Not handled
//!
//! TLS, extended headers (64-bit lengths), `NBD_CMD_CACHE`, and alignment to the server's
//! minimum block size: requests are sent as given (qemu accepts byte-granular requests), and a
//! server that insists on alignment answers unaligned ones with `EINVAL`.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

mod client;
pub mod codec;
mod error;
mod handshake;
pub mod proto;

pub use client::{BASE_ALLOCATION, Client, ConnectOptions, ContextStatus};
pub use codec::{Limits, StatusExtent};
pub use error::{Error, ErrorKind, Result};
pub use handshake::{BlockSize, ExportInfo, MetaContext, TransmissionFlags};
