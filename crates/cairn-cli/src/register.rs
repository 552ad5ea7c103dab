//! `--manager`: how an agent registers with the manager and heartbeats.

use std::time::Duration;

use anyhow::{Context, Result};
use cairn_api::ManagerApi;
use cairn_api::ManagerClient;
use cairn_api::manager::{AgentKind, Registration};

/// Options of an agent that registers with a manager.
#[derive(clap::Args, Debug, Clone)]
pub struct ManagerArgs {
    /// The manager's URL (`https://HOST:PORT`); without it the agent does not register.
    #[arg(long, env = "CAIRN_MANAGER")]
    pub manager: Option<String>,
    /// SHA-256 of the manager's certificate.
    #[arg(long, env = "CAIRN_MANAGER_FINGERPRINT")]
    pub manager_fingerprint: Option<String>,
    /// File holding the manager's token.
    #[arg(long, env = "CAIRN_MANAGER_TOKEN_FILE")]
    pub manager_token_file: Option<std::path::PathBuf>,
    /// This agent's name in the inventory (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_s: u64,
}

/// What an agent announces once it listens.
pub struct Announce {
    kind: AgentKind,
    name: String,
    manager: ManagerClient,
    every: Duration,
}

impl Announce {
    pub fn from_args(kind: AgentKind, a: &ManagerArgs) -> Result<Option<Self>> {
        let Some(url) = &a.manager else {
            return Ok(None);
        };
        let fp = a
            .manager_fingerprint
            .clone()
            .context("--manager needs --manager-fingerprint")?;
        let token = match &a.manager_token_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
            None => std::env::var("CAIRN_MANAGER_TOKEN")
                .context("--manager needs --manager-token-file or CAIRN_MANAGER_TOKEN")?,
        };
        let name = a.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        });
        Ok(Some(Self::new(
            kind,
            &name,
            ManagerClient::new(url, &token, &cairn_http::Trust::Fingerprint(fp))?,
            Duration::from_secs(a.heartbeat_s.max(1)),
        )))
    }

    pub fn new(kind: AgentKind, name: &str, manager: ManagerClient, every: Duration) -> Self {
        Self {
            kind,
            name: name.into(),
            manager,
            every,
        }
    }

    /// Registers once now (so the agent is known before its first request) and keeps
    /// heartbeating in the background.
    pub fn start(self, url: &str, fingerprint: &str, token: &str) {
        let reg = Registration {
            kind: self.kind,
            name: self.name,
            url: url.into(),
            fingerprint: fingerprint.into(),
            token: token.into(),
        };
        if let Err(e) = self.manager.heartbeat(&reg) {
            eprintln!("warning: registering with the manager failed (will retry): {e}");
        }
        cairn_api::spawn_heartbeat(self.manager, reg, self.every);
    }
}
