//! A restored VM as a new libvirt domain.

use cairn_api::host::{VmHandle, VmSpec};
use cairn_hypervisor::driver::DriverError;

use crate::driver::{Inner, failed};
use crate::ffi;
use crate::xml::{self, Rewrite};

/// Defines a new persistent domain from `spec` and starts it (paused with
/// `spec.start_paused`). The stored domain XML is kept whole but for the name, the UUID, the
/// restored disks' paths and formats, and the MAC addresses. A domain libvirt defines but cannot
/// start is undefined again, and libvirt's own message is the error.
pub fn define_and_start(inner: &Inner, spec: &VmSpec) -> Result<VmHandle, DriverError> {
    spec.validate()?;
    let Some(stored) = &spec.domain_xml else {
        return Err(DriverError::InvalidSpec(cairn_api::host::SpecError(
            format!(
                "VM {} has no libvirt domain XML: restore it on a host agent that runs Cairn's own VMs",
                spec.name
            ),
        )));
    };
    let rewrite = Rewrite {
        name: spec.name.clone(),
        disks: spec
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.path.clone(), d.format))
            .collect(),
        macs: spec.nics.iter().map(|n| n.mac.clone()).collect(),
    };
    let new_xml = xml::rewrite(stored, &rewrite)
        .map_err(|e| DriverError::InvalidSpec(cairn_api::host::SpecError(e.to_string())))?;
    let conn = inner.conn()?;
    let dom = conn
        .define(&new_xml)
        .map_err(failed(format!("define domain {}", spec.name)))?;
    let flags = if spec.start_paused {
        ffi::START_PAUSED
    } else {
        0
    };
    if let Err(e) = dom.start(flags) {
        if let Err(u) = dom.undefine(ffi::UNDEFINE_METADATA) {
            tracing::error!(
                "domain {} defined but neither started nor undefined: {u}",
                spec.name
            );
        }
        return Err(failed(format!("start domain {}", spec.name))(e));
    }
    Ok(inner.info(&dom)?.handle)
}
