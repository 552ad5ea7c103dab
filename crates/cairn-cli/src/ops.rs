//! The operator's commands over the server's REST API: `vm list`, `backup`, `backups`,
//! `restore`, `job`, `schedule`, `retention`, `prune`, `stats`. Every command takes `--json`
//! for scripts; waiting commands show the job's events as they happen.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_api::client::FindFiles;
use cairn_api::server::{
    JobRecord, JobState, PutSchedule, RestoreFileInto, RestoreFileIntoGuest, RestoreParams,
    Retention, StartBackup, StartPrune,
};
use cairn_api::{ServerApi, ServerClient};
use cairn_http::Trust;
use serde::{Deserialize, Serialize};

/// `connection.json`, written by `cairn server` / `cairn all-in-one`: how to reach the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub url: String,
    /// SHA-256 of the server's certificate (hex).
    pub fingerprint: String,
    pub token_file: PathBuf,
}

impl Connection {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "no server connection: {} (use --connect or --server)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
    }

    /// A client of the server, with the token read from `token_file`.
    pub fn client(&self) -> Result<ServerClient> {
        let tf = &self.token_file;
        let token =
            std::fs::read_to_string(tf).with_context(|| format!("reading {}", tf.display()))?;
        Ok(ServerClient::new(
            &self.url,
            token.trim(),
            &Trust::Fingerprint(self.fingerprint.clone()),
        )?)
    }
}

/// How to reach the server.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// A `connection.json` written by `cairn server` / `cairn all-in-one` (url, fingerprint,
    /// token file).
    #[arg(long, global = true, env = "CAIRN_CONNECT")]
    connect: Option<PathBuf>,
    /// The server's URL (instead of --connect).
    #[arg(long, global = true, env = "CAIRN_SERVER")]
    server: Option<String>,
    #[arg(long, global = true, env = "CAIRN_SERVER_FINGERPRINT")]
    server_fingerprint: Option<String>,
    /// The token file of the server (or, for `repo` and `image` commands on a vault URL, of
    /// the vault service).
    #[arg(long, global = true, env = "CAIRN_SERVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A certificate (from `cairn ca issue operator/NAME`) to present to services that
    /// require mutual TLS, with --client-key.
    #[arg(
        long,
        global = true,
        env = "CAIRN_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    #[arg(
        long,
        global = true,
        env = "CAIRN_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// One JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// A key file that opens an encrypted repository (instead of the passphrase in
    /// CAIRN_PASSWORD); with `repo init --encrypt`, where to write the first one.
    #[arg(long, global = true, env = "CAIRN_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl Conn {
    /// `--token-file` if it was given on the command line (not from its variable).
    pub fn token_file_given(&self, m: &clap::ArgMatches) -> Option<PathBuf> {
        (m.value_source("token_file") == Some(clap::parser::ValueSource::CommandLine))
            .then(|| self.token_file.clone())
            .flatten()
    }

    pub fn client(&self) -> Result<ServerClient> {
        let c = match (&self.server, &self.connect) {
            (Some(u), _) => Connection {
                url: u.clone(),
                fingerprint: self
                    .server_fingerprint
                    .clone()
                    .context("--server needs --server-fingerprint")?,
                token_file: self
                    .token_file
                    .clone()
                    .context("--server needs --token-file")?,
            },
            (None, c) => Connection::read(
                &c.clone()
                    .unwrap_or_else(|| PathBuf::from("/var/lib/cairn/server/connection.json")),
            )?,
        };
        c.client()
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// VMs the manager knows, with their backups.
    List,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCmd {
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    Show {
        id: String,
    },
    Cancel {
        id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCmd {
    /// Back VMs up every interval (`30m`, `6h`, `1d`).
    Set {
        name: String,
        #[arg(long)]
        every: String,
        #[arg(long)]
        group: bool,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    List,
    Rm {
        name: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum RetentionCmd {
    /// Set the retention of a VM (`*` for the default).
    Set {
        vm: String,
        #[arg(long)]
        keep_last: Option<i64>,
        #[arg(long)]
        keep_daily: Option<i64>,
        #[arg(long)]
        keep_weekly: Option<i64>,
        #[arg(long)]
        keep_monthly: Option<i64>,
    },
    Show {
        vm: String,
    },
}

/// Prints `v` as one JSON document with `--json`, else as `human` says.
fn out<T: Serialize>(conn: &Conn, v: &T, human: impl FnOnce(&T)) -> Result<()> {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human(v);
    }
    Ok(())
}

/// Pretty JSON for the human output of answers without a table.
fn pretty<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn ago(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(t) => {
            let s = (cairn_types::now_ms() - t) / 1000;
            match s {
                s if s < 120 => format!("{s} s ago"),
                s if s < 7200 => format!("{} min ago", s / 60),
                s => format!("{} h ago", s / 3600),
            }
        }
    }
}

pub fn vm(conn: &Conn, _c: VmCmd) -> Result<ExitCode> {
    let v = conn.client()?.vms()?;
    out(conn, &v, |v| {
        println!(
            "{:<16} {:<12} {:<8} {:<10} {:>7} LAST BACKUP",
            "VM", "HOST", "FROM", "STATE", "BACKUPS"
        );
        for x in v {
            println!(
                "{:<16} {:<12} {:<8} {:<10} {:>7} {}",
                x.name,
                x.host.as_deref().unwrap_or("-"),
                x.origin.as_ref().map_or("-", |o| o.kind()),
                x.state.as_str(),
                x.backups,
                ago(x.last_backup_ms)
            );
            for u in &x.unprotected {
                println!("  not protected: {}: {}", u.disk, u.reason);
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Polls a job until it ends, printing new events on stderr; returns the final job.
pub fn wait_job(c: &dyn ServerApi, id: &str, show: bool) -> Result<JobRecord> {
    let mut seen = 0;
    loop {
        let j = c.job(id)?;
        if show {
            for e in j.events.iter().flatten().skip(seen) {
                eprintln!("  [{}] {}", e.level, e.message);
                seen += 1;
            }
        }
        if j.state.is_final() {
            return Ok(j);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn finish(conn: &Conn, c: &dyn ServerApi, job: JobRecord, wait: bool) -> Result<ExitCode> {
    if !wait {
        out(conn, &job, |j| println!("job {} queued", j.id))?;
        return Ok(ExitCode::SUCCESS);
    }
    if !conn.json {
        eprintln!("job {} ({})", job.id, job.kind);
    }
    let j = wait_job(c, &job.id, !conn.json)?;
    let ok = j.state == JobState::Succeeded;
    out(conn, &j, |j| {
        if ok {
            println!("job {} succeeded", j.id);
            if let Some(r) = &j.result {
                pretty(r);
            }
        } else {
            println!(
                "job {} {}: {}",
                j.id,
                j.state,
                j.error.as_deref().unwrap_or("")
            );
        }
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn backup(conn: &Conn, r: StartBackup, no_wait: bool) -> Result<ExitCode> {
    let c = conn.client()?;
    let job = c.start_backup(&r)?;
    finish(conn, &c, job, !no_wait)
}

pub fn backups(conn: &Conn, vm: Option<String>) -> Result<ExitCode> {
    let v = conn.client()?.backups(vm.as_deref())?;
    out(conn, &v, |v| {
        println!(
            "{:<17} {:<14} {:<12} {:<8} {:>9} {:>12} {:>11} WHEN",
            "BACKUP", "VM", "KIND", "GROUP", "DURATION", "SENT", "SNAPSHOT"
        );
        for b in v {
            println!(
                "{:<17} {:<14} {:<12} {:<8} {:>7}ms {:>12} {:>9}ms {}",
                b.id,
                b.vm,
                b.kind.as_str(),
                b.group_id
                    .as_deref()
                    .map(|g| &g[..g.len().min(8)])
                    .unwrap_or("-"),
                b.duration_ms,
                b.bytes_sent,
                b.vm_snapshot_lifetime_ms,
                ago(Some(b.created_ms))
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
/// `cairn restore VM --backup ID --as NAME`: `p` without its backup, filled in here.
pub fn restore(
    conn: &Conn,
    vm: &str,
    backup: &str,
    mut p: RestoreParams,
    no_wait: bool,
) -> Result<ExitCode> {
    let c = conn.client()?;
    let b = c.backup(backup)?;
    if b.vm != vm {
        bail!("backup {backup} is of VM {}, not {vm}", b.vm);
    }
    p.backup = backup.to_string();
    let job = c.start_restore(&p)?;
    finish(conn, &c, job, !no_wait)
}

pub fn job(conn: &Conn, cmd: JobCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match cmd {
        JobCmd::List { limit } => {
            let v = c.jobs(limit)?;
            out(conn, &v, |v| {
                println!(
                    "{:<17} {:<13} {:<10} {:<24} ERROR",
                    "JOB", "KIND", "STATE", "VMS"
                );
                for j in v {
                    println!(
                        "{:<17} {:<13} {:<10} {:<24} {}",
                        j.id,
                        j.kind,
                        j.state.as_str(),
                        j.vms.join(","),
                        j.error.as_deref().unwrap_or("")
                    );
                }
            })?;
        }
        JobCmd::Show { id } => {
            let v = c.job(&id)?;
            out(conn, &v, |v| {
                println!("job {} ({}): {}", v.id, v.kind, v.state);
                for e in v.events.iter().flatten() {
                    println!("  [{}] {}", e.level, e.message);
                }
                if let Some(e) = &v.error {
                    println!("error: {e}");
                }
            })?;
        }
        JobCmd::Cancel { id } => {
            let v = c.cancel_job(&id)?;
            out(conn, &v, |v| println!("cancel requested for job {}", v.id))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schedule(conn: &Conn, cmd: ScheduleCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match cmd {
        ScheduleCmd::Set {
            name,
            every,
            group,
            vms,
        } => {
            let v = c.put_schedule(
                &name,
                &PutSchedule {
                    vms,
                    every,
                    group,
                    first_in_s: None,
                },
            )?;
            out(conn, &v, pretty)?;
        }
        ScheduleCmd::List => out(conn, &c.schedules()?, pretty)?,
        ScheduleCmd::Rm { name } => out(conn, &c.delete_schedule(&name)?, pretty)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn retention(conn: &Conn, cmd: RetentionCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match cmd {
        RetentionCmd::Set {
            vm,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
        } => {
            let r = Retention {
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
            };
            out(conn, &c.set_retention(&vm, &r)?, pretty)?;
        }
        RetentionCmd::Show { vm } => out(conn, &c.retention(&vm)?, pretty)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(conn: &Conn, vms: Vec<String>, dry_run: bool) -> Result<ExitCode> {
    let c = conn.client()?;
    let job = c.start_prune(&StartPrune { vms, dry_run })?;
    finish(conn, &c, job, true)
}

pub fn stats(conn: &Conn) -> Result<ExitCode> {
    out(conn, &conn.client()?.stats()?, pretty)?;
    Ok(ExitCode::SUCCESS)
}

pub fn leader(conn: &Conn) -> Result<ExitCode> {
    out(conn, &conn.client()?.leader()?, |l| {
        let role = if l.active { "active" } else { "standby" };
        if !l.shared {
            println!("{role} (its own SQLite catalog: no lease)");
            return;
        }
        let lease = match (&l.holder, l.expires_ms) {
            (Some(h), Some(t)) => {
                let left = (t - cairn_types::now_ms()) as f64 / 1000.0;
                if left >= 0.0 {
                    format!("held by {h}, {left:.1} s left unless renewed")
                } else {
                    format!("held by {h}, lapsed {:.1} s ago", -left)
                }
            }
            _ => "not taken yet".into(),
        };
        println!("{role}: this server is {}; the lease is {lease}", l.me);
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Subcommand, Debug)]
pub enum FilesCmd {
    /// List a backup's volumes, or a directory (`/<disk>/<volume>/<path>`).
    Ls {
        backup: String,
        #[arg(default_value = "/")]
        path: String,
    },
    /// Files matching a glob (`*.conf`, `/etc/**/pass*`) or substring, in every backup.
    Find {
        pattern: String,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// Ignore case.
        #[arg(short = 'i', long)]
        ignore_case: bool,
    },
    /// One file across a VM's backups.
    Versions { vm: String, path: String },
    /// Restore a file (or a directory, as a tar stream) from a backup to OUT (`-`: stdout);
    /// with --into-datastore, the storage agent writes the file at OUT inside that datastore
    /// (restore into primary storage: straight from the vault).
    Restore {
        backup: String,
        path: String,
        out: PathBuf,
        /// `[AGENT:]DATASTORE` to restore into (OUT is then relative to it).
        #[arg(long, conflicts_with = "into_guest")]
        into_datastore: Option<String>,
        /// Write into the running guest of VM (default: the backup's VM) through its guest
        /// agent; OUT is then an absolute path in the guest.
        #[arg(long, value_name = "VM", num_args = 0..=1, default_missing_value = "")]
        into_guest: Option<String>,
        /// With --into-guest: replace what exists at OUT.
        #[arg(long, requires = "into_guest")]
        overwrite: bool,
    },
}

pub fn files(conn: &Conn, cmd: FilesCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let row = |kind: &str, size: Option<u64>, backup: &str, path: &str| {
        println!(
            "{:<7} {:>12} {:<17} {}",
            kind,
            size.map(|s| s.to_string()).unwrap_or_default(),
            backup,
            path
        );
    };
    match cmd {
        FilesCmd::Ls { backup, path } => {
            let v = c.files_ls(&backup, &path)?;
            out(conn, &v, |v| {
                for f in v {
                    match &f.not_indexed {
                        Some(why) => row(
                            f.kind.as_str(),
                            None,
                            "",
                            &format!("{}  (not indexed: {why})", f.path),
                        ),
                        None => row(f.kind.as_str(), f.size, "", &f.path),
                    }
                }
            })?;
        }
        FilesCmd::Find {
            pattern,
            vm,
            limit,
            ignore_case,
        } => {
            let v = c.files_find(&FindFiles {
                pattern,
                vm,
                limit: Some(limit),
                icase: ignore_case,
            })?;
            out(conn, &v, |v| {
                for f in v {
                    row(f.kind.as_str(), Some(f.size), &f.backup, &f.path);
                }
            })?;
        }
        FilesCmd::Versions { vm, path } => {
            let v = c.files_versions(&vm, &path)?;
            out(conn, &v, |v| {
                for x in v {
                    println!(
                        "{:<17} {:>12} {} {}",
                        x.backup,
                        x.size,
                        ago(Some(x.created_ms)),
                        if x.changed { "changed" } else { "" }
                    );
                }
            })?;
        }
        FilesCmd::Restore {
            backup,
            path,
            out: dest,
            into_guest: Some(vm),
            overwrite,
            ..
        } => {
            let v = c.restore_file_into_guest(&RestoreFileIntoGuest {
                backup,
                path: path.clone(),
                vm: Some(vm).filter(|v| !v.is_empty()),
                dest: dest.to_string_lossy().into_owned(),
                overwrite,
            })?;
            out(conn, &v, |v| {
                eprintln!(
                    "{path}: {} file(s), {} dir(s), {} bytes written to {} in VM {} ({} skipped; \
                     {} bytes read from the vault)",
                    v.files, v.dirs, v.bytes, v.dest, v.vm, v.skipped, v.vault_bytes_read
                )
            })?;
        }
        FilesCmd::Restore {
            backup,
            path,
            out: dest,
            into_datastore: Some(ds),
            ..
        } => {
            let (agent, ds) = match ds.split_once(':') {
                Some((a, d)) => (Some(a.to_string()), d.to_string()),
                None => (None, ds),
            };
            let v = c.restore_file_into(&RestoreFileInto {
                backup,
                path: path.clone(),
                storage_agent: agent,
                datastore: Some(ds),
                dest: dest.to_string_lossy().into_owned(),
            })?;
            out(conn, &v, |v| {
                eprintln!(
                    "{path}: {} bytes written to {} on storage agent {} ({} bytes read from the vault)",
                    v.bytes,
                    v.path.display(),
                    v.storage_agent,
                    v.vault_bytes_read
                )
            })?;
        }
        FilesCmd::Restore {
            backup,
            path,
            out: dest,
            into_datastore: None,
            ..
        } => {
            let content = c.file_content(&backup, &path)?;
            if dest.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&content.data)?;
            } else {
                cairn_types::durable::write_atomic(&dest, &content.data)?;
                #[cfg(unix)]
                if let Some(mode) = content
                    .file
                    .as_ref()
                    .filter(|f| f.kind == cairn_api::server::EntryKind::File)
                    .and_then(|f| f.mode)
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        &dest,
                        std::fs::Permissions::from_mode(mode & 0o7777),
                    )?;
                }
            }
            let v = FileWritten {
                path: path.clone(),
                out: dest.clone(),
                bytes: content.data.len() as u64,
                vault_bytes_read: content.vault_bytes_read,
                file: content.file,
            };
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if dest.as_os_str() != "-" {
                eprintln!(
                    "{path}: {} bytes to {} ({} bytes read from the vault)",
                    v.bytes,
                    dest.display(),
                    v.vault_bytes_read
                        .map_or_else(|| "?".to_string(), |b| b.to_string())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `cairn files restore --json` prints for a file written here.
#[derive(Serialize)]
struct FileWritten {
    path: String,
    out: PathBuf,
    bytes: u64,
    vault_bytes_read: Option<u64>,
    file: Option<cairn_api::server::FileInfo>,
}
