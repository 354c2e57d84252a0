//! `/api/v1/jobs`: read one job, list jobs newest first, cancel a job. Jobs of every kind share
//! these endpoints; each kind has its own `POST` to create them.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use settle_workers::read::{self, JobFilter, JobRecord};
use settle_workers::{CancelOutcome, JobState};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, Path, Query};
use super::openapi::ErrorBody;
use super::pagination::{self, Cursor};
use crate::settlement::job::KIND as SETTLEMENT_KIND;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
}

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Job {
    job_id: i64,
    kind: String,
    /// QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED or CANCELLED.
    status: String,
    /// 0–100, never decreasing.
    progress: u8,
    processed: i64,
    /// Rows the job will process; 0 until it has started and knows.
    total: i64,
    /// `/downloads/{job_id}.csv` once a settlement job is COMPLETED, else null.
    download_url: Option<String>,
    /// The latest failure's message, if an attempt failed.
    error: Option<String>,
    attempt: i32,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// The job's input, e.g. `{"from", "to"}` for a settlement.
    #[schema(value_type = Object)]
    params: Value,
}

impl From<JobRecord> for Job {
    fn from(job: JobRecord) -> Self {
        let download_url = (job.kind == SETTLEMENT_KIND && job.state == JobState::Completed)
            .then(|| format!("/downloads/{}.csv", job.id));
        Self {
            job_id: job.id,
            progress: job.progress(),
            status: job.state.as_api_str().to_owned(),
            processed: job.processed,
            total: job.total.unwrap_or(0).max(job.processed),
            download_url,
            error: job.last_error,
            attempt: job.attempt,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            params: job.args,
            kind: job.kind,
        }
    }
}

#[utoipa::path(
    get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = Job),
        (status = 400, description = "INVALID_PATH", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    )
)]
async fn get_job(State(app): State<AppState>, Path(id): Path<i64>) -> Result<Json<Job>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    read::get_job(&mut conn, id)
        .await?
        .map(|job| Json(job.into()))
        .ok_or_else(not_found)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED or CANCELLED.
    status: Option<String>,
    kind: Option<String>,
    /// Page size, 1 to `pagination.max_page_size`.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    data: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/jobs", tag = "jobs",
    params(ListJobsQuery),
    responses(
        (status = 200, description = "Newest first", body = JobPage),
        (status = 400, description = "INVALID_QUERY, INVALID_CURSOR", body = ErrorBody),
        (status = 422, description = "INVALID_LIMIT, INVALID_STATUS", body = ErrorBody),
    )
)]
async fn list_jobs(
    State(app): State<AppState>,
    Query(query): Query<ListJobsQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let limit = pagination::limit(query.limit, &app.config.pagination)?;
    let state = query
        .status
        // Exactly as the document lists them (upper case), so a client generating from it
        // meets the rule the server applies.
        .map(
            |status| match status.bytes().all(|b| b.is_ascii_uppercase()) {
                true => status.to_lowercase().parse::<JobState>().map_err(|_| ()),
                false => Err(()),
            },
        )
        .transpose()
        .map_err(|_| {
            ApiError::invalid(
                "INVALID_STATUS",
                "status",
                "status must be one of QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED, CANCELLED",
            )
        })?;
    let before = query.cursor.as_deref().map(Cursor::parse).transpose()?;
    let filter = JobFilter {
        state,
        kind: query.kind,
        before: before.map(|c| c.0),
        limit: limit + 1,
    };
    let mut conn = app.pool.acquire().await?;
    let mut rows = read::list_jobs(&mut conn, &filter).await?;
    let next_cursor = pagination::next_cursor(&mut rows, limit, |job| job.id);
    Ok(Json(JobPage {
        data: rows.into_iter().map(Job::from).collect(),
        next_cursor,
    }))
}

/// Cancel a job: a QUEUED job becomes CANCELLED at once and never starts; a RUNNING one becomes
/// CANCELLING and always ends CANCELLED: it stops at its next checkpoint, and a job already in
/// its final step rolls that step back. A job whose completion committed first answers 409.
/// Cancelling a cancelled job changes nothing.
#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path)),
    responses(
        (status = 202, description = "`{\"job_id\", \"status\"}`: CANCELLED or CANCELLING"),
        (status = 400, description = "INVALID_PATH", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
        (status = 409, description = "JOB_FINISHED: the job already COMPLETED or FAILED", body = ErrorBody),
    )
)]
async fn cancel_job(
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    match settle_workers::request_cancel(&mut conn, id).await? {
        CancelOutcome::Accepted(state) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"job_id": id, "status": state.as_api_str()})),
        )
            .into_response()),
        CancelOutcome::Finished(state) => Err(ApiError::Conflict {
            code: "JOB_FINISHED",
            message: format!("the job is already {}", state.as_api_str()),
        }),
        CancelOutcome::NotFound => Err(not_found()),
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("job not found".into())
}
