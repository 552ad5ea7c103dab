//! What the end-to-end tests share: service processes, the cluster of every role, guests,
//! disks, jobs and the CLI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_http::{Client, Trust};
use serde_json::Value;

pub const KERNEL_APPEND: &str = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable \
    no_timer_check lpj=4200000 8250.nr_uarts=1";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn skip_or_fail(msg: &str) -> bool {
    if std::env::var("CAIRN_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED e2e: {msg} !!!!!!!!\n");
    false
}

pub fn guest() -> Option<PathBuf> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("qemu-system-x86_64 missing");
        return None;
    }
    let dir = std::env::var_os("CAIRN_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-guest"));
    let ok = Command::new("bash")
        .arg(repo_root().join("scripts/build-test-guest.sh"))
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skip_or_fail("building the test guest failed");
        return None;
    }
    Some(dir)
}

/// What every guest test starts from: the test guest, the machine-wide lock that serialises
/// guest tests, a scratch directory, and a reaper for the VMs of the host agent state kept in
/// its `host/` (fields drop in order: VMs are killed before the directory goes).
pub struct GuestTest {
    pub guest: PathBuf,
    _reaper: VmReaper,
    pub tmp: tempfile::TempDir,
    _lock: std::fs::File,
}

/// `None` (after saying so loudly, or failing under `CAIRN_REQUIRE_QEMU=1`) without QEMU.
pub fn guest_test() -> Option<GuestTest> {
    let guest = guest()?;
    let lock = std::fs::File::create(std::env::temp_dir().join("cairn-test-guest.lock")).unwrap();
    lock.lock().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    Some(GuestTest {
        guest,
        _reaper: VmReaper(tmp.path().join("host")),
        tmp,
        _lock: lock,
    })
}

impl GuestTest {
    /// The `boot` part of a VM spec that boots the test guest.
    pub fn boot(&self) -> Value {
        serde_json::json!({
            "type": "kernel",
            "kernel": self.guest.join("vmlinux"),
            "initrd": self.guest.join("initrd.gz"),
            "append": KERNEL_APPEND,
        })
    }
}

/// A service process, stopped by its pid when dropped.
pub struct Service {
    child: Child,
    info: Value,
    args: Vec<String>,
    /// The certificate test clients present (an operator's, in a mutual-TLS cluster).
    pub me: Option<cairn_http::tls::Identity>,
}

impl Service {
    pub fn start(args: &[&str]) -> Self {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{args:?}: first line {line:?}: {e}"));
        Self {
            child,
            info,
            args: args.iter().map(|a| a.to_string()).collect(),
            me: None,
        }
    }

    /// Starts the same command again (after [`Self::stop`] or [`Self::kill`]).
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        let args = self.args.clone();
        let me = self.me.take();
        *self = Self::start_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env);
        self.me = me;
    }

    /// Starts the same command again on the address it listened on, so that peers
    /// configured with its URL find it again.
    pub fn restart_same_address(&mut self, env: &[(&str, &str)]) {
        let listen = self
            .url()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                if a == "127.0.0.1:0" {
                    listen.clone()
                } else {
                    a.clone()
                }
            })
            .collect();
        let t0 = Instant::now();
        loop {
            // The old socket may linger for a moment after the process died.
            if std::net::TcpListener::bind(&listen).is_ok()
                || t0.elapsed() > Duration::from_secs(10)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut s = Self::start_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env);
        s.args = self.args.clone();
        s.me = self.me.take();
        *self = s;
    }

    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> &str {
        self.info["listen"].as_str().unwrap()
    }

    pub fn fp(&self) -> &str {
        self.info["fingerprint"].as_str().unwrap()
    }

    /// The flags that point another role at this service: `--ROLE URL --ROLE-fingerprint FP
    /// --ROLE-token-file FILE`.
    pub fn flags_for(&self, role: &str) -> Vec<String> {
        vec![
            format!("--{role}"),
            self.url().into(),
            format!("--{role}-fingerprint"),
            self.fp().into(),
            format!("--{role}-token-file"),
            self.token_file().into(),
        ]
    }

    pub fn token_file(&self) -> &str {
        self.info["token_file"].as_str().unwrap()
    }

    pub fn client(&self) -> Client {
        let token = std::fs::read_to_string(self.token_file()).unwrap();
        Client::with_identity(
            self.url(),
            token.trim(),
            &Trust::Fingerprint(self.fp().into()),
            self.me.as_ref(),
        )
        .unwrap()
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the QEMU processes a host agent state directory records (VMs outlive their agent).
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        for dir in std::fs::read_dir(self.0.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(dir.path().join("vm.json")) else {
                continue;
            };
            let rec: Value = serde_json::from_str(&text).unwrap_or_default();
            let (Some(pid), Some(sock)) = (rec["pid"].as_u64(), rec["qmp_socket"].as_str()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(sock.len()).any(|w| w == sock.as_bytes()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

pub fn disk(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), format!("hello from {name}\n")).unwrap();
    let raw = dir.join(format!("{name}.raw"));
    assert!(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&src)
            .arg(&raw)
            .arg("32M")
            .status()
            .unwrap()
            .success()
    );
    let out = dir.join("ds").join(format!("{name}.qcow2"));
    assert!(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out)
            .status()
            .unwrap()
            .success()
    );
    out
}

/// 200 KiB of text: what [`lvm_luks_disk`] puts zstd-compressed on its btrfs volume.
pub fn big_text() -> String {
    (0..4000)
        .map(|i| format!("line {i:05} of a compressible file\n"))
        .collect()
}

/// A second disk for the file catalog's coverage, made by the real tools: GPT; on `p1` an
/// LVM physical volume whose linear logical volume `VG/files` holds XFS with `lvm.txt`; on
/// `p2` a LUKS2 volume; on `p3` btrfs (zstd) with `btrfs.txt` and the compressed `big.txt`. lvm2 runs with activation off
/// (device-mapper is missing here), so XFS is made in a file and copied to where `pvs` says
/// the LV starts; cryptsetup formats a plain file. Converted to qcow2 in the datastore.
pub fn lvm_luks_disk(dir: &Path, name: &str) -> PathBuf {
    let sh = |script: &str| {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            // mkfs.xfs refuses volumes under 300 MB unless run as by its own test suite.
            .env("TEST_DIR", "/tmp")
            .env("TEST_DEV", "/dev/null")
            .env("QA_CHECK_FS", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let raw = dir.join(format!("{name}.raw"));
    let src = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(src.join("x")).unwrap();
    std::fs::create_dir_all(src.join("b")).unwrap();
    std::fs::write(src.join("x/lvm.txt"), "inside a logical volume\n").unwrap();
    std::fs::write(src.join("b/btrfs.txt"), "on btrfs\n").unwrap();
    // Compressible: mkfs.btrfs --compress stores it as zstd extents.
    std::fs::write(src.join("b/big.txt"), big_text()).unwrap();
    let vg = format!("cairne{}", std::process::id());
    // p1: 24 MiB from 1 MiB; p2: 16 MiB; p3: 112 MiB (mkfs.btrfs grows its image to its
    // minimum, ~109 MiB).
    let (p1, p2, p3) = (1u64 << 20, 25u64 << 20, 41u64 << 20);
    let script = format!(
        r#"truncate -s 160M {raw}
printf 'label: gpt\nstart=2048, size=49152\nstart=51200, size=32768\nstart=83968, size=229376\n' | sfdisk -q {raw}
dev=$(losetup -f --show -o {p1} --sizelimit $((24<<20)) {raw})
trap 'losetup -d $dev' EXIT
cfg="global {{ activation = 0 }} backup {{ backup = 0 archive = 0 }} devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0 filter = [ \"a|^$dev\$|\", \"r|.*|\" ] }}"
pvcreate --config "$cfg" -q -ff -y $dev >/dev/null
vgcreate --config "$cfg" -q {vg} $dev >/dev/null
lvcreate --config "$cfg" -q -an -Zn -l 100%FREE -n files {vg} >/dev/null 2>&1
pvs --config "$cfg" --noheadings -o pe_start --units b --nosuffix $dev"#,
        raw = raw.display()
    );
    let pe_start: u64 = sh(&script).trim().parse().unwrap();
    // The LV is linear from the PV's first extent (20 MiB): XFS goes right there.
    let d = dir.display();
    sh(&format!(
        "printf '/dev/null\\n0 0\\nd--755 0 0\\n lvm.txt ---644 0 0 {src}/x/lvm.txt\\n$\\n' > {d}/{name}.proto
         truncate -s 20M {d}/{name}.xfs && mkfs.xfs -q -f -p {d}/{name}.proto {d}/{name}.xfs
         dd if={d}/{name}.xfs of={raw} bs=1M seek={seek} conv=notrunc,sparse status=none",
        src = src.display(),
        raw = raw.display(),
        seek = (p1 + pe_start) >> 20
    ));
    let luks = dir.join(format!("{name}.luks"));
    sh(&format!(
        "truncate -s 16M {l} && echo -n secret | cryptsetup luksFormat -q --type luks2 \
         --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file - {l} && \
         dd if={l} of={raw} bs=1M seek={seek} conv=notrunc status=none",
        l = luks.display(),
        raw = raw.display(),
        seek = p2 >> 20
    ));
    sh(&format!(
        "truncate -s 112M {d}/{name}.btrfs && mkfs.btrfs -q -f --compress zstd --rootdir {src}/b {d}/{name}.btrfs \
         && dd if={d}/{name}.btrfs of={raw} bs=1M seek={seek} conv=notrunc,sparse status=none",
        src = src.display(),
        raw = raw.display(),
        seek = p3 >> 20
    ));
    let out = dir.join("ds").join(format!("{name}.qcow2"));
    assert!(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out)
            .status()
            .unwrap()
            .success()
    );
    out
}

pub fn wait_job(c: &Client, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let j: Value = c.get_json(&format!("/v1/jobs/{id}")).unwrap();
        if matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "job {id} hangs: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn submit(c: &Client, path: &str, body: Value) -> Value {
    let j: Value = c.post_json(path, &body).unwrap();
    wait_job(c, j["id"].as_str().unwrap())
}

pub fn status(r: Result<Value, cairn_http::ClientError>) -> u16 {
    match r {
        Err(cairn_http::ClientError::Api { status, .. }) => status,
        Err(e) => panic!("{e}"),
        Ok(v) => panic!("unexpected success: {v}"),
    }
}

pub fn cli(conn: &Path, args: &[&str]) -> (bool, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--connect")
        .arg(conn)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() && serde_json::from_slice::<Value>(&out.stdout).is_err() {
        // A refused command: its message is on stderr.
        return (
            false,
            Value::String(String::from_utf8_lossy(&out.stderr).into_owned()),
        );
    }
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "cairn {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

/// Every role in its own process: vault, manager, host agent `h1` and storage agent `s1`
/// (registered, heartbeating every second, stale after 3 s), and the server.
pub struct Cluster {
    pub vault: Service,
    pub manager: Service,
    pub host: Service,
    pub storage: Service,
    pub server: Service,
}

impl Cluster {
    pub fn start(t: &Path, vault_repo: &str, save_state: bool) -> Self {
        Self::start_with(t, vault_repo, save_state, &[])
    }

    /// [`Self::start`] with `host_args` added to the host agent's command line.
    pub fn start_with(t: &Path, vault_repo: &str, save_state: bool, host_args: &[&str]) -> Self {
        Self::start_opts(t, vault_repo, save_state, host_args, None, false)
    }

    /// [`Self::start`] over an encrypted vault: the repository is created with
    /// `repo init --encrypt` and a new key file at `key`, which only the storage agent gets
    /// (the vault service stores ciphertext; the server never reads data).
    ///
    /// Every call between the services uses mutual TLS: the server's CA is made first, the
    /// vault and the manager get certificates from it (`cairn ca issue`), the agents join with
    /// single-use tokens, and each service refuses callers without a certificate of the CA.
    /// Test clients present an operator's certificate ([`Service::me`]).
    pub fn start_encrypted(t: &Path, vault_repo: &str, save_state: bool, key: &Path) -> Self {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("--key-file")
            .arg(key)
            .args(["repo", "init", "--encrypt", vault_repo])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start_opts(t, vault_repo, save_state, &[], Some(key), true)
    }

    /// The server's CA directory, and a certificate for `id` issued by it into `t/id-NAME`.
    pub fn issue(t: &Path, id: &str) -> cairn_http::tls::Identity {
        let out = t.join(format!("id-{}", id.replace('/', "-")));
        let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["ca", "issue", "--state-dir"])
            .arg(t.join("server"))
            .arg(id)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        cairn_http::tls::Identity {
            cert_path: out.join("cert.pem"),
            key_path: out.join("key.pem"),
        }
    }

    /// A join token for `id` from the server's CA.
    pub fn join_token(t: &Path, id: &str) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["ca", "join-token", "--state-dir"])
            .arg(t.join("server"))
            .arg(id)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// The `--cert --key --client-ca --crl` flags of a service with `id`'s certificate.
    fn mutual_flags(t: &Path, id: &str) -> Vec<String> {
        let me = Self::issue(t, id);
        let ca = t.join("server/ca");
        [
            "--cert".into(),
            me.cert_path.display().to_string(),
            "--key".into(),
            me.key_path.display().to_string(),
            "--client-ca".into(),
            ca.join("ca.pem").display().to_string(),
            "--crl".into(),
            ca.join("crl.pem").display().to_string(),
        ]
        .to_vec()
    }

    fn start_opts(
        t: &Path,
        vault_repo: &str,
        save_state: bool,
        host_args: &[&str],
        vault_key: Option<&Path>,
        mutual: bool,
    ) -> Self {
        let p = |s: &str| t.join(s).display().to_string();
        let operator = mutual.then(|| Self::issue(t, "operator/e2e"));
        let flags = |id: &str| {
            if mutual {
                Self::mutual_flags(t, id)
            } else {
                Vec::new()
            }
        };
        let start = |mut args: Vec<String>, extra: Vec<String>| {
            args.extend(extra);
            let mut s = Service::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
            s.me = operator.clone();
            s
        };
        // A short session lease: a client killed mid-backup frees its session in seconds.
        let vault = start(
            [
                "vault",
                "--repo",
                vault_repo,
                "--listen",
                "127.0.0.1:0",
                "--session-lease",
                "5",
            ]
            .map(String::from)
            .to_vec(),
            flags("vault/v"),
        );
        let manager = start(
            [
                "manager",
                "--state-dir",
                &p("manager"),
                "--listen",
                "127.0.0.1:0",
                "--stale-after-s",
                "3",
            ]
            .map(String::from)
            .to_vec(),
            flags("manager/m"),
        );
        // The server before the agents: they join its CA.
        let server_state = p("server");
        let mut args: Vec<String> = [
            "server",
            "--state-dir",
            &server_state,
            "--listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(manager.flags_for("manager"));
        args.extend(vault.flags_for("vault"));
        if !save_state {
            args.push("--no-state".into());
        }
        let server = start(args, Vec::new());
        let agent = |mut args: Vec<String>, id: &str| {
            let name = id.split_once('/').unwrap().1;
            args.extend(manager.flags_for("manager"));
            args.extend(["--heartbeat-s", "1", "--name", name].map(String::from));
            let join = if mutual {
                vec![
                    "--join".into(),
                    server.url().into(),
                    "--join-token".into(),
                    Self::join_token(t, id),
                    "--join-fingerprint".into(),
                    server.fp().into(),
                ]
            } else {
                Vec::new()
            };
            start(args, join)
        };
        let mut host_cmd: Vec<String> = [
            "host-agent",
            "--state-dir",
            &p("host"),
            "--listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        host_cmd.extend(host_args.iter().map(|a| a.to_string()));
        let host = agent(host_cmd, "host/h1");
        let mut storage_cmd: Vec<String> = [
            "storage-agent",
            "--state-dir",
            &p("storage"),
            "--listen",
            "127.0.0.1:0",
            "--datastore",
            &format!("ds={}", p("ds")),
        ]
        .map(String::from)
        .to_vec();
        if let Some(k) = vault_key {
            storage_cmd.extend(["--vault-key-file".into(), k.display().to_string()]);
        }
        let storage = agent(storage_cmd, "storage/s1");
        Self {
            vault,
            manager,
            host,
            storage,
            server,
        }
    }
}

/// Mounts a tmpfs of `size` (`24m`) on `dir`, to fill up in a full-disk case; root only.
/// Without it the case named `what` is skipped, loudly.
pub fn small_tmpfs(dir: &Path, size: &str, what: &str) -> Option<Unmount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("!!!!!!!! e2e: cannot mount a tmpfs (not root?): {what} is SKIPPED !!!!!!!!");
    }
    ok.then(|| Unmount(dir.to_path_buf()))
}

/// Unmounts a tmpfs we mounted.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        // Lazy: a service of the test may still hold files there (a plain umount then fails
        // with EBUSY and the mount outlives the test); the kernel frees it once they close.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Length of the JSON list a GET of `path` answers.
pub fn list_len(c: &Client, path: &str) -> usize {
    c.get_json::<Value>(path)
        .unwrap()
        .as_array()
        .unwrap_or_else(|| panic!("{path} did not answer a list"))
        .len()
}

pub fn host_snapshots(host: &Service) -> usize {
    list_len(&host.client(), "/v1/snapshots")
}

/// Runs `shell` in the guest of `vm` through the manager; the guest agent's answer.
pub fn guest_exec(m: &Client, vm: &str, shell: &str) -> Value {
    m.post_json(
        &format!("/v1/vms/{vm}/guest/exec"),
        &serde_json::json!({ "shell": shell }),
    )
    .unwrap()
}

/// Waits until the job holds a VM snapshot (the fault hook keeps it there).
pub fn wait_hold(s: &Client, id: &str) {
    let t0 = Instant::now();
    loop {
        let j: Value = s.get_json(&format!("/v1/jobs/{id}")).unwrap();
        if j["holds"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["type"] == "vm_snapshot"))
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "job {id} never held a snapshot: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 2 minutes) until the VM's guest agent answers through the manager.
pub fn wait_guest(m: &Client, vm: &str) {
    let t0 = Instant::now();
    while m.get_json::<Value>(&format!("/v1/vms/{vm}/guest")).unwrap()["agent"] != true {
        assert!(t0.elapsed() < Duration::from_secs(120), "{vm} did not boot");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// SIGKILLs the QEMU of `vm`, found through the host agent's record of it under `t/host`.
pub fn kill_qemu(t: &Path, vm: &str) {
    let quoted = format!("\"{vm}\"");
    let rec: Value = std::fs::read_dir(t.join("host/vms"))
        .unwrap()
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("vm.json")).ok())
        .find(|text| text.contains(&quoted))
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap_or_else(|| panic!("no QEMU for {vm}"));
    let pid = rec["pid"].as_u64().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits until `vm` is seen stopped, then defines it again from `spec` on host h1 and waits
/// for its guest: an operator starting a VM again on its disk.
pub fn start_again(m: &Client, vm: &str, spec: &Value) {
    let t0 = Instant::now();
    while m.get_json::<Value>(&format!("/v1/vms/{vm}")).unwrap()["state"] == "running" {
        assert!(t0.elapsed() < Duration::from_secs(30), "{vm} still running");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _: Value = m.delete_json(&format!("/v1/vms/{vm}")).unwrap();
    let _: Value = m.post_json("/v1/hosts/h1/vms", spec).unwrap();
    wait_guest(m, vm);
}
