//! Settlement: PAID transactions aggregated per merchant and calendar day (in the configured time
//! zone) into the `settlements` table and a CSV, as a job that survives crashes exactly.
//!
//! The modules read in the order a job runs, [`job`] (the adapter to the queue) calling each:
//! 1. [`plan`] fixes its input once (an id high-water mark from [`plan::high_water_mark`], and
//!    of the transactions up to it those paid within the job's days, found by the `(paid_at,
//!    id)` index through [`input`]: their id span and true total, or, for a range holding the
//!    history's first and last rows, the span from the primary key's ends and the total
//!    counted in the job's one pass) and splits the span into disjoint parts holding given
//!    shares of the input ([`cuts`]), so a job's cost follows its range, not the table;
//! 2. [`parts`] aggregates the next `batch_size` rows of one part (keyset on id) into one row of
//!    partial sums, inside a transaction the caller commits together with the checkpoint;
//!    `parallel_parts` parts run at once, each with its own cursor, the rest taken in turn;
//! 3. [`finalize`] replaces the range's rows in `settlements` (never a day settled from a
//!    newer input, by the snapshot [`plan::high_water_mark`] drew with the mark) and stores them as the job's result ([`results`]), in the transaction that
//!    completes the job; [`finalize::delete_working_rows`] removes a cancelled or failed
//!    job's working rows instead.
//!
//! Only step 3 touches `settlements` and the results, so a job that never completes leaves them
//! as they were. A sum past 64 bits, in any step, fails the job, whose error names the
//! merchant-days at fault ([`overflow`]). [`list`] reads `settlements` back in keyset pages.

pub mod cuts;
pub mod finalize;
pub mod input;
pub mod job;
pub mod list;
pub mod overflow;
pub mod parts;
pub mod plan;
pub mod replica;
pub mod results;
pub mod transactions;

use chrono::{Datelike, NaiveDate};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::config::SettlementConfig;

/// `{"from","to"}` as stored in a settlement job's params (and received by the API), not yet
/// checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DateRangeInput {
    /// First day settled, `YYYY-MM-DD`, inclusive.
    pub from: String,
    /// Last day settled, `YYYY-MM-DD`, inclusive.
    pub to: String,
}

/// Why a pair of days is not a settlement range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `field` (`from` or `to`) is not a calendar day.
    #[error("{field} must be a calendar day as YYYY-MM-DD")]
    NotADay { field: &'static str },
    #[error("from must not be after to")]
    Reversed,
    #[error("a settlement may span at most {max_span_days} days")]
    TooLong { max_span_days: i64 },
}

impl RangeError {
    /// The end of the range at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::NotADay { field } => field,
            Self::Reversed | Self::TooLong { .. } => "to",
        }
    }
}

/// Both ends inclusive, `from ≤ to`, spanning at most `settlement.max_span_days` days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    from: NaiveDate,
    to: NaiveDate,
}

/// A calendar day written exactly `YYYY-MM-DD`, as the API documents it, of the years 1 to
/// 9999. chrono's `%Y` alone also takes signed and longer years (`-5000-01-01`,
/// `+200000-01-01`), days Postgres cannot hold (before 4714 BC) or no transaction's `paid_at`
/// can fall on; year 0 (1 BC) Postgres writes as `0001-… BC`, not `YYYY-MM-DD`.
pub fn parse_day(raw: &str) -> Option<NaiveDate> {
    let digits_at =
        |range: std::ops::Range<usize>| raw.as_bytes()[range].iter().all(u8::is_ascii_digit);
    let well_formed = raw.len() == 10 && digits_at(0..4) && digits_at(5..7) && digits_at(8..10);
    well_formed
        .then(|| NaiveDate::parse_from_str(raw, "%Y-%m-%d").ok())
        .flatten()
        .filter(|day| day.year() >= 1)
}

impl DateRange {
    /// Parses `YYYY-MM-DD` days ([`parse_day`]), then checks them as [`Self::new`] does.
    pub fn parse(input: &DateRangeInput, max_span_days: i64) -> Result<Self, RangeError> {
        let day =
            |raw: &str, field: &'static str| parse_day(raw).ok_or(RangeError::NotADay { field });
        let from = day(&input.from, "from")?;
        let to = day(&input.to, "to")?;
        Self::new(from, to, max_span_days)
    }

    /// Checks an already typed pair of days.
    pub fn new(from: NaiveDate, to: NaiveDate, max_span_days: i64) -> Result<Self, RangeError> {
        if from > to {
            return Err(RangeError::Reversed);
        }
        if (to - from).num_days() + 1 > max_span_days {
            return Err(RangeError::TooLong { max_span_days });
        }
        Ok(Self { from, to })
    }

    pub fn from(self) -> NaiveDate {
        self.from
    }

    pub fn to(self) -> NaiveDate {
        self.to
    }

    /// The input shape again, for storing as job params.
    pub fn to_input(self) -> DateRangeInput {
        DateRangeInput {
            from: self.from.to_string(),
            to: self.to.to_string(),
        }
    }
}

/// The IANA time zone whose calendar days settlements are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(Tz);

impl Zone {
    pub fn parse(name: &str) -> Option<Self> {
        name.parse().ok().map(Self)
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// `(paid_at at time zone '<zone>')::date`, with the zone as a literal: the expression is
    /// then immutable, so the planner matches it to the `(merchant_id, day)` statistics. The
    /// name comes from the IANA database, and is quoted anyway.
    pub fn day_sql(self) -> String {
        format!(
            "(paid_at at time zone '{}')::date",
            self.name().replace('\'', "''")
        )
    }

    /// Name of the extended-statistics object for this zone's day expression.
    pub fn statistics_name(self) -> String {
        let slug: String = self
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("transactions_merchant_day_{slug}")
    }
}

/// What a settlement job needs from the configuration, parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub zone: Zone,
    /// Rows per checkpointed batch.
    pub batch_size: i64,
    /// Disjoint id sub-ranges one job aggregates at once.
    pub parts: u32,
    /// Where the parts read their batches.
    pub reads: replica::Reads,
    /// Hours a noted revision is kept at least ([`finalize::prune_revisions`]).
    pub revision_retention_hours: i64,
}

impl Settings {
    pub fn new(config: &SettlementConfig, batch_size: i64) -> Self {
        Self {
            // Config validation already rejected unknown zones.
            zone: Zone::parse(&config.time_zone).unwrap_or(Zone(Tz::UTC)),
            batch_size,
            parts: config.parallel_parts,
            reads: replica::Reads::primary(),
            revision_retention_hours: config.revision_retention_hours,
        }
    }

    /// These settings with the parts reading through `reads`.
    pub fn with_reads(self, reads: replica::Reads) -> Self {
        Self { reads, ..self }
    }
}

/// Why a settlement step failed, in terms the job runner can act on.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// A merchant-day's sum does not fit in 64 bits: retrying cannot help. The statement says
    /// not which; the job's error names them ([`overflow::describe`]).
    #[error("a settlement sum exceeds the 64-bit range")]
    Overflow,
    /// The database holds less of the run than the run itself does: its latest part batches,
    /// committed asynchronously, were lost in a server crash. Resuming from what it kept reads
    /// them again; going on would move a cursor past rows never summed.
    #[error(
        "the database lost this run's latest batches (a server crash); resuming from what it kept"
    )]
    Behind,
    /// Stored rows of the input were changed while the run read them in a way its finalize
    /// cannot correct by the revisions ([`finalize::sum_revisions`]: a TRUNCATE, a run fixed
    /// before revisions were kept by row, batches of the release before): its batches did not
    /// all read the same rows, and their sums are of no state the table held. Or they were
    /// changed on its days beside a day a newer input holds, where the corrected sums would be
    /// newer than that input's ([`finalize::finalize`]). The run starts over on the input as
    /// it is now.
    #[error(
        "stored transactions of this job's days were changed while it ran; starting over on \
         the input as it is now"
    )]
    Revised,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Session settings of the aggregation, scoped to the caller's transaction: the hash aggregate
/// stays in memory, JIT (which costs more than it saves on these plans) stays off, every
/// execution is planned for its actual id bounds, and a batch's id range is read with a bitmap
/// heap scan, a page at a time, instead of an index scan that revisits each page per row
/// (measured: 80 ms against 110-135 ms per 100,000-row batch); index-only scans stay on.
/// Dates render as ISO in the CSV.
pub const TUNING: &[(&str, &str)] = &[
    ("work_mem", "64MB"),
    ("jit", "off"),
    ("plan_cache_mode", "force_custom_plan"),
    ("enable_indexscan", "off"),
    ("datestyle", "ISO, YMD"),
];

/// Sets [`TUNING`] for the rest of the caller's transaction.
pub async fn set_local_tuning(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    set_local(conn, TUNING).await
}

/// Sets each `(name, value)` for the rest of the caller's transaction (as `SET LOCAL` would),
/// in one round trip.
pub async fn set_local(
    conn: &mut sqlx::PgConnection,
    settings: &[(&str, &str)],
) -> Result<(), sqlx::Error> {
    let (names, values): (Vec<&str>, Vec<&str>) = settings.iter().copied().unzip();
    sqlx::query!(
        "select set_config(name, value, true)
         from unnest($1::text[], $2::text[]) as settings(name, value)",
        &names as &[&str],
        &values as &[&str],
    )
    .fetch_all(conn)
    .await?;
    Ok(())
}

impl SettleError {
    /// A sum cast to bigint that does not fit (SQLSTATE 22003) is the job's overflow error.
    pub fn from_sum(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22003") => Self::Overflow,
            _ => Self::Sql(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: &str, to: &str) -> Result<DateRange, RangeError> {
        DateRange::parse(
            &DateRangeInput {
                from: from.into(),
                to: to.into(),
            },
            31,
        )
    }

    #[test]
    fn date_ranges_parse() {
        assert!(range("2025-01-01", "2025-01-31").is_ok());
        assert!(range("2025-01-01", "2025-01-01").is_ok());
        let error = |r: Result<DateRange, RangeError>| r.unwrap_err();
        assert_eq!(
            error(range("2025-02-30", "2025-03-01")),
            RangeError::NotADay { field: "from" }
        );
        assert_eq!(
            error(range("2025-01-01", "tomorrow")),
            RangeError::NotADay { field: "to" }
        );
        for not_as_documented in [
            "-5000-01-01",
            "+2025-01-01",
            "12025-01-01",
            "2025-1-01",
            "0000-12-31",
        ] {
            assert_eq!(
                error(range(not_as_documented, "2025-01-01")),
                RangeError::NotADay { field: "from" },
                "{not_as_documented}"
            );
        }
        assert!(range("0001-01-01", "0001-01-01").is_ok());
        assert!(range("9999-12-31", "9999-12-31").is_ok());
        assert_eq!(
            error(range("2025-01-02", "2025-01-01")),
            RangeError::Reversed
        );
        assert_eq!(
            error(range("2025-01-01", "2025-02-01")),
            RangeError::TooLong { max_span_days: 31 }
        );
        assert_eq!(error(range("2025-01-02", "2025-01-01")).field(), "to");
    }

    #[test]
    fn zones_render_as_literals() {
        let tokyo = Zone::parse("Asia/Tokyo").unwrap();
        assert_eq!(tokyo.day_sql(), "(paid_at at time zone 'Asia/Tokyo')::date");
        assert_eq!(
            tokyo.statistics_name(),
            "transactions_merchant_day_asia_tokyo"
        );
        assert!(Zone::parse("Mars/Olympus").is_none());
    }
}
