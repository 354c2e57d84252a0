//! `GET /metrics` (Prometheus text format, no authentication: scrapers hold no token, and it
//! shows counts, never data) and the middleware that counts every request by the route it
//! matched. A `settle worker` process serves the same endpoint, with its own series only, on
//! `worker.metrics_addr`.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::metrics::Metrics;

/// The `route` label of a request no route matched: a raw path would make a series per path.
pub const UNMATCHED: &str = "unmatched";

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

/// The process's series and the queue gauges. Always 200: if the database cannot be read the
/// queue gauges are left out, the process's own series still answer.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text format 0.0.4: settle_jobs, settle_job_*, \
        settle_orders_total, settle_order_batch_size, settle_http_*", content_type = "text/plain", body = String),
))]
async fn scrape(State(app): State<AppState>) -> Response {
    let text = app.metrics.render(&app.pool).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Counts the request under its route template (`/api/v1/orders/{id}`), its method and its
/// status, and times it to the response head.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    crate::metrics::http_request(method, route, response.status().as_u16(), started.elapsed());
    response
}

/// The standard methods by name; anything else (methods are open-ended) as `OTHER`.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

/// Serves `GET /metrics` with this process's series (a worker's job counters) on `listener`
/// until `shutdown`. The queue gauges are the API's to serve: every process reading the same
/// table would only repeat them. The caller makes `metrics` (which installs the recorder)
/// before the worker claims anything: a job that ends before the recorder is installed is
/// never counted.
pub async fn serve_process_metrics(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
    limits: super::ServeLimits,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || async move {
            (
                [(header::CONTENT_TYPE, CONTENT_TYPE)],
                metrics.render_process(),
            )
        }),
    );
    super::serve_router(
        listener,
        app,
        shutdown,
        ("worker metrics on", "/metrics"),
        limits,
    )
    .await
}
