//! Verified tokens remembered in process for `auth.cache_ttl_ms`, so a client placing
//! thousands of orders a second costs one token look-up per period instead of one per request.
//!
//! The price is that a revoked token keeps working in a process that verified it for at most
//! the ttl (1 s by default). Only successful verifications are kept: garbage or unknown tokens
//! go to the database every time (a caller guessing tokens cannot fill this map), so the map
//! holds at most one entry per live token, and stale entries are dropped whenever one is added.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::{Principal, SecretHash, hash, well_formed};

/// Shared by every request of one api process (cloning shares the map).
#[derive(Clone)]
pub struct TokenCache {
    /// How long a verification is trusted; zero asks the database every time.
    ttl: Duration,
    /// Keyed by the token's hash, never by the token itself.
    entries: Arc<RwLock<HashMap<SecretHash, (Instant, Principal)>>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
    }

    /// Who `presented` stands for: from the cache while its entry is younger than the ttl, else
    /// from the database ([`super::authenticate`]). Looking a hash up in the map reveals nothing
    /// of a secret through timing, for the same reason the database's index does not.
    pub async fn authenticate(
        &self,
        pool: &PgPool,
        presented: &str,
    ) -> Result<Option<Principal>, sqlx::Error> {
        if !well_formed(presented) {
            return Ok(None);
        }
        let key = hash(presented);
        if let Some(principal) = self.fresh(&key) {
            return Ok(Some(principal));
        }
        let mut conn = pool.acquire().await?;
        let found = super::authenticate(&mut conn, presented).await?;
        if let Some(principal) = &found {
            self.remember(key, principal.clone());
        }
        Ok(found)
    }

    fn fresh(&self, key: &SecretHash) -> Option<Principal> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, principal)| principal.clone())
    }

    fn remember(&self, key: SecretHash, principal: Principal) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
        entries.insert(key, (Instant::now(), principal));
    }
}
