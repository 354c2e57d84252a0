//! The SQL of products and orders: one small function per statement.

use sqlx::{AssertSqlSafe, PgConnection};

use super::{NewOrder, NewProduct, Order, Product, Rejected};

const PRODUCT_COLUMNS: &str =
    "id, name, stock, price_cents, sold, initial_stock, restocked, created_at, updated_at";

pub async fn insert_product(
    conn: &mut PgConnection,
    product: &NewProduct,
) -> Result<Product, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "insert into products (name, price_cents, initial_stock, stock)
         values ($1, $2, $3, $3)
         returning {PRODUCT_COLUMNS}"
    )))
    .bind(&product.name)
    .bind(product.price_cents)
    .bind(product.stock)
    .fetch_one(conn)
    .await
}

pub async fn get_product(conn: &mut PgConnection, id: i64) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "select {PRODUCT_COLUMNS} from products where id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Adds `quantity` units; `None` if the product does not exist.
pub async fn restock(
    conn: &mut PgConnection,
    id: i64,
    quantity: i64,
) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "update products
         set stock = stock + $2, restocked = restocked + $2, updated_at = now()
         where id = $1
         returning {PRODUCT_COLUMNS}"
    )))
    .bind(id)
    .bind(quantity)
    .fetch_optional(conn)
    .await
}

/// Places an order in one statement: the conditional decrement and the insert succeed or fail
/// together, and a buyer who would take stock below zero matches no row instead of waiting on
/// a `SELECT … FOR UPDATE` round trip. `stock_not_negative` backs this up in the schema.
pub async fn place_order(
    conn: &mut PgConnection,
    order: &NewOrder,
) -> Result<Result<Order, Rejected>, sqlx::Error> {
    let placed: Option<Order> = sqlx::query_as(
        "with taken as (
             update products
             set stock = stock - $2, sold = sold + $2, updated_at = now()
             where id = $1 and stock >= $2
             returning id, price_cents
         )
         insert into orders (product_id, buyer_id, quantity, unit_price_cents, total_cents)
         select id, $3, $2, price_cents, price_cents * $2 from taken
         returning id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at",
    )
    .bind(order.product_id)
    .bind(order.quantity.get())
    .bind(order.buyer_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(placed) = placed {
        return Ok(Ok(placed));
    }
    let available: Option<i64> = sqlx::query_scalar("select stock from products where id = $1")
        .bind(order.product_id)
        .fetch_optional(conn)
        .await?;
    Ok(Err(match available {
        None => Rejected::UnknownProduct,
        Some(available) => Rejected::OutOfStock { available },
    }))
}

pub async fn get_order(conn: &mut PgConnection, id: i64) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as(
        "select id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at
         from orders where id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Filters of an order listing.
#[derive(Debug, Default)]
pub struct OrderFilter {
    pub product_id: Option<i64>,
    pub buyer_id: Option<String>,
    /// Only orders with an id below this one (the keyset cursor).
    pub before_id: Option<i64>,
}

/// Newest first, keyset-paginated on `id` (never OFFSET).
pub async fn list_orders(
    conn: &mut PgConnection,
    filter: &OrderFilter,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    sqlx::query_as(
        "select id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at
         from orders
         where ($1::bigint is null or product_id = $1)
           and ($2::text is null or buyer_id = $2)
           and ($3::bigint is null or id < $3)
         order by id desc
         limit $4",
    )
    .bind(filter.product_id)
    .bind(filter.buyer_id.as_deref())
    .bind(filter.before_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}
