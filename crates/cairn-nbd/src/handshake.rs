//! Fixed-newstyle handshake: structured replies, metadata contexts, `NBD_OPT_GO` (with a
//! fallback to `NBD_OPT_EXPORT_NAME`), `NBD_OPT_ABORT`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{Limits, MAX_STRING};
use crate::error::{Error, Result};
use crate::proto::*;

/// Transmission flags the server sent for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub fn read_only(self) -> bool {
        self.0 & FLAG_READ_ONLY != 0
    }
    pub fn can_flush(self) -> bool {
        self.0 & FLAG_SEND_FLUSH != 0
    }
    pub fn can_fua(self) -> bool {
        self.0 & FLAG_SEND_FUA != 0
    }
    pub fn can_trim(self) -> bool {
        self.0 & FLAG_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(self) -> bool {
        self.0 & FLAG_SEND_WRITE_ZEROES != 0
    }
    pub fn can_fast_zero(self) -> bool {
        self.0 & FLAG_SEND_FAST_ZERO != 0
    }
    pub fn can_df(self) -> bool {
        self.0 & FLAG_SEND_DF != 0
    }
    pub fn can_multi_conn(self) -> bool {
        self.0 & FLAG_CAN_MULTI_CONN != 0
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// A metadata context the server selected, with its id for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// What the handshake established about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name as requested.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    pub flags: TransmissionFlags,
    pub block_size: Option<BlockSize>,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// Contexts selected by `NBD_OPT_SET_META_CONTEXT` (empty if none asked or none known).
    pub meta_contexts: Vec<MetaContext>,
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

fn check_string(what: &str, s: &str) -> Result<u32> {
    match u32::try_from(s.len()) {
        Ok(len) if s.len() <= MAX_STRING && !s.contains('\0') => Ok(len),
        _ => Err(Error::invalid(format!(
            "{what} longer than {MAX_STRING} bytes or contains NUL"
        ))),
    }
}

fn not_found(export: &str, r: &OptReply) -> Error {
    Error::ExportNotFound {
        export: export.to_owned(),
        message: String::from_utf8_lossy(&r.data[..r.data.len().min(MAX_STRING)]).into_owned(),
    }
}

pub(crate) struct Handshake<'a, R, W> {
    pub r: &'a mut R,
    pub w: &'a mut W,
    pub limits: &'a Limits,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Handshake<'_, R, W> {
    async fn read_u16(&mut self) -> Result<u16> {
        self.r
            .read_u16()
            .await
            .map_err(|e| Error::io("reading handshake", e))
    }
    async fn read_u32(&mut self) -> Result<u32> {
        self.r
            .read_u32()
            .await
            .map_err(|e| Error::io("reading handshake", e))
    }
    async fn read_u64(&mut self) -> Result<u64> {
        self.r
            .read_u64()
            .await
            .map_err(|e| Error::io("reading handshake", e))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.w
            .write_all(bytes)
            .await
            .map_err(|e| Error::io("writing handshake", e))?;
        self.w
            .flush()
            .await
            .map_err(|e| Error::io("writing handshake", e))
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        let len = u32::try_from(data.len())
            .map_err(|_| Error::invalid(format!("option {option} data of {} bytes", data.len())))?;
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b).await
    }

    async fn read_option_reply(&mut self, option: u32) -> Result<OptReply> {
        let magic = self.read_u64().await?;
        if magic != OPT_REPLY_MAGIC {
            return Err(Error::protocol(format!(
                "bad option reply magic {magic:#x} for {}",
                option_name(option)
            )));
        }
        let got = self.read_u32().await?;
        if got != option {
            return Err(Error::protocol(format!(
                "reply for option {got} while waiting for {}",
                option_name(option)
            )));
        }
        let kind = self.read_u32().await?;
        let len = self.read_u32().await?;
        if len > self.limits.max_option_reply {
            return Err(Error::limit(
                "option reply length",
                len.into(),
                self.limits.max_option_reply.into(),
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.r
            .read_exact(&mut data)
            .await
            .map_err(|e| Error::io("reading option reply", e))?;
        Ok(OptReply { kind, data })
    }

    fn rejected(option: u32, r: &OptReply) -> Error {
        if r.kind & REP_FLAG_ERROR == 0 {
            return Error::protocol(format!(
                "unexpected {} ({}) in reply to {}",
                reply_type_name(r.kind),
                r.kind,
                option_name(option)
            ));
        }
        Error::OptionRejected {
            option,
            reply: r.kind,
            message: String::from_utf8_lossy(&r.data[..r.data.len().min(MAX_STRING)]).into_owned(),
        }
    }

    /// Soft disconnect during option haggling: `NBD_OPT_ABORT`, then wait briefly for the ack.
    pub async fn abort(&mut self, wait: Duration) {
        if self.send_option(OPT_ABORT, &[]).await.is_ok() {
            let _ = tokio::time::timeout(wait, self.read_option_reply(OPT_ABORT)).await;
        }
        let _ = self.w.shutdown().await;
    }

    /// Runs the whole handshake. On an error after the greeting that leaves the stream in
    /// sync (an option rejected), a soft disconnect is sent before returning.
    pub async fn run(
        &mut self,
        export: &str,
        structured: bool,
        contexts: &[String],
    ) -> Result<ExportInfo> {
        let name_len = check_string("export name", export)?;
        for c in contexts {
            check_string("metadata context", c)?;
        }
        if self.read_u64().await? != NBDMAGIC {
            return Err(Error::protocol("server greeting lacks NBDMAGIC"));
        }
        match self.read_u64().await? {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(Error::unsupported("server uses the oldstyle handshake")),
            m => return Err(Error::protocol(format!("bad server greeting magic {m:#x}"))),
        }
        let hflags = self.read_u16().await?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::unsupported(
                "server does not offer fixed newstyle negotiation",
            ));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        self.send(&cflags.to_be_bytes()).await?;

        let result = self
            .options(export, name_len, structured, contexts, no_zeroes)
            .await;
        if let Err(Error::OptionRejected { .. } | Error::ExportNotFound { .. }) = &result {
            self.abort(Duration::from_secs(1)).await;
        }
        result
    }

    async fn options(
        &mut self,
        export: &str,
        name_len: u32,
        want_structured: bool,
        contexts: &[String],
        no_zeroes: bool,
    ) -> Result<ExportInfo> {
        let mut structured = false;
        if want_structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
            let r = self.read_option_reply(OPT_STRUCTURED_REPLY).await?;
            match r.kind {
                REP_ACK => structured = true,
                k if k & REP_FLAG_ERROR != 0 => {}
                _ => return Err(Self::rejected(OPT_STRUCTURED_REPLY, &r)),
            }
        }

        let mut meta_contexts = Vec::new();
        if structured && !contexts.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(&name_len.to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            let count = u32::try_from(contexts.len())
                .map_err(|_| Error::invalid(format!("{} metadata contexts", contexts.len())))?;
            d.extend_from_slice(&count.to_be_bytes());
            for c in contexts {
                // run() checked every name with check_string.
                d.extend_from_slice(&check_string("metadata context", c)?.to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d).await?;
            let mut n = 0u32;
            loop {
                n += 1;
                if n > self.limits.max_option_replies {
                    return Err(Error::limit(
                        "option replies",
                        n.into(),
                        self.limits.max_option_replies.into(),
                    ));
                }
                let r = self.read_option_reply(OPT_SET_META_CONTEXT).await?;
                match r.kind {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        if r.data.len() < 4 || r.data.len() - 4 > MAX_STRING {
                            return Err(Error::protocol("malformed NBD_REP_META_CONTEXT"));
                        }
                        let id = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
                        let name = String::from_utf8(r.data[4..].to_vec())
                            .map_err(|_| Error::protocol("metadata context name is not UTF-8"))?;
                        if meta_contexts.iter().any(|c: &MetaContext| c.id == id) {
                            return Err(Error::protocol(format!(
                                "metadata context id {id} given twice"
                            )));
                        }
                        meta_contexts.push(MetaContext { id, name });
                        let max = self.limits.max_meta_contexts;
                        if meta_contexts.len() as u64 > u64::from(max) {
                            return Err(Error::limit(
                                "metadata contexts",
                                meta_contexts.len() as u64,
                                max.into(),
                            ));
                        }
                    }
                    REP_ERR_UNKNOWN => return Err(not_found(export, &r)),
                    _ => return Err(Self::rejected(OPT_SET_META_CONTEXT, &r)),
                }
            }
        }

        let mut d = Vec::new();
        d.extend_from_slice(&name_len.to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d).await?;
        let mut export_info: Option<(u64, u16)> = None;
        let mut block_size = None;
        let mut n = 0u32;
        loop {
            n += 1;
            if n > self.limits.max_option_replies {
                return Err(Error::limit(
                    "option replies",
                    n.into(),
                    self.limits.max_option_replies.into(),
                ));
            }
            let r = self.read_option_reply(OPT_GO).await?;
            match r.kind {
                REP_ACK => break,
                REP_INFO => {
                    if r.data.len() < 2 {
                        return Err(Error::protocol("NBD_REP_INFO shorter than 2 bytes"));
                    }
                    let info = u16::from_be_bytes([r.data[0], r.data[1]]);
                    let p = &r.data[2..];
                    match info {
                        INFO_EXPORT => {
                            let [s0, s1, s2, s3, s4, s5, s6, s7, f0, f1] = p else {
                                return Err(Error::protocol("NBD_INFO_EXPORT of wrong length"));
                            };
                            let size = u64::from_be_bytes([*s0, *s1, *s2, *s3, *s4, *s5, *s6, *s7]);
                            export_info = Some((size, u16::from_be_bytes([*f0, *f1])));
                        }
                        INFO_BLOCK_SIZE => {
                            if p.len() != 12 {
                                return Err(Error::protocol("NBD_INFO_BLOCK_SIZE of wrong length"));
                            }
                            let g =
                                |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
                            let bs = BlockSize {
                                min: g(0),
                                preferred: g(4),
                                max: g(8),
                            };
                            if bs.min == 0 || bs.min > bs.max || bs.preferred == 0 {
                                return Err(Error::protocol(format!(
                                    "invalid block size constraints {bs:?}"
                                )));
                            }
                            block_size = Some(bs);
                        }
                        _ => {} // Unknown information types are ignored.
                    }
                }
                REP_ERR_UNSUP => {
                    return self
                        .export_name(export, no_zeroes, structured, meta_contexts)
                        .await;
                }
                REP_ERR_UNKNOWN => return Err(not_found(export, &r)),
                _ => return Err(Self::rejected(OPT_GO, &r)),
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| Error::protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        Ok(ExportInfo {
            name: export.to_owned(),
            size,
            flags: TransmissionFlags(flags),
            block_size,
            structured_replies: structured,
            meta_contexts,
        })
    }

    /// Old way into transmission for servers without `NBD_OPT_GO`.
    async fn export_name(
        &mut self,
        export: &str,
        no_zeroes: bool,
        structured: bool,
        meta_contexts: Vec<MetaContext>,
    ) -> Result<ExportInfo> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes()).await?;
        let size = self.read_u64().await?;
        let flags = self.read_u16().await?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            self.r
                .read_exact(&mut z)
                .await
                .map_err(|e| Error::io("reading handshake", e))?;
        }
        Ok(ExportInfo {
            name: export.to_owned(),
            size,
            flags: TransmissionFlags(flags),
            block_size: None,
            structured_replies: structured,
            meta_contexts,
        })
    }
}
