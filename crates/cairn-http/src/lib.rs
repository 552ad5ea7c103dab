//! The conventions every Cairn service shares, so that the vault, the agents, the manager and
//! the server look alike from the outside:
//!
//! - **TLS always.** A service without a configured certificate makes a self-signed one on
//!   first start and keeps it in its state directory; clients pin it by its SHA-256
//!   fingerprint (`CAIRN_FINGERPRINT`) or trust a CA file (`CAIRN_CA`).
//! - **Bearer tokens.** Every request but `GET /health` carries `Authorization: Bearer TOKEN`;
//!   a missing or wrong token is `401`, a token without the scope the call needs `403`, and
//!   the request does nothing ([`access`]: scoped tokens, each service's rules, the audit log).
//! - **JSON errors.** Every error response is `{"error": {"kind": ..., "message": ...}}` with a
//!   status that says whose fault it was (4xx: the caller's, 5xx: ours).
//!
//! - **Bounded bodies.** A service reads request bodies as they stream ([`body`]), each up to
//!   its route's limit (`413` beyond) and all together within a byte budget.
//!
//! [`server`] holds the async side (axum over tokio-rustls); [`client`] a blocking client
//! (ureq) for CLIs and agents.

pub mod access;
pub mod body;
pub mod ca;
pub mod client;
pub mod error;
pub mod mtls;
pub mod server;
pub mod tls;

pub use client::{Client, ClientError, Trust};
pub use error::{ApiError, ErrorBody, ErrorKind, chain};
