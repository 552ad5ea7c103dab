//! Group (targeted) snapshots of libvirt domains.
//!
//! A group backup takes a VM snapshot of every VM, then one snapshot of the storage unit
//! holding all their disks, then releases every VM snapshot at once; the storage agent reads
//! the disks from the unit snapshot. For a libvirt domain the VM snapshot is its guest's file
//! systems frozen through the guest agent (`virDomainFSFreeze`): the freeze flushes the guest's
//! writes and, through them, QEMU's image metadata into the files, and nothing is written until
//! the release thaws them, so the unit snapshot taken in between holds a consistent image.
//! Without a guest agent the snapshot is refused: a paused domain's image may still lack
//! metadata QEMU holds in memory, and libvirt offers no flush of it.
//!
//! The freeze is journaled before it is asked for, so an agent killed while a guest is frozen
//! thaws it at its next start.

use cairn_api::host::{
    DiskBacking, DiskSnapshot, DiskSource, Quiesce, SnapshotKind, UnknownReason, VmSnapshot,
};
use cairn_hypervisor::driver::{Changes, DriverError, SnapshotOptions};
use cairn_hypervisor::spec::{VmId, VmSnapshotId};

use crate::driver::{Inner, failed, vm_disks};
use crate::ffi::Domain;
use crate::journal::Flight;
use crate::xml::DomainXml;

/// Freezes the guest and returns its disks, read in place from the unit snapshot.
pub fn frozen(
    inner: &Inner,
    dom: &Domain,
    vm: VmId,
    uuid: &str,
    live: &DomainXml,
    o: &SnapshotOptions,
) -> Result<VmSnapshot, DriverError> {
    let id = VmSnapshotId::random();
    let flight = Flight {
        id,
        vm,
        uuid: uuid.into(),
        dir: None,
        checkpoint: None,
        since: None,
        created_at_ms: u64::try_from(cairn_types::now_ms()).unwrap_or(0),
        frozen: true,
    };
    inner.journal.record(&flight)?;
    if let Err(e) = crate::backup::freeze_through_agent(dom, o) {
        let _ = inner.journal.forget(&flight);
        return Err(DriverError::Failed {
            what: format!("group snapshot of VM {vm}"),
            reason: format!(
                "the guest agent could not freeze the file systems ({}); a group snapshot of a \
                 libvirt domain needs it (back the domain up on its own instead)",
                e.message
            ),
        });
    }
    let mut disks = Vec::new();
    for d in vm_disks(live) {
        let (path, format) = match &d.backing {
            DiskBacking::Image { path, format } => (path.clone(), format.as_str().to_owned()),
            DiskBacking::RawDevice { path, .. } => (path.clone(), "raw".to_owned()),
        };
        let size = match dom.disk_capacity(&d.id) {
            Ok(s) => s,
            Err(e) => {
                let _ = dom.fs_thaw();
                let _ = inner.journal.forget(&flight);
                return Err(failed(format!("size of disk {}", d.id))(e));
            }
        };
        disks.push(DiskSnapshot {
            disk: d,
            size,
            source: DiskSource::File { path, format },
            changes: Changes::Unknown {
                reason: UnknownReason::BitmapMissing,
            },
        });
    }
    inner.hand_out(&flight);
    Ok(VmSnapshot {
        id,
        vm,
        kind: SnapshotKind::Overlay,
        quiesce: Quiesce::GuestFreeze,
        quiesce_window_ms: 0,
        checkpoint: None,
        created_at_ms: flight.created_at_ms,
        disks,
    })
}

/// Thaws a guest a group snapshot froze (nothing when it runs no more or is not frozen).
pub fn thaw(dom: &Domain) -> Result<(), DriverError> {
    match dom.fs_thaw() {
        Ok(()) => Ok(()),
        Err(e) if dom.is_active().ok() == Some(false) => {
            tracing::info!("thaw: the domain no longer runs ({e})");
            Ok(())
        }
        Err(e) => Err(failed("thaw the guest file systems")(e)),
    }
}
