//! Launching QEMU processes with a QMP socket in a private temporary directory.
//!
//! - [`QemuCommand::system`] runs `qemu-system-x86_64` **always with `-accel tcg`** (on nested
//!   setups `/dev/kvm` exists but a KVM guest crawls), `-nodefaults -display none` and
//!   `-qmp unix:DIR/qmp.sock,server=on,wait=off`.
//! - [`QemuCommand::storage_daemon`] runs `qemu-storage-daemon` with its QMP monitor on
//!   `DIR/qmp.sock`.
//! - QEMU's standard output and error go to `DIR/qemu.log` (HMP `qemu-io` prints there).
//! - [`QemuProcess`] owns the child: dropping it sends SIGKILL to that PID and reaps it, then
//!   removes the directory. Nothing else is ever signalled.
//!
//! The program is found on `PATH`, or taken from `CAIRN_QEMU_SYSTEM` /
//! `CAIRN_QEMU_STORAGE_DAEMON` when set.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::{Instant, sleep};

use crate::qmp::{QmpClient, QmpError, QmpOptions};

/// The system emulator this crate drives.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";
/// The storage daemon.
pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// Errors of launching and controlling a QEMU process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program is not installed (Debian: `qemu-system-x86` or `qemu-utils`).
    #[error("{program} not found on PATH")]
    NotFound { program: String },
    #[error("creating the QEMU runtime directory")]
    RuntimeDir(#[source] std::io::Error),
    #[error("starting {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before it was ready; `log` is the end of its output.
    #[error("{} exited early ({status}): {log}", program.display())]
    Exited {
        program: PathBuf,
        status: ExitStatus,
        log: String,
    },
    #[error("QEMU's QMP socket did not come up within {0:?}")]
    NotReady(Duration),
    /// QEMU did not exit after `quit`; it was killed.
    #[error("QEMU did not exit within {0:?} of quit")]
    QuitTimeout(Duration),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Which QEMU program a [`QemuCommand`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuKind {
    System,
    StorageDaemon,
}

/// Finds an executable: a path containing `/` is taken as is, a bare name is searched on `PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| is_exec(p))
}

/// A QEMU command line being assembled. The runtime directory exists from construction on, so
/// arguments can name sockets and files in it ([`QemuCommand::dir`]).
pub struct QemuCommand {
    kind: QemuKind,
    program: String,
    args: Vec<OsString>,
    dir: TempDir,
}

impl fmt::Debug for QemuCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuCommand")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl QemuCommand {
    /// `qemu-system-x86_64 -accel tcg -nodefaults -display none -qmp unix:DIR/qmp.sock,...`.
    pub fn system() -> Result<Self, ProcessError> {
        let mut cmd = Self::new(QemuKind::System, "CAIRN_QEMU_SYSTEM", QEMU_SYSTEM)?;
        let qmp = cmd.qmp_socket();
        let mut qmp_arg = OsString::from("unix:");
        qmp_arg.push(qmp.as_os_str());
        qmp_arg.push(",server=on,wait=off");
        cmd = cmd
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-qmp"])
            .arg(qmp_arg);
        Ok(cmd)
    }

    /// `qemu-storage-daemon --chardev socket,path=DIR/qmp.sock,... --monitor chardev=qmp0`.
    pub fn storage_daemon() -> Result<Self, ProcessError> {
        let cmd = Self::new(
            QemuKind::StorageDaemon,
            "CAIRN_QEMU_STORAGE_DAEMON",
            QEMU_STORAGE_DAEMON,
        )?;
        let mut chardev = OsString::from("socket,id=qmp0,server=on,wait=off,path=");
        chardev.push(cmd.qmp_socket().as_os_str());
        Ok(cmd
            .arg("--chardev")
            .arg(chardev)
            .args(["--monitor", "chardev=qmp0"]))
    }

    fn new(kind: QemuKind, env: &str, default: &str) -> Result<Self, ProcessError> {
        let program = std::env::var(env).unwrap_or_else(|_| default.to_owned());
        let dir = tempfile::Builder::new()
            .prefix("cairn-qemu-")
            .tempdir()
            .map_err(ProcessError::RuntimeDir)?;
        Ok(Self {
            kind,
            program,
            args: Vec::new(),
            dir,
        })
    }

    /// The private runtime directory (sockets, logs, scratch files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the QMP socket will be.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Starts the process. Returns once it is spawned; see [`QemuProcess::connect_qmp`].
    pub fn spawn(self) -> Result<QemuProcess, ProcessError> {
        let program = find_program(&self.program).ok_or_else(|| ProcessError::NotFound {
            program: self.program.clone(),
        })?;
        let log_path = self.dir.path().join("qemu.log");
        let log = File::create(&log_path).map_err(ProcessError::RuntimeDir)?;
        let log_err = log.try_clone().map_err(ProcessError::RuntimeDir)?;
        tracing::debug!(program = %program.display(), args = ?self.args, "starting QEMU");
        let child = Command::new(&program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: program.clone(),
                source,
            })?;
        Ok(QemuProcess {
            qmp_socket: self.dir.path().join("qmp.sock"),
            kind: self.kind,
            program,
            child,
            log_path,
            dir: self.dir,
        })
    }
}

/// A running QEMU process; killed (by its PID only) and reaped on drop.
pub struct QemuProcess {
    kind: QemuKind,
    program: PathBuf,
    child: Child,
    qmp_socket: PathBuf,
    log_path: PathBuf,
    // Dropped last: the directory goes once the process is dead.
    dir: TempDir,
}

impl fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuProcess")
            .field("kind", &self.kind)
            .field("pid", &self.child.id())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl QemuProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Which program this is.
    pub fn kind(&self) -> QemuKind {
        self.kind
    }

    /// The private runtime directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// QEMU's standard output and error.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// QEMU's output so far (lossy UTF-8).
    pub fn read_log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Connects to the QMP socket, retrying until it appears, the process exits, or `timeout`.
    pub async fn connect_qmp(
        &mut self,
        options: QmpOptions,
        timeout: Duration,
    ) -> Result<QmpClient, ProcessError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(5);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.exited(status));
            }
            if self.qmp_socket.exists() {
                match QmpClient::connect(&self.qmp_socket, options.clone()).await {
                    Ok(client) => return Ok(client),
                    Err(QmpError::Connect { .. }) => {}
                    Err(e) => {
                        if let Ok(Some(status)) = self.child.try_wait() {
                            return Err(self.exited(status));
                        }
                        return Err(e.into());
                    }
                }
            }
            if Instant::now() + delay > deadline {
                return Err(ProcessError::NotReady(timeout));
            }
            sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks QEMU to exit cleanly (QMP `quit`, which also stores persistent dirty bitmaps) and
    /// waits up to `timeout`; past that it is killed and [`ProcessError::QuitTimeout`] returned.
    pub async fn quit(
        &mut self,
        qmp: &QmpClient,
        timeout: Duration,
    ) -> Result<ExitStatus, ProcessError> {
        match qmp.execute_with_timeout("quit", None, timeout).await {
            // QEMU may close the socket before its reply makes it out.
            Ok(_) => {}
            Err(e) if e.is_disconnected() => {}
            Err(e) => {
                self.kill().ok();
                return Err(e.into());
            }
        }
        match self.wait_exit(timeout).await {
            Some(status) => Ok(status),
            None => {
                self.kill().ok();
                Err(ProcessError::QuitTimeout(timeout))
            }
        }
    }

    /// Sends SIGKILL to this process and reaps it.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }

    fn exited(&self, status: ExitStatus) -> ProcessError {
        let log = self.read_log();
        let tail: String = {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        };
        ProcessError::Exited {
            program: self.program.clone(),
            status,
            log: tail,
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(pid = self.child.id(), error = %e, "could not kill QEMU");
        }
    }
}
