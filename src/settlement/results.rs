//! A completed job's result, in Postgres: its CSV rows are copied from `settlements` into
//! `settlement_results` inside the fenced transaction that marks the job COMPLETED, and any
//! api process streams them back out with `COPY … TO STDOUT`, a chunk at a time, so memory
//! stays flat however many rows there are and no disk is shared between processes.

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{SinkExt, Stream, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

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
fn copy_statement(job_id: i64) -> String {
    format!(
        "copy (select merchant_id, date, gross_cents, fee_cents, net_cents, txn_count
               from settlement_results where job_id = {job_id}
               order by merchant_id, date)
         to stdout with (format csv, header)"
    )
}

/// The job's CSV as a stream of chunks. A task holds `conn` (acquired by the caller, so a
/// busy pool is refused before any byte is sent) for the length of the download and stays at
/// most `CHUNKS_AHEAD` chunks ahead of the reader; it stops when the reader goes away.
pub fn stream(
    mut conn: PoolConnection<Postgres>,
    job_id: i64,
) -> impl Stream<Item = Result<Bytes, sqlx::Error>> {
    let (mut tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    tokio::spawn(async move {
        let copied = async {
            // Dates render as ISO whatever the server's default.
            sqlx::query!("set datestyle = 'ISO, YMD'")
                .execute(&mut *conn)
                .await?;
            let mut rows = conn.copy_out_raw(&copy_statement(job_id)).await?;
            let mut chunk = BytesMut::with_capacity(CHUNK);
            while let Some(row) = rows.try_next().await? {
                chunk.extend_from_slice(&row);
                if chunk.len() >= CHUNK && tx.send(Ok(chunk.split().freeze())).await.is_err() {
                    // The reader left mid-COPY: never hand a connection in that state back.
                    drop(rows);
                    conn.close_on_drop();
                    return Ok(());
                }
            }
            if !chunk.is_empty() {
                let _ = tx.send(Ok(chunk.freeze())).await;
            }
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = copied {
            tracing::warn!(job = job_id, error = %e, "streaming a settlement CSV failed");
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}
