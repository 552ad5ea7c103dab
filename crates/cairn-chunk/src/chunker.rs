//! Segmentation of a byte stream into segments.
//!
//! Two modes share one recipe format:
//! - **CDC**: FastCDC (the 2020 variant, normalisation level 1) with min/avg/max bounds. Cut
//!   points depend only on the bytes since the previous cut, so chunking restarted at any
//!   earlier cut point reproduces the same cuts — the property incremental re-chunking needs.
//! - **Fixed**: every segment is `size` bytes (the last one may be shorter).
//!
//! The chunker is a pure function over a window: [`Chunker::cut`] is given the bytes after the
//! previous cut and says where the next segment ends.

use fastcdc::v2020::{self, Normalization};

/// How to cut segments. Part of a snapshot's metadata: an incremental backup re-chunks with
/// its parent's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ChunkerParams {
    Cdc { min: u32, avg: u32, max: u32 },
    Fixed { size: u32 },
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::Cdc {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
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
                if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
                    || !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
                    || !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
                    || !(min < avg && avg < max)
                    || min % 2 != 0
                    || avg % 2 != 0
                    || max % 2 != 0
                {
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

/// A configured chunker.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    masks: (u64, u64),
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
        Self { params, masks }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Bytes the window must hold for [`cut`](Self::cut) to be exact (unless at the end).
    pub fn window(&self) -> usize {
        self.params.max_len()
    }

    /// Length of the next segment of `data`, which starts right after the previous cut.
    ///
    /// `data` must hold at least [`window`](Self::window) bytes unless it ends at the end of the
    /// stream. Returns a value in `1..=data.len()` for non-empty `data`.
    pub fn cut(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        match self.params {
            ChunkerParams::Fixed { size } => data.len().min(size as usize),
            ChunkerParams::Cdc { min, avg, max } => {
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

    /// All cut lengths of a complete buffer (the whole stream).
    pub fn cuts(&self, mut data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = self.cut(data);
            out.push(n);
            data = &data[n..];
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
        let c = Chunker::new(ChunkerParams::default());
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
        let c = Chunker::new(ChunkerParams::default());
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
        assert_eq!(c.cuts(&a[start..]), cuts[10..].to_vec());
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
