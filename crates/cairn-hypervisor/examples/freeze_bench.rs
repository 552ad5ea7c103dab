//! Boots the tiny test guest through [`QemuDriver`] and measures, N times, a fleecing snapshot
//! with a guest freeze: the freeze window, reading the whole point-in-time export with the
//! `cairn-nbd` client and with `nbdcopy … null:`, and the snapshot's lifetime. Prints every run
//! and the medians as JSON (docs/bench/hypervisor.md, bench/hypervisor.sh).
//!
//! ```text
//! cargo run --release -p cairn-hypervisor --example freeze_bench -- \
//!     --guest target/test-guest --disk DISK.qcow2 --state DIR [--runs 10] [--depth 16]
//! ```
//!
//! `--disk` is used in place (the guest mounts and writes it): pass a copy. `--state` is a fresh
//! driver state directory. Always TCG (the driver never asks for KVM).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_hypervisor::{
    BootSpec, DiskSource, DiskSpec, QemuDriver, QemuDriverOptions, Quiesce, QuiescePolicy,
    SnapshotKind, SnapshotOptions, VmSpec,
};
use cairn_nbd::{Client, ConnectOptions};
use serde_json::json;

const KERNEL_APPEND: &str = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable \
    no_timer_check lpj=4200000 8250.nr_uarts=1";

fn usage() -> ! {
    eprintln!(
        "usage: freeze_bench --guest DIR --disk DISK.qcow2 --state DIR [--runs N] [--depth N]"
    );
    std::process::exit(2)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Reads the whole export with `depth` requests of 256 KiB in flight; returns the bytes read.
async fn read_export(socket: &PathBuf, export: &str, depth: usize) -> u64 {
    let opts = ConnectOptions {
        max_in_flight: depth,
        ..ConnectOptions::default()
    };
    let client = Client::connect_unix(socket, export, opts)
        .await
        .expect("NBD connect");
    let size = client.size();
    let req = (256u64 << 10).min(u64::from(client.max_request_len()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..depth {
        let (c, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let off = next.fetch_add(req, Ordering::Relaxed);
                if off >= size {
                    return bytes;
                }
                let len = req.min(size - off);
                bytes += c.read_at(off, len as usize).await.expect("NBD read").len() as u64;
            }
        });
    }
    let mut total = 0;
    while let Some(r) = workers.join_next().await {
        total += r.expect("worker");
    }
    let _ = client.disconnect().await;
    total
}

#[tokio::main]
async fn main() {
    let (mut guest, mut disk, mut state) = (None, None, None);
    let (mut runs, mut depth) = (10usize, 16usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--guest" => guest = Some(PathBuf::from(val())),
            "--disk" => disk = Some(PathBuf::from(val())),
            "--state" => state = Some(PathBuf::from(val())),
            "--runs" => runs = val().parse().unwrap_or_else(|_| usage()),
            "--depth" => depth = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(guest), Some(disk), Some(state)) = (guest, disk, state) else {
        usage()
    };
    let spec = VmSpec {
        domain_xml: None,
        name: "tiny-bench".into(),
        vcpus: 1,
        memory_mib: 256,
        machine: "q35".into(),
        disks: vec![DiskSpec::qcow2("vda", &disk)],
        nics: vec![],
        boot: BootSpec::Kernel {
            kernel: guest.join("vmlinux"),
            initrd: Some(guest.join("initrd.gz")),
            append: KERNEL_APPEND.into(),
        },
        start_paused: false,
    };
    let d = QemuDriver::open(&state, QemuDriverOptions::default()).expect("driver");
    let h = d.start_vm(&spec).await.expect("start_vm");
    eprintln!("VM {} started, QEMU pid {}", h.id, h.pid);
    let qga = d.guest_agent(h.id).expect("agent");
    match qga.wait_ready(Duration::from_secs(120)).await {
        Ok(t) => eprintln!("qemu-ga answering after {t:?}"),
        Err(e) => {
            let serial = d.state_dir().join(format!("vms/{}/serial.log", h.id));
            eprintln!(
                "agent not ready: {e}\n{}",
                std::fs::read_to_string(serial).unwrap_or_default()
            );
            let _ = d.stop_vm(h.id, Duration::from_secs(15)).await;
            std::process::exit(1)
        }
    }

    let opts = SnapshotOptions {
        kind: SnapshotKind::Fleecing,
        quiesce: QuiescePolicy::Auto,
        ..SnapshotOptions::default()
    };
    let mut rows = Vec::new();
    let (mut freeze, mut snap_ms, mut life, mut ours, mut theirs, mut cycle) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let t0 = Instant::now();
        let s = d.snapshot(h.id, &opts).await.expect("snapshot");
        let snapshot_call_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(s.quiesce, Quiesce::GuestFreeze, "guest freeze expected");
        let DiskSource::Nbd { socket, export } = &s.disks[0].source else {
            panic!("{:?}", s.disks[0].source)
        };
        let size = s.disks[0].size;

        // Alternate which reader goes first, so neither always gets the colder cache.
        let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
        let nbdcopy = || {
            let t = Instant::now();
            let st = Command::new("nbdcopy")
                .arg(&uri)
                .arg("null:")
                .status()
                .expect("nbdcopy");
            assert!(st.success(), "nbdcopy {uri}: {st}");
            t.elapsed().as_secs_f64()
        };
        let mut theirs_s = 0.0;
        if i % 2 == 1 {
            theirs_s = nbdcopy();
        }
        let t = Instant::now();
        let bytes = read_export(socket, export, depth).await;
        let ours_s = t.elapsed().as_secs_f64();
        assert_eq!(bytes, size);
        if i % 2 == 0 {
            theirs_s = nbdcopy();
        }

        let lifetime = d.delete_snapshot(&s).await.expect("delete_snapshot");
        // Snapshot + our full read + delete: the Cairn counterpart of one virtnbdbackup full.
        let cycle_ms = (t0.elapsed().as_secs_f64() - theirs_s) * 1e3;
        let (ours_mbs, theirs_mbs) = (size as f64 / ours_s / 1e6, size as f64 / theirs_s / 1e6);
        let row = json!({
            "run": i,
            "nbdcopy_first": i % 2 == 1,
            "quiesce_window_ms": s.quiesce_window_ms,
            "snapshot_call_ms": snapshot_call_ms,
            "lifetime_ms": lifetime,
            "export_bytes": size,
            "cairn_nbd_read_s": ours_s,
            "cairn_nbd_mb_s": ours_mbs,
            "nbdcopy_s": theirs_s,
            "nbdcopy_mb_s": theirs_mbs,
            "cycle_without_nbdcopy_ms": cycle_ms,
        });
        eprintln!("{row}");
        rows.push(row);
        freeze.push(s.quiesce_window_ms as f64);
        snap_ms.push(snapshot_call_ms);
        life.push(lifetime as f64);
        ours.push(ours_mbs);
        theirs.push(theirs_mbs);
        cycle.push(cycle_ms);
    }
    d.stop_vm(h.id, Duration::from_secs(15))
        .await
        .expect("stop_vm");
    let out = json!({
        "runs": runs,
        "depth": depth,
        "median": {
            "quiesce_window_ms": median(&freeze),
            "snapshot_call_ms": median(&snap_ms),
            "lifetime_ms": median(&life),
            "cairn_nbd_mb_s": median(&ours),
            "nbdcopy_mb_s": median(&theirs),
            "cairn_over_nbdcopy": median(&ours) / median(&theirs),
            "cycle_without_nbdcopy_ms": median(&cycle),
        },
        "rows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
