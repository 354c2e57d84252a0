//! A TCP proxy in front of Postgres that breaks connections the way networks and failovers do,
//! for the tests of what the API answers then: it cuts connections at once (mid-statement or
//! mid-transaction), and at a `COMMIT` it can cut before forwarding it (the transaction aborts),
//! or forward it and swallow the server's reply (the transaction commits, the client never
//! hears), optionally refusing every connection afterwards until told otherwise.
//!
//! It reads the client's side of the protocol just enough to spot `COMMIT` (a simple-query
//! `Q` message, which is how sqlx commits); the server's side is copied untouched.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What to do to one `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFault {
    /// Cut the connection instead of forwarding it: the transaction aborts.
    CutBefore,
    /// Forward it, swallow the reply, cut: the transaction commits, the client never hears.
    LoseReply,
    /// As `LoseReply`, then refuse and cut every connection until [`Proxy::restore`].
    LoseReplyThenBlackout,
    /// A network partition that no socket notices: the COMMIT reaches the server if
    /// `commit_arrives`, and from then on nothing passes either way while the connection stays
    /// open (until the proxy is dropped).
    Partition { commit_arrives: bool },
}

/// A running proxy; stops accepting when dropped (live connections end with their sockets).
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut_all();
    }
}

#[derive(Default)]
struct Shared {
    upstream: String,
    /// Where the first connection goes instead of `upstream`, if set.
    first_upstream: Option<String>,
    /// How long every connection but the first waits before it reaches its server.
    later_delay: Mutex<Duration>,
    /// How long the connections of a given `application_name` wait instead.
    delay_of_application: Mutex<HashMap<String, Duration>>,
    next_id: AtomicU64,
    /// Live connections, to cut one or all.
    live: Mutex<HashMap<u64, CancellationToken>>,
    /// Faults for the next `COMMIT`s, in order, before the random ones.
    planned: Mutex<VecDeque<CommitFault>>,
    /// Per mille of `COMMIT`s whose reply is lost, when nothing is planned.
    lose_reply_per_mille: AtomicU32,
    /// Per mille of `COMMIT`s cut before they reach the server, when nothing is planned.
    cut_before_per_mille: AtomicU32,
    refusing: AtomicBool,
    cuts: AtomicU64,
    lost_replies: AtomicU64,
    cut_commits: AtomicU64,
}

impl Shared {
    fn cut_all(&self) {
        for token in self.live.lock().unwrap().values() {
            token.cancel();
        }
    }

    fn next_fault(&self) -> Option<CommitFault> {
        if let Some(planned) = self.planned.lock().unwrap().pop_front() {
            return Some(planned);
        }
        let roll = rand::random::<u32>() % 1000;
        let lose = self.lose_reply_per_mille.load(Ordering::Relaxed);
        let cut = self.cut_before_per_mille.load(Ordering::Relaxed);
        if roll < lose {
            Some(CommitFault::LoseReply)
        } else if roll < lose + cut {
            Some(CommitFault::CutBefore)
        } else {
            None
        }
    }
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        Self::start_split(None, upstream).await
    }

    /// As [`Proxy::start`], but the first connection goes to `first` (two servers behind one
    /// address, as a load balancer puts them).
    pub async fn start_split(first: Option<&str>, upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            first_upstream: first.map(str::to_owned),
            ..Shared::default()
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            port,
            shared,
            accept,
        }
    }

    /// A URL for database `name` through the proxy.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Applies `fault` to the next `COMMIT` that passes (after those planned before).
    pub fn plan(&self, fault: CommitFault) {
        self.shared.planned.lock().unwrap().push_back(fault);
    }

    /// From now on, loses the reply of `lose_reply` and cuts `cut_before` per mille of commits.
    pub fn commit_faults(&self, lose_reply: u32, cut_before: u32) {
        let s = &self.shared;
        s.lose_reply_per_mille.store(lose_reply, Ordering::Relaxed);
        s.cut_before_per_mille.store(cut_before, Ordering::Relaxed);
    }

    /// Cuts one live connection chosen at random; whether there was one.
    pub fn cut_random(&self) -> bool {
        let live = self.shared.live.lock().unwrap();
        if live.is_empty() {
            return false;
        }
        let pick = rand::random::<u32>() as usize % live.len();
        live.values().nth(pick).expect("picked").cancel();
        self.shared.cuts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// From now on, every connection but the first waits `delay` before it reaches its server
    /// (a slow network for new connections).
    pub fn delay_later_connections(&self, delay: Duration) {
        *self.shared.later_delay.lock().unwrap() = delay;
    }

    /// From now on, the connections whose startup names `application` (one of a worker's
    /// pools) wait `delay` before they reach the server, whatever the other connections do.
    pub fn delay_application(&self, application: &str, delay: Duration) {
        let mut delays = self.shared.delay_of_application.lock().unwrap();
        delays.insert(application.to_owned(), delay);
    }

    /// Cuts every live connection and refuses new ones until [`Proxy::restore`]: the server
    /// gone, as far as its clients can tell.
    pub fn blackout(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.cut_all();
    }

    /// Ends a blackout: connections are accepted again.
    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// (connections cut at random, commit replies lost, commits cut before the server).
    pub fn faults(&self) -> (u64, u64, u64) {
        let s = &self.shared;
        (
            s.cuts.load(Ordering::Relaxed),
            s.lost_replies.load(Ordering::Relaxed),
            s.cut_commits.load(Ordering::Relaxed),
        )
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        tokio::spawn(relay(client, shared.clone()));
    }
}

/// One client connection: two pumps until either side ends or the connection is cut.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let upstream = match &shared.first_upstream {
        Some(first) if id == 0 => first,
        _ => &shared.upstream,
    };
    let _ = client.set_nodelay(true);
    // The client speaks first: its startup message says which application it is.
    let (mut client_read, mut client_write) = client.into_split();
    let Ok(mut opening) = read_untyped(&mut client_read).await else {
        return;
    };
    // A client that would encrypt (libpq's and sqlx's `sslmode=prefer`) is told no, as a server
    // without TLS tells it, and sends its startup in the clear, where this proxy can read it.
    while asks_for_encryption(&opening) {
        if client_write.write_all(b"N").await.is_err() {
            return;
        }
        let Ok(next) = read_untyped(&mut client_read).await else {
            return;
        };
        opening = next;
    }
    let named = startup_parameter(&opening, "application_name").and_then(|name| {
        shared
            .delay_of_application
            .lock()
            .unwrap()
            .get(&name)
            .copied()
    });
    let delay = match named {
        Some(delay) => delay,
        None if id > 0 => *shared.later_delay.lock().unwrap(),
        None => Duration::ZERO,
    };
    tokio::time::sleep(delay).await;
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    if server.write_all(&opening).await.is_err() {
        return;
    }
    let cut = CancellationToken::new();
    shared.live.lock().unwrap().insert(id, cut.clone());
    let link = Link {
        shared: &shared,
        cut: &cut,
        swallow: AtomicU8::new(PASS),
    };
    let (server_read, server_write) = server.into_split();
    let upstream = link.client_to_server(client_read, server_write, is_startup(&opening));
    let downstream = link.server_to_client(server_read, client_write);
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = upstream => {}
        _ = downstream => {}
    }
    shared.live.lock().unwrap().remove(&id);
    // Both sockets drop here: the client and the server each see the connection end.
}

/// What the two pumps of one connection share.
struct Link<'a> {
    shared: &'a Shared,
    /// Cancelled to cut the connection (both sockets drop).
    cut: &'a CancellationToken,
    /// What the server-to-client pump does with the server's next bytes (see [`PASS`]).
    swallow: AtomicU8,
}

impl Link<'_> {
    /// Client to server, frame by frame, planting the planned fault at each COMMIT; `started`
    /// once the startup message has passed.
    async fn client_to_server(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        mut started: bool,
    ) -> std::io::Result<()> {
        loop {
            let frame = if started {
                read_typed(&mut from).await?
            } else {
                let frame = read_untyped(&mut from).await?;
                started = is_startup(&frame);
                frame
            };
            if started && frame[0] == b'Q' && is_commit(&frame[5..]) {
                match self.shared.next_fault() {
                    None => {}
                    Some(CommitFault::CutBefore) => {
                        self.shared.cut_commits.fetch_add(1, Ordering::Relaxed);
                        self.cut.cancel();
                        return Ok(());
                    }
                    Some(CommitFault::Partition { commit_arrives }) => {
                        self.swallow.store(PARTITION, Ordering::SeqCst);
                        if commit_arrives {
                            to.write_all(&frame).await?;
                        }
                        // The client's later bytes are never read, let alone forwarded.
                        std::future::pending::<()>().await;
                    }
                    Some(fault) => {
                        self.shared.lost_replies.fetch_add(1, Ordering::Relaxed);
                        if fault == CommitFault::LoseReplyThenBlackout {
                            self.shared.refusing.store(true, Ordering::SeqCst);
                            self.swallow.store(SWALLOW_THEN_BLACKOUT, Ordering::SeqCst);
                        } else {
                            self.swallow.store(SWALLOW, Ordering::SeqCst);
                        }
                    }
                }
            }
            to.write_all(&frame).await?;
        }
    }

    /// Server to client, swallowing the reply to a COMMIT that is to lose it.
    async fn server_to_client(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
    ) -> std::io::Result<()> {
        let mut buffer = vec![0; 16 * 1024];
        loop {
            let n = from.read(&mut buffer).await?;
            let fault = self.swallow.load(Ordering::SeqCst);
            if fault == PARTITION {
                // The server's replies are read and dropped, and its closing the session
                // (`n == 0`) is never passed on either.
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                continue;
            }
            if n == 0 {
                return Ok(());
            }
            if fault != PASS {
                // The server answered the COMMIT: it has committed. The client never hears.
                if fault == SWALLOW_THEN_BLACKOUT {
                    self.shared.cut_all();
                }
                self.cut.cancel();
                return Ok(());
            }
            to.write_all(&buffer[..n]).await?;
        }
    }
}

/// What the server-to-client pump does with the server's bytes.
const PASS: u8 = 0;
const SWALLOW: u8 = 1;
const SWALLOW_THEN_BLACKOUT: u8 = 2;
const PARTITION: u8 = 3;

/// A startup-phase message: length (including itself) then body.
async fn read_untyped(from: &mut OwnedReadHalf) -> std::io::Result<Vec<u8>> {
    let mut length = [0; 4];
    from.read_exact(&mut length).await?;
    let total = u32::from_be_bytes(length) as usize;
    let mut frame = length.to_vec();
    frame.resize(total.max(8), 0);
    from.read_exact(&mut frame[4..]).await?;
    Ok(frame)
}

/// Whether an untyped message is the startup message (protocol 3.x), which typed messages
/// follow; SSLRequest and GSSENCRequest are followed by another untyped one.
fn is_startup(frame: &[u8]) -> bool {
    let code = u32::from_be_bytes(frame[4..8].try_into().expect("4 bytes"));
    code >> 16 == 3
}

/// Whether an untyped message is an SSLRequest or a GSSENCRequest.
pub fn asks_for_encryption(frame: &[u8]) -> bool {
    frame.len() == 8
        && [80_877_103, 80_877_104].contains(&u32::from_be_bytes(
            frame[4..8].try_into().expect("4 bytes"),
        ))
}

/// A parameter of a startup message: after length and protocol, `name\0value\0` pairs.
fn startup_parameter(frame: &[u8], name: &str) -> Option<String> {
    if !is_startup(frame) {
        return None;
    }
    let mut fields = frame[8..].split(|&b| b == 0);
    while let Some(key) = fields.next() {
        let value = fields.next()?;
        if key == name.as_bytes() {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    None
}

/// A regular message: type byte, length (including itself, not the type), body.
async fn read_typed(from: &mut OwnedReadHalf) -> std::io::Result<Vec<u8>> {
    let mut head = [0; 5];
    from.read_exact(&mut head).await?;
    let length = u32::from_be_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
    let mut frame = head.to_vec();
    frame.resize(1 + length.max(4), 0);
    from.read_exact(&mut frame[5..]).await?;
    Ok(frame)
}

fn is_commit(query: &[u8]) -> bool {
    let text = String::from_utf8_lossy(query);
    text.trim_end_matches('\0')
        .trim()
        .trim_end_matches(';')
        .eq_ignore_ascii_case("commit")
}
