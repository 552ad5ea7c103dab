//! `cairn image ...`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_chunk::ChunkerParams;
use cairn_types::ExtentList;
use cairn_vault::imager::{self, BackupOptions, RestoreOptions};
use clap::Subcommand;

use crate::progress::Bar;
use crate::repo::{VaultAccess, open};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Back up a disk image (raw file or block device).
    Backup {
        #[arg(long)]
        repo: String,
        /// Name of the disk; snapshots of one disk share a name.
        #[arg(long)]
        name: String,
        /// The previous snapshot of this disk (id, id prefix or name).
        #[arg(long)]
        parent: Option<String>,
        /// File of `OFFSET LENGTH` lines: the only regions that may differ from --parent.
        #[arg(long, requires = "parent")]
        changed: Option<PathBuf>,
        /// Segmentation for this backup: `cdc:MIN,AVG,MAX` or `fixed:SIZE`.
        #[arg(long)]
        chunker: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Lock the new snapshot against forgetting for this long (30d, 1y, ...); the
        /// repository's minimum lock applies anyway (`cairn repo retention`).
        #[arg(long, value_parser = cairn_types::time::parse_span)]
        lock_for: Option<u64>,
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Restore a snapshot bit-exact into OUTPUT (sparse).
    Restore {
        #[arg(long)]
        repo: String,
        snapshot: String,
        output: PathBuf,
        /// Replace OUTPUT if it exists (a file or a block device).
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    List {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ImageCmd, access: &VaultAccess) -> Result<ExitCode> {
    match cmd {
        ImageCmd::Backup {
            repo,
            name,
            parent,
            changed,
            chunker,
            threads,
            lock_for,
            json,
            image,
        } => {
            let v = open(&repo, access)?;
            let chunker = chunker
                .map(|s| ChunkerParams::parse(&s).map_err(anyhow::Error::msg))
                .transpose()?;
            let f = std::fs::File::open(&image)
                .with_context(|| format!("opening {}", image.display()))?;
            let changed = match changed {
                Some(p) => {
                    let t = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let size = cairn_types::ReadAt::size(&f)
                        .with_context(|| format!("size of {}", image.display()))?;
                    Some(
                        ExtentList::parse_within(&t, size)
                            .with_context(|| format!("in {}", p.display()))?,
                    )
                }
                None => None,
            };
            let opts = BackupOptions {
                name,
                parent,
                changed,
                chunker,
                threads,
                lock_until: lock_for.map(|s| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                        + s
                }),
                ..Default::default()
            };
            let bar = Bar::new("backup", json);
            let m = imager::backup(&*v, &f, &opts, &bar)?;
            bar.finish();
            if json {
                let out = serde_json::json!({
                    "snapshot": m.id,
                    "name": m.name,
                    "parent": m.parent,
                    "size": m.size,
                    "bytes_read": m.stats.bytes_read,
                    "bytes_new": m.stats.bytes_new,
                    "bytes_stored": m.stats.bytes_stored,
                    "bytes_sent": m.stats.bytes_sent,
                    "zero_bytes": m.stats.zero_bytes,
                    "segments": m.stats.segments,
                    "segments_new": m.stats.segments_new,
                    "duration_ms": m.stats.duration_ms,
                });
                println!("{out}");
            } else {
                println!(
                    "snapshot {} ({}): {} bytes, read {}, new {}, stored {}, {} ms",
                    m.id,
                    m.name,
                    m.size,
                    m.stats.bytes_read,
                    m.stats.bytes_new,
                    m.stats.bytes_stored,
                    m.stats.duration_ms
                );
            }
        }
        ImageCmd::Restore {
            repo,
            snapshot,
            output,
            force,
            threads,
            json,
        } => {
            if !force && std::fs::symlink_metadata(&output).is_ok() {
                anyhow::bail!(
                    "{} exists: restoring would replace it (give --force to do so)",
                    output.display()
                );
            }
            let v = open(&repo, access)?;
            let bar = Bar::new("restore", json);
            let st = imager::restore(&*v, &snapshot, &output, &RestoreOptions { threads }, &bar)?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                println!(
                    "restored {} ({} bytes, {} ms) to {}",
                    st.snapshot,
                    st.bytes,
                    st.duration_ms,
                    output.display()
                );
            }
        }
        ImageCmd::List { repo, json } => {
            let v = open(&repo, access)?;
            let all = v.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<32}  {:<20}  {:>14}  {:>12}  created",
                    "snapshot", "name", "size", "new bytes"
                );
                for s in all {
                    println!(
                        "{:<32}  {:<20}  {:>14}  {:>12}  {}",
                        s.id, s.name, s.size, s.stats.bytes_new, s.created
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
