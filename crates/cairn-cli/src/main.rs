//! `cairn`: the one binary. Subcommands either act on a repository (a directory or a vault
//! service at `https://HOST:PORT`) or run a service.

mod allinone;
mod ca;
mod control;
mod demo;
mod demo_libvirt;
mod host_agent;
mod identity;
mod image;
mod keys;
mod ops;
mod progress;
mod register;
mod repo;
mod retention;
mod service;
mod storage_agent;
mod token;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Cairn: VM backup with a deduplicating vault.
#[derive(Parser, Debug)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    conn: ops::Conn,
    #[command(flatten)]
    s3: S3Args,
}

/// Where an `s3://BUCKET[/PREFIX]` repository is: each flag wins over its `AWS_*` variable.
#[derive(clap::Args, Debug, Clone)]
struct S3Args {
    /// The S3 endpoint, `http(s)://HOST[:PORT]` (else AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL).
    #[arg(long, global = true)]
    s3_endpoint: Option<String>,
    /// The S3 region (else AWS_REGION, AWS_DEFAULT_REGION; default us-east-1).
    #[arg(long, global = true)]
    s3_region: Option<String>,
    /// The access key id (else AWS_ACCESS_KEY_ID).
    #[arg(long, global = true)]
    s3_access_key: Option<String>,
    /// A file holding the secret key (else AWS_SECRET_ACCESS_KEY).
    #[arg(long, global = true)]
    s3_secret_key_file: Option<std::path::PathBuf>,
    /// The CA of an https endpoint (else AWS_CA_BUNDLE; default the system's bundle).
    #[arg(long, global = true)]
    s3_ca_file: Option<std::path::PathBuf>,
    /// Where S3 repositories keep their local, rebuildable cache (the index) (else
    /// CAIRN_CACHE_DIR, $XDG_CACHE_HOME/cairn, ~/.cache/cairn).
    #[arg(long, global = true)]
    cache_dir: Option<std::path::PathBuf>,
}

impl S3Args {
    fn install(&self) -> anyhow::Result<()> {
        let secret_key = match &self.s3_secret_key_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        anyhow::anyhow!("reading the S3 secret key from {}: {e}", f.display())
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        cairn_vault::location::set_s3_overrides(cairn_vault::location::S3Overrides {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key: self.s3_access_key.clone(),
            secret_key,
            ca_file: self.s3_ca_file.clone(),
            cache_dir: self.cache_dir.clone(),
        });
        Ok(())
    }
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
    /// Scoped tokens of a service (who may back up, restore, audit, administer).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// The deployment's certificate authority: join tokens, certificates, revocation.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Run the storage agent over local datastores.
    StorageAgent(storage_agent::StorageAgentArgs),
    /// Run the QEMU host agent service over a state directory.
    HostAgent(host_agent::HostAgentArgs),
    /// Run the VM management server (inventory, agent registry, snapshot relay).
    Manager(control::ManagerArgs),
    /// Run the backup server (jobs, catalog, schedules, REST API).
    Server(control::ServerArgs),
    /// Run every role in one process on the embedded defaults.
    AllInOne(allinone::AllInOneArgs),
    /// The guided demo: tiny QEMU guests, every backup and restore flow, a summary.
    Demo(demo::DemoArgs),
    /// VMs and their backups.
    #[command(subcommand)]
    Vm(ops::VmCmd),
    /// Back up VMs (full the first time, incremental after); --group for one targeted
    /// snapshot of all of them.
    Backup {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        group: bool,
        /// Read every disk whole even when a previous backup exists.
        #[arg(long)]
        full: bool,
        /// Back up the disks Cairn can read and skip, with a warning, those it cannot (a
        /// network disk, a path no storage agent serves) instead of refusing the VM.
        #[arg(long)]
        skip_unprotected: bool,
        /// Print the job and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// List backups (of one VM).
    Backups { vm: Option<String> },
    /// Restore a backup of VM as a new VM.
    Restore {
        vm: String,
        #[arg(long)]
        backup: String,
        #[arg(long = "as")]
        as_name: String,
        #[arg(long)]
        host: Option<String>,
        /// Restore the disks only.
        #[arg(long)]
        no_start: bool,
        /// Wait until the guest agent answers (seconds; 0 = do not wait).
        #[arg(long, default_value_t = 0)]
        wait_boot: u64,
        /// Write the backup over the disks of the existing, shut-off VM named by `--as`
        /// (only differing regions), instead of creating a new VM.
        #[arg(long)]
        over_existing: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Jobs: list, show, cancel.
    #[command(subcommand)]
    Job(ops::JobCmd),
    /// Backup schedules.
    #[command(subcommand)]
    Schedule(ops::ScheduleCmd),
    /// Retention policies.
    #[command(subcommand)]
    Retention(ops::RetentionCmd),
    /// Apply retention now.
    Prune {
        vms: Vec<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Disk-data counters of the server and the storage agents.
    Stats,
    /// Whether the server is the active one (servers sharing a PostgreSQL catalog take turns
    /// through a lease), and which server holds the lease.
    Leader,
    /// The file catalog: list, search, versions, restore single files.
    #[command(subcommand)]
    Files(ops::FilesCmd),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Some(cert), Some(key)) = (&cli.conn.client_cert, &cli.conn.client_key) {
        cairn_http::client::present_by_default(cairn_http::tls::Identity {
            cert_path: cert.clone(),
            key_path: key.clone(),
        });
    }
    if let Err(e) = cli.s3.install() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let vault = repo::VaultAccess {
        token_file: cli.conn.token_file_given(&matches),
        key_file: cli.conn.key_file.clone(),
    };
    let r = match cli.cmd {
        Cmd::Repo(c) => repo::run(c, &vault),
        Cmd::Image(c) => image::run(c, &vault),
        Cmd::Vault(a) => service::run(a),
        Cmd::Token(c) => token::run(c),
        Cmd::Ca(c) => ca::run(c),
        Cmd::StorageAgent(a) => storage_agent::run(a),
        Cmd::HostAgent(a) => host_agent::run(a),
        Cmd::Manager(a) => control::run_manager(a),
        Cmd::Server(a) => control::run_server(a),
        Cmd::AllInOne(a) => allinone::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Vm(c) => ops::vm(&cli.conn, c),
        Cmd::Backup {
            vms,
            group,
            full,
            skip_unprotected,
            no_wait,
        } => ops::backup(
            &cli.conn,
            cairn_api::server::StartBackup {
                vms,
                group,
                full,
                skip_unprotected,
            },
            no_wait,
        ),
        Cmd::Backups { vm } => ops::backups(&cli.conn, vm),
        Cmd::Restore {
            vm,
            backup,
            as_name,
            host,
            no_start,
            wait_boot,
            over_existing,
            no_wait,
        } => ops::restore(
            &cli.conn,
            &vm,
            &backup,
            cairn_api::server::RestoreParams {
                backup: String::new(),
                as_name,
                host,
                start: !no_start && !over_existing,
                wait_boot_s: wait_boot,
                over_existing,
            },
            no_wait,
        ),
        Cmd::Job(c) => ops::job(&cli.conn, c),
        Cmd::Schedule(c) => ops::schedule(&cli.conn, c),
        Cmd::Retention(c) => ops::retention(&cli.conn, c),
        Cmd::Prune { vms, dry_run } => ops::prune(&cli.conn, vms, dry_run),
        Cmd::Stats => ops::stats(&cli.conn),
        Cmd::Leader => ops::leader(&cli.conn),
        Cmd::Files(c) => ops::files(&cli.conn, c),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
