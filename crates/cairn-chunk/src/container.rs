//! The container (pack file) format: frames of segments written together, in write order,
//! followed by a trailer that describes every one of them. A container alone is enough to
//! rebuild the index entries that point into it.
//!
//! ```text
//! "CAIRNPK1"                                   header, 8 bytes
//! frame 0 | frame 1 | ...                      stored frames (see codec)
//! trailer, for each frame in order:
//!     offset u64 stored_len u32 raw_len u32 members u32 kind u8 codec u8 pad[2]
//!     then per member: digest[32] raw_len u32  (a member starts where the one before ends)
//! trailer_offset u64 | frames u32 | version u32 | blake3(trailer)[..16] | "CAIRNEND"
//! ```
//!
//! Frames are never empty and lie in write order without overlapping, so consecutive records
//! of one frame are exactly those with its offset ([`frames`]); parsing checks it.
//!
//! Version 1 containers (one segment per blob, flat 52-byte records, `count` = records) are
//! still read. Containers are immutable once written. A reader checks the footer, the trailer
//! checksum, that every frame lies between the header and the trailer, and that its members'
//! lengths add up to the frame's.

use cairn_types::Digest;

use crate::FormatError;
use crate::codec::{Codec, EncodedSegment, Member};
use crate::format::{
    BlobKind, CONTAINER_END_MAGIC, CONTAINER_FOOTER_LEN, CONTAINER_FRAME_LEN, CONTAINER_MAGIC,
    CONTAINER_MAX_RECORDS, CONTAINER_MEMBER_LEN, CONTAINER_RECORD_LEN, CONTAINER_VERSION,
    CONTAINER_VERSION_SINGLE, SEGMENT_MAX_LEN,
};

/// Where one segment lies in its container: its frame (offset, stored and plaintext
/// lengths, codec) and its place in the frame's plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub digest: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
    pub codec: Codec,
}

impl Record {
    pub fn member(&self) -> Member {
        Member {
            frame_len: self.frame_len,
            inner: self.inner,
            raw_len: self.raw_len,
        }
    }

    fn decode_v1(b: &[u8]) -> Result<Self, FormatError> {
        let err = |r: &str| FormatError::new("container record", r);
        let raw_len = le32(&b[44..48]);
        Ok(Self {
            digest: Digest::from_slice(&b[..32]).expect("32 bytes"),
            offset: u64::from_le_bytes(b[32..40].try_into().expect("8")),
            stored_len: le32(&b[40..44]),
            frame_len: raw_len,
            inner: 0,
            raw_len,
            kind: BlobKind::from_u8(b[48]).ok_or_else(|| err("unknown kind"))?,
            codec: Codec::from_u8(b[49]).ok_or_else(|| err("unknown codec"))?,
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
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
        Self::with_buffer(Vec::with_capacity(
            crate::format::CONTAINER_TARGET_LEN + (1 << 20),
        ))
    }

    /// A builder that writes into `buf` (cleared first): a writer hands back the bytes of a
    /// container it has stored, so that the next one reuses memory that is already mapped
    /// instead of faulting in fresh pages.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&CONTAINER_MAGIC);
        Self {
            buf,
            records: Vec::new(),
        }
    }

    /// Appends a frame holding one segment; returns its record.
    pub fn push(
        &mut self,
        digest: Digest,
        kind: BlobKind,
        raw_len: u32,
        seg: &EncodedSegment,
    ) -> Record {
        self.push_frame(kind, &[(digest, raw_len)], seg);
        *self.records.last().expect("just pushed")
    }

    /// Appends a frame holding `members` (digest and plaintext length, in order; at least
    /// one), encoded as `seg`.
    pub fn push_frame(&mut self, kind: BlobKind, members: &[(Digest, u32)], seg: &EncodedSegment) {
        assert!(!members.is_empty(), "a frame holds at least one segment");
        assert!(!seg.bytes.is_empty(), "a frame is never empty");
        let frame_len: u32 = members.iter().map(|m| m.1).sum();
        let offset = self.buf.len() as u64;
        let stored_len = u32::try_from(seg.bytes.len()).expect("a frame is shorter than 4 GiB");
        let mut inner = 0;
        for &(digest, raw_len) in members {
            self.records.push(Record {
                digest,
                offset,
                stored_len,
                frame_len,
                inner,
                raw_len,
                kind,
                codec: seg.codec,
            });
            inner += raw_len;
        }
        self.buf.extend_from_slice(&seg.bytes);
    }

    /// Whether a frame of `members` segments still fits the record limit readers enforce.
    pub fn has_room(&self, members: usize) -> bool {
        self.records.len() + members <= CONTAINER_MAX_RECORDS
    }

    /// Bytes of frames so far (including the header).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// One record per segment, frames in order, members in frame order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Appends trailer and footer; returns the finished container bytes and its records.
    pub fn finish(mut self) -> (Vec<u8>, Vec<Record>) {
        let mut trailer = Vec::with_capacity(self.records.len() * CONTAINER_MEMBER_LEN);
        let mut count = 0u32;
        for frame in frames(&self.records) {
            let f = frame[0];
            trailer.extend_from_slice(&f.offset.to_le_bytes());
            trailer.extend_from_slice(&f.stored_len.to_le_bytes());
            trailer.extend_from_slice(&f.frame_len.to_le_bytes());
            let members = u32::try_from(frame.len()).expect("fewer than 2^32 members in a frame");
            trailer.extend_from_slice(&members.to_le_bytes());
            trailer.extend_from_slice(&[f.kind as u8, f.codec as u8, 0, 0]);
            for m in frame {
                trailer.extend_from_slice(m.digest.as_bytes());
                trailer.extend_from_slice(&m.raw_len.to_le_bytes());
            }
            count += 1;
        }
        append_trailer(&mut self.buf, &trailer, count, CONTAINER_VERSION);
        (self.buf, self.records)
    }
}

/// Ends a container whose frames are in `buf`: appends `trailer` (of `count` frames, or of
/// `count` records in version 1) and the footer that locates and checksums it. The one place
/// the footer is laid out; tests and the fuzz target use it to wrap hand-made trailers.
pub fn append_trailer(buf: &mut Vec<u8>, trailer: &[u8], count: u32, version: u32) {
    let trailer_offset = buf.len() as u64;
    buf.extend_from_slice(trailer);
    buf.extend_from_slice(&trailer_offset.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&blake3::hash(trailer).as_bytes()[..16]);
    buf.extend_from_slice(&CONTAINER_END_MAGIC);
}

/// A container's records grouped by frame: a frame's members are consecutive and share its
/// offset, which no other frame has (frames are non-empty and in order; parsing checks it).
pub fn frames(recs: &[Record]) -> impl Iterator<Item = &[Record]> {
    recs.chunk_by(|a, b| a.offset == b.offset)
}

/// Where the next frame may start, after a frame at `offset` of `stored_len` bytes that must
/// not be empty nor start before `next`.
fn frame_in_order(offset: u64, stored_len: u32, next: u64) -> Result<u64, String> {
    if stored_len == 0 || offset < next {
        return Err(format!(
            "frame at {offset} is empty or overlaps the one before (which ends at {next})"
        ));
    }
    Ok(offset.saturating_add(u64::from(stored_len)))
}

/// The parsed footer: where the trailer lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub trailer_offset: u64,
    /// Records (version 1) or frames (version 2).
    pub count: u32,
    pub version: u32,
    trailer_len: u64,
    checksum: [u8; 16],
}

impl Footer {
    /// Byte length of the trailer.
    pub fn trailer_len(&self) -> u64 {
        self.trailer_len
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
    let count = le32(&tail[8..12]);
    let version = le32(&tail[12..16]);
    if version != CONTAINER_VERSION && version != CONTAINER_VERSION_SINGLE {
        return Err(err(format!("unsupported version {version}")));
    }
    if count as usize > CONTAINER_MAX_RECORDS {
        return Err(err(format!("{count} records exceed the limit")));
    }
    let trailer_len = (total.checked_sub(CONTAINER_FOOTER_LEN as u64))
        .and_then(|end| end.checked_sub(trailer_offset));
    let fits = match (trailer_len, version) {
        (Some(n), CONTAINER_VERSION_SINGLE) => n == u64::from(count) * CONTAINER_RECORD_LEN as u64,
        (Some(n), _) => {
            let frames = u64::from(count) * CONTAINER_FRAME_LEN as u64;
            n >= frames && n <= frames + CONTAINER_MAX_RECORDS as u64 * CONTAINER_MEMBER_LEN as u64
        }
        (None, _) => false,
    };
    if trailer_offset < CONTAINER_MAGIC.len() as u64 || !fits {
        return Err(err(format!(
            "trailer at {trailer_offset} with {count} records does not fit {total} bytes"
        )));
    }
    Ok(Footer {
        trailer_offset,
        count,
        version,
        trailer_len: trailer_len.expect("fits"),
        checksum: tail[16..32].try_into().expect("16"),
    })
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
    let recs = if footer.version == CONTAINER_VERSION_SINGLE {
        let recs = trailer
            .chunks_exact(CONTAINER_RECORD_LEN)
            .map(Record::decode_v1)
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = CONTAINER_MAGIC.len() as u64;
        for r in &recs {
            next = frame_in_order(r.offset, r.stored_len, next).map_err(err)?;
        }
        recs
    } else {
        parse_frames(trailer, footer.count)?
    };
    for r in &recs {
        let end = r.offset.checked_add(u64::from(r.stored_len));
        if r.offset < CONTAINER_MAGIC.len() as u64
            || end.is_none_or(|e| e > footer.trailer_offset)
            || r.stored_len as usize > SEGMENT_MAX_LEN
            || r.frame_len as usize > SEGMENT_MAX_LEN
        {
            return Err(err(format!(
                "record {:?} at {} lies outside the blob area",
                r.digest, r.offset
            )));
        }
    }
    Ok(recs)
}

/// Version 2 trailer: `frames` frame records, each followed by its members.
fn parse_frames(mut b: &[u8], frames: u32) -> Result<Vec<Record>, FormatError> {
    let err = |r: String| FormatError::new("container trailer", r);
    let mut recs = Vec::new();
    let mut next = CONTAINER_MAGIC.len() as u64;
    for i in 0..frames {
        if b.len() < CONTAINER_FRAME_LEN {
            return Err(err(format!("frame {i} is cut short")));
        }
        let (h, rest) = b.split_at(CONTAINER_FRAME_LEN);
        let offset = u64::from_le_bytes(h[0..8].try_into().expect("8"));
        let (stored_len, frame_len, members) =
            (le32(&h[8..12]), le32(&h[12..16]), le32(&h[16..20]));
        let kind =
            BlobKind::from_u8(h[20]).ok_or_else(|| err(format!("frame {i}: unknown kind")))?;
        let codec =
            Codec::from_u8(h[21]).ok_or_else(|| err(format!("frame {i}: unknown codec")))?;
        next =
            frame_in_order(offset, stored_len, next).map_err(|e| err(format!("frame {i}: {e}")))?;
        let mlen = (members as usize).checked_mul(CONTAINER_MEMBER_LEN);
        if members == 0
            || recs.len() + members as usize > CONTAINER_MAX_RECORDS
            || mlen.is_none_or(|n| n > rest.len())
        {
            return Err(err(format!("frame {i}: {members} members do not fit")));
        }
        let (ms, rest) = rest.split_at(mlen.expect("checked"));
        let mut at = 0u64;
        for (j, m) in ms.chunks_exact(CONTAINER_MEMBER_LEN).enumerate() {
            let raw_len = le32(&m[32..36]);
            let inner = u32::try_from(at).map_err(|_| {
                err(format!(
                    "frame {i}: member {j} starts at {at}, past the largest frame"
                ))
            })?;
            recs.push(Record {
                digest: Digest::from_slice(&m[..32]).expect("32 bytes"),
                offset,
                stored_len,
                frame_len,
                inner,
                raw_len,
                kind,
                codec,
            });
            at += u64::from(raw_len);
        }
        if at != u64::from(frame_len) {
            return Err(err(format!(
                "frame {i}: members hold {at} bytes, the frame {frame_len}"
            )));
        }
        b = rest;
    }
    if !b.is_empty() {
        return Err(err(format!("{} bytes after the last frame", b.len())));
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
    // parse_footer checked that the trailer ends where the footer starts.
    let trailer = &bytes[..bytes.len() - CONTAINER_FOOTER_LEN];
    let start = usize::try_from(footer.trailer_len())
        .ok()
        .and_then(|len| trailer.len().checked_sub(len))
        .ok_or_else(|| {
            FormatError::new(
                "container",
                format!("trailer of {} bytes does not fit", footer.trailer_len()),
            )
        })?;
    parse_trailer(&trailer[start..], &footer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoder;
    use crate::fingerprint::fingerprint;

    fn sample() -> (Vec<u8>, Vec<Record>) {
        fill(ContainerBuilder::new())
    }

    fn fill(mut b: ContainerBuilder) -> (Vec<u8>, Vec<Record>) {
        let mut enc = Encoder::new(1);
        for i in 0..10u32 {
            let data = vec![u8::try_from(i).unwrap(); 1000 + i as usize];
            b.push(
                fingerprint(&data),
                BlobKind::Data,
                1000 + i,
                &enc.encode(&data),
            );
        }
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| vec![b'a' + i; 700]).collect();
        let members: Vec<(Digest, u32)> = parts.iter().map(|p| (fingerprint(p), 700)).collect();
        b.push_frame(BlobKind::Data, &members, &enc.encode(&parts.concat()));
        b.finish()
    }

    #[test]
    fn a_reused_buffer_builds_the_same_container() {
        let (fresh, recs) = sample();
        // A stored container's buffer, longer than the next container and full of its bytes.
        let mut used = fresh.clone();
        used.extend_from_slice(&[0xee; 4096]);
        let (again, recs2) = fill(ContainerBuilder::with_buffer(used));
        assert_eq!(again, fresh);
        assert_eq!(recs2, recs);
    }

    #[test]
    fn round_trip() {
        let (bytes, recs) = sample();
        assert_eq!(parse(&bytes).unwrap(), recs);
        assert_eq!(recs.len(), 13);
        for r in &recs {
            let blob = &bytes[usize::try_from(r.offset).unwrap()..][..r.stored_len as usize];
            let plain =
                crate::codec::decode_member(None, r.codec, blob, r.member(), &r.digest).unwrap();
            assert_eq!(plain.len(), r.raw_len as usize);
        }
        // The three members of the last frame share its bytes and follow one another.
        let f = &recs[10..];
        assert!(
            f.iter()
                .all(|r| r.offset == f[0].offset && r.frame_len == 3 * 700)
        );
        assert_eq!(
            f.iter().map(|r| r.inner).collect::<Vec<_>>(),
            [0, 700, 1400]
        );
    }

    #[test]
    fn members_that_do_not_add_up_are_rejected() {
        let (bytes, _) = sample();
        // The last frame's record says 2100 plaintext bytes; make it 2101 and fix the checksum.
        let footer = parse_footer(
            &bytes[bytes.len() - CONTAINER_FOOTER_LEN..],
            bytes.len() as u64,
        )
        .unwrap();
        let t = usize::try_from(footer.trailer_offset).unwrap();
        let mut trailer = bytes[t..bytes.len() - CONTAINER_FOOTER_LEN].to_vec();
        let last_frame = trailer.len() - 3 * CONTAINER_MEMBER_LEN - CONTAINER_FRAME_LEN;
        let mut longer = trailer.clone();
        longer[last_frame + 12] += 1;
        let wrapped = wrap(&bytes[8..t], &longer, footer.count, CONTAINER_VERSION);
        let e = parse(&wrapped).unwrap_err().to_string();
        assert!(e.contains("members hold 2100 bytes"), "{e}");

        // A first member of u32::MAX bytes puts the third one's start past any u32: an
        // error, not a record whose start wrapped around to 699.
        let first = last_frame + CONTAINER_FRAME_LEN + 32;
        trailer[first..first + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let wrapped = wrap(&bytes[8..t], &trailer, footer.count, CONTAINER_VERSION);
        let e = parse(&wrapped).unwrap_err().to_string();
        assert!(e.contains("frame 10: member 2 starts at 4294967995"), "{e}");
    }

    #[test]
    fn a_container_of_the_most_records_readers_accept_parses() {
        let mut b = ContainerBuilder::new();
        let one = EncodedSegment::raw(b"x");
        let members: Vec<(Digest, u32)> = vec![(fingerprint(b"x"), 1); 1024];
        let frame = EncodedSegment::raw(&[b'x'; 1024]);
        while b.has_room(members.len()) {
            b.push_frame(BlobKind::Data, &members, &frame);
        }
        assert_eq!(b.records().len(), CONTAINER_MAX_RECORDS);
        assert!(!b.has_room(1));
        let (bytes, recs) = b.finish();
        assert_eq!(parse(&bytes).unwrap().len(), recs.len());
        // One more and readers refuse it: the session seals before that.
        let mut over = ContainerBuilder::new();
        for _ in 0..=CONTAINER_MAX_RECORDS {
            over.push(fingerprint(b"x"), BlobKind::Data, 1, &one);
        }
        assert!(parse(&over.finish().0).is_err());
    }

    /// A container of `blobs` and a hand-made `trailer` of `count` records or frames, behind
    /// a valid footer and checksum.
    fn wrap(blobs: &[u8], trailer: &[u8], count: u32, version: u32) -> Vec<u8> {
        let mut c = CONTAINER_MAGIC.to_vec();
        c.extend_from_slice(blobs);
        append_trailer(&mut c, trailer, count, version);
        c
    }

    #[test]
    fn empty_or_overlapping_frames_are_rejected() {
        // Two one-member frames; the second claims the first's offset, then a zero length.
        let frame = |offset: u64, stored: u32, d: u8| {
            let mut t = offset.to_le_bytes().to_vec();
            t.extend_from_slice(&stored.to_le_bytes());
            t.extend_from_slice(&4u32.to_le_bytes());
            t.extend_from_slice(&1u32.to_le_bytes());
            t.extend_from_slice(&[0, 0, 0, 0]);
            t.extend_from_slice(&[d; 32]);
            t.extend_from_slice(&4u32.to_le_bytes());
            t
        };
        let build = |trailer: Vec<u8>| parse(&wrap(b"abcdefgh", &trailer, 2, CONTAINER_VERSION));
        assert_eq!(
            build([frame(8, 4, 1), frame(12, 4, 2)].concat())
                .unwrap()
                .len(),
            2
        );
        for bad in [
            [frame(8, 4, 1), frame(8, 4, 2)],
            [frame(8, 4, 1), frame(12, 0, 2)],
        ] {
            let e = build(bad.concat()).unwrap_err().to_string();
            assert!(e.contains("empty or overlaps"), "{e}");
        }
    }

    #[test]
    fn version_1_containers_are_read() {
        let data = b"old segment".repeat(10);
        let d = fingerprint(&data);
        let mut rec = d.as_bytes().to_vec();
        rec.extend_from_slice(&8u64.to_le_bytes());
        let len = u32::try_from(data.len()).unwrap();
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&[0, 0, 0, 0]);
        let v1 = wrap(&data, &rec, 1, CONTAINER_VERSION_SINGLE);
        let recs = parse(&v1).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(recs[0].member().is_whole() && recs[0].raw_len == len);
        let blob = &v1[8..8 + data.len()];
        assert_eq!(
            crate::codec::decode_member(None, recs[0].codec, blob, recs[0].member(), &d).unwrap(),
            data
        );
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
