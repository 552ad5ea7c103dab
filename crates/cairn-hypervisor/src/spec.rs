//! VM attributes ([`VmSpec`]): what a backup stores about a VM and what the driver needs to start
//! one, plus the QEMU command line built from them.
//!
//! The spec is plain serde data, stable across versions: fields have defaults so an older
//! catalog entry still parses. Validation ([`VmSpec::validate`]) runs before anything is started.
//!
//! # Names inside QEMU
//!
//! Disk format nodes are named by [`DiskSpec::node_name`] (default `disk<N>`), their protocol
//! nodes `<node>-file`, their devices by [`DiskSpec::id`] (e.g. `vda`). Every node, job, export
//! and bitmap the driver creates for a snapshot starts with [`TEMP_PREFIX`] (`cx`), so a node name
//! in a spec may not: recovery may delete whatever carries that prefix.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::json;

/// Prefix of every temporary QEMU object (node, job, export, bitmap) the driver creates.
pub const TEMP_PREFIX: &str = "cx";
/// Prefix of persistent checkpoint bitmaps: `cairn-<checkpoint id>`.
pub const CHECKPOINT_PREFIX: &str = "cairn-";
/// The guest-agent port name QEMU's `qemu-ga` looks for.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// An id string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {got:?}: expected 16 lowercase hex digits")]
pub struct IdError {
    pub kind: &'static str,
    pub got: String,
}

macro_rules! short_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u64);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(rand::random::<u64>() | 1 << 63)
            }

            /// The first 8 hex digits: unique enough to tag QEMU object names.
            pub fn short(&self) -> String {
                format!("{:08x}", self.0 >> 32)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:016x})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let ok = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                let err = || IdError { kind: stringify!($name), got: s.chars().take(40).collect() };
                if !ok {
                    return Err(err());
                }
                u64::from_str_radix(s, 16).map(Self).map_err(|_| err())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

short_id!(
    /// A VM started or adopted by this host agent.
    VmId
);
short_id!(
    /// One VM snapshot (fleecing or overlay) while it exists.
    VmSnapshotId
);
short_id!(
    /// A changed-block-tracking checkpoint: the persistent bitmap `cairn-<id>` on every disk.
    CheckpointId
);

impl CheckpointId {
    /// The persistent dirty bitmap that tracks writes since this checkpoint.
    pub fn bitmap_name(&self) -> String {
        format!("{CHECKPOINT_PREFIX}{self}")
    }

    /// Parses a bitmap name made by [`CheckpointId::bitmap_name`].
    pub fn from_bitmap_name(name: &str) -> Option<Self> {
        name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
    }
}

/// The attributes of a VM, as a backup stores them and as [`crate::QemuDriver`] starts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub memory_mib: u64,
    /// QEMU machine type.
    #[serde(default = "default_machine")]
    pub machine: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub boot: BootSpec,
    /// Start with the CPUs stopped (`-S`); `cont` starts them.
    #[serde(default)]
    pub start_paused: bool,
}

fn one() -> u32 {
    1
}

fn default_machine() -> String {
    "q35".into()
}

/// How the VM boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum BootSpec {
    /// The machine's default firmware (SeaBIOS), or `bios` when given.
    #[default]
    Firmware,
    /// A firmware image passed with `-bios`.
    Bios { path: PathBuf },
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        #[serde(default)]
        initrd: Option<PathBuf>,
        #[serde(default)]
        append: String,
    },
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// The virtual controller a disk hangs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    #[default]
    VirtioBlk,
    VirtioScsi,
    Ide,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Device id (`-device ...,id=`), e.g. `vda`; also the NBD export name of a fleecing snapshot.
    pub id: String,
    /// An image file or a block device.
    pub path: PathBuf,
    #[serde(default = "qcow2")]
    pub format: DiskFormat,
    #[serde(default)]
    pub bus: DiskBus,
    /// The block node's name; default `disk<N>`. May not start with [`TEMP_PREFIX`].
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// The disk is a raw LUN (seed 003 raw device mapping) with this stable identifier (e.g. a
    /// WWN). A block-device path is a raw device even without it.
    #[serde(default)]
    pub lun: Option<String>,
    /// Serial number shown to the guest.
    #[serde(default)]
    pub serial: Option<String>,
}

fn qcow2() -> DiskFormat {
    DiskFormat::Qcow2
}

impl DiskSpec {
    /// A qcow2 disk on virtio-blk.
    pub fn qcow2(id: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            node_name: None,
            read_only: false,
            lun: None,
            serial: None,
        }
    }

    /// The block node name of the `index`th disk.
    pub fn node(&self, index: usize) -> String {
        self.node_name
            .clone()
            .unwrap_or_else(|| format!("disk{index}"))
    }

    /// What backs the disk: a raw device when it is a block device or flagged as a LUN.
    pub fn backing(&self) -> DiskBacking {
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

/// What stores a VM disk's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DiskBacking {
    /// An image file on a datastore.
    Image { path: PathBuf, format: DiskFormat },
    /// A raw LUN or block device mapped whole into the VM (seed 003).
    RawDevice { path: PathBuf, identifier: String },
}

/// A network card. Networking is always restricted: `-netdev user,restrict=on` (no host or
/// outside access), so a restored VM can never reach a real network by accident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// QEMU device model, e.g. `virtio-net-pci`, `e1000`.
    #[serde(default = "virtio_net")]
    pub model: String,
    /// `52:54:00:xx:xx:xx`.
    pub mac: String,
}

fn virtio_net() -> String {
    "virtio-net-pci".into()
}

/// A spec cannot be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM spec: {0}")]
pub struct SpecError(pub String);

fn is_qemu_name(s: &str) -> bool {
    s.len() <= 31
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl VmSpec {
    /// Checks everything that would otherwise fail late inside QEMU or clash with our names.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError(m));
        if self.vcpus == 0 || self.vcpus > 256 {
            return bad(format!("vcpus {} out of 1..=256", self.vcpus));
        }
        if self.memory_mib < 16 {
            return bad(format!("memory {} MiB below 16", self.memory_mib));
        }
        if !is_qemu_name(&self.machine) {
            return bad(format!("machine type {:?}", self.machine));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let node = d.node(i);
            // `<node>-file` must still fit QEMU's 31-character limit.
            if !is_qemu_name(&d.id) || !is_qemu_name(&node) || node.len() > 26 {
                return bad(format!("disk {i}: bad id {:?} or node name {node:?}", d.id));
            }
            if node.starts_with(TEMP_PREFIX) || d.id.starts_with(TEMP_PREFIX) {
                return bad(format!(
                    "disk {i}: names starting with {TEMP_PREFIX:?} are reserved"
                ));
            }
            if !seen.insert(node.clone()) || !seen.insert(format!("dev:{}", d.id)) {
                return bad(format!("disk {i}: duplicate id or node name"));
            }
            if !d.path.is_absolute() {
                return bad(format!(
                    "disk {i}: path {} is not absolute",
                    d.path.display()
                ));
            }
            if d.path.to_str().is_none_or(|p| p.contains(',')) {
                return bad(format!("disk {i}: unsupported path {}", d.path.display()));
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            let mac_ok = n.mac.len() == 17
                && n.mac
                    .split(':')
                    .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
            if !mac_ok || !is_qemu_name(&n.model) {
                return bad(format!("nic {i}: model {:?} mac {:?}", n.model, n.mac));
            }
        }
        Ok(())
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
            name: "t".into(),
            vcpus: 2,
            memory_mib: 128,
            machine: default_machine(),
            disks: vec![DiskSpec::qcow2("vda", "/d/a.qcow2")],
            nics: vec![NicSpec {
                model: virtio_net(),
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
