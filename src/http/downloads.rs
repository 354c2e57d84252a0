//! `GET /downloads/{job_id}.csv`: a COMPLETED settlement's CSV, streamed from the results
//! directory. The path is parsed to a job id before anything touches the file system, so only
//! `{digits}.csv` inside `settlement.results_dir` can ever be served.

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
use crate::settlement::{csv, job};

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
    let mut conn = app.pool.acquire().await?;
    let record = settle_workers::read::get_job(&mut conn, job_id).await?;
    drop(conn);
    match record {
        Some(r) if r.kind == job::KIND && r.state == "completed" => {}
        _ => return Err(not_found()),
    }
    let path = csv::final_path(&app.config.settlement.results_dir, job_id);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    let mut response = Body::from_stream(ReaderStream::new(file)).into_response();
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
