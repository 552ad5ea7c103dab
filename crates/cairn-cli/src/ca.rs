//! `cairn ca`: the deployment's certificate authority in the backup server's state directory
//! (`STATE/ca`, see `cairn_http::ca`). A running server reads the same files: a join token
//! made here is good at once, a revocation refused at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_http::ca::{Ca, ServiceId};

use crate::repo::print_json;

#[derive(clap::Subcommand, Debug)]
pub enum CaCmd {
    /// Create the CA (a running or starting server creates it too); prints its certificate's
    /// path and SHA-256.
    Init {
        /// The backup server's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a single-use join token for one service (ROLE/NAME: host/h1, storage/st1, vault/v,
    /// manager/m); the service starts once with `--join URL --join-token TOKEN`.
    JoinToken {
        #[arg(long)]
        state_dir: PathBuf,
        id: String,
        /// How long the token may wait to be used (e.g. 30m, 1h, 2d).
        #[arg(long, default_value = "1h", value_parser = cairn_types::time::parse_span)]
        ttl: u64,
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate and key for a service that does not join (the manager and the
    /// vault set up before the server starts, an operator's CLI): writes OUT/cert.pem,
    /// OUT/key.pem (0600) and OUT/ca.pem.
    Issue {
        #[arg(long)]
        state_dir: PathBuf,
        id: String,
        #[arg(long)]
        out: PathBuf,
        /// Host names or addresses the service serves on, besides localhost.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365d", value_parser = cairn_types::time::parse_span)]
        valid_for: u64,
        #[arg(long)]
        json: bool,
    },
    /// List the certificates issued and the join tokens (never secrets).
    List {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke certificates by serial or by identity (ROLE/NAME): services refuse them from
    /// their next request on.
    Revoke {
        #[arg(long)]
        state_dir: PathBuf,
        who: String,
        #[arg(long)]
        json: bool,
    },
}

fn open(state: &std::path::Path) -> Result<Ca> {
    Ok(Ca::open_or_create(&state.join("ca"))?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn time(ms: i64) -> String {
    cairn_types::time::rfc3339(u64::try_from(ms / 1000).unwrap_or(0))
}

pub fn run(cmd: CaCmd) -> Result<ExitCode> {
    match cmd {
        CaCmd::Init { state_dir, json } => {
            let ca = open(&state_dir)?;
            let der = cairn_http::tls::first_cert_der(&mut ca.cert_pem().as_bytes())
                .context("the CA certificate")?;
            let fp = cairn_http::tls::fingerprint(&der);
            if json {
                print_json(&serde_json::json!({"ca": ca.cert_path(), "fingerprint": fp,
                    "crl": ca.crl_path()}));
            } else {
                println!("CA certificate {} (SHA-256 {fp})", ca.cert_path().display());
            }
        }
        CaCmd::JoinToken {
            state_dir,
            id,
            ttl,
            json,
        } => {
            let id = ServiceId::parse(&id)?;
            let (secret, t) = open(&state_dir)?.join_token(&id, Duration::from_secs(ttl))?;
            if json {
                print_json(&serde_json::json!({"id": t.id, "for": id.to_string(),
                    "expires": time(t.expires_ms), "secret": secret}));
            } else {
                println!("{secret}");
                eprintln!(
                    "join token {} for {id}, single use, valid until {}",
                    t.id,
                    time(t.expires_ms)
                );
            }
        }
        CaCmd::Issue {
            state_dir,
            id,
            out,
            hosts,
            valid_for,
            json,
        } => {
            let id = ServiceId::parse(&id)?;
            let ca = open(&state_dir)?;
            let now = now_ms();
            let until =
                now.saturating_add(i64::try_from(valid_for).unwrap_or(i64::MAX / 2000) * 1000);
            let pair = ca.issue(&id, &hosts, Some((now - 60_000, until)))?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            cairn_types::durable::write_atomic_private(
                &out.join("key.pem"),
                pair.key_pem.as_bytes(),
            )?;
            cairn_types::durable::write_atomic(&out.join("cert.pem"), pair.cert_pem.as_bytes())?;
            cairn_types::durable::write_atomic(&out.join("ca.pem"), ca.cert_pem().as_bytes())?;
            if json {
                print_json(
                    &serde_json::json!({"id": id.to_string(), "serial": pair.cert.serial,
                    "fingerprint": pair.cert.fingerprint, "out": out,
                    "not_after": time(pair.cert.not_after_ms)}),
                );
            } else {
                println!(
                    "{id}: certificate {} in {} (SHA-256 {}), valid until {}",
                    pair.cert.serial,
                    out.display(),
                    pair.cert.fingerprint,
                    time(pair.cert.not_after_ms)
                );
            }
        }
        CaCmd::List { state_dir, json } => {
            let book = open(&state_dir)?.book()?;
            if json {
                print_json(&serde_json::to_value(&book)?);
            } else {
                for c in &book.issued {
                    println!(
                        "{}  {:<24} until {}  {}{}",
                        c.serial,
                        c.id.to_string(),
                        time(c.not_after_ms),
                        c.via,
                        c.revoked_ms
                            .map(|r| format!("  REVOKED {}", time(r)))
                            .unwrap_or_default()
                    );
                }
                for t in &book.joins {
                    let state = match (t.used_ms, t.expires_ms <= now_ms()) {
                        (Some(u), _) => format!("used {}", time(u)),
                        (None, true) => "expired".into(),
                        (None, false) => format!("open until {}", time(t.expires_ms)),
                    };
                    println!("join {}  {:<24} {state}", t.id, t.identity.to_string());
                }
            }
        }
        CaCmd::Revoke {
            state_dir,
            who,
            json,
        } => {
            let done = open(&state_dir)?.revoke(&who)?;
            if json {
                print_json(&serde_json::to_value(&done)?);
            } else if done.is_empty() {
                println!("{who}: already revoked");
            } else {
                for c in &done {
                    println!("revoked {} ({})", c.serial, c.id);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
