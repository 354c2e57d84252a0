//! A database created by the previous release (migrations 0001–0007) migrates forward to this
//! one without losing anything: its transactions get their legacy external ids, its settlement
//! rows stay (as the oldest input snapshot), and a CSV its jobs wrote to the results directory
//! is still served.

mod common;

use std::sync::Arc;

use serde_json::json;
use settle::http::AppState;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The migrations of the previous release, applied from a copy of their files.
async fn migrate_previous_release(pool: &PgPool) {
    let dir = std::env::temp_dir().join(format!("settle-0007-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.as_str() <= "0007_~" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    assert_eq!(migrator.iter().count(), 7);
    migrator.run(pool).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the previous release would have stored: transactions, a completed settlement with its
/// CSV file, its rows in `settlements`. Returns the job's id.
async fn previous_release_data(pool: &PgPool, results_dir: &std::path::Path) -> i64 {
    sqlx::query(
        "insert into transactions (merchant_id, amount_cents, fee_cents, status, paid_at)
         values ('m-1', 1000, 30, 'PAID', '2025-01-01T10:00:00Z'),
                ('m-1', 500, 10, 'PAID', '2025-01-01T11:00:00Z'),
                ('m-2', 700, 0, 'PENDING', '2025-01-01T12:00:00Z')",
    )
    .execute(pool)
    .await
    .unwrap();
    let job = common::scalar(
        pool,
        "insert into jobs (kind, args, state, finished_at, result)
         values ('settlement', '{\"from\": \"2025-01-01\", \"to\": \"2025-01-01\"}', 'completed',
                 now(), jsonb_build_object('download_url', '/downloads/1.csv'))
         returning id",
    )
    .await;
    sqlx::query(
        "insert into settlements
             (merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, job_id)
         values ('m-1', '2025-01-01', 1500, 40, 1460, 2, $1)",
    )
    .bind(job)
    .execute(pool)
    .await
    .unwrap();
    std::fs::create_dir_all(results_dir).unwrap();
    std::fs::write(
        results_dir.join(format!("{job}.csv")),
        "merchant_id,date,gross_cents,fee_cents,net_cents,txn_count\nm-1,2025-01-01,1500,40,1460,2\n",
    )
    .unwrap();
    job
}

#[tokio::test]
async fn a_previous_release_database_migrates_forward_without_losing_anything() {
    let config = Arc::new(common::test_config(&[]));
    let _db = common::TestDatabase::new(&config.database.url);
    settle::db::create_database_if_missing(&config.database.url)
        .await
        .unwrap();
    let old = PgPool::connect(&config.database.url).await.unwrap();
    migrate_previous_release(&old).await;
    let job = previous_release_data(&old, &config.settlement.results_dir).await;
    old.close().await;

    // This release's `serve`/`migrate`: the remaining migrations apply on top.
    let pool = settle::cli::open(&config, true).await.unwrap();
    let ids: Vec<(i64, String)> =
        sqlx::query_as("select id, external_id from transactions order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(ids.len(), 3);
    for (id, external) in &ids {
        assert_eq!(external, &format!("legacy-{id}"));
    }
    let kept: (i64, i64, i64) =
        sqlx::query_as("select gross_cents, txn_count, snapshot_id from settlements")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kept, (1500, 2, 0));

    let listener = settle::http::bind(&config).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let state = AppState::new(pool.clone(), config.clone());
    tokio::spawn(settle::http::serve(listener, state, shutdown.clone()));
    let token = common::auth::create_token(&pool, settle::tokens::Role::Admin, None).await;
    let http = common::auth::client_with(&token);
    let csv = http
        .get(format!("{base}/downloads/{job}.csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(
        csv.text().await.unwrap(),
        "merchant_id,date,gross_cents,fee_cents,net_cents,txn_count\nm-1,2025-01-01,1500,40,1460,2\n"
    );
    // New transactions ingest beside the legacy ones.
    let posted = http
        .post(format!("{base}/api/v1/transactions"))
        .json(
            &json!({"merchant_id": "m-1", "external_id": "ch_new", "amount_cents": 5,
                      "fee_cents": 0, "status": "PAID", "paid_at": "2025-01-02T00:00:00Z"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    shutdown.cancel();
    pool.close().await;
}

/// Two processes migrating one new database at once (an `api` and a `worker` both with
/// `database.migrate_on_start`) both succeed: the one that waits does not hold a snapshot the
/// other's `create index concurrently` (migration 0014) would wait for, which Postgres reports
/// as a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrators_at_once_both_succeed() {
    let config = common::test_config(&[]);
    let _db = common::TestDatabase::new(&config.database.url);
    let name = settle::db::connect_options(&config.database.url)
        .unwrap()
        .get_database()
        .unwrap()
        .to_owned();
    let server = PgPool::connect(&common::server_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&server)
        .await
        .unwrap();
    let migrate = || {
        let url = config.database.url.clone();
        async move {
            let pool = PgPool::connect(&url).await.unwrap();
            settle::db::migrate(&pool).await
        }
    };
    let (first, second) = tokio::join!(migrate(), migrate());
    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
}
