//! `cairn demo`: the README's main job. Builds a datastore with tiny QEMU guests (ext4 disks,
//! qemu-ga), runs every role in this process ([`crate::allinone`]) and goes through the flows:
//! full backup → guest writes → incremental (and an idle VM's) → group backup → restore as a
//! new VM, checked bit-exact against the vault and booted → a summary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::ManagerApi;
use cairn_api::server::{JobResult, JobState};
use serde_json::json;

use crate::allinone::AllInOne;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep everything (datastore, vault, catalog, logs) in DIR for inspection; the VMs are
    /// stopped either way.
    #[arg(long)]
    pub(crate) keep: Option<PathBuf>,
    /// The tiny guest (vmlinux, initrd.gz) built by scripts/build-test-guest.sh.
    #[arg(long, env = "CAIRN_TEST_GUEST", default_value = "target/test-guest")]
    pub(crate) guest: PathBuf,
    /// Number of VMs (2 or 3).
    #[arg(long, default_value_t = 3)]
    pub(crate) vms: usize,
    /// Tell the story on libvirt domains defined with virsh (libvirtd is started when it does
    /// not run, and stopped again).
    #[arg(long)]
    pub(crate) libvirt: bool,
    /// Keep the vault here instead of in the demo's directory: `s3://BUCKET[/PREFIX]` (S3
    /// settings from --s3-* or AWS_*; scripts/s3-demo.sh runs a three-node Garage for it) or
    /// a directory.
    #[arg(long)]
    pub(crate) vault: Option<String>,
}

pub(crate) const KERNEL_APPEND: &str = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable \
    no_timer_check lpj=4200000 8250.nr_uarts=1";

pub(crate) fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn say(s: &str) {
    eprintln!("\n== {s}");
}

/// A loop-mounted XFS for the datastore (a storage unit that can reflink), or `None` with a
/// loud note when this machine cannot mount (not root, no loop devices).
pub(crate) fn reflink_unit(w: &Path) -> Option<PathBuf> {
    let img = w.join("unit-xfs.img");
    let mnt = w.join("datastore");
    let ok = (|| -> Result<()> {
        std::fs::create_dir_all(&mnt)?;
        std::fs::File::create(&img)?.set_len(1 << 30)?;
        sh(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img))?;
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(())
    })();
    match ok {
        Ok(()) => Some(mnt),
        Err(e) => {
            eprintln!(
                "demo: NOTE: no reflink storage unit ({e:#}); group snapshots use plain copies"
            );
            let _ = std::fs::remove_file(&img);
            None
        }
    }
}

pub(crate) fn make_disk(w: &Path, ds: &Path, vm: &str, shared: &Path) -> Result<PathBuf> {
    let tree = w.join("trees").join(vm);
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::copy(shared, tree.join("shared.bin"))?;
    std::fs::write(tree.join("etc/hostname"), format!("{vm}\n"))?;
    let own: Vec<u8> = (0..(2 << 20)).map(|_| rand::random::<u8>()).collect();
    std::fs::write(tree.join("own.bin"), own)?;
    let raw = w.join(format!("{vm}.raw"));
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&raw)
        .arg("64M"))?;
    let disk = ds.join(format!("{vm}.qcow2"));
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk))?;
    std::fs::remove_file(&raw)?;
    Ok(disk)
}

fn wait_guest(all: &AllInOne, vm: &str, secs: u64) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if let Ok(g) = all.manager.guest(vm, 2000)
            && g.agent
        {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(secs),
            "{vm}: the guest agent did not answer in {secs} s"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub(crate) fn job(all: &AllInOne, kind: cairn_server::JobKind) -> Result<(JobResult, Duration)> {
    let t = Instant::now();
    let j =
        cairn_server::jobs::submit(&all.server, kind).map_err(|e| anyhow::anyhow!(e.chain()))?;
    let c = crate::ops::Connection::read(&all.connection)?.client()?;
    let done = crate::ops::wait_job(&c, &j.id, true)?;
    let took = t.elapsed();
    if done.state != JobState::Succeeded {
        bail!(
            "job {} {}: {}",
            j.id,
            done.state,
            done.error.as_deref().unwrap_or("")
        );
    }
    let result = done
        .result
        .with_context(|| format!("job {} succeeded without a result", j.id))?;
    Ok((result, took))
}

fn exec(all: &AllInOne, vm: &str, shell: &str) -> Result<String> {
    let r = all.manager.guest_exec(vm, shell)?;
    ensure!(r.exit_code == Some(0), "{vm}: `{shell}` failed: {r:?}");
    Ok(r.stdout)
}

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    ensure!((2..=3).contains(&a.vms), "--vms: 2 or 3");
    let guest = std::path::absolute(&a.guest)?;
    ensure!(
        guest.join("vmlinux").exists() && guest.join("initrd.gz").exists(),
        "no test guest in {} (scripts/build-test-guest.sh builds it; scripts/demo.sh does all)",
        guest.display()
    );
    let tmp;
    let w = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            std::path::absolute(d)?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut unmount = None;
    let r = if a.libvirt {
        crate::demo_libvirt::demo(&a, &guest, &w, &mut unmount, started)
    } else {
        demo(&a, &guest, &w, &mut unmount, started)
    };
    if let Some(m) = unmount {
        let _ = Command::new("umount").arg(&m).status();
    }
    r
}

fn demo(
    a: &DemoArgs,
    guest: &Path,
    w: &Path,
    unmount: &mut Option<PathBuf>,
    started: Instant,
) -> Result<ExitCode> {
    say("datastore on a storage unit");
    let ds = match reflink_unit(w) {
        Some(m) => {
            *unmount = Some(m.clone());
            eprintln!("loop-mounted XFS with reflink at {}", m.display());
            m
        }
        None => {
            let d = w.join("datastore");
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    let shared = w.join("shared.bin");
    std::fs::write(
        &shared,
        (0..(8 << 20))
            .map(|_| rand::random::<u8>())
            .collect::<Vec<u8>>(),
    )?;
    let names: Vec<String> = (1..=a.vms).map(|i| format!("vm{i}")).collect();
    for n in &names {
        make_disk(w, &ds, n, &shared)?;
    }
    eprintln!(
        "{} qcow2 disks of 64 MiB (ext4, 8 MiB shared + 2 MiB own data each)",
        names.len()
    );

    say(
        "every role in this process: vault (a directory, or --vault), catalog (SQLite), manager, host agent, storage agent, server",
    );
    let all = crate::allinone::start(
        &w.join("state"),
        &[format!("ds={}", ds.display())],
        "127.0.0.1:0".parse()?,
        true,
        None,
        true,
        a.vault.as_deref(),
    )?;
    eprintln!(
        "server {}  (cairn --connect {} ...)",
        all.server_url,
        all.connection.display()
    );
    let _stop = StopVms(
        &all,
        names
            .iter()
            .cloned()
            .chain(["vm1-restored".to_string()])
            .collect(),
    );

    say("booting the guests (TCG)");
    for n in &names {
        let spec = json!({
            "name": n, "vcpus": 1, "memory_mib": 192,
            "disks": [{"id": "vda", "path": ds.join(format!("{n}.qcow2")), "format": "qcow2"}],
            "nics": [{"model": "virtio-net-pci", "mac": format!("52:54:00:00:00:0{}", &n[2..])}],
            "boot": {"type": "kernel", "kernel": guest.join("vmlinux"), "initrd": guest.join("initrd.gz"), "append": KERNEL_APPEND},
        });
        all.manager
            .provision("local", &serde_json::from_value(spec)?)?;
    }
    for n in &names {
        let t = wait_guest(&all, n, 120)?;
        eprintln!("{n}: guest agent up after {} ms", t.as_millis());
    }

    say("full backup of every VM");
    let (full, full_t) = job(
        &all,
        cairn_server::JobKind::Backup {
            skip_unprotected: false,
            vms: names.clone(),
            full: false,
        },
    )?;

    say("guest writes in vm1 (4 MiB new file, sync)");
    let sum = exec(
        &all,
        "vm1",
        "dd if=/dev/urandom of=/mnt/day2.bin bs=1M count=4 2>/dev/null && sync && sha256sum /mnt/day2.bin",
    )?;
    let sum = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    eprintln!("vm1:/mnt/day2.bin sha256 {sum}");

    say("incremental backup of vm1 (dirty bitmap), then of idle vm2");
    let (inc, inc_t) = job(
        &all,
        cairn_server::JobKind::Backup {
            skip_unprotected: false,
            vms: vec!["vm1".into()],
            full: false,
        },
    )?;
    let (idle, idle_t) = job(
        &all,
        cairn_server::JobKind::Backup {
            skip_unprotected: false,
            vms: vec!["vm2".into()],
            full: false,
        },
    )?;

    say("group backup: one storage-unit snapshot for all VMs, VM snapshots released at once");
    let (group, group_t) = job(
        &all,
        cairn_server::JobKind::GroupBackup {
            skip_unprotected: false,
            vms: names.clone(),
            full: false,
        },
    )?;

    say(
        "group backup again: the storage agent diffs each disk with its last clone (FIEMAP, L1/L2)",
    );
    let (group2, group2_t) = job(
        &all,
        cairn_server::JobKind::GroupBackup {
            skip_unprotected: false,
            vms: names.clone(),
            full: false,
        },
    )?;
    if let JobResult::GroupBackup(g) = &group2 {
        for b in &g.backups {
            let size: i64 = b.disks.iter().map(|d| d.size).sum();
            eprintln!(
                "{}: read {} of {size} B ({:.1}%), {}",
                b.vm,
                b.bytes_read,
                100.0 * b.bytes_read as f64 / size.max(1) as f64,
                b.disks
                    .iter()
                    .map(|d| d.change_source.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    say("restore vm1's newest backup as a new VM vm1-restored");
    let newest = all
        .server
        .catalog
        .latest_backup("vm1")?
        .context("no backup of vm1")?;
    let (restored, restore_t) = job(
        &all,
        cairn_server::JobKind::Restore(cairn_server::restore::RestoreParams {
            over_existing: false,
            backup: newest.id.to_string(),
            as_name: "vm1-restored".into(),
            host: None,
            start: false,
            wait_boot_s: 0,
        }),
    )?;
    // Bit-exact: the restored qcow2 against the vault snapshot, before the guest touches it.
    let repo = cairn_vault::Repository::open_location(&all.vault)?;
    if let Some(k) = &all.vault_key {
        repo.unlock(&cairn_vault::Credential::read_key_file(k)?)?;
    }
    let vault = cairn_vault::LocalVault { repo };
    let mut exact = Vec::new();
    let JobResult::Restore(restored) = restored else {
        bail!("the restore job answered {restored:?}");
    };
    for d in &restored.disks {
        let check = w.join("check.raw");
        let snap = d.snapshot.as_str();
        cairn_vault::imager::restore(
            &vault,
            snap,
            &check,
            &Default::default(),
            &cairn_vault::imager::NoProgress,
        )?;
        sh(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(&check)
            .arg(&d.path))?;
        std::fs::remove_file(&check)?;
        eprintln!(
            "{}: {} is bit-exact with vault snapshot {snap}",
            d.disk,
            d.path.display()
        );
        exact.push(json!({"disk": d.disk, "snapshot": snap, "bit_exact": true}));
    }
    let boot_t = Instant::now();
    all.manager.provision("local", &restored.attributes)?;
    wait_guest(&all, "vm1-restored", 120)?;
    let boot_ms = boot_t.elapsed().as_millis();
    let back = exec(&all, "vm1-restored", "sha256sum /mnt/day2.bin")?;
    ensure!(
        back.starts_with(&sum),
        "vm1-restored: day2.bin differs: {back}"
    );
    eprintln!(
        "vm1-restored booted in {boot_ms} ms; /mnt/day2.bin has the same sha256 as at the backup point"
    );

    say("summary");
    let backups = all.server.catalog.backups(None)?;
    let vault_stats = vault_size(&all.vault);
    let logical: i64 = backups.iter().flat_map(|b| &b.disks).map(|d| d.size).sum();
    let sent: i64 = backups.iter().map(|b| b.bytes_sent).sum();
    let read: i64 = backups.iter().map(|b| b.bytes_read).sum();
    let data_path = all.server.data_path();
    let summary = json!({
        "total_s": started.elapsed().as_secs_f64(),
        "full_backup": {"vms": names.len(), "s": full_t.as_secs_f64(), "result": full},
        "incremental_vm1": {"s": inc_t.as_secs_f64(), "result": inc},
        "incremental_idle_vm2": {"s": idle_t.as_secs_f64(), "result": idle},
        "group_backup": {"s": group_t.as_secs_f64(), "result": group},
        "group_backup_again": {"s": group2_t.as_secs_f64(), "result": group2},
        "restore": {"s": restore_t.as_secs_f64(), "boot_ms": boot_ms, "disks": exact},
        "backups": backups.len(),
        "logical_bytes_backed_up": logical,
        "bytes_read_by_storage_agent": read,
        "bytes_sent_to_vault": sent,
        "vault_bytes_on_disk": vault_stats,
        "dedup_ratio": if vault_stats > 0 { logical as f64 / vault_stats as f64 } else { 0.0 },
        "server_disk_data_bytes": data_path.server_disk_bytes,
        "data_path": data_path,
    });
    let line = |k: &str, v: String| eprintln!("  {k:<40} {v}");
    line(
        "total time",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    line(
        &format!("full backup of {} VMs", names.len()),
        format!("{:.2} s", full_t.as_secs_f64()),
    );
    line(
        "incremental, vm1 after writes",
        format!("{:.2} s", inc_t.as_secs_f64()),
    );
    line(
        "incremental, idle vm2 (target ≤ 2 s)",
        format!("{:.2} s", idle_t.as_secs_f64()),
    );
    line("group backup", format!("{:.2} s", group_t.as_secs_f64()));
    line(
        "group backup again (last clones)",
        format!("{:.2} s", group2_t.as_secs_f64()),
    );
    let lifetimes = match &group {
        JobResult::GroupBackup(g) => g.vm_snapshot_lifetimes_ms.as_slice(),
        _ => &[],
    };
    for l in lifetimes {
        line(
            &format!("  VM snapshot lifetime {} (target ≤ 1 s)", l.vm),
            format!("{} ms", l.host_measured_ms),
        );
    }
    for b in &backups {
        line(
            &format!("  {} {} {}", b.vm, b.kind, &b.id[..8]),
            format!(
                "freeze {} ms ({}), read {} B, sent {} B",
                b.quiesce_window_ms, b.quiesce, b.bytes_read, b.bytes_sent
            ),
        );
    }
    line(
        "restore + bit-exact check",
        format!("{:.2} s, boot {boot_ms} ms", restore_t.as_secs_f64()),
    );
    line("logical bytes backed up", format!("{logical}"));
    line(
        "vault size on disk",
        format!(
            "{vault_stats} (dedup {:.1}x)",
            summary["dedup_ratio"].as_f64().unwrap_or(0.0)
        ),
    );
    line(
        "disk-data bytes through the server",
        format!("{}", summary["server_disk_data_bytes"]),
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if a.keep.is_some() {
        eprintln!(
            "\nkept in {} (connection: {})",
            w.display(),
            all.connection.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn vault_size(location: &Path) -> i64 {
    if location.to_str().is_some_and(cairn_vault::location::is_s3) {
        // The bytes its objects hold in the bucket.
        let Ok(repo) = cairn_vault::Repository::open_location(location) else {
            return 0;
        };
        return repo
            .store()
            .list("")
            .map(|l| l.iter().map(|m| m.size as i64).sum())
            .unwrap_or(0);
    }
    fn walk(p: &Path) -> i64 {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len() as i64).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    walk(location)
}

/// Stops the demo's VMs on every exit path.
struct StopVms<'a>(&'a AllInOne, Vec<String>);

impl Drop for StopVms<'_> {
    fn drop(&mut self) {
        for vm in &self.1 {
            let _ = self.0.manager.stop_vm(vm);
        }
    }
}
