//! Fixtures: random images, qemu-img helpers, loop-mounted XFS/btrfs, a vault service in
//! another process (the `cairn` binary).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cairn_vault::{InitOptions, LocalVault, Repository};
use rand::{RngCore, SeedableRng};

/// The NBD runtimes of this test binary (a binary's job; tests build their own): two, as
/// for an agent backing up two disks at once, shared by every test and never shut down.
pub fn nbd() -> cairn_storage::NbdRuntime {
    static RT: std::sync::OnceLock<cairn_storage::NbdRuntime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let handles = (0..2).map(|_| {
            let rt = cairn_storage::NbdRuntime::builder()
                .build()
                .expect("NBD runtime");
            let h = rt.handle().clone();
            // Never dropped: the tests' connections may outlive any one test.
            std::mem::forget(rt);
            h
        });
        cairn_storage::NbdRuntime::new(handles).expect("multi-thread runtimes")
    })
    .clone()
}

/// An agent with one datastore `ds` at `datastore`, its state under `dir`.
pub fn agent(dir: &Path, datastore: &Path) -> cairn_storage::StorageAgent {
    cairn_storage::StorageAgent::new(
        cairn_storage::AgentConfig {
            datastores: vec![cairn_storage::DatastoreConfig {
                name: "ds".into(),
                path: datastore.to_path_buf(),
            }],
            state_dir: dir.join("agent-state"),
            parallel: 2,
            vault_key_file: None,
        },
        nbd(),
    )
}

/// A backup request with the cross-check on.
pub fn req(
    name: &str,
    parent: Option<&str>,
    hints: Vec<cairn_storage::ChangeHint>,
) -> cairn_storage::BackupRequest {
    cairn_storage::BackupRequest {
        name: name.into(),
        parent: parent.map(Into::into),
        hints,
        cross_check: Some(cairn_storage::CrossCheck::default()),
        threads: 2,
        ..Default::default()
    }
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Random data with zero runs and repetitive text, `len` bytes.
pub fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, block) in v.chunks_mut(1 << 20).enumerate() {
        match i % 4 {
            0 | 3 => rng.fill_bytes(block),
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"cairn storage agent "[j % 20]),
            _ => {}
        }
    }
    v
}

pub fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Overwrites `len` bytes at `off` with random data (seeded), fsyncs.
pub fn scribble(path: &Path, off: u64, len: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = vec![0u8; len];
    rng.fill_bytes(&mut b);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

pub fn qcow2_from_raw(raw: &Path, out: &Path) {
    sh(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
}

/// The guest view of an image (or of an internal snapshot) as raw bytes.
pub fn guest_bytes(img: &Path, fmt: &str, snapshot: Option<&str>, scratch: &Path) -> Vec<u8> {
    let out = scratch.join(format!("guest-{}.raw", rand::random::<u32>()));
    let mut args = vec!["convert", "-q", "-U", "-f", fmt, "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.extend(["-l", l.as_str()]);
    }
    args.extend([img.to_str().unwrap(), out.to_str().unwrap()]);
    sh("qemu-img", &args);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

pub fn qemu_io_write(img: &Path, pattern: u8, off: u64, len: u64) {
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {off} {len}"),
            img.to_str().unwrap(),
        ],
    );
}

pub fn local_vault(dir: &Path) -> LocalVault {
    LocalVault {
        repo: Repository::init_dir(&dir.join("repo"), &InitOptions::default()).unwrap(),
    }
}

/// A loop-mounted file system in a temp dir; unmounted (and its loop device freed) on drop.
pub struct Mounted {
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    /// `kind` is `xfs` or `btrfs`. Fails loudly if the tools or the mount are missing.
    pub fn new(kind: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(320 << 20).unwrap();
        drop(f);
        let mkfs = format!("mkfs.{kind}");
        let out = Command::new(&mkfs).args(["-q", img.to_str().unwrap()]).output().unwrap_or_else(|e| {
            panic!("{mkfs} is missing ({e}): apt-get -o DPkg::Lock::Timeout=600 install -y xfsprogs btrfs-progs")
        });
        assert!(
            out.status.success(),
            "{mkfs}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot loop-mount {kind} (root and loop devices needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { mnt, _dir: dir }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // `mount -o loop` sets autoclear: unmounting frees the loop device.
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn new(file: &Path) -> Self {
        let dev = sh("losetup", &["--find", "--show", file.to_str().unwrap()])
            .trim()
            .to_string();
        Self { dev: dev.into() }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The `cairn` binary, built if needed (same target directory as this test).
pub fn cairn_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = debug.join("cairn");
    if !bin.exists() {
        let target = debug.parent().unwrap();
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "cairn-cli"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(st.success(), "building cairn-cli failed");
    }
    assert!(bin.exists(), "no cairn binary at {}", bin.display());
    bin
}

/// A vault service in another process.
pub struct VaultProc {
    pub child: Child,
    pub url: String,
    pub fingerprint: String,
    pub token: String,
    pub repo: PathBuf,
}

impl VaultProc {
    pub fn start(dir: &Path) -> Self {
        let repo = dir.join("vault-repo");
        let mut child = Command::new(cairn_bin())
            .args([
                "vault",
                "--repo",
                repo.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("vault said {line:?}: {e}"));
        let token = std::fs::read_to_string(v["token_file"].as_str().unwrap())
            .unwrap()
            .trim()
            .to_string();
        Self {
            child,
            url: v["listen"].as_str().unwrap().to_string(),
            fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
            token,
            repo,
        }
    }

    pub fn connect(&self) -> cairn_vault::remote::RemoteVault {
        cairn_vault::remote::RemoteVault::connect(
            &self.url,
            &self.token,
            &cairn_http::Trust::Fingerprint(self.fingerprint.clone()),
        )
        .unwrap()
    }

    pub fn client(&self) -> cairn_http::Client {
        cairn_http::Client::new(
            &self.url,
            &self.token,
            &cairn_http::Trust::Fingerprint(self.fingerprint.clone()),
        )
        .unwrap()
    }
}

impl Drop for VaultProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
