//! The pruner: now and then deletes finished jobs past the retention age, so the jobs table
//! keeps a bounded history. Every worker tries, at a jittered interval; the advisory lock in
//! [`retention::prune`] lets only one of them prune at a time.

use std::sync::Arc;
use std::time::Duration;

use super::pause;
use crate::db::on_conn;
use crate::retention;
use crate::runtime::Shared;

/// Prunes every retention interval (plus up to a second of jitter) until shutdown;
/// returns at once when retention is off.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(retention) = shared.settings.retention else {
        return;
    };
    loop {
        let jitter = Duration::from_millis(rand::random_range(0..1000));
        pause(
            &shared.shutdown,
            shared.settings.retention_interval + jitter,
        )
        .await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        let pruned = on_conn(&shared.pool, async |conn| {
            retention::prune(conn, retention, &shared.shutdown).await
        })
        .await;
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "pruned finished jobs past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning failed"),
        }
    }
}
