//! A TCP proxy in front of Postgres that cuts one connection at a chosen message: the way a
//! network drops a connection at the worst moment, for the tests of ambiguous commits.
//!
//! Each client connection is piped to the server. A connection is armed once its client has
//! sent `arm` (e.g. a statement only the step under test runs); on that connection the next
//! client chunk after it containing `cut_at` (e.g. `COMMIT`) ends it, either after forwarding
//! the chunk (the server commits, the reply is lost) or before (nothing reaches the server).
//! Only the first `cuts` such moments are cut.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether the message at which the connection is cut reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Forwarded, then the connection closes: the server acts on it, the client never hears.
    AfterForwarding,
    /// The connection closes instead: the server never sees it.
    BeforeForwarding,
}

pub struct CutProxy {
    pub addr: SocketAddr,
    left: Arc<AtomicUsize>,
}

struct Rule {
    upstream: SocketAddr,
    arm: &'static [u8],
    cut_at: &'static [u8],
    cut: Cut,
    left: Arc<AtomicUsize>,
}

impl CutProxy {
    pub async fn start(
        upstream: SocketAddr,
        arm: &'static [u8],
        cut_at: &'static [u8],
        cut: Cut,
        cuts: usize,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let left = Arc::new(AtomicUsize::new(cuts));
        let rule = Arc::new(Rule {
            upstream,
            arm,
            cut_at,
            cut,
            left: left.clone(),
        });
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pipe(client, rule.clone()));
            }
        });
        Self { addr, left }
    }

    /// How many cuts have happened.
    pub fn cuts_made(&self, asked: usize) -> usize {
        asked - self.left.load(Ordering::SeqCst)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn pipe(mut client: TcpStream, rule: Arc<Rule>) {
    // A client that would encrypt is told no (as by a server without TLS), so that what it
    // sends next, in the clear, can be watched for the patterns.
    let mut opening = [0u8; 8];
    if client.read_exact(&mut opening).await.is_err() {
        return;
    }
    while super::proxy::asks_for_encryption(&opening) {
        if client.write_all(b"N").await.is_err() || client.read_exact(&mut opening).await.is_err() {
            return;
        }
    }
    let Ok(mut server) = TcpStream::connect(rule.upstream).await else {
        return;
    };
    if server.write_all(&opening).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    // The end of the previous client chunk, so a pattern split across two reads is still seen.
    let mut tail: Vec<u8> = Vec::new();
    let mut armed = false;
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => {
                let Ok(n) = read else { return };
                if n == 0 {
                    return;
                }
                let mut seen = std::mem::take(&mut tail);
                seen.extend_from_slice(&up[..n]);
                // The chunk that arms is not cut: a prepared statement's text (the arm) comes
                // in its own round trip, before the chunk that executes it.
                let cut = armed
                    && contains(&seen, rule.cut_at)
                    && rule
                        .left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                        .is_ok();
                armed = armed || contains(&seen, rule.arm);
                let keep = seen.len().min(rule.arm.len().max(rule.cut_at.len()));
                tail = seen[seen.len() - keep..].to_vec();
                if cut {
                    if rule.cut == Cut::AfterForwarding {
                        let _ = to_server.write_all(&up[..n]).await;
                        let _ = to_server.flush().await;
                        // Let the server read it before the connection goes.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    return;
                }
                if to_server.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = from_server.read(&mut down) => {
                let Ok(n) = read else { return };
                if n == 0 || to_client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
