//! The migrations on a real PostgreSQL: the catalog's SQL must stay portable.
//!
//! Starts a private PostgreSQL 15 (`initdb` + `pg_ctl`, as the `postgres` user when run as
//! root) in a temp directory on a free loopback port, applies every migration with `psql`,
//! and stops the server by its pid. Fails loudly when PostgreSQL is missing and
//! `CAIRN_REQUIRE_POSTGRES=1` (set by `scripts/test.sh`); otherwise says it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

fn pg_bin() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(root).ok()?.flatten().collect();
    versions.sort_by_key(|e| e.file_name());
    versions
        .last()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command as the postgres user when we are root (initdb refuses root).
fn as_pg(bin: &Path, tool: &str) -> Command {
    let is_root = unsafe_free_uid() == 0;
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn unsafe_free_uid() -> u32 {
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

#[test]
fn migrations_apply_on_postgresql() {
    let Some(bin) = pg_bin() else {
        if std::env::var("CAIRN_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!("PostgreSQL not installed (scripts/install-deps.sh installs postgresql)");
        }
        eprintln!("SKIPPED: PostgreSQL not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    if unsafe_free_uid() == 0 {
        std::fs::create_dir(&data).unwrap();
        run(Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path()));
    }
    run(as_pg(&bin, "initdb")
        .args(["--no-sync", "-A", "trust", "-U", "cairn", "-D"])
        .arg(&data));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    run(as_pg(&bin, "pg_ctl").arg("-D").arg(&data).args([
        "-w",
        "-l",
        data.join("log").to_str().unwrap(),
        "-o",
        &format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            data.display()
        ),
        "start",
    ]));
    let pid: String = std::fs::read_to_string(data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let psql = |sql: &str| {
        Command::new(bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "cairn"])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()
            .unwrap()
    };
    let mut failures = Vec::new();
    for (version, name, sql) in cairn_catalog::MIGRATIONS {
        let out = psql(sql);
        if !out.status.success() {
            failures.push(format!(
                "migration {version} {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    // A query with the catalog's parameter style and upsert syntax.
    let out = psql(
        "INSERT INTO vms (name, created_ms) VALUES ('a', 1) ON CONFLICT (name) DO NOTHING;
         INSERT INTO vms (name, created_ms) VALUES ('a', 1) ON CONFLICT (name) DO NOTHING;
         SELECT COUNT(*) FROM vms;",
    );
    if !out.status.success() {
        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    // Stop our server by its pid.
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
