//! Reads a whole export with N requests in flight and prints the throughput.
//!
//! ```text
//! cargo run --release -p cairn-nbd --example nbd_read_bench -- \
//!     (--socket PATH | --tcp HOST:PORT) [--export NAME] [--depth N] [--request-size BYTES]
//!     [--runtime current|multi]
//! ```
//!
//! `--runtime` picks tokio's multi-threaded runtime (default) or `current_thread`. Measured
//! (docs/bench/nbd.md): `current_thread` is ~35% slower, because while the reader task drains
//! replies the workers cannot send the next requests, so the server's queue runs dry.
//!
//! Compare with `nbdcopy 'nbd+unix:///?socket=PATH' null:` (which skips holes; use a fully
//! allocated image for a fair comparison).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cairn_nbd::{Client, ConnectOptions};

fn usage() -> ! {
    eprintln!(
        "usage: nbd_read_bench (--socket PATH | --tcp HOST:PORT) [--export NAME] [--depth N] [--request-size BYTES] [--runtime current|multi]"
    );
    std::process::exit(2)
}

fn main() {
    let multi = match std::env::args()
        .skip_while(|a| a != "--runtime")
        .nth(1)
        .as_deref()
    {
        None | Some("multi") => true,
        Some("current") => false,
        Some(_) => usage(),
    };
    let rt = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let mut socket = None;
    let mut tcp = None;
    let mut export = String::new();
    let mut depth = 16usize;
    let mut req = 256u64 << 10;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--socket" => socket = Some(val()),
            "--tcp" => tcp = Some(val()),
            "--export" => export = val(),
            "--depth" => depth = val().parse().unwrap_or_else(|_| usage()),
            "--request-size" => req = val().parse().unwrap_or_else(|_| usage()),
            "--runtime" => drop(val()),
            _ => usage(),
        }
    }
    let opts = ConnectOptions {
        max_in_flight: depth.max(1),
        ..ConnectOptions::default()
    };
    let client = match (socket, tcp) {
        (Some(p), None) => Client::connect_unix(p, &export, opts).await,
        (None, Some(a)) => Client::connect_tcp(a, &export, opts).await,
        _ => usage(),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect: {e}");
            std::process::exit(1)
        }
    };
    let size = client.size();
    let req = req.clamp(1, u64::from(client.max_request_len()));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..depth.max(1) {
        let (c, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let off = next.fetch_add(req, Ordering::Relaxed);
                if off >= size {
                    return Ok::<u64, cairn_nbd::Error>(bytes);
                }
                let len = req.min(size - off);
                let d = c.read_at(off, len as usize).await?;
                bytes += d.len() as u64;
            }
        });
    }
    let mut total = 0u64;
    while let Some(r) = workers.join_next().await {
        match r {
            Ok(Ok(b)) => total += b,
            Ok(Err(e)) => {
                eprintln!("read: {e}");
                std::process::exit(1)
            }
            Err(e) => {
                eprintln!("worker: {e}");
                std::process::exit(1)
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "read {total} bytes in {secs:.3} s: {:.1} MB/s (depth {depth}, request {req} bytes, {} runtime)",
        total as f64 / secs / 1e6,
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
            _ => "multi_thread",
        }
    );
    let _ = client.disconnect().await;
}
