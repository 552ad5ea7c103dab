//! A QEMU Cairn did not start, adopted by `cairn host-agent --qmp-socket DIR`: full and
//! incremental backup through the server, both restored bit-exact, and the QEMU still running
//! after a refused stop, after the host agent was killed and restarted, and until we kill it.
//! No guest OS: a `-S` QEMU whose disk is written with `qemu-io` (before) and HMP `qemu-io`
//! through a second QMP monitor of the test's own (between backups).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// The hand-started QEMU, SIGKILLed by its PID when dropped.
struct ForeignQemu {
    child: Child,
    /// The test's own monitor (Cairn's is the other one).
    monitor: PathBuf,
}

impl ForeignQemu {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// One QMP command on the test's monitor.
    fn qmp(&self, cmd: &str, args: Value) -> Value {
        let s = UnixStream::connect(&self.monitor).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut reply = |w: &mut UnixStream, msg: Option<Value>| {
            if let Some(m) = msg {
                writeln!(w, "{m}").unwrap();
            }
            loop {
                let mut line = String::new();
                assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v.get("QMP").is_some() || v.get("return").is_some() || v.get("error").is_some() {
                    return v;
                }
            }
        };
        reply(&mut w, None);
        reply(&mut w, Some(json!({"execute": "qmp_capabilities"})));
        let v = reply(&mut w, Some(json!({"execute": cmd, "arguments": args})));
        assert!(v.get("error").is_none(), "{cmd}: {v}");
        v["return"].clone()
    }

    /// Writes `len` bytes of `pattern` at `off` into the running VM's disk `vda` and flushes
    /// (so that `qemu-img -U` sees the new clusters); applies the same write to `oracle`, a
    /// raw copy of what the disk should hold.
    fn write(&self, pattern: u8, off: u64, len: u64, oracle: &Path) {
        let io = format!("write -P {pattern:#x} {off} {len}");
        for c in [io.as_str(), "flush"] {
            // A virtio-blk device's block backend hangs on its backend child, not on `vda`.
            let cmd = format!("qemu-io -d /machine/peripheral/vda/virtio-backend \"{c}\"");
            let out = self.qmp("human-monitor-command", json!({"command-line": cmd}));
            // HMP errors come back as text; qemu-io's own report goes to QEMU's stdout.
            assert_eq!(out, "", "{cmd}: {out}");
        }
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &io])
            .arg(oracle));
    }
}

impl Drop for ForeignQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The disk's guest-visible content as a raw file (`-U`: QEMU holds the image's lock).
fn raw_copy(disk: &Path, out: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(disk)
        .arg(out));
}

fn same_content(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn host_vm(host: &Service, name: &str) -> Option<Value> {
    let vms: Value = host.client().get_json("/v1/vms").unwrap();
    vms.as_array()
        .unwrap()
        .iter()
        .find(|v| v["spec"]["name"] == name)
        .cloned()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(30), "waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_qemu_started_by_hand_is_adopted_backed_up_restored_and_never_stopped() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("qemu-system-x86_64 missing");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Kills the restored (Cairn's own) VM at the end; dropped before the directory.
    let _reaper = VmReaper(t.join("host"));
    let p = |s: &str| t.join(s).display().to_string();
    for d in ["ds", "qmp"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }

    // A disk with data, then QEMU on it, started by hand with two QMP monitors.
    let disk = t.join("ds/adopt1.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(DISK.to_string()));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 4M", "-c"])
        .arg("write -P 0x22 40M 1M")
        .arg(&disk));
    let cairn_sock = t.join("qmp/adopt1.sock");
    let monitor = t.join("test-monitor.sock");
    let blockdev = json!({"driver": "qcow2", "node-name": "sys0",
        "file": {"driver": "file", "filename": disk}});
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-S", "-nodefaults", "-display", "none"])
        .args(["-M", "q35", "-m", "64", "-smp", "2", "-name", "adopt1"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", cairn_sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .args(["-blockdev", &blockdev.to_string()])
        .args(["-device", "virtio-blk-pci,id=vda,drive=sys0"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(t.join("qemu.log")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut qemu = ForeignQemu { child, monitor };
    wait_until("QEMU's sockets", || {
        cairn_sock.exists() && qemu.monitor.exists()
    });
    let qemu_pid = qemu.child.id();

    let qmp_dir = p("qmp");
    let Cluster {
        vault: _vault,
        manager,
        mut host,
        storage: _storage,
        server,
    } = Cluster::start_with(t, &p("vault"), false, &["--qmp-socket", &qmp_dir]);
    let s = server.client();

    // Listed with its origin and the spec read from QMP.
    let vm = host_vm(&host, "adopt1").expect("adopted");
    let vm_id = vm["handle"]["id"].as_str().unwrap().to_string();
    assert_eq!(vm["handle"]["origin"]["type"], "adopted", "{vm}");
    assert_eq!(vm["handle"]["pid"], qemu_pid, "{vm}");
    assert_eq!(vm["state"]["status"], "prelaunch", "{vm}");
    let spec = &vm["spec"];
    assert_eq!(
        (spec["vcpus"].as_u64(), spec["memory_mib"].as_u64()),
        (Some(2), Some(64))
    );
    assert_eq!(spec["disks"][0]["id"], "vda");
    assert_eq!(spec["disks"][0]["path"], disk.display().to_string());
    assert_eq!(spec["disks"][0]["node_name"], "sys0");
    wait_until("the server to see adopt1", || {
        let vms: Value = s.get_json("/v1/vms").unwrap();
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "adopt1")
    });

    // Stopping it is refused, by the host agent and through the manager.
    let h = host.client();
    assert_eq!(status(h.delete_json(&format!("/v1/vms/{vm_id}"))), 409);
    assert_eq!(status(manager.client().delete_json("/v1/vms/adopt1")), 409);
    assert!(qemu.running());

    // Full backup: no guest agent, vCPUs never started: nothing to quiesce.
    let j = submit(&s, "/v1/backups", json!({"vms": ["adopt1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let full = j["result"]["backups"][0].clone();
    assert_eq!(full["kind"], "full", "{full}");
    assert_eq!(full["quiesce"], "none", "{full}");
    raw_copy(&disk, &t.join("at-full.raw"));
    let oracle = t.join("at-inc.raw");
    std::fs::copy(t.join("at-full.raw"), &oracle).unwrap();

    // Writes through the running VM, then an incremental that reads only them.
    qemu.write(0x33, 8 * MIB, MIB / 2, &oracle);
    qemu.write(0x44, 63 * MIB, 64 << 10, &oracle);
    same_content(&disk, &oracle);
    let j = submit(&s, "/v1/backups", json!({"vms": ["adopt1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let inc = j["result"]["backups"][0].clone();
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(
        inc["disks"][0]["change_source"], "hypervisor_bitmap",
        "{inc}"
    );
    let read = inc["bytes_read"].as_u64().unwrap();
    assert!(
        (MIB / 2..4 * MIB).contains(&read),
        "incremental read {read} B of a {DISK} B disk: {inc}"
    );
    assert!(qemu.running());

    // Each backup restored as a new VM, bit-exact with the disk at its time; the newest one
    // is also started from the spec read from QMP.
    for (b, name, start, want) in [
        (&full, "adopt1-full", false, "at-full.raw"),
        (&inc, "adopt1-inc", true, "at-inc.raw"),
    ] {
        let j = submit(
            &s,
            "/v1/restores",
            json!({"backup": b["backup"], "as_name": name, "start": start}),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        let started = j["result"]["started"].as_bool().unwrap_or(false);
        assert_eq!(started, start, "{j}");
        same_content(&t.join(format!("ds/{name}-vda.qcow2")), &t.join(want));
    }
    let restored = host_vm(&host, "adopt1-inc").expect("restored VM");
    assert_eq!(restored["handle"]["origin"]["type"], "cairn");

    // The host agent killed and restarted: the QEMU runs on, is adopted again under the same
    // id, and its checkpoint still serves an incremental.
    host.kill();
    assert!(qemu.running());
    host.restart_same_address(&[]);
    let again = host_vm(&host, "adopt1").expect("adopted again");
    assert_eq!(again["handle"]["id"], vm_id.as_str());
    assert_eq!(again["handle"]["origin"]["type"], "adopted");
    qemu.write(0x55, 12 * MIB, 64 << 10, &oracle);
    let mut late = Value::Null;
    wait_until("the manager to see the restarted host agent", || {
        let j = submit(&s, "/v1/backups", json!({"vms": ["adopt1"]}));
        if j["state"] != "succeeded" {
            eprintln!("backup after restart: {j}");
            return false;
        }
        late = j["result"]["backups"][0].clone();
        true
    });
    assert_eq!(late["kind"], "incremental", "{late}");
    assert!(late["bytes_read"].as_u64().unwrap() < MIB, "{late}");
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": late["backup"], "as_name": "adopt1-late", "start": false}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    same_content(&t.join("ds/adopt1-late-vda.qcow2"), &oracle);
    assert!(qemu.running());
    assert_eq!(qemu.qmp("query-status", json!({}))["status"], "prelaunch");

    // The QEMU goes away: the VM shows as gone, the agent keeps serving.
    let _ = qemu.child.kill();
    let _ = qemu.child.wait();
    wait_until("the adopted VM to show as gone", || {
        host_vm(&host, "adopt1").is_some_and(|v| v["state"]["state"] == "gone")
    });
    let health: Value = host.client().get_json("/health").unwrap();
    assert_eq!(health["status"], "ok");
    eprintln!("adopt e2e: {:?}", started.elapsed());
}
