//! `cairn demo --libvirt`: the demo's story on libvirt domains an operator defined with virsh.
//!
//! libvirtd and virtlogd are started (pid files in the work directory) when libvirt does not
//! answer, and stopped by those pids at the end; every domain the demo defines is destroyed and
//! undefined on every exit path.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::ManagerApi;
use cairn_server::JobKind;
use serde_json::{Value, json};

use crate::demo::{DemoArgs, KERNEL_APPEND, job, make_disk, reflink_unit, say, sh, vault_size};

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Result<String> {
    sh(Command::new("virsh").arg("-c").arg(URI).args(args))
}

/// The daemons this demo started, stopped by pid on drop; and its domains, removed first.
struct Libvirt {
    pid_files: Vec<PathBuf>,
    domains: Vec<String>,
}

impl Libvirt {
    fn ensure(w: &Path) -> Result<Self> {
        let mut me = Self {
            pid_files: Vec::new(),
            domains: Vec::new(),
        };
        if virsh(&["version"]).is_ok() {
            eprintln!("libvirt {URI} answers: using it");
            return Ok(me);
        }
        for daemon in ["virtlogd", "libvirtd"] {
            let pid = w.join(format!("{daemon}.pid"));
            sh(Command::new(daemon).arg("-d").arg("-p").arg(&pid)).with_context(|| {
                format!("starting {daemon} (scripts/install-deps.sh installs it)")
            })?;
            me.pid_files.push(pid);
        }
        let t = Instant::now();
        while virsh(&["version"]).is_err() {
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "libvirtd did not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("started virtlogd and libvirtd (stopped again at the end)");
        Ok(me)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", "--checkpoints-metadata", d]);
        }
        for f in self.pid_files.iter().rev() {
            if let Ok(pid) = std::fs::read_to_string(f) {
                let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
                let t = Instant::now();
                while Path::new(&format!("/proc/{}", pid.trim())).exists()
                    && t.elapsed() < Duration::from_secs(15)
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn domain_xml(name: &str, guest: &Path, disk: &Path, mac: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{}</kernel>
    <initrd>{}</initrd>
    <cmdline>{KERNEL_APPEND}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <interface type='user'><mac address='{mac}'/><model type='virtio'/></interface>
  </devices>
</domain>
",
        guest.join("vmlinux").display(),
        guest.join("initrd.gz").display(),
        disk.display()
    )
}

/// Runs `shell` in the guest through libvirt's agent channel; its stdout.
fn guest_sh(name: &str, shell: &str) -> Result<String> {
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", shell], "capture-output": true}});
    let out: Value =
        serde_json::from_str(&virsh(&["qemu-agent-command", name, &cmd.to_string()])?)?;
    let pid = out["return"]["pid"].clone();
    let t = Instant::now();
    loop {
        let st = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let v: Value =
            serde_json::from_str(&virsh(&["qemu-agent-command", name, &st.to_string()])?)?;
        if v["return"]["exited"] == true {
            ensure!(
                v["return"]["exitcode"] == 0,
                "{name}: `{shell}` failed: {v}"
            );
            let b64 = v["return"]["out-data"].as_str().unwrap_or("");
            let bytes = sh(Command::new("sh").args(["-c", &format!("echo {b64} | base64 -d")]))?;
            return Ok(bytes);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "{name}: `{shell}` hangs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn backup(all: &crate::allinone::AllInOne, vms: &[&str]) -> Result<(Value, Duration)> {
    let (r, t) = job(
        all,
        JobKind::Backup {
            vms: vms.iter().map(|v| v.to_string()).collect(),
            full: false,
            skip_unprotected: false,
        },
    )?;
    Ok((serde_json::to_value(r)?, t))
}

pub(crate) fn demo(
    a: &DemoArgs,
    guest: &Path,
    w: &Path,
    unmount: &mut Option<PathBuf>,
    started: Instant,
) -> Result<ExitCode> {
    say("libvirt");
    let mut lv = Libvirt::ensure(w)?;
    // QEMU runs as libvirt's unprivileged user: it must reach the disks.
    sh(Command::new("chmod").arg("755").arg(w))?;
    say("datastore on a storage unit");
    let ds = match reflink_unit(w) {
        Some(m) => {
            *unmount = Some(m.clone());
            m
        }
        None => {
            let d = w.join("datastore");
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    sh(Command::new("chmod").arg("755").arg(&ds))?;
    let shared = w.join("shared.bin");
    std::fs::write(
        &shared,
        (0..(8 << 20))
            .map(|_| rand::random::<u8>())
            .collect::<Vec<u8>>(),
    )?;
    let names: Vec<String> = (1..=a.vms).map(|i| format!("cairn-demo-vm{i}")).collect();

    say("domains defined and started with virsh, as an operator would");
    for (i, n) in names.iter().enumerate() {
        let disk = make_disk(w, &ds, n, &shared)?;
        let file = w.join(format!("{n}.xml"));
        std::fs::write(
            &file,
            domain_xml(n, guest, &disk, &format!("52:54:00:00:01:0{i}")),
        )?;
        virsh(&["define", &file.display().to_string()])?;
        lv.domains.push(n.clone());
        virsh(&["start", n])?;
    }
    for n in &names {
        let t = Instant::now();
        while virsh(&["qemu-agent-command", n, r#"{"execute":"guest-ping"}"#]).is_err() {
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "{n}: no guest agent"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("{n}: guest agent up after {} ms", t.elapsed().as_millis());
    }

    say(&format!(
        "every role in this process, the host agent on libvirt ({URI})"
    ));
    let all = crate::allinone::start(
        &w.join("state"),
        &[format!("ds={}", ds.display())],
        "127.0.0.1:0".parse()?,
        false,
        Some(URI),
        true,
        a.vault.as_deref(),
    )?;
    for v in all.manager.vms()? {
        eprintln!("  {} ({}, {})", v.name, v.origin.kind(), v.state);
    }

    say("full backup of every domain (guest frozen through libvirt's agent)");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (full, full_t) = backup(&all, &refs)?;

    let (vm1, vm2) = (names[0].as_str(), names[1].as_str());
    say(&format!("guest writes in {vm1} (4 MiB new file, sync)"));
    let sum = guest_sh(
        vm1,
        "dd if=/dev/urandom of=/mnt/day2.bin bs=1M count=4 2>/dev/null && sync && sha256sum /mnt/day2.bin",
    )?;
    let sum = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    say(&format!(
        "incremental of {vm1} (libvirt checkpoint bitmap), then of idle {vm2}"
    ));
    let (inc, inc_t) = backup(&all, &[vm1])?;
    let (idle, idle_t) = backup(&all, &[vm2])?;

    say(&format!(
        "{vm2} shut off: backed up from its disk in place, not started"
    ));
    virsh(&["destroy", vm2])?;
    let (off, off_t) = backup(&all, &[vm2])?;

    let restored = format!("{vm1}-restored");
    say(&format!(
        "restore {vm1}'s newest backup as a new domain {restored}, checked through its agent"
    ));
    let newest = all
        .server
        .catalog
        .latest_backup(vm1)?
        .context("no backup of vm1")?;
    lv.domains.push(restored.clone());
    let (r, restore_t) = job(
        &all,
        JobKind::Restore(cairn_api::server::RestoreParams {
            over_existing: false,
            backup: newest.id.to_string(),
            as_name: restored.clone(),
            host: None,
            start: true,
            wait_boot_s: 120,
        }),
    )?;
    let back = guest_sh(&restored, "sha256sum /mnt/day2.bin")?;
    if !back.starts_with(&sum) {
        bail!("{restored}: day2.bin differs: {back}");
    }
    eprintln!("{restored}: /mnt/day2.bin has the same sha256 as at the backup point");

    say("summary");
    let vault_bytes = vault_size(&all.vault);
    let summary = json!({
        "total_s": started.elapsed().as_secs_f64(),
        "full_backup": {"s": full_t.as_secs_f64(), "result": full},
        "incremental": {"s": inc_t.as_secs_f64(), "result": inc},
        "incremental_idle": {"s": idle_t.as_secs_f64(), "result": idle},
        "shut_off": {"s": off_t.as_secs_f64(), "result": off},
        "restore": {"s": restore_t.as_secs_f64(), "result": r},
        "vault_bytes_on_disk": vault_bytes,
        "server_disk_data_bytes": all.server.data_path().server_disk_bytes,
    });
    let line = |k: &str, v: String| eprintln!("  {k:<40} {v}");
    line(
        "total time",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    line(
        &format!("full backup of {} domains", names.len()),
        format!("{:.2} s", full_t.as_secs_f64()),
    );
    line(
        "incremental after writes",
        format!("{:.2} s", inc_t.as_secs_f64()),
    );
    line(
        "incremental, idle domain",
        format!("{:.2} s", idle_t.as_secs_f64()),
    );
    line("shut-off domain", format!("{:.2} s", off_t.as_secs_f64()));
    line(
        "restore as a new domain + boot check",
        format!("{:.2} s", restore_t.as_secs_f64()),
    );
    for b in all.server.catalog.backups(None)? {
        line(
            &format!("  {} {} {}", b.vm, b.kind, &b.id[..8]),
            format!(
                "freeze {} ms ({}), read {} B, sent {} B",
                b.quiesce_window_ms, b.quiesce, b.bytes_read, b.bytes_sent
            ),
        );
    }
    line("vault size on disk", format!("{vault_bytes}"));
    line(
        "disk-data bytes through the server",
        format!("{}", summary["server_disk_data_bytes"]),
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}
