//! Unit and property tests of the pure codec: round trips, reassembly, and "random bytes
//! never panic" over the same path the reader task uses.

use bytes::{Bytes, BytesMut};
use cairn_nbd::ErrorKind;
use cairn_nbd::codec::{
    Frame, Limits, Outcome, Progress, ReplyState, RequestHeader, encode_chunk, encode_simple_reply,
    next_frame, parse_chunk, simulate_replies,
};
use cairn_nbd::proto::*;
use proptest::prelude::*;

fn frame(buf: &mut BytesMut, structured: bool) -> Result<Progress, cairn_nbd::Error> {
    next_frame(buf, structured, &Limits::default(), |_| Some(0))
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    encode_chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    encode_chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

fn status_chunk(flags: u16, cookie: u64, id: u32, desc: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (l, f) in desc {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    encode_chunk(flags, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

/// Feeds whole encoded chunks into a state; returns the final result.
fn feed(
    state: &mut ReplyState,
    bytes: &[u8],
) -> Result<Option<Result<Outcome, cairn_nbd::Error>>, cairn_nbd::Error> {
    let mut buf = BytesMut::from(bytes);
    let mut last = None;
    loop {
        match frame(&mut buf, true)? {
            Progress::NeedMore(_) => return Ok(last),
            Progress::Frame(Frame::Chunk {
                flags,
                kind,
                payload,
                ..
            }) => {
                last = state.on_chunk(flags, kind, payload, &Limits::default())?;
            }
            Progress::Frame(f) => panic!("unexpected {f:?}"),
        }
    }
}

#[test]
fn oversized_chunk_is_rejected_before_payload() {
    let mut hdr = encode_chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &[]);
    hdr[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let e = frame(&mut BytesMut::from(&hdr[..]), true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
}

#[test]
fn structured_chunk_without_negotiation_is_protocol_error() {
    let c = encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]);
    let e = frame(&mut BytesMut::from(&c[..]), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
}

#[test]
fn unknown_cookie_on_simple_reply() {
    let r = encode_simple_reply(0, 99);
    let e = next_frame(
        &mut BytesMut::from(&r[..]),
        false,
        &Limits::default(),
        |_| None,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.to_string().contains("unknown cookie"));
}

#[test]
fn read_chunks_outside_or_overlapping_are_errors() {
    let mut s = ReplyState::new(CMD_READ, 0, 4096, 4096, vec![]);
    let e = feed(&mut s, &data_chunk(0, 1, 4000, &[0; 200])).unwrap_err();
    assert!(e.to_string().contains("before the requested range"), "{e}");
    let mut s = ReplyState::new(CMD_READ, 0, 4096, 4096, vec![]);
    let e = feed(&mut s, &hole_chunk(0, 1, 8000, 200)).unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");
    let mut s = ReplyState::new(CMD_READ, 0, 4096, 4096, vec![]);
    let mut b = data_chunk(0, 1, 4096, &[1; 100]);
    b.extend(hole_chunk(0, 1, 4100, 10));
    let e = feed(&mut s, &b).unwrap_err();
    assert!(e.to_string().contains("overlapping"), "{e}");
    // Done before everything is covered.
    let mut s = ReplyState::new(CMD_READ, 0, 4096, 4096, vec![]);
    let e = feed(&mut s, &data_chunk(REPLY_FLAG_DONE, 1, 4096, &[1; 100])).unwrap_err();
    assert!(e.to_string().contains("covers only 100"), "{e}");
}

#[test]
fn error_chunks_give_server_errors() {
    let mut s = ReplyState::new(CMD_READ, 0, 0, 512, vec![]);
    let mut p = EIO.to_be_bytes().to_vec();
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(b"oops");
    p.extend_from_slice(&100u64.to_be_bytes());
    let mut b = encode_chunk(0, REPLY_TYPE_ERROR_OFFSET, 1, &p);
    b.extend(encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]));
    let e = feed(&mut s, &b).unwrap().unwrap().unwrap_err();
    match e {
        cairn_nbd::Error::Server {
            errno,
            error_offset,
            ref message,
            ..
        } => {
            assert_eq!(
                (errno, error_offset, message.as_str()),
                (EIO, Some(100), "oops")
            );
        }
        e => panic!("{e}"),
    }
    // An error offset outside the request is a protocol violation.
    let mut s = ReplyState::new(CMD_READ, 0, 0, 50, vec![]);
    assert_eq!(feed(&mut s, &b).unwrap_err().kind(), ErrorKind::Protocol);
}

#[test]
fn block_status_validation() {
    // The last extent is clamped to the request.
    let mut s = ReplyState::new(CMD_BLOCK_STATUS, 0, 1000, 100, vec![7]);
    let r = feed(
        &mut s,
        &status_chunk(REPLY_FLAG_DONE, 1, 7, &[(60, 1), (500, 0)]),
    )
    .unwrap();
    let Some(Ok(Outcome::BlockStatus(v))) = r else {
        panic!("{r:?}")
    };
    assert_eq!(v[0].0, 7);
    assert_eq!(
        v[0].1
            .iter()
            .map(|e| (e.offset, e.len, e.flags))
            .collect::<Vec<_>>(),
        vec![(1000, 60, 1), (1060, 40, 0)]
    );
    // Extents continuing past the request are an error.
    let mut s = ReplyState::new(CMD_BLOCK_STATUS, 0, 1000, 100, vec![7]);
    let e = feed(&mut s, &status_chunk(0, 1, 7, &[(100, 1), (5, 0)])).unwrap_err();
    assert!(e.to_string().contains("beyond the requested range"), "{e}");
    // Unnegotiated context id.
    let mut s = ReplyState::new(CMD_BLOCK_STATUS, 0, 0, 100, vec![7]);
    assert!(feed(&mut s, &status_chunk(0, 1, 8, &[(100, 1)])).is_err());
    // Missing context at the end.
    let mut s = ReplyState::new(CMD_BLOCK_STATUS, 0, 0, 100, vec![7, 8]);
    assert!(feed(&mut s, &status_chunk(REPLY_FLAG_DONE, 1, 8, &[(100, 1)])).is_err());
    // Too many extents for the limit.
    let desc = vec![(1u32, 0u32); 20];
    let p = Bytes::from(status_chunk(0, 1, 7, &desc)[20..].to_vec());
    let limits = Limits {
        max_extents: 10,
        ..Limits::default()
    };
    let e = parse_chunk(REPLY_TYPE_BLOCK_STATUS, p, &limits).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
}

#[test]
fn too_many_chunks_in_one_reply() {
    let limits = Limits {
        max_chunks_per_reply: 4,
        ..Limits::default()
    };
    let mut s = ReplyState::new(CMD_READ, 0, 0, 100, vec![]);
    let mut err = None;
    for i in 0..10u64 {
        let c = hole_chunk(0, 1, i, 1);
        if let Err(e) = s.on_chunk(
            0,
            REPLY_TYPE_OFFSET_HOLE,
            Bytes::from(c[20..].to_vec()),
            &limits,
        ) {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::LimitExceeded));
}

proptest! {
    #[test]
    fn request_header_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader { flags, command, cookie, offset, len };
        let b = h.encode();
        prop_assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]), REQUEST_MAGIC);
        prop_assert_eq!(RequestHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), structured: bool) {
        let _ = simulate_replies(&data, structured);
    }

    /// Random sequences of well-framed chunks with random types, flags, cookies and payloads
    /// get much deeper into the checks than raw random bytes.
    #[test]
    fn random_chunks_never_panic(
        chunks in proptest::collection::vec(
            (0u16..4, prop_oneof![Just(0u16), Just(1), Just(2), Just(5), Just(0x8001), Just(0x8002), Just(0x8003), any::<u16>()],
             1u64..7, proptest::collection::vec(any::<u8>(), 0..64)),
            0..24),
        simple in proptest::collection::vec((0u32..3, 1u64..7), 0..4),
    ) {
        let mut bytes = Vec::new();
        for (flags, kind, cookie, payload) in &chunks {
            bytes.extend(encode_chunk(*flags, *kind, *cookie, payload));
        }
        for (err, cookie) in &simple {
            bytes.extend(encode_simple_reply(*err, *cookie));
        }
        let _ = simulate_replies(&bytes, true);
        let _ = simulate_replies(&bytes, false);
    }

    /// A read split into data and hole chunks, sent in any order, reassembles exactly.
    #[test]
    fn read_reassembly(
        cuts in proptest::collection::btree_set(1u32..4096, 0..12),
        holes in proptest::collection::vec(any::<bool>(), 13),
        order in proptest::collection::vec(any::<u32>(), 13),
        base in 0u64..1 << 40,
    ) {
        let len = 4096u32;
        let expected: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let mut bounds: Vec<u32> = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(len);
        let mut pieces: Vec<(u32, u32, bool)> = bounds.windows(2).enumerate()
            .map(|(i, w)| (w[0], w[1], holes[i])).collect();
        pieces.sort_by_key(|p| order[p.0 as usize % order.len()] ^ p.0);
        let mut want = expected.clone();
        let mut bytes = Vec::new();
        for (s, e, hole) in &pieces {
            if *hole {
                want[*s as usize..*e as usize].fill(0);
                bytes.extend(hole_chunk(0, 1, base + u64::from(*s), e - s));
            } else {
                bytes.extend(data_chunk(0, 1, base + u64::from(*s), &expected[*s as usize..*e as usize]));
            }
        }
        bytes.extend(encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]));
        let mut st = ReplyState::new(CMD_READ, 0, base, len, vec![]);
        match feed(&mut st, &bytes).unwrap() {
            Some(Ok(Outcome::Read(d))) => prop_assert_eq!(&d[..], &want[..]),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}
