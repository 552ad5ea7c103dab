//! The QEMU side of VM attributes: what backs a disk, and the QEMU command line built from a
//! [`VmSpec`]. The attributes themselves are the host agent's API (`cairn_api::host::spec`),
//! re-exported here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::json;

pub use cairn_api::host::spec::*;
pub use cairn_types::DiskFormat;

/// What backs a [`DiskSpec`] on this host.
pub trait DiskSpecExt {
    /// A raw device when the path is a block device or the disk is flagged as a LUN, else an
    /// image file.
    fn backing(&self) -> DiskBacking;
}

impl DiskSpecExt for DiskSpec {
    fn backing(&self) -> DiskBacking {
        use std::os::unix::fs::FileTypeExt;
        let is_block = std::fs::metadata(&self.path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        match (&self.lun, is_block) {
            (Some(id), _) => DiskBacking::RawDevice {
                path: self.path.clone(),
                identifier: id.clone(),
            },
            (None, true) => DiskBacking::RawDevice {
                path: self.path.clone(),
                identifier: self
                    .serial
                    .clone()
                    .unwrap_or_else(|| self.path.display().to_string()),
            },
            (None, false) => DiskBacking::Image {
                path: self.path.clone(),
                format: self.format,
            },
        }
    }
}

/// Where a VM's sockets live (in its run directory under the driver's state dir).
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub qmp: PathBuf,
    pub qga: PathBuf,
    pub serial: PathBuf,
}

fn path_arg(prefix: &str, p: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(p.as_os_str());
    s.push(suffix);
    s
}

/// The arguments after the program name. Always `-accel tcg` (see the crate docs), never a real
/// network, always a guest-agent channel.
pub(crate) fn qemu_args(spec: &VmSpec, paths: &RunPaths) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["-accel", "tcg", "-nodefaults", "-display", "none"]);
    push(&["-name", &spec.name, "-M", &spec.machine]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.vcpus.to_string(), "-no-reboot"]);
    if spec.start_paused {
        push(&["-S"]);
    }
    a.push("-qmp".into());
    a.push(path_arg("unix:", &paths.qmp, ",server=on,wait=off"));
    a.push("-serial".into());
    a.push(path_arg("file:", &paths.serial, ""));
    match &spec.boot {
        BootSpec::Firmware => {}
        BootSpec::Bios { path } => {
            a.push("-bios".into());
            a.push(path.into());
        }
        BootSpec::Kernel {
            kernel,
            initrd,
            append,
        } => {
            a.push("-kernel".into());
            a.push(kernel.into());
            if let Some(i) = initrd {
                a.push("-initrd".into());
                a.push(i.into());
            }
            if !append.is_empty() {
                a.push("-append".into());
                a.push(append.into());
            }
        }
    }
    let mut scsi = false;
    let mut ide_bus = 0;
    for (i, d) in spec.disks.iter().enumerate() {
        let node = d.node(i);
        let is_block = matches!(d.backing(), DiskBacking::RawDevice { .. })
            && std::fs::metadata(&d.path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
        let blockdev = json!({
            "driver": d.format.as_str(),
            "node-name": node,
            "read-only": d.read_only,
            "file": {
                "driver": if is_block { "host_device" } else { "file" },
                "filename": d.path,
                "node-name": format!("{node}-file"),
                "read-only": d.read_only,
            },
        });
        a.push("-blockdev".into());
        a.push(blockdev.to_string().into());
        let serial = d
            .serial
            .as_ref()
            .map(|s| format!(",serial={s}"))
            .unwrap_or_default();
        let dev = match d.bus {
            DiskBus::VirtioBlk => format!("virtio-blk-pci,id={},drive={node}{serial}", d.id),
            DiskBus::VirtioScsi => {
                if !scsi {
                    a.push("-device".into());
                    a.push("virtio-scsi-pci,id=scsi0".into());
                    scsi = true;
                }
                format!("scsi-hd,bus=scsi0.0,id={},drive={node}{serial}", d.id)
            }
            DiskBus::Ide => {
                ide_bus += 1;
                // An IDE hard disk cannot be read-only: a read-only IDE disk is a CD-ROM.
                let model = if d.read_only { "ide-cd" } else { "ide-hd" };
                format!(
                    "{model},bus=ide.{},id={},drive={node}{serial}",
                    ide_bus - 1,
                    d.id
                )
            }
        };
        a.push("-device".into());
        a.push(dev.into());
    }
    if spec.nics.is_empty() {
        a.extend(["-nic", "none"].map(OsString::from));
    }
    for (i, n) in spec.nics.iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!("user,id=net{i},restrict=on").into());
        a.push("-device".into());
        a.push(format!("{},netdev=net{i},mac={}", n.model, n.mac).into());
    }
    a.push("-device".into());
    a.push("virtio-serial-pci,id=vser0".into());
    a.push("-chardev".into());
    a.push(path_arg(
        "socket,id=qga0,path=",
        &paths.qga,
        ",server=on,wait=off",
    ));
    a.push("-device".into());
    a.push(format!("virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}").into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            domain_xml: None,
            name: "t".into(),
            vcpus: 2,
            memory_mib: 128,
            machine: "q35".into(),
            disks: vec![DiskSpec::qcow2("vda", "/d/a.qcow2")],
            nics: vec![NicSpec {
                model: "virtio-net-pci".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            boot: BootSpec::Firmware,
            start_paused: true,
        }
    }

    #[test]
    fn ids_roundtrip_and_reject_junk() {
        let id = VmId::random();
        assert_eq!(id.to_string().parse::<VmId>().unwrap(), id);
        assert_eq!(id.short().len(), 8);
        assert!("xyz".parse::<VmId>().is_err());
        assert!("ABCDEF0123456789".parse::<VmId>().is_err());
        let c = CheckpointId::random();
        assert_eq!(CheckpointId::from_bitmap_name(&c.bitmap_name()), Some(c));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<CheckpointId>(&json).unwrap(), c);
    }

    #[test]
    fn spec_defaults_and_validation() {
        let s: VmSpec = serde_json::from_value(json!({"name": "x", "memory_mib": 64,
            "disks": [{"id": "vda", "path": "/a.qcow2"}]}))
        .unwrap();
        assert_eq!((s.vcpus, s.machine.as_str()), (1, "q35"));
        assert_eq!(s.disks[0].format, DiskFormat::Qcow2);
        s.validate().unwrap();
        let mut bad = spec();
        bad.disks[0].node_name = Some("cxs-evil".into());
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.disks.push(DiskSpec::qcow2("vda", "/d/b.qcow2"));
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.nics[0].mac = "nope".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn command_line_has_tcg_agent_and_restricted_net() {
        let paths = RunPaths {
            qmp: "/r/qmp.sock".into(),
            qga: "/r/qga.sock".into(),
            serial: "/r/serial.log".into(),
        };
        let args: Vec<String> = qemu_args(&spec(), &paths)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(line.starts_with("-accel tcg"), "{line}");
        assert!(line.contains("user,id=net0,restrict=on"), "{line}");
        assert!(line.contains("name=org.qemu.guest_agent.0"), "{line}");
        assert!(line.contains("virtio-blk-pci,id=vda,drive=disk0"), "{line}");
        assert!(args.contains(&"-S".to_owned()));
    }

    #[test]
    fn lun_flag_makes_a_raw_device() {
        let mut d = DiskSpec::qcow2("vdb", "/d/lun.img");
        d.format = DiskFormat::Raw;
        d.lun = Some("naa.600a0b80".into());
        assert_eq!(
            d.backing(),
            DiskBacking::RawDevice {
                path: "/d/lun.img".into(),
                identifier: "naa.600a0b80".into()
            }
        );
    }
}
