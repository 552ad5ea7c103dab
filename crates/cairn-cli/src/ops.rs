//! The operator's commands over the server's REST API: `vm list`, `backup`, `backups`,
//! `restore`, `job`, `schedule`, `retention`, `prune`, `stats`. Every command takes `--json`
//! for scripts; waiting commands show the job's events as they happen.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_api::server::{PutSchedule, RestoreFileInto, RestoreParams, StartBackup, StartPrune};
use cairn_http::{Client, Trust};
use serde_json::{Value, json};

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
    /// One JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    /// `--token-file` if it was given on the command line (not from its variable).
    pub fn token_file_given(&self, m: &clap::ArgMatches) -> Option<PathBuf> {
        (m.value_source("token_file") == Some(clap::parser::ValueSource::CommandLine))
            .then(|| self.token_file.clone())
            .flatten()
    }

    pub fn client(&self) -> Result<Client> {
        let (url, fp, tf) = match (&self.server, &self.connect) {
            (Some(u), _) => (
                u.clone(),
                self.server_fingerprint
                    .clone()
                    .context("--server needs --server-fingerprint")?,
                self.token_file
                    .clone()
                    .context("--server needs --token-file")?,
            ),
            (None, c) => {
                let path = c
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/var/lib/cairn/server/connection.json"));
                let c: Value =
                    serde_json::from_slice(&std::fs::read(&path).with_context(|| {
                        format!(
                            "no server connection: {} (use --connect or --server)",
                            path.display()
                        )
                    })?)?;
                let s = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
                (
                    s("url").context("connection: url")?,
                    s("fingerprint").context("connection: fingerprint")?,
                    PathBuf::from(s("token_file").context("connection: token_file")?),
                )
            }
        };
        let token =
            std::fs::read_to_string(&tf).with_context(|| format!("reading {}", tf.display()))?;
        Ok(Client::new(&url, token.trim(), &Trust::Fingerprint(fp))?)
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

fn out(conn: &Conn, v: &Value, human: impl FnOnce(&Value)) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human(v);
    }
}

fn ago(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(t) => {
            let s = (cairn_catalog::now_ms() - t) / 1000;
            match s {
                s if s < 120 => format!("{s} s ago"),
                s if s < 7200 => format!("{} min ago", s / 60),
                s => format!("{} h ago", s / 3600),
            }
        }
    }
}

pub fn vm(conn: &Conn, _c: VmCmd) -> Result<ExitCode> {
    let v: Value = conn.client()?.get_json("/v1/vms")?;
    out(conn, &v, |v| {
        println!(
            "{:<16} {:<12} {:<10} {:>7} LAST BACKUP",
            "VM", "HOST", "STATE", "BACKUPS"
        );
        for x in v.as_array().into_iter().flatten() {
            println!(
                "{:<16} {:<12} {:<10} {:>7} {}",
                x["name"].as_str().unwrap_or("?"),
                x["host"].as_str().unwrap_or("-"),
                x["state"].as_str().unwrap_or("?"),
                x["backups"].as_i64().unwrap_or(0),
                ago(x["last_backup_ms"].as_i64())
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// Polls a job until it ends, printing new events on stderr; returns the final job.
pub fn wait_job(c: &Client, id: &str, show: bool) -> Result<Value> {
    let mut seen = 0;
    loop {
        let j: Value = c.get_json(&format!("/v1/jobs/{id}"))?;
        if show {
            for e in j["events"].as_array().into_iter().flatten().skip(seen) {
                eprintln!(
                    "  [{}] {}",
                    e["level"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                );
                seen += 1;
            }
        }
        match j["state"].as_str() {
            Some("succeeded" | "failed" | "cancelled") => return Ok(j),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn finish(conn: &Conn, c: &Client, job: Value, wait: bool) -> Result<ExitCode> {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if !wait {
        out(conn, &job, |j| {
            println!("job {} queued", j["id"].as_str().unwrap_or("?"))
        });
        return Ok(ExitCode::SUCCESS);
    }
    if !conn.json {
        eprintln!("job {id} ({})", job["kind"].as_str().unwrap_or("?"));
    }
    let j = wait_job(c, &id, !conn.json)?;
    let ok = j["state"] == "succeeded";
    out(conn, &j, |j| {
        if ok {
            println!("job {id} succeeded");
            if let Some(r) = j.get("result") {
                println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
        } else {
            println!(
                "job {id} {}: {}",
                j["state"].as_str().unwrap_or("?"),
                j["error"].as_str().unwrap_or("")
            );
        }
    });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn backup(
    conn: &Conn,
    vms: Vec<String>,
    group: bool,
    full: bool,
    no_wait: bool,
) -> Result<ExitCode> {
    let c = conn.client()?;
    let job: Value = c.post_json("/v1/backups", &StartBackup { vms, group, full })?;
    finish(conn, &c, job, !no_wait)
}

pub fn backups(conn: &Conn, vm: Option<String>) -> Result<ExitCode> {
    let c = conn.client()?;
    let path = match &vm {
        Some(v) => format!("/v1/backups?vm={v}"),
        None => "/v1/backups".into(),
    };
    let v: Value = c.get_json(&path)?;
    out(conn, &v, |v| {
        println!(
            "{:<17} {:<14} {:<12} {:<8} {:>9} {:>12} {:>11} WHEN",
            "BACKUP", "VM", "KIND", "GROUP", "DURATION", "SENT", "SNAPSHOT"
        );
        for b in v.as_array().into_iter().flatten() {
            println!(
                "{:<17} {:<14} {:<12} {:<8} {:>7}ms {:>12} {:>9}ms {}",
                b["id"].as_str().unwrap_or("?"),
                b["vm"].as_str().unwrap_or("?"),
                b["kind"].as_str().unwrap_or("?"),
                b["group_id"]
                    .as_str()
                    .map(|g| &g[..g.len().min(8)])
                    .unwrap_or("-"),
                b["duration_ms"].as_i64().unwrap_or(0),
                b["bytes_sent"].as_i64().unwrap_or(0),
                b["vm_snapshot_lifetime_ms"].as_i64().unwrap_or(0),
                ago(b["created_ms"].as_i64())
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
pub fn restore(
    conn: &Conn,
    vm: &str,
    backup: &str,
    as_name: &str,
    host: Option<String>,
    no_start: bool,
    wait_boot_s: u64,
    no_wait: bool,
) -> Result<ExitCode> {
    let c = conn.client()?;
    let b: Value = c.get_json(&format!("/v1/backups/{backup}"))?;
    if b["vm"].as_str() != Some(vm) {
        bail!(
            "backup {backup} is of VM {}, not {vm}",
            b["vm"].as_str().unwrap_or("?")
        );
    }
    let job: Value = c.post_json(
        "/v1/restores",
        &RestoreParams {
            backup: backup.to_string(),
            as_name: as_name.to_string(),
            host,
            start: !no_start,
            wait_boot_s,
        },
    )?;
    finish(conn, &c, job, !no_wait)
}

pub fn job(conn: &Conn, cmd: JobCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match cmd {
        JobCmd::List { limit } => {
            let v: Value = c.get_json(&format!("/v1/jobs?limit={limit}"))?;
            out(conn, &v, |v| {
                println!(
                    "{:<17} {:<13} {:<10} {:<24} ERROR",
                    "JOB", "KIND", "STATE", "VMS"
                );
                for j in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<17} {:<13} {:<10} {:<24} {}",
                        j["id"].as_str().unwrap_or("?"),
                        j["kind"].as_str().unwrap_or("?"),
                        j["state"].as_str().unwrap_or("?"),
                        j["vms"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                        j["error"].as_str().unwrap_or("")
                    );
                }
            });
        }
        JobCmd::Show { id } => {
            let v: Value = c.get_json(&format!("/v1/jobs/{id}"))?;
            out(conn, &v, |v| {
                println!(
                    "job {} ({}): {}",
                    v["id"].as_str().unwrap_or("?"),
                    v["kind"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                );
                for e in v["events"].as_array().into_iter().flatten() {
                    println!(
                        "  [{}] {}",
                        e["level"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    );
                }
                if let Some(e) = v["error"].as_str() {
                    println!("error: {e}");
                }
            });
        }
        JobCmd::Cancel { id } => {
            let v: Value = c.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))?;
            out(conn, &v, |v| {
                println!(
                    "cancel requested for job {}",
                    v["id"].as_str().unwrap_or("?")
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schedule(conn: &Conn, cmd: ScheduleCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let v: Value = match cmd {
        ScheduleCmd::Set {
            name,
            every,
            group,
            vms,
        } => c.put_json(
            &format!("/v1/schedules/{name}"),
            &PutSchedule {
                vms,
                every,
                group,
                first_in_s: None,
            },
        )?,
        ScheduleCmd::List => c.get_json("/v1/schedules")?,
        ScheduleCmd::Rm { name } => c.delete_json(&format!("/v1/schedules/{name}"))?,
    };
    out(conn, &v, |v| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
    });
    Ok(ExitCode::SUCCESS)
}

pub fn retention(conn: &Conn, cmd: RetentionCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let v: Value = match cmd {
        RetentionCmd::Set {
            vm,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
        } => c.put_json(
            &format!(
                "/v1/retention/{}",
                if vm == "*" { "%2A".into() } else { vm }
            ),
            &json!({ "keep_last": keep_last, "keep_daily": keep_daily,
                     "keep_weekly": keep_weekly, "keep_monthly": keep_monthly }),
        )?,
        RetentionCmd::Show { vm } => c.get_json(&format!(
            "/v1/retention/{}",
            if vm == "*" { "%2A".into() } else { vm }
        ))?,
    };
    out(conn, &v, |v| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
    });
    Ok(ExitCode::SUCCESS)
}

pub fn prune(conn: &Conn, vms: Vec<String>, dry_run: bool) -> Result<ExitCode> {
    let c = conn.client()?;
    let job: Value = c.post_json("/v1/prune", &StartPrune { vms, dry_run })?;
    finish(conn, &c, job, true)
}

pub fn stats(conn: &Conn) -> Result<ExitCode> {
    let v: Value = conn.client()?.get_json("/v1/stats")?;
    out(conn, &v, |v| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
    });
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
        #[arg(long)]
        into_datastore: Option<String>,
    },
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn files(conn: &Conn, cmd: FilesCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let table = |v: &Value| {
        for f in v.as_array().into_iter().flatten() {
            println!(
                "{:<7} {:>12} {:<17} {}",
                f["kind"].as_str().unwrap_or("?"),
                f["size"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                f["backup"].as_str().unwrap_or(""),
                f["path"].as_str().unwrap_or("?")
            );
        }
    };
    match cmd {
        FilesCmd::Ls { backup, path } => {
            let v: Value = c.get_json(&format!(
                "/v1/files?backup={}&path={}",
                q(&backup),
                q(&path)
            ))?;
            out(conn, &v, table);
        }
        FilesCmd::Find {
            pattern,
            vm,
            limit,
            ignore_case,
        } => {
            let mut path = format!(
                "/v1/files/find?pattern={}&limit={limit}&icase={ignore_case}",
                q(&pattern)
            );
            if let Some(vm) = vm {
                path.push_str(&format!("&vm={}", q(&vm)));
            }
            let v: Value = c.get_json(&path)?;
            out(conn, &v, table);
        }
        FilesCmd::Versions { vm, path } => {
            let v: Value = c.get_json(&format!(
                "/v1/files/versions?vm={}&path={}",
                q(&vm),
                q(&path)
            ))?;
            out(conn, &v, |v| {
                for x in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<17} {:>12} {} {}",
                        x["backup"].as_str().unwrap_or("?"),
                        x["size"].as_u64().unwrap_or(0),
                        ago(x["created_ms"].as_i64()),
                        if x["changed"] == true { "changed" } else { "" }
                    );
                }
            });
        }
        FilesCmd::Restore {
            backup,
            path,
            out: dest,
            into_datastore: Some(ds),
        } => {
            let (agent, ds) = match ds.split_once(':') {
                Some((a, d)) => (Some(a.to_string()), d.to_string()),
                None => (None, ds),
            };
            let v: Value = c.post_json(
                "/v1/files/restore",
                &RestoreFileInto {
                    backup,
                    path: path.clone(),
                    storage_agent: agent,
                    datastore: Some(ds),
                    dest: dest.to_string_lossy().into_owned(),
                },
            )?;
            out(conn, &v, |v| {
                eprintln!(
                    "{path}: {} bytes written to {} on storage agent {} ({} bytes read from the vault)",
                    v["bytes"],
                    v["path"].as_str().unwrap_or("?"),
                    v["storage_agent"].as_str().unwrap_or("?"),
                    v["vault_bytes_read"]
                )
            });
        }
        FilesCmd::Restore {
            backup,
            path,
            out: dest,
            into_datastore: None,
        } => {
            let (data, headers) = c.get_for_bytes(&format!(
                "/v1/files/content?backup={}&path={}",
                q(&backup),
                q(&path)
            ))?;
            let h = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let meta: Value = h("x-cairn-file")
                .and_then(|m| serde_json::from_str(&m).ok())
                .unwrap_or_default();
            if dest.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&data)?;
            } else {
                cairn_types::durable::write_atomic(&dest, &data)?;
                #[cfg(unix)]
                if let Some(mode) = meta["mode"].as_u64().filter(|_| meta["kind"] == "file") {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        &dest,
                        std::fs::Permissions::from_mode(mode as u32 & 0o7777),
                    )?;
                }
            }
            let v = json!({
                "path": path, "out": dest, "bytes": data.len(),
                "vault_bytes_read": h("x-cairn-vault-bytes").and_then(|b| b.parse::<u64>().ok()),
                "file": meta,
            });
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if dest.as_os_str() != "-" {
                eprintln!(
                    "{path}: {} bytes to {} ({} bytes read from the vault)",
                    data.len(),
                    dest.display(),
                    v["vault_bytes_read"]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
