//! `/api/v1/jobs`: read one job, list jobs newest first, cancel or retry a job. Jobs of every
//! kind share these endpoints; each kind has its own `POST` to create them.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use settle_workers::read::{self, AttemptError, JobFilter, JobRecord};
use settle_workers::{CancelOutcome, JobState, RetryOutcome};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::extract::{Int, Json, ListQuery, Path};
use super::openapi::ErrorBody;
use super::pagination::{Page, PageQuery, text_filter};
use crate::settlement::job::KIND as SETTLEMENT_KIND;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/retry", post(retry_job))
}

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Job {
    job_id: i64,
    kind: String,
    /// QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED or CANCELLED.
    status: String,
    /// 0–100; never goes down while the job runs, a start-over on a revised input included (a
    /// retry of a FAILED or CANCELLED job starts it again from 0).
    progress: u8,
    processed: i64,
    /// Rows the job will process; 0 until it has started and knows.
    total: i64,
    /// `/downloads/{job_id}.csv` once a settlement job is COMPLETED, else null.
    download_url: Option<String>,
    /// The latest failure's message, if an attempt failed.
    error: Option<String>,
    /// Attempts started since the job was enqueued or last retried.
    attempt: i32,
    /// Attempts before the job becomes FAILED.
    max_attempts: i32,
    /// Not started before this instant: the next attempt's time after a failure's backoff.
    run_at: DateTime<Utc>,
    /// The worker holding the job (its lease), while RUNNING or CANCELLING; else null.
    worker: Option<String>,
    /// One entry per failed attempt, oldest first, kept across retries.
    errors: Vec<JobAttemptError>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// The job's input, e.g. `{"from", "to"}` for a settlement.
    #[schema(value_type = Object)]
    params: Value,
}

/// A failed attempt in a job's `errors`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAttemptError {
    /// The attempt's number, from 1 (a retried job counts from 1 again).
    attempt: i32,
    /// What went wrong.
    error: String,
    /// When the attempt failed.
    at: DateTime<Utc>,
    /// When the next attempt was due; null when this failure ended the job.
    retry_at: Option<DateTime<Utc>>,
}

impl From<AttemptError> for JobAttemptError {
    fn from(e: AttemptError) -> Self {
        Self {
            attempt: e.attempt,
            error: e.error,
            at: e.at,
            retry_at: e.retry_at,
        }
    }
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
            error: job.last_error().map(str::to_owned),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            run_at: job.run_at,
            worker: job.worker,
            errors: job.errors.0.into_iter().map(Into::into).collect(),
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
    )
)]
async fn get_job(
    State(app): State<AppState>,
    Path(Int(id)): Path<Int>,
) -> Result<Json<Job>, ApiError> {
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
    #[param(min_length = 1)]
    kind: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/jobs", tag = "jobs",
    params(ListJobsQuery, PageQuery),
    responses(
        (status = 200, description = "Newest first", body = Page<Job>),
        (status = 422, description = "INVALID_LIMIT, INVALID_STATUS, INVALID_KIND", body = ErrorBody),
    )
)]
async fn list_jobs(
    State(app): State<AppState>,
    ListQuery(query, page): ListQuery<ListJobsQuery>,
) -> Result<Json<Page<Job>>, ApiError> {
    let limit = page.limit(&app.config.pagination)?;
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
    let filter = JobFilter {
        state,
        kind: text_filter(query.kind, "INVALID_KIND", "kind")?,
        before: page.before()?,
        limit: limit + 1,
    };
    let mut conn = app.pool.acquire().await?;
    let rows = read::list_jobs(&mut conn, &filter).await?;
    Ok(Json(Page::by_id(rows, limit, |job| job.id)))
}

/// Cancel a job: a QUEUED job becomes CANCELLED at once and never starts, as does a RUNNING one
/// whose lease has expired (its worker is gone); a RUNNING one becomes CANCELLING and always
/// ends CANCELLED: it stops at its next checkpoint, and a job already in its final step rolls
/// that step back. A job whose completion committed first answers 409.
/// Cancelling a cancelled job changes nothing.
#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path)),
    responses(
        (status = 202, description = "CANCELLED or CANCELLING", body = JobAccepted),
        (status = 409, description = "JOB_FINISHED: the job already COMPLETED or FAILED", body = ErrorBody),
    )
)]
async fn cancel_job(
    State(app): State<AppState>,
    Path(Int(id)): Path<Int>,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    match settle_workers::request_cancel(&mut conn, id).await? {
        CancelOutcome::Accepted(state) => Ok(accepted(id, state)),
        CancelOutcome::Finished(state) => Err(ApiError::Conflict {
            code: "JOB_FINISHED",
            message: format!("the job is already {}", state.as_api_str()),
        }),
        CancelOutcome::NotFound => Err(not_found()),
    }
}

/// Retry a FAILED or CANCELLED job: it goes back to QUEUED, due now, with a fresh attempt
/// budget, and starts over: its input is fixed anew (a settlement reads the transactions as they
/// are now) and nothing of the earlier attempts' partial work is reused. `errors` keeps the
/// earlier failures.
#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = i64, Path)),
    responses(
        (status = 202, description = "QUEUED", body = JobAccepted),
        (status = 409, description = "JOB_NOT_RETRYABLE: the job is not FAILED or CANCELLED; \
            `status` says what it is", body = ErrorBody),
    )
)]
async fn retry_job(
    State(app): State<AppState>,
    Path(Int(id)): Path<Int>,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    match settle_workers::retry(&mut conn, id).await? {
        RetryOutcome::Retried => Ok(accepted(id, JobState::Queued)),
        RetryOutcome::NotRetryable(state) => Err(ApiError::NotRetryable { state }),
        RetryOutcome::NotFound => Err(not_found()),
    }
}

/// What a 202 answers: the job created, cancelled or retried, and its state now.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub job_id: i64,
    /// QUEUED (created or retried), CANCELLING or CANCELLED (cancelled).
    pub status: &'static str,
}

impl JobAccepted {
    pub fn new(job_id: i64, state: JobState) -> Self {
        Self {
            job_id,
            status: state.as_api_str(),
        }
    }
}

fn accepted(id: i64, state: JobState) -> Response {
    (StatusCode::ACCEPTED, Json(JobAccepted::new(id, state))).into_response()
}

fn not_found() -> ApiError {
    ApiError::NotFound("job not found".into())
}
