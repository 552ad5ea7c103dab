//! Segmentation of a byte stream into segments.
//!
//! Two modes share one recipe format:
//! - **CDC**: FastCDC (the 2020 variant, normalisation level 1) with min/avg/max bounds. Cut
//!   points depend only on the bytes since the previous cut, so chunking restarted at any
//!   earlier cut point reproduces the same cuts — the property incremental re-chunking needs.
//! - **Fixed**: every segment is `size` bytes (the last one may be shorter).
//!
//! The chunker is a pure function over a window: [`Chunker::cut`] is given the bytes after the
//! previous cut and their absolute offset in the image, and says where the next segment ends.
//!
//! **Zero blocks are hard boundaries (CDC mode).** A 4 KiB block of zeros at a 4 KiB-aligned
//! image offset never lies inside a data segment: runs of such blocks become zero segments
//! (holes) that end at the next absolute multiple of the zero-run size. Cut points around
//! zeros therefore depend only on absolute offsets, so an incremental re-chunk realigns with
//! its parent at the first zero block, and sparse regions cost no hashing.

use fastcdc::v2020::{self, Normalization};

use crate::fingerprint::is_zero;

/// How to cut segments. Part of a snapshot's metadata: an incremental backup re-chunks with
/// its parent's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ChunkerParams {
    Cdc { min: u32, avg: u32, max: u32 },
    Fixed { size: u32 },
}

/// The default, chosen by measurement on the benchmark corpus (docs/BENCHMARKS.md): on an
/// ext4 disk image, 8 KiB segments store a day of scattered 4 KiB rewrites at 3.4× the changed
/// bytes (16 KiB: 4.8×) for ~13% less full-backup throughput.
impl Default for ChunkerParams {
    fn default() -> Self {
        Self::Cdc {
            min: 2 << 10,
            avg: 8 << 10,
            max: 32 << 10,
        }
    }
}

impl ChunkerParams {
    /// Largest segment these parameters produce.
    pub fn max_len(&self) -> usize {
        match *self {
            Self::Cdc { max, .. } => max as usize,
            Self::Fixed { size } => size as usize,
        }
    }

    /// Checks the bounds FastCDC supports.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Cdc { min, avg, max } => {
                let (min, avg, max) = (min as usize, avg as usize, max as usize);
                let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
                    && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
                    && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
                    && min < avg
                    && avg < max
                    && [min, avg, max].iter().all(|v| v.is_multiple_of(2));
                if !ok {
                    return Err(format!(
                        "CDC bounds min={min} avg={avg} max={max} must be even, min < avg < max, \
                         min in 64..=1MiB, avg in 256..=4MiB, max in 1KiB..=16MiB"
                    ));
                }
                Ok(())
            }
            Self::Fixed { size } => {
                if !(512..=(16 << 20)).contains(&size) {
                    return Err(format!("fixed segment size {size} must be in 512..=16MiB"));
                }
                Ok(())
            }
        }
    }

    /// Parses `cdc:MIN,AVG,MAX` or `fixed:SIZE` (sizes in bytes, with optional K/M suffix).
    pub fn parse(s: &str) -> Result<Self, String> {
        fn num(s: &str) -> Result<u32, String> {
            let s = s.trim();
            let (n, mul) = match s.chars().last() {
                Some('k' | 'K') => (&s[..s.len() - 1], 1024),
                Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
                _ => (s, 1),
            };
            n.parse::<u32>()
                .ok()
                .and_then(|v| v.checked_mul(mul))
                .ok_or_else(|| format!("bad size {s:?}"))
        }
        let p = if let Some(rest) = s.strip_prefix("cdc:") {
            let v: Vec<&str> = rest.split(',').collect();
            if v.len() != 3 {
                return Err("expected cdc:MIN,AVG,MAX".into());
            }
            Self::Cdc {
                min: num(v[0])?,
                avg: num(v[1])?,
                max: num(v[2])?,
            }
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            Self::Fixed { size: num(rest)? }
        } else {
            return Err("expected cdc:MIN,AVG,MAX or fixed:SIZE".into());
        };
        p.validate()?;
        Ok(p)
    }
}

/// Size of the zero blocks that act as hard boundaries.
pub const ZERO_BLOCK: usize = 4096;

/// A configured chunker.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    masks: (u64, u64),
    /// Zero segments end at multiples of this (largest power of two <= max, >= ZERO_BLOCK).
    zero_run: usize,
}

impl Chunker {
    /// Panics if `params` are invalid; call [`ChunkerParams::validate`] on untrusted input.
    pub fn new(params: ChunkerParams) -> Self {
        params.validate().expect("valid chunker parameters");
        let masks = match params {
            ChunkerParams::Cdc { avg, .. } => {
                v2020::select_masks(avg as usize, Normalization::Level1)
            }
            ChunkerParams::Fixed { .. } => (0, 0),
        };
        let max = params.max_len().max(ZERO_BLOCK);
        let zero_run = 1usize << (usize::BITS - 1 - max.leading_zeros());
        Self {
            params,
            masks,
            zero_run,
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Bytes the window must hold for [`cut`](Self::cut) to be exact (unless at the end).
    pub fn window(&self) -> usize {
        self.params.max_len()
    }

    /// Length of the next segment of `data`, which starts right after the previous cut, at
    /// absolute image offset `at`.
    ///
    /// `data` must hold at least [`window`](Self::window) bytes unless it ends at the end of the
    /// stream. Returns a value in `1..=data.len()` for non-empty `data`; the result depends
    /// only on `at` and the first `window` bytes of `data`.
    pub fn cut(&self, data: &[u8], at: u64) -> usize {
        if data.is_empty() {
            return 0;
        }
        match self.params {
            ChunkerParams::Fixed { size } => data.len().min(size as usize),
            ChunkerParams::Cdc { min, avg, max } => {
                let zb = ZERO_BLOCK as u64;
                let scan_end = data.len().min(max as usize);
                if at.is_multiple_of(zb) && scan_end >= ZERO_BLOCK && is_zero(&data[..ZERO_BLOCK]) {
                    // A run of aligned zero blocks, up to the next multiple of the run size.
                    let run = self.zero_run as u64;
                    let stop =
                        usize::try_from(run - at % run).map_or(scan_end, |n| n.min(scan_end));
                    let mut n = ZERO_BLOCK;
                    while n + ZERO_BLOCK <= stop && is_zero(&data[n..n + ZERO_BLOCK]) {
                        n += ZERO_BLOCK;
                    }
                    return n;
                }
                // Content-defined, but never past the next aligned zero block.
                let mut limit = scan_end;
                #[allow(clippy::cast_possible_truncation)] // below ZERO_BLOCK
                let mut b = ((zb - at % zb) % zb) as usize;
                while b + ZERO_BLOCK <= scan_end {
                    if is_zero(&data[b..b + ZERO_BLOCK]) {
                        limit = b;
                        break;
                    }
                    b += ZERO_BLOCK;
                }
                let data = &data[..limit];
                let (ms, ml) = self.masks;
                let (_, n) = v2020::cut(
                    data,
                    min as usize,
                    avg as usize,
                    max as usize,
                    ms,
                    ml,
                    ms << 1,
                    ml << 1,
                );
                n.clamp(1, data.len())
            }
        }
    }

    /// [`cut`](Self::cut) on a prefix of the stream, which may be shorter than the window:
    /// `Some(n)` when `n` is certainly the cut the whole stream gives, `None` when `data` is
    /// too short to tell (read more and ask again). `at_end` says `data` ends the stream.
    ///
    /// Why this is exact: both modes cut at the first qualifying position scanning left to
    /// right, and the only look-ahead is the aligned zero block that may stop a segment. A
    /// cut `n` with a whole zero block's room after it in `data` saw every zero block that
    /// could start before `n`; a shorter answer may be the end of `data` rather than a cut.
    pub fn cut_prefix(&self, data: &[u8], at: u64, at_end: bool) -> Option<usize> {
        let n = self.cut(data, at);
        (at_end || data.len() >= self.window() || n + ZERO_BLOCK <= data.len()).then_some(n)
    }

    /// All cut lengths of a complete buffer (the whole stream, starting at offset 0).
    pub fn cuts(&self, mut data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0u64;
        while !data.is_empty() {
            let n = self.cut(data, at);
            out.push(n);
            data = &data[n..];
            at += n as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn cdc_respects_bounds_and_covers_input() {
        let c = Chunker::new(ChunkerParams::Cdc {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        });
        let data = random(2 << 20, 1);
        let cuts = c.cuts(&data);
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
        for &n in &cuts[..cuts.len() - 1] {
            assert!((4096..=65536).contains(&n), "{n}");
        }
        let avg = data.len() / cuts.len();
        assert!((8 << 10..32 << 10).contains(&avg), "avg {avg}");
    }

    #[test]
    fn cdc_resynchronises_after_an_edit() {
        let c = Chunker::new(ChunkerParams::Cdc {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        });
        let a = random(1 << 20, 2);
        let mut b = a.clone();
        b.splice(300_000..300_000, [7u8; 100]);
        let ends = |d: &[u8]| {
            let mut pos = 0;
            c.cuts(d)
                .into_iter()
                .map(|n| {
                    pos += n;
                    pos
                })
                .collect::<Vec<_>>()
        };
        let ea = ends(&a);
        let eb: Vec<usize> = ends(&b)
            .into_iter()
            .map(|e| e.saturating_sub(100))
            .collect();
        let late: Vec<_> = ea.iter().filter(|&&e| e > 500_000).collect();
        assert!(
            late.iter().all(|e| eb.contains(e)),
            "cut points after the edit realign"
        );
    }

    #[test]
    fn restart_at_a_cut_reproduces_cuts() {
        let c = Chunker::new(ChunkerParams::default());
        let a = random(1 << 20, 3);
        let cuts = c.cuts(&a);
        let start: usize = cuts[..10].iter().sum();
        let mut again = Vec::new();
        let mut pos = start;
        while pos < a.len() {
            let n = c.cut(&a[pos..], pos as u64);
            again.push(n);
            pos += n;
        }
        assert_eq!(again, cuts[10..].to_vec());
    }

    #[test]
    fn cut_prefix_is_exact_or_asks_for_more() {
        // Random data with aligned zero blocks and zero runs, so every branch is taken.
        let mut a = random(1 << 20, 9);
        for (i, b) in [3usize, 40, 41, 42, 43, 100, 180].into_iter().enumerate() {
            let n = if i % 2 == 0 { 1 } else { 9 };
            a[b * ZERO_BLOCK..(b + n) * ZERO_BLOCK].fill(0);
        }
        for params in [
            ChunkerParams::default(),
            ChunkerParams::Fixed { size: 4096 },
            ChunkerParams::Cdc {
                min: 4 << 10,
                avg: 16 << 10,
                max: 64 << 10,
            },
        ] {
            let c = Chunker::new(params);
            let mut pos = 0usize;
            let mut exact = 0;
            while pos < a.len() {
                let whole = c.cut(&a[pos..], pos as u64);
                for len in (1..=c.window() + ZERO_BLOCK + 10).step_by(509) {
                    let end = (pos + len).min(a.len());
                    if let Some(n) = c.cut_prefix(&a[pos..end], pos as u64, end == a.len()) {
                        assert_eq!(n, whole, "{params:?} at {pos} with {len} bytes");
                        exact += 1;
                    }
                }
                pos += whole;
            }
            assert!(exact > 0);
        }
    }

    #[test]
    fn aligned_zero_blocks_are_hard_boundaries() {
        let c = Chunker::new(ChunkerParams::default());
        let mut a = random(1 << 20, 4);
        a[200 * 1024..520 * 1024].fill(0); // 320 KiB of zeros, 4 KiB aligned
        let mut pos = 0usize;
        let mut ends = Vec::new();
        for n in c.cuts(&a) {
            let seg = &a[pos..pos + n];
            if pos >= 200 * 1024 && pos + n <= 520 * 1024 {
                assert!(is_zero(seg));
                assert!(n <= 65536);
            } else {
                assert!(
                    !seg.chunks_exact(4096)
                        .enumerate()
                        .any(|(i, b)| (pos + i * 4096).is_multiple_of(4096) && is_zero(b))
                        || is_zero(seg)
                );
            }
            pos += n;
            ends.push(pos);
        }
        assert!(ends.contains(&(200 * 1024)) && ends.contains(&(520 * 1024)));
        // A change just before the zeros does not disturb cuts inside or after them.
        let mut b = a.clone();
        b[150_000] ^= 1;
        let mut pos = 0;
        let eb: Vec<usize> = c
            .cuts(&b)
            .into_iter()
            .map(|n| {
                pos += n;
                pos
            })
            .collect();
        assert!(
            ends.iter()
                .filter(|&&e| e >= 200 * 1024)
                .all(|e| eb.contains(e))
        );
    }

    #[test]
    fn parse_params() {
        assert_eq!(
            ChunkerParams::parse("cdc:2k,8k,32k").unwrap(),
            ChunkerParams::Cdc {
                min: 2048,
                avg: 8192,
                max: 32768
            }
        );
        assert_eq!(
            ChunkerParams::parse("fixed:4096").unwrap(),
            ChunkerParams::Fixed { size: 4096 }
        );
        assert!(ChunkerParams::parse("cdc:8k,4k,32k").is_err());
        assert!(ChunkerParams::parse("fixed:1").is_err());
    }
}
