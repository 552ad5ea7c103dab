//! Builds a file index of 100 backups of one VM (~14,000 files each, 1% churn per backup) in
//! a temporary directory and times add, find, versions and list.
//!
//!     cargo run --release -p cairn-fileindex --example index_bench [backups] [files]

use std::time::{Duration, Instant};

use cairn_fileindex::{
    BackupMeta, FileExtent, FileIndex, FileKind, FileRecord, FindOptions, Pattern,
};

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PKGS: &[&str] = &[
    "systemd",
    "nginx",
    "openssl",
    "python3",
    "perl",
    "gcc",
    "glibc",
    "coreutils",
    "bash",
    "ssh",
    "curl",
    "git",
    "vim",
    "postgresql",
    "dbus",
    "udev",
    "kmod",
    "apt",
    "dpkg",
    "zlib",
    "xz",
    "libffi",
    "ncurses",
    "readline",
    "sqlite3",
    "pam",
    "sudo",
    "cron",
    "rsyslog",
    "grub",
];
const EXTS: &[&str] = &[
    "so", "py", "pm", "h", "conf", "txt", "gz", "json", "service", "mo",
];

fn file(rng: &mut Rng, path: String, inode: u64) -> FileRecord {
    let size = rng.below(200_000);
    let disk = rng.below(1 << 34) * 4096;
    FileRecord {
        path,
        kind: FileKind::File,
        size,
        mode: Some(0o100644),
        uid: Some(0),
        gid: Some(0),
        mtime_ns: Some(1_700_000_000_000_000_000 + rng.below(1 << 50) as i64),
        ctime_ns: Some(1_700_000_000_000_000_000 + rng.below(1 << 50) as i64),
        nlink: Some(1),
        inode: Some(inode),
        extents: vec![FileExtent {
            file_offset: 0,
            disk_offset: disk,
            length: size.div_ceil(4096) * 4096,
        }],
        ..FileRecord::default()
    }
}

/// A Linux-like tree of about `n` files plus their directories.
fn tree(rng: &mut Rng, n: usize) -> Vec<FileRecord> {
    let mut out = Vec::new();
    let mut inode = 100;
    let mut dirs = std::collections::BTreeSet::new();
    let mut i = 0;
    while out.len() < n {
        let pkg = PKGS[i % PKGS.len()];
        let ext = EXTS[rng.below(EXTS.len() as u64) as usize];
        let path = match rng.below(10) {
            0..=3 => format!("/usr/lib/{pkg}/mod{}/{pkg}_{i}.{ext}", i % 17),
            4..=5 => format!("/usr/share/doc/{pkg}/{}/README_{i}.{ext}", i % 5),
            6 => format!("/etc/{pkg}/conf.d/{pkg}-{i}.conf"),
            7 => format!(
                "/home/user{}/projects/p{}/src/file_{i}.{ext}",
                i % 4,
                i % 23
            ),
            8 => format!("/var/lib/{pkg}/data_{i}.{ext}"),
            _ => format!("/usr/bin/{pkg}-tool-{i}"),
        };
        let mut p = path.as_str();
        while let Some(cut) = p.rfind('/') {
            p = &p[..cut];
            if p.is_empty() || !dirs.insert(p.to_string()) {
                break;
            }
        }
        inode += 1;
        out.push(file(rng, path, inode));
        i += 1;
    }
    out.push(file(rng, "/etc/passwd".into(), 1));
    out.push(file(rng, "/etc/security/passwords.conf".into(), 2));
    for (k, d) in dirs.into_iter().enumerate() {
        out.push(FileRecord {
            mode: Some(0o40755),
            inode: Some(10_000_000 + k as u64),
            ..FileRecord::dir(d)
        });
    }
    out
}

/// 1% of files modified, plus a few created and deleted.
fn churn(rng: &mut Rng, files: &mut Vec<FileRecord>, round: usize) {
    let n = files.len() as u64;
    for _ in 0..n / 100 {
        let k = rng.below(n) as usize;
        if files[k].kind == FileKind::File {
            files[k].size = rng.below(200_000);
            files[k].mtime_ns = Some(1_800_000_000_000_000_000 + round as i64);
        }
    }
    for j in 0..n / 1000 {
        let k = rng.below(files.len() as u64) as usize;
        if files[k].kind == FileKind::File && !files[k].path.starts_with("/etc/") {
            files.swap_remove(k);
        }
        let path = format!("/var/log/app/{round}/log_{j}.txt");
        files.push(file(rng, path, 50_000_000 + (round * 1000) as u64 + j));
    }
    if !files.iter().any(|f| f.path == "/var/log/app") {
        files.push(FileRecord::dir("/var/log/app"));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let backups = args.first().copied().unwrap_or(100);
    let files = args.get(1).copied().unwrap_or(14_000);
    // INDEX_BENCH_DIR keeps the index (e.g. to seed the fuzzer's corpus).
    let tmp = tempfile::tempdir()?;
    let dir =
        std::env::var_os("INDEX_BENCH_DIR").map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let index = FileIndex::open(&dir)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut listing = tree(&mut rng, files);
    println!(
        "{backups} backups of one VM, {} entries per backup, 1% churn",
        listing.len()
    );

    let mut adds = Vec::new();
    let mut first_bytes = 0;
    let mut change_bytes = 0;
    let mut parent = None;
    for b in 0..backups {
        if b > 0 {
            churn(&mut rng, &mut listing, b);
        }
        let id = format!("backup-{b:04}");
        let meta = BackupMeta {
            backup_id: id.clone(),
            vm: "web01".into(),
            created_ms: 1_700_000_000_000 + b as i64 * 86_400_000,
            parent: parent.clone(),
        };
        let t = Instant::now();
        let r = index.add_backup(
            &meta,
            [("vda".to_string(), "p1".to_string(), listing.iter().cloned())],
        )?;
        adds.push(t.elapsed());
        if b == 0 {
            first_bytes = index.stats()?.bytes;
            println!(
                "first add: {:.1} ms, {} files, {} bytes",
                ms(adds[0]),
                r.files,
                r.bytes_written
            );
        } else {
            change_bytes += r.record_bytes + r.path_bytes;
        }
        if b == 1 {
            println!(
                "second add: {} new records, {} shared, {} bytes written",
                r.records_new, r.records_shared, r.bytes_written
            );
        }
        parent = Some(id);
    }
    let later: Vec<Duration> = adds[1..].to_vec();
    println!(
        "add_backup: first {:.1} ms, later median {:.1} ms, max {:.1} ms",
        ms(adds[0]),
        ms(median(later.clone())),
        ms(*later.iter().max().unwrap_or(&adds[0]))
    );

    let st = index.stats()?;
    println!(
        "index: {} bytes on disk, {} backups, {} listing entries, {} distinct paths, {} distinct records",
        st.bytes, st.backups, st.files, st.paths, st.records
    );
    println!(
        "bytes per stored listing entry: {:.2}",
        st.bytes as f64 / st.files as f64
    );
    println!(
        "storage: first backup alone {first_bytes} bytes; later backups' new records and paths {change_bytes} bytes"
    );
    println!(
        "storage ratio: all / (first backup + changes) = {:.2}; all / first backup = {:.2}",
        st.bytes as f64 / (first_bytes + change_bytes) as f64,
        st.bytes as f64 / first_bytes as f64
    );

    // Fresh handle: the first query reads listings from disk (page cache warm).
    drop(index);
    let index = FileIndex::open(&dir)?;
    let opts = FindOptions {
        vm: Some("web01".into()),
        limit: 0,
    };
    for (label, pat) in [
        ("substring 'nginx'", Pattern::new("nginx")?),
        ("substring 'passwd'", Pattern::new("passwd")?),
        ("glob '*.conf'", Pattern::new("*.conf")?),
        ("glob '/etc/**/pass*'", Pattern::new("/etc/**/pass*")?),
        (
            "glob '*.CONF' (ignore case)",
            Pattern::new("*.CONF")?.case_insensitive(),
        ),
    ] {
        let t = Instant::now();
        let hits = index.find(&pat, &opts)?;
        let cold = t.elapsed();
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let n = index.find(&pat, &opts)?.len();
            times.push(t.elapsed());
            assert_eq!(n, hits.len());
        }
        println!(
            "find {label:30} {:>7} hits: first {:7.1} ms, median of 10 {:7.1} ms",
            hits.len(),
            ms(cold),
            ms(median(times))
        );
        let limited = FindOptions {
            limit: 100,
            ..opts.clone()
        };
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            index.find(&pat, &limited)?;
            times.push(t.elapsed());
        }
        println!(
            "find {label:30}  limit 100: median of 10 {:7.2} ms",
            ms(median(times))
        );
    }
    let mut times = Vec::new();
    let mut n = 0;
    for _ in 0..10 {
        let t = Instant::now();
        n = index.versions("web01", "vda", "p1", "/etc/passwd")?.len();
        times.push(t.elapsed());
    }
    println!(
        "versions /etc/passwd: {n} versions, median {:.2} ms",
        ms(median(times))
    );
    let last = format!("backup-{:04}", backups - 1);
    for dir in ["/", "/usr/lib/nginx", "/etc"] {
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            n = index.list(&last, "vda", "p1", dir)?.len();
            times.push(t.elapsed());
        }
        println!(
            "list {dir}: {n} entries, median {:.2} ms",
            ms(median(times))
        );
    }
    let t = Instant::now();
    let walked = index.walk(&last, "vda", "p1", "/")?.count();
    println!("walk /: {walked} records in {:.1} ms", ms(t.elapsed()));
    Ok(())
}
