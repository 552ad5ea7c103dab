//! The manager's blocking client, and the heartbeat loop agents run.

use std::time::Duration;

use cairn_http::{Client, ClientError, Trust};
use serde_json::Value;

use crate::inventory::{AgentRecord, Registration, VmLocation};

/// A client of the manager's API.
#[derive(Clone)]
pub struct ManagerClient {
    http: Client,
}

impl std::fmt::Debug for ManagerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerClient")
            .field("base", &self.http.base())
            .finish()
    }
}

type R<T> = Result<T, ClientError>;

fn seg(s: &str) -> String {
    // Names are restricted to [A-Za-z0-9._-] by the agents; anything else is escaped.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl ManagerClient {
    pub fn new(url: &str, token: &str, trust: &Trust) -> R<Self> {
        Ok(Self {
            http: Client::new(url, token, trust)?,
        })
    }

    pub fn http(&self) -> &Client {
        &self.http
    }

    pub fn heartbeat(&self, r: &Registration) -> R<AgentRecord> {
        self.http.post_json("/v1/agents", r)
    }

    pub fn agents(&self) -> R<Vec<AgentRecord>> {
        self.http.get_json("/v1/agents")
    }

    /// A live agent's registration (with its credentials).
    pub fn agent(&self, kind: &str, name: &str) -> R<AgentRecord> {
        self.http
            .get_json(&format!("/v1/agents/{}/{}", seg(kind), seg(name)))
    }

    pub fn vms(&self) -> R<Vec<VmLocation>> {
        self.http.get_json("/v1/vms")
    }

    pub fn vm(&self, name: &str) -> R<VmLocation> {
        self.http.get_json(&format!("/v1/vms/{}", seg(name)))
    }

    /// Relays a snapshot request to the VM's host agent; returns the host's `VmSnapshot`.
    pub fn snapshot(&self, vm: &str, req: &Value) -> R<Value> {
        self.http
            .post_json(&format!("/v1/vms/{}/snapshots", seg(vm)), req)
    }

    pub fn delete_snapshot(&self, host: &str, id: &str) -> R<Value> {
        self.http
            .delete_json(&format!("/v1/hosts/{}/snapshots/{}", seg(host), seg(id)))
    }

    pub fn save_state(&self, vm: &str, name: &str) -> R<Value> {
        self.http.post_json(
            &format!("/v1/vms/{}/state", seg(vm)),
            &serde_json::json!({ "name": name }),
        )
    }

    pub fn saved_state(&self, host: &str, name: &str) -> R<Box<dyn std::io::Read + Send + Sync>> {
        self.http
            .get_reader(&format!("/v1/hosts/{}/saved/{}", seg(host), seg(name)))
    }

    pub fn delete_saved_state(&self, host: &str, name: &str) -> R<Value> {
        self.http
            .delete_json(&format!("/v1/hosts/{}/saved/{}", seg(host), seg(name)))
    }

    pub fn usage(&self, vm: &str) -> R<Value> {
        self.http.get_json(&format!("/v1/vms/{}/usage", seg(vm)))
    }

    pub fn guest(&self, vm: &str, timeout_ms: u64) -> R<Value> {
        self.http.get_json(&format!(
            "/v1/vms/{}/guest?timeout_ms={timeout_ms}",
            seg(vm)
        ))
    }

    /// Runs a shell command in the VM's guest (guest agent).
    pub fn guest_exec(&self, vm: &str, shell: &str) -> R<Value> {
        self.http.post_json(
            &format!("/v1/vms/{}/guest/exec", seg(vm)),
            &serde_json::json!({ "shell": shell }),
        )
    }

    /// Asks `host` to start a VM from a `VmSpec`.
    pub fn provision(&self, host: &str, spec: &Value) -> R<Value> {
        self.http
            .post_json(&format!("/v1/hosts/{}/vms", seg(host)), spec)
    }

    pub fn stop_vm(&self, vm: &str) -> R<Value> {
        self.http.delete_json(&format!("/v1/vms/{}", seg(vm)))
    }
}

/// Registers `reg` with the manager now and then every `every` from a background thread,
/// for as long as the process lives. Failures are logged and retried.
pub fn spawn_heartbeat(manager: ManagerClient, reg: Registration, every: Duration) {
    std::thread::Builder::new()
        .name(format!("heartbeat-{}", reg.name))
        .spawn(move || {
            let mut failing = false;
            loop {
                match manager.heartbeat(&reg) {
                    Ok(_) if failing => {
                        tracing::warn!("manager reachable again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!("heartbeat to the manager failed: {e}");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(every);
            }
        })
        .expect("spawn heartbeat thread");
}
