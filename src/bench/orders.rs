//! `settle bench orders`: many clients ordering one hot product through the real HTTP server
//! (a child `settle api` process; as configured, with concurrent orders coalesced, then with
//! one statement per request; each without and with an `Idempotency-Key` on every request),
//! a sell-out of a finite stock to keyed clients, then the same single statement through a
//! bare sqlx pool with as many connections, printing orders/s, latency percentiles, the
//! invariant check and the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::drive::{Outcome, Phase, Until, drive};
use super::process::{ApiProcess, Setup};
use crate::config::Config;
use crate::orders::store;
use crate::orders::{BuyerId, NewOrder, Quantity, Rejected};

#[derive(Debug, Args)]
pub struct OrdersArgs {
    /// Concurrent clients (HTTP connections, and SQL connections for the raw run).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds each timed phase runs.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Units of the sell-out phase: keyed clients order one unit each until it is sold out.
    #[arg(long, default_value_t = 60_000)]
    pub sell_out: i64,
    /// Database the benchmark owns, named settle_bench*: dropped and recreated at each run.
    #[arg(long, default_value = "settle_bench")]
    pub database: String,
}

/// Longest a sell-out may take before the phase fails.
const SELL_OUT_CAP: Duration = Duration::from_secs(600);

pub async fn run(args: OrdersArgs, setup: Setup) -> anyhow::Result<()> {
    let setup = setup.on_database(&args.database)?;
    let config = &setup.config;
    super::process::recreate_database(config).await?;
    let pool = crate::cli::open(config, true).await?;
    let duration = Duration::from_secs(args.seconds);
    let clients = args.clients;
    println!(
        "settle bench orders: {clients} clients, {} s per phase, one hot product, sell-out of {} \
         units, database {}",
        args.seconds, args.sell_out, args.database
    );

    // The API as configured (orders for one product coalesced into shared transactions),
    // without and with keys, and the sell-out; then with one statement per request, the path
    // the raw phases replay without HTTP.
    let api = ApiProcess::start(&setup).await?;
    let http = timed_http(&pool, &api.base_url, clients, duration, None).await;
    let keyed = timed_http(&pool, &api.base_url, clients, duration, Some("k")).await;
    let sold_out = sell_out(&pool, &api.base_url, clients, args.sell_out).await;
    api.stop().await?;
    let (http, keyed, sold_out) = (http?, keyed?, sold_out?);
    let api = ApiProcess::start_with(&setup, &[("SETTLE_ORDERS__COALESCE", "false")]).await?;
    let single = timed_http(&pool, &api.base_url, clients, duration, None).await;
    let single_keyed = timed_http(&pool, &api.base_url, clients, duration, Some("1k")).await;
    api.stop().await?;
    let (single, single_keyed) = (single?, single_keyed?);
    for (name, phase) in [
        ("http", &http),
        ("http/k", &keyed),
        ("http/1", &single),
        ("http/1k", &single_keyed),
    ] {
        phase.0.print(name);
        check_invariant(&pool, phase.1).await?;
    }

    // The same statement from as many clients, first with one connection per client (the
    // pgbench-style limit), then through a pool as large as the API's, since fewer
    // connections queue on the hot row's lock less.
    let raw_clients = raw_phase(config, clients, clients as u32, duration).await?;
    raw_clients.0.print("raw");
    check_invariant(&pool, raw_clients.1).await?;
    let api_pool = config.database.max_connections;
    let raw_pooled = raw_phase(config, clients, api_pool, duration).await?;
    raw_pooled.0.print("raw/p");
    check_invariant(&pool, raw_pooled.1).await?;

    let raw = raw_clients.0.rate();
    println!(
        "ratio   http / raw = {:.2}   http/1 / raw = {:.2}   ({clients} connections; target >= 0.80)",
        http.0.rate() / raw,
        single.0.rate() / raw,
    );
    println!(
        "ratio   http / raw/p = {:.2}   http/1 / raw/p = {:.2}   ({api_pool} connections, the API's pool)",
        http.0.rate() / raw_pooled.0.rate(),
        single.0.rate() / raw_pooled.0.rate(),
    );
    println!(
        "keyed   http/k / raw = {:.2} (target >= 6), p99 {:.2} ms (target < 20)   \
         http/1k / raw = {:.2}   http/k / http/1k = {:.2}",
        keyed.0.rate() / raw,
        keyed.0.p99_ms(),
        single_keyed.0.rate() / raw,
        keyed.0.rate() / single_keyed.0.rate(),
    );
    report_sell_out(&pool, &sold_out, clients, raw).await
}

const BENCH_STOCK: i64 = crate::orders::MAX_STOCK;

/// A phase of `duration` through the HTTP API on a fresh product of [`BENCH_STOCK`], every
/// request keyed (`key_prefix-client-n`) when `key_prefix` is given; the phase and the product.
async fn timed_http(
    pool: &PgPool,
    base: &str,
    clients: usize,
    duration: Duration,
    key_prefix: Option<&'static str>,
) -> anyhow::Result<(Phase, i64)> {
    let until = Until::Deadline(Instant::now() + duration);
    http_phase(pool, base, clients, BENCH_STOCK, until, key_prefix).await
}

/// A product of `stock` units, ordered one unit at a time by `clients` HTTP clients until
/// `until`; the phase and the product.
async fn http_phase(
    pool: &PgPool,
    base: &str,
    clients: usize,
    stock: i64,
    until: Until,
    key_prefix: Option<&'static str>,
) -> anyhow::Result<(Phase, i64)> {
    let builder = reqwest::Client::builder().pool_max_idle_per_host(clients);
    let http = super::process::admin_client(pool, builder).await?;
    let new = json!({"name": "bench hot product", "stock": stock, "price_cents": 1999});
    let product = super::process::post_json(&http, format!("{base}/api/v1/products"), &new).await?;
    let product_id = product["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no product id"))?;
    let url = Arc::new(format!("{base}/api/v1/orders"));
    let phase = drive(clients, until, move |client, n| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"product_id": product_id, "quantity": 1, "buyer_id": format!("bench-{client}")});
            let mut request = http.post(url.as_str()).json(&body);
            if let Some(prefix) = key_prefix {
                request = request.header("Idempotency-Key", format!("{prefix}-{client}-{n}"));
            }
            outcome(request.send().await?).await
        }
    })
    .await?;
    Ok((phase, product_id))
}

async fn outcome(response: reqwest::Response) -> anyhow::Result<Outcome> {
    Ok(match response.status() {
        StatusCode::CREATED => Outcome::Placed,
        StatusCode::CONFLICT => {
            let body: Value = response.json().await?;
            if body["error"]["code"] == "OUT_OF_STOCK" {
                Outcome::OutOfStock
            } else {
                Outcome::Other(409)
            }
        }
        status => Outcome::Other(status.as_u16()),
    })
}

/// `units` on a fresh product, sold one at a time to `clients` keyed clients, each ordering
/// until it is answered `OUT_OF_STOCK`.
async fn sell_out(
    pool: &PgPool,
    base: &str,
    clients: usize,
    units: i64,
) -> anyhow::Result<(Phase, i64)> {
    let until = Until::SoldOut(Instant::now() + SELL_OUT_CAP);
    http_phase(pool, base, clients, units, until, Some("s")).await
}

/// Prints the sell-out's figures, checked against the database: exactly the stock sold,
/// nothing oversold, every other answer `OUT_OF_STOCK`.
async fn report_sell_out(
    pool: &PgPool,
    (phase, product_id): &(Phase, i64),
    clients: usize,
    raw: f64,
) -> anyhow::Result<()> {
    let stored = check_invariant(pool, *product_id).await?;
    let oversold = (stored.sold - stored.initial_stock).max(0);
    println!(
        "sell-out {} units to {} keyed clients: sold in {:.2} s ({:.0} orders/s, {:.2}x raw), \
         p99 {:.2} ms; answers: {} placed, {} OUT_OF_STOCK, {} other {:?}",
        stored.initial_stock,
        clients,
        phase.last_placed,
        phase.placed as f64 / phase.last_placed,
        phase.placed as f64 / phase.last_placed / raw,
        phase.p99_ms(),
        phase.placed,
        phase.out_of_stock,
        phase.others(),
        phase.other,
    );
    println!(
        "         database: {} sold in {} orders, stock left {}, oversold {oversold}",
        stored.sold, stored.orders, stored.stock
    );
    anyhow::ensure!(oversold == 0, "oversold {oversold} units");
    anyhow::ensure!(
        stored.sold == stored.initial_stock && stored.stock == 0,
        "the sell-out stopped before the stock was gone"
    );
    anyhow::ensure!(
        u64::try_from(stored.sold)? == phase.placed && phase.others() == 0,
        "answers do not match the database: {} placed answered, {} other answers",
        phase.placed,
        phase.others()
    );
    Ok(())
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
    let until = Until::Deadline(Instant::now() + duration);
    let phase = drive(clients, until, move |client, _| {
        let pool = pool.clone();
        async move {
            let order = NewOrder {
                product_id,
                quantity: Quantity::parse(1, 1).expect("1 is a valid quantity"),
                buyer_id: BuyerId::parse(format!("bench-{client}")).expect("valid buyer id"),
            };
            let mut conn = pool.acquire().await?;
            Ok(match store::place_order(&mut conn, &order).await? {
                Ok(_) => Outcome::Placed,
                Err(Rejected::OutOfStock { .. }) => Outcome::OutOfStock,
                Err(Rejected::UnknownProduct) => Outcome::Other(0),
            })
        }
    })
    .await?;
    Ok((phase, product_id))
}

/// A product's stored figures.
struct Books {
    initial_stock: i64,
    stock: i64,
    /// Σ quantity of its orders.
    sold: i64,
    orders: i64,
}

/// Checks `initial + restocks = stock + Σ quantity` and `stock >= 0` from the stored rows;
/// the product's figures.
async fn check_invariant(pool: &PgPool, product_id: i64) -> anyhow::Result<Books> {
    let checked = sqlx::query!(
        r#"select p.initial_stock + p.restocked = p.stock + coalesce(sum(o.quantity), 0)
                  and p.stock >= 0 and p.sold = coalesce(sum(o.quantity), 0) as "holds!",
                  p.initial_stock, p.stock, coalesce(sum(o.quantity), 0)::bigint as "sold!",
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
        "        invariant initial + restocks = stock + sum(quantity): {} ({orders} order rows)",
        if holds { "holds" } else { "VIOLATED" }
    );
    anyhow::ensure!(holds, "invariant violated for product {product_id}");
    Ok(Books {
        initial_stock: checked.initial_stock,
        stock: checked.stock,
        sold: checked.sold,
        orders,
    })
}
