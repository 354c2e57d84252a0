//! Tokens for tests: every `TestApp` holds an admin token (sent by `app.http` on every
//! request); a test that checks access asks for a token or a client of another role here.

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use settle::tokens::{self, NewToken, Role};
use sqlx::PgPool;

use super::TestApp;

/// A new token of `role` (with `merchant` for a merchant token), made by the domain function.
pub async fn create_token(pool: &PgPool, role: Role, merchant: Option<&str>) -> String {
    let new = NewToken::new(role, merchant.map(Into::into), Some(format!("test {role}")))
        .expect("a valid token request");
    let mut conn = pool.acquire().await.expect("connection");
    let (_, secret) = tokens::create(&mut conn, &new).await.expect("create token");
    secret.expose().to_owned()
}

/// A client that sends `Authorization: Bearer <token>` with every request.
pub fn client_with(token: &str) -> reqwest::Client {
    let value = HeaderValue::try_from(format!("Bearer {token}")).expect("header value");
    reqwest::Client::builder()
        .default_headers(HeaderMap::from_iter([(AUTHORIZATION, value)]))
        .build()
        .expect("client")
}

impl TestApp {
    /// A new token of `role` on this app's database.
    pub async fn token(&self, role: Role, merchant: Option<&str>) -> String {
        create_token(&self.pool, role, merchant).await
    }

    /// Revokes the newest token of `role`.
    pub async fn revoke_newest(&self, role: Role) {
        let mut conn = self.pool.acquire().await.expect("connection");
        let listed = tokens::list(&mut conn).await.expect("list tokens");
        let newest = listed
            .iter()
            .rev()
            .find(|t| t.role == role)
            .expect("a token");
        tokens::revoke(&mut conn, newest.id).await.expect("revoke");
    }

    /// A client holding a new token of `role`.
    pub async fn client_as(&self, role: Role, merchant: Option<&str>) -> reqwest::Client {
        client_with(&self.token(role, merchant).await)
    }
}
