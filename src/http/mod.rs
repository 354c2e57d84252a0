//! The HTTP transport: routers per resource, the middleware stack, and serving with graceful
//! shutdown. Handlers parse input into domain types and call the domain; they hold no SQL.

mod auth;
mod dashboard;
mod downloads;
pub mod error;
pub mod extract;
mod health;
pub mod idempotency;
pub mod jobs;
mod limits;
mod metrics;
pub mod openapi;
mod orders;
mod pagination;
mod products;
mod serve;
mod settlement_jobs;
mod settlements;
mod transactions;

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::orders::coalesce::{Coalescer, KeyStore};
use crate::tokens::cache::TokenCache;
use error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// `/readyz`'s own connection to the same database (one, opened when first needed): a
    /// pool that requests keep busy does not make the instance look broken, and a load
    /// balancer does not take every API out at the peak of traffic.
    pub health: PgPool,
    /// The connections CSV downloads stream on (`http.max_concurrent_downloads`, opened when
    /// needed): each holds one for as long as its reader reads, so slow or stalled readers
    /// never take the connections orders and every other request need.
    pub downloads: PgPool,
    pub config: Arc<Config>,
    /// Places concurrent orders for one product together (when `orders.coalesce`).
    pub coalescer: Coalescer,
    /// Tokens this process verified recently (`auth.cache_ttl_ms`).
    pub tokens: TokenCache,
    /// The process's recorder and this app's cached queue gauges (`GET /metrics`).
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(pool: PgPool, config: Arc<Config>) -> Self {
        let keys = KeyStore {
            render: orders::stored_answer,
            ttl_hours: config.idempotency.ttl_hours,
        };
        let coalescer = Coalescer::new(pool.clone(), &config.orders, keys);
        let tokens = TokenCache::new(Duration::from_millis(config.auth.cache_ttl_ms));
        // Each beside the request pool, to the same database, its connections opened as needed.
        let beside = |connections: u32, name: &str| {
            PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_millis(config.database.acquire_timeout_ms))
                .connect_lazy_with((*pool.connect_options()).clone().application_name(name))
        };
        let health = beside(1, "settle health");
        let downloads = beside(config.http.max_concurrent_downloads, "settle downloads");
        Self {
            pool,
            health,
            downloads,
            config,
            coalescer,
            tokens,
            metrics: Metrics::new(),
        }
    }
}

/// The whole API: every resource router, the docs, the fallbacks, and the middleware.
pub fn router(state: AppState) -> Router {
    crate::metrics::orders_at_zero();
    let max_body = state.config.http.max_body_bytes;
    let config = state.config.clone();
    Router::new()
        .merge(products::router())
        .merge(orders::router())
        .merge(transactions::router())
        .merge(settlement_jobs::router())
        .merge(downloads::router())
        .merge(jobs::router())
        .merge(health::router())
        .merge(settlements::router())
        // Matched routes only, so an unknown path stays 404 without a token (see auth.rs).
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token))
        .merge(dashboard::router())
        .merge(metrics::router())
        .layer(middleware::from_fn_with_state(state.clone(), time_limit))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
        .merge(openapi::docs(&config))
        // After every route, the docs' included, so each answers these in the API's shape.
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(answer_panics())
        // Outside every route, so each is counted under its template, whatever answered it.
        .layer(middleware::from_fn(metrics::track))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
                    let id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
}

/// A handler that panics is answered 500 `INTERNAL` (and logged with its message) instead of
/// the connection being dropped without a reply; inside [`metrics::track`], so it is counted.
fn answer_panics() -> CatchPanicLayer<fn(Box<dyn Any + Send>) -> Response> {
    fn answer(panic: Box<dyn Any + Send>) -> Response {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        ApiError::Internal(anyhow::anyhow!("the handler panicked: {message}")).into_response()
    }
    CatchPanicLayer::custom(answer as fn(_) -> _)
}

/// Set by a writing handler once its request may have taken effect (an order once its body is
/// all here, any other write as it sends its commit); read by [`time_limit`] when the request
/// runs out of time. Handlers extract it; outside [`time_limit`] nobody reads it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Started(Arc<AtomicBool>);

impl Started {
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn marked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Started {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

/// Answers 503 instead of letting a request hang past `http.request_timeout_ms`. A write cut
/// short once [`Started`] may still take effect (an order's batch runs on without the request,
/// a commit sent is the server's to finish), so it is answered as such: `ORDER_OUTCOME_UNKNOWN`
/// for an order, `OUTCOME_UNKNOWN` for any other write, never a plain "unavailable". A write
/// cut short before (its body not all here, its transaction not yet committing) did nothing:
/// that is a plain 503.
async fn time_limit(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let limit = Duration::from_millis(app.config.http.request_timeout_ms);
    let started = Started::default();
    // An order placement: its handler is dropped here; the order is counted by its batch or
    // placement task if one took it, else as an error ([`crate::metrics::OrderCount`]).
    let order = request.method() == Method::POST && request.uri().path() == "/api/v1/orders";
    if request.method() == Method::POST {
        request.extensions_mut().insert(started.clone());
    }
    let Ok(response) = tokio::time::timeout(limit, next.run(request)).await else {
        let error = match (started.marked(), order) {
            (true, true) => ApiError::OrderOutcomeUnknown { order_id: None },
            (true, false) => ApiError::OutcomeUnknown,
            (false, _) => ApiError::Unavailable,
        };
        return error.into_response();
    };
    response
}

pub use metrics::serve_process_metrics;
use serve::serve_router;
pub use serve::{ServeLimits, listen};

/// Binds `http.host:http.port` (port 0: any free port) with `http.listen_backlog`; [`serve`]
/// logs the address bound.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let (host, port) = (config.http.host.as_str(), config.http.port);
    listen((host, port), config.http.listen_backlog)
        .await
        .map_err(|e| {
            use std::io::ErrorKind::{AddrInUse, PermissionDenied};
            // What to change: the port for a port taken or kept for root, else the host (a
            // name that does not resolve, an address of another machine).
            let fix = match e.kind() {
                AddrInUse | PermissionDenied => "set PORT or http.port to a free one, 0 for any",
                _ => "set http.host (SETTLE_HTTP__HOST) to an address or name of this machine",
            };
            anyhow::Error::new(e).context(format!("cannot listen on {host}:{port} ({fix})"))
        })
}

/// Serves until `shutdown` fires, then finishes in-flight requests and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Said once it serves: `serve` binds before it migrates and loads its demo.
    let limits = ServeLimits::of(&state.config.http);
    serve_router(
        listener,
        router(state),
        shutdown,
        ("settle api listening on", ""),
        limits,
    )
    .await
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// One HTTP/1.1 GET of `path` on a real connection; the whole reply as text.
    async fn get_raw(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_and_the_server_serves_on() {
        let app = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(answer_panics());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let reply = get_raw(address, "/boom").await;
        assert!(reply.starts_with("HTTP/1.1 500"), "{reply}");
        assert!(reply.contains(r#""code":"INTERNAL""#), "{reply}");
        assert!(reply.contains(r#""message":"internal error""#), "{reply}");
        assert!(get_raw(address, "/fine").await.ends_with("fine"));
    }
}
