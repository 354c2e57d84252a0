//! The `settle` binary as an operator meets it: refusing an unmigrated database, migrating,
//! naming bad configuration, binding port 0 and shutting down on SIGTERM.

mod common;

use std::process::{Command, Stdio};

use std::time::Duration;
use tokio::process::{Child, Command as AsyncCommand};

fn settle(database_url: &str) -> Command {
    let mut command = common::settle_command();
    command
        .env("SETTLE_DATABASE__URL", database_url)
        .env("PORT", "0")
        .env("SETTLE_LOG", "info");
    command
}

/// The URL of a database that does not exist yet (the commands create it), and the guard that
/// drops it when the test ends.
fn fresh_database() -> (String, common::TestDatabase) {
    let url = common::test_config(&[]).database.url;
    let database = common::TestDatabase::new(&url);
    (url, database)
}

/// A database that a newer release migrated (a rolling upgrade under way, or a rollback of
/// this one): `settle migrate`, as every process that migrates on start, leaves it as it is and
/// says so, rather than refusing to start on a migration it does not know (it did: "migration
/// 9999 was previously applied but is missing in the resolved migrations"). One that also
/// lacks a migration of this release is still refused.
#[tokio::test]
async fn a_database_a_newer_release_migrated_is_left_as_it_is() {
    let (url, _db) = fresh_database();
    assert!(
        settle(&url)
            .arg("migrate")
            .output()
            .unwrap()
            .status
            .success()
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values (9999, 'a newer release', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let output = settle(&url).arg("migrate").output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("migrated by a newer release"), "{said}");
    sqlx::query("delete from _sqlx_migrations where version = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(
        !settle(&url)
            .arg("migrate")
            .output()
            .unwrap()
            .status
            .success()
    );
}

#[test]
fn api_refuses_an_unmigrated_database_until_migrate_runs() {
    let (url, _db) = fresh_database();
    let missing = settle(&url).arg("api").output().unwrap();
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("settle migrate"), "{said}");

    let migrated = settle(&url).arg("migrate").output().unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // Twice is harmless.
    assert!(settle(&url).arg("migrate").status().unwrap().success());
}

#[test]
fn a_failure_is_said_on_standard_error_with_the_log_turned_off() {
    let (url, _db) = fresh_database();
    let missing = settle(&url)
        .env("SETTLE_LOG", "off")
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.starts_with("error: "), "{said}");
    assert!(said.contains("settle migrate"), "{said}");
}

/// The encoding of the database `url` names.
fn encoding_of(url: &str) -> String {
    let output = Command::new("psql")
        .args([
            url,
            "-Atc",
            "select pg_encoding_to_char(encoding) from pg_database \
                            where datname = current_database()",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_database_that_is_not_utf8_is_refused_before_anything_is_migrated() {
    let (url, _db) = fresh_database();
    let name = url.rsplit('/').next().unwrap();
    let create = Command::new("psql")
        .args([&common::server_url(), "-qc"])
        .arg(format!(
            "create database \"{name}\" template template0 encoding 'SQL_ASCII' locale 'C'"
        ))
        .status()
        .unwrap();
    assert!(create.success());
    for command in ["migrate", "api"] {
        let output = settle(&url).arg(command).output().unwrap();
        assert!(!output.status.success(), "{command} ran on SQL_ASCII");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            said.contains("SQL_ASCII") && said.contains("UTF8"),
            "{said}"
        );
    }
    let tables = Command::new("psql")
        .args([
            &url,
            "-Atc",
            "select count(*) from pg_tables where schemaname = 'public'",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tables.stdout).trim(), "0");
}

#[tokio::test]
async fn migrate_creates_a_utf8_database_on_a_cluster_whose_default_is_not() {
    let options = [
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "SQL_ASCII",
        "--locale=C",
    ];
    let Some(cluster) = common::cluster::Cluster::start_with(&options).await else {
        return;
    };
    let url = cluster.url("settle_test_sql_ascii_cluster");
    assert_eq!(encoding_of(&cluster.url("postgres")), "SQL_ASCII");
    let output = settle(&url).arg("migrate").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(encoding_of(&url), "UTF8");
}

#[test]
fn an_empty_but_unmigrated_database_is_refused_with_the_fix_named() {
    let (url, _db) = fresh_database();
    // Create the database only (no schema) through migrate's creation path, then drop the
    // migrations table to simulate a schema nobody applied.
    assert!(settle(&url).arg("migrate").status().unwrap().success());
    let drop = Command::new("psql")
        .args([&url, "-qc", "drop table _sqlx_migrations"])
        .status()
        .unwrap();
    assert!(drop.success());
    let output = settle(&url).arg("worker").output().unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("not migrated") && said.contains("settle migrate"),
        "{said}"
    );
}

#[test]
fn bad_configuration_names_the_key() {
    let (url, _db) = fresh_database();
    for (key, value, named) in [
        ("SETTLE_HTTP__PROT", "1", "prot"),
        ("WORKERS", "many", "concurrency"),
        ("SETTLE_WORKER__HEARTBEAT_MS", "0", "worker.heartbeat_ms"),
        (
            "SETTLE_DATABASE__MAX_CONNECTIONS",
            "1",
            "database.max_connections",
        ),
        (
            "SETTLE_IDEMPOTENCY__TTL_HOURS",
            "4294967297",
            "idempotency.ttl_hours",
        ),
        (
            "SETTLE_WORKER__RETENTION_HOURS",
            "0",
            "worker.retention_hours",
        ),
        (
            "SETTLE_SETTLEMENT__TIME_ZONE",
            "Mars/Olympus",
            "settlement.time_zone",
        ),
        ("SETTLE_SETTLEMENT__TIME_ZONE", "CET", "summer time"),
        (
            "SETTLE_HTTP__REQUEST_TIMEOUT_MS",
            "0",
            "http.request_timeout_ms",
        ),
        (
            "SETTLE_DATABASE__ACQUIRE_TIMEOUT_MS",
            "0",
            "acquire_timeout_ms",
        ),
        (
            "SETTLE_ORDERS__BATCH_TIMEOUT_MS",
            "3000000000",
            "orders.batch_timeout_ms",
        ),
        ("SETTLE_ORDERS__MAX_BATCH", "1000000000", "orders.max_batch"),
        ("SETTLE_LOG_FORMAT", "yaml", "settle_log_format=\"yaml\""),
        (
            "SETTLE_LOG",
            "info,sqlx=loud",
            "settle_log=\"info,sqlx=loud\"",
        ),
    ] {
        let output = settle(&url)
            .env(key, value)
            .arg("migrate")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key}={value} accepted");
        let said = String::from_utf8_lossy(&output.stderr).to_lowercase();
        assert!(said.contains(named), "{key}={value}: {said}");
    }
}

/// A `SETTLE_` variable wins over its conventional name: a shell that exports `DATABASE_URL`
/// for the sqlx tooling (README, "Developing") does not send `SETTLE_DATABASE__URL=… settle …`
/// to that other database (it did, saying nothing). The conventional name alone is still read.
#[test]
fn a_settle_variable_wins_over_its_conventional_name() {
    let (url, _db) = fresh_database();
    let both = settle(&url)
        .env("DATABASE_URL", "mysql://x")
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        both.status.success(),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
    let alone = common::settle_command()
        .env("DATABASE_URL", "mysql://x")
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!alone.status.success());
    let said = String::from_utf8_lossy(&alone.stderr).to_lowercase();
    assert!(said.contains("database.url"), "{said}");
}

/// A server that refuses connections is named as refusing them, once, not as a pool that timed
/// out; the log has no colour codes off a terminal.
#[test]
fn a_refused_connection_is_named_with_its_cause_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/settle");
    for command in ["api", "worker"] {
        let output = settle(&url)
            .env("SETTLE_DATABASE__ACQUIRE_TIMEOUT_MS", "300")
            .arg(command)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(said.matches("Connection refused").count(), 1, "{said}");
        assert!(!said.contains('\u{1b}'), "colour codes: {said}");
    }
}

/// A server that accepts connections and never answers (a hung host) is given up on after
/// `database.acquire_timeout_ms`, not waited for forever.
#[test]
fn a_server_that_never_answers_is_given_up_on() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepts, keeps each connection open, says nothing.
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/settle");
    let mut api = settle(&url)
        .env("SETTLE_DATABASE__ACQUIRE_TIMEOUT_MS", "300")
        .arg("api")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = api.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            api.kill().unwrap();
            panic!("api still waiting for a server that never answers");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
}

/// `serve` on a taken port says which and how to choose another, before it makes anything: no
/// database, no demo token.
#[test]
fn serve_on_a_taken_port_names_it_and_makes_nothing() {
    let (url, _db) = fresh_database();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = settle(&url)
        .env("PORT", &port)
        .args(["serve", "--demo"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains(&format!("127.0.0.1:{port}")) && said.contains("PORT"),
        "{said}"
    );
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let listed = Command::new("psql")
        .args([&common::server_url(), "-Atc"])
        .arg(format!(
            "select count(*) from pg_database where datname = '{}'",
            url.rsplit('/').next().unwrap()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "0");
    // A host that is not this machine's is named as the thing to change, not the port.
    for host in ["no-such-host.invalid", "192.0.2.1"] {
        let output = settle(&url)
            .env("SETTLE_HTTP__HOST", host)
            .arg("serve")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && said.contains("http.host"),
            "{said}"
        );
    }
}

/// `settle jobs` honours `database.migrate_on_start`, as its error's advice says.
#[test]
fn jobs_migrates_when_migrate_on_start_says_so() {
    let (url, _db) = fresh_database();
    let refused = settle(&url).args(["jobs", "list"]).output().unwrap();
    assert!(!refused.status.success());
    let listed = settle(&url)
        .env("SETTLE_DATABASE__MIGRATE_ON_START", "true")
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}

/// Processes that migrate on start (an `api` and a `worker` with
/// `database.migrate_on_start`) against a database that does not exist yet: each creates it,
/// and every one but the first is refused by Postgres, with 42P04 or, when the two CREATE
/// DATABASE statements overlap, with 23505 on `pg_database`'s unique index. All must start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_creating_a_missing_database_at_once_all_start() {
    for _ in 0..5 {
        let config = std::sync::Arc::new(common::test_config(&[]));
        let _db = common::TestDatabase::new(&config.database.url);
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move { settle::cli::open(&config, true).await })
            })
            .collect();
        for open in opens {
            let pool = open
                .await
                .unwrap()
                .expect("every process opens the database");
            pool.close().await;
        }
    }
}

/// The test suite's own switches, left exported in a developer's shell, are not configuration.
#[test]
fn the_test_suites_switches_are_not_configuration() {
    let (url, _db) = fresh_database();
    let migrate = settle(&url)
        .env("SETTLE_TEST_KEEP_DB", "1")
        .env("SETTLE_FUZZ_TOKEN", "x")
        .arg("migrate")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&migrate.stderr);
    assert!(migrate.status.success(), "{said}");
}

/// A kind the worker does not run, named in its per-kind settings (a typo), stops it at start
/// with the kind named, instead of being ignored; `serve` too, whose API would otherwise run
/// on without its workers.
#[tokio::test]
async fn a_worker_refuses_settings_for_a_kind_it_does_not_run() {
    let (url, _db) = fresh_database();
    assert!(settle(&url).arg("migrate").status().unwrap().success());
    for command in ["worker", "serve"] {
        let mut process = AsyncCommand::from(settle(&url));
        process
            .env("SETTLE_WORKER__KINDS__SETTLEMENTS__CONCURRENCY", "2")
            .env("SETTLE_HTTP__PORT", "0")
            .arg(command)
            .kill_on_drop(true);
        let ran = tokio::time::timeout(Duration::from_secs(30), process.output()).await;
        let output = ran.expect("it should refuse to start").unwrap();
        assert!(!output.status.success(), "{command}");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("`settlements`"), "{command}: {said}");
    }
}

#[tokio::test]
async fn api_binds_port_zero_logs_the_address_and_stops_on_sigterm_and_sigint() {
    for signal in ["-TERM", "-INT"] {
        serve_then_signal(signal).await;
    }
}

/// An `api` process (with `env` set) on a new migrated database, serving: the process, its base
/// URL, the rest of its log (held: a closed pipe would fail its logging) and the database's
/// guard.
async fn serving_api(
    env: &[(&str, &str)],
) -> (Child, String, impl Sized + use<>, common::TestDatabase) {
    let (url, db) = fresh_database();
    assert!(settle(&url).arg("migrate").status().unwrap().success());
    let mut command = settle(&url);
    command.envs(env.iter().copied()).arg("api");
    let mut child = AsyncCommand::from(command)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (base, _, log) = common::listening::base_url(&mut child).await;
    (child, base, log, db)
}

async fn serve_then_signal(signal: &str) {
    let (mut child, base, _log, _db) = serving_api(&[]).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s of the signal")
        .unwrap();
    assert!(status.success(), "graceful exit on {signal}: {status}");
}

/// A client that sends half a request head and then nothing: its connection is closed once
/// `http.header_read_timeout_ms` passes, and a SIGTERM's shutdown waits for such a connection
/// at most `http.request_timeout_ms` (both held their connection, and the process, for as
/// long as the client liked).
#[tokio::test]
async fn a_half_sent_request_head_holds_neither_its_connection_nor_a_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (header_read_ms, request_ms) in [("1000", "30000"), ("600000", "1000")] {
        let (mut child, base, _log, _db) = serving_api(&[
            ("SETTLE_HTTP__HEADER_READ_TIMEOUT_MS", header_read_ms),
            ("SETTLE_HTTP__REQUEST_TIMEOUT_MS", request_ms),
        ])
        .await;
        let addr = base.trim_start_matches("http://").to_owned();
        let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
        half.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        if header_read_ms == "1000" {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(20), half.read_to_end(&mut rest));
            read.await
                .expect("the connection is closed once the head is late")
                .ok();
            continue;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("exits though a client keeps its head unfinished")
            .unwrap();
        assert!(status.success(), "{status}");
        drop(half);
    }
}

/// A burst of connections while the process accepts none (stopped here, as a busy or paused
/// process is for a moment) waits in the kernel's listen queue, `http.listen_backlog` deep:
/// std's bind asked for 128, so the rest had their SYNs dropped, and nothing connected until
/// the process accepted again.
#[tokio::test]
async fn a_burst_of_connections_waits_in_the_listen_queue() {
    use nix::sys::signal::{Signal, kill};
    let (child, base, _log, _db) = serving_api(&[]).await;
    let addr = base.trim_start_matches("http://").to_owned();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let connects = (0..600).map(|_| {
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&addr),
        )
    });
    let connected = futures::future::join_all(connects).await;
    kill(pid, Signal::SIGCONT).unwrap();
    let held = connected.iter().filter(|c| matches!(c, Ok(Ok(_)))).count();
    assert_eq!(held, 600, "connections completed while nothing accepted");
}

/// SIGTERM reaches `serve` while orders wait on a locked product: the API still answers them
/// (201) before the process exits. (The workers' side, idle, stopped at once and closed the
/// pool it shares with the API: every order after the first got 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_its_in_flight_orders_after_sigterm() {
    let config = common::test_config(&[]);
    let (pool, _db) = common::migrated_pool(&config).await;
    let serve = common::api_process::start(&config.database.url, &["serve", "--demo"], &[]).await;
    let admin = common::auth::client_with(serve.stdout.last().expect("a token printed"));
    let lock = common::product_row_locked(&pool, 1).await;
    let orders: Vec<_> = (0..4)
        .map(|n| {
            let order =
                serde_json::json!({"product_id": 1, "quantity": 1, "buyer_id": format!("b-{n}")});
            let request = admin.post(format!("{}/api/v1/orders", serve.base));
            tokio::spawn(request.json(&order).send())
        })
        .collect();
    common::wait_for_lock_waiter(&pool, "from products").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    lock.rollback().await.unwrap();
    for order in orders {
        let (status, body) = common::status_and_json(order.await.unwrap().unwrap()).await;
        assert_eq!(status, 201, "{body}");
    }
}

/// A role that may not connect to the `postgres` database (as on many managed servers) still
/// migrates a database of its own that exists. Before, `migrate` (and `serve`, `seed`) always
/// connected to `postgres` first, to see whether the database existed, and failed.
#[tokio::test]
async fn migrate_needs_no_access_to_the_postgres_database_when_its_own_exists() {
    let Some(cluster) = common::cluster::Cluster::start().await else {
        return;
    };
    let status = Command::new("psql")
        .args([&cluster.url("postgres"), "-q"])
        .args([
            "-c",
            "create role app login",
            "-c",
            "create database app owner app",
        ])
        .args(["-c", "revoke connect on database postgres from public"])
        .status()
        .unwrap();
    assert!(status.success());
    let url = cluster.url("app").replace("postgres@", "app@");
    let output = settle(&url).arg("migrate").output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    // The database of a role that may not connect to `postgres` cannot be created for it.
    let missing = cluster.url("absent").replace("postgres@", "app@");
    let output = settle(&missing).arg("migrate").output().unwrap();
    assert!(!output.status.success());
}

/// A URL asking for TLS (`sslmode=require`, as managed Postgres services do) connects over
/// TLS. Before, sqlx was built without TLS: `require` failed and `prefer` (libpq's default)
/// connected in the clear.
#[tokio::test]
async fn a_url_asking_for_tls_connects_over_tls() {
    let (url, _db) = fresh_database();
    let ssl_on = Command::new("psql")
        .args([
            &format!("{}/postgres", common::server_url()),
            "-Atc",
            "show ssl",
        ])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&ssl_on.stdout).trim() != "on" {
        eprintln!("SKIPPED: the test server has ssl off");
        return;
    }
    let tls_url = format!("{url}?sslmode=require");
    let output = settle(&tls_url).arg("migrate").output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    // Without sslmode the connection is plain: sqlx's handshake would add about 0.1 s to
    // every new connection (reconnects, heartbeats, /readyz).
    assert_eq!(
        (over_tls(&tls_url).await, over_tls(&url).await),
        (true, false)
    );
}

/// Whether settle's connection to `url` is encrypted, as the server sees it.
async fn over_tls(url: &str) -> bool {
    let mut config = common::test_config(&[]);
    config.database.url = url.to_owned();
    let pool = settle::db::connect(&config.database, Duration::from_secs(5))
        .await
        .unwrap();
    sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap()
}
