//! `GET /api/v1/settlements`: keyset pages of the settlements table in (merchant_id, date)
//! order, filtered by merchant and days, with the list endpoints' limits and cursors.

mod common;

use common::access::settlement_row;
use common::spawn_app;
use serde_json::Value;

fn keys(page: &Value) -> Vec<String> {
    let rows = page["data"].as_array().expect("data");
    rows.iter()
        .map(|r| {
            format!(
                "{} {}",
                r["merchant_id"].as_str().unwrap(),
                r["date"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn pages_walk_every_row_once_in_merchant_then_date_order() {
    let app = spawn_app().await;
    // Inserted out of order; "B" sorts before "a" bytewise.
    for (merchant, date) in [
        ("a", "2025-01-02"),
        ("B", "2025-01-01"),
        ("a", "2025-01-01"),
        ("a_b", "2025-01-01"),
    ] {
        settlement_row(&app, merchant, date, 10).await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/settlements?limit=3".to_owned();
    loop {
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(keys(&page));
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        path = format!("/api/v1/settlements?limit=3&cursor={cursor}");
    }
    assert_eq!(
        seen,
        [
            "B 2025-01-01",
            "a 2025-01-01",
            "a 2025-01-02",
            "a_b 2025-01-01"
        ]
    );
    let (_, first) = app.get("/api/v1/settlements?limit=1").await;
    let row = &first["data"][0];
    for field in [
        "gross_cents",
        "fee_cents",
        "net_cents",
        "txn_count",
        "generated_at",
        "job_id",
    ] {
        assert!(!row[field].is_null(), "{field} in {row}");
    }
}

#[tokio::test]
async fn days_and_merchant_filter_and_bad_parameters_are_refused() {
    let app = spawn_app().await;
    for date in ["2025-01-01", "2025-01-02", "2025-01-03"] {
        settlement_row(&app, "m-1", date, 10).await;
        settlement_row(&app, "m-2", date, 10).await;
    }
    let (_, page) = app
        .get("/api/v1/settlements?merchant_id=m-2&from=2025-01-02&to=2025-01-02")
        .await;
    assert_eq!(keys(&page), ["m-2 2025-01-02"]);
    let (_, page) = app.get("/api/v1/settlements?from=2025-01-03").await;
    assert_eq!(keys(&page), ["m-1 2025-01-03", "m-2 2025-01-03"]);
    let dates = [
        ("from=2025-02-30", 422, "INVALID_DATE"),
        // Before 4714 BC: a day Postgres cannot hold (was a 500).
        ("from=-4713-11-23", 422, "INVALID_DATE"),
        ("to=%2B200000-01-01", 422, "INVALID_DATE"),
        ("from=2025-01-03&to=2025-01-01", 422, "INVALID_DATE_RANGE"),
    ];
    app.assert_list_refuses("/api/v1/settlements", &dates).await;
}
