//! Demo data at scale: products, and N payment transactions over D days and M merchants,
//! streamed to Postgres with binary `COPY` on parallel connections, behind a progress bar.
//!
//! Rows are a pure function of `--seed` and their index, and ids are assigned here, so the
//! same arguments always load the same rows whatever the parallelism.

use std::time::Instant;

use anyhow::Context;
use chrono::NaiveDate;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sqlx::{Connection, PgConnection, PgPool};

/// Rows per COPY message burst and per progress-bar tick.
const CHUNK: u64 = 50_000;

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// Products to create.
    #[arg(long, default_value_t = 10)]
    pub products: u32,
    /// Payment transactions to create.
    #[arg(long, default_value_t = 1_000_000)]
    pub transactions: u64,
    /// Days the transactions' `paid_at` spread over, starting at `--start`, in arrival order
    /// (ids follow `paid_at`, give or take a few minutes, as a live feed's do).
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Distinct merchants.
    #[arg(long, default_value_t = 1_000)]
    pub merchants: u32,
    /// First day (UTC) of the spread.
    #[arg(long, default_value = "2025-01-01")]
    pub start: NaiveDate,
    /// Random seed: the same seed and arguments give the same rows.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Parallel COPY connections.
    #[arg(long, default_value_t = 2)]
    pub connections: u32,
    /// Hide the progress bar (for scripts and benchmarks).
    #[arg(long)]
    pub quiet: bool,
}

impl SeedArgs {
    /// The arguments `settle serve --demo` uses for a first look.
    pub fn demo() -> Self {
        Self {
            products: 3,
            transactions: 100_000,
            // January 2025, every day of it (the README's first settlement is that month).
            days: 31,
            merchants: 50,
            start: NaiveDate::from_ymd_opt(2025, 1, 1).expect("valid date"),
            seed: 42,
            connections: 2,
            quiet: true,
        }
    }
}

/// What a seed run loaded.
#[derive(Debug)]
pub struct SeedReport {
    pub products: u32,
    pub transactions: u64,
    /// The first transaction id used (`None`: no transactions were asked for).
    pub first_id: Option<i64>,
    pub seconds: f64,
}

pub async fn run(pool: &PgPool, args: &SeedArgs) -> anyhow::Result<SeedReport> {
    anyhow::ensure!(args.days >= 1, "--days must be at least 1");
    anyhow::ensure!(args.merchants >= 1, "--merchants must be at least 1");
    // Each COPY stream is a server process of its own: more than the server's cores is no
    // faster, and hundreds would take every connection a shared server allows.
    anyhow::ensure!(
        (1..=64).contains(&args.connections),
        "--connections must be 1 to 64"
    );
    // The table's own bounds (migration 0017), checked before anything is written.
    let end = args
        .start
        .checked_add_days(chrono::Days::new(args.days.into()));
    let (first, last) = (
        NaiveDate::from_ymd_opt(1, 1, 2).expect("valid date"),
        NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid date"),
    );
    anyhow::ensure!(
        args.start >= first && end.is_some_and(|end| end <= last),
        "--start and --days must keep paid_at on 0001-01-02 or later and before 9999-12-31 (UTC)"
    );
    let started = Instant::now();
    let first_id = if args.transactions == 0 {
        insert_products(pool, args).await?;
        None
    } else {
        Some(copy_transactions(pool, args).await?)
    };
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        transactions = args.transactions,
        seconds,
        rows_per_second = args.transactions as f64 / seconds.max(1e-9),
        "seed loaded"
    );
    Ok(SeedReport {
        products: args.products,
        transactions: args.transactions,
        first_id,
        seconds,
    })
}

/// Seeds the demo data set unless the database already holds transactions.
pub async fn demo_if_empty(pool: &PgPool) -> anyhow::Result<()> {
    let any = sqlx::query_scalar!(r#"select exists (select 1 from transactions) as "any!""#)
        .fetch_one(pool)
        .await?;
    if !any {
        tracing::info!("loading demo data");
        run(pool, &SeedArgs::demo()).await?;
    }
    Ok(())
}

async fn insert_products(conn: impl sqlx::PgExecutor<'_>, args: &SeedArgs) -> anyhow::Result<()> {
    sqlx::query!(
        "insert into products (name, price_cents, initial_stock, stock)
         select 'Demo product ' || n, 500 + (n * 250) % 10000, 1000, 1000
         from generate_series(1, $1) as n",
        args.products as i32,
    )
    .execute(conn)
    .await
    .context("inserting products")?;
    Ok(())
}

/// Loads the products and the transactions; returns the first transaction id used.
///
/// The ids are reserved (`setval`) before any row exists, and each stream commits on its own;
/// a settlement fixing its input meanwhile must not take a mark above ids still to come
/// ([`crate::settlement::plan::high_water_mark`] waits for the sessions holding a writer's lock
/// on `transactions`). So a reservation transaction takes that lock before it reserves and
/// keeps it until every stream has committed. The streams use connections of their own, not
/// the pool's: with `--connections` above `database.max_connections` they would otherwise wait
/// for a pooled connection, and time out with part of the load committed. A stream that fails
/// still leaves the streams committed before it (the error says so); one that waits 5 s for its
/// lock (behind a DDL statement queued behind the reservation) fails the load.
async fn copy_transactions(pool: &PgPool, args: &SeedArgs) -> anyhow::Result<i64> {
    let mut reservation = pool.begin().await.context("reserving transaction ids")?;
    sqlx::query!("lock table transactions in row exclusive mode")
        .execute(&mut *reservation)
        .await
        .context("reserving transaction ids")?;
    // The pool's sessions end a transaction left idle for a few seconds (`db::connect`); this
    // one waits for the whole load.
    sqlx::query!("set local idle_in_transaction_session_timeout = 0")
        .execute(&mut *reservation)
        .await
        .context("reserving transaction ids")?;
    // Reserve a contiguous id range so parallel streams and reruns never collide.
    let first_id = sqlx::query_scalar!(
        r#"select setval(pg_get_serial_sequence('transactions', 'id'),
                         greatest((select coalesce(max(id), 0) from transactions),
                                  (select last_value from transactions_id_seq where is_called))
                         + $1::bigint) - $1::bigint + 1 as "first_id!""#,
        args.transactions as i64,
    )
    .fetch_one(&mut *reservation)
    .await
    .context("reserving transaction ids")?;
    // Committed with the reservation: a load that fails before its first stream commits
    // leaves no products behind either.
    insert_products(&mut *reservation, args).await?;
    let bar = progress_bar(args);
    let chunks = args.transactions.div_ceil(CHUNK);
    let mut streams = tokio::task::JoinSet::new();
    let options = pool.connect_options();
    for stream in 0..u64::from(args.connections) {
        let (options, args, bar) = (options.clone(), args.clone(), bar.clone());
        streams.spawn(async move {
            let mut conn = PgConnection::connect_with(&options).await?;
            // A lock request that conflicts with the reservation's (an index build, an ALTER)
            // queues behind it, and this COPY behind that request, while the reservation waits
            // for this COPY: a cycle Postgres cannot see, the reservation being idle. The COPY
            // gives up instead, and the reservation with it.
            sqlx::query!("set lock_timeout = 5000")
                .execute(&mut conn)
                .await?;
            let mut copy = conn
                .copy_in_raw(
                    "copy transactions
                         (id, merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
                     from stdin (format binary)",
                )
                .await?;
            copy.send(copy_binary::HEADER).await?;
            let mut buf = Vec::with_capacity(CHUNK as usize * 64);
            for chunk in (stream..chunks).step_by(args.connections as usize) {
                let rows = chunk * CHUNK..((chunk + 1) * CHUNK).min(args.transactions);
                let len = rows.end - rows.start;
                buf.clear();
                encode_chunk(&args, chunk, first_id, rows, &mut buf);
                copy.send(buf.as_slice()).await?;
                bar.inc(len);
            }
            copy.send(copy_binary::TRAILER).await?;
            copy.finish().await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = streams.join_next().await {
        done.context("COPY task panicked")?
            .context("COPY of transactions (streams that finished before it are committed)")?;
    }
    reservation
        .commit()
        .await
        .context("ending the id reservation")?;
    bar.finish_and_clear();
    // Said, as it takes seconds after the bar is gone: an interrupt now loses nothing, and a
    // rerun would add the rows again.
    tracing::info!(
        transactions = args.transactions,
        "transactions committed; vacuuming and analyzing them"
    );
    // As autovacuum leaves an insert-only table: statistics, and the visibility map set, so
    // index-only scans read no heap.
    sqlx::query!("vacuum (analyze) transactions")
        .execute(pool)
        .await
        .context("vacuuming transactions")?;
    Ok(first_id)
}

fn progress_bar(args: &SeedArgs) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(args.transactions);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} transactions {bar:40} {human_pos}/{human_len} {per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

/// Statuses and their weights: most payments succeed.
/// How late after its place in time a seeded transaction may arrive.
const FEED_JITTER_MICROS: i64 = 5 * 60 * 1_000_000;

const STATUSES: [(&str, u32); 4] = [("PAID", 90), ("PENDING", 4), ("FAILED", 4), ("REFUNDED", 2)];

fn encode_chunk(
    args: &SeedArgs,
    chunk: u64,
    first_id: i64,
    rows: std::ops::Range<u64>,
    buf: &mut Vec<u8>,
) {
    // One generator per chunk, seeded from (seed, chunk): the rows do not depend on which
    // stream encodes them.
    let mut rng = StdRng::seed_from_u64(args.seed ^ chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let start = args
        .start
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let span_micros = i64::from(args.days) * 86_400_000_000;
    let total = args.transactions.max(1);
    let mut merchant = String::with_capacity(16);
    let mut external = String::with_capacity(32);
    for index in rows {
        let amount: i64 = rng.random_range(100..100_000);
        let fee = (amount * 29 / 1000 + 30).min(amount);
        let roll = rng.random_range(0..100);
        let status = pick_status(roll);
        // A live feed: transactions arrive in the order they were paid, give or take a few
        // minutes, so ids follow time as they do in production (`paid_at` of row `index` is
        // its share of the span plus up to FEED_JITTER late).
        let on_time = (i128::from(span_micros) * i128::from(index) / i128::from(total)) as i64;
        let late = rng.random_range(0..FEED_JITTER_MICROS);
        let paid_at = start.timestamp_micros() + (on_time + late).min(span_micros - 1);
        merchant.clear();
        let m = rng.random_range(0..args.merchants);
        use std::fmt::Write;
        let _ = write!(merchant, "m{m:05}");
        // The provider's charge id: unique because the id is (ids are reserved per run).
        let id = first_id + index as i64;
        external.clear();
        let _ = write!(external, "ch_{id:012}");
        copy_binary::row(
            buf,
            &copy_binary::Row {
                id,
                merchant: &merchant,
                external_id: &external,
                amount,
                fee,
                status,
                paid_at_unix_micros: paid_at,
            },
        );
    }
}

fn pick_status(roll: u32) -> &'static str {
    let mut acc = 0;
    for (status, weight) in STATUSES {
        acc += weight;
        if roll < acc {
            return status;
        }
    }
    "PAID"
}

/// Postgres binary COPY encoding of a transactions row. Hand-written because it is a few lines
/// of a stable, documented format and no maintained crate encodes it for sqlx's `copy_in_raw`;
/// binary spares the server parsing timestamps and integers from text, its slowest part of COPY.
mod copy_binary {
    /// Signature, flags, header-extension length.
    pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
    /// A field count of -1 ends the stream.
    pub const TRAILER: &[u8] = &[0xff, 0xff];
    /// Microseconds from the Unix epoch to Postgres' epoch, 2000-01-01.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

    /// One transactions row, in the column order of the seed's COPY statement.
    pub struct Row<'a> {
        pub id: i64,
        pub merchant: &'a str,
        pub external_id: &'a str,
        pub amount: i64,
        pub fee: i64,
        pub status: &'a str,
        pub paid_at_unix_micros: i64,
    }

    pub fn row(buf: &mut Vec<u8>, r: &Row<'_>) {
        buf.extend_from_slice(&7i16.to_be_bytes());
        int8(buf, r.id);
        text(buf, r.merchant);
        text(buf, r.external_id);
        int8(buf, r.amount);
        int8(buf, r.fee);
        text(buf, r.status);
        int8(buf, r.paid_at_unix_micros - PG_EPOCH_MICROS);
    }

    fn int8(buf: &mut Vec<u8>, v: i64) {
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&v.to_be_bytes());
    }

    fn text(buf: &mut Vec<u8>, v: &str) {
        buf.extend_from_slice(&(v.len() as i32).to_be_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}
