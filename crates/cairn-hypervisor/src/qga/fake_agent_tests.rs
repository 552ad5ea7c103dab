//! The guest-agent client against a scripted fake agent: stale replies, garbage before the sync
//! delimiter, silence, and a channel that closes.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// Reads one request, skipping `0xFF` bytes the way the agent's parser resets on them.
async fn recv(s: &mut UnixStream) -> Option<Value> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        match byte[0] {
            SYNC_DELIMITER => line.clear(),
            b'\n' => return Some(serde_json::from_slice(&line).unwrap()),
            b => line.push(b),
        }
    }
}

/// A well-behaved agent that prefixes noise to everything it says.
async fn noisy_agent(mut s: UnixStream) {
    while let Some(req) = recv(&mut s).await {
        let cmd = req["execute"].as_str().unwrap_or_default().to_owned();
        // Left over from before: a stale reply, a parse error, a reply with a foreign id.
        s.write_all(b"{\"return\": {}, \"id\": 1}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"stray\"}}\n")
            .await
            .unwrap();
        let reply = match cmd.as_str() {
            "guest-sync-delimited" => {
                s.write_all(&[SYNC_DELIMITER]).await.unwrap();
                json!({"return": req["arguments"]["id"]})
            }
            "guest-ping" => json!({"return": {}, "id": req["id"], "new-field": 1}),
            "guest-fsfreeze-status" => json!({"return": "some-future-state", "id": req["id"]}),
            "guest-exec-status" => json!({"return": {"exited": true, "exitcode": 3,
                "out-data": "aGVsbG8K", "err-truncated": false}, "id": req["id"]}),
            "guest-get-fsinfo" => json!({"return": [{"name": "vda", "mountpoint": "/mnt",
                "type": "ext4", "disk": [{"bus-type": "virtio", "bus": 0, "dev": "/dev/vda",
                "future": {}}], "new": 1}], "id": req["id"]}),
            _ => json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": req["id"]}),
        };
        s.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
    }
}

async fn serve<F, Fut>(agent: F) -> (tempfile::TempDir, GuestAgent)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        agent(stream).await;
    });
    let options = QgaOptions {
        sync_timeout: Duration::from_millis(300),
        command_timeout: Duration::from_millis(500),
        ..QgaOptions::default()
    };
    (dir, GuestAgent::new(&path, options))
}

#[tokio::test]
async fn sync_and_commands_skip_stale_output() {
    let (_dir, qga) = serve(noisy_agent).await;
    qga.wait_ready(Duration::from_secs(2)).await.unwrap();
    qga.ping().await.unwrap();
    assert_eq!(
        qga.fsfreeze_status().await.unwrap(),
        FreezeStatus::Other("some-future-state".into())
    );
    let st = qga.exec_status(7).await.unwrap();
    assert!(st.exited);
    assert_eq!(st.exit_code, Some(3));
    assert_eq!(st.stdout, b"hello\n");
    let fs = qga.get_fsinfo().await.unwrap();
    assert_eq!(fs[0].disk[0].dev.as_deref(), Some("/dev/vda"));
    let err = qga.execute("guest-nope", None).await.unwrap_err();
    assert!(
        matches!(&err, QgaError::Command { class, .. } if class == "CommandNotFound"),
        "{err}"
    );
}

#[tokio::test]
async fn silent_agent_is_a_timeout_not_a_hang() {
    let (_dir, qga) = serve(|mut s| async move {
        let mut sink = vec![0u8; 4096];
        while s.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await;
    let t = Instant::now();
    let err = qga.ping().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let err = qga
        .wait_ready(Duration::from_millis(700))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn agent_that_answers_sync_then_hangs_times_out_and_resyncs() {
    let (_dir, qga) = serve(|mut s| async move {
        // Answers syncs only; swallows every other command.
        while let Some(req) = recv(&mut s).await {
            if req["execute"] == "guest-sync-delimited" {
                let reply = json!({"return": req["arguments"]["id"]});
                s.write_all(&[SYNC_DELIMITER]).await.unwrap();
                s.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        }
    })
    .await;
    let err = qga.ping().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The connection is kept but resynced: the agent still answers syncs.
    qga.wait_ready(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn closed_channel_is_disconnected() {
    let (_dir, qga) = serve(|s| async move { drop(s) }).await;
    let err = qga.ping().await.unwrap_err();
    assert!(matches!(err, QgaError::Disconnected { .. }), "{err}");
}
