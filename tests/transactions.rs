//! `POST /api/v1/transactions` through the real HTTP server: single and array inserts, re-sends
//! that cannot double-count, and bad input answered with the right 4xx and nothing stored.

mod common;

use common::{TestApp, assert_error, spawn_app, spawn_app_with, status_and_json};
use common::{assert_refused, assert_response_refused};
use serde_json::{Value, json};

/// A transaction whose provider id is derived from its fields, so equal calls are re-sends.
fn txn(merchant: &str, amount: i64, fee: i64) -> Value {
    json!({"merchant_id": merchant, "external_id": format!("ch_{merchant}_{amount}_{fee}"),
           "amount_cents": amount, "fee_cents": fee,
           "status": "PAID", "paid_at": "2025-01-31T23:59:59Z"})
}

fn report(inserted: u64, duplicates: u64) -> Value {
    json!({"inserted": inserted, "duplicates": duplicates})
}

/// Posts [`txn`]`("m-1", 1000, 30)` paid `at`.
async fn post_paid_at(app: &TestApp, at: &str) -> (u16, Value) {
    let mut body = txn("m-1", 1000, 30);
    body["paid_at"] = json!(at);
    app.post("/api/v1/transactions", &body).await
}

async fn stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from transactions")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_single_transaction_is_stored_in_utc() {
    let app = spawn_app().await;
    let answer = post_paid_at(&app, "2025-02-01T08:59:59+09:00").await;
    assert_eq!(answer, (201, report(1, 0)));
    let row: (String, String, i64, i64, String, String) = sqlx::query_as(
        "select merchant_id, external_id, amount_cents, fee_cents, status,
                to_char(paid_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS')
         from transactions",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "m-1".into(),
            "ch_m-1_1000_30".into(),
            1000,
            30,
            "PAID".into(),
            "2025-01-31T23:59:59".into()
        )
    );
}

#[tokio::test]
async fn an_array_is_stored_whole() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..50)
        .map(|i| txn(&format!("m-{i}"), 100 + i, i))
        .collect();
    let (status, answer) = app.post("/api/v1/transactions", &json!(batch)).await;
    assert_eq!((status, answer), (201, report(50, 0)));
    assert_eq!(stored(&app).await, 50);
}

#[tokio::test]
async fn a_resent_batch_stores_nothing_and_counts_duplicates() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..5).map(|i| txn("m-1", 100 + i, 1)).collect();
    assert_eq!(
        app.post("/api/v1/transactions", &json!(batch[..3])).await,
        (201, report(3, 0))
    );
    // The lost-response retry, with two more that are new this time.
    assert_eq!(
        app.post("/api/v1/transactions", &json!(batch)).await,
        (201, report(2, 3))
    );
    assert_eq!(
        app.post("/api/v1/transactions", &json!(batch)).await,
        (201, report(0, 5))
    );
    // Repeated inside one request: stored once.
    let twice = json!([txn("m-2", 7, 1), txn("m-2", 7, 1)]);
    assert_eq!(
        app.post("/api/v1/transactions", &twice).await,
        (201, report(1, 1))
    );
    // The same provider id under another merchant is another payment.
    let mut other = txn("m-1", 100, 1);
    other["merchant_id"] = json!("m-3");
    assert_eq!(
        app.post("/api/v1/transactions", &other).await,
        (201, report(1, 0))
    );
    assert_eq!(stored(&app).await, 7);
}

#[tokio::test]
async fn a_conflicting_resend_is_409_and_stores_nothing_of_the_request() {
    let app = spawn_app().await;
    let first = txn("m-1", 100, 1);
    assert_eq!(app.post("/api/v1/transactions", &first).await.0, 201);
    for field in ["amount_cents", "fee_cents", "status", "paid_at"] {
        let mut changed = first.clone();
        changed[field] = match field {
            "status" => json!("REFUNDED"),
            "paid_at" => json!("2025-01-30T00:00:00Z"),
            _ => json!(50),
        };
        let batch = json!([txn("m-9", 1, 0), txn("m-9", 2, 0), changed]);
        let (status, error) = app.post("/api/v1/transactions", &batch).await;
        assert_eq!(status, 409, "{field}: {error}");
        assert_error(&error, "TRANSACTION_CONFLICT");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("already has a transaction"), "{message}");
        assert_eq!(error["error"]["index"], 2, "{error}");
        assert_eq!(error["error"]["merchant_id"], "m-1");
        assert_eq!(error["error"]["external_id"], "ch_m-1_100_1");
    }
    // Inside one request: the same identity twice with different fields. The later element
    // is the conflict, however many elements the insert sorts (Postgres' sort is not stable).
    for size in [2, 1000] {
        let mut batch: Vec<Value> = (0..size - 1).map(|i| txn("m-5", 10 + i, 1)).collect();
        let mut changed = batch[0].clone();
        changed["amount_cents"] = json!(5);
        batch.push(changed);
        let (status, error) = app.post("/api/v1/transactions", &json!(batch)).await;
        assert_eq!(status, 409, "{error}");
        assert_error(&error, "TRANSACTION_CONFLICT");
        assert_eq!(error["error"]["index"], size - 1, "of {size}");
        assert_eq!(error["error"]["external_id"], "ch_m-5_10_1");
        // Nothing is stored under that id: the request itself holds both.
        let message = error["error"]["message"].as_str().unwrap();
        let said = format!(
            "transactions[{}]: the request holds two different transactions \"ch_m-5_10_1\" \
             of merchant \"m-5\" (the other is transactions[0])",
            size - 1
        );
        assert_eq!(message, said);
    }
    assert_eq!(stored(&app).await, 1);
}

#[tokio::test]
async fn concurrent_resends_store_each_transaction_once() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..200)
        .map(|i| txn(&format!("m-{}", i % 7), i, 0))
        .collect();
    let body = json!(batch);
    let sends = (0..8).map(|_| app.post("/api/v1/transactions", &body));
    let answers = futures::future::join_all(sends).await;
    let mut inserted = 0;
    for (status, answer) in answers {
        assert_eq!(status, 201, "{answer}");
        assert_eq!(
            answer["inserted"].as_u64().unwrap() + answer["duplicates"].as_u64().unwrap(),
            200
        );
        inserted += answer["inserted"].as_u64().unwrap();
    }
    assert_eq!(inserted, 200);
    assert_eq!(stored(&app).await, 200);
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer() {
    let app = spawn_app().await;
    let body = json!([txn("m-1", 1, 0), txn("m-1", 2, 0)]);
    let post = |body: Value| {
        app.http
            .post(app.url("/api/v1/transactions"))
            .header("idempotency-key", "ingest-batch-1")
            .json(&body)
            .send()
    };
    let first = common::status_and_json(post(body.clone()).await.unwrap()).await;
    assert_eq!(first, (201, report(2, 0)));
    // A replay says what the first request did, not "2 duplicates".
    let again = common::status_and_json(post(body).await.unwrap()).await;
    assert_eq!(again, first);
    let reused = post(json!([txn("m-1", 3, 0)])).await.unwrap();
    assert_response_refused(reused, 422, "IDEMPOTENCY_KEY_REUSED").await;
    assert_eq!(stored(&app).await, 2);
    // Two keys: which one the client meant is unknown, so neither is used.
    let two_keys = app
        .http
        .post(app.url("/api/v1/transactions"))
        .header("idempotency-key", "ingest-batch-2")
        .header("idempotency-key", "ingest-batch-1")
        .json(&json!([txn("m-1", 4, 0)]))
        .send()
        .await
        .unwrap();
    assert_response_refused(two_keys, 422, "INVALID_IDEMPOTENCY_KEY").await;
    assert_eq!(stored(&app).await, 2);
}

/// Bodies refused before any transaction is read, each storing nothing: a transaction written
/// as an array of its fields in order (which serde would take for the struct), with or without
/// a key (keyed, the handler once panicked writing the amounts back into it, and the client got
/// no answer at all); and two Content-Type headers (axum read the first alone, taking
/// application/json then text/plain).
#[tokio::test]
async fn bodies_not_read_as_transactions_are_refused_and_store_nothing() {
    let app = spawn_app().await;
    let fields = json!(["m-5", "arr1", 500, 5, "PAID", "2025-01-15T12:00:00Z"]);
    let one = txn("m-1", 1, 0);
    let (bad, key) = ("INVALID_BODY", |key| Some(("idempotency-key", key)));
    for (body, header, status, code) in [
        (json!([fields]), None, 400, bad),
        (json!([fields]), key("k-arr-1"), 400, bad),
        (json!([one, fields]), key("k-arr-2"), 400, bad),
        // `json` sends one Content-Type (application/json) first; this is the second.
        (
            one,
            Some(("content-type", "text/plain")),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
    ] {
        let mut request = app.http.post(app.url("/api/v1/transactions")).json(&body);
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        assert_response_refused(request.send().await.unwrap(), status, code).await;
    }
    assert_eq!(stored(&app).await, 0);
}

/// The stored request is jsonb, which keeps the float `1e16` (as serde_json writes it back) as
/// the integer `10000000000000000`: the same bytes sent again are the same request, not a
/// reuse of the key.
#[tokio::test]
async fn a_resend_with_an_amount_in_exponent_form_replays() {
    let app = spawn_app().await;
    let body = r#"{"merchant_id": "m-1", "external_id": "ch_exp", "amount_cents": 1e16,
                   "fee_cents": 3e1, "status": "PAID", "paid_at": "2025-01-31T12:00:00Z"}"#;
    let post = || {
        app.http
            .post(app.url("/api/v1/transactions"))
            .header("idempotency-key", "exponent")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = common::status_and_json(post().await.unwrap()).await;
    assert_eq!(first, (201, report(1, 0)));
    let again = common::status_and_json(post().await.unwrap()).await;
    assert_eq!(again, first);
}

/// The key's request holds each amount exactly: a resend under the key whose amount differs by
/// one cent beyond a float's precision is another request (the same float would replay it).
#[tokio::test]
async fn a_keyed_resend_with_another_large_amount_is_refused() {
    let app = spawn_app().await;
    let body = |amount: &str| {
        format!(
            r#"{{"merchant_id": "m-1", "external_id": "ch_big", "amount_cents": {amount},
                 "fee_cents": 0, "status": "PAID", "paid_at": "2025-01-31T12:00:00Z"}}"#
        )
    };
    let post = |body: String| {
        app.http
            .post(app.url("/api/v1/transactions"))
            .header("idempotency-key", "large")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = status_and_json(post(body("9007199254740993.0")).await.unwrap()).await;
    assert_eq!(first, (201, report(1, 0)));
    let other = post(body("9007199254740994.0")).await.unwrap();
    assert_response_refused(other, 422, "IDEMPOTENCY_KEY_REUSED").await;
    // The same amount written as an integer is the same request.
    let again = status_and_json(post(body("9007199254740993")).await.unwrap()).await;
    assert_eq!(again, first);
}

/// `paid_at` is kept to the microsecond without leaving its day: digits past the microsecond
/// are dropped toward the past (also before 2000, where a cut toward zero would round up), and
/// a leap second is the last microsecond of its minute.
#[tokio::test]
async fn paid_at_is_kept_to_the_microsecond_on_its_own_day() {
    let app = spawn_app().await;
    let sent = [
        (
            "ch_before_2000",
            "1999-12-31T23:59:59.9999999Z",
            "1999-12-31 23:59:59.999999",
        ),
        (
            "ch_leap",
            "2016-12-31T23:59:60Z",
            "2016-12-31 23:59:59.999999",
        ),
        (
            "ch_nanos",
            "2025-01-01T00:00:00.000000900Z",
            "2025-01-01 00:00:00.000000",
        ),
    ];
    for (external_id, paid_at, _) in sent {
        let mut body = txn("m-1", 1000, 30);
        body["external_id"] = json!(external_id);
        body["paid_at"] = json!(paid_at);
        assert_eq!(app.post("/api/v1/transactions", &body).await.0, 201);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select external_id,
                to_char(paid_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')
         from transactions order by id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = sent
        .iter()
        .map(|&(id, _, kept)| (id.to_owned(), kept.to_owned()))
        .collect();
    assert_eq!(rows, expected);
}

#[tokio::test]
async fn bad_fields_are_422_naming_the_field_and_store_nothing() {
    let app = spawn_app().await;
    let cases: [(&str, Value, &str); 13] = [
        ("external_id", json!(""), "INVALID_EXTERNAL_ID"),
        ("external_id", json!("x".repeat(129)), "INVALID_EXTERNAL_ID"),
        ("external_id", json!("ch 1"), "INVALID_EXTERNAL_ID"),
        ("status", json!("SETTLED"), "INVALID_STATUS"),
        ("amount_cents", json!(-1), "INVALID_AMOUNT"),
        ("fee_cents", json!(1001), "INVALID_FEE"),
        ("fee_cents", json!(-5), "INVALID_FEE"),
        ("paid_at", json!("2025-13-01T00:00:00Z"), "INVALID_PAID_AT"),
        ("paid_at", json!("2025-01-01T00:00:00"), "INVALID_PAID_AT"),
        // `format: date-time` (RFC 3339's grammar) has a T where chrono also takes a space.
        ("paid_at", json!("2025-01-15 12:00:00Z"), "INVALID_PAID_AT"),
        ("merchant_id", json!(""), "INVALID_MERCHANT_ID"),
        ("merchant_id", json!("x".repeat(256)), "INVALID_MERCHANT_ID"),
        ("merchant_id", json!("a\u{0}b"), "INVALID_MERCHANT_ID"),
    ];
    for (field, value, code) in cases {
        let mut body = txn("m-1", 1000, 30);
        body[field] = value;
        let (status, error) = app.post("/api/v1/transactions", &body).await;
        assert_eq!(status, 422, "{field}: {error}");
        assert_error(&error, code);
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn wrong_shapes_are_400() {
    let app = spawn_app().await;
    let mut wrong_type = txn("m-1", 1000, 30);
    wrong_type["amount_cents"] = json!("1000");
    let mut unknown = txn("m-1", 1000, 30);
    unknown["currency"] = json!("EUR");
    let mut missing = txn("m-1", 1000, 30);
    missing.as_object_mut().unwrap().remove("paid_at");
    for body in [wrong_type, unknown, missing, json!(42), json!([1, 2])] {
        assert_refused(
            app.post("/api/v1/transactions", &body).await,
            400,
            "INVALID_BODY",
        );
    }
    let response = post_text(&app, "{\"merchant_id\": ".into()).await;
    assert_response_refused(response, 400, "MALFORMED_JSON").await;
    assert_eq!(stored(&app).await, 0);
}

/// Posts `body` as written (a JSON text `json!` cannot make).
async fn post_text(app: &TestApp, body: String) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/transactions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_field_written_twice_is_refused_not_overwritten() {
    let app = spawn_app().await;
    let once = txn("m-1", 1000, 30).to_string();
    let twice = once.replacen('{', r#"{"merchant_id": "m-2", "#, 1);
    for body in [twice.clone(), format!("[{once}, {twice}]")] {
        assert_response_refused(post_text(&app, body).await, 400, "INVALID_BODY").await;
    }
    assert_eq!(stored(&app).await, 0);
    // Whitespace around the array is still an array.
    let answer = status_and_json(post_text(&app, format!(" \n [{once}] \n")).await).await;
    assert_eq!(answer, (201, report(1, 0)));
}

/// An amount is stored as written or refused: never as the nearest 64-bit float (which the
/// first two would be: 9007199254740994 and 1).
#[tokio::test]
async fn an_amount_is_stored_exactly_as_written_or_refused() {
    let app = spawn_app().await;
    let body = |amount: &str| {
        let text = txn("m-1", 1, 0).to_string();
        text.replacen(
            r#""amount_cents":1,"#,
            &format!(r#""amount_cents":{amount},"#),
            1,
        )
    };
    for amount in ["12345678901234567.5", "1.0000000000000001", "1e-2"] {
        let refused = post_text(&app, body(amount)).await;
        assert_response_refused(refused, 400, "INVALID_BODY").await;
    }
    let answer = status_and_json(post_text(&app, body("9007199254740993.0")).await).await;
    assert_eq!(answer, (201, report(1, 0)));
    let amount = common::scalar(&app.pool, "select amount_cents from transactions").await;
    assert_eq!(amount, 9_007_199_254_740_993);
}

#[tokio::test]
async fn one_bad_element_stores_none_of_the_array() {
    let app = spawn_app().await;
    let mut batch: Vec<Value> = (0..10).map(|i| txn("m-1", 100 + i, 1)).collect();
    batch[7]["fee_cents"] = json!(10_000);
    let (status, error) = app.post("/api/v1/transactions", &json!(batch)).await;
    assert_eq!(status, 422, "{error}");
    assert_error(&error, "INVALID_FEE");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("transactions[7]"),
        "{error}"
    );
    assert_eq!(error["error"]["index"], 7, "{error}");
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn arrays_are_bounded_and_not_empty() {
    let app = spawn_app_with(&[("settlement.max_transactions_per_request", json!(5))]).await;
    let batch: Vec<Value> = (0..6).map(|i| txn("m-1", 100 + i, 1)).collect();
    assert_refused(
        app.post("/api/v1/transactions", &json!(batch)).await,
        422,
        "INVALID_BATCH_SIZE",
    );
    assert_refused(
        app.post("/api/v1/transactions", &json!([])).await,
        422,
        "INVALID_BATCH_SIZE",
    );
    assert_eq!(stored(&app).await, 0);
    let (status, rows) = app.post("/api/v1/transactions", &json!(batch[..5])).await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(stored(&app).await, 5);
}

/// An instant whose day is not a day of the years 1 to 9999 in some zone is refused, through
/// the API (422, nothing stored) and by the table itself for any other writer: a CSV would
/// write its day as `0001-… BC`, and a zone's statistics could not be computed.
#[tokio::test]
async fn an_instant_at_the_edge_of_the_calendar_is_refused() {
    let app = spawn_app().await;
    let (status, answer) = post_paid_at(&app, "0000-06-01T12:00:00Z").await;
    assert_eq!(status, 422);
    assert_error(&answer, "INVALID_PAID_AT");
    let direct = sqlx::query(
        "insert into transactions
             (merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
         values ('m-1', 'ch_far', 1, 0, 'PAID', '294276-12-31 23:00:00+00')",
    )
    .execute(&app.pool)
    .await
    .unwrap_err();
    let code = direct.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("23514"), "{direct}");
    assert_eq!(stored(&app).await, 0);
}
