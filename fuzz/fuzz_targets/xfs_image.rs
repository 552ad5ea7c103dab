//! The XFS reader over hostile bytes: never panic, hang or allocate without bound.
//!
//! XFS puts its inodes megabytes into a volume, too far for raw fuzz inputs, so the input is
//! a sparse image: records of `offset: u32 BE, len: u16 BE, bytes[len]` laid over a zeroed
//! 16 MiB volume (later records win). Seeds are small mkfs.xfs images in this form: every
//! non-zero 512-byte sector of the image as one record (see `docs/FILESYSTEMS.md`).
#![no_main]

use std::io;
use std::ops::ControlFlow;

use cairn_types::ReadAt;

const SIZE: u64 = 16 << 20;

/// Records laid over zeros, in input order (later ones win where they overlap).
struct Sparse(Vec<(u64, Vec<u8>)>);

impl ReadAt for Sparse {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= SIZE {
            return Ok(0);
        }
        let n = buf.len().min((SIZE - offset) as usize);
        let buf = &mut buf[..n];
        buf.fill(0);
        let end = offset + n as u64;
        for (at, piece) in &self.0 {
            let p_end = at + piece.len() as u64;
            if p_end <= offset || *at >= end {
                continue;
            }
            let from = (*at).max(offset);
            let to = p_end.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&piece[(from - at) as usize..(to - at) as usize]);
        }
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(SIZE)
    }
}

fn parse(mut data: &[u8]) -> Sparse {
    let mut v = Vec::new();
    while data.len() >= 6 {
        let at = u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]])) % SIZE;
        let len = usize::from(u16::from_be_bytes([data[4], data[5]]));
        let body = &data[6..];
        let take = len.min(body.len()).min((SIZE - at) as usize);
        v.push((at, body[..take].to_vec()));
        data = &body[take..];
    }
    Sparse(v)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let image = parse(data);
    let limits = cairn_fs::Limits {
        max_entries: 2_000,
        max_depth: 32,
        max_path_len: 1024,
        max_dir_bytes: 1 << 20,
        max_extents_per_file: 1_000,
        max_alloc: 4 << 20,
        max_partitions: 16,
        ..cairn_fs::Limits::default()
    };
    let part = cairn_fs::Partition {
        index: 0,
        part_type: cairn_fs::PartitionType::WholeDisk,
        guid: None,
        name: String::new(),
        offset: 0,
        length: SIZE,
        logical: false,
        bootable: false,
        fs: cairn_fs::FsKind::Xfs,
        note: None,
    };
    let _ = cairn_fs::walk(&image, &part, &limits, |e| {
        let _ = cairn_fs::read_file(&image, &e, &limits);
        ControlFlow::Continue(())
    });
});
