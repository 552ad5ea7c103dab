//! Guest-agent commands through libvirt (`virDomainQemuAgentCommand`).
//!
//! libvirt owns a domain's guest agent channel, so the host agent cannot open it; restore into
//! the guest sends its file commands (`guest-file-*`, `guest-exec`) this way instead. libvirt
//! notes such a command in the domain's log as a taint (`custom-ga-command`); the domain
//! itself is not changed.

use std::sync::Arc;

use cairn_hypervisor::driver::BoxFuture;
use cairn_hypervisor::qga::{AgentCommands, QgaError};
use cairn_hypervisor::spec::VmId;
use serde_json::{Value, json};

use crate::driver::Inner;

/// How long libvirt waits for the agent's answer to one command (a 384 KiB file piece in a
/// slow guest included).
const COMMAND_TIMEOUT_S: i32 = 60;

/// The most file bytes one `guest-file-write` carries through libvirt: libvirt 11.3 passed
/// 128 KiB (175 KB of JSON) and never delivered 256 KiB (the agent's answer timed out), so
/// larger pieces are written in several commands.
const MAX_WRITE: usize = 96 << 10;

/// The guest agent of one libvirt domain.
pub(crate) struct LibvirtAgent {
    pub inner: Arc<Inner>,
    pub vm: VmId,
}

impl AgentCommands for LibvirtAgent {
    fn max_write(&self) -> usize {
        MAX_WRITE
    }

    fn command<'a>(
        &'a self,
        command: &'a str,
        arguments: Option<Value>,
    ) -> BoxFuture<'a, Result<Value, QgaError>> {
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        let (inner, vm) = (Arc::clone(&self.inner), self.vm);
        Box::pin(async move {
            let reply = tokio::task::spawn_blocking(move || {
                let conn = inner.conn().map_err(|e| e.to_string())?;
                let d = inner.domain(&conn, vm).map_err(|e| e.to_string())?;
                d.agent_command(&request.to_string(), COMMAND_TIMEOUT_S)
                    .map_err(|e| e.message)
            })
            .await
            .map_err(|e| QgaError::Disconnected {
                reason: e.to_string(),
            })?
            .map_err(|desc| QgaError::Command {
                command: command.to_owned(),
                class: "libvirt".into(),
                desc,
            })?;
            let mut v: Value = serde_json::from_str(&reply)
                .map_err(|e| QgaError::Protocol(format!("{command}: reply {e}")))?;
            match v.get_mut("return") {
                Some(r) => Ok(r.take()),
                None => Err(QgaError::Protocol(format!(
                    "{command}: reply without return: {reply}"
                ))),
            }
        })
    }
}
