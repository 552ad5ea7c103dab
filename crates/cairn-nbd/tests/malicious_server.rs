//! A tiny fake NBD server on a unix socket that misbehaves in chosen ways. Every misdeed must
//! give a typed error quickly: no panic, no hang, no huge allocation.

use std::time::{Duration, Instant};

use cairn_nbd::codec::{RequestHeader, encode_chunk, encode_simple_reply};
use cairn_nbd::proto::*;
use cairn_nbd::{BASE_ALLOCATION, Client, ConnectOptions, Error, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Misdeed {
    /// Handshake ends after a few bytes and the socket closes.
    TruncatedHandshake,
    /// Handshake stops half way and the server goes quiet.
    StalledHandshake,
    /// An option reply announcing 1 GiB of payload.
    HugeOptionReply,
    /// `NBD_REP_ERR_UNKNOWN` to `NBD_OPT_GO`; records whether `NBD_OPT_ABORT` followed.
    UnknownExport,
    /// A reply chunk header announcing ~4 GiB of payload.
    OversizedChunk,
    /// A reply for a cookie never sent.
    UnknownCookie,
    /// Read data at an offset outside the request.
    ReadOutsideRequest,
    /// Block status extents running past the request.
    ExtentOutsideRequest,
    /// Requests are read but never answered.
    NeverAnswers,
    /// First request gets an EIO error chunk, the rest are answered properly.
    ErrorThenFine,
    /// The socket closes while a request is in flight.
    CloseMidRequest,
    /// Every request gets `ESHUTDOWN`; the server returns after `NBD_CMD_DISC`.
    Shutdown,
    /// Not a misdeed: reads are answered correctly (byte at offset `o` is `o % 251`) with
    /// several data chunks out of order plus a hole, written in small odd-sized pieces.
    FragmentedReads,
    /// A large read's data chunk is cut off half way and the socket closes.
    CloseMidPayload,
}

/// Content of the `FragmentedReads` export.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

/// A READ answered as: second half of the data, a 100-byte hole (if it fits), first half.
fn fragmented_read_reply(req: &RequestHeader) -> Vec<u8> {
    let len = u64::from(req.len);
    let half = len / 2;
    let hole = if half > 200 { 100 } else { 0 };
    let data = |off: u64, n: u64, flags: u16| {
        let mut p = off.to_be_bytes().to_vec();
        p.extend_from_slice(&pattern(off, n as usize));
        encode_chunk(flags, REPLY_TYPE_OFFSET_DATA, req.cookie, &p)
    };
    let mut r = data(req.offset + half, len - half, 0);
    if hole > 0 {
        let mut p = (req.offset + half - hole).to_be_bytes().to_vec();
        p.extend_from_slice(&(hole as u32).to_be_bytes());
        r.extend_from_slice(&encode_chunk(0, REPLY_TYPE_OFFSET_HOLE, req.cookie, &p));
    }
    r.extend_from_slice(&data(req.offset, half - hole, REPLY_FLAG_DONE));
    r
}

fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Serves one connection; returns the options it saw.
async fn serve(mut s: UnixStream, m: Misdeed) -> std::io::Result<Vec<u32>> {
    let mut seen = Vec::new();
    let mut greet = NBDMAGIC.to_be_bytes().to_vec();
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    match m {
        Misdeed::TruncatedHandshake => {
            s.write_all(&greet[..11]).await?;
            return Ok(seen);
        }
        Misdeed::StalledHandshake => {
            s.write_all(&greet[..11]).await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return Ok(seen);
        }
        _ => s.write_all(&greet).await?,
    }
    let _client_flags = s.read_u32().await?;
    loop {
        let magic = s.read_u64().await?;
        assert_eq!(magic, IHAVEOPT);
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await?;
        seen.push(opt);
        match opt {
            OPT_STRUCTURED_REPLY if m == Misdeed::HugeOptionReply => {
                let mut r = opt_reply(opt, REP_ACK, &[]);
                r[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
                s.write_all(&r).await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return Ok(seen);
            }
            OPT_STRUCTURED_REPLY => s.write_all(&opt_reply(opt, REP_ACK, &[])).await?,
            OPT_SET_META_CONTEXT => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                s.write_all(&opt_reply(opt, REP_META_CONTEXT, &d)).await?;
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await?;
            }
            OPT_GO if m == Misdeed::UnknownExport => {
                s.write_all(&opt_reply(opt, REP_ERR_UNKNOWN, b"no such export"))
                    .await?;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&opt_reply(opt, REP_INFO, &d)).await?;
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await?;
                break;
            }
            OPT_ABORT => {
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await?;
                return Ok(seen);
            }
            _ => s.write_all(&opt_reply(opt, REP_ERR_UNSUP, &[])).await?,
        }
    }
    // Transmission.
    let mut n = 0;
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).await?;
        let req = RequestHeader::decode(&h).expect("client sent a bad request");
        n += 1;
        let c = req.cookie;
        let done = REPLY_FLAG_DONE;
        let reply: Vec<u8> = match (m, req.command) {
            (_, CMD_DISC) => {
                seen.push(u32::MAX); // marks NBD_CMD_DISC
                return Ok(seen);
            }
            (Misdeed::Shutdown, _) => encode_simple_reply(ESHUTDOWN, c),
            (Misdeed::NeverAnswers, _) => continue,
            (Misdeed::CloseMidRequest, _) => return Ok(seen),
            (Misdeed::OversizedChunk, _) => {
                let mut r = encode_chunk(done, REPLY_TYPE_OFFSET_DATA, c, &[]);
                r[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
                r
            }
            (Misdeed::UnknownCookie, _) => encode_chunk(done, REPLY_TYPE_NONE, c + 1000, &[]),
            (Misdeed::ReadOutsideRequest, CMD_READ) => {
                let mut p = (req.offset + u64::from(req.len)).to_be_bytes().to_vec();
                p.extend_from_slice(&vec![0xee; req.len as usize]);
                encode_chunk(done, REPLY_TYPE_OFFSET_DATA, c, &p)
            }
            (Misdeed::ExtentOutsideRequest, CMD_BLOCK_STATUS) => {
                let mut p = 1u32.to_be_bytes().to_vec();
                for _ in 0..2 {
                    p.extend_from_slice(&req.len.to_be_bytes());
                    p.extend_from_slice(&0u32.to_be_bytes());
                }
                encode_chunk(done, REPLY_TYPE_BLOCK_STATUS, c, &p)
            }
            (Misdeed::FragmentedReads, CMD_READ) => {
                for piece in fragmented_read_reply(&req).chunks(7001) {
                    s.write_all(piece).await?;
                    s.flush().await?;
                    tokio::task::yield_now().await;
                }
                continue;
            }
            (Misdeed::CloseMidPayload, CMD_READ) => {
                let mut p = req.offset.to_be_bytes().to_vec();
                p.extend_from_slice(&vec![0x5a; req.len as usize]);
                let r = encode_chunk(done, REPLY_TYPE_OFFSET_DATA, c, &p);
                s.write_all(&r[..r.len() / 2]).await?;
                return Ok(seen);
            }
            (Misdeed::ErrorThenFine, _) if n == 1 => {
                let mut p = EIO.to_be_bytes().to_vec();
                p.extend_from_slice(&5u16.to_be_bytes());
                p.extend_from_slice(b"bad!!");
                encode_chunk(done, REPLY_TYPE_ERROR, c, &p)
            }
            (_, CMD_READ) => {
                let mut p = req.offset.to_be_bytes().to_vec();
                p.extend_from_slice(&vec![0x5a; req.len as usize]);
                encode_chunk(done, REPLY_TYPE_OFFSET_DATA, c, &p)
            }
            _ => encode_simple_reply(0, c),
        };
        s.write_all(&reply).await?;
    }
}

struct Fake {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    task: tokio::task::JoinHandle<Vec<u32>>,
}

fn fake(m: Misdeed) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve(s, m).await.unwrap_or_default()
    });
    Fake {
        _dir: dir,
        path,
        task,
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions::default()
        .with_context(BASE_ALLOCATION)
        .with_timeout(Duration::from_millis(500))
}

async fn connect(f: &Fake) -> Result<Client, Error> {
    Client::connect_unix(&f.path, "", opts()).await
}

/// Each scenario must end within a few timeouts.
async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("client hung");
    assert!(start.elapsed() < Duration::from_secs(5));
    r
}

#[tokio::test]
async fn truncated_handshake_is_io_error() {
    let f = fake(Misdeed::TruncatedHandshake);
    let e = bounded(connect(&f)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
}

#[tokio::test]
async fn stalled_handshake_times_out() {
    let f = fake(Misdeed::StalledHandshake);
    let e = bounded(connect(&f)).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Timeout {
                op: "handshaking",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn huge_option_reply_is_limited() {
    let f = fake(Misdeed::HugeOptionReply);
    let e = bounded(connect(&f)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
}

#[tokio::test]
async fn unknown_export_then_soft_abort() {
    let f = fake(Misdeed::UnknownExport);
    let e = bounded(connect(&f)).await.unwrap_err();
    assert!(
        matches!(e, Error::ExportNotFound { ref message, .. } if message == "no such export"),
        "{e}"
    );
    let seen = f.task.await.unwrap();
    assert_eq!(seen.last(), Some(&OPT_ABORT), "{seen:?}");
}

#[tokio::test]
async fn oversized_chunk_is_limit_error_and_fatal() {
    let f = fake(Misdeed::OversizedChunk);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(0, 4096)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    // The connection is dead and says why.
    let e2 = bounded(c.read_at(0, 4096)).await.unwrap_err();
    assert_eq!(e2.kind(), ErrorKind::LimitExceeded);
    assert_eq!(
        c.closed_reason().map(|e| e.kind()),
        Some(ErrorKind::LimitExceeded)
    );
}

#[tokio::test]
async fn unknown_cookie_is_protocol_error() {
    let f = fake(Misdeed::UnknownCookie);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(0, 512)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("unknown cookie"), "{e}");
}

#[tokio::test]
async fn read_chunk_outside_request_is_protocol_error() {
    let f = fake(Misdeed::ReadOutsideRequest);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(4096, 512)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
}

#[tokio::test]
async fn extent_outside_request_is_protocol_error() {
    let f = fake(Misdeed::ExtentOutsideRequest);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.block_status(0, 65536, BASE_ALLOCATION))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("beyond the requested range"), "{e}");
}

#[tokio::test]
async fn silent_server_times_out_every_request() {
    let f = fake(Misdeed::NeverAnswers);
    let c = connect(&f).await.unwrap();
    // Several pipelined requests: all fail once the first wait times out.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let c = c.clone();
        set.spawn(async move { c.read_at(i * 4096, 4096).await });
    }
    bounded(async {
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap_err().kind(), ErrorKind::Timeout);
        }
    })
    .await;
    assert_eq!(
        bounded(c.flush()).await.unwrap_err().kind(),
        ErrorKind::Timeout
    );
}

#[tokio::test]
async fn server_error_is_not_fatal() {
    let f = fake(Misdeed::ErrorThenFine);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(0, 512)).await.unwrap_err();
    assert!(
        matches!(e, Error::Server { errno: EIO, command: CMD_READ, offset: 0, len: 512, ref message, .. } if message == "bad!!"),
        "{e}"
    );
    assert!(!e.is_fatal());
    let d = bounded(c.read_at(512, 512)).await.unwrap();
    assert!(d.iter().all(|b| *b == 0x5a));
    bounded(c.flush()).await.unwrap();
    bounded(c.disconnect()).await.unwrap();
    let seen = f.task.await.unwrap();
    assert_eq!(
        seen,
        vec![OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO, u32::MAX]
    );
}

#[tokio::test]
async fn server_closing_fails_requests_in_flight() {
    let f = fake(Misdeed::CloseMidRequest);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(0, 512)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(
        bounded(c.read_at(0, 512)).await.unwrap_err().kind(),
        ErrorKind::Io
    );
}

#[tokio::test]
async fn eshutdown_stops_new_requests_and_disconnects() {
    let f = fake(Misdeed::Shutdown);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.flush()).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Server {
                errno: ESHUTDOWN,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        bounded(c.read_at(0, 512)).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    bounded(c.disconnect()).await.unwrap();
    assert_eq!(f.task.await.unwrap().last(), Some(&u32::MAX));
}

#[tokio::test]
async fn fragmented_large_and_small_reads_reassemble() {
    let f = fake(Misdeed::FragmentedReads);
    let c = connect(&f).await.unwrap();
    // Large frames take the direct-read path, small ones the buffered path; mix them.
    let mut set = tokio::task::JoinSet::new();
    for (off, len) in [
        (0u64, 300_000usize),
        (5, 17),
        (300_001, 70_001),
        (1000, 40_000),
    ] {
        let c = c.clone();
        set.spawn(async move { (off, len, c.read_at(off, len).await) });
    }
    bounded(async {
        while let Some(r) = set.join_next().await {
            let (off, len, d) = r.unwrap();
            let d = d.unwrap();
            let mut want = pattern(off, len);
            if len > 400 {
                let half = len / 2;
                want[half - 100..half].fill(0);
            }
            assert!(d[..] == want[..], "read {off}+{len} differs");
        }
    })
    .await;
    bounded(c.disconnect()).await.unwrap();
}

#[tokio::test]
async fn close_mid_payload_is_io_error_and_fatal() {
    let f = fake(Misdeed::CloseMidPayload);
    let c = connect(&f).await.unwrap();
    let e = bounded(c.read_at(0, 256 << 10)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(c.closed_reason().map(|e| e.kind()), Some(ErrorKind::Io));
}
