//! The blocking client against a real TLS service on 127.0.0.1: how every answer, error and
//! failure to connect becomes a [`ClientError`], so that callers can tell whose fault it was.

use std::net::SocketAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::get;
use cairn_http::{ApiError, Client, ClientError, ErrorKind, Trust, server, tls};
use serde::Deserialize;
use serde_json::json;

/// A service with a few canned answers; its runtime lives as long as it does.
struct Service {
    addr: SocketAddr,
    fingerprint: String,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn service() -> Service {
    let dir = tempfile::tempdir().unwrap();
    let (id, fingerprint) = tls::ensure_self_signed(dir.path(), &[]).unwrap();
    let cfg = tls::server_config(&id).unwrap();
    let router = axum::Router::new()
        .route("/ok", get(|| async { Json(json!({ "state": "ok" })) }))
        .route(
            "/maybe",
            get(|| async { Json(json!({ "state": "maybe" })) }),
        )
        .route(
            "/extra",
            get(|| async { Json(json!({ "state": "ok", "color": "red" })) }),
        )
        .route(
            "/missing",
            get(|| async { ApiError::not_found("disk vda not found") }),
        )
        .route(
            "/proxy",
            get(|| async { (StatusCode::BAD_GATEWAY, "<html>bad gateway</html>") }),
        )
        .route(
            "/future",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "error": { "kind": "quantum", "message": "decohered" } })),
                )
            }),
        );
    let router = server::with_token(router, "secret".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (addr, _task) = rt
        .block_on(server::serve(
            router,
            "127.0.0.1:0".parse().unwrap(),
            cfg,
            "test service",
        ))
        .unwrap();
    Service {
        addr,
        fingerprint,
        _rt: rt,
        _dir: dir,
    }
}

impl Service {
    fn client(&self, token: &str) -> Client {
        Client::new(
            &format!("https://{}", self.addr),
            token,
            &Trust::Fingerprint(self.fingerprint.clone()),
        )
        .unwrap()
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    state: State,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    Ok,
    Failed,
}

#[test]
fn answers_errors_and_refusals_map_to_what_they_are() {
    // One service for the lot: starting one costs a certificate.
    let s = service();
    let c = s.client("secret");

    let a: Answer = c.get_json("/ok").unwrap();
    assert_eq!(a.state, State::Ok);

    // The service's own error keeps its kind, status and message, and names the URL.
    let e = c.get_json::<Answer>("/missing").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound));
    assert!(matches!(&e, ClientError::Api { status: 404, .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("/missing") && text.contains("disk vda not found"),
        "{text}"
    );

    // An error body that is not ours (a proxy's page) is `unknown`, with its text.
    let e = c.get_json::<Answer>("/proxy").unwrap_err();
    let ClientError::Api { status, api, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!((*status, api.kind), (502, ErrorKind::Unknown));
    assert!(api.message.contains("bad gateway"), "{e}");

    // An error kind from a newer service is `unknown`, its message kept.
    let e = c.get_json::<Answer>("/future").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Unknown));
    assert!(e.to_string().contains("decohered"), "{e}");

    // An answer the caller's type does not know is a decode error naming what and where.
    for (path, needle) in [
        ("/maybe", "unknown variant `maybe`"),
        ("/extra", "unknown field `color`"),
    ] {
        let e = c.get_json::<Answer>(path).unwrap_err();
        assert!(matches!(&e, ClientError::Decode { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(needle) && text.contains(path), "{text}");
        assert_eq!(e.kind(), None);
    }

    // A wrong token is refused before any route runs.
    let e = s.client("wrong").get_json::<Answer>("/ok").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Unauthorized));
    assert!(matches!(&e, ClientError::Api { status: 401, .. }), "{e}");
}

#[test]
fn a_certificate_other_than_the_pinned_one_is_a_transport_error() {
    let s = service();
    let c = Client::new(
        &format!("https://{}", s.addr),
        "secret",
        &Trust::Fingerprint("00".repeat(32)),
    )
    .unwrap();
    let e = c.get_json::<Answer>("/ok").unwrap_err();
    assert!(matches!(&e, ClientError::Transport { .. }), "{e}");
    assert!(e.to_string().contains("is not the pinned"), "{e}");
    assert_eq!(e.kind(), None);
}

#[test]
fn nothing_listening_is_a_transport_error_naming_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(
        &format!("https://127.0.0.1:{port}"),
        "t",
        &Trust::Fingerprint("ab".repeat(32)),
    )
    .unwrap();
    let e = c.get_json::<Answer>("/ok").unwrap_err();
    assert!(matches!(&e, ClientError::Transport { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{port}/ok")),
        "{e}"
    );
}

#[test]
fn a_malformed_fingerprint_fails_before_any_connection() {
    let e = Client::new(
        "https://127.0.0.1:1",
        "t",
        &Trust::Fingerprint("xyz".into()),
    )
    .unwrap_err();
    assert!(matches!(&e, ClientError::Tls(_)), "{e}");
}

#[test]
fn a_request_body_with_an_unknown_field_is_a_bad_request_naming_it() {
    let e = server::json_body::<Answer>(br#"{"state": "ok", "colour": 1}"#).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    let e = server::json_body::<Answer>(br#"{"state": "failed""#).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("EOF"), "{e}");
    let ok: Answer = server::json_body(br#"{"state": "failed"}"#).unwrap();
    assert_eq!(ok.state, State::Failed);
}
