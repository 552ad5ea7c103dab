//! Framing shared by the QMP and guest-agent clients: bounded reads of delimited messages.
//!
//! Both protocols send one JSON object per line. A peer that never sends the delimiter must not
//! make us buffer without end, so every read is capped at [`MAX_MESSAGE_BYTES`].

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The largest message either protocol may send us (a `query-named-block-nodes` reply of a VM
/// with many disks is a few hundred KiB; a `guest-exec-status` with captured output a few MiB).
pub(crate) const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// How a bounded read ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `buf` ends with the delimiter.
    Complete,
    /// The peer closed the stream; `buf` holds whatever came after the last delimiter.
    Eof,
}

/// Appends bytes to `buf` up to and including `delim`. Fails with `InvalidData` once `buf` would
/// exceed `max` bytes. Not cancel safe: bytes read before a cancellation are in `buf` only.
pub(crate) async fn read_frame<R>(
    reader: &mut R,
    delim: u8,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Frame>
where
    R: AsyncBufRead + Unpin,
{
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Frame::Eof);
        }
        let (take, done) = match available.iter().position(|&b| b == delim) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message longer than {max} bytes"),
            ));
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(Frame::Complete);
        }
    }
}

/// The bytes of `buf` without leading and trailing ASCII whitespace (QEMU ends lines with CRLF).
pub(crate) fn trim(buf: &[u8]) -> &[u8] {
    let start = buf.iter().position(|b| !b.is_ascii_whitespace());
    let end = buf.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &buf[s..=e],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_on_delimiter_and_report_eof() {
        let mut input: &[u8] = b"{\"a\":1}\r\n{\"b\":2}\npartial";
        let mut buf = Vec::new();
        assert_eq!(
            read_frame(&mut input, b'\n', &mut buf, 100).await.unwrap(),
            Frame::Complete
        );
        assert_eq!(trim(&buf), b"{\"a\":1}");
        buf.clear();
        read_frame(&mut input, b'\n', &mut buf, 100).await.unwrap();
        assert_eq!(trim(&buf), b"{\"b\":2}");
        buf.clear();
        assert_eq!(
            read_frame(&mut input, b'\n', &mut buf, 100).await.unwrap(),
            Frame::Eof
        );
        assert_eq!(buf, b"partial");
    }

    #[tokio::test]
    async fn overlong_message_is_an_error() {
        let data = vec![b'x'; 1000];
        let mut input: &[u8] = &data;
        let mut buf = Vec::new();
        let err = read_frame(&mut input, b'\n', &mut buf, 100)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn trim_handles_blank_input() {
        assert_eq!(trim(b" \r\n"), b"");
        assert_eq!(trim(b"\xff{}\r\n"), b"\xff{}");
    }
}
