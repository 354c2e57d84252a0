//! Keyset pagination shared by the list endpoints: the `limit` and `cursor` query parameters
//! every list takes, and the page every list answers (`data` plus an opaque `next_cursor`
//! naming the last row seen).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::extract::Int;
use crate::config::PaginationConfig;

/// The query parameters of a page, read beside each list's own filters (see
/// [`super::extract::ListQuery`]).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1 to `pagination.max_page_size`.
    #[param(value_type = Option<i64>)]
    limit: Option<Int>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The filters of a list that has none but the page's.
#[derive(Debug, Deserialize, IntoParams)]
pub struct NoFilters {}

impl PageQuery {
    /// The page size asked for, checked against the configured bounds.
    pub fn limit(&self, config: &PaginationConfig) -> Result<i64, ApiError> {
        let max = config.max_page_size;
        match self
            .limit
            .map_or(config.default_page_size, |Int(limit)| limit)
        {
            limit if (1..=max).contains(&limit) => Ok(limit),
            _ => Err(ApiError::invalid(
                "INVALID_LIMIT",
                "limit",
                format!("limit must be between 1 and {max}"),
            )),
        }
    }

    /// The cursor as sent, for lists keyed by more than an id.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// For lists keyed by id: the id the previous page ended at (the next page starts strictly
    /// below it), `None` on the first page.
    pub fn before(&self) -> Result<Option<i64>, ApiError> {
        self.cursor().map(parse_id).transpose()
    }
}

/// What an id list's `next_cursor` writes, and all its `cursor` takes: a positive id in
/// decimal, without sign or leading zero (18 digits, more than any id here will reach).
pub const ID_CURSOR_PATTERN: &str = r"^[1-9][0-9]{0,17}$";

/// The id of an [`ID_CURSOR_PATTERN`] cursor. `str::parse` alone also takes `+5`, `05` and
/// 19 digits, which the document forbids.
fn parse_id(raw: &str) -> Result<i64, ApiError> {
    let written = match raw.as_bytes() {
        [b'1'..=b'9', rest @ ..] => rest.len() <= 17 && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    written
        .then(|| raw.parse().ok())
        .flatten()
        .ok_or_else(invalid_cursor)
}

/// A list's text filter: absent, or a value rows can hold. An empty one (a form's empty field)
/// matches no row; refused, so a client never takes the empty page for an answer.
pub fn text_filter(
    value: Option<String>,
    code: &'static str,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::invalid(
            code,
            field,
            format!("{field} must not be empty (leave it out to list every one)"),
        )),
        v => Ok(v),
    }
}

/// The error of a cursor this API did not write.
pub fn invalid_cursor() -> ApiError {
    ApiError::BadRequest {
        code: "INVALID_CURSOR",
        message: "cursor is not one this API returned".into(),
    }
}

/// One page of a list, as answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    data: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The page of `rows` (fetched with `limit + 1`, so one more means a next page), trimmed to
    /// `limit`; `cursor` writes the last row's key.
    pub fn of<R>(mut rows: Vec<R>, limit: i64, cursor: impl Fn(&R) -> String) -> Self
    where
        T: From<R>,
    {
        let next_cursor = (rows.len() as i64 > limit).then(|| {
            rows.truncate(limit as usize);
            rows.last().map(cursor)
        });
        Self {
            data: rows.into_iter().map(T::from).collect(),
            next_cursor: next_cursor.flatten(),
        }
    }

    /// [`Page::of`] for lists keyed by id, newest first.
    pub fn by_id<R>(rows: Vec<R>, limit: i64, id: impl Fn(&R) -> i64) -> Self
    where
        T: From<R>,
    {
        Self::of(rows, limit, |row| id(row).to_string())
    }

    /// A page with nothing on it.
    pub fn empty() -> Self {
        Self {
            data: Vec::new(),
            next_cursor: None,
        }
    }
}

/// Asserts that `takes` accepts exactly the `samples` the document's `pattern` matches.
#[cfg(test)]
pub fn assert_takes_what_the_pattern_allows(
    pattern: &str,
    takes: impl Fn(&str) -> bool,
    samples: &[&str],
) {
    let pattern = regex::Regex::new(pattern).expect("the document's pattern");
    for raw in samples {
        assert_eq!(takes(raw), pattern.is_match(raw), "{raw:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_cursor_is_taken_exactly_when_the_document_allows_it() {
        let samples = [
            "1",
            "42",
            "999999999999999999",
            "",
            "0",
            "05",
            "-5",
            "+5",
            " 5",
            "5 ",
            "1000000000000000000",
            "9223372036854775807",
            "0000000000000000000002",
            "\u{0663}",
        ];
        let takes = |raw: &str| parse_id(raw).is_ok();
        assert_takes_what_the_pattern_allows(ID_CURSOR_PATTERN, takes, &samples);
    }
}
