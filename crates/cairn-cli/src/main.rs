//! `cairn`: the one binary. Subcommands either act on a repository (a directory or a vault
//! service at `https://HOST:PORT`) or run a service.

mod host_agent;
mod image;
mod progress;
mod repo;
mod service;
mod storage_agent;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Cairn: VM backup with a deduplicating vault.
#[derive(Parser, Debug)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create, check and maintain repositories.
    #[command(subcommand)]
    Repo(repo::RepoCmd),
    /// Back up and restore disk images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Run the vault service over a local repository.
    Vault(service::VaultArgs),
    /// Run the storage agent over local datastores.
    StorageAgent(storage_agent::StorageAgentArgs),
    /// Run the QEMU host agent service over a state directory.
    HostAgent(host_agent::HostAgentArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Repo(c) => repo::run(c),
        Cmd::Image(c) => image::run(c),
        Cmd::Vault(a) => service::run(a),
        Cmd::StorageAgent(a) => storage_agent::run(a),
        Cmd::HostAgent(a) => host_agent::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
