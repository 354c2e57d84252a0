//! A completed job's result, in Postgres: its CSV rows are copied from `settlements` into
//! `settlement_results` inside the fenced transaction that marks the job COMPLETED, and any
//! api process streams them back out with `COPY … TO STDOUT`, a chunk at a time, so memory
//! stays flat however many rows there are and no disk is shared between processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt, stream};
use settle_workers::JobState;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres};
use tokio::sync::oneshot;

use super::DateRange;

/// The CSV's header line, as `COPY … (header)` writes it.
pub const HEADER: &str = "merchant_id,date,gross_cents,fee_cents,net_cents,txn_count";

/// Bytes gathered from COPY's row-sized messages before each is handed to the reader.
const CHUNK: usize = 64 * 1024;

/// Chunks buffered ahead of a slow reader: memory per download is at most this many chunks.
const CHUNKS_AHEAD: usize = 4;

/// Copies the range's rows of `settlements`, as they stand in the caller's transaction, into the
/// job's result; returns how many. Run in the transaction that completes the job.
pub async fn store(
    conn: &mut PgConnection,
    job_id: i64,
    range: DateRange,
) -> Result<u64, sqlx::Error> {
    let stored = sqlx::query!(
        "insert into settlement_results
             (job_id, merchant_id, date, gross_cents, fee_cents, net_cents, txn_count)
         select $1, merchant_id, date, gross_cents, fee_cents, net_cents, txn_count
         from settlements where date between $2 and $3",
        job_id,
        range.from(),
        range.to(),
    )
    .execute(conn)
    .await?;
    Ok(stored.rows_affected())
}

/// `COPY` of a job's result as the CSV (COPY takes no parameters; the id is an integer). The
/// rows are sorted here: the table is indexed by job only (migration 0016).
///
/// A merchant id that a spreadsheet would take for a formula (it begins with `=`, `+`, `-`,
/// `@`, a tab or a carriage return; ingestion takes any id a provider sends, and anyone with an
/// `ingest` token chooses it) is written after an apostrophe, as OWASP advises against CSV
/// injection: the admin who opens the file sees the id as text and runs nothing. The API's
/// JSON gives every id as it is.
fn copy_statement(job_id: i64) -> String {
    format!(
        "copy (select case when left(merchant_id, 1) in ('=', '+', '-', '@', E'\\t', E'\\r')
                           then '''' || merchant_id else merchant_id end as merchant_id,
                      date, gross_cents, fee_cents, net_cents, txn_count
               from settlement_results where job_id = {job_id}
               -- The stored id, not the one written (an output name would win here).
               order by settlement_results.merchant_id, date)
         to stdout with (format csv, header)"
    )
}

/// What a download of job `job_id`'s CSV finds, the job and its rows read in one snapshot.
#[derive(Debug)]
pub enum Download<S> {
    /// No COMPLETED settlement job has this id (unknown, pruned, another kind, not completed).
    Missing,
    /// Completed before results were kept in Postgres (migration 0009): its CSV is a file.
    File,
    /// The CSV, as a stream of chunks.
    Rows(S),
}

/// Reads job `job_id` and, for a COMPLETED settlement whose rows are in Postgres, streams its
/// CSV. The job's row and the `COPY` are read in one repeatable-read transaction, so a job that
/// retention deletes after it was found is still served whole (read separately, the `COPY`
/// found its rows gone and the 200 carried the header alone). A task holds `conn` (acquired by
/// the caller, so a busy pool is refused before any byte is sent) for the length of the
/// download and stays at most `CHUNKS_AHEAD` chunks ahead of the reader; it stops when the
/// reader goes away, or takes no chunk for `stall`: the snapshot (and with it the vacuum
/// horizon) is then released and the stream ends in an error, never as a short file.
pub async fn open(
    conn: PoolConnection<Postgres>,
    job_id: i64,
    stall: Duration,
) -> Result<Download<impl Stream<Item = Result<Bytes, sqlx::Error>>>, sqlx::Error> {
    serve(conn, job_id, true, stall).await
}

/// Job `job_id`'s stored rows as the CSV [`open`] streams, whatever the job's state or however
/// it was settled (the engine's tests settle without the queue).
pub async fn stored_csv(
    conn: PoolConnection<Postgres>,
    job_id: i64,
    stall: Duration,
) -> Result<impl Stream<Item = Result<Bytes, sqlx::Error>>, sqlx::Error> {
    match serve(conn, job_id, false, stall).await? {
        Download::Rows(rows) => Ok(rows),
        Download::Missing | Download::File => unreachable!("the job was not looked up"),
    }
}

/// [`open`], the job looked up first only when `look_up`.
async fn serve(
    mut conn: PoolConnection<Postgres>,
    job_id: i64,
    look_up: bool,
    stall: Duration,
) -> Result<Download<impl Stream<Item = Result<Bytes, sqlx::Error>>>, sqlx::Error> {
    let (found, finding) = oneshot::channel();
    let (mut chunks, rx) = mpsc::channel(CHUNKS_AHEAD);
    // Set once the reader has been given the whole file (or the error that ended it); the
    // channel closing without it means the download was cut off.
    let told = Arc::new(AtomicBool::new(false));
    let telling = told.clone();
    tokio::spawn(async move {
        let mut found = Some(found);
        let copied = async {
            // One round trip: the snapshot, dates rendered as ISO whatever the server's
            // default, and the session's idle-in-transaction timeout (see
            // `db::connect_options_with`) lifted: once the server has written the last row into
            // the sockets' buffers the transaction sits idle while a slow reader drains them,
            // and the server would end the session mid-file.
            let mut snapshot = conn
                .begin_with(
                    "begin isolation level repeatable read, read only;
                     set local datestyle = 'ISO, YMD';
                     set local idle_in_transaction_session_timeout = 0",
                )
                .await?;
            let what = if look_up {
                find(&mut snapshot, job_id).await?
            } else {
                Download::Rows(())
            };
            let rows = matches!(what, Download::Rows(()));
            if let Some(found) = found.take() {
                let _ = found.send(Ok(what));
            }
            if !rows {
                return Ok(true);
            }
            let whole = copy(&mut snapshot, job_id, &mut chunks, stall).await?;
            if whole {
                snapshot.commit().await?;
            }
            Ok::<bool, sqlx::Error>(whole)
        }
        .await;
        match copied {
            Ok(true) => telling.store(true, Ordering::Release),
            // The reader left (or stalled) mid-COPY: never hand a connection in that state back.
            Ok(false) => conn.close_on_drop(),
            Err(e) => {
                conn.close_on_drop();
                tracing::warn!(job = job_id, error = %e, "streaming a settlement CSV failed");
                // Before the job was found, the caller hears it; after, the reader does.
                match found.take() {
                    Some(found) => drop(found.send(Err(e))),
                    None => {
                        if chunks.send(Err(e)).await.is_ok() {
                            telling.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
    });
    // A reader the task gave up on reaches the channel's end without having been told why.
    let mut asked = false;
    let cut_off = stream::poll_fn(move |_| {
        let ended = std::mem::replace(&mut asked, true) || told.load(Ordering::Acquire);
        let cut = sqlx::Error::Io(std::io::ErrorKind::TimedOut.into());
        Poll::Ready((!ended).then_some(Err(cut)))
    });
    match finding.await {
        Ok(Ok(Download::Rows(()))) => Ok(Download::Rows(rx.chain(cut_off))),
        Ok(Ok(Download::Missing)) => Ok(Download::Missing),
        Ok(Ok(Download::File)) => Ok(Download::File),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::WorkerCrashed),
    }
}

/// What `open` serves for job `job_id`, read in the caller's transaction.
async fn find(conn: &mut PgConnection, job_id: i64) -> Result<Download<()>, sqlx::Error> {
    let record = settle_workers::read::get_job(conn, job_id).await?;
    let result = match record {
        Some(r) if r.kind == super::job::KIND && r.state == JobState::Completed => r.result,
        _ => return Ok(Download::Missing),
    };
    Ok(match result {
        Some(result) if result.get("csv_rows").is_some() => Download::Rows(()),
        _ => Download::File,
    })
}

/// Streams the job's CSV into `chunks` from the caller's transaction (opened by [`serve`], which
/// sets its date style); false when the reader left before the end, or took no chunk for
/// `stall` (the connection is then mid-COPY).
async fn copy(
    conn: &mut PgConnection,
    job_id: i64,
    chunks: &mut mpsc::Sender<Result<Bytes, sqlx::Error>>,
    stall: Duration,
) -> Result<bool, sqlx::Error> {
    let mut rows = conn.copy_out_raw(&copy_statement(job_id)).await?;
    let mut chunk = BytesMut::with_capacity(CHUNK);
    loop {
        let row = rows.try_next().await?;
        let last = row.is_none();
        if let Some(row) = row {
            chunk.extend_from_slice(&row);
        }
        if chunk.len() >= CHUNK || (last && !chunk.is_empty()) {
            let sent = tokio::time::timeout(stall, chunks.send(Ok(chunk.split().freeze()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                if sent.is_err() {
                    tracing::warn!(
                        job = job_id,
                        ?stall,
                        "a CSV download's reader stalled; cut off"
                    );
                }
                return Ok(false);
            }
        }
        if last {
            return Ok(true);
        }
    }
}
