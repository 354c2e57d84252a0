//! Access control: who may call which route (SPEC §4 "Access control").
//!
//! [`require_token`] runs on every matched route and method (a `route_layer`): an unknown path
//! stays 404 and a wrong method 405 with or without a token, as before access control (they
//! reveal only which routes exist, which the public OpenAPI document says anyway). It looks the route's template up in [`access`]: public routes
//! pass; the others need `Authorization: Bearer <token>` (401 `UNAUTHENTICATED` with
//! `WWW-Authenticate: Bearer` without a live one) and a role the route allows (403
//! `FORBIDDEN`). The caller's [`crate::tokens::Principal`] is left in the request's extensions for handlers
//! that filter by it (a merchant's settlements).
//!
//! Decisions where the spec is silent:
//! - `/downloads/{id}.csv` is admin only: a settlement CSV holds every merchant's figures.
//! - A method/route pair not listed in [`access`] is admin only, so a route added later is
//!   never open to another role by mistake, only until it is listed here.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Header, OpenApi, Ref, ResponseBuilder};

use super::AppState;
use super::error::ApiError;
use crate::tokens::Role;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, no token: health, metrics, the docs, the dashboard's page.
    Public,
    /// An admin token, or one of these roles.
    Roles(&'static [Role]),
}

impl Access {
    fn allows(self, role: Role) -> bool {
        match self {
            Self::Public => true,
            Self::Roles(roles) => role == Role::Admin || roles.contains(&role),
        }
    }
}

/// The access rule of `method` on the route template `route` (as matched, e.g.
/// `/api/v1/orders/{id}`). Everything under `/api/v1/` but the OpenAPI document is protected.
pub fn access(method: &Method, route: &str) -> Access {
    use Role::{Ingest, Merchant, Shop};
    let protected = route.starts_with("/api/v1/") || route.starts_with("/downloads/");
    if !protected || route == "/api/v1/openapi.json" {
        return Access::Public;
    }
    let read = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match route {
        "/api/v1/products" | "/api/v1/products/{id}" if read => Access::Roles(&[Shop]),
        "/api/v1/orders" if read || post => Access::Roles(&[Shop]),
        "/api/v1/orders/{id}" if read => Access::Roles(&[Shop]),
        "/api/v1/transactions" if post => Access::Roles(&[Ingest]),
        "/api/v1/settlements" if read => Access::Roles(&[Merchant]),
        _ => Access::Roles(&[]),
    }
}

/// The middleware: authenticates and authorizes the request per [`access`].
pub async fn require_token(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str());
    let access = match route {
        Some(route) => access(request.method(), route),
        None => Access::Public,
    };
    if access == Access::Public {
        return Ok(next.run(request).await);
    }
    let presented = bearer(request.headers())?;
    if !crate::tokens::well_formed(presented) {
        // Told apart from an unknown token: a token pasted cut short or with a stray
        // character is the caller's to fix, not one to look up or to ask an operator about.
        return Err(ApiError::Unauthenticated(
            "the token is not one this service issues (settle_ and 64 hex digits)",
        ));
    }
    let principal = app
        .tokens
        .authenticate(&app.pool, presented)
        .await?
        .ok_or(ApiError::Unauthenticated("unknown or revoked token"))?;
    if !access.allows(principal.role) {
        return Err(ApiError::Forbidden(principal.role));
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235).
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(ApiError::Unauthenticated(
        "this route needs an Authorization: Bearer <token> header",
    ))?;
    // Which of two credentials would count is anyone's guess: neither does.
    if values.next().is_some() {
        return Err(ApiError::Unauthenticated(
            "send one Authorization header, not several",
        ));
    }
    let malformed = || ApiError::Unauthenticated("the Authorization header is not Bearer <token>");
    let (scheme, token) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(malformed());
    }
    Ok(token.trim())
}

/// The OpenAPI side: a `bearer` security scheme, required by every protected operation, each
/// of which documents 401 and 403. Applied to the whole document, so an operation added later
/// is covered as soon as it is listed in `openapi.rs`.
pub struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some("A token from `settle tokens create`.".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                (Method::GET, &mut item.get),
                (Method::PUT, &mut item.put),
                (Method::POST, &mut item.post),
                (Method::DELETE, &mut item.delete),
                (Method::PATCH, &mut item.patch),
                (Method::HEAD, &mut item.head),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                if access(&method, path) == Access::Public {
                    continue;
                }
                operation.security =
                    Some(vec![SecurityRequirement::new::<_, _, String>("bearer", [])]);
                let responses = &mut operation.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| unauthenticated().into());
                responses.entry("403".into()).or_insert_with(|| {
                    error_response("FORBIDDEN: the token's role may not call this operation").into()
                });
            }
        }
    }
}

fn unauthenticated() -> utoipa::openapi::Response {
    let mut response =
        error_response("UNAUTHENTICATED: no token, or a malformed, unknown or revoked one");
    let mut header = Header::default(); // a string
    header.description = Some("Bearer".into());
    response
        .headers
        .insert("WWW-Authenticate".into(), header.into());
    response
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_api_and_downloads_are_protected_and_unlisted_pairs_are_admin_only() {
        for public in ["/livez", "/metrics", "/", "/api/v1/openapi.json", "/docs"] {
            assert_eq!(access(&Method::GET, public), Access::Public, "{public}");
        }
        let get = |route| access(&Method::GET, route);
        assert!(get("/downloads/{file}").allows(Role::Admin));
        assert!(!get("/downloads/{file}").allows(Role::Merchant));
        assert!(get("/api/v1/settlements").allows(Role::Merchant));
        assert!(!access(&Method::POST, "/api/v1/products").allows(Role::Shop));
        assert!(!access(&Method::DELETE, "/api/v1/orders/{id}").allows(Role::Shop));
        assert!(!get("/api/v1/some/new/route").allows(Role::Shop));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_required() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_owned).ok()
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer"), None);
        assert!(bearer(&HeaderMap::new()).is_err());
    }
}
