//! The SQL of `api_tokens`: one small function per statement.

use sqlx::PgConnection;

use super::{NewToken, Principal, Role, SecretHash, TokenInfo};

/// A stored role as a [`Role`]; the table's check constraint admits only known ones.
fn role(stored: String) -> Result<Role, sqlx::Error> {
    stored.parse().map_err(|e| sqlx::Error::ColumnDecode {
        index: "role".to_owned(),
        source: Box::new(e),
    })
}

/// A [`TokenInfo`] from a checked statement's row (its `role` is stored as text).
macro_rules! token_info {
    ($row:expr) => {{
        let row = $row;
        TokenInfo {
            id: row.id,
            name: row.name,
            role: role(row.role)?,
            merchant_id: row.merchant_id,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }};
}

pub async fn insert(
    conn: &mut PgConnection,
    token: &NewToken,
    secret_hash: &SecretHash,
) -> Result<TokenInfo, sqlx::Error> {
    let row = sqlx::query!(
        "insert into api_tokens (name, role, merchant_id, secret_hash)
         values ($1, $2, $3, $4)
         returning id, name, role, merchant_id, created_at, revoked_at",
        token.name.as_deref(),
        token.role.as_str(),
        token.merchant_id.as_deref(),
        secret_hash.as_slice(),
    )
    .fetch_one(conn)
    .await?;
    Ok(token_info!(row))
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<TokenInfo>, sqlx::Error> {
    let rows = sqlx::query!(
        "select id, name, role, merchant_id, created_at, revoked_at
         from api_tokens
         order by id",
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(|row| Ok(token_info!(row))).collect()
}

/// Sets `revoked_at` unless already set; `None` if there is no such token.
pub async fn revoke(conn: &mut PgConnection, id: i64) -> Result<Option<TokenInfo>, sqlx::Error> {
    let row = sqlx::query!(
        "update api_tokens
         set revoked_at = coalesce(revoked_at, now())
         where id = $1
         returning id, name, role, merchant_id, created_at, revoked_at",
        id,
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some(row) => Some(token_info!(row)),
        None => None,
    })
}

/// The unrevoked token with this hash: its stored hash (for the constant-time comparison) and
/// who it stands for.
pub async fn find_live(
    conn: &mut PgConnection,
    secret_hash: &SecretHash,
) -> Result<Option<(Vec<u8>, Principal)>, sqlx::Error> {
    let row = sqlx::query!(
        "select id, role, merchant_id, secret_hash
         from api_tokens
         where secret_hash = $1 and revoked_at is null",
        secret_hash.as_slice(),
    )
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let principal = Principal {
        token_id: row.id,
        role: row
            .role
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        merchant_id: row.merchant_id,
    };
    Ok(Some((row.secret_hash, principal)))
}
