//! The daily schedule: the previous day's settlement is enqueued exactly once, however many
//! worker processes run, restart or are killed with SIGKILL. The clock is real: `schedule.at`
//! is set a few seconds ahead, in a zone where it is around noon, so no day boundary falls
//! inside the test.

mod common;

use std::time::Duration;

use chrono::{Days, NaiveDate, Timelike, Utc};
use chrono_tz::Tz;
use common::processes::{WorkerProcess, wait_for};
use common::{migrated_pool, test_config};
use sqlx::PgPool;

/// A fixed-offset zone in which it is now between 12:00 and 13:00 (`Etc/GMT-5` is UTC+5).
fn zone_around_noon() -> Tz {
    let offset = 12 - Utc::now().hour() as i32;
    let name = match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    name.parse().expect("an Etc/GMT zone")
}

/// The scheduled settlements' days (`from` = `to`), one entry per job, in day order.
async fn settlement_days(pool: &PgPool) -> Vec<NaiveDate> {
    sqlx::query_scalar(
        "select (args ->> 'from')::date from all_jobs
         where kind = 'settlement' and args ->> 'from' = args ->> 'to'
         order by 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn wait_for_day(pool: &PgPool, day: NaiveDate, within: Duration) {
    wait_for(within, &format!("a settlement of {day}"), || async {
        settlement_days(pool).await.contains(&day).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_killed_and_restarted_enqueue_each_day_once() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    let zone = zone_around_noon();
    let now = Utc::now().with_timezone(&zone);
    let at = (now + chrono::Duration::seconds(8))
        .format("%H:%M:%S")
        .to_string();
    let env = [
        ("SETTLE_SCHEDULE__ENABLED", "true".to_owned()),
        ("SETTLE_SCHEDULE__AT", at),
        ("SETTLE_SCHEDULE__TIME_ZONE", zone.name().to_owned()),
        ("SETTLE_SCHEDULE__CHECK_INTERVAL_MS", "200".to_owned()),
    ];
    let today = now.date_naive();
    let (yesterday, before) = (today - Days::new(1), today - Days::new(2));
    let start = || WorkerProcess::start_with(&config, &env);

    // Before `at`: the workers catch up the most recent day due, the day before yesterday.
    let mut workers: Vec<WorkerProcess> = (0..3).map(|_| start()).collect();
    wait_for_day(&pool, before, Duration::from_secs(30)).await;
    // One dies without a word and comes back; the others keep looking at the clock.
    workers.remove(0).kill().await;
    workers.push(start());
    wait_for_day(&pool, yesterday, Duration::from_secs(30)).await;
    workers.remove(0).kill().await;
    workers.push(start());
    // Every worker has looked several times since (check interval 200 ms).
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(settlement_days(&pool).await, [before, yesterday]);
    let runs: Vec<(NaiveDate, i64)> =
        sqlx::query_as("select day, job_id from scheduled_runs order by day")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        [before, yesterday]
    );
    for (day, job_id) in runs {
        let from: String = sqlx::query_scalar("select args ->> 'from' from all_jobs where id = $1")
            .bind(job_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            from,
            day.to_string(),
            "scheduled_runs points at the day's job"
        );
    }
    for worker in &mut workers {
        assert!(worker.is_running(), "{}", worker.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_enqueues_of_one_day_make_one_job() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    let day: NaiveDate = "2025-01-01".parse().unwrap();
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { settle::schedule::enqueue_once(&pool, day, 5).await })
        })
        .collect();
    let mut enqueued = Vec::new();
    for racer in racers {
        enqueued.extend(racer.await.unwrap().unwrap());
    }
    assert_eq!(enqueued.len(), 1, "{enqueued:?}");
    assert_eq!(settlement_days(&pool).await, [day]);
    let again = settle::schedule::enqueue_once(&pool, day, 5).await.unwrap();
    assert_eq!(again, None);
}

/// Workers back after days with none running enqueue each missed day since the last one the
/// schedule enqueued, up to `schedule.catch_up_days` of the most recent, and name the older
/// ones in a warning. Before, only the most recent due day was enqueued: the others were lost
/// without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_back_after_days_down_catch_up_the_missed_days() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    let zone = zone_around_noon();
    let today = Utc::now().with_timezone(&zone).date_naive();
    let day = |back: u64| today - Days::new(back);
    // The last day enqueued before the downtime: six days ago.
    settle::schedule::enqueue_once(&pool, day(6), 5)
        .await
        .unwrap();
    let env = [
        ("SETTLE_SCHEDULE__ENABLED", "true"),
        // Struck this morning: yesterday is due.
        ("SETTLE_SCHEDULE__AT", "06:00"),
        ("SETTLE_SCHEDULE__TIME_ZONE", zone.name()),
        ("SETTLE_SETTLEMENT__TIME_ZONE", zone.name()),
        ("SETTLE_SCHEDULE__CATCH_UP_DAYS", "3"),
        ("SETTLE_SCHEDULE__CHECK_INTERVAL_MS", "200"),
    ];
    let env = env.map(|(key, value)| (key, value.to_owned()));
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start_with(&config, &env))
        .collect();
    wait_for_day(&pool, day(1), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(
        settlement_days(&pool).await,
        [day(6), day(3), day(2), day(1)]
    );
    let logs: String = workers.iter().map(WorkerProcess::log_text).collect();
    let named = format!("from={} to={}", day(5), day(4));
    assert!(
        logs.contains("missed days not caught up") && logs.contains(&named),
        "{logs}"
    );
}
