//! Flash-sale ordering: products with limited stock, and orders that can never oversell.
//!
//! The types here parse, they do not merely validate: a [`NewOrder`] holds a [`Quantity`] and a
//! [`BuyerId`] that are already known good, so [`store`] never sees bad input.

mod batch;
pub mod coalesce;
pub mod outcome;
pub mod store;

use chrono::{DateTime, Utc};

use crate::config::OrdersConfig;

/// Largest stock or restock quantity accepted in one request.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Largest unit price: with `orders.max_quantity` ≤ 1,000,000 a total always fits in 64 bits.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// Longest buyer id, in characters.
pub const MAX_BUYER_ID_CHARS: usize = 255;
/// Longest product name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Product {
    pub id: i64,
    pub name: String,
    /// Units left to sell.
    pub stock: i64,
    pub price_cents: i64,
    /// Units sold so far (`initial_stock + restocked = stock + sold`).
    pub sold: i64,
    pub initial_stock: i64,
    /// Units added by restocks so far.
    pub restocked: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Order {
    pub id: i64,
    pub product_id: i64,
    pub buyer_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
}

/// Why a product, restock or order was refused before reaching the database; each variant
/// is one field's rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("name must be 1 to {MAX_NAME_CHARS} characters, not blank")]
    Name,
    #[error("stock must be between 0 and {MAX_STOCK}")]
    Stock,
    #[error("price_cents must be between 0 and {MAX_PRICE_CENTS}")]
    Price,
    /// An order's or a restock's quantity is outside `1..=max`.
    #[error("quantity must be between 1 and {max}")]
    Quantity { max: i64 },
    #[error("buyer_id must be 1 to {MAX_BUYER_ID_CHARS} characters, not blank")]
    BuyerId,
}

/// A product that passed validation.
#[derive(Debug)]
pub struct NewProduct {
    pub name: String,
    pub stock: i64,
    pub price_cents: i64,
}

impl NewProduct {
    /// A name of at most [`MAX_NAME_CHARS`] as sent (the document's `maxLength`), stored
    /// trimmed and not blank; stock and price within their bounds.
    pub fn parse(name: &str, stock: i64, price_cents: i64) -> Result<Self, InvalidInput> {
        let sent = name.chars().count();
        let name = name.trim();
        if name.is_empty() || sent > MAX_NAME_CHARS || name.contains('\0') {
            return Err(InvalidInput::Name);
        }
        if !(0..=MAX_STOCK).contains(&stock) {
            return Err(InvalidInput::Stock);
        }
        if !(0..=MAX_PRICE_CENTS).contains(&price_cents) {
            return Err(InvalidInput::Price);
        }
        Ok(Self {
            name: name.to_owned(),
            stock,
            price_cents,
        })
    }
}

/// A restock's quantity: 1 to [`MAX_STOCK`] units.
pub fn restock_quantity(raw: i64) -> Result<i64, InvalidInput> {
    if !(1..=MAX_STOCK).contains(&raw) {
        return Err(InvalidInput::Quantity { max: MAX_STOCK });
    }
    Ok(raw)
}

/// A number of units between 1 and the configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i32);

impl Quantity {
    pub fn parse(raw: i64, max: i32) -> Result<Self, InvalidInput> {
        match i32::try_from(raw) {
            Ok(q) if (1..=max).contains(&q) => Ok(Self(q)),
            _ => Err(InvalidInput::Quantity { max: max.into() }),
        }
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

/// A non-blank buyer id of at most [`MAX_BUYER_ID_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuyerId(String);

impl BuyerId {
    pub fn parse(raw: String) -> Result<Self, InvalidInput> {
        let chars = raw.chars().count();
        if raw.trim().is_empty() || chars > MAX_BUYER_ID_CHARS || raw.contains('\0') {
            return Err(InvalidInput::BuyerId);
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An order that passed validation.
#[derive(Debug)]
pub struct NewOrder {
    pub product_id: i64,
    pub quantity: Quantity,
    pub buyer_id: BuyerId,
}

impl NewOrder {
    /// Checks the quantity (against `orders.max_quantity`), then the buyer id.
    pub fn parse(
        product_id: i64,
        quantity: i64,
        buyer_id: String,
        config: &OrdersConfig,
    ) -> Result<Self, InvalidInput> {
        Ok(Self {
            product_id,
            quantity: Quantity::parse(quantity, config.max_quantity)?,
            buyer_id: BuyerId::parse(buyer_id)?,
        })
    }
}

/// Why an order was not placed, decided by the database.
#[derive(Debug, Clone)]
pub enum Rejected {
    UnknownProduct,
    OutOfStock { available: i64 },
}
