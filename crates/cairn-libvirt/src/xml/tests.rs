use super::*;

/// A live domain XML as libvirt 11 writes it (trimmed), with every disk kind the driver meets.
const LIVE: &str = r#"<domain type='qemu' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web-1</name>
  <uuid>6f1c3c2e-9a4b-4d7e-8f00-0123456789ab</uuid>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <kernel>/boot/vmlinux</kernel>
    <initrd>/boot/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/ds/web-1.qcow2' index='2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/ds/web-1-data.raw'/>
      <target dev='vdb' bus='virtio'/>
      <serial>DATA-01</serial>
    </disk>
    <disk type='block' device='lun'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/disk/by-id/wwn-0x5000c5'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:aa:bb:cc'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source network='default'/>
      <model type='e1000'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-web-1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+993</label>
    <imagelabel>+64055:+993</imagelabel>
  </seclabel>
  <qemu:commandline>
    <qemu:arg value='-no-user-config'/>
  </qemu:commandline>
</domain>"#;

#[test]
fn reads_what_the_driver_needs() {
    let x = parse(LIVE).unwrap();
    assert_eq!(x.name, "web-1");
    assert_eq!(x.uuid, "6f1c3c2e-9a4b-4d7e-8f00-0123456789ab");
    assert_eq!((x.vcpus, x.memory_kib), (2, 262_144));
    assert_eq!(x.machine.as_deref(), Some("pc-q35-10.0"));
    assert_eq!(x.dac_label, Some((64055, 993)));
    assert_eq!(
        x.agent_socket.as_deref(),
        Some(std::path::Path::new(
            "/run/libvirt/qemu/channel/3-web-1/org.qemu.guest_agent.0"
        ))
    );
    let targets: Vec<_> = x.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["vda", "vdb", "sda", "vdc", "sdb"]);
    // Network disks and CD-ROMs cannot be protected, and say why.
    let why: Vec<_> = x.disks.iter().map(|d| d.unprotectable()).collect();
    assert!(why[..3].iter().all(Option::is_none), "{why:?}");
    assert!(why[3].as_deref().unwrap().contains("rbd"), "{why:?}");
    assert!(why[4].as_deref().unwrap().contains("cdrom"), "{why:?}");
    assert!(x.disks[0].has_bitmaps() && !x.disks[1].has_bitmaps());
}

#[test]
fn attributes_map_disks_luns_nics_and_boot() {
    let spec = parse(LIVE).unwrap().spec(Some("<domain/>".into()));
    assert_eq!(spec.name, "web-1");
    assert_eq!(spec.memory_mib, 256);
    assert_eq!(spec.disks.len(), 3);
    assert_eq!(spec.disks[0].format, DiskFormat::Qcow2);
    assert_eq!(spec.disks[1].format, DiskFormat::Raw);
    assert_eq!(spec.disks[1].lun, None, "a raw image file is not a LUN");
    // A block device passed through as a LUN is a raw device mapping.
    assert_eq!(spec.disks[2].bus, DiskBus::VirtioScsi);
    assert!(spec.disks[2].lun.as_deref().unwrap().contains("sda"));
    assert_eq!(spec.nics[0].model, "virtio-net-pci");
    assert_eq!(spec.nics[1].model, "e1000");
    assert!(matches!(spec.boot, BootSpec::Kernel { .. }));
    assert_eq!(spec.domain_xml.as_deref(), Some("<domain/>"));
    spec.validate().unwrap();
}

#[test]
fn refuses_what_is_not_a_domain_and_hostile_xml() {
    assert!(parse("<network><name>x</name></network>").is_err());
    assert!(
        parse("<domain><memory>1</memory></domain>").is_err(),
        "no name"
    );
    assert!(
        parse("<domain><name>x</name></domain>").is_err(),
        "no memory"
    );
    assert!(parse("<domain><name>x</name>").is_err(), "truncated");
    // Entities are not expanded (no billion laughs, no external files).
    let bomb = r#"<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a SYSTEM "file:///etc/passwd">]>
        <domain><name>&a;</name><memory>1</memory></domain>"#;
    if let Ok(x) = parse(bomb) {
        assert!(!x.name.contains("root:"), "{}", x.name);
    }
}

#[test]
fn memory_units() {
    assert_eq!(kib("2", "GiB"), Some(2 << 20));
    assert_eq!(kib("512", "MiB"), Some(512 << 10));
    assert_eq!(kib("1048576", "b"), Some(1024));
    assert_eq!(kib("x", "KiB"), None);
    assert_eq!(kib("1", "parsecs"), None);
    assert_eq!(
        kib(&u64::MAX.to_string(), "TiB"),
        None,
        "overflow is refused"
    );
}

#[test]
fn backup_and_checkpoint_xml_escape_and_cover_every_disk() {
    let targets = vec!["vda".to_string(), "vdb".to_string(), "vdc".to_string()];
    let disks = [
        BackupDisk {
            target: "vda".into(),
            incremental: Some("cairn-00000000000000a1".into()),
            scratch: "/s/cx-1/vda.qcow2".into(),
            export_bitmap: "cx-vda".into(),
        },
        BackupDisk {
            target: "vdb".into(),
            incremental: None,
            scratch: "/s/cx-1/vdb.qcow2".into(),
            export_bitmap: "cx-vdb".into(),
        },
    ];
    let b = backup_xml(std::path::Path::new("/s/x'<&.sock"), &disks, &targets);
    let doc = roxmltree::Document::parse(&b).unwrap();
    let server = doc
        .descendants()
        .find(|n| n.has_tag_name("server"))
        .unwrap();
    assert_eq!(server.attribute("socket"), Some("/s/x'<&.sock"));
    let d: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .collect();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].attribute("backupmode"), Some("incremental"));
    assert_eq!(
        d[0].attribute("incremental"),
        Some("cairn-00000000000000a1")
    );
    assert_eq!(d[0].attribute("exportbitmap"), Some("cx-vda"));
    assert_eq!(d[1].attribute("backupmode"), Some("full"));
    assert_eq!(d[2].attribute("backup"), Some("no"));

    let c = checkpoint_xml("cairn-1", &["vda".into()], &targets);
    let doc = roxmltree::Document::parse(&c).unwrap();
    let kinds: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .map(|n| n.attribute("checkpoint").unwrap())
        .collect();
    assert_eq!(kinds, ["bitmap", "no", "no"]);
}

#[test]
fn checkpoint_sizes_are_read_per_disk() {
    let x = "<domaincheckpoint><name>cairn-1</name><disks>\
        <disk name='vda' checkpoint='bitmap' bitmap='cairn-1' size='1048576'/>\
        <disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>";
    assert_eq!(checkpoint_sizes(x), [("vda".to_string(), 1 << 20)]);
    assert!(checkpoint_sizes("<oops").is_empty());
}

#[test]
fn rewrite_renames_moves_disks_and_forgets_the_original() {
    let r = Rewrite {
        name: "web-1-copy".into(),
        disks: vec![
            (
                "vda".into(),
                "/ds/restored/vda.qcow2".into(),
                DiskFormat::Qcow2,
            ),
            ("sda".into(), "/ds/restored/sda.raw".into(), DiskFormat::Raw),
        ],
        macs: vec!["52:54:00:00:00:01".into(), "52:54:00:00:00:02".into()],
    };
    let out = rewrite(LIVE, &r).unwrap();
    let x = parse(&out).unwrap();
    assert_eq!(x.name, "web-1-copy");
    assert_eq!(x.uuid, "", "libvirt makes a new UUID");
    assert_eq!(x.dac_label, None, "security labels are the original's");
    assert_eq!(x.agent_socket, None, "libvirt picks a new agent socket");
    assert_eq!(
        x.disks[0].data,
        DiskData::File("/ds/restored/vda.qcow2".into())
    );
    // Disks the backup does not hold are left out (never shared with the original); the
    // CD-ROM stays.
    let targets: Vec<_> = x.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["vda", "sda", "sdb"]);
    // The LUN comes back as an image file in the datastore.
    assert_eq!(
        x.disks[1].data,
        DiskData::File("/ds/restored/sda.raw".into())
    );
    assert_eq!(x.disks[1].format, "raw");
    let macs: Vec<_> = x.nics.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(macs, ["52:54:00:00:00:01", "52:54:00:00:00:02"]);
    // Namespaced elements survive with their prefix.
    assert!(out.contains("<qemu:commandline>"), "{out}");
    assert!(out.contains("xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"));
    assert!(!out.contains("index="), "{out}");
}
