//! Integration tests against real QEMU. One binary; run with `--test-threads=1` on small
//! machines. Tests that need a program that is missing print a loud SKIPPED notice and pass,
//! unless `CAIRN_REQUIRE_QEMU=1`, which turns the skip into a failure (for CI).

mod adopt;
mod common;
mod driver;
mod guest;
mod guest_driver;
mod guestless;
mod service;
