//! `/api/v1/products`: a name as sent and as stored, and the list: every product with its
//! stock, newest first, in keyset pages.

mod common;

use common::assert_refused;
use common::{spawn_app, spawn_app_with};
use serde_json::{Value, json};

fn ids(page: &Value) -> Vec<i64> {
    page["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .map(|p| p["id"].as_i64().expect("product id"))
        .collect()
}

/// The document's `maxLength` (200) holds for the name as sent; what is stored is trimmed.
#[tokio::test]
async fn a_name_of_200_characters_as_sent_is_stored_trimmed() {
    let app = spawn_app().await;
    let name = format!("  {}\t\n", "n".repeat(196));
    let (status, product) = app
        .post(
            "/api/v1/products",
            &json!({"name": name, "stock": 1, "price_cents": 1}),
        )
        .await;
    assert_eq!(status, 201, "{product}");
    assert_eq!(product["name"], "n".repeat(196));
}

#[tokio::test]
async fn products_list_newest_first_in_keyset_pages_with_their_stock() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for stock in 1..=5 {
        created.push(app.product(stock, 250).await);
    }
    let (status, sold) = app
        .post(
            "/api/v1/orders",
            &json!({"product_id": created[4], "quantity": 2, "buyer_id": "b"}),
        )
        .await;
    assert_eq!(status, 201, "{sold}");

    let (status, first) = app.get("/api/v1/products?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), vec![created[4], created[3]]);
    // The same shape as GET /api/v1/products/{id}, with the order's effect on stock.
    let (_, one) = app.get(&format!("/api/v1/products/{}", created[4])).await;
    assert_eq!(first["data"][0], one);
    assert_eq!(
        (one["stock"].as_i64(), one["sold"].as_i64()),
        (Some(3), Some(2))
    );

    let mut seen = ids(&first);
    let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
    let mut pages = 1;
    while let Some(c) = cursor {
        let (status, page) = app
            .get(&format!("/api/v1/products?limit=2&cursor={c}"))
            .await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 3, "5 products in pages of 2");
    created.reverse();
    assert_eq!(seen, created, "newest first, each product once");
}

#[tokio::test]
async fn products_list_uses_the_configured_page_sizes() {
    let app = spawn_app_with(&[
        ("pagination.default_page_size", json!(2)),
        ("pagination.max_page_size", json!(3)),
    ])
    .await;
    for _ in 0..3 {
        app.product(1, 1).await;
    }
    let (_, page) = app.get("/api/v1/products").await;
    assert_eq!(ids(&page).len(), 2, "{page}");
    assert!(page["next_cursor"].is_string());
    let (_, page) = app.get("/api/v1/products?limit=3").await;
    assert_eq!(ids(&page).len(), 3, "{page}");
    assert!(page["next_cursor"].is_null());
    assert_refused(
        app.get("/api/v1/products?limit=4").await,
        422,
        "INVALID_LIMIT",
    );
    // Integers in the query and the path as JSON Schema's `integer` (the document's type)
    // allows them, as bodies take them; not an integer, still refused.
    let (status, page) = app.get("/api/v1/products?limit=3.0").await;
    assert_eq!((status, ids(&page).len()), (200, 3), "{page}");
    let id = ids(&page)[0];
    let (status, product) = app.get(&format!("/api/v1/products/{id}.0")).await;
    assert_eq!((status, &product["id"]), (200, &json!(id)), "{product}");
    assert_refused(
        app.get("/api/v1/products?limit=2.5").await,
        400,
        "INVALID_QUERY",
    );
}

#[tokio::test]
async fn products_list_refuses_bad_limits_and_cursors() {
    let app = spawn_app().await;
    // An id cursor is a positive id.
    let ids = [
        ("cursor=0", 400, "INVALID_CURSOR"),
        ("cursor=-5", 400, "INVALID_CURSOR"),
    ];
    app.assert_list_refuses("/api/v1/products", &ids).await;
    let (_, spec) = app.get("/api/v1/openapi.json").await;
    let list = &spec["paths"]["/api/v1/products"]["get"];
    for status in ["200", "400", "422"] {
        assert!(list["responses"][status].is_object(), "{status} documented");
    }
}
