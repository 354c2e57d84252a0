//! `POST /api/v1/jobs/settlement`: enqueue a settlement job, optionally idempotent. Reading,
//! listing and cancelling jobs are the queue's endpoints (`jobs`).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::Value;
use settle_workers::{JobState, NewJob};
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::Json;
use super::idempotency::{KeyHeader, commit, status};
use super::jobs::JobAccepted;
use super::openapi::ErrorBody;
use super::{AppState, Started};
use crate::idempotency::{self, Begun};
use crate::settlement::job::KIND;
use crate::settlement::{DateRange, DateRangeInput};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/jobs/settlement", post(create_settlement_job))
}

/// `{"from","to"}` as received by `POST /api/v1/jobs/settlement` and stored as job params.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DateRangeInput)]
pub struct DateRangeBody {
    /// First day settled, `YYYY-MM-DD`, inclusive, of the years 0001 to 9999 (422
    /// `INVALID_DATE` for year 0000).
    pub from: String,
    /// Last day settled, `YYYY-MM-DD`, inclusive, of the years 0001 to 9999; not before `from`,
    /// and the range at most `settlement.max_span_days` days, both ends counted.
    pub to: String,
}

/// Queue a settlement of `from..=to` (both inclusive, calendar days in the configured
/// settlement time zone). Poll the `Location` for progress; once COMPLETED the CSV is at
/// `download_url`.
#[utoipa::path(
    post, path = "/api/v1/jobs/settlement", tag = "jobs",
    params(KeyHeader),
    responses(
        (status = 202, description = "QUEUED (a replay answers the first answer again)", body = JobAccepted,
            headers(("Location" = String, description = "The job: `/api/v1/jobs/{job_id}`"))),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE", body = ErrorBody),
        (status = 422, description = "INVALID_DATE, INVALID_DATE_RANGE (from > to or span over \
            settlement.max_span_days), INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
    )
)]
async fn create_settlement_job(
    State(app): State<AppState>,
    started: Started,
    key: KeyHeader,
    Json(body): Json<DateRangeBody>,
) -> Result<Response, ApiError> {
    let key = key.scoped("settlement_jobs")?;
    let input = DateRangeInput {
        from: body.from,
        to: body.to,
    };
    let range = DateRange::parse(&input, app.config.settlement.max_span_days)?;
    let request_json = serde_json::to_value(&input).map_err(anyhow::Error::from)?;
    let mut tx = match idempotency::begin(key.as_ref(), &app.pool, &request_json).await? {
        Begun::Execute(tx) => tx,
        Begun::Replay(stored) => return accepted(status(&stored)?, stored.body),
    };
    // Stored in canonical form, so the job reads exactly the days that were validated.
    let args = serde_json::to_value(range.to_input()).map_err(anyhow::Error::from)?;
    let job = NewJob::new(KIND, args).max_attempts(app.config.worker.max_attempts);
    let job_id = settle_workers::enqueue(&mut tx, &job).await?;
    let body = serde_json::to_value(JobAccepted::new(job_id, JobState::Queued))
        .map_err(anyhow::Error::from)?;
    let answer = (StatusCode::ACCEPTED, &body);
    commit(&app, &started, key.as_ref(), tx, &request_json, answer).await?;
    accepted(StatusCode::ACCEPTED, body)
}

/// The response, with `Location` pointing at the job (also on replays).
fn accepted(status: StatusCode, body: Value) -> Result<Response, ApiError> {
    let mut response = (status, axum::Json(&body)).into_response();
    if let Some(id) = body["job_id"].as_i64() {
        let location = HeaderValue::from_str(&format!("/api/v1/jobs/{id}"))
            .map_err(|e| ApiError::Internal(e.into()))?;
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}
