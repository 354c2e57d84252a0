//! A database created by the previous release (migrations 0001–0007) migrates forward to this
//! one without losing anything: its transactions get their legacy external ids, its settlement
//! rows stay (as the oldest input snapshot), and a CSV its jobs wrote to the results directory
//! is still served.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::processes::wait_for;
use serde_json::json;
use settle::http::AppState;
use sqlx::migrate::Migration;
use sqlx::{Connection, PgConnection, PgPool};
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
    let _db = empty_database(&config.database.url).await;
    let migrate = || {
        let url = config.database.url.clone();
        async move {
            let pool = PgPool::connect(&url).await.unwrap();
            settle::db::migrate(&pool, LOCK_TIMEOUT).await
        }
    };
    let (first, second) = tokio::join!(migrate(), migrate());
    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
}

/// How long the tests' migrations wait for a lock.
const LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// Creates the (empty) database `url` names, dropped with the guard.
async fn empty_database(url: &str) -> common::TestDatabase {
    let guard = common::TestDatabase::new(url);
    let options = settle::db::connect_options(url).unwrap();
    let name = options.get_database().unwrap();
    let server = PgPool::connect(&common::server_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&server)
        .await
        .unwrap();
    guard
}

/// A pool on the database `url` names, migrated up to `next` (which must hold `statement`, the
/// step the test stages) and no further.
async fn migrated_up_to(url: &str, next: &Migration, statement: &str) -> PgPool {
    let sql = next.sql.as_str();
    assert!(sql.contains(statement), "{sql}");
    let pool = PgPool::connect(url).await.unwrap();
    let migrator = &settle::db::MIGRATOR;
    migrator.run_to(next.version - 1, &pool).await.unwrap();
    pool
}

/// A migration that needs a table's lock while a long transaction holds it gives way after
/// `database.migration_lock_timeout_ms` instead of queueing every reader of that table behind
/// that transaction (the upgrade review saw 0023 wait 17 s behind a bulk load, with ingestion
/// queued behind it), and is tried again until it gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waiting_for_a_lock_gives_way_to_the_tables_readers() {
    let config = common::test_config(&[]);
    let url = config.database.url.clone();
    let _db = empty_database(&url).await;
    let last = settle::db::MIGRATOR.iter().last().unwrap();
    let pool = migrated_up_to(&url, last, "alter table settlement_reads").await;
    let long = common::held_open(&pool, &["select count(*) from settlement_reads"]).await;

    let migrating = tokio::spawn(async move {
        let pool = PgPool::connect(&url).await.unwrap();
        settle::db::migrate(&pool, LOCK_TIMEOUT).await
    });
    // (Any waiter: the migration's text in pg_stat_activity is cut before its statement.)
    common::wait_for_lock_waiter(&pool, "").await;
    // A reader arriving while the migration waits waits at most its lock timeout: none
    // queues behind it for the whole of the long transaction.
    let options = settle::db::connect_options(&config.database.url).unwrap();
    let mut reader = PgConnection::connect_with(&options.options([("statement_timeout", "1000")]))
        .await
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        sqlx::query("select count(*) from settlement_reads")
            .execute(&mut reader)
            .await
            .expect("a reader of the table is not held up behind the waiting migration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if migrating.is_finished() {
        panic!("migrated while the lock was held: {:?}", migrating.await);
    }

    long.commit().await.unwrap();
    migrating.await.unwrap().unwrap();
    assert_eq!(settle::db::pending_migrations(&pool).await.unwrap(), 0);
}

/// `settle migrate` killed while migration 0014's `create index concurrently` waits for an
/// old snapshot: the server ends the build (the session checks its client), leaving the
/// index invalid, and the next migrate drops it and builds it again. (Before, the build went
/// on without its client to a valid index that no migration record names, or left an invalid
/// one: every later try failed with "relation … already exists", upgrade review #5.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrate_killed_mid_index_build_is_built_again_by_the_next() {
    let config = common::test_config(&[]);
    let url = config.database.url.clone();
    let _db = empty_database(&url).await;
    let build = settle::db::MIGRATOR.iter().find(|m| m.no_tx).unwrap();
    let statement = "create index concurrently transactions_paid_bucket_id_idx";
    let pool = migrated_up_to(&url, build, statement).await;
    // An old snapshot: the build's last phase waits for it.
    let mut old = PgConnection::connect(&url).await.unwrap();
    for statement in ["begin isolation level repeatable read", "select 1"] {
        sqlx::query(statement).execute(&mut old).await.unwrap();
    }
    let mut migrate = common::settle_command()
        .arg("migrate")
        .env("SETTLE_DATABASE__URL", &url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let building = "select count(*) from pg_stat_progress_create_index
                    where datname = current_database()";
    wait_for(Duration::from_secs(60), "the index build", || async {
        (common::scalar(&pool, building).await > 0).then_some(())
    })
    .await;
    migrate.kill().unwrap();
    migrate.wait().unwrap();
    wait_for(Duration::from_secs(30), "the build's end", || async {
        (common::scalar(&pool, building).await == 0).then_some(())
    })
    .await;
    sqlx::query("commit").execute(&mut old).await.unwrap();
    let valid = "select indisvalid from pg_index
                 where indexrelid = 'transactions_paid_bucket_id_idx'::regclass";
    let valid = || sqlx::query_scalar::<_, bool>(valid).fetch_one(&pool);
    assert!(!valid().await.unwrap());

    settle::db::migrate(&pool, LOCK_TIMEOUT).await.unwrap();
    assert!(valid().await.unwrap());
    let definition: String =
        sqlx::query_scalar("select pg_get_indexdef('transactions_paid_bucket_id_idx'::regclass)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(definition.contains("date_bin"), "{definition}");
}

/// `api` and `worker` (and `/readyz`) refuse a database that applied a migration from an
/// edited file, as `settle migrate` does, rather than run on a schema they do not know.
#[tokio::test]
async fn a_database_migrated_from_an_edited_file_is_refused() {
    let config = common::test_config(&[]);
    let _db = empty_database(&config.database.url).await;
    let pool = PgPool::connect(&config.database.url).await.unwrap();
    settle::db::migrate(&pool, LOCK_TIMEOUT).await.unwrap();
    settle::db::ensure_migrated(&pool).await.unwrap();
    sqlx::query("update _sqlx_migrations set checksum = sha384('edited') where version = 3")
        .execute(&pool)
        .await
        .unwrap();
    let refused = settle::db::ensure_migrated(&pool).await;
    assert!(
        matches!(refused, Err(settle::db::DbError::Edited { version: 3 })),
        "{refused:?}"
    );
}

/// Migrations are append-only: sqlx checks every applied migration's checksum before it applies
/// anything, so a file edited after some database applied it leaves that database unable to
/// migrate ever again ("migration N was previously applied but has been modified"), as the
/// upgrade review found for databases migrated at commits whose 0018 or 0023 was later edited.
/// Each file's checksum (sha384 of its text) is pinned here when the file is added; a new
/// migration adds its line, and an edit fails this test.
#[test]
fn a_migration_once_added_is_never_edited() {
    let pinned: &[(i64, &str)] = &[
        (
            1,
            "e21067395d843a84da77bfeb0b66efab52dcc6b3c4ba916d5b1b05ad901f48211ea4f8c15f7fa40ea028ccd77d8ef92b",
        ),
        (
            2,
            "ddafbd48322735d88c041ba6995f824cb1892de935e6de32709b29d2e9598b4dac40cb7d2b7490b794d4cff85f0f7f48",
        ),
        (
            3,
            "049a34ca046d480039a3bad00ecb043a66d220350d3c55d0ae2279b91adf6bcafea94786ee19c123fd839d48a5ef00b3",
        ),
        (
            4,
            "c70f4265b59b3d6e38fd874348bef890bc0b0de4386f61e104ee9449cfef1b962aeff2d40caac64b2321725d3115b559",
        ),
        (
            5,
            "2ff5271e58bffb8ad7493d45d5c6b70d605bb1ebc2e3d8902fb2ce9ad4ec7bae137a6dcb8c82fb72ec59804dc9ac5087",
        ),
        (
            6,
            "44ce4a9d3949df52e5501fb6db995d729899462614d0db19e092cdce839b1a3a2f0c0c77b0cf7add306ff0e2583de717",
        ),
        (
            7,
            "fed04572e37e9e483576dbf202f82708f0f873affc49b1b42cfb233a67008dd8981c199bac28db7a4fcd1025a9a3cfb9",
        ),
        (
            8,
            "b597006381004a511375b736e6e910bdc2d1abf932f38702073c5767369bf4020faa4186bfa93bd581cf7b2a32ff7efe",
        ),
        (
            9,
            "6a694ab15bd2a306a22ed3f123091f65fba41bf4c690fe09517e742ac35265be0337addec8e572afcce3c0a2d05ec7d7",
        ),
        (
            10,
            "e36e4d7be045fa79badba149933b9ef706ec985a1a7fba2caeed08480762d0d7ae514714459f61ef7a3a0725f7f0640b",
        ),
        (
            11,
            "0665f1cea3cedaba8b739b697f9435feabe0c55f1775249899aee32f613cbfa14fd7750977512f3ff5366f2defab39d8",
        ),
        (
            12,
            "57228f8f3af755bc9755550c1f7a098e2e5aea8047cd118514077352bc9777ad11c40dc3966e3cff0d071c09ab42d353",
        ),
        (
            13,
            "5c4ce38695cfbdec8050b343c2e5aa6a1417296f2313d6368004394e34051cd2a0f8c99b27cfc4ad422e7d5f2f68815f",
        ),
        (
            14,
            "77a22b4aca626ab0b09b7822a96702ab240f700bc2881afd4f777c09555196e092df62eaf34400f0d30dd0349270a11c",
        ),
        (
            15,
            "857efdd144e832b222ec90f8b34a1f1fd85af4268575c2c1b9e375ada1c771bc0d547eed1c4cf82b58d6f3fb4002963a",
        ),
        (
            16,
            "e0eedcb8f5e3c9ff24b16f41dbaaaf316d1686e4a57e6ec2f242bf4d877a4ea729d362128476670f8eefe7101c7eb85f",
        ),
        (
            17,
            "ff7e63bf088435dec475cdb45b7d832321fa383dfcc9648990348360d551c342bf3808433257ec811b4bf470af82708a",
        ),
        (
            18,
            "4cb9da6eb76a9ac9925d34ef9eaf51db4237e0655d88c2508633498aea5344d4f57972ab11ba7ed60b45ade851ccd807",
        ),
        (
            19,
            "03622f908f69a2726255ca16110eb7b332a8218315bdb1a759f0d79a2715ae10ed4226ea26857edbd55c095f4b578b31",
        ),
        (
            20,
            "4fccb89d07be7675bac829b1bcdf0b03ef1776b152fc2288b4f472a83d96a781186943c8f1242329a3ee7256a48a9114",
        ),
        (
            21,
            "dff54394cbc0ce24d4b6a2a92a07b965892ee41a6b7884fee269bd76bcc34773a60ef8a8cce0d2fbff380b0d1f4276c4",
        ),
        (
            22,
            "51be1f71a801be30ca6d5c1e66fe33cf9454470f69ddac829601e74d380d191960780fdb34ffe5a8c55462ef45833b25",
        ),
        (
            23,
            "2a1310552ecf12575acd7af01bce8214f5ec0f6797d5c73053f87176937144562fbf7873f02744c218623bdc6b0fdf3a",
        ),
        (
            24,
            "77e0588ea86eed446ee3a746c68745825e8537ea13c7bb75352fd9006d37529aaa0d798d21cc1d4e9e81ff133d101cb2",
        ),
    ];
    let embedded: Vec<(i64, String)> = settle::db::MIGRATOR
        .iter()
        .map(|m| (m.version, hex::encode(&*m.checksum)))
        .collect();
    let pinned: Vec<(i64, String)> = pinned.iter().map(|(v, h)| (*v, (*h).to_owned())).collect();
    assert_eq!(embedded, pinned);
}
