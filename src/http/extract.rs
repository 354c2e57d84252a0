//! axum's extractors with their rejections turned into [`ApiError`], so malformed JSON, wrong
//! types, bad path ids and bad query strings answer with the API's error shape.

use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::ApiError;

/// `axum::Json` whose rejection is an [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejection is an [`ApiError`], refusing a NUL in any value:
/// Postgres text cannot hold one, so a filter carrying it would fail as a 500.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(ApiError::BadRequest {
                code: "INVALID_QUERY",
                message: "query parameters must not contain NUL characters".into(),
            });
        }
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Deserializes a JSON integer also when it is written as a number with a zero fraction
/// (`2.0`, `1e3`): JSON Schema's `integer`, which the OpenAPI document promises, includes them,
/// and serde's `i64` does not. Anything else (`1.5`, out of range) is refused as before.
pub fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integral;

    impl serde::de::Visitor<'_> for Integral {
        type Value = i64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // 2^63 is exactly representable; every integral f64 below it fits in an i64.
            let fits = v.fract() == 0.0 && (-(2f64.powi(63))..2f64.powi(63)).contains(&v);
            fits.then_some(v as i64)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(v), &self))
        }
    }

    deserializer.deserialize_any(Integral)
}
