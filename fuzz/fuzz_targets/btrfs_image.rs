//! btrfs walk and file reads over real images with fuzzed damage: never panic, hang or
//! allocate without bound.
//!
//! Raw bytes would never get past the superblock and node checksums, so the target first
//! builds three small templates with `mkfs.btrfs --rootdir` (zstd and lzo with 4 KiB nodes,
//! zlib with 16 KiB nodes; one subvolume each) and keeps their non-zero 4 KiB pages. An input is a template choice and
//! a list of patches `[page u16][offset u16][len u8][bytes]` applied to those pages; every
//! patched tree node and the superblock get a fresh crc32c, so the damage reaches the tree
//! parsers, the chunk map, the extent code and the decompressors.
#![no_main]

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::sync::OnceLock;

use cairn_fs::ReadAt;

const PAGE: u64 = 4096;
const SUPER: u64 = 64 << 10;

struct Template {
    size: u64,
    nodesize: u64,
    /// Non-zero pages by page number.
    pages: HashMap<u64, Vec<u8>>,
    /// Page numbers, sorted, for patch selection.
    order: Vec<u64>,
    /// Page numbers where a valid tree node starts.
    nodes: std::collections::HashSet<u64>,
}

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn template((compress, nodesize): (&str, &str)) -> Template {
    let dir = std::env::temp_dir().join(format!("cairn-fuzz-btrfs-{}-{compress}", std::process::id()));
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(src.join("dir/sub")).unwrap();
    std::fs::create_dir_all(src.join("vol")).unwrap();
    std::fs::write(src.join("tiny"), b"tiny").unwrap();
    let text: Vec<u8> = (0..6000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    std::fs::write(src.join("dir/text"), &text).unwrap();
    let noise: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(src.join("dir/noise"), &noise).unwrap();
    std::fs::write(src.join("vol/in-subvolume"), b"inside").unwrap();
    for i in 0..80 {
        std::fs::write(src.join(format!("dir/sub/f{i}")), format!("{i}")).unwrap();
    }
    std::os::unix::fs::symlink("dir/text", src.join("link")).unwrap();
    std::fs::hard_link(src.join("tiny"), src.join("dir/hard")).unwrap();
    let img = dir.join("img");
    std::fs::File::create(&img).unwrap();
    let mut args = vec!["-f", "-q", "--shrink", "-n", nodesize, "--subvol", "rw:vol", "--rootdir"];
    let s = src.to_str().unwrap().to_string();
    args.push(&s);
    if compress != "no" {
        args.extend(["--compress", compress]);
    }
    let i = img.to_str().unwrap().to_string();
    args.push(&i);
    let st = std::process::Command::new("mkfs.btrfs").args(&args).status();
    assert!(st.is_ok_and(|s| s.success()), "mkfs.btrfs {args:?} failed");
    let data = std::fs::read(&img).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let sb = &data[SUPER as usize..SUPER as usize + 4096];
    let nodesize = u64::from(u32::from_le_bytes(sb[0x94..0x98].try_into().unwrap()));
    let fsid = &sb[0x20..0x30];
    let mut pages = HashMap::new();
    let mut nodes = std::collections::HashSet::new();
    for (n, p) in data.chunks(PAGE as usize).enumerate() {
        if p.iter().any(|&b| b != 0) {
            pages.insert(n as u64, p.to_vec());
        }
    }
    for (n, b) in data.chunks_exact(nodesize as usize).enumerate() {
        if &b[0x20..0x30] == fsid && u32::from_le_bytes(b[..4].try_into().unwrap()) == crc32c(&b[32..]) {
            nodes.insert(n as u64 * nodesize / PAGE);
        }
    }
    let mut order: Vec<u64> = pages.keys().copied().collect();
    order.sort_unstable();
    Template {
        size: data.len() as u64,
        nodesize,
        pages,
        order,
        nodes,
    }
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    // Small nodes make deeper trees out of few files (and faster runs).
    T.get_or_init(|| {
        [("zstd", "4096"), ("lzo", "4096"), ("zlib", "16384")]
            .into_iter()
            .map(template)
            .collect()
    })
}

/// A template with patched pages laid over it.
struct Image<'a> {
    t: &'a Template,
    patched: HashMap<u64, Vec<u8>>,
}

impl Image<'_> {
    fn page(&self, n: u64) -> Option<&[u8]> {
        self.patched.get(&n).or_else(|| self.t.pages.get(&n)).map(Vec::as_slice)
    }

    fn page_mut(&mut self, n: u64) -> &mut Vec<u8> {
        let t = self.t;
        self.patched
            .entry(n)
            .or_insert_with(|| t.pages.get(&n).cloned().unwrap_or_else(|| vec![0; PAGE as usize]))
    }

    /// Recomputes the crc32c of the block of `len` bytes starting at page `first`.
    fn reseal(&mut self, first: u64, len: u64) {
        let mut block = Vec::with_capacity(len as usize);
        for n in first..first + len / PAGE {
            block.extend_from_slice(self.page(n).unwrap_or(&[0; PAGE as usize]));
        }
        let c = crc32c(&block[32..]);
        let p = self.page_mut(first);
        p[..32].fill(0);
        p[..4].copy_from_slice(&c.to_le_bytes());
    }
}

impl ReadAt for Image<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.t.size {
            return Ok(0);
        }
        let n = buf.len().min((self.t.size - offset) as usize);
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let k = (PAGE as usize - within).min(n - done);
            match self.page(page) {
                Some(p) => buf[done..done + k].copy_from_slice(&p[within..within + k]),
                None => buf[done..done + k].fill(0),
            }
            done += k;
        }
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.t.size)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ts = templates();
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let t = &ts[usize::from(which) % ts.len()];
    let mut img = Image {
        t,
        patched: HashMap::new(),
    };
    let mut touched = Vec::new();
    while rest.len() >= 5 {
        let sel = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let off = usize::from(u16::from_le_bytes([rest[2], rest[3]])) % PAGE as usize;
        let len = usize::from(rest[4] % 16);
        rest = &rest[5..];
        let bytes = &rest[..len.min(rest.len())];
        rest = &rest[bytes.len()..];
        let page = t.order[sel % t.order.len()];
        let p = img.page_mut(page);
        let end = (off + bytes.len()).min(PAGE as usize);
        p[off..end].copy_from_slice(&bytes[..end - off]);
        touched.push(page);
    }
    // Reseal the superblock and every node a patch touched.
    let per_node = t.nodesize / PAGE;
    for page in touched {
        if page == SUPER / PAGE {
            img.reseal(page, PAGE);
        }
        let first = page - page % per_node;
        if t.nodes.contains(&first) {
            img.reseal(first, t.nodesize);
        }
    }
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
        length: t.size,
        logical: false,
        bootable: false,
        fs: cairn_fs::FsKind::Btrfs,
        note: None,
    };
    let _ = cairn_fs::walk(&img, &part, &limits, |e| {
        let _ = cairn_fs::read_file(&img, &e, &limits);
        ControlFlow::Continue(())
    });
    let _ = cairn_fs::lookup(&img, &part, &limits, "/vol/in-subvolume");
});
