//! VM attributes ([`VmSpec`]): what a backup stores about a VM and what a host agent needs to
//! start one. The host agent builds the QEMU command line from them (`cairn-hypervisor`).
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

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use cairn_types::DiskFormat;
use serde::{Deserialize, Serialize};

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

/// The attributes of a VM, as a backup stores them and as a host agent starts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// A libvirt domain's own configuration (its inactive domain XML), kept with the backup so
    /// a restore defines the domain as libvirt knew it. The fields above are read from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_machine() -> String {
    "q35".into()
}

/// How the VM boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
    /// The disk is a raw LUN (a raw LUN mapping) with this stable identifier (e.g. a
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
}

/// What stores a VM disk's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum DiskBacking {
    /// An image file on a datastore.
    Image { path: PathBuf, format: DiskFormat },
    /// A raw LUN or block device mapped whole into the VM (raw LUN mapping).
    RawDevice { path: PathBuf, identifier: String },
}

/// A network card. Networking is always restricted: `-netdev user,restrict=on` (no host or
/// outside access), so a restored VM can never reach a real network by accident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
