//! `cairn repo ...`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_chunk::ChunkerParams;
use cairn_vault::maint::PruneOptions;
use cairn_vault::{FirstKey, InitOptions, LocalVault, Repository, Vault};

use crate::keys::KeyUse;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Create a repository in an empty directory, or at s3://BUCKET[/PREFIX] (S3 settings:
    /// --s3-* or the AWS_* variables).
    Init {
        dir: PathBuf,
        /// Encrypt it: the master key is wrapped by the passphrase in CAIRN_PASSWORD (asked
        /// for on a terminal) or, with --key-file FILE, by a new key file written there.
        /// Losing every passphrase and key file loses the data.
        #[arg(long)]
        encrypt: bool,
        /// Segmentation: `cdc:MIN,AVG,MAX` or `fixed:SIZE` (e.g. cdc:4k,16k,64k).
        #[arg(long)]
        chunker: Option<String>,
        /// zstd level of the frames segments are stored in; 0 disables compression.
        #[arg(long, default_value_t = cairn_vault::repo::DEFAULT_COMPRESSION)]
        compression: i32,
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash everything reachable; name damaged snapshots. Exit code 2 on damage.
    Verify {
        repo: String,
        /// Check container trailers and trees only, without reading segment data.
        #[arg(long)]
        metadata_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots no retention rule keeps (per snapshot name). Run `gc` to free space.
    Prune {
        repo: String,
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete or repack containers no snapshot needs. Runs beside backups: what a backup
    /// that began earlier may still use is condemned now and deleted by a later gc.
    Gc {
        repo: String,
        #[arg(long)]
        dry_run: bool,
        /// How long condemned containers wait at least before they are deleted (e.g. 0,
        /// 30m); default 0 on a directory, 15m on S3 (listings there may lag behind writes).
        #[arg(long, value_parser = cairn_types::time::parse_span)]
        grace: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots (ids, unique id prefixes or names; a damaged snapshot by its id).
    /// Run `gc` to free space.
    Forget {
        repo: String,
        #[arg(required = true)]
        snapshots: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild what can be rebuilt (config, index, container trailers, snapshot manifests from
    /// their recipes) and forget only what cannot be read. Exit code 2 when anything was lost.
    Repair {
        dir: PathBuf,
        /// Report what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Passphrases and key files of an encrypted repository.
    #[command(subcommand)]
    Key(crate::keys::KeyCmd),
    /// Rebuild the local fingerprint index from the containers (keeping the entries of
    /// containers with a damaged trailer whose segments still read back intact).
    RebuildIndex {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Retention(crate::retention::RetentionCmd),
}

/// How to authenticate to a vault service.
#[derive(Clone, Debug, Default)]
pub struct VaultAccess {
    /// `--token-file` when given on the command line; it wins over `CAIRN_TOKEN`. (Its
    /// variable, `CAIRN_SERVER_TOKEN_FILE`, names the backup server's token and is never sent
    /// to a vault.)
    pub token_file: Option<PathBuf>,
    /// `--key-file`: opens an encrypted repository (else CAIRN_PASSWORD or a prompt).
    pub key_file: Option<PathBuf>,
}

impl VaultAccess {
    fn token(&self) -> Result<String> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading the vault token from {}", f.display()))?;
            let t = t.trim();
            anyhow::ensure!(!t.is_empty(), "{} holds no token", f.display());
            return Ok(t.to_string());
        }
        match std::env::var("CAIRN_TOKEN") {
            Ok(t) if !t.is_empty() => Ok(t),
            _ => anyhow::bail!("a vault service needs its token: --token-file FILE or CAIRN_TOKEN"),
        }
    }
}

/// Opens REPO: a directory or `https://HOST:PORT` (token from `--token-file` or
/// `CAIRN_TOKEN`, trust in `CAIRN_FINGERPRINT` or `CAIRN_CA`).
pub fn open(repo: &str, access: &VaultAccess) -> Result<Arc<dyn Vault>> {
    open_for(repo, access, KeyUse::Required)
}

/// [`open`], asking for the key of an encrypted repository only when `use_` requires it.
pub fn open_for(repo: &str, access: &VaultAccess, use_: KeyUse) -> Result<Arc<dyn Vault>> {
    let key_file = access.key_file.as_deref();
    if repo.starts_with("http://") {
        anyhow::bail!(
            "{repo}: vault services speak HTTPS only (tokens never travel in clear text)"
        );
    }
    if repo.starts_with("https://") {
        let token = access.token()?;
        let trust = cairn_http::Trust::from_env().context(
            "set CAIRN_FINGERPRINT (the vault's certificate SHA-256) or CAIRN_CA (a CA file)",
        )?;
        let mut v = cairn_vault::remote::RemoteVault::connect(repo, &token, &trust)?;
        let encrypted = v.config()?.encryption.is_some();
        crate::keys::unlock(encrypted, key_file, use_, |c| Ok(v.unlock(c)?))?;
        return Ok(Arc::new(v));
    }
    let repo = crate::keys::open_dir(std::path::Path::new(repo), key_file, use_)?;
    Ok(Arc::new(LocalVault { repo }))
}

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub fn run(cmd: RepoCmd, access: &VaultAccess) -> Result<ExitCode> {
    match cmd {
        RepoCmd::Retention(cmd) => return crate::retention::run(cmd, access),
        RepoCmd::Init {
            dir,
            encrypt,
            chunker,
            compression,
            json,
        } => {
            let chunker = match chunker {
                Some(s) => ChunkerParams::parse(&s).map_err(anyhow::Error::msg)?,
                None => ChunkerParams::default(),
            };
            let s3 = dir.to_str().is_some_and(cairn_vault::location::is_s3);
            if !s3
                && dir.exists()
                && std::fs::read_dir(&dir)?.next().is_some()
                && !dir.join("config").exists()
            {
                anyhow::bail!("{} exists and is not empty", dir.display());
            }
            let first = match (encrypt, &access.key_file) {
                (false, _) => None,
                (true, Some(f)) => {
                    anyhow::ensure!(
                        std::fs::symlink_metadata(f).is_err(),
                        "{} exists: `repo init --encrypt --key-file` writes a new key file there",
                        f.display()
                    );
                    Some(FirstKey::KeyFile(f.clone()))
                }
                (true, None) => Some(FirstKey::Passphrase(
                    crate::keys::new_passphrase("CAIRN_PASSWORD")?,
                    cairn_chunk::wrap::KdfParams::default(),
                )),
            };
            let r = Repository::init_location(
                &dir,
                &InitOptions {
                    chunker,
                    compression,
                    encrypt: first,
                },
            )?;
            if json {
                print_json(r.config());
            } else {
                println!(
                    "created {}repository {} at {}",
                    if encrypt { "encrypted " } else { "" },
                    r.config().id,
                    dir.display()
                );
                if encrypt {
                    println!(
                        "losing every passphrase and key file of it loses its data: keep a                          copy (`cairn repo key export DIR FILE` or `--paper`)"
                    );
                }
            }
        }
        RepoCmd::Verify {
            repo,
            metadata_only,
            json,
        } => {
            let v = open_for(&repo, access, KeyUse::Optional)?;
            let rep = v.verify(!metadata_only)?;
            if json {
                print_json(&rep);
            } else {
                print_verify(&rep);
            }
            if !rep.ok() {
                return Ok(ExitCode::from(2));
            }
        }
        RepoCmd::Prune {
            repo,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
            json,
        } => {
            let v = open_for(&repo, access, KeyUse::Optional)?;
            let opts = PruneOptions {
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
            };
            if keep_last + keep_daily + keep_weekly + keep_monthly == 0 {
                anyhow::bail!("give at least one --keep-* rule (prune never forgets everything)");
            }
            let plan = v.prune(&opts, dry_run)?;
            if json {
                print_json(&plan);
            } else {
                for (id, name, _) in &plan.keep {
                    println!("keep   {id} {name}");
                }
                for (id, name, _) in &plan.forget {
                    println!("forget {id} {name}");
                }
                for (id, name, until) in &plan.locked {
                    println!(
                        "locked {id} {name}: the rules would forget it, its retention lock \
                         keeps it until {}",
                        cairn_types::time::rfc3339(*until)
                    );
                }
                println!(
                    "{} kept, {} {}",
                    plan.keep.len(),
                    plan.forget.len(),
                    match (plan.executed, dry_run) {
                        (true, _) => "forgotten",
                        (false, true) => "would be forgotten (dry run)",
                        (false, false) => "forgotten (nothing to forget)",
                    }
                );
            }
        }
        RepoCmd::Gc {
            repo,
            dry_run,
            grace,
            json,
        } => {
            let v = open_for(&repo, access, KeyUse::Optional)?;
            let plan = v.gc(&cairn_vault::maint::GcOptions {
                dry_run,
                grace_secs: grace,
            })?;
            if json {
                print_json(&plan);
            } else {
                println!(
                    "{} snapshots, {} live segments, {} containers: delete {}, repack {}, frees ~{} bytes{}",
                    plan.snapshots,
                    plan.live_blobs,
                    plan.containers_total,
                    plan.delete.len(),
                    plan.repack.len(),
                    plan.bytes_freed_estimate,
                    if plan.executed { "" } else { " (dry run)" }
                );
                if plan.executed {
                    println!("{} containers deleted", plan.deleted.len());
                }
                if plan.revived > 0 {
                    println!(
                        "{} condemned containers are in use again and were kept",
                        plan.revived
                    );
                }
                if plan.waiting > 0 {
                    println!(
                        "{} condemned containers wait for backups that began before they were \
                         condemned, or for the grace period; a later `cairn repo gc` deletes them",
                        plan.waiting
                    );
                }
            }
        }
        RepoCmd::Forget {
            repo,
            snapshots,
            json,
        } => {
            let v = open_for(&repo, access, KeyUse::Optional)?;
            let ids = v.forget(&snapshots)?;
            if json {
                print_json(&ids);
            } else {
                for id in &ids {
                    println!("forgot {id}");
                }
                println!(
                    "{} forgotten; run `cairn repo gc` to free their data",
                    ids.len()
                );
            }
        }
        RepoCmd::Repair { dir, dry_run, json } => {
            let r = crate::keys::open_dir(&dir, access.key_file.as_deref(), KeyUse::Optional)?;
            let rep = cairn_vault::maint::repair(&r, dry_run)?;
            if json {
                print_json(&rep);
            } else {
                print_repair(&rep);
            }
            if rep.segments_lost > 0 || !rep.snapshots_forgotten.is_empty() {
                return Ok(ExitCode::from(2));
            }
        }
        RepoCmd::Key(c) => return crate::keys::run(c, access.key_file.as_deref()),
        RepoCmd::RebuildIndex { dir, json } => {
            let r = Repository::open_location(&dir)?;
            let lock =
                cairn_vault::lock::RepoLock::acquire(r.store().clone(), true, "rebuild-index")?;
            let rep = r.rebuild_index()?;
            lock.release()?;
            if json {
                print_json(&rep);
            } else {
                println!(
                    "index rebuilt from {} containers; {} with a damaged trailer kept through \
                     {} segments of the old index (`cairn repo repair` rebuilds their trailers); \
                     {} unreadable containers skipped",
                    rep.containers_read,
                    rep.containers_salvaged,
                    rep.segments_salvaged,
                    rep.containers_skipped
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_verify(rep: &cairn_vault::maint::VerifyReport) {
    println!(
        "checked {} snapshots, {} containers, {} segments ({} bytes), {} index entries",
        rep.snapshots,
        rep.containers,
        rep.blobs_checked,
        rep.bytes_checked,
        rep.index_entries_checked
    );
    for d in &rep.damage {
        println!(
            "damage: {}{}{}",
            d.container
                .map(|c| format!("container {c}: "))
                .unwrap_or_default(),
            d.digest
                .map(|c| format!("segment {c}: "))
                .unwrap_or_default(),
            d.problem
        );
    }
    for s in rep.per_snapshot.iter().filter(|s| !s.ok) {
        println!(
            "damaged snapshot: {} ({}): {}",
            s.id,
            s.name,
            s.problem.as_deref().unwrap_or("damaged")
        );
    }
    if rep.marked > 0 {
        println!(
            "{} damaged segments marked: the next backup that has their data stores them again \
             and heals the snapshots above",
            rep.marked
        );
    }
    if rep.superseded > 0 {
        println!(
            "{} damaged copies have an intact copy elsewhere (gc removes them)",
            rep.superseded
        );
    }
    println!(
        "{}",
        if rep.ok() {
            "repository OK"
        } else {
            "repository DAMAGED"
        }
    );
}

fn print_repair(rep: &cairn_vault::maint::RepairReport) {
    let verb = if rep.executed { "" } else { "would be " };
    if rep.config_rewritten {
        println!("config and its copy {verb}rewritten");
    }
    if rep.index_runs_rebuilt > 0 {
        println!("{} damaged index runs rebuilt", rep.index_runs_rebuilt);
    }
    for (old, new, kept) in &rep.containers_rebuilt {
        println!("container {old}: trailer {verb}rebuilt as {new} ({kept} segments kept)");
    }
    for id in &rep.snapshots_rebuilt {
        println!("snapshot {id}: manifest {verb}rebuilt from its recipe");
    }
    for id in &rep.snapshots_forgotten {
        println!("snapshot {id}: manifest unreadable, recipe unreadable: {verb}forgotten");
    }
    println!(
        "{} segments lost; {}",
        rep.segments_lost,
        if rep.executed {
            "repair done (run `cairn repo verify` to check)"
        } else {
            "dry run: nothing changed"
        }
    );
}
