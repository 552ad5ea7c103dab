//! A private PostgreSQL server on loopback for the catalog tests: `initdb` in a temp
//! directory (as the `postgres` user when run as root: initdb refuses root), `pg_ctl start`
//! on a free port, trust authentication for the user `cairn`, durability off (`fsync`,
//! `full_page_writes`) since the data dies with the test.
//!
//! [`PgServer::start`] returns `None` when PostgreSQL is not installed and the run does not
//! require it (`CAIRN_REQUIRE_POSTGRES=1`, set by `scripts/test.sh`, which installs it): the
//! caller then says loudly that it skipped.
//!
//! **Never leaked.** A server is stopped by its PID when dropped. Each server also has a
//! watchdog, started before `initdb`: a `sh` that blocks reading a pipe only this process
//! holds open. When the test process ends in any way (a panic, `exit`, SIGKILL, even while
//! the server is being created) the pipe closes without a line, and the watchdog stops the
//! server by the PID in its pid file and removes its directory; a line tells it to leave. That is what stops the one server per test
//! binary ([`PgServer::shared`]), which lives in a `static` and is never dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The user every test server trusts.
pub const USER: &str = "cairn";

/// The newest installed PostgreSQL's `bin` directory.
pub fn pg_bin() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(root).ok()?.flatten().collect();
    versions.sort_by_key(|e| {
        e.file_name()
            .to_str()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .last()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
}

fn required() -> bool {
    std::env::var("CAIRN_REQUIRE_POSTGRES").as_deref() == Ok("1")
}

fn uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tool` of the PostgreSQL in `bin`, as the `postgres` user when we are root.
fn as_pg(bin: &Path, tool: &str) -> Command {
    if uid() == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Starts the postmaster of `dir/data` on `port`; its PID.
fn start_postmaster(bin: &Path, dir: &Path, port: u16) -> u32 {
    let data = dir.join("data");
    run(as_pg(bin, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .args(["-w", "-o"])
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off",
            dir.display()
        ))
        .arg("start"));
    std::fs::read_to_string(data.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("postmaster pid")
}

/// The watchdog of a server (see the module doc).
#[derive(Debug)]
struct Watchdog {
    child: Child,
    /// Holding it open keeps the watchdog waiting.
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Tells the watchdog to leave without stopping anything, and reaps it.
    fn dismiss(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"\n");
        }
        let _ = self.child.wait();
    }
}

/// Starts the watchdog of the server in `dir`.
fn watchdog(dir: &Path) -> Watchdog {
    // It ignores the terminal's signals: a ^C of the test run must not end it before the
    // server, which pg_ctl put in a session of its own. A server still being created or
    // started when the test died is waited for (`dat[a]` keeps pgrep from matching this
    // script), then stopped by the PID in its pid file.
    let script = format!(
        r#"trap '' INT TERM HUP
read -r _ && exit 0
d='{dir}'
i=0
while [ ! -f "$d/data/postmaster.pid" ] && [ $i -lt 300 ] \
    && pgrep -f -- "-D $d/dat[a]" >/dev/null; do sleep 0.1; i=$((i+1)); done
pid=$(head -n 1 "$d/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ]; then
    kill -INT "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
fi
rm -rf "$d""#,
        dir = dir.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the PostgreSQL watchdog");
    Watchdog {
        pipe: child.stdin.take(),
        child,
    }
}

/// A running PostgreSQL (see the module doc).
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    pid: u32,
    watchdog: Watchdog,
}

impl PgServer {
    /// Starts a server of its own, or `None` (see the module doc).
    pub fn start() -> Option<Self> {
        let Some(bin) = pg_bin() else {
            if required() {
                panic!("PostgreSQL is not installed (scripts/install-deps.sh installs postgresql)");
            }
            eprintln!("\n*** SKIPPED: PostgreSQL is not installed: its tests did not run ***\n");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("cairn-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let watchdog = watchdog(&dir);
        if uid() == 0 {
            run(Command::new("chown").arg("postgres").arg(&dir));
        }
        run(as_pg(&bin, "initdb")
            .args(["--no-sync", "-A", "trust", "-U", USER, "-E", "UTF8"])
            .args(["--locale=C", "-D"])
            .arg(dir.join("data")));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .unwrap()
            .port();
        let pid = start_postmaster(&bin, &dir, port);
        Some(Self {
            bin,
            dir,
            port,
            pid,
            watchdog,
        })
    }

    /// The one server of this test binary, started on first use and stopped when the
    /// process ends (by the watchdog), or `None` (see the module doc).
    pub fn shared() -> Option<&'static PgServer> {
        static SHARED: OnceLock<Option<PgServer>> = OnceLock::new();
        SHARED.get_or_init(PgServer::start).as_ref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PID of the postmaster.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with `psql` in database `db`; its output (unaligned, tuples only), or the
    /// error message.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args([
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-X",
                "-q",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A new empty database (`test_N`), its URL.
    pub fn fresh_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url(&name)
    }

    /// Restarts the server (fast shutdown: clients are disconnected), same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server (fast shutdown: clients are disconnected); [`Self::start_again`]
    /// brings it back.
    pub fn stop(&mut self) {
        self.stop_server();
    }

    /// Starts a stopped server again, same port and data.
    pub fn start_again(&mut self) {
        // The watchdog reads the new PID from the pid file when it needs it.
        self.pid = start_postmaster(&self.bin, &self.dir, self.port);
    }

    /// Stops the server by its PID (fast shutdown) and waits until it is gone.
    fn stop_server(&self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status();
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{}", self.pid)).exists()
            && t0.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.watchdog.dismiss();
    }
}
