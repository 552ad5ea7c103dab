//! A read-only reader of the qcow2 header and active L1/L2 tables, to turn *host* file ranges
//! that changed between two reflink clones of one image into the *guest* ranges that may
//! differ (the qcow2 half of the `ExtentMap` change source).
//!
//! Format: QEMU's `docs/interop/qcow2.txt`; every field offset, flag and limit used here is a
//! named constant in [`mod@format`]. All integers are big-endian.
//!
//! # How a change is found
//!
//! Given the previous clone `P`, the current clone `C` and `H` (host byte ranges of the file
//! not shared between `P` and `C`, from FIEMAP), a guest cluster is reported changed when
//!
//! 1. its L2 entry in `C` differs from its L2 entry in `P` (the COPIED flag aside) — the
//!    entries are compared whenever `C`'s L2 table moved or lies in `H`, a missing L2 table
//!    counting as all-unallocated — so remapped, newly allocated, discarded and zeroed
//!    clusters count; or
//! 2. its host bytes in `C` (a whole cluster, or the sectors of a compressed cluster) intersect
//!    `H`.
//!
//! A guest cluster failing both reads the same host bytes, physically shared, through the same
//! entry in both clones: it is unchanged. Subclusters (extended L2) are not looked at: a
//! cluster changes as a whole.
//!
//! # Refused (the caller falls back to reading the whole disk)
//!
//! Backing files, external data files, encryption, the corrupt bit, unknown incompatible
//! features, version other than 2 or 3; clones with different virtual size, cluster size,
//! L2 entry width or compression type; and anything out of range: an L1 or L2 table beyond the
//! end of the file, misaligned, or an L1 table larger than QEMU allows. Work and memory are
//! bounded by the file size: every L2 table of the active L1 is read at most once (a table
//! named twice is refused), one table at a time.

use std::collections::HashSet;

use cairn_types::{Extent, ExtentList, ReadAt};

use crate::error::Qcow2Error;

/// On-disk constants of qcow2 (all offsets in bytes, big-endian fields).
pub mod format {
    /// `QFI\xfb`.
    pub const MAGIC: u32 = 0x5146_49fb;
    pub const VERSION_2: u32 = 2;
    pub const VERSION_3: u32 = 3;

    pub const OFF_MAGIC: usize = 0;
    pub const OFF_VERSION: usize = 4;
    pub const OFF_BACKING_FILE_OFFSET: usize = 8;
    pub const OFF_CLUSTER_BITS: usize = 20;
    pub const OFF_SIZE: usize = 24;
    pub const OFF_CRYPT_METHOD: usize = 32;
    pub const OFF_L1_SIZE: usize = 36;
    pub const OFF_L1_TABLE_OFFSET: usize = 40;
    pub const OFF_REFCOUNT_TABLE_OFFSET: usize = 48;
    pub const OFF_REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub const OFF_INCOMPATIBLE_FEATURES: usize = 72;
    pub const OFF_REFCOUNT_ORDER: usize = 96;
    pub const OFF_HEADER_LENGTH: usize = 100;
    pub const OFF_COMPRESSION_TYPE: usize = 104;
    /// Header length of version 2 (fixed) and the minimum of version 3.
    pub const HEADER_V2_LEN: usize = 72;
    pub const HEADER_V3_MIN_LEN: usize = 104;
    /// The version 3 header the writer emits (and `qemu-img create` 10.0 does): the minimum,
    /// the compression type byte (0 = zlib) and padding to a multiple of 8. The header
    /// extensions follow; an all-zero one ends them.
    pub const HEADER_V3_LEN: usize = 112;
    /// A header extension's type and length fields (type 0 ends the extensions).
    pub const EXTENSION_HEADER_LEN: usize = 8;
    /// QEMU's sector: virtual sizes are whole sectors.
    pub const SECTOR: u64 = 512;

    /// `log2` of the refcount width in bits: 16-bit refcounts, QEMU's default.
    pub const REFCOUNT_ORDER_16: u32 = 4;
    pub const REFCOUNT_16_LEN: u64 = 2;
    pub const REFCOUNT_TABLE_ENTRY_LEN: u64 = 8;
    /// `qemu-img create`'s default cluster size, 64 KiB.
    pub const DEFAULT_CLUSTER_BITS: u32 = 16;
    /// Refcount is exactly one (an L1 entry's flag; the L2 entry's is [`L2E_COPIED`]).
    pub const L1E_COPIED: u64 = 1 << 63;

    pub const INCOMPAT_DIRTY: u64 = 1 << 0;
    pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
    pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
    pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
    pub const INCOMPAT_EXTL2: u64 = 1 << 4;
    pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;

    /// Valid `cluster_bits` (512 B to 2 MiB clusters).
    pub const MIN_CLUSTER_BITS: u32 = 9;
    pub const MAX_CLUSTER_BITS: u32 = 21;
    /// QEMU's `QCOW_MAX_L1_SIZE`: 32 MiB of L1 entries.
    pub const MAX_L1_BYTES: u64 = 32 << 20;

    pub const L1_ENTRY_LEN: u64 = 8;
    /// Bits 9..=55 of an L1 entry: the L2 table's host offset.
    pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

    pub const L2_ENTRY_LEN: u64 = 8;
    /// An extended L2 entry: the standard entry, then the subcluster bitmap.
    pub const L2_EXTENDED_ENTRY_LEN: u64 = 16;
    /// Refcount is exactly one; says nothing about guest data.
    pub const L2E_COPIED: u64 = 1 << 63;
    pub const L2E_COMPRESSED: u64 = 1 << 62;
    /// Bits 9..=55 of a standard entry: the data cluster's host offset.
    pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// Bit 0 of a standard entry (version 3): the cluster reads as zeros.
    pub const L2E_ZERO: u64 = 1;
    /// Compressed data is addressed in 512-byte sectors.
    pub const COMPRESSED_SECTOR: u64 = 512;
    /// Bits of a compressed entry above the host offset hold `cluster_bits - 8` bits of
    /// "additional sectors": the offset has `62 - (cluster_bits - 8)` bits.
    pub const COMPRESSED_SECTOR_BITS_BASE: u32 = 8;
    pub const COMPRESSED_FLAGS_BIT: u32 = 62;

    /// How much of the file start is read to parse the header.
    pub const HEADER_READ: usize = 4096;
}

use format as f;

/// The header fields that matter for mapping guest offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual (guest) size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub incompatible: u64,
    /// 0 = zlib, 1 = zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl Header {
    /// Parses the header at the start of `b` (at least the header's own length). Refuses what
    /// the mapper cannot handle.
    pub fn parse(b: &[u8]) -> Result<Self, Qcow2Error> {
        let short = |need: usize| Qcow2Error::Truncated {
            what: "header",
            offset: 0,
            end: need as u64,
            len: b.len() as u64,
        };
        if b.len() < f::HEADER_V2_LEN {
            return Err(short(f::HEADER_V2_LEN));
        }
        let magic = be32(b, f::OFF_MAGIC);
        if magic != f::MAGIC {
            return Err(Qcow2Error::Magic(magic));
        }
        let version = be32(b, f::OFF_VERSION);
        let (incompatible, compression_type) = match version {
            f::VERSION_2 => (0, 0),
            f::VERSION_3 => {
                if b.len() < f::HEADER_V3_MIN_LEN {
                    return Err(short(f::HEADER_V3_MIN_LEN));
                }
                let incompatible = be64(b, f::OFF_INCOMPATIBLE_FEATURES);
                let header_len = be32(b, f::OFF_HEADER_LENGTH) as usize;
                if header_len < f::HEADER_V3_MIN_LEN {
                    return Err(Qcow2Error::Corrupt(format!("header length {header_len}")));
                }
                let compression = if incompatible & f::INCOMPAT_COMPRESSION != 0 {
                    if header_len <= f::OFF_COMPRESSION_TYPE {
                        return Err(Qcow2Error::Corrupt(format!(
                            "header length {header_len} leaves no room for the compression type"
                        )));
                    }
                    if b.len() <= f::OFF_COMPRESSION_TYPE {
                        return Err(short(f::OFF_COMPRESSION_TYPE + 1));
                    }
                    b[f::OFF_COMPRESSION_TYPE]
                } else {
                    0
                };
                (incompatible, compression)
            }
            v => return Err(Qcow2Error::Unsupported(format!("version {v}"))),
        };
        let unknown = incompatible & !f::INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {unknown:#x}"
            )));
        }
        if incompatible & f::INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::Corrupt("the image is marked corrupt".into()));
        }
        if incompatible & f::INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::Unsupported("an external data file".into()));
        }
        if be64(b, f::OFF_BACKING_FILE_OFFSET) != 0 {
            return Err(Qcow2Error::Unsupported("a backing file".into()));
        }
        let crypt = be32(b, f::OFF_CRYPT_METHOD);
        if crypt != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "encryption method {crypt}"
            )));
        }
        let cluster_bits = be32(b, f::OFF_CLUSTER_BITS);
        if !(f::MIN_CLUSTER_BITS..=f::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::Corrupt(format!("cluster_bits {cluster_bits}")));
        }
        let h = Self {
            version,
            cluster_bits,
            size: be64(b, f::OFF_SIZE),
            l1_size: be32(b, f::OFF_L1_SIZE),
            l1_table_offset: be64(b, f::OFF_L1_TABLE_OFFSET),
            incompatible,
            compression_type,
        };
        if u64::from(h.l1_size) * f::L1_ENTRY_LEN > f::MAX_L1_BYTES {
            return Err(Qcow2Error::Corrupt(format!("L1 size {}", h.l1_size)));
        }
        if !h.l1_table_offset.is_multiple_of(h.cluster_size()) {
            return Err(Qcow2Error::Corrupt(format!(
                "L1 table offset {} is not cluster aligned",
                h.l1_table_offset
            )));
        }
        let needed = h.l1_entries_needed();
        if needed > u64::from(h.l1_size) {
            return Err(Qcow2Error::Corrupt(format!(
                "L1 table of {} entries is too small for {} bytes ({needed} needed)",
                h.l1_size, h.size
            )));
        }
        Ok(h)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & f::INCOMPAT_EXTL2 != 0
    }

    /// Bytes of one L2 entry.
    pub fn l2_entry_len(&self) -> u64 {
        if self.extended_l2() {
            f::L2_EXTENDED_ENTRY_LEN
        } else {
            f::L2_ENTRY_LEN
        }
    }

    /// Entries of one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_len()
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// L1 entries that map `[0, size)`.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_span())
    }

    /// Why two clones' tables cannot be compared entry by entry, if they cannot.
    fn incomparable(&self, other: &Self) -> Option<String> {
        if self.size != other.size {
            return Some(format!("virtual size ({} vs {})", self.size, other.size));
        }
        if self.cluster_bits != other.cluster_bits {
            return Some(format!(
                "cluster_bits ({} vs {})",
                self.cluster_bits, other.cluster_bits
            ));
        }
        if self.extended_l2() != other.extended_l2() {
            return Some("extended L2 entries".into());
        }
        if self.compression_type != other.compression_type {
            return Some("compression type".into());
        }
        None
    }
}

/// What a guest cluster's L2 entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Data in the host cluster at `host`.
    Data,
    /// Reads as zeros; `host` may still hold a preallocated cluster.
    Zero,
    /// Compressed bytes at `host` (sector-rounded range).
    Compressed,
}

/// One allocated guest cluster of the active L1 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub guest: u64,
    pub kind: ClusterKind,
    /// Host byte range holding the cluster's bytes (empty for an unpreallocated zero cluster).
    pub host: Extent,
}

/// One L2 entry: the standard 64 bits and, with extended L2, the subcluster bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct L2Entry {
    word: u64,
    bitmap: u64,
}

impl L2Entry {
    /// The entry without flags that do not change guest data.
    fn semantic(self) -> (u64, u64) {
        (self.word & !f::L2E_COPIED, self.bitmap)
    }
}

/// An open qcow2 image: its header and file length.
pub struct Image<'a> {
    r: &'a dyn ReadAt,
    len: u64,
    pub header: Header,
}

impl<'a> Image<'a> {
    /// Reads and checks the header of the image in `r`.
    pub fn open(r: &'a dyn ReadAt) -> Result<Self, Qcow2Error> {
        let len = r.size().map_err(|source| Qcow2Error::Read {
            what: "file size",
            offset: 0,
            source,
        })?;
        let n = usize::try_from(len)
            .unwrap_or(f::HEADER_READ)
            .min(f::HEADER_READ);
        let mut buf = vec![0u8; n];
        r.read_exact_at(&mut buf, 0)
            .map_err(|source| Qcow2Error::Read {
                what: "header",
                offset: 0,
                source,
            })?;
        let header = Header::parse(&buf)?;
        let img = Self { r, len, header };
        img.check_range("L1 table", img.header.l1_table_offset, img.l1_bytes())?;
        Ok(img)
    }

    fn l1_bytes(&self) -> u64 {
        self.header.l1_entries_needed() * f::L1_ENTRY_LEN
    }

    fn check_range(&self, what: &'static str, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        let end = offset.saturating_add(len);
        if end > self.len {
            return Err(Qcow2Error::Truncated {
                what,
                offset,
                end,
                len: self.len,
            });
        }
        Ok(())
    }

    fn read(&self, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>, Qcow2Error> {
        self.check_range(what, offset, len)?;
        // Bounded: `len` is at most one cluster (2 MiB) or the L1 table (32 MiB), both inside
        // the file.
        let n = usize::try_from(len)
            .map_err(|_| Qcow2Error::Corrupt(format!("{what} of {len} bytes")))?;
        let mut buf = vec![0u8; n];
        self.r
            .read_exact_at(&mut buf, offset)
            .map_err(|source| Qcow2Error::Read {
                what,
                offset,
                source,
            })?;
        Ok(buf)
    }

    /// The L2 table host offsets of the active L1 entries that map the virtual size (0 = no
    /// table). Refuses misaligned tables, tables beyond the end of the file and tables named
    /// twice.
    pub fn l1(&self) -> Result<Vec<u64>, Qcow2Error> {
        let raw = self.read("L1 table", self.header.l1_table_offset, self.l1_bytes())?;
        let cs = self.header.cluster_size();
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len() / f::L1_ENTRY_LEN as usize);
        for (i, c) in raw.chunks_exact(f::L1_ENTRY_LEN as usize).enumerate() {
            let off = be64(c, 0) & f::L1E_OFFSET_MASK;
            if off != 0 {
                if !off.is_multiple_of(cs) {
                    return Err(Qcow2Error::Corrupt(format!(
                        "L1 entry {i}: L2 table offset {off} is not cluster aligned"
                    )));
                }
                self.check_range("L2 table", off, cs)?;
                if !seen.insert(off) {
                    return Err(Qcow2Error::Corrupt(format!(
                        "L1 entry {i}: L2 table {off} is used twice"
                    )));
                }
            }
            out.push(off);
        }
        Ok(out)
    }

    /// The entries of the L2 table at `offset` (0 = all unallocated).
    fn l2(&self, offset: u64) -> Result<Vec<L2Entry>, Qcow2Error> {
        let n = self.header.l2_entries() as usize;
        if offset == 0 {
            return Ok(vec![L2Entry::default(); n]);
        }
        let raw = self.read("L2 table", offset, self.header.cluster_size())?;
        let w = self.header.l2_entry_len() as usize;
        Ok(raw
            .chunks_exact(w)
            .map(|c| L2Entry {
                word: be64(c, 0),
                bitmap: if w == f::L2_EXTENDED_ENTRY_LEN as usize {
                    be64(c, 8)
                } else {
                    0
                },
            })
            .collect())
    }

    /// Where the bytes of the cluster with entry `e` live, or `None` if unallocated.
    fn decode(&self, e: L2Entry) -> Option<(ClusterKind, Extent)> {
        let word = e.word;
        let cb = self.header.cluster_bits;
        if word & f::L2E_COMPRESSED != 0 {
            let x = f::COMPRESSED_FLAGS_BIT - (cb - f::COMPRESSED_SECTOR_BITS_BASE);
            let host = word & ((1u64 << x) - 1);
            let extra = (word >> x) & ((1u64 << (cb - f::COMPRESSED_SECTOR_BITS_BASE)) - 1);
            // Conservative: whole sectors, from the one holding `host` on.
            let start = host - host % f::COMPRESSED_SECTOR;
            let len = (extra + 1) * f::COMPRESSED_SECTOR;
            return Some((ClusterKind::Compressed, Extent::new(start, len)));
        }
        let host = word & f::L2E_OFFSET_MASK;
        // Version 2 has no zero flag (bit 0 is reserved there and read as such).
        let zero = self.header.version >= f::VERSION_3 && word & f::L2E_ZERO != 0;
        let host_ext = if host == 0 {
            Extent::new(0, 0)
        } else {
            Extent::new(host, self.header.cluster_size())
        };
        match (zero, host) {
            (true, _) => Some((ClusterKind::Zero, host_ext)),
            (false, 0) if e.bitmap == 0 => None,
            // Extended L2 with an unallocated cluster but a non-zero bitmap ("reads as zero"
            // subclusters): zeros, no host bytes.
            (false, 0) => Some((ClusterKind::Zero, host_ext)),
            (false, _) => Some((ClusterKind::Data, host_ext)),
        }
    }

    /// Every allocated (or zeroed) guest cluster of the active L1 table, in guest order.
    pub fn mappings(&self) -> Result<Vec<Mapping>, Qcow2Error> {
        let mut out = Vec::new();
        for (i, l2) in self.l1()?.into_iter().enumerate() {
            if l2 == 0 {
                continue;
            }
            for (j, e) in self.l2(l2)?.into_iter().enumerate() {
                let guest = self.guest_offset(i, j);
                if guest >= self.header.size {
                    break;
                }
                if let Some((kind, host)) = self.decode(e) {
                    out.push(Mapping { guest, kind, host });
                }
            }
        }
        Ok(out)
    }

    fn guest_offset(&self, l1_index: usize, l2_index: usize) -> u64 {
        (l1_index as u64 * self.header.l2_entries() + l2_index as u64) << self.header.cluster_bits
    }
}

fn intersects(sorted: &[Extent], r: Extent) -> bool {
    if r.is_empty() {
        return false;
    }
    let i = sorted.partition_point(|e| e.end() <= r.offset);
    i < sorted.len() && sorted[i].offset < r.end()
}

/// Appends `[at, at + len)`, merging with the last extent when adjacent.
fn push_merged(out: &mut Vec<Extent>, at: u64, len: u64) {
    if let Some(last) = out.last_mut()
        && last.end() == at
    {
        last.len += len;
        return;
    }
    out.push(Extent::new(at, len));
}

/// The guest ranges of `current` that may differ from `previous`, given `host_changed`: the
/// byte ranges of the image file not shared between the two clones (see the module docs).
/// Reads only the two headers and L1 tables, and — unless no host range changed — every L2
/// table of `current` plus the L2 tables of `previous` that must be compared (about 1/8192
/// of the disk with 64 KiB clusters).
pub fn changed_guest_extents(
    previous: &dyn ReadAt,
    current: &dyn ReadAt,
    host_changed: &ExtentList,
) -> Result<ExtentList, Qcow2Error> {
    let (p, c) = (Image::open(previous)?, Image::open(current)?);
    if let Some(why) = c.header.incomparable(&p.header) {
        return Err(Qcow2Error::Incomparable(why));
    }
    let h = host_changed.as_slice();
    let cs = c.header.cluster_size();
    let size = c.header.size;
    let (pl1, cl1) = (p.l1()?, c.l1()?);
    let mut out: Vec<Extent> = Vec::new();
    for (i, (&po, &co)) in pl1.iter().zip(cl1.iter()).enumerate() {
        if po == 0 && co == 0 {
            // Unallocated in both, and no backing file: zeros in both.
            continue;
        }
        let compare = po != co || intersects(h, Extent::new(co, cs));
        if !compare && h.is_empty() {
            // Same table, shared bytes, and no host range changed: nothing it maps can differ
            // (an idle disk costs the headers and L1 tables only).
            continue;
        }
        let cur = c.l2(co)?;
        let prev = if compare { Some(p.l2(po)?) } else { None };
        for (j, e) in cur.iter().enumerate() {
            let guest = c.guest_offset(i, j);
            if guest >= size {
                break;
            }
            let entry_changed = prev
                .as_ref()
                .is_some_and(|pv| pv[j].semantic() != e.semantic());
            let data_changed = || c.decode(*e).is_some_and(|(_, host)| intersects(h, host));
            if entry_changed || data_changed() {
                push_merged(&mut out, guest, cs.min(size - guest));
            }
        }
    }
    Ok(ExtentList::from_unsorted(out))
}

pub mod writer;

#[cfg(test)]
mod tests;
