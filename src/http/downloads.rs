//! `GET /downloads/{job_id}.csv`: a COMPLETED settlement's CSV, streamed from Postgres (the
//! job's rows in `settlement_results`), so any api process serves any job's CSV. Jobs completed
//! before results moved into Postgres (migration 0009) had theirs written as files: those are
//! still served from `settlement.results_dir`. The path is parsed to a job id before anything
//! else, so only `{digits}.csv` inside that directory can ever be read.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::io::ReaderStream;

use super::AppState;
use super::error::ApiError;
use super::extract::Path;
use super::openapi::ErrorBody;
use crate::settlement::results::{self, Download};

pub fn router() -> Router<AppState> {
    Router::new().route("/downloads/{file}", get(download))
}

/// `{job_id}.csv` with a positive decimal id and nothing else: no signs, no leading zeros, no
/// separators, so the name maps to exactly one file name that we build ourselves.
fn parse_file_name(file: &str) -> Option<i64> {
    let digits = file.strip_suffix(".csv")?;
    let well_formed = !digits.is_empty()
        && digits.len() <= 18
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    well_formed.then(|| digits.parse().ok()).flatten()
}

/// Download a settlement CSV: `text/csv`, streamed; 404 until the job is COMPLETED.
#[utoipa::path(
    get, path = "/downloads/{job_id}.csv", tag = "jobs",
    params(("job_id" = i64, Path)),
    responses(
        (status = 200, description = "merchant_id,date,gross_cents,fee_cents,net_cents,txn_count, \
            sorted by merchant_id, date", content_type = "text/csv", body = String),
        (status = 404, description = "NOT_FOUND: malformed name, unknown job, or not COMPLETED", body = ErrorBody),
    )
)]
async fn download(
    State(app): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound("no such settlement file".into());
    let job_id = parse_file_name(&file).ok_or_else(not_found)?;
    let stall = Duration::from_millis(app.config.http.download_stall_timeout_ms);
    let body = match results::open(app.downloads.acquire().await?, job_id, stall).await? {
        Download::Rows(chunks) => Body::from_stream(chunks),
        Download::File => legacy_file(&app, job_id).await?.ok_or_else(not_found)?,
        Download::Missing => return Err(not_found()),
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    let disposition = format!("attachment; filename=\"settlement-{job_id}.csv\"");
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// The CSV file of a job completed before results were kept in Postgres, if it is still there.
async fn legacy_file(app: &AppState, job_id: i64) -> Result<Option<Body>, ApiError> {
    let path = app
        .config
        .settlement
        .results_dir
        .join(format!("{job_id}.csv"));
    match tokio::fs::File::open(&path).await {
        Ok(file) => Ok(Some(Body::from_stream(ReaderStream::new(file)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::Internal(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_file_name;

    #[test]
    fn only_plain_ids_are_accepted() {
        assert_eq!(parse_file_name("42.csv"), Some(42));
        for bad in [
            "",
            ".csv",
            "042.csv",
            "-1.csv",
            "+1.csv",
            "1.CSV",
            "1.csv.tmp",
            "../1.csv",
            "1/../2.csv",
            "1 .csv",
            "12345678901234567890.csv",
            "abc.csv",
            ".1.csv",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }
}
