//! Closed-loop load for `settle bench orders`: each client sends its next request when the
//! last one is answered, every request timed, every answer counted by kind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How one order request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Placed,
    OutOfStock,
    /// Anything else, by HTTP status (0 for a refusal without HTTP).
    Other(u16),
}

/// When the clients stop.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// At this instant.
    Deadline(Instant),
    /// Each client at its first `OUT_OF_STOCK` (the product is sold out: nothing restocks
    /// it), or at the deadline, which then fails the phase.
    SoldOut(Instant),
}

/// Throughput, latency and answers of one phase.
pub struct Phase {
    pub placed: u64,
    pub out_of_stock: u64,
    /// Answers that were neither, by HTTP status.
    pub other: BTreeMap<u16, u64>,
    pub seconds: f64,
    /// Seconds from the start to the last order placed.
    pub last_placed: f64,
    pub latency_us: Histogram<u64>,
}

impl Phase {
    pub fn rate(&self) -> f64 {
        self.placed as f64 / self.seconds
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }

    pub fn others(&self) -> u64 {
        self.other.values().sum()
    }

    pub fn print(&self, name: &str) {
        println!(
            "{name:<7} {:>9.0} orders/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} placed, {} out of stock, {} other, {:.1} s)",
            self.rate(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            self.p99_ms(),
            self.placed,
            self.out_of_stock,
            self.others(),
            self.seconds,
        );
    }
}

/// Per client: counts, the time of its last placed order, and its latencies.
struct ClientRun {
    placed: u64,
    out_of_stock: u64,
    other: BTreeMap<u16, u64>,
    last_placed: Option<Instant>,
    latency_us: Histogram<u64>,
}

/// Runs `clients` loops of `request(client, n)` (n counts the client's requests) until
/// `until`, timing each request.
pub async fn drive<F, Fut>(clients: usize, until: Until, request: F) -> anyhow::Result<Phase>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<Outcome>> + Send,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let request = request.clone();
        tasks.spawn(async move {
            let mut run = ClientRun {
                placed: 0,
                out_of_stock: 0,
                other: BTreeMap::new(),
                last_placed: None,
                latency_us: latency_histogram(),
            };
            for n in 0.. {
                let (Until::Deadline(deadline) | Until::SoldOut(deadline)) = until;
                if Instant::now() >= deadline {
                    anyhow::ensure!(
                        matches!(until, Until::Deadline(_)),
                        "client {client} was still being sold to at the deadline"
                    );
                    break;
                }
                let sent = Instant::now();
                let outcome = request(client, n).await?;
                run.latency_us
                    .saturating_record(sent.elapsed().as_micros() as u64);
                match outcome {
                    Outcome::Placed => {
                        run.placed += 1;
                        run.last_placed = Some(Instant::now());
                    }
                    Outcome::OutOfStock => run.out_of_stock += 1,
                    Outcome::Other(status) => *run.other.entry(status).or_default() += 1,
                }
                if outcome == Outcome::OutOfStock && matches!(until, Until::SoldOut(_)) {
                    break;
                }
            }
            anyhow::Ok(run)
        });
    }
    let mut phase = Phase {
        placed: 0,
        out_of_stock: 0,
        other: BTreeMap::new(),
        seconds: 0.0,
        last_placed: 0.0,
        latency_us: latency_histogram(),
    };
    while let Some(done) = tasks.join_next().await {
        let run = done??;
        phase.placed += run.placed;
        phase.out_of_stock += run.out_of_stock;
        for (status, count) in run.other {
            *phase.other.entry(status).or_default() += count;
        }
        let last = run.last_placed.map_or(Duration::ZERO, |t| t - started);
        phase.last_placed = phase.last_placed.max(last.as_secs_f64());
        phase.latency_us.add(run.latency_us)?;
    }
    phase.seconds = started.elapsed().as_secs_f64();
    Ok(phase)
}

/// 1 µs to 60 s at 3 significant figures: a fixed range, so recording never saturates.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}
