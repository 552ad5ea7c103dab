//! Typed clients: one trait per service, with the calls the other services make, and an
//! HTTPS implementation of each over [`cairn_http::Client`].
//!
//! The traits are what callers hold (`Arc<dyn ManagerApi>`, `Arc<dyn StorageAgentApi>`), so a
//! fake can stand in for a service in tests. Every call is blocking and bounded by the HTTP
//! client's timeouts; an answer that does not parse as the expected type is a
//! [`ClientError::Decode`] naming the unknown field or variant.

use std::sync::Arc;

use cairn_http::{Client, ClientError, Trust};

mod host;
mod manager;
mod server;
mod storage;

pub use host::{HostAgentApi, HostAgentClient};
pub use manager::{ManagerApi, ManagerClient, spawn_heartbeat};
pub use server::{FILE_HEADER, FILE_VAULT_BYTES_HEADER, FindFiles, ServerApi, ServerClient};
pub use storage::{StorageAgentApi, StorageAgentClient, VAULT_BYTES_HEADER, VAULT_SEGMENTS_HEADER};

use crate::manager::Registration;

/// The result of a call to another service.
pub type CallResult<T> = Result<T, ClientError>;

/// Makes clients for registered agents. The manager reaches host and storage agents through
/// it, the server storage agents; tests put a fake in its place.
pub trait AgentConnector: Send + Sync {
    fn host_agent(&self, r: &Registration) -> CallResult<Arc<dyn HostAgentApi>>;
    fn storage_agent(&self, r: &Registration) -> CallResult<Arc<dyn StorageAgentApi>>;
}

/// Connects over HTTPS, trusting each agent's certificate by the fingerprint it registered.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpConnector;

impl HttpConnector {
    fn client(r: &Registration) -> CallResult<Client> {
        Client::new(&r.url, &r.token, &Trust::Fingerprint(r.fingerprint.clone()))
    }
}

impl AgentConnector for HttpConnector {
    fn host_agent(&self, r: &Registration) -> CallResult<Arc<dyn HostAgentApi>> {
        Ok(Arc::new(HostAgentClient::from_http(Self::client(r)?)))
    }

    fn storage_agent(&self, r: &Registration) -> CallResult<Arc<dyn StorageAgentApi>> {
        Ok(Arc::new(StorageAgentClient::from_http(Self::client(r)?)))
    }
}

/// A name as one URL path segment: `[A-Za-z0-9._-]` as is (agents restrict names to these),
/// anything else percent-escaped.
pub(crate) fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(super::seg("vm-1.a_b"), "vm-1.a_b");
        assert_eq!(super::seg("a/b c"), "a%2Fb%20c");
        assert_eq!(super::seg(".."), "..");
    }
}
