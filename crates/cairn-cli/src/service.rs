//! `cairn vault`: serve a local repository over HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_vault::Repository;

use crate::identity::IdentityArgs;
use cairn_vault::service::{ServiceOptions, VaultService};

#[derive(clap::Args, Debug)]
pub struct VaultArgs {
    /// The repository to serve: a directory or s3://BUCKET[/PREFIX] (created if there is none).
    #[arg(long)]
    repo: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where the certificate and token live (default: REPO/service for a directory; beside
    /// the local cache, CACHE.service, for an S3 repository).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Seconds a backup session may go without a request before it is aborted and its lock
    /// released (clients renew it while they are alive).
    #[arg(long, default_value_t = cairn_vault::service::DEFAULT_SESSION_LEASE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    session_lease: u64,
}

/// TLS identity, fingerprint and token of a service.
pub struct Credentials {
    pub tls: cairn_http::server::ServerTls,
    pub fingerprint: String,
    pub token: String,
    pub token_file: PathBuf,
}

/// Loads or creates a service's certificate ([`IdentityArgs`]: self-signed, given, or from
/// the CA by a join token) and its token (`CAIRN_TOKEN`, else `STATE/token`). A certificate
/// from the CA is also presented on every call this process makes; `roles` are the roles
/// whose certificates may call the service under mutual TLS.
pub fn credentials(state: &Path, ident: &IdentityArgs, roles: &[&str]) -> Result<Credentials> {
    let (identity, clients) = match ident.resolve(state, roles)? {
        Some(r) => {
            if r.ca_issued {
                cairn_http::client::present_by_default(r.identity.clone());
            }
            (r.identity, r.clients)
        }
        None => (
            cairn_http::tls::ensure_self_signed(&state.join("tls"), &[])?.0,
            None,
        ),
    };
    let pem = std::fs::read(&identity.cert_path)
        .with_context(|| format!("reading {}", identity.cert_path.display()))?;
    let fingerprint = rustls_fingerprint(&pem)?;
    let token_file = state.join("token");
    let token = match std::env::var("CAIRN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => cairn_http::server::ensure_token(&token_file)
            .with_context(|| format!("token file {}", token_file.display()))?,
    };
    let tls = cairn_http::server::ServerTls::new(&identity, clients)?;
    Ok(Credentials {
        tls,
        fingerprint,
        token,
        token_file,
    })
}

/// Runs a service: `start` binds and returns the address and the serving task; then one JSON
/// line on stdout tells scripts where and how to connect, and SIGTERM or Ctrl-C stops it.
pub fn serve_until_signal<F, Fut>(what: &str, creds: Credentials, start: F) -> Result<ExitCode>
where
    F: FnOnce(cairn_http::server::ServerTls, String) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)>>,
{
    serve_registered(what, creds, None, start)
}

/// As [`serve_until_signal`], and once bound, registers with the manager and heartbeats.
pub fn serve_registered<F, Fut>(
    what: &str,
    creds: Credentials,
    announce: Option<crate::register::Announce>,
    start: F,
) -> Result<ExitCode>
where
    F: FnOnce(cairn_http::server::ServerTls, String) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)>>,
{
    let fingerprint = creds.fingerprint.clone();
    let token = creds.token.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (addr, handle) = start(creds.tls, creds.token).await?;
        if let Some(a) = announce {
            a.start(&format!("https://{addr}"), &fingerprint, &token);
        }
        println!(
            "{}",
            serde_json::json!({
                "listen": format!("https://{addr}"),
                "fingerprint": creds.fingerprint,
                "token_file": creds.token_file,
                "pid": std::process::id(),
            })
        );
        eprintln!(
            "{what} serving on https://{addr} (certificate SHA-256 {})",
            creds.fingerprint
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = handle => {}
        }
        eprintln!("{what}: stopping");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn run(a: VaultArgs) -> Result<ExitCode> {
    let repo = match Repository::open_location(&a.repo) {
        Ok(r) => r,
        Err(cairn_vault::VaultError::NotARepository(_)) => {
            Repository::init_location(&a.repo, &Default::default())?
        }
        Err(e) => return Err(e.into()),
    };
    // A directory keeps the service's state inside; an S3 repository beside its local
    // cache (not in it: a cache may be emptied and rebuilt, the service's identity may not).
    let s3 = a.repo.to_str().is_some_and(cairn_vault::location::is_s3);
    let state = a.state_dir.clone().unwrap_or_else(|| {
        if s3 {
            PathBuf::from(format!("{}.service", repo.cache_dir().display()))
        } else {
            repo.cache_dir().join("service")
        }
    });
    let creds = credentials(&state, &a.identity, crate::identity::VAULT_CALLERS)?;
    let repo_id = repo.config().id.clone();
    let service = VaultService::with_options(
        repo,
        ServiceOptions {
            session_lease: std::time::Duration::from_secs(a.session_lease),
            ..Default::default()
        },
    );
    let rule = cairn_vault::service::access_rule(&repo_id);
    serve_until_signal(
        &format!("vault {}", a.repo.display()),
        creds,
        move |tls, token| async move {
            let access = cairn_http::access::Access::from_state("vault", &token, &state, rule)?;
            cairn_vault::service::serve_with(service, a.listen, tls, Arc::new(access)).await
        },
    )
}

fn rustls_fingerprint(pem: &[u8]) -> Result<String> {
    let mut rd = pem;
    let der = cairn_http::tls::first_cert_der(&mut rd).context("no certificate in --cert")?;
    Ok(cairn_http::tls::fingerprint(&der))
}
