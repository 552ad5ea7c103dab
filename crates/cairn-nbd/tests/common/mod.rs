//! Helpers for the integration tests: images made with `qemu-img`/`qemu-io` in temp dirs and
//! servers (`qemu-nbd`, `qemu-storage-daemon`) that are stopped by PID when dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns whether it succeeded.
pub fn run_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A temp dir holding one qcow2 image.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    pub fn qcow2(size: u64) -> Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                path_str(&path),
                &size.to_string(),
            ],
        );
        Image { dir, path }
    }

    pub fn path(&self) -> &str {
        path_str(&self.path)
    }

    /// Runs `qemu-io` commands on the image (not while a server has it open for writing).
    pub fn io(&self, cmds: &[&str]) -> String {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(self.path());
        let out = run("qemu-io", &args);
        assert!(
            !out.contains("Pattern verification failed"),
            "qemu-io {cmds:?}: {out}"
        );
        out
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A server process, stopped (SIGTERM, then SIGKILL) by PID on drop.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Server {
    /// `qemu-nbd --socket SOCK --format=qcow2 --persistent EXTRA... FILE`.
    pub fn qemu_nbd(img: &Image, extra: &[&str]) -> Server {
        let socket = img.socket(&format!("nbd-{}.sock", extra.len()));
        let mut args: Vec<String> = vec![
            format!("--socket={}", path_str(&socket)),
            "--format=qcow2".into(),
            "--persistent".into(),
            "--shared=8".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(img.path().into());
        Self::spawn("qemu-nbd", &args, socket)
    }

    /// `qemu-nbd` listening on TCP 127.0.0.1; returns the server and its port.
    pub fn qemu_nbd_tcp(img: &Image, extra: &[&str]) -> (Server, u16) {
        // Pick a free port by binding port 0; a small race with other processes is possible.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut args: Vec<String> = vec![
            "--bind=127.0.0.1".into(),
            format!("--port={port}"),
            "--format=qcow2".into(),
            "--persistent".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(img.path().into());
        let child = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start qemu-nbd");
        let mut server = Server {
            child: Some(child),
            socket: PathBuf::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on port {port}"
            );
            if let Some(c) = server.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("qemu-nbd exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (server, port)
    }

    pub fn spawn(cmd: &str, args: &[String], socket: PathBuf) -> Server {
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}"));
        let mut server = Server {
            child: Some(child),
            socket,
        };
        server.wait_for_socket();
        server
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("server exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server socket {:?} did not appear", self.socket);
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the server gracefully so that it closes the image.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
