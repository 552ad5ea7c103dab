//! Full VM restore as a new VM (FIG. 5, DESIGN flow 6).
//!
//! The catalog gives the backup's VM attributes and disk snapshots → each storage agent
//! writes its disks from the vault into its datastore as new files (vault → storage agent,
//! never through the server) → the new VM's attributes are the old ones with the new name,
//! the new disk paths and fresh MAC addresses → the host agent starts it (through the
//! manager) → optionally the server waits until the guest agent answers and reports what
//! the guest mounted.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::jobs::JobCtx;
use crate::{Result, ServerError};

/// A restore request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    /// Backup id or unique prefix.
    pub backup: String,
    /// The new VM's name.
    pub as_name: String,
    /// Host to start it on (default: the backup's host).
    #[serde(default)]
    pub host: Option<String>,
    /// Start the VM (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// Wait up to this long for the guest agent to answer (0 = do not wait).
    #[serde(default)]
    pub wait_boot_s: u64,
}

fn yes() -> bool {
    true
}

impl RestoreParams {
    pub(crate) fn validate(&self) -> Result<()> {
        let n = &self.as_name;
        if !cairn_types::is_plain_name(n) {
            return Err(ServerError::Invalid(format!(
                "VM name {n:?}: letters, digits, '-', '_', '.'"
            )));
        }
        Ok(())
    }
}

fn new_mac() -> String {
    let b: [u8; 3] = rand::random();
    // 52:54:00 is QEMU's locally administered prefix.
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

pub fn run(ctx: &JobCtx<'_>, p: &RestoreParams) -> Result<Value> {
    let started = Instant::now();
    let s = ctx.server;
    let b = s.catalog.backup(&p.backup)?;
    match s.manager.vm(&p.as_name) {
        Ok(_) => {
            return Err(ServerError::Conflict(format!(
                "a VM named {} already exists",
                p.as_name
            )));
        }
        Err(e) if e.kind() == Some(cairn_http::ErrorKind::NotFound) => {}
        Err(e) => return Err(ServerError::call("check the new VM name")(e)),
    }
    let host = p.host.clone().unwrap_or_else(|| b.host.clone());
    let mut spec = b.attributes.clone();
    let mut disks_out = Vec::new();
    for d in &b.disks {
        ctx.check_cancel()?;
        let c = s.storage_agent(&d.storage_agent)?;
        let t = Instant::now();
        let (new_id, report): (String, Value) = if let Some(rdm) = &d.rdm {
            let id = format!("luns/{}-{}", p.as_name, d.disk);
            let r = c
                .post_json(
                    "/v1/rdm/restores",
                    &json!({ "vault": s.config.vault, "snapshot": d.vault_snapshot,
                             "datastore": d.datastore, "disk": id }),
                )
                .map_err(ServerError::call(format!("restore RDM disk {}", d.disk)))?;
            ctx.info(format!("{}: RDM mapping {} recreated", d.disk, rdm));
            (id, r)
        } else {
            let id = format!("{}-{}.{}", p.as_name, d.disk, d.format);
            let r = c
                .post_json(
                    "/v1/restores",
                    &json!({ "vault": s.config.vault, "snapshot": d.vault_snapshot,
                             "datastore": d.datastore, "disk": id, "format": d.format,
                             "mode": "new" }),
                )
                .map_err(ServerError::call(format!("restore disk {}", d.disk)))?;
            (id, r)
        };
        // Where the datastore keeps it, for the VM's configuration.
        let dss: Vec<Value> = c
            .get_json("/v1/datastores")
            .map_err(ServerError::call("list datastores"))?;
        let ds_path = dss
            .iter()
            .find(|x| x.get("name").and_then(Value::as_str) == Some(&d.datastore))
            .and_then(|x| x.get("path").and_then(Value::as_str))
            .ok_or_else(|| ServerError::NotFound(format!("datastore {}", d.datastore)))?;
        let path = std::path::Path::new(ds_path).join(&new_id);
        ctx.info(format!(
            "{}: restored to {} ({} B fetched, {} ms)",
            d.disk,
            path.display(),
            report
                .pointer("/bytes_fetched")
                .or_else(|| report.pointer("/report/bytes_fetched"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            t.elapsed().as_millis()
        ));
        if let Some(list) = spec.get_mut("disks").and_then(Value::as_array_mut) {
            for sd in list.iter_mut() {
                if sd.get("id").and_then(Value::as_str) == Some(&d.disk) {
                    sd["path"] = json!(path);
                }
            }
        }
        disks_out.push(json!({ "disk": d.disk, "path": path, "snapshot": d.vault_snapshot }));
    }
    spec["name"] = json!(p.as_name);
    if let Some(nics) = spec.get_mut("nics").and_then(Value::as_array_mut) {
        for n in nics.iter_mut() {
            if n.get("mac").is_some() {
                n["mac"] = json!(new_mac());
            }
        }
    }
    let mut result = json!({
        "vm": p.as_name, "from_backup": b.id, "host": host, "disks": disks_out,
        "attributes": spec,
    });
    if p.start {
        ctx.check_cancel()?;
        let info = s
            .manager
            .provision(&host, &spec)
            .map_err(ServerError::call(format!(
                "start VM {} on {host}",
                p.as_name
            )))?;
        ctx.info(format!("{}: started on {host}", p.as_name));
        result["started"] = json!(true);
        result["host_vm_id"] = info.pointer("/handle/id").cloned().unwrap_or_default();
        if p.wait_boot_s > 0 {
            let deadline = Instant::now() + Duration::from_secs(p.wait_boot_s);
            let boot = Instant::now();
            loop {
                ctx.check_cancel()?;
                let g = s.manager.guest(&p.as_name, 2000).ok();
                if g.as_ref()
                    .and_then(|g| g.get("agent"))
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    ctx.info(format!(
                        "{}: guest agent answered after {} ms",
                        p.as_name,
                        boot.elapsed().as_millis()
                    ));
                    result["guest"] = g.unwrap_or_default();
                    result["boot_ms"] = json!(boot.elapsed().as_millis() as u64);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ServerError::Failed(format!(
                        "{}: the guest agent did not answer within {} s",
                        p.as_name, p.wait_boot_s
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    result["duration_ms"] = json!(started.elapsed().as_millis() as u64);
    Ok(result)
}
