//! Walks every file system of a disk image and prints the entry count and elapsed time.
//!
//! ```text
//! cargo run --release -p cairn-fs --example walk -- IMAGE [--json]
//! ```
//! With `--json`, each entry is printed as one JSON line (to stdout) before the summary (to
//! stderr). This is the catalog benchmark: see `docs/FILESYSTEMS.md`.

use std::ops::ControlFlow;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: walk IMAGE [--json]");
        std::process::exit(2);
    };
    let file = std::fs::File::open(path)?;
    let start = Instant::now();
    let layout = cairn_fs::scan(&file)?;
    let limits = cairn_fs::Limits::default();
    let mut total = 0u64;
    for p in &layout.partitions {
        if p.fs == cairn_fs::FsKind::Unknown {
            continue;
        }
        let mut out = std::io::stdout().lock();
        let report = cairn_fs::walk(&file, p, &limits, |e| {
            if json {
                use std::io::Write;
                let _ = serde_json::to_writer(&mut out, &e);
                let _ = out.write_all(b"\n");
            }
            ControlFlow::Continue(())
        })?;
        total += report.entries;
        eprintln!(
            "partition {} {:?} at {}: {} entries, complete {}, journal {} tx / {} blocks",
            p.index,
            p.fs,
            p.offset,
            report.entries,
            report.is_complete(),
            report.journal_transactions,
            report.journal_blocks
        );
        if let Some(log) = &report.xfs_log {
            eprintln!("  {}", log.note());
        }
        for e in report.errors.iter().take(20) {
            eprintln!("  error at {:?}: {}", e.path, e.error);
        }
    }
    eprintln!(
        "{total} entries in {:.3} s ({:?} table)",
        start.elapsed().as_secs_f64(),
        layout.table
    );
    Ok(())
}
