//! axum's extractors with their rejections turned into [`ApiError`], so malformed JSON, wrong
//! types, bad path ids and bad query strings answer with the API's error shape.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use utoipa::IntoParams;

use super::error::ApiError;
use super::pagination::PageQuery;

/// A JSON object body deserialized into `T` (a request struct), refusals as [`ApiError`]s.
/// serde's derived structs also take an array of their fields in order
/// (`["m-1", 10, 100]`), which the OpenAPI document (`type: object`) does not allow and which
/// a handler treating the body as an object must never meet: anything but an object is 400
/// `INVALID_BODY`. (axum's extractor checks the content type and reads the body within
/// `http.max_body_bytes`; its text is then deserialized once more, into `T`.)
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let RawJson(raw) = RawJson::from_request(request, state).await?;
        require_object(&raw, "the body")?;
        let axum::Json(value) = axum::Json::from_bytes(raw.get().as_bytes())?;
        Ok(Json(value))
    }
}

/// Refuses JSON text that is not an object (400 `INVALID_BODY`, naming it `what`): the text
/// of a struct, which serde would also take as an array of its fields in order.
pub fn require_object(raw: &RawValue, what: &str) -> Result<(), ApiError> {
    if raw.get().starts_with('{') {
        return Ok(());
    }
    Err(ApiError::BadRequest {
        code: "INVALID_BODY",
        message: format!("{what} must be a JSON object"),
    })
}

/// Any JSON body as its text (an object or an array: a batch of transactions), refusals as
/// [`ApiError`]s.
pub struct RawJson(pub Box<RawValue>);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        // axum reads the first Content-Type alone; which of two the sender meant is anyone's
        // guess (as with two Authorization or Idempotency-Key headers): neither counts.
        let types = request.headers().get_all(axum::http::header::CONTENT_TYPE);
        if types.iter().nth(1).is_some() {
            return Err(ApiError::UnsupportedMediaType);
        }
        let axum::Json(raw) = axum::Json::from_request(request, state).await?;
        Ok(Self(raw))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// A list's query string: its own filters `F` and the page every list takes, read through
/// `axum::extract::Query` with its rejection an [`ApiError`]. Refused: a NUL in any value
/// (Postgres text cannot hold one, so a filter carrying it would fail as a 500) and any
/// parameter the list does not document, `F`'s or the page's: a misspelt filter
/// (`?state=failed` for `status`) would otherwise answer every row as if it had matched.
pub struct ListQuery<F>(pub F, pub PageQuery);

impl<S: Send + Sync, F: serde::de::DeserializeOwned + IntoParams + Send> FromRequestParts<S>
    for ListQuery<F>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        if query.contains("%00") {
            return Err(ApiError::BadRequest {
                code: "INVALID_QUERY",
                message: "query parameters must not contain NUL characters".into(),
            });
        }
        let known: Vec<String> = F::into_params(|| None)
            .into_iter()
            .chain(PageQuery::into_params(|| None))
            .map(|parameter| parameter.name)
            .collect();
        if let Some((name, _)) = url::form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| !known.iter().any(|known| known == name))
        {
            return Err(ApiError::BadRequest {
                code: "INVALID_QUERY",
                message: format!(
                    "unknown query parameter `{name}`; this list takes {}",
                    known.join(", ")
                ),
            });
        }
        let axum::extract::Query(filters) =
            axum::extract::Query::<F>::from_request_parts(parts, state).await?;
        let axum::extract::Query(page) =
            axum::extract::Query::<PageQuery>::from_request_parts(parts, state).await?;
        Ok(Self(filters, page))
    }
}

/// Deserializes a JSON integer also when it is written as a number with a zero fraction
/// (`2.0`, `1e3`): JSON Schema's `integer`, which the OpenAPI document promises, includes them,
/// and serde's `i64` does not. Anything else (`1.5`, out of range) is refused. The number's
/// text is read, not serde's `f64` of it: that rounds `9007199254740993.0` to an even neighbour
/// and `1.0000000000000001` to `1`, a stored amount other than the one sent.
pub fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    use serde::Deserialize;
    // Borrowed from the body (every body is parsed from a slice), so nothing is copied.
    let raw = <&serde_json::value::RawValue>::deserialize(deserializer)?;
    let text = raw.get().trim();
    exact_integer(text).ok_or_else(|| {
        let shown: String = text.chars().take(40).collect();
        serde::de::Error::custom(format!(
            "invalid value: {shown}, expected an integer within 64 bits"
        ))
    })
}

/// An integer in a path or a query string, taken also when written as JSON Schema's `integer`
/// allows (`2.0`, `1e3`), as bodies take one ([`integer`]): the OpenAPI document says
/// `integer`, and a client generated from it may write one so. Anything else (`1.5`, `x`) is
/// refused as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int(pub i64);

impl<'de> serde::Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        exact_integer(&text).map(Int).ok_or_else(|| {
            let shown: String = text.chars().take(40).collect();
            serde::de::Error::custom(format!(
                "invalid value: {shown}, expected an integer within 64 bits"
            ))
        })
    }
}

/// The integer a JSON number's text denotes, exactly, when it is one that fits an `i64`.
/// Hand-written: serde_json hands out only an `f64` of a number with a fraction or an exponent
/// (its exact mode is a crate-wide feature that changes every `Value`), and this is all the
/// decimal arithmetic it takes.
fn exact_integer(text: &str) -> Option<i64> {
    // The common case, a plain integer, without the decimal arithmetic.
    if let Ok(integer) = text.parse::<i64>() {
        return Some(integer);
    }
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = unsigned
        .split_once(['e', 'E'])
        .map_or((unsigned, None), |(mantissa, exponent)| {
            (mantissa, Some(exponent))
        });
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    if whole.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The value is `digits` times ten to the `scale`; zero whatever its exponent.
    let significant = digits.trim_end_matches('0');
    if significant.trim_start_matches('0').is_empty() {
        return Some(0);
    }
    let exponent: i64 = exponent.map_or(Some(0), |e| e.parse().ok())?;
    let trailing_zeros = (digits.len() - significant.len()) as i64;
    let scale = exponent
        .checked_sub(fraction.len() as i64)?
        .checked_add(trailing_zeros)?;
    let significant = significant.trim_start_matches('0');
    if !(0..=18).contains(&scale) || significant.len() > 19 {
        return None;
    }
    let magnitude = significant.parse::<i128>().ok()? * 10i128.pow(scale as u32);
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

#[cfg(test)]
mod tests {
    use super::exact_integer;

    #[test]
    fn a_number_is_an_integer_only_when_its_text_denotes_one_exactly() {
        for (text, integer) in [
            ("0", Some(0)),
            ("-0.0", Some(0)),
            ("2.0", Some(2)),
            ("1e3", Some(1000)),
            ("1.5E1", Some(15)),
            ("2500e-2", Some(25)),
            ("9007199254740993", Some(9_007_199_254_740_993)),
            ("9007199254740993.0", Some(9_007_199_254_740_993)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("-9.223372036854775808e18", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("1.0000000000000001", None),
            ("12345678901234567.5", None),
            ("1.5", None),
            ("1e-1", None),
            ("1e30", None),
            ("1e99999999999999999999", None),
            ("10e9223372036854775807", None),
            ("1.5e-9223372036854775808", None),
            ("0e99999999999999999999", Some(0)),
            ("0.0e-99999999999999999999", Some(0)),
            ("\"5\"", None),
            ("true", None),
        ] {
            assert_eq!(exact_integer(text), integer, "{text}");
        }
    }
}
