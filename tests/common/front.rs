//! An HTTP proxy in front of the api, for the dashboard tests of what the page does when the
//! answers between it and the API go wrong: the browser loads the page and calls the API through
//! it, on a real port, and the test switches what it does with each request ([`Mode`]) or holds
//! the answers to one path until told to pass them on, oldest or newest first.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Response, StatusCode, header};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::browser::PATIENCE;
use super::processes::wait_for;

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Passes it on, and passes the answer back.
    Pass,
    /// As a single-sign-on proxy whose session expired: each `/api/…` or `/downloads/…`
    /// request is redirected (302) to `/login`, a sign-in page answered 200 in HTML.
    SignIn,
    /// Passes it on (the API does what it asks), and never answers: the connection stays open.
    Silent,
    /// Passes it on (the API does what it asks), then closes the connection with no answer:
    /// the answer is lost on the way. (Chromium sends a POST met so on a reused connection
    /// again, a few times, as it may.)
    Cut,
}

/// A running proxy; stops accepting when dropped.
pub struct Front {
    /// `http://127.0.0.1:port`.
    pub base: String,
    shared: Arc<Shared>,
    serve: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    mode: Mutex<Mode>,
    /// The path and query whose GET answers are held, if any.
    hold: Mutex<Option<String>>,
    /// Answers held, oldest first: each is passed on when its sender is used or dropped.
    held: Mutex<Vec<oneshot::Sender<()>>>,
}

/// Hop-by-hop headers, and the length the proxy's own server sets again.
const NOT_PASSED: [HeaderName; 4] = [
    header::HOST,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
];

impl Front {
    /// Listens on a free port of 127.0.0.1 in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the front");
        let base = format!("http://{}", listener.local_addr().expect("front address"));
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("client"),
            mode: Mutex::new(Mode::Pass),
            hold: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(relay).with_state(shared.clone());
        let serve = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve the front");
        });
        Self {
            base,
            shared,
            serve,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// From now on, holds the body of the answer to each GET of `path_and_query` (the request
    /// reaches the API at once, the answer's status and headers are passed on) until
    /// [`Front::release`].
    pub fn hold(&self, path_and_query: &str) {
        *self.shared.hold.lock().unwrap() = Some(path_and_query.to_owned());
    }

    /// Waits until `n` answers are held.
    pub async fn wait_held(&self, n: usize) {
        wait_for(PATIENCE, &format!("{n} answers held"), || async {
            (self.shared.held.lock().unwrap().len() >= n).then_some(())
        })
        .await;
    }

    /// Passes on the body of the held answer at `index` (0: the oldest); later ones move up.
    pub fn release(&self, index: usize) {
        let sender = self.shared.held.lock().unwrap().remove(index);
        let _ = sender.send(());
    }
}

async fn relay(State(shared): State<Arc<Shared>>, request: Request) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let mode = *shared.mode.lock().unwrap();
    if path == "/login" {
        return answer(
            StatusCode::OK,
            "text/html",
            "<html><body>Sign in</body></html>",
        );
    }
    if mode == Mode::SignIn && (path.starts_with("/api/") || path.starts_with("/downloads/")) {
        let mut redirect = answer(StatusCode::FOUND, "text/plain", "");
        let location = header::HeaderValue::from_static("/login");
        redirect.headers_mut().insert(header::LOCATION, location);
        return redirect;
    }
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let held = request.method() == "GET" && shared.hold.lock().unwrap().as_deref() == Some(target);
    let url = format!("{}{target}", shared.upstream);
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .expect("request body");
    let mut forward = shared.client.request(parts.method, url).body(body);
    for (name, value) in parts
        .headers
        .iter()
        .filter(|(n, _)| !NOT_PASSED.contains(n))
    {
        forward = forward.header(name, value);
    }
    let upstream = forward.send().await.expect("the api answers the front");
    let status = upstream.status();
    let headers = upstream.headers().clone();
    let bytes = upstream.bytes().await.expect("the api's body");
    if mode == Mode::Silent {
        std::future::pending::<()>().await;
    }
    // A held answer's status and headers go at once, its body once released: as a page that
    // comes slowly over the network. (Holding the headers too would hold every later request
    // for that path in the browser's HTTP cache, which lets one request per URL fetch at once.)
    let body = if mode == Mode::Cut {
        let cut = std::io::Error::other("the front cuts the connection");
        Body::from_stream(futures::stream::once(
            async move { Err::<bytes::Bytes, _>(cut) },
        ))
    } else if held {
        let (sender, released) = oneshot::channel::<()>();
        shared.held.lock().unwrap().push(sender);
        Body::from_stream(futures::stream::once(async move {
            let _ = released.await;
            Ok::<_, std::convert::Infallible>(bytes)
        }))
    } else {
        Body::from(bytes)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (name, value) in headers.iter().filter(|(n, _)| !NOT_PASSED.contains(n)) {
        response.headers_mut().append(name, value.clone());
    }
    response
}

fn answer(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let value = header::HeaderValue::from_static(content_type);
    response.headers_mut().insert(header::CONTENT_TYPE, value);
    response
}
