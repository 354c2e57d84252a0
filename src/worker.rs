//! The worker process: maps `[worker]` config onto the settle-workers runtime, registers the
//! job kinds (settlement; the queue's probe kinds only with `worker.test_kinds`), runs the daily
//! schedule when `schedule.enabled`, and runs until shutdown (stop claiming, checkpoint,
//! release, exit).

use std::sync::Arc;
use std::time::Duration;

use settle_workers::{Registry, Worker, WorkerSettings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WorkerConfig};

/// The runtime settings for `config`.
pub fn settings(config: &WorkerConfig) -> WorkerSettings {
    let lease = Duration::from_millis(config.lease_ms);
    WorkerSettings {
        concurrency: config.concurrency,
        claim_batch: config.claim_batch,
        lease,
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        poll_interval: Duration::from_millis(config.poll_interval_ms),
        rescue_probe: Duration::from_millis(config.rescue_probe_ms),
        rescue_grace: Duration::from_millis(config.rescue_grace_ms),
        backoff_base: Duration::from_millis(config.backoff_base_ms),
        backoff_max: Duration::from_millis(config.backoff_max_ms),
        max_transient_retries: config.max_transient_retries,
        job_timeout: Duration::from_millis(config.job_timeout_ms),
        kind_timeouts: config
            .timeouts
            .iter()
            .map(|(kind, &ms)| (kind.clone(), Duration::from_millis(ms)))
            .collect(),
        // Validated at least 1.
        kind_concurrency: config
            .kinds
            .iter()
            .map(|(kind, k)| (kind.clone(), k.concurrency as usize))
            .collect(),
        retention: Some(Duration::from_secs(config.retention_hours * 3600)),
        retention_interval: Duration::from_millis(config.retention_interval_ms),
        shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
        vacuum_dead_rows: config.vacuum_dead_rows,
        vacuum_interval: Duration::from_millis(config.vacuum_interval_ms),
    }
}

/// The job kinds a worker on `config` runs, and so the only ones it claims: settlement, plus
/// the probe kinds of [`crate::jobs`] when `worker.test_kinds` is on.
pub fn registry(config: &Config) -> Registry {
    let mut registry = if config.worker.test_kinds {
        crate::jobs::registry(config.worker.batch_size)
    } else {
        Registry::new()
    };
    crate::settlement::job::register(&mut registry, config);
    registry
}

/// [`registry`], refusing a configuration whose per-kind settings name a kind it does not
/// hold: a misspelt kind would be ignored without a word. `serve` checks before it starts
/// anything, so its API never runs without its workers.
pub fn checked_registry(config: &Config) -> anyhow::Result<Registry> {
    let registry = registry(config);
    let known = registry.kinds();
    let w = &config.worker;
    if let Some(kind) = w
        .kinds
        .keys()
        .chain(w.timeouts.keys())
        .find(|k| !known.contains(&k.as_str()))
    {
        anyhow::bail!(
            "worker.kinds / worker.timeouts name the kind `{kind}`, which this worker does not \
             run (it runs {})",
            known.join(", ")
        );
    }
    Ok(registry)
}

pub async fn run(
    pool: PgPool,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = checked_registry(&config)?;
    let keys = tokio::spawn(crate::idempotency::prune_periodically(
        pool.clone(),
        Duration::from_millis(config.idempotency.prune_interval_ms),
        shutdown.clone(),
    ));
    let schedule = crate::schedule::Schedule::from_config(&config)
        .map(|s| tokio::spawn(crate::schedule::run(pool.clone(), s, shutdown.clone())));
    Worker::new(pool.clone(), settings(&config.worker), registry)
        .run(shutdown)
        .await;
    let _ = keys.await;
    if let Some(schedule) = schedule {
        let _ = schedule.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use figment::providers::Serialized;

    use super::*;

    #[test]
    fn probe_kinds_are_registered_only_when_asked_for() {
        let config = Config::from_figment(Config::defaults()).unwrap();
        assert_eq!(registry(&config).kinds(), ["settlement"]);
        let figment = Config::defaults().merge(Serialized::default("worker.test_kinds", true));
        let config = Config::from_figment(figment).unwrap();
        let registry = registry(&config);
        let kinds = registry.kinds();
        assert!(
            kinds.contains(&crate::settlement::job::KIND)
                && kinds.contains(&crate::jobs::kind::NOOP),
            "{kinds:?}"
        );
    }
}
