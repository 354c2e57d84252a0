//! Where a settlement job reads its batches: the primary, or a streaming replica
//! (`database.read_url`) so the heavy scans leave the primary to orders and the queue.
//!
//! A job fixes its input on the primary (the high-water mark, the window and the parts). Before
//! its parts read on the replica, [`Reads::ready`] takes the primary's current WAL position and
//! waits until the replica has replayed past it, so every row of the input (committed before
//! the mark was read) is visible there; each batch checks again on its own connection
//! ([`Replica::begin`]) and reads on the primary where that server is behind. The batches'
//! sums, cursors and checkpoints are written to the primary, so a resumed job sees them
//! wherever it reads. A replica that does not answer or lags past
//! `database.read_max_wait_ms` costs nothing but the wait: that run of the job reads on the
//! primary and says so in the log.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::config::DatabaseConfig;

/// How often [`Reads::ready`] looks whether the replica has caught up.
const REPLAY_POLL: Duration = Duration::from_millis(10);

/// The replica's pool, if one is configured.
#[derive(Debug, Clone, Default)]
pub struct Reads {
    replica: Option<PgPool>,
    max_wait: Duration,
    batch_timeout: Duration,
}

impl Reads {
    /// Reads on the primary only.
    pub fn primary() -> Self {
        Self::default()
    }

    /// The replica of `config.read_url`, connected lazily (a worker starts even while it is
    /// down), with at most `connections` of its own.
    pub fn new(config: &DatabaseConfig, connections: u32) -> Self {
        let replica = config.read_url.as_deref().and_then(|url| {
            let options = crate::db::connect_options(url)
                .inspect_err(|e| tracing::warn!(error = %e, "database.read_url is unusable"))
                .ok()?;
            Some(
                PgPoolOptions::new()
                    .max_connections(connections.max(1))
                    .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
                    .connect_lazy_with(options),
            )
        });
        Self {
            replica,
            max_wait: Duration::from_millis(config.read_max_wait_ms),
            batch_timeout: Duration::from_millis(config.read_batch_timeout_ms),
        }
    }

    /// Where job `job_id`'s batches read from now: the replica once it has replayed everything
    /// the `primary` committed so far, the job's run as claim `fence` stored it included, or
    /// `None` (read on the primary) when no replica is configured, or it does not catch up
    /// within the wait.
    pub async fn ready(
        &self,
        primary: &PgPool,
        job_id: i64,
        fence: i64,
    ) -> Result<Option<Replica>, sqlx::Error> {
        let Some(replica) = &self.replica else {
            return Ok(None);
        };
        // The insert position, not the write position: with asynchronous commit an input
        // row's commit record can be inserted and not yet written.
        let target: String =
            sqlx::query_scalar!(r#"select pg_current_wal_insert_lsn()::text as "lsn!""#)
                .fetch_one(primary)
                .await?;
        let replica = Replica {
            pool: replica.clone(),
            input_lsn: target,
            job_id,
            fence,
            batch_timeout: self.batch_timeout,
        };
        let caught_up = tokio::time::timeout(self.max_wait, replica.wait_for_replay());
        match caught_up.await {
            Ok(Ok(())) => Ok(Some(replica)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the read replica failed: reading on the primary");
                Ok(None)
            }
            Err(_) => {
                tracing::warn!(
                    lsn = %replica.input_lsn,
                    wait_ms = self.max_wait.as_millis() as u64,
                    "the read replica has not replayed the job's input: reading on the primary"
                );
                Ok(None)
            }
        }
    }
}

/// The replica a job reads its batches on, the WAL position of its input, and the job's run as
/// its claim stored it.
#[derive(Debug, Clone)]
pub struct Replica {
    pool: PgPool,
    input_lsn: String,
    job_id: i64,
    fence: i64,
    batch_timeout: Duration,
}

impl Replica {
    /// A transaction on the replica for one batch, if the server it reaches has replayed the
    /// job's input; `None`: read this batch on the primary. Checked for every batch, since each
    /// opens its own connection: `read_url` may lead to several standbys (a load balancer, a
    /// round-robin name) or, after a failover, to one further behind than the one
    /// [`Reads::ready`] waited on, where a batch would silently miss rows of its input.
    pub async fn begin(&self) -> Result<Option<Transaction<'static, Postgres>>, sqlx::Error> {
        let mut reader = self.pool.begin().await?;
        if self.replayed(&mut reader).await? {
            return Ok(Some(reader));
        }
        reader.rollback().await?;
        tracing::debug!(
            lsn = %self.input_lsn,
            "a replica connection is behind the job's input: this batch reads on the primary"
        );
        Ok(None)
    }

    /// How long a batch may read on the replica (`database.read_batch_timeout_ms`), a second
    /// more than the server's own limit on it: a replica gone silent must not hold the job.
    pub fn batch_limit(&self) -> Duration {
        self.batch_timeout + Duration::from_secs(1)
    }

    /// Returns once the replica has replayed the job's input.
    async fn wait_for_replay(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        while !self.replayed(&mut conn).await? {
            tokio::time::sleep(REPLAY_POLL).await;
        }
        Ok(())
    }

    /// Whether the server behind `conn` holds the job's input: it has replayed the primary's
    /// WAL up to the input's position (a server not in recovery, the primary itself, has), and
    /// it shows the job's run as this claim stored it, which the primary committed after the
    /// input. A promoted replica no longer receives the primary's commits: it shows neither
    /// the run of a job fixed since, nor the input that job must read.
    async fn replayed(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(
            // The batch's transaction ends its statements past the batch timeout, on the
            // server: a read given up on does not run on.
            r#"select (not pg_is_in_recovery()
                       or coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false))
                      and exists (select from settlement_runs where job_id = $2 and fence = $3)
                      and set_config('statement_timeout', $4, true) is not null
                      as "replayed!""#,
            self.input_lsn,
            self.job_id,
            self.fence,
            self.batch_timeout.as_millis().to_string(),
        )
        .fetch_one(conn)
        .await
    }
}
