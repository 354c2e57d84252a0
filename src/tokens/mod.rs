//! API tokens: who may call the API, and as what.
//!
//! A token is `settle_` followed by 64 hex digits: 32 bytes from the operating system's random
//! number generator, shown to the operator once when it is created. Only its SHA-256 is stored
//! ([`store`]); a presented token is hashed, looked up by hash and compared in constant time
//! ([`authenticate`]), and a revoked one never authenticates. What each [`Role`] may do is the
//! transport's business (`http/auth.rs` maps routes to roles); this module only says who is
//! calling. [`cache::TokenCache`] spares the hot paths (orders) a database round trip per request.

pub mod cache;
pub mod command;
pub mod store;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use subtle::ConstantTimeEq;

use crate::settlement::transactions::MAX_MERCHANT_ID_CHARS;

/// What every token starts with, so a leaked one is recognisable (secret scanners, logs).
pub const PREFIX: &str = "settle_";
/// Random bytes in a token; 32 bytes (256 bits) cannot be guessed or searched for.
const SECRET_BYTES: usize = 32;
/// Longest token name, in characters (the `api_token_name_length` constraint agrees).
pub const MAX_NAME_CHARS: usize = 200;

/// What a token lets its holder do; the routes each role reaches are listed in `http/auth.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including downloads of CSVs that hold every merchant.
    Admin,
    /// A storefront: reads products, places and reads orders.
    Shop,
    /// A payment feed: posts transactions.
    Ingest,
    /// One merchant's back office: reads that merchant's settlements only.
    Merchant,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Shop, Role::Ingest, Role::Merchant];

    /// The name the CLI takes and the database stores (`api_token_role_known`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Shop => "shop",
            Self::Ingest => "ingest",
            Self::Merchant => "merchant",
        }
    }
}

settle_workers::impl_display_from_str!(Role, TokenError, TokenError::UnknownRole);

/// Why a token could not be created or revoked, in the operator's terms.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown role {0:?}: use admin, shop, ingest or merchant")]
    UnknownRole(String),
    #[error("a merchant token needs --merchant ID: the merchant whose settlements it reads")]
    MerchantMissing,
    #[error("--merchant is only for the merchant role; a {0} token is not tied to a merchant")]
    MerchantNotAllowed(Role),
    #[error(
        "the merchant id must be 1 to {MAX_MERCHANT_ID_CHARS} characters, no control characters"
    )]
    InvalidMerchant,
    #[error("the name must be 1 to {MAX_NAME_CHARS} characters, no control characters")]
    InvalidName,
    #[error("no token with id {0}")]
    UnknownId(i64),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A checked request for a new token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    name: Option<String>,
    role: Role,
    /// Set exactly when `role` is [`Role::Merchant`].
    merchant_id: Option<String>,
}

impl NewToken {
    /// A merchant token must name its merchant and no other role may.
    pub fn new(
        role: Role,
        merchant_id: Option<String>,
        name: Option<String>,
    ) -> Result<Self, TokenError> {
        let text_ok = |s: &str, max: usize| {
            !s.trim().is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
        };
        match (role, &merchant_id) {
            (Role::Merchant, None) => return Err(TokenError::MerchantMissing),
            (Role::Merchant, Some(m)) if !text_ok(m, MAX_MERCHANT_ID_CHARS) => {
                return Err(TokenError::InvalidMerchant);
            }
            (Role::Merchant, Some(_)) | (_, None) => {}
            (other, Some(_)) => return Err(TokenError::MerchantNotAllowed(other)),
        }
        if name.as_deref().is_some_and(|n| !text_ok(n, MAX_NAME_CHARS)) {
            return Err(TokenError::InvalidName);
        }
        Ok(Self {
            name,
            role,
            merchant_id,
        })
    }

    /// An admin token named `name`.
    pub fn admin(name: &str) -> Self {
        Self::new(Role::Admin, None, Some(name.to_owned())).expect("an admin token needs nothing")
    }
}

/// A token as `settle tokens list` shows it: never its secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenInfo {
    pub id: i64,
    pub name: Option<String>,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub merchant_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<String> for Role {
    type Error = TokenError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Who is calling: what a verified token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: i64,
    pub role: Role,
    /// The merchant a [`Role::Merchant`] token reads; `None` for other roles.
    pub merchant_id: Option<String>,
}

/// A token's secret, as shown once to the operator. Not `Debug`, so it cannot reach a log line.
pub struct Secret(String);

impl Secret {
    /// A fresh secret from the operating system's random number generator.
    fn generate() -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator");
        Self(format!("{PREFIX}{}", hex::encode(bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of a presented token, the only form in which tokens are stored and cached.
pub type SecretHash = [u8; 32];

pub fn hash(presented: &str) -> SecretHash {
    Sha256::digest(presented.as_bytes()).into()
}

/// Whether `presented` has the shape of a token this service issues, so garbage is refused
/// without a hash or a database round trip.
pub fn well_formed(presented: &str) -> bool {
    presented.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 2 * SECRET_BYTES && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Creates a token; its secret is returned here and nowhere else, ever.
pub async fn create(
    conn: &mut PgConnection,
    token: &NewToken,
) -> Result<(TokenInfo, Secret), TokenError> {
    let secret = Secret::generate();
    let info = store::insert(conn, token, &hash(secret.expose())).await?;
    Ok((info, secret))
}

/// Every token, oldest first, revoked ones included.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(store::list(conn).await?)
}

/// Revokes token `id` from now on; revoking a revoked token keeps its first revocation time.
pub async fn revoke(conn: &mut PgConnection, id: i64) -> Result<TokenInfo, TokenError> {
    store::revoke(conn, id)
        .await?
        .ok_or(TokenError::UnknownId(id))
}

/// Who `presented` stands for, if it is a live token. Looked up through the `unique` index on
/// the hash, then the stored hash compared again with [`ConstantTimeEq`]: an index lookup may
/// take more or less time depending on how much of the key matched, and although that only
/// speaks about a hash of the secret (which reveals nothing of the secret itself), the final
/// decision never depends on a comparison that stops at the first differing byte.
pub async fn authenticate(
    conn: &mut PgConnection,
    presented: &str,
) -> Result<Option<Principal>, sqlx::Error> {
    if !well_formed(presented) {
        return Ok(None);
    }
    let wanted = hash(presented);
    let found = store::find_live(conn, &wanted).await?;
    Ok(found.and_then(|(stored, principal)| {
        bool::from(stored.as_slice().ct_eq(wanted.as_slice())).then_some(principal)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_printable_well_formed_and_distinct() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert!(well_formed(a.expose()) && well_formed(b.expose()));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), PREFIX.len() + 64);
        for bad in [
            "",
            "settle_",
            "settle_XYZ",
            &a.expose()[1..],
            &format!("{}0", a.expose()),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn a_merchant_id_goes_with_the_merchant_role_only() {
        let merchant = |m: Option<&str>| NewToken::new(Role::Merchant, m.map(Into::into), None);
        assert!(matches!(merchant(None), Err(TokenError::MerchantMissing)));
        assert!(matches!(
            merchant(Some(" ")),
            Err(TokenError::InvalidMerchant)
        ));
        assert!(merchant(Some("m-1")).is_ok());
        let shop = NewToken::new(Role::Shop, Some("m-1".into()), None);
        assert!(matches!(
            shop,
            Err(TokenError::MerchantNotAllowed(Role::Shop))
        ));
        assert!(matches!(
            "root".parse::<Role>(),
            Err(TokenError::UnknownRole(_))
        ));
        let long = NewToken::new(Role::Shop, None, Some("n".repeat(MAX_NAME_CHARS + 1)));
        assert!(matches!(long, Err(TokenError::InvalidName)));
    }
}
