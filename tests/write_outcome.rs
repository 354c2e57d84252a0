//! A write other than an order (a product created, a restock, transactions stored, a
//! settlement queued) is never answered 503 SERVICE_UNAVAILABLE, "retry later", when it took
//! effect: a commit whose reply is lost is answered as done if it was, SERVICE_UNAVAILABLE only
//! if it certainly was not, and OUTCOME_UNKNOWN when the service cannot tell (a request past
//! its time limit while its commit hangs included). Otherwise a client retrying without a key,
//! as told, restocks twice or creates a second product.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use common::outcome::{app_behind_proxy, app_behind_proxy_with, post_keyed};
use common::proxy::CommitFault;
use common::{assert_refused, scalar, spawn_app_with};
use serde_json::json;
use sqlx::PgPool;

/// A restock's body.
fn ten() -> serde_json::Value {
    json!({"quantity": 10})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_commit_reply_was_lost_is_answered_done_and_a_cut_commit_unavailable() {
    let (proxy, app, direct) = app_behind_proxy().await;
    let product = app.product(5, 100).await;
    let restock = format!("/api/v1/products/{product}/restock");
    let lamp = json!({"name": "Lamp", "stock": 5, "price_cents": 900});
    let paid = json!({"merchant_id": "m", "external_id": "e-1", "amount_cents": 100,
                      "fee_cents": 1, "status": "PAID", "paid_at": "2025-01-01T10:00:00Z"});
    let days = json!({"from": "2025-01-01", "to": "2025-01-01"});
    let writes = [
        (restock.as_str(), None, ten(), 200),
        (restock.as_str(), Some("restock-key"), ten(), 200),
        ("/api/v1/products", None, lamp, 201),
        ("/api/v1/transactions", None, paid, 201),
        ("/api/v1/jobs/settlement", Some("job-key"), days, 202),
    ];
    for (path, key, body, done) in &writes {
        proxy.plan(CommitFault::LoseReply);
        let (status, answer) = post_keyed(&app, path, *key, body).await;
        assert_eq!(status, *done, "{path} took effect: {answer}");
        if key.is_some() {
            let replay = post_keyed(&app, path, *key, body).await;
            assert_eq!(replay, (status, answer), "{path}: the retry replays it");
        }
    }
    assert_eq!(app.stock(product).await, 25, "each restock once");
    let count = |table| scalar(&direct, table);
    assert_eq!(count("select count(*) from products").await, 2);
    assert_eq!(count("select count(*) from transactions").await, 1);
    assert_eq!(count("select count(*) from all_jobs").await, 1);

    proxy.plan(CommitFault::CutBefore);
    assert_refused(
        post_keyed(&app, &restock, None, &ten()).await,
        503,
        "SERVICE_UNAVAILABLE",
    );
    assert_eq!(app.stock(product).await, 25, "nothing restocked");
    assert_eq!(proxy.faults(), (0, writes.len() as u64, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_that_cannot_be_found_is_outcome_unknown_and_a_keyed_retry_resolves_it() {
    let (proxy, app, _direct) = app_behind_proxy().await;
    let product = app.product(5, 100).await;
    let restock = format!("/api/v1/products/{product}/restock");
    proxy.plan(CommitFault::LoseReplyThenBlackout);
    let unknown = post_keyed(&app, &restock, Some("k"), &ten()).await;
    assert_refused(unknown, 503, "OUTCOME_UNKNOWN");
    proxy.restore();
    let (status, resolved) = post_keyed(&app, &restock, Some("k"), &ten()).await;
    assert_eq!(
        (status, &resolved["stock"]),
        (200, &json!(15)),
        "{resolved}"
    );
    assert_eq!(app.stock(product).await, 15, "restocked once");
}

/// The request's time limit runs out while its commit, which reached the server, gets no
/// reply: the write may be done (it is), so the answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_past_its_time_limit_in_its_commit_is_outcome_unknown() {
    let limit = [("http.request_timeout_ms", json!(2000))];
    let (proxy, app, direct) = app_behind_proxy_with(&limit).await;
    let product = app.product(5, 100).await;
    for (path, body) in [
        (format!("/api/v1/products/{product}/restock"), ten()),
        (
            "/api/v1/products".into(),
            json!({"name": "Lamp", "stock": 1, "price_cents": 1}),
        ),
    ] {
        proxy.plan(CommitFault::Partition {
            commit_arrives: true,
        });
        let answer = post_keyed(&app, &path, None, &body).await;
        assert_refused(answer, 503, "OUTCOME_UNKNOWN");
    }
    assert_eq!(app.stock(product).await, 15, "the restock took effect");
    assert_eq!(scalar(&direct, "select count(*) from products").await, 2);
}

/// A review's repro: every commit waits for a synchronous standby that does not exist, and an
/// operator terminates the waiting backend; its commit stands (committed locally). Restocks
/// are sent one after another until one waits (the setting reaches the backends a moment after
/// the reload); every one is answered done, and each is done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restock_whose_backend_is_terminated_waiting_for_a_standby_is_answered_done() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let app = spawn_app_with(&[("database.url", json!(cluster.url("settle_syncrep")))]).await;
    let product = app.product(5, 100).await;
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    let standby = async |names: &str| {
        let set = format!("alter system set synchronous_standby_names = '{names}'");
        for sql in [set.as_str(), "select pg_reload_conf()"] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    standby("ghost").await;
    let stop = AtomicBool::new(false);
    let terminate = async {
        let waiting = "select count(*) from pg_stat_activity where wait_event = 'SyncRep'";
        common::processes::wait_for(Duration::from_secs(10), "a commit waiting", || async {
            (scalar(&admin, waiting).await > 0).then_some(())
        })
        .await;
        // Before the terminate, so no restock is sent after the one that waits.
        stop.store(true, Ordering::SeqCst);
        let kill = "select pg_terminate_backend(pid) from pg_stat_activity \
                    where wait_event = 'SyncRep'";
        sqlx::query(kill).execute(&admin).await.unwrap();
    };
    let restocks = async {
        let (path, ten) = (format!("/api/v1/products/{product}/restock"), ten());
        let mut answers = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            answers.push(post_keyed(&app, &path, None, &ten).await);
        }
        answers
    };
    let (answers, ()) = tokio::join!(restocks, terminate);
    standby("").await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(app.stock(product).await, 5 + 10 * answers.len() as i64);
}
