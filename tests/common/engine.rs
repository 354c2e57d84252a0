//! The settlement steps' harness for `settlement_engine.rs`: a migrated database with the
//! settlement settings of a test, and the steps driven the way the queue drives them (each
//! batch in its own committed transaction, parts concurrently).

use futures::TryStreamExt;
use serde_json::json;
use settle::settlement::plan::{self, Plan};
use settle::settlement::{DateRange, Settings, SettleError, Zone};
use settle::settlement::{finalize, input, parts, results};
use sqlx::PgPool;

use super::settlement::{self, day, parse_csv, settlements};

pub struct Db {
    pub pool: PgPool,
    pub settings: Settings,
    /// Drops the database with this `Db`.
    _database: super::TestDatabase,
}

pub async fn db(zone: &str, parts: u32, batch_size: i64) -> Db {
    let config = super::test_config(&[
        ("settlement.time_zone", json!(zone)),
        ("settlement.parallel_parts", json!(parts)),
    ]);
    let (pool, database) = super::migrated_pool(&config).await;
    Db {
        pool,
        settings: Settings::new(&config.settlement, batch_size),
        _database: database,
    }
}

pub fn range(from: &str, to: &str) -> DateRange {
    DateRange::new(day(from), day(to), 366).unwrap()
}

impl Db {
    /// The `settlements` rows of the days `from..=to`.
    pub async fn settled(&self, from: &str, to: &str) -> settlement::Settled {
        settlements(&self.pool, day(from), day(to)).await
    }

    pub async fn start(&self, job: i64, range: DateRange) -> Plan {
        let bounds = plan::high_water_mark(&self.pool).await.unwrap();
        self.plan(job, range, Some(bounds)).await
    }

    /// The plan as `plan::start` returns it with `bounds` (`None`: the run is stored already,
    /// so no high-water mark is drawn, which would wait for the writers in flight).
    async fn plan(&self, job: i64, range: DateRange, bounds: Option<plan::Mark>) -> Plan {
        let mut tx = self.pool.begin().await.unwrap();
        let plan = plan::start(&mut tx, job, range, &self.settings, 0, bounds)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        plan
    }

    /// Runs every part concurrently, each batch committed on its own; stops each part after
    /// `limit` batches when given. Returns the plan as committed.
    pub async fn batches(&self, plan: &Plan, limit: Option<usize>) -> Plan {
        let mut tasks = tokio::task::JoinSet::new();
        for part in plan.parts.clone() {
            let (pool, plan, batch) = (self.pool.clone(), plan.clone(), self.settings.batch_size);
            tasks.spawn(async move {
                let mut part = part;
                let mut done = 0;
                while !part.is_done() && limit.is_none_or(|l| done < l) {
                    let mut tx = pool.begin().await.unwrap();
                    part = parts::process_batch(&mut tx, &plan, &part, batch)
                        .await
                        .unwrap();
                    // The batch planned with the aggregation's settings and its own.
                    let settings: (String, String, String) = sqlx::query_as(
                        "select current_setting('work_mem'),
                                current_setting('max_parallel_workers_per_gather'),
                                current_setting('enable_sort')",
                    )
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                    assert_eq!(settings, ("64MB".into(), "0".into(), "off".into()));
                    tx.commit().await.unwrap();
                    done += 1;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        self.plan(plan.run.job_id, plan.range(), None).await
    }

    /// Finalizes and commits; returns the job's CSV as the download streams it.
    pub async fn finalize(&self, plan: &Plan) -> Result<String, SettleError> {
        finalize_on(&self.pool, plan).await
    }

    /// Runs the plan's batches one by one, then finalizes; returns the first error.
    pub async fn run_until_error(&self, plan: &Plan) -> Option<SettleError> {
        let mut done = plan.clone();
        for part in &mut done.parts {
            while !part.is_done() {
                let mut tx = self.pool.begin().await.unwrap();
                match parts::process_batch(&mut tx, plan, part, self.settings.batch_size).await {
                    Ok(next) => *part = next,
                    Err(e) => return Some(e),
                }
                tx.commit().await.unwrap();
            }
        }
        self.finalize(&done).await.err()
    }

    pub async fn run(&self, job: i64, range: DateRange) -> String {
        let plan = self.start(job, range).await;
        let plan = self.batches(&plan, None).await;
        self.assert_read_all(&plan).await;
        self.finalize(&plan).await.unwrap()
    }

    /// The parts read exactly the plan's input, counted here by the job's time bound over the
    /// whole table (not by its id span or its parts), within the total it started with (a count
    /// or a bound). The bound holds exactly the days' rows but where the clocks go back across
    /// midnight; the sums keep only the days' own rows either way.
    pub async fn assert_read_all(&self, plan: &Plan) {
        let zone = Zone::parse(&plan.run.time_zone).expect("the run's zone");
        let input: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from transactions where id <= $1 and {}",
            input::paid_within(zone, "$2", "$3")
        )))
        .bind(plan.run.high_water_id)
        .bind(plan.run.from_date)
        .bind(plan.run.to_date)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(plan.processed(), input);
        assert!(plan.processed() <= plan.run.total, "{plan:?}");
    }
}

/// How long an in-process reader of a stored CSV may take nothing (it reads at once).
pub const READER_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// A job's stored CSV, read the way `GET /downloads/{id}.csv` streams it.
pub async fn download(pool: &PgPool, job: i64) -> String {
    let rows = results::stored_csv(pool.acquire().await.unwrap(), job, READER_STALL)
        .await
        .unwrap();
    let chunks: Vec<_> = rows.try_collect().await.unwrap();
    String::from_utf8(chunks.concat()).unwrap()
}

pub fn csv(text: &str) -> settlement::Settled {
    parse_csv(text)
}

/// [`Db::finalize`] on a pool of the test's database (for a finalize spawned beside others).
pub async fn finalize_on(pool: &PgPool, plan: &Plan) -> Result<String, SettleError> {
    let mut tx = pool.begin().await.unwrap();
    let rows = finalize::finalize(&mut tx, plan).await?;
    // The rest of the completing transaction (the queue's own statements) plans as usual.
    let planner: (String, String) =
        sqlx::query_as("select current_setting('enable_nestloop'), current_setting('enable_sort')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(planner, ("on".into(), "on".into()));
    tx.commit().await?;
    let csv = download(pool, plan.run.job_id).await;
    assert_eq!(csv.lines().count() as u64, rows + 1, "{csv}");
    Ok(csv)
}
