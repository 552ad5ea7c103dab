//! The QMP client against a scripted fake QEMU on a unix socket: behaviour real QEMU rarely
//! shows on demand (reordered replies, unknown messages, replies without id, overflow).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": "fake", "extra": [1]}, "capabilities": ["oob", "future-cap"], "more": {}}}"#;

struct Peer {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Peer {
    async fn recv(&mut self) -> Option<Value> {
        let line = self.lines.next_line().await.ok()??;
        Some(serde_json::from_str(&line).expect("client sends JSON"))
    }

    async fn send(&mut self, v: Value) {
        self.w
            .write_all(format!("{v}\r\n").as_bytes())
            .await
            .unwrap();
    }
}

/// Starts a fake QEMU that greets, accepts `qmp_capabilities`, then runs `script`.
async fn fake<F, Fut>(script: F) -> (tempfile::TempDir, QmpClient)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    fake_with(QmpOptions::default(), script).await
}

async fn fake_with<F, Fut>(options: QmpOptions, script: F) -> (tempfile::TempDir, QmpClient)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w): (OwnedReadHalf, OwnedWriteHalf) = UnixStream::into_split(stream);
        let mut peer = Peer {
            lines: BufReader::new(r).lines(),
            w,
        };
        peer.w.write_all(GREETING.as_bytes()).await.unwrap();
        peer.w.write_all(b"\r\n").await.unwrap();
        let caps = peer.recv().await.unwrap();
        assert_eq!(caps["execute"], "qmp_capabilities");
        peer.send(json!({"return": {}, "id": caps["id"], "unexpected": true}))
            .await;
        script(peer).await;
    });
    let client = QmpClient::connect(&path, options).await.unwrap();
    (dir, client)
}

#[tokio::test]
async fn reordered_replies_and_unknown_messages() {
    let (_dir, qmp) = fake(|mut peer| async move {
        let a = peer.recv().await.unwrap();
        let b = peer.recv().await.unwrap();
        peer.send(json!({"something-new": {"x": 1}})).await;
        peer.send(
            json!({"event": "FUTURE_EVENT", "data": {"state": "brand-new-enum"},
            "timestamp": {"seconds": 1, "microseconds": 2}, "extra": 1}),
        )
        .await;
        // Answer the second request first.
        peer.send(json!({"return": {"who": b["execute"]}, "id": b["id"]}))
            .await;
        peer.send(json!({"return": {"who": a["execute"]}, "id": a["id"]}))
            .await;
        std::future::pending::<()>().await;
    })
    .await;
    assert_eq!(qmp.greeting().version.major, 99);
    assert!(qmp.greeting().capabilities.contains(&"future-cap".into()));
    let (ra, rb) = tokio::join!(qmp.execute("cmd-a", None), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        qmp.execute("cmd-b", Some(json!({"k": 1}))).await
    });
    assert_eq!(ra.unwrap()["who"], "cmd-a");
    assert_eq!(rb.unwrap()["who"], "cmd-b");
    let ev = qmp
        .wait_event(
            "FUTURE_EVENT",
            |e| e.data["state"] == "brand-new-enum",
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(ev.timestamp_us, Some(1_000_002));
}

#[tokio::test]
async fn eof_mid_command_fails_every_waiter() {
    let (_dir, qmp) = fake(|mut peer| async move {
        let _ = peer.recv().await;
        // Die with the command in flight.
    })
    .await;
    let start = Instant::now();
    let (cmd, ev) = tokio::join!(
        qmp.execute("query-status", None),
        qmp.wait_event("NEVER", |_| true, Duration::from_secs(30))
    );
    assert!(cmd.unwrap_err().is_disconnected());
    assert!(ev.unwrap_err().is_disconnected());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(qmp.closed_reason().unwrap().contains("EOF"));
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
}

#[tokio::test]
async fn error_reply_without_id_reaches_the_single_pending_command() {
    let (_dir, qmp) = fake(|mut peer| async move {
        let _ = peer.recv().await;
        peer.send(json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}))
            .await;
        std::future::pending::<()>().await;
    })
    .await;
    let err = qmp.execute("x", None).await.unwrap_err();
    assert_eq!(err.class(), Some(&QmpErrorClass::GenericError));
}

#[tokio::test]
async fn silent_peer_times_out_and_late_reply_is_dropped() {
    let (_dir, qmp) = fake(|mut peer| async move {
        let first = peer.recv().await.unwrap();
        let second = peer.recv().await.unwrap();
        // The late reply to the timed-out command, then the real one.
        peer.send(json!({"return": "late", "id": first["id"]}))
            .await;
        peer.send(json!({"return": "fresh", "id": second["id"]}))
            .await;
        std::future::pending::<()>().await;
    })
    .await;
    let err = qmp
        .execute_with_timeout("slow", None, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(qmp.execute("next", None).await.unwrap(), "fresh");
}

#[tokio::test]
async fn event_buffer_drops_oldest_when_full() {
    let options = QmpOptions {
        event_buffer: 2,
        ..QmpOptions::default()
    };
    let (_dir, qmp) = fake_with(options, |mut peer| async move {
        for i in 0..3 {
            peer.send(json!({"event": "TICK", "data": {"i": i}})).await;
        }
        let ping = peer.recv().await.unwrap();
        peer.send(json!({"return": {}, "id": ping["id"]})).await;
        std::future::pending::<()>().await;
    })
    .await;
    // The reply comes after the events, so they are all in by now.
    qmp.execute("ping", None).await.unwrap();
    assert_eq!(qmp.dropped_events(), 1);
    let events = qmp.take_events();
    let seen: Vec<_> = events.iter().map(|e| e.data["i"].clone()).collect();
    assert_eq!(seen, vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn invalid_json_closes_the_connection() {
    let (_dir, qmp) = fake(|mut peer| async move {
        let _ = peer.recv().await;
        peer.w.write_all(b"{not json\r\n").await.unwrap();
        std::future::pending::<()>().await;
    })
    .await;
    let err = qmp.execute("x", None).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    assert!(qmp.closed_reason().unwrap().contains("invalid JSON"));
}
