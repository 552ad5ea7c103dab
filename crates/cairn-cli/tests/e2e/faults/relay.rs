//! A TCP relay the fault matrix puts between two roles, to cut their link at will.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A TCP relay the test controls: forwards to `target` until `cut` is set, which closes every
/// connection it carries and refuses new ones until cleared.
pub struct Relay {
    pub addr: String,
    pub cut: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (target, c) = (target.to_string(), cut.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the peer sees a reset
                }
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    let c = c.clone();
                    from.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        // A peer that died (reset) or a cut link closes both sides, as a
                        // router would: the other side must not wait for ever.
                        let close = |from: &TcpStream, to: &TcpStream| {
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        };
                        loop {
                            if c.load(Ordering::SeqCst) {
                                close(&from, &to);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        close(&from, &to);
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => {
                                    close(&from, &to);
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        });
        Self { addr, cut }
    }
}
