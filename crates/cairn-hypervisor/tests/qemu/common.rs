//! Helpers shared by the QEMU integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_hypervisor::{QemuCommand, QemuProcess, QmpClient, QmpOptions, find_program};

/// Returns false, after a loud notice, when `program` is missing. Panics instead when
/// `CAIRN_REQUIRE_QEMU=1`.
pub fn have(program: &str, package: &str, test: &str) -> bool {
    if find_program(program).is_some() {
        return true;
    }
    let msg = format!(
        "{program} not found: install the Debian package {package} (scripts/install-deps.sh)"
    );
    if std::env::var("CAIRN_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: {msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {msg} !!!!!!!!\n");
    false
}

pub fn have_qemu_system(test: &str) -> bool {
    have("qemu-system-x86_64", "qemu-system-x86", test)
}

/// Runs a command and returns its standard output; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn make_qcow2(path: &Path, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size));
}

/// The `-blockdev` JSON for a qcow2 file node pair.
pub fn qcow2_blockdev(node: &str, path: &Path) -> String {
    serde_json::json!({
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": path},
    })
    .to_string()
}

pub fn qmp_options() -> QmpOptions {
    QmpOptions {
        command_timeout: Duration::from_secs(20),
        ..QmpOptions::default()
    }
}

/// Spawns and connects, panicking with QEMU's log on failure.
pub async fn start(cmd: QemuCommand) -> (QemuProcess, QmpClient) {
    let mut proc = cmd.spawn().expect("spawn QEMU");
    match proc
        .connect_qmp(qmp_options(), Duration::from_secs(20))
        .await
    {
        Ok(qmp) => (proc, qmp),
        Err(e) => panic!("QMP connect: {e}\nQEMU log:\n{}", proc.read_log()),
    }
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Kills, when dropped (test end or panic), every VM a driver recorded under `state`: driver VMs
/// outlive the driver by design, so a failing test must not leave them running. Only PIDs whose
/// command line still names their QMP socket are signalled.
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(dir.path().join("vm.json")) else {
                continue;
            };
            let Ok(rec) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let (Some(pid), Some(sock)) = (rec["pid"].as_u64(), rec["qmp_socket"].as_str()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(sock.len()).any(|w| w == sock.as_bytes()) {
                eprintln!("VmReaper: killing leftover QEMU {pid}");
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
