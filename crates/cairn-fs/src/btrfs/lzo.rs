//! LZO1X decompression and btrfs's LZO framing, bounded and safe.
//!
//! btrfs framing of one compressed extent:
//!
//! ```text
//! total: u32 LE (bytes of the whole framed stream, this field included)
//! { seg_len: u32 LE, seg_len bytes of LZO1X data }*
//! ```
//!
//! A segment decompresses independently (its matches never reach into an earlier segment)
//! to at most one sector. A `seg_len` field never straddles a sector boundary: when fewer
//! than 4 bytes remain in the sector, the writer skips (zero-pads) to the next one.
//!
//! LZO1X instructions (the state is the number of literals the previous instruction copied;
//! 4 stands for "4 or more"):
//!
//! | first byte | meaning |
//! |---|---|
//! | `0000LLLL`, state 0 | literal run of 3 + L bytes (L = 0: 18 + extension) |
//! | `0000DDSS`, state 1..3 | 2-byte match, distance 1 + D + 4·H (H: next byte) |
//! | `0000DDSS`, state 4 | 3-byte match, distance 2049 + D + 4·H |
//! | `0001HLLL` | match of 2 + L (L = 0: 9 + ext), distance 16384 + 16384·H + LE16 >> 2; distance 16384 ends the stream |
//! | `001LLLLL` | match of 2 + L (L = 0: 33 + ext), distance 1 + LE16 >> 2 |
//! | `01LDDDSS` | match of 3 + L, distance 1 + D + 8·H |
//! | `1LLDDDSS` | match of 5 + L, distance 1 + D + 8·H |
//!
//! A match is followed by `S` (the low two bits of the byte before its last one) literal
//! bytes copied straight from the input. A length extension is a run of zero bytes (255
//! each) ended by a non-zero byte (its value). A first byte above 17 is a literal run of
//! `byte - 17` bytes.

use crate::util::le32;
use crate::{Error, Result};

fn bad(what: &str) -> Error {
    Error::corrupt(format!("btrfs lzo data: {what}"))
}

struct Input<'a> {
    b: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Result<u8> {
        let v = *self.b.get(self.at).ok_or_else(|| bad("truncated"))?;
        self.at += 1;
        Ok(v)
    }

    fn le16(&mut self) -> Result<usize> {
        let lo = self.byte()?;
        let hi = self.byte()?;
        Ok(usize::from(u16::from_le_bytes([lo, hi])))
    }

    /// A length extension: zero bytes count 255 each, the closing byte its value.
    fn extension(&mut self) -> Result<usize> {
        let mut n = 0usize;
        loop {
            match self.byte()? {
                0 => n += 255,
                v => return Ok(n + usize::from(v)),
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let s = self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
            .ok_or_else(|| bad("truncated literal"))?;
        self.at += n;
        Ok(s)
    }
}

/// Appends the LZO1X decompression of `input` to `out`, never letting `out` grow past `max`.
pub(crate) fn lzo1x(input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<()> {
    let base = out.len();
    let mut inp = Input { b: input, at: 0 };
    let literals = |inp: &mut Input, out: &mut Vec<u8>, n: usize| -> Result<()> {
        if out.len() + n > max {
            return Err(bad("inflates past its stated size"));
        }
        out.extend_from_slice(inp.take(n)?);
        Ok(())
    };
    let mut state = 0usize;
    if let Some(&first) = input.first()
        && first > 17
    {
        inp.at = 1;
        let n = usize::from(first - 17);
        literals(&mut inp, out, n)?;
        state = n.min(4);
    }
    loop {
        let op = inp.byte()?;
        let (len, dist, s);
        match op {
            0..=15 if state == 0 => {
                let l = match usize::from(op) {
                    0 => 15 + inp.extension()?,
                    l => l,
                };
                literals(&mut inp, out, l + 3)?;
                state = 4;
                continue;
            }
            0..=15 => {
                let h = usize::from(inp.byte()?);
                let d = usize::from((op >> 2) & 3);
                (len, s) = (if state < 4 { 2 } else { 3 }, usize::from(op & 3));
                dist = (h << 2) + d + if state < 4 { 1 } else { 2049 };
            }
            16..=31 => {
                len = 2 + match usize::from(op & 7) {
                    0 => 7 + inp.extension()?,
                    l => l,
                };
                let v = inp.le16()?;
                let far = (usize::from(op & 8) << 11) + (v >> 2);
                if far == 0 {
                    return Ok(()); // end of stream
                }
                dist = 16384 + far;
                s = v & 3;
            }
            32..=63 => {
                len = 2 + match usize::from(op & 31) {
                    0 => 31 + inp.extension()?,
                    l => l,
                };
                let v = inp.le16()?;
                dist = 1 + (v >> 2);
                s = v & 3;
            }
            _ => {
                let h = usize::from(inp.byte()?);
                len = if op < 128 {
                    3 + usize::from((op >> 5) & 1)
                } else {
                    5 + usize::from((op >> 5) & 3)
                };
                dist = 1 + usize::from((op >> 2) & 7) + (h << 3);
                s = usize::from(op & 3);
            }
        }
        if dist > out.len() - base {
            return Err(bad("match reaches before the start"));
        }
        if out.len() + len > max {
            return Err(bad("inflates past its stated size"));
        }
        let from = out.len() - dist;
        // Byte by byte: a match may overlap the bytes it produces.
        for i in 0..len {
            let b = out[from + i];
            out.push(b);
        }
        literals(&mut inp, out, s)?;
        state = s;
    }
}

/// Decompresses one btrfs LZO-framed extent into at most `max` bytes.
pub(crate) fn btrfs_lzo(input: &[u8], sector: u32, max: usize) -> Result<Vec<u8>> {
    let sector = sector.max(4) as usize;
    let total = le32(input, 0) as usize;
    if total < 4 || total > input.len() {
        return Err(bad(&format!(
            "framed length {total} of {} bytes",
            input.len()
        )));
    }
    let input = &input[..total];
    let mut out = Vec::new();
    let mut at = 4usize;
    while at < total {
        let left = sector - at % sector;
        if left < 4 {
            at += left;
            if at >= total {
                break;
            }
        }
        let seg = le32(input, at) as usize;
        at += 4;
        let data = at
            .checked_add(seg)
            .and_then(|end| input.get(at..end))
            .filter(|_| seg > 0)
            .ok_or_else(|| bad(&format!("segment of {seg} bytes at {at}")))?;
        lzo1x(data, &mut out, max)?;
        at += seg;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_overlapping_matches() {
        // First byte 17 + 3: three literals "abc"; then 01LDDDSS with L=1 (4 bytes),
        // distance 1 + D + 8H = 3 (D = 2, H = 0): "abca"; then the end marker.
        let data = [20, b'a', b'b', b'c', 0b0110_1000, 0, 0x11, 0, 0];
        let mut out = Vec::new();
        lzo1x(&data, &mut out, 100).unwrap();
        assert_eq!(out, b"abcabca");
        // The same stream bounded at 5 bytes inflates past it.
        assert!(lzo1x(&data, &mut Vec::new(), 5).is_err());
    }

    #[test]
    fn hostile_streams_fail_cleanly() {
        for data in [
            &[][..],
            &[0x40, 0xff][..],                 // match before the start
            &[0x00, 0x00, 0x00][..],           // unterminated extension
            &[20, b'a'][..],                   // truncated literals
            &[18, b'a', 0x20, 0xff, 0xff][..], // far match
        ] {
            assert!(lzo1x(data, &mut Vec::new(), 1 << 16).is_err(), "{data:?}");
        }
    }

    #[test]
    fn framing_skips_sector_tails() {
        // A segment whose length field would straddle the first 16-byte "sector".
        let seg = [20u8, b'x', b'y', b'z', 0x11, 0, 0];
        let mut framed = vec![0u8; 4];
        framed.extend_from_slice(&u32::try_from(seg.len()).unwrap().to_le_bytes());
        framed.extend_from_slice(&seg); // ends at 15: one byte left in the sector
        framed.push(0);
        framed.extend_from_slice(&u32::try_from(seg.len()).unwrap().to_le_bytes());
        framed.extend_from_slice(&seg);
        let total = u32::try_from(framed.len()).unwrap();
        framed[..4].copy_from_slice(&total.to_le_bytes());
        assert_eq!(btrfs_lzo(&framed, 16, 100).unwrap(), b"xyzxyz");
        assert!(btrfs_lzo(&framed, 16, 4).is_err());
        framed[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(btrfs_lzo(&framed, 16, 100).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_overrun(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            max in 0usize..5000,
        ) {
            let mut out = Vec::new();
            let _ = lzo1x(&data, &mut out, max);
            proptest::prop_assert!(out.len() <= max);
            if let Ok(v) = btrfs_lzo(&data, 512, max) {
                proptest::prop_assert!(v.len() <= max);
            }
        }
    }
}
