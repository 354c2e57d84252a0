//! The worker process. Until the queue lands it connects, checks the schema, and idles until
//! shutdown, so `settle worker` and `docker compose --scale worker=N` already behave.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub async fn run(
    pool: PgPool,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        concurrency = config.worker.concurrency,
        "worker started; no job kinds yet"
    );
    shutdown.cancelled().await;
    pool.close().await;
    Ok(())
}
