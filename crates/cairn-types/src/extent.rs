//! Byte extents of a disk image and the `OFFSET LENGTH` text format used by
//! `cairn image backup --changed`.

use std::fmt;

/// A half-open byte range `[offset, offset + len)` of a disk image.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}..{})", self.offset, self.end())
    }
}

/// A line of an extent list could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("extent list line {line}: {reason}")]
pub struct ExtentParseError {
    pub line: usize,
    pub reason: String,
}

/// A sorted list of non-overlapping, non-adjacent extents.
///
/// Invariant: `extents[i].end() < extents[i + 1].offset` and no extent is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtentList {
    extents: Vec<Extent>,
}

impl ExtentList {
    /// Builds a normalised list (sorted, merged, empty ones dropped) from any extents.
    pub fn from_unsorted(mut v: Vec<Extent>) -> Self {
        v.retain(|e| !e.is_empty());
        v.sort_unstable();
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    let end = last.end().max(e.end());
                    last.len = end - last.offset;
                }
                _ => out.push(e),
            }
        }
        Self { extents: out }
    }

    /// Parses `OFFSET LENGTH` lines (decimal bytes; blank lines and `#` comments ignored).
    pub fn parse(text: &str) -> Result<Self, ExtentParseError> {
        Ok(Self::from_unsorted(
            parse_lines(text)?.into_iter().map(|(_, e)| e).collect(),
        ))
    }

    /// [`parse`](Self::parse) for a list that describes an image of `size` bytes: an extent
    /// past the end, or two that overlap, are errors (they mean the list is not the one for
    /// this image).
    pub fn parse_within(text: &str, size: u64) -> Result<Self, ExtentParseError> {
        let mut lines = parse_lines(text)?;
        if let Some((line, e)) = lines.iter().find(|(_, e)| e.end() > size) {
            return Err(ExtentParseError {
                line: *line,
                reason: format!(
                    "extent {}+{} ends past the image's end ({size} bytes)",
                    e.offset, e.len
                ),
            });
        }
        lines.retain(|(_, e)| !e.is_empty());
        lines.sort_unstable_by_key(|(_, e)| *e);
        if let Some(w) = lines.windows(2).find(|w| w[1].1.offset < w[0].1.end()) {
            return Err(ExtentParseError {
                line: w[1].0,
                reason: format!("extent overlaps the one on line {}", w[0].0),
            });
        }
        Ok(Self::from_unsorted(
            lines.into_iter().map(|(_, e)| e).collect(),
        ))
    }

    /// Keeps only the parts below `size`.
    pub fn clamp(&self, size: u64) -> Self {
        let v = self
            .extents
            .iter()
            .filter(|e| e.offset < size)
            .map(|e| Extent::new(e.offset, e.len.min(size - e.offset)))
            .collect();
        Self::from_unsorted(v)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Extent> {
        self.extents.iter()
    }

    pub fn as_slice(&self) -> &[Extent] {
        &self.extents
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Sum of the extents' lengths.
    pub fn total_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// The extents of `OFFSET LENGTH` lines, each with its line number.
fn parse_lines(text: &str) -> Result<Vec<(usize, Extent)>, ExtentParseError> {
    let mut v = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: &str| ExtentParseError {
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut it = line.split_whitespace();
        let off: u64 = it
            .next()
            .ok_or_else(|| err("missing offset"))?
            .parse()
            .map_err(|_| err("offset is not a decimal number"))?;
        let len: u64 = it
            .next()
            .ok_or_else(|| err("missing length"))?
            .parse()
            .map_err(|_| err("length is not a decimal number"))?;
        if it.next().is_some() {
            return Err(err("expected exactly two numbers"));
        }
        if off.checked_add(len).is_none() {
            return Err(err("offset + length overflows"));
        }
        v.push((i + 1, Extent::new(off, len)));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_for_an_image_refuses_extents_past_its_end_and_overlaps() {
        assert!(ExtentList::parse_within("0 4096\n8192 4096\n", 12288).is_ok());
        let e = ExtentList::parse_within("0 4096\n8192 8192\n", 12288).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("past the image's end"), "{e}");
        let e = ExtentList::parse_within("4096 4096\n0 8192\n", 1 << 20).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("overlaps the one on line 2"), "{e}");
    }

    #[test]
    fn parse_merges_and_sorts() {
        let l = ExtentList::parse("100 10\n0 4\n# c\n\n105 20\n4 1\n").unwrap();
        assert_eq!(l.as_slice(), &[Extent::new(0, 5), Extent::new(100, 25)]);
        assert_eq!(l.total_bytes(), 30);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = ExtentList::parse("1 2\nx 3\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(ExtentList::parse("1 2 3").is_err());
        assert!(ExtentList::parse(&format!("{} 2", u64::MAX)).is_err());
    }

    #[test]
    fn clamp_cuts_at_size() {
        let l = ExtentList::parse("0 10\n20 10\n40 1").unwrap().clamp(25);
        assert_eq!(l.as_slice(), &[Extent::new(0, 10), Extent::new(20, 5)]);
    }
}
