//! Real S3 servers on loopback for the object-store tests: s3s-fs (files on disk, SigV4
//! checked), built once by `scripts/s3-servers.sh` into a cache outside the clone.
//!
//! [`S3Server::start`] returns `None` when the server is not built and the run does not
//! require it (`CAIRN_REQUIRE_S3=1`, set by `scripts/test.sh`, which builds it first): the
//! caller then says loudly that it skipped. Servers stop (by their PID) when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The credentials every test server accepts.
pub const ACCESS_KEY: &str = "cairn-test-access";
pub const SECRET_KEY: &str = "cairn-test-secret-0123456789";
/// The bucket every test server starts with.
pub const BUCKET: &str = "cairn-test";

/// The cache `scripts/s3-servers.sh` builds into.
pub fn tool_cache() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_TOOL_CACHE") {
        return p.into();
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("cairn-tools")
}

/// The s3s-fs binary, if built.
pub fn s3s_fs_binary() -> Option<PathBuf> {
    let p = tool_cache().join("s3s-fs-0.14.1/bin/s3s-fs");
    p.exists().then_some(p)
}

/// A running s3s-fs on a loopback port, serving `root` (its buckets are directories there).
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
    log: PathBuf,
}

fn required() -> bool {
    std::env::var("CAIRN_REQUIRE_S3").as_deref() == Ok("1")
}

impl S3Server {
    /// Starts s3s-fs over `root` (created, with the test bucket) or `None` (see module docs).
    pub fn start(root: &Path) -> Option<Self> {
        let Some(bin) = s3s_fs_binary() else {
            if required() {
                panic!("s3s-fs is not built: run scripts/s3-servers.sh s3s-fs");
            }
            eprintln!(
                "\n*** SKIPPED: no S3 server (s3s-fs) in {}: run scripts/s3-servers.sh s3s-fs ***\n",
                tool_cache().display()
            );
            return None;
        };
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            child: None,
            port,
            root: root.to_path_buf(),
            log: root.with_extension("log"),
        };
        s.spawn(&bin);
        Some(s)
    }

    fn spawn(&mut self, bin: &Path) {
        let log = std::fs::File::create(&self.log).expect("server log");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "s3s-fs did not listen on port {} (log {})",
                self.port,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the server keeps the objects (to damage them behind its back).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stops the server (as a crash would: SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and files.
    pub fn restart(&mut self) {
        self.stop();
        let bin = s3s_fs_binary().expect("s3s-fs built");
        self.spawn(&bin);
    }

    /// The `AWS_*` variables a `cairn` process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
