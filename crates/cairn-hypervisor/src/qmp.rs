//! An asynchronous client for the QEMU Machine Protocol (QMP) over a unix socket.
//!
//! # Protocol
//!
//! QEMU greets with `{"QMP": {"version": ..., "capabilities": [...]}}`; the client answers with
//! `qmp_capabilities` to leave negotiation mode. Each command is one JSON line
//! `{"execute": NAME, "arguments": {...}, "id": N}`; QEMU answers `{"return": ..., "id": N}` or
//! `{"error": {"class": ..., "desc": ...}, "id": N}`, interleaved with asynchronous
//! `{"event": NAME, "data": {...}, "timestamp": {...}}` messages.
//!
//! # Invariants
//!
//! - One background task owns the read half. It routes replies to their command by `id` and
//!   appends events to a buffer. Commands may be issued concurrently from several tasks; writes
//!   are serialized by a mutex so lines never interleave.
//! - **Every wait is bounded**: [`QmpClient::execute`] uses [`QmpOptions::command_timeout`],
//!   [`QmpClient::wait_event`] takes its own timeout. A timed-out command's late reply is dropped.
//! - **Events are buffered from the moment of connection** (up to [`QmpOptions::event_buffer`];
//!   beyond that the oldest are dropped and counted). [`QmpClient::wait_event`] removes and returns
//!   the oldest buffered event that matches, so an event that arrived before the wait began is not
//!   lost. Events are still delivered from the buffer after the connection closed.
//! - **When QEMU dies** (EOF or a read error), every pending command and every waiter fails at once
//!   with [`QmpError::Disconnected`] carrying the reason, and later calls fail the same way.
//! - Messages are parsed as [`serde_json::Value`]: unknown fields, commands, events and error
//!   classes from newer QEMU versions never break parsing ([`QmpErrorClass::Other`]). A single
//!   message is capped at 32 MiB; a longer one closes the connection.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use crate::wire::{Frame, MAX_MESSAGE_BYTES, read_frame, trim};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("connecting to QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed ({class}): {desc}")]
    Command {
        command: String,
        class: QmpErrorClass,
        desc: String,
    },
    /// Nothing arrived in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// The connection is gone (QEMU exited, crashed or closed the socket).
    #[error("QMP connection closed while waiting for {what}: {reason}")]
    Disconnected { what: String, reason: String },
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
}

impl QmpError {
    /// The QMP error class when QEMU rejected a command.
    pub fn class(&self) -> Option<&QmpErrorClass> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True for [`QmpError::Disconnected`].
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }

    /// True for [`QmpError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, QmpError::Timeout { .. })
    }
}

/// The `error.class` of a failed QMP command. Classes this crate does not know are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
    Other(String),
}

impl QmpErrorClass {
    /// Parses a class name as QEMU spells it.
    pub fn parse(class: &str) -> Self {
        match class {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The class name as QEMU spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for QmpErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

/// The greeting QEMU sends on connection.
#[derive(Debug, Clone)]
pub struct QmpGreeting {
    pub version: QemuVersion,
    /// Capabilities offered (e.g. `oob`); none are enabled by this client.
    pub capabilities: Vec<String>,
    /// The whole greeting, for fields this crate does not model.
    pub raw: Value,
}

impl QmpGreeting {
    fn parse(v: Value) -> Result<Self, QmpError> {
        let qmp = v
            .get("QMP")
            .ok_or_else(|| QmpError::Protocol(format!("expected a greeting, got {v}")))?;
        let q = &qmp["version"]["qemu"];
        let num = |k: &str| q[k].as_u64().unwrap_or(0);
        let version = QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: qmp["version"]["package"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        };
        let capabilities = qmp["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            version,
            capabilities,
            raw: v,
        })
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// The event name, e.g. `BLOCK_JOB_READY`.
    pub name: String,
    /// The event's `data` member (`Value::Null` when absent).
    pub data: Value,
    /// QEMU's host timestamp in microseconds since the epoch, when given.
    pub timestamp_us: Option<i64>,
}

impl QmpEvent {
    fn parse(mut v: Value) -> Option<Self> {
        let name = v.get("event")?.as_str()?.to_owned();
        let ts = &v["timestamp"];
        let timestamp_us = match (ts["seconds"].as_i64(), ts["microseconds"].as_i64()) {
            (Some(s), Some(us)) => Some(s * 1_000_000 + us),
            _ => None,
        };
        let data = v.get_mut("data").map(Value::take).unwrap_or(Value::Null);
        Some(Self {
            name,
            data,
            timestamp_us,
        })
    }
}

/// Limits of a [`QmpClient`].
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// Connecting and reading the greeting.
    pub connect_timeout: Duration,
    /// Default bound on a command's round trip.
    pub command_timeout: Duration,
    /// Events kept before the oldest are dropped.
    pub event_buffer: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            event_buffer: 4096,
        }
    }
}

type Reply = Result<Value, (String, String)>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every new event and on close; waiters watch it.
    changed: watch::Sender<u64>,
    event_buffer: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` inconsistent in a way that matters
        // more than losing the client, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn dispatch(&self, v: Value) {
        if v.get("event").is_some() {
            let Some(event) = QmpEvent::parse(v) else {
                tracing::warn!("ignoring malformed QMP event");
                return;
            };
            tracing::debug!(event = %event.name, "QMP event");
            {
                let mut st = self.lock();
                if st.events.len() >= self.event_buffer {
                    st.events.pop_front();
                    st.dropped_events += 1;
                }
                st.events.push_back(event);
            }
            self.bump();
            return;
        }
        let reply: Reply = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else if let Some(e) = v.get("error") {
            let class = e["class"].as_str().unwrap_or("GenericError").to_owned();
            let desc = e["desc"].as_str().unwrap_or_default().to_owned();
            Err((class, desc))
        } else {
            tracing::debug!(message = %v, "ignoring unexpected QMP message");
            return;
        };
        let mut st = self.lock();
        let sender = match v.get("id").and_then(Value::as_u64) {
            Some(id) => st.pending.remove(&id),
            // QEMU answers a request it could not parse without an id; it can only be ours if
            // exactly one command is outstanding.
            None if st.pending.len() == 1 => {
                let id = *st.pending.keys().next().expect("one pending");
                st.pending.remove(&id)
            }
            None => None,
        };
        match sender {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(message = %v, "QMP reply for no pending command"),
        }
    }

    fn close(&self, reason: String) {
        {
            let mut st = self.lock();
            if st.closed.is_none() {
                tracing::debug!(%reason, "QMP connection closed");
                st.closed = Some(reason);
            }
            // Dropping the senders wakes every pending command.
            st.pending.clear();
        }
        self.bump();
    }

    fn closed_reason(&self) -> Option<String> {
        self.lock().closed.clone()
    }
}

/// Removes a command's reply slot when its future completes or is dropped.
struct PendingSlot<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// A connected QMP client. Dropping it stops the reader task and closes the socket.
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    reader: JoinHandle<()>,
    greeting: QmpGreeting,
    next_id: AtomicU64,
    options: QmpOptions,
    /// The process on the other end (`SO_PEERCRED`), when the kernel tells.
    peer_pid: Option<u32>,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.greeting.version)
            .field("closed", &self.shared.closed_reason())
            .finish_non_exhaustive()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: impl AsRef<Path>, options: QmpOptions) -> Result<Self, QmpError> {
        let path = path.as_ref();
        let deadline = Instant::now() + options.connect_timeout;
        let timeout = |what: &str| QmpError::Timeout {
            what: format!("{what} on {}", path.display()),
            after: options.connect_timeout,
        };
        let stream = timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| timeout("connection"))?
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0);
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let mut buf = Vec::new();
        let greeting = loop {
            buf.clear();
            let frame = timeout_at(
                deadline,
                read_frame(&mut reader, b'\n', &mut buf, MAX_MESSAGE_BYTES),
            )
            .await
            .map_err(|_| timeout("QMP greeting"))?
            .map_err(|e| QmpError::Disconnected {
                what: "QMP greeting".into(),
                reason: e.to_string(),
            })?;
            if frame == Frame::Eof {
                return Err(QmpError::Disconnected {
                    what: "QMP greeting".into(),
                    reason: "EOF before the greeting".into(),
                });
            }
            let line = trim(&buf);
            if !line.is_empty() {
                let v: Value = serde_json::from_slice(line)
                    .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
                break QmpGreeting::parse(v)?;
            }
        };
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed,
            event_buffer: options.event_buffer.max(1),
        });
        let reader = tokio::spawn(read_loop(Arc::clone(&shared), reader));
        let client = Self {
            shared,
            writer: tokio::sync::Mutex::new(write_half),
            reader,
            greeting,
            next_id: AtomicU64::new(1),
            options,
            peer_pid,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    /// The PID of the QEMU process serving this socket (the listener's credentials), if known.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed_reason()
    }

    /// Runs a command with the default timeout and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.options.command_timeout)
            .await
    }

    /// Runs a command, waiting at most `timeout` for the reply.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(QmpError::Disconnected {
                    what: format!("reply to {command}"),
                    reason: reason.clone(),
                });
            }
            st.pending.insert(id, tx);
        }
        let _slot = PendingSlot {
            shared: &self.shared,
            id,
        };
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&request).expect("a Value always serializes");
        line.push(b'\n');
        tracing::trace!(command, id, "QMP request");

        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await?;
            w.flush().await
        };
        match timeout_at(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let reason = self
                    .shared
                    .closed_reason()
                    .unwrap_or_else(|| format!("write failed: {e}"));
                return Err(QmpError::Disconnected {
                    what: format!("sending {command}"),
                    reason,
                });
            }
            Err(_) => {
                // A partial line may have gone out: the stream can no longer be trusted.
                self.shared
                    .close(format!("writing {command} timed out; stream state unknown"));
                return Err(QmpError::Timeout {
                    what: format!("sending {command}"),
                    after: timeout,
                });
            }
        }
        match timeout_at(deadline, rx).await {
            Err(_) => Err(QmpError::Timeout {
                what: format!("reply to {command}"),
                after: timeout,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected {
                what: format!("reply to {command}"),
                reason: self
                    .shared
                    .closed_reason()
                    .unwrap_or_else(|| "reply channel dropped".into()),
            }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_owned(),
                class: QmpErrorClass::parse(&class),
                desc,
            }),
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its text output.
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        let v = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Waits for an event named `name` for which `predicate` holds, and removes it from the
    /// buffer. Buffered events (including those that arrived before this call) are searched
    /// oldest first.
    pub async fn wait_event<F>(
        &self,
        name: &str,
        mut predicate: F,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError>
    where
        F: FnMut(&QmpEvent) -> bool,
    {
        let deadline = Instant::now() + timeout;
        let mut rx = self.shared.changed.subscribe();
        loop {
            // Mark the current generation seen *before* scanning, so an event that lands after
            // the scan wakes `changed()` below.
            rx.borrow_and_update();
            {
                let mut st = self.shared.lock();
                if let Some(pos) = st
                    .events
                    .iter()
                    .position(|e| e.name == name && predicate(e))
                {
                    return Ok(st.events.remove(pos).expect("position is in range"));
                }
                if let Some(reason) = &st.closed {
                    return Err(QmpError::Disconnected {
                        what: format!("event {name}"),
                        reason: reason.clone(),
                    });
                }
            }
            match timeout_at(deadline, rx.changed()).await {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        what: format!("event {name}"),
                        after: timeout,
                    });
                }
                // The sender lives in `shared`, which we hold: this cannot end.
                Ok(_) => continue,
            }
        }
    }

    /// Removes and returns every buffered event.
    pub fn take_events(&self) -> Vec<QmpEvent> {
        self.shared.lock().events.drain(..).collect()
    }

    /// Events dropped because the buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.lock().dropped_events
    }

    /// `query-status`: the VM's run state.
    pub async fn query_status(&self) -> Result<VmStatus, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(VmStatus {
            running: v["running"].as_bool().unwrap_or(false),
            status: v["status"].as_str().unwrap_or("unknown").to_owned(),
        })
    }
}

/// The answer of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub running: bool,
    /// QEMU's run state, e.g. `running`, `prelaunch`, `paused` (kept verbatim).
    pub status: String,
}

async fn read_loop(shared: Arc<Shared>, mut reader: BufReader<OwnedReadHalf>) {
    let mut buf = Vec::new();
    let reason = loop {
        buf.clear();
        match read_frame(&mut reader, b'\n', &mut buf, MAX_MESSAGE_BYTES).await {
            Ok(Frame::Complete) => {}
            Ok(Frame::Eof) => break "QEMU closed the QMP socket (EOF)".to_owned(),
            Err(e) => break format!("reading QMP socket: {e}"),
        }
        let line = trim(&buf);
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(v) => shared.dispatch(v),
            Err(e) => break format!("QEMU sent invalid JSON: {e}"),
        }
    };
    shared.close(reason);
}

#[cfg(test)]
mod fake_peer_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_parses_and_tolerates_extra_fields() {
        let v = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2 ", "future": true}, "capabilities": ["oob"], "x": 1}});
        let g = QmpGreeting::parse(v).unwrap();
        assert_eq!(
            (g.version.major, g.version.minor, g.version.micro),
            (10, 0, 2)
        );
        assert_eq!(g.version.package, "Debian 1:10.0.2");
        assert_eq!(g.capabilities, vec!["oob".to_owned()]);
        assert!(QmpGreeting::parse(json!({"return": {}})).is_err());
    }

    #[test]
    fn unknown_error_class_is_kept() {
        assert_eq!(
            QmpErrorClass::parse("CommandNotFound"),
            QmpErrorClass::CommandNotFound
        );
        let c = QmpErrorClass::parse("SomethingNew");
        assert_eq!(c, QmpErrorClass::Other("SomethingNew".into()));
        assert_eq!(c.to_string(), "SomethingNew");
    }

    #[test]
    fn event_parses_timestamp_and_missing_data() {
        let e = QmpEvent::parse(json!({"event": "STOP",
            "timestamp": {"seconds": 2, "microseconds": 5}}))
        .unwrap();
        assert_eq!(e.name, "STOP");
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.timestamp_us, Some(2_000_005));
    }
}
