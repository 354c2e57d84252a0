//! Keyset pagination shared by the list endpoints: an opaque cursor naming the last id seen.

use super::error::ApiError;
use crate::config::PaginationConfig;

/// The id a page ends at; the next page starts strictly below it.
#[derive(Debug, Clone, Copy)]
pub struct Cursor(pub i64);

impl Cursor {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        raw.parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(Self)
            .ok_or_else(|| ApiError::BadRequest {
                code: "INVALID_CURSOR",
                message: "cursor is not one this API returned".into(),
            })
    }
}

/// The page size asked for, checked against the configured bounds.
pub fn limit(asked: Option<i64>, config: &PaginationConfig) -> Result<i64, ApiError> {
    let max = config.max_page_size;
    match asked.unwrap_or(config.default_page_size) {
        limit if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(ApiError::invalid(
            "INVALID_LIMIT",
            "limit",
            format!("limit must be between 1 and {max}"),
        )),
    }
}

/// Given `limit + 1` rows, trims to `limit` and returns the cursor of the next page, if any.
pub fn next_cursor<T>(rows: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Option<String> {
    next_cursor_by(rows, limit, |row| id(row).to_string())
}

/// [`next_cursor`] for lists keyed by more than an id: `cursor` writes the last row's key.
pub fn next_cursor_by<T>(
    rows: &mut Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> String,
) -> Option<String> {
    if rows.len() as i64 <= limit {
        return None;
    }
    rows.truncate(limit as usize);
    rows.last().map(cursor)
}
