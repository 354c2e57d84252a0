//! Access control (SPEC §4): every `/api/v1` route and the CSV download need a live bearer
//! token whose role may call it; health, metrics and the docs do not; unknown routes stay 404.

mod common;

use std::time::Duration;

use common::access::{calls, settlement_row};
use common::assert_response_refused;
use common::auth::client_with;
use common::{assert_error, spawn_app, spawn_app_with};
use serde_json::json;
use settle::tokens::Role;

#[tokio::test]
async fn each_role_reaches_exactly_its_route_families() {
    let app = spawn_app().await;
    let calls = calls(&app).await;
    for role in Role::ALL {
        let merchant = (role == Role::Merchant).then_some("m-1");
        let client = app.client_as(role, merchant).await;
        for call in &calls {
            let (status, body, _) = call.send(&app, &client).await;
            let what = format!("{role} {} {}: {body}", call.method, call.path);
            if role == Role::Admin || call.roles.contains(&role) {
                assert_eq!(status, call.allowed, "{what}");
            } else {
                assert_eq!(status, 403, "{what}");
                assert_error(&body, "FORBIDDEN");
            }
        }
    }
}

#[tokio::test]
async fn no_malformed_or_unknown_token_is_401_with_the_bearer_challenge() {
    let app = spawn_app().await;
    let calls = calls(&app).await;
    let unknown = format!("settle_{}", "0".repeat(64));
    let plain = reqwest::Client::new();
    let clients = [
        ("no token", plain.clone(), "Authorization"),
        ("unknown token", client_with(&unknown), "unknown or revoked"),
        (
            "malformed token",
            client_with("not-a-token"),
            "not one this service issues",
        ),
        (
            "cut short",
            client_with(&unknown[..20]),
            "not one this service issues",
        ),
    ];
    for (what, client, said) in &clients {
        for call in &calls {
            let (status, body, headers) = call.send(&app, client).await;
            assert_eq!(status, 401, "{what} {} {}: {body}", call.method, call.path);
            assert_error(&body, "UNAUTHENTICATED");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(said), "{what}: {body}");
            assert_eq!(headers["www-authenticate"], "Bearer");
        }
    }
    let basic = plain
        .get(app.url("/api/v1/jobs"))
        .basic_auth("admin", Some(&app.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401, "only the Bearer scheme is accepted");
    // Two credentials, a valid one first: neither counts.
    let twice = plain
        .get(app.url("/api/v1/jobs"))
        .header("authorization", format!("Bearer {}", app.admin_token))
        .header("authorization", format!("Bearer {unknown}"))
        .send()
        .await
        .unwrap();
    assert_response_refused(twice, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn health_metrics_and_the_docs_need_no_token() {
    let app = spawn_app().await;
    let plain = reqwest::Client::new();
    for path in ["/livez", "/readyz", "/api/v1/openapi.json", "/docs/"] {
        let status = plain.get(app.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_404_and_405_with_or_without_a_token() {
    let app = spawn_app().await;
    let shop = app.client_as(Role::Shop, None).await;
    for client in [&reqwest::Client::new(), &shop, &app.http] {
        let unknown = client.get(app.url("/api/v1/nothing-here")).send();
        assert_response_refused(unknown.await.unwrap(), 404, "NOT_FOUND").await;
        // The OpenAPI document already says which routes exist; a 405 tells no more.
        let wrong_method = client.delete(app.url("/api/v1/orders")).send();
        assert_response_refused(wrong_method.await.unwrap(), 405, "METHOD_NOT_ALLOWED").await;
    }
}

#[tokio::test]
async fn a_revoked_token_stops_working_within_the_cache_ttl() {
    let app = spawn_app_with(&[("auth.cache_ttl_ms", json!(2000))]).await;
    let shop = app.client_as(Role::Shop, None).await;
    let orders = || shop.get(app.url("/api/v1/orders")).send();
    assert_eq!(orders().await.unwrap().status(), 200);
    app.revoke_newest(Role::Shop).await;
    // Verified a moment ago, so trusted until the ttl runs out...
    assert_eq!(orders().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // ...then refused like any unknown token.
    assert_response_refused(orders().await.unwrap(), 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn without_a_cache_revocation_is_immediate() {
    let app = spawn_app_with(&[("auth.cache_ttl_ms", json!(0))]).await;
    let ingest = app.client_as(Role::Ingest, None).await;
    let transaction = json!({"merchant_id": "m-1", "external_id": "ch_1", "amount_cents": 1,
        "fee_cents": 0, "status": "PAID", "paid_at": "2025-01-01T00:00:00Z"});
    let transactions = || {
        ingest
            .post(app.url("/api/v1/transactions"))
            .json(&transaction)
            .send()
    };
    assert_eq!(transactions().await.unwrap().status(), 201);
    app.revoke_newest(Role::Ingest).await;
    assert_eq!(transactions().await.unwrap().status(), 401);
}

#[tokio::test]
async fn a_merchant_reads_its_own_settlements_only() {
    let app = spawn_app().await;
    settlement_row(&app, "m-1", "2025-01-01", 100).await;
    settlement_row(&app, "m-2", "2025-01-01", 200).await;
    let merchant = app.client_as(Role::Merchant, Some("m-1")).await;
    let page = |client: &reqwest::Client, query: &str| {
        let request = client.get(app.url(&format!("/api/v1/settlements{query}")));
        async move { common::status_and_json(request.send().await.unwrap()).await }
    };
    let merchants = |body: &serde_json::Value| -> Vec<String> {
        let rows = body["data"].as_array().expect("data");
        rows.iter()
            .map(|r| r["merchant_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, own) = page(&merchant, "").await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(merchants(&own), ["m-1"]);
    assert_eq!(own["data"][0]["gross_cents"], 100);
    assert_eq!(
        merchants(&page(&merchant, "?merchant_id=m-1").await.1),
        ["m-1"]
    );
    // Another merchant's rows answer as if they did not exist.
    let (status, other) = page(&merchant, "?merchant_id=m-2").await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(other, json!({"data": [], "next_cursor": null}));
    let (_, everyone) = page(&app.http, "").await;
    assert_eq!(merchants(&everyone), ["m-1", "m-2"]);
    assert_eq!(
        merchants(&page(&app.http, "?merchant_id=m-2").await.1),
        ["m-2"]
    );
    // Nor can it reach them another way: every job and CSV is admin only.
    let csv = merchant
        .get(app.url("/downloads/1.csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 403);
}

#[tokio::test]
async fn the_openapi_document_requires_the_bearer_scheme_on_protected_operations() {
    let app = spawn_app().await;
    let (_, doc) = app.get("/api/v1/openapi.json").await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let protected = path.starts_with("/api/v1/") || path.starts_with("/downloads/");
            let secured = operation["security"][0].get("bearer").is_some();
            assert_eq!(secured, protected, "{method} {path}");
            for status in ["401", "403"] {
                let documented = operation["responses"].get(status).is_some();
                assert_eq!(documented, protected, "{method} {path} {status}");
            }
        }
    }
    assert!(doc["paths"]["/api/v1/settlements"]["get"].is_object());
}
