//! libvirt domains end to end. The test starts `virtlogd` and `libvirtd` itself as daemons
//! with pid files (no systemd on these machines) and stops them by pid; it defines a domain
//! with `virsh` from XML as an operator would (TCG, the tiny guest with `qemu-ga`), and drives
//! every flow through real `cairn` processes whose host agent runs `--libvirt`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

pub const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS`: success and stdout (stderr appended on failure).
pub fn virsh(args: &[&str]) -> (bool, String) {
    match Command::new("virsh").arg("-c").arg(URI).args(args).output() {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                text.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            (o.status.success(), text)
        }
        Err(e) => (false, e.to_string()),
    }
}

/// libvirtd and virtlogd for one test; stopped by pid on drop when this test started them.
pub struct Libvirtd {
    pub pid_files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Libvirtd {
    pub fn start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        if virsh(&["version"]).0 {
            eprintln!("e2e: using the libvirtd that already runs");
            return Some(Self {
                pid_files: Vec::new(),
                _dir: dir,
            });
        }
        let mut pid_files = Vec::new();
        for daemon in ["virtlogd", "libvirtd"] {
            let pid = dir.path().join(format!("{daemon}.pid"));
            let ok = Command::new(daemon)
                .arg("-d")
                .arg("-p")
                .arg(&pid)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                skip_or_fail(&format!(
                    "{daemon} cannot start (scripts/install-deps.sh installs it)"
                ));
                return None;
            }
            pid_files.push(pid);
        }
        let me = Self {
            pid_files,
            _dir: dir,
        };
        let t0 = Instant::now();
        let alive = |f: &Path| {
            std::fs::read_to_string(f)
                .is_ok_and(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
        };
        while !virsh(&["version"]).0 {
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "libvirtd never answered"
            );
            // A daemon that found the previous test's one still stopping exits at once:
            // start it again.
            if let Some(f) = me.pid_files.last()
                && t0.elapsed() > Duration::from_secs(3)
                && !alive(f)
            {
                let _ = Command::new("libvirtd").arg("-d").arg("-p").arg(f).status();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Some(me)
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Domains a failed test left (every test domain is named cairn-…): their QEMUs would
        // outlive libvirtd.
        if !self.pid_files.is_empty() {
            let (_, names) = virsh(&["list", "--all", "--name"]);
            for n in names
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with("cairn-"))
            {
                let _ = virsh(&["destroy", n]);
                let _ = virsh(&["undefine", "--checkpoints-metadata", n]);
            }
        }
        // libvirtd first: it holds virtlogd's socket.
        for f in self.pid_files.iter().rev() {
            let Ok(pid) = std::fs::read_to_string(f) else {
                continue;
            };
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let t0 = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && t0.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A domain this test defined: destroyed and undefined on drop.
pub struct Domain(pub String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&[
            "undefine",
            "--checkpoints-metadata",
            "--snapshots-metadata",
            &self.0,
        ]);
    }
}

/// The domain XML of a tiny TCG guest with a guest agent channel and one disk.
pub fn domain_xml(name: &str, guest: &Path, disk: &Path, mac: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{KERNEL_APPEND}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <interface type='user'><mac address='{mac}'/><model type='virtio'/></interface>
  </devices>
</domain>
",
        kernel = guest.join("vmlinux").display(),
        initrd = guest.join("initrd.gz").display(),
        disk = disk.display(),
    )
}

/// Defines the domain with virsh and starts it; waits for its guest agent.
pub fn define_and_boot(dir: &Path, name: &str, xml: &str) -> Domain {
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    let (ok, out) = virsh(&["define", file.to_str().unwrap()]);
    assert!(ok, "virsh define: {out}");
    let d = Domain(name.into());
    let (ok, out) = virsh(&["start", name]);
    assert!(ok, "virsh start: {out}");
    wait_agent(name);
    d
}

pub fn wait_agent(name: &str) {
    let t0 = Instant::now();
    while !virsh(&["qemu-agent-command", name, r#"{"execute":"guest-ping"}"#]).0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{name}: no guest agent"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Runs `shell` in the guest through libvirt's agent channel; its exit code.
pub fn guest_sh(name: &str, shell: &str) -> i64 {
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", shell], "capture-output": true}});
    let (ok, out) = virsh(&["qemu-agent-command", name, &cmd.to_string()]);
    assert!(ok, "guest-exec: {out}");
    let pid = serde_json::from_str::<Value>(&out).unwrap()["return"]["pid"].clone();
    let t0 = Instant::now();
    loop {
        let st = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let (ok, out) = virsh(&["qemu-agent-command", name, &st.to_string()]);
        assert!(ok, "guest-exec-status: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        if v["return"]["exited"] == true {
            return v["return"]["exitcode"].as_i64().unwrap_or(-1);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest command hangs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `qemu-img compare` of two images' guest-visible content (shared locks: a domain may run).
pub fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    out.status.success()
}

/// A copy of `disk` as it is now (the domain paused or off).
pub fn copy_of(disk: &Path, to: &Path) {
    let ok = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "qcow2"])
        .arg(disk)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn backup(s: &cairn_http::Client, vm: &str) -> Value {
    let j = submit(s, "/v1/backups", json!({ "vms": [vm] }));
    assert_eq!(j["state"], "succeeded", "{j}");
    j["result"]["backups"][0].clone()
}

/// Restores `backup` as `as_name` without starting it; the restored disk's path.
fn restore_disk(s: &cairn_http::Client, backup: &Value, as_name: &str) -> PathBuf {
    restore_disks(s, backup, as_name).remove(0)
}

/// Restores `backup` as `as_name` without starting it; every restored disk's path, in order.
fn restore_disks(s: &cairn_http::Client, backup: &Value, as_name: &str) -> Vec<PathBuf> {
    let j = submit(
        s,
        "/v1/restores",
        json!({"backup": backup["backup"], "as_name": as_name, "start": false}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    j["result"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect()
}

/// Cairn's checkpoints of a domain, per `virsh checkpoint-list --name`.
fn cairn_checkpoints(name: &str) -> Vec<String> {
    let (ok, out) = virsh(&["checkpoint-list", name, "--name"]);
    assert!(ok, "{out}");
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cairn-"))
        .map(String::from)
        .collect()
}

/// Nothing of a backup job is left: no libvirt job, no scratch directory.
fn assert_no_leftovers(t: &Path, name: &str) {
    let (_, job) = virsh(&["domjobinfo", name]);
    assert!(
        job.lines()
            .any(|l| l.starts_with("Job type:") && l.contains("None"))
            || !job.contains("Backup"),
        "a job is left: {job}"
    );
    let scratch = t.join("host/libvirt/scratch");
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().flatten().collect();
    assert!(left.is_empty(), "scratch left: {left:?}");
    let flights: Vec<_> = std::fs::read_dir(t.join("host/libvirt/flights"))
        .unwrap()
        .flatten()
        .collect();
    assert!(flights.is_empty(), "journal left: {flights:?}");
}

#[test]
fn libvirt_domain_backups_restore_bit_exact_and_as_a_new_domain() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    // QEMU runs as libvirt's unprivileged user: it must reach the disks.
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    // A second disk, a raw image: libvirt keeps no checkpoint on it, so it is read whole in
    // the same job and compared with its parent.
    let data = t.join("ds").join(format!("{name}-data.raw"));
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&data, bytes).unwrap();
    let raw_disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk><channel",
        data.display()
    );
    let _dom = define_and_boot(
        t,
        &name,
        &domain_xml(&name, &g.guest, &src, "52:54:00:3a:00:01").replacen("<channel", &raw_disk, 1),
    );

    let cluster = Cluster::start_with(t, &p("vault"), false, &["--libvirt", URI]);
    let s = cluster.server.client();

    // The domain is listed, from libvirt, with its disk on the storage agent.
    let vms: Value = s.get_json("/v1/vms").unwrap();
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} not listed: {vms}"));
    assert_eq!(vm["origin"]["type"], "libvirt", "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["disks"][0]["storage_agent"], "s1", "{vm}");

    // 1. A full backup of the running domain, quiesced through its guest agent.
    let full = backup(&s, &name);
    assert_eq!(full["kind"], "full", "{full}");
    assert_eq!(full["quiesce"], "guest_freeze", "{full}");
    assert_no_leftovers(t, &name);
    let restored = restore_disk(&s, &full, "lv-full");
    let raw = t.join("full.raw");
    assert!(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&restored)
            .arg(&raw)
            .status()
            .unwrap()
            .success()
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the frozen point is a clean file system: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // 2. The guest writes; with its CPUs paused (nothing changes), an incremental reads only
    //    the blocks libvirt's checkpoint recorded, and restores bit-exact.
    assert_eq!(
        guest_sh(
            &name,
            "dd if=/dev/urandom of=/mnt/new.bin bs=1M count=2 2>/dev/null && sync"
        ),
        0
    );
    assert!(virsh(&["suspend", &name]).0);
    let inc = backup(&s, &name);
    let at_inc = t.join("at-inc.qcow2");
    copy_of(&src, &at_inc);
    let at_inc_data = t.join("at-inc-data.raw");
    std::fs::copy(&data, &at_inc_data).unwrap();
    assert!(virsh(&["resume", &name]).0);
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(
        inc["disks"][0]["change_source"], "hypervisor_bitmap",
        "{inc}"
    );
    let read = inc["disks"][0]["bytes_read"].as_i64().unwrap();
    assert!(
        read < 8 << 20,
        "read {read} B of a 32 MiB disk for 2 MiB written: {inc}"
    );
    assert_no_leftovers(t, &name);
    assert_eq!(inc["disks"][1]["disk"], "vdb", "{inc}");
    assert_eq!(inc["disks"][1]["change_source"], "recipe_compare", "{inc}");
    let back_inc = restore_disks(&s, &inc, "lv-inc");
    assert!(
        same_content(&back_inc[0], &at_inc),
        "incremental restore differs"
    );
    assert!(
        same_content(&back_inc[1], &at_inc_data),
        "raw disk restore differs"
    );
    // Cairn keeps at most the checkpoint it read from and the one it made.
    let cps = cairn_checkpoints(&name);
    assert!(!cps.is_empty() && cps.len() <= 2, "{cps:?}");

    // 3. A checkpoint libvirt lost (its metadata deleted) is redefined from the kept XML: the
    //    next backup is still incremental.
    let newest = cps.last().unwrap().clone();
    let (ok, out) = virsh(&["checkpoint-delete", &name, &newest, "--metadata"]);
    assert!(ok, "{out}");
    assert_eq!(guest_sh(&name, "echo more >> /mnt/new.bin && sync"), 0);
    let again = backup(&s, &name);
    assert_eq!(again["kind"], "incremental", "{again}");
    assert_eq!(
        again["disks"][0]["change_source"], "hypervisor_bitmap",
        "{again}"
    );

    // 4. A restore over the disks of a running domain is refused.
    let over = json!({"backup": full["backup"], "as_name": name, "over_existing": true});
    let j = submit(&s, "/v1/restores", over.clone());
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("shut off"), "{j}");

    // 5. Shut off: backed up from the disk file in place, without starting the domain.
    assert!(virsh(&["destroy", &name]).0);
    let off = backup(&s, &name);
    let (_, state) = virsh(&["domstate", &name]);
    assert!(state.contains("shut off"), "{state}");
    assert_eq!(off["quiesce"], "none", "{off}");
    let restored_off = restore_disk(&s, &off, "lv-off");
    assert!(
        same_content(&restored_off, &src),
        "shut-off restore differs"
    );
    // Restored over its own disk, shut off, the domain is back at the full backup's point.
    let j = submit(&s, "/v1/restores", over);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        same_content(&src, &restored),
        "the disk is not the full backup's"
    );
    assert!(virsh(&["start", &name]).0);
    wait_agent(&name);
    assert_ne!(
        guest_sh(&name, "test -f /mnt/new.bin"),
        0,
        "written after the full"
    );
    // Restore into the running guest, through libvirt's agent channel: the file written
    // after the full comes back from the incremental's catalog, byte for byte.
    let inc_id = inc["backup"].as_str().unwrap();
    let content = s
        .get_bytes(&format!(
            "/v1/files/content?backup={inc_id}&path=/vda/whole/new.bin"
        ))
        .unwrap();
    assert_eq!(content.len(), 2 << 20);
    let host_copy = t.join("new.bin");
    std::fs::write(&host_copy, &content).unwrap();
    let sum = Command::new("sha256sum").arg(&host_copy).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let into_guest = json!({"backup": inc_id, "path": "/vda/whole/new.bin",
                            "dest": "/mnt/back/new.bin"});
    let r: Value = s.post_json("/v1/files/restore-guest", &into_guest).unwrap();
    assert_eq!(
        (r["files"].as_u64(), r["bytes"].as_u64()),
        (Some(1), Some(2 << 20)),
        "{r}"
    );
    assert_eq!(
        guest_sh(
            &name,
            &format!("echo '{sum}  /mnt/back/new.bin' | sha256sum -c")
        ),
        0,
        "the file restored into the guest differs"
    );
    let again = s
        .post_json::<_, Value>("/v1/files/restore-guest", &into_guest)
        .unwrap_err()
        .to_string();
    assert!(again.contains("exists"), "{again}");

    // 6. Restore as a new domain: a new name, UUID and MAC, its disk in the datastore; it boots.
    let new_name = format!("{name}-copy");
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": inc["backup"], "as_name": new_name, "start": true, "wait_boot_s": 120}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    let _copy = Domain(new_name.clone());
    let (ok, xml) = virsh(&["dumpxml", &new_name]);
    assert!(ok, "{xml}");
    assert!(
        !xml.contains("52:54:00:3a:00:01"),
        "the MAC was kept: {xml}"
    );
    let (_, uuid_old) = virsh(&["domuuid", &name]);
    let (_, uuid_new) = virsh(&["domuuid", &new_name]);
    assert_ne!(uuid_old.trim(), uuid_new.trim());
    let disk_new = j["result"]["disks"][0]["path"].as_str().unwrap();
    assert!(xml.contains(disk_new), "{xml}");
    // The server waited for the guest agent, through libvirt, and saw the disk mounted.
    let guest = &j["result"]["guest"];
    assert_eq!(guest["agent"], true, "{j}");
    assert!(guest["filesystems"].to_string().contains("/mnt"), "{guest}");
    assert_eq!(guest_sh(&new_name, "test -f /mnt/new.bin"), 0);
}

/// Starts a backup that pauses right after its VM snapshot (the server's fault hook) and waits
/// until it holds the snapshot; returns the job id.
fn held_backup(s: &cairn_http::Client, vm: &str) -> String {
    let j: Value = s.post_json("/v1/backups", &json!({ "vms": [vm] })).unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    wait_hold(s, &id);
    id
}

#[test]
fn libvirt_failures_leave_nothing_behind_and_bad_input_is_clear() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();

    // Bad input: a libvirt that cannot be reached is refused at start, with libvirt's reason.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["host-agent", "--state-dir", &p("nohost"), "--libvirt"])
        .arg("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("libvirt") && err.contains("/nonexistent"),
        "{err}"
    );

    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    let _dom = define_and_boot(
        t,
        &name,
        &domain_xml(&name, &g.guest, &src, "52:54:00:3a:00:02"),
    );
    let mut c = Cluster::start_with(t, &p("vault"), false, &["--libvirt", URI]);
    let first = backup(&c.server.client(), &name);
    assert_eq!(first["kind"], "full");

    let pause = [("CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS", "4000")];
    c.server.restart(&pause);
    let s = c.server.client();

    // 1. The host agent is killed while a backup holds its snapshot; a new one recovers.
    let id = held_backup(&s, &name);
    c.host.kill();
    c.host.restart_same_address(&[]);
    let j = wait_job(&s, &id);
    eprintln!("host agent killed mid-backup: {}", j["state"]);
    assert_no_leftovers(t, &name);

    // 2. libvirtd restarts while a backup holds its snapshot.
    let id = held_backup(&s, &name);
    if let Some(pid_file) = _libvirtd.pid_files.last() {
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{}", pid.trim())).exists() {
            assert!(t0.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(100));
        }
        let ok = Command::new("libvirtd")
            .arg("-d")
            .arg("-p")
            .arg(pid_file)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        while !virsh(&["version"]).0 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let j = wait_job(&s, &id);
    assert_eq!(
        j["state"], "succeeded",
        "the NBD export outlives libvirtd: {j}"
    );
    assert_no_leftovers(t, &name);

    // 3. The storage agent is killed while it reads.
    let id = held_backup(&s, &name);
    c.storage.kill();
    c.storage.restart_same_address(&[]);
    let j = wait_job(&s, &id);
    eprintln!(
        "storage agent killed mid-backup: {} {}",
        j["state"], j["error"]
    );
    assert_no_leftovers(t, &name);

    // 4. The guest powers off mid-backup: the job fails with a clear message or completes.
    let id = held_backup(&s, &name);
    assert!(virsh(&["destroy", &name]).0);
    let j = wait_job(&s, &id);
    eprintln!("domain destroyed mid-backup: {} {}", j["state"], j["error"]);
    assert_no_leftovers(t, &name);

    // After all that, the next backups succeed: shut off, then running again (incremental or
    // full with the reason: a lost chain never fails a backup).
    c.server.restart(&[]);
    let s = c.server.client();
    let off = backup(&s, &name);
    assert_eq!(off["quiesce"], "none");
    assert!(virsh(&["start", &name]).0);
    wait_agent(&name);
    let on = backup(&s, &name);
    assert_eq!(on["quiesce"], "guest_freeze", "{on}");
    assert_no_leftovers(t, &name);
    let cps = cairn_checkpoints(&name);
    assert!(cps.len() <= 2, "orphaned checkpoints: {cps:?}");

    // 5. A checkpoint libvirt lists whose bitmap is gone: the backup reads the disk whole.
    assert!(virsh(&["destroy", &name]).0);
    for cp in &cps {
        let ok = Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&src)
            .arg(cp)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    assert!(virsh(&["start", &name]).0);
    wait_agent(&name);
    let lost = backup(&s, &name);
    assert_ne!(
        lost["disks"][0]["change_source"], "hypervisor_bitmap",
        "{lost}"
    );
    assert_no_leftovers(t, &name);
    let again = backup(&s, &name);
    assert_eq!(
        again["disks"][0]["change_source"], "hypervisor_bitmap",
        "{again}"
    );
}

#[test]
fn libvirt_unprotected_disks_are_named_and_skipped_on_request() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    std::fs::create_dir_all(t.join("elsewhere")).unwrap();
    // A shut-off domain (never started): one disk on the datastore, one image no storage agent
    // serves, one network disk, a CD-ROM drive.
    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    let stray = t.join("elsewhere/data.qcow2");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&stray)
            .arg("16M")
            .status()
            .unwrap()
            .success()
    );
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='rbd' name='pool/image'><host name='127.0.0.1'/></source>\
         <target dev='vdc' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>\
         <channel",
        stray.display()
    );
    let xml =
        domain_xml(&name, &g.guest, &src, "52:54:00:3a:00:05").replacen("<channel", &extra, 1);
    let file = t.join("dom.xml");
    std::fs::write(&file, xml).unwrap();
    let (ok, out) = virsh(&["define", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let _dom = Domain(name.clone());
    let c = Cluster::start_with(t, &p("vault"), false, &["--libvirt", URI]);
    let s = c.server.client();

    // The listing says which disks are not protected and why; the CD-ROM is not a disk to back up.
    let vms: Value = s.get_json("/v1/vms").unwrap();
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap();
    assert_eq!(vm["state"], "shut_off", "{vm}");
    let why: Vec<(String, String)> = vm["unprotected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["disk"].as_str().unwrap().into(),
                u["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(
        why.iter().any(|(d, r)| d == "vdc" && r.contains("rbd")),
        "{why:?}"
    );
    assert!(
        why.iter()
            .any(|(d, r)| d == "vdb" && r.contains("no storage agent")),
        "{why:?}"
    );

    // Refused by default, naming each disk; with skip_unprotected the rest is backed up.
    let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
    assert_eq!(j["state"], "failed");
    let err = j["error"].as_str().unwrap();
    assert!(
        err.contains("vdb") && err.contains("vdc") && err.contains("skip"),
        "{err}"
    );
    let j = submit(
        &s,
        "/v1/backups",
        json!({ "vms": [name], "skip_unprotected": true }),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    let b = &j["result"]["backups"][0];
    let disks: Vec<_> = b["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["disk"].clone())
        .collect();
    assert_eq!(disks, ["vda"], "{b}");
    let warned = j["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "warn")
        .count();
    assert!(warned >= 2, "{j}");
    // The restored domain holds only the disk the backup has: never the original's others.
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": b["backup"], "as_name": format!("{name}-r"), "start": false}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["result"]["attributes"]["disks"].as_array().unwrap().len(),
        1,
        "{j}"
    );
}
