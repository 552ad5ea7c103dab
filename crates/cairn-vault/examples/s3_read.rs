//! Raw read throughput of an S3 location through the S3 store: lists it and reads every
//! object whole, then in 4 MiB ranges, with one and with four threads. A server's ceiling,
//! measured before judging the vault's reads from it.
//!
//! `AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
//!  cargo run --example s3_read -- s3://BUCKET/PREFIX`

use std::time::Instant;

use cairn_vault::store::{ObjectStore, S3Store};

fn main() {
    let url = std::env::args()
        .nth(1)
        .expect("usage: s3_read s3://BUCKET/PREFIX");
    let cfg = cairn_vault::location::s3_config(&url).expect("S3 settings");
    let store = S3Store::open(cfg).expect("open");
    let objects = store.list("").expect("list");
    let total: u64 = objects.iter().map(|m| m.size).sum();
    println!("{} objects, {} bytes", objects.len(), total);
    for threads in [1usize, 4] {
        for range in [None, Some(4u64 << 20)] {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for part in objects.chunks(objects.len().div_ceil(threads).max(1)) {
                    let store = &store;
                    s.spawn(move || {
                        for m in part {
                            match range {
                                None => drop(store.get(&m.key).expect("get")),
                                Some(r) => {
                                    let mut at = 0;
                                    while at < m.size {
                                        let n = r.min(m.size - at);
                                        drop(store.get_range(&m.key, at, n).expect("range"));
                                        at += n;
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let s = t0.elapsed().as_secs_f64();
            println!(
                "{threads} thread(s), {}: {:.2} s, {:.0} MiB/s",
                range.map_or("whole objects".to_string(), |r| format!(
                    "{} MiB ranges",
                    r >> 20
                )),
                s,
                total as f64 / s / (1 << 20) as f64
            );
        }
    }
}
