//! Binary frames of the vault protocol (digest lists, blob uploads, blob downloads).
//!
//! ```text
//! digest list : digest[32] × n
//! lacking     : u8 × n (1 = lacking)
//! upload      : (kind u8 codec u8 members u32 stored_len u32
//!                (digest[32] raw_len u32) × members  bytes[stored_len]) × n     one frame each
//! download    : (codec u8 same u8 frame_len u32 inner u32 raw_len u32 stored_len u32
//!                bytes[stored_len]) × n, in request order
//! near request: required u32  digest[32] × n            the first `required` must be found
//! near answer : (index u32  one download answer) × m     in the server's order
//! ```
//!
//! `fetch-near` answers every required digest and those optional ones that lie in a frame a
//! required one is in, each with its index in the request; answers of one frame are adjacent,
//! so `same` works as in a download.
//!
//! An uploaded frame's members follow one another in its plaintext. A download answers each
//! digest with the frame that holds it and the segment's place in it; `same = 1` (with
//! `stored_len = 0`) means "the frame of the previous answer", so a frame is sent once for a
//! run of its members. All integers little-endian. Parsers check every length against the
//! limits below.

use cairn_chunk::EncodedSegment;
use cairn_chunk::format::{BlobKind, SEGMENT_MAX_LEN};
use cairn_chunk::{Codec, Member};
use cairn_types::Digest;

use crate::api::Upload;

/// Most digests in one request.
pub const MAX_DIGESTS: usize = 1 << 16;
/// Largest request or response body: an upload request. The client sends at most a 4 MiB
/// batch of data frames (plus one segment) or 4096 tree nodes of at most 12 KiB; the service
/// never holds more than one frame of it (at most [`MAX_UPLOAD_FRAME`]) at a time.
pub const MAX_BODY: usize = 128 << 20;
/// Largest digest-list request (`lacking`, `fetch`).
pub const MAX_DIGEST_BODY: usize = MAX_DIGESTS * 32;
/// Largest JSON request (commit, maintenance, forget).
pub const MAX_JSON_BODY: usize = 4 << 20;
/// Largest upload frame: header, [`MAX_DIGESTS`] members and [`SEGMENT_MAX_LEN`] stored bytes.
pub const MAX_UPLOAD_FRAME: usize =
    UPLOAD_HEADER_LEN + MAX_DIGESTS * UPLOAD_MEMBER_LEN + SEGMENT_MAX_LEN;

pub fn encode_digests(d: &[Digest]) -> Vec<u8> {
    d.iter().flat_map(|d| d.0).collect()
}

pub fn decode_digests(b: &[u8]) -> Result<Vec<Digest>, String> {
    if !b.len().is_multiple_of(32) || b.len() / 32 > MAX_DIGESTS {
        return Err(format!(
            "digest list of {} bytes (must be a multiple of 32, at most {MAX_DIGESTS} digests)",
            b.len()
        ));
    }
    Ok(b.chunks_exact(32)
        .map(|c| Digest::from_slice(c).expect("32"))
        .collect())
}

/// Encodes uploads in the `upload` layout above.
///
/// # Panics
///
/// If an upload holds 2^32 segments or 4 GiB (a frame holds far less).
pub fn encode_uploads(u: &[Upload]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        u.iter()
            .map(|x| 10 + 36 * x.members.len() + x.seg.bytes.len())
            .sum(),
    );
    for x in u {
        out.push(x.kind as u8);
        out.push(x.seg.codec as u8);
        let members =
            u32::try_from(x.members.len()).expect("an upload of fewer than 2^32 segments");
        let stored = u32::try_from(x.seg.bytes.len()).expect("an upload below 4 GiB");
        out.extend_from_slice(&members.to_le_bytes());
        out.extend_from_slice(&stored.to_le_bytes());
        for (d, n) in &x.members {
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&x.seg.bytes);
    }
    out
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err(format!("truncated frame: {what}"));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Length of an upload frame's header.
pub const UPLOAD_HEADER_LEN: usize = 10;
/// Length of one member record of an upload frame.
pub const UPLOAD_MEMBER_LEN: usize = 36;

/// The header of one upload frame, checked against the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadHeader {
    pub kind: BlobKind,
    pub codec: Codec,
    /// Number of member records that follow.
    pub members: usize,
    /// Length of the frame's stored bytes, after the members.
    pub stored: usize,
}

/// Parses a frame header; `segments` counts the members of the request so far (at most
/// [`MAX_DIGESTS`] per request).
pub fn parse_upload_header(h: &[u8], segments: &mut usize) -> Result<UploadHeader, String> {
    if h.len() != UPLOAD_HEADER_LEN {
        return Err("truncated frame: frame header".into());
    }
    let kind = BlobKind::from_u8(h[0]).ok_or("unknown blob kind")?;
    let codec = Codec::from_u8(h[1]).ok_or("unknown codec")?;
    let n = u32_at(&h[2..6]) as usize;
    let stored = u32_at(&h[6..10]) as usize;
    *segments += n;
    if n == 0 || *segments > MAX_DIGESTS {
        return Err(format!(
            "frame of {n} segments (1..{MAX_DIGESTS} per request)"
        ));
    }
    if stored > SEGMENT_MAX_LEN {
        return Err(format!("frame of {stored} bytes exceeds the limit"));
    }
    Ok(UploadHeader {
        kind,
        codec,
        members: n,
        stored,
    })
}

/// Parses a frame's member records (`UPLOAD_MEMBER_LEN` bytes each); their plaintext adds up
/// to at most [`SEGMENT_MAX_LEN`].
pub fn parse_upload_members(ms: &[u8]) -> Result<Vec<(Digest, u32)>, String> {
    if !ms.len().is_multiple_of(UPLOAD_MEMBER_LEN) {
        return Err("truncated frame: frame members".into());
    }
    let members: Vec<(Digest, u32)> = ms
        .chunks_exact(UPLOAD_MEMBER_LEN)
        .map(|m| {
            (
                Digest::from_slice(&m[..32]).expect("32"),
                u32_at(&m[32..36]),
            )
        })
        .collect();
    let total: u64 = members.iter().map(|m| u64::from(m.1)).sum();
    if total > SEGMENT_MAX_LEN as u64 {
        return Err(format!(
            "frame of {total} plaintext bytes exceeds the limit"
        ));
    }
    Ok(members)
}

/// Parses a whole upload body (the service parses the same frames as they stream in).
pub fn decode_uploads(mut b: &[u8]) -> Result<Vec<Upload>, String> {
    let mut out = Vec::new();
    let mut segments = 0usize;
    while !b.is_empty() {
        let h = take(&mut b, UPLOAD_HEADER_LEN, "frame header")?;
        let h = parse_upload_header(h, &mut segments)?;
        let ms = take(&mut b, h.members * UPLOAD_MEMBER_LEN, "frame members")?;
        let members = parse_upload_members(ms)?;
        let bytes = take(&mut b, h.stored, "frame body")?.to_vec();
        out.push(Upload {
            kind: h.kind,
            members,
            seg: EncodedSegment {
                codec: h.codec,
                bytes,
            },
        });
    }
    Ok(out)
}

/// Appends the answer for one digest; `bytes` is `None` when the frame is the previous
/// answer's.
///
/// # Panics
///
/// If `bytes` is 4 GiB or longer (a stored frame is far shorter).
pub fn encode_download(out: &mut Vec<u8>, codec: Codec, m: Member, bytes: Option<&[u8]>) {
    out.push(codec as u8);
    out.push(u8::from(bytes.is_none()));
    for v in [m.frame_len, m.inner, m.raw_len] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let bytes = bytes.unwrap_or_default();
    let len = u32::try_from(bytes.len()).expect("a stored frame below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// One downloaded answer: codec, the segment's place in its frame, and the frame's stored
/// bytes (`None`: the previous answer's frame).
pub type DownloadedBlob<'a> = (Codec, Member, Option<&'a [u8]>);

/// Parses a download of exactly `n` answers.
pub fn decode_download(mut b: &[u8], n: usize) -> Result<Vec<DownloadedBlob<'_>>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(download_answer(&mut b, i == 0)?);
    }
    if !b.is_empty() {
        return Err("trailing bytes after the last answer".into());
    }
    Ok(out)
}

/// One download answer; the first of a body cannot be "the previous frame".
fn download_answer<'a>(b: &mut &'a [u8], first: bool) -> Result<DownloadedBlob<'a>, String> {
    let h = take(b, 18, "answer header")?;
    let codec = Codec::from_u8(h[0]).ok_or("unknown codec")?;
    let same = match h[1] {
        0 => false,
        1 if !first => true,
        _ => return Err("bad \"same frame\" flag".into()),
    };
    let m = Member {
        frame_len: u32_at(&h[2..6]),
        inner: u32_at(&h[6..10]),
        raw_len: u32_at(&h[10..14]),
    };
    let stored = u32_at(&h[14..18]) as usize;
    if stored > SEGMENT_MAX_LEN || m.frame_len as usize > SEGMENT_MAX_LEN || (same && stored != 0) {
        return Err(format!(
            "answer of {stored} bytes exceeds the limit or the flag"
        ));
    }
    let bytes = take(b, stored, "frame body")?;
    Ok((codec, m, (!same).then_some(bytes)))
}

/// A `fetch-near` request: `required`, then `optional`.
///
/// # Panics
///
/// With 2^32 required digests (requests hold at most [`MAX_DIGESTS`]).
pub fn encode_near(required: &[Digest], optional: &[Digest]) -> Vec<u8> {
    let n = u32::try_from(required.len()).expect("at most MAX_DIGESTS");
    let mut out = n.to_le_bytes().to_vec();
    out.extend(required.iter().chain(optional).flat_map(|d| d.0));
    out
}

/// Parses a `fetch-near` request into its required and optional digests.
pub fn decode_near(b: &[u8]) -> Result<(Vec<Digest>, Vec<Digest>), String> {
    let mut rest = b;
    let n = u32_at(take(&mut rest, 4, "required count")?) as usize;
    let all = decode_digests(rest)?;
    if n > all.len() {
        return Err(format!("{n} required of {} digests", all.len()));
    }
    let optional = all[n..].to_vec();
    let mut required = all;
    required.truncate(n);
    Ok((required, optional))
}

/// Parses a `fetch-near` answer: (index, answer) pairs, each index below `n`.
pub fn decode_near_answer(
    mut b: &[u8],
    n: usize,
) -> Result<Vec<(usize, DownloadedBlob<'_>)>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if out.len() >= n.max(1) * 2 {
            return Err("more answers than digests asked for".into());
        }
        let i = u32_at(take(&mut b, 4, "answer index")?) as usize;
        if i >= n {
            return Err(format!("answer index {i} of {n} digests"));
        }
        let first = out.is_empty();
        out.push((i, download_answer(&mut b, first)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), n in 0usize..5) {
            let _ = decode_digests(&b);
            let _ = decode_uploads(&b);
            let _ = decode_download(&b, n);
            let _ = decode_near(&b);
            let _ = decode_near_answer(&b, n);
        }
    }

    #[test]
    fn near_requests_round_trip_and_answers_are_checked() {
        let (r, o) = (
            vec![Digest([1; 32])],
            vec![Digest([2; 32]), Digest([3; 32])],
        );
        assert_eq!(decode_near(&encode_near(&r, &o)).unwrap(), (r, o));
        assert!(
            decode_near(&[5, 0, 0, 0]).is_err(),
            "more required than digests"
        );
        let mut a = Vec::new();
        a.extend_from_slice(&1u32.to_le_bytes());
        let m = Member {
            frame_len: 3,
            inner: 0,
            raw_len: 3,
        };
        encode_download(&mut a, Codec::Raw, m, Some(&[1, 2, 3]));
        let got = decode_near_answer(&a, 2).unwrap();
        assert_eq!(got[0].0, 1);
        assert!(
            decode_near_answer(&a, 1).is_err(),
            "index beyond the request"
        );
    }

    #[test]
    fn upload_round_trip() {
        let seg = EncodedSegment {
            codec: Codec::Raw,
            bytes: vec![1, 2, 3],
        };
        let u = vec![
            Upload::single(Digest([3; 32]), BlobKind::Tree, 9, seg.clone()),
            Upload {
                kind: BlobKind::Data,
                members: vec![(Digest([4; 32]), 1), (Digest([5; 32]), 2)],
                seg,
            },
        ];
        let back = decode_uploads(&encode_uploads(&u)).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in back.iter().zip(&u) {
            assert_eq!((a.kind, &a.members, &a.seg), (b.kind, &b.members, &b.seg));
        }
        assert!(decode_uploads(&encode_uploads(&u)[..20]).is_err());
    }

    #[test]
    fn download_round_trip_sends_a_frame_once() {
        let m = |inner| Member {
            frame_len: 6,
            inner,
            raw_len: 3,
        };
        let mut out = Vec::new();
        encode_download(&mut out, Codec::Raw, m(0), Some(b"abcdef"));
        encode_download(&mut out, Codec::Raw, m(3), None);
        let back = decode_download(&out, 2).unwrap();
        assert_eq!(back[0], (Codec::Raw, m(0), Some(&b"abcdef"[..])));
        assert_eq!(back[1], (Codec::Raw, m(3), None));
        // "Same frame" cannot open an answer.
        assert!(decode_download(&out[24..], 1).is_err());
    }
}
