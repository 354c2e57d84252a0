//! The listener: one LISTEN connection for the worker, on two channels. A NOTIFY on
//! [`JOBS_CHANNEL`] (jobs inserted or released) wakes the claim loops; one on
//! [`cancel::CANCEL_CHANNEL`] fires the stop token of the job it names, if this worker holds it.
//! Notifications are only a shortcut: the claim loops also poll, and a missed cancel is still
//! seen at the job's next checkpoint or heartbeat, so a lost connection delays, never loses.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::pause;
use crate::cancel;
use crate::runtime::{JOBS_CHANNEL, Shared};

/// Listens until shutdown, reconnecting (and waking the claim loops) after a lost connection.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut listener: Option<PgListener> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return;
        }
        let Some(active) = listener.as_mut() else {
            match connect(&shared.pool).await {
                Ok(l) => {
                    listener = Some(l);
                    // Notifications may have been missed while disconnected.
                    shared.caps.hint();
                    shared.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN; polling until reconnected");
                    pause(&shared.shutdown, Duration::from_secs(1)).await;
                }
            }
            continue;
        };
        let received = tokio::select! {
            r = active.try_recv() => r,
            () = shared.shutdown.cancelled() => return,
        };
        match received {
            Ok(Some(n)) if n.channel() == cancel::CANCEL_CHANNEL => {
                if let Ok(id) = n.payload().parse::<i64>()
                    && let Some(held) = shared.held.lock().expect("held map").get(&id)
                {
                    held.stop.cancel();
                }
            }
            Ok(Some(_)) => {
                shared.caps.hint();
                shared.wake.notify_one();
            }
            // The connection dropped; sqlx reconnects on the next call.
            Ok(None) => {
                shared.caps.hint();
                shared.wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed");
                listener = None;
                pause(&shared.shutdown, Duration::from_secs(1)).await;
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([JOBS_CHANNEL, cancel::CANCEL_CHANNEL])
        .await?;
    Ok(listener)
}
