//! Partition-table scan and file-system walk (ext2/3/4 with journal replay, FAT, NTFS, btrfs) over
//! arbitrary bytes as a disk image: never panic, hang or allocate without bound.
#![no_main]

use std::ops::ControlFlow;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let image = data.to_vec();
    let limits = cairn_fs::Limits {
        max_entries: 2_000,
        max_depth: 32,
        max_path_len: 1024,
        max_dir_bytes: 1 << 20,
        max_extents_per_file: 1_000,
        max_journal_transactions: 100,
        max_journal_blocks: 10_000,
        max_alloc: 4 << 20,
        max_partitions: 16,
        ..cairn_fs::Limits::default()
    };
    let Ok(layout) = cairn_fs::scan_with(&image, &limits) else {
        return;
    };
    for p in &layout.partitions {
        // Also try each file system at each partition, whatever the probe said.
        for fs in [
            p.fs,
            cairn_fs::FsKind::Ext4,
            cairn_fs::FsKind::Fat16,
            cairn_fs::FsKind::Ntfs,
            cairn_fs::FsKind::Btrfs,
        ] {
            let part = cairn_fs::Partition { fs, ..p.clone() };
            let _ = cairn_fs::walk(&image, &part, &limits, |e| {
                let _ = cairn_fs::read_file(&image, &e, &limits);
                ControlFlow::Continue(())
            });
        }
    }
});
