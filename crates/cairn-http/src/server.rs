//! The server side: a TLS listener for axum and the admin-token check.
//!
//! TLS handshakes run in their own tasks (a slow or hostile client cannot stall the accept
//! loop) and each is bounded by a timeout; failed handshakes are logged and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::mtls::{ClientAuth, Peer, PeerCert};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that yields TLS streams; pass it to `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish()
    }
}

impl TlsListener {
    /// Binds `addr` and starts accepting in the background.
    pub async fn bind(addr: SocketAddr, cfg: rustls::ServerConfig) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task only ends when the runtime shuts down.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Puts the admin-token check in front of every route of `router` (a service without
/// scoped tokens; see [`crate::access`]).
pub fn with_token<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    token: String,
) -> axum::Router<S> {
    crate::access::with_access(
        router,
        Arc::new(crate::access::Access::admin_only(
            "service",
            &token,
            Arc::new(crate::access::admin_rule),
        )),
    )
}

/// A service's TLS: its configuration and, with mutual TLS, the policy its callers'
/// certificates are checked against ([`crate::mtls`]).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub config: rustls::ServerConfig,
    pub clients: Option<Arc<ClientAuth>>,
}

impl From<rustls::ServerConfig> for ServerTls {
    fn from(config: rustls::ServerConfig) -> Self {
        Self {
            config,
            clients: None,
        }
    }
}

impl ServerTls {
    /// The configuration of `id`, asking callers for certificates when `clients` is given.
    pub fn new(
        id: &crate::tls::Identity,
        clients: Option<Arc<ClientAuth>>,
    ) -> Result<Self, crate::tls::TlsError> {
        Ok(Self {
            config: crate::tls::server_config_with(id, clients.clone())?,
            clients,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: IncomingStream<'_, TlsListener>) -> Self {
        let cert = s
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|d| PeerCert::parse(d))
            .map(Arc::new);
        Peer {
            addr: *s.remote_addr(),
            cert,
        }
    }
}

/// Middleware in front of every route: refuses a connection whose certificate was revoked
/// since its handshake, and hands the [`Peer`] to the access check and the handlers.
async fn check_peer(
    State(clients): State<Option<Arc<ClientAuth>>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    if let Some(peer) = peer {
        if let (Some(auth), Some(cert)) = (&clients, &peer.cert)
            && let Some(why) = auth.refusal(cert)
        {
            tracing::warn!("refused {} from {}: {why}", req.uri().path(), peer.addr);
            return crate::ApiError::new(crate::ErrorKind::Forbidden, why).into_response();
        }
        req.extensions_mut().insert(peer);
    }
    next.run(req).await
}

/// Binds `addr` with TLS and serves `router` in a background task; returns the bound address
/// (port 0 picks one) and the task. `what` names the service in the log if it stops.
pub async fn serve(
    router: axum::Router,
    addr: SocketAddr,
    tls: impl Into<ServerTls>,
    what: &'static str,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let tls = tls.into();
    let listener = TlsListener::bind(addr, tls.config).await?;
    let local = axum::serve::Listener::local_addr(&listener)?;
    let router = router.layer(axum::middleware::from_fn_with_state(
        tls.clients,
        check_peer,
    ));
    let h = tokio::spawn(async move {
        let app = router.into_make_service_with_connect_info::<Peer>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("{what} stopped: {e}");
        }
    });
    Ok((local, h))
}

/// Reads `path`, or creates it with a fresh random token (mode 0600).
pub fn ensure_token(path: &std::path::Path) -> std::io::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let t = hex::encode(rand::random::<[u8; 24]>());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::tls::write_private(path, t.as_bytes())?;
    Ok(t)
}

/// Runs blocking work `f` on the blocking pool and answers its value as JSON with `status`;
/// an error becomes the service's JSON error. Handlers of every service use it, so none
/// blocks the async runtime.
pub async fn blocking_json<T, E>(
    status: axum::http::StatusCode,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<axum::response::Response, crate::ApiError>
where
    T: serde::Serialize + Send + 'static,
    E: Into<crate::ApiError> + Send + 'static,
{
    use axum::response::IntoResponse;
    let v = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::ApiError::internal(e.to_string()))?
        .map_err(Into::into)?;
    Ok((status, axum::Json(v)).into_response())
}

/// Parses a JSON request body; a malformed one is `400` naming what was wrong.
pub fn json_body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, crate::ApiError> {
    serde_json::from_slice(b).map_err(|e| crate::ApiError::bad_request(format!("request: {e}")))
}
