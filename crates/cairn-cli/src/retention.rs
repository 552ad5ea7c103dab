//! `cairn repo lock | locks | retention`: retention locks on snapshots, and the minimum lock
//! of new ones. The vault enforces them for every credential; these commands only ask.

use std::process::ExitCode;

use anyhow::Result;
use cairn_types::time::{parse_span, parse_utc, rfc3339};
use cairn_vault::retention::RetentionPolicy;

use crate::repo::{VaultAccess, open, print_json};

/// When a lock ends: `--for SPAN` from now, or `--until TIME`.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct LockEnd {
    /// How long from now: 3600, 90m, 12h, 30d, 2w, 1y.
    #[arg(long = "for", value_parser = parse_span)]
    pub span: Option<u64>,
    /// Until a UTC time: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long, value_parser = parse_utc)]
    pub until: Option<u64>,
}

impl LockEnd {
    pub fn at(&self) -> u64 {
        self.until.unwrap_or_else(|| now() + self.span.unwrap_or(0))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum RetentionCmd {
    /// Lock snapshots against forgetting until a time, or extend their locks. A lock can
    /// never be shortened or removed, by anyone.
    Lock {
        repo: String,
        #[arg(required = true)]
        snapshots: Vec<String>,
        #[command(flatten)]
        end: LockEnd,
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots' retention locks.
    Locks {
        repo: String,
        #[arg(long)]
        json: bool,
    },
    /// Show, or with --min-lock set, the lock every new snapshot gets at least.
    Retention {
        repo: String,
        /// Minimum lock of new snapshots (0 for none): 3600, 12h, 30d, 1y.
        #[arg(long, value_parser = parse_span)]
        min_lock: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn state(until: u64) -> &'static str {
    if until > now() { "locked" } else { "expired" }
}

pub fn run(cmd: RetentionCmd, access: &VaultAccess) -> Result<ExitCode> {
    match cmd {
        RetentionCmd::Lock {
            repo,
            snapshots,
            end,
            json,
        } => {
            let v = open(&repo, access)?;
            let until = end.at();
            let mut out = Vec::new();
            for s in &snapshots {
                let a = v.lock(s, until)?;
                if !json {
                    println!(
                        "{} locked until {}{}",
                        a.lock.snapshot,
                        rfc3339(a.lock.until),
                        if a.protected > 0 {
                            format!(" ({} objects made immutable on the store)", a.protected)
                        } else {
                            String::new()
                        }
                    );
                }
                out.push(a);
            }
            if json {
                print_json(&out);
            }
        }
        RetentionCmd::Locks { repo, json } => {
            let v = open(&repo, access)?;
            let locks = v.locks()?;
            if json {
                print_json(&locks);
            } else {
                for l in &locks {
                    println!(
                        "{} {} until {}",
                        l.snapshot,
                        state(l.until),
                        rfc3339(l.until)
                    );
                }
                println!("{} snapshots with a retention lock", locks.len());
            }
        }
        RetentionCmd::Retention {
            repo,
            min_lock,
            json,
        } => {
            let v = open(&repo, access)?;
            let p = match min_lock {
                Some(min_lock_secs) => {
                    v.set_retention_policy(&RetentionPolicy { min_lock_secs })?
                }
                None => v.retention_policy()?,
            };
            if json {
                print_json(&p);
            } else if p.min_lock_secs == 0 {
                println!("new snapshots are not locked unless a backup asks for a lock");
            } else {
                println!(
                    "every new snapshot is locked for at least {} s ({:.1} days)",
                    p.min_lock_secs,
                    p.min_lock_secs as f64 / 86_400.0
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
