//! Domain XML in, VM attributes out; backup, checkpoint and restored-domain XML out.
//!
//! Reading uses `roxmltree` (no entity expansion, no external references: a hostile XML can at
//! worst be refused). Writing escapes every attribute and text. A restored domain's XML is the
//! stored XML re-serialized node by node with a few changes ([`Rewrite`]); everything the
//! rewrite does not name is kept as libvirt wrote it.

use std::fmt::Write as _;
use std::path::PathBuf;

use cairn_api::host::{BootSpec, DiskBus, DiskSpec, NicSpec, VmSpec};
use cairn_types::DiskFormat;

/// The XML could not be read or does not describe what we need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(pub String);

/// How a disk's data is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskData {
    /// `<disk type='file'>`.
    File(PathBuf),
    /// `<disk type='block'>`: a block device (a raw LUN when `device='lun'`).
    Block(PathBuf),
    /// `<disk type='network'>` (rbd, iscsi, nbd, ...): Cairn cannot read it.
    Network { protocol: String, name: String },
    /// Anything else (`volume`, `dir`, `nvme`, `vhostuser`, an empty CD-ROM).
    Other(String),
}

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDisk {
    /// `<target dev=>`, e.g. `vda`.
    pub target: String,
    /// `disk`, `lun`, `cdrom` or `floppy`.
    pub device: String,
    pub bus: String,
    /// `<driver type=>`: `qcow2`, `raw`, ...
    pub format: String,
    pub data: DiskData,
    pub read_only: bool,
    pub serial: Option<String>,
}

impl XmlDisk {
    /// Why Cairn cannot back this disk up, if it cannot.
    pub fn unprotectable(&self) -> Option<String> {
        if matches!(self.device.as_str(), "cdrom" | "floppy") {
            return Some(format!("a {} drive is not backed up", self.device));
        }
        match &self.data {
            DiskData::Network { protocol, name } => Some(format!(
                "a network disk ({protocol}: {name}): Cairn reads disks from files and block devices only"
            )),
            DiskData::Other(kind) => Some(format!("a disk of type {kind:?} is not supported")),
            DiskData::File(_) | DiskData::Block(_) => match self.format.as_str() {
                "qcow2" | "raw" => None,
                f => Some(format!("a {f} image: Cairn reads qcow2 and raw images")),
            },
        }
    }

    pub fn path(&self) -> Option<&PathBuf> {
        match &self.data {
            DiskData::File(p) | DiskData::Block(p) => Some(p),
            _ => None,
        }
    }

    /// qcow2 disks carry checkpoint bitmaps; libvirt refuses checkpoints on raw ones.
    pub fn has_bitmaps(&self) -> bool {
        self.format == "qcow2"
    }
}

/// What the driver needs from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    pub uuid: String,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub machine: Option<String>,
    pub kernel: Option<(PathBuf, Option<PathBuf>, String)>,
    pub disks: Vec<XmlDisk>,
    /// `(mac, model)` of each `<interface>`.
    pub nics: Vec<(String, String)>,
    /// The DAC label QEMU runs with (`+uid:+gid`), from the live XML's `<seclabel>`.
    pub dac_label: Option<(u32, u32)>,
    /// The guest agent channel's socket (live XML).
    pub agent_socket: Option<PathBuf>,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn text_of(n: roxmltree::Node<'_, '_>, tag: &str) -> Option<String> {
    child(n, tag)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_owned())
}

/// Memory in KiB from `<memory unit=>`.
fn kib(value: &str, unit: &str) -> Option<u64> {
    let v: u64 = value.trim().parse().ok()?;
    let factor: u64 = match unit {
        "b" | "bytes" => return Some(v / 1024),
        "KiB" | "k" | "" => 1,
        "KB" => return Some(v * 1000 / 1024),
        "MiB" | "M" => 1 << 10,
        "MB" => return Some(v * 1_000_000 / 1024),
        "GiB" | "G" => 1 << 20,
        "GB" => return Some(v * 1_000_000_000 / 1024),
        "TiB" | "T" => 1 << 30,
        _ => return None,
    };
    v.checked_mul(factor)
}

fn parse_label(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    let num = |s: &str| s.trim_start_matches('+').parse().ok();
    Some((num(u)?, num(g)?))
}

/// Reads a domain XML (live or inactive).
pub fn parse(xml: &str) -> Result<DomainXml, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(XmlError(format!(
            "root element <{}>",
            root.tag_name().name()
        )));
    }
    let name = text_of(root, "name").ok_or_else(|| XmlError("no <name>".into()))?;
    let uuid = text_of(root, "uuid").unwrap_or_default();
    let vcpus = text_of(root, "vcpu")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let memory_kib = child(root, "memory")
        .and_then(|m| kib(m.text().unwrap_or(""), m.attribute("unit").unwrap_or("KiB")))
        .ok_or_else(|| XmlError("no readable <memory>".into()))?;
    let os = child(root, "os");
    let machine = os
        .and_then(|o| child(o, "type"))
        .and_then(|t| t.attribute("machine"))
        .map(str::to_owned);
    let kernel = os.and_then(|o| {
        let k = text_of(o, "kernel")?;
        Some((
            PathBuf::from(k),
            text_of(o, "initrd").map(PathBuf::from),
            text_of(o, "cmdline").unwrap_or_default(),
        ))
    });
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    let mut agent_socket = None;
    if let Some(devices) = child(root, "devices") {
        for d in devices.children().filter(|c| c.has_tag_name("disk")) {
            disks.push(parse_disk(d)?);
        }
        for i in devices.children().filter(|c| c.has_tag_name("interface")) {
            let mac = child(i, "mac")
                .and_then(|m| m.attribute("address"))
                .unwrap_or_default()
                .to_owned();
            let model = child(i, "model")
                .and_then(|m| m.attribute("type"))
                .unwrap_or("virtio")
                .to_owned();
            nics.push((mac, model));
        }
        for c in devices.children().filter(|c| c.has_tag_name("channel")) {
            let is_agent = child(c, "target")
                .and_then(|t| t.attribute("name"))
                .is_some_and(|n| n == cairn_api::host::GUEST_AGENT_PORT);
            if is_agent {
                agent_socket = child(c, "source")
                    .and_then(|s| s.attribute("path"))
                    .map(PathBuf::from);
            }
        }
    }
    let dac_label = root
        .children()
        .filter(|c| c.has_tag_name("seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|s| text_of(s, "label").and_then(|l| parse_label(&l)));
    Ok(DomainXml {
        name,
        uuid,
        vcpus,
        memory_kib,
        machine,
        kernel,
        disks,
        nics,
        dac_label,
        agent_socket,
    })
}

fn parse_disk(d: roxmltree::Node<'_, '_>) -> Result<XmlDisk, XmlError> {
    let target = child(d, "target")
        .and_then(|t| t.attribute("dev"))
        .ok_or_else(|| XmlError("a <disk> without <target dev=>".into()))?
        .to_owned();
    let bus = child(d, "target")
        .and_then(|t| t.attribute("bus"))
        .unwrap_or("virtio")
        .to_owned();
    let kind = d.attribute("type").unwrap_or("file");
    let source = child(d, "source");
    let attr = |a: &str| source.and_then(|s| s.attribute(a)).map(str::to_owned);
    let data = match kind {
        "file" => attr("file").map(|p| DiskData::File(p.into())),
        "block" => attr("dev").map(|p| DiskData::Block(p.into())),
        "network" => Some(DiskData::Network {
            protocol: attr("protocol").unwrap_or_else(|| "?".into()),
            name: attr("name").unwrap_or_default(),
        }),
        _ => None,
    }
    .unwrap_or_else(|| DiskData::Other(kind.to_owned()));
    Ok(XmlDisk {
        target,
        device: d.attribute("device").unwrap_or("disk").to_owned(),
        bus,
        format: child(d, "driver")
            .and_then(|x| x.attribute("type"))
            .unwrap_or("raw")
            .to_owned(),
        data,
        read_only: child(d, "readonly").is_some(),
        serial: text_of(d, "serial"),
    })
}

impl DomainXml {
    /// The disks Cairn can back up.
    pub fn protectable(&self) -> impl Iterator<Item = &XmlDisk> {
        self.disks.iter().filter(|d| d.unprotectable().is_none())
    }

    /// The VM attributes Cairn stores, with `inactive_xml` kept whole beside them.
    pub fn spec(&self, inactive_xml: Option<String>) -> VmSpec {
        let disks = self
            .protectable()
            .filter_map(|d| {
                let path = d.path()?.clone();
                let raw_device = matches!(d.data, DiskData::Block(_)) || d.device == "lun";
                Some(DiskSpec {
                    id: d.target.clone(),
                    path,
                    format: if d.format == "qcow2" {
                        DiskFormat::Qcow2
                    } else {
                        DiskFormat::Raw
                    },
                    bus: match d.bus.as_str() {
                        "scsi" => DiskBus::VirtioScsi,
                        "ide" | "sata" => DiskBus::Ide,
                        _ => DiskBus::VirtioBlk,
                    },
                    node_name: None,
                    read_only: d.read_only,
                    lun: raw_device.then(|| {
                        d.serial
                            .clone()
                            .unwrap_or_else(|| format!("libvirt:{}:{}", self.uuid, d.target))
                    }),
                    serial: d.serial.clone(),
                })
            })
            .collect();
        let nics = self
            .nics
            .iter()
            .map(|(mac, model)| NicSpec {
                model: match model.as_str() {
                    "virtio" => "virtio-net-pci".into(),
                    m => m.into(),
                },
                mac: mac.clone(),
            })
            .collect();
        let boot = match &self.kernel {
            Some((kernel, initrd, append)) => BootSpec::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                append: append.clone(),
            },
            None => BootSpec::Firmware,
        };
        VmSpec {
            name: self.name.clone(),
            vcpus: self.vcpus.max(1),
            memory_mib: self.memory_kib / 1024,
            machine: self.machine.clone().unwrap_or_else(|| "q35".into()),
            disks,
            nics,
            boot,
            start_paused: false,
            domain_xml: inactive_xml,
        }
    }
}

/// Escapes `s` for an attribute value or text.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// One disk of a pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    pub target: String,
    /// Read only what changed since this checkpoint (a qcow2 disk whose checkpoint is good).
    pub incremental: Option<String>,
    pub scratch: PathBuf,
    /// The export's dirty bitmap name (incremental only).
    pub export_bitmap: String,
}

/// `<domainbackup mode='pull'>`: an NBD server on `socket`, one export per disk named by its
/// target, each disk's point in time kept by copy-before-write into its scratch file. Disks of
/// the domain not in `disks` are left out (`backup='no'`).
pub fn backup_xml(
    socket: &std::path::Path,
    disks: &[BackupDisk],
    all_targets: &[String],
) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    let _ = writeln!(
        x,
        "  <server transport='unix' socket='{}'/>",
        escape(&socket.to_string_lossy())
    );
    x.push_str("  <disks>\n");
    for t in all_targets {
        match disks.iter().find(|d| &d.target == t) {
            Some(d) => {
                let mode = match &d.incremental {
                    Some(cp) => format!(
                        "backupmode='incremental' incremental='{}' exportbitmap='{}'",
                        escape(cp),
                        escape(&d.export_bitmap)
                    ),
                    None => "backupmode='full'".into(),
                };
                let _ = writeln!(
                    x,
                    "    <disk name='{}' backup='yes' type='file' exportname='{}' {mode}>\n      <scratch file='{}'/>\n    </disk>",
                    escape(t),
                    escape(t),
                    escape(&d.scratch.to_string_lossy())
                );
            }
            None => {
                let _ = writeln!(x, "    <disk name='{}' backup='no'/>", escape(t));
            }
        }
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// `<domaincheckpoint>` named `name`, a bitmap on each of `bitmap_disks`, none elsewhere.
pub fn checkpoint_xml(name: &str, bitmap_disks: &[String], all_targets: &[String]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        escape(name)
    );
    for t in all_targets {
        let kind = if bitmap_disks.contains(t) {
            "bitmap"
        } else {
            "no"
        };
        let _ = writeln!(x, "    <disk name='{}' checkpoint='{kind}'/>", escape(t));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// Bytes written since a checkpoint, per disk, from its XML with sizes.
pub fn checkpoint_sizes(xml: &str) -> Vec<(String, u64)> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    let Some(disks) = child(doc.root_element(), "disks") else {
        return Vec::new();
    };
    disks
        .children()
        .filter(|d| d.has_tag_name("disk"))
        .filter_map(|d| {
            let size = d.attribute("size")?.parse().ok()?;
            Some((d.attribute("name")?.to_owned(), size))
        })
        .collect()
}

/// A checkpoint's `<creationTime>` (seconds since the epoch).
pub fn creation_time(checkpoint_xml: &str) -> Option<u64> {
    let doc = roxmltree::Document::parse(checkpoint_xml).ok()?;
    text_of(doc.root_element(), "creationTime")?.parse().ok()
}

/// The changes a restore makes to a stored domain XML.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub name: String,
    /// New source path and format per disk target; a disk not named keeps its source.
    pub disks: Vec<(String, PathBuf, DiskFormat)>,
    /// New MAC addresses, in interface order.
    pub macs: Vec<String>,
}

/// The stored XML with a new name, no UUID (libvirt makes one), the restored disks, new MAC
/// addresses, and nothing of the original's run time (security labels, agent socket paths).
pub fn rewrite(xml: &str, r: &Rewrite) -> Result<String, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let mut out = String::with_capacity(xml.len());
    let mut macs = r.macs.iter();
    emit(doc.root_element(), r, &mut macs, &mut out);
    Ok(out)
}

fn parent_is(n: roxmltree::Node<'_, '_>, tag: &str) -> bool {
    n.parent_element().is_some_and(|p| p.has_tag_name(tag))
}

fn emit<'r>(
    n: roxmltree::Node<'_, '_>,
    r: &'r Rewrite,
    macs: &mut std::slice::Iter<'r, String>,
    out: &mut String,
) {
    if n.is_text() {
        out.push_str(&escape(n.text().unwrap_or("")));
        return;
    }
    if !n.is_element() {
        return;
    }
    let tag = n.tag_name().name();
    let at_root = parent_is(n, "domain")
        && n.parent_element()
            .is_some_and(|p| p.parent_element().is_none());
    if at_root && (tag == "uuid" || tag == "seclabel") {
        return;
    }
    // A disk the backup does not hold is left out: the new domain must never share the
    // original's disk (a network volume, an image on no datastore). CD-ROMs stay.
    if tag == "disk" && parent_is(n, "devices") {
        let target = child(n, "target").and_then(|t| t.attribute("dev"));
        let media = matches!(n.attribute("device"), Some("cdrom" | "floppy"));
        if !media && !r.disks.iter().any(|(t, ..)| Some(t.as_str()) == target) {
            return;
        }
    }
    // The disk this element belongs to, when it is a restored one.
    let disk = n
        .ancestors()
        .find(|a| a.has_tag_name("disk"))
        .and_then(|d| child(d, "target").and_then(|t| t.attribute("dev")))
        .and_then(|t| r.disks.iter().find(|(target, ..)| target == t));
    let qualified = |local: &str, ns: Option<&str>| match ns.and_then(|ns| n.lookup_prefix(ns)) {
        Some(p) => format!("{p}:{local}"),
        None => local.to_owned(),
    };
    let mut attrs: Vec<(String, String)> = n
        .attributes()
        .map(|a| (qualified(a.name(), a.namespace()), a.value().to_owned()))
        .collect();
    match tag {
        "disk" if disk.is_some() && parent_is(n, "devices") => set(&mut attrs, "type", "file"),
        "source" if disk.is_some() && parent_is(n, "disk") => {
            if let Some((_, path, _)) = disk {
                attrs.retain(|(k, _)| k != "dev" && k != "file" && k != "index");
                attrs.push(("file".into(), path.to_string_lossy().into_owned()));
            }
        }
        "driver" if disk.is_some() && parent_is(n, "disk") => {
            if let Some((_, _, f)) = disk {
                set(&mut attrs, "type", f.as_str());
            }
        }
        "mac" if parent_is(n, "interface") => {
            if let Some(m) = macs.next() {
                set(&mut attrs, "address", m);
            }
        }
        "source" if parent_is(n, "channel") => attrs.retain(|(k, _)| k != "path"),
        _ => {}
    }
    let name = qualified(tag, n.tag_name().namespace());
    out.push('<');
    out.push_str(&name);
    if n.parent_element().is_none() {
        for ns in n.namespaces() {
            match ns.name() {
                Some(p) => {
                    let _ = write!(out, " xmlns:{p}='{}'", escape(ns.uri()));
                }
                None => {
                    let _ = write!(out, " xmlns='{}'", escape(ns.uri()));
                }
            }
        }
    }
    for (k, v) in &attrs {
        let _ = write!(out, " {k}='{}'", escape(v));
    }
    if tag == "name" && at_root {
        let _ = write!(out, ">{}</name>", escape(&r.name));
        return;
    }
    if n.children().next().is_none() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for c in n.children() {
        emit(c, r, macs, out);
    }
    let _ = write!(out, "</{name}>");
}

fn set(attrs: &mut Vec<(String, String)>, key: &str, value: &str) {
    match attrs.iter_mut().find(|(k, _)| k == key) {
        Some(a) => a.1 = value.to_owned(),
        None => attrs.push((key.to_owned(), value.to_owned())),
    }
}

#[cfg(test)]
mod tests;
