//! Retention: finished jobs past their age (with their settlement results) and expired
//! idempotency keys are deleted; live jobs, recent jobs and live keys are not; only one worker
//! prunes jobs at a time.

mod common;

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A transaction of another session that has run `sql` (taking a lock) and stays open.
async fn hold(pool: &PgPool, sql: &'static str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    tx
}

#[tokio::test]
async fn finished_jobs_past_retention_are_pruned_and_nothing_else() {
    let config = common::test_config(&[]);
    let (pool, _db) = common::migrated_pool(&config).await;
    // Two old finished jobs, one recent finished job, one old job still queued.
    sqlx::query(
        "insert into finished_jobs (kind, args, state, finished_at, created_at) values
             ('noop', '{}', 'completed', now() - interval '10 days', now() - interval '10 days'),
             ('noop', '{}', 'failed', now() - interval '9 days', now() - interval '9 days'),
             ('noop', '{}', 'cancelled', now() - interval '1 hour', now() - interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("insert into jobs (kind, args, created_at) values ('noop', '{}', now() - interval '30 days')")
        .execute(&pool)
        .await
        .unwrap();
    // Results of an old job and of the recent one: they go with their job, or stay with it.
    sqlx::query(
        "insert into settlement_results
             (job_id, merchant_id, date, gross_cents, fee_cents, net_cents, txn_count)
         select id, 'm', '2025-01-01', 1, 0, 1, 1 from finished_jobs
         where state in ('completed', 'cancelled')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);

    // While another session holds the pruner's lock, this worker prunes nothing.
    let holder = hold(&pool, "select pg_advisory_xact_lock(6806942347142627329)").await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        settle_workers::retention::prune(&mut conn, week, &CancellationToken::new())
            .await
            .unwrap(),
        0
    );
    holder.rollback().await.unwrap();

    assert_eq!(
        settle_workers::retention::prune(&mut conn, week, &CancellationToken::new())
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        common::scalar(&pool, "select count(*) from all_jobs").await,
        2
    );
    assert_eq!(
        common::scalar(
            &pool,
            "select count(*) from settlement_results r join all_jobs j on j.id = r.job_id
             where j.state = 'cancelled'"
        )
        .await,
        1
    );
    assert_eq!(
        common::scalar(&pool, "select count(*) from settlement_results").await,
        1
    );
    assert_eq!(
        common::scalar(
            &pool,
            "select count(*) from all_jobs where state in ('queued', 'cancelled')"
        )
        .await,
        2
    );
}

/// A migrated database holding an `orders` key per `(key, expiry)`, the expiry SQL added to
/// `now()`.
async fn with_keys(keys: &[(&str, &str)]) -> (PgPool, common::TestDatabase) {
    let config = common::test_config(&[]);
    let (pool, db) = common::migrated_pool(&config).await;
    for (key, expiry) in keys {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into idempotency_keys
                 (scope, key, request, response_status, response_body, expires_at)
             values ('orders', $1, '{{}}', 201, '{{}}', now() {expiry})"
        )))
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
    }
    (pool, db)
}

#[tokio::test]
async fn expired_idempotency_keys_are_pruned_and_live_ones_kept() {
    let (pool, _db) = with_keys(&[
        ("old", "- interval '1 second'"),
        ("live", "+ interval '1 hour'"),
    ])
    .await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        settle::idempotency::prune_expired(&mut conn, &CancellationToken::new())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        common::scalar(
            &pool,
            "select count(*) from idempotency_keys where key = 'live'"
        )
        .await,
        1
    );
    assert_eq!(
        common::scalar(&pool, "select count(*) from idempotency_keys").await,
        1
    );
}

/// A prune that meets an expired key just as a request renews it (the renewing transaction
/// commits while the prune waits for the row) deletes nothing: the key's new answer must stay
/// to be replayed.
#[tokio::test]
async fn a_key_renewed_while_the_prune_waits_for_it_is_kept() {
    let (pool, _db) = with_keys(&[("reused", "- interval '1 second'")]).await;
    let key = settle::idempotency::IdempotencyKey::parse("orders", "reused").unwrap();
    let (request, body) = (serde_json::json!({"n": 2}), serde_json::json!({"id": 2}));
    let record = settle::idempotency::Record {
        key: &key,
        request: &request,
        status: 201,
        body: &body,
    };
    let mut renewing = pool.begin().await.unwrap();
    settle::idempotency::store_all(&mut renewing, &[record], 24)
        .await
        .unwrap();
    let prune = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            settle::idempotency::prune_expired(&mut conn, &CancellationToken::new())
                .await
                .unwrap()
        }
    });
    common::wait_for_lock_waiter(&pool, "delete from idempotency_keys").await;
    renewing.commit().await.unwrap();
    assert_eq!(prune.await.unwrap(), 0);
    let kept = common::scalar(
        &pool,
        "select count(*) from idempotency_keys where expires_at > now() and response_body = '{\"id\": 2}'",
    )
    .await;
    assert_eq!(kept, 1);
}

/// Ranges of `finished_jobs` that no vacuum has summarized match every prune's index scan; the
/// prune summarizes them (autovacuum's `autosummarize` does nothing where autovacuum is off),
/// and a vacuum holding the table's lock delays that, never the prune.
#[tokio::test]
async fn a_prune_summarizes_the_finished_jobs_it_has_not_seen() {
    let config = common::test_config(&[]);
    let (pool, _db) = common::migrated_pool(&config).await;
    let fill = "insert into finished_jobs (kind, args, state, finished_at, created_at)
                select 'noop', '{}', 'completed', now() - interval '10 days', now()
                from generate_series(1, 5000)";
    let unsummarized = "select brin_summarize_new_values('finished_jobs_finished_at_idx')::int8";
    let week = Duration::from_secs(7 * 24 * 3600);
    sqlx::query(fill).execute(&pool).await.unwrap();

    // As a vacuum would, another session holds SHARE UPDATE EXCLUSIVE: the prune still deletes.
    let vacuum = hold(
        &pool,
        "lock table finished_jobs in share update exclusive mode",
    )
    .await;
    let mut conn = pool.acquire().await.unwrap();
    let pruned = settle_workers::retention::prune(&mut conn, week, &CancellationToken::new()).await;
    assert_eq!(pruned.unwrap(), 5000);
    vacuum.rollback().await.unwrap();

    sqlx::query(fill).execute(&pool).await.unwrap();
    settle_workers::retention::prune(&mut conn, week, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        common::scalar(&pool, unsummarized).await,
        0,
        "left for the next vacuum"
    );
}

/// Only the owner of `finished_jobs`' index may summarize it: a worker connecting as another
/// role (granted what pruning needs) still prunes, without the summaries.
#[tokio::test]
async fn a_worker_that_does_not_own_the_table_still_prunes() {
    let config = common::test_config(&[]);
    let (pool, _db) = common::migrated_pool(&config).await;
    let role = format!("{}_pruner", pool.connect_options().get_database().unwrap());
    for sql in [
        format!("create role {role}"),
        format!("grant select, delete on finished_jobs, settlement_results to {role}"),
        "insert into finished_jobs (kind, args, state, finished_at, created_at)
         select 'noop', '{}', 'completed', now() - interval '10 days', now()
         from generate_series(1, 100)"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("set role {role}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    let pruned = settle_workers::retention::prune(&mut conn, week, &CancellationToken::new()).await;
    conn.detach();
    let cleanup = format!("drop owned by {role}; drop role {role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(cleanup))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(pruned.unwrap(), 100);
}

/// A backlog larger than one statement's batch (10,000) goes in one prune, jobs and keys alike
/// (one batch a minute fell behind a queue or keyed traffic of about 170 a second); a prune
/// asked to stop (a shutdown) ends after the batch it is in.
#[tokio::test]
async fn a_backlog_past_one_batch_is_pruned_in_one_pass() {
    let (pool, _db) = with_keys(&[]).await;
    for backlog in [
        "insert into finished_jobs (kind, args, state, finished_at, created_at)
         select 'noop', '{}', 'completed', now() - interval '10 days', now() - interval '10 days'
         from generate_series(1, 25000)",
        "insert into idempotency_keys
             (scope, key, request, response_status, response_body, expires_at)
         select 'orders', 'k' || n, '{}', 201, '{}', now() - interval '1 second'
         from generate_series(1, 25000) as n",
    ] {
        sqlx::query(backlog).execute(&pool).await.unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    let stopped = CancellationToken::new();
    stopped.cancel();
    for (stop, each) in [(stopped, 10_000), (CancellationToken::new(), 15_000)] {
        let jobs = settle_workers::retention::prune(&mut conn, week, &stop).await;
        let keys = settle::idempotency::prune_expired(&mut conn, &stop).await;
        assert_eq!((jobs.unwrap(), keys.unwrap()), (each, each));
    }
}
