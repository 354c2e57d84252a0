//! Test support: every test gets its own freshly migrated database, dropped when the test
//! ends (pass or fail; `SETTLE_TEST_KEEP_DB=1` keeps them for post-mortems), and HTTP tests a
//! real server on port 0.
#![allow(dead_code)] // each test crate uses a different part of this module

pub mod access;
pub mod api_process;
pub mod auth;
pub mod browser;
pub mod cluster;
pub mod commit_cut;
pub mod engine;
pub mod front;
pub mod listening;
pub mod ops;
pub mod outcome;
pub mod processes;
pub mod prometheus;
pub mod proxy;
pub mod settlement;

use std::sync::Arc;

use figment::providers::Serialized;
use settle::config::Config;
use settle::http::AppState;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The `settle` binary, started with none of the variables it reads from a developer's shell
/// (`DATABASE_URL`, `PORT`, `WORKERS`, `BATCH_SIZE`, `SETTLE_*`): a child sees only what its test
/// sets, so a `DATABASE_URL` exported for sqlx development cannot point it at another database.
pub fn settle_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_settle"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("SETTLE_")
            || ["DATABASE_URL", "PORT", "WORKERS", "BATCH_SIZE"].contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

/// Postgres the tests run against: `TEST_DATABASE_URL`, else the local default server.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// `host:port` of [`server_url`], for a proxy to forward to.
pub fn server_address() -> String {
    let server = url::Url::parse(&server_url()).expect("server url");
    let host = server.host_str().expect("server host");
    format!("{host}:{}", server.port().unwrap_or(5432))
}

/// A configuration pointing at a brand-new database named `settle_test_<uuid>`, with
/// `overrides` (dotted keys, e.g. `("worker.lease_ms", 3000)`) layered on the defaults.
pub fn test_config(overrides: &[(&str, serde_json::Value)]) -> Config {
    let name = format!("settle_test_{}", uuid::Uuid::new_v4().simple());
    let mut figment = Config::defaults()
        .merge(Serialized::default(
            "database.url",
            format!("{}/{name}", server_url()),
        ))
        .merge(Serialized::default("http.port", 0))
        .merge(Serialized::default("database.max_connections", 16))
        .merge(Serialized::default(
            "settlement.results_dir",
            std::env::temp_dir()
                .join(&name)
                .to_string_lossy()
                .into_owned(),
        ));
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value.clone()));
    }
    Config::from_figment(figment).expect("valid test config")
}

/// Creates and migrates the database of `config`, returning a pool on it and the guard that
/// drops the database: bind it to a named variable (`_db`, not `_`) that lives as long as the
/// test.
pub async fn migrated_pool(config: &Config) -> (PgPool, TestDatabase) {
    // Before the creation, so a migration that fails part-way leaves nothing behind either.
    let database = TestDatabase::new(&config.database.url);
    let pool = settle::cli::open(config, true)
        .await
        .expect("create and migrate the test database");
    (pool, database)
}

/// Drops a `settle_test_*` database on the test server when dropped, even when the test
/// panicked; any other database (a private cluster's, say) is left alone. With
/// `SETTLE_TEST_KEEP_DB=1` it only says which database it kept.
#[must_use = "the database is dropped when this guard is"]
pub struct TestDatabase {
    name: String,
}

impl TestDatabase {
    /// The guard of the database `url` names (created or not yet).
    pub fn new(url: &str) -> Self {
        let options = settle::db::connect_options(url).expect("test database url");
        let name = options.get_database().unwrap_or_default().to_owned();
        Self { name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if !self.name.starts_with("settle_test_") {
            return;
        }
        if std::env::var_os("SETTLE_TEST_KEEP_DB").is_some_and(|v| v != "0") {
            eprintln!("SETTLE_TEST_KEEP_DB: keeping database {}", self.name);
            return;
        }
        // The settlement CSVs the test's jobs wrote (`test_config`'s results_dir).
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.name));
        // The test server, whatever route (a proxy, say) the test itself took to it.
        let url = format!("{}/{}", server_url(), self.name);
        // Drop runs inside the test's runtime, or while a panic unwinds out of it, where
        // blocking on a future is not allowed: a thread of its own, with its own runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(settle::db::drop_database_if_exists(&url))
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
        })
        .join();
        // Never panic here: a second panic while unwinding would abort the whole test binary.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

/// A running API on a free port, against its own database.
pub struct TestApp {
    pub base: String,
    pub pool: PgPool,
    pub config: Arc<Config>,
    /// Sends `admin_token` with every request.
    pub http: reqwest::Client,
    /// An admin token on this app's database (`auth.rs` makes tokens of other roles).
    pub admin_token: String,
    shutdown: CancellationToken,
    /// Drops the database; after the fields above (fields drop in declaration order).
    _database: TestDatabase,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

pub async fn spawn_app_with(overrides: &[(&str, serde_json::Value)]) -> TestApp {
    let config = Arc::new(test_config(overrides));
    let (pool, database) = migrated_pool(&config).await;
    let listener = settle::http::bind(&config).await.expect("bind port 0");
    let base = format!("http://{}", listener.local_addr().expect("bound address"));
    let shutdown = CancellationToken::new();
    let state = AppState::new(pool.clone(), config.clone());
    tokio::spawn(settle::http::serve(listener, state, shutdown.clone()));
    let admin_token = auth::create_token(&pool, settle::tokens::Role::Admin, None).await;
    TestApp {
        base,
        pool,
        config,
        http: auth::client_with(&admin_token),
        admin_token,
        shutdown,
        _database: database,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops serving, as a crashed or stopped API does: new connections are refused (the
    /// database stays, for the test to read).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// POSTs JSON and returns the status and the parsed body (Null when not JSON).
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        status_and_json(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        status_and_json(response).await
    }

    /// Sends `POST /api/v1/orders` whose body never all arrives (it promises 52 bytes and sends
    /// 11) and returns the raw HTTP answer the server gives when it stops waiting.
    pub async fn post_late_order(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://");
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 52\r\nconnection: close\r\n\r\n\
             {{\"product_i",
            self.admin_token
        );
        client.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// Asserts the list at `path` refuses each of its own `(query, status, code)` cases and the
    /// page parameters every list shares: a limit below 1 (422), a limit that is not a number
    /// (400) and a cursor this API did not write (400).
    pub async fn assert_list_refuses(&self, path: &str, own: &[(&str, u16, &str)]) {
        let paging = [
            ("limit=0", 422, "INVALID_LIMIT"),
            ("limit=-1", 422, "INVALID_LIMIT"),
            ("limit=ten", 400, "INVALID_QUERY"),
            ("cursor=xyz", 400, "INVALID_CURSOR"),
        ];
        for &(query, status, code) in paging.iter().chain(own) {
            let (got, body) = self.get(&format!("{path}?{query}")).await;
            assert_eq!(got, status, "{path}?{query}: {body}");
            assert_error(&body, code);
        }
    }

    /// Enqueues a settlement of `from..=to` through the API and returns the job's id.
    pub async fn post_settlement(&self, from: &str, to: &str) -> i64 {
        let (status, body) = self
            .post(
                "/api/v1/jobs/settlement",
                &serde_json::json!({"from": from, "to": to}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["job_id"].as_i64().expect("job id")
    }

    /// A product's stock, as the API reads it.
    pub async fn stock(&self, product: i64) -> i64 {
        let (status, body) = self.get(&format!("/api/v1/products/{product}")).await;
        assert_eq!(status, 200, "{body}");
        body["stock"].as_i64().expect("stock")
    }

    /// Creates a product and returns its id.
    pub async fn product(&self, stock: i64, price_cents: i64) -> i64 {
        let (status, body) = self
            .post(
                "/api/v1/products",
                &serde_json::json!({"name": "test product", "stock": stock, "price_cents": price_cents}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_i64().expect("product id")
    }
}

/// Makes the first statement (or row) to fire `trigger` (e.g. `"after update on products for
/// each statement"`) sleep `seconds`, once: an interleaving between statements, staged. A
/// sequence counts the firings, so no other statement waits for the paused one.
pub async fn pause_once(pool: &PgPool, trigger: &str, seconds: f64) {
    let sql = format!(
        "create sequence pause_once;
         create function pause_once() returns trigger language plpgsql as $$
         begin
             if nextval('pause_once') = 1 then perform pg_sleep({seconds}); end if;
             return new;
         end $$;
         create trigger pause_once {trigger} execute function pause_once();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("pause trigger");
}

/// A single `bigint` the test asks for (counts, mostly).
pub async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .expect("a bigint")
}

/// Waits until a session of this test's database waits for a lock in a statement that holds
/// `statement`: another transaction then provably stands in its way.
pub async fn wait_for_lock_waiter(pool: &PgPool, statement: &str) {
    processes::wait_for(
        std::time::Duration::from_secs(10),
        &format!("a wait for a lock in {statement}"),
        || async { (lock_waiters(pool, statement).await > 0).then_some(()) },
    )
    .await;
}

/// A transaction of the test's own that ran `statements` and stays open as long as the test
/// holds it: the pool's idle-in-transaction timeout (half a lease, 5 s in tests) is turned off
/// for it, as a loaded machine can take longer than that to reach the step it stages.
pub async fn held_open(
    pool: &PgPool,
    statements: &[&str],
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut held = pool.begin().await.expect("a transaction");
    let timeout_off = "set local idle_in_transaction_session_timeout = 0";
    for &statement in std::iter::once(&timeout_off).chain(statements) {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut *held)
            .await
            .expect("a statement of the held transaction");
    }
    held
}

/// How many sessions of this test's database wait for a lock in a statement holding `statement`.
pub async fn lock_waiters(pool: &PgPool, statement: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity where datname = current_database()
         and wait_event_type = 'Lock' and strpos(query, $1) > 0",
    )
    .bind(statement)
    .fetch_one(pool)
    .await
    .expect("a count")
}

/// A transaction of the test's own holding the rows `select_for_update` locks (taking one
/// `bigint`, `$1`, e.g. a product's or a job's id), as a batch or a part would hold them.
pub async fn rows_locked(
    pool: &PgPool,
    select_for_update: &'static str,
    id: i64,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(select_for_update)
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// A transaction of the test's own holding `product`'s row, as an order batch would.
pub async fn product_row_locked(
    pool: &PgPool,
    product: i64,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    rows_locked(
        pool,
        "select 1 from products where id = $1 for update",
        product,
    )
    .await
}

/// [`scalar`] of a statement taking one `bigint` (`$1`), e.g. a job's id.
pub async fn scalar_of(pool: &PgPool, sql: &str, arg: i64) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(arg)
        .fetch_one(pool)
        .await
        .expect("a bigint")
}

/// The status and the text of a response.
pub async fn status_and_text(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.expect("response body"))
}

pub async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let (status, text) = status_and_text(response).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Asserts the error shape: `{"error": {"code": code, "message": <string>, …}}`.
pub fn assert_error(body: &serde_json::Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Asserts an answer (status, body) is a `status` error with `code`, in the error shape.
pub fn assert_refused(answer: (u16, serde_json::Value), status: u16, code: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_error(&body, code);
}

/// [`assert_refused`] for a response as sent, for the requests [`TestApp`]'s helpers do not
/// make: another client, another method, a raw body.
pub async fn assert_response_refused(response: reqwest::Response, status: u16, code: &str) {
    assert_refused(status_and_json(response).await, status, code);
}
