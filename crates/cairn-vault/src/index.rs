//! The fingerprint index: digest → where the blob lies (container, offset, lengths, codec).
//!
//! # Layout
//!
//! The index is a local, rebuildable cache: a set of immutable **runs** in one directory, each
//! a file of records sorted by digest, plus the in-memory `pending` map of entries not yet
//! written to a run. Every run names the containers it covers; a container that no run covers
//! (written by a backup that crashed before its index flush) is found at [`Index::open`] and its
//! trailer is read back in. So deleting the whole directory loses nothing: the next open
//! rebuilds it from the containers alone.
//!
//! ```text
//! run file: header (INDEX_HEADER_LEN) | container ids (16 each) | bloom words (u64 each)
//!           | fences (u64 each, first 8 digest bytes of every INDEX_FENCE_STRIDE-th record)
//!           | page checksums (INDEX_PAGE_SUM_LEN each, one per fence page of records)
//!           | records (INDEX_RECORD_LEN each, sorted by digest)
//! ```
//!
//! # Damage
//!
//! Everything before the records is checked against the header's checksum when a run is
//! opened, and every page of records against its checksum whenever it is read. A run that
//! fails either is never believed: it is reported as [`VaultError::IndexDamaged`], and the
//! repository drops it and re-reads the trailers of the containers it covered
//! ([`Repository::heal_index`](crate::Repository::heal_index)), so a damaged cache costs a
//! rebuild, never a wrong answer.
//!
//! # Memory
//!
//! Only the bloom filter (10 bits) and the fences (8 bytes per 64 records = 1 bit) of each run
//! stay in memory: about **1.4 bytes per segment**, so 10^9 segments need ~1.4 GiB of RAM. A
//! lookup that the bloom filter rejects (~99% of lookups of new data) touches no disk; one that
//! passes reads one 8 KiB window of the run file.
//!
//! # Concurrency and crashes
//!
//! Runs are written with temp + fsync + rename and never modified. Replacing runs (compaction,
//! GC) writes the new run before deleting the old ones, so a crash leaves duplicates, never
//! gaps. Callers serialise mutation with the repository lock.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_chunk::container::Record;
use cairn_chunk::format::{
    BlobKind, INDEX_BLOOM_BITS_PER_RECORD, INDEX_BLOOM_K, INDEX_FENCE_STRIDE, INDEX_HEADER_LEN,
    INDEX_MAGIC, INDEX_PAGE_SUM_LEN, INDEX_RECORD_LEN, INDEX_VERSION,
};
use cairn_chunk::{Codec, Member};
use cairn_types::{ContainerId, Digest};

use crate::error::{Result, VaultError};

/// Where a segment lies: its frame in a container, and its place in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub container: ContainerId,
    pub offset: u32,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
    pub codec: Codec,
}

impl Location {
    /// # Panics
    ///
    /// If the record lies past 4 GiB: [`Repository::container_records`] refuses such
    /// stored containers, and writers seal theirs at `CONTAINER_TARGET_LEN`.
    ///
    /// [`Repository::container_records`]: crate::repo::Repository::container_records
    pub fn from_record(container: ContainerId, r: &Record) -> Self {
        Self {
            container,
            offset: u32::try_from(r.offset).expect("a container record below 4 GiB"),
            stored_len: r.stored_len,
            frame_len: r.frame_len,
            inner: r.inner,
            raw_len: r.raw_len,
            kind: r.kind,
            codec: r.codec,
        }
    }

    pub fn member(&self) -> Member {
        Member {
            frame_len: self.frame_len,
            inner: self.inner,
            raw_len: self.raw_len,
        }
    }

    /// `container` is the location's place in the run's container table.
    fn encode(&self, d: &Digest, container: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(d.as_bytes());
        for v in [
            container,
            self.offset,
            self.stored_len,
            self.frame_len,
            self.inner,
            self.raw_len,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.kind as u8);
        out.push(self.codec as u8);
        out.extend_from_slice(&[0, 0]);
    }

    fn decode(b: &[u8], containers: &[ContainerId]) -> Option<(Digest, Self)> {
        let d = Digest::from_slice(&b[..32])?;
        let u = |i: usize| u32::from_le_bytes(b[32 + 4 * i..36 + 4 * i].try_into().expect("4"));
        Some((
            d,
            Self {
                container: *containers.get(u(0) as usize)?,
                offset: u(1),
                stored_len: u(2),
                frame_len: u(3),
                inner: u(4),
                raw_len: u(5),
                kind: BlobKind::from_u8(b[56])?,
                codec: Codec::from_u8(b[57])?,
            },
        ))
    }
}

fn key64(d: &Digest) -> u64 {
    u64::from_be_bytes(d.0[..8].try_into().expect("8 bytes"))
}

struct Bloom {
    words: Vec<u64>,
    k: u32,
}

impl Bloom {
    fn with_capacity(n: usize) -> Self {
        let bits = (n as u64 * INDEX_BLOOM_BITS_PER_RECORD).max(64);
        // Fewer words than records (10 bits each), and the records are in memory.
        #[allow(clippy::cast_possible_truncation)]
        let words = bits.div_ceil(64) as usize;
        Self {
            words: vec![0; words],
            k: INDEX_BLOOM_K,
        }
    }

    fn probes(&self, d: &Digest) -> impl Iterator<Item = u64> + '_ {
        let h1 = u64::from_le_bytes(d.0[8..16].try_into().expect("8"));
        let h2 = u64::from_le_bytes(d.0[16..24].try_into().expect("8")) | 1;
        let m = self.words.len() as u64 * 64;
        (0..u64::from(self.k)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
    }

    fn insert(&mut self, d: &Digest) {
        let bits: Vec<u64> = self.probes(d).collect();
        for b in bits {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn may_contain(&self, d: &Digest) -> bool {
        self.probes(d)
            .all(|b| self.words[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }
}

struct Run {
    path: PathBuf,
    file: File,
    containers: Vec<ContainerId>,
    bloom: Bloom,
    fences: Vec<u64>,
    page_sums: Vec<u64>,
    records_at: u64,
    n: u64,
}

/// The checksum of one page of records.
fn page_sum(records: &[u8]) -> u64 {
    u64::from_le_bytes(blake3::hash(records).as_bytes()[..8].try_into().expect("8"))
}

/// The header's checksum over its first 40 bytes and the metadata that follows it.
fn meta_sum(header: &[u8], meta: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&header[..INDEX_HEADER_LEN - 16]);
    h.update(meta);
    h.finalize().as_bytes()[..16].try_into().expect("16")
}

impl Run {
    fn open(path: &Path) -> Result<Self> {
        let io = |what| move |e| VaultError::io(path.display(), what, e);
        let file = File::open(path).map_err(io("open index run"))?;
        let len = file.metadata().map_err(io("stat index run"))?.len();
        let mut h = [0u8; INDEX_HEADER_LEN];
        file.read_exact_at(&mut h, 0)
            .map_err(io("read index run header"))?;
        let bad = |r: &str| VaultError::IndexDamaged {
            path: path.display().to_string(),
            what: r.to_string(),
        };
        if h[..8] != INDEX_MAGIC
            || u32::from_le_bytes(h[8..12].try_into().expect("4")) != INDEX_VERSION
        {
            return Err(bad("bad magic or version"));
        }
        let nc = u64::from(u32::from_le_bytes(h[12..16].try_into().expect("4")));
        let n = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        let words = u64::from_le_bytes(h[24..32].try_into().expect("8"));
        let k = u32::from_le_bytes(h[32..36].try_into().expect("4"));
        let nf = n.div_ceil(INDEX_FENCE_STRIDE as u64);
        let want = (INDEX_HEADER_LEN as u64)
            .checked_add(nc.checked_mul(16).ok_or_else(|| bad("size overflow"))?)
            .and_then(|v| v.checked_add(words.checked_mul(8)?))
            .and_then(|v| v.checked_add(nf.checked_mul(8 + INDEX_PAGE_SUM_LEN as u64)?))
            .and_then(|v| v.checked_add(n.checked_mul(INDEX_RECORD_LEN as u64)?));
        if want != Some(len) || k == 0 || k > 32 || words == 0 {
            return Err(bad("length does not match header (truncated?)"));
        }
        // The lengths add up to the file's (checked above); each must also fit in memory.
        let size = |n: u64, width: usize| {
            usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(width))
                .ok_or_else(|| bad("metadata does not fit in memory"))
        };
        let (cs_len, ws_len, fs_len) = (size(nc, 16)?, size(words, 8)?, size(nf, 8)?);
        let meta_len = size(
            len - n * INDEX_RECORD_LEN as u64 - INDEX_HEADER_LEN as u64,
            1,
        )?;
        let mut meta = vec![0u8; meta_len];
        file.read_exact_at(&mut meta, INDEX_HEADER_LEN as u64)
            .map_err(io("read index run"))?;
        if meta_sum(&h, &meta)[..] != h[INDEX_HEADER_LEN - 16..] {
            return Err(bad("header checksum mismatch"));
        }
        let (cbytes, rest) = meta.split_at(cs_len);
        let (wbytes, rest) = rest.split_at(ws_len);
        let (fbytes, sbytes) = rest.split_at(fs_len);
        let containers = cbytes
            .chunks_exact(16)
            .map(|c| ContainerId::from_slice(c).expect("16"))
            .collect();
        let u64s = |b: &[u8]| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            containers,
            bloom: Bloom {
                words: u64s(wbytes),
                k,
            },
            fences: u64s(fbytes),
            page_sums: u64s(sbytes),
            records_at: len - n * INDEX_RECORD_LEN as u64,
            n,
        })
    }

    /// The records `lo..hi` that can hold `d`: the fence page before the first fence `>= d`,
    /// and the one after it too on an equal 8-byte prefix.
    fn pages_of(&self, d: &Digest) -> (u64, u64) {
        let key = key64(d);
        let p = self.fences.partition_point(|&f| f < key);
        let stride = INDEX_FENCE_STRIDE as u64;
        let last = self.fences.len() - 1;
        let (first_page, last_page) = match self.fences.get(p) {
            Some(&f) if f == key => (p.saturating_sub(1), p),
            _ if p == 0 => (0, 0),
            _ => (p - 1, p - 1),
        };
        let last_page = last_page.min(last) as u64;
        (
            first_page as u64 * stride,
            ((last_page + 1) * stride).min(self.n),
        )
    }

    fn read_records(&self, lo: u64, hi: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_records_into(lo, hi, &mut buf)?;
        Ok(buf)
    }

    /// Reads records `lo..hi` into `buf` (resized to fit; its memory is reused) and checks
    /// their pages. `lo` is the start of a page, `hi` the end of one or of the run.
    fn read_records_into(&self, lo: u64, hi: u64, buf: &mut Vec<u8>) -> Result<()> {
        let stride = INDEX_FENCE_STRIDE as u64;
        debug_assert!(lo.is_multiple_of(stride) && (hi.is_multiple_of(stride) || hi == self.n));
        let len = usize::try_from(hi - lo)
            .ok()
            .and_then(|k| k.checked_mul(INDEX_RECORD_LEN))
            .ok_or_else(|| VaultError::IndexDamaged {
                path: self.path.display().to_string(),
                what: format!("records {lo}..{hi} do not fit in memory"),
            })?;
        buf.resize(len, 0);
        self.file
            .read_exact_at(buf, self.records_at + lo * INDEX_RECORD_LEN as u64)
            .map_err(|e| VaultError::io(self.path.display(), "read index run", e))?;
        // Past usize, no page sum matches: the run is reported damaged.
        let first_page = usize::try_from(lo / stride).unwrap_or(usize::MAX);
        for (i, page) in buf
            .chunks(INDEX_FENCE_STRIDE * INDEX_RECORD_LEN)
            .enumerate()
        {
            if self.page_sums.get(first_page.saturating_add(i)) != Some(&page_sum(page)) {
                return Err(VaultError::IndexDamaged {
                    path: self.path.display().to_string(),
                    what: format!(
                        "records of page {} fail their checksum",
                        first_page.saturating_add(i)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Binary search for `d` in `recs` (whole records, sorted).
    fn search(&self, recs: &[u8], d: &Digest) -> Result<Option<Location>> {
        let n = recs.len() / INDEX_RECORD_LEN;
        let rec = |i: usize| &recs[i * INDEX_RECORD_LEN..(i + 1) * INDEX_RECORD_LEN];
        let (mut a, mut b) = (0usize, n);
        while a < b {
            let m = (a + b) / 2;
            match rec(m)[..32].cmp(d.as_bytes()) {
                std::cmp::Ordering::Less => a = m + 1,
                std::cmp::Ordering::Greater => b = m,
                std::cmp::Ordering::Equal => {
                    return Location::decode(rec(m), &self.containers)
                        .map(|(_, l)| Some(l))
                        .ok_or_else(|| VaultError::IndexDamaged {
                            path: self.path.display().to_string(),
                            what: "a record names no container".into(),
                        });
                }
            }
        }
        Ok(None)
    }

    /// Looks up `want` (indices into `digests`, in digest order) and fills `out` for the ones
    /// found. Neighbouring fence pages are read together (up to 1 MiB per read), so a large
    /// sorted batch costs a few sequential reads instead of one read per digest.
    fn get_sorted(
        &self,
        digests: &[Digest],
        want: &[usize],
        out: &mut [Option<Location>],
    ) -> Result<()> {
        const SPAN_RECORDS: u64 = (1 << 20) / INDEX_RECORD_LEN as u64;
        if self.n == 0 {
            return Ok(());
        }
        let cand: Vec<(usize, u64, u64)> = want
            .iter()
            .filter(|&&i| self.bloom.may_contain(&digests[i]))
            .map(|&i| {
                let (lo, hi) = self.pages_of(&digests[i]);
                (i, lo, hi)
            })
            .collect();
        let mut k = 0;
        let mut buf = Vec::new(); // one span's records, reused
        while k < cand.len() {
            let (lo, mut hi) = (cand[k].1, cand[k].2);
            let mut j = k + 1;
            // Pages are in order because the digests are: extend while the next digest's
            // pages touch this span and the span stays bounded.
            while j < cand.len() && cand[j].1 <= hi && cand[j].2 - lo <= SPAN_RECORDS {
                hi = hi.max(cand[j].2);
                j += 1;
            }
            self.read_records_into(lo, hi, &mut buf)?;
            for &(i, a, b) in &cand[k..j] {
                // lo <= a <= b <= hi, and buf holds records lo..hi.
                #[allow(clippy::cast_possible_truncation)]
                let slice = &buf[((a - lo) as usize) * INDEX_RECORD_LEN
                    ..((b - lo) as usize) * INDEX_RECORD_LEN];
                if let Some(l) = self.search(slice, &digests[i])? {
                    out[i] = Some(l);
                }
            }
            k = j;
        }
        Ok(())
    }

    fn get(&self, d: &Digest) -> Result<Option<Location>> {
        if self.n == 0 || !self.bloom.may_contain(d) {
            return Ok(None);
        }
        let (lo, hi) = self.pages_of(d);
        self.search(&self.read_records(lo, hi)?, d)
    }

    /// All records, in digest order.
    fn scan(&self) -> Result<Vec<(Digest, Location)>> {
        let buf = self.read_records(0, self.n)?;
        buf.chunks_exact(INDEX_RECORD_LEN)
            .map(|r| {
                Location::decode(r, &self.containers).ok_or_else(|| VaultError::IndexDamaged {
                    path: self.path.display().to_string(),
                    what: "a record names no container".into(),
                })
            })
            .collect()
    }
}

/// Writes a run; returns its size in bytes.
fn write_run(
    path: &Path,
    containers: &[ContainerId],
    mut recs: Vec<(Digest, Location)>,
) -> Result<u64> {
    // Stable: of two entries for one digest the first given wins (callers list the newest
    // first).
    recs.sort_by_key(|a| a.0);
    recs.dedup_by(|a, b| a.0 == b.0);
    // The table lists the containers the run covers and every container a record points
    // into (a record of an already covered container may be re-added): both are covered.
    let mut containers = containers.to_vec();
    containers.extend(recs.iter().map(|(_, l)| l.container));
    containers.sort_unstable();
    containers.dedup();
    let place = |c: &ContainerId| {
        let i = containers.binary_search(c).expect("listed");
        u32::try_from(i).expect("fewer than 2^32 containers")
    };
    let mut bloom = Bloom::with_capacity(recs.len());
    recs.iter().for_each(|(d, _)| bloom.insert(d));
    let nf = recs.len().div_ceil(INDEX_FENCE_STRIDE);
    let mut out = Vec::with_capacity(
        INDEX_HEADER_LEN
            + containers.len() * 16
            + bloom.words.len() * 8
            + nf * (8 + INDEX_PAGE_SUM_LEN)
            + recs.len() * INDEX_RECORD_LEN,
    );
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    let count = u32::try_from(containers.len()).expect("fewer than 2^32 containers");
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(recs.len() as u64).to_le_bytes());
    out.extend_from_slice(&(bloom.words.len() as u64).to_le_bytes());
    out.extend_from_slice(&bloom.k.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&[0; 16]); // the checksum, set below
    containers
        .iter()
        .for_each(|c| out.extend_from_slice(c.as_bytes()));
    bloom
        .words
        .iter()
        .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
    recs.iter()
        .step_by(INDEX_FENCE_STRIDE)
        .for_each(|(d, _)| out.extend_from_slice(&key64(d).to_le_bytes()));
    let mut records = Vec::with_capacity(recs.len() * INDEX_RECORD_LEN);
    recs.iter()
        .for_each(|(d, l)| l.encode(d, place(&l.container), &mut records));
    for page in records.chunks(INDEX_FENCE_STRIDE * INDEX_RECORD_LEN) {
        out.extend_from_slice(&page_sum(page).to_le_bytes());
    }
    let sum = meta_sum(&out[..INDEX_HEADER_LEN], &out[INDEX_HEADER_LEN..]);
    out[INDEX_HEADER_LEN - 16..INDEX_HEADER_LEN].copy_from_slice(&sum);
    out.extend_from_slice(&records);
    let tmp = path.with_extension("tmp");
    let io = |what| move |e| VaultError::io(path.display(), what, e);
    let mut f = File::create(&tmp).map_err(io("create index run"))?;
    f.write_all(&out).map_err(io("write index run"))?;
    f.sync_all().map_err(io("fsync index run"))?;
    fs::rename(&tmp, path).map_err(io("rename index run"))?;
    File::open(path.parent().expect("parent"))
        .and_then(|d| d.sync_all())
        .map_err(io("fsync index directory"))?;
    Ok(out.len() as u64)
}

/// The fingerprint index. See the module docs.
pub struct Index {
    dir: PathBuf,
    runs: Vec<Run>,
    pending: HashMap<Digest, Location>,
    pending_containers: Vec<ContainerId>,
    covered: HashSet<ContainerId>,
    /// Runs found damaged and dropped (path, what was wrong), for verify to report.
    dropped: Vec<(String, String)>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("dir", &self.dir)
            .field("runs", &self.runs.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// A new run's file name: its creation time first, so that runs sort by age. Where a segment
/// has copies in several runs the newest run's answer wins (a copy stored again after GC
/// condemned the old one, or a repacked copy), also after the index is opened again.
fn new_run_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    format!("run-{nanos:016x}-{:04x}.idx", rand::random::<u16>())
}

/// Sort key of a run file: runs named by [`new_run_name`] by their time, after the runs of
/// older builds (named by a random number alone, hence of unknown age).
fn run_age(path: &Path) -> (bool, String) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    (name.matches('-').count() == 2, name.to_string())
}

impl Index {
    /// Opens the runs in `dir` (created if missing). Damaged runs are deleted (their
    /// containers will be re-read), so a bad cache never blocks the vault.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| VaultError::io(dir.display(), "create index directory", e))?;
        let mut runs = Vec::new();
        let mut dropped = Vec::new();
        let rd = fs::read_dir(dir).map_err(|e| VaultError::io(dir.display(), "list index", e))?;
        for ent in rd {
            let ent = ent.map_err(|e| VaultError::io(dir.display(), "list index", e))?;
            let p = ent.path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("idx") => match Run::open(&p) {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        tracing::warn!("dropping damaged index run: {e}");
                        let _ = fs::remove_file(&p);
                        let what = match e {
                            VaultError::IndexDamaged { what, .. } => what,
                            e => e.to_string(),
                        };
                        dropped.push((p.display().to_string(), what));
                    }
                },
                Some("tmp") => {
                    let _ = fs::remove_file(&p);
                }
                _ => {}
            }
        }
        // Newer runs answer first, as they did before the index was closed.
        runs.sort_by_cached_key(|r: &Run| run_age(&r.path));
        let covered = runs
            .iter()
            .flat_map(|r| r.containers.iter().copied())
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            runs,
            pending: HashMap::new(),
            pending_containers: Vec::new(),
            covered,
            dropped,
        })
    }

    /// Looks a digest up.
    pub fn get(&self, d: &Digest) -> Result<Option<Location>> {
        if let Some(l) = self.pending.get(d) {
            return Ok(Some(*l));
        }
        for r in self.runs.iter().rev() {
            if let Some(l) = r.get(d)? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    pub fn contains(&self, d: &Digest) -> Result<bool> {
        Ok(self.get(d)?.is_some())
    }

    /// Looks many digests up at once (any order, duplicates allowed): each run is searched
    /// in digest order with neighbouring pages read together, which for large batches is
    /// far cheaper than one [`get`](Self::get) per digest.
    pub fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Location>>> {
        let mut out: Vec<Option<Location>> = digests
            .iter()
            .map(|d| self.pending.get(d).copied())
            .collect();
        let mut order: Vec<usize> = (0..digests.len()).filter(|&i| out[i].is_none()).collect();
        // Runs are searched in key64 order (what their fences and pages follow): sorting on
        // the one integer is several times cheaper than comparing whole digests.
        order.sort_unstable_by_key(|&i| key64(&digests[i]));
        for r in self.runs.iter().rev() {
            if order.is_empty() {
                break;
            }
            r.get_sorted(digests, &order, &mut out)?;
            order.retain(|&i| out[i].is_none());
        }
        Ok(out)
    }

    /// Is this container's content in the index (or pending)?
    pub fn covers(&self, c: &ContainerId) -> bool {
        self.covered.contains(c)
    }

    /// Every container the index covers.
    pub fn covered(&self) -> impl Iterator<Item = &ContainerId> {
        self.covered.iter()
    }

    /// Adds every record of a container.
    pub fn add_container(&mut self, c: ContainerId, records: &[Record]) {
        for r in records {
            self.pending
                .entry(r.digest)
                .or_insert_with(|| Location::from_record(c, r));
        }
        if self.covered.insert(c) {
            self.pending_containers.push(c);
        }
    }

    /// Adds every record of a container that holds the newest copies of its segments (a
    /// backup stored them again, or GC copied them): where another container's copy is
    /// pending, this one replaces it.
    pub fn add_container_preferred(&mut self, c: ContainerId, records: &[Record]) {
        for r in records {
            match self.pending.entry(r.digest) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if e.get().container != c {
                        e.insert(Location::from_record(c, r));
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Location::from_record(c, r));
                }
            }
        }
        if self.covered.insert(c) {
            self.pending_containers.push(c);
        }
    }

    /// Adds entries of a container whose trailer cannot be read (salvaged from an older
    /// index), and counts the container as covered.
    pub fn add_locations(&mut self, c: ContainerId, entries: &[(Digest, Location)]) {
        for (d, l) in entries {
            self.pending.entry(*d).or_insert(*l);
        }
        if self.covered.insert(c) {
            self.pending_containers.push(c);
        }
    }

    /// Deletes every run and pending entry: the index then covers nothing.
    pub fn clear(&mut self) -> Result<()> {
        for r in std::mem::take(&mut self.runs) {
            fs::remove_file(&r.path)
                .map_err(|e| VaultError::io(r.path.display(), "delete index run", e))?;
        }
        self.pending.clear();
        self.pending_containers.clear();
        self.covered.clear();
        Ok(())
    }

    /// Number of entries not yet in a run.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Writes pending entries as a new run; returns the bytes written.
    pub fn flush(&mut self) -> Result<u64> {
        if self.pending_containers.is_empty() && self.pending.is_empty() {
            return Ok(0);
        }
        let path = self.dir.join(new_run_name());
        let recs: Vec<_> = self.pending.iter().map(|(d, l)| (*d, *l)).collect();
        let n = write_run(&path, &self.pending_containers, recs)?;
        self.runs.push(Run::open(&path)?);
        self.pending.clear();
        self.pending_containers.clear();
        Ok(n)
    }

    /// Drops a damaged run (file and all): the containers only it covered are no longer
    /// covered, so the next [`Repository::sync_index`](crate::Repository::sync_index) reads
    /// their trailers again. Returns whether a run of that path was open.
    pub fn drop_run(&mut self, path: &str) -> Result<bool> {
        let Some(i) = self
            .runs
            .iter()
            .position(|r| r.path.display().to_string() == path)
        else {
            return Ok(false);
        };
        let run = self.runs.remove(i);
        self.dropped
            .push((path.to_string(), "dropped after a failed check".into()));
        fs::remove_file(&run.path)
            .map_err(|e| VaultError::io(run.path.display(), "delete index run", e))?;
        self.covered = self
            .runs
            .iter()
            .flat_map(|r| r.containers.iter().copied())
            .chain(self.pending_containers.iter().copied())
            .collect();
        Ok(true)
    }

    /// The runs dropped as damaged since the last call (path, what was wrong).
    pub fn take_dropped(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.dropped)
    }

    /// Reads every page of every run, checking its checksum; returns the first damage.
    pub fn check_runs(&self) -> Result<u64> {
        let mut n = 0;
        for r in &self.runs {
            n += r.scan()?.len() as u64;
        }
        Ok(n)
    }

    /// Every entry of every run and the pending ones (a digest may appear more than once).
    pub fn all_entries(&self) -> Result<Vec<(Digest, Location)>> {
        let mut out: Vec<(Digest, Location)> = self.pending.iter().map(|(d, l)| (*d, *l)).collect();
        for r in self.runs.iter().rev() {
            out.extend(r.scan()?);
        }
        Ok(out)
    }

    /// Number of runs on disk.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Merges every run into one, dropping entries of `remove`d containers. Writes the new run
    /// before deleting the old ones.
    pub fn rewrite(&mut self, remove: &HashSet<ContainerId>) -> Result<()> {
        self.flush()?;
        let mut all = Vec::new();
        let mut containers: Vec<ContainerId> = Vec::new();
        for r in self.runs.iter().rev() {
            all.extend(
                r.scan()?
                    .into_iter()
                    .filter(|(_, l)| !remove.contains(&l.container)),
            );
            containers.extend(r.containers.iter().filter(|c| !remove.contains(c)));
        }
        containers.sort_unstable();
        containers.dedup();
        let path = self.dir.join(new_run_name());
        write_run(&path, &containers, all)?;
        let new = Run::open(&path)?;
        for old in std::mem::take(&mut self.runs) {
            // Another process on the same cache directory may have merged it already.
            match fs::remove_file(&old.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(VaultError::io(old.path.display(), "delete index run", e));
                }
                _ => {}
            }
        }
        self.covered = containers.iter().copied().collect();
        self.runs.push(new);
        Ok(())
    }

    /// Bytes of RAM the index holds beyond its pending entries.
    pub fn resident_bytes(&self) -> usize {
        self.runs
            .iter()
            .map(|r| r.bloom.words.len() * 8 + r.fences.len() * 8 + r.containers.len() * 16)
            .sum()
    }
}

#[cfg(test)]
mod tests;
