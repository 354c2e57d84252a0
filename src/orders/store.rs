//! The SQL of products and orders: one small function per statement.

use sqlx::PgConnection;

use super::{NewOrder, NewProduct, Order, Product, Rejected};

// Each statement spells out the product's columns: the checked macros take only literals.

pub async fn insert_product(
    conn: &mut PgConnection,
    product: &NewProduct,
) -> Result<Product, sqlx::Error> {
    sqlx::query_as!(
        Product,
        "insert into products (name, price_cents, initial_stock, stock)
         values ($1, $2, $3, $3)
         returning id, name, stock, price_cents, sold, initial_stock, restocked, created_at,
                   updated_at",
        product.name,
        product.price_cents,
        product.stock,
    )
    .fetch_one(conn)
    .await
}

pub async fn get_product(conn: &mut PgConnection, id: i64) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as!(
        Product,
        "select id, name, stock, price_cents, sold, initial_stock, restocked, created_at,
                updated_at
         from products where id = $1",
        id,
    )
    .fetch_optional(conn)
    .await
}

/// Newest first, keyset-paginated on `id` like the order listing: at most `limit` products
/// with an id below `before_id` (all of them when `None`).
pub async fn list_products(
    conn: &mut PgConnection,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<Product>, sqlx::Error> {
    sqlx::query_as!(
        Product,
        "select id, name, stock, price_cents, sold, initial_stock, restocked, created_at,
                updated_at
         from products
         where ($1::bigint is null or id < $1)
         order by id desc
         limit $2",
        before_id,
        limit,
    )
    .fetch_all(conn)
    .await
}

/// Adds `quantity` units; `None` if the product does not exist.
pub async fn restock(
    conn: &mut PgConnection,
    id: i64,
    quantity: i64,
) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as!(
        Product,
        "update products
         set stock = stock + $2, restocked = restocked + $2, updated_at = now()
         where id = $1
         returning id, name, stock, price_cents, sold, initial_stock, restocked, created_at,
                   updated_at",
        id,
        quantity,
    )
    .fetch_optional(conn)
    .await
}

/// Places an order in one statement: the conditional decrement and the insert succeed or fail
/// together, and a buyer who would take stock below zero matches no row instead of waiting on
/// a `SELECT … FOR UPDATE` round trip. `stock_not_negative` backs this up in the schema.
///
/// A refusal reads what is left in a second statement; a restock committing between the two
/// would make it an `OUT_OF_STOCK` whose `available` covers the order, so the order is tried
/// again then (a few times at most: only restocks make stock grow).
pub async fn place_order(
    conn: &mut PgConnection,
    order: &NewOrder,
) -> Result<Result<Order, Rejected>, sqlx::Error> {
    let quantity = i64::from(order.quantity.get());
    let mut attempts = PLACE_ATTEMPTS;
    loop {
        if let Some(placed) = try_place(conn, order).await? {
            return Ok(Ok(placed));
        }
        let available =
            sqlx::query_scalar!("select stock from products where id = $1", order.product_id)
                .fetch_optional(&mut *conn)
                .await?;
        attempts -= 1;
        match available {
            None => return Ok(Err(Rejected::UnknownProduct)),
            Some(available) if available < quantity || attempts == 0 => {
                return Ok(Err(Rejected::OutOfStock { available }));
            }
            Some(_) => continue,
        }
    }
}

/// How many times [`place_order`] tries an order that stock grew back for meanwhile.
const PLACE_ATTEMPTS: u32 = 3;

/// The conditional decrement and the insert, in one statement; `None` when the stock did not
/// cover the order (or the product does not exist).
async fn try_place(
    conn: &mut PgConnection,
    order: &NewOrder,
) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as!(
        Order,
        "with taken as (
             update products
             set stock = stock - $2, sold = sold + $2, updated_at = now()
             where id = $1 and stock >= $2
             returning id, price_cents
         )
         insert into orders (product_id, buyer_id, quantity, unit_price_cents, total_cents)
         select id, $3, $2, price_cents, price_cents * $2 from taken
         returning id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at",
        order.product_id,
        i64::from(order.quantity.get()),
        order.buyer_id.as_str(),
    )
    .fetch_optional(conn)
    .await
}

/// Locks a product's row for the rest of the transaction; its stock and price, if it exists.
pub async fn lock_product(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let locked = sqlx::query!(
        "select stock, price_cents from products where id = $1 for update",
        id
    )
    .fetch_optional(conn)
    .await?;
    Ok(locked.map(|row| (row.stock, row.price_cents)))
}

/// One order granted by [`crate::orders::coalesce`]: its stock is already reserved.
pub struct Grant<'a> {
    pub buyer_id: &'a str,
    pub quantity: i32,
}

/// Takes the grants' total from the (locked) product and inserts one order per grant, in one
/// statement; returns the orders in grant order.
pub async fn insert_grants(
    conn: &mut PgConnection,
    product_id: i64,
    price_cents: i64,
    grants: &[Grant<'_>],
) -> Result<Vec<Order>, sqlx::Error> {
    if grants.is_empty() {
        return Ok(Vec::new());
    }
    let buyers: Vec<&str> = grants.iter().map(|g| g.buyer_id).collect();
    let quantities: Vec<i32> = grants.iter().map(|g| g.quantity).collect();
    let mut placed: Vec<(i64, Order)> = sqlx::query!(
        r#"with grants as (
             select buyer_id, quantity, ord
             from unnest($2::text[], $3::int[]) with ordinality as g(buyer_id, quantity, ord)
         ),
         taken as (
             update products
             set stock = stock - (select sum(quantity) from grants),
                 sold = sold + (select sum(quantity) from grants),
                 updated_at = now()
             where id = $1
         ),
         ids as (
             select ord, nextval(pg_get_serial_sequence('orders', 'id')) as id
             from grants order by ord
         )
         insert into orders (id, product_id, buyer_id, quantity, unit_price_cents, total_cents)
         overriding system value
         select ids.id, $1, g.buyer_id, g.quantity, $4::int8, $4::int8 * g.quantity
         from grants g join ids using (ord)
         returning (select ord from ids where ids.id = orders.id) as "ord!", id, product_id,
                   buyer_id, quantity, unit_price_cents, total_cents, created_at"#,
        product_id,
        &buyers as &[&str],
        &quantities,
        price_cents,
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|row| {
        (
            row.ord,
            Order {
                id: row.id,
                product_id: row.product_id,
                buyer_id: row.buyer_id,
                quantity: row.quantity,
                unit_price_cents: row.unit_price_cents,
                total_cents: row.total_cents,
                created_at: row.created_at,
            },
        )
    })
    .collect();
    placed.sort_unstable_by_key(|(ord, _)| *ord);
    Ok(placed.into_iter().map(|(_, order)| order).collect())
}

/// Waits (at most `timeout`, then fails with `lock_not_available`) until no other transaction
/// holds the product's row lock. Every coalesced batch holds it from its start to its end, so
/// once it is granted a batch that held it has committed or aborted, and the next statement's
/// snapshot sees its orders if it committed. Holds a share lock for the rest of the transaction.
pub async fn wait_product_unlocked(
    conn: &mut PgConnection,
    product_id: i64,
    timeout: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "select set_config('lock_timeout', $1, true)",
        format!("{}ms", timeout.as_millis().max(1))
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query!(
        "select 1 as one from products where id = $1 for share",
        product_id
    )
    .fetch_optional(conn)
    .await?;
    Ok(())
}

/// The orders among `ids` that exist, in any order.
pub async fn get_orders(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<Order>, sqlx::Error> {
    sqlx::query_as!(
        Order,
        "select id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at
         from orders where id = any($1)",
        ids,
    )
    .fetch_all(conn)
    .await
}

pub async fn get_order(conn: &mut PgConnection, id: i64) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as!(
        Order,
        "select id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at
         from orders where id = $1",
        id,
    )
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
    sqlx::query_as!(
        Order,
        "select id, product_id, buyer_id, quantity, unit_price_cents, total_cents, created_at
         from orders
         where ($1::bigint is null or product_id = $1)
           and ($2::text is null or buyer_id = $2)
           and ($3::bigint is null or id < $3)
         order by id desc
         limit $4",
        filter.product_id,
        filter.buyer_id.as_deref(),
        filter.before_id,
        limit,
    )
    .fetch_all(conn)
    .await
}
