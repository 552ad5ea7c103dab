//! Cairn and virtnbdbackup (Debian's package) back up the same libvirt domain in turn: full,
//! incremental, incremental for each. Neither breaks the other's checkpoint chain, and every
//! backup of each tool restores bit-exact to the disk as it was at its point.
//!
//! virtnbdbackup 1.9 refuses a domain with any checkpoint it did not make, so Cairn runs with
//! `--libvirt-checkpoints borrow`: it makes none and reads the changes since the newest
//! checkpoint virtnbdbackup had made before Cairn's previous backup.
//!
//! The guest keeps its file system read-only between writes, so the disk does not change
//! while a tool reads it and "the disk at that point" is a plain copy of the image.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;
use crate::libvirt::*;

fn tool_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes 1 MiB of new data in the guest, then makes its file system read-only again.
fn guest_writes(name: &str, round: usize) {
    let sh = format!(
        "mount -o remount,rw /mnt && dd if=/dev/urandom of=/mnt/f{round} bs=64k count=16 2>/dev/null \
         && sync && mount -o remount,ro /mnt && sync"
    );
    assert_eq!(guest_sh(name, &sh), 0, "guest write {round}");
}

#[test]
fn cairn_and_virtnbdbackup_take_turns_on_one_domain() {
    if Command::new("virtnbdbackup").arg("-V").output().is_err() {
        skip_or_fail("virtnbdbackup missing (scripts/install-deps.sh installs it)");
        return;
    }
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    let _dom = define_and_boot(
        t,
        &name,
        &domain_xml(&name, &g.guest, &src, "52:54:00:3a:00:03"),
    );
    assert_eq!(guest_sh(&name, "mount -o remount,ro /mnt && sync"), 0);
    let cluster = Cluster::start_with(
        t,
        &p("vault"),
        false,
        &["--libvirt", URI, "--libvirt-checkpoints", "borrow"],
    );
    let s = cluster.server.client();
    let vnb_dir = t.join("vnb");

    let mut cairn_points: Vec<(Value, PathBuf)> = Vec::new();
    let mut vnb_points: Vec<PathBuf> = Vec::new();
    for round in 0..3 {
        // Cairn's turn.
        if round > 0 {
            guest_writes(&name, 2 * round);
        }
        let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
        assert_eq!(j["state"], "succeeded", "{j}");
        let b = j["result"]["backups"][0].clone();
        let want = if round == 0 { "full" } else { "incremental" };
        assert_eq!(b["kind"], want, "{b}");
        if round > 1 {
            // Cairn's previous backup came after virtnbdbackup's first checkpoint: the
            // changes since it are a superset of the changes since that backup.
            assert_eq!(b["disks"][0]["change_source"], "hypervisor_bitmap", "{b}");
        }
        let at = t.join(format!("cairn-{round}.qcow2"));
        copy_of(&src, &at);
        cairn_points.push((b, at));

        // virtnbdbackup's turn.
        guest_writes(&name, 2 * round + 1);
        let level = if round == 0 { "full" } else { "inc" };
        tool_ok(
            Command::new("virtnbdbackup")
                .args(["-d", &name, "-l", level, "-n", "-o"])
                .arg(&vnb_dir),
        );
        let at = t.join(format!("vnb-{round}.qcow2"));
        copy_of(&src, &at);
        vnb_points.push(at);
    }

    // Cairn never deleted another tool's checkpoint.
    let (ok, list) = virsh(&["checkpoint-list", &name, "--name"]);
    assert!(ok, "{list}");
    for i in 0..3 {
        assert!(list.contains(&format!("virtnbdbackup.{i}")), "{list}");
    }

    // Every backup of each tool restores bit-exact to its point.
    for (i, (b, at)) in cairn_points.iter().enumerate() {
        let j = submit(
            &s,
            "/v1/restores",
            json!({"backup": b["backup"], "as_name": format!("r{i}"), "start": false}),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        let restored = Path::new(j["result"]["disks"][0]["path"].as_str().unwrap());
        assert!(same_content(restored, at), "Cairn backup {i} differs");
    }
    for (i, at) in vnb_points.iter().enumerate() {
        let out = t.join(format!("vnb-restore-{i}"));
        tool_ok(
            Command::new("virtnbdrestore")
                .args(["-n", "-i"])
                .arg(&vnb_dir)
                .arg("-o")
                .arg(&out)
                .args(["--until", &format!("virtnbdbackup.{i}")]),
        );
        let restored = out.join(src.file_name().unwrap());
        assert!(
            same_content(&restored, at),
            "virtnbdbackup backup {i} differs"
        );
    }
}

/// The freeze window of the one backup logged in `log` (libvirtd's debug log): from the
/// freeze command sent to the guest agent to the thaw's reply, for either tool alike.
fn freeze_window_ms(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let ts = |l: &str| -> Option<f64> {
        // "2026-12-02 15:00:28.123+0000: ..." -> seconds within the day.
        let t = l.get(11..23)?;
        let (h, rest) = t.split_once(':')?;
        let (m, s) = rest.split_once(':')?;
        Some(
            h.parse::<f64>().ok()? * 3600.0
                + m.parse::<f64>().ok()? * 60.0
                + s.parse::<f64>().ok()?,
        )
    };
    let freeze = lines
        .iter()
        .position(|l| l.contains("Send command '{\"execute\":\"guest-fsfreeze-freeze\"}'"))?;
    let thaw = lines
        .iter()
        .position(|l| l.contains("Send command '{\"execute\":\"guest-fsfreeze-thaw\"}'"))?;
    let reply = (thaw..lines.len()).find(|&k| lines[k].contains("Receive command reply"))?;
    Some((ts(lines[reply])? - ts(lines[freeze])?) * 1e3)
}

fn virt_admin(args: &[&str]) {
    let _ = Command::new("virt-admin")
        .arg("-c")
        .arg("libvirtd:///system")
        .args(args)
        .status();
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Benchmark (not run in CI: `bench/libvirt.sh`): Cairn and virtnbdbackup on the same domain
/// and disk, in turn, `CAIRN_BENCH_REPS` rounds (default 3): full backup (wall, freeze window),
/// 1% of the disk's blocks rewritten, incremental (bytes added to the backup store), restore
/// of the newest incremental as a new domain (wall). Prints medians and every figure.
#[test]
#[ignore = "benchmark: bench/libvirt.sh"]
fn bench_libvirt_vs_virtnbdbackup() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let reps: usize = std::env::var("CAIRN_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mib: u64 = std::env::var("CAIRN_BENCH_DISK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    // A disk three quarters full: random data (no flattering holes or duplicates) and a copy of
    // /usr/share as a tar file (text, compressible).
    let src_dir = t.join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    tool_ok(
        Command::new("head")
            .args(["-c", &format!("{}M", mib / 2)])
            .arg("/dev/urandom")
            .stdout(std::fs::File::create(src_dir.join("random.bin")).unwrap()),
    );
    let docs = format!(
        "tar -C /usr/share -cf - doc man 2>/dev/null | head -c {}M > {}",
        mib / 4,
        src_dir.join("docs.tar").display()
    );
    tool_ok(Command::new("sh").args(["-c", &docs]));
    let raw = t.join("bench.raw");
    tool_ok(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&src_dir)
            .arg(&raw)
            .arg(format!("{mib}M")),
    );
    let src = t.join("ds/bench.qcow2");
    tool_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&src),
    );
    std::fs::remove_file(&raw).unwrap();
    let name = "cairn-bench";
    let _dom = define_and_boot(
        t,
        name,
        &domain_xml(name, &g.guest, &src, "52:54:00:3a:00:04"),
    );
    let c = Cluster::start_with(
        t,
        &p("vault"),
        false,
        &["--libvirt", URI, "--libvirt-checkpoints", "borrow"],
    );
    let s = c.server.client();
    virt_admin(&["daemon-log-filters", "1:qemu.qemu_agent 4:*"]);

    let mut rows = Vec::new();
    let blocks = mib * 1024 / 64 / 2; // 64 KiB blocks of random.bin
    for round in 0..reps {
        let log = |what: &str| t.join(format!("libvirtd-{what}-{round}.log"));
        let vnb = t.join(format!("vnb-{round}"));
        // virtnbdbackup full.
        virt_admin(&[
            "daemon-log-outputs",
            &format!("1:file:{}", log("vnb").display()),
        ]);
        let t0 = std::time::Instant::now();
        tool_ok(
            Command::new("virtnbdbackup")
                .args(["-d", name, "-l", "full", "-n", "-o"])
                .arg(&vnb),
        );
        let vnb_full = t0.elapsed().as_secs_f64();
        // Cairn full.
        virt_admin(&[
            "daemon-log-outputs",
            &format!("1:file:{}", log("cairn").display()),
        ]);
        let j = submit(&s, "/v1/backups", json!({ "vms": [name], "full": true }));
        assert_eq!(j["state"], "succeeded", "{j}");
        let cairn_full =
            (j["finished_ms"].as_f64().unwrap() - j["created_ms"].as_f64().unwrap()) / 1e3;
        virt_admin(&["daemon-log-outputs", "3:stderr"]);
        // 1% of the disk's blocks rewritten, at random places in the random file.
        let n = (mib * 1024 / 64) / 100;
        let sh = format!(
            "i=0; while [ $i -lt {n} ]; do dd if=/dev/urandom of=/mnt/random.bin bs=64k count=1 \
             seek=$((RANDOM % {blocks})) conv=notrunc 2>/dev/null; i=$((i+1)); done; sync"
        );
        assert_eq!(guest_sh(name, &sh), 0);
        // Incrementals: what each adds to its store.
        let vault_before = du(&t.join("vault"));
        tool_ok(
            Command::new("virtnbdbackup")
                .args(["-d", name, "-l", "inc", "-n", "-o"])
                .arg(&vnb),
        );
        let vnb_inc: u64 = std::fs::read_dir(&vnb)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".inc."))
            .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
        assert_eq!(j["state"], "succeeded", "{j}");
        let inc = j["result"]["backups"][0].clone();
        let cairn_inc = du(&t.join("vault")).saturating_sub(vault_before);
        // Restores of the newest incremental as a new domain.
        let vname = format!("vnb-restored-{round}");
        let t0 = std::time::Instant::now();
        tool_ok(
            Command::new("virtnbdrestore")
                .args(["-n", "-i"])
                .arg(&vnb)
                .arg("-o")
                .arg(t.join(format!("vnb-out-{round}")))
                .args(["-c", "-D", "-N", &vname]),
        );
        let vnb_restore = t0.elapsed().as_secs_f64();
        let _v = Domain(vname);
        let cname = format!("cairn-restored-{round}");
        let j = submit(
            &s,
            "/v1/restores",
            json!({"backup": inc["backup"], "as_name": cname, "start": true}),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        let _c = Domain(cname);
        eprintln!("cairn restore: {}", j["events"]);
        let cairn_restore =
            (j["finished_ms"].as_f64().unwrap() - j["created_ms"].as_f64().unwrap()) / 1e3;
        let row = [
            vnb_full,
            cairn_full,
            freeze_window_ms(&log("vnb")).unwrap_or(f64::NAN),
            freeze_window_ms(&log("cairn")).unwrap_or(f64::NAN),
            vnb_inc as f64,
            cairn_inc as f64,
            vnb_restore,
            cairn_restore,
        ];
        eprintln!("bench round {round}: {row:?} (cairn incremental: {inc})");
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let spread = |i: usize, scale: f64| {
        let v: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.2}", r[i] / scale))
            .collect();
        v.join(" / ")
    };
    println!("| | virtnbdbackup 1.9.15 | Cairn | ratio |");
    println!("|---|---|---|---|");
    let line = |what: &str, a: usize, b: usize, unit: &str, scale: f64| {
        println!(
            "| {what} | {:.2} {unit} ({}) | {:.2} {unit} ({}) | {:.2} |",
            col(a) / scale,
            spread(a, scale),
            col(b) / scale,
            spread(b, scale),
            col(b) / col(a)
        );
    };
    line("full backup wall", 0, 1, "s", 1.0);
    line("guest freeze window", 2, 3, "ms", 1.0);
    line(
        "incremental added to the store (1% rewritten)",
        4,
        5,
        "MB",
        1e6,
    );
    line("restore newest incremental (new domain)", 6, 7, "s", 1.0);
}
