//! Test doubles for the control plane: a fake host agent ([`FakeHost`]), storage agent
//! ([`FakeStorage`]) and manager ([`FakeManager`]) behind the `cairn-api` traits, and a
//! connector ([`FakeAgents`]) that hands them out by agent name. No network, no QEMU.
//! Beside them, real servers on loopback for the tests that need one: S3 ([`s3`]) and
//! PostgreSQL ([`pg`]).
//!
//! A dev-dependency only (`scripts/layering.txt` refuses it as a normal dependency).
//!
//! # Contracts
//!
//! - **Every call is scripted by name.** Each fake has a [`Script`]: each call first records
//!   its name, then runs the hook set for it with [`Script::on`] (a test cancels a job there),
//!   then fails with the [`Fault`] set with [`Script::fail`], if any. Calls are named after the
//!   trait methods (`vm`, `snapshot`, `delete_snapshot`, `backups`, ...).
//! - **What a fake answers is deterministic**: snapshot ids count up from
//!   `8000000000000010`, vault snapshot ids from `…01`; answers echo the request.
//! - A call a fake does not model answers `500 not faked`, never a default value.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_api::CallResult;
use cairn_http::{ApiError, ClientError, ErrorKind};

mod agents;
mod manager;
pub mod pg;
pub mod s3;
mod storage;

pub use agents::{FakeAgents, FakeHost, vm_info};
pub use manager::{FakeManager, vm_location};
pub use storage::{FakeStorage, datastore};

/// How a scripted call fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The peer cannot be reached (connection refused).
    Down,
    /// The peer answered a variant the typed client does not know.
    UnknownVariant(String),
    /// The peer answered an API error of this kind.
    Api(ErrorKind, String),
}

impl Fault {
    /// The client error a real client would return for this fault on `url`.
    pub fn error(&self, url: &str) -> ClientError {
        match self {
            Self::Down => ClientError::Transport {
                url: url.into(),
                msg: "connection refused".into(),
            },
            Self::UnknownVariant(v) => ClientError::Decode {
                url: url.into(),
                msg: format!("unknown variant `{v}`, expected `ok` or `error`"),
            },
            Self::Api(kind, msg) => ClientError::Api {
                url: url.into(),
                status: kind.status().as_u16(),
                api: ApiError::new(*kind, msg.clone()),
            },
        }
    }
}

/// The answer of a call a fake does not model.
pub fn refused<T>() -> CallResult<T> {
    Err(Fault::Api(ErrorKind::Internal, "not faked".into()).error("fake"))
}

/// A `404` naming `what`, as the services answer.
pub fn not_found<T>(what: impl Into<String>) -> CallResult<T> {
    Err(ClientError::Api {
        url: "fake".into(),
        status: 404,
        api: ApiError::not_found(what.into()),
    })
}

type Hook = Arc<dyn Fn() + Send + Sync>;

/// The calls a fake received, and how it answers them (see the crate doc).
#[derive(Default)]
pub struct Script {
    faults: Mutex<BTreeMap<&'static str, Fault>>,
    hooks: Mutex<BTreeMap<&'static str, Hook>>,
    calls: Mutex<Vec<&'static str>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("faults", &*lock(&self.faults))
            .field("calls", &*lock(&self.calls))
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Script {
    /// Makes every later `call` fail with `fault`.
    pub fn fail(&self, call: &'static str, fault: Fault) {
        lock(&self.faults).insert(call, fault);
    }

    /// Makes `call` answer again.
    pub fn heal(&self, call: &'static str) {
        lock(&self.faults).remove(call);
    }

    /// Runs `hook` at the start of every later `call` (before its fault, if any).
    pub fn on(&self, call: &'static str, hook: impl Fn() + Send + Sync + 'static) {
        lock(&self.hooks).insert(call, Arc::new(hook));
    }

    /// The names of the calls received, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        lock(&self.calls).clone()
    }

    /// How many times `call` was received.
    pub fn count(&self, call: &str) -> usize {
        lock(&self.calls).iter().filter(|c| **c == call).count()
    }

    /// Records `call`, runs its hook, and answers its fault.
    pub fn enter(&self, call: &'static str, url: &str) -> CallResult<()> {
        lock(&self.calls).push(call);
        let hook = lock(&self.hooks).get(call).cloned();
        if let Some(h) = hook {
            h();
        }
        match lock(&self.faults).get(call) {
            Some(f) => Err(f.error(url)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_records_runs_hooks_and_fails_until_healed() {
        let s = Script::default();
        let hits = Arc::new(Mutex::new(0));
        let h = hits.clone();
        s.on("vm", move || *lock(&h) += 1);
        assert!(s.enter("vm", "u").is_ok());
        s.fail("vm", Fault::Down);
        let e = s.enter("vm", "https://m").unwrap_err();
        assert!(e.to_string().contains("https://m"), "{e}");
        s.heal("vm");
        assert!(s.enter("vm", "u").is_ok());
        assert_eq!(s.count("vm"), 3);
        assert_eq!(*lock(&hits), 3);
        assert_eq!(s.calls(), ["vm", "vm", "vm"]);
    }

    #[test]
    fn faults_become_the_errors_real_clients_return() {
        let e = Fault::Api(ErrorKind::NotFound, "VM x not found".into()).error("u");
        assert_eq!(e.kind(), Some(ErrorKind::NotFound));
        let e = Fault::UnknownVariant("maybe".into()).error("u");
        assert!(e.to_string().contains("unknown variant `maybe`"), "{e}");
        assert_eq!(Fault::Down.error("u").kind(), None);
    }
}
