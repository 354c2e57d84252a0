//! `settle bench orders`: many clients ordering one hot product through the real HTTP server
//! (a child `settle api` process; as configured, with concurrent orders coalesced, then with
//! one statement per request), then the same single statement through a bare sqlx pool with
//! as many connections, printing orders/s, latency percentiles, the invariant check and the
//! ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::process::ApiProcess;
use crate::config::Config;
use crate::orders::store;
use crate::orders::{BuyerId, NewOrder, Quantity};

#[derive(Debug, Args)]
pub struct OrdersArgs {
    /// Concurrent clients (HTTP connections, and SQL connections for the raw run).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Database the benchmark uses (dropped and recreated); never the service's own.
    #[arg(long, default_value = "settle_bench")]
    pub database: String,
}

/// Throughput and latency of one phase.
struct Phase {
    ok: u64,
    rejected: u64,
    seconds: f64,
    latency_us: Histogram<u64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<6} {:>9.0} orders/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} placed, {} rejected, {:.1} s)",
            self.rate(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            self.ok,
            self.rejected,
            self.seconds,
        );
    }
}

pub async fn run(args: OrdersArgs, config: Config) -> anyhow::Result<()> {
    let config = super::process::bench_config(config, &args.database)?;
    super::process::recreate_database(&config).await?;
    let pool = crate::cli::open(&config, true).await?;
    let duration = Duration::from_secs(args.seconds);
    println!(
        "settle bench orders: {} clients, {} s per phase, one hot product, database {}",
        args.clients, args.seconds, args.database
    );

    // The API as configured (orders for one product coalesced into shared transactions),
    // then with one statement per request, the path the raw phases replay without HTTP.
    let api = ApiProcess::start(&config).await?;
    let http_coalesced = http_phase(&pool, &api.base_url, args.clients, duration).await?;
    api.stop().await?;
    http_coalesced.0.print("http");
    check_invariant(&pool, http_coalesced.1).await?;
    let api = ApiProcess::start_with(&config, &[("SETTLE_ORDERS__COALESCE", "false")]).await?;
    let http_single = http_phase(&pool, &api.base_url, args.clients, duration).await?;
    api.stop().await?;
    http_single.0.print("http/1");
    check_invariant(&pool, http_single.1).await?;

    // The same statement from as many clients, first with one connection per client (the
    // pgbench-style limit), then through a pool as large as the API's, since fewer
    // connections queue on the hot row's lock less.
    let raw_clients = raw_phase(&config, args.clients, args.clients as u32, duration).await?;
    raw_clients.0.print("raw");
    check_invariant(&pool, raw_clients.1).await?;
    let api_pool = config.database.max_connections;
    let raw_pooled = raw_phase(&config, args.clients, api_pool, duration).await?;
    raw_pooled.0.print("raw/p");
    check_invariant(&pool, raw_pooled.1).await?;

    let raw = raw_clients.0.rate();
    println!(
        "ratio  http / raw = {:.2}   http/1 / raw = {:.2}   ({} connections; target >= 0.80)",
        http_coalesced.0.rate() / raw,
        http_single.0.rate() / raw,
        args.clients,
    );
    println!(
        "ratio  http / raw/p = {:.2}   http/1 / raw/p = {:.2}   ({api_pool} connections, the API's pool)",
        http_coalesced.0.rate() / raw_pooled.0.rate(),
        http_single.0.rate() / raw_pooled.0.rate(),
    );
    Ok(())
}

const BENCH_STOCK: i64 = crate::orders::MAX_STOCK;

async fn http_phase(
    pool: &PgPool,
    base: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(Phase, i64)> {
    let builder = reqwest::Client::builder().pool_max_idle_per_host(clients);
    let http = super::process::admin_client(pool, builder).await?;
    let new = json!({"name": "bench hot product", "stock": BENCH_STOCK, "price_cents": 1999});
    let product = super::process::post_json(&http, format!("{base}/api/v1/products"), &new).await?;
    let product_id = product["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no product id"))?;
    let url = Arc::new(format!("{base}/api/v1/orders"));
    let phase = drive(clients, duration, move |client| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .post(url.as_str())
                .json(&json!({"product_id": product_id, "quantity": 1, "buyer_id": format!("bench-{client}")}))
                .send()
                .await?;
            Ok(response.status() == reqwest::StatusCode::CREATED)
        }
    })
    .await?;
    Ok((phase, product_id))
}

async fn raw_phase(
    config: &Config,
    clients: usize,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<(Phase, i64)> {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect_with(crate::db::connect_options(&config.database.url)?)
        .await?;
    let mut conn = pool.acquire().await?;
    let product = store::insert_product(
        &mut conn,
        &crate::orders::NewProduct {
            name: "bench hot product (raw)".into(),
            stock: BENCH_STOCK,
            price_cents: 1999,
        },
    )
    .await?;
    drop(conn);
    let product_id = product.id;
    let phase = drive(clients, duration, move |client| {
        let pool = pool.clone();
        async move {
            let order = NewOrder {
                product_id,
                quantity: Quantity::parse(1, 1).expect("1 is a valid quantity"),
                buyer_id: BuyerId::parse(format!("bench-{client}")).expect("valid buyer id"),
            };
            let mut conn = pool.acquire().await?;
            Ok(store::place_order(&mut conn, &order).await?.is_ok())
        }
    })
    .await?;
    Ok((phase, product_id))
}

/// Runs `clients` loops of `request` for `duration`, timing each request.
async fn drive<F, Fut>(clients: usize, duration: Duration, request: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let request = request.clone();
        tasks.spawn(async move {
            let mut latency = latency_histogram();
            let (mut ok, mut rejected) = (0u64, 0u64);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let placed = request(client).await?;
                latency.saturating_record(sent.elapsed().as_micros() as u64);
                if placed {
                    ok += 1;
                } else {
                    rejected += 1;
                }
            }
            anyhow::Ok((ok, rejected, latency))
        });
    }
    let mut phase = Phase {
        ok: 0,
        rejected: 0,
        seconds: 0.0,
        latency_us: latency_histogram(),
    };
    while let Some(done) = tasks.join_next().await {
        let (ok, rejected, latency) = done??;
        phase.ok += ok;
        phase.rejected += rejected;
        phase.latency_us.add(latency)?;
    }
    phase.seconds = started.elapsed().as_secs_f64();
    Ok(phase)
}

/// Checks `initial + restocks = stock + Σ quantity` and `stock >= 0` from the stored rows.
async fn check_invariant(pool: &PgPool, product_id: i64) -> anyhow::Result<()> {
    let checked = sqlx::query!(
        r#"select p.initial_stock + p.restocked = p.stock + coalesce(sum(o.quantity), 0)
                  and p.stock >= 0 and p.sold = coalesce(sum(o.quantity), 0) as "holds!",
                  count(o.id) as "orders!"
           from products p left join orders o on o.product_id = p.id
           where p.id = $1
           group by p.id"#,
        product_id,
    )
    .fetch_one(pool)
    .await?;
    let (holds, orders) = (checked.holds, checked.orders);
    println!(
        "       invariant initial + restocks = stock + sum(quantity): {} ({orders} order rows)",
        if holds { "holds" } else { "VIOLATED" }
    );
    anyhow::ensure!(holds, "invariant violated for product {product_id}");
    Ok(())
}

/// 1 µs to 60 s at 3 significant figures: a fixed range, so recording never saturates.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}
