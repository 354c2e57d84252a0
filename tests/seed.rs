//! `settle seed`: the same arguments and seed load the same rows, within the asked shape, and
//! leave the table analyzed.

mod common;

use common::proxy::Proxy;
use settle::seed::{self, SeedArgs};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

fn args(seed: u64) -> SeedArgs {
    SeedArgs {
        products: 2,
        transactions: 120_000,
        days: 7,
        merchants: 40,
        seed,
        connections: 2,
        quiet: true,
        ..SeedArgs::demo()
    }
}

/// A database seeded with `seed`, and the guard that drops it.
async fn seeded(seed: u64) -> (PgPool, common::TestDatabase) {
    let (pool, database) = common::migrated_pool(&common::test_config(&[])).await;
    seed::run(&pool, &args(seed)).await.expect("seed loads");
    (pool, database)
}

async fn fingerprint(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "select md5(string_agg(concat_ws(',', id, merchant_id, amount_cents, fee_cents, status,
                                         paid_at), ';' order by id))
         from transactions",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_same_seed_loads_the_same_rows_in_the_asked_shape() {
    let ((a, _a), (b, _b), (other, _other)) = (seeded(7).await, seeded(7).await, seeded(8).await);
    assert_eq!(fingerprint(&a).await, fingerprint(&b).await);
    assert_ne!(fingerprint(&a).await, fingerprint(&other).await);

    let (rows, merchants, first, last, max_id): (i64, i64, String, String, i64) = sqlx::query_as(
        "select count(*), count(distinct merchant_id),
                min(paid_at at time zone 'UTC')::date::text,
                max(paid_at at time zone 'UTC')::date::text, max(id)
         from transactions",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert_eq!((rows, max_id), (120_000, 120_000));
    assert!(merchants <= 40 && merchants > 30, "{merchants}");
    assert_eq!(
        (first.as_str(), last.as_str()),
        ("2025-01-01", "2025-01-07")
    );
    let products = common::scalar(&a, "select count(*) from products").await;
    assert_eq!(products, 2);
    // ANALYZE writes reltuples into pg_class in its own transaction (the statistics views are
    // updated asynchronously); a table never analyzed or vacuumed has -1.
    let analyzed: bool = sqlx::query_scalar(
        "select reltuples > 100000 from pg_class where oid = 'transactions'::regclass",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert!(analyzed, "seed leaves the transactions analyzed");

    // A second load appends after the first, with fresh ids.
    seed::run(&a, &args(9)).await.unwrap();
    let (rows, distinct_ids): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct id) from transactions")
            .fetch_one(&a)
            .await
            .unwrap();
    assert_eq!((rows, distinct_ids), (240_000, 240_000));
}

/// More COPY streams than the pool has connections: each stream has a connection of its own,
/// so none waits for a pooled one (and times out, with part of the load committed).
#[tokio::test]
async fn more_streams_than_pooled_connections_load_everything() {
    let (pool, _db) = common::migrated_pool(&common::test_config(&[])).await;
    let one = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(200))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let three_streams = SeedArgs {
        transactions: 300_000,
        connections: 3,
        ..args(5)
    };
    seed::run(&one, &three_streams).await.expect("seed loads");
    let rows = common::scalar(&pool, "select count(*) from transactions").await;
    assert_eq!(rows, 300_000);
}

/// A statement needing a lock that conflicts with the load's (an index build) arrives while
/// the streams are still connecting: it queues behind the load's id reservation, and the
/// streams' COPY behind it, while the reservation waits for the streams. The streams give up
/// after their lock timeout, the load fails and commits nothing, and the index is built:
/// nothing waits for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_queued_behind_the_load_fails_it_instead_of_hanging() {
    let (pool, _db) = common::migrated_pool(&common::test_config(&[])).await;
    let proxy = Proxy::start(&common::server_address()).await;
    let name = pool.connect_options().get_database().unwrap().to_owned();
    let through = PgPoolOptions::new()
        .max_connections(1)
        .connect(&proxy.url(&name))
        .await
        .unwrap();
    proxy.delay_later_connections(Duration::from_secs(2));
    let index = async {
        let reserved = "select count(*) from pg_locks l join pg_stat_activity a using (pid)
                        where a.datname = current_database()
                          and l.relation = 'transactions'::regclass and l.granted
                          and l.mode = 'RowExclusiveLock' and a.state = 'idle in transaction'";
        common::processes::wait_for(Duration::from_secs(30), "the reservation", || async {
            (common::scalar(&pool, reserved).await > 0).then_some(())
        })
        .await;
        sqlx::query("create index seed_conflict on transactions (fee_cents)")
            .execute(&pool)
            .await
    };
    let load = args(6);
    let both = async { tokio::join!(seed::run(&through, &load), index) };
    let (loaded, indexed) = tokio::time::timeout(Duration::from_secs(60), both)
        .await
        .expect("the load and the index build both end");
    assert!(loaded.is_err(), "the load gives up");
    indexed.expect("the index is built");
    let rows = common::scalar(&pool, "select count(*) from transactions").await;
    assert_eq!(rows, 0);
}

/// Arguments that cannot load are refused before anything is written; no transactions at all
/// load the products alone.
#[tokio::test]
async fn a_load_outside_the_tables_bounds_writes_nothing_and_none_loads_products_only() {
    let (pool, _db) = common::migrated_pool(&common::test_config(&[])).await;
    let far = SeedArgs {
        start: chrono::NaiveDate::from_ymd_opt(9999, 12, 25).unwrap(),
        ..args(1)
    };
    let err = format!("{:#}", seed::run(&pool, &far).await.unwrap_err());
    assert!(err.contains("--start and --days"), "{err}");
    // Hundreds of COPY streams would take every connection the server allows.
    let crowd = SeedArgs {
        connections: 1000,
        ..args(1)
    };
    let err = format!("{:#}", seed::run(&pool, &crowd).await.unwrap_err());
    assert!(err.contains("--connections must be 1 to 64"), "{err}");
    let written = common::scalar(
        &pool,
        "select (select count(*) from products) + (select count(*) from transactions)",
    )
    .await;
    assert_eq!(written, 0);

    let none = SeedArgs {
        transactions: 0,
        ..args(1)
    };
    let report = seed::run(&pool, &none).await.expect("products alone load");
    assert_eq!(report.first_id, None);
    assert_eq!(
        common::scalar(&pool, "select count(*) from products").await,
        2
    );
    assert_eq!(
        common::scalar(&pool, "select count(*) from transactions").await,
        0
    );
}
