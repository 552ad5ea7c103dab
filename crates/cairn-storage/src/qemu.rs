//! `qemu-img` and `qemu-nbd`: the image formats are QEMU's, so the agent asks QEMU's tools.
//!
//! - [`img_info`], [`img_map`], [`img_snapshot`], [`img_bitmap`], [`img_create`] run
//!   `qemu-img` and parse its JSON.
//! - [`NbdImage`] starts `qemu-nbd` on a private unix socket and talks NBD to it with
//!   `cairn-nbd`: reads (the guest view of any format, an internal snapshot, or a backing
//!   chain), writes (restores into qcow2 stay sparse), and dirty-bitmap block status.
//!
//! `cairn-nbd` is async; an [`NbdImage`] drives it with `Handle::block_on` on one of the
//! runtimes of an [`NbdRuntime`], so the rest of the agent stays blocking code. The library
//! never builds those runtimes: the binary does ([`NbdRuntime::builder`]: multi-thread, one
//! worker, which runs the connection's reply reader; one per disk read at once) and hands
//! them to the [`StorageAgent`](crate::StorageAgent). Every `NbdImage` method blocks, so it is called
//! from plain threads or the blocking pool (the service uses `spawn_blocking`), never from
//! an async task. The `qemu-nbd` process is ours alone: it is killed by pid and reaped
//! when the `NbdImage` is dropped, and its socket directory is removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_types::{Extent, ExtentList, ReadAt};

use crate::error::{Result, StorageError};

pub use cairn_types::DiskFormat;

/// Runs a tool and returns its stdout, or a [`StorageError::Tool`] with its stderr.
pub(crate) fn run(tool: &'static str, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| StorageError::Tool {
            tool,
            args: args.join(" "),
            message: format!("cannot run: {e}"),
        })?;
    if !out.status.success() {
        return Err(StorageError::Tool {
            tool,
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| StorageError::Invalid(format!("path {} is not UTF-8", p.display())))
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Parse {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// A persistent dirty bitmap of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub granularity: u64,
}

impl BitmapInfo {
    /// `in-use` on an image nobody has open means QEMU died with it loaded: the bitmap
    /// missed writes and can only be removed.
    pub fn is_consistent(&self) -> bool {
        !self.flags.iter().any(|f| f == "in-use")
    }
}

/// An internal qcow2 snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InternalSnapshot {
    pub id: String,
    pub name: String,
    #[serde(rename = "date-sec", default)]
    pub date_sec: u64,
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub format: DiskFormat,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub backing_file: Option<String>,
    pub bitmaps: Vec<BitmapInfo>,
    pub snapshots: Vec<InternalSnapshot>,
}

#[derive(serde::Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing: Option<String>,
    #[serde(rename = "format-specific", default)]
    specific: Option<RawSpecific>,
    #[serde(default)]
    snapshots: Vec<InternalSnapshot>,
}

#[derive(serde::Deserialize)]
struct RawSpecific {
    #[serde(default)]
    data: RawSpecificData,
}

#[derive(serde::Deserialize, Default)]
struct RawSpecificData {
    #[serde(default)]
    bitmaps: Vec<BitmapInfo>,
}

/// `qemu-img info -U --output=json PATH` (probing the format).
pub fn img_info(path: &Path) -> Result<ImageInfo> {
    let out = run(
        "qemu-img",
        &["info", "-U", "--output=json", path_str(path)?],
    )?;
    let r: RawInfo = parse_json(&format!("qemu-img info of {}", path.display()), &out)?;
    Ok(ImageInfo {
        format: r.format.parse().map_err(|e: cairn_types::UnknownFormat| {
            StorageError::Unsupported {
                provider: "qemu-img",
                message: e.to_string(),
            }
        })?,
        virtual_size: r.virtual_size,
        actual_size: r.actual_size,
        backing_file: r.backing,
        bitmaps: r.specific.map(|s| s.data.bitmaps).unwrap_or_default(),
        snapshots: r.snapshots,
    })
}

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub data: bool,
    pub zero: bool,
}

/// `qemu-img map --output=json` of an image (format given, never probed).
pub fn img_map(path: &Path, format: DiskFormat) -> Result<Vec<MapEntry>> {
    let out = run(
        "qemu-img",
        &[
            "map",
            "-U",
            "--output=json",
            "-f",
            format.as_str(),
            path_str(path)?,
        ],
    )?;
    parse_json(&format!("qemu-img map of {}", path.display()), &out)
}

/// The extents an overlay holds itself (depth 0): exactly what was written since it was made.
pub fn overlay_extents(overlay: &Path) -> Result<ExtentList> {
    let map = img_map(overlay, DiskFormat::Qcow2)?;
    Ok(ExtentList::from_unsorted(
        map.iter()
            .filter(|e| e.depth == 0 && (e.data || e.zero))
            .map(|e| Extent::new(e.start, e.length))
            .collect(),
    ))
}

/// `qemu-img snapshot -c|-d NAME`.
pub fn img_snapshot(path: &Path, op: SnapshotOp, name: &str) -> Result<()> {
    let flag = match op {
        SnapshotOp::Create => "-c",
        SnapshotOp::Delete => "-d",
    };
    run(
        "qemu-img",
        &["snapshot", "-f", "qcow2", flag, name, path_str(path)?],
    )
    .map(|_| ())
}

/// Internal snapshot operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    Create,
    Delete,
}

/// `qemu-img bitmap --add|--remove|--clear|--enable|--disable IMG NAME`.
pub fn img_bitmap(path: &Path, op: &str, name: &str) -> Result<()> {
    let op = match op {
        "add" | "remove" | "clear" | "enable" | "disable" => format!("--{op}"),
        other => return Err(StorageError::Invalid(format!("bitmap operation {other:?}"))),
    };
    run(
        "qemu-img",
        &["bitmap", &op, "-f", "qcow2", path_str(path)?, name],
    )
    .map(|_| ())
}

/// `qemu-img create -f FORMAT PATH SIZE`.
pub fn img_create(path: &Path, format: DiskFormat, size: u64) -> Result<()> {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format.as_str(),
            path_str(path)?,
            &size.to_string(),
        ],
    )
    .map(|_| ())
}

/// How to open an [`NbdImage`].
#[derive(Clone, Debug, Default)]
pub struct NbdOpen {
    pub writable: bool,
    /// An internal qcow2 snapshot to export (read-only).
    pub snapshot: Option<String>,
    /// A persistent dirty bitmap to export as `qemu:dirty-bitmap:NAME`.
    pub bitmap: Option<String>,
}

/// The tokio runtimes that drive NBD connections, as handles: the binary builds and owns
/// them (only binaries start runtimes), the agent carries this.
///
/// Each must be a multi-thread runtime with I/O and time enabled: an [`NbdImage`] calls
/// `Handle::block_on` from its caller's thread, and only a worker of a multi-thread runtime
/// drives the socket meanwhile (on a `current_thread` runtime nothing would, and the call
/// would hang). They are dedicated to NBD, apart from the service's runtime.
///
/// A connection runs on the runtime with the fewest open connections, so a binary that
/// builds one runtime per disk read at once (the agent's `--parallel`) gives every disk
/// its own worker and I/O driver, as a runtime per connection would: measured with
/// `examples/nbd_image_bench.rs`, two images sharing one runtime read ~10% slower.
#[derive(Clone, Debug)]
pub struct NbdRuntime(std::sync::Arc<[NbdWorker]>);

#[derive(Debug)]
struct NbdWorker {
    handle: tokio::runtime::Handle,
    /// Connections open on this runtime.
    open: std::sync::atomic::AtomicUsize,
}

impl NbdRuntime {
    /// One runtime as a binary builds it for NBD: multi-thread with one worker (`cairn-nbd`
    /// threads). Measured (`cairn-nbd`'s `nbd_read_bench --runtime`): a `current_thread`
    /// runtime reads ~35% slower, since its one thread cannot send requests while it drains
    /// replies.
    pub fn builder() -> tokio::runtime::Builder {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).thread_name("cairn-nbd").enable_all();
        b
    }

    /// Wraps the handles of runtimes built by the caller; none, or a `current_thread`
    /// runtime, is refused (see the type's docs).
    pub fn new(handles: impl IntoIterator<Item = tokio::runtime::Handle>) -> Result<Self> {
        let workers: Vec<NbdWorker> = handles
            .into_iter()
            .map(|handle| NbdWorker {
                handle,
                open: Default::default(),
            })
            .collect();
        if workers.is_empty() {
            return Err(StorageError::Invalid("no NBD runtime given".into()));
        }
        if workers
            .iter()
            .any(|w| w.handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        {
            return Err(StorageError::Invalid(
                "NBD needs multi-thread tokio runtimes (a current_thread one would hang)".into(),
            ));
        }
        Ok(Self(workers.into()))
    }

    /// The least busy runtime, counted busier until the lease is dropped.
    fn lease(&self) -> NbdLease {
        use std::sync::atomic::Ordering;
        let i = (0..self.0.len())
            .min_by_key(|&i| self.0[i].open.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.0[i].open.fetch_add(1, Ordering::Relaxed);
        NbdLease {
            rt: self.clone(),
            i,
        }
    }
}

/// One connection's share of an [`NbdRuntime`].
struct NbdLease {
    rt: NbdRuntime,
    i: usize,
}

impl NbdLease {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.0[self.i].handle.block_on(f)
    }
}

impl Drop for NbdLease {
    fn drop(&mut self) {
        self.rt.0[self.i]
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A disk image exported by a private `qemu-nbd`.
pub struct NbdImage {
    path: PathBuf,
    /// Our own `qemu-nbd` and its socket directory; `None` for someone else's export.
    child: Option<(Child, PathBuf)>,
    rt: NbdLease,
    client: cairn_nbd::Client,
    /// The meta context holding the dirty bitmap (`qemu:dirty-bitmap:NAME`).
    bitmap_context: Option<String>,
}

impl std::fmt::Debug for NbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdImage")
            .field("path", &self.path)
            .finish()
    }
}

impl NbdImage {
    /// Starts `qemu-nbd` for `path` and connects to it, on `rt`.
    pub fn open(rt: &NbdRuntime, path: &Path, format: DiskFormat, opts: &NbdOpen) -> Result<Self> {
        fn is_refused(e: &cairn_nbd::Error) -> bool {
            matches!(e, cairn_nbd::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused)
        }
        let sock_dir = std::env::temp_dir().join(format!(
            "cairn-nbd-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(&sock_dir).map_err(StorageError::io(&sock_dir, "create"))?;
        let sock = sock_dir.join("nbd.sock");
        let mut args: Vec<String> = vec![
            "-k".into(),
            path_str(&sock)?.into(),
            "-f".into(),
            format.as_str().into(),
        ];
        if !opts.writable {
            args.push("-r".into());
        }
        if let Some(s) = &opts.snapshot {
            args.push("-l".into());
            args.push(format!("snapshot.name={s}"));
        }
        if let Some(b) = &opts.bitmap {
            args.push("-B".into());
            args.push(b.clone());
        }
        args.push(path_str(path)?.into());
        let tool_err = |message: String| StorageError::Tool {
            tool: "qemu-nbd",
            args: args.join(" "),
            message,
        };
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| tool_err(format!("cannot run: {e}")))?;
        let cleanup = |child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&sock_dir);
        };
        // Wait for the socket (or for qemu-nbd to fail).
        let deadline = Instant::now() + Duration::from_secs(15);
        while !sock.exists() {
            if let Ok(Some(_)) = child.try_wait() {
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut msg);
                }
                let _ = std::fs::remove_dir_all(&sock_dir);
                return Err(tool_err(msg.trim().to_string()));
            }
            if Instant::now() > deadline {
                cleanup(&mut child);
                return Err(tool_err("socket did not appear within 15 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let rt = rt.lease();
        let mut copts = cairn_nbd::ConnectOptions::default();
        if let Some(b) = &opts.bitmap {
            copts = copts.with_dirty_bitmap(b);
        }
        // The socket file appears at bind(), slightly before qemu-nbd listens: a connection
        // refused in that gap is retried (bounded), anything else is an error.
        let deadline = Instant::now() + Duration::from_secs(15);
        let connected = loop {
            match rt.block_on(cairn_nbd::Client::connect_unix(&sock, "", copts.clone())) {
                Err(e) if is_refused(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                r => break r,
            }
        };
        let client = match connected {
            Ok(c) => c,
            Err(source) => {
                cleanup(&mut child);
                return Err(StorageError::Nbd {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            child: Some((child, sock_dir)),
            rt,
            client,
            bitmap_context: opts
                .bitmap
                .as_ref()
                .map(|b| format!("qemu:dirty-bitmap:{b}")),
        })
    }

    /// Connects to an export someone else serves (a host agent's fleecing export) on a
    /// unix socket, asking for the meta context `bitmap_context` when given.
    pub fn connect(
        rt: &NbdRuntime,
        socket: &Path,
        export: &str,
        bitmap_context: Option<&str>,
    ) -> Result<Self> {
        let rt = rt.lease();
        let mut copts = cairn_nbd::ConnectOptions::default();
        if let Some(c) = bitmap_context {
            copts = copts.with_context(c);
        }
        let client = rt
            .block_on(cairn_nbd::Client::connect_unix(socket, export, copts))
            .map_err(|source| StorageError::Nbd {
                path: socket.to_path_buf(),
                source: Box::new(source),
            })?;
        Ok(Self {
            path: socket.join(export),
            child: None,
            rt,
            client,
            bitmap_context: bitmap_context.map(str::to_string),
        })
    }

    fn nbd(&self) -> impl Fn(cairn_nbd::Error) -> StorageError + '_ {
        |source| StorageError::Nbd {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    /// Virtual size of the export.
    pub fn size(&self) -> u64 {
        self.client.size()
    }

    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let b = self
            .rt
            .block_on(self.client.read_at(offset, len))
            .map_err(self.nbd())?;
        Ok(b.to_vec())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.rt
            .block_on(self.client.write_at(offset, data, false))
            .map_err(self.nbd())
    }

    /// Makes `[offset, offset+len)` read as zeros, leaving a hole where the format can.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.rt
            .block_on(self.client.write_zeroes(offset, len, false))
            .map_err(self.nbd())
    }

    pub fn flush(&self) -> Result<()> {
        self.rt.block_on(self.client.flush()).map_err(self.nbd())
    }

    /// The dirty extents of the exported bitmap.
    pub fn dirty_extents(&self) -> Result<ExtentList> {
        let ctx = self
            .bitmap_context
            .clone()
            .ok_or_else(|| StorageError::Invalid("no bitmap exported".into()))?;
        let size = self.size();
        if size == 0 {
            return Ok(ExtentList::default());
        }
        let map = self
            .rt
            .block_on(self.client.map(&ctx, 0, size))
            .map_err(self.nbd())?;
        Ok(ExtentList::from_unsorted(
            map.iter()
                .filter(|e| e.flags & 1 != 0)
                .map(|e| Extent::new(e.offset, e.len))
                .collect(),
        ))
    }
}

impl Drop for NbdImage {
    fn drop(&mut self) {
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), self.client.disconnect()).await
        });
        // qemu-nbd exits after its only client leaves; make sure, by our own child's pid.
        let Some((child, sock_dir)) = &mut self.child else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(sock_dir);
    }
}

impl ReadAt for NbdImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        let data = self.read(offset, n).map_err(std::io::Error::other)?;
        buf[..n].copy_from_slice(&data);
        Ok(n)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(NbdImage::size(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_runtime_refuses_none_and_current_thread_and_balances_leases() {
        assert!(NbdRuntime::new([]).is_err());
        let ct = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(NbdRuntime::new([ct.handle().clone()]).is_err());
        let rts: Vec<_> = (0..2)
            .map(|_| NbdRuntime::builder().build().unwrap())
            .collect();
        let nbd = NbdRuntime::new(rts.iter().map(|r| r.handle().clone())).unwrap();
        let (a, b) = (nbd.lease(), nbd.lease());
        assert_ne!(a.i, b.i, "two connections, two runtimes");
        drop(a);
        let c = nbd.lease();
        assert_ne!(c.i, b.i, "the freed runtime is used again");
        assert_eq!(c.block_on(async { 7 }), 7);
    }
}
