//! Cairn's host-agent driver for libvirt domains ([`LibvirtDriver`]).
//!
//! On KVM hosts libvirt is the VM management layer: it owns each domain's QEMU, its block
//! graph and its guest agent channel. This driver therefore talks to libvirt only, never to a
//! domain's QMP monitor (libvirt would mark the domain tainted and could lose track of its
//! block graph), through libvirt's public C API loaded at run time ([`ffi`], the crate's only
//! `unsafe` code; `docs/DESIGN.md` says why this and not the `virt` crate or libvirt's RPC
//! protocol).
//!
//! Contracts, on top of those of [`cairn_hypervisor::driver::HypervisorDriver`]:
//! - Every domain is listed: running, paused and shut off, persistent and transient. A VM's id
//!   is the first 64 bits of its UUID. Its attributes are read from its domain XML, which the
//!   attributes carry whole ([`cairn_api::host::VmSpec::domain_xml`]) for a restore.
//! - A running domain's snapshot is a libvirt pull-mode backup job with one checkpoint
//!   (`backup.rs`); the guest is frozen through its agent (or paused) only while the job begins.
//!   A shut-off domain's snapshot reads its disk files in place.
//! - Only checkpoints named `cairn-…` are ever created or deleted; a lost chain makes the next
//!   backup read whole disks, never fail.
//! - Every job in flight is journaled before it starts (`journal.rs`); `recover` ends what a
//!   killed agent left, and `delete_snapshot` leaves no job, socket or scratch file behind.
//! - Restores define a new persistent domain from the stored XML (`restore.rs`).
//! - Restore into the guest runs its guest-agent commands through libvirt (`agent.rs`).

mod agent;
mod backup;
pub mod driver;
pub mod ffi;
mod hold;
mod journal;
mod restore;
pub mod xml;

pub use backup::CheckpointMode;
pub use driver::{LibvirtDriver, LibvirtOptions, vm_id};
pub use ffi::LibvirtError;
