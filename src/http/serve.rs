//! Serving a router: an accept loop over hyper's HTTP/1 connections, because `axum::serve`
//! sets no timer, so a client that sends part of its request head and then nothing holds its
//! connection (and a graceful shutdown) for as long as it likes. Here the head must arrive
//! within `http.header_read_timeout_ms`, and a shutdown waits for open connections at most
//! `http.request_timeout_ms` (every request is answered by then, but a CSV download's stream),
//! then drops them.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, ToSocketAddrs, lookup_host};
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

/// How long a client may take over its request head, and a shutdown over open connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_read: Duration,
    pub drain: Duration,
}

impl ServeLimits {
    pub fn of(http: &HttpConfig) -> Self {
        Self {
            header_read: Duration::from_millis(http.header_read_timeout_ms),
            drain: Duration::from_millis(http.request_timeout_ms),
        }
    }
}

/// Bytes a connection's socket may hold unsent before it stops taking more (Linux'
/// `TCP_NOTSENT_LOWAT`; bytes in flight are not counted, so a fast reader far away is not held
/// back). Without it a socket takes megabytes ahead and, once full, takes more only after half
/// of them have drained. With this and [`WRITE_BUFFER`], a streamed body is asked for its next
/// chunk as its reader reads: a CSV download read steadily at 25 KB/s was given no room for
/// over 30 s and cut off as stalled (`http.download_stall_timeout_ms`); at most about 200 KiB
/// now wait between the stream and the socket.
const UNSENT_AT_MOST: u32 = 128 * 1024;

/// hyper's buffer per connection (its default is about 400 KiB): an answer larger than this
/// (a CSV, a long page) goes out in several writes, and a request head larger than this is
/// refused 431 (64 KiB of headers, where common servers allow 8 to 32).
const WRITE_BUFFER: usize = 64 * 1024;

fn unsent_at_most(stream: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_AT_MOST) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then lets in-flight requests finish
/// (within `limits.drain`). Logs `said.0`, the address and `said.1` (the path) as it starts.
pub(super) async fn serve_router(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    said: (&str, &str),
    limits: ServeLimits,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let (what, path) = said;
    tracing::info!(%addr, "{what} http://{addr}{path}");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(WRITE_BUFFER);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    pause_after(&e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        unsent_at_most(&stream);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {} ms after the shutdown began; closing them",
            limits.drain.as_millis()
        );
    }
    Ok(())
}

/// Binds the first of `addr`'s addresses that binds, as `TcpListener::bind` does, but asking
/// the kernel for a listen backlog of `backlog` (std's bind asks for 128, so a burst of
/// connections overflows it and waits out SYN retransmits).
pub async fn listen(addr: impl ToSocketAddrs, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in lookup_host(addr).await? {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // As std's bind: a restarted server rebinds a port whose old connections linger.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// After a failed accept: a connection given up by its client is nothing; anything else (out
/// of file descriptors, say) is logged and waited out for a second, as it will fail again at
/// once.
async fn pause_after(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        tracing::error!(error = %e, "cannot accept a connection");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
