//! `settle bench ingest`: bulk ingestion through the real HTTP server (a child `settle api`
//! process), posts of 1,000 transactions each from concurrent clients, against the same rows
//! stored by a bare multi-row `INSERT … VALUES` of 1,000 rows per statement on as many
//! connections, into the same table with the same indexes. Then every batch is posted again,
//! as a client retrying after lost responses does: all duplicates, nothing stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

use super::process::{ApiProcess, Setup};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Posts (and bare INSERT statements) per phase.
    #[arg(long, default_value_t = 500)]
    pub batches: usize,
    /// Transactions per post / per statement.
    #[arg(long, default_value_t = 1_000)]
    pub batch_size: usize,
    /// Concurrent clients (HTTP connections, and SQL connections for the bare INSERT).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Database the benchmark owns, named settle_bench*: dropped and recreated at each run.
    #[arg(long, default_value = "settle_bench_ingest")]
    pub database: String,
}

/// One transaction of batch `batch` (a pure function of its place, so phases store the same
/// rows): `prefix` keeps the HTTP and bare runs' identities apart.
fn transaction(prefix: &str, batch: usize, i: usize) -> Value {
    let n = batch * 1_000_000 + i;
    let amount = 100 + (n % 99_900) as i64;
    json!({
        "merchant_id": format!("m{:05}", n % 1000),
        "external_id": format!("{prefix}_{n:012}"),
        "amount_cents": amount,
        "fee_cents": amount * 29 / 1000 + 30,
        "status": if n.is_multiple_of(10) { "PENDING" } else { "PAID" },
        "paid_at": format!("2025-01-{:02}T{:02}:{:02}:00Z", 1 + n % 28, n % 24, n % 60),
    })
}

fn batch(prefix: &str, b: usize, size: usize) -> Value {
    Value::Array((0..size).map(|i| transaction(prefix, b, i)).collect())
}

pub async fn run(args: IngestArgs, setup: Setup) -> anyhow::Result<()> {
    let setup = setup.on_database(&args.database)?;
    let config = &setup.config;
    super::process::recreate_database(config).await?;
    let pool = crate::cli::open(config, true).await?;
    let rows = (args.batches * args.batch_size) as f64;
    println!(
        "settle bench ingest: {} posts of {} transactions, {} clients, database {}",
        args.batches, args.batch_size, args.clients, args.database
    );
    let api = ApiProcess::start(&setup).await?;
    let client = super::process::admin_client(&pool, reqwest::Client::builder()).await?;
    let (http, inserted) = http_phase(&client, &api.base_url, &args, "http").await?;
    anyhow::ensure!(inserted == rows as u64, "stored {inserted} of {rows}");
    let (resend, again) = http_phase(&client, &api.base_url, &args, "http").await?;
    anyhow::ensure!(again == 0, "a re-send stored {again} rows");
    api.stop().await?;
    let bare = bare_phase(config, &args).await?;
    let stored = sqlx::query_scalar!(r#"select count(*) as "count!" from transactions"#)
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(stored as f64 == 2.0 * rows, "{stored} rows in the table");
    println!(
        "http     {http:>7.2} s  {:>9.0} rows/s  (POST /api/v1/transactions, all new)",
        rows / http
    );
    println!(
        "re-send  {resend:>7.2} s  {:>9.0} rows/s  (the same posts again: all duplicates, none stored)",
        rows / resend
    );
    println!(
        "bare     {bare:>7.2} s  {:>9.0} rows/s  (multi-row INSERT … VALUES, no HTTP, no dedup)",
        rows / bare
    );
    println!(
        "ratio    http / bare rate = {:.2}",
        (rows / http) / (rows / bare)
    );
    pool.close().await;
    Ok(())
}

/// A transaction as the bare INSERT binds it.
struct Row {
    merchant_id: String,
    external_id: String,
    amount_cents: i64,
    fee_cents: i64,
    status: String,
    paid_at: chrono::DateTime<chrono::Utc>,
}

impl Row {
    fn of(t: &Value) -> anyhow::Result<Self> {
        let text = |key: &str| t[key].as_str().unwrap_or_default().to_owned();
        Ok(Self {
            merchant_id: text("merchant_id"),
            external_id: text("external_id"),
            amount_cents: t["amount_cents"].as_i64().unwrap_or_default(),
            fee_cents: t["fee_cents"].as_i64().unwrap_or_default(),
            status: text("status"),
            paid_at: text("paid_at").parse()?,
        })
    }
}

/// Posts every batch once with `clients` concurrent clients; returns the seconds taken and
/// how many rows the answers say were inserted.
async fn http_phase(
    http: &reqwest::Client,
    base: &str,
    args: &IngestArgs,
    prefix: &str,
) -> anyhow::Result<(f64, u64)> {
    let url = format!("{base}/api/v1/transactions");
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..args.batches)
            .map(|b| batch(prefix, b, args.batch_size).to_string())
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (http, url, bodies, next) = (http.clone(), url.clone(), bodies.clone(), next.clone());
        clients.spawn(async move {
            let mut inserted = 0u64;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(b) else {
                    return anyhow::Ok(inserted);
                };
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 201, "post {b}: {}", response.status());
                let answer: Value = response.json().await?;
                inserted += answer["inserted"].as_u64().unwrap_or(0);
            }
        });
    }
    let mut inserted = 0;
    while let Some(done) = clients.join_next().await {
        inserted += done??;
    }
    Ok((started.elapsed().as_secs_f64(), inserted))
}

/// The same number of rows, stored by one `INSERT … VALUES` of `batch_size` rows per statement
/// on `clients` connections.
async fn bare_phase(config: &Config, args: &IngestArgs) -> anyhow::Result<f64> {
    let bare = PgPoolOptions::new()
        .max_connections(args.clients as u32)
        .connect_with(crate::db::connect_options(&config.database.url)?)
        .await?;
    // Typed rows prepared before the clock starts, as the API has them after parsing.
    let batches: Arc<Vec<Vec<Row>>> = Arc::new(
        (0..args.batches)
            .map(|b| {
                (0..args.batch_size)
                    .map(|i| Row::of(&transaction("bare", b, i)))
                    .collect()
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let columns = 6;
    let placeholders: Vec<String> = (0..args.batch_size)
        .map(|r| {
            let p: Vec<String> = (1..=columns)
                .map(|c| format!("${}", r * columns + c))
                .collect();
            format!("({})", p.join(", "))
        })
        .collect();
    // Dynamic: the VALUES list has one row of numbered placeholders per batch element.
    let statement = Arc::new(format!(
        "insert into transactions
             (merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
         values {}",
        placeholders.join(", ")
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (bare, statement, next) = (bare.clone(), statement.clone(), next.clone());
        let batches = batches.clone();
        clients.spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(rows) = batches.get(b) else {
                    return anyhow::Ok(());
                };
                let mut query = sqlx::query(sqlx::AssertSqlSafe(statement.as_str()));
                for r in rows {
                    query = query
                        .bind(&r.merchant_id)
                        .bind(&r.external_id)
                        .bind(r.amount_cents)
                        .bind(r.fee_cents)
                        .bind(&r.status)
                        .bind(r.paid_at);
                }
                query.execute(&bare).await?;
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    bare.close().await;
    Ok(seconds)
}
