//! A client for the QEMU guest agent (`qemu-ga`) over the host side of its virtio-serial channel:
//! the unix socket of a `-chardev socket,...,server=on` bound to a `virtserialport` named
//! `org.qemu.guest_agent.0`.
//!
//! # Protocol and invariants
//!
//! - The channel is a byte pipe with no greeting and no framing guarantees: the agent may be
//!   absent, restarting, or still holding a reply to a request that timed out. Before the first
//!   command, and again after any timeout, the client **resynchronizes**: it sends a `0xFF` byte
//!   (which makes the agent drop any partial input), then `guest-sync-delimited` with a fresh
//!   random id, and discards everything up to the `0xFF` the agent puts before its reply and
//!   every reply whose `return` is not that id.
//! - Commands carry an `id`; a reply with another id is a stale one and is discarded.
//! - One command at a time: calls are serialized by a mutex, so the type is safe to share.
//! - **Every call is bounded** by a timeout; an agent that never answers yields
//!   [`QgaError::Timeout`], never a hang. A socket error or EOF (QEMU exited) yields
//!   [`QgaError::Disconnected`] and the next call reconnects.
//! - `guest-fsfreeze-freeze` that times out or disconnects may still have frozen the guest: the
//!   caller must call [`GuestAgent::fsfreeze_thaw`] (thawing a thawed guest is harmless).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep, timeout_at};

use crate::wire::{Frame, MAX_MESSAGE_BYTES, read_frame, trim};

/// The byte that resets the agent's parser and prefixes its `guest-sync-delimited` reply.
const SYNC_DELIMITER: u8 = 0xFF;

/// Errors of the guest-agent client.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The channel's socket could not be connected.
    #[error("connecting to guest agent socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer in time (absent, hung, or the guest is not running).
    #[error("timed out after {after:?} waiting for the guest agent: {what}")]
    Timeout { what: String, after: Duration },
    /// The agent answered the command with an error.
    #[error("guest agent command {command} failed ({class}): {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The socket closed or failed (QEMU exited or the channel was reset).
    #[error("guest agent channel closed: {reason}")]
    Disconnected { reason: String },
    /// The agent sent something this client cannot use.
    #[error("guest agent protocol violation: {0}")]
    Protocol(String),
}

impl QgaError {
    /// True for [`QgaError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, QgaError::Timeout { .. })
    }
}

/// Limits of a [`GuestAgent`].
#[derive(Debug, Clone)]
pub struct QgaOptions {
    /// Connecting to the socket.
    pub connect_timeout: Duration,
    /// One `guest-sync-delimited` exchange.
    pub sync_timeout: Duration,
    /// Default bound on a command's round trip.
    pub command_timeout: Duration,
    /// Bound on `guest-fsfreeze-freeze` (flushing dirty data can take a while).
    pub freeze_timeout: Duration,
}

impl Default for QgaOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(3),
            command_timeout: Duration::from_secs(10),
            freeze_timeout: Duration::from_secs(60),
        }
    }
}

/// State of the guest's file system freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
    /// A value this crate does not know, kept verbatim.
    Other(String),
}

/// One entry of `guest-get-fsinfo`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFsInfo {
    /// Device name in the guest, e.g. `vda`.
    pub name: String,
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    #[serde(default)]
    pub used_bytes: Option<u64>,
    #[serde(default)]
    pub total_bytes: Option<u64>,
    #[serde(default)]
    pub disk: Vec<GuestDiskAddress>,
}

/// Where a guest file system's disk sits on the virtual hardware. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskAddress {
    /// `virtio`, `scsi`, `ide`, ... (kept verbatim).
    #[serde(default)]
    pub bus_type: String,
    #[serde(default)]
    pub bus: Option<i64>,
    #[serde(default)]
    pub target: Option<i64>,
    #[serde(default)]
    pub unit: Option<i64>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    /// The PCI address of the controller, as sent.
    #[serde(default)]
    pub pci_controller: Option<Value>,
}

/// What `guest-exec` should run.
#[derive(Debug, Clone, Default)]
pub struct GuestExec {
    /// Absolute path of the program in the guest.
    pub path: String,
    pub args: Vec<String>,
    /// `NAME=value` entries; empty means the agent's environment.
    pub env: Vec<String>,
    /// Bytes fed to the program's standard input.
    pub input: Option<Vec<u8>>,
    /// Capture standard output and error (returned by `guest-exec-status`).
    pub capture_output: bool,
}

impl GuestExec {
    /// `/bin/sh -c SCRIPT` with captured output.
    pub fn shell(script: &str) -> Self {
        Self {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            capture_output: true,
            ..Self::default()
        }
    }
}

/// The answer of `guest-exec-status`, with the output decoded from base64.
#[derive(Debug, Clone, Default)]
pub struct GuestExecStatus {
    pub exited: bool,
    pub exit_code: Option<i64>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent cut the output (it keeps at most 16 MiB per stream).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    synced: bool,
}

/// A guest-agent client. Connects lazily; see the module docs for the invariants.
pub struct GuestAgent {
    path: PathBuf,
    options: QgaOptions,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
}

impl fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestAgent")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Outcome of one timed exchange, before it is mapped to a public error.
enum Failure {
    Closed(String),
    Error(QgaError),
}

impl GuestAgent {
    /// A client for the agent behind the chardev socket at `path`. Does not connect yet.
    pub fn new(path: impl AsRef<Path>, options: QgaOptions) -> Self {
        // Sync ids must not repeat across clients, or a stale reply could pass for a fresh one.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 40);
        Self {
            path: path.as_ref().to_owned(),
            options,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(seed & 0x0000_ffff_ffff_ffff),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Retries synchronization until the agent answers or `timeout` passes: the way to wait for
    /// a booting guest. Returns how long it took.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Duration, QgaError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last: Option<QgaError> = None;
        while Instant::now() < deadline {
            let mut conn = self.conn.lock().await;
            if let Some(c) = conn.as_mut() {
                c.synced = false;
            }
            match self.ensure_synced(&mut conn, deadline).await {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) => {
                    tracing::debug!(error = %e, "guest agent not ready yet");
                    last = Some(e);
                }
            }
            drop(conn);
            sleep(
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        Err(QgaError::Timeout {
            what: format!(
                "agent to become ready (last: {})",
                last.map(|e| e.to_string()).unwrap_or_else(|| "none".into())
            ),
            after: timeout,
        })
    }

    /// Runs a command with the default timeout and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QgaError> {
        self.execute_with_timeout(command, arguments, self.options.command_timeout)
            .await
    }

    /// Runs a command, waiting at most `timeout` in all (including a resync when needed).
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.conn.lock().await;
        self.ensure_synced(&mut guard, deadline).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let conn = guard.as_mut().expect("ensure_synced connects");
        let result = timeout_at(deadline, exchange(conn, &request, id)).await;
        match result {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QgaError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Err(_) => {
                conn.synced = false;
                Err(QgaError::Timeout {
                    what: format!("reply to {command}"),
                    after: timeout,
                })
            }
            Ok(Err(Failure::Closed(reason))) => {
                *guard = None;
                Err(QgaError::Disconnected { reason })
            }
            Ok(Err(Failure::Error(e))) => {
                conn.synced = false;
                Err(e)
            }
        }
    }

    /// `guest-ping`.
    pub async fn ping(&self) -> Result<(), QgaError> {
        self.execute("guest-ping", None).await.map(drop)
    }

    /// `guest-info`: the agent's version and supported commands, as sent.
    pub async fn info(&self) -> Result<Value, QgaError> {
        self.execute("guest-info", None).await
    }

    /// `guest-fsfreeze-freeze`: freezes every freezable file system; returns how many.
    pub async fn fsfreeze_freeze(&self) -> Result<u64, QgaError> {
        let v = self
            .execute_with_timeout("guest-fsfreeze-freeze", None, self.options.freeze_timeout)
            .await?;
        count(&v, "guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-freeze-list`: freezes the given mount points; returns how many.
    pub async fn fsfreeze_freeze_list(&self, mountpoints: &[&str]) -> Result<u64, QgaError> {
        let v = self
            .execute_with_timeout(
                "guest-fsfreeze-freeze-list",
                Some(json!({ "mountpoints": mountpoints })),
                self.options.freeze_timeout,
            )
            .await?;
        count(&v, "guest-fsfreeze-freeze-list")
    }

    /// `guest-fsfreeze-thaw`: thaws every frozen file system; returns how many.
    pub async fn fsfreeze_thaw(&self) -> Result<u64, QgaError> {
        let v = self.execute("guest-fsfreeze-thaw", None).await?;
        count(&v, "guest-fsfreeze-thaw")
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FreezeStatus, QgaError> {
        let v = self.execute("guest-fsfreeze-status", None).await?;
        Ok(match v.as_str() {
            Some("thawed") => FreezeStatus::Thawed,
            Some("frozen") => FreezeStatus::Frozen,
            Some(other) => FreezeStatus::Other(other.to_owned()),
            None => return Err(QgaError::Protocol(format!("fsfreeze status {v}"))),
        })
    }

    /// `guest-get-fsinfo`.
    pub async fn get_fsinfo(&self) -> Result<Vec<GuestFsInfo>, QgaError> {
        let v = self.execute("guest-get-fsinfo", None).await?;
        serde_json::from_value(v).map_err(|e| QgaError::Protocol(format!("guest-get-fsinfo: {e}")))
    }

    /// `guest-exec`: starts a program; returns its pid in the guest.
    pub async fn exec(&self, req: &GuestExec) -> Result<i64, QgaError> {
        exec(self, req).await
    }

    /// `guest-exec-status` for `pid`, output decoded. The agent forgets a pid once it reported
    /// it exited.
    pub async fn exec_status(&self, pid: i64) -> Result<GuestExecStatus, QgaError> {
        exec_status(self, pid).await
    }

    /// Runs a program and polls until it exits or `timeout` passes.
    pub async fn exec_wait(
        &self,
        req: &GuestExec,
        timeout: Duration,
    ) -> Result<GuestExecStatus, QgaError> {
        exec_wait(self, req, timeout).await
    }

    /// Connects when needed and resynchronizes when needed, within `deadline`.
    async fn ensure_synced(
        &self,
        guard: &mut Option<Conn>,
        deadline: Instant,
    ) -> Result<(), QgaError> {
        if guard.is_none() {
            let connect_deadline = deadline.min(Instant::now() + self.options.connect_timeout);
            let stream = timeout_at(connect_deadline, UnixStream::connect(&self.path))
                .await
                .map_err(|_| QgaError::Timeout {
                    what: format!("connecting to {}", self.path.display()),
                    after: self.options.connect_timeout,
                })?
                .map_err(|source| QgaError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            let (r, w) = stream.into_split();
            *guard = Some(Conn {
                reader: BufReader::new(r),
                writer: w,
                synced: false,
            });
        }
        let conn = guard.as_mut().expect("connected above");
        if conn.synced {
            return Ok(());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sync_deadline = deadline.min(Instant::now() + self.options.sync_timeout);
        let budget = sync_deadline.saturating_duration_since(Instant::now());
        match timeout_at(sync_deadline, sync(conn, id)).await {
            Ok(Ok(())) => {
                conn.synced = true;
                Ok(())
            }
            Ok(Err(Failure::Closed(reason))) => {
                *guard = None;
                Err(QgaError::Disconnected { reason })
            }
            Ok(Err(Failure::Error(e))) => Err(e),
            Err(_) => Err(QgaError::Timeout {
                what: "guest-sync-delimited".into(),
                after: budget,
            }),
        }
    }
}

fn count(v: &Value, command: &str) -> Result<u64, QgaError> {
    v.as_u64()
        .ok_or_else(|| QgaError::Protocol(format!("{command} returned {v}")))
}

async fn send(conn: &mut Conn, prefix: &[u8], request: &Value) -> Result<(), Failure> {
    let mut line = prefix.to_vec();
    line.extend(serde_json::to_vec(request).expect("a Value always serializes"));
    line.push(b'\n');
    conn.writer
        .write_all(&line)
        .await
        .map_err(|e| Failure::Closed(format!("write failed: {e}")))?;
    conn.writer
        .flush()
        .await
        .map_err(|e| Failure::Closed(format!("flush failed: {e}")))
}

/// Reads one newline-terminated JSON message.
async fn read_message(conn: &mut Conn) -> Result<Value, Failure> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_frame(&mut conn.reader, b'\n', &mut buf, MAX_MESSAGE_BYTES).await {
            Ok(Frame::Complete) => {}
            Ok(Frame::Eof) => return Err(Failure::Closed("EOF (QEMU closed the socket)".into())),
            Err(e) => return Err(Failure::Closed(format!("read failed: {e}"))),
        }
        // Stray delimiters (from an earlier sync) may precede a message.
        let line = trim(&buf);
        let line = match line.iter().rposition(|&b| b == SYNC_DELIMITER) {
            Some(i) => &line[i + 1..],
            None => line,
        };
        if line.is_empty() {
            continue;
        }
        return serde_json::from_slice(line).map_err(|e| {
            Failure::Error(QgaError::Protocol(format!(
                "invalid JSON from the agent: {e}"
            )))
        });
    }
}

/// `guest-sync-delimited`: reset the agent's parser, then skip everything up to the delimiter
/// that precedes the reply carrying `id`.
async fn sync(conn: &mut Conn, id: u64) -> Result<(), Failure> {
    let request = json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } });
    send(conn, &[SYNC_DELIMITER], &request).await?;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_frame(
            &mut conn.reader,
            SYNC_DELIMITER,
            &mut buf,
            MAX_MESSAGE_BYTES,
        )
        .await
        {
            Ok(Frame::Complete) => {}
            Ok(Frame::Eof) => return Err(Failure::Closed("EOF (QEMU closed the socket)".into())),
            Err(e) => return Err(Failure::Closed(format!("read failed: {e}"))),
        }
        match read_message(conn).await {
            Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok(()),
            Ok(v) => tracing::debug!(message = %v, "discarding stale guest agent output"),
            // Garbage after a delimiter is exactly what syncing skips.
            Err(Failure::Error(e)) => tracing::debug!(error = %e, "discarding during sync"),
            Err(other) => return Err(other),
        }
    }
}

/// Sends a command and reads until the reply with `id` arrives.
async fn exchange(
    conn: &mut Conn,
    request: &Value,
    id: u64,
) -> Result<Result<Value, (String, String)>, Failure> {
    send(conn, &[], request).await?;
    loop {
        let v = read_message(conn).await?;
        match v.get("id") {
            Some(got) if got.as_u64() == Some(id) => {}
            // Replies to requests the agent could not parse carry no id; ours always parse,
            // so such a reply is left over from before the last sync.
            _ => {
                tracing::debug!(message = %v, "discarding guest agent reply with another id");
                continue;
            }
        }
        if let Some(r) = v.get("return") {
            return Ok(Ok(r.clone()));
        }
        if let Some(e) = v.get("error") {
            let class = e["class"].as_str().unwrap_or("GenericError").to_owned();
            let desc = e["desc"].as_str().unwrap_or_default().to_owned();
            return Ok(Err((class, desc)));
        }
        return Err(Failure::Error(QgaError::Protocol(format!(
            "reply without return or error: {v}"
        ))));
    }
}

/// Runs guest-agent commands: the host agent's own [`GuestAgent`], or a VM manager that owns
/// the agent channel (libvirt, whose domains' channel the host agent cannot open). `command`
/// returns the reply's `return` value.
pub trait AgentCommands: Send + Sync {
    fn command<'a>(
        &'a self,
        command: &'a str,
        arguments: Option<Value>,
    ) -> crate::driver::BoxFuture<'a, Result<Value, QgaError>>;

    /// The most bytes one `guest-file-write` may carry on this channel.
    fn max_write(&self) -> usize {
        cairn_api::host::GUEST_FILE_PIECE
    }
}

impl AgentCommands for GuestAgent {
    fn command<'a>(
        &'a self,
        command: &'a str,
        arguments: Option<Value>,
    ) -> crate::driver::BoxFuture<'a, Result<Value, QgaError>> {
        Box::pin(self.execute(command, arguments))
    }
}

/// `guest-exec`: starts a program; returns its pid in the guest.
pub async fn exec(agent: &dyn AgentCommands, req: &GuestExec) -> Result<i64, QgaError> {
    let mut args = json!({
        "path": req.path,
        "arg": req.args,
        "capture-output": req.capture_output,
    });
    if !req.env.is_empty() {
        args["env"] = json!(req.env);
    }
    if let Some(input) = &req.input {
        args["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let v = agent.command("guest-exec", Some(args)).await?;
    v["pid"]
        .as_i64()
        .ok_or_else(|| QgaError::Protocol(format!("guest-exec returned {v}")))
}

/// `guest-exec-status` for `pid`, output decoded. The agent forgets a pid once it reported
/// it exited.
pub async fn exec_status(agent: &dyn AgentCommands, pid: i64) -> Result<GuestExecStatus, QgaError> {
    let v = agent
        .command("guest-exec-status", Some(json!({ "pid": pid })))
        .await?;
    let decode = |key: &str| -> Result<Vec<u8>, QgaError> {
        match v[key].as_str() {
            None => Ok(Vec::new()),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| QgaError::Protocol(format!("guest-exec-status {key}: {e}"))),
        }
    };
    Ok(GuestExecStatus {
        exited: v["exited"].as_bool().unwrap_or(false),
        exit_code: v["exitcode"].as_i64(),
        signal: v["signal"].as_i64(),
        stdout: decode("out-data")?,
        stderr: decode("err-data")?,
        stdout_truncated: v["out-truncated"].as_bool().unwrap_or(false),
        stderr_truncated: v["err-truncated"].as_bool().unwrap_or(false),
    })
}

/// Runs a program and polls until it exits or `timeout` passes.
pub async fn exec_wait(
    agent: &dyn AgentCommands,
    req: &GuestExec,
    timeout: Duration,
) -> Result<GuestExecStatus, QgaError> {
    let deadline = Instant::now() + timeout;
    let pid = exec(agent, req).await?;
    let mut delay = Duration::from_millis(20);
    loop {
        let status = exec_status(agent, pid).await?;
        if status.exited {
            return Ok(status);
        }
        if Instant::now() + delay > deadline {
            return Err(QgaError::Timeout {
                what: format!("guest process {pid} ({}) to exit", req.path),
                after: timeout,
            });
        }
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

pub mod files;

#[cfg(test)]
mod fake_agent_tests;
