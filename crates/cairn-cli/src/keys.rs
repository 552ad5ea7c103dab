//! Passphrases and key files of encrypted repositories: where the CLI gets them, and
//! `cairn repo key ...`.
//!
//! A command that opens an encrypted repository takes `--key-file FILE` (or `CAIRN_KEY_FILE`)
//! if given, else the passphrase in `CAIRN_PASSWORD`, else asks for it on the terminal; with
//! none of them (no terminal) it fails with a clear message. Maintenance that works on
//! ciphertext (verify without `--read-data`, prune, gc, forget) runs without a key when none is
//! given.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_chunk::wrap::KdfParams;
use cairn_vault::keys::Secret;
use cairn_vault::{Credential, Repository};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// List the wrapped keys (passphrases and key files) of an encrypted repository.
    List {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase (from CAIRN_NEW_PASSWORD, or asked for) or, with --new-key-file, a
    /// new key file. No data object changes.
    Add {
        dir: PathBuf,
        /// Write a new key file here (mode 0600) instead of adding a passphrase.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
    /// Remove a wrapped key by id (refuses the last one).
    Remove { dir: PathBuf, id: String },
    /// Change a passphrase: the old one from CAIRN_PASSWORD (or asked for), the new one from
    /// CAIRN_NEW_PASSWORD (or asked for twice). The key the old passphrase opened is removed;
    /// no data object changes.
    Passwd { dir: PathBuf },
    /// Write the master key to a key file (it opens the repository even if every wrapped key
    /// is removed), or print it as a paper recovery key with --paper.
    Export {
        dir: PathBuf,
        /// The key file to write (mode 0600; never overwritten).
        #[arg(required_unless_present = "paper")]
        out: Option<PathBuf>,
        #[arg(long)]
        paper: bool,
    },
}

/// Whether a command needs the key of an encrypted repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// Reads or writes data: fails without a key.
    Required,
    /// Works on ciphertext; uses a key given by file or `CAIRN_PASSWORD`, never asks.
    Optional,
}

/// The credential given: `--key-file`, then `CAIRN_PASSWORD`, then (when `ask`) a prompt.
pub fn credential(key_file: Option<&Path>, ask: bool) -> Result<Option<Credential>> {
    if let Some(f) = key_file {
        return Ok(Some(Credential::read_key_file(f)?));
    }
    if let Ok(p) = std::env::var("CAIRN_PASSWORD")
        && !p.is_empty()
    {
        return Ok(Some(Credential::passphrase(p)));
    }
    if !ask {
        return Ok(None);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "this repository is encrypted: set CAIRN_PASSWORD or give --key-file FILE \
             (no terminal to ask for the passphrase on)"
        );
    }
    Ok(Some(Credential::passphrase(prompt("passphrase: ")?)))
}

/// Reads a line from the terminal without echoing it.
fn prompt(what: &str) -> Result<String> {
    let stdin = std::io::stdin();
    eprint!("{what}");
    std::io::stderr().flush().ok();
    let old = rustix::termios::tcgetattr(&stdin).ok();
    if let Some(t) = &old {
        let mut quiet = t.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet);
    }
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = &old {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, t);
    }
    eprintln!();
    r.context("reading the passphrase")?;
    let p = line.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!p.is_empty(), "an empty passphrase");
    Ok(p)
}

/// A new passphrase: `var` if set, else asked twice on the terminal.
pub fn new_passphrase(var: &str) -> Result<Secret> {
    if let Ok(p) = std::env::var(var)
        && !p.is_empty()
    {
        return Ok(Secret(p.into_bytes()));
    }
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "set {var} to the new passphrase (no terminal to ask for it on)"
    );
    let a = prompt("new passphrase: ")?;
    let b = prompt("new passphrase again: ")?;
    anyhow::ensure!(a == b, "the two passphrases differ");
    Ok(Secret(a.into_bytes()))
}

/// Opens a repository (a directory or `s3://...`) and unlocks it as `use_` says.
pub fn open_dir(
    dir: &Path,
    key_file: Option<&Path>,
    use_: KeyUse,
) -> Result<std::sync::Arc<Repository>> {
    let r = Repository::open_location(dir)?;
    unlock(r.is_encrypted(), key_file, use_, |c| Ok(r.unlock(c)?))?;
    Ok(r)
}

/// Unlocks with `f` when the repository is encrypted and a credential is at hand (asked for
/// when required).
pub fn unlock(
    encrypted: bool,
    key_file: Option<&Path>,
    use_: KeyUse,
    f: impl FnOnce(&Credential) -> Result<()>,
) -> Result<()> {
    if !encrypted {
        return Ok(());
    }
    match credential(key_file, use_ == KeyUse::Required)? {
        Some(c) => f(&c),
        None => Ok(()),
    }
}

pub fn run(cmd: KeyCmd, key_file: Option<&Path>) -> Result<ExitCode> {
    match cmd {
        KeyCmd::List { dir, json } => {
            let r = Repository::open_location(&dir)?;
            anyhow::ensure!(r.is_encrypted(), "{} is not encrypted", dir.display());
            let keys = r.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                for k in &keys {
                    println!(
                        "{}  {:<10}  created {}",
                        k.id,
                        format!("{:?}", k.kind),
                        k.created
                    );
                }
            }
        }
        KeyCmd::Add { dir, new_key_file } => {
            let r = open_dir(&dir, key_file, KeyUse::Required)?;
            anyhow::ensure!(r.is_encrypted(), "{} is not encrypted", dir.display());
            let id = match new_key_file {
                Some(f) => r.add_key_file(&f)?,
                None => {
                    let p = new_passphrase("CAIRN_NEW_PASSWORD")?;
                    r.add_passphrase(&p.0, KdfParams::default())?
                }
            };
            println!("added key {id}");
        }
        KeyCmd::Remove { dir, id } => {
            // Proving the key is held keeps a stranger with write access to the directory
            // from locking its owner out through this command.
            let r = open_dir(&dir, key_file, KeyUse::Required)?;
            r.remove_key(&id)?;
            println!("removed key {id}");
        }
        KeyCmd::Passwd { dir } => {
            let r = Repository::open_location(&dir)?;
            anyhow::ensure!(r.is_encrypted(), "{} is not encrypted", dir.display());
            let old = match std::env::var("CAIRN_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    anyhow::ensure!(
                        std::io::stdin().is_terminal(),
                        "set CAIRN_PASSWORD to the current passphrase (no terminal to ask on)"
                    );
                    prompt("current passphrase: ")?
                }
            };
            let new = new_passphrase("CAIRN_NEW_PASSWORD")?;
            let id = r.change_passphrase(old.as_bytes(), &new.0, KdfParams::default())?;
            println!("changed the passphrase: key {id} replaces the old one");
        }
        KeyCmd::Export { dir, out, paper } => {
            let r = open_dir(&dir, key_file, KeyUse::Required)?;
            anyhow::ensure!(r.is_encrypted(), "{} is not encrypted", dir.display());
            if paper {
                println!("{}", r.paper_key()?);
                eprintln!(
                    "keep this recovery key on paper, away from the repository: with it, \
                     `--key-file` of a file holding it opens the repository"
                );
            } else {
                let out = out.expect("clap requires it");
                cairn_vault::keys::write_key_file(&out, &r.export_key()?)?;
                println!("wrote the master key to {}", out.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
