//! The command line: one subcommand per process kind. Each only wires things up
//! (telemetry → config → pool → run); the work happens in the library modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::AppState;
use crate::{bench, db, http, local_cluster, operator, seed, shutdown, telemetry, tokens, worker};

#[derive(Debug, Parser)]
#[command(
    name = "settle",
    version,
    about = "Flash-sale ordering and settlement jobs on Postgres"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults (see config.toml).
    #[arg(long, global = true, env = "SETTLE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API and workers in one process, migrating on start: for development.
    Serve {
        /// Load demo data (products and transactions) if the database has none, and create an
        /// admin token, printed alone on the last line of standard output.
        #[arg(long)]
        demo: bool,
    },
    /// The HTTP API server.
    Api,
    /// A worker process: claims and runs jobs until SIGTERM/SIGINT.
    Worker,
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// API tokens: create (printed once), list, revoke.
    #[command(subcommand)]
    Tokens(tokens::command::TokensCommand),
    /// Load demo data at scale with COPY.
    Seed(seed::SeedArgs),
    /// Benchmarks against the raw Postgres limit measured in the same run. Each owns its
    /// database (`--database`, named settle_bench*) and may empty it.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Jobs for operators: list, show, cancel, retry, straight on the database.
    #[command(subcommand)]
    Jobs(operator::JobsCommand),
}

/// Runs the command, printing any error with its causes and mapping it to an exit code.
pub async fn run(cli: Cli) -> ExitCode {
    if let Err(e) = telemetry::init() {
        eprintln!("error: {}", causes(&e));
        return ExitCode::FAILURE;
    }
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of the output went away (`settle jobs list | head`): what it read was
        // written, and what it did not want is no failure of ours.
        Err(e) if closed_output(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Said once, where the user sees it: through the log, or with the log turned off
            // (`SETTLE_LOG=off`) on standard error, so a failure is never silent.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{}", causes(&e));
            } else {
                eprintln!("error: {}", causes(&e));
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is a write to standard output whose reader closed it (Rust ignores SIGPIPE, so
/// such a write fails with EPIPE instead of ending the process as it ends `cat`).
fn closed_output(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `e` and its causes, `: `-separated, each said once: the driver's errors end with their
/// cause's text ("error communicating with database: Connection refused (os error 111)"
/// came with the same refusal again as its cause).
fn causes(e: &anyhow::Error) -> String {
    let mut said: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !said.last().is_some_and(|last| last.ends_with(&text)) {
            said.push(text);
        }
    }
    said.join(": ")
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    if config.settlement.revised_days_max.is_some() {
        tracing::warn!("settlement.revised_days_max no longer has an effect; remove it");
    }
    match cli.command {
        Command::Migrate => {
            let pool = open(&config, true).await?;
            tracing::info!("migrations applied");
            pool.close().await;
            Ok(())
        }
        Command::Api => {
            let pool = open(&config, config.database.migrate_on_start).await?;
            let listener = http::bind(&config).await?;
            let state = AppState::new(pool, Arc::new(config));
            http::serve(listener, state, shutdown::on_signal()).await?;
            Ok(())
        }
        Command::Worker => {
            let pool = open(&config, config.database.migrate_on_start).await?;
            let token = shutdown::on_signal();
            if let Some(addr) = config.worker.metrics_addr {
                let listener = http::listen(addr, config.http.listen_backlog)
                    .await
                    .context("cannot bind worker.metrics_addr")?;
                // Installed here, not in the spawned task, which may first run after the
                // worker's first jobs ended.
                let metrics = crate::metrics::Metrics::new();
                tokio::spawn(http::serve_process_metrics(
                    listener,
                    metrics,
                    token.clone(),
                    http::ServeLimits::of(&config.http),
                ));
            }
            let ran = worker::run(pool.clone(), Arc::new(config), token).await;
            pool.close().await;
            ran
        }
        Command::Serve { demo } => {
            // The port first: one taken fails before a cluster starts, the database is
            // migrated or a demo token is made.
            let listener = http::bind(&config).await?;
            // Signals are caught from here on: one during the start (the cluster's, the
            // migrations, the demo data) ends the start, and the cluster stops as after serving.
            let token = shutdown::on_signal();
            let cluster = local_cluster::start_if_needed(&config.database).await?;
            let served = serve(config, demo, listener, token).await;
            if let Some(cluster) = cluster {
                cluster.stop().await;
            }
            served
        }
        Command::Seed(args) => {
            let pool = open(&config, true).await?;
            seed::run(&pool, &args).await?;
            Ok(())
        }
        Command::Tokens(command) => {
            if matches!(command, tokens::command::TokensCommand::Create { .. })
                && tokens::command::stdout_discarded()
            {
                anyhow::bail!(
                    "standard output is /dev/null (or was closed): the new token's secret would \
                     be lost; no token was created"
                );
            }
            let pool = open(&config, config.database.migrate_on_start).await?;
            let done = tokens::command::run(command, &pool, &mut std::io::stdout()).await;
            pool.close().await;
            done
        }
        Command::Bench(command) => bench::run(command, config, cli.config).await,
        Command::Jobs(command) => {
            let pool = open(&config, config.database.migrate_on_start).await?;
            let done =
                operator::run(&pool, &config.pagination, command, &mut std::io::stdout()).await;
            pool.close().await;
            Ok(done?)
        }
    }
}

/// `serve`: migrate, optionally load demo data, then the API (on `listener`) and the workers in
/// one process, until `token` (a signal) fires, which also ends the start early.
async fn serve(
    config: Config,
    demo: bool,
    listener: TcpListener,
    token: CancellationToken,
) -> anyhow::Result<()> {
    worker::checked_registry(&config)?;
    let start = async {
        let pool = open(&config, true).await?;
        if demo {
            seed::demo_if_empty(&pool).await?;
            demo_token(&pool).await?;
        }
        anyhow::Ok(pool)
    };
    let pool = tokio::select! {
        biased;
        () = token.cancelled() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
        pool = start => pool?,
    };
    let config = Arc::new(config);
    let state = AppState::new(pool.clone(), config.clone());
    // The pool closes once both have stopped: the workers may stop first, while the API is
    // still finishing its in-flight requests.
    let (api, workers) = tokio::join!(
        http::serve(listener, state, token.clone()),
        worker::run(pool.clone(), config, token.clone()),
    );
    pool.close().await;
    api?;
    workers
}

/// `serve --demo`'s admin token, new at each start (a secret is never shown twice), printed
/// where the README's examples say to take it from.
async fn demo_token(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let new = tokens::NewToken::admin("serve --demo");
    let (info, secret) = tokens::create(&mut conn, &new).await?;
    println!(
        "admin token {} for this demo (shown once; T=<it>, then curl -H \"authorization: Bearer $T\" …):",
        info.id
    );
    println!("{}", secret.expose());
    Ok(())
}

/// Connects, creating the database and migrating when `migrate`, else refusing an unmigrated one.
pub async fn open(config: &Config, migrate: bool) -> anyhow::Result<sqlx::PgPool> {
    if migrate && db::create_database_if_missing(&config.database.url).await? {
        tracing::info!(url = %db::redact(&config.database.url), "created database");
    }
    let lease = std::time::Duration::from_millis(config.worker.lease_ms);
    let pool = db::connect(&config.database, db::idle_in_transaction_timeout(lease)).await?;
    if migrate {
        let lock_timeout =
            std::time::Duration::from_millis(config.database.migration_lock_timeout_ms);
        db::migrate(&pool, lock_timeout).await?;
    } else {
        db::ensure_utf8(&pool).await?;
        db::ensure_migrated(&pool).await?;
    }
    Ok(pool)
}
