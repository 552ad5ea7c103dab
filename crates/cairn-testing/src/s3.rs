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

    /// How many objects the server holds under `prefix` of the test bucket (it keeps each
    /// object as a file: counted behind its back, without a request).
    pub fn objects(&self, prefix: &str) -> usize {
        fn walk(dir: &Path) -> usize {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        }
        walk(&self.root.join(BUCKET).join(prefix))
    }

    /// Waits (up to 30 s) until the object count under `prefix` differs from `from`: the
    /// moment to pull the plug on a backup or a GC in the middle of its writes or deletes.
    pub fn wait_for_objects_other_than(&self, prefix: &str, from: usize) {
        let t0 = Instant::now();
        while self.objects(prefix) == from && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
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

/// Garage's access key id and secret in the tests (Garage wants `GK` + 24 hex digits and 64
/// hex digits).
pub const GARAGE_ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub const GARAGE_SECRET_KEY: &str =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The Garage binary, if built (`scripts/s3-servers.sh garage`).
pub fn garage_binary() -> Option<PathBuf> {
    let p = tool_cache().join("garage-2.5.0/bin/garage");
    p.exists().then_some(p)
}

/// A Garage cluster of one or three nodes on loopback, each node its own process with its
/// own metadata and data directories, replication factor = nodes, the test bucket and key
/// made through Garage's own CLI. `None` (said loudly) when Garage is not built, unless
/// `CAIRN_REQUIRE_GARAGE=1`: Garage takes 15–50 min to build here, too long for CI's cold path.
#[derive(Debug)]
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<GarageNode>,
}

#[derive(Debug)]
struct GarageNode {
    config: PathBuf,
    s3_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .unwrap()
        .port()
}

impl Garage {
    /// Starts `n` nodes (1 or 3) under `root` and waits until the bucket takes writes.
    pub fn start(root: &Path, n: usize) -> Option<Self> {
        let Some(bin) = garage_binary() else {
            if std::env::var("CAIRN_REQUIRE_GARAGE").as_deref() == Ok("1") {
                panic!("Garage is not built: run scripts/s3-servers.sh garage");
            }
            eprintln!(
                "\n*** SKIPPED: Garage is not built in {} (scripts/s3-servers.sh garage, 15–50 min) ***\n",
                tool_cache().display()
            );
            return None;
        };
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let dir = root.join(format!("node{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let (rpc, s3) = (free_port(), free_port());
            let config = dir.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = {n}\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n",
                    d = dir.display()
                ),
            )
            .unwrap();
            nodes.push(GarageNode {
                config,
                s3_port: s3,
                child: None,
            });
        }
        let mut g = Self { bin, nodes };
        for i in 0..n {
            g.spawn(i);
        }
        g.setup();
        Some(g)
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.config.with_extension("log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        node.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", node.s3_port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage node {i} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the Garage CLI against node 0; panics with its output on failure.
    fn cli(&self, args: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let o = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[0].config)
                .args(args)
                .env("RUST_LOG", "warn")
                .output()
                .expect("run garage");
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            // The nodes take a moment to find each other and agree on the layout.
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn node_id(&self, i: usize) -> String {
        let o = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(["node", "id", "-q"])
            .output()
            .expect("garage node id");
        let s = String::from_utf8_lossy(&o.stdout);
        s.trim().to_string()
    }

    fn setup(&self) {
        let ids: Vec<String> = (0..self.nodes.len()).map(|i| self.node_id(i)).collect();
        for id in &ids[1..] {
            self.cli(&["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        self.cli(&["layout", "apply", "--version", "1"]);
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "cairn",
            GARAGE_ACCESS_KEY,
            GARAGE_SECRET_KEY,
        ]);
        self.cli(&["bucket", "create", BUCKET]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "cairn",
        ]);
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// Kills node `i` (SIGKILL, as a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its files.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// The `AWS_*` variables for node `i`.
    pub fn env(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint(i)),
            ("AWS_ACCESS_KEY_ID", GARAGE_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", GARAGE_SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
