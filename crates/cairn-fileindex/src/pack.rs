//! Record packs: the shared store of encoded [`FileRecord`](crate::FileRecord)s.
//!
//! Every `add_backup` that produces records not yet stored writes one pack holding them, with
//! consecutive record ids `first_id..first_id + count`. Packs are immutable; garbage
//! collection rewrites a pack with dead records replaced by tombstones (ids never move) or
//! deletes it when nothing in it is live.
//!
//! ```text
//! header(16)                      magic "CFIRECS1", version, flags
//! block*                          zstd frames; raw = { len(varint) record }*count
//! table   block_entry*blocks      offset(u64) stored_len(u32) raw_len(u32)
//!                                 first_index(u32) count(u32) checksum(16)
//! footer(48)                      table_offset(u64) first_id(u64) count(u32) blocks(u32)
//!                                 checksum(16) end_magic "CFIRECND"
//! ```
//!
//! A block's checksum covers its stored (compressed) bytes; the footer's checksum covers the
//! header, the table and the first 24 footer bytes. Blocks are read and verified on demand.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{DecodeError, IndexError, Result};
use crate::format::{
    BLOCK_ENTRY_LEN, BLOCK_TARGET_RAW, CHECKSUM_LEN, HEADER_LEN, MAX_BLOCK_RAW, MAX_BLOCKS,
    MAX_PACK_ITEMS, MAX_RECORD_IDS, MAX_RECORD_LEN, RECORDS_END_MAGIC, RECORDS_FOOTER_LEN,
    RECORDS_MAGIC, Reader, Writer, ZSTD_LEVEL, check_header, checksum, decompress, header,
};

/// Where one block lies and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub first_index: u32,
    pub count: u32,
    pub checksum: [u8; CHECKSUM_LEN],
}

/// The parsed footer and table of a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackLayout {
    pub first_id: u32,
    pub count: u32,
    pub blocks: Vec<BlockEntry>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses a footer (the last [`RECORDS_FOOTER_LEN`] bytes of a `file_len`-byte pack) into
/// `(table_offset, first_id, count, blocks)`.
pub fn parse_footer(tail: &[u8], file_len: u64) -> Result<(u64, u32, u32, u32), DecodeError> {
    let at = file_len.saturating_sub(RECORDS_FOOTER_LEN as u64);
    if tail.len() != RECORDS_FOOTER_LEN || file_len < (HEADER_LEN + RECORDS_FOOTER_LEN) as u64 {
        return Err(DecodeError::new(at, "too short for a record pack"));
    }
    if tail[40..48] != RECORDS_END_MAGIC {
        return Err(DecodeError::new(at + 40, "bad end magic"));
    }
    let table_offset = le_u64(tail, 0);
    let first_id = le_u64(tail, 8);
    let count = le_u32(tail, 16);
    let blocks = le_u32(tail, 20);
    if u64::from(count) > MAX_PACK_ITEMS || u64::from(blocks) > MAX_BLOCKS {
        return Err(DecodeError::new(at, "record or block count exceeds limit"));
    }
    if first_id == 0 || first_id.saturating_add(u64::from(count)) > MAX_RECORD_IDS {
        return Err(DecodeError::new(at + 8, "record ids outside the id space"));
    }
    let table_end = table_offset.checked_add(u64::from(blocks) * BLOCK_ENTRY_LEN as u64);
    if table_offset < HEADER_LEN as u64 || table_end != Some(at) {
        return Err(DecodeError::new(at, "table does not end at the footer"));
    }
    Ok((table_offset, first_id as u32, count, blocks))
}

/// Parses and checks the table given the header, table and footer bytes.
pub fn parse_layout(
    head: &[u8],
    table: &[u8],
    tail: &[u8],
    file_len: u64,
) -> Result<PackLayout, DecodeError> {
    check_header(head, RECORDS_MAGIC)?;
    let (table_offset, first_id, count, nblocks) = parse_footer(tail, file_len)?;
    if table.len() as u64 != u64::from(nblocks) * BLOCK_ENTRY_LEN as u64 {
        return Err(DecodeError::new(table_offset, "table length mismatch"));
    }
    let mut h = blake3::Hasher::new();
    h.update(&head[..HEADER_LEN]);
    h.update(table);
    h.update(&tail[..24]);
    if h.finalize().as_bytes()[..CHECKSUM_LEN] != tail[24..40] {
        return Err(DecodeError::new(
            file_len - 24,
            "header/table checksum mismatch",
        ));
    }
    let mut blocks = Vec::with_capacity(nblocks as usize);
    let (mut next_offset, mut next_index) = (HEADER_LEN as u64, 0u32);
    for (i, e) in table.chunks_exact(BLOCK_ENTRY_LEN).enumerate() {
        let at = table_offset + (i * BLOCK_ENTRY_LEN) as u64;
        let mut sum = [0u8; CHECKSUM_LEN];
        sum.copy_from_slice(&e[24..40]);
        let b = BlockEntry {
            offset: le_u64(e, 0),
            stored_len: le_u32(e, 8),
            raw_len: le_u32(e, 12),
            first_index: le_u32(e, 16),
            count: le_u32(e, 20),
            checksum: sum,
        };
        if b.offset != next_offset || b.first_index != next_index || b.count == 0 {
            return Err(DecodeError::new(at, "blocks are not contiguous"));
        }
        if b.raw_len as usize > MAX_BLOCK_RAW {
            return Err(DecodeError::new(at, "block exceeds size limit"));
        }
        next_offset = b.offset + u64::from(b.stored_len);
        next_index = b
            .first_index
            .checked_add(b.count)
            .ok_or_else(|| DecodeError::new(at, "record index overflow"))?;
        blocks.push(b);
    }
    if next_offset != table_offset || next_index != count {
        return Err(DecodeError::new(
            table_offset,
            "blocks do not cover the pack",
        ));
    }
    Ok(PackLayout {
        first_id,
        count,
        blocks,
    })
}

/// A decompressed, verified block: record `i` is `raw[spans[i].0..spans[i].1]`.
#[derive(Debug)]
pub struct Block {
    raw: Vec<u8>,
    spans: Vec<(u32, u32)>,
}

impl Block {
    /// Verifies and splits a block's stored bytes.
    pub fn decode(stored: &[u8], e: &BlockEntry) -> Result<Self, DecodeError> {
        if checksum(stored) != e.checksum {
            return Err(DecodeError::new(e.offset, "block checksum mismatch"));
        }
        let raw = decompress(stored, e.raw_len as usize, e.offset)?;
        if raw.len() != e.raw_len as usize {
            return Err(DecodeError::new(e.offset, "block length mismatch"));
        }
        let mut spans = Vec::with_capacity((e.count as usize).min(raw.len()));
        let mut r = Reader::new(&raw, 0);
        for _ in 0..e.count {
            let len = r
                .bytes(MAX_RECORD_LEN, "record")
                .map_err(|x| DecodeError::new(e.offset, format!("block: {}", x.reason)))?
                .len();
            let end = r.pos();
            spans.push(((end - len) as u32, end as u32));
        }
        if !r.is_empty() {
            return Err(DecodeError::new(e.offset, "trailing bytes in block"));
        }
        Ok(Self { raw, spans })
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let &(s, e) = self.spans.get(i)?;
        Some(&self.raw[s as usize..e as usize])
    }
}

/// A record pack whose header, table and footer were verified.
#[derive(Debug)]
pub struct RecordPack {
    pub seq: u64,
    pub layout: PackLayout,
    pub file_len: u64,
    name: String,
    /// Opened per block read, so thousands of packs do not hold thousands of descriptors.
    path: PathBuf,
    cache: Arc<BlockCache>,
}

/// Decoded blocks of all packs of an index, keyed by (pack sequence number, block), within a
/// byte budget; when an insert would exceed it, the cache is emptied (cheap and adequate:
/// queries touch blocks in bursts).
#[derive(Debug)]
pub struct BlockCache {
    budget: usize,
    /// The blocks and their total size.
    inner: Mutex<(BlockMap, usize)>,
}

type BlockMap = HashMap<(u64, u32), Arc<Block>>;

impl BlockCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    fn get(&self, key: (u64, u32)) -> Option<Arc<Block>> {
        self.inner
            .lock()
            .expect("block cache lock")
            .0
            .get(&key)
            .cloned()
    }

    fn insert(&self, key: (u64, u32), block: Arc<Block>) {
        let mut inner = self.inner.lock().expect("block cache lock");
        let size = block.raw.len() + block.spans.len() * 8;
        if inner.1 + size > self.budget {
            inner.0.clear();
            inner.1 = 0;
        }
        if inner.0.insert(key, block).is_none() {
            inner.1 += size;
        }
    }
}

impl RecordPack {
    /// Opens a pack and verifies its header, table and footer.
    pub fn open(path: &Path, seq: u64, cache: &Arc<BlockCache>) -> Result<Self> {
        let name = file_name(path);
        let file = File::open(path).map_err(|e| IndexError::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| IndexError::io(path, "stat", e))?
            .len();
        let read = |off: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, off)
                .map_err(|e| IndexError::io(path, "read", e))?;
            Ok(buf)
        };
        let short = |_| DecodeError::new(0, "too short for a record pack").in_file(&name);
        let tail_at = file_len
            .checked_sub(RECORDS_FOOTER_LEN as u64)
            .ok_or(())
            .map_err(short)?;
        if file_len < (HEADER_LEN + RECORDS_FOOTER_LEN) as u64 {
            return Err(short(()));
        }
        let tail = read(tail_at, RECORDS_FOOTER_LEN)?;
        let (table_offset, _, _, _) =
            parse_footer(&tail, file_len).map_err(|e| e.in_file(&name))?;
        let head = read(0, HEADER_LEN)?;
        let table = read(table_offset, (tail_at - table_offset) as usize)?;
        let layout = parse_layout(&head, &table, &tail, file_len).map_err(|e| e.in_file(&name))?;
        Ok(Self {
            seq,
            layout,
            file_len,
            name,
            path: path.to_path_buf(),
            cache: cache.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn contains(&self, id: u32) -> bool {
        id >= self.layout.first_id && id - self.layout.first_id < self.layout.count
    }

    /// The block holding record `id` and its index inside the block.
    pub fn block_of(&self, id: u32) -> Result<(Arc<Block>, usize)> {
        let index = id
            .checked_sub(self.layout.first_id)
            .filter(|&i| i < self.layout.count)
            .ok_or_else(|| IndexError::invalid(format!("record {id} is not in {}", self.name)))?;
        let b = self
            .layout
            .blocks
            .partition_point(|b| b.first_index + b.count <= index);
        let block = self.block(b)?;
        Ok((block, (index - self.layout.blocks[b].first_index) as usize))
    }

    /// Block `b`, from the cache or read and verified.
    pub fn block(&self, b: usize) -> Result<Arc<Block>> {
        if let Some(hit) = self.cache.get((self.seq, b as u32)) {
            return Ok(hit);
        }
        let e = self.layout.blocks[b];
        let mut stored = vec![0u8; e.stored_len as usize];
        File::open(&self.path)
            .and_then(|f| f.read_exact_at(&mut stored, e.offset))
            .map_err(|x| IndexError::io(&self.path, "read block", x))?;
        let block = Arc::new(Block::decode(&stored, &e).map_err(|x| x.in_file(&self.name))?);
        self.cache.insert((self.seq, b as u32), block.clone());
        Ok(block)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Writes a pack to a file as records arrive.
#[derive(Debug)]
pub struct PackWriter {
    path: PathBuf,
    out: BufWriter<File>,
    first_id: u32,
    count: u32,
    offset: u64,
    raw: Writer,
    raw_count: u32,
    blocks: Vec<BlockEntry>,
}

impl PackWriter {
    /// Creates `path` (truncating a leftover of an interrupted add).
    pub fn create(path: &Path, first_id: u32) -> Result<Self> {
        let file = File::create(path).map_err(|e| IndexError::io(path, "create", e))?;
        let mut out = BufWriter::new(file);
        out.write_all(&header(RECORDS_MAGIC))
            .map_err(|e| IndexError::io(path, "write", e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            first_id,
            count: 0,
            offset: HEADER_LEN as u64,
            raw: Writer::default(),
            raw_count: 0,
            blocks: Vec::new(),
        })
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// Appends an encoded record; returns its id.
    pub fn push(&mut self, rec: &[u8]) -> Result<u32> {
        if u64::from(self.count) >= MAX_PACK_ITEMS
            || u64::from(self.first_id + self.count) >= MAX_RECORD_IDS
        {
            return Err(IndexError::invalid("too many records"));
        }
        let id = self.first_id + self.count;
        self.raw.bytes(rec);
        self.raw_count += 1;
        self.count += 1;
        if self.raw.buf.len() >= BLOCK_TARGET_RAW {
            self.flush_block()?;
        }
        Ok(id)
    }

    fn flush_block(&mut self) -> Result<()> {
        if self.raw_count == 0 {
            return Ok(());
        }
        let stored = zstd::bulk::compress(&self.raw.buf, ZSTD_LEVEL)
            .map_err(|e| IndexError::io(&self.path, "compress", e))?;
        self.out
            .write_all(&stored)
            .map_err(|e| IndexError::io(&self.path, "write", e))?;
        self.blocks.push(BlockEntry {
            offset: self.offset,
            stored_len: stored.len() as u32,
            raw_len: self.raw.buf.len() as u32,
            first_index: self.count - self.raw_count,
            count: self.raw_count,
            checksum: checksum(&stored),
        });
        self.offset += stored.len() as u64;
        self.raw.buf.clear();
        self.raw_count = 0;
        Ok(())
    }

    /// Writes table and footer and fsyncs; returns the file length.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_block()?;
        let mut table = Vec::with_capacity(self.blocks.len() * BLOCK_ENTRY_LEN);
        for b in &self.blocks {
            table.extend_from_slice(&b.offset.to_le_bytes());
            table.extend_from_slice(&b.stored_len.to_le_bytes());
            table.extend_from_slice(&b.raw_len.to_le_bytes());
            table.extend_from_slice(&b.first_index.to_le_bytes());
            table.extend_from_slice(&b.count.to_le_bytes());
            table.extend_from_slice(&b.checksum);
        }
        let mut footer = Vec::with_capacity(RECORDS_FOOTER_LEN);
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&u64::from(self.first_id).to_le_bytes());
        footer.extend_from_slice(&self.count.to_le_bytes());
        footer.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        let mut h = blake3::Hasher::new();
        h.update(&header(RECORDS_MAGIC));
        h.update(&table);
        h.update(&footer);
        footer.extend_from_slice(&h.finalize().as_bytes()[..CHECKSUM_LEN]);
        footer.extend_from_slice(&RECORDS_END_MAGIC);
        let io = |e| IndexError::io(&self.path, "write", e);
        self.out.write_all(&table).map_err(io)?;
        self.out.write_all(&footer).map_err(io)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| IndexError::io(&self.path, "write", e.into_error()))?;
        file.sync_all()
            .map_err(|e| IndexError::io(&self.path, "fsync", e))?;
        Ok(self.offset + (table.len() + footer.len()) as u64)
    }
}

/// Parses a whole pack held in memory and decodes every block (for tests and fuzzing).
pub fn parse_all(data: &[u8]) -> Result<(PackLayout, Vec<Vec<u8>>), DecodeError> {
    let len = data.len() as u64;
    if data.len() < HEADER_LEN + RECORDS_FOOTER_LEN {
        return Err(DecodeError::new(0, "too short for a record pack"));
    }
    let tail = &data[data.len() - RECORDS_FOOTER_LEN..];
    let (table_offset, ..) = parse_footer(tail, len)?;
    let table = &data[table_offset as usize..data.len() - RECORDS_FOOTER_LEN];
    let layout = parse_layout(&data[..HEADER_LEN], table, tail, len)?;
    let mut records = Vec::new();
    for e in &layout.blocks {
        let stored = &data[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize];
        let block = Block::decode(stored, e)?;
        for i in 0..e.count as usize {
            records.push(block.get(i).unwrap_or_default().to_vec());
        }
    }
    Ok((layout, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.fir");
        let mut w = PackWriter::create(&p, 10).unwrap();
        let recs: Vec<Vec<u8>> = (0..5000u32)
            .map(|i| i.to_le_bytes().repeat(1 + (i % 7) as usize))
            .collect();
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(w.push(r).unwrap(), 10 + i as u32);
        }
        let len = w.finish().unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len() as u64, len);
        let (layout, back) = parse_all(&data).unwrap();
        assert_eq!(back, recs);
        assert!(layout.blocks.len() > 1);
        let pack = RecordPack::open(&p, 1, &Arc::new(BlockCache::new(1 << 20))).unwrap();
        for id in [10u32, 11, 2000, 5009] {
            let (b, i) = pack.block_of(id).unwrap();
            assert_eq!(b.get(i).unwrap(), recs[(id - 10) as usize].as_slice());
        }
        assert!(pack.block_of(9).is_err() && pack.block_of(5010).is_err());
        for i in (0..data.len()).step_by(97) {
            let mut bad = data.clone();
            bad[i] ^= 1;
            assert!(parse_all(&bad).is_err(), "flip at {i}");
        }
        for n in [0, 10, data.len() / 2, data.len() - 1] {
            assert!(parse_all(&data[..n]).is_err());
        }
        // Found by the fuzzer: a first id near u64::MAX overflowed.
        let mut huge = data.clone();
        let at = huge.len() - RECORDS_FOOTER_LEN + 8;
        huge[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_all(&huge).is_err());
    }
}
