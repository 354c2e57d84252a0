//! The SQL of `api_tokens`: one small function per statement.

use sqlx::{PgConnection, Row};

use super::{NewToken, Principal, SecretHash, TokenInfo};

pub async fn insert(
    conn: &mut PgConnection,
    token: &NewToken,
    secret_hash: &SecretHash,
) -> Result<TokenInfo, sqlx::Error> {
    sqlx::query_as(
        "insert into api_tokens (name, role, merchant_id, secret_hash)
         values ($1, $2, $3, $4)
         returning id, name, role, merchant_id, created_at, revoked_at",
    )
    .bind(token.name.as_deref())
    .bind(token.role.as_str())
    .bind(token.merchant_id.as_deref())
    .bind(secret_hash.as_slice())
    .fetch_one(conn)
    .await
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<TokenInfo>, sqlx::Error> {
    sqlx::query_as(
        "select id, name, role, merchant_id, created_at, revoked_at
         from api_tokens
         order by id",
    )
    .fetch_all(conn)
    .await
}

/// Sets `revoked_at` unless already set; `None` if there is no such token.
pub async fn revoke(conn: &mut PgConnection, id: i64) -> Result<Option<TokenInfo>, sqlx::Error> {
    sqlx::query_as(
        "update api_tokens
         set revoked_at = coalesce(revoked_at, now())
         where id = $1
         returning id, name, role, merchant_id, created_at, revoked_at",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The unrevoked token with this hash: its stored hash (for the constant-time comparison) and
/// who it stands for.
pub async fn find_live(
    conn: &mut PgConnection,
    secret_hash: &SecretHash,
) -> Result<Option<(Vec<u8>, Principal)>, sqlx::Error> {
    let row = sqlx::query(
        "select id, role, merchant_id, secret_hash
         from api_tokens
         where secret_hash = $1 and revoked_at is null",
    )
    .bind(secret_hash.as_slice())
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let role: String = row.try_get("role")?;
    let principal = Principal {
        token_id: row.try_get("id")?,
        role: role.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        merchant_id: row.try_get("merchant_id")?,
    };
    Ok(Some((row.try_get("secret_hash")?, principal)))
}
