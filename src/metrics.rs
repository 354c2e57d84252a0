//! Prometheus metrics: the process's recorder, the names settle records under, and the queue
//! gauges read from the database at scrape time.
//!
//! Counters and histograms are recorded where things happen, through the `metrics` facade:
//! orders and HTTP requests here (called from `http/` and `orders/`), jobs in `settle-workers`.
//! They go to one recorder per process, installed on first use ([`Metrics::new`]): the facade's
//! recorder is process-global, and the worker crate records from any task on any thread, which
//! only a global recorder sees (a `with_local_recorder` scope is one thread's, for one closure).
//! So in `serve` one `/metrics` shows the API's and the workers' series, and a `settle worker`
//! process serves its own on `worker.metrics_addr`.
//!
//! The queue gauges (`settle_jobs`, `settle_job_oldest_queued_seconds`) describe the database,
//! not the process: each scrape renders them from one statement ([`settle_workers::stats`])
//! into a recorder of its own, so no stale series lingers and two apps in one process (tests)
//! never mix their databases. Scrapes within [`QUEUE_MAX_AGE`] share one reading.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use settle_workers::JobState;
use settle_workers::stats::{self, StateCount};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::config::MAX_ORDER_BATCH;

pub const ORDERS: &str = "settle_orders_total";
pub const ORDER_BATCH_SIZE: &str = "settle_order_batch_size";
pub const HTTP_REQUESTS: &str = "settle_http_requests_total";
pub const HTTP_DURATION: &str = "settle_http_request_duration_seconds";
pub const JOBS: &str = "settle_jobs";
pub const OLDEST_QUEUED: &str = "settle_job_oldest_queued_seconds";

/// How old a reading of the queue gauges may be when a scrape reuses it.
pub const QUEUE_MAX_AGE: Duration = Duration::from_secs(1);

/// How long a scrape waits for a reading of the queue gauges (a connection and the statement):
/// past it the scrape is answered without them, and the failure is reused as a reading is, so
/// scrapes arriving meanwhile do not each wait again (a stalled database made them queue, 5 s
/// each, the later ones past a scraper's timeout).
const QUEUE_READ_LIMIT: Duration = Duration::from_secs(2);

/// How often histograms are drained when nobody scrapes (`run_upkeep`), bounding their memory.
const UPKEEP: Duration = Duration::from_secs(5);

/// How an order ended, as `settle_orders_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderOutcome {
    Placed,
    OutOfStock,
    /// Refused before a decision: a malformed, mistyped or too large body, no JSON content
    /// type, an invalid quantity or buyer, an unknown product, an Idempotency-Key misused.
    Rejected,
    /// Failed with no decision known: not placed, outcome unknown, unavailable, abandoned
    /// (timed out or its client gone) before a decision was taken.
    Error,
}

impl OrderOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::OutOfStock => "out_of_stock",
            Self::Rejected => "rejected",
            Self::Error => "error",
        }
    }

    /// What an order's answer of `status` says, as sent or as stored under its key: 409 is
    /// `OUT_OF_STOCK` there (a key in use is never stored nor sent as a success).
    pub fn of_answer(status: u16) -> Self {
        match status {
            200..=299 => Self::Placed,
            409 => Self::OutOfStock,
            400..=499 => Self::Rejected,
            _ => Self::Error,
        }
    }
}

/// One order's count in `settle_orders_total`, taken once whoever takes it: the request's
/// handler and whatever decides the order (its coalesced batch, its placement task) share it,
/// and the first count stands. A decision is counted where it commits, before its answer is
/// sent, so it stands whether or not the client hears it; the handler's count of its answer
/// then counts only what no decision did. An order dropped by everyone without a count (its
/// request timed out or its client hung up before anything decided it) is an error.
#[derive(Debug, Clone, Default)]
pub struct OrderCount(Arc<Counted>);

#[derive(Debug, Default)]
struct Counted(AtomicBool);

impl OrderCount {
    /// Counts the order as `outcome` unless it was counted already. `None` takes the count
    /// without counting: a keyed retry answered with an earlier request's order, or told that
    /// request is still in flight, is that request's order, which it counts.
    pub fn count(&self, outcome: Option<OrderOutcome>) {
        if !self.0.0.swap(true, Ordering::Relaxed)
            && let Some(outcome) = outcome
        {
            order(outcome);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if !*self.0.get_mut() {
            order(OrderOutcome::Error);
        }
    }
}

/// Makes every order outcome's series exist at 0 before its first order (an API starting), so
/// an alert on one's rate or absence has a series from the start.
pub fn orders_at_zero() {
    for outcome in [
        OrderOutcome::Placed,
        OrderOutcome::OutOfStock,
        OrderOutcome::Rejected,
        OrderOutcome::Error,
    ] {
        counter!(ORDERS, "outcome" => outcome.as_str()).increment(0);
    }
}

fn order(outcome: OrderOutcome) {
    counter!(ORDERS, "outcome" => outcome.as_str()).increment(1);
}

/// Records how many orders one coalesced transaction placed or refused together (not those
/// answered from their key alone).
pub fn order_batch(size: usize) {
    histogram!(ORDER_BATCH_SIZE).record(size as f64);
}

/// Records one answered HTTP request. `route` is the matched path template (or a fixed label
/// for no route), `method` one of a fixed set: the label sets stay bounded whatever is asked.
pub fn http_request(method: &'static str, route: String, status: u16, took: Duration) {
    counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(),
        "status" => status.to_string())
    .increment(1);
    histogram!(HTTP_DURATION, "route" => route).record(took.as_secs_f64());
}

/// The handle to the process's recorder and this app's queue gauges.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    queue: Arc<Mutex<Option<(Instant, QueueReading)>>>,
}

/// A reading of the queue gauges: their text, or why there is none.
type QueueReading = Result<String, String>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Installs the process's recorder on first call; later calls share it.
    pub fn new() -> Self {
        Self {
            handle: process_handle(),
            queue: Arc::default(),
        }
    }

    /// The process's series in the Prometheus text format.
    pub fn render_process(&self) -> String {
        self.handle.render()
    }

    /// The process's series and the queue gauges of `pool`'s database. If the database cannot
    /// be read, the queue gauges are left out (and a warning logged): the process's own series
    /// matter most while the database is in trouble.
    pub async fn render(&self, pool: &PgPool) -> String {
        let mut text = self.render_process();
        match self.queue_gauges(pool).await {
            Ok(queue) => text.push_str(&queue),
            Err(e) => tracing::warn!(error = %e, "cannot read the queue for /metrics"),
        }
        text
    }

    /// The last reading if younger than [`QUEUE_MAX_AGE`], else a new one, given at most
    /// [`QUEUE_READ_LIMIT`]. Concurrent scrapes wait for one reading rather than each running
    /// the statement; a failed one is reused as long.
    async fn queue_gauges(&self, pool: &PgPool) -> QueueReading {
        let mut cached = self.queue.lock().await;
        if let Some((read_at, reading)) = cached.as_ref()
            && read_at.elapsed() < QUEUE_MAX_AGE
        {
            return reading.clone();
        }
        let read = tokio::time::timeout(QUEUE_READ_LIMIT, async {
            let mut conn = pool.acquire().await?;
            stats::queue_counts(&mut conn, stats::EXACT_UP_TO).await
        })
        .await;
        let reading = match read {
            Ok(Ok(counts)) => Ok(render_queue(&counts)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no reading within {QUEUE_READ_LIMIT:?}")),
        };
        *cached = Some((Instant::now(), reading.clone()));
        reading
    }
}

/// The queue gauges as Prometheus text: every state of every kind that has jobs (0 where it
/// has none), and each such kind's oldest wait (0 when nothing is due).
fn render_queue(counts: &[StateCount]) -> String {
    let mut jobs: BTreeMap<(&str, &'static str), f64> = BTreeMap::new();
    let mut oldest: BTreeMap<&str, f64> = BTreeMap::new();
    for count in counts {
        for state in JobState::ALL {
            jobs.entry((&count.kind, state.as_str())).or_insert(0.0);
        }
        let wait = oldest.entry(&count.kind).or_insert(0.0);
        *wait = wait.max(count.oldest_due_seconds.unwrap_or(0.0));
        jobs.insert((&count.kind, count.state.as_str()), count.jobs as f64);
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        describe_gauge!(
            JOBS,
            "Jobs by kind and state: exact for live states and for finished states up to 10000 \
             rows, Postgres' estimate above"
        );
        describe_gauge!(
            OLDEST_QUEUED,
            Unit::Seconds,
            "How long the oldest due queued job of each kind has waited"
        );
        for ((kind, state), n) in jobs {
            gauge!(JOBS, "kind" => kind.to_owned(), "state" => state).set(n);
        }
        for (kind, seconds) in oldest {
            gauge!(OLDEST_QUEUED, "kind" => kind.to_owned()).set(seconds);
        }
    });
    recorder.handle().render()
}

/// The process's recorder, installed globally once, with its upkeep thread.
fn process_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    // Another recorder owns the facade: this one renders only what it is given.
                    tracing::warn!(error = %e, "cannot install the metrics recorder");
                    builder().build_recorder().handle()
                }
            };
            describe();
            let upkeep = handle.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// Histograms as Prometheus histograms (not summaries), with buckets fit to each.
fn builder() -> PrometheusBuilder {
    const SECONDS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    // Jobs run from milliseconds (probe kinds) to hours (a year's settlement).
    const JOB_SECONDS: &[f64] = &[
        0.01,
        0.1,
        0.5,
        1.0,
        5.0,
        15.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
        24.0 * 3600.0,
    ];
    // Up to the largest orders.max_batch allowed (128 by default).
    const BATCH: &[f64] = &[
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        64.0,
        128.0,
        256.0,
        512.0,
        1024.0,
        2048.0,
        4096.0,
        8192.0,
        MAX_ORDER_BATCH as f64,
    ];
    let full = |name: &str| Matcher::Full(name.to_owned());
    PrometheusBuilder::new()
        .set_buckets_for_metric(full(HTTP_DURATION), SECONDS)
        .and_then(|b| {
            b.set_buckets_for_metric(full(settle_workers::metrics::JOB_DURATION), JOB_SECONDS)
        })
        .and_then(|b| b.set_buckets_for_metric(full(ORDER_BATCH_SIZE), BATCH))
        .expect("bucket lists are not empty")
}

fn describe() {
    describe_counter!(
        ORDERS,
        "Orders past authentication, each once by how it ended (decided, refused or failed), \
         heard by its client or not: placed, out_of_stock, rejected, error"
    );
    describe_histogram!(
        ORDER_BATCH_SIZE,
        "Orders decided together by one coalesced transaction"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time to the response head, by route template"
    );
    settle_workers::metrics::describe();
}
