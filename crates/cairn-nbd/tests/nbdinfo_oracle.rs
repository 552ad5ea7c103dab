//! `nbdinfo --map` (libnbd) as an oracle for our block status maps. Needs the Debian package
//! `libnbd-bin`; without it the test says so loudly and passes.

mod common;

use std::time::Duration;

use cairn_nbd::{BASE_ALLOCATION, Client, ConnectOptions, StatusExtent};
use common::{Image, MIB, Server, run, run_ok};

/// (offset, length, flags), neighbours with equal flags merged.
fn merge(v: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (o, l, f) in v {
        match out.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, f)),
        }
    }
    out
}

fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    merge(out.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}

fn ours(v: Vec<StatusExtent>) -> Vec<(u64, u64, u32)> {
    merge(v.into_iter().map(|e| (e.offset, e.len, e.flags)))
}

#[tokio::test]
async fn maps_match_nbdinfo() {
    if !run_ok("nbdinfo", &["--version"]) {
        eprintln!(
            "\n*** SKIPPING maps_match_nbdinfo: nbdinfo not found (apt-get install libnbd-bin) ***\n"
        );
        return;
    }
    let img = Image::qcow2(32 * MIB);
    img.io(&[
        "write -P 0xaa 1M 64k",
        "write -P 0xbb 7M 3M",
        "write -z 12M 1M",
    ]);
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--enable",
            "-g",
            "65536",
            img.path(),
            "b0",
        ],
    );
    img.io(&[
        "write -P 0xcc 2M 128k",
        "write -P 0xdd 20M 64k",
        "write -P 0xee 31M 1M",
    ]);
    let srv = Server::qemu_nbd(&img, &["-r", "-B", "b0"]);
    let uri = format!("nbd+unix:///?socket={}", common::path_str(srv.socket()));

    let o = ConnectOptions::default()
        .with_context(BASE_ALLOCATION)
        .with_dirty_bitmap("b0")
        .with_timeout(Duration::from_secs(20));
    let c = Client::connect_unix(srv.socket(), "", o).await.unwrap();
    for ctx in [BASE_ALLOCATION, "qemu:dirty-bitmap:b0"] {
        let want = nbdinfo_map(&uri, ctx);
        let got = ours(c.map(ctx, 0, c.size()).await.unwrap());
        assert_eq!(got, want, "context {ctx}");
        assert!(want.len() >= 3, "{ctx}: {want:?}");
    }
    c.disconnect().await.unwrap();
}
