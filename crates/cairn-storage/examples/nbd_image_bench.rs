//! Reads whole images through [`NbdImage`] (the agent's blocking NBD path: a private
//! `qemu-nbd`, `cairn-nbd` driven from plain threads) and prints the throughput.
//!
//! ```text
//! cargo run --release -p cairn-storage --example nbd_image_bench -- \
//!     IMAGE [--threads N] [--images K] [--request-size BYTES] [--runtimes R] [--workers W]
//! ```
//!
//! `--images K` opens K exports of IMAGE at once (as `K` disks backed up in parallel), each
//! read by `--threads` threads. The binary's part is played here: it builds `--runtimes`
//! [`NbdRuntime::builder`] runtimes (default K, as the agent builds one per disk read at
//! once) of `--workers` workers (default 1). Use a fully allocated qcow2
//! (`qemu-io -c "write -P 0xab 0 1G"`) so that every request carries data.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cairn_storage::qemu::{NbdImage, NbdOpen, NbdRuntime};

fn usage() -> ! {
    eprintln!(
        "usage: nbd_image_bench IMAGE [--threads N] [--images K] [--request-size BYTES] [--runtimes R] [--workers W]"
    );
    std::process::exit(2)
}

fn main() {
    let mut image = None;
    let (mut threads, mut images, mut req) = (2usize, 1usize, 4u64 << 20);
    let (mut workers, mut runtimes) = (1usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--threads" => threads = num().max(1) as usize,
            "--images" => images = num().max(1) as usize,
            "--request-size" => req = num().max(1),
            "--workers" => workers = num().max(1) as usize,
            "--runtimes" => runtimes = Some(num().max(1) as usize),
            _ if image.is_none() && !a.starts_with("--") => image = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    let image = image.unwrap_or_else(|| usage());
    let format = cairn_storage::qemu::img_info(&image)
        .unwrap_or_else(|e| {
            eprintln!("{}: {e}", image.display());
            std::process::exit(1)
        })
        .format;
    // Built here, as the storage agent's binary builds it: the library builds no runtime.
    let build = |workers| {
        NbdRuntime::builder()
            .worker_threads(workers)
            .build()
            .expect("NBD runtime")
    };
    let runtimes = runtimes.unwrap_or(images);
    let rts: Vec<_> = (0..runtimes).map(|_| build(workers)).collect();
    let nbd =
        NbdRuntime::new(rts.iter().map(|rt| rt.handle().clone())).expect("multi-thread runtime");
    let open = |_| {
        NbdImage::open(&nbd, &image, format, &NbdOpen::default()).unwrap_or_else(|e| {
            eprintln!("open: {e}");
            std::process::exit(1)
        })
    };
    let imgs: Vec<NbdImage> = (0..images).map(open).collect();
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|sc| {
        for img in &imgs {
            let next = std::sync::Arc::new(AtomicU64::new(0));
            for _ in 0..threads {
                let (next, total) = (next.clone(), &total);
                sc.spawn(move || {
                    let size = img.size();
                    loop {
                        let off = next.fetch_add(req, Ordering::Relaxed);
                        if off >= size {
                            break;
                        }
                        let len = req.min(size - off) as usize;
                        let d = img.read(off, len).unwrap_or_else(|e| {
                            eprintln!("read: {e}");
                            std::process::exit(1)
                        });
                        total.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let total = total.into_inner();
    println!(
        "read {total} bytes in {secs:.3} s: {:.1} MB/s ({images} image(s) x {threads} thread(s), request {req} bytes, {runtimes} runtime(s) of {workers} worker(s))",
        total as f64 / secs / 1e6
    );
}
