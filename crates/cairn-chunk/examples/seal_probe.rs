//! Throughput of sealing and opening frames, of keyed and plain BLAKE3, on this machine:
//! `cargo run -p cairn-chunk --example seal_probe`.

use std::time::Instant;

use cairn_chunk::Keys;

fn main() {
    let keys = Keys::generate();
    let total = 256usize << 20;
    for frame in [8usize << 10, 256 << 10] {
        let data = vec![7u8; frame];
        let n = total / frame;
        let t = Instant::now();
        let sealed: Vec<Vec<u8>> = (0..n).map(|_| keys.seal_frame(&data, 0, &[])).collect();
        let seal = t.elapsed();
        let t = Instant::now();
        for s in &sealed {
            assert_eq!(keys.open_frame(s).unwrap().len(), frame);
        }
        let open = t.elapsed();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(keys.fingerprint(&data));
        }
        let keyed = t.elapsed();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(cairn_chunk::fingerprint(&data));
        }
        let plain = t.elapsed();
        let mibs = |d: std::time::Duration| (total >> 20) as f64 / d.as_secs_f64();
        println!(
            "frames of {} KiB: seal {:.0} MiB/s, open {:.0} MiB/s, keyed BLAKE3 {:.0} MiB/s, BLAKE3 {:.0} MiB/s",
            frame >> 10,
            mibs(seal),
            mibs(open),
            mibs(keyed),
            mibs(plain)
        );
    }
}
