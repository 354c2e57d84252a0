//! Operating jobs from the tests: an in-process worker that stops when its guard drops, and the
//! retry endpoint.

use serde_json::json;
use settle::config::Config;
use settle_workers::Worker;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::TestApp;

/// A worker runtime in this process on the app's database and config; stopped when dropped.
pub struct InProcessWorker {
    pub owner: String,
    stop: CancellationToken,
    running: Option<JoinHandle<()>>,
}

impl InProcessWorker {
    /// Stops the worker and waits for its graceful exit (panicking if its task panicked).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(running) = self.running.take() {
            running.await.expect("the worker runtime exits cleanly");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a worker with the kinds `app.config` registers (settlement, plus the probe kinds when
/// `worker.test_kinds` is on).
pub fn start_worker(app: &TestApp) -> InProcessWorker {
    start_worker_on(&app.config, &app.pool)
}

/// An app and a worker in this process settling in batches of `batch_size` rows over
/// `parallel_parts` parts: small numbers make a settlement long enough to catch mid-way.
pub async fn settling_app(batch_size: i64, parallel_parts: i64) -> (TestApp, InProcessWorker) {
    let app = super::spawn_app_with(&[
        ("worker.batch_size", json!(batch_size)),
        ("settlement.parallel_parts", json!(parallel_parts)),
    ])
    .await;
    let worker = start_worker(&app);
    (app, worker)
}

/// [`start_worker`] on any test database and its config.
pub fn start_worker_on(config: &Config, pool: &PgPool) -> InProcessWorker {
    let worker = Worker::new(
        pool.clone(),
        settle::worker::settings(&config.worker),
        settle::worker::registry(config),
    );
    let owner = worker.owner().to_owned();
    let stop = CancellationToken::new();
    let running = Some(tokio::spawn(worker.run(stop.clone())));
    InProcessWorker {
        owner,
        stop,
        running,
    }
}

impl TestApp {
    /// `POST /api/v1/jobs/{id}/retry`: status and body.
    pub async fn retry(&self, id: i64) -> (u16, serde_json::Value) {
        self.post(&format!("/api/v1/jobs/{id}/retry"), &json!({}))
            .await
    }

    /// `POST /api/v1/jobs/{id}/cancel`: status and body.
    pub async fn cancel(&self, id: i64) -> (u16, serde_json::Value) {
        self.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
            .await
    }
}

/// `settle <args>` on the app's database, as an operator runs it: no API, no token. Returns
/// (success, stdout, stderr).
pub fn settle_cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    settle_cli_with(app, &[], args)
}

/// [`settle_cli`] with the variables `env` set as well (configuration keys, say).
pub fn settle_cli_with(
    app: &TestApp,
    env: &[(&str, &str)],
    args: &[&str],
) -> (bool, String, String) {
    let output = super::settle_command()
        .args(args)
        .envs(env.iter().copied())
        .env("SETTLE_DATABASE__URL", &app.config.database.url)
        .env("SETTLE_LOG", "warn")
        .output()
        .expect("run settle");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
