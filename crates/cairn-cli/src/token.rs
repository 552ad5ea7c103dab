//! `cairn token add | list | remove`: the scoped tokens of a service's state directory
//! (`STATE/tokens.json`, see `cairn_http::access`). A running service reads the file again
//! when it changes: a removed token is refused from its next request on.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_http::access::{Scope, TokenFile, tokens_path};

use crate::repo::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Make a token with scopes (ROLE:PATH, roles audit, backup, restore, admin); its secret
    /// is printed once (or written to --out, mode 0600) and never stored.
    Add {
        /// The service's state directory (a vault: REPO/service unless --state-dir).
        #[arg(long)]
        state_dir: PathBuf,
        /// A name for the token, shown in the audit log.
        #[arg(long)]
        name: String,
        /// ROLE:PATH, e.g. backup:/vault/REPO_ID; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<Scope>,
        /// Write the secret to this file (created, mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens: names, scopes, creation times (never secrets).
    List {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove (revoke) a token.
    Remove {
        #[arg(long)]
        state_dir: PathBuf,
        name: String,
    },
}

pub fn run(cmd: TokenCmd) -> Result<ExitCode> {
    match cmd {
        TokenCmd::Add {
            state_dir,
            name,
            scopes,
            out,
            json,
        } => {
            let path = tokens_path(&state_dir);
            let mut f = TokenFile::load(&path)?;
            let secret = f.add(&name, scopes.clone()).map_err(anyhow::Error::msg)?;
            if let Some(o) = &out {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut w = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(o)
                    .with_context(|| format!("creating {}", o.display()))?;
                writeln!(w, "{secret}")?;
            }
            std::fs::create_dir_all(&state_dir)?;
            f.save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            let shown = if out.is_some() { None } else { Some(secret) };
            if json {
                print_json(&serde_json::json!({
                    "name": name, "scopes": scopes, "secret": shown, "out": out,
                }));
            } else if let Some(s) = shown {
                println!("{s}");
                eprintln!("token {name:?} added; its secret is shown once, above");
            } else {
                eprintln!("token {name:?} added; its secret is in the --out file");
            }
        }
        TokenCmd::List { state_dir, json } => {
            let f = TokenFile::load(&tokens_path(&state_dir))?;
            if json {
                print_json(&f.tokens);
            } else {
                for t in &f.tokens {
                    let scopes: Vec<String> = t.scopes.iter().map(ToString::to_string).collect();
                    println!(
                        "{}  {}  created {}",
                        t.name,
                        scopes.join(" "),
                        cairn_types::time::rfc3339(t.created)
                    );
                }
                println!(
                    "{} scoped tokens (plus the service's admin token)",
                    f.tokens.len()
                );
            }
        }
        TokenCmd::Remove { state_dir, name } => {
            let path = tokens_path(&state_dir);
            let mut f = TokenFile::load(&path)?;
            anyhow::ensure!(
                f.remove(&name),
                "no token named {name:?} in {}",
                path.display()
            );
            f.save(&path)?;
            println!("token {name:?} removed: refused from its next request on");
        }
    }
    Ok(ExitCode::SUCCESS)
}
