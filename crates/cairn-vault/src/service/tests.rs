//! The service in-process over loopback HTTPS: session leases and request-body limits.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use cairn_chunk::format::BlobKind;
use cairn_chunk::{EncodedSegment, fingerprint};
use cairn_http::{Client, ClientError, ErrorKind, Trust};
use serde_json::{Value, json};

use super::*;
use crate::api::{Upload, Vault};
use crate::maint::GcOptions;
use crate::remote::RemoteVault;
use crate::repo::InitOptions;

struct Served {
    _rt: tokio::runtime::Runtime,
    svc: Arc<VaultService>,
    url: String,
    trust: Trust,
    token: String,
    dir: tempfile::TempDir,
}

impl Served {
    fn new(opts: ServiceOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_dir(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let (id, fp) = cairn_http::tls::ensure_self_signed(&dir.path().join("tls"), &[]).unwrap();
        let tls = cairn_http::tls::server_config(&id).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let svc = VaultService::with_options(repo, opts);
        let token = "t0ken".to_string();
        let (addr, _) = rt
            .block_on(serve(
                svc.clone(),
                "127.0.0.1:0".parse().unwrap(),
                tls,
                token.clone(),
            ))
            .unwrap();
        Self {
            _rt: rt,
            svc,
            url: format!("https://{addr}"),
            trust: Trust::Fingerprint(fp),
            token,
            dir,
        }
    }

    fn with_lease(ms: u64) -> Self {
        Self::new(ServiceOptions {
            session_lease: Duration::from_millis(ms),
            ..Default::default()
        })
    }

    fn client(&self) -> Client {
        Client::new(&self.url, &self.token, &self.trust).unwrap()
    }

    fn remote(&self) -> RemoteVault {
        RemoteVault::connect(&self.url, &self.token, &self.trust).unwrap()
    }

    fn stats(&self) -> Value {
        self.client().get_json("/v1/stats").unwrap()
    }

    fn locks(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("repo/locks")).map_or(0, |d| d.count())
    }
}

fn data_frame(seed: u8, len: usize) -> Upload {
    let data: Vec<u8> = (0..len)
        .map(|i| u8::try_from(i % 256).unwrap().wrapping_mul(seed))
        .collect();
    Upload::single(
        fingerprint(&data),
        BlobKind::Data,
        u32::try_from(len).unwrap(),
        EncodedSegment::raw(&data),
    )
}

fn status(e: &ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => *status,
        e => panic!("no answer from the service: {e}"),
    }
}

#[test]
fn an_abandoned_session_expires_and_gc_then_runs() {
    let s = Served::with_lease(600);
    let c = s.client();
    // A client opens a session, uploads a frame, and vanishes without a word.
    let b: Value = c.post_json("/v1/sessions", &json!({})).unwrap();
    assert_eq!(b["lease_ms"], 600);
    let id = b["session"].as_str().unwrap().to_string();
    let _: Value = c
        .post_bytes(
            &format!("/v1/sessions/{id}/blobs"),
            &wire::encode_uploads(&[data_frame(3, 5000)]),
        )
        .unwrap();
    assert_eq!(s.locks(), 1);
    // GC runs beside it (it only condemns what such a session might use)...
    let remote = s.remote();
    let beside = remote
        .gc(&GcOptions::run())
        .expect("gc beside an open session");
    assert!(beside.executed && beside.deleted.is_empty(), "{beside:?}");
    // ...and the session's lock goes once its lease has run out.
    let t0 = Instant::now();
    while s.locks() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the session's lock is still held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let plan = remote.gc(&GcOptions::run()).unwrap();
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_millis(600 + 150 + 1000),
        "reaped within the lease and a reaper tick: {waited:?}"
    );
    let st = s.stats();
    assert_eq!(
        (
            st["open_sessions"].as_u64(),
            st["expired_sessions"].as_u64()
        ),
        (Some(0), Some(1)),
        "{st}"
    );
    assert_eq!(s.locks(), 0, "the session's lock is released");
    // Nothing of it became visible.
    assert!(plan.executed && plan.snapshots == 0, "{plan:?}");
    assert!(remote.list().unwrap().is_empty());
    // The session is gone for good, and a client still uploading to it hears why (its
    // body is drained beside the answer) rather than seeing its connection reset.
    let e = c
        .post_raw(&format!("/v1/sessions/{id}/lacking"), &[0u8; 32])
        .unwrap_err();
    assert_eq!(status(&e), 404, "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    let big: Vec<_> = (0..20).map(|i| data_frame(i, 400_000)).collect();
    let e = c
        .post_raw(
            &format!("/v1/sessions/{id}/blobs"),
            &wire::encode_uploads(&big),
        )
        .unwrap_err();
    assert_eq!(status(&e), 404, "{e}");
}

/// A source whose first read takes longer than the lease (a slow disk, a stopped VM).
struct SlowSource(Vec<u8>, Duration, std::sync::atomic::AtomicBool);

impl cairn_types::ReadAt for SlowSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if !self.2.swap(true, Ordering::Relaxed) {
            std::thread::sleep(self.1);
        }
        let o = usize::try_from(offset).map_or(self.0.len(), |o| o.min(self.0.len()));
        let n = buf.len().min(self.0.len() - o);
        buf[..n].copy_from_slice(&self.0[o..o + n]);
        Ok(n)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

#[test]
fn a_live_client_keeps_its_session_while_it_says_nothing() {
    let s = Served::with_lease(500);
    let img: Vec<u8> = (0..3 << 20).map(|i: u32| (i / 7 % 251) as u8).collect();
    let src = SlowSource(img.clone(), Duration::from_millis(2000), Default::default());
    let opts = crate::imager::BackupOptions {
        name: "slow".into(),
        ..Default::default()
    };
    let remote = s.remote();
    let m = crate::imager::backup(&remote, &src, &opts, &crate::imager::NoProgress).unwrap();
    assert_eq!(m.size, img.len() as u64);
    let st = s.stats();
    assert_eq!(st["expired_sessions"], 0, "{st}");
    assert_eq!(st["open_sessions"], 0, "{st}");
    let out = s.dir.path().join("out.img");
    crate::imager::restore(
        &remote,
        "slow",
        &out,
        &Default::default(),
        &crate::imager::NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(out).unwrap() == img);
}

/// A request body that trickles in: `pieces` writes, `pause` apart.
struct Trickle {
    body: Vec<u8>,
    at: usize,
    step: usize,
    pause: Duration,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.body.len() {
            return Ok(0);
        }
        if self.at > 0 {
            std::thread::sleep(self.pause);
        }
        let n = buf.len().min(self.step).min(self.body.len() - self.at);
        buf[..n].copy_from_slice(&self.body[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn ureq_agent(s: &Served) -> ureq::Agent {
    let Trust::Fingerprint(fp) = &s.trust else {
        unreachable!()
    };
    let cfg = cairn_http::tls::client_config_pinned(
        cairn_http::tls::parse_fingerprint(fp).unwrap(),
        None,
    )
    .unwrap();
    ureq::AgentBuilder::new().tls_config(Arc::new(cfg)).build()
}

#[test]
fn an_upload_longer_than_the_lease_keeps_its_session() {
    let s = Served::with_lease(400);
    let c = s.client();
    let b: Value = c.post_json("/v1/sessions", &json!({})).unwrap();
    let id = b["session"].as_str().unwrap().to_string();
    let body = wire::encode_uploads(&[data_frame(5, 40_000), data_frame(7, 40_000)]);
    // About 2 s for the whole body, in a chunked request (no length declared).
    let step = body.len() / 20 + 1;
    let r = ureq_agent(&s)
        .post(&format!("{}/v1/sessions/{id}/blobs", s.url))
        .set("Authorization", &format!("Bearer {}", s.token))
        .send(Trickle {
            body,
            at: 0,
            step,
            pause: Duration::from_millis(100),
        })
        .unwrap();
    let v: Value = r.into_json().unwrap();
    assert_eq!(v["stored"], 2, "{v}");
    assert_eq!(s.stats()["expired_sessions"], 0);
    // Still open: it answers.
    let l = c
        .post_raw(&format!("/v1/sessions/{id}/lacking"), &[0u8; 32])
        .unwrap();
    assert_eq!(l, [1]);
}

#[test]
fn bodies_are_bounded_and_refused_as_they_stream() {
    let s = Served::new(ServiceOptions {
        body_budget: 8 << 20,
        body_wait: Duration::from_millis(500),
        ..Default::default()
    });
    let c = s.client();
    let b: Value = c.post_json("/v1/sessions", &json!({})).unwrap();
    let id = b["session"].as_str().unwrap().to_string();
    // A declared length over a route's limit: 413 before anything is read.
    let e = c
        .post_raw(
            &format!("/v1/sessions/{id}/lacking"),
            &vec![0u8; wire::MAX_DIGEST_BODY + 32],
        )
        .unwrap_err();
    assert_eq!(status(&e), 413, "{e}");
    assert_eq!(e.kind(), Some(ErrorKind::TooLarge));
    let e = c
        .post_bytes::<Value>("/v1/gc", &vec![b' '; wire::MAX_JSON_BODY + 1])
        .unwrap_err();
    assert_eq!(status(&e), 413, "{e}");
    // 20 MB of garbage: refused on its first frame header, and the client hears why.
    let garbage: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 | 0x80)
        .collect();
    let e = c
        .post_raw(&format!("/v1/sessions/{id}/blobs"), &garbage)
        .unwrap_err();
    assert_eq!(status(&e), 400, "{e}");
    assert!(e.to_string().contains("blob kind"), "{e}");
    // A frame header that promises 16 MiB and then garbage: the frame is read within the
    // budget and refused when its digest does not match.
    let mut frame = Vec::new();
    frame.push(BlobKind::Data as u8);
    frame.push(cairn_chunk::Codec::Raw as u8);
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.extend_from_slice(&(16u32 << 20).to_le_bytes());
    frame.extend_from_slice(&[9u8; 32]);
    frame.extend_from_slice(&(16u32 << 20).to_le_bytes());
    frame.resize(frame.len() + (16 << 20), 0x5a);
    let e = c
        .post_raw(&format!("/v1/sessions/{id}/blobs"), &frame)
        .unwrap_err();
    assert_eq!(status(&e), 400, "{e}");
    // A frame cut short.
    let e = c
        .post_raw(&format!("/v1/sessions/{id}/blobs"), &frame[..1000])
        .unwrap_err();
    assert_eq!(status(&e), 400, "{e}");
    assert!(e.to_string().contains("truncated frame"), "{e}");
    // Nothing stays reserved, and the session still works.
    assert_eq!(s.svc.budget.available(), 8 << 20);
    let v: Value = c
        .post_bytes(
            &format!("/v1/sessions/{id}/blobs"),
            &wire::encode_uploads(&[data_frame(11, 1000)]),
        )
        .unwrap();
    assert_eq!(v["stored"], 1, "{v}");
}

#[test]
fn an_upload_whose_sender_goes_silent_does_not_hold_its_session() {
    // A peer whose network was cut mid-upload: its connection stays open, no data comes.
    let s = Served::new(ServiceOptions {
        session_lease: Duration::from_millis(300),
        body_idle: Duration::from_millis(500),
        ..Default::default()
    });
    let c = s.client();
    let b: Value = c.post_json("/v1/sessions", &json!({})).unwrap();
    let id = b["session"].as_str().unwrap().to_string();
    let Trust::Fingerprint(fp) = &s.trust else {
        unreachable!()
    };
    let cfg = cairn_http::tls::client_config_pinned(
        cairn_http::tls::parse_fingerprint(fp).unwrap(),
        None,
    )
    .unwrap();
    let addr = s.url.trim_start_matches("https://");
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let frame = wire::encode_uploads(&[data_frame(13, 100_000)]);
    write!(
        tls,
        "POST /v1/sessions/{id}/blobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        s.token,
        frame.len()
    )
    .unwrap();
    tls.write_all(&frame[..5000]).unwrap();
    tls.flush().unwrap();
    // The request is dropped after the idle timeout, and the session expires after it.
    let t0 = Instant::now();
    while s.locks() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the session's lock is still held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(s.stats()["expired_sessions"], 1);
    // The silent peer got its answer.
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("stalled"), "{answer}");
    drop(tls);
}

/// `fetch-near` through the service: the optional digests packed in a frame a required one
/// is in come back verified, the others do not, and a reader offering its recipe neighbours
/// then reads them from its cache.
#[test]
fn fetch_near_returns_the_rest_of_the_frames_it_sends() {
    let s = Served::new(ServiceOptions::default());
    // 2 MiB of compressible text: segments of ~8 KiB packed into 256 KiB frames.
    let words = [
        "cairn ", "vault ", "frame ", "segment ", "backup ", "restore ",
    ];
    let mut text = Vec::new();
    let mut x = 7u64;
    while text.len() < 2 << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.extend_from_slice(words[(x >> 33) as usize % words.len()].as_bytes());
        text.extend_from_slice(format!("{} ", x >> 50).as_bytes());
    }
    text.truncate(2 << 20);
    let img = s.dir.path().join("img");
    std::fs::write(&img, &text).unwrap();
    let local = crate::api::LocalVault {
        repo: s.svc.repo.clone(),
    };
    let opts = crate::imager::BackupOptions {
        name: "near".into(),
        ..Default::default()
    };
    let f = std::fs::File::open(&img).unwrap();
    let m = crate::imager::backup(&local, &f, &opts, &crate::imager::NoProgress).unwrap();
    let remote = Arc::new(s.remote());
    let entries = remote.entries(&m).unwrap();
    assert!(entries.len() > 100, "{} segments", entries.len());
    let d = |i: usize| entries[i].digest;
    let last = entries.len() - 1;
    let (req, opt) = remote.fetch_near(&[d(0)], &[d(1), d(2), d(last)]).unwrap();
    let plain = |i: usize| {
        let start: usize = entries[..i].iter().map(|e| e.len as usize).sum();
        text[start..start + entries[i].len as usize].to_vec()
    };
    assert_eq!(req, vec![plain(0)]);
    // Entries 1 and 2 share entry 0's frame; the last one, 2 MiB on, does not.
    let got: Vec<usize> = opt.iter().map(|o| o.0).collect();
    assert_eq!(got, [0, 1], "{got:?}");
    assert_eq!(opt[0].1, plain(1));
    assert_eq!(opt[1].1, plain(2));
    // An unknown optional digest is skipped; an unknown required one is an error.
    let (_, opt) = remote.fetch_near(&[d(0)], &[Digest([9; 32])]).unwrap();
    assert!(opt.is_empty());
    assert!(remote.fetch_near(&[Digest([9; 32])], &[d(0)]).is_err());

    // A reader offering 8 neighbours: one small read brings them into its cache.
    let reader = crate::reader::SnapshotReader::over(remote, &m)
        .unwrap()
        .with_neighbours(8);
    assert_eq!(reader.read_range(0, 100).unwrap(), &text[..100]);
    let after_first = reader.stats();
    assert!(after_first.segments > 1, "{after_first:?}");
    let second = entries[0].len as usize;
    assert_eq!(
        reader.read_range(second as u64, 100).unwrap(),
        &text[second..second + 100]
    );
    assert_eq!(
        reader.stats(),
        after_first,
        "the neighbour came from the cache"
    );
}
