//! A cancel that lands while a settlement is in its final step (replacing `settlements` in the
//! batch that completes the job) still ends the job CANCELLED, and `settlements` keeps exactly
//! the rows it had. The test holds the advisory lock finalize takes on `settlements`, so the
//! job is provably inside its completing transaction when the cancel is requested.

mod common;

use std::time::Duration;

use chrono_tz::Tz;
use common::ops::settling_app;
use common::processes::{wait_for, wait_state};
use common::settlement as support;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use support::{day, settlements};

const LOCK: &str = "hashtextextended('settle:settlements', 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_finalize_ends_cancelled_and_leaves_settlements_as_they_were() {
    let (app, worker) = settling_app(50, 2).await;
    let days = (day("2025-01-01"), day("2025-01-03"));
    // Rows to keep, and new input that a completed second job would show.
    let (before, all) = support::settled_then_more(&app, (21, 1500), (22, 1500), 4).await;
    let mut holder = SettlementsLock::hold(&app.config.database.url).await;
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    holder.wait_for_a_waiter(&app.pool).await;
    let (status, body) = app.cancel(id).await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("CANCELLING")),
        "{body}"
    );
    holder.release().await;

    wait_state(&app.pool, id, "cancelled").await;
    assert_eq!(settlements(&app.pool, days.0, days.1).await, before);
    let (processed, total) = support::progress(&app.pool, id).await;
    let within = support::paid_within(&all, "2025-01-01", "2025-01-03", Tz::UTC);
    assert_eq!(processed, within, "it was cancelled after all its batches");
    // The total it started with: the count, or where it counted as it read, a bound.
    assert!(total.is_some_and(|total| processed <= total), "{total:?}");
    support::assert_left_nothing(&app.pool, id).await;
    worker.stop().await;
}

/// A session holding the advisory lock finalize takes on `settlements`, so a job that reaches
/// its final step provably waits inside its completing transaction.
struct SettlementsLock {
    conn: PgConnection,
    pid: i32,
}

impl SettlementsLock {
    async fn hold(url: &str) -> Self {
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "select pg_advisory_lock({LOCK})"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        Self { conn, pid }
    }

    /// Waits until some session (finalize) is blocked on the lock.
    async fn wait_for_a_waiter(&self, pool: &PgPool) {
        wait_for(
            Duration::from_secs(60),
            "finalize waiting for the settlements lock",
            || async {
                let waiting: bool = sqlx::query_scalar(
                    "select exists (select 1 from pg_stat_activity
                                    where $1 = any(pg_blocking_pids(pid)))",
                )
                .bind(self.pid)
                .fetch_one(pool)
                .await
                .unwrap();
                waiting.then_some(())
            },
        )
        .await;
    }

    async fn release(&mut self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "select pg_advisory_unlock({LOCK})"
        )))
        .execute(&mut self.conn)
        .await
        .unwrap();
    }
}
