//! Binary frames of the vault protocol (digest lists, blob uploads, blob downloads).
//!
//! ```text
//! digest list : digest[32] × n
//! lacking     : u8 × n (1 = lacking)
//! upload      : (digest[32] kind u8 codec u8 raw_len u32 stored_len u32 bytes[stored_len]) × n
//! download    : (codec u8 raw_len u32 stored_len u32 bytes[stored_len]) × n, in request order
//! ```
//!
//! All integers little-endian. Parsers check every length against the limits below.

use cairn_chunk::Codec;
use cairn_chunk::EncodedSegment;
use cairn_chunk::format::{BlobKind, SEGMENT_MAX_LEN};
use cairn_types::Digest;

use crate::api::Upload;

/// Most digests in one request.
pub const MAX_DIGESTS: usize = 1 << 16;
/// Largest request or response body.
pub const MAX_BODY: usize = 128 << 20;

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

pub fn encode_uploads(u: &[Upload]) -> Vec<u8> {
    let mut out = Vec::with_capacity(u.iter().map(|x| 42 + x.seg.bytes.len()).sum());
    for x in u {
        out.extend_from_slice(x.digest.as_bytes());
        out.push(x.kind as u8);
        out.push(x.seg.codec as u8);
        out.extend_from_slice(&x.raw_len.to_le_bytes());
        out.extend_from_slice(&(x.seg.bytes.len() as u32).to_le_bytes());
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

pub fn decode_uploads(mut b: &[u8]) -> Result<Vec<Upload>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if out.len() >= MAX_DIGESTS {
            return Err("too many blobs in one request".into());
        }
        let h = take(&mut b, 42, "blob header")?;
        let digest = Digest::from_slice(&h[..32]).expect("32");
        let kind = BlobKind::from_u8(h[32]).ok_or("unknown blob kind")?;
        let codec = Codec::from_u8(h[33]).ok_or("unknown codec")?;
        let raw_len = u32_at(&h[34..38]);
        let stored = u32_at(&h[38..42]) as usize;
        if stored > SEGMENT_MAX_LEN || raw_len as usize > SEGMENT_MAX_LEN {
            return Err(format!("blob of {stored} bytes exceeds the limit"));
        }
        let bytes = take(&mut b, stored, "blob body")?.to_vec();
        out.push(Upload {
            digest,
            kind,
            raw_len,
            seg: EncodedSegment { codec, bytes },
        });
    }
    Ok(out)
}

pub fn encode_download(out: &mut Vec<u8>, codec: Codec, raw_len: u32, bytes: &[u8]) {
    out.push(codec as u8);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// One downloaded blob: codec, plaintext length, stored bytes.
pub type DownloadedBlob<'a> = (Codec, u32, &'a [u8]);

/// Parses a download of exactly `n` blobs.
pub fn decode_download(mut b: &[u8], n: usize) -> Result<Vec<DownloadedBlob<'_>>, String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let h = take(&mut b, 9, "blob header")?;
        let codec = Codec::from_u8(h[0]).ok_or("unknown codec")?;
        let raw_len = u32_at(&h[1..5]);
        let stored = u32_at(&h[5..9]) as usize;
        if stored > SEGMENT_MAX_LEN || raw_len as usize > SEGMENT_MAX_LEN {
            return Err(format!("blob of {stored} bytes exceeds the limit"));
        }
        out.push((codec, raw_len, take(&mut b, stored, "blob body")?));
    }
    if !b.is_empty() {
        return Err("trailing bytes after the last blob".into());
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
        }
    }

    #[test]
    fn upload_round_trip() {
        let u = vec![Upload {
            digest: Digest([3; 32]),
            kind: BlobKind::Tree,
            raw_len: 9,
            seg: EncodedSegment {
                codec: Codec::Raw,
                bytes: vec![1, 2, 3],
            },
        }];
        let back = decode_uploads(&encode_uploads(&u)).unwrap();
        assert_eq!(back[0].digest, u[0].digest);
        assert_eq!(back[0].seg, u[0].seg);
        assert!(decode_uploads(&encode_uploads(&u)[..20]).is_err());
    }
}
