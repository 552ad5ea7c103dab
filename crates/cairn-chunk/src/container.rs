//! The container (pack file) format: segments written together, in write order, followed by a
//! trailer that describes every one of them. A container alone is enough to rebuild the index
//! entries that point into it.
//!
//! ```text
//! "CAIRNPK1"                                   header, 8 bytes
//! blob 0 | blob 1 | ...                        stored segment bytes (see codec)
//! record 0 | record 1 | ...                    trailer, CONTAINER_RECORD_LEN bytes each:
//!     digest[32] offset u64 stored_len u32 raw_len u32 kind u8 codec u8 pad[2]
//! trailer_offset u64 | count u32 | version u32 | blake3(trailer)[..16] | "CAIRNEND"
//! ```
//!
//! Containers are immutable once written. A reader checks the footer, the trailer checksum, and
//! that every record lies between the header and the trailer.

use cairn_types::Digest;

use crate::FormatError;
use crate::codec::{Codec, EncodedSegment};
use crate::format::{
    BlobKind, CONTAINER_END_MAGIC, CONTAINER_FOOTER_LEN, CONTAINER_MAGIC, CONTAINER_MAX_RECORDS,
    CONTAINER_RECORD_LEN, CONTAINER_VERSION, SEGMENT_MAX_LEN,
};

/// Where one blob lies in its container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub digest: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
    pub codec: Codec,
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(self.kind as u8);
        out.push(self.codec as u8);
        out.extend_from_slice(&[0, 0]);
    }

    fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let err = |r: &str| FormatError::new("container record", r);
        Ok(Self {
            digest: Digest::from_slice(&b[..32]).expect("32 bytes"),
            offset: u64::from_le_bytes(b[32..40].try_into().expect("8")),
            stored_len: u32::from_le_bytes(b[40..44].try_into().expect("4")),
            raw_len: u32::from_le_bytes(b[44..48].try_into().expect("4")),
            kind: BlobKind::from_u8(b[48]).ok_or_else(|| err("unknown kind"))?,
            codec: Codec::from_u8(b[49]).ok_or_else(|| err("unknown codec"))?,
        })
    }
}

/// Accumulates one container in memory.
#[derive(Debug)]
pub struct ContainerBuilder {
    buf: Vec<u8>,
    records: Vec<Record>,
}

impl Default for ContainerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerBuilder {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(crate::format::CONTAINER_TARGET_LEN + (1 << 20));
        buf.extend_from_slice(&CONTAINER_MAGIC);
        Self {
            buf,
            records: Vec::new(),
        }
    }

    /// Appends a blob; returns its record.
    pub fn push(
        &mut self,
        digest: Digest,
        kind: BlobKind,
        raw_len: u32,
        seg: &EncodedSegment,
    ) -> Record {
        let r = Record {
            digest,
            offset: self.buf.len() as u64,
            stored_len: seg.bytes.len() as u32,
            raw_len,
            kind,
            codec: seg.codec,
        };
        self.buf.extend_from_slice(&seg.bytes);
        self.records.push(r);
        r
    }

    /// Bytes of blobs so far (including the header).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Appends trailer and footer; returns the finished container bytes and its records.
    pub fn finish(mut self) -> (Vec<u8>, Vec<Record>) {
        let trailer_offset = self.buf.len() as u64;
        let mut trailer = Vec::with_capacity(self.records.len() * CONTAINER_RECORD_LEN);
        self.records.iter().for_each(|r| r.encode(&mut trailer));
        let sum = blake3::hash(&trailer);
        self.buf.extend_from_slice(&trailer);
        self.buf.extend_from_slice(&trailer_offset.to_le_bytes());
        self.buf
            .extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
        self.buf.extend_from_slice(&sum.as_bytes()[..16]);
        self.buf.extend_from_slice(&CONTAINER_END_MAGIC);
        (self.buf, self.records)
    }
}

/// The parsed footer: where the trailer lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub trailer_offset: u64,
    pub count: u32,
    checksum: [u8; 16],
}

impl Footer {
    /// Byte length of the trailer.
    pub fn trailer_len(&self) -> u64 {
        u64::from(self.count) * CONTAINER_RECORD_LEN as u64
    }
}

/// Parses the last [`CONTAINER_FOOTER_LEN`] bytes of a container of total length `total`.
pub fn parse_footer(tail: &[u8], total: u64) -> Result<Footer, FormatError> {
    let err = |r: String| FormatError::new("container footer", r);
    if tail.len() != CONTAINER_FOOTER_LEN {
        return Err(err(format!(
            "expected {CONTAINER_FOOTER_LEN} bytes, got {}",
            tail.len()
        )));
    }
    if tail[32..40] != CONTAINER_END_MAGIC {
        return Err(err("bad end magic (truncated container?)".into()));
    }
    let trailer_offset = u64::from_le_bytes(tail[0..8].try_into().expect("8"));
    let count = u32::from_le_bytes(tail[8..12].try_into().expect("4"));
    let version = u32::from_le_bytes(tail[12..16].try_into().expect("4"));
    if version != CONTAINER_VERSION {
        return Err(err(format!("unsupported version {version}")));
    }
    if count as usize > CONTAINER_MAX_RECORDS {
        return Err(err(format!("{count} records exceed the limit")));
    }
    let f = Footer {
        trailer_offset,
        count,
        checksum: tail[16..32].try_into().expect("16"),
    };
    let end = trailer_offset
        .checked_add(f.trailer_len())
        .and_then(|e| e.checked_add(CONTAINER_FOOTER_LEN as u64));
    if trailer_offset < CONTAINER_MAGIC.len() as u64 || end != Some(total) {
        return Err(err(format!(
            "trailer at {trailer_offset} with {count} records does not fit {total} bytes"
        )));
    }
    Ok(f)
}

/// Parses and checks the trailer described by `footer`.
pub fn parse_trailer(trailer: &[u8], footer: &Footer) -> Result<Vec<Record>, FormatError> {
    let err = |r: String| FormatError::new("container trailer", r);
    if trailer.len() as u64 != footer.trailer_len() {
        return Err(err(format!(
            "expected {} bytes, got {}",
            footer.trailer_len(),
            trailer.len()
        )));
    }
    if blake3::hash(trailer).as_bytes()[..16] != footer.checksum {
        return Err(err("checksum mismatch".into()));
    }
    let recs: Vec<Record> = trailer
        .chunks_exact(CONTAINER_RECORD_LEN)
        .map(Record::decode)
        .collect::<Result<_, _>>()?;
    for r in &recs {
        let end = r.offset.checked_add(u64::from(r.stored_len));
        if r.offset < CONTAINER_MAGIC.len() as u64
            || end.is_none_or(|e| e > footer.trailer_offset)
            || r.stored_len as usize > SEGMENT_MAX_LEN
            || r.raw_len as usize > SEGMENT_MAX_LEN
        {
            return Err(err(format!(
                "record {:?} at {} lies outside the blob area",
                r.digest, r.offset
            )));
        }
    }
    Ok(recs)
}

/// Parses a whole container held in memory; checks the header too.
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, FormatError> {
    if bytes.len() < CONTAINER_MAGIC.len() + CONTAINER_FOOTER_LEN || bytes[..8] != CONTAINER_MAGIC {
        return Err(FormatError::new(
            "container",
            "bad header magic or too short",
        ));
    }
    let total = bytes.len() as u64;
    let footer = parse_footer(&bytes[bytes.len() - CONTAINER_FOOTER_LEN..], total)?;
    let start = footer.trailer_offset as usize;
    parse_trailer(
        &bytes[start..start + footer.trailer_len() as usize],
        &footer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoder;
    use crate::fingerprint::fingerprint;

    fn sample() -> (Vec<u8>, Vec<Record>) {
        let mut b = ContainerBuilder::new();
        let mut enc = Encoder::new(1);
        for i in 0..10u32 {
            let data = vec![i as u8; 1000 + i as usize];
            b.push(
                fingerprint(&data),
                BlobKind::Data,
                data.len() as u32,
                &enc.encode(&data),
            );
        }
        b.finish()
    }

    #[test]
    fn round_trip() {
        let (bytes, recs) = sample();
        assert_eq!(parse(&bytes).unwrap(), recs);
        for r in &recs {
            let blob = &bytes[r.offset as usize..][..r.stored_len as usize];
            crate::codec::decode(r.codec, blob, r.raw_len as usize, &r.digest).unwrap();
        }
    }

    #[test]
    fn truncation_and_damage_are_detected() {
        let (bytes, _) = sample();
        for cut in [1, 10, 40, 100] {
            assert!(parse(&bytes[..bytes.len() - cut]).is_err());
        }
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - CONTAINER_FOOTER_LEN - 5] ^= 1;
        assert!(parse(&bad).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse(&b);
            let mut v = CONTAINER_MAGIC.to_vec();
            v.extend_from_slice(&b);
            v.extend_from_slice(&CONTAINER_END_MAGIC);
            let _ = parse(&v);
        }
    }
}
