//! Integration tests against real `qemu-nbd` and `qemu-storage-daemon`.

mod common;

use std::time::Duration;

use cairn_nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use cairn_nbd::{BASE_ALLOCATION, Client, ConnectOptions, ErrorKind, StatusExtent};
use common::{Image, MIB, Server, run};

fn opts() -> ConnectOptions {
    ConnectOptions::default()
        .with_context(BASE_ALLOCATION)
        .with_timeout(Duration::from_secs(20))
}

/// 8 MiB image with 0xaa at [1M, 1M+64k) and 0x55 at [5M, 6M).
fn patterned() -> Image {
    let img = Image::qcow2(8 * MIB);
    img.io(&["write -P 0xaa 1M 64k", "write -P 0x55 5M 1M"]);
    img
}

fn expected_byte(off: u64) -> u8 {
    match off {
        o if (MIB..MIB + 65536).contains(&o) => 0xaa,
        o if (5 * MIB..6 * MIB).contains(&o) => 0x55,
        _ => 0,
    }
}

fn check_bytes(offset: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        let off = offset + i as u64;
        assert_eq!(*b, expected_byte(off), "byte at offset {off}");
    }
}

#[tokio::test]
async fn handshake_and_reads() {
    let img = patterned();
    let srv = Server::qemu_nbd(&img, &["-r"]);
    let c = Client::connect_unix(srv.socket(), "", opts())
        .await
        .unwrap();
    let info = c.info();
    assert_eq!(info.size, 8 * MIB);
    assert!(info.structured_replies);
    assert!(info.flags.read_only());
    assert_eq!(info.meta_contexts.len(), 1);
    assert_eq!(info.meta_contexts[0].name, BASE_ALLOCATION);
    assert!(info.block_size.is_some());

    // Whole disk (split into requests of max_request_len), plus unaligned pieces.
    let all = c.read_at(0, (8 * MIB) as usize).await.unwrap();
    assert_eq!(all.len() as u64, 8 * MIB);
    check_bytes(0, &all);
    for (off, len) in [
        (MIB - 100, 300usize),
        (MIB + 65530, 10),
        (5 * MIB + 1, 4095),
        (0, 1),
        (8 * MIB - 1, 1),
    ] {
        let d = c.read_at(off, len).await.unwrap();
        assert_eq!(d.len(), len);
        check_bytes(off, &d);
    }
    // Past the end is refused locally, and the connection stays usable.
    let e = c.read_at(8 * MIB - 1, 2).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // Writes to a read-only export are refused locally.
    let e = c.write_at(0, &[1, 2, 3], false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    c.read_at(0, 512).await.unwrap();
    c.disconnect().await.unwrap();
    assert_eq!(
        c.read_at(0, 512).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn simple_replies_without_structured() {
    let img = patterned();
    let srv = Server::qemu_nbd(&img, &["-r"]);
    let o = ConnectOptions {
        structured_replies: false,
        ..opts()
    };
    let c = Client::connect_unix(srv.socket(), "", o).await.unwrap();
    assert!(!c.info().structured_replies);
    assert!(c.info().meta_contexts.is_empty());
    let d = c.read_at(MIB - 512, 128 << 10).await.unwrap();
    check_bytes(MIB - 512, &d);
    let e = c.block_status(0, MIB, BASE_ALLOCATION).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn unknown_export_is_typed() {
    let img = patterned();
    let srv = Server::qemu_nbd(&img, &["-r", "-x", "disk0"]);
    let e = Client::connect_unix(srv.socket(), "nope", opts())
        .await
        .unwrap_err();
    assert!(
        matches!(e, cairn_nbd::Error::ExportNotFound { ref export, .. } if export == "nope"),
        "{e}"
    );
    let c = Client::connect_unix(srv.socket(), "disk0", opts())
        .await
        .unwrap();
    assert_eq!(c.size(), 8 * MIB);
}

fn covers(extents: &[StatusExtent], offset: u64, len: u64) {
    assert_eq!(extents.first().map(|e| e.offset), Some(offset));
    for w in extents.windows(2) {
        assert_eq!(w[0].end(), w[1].offset, "extents contiguous");
    }
    assert_eq!(extents.last().map(|e| e.end()), Some(offset + len));
}

#[tokio::test]
async fn holes_via_base_allocation() {
    let img = patterned();
    let srv = Server::qemu_nbd(&img, &["-r"]);
    let c = Client::connect_unix(srv.socket(), "", opts())
        .await
        .unwrap();
    let map = c.map(BASE_ALLOCATION, 0, 8 * MIB).await.unwrap();
    covers(&map, 0, 8 * MIB);
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.flags & STATE_HOLE == 0)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(data, vec![(MIB, 65536), (5 * MIB, MIB)], "{map:?}");
    for e in &map {
        if e.flags & STATE_HOLE != 0 {
            assert_ne!(e.flags & STATE_ZERO, 0);
        }
    }
    // A range that starts inside a hole: extents stay within the request.
    let ext = c.block_status(MIB / 2, MIB, BASE_ALLOCATION).await.unwrap();
    assert_eq!(ext[0].offset, MIB / 2);
    assert!(ext.iter().all(|e| e.end() <= MIB / 2 + MIB));
    // A read spanning holes and data (qemu answers with hole and data chunks).
    let d = c.read_at(MIB - 4096, (MIB + 8192) as usize).await.unwrap();
    check_bytes(MIB - 4096, &d);
}

#[tokio::test]
async fn dirty_bitmap_extents() {
    let img = Image::qcow2(16 * MIB);
    img.io(&["write -P 0x11 0 4M"]);
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
    img.io(&["write -P 0x22 1M 64k", "write -P 0x33 10M 192k"]);
    let srv = Server::qemu_nbd(&img, &["-r", "-B", "b0"]);
    let o = opts().with_dirty_bitmap("b0");
    let c = Client::connect_unix(srv.socket(), "", o).await.unwrap();
    let names: Vec<&str> = c
        .info()
        .meta_contexts
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert!(names.contains(&"qemu:dirty-bitmap:b0"), "{names:?}");
    let map = c.map("qemu:dirty-bitmap:b0", 0, 16 * MIB).await.unwrap();
    covers(&map, 0, 16 * MIB);
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(dirty, vec![(MIB, 65536), (10 * MIB, 192 << 10)], "{map:?}");
    // Both contexts come back from one request.
    let all = c.block_status_all(0, 16 * MIB).await.unwrap();
    assert_eq!(all.len(), 2);
    let d = c.read_at(MIB, 65536).await.unwrap();
    assert!(d.iter().all(|b| *b == 0x22));
}

#[tokio::test]
async fn writes_zeroes_trim_flush_round_trip() {
    let img = Image::qcow2(4 * MIB);
    img.io(&["write -P 0x77 0 4M"]);
    let mut srv = Server::qemu_nbd(&img, &[]);
    let c = Client::connect_unix(srv.socket(), "", opts())
        .await
        .unwrap();
    let f = c.info().flags;
    assert!(!f.read_only() && f.can_flush() && f.can_trim() && f.can_write_zeroes());

    c.write_at(MIB, &vec![0xabu8; 256 << 10], false)
        .await
        .unwrap();
    c.write_at(3 * MIB + 100, b"hello nbd", true).await.unwrap();
    c.write_zeroes(2 * MIB, 512 << 10, false).await.unwrap();
    c.write_zeroes(2 * MIB + (512 << 10), 64 << 10, true)
        .await
        .unwrap();
    c.trim(0, 512 << 10).await.unwrap();
    c.flush().await.unwrap();

    // Read back through NBD.
    let d = c.read_at(MIB, 256 << 10).await.unwrap();
    assert!(d.iter().all(|b| *b == 0xab));
    assert_eq!(
        &c.read_at(3 * MIB + 100, 9).await.unwrap()[..],
        b"hello nbd"
    );
    assert!(
        c.read_at(2 * MIB, 576 << 10)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    c.disconnect().await.unwrap();
    srv.stop();

    // And check the file with qemu-io once the server has closed it.
    img.io(&[
        "read -P 0xab 1M 256k",
        "read -P 0x77 1280k 768k",
        "read -P 0 2M 576k",
        "read -P 0x77 2624k 64k",
        "read -P 0x77 3M 100",
    ]);
    let out = img.io(&["read -v 3145828 9"]);
    assert!(out.contains("68 65 6c 6c 6f 20 6e 62 64"), "{out}");
    // Trimmed range reads as zeroes or the old data, never anything else.
    let out = img.io(&["read -v 0 16"]);
    assert!(
        out.contains("00 00 00 00") || out.contains("77 77 77 77"),
        "{out}"
    );
}

#[tokio::test]
async fn pipelined_concurrent_reads() {
    let img = patterned();
    let srv = Server::qemu_nbd(&img, &["-r"]);
    let o = ConnectOptions {
        max_in_flight: 16,
        ..opts()
    };
    let c = Client::connect_unix(srv.socket(), "", o).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let c = c.clone();
        set.spawn(async move {
            let off = (i * 37 * 4096 + i) % (8 * MIB - 70_000);
            let len = 1 + (i as usize * 331) % 65536;
            let d = c.read_at(off, len).await.unwrap();
            check_bytes(off, &d);
            len
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r.unwrap();
    }
    assert!(total > 0);
    // A single call split into many pipelined requests.
    let o = ConnectOptions {
        max_request_len: 64 << 10,
        ..opts()
    };
    let c2 = Client::connect_unix(srv.socket(), "", o).await.unwrap();
    let d = c2.read_at(0, (8 * MIB) as usize).await.unwrap();
    check_bytes(0, &d);
}

#[tokio::test]
async fn qemu_storage_daemon_export() {
    let img = patterned();
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", img.path(), "b1"],
    );
    img.io(&["write -P 0x66 7M 64k"]);
    let sock = img.socket("qsd.sock");
    let args: Vec<String> = vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={}", img.path()),
        "--blockdev".into(),
        "driver=qcow2,node-name=fmt0,file=file0".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", common::path_str(&sock)),
        "--export".into(),
        "type=nbd,id=e0,node-name=fmt0,name=vm0,writable=on,bitmaps.0=b1".into(),
    ];
    let mut srv = Server::spawn("qemu-storage-daemon", &args, sock);
    let o = opts().with_dirty_bitmap("b1");
    let c = Client::connect_unix(srv.socket(), "vm0", o).await.unwrap();
    assert_eq!(c.size(), 8 * MIB);
    assert_eq!(c.info().meta_contexts.len(), 2);
    let dirty: Vec<(u64, u64)> = c
        .map("qemu:dirty-bitmap:b1", 0, 8 * MIB)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(dirty, vec![(7 * MIB, 65536)]);
    let d = c.read_at(MIB, 65536).await.unwrap();
    assert!(d.iter().all(|b| *b == 0xaa));
    c.write_at(6 * MIB, &[0x99; 4096], false).await.unwrap();
    c.flush().await.unwrap();
    assert!(
        c.read_at(6 * MIB, 4096)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0x99)
    );
    c.disconnect().await.unwrap();
    srv.stop();
    img.io(&["read -P 0x99 6M 4k", "read -P 0x66 7M 64k"]);
}

#[tokio::test]
async fn tcp_transport() {
    let img = patterned();
    let (_srv, port) = Server::qemu_nbd_tcp(&img, &["-r"]);
    let c = Client::connect_tcp(format!("127.0.0.1:{port}"), "", opts())
        .await
        .unwrap();
    assert_eq!(c.size(), 8 * MIB);
    let d = c.read_at(MIB - 4096, 3 * 65536).await.unwrap();
    check_bytes(MIB - 4096, &d);
    let map = c.map(BASE_ALLOCATION, 0, 8 * MIB).await.unwrap();
    covers(&map, 0, 8 * MIB);
    c.disconnect().await.unwrap();
}
