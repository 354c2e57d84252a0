//! `/livez` (the process answers) and `/readyz` (the database answers, on a connection of the
//! check's own, and is migrated).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use super::AppState;
use super::extract::Json;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
}

#[utoipa::path(get, path = "/livez", tag = "health", responses((status = 200, description = "The process is alive")))]
async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Database reachable and migrated (checked on a connection of the check's own: requests holding every pooled connection do not make it fail)"),
    (status = 503, description = "Database unreachable, not answering within database.acquire_timeout_ms, or not migrated"),
))]
async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    match crate::db::ensure_migrated(&app.health).await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => {
            // The driver's text (addresses, roles, server messages) goes to the log only.
            tracing::warn!(error = %e, "not ready");
            let reason = match e {
                crate::db::DbError::NotMigrated { .. } => "database not migrated",
                crate::db::DbError::Edited { .. } => {
                    "database migrated from files that differ from this release's"
                }
                // The check's one connection busy with an earlier check, or slow to open: the
                // server may be there but slow; or it refuses, which the pool hides.
                crate::db::DbError::Sql(sqlx::Error::PoolTimedOut) => {
                    let options = app.health.connect_options();
                    match crate::db::why_timed_out(&options, Duration::from_secs(1)).await {
                        sqlx::Error::PoolTimedOut => "database not answering in time",
                        _ => "database unreachable",
                    }
                }
                _ => "database unreachable",
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "reason": reason})),
            )
        }
    }
}
