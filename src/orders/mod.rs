//! Flash-sale ordering: products with limited stock, and orders that can never oversell.
//!
//! The types here parse, they do not merely validate: a [`NewOrder`] holds a [`Quantity`] and a
//! [`BuyerId`] that are already known good, so [`store`] never sees bad input.

pub mod coalesce;
pub mod outcome;
pub mod store;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::OrdersConfig;
use crate::http::error::ApiError;

/// Largest stock or restock quantity accepted in one request.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Largest unit price: with `orders.max_quantity` ≤ 1,000,000 a total always fits in 64 bits.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// Longest buyer id, in characters.
pub const MAX_BUYER_ID_CHARS: usize = 255;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
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

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Order {
    pub id: i64,
    pub product_id: i64,
    pub buyer_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
}

/// `POST /api/v1/products` body, as received.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProductRequest {
    pub name: String,
    pub stock: i64,
    pub price_cents: i64,
}

/// `POST /api/v1/products/{id}/restock` body, as received.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    pub quantity: i64,
}

/// `POST /api/v1/orders` body, as received.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    pub product_id: i64,
    pub quantity: i64,
    pub buyer_id: String,
}

/// A product that passed validation.
#[derive(Debug)]
pub struct NewProduct {
    pub name: String,
    pub stock: i64,
    pub price_cents: i64,
}

/// A number of units between 1 and the configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i32);

impl Quantity {
    pub fn parse(raw: i64, max: i32) -> Result<Self, ApiError> {
        match i32::try_from(raw) {
            Ok(q) if (1..=max).contains(&q) => Ok(Self(q)),
            _ => Err(ApiError::invalid(
                "INVALID_QUANTITY",
                "quantity",
                format!("quantity must be between 1 and {max}"),
            )),
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
    pub fn parse(raw: String) -> Result<Self, ApiError> {
        let chars = raw.chars().count();
        if raw.trim().is_empty() || chars > MAX_BUYER_ID_CHARS || raw.contains('\0') {
            return Err(ApiError::invalid(
                "INVALID_BUYER_ID",
                "buyer_id",
                format!("buyer_id must be 1 to {MAX_BUYER_ID_CHARS} characters, not blank"),
            ));
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

impl PlaceOrderRequest {
    pub fn parse(self, config: &OrdersConfig) -> Result<NewOrder, ApiError> {
        Ok(NewOrder {
            product_id: self.product_id,
            quantity: Quantity::parse(self.quantity, config.max_quantity)?,
            buyer_id: BuyerId::parse(self.buyer_id)?,
        })
    }
}

impl CreateProductRequest {
    pub fn parse(self) -> Result<NewProduct, ApiError> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.contains('\0') {
            return Err(ApiError::invalid(
                "INVALID_NAME",
                "name",
                "name must be 1 to 200 characters, not blank",
            ));
        }
        if !(0..=MAX_STOCK).contains(&self.stock) {
            return Err(ApiError::invalid(
                "INVALID_STOCK",
                "stock",
                format!("stock must be between 0 and {MAX_STOCK}"),
            ));
        }
        if !(0..=MAX_PRICE_CENTS).contains(&self.price_cents) {
            return Err(ApiError::invalid(
                "INVALID_PRICE",
                "price_cents",
                format!("price_cents must be between 0 and {MAX_PRICE_CENTS}"),
            ));
        }
        Ok(NewProduct {
            name: name.to_owned(),
            stock: self.stock,
            price_cents: self.price_cents,
        })
    }
}

impl RestockRequest {
    pub fn parse(self) -> Result<i64, ApiError> {
        if !(1..=MAX_STOCK).contains(&self.quantity) {
            return Err(ApiError::invalid(
                "INVALID_QUANTITY",
                "quantity",
                format!("quantity must be between 1 and {MAX_STOCK}"),
            ));
        }
        Ok(self.quantity)
    }
}

/// Why an order was not placed, decided by the database.
#[derive(Debug)]
pub enum Rejected {
    UnknownProduct,
    OutOfStock { available: i64 },
}

impl From<Rejected> for ApiError {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::UnknownProduct => ApiError::NotFound("product not found".into()),
            Rejected::OutOfStock { available } => ApiError::OutOfStock { available },
        }
    }
}
