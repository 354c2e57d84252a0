//! Real `settle worker` processes against a test database, for the queue tests: started with
//! the test's config passed as `SETTLE_*` variables, signalled with real signals, logs kept in
//! a file per process for post-mortems.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use settle::config::{Config, WorkerConfig};
use settle::jobs::kind;
use sqlx::PgPool;
use tokio::process::{Child, Command};

/// Worker settings for a test that outlives a lease on purpose: `lease_ms` and `heartbeat_ms` as
/// given, the shutdown grace at its most (half the lease, as in `config.toml`) and a 200 ms poll,
/// so a job freed when its lease ends is taken again soon after.
pub fn short_lease(lease_ms: u64, heartbeat_ms: u64) -> Vec<(&'static str, Value)> {
    vec![
        ("worker.lease_ms", json!(lease_ms)),
        ("worker.heartbeat_ms", json!(heartbeat_ms)),
        ("worker.shutdown_grace_ms", json!(lease_ms / 2)),
        ("worker.poll_interval_ms", json!(200)),
    ]
}

/// Environment of a worker that vacuums `jobs` past 1,000 dead rows, checking every 100 ms.
pub fn eager_vacuum() -> [(&'static str, String); 2] {
    [
        ("SETTLE_WORKER__VACUUM_DEAD_ROWS", "1000".into()),
        ("SETTLE_WORKER__VACUUM_INTERVAL_MS", "100".into()),
    ]
}

/// A running `settle worker` child; killed when dropped.
pub struct WorkerProcess {
    child: Child,
    pub pid: i32,
    pub log: std::path::PathBuf,
}

/// Every `[worker]` key of `w` as a `SETTLE_WORKER__<KEY>` variable (nested tables one level
/// further each: per-kind timeouts as `SETTLE_WORKER__TIMEOUTS__<KIND>`, per-kind caps as
/// `SETTLE_WORKER__KINDS__<KIND>__CONCURRENCY`), so a worker process runs with the test's
/// settings.
fn worker_env(w: &WorkerConfig) -> Vec<(String, String)> {
    let mut env = Vec::new();
    flatten_env(
        "SETTLE_WORKER",
        serde_json::to_value(w).expect("[worker] as JSON"),
        &mut env,
    );
    env
}

/// `value` as variables named `prefix` (a leaf) or `prefix__<KEY>…` (a table).
fn flatten_env(prefix: &str, value: Value, env: &mut Vec<(String, String)>) {
    match value {
        Value::Object(keys) => {
            for (key, value) in keys {
                flatten_env(&format!("{prefix}__{}", key.to_uppercase()), value, env);
            }
        }
        value => env.push((prefix.to_owned(), value.to_string())),
    }
}

impl Drop for WorkerProcess {
    /// The log goes with the process (`kill_on_drop`), unless the test is failing: its
    /// messages quote it, and the file stays for a closer look.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl WorkerProcess {
    /// Starts `settle worker` on `config`'s database with its `[worker]` settings.
    pub fn start(config: &Config) -> Self {
        Self::start_with(config, &[])
    }

    /// As [`WorkerProcess::start`], with extra environment variables.
    pub fn start_with(config: &Config, env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "settle-worker-{}-{}.log",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("worker log file");
        let mut command = Command::from(super::settle_command());
        command
            .arg("worker")
            .env("SETTLE_DATABASE__URL", &config.database.url)
            .env(
                "SETTLE_DATABASE__MAX_CONNECTIONS",
                config.database.max_connections.to_string(),
            )
            .env("SETTLE_LOG", "warn,settle=info,settle_workers=info")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        command.envs(worker_env(&config.worker));
        // The queue tests' probe kinds (noop, count, …); settlement is always registered.
        command.env("SETTLE_WORKER__TEST_KINDS", "true");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn settle worker");
        let pid = child.id().expect("worker pid") as i32;
        Self { child, pid, log }
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid), signal).expect("signal worker");
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait (up to 60 s) for the graceful exit; returns whether it exited 0.
    pub async fn terminate(&mut self) -> bool {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("worker exits within 60 s of SIGTERM")
            .expect("wait for worker");
        status.success()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The worker's log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Polls `check` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times a session (a worker, not autovacuum) vacuumed `jobs`.
pub async fn jobs_vacuums(pool: &PgPool) -> i64 {
    super::scalar(
        pool,
        "select vacuum_count from pg_stat_user_tables where relname = 'jobs'",
    )
    .await
}

/// Waits up to `timeout` for a worker's vacuum of `jobs`.
pub async fn wait_for_jobs_vacuum(pool: &PgPool, timeout: Duration) {
    wait_for(timeout, "a vacuum of jobs", || async {
        (jobs_vacuums(pool).await > 0).then_some(())
    })
    .await;
}

/// A job's state (`queued`, `running`, …).
pub async fn job_state(pool: &PgPool, id: i64) -> String {
    job_row::<(String,)>(pool, id, "state::text").await.0
}

/// `columns` (a select list) of job `id`, e.g. `job_row::<(i32, i64)>(pool, id, "attempt,
/// fence")`.
pub async fn job_row<T>(pool: &PgPool, id: i64, columns: &str) -> T
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    // Dynamic: the test names the columns it reads.
    let sql = format!("select {columns} from all_jobs where id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("job row")
}

/// (state, attempt, started_at) of a job: whether and how often it was started.
pub async fn job_start(pool: &PgPool, id: i64) -> (String, i32, Option<DateTime<Utc>>) {
    job_row(pool, id, "state::text, attempt, started_at").await
}

/// Waits (up to 60 s) until job `id` is in `state`.
pub async fn wait_state(pool: &PgPool, id: i64, state: &str) {
    wait_for(
        Duration::from_secs(60),
        &format!("job {id} to be {state}"),
        || async { (job_state(pool, id).await == state).then_some(()) },
    )
    .await;
}

/// A job's committed progress (`processed`).
pub async fn processed(pool: &PgPool, id: i64) -> i64 {
    job_row::<(i64,)>(pool, id, "processed").await.0
}

/// Waits (up to `timeout`) until job `id` has committed at least `at_least` rows of progress;
/// returns the progress seen.
pub async fn wait_processed(pool: &PgPool, id: i64, at_least: i64, timeout: Duration) -> i64 {
    wait_for(timeout, &format!("{at_least} rows processed"), || async {
        let p = processed(pool, id).await;
        (p >= at_least).then_some(p)
    })
    .await
}

/// Enqueues one job in its own transaction and returns its id.
pub async fn enqueue(pool: &PgPool, kind: &str, args: serde_json::Value, max_attempts: i32) -> i64 {
    let mut conn = pool.acquire().await.expect("connection");
    settle_workers::enqueue(
        &mut conn,
        &settle_workers::NewJob::new(kind, args).max_attempts(max_attempts),
    )
    .await
    .expect("enqueue")
}

/// A `noop` job put straight into `state` (as stored: `running`, `failed`, …): started once
/// unless queued, held by a worker `elsewhere` while running or cancelling, finished now (and
/// moved to `finished_jobs`, as an ending moves it) once ended. For what the API answers per
/// state, without running anything.
pub async fn job_in_state(pool: &PgPool, state: &str) -> i64 {
    let id = enqueue(pool, kind::NOOP, serde_json::json!({}), 3).await;
    let sql = if ["completed", "failed", "cancelled"].contains(&state) {
        "with ended as (delete from jobs where id = $1 returning *)
         insert into finished_jobs (id, kind, args, state, attempt, max_attempts, started_at,
                                    finished_at, created_at)
         select id, kind, args, $2::job_state, 1, max_attempts, now(), now(), created_at
         from ended"
    } else {
        "update jobs set state = $2::job_state,
             attempt = case when $2 = 'queued' then 0 else 1 end,
             started_at = case when $2 <> 'queued' then now() end,
             lease_owner = case when $2 <> 'queued' then 'elsewhere' end,
             lease_expires_at = case when $2 <> 'queued' then now() + interval '1 hour' end
         where id = $1"
    };
    sqlx::query(sql)
        .bind(id)
        .bind(state)
        .execute(pool)
        .await
        .expect("job state set");
    id
}

/// (counted, batches) of a count job's effect row; (0, 0) before its first batch.
pub async fn counted(pool: &PgPool, id: i64) -> (i64, i32) {
    sqlx::query_as("select counted, batches from queue_probe_counts where job_id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or((0, 0))
}

/// The `count` a finished count job reported in its result: what its batches counted.
pub async fn reported_count(pool: &PgPool, id: i64) -> Option<i64> {
    sqlx::query_scalar("select (result ->> 'count')::bigint from all_jobs where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("job result")
}

/// Creates the probe tables the test job kinds write to.
pub async fn probe_tables(pool: &PgPool) {
    settle::jobs::create_probe_tables(pool)
        .await
        .expect("probe tables");
}

/// [`super::migrated_pool`] with the probe tables: the database of a queue test.
pub async fn probe_pool(config: &Config) -> (PgPool, super::TestDatabase) {
    let (pool, database) = super::migrated_pool(config).await;
    probe_tables(&pool).await;
    (pool, database)
}

/// Enqueues a `count` job (5 attempts) counting `1..=upto` in batches of `batch`, each batch
/// sleeping `sleep_ms` before it commits; returns its id.
pub async fn enqueue_count(pool: &PgPool, upto: i64, batch: i64, sleep_ms: u64) -> i64 {
    let args = serde_json::json!({"upto": upto, "batch": batch, "sleep_ms": sleep_ms});
    enqueue(pool, kind::COUNT, args, 5).await
}

/// Waits (up to 60 s) until the job has committed some progress but less than half; returns
/// its progress then.
pub async fn wait_mid_way(pool: &PgPool, id: i64) -> i64 {
    wait_for(Duration::from_secs(60), "progress mid-way", || async {
        let (processed, total): (i64, Option<i64>) =
            sqlx::query_as("select processed, total from all_jobs where id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
        (processed > 0 && total.is_some_and(|t| processed < t / 2)).then_some(processed)
    })
    .await
}
