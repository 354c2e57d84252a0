//! `/livez` (the process answers) and `/readyz` (the database answers and is migrated).

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
    (status = 200, description = "Database reachable and migrated"),
    (status = 503, description = "Database unreachable, busy (no free connection in the pool) or not migrated"),
))]
async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    match crate::db::ensure_migrated(&app.pool).await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => {
            // The driver's text (addresses, roles, server messages) goes to the log only.
            tracing::warn!(error = %e, "not ready");
            let reason = match e {
                crate::db::DbError::NotMigrated { .. } => "database not migrated",
                // Every connection of the pool in use for longer than the acquire timeout: the
                // server may be answering the others quickly, and "unreachable" would send an
                // operator looking for an outage.
                crate::db::DbError::Sql(sqlx::Error::PoolTimedOut) => {
                    "database busy: no free connection in the pool"
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
