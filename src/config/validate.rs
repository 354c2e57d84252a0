//! Every value of a [`Config`] checked before anything connects anywhere: each problem names
//! its key.

use super::{Config, ConfigError};

/// The longest duration a key may give, in ms: Postgres' bound for its timeouts (2^31 - 1).
const MAX_MS: u64 = i32::MAX as u64;

/// The longest age a retention key may give, in hours: 100 years. Finished jobs' and
/// revisions' ages are turned into milliseconds and subtracted from `now()`; far past this the
/// multiplication overflows (a panic at start) or the timestamp leaves Postgres' range (every
/// prune fails, and nothing is ever deleted).
const MAX_RETENTION_HOURS: u64 = 876_000;

/// The most days `schedule.catch_up_days` may catch up (a year).
const MAX_CATCH_UP_DAYS: u64 = 366;

/// The largest page a list may return: each list fetches `limit + 1` rows (one more means a
/// next page), which overflowed for `i64::MAX`, and a page this size is already a bulk export.
const MAX_PAGE_SIZE: i64 = 10_000;

/// The most rows one checkpointed batch may cover: a batch's last id is its first plus its size,
/// which must stay within `bigint` (ids count up from 1), and a batch is one transaction.
const MAX_BATCH_SIZE: i64 = 1_000_000_000;

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                problem: problem.to_owned(),
            })
        };
        if !self.database.url.starts_with("postgres://")
            && !self.database.url.starts_with("postgresql://")
        {
            return invalid("database.url", "must be a postgres:// URL");
        }
        if let Some(read_url) = &self.database.read_url
            && !read_url.starts_with("postgres://")
            && !read_url.starts_with("postgresql://")
        {
            return invalid("database.read_url", "must be a postgres:// URL");
        }
        // Without a database name Postgres picks the role's own: for the role `postgres`, the
        // server's maintenance database, where settle's tables would land unasked.
        for (key, url) in [
            ("database.url", Some(&self.database.url)),
            ("database.read_url", self.database.read_url.as_ref()),
        ] {
            if url.is_some_and(|url| names_no_database(url)) {
                return invalid(
                    key,
                    "names no database, so the role postgres would use the server's maintenance \
                     database postgres: end it with one, e.g. postgres://postgres@127.0.0.1:5432/settle",
                );
            }
        }
        if self.database.max_connections < 2 {
            // A worker's LISTEN session keeps one of the pool's connections for good.
            return invalid(
                "database.max_connections",
                "must be at least 2 (a worker's LISTEN session keeps one)",
            );
        }
        if self.database.acquire_timeout_ms == 0 {
            return invalid("database.acquire_timeout_ms", "must be positive");
        }
        if self.http.request_timeout_ms == 0 {
            return invalid("http.request_timeout_ms", "must be positive");
        }
        if self.http.header_read_timeout_ms == 0 {
            return invalid("http.header_read_timeout_ms", "must be positive");
        }
        if !(1..=65_535).contains(&self.http.listen_backlog) {
            return invalid("http.listen_backlog", "must be between 1 and 65535");
        }
        if self.database.read_batch_timeout_ms == 0 {
            return invalid("database.read_batch_timeout_ms", "must be positive");
        }
        if !(1..=1000).contains(&self.http.max_concurrent_downloads) {
            return invalid(
                "http.max_concurrent_downloads",
                "must be between 1 and 1000",
            );
        }
        if self.http.download_stall_timeout_ms == 0 {
            return invalid("http.download_stall_timeout_ms", "must be positive");
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if !(1..=1_000_000).contains(&self.orders.max_quantity) {
            return invalid("orders.max_quantity", "must be between 1 and 1000000");
        }
        // A batch's orders travel as arrays in one statement; a typo's billion is refused here,
        // not at the first order.
        if !(1..=super::MAX_ORDER_BATCH).contains(&self.orders.max_batch) {
            return invalid("orders.max_batch", "must be between 1 and 10000");
        }
        // It is also the batch's lock_timeout, which Postgres takes up to i32::MAX ms.
        if !(1..=i32::MAX as u64).contains(&self.orders.batch_timeout_ms) {
            return invalid(
                "orders.batch_timeout_ms",
                "must be between 1 and 2147483647",
            );
        }
        let pages = &self.pagination;
        if !(1..=MAX_PAGE_SIZE).contains(&pages.max_page_size) {
            return invalid("pagination.max_page_size", "must be between 1 and 10000");
        }
        if !(1..=pages.max_page_size).contains(&pages.default_page_size) {
            return invalid(
                "pagination.default_page_size",
                "must be between 1 and pagination.max_page_size",
            );
        }
        if !(1..=87_600).contains(&self.idempotency.ttl_hours) {
            return invalid(
                "idempotency.ttl_hours",
                "must be between 1 and 87600 (10 years)",
            );
        }
        if self.idempotency.prune_interval_ms == 0 {
            return invalid("idempotency.prune_interval_ms", "must be positive");
        }
        let w = &self.worker;
        // Every duration stays within Postgres' bound for its own timeouts (several become
        // `lock_timeout` or `idle_in_transaction_session_timeout`), and the comparisons below
        // between them cannot overflow.
        let durations = [
            (
                "database.acquire_timeout_ms",
                self.database.acquire_timeout_ms,
            ),
            ("database.read_max_wait_ms", self.database.read_max_wait_ms),
            (
                "database.migration_lock_timeout_ms",
                self.database.migration_lock_timeout_ms,
            ),
            (
                "database.read_batch_timeout_ms",
                self.database.read_batch_timeout_ms,
            ),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            (
                "http.download_stall_timeout_ms",
                self.http.download_stall_timeout_ms,
            ),
            (
                "idempotency.prune_interval_ms",
                self.idempotency.prune_interval_ms,
            ),
            ("worker.lease_ms", w.lease_ms),
            ("worker.heartbeat_ms", w.heartbeat_ms),
            ("worker.shutdown_grace_ms", w.shutdown_grace_ms),
            ("worker.poll_interval_ms", w.poll_interval_ms),
            ("worker.rescue_probe_ms", w.rescue_probe_ms),
            ("worker.rescue_grace_ms", w.rescue_grace_ms),
            ("worker.backoff_base_ms", w.backoff_base_ms),
            ("worker.backoff_max_ms", w.backoff_max_ms),
            ("worker.retention_interval_ms", w.retention_interval_ms),
            ("worker.vacuum_interval_ms", w.vacuum_interval_ms),
            ("worker.job_timeout_ms", w.job_timeout_ms),
            (
                "schedule.check_interval_ms",
                self.schedule.check_interval_ms,
            ),
        ];
        let per_kind = w
            .timeouts
            .iter()
            .map(|(kind, &ms)| (format!("worker.timeouts.{kind}"), ms));
        let durations = durations.map(|(key, ms)| (key.to_owned(), ms));
        if let Some((key, _)) = durations
            .into_iter()
            .chain(per_kind)
            .find(|&(_, ms)| ms > MAX_MS)
        {
            return invalid(&key, "must be at most 2147483647 (ms, 24.8 days)");
        }
        // Each place is a permit and a slot the completer reserves up front.
        if !(1..=10_000).contains(&w.concurrency) {
            return invalid("worker.concurrency", "must be between 1 and 10000");
        }
        if !(1..=MAX_BATCH_SIZE).contains(&w.batch_size) {
            return invalid("worker.batch_size", "must be between 1 and 1000000000");
        }
        if w.claim_batch < 1 {
            return invalid("worker.claim_batch", "must be at least 1");
        }
        if w.heartbeat_ms == 0 || w.heartbeat_ms * 2 > w.lease_ms {
            return invalid(
                "worker.heartbeat_ms",
                "must be positive and at most half of worker.lease_ms",
            );
        }
        if w.shutdown_grace_ms == 0 || w.shutdown_grace_ms * 2 > w.lease_ms {
            return invalid(
                "worker.shutdown_grace_ms",
                "must be positive and at most half of worker.lease_ms",
            );
        }
        if !(1..=MAX_RETENTION_HOURS).contains(&w.retention_hours) {
            // Not "keep forever": 0 would delete every finished job, and its CSV, at the next
            // prune, before most clients could fetch it.
            return invalid(
                "worker.retention_hours",
                "must be between 1 and 876000 (100 years): finished jobs and their CSVs are kept \
                 this long",
            );
        }
        if i64::try_from(w.retention_hours).unwrap_or(i64::MAX) < self.idempotency.ttl_hours {
            // A job is deleted retention_hours after it ends, so never before the key that
            // created it expires only when retention_hours >= ttl_hours: a retry with the key
            // of a deleted job would be answered as the stored 202 QUEUED of a job that is gone.
            return invalid(
                "worker.retention_hours",
                &format!(
                    "must be at least idempotency.ttl_hours ({}): a retry with the \
                     Idempotency-Key of a deleted job would be answered with that job",
                    self.idempotency.ttl_hours
                ),
            );
        }
        if w.retention_interval_ms == 0 {
            return invalid("worker.retention_interval_ms", "must be positive");
        }
        if w.vacuum_dead_rows < 0 {
            return invalid("worker.vacuum_dead_rows", "must be 0 (off) or positive");
        }
        if w.vacuum_interval_ms == 0 {
            return invalid("worker.vacuum_interval_ms", "must be positive");
        }
        if w.poll_interval_ms == 0 {
            return invalid("worker.poll_interval_ms", "must be positive");
        }
        if w.rescue_probe_ms == 0 {
            return invalid("worker.rescue_probe_ms", "must be positive");
        }
        if w.rescue_grace_ms < w.rescue_probe_ms * 2 {
            return invalid(
                "worker.rescue_grace_ms",
                "must be at least twice worker.rescue_probe_ms",
            );
        }
        if w.max_attempts < 1 {
            return invalid("worker.max_attempts", "must be at least 1");
        }
        if w.backoff_base_ms == 0 {
            return invalid("worker.backoff_base_ms", "must be positive");
        }
        if w.backoff_max_ms < w.backoff_base_ms {
            return invalid(
                "worker.backoff_max_ms",
                "must be at least worker.backoff_base_ms",
            );
        }
        if w.job_timeout_ms == 0 {
            return invalid("worker.job_timeout_ms", "must be positive");
        }
        if w.timeouts.values().any(|&ms| ms == 0) {
            return invalid("worker.timeouts", "must all be positive");
        }
        // A cap is a semaphore's permits, which tokio refuses (a panic) past about 2^61.
        if let Some((kind, _)) = w
            .kinds
            .iter()
            .find(|(_, k)| !(1..=10_000).contains(&k.concurrency))
        {
            let key = format!("worker.kinds.{kind}.concurrency");
            return invalid(
                &key,
                "must be between 1 and 10000 (leave the kind out to cap it only by \
                 worker.concurrency)",
            );
        }
        if self.settlement.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return invalid("settlement.time_zone", "is not an IANA time zone name");
        }
        // Zone names that are also Postgres time zone abbreviations, which `at time zone` reads
        // first, as fixed offsets, where the zone keeps summer time: the days would move by an
        // hour each summer.
        let zone = self.settlement.time_zone.to_ascii_uppercase();
        if ["CET", "EET", "MET", "WET"].contains(&zone.as_str()) {
            return invalid(
                "settlement.time_zone",
                "is read by Postgres as a fixed offset without summer time; name a region \
                 (Europe/Paris, Europe/Athens, Europe/Lisbon, …)",
            );
        }
        if self.settlement.max_span_days < 1 {
            return invalid("settlement.max_span_days", "must be at least 1");
        }
        if !(1..=64).contains(&self.settlement.parallel_parts) {
            return invalid("settlement.parallel_parts", "must be between 1 and 64");
        }
        if !(1..=MAX_RETENTION_HOURS as i64).contains(&self.settlement.revision_retention_hours) {
            return invalid(
                "settlement.revision_retention_hours",
                "must be between 1 and 876000 (100 years)",
            );
        }
        if self.schedule.at_time().is_none() {
            return invalid("schedule.at", "must be a time of day, HH:MM or HH:MM:SS");
        }
        let zone = self.schedule.time_zone.as_deref();
        if zone.is_some_and(|zone| zone.parse::<chrono_tz::Tz>().is_err()) {
            return invalid("schedule.time_zone", "is not an IANA time zone name");
        }
        if self.schedule.check_interval_ms == 0 {
            return invalid("schedule.check_interval_ms", "must be positive");
        }
        if !(1..=MAX_CATCH_UP_DAYS).contains(&self.schedule.catch_up_days) {
            return invalid(
                "schedule.catch_up_days",
                "must be between 1 and 366 (a year)",
            );
        }
        if self.settlement.max_transactions_per_request == 0 {
            return invalid(
                "settlement.max_transactions_per_request",
                "must be at least 1",
            );
        }
        if self.auth.cache_ttl_ms > 60_000 {
            return invalid("auth.cache_ttl_ms", "must be at most 60000 (one minute)");
        }
        Ok(())
    }
}

/// Whether `url` names no database (none in its path, nor `PGDATABASE`) and its role is
/// `postgres`, whose own database is the server's maintenance database (another role's own
/// database is a choice: `postgres://settle@host` uses `settle`); an unparsable URL is left to
/// the connection, which says what is wrong with it.
fn names_no_database(url: &str) -> bool {
    url.parse::<sqlx::postgres::PgConnectOptions>()
        .is_ok_and(|options| {
            options.get_database().is_none_or(str::is_empty) && options.get_username() == "postgres"
        })
}
