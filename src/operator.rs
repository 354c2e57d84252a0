//! `settle jobs list|show|cancel|retry`: the queue for operators, on the command line. A
//! transport beside `http/`: it talks to the database directly (run it where `DATABASE_URL`
//! reaches Postgres; no API token is involved) through the same queue functions the API calls,
//! and shows a job in the API's own JSON shape (`http::jobs::Job`).

use std::io::Write;

use clap::Subcommand;
use settle_workers::read::{self, JobFilter, JobRecord};
use settle_workers::{CancelOutcome, JobState, RetryOutcome};
use sqlx::PgPool;

use crate::config::PaginationConfig;
use crate::http::jobs::Job;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs newest first, as a table.
    List {
        /// Only jobs in this state: QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED, CANCELLED.
        #[arg(long)]
        status: Option<String>,
        /// Only jobs of this kind (e.g. settlement).
        #[arg(long)]
        kind: Option<String>,
        /// How many, 1 to pagination.max_page_size [default: pagination.default_page_size].
        #[arg(long)]
        limit: Option<i64>,
        /// Only jobs older than this one: the last ID of a page, to see the page after it.
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
    },
    /// One job as JSON, in the shape of `GET /api/v1/jobs/{id}`.
    Show { id: i64 },
    /// Cancel a job, as `POST /api/v1/jobs/{id}/cancel` does.
    Cancel { id: i64 },
    /// Retry a FAILED or CANCELLED job from the start, as `POST /api/v1/jobs/{id}/retry` does.
    Retry { id: i64 },
}

/// Why an operator's command did nothing; the binary prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no job {0}")]
    NotFound(i64),
    #[error(
        "job {id} is {}: only a FAILED or CANCELLED job can be retried",
        state.as_api_str()
    )]
    NotRetryable { id: i64, state: JobState },
    #[error("job {id} already ended {}: there is nothing to cancel", state.as_api_str())]
    Finished { id: i64, state: JobState },
    #[error(
        "--status {0:?} is not one of QUEUED, RUNNING, CANCELLING, COMPLETED, FAILED, CANCELLED"
    )]
    InvalidStatus(String),
    #[error("--limit must be between 1 and {0}")]
    InvalidLimit(i64),
    #[error("--kind must not be empty (leave it out to list every kind)")]
    EmptyKind,
    #[error("database error")]
    Sql(#[from] sqlx::Error),
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

/// Runs one `settle jobs` command, writing what it shows to `out`.
pub async fn run(
    pool: &PgPool,
    pages: &PaginationConfig,
    command: JobsCommand,
    out: &mut impl Write,
) -> Result<(), OperatorError> {
    let mut conn = pool.acquire().await?;
    match command {
        JobsCommand::List {
            status,
            kind,
            limit,
            before,
        } => {
            // The configured page size, as the API's lists use, so the two agree.
            let limit = limit.unwrap_or(pages.default_page_size);
            if !(1..=pages.max_page_size).contains(&limit) {
                return Err(OperatorError::InvalidLimit(pages.max_page_size));
            }
            let state = status
                .map(|s| {
                    s.to_lowercase()
                        .parse()
                        .map_err(|_| OperatorError::InvalidStatus(s))
                })
                .transpose()?;
            // As the API refuses `?kind=`: an empty kind matches no job, and "(no jobs)" would
            // read as an answer.
            if kind.as_deref() == Some("") {
                return Err(OperatorError::EmptyKind);
            }
            let filter = JobFilter {
                state,
                kind,
                before,
                limit,
            };
            write_table(out, &read::list_jobs(&mut conn, &filter).await?)?;
        }
        JobsCommand::Show { id } => {
            let job = read::get_job(&mut conn, id)
                .await?
                .ok_or(OperatorError::NotFound(id))?;
            serde_json::to_writer_pretty(&mut *out, &Job::from(job))
                .map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        JobsCommand::Cancel { id } => match settle_workers::request_cancel(&mut conn, id).await? {
            CancelOutcome::Accepted(state) => writeln!(out, "job {id}: {}", state.as_api_str())?,
            CancelOutcome::Finished(state) => return Err(OperatorError::Finished { id, state }),
            CancelOutcome::NotFound => return Err(OperatorError::NotFound(id)),
        },
        JobsCommand::Retry { id } => match settle_workers::retry(&mut conn, id).await? {
            RetryOutcome::Retried => writeln!(out, "job {id}: {}", JobState::Queued.as_api_str())?,
            RetryOutcome::NotRetryable(state) => {
                return Err(OperatorError::NotRetryable { id, state });
            }
            RetryOutcome::NotFound => return Err(OperatorError::NotFound(id)),
        },
    }
    Ok(())
}

/// Longest error shown in a table cell; `settle jobs show` has the whole history.
const ERROR_WIDTH: usize = 60;

/// One line per job under a header, columns padded to their widest cell.
fn write_table(out: &mut impl Write, jobs: &[JobRecord]) -> std::io::Result<()> {
    let header = [
        "ID", "KIND", "STATUS", "PROGRESS", "ATTEMPT", "WORKER", "CREATED", "ERROR",
    ];
    let rows: Vec<[String; 8]> = jobs.iter().map(row).collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        writeln!(out, "{}", line(&row.each_ref().map(String::as_str)))?;
    }
    if rows.is_empty() {
        writeln!(out, "(no jobs)")?;
    }
    Ok(())
}

fn row(job: &JobRecord) -> [String; 8] {
    let error: String = job.last_error().unwrap_or("").replace('\n', " ");
    let error = match error.char_indices().nth(ERROR_WIDTH) {
        Some((cut, _)) => format!("{}…", &error[..cut]),
        None => error,
    };
    [
        job.id.to_string(),
        job.kind.clone(),
        job.state.as_api_str().to_owned(),
        format!("{}%", job.progress()),
        format!("{}/{}", job.attempt, job.max_attempts),
        job.worker.clone().unwrap_or_else(|| "-".into()),
        job.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        error,
    ]
}
