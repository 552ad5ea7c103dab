//! Every flow end to end, each role in its own process on loopback: `cairn vault`,
//! `cairn manager`, `cairn host-agent`, `cairn storage-agent`, `cairn server`, two tiny QEMU
//! guests under TCG, and the operator CLI. Also the bad inputs: bad token, malformed and
//! invalid requests, unknown VM, conflicting jobs, a host that stopped heartbeating. And a
//! QEMU started by hand, adopted through its QMP socket.
//!
//! Needs `qemu-system-x86_64` and the tiny guest (`scripts/build-test-guest.sh`); with
//! `CAIRN_REQUIRE_QEMU=1` (scripts/test.sh as root) their absence fails the test, otherwise it
//! says loudly that it skipped.

mod adopt;
mod failures;
mod faults;
mod flows;
mod harness;
mod libvirt;
mod libvirt_group;
mod libvirt_peers;
mod mutual;
