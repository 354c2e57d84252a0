//! The route families of the access-control tests: one request of each, what it answers when
//! allowed, and which roles besides admin may send it.

use serde_json::{Value, json};
use settle::tokens::Role::{self, Ingest, Merchant, Shop};

use super::TestApp;

/// One request of a route family.
pub struct Call {
    pub method: reqwest::Method,
    pub path: String,
    pub body: Option<Value>,
    /// Its status when the caller may send it.
    pub allowed: u16,
    /// The roles allowed besides admin.
    pub roles: &'static [Role],
}

impl Call {
    fn new(method: &str, path: impl Into<String>, allowed: u16, roles: &'static [Role]) -> Self {
        Self {
            method: method.parse().expect("method"),
            path: path.into(),
            body: None,
            allowed,
            roles,
        }
    }

    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// Sends the call with `client`; returns the status and the parsed body.
    pub async fn send(
        &self,
        app: &TestApp,
        client: &reqwest::Client,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = client.request(self.method.clone(), app.url(&self.path));
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request sent");
        let headers = response.headers().clone();
        let (status, body) = super::status_and_json(response).await;
        (status, body, headers)
    }
}

/// A product, an order and a queued settlement job to address, and one call of every protected
/// route family.
pub async fn calls(app: &TestApp) -> Vec<Call> {
    let product = app.product(1_000, 100).await;
    let order = json!({"product_id": product, "quantity": 1, "buyer_id": "buyer-1"});
    let (status, placed) = app.post("/api/v1/orders", &order).await;
    assert_eq!(status, 201, "{placed}");
    let job = app.post_settlement("2025-01-01", "2025-01-01").await;
    let transaction = json!({"merchant_id": "m-1", "external_id": "ch_1", "amount_cents": 100,
        "fee_cents": 1, "status": "PAID", "paid_at": "2025-01-01T10:00:00Z"});
    vec![
        Call::new("GET", format!("/api/v1/products/{product}"), 200, &[Shop]),
        Call::new("POST", "/api/v1/products", 201, &[])
            .body(json!({"name": "p", "stock": 1, "price_cents": 1})),
        Call::new(
            "POST",
            format!("/api/v1/products/{product}/restock"),
            200,
            &[],
        )
        .body(json!({"quantity": 1})),
        Call::new("POST", "/api/v1/orders", 201, &[Shop]).body(order),
        Call::new(
            "GET",
            format!("/api/v1/orders/{}", placed["id"]),
            200,
            &[Shop],
        ),
        Call::new("GET", "/api/v1/orders", 200, &[Shop]),
        Call::new("POST", "/api/v1/transactions", 201, &[Ingest]).body(transaction),
        Call::new("POST", "/api/v1/jobs/settlement", 202, &[])
            .body(json!({"from": "2025-01-01", "to": "2025-01-02"})),
        Call::new("GET", "/api/v1/jobs", 200, &[]),
        Call::new("GET", format!("/api/v1/jobs/{job}"), 200, &[]),
        Call::new("POST", format!("/api/v1/jobs/{job}/cancel"), 202, &[]).body(json!({})),
        // Allowed, it is 404 until the job completes; refused, 403 before anything is read.
        Call::new("GET", format!("/downloads/{job}.csv"), 404, &[]),
        Call::new("GET", "/api/v1/settlements", 200, &[Merchant]),
    ]
}

/// Inserts a settlement row as a completed job would have written it.
pub async fn settlement_row(app: &TestApp, merchant: &str, date: &str, gross: i64) {
    sqlx::query(
        "insert into settlements
             (merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, job_id, snapshot_id)
         values ($1, $2::date, $3, 0, $3, 1, 1, 1)",
    )
    .bind(merchant)
    .bind(date)
    .bind(gross)
    .execute(&app.pool)
    .await
    .expect("settlement row");
}
