//! Execution state (part of the paired metadata snapshot): saving RAM and device state to a file, and
//! the host resources a VM uses.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::driver::{DiskIo, DriverError, ResourceUsage, SavedState, VcpuUsage};
use crate::qemu::QemuDriver;
use crate::qemu::graph::Ctx;
use crate::spec::VmId;
use crate::state::now_ms;

/// user + system CPU time in ms from a `/proc/.../stat` line.
fn stat_cpu_ms(stat: &str, ticks_per_s: u64) -> Option<u64> {
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000 / ticks_per_s.max(1))
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl QemuDriver {
    /// Migrates the VM's state into `path` (`file:` URI), bounded by the migrate timeout; the VM
    /// runs again afterwards if it ran before. On timeout the migration is cancelled.
    pub async fn save_state(&self, vm: VmId, path: &Path) -> Result<SavedState, DriverError> {
        let lock = self.vm_lock(vm);
        let _held = lock.lock().await;
        let qmp = self.qmp(vm).await?;
        let ctx = Ctx {
            vm,
            qmp: &qmp,
            job_timeout: self.options.job_timeout,
        };
        let was_running = ctx.exec("query-status", serde_json::Value::Null).await?["running"]
            .as_bool()
            .unwrap_or(false);
        let started = Instant::now();
        let uri = format!("file:{}", path.display());
        ctx.exec("migrate", json!({"uri": uri})).await?;
        let timeout = self.options.migrate_timeout;
        let outcome = loop {
            let m = ctx.exec("query-migrate", serde_json::Value::Null).await?;
            match m["status"].as_str().unwrap_or_default() {
                "completed" => break Ok(m),
                "failed" | "cancelled" => {
                    break Err(DriverError::Failed {
                        what: format!("saving state of VM {vm}"),
                        reason: m["error-desc"].as_str().unwrap_or("failed").to_owned(),
                    });
                }
                _ => {}
            }
            if started.elapsed() >= timeout {
                let _ = ctx.exec("migrate_cancel", serde_json::Value::Null).await;
                break Err(DriverError::Timeout {
                    what: format!("saving state of VM {vm}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // A completed outgoing migration leaves the VM in `postmigrate`; resume it either way.
        let status = ctx.exec("query-status", serde_json::Value::Null).await?;
        if was_running && !status["running"].as_bool().unwrap_or(false) {
            ctx.exec("cont", serde_json::Value::Null).await?;
        }
        let m = outcome?;
        let bytes = std::fs::metadata(path)
            .map_err(|source| DriverError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(SavedState {
            path: path.to_owned(),
            bytes,
            total_ms: started.elapsed().as_millis() as u64,
            downtime_ms: m["downtime"].as_u64().unwrap_or(0),
        })
    }

    /// vCPU and process CPU time, memory, and per-disk I/O counters.
    pub async fn resource_usage(&self, vm: VmId) -> Result<ResourceUsage, DriverError> {
        let rec = self.record(vm)?;
        let qmp = self.qmp(vm).await?;
        let ctx = Ctx {
            vm,
            qmp: &qmp,
            job_timeout: self.options.job_timeout,
        };
        let ticks = rustix::param::clock_ticks_per_second();
        let proc_read = |p: String| {
            std::fs::read_to_string(&p).map_err(|source| DriverError::Io {
                path: p.into(),
                source,
            })
        };
        let pid = rec.pid;
        let process_cpu_time_ms =
            stat_cpu_ms(&proc_read(format!("/proc/{pid}/stat"))?, ticks).unwrap_or(0);
        let rss_bytes =
            status_kib(&proc_read(format!("/proc/{pid}/status"))?, "VmRSS:").unwrap_or(0) * 1024;
        let cpus = ctx.exec("query-cpus-fast", serde_json::Value::Null).await?;
        let vcpus = cpus
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let tid = c["thread-id"].as_u64()? as u32;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
                Some(VcpuUsage {
                    index: c["cpu-index"].as_u64().unwrap_or(0) as u32,
                    thread_id: tid,
                    cpu_time_ms: stat_cpu_ms(&stat, ticks)?,
                })
            })
            .collect();
        let mem = ctx
            .exec("query-memory-size-summary", serde_json::Value::Null)
            .await?;
        let memory_bytes =
            mem["base-memory"].as_u64().unwrap_or(0) + mem["plugged-memory"].as_u64().unwrap_or(0);
        let stats = ctx
            .exec("query-blockstats", serde_json::Value::Null)
            .await?;
        let disks = stats
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let qdev = s["qdev"].as_str().unwrap_or_default();
                let node = s["node-name"].as_str().unwrap_or_default();
                let disk = rec.disks.iter().find(|d| {
                    d.node_name == node
                        || qdev == d.id
                        || qdev.starts_with(&format!("/machine/peripheral/{}/", d.id))
                })?;
                let st = &s["stats"];
                let n = |k: &str| st[k].as_u64().unwrap_or(0);
                Some(DiskIo {
                    device: disk.id.clone(),
                    rd_bytes: n("rd_bytes"),
                    wr_bytes: n("wr_bytes"),
                    rd_ops: n("rd_operations"),
                    wr_ops: n("wr_operations"),
                    flush_ops: n("flush_operations"),
                })
            })
            .collect();
        Ok(ResourceUsage {
            sampled_at_ms: now_ms(),
            process_cpu_time_ms,
            vcpus,
            memory_bytes,
            rss_bytes,
            disks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_name() {
        let line = "123 (qemu system) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ms(line, 100), Some(3000));
        assert_eq!(stat_cpu_ms("garbage", 100), None);
        assert_eq!(
            status_kib("Name:\tq\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048)
        );
    }
}
